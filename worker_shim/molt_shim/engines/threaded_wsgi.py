"""The threaded WSGI engine ("python"): HTTP/1.1 on the inherited listeners, in threads.

Architecture (the leader/followers pattern on one epoll):

* `threads` serving threads share one epoll. Whichever thread takes an event does the whole
  job: accept, or read, parse with httptools, run the app and write the response. There is
  no hand-off between threads on the request path. Only one idle thread sleeps in epoll at a
  time (`poll_lock`), and a thread that just finished takes waiting work without sleeping.
* Connections are registered EPOLLONESHOT and parked between requests; who owns one is the
  protocol of engines/connections.py (`Parking`).
* Listeners are EPOLLEXCLUSIVE: a new connection wakes one worker process that has a thread
  waiting, not every worker process, and a worker whose threads are all busy is skipped.
* The main thread never touches a request. It runs the lifecycle's loop hooks (heartbeats,
  the master channel, signals, the drain) and closes idle connections (the sweep).
* Request bodies are buffered before the app runs (in memory up to body_buffer_size, then a
  temporary file), so wsgi.input never blocks and never reads past the body.
* A client that asked to close gets a plain close() after its response. Closes the server
  chooses (drain, errors, keep-alive timeout) are shutdown(SHUT_WR) plus a read-discard until
  the peer's FIN (LINGER), so a request already on the wire never meets a reset.

Parsing requests and building environs is molt_shim/wsgi/request.py; framing responses is
molt_shim/wsgi/response.py; a connection and its ownership, engines/connections.py. This
module is the threads, accepting, the sweep and the drain.
"""
from __future__ import annotations

import enum
import logging
import os
import select
import socket
import threading
import time
from typing import Any, Dict, List, Optional, Set

from .. import httpparse, proxyproto, static, tls
from . import EngineUnavailable
from ..listening import DRAIN_BACKLOG_MAX, EPOLLEXCLUSIVE, out_of_resources
from ..request_metrics import RequestMetrics
from ..stats import RequestCounter
from ..warmup import over_socketpair
from ..wsgi.request import Limits, Request, listener_environ, request_environ, server_environ
from ..wsgi.response import CONTINUE_100, REASONS, ClientGone, FileWrapper, Framing, Response
from .base import Counters, EngineContext, LoopHooks
from .connections import BUSY, IDLE, LINGER, RECV_SIZE, Connection, Parking

log = logging.getLogger("molt_shim")

EV_LISTEN = select.EPOLLIN | EPOLLEXCLUSIVE
SWEEP_S = 0.1


class Overdue(enum.Enum):
    """What the sweep owes a parked connection."""

    NOTHING = "nothing"
    HEAD_TIMEOUT = "408"  # a request head incomplete for longer than header_timeout
    IDLE_TIMEOUT = "idle"  # idle beyond keep-alive (or the drain's idle window)
    LINGER_DONE = "linger"  # lingered long enough: close


class Listener:
    __slots__ = ("sock", "fd", "name", "env", "proxy_protocol", "tls")

    def __init__(self, sock: socket.socket, name: str, base: Dict[str, Any],
                 proxy_protocol: bool = False, tls_context: Any = None) -> None:
        self.sock = sock
        self.fd = sock.fileno()
        self.name = name
        self.proxy_protocol = proxy_protocol
        self.tls = tls_context  # ssl.SSLContext, or None
        is_tcp = sock.family in (socket.AF_INET, socket.AF_INET6)
        self.env = listener_environ(base, sock.getsockname() if is_tcp else None, is_tcp)

    def wrap(self, sock: socket.socket) -> socket.socket:
        """An accepted (non-blocking) connection, TLS-wrapped on a TLS listener; the handshake
        happens in its first reads."""
        if self.tls is None:
            return sock
        return self.tls.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)


