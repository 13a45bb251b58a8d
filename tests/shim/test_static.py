"""`static:` served by the engine itself: one table of requests and exact answers, run against
every WSGI engine (conftest.WSGI_ENGINES), so the Python and the native engine cannot drift.

The rules are molt_shim/static.py's (and native/static_files.cpp's): 404 for anything outside
the directory, directories and non-files; 405 for methods other than GET/HEAD.
"""
import os
import random
import tempfile

import pytest

from harness import Client, Listeners, Worker, wait_until

pytestmark = [pytest.mark.timeout(60), pytest.mark.usefixtures("engine")]

MTIME = 1_700_000_000  # Tue, 14 Nov 2023 22:13:20 GMT
LAST_MODIFIED = "Tue, 14 Nov 2023 22:13:20 GMT"
HELLO = b"hello static\n"
BIG = random.Random(7).randbytes(300 * 1024)
JS, JS_GZ, JS_BR = b"console.log(1)\n" * 20, b"GZ-BYTES", b"BR-BYTES!"
CSS, CSS_GZ = b"body{}\n", b"CSS-GZ"


def etag(data, tag=""):
    return '"%x-%x%s"' % (MTIME, len(data), "-" + tag if tag else "")


def make_tree(base):
    root = os.path.join(base, "root")
    files = {
        "hello.txt": HELLO, "big.bin": BIG, "empty.txt": b"", "app.js": JS, "app.js.gz": JS_GZ,
        "app.js.br": JS_BR, "style.css": CSS, "style.css.gz": CSS_GZ, "sub/page.html": b"<p>",
        "sp ace.txt": b"space", "noext": b"x", "img.PNG": b"png",
    }
    for name, data in files.items():
        path = os.path.join(root, name)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as f:
            f.write(data)
        os.utime(path, (MTIME, MTIME))
    os.makedirs(os.path.join(root, "adir"))
    os.makedirs(os.path.join(base, "outside"))
    with open(os.path.join(base, "outside", "secret.txt"), "wb") as f:
        f.write(b"secret")
    os.symlink("hello.txt", os.path.join(root, "link_in"))
    os.symlink(os.path.join(base, "outside", "secret.txt"), os.path.join(root, "link_out"))
    os.symlink(os.path.join(base, "outside"), os.path.join(root, "dir_out"))
    os.symlink("/etc", os.path.join(root, "etc_link"))
    # A whole-second time plus 0.999999999 s: the ETag and Last-Modified keep the second.
    late = os.path.join(root, "late.txt")
    with open(late, "wb") as f:
        f.write(HELLO)
    os.utime(late, ns=(MTIME * 10**9 + 999_999_999,) * 2)
    # A chain of symlinks longer than the kernel follows (and deeper than Python's stack).
    for i in range(1100):
        os.symlink("chain%d" % (i + 1) if i < 1099 else "hello.txt",
                   os.path.join(root, "chain%d" % i))
    return root


@pytest.fixture(scope="module")
def srv(engine):
    base = tempfile.mkdtemp(prefix="molt-static-")
    make_tree(base)
    ls = Listeners(base)
    # `root` relative to chdir (the release directory), and a longer, absolute prefix inside
    # it that maps somewhere else.
    w = Worker(ls, "edge_app:application", engine=engine, health_path="/healthz", overrides={
        "static": [{"prefix": "/static/", "dir": "root"},
                   {"prefix": "/static/sub/", "dir": os.path.join(base, "outside")}],
        "http": {"version_header": "X-Molt-Version"},
        "logging": {"access_log": True, "level": "info"},
    }, chdir=base, pythonpath=[os.path.join(os.path.dirname(__file__), "..", "apps")])
    w.wait_ready()
    # The engine under test serves (no silent fallback to the Python engine).
    wait_until(lambda: "(engine %s:" % engine in w.stderr_text(), timeout=10, what="ready line")
    yield ls, w
    w.stop()
    ls.close()


def exchange(ls, method, path, headers=()):
    c = Client(ls.port)
    try:
        head = "".join("%s: %s\r\n" % h for h in headers)
        c.send(("%s %s HTTP/1.1\r\nHost: t\r\n%s\r\n" % (method, path, head)).encode("latin-1"))
        return c.response(method)
    finally:
        c.close()


