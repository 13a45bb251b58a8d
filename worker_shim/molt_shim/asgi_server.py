"""ASGI serving with uvicorn's HTTP/WebSocket protocols, under the shim's own control loop.

We do not call uvicorn.Server.serve(): it installs its own signal handlers, and its shutdown
closes idle keep-alive connections abruptly (a client that just sent a request sees a reset).
Instead we reuse uvicorn's protocol classes and lifespan, and own:

* accepting (add_reader on the inherited sockets; asyncio's create_server would re-listen()
  the shared socket with its own backlog),
* the drain: requests arriving on open connections get `Connection: close`, idle connections
  are closed after a short idle window, every close is shutdown(SHUT_WR) + read-discard,
* heartbeats, counters and the Date header tick.
"""
from __future__ import annotations

import asyncio
import logging
import os
import select
import signal
import socket
import sys
import time
from typing import Any, Dict, List, Optional, Tuple

from . import warmup
from .protocol import Channel, dispatch
from .httpdate import http_date
from .listening import DRAIN_BACKLOG_MAX, EPOLLEXCLUSIVE, out_of_resources
from .stats import Stats

log = logging.getLogger("molt_shim")

LINGER_S = 2.0
TICK_S = 0.1
CLOSE_HEADER = (b"connection", b"close")


class DrainControl:
    def __init__(self, idle_window: float, header_timeout: float, keepalive: float) -> None:
        self.draining = False
        self.warming = False
        self.idle_window = idle_window
        self.header_timeout = header_timeout
        # A connection that has not sent a byte yet: as in the WSGI server.
        self.first_request_timeout = max(keepalive, header_timeout)
        try:
            import h11

            self.h11_idle: Any = h11.IDLE
        except ImportError:  # no h11: uvicorn runs httptools only
            self.h11_idle = None


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
        self.get_extra_info = transport.get_extra_info
        self.pause_reading = transport.pause_reading
        self.resume_reading = transport.resume_reading
        self.is_closing = transport.is_closing

    def __getattr__(self, name: str) -> Any:
        return getattr(self._t, name)

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
            self._protocol.data_received = _discard  # what arrives now is thrown away
            t.resume_reading()
        except Exception:
            t.close()
            return
        self._protocol.loop.call_later(LINGER_S, t.close)

    def abort(self) -> None:
        self.closing = True
        self.is_closing = _true
        self._t.abort()


def app_running(cycle: Any) -> bool:
    """Whether a request cycle's app has not returned yet (uvicorn sets on_response to None
    in run_asgi's `finally`; a cycle still queued behind a pipelined one counts too)."""
    return getattr(cycle, "on_response", None) is not None


def queued(protocol: Any, cycle: Any) -> bool:
    """Whether a cycle waits behind a pipelined one (its app has not started)."""
    return any(c is cycle for c, _ in getattr(protocol, "pipeline", ()))


def _true() -> bool:
    return True


def _discard(data: bytes) -> None:
    pass


def make_protocol_class(base: type, ctl: DrainControl) -> type:
    """uvicorn's HTTP protocol with molt's timeouts and drain, at no cost per request.

    Nothing here runs per request: the once-a-second tick (molt_check) and the drain tick
    (molt_drain) look at uvicorn's own per-connection state (`scope`, `cycle`, `pipeline`)
    and remember what they saw, so a head that stays incomplete, or a connection that stays
    idle, is noticed at tick resolution.
    """

    class MoltHTTPProtocol(base):  # type: ignore[misc, valid-type]
        _real_transport: Any = None
        _born = 0.0
        _head_mark: Any = None      # (scope, first seen) while a request head is incomplete
        _idle_mark: Any = None      # (cycle, first seen) while draining and idle

        def connection_made(self, transport: Any) -> None:
            self._real_transport = transport
            self._born = time.monotonic()
            super().connection_made(GracefulTransport(transport, self))
            if ctl.draining:
                self.molt_drain(self._born)

        def handle_upgrade(self, *args: Any) -> None:
            # WebSockets take over the raw transport; our close semantics are for HTTP.
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
            """Once a second: the request-head timeout (uvicorn 0.17 has none: slowloris),
            and a connection that never sends a byte (uvicorn arms its keep-alive timer only
            after a response)."""
            if self.transport is None or self.transport.is_closing():
                return
            if self.scope is None:
                if now - self._born > ctl.first_request_timeout:
                    self.transport.close()
                return
            if not self.head_in_progress():
                self._head_mark = None
                return
            mark = self._head_mark
            if mark is None or mark[0] is not self.scope:
                self._head_mark = (self.scope, now)
            elif now - mark[1] > ctl.header_timeout:
                self._head_timeout()

        def _head_timeout(self) -> None:
            log.warning("%s: 408 Request Timeout: request head not complete within %.1fs",
                        "%s:%s" % tuple(self.client) if self.client else "unix",
                        ctl.header_timeout)
            self.transport.write(b"HTTP/1.1 408 Request Timeout\r\nContent-Length: 0\r\n"
                                 b"Connection: close\r\n\r\n")
            self.transport.close()

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

    MoltHTTPProtocol.__name__ = "Molt" + base.__name__
    return MoltHTTPProtocol


