"""molt's own HTTP/1.1 request cycle for ASGI, fed by the native extension's parser
(MoltNativeHttpProtocol, at the end: one call per data_received() returns each request's scope)
or, without the extension, by httptools and its callbacks (MoltHttpToolsProtocol).

uvicorn's HttpToolsProtocol spends about 17 us of Python per keep-alive request (measured with
a fake transport, bench notes in docs/architecture.md); molt's limits on top of it took 7 us
more. This module keeps uvicorn's connection plumbing (connection_made, the WebSocket upgrade,
flow control) and replaces what runs per request:

* the http.* limits are part of the parser callbacks, not a layer around them: the
  Content-Length over `max_body_size` is seen in on_header, not by a second pass over the head;
* a request's state is one slotted `Cycle`; a request body waiter (a future) is made only when
  the app waits for a body that has not arrived, never an asyncio.Event per request;
* the response head waits for the first body message and both go out in one write (one send()
  and one TCP segment, where uvicorn makes two); a head whose body does not follow before the
  app suspends is written on its own (the extension's suspend_hook, or, for a response sent
  from another task or without the extension, at the end of the loop iteration: call_soon),
  so a streaming app's client gets its headers as soon as with uvicorn;
* the server's default headers (Date, Server, the version header, and `connection: close`
  while draining) are joined once per second by the engine, not per response, and are not
  re-validated per response (molt makes them);
* the keep-alive timeout is read by the engine's 100 ms tick, not a call_later() armed and
  cancelled per request;
* with the extension, a request's state and the response side of its `send` (the message
  checks, the head, the body's framing, the write, the end) are C++ (the AsgiCycle base of
  Cycle, native/asgi_cycle.hpp); PyCycleBase is the same in Python, for a worker without it.

The app runs in a Task of its own, as in uvicorn (asyncio.current_task(), which anyio and
sniffio need, is the request's task). What the ticks read (`cycle`, `pipeline`, `scope`,
`cycle.on_response`, `cycle.response_complete`, ...) keeps uvicorn's names, so the timeouts,
the drain and the counters in uvicorn_asgi.py serve both this and uvicorn's h11 protocol.
"""
from __future__ import annotations

import asyncio
import logging
import os
import re
import time
import urllib.parse
from collections import deque
from types import CoroutineType
from typing import Any, Dict, List, Optional, Tuple

import httptools
from uvicorn.protocols.http.flow_control import HIGH_WATER_LIMIT, service_unavailable
from uvicorn.protocols.http.httptools_impl import HEADER_VALUE_RE, STATUS_LINE

log = logging.getLogger("molt_shim")
app_log = logging.getLogger("uvicorn.error")  # the app's exceptions, where uvicorn logs them

CLOSE_HEADER = (b"connection", b"close")
CLOSE_LINE = b"connection: close\r\n"
CONTINUE_100 = b"HTTP/1.1 100 Continue\r\n\r\n"
# A response body up to this size is copied behind its head (one write); a larger one goes
# out with writelines() (no copy).
JOIN_MAX = 16 * 1024
METHODS = {m.encode(): m for m in ("GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS")}
DISCONNECT = "http.disconnect"


# A response header name must be a token (RFC 9110 5.1). Not uvicorn's HEADER_RE: a typo in it
# (the class closes at its first "]") makes it match only a separator followed by the literal
# text `={} \t\\"]`, so a name with CR/LF in it passed, and could inject a header.
HEADER_NAME_RE = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")

CONTENT_LENGTH = "content-length"
UNFRAMED = -1  # Cycle.remaining of a body that the connection's close ends (an HTTP/1.0 client)
CHUNKED = "chunked"
CLOSE = "close"
# Response header fields apps send again and again (content-type, a fixed content-length,
# cache-control ...), validated and framed once: (name, value) -> (the framed line, its kind).
# Bounded in entries and in size: a long value (a cookie, a CSP nonce, a Link list) is usually a
# one-off and is framed each time, not kept.
KNOWN_HEADERS: Dict[Any, Any] = {}
KNOWN_HEADERS_MAX = 4096
KNOWN_HEADER_MAX_BYTES = 256


