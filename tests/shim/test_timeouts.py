"""http.header_timeout fires on time on an idle WSGI worker (issue 18 point 9): within 10 % or
100 ms of its value, whether the client sent nothing, a partial head or one byte, and whatever
the keepalive is."""
from __future__ import annotations

import socket
import tempfile
import time
from typing import Iterator, Tuple

import pytest

from harness import Client, Listeners, Worker

pytestmark = pytest.mark.timeout(60)

HEADER_TIMEOUT_S = 2.0
TOLERANCE_S = max(0.1 * HEADER_TIMEOUT_S, 0.1)


@pytest.fixture(scope="module")
def srv(engine: str) -> Iterator[Tuple[Listeners, Worker]]:
    ls = Listeners(tempfile.mkdtemp(prefix="molt-timeouts-"))
    # A keepalive longer than the header timeout: the first head is still due on time.
    w = Worker(ls, "edge_app:application", engine=engine,
               overrides={"http": {"header_timeout_ms": int(HEADER_TIMEOUT_S * 1000),
                                   "version_header": ""},
                          "timeouts": {"keepalive_ms": 6000}}).wait_ready()
    yield ls, w
    w.stop()
    ls.close()


def seconds_until_closed(port: int, data: bytes) -> Tuple[float, bytes]:
    with socket.create_connection(("127.0.0.1", port)) as s:
        started = time.monotonic()
        if data:
            s.sendall(data)
        s.settimeout(3 * HEADER_TIMEOUT_S)
        answer = b""
        while True:
            chunk = s.recv(65536)
            if not chunk:
                return time.monotonic() - started, answer
            answer += chunk


@pytest.mark.parametrize("data,answer", [
    (b"", b""),
    (b"G", b"HTTP/1.1 408 Request Timeout\r\n"),
    (b"GET / HTTP/1.1\r\nHost: t\r\n", b"HTTP/1.1 408 Request Timeout\r\n"),
], ids=["nothing", "one-byte", "partial-head"])
def test_the_header_timeout_fires_on_time(srv, data, answer):
    ls, w = srv
    elapsed, got = seconds_until_closed(ls.port, data)
    assert got.startswith(answer) and (answer or not got), got
    assert abs(elapsed - HEADER_TIMEOUT_S) <= TOLERANCE_S, elapsed
    assert w.alive()


# Issue 18 point 5, without timing anything: a connection that never sends is closed at
# header_timeout from its accept, not at the keepalive. Shown by order: a keep-alive
# connection that went idle *before* the silent one was opened is still open (its keepalive,
# four times longer, is not due) when the silent one has been closed. The ASGI engine used
# max(keepalive, header_timeout), so there the keep-alive connection was closed first.
ORDER_HEADER_TIMEOUT_MS = 1500
ORDER_KEEPALIVE_MS = 6000


@pytest.fixture(scope="module", params=["wsgi", "asgi"])
def ordered(request) -> Iterator[Tuple[Listeners, Worker]]:
    ls = Listeners(tempfile.mkdtemp(prefix="molt-order-"))
    app = "edge_app:application" if request.param == "wsgi" else "asgi_app:app"
    w = Worker(ls, app, interface=request.param,
               overrides={"http": {"header_timeout_ms": ORDER_HEADER_TIMEOUT_MS},
                          "timeouts": {"keepalive_ms": ORDER_KEEPALIVE_MS}}).wait_ready()
    yield ls, w
    w.stop()
    ls.close()


def test_a_silent_connection_is_closed_at_header_timeout_not_keepalive(ordered):
    ls, w = ordered
    idle = Client(ls.port, timeout=30)
    try:
        assert idle.request("/")[0] == 200  # now idle, under the keepalive
        with socket.create_connection(("127.0.0.1", ls.port)) as silent:
            silent.settimeout(30)
            assert silent.recv(1) == b""  # closed by the server, without a word
        assert idle.request("/")[0] == 200  # its keepalive is not due yet
    finally:
        idle.close()
    assert w.alive()
