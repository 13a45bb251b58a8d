"""Plain WSGI app with one route per edge case the shim must handle."""
import json
import os
import sys
import threading
import time

CLOSED = {"count": 0}
_lock = threading.Lock()
ENV_KEYS = ("REQUEST_METHOD", "SCRIPT_NAME", "PATH_INFO", "QUERY_STRING", "SERVER_NAME",
            "SERVER_PORT", "SERVER_PROTOCOL", "REMOTE_ADDR", "REMOTE_PORT", "CONTENT_TYPE",
            "CONTENT_LENGTH", "wsgi.multithread", "wsgi.multiprocess", "wsgi.url_scheme")


class Closing:
    """A response iterable that records close() calls."""

    def __init__(self, chunks):
        self.chunks = chunks

    def __iter__(self):
        return iter(self.chunks)

    def close(self):
        with _lock:
            CLOSED["count"] += 1


def _q(environ):
    out = {}
    for part in environ.get("QUERY_STRING", "").split("&"):
        k, _, v = part.partition("=")
        if k:
            out[k] = v
    return out


def application(environ, start_response):
    path = environ["PATH_INFO"]
    q = _q(environ)
    if path in ("/", "/healthz"):
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [b"hello"]
    if path == "/echo":
        body = environ["wsgi.input"].read()
        start_response("200 OK", [("Content-Type", "application/octet-stream")])
        return [body]
    if path == "/echo-lines":
        lines = list(environ["wsgi.input"])
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [b"%d" % len(lines)]
    if path == "/env":
        data = {k: environ.get(k) for k in ENV_KEYS}
        data["headers"] = {k: v for k, v in environ.items() if k.startswith("HTTP_")}
        data["NOTIFY_SOCKET"] = os.environ.get("NOTIFY_SOCKET")
        data["LISTEN_FDS"] = os.environ.get("LISTEN_FDS")
        data["MOLT_TLS_TICKET_KEYS"] = os.environ.get("MOLT_TLS_TICKET_KEYS")
        data["sys_path_0"] = sys.path[0]
        data["cwd"] = os.getcwd()
        start_response("200 OK", [("Content-Type", "application/json")])
        return [json.dumps(data).encode()]
    if path == "/stream":
        start_response("200 OK", [("Content-Type", "text/plain")])
        return Closing([b"one,", b"", b"two,", b"three"])
    if path == "/write":
        write = start_response("200 OK", [("Content-Type", "text/plain")])
        write(b"via-write,")
        return [b"via-iter"]
    if path == "/write-then-file":
        # PEP 3333 allows write() calls before the iterable, a file wrapper included.
        write = start_response("200 OK", [("Content-Type", "text/plain")])
        write(b"via-write,")
        f = open(os.path.join(os.path.dirname(__file__), "static.txt"), "rb")
        return environ["wsgi.file_wrapper"](f, 4096)
    if path == "/negative-length":
        start_response("200 OK", [("Content-Length", "-1")])
        return [b"abc", b"def"]
    if path == "/early-hints-only":
        start_response("103 Early Hints", [])
        return [b"x"]
    if path == "/file":
        f = open(os.path.join(os.path.dirname(__file__), "static.txt"), "rb")
        start_response("200 OK", [("Content-Type", "text/plain")])
        return environ["wsgi.file_wrapper"](f, 4096)
    if path == "/errors":  # wsgi.errors: a line, two lines at once, a partial line + flush
        errors = environ["wsgi.errors"]
        errors.write("errors-line-1\n")
        errors.writelines(["errors-line-2\nerrors-", "line-3\n"])
        errors.write("errors-partial")
        errors.flush()
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [b"logged"]
    if path == "/raise":
        raise RuntimeError("boom from the app")
    if path == "/raise-late":
        def gen():
            yield b"partial"
            raise RuntimeError("late boom")
        start_response("200 OK", [("Content-Type", "text/plain")])
        return gen()
    if path == "/bad-status":
        start_response("OK", [("Content-Type", "text/plain")])
        return [b"x"]
    if path == "/bad-header":
        start_response("200 OK", [("X-Bad", "a\r\nInjected: yes")])
        return [b"x"]
    if path == "/bad-header-type":
        start_response("200 OK", [("X-Bad", 5)])
        return [b"x"]
    if path == "/exc-info":
        start_response("200 OK", [("Content-Type", "text/plain")])
        try:
            raise ValueError("changed my mind")
        except ValueError:
            start_response("503 Service Unavailable", [("Content-Type", "text/plain")], sys.exc_info())
        return [b"sorry"]
    if path == "/pid":
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [str(os.getpid()).encode()]
    if path == "/read-then-sleep":
        body = environ["wsgi.input"].read()
        time.sleep(float(q.get("s", "1")))
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [b"%d" % len(body)]
    if path == "/slow":
        time.sleep(float(q.get("s", "1")))
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [b"slow done"]
    if path == "/big":
        n = int(q.get("n", "1000000"))
        start_response("200 OK", [("Content-Type", "application/octet-stream")])
        return Closing([b"x" * 65536 for _ in range(n // 65536)])
    if path == "/closed":
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [str(CLOSED["count"]).encode()]
    if path == "/204":
        start_response("204 No Content", [])
        return [b"must not be sent"]
    if path == "/304":
        start_response("304 Not Modified", [("ETag", '"x"')])
        return []
    if path == "/short-cl":
        start_response("200 OK", [("Content-Length", "10")])
        return [b"12345"]
    if path == "/conn-close":
        start_response("200 OK", [("Connection", "close"), ("Content-Type", "text/plain")])
        return [b"bye"]
    start_response("404 Not Found", [("Content-Type", "text/plain")])
    return [b"not found"]
