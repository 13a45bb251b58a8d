"""The http.* limits and timeouts, one table for both interfaces: each row sends the same bytes
to a WSGI worker (on each engine) and to an ASGI worker (on the native parser, on httptools,
and on the h11 fallback) and expects the same response, byte for byte (but the Date header).
docs/asgi.md lists the same rows. (http.send_timeout: test_slow_readers.py, on the same
servers; the master's side of timeouts.request: tests/e2e/test_asgi_apps.py.)"""
import json
import re
import tempfile

import pytest

from harness import (SERVERS, Client, Listeners, Worker, get, raw_exchange, server_worker,
                     wait_until)

pytestmark = pytest.mark.timeout(60)

HTTP = {"header_timeout_ms": 1500, "max_body_size": 1024, "version_header": "X-Molt-Version"}


def start(variant: str, ls: Listeners, overrides: dict) -> Worker:
    return server_worker(variant, ls, health_path="/healthz", overrides=overrides)


@pytest.fixture(scope="module", params=SERVERS)
def server(request):
    ls = Listeners(tempfile.mkdtemp(prefix="molt-limits-"))
    w = start(request.param, ls, {"http": HTTP})
    w.wait_ready()
    yield ls, w
    w.drain()
    assert w.wait_exit() == 0
    w.stop()
    ls.close()


def error_response(status_line: bytes) -> bytes:
    """What both engines answer a rejected request with (the Date header taken out)."""
    status, reason = status_line.split(b" ", 1)
    body = b"%s %s\n" % (status, reason)
    return (b"HTTP/1.1 " + status_line + b"\r\nContent-Type: text/plain; charset=utf-8\r\n"
            b"Content-Length: %d\r\nConnection: close\r\nX-Molt-Version: v1\r\n\r\n" % len(body)
            + body)


def without_date(raw: bytes) -> bytes:
    return re.sub(rb"\r\nDate: [^\r]*", b"", raw)


HEAD = b"POST /echo HTTP/1.1\r\nHost: t\r\n"

ROWS = [
    # (limit, request, status line)
    ("malformed request line", b"GARBAGE\r\n\r\n", b"400 Bad Request"),
    ("malformed header", b"GET / HTTP/1.1\r\nHost t\r\n\r\n", b"400 Bad Request"),
    ("http.max_request_line", b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\nHost: t\r\n\r\n",
     b"414 URI Too Long"),
    ("http.max_headers", b"GET / HTTP/1.1\r\nHost: t\r\n"
     + b"".join(b"X-H%d: v\r\n" % i for i in range(150)) + b"\r\n",
     b"431 Request Header Fields Too Large"),
    ("http.max_header_size", b"GET / HTTP/1.1\r\nHost: t\r\n"
     + b"".join(b"X-Big%d: %s\r\n" % (i, b"v" * 8000) for i in range(10)) + b"\r\n",
     b"431 Request Header Fields Too Large"),
    ("http.max_body_size, Content-Length", HEAD + b"Content-Length: 2000\r\n\r\n",
     b"413 Payload Too Large"),
    ("http.max_body_size, chunked", HEAD + b"Transfer-Encoding: chunked\r\n\r\n"
     + b"200\r\n" + b"x" * 512 + b"\r\n" + b"200\r\n" + b"x" * 512 + b"\r\n"
     + b"200\r\n" + b"x" * 512 + b"\r\n0\r\n\r\n", b"413 Payload Too Large"),
]


@pytest.mark.parametrize("limit, request_bytes, status_line", ROWS, ids=[r[0] for r in ROWS])
def test_a_request_over_a_limit_gets_the_same_answer_on_both_interfaces(
        server, limit, request_bytes, status_line):
    ls, w = server
    raw = raw_exchange(ls.port, request_bytes)
    assert without_date(raw) == error_response(status_line), raw[:400]
    assert get(ls.port, "/")[0] == 200  # the worker serves on
    assert w.alive()


@pytest.mark.parametrize("limit, request_bytes, status_line", ROWS, ids=[r[0] for r in ROWS])
def test_the_same_answer_on_a_connection_that_served_a_request_before(
        server, limit, request_bytes, status_line):
    # A kept-alive connection (a proxy reuses its upstream connections): the request before
    # was served, its response is complete, and the bad one still gets its own error.
    ls, w = server
    c = Client(ls.port)
    assert c.request("/")[0] == 200
    c.send(request_bytes)
    raw = c.read_all(10)
    c.close()
    assert without_date(raw) == error_response(status_line), raw[:400]
    assert w.alive()


def test_a_body_at_the_limit_is_served(server):
    ls, w = server
    c = Client(ls.port)
    status, _, body = c.request("/echo", method="POST", body=b"y" * 1024)
    assert (status, body) == (200, b"y" * 1024)
    c.close()


def test_header_timeout_answers_408_and_closes(server):
    ls, w = server
    c = Client(ls.port)
    c.send(b"GET / HTTP/1.1\r\nHost: t\r\n")  # never finished
    raw = c.read_all(10)
    assert without_date(raw) == error_response(b"408 Request Timeout"), raw[:400]
    c.close()


@pytest.mark.parametrize("variant", SERVERS)
def test_keepalive_0_closes_after_each_response(variant, listeners):
    w = start(variant, listeners, {"timeouts": {"keepalive_ms": 0}})
    try:
        w.wait_ready()
        c = Client(listeners.port)
        c.send(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")
        raw = c.read_all(5)  # EOF right after the response, not after a second
        assert raw.startswith(b"HTTP/1.1 200 "), raw[:200]
        assert re.search(rb"\r\nconnection: close\r\n", raw, re.I), raw[:300]
        c.close()
    finally:
        w.stop()


def test_a_request_in_flight_is_reported_with_its_age(server):
    # timeouts.request: the master aborts a worker whose oldest request is older than the
    # limit, from the age each heartbeat reports (INFLIGHT, OLDEST_MS); every server must
    # report it.
    ls, w = server
    slow = Client(ls.port)
    slow.send(b"GET /slow?s=1.5 HTTP/1.1\r\nHost: t\r\n\r\n")
    wait_until(lambda: [m for m in w.find("WATCHDOG")
                        if m["INFLIGHT"] == "1" and int(m["OLDEST_MS"]) >= 500], 10,
               "the slow request in flight, with its age")
    assert slow.response()[2] == b"slow done"
    slow.close()


def test_a_running_asgi_app_sees_http_disconnect_when_its_body_goes_over(server):
    # The 413 row's second half: the app is already reading the body when it goes over the
    # limit; the client gets the 413 and the app's receive() says http.disconnect.
    ls, w = server
    if w.config["interface"] != "asgi":
        pytest.skip("a WSGI app is called once its body is in")
    before = json.loads(get(ls.port, "/uploads")[1])["started"]
    chunk = b"200\r\n" + b"x" * 512 + b"\r\n"
    c = Client(ls.port)
    c.send(b"POST /upload-watch HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n" + chunk)
    wait_until(lambda: json.loads(get(ls.port, "/uploads")[1])["started"] == before + 1, 10,
               "the app to be reading the upload")
    c.send(chunk + chunk + b"0\r\n\r\n")  # 1536 bytes in all, over max_body_size (1024)
    raw = c.read_all(10)
    c.close()
    assert without_date(raw) == error_response(b"413 Payload Too Large"), raw[:400]
    ended = wait_until(lambda: json.loads(get(ls.port, "/uploads")[1])["ended_with"], 10,
                       "the app to see the end of its upload")
    assert ended == "http.disconnect"
