"""Responses: start_response, write() and HTTP/1.1 framing, written to a `Sink`."""
from __future__ import annotations

import io
import logging
import os
import stat
import time
from typing import Any, Callable, Dict, List, Optional, Tuple

from ..httpdate import http_date
from .request import Request

try:
    from typing import Protocol
except ImportError:  # Python 3.7
    Protocol = object  # type: ignore[assignment]

log = logging.getLogger("molt_shim")

SMALL_BODY = 256 * 1024  # below this, head and body go out in one send()
CONTINUE_100 = b"HTTP/1.1 100 Continue\r\n\r\n"
REASONS = {
    400: "Bad Request", 408: "Request Timeout", 413: "Payload Too Large", 414: "URI Too Long",
    431: "Request Header Fields Too Large", 500: "Internal Server Error", 501: "Not Implemented",
    505: "HTTP Version Not Supported",
}
HOP_BY_HOP = frozenset(("connection", "transfer-encoding", "keep-alive", "upgrade",
                        "proxy-connection", "te", "trailer"))


class ClientGone(Exception):
    """The peer went away (reset, broken pipe or write timeout) while we were answering."""


class Sink(Protocol):
    """Where a response goes (the engine's connection). Both raise ClientGone."""

    def send_all(self, data: bytes) -> None:
        ...

    def sendfile_all(self, fd: int, offset: int, size: int, head: bytes = b"") -> int:
        """Send `head`, then up to `size` bytes of the file from `offset`; returns how many
        of the file's were sent (fewer when the file shrank)."""
        ...


class Framing:
    """What every response of this worker is framed with; `closing` turns on at the drain."""

    def __init__(self, version_header: str, keepalive: bool) -> None:
        self.version_header = version_header  # "Name: value\r\n" or ""
        self.keepalive = keepalive
        self.closing = False  # draining: every response says Connection: close
        self.status_lines: Dict[str, bytes] = {}

    def status_line(self, status: str) -> bytes:
        line = self.status_lines.get(status)
        if line is None:
            line = ("HTTP/1.1 %s\r\n" % status).encode("latin-1")
            if len(self.status_lines) < 256:  # bounded: the app chooses status texts
                self.status_lines[status] = line
        return line

    def error_response(self, status: int, head_only: bool = False) -> bytes:
        """A complete plain-text error response that closes the connection (`head_only`: the
        answer to a HEAD request, its head alone)."""
        reason = REASONS.get(status, "Error")
        body = ("%d %s\n" % (status, reason)).encode()
        head = ("HTTP/1.1 %d %s\r\nContent-Type: text/plain; charset=utf-8\r\n"
                "Content-Length: %d\r\nConnection: close\r\n%s%s\r\n"
                % (status, reason, len(body), date_header(), self.version_header))
        return head.encode("latin-1") + (b"" if head_only else body)


_date = [0, ""]


def date_header() -> str:
    now = int(time.time())
    if now != _date[0]:
        _date[1] = "Date: %s\r\n" % http_date(now)
        _date[0] = now
    return _date[1]


class FileWrapper:
    """wsgi.file_wrapper; the server sends regular files with os.sendfile."""

    def __init__(self, filelike: Any, blksize: int = 65536) -> None:
        self.filelike = filelike
        self.blksize = blksize
        if hasattr(filelike, "close"):
            self.close = filelike.close

    def __iter__(self) -> "FileWrapper":
        return self

    def __next__(self) -> bytes:
        data = self.filelike.read(self.blksize)
        if data:
            return data
        raise StopIteration


