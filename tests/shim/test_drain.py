"""Drain under keep-alive load: two workers share one listener, one of them drains."""
import re
import shutil
import subprocess

import pytest

from harness import Client, LoadPool, get, wait_until

# Every test runs once per WSGI engine (conftest.WSGI_ENGINES).
pytestmark = [pytest.mark.timeout(90), pytest.mark.usefixtures("engine")]


def test_drain_under_keepalive_load_has_zero_client_errors(listeners, spawn):
    # The rollover order: the old worker A carries the load, the new worker B becomes ready,
    # then A drains while clients keep hammering the shared socket.
    a = spawn(slot=0, generation=1).wait_ready()
    slow = Client(listeners.port)
    assert slow.request("/pid")[2] == str(a.pid).encode()
    load = LoadPool(listeners.port)
    wait_until(lambda: load.ok > 500, 20, "load to ramp up")
    b = spawn(slot=1, generation=2).wait_ready()
    slow.send(b"GET /slow?s=1.5 HTTP/1.1\r\nHost: t\r\n\r\n")
    wait_until(lambda: [m for m in a.find("WATCHDOG") if m["INFLIGHT"] != "0"], 10,
               "slow request in flight on A")
    a.drain()
    status, headers, body = slow.response()
    assert (status, body) == (200, b"slow done")
    assert headers["Connection"] == "close"  # in flight at drain time: told to go away
    assert a.wait_exit(20) == 0
    before = load.ok
    wait_until(lambda: load.ok > before + 500, 20, "load continuing on worker B")
    load.finish()
    slow.close()
    assert load.errors == []
    assert load.closes_seen >= 1  # A's keep-alive clients were answered with Connection: close
    assert b.alive()
    assert get(listeners.port, "/pid")[1] == str(b.pid).encode()


@pytest.mark.skipif(shutil.which("wrk") is None, reason="wrk not installed")
def test_drain_under_wrk_load(listeners, spawn):
    a = spawn(slot=0, generation=1).wait_ready()
    # --timeout 5s: on a loaded CI host wrk itself can be descheduled for 2 s (its default
    # timeout) and then counts every connection as timed out; a request the drain loses
    # would show up as a read error (EOF before the response) anyway.
    wrk = subprocess.Popen(["wrk", "-t2", "-c32", "-d10s", "--timeout", "5s",
                            "http://127.0.0.1:%d/" % listeners.port],
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        wait_until(lambda: [m for m in a.find("WATCHDOG") if int(m["REQUESTS"]) > 2000], 20,
                   "wrk load on worker A")
        b = spawn(slot=1, generation=2).wait_ready()
        a.drain()
        assert a.wait_exit(20) == 0
        out = wrk.communicate(timeout=30)[0].decode()
    finally:
        if wrk.poll() is None:
            wrk.kill()
            wrk.wait(5)
    assert "Socket errors" not in out, out
    assert "Non-2xx" not in out, out
    assert int(re.search(r"(\d+) requests in", out).group(1)) > 5000, out
    assert b.alive()
