"""Connections of the threaded WSGI engine, and the one-shot epoll protocol that says who owns
one: a serving thread, the sweep, or nobody (parked, waiting in epoll).

A parked connection sits in `Parking.parked`; taking one is `parked.pop(fd)`, a single atomic
dict operation, which is what lets serving threads and the sweep race for a connection without
locks. Connections are registered EPOLLONESHOT: one readiness event goes to one thread, which
owns the connection until it parks it again (re-arms the fd).
"""
from __future__ import annotations

import enum
import os
import select
import socket
import time
from typing import Any, Dict, Optional

from .. import proxyproto, tls
from ..wsgi.request import Limits, RequestReader, connection_environ
from ..wsgi.response import ClientGone

EV_ARM = select.EPOLLIN | select.EPOLLONESHOT
RECV_SIZE = 65536
LINGER_S = 2.0  # how long a closing connection is read-discarded before the final close()
SEND_TIMEOUT_S = 30.0  # http.send_timeout's default; the engine passes the configured one


class ConnState(enum.Enum):
    IDLE = "idle"  # parked, waiting in epoll for the next request
    BUSY = "busy"  # owned by one thread (serving) or by the sweep
    LINGER = "linger"  # parked after shutdown(SHUT_WR), read-discarding until the peer's FIN
    CLOSED = "closed"


IDLE, BUSY, LINGER, CLOSED = ConnState.IDLE, ConnState.BUSY, ConnState.LINGER, ConnState.CLOSED


class Connection:
    """One client connection: its socket, its request reader and its parked state.

    Both `send_all` and `sendfile_all` make it the response's `Sink` (wsgi/response.py)."""

    __slots__ = ("sock", "fd", "peer", "listener_env", "reader", "state", "idle_since",
                 "accepted_at", "linger_until", "in_epoll", "warmup", "_env", "served",
                 "send_timeout", "preamble", "rejected", "tls")

    def __init__(self, sock: socket.socket, peer: Any, listener_env: Dict[str, Any],
                 limits: Limits, send_timeout: float = SEND_TIMEOUT_S,
                 proxy_protocol: bool = False) -> None:
        self.sock = sock
        # http.send_timeout: the longest a response waits for its client to take more bytes
        # (nginx's send_timeout). A client that reads nothing costs its serving thread this
        # long at most; one that keeps reading, however slowly, is never cut off.
        self.send_timeout = send_timeout
        self.fd = sock.fileno()
        self.peer = peer
        self.listener_env = listener_env
        self.reader = RequestReader(limits)
        self.state = IDLE
        self.idle_since = self.accepted_at = time.monotonic()
        self.linger_until = 0.0
        self.in_epoll = False
        self.warmup = False
        self._env: Optional[Dict[str, Any]] = None
        self.served = 0
        # On a PROXY listener: the header reader until the header is complete.
        self.preamble: Optional[proxyproto.HeaderReader] = (
            proxyproto.HeaderReader() if proxy_protocol else None)
        self.rejected = ""  # why the PROXY header was refused: close without a response
        self.tls = isinstance(sock, tls.ServerSocket)

    def feed(self, data: bytes) -> bool:
        """Bytes from the client to the request reader, past the PROXY header on a PROXY
        listener. False: the header is invalid (`rejected` says why); close, answer nothing."""
        preamble = self.preamble
        if preamble is None:
            self.reader.feed(data)
            return True
        try:
            verdict = preamble.feed(data)
        except proxyproto.Invalid as exc:
            self.rejected = str(exc)
            return False
        if verdict == proxyproto.NEED_MORE:
            return True
        header, rest = verdict
        self.preamble = None
        if header.source is not None:
            self.peer = header.source
            self._env = None
        if rest:
            self.reader.feed(rest)
        return True

    def base_env(self) -> Dict[str, Any]:
        """The environ every request of this connection shares (built on first use)."""
        env = self._env
        if env is None:
            env = connection_environ(self.listener_env, self.peer)
            if self.tls:  # built on the first request: the handshake is done
                env.update(tls.connection_environ(self.sock))
            self._env = env
        return env

    def remote(self) -> str:
        peer = self.peer
        if isinstance(peer, tuple):
            return "%s:%s" % (peer[0], peer[1])
        return "unix:%s" % (peer or "")

    # -- socket I/O (the socket is non-blocking; waits use poll with a deadline) ----------------
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
        while view:
            self.wait_writable()
            try:
                view = view[sock.send(view):]
            except (BlockingIOError, InterruptedError):
                pass
            except OSError as exc:
                raise ClientGone(str(exc)) from None

    def sendfile_all(self, fd: int, offset: int, size: int, head: bytes = b"") -> int:
        # Corked (TCP_CORK), the head and the file leave in full-sized segments, the head in
        # the first; without it (TCP_NODELAY is on) the head goes alone and sendfile() cuts
        # the file wherever the send buffer had room: the native engine's `Corked`.
        tcp = self.sock.family != socket.AF_UNIX
        if tcp:
            self._cork(1)
        try:
            if head:
                self.send_all(head)
            return self._send_file(fd, offset, size)
        finally:
            if tcp:
                self._cork(0)  # sends what is left at once

    def _cork(self, on: int) -> None:
        try:
            self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_CORK, on)
        except OSError:
            pass  # the peer is gone: the send says so

    def _send_file(self, fd: int, offset: int, size: int) -> int:
        if self.tls:
            return tls.copy_file(self.send_all, fd, offset, size)
        total = 0
        while size > 0:
            try:
                sent = os.sendfile(self.fd, fd, offset, min(size, 1 << 30))
            except (BlockingIOError, InterruptedError):
                self.wait_writable()
                continue
            except OSError as exc:
                raise ClientGone(str(exc)) from None
            if sent == 0:
                break  # file shrank under us
            offset += sent
            size -= sent
            total += sent
        return total

    def wait_writable(self) -> None:
        """Until the client has taken bytes from the socket's send buffer; ClientGone after
        send_timeout without any."""
        if not self.wait(select.POLLOUT, self.send_timeout):
            raise ClientGone("the client took no response bytes for %.1fs (http.send_timeout)"
                             % self.send_timeout)

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

    def request_waiting(self) -> bool:
        """Whether the client already sent its next request. Closing such an "idle" connection
        would lose that request (the keep-alive race every HTTP/1.1 server has); with this
        check the window shrinks to bytes still on the wire. The pending epoll event then
        delivers the request as usual. Empty lines alone begin no request (RFC 9112 §2.2):
        they do not keep the connection (a TLS connection's bytes are records: any will do)."""
        try:
            data = self.sock.recv(64, socket.MSG_PEEK | socket.MSG_DONTWAIT)
        except OSError:  # nothing there (EAGAIN), or the connection is broken: close it
            return False
        return bool(data.strip(b"\r\n")) or (bool(data) and self.tls)


