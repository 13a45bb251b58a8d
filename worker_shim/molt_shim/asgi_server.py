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
import signal
import socket
import sys
import time
from typing import Any, Dict, List, Optional, Tuple

from . import warmup
from .protocol import Channel, dispatch
from .httpdate import http_date
from .stats import Stats

log = logging.getLogger("molt_shim")

LINGER_S = 2.0
TICK_S = 0.1
CLOSE_HEADER = (b"connection", b"close")


class DrainControl:
    def __init__(self, idle_window: float, header_timeout: float) -> None:
        self.draining = False
        self.warming = False
        self.idle_window = idle_window
        self.header_timeout = header_timeout


class GracefulTransport:
    """Transport proxy whose close() is shutdown(SHUT_WR), a brief read-discard, then close.

    uvicorn closes connections with transport.close(); with unread request bytes in the
    kernel buffer that close would send an RST to the client.
    """

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        self._t = transport
        self._loop = loop
        self.closing = False
        self._timer: Optional[asyncio.TimerHandle] = None
        # The per-request calls go straight to the transport, not through __getattr__.
        self.write = transport.write
        self.writelines = transport.writelines
        self.get_extra_info = transport.get_extra_info
        self.pause_reading = transport.pause_reading
        self.resume_reading = transport.resume_reading

    def __getattr__(self, name: str) -> Any:
        return getattr(self._t, name)

    def is_closing(self) -> bool:
        return self.closing or self._t.is_closing()

    def close(self) -> None:
        if self.closing:
            return
        self.closing = True
        t = self._t
        if t.is_closing():
            return
        try:
            if not t.can_write_eof():
                t.close()
                return
            t.write_eof()  # asyncio sends the FIN after the write buffer is flushed
            t.resume_reading()
        except Exception:
            t.close()
            return
        self._timer = self._loop.call_later(LINGER_S, t.close)

    def abort(self) -> None:
        self.closing = True
        self._t.abort()


def make_protocol_class(base: type, ctl: DrainControl) -> type:
    class MoltHTTPProtocol(base):  # type: ignore[misc, valid-type]
        _partial = False
        _last_active = 0.0
        _real_transport: Any = None
        _head_started = 0.0

        def connection_made(self, transport: Any) -> None:
            self._real_transport = transport
            self._last_active = time.monotonic()
            super().connection_made(GracefulTransport(transport, self.loop))
            # uvicorn arms its keep-alive timer only after a response; a connection that
            # never sends a byte would otherwise stay open forever.
            self.timeout_keep_alive_task = self.loop.call_later(
                self.timeout_keep_alive, self.timeout_keep_alive_handler)
            if ctl.draining:
                self.molt_drain(time.monotonic())


        def data_received(self, data: bytes) -> None:
            if getattr(self.transport, "closing", False):
                return  # discarding while lingering before the final close
            self._last_active = time.monotonic()
            super().data_received(data)

        def on_message_begin(self) -> None:
            # uvicorn 0.17 has no request-head timeout (slowloris); the once-a-second tick
            # checks it (check_head_timeout), which costs far less than a timer per request.
            self._partial = True
            self._head_started = self._last_active
            super().on_message_begin()

        def on_headers_complete(self) -> None:
            self._partial = False
            super().on_headers_complete()

        def check_head_timeout(self, now: float) -> None:
            if self._partial and now - self._head_started > ctl.header_timeout:
                self._partial = False
                self._head_timeout()

        def _head_timeout(self) -> None:
            if not self.transport.is_closing():
                log.warning("%s: 408 Request Timeout: request head not complete within %.1fs",
                            "%s:%s" % tuple(self.client) if self.client else "unix",
                            ctl.header_timeout)
                self.transport.write(b"HTTP/1.1 408 Request Timeout\r\nContent-Length: 0\r\n"
                                     b"Connection: close\r\n\r\n")
                self.transport.close()

        def handle_upgrade(self, *args: Any) -> None:
            # WebSockets take over the raw transport; our close semantics are for HTTP.
            self.transport = self._real_transport
            super().handle_upgrade(*args)

        def on_response_complete(self) -> None:
            self._last_active = time.monotonic()
            super().on_response_complete()

        def molt_drain(self, now: float) -> None:
            """Called when the drain starts and on every tick while draining."""
            if CLOSE_HEADER not in self.default_headers:
                # Every request that starts from now on answers with Connection: close.
                self.default_headers = list(self.default_headers) + [CLOSE_HEADER]
            cycle = self.cycle
            if cycle is not None and not cycle.response_complete:
                cycle.keep_alive = False
                if not getattr(cycle, "response_started", True):
                    if CLOSE_HEADER not in cycle.default_headers:
                        cycle.default_headers = list(cycle.default_headers) + [CLOSE_HEADER]
                return
            if self._partial or getattr(self, "pipeline", None):
                return
            if now - self._last_active >= ctl.idle_window:
                self.transport.close()

    MoltHTTPProtocol.__name__ = "Molt" + base.__name__
    return MoltHTTPProtocol


