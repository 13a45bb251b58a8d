"""WSGI app that breaks the rules in the ways a server must survive (each route one way)."""


class CloseRaises:
    def __init__(self, chunks):
        self.chunks = chunks

    def __iter__(self):
        return iter(self.chunks)

    def close(self):
        raise RuntimeError("boom in close()")


def application(environ, start_response):
    path = environ["PATH_INFO"]
    if path == "/str-body":
        start_response("200 OK", [("Content-Type", "text/plain")])
        return ["text, not bytes"]
    if path == "/str-chunk":
        start_response("200 OK", [("Content-Type", "text/plain")])
        return iter([b"ok", "then text"])
    if path == "/no-start-response":
        return [b"x"]
    if path == "/none":
        start_response("200 OK", [])
        return None
    if path == "/close-raises":
        start_response("200 OK", [("Content-Type", "text/plain")])
        return CloseRaises([b"closed", b" badly"])
    if path == "/bad-name":
        start_response("200 OK", [("X Bad", "v")])
        return [b"x"]
    if path == "/lf-in-status":
        start_response("200 OK\nX-Injected: 1", [])
        return [b"x"]
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [b"hello"]
