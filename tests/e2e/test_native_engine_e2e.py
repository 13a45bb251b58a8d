"""The native engine behind the real master, as `engine: auto` picks it: Flask and Django
releases roll over fifty times under wrk keep-alive load (on the app and on a static file at
once) with zero failed requests, and `static:` answers conditional, range, precompressed and
traversal requests through the master's listener."""
from __future__ import annotations

import gzip
import http.client
import signal
import socket

import pytest

from molt_testlib import APPS, Releases, Wrk, flask_release, wait_until

ROLLOVERS = 50


def static_files(version: str) -> dict:
    js = "console.log(%r);\n" % version * 50
    return {"assets/hello.txt": "version %s\n" % version, "assets/app.js": js}


def add_gzip_sibling(release, name="assets/app.js"):
    data = (release / name).read_bytes()
    (release / (name + ".gz")).write_bytes(gzip.compress(data, mtime=0))


def raw_get(port: int, target: str, headers: dict = None):
    """One request with the target sent exactly as written (no client-side normalising)."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    try:
        lines = "".join("%s: %s\r\n" % kv for kv in (headers or {}).items())
        sock.sendall(("GET %s HTTP/1.1\r\nHost: t\r\n%s\r\n" % (target, lines)).encode())
        response = http.client.HTTPResponse(sock)
        response.begin()
        return response.status, response.msg, response.read()
    finally:
        sock.close()


def rollovers_under_load(m, count: int, paths: list, flip=None) -> list:
    """`count` HUP rollovers, each waited for until done, while one wrk per path keeps its
    keep-alive connections busy; stopped (SIGINT: wrk still reports) once the last is done."""
    loads = [Wrk(m.url(path), duration=900, connections=12, threads=1) for path in paths]
    try:
        for i in range(count):
            if flip is not None:
                flip(i)
            before = m.live_generation()
            m.signal(signal.SIGHUP)
            wait_until(lambda: (m.live_generation() or 0) > before
                       and not m.status()["rollover_in_progress"], 60,
                       f"rollover {i + 1} to complete", on_timeout=m.log)
    finally:
        for load in loads:
            load.interrupt()
        results = [load.result(timeout=60) for load in loads]
    return results


def assert_static_through_master(m, prefix: str, version: str):
    port = m.port
    status, headers, body = raw_get(port, prefix + "hello.txt")
    assert (status, body) == (200, b"version %s\n" % version.encode())
    assert headers["Content-Type"] == "text/plain; charset=utf-8"
    etag = headers["ETag"]
    assert raw_get(port, prefix + "hello.txt", {"If-None-Match": etag})[0] == 304
    assert raw_get(port, prefix + "hello.txt",
                   {"If-Modified-Since": headers["Last-Modified"]})[0] == 304
    status, headers, body = raw_get(port, prefix + "hello.txt", {"Range": "bytes=0-6"})
    assert (status, body, headers["Content-Range"]) == (206, b"version", "bytes 0-6/10")
    status, headers, body = raw_get(port, prefix + "app.js", {"Accept-Encoding": "gzip, br"})
    assert (status, headers["Content-Encoding"], headers["Vary"]) == (200, "gzip",
                                                                     "Accept-Encoding")
    assert gzip.decompress(body) == static_files(version)["assets/app.js"].encode()
    for target in ("../app.py", "%2e%2e/app.py", "..%2fapp.py", "", "hello.txt%00"):
        assert raw_get(port, prefix + target)[0] == 404, target


def flask_static_release(version: str) -> dict:
    return dict(flask_release(version), **static_files(version))


@pytest.mark.timeout(600)
def test_flask_on_the_native_engine_fifty_rollovers_zero_failed_and_static(molt, tmp_path):
    releases = Releases(tmp_path / "site")
    for version in ("a", "b"):
        add_gzip_sibling(releases.add(version, files=flask_static_release(version)))
    releases.activate("a")
    m = molt({"app": "app:app", "chdir": str(releases.current), "workers": 2, "threads": 2,
              "version_file": "REVISION", "health": {"path": "/healthz"},
              "timeouts": {"boot": "30s", "graceful": "10s"},
              "static": [{"prefix": "/assets/", "dir": "assets"}]})
    wait_until(lambda: m.log().count("(engine native: wsgi") >= 2, 10,
               "both workers on the native engine (engine: auto)", on_timeout=m.log)
    assert_static_through_master(m, "/assets/", "a")

    def flip(i):
        releases.activate("b" if i % 2 == 0 else "a")

    app, static = rollovers_under_load(m, ROLLOVERS, ["/", "/assets/hello.txt"], flip)
    for result in (app, static):
        assert result["requests"] > 1000, result["output"]
        assert result["failed"] == 0, result["output"]
    assert m.status()["rollovers"] == {"ok": ROLLOVERS, "failed": 0}
    assert "unavailable" not in m.log()
    final = "a" if ROLLOVERS % 2 == 0 else "b"
    assert m.get("/")[2] == b"version %s\n" % final.encode()
    assert_static_through_master(m, "/assets/", final)


@pytest.mark.timeout(600)
def test_django_on_the_native_engine_fifty_rollovers_zero_failed_and_static(molt, tmp_path):
    releases = Releases(tmp_path / "site")
    for version in ("a", "b"):
        release = releases.add(version, source=APPS / "django_site",
                               files={"REVISION": version + "\n", **static_files(version)})
        add_gzip_sibling(release)
    releases.activate("a")
    m = molt({"app": "mysite.wsgi:application", "chdir": str(releases.current), "workers": 2,
              "threads": 2, "version_file": "REVISION", "health": {"path": "/healthz"},
              "env": {"DJANGO_SETTINGS_MODULE": "mysite.settings"},
              "timeouts": {"boot": "30s", "graceful": "10s"},
              "static": [{"prefix": "/static/", "dir": "assets"}]})
    wait_until(lambda: m.log().count("(engine native: wsgi") >= 2, 10,
               "both workers on the native engine (engine: auto)", on_timeout=m.log)
    assert m.get("/")[2] == b"django says hi"
    assert_static_through_master(m, "/static/", "a")

    def flip(i):
        releases.activate("b" if i % 2 == 0 else "a")

    app, static = rollovers_under_load(m, ROLLOVERS, ["/", "/static/hello.txt"], flip)
    for result in (app, static):
        assert result["requests"] > 500, result["output"]
        assert result["failed"] == 0, result["output"]
    assert m.status()["rollovers"] == {"ok": ROLLOVERS, "failed": 0}
    assert "unavailable" not in m.log()
    assert m.get("/")[2] == b"django says hi"
    assert_static_through_master(m, "/static/", "a" if ROLLOVERS % 2 == 0 else "b")
