"""HTTP/1.1 conformance of the WSGI server, asserted on raw sockets against a real worker."""
import json
import os
import socket
import tempfile
import time

import pytest

from harness import (APPS_DIR, Client, Listeners, Worker, early_answer_to_expect_continue,
                     get, raw_exchange, wait_until)

# Every test runs once per WSGI engine (conftest.WSGI_ENGINES).
pytestmark = [pytest.mark.timeout(30), pytest.mark.usefixtures("engine")]


@pytest.fixture(scope="module")
def srv(engine):
    ls = Listeners(tempfile.mkdtemp(prefix="molt-proto-"))
    w = Worker(ls, "edge_app:application", health_path="/healthz", engine=engine, overrides={
        "http": {"header_timeout_ms": 1500, "max_body_size": 4 * 1024 * 1024,
                 "body_buffer_size": 65536, "version_header": "X-Molt-Version"}})
    w.wait_ready()
    yield ls, w
    w.drain()
    assert w.wait_exit() == 0
    w.stop()
    ls.close()


def test_keep_alive_reuses_connection(srv):
    ls, _ = srv
    c = Client(ls.port)
    s1, h1, b1 = c.request("/")
    s2, h2, b2 = c.request("/env")
    assert (s1, b1) == (200, b"hello")
    assert s2 == 200
    assert h1["Connection"] is None and h1["Content-Length"] == "5"
    assert h1["X-Molt-Version"] == "v1"
    assert json.loads(b2)["REMOTE_PORT"] == str(c.sock.getsockname()[1])
    c.close()


def test_pipelining_three_requests_in_one_send(srv):
    ls, _ = srv
    c = Client(ls.port)
    reqs = b"".join(b"POST /echo HTTP/1.1\r\nHost: t\r\nContent-Length: 1\r\n\r\n" + x
                    for x in (b"a", b"b", b"c"))
    c.send(reqs)
    bodies = [c.response()[2] for _ in range(3)]
    assert bodies == [b"a", b"b", b"c"]
    assert c.request("/")[0] == 200
    c.close()


