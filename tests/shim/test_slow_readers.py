"""Slow readers (issue 18 point 6): as many clients as the worker has threads each ask for a
large response and read nothing. http.send_timeout bounds how long each one holds its serving
thread, so a normal client is still served, and the slow connections are closed before their
body was sent. Without it (the old fixed 60 s write timeout) the normal client waited a minute.
The ASGI engine holds a slow reader's response in its transport buffer, not in a thread; the
same timeout closes the connection there too, so its request does not stay in flight."""
from __future__ import annotations

import socket
import tempfile

import pytest

from harness import SERVERS, Listeners, get, server_worker, wait_until

pytestmark = pytest.mark.timeout(90)

THREADS = 2
SEND_TIMEOUT_MS = 1500
BIG = 32 * 1024 * 1024  # far more than the socket buffers of both ends hold
# What each interface's app (harness.SERVER_APPS) answers "/" with.
HELLO = {"wsgi": b"hello", "asgi": b"asgi hello"}
# Well under the old 60 s write timeout, well over http.send_timeout.
NORMAL_CLIENT_TIMEOUT_S = 30.0


@pytest.fixture(scope="module", params=SERVERS)
def server(request):
    ls = Listeners(tempfile.mkdtemp(prefix="molt-slow-"))
    w = server_worker(request.param, ls, threads=THREADS,
                      overrides={"http": {"send_timeout_ms": SEND_TIMEOUT_MS}}).wait_ready()
    yield w.config["interface"], ls, w
    w.stop()
    ls.close()


def slow_reader(port: int, path: str) -> socket.socket:
    """A client that asks for `path` and then reads only the first bytes of the answer."""
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # a small window: nothing piles up
    s.settimeout(30)
    s.connect(("127.0.0.1", port))
    s.sendall(b"GET %s HTTP/1.1\r\nHost: t\r\n\r\n" % path.encode())
    assert s.recv(12).startswith(b"HTTP/1.1 200")  # its response is under way: a thread is on it
    return s


def bytes_until_closed(s: socket.socket) -> int:
    """Read what is left until the server's close (EOF or reset), bounded by the timeout."""
    total = 0
    try:
        while chunk := s.recv(1 << 20):
            total += len(chunk)
    except ConnectionResetError:
        pass
    return total


def test_slow_readers_cost_a_bounded_wait_and_are_closed(server):
    interface, ls, w = server
    hello = HELLO[interface]
    slow = [slow_reader(ls.port, "/big?n=%d" % BIG) for _ in range(THREADS)]
    try:
        # Every serving thread's client is slow; a normal client is served all the same.
        assert get(ls.port, "/", timeout=NORMAL_CLIENT_TIMEOUT_S) == (200, hello)
        # Each slow connection is given up after http.send_timeout without progress...
        said = "took no response bytes for 1.5s (http.send_timeout)"
        wait_until(lambda: w.stderr_text().count(said) >= THREADS, 30,
                   "the send timeout of every slow reader", on_timeout=w.stderr_text)
        # ...and closed: reading now ends before the whole body arrived.
        for s in slow:
            assert bytes_until_closed(s) < BIG
        assert get(ls.port, "/") == (200, hello)
        assert w.alive()
    finally:
        for s in slow:
            s.close()
