"""molt's own check of HTTP/1.1 framing, ahead of the parser library (issue 18 points 4, 5).

The parser library is lenient in places where a proxy and molt could read one byte stream as
different requests (request smuggling). The guard reads the same bytes first, line by line,
with the strict RFC 9112 grammar, and names the first violation; the reader then answers it
with 400 (505 for an unsupported version) and closes. Whatever the library accepts, a stream
the guard refuses is never served. Both interfaces use it: the threaded WSGI engine's request
reader (wsgi/request.py) and the ASGI engine's protocol (engines/uvicorn_asgi.py). The rules
are the same as the native engine's (worker_shim/native/framing_guard.cpp); the framing table
test (tests/shim/test_framing.py) runs every engine of both interfaces.

The guard frames bodies itself (Content-Length, chunked) only to know where the next line
starts. It never stops guarding on a guess of its own: the bytes after a head that the parser
takes for an upgrade are the new protocol's, and the reader ignores a violation that lies
after the parser's upgrade, or after the parser's own error (what comes first in the stream
stands). A head line longer than the reader's limits could allow is refused here (414, 431):
the parser does not count what molt's limits count, and would read on.
"""
from __future__ import annotations

import enum
import re
from typing import List, Optional, Tuple

# RFC 9110 tchar; a field value is VCHAR / obs-text / SP / HTAB (no CTL).
_TOKEN = rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+"
_FIELD = re.compile(rb"(" + _TOKEN + rb"):[ \t]*([\t\x20-\x7e\x80-\xff]*)\Z")
_REQUEST_LINE = re.compile(rb"(" + _TOKEN + rb") ([\x21-\x7e\x80-\xff]+)(?: (\S*))?\Z")
_VERSION = re.compile(rb"HTTP/[0-9]\.[0-9]\Z")
_SUPPORTED = (b"HTTP/1.0", b"HTTP/1.1")
_CHUNK_SIZE = re.compile(rb"([0-9A-Fa-f]{1,16})(;[\t\x20-\x7e\x80-\xff]*)?\Z")
_CHUNK_LINE_LIMIT = 4096

Violation = Tuple[int, str]  # (status, reason)


class _State(enum.Enum):
    HEAD = "head"  # between requests or inside a head
    BODY = "body"  # Content-Length bytes left
    CHUNK_SIZE = "chunk size line"
    CHUNK_DATA = "chunk data"
    CHUNK_END = "CRLF after chunk data"
    TRAILER = "trailer section"


class FramingGuard:
    """Bytes in, the first framing violation out (once; after it the guard says nothing)."""

    __slots__ = ("state", "line", "left", "head", "line_limit", "done")

    def __init__(self, max_request_line: int, max_header_size: int) -> None:
        self.state = _State.HEAD
        self.line = bytearray()
        self.left = 0
        self.head: List[bytes] = []
        # A longer head line is over max_request_line or max_header_size, whatever it is.
        self.line_limit = max_request_line + max_header_size + 64
        self.done = False

    def scan(self, data: bytes) -> Optional[Tuple[int, Violation]]:
        """(offset of the byte where the violation shows, violation), or None: all good."""
        if self.done:
            return None
        i, n = 0, len(data)
        while i < n:
            state = self.state
            if state is _State.BODY or state is _State.CHUNK_DATA:
                take = min(self.left, n - i)
                self.left -= take
                i += take
                if self.left == 0:
                    self.state = _State.HEAD if state is _State.BODY else _State.CHUNK_END
                continue
            end = data.find(b"\n", i)
            if end < 0:
                self.line += data[i:]
                return self._too_long(n) if len(self.line) > self._limit() else None
            self.line += data[i:end + 1]
            i = end + 1
            line = bytes(self.line)
            self.line.clear()
            if len(line) > self._limit():
                return self._too_long(end)
            if not line.endswith(b"\r\n"):
                return self._stop(end, (400, "bare LF in the %s" % self.state.value))
            violation = self._line(line[:-2])
            if violation is not None:
                return self._stop(end, violation)
        return None

    # -- one line -------------------------------------------------------------------------
    def _line(self, line: bytes) -> Optional[Violation]:
        if b"\r" in line:
            return 400, "bare CR in the %s" % self.state.value
        state = self.state
        if state is _State.HEAD:
            if line:
                self.head.append(line)
                return None
            if not self.head:
                return None  # RFC 9112 §2.2: empty lines before a request line are ignored
            head, self.head = self.head, []
            return self._head(head)
        if state is _State.CHUNK_END:
            if line:
                return 400, "chunk data longer than its size"
            self.state = _State.CHUNK_SIZE
            return None
        if state is _State.CHUNK_SIZE:
            m = _CHUNK_SIZE.match(line)
            if m is None:
                return 400, "invalid chunk size line"
            self.left = int(m.group(1), 16)
            self.state = _State.CHUNK_DATA if self.left else _State.TRAILER
            return None
        # TRAILER: fields with the header grammar (the reader drops them), then an empty line.
        if not line:
            self.state = _State.HEAD
            return None
        return None if _FIELD.match(line) else (400, "malformed trailer field")

    def _head(self, lines: List[bytes]) -> Optional[Violation]:
        m = _REQUEST_LINE.match(lines[0])
        if m is None:
            return 400, "malformed request line"
        version = m.group(3)
        if version is None:
            return 400, "HTTP/0.9 request line (no version)"
        if not _VERSION.match(version):
            return 400, "malformed HTTP version"
        if version not in _SUPPORTED:
            return 505, "HTTP version %s not supported" % version.decode("latin-1")
        hosts = 0
        lengths: List[bytes] = []
        codings: List[bytes] = []
        for line in lines[1:]:
            if line[:1] in (b" ", b"\t"):
                return 400, "obsolete line folding in a header field"
            field = _FIELD.match(line)
            if field is None:
                return 400, "malformed header field (a name is a token followed by ':')"
            name = field.group(1).lower()
            value = field.group(2).rstrip(b" \t")
            if name == b"host":
                hosts += 1
            elif name == b"content-length":
                lengths.append(value)
            elif name == b"transfer-encoding":
                codings.append(value)
        if hosts > 1:
            return 400, "more than one Host field"
        if hosts == 0 and version == b"HTTP/1.1":
            return 400, "no Host field in an HTTP/1.1 request"
        if codings and lengths:
            return 400, "both Content-Length and Transfer-Encoding"
        if len(lengths) > 1 or (lengths and not lengths[0].isdigit()):
            return 400, "invalid or repeated Content-Length"
        if codings:
            if b",".join(codings).lower() != b"chunked":
                return 501, "unsupported Transfer-Encoding (only one `chunked`)"
            self.state = _State.CHUNK_SIZE
        elif lengths and int(lengths[0]):
            self.left = int(lengths[0])
            self.state = _State.BODY
        return None

    # -- helpers --------------------------------------------------------------------------
    def _limit(self) -> int:
        return self.line_limit if self.state is _State.HEAD else _CHUNK_LINE_LIMIT

    def _too_long(self, offset: int) -> Tuple[int, Violation]:
        self.line.clear()
        if self.state is _State.HEAD:
            # Longer than max_request_line + max_header_size: over one of them whatever the
            # line is (the parser, which counts neither whitespace nor the method, could take
            # it).
            if not self.head:
                return self._stop(offset, (414, "request line too long"))
            return self._stop(offset, (431, "header field line too long"))
        return self._stop(offset, (400, "%s too long" % self.state.value))

    def _stop(self, offset: int, violation: Violation) -> Tuple[int, Violation]:
        self.done = True
        return offset, violation
