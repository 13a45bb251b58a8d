"""A WSGI app that answers with the scheme and the TLS keys of its environ (TLS tests)."""
import json

KEYS = ("wsgi.url_scheme", "HTTPS", "SSL_PROTOCOL", "SSL_CLIENT_S_DN", "SSL_CLIENT_I_DN",
        "SSL_CLIENT_VERIFY", "REMOTE_ADDR", "SERVER_PORT")


def application(environ, start_response):
    if environ["PATH_INFO"] == "/file":  # wsgi.file_wrapper: no sendfile() under TLS
        f = open(environ["QUERY_STRING"], "rb")
        size = str(f.seek(0, 2))
        f.seek(0)
        start_response("200 OK", [("Content-Length", size)])
        return environ["wsgi.file_wrapper"](f)
    if environ["PATH_INFO"] == "/echo":  # a request body read through TLS
        body = environ["wsgi.input"].read()
        start_response("200 OK", [("Content-Length", str(len(body)))])
        return [body]
    if environ["PATH_INFO"] == "/big":
        body = b"x" * 1_000_000
        start_response("200 OK", [("Content-Length", str(len(body)))])
        return [body]
    body = json.dumps({k: environ.get(k) for k in KEYS}).encode()
    start_response("200 OK", [("Content-Type", "application/json"),
                              ("Content-Length", str(len(body)))])
    return [body]