def header_line(pair: Any) -> Any:
    """One response header field of an app's: (b"name: value\\r\\n", what it means to the
    framing), or RuntimeError, with uvicorn's checks and messages."""
    name, value = pair
    if not HEADER_NAME_RE.fullmatch(name):
        raise RuntimeError("Invalid HTTP header name.")
    if HEADER_VALUE_RE.search(value):
        raise RuntimeError("Invalid HTTP header value.")
    name = name.lower()
    kind = None
    if name == b"content-length":
        kind = CONTENT_LENGTH
        # Digits only, before the head is made (int() would take "-1", "+5" or " 5").
        if not value.isdigit() or len(value) > 18:
            raise RuntimeError("Invalid HTTP header value.")
    elif name == b"transfer-encoding" and value.lower() == b"chunked":
        kind = CHUNKED
    elif name == b"connection" and value.lower() == b"close":
        kind = CLOSE
    entry = (b"%s: %s\r\n" % (name, value), kind)
    if (type(pair) is tuple and type(name) is bytes and type(value) is bytes
            and len(name) + len(value) <= KNOWN_HEADER_MAX_BYTES):
        if len(KNOWN_HEADERS) >= KNOWN_HEADERS_MAX:
            KNOWN_HEADERS.clear()
        KNOWN_HEADERS[pair] = entry
    return entry


class Rejected(Exception):
    """Raised from a parser callback after the request was answered with an error status: it
    stops httptools, and data_received() knows the answer has been given."""


async def wait_for_wake(waiters: List[Any]) -> None:
    """Wait until wake_all(waiters). One future per waiting call, taken out of the list when
    the call returns or is cancelled: a cancelled waiter must not wake, or cancel, the others
    (Starlette's streaming responses wait in receive() twice at once)."""
    waiter = asyncio.get_running_loop().create_future()
    waiters.append(waiter)
    try:
        await waiter
    finally:
        waiters.remove(waiter)


def wake_all(waiters: Optional[List[Any]]) -> None:
    for waiter in waiters or ():
        if not waiter.done():
            waiter.set_result(None)


class Flow:
    """uvicorn's FlowControl (the same attributes and methods, which uvicorn's protocol
    callbacks call) without its asyncio.Event per connection: a future is made only for a
    send() that waits for its client to take bytes (wait_for_wake)."""

    __slots__ = ("_transport", "read_paused", "write_paused", "_waiters")

    def __init__(self, transport: Any) -> None:
        self._transport = transport
        self.read_paused = False
        self.write_paused = False
        self._waiters: Optional[List[Any]] = None

    async def drain(self) -> None:
        if not self.write_paused:
            return
        if self._waiters is None:
            self._waiters = []
        await wait_for_wake(self._waiters)

    def pause_reading(self) -> None:
        if not self.read_paused:
            self.read_paused = True
            self._transport.pause_reading()

    def resume_reading(self) -> None:
        if self.read_paused:
            self.read_paused = False
            self._transport.resume_reading()

    def pause_writing(self) -> None:
        self.write_paused = True

    def resume_writing(self) -> None:
        if self.write_paused:
            self.write_paused = False
            wake_all(self._waiters)


def address(info: Any) -> Any:
    """A transport's `sockname` or `peername` as uvicorn's scope gives it: (host, port), or
    None for a Unix socket (uvicorn's get_local_addr and get_remote_addr, without the socket
    object they ask first: uvloop makes one with a system call per question)."""
    if isinstance(info, (tuple, list)) and len(info) >= 2:
        return (str(info[0]), int(info[1]))
    return None