class Response:
    """One response: start_response, write() and the response framing."""

    __slots__ = ("framing", "sink", "req", "status", "code", "header_block", "content_length",
                 "app_close", "headers_sent", "chunked", "no_body", "remaining", "keep_alive",
                 "bytes_sent")

    def __init__(self, framing: Framing, sink: Sink, req: Request, keep_alive: bool) -> None:
        self.framing = framing
        self.sink = sink
        self.req = req
        self.status: Optional[str] = None
        self.code = 0
        self.header_block = ""
        self.content_length: Optional[int] = None
        self.app_close = False
        self.headers_sent = False
        self.chunked = False
        self.no_body = False
        self.remaining = -1  # bytes still allowed by Content-Length; -1 when unbounded
        self.keep_alive = keep_alive
        self.bytes_sent = 0

    def start_response(self, status: str, headers: List[Tuple[str, str]],
                       exc_info: Any = None) -> Callable[[bytes], None]:
        if exc_info is not None:
            try:
                if self.headers_sent:
                    raise exc_info[1].with_traceback(exc_info[2])
            finally:
                exc_info = None
        elif self.status is not None:
            raise AssertionError("start_response() called twice without exc_info")
        # A final status: 200-599 (a 1xx is informational, never the response; the client
        # would wait on for the final one).
        if (type(status) is not str or len(status) < 4 or not status[:3].isdigit()
                or not "200" <= status[:3] <= "599" or status[3] != " " or "\r" in status
                or "\n" in status):
            raise ValueError("invalid status line %r" % (status,))
        parts = []
        content_length = None
        app_close = False
        for item in headers:
            name, value = item
            if type(name) is not str or type(value) is not str:
                raise TypeError("header %r: name and value must be str" % (item,))
            lower = name.lower()
            if lower in HOP_BY_HOP:
                # PEP 3333 forbids hop-by-hop headers; the server owns framing. Honour an
                # explicit close, drop the rest.
                if lower == "connection" and "close" in value.lower():
                    app_close = True
                continue
            if lower == "content-length":
                # Digits only (as a request's): int() would take "-1" (no limit at all), "+5",
                # "1_0" or " 5", and send them as they are.
                if not (value.isascii() and value.isdigit()) or len(value) > 18:
                    raise ValueError("invalid Content-Length %r" % value[:40])
                content_length = int(value)
            parts.append("%s: %s\r\n" % (name, value))
        block = "".join(parts)
        # One C-level count instead of per-character scans: a CR or LF inside a name or value,
        # or a colon-less/space-containing name, shows up as an unexpected count.
        if block.count("\n") != len(parts) or block.count("\r") != len(parts):
            raise ValueError("CR or LF inside a response header")
        for part in parts:
            name = part.split(":", 1)[0]
            if not name or " " in name or "\t" in name:
                raise ValueError("invalid response header name %r" % name)
        block.encode("latin-1")  # raises now, while the app can still see it
        self.status = status
        self.code = int(status[:3])
        self.header_block = block
        self.content_length = content_length
        self.app_close = app_close
        return self.write

    def _head(self, final_len: Optional[int]) -> bytes:
        if self.status is None:
            raise AssertionError("the application did not call start_response()")
        framing = self.framing
        code = self.code
        extra = ""
        self.no_body = self.req.method == "HEAD" or code in (204, 304) or code < 200
        if self.no_body:
            if final_len and self.req.method == "HEAD" and self.content_length is None:
                extra = "Content-Length: %d\r\n" % final_len  # what GET would announce
        elif self.content_length is not None:
            self.remaining = self.content_length
        elif final_len is not None:
            extra = "Content-Length: %d\r\n" % final_len
        elif self.req.version == "1.1":
            self.chunked = True
            extra = "Transfer-Encoding: chunked\r\n"
        else:
            self.keep_alive = False  # HTTP/1.0 without a length: the close ends the body
        if self.app_close or framing.closing or not framing.keepalive:
            self.keep_alive = False
        if not self.keep_alive:
            extra += "Connection: close\r\n"
        elif self.req.version == "1.0":
            extra += "Connection: keep-alive\r\n"
        self.headers_sent = True
        return framing.status_line(self.status) + (
            self.header_block + extra + date_header() + framing.version_header
            + "\r\n").encode("latin-1")

    def _frame(self, data: bytes) -> bytes:
        if self.no_body:
            return b""
        if self.remaining >= 0:
            if len(data) > self.remaining:
                data = data[: self.remaining]  # never send more than the app announced
            self.remaining -= len(data)
        elif self.chunked and data:
            data = b"%x\r\n%s\r\n" % (len(data), data)
        self.bytes_sent += len(data)
        return data

    def write(self, data: bytes) -> None:
        if type(data) is not bytes:
            if not isinstance(data, (bytearray, memoryview)):
                raise TypeError("response body chunks must be bytes, got %s" % type(data).__name__)
            data = bytes(data)
        if not self.headers_sent:
            head = self._head(None)
            body = self._frame(data)
            self.sink.send_all(head + body if len(body) < SMALL_BODY else head)
            if len(body) >= SMALL_BODY:
                self.sink.send_all(body)
        elif data:
            body = self._frame(data)
            if body:
                self.sink.send_all(body)

    def finish_single(self, data: bytes) -> None:
        """Fast path for a one-element list: one send with an exact Content-Length."""
        if type(data) is not bytes:
            self.write(data)
            self.finish()
            return
        head = self._head(len(data))
        body = self._frame(data)
        if len(body) < SMALL_BODY:
            self.sink.send_all(head + body)
        else:
            self.sink.send_all(head)
            self.sink.send_all(body)
        self._check_length()

    def finish(self) -> None:
        if not self.headers_sent:
            self.sink.send_all(self._head(0))
        elif self.chunked:
            self.sink.send_all(b"0\r\n\r\n")
        self._check_length()

    def _check_length(self) -> None:
        if self.remaining > 0 and not self.no_body:
            log.warning("%s %s: app sent %d bytes less than its Content-Length; closing",
                        self.req.method, self.req.target(), self.remaining)
            self.keep_alive = False

    def send_file(self, wrapper: FileWrapper) -> bool:
        """sendfile() a regular file; False means 'not possible, iterate instead'."""
        if self.headers_sent:
            # After the app's write() calls (PEP 3333 allows them before a file wrapper) the
            # head is out and the body chunked: the wrapper is iterated like any other body.
            return False
        try:
            fd = wrapper.filelike.fileno()
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                return False
            offset = wrapper.filelike.tell() if hasattr(wrapper.filelike, "tell") else 0
        except (AttributeError, OSError, io.UnsupportedOperation):
            return False
        size = max(0, st.st_size - offset)
        if self.content_length is not None:
            size = min(size, self.content_length)
            head = self._head(None)
        else:
            head = self._head(size)
        if self.no_body:
            self.sink.send_all(head)
            return True
        self.remaining = self.content_length - size if self.content_length is not None else -1
        sent = self.sink.sendfile_all(fd, offset, size, head)
        self.bytes_sent += sent
        if sent < size:
            self.keep_alive = False
        self._check_length()
        return True

    def send_file_range(self, fd: int, offset: int, size: int) -> None:
        """The head (start_response gave the Content-Length), then `size` bytes of the open
        file from `offset` with sendfile; a file that shrank meanwhile closes the connection."""
        head = self._head(None)  # it decides no_body (HEAD, 304)
        if self.no_body:
            self.sink.send_all(head)
            return
        sent = self.sink.sendfile_all(fd, offset, size, head)
        self.bytes_sent += sent
        self.remaining -= sent
        self._check_length()

    def internal_error(self) -> None:
        """The app failed before sending anything: a 500 that closes the connection."""
        self.code = 500
        try:
            self.sink.send_all(self.framing.error_response(500, self.req.method == "HEAD"))
        except ClientGone:
            pass
