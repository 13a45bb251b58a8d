"""The native engine (engine: native) through the same harness as the Python engine, asserting
exact responses: keep-alive, pipelining, chunked in and out, 100-continue, the limits, request
smuggling vectors, drain, app errors, and the fallback when the extension cannot load.

Until tests/shim takes an engine parameter, this module starts its workers with
`engine: native` and the built extension (build/lib/molt/_molt_native.abi3.so) on the path.
"""
import json
import os
import re
import socket
import tempfile

import pytest

from harness import (HAVE_NATIVE, REPO, Client, Listeners, Worker, get, raw_exchange, read_to_eof,
                     wait_until)

pytestmark = pytest.mark.timeout(60)


needs_native = pytest.mark.skipif(not HAVE_NATIVE, reason="_molt_native not built")

HTTP = {"header_timeout_ms": 1500, "max_body_size": 4 * 1024 * 1024, "body_buffer_size": 65536,
        "version_header": "X-Molt-Version"}


def native_worker(ls: Listeners, app: str = "edge_app:application", **kw) -> Worker:
    overrides = dict(kw.pop("overrides", {}))
    overrides.setdefault("http", HTTP)
    # The harness puts the build tree's extension on the path for engine="native".
    return Worker(ls, app, overrides=overrides, engine="native", **kw)


@pytest.fixture(scope="module")
def srv():
    ls = Listeners(tempfile.mkdtemp(prefix="molt-native-"))
    w = native_worker(ls, health_path="/healthz").wait_ready()
    wait_until(lambda: "native engine, parser http-parser" in w.stderr_text(), 5, "ready line")
    yield ls, w
    w.drain()
    assert w.wait_exit() == 0
    w.stop()
    ls.close()


def head_of(raw: bytes) -> bytes:
    """The response head without the Date line (it moves)."""
    head = raw.partition(b"\r\n\r\n")[0]
    return b"\r\n".join(line for line in head.split(b"\r\n") if not line.startswith(b"Date: "))