class PyCycleBase:
    """One request and its response: what uvicorn's RequestResponseCycle holds, in slots, and
    the response side of the ASGI `send`. The extension's AsgiCycle (native/asgi_cycle.hpp) is
    this class in C++, field for field and rule for rule, and is Cycle's base when it is there;
    this one serves without the extension, or with MOLT_SHIM_CYCLE=python (the tests run
    both). Both call two methods that Cycle adds: wake() and queue_head()."""

    __slots__ = ("protocol", "scope", "transport", "flow", "keep_alive", "asked_close",
                 "waiting_for_100_continue", "body", "more_body", "request_read", "waiters",
                 "disconnected", "response_started", "response_complete", "chunked",
                 "remaining", "head", "on_response", "task", "hook", "rules")

    def __init__(self, rules: Any, protocol: Any, scope: Dict[str, Any], keep_alive: bool,
                 asked_close: bool, expect_100: bool) -> None:
        self.rules = rules  # cycle_rules(ctl): here the DrainControl itself
        self.protocol = protocol
        self.scope = scope
        self.transport = protocol.transport
        self.flow = protocol.flow
        self.keep_alive = keep_alive
        self.asked_close = asked_close  # the request said Connection: close
        self.waiting_for_100_continue = expect_100
        self.body = b""
        self.more_body = True
        self.request_read = False  # the app has received the request's last body message
        # The futures of the receive() calls waiting now: more than one at a time is usual
        # (Starlette's StreamingResponse listens for http.disconnect while the app, or its
        # BaseHTTPMiddleware, also calls receive()); None while nobody waits.
        self.waiters: Optional[List[Any]] = None
        self.disconnected = False
        self.response_started = False
        self.response_complete = False
        self.chunked: Optional[bool] = None
        self.remaining = 0  # response body bytes still due under Content-Length
        self.head: Optional[bytes] = None  # the response head, until its first body goes
        self.on_response: Any = protocol.on_response_complete  # None once the app returned
        self.task: Any = None
        self.hook: Any = None  # the extension's SuspendHook the app runs in, while it runs

    def deliver(self, message: Dict[str, Any]) -> None:
        """send(message) once the client has taken what was written before (Cycle.send waits
        for that)."""
        if self.disconnected:
            return
        kind = message["type"]
        if not self.response_started:
            if kind != "http.response.start":
                raise RuntimeError("Expected ASGI message 'http.response.start', but got '%s'."
                                   % kind)
            self.start_response(message)
        elif not self.response_complete:
            if kind != "http.response.body":
                raise RuntimeError("Expected ASGI message 'http.response.body', but got '%s'."
                                   % kind)
            self.send_body(message.get("body", b""), message.get("more_body", False))
        else:
            raise RuntimeError("Unexpected ASGI message '%s' sent, after response already "
                               "completed." % kind)

    def start_response(self, message: Dict[str, Any]) -> None:
        status = message["status"]
        ctl = self.rules
        content = [STATUS_LINE[status], ctl.default_head]
        close_sent = ctl.default_close
        keep_alive = self.keep_alive and not close_sent
        chunked: Optional[bool] = None
        remaining = 0
        known = KNOWN_HEADERS
        for pair in message.get("headers", ()):
            try:
                line, kind = known[pair]
            except (KeyError, TypeError):  # new, or not a tuple
                line, kind = header_line(pair)
            content.append(line)
            if kind is None:
                continue
            if kind is CONTENT_LENGTH:
                if chunked is None:
                    remaining = int(pair[1].decode())
                    chunked = False
            elif kind is CHUNKED:
                remaining = 0
                chunked = True
            else:  # CLOSE
                keep_alive = False
                close_sent = True
        if self.asked_close and not close_sent:
            content.append(CLOSE_LINE)
        if status == 304 or status == 204:
            # No body, whatever a Content-Length says (a 304's is the one the 200 would have
            # had, RFC 9110 §8.6): the response ends with its head.
            chunked = None
            remaining = 0
        elif chunked is None and self.scope["method"] != "HEAD":
            if self.scope["http_version"] == "1.0":
                # No chunked coding for an HTTP/1.0 client (RFC 9112 §6.1): the close that
                # follows every 1.0 response ends the body.
                remaining = UNFRAMED
            else:
                chunked = True
                content.append(b"transfer-encoding: chunked\r\n")
        content.append(b"\r\n")
        # Only a valid head starts the response: an app whose headers raise gets a 500.
        self.response_started = True
        self.waiting_for_100_continue = False
        self.keep_alive = keep_alive
        self.chunked = chunked
        self.remaining = remaining
        self.head = b"".join(content)
        hook = self.hook
        if hook is not None and hook.running:
            return  # it goes with the first body, or alone when the app suspends (flush_head)
        self.queue_head()

    def send_body(self, body: bytes, more_body: bool) -> None:
        if self.scope["method"] == "HEAD":
            self.remaining = 0
            body = b""
        elif self.chunked:
            framed = b"%x\r\n%b\r\n" % (len(body), body) if body else b""
            body = framed if more_body else framed + b"0\r\n\r\n"
        elif self.remaining != UNFRAMED:
            if len(body) > self.remaining:
                raise RuntimeError("Response content longer than Content-Length")
            self.remaining -= len(body)
        head = self.head
        if self.transport.is_closing():  # closed under the app (a timeout, a reset): dropped
            head = self.head = None
            body = b""
        if head is not None:
            self.head = None
            if len(body) <= JOIN_MAX:
                self.transport.write(head + body)
            else:
                self.transport.writelines((head, body))
        elif body:
            self.transport.write(body)
        if not more_body:
            if self.remaining > 0:
                raise RuntimeError("Response content shorter than Content-Length")
            self.response_complete = True
            if self.waiters:  # per request: no call when nobody waits
                self.wake()
            if not self.keep_alive:
                self.transport.close()
            self.on_response()


def cycle_base() -> Any:
    """The extension's AsgiCycle, or PyCycleBase: without the extension, or with
    MOLT_SHIM_CYCLE=python."""
    if os.environ.get("MOLT_SHIM_CYCLE") != "python":
        from .native import load_extension

        module, _ = load_extension()
        if module is not None and hasattr(module, "AsgiCycle"):
            return module.AsgiCycle
    return PyCycleBase


