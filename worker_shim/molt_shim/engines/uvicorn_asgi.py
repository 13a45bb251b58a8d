"""The ASGI engine ("uvicorn"): uvicorn's HTTP/WebSocket protocols under the lifecycle's loop.

We do not call uvicorn.Server.serve(): it installs its own signal handlers, and its shutdown
closes idle keep-alive connections abruptly (a client that just sent a request sees a reset).
Instead we reuse uvicorn's protocol classes and lifespan, and own:

* accepting: TCP listeners without PROXY or TLS by the extension's IoHub (its own accept,
  read and write under asyncio protocols; native/asgi_io.hpp), the rest by add_reader on the
  inherited sockets, or uvloop's server on a dup when the extension is missing,
* the drain: requests arriving on open connections get `Connection: close`, idle connections
  are closed after a short idle window, every close is shutdown(SHUT_WR) + read-discard,
* the counters (read off uvicorn's state at each tick) and the Date header tick.

Heartbeats, signals and the master channel are the lifecycle's (molt_shim/lifecycle.py); this
engine runs its hooks from the event loop, so a blocked loop stops the heartbeats, on purpose.
"""
from __future__ import annotations

import asyncio
import copy
import logging
import os
import select
import socket
import struct
import time
import weakref
from typing import Any, Dict, List, Optional, Tuple

from uvicorn.config import Config
from uvicorn.server import ServerState

from .. import warmup
from ..framing_guard import FramingGuard
from .. import proxyproto, tls
from ..forwarded import ProxyMiddleware
from .asgi_proxyproto import ProxyPreamble
from .asgi_cycle import head_pending, native_tasks, with_cycle
from ..wsgi.request import Limits
from ..wsgi.response import REASONS, Framing
from ..httpdate import http_date
from ..request_metrics import RequestMetrics
from ..listening import DRAIN_BACKLOG_MAX, EPOLLEXCLUSIVE, out_of_resources
from . import EngineUnavailable
from .base import Counters, EngineContext, LoopHooks

log = logging.getLogger("molt_shim")

LINGER_S = 2.0
UNMADE_MAX_S = 1.0  # connection_made() comes within a loop iteration, or never
DRAIN_TICK_S = 0.1  # how often a draining worker looks for idle connections to close
# The per-connection timeout checks (header_timeout, send_timeout, the first request's
# deadline) and the counters run at this tick: a timeout fires at most two ticks (200 ms) after
# its configured value, within the 10 % or 100 ms issue 18 asks for from 2 s up. Measured cost:
# one pass over the open connections' Python state, about 1 us each.
TICK_S = 0.1
CLOSE_HEADER = (b"connection", b"close")
WS_SERVICE_RESTART = 1012  # RFC 6455 close code for a drained WebSocket
ABANDON_WAIT_S = 0.25  # how long cancelled app tasks get to finish when a drain ran out


class DrainControl:
    def __init__(self, idle_window: float, header_timeout: float, keepalive: float,
                 limits: Limits, framing: Framing, send_timeout: float = 30.0) -> None:
        self.draining = False
        # http.send_timeout: a response whose client takes no bytes for this long is aborted.
        # A slow reader costs its transport's buffer (uvicorn pauses the app at the high-water
        # mark), never a thread; the timeout ends the request that would otherwise stay in
        # flight (and trip timeouts.request) for as long as the client keeps the connection.
        self.send_timeout = send_timeout
        # timeouts.keepalive 0: every response says Connection: close (as on the WSGI side).
        self.close_every_response = keepalive <= 0
        self.limits = limits
        self.framing = framing  # the WSGI side's error responses, byte for byte
        self.new_guard = guard_factory()
        # The server's own response headers, joined (the engine's update_date() sets them),
        # and whether they include `connection: close`.
        self.default_head = b""
        self.default_close = False
        self.unsent_heads: List[Any] = []  # asgi_cycle.Cycle whose head waits for its body
        # ASGI 2.3's lifespan state: the dict the lifespan scope carries (the app fills it at
        # startup); every request and WebSocket scope gets a shallow copy (complete_scope()).
        self.app_state: Dict[str, Any] = {}
        self.abandoning = False  # the drain ran out: the requests left are being cancelled
        self.warming = False
        # Protocols of accepted connections whose connection_made() has not run yet (asyncio
        # calls it on the next loop iteration; after a PROXY header or a TLS handshake, within
        # http.header_timeout): the drain is not done while there are any. The value is when
        # the protocol was made (or, behind a header or handshake, when that is due): a loop
        # that made a protocol and then failed to build its transport (uvloop's server under
        # EMFILE) never calls connection_made(), so an entry older than UNMADE_MAX_S is dropped
        # by the tick, not waited for.
        self.unmade: Dict[Any, float] = {}
        self.now = time.monotonic()  # the last tick's: when a protocol made now was made
        self.idle_window = idle_window
        self.header_timeout = header_timeout
        # A connection that has not sent a byte yet: its first head is due within
        # header_timeout of the accept, as in the WSGI engines (issue 18 point 9).
        self.first_request_timeout = header_timeout
        try:
            import h11

            self.h11_idle: Any = h11.IDLE
        except ImportError:  # no h11: uvicorn runs httptools only
            self.h11_idle = None

    def complete_scope(self, scope: Dict[str, Any], tls_extension: Any) -> None:
        """What molt adds to every request's and WebSocket's scope: the TLS extension of a TLS
        connection, and the lifespan's state, a copy, so what one request sets in it
        (Starlette's request.state) is not the next one's (nothing while it is empty)."""
        if tls_extension is not None:
            scope.setdefault("extensions", {})["tls"] = dict(tls_extension)
        if self.app_state:
            scope["state"] = self.app_state.copy()

    def flush_heads(self) -> None:
        """End of a loop iteration (call_soon): every response head still waiting for its
        first body message goes out alone."""
        cycles = self.unsent_heads
        self.unsent_heads = []
        for cycle in cycles:
            cycle.flush_head()


def guard_factory() -> Any:
    """The framing guard's constructor: the native extension's (the same rules in C++, under
    1 us per request) when it loads, else the Python one (5-10 us per request, measured: it
    reads each head line by line with regular expressions, on every byte a client sends).
    MOLT_SHIM_GUARD=python picks the Python one (the framing table runs both)."""
    from .native import load_extension

    if os.environ.get("MOLT_SHIM_GUARD") == "python":
        return FramingGuard
    module, _ = load_extension()
    return getattr(module, "framing_guard", None) or FramingGuard