class Tracker:
    """ASGI middleware feeding the heartbeat counters and the access log."""

    def __init__(self, app: Any, stats: Stats, access: Any, ctl: DrainControl) -> None:
        self.app = app
        self.stats = stats
        self.access = access
        self.ctl = ctl

    async def __call__(self, scope: Dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http" or self.ctl.warming:
            await self.app(scope, receive, send)
            return
        started = time.monotonic()
        token = self.stats.begin(started)
        access = self.access
        info = [0, 0]
        if access is not None:
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
            self.stats.end(token)
            if access is not None:
                client = scope.get("client")
                remote = "%s:%s" % tuple(client) if client else "unix"
                path = scope.get("path", "")
                if scope.get("query_string"):
                    path += "?" + scope["query_string"].decode("latin-1")
                access.put((remote, scope.get("method", ""), path,
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
    ctl = DrainControl(cfg.drain_idle_s, cfg.header_timeout_s)
    config.loaded_app = Tracker(config.loaded_app, stats, access, ctl)
    state = ServerState()
    loop = asyncio.get_running_loop()
    protocol_class = make_protocol_class(config.http_protocol_class, ctl)

    def update_date() -> None:
        date = http_date(time.time()).encode()
        state.default_headers = [(b"date", date)] + list(config.encoded_headers)

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

    done = asyncio.Event()
    drain_why: List[str] = []

    def request_drain(why: str) -> None:
        if not drain_why:
            drain_why.append(why)
            done.set()

    def on_accept(lsock: socket.socket, is_tcp: bool) -> None:
        for _ in range(1):  # one per wake-up: fair spread over workers (see wsgi_server)
            try:
                conn, _ = lsock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                log.error("accept() failed: %s", exc)
                return
            conn.setblocking(False)
            if is_tcp:
                conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
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

    for lsock, _ in listeners:
        lsock.setblocking(False)
        loop.add_reader(lsock.fileno(), on_accept, lsock,
                        lsock.family in (socket.AF_INET, socket.AF_INET6))

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

    ticker = loop.create_task(_tick(cfg, channel, stats, update_date, state.connections))
    await done.wait()

    # -- drain --------------------------------------------------------------------------------
    proctitle.set_title(title + " draining", "molt g%d s%d drn" % (cfg.generation, cfg.worker))
    for lsock, _ in listeners:
        loop.remove_reader(lsock.fileno())
        lsock.close()  # our descriptor only; never shutdown() a shared listener
    channel.send(STOPPING=1)  # no new connection can reach this worker any more
    ctl.draining = True
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
                connections: Any) -> None:
    """Heartbeats come from the event loop itself: a blocked loop stops them, on purpose.
    The same tick enforces the request-head timeout on every open connection."""
    interval = cfg.heartbeat_interval_s
    next_beat = time.monotonic()
    last_date = 0
    while True:
        now = time.monotonic()
        if now >= next_beat:
            next_beat = now + interval
            channel.send(**stats.heartbeat())
        if int(time.time()) != last_date:
            last_date = int(time.time())
            update_date()
        for conn in list(connections):
            check = getattr(conn, "check_head_timeout", None)
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