def cycle_rules(ctl: Any) -> Any:
    """What the cycles of one engine share: the extension's CycleRules for its AsgiCycle, the
    DrainControl itself for PyCycleBase (the tables are this module's)."""
    if CYCLE_KIND == "python":
        return ctl
    from .native import load_extension

    module, _ = load_extension()
    return module.asgi_cycle_rules(ctl, STATUS_LINE, KNOWN_HEADERS, header_line,
                                   (CONTENT_LENGTH, CHUNKED, CLOSE), CLOSE_LINE)


class Cycle(cycle_base()):  # type: ignore[misc]
    """One request and its response, with the ASGI `receive` and `send` of the request."""

    __slots__ = ()

    def wake(self) -> None:
        """A body chunk, the request's end, a disconnect or the response's end: receive()
        looks again."""
        if self.waiters:  # per request: no call when nobody waits
            wake_all(self.waiters)

    # -- ASGI ---------------------------------------------------------------------------------
    async def receive(self) -> Dict[str, Any]:
        if self.waiting_for_100_continue and not self.transport.is_closing():
            self.transport.write(CONTINUE_100)
            self.waiting_for_100_continue = False
        if not (self.disconnected or self.response_complete or self.body) \
                and (self.more_body or self.request_read):
            self.flow.resume_reading()
            if self.waiters is None:
                self.waiters = []
            await wait_for_wake(self.waiters)
        if self.disconnected or self.response_complete:
            return {"type": DISCONNECT}
        body = self.body
        self.body = b""
        if not self.more_body:
            self.request_read = True
        return {"type": "http.request", "body": body, "more_body": self.more_body}

    async def send(self, message: Dict[str, Any]) -> None:
        if self.flow.write_paused and not self.disconnected:
            await self.flow.drain()
        self.deliver(message)

    def queue_head(self) -> None:
        """A head made outside the app's own run (sent from another task, or without the
        extension's suspend hook): heads whose body has not followed by the end of this loop
        iteration go out alone, one call_soon() per iteration for all."""
        ctl = self.protocol.ctl
        unsent = ctl.unsent_heads
        if not unsent:
            self.protocol.loop.call_soon(ctl.flush_heads)
        unsent.append(self)

    def flush_head(self) -> None:
        """The head alone, when no body message followed it before the app suspended (its
        SuspendHook), or within the loop iteration (DrainControl.flush_heads)."""
        head = self.head
        if head is not None:
            self.head = None
            if not self.disconnected and not self.transport.is_closing():
                self.transport.write(head)

    async def send_500(self) -> None:
        await self.send({"type": "http.response.start", "status": 500,
                         "headers": [(b"content-type", b"text/plain; charset=utf-8"),
                                     CLOSE_HEADER]})
        await self.send({"type": "http.response.body", "body": b"Internal Server Error"})


# Which response side serves (the worker's ready line says): the extension's AsgiCycle or
# PyCycleBase.
CYCLE_KIND = "python" if Cycle.__bases__[0] is PyCycleBase else "native"


def head_pending(send: Any) -> bool:
    """Whether `send` is a Cycle's whose response head has not gone out yet (an app that
    raises now still gets the server's 500)."""
    cycle = getattr(send, "__self__", None)
    return isinstance(cycle, Cycle) and cycle.head is not None


