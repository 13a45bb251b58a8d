"""Requests: the parser's callbacks, request limits, body buffering and the WSGI environ."""
from __future__ import annotations

import io
import sys
import tempfile
import time
from collections import deque
from dataclasses import dataclass
from typing import Any, Deque, Dict, List, Optional, Tuple
from urllib.parse import unquote_to_bytes

from .. import httpparse
from ..framing_guard import FramingGuard


class HttpError(Exception):
    """A request the server answers with an error status (and then closes)."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


@dataclass(frozen=True)
class Limits:
    """What a request may be (the `http:` config section)."""

    max_request_line: int
    max_header_size: int
    max_headers: int
    max_body_size: int  # 0: unlimited
    body_buffer_size: int  # bodies above this spill to a temporary file

    @classmethod
    def from_config(cls, http: Dict[str, Any]) -> "Limits":
        return cls(int(http["max_request_line"]), int(http["max_header_size"]),
                   int(http["max_headers"]), int(http["max_body_size"] or 0),
                   int(http["body_buffer_size"]))


_header_keys: Dict[bytes, Optional[str]] = {}


def environ_key(name: bytes) -> Optional[str]:
    """CGI name for a header; None for names with '_' (they could spoof a '-' header)."""
    key = _header_keys.get(name)
    if key is None and name not in _header_keys:
        text = name.decode("latin-1").upper()
        if "_" in text:
            key = None
        elif text == "CONTENT-TYPE" or text == "CONTENT-LENGTH":
            key = text.replace("-", "_")
        else:
            key = "HTTP_" + text.replace("-", "_")
        if len(_header_keys) < 4096:  # bounded: header names are attacker-chosen
            _header_keys[name] = key
    return key


class _EmptyInput:
    """Shared, stateless wsgi.input for requests without a body (most of them)."""

    def read(self, size: int = -1) -> bytes:
        return b""

    def readline(self, size: int = -1) -> bytes:
        return b""

    def readlines(self, hint: int = -1) -> List[bytes]:
        return []

    def __iter__(self) -> "_EmptyInput":
        return self

    def __next__(self) -> bytes:
        raise StopIteration


EMPTY_INPUT = _EmptyInput()


class Request:
    __slots__ = ("url", "env", "method", "version", "keep_alive", "expect_continue",
                 "content_length", "chunked", "chunks", "spool", "body_len", "head_done",
                 "head_size", "nheaders", "started")

    def __init__(self) -> None:
        self.url = b""
        self.env: Dict[str, str] = {}
        self.method = "GET"
        self.version = "1.1"
        self.keep_alive = True
        self.expect_continue = False
        self.content_length: Optional[int] = None
        self.chunked = False
        self.chunks: Optional[List[bytes]] = None
        self.spool: Any = None
        self.body_len = 0
        self.head_done = False
        self.head_size = 0
        self.nheaders = 0
        self.started = 0.0

    def wsgi_input(self) -> Any:
        if self.spool is not None:
            self.spool.seek(0)
            return self.spool
        if self.chunks:
            return io.BytesIO(b"".join(self.chunks))
        return EMPTY_INPUT

    def target(self, limit: int = 200) -> str:
        """The request target for log lines (bounded)."""
        return self.url[:limit].decode("latin-1")


class RequestReader:
    """The parser's callback target for one connection: bytes in, complete requests out.

    `ready` holds the requests whose body is complete, in order; `cur` the one being read;
    `error` the (status, reason) to answer with once the complete ones are served.
    """

    __slots__ = ("limits", "parser", "guard", "ready", "cur", "error", "head_started", "upgrade",
                 "continue_sent")

    def __init__(self, limits: Limits) -> None:
        self.limits = limits
        self.parser: Any = httpparse.make_parser(self)
        self.guard = FramingGuard(limits.max_request_line, limits.max_header_size)
        self.ready: Deque[Request] = deque()
        self.cur: Optional[Request] = None
        self.error: Optional[Tuple[int, str]] = None
        self.head_started = 0.0  # monotonic time the current head began; 0.0 between heads
        self.upgrade = False  # the client asked for an Upgrade, which WSGI cannot give
        self.continue_sent = False

    def feed(self, data: bytes) -> None:
        # molt's own framing check first: the parser sees only what it let through, and its
        # verdict wins over whatever the parser would say about the same bytes. What the
        # parser stopped at before them comes first in the stream and stands: its own error
        # (a limit's 413 or 431), or an upgrade (answered, then the connection closes).
        violation = self.guard.scan(data)
        if violation is not None:
            offset, (status, reason) = violation
            self._feed_parser(data[:offset])
            if self.error is None and not self.upgrade:
                self.error = (status, "malformed request: %s" % reason)
            return
        self._feed_parser(data)

    def _feed_parser(self, data: bytes) -> None:
        if self.error is not None or self.upgrade or not data:
            return
        try:
            self.parser.feed_data(data)
        except httpparse.ParserUpgrade:
            self.upgrade = True  # answer the request, then close
        except httpparse.ParserError as exc:
            if self.error is None:
                self.error = (httpparse.status_of(exc) or 400, "malformed request: %s" % exc)
        except HttpError:
            pass

    def release(self) -> None:
        """The connection is closed: drop a half-read body and the parser <-> reader cycle."""
        if self.cur is not None and self.cur.spool is not None:
            self.cur.spool.close()
        self.parser = None

    # -- httptools callbacks ------------------------------------------------------------------
    def _fail(self, status: int, reason: str) -> None:
        if self.error is None:
            self.error = (status, reason)
        raise HttpError(status, reason)

    def on_message_begin(self) -> None:
        self.cur = Request()
        self.continue_sent = False
        if not self.head_started:
            self.head_started = time.monotonic()

    def on_url(self, url: bytes) -> None:
        req = self.cur
        if req is None:
            return
        req.url += url
        if len(req.url) > self.limits.max_request_line:
            self._fail(414, "request line longer than %d bytes" % self.limits.max_request_line)

    def on_header(self, name: bytes, value: bytes) -> None:
        req = self.cur
        if req is None or req.head_done:
            return  # trailers never reach the environ: a client could inject Host with them
        limits = self.limits
        req.nheaders += 1
        req.head_size += len(name) + len(value) + 4
        if req.nheaders > limits.max_headers:
            self._fail(431, "more than %d header fields" % limits.max_headers)
        if req.head_size > limits.max_header_size:
            self._fail(431, "header section larger than %d bytes" % limits.max_header_size)
        key = environ_key(name)
        if key is None:
            return
        text = value.decode("latin-1")
        if key == "HTTP_TRANSFER_ENCODING":
            if text.strip().lower() != "chunked":
                self._fail(501, "unsupported Transfer-Encoding %r" % text[:100])
            req.chunked = True
        elif key == "CONTENT_LENGTH":
            if req.content_length is not None or not text.strip().isdigit():
                self._fail(400, "invalid or repeated Content-Length")
            req.content_length = int(text)
        elif key == "HTTP_EXPECT" and text.lower() == "100-continue":
            req.expect_continue = True
        env = req.env
        old = env.get(key)
        env[key] = text if old is None else old + "," + text

    def on_headers_complete(self) -> None:
        req = self.cur
        if req is None:
            return
        parser = self.parser
        if req.chunked and req.content_length is not None:
            self._fail(400, "both Content-Length and Transfer-Encoding")
        req.method = parser.get_method().decode("latin-1")
        req.version = parser.get_http_version()
        if req.version == "1.0":  # RFC 9110 §10.1.1: HTTP/1.0's 100-continue is ignored
            req.expect_continue = False
        # RFC 9112 §6.1: a chunked HTTP/1.0 request is served, then the connection closed.
        req.keep_alive = parser.should_keep_alive() and not (req.chunked and req.version == "1.0")
        req.head_done = True
        req.started = time.monotonic()
        self.head_started = 0.0
        limit = self.limits.max_body_size
        if limit and req.content_length is not None and req.content_length > limit:
            self._fail(413, "Content-Length %d exceeds max_body_size %d"
                       % (req.content_length, limit))

    def on_body(self, body: bytes) -> None:
        req = self.cur
        if req is None:
            return
        limits = self.limits
        req.body_len += len(body)
        if limits.max_body_size and req.body_len > limits.max_body_size:
            self._fail(413, "body exceeds max_body_size %d" % limits.max_body_size)
        if req.spool is not None:
            req.spool.write(body)
        elif req.chunks is None:
            req.chunks = [body]
        else:
            req.chunks.append(body)
        if req.spool is None and req.body_len > limits.body_buffer_size:
            # Spill to disk: a big upload must not cost its size in RAM per thread.
            req.spool = tempfile.TemporaryFile()
            for chunk in req.chunks or ():
                req.spool.write(chunk)
            req.chunks = None

    def on_message_complete(self) -> None:
        req = self.cur
        if req is None:
            return
        if req.chunked:
            # The body is de-chunked and complete; tell the app its real length.
            req.env.pop("HTTP_TRANSFER_ENCODING", None)
            req.env["CONTENT_LENGTH"] = str(req.body_len)
        self.ready.append(req)
        self.cur = None


# -- the environ ------------------------------------------------------------------------------
def server_environ(multithread: bool, file_wrapper: Any, script_name: str) -> Dict[str, Any]:
    """The keys every request of this worker shares."""
    return {
        "SCRIPT_NAME": script_name,
        "wsgi.version": (1, 0),
        "wsgi.url_scheme": "http",
        "wsgi.errors": sys.stderr,
        "wsgi.multithread": multithread,
        "wsgi.multiprocess": True,
        "wsgi.run_once": False,
        "wsgi.file_wrapper": file_wrapper,
        "wsgi.input_terminated": True,
        "SERVER_SOFTWARE": "molt",
    }


def listener_environ(base: Dict[str, Any], sockname: Any, is_tcp: bool) -> Dict[str, Any]:
    """The keys every request through one listener shares."""
    env = dict(base)
    if is_tcp:
        env["SERVER_NAME"] = str(sockname[0])
        env["SERVER_PORT"] = str(sockname[1])
    else:
        env["SERVER_NAME"] = "localhost"
        env["SERVER_PORT"] = "80"
    return env


def connection_environ(listener_env: Dict[str, Any], peer: Any) -> Dict[str, Any]:
    """The keys every request on one connection shares."""
    env = dict(listener_env)
    if isinstance(peer, tuple):
        env["REMOTE_ADDR"] = str(peer[0])
        env["REMOTE_PORT"] = str(peer[1])
    else:  # AF_UNIX: the peer's path, usually "" for an unbound client socket
        env["REMOTE_ADDR"] = peer.decode("latin-1") if isinstance(peer, bytes) else str(peer or "")
        env["REMOTE_PORT"] = ""
    return env


def request_environ(conn_env: Dict[str, Any], req: Request, script_name: str) -> Dict[str, Any]:
    env = conn_env.copy()
    env.update(req.env)
    url = req.url
    if url[:1] == b"/":
        path, _, query = url.partition(b"?")
        path = path.partition(b"#")[0]
    else:  # absolute-form or '*'
        try:
            path, query = httpparse.split_url(url)
        except Exception:
            path, query = url, b""
    if b"%" in path:
        path = unquote_to_bytes(path)
    path_info = path.decode("latin-1")
    if script_name and (path_info == script_name or path_info.startswith(script_name + "/")):
        path_info = path_info[len(script_name):]
    env["REQUEST_METHOD"] = req.method
    env["PATH_INFO"] = path_info
    env["QUERY_STRING"] = query.decode("latin-1")
    env["RAW_URI"] = url.decode("latin-1")
    env["SERVER_PROTOCOL"] = "HTTP/" + req.version
    env["wsgi.input"] = req.wsgi_input()
    return env