class GracefulTransport:
    """Transport proxy whose close() lingers: shutdown(SHUT_WR), read-discard, then close.

    uvicorn closes connections with transport.close(); with unread request bytes in the
    kernel buffer that close would send an RST to the client. A client that asked to close
    (`Connection: close`) gets the plain close, like every server gives it: it sends nothing
    more, and the linger would cost a wake-up, a read and a timer per connection.
    """

    def __init__(self, transport: asyncio.Transport, protocol: Any) -> None:
        self._t = transport
        self._protocol = protocol
        self.closing = False
        # The per-request calls go straight to the transport, not through __getattr__.
        self.write = transport.write
        self.writelines = transport.writelines
        self.pause_reading = transport.pause_reading
        self.resume_reading = transport.resume_reading
        self.is_closing = transport.is_closing

    def __getattr__(self, name: str) -> Any:
        return getattr(self._t, name)

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        if name == "socket":
            return CachedAddresses(self._t)
        return self._t.get_extra_info(name, default)

    def close(self) -> None:
        if self.closing:
            return
        self.closing = True
        self.is_closing = _true
        t = self._t
        if t.is_closing():
            return
        if self._protocol.client_asked_close():
            t.close()
            return
        try:
            if not t.can_write_eof():
                t.close()
                return
            t.write_eof()  # asyncio sends the FIN after the write buffer is flushed
            # What arrives now is read and thrown away: no request is parsed, and none runs.
            # (Not by replacing the protocol's data_received: uvloop calls the method it
            # took when the connection was made.)
            self._protocol._rejected = True
            t.resume_reading()
        except Exception:
            t.close()
            return
        self._protocol.loop.call_later(LINGER_S, t.close)

    def abort(self) -> None:
        self.closing = True
        self.is_closing = _true
        self._t.abort()


class CachedAddresses:
    """What uvicorn asks the transport's `socket` for (its get_local_addr and get_remote_addr,
    once per connection, and again at a WebSocket upgrade): the addresses the transport read
    when the connection was made. uvloop's socket object would answer with five system calls
    per connection (it makes a Python socket over the fd for each question, and CPython's
    socket() checks the fd with getsockname()): measured, a third of the system calls of a
    `Connection: close` request."""

    __slots__ = ("_t",)

    def __init__(self, transport: Any) -> None:
        self._t = transport

    def getpeername(self) -> Any:
        return self._t.get_extra_info("peername")

    def getsockname(self) -> Any:
        return self._t.get_extra_info("sockname")


def completed_scope(ctl: DrainControl) -> property:
    """A protocol's `scope`, completed as it is set: uvicorn builds each scope itself (in its
    parser callbacks, after a WebSocket handshake: `self.scope = {...}`), and this is the one
    place to add what the connection knows and uvicorn does not (DrainControl.complete_scope).
    The protocol has `_tls_extension`."""
    def get(self: Any) -> Any:
        return self.__dict__.get("_molt_scope")

    def set_(self: Any, value: Any) -> None:
        if value is not None:
            ctl.complete_scope(value, self._tls_extension)
        self.__dict__["_molt_scope"] = value

    return property(get, set_)


def make_ws_protocol_class(base: Optional[type], ctl: DrainControl,
                           head: List[Tuple[str, str]]) -> Optional[type]:
    """uvicorn's WebSocket protocol (`base`, None without a WebSocket library) with what molt
    gives every scope and response: the TLS extension (a listener's verified client
    certificate), the lifespan's state, and molt's own headers (`head`: asgi.server_header
    and http.version_header) where the websockets library put `Server: Python/3.11
    websockets/10.4` on every handshake answer. uvicorn builds the scope itself, after the
    handshake: the property sees it as it is set, as MoltHTTPProtocol.scope does."""
    if base is None:
        return None
    server = next((value for name, value in head if name.lower() == "server"), None)
    extra = [(name, value) for name, value in head if name.lower() != "server"]

    class MoltWebSocketProtocol(base):  # type: ignore[misc, valid-type]
        _tls_extension: Any = None

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            if hasattr(self, "server_header"):  # the websockets library's handshake
                self.server_header = server
                self.extra_headers.extend(extra)

        def connection_made(self, transport: Any) -> None:
            ssl_object = transport.get_extra_info("ssl_object")
            if ssl_object is not None:
                self._tls_extension = tls.asgi_extension(ssl_object)
            super().connection_made(transport)

        def connection_lost(self, exc: Optional[Exception]) -> None:
            # uvicorn 0.17's wsproto protocol tells the app only of a connection lost with an
            # error: a client gone with a bare FIN (no close frame) left its receive()
            # waiting for ever, and every later drain until timeouts.graceful. 1006: closed
            # abnormally (RFC 6455 section 7.1.5), what the websockets library says too. (A
            # later uvicorn that queues one itself gets a second, which no app reads.)
            conn = getattr(self, "conn", None)  # wsproto's connection (websockets has none)
            if exc is None and conn is not None and getattr(conn.state, "name", "") in (
                    "CONNECTING", "OPEN"):
                self.queue.put_nowait({"type": "websocket.disconnect", "code": 1006})
            super().connection_lost(exc)

        scope = completed_scope(ctl)

    MoltWebSocketProtocol.__name__ = "Molt" + base.__name__
    return MoltWebSocketProtocol


def app_running(cycle: Any) -> bool:
    """Whether a request cycle's app has not returned yet (uvicorn sets on_response to None
    in run_asgi's `finally`; a cycle still queued behind a pipelined one counts too)."""
    return getattr(cycle, "on_response", None) is not None


def queued(protocol: Any, cycle: Any) -> bool:
    """Whether a cycle waits behind a pipelined one (its app has not started)."""
    return any(c is cycle for c, _ in getattr(protocol, "pipeline", ()))


def _true() -> bool:
    return True