def with_cycle(protocol: type, ctl: Any) -> type:
    """`protocol` (molt's timeouts and drain over uvicorn's HttpToolsProtocol) with molt's
    request cycle and the http.* limits (the WSGI engine's rules and responses, wsgi/request.py:
    414 over max_request_line, 431 over max_headers or max_header_size, 413 over max_body_size,
    announced or streamed, 400 for what httptools cannot parse)."""
    limits = ctl.limits
    unmade = ctl.unmade
    max_request_line = limits.max_request_line
    max_headers = limits.max_headers
    max_header_size = limits.max_header_size
    max_body_size = limits.max_body_size
    parse_url = httptools.parse_url
    unquote = urllib.parse.unquote
    suspend_hook = native_suspend_hook()
    rules = cycle_rules(ctl)
    # The worker's values each request reads, as this function's variables (bind() sets them,
    # beside the class attributes uvicorn's own methods read): CPython 3.11 does not specialise
    # a read of a class attribute through an instance, and each such read takes the generic
    # lookup (about 160 instructions; docs/architecture.md, "Reads that stay generic").
    # bind() runs once per engine, on the class this function returns (the native parser's
    # subclass when there is one): both classes read these.
    app: Any = None
    tasks: Any = None
    connections: Any = None
    server_state: Any = None
    limit_concurrency: Any = None
    start_task: Any = None  # loop.create_task, or the extension's TaskStarter

    class MoltHttpToolsProtocol(protocol):  # type: ignore[misc, valid-type]
        scope = None  # a plain attribute here: on_message_begin adds the TLS extension itself
        url = b""
        _head_size = 0
        _body_size = 0
        _head_done = False
        _expect_100 = False
        _asked_close = False
        _idle_since = 0.0  # when the last response ended (the keep-alive timeout runs from it)
        # What uvicorn's __init__ looks up per connection (two getLogger() calls, each taking
        # logging's lock, and a walk of the handler hierarchy), once.
        logger = app_log
        access_logger = logging.getLogger("uvicorn.access")
        access_log = access_logger.hasHandlers()
        timeout_keep_alive_task = None
        transport: Any = None
        flow: Any = None
        server: Any = None
        client: Any = None
        scheme: Any = None
        headers: Any = None
        running: Any = None  # the cycle whose app runs (self.cycle, or one before it: pipelined)
        cycle_kind = CYCLE_KIND  # the ready line names it

        def __init__(self) -> None:
            # uvicorn's HttpToolsProtocol.__init__ (0.17 to current) is what bind() put on the
            # class, and this: per connection, only what differs between connections. The
            # state each request reads is the instance's own from the start, not a class
            # default (see `app` above).
            self._rejected = False
            self._deferred_error = None  # a status, answered once the responses before it are out
            self._tls_extension = None
            self.cycle = None  # the newest request's
            self.pipeline = deque()
            self.parser = self.new_parser()
            unmade[self] = ctl.now

        def connection_made(self, transport: Any) -> None:
            # uvicorn's connection_made, less its cost per connection: an asyncio.Event (its
            # FlowControl), a socket object per address, a third lookup for the scheme.
            self.transport = self.adopt_transport(transport)
            connections.add(self)
            self.flow = Flow(self.transport)
            self.server = address(transport.get_extra_info("sockname"))
            self.client = address(transport.get_extra_info("peername"))
            self.scheme = "http" if self._tls_extension is None else "https"
            if ctl.draining:
                self.molt_drain(self._born)

        @classmethod
        def bind(cls, config: Any, state: Any, loop: Any, /) -> None:
            nonlocal app, tasks, connections, server_state, limit_concurrency, start_task
            super().bind(config, state, loop)
            app, tasks, connections = cls.app, cls.tasks, cls.connections
            server_state, limit_concurrency = cls.server_state, cls.limit_concurrency
            start_task = task_starter(loop)

        def new_parser(self) -> Any:
            return httptools.HttpRequestParser(self)

        def upgrading(self) -> bool:
            """The request being parsed is an upgrade: its body is not the cycle's."""
            return self.parser.should_upgrade()

        # -- bytes in (after MoltHTTPProtocol.data_received's framing check) ---------------
        def molt_parse(self, data: bytes) -> None:
            if self._rejected:
                return
            try:
                self.parser.feed_data(data)
            except httptools.HttpParserUpgrade:
                self.handle_upgrade()
            except httptools.HttpParserError as exc:
                if not self._rejected:
                    self.reject(400, "malformed request: %s" % exc)

        # -- the parser's callbacks -------------------------------------------------------------
        def on_message_begin(self) -> None:
            self.url = b""
            self._head_size = 0
            self._body_size = 0
            self._head_done = False
            self._expect_100 = False
            self._asked_close = False
            self.headers = []
            scope = {"type": "http",
                     "asgi": {"version": self.config.asgi_version, "spec_version": "2.3"},
                     "http_version": "1.1", "server": self.server, "client": self.client,
                     "scheme": self.scheme, "root_path": self.root_path,
                     "headers": self.headers}
            ctl.complete_scope(scope, self._tls_extension)
            self.scope = scope

        def on_url(self, url: bytes) -> None:
            self.url += url
            if len(self.url) > max_request_line:
                self.reject(414, "request line longer than %d bytes" % max_request_line)
                raise Rejected()

        def on_header(self, name: bytes, value: bytes) -> None:
            if self._head_done:
                # A trailer field: uvicorn would append it to scope["headers"], the list the
                # app reads (a client could add Host or X-Forwarded-For after a proxy cleaned
                # the head). Dropped, as in the WSGI engines.
                return
            self._head_size += len(name) + len(value) + 4
            name = name.lower()
            headers = self.headers
            headers.append((name, value))
            if len(headers) > max_headers:
                self.reject(431, "more than %d header fields" % max_headers)
                raise Rejected()
            if self._head_size > max_header_size:
                self.reject(431, "header section larger than %d bytes" % max_header_size)
                raise Rejected()
            if name == b"connection":
                if value.lower() == b"close":
                    self._asked_close = True
            elif name == b"expect":
                if value.lower() == b"100-continue":
                    self._expect_100 = True
            elif name == b"content-length" and max_body_size:
                if value.strip().isdigit() and int(value) > max_body_size:
                    self.reject(413, "Content-Length %d over max_body_size %d"
                                % (int(value), max_body_size))
                    raise Rejected()

        def on_headers_complete(self) -> None:
            self._head_done = True
            parser = self.parser
            scope = self.scope
            method = parser.get_method()
            scope["method"] = METHODS.get(method) or method.decode("ascii")
            http_version = parser.get_http_version()
            if http_version != "1.1":
                scope["http_version"] = http_version
            if parser.should_upgrade():
                return  # handle_upgrade() takes the connection, after feed_data()
            url = self.url
            if url[:1] == b"/" and b"?" not in url and b"#" not in url:
                raw_path, query = url, b""  # origin-form without a query: nothing to split
            else:
                parsed = parse_url(url)  # absolute-form: `http://host` has no path, it is "/"
                raw_path, query = parsed.path or b"/", parsed.query or b""
            path = raw_path.decode("ascii")
            if "%" in path:
                path = unquote(path)
            scope["path"] = path
            scope["raw_path"] = raw_path
            scope["query_string"] = query
            # RFC 9110 §10.1.1: HTTP/1.0's 100-continue is ignored (the native parser's too).
            self.begin_cycle(scope, http_version, self._asked_close,
                             self._expect_100 and http_version != "1.0")

        def begin_cycle(self, scope: Dict[str, Any], http_version: str, asked_close: bool,
                        expect_100: bool) -> None:
            """A complete request head: its cycle starts now, or after the one before it."""
            if limit_concurrency is not None and (len(connections) >= limit_concurrency
                                                  or len(tasks) >= limit_concurrency):
                answer = service_unavailable
                app_log.warning("Exceeded concurrency limit.")
            else:
                answer = app
            previous = self.cycle
            cycle = self.cycle = Cycle(rules, self, scope,
                                       http_version != "1.0" and not asked_close, asked_close,
                                       expect_100)
            if previous is None or previous.response_complete:
                self.start_cycle(cycle, answer)
            else:  # pipelined: it starts when the response before it is complete
                self.flow.pause_reading()
                self.pipeline.appendleft((cycle, answer))

        def on_body(self, body: bytes) -> None:
            self._body_size += len(body)
            if max_body_size and self._body_size > max_body_size:
                self.reject(413, "request body over max_body_size %d" % max_body_size)
                raise Rejected()
            cycle = self.cycle
            if cycle.response_complete:
                # Answered before its body was in (a 401, a 413 of the app's): the keep-alive
                # timeout runs from the last byte the client sent, as in uvicorn.
                self._idle_since = time.monotonic()
                return
            if self.upgrading():
                return
            cycle.body += body
            if len(cycle.body) > HIGH_WATER_LIMIT:
                self.flow.pause_reading()
            cycle.wake()

        def on_message_complete(self) -> None:
            cycle = self.cycle
            if self.upgrading() or cycle is None or cycle.response_complete:
                return
            cycle.more_body = False
            cycle.wake()

        # -- the app ------------------------------------------------------------------------------
        def start_cycle(self, cycle: Cycle, answer: Any) -> None:
            task = start_task(self.run_asgi(cycle, answer))
            cycle.task = task
            tasks.add(task)
            self.running = cycle

        async def run_asgi(self, cycle: Cycle, answer: Any) -> None:
            """uvicorn's run_asgi: what the app's return or exception means for the
            connection, with the same log lines. `answer`: the app, or the 503 over
            limit_concurrency."""
            try:
                call = answer(cycle.scope, cycle.receive, cycle.send)
                if suspend_hook is not None and call.__class__ is CoroutineType:
                    call = cycle.hook = suspend_hook(call, cycle.flush_head)
                result = await call
            except BaseException as exc:
                if ctl.abandoning and isinstance(exc, asyncio.CancelledError):
                    # The drain ran out of time (the worker's own warning says so).
                    app_log.info("a request cancelled at the end of the drain: %s %s",
                                 cycle.scope.get("method"), cycle.scope.get("path"))
                    raise
                app_log.error("Exception in ASGI application\n", exc_info=exc)
                if not cycle.response_started:
                    await cycle.send_500()
                elif cycle.head is not None:  # the head has not gone: the 500 can still go
                    cycle.head = None
                    cycle.response_started = False
                    cycle.keep_alive = False
                    await cycle.send_500()
                else:
                    self.transport.close()
            else:
                if result is not None:
                    app_log.error("ASGI callable should return None, but returned '%s'.", result)
                    self.transport.close()
                elif not cycle.response_started and not cycle.disconnected:
                    app_log.error("ASGI callable returned without starting response.")
                    await cycle.send_500()
                elif not cycle.response_complete and not cycle.disconnected:
                    app_log.error("ASGI callable returned without completing response.")
                    self.transport.close()
            finally:
                cycle.on_response = None
                cycle.hook = None  # it holds cycle.flush_head
                tasks.discard(cycle.task)
                cycle.task = None
                if self.running is cycle:
                    self.running = None

        def on_response_complete(self) -> None:
            server_state.total_requests += 1
            if self.transport.is_closing():
                return
            self._idle_since = time.monotonic()
            self.flow.resume_reading()
            if self.pipeline:
                cycle, answer = self.pipeline.pop()
                self.start_cycle(cycle, answer)
            elif self._deferred_error is not None:
                self.send_error_response(self._deferred_error)

        def error_in_body(self) -> bool:
            """Whether the bytes being rejected belong to the body of the newest request (the
            one self.cycle serves); otherwise they begin a request the app never saw. httptools
            starts a new scope at the first byte of a request."""
            cycle = self.cycle
            return cycle is not None and cycle.scope is self.scope and cycle.more_body

        def reject(self, status: int, reason: str) -> None:
            cycle = self.cycle
            if self.error_in_body():
                if not (self.pipeline and self.pipeline[0][0] is cycle):
                    super().reject(status, reason)  # its app runs: it sees http.disconnect
                    return
                # Queued behind a response still being made: that request never runs.
                self.pipeline.popleft()
                cycle.on_response = None
            self._rejected = True
            if cycle is not None and not cycle.response_complete:
                # Requests read before the bad bytes are answered first, then the error and
                # the close (on_response_complete), as the WSGI engines answer a pipeline.
                # Answering now would put the error's bytes in the middle of a response, or
                # after the close's FIN (found by the ASGI fuzz run).
                self.log_rejected(status, reason)
                self._deferred_error = status
                return
            self.answer_error(status, reason)

        # -- the connection -----------------------------------------------------------------------
        def wake_cycle(self, cycle: Cycle) -> None:
            cycle.wake()

        def connection_lost(self, exc: Optional[Exception]) -> None:
            connections.discard(self)
            # The newest request's cycle, and the one whose app runs when that one is queued
            # behind it (pipelined): both apps hear http.disconnect.
            for cycle in (self.cycle, self.running):
                if cycle is not None:
                    if not cycle.response_complete:
                        cycle.disconnected = True
                    cycle.wake()
            self.running = None
            if self.flow is not None:
                self.flow.resume_writing()
            if exc is None:
                self.transport.close()
            self.break_cycles()
            self.cycle = None  # the cycle points back at its protocol
            # Requests queued behind it never run now (the engine's observe() stops counting
            # them once their on_response is gone), and they point back at the protocol too.
            for queued_cycle, _ in self.pipeline:
                queued_cycle.on_response = None
            self.pipeline.clear()

        def molt_check(self, now: float) -> None:
            super().molt_check(now)
            # The keep-alive timeout (timeouts.keepalive), at the tick's resolution.
            cycle = self.cycle
            if (cycle is not None and cycle.response_complete and not self.pipeline
                    and not self.head_in_progress() and self.transport is not None
                    and not self.transport.is_closing()):
                if self._real_transport.get_write_buffer_size():
                    # The response is still going out (http.send_timeout watches it): the
                    # connection is idle from when its last byte has left.
                    self._idle_since = now
                elif now - self._idle_since > self.timeout_keep_alive:
                    self.transport.close()

    new_native_parser = native_parser_factory()
    if new_native_parser is None:
        return MoltHttpToolsProtocol
    parser_limits = (max_request_line, max_header_size, max_headers, max_body_size)

    class MoltNativeHttpProtocol(MoltHttpToolsProtocol):
        """The same request cycle, fed by the native extension's parser (asgi_parser.hpp): the
        native engine's HTTP/1.1 parsing, framing guard and limits, one call per
        data_received() that hands back each request's scope ready-made, where httptools calls
        back into Python for every part of a head and the scope is built here."""

        guards_framing = True  # MoltHTTPProtocol makes no FramingGuard: the parser has one
        # The per-connection state (set in connection_made):
        # _upgrading: the last head was an upgrade: its body and end are not a request
        # _body_open: the newest request's head is in, its body is still coming

        def new_parser(self) -> Any:
            return None  # made in connection_made(): the scope's per-connection fields are known

        asgi: Any = None  # scope["asgi"]'s items (bind()); the parser gives each scope a copy

        @classmethod
        def bind(cls, config: Any, server_state: Any, loop: Any) -> None:
            super().bind(config, server_state, loop)
            cls.asgi = {"version": config.asgi_version, "spec_version": "2.3"}

        def connection_made(self, transport: Any) -> None:
            self._upgrading = False
            self._body_open = False
            super().connection_made(transport)
            if self.transport is None or self.transport.is_closing():
                return
            base = {"type": "http", "server": self.server, "client": self.client,
                    "scheme": self.scheme, "root_path": self.root_path}
            self.parser = new_native_parser(parser_limits, base, self.asgi, unquote)

        def data_received(self, data: bytes) -> None:
            parser = self.parser
            if self._rejected or parser is None:
                return
            for event in parser.feed(data):
                if event.__class__ is tuple:
                    self.on_head(event)
                elif self._upgrading:
                    continue
                elif event is None:
                    self._body_open = False
                    self.on_message_complete()
                else:
                    self.on_body(event)
                if self._rejected:
                    return
            error = parser.error
            if error is not None:
                self.reject(*error)
            elif self._upgrading:
                # At its head, as on httptools (which stops there): an announced body is
                # the new protocol's to read, or never comes.
                self.handle_upgrade()

        def on_head(self, head: Tuple[Dict[str, Any], bool, bool, bool, bool]) -> None:
            scope, asked_close, expect_100, upgrade, complete = head
            ctl.complete_scope(scope, self._tls_extension)
            self.scope = scope
            self.headers = scope["headers"]
            self._body_size = 0
            self._body_open = not complete and not upgrade
            if upgrade:  # handle_upgrade() takes the connection, after this feed
                self._upgrading = True
                query = scope["query_string"]
                self.url = scope["raw_path"] + b"?" + query if query else scope["raw_path"]
                return
            self.begin_cycle(scope, scope["http_version"], asked_close, expect_100)
            if complete:  # no body: no end event follows (on_message_complete's work)
                self.cycle.more_body = False

        def upgrading(self) -> bool:
            # data_received() drops an upgrade's body and end itself. The parser's own flag
            # would be wrong here: it has parsed the whole packet, so it is already set while
            # the events of a request before the upgrade are handled.
            return False

        def error_in_body(self) -> bool:
            # The scope is set only when a head is complete: a bad head has none of its own.
            return self._body_open

        def head_in_progress(self) -> bool:
            parser = self.parser
            return parser is not None and parser.in_head

    return MoltNativeHttpProtocol


