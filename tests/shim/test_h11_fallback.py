"""The h11 fallback parser (used when httptools is missing) behind the same server."""
import json

import pytest

from harness import Client, get, raw_exchange, wait_until

pytestmark = pytest.mark.timeout(30)


@pytest.fixture
def h11_worker(listeners, spawn):
    w = spawn(env={"MOLT_SHIM_PARSER": "h11"}, health_path="/healthz").wait_ready()
    wait_until(lambda: "parser h11" in w.stderr_text(), 5, "ready line naming h11")
    return w


def test_h11_keepalive_pipelining_chunked(listeners, h11_worker):
    c = Client(listeners.port)
    assert c.request("/")[2] == b"hello"
    c.send(b"POST /echo HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n"
           b"GET / HTTP/1.1\r\nHost: t\r\n\r\n"
           b"POST /echo HTTP/1.1\r\nHost: t\r\nContent-Length: 2\r\n\r\nxy")
    assert [c.response()[2] for _ in range(3)] == [b"abc", b"hello", b"xy"]
    c.send(b"POST /echo HTTP/1.1\r\nHost: t\r\nContent-Length: 2\r\nExpect: 100-continue\r\n\r\n")
    assert c.reader.read(25) == b"HTTP/1.1 100 Continue\r\n\r\n"
    c.send(b"ok")
    assert c.response()[2] == b"ok"
    c.close()


def test_h11_environ(listeners, h11_worker):
    env = json.loads(get(listeners.port, "/env?q=1")[1])
    assert env["PATH_INFO"] == "/env" and env["QUERY_STRING"] == "q=1"
    assert env["headers"]["HTTP_CONNECTION"] == "close"


@pytest.mark.parametrize("request_bytes,status", [
    (b"GARBAGE\r\n\r\n", b"400"),
    (b"POST / HTTP/1.1\r\nHost: t\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n", b"400"),
    (b"GET / HTTP/1.1\r\nHost: t\r\n" + b"".join(b"X-H%d: v\r\n" % i for i in range(150)) + b"\r\n",
     b"431"),
], ids=["garbage", "cl+te", "too-many-headers"])
def test_h11_bad_input(listeners, h11_worker, request_bytes, status):
    raw = raw_exchange(listeners.port, request_bytes)
    assert raw.startswith(b"HTTP/1.1 " + status), raw[:100]
    assert get(listeners.port, "/") == (200, b"hello")