def make_protocol_class(base: type, ctl: DrainControl) -> type:
    """uvicorn's HTTP protocol with molt's timeouts and drain, at no cost per request.

    Nothing here runs per request: the once-a-second tick (molt_check) and the drain tick
    (molt_drain) look at uvicorn's own per-connection state (`scope`, `cycle`, `pipeline`)
    and remember what they saw, so a head that stays incomplete, or a connection that stays
    idle, is noticed at tick resolution.
    """

    class MoltHTTPProtocol(base):  # type: ignore[misc, valid-type]
        _real_transport: Any = None
        _rejected = False  # answered with an error status, or closing: nothing more is parsed
        _upgraded = False  # the parser took the connection for an upgrade: its bytes are not HTTP
        _head_size = 0  # header bytes of the current request (name + value + 4, as WSGI)
        _body_size = 0  # body bytes of the current request
        _born = 0.0
        _head_mark: Any = None      # (scope, first seen) while a request head is incomplete
        _idle_mark: Any = None      # (cycle, first seen) while draining and idle
        _send_mark: Any = None      # (unsent bytes, since) while a response waits for its client
        _guard: Any = None          # molt's FramingGuard over every byte the client sends
        _tls_extension: Any = None  # scope["extensions"]["tls"] on a TLS connection
        guards_framing = False  # True: the parser runs the framing guard itself

        scope = completed_scope(ctl)

        @classmethod
        def bind(cls, config: Any, server_state: Any, loop: Any) -> None:
            """What uvicorn's __init__ copies into every connection, once, on the class: the
            protocol is then made with no arguments (uvloop's server calls the class)."""
            cls.config = config
            cls.app = staticmethod(config.loaded_app)  # a function: not a method of ours
            cls.loop = loop
            cls.ws_protocol_class = config.ws_protocol_class
            cls.root_path = config.root_path
            cls.limit_concurrency = config.limit_concurrency
            cls.timeout_keep_alive = config.timeout_keep_alive
            cls.server_state = server_state
            cls.connections = server_state.connections
            cls.tasks = server_state.tasks
            cls.default_headers = server_state.default_headers

        def __init__(self) -> None:
            super().__init__(config=self.config, server_state=self.server_state,
                             _loop=self.loop)
            ctl.unmade[self] = ctl.now

        def connection_made(self, transport: Any) -> None:
            super().connection_made(self.adopt_transport(transport))
            if ctl.draining:
                self.molt_drain(self._born)

        def adopt_transport(self, transport: Any) -> "GracefulTransport":
            """molt's part of connection_made(): the TLS extension, the clocks, the framing
            guard; returns the transport the protocol is to write to."""
            self._real_transport = transport
            ssl_object = transport.get_extra_info("ssl_object")
            if ssl_object is not None:
                self._tls_extension = tls.asgi_extension(ssl_object)
            self._born = time.monotonic()
            if not self.guards_framing:
                self._guard = ctl.new_guard(ctl.limits.max_request_line,
                                            ctl.limits.max_header_size)
            ctl.unmade.pop(self, None)
            return GracefulTransport(transport, self)

        def connection_lost(self, exc: Optional[Exception]) -> None:
            super().connection_lost(exc)
            self.break_cycles()

        def break_cycles(self) -> None:
            # Break the connection's reference cycles (protocol <-> parser, protocol <->
            # GracefulTransport), so that refcounting frees it when its last request ends
            # rather than the cycle collector: in close mode that collector ran a gen-1 pass
            # every ~300 connections, about 11 us per request in all (gc.callbacks). Neither
            # is used after the loss: the transport is closing, so close() returns before it
            # reads _protocol, and nothing feeds the parser any more.
            transport = self.transport
            if isinstance(transport, GracefulTransport):
                transport._protocol = None
            if getattr(self, "parser", None) is not None:
                self.parser = None

        def wake_cycle(self, cycle: Any) -> None:
            """receive() looks again (uvicorn's cycles wait on an asyncio.Event)."""
            cycle.message_event.set()

        def reject(self, status: int, reason: str) -> None:
            """Answer with the WSGI engine's error response for `status` and close."""
            self._rejected = True
            cycle = self.cycle
            if cycle is not None and cycle.scope is self.scope and not cycle.response_complete:
                # The app already runs (a streamed body went over the limit): it sees
                # http.disconnect, and what it sends from now on is dropped. (A complete
                # response is the request before, on a kept-alive connection: h11 keeps its
                # scope until the next head is whole, so the error is a new request's.)
                cycle.disconnected = True
                self.wake_cycle(cycle)
                if cycle.response_started:
                    self.log_rejected(status, reason)
                    self.transport.close()
                    return
            self.answer_error(status, reason)

        def answer_error(self, status: int, reason: str) -> None:
            self.log_rejected(status, reason)
            self.send_error_response(status)

        def send_error_response(self, status: int) -> None:
            if self.transport.is_closing():  # already closing (a response said close): the
                return                        # bytes that came after it are not answered
            self.transport.write(ctl.framing.error_response(status))
            self.transport.close()

        def log_rejected(self, status: int, reason: str) -> None:
            log.warning("%s: %d %s: %s", "%s:%s" % tuple(self.client) if self.client else "unix",
                        status, REASONS.get(status, ""), reason)

        def data_received(self, data: bytes) -> None:
            # molt's own framing check first (the WSGI engines run the same FramingGuard): the
            # parser sees only the bytes before the first violation, and the violation's 400
            # (505, 501) is the answer whatever httptools or h11 would make of the rest.
            if self._rejected:
                return
            violation = self._guard.scan(data)
            if violation is None:
                self.molt_parse(data)
                return
            offset, (status, reason) = violation
            if offset:
                self.molt_parse(data[:offset])
            # What the parser stopped at before the violation stands: its own rejection, or
            # an upgrade (the bytes after it are the new protocol's).
            if not self._rejected and not self._upgraded:
                self.reject(status, "malformed request: %s" % reason)

        def molt_parse(self, data: bytes) -> None:
            base.data_received(self, data)

        def handle_upgrade(self, *args: Any) -> None:
            # WebSockets take over the raw transport; our close semantics are for HTTP.
            self._upgraded = True
            self.transport = self._real_transport
            super().handle_upgrade(*args)

        # -- what the ticks read ---------------------------------------------------------
        def head_in_progress(self) -> bool:
            scope = self.scope
            if scope is not None:
                cycle = self.cycle
                if cycle is None or cycle.scope is not scope:
                    return True  # httptools: the head has begun, the cycle not yet
            # h11 sets scope and cycle together; a partial next head sits in h11's buffer.
            # Only between requests (IDLE): during a response h11 also holds a whole
            # pipelined request there, which is not a head in progress.
            h11_conn = getattr(self, "conn", None)
            return (h11_conn is not None and h11_conn.their_state is ctl.h11_idle
                    and bool(h11_conn.trailing_data[0]))

        def in_flight(self) -> bool:
            cycle = self.cycle
            return cycle is not None and not cycle.response_complete

        def client_asked_close(self) -> bool:
            cycle = self.cycle
            # The whole request body must be in: unread bytes at close() mean a reset.
            return (cycle is not None and cycle.scope is self.scope
                    and not cycle.more_body
                    and not getattr(self, "pipeline", None)  # the h11 protocol has none
                    and CLOSE_HEADER in cycle.scope["headers"])

        def molt_check(self, now: float) -> None:
            """Every tick (TICK_S): the request-head timeout (uvicorn 0.17 has none: slowloris),
            and a connection that never sends a byte (uvicorn arms its keep-alive timer only
            after a response)."""
            if self.transport is None:
                return
            # Before the closing check: a response still going out after close() (Connection:
            # close, HTTP/1.0, a drain, the keep-alive timeout) waits for its client too.
            if self._send_stalled(now) or self.transport.is_closing():
                return
            in_progress = self.head_in_progress()  # h11: also a first head, before any scope
            if self.scope is None and not in_progress:
                if now - self._born > ctl.first_request_timeout:
                    self.transport.close()
                return
            if not in_progress or self.in_flight():
                # A head is late only while the server waits for it: a pipelined head behind a
                # response still being made waits for the server, not the other way round.
                self._head_mark = None
                return
            mark = self._head_mark
            if mark is None or mark[0] is not self.scope:
                self._head_mark = (self.scope, now)
            elif now - mark[1] > ctl.header_timeout:
                self._head_timeout()

        def _send_stalled(self, now: float) -> bool:
            """http.send_timeout: True (and the connection aborted) once the bytes waiting in
            the transport have not moved for that long. uvicorn's send() awaits the drain
            whenever the buffer is above its high-water mark, so an unchanged size means the
            client took nothing."""
            unsent = self._real_transport.get_write_buffer_size()
            mark = self._send_mark
            if not unsent:
                self._send_mark = None
            elif mark is None or mark[0] != unsent:
                self._send_mark = (unsent, now)
            elif now - mark[1] >= ctl.send_timeout:
                log.info("%s: client disconnected during a response: the client took no "
                         "response bytes for %.1fs (http.send_timeout)",
                         "%s:%s" % tuple(self.client) if self.client else "unix",
                         ctl.send_timeout)
                self.transport.abort()
                return True
            return False

        def _head_timeout(self) -> None:
            log.warning("%s: 408 Request Timeout: request head not complete within %.1fs",
                        "%s:%s" % tuple(self.client) if self.client else "unix",
                        ctl.header_timeout)
            self.send_error_response(408)  # the same bytes as every engine's 408

        def molt_drain(self, now: float) -> None:
            """Called when the drain starts and on every drain tick."""
            # Responses not started yet answer with Connection: close: update_date() put it
            # into the default headers every connection and cycle shares.
            cycle = self.cycle
            if cycle is not None and not cycle.response_complete:
                cycle.keep_alive = False
                self._idle_mark = None
                return
            if self.head_in_progress() or getattr(self, "pipeline", None):
                self._idle_mark = None
                return
            mark = self._idle_mark
            if mark is None or mark[0] is not cycle:
                self._idle_mark = (cycle, now)  # idle from now on, unless a request comes
            elif now - mark[1] >= ctl.idle_window:
                self.transport.close()

    MoltHTTPProtocol.ctl = ctl
    if hasattr(base, "on_url"):  # httptools: molt's own request cycle (asgi_cycle.py)
        return with_cycle(MoltHTTPProtocol, ctl)
    if hasattr(base, "handle_events"):  # h11 (the fallback): on the events h11 hands over
        return _with_h11_limits(MoltHTTPProtocol, base, ctl)
    MoltHTTPProtocol.__name__ = "Molt" + base.__name__
    return MoltHTTPProtocol


