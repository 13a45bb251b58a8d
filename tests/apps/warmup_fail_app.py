"""Imports fine, but its health check answers 503: warm-up must fail with exit 4."""


def application(environ, start_response):
    start_response("503 Service Unavailable", [("Content-Type", "text/plain")])
    return [b"database unreachable"]