ABSENT = object()
TEXT = "text/plain; charset=utf-8"
# (id, method, path, request headers, status, expected headers (ABSENT: must be missing), body)
CASES = [
    ("plain", "GET", "/static/hello.txt", [], 200,
     {"Content-Type": TEXT, "Content-Length": "13", "ETag": etag(HELLO),
      "Last-Modified": LAST_MODIFIED, "Accept-Ranges": "bytes", "Vary": ABSENT,
      "Content-Encoding": ABSENT, "X-Molt-Version": "v1"}, HELLO),
    ("head", "HEAD", "/static/hello.txt", [], 200,
     {"Content-Length": "13", "ETag": etag(HELLO)}, b""),
    ("query ignored", "GET", "/static/hello.txt?v=3", [], 200, {}, HELLO),
    ("percent-encoded name", "GET", "/static/sp%20ace.txt", [], 200, {}, b"space"),
    ("longest prefix wins", "GET", "/static/sub/secret.txt", [], 200, {"Content-Type": TEXT},
     b"secret"),
    ("longest prefix only", "GET", "/static/sub/page.html", [], 404, {}, b"404 Not Found\n"),
    ("html", "GET", "/static/adir/../sub/page.html", [], 404, {}, b"404 Not Found\n"),
    ("symlink inside", "GET", "/static/link_in", [], 200, {"ETag": etag(HELLO)}, HELLO),
    ("no extension", "GET", "/static/noext", [], 200,
     {"Content-Type": "application/octet-stream"}, b"x"),
    ("extension case", "GET", "/static/img.PNG", [], 200, {"Content-Type": "image/png"}, b"png"),
    ("big file", "GET", "/static/big.bin", [], 200, {"Content-Length": str(len(BIG))}, BIG),
    ("empty file", "GET", "/static/empty.txt", [], 200, {"Content-Length": "0"}, b""),
    # conditional requests
    ("if-none-match", "GET", "/static/hello.txt", [("If-None-Match", etag(HELLO))], 304,
     {"ETag": etag(HELLO), "Last-Modified": LAST_MODIFIED, "Content-Length": ABSENT}, b""),
    ("if-none-match weak", "GET", "/static/hello.txt", [("If-None-Match", "W/" + etag(HELLO))],
     304, {}, b""),
    ("if-none-match list", "GET", "/static/hello.txt",
     [("If-None-Match", '"other", %s' % etag(HELLO))], 304, {}, b""),
    ("if-none-match star", "HEAD", "/static/hello.txt", [("If-None-Match", "*")], 304, {}, b""),
    ("if-none-match other", "GET", "/static/hello.txt", [("If-None-Match", '"nope"')], 200, {},
     HELLO),
    ("if-none-match wins", "GET", "/static/hello.txt",
     [("If-None-Match", '"nope"'), ("If-Modified-Since", LAST_MODIFIED)], 200, {}, HELLO),
    ("if-modified-since same", "GET", "/static/hello.txt",
     [("If-Modified-Since", LAST_MODIFIED)], 304, {"ETag": etag(HELLO)}, b""),
    ("if-modified-since later", "GET", "/static/hello.txt",
     [("If-Modified-Since", "Wed, 15 Nov 2023 00:00:00 GMT")], 304, {}, b""),
    ("if-modified-since earlier", "GET", "/static/hello.txt",
     [("If-Modified-Since", "Tue, 14 Nov 2023 22:13:19 GMT")], 200, {}, HELLO),
    ("if-modified-since garbage", "GET", "/static/hello.txt",
     [("If-Modified-Since", "yesterday")], 200, {}, HELLO),
    # ranges
    ("range first", "GET", "/static/hello.txt", [("Range", "bytes=0-4")], 206,
     {"Content-Range": "bytes 0-4/13", "Content-Length": "5"}, b"hello"),
    ("range open", "GET", "/static/hello.txt", [("Range", "bytes=6-")], 206,
     {"Content-Range": "bytes 6-12/13"}, b"static\n"),
    ("range suffix", "GET", "/static/hello.txt", [("Range", "bytes=-7")], 206,
     {"Content-Range": "bytes 6-12/13"}, b"static\n"),
    ("range past end clipped", "GET", "/static/hello.txt", [("Range", "bytes=10-99")], 206,
     {"Content-Range": "bytes 10-12/13"}, b"ic\n"),
    ("range big middle", "GET", "/static/big.bin", [("Range", "bytes=100000-200000")], 206,
     {"Content-Range": "bytes 100000-200000/%d" % len(BIG)}, BIG[100000:200001]),
    ("range head", "HEAD", "/static/hello.txt", [("Range", "bytes=0-4")], 206,
     {"Content-Length": "5", "Content-Range": "bytes 0-4/13"}, b""),
    ("range unsatisfiable", "GET", "/static/hello.txt", [("Range", "bytes=13-")], 416,
     {"Content-Range": "bytes */13"}, b"416 Range Not Satisfiable\n"),
    ("range empty file", "GET", "/static/empty.txt", [("Range", "bytes=0-")], 416,
     {"Content-Range": "bytes */0"}, b"416 Range Not Satisfiable\n"),
    ("range zero suffix", "GET", "/static/hello.txt", [("Range", "bytes=-0")], 416, {},
     b"416 Range Not Satisfiable\n"),
    ("range several ignored", "GET", "/static/hello.txt", [("Range", "bytes=0-1,3-4")], 200,
     {"Content-Range": ABSENT}, HELLO),
    ("range malformed ignored", "GET", "/static/hello.txt", [("Range", "bytes=abc")], 200, {},
     HELLO),
    ("range reversed ignored", "GET", "/static/hello.txt", [("Range", "bytes=5-2")], 200, {},
     HELLO),
    ("range other unit ignored", "GET", "/static/hello.txt", [("Range", "items=0-1")], 200, {},
     HELLO),
    ("if-range etag", "GET", "/static/hello.txt",
     [("Range", "bytes=0-4"), ("If-Range", etag(HELLO))], 206, {}, b"hello"),
    ("if-range date", "GET", "/static/hello.txt",
     [("Range", "bytes=0-4"), ("If-Range", LAST_MODIFIED)], 206, {}, b"hello"),
    ("if-range stale", "GET", "/static/hello.txt",
     [("Range", "bytes=0-4"), ("If-Range", '"old"')], 200, {}, HELLO),
    # precompressed siblings
    ("br preferred", "GET", "/static/app.js", [("Accept-Encoding", "gzip, deflate, br")], 200,
     {"Content-Encoding": "br", "Vary": "Accept-Encoding", "ETag": etag(JS_BR, "br"),
      "Content-Type": "text/javascript; charset=utf-8"}, JS_BR),
    ("gzip", "GET", "/static/app.js", [("Accept-Encoding", "gzip")], 200,
     {"Content-Encoding": "gzip", "Vary": "Accept-Encoding", "ETag": etag(JS_GZ, "gz")}, JS_GZ),
    ("br refused by q=0", "GET", "/static/app.js", [("Accept-Encoding", "br;q=0, gzip;q=0.5")],
     200, {"Content-Encoding": "gzip"}, JS_GZ),
    ("star", "GET", "/static/app.js", [("Accept-Encoding", "*")], 200,
     {"Content-Encoding": "br"}, JS_BR),
    ("identity", "GET", "/static/app.js", [("Accept-Encoding", "identity")], 200,
     {"Content-Encoding": ABSENT, "Vary": "Accept-Encoding", "ETag": etag(JS)}, JS),
    ("no accept-encoding", "GET", "/static/app.js", [], 200,
     {"Content-Encoding": ABSENT, "Vary": "Accept-Encoding"}, JS),
    ("only gz sibling", "GET", "/static/style.css", [("Accept-Encoding", "br")], 200,
     {"Content-Encoding": ABSENT, "Vary": "Accept-Encoding", "Content-Type": "text/css; "
      "charset=utf-8"}, CSS),
    ("gzip range", "GET", "/static/app.js", [("Accept-Encoding", "gzip"), ("Range", "bytes=0-1")],
     206, {"Content-Encoding": "gzip", "Content-Range": "bytes 0-1/%d" % len(JS_GZ)}, b"GZ"),
    ("gzip conditional", "GET", "/static/app.js",
     [("Accept-Encoding", "gzip"), ("If-None-Match", etag(JS_GZ, "gz"))], 304,
     {"Vary": "Accept-Encoding", "ETag": etag(JS_GZ, "gz")}, b""),
    # found by a review: the engines differed on these
    ("range with a no-break space", "GET", "/static/hello.txt", [("Range", "bytes=0-4\xa0")],
     200, {}, HELLO),  # whitespace is SP and HTAB only (RFC 9110 §5.6.3)
    ("if-none-match with a no-break space", "GET", "/static/hello.txt",
     [("If-None-Match", etag(HELLO) + "\xa0")], 200, {}, HELLO),
    ("mtime just under the next second", "GET", "/static/late.txt", [], 200,
     {"ETag": etag(HELLO), "Last-Modified": LAST_MODIFIED}, HELLO),
    ("unsatisfiable range of a variant", "GET", "/static/app.js",
     [("Accept-Encoding", "br"), ("Range", "bytes=100-")], 416,
     {"Vary": "Accept-Encoding", "Content-Range": "bytes */%d" % len(JS_BR)},
     b"416 Range Not Satisfiable\n"),
    ("symlink chain", "GET", "/static/chain0", [], 404, {}, b"404 Not Found\n"),
    # refused: 404 whatever the reason, 405 for other methods
    ("dotdot", "GET", "/static/../outside/secret.txt", [], 404, {}, b"404 Not Found\n"),
    ("encoded dotdot", "GET", "/static/%2e%2e/outside/secret.txt", [], 404, {},
     b"404 Not Found\n"),
    ("encoded slash dotdot", "GET", "/static/%2E%2E%2Foutside%2Fsecret.txt", [], 404, {},
     b"404 Not Found\n"),
    ("inner dotdot", "GET", "/static/sub/../hello.txt", [], 404, {}, b"404 Not Found\n"),
    ("dot segment", "GET", "/static/./hello.txt", [], 404, {}, b"404 Not Found\n"),
    ("double slash", "GET", "/static//hello.txt", [], 404, {}, b"404 Not Found\n"),
    ("nul", "GET", "/static/hello.txt%00.png", [], 404, {}, b"404 Not Found\n"),
    ("symlink out", "GET", "/static/link_out", [], 404, {}, b"404 Not Found\n"),
    ("dir symlink out", "GET", "/static/dir_out/secret.txt", [], 404, {}, b"404 Not Found\n"),
    ("absolute symlink out", "GET", "/static/etc_link/passwd", [], 404, {}, b"404 Not Found\n"),
    ("directory", "GET", "/static/adir", [], 404, {}, b"404 Not Found\n"),
    ("directory slash", "GET", "/static/adir/", [], 404, {}, b"404 Not Found\n"),
    ("prefix itself", "GET", "/static/", [], 404, {}, b"404 Not Found\n"),
    ("missing", "GET", "/static/nope.txt", [], 404,
     {"Content-Type": TEXT, "Content-Length": "14"}, b"404 Not Found\n"),
    ("missing head", "HEAD", "/static/nope.txt", [], 404, {"Content-Length": "14"}, b""),
    ("post", "POST", "/static/hello.txt", [("Content-Length", "0")], 405,
     {"Allow": "GET, HEAD"}, b"405 Method Not Allowed\n"),
    ("delete", "DELETE", "/static/hello.txt", [], 405, {"Allow": "GET, HEAD"},
     b"405 Method Not Allowed\n"),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_static_table(srv, case):
    ls, _ = srv
    _, method, path, headers, status, want_headers, body = case
    got_status, got_headers, got_body = exchange(ls, method, path, headers)
    assert got_status == status
    for name, value in want_headers.items():
        if value is ABSENT:
            assert got_headers[name] is None, name
        else:
            assert got_headers[name] == value, name
    assert got_body == body
    assert got_headers["Date"] is not None
    assert got_headers["Connection"] is None  # keep-alive stays on, also for 404/405/416


def test_outside_the_prefix_is_the_app(srv):
    ls, _ = srv
    # edge_app's own 404 ("not found"), not the static server's ("404 Not Found\n").
    assert exchange(ls, "GET", "/staticx/hello.txt")[::2] == (404, b"not found")
    assert exchange(ls, "GET", "/static")[::2] == (404, b"not found")  # no trailing slash
    assert exchange(ls, "GET", "/")[::2] == (200, b"hello")


def test_keep_alive_mixes_static_and_app(srv):
    ls, _ = srv
    c = Client(ls.port)
    try:
        for _ in range(3):
            assert c.request("/static/hello.txt")[::2] == (200, HELLO)
            assert c.request("/static/nope")[0] == 404
            assert c.request("/")[::2] == (200, b"hello")
        # Pipelined: three static responses in order from one send.
        c.send(b"GET /static/hello.txt HTTP/1.1\r\nHost: t\r\n\r\n"
               b"GET /static/big.bin HTTP/1.1\r\nHost: t\r\nRange: bytes=0-2\r\n\r\n"
               b"HEAD /static/app.js HTTP/1.1\r\nHost: t\r\n\r\n")
        assert c.response()[::2] == (200, HELLO)
        assert c.response()[::2] == (206, BIG[:3])
        assert c.response("HEAD")[::2] == (200, b"")
        # A HEAD answers with the head alone, whole file or range, and the next request on
        # the connection gets its own answer (the Python engine once sent the file too).
        c.send(b"HEAD /static/big.bin HTTP/1.1\r\nHost: t\r\n\r\n"
               b"HEAD /static/big.bin HTTP/1.1\r\nHost: t\r\nRange: bytes=0-2\r\n\r\n"
               b"GET /static/hello.txt HTTP/1.1\r\nHost: t\r\n\r\n")
        status, headers, body = c.response("HEAD")
        assert (status, body, headers["Content-Length"]) == (200, b"", str(len(BIG)))
        assert c.response("HEAD")[::2] == (206, b"")
        assert c.response()[::2] == (200, HELLO)
    finally:
        c.close()


def test_http10_static_closes_unless_asked(srv):
    ls, _ = srv
    c = Client(ls.port)
    try:
        c.send(b"GET /static/hello.txt HTTP/1.0\r\n\r\n")
        raw = c.read_all()
    finally:
        c.close()
    assert raw.startswith(b"HTTP/1.1 200 OK\r\n") and raw.endswith(b"\r\n\r\n" + HELLO)
    assert b"\r\nConnection: close\r\n" in raw
    c = Client(ls.port)
    try:
        c.send(b"GET /static/hello.txt HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
        status, headers, body = c.response()
        assert (status, body, headers["Connection"]) == (200, HELLO, "keep-alive")
    finally:
        c.close()


def test_static_requests_are_counted_and_logged(srv):
    ls, w = srv
    before = len(w.stdout)  # the access log goes to stdout
    for _ in range(5):
        assert exchange(ls, "GET", "/static/hello.txt?counted=1")[0] == 200

    def logged():
        lines = w.stdout[before:]
        return sum('"GET /static/hello.txt?counted=1 HTTP/1.1" 200 13' in ln for ln in lines)

    wait_until(lambda: logged() >= 5, timeout=10, what="5 access-log lines for static requests")

    def requests_reported():
        beats = w.find("WATCHDOG")
        return beats and int(beats[-1].get("REQUESTS", "0")) >= 5

    wait_until(requests_reported, timeout=10, what="heartbeat REQUESTS counting static requests")


def test_drain_closes_static_keepalive(engine):
    base = tempfile.mkdtemp(prefix="molt-static-drain-")
    root = make_tree(base)
    ls = Listeners(base)
    w = Worker(ls, "edge_app:application", engine=engine,
               overrides={"static": [{"prefix": "/s/", "dir": root}]})
    try:
        w.wait_ready()
        c = Client(ls.port)
        assert c.request("/s/hello.txt")[::2] == (200, HELLO)
        w.drain()
        w.wait_message("STOPPING")  # the drain has begun
        # The next response on the open connection says close, and the worker exits 0.
        c.send(b"GET /s/hello.txt HTTP/1.1\r\nHost: t\r\n\r\n")
        status, headers, body = c.response()
        assert (status, body, headers["Connection"]) == (200, HELLO, "close")
        c.close()
        assert w.wait_exit() == 0
    finally:
        w.stop()
        ls.close()


def test_missing_static_dir_fails_the_boot(engine):
    base = tempfile.mkdtemp(prefix="molt-static-missing-")
    ls = Listeners(base)
    w = Worker(ls, "edge_app:application", engine=engine,
               overrides={"static": [{"prefix": "/s/", "dir": os.path.join(base, "gone")}]})
    try:
        msg = w.wait_message("ERROR")
        assert "static: /s/" in msg["ERROR"] and "not a directory" in msg["ERROR"]
        assert w.wait_exit() == 3
    finally:
        w.stop()
        ls.close()
