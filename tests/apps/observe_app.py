"""The observability tests' app, WSGI (`application`) and ASGI (`asgi`) with the same routes.

/ok 200, /missing 404, /fail 500 (answered by the app), /raise (the app raises),
/block (holds a serving thread until the file named by $OBSERVE_GATE exists, at most 30 s),
/echo-host (the Host header, and X-Warmup-Token, as the body: health.host reaches the app),
/healthz 200 (the warm-up; it also appends the Host it saw to $OBSERVE_WARMUPS, when set).
"""
import os
import time


def _gate_open():
    return os.path.exists(os.environ.get("OBSERVE_GATE", "/nonexistent"))


def _block():
    deadline = time.monotonic() + 30
    while not _gate_open() and time.monotonic() < deadline:
        time.sleep(0.01)


def _note_warmup(host, token):
    path = os.environ.get("OBSERVE_WARMUPS")
    if path:
        with open(path, "a") as f:
            f.write("%s %s\n" % (host, token))


def application(environ, start_response):
    path = environ.get("PATH_INFO", "/")
    if path == "/raise":
        raise RuntimeError("observe_app: raised on purpose")
    if path == "/block":
        _block()
    if path == "/healthz":
        _note_warmup(environ.get("HTTP_HOST", ""), environ.get("HTTP_X_WARMUP_TOKEN", "-"))
    if path == "/echo-host":
        body = environ.get("HTTP_HOST", "").encode()
    else:
        body = path.encode()
    status = {"/missing": "404 Not Found", "/fail": "500 Internal Server Error"}.get(path, "200 OK")
    start_response(status, [("Content-Type", "text/plain"), ("Content-Length", str(len(body))),
                            ("X-Served-Path", path)])
    return [body]


async def asgi(scope, receive, send):
    if scope["type"] != "http":
        return
    path = scope["path"]
    headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
    if path == "/raise":
        raise RuntimeError("observe_app: raised on purpose")
    if path == "/block":
        import asyncio

        deadline = time.monotonic() + 30
        while not _gate_open() and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
    if path == "/healthz":
        _note_warmup(headers.get("host", ""), headers.get("x-warmup-token", "-"))
    body = headers.get("host", "").encode() if path == "/echo-host" else path.encode()
    status = {"/missing": 404, "/fail": 500}.get(path, 200)
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"text/plain"),
                            (b"content-length", str(len(body)).encode()),
                            (b"x-served-path", path.encode())]})
    await send({"type": "http.response.body", "body": body})
