"""Connection churn against the shared-epoll serving threads.

Every serving thread takes connections from one epoll, and the sweep closes idle ones from
another thread; ownership moves by `parked.pop(fd)` alone. This test mixes everything that
moves a connection between owners, on two workers sharing one listener, and checks every
byte every client gets back: a response served twice, interleaved, lost, or a live
connection closed under a client, fails it.
"""
import random
import re
import shutil
import socket
import subprocess
import threading
import time

import pytest

from harness import Client, read_to_eof

# Every test runs once per WSGI engine (conftest.WSGI_ENGINES).
pytestmark = [pytest.mark.timeout(90), pytest.mark.usefixtures("engine")]

SECONDS = 6.0
CLIENTS = 24


def _one_connection(port: int, rng: random.Random, kinds: list) -> int:
    """One client connection doing one kind of thing; returns the requests answered."""
    kind = rng.choice(kinds)
    if kind == "sleepy":  # one request, then idle past keep-alive: the sweep must close it
        c = Client(port, timeout=10)
        try:
            status, _, body = c.request("/")
            assert (status, body) == (200, b"hello")
            assert read_to_eof(c.sock, 10) == b""  # a FIN, not a reset
        finally:
            c.close()
        return 1
    if kind == "slowhead":  # a head that never completes: the sweep answers 408
        s = socket.create_connection(("127.0.0.1", port), timeout=10)
        try:
            s.sendall(b"GET / HTTP/1.1\r\nHost: t\r\n")
            raw = read_to_eof(s, 10)
        finally:
            s.close()
        assert raw.startswith(b"HTTP/1.1 408 "), raw[:100]
        return 0
    if kind == "silent":  # connects and leaves: the server sees EOF before any byte
        socket.create_connection(("127.0.0.1", port), timeout=10).close()
        return 0
    if kind == "half":  # half a request head, then gone
        s = socket.create_connection(("127.0.0.1", port), timeout=10)
        s.sendall(b"GET /echo HTTP/1.1\r\nHost: t\r\nContent-Le")
        s.close()
        return 0
    c = Client(port, timeout=10)
    try:
        if kind == "keepalive":
            n = rng.randint(1, 6)
            for _ in range(n):
                status, _, body = c.request("/")
                assert (status, body) == (200, b"hello")
            return n
        if kind == "pipelined":
            n = rng.randint(2, 5)
            tags = [b"p%d-%d" % (i, rng.randint(0, 1 << 30)) for i in range(n)]
            c.send(b"".join(b"POST /echo HTTP/1.1\r\nHost: t\r\nContent-Length: %d\r\n\r\n%s"
                            % (len(t), t) for t in tags))
            for t in tags:
                status, _, body = c.response("POST")
                assert (status, body) == (200, t)
            return n
        if kind == "echo":
            tag = b"x" * rng.randint(1, 200000)  # bodies that take several reads
            status, _, body = c.request("/echo", method="POST", body=tag)
            assert (status, len(body)) == (200, len(tag))
            return 1
        status, headers, body = c.request("/", headers="Connection: close\r\n")
        assert (status, body) == (200, b"hello")
        assert headers["Connection"] == "close"
        assert read_to_eof(c.sock, 5) == b""  # and then the server really closes, cleanly
        return 1
    finally:
        c.close()


BASIC = ["keepalive", "pipelined", "close", "echo", "silent", "half"]


@pytest.mark.parametrize("timeouts", ["default", "sweeping"])
def test_connection_churn_every_response_intact(listeners, spawn, timeouts):
    # "sweeping": keep-alive and header timeouts of 1 s, and clients that idle past them or
    # never finish a head, so the main thread's sweep takes connections while the serving
    # threads take others. Busy clients never pause, so no legitimate keep-alive close can
    # meet one of their requests.
    kinds = BASIC
    overrides = None
    if timeouts == "sweeping":
        kinds = BASIC + ["sleepy", "slowhead"]
        overrides = {"timeouts": {"keepalive_ms": 1000}, "http": {"header_timeout_ms": 1000}}
    workers = [spawn(slot=i, threads=4, overrides=overrides).wait_ready() for i in range(2)]
    errors = []
    answered = [0]
    lock = threading.Lock()
    stop_at = time.monotonic() + SECONDS

    def client(seed: int) -> None:
        rng = random.Random(seed)
        while time.monotonic() < stop_at:
            try:
                n = _one_connection(listeners.port, rng, kinds)
            except Exception as exc:  # every client-visible failure counts
                with lock:
                    errors.append(repr(exc))
                continue
            with lock:
                answered[0] += n

    # wrk adds keep-alive pressure, so every serving thread is busy and contends for the GIL
    # while the churn moves connections between them (wrk reconnects on every close).
    wrk = None
    if shutil.which("wrk"):
        wrk = subprocess.Popen(["wrk", "-t1", "-c16", "-d%ds" % int(SECONDS), "--timeout", "5s",
                                "http://127.0.0.1:%d/" % listeners.port],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    threads = [threading.Thread(target=client, args=(seed,)) for seed in range(CLIENTS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    if wrk is not None:
        out = wrk.communicate(timeout=30)[0].decode()
        assert "Socket errors" not in out, out
        assert "Non-2xx" not in out, out
        assert int(re.search(r"(\d+) requests in", out).group(1)) > 1000, out
    assert errors == []
    assert answered[0] > 500
    for w in workers:
        assert w.alive()
        assert "internal error" not in w.stderr_text()
        assert "Traceback" not in w.stderr_text()


def test_slow_requests_do_not_hold_up_the_workers_other_connections(listeners, spawn):
    # One worker, 4 threads. The native engine's thread that waits for events serves what it
    # gets itself, and another takes the epoll over only once a request has been running for
    # a while (poll_token.hpp): three requests that sleep 2 s each must still run at once,
    # and quick requests on other connections meanwhile must not wait for any of them.
    spawn(threads=4).wait_ready()
    slow_done = []

    def slow() -> None:
        started = time.monotonic()
        c = Client(listeners.port, timeout=10)
        try:
            status, _, body = c.request("/slow?s=2")
            assert (status, body) == (200, b"slow done")
            slow_done.append(time.monotonic() - started)
        finally:
            c.close()

    started = time.monotonic()
    sleepers = [threading.Thread(target=slow) for _ in range(3)]
    for t in sleepers:
        t.start()
    quick = []
    for _ in range(20):
        t0 = time.monotonic()
        c = Client(listeners.port, timeout=10)
        try:
            status, _, body = c.request("/")
            assert (status, body) == (200, b"hello")
        finally:
            c.close()
        quick.append(time.monotonic() - t0)
    for t in sleepers:
        t.join(15)
    assert len(slow_done) == 3
    # Sequential sleeps would take 6 s; at once, a little over 2.
    assert time.monotonic() - started < 4.5, slow_done
    # Each quick request waited for none of the sleepers (each one would have been 2 s).
    assert max(quick) < 1.0, quick