class AccessLog:
    """ASGI middleware for the access log (only installed when the log is on)."""

    def __init__(self, app: Any, access: Any, ctl: DrainControl) -> None:
        self.app = app
        self.access = access
        self.ctl = ctl

    async def __call__(self, scope: Dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http" or self.ctl.warming:
            await self.app(scope, receive, send)
            return
        started = time.monotonic()
        info = [0, 0]
        inner_send = send

        async def send(message: Dict[str, Any]) -> None:  # noqa: F811
            if message["type"] == "http.response.start":
                info[0] = message["status"]
            elif message["type"] == "http.response.body":
                info[1] += len(message.get("body", b""))
            await inner_send(message)

        try:
            await self.app(scope, receive, send)
        finally:
            client = scope.get("client")
            remote = "%s:%s" % tuple(client) if client else "unix"
            path = scope.get("path", "")
            if scope.get("query_string"):
                path += "?" + scope["query_string"].decode("latin-1")
            self.access.put((remote, scope.get("method", ""), path,
                             "HTTP/" + scope.get("http_version", "1.1"), info[0], info[1],
                             (time.monotonic() - started) * 1000.0))


def serve_asgi(app: Any, cfg: Any, channel: Channel, stats: Stats,
               listeners: List[Tuple[socket.socket, str]], access: Any, title: str) -> int:
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    try:
        return loop.run_until_complete(_serve(app, cfg, channel, stats, listeners, access, title))
    finally:
        loop.close()


async def _serve(app: Any, cfg: Any, channel: Channel, stats: Stats,
                 listeners: List[Tuple[socket.socket, str]], access: Any, title: str) -> int:
    from uvicorn.config import Config
    from uvicorn.server import ServerState

    from . import proctitle

    # uvicorn logs through "uvicorn.*"; give those the shim's handler so errors reach stderr.
    for handler in log.handlers:
        logging.getLogger("uvicorn").addHandler(handler)
    logging.getLogger("uvicorn").setLevel(log.level)
    logging.getLogger("uvicorn").propagate = False

    headers = [(cfg.version_header, cfg.version)] if cfg.version_header else []
    http_impl = "h11" if os.environ.get("MOLT_SHIM_PARSER") == "h11" else "auto"
    config = Config(app=app, lifespan="on", log_config=None, access_log=False, http=http_impl,
                    proxy_headers=False, server_header=False, date_header=False,
                    timeout_keep_alive=max(1, int(round(cfg.timeout_s("keepalive")))),
                    headers=headers)
    config.load()
    ctl = DrainControl(cfg.drain_idle_s, cfg.header_timeout_s, cfg.timeout_s("keepalive"))
    if access is not None:
        config.loaded_app = AccessLog(config.loaded_app, access, ctl)
    state = ServerState()
    loop = asyncio.get_running_loop()
    protocol_class = make_protocol_class(config.http_protocol_class, ctl)

    def update_date() -> None:
        # In place: every uvicorn protocol keeps a reference to this list from its
        # connection's start, so a new list would leave long keep-alive connections
        # answering with the Date of the second they connected (as uvicorn 0.17 itself does).
        date = http_date(time.time()).encode()
        close = [CLOSE_HEADER] if ctl.draining else []
        state.default_headers[:] = [(b"date", date)] + list(config.encoded_headers) + close

    def factory() -> asyncio.Protocol:
        return protocol_class(config=config, server_state=state, _loop=loop)

    update_date()
    lifespan = config.lifespan_class(config)
    await lifespan.startup()
    if lifespan.should_exit:
        return _fail(channel, "ASGI lifespan startup failed (see the traceback above)")

    if cfg.health_path:
        ctl.warming = True
        error = await _warmup(loop, factory, cfg)
        ctl.warming = False
        if error is not None:
            await lifespan.shutdown()
            return _fail(channel, error)
    warmup_requests = state.total_requests  # uvicorn counts every response; these are ours

    done = asyncio.Event()
    drain_why: List[str] = []

    def request_drain(why: str) -> None:
        if not drain_why:
            drain_why.append(why)
            done.set()

    # EPOLLEXCLUSIVE on the listeners, registered again after every accept: a connection
    # wakes one worker whose loop is waiting, round-robin (see wsgi_server._accept). This
    # reaches into the selector asyncio's default loop uses; any other loop keeps plain
    # readiness (every worker wakes, one wins the accept).
    epoll = getattr(getattr(loop, "_selector", None), "_selector", None)
    if not isinstance(epoll, select.epoll):
        epoll = None

    def rejoin(fd: int) -> None:
        if epoll is not None:
            try:
                epoll.unregister(fd)
                epoll.register(fd, select.EPOLLIN | EPOLLEXCLUSIVE)
            except OSError as exc:
                log.error("re-registering a listener failed: %s", exc)

    accept_error_logged = [0.0]

    def on_accept(lsock: socket.socket, fd: int) -> None:
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
            now = time.monotonic()
            if now - accept_error_logged[0] > 1.0:
                accept_error_logged[0] = now
                log.error("accept() failed: %s", exc)
            loop.remove_reader(fd)
            loop.call_later(0.1, watch, lsock)
            return
        rejoin(fd)
        conn.setblocking(False)
        adopt(conn)

    make_transport = getattr(loop, "_make_socket_transport", None)

    def adopt(conn: socket.socket) -> None:
        # The selector loop builds a transport synchronously (what asyncio's own servers do);
        # connect_accepted_socket() would cost a task and a future per connection. Any other
        # loop gets the public path.
        if make_transport is None:
            loop.create_task(_adopt(loop, factory, conn))
            return
        try:
            make_transport(conn, factory())
        except Exception as exc:
            log.info("could not set up an accepted connection: %s", exc)
            conn.close()

    def watch(lsock: socket.socket) -> None:
        if ctl.draining or lsock.fileno() < 0:
            return
        loop.add_reader(lsock.fileno(), on_accept, lsock, lsock.fileno())
        rejoin(lsock.fileno())

    for lsock, _ in listeners:
        lsock.setblocking(False)
        watch(lsock)

    def on_channel() -> None:
        messages = channel.receive()
        if messages is None:
            loop.remove_reader(channel.fileno())
            request_drain("master channel closed")
            return
        dispatch(messages, request_drain, access.reopen if access is not None else None)

    if channel.fileno() >= 0:
        loop.add_reader(channel.fileno(), on_channel)
    loop.add_signal_handler(signal.SIGTERM, request_drain, "SIGTERM")
    loop.add_signal_handler(signal.SIGUSR1, lambda: access.reopen() if access else None)

    channel.send(READY=1)
    log.info("ready: %s (asgi via uvicorn, %s) on %s", cfg.app, protocol_class.__name__,
             ", ".join(name for _, name in listeners) or "no listeners")

    first_seen: Dict[Any, Tuple[float, Any]] = {}  # request cycle -> (first seen, protocol)

    def observe(now: float) -> None:
        """Counters for the heartbeat, read off uvicorn's state (nothing per request).

        A request is in flight from the tick that first sees its cycle until its app
        returns (uvicorn clears `cycle.on_response` then), even when its client has gone
        and the connection with it: a hung app must still trip `timeouts.request`. A cycle
        still queued behind a pipelined one counts only while its connection can still
        run it: once the connection closes, it never starts."""
        for conn in state.connections:
            if isinstance(conn, protocol_class):
                cycle = conn.cycle
                if cycle is not None and cycle not in first_seen and app_running(cycle):
                    first_seen[cycle] = (now, conn)
        for cycle, (_, conn) in list(first_seen.items()):
            if not app_running(cycle) or (queued(conn, cycle) and not conn_open(conn)):
                del first_seen[cycle]
        oldest = min(seen for seen, _ in first_seen.values()) if first_seen else now
        stats.observe(state.total_requests - warmup_requests, len(first_seen), oldest)

    def conn_open(conn: Any) -> bool:
        return (conn in state.connections and conn.transport is not None
                and not conn.transport.is_closing())

    ticker = loop.create_task(_tick(cfg, channel, stats, update_date, state.connections,
                                    observe))
    await done.wait()

    # -- drain --------------------------------------------------------------------------------
    proctitle.set_title(title + " draining", "molt g%d s%d drn" % (cfg.generation, cfg.worker))
    ctl.draining = True
    update_date()  # from now on every response says Connection: close
    for lsock, _ in listeners:
        if lsock.fileno() >= 0:
            loop.remove_reader(lsock.fileno())
        # With EPOLLEXCLUSIVE a connection that woke only this worker would otherwise wait
        # in the shared queue for the next arrival: take what is queued (see wsgi_server).
        for _ in range(DRAIN_BACKLOG_MAX):
            try:
                conn, _ = lsock.accept()
            except OSError:
                break
            conn.setblocking(False)
            adopt(conn)
        lsock.close()  # our descriptor only; never shutdown() a shared listener
    channel.send(STOPPING=1)  # no new connection can reach this worker any more
    # Transports built this iteration call connection_made() on the next one: let them
    # register, so the loop below cannot find "no connections" and exit past them.
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    observe(time.monotonic())
    log.info("draining (%s): %d connection(s), %d request(s) in flight", drain_why[0],
             len(state.connections), stats.inflight_count())
    for conn in list(state.connections):
        if not isinstance(conn, protocol_class):
            conn.shutdown()  # WebSockets: uvicorn sends close code 1012 (service restart)
    deadline = time.monotonic() + max(1.0, cfg.timeout_s("graceful"))
    while state.connections or state.tasks:
        now = time.monotonic()
        if now >= deadline:
            log.warning("graceful timeout: exiting with %d connection(s) open",
                        len(state.connections))
            break
        for conn in list(state.connections):
            if isinstance(conn, protocol_class):
                conn.molt_drain(now)
        await asyncio.sleep(TICK_S)
    ticker.cancel()
    await lifespan.shutdown()
    observe(time.monotonic())
    channel.send(**stats.heartbeat())  # the last counts, so the master's totals are exact
    log.info("drained; exiting (%d requests served)", stats.requests)
    return 0


async def _adopt(loop: asyncio.AbstractEventLoop, factory: Any, conn: socket.socket) -> None:
    try:
        await loop.connect_accepted_socket(factory, conn)
    except Exception as exc:
        log.info("could not set up an accepted connection: %s", exc)
        conn.close()


async def _tick(cfg: Any, channel: Channel, stats: Stats, update_date: Any,
                connections: Any, observe: Any) -> None:
    """Heartbeats come from the event loop itself: a blocked loop stops them, on purpose.
    The same tick reads the counters and runs each connection's timeout checks."""
    interval = cfg.heartbeat_interval_s
    next_beat = time.monotonic()
    last_date = 0
    while True:
        now = time.monotonic()
        observe(now)
        if now >= next_beat:
            next_beat = now + interval
            channel.send(**stats.heartbeat())
        if int(time.time()) != last_date:
            last_date = int(time.time())
            update_date()
        for conn in list(connections):
            check = getattr(conn, "molt_check", None)
            if check is not None:
                check(now)
        # Once a second is the Date header's resolution; heartbeats may need it sooner.
        await asyncio.sleep(min(1.0, interval))


async def _warmup(loop: asyncio.AbstractEventLoop, factory: Any, cfg: Any) -> Optional[str]:
    """GET health_path through uvicorn's real protocol over a socketpair."""
    server_end, client_end = socket.socketpair()
    server_end.setblocking(False)
    client_end.setblocking(False)
    path = cfg.health_path
    try:
        await loop.connect_accepted_socket(factory, server_end)
        reader, writer = await asyncio.open_connection(sock=client_end)
        writer.write(warmup.build_request(path, cfg.health_host))
        raw = await asyncio.wait_for(reader.read(), cfg.timeout_s("boot"))
        writer.close()
    except asyncio.TimeoutError:
        return "warm-up GET %s: no complete response within %.1fs" % (path, cfg.timeout_s("boot"))
    except OSError as exc:
        return "warm-up GET %s failed: %s" % (path, exc)
    return warmup.verdict(path, raw)


def _fail(channel: Channel, reason: str) -> int:
    reason = " ".join(reason.splitlines())[:1000]
    log.error("boot failed: %s", reason)
    channel.send(ERROR=reason)
    sys.stderr.flush()
    return 4
