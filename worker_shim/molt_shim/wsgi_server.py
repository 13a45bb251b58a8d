"""Threaded HTTP/1.1 WSGI server on inherited listening sockets.

Architecture (the leader/followers pattern on one epoll):

* `threads` serving threads share one epoll. Whichever thread takes an event does the whole
  job: accept, or read, parse with httptools, run the app and write the response. There is
  no hand-off between threads on the request path. Only one idle thread sleeps in epoll at a
  time (`poll_lock`), and a thread that just finished takes waiting work without sleeping.
* Connections are registered EPOLLONESHOT: one readiness event goes to one thread, which owns
  the connection until it parks it again (re-arms the fd). Parked connections sit in `parked`;
  taking one is `parked.pop(fd)`, a single atomic dict operation, which is what lets serving
  threads and the sweeper race for a connection without locks.
* Listeners are EPOLLEXCLUSIVE: a new connection wakes one worker process that has a thread
  waiting, not every worker process, and a worker whose threads are all busy is skipped.
* The main thread never touches a request. It sends heartbeats, reads the master channel,
  closes idle connections (the sweep) and runs the drain.
* Request bodies are buffered before the app runs (in memory up to body_buffer_size, then a
  temporary file), so wsgi.input never blocks and never reads past the body.
* A client that asked to close gets a plain close() after its response. Closes the server
  chooses (drain, errors, keep-alive timeout) are shutdown(SHUT_WR) plus a read-discard until
  the peer's FIN (LINGER), so a request already on the wire never meets a reset.
"""
from __future__ import annotations

import io
import logging
import os
import select
import socket
import stat
import sys
import tempfile
import threading
import time
from collections import deque
from typing import Any, Callable, Deque, Dict, List, Optional, Set, Tuple
from urllib.parse import unquote_to_bytes

from . import httpparse
from .listening import DRAIN_BACKLOG_MAX, EPOLLEXCLUSIVE, out_of_resources
from .httpdate import http_date
from .stats import Stats

log = logging.getLogger("molt_shim")

IDLE, BUSY, LINGER, CLOSED = 0, 1, 2, 3
EV_ARM = select.EPOLLIN | select.EPOLLONESHOT
EV_LISTEN = select.EPOLLIN | EPOLLEXCLUSIVE
RECV_SIZE = 65536
LINGER_S = 2.0  # how long a closing connection is read-discarded before the final close()
SWEEP_S = 0.1
WRITE_TIMEOUT_S = 60.0
SMALL_BODY = 256 * 1024  # below this, head and body go out in one send()

REASONS = {
    400: "Bad Request", 408: "Request Timeout", 413: "Payload Too Large", 414: "URI Too Long",
    431: "Request Header Fields Too Large", 500: "Internal Server Error", 501: "Not Implemented",
}
CONTINUE_100 = b"HTTP/1.1 100 Continue\r\n\r\n"
HOP_BY_HOP = frozenset(("connection", "transfer-encoding", "keep-alive", "upgrade",
                        "proxy-connection", "te", "trailer"))


class HttpError(Exception):
    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


class ClientGone(Exception):
    """The peer went away (reset, broken pipe or write timeout) while we were answering."""


_date = [0, ""]


def date_header() -> str:
    now = int(time.time())
    if now != _date[0]:
        _date[1] = "Date: %s\r\n" % http_date(now)
        _date[0] = now
    return _date[1]


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