class Parking:
    """Every open connection (`conns`), the parked subset (`parked`) and the shared epoll
    (`ep`) the serving threads wait on."""

    def __init__(self) -> None:
        self.conns: Dict[int, Connection] = {}
        self.parked: Dict[int, Connection] = {}
        self.ep = select.epoll()

    def add(self, conn: Connection) -> None:
        """A new connection, owned by the caller until it parks it."""
        self.conns[conn.fd] = conn

    def park(self, conn: Connection, state: ConnState = IDLE, restart_clock: bool = True) -> None:
        """Give a connection back to epoll (one-shot), to be taken by the next event.
        `restart_clock=False` keeps its idle and linger timers (the sweep giving it back)."""
        conn.state = state
        if restart_clock:
            now = time.monotonic()
            conn.idle_since = now
            if state is LINGER:
                conn.linger_until = now + LINGER_S
        fd = conn.fd
        self.parked[fd] = conn  # before arming: the event may fire at once
        try:
            self.arm(conn)
        except OSError:
            # Failing to arm means the fd is gone (another owner closed it) or the kernel is
            # out of memory. Close it if it is still ours; never take a newer connection
            # that reused the fd number.
            taken = self.parked.pop(fd, None)
            if taken is conn:
                self.close_now(conn)
            elif taken is not None:
                self.parked[fd] = taken

    def arm(self, conn: Connection) -> None:
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
        if conn.state is CLOSED:
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
        conn.reader.release()
        try:
            conn.sock.close()
        except OSError:
            pass

    def discard(self, conn: Connection) -> None:
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

    def take(self, conn: Connection) -> bool:
        """Claim a parked connection (the sweep, or close()); False when a serving thread got it.
        Never a newer connection that reused its fd number: the sweep walks a list made
        before, in which a connection may since have been closed and its number given to
        another (which must stay parked, or its next event finds no owner)."""
        fd = conn.fd
        if self.parked.get(fd) is not conn:
            return False
        taken = self.parked.pop(fd, None)
        if taken is not None and taken is not conn:
            self.parked[fd] = taken
        return taken is conn

    def close_parked(self) -> None:
        """The engine stops: close what no thread owns."""
        for conn in list(self.parked.values()):
            if self.take(conn):
                self.close_now(conn)