def test_chunked_request_body(srv):
    ls, _ = srv
    c = Client(ls.port)
    c.send(b"POST /echo HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n"
           b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n")
    status, _, body = c.response()
    assert (status, body) == (200, b"hello world")
    c.close()


def test_large_body_spooled_to_disk(srv):
    ls, _ = srv
    body = os.urandom(300 * 1024)  # > body_buffer_size (64 KiB)
    c = Client(ls.port)
    status, _, echoed = c.request("/echo", method="POST", body=body)
    assert status == 200 and echoed == body
    c.close()


def test_chunked_response_exact_bytes(srv):
    ls, _ = srv
    raw = raw_exchange(ls.port, b"GET /stream HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
    head, _, body = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 OK\r\n")
    assert b"Transfer-Encoding: chunked" in head and b"Connection: close" in head
    assert body == b"4\r\none,\r\n4\r\ntwo,\r\n5\r\nthree\r\n0\r\n\r\n"
    assert get(ls.port, "/closed")[1] != b"0"  # close() was called on the iterable


def test_write_callable_then_iterable(srv):
    ls, _ = srv
    assert get(ls.port, "/write") == (200, b"via-write,via-iter")


def test_expect_100_continue(srv):
    ls, _ = srv
    c = Client(ls.port)
    c.send(b"POST /echo HTTP/1.1\r\nHost: t\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n")
    interim = c.reader.read(len(b"HTTP/1.1 100 Continue\r\n\r\n"))
    assert interim == b"HTTP/1.1 100 Continue\r\n\r\n"
    c.send(b"hello")
    assert c.response()[2] == b"hello"
    c.close()


def test_head_has_no_body_and_connection_survives(srv):
    ls, _ = srv
    c = Client(ls.port)
    c.send(b"HEAD / HTTP/1.1\r\nHost: t\r\n\r\nGET / HTTP/1.1\r\nHost: t\r\n\r\n")
    status, headers, body = c.response("HEAD")
    assert status == 200 and body == b"" and headers["Content-Length"] == "5"
    assert c.response()[2] == b"hello"  # no stray body bytes ahead of this response
    c.close()


@pytest.mark.parametrize("path,status", [("/204", 204), ("/304", 304)])
def test_no_body_statuses(srv, path, status):
    ls, _ = srv
    c = Client(ls.port)
    c.send(("GET %s HTTP/1.1\r\nHost: t\r\n\r\nGET / HTTP/1.1\r\nHost: t\r\n\r\n" % path).encode())
    got, headers, body = c.response()
    assert got == status and body == b""
    assert headers["Transfer-Encoding"] is None and headers["Content-Length"] is None
    assert c.response()[2] == b"hello"
    c.close()


def test_http10_closes_by_default(srv):
    ls, _ = srv
    raw = raw_exchange(ls.port, b"GET / HTTP/1.0\r\n\r\n")
    assert raw.startswith(b"HTTP/1.1 200 OK\r\n") and b"Connection: close" in raw
    assert raw.endswith(b"hello")


def test_http10_keep_alive(srv):
    ls, _ = srv
    c = Client(ls.port)
    c.send(b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
    status, headers, body = c.response()
    assert headers["Connection"] == "keep-alive" and body == b"hello"
    c.close()


def _error_case(port, request):
    raw = raw_exchange(port, request)
    return raw.split(b"\r\n", 1)[0], raw


@pytest.mark.parametrize("request_bytes,status_line", [
    (b"GARBAGE\r\n\r\n", b"HTTP/1.1 400 Bad Request"),
    (b"GET / HTTP/1.1\r\nHost t\r\n\r\n", b"HTTP/1.1 400 Bad Request"),
    (b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\nHost: t\r\n\r\n", b"HTTP/1.1 414 URI Too Long"),
    (b"GET / HTTP/1.1\r\nHost: t\r\n" + b"".join(b"X-H%d: v\r\n" % i for i in range(150)) + b"\r\n",
     b"HTTP/1.1 431 Request Header Fields Too Large"),
    (b"GET / HTTP/1.1\r\nHost: t\r\n" + b"".join(b"X-Big%d: %s\r\n" % (i, b"v" * 8000) for i in range(10))
     + b"\r\n", b"HTTP/1.1 431 Request Header Fields Too Large"),
    (b"POST /echo HTTP/1.1\r\nHost: t\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n"
     b"0\r\n\r\n", b"HTTP/1.1 400 Bad Request"),
    (b"POST /echo HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: gzip\r\n\r\n", b"HTTP/1.1 501 Not Implemented"),
    (b"POST /echo HTTP/1.1\r\nHost: t\r\nContent-Length: 99999999\r\n\r\n",
     b"HTTP/1.1 413 Payload Too Large"),
], ids=["garbage", "bad-header", "414", "431-count", "431-size", "cl+te", "te-gzip", "413"])
def test_bad_input_answers_and_closes(srv, request_bytes, status_line):
    ls, w = srv
    line, raw = _error_case(ls.port, request_bytes)
    assert line == status_line, raw[:300]
    assert b"Connection: close" in raw
    assert get(ls.port, "/") == (200, b"hello")
    assert w.alive()


def test_lying_content_length_then_eof(srv):
    ls, w = srv
    c = Client(ls.port)
    c.send(b"POST /echo HTTP/1.1\r\nHost: t\r\nContent-Length: 100\r\n\r\nonly ten!!")
    c.sock.shutdown(socket.SHUT_WR)
    assert c.read_all() == b""  # the app never ran: nothing to answer
    c.close()
    wait_until(lambda: "incomplete request body" in w.stderr_text(), 5, "log line")
    assert get(ls.port, "/") == (200, b"hello")


def test_slowloris_gets_408(srv):
    ls, w = srv
    c = Client(ls.port)
    t0 = time.monotonic()
    c.send(b"GET / HTTP/1.1\r\nHost: t\r\n")  # never finished
    raw = c.read_all(timeout=10)
    elapsed = time.monotonic() - t0
    assert raw.startswith(b"HTTP/1.1 408 Request Timeout"), raw
    assert 1.0 < elapsed < 5.0
    c.close()
    assert get(ls.port, "/") == (200, b"hello")


def test_client_disconnect_mid_response(srv):
    ls, w = srv
    c = Client(ls.port)
    c.send(b"GET /big?n=67108864 HTTP/1.1\r\nHost: t\r\n\r\n")
    assert c.sock.recv(1024).startswith(b"HTTP/1.1 200")
    c.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    c.close()  # RST while the worker is still writing
    wait_until(lambda: "client disconnected during the response" in w.stderr_text(), 10, "log line")
    assert get(ls.port, "/") == (200, b"hello")


@pytest.mark.parametrize("path", ["/raise", "/bad-status", "/bad-header", "/bad-header-type"])
def test_app_errors_give_500(srv, path):
    ls, w = srv
    raw = raw_exchange(ls.port, ("GET %s HTTP/1.1\r\nHost: t\r\n\r\n" % path).encode())
    assert raw.startswith(b"HTTP/1.1 500 Internal Server Error\r\n"), raw[:200]
    assert b"Injected" not in raw
    wait_until(lambda: ("handling GET %s" % path) in w.stderr_text(), 5, "traceback log line")
    assert get(ls.port, "/") == (200, b"hello")


def test_app_raising_after_headers_closes_connection(srv):
    ls, w = srv
    raw = raw_exchange(ls.port, b"GET /raise-late HTTP/1.1\r\nHost: t\r\n\r\n")
    assert raw.startswith(b"HTTP/1.1 200 OK") and b"partial" in raw
    assert not raw.endswith(b"0\r\n\r\n")  # no clean terminator: the client sees truncation
    assert get(ls.port, "/") == (200, b"hello")


def test_exc_info_replaces_status_before_headers_sent(srv):
    ls, _ = srv
    assert get(ls.port, "/exc-info") == (503, b"sorry")


def test_short_content_length_closes(srv):
    ls, w = srv
    raw = raw_exchange(ls.port, b"GET /short-cl HTTP/1.1\r\nHost: t\r\n\r\n")
    assert raw.startswith(b"HTTP/1.1 200") and raw.endswith(b"12345")


def test_file_wrapper_sendfile(srv):
    ls, _ = srv
    with open(os.path.join(APPS_DIR, "static.txt"), "rb") as f:
        expected = f.read()
    c = Client(ls.port)
    status, headers, body = c.request("/file")
    assert status == 200 and body == expected
    assert headers["Content-Length"] == str(len(expected))
    assert c.request("/")[2] == b"hello"
    c.close()


def test_environ_tcp(srv):
    ls, _ = srv
    c = Client(ls.port)
    _, _, body = c.request("/env?a=1&b=%20", headers="X-Dup: 1\r\nX-Dup: 2\r\nX_Under: spoof\r\n"
                           "Content-Type: text/x\r\n", method="POST", body=b"xyz")
    env = json.loads(body)
    assert env["REQUEST_METHOD"] == "POST" and env["PATH_INFO"] == "/env"
    assert env["QUERY_STRING"] == "a=1&b=%20"
    assert env["SERVER_NAME"] == "127.0.0.1" and env["SERVER_PORT"] == str(ls.port)
    assert env["REMOTE_ADDR"] == "127.0.0.1"
    assert env["CONTENT_TYPE"] == "text/x" and env["CONTENT_LENGTH"] == "3"
    assert env["headers"]["HTTP_X_DUP"] == "1,2"
    assert "HTTP_X_UNDER" not in env["headers"]  # underscore headers are dropped
    assert env["wsgi.multithread"] is True and env["SERVER_PROTOCOL"] == "HTTP/1.1"
    assert env["NOTIFY_SOCKET"] is None and env["LISTEN_FDS"] is None
    assert env["sys_path_0"] == APPS_DIR and env["cwd"] == APPS_DIR
    c.close()


def test_percent_decoding_of_path(srv):
    ls, _ = srv
    env = json.loads(get(ls.port, "/%65nv")[1])
    assert env["PATH_INFO"] == "/env"


def test_environ_unix_socket(srv):
    ls, _ = srv
    c = Client(unix_path=ls.unix_path)
    status, _, body = c.request("/env")
    env = json.loads(body)
    assert status == 200
    assert env["REMOTE_ADDR"] == "" and env["REMOTE_PORT"] == ""
    assert env["SERVER_NAME"] == "localhost" and env["SERVER_PORT"] == "80"
    c.close()


@pytest.mark.timeout(30)
def test_script_name(listeners, spawn):
    w = spawn(env={"SCRIPT_NAME": "/prefix/"}).wait_ready()
    env = json.loads(get(listeners.port, "/prefix/env")[1])
    assert env["SCRIPT_NAME"] == "/prefix" and env["PATH_INFO"] == "/env"
    w.drain()
    assert w.wait_exit() == 0


def test_app_connection_close_honoured(srv):
    ls, _ = srv
    raw = raw_exchange(ls.port, b"GET /conn-close HTTP/1.1\r\nHost: t\r\n\r\n")
    assert raw.count(b"Connection: close") == 1 and raw.endswith(b"bye")


def test_wsgi_errors_lines_reach_the_worker_log(srv, engine):
    ls, w = srv
    assert get(ls.port, "/errors") == (200, b"logged")
    want = ["errors-line-1", "errors-line-2", "errors-line-3"]
    if engine == "native":  # a log line per flush; the Python engine's is sys.stderr itself
        want.append("errors-partial")

    def logged():
        text = w.stderr_text()
        return all(line in text for line in want)

    wait_until(logged, 10, "the wsgi.errors lines in the worker's stderr")
    lines = [ln for ln in w.stderr if "errors-" in ln]
    assert [next(x for x in want if x in ln) for ln in lines[:len(want)]] == want


# -- found by reviews of both engines: each failed before its fix --------------------------------

def test_an_upgrade_is_answered_with_connection_close(srv):
    # WSGI cannot take the connection over: the engine answers, then closes. The native
    # engine's answer did not say so (a flag meant for it was never set), so a client sent
    # its next request into the close.
    ls, _ = srv
    raw = raw_exchange(ls.port, b"GET / HTTP/1.1\r\nHost: t\r\nConnection: Upgrade, "
                       b"HTTP2-Settings\r\nUpgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQCAAAAAAIAAAAA"
                       b"\r\n\r\n")
    head, _, body = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 OK\r\n") and body == b"hello", raw
    assert b"\r\nConnection: close" in head, raw


def test_write_then_a_file_wrapper_is_one_response(srv):
    # The file went out by sendfile() behind a second head, inside the chunked body the
    # write() had begun.
    ls, _ = srv
    with open(os.path.join(APPS_DIR, "static.txt"), "rb") as f:
        expected = f.read()
    c = Client(ls.port)
    status, headers, body = c.request("/write-then-file")
    assert (status, body) == (200, b"via-write," + expected)
    status, _, body = c.request("/")  # the connection is framed right: it serves on
    assert (status, body) == (200, b"hello")
    c.close()


def test_a_content_length_that_is_not_digits_is_the_apps_error(srv):
    # int() took "-1", which meant no limit at all: the header went out as it was and the
    # body unframed, on a kept-alive connection.
    ls, _ = srv
    raw = raw_exchange(ls.port, b"GET /negative-length HTTP/1.1\r\nHost: t\r\n\r\n")
    assert raw.startswith(b"HTTP/1.1 500 Internal Server Error\r\n"), raw[:200]
    assert b"Content-Length: -1" not in raw


def test_an_informational_status_from_the_app_is_its_error(srv):
    # A 1xx is never the final response: the client would wait on.
    ls, _ = srv
    raw = raw_exchange(ls.port, b"GET /early-hints-only HTTP/1.1\r\nHost: t\r\n\r\n")
    assert raw.startswith(b"HTTP/1.1 500 Internal Server Error\r\n"), raw[:200]


def test_a_head_request_gets_its_500_without_a_body(srv):
    ls, _ = srv
    raw = raw_exchange(ls.port, b"HEAD /raise HTTP/1.1\r\nHost: t\r\n\r\n")
    head, _, body = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 500 Internal Server Error\r\n"), raw
    assert body == b""


def test_http10_expect_100_continue_is_ignored(srv):
    # RFC 9110 §10.1.1: a 1.0 client may take the 100 for its final response.
    ls, _ = srv
    early, raw = early_answer_to_expect_continue(ls.port, "/echo")
    assert early == b""  # nothing until the body is in
    assert raw.startswith(b"HTTP/1.1 200 OK\r\n") and raw.endswith(b"hello"), raw


def test_empty_lines_do_not_keep_an_idle_connection(spawn, listeners):
    # RFC 9112 §2.2 lets a client send empty lines before a request, and the parsers skip
    # them; each read restarted the keep-alive time, and the sweep's "a request is waiting"
    # look took them for one, so such a client held the connection, and a drain, for ever.
    w = spawn("edge_app:application", overrides={"timeouts": {"keepalive_ms": 1000,
                                                              "graceful_ms": 8000}})
    w.wait_ready()
    c = Client(listeners.port)
    assert c.request("/")[0] == 200
    started = time.monotonic()
    closed_after = None
    while time.monotonic() - started < 5:
        try:
            c.sock.sendall(b"\r\n")
            c.sock.settimeout(0.3)
            if c.sock.recv(10) == b"":
                closed_after = time.monotonic() - started
                break
        except socket.timeout:
            continue
        except OSError:
            closed_after = time.monotonic() - started
            break
    c.close()
    assert closed_after is not None and closed_after < 2.5, closed_after


def test_a_slow_upload_is_not_counted_as_the_apps_time(srv):
    # The in-flight age (what timeouts.request and the heartbeat's oldest read) ran from the
    # end of the head, so a body sent over seconds, each byte inside header_timeout, made a
    # worker whose app had just started look stuck, and the master would abort it with every
    # request on it.
    ls, w = srv
    s = socket.create_connection(("127.0.0.1", ls.port))
    try:
        s.sendall(b"POST /read-then-sleep?s=1.5 HTTP/1.1\r\nHost: t\r\nContent-Length: 6\r\n\r\n")
        for _ in range(6):  # 3 s of upload, each byte within the 1.5 s header timeout
            time.sleep(0.5)
            s.sendall(b"x")
        app_started = time.monotonic()
        seen = len(w.messages)
        # A heartbeat taken while the app runs (it sleeps 1.5 s once the body is in).
        beat = wait_until(lambda: [m for m in w.messages[seen:] if m.get("INFLIGHT") == "1"],
                          5, "a heartbeat with the request in flight")[-1]
        oldest = int(beat["OLDEST_MS"])
        # The upload alone took 3 s: an age that includes it is far above this.
        assert oldest <= (time.monotonic() - app_started) * 1000 + 700, oldest
        s.settimeout(5)
        assert s.recv(100).startswith(b"HTTP/1.1 200 OK\r\n")
    finally:
        s.close()
