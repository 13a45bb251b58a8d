"""http.header_timeout on an idle worker (issue 18 points 5 and 9), whether the client sent
nothing, a partial head or one byte, and whatever the keepalive is; on every WSGI engine and
the ASGI interface.

Nothing here is timed (the owner's rule: tests check behaviour). That the timeout is the
configured one, not the keepalive, is shown by order: a keep-alive connection that went idle
*before* the test's connection was opened is still open (its keepalive, four times longer, is
not due) when the test's connection has been answered and closed. How precisely each timeout
fires is a matter of mechanism (a 100 ms sweep or tick): see the table in
docs/architecture.md, "How each timeout is enforced"."""
from __future__ import annotations

import socket
import tempfile
from typing import Iterator, Tuple

import pytest

from harness import SERVERS, Client, Listeners, Worker, server_worker

pytestmark = pytest.mark.timeout(60)

HEADER_TIMEOUT_MS = 1500
KEEPALIVE_MS = 6000
@pytest.fixture(scope="module", params=SERVERS)
def srv(request) -> Iterator[Tuple[Listeners, Worker]]:
    ls = Listeners(tempfile.mkdtemp(prefix="molt-timeouts-"))
    overrides = {"http": {"header_timeout_ms": HEADER_TIMEOUT_MS, "version_header": ""},
                 "timeouts": {"keepalive_ms": KEEPALIVE_MS}}
    w = server_worker(request.param, ls, overrides=overrides)
    yield ls, w.wait_ready()
    w.stop()
    ls.close()


def answer_until_closed(port: int, data: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port)) as s:
        if data:
            s.sendall(data)
        s.settimeout(30)
        answer = b""
        while True:
            chunk = s.recv(65536)
            if not chunk:
                return answer
            answer += chunk


@pytest.mark.parametrize("data,answer", [
    (b"", b""),
    (b"G", b"HTTP/1.1 408 Request Timeout\r\n"),
    (b"GET / HTTP/1.1\r\nHost: t\r\n", b"HTTP/1.1 408 Request Timeout\r\n"),
], ids=["nothing", "one-byte", "partial-head"])
def test_the_header_timeout_answers_before_the_keepalive(srv, data, answer):
    ls, w = srv
    idle = Client(ls.port, timeout=30)
    try:
        assert idle.request("/")[0] == 200  # now idle, under the keepalive
        got = answer_until_closed(ls.port, data)
        assert got.startswith(answer) and (answer or not got), got
        assert idle.request("/")[0] == 200  # its keepalive is not due yet
    finally:
        idle.close()
    assert w.alive()



def test_an_upgrade_whose_body_never_comes_is_answered_at_its_head(srv):
    """ASGI: an upgrade request whose announced body never comes is handled at its head (here
    refused: not a WebSocket), on every parser, not left open with no request cycle."""
    ls, w = srv
    if not w.config["interface"] == "asgi":
        pytest.skip("WSGI answers an upgrade request once its body is in, then closes")
    raw = answer_until_closed(ls.port, b"GET / HTTP/1.1\r\nHost: t\r\nUpgrade: x\r\n"
                              b"Connection: Upgrade\r\nContent-Length: 1000000\r\n\r\n")
    assert raw.startswith(b"HTTP/1.1 400 Bad Request\r\n"), raw
    # uvicorn's refusal; on h11, molt's framing guard refuses it first, with its own 400.
    ending = b"400 Bad Request\n" if w.variant == "asgi-h11" else b"Unsupported upgrade request."
    assert raw.endswith(ending), raw