def native_tasks() -> Any:
    """The extension, when it starts and registers the engine's asyncio tasks (its
    task_starter() and task_registry()), or None: without it, or with MOLT_SHIM_TASKS=python
    (asyncio as it is)."""
    if os.environ.get("MOLT_SHIM_TASKS") == "python":
        return None
    from .native import load_extension

    module, _ = load_extension()
    return module if module is not None and hasattr(module, "task_starter") else None


def task_starter(loop: Any) -> Any:
    """What starts a request's task on `loop`: the extension's TaskStarter (asyncio.Task without
    uvloop's create_task() wrapper and the name 3.11 formats for every task; a loop with a task
    factory, or a closed one, still gets create_task()) when the loop's create_task() is
    uvloop's or asyncio's own; otherwise, and without the extension, the loop's create_task(),
    looked up at each call as uvicorn does."""
    module = native_tasks()
    if module is not None and stock_create_task(loop):
        return module.task_starter(loop, asyncio.Task)

    def start_task(coroutine: Any) -> Any:
        return loop.create_task(coroutine)

    return start_task


def stock_create_task(loop: Any) -> bool:
    """Whether the loop's create_task() is uvloop's or asyncio's own, not a subclass's or a
    patch on the instance (those are called as they are)."""
    stock = [asyncio.BaseEventLoop.create_task]
    try:
        import uvloop

        stock.append(uvloop.Loop.create_task)
    except ImportError:
        pass
    return ("create_task" not in getattr(loop, "__dict__", {})
            and getattr(type(loop), "create_task", None) in stock)


def native_suspend_hook() -> Any:
    """The native extension's suspend_hook(), or None without it (a response head then waits
    for its body until the end of the loop iteration, DrainControl.flush_heads)."""
    from .native import load_extension

    module, _ = load_extension()
    return getattr(module, "suspend_hook", None)


def native_parser_factory() -> Any:
    """The native extension's asgi_parser(), or None: without the extension, or when
    MOLT_SHIM_PARSER=httptools or MOLT_SHIM_GUARD=python asks for the Python-side parsing
    (the framing table and the limit tests run both)."""
    if (os.environ.get("MOLT_SHIM_PARSER") == "httptools"
            or os.environ.get("MOLT_SHIM_GUARD") == "python"):
        return None
    from .native import load_extension

    module, _ = load_extension()
    return getattr(module, "asgi_parser", None)
