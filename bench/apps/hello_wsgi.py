"""Figure 1's app: a plain WSGI callable with a fixed 13-byte body (no framework)."""


def application(environ, start_response):
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", "13")])
    return [b"Hello, world!"]
