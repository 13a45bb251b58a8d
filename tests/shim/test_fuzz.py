"""Seeded fuzzing: random and mutated requests for a bounded time; the worker must survive."""
import random
import socket
import threading
import time

import pytest

from harness import HAVE_NATIVE, get

SEED = 20261121
DURATION_S = 10.0

CORPUS = [
    b"GET / HTTP/1.1\r\nHost: t\r\n\r\n",
    b"GET /env?a=1&b=2 HTTP/1.1\r\nHost: t\r\nX-A: 1\r\nX-A: 2\r\n\r\n",
    b"POST /echo HTTP/1.1\r\nHost: t\r\nContent-Length: 5\r\n\r\nhello",
    b"POST /echo HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
    b"HEAD / HTTP/1.0\r\n\r\n",
    b"GET /stream HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n",
    b"POST /echo HTTP/1.1\r\nHost: t\r\nExpect: 100-continue\r\nContent-Length: 3\r\n\r\nabc",
    b"GET http://t/env HTTP/1.1\r\nHost: t\r\n\r\n",
    b"OPTIONS * HTTP/1.1\r\nHost: t\r\n\r\n",
    b"GET /ws HTTP/1.1\r\nHost: t\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n",
    # `static:` (the fuzz worker serves tests/apps under /s/): ranges, validators, encodings.
    b"GET /s/static.txt HTTP/1.1\r\nHost: t\r\nRange: bytes=1-3\r\n\r\n",
    b"GET /s/static.txt HTTP/1.1\r\nHost: t\r\nIf-None-Match: \"x\", W/\"y\"\r\n"
    b"Accept-Encoding: gzip;q=0.5, br\r\nIf-Modified-Since: Tue, 14 Nov 2023 22:13:20 GMT\r\n\r\n",
    b"HEAD /s/%2e%2e/s/edge_app.py HTTP/1.1\r\nHost: t\r\nIf-Range: \"a\"\r\nRange: bytes=-5\r\n\r\n",
]
TOKENS = [b"\r\n", b"\n", b"\r", b":", b" ", b"\x00", b"\xff", b"%", b"%zz", b"chunked",
          b"Content-Length: ", b"Transfer-Encoding: ", b"-1", b"99999999999999999999",
          b"ffffffffffffffff", b"\t", b"HTTP/1.1", b"HTTP/9.9", b"0\r\n\r\n", b"..", b"/",
          b"bytes=", b",", b"%2e", b"%00"]


def mutate(rng: random.Random) -> bytes:
    kind = rng.random()
    if kind < 0.1:
        return bytes(rng.getrandbits(8) for _ in range(rng.randint(1, 2000)))
    data = bytearray(rng.choice(CORPUS) * rng.randint(1, 3))  # sometimes pipelined
    for _ in range(rng.randint(1, 6)):
        op = rng.random()
        pos = rng.randint(0, len(data))
        if op < 0.3 and data:
            data[min(pos, len(data) - 1)] = rng.getrandbits(8)
        elif op < 0.55:
            data[pos:pos] = rng.choice(TOKENS)
        elif op < 0.75:
            del data[pos:pos + rng.randint(1, 20)]
        elif op < 0.85:
            data[pos:pos] = bytes([rng.choice(b"aZ9-_/")]) * rng.randint(100, 20000)
        else:
            data = data[:pos]
    return bytes(data)


def one_exchange(port: int, rng: random.Random, bad: list) -> None:
    payload = mutate(rng)
    s = socket.create_connection(("127.0.0.1", port), timeout=2)
    try:
        pos = 0
        while pos < len(payload):  # random fragmentation exercises incremental parsing
            step = rng.randint(1, max(1, len(payload)))
            s.sendall(payload[pos:pos + step])
            pos += step
        if rng.random() < 0.5:
            s.shutdown(socket.SHUT_WR)
        s.settimeout(1.0)
        first = s.recv(16)
        if first and not first.startswith(b"HTTP/1.1 "):
            bad.append((payload[:200], first))
    except (OSError, socket.timeout):
        pass
    finally:
        s.close()


def fuzz(port: int, seconds: float, seed: int = SEED) -> "tuple[int, list]":
    """Four clients sending mutated requests for `seconds`: (exchanges, bad first bytes)."""
    bad: list = []
    counts = [0] * 4
    stop_at = time.monotonic() + seconds

    def runner(i: int) -> None:
        rng = random.Random(seed + i)
        while time.monotonic() < stop_at:
            one_exchange(port, rng, bad)
            counts[i] += 1

    threads = [threading.Thread(target=runner, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(seconds + 15)
    return sum(counts), bad


def survives_fuzz(w, port: int, hello: bytes, signs: "list[str]") -> None:
    """The fuzz run against worker `w`: every answer HTTP/1.1, the worker alive and serving,
    none of `signs` in its stderr, and a clean drain."""
    exchanges, bad = fuzz(port, DURATION_S)
    assert exchanges > 200
    assert bad == []
    assert w.alive()
    assert get(port, "/") == (200, hello)
    text = w.stderr_text()
    for sign in signs:
        assert sign not in text, text[text.find(sign):][:3000]
    w.drain()
    assert w.wait_exit() == 0


@pytest.mark.timeout(60)
@pytest.mark.usefixtures("engine")  # once per WSGI engine (conftest.WSGI_ENGINES)
def test_fuzz_worker_survives(listeners, spawn):
    w = spawn(overrides={"http": {"header_timeout_ms": 500},
                         "static": [{"prefix": "/s/", "dir": "."}]}).wait_ready()
    survives_fuzz(w, listeners.port, b"hello", ["internal error"])


@pytest.mark.timeout(60)
@pytest.mark.parametrize("parser", (["native"] if HAVE_NATIVE else []) + ["httptools"])
def test_fuzz_asgi_worker_survives(listeners, spawn, parser):
    """The ASGI engine's parsers (the extension's, and httptools behind the Python guard) under
    the same fuzz: every answer is HTTP/1.1 and nothing reaches the loop's error handler."""
    env = {"MOLT_SHIM_PARSER": parser} if parser == "httptools" else None
    w = spawn(app="asgi_app:app", interface="asgi", health_path="/healthz", env=env,
              overrides={"http": {"header_timeout_ms": 500}}).wait_ready()
    survives_fuzz(w, listeners.port, b"asgi hello",
                  ["Fatal error", "Exception in ASGI application", "Traceback"])