class Connection:
    """One client connection; also the httptools callback target."""

    __slots__ = ("server", "sock", "fd", "peer", "listener", "parser", "ready", "cur", "error",
                 "state", "idle_since", "head_started", "linger_until", "must_close",
                 "in_epoll", "warmup", "_env", "continue_sent", "served")

    def __init__(self, server: "WSGIServer", sock: socket.socket, peer: Any,
                 listener: "Listener") -> None:
        self.server = server
        self.sock = sock
        self.fd = sock.fileno()
        self.peer = peer
        self.listener = listener
        self.parser = httpparse.make_parser(self)
        self.ready: Deque[Request] = deque()
        self.cur: Optional[Request] = None
        self.error: Optional[Tuple[int, str]] = None
        self.state = IDLE
        self.idle_since = time.monotonic()
        self.head_started = 0.0
        self.linger_until = 0.0
        self.must_close = False
        self.in_epoll = False
        self.warmup = False
        self._env: Optional[Dict[str, Any]] = None
        self.continue_sent = False
        self.served = 0

    # -- environ shared by every request of this connection ------------------------------------
    def base_env(self) -> Dict[str, Any]:
        env = self._env
        if env is None:
            env = dict(self.listener.env)
            peer = self.peer
            if isinstance(peer, tuple):
                env["REMOTE_ADDR"] = str(peer[0])
                env["REMOTE_PORT"] = str(peer[1])
            else:  # AF_UNIX: the peer's path, usually "" for an unbound client socket
                env["REMOTE_ADDR"] = peer.decode("latin-1") if isinstance(peer, bytes) else str(peer or "")
                env["REMOTE_PORT"] = ""
            self._env = env
        return env

    def remote(self) -> str:
        peer = self.peer
        if isinstance(peer, tuple):
            return "%s:%s" % (peer[0], peer[1])
        return "unix:%s" % (peer or "")

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
        if len(req.url) > self.server.max_request_line:
            self._fail(414, "request line longer than %d bytes" % self.server.max_request_line)

    def on_header(self, name: bytes, value: bytes) -> None:
        req = self.cur
        if req is None:
            return
        srv = self.server
        req.nheaders += 1
        req.head_size += len(name) + len(value) + 4
        if req.nheaders > srv.max_headers:
            self._fail(431, "more than %d header fields" % srv.max_headers)
        if req.head_size > srv.max_header_size:
            self._fail(431, "header section larger than %d bytes" % srv.max_header_size)
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
        req.keep_alive = parser.should_keep_alive()
        req.head_done = True
        req.started = time.monotonic()
        self.head_started = 0.0
        limit = self.server.max_body_size
        if limit and req.content_length is not None and req.content_length > limit:
            self._fail(413, "Content-Length %d exceeds max_body_size %d" % (req.content_length, limit))

    def on_body(self, body: bytes) -> None:
        req = self.cur
        if req is None:
            return
        srv = self.server
        req.body_len += len(body)
        if srv.max_body_size and req.body_len > srv.max_body_size:
            self._fail(413, "body exceeds max_body_size %d" % srv.max_body_size)
        if req.spool is not None:
            req.spool.write(body)
        elif req.chunks is None:
            req.chunks = [body]
        else:
            req.chunks.append(body)
        if req.spool is None and req.body_len > srv.body_buffer_size:
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

    # -- socket I/O (the socket is non-blocking; waits use poll with a deadline) ----------------
    def feed(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httpparse.ParserUpgrade:
            # WSGI cannot take over the socket: answer the request, then close.
            self.must_close = True
        except httpparse.ParserError as exc:
            if self.error is None:
                self.error = (httpparse.status_of(exc) or 400, "malformed request: %s" % exc)
        except HttpError:
            pass

    def wait(self, events: int, timeout: float) -> bool:
        poller = select.poll()
        poller.register(self.fd, events)
        return bool(poller.poll(timeout * 1000.0))

    def send_all(self, data: bytes) -> None:
        sock = self.sock
        try:
            sent = sock.send(data)
            if sent == len(data):
                return
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError as exc:
            raise ClientGone(str(exc)) from None
        view = memoryview(data)[sent:]
        deadline = time.monotonic() + WRITE_TIMEOUT_S
        while view:
            if not self.wait(select.POLLOUT, deadline - time.monotonic()):
                raise ClientGone("write timed out")
            try:
                view = view[sock.send(view):]
            except (BlockingIOError, InterruptedError):
                pass
            except OSError as exc:
                raise ClientGone(str(exc)) from None

    def recv_wait(self, timeout: float) -> Optional[bytes]:
        """Blocking-with-deadline recv for request bodies; None on timeout."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                return self.sock.recv(RECV_SIZE)
            except (BlockingIOError, InterruptedError):
                pass
            except OSError:
                return b""  # reset by the peer: same outcome as EOF for a request body
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not self.wait(select.POLLIN, remaining):
                return None


class Listener:
    __slots__ = ("sock", "fd", "name", "env", "is_tcp")

    def __init__(self, sock: socket.socket, name: str, base: Dict[str, Any]) -> None:
        self.sock = sock
        self.fd = sock.fileno()
        self.name = name
        self.is_tcp = sock.family in (socket.AF_INET, socket.AF_INET6)
        env = dict(base)
        if self.is_tcp:
            addr = sock.getsockname()
            env["SERVER_NAME"] = str(addr[0])
            env["SERVER_PORT"] = str(addr[1])
        else:
            env["SERVER_NAME"] = "localhost"
            env["SERVER_PORT"] = "80"
        self.env = env


class Exchange:
    """One request/response: start_response, write() and the response framing."""

    __slots__ = ("server", "conn", "req", "status", "code", "header_block", "content_length",
                 "app_close", "headers_sent", "chunked", "no_body", "remaining", "keep_alive",
                 "bytes_sent")

    def __init__(self, server: "WSGIServer", conn: Connection, req: Request) -> None:
        self.server = server
        self.conn = conn
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
        self.keep_alive = req.keep_alive and not conn.must_close
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
        if (type(status) is not str or len(status) < 4 or not status[:3].isdigit()
                or status[3] != " " or "\r" in status or "\n" in status):
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
        srv = self.server
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
        if self.app_close or srv.draining or srv.keepalive <= 0:
            self.keep_alive = False
        if not self.keep_alive:
            extra += "Connection: close\r\n"
        elif self.req.version == "1.0":
            extra += "Connection: keep-alive\r\n"
        line = srv.status_lines.get(self.status)
        if line is None:
            line = ("HTTP/1.1 %s\r\n" % self.status).encode("latin-1")
            if len(srv.status_lines) < 256:
                srv.status_lines[self.status] = line
        self.headers_sent = True
        return line + (self.header_block + extra + date_header() + srv.version_header
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
            self.conn.send_all(head + body if len(body) < SMALL_BODY else head)
            if len(body) >= SMALL_BODY:
                self.conn.send_all(body)
        elif data:
            body = self._frame(data)
            if body:
                self.conn.send_all(body)

    def finish_single(self, data: bytes) -> None:
        """Fast path for a one-element list: one send with an exact Content-Length."""
        if type(data) is not bytes:
            self.write(data)
            self.finish()
            return
        head = self._head(len(data))
        body = self._frame(data)
        if len(body) < SMALL_BODY:
            self.conn.send_all(head + body)
        else:
            self.conn.send_all(head)
            self.conn.send_all(body)
        self._check_length()

    def finish(self) -> None:
        if not self.headers_sent:
            self.conn.send_all(self._head(0))
        elif self.chunked:
            self.conn.send_all(b"0\r\n\r\n")
        self._check_length()

    def _check_length(self) -> None:
        if self.remaining > 0 and not self.no_body:
            log.warning("%s %s: app sent %d bytes less than its Content-Length; closing",
                        self.req.method, self.req.url[:200].decode("latin-1"), self.remaining)
            self.keep_alive = False

    def send_file(self, wrapper: FileWrapper) -> bool:
        """sendfile() a regular file; False means 'not possible, iterate instead'."""
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
        self.conn.send_all(head)
        if self.no_body:
            return True
        self.remaining = self.content_length - size if self.content_length is not None else -1
        sock = self.conn.sock
        deadline = time.monotonic() + WRITE_TIMEOUT_S
        while size > 0:
            try:
                sent = os.sendfile(sock.fileno(), fd, offset, min(size, 1 << 30))
            except (BlockingIOError, InterruptedError):
                if not self.conn.wait(select.POLLOUT, deadline - time.monotonic()):
                    raise ClientGone("write timed out")
                continue
            except OSError as exc:
                raise ClientGone(str(exc)) from None
            if sent == 0:
                break  # file shrank under us
            offset += sent
            size -= sent
            self.bytes_sent += sent
            deadline = time.monotonic() + WRITE_TIMEOUT_S
        if size > 0:
            self.keep_alive = False
        self._check_length()
        return True


class WSGIServer:
    def __init__(self, app: Callable[..., Any], cfg: Any, channel: Any, stats: Stats,
                 listeners: List[Tuple[socket.socket, str]], access_log: Any = None) -> None:
        self.app = app
        self.cfg = cfg
        self.channel = channel
        self.stats = stats
        self.access_log = access_log
        http = cfg.http
        self.max_request_line = int(http["max_request_line"])
        self.max_header_size = int(http["max_header_size"])
        self.max_headers = int(http["max_headers"])
        self.max_body_size = int(http["max_body_size"] or 0)
        self.body_buffer_size = int(http["body_buffer_size"])
        self.header_timeout = cfg.header_timeout_s
        self.keepalive = max(0.0, cfg.timeout_s("keepalive"))
        self.version_header = ("%s: %s\r\n" % (cfg.version_header, cfg.version)
                               if cfg.version_header else "")
        self.status_lines: Dict[str, bytes] = {}
        self.threads = max(1, cfg.threads)
        script_name = os.environ.get("SCRIPT_NAME", "").rstrip("/")
        self.script_name = script_name
        base = {
            "SCRIPT_NAME": script_name,
            "wsgi.version": (1, 0),
            "wsgi.url_scheme": "http",
            "wsgi.errors": sys.stderr,
            "wsgi.multithread": self.threads > 1,
            "wsgi.multiprocess": True,
            "wsgi.run_once": False,
            "wsgi.file_wrapper": FileWrapper,
            "wsgi.input_terminated": True,
            "SERVER_SOFTWARE": "molt",
        }
        self.base_env = base
        self.listeners = [Listener(sock, name, base) for sock, name in listeners]
        self.listener_fds: Dict[int, Listener] = {}  # filled when serving starts (after READY)
        self.listen_lock = threading.Lock()  # listener (re-)registration against the drain
        self.rejoin_failed: Set[Listener] = set()  # listeners the sweep must register again
        # At most one serving thread sleeps in epoll_wait; the other idle ones sleep on this
        # lock. epoll wakes its sleepers in FIFO order, so with every idle thread in epoll_wait
        # each event would wake a different, cold thread (and then fight for the GIL); measured
        # with 4 threads: 0.74 context switches per request, against 0.34 with the lock, and
        # 25% more requests/s. A thread that finishes a request first takes any event already
        # waiting (poll with timeout 0), so under load it goes from request to request
        # without sleeping. An idle thread is always polling, so a slow app call never keeps
        # other connections waiting while a thread is free.
        self.poll_lock = threading.Lock()
        # Every open connection, and the parked subset: the ones no thread owns, waiting in
        # epoll for a request (IDLE) or for the peer's FIN (LINGER). A thread takes a parked
        # connection with parked.pop(fd): one atomic dict operation, so exactly one of the
        # serving threads and the sweeper can win it.
        self.conns: Dict[int, Connection] = {}
        self.parked: Dict[int, Connection] = {}
        self.ep = select.epoll()  # the serving threads' shared epoll
        self.draining = False
        self.drain_deadline = 0.0
        self.wake_r, self.wake_w = os.pipe()  # wakes the main loop (signals, drain)
        self.stop_r, self.stop_w = os.pipe()  # level-triggered: once written, stops every thread
        for fd in (self.wake_r, self.wake_w, self.stop_r, self.stop_w):
            os.set_blocking(fd, False)
        self.ep.register(self.stop_r, select.EPOLLIN)
        self.on_drain: Callable[[], None] = lambda: None
        self._threads: List[threading.Thread] = []
        self._accept_error_logged = 0.0

    # -- serving threads ------------------------------------------------------------------------
    def start_pool(self) -> None:
        for i in range(self.threads):
            t = threading.Thread(target=self._thread_main, name="molt-http-%d" % i, daemon=True)
            t.start()
            self._threads.append(t)

    def _thread_main(self) -> None:
        """One serving thread: wait on the shared epoll, serve what it hands over, repeat.

        The thread that epoll wakes is the one that reads, runs the app and writes: no
        hand-off between threads on the request path. Connections are EPOLLONESHOT, so one
        readiness event goes to one thread; listeners are EPOLLEXCLUSIVE, so a new connection
        wakes a worker process that has a thread free, not every worker process.
        """
        poll = self.ep.poll
        poll_lock = self.poll_lock
        parked = self.parked
        listener_fds = self.listener_fds
        stop_r = self.stop_r
        while True:
            try:
                # Take work that is already waiting without sleeping; sleep in epoll only
                # as the one poller of this process (see poll_lock).
                events = poll(0, 1)
                if not events:
                    with poll_lock:
                        events = poll(-1, 1)
            except InterruptedError:
                continue
            for fd, _ in events:
                conn = parked.pop(fd, None)
                try:
                    if conn is not None:
                        if conn.state == LINGER:
                            self._discard(conn)
                        else:
                            conn.state = BUSY
                            self.serve(conn)
                    elif fd == stop_r:
                        return
                    else:
                        lst = listener_fds.get(fd)
                        if lst is not None:
                            self._accept(lst)
                    # else: a stale event for a connection the sweeper took; nothing to do
                except BaseException:  # a bug here must not kill the serving thread
                    log.exception("internal error while serving %s",
                                  conn.remote() if conn is not None else "a new connection")
                    if conn is not None:
                        self.close_now(conn)

    # -- per connection (the thread that owns it) ------------------------------------------------
    def serve(self, conn: Connection, must_read: bool = True) -> None:
        """Read, run the app, write, until the connection would block; then park it.

        Called when epoll reported the socket readable, so the first recv() is expected to
        return data (`must_read=False`: the caller has fed the first bytes already); after
        a response, with nothing buffered, the connection is parked at once instead of
        spending a recv() that would say EAGAIN.
        """
        sock = conn.sock
        while True:
            while conn.ready:
                req = conn.ready.popleft()
                if not self.handle(conn, req):
                    if not req.keep_alive and not conn.ready and conn.cur is None:
                        # The client asked to close and sent nothing more we have seen: a
                        # plain close, as every server does. Closes of our own choosing
                        # (drain, errors) linger instead, so no request in flight gets a reset.
                        self.close_now(conn)
                    else:
                        self.close_graceful(conn)
                    return
                must_read = False
            if conn.error is not None:
                self.send_error(conn, *conn.error)
                return
            if conn.must_close:
                self.close_graceful(conn)
                return
            cur = conn.cur
            if cur is not None and cur.head_done:
                # Inside a request body: read with a deadline (the app runs on the whole body).
                if cur.expect_continue and not conn.continue_sent:
                    conn.continue_sent = True
                    try:
                        conn.send_all(CONTINUE_100)
                    except ClientGone:
                        self.close_now(conn)
                        return
                data = conn.recv_wait(self.header_timeout)
                if data is None:
                    self.send_error(conn, 408, "request body not received within %.1fs"
                                    % self.header_timeout)
                    return
            elif cur is None and not must_read:
                self.park(conn)
                return
            else:
                must_read = False
                try:
                    data = sock.recv(RECV_SIZE)
                except (BlockingIOError, InterruptedError):
                    self.park(conn)
                    return
                except OSError as exc:
                    log.info("%s: connection error: %s", conn.remote(), exc)
                    self.close_now(conn)
                    return
            if not data:
                if cur is not None and cur.head_done:
                    want = cur.content_length if cur.content_length is not None else "chunked"
                    log.warning("%s: client closed the connection with an incomplete request body "
                                "(%d of %s bytes); app not called", conn.remote(), cur.body_len, want)
                elif cur is not None:
                    log.info("%s: client closed the connection inside a request head", conn.remote())
                self.close_now(conn)
                return
            conn.feed(data)

    def park(self, conn: Connection, state: int = IDLE, restart_clock: bool = True) -> None:
        """Give a connection back to epoll (one-shot), to be taken by the next event.
        `restart_clock=False` keeps its idle and linger timers (the sweep giving it back)."""
        conn.state = state
        if restart_clock:
            now = time.monotonic()
            conn.idle_since = now
            if state == LINGER:
                conn.linger_until = now + LINGER_S
        fd = conn.fd
        self.parked[fd] = conn  # before arming: the event may fire at once
        try:
            self._arm(conn)
        except OSError:
            # Failing to arm means the fd is gone (another owner closed it) or the kernel is
            # out of memory. Close it if it is still ours; never take a newer connection
            # that reused the fd number.
            taken = self.parked.pop(fd, None)
            if taken is conn:
                self.close_now(conn)
            elif taken is not None:
                self.parked[fd] = taken

    def _arm(self, conn: Connection) -> None:
        """Arm the connection's one-shot registration, adding it on first use.

        `in_epoll` is only a hint: epoll_ctl releases the GIL, so another thread can take the
        connection (its event fires) and park it again before this one has recorded that it
        added it. Either way round, the fallback makes both callers end up armed."""
        fd = conn.fd
        try:
            if conn.in_epoll:
                self.ep.modify(fd, EV_ARM)
            else:
                self.ep.register(fd, EV_ARM)
        except FileNotFoundError:
            self.ep.register(fd, EV_ARM)
        except FileExistsError:
            self.ep.modify(fd, EV_ARM)
        conn.in_epoll = True

    def close_graceful(self, conn: Connection) -> None:
        """shutdown(SHUT_WR), then read-discard until the peer closes, so no RST is sent."""
        try:
            conn.sock.shutdown(socket.SHUT_WR)
        except OSError:
            self.close_now(conn)
            return
        self.park(conn, LINGER)

    def close_now(self, conn: Connection) -> None:
        if conn.state == CLOSED:
            return
        conn.state = CLOSED
        fd = conn.fd
        # The fd number is ours until close(): forget it everywhere first.
        self.conns.pop(fd, None)
        if self.parked.get(fd) is conn:
            self.parked.pop(fd, None)
        if conn.in_epoll:
            try:
                self.ep.unregister(fd)
            except (OSError, ValueError):
                pass
        if conn.cur is not None and conn.cur.spool is not None:
            conn.cur.spool.close()
        conn.parser = None  # break the parser <-> connection cycle now, not at GC time
        try:
            conn.sock.close()
        except OSError:
            pass

    def send_error(self, conn: Connection, status: int, reason: str,
                   blocking: bool = True) -> None:
        """Answer with an error status and close. `blocking=False` (the main loop) makes one
        send attempt only: a client that does not read must not stall heartbeats."""
        log.warning("%s: %d %s: %s", conn.remote(), status, REASONS.get(status, ""), reason)
        body = ("%d %s\n" % (status, REASONS.get(status, "Error"))).encode()
        head = ("HTTP/1.1 %d %s\r\nContent-Type: text/plain; charset=utf-8\r\n"
                "Content-Length: %d\r\nConnection: close\r\n%s%s\r\n"
                % (status, REASONS.get(status, "Error"), len(body), date_header(),
                   self.version_header)).encode("latin-1")
        try:
            if blocking:
                conn.send_all(head + body)
            else:
                conn.sock.send(head + body)
        except ClientGone:
            self.close_now(conn)
            return
        except OSError:
            pass  # best effort from the loop; the close below still happens
        self.close_graceful(conn)

    # -- one request ----------------------------------------------------------------------------
    def environ(self, conn: Connection, req: Request) -> Dict[str, Any]:
        env = conn.base_env().copy()
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
        script = self.script_name
        if script and (path_info == script or path_info.startswith(script + "/")):
            path_info = path_info[len(script):]
        env["REQUEST_METHOD"] = req.method
        env["PATH_INFO"] = path_info
        env["QUERY_STRING"] = query.decode("latin-1")
        env["RAW_URI"] = url.decode("latin-1")
        env["SERVER_PROTOCOL"] = "HTTP/" + req.version
        env["wsgi.input"] = req.wsgi_input()
        return env

    def handle(self, conn: Connection, req: Request) -> bool:
        """Run the app for one request; returns whether the connection stays open."""
        stats = self.stats
        token = stats.begin(req.started) if not conn.warmup else 0
        ex = Exchange(self, conn, req)
        result: Any = None
        try:
            result = self.app(self.environ(conn, req), ex.start_response)
            if ((type(result) is list or type(result) is tuple) and len(result) == 1
                    and not ex.headers_sent):
                ex.finish_single(result[0])
            elif isinstance(result, FileWrapper) and ex.status is not None and ex.send_file(result):
                pass
            else:
                for chunk in result:
                    if chunk:
                        ex.write(chunk)
                ex.finish()
        except ClientGone as exc:
            log.info("%s: client disconnected during the response to %s %s: %s", conn.remote(),
                     req.method, req.url[:200].decode("latin-1"), exc)
            ex.keep_alive = False
            ex.code = ex.code or 499
        except Exception:
            log.exception("%s: error in the application handling %s %s", conn.remote(),
                          req.method, req.url[:200].decode("latin-1"))
            ex.keep_alive = False
            if not ex.headers_sent:
                self._internal_error(conn, ex)
        finally:
            if result is not None and hasattr(result, "close"):
                try:
                    result.close()
                except Exception:
                    log.exception("error in close() of the application's response")
            if req.spool is not None:
                req.spool.close()
            if not conn.warmup:
                stats.end(token)
            if self.access_log is not None:
                self.access_log.put((conn.remote(), req.method, req.url.decode("latin-1"),
                                     "HTTP/" + req.version, ex.code, ex.bytes_sent,
                                     (time.monotonic() - req.started) * 1000.0))
        conn.served += 1
        return ex.keep_alive

    def _internal_error(self, conn: Connection, ex: Exchange) -> None:
        ex.code = 500
        body = b"500 Internal Server Error\n"
        head = ("HTTP/1.1 500 Internal Server Error\r\nContent-Type: text/plain; charset=utf-8\r\n"
                "Content-Length: %d\r\nConnection: close\r\n%s%s\r\n"
                % (len(body), date_header(), self.version_header)).encode("latin-1")
        try:
            conn.send_all(head + body)
        except ClientGone:
            pass

    # -- warm-up: a real connection, through the same code path -----------------------------------
    def adopt(self, sock: socket.socket) -> Connection:
        sock.setblocking(False)
        listener = self.listeners[0] if self.listeners else Listener(sock, "warmup", self.base_env)
        conn = Connection(self, sock, "", listener)
        conn.warmup = True
        return conn

    def submit(self, conn: Connection) -> None:
        """Hand a connection to the serving threads (the warm-up's socketpair)."""
        self.conns[conn.fd] = conn
        self.park(conn)

    # -- main loop ----------------------------------------------------------------------------
    def wake(self) -> None:
        try:
            os.write(self.wake_w, b"x")
        except OSError:
            pass

    def run(self, on_tick: Callable[[float], None], on_channel: Callable[[], None]) -> None:
        """Serve until drained. The main thread never touches a request: it opens the
        listeners to the serving threads, then sends heartbeats (`on_tick`), reads the master
        (`on_channel`), closes idle connections and runs the drain."""
        with self.listen_lock:
            for lst in self.listeners:
                lst.sock.setblocking(False)
                self.listener_fds[lst.fd] = lst
                self.ep.register(lst.fd, EV_LISTEN)
        ep = select.epoll()
        ep.register(self.wake_r, select.EPOLLIN)
        chan_fd = self.channel.fileno()
        if chan_fd >= 0:
            ep.register(chan_fd, select.EPOLLIN)
        self.main_ep = ep
        next_sweep = time.monotonic() + SWEEP_S
        while True:
            try:
                # With no connection and no drain there is nothing to sweep: an idle worker
                # wakes only to heartbeat, not ten times a second.
                idle = not self.conns and not self.draining
                events = ep.poll(self.cfg.heartbeat_interval_s if idle else SWEEP_S)
            except InterruptedError:
                events = []
            for fd, _ in events:
                if fd == self.wake_r:
                    try:
                        os.read(self.wake_r, 4096)
                    except OSError:
                        pass
                elif fd == chan_fd:
                    on_channel()
            now = time.monotonic()
            on_tick(now)
            if now >= next_sweep:
                next_sweep = now + SWEEP_S
                self._sweep(now)
            # Checked on every wake-up while draining, so a worker with nothing left exits
            # as soon as the drain starts, not at the next sweep (and the rollover that
            # waits for it completes that much sooner).
            if self.draining and self._drained(now):
                break
        self._shutdown_pool()
        ep.close()

    def forget_channel(self) -> None:
        """The master's end closed: stop polling the channel."""
        try:
            self.main_ep.unregister(self.channel.fileno())
        except (AttributeError, OSError, ValueError):
            pass

    def _accept(self, lst: Listener) -> None:
        """Take one connection (a serving thread) and serve it right away: the request has
        usually arrived with it.

        With EPOLLEXCLUSIVE the kernel wakes the first worker in the socket's wait queue that
        has a thread waiting, and that order never changes by itself: the first worker would
        take every connection its threads keep up with, and keep-alive connections would
        pile onto one or two processes for their whole life. So a worker leaves the queue to
        accept (one thread at a time) and joins again at the back: new connections go
        round-robin over the workers that have a thread free."""
        left = False
        conn: Optional[Connection] = None
        first: Optional[bytes] = None
        try:
            # Under listen_lock, so a drain starting now waits until the connection is
            # counted in `conns` (and is then answered, not dropped at exit).
            with self.listen_lock:
                if self.listener_fds.get(lst.fd) is not lst:
                    return  # closed by the drain
                try:
                    self.ep.unregister(lst.fd)
                except FileNotFoundError:
                    return  # another thread of this worker is accepting
                left = True  # from here on, every path rejoins (finally)
                try:
                    sock, peer = lst.sock.accept()
                except (BlockingIOError, InterruptedError):
                    return
                except OSError as exc:
                    error: Optional[OSError] = exc
                else:
                    error = None
                    try:
                        sock.setblocking(False)  # TCP_NODELAY comes from the listener
                        conn = Connection(self, sock, peer, lst)
                    except BaseException:
                        sock.close()
                        raise
                    conn.state = BUSY
                    self.conns[conn.fd] = conn
            if error is not None:
                self._accept_failed(lst, error)  # backs off while out of the queue
                return
            assert conn is not None
            try:
                first = conn.sock.recv(RECV_SIZE)
            except (BlockingIOError, InterruptedError):
                first = None
            except OSError:
                first = b""
        except BaseException:
            if conn is not None:
                self.close_now(conn)
            raise
        finally:
            # Back in the queue once the first bytes are read, before the app runs: a slow
            # first request must not stop this worker's other threads from accepting.
            if left:
                self._listen(lst, True)
        try:
            if first is None:
                self.park(conn)
            elif not first:
                self.close_now(conn)  # connected and left without a byte
            else:
                conn.feed(first)
                self.serve(conn, must_read=False)
        except BaseException:  # a bug, or SystemExit from the app: never leak the connection
            log.exception("internal error while serving %s", conn.remote())
            self.close_now(conn)

    def _accept_failed(self, lst: Listener, exc: OSError) -> None:
        if out_of_resources(exc):
            # Out of descriptors or memory: the listener stays readable, so back off
            # instead of spinning, and say so at most once a second.
            now = time.monotonic()
            if now - self._accept_error_logged > 1.0:
                self._accept_error_logged = now
                log.error("accept() on %s failed: %s", lst.name or lst.fd, exc)
            time.sleep(0.1)
        elif not self.draining:
            # ECONNABORTED and friends: that client is gone; the next one is fine.
            log.info("accept() on %s: %s", lst.name or lst.fd, exc)

    def _listen(self, lst: Listener, on: bool) -> bool:
        """Join or leave the listener's wake-up queue. Leaving returns False when another
        thread of this worker left first (it is accepting: one at a time per worker) or the
        listener is closed."""
        with self.listen_lock:
            if self.listener_fds.get(lst.fd) is not lst:
                return False
            try:
                if on:
                    self.ep.register(lst.fd, EV_LISTEN)
                    self.rejoin_failed.discard(lst)
                else:
                    self.ep.unregister(lst.fd)
            except FileExistsError:
                pass
            except FileNotFoundError:
                return False
            except OSError as exc:  # ENOMEM/ENOSPC: the sweep tries again
                if lst not in self.rejoin_failed:
                    log.error("listening on %s again failed (retrying): %s",
                              lst.name or lst.fd, exc)
                self.rejoin_failed.add(lst)
            return True

    def _discard(self, conn: Connection) -> None:
        """A lingering connection is readable: drop what the peer sends, close on its FIN."""
        for _ in range(16):
            try:
                if not conn.sock.recv(RECV_SIZE):
                    break
            except (BlockingIOError, InterruptedError):
                self.park(conn, LINGER, restart_clock=False)
                return
            except OSError:
                break
        self.close_now(conn)

    @staticmethod
    def _request_waiting(conn: Connection) -> bool:
        """Whether the client already sent its next request. Closing such an "idle" connection
        would lose that request (the keep-alive race every HTTP/1.1 server has); with this
        check the window shrinks to bytes still on the wire. The pending epoll event then
        delivers the request as usual."""
        try:
            return bool(conn.sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT))
        except OSError:  # nothing there (EAGAIN), or the connection is broken: close it
            return False

    def _take(self, conn: Connection) -> bool:
        """Claim a parked connection for the sweeper; False when a serving thread got it."""
        return self.parked.pop(conn.fd, None) is conn

    def _overdue(self, conn: Connection, now: float) -> str:
        """What the sweep owes a parked connection: "" (nothing), "408", "idle" or "linger"."""
        state = conn.state
        if state == LINGER:
            return "linger" if now >= conn.linger_until else ""
        if state != IDLE:
            return ""
        if conn.head_started:
            return "408" if now - conn.head_started > self.header_timeout else ""
        # A connection that has not sent its first request yet gets the header timeout
        # (keepalive may be 0), except while draining.
        limit = self.cfg.drain_idle_s if self.draining else self.keepalive
        if not conn.served and not self.draining:
            limit = max(limit, self.header_timeout)
        return "idle" if now - conn.idle_since >= limit else ""

    def _sweep(self, now: float) -> None:
        for lst in list(self.rejoin_failed):
            self._listen(lst, True)
        for conn in list(self.parked.values()):
            # A first look without owning the connection, so its fields may be stale: a
            # serving thread can take it, serve a request and park it again in between.
            # So the verdict is taken again once the sweep owns it.
            if not self._overdue(conn, now) or not self._take(conn):
                continue
            verdict = self._overdue(conn, now)
            if verdict == "idle" and self._request_waiting(conn):
                verdict = ""
            if not verdict:
                self.park(conn, conn.state, restart_clock=False)  # back to epoll, re-armed
            elif verdict == "linger":
                self.close_now(conn)
            elif verdict == "408":
                conn.state = BUSY
                self.send_error(conn, 408, "request head not complete within %.1fs"
                                % self.header_timeout, blocking=False)
            else:
                conn.state = BUSY
                self.close_graceful(conn)

    # -- drain and stop ----------------------------------------------------------------------------
    def begin_drain(self, why: str) -> None:
        if self.draining:
            return
        self.draining = True
        self.drain_deadline = time.monotonic() + max(1.0, self.cfg.timeout_s("graceful"))
        # Stop accepting now. Closing our descriptor leaves the shared socket (and the
        # connections queued in it) to the other workers; shutdown() would break them all.
        with self.listen_lock:
            for lst in self.listeners:
                self.listener_fds.pop(lst.fd, None)
                try:
                    self.ep.unregister(lst.fd)
                except (OSError, ValueError):
                    pass
                self._take_backlog(lst)
                lst.sock.close()
        # Tell the master: from now on no new connection can reach this worker, so the
        # rollover can be reported done (`molt ctl reload --wait` returns).
        self.channel.send(STOPPING=1)
        log.info("draining (%s): %d connection(s), %d request(s) in flight", why,
                 len(self.conns), self.stats.inflight_count())
        self.on_drain()
        self.wake()

    def _take_backlog(self, lst: Listener) -> None:
        """Accept what is already queued before leaving the listener (bounded).

        With EPOLLEXCLUSIVE a new connection wakes one worker only. If that was this one and
        it drains before accepting, no other worker was told: the connection would wait in
        the shared queue until the next one arrives. Once unregistered, later arrivals wake
        the others; what came before is taken here and answered with Connection: close."""
        for _ in range(DRAIN_BACKLOG_MAX):
            try:
                sock, peer = lst.sock.accept()
            except OSError:  # EAGAIN: nothing queued (or a client already gone)
                return
            sock.setblocking(False)
            conn = Connection(self, sock, peer, lst)
            self.conns[conn.fd] = conn
            self.park(conn)

    def _drained(self, now: float) -> bool:
        if not self.conns and self.stats.inflight_count() == 0:
            return True
        if now >= self.drain_deadline:
            log.warning("graceful timeout: exiting with %d connection(s) open", len(self.conns))
            return True
        return False

    def _shutdown_pool(self) -> None:
        os.write(self.stop_w, b"x")  # level-triggered in the shared epoll: every thread sees it
        for conn in list(self.parked.values()):
            if self._take(conn):
                self.close_now(conn)