class H11Limits:
    """The h11 connection of one uvicorn H11Protocol, seen through the http.* limits: the
    same rules and responses as _with_limits, checked on the events h11 returns. An event
    over a limit is answered by reject() and turned into NEED_DATA, so uvicorn's
    handle_events() stops there. Everything else is the h11 connection itself."""

    def __init__(self, conn: Any, protocol: Any, limits: Limits) -> None:
        self._conn = conn
        self._protocol = protocol
        self._limits = limits
        self._body_size = 0
        self.send = conn.send
        self.receive_data = conn.receive_data

    def __getattr__(self, name: str) -> Any:
        return getattr(self._conn, name)

    def next_event(self) -> Any:
        import h11

        event = self._conn.next_event()
        kind = type(event)
        limits = self._limits
        if kind is h11.Data:
            self._body_size += len(event.data)
            if limits.max_body_size and self._body_size > limits.max_body_size:
                return self._reject(413, "request body over max_body_size %d"
                                    % limits.max_body_size)
        elif kind is h11.Request:
            self._body_size = 0
            return self._check_head(event)
        elif kind is h11.NEED_DATA and self._conn.their_state is h11.IDLE:
            return self._check_partial_head()
        return event

    def _check_head(self, event: Any) -> Any:
        limits = self._limits
        if len(event.target) > limits.max_request_line:
            return self._reject(414, "request line longer than %d bytes"
                                % limits.max_request_line)
        if len(event.headers) > limits.max_headers:
            return self._reject(431, "more than %d header fields" % limits.max_headers)
        size = 0
        for name, value in event.headers:
            size += len(name) + len(value) + 4
            if name == b"content-length" and limits.max_body_size \
                    and int(value) > limits.max_body_size:
                return self._reject(413, "Content-Length %d over max_body_size %d"
                                    % (int(value), limits.max_body_size))
        if size > limits.max_header_size:
            return self._reject(431, "header section larger than %d bytes"
                                % limits.max_header_size)
        return event

    def _check_partial_head(self) -> Any:
        """A head still incomplete: refuse it as soon as it is over a limit, as the WSGI side
        does, instead of buffering it up to h11's own cap (which answers 400)."""
        import h11

        limits = self._limits
        buffered = self._conn.trailing_data[0]
        line_done = b"\n" in buffered[:limits.max_request_line + 2]
        if len(buffered) > limits.max_request_line and not line_done:
            return self._reject(414, "request line longer than %d bytes"
                                % limits.max_request_line)
        if len(buffered) > limits.max_request_line + limits.max_header_size + 4:
            return self._reject(431, "header section larger than %d bytes"
                                % limits.max_header_size)
        return h11.NEED_DATA

    def _reject(self, status: int, reason: str) -> Any:
        import h11

        self._protocol.reject(status, reason)
        return h11.NEED_DATA


def _with_h11_limits(protocol: type, base: type, ctl: DrainControl) -> type:
    """uvicorn's h11 protocol with the http.* limits (H11Limits) and the WSGI side's 400."""
    import h11

    limits = ctl.limits
    # h11 refuses a head larger than this with its own 400; ours must come first.
    h11_cap = limits.max_request_line + limits.max_header_size + 64 * 1024

    class LimitedH11(protocol):  # type: ignore[misc, valid-type]
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.conn = H11Limits(h11.Connection(h11.SERVER, max_incomplete_event_size=h11_cap),
                                  self, limits)

        def data_received(self, data: bytes) -> None:
            if not self._rejected:
                super().data_received(data)

        def send_400_response(self, msg: str) -> None:
            if not self._rejected:
                self.reject(400, "malformed request: %s" % msg)

    LimitedH11.__name__ = "Molt" + base.__name__
    return LimitedH11


