"""The PROXY protocol for the ASGI engine: a protocol that reads the header, then hands the
connection to uvicorn's protocol with the client address the header named."""
from __future__ import annotations

import asyncio
from typing import Any, Callable, Optional

from .. import proxyproto


class ProxiedTransport:
    """The transport as uvicorn should see it: the peer is the client the header named.

    uvicorn asks the socket for the peer first, so the socket is hidden; `sockname` still
    answers for the server address."""

    def __init__(self, transport: Any, peer: Any) -> None:
        self._t = transport
        self._peer = peer

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        if name == "socket":
            return None
        if name == "peername":
            return self._peer
        return self._t.get_extra_info(name, default)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._t, name)


class ProxyPreamble(asyncio.Protocol):
    """Owns a new connection on a PROXY listener until its header is complete, then gives the
    transport to `inner` (uvicorn's protocol). An invalid header, EOF or `timeout_s` without a
    complete header closes the connection without a response."""

    def __init__(self, inner: Any, loop: asyncio.AbstractEventLoop, timeout_s: float,
                 rejects: proxyproto.RejectLog, on_gone: Callable[[Any], None]) -> None:
        self.inner = inner
        self.loop = loop
        self.timeout_s = timeout_s
        self.rejects = rejects
        self.on_gone = on_gone  # the inner protocol never started: forget it
        self.reader = proxyproto.HeaderReader()
        self.transport: Any = None
        self.timer: Optional[asyncio.TimerHandle] = None
        self.handed_over = False

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        self.timer = self.loop.call_later(self.timeout_s, self._reject, "no complete header "
                                          "within %.1fs" % self.timeout_s)

    def data_received(self, data: bytes) -> None:
        try:
            verdict = self.reader.feed(data)
        except proxyproto.Invalid as exc:
            self._reject(str(exc))
            return
        if verdict == proxyproto.NEED_MORE:
            return
        header, rest = verdict
        if self.timer is not None:
            self.timer.cancel()
        transport = self.transport
        if header.source is not None:
            transport = ProxiedTransport(transport, header.source)
        self.handed_over = True
        self.transport.set_protocol(self.inner)
        self.inner.connection_made(transport)
        if rest:
            self.inner.data_received(rest)

    def eof_received(self) -> bool:
        self._reject("connection closed before the header was complete")
        return False

    def connection_lost(self, exc: Optional[BaseException]) -> None:
        if self.timer is not None:
            self.timer.cancel()
        if not self.handed_over:
            self.on_gone(self.inner)

    def _reject(self, reason: str) -> None:
        if self.handed_over or self.transport is None or self.transport.is_closing():
            return
        try:
            peer = self.transport.get_extra_info("peername")  # an IPv6 one has four items
            where = "unix"
            if isinstance(peer, tuple):
                where = ("[%s]:%s" if ":" in peer[0] else "%s:%s") % (peer[0], peer[1])
            self.rejects.reject(where, reason)
        finally:
            self.transport.abort()  # no response, and no lingering for a client we do not serve