class ThreadedWSGIEngine:
    """engines.base.Engine for WSGI apps, served from a pool of threads."""

    name = "python"

    def __init__(self, ctx: EngineContext) -> None:
        cfg = ctx.cfg
        self.app = ctx.app
        self.cfg = cfg
        self.access_log = ctx.access_log
        self.counter = RequestCounter(ctx.on_request_count,
                                      RequestMetrics() if ctx.cfg.request_metrics else None)
        self.limits = Limits.from_config(cfg.http)
        self.header_timeout = cfg.header_timeout_s
        self.send_timeout = cfg.send_timeout_s
        self.keepalive = max(0.0, cfg.timeout_s("keepalive"))
        self.framing = Framing(cfg.version_header_line, self.keepalive > 0)
        self.threads = max(1, cfg.threads)
        self.script_name = cfg.root_path
        self.static = static.mounts(cfg.static, cfg.chdir)  # `static:`, longest prefix first
        self.proxy = cfg.proxy  # forwarded.ProxyRule, or None
        self.base_env = server_environ(self.threads > 1, FileWrapper, self.script_name)
        contexts = tls.listener_contexts(cfg, [name for _, name in ctx.listeners])
        self.listeners = [Listener(sock, name, self.base_env, cfg.proxy_protocol(name),
                                   contexts.get(name)) for sock, name in ctx.listeners]
        self.proxy_rejects = proxyproto.RejectLog()
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
        self.lot = Parking()
        self.draining = False
        self.stop_r, self.stop_w = os.pipe()  # level-triggered: once written, stops every thread
        for fd in (self.stop_r, self.stop_w):
            os.set_blocking(fd, False)
        self.lot.ep.register(self.stop_r, select.EPOLLIN)
        self._threads: List[threading.Thread] = []
        self._accept_error_logged = 0.0

    # -- engines.base.Engine -------------------------------------------------------------------
    def start(self) -> Optional[str]:
        for i in range(self.threads):
            t = threading.Thread(target=self._thread_main, name="molt-http-%d" % i, daemon=True)
            t.start()
            self._threads.append(t)
        return None

    def warm_up(self, path: str, host: str, timeout_s: float) -> Optional[str]:
        return over_socketpair(self._adopt_warmup, path, host, timeout_s,
                               self.cfg.health_headers)

    def describe(self) -> str:
        return "wsgi, %d threads, parser %s" % (self.threads, httpparse.parser_name())

    def counters(self) -> Counters:
        return self.counter.counters(len(self.lot.conns))

    def drained(self) -> bool:
        return not self.lot.conns and self.counter.inflight_count() == 0

    def close(self) -> None:
        os.write(self.stop_w, b"x")  # level-triggered in the shared epoll: every thread sees it
        self.lot.close_parked()

    # -- serving threads ------------------------------------------------------------------------
    def _thread_main(self) -> None:
        """One serving thread: wait on the shared epoll, serve what it hands over, repeat.

        The thread that epoll wakes is the one that reads, runs the app and writes: no
        hand-off between threads on the request path. Connections are EPOLLONESHOT, so one
        readiness event goes to one thread; listeners are EPOLLEXCLUSIVE, so a new connection
        wakes a worker process that has a thread free, not every worker process.
        """
        poll = self.lot.ep.poll
        poll_lock = self.poll_lock
        parked = self.lot.parked
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
                        if conn.state is LINGER:
                            self.lot.discard(conn)
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
                        self.lot.close_now(conn)

    # -- per connection (the thread that owns it) ------------------------------------------------
    def serve(self, conn: Connection, must_read: bool = True) -> None:
        """Read, run the app, write, until the connection would block; then park it.

        Called when epoll reported the socket readable, so the first recv() is expected to
        return data (`must_read=False`: the caller has fed the first bytes already); after
        a response, with nothing buffered, the connection is parked at once instead of
        spending a recv() that would say EAGAIN.
        """
        sock = conn.sock
        reader = conn.reader
        # The keep-alive time runs from the last response, not from the last read: bytes
        # that begin no request (empty lines, RFC 9112 §2.2) must not keep it open.
        answered = False
        while True:
            while reader.ready:
                req = reader.ready.popleft()
                if not self.handle(conn, req):
                    if not req.keep_alive and not reader.ready and reader.cur is None:
                        # The client asked to close and sent nothing more we have seen: a
                        # plain close, as every server does. Closes of our own choosing
                        # (drain, errors) linger instead, so no request in flight gets a reset.
                        self.lot.close_now(conn)
                    else:
                        self.lot.close_graceful(conn)
                    return
                answered = True
                must_read = False
            if reader.error is not None:
                self.send_error(conn, *reader.error)
                return
            if reader.upgrade:  # WSGI cannot take over the socket: answered, now close
                self.lot.close_graceful(conn)
                return
            cur = reader.cur
            if cur is not None and cur.head_done:
                # Inside a request body: read with a deadline (the app runs on the whole body).
                if cur.expect_continue and not reader.continue_sent:
                    reader.continue_sent = True
                    try:
                        conn.send_all(CONTINUE_100)
                    except ClientGone:
                        self.lot.close_now(conn)
                        return
                data = conn.recv_wait(self.header_timeout)
                if data is None:
                    self.send_error(conn, 408, "request body not received within %.1fs"
                                    % self.header_timeout)
                    return
            elif cur is None and not must_read:
                self.lot.park(conn, restart_clock=answered)
                return
            else:
                must_read = False
                try:
                    data = sock.recv(RECV_SIZE)
                except (BlockingIOError, InterruptedError):
                    self.lot.park(conn, restart_clock=answered)
                    return
                except OSError as exc:
                    log.info("%s: connection error: %s", conn.remote(), exc)
                    self.lot.close_now(conn)
                    return
            if not data:
                if cur is not None and cur.head_done:
                    want = cur.content_length if cur.content_length is not None else "chunked"
                    log.warning("%s: client closed the connection with an incomplete request body "
                                "(%d of %s bytes); app not called", conn.remote(), cur.body_len, want)
                elif cur is not None:
                    log.info("%s: client closed the connection inside a request head", conn.remote())
                self.lot.close_now(conn)
                return
            if not conn.feed(data):
                self._reject(conn)
                return

    def _reject(self, conn: Connection) -> None:
        """A connection on a PROXY listener without a valid header: closed, no response."""
        self.proxy_rejects.reject(conn.remote(), conn.rejected)
        self.lot.close_now(conn)

    def send_error(self, conn: Connection, status: int, reason: str,
                   blocking: bool = True) -> None:
        """Answer with an error status and close. `blocking=False` (the main loop) makes one
        send attempt only: a client that does not read must not stall heartbeats."""
        log.warning("%s: %d %s: %s", conn.remote(), status, REASONS.get(status, ""), reason)
        response = self.framing.error_response(status)
        try:
            if blocking:
                conn.send_all(response)
            else:
                conn.sock.send(response)
        except ClientGone:
            self.lot.close_now(conn)
            return
        except OSError:
            pass  # best effort from the loop; the close below still happens
        self.lot.close_graceful(conn)

    # -- one request ----------------------------------------------------------------------------
    def handle(self, conn: Connection, req: Request) -> bool:
        """Run the app for one request; returns whether the connection stays open."""
        if self.static:
            mount = static.match(self.static, req.url)
            if mount is not None:
                return self.handle_static(conn, req, mount)
        counter = self.counter
        # In flight (timeouts.request) from now, when the app starts: the body was read
        # before, at the client's pace, and a slow upload is no stuck worker.
        token = counter.begin(time.monotonic()) if not conn.warmup else 0
        ex = Response(self.framing, conn, req, req.keep_alive and not conn.reader.upgrade)
        result: Any = None
        remote: Optional[str] = None  # the client a trusted proxy named, for the access log
        raised = False
        try:
            env = request_environ(conn.base_env(), req, self.script_name)
            if self.proxy is not None:
                remote = self.proxy.adjust_environ(env)
            result = self.app(env, ex.start_response)
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
                     req.method, req.target(), exc)
            ex.keep_alive = False
            ex.code = ex.code or 499
        except Exception:
            log.exception("%s: error in the application handling %s %s", conn.remote(),
                          req.method, req.target())
            raised = True
            ex.keep_alive = False
            if not ex.headers_sent:
                ex.internal_error()
        finally:
            if result is not None and hasattr(result, "close"):
                try:
                    result.close()
                except Exception:
                    log.exception("error in close() of the application's response")
            if req.spool is not None:
                req.spool.close()
            self.account(conn, req, ex, token, raised, remote)
        conn.served += 1
        return ex.keep_alive

    def handle_static(self, conn: Connection, req: Request, mount: static.Mount) -> bool:
        """Answer a request under a `static:` prefix (molt_shim/static.py's rules)."""
        token = self.counter.begin(time.monotonic()) if not conn.warmup else 0
        ex = Response(self.framing, conn, req, req.keep_alive and not conn.reader.upgrade)
        plan: Optional[static.Plan] = None
        try:
            # Inside the try: an error while planning (a symlink loop deep enough for a
            # RecursionError) must still end the request, or it stays in flight for ever.
            plan = static.plan(mount, req.method, req.url, req.env.get)
            ex.start_response("%d %s" % (plan.status, static.REASONS[plan.status]), plan.headers)
            if plan.fd >= 0:
                ex.send_file_range(plan.fd, plan.offset, plan.length)
            else:
                ex.finish_single(plan.body)
        except ClientGone as exc:
            log.info("%s: client disconnected during the response to %s %s: %s", conn.remote(),
                     req.method, req.target(), exc)
            ex.keep_alive = False
        finally:
            if plan is not None:
                plan.close()
            self.account(conn, req, ex, token, False, None)
        conn.served += 1
        return ex.keep_alive

    def account(self, conn: Connection, req: Request, ex: Response, token: Any, raised: bool,
                remote: Optional[str]) -> None:
        """A finished request in the counters, the request metrics and the access log; the
        warm-up's requests are in none of them."""
        if conn.warmup:
            return
        elapsed = time.monotonic() - req.started
        self.counter.end(token, ex.code, elapsed, raised)
        access = self.access_log
        if access is not None:
            access.put((remote or conn.remote(), req.method, req.url.decode("latin-1"),
                        "HTTP/" + req.version, ex.code, ex.bytes_sent, elapsed * 1000.0,
                        req.env if access.wants_request_headers else None,
                        ex.header_block if access.wants_response_headers else None))

    # -- warm-up: a real connection, through the same code path -----------------------------------
    def _adopt_warmup(self, sock: socket.socket) -> None:
        """Hand the warm-up's socketpair end to the serving threads, uncounted."""
        sock.setblocking(False)
        env = (self.listeners[0].env if self.listeners
               else listener_environ(self.base_env, None, False))
        conn = Connection(sock, "", env, self.limits, self.send_timeout)
        conn.warmup = True
        self.lot.add(conn)
        self.lot.park(conn)

    # -- main loop ----------------------------------------------------------------------------
    def run(self, loop: LoopHooks) -> None:
        """Serve until the lifecycle says stop. The main thread never touches a request: it
        opens the listeners to the serving threads, then runs the lifecycle's hooks and
        closes idle connections (the sweep)."""
        with self.listen_lock:
            for lst in self.listeners:
                lst.sock.setblocking(False)
                self.listener_fds[lst.fd] = lst
                self.lot.ep.register(lst.fd, EV_LISTEN)
        ep = select.epoll()
        for fd in loop.watch_fds():
            ep.register(fd, select.EPOLLIN)
        next_sweep = time.monotonic() + SWEEP_S
        try:
            while True:
                now = time.monotonic()
                # The lifecycle checks the drain on every wake-up, so a worker with nothing
                # left exits as soon as the drain starts, not at the next sweep (and the
                # rollover that waits for it completes that much sooner).
                delay = loop.tick(now)
                if delay is None:
                    return
                if now >= next_sweep:
                    next_sweep = now + SWEEP_S
                    self._sweep(now)
                # With no connection and no drain there is nothing to sweep: an idle worker
                # wakes only when the lifecycle has something to do (a heartbeat).
                if self.lot.conns or self.draining:
                    delay = min(delay, SWEEP_S)
                try:
                    events = ep.poll(delay)
                except InterruptedError:
                    continue
                for fd, _ in events:
                    if not loop.on_readable(fd):
                        ep.unregister(fd)
        finally:
            ep.close()

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
                    self.lot.ep.unregister(lst.fd)
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
                        sock = lst.wrap(sock)
                        conn = Connection(sock, peer, lst.env, self.limits, self.send_timeout,
                                          lst.proxy_protocol)
                    except BaseException:
                        sock.close()
                        raise
                    conn.state = BUSY
                    self.lot.add(conn)
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
                self.lot.close_now(conn)
            raise
        finally:
            # Back in the queue once the first bytes are read, before the app runs: a slow
            # first request must not stop this worker's other threads from accepting.
            if left:
                self._listen(lst, True)
        try:
            if first is None:
                self.lot.park(conn)
            elif not first:
                self.lot.close_now(conn)  # connected and left without a byte
            else:
                if conn.feed(first):
                    self.serve(conn, must_read=False)
                else:
                    self._reject(conn)
        except BaseException:  # a bug, or SystemExit from the app: never leak the connection
            log.exception("internal error while serving %s", conn.remote())
            self.lot.close_now(conn)

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
                    self.lot.ep.register(lst.fd, EV_LISTEN)
                    self.rejoin_failed.discard(lst)
                else:
                    self.lot.ep.unregister(lst.fd)
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

    def _overdue(self, conn: Connection, now: float) -> Overdue:
        """What the sweep owes a parked connection."""
        state = conn.state
        if state is LINGER:
            return Overdue.LINGER_DONE if now >= conn.linger_until else Overdue.NOTHING
        if state is not IDLE:
            return Overdue.NOTHING
        head_started = conn.reader.head_started
        # A connection that has not sent its first request yet gets the header timeout from
        # its accept, not the keepalive (which may be 0, or longer), except while draining.
        # From the accept, not from its last read: a PROXY header or a TLS handshake sent a
        # byte at a time parks it again and again, and must not hold it for ever.
        if not conn.served and not self.draining:
            if now - conn.accepted_at < self.header_timeout:
                return Overdue.NOTHING
            return Overdue.HEAD_TIMEOUT if head_started else Overdue.IDLE_TIMEOUT
        if head_started:
            late = now - head_started > self.header_timeout
            return Overdue.HEAD_TIMEOUT if late else Overdue.NOTHING
        limit = self.cfg.drain_idle_s if self.draining else self.keepalive
        return Overdue.IDLE_TIMEOUT if now - conn.idle_since >= limit else Overdue.NOTHING

    def _sweep(self, now: float) -> None:
        self.proxy_rejects.flush(now)
        for lst in list(self.rejoin_failed):
            self._listen(lst, True)
        for conn in list(self.lot.parked.values()):
            # A first look without owning the connection, so its fields may be stale: a
            # serving thread can take it, serve a request and park it again in between.
            # So the verdict is taken again once the sweep owns it.
            if self._overdue(conn, now) is Overdue.NOTHING or not self.lot.take(conn):
                continue
            verdict = self._overdue(conn, now)
            if verdict is Overdue.IDLE_TIMEOUT and conn.request_waiting():
                verdict = Overdue.NOTHING
            if verdict is Overdue.NOTHING:
                self.lot.park(conn, conn.state, restart_clock=False)  # back to epoll, re-armed
            elif verdict is Overdue.LINGER_DONE:
                self.lot.close_now(conn)
            elif verdict is Overdue.HEAD_TIMEOUT:
                conn.state = BUSY
                self.send_error(conn, 408, "request head not complete within %.1fs"
                                % self.header_timeout, blocking=False)
            else:
                conn.state = BUSY
                self.lot.close_graceful(conn)

    # -- drain and stop ----------------------------------------------------------------------------
    def stop_accepting(self) -> None:
        if self.draining:
            return
        self.draining = True
        self.framing.closing = True  # every response from now on says Connection: close
        # Stop accepting now. Closing our descriptor leaves the shared socket (and the
        # connections queued in it) to the other workers; shutdown() would break them all.
        with self.listen_lock:
            for lst in self.listeners:
                self.listener_fds.pop(lst.fd, None)
                try:
                    self.lot.ep.unregister(lst.fd)
                except (OSError, ValueError):
                    pass
                self._take_backlog(lst)
                lst.sock.close()

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
            conn = Connection(lst.wrap(sock), peer, lst.env, self.limits, self.send_timeout,
                              lst.proxy_protocol)
            self.lot.add(conn)
            self.lot.park(conn)


def create(ctx: EngineContext) -> ThreadedWSGIEngine:
    refuse_proxied_tls(ctx, "this worker runs the Python engine")
    return ThreadedWSGIEngine(ctx)


def refuse_proxied_tls(ctx: EngineContext, why: str) -> None:
    """The config allows `proxy_protocol` together with `tls` on a listener only where the
    native engine serves; a worker that falls back to this engine (the extension cannot load,
    or the native engine did not start) must not serve it wrong: EngineUnavailable, with why
    it has no native engine."""
    both = [name for _, name in ctx.listeners
            if ctx.cfg.proxy_protocol(name) and ctx.cfg.listener_options(name).get("tls")]
    if both:
        raise EngineUnavailable(
            "listen %s: proxy_protocol together with tls needs the native engine, which reads "
            "the PROXY header before the TLS handshake, and %s" % (", ".join(both), why))