class LifespanState:
    """The lifespan scope's "state" (ASGI 2.3): the dict a Starlette or FastAPI `lifespan`
    that yields one fills, which every request then sees a copy of. Without it Starlette fails
    the startup: 'The server does not support "state" in the lifespan scope'. (Debian's uvicorn
    is 0.17, which has none; a uvicorn that gives the lifespan scope its own state has it
    replaced by this one, which the requests' scopes are then copied from.)"""

    def __init__(self, app: Any, state: Dict[str, Any]) -> None:
        self.app = app
        self.state = state

    async def __call__(self, scope: Dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            scope["state"] = self.state
        await self.app(scope, receive, send)


class Observe:
    """ASGI middleware for the request metrics and the access log, installed only when one of
    them is on (the only molt Python that runs per request on this engine)."""

    def __init__(self, app: Any, access: Any, metrics: Optional[RequestMetrics],
                 ctl: DrainControl) -> None:
        self.app = app
        self.access = access
        self.metrics = metrics
        self.ctl = ctl

    async def __call__(self, scope: Dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http" or self.ctl.warming:
            await self.app(scope, receive, send)
            return
        started = time.monotonic()
        info: List[Any] = [0, 0, None]  # status, body bytes, response headers
        inner_send = send

        async def send(message: Dict[str, Any]) -> None:  # noqa: F811
            await inner_send(message)  # first: a head the server refuses is the app's 500
            if message["type"] == "http.response.start":
                info[0] = message["status"]
                info[2] = message.get("headers")
            elif message["type"] == "http.response.body":
                info[1] += len(message.get("body", b""))

        try:
            await self.app(scope, receive, send)
        except Exception:  # not CancelledError: a client that went away is no app error
            if self.metrics is not None:
                self.metrics.exceptions += 1
            if not info[0] or head_pending(inner_send):
                # The server answers 500 when the app raised before its head went out.
                info[0] = 500
            raise
        finally:
            elapsed = time.monotonic() - started
            if self.metrics is not None:
                self.metrics.observe(info[0], elapsed)
            if self.access is not None:
                client = scope.get("client")
                remote = "%s:%s" % tuple(client) if client else "unix"
                path = scope.get("path", "")
                if scope.get("query_string"):
                    path += "?" + scope["query_string"].decode("latin-1")
                access = self.access
                access.put((remote, scope.get("method", ""), path,
                            "HTTP/" + scope.get("http_version", "1.1"), info[0], info[1],
                            elapsed * 1000.0,
                            scope.get("headers") if access.wants_request_headers else None,
                            info[2] if access.wants_response_headers else None))


class UvicornASGIEngine:
    """engines.base.Engine for ASGI apps: one asyncio loop, run a phase at a time."""

    name = "uvicorn"

    def __init__(self, ctx: EngineContext) -> None:
        cfg = ctx.cfg
        self.cfg = cfg
        self.listeners = ctx.listeners
        self.loop, self.loop_name = new_loop(str(cfg.asgi["loop"] or "auto"))
        asyncio.set_event_loop(self.loop)
        self.tasks_kind = install_native_tasks()
        # uvicorn logs through "uvicorn.*"; give those the shim's handler so errors reach stderr.
        for handler in log.handlers:
            logging.getLogger("uvicorn").addHandler(handler)
        level = log.getEffectiveLevel()
        logging.getLogger("uvicorn").setLevel(level)
        logging.getLogger("uvicorn").propagate = False
        # uvicorn wraps the app in its MessageLoggerMiddleware (a trace log call per ASGI
        # message, ~7 us per request measured) when "uvicorn.error"'s own level, not its
        # effective one, is at or below TRACE: a logger left at NOTSET (0) counts. Set it.
        logging.getLogger("uvicorn.error").setLevel(level)
        headers = [("server", "molt")] if cfg.asgi["server_header"] else []
        if cfg.version_header:
            headers.append((cfg.version_header, cfg.version))
        self.date_header = bool(cfg.asgi["date_header"])
        # Test overrides: the fallbacks uvicorn picks when httptools or websockets is missing.
        http_impl = "h11" if os.environ.get("MOLT_SHIM_PARSER") == "h11" else "auto"
        ws_impl = "wsproto" if os.environ.get("MOLT_SHIM_WS") == "wsproto" else "auto"
        asgi = cfg.asgi
        self.config = Config(app=ctx.app, lifespan=cfg.lifespan, log_config=None, access_log=False,
                             http=http_impl, ws=ws_impl, proxy_headers=False,
                             server_header=False,
                             date_header=False,
                             # uvicorn arms call_later() with it: seconds as given, not
                             # rounded to whole ones (keepalive 0 never idles: see DrainControl).
                             timeout_keep_alive=cfg.timeout_s("keepalive") or 1.0,
                             headers=headers, root_path=cfg.root_path,
                             limit_concurrency=int(asgi["limit_concurrency"]) or None,
                             ws_max_size=int(asgi["ws_max_size"]),
                             ws_ping_interval=seconds_or_none(asgi["ws_ping_interval_ms"]),
                             ws_ping_timeout=seconds_or_none(asgi["ws_ping_timeout_ms"]),
                             ws_per_message_deflate=bool(asgi["ws_per_message_deflate"]))
        self.config.load()
        self.ctl = DrainControl(cfg.drain_idle_s, cfg.header_timeout_s, cfg.timeout_s("keepalive"),
                                Limits.from_config(cfg.http),
                                Framing(cfg.version_header_line, keepalive=True),
                                cfg.send_timeout_s)
        # Every path to a WebSocket (each parser's upgrade; uvicorn's h11 protocol reads the
        # class off the config per connection) gets molt's subclass.
        self.config.ws_protocol_class = make_ws_protocol_class(self.config.ws_protocol_class,
                                                               self.ctl, headers)
        self.metrics = RequestMetrics() if cfg.request_metrics else None
        if ctx.access_log is not None or self.metrics is not None:
            self.config.loaded_app = Observe(self.config.loaded_app, ctx.access_log,
                                             self.metrics, self.ctl)
        proxy = cfg.proxy
        if proxy is not None:  # outside the access log: it logs the client the app saw
            self.config.loaded_app = ProxyMiddleware(self.config.loaded_app, proxy)
        # Listeners whose connections start with a PROXY protocol header.
        self.proxy_fds = {sock.fileno() for sock, name in ctx.listeners
                          if cfg.proxy_protocol(name)}
        self.proxy_rejects = proxyproto.RejectLog()
        contexts = tls.listener_contexts(cfg, [name for _, name in ctx.listeners])
        self.tls_fds = {sock.fileno(): contexts[name] for sock, name in ctx.listeners
                        if name in contexts}
        self.state = ServerState()
        self.protocol_class = make_protocol_class(self.config.http_protocol_class, self.ctl)
        self.protocol_class.bind(self.config, self.state, self.loop)
        self.lifespan: Any = None
        self.started = False  # the lifespan startup succeeded: close() runs its shutdown
        self.warmup_requests = 0  # uvicorn counts every response; the warm-up's are not ours
        self.first_seen: Dict[Any, Tuple[float, Any]] = {}  # request cycle -> (seen, protocol)
        self.last = Counters(0, 0, time.monotonic(), 0)
        self.last_date = 0
        self.accept_error_logged = 0.0
        self.wake = asyncio.Event()
        # EPOLLEXCLUSIVE on the listeners, registered again after every accept: a connection
        # wakes one worker whose loop is waiting, round-robin (see threaded_wsgi._accept).
        # This reaches into the selector asyncio's default loop uses; any other loop keeps
        # plain readiness (every worker wakes, one wins the accept).
        epoll = getattr(getattr(self.loop, "_selector", None), "_selector", None)
        self.epoll = epoll if isinstance(epoll, select.epoll) else None
        self.make_transport = getattr(self.loop, "_make_socket_transport", None)
        self.servers: List[Any] = []  # uvloop: its servers on dups of the listeners
        # It keeps the generation's connections spread over its workers (the accept board).
        self.hub = new_io_hub(self.loop, self._accept_failed, cfg.accept_board_fd,
                              cfg.generation, cfg.accepting_workers)
        # WebSockets a draining worker has sent (or begun) their 1012 close.
        self.restarted_websockets: "weakref.WeakSet[Any]" = weakref.WeakSet()
        self.update_date()

    # -- engines.base.Engine -------------------------------------------------------------------
    def start(self) -> Optional[str]:
        # The lifespan alone sees the app behind LifespanState; uvicorn 0.17 gives its scope
        # no "state".
        config = copy.copy(self.config)
        config.loaded_app = LifespanState(self.config.loaded_app, self.ctl.app_state)
        self.lifespan = self.config.lifespan_class(config)
        self.loop.run_until_complete(self.lifespan.startup())
        if self.lifespan.should_exit:
            return "ASGI lifespan startup failed (lifespan: %s; see the log above)" % (
                self.config.lifespan)
        self.started = True
        return None

    def warm_up(self, path: str, host: str, timeout_s: float) -> Optional[str]:
        self.ctl.warming = True
        try:
            return self.loop.run_until_complete(self._warmup(path, host, timeout_s))
        finally:
            self.ctl.warming = False

    def describe(self) -> str:
        cycle = getattr(self.protocol_class, "cycle_kind", None)  # h11's protocol has none
        io = ("molt, sends %s, reads %s" % (self.hub.sends(), self.hub.reads())
              if self.hub is not None else "loop")
        return "asgi, %s, loop %s, I/O %s%s, tasks %s" % (
            self.protocol_class.__name__, self.loop_name, io,
            ", cycle %s" % cycle if cycle else "", self.tasks_kind)

    def run(self, loop: LoopHooks) -> None:
        self.loop.run_until_complete(self._serve(loop))

    def stop_accepting(self) -> None:
        ctl = self.ctl
        ctl.draining = True
        self.update_date()  # from now on every response says Connection: close
        for server in self.servers:
            server.close()  # its dup of the listener; existing connections stay
        for lsock, _ in self.listeners:
            fd = lsock.fileno()
            if fd >= 0:
                self.loop.remove_reader(fd)
                if self.hub is not None:
                    self.hub.unlisten(fd)
            # With EPOLLEXCLUSIVE (the Python accept on asyncio's selector loop, rejoin()) a
            # connection that woke only this worker would otherwise wait in the shared queue
            # for the next arrival: take what is queued (see threaded_wsgi).
            for _ in range(DRAIN_BACKLOG_MAX):
                try:
                    conn, _ = lsock.accept()
                except OSError:
                    break
                conn.setblocking(False)
                self.adopt(conn, fd)
            lsock.close()  # our descriptor only; never shutdown() a shared listener
        self.close_websockets()
        self.observe(time.monotonic())

    def close_websockets(self) -> None:
        """A draining worker ends each WebSocket with a close frame, code 1012 (Service
        Restart: the service goes on, a client may reconnect at once), which the app sees as
        websocket.disconnect: those open when the drain starts, and, on every drain tick, those
        whose upgrade completes during the drain (a request read before it, an app that had not
        accepted yet), each once. One that cannot be closed is logged and dropped: it never
        ends the drain of the others."""
        for conn in list(self.state.connections):
            if isinstance(conn, self.protocol_class) or conn in self.restarted_websockets:
                continue
            try:
                done = self.close_websocket(conn)
            except Exception as exc:  # noqa: BLE001 - a library's state we did not foresee
                log.warning("could not close a WebSocket with 1012 at the drain: %r", exc)
                conn.transport.abort()
                done = True
            if done:
                self.restarted_websockets.add(conn)

    def close_websocket(self, conn: Any) -> bool:
        """Ends one WebSocket with 1012; False while its opening handshake is under way (it is
        closed once open: until then the app decides, within timeouts.graceful); True once
        nothing is left to do. uvicorn's websockets protocol only drops the TCP connection in
        shutdown() (the client would see 1006, no close frame), so it gets the websockets
        library's closing handshake; its wsproto protocol sends 1012 in shutdown(), which
        wsproto allows only on an open connection."""
        if hasattr(conn, "ws_server") and hasattr(conn, "close"):  # websockets
            state = getattr(getattr(conn, "state", None), "name", "")
            if state == "CONNECTING":
                return False
            if getattr(conn, "open", False):
                self.loop.create_task(conn.close(WS_SERVICE_RESTART, "service restart"))
                return True
            if state in ("CLOSING", "CLOSED"):
                return True  # its closing handshake is already under way
        elif hasattr(conn, "conn"):  # wsproto: its WSConnection
            state = getattr(getattr(conn.conn, "state", None), "name", "")
            if state == "CONNECTING":
                return False
            if state not in ("OPEN", "REMOTE_CLOSING"):
                return True  # rejected, or closing already
        conn.shutdown()
        return True

    def counters(self) -> Counters:
        return self.last

    def drained(self) -> bool:
        return not (self.state.connections or self.state.tasks or self.ctl.unmade)

    def close(self) -> None:
        self.abandon()
        if self.started:
            self.loop.run_until_complete(self.lifespan.shutdown())
        self.observe(time.monotonic())
        if self.hub is not None:
            self.hub.send_held()  # the loop's last turn may have held writes it will not send
        self.loop.close()

    def abandon(self) -> None:
        """What a drain that ran out of time leaves: its connections are aborted (their apps
        hear the disconnect) and the apps' tasks cancelled (their `finally` blocks run), so the
        lifespan shutdown comes after every request, as the ASGI spec orders, and no task is
        left pending on a closed loop."""
        self.ctl.abandoning = True  # a cancelled request is the drain's end, not an app error
        for conn in list(self.state.connections):
            transport = getattr(conn, "transport", None)
            if transport is not None and not transport.is_closing():
                transport.abort()
        tasks = [task for task in self.state.tasks if not task.done()]
        for task in tasks:
            task.cancel()
        if tasks:  # bounded: an app may swallow the cancellation
            self.loop.run_until_complete(asyncio.wait(tasks, timeout=ABANDON_WAIT_S))

    # -- serving ------------------------------------------------------------------------------
    def update_date(self) -> None:
        # In place: every uvicorn protocol keeps a reference to this list from its
        # connection's start, so a new list would leave long keep-alive connections
        # answering with the Date of the second they connected (as uvicorn 0.17 itself does).
        date = [(b"date", http_date(time.time()).encode())] if self.date_header else []
        close = [CLOSE_HEADER] if self.ctl.draining or self.ctl.close_every_response else []
        headers = date + list(self.config.encoded_headers) + close
        self.state.default_headers[:] = headers
        # The same, joined once, for molt's own request cycle (asgi_cycle.Cycle).
        self.ctl.default_head = b"".join(b"%s: %s\r\n" % pair for pair in headers)
        self.ctl.default_close = bool(close)

    def factory(self) -> asyncio.Protocol:
        return self.protocol_class()  # it notes itself in ctl.unmade

    async def _serve(self, hooks: LoopHooks) -> None:
        loop = self.loop
        self.warmup_requests = self.state.total_requests
        for lsock, _ in self.listeners:
            lsock.setblocking(False)
            # PROXY and TLS listeners keep the Python accept (adopt() reads the PROXY header
            # and bounds the handshake), with the loop's transports; so do Unix sockets.
            special = lsock.fileno() in self.proxy_fds or lsock.fileno() in self.tls_fds
            if self.hub is not None and not special and lsock.family in TCP_FAMILIES:
                # The extension's own I/O, on either loop. The protocol class is its own
                # factory (it notes itself in ctl.unmade).
                self.hub.listen(lsock.fileno(), self.protocol_class, fixed_sockname(lsock),
                                deferred(lsock))
                continue
            backlog = None if self.make_transport is not None or special else tcp_backlog(lsock)
            if backlog is None:
                self.watch(lsock)
                continue
            # Not asyncio's selector loop (uvloop): its own server accepts, in C, as many as
            # are queued per wake-up, with no Python socket object or task per connection.
            # It re-listen()s a dup of the shared socket with the master's own backlog (read
            # back from the kernel), so the shared queue keeps its size.
            self.servers.append(await loop.create_server(self.protocol_class,
                                                         sock=lsock.dup(), backlog=backlog))
        watched = list(hooks.watch_fds())
        for fd in watched:
            loop.add_reader(fd, self._readable, hooks, fd)
        if self.hub is not None:
            loop.add_reader(self.hub.fileno(), self.hub.poll)
            if self.hub.reads_fileno() >= 0:  # kept-alive connections, read by io_uring
                loop.add_reader(self.hub.reads_fileno(), self.hub.reap)
        try:
            while True:
                now = time.monotonic()
                self._tick(now)
                delay = hooks.tick(now)
                if delay is None:
                    return
                delay = min(delay, DRAIN_TICK_S if self.ctl.draining else TICK_S)
                try:
                    await asyncio.wait_for(self.wake.wait(), delay)
                except asyncio.TimeoutError:
                    pass
                self.wake.clear()
        finally:
            for fd in watched:
                loop.remove_reader(fd)
            if self.hub is not None:
                loop.remove_reader(self.hub.fileno())
                if self.hub.reads_fileno() >= 0:
                    loop.remove_reader(self.hub.reads_fileno())

    def _readable(self, hooks: LoopHooks, fd: int) -> None:
        if not hooks.on_readable(fd):
            self.loop.remove_reader(fd)
        self.wake.set()

    def _tick(self, now: float) -> None:
        """The counters, the Date header, and each connection's timeout and drain checks."""
        self.ctl.now = now
        if self.hub is not None:
            self.hub.alive()
        self.observe(now)
        unmade = self.ctl.unmade
        if unmade:
            for protocol in [p for p, made in unmade.items() if now - made > UNMADE_MAX_S]:
                del unmade[protocol]
        self.proxy_rejects.flush(now)
        if int(time.time()) != self.last_date:
            self.last_date = int(time.time())
            self.update_date()
        for conn in list(self.state.connections):
            check = getattr(conn, "molt_check", None)
            if check is not None:
                check(now)
            if self.ctl.draining and isinstance(conn, self.protocol_class):
                conn.molt_drain(now)
        if self.ctl.draining:
            self.close_websockets()

    def observe(self, now: float) -> None:
        """Counters for the heartbeat, read off uvicorn's state (nothing per request).

        A request is in flight from the tick that first sees its cycle until its app
        returns (uvicorn clears `cycle.on_response` then), even when its client has gone
        and the connection with it: a hung app must still trip `timeouts.request`. A cycle
        still queued behind a pipelined one counts only while its connection can still
        run it: once the connection closes, it never starts."""
        first_seen = self.first_seen
        state = self.state
        for conn in state.connections:
            if isinstance(conn, self.protocol_class):
                # The newest request, and the one whose app runs ahead of it when it is
                # pipelined (both may have arrived between two ticks).
                for cycle in (conn.cycle, getattr(conn, "running", None)):
                    if cycle is not None and cycle not in first_seen and app_running(cycle):
                        first_seen[cycle] = (now, conn)
        for cycle, (_, conn) in list(first_seen.items()):
            if not app_running(cycle) or (queued(conn, cycle) and not self.conn_open(conn)):
                del first_seen[cycle]
        oldest = min(seen for seen, _ in first_seen.values()) if first_seen else now
        metrics = self.metrics
        self.last = Counters(state.total_requests - self.warmup_requests, len(first_seen),
                             oldest, len(state.connections),
                             metrics.encode() if metrics is not None else "",
                             metrics.exceptions if metrics is not None else 0)

    def conn_open(self, conn: Any) -> bool:
        return (conn in self.state.connections and conn.transport is not None
                and not conn.transport.is_closing())

    # -- accepting ----------------------------------------------------------------------------
    def rejoin(self, fd: int) -> None:
        if self.epoll is not None:
            try:
                self.epoll.unregister(fd)
                self.epoll.register(fd, select.EPOLLIN | EPOLLEXCLUSIVE)
            except OSError as exc:
                log.error("re-registering a listener failed: %s", exc)

    def on_accept(self, lsock: socket.socket, fd: int) -> None:
        try:
            conn, _ = lsock.accept()  # one per wake-up; TCP_NODELAY comes from the listener
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            if not out_of_resources(exc):
                log.info("accept(): %s", exc)  # ECONNABORTED and friends: that client is gone
                return
            # Out of descriptors or memory: the listener stays readable, so stop watching it
            # for 0.1 s instead of spinning the loop, and say so at most once a second.
            self.log_accept_failure(exc)
            self.loop.remove_reader(fd)
            self.loop.call_later(0.1, self.watch, lsock)
            return
        self.rejoin(fd)
        conn.setblocking(False)
        self.adopt(conn, fd)

    def adopt(self, conn: socket.socket, listener_fd: int) -> None:
        """A connection accepted from the listener `listener_fd`, with that listener's PROXY
        protocol and TLS settings."""
        proxy_protocol = listener_fd in self.proxy_fds
        tls_context = self.tls_fds.get(listener_fd)
        # The selector loop builds a transport synchronously (what asyncio's own servers do);
        # connect_accepted_socket() would cost a task and a future per connection. Any other
        # loop gets the public path.
        inner = self.factory()
        if proxy_protocol or tls_context is not None:
            # Its connection_made() comes after the PROXY header or the TLS handshake, each
            # bounded by http.header_timeout: the drain waits for it that long, not one second.
            self.ctl.unmade[inner] = self.ctl.now + self.cfg.header_timeout_s
        protocol = inner if not proxy_protocol else ProxyPreamble(
            inner, self.loop, self.cfg.header_timeout_s, self.proxy_rejects,
            lambda made: self.ctl.unmade.pop(made, None))
        if self.make_transport is None or tls_context is not None:
            self.loop.create_task(self._adopt(protocol, conn, tls_context))
            return
        try:
            self.make_transport(conn, protocol)
        except Exception as exc:
            self.ctl.unmade.pop(inner, None)
            log.info("could not set up an accepted connection: %s", exc)
            conn.close()

    async def _adopt(self, protocol: asyncio.Protocol, conn: socket.socket,
                     tls_context: Any = None) -> None:
        try:
            if tls_context is None:
                await self.loop.connect_accepted_socket(lambda: protocol, conn)
            else:  # the handshake runs in the loop, bounded like a request head
                await self.loop.connect_accepted_socket(
                    lambda: protocol, conn, ssl=tls_context,
                    ssl_handshake_timeout=self.cfg.header_timeout_s)
        except Exception as exc:
            self.ctl.unmade.pop(getattr(protocol, "inner", protocol), None)
            log.info("could not set up an accepted connection: %s", exc)
            conn.close()

    def _accept_failed(self, fd: int, exc: OSError) -> None:
        """The IoHub's accept() ran out of descriptors or memory and stopped watching the
        listener: as on_accept() does, say so at most once a second, look again in 0.1 s."""
        self.log_accept_failure(exc)
        self.loop.call_later(0.1, self.hub.resume_listener, fd)

    def log_accept_failure(self, exc: OSError) -> None:
        now = time.monotonic()
        if now - self.accept_error_logged > 1.0:
            self.accept_error_logged = now
            log.error("accept() failed: %s", exc)

    def watch(self, lsock: socket.socket) -> None:
        if self.ctl.draining or lsock.fileno() < 0:
            return
        self.loop.add_reader(lsock.fileno(), self.on_accept, lsock, lsock.fileno())
        self.rejoin(lsock.fileno())

    async def _warmup(self, path: str, host: str, timeout_s: float) -> Optional[str]:
        """GET path through uvicorn's real protocol over a socketpair."""
        server_end, client_end = socket.socketpair()
        server_end.setblocking(False)
        client_end.setblocking(False)
        try:
            await self.loop.connect_accepted_socket(self.factory, server_end)
            reader, writer = await asyncio.open_connection(sock=client_end)
            writer.write(warmup.build_request(path, host, self.cfg.health_headers))
            raw = await asyncio.wait_for(reader.read(), timeout_s)
            writer.close()
        except asyncio.TimeoutError:
            return "warm-up GET %s: no complete response within %.1fs" % (path, timeout_s)
        except OSError as exc:
            return "warm-up GET %s failed: %s" % (path, exc)
        return warmup.verdict(path, raw)


def new_loop(choice: str) -> Tuple[asyncio.AbstractEventLoop, str]:
    """The worker's event loop (asgi.loop): uvloop under auto when it is importable. Created
    here, in the worker, after any fork."""
    if choice in ("auto", "uvloop"):
        try:
            import uvloop
        except ImportError as exc:
            if choice == "uvloop":
                raise EngineUnavailable("asgi.loop is uvloop, but uvloop cannot be imported "
                                        "(%s): install python3-uvloop, or use loop: auto" % exc)
        else:
            return uvloop.new_event_loop(), "uvloop"
    return asyncio.new_event_loop(), "asyncio"


def install_native_tasks() -> str:
    """"native" when the extension starts and registers the engine's tasks (native_tasks()):
    the request cycle starts each with its TaskStarter (asgi_cycle.task_starter()), and
    asyncio's registry of tasks (the WeakSet asyncio.all_tasks() reads, which every task adds
    itself to when made) gets its add() and its references' callback in C
    (native/task_registry.hpp): the same set, the same contents, without two Python calls per
    task (2.0k of a keep-alive request's 58.2k instructions). On a Python whose registry is not
    that WeakSet (newer ones keep their tasks otherwise) the registry is left as it is.
    "python" without the extension, or with MOLT_SHIM_TASKS=python."""
    module = native_tasks()
    if module is None:
        return "python"
    tasks = getattr(asyncio.tasks, "_all_tasks", None)
    # Not twice: an engine made before in this process installed it already.
    if type(tasks) is weakref.WeakSet and "add" not in vars(tasks):
        registry = module.task_registry(tasks.data, tasks._pending_removals, tasks._iterating)
        tasks.add = registry.add
    return "native"


TCP_FAMILIES = (socket.AF_INET, socket.AF_INET6)


def new_io_hub(loop: asyncio.AbstractEventLoop, accept_failed: Any, board_fd: int = -1,
               generation: int = 0, accepting_workers: int = -1) -> Any:
    """The extension's IoHub for this loop, or None: without the extension, or when
    MOLT_SHIM_IO=loop asks for the loop's own transports (tests run both paths). board_fd
    (the generation's accept board, or -1) and generation: where it balances its accepts;
    accepting_workers: how many of the generation's workers are hot (-1: one per CPU, 0:
    all; `accepting_workers:` in the config).
    MOLT_SHIM_IO_URING=0: the hub sends each held write with its own send(), not the batch
    in one io_uring submit (the path taken anyway where the kernel refuses io_uring)."""
    if os.environ.get("MOLT_SHIM_IO") == "loop":
        return None
    from .native import load_extension

    module, _ = load_extension()
    if module is None or not hasattr(module, "io_hub"):
        return None

    def report(message: str, exc: Any, protocol: Any, transport: Any) -> None:
        # What asyncio's own transports do when a protocol method raises.
        loop.call_exception_handler({"message": message, "exception": exc,
                                     "protocol": protocol, "transport": transport})

    use_ring = os.environ.get("MOLT_SHIM_IO_URING", "1") != "0"
    return module.io_hub(loop, report, accept_failed, board_fd, generation, use_ring,
                         accepting_workers)


def fixed_sockname(lsock: socket.socket) -> Any:
    """The listener's address when every connection it accepts has it as its own (a
    specific address, not a wildcard one); None: the hub asks per connection."""
    name = lsock.getsockname()
    host = name[0] if isinstance(name, tuple) else ""
    return None if host in ("0.0.0.0", "::", "") else name


def deferred(lsock: socket.socket) -> bool:
    """The listener has TCP_DEFER_ACCEPT (`listen[].defer_accept`): a connection is handed
    over with its first bytes, so reading it at once saves a wake-up."""
    try:
        return lsock.getsockopt(socket.IPPROTO_TCP, socket.TCP_DEFER_ACCEPT) > 0
    except OSError:
        return False


def tcp_backlog(lsock: socket.socket) -> Optional[int]:
    """The backlog a listening TCP socket was given (the master's `listen[].backlog`): Linux
    reports it as tcpi_sacked in TCP_INFO for a socket in LISTEN. None for other sockets."""
    if lsock.family not in (socket.AF_INET, socket.AF_INET6):
        return None
    try:
        info = lsock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 104)
    except OSError:
        return None
    if len(info) < 32 or info[0] != TCP_LISTEN_STATE:
        return None
    backlog = struct.unpack_from("I", info, 28)[0]
    return backlog or None


TCP_LISTEN_STATE = 10  # tcpi_state of a listening socket (include/net/tcp_states.h)


def seconds_or_none(value_ms: Any) -> Optional[float]:
    """uvicorn's ws_ping_* take seconds, and None for "never"; molt's 0 means that."""
    return float(value_ms) / 1000.0 if value_ms else None


def create(ctx: EngineContext) -> UvicornASGIEngine:
    return UvicornASGIEngine(ctx)