@needs_native
def test_keep_alive_exact_head(srv):
    ls, _ = srv
    c = Client(ls.port)
    c.send(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")
    raw = c.sock.recv(65536)
    assert head_of(raw) == (b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 5\r\n"
                            b"X-Molt-Version: v1")
    assert raw.endswith(b"\r\n\r\nhello")
    assert re.search(rb"\r\nDate: \w{3}, \d\d \w{3} \d{4} \d\d:\d\d:\d\d GMT\r\n", raw)
    status, _, body = c.request("/env")
    env = json.loads(body)
    assert status == 200 and env["REMOTE_PORT"] == str(c.sock.getsockname()[1])
    c.close()


@needs_native
def test_pipelining_in_one_send(srv):
    ls, _ = srv
    c = Client(ls.port)
    c.send(b"".join(b"POST /echo HTTP/1.1\r\nHost: t\r\nContent-Length: 1\r\n\r\n" + x
                    for x in (b"a", b"b", b"c")) + b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")
    assert [c.response()[2] for _ in range(4)] == [b"a", b"b", b"c", b"hello"]
    c.close()


# The sweep re-arms a connection with unread bytes at its keep-alive timeout: far beyond the
# clients' 5 s here, so only the rule under test can answer in time.
NO_SWEEP_RESCUE = {"http": HTTP, "timeouts": {"keepalive_ms": 60000}}


def in_the_app(w: Worker) -> None:
    """Until a heartbeat says a request is inside the app call."""
    wait_until(lambda: [m for m in w.find("WATCHDOG") if m["INFLIGHT"] == "1"], 10,
               "a request in the app")


@needs_native
def test_pipelined_burst_larger_than_one_read(listeners, spawn):
    """Connections are edge-triggered: a read that filled the engine's 64 KiB buffer may
    leave bytes queued that no new edge will announce. While the only thread is inside a
    slow app call, 1024 requests of exactly 64 bytes (one full read, ending between two
    requests) and one more arrive together, under one edge: the last one is answered too."""
    w = native_worker(listeners, threads=1, overrides=NO_SWEEP_RESCUE).wait_ready()
    try:
        one = b"GET /?pad=xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx HTTP/1.1\r\nHost: t\r\n\r\n"
        assert len(one) == 64
        c = Client(listeners.port)
        c.send(b"GET /slow?s=1 HTTP/1.1\r\nHost: t\r\n\r\n")
        in_the_app(w)
        c.send(one * 1024 + b"GET /pid HTTP/1.1\r\nHost: t\r\n\r\n")
        c.sock.settimeout(5)
        assert c.response()[2] == b"slow done"
        assert [c.response()[2] for _ in range(1024)] == [b"hello"] * 1024
        assert c.response()[2].isdigit()
        c.close()
    finally:
        w.stop()


@needs_native
def test_bytes_that_arrive_while_another_thread_serves_their_connection(listeners, spawn):
    """The connection is inside a slow app call, so a second thread has taken over the
    epoll (after 1 ms) and gets the edge of the next request's bytes, for a connection it
    must not serve. The event is remembered and the connection re-armed when the first
    request ends: the second is answered, not left waiting for an edge that never comes."""
    w = native_worker(listeners, threads=2, overrides=NO_SWEEP_RESCUE).wait_ready()
    try:
        c = Client(listeners.port)
        c.send(b"GET /slow?s=1 HTTP/1.1\r\nHost: t\r\n\r\n")
        in_the_app(w)  # a heartbeat later: the other thread took the epoll 1 ms after the event
        c.send(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")
        c.sock.settimeout(5)
        assert c.response()[2] == b"slow done"
        assert c.response()[2] == b"hello"
        c.close()
    finally:
        w.stop()


@needs_native
def test_chunked_request_and_response(srv):
    ls, _ = srv
    c = Client(ls.port)
    c.send(b"POST /echo HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n"
           b"5\r\nhello\r\n6;ext=1\r\n world\r\n0\r\n\r\n")
    status, headers, body = c.response()
    assert (status, body, headers["Content-Length"]) == (200, b"hello world", "11")
    assert c.request("/")[2] == b"hello"  # the connection stays usable after a chunked body
    c.close()
    raw = raw_exchange(ls.port, b"POST /echo HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n"
                       b"Connection: close\r\n\r\n5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n")
    assert head_of(raw) == (b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\n"
                            b"Content-Length: 11\r\nConnection: close\r\nX-Molt-Version: v1")
    assert raw.endswith(b"\r\n\r\nhello world")
    raw = raw_exchange(ls.port, b"GET /stream HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
    assert head_of(raw) == (b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n"
                            b"Transfer-Encoding: chunked\r\nConnection: close\r\nX-Molt-Version: v1")
    assert raw.partition(b"\r\n\r\n")[2] == b"4\r\none,\r\n4\r\ntwo,\r\n5\r\nthree\r\n0\r\n\r\n"


@needs_native
def test_large_body_spooled_and_read_by_lines(srv):
    ls, _ = srv
    body = b"".join(b"line %d\n" % i for i in range(40000))  # > body_buffer_size: on disk
    c = Client(ls.port)
    status, _, echoed = c.request("/echo", method="POST", body=body)
    assert status == 200 and echoed == body
    assert c.request("/echo-lines", method="POST", body=body)[2] == b"40000"
    c.close()


@needs_native
def test_expect_100_continue(srv):
    ls, _ = srv
    c = Client(ls.port)
    c.send(b"POST /echo HTTP/1.1\r\nHost: t\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n")
    assert c.reader.read(25) == b"HTTP/1.1 100 Continue\r\n\r\n"
    c.send(b"hello")
    assert c.response()[2] == b"hello"
    c.close()


def _error(status: int, phrase: str) -> bytes:
    body = b"%d %s\n" % (status, phrase.encode())
    return (b"HTTP/1.1 %d %s\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: %d\r\n"
            b"Connection: close\r\nX-Molt-Version: v1\r\n\r\n" % (status, phrase.encode(), len(body))
            + body)


def _without_date(raw: bytes) -> bytes:
    return re.sub(rb"Date: [^\r]*\r\n", b"", raw)


LIMITS = [
    (b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\nHost: t\r\n\r\n", 414, "URI Too Long"),
    (b"GET / HTTP/1.1\r\nHost: t\r\n" + b"".join(b"X-H%d: v\r\n" % i for i in range(150)) + b"\r\n",
     431, "Request Header Fields Too Large"),
    (b"GET / HTTP/1.1\r\nHost: t\r\n" + b"".join(b"X-B%d: %s\r\n" % (i, b"v" * 8000) for i in range(10))
     + b"\r\n", 431, "Request Header Fields Too Large"),
    (b"POST /echo HTTP/1.1\r\nHost: t\r\nContent-Length: 99999999\r\n\r\n", 413, "Payload Too Large"),
    (b"GARBAGE\r\n\r\n", 400, "Bad Request"),
    (b"GET / HTTP/1.1\r\nHost t\r\n\r\n", 400, "Bad Request"),
]


@needs_native
@pytest.mark.parametrize("request_bytes,status,phrase", LIMITS,
                         ids=["414", "431-count", "431-size", "413", "garbage", "no-colon"])
def test_limits_exact_error_and_close(srv, request_bytes, status, phrase):
    ls, w = srv
    assert _without_date(raw_exchange(ls.port, request_bytes)) == _error(status, phrase)
    assert get(ls.port, "/") == (200, b"hello")
    assert w.alive()


SMUGGLING = [
    (b"POST /echo HTTP/1.1\r\nHost: t\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n"
     b"0\r\n\r\nGET /pid HTTP/1.1\r\nHost: t\r\n\r\n", 400, "Bad Request"),
    (b"POST /echo HTTP/1.1\r\nHost: t\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\nhello", 400,
     "Bad Request"),
    (b"POST /echo HTTP/1.1\r\nHost: t\r\nContent-Length: 5, 5\r\n\r\nhello", 400, "Bad Request"),
    (b"POST /echo HTTP/1.1\r\nHost: t\r\nContent-Length: +5\r\n\r\nhello", 400, "Bad Request"),
    (b"POST /echo HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked, identity\r\n\r\n0\r\n\r\n",
     501, "Not Implemented"),
    (b"POST /echo HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: xchunked\r\n\r\n0\r\n\r\n",
     501, "Not Implemented"),
    (b"POST /echo HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n",
     400, "Bad Request"),
    (b"POST /echo HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n-1\r\nhello\r\n0\r\n\r\n",
     400, "Bad Request"),
    (b"GET / HTTP/1.1\nHost: t\n\n", 400, "Bad Request"),
    (b"GET / HTTP/1.1\r\nHost: t\nX-A: 1\r\n\r\n", 400, "Bad Request"),
    (b"GET / HTTP/1.1\r\nHost: t\rX-A: 1\r\n\r\n", 400, "Bad Request"),
    (b"GET / HTTP/1.1\r\nHost: t\r\nX-A: 1\r\n folded\r\n\r\n", 400, "Bad Request"),
    (b"GET / HTTP/1.1\r\nHost: t\r\nX-A: a\x00b\r\n\r\n", 400, "Bad Request"),
    (b"GET / HTTP/1.1\r\nHo\x00st: t\r\n\r\n", 400, "Bad Request"),
]


@needs_native
@pytest.mark.parametrize("request_bytes,status,phrase", SMUGGLING, ids=[
    "cl+te", "cl-cl", "cl-list", "cl-plus", "te-list", "te-obfuscated", "chunk-size-hex",
    "chunk-size-negative", "bare-lf", "bare-lf-mixed", "bare-cr", "obs-fold", "nul-value",
    "nul-name"])
def test_smuggling_vectors_get_400_and_close(srv, request_bytes, status, phrase):
    ls, w = srv
    c = Client(ls.port)
    c.send(request_bytes)
    raw = read_to_eof(c.sock)  # one error response, then a clean close: nothing smuggled
    c.close()
    assert _without_date(raw) == _error(status, phrase)
    assert w.alive()


@needs_native
@pytest.mark.parametrize("path", ["/raise", "/bad-status", "/bad-header", "/bad-header-type"])
def test_app_errors_give_500(srv, path):
    ls, w = srv
    raw = raw_exchange(ls.port, ("GET %s HTTP/1.1\r\nHost: t\r\n\r\n" % path).encode())
    assert _without_date(raw) == _error(500, "Internal Server Error")
    wait_until(lambda: "error in the application handling GET %s\nTraceback" % path
               in w.stderr_text(), 5, "traceback log line")
    assert get(ls.port, "/") == (200, b"hello")


@needs_native
def test_raise_after_head_truncates(srv):
    ls, _ = srv
    raw = raw_exchange(ls.port, b"GET /raise-late HTTP/1.1\r\nHost: t\r\n\r\n")
    assert raw.startswith(b"HTTP/1.1 200 OK") and raw.endswith(b"7\r\npartial\r\n")


@needs_native
def test_file_wrapper_and_exc_info(srv):
    ls, _ = srv
    with open(os.path.join(REPO, "tests", "apps", "static.txt"), "rb") as f:
        expected = f.read()
    c = Client(ls.port)
    status, headers, body = c.request("/file")
    assert (status, body, headers["Content-Length"]) == (200, expected, str(len(expected)))
    assert c.request("/exc-info")[::2] == (503, b"sorry")
    c.close()


@needs_native
def test_misbehaving_apps_get_500_and_a_log_line(listeners, spawn):
    w = native_worker(listeners, "misbehaving_app:application")
    try:
        w.wait_ready()
        for path, text in [("/str-body", "response body chunks must be bytes, got str"),
                           ("/no-start-response", "did not call start_response()"),
                           ("/none", "TypeError"),
                           ("/bad-name", "invalid response header name"),
                           ("/lf-in-status", "invalid status line")]:
            raw = raw_exchange(listeners.port, ("GET %s HTTP/1.1\r\nHost: t\r\n\r\n" % path).encode())
            assert raw.startswith(b"HTTP/1.1 500 Internal Server Error\r\n"), (path, raw)
            wait_until(lambda: text in w.stderr_text(), 5, "log line for " + path)
        # Head and first chunk are out when the text chunk comes: the client sees truncation.
        raw = raw_exchange(listeners.port, b"GET /str-chunk HTTP/1.1\r\nHost: t\r\n\r\n")
        assert raw.startswith(b"HTTP/1.1 200 OK\r\n") and raw.endswith(b"2\r\nok\r\n")
        # close() raising after the response is out: logged, the response stands.
        assert get(listeners.port, "/close-raises") == (200, b"closed badly")
        wait_until(lambda: "error in close() of the application's response" in w.stderr_text(),
                   5, "close() log line")
        assert get(listeners.port, "/") == (200, b"hello")
        w.drain()
        assert w.wait_exit() == 0
    finally:
        w.stop()


@needs_native
def test_drain_answers_in_flight_with_close_and_fins_idle(listeners, spawn):
    w = native_worker(listeners).wait_ready()
    try:
        idle = Client(listeners.port)
        assert idle.request("/")[0] == 200
        busy = Client(listeners.port)
        busy.send(b"GET /slow?s=1 HTTP/1.1\r\nHost: t\r\n\r\n")
        wait_until(lambda: [m for m in w.find("WATCHDOG") if m["INFLIGHT"] != "0"], 10,
                   "slow request in flight")
        w.drain()
        status, headers, body = busy.response()
        assert (status, body, headers["Connection"]) == (200, b"slow done", "close")
        assert read_to_eof(idle.sock) == b""  # a FIN (shutdown before close), not a reset
        assert w.wait_exit() == 0
        assert "STOPPING" in w.find("STOPPING")[0]
        last = w.find("WATCHDOG")[-1]
        assert last["REQUESTS"] == "2" and last["INFLIGHT"] == "0"
        idle.close()
        busy.close()
    finally:
        w.stop()


@needs_native
def test_max_requests_sends_retire(listeners, spawn):
    w = native_worker(listeners, overrides={"recycle": {"max_requests": 3}}).wait_ready()
    try:
        for _ in range(3):
            assert get(listeners.port, "/") == (200, b"hello")
        assert wait_until(lambda: w.find("RETIRE"), 5, "RETIRE")[0]["RETIRE"] == "max_requests"
    finally:
        w.stop()


@needs_native
def test_keepalive_timeout_closes_idle_connection(listeners, spawn):
    w = native_worker(listeners, overrides={"timeouts": {"keepalive_ms": 300}}).wait_ready()
    try:
        c = Client(listeners.port)
        assert c.request("/")[0] == 200
        assert read_to_eof(c.sock, timeout=5) == b""
        c.close()
        c = Client(listeners.port)
        c.send(b"GET / HTTP/1.1\r\nHost: t\r\n")  # a head that never ends: 408
        assert _without_date(read_to_eof(c.sock, timeout=5)).startswith(
            b"HTTP/1.1 408 Request Timeout\r\n")
        c.close()
    finally:
        w.stop()


@needs_native
def test_unix_listener_environ(srv):
    ls, _ = srv
    c = Client(unix_path=ls.unix_path)
    env = json.loads(c.request("/env")[2])
    assert (env["REMOTE_ADDR"], env["REMOTE_PORT"], env["SERVER_NAME"], env["SERVER_PORT"]) == (
        "", "", "localhost", "80")
    c.close()


def test_native_unavailable_falls_back_with_one_line(listeners, spawn):
    # The shim imported from the source tree has no extension next to it.
    w = spawn(overrides={"engine": "native"}).wait_ready()
    lines = [ln for ln in w.stderr if "engine native unavailable" in ln]
    assert len(lines) == 1 and "no _molt_native extension in" in lines[0], w.stderr_text()
    assert get(listeners.port, "/") == (200, b"hello")


@needs_native
def test_fuzz_native_worker_survives(listeners, spawn):
    # test_fuzz.py's clients against the native engine (bounded: 6 s).
    from test_fuzz import SEED, fuzz

    w = native_worker(listeners, overrides={"http": dict(HTTP, header_timeout_ms=500)})
    try:
        w.wait_ready()
        exchanges, bad = fuzz(listeners.port, 6.0, SEED + 100)
        assert exchanges > 100 and bad == []
        assert w.alive() and get(listeners.port, "/") == (200, b"hello")
        assert "internal error" not in w.stderr_text()
        w.drain()
        assert w.wait_exit() == 0
    finally:
        w.stop()


@needs_native
def test_graceful_timeout_exits_with_a_request_stuck_in_the_app(listeners, spawn):
    w = native_worker(listeners, overrides={"timeouts": {"graceful_ms": 1000}}).wait_ready()
    try:
        stuck = Client(listeners.port)
        stuck.send(b"GET /slow?s=30 HTTP/1.1\r\nHost: t\r\n\r\n")
        wait_until(lambda: [m for m in w.find("WATCHDOG") if m["INFLIGHT"] != "0"], 10,
                   "request in flight")
        w.drain()
        assert w.wait_exit(10) == 0
        text = w.stderr_text()
        assert "graceful timeout: exiting with 1 connection(s) open" in text
        assert "1 serving thread(s) still busy at exit" in text
        stuck.close()
    finally:
        w.stop()
