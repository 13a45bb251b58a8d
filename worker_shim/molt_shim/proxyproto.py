"""The PROXY protocol (HAProxy's, v1 text and v2 binary) on listeners with `proxy_protocol: true`.

A load balancer (HAProxy, AWS NLB, ...) opens each connection with one header that says who the
client is; the HTTP request follows. On such a listener a connection that does not start with a
valid header is closed without a response (it did not come through the balancer, or the
balancer is misconfigured), and that is logged once per burst, not once per connection.

`HeaderReader` is the pure, incremental parser (bytes in, a verdict out); the engines feed it
the first bytes of each connection on a PROXY listener.
"""
from __future__ import annotations

import ipaddress
import logging
import struct
import time
from dataclasses import dataclass
from typing import Any, Callable, Optional, Tuple, Union

from .addresses import ip_text, parse_ip

log = logging.getLogger("molt_shim")

V1_PREFIX = b"PROXY "
V1_MAX = 107  # the spec's longest v1 line, CRLF included
V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
V2_FIXED = 16  # signature, version/command, family/protocol, length
V2_MAX_BODY = 4096  # addresses plus TLVs; a real balancer sends far less

Address = Union[Tuple[str, int], str]  # (ip, port), or a unix socket path


@dataclass(frozen=True)
class Header:
    """A parsed header. `source` None: keep the socket's peer (LOCAL, UNKNOWN, UNSPEC)."""

    version: int
    command: str  # "PROXY" or "LOCAL"
    family: str  # "TCP4", "TCP6", "UNIX", "UNKNOWN"
    source: Optional[Address]
    destination: Optional[Address]


class Invalid(ValueError):
    pass


NEED_MORE = "need-more"


class HeaderReader:
    """Accumulates a connection's first bytes until the header is complete.

    feed() returns NEED_MORE, or (Header, the bytes after it); raises Invalid as soon as the
    bytes cannot be a header (plain HTTP fails at its first byte)."""

    __slots__ = ("buf",)

    def __init__(self) -> None:
        self.buf = b""

    def feed(self, data: bytes) -> Union[str, Tuple[Header, bytes]]:
        buf = self.buf = self.buf + data
        if buf[:1] == b"P":
            return self._v1(buf)
        if buf[:1] == b"\r":
            return self._v2(buf)
        raise Invalid("not a PROXY protocol header")

    def _v1(self, buf: bytes) -> Union[str, Tuple[Header, bytes]]:
        if not buf.startswith(V1_PREFIX[:len(buf)]):
            raise Invalid("not a PROXY protocol header")
        end = buf.find(b"\r\n", 0, V1_MAX)
        if end < 0:
            if len(buf) >= V1_MAX:
                raise Invalid("PROXY v1 line longer than %d bytes" % V1_MAX)
            return NEED_MORE
        return parse_v1(buf[:end]), buf[end + 2:]

    def _v2(self, buf: bytes) -> Union[str, Tuple[Header, bytes]]:
        if not buf.startswith(V2_SIGNATURE[:len(buf)]):
            raise Invalid("not a PROXY protocol header")
        if len(buf) < V2_FIXED:
            return NEED_MORE
        length = struct.unpack("!H", buf[14:16])[0]
        if length > V2_MAX_BODY:
            raise Invalid("PROXY v2 header of %d bytes" % length)
        if len(buf) < V2_FIXED + length:
            return NEED_MORE
        return parse_v2(buf[12], buf[13], buf[V2_FIXED:V2_FIXED + length]), \
            buf[V2_FIXED + length:]


def _ip_port(address: str, port_text: str, version: int) -> Tuple[str, int]:
    try:
        ip = parse_ip(address)
    except ValueError:
        raise Invalid("bad address %r" % address[:60]) from None
    if ip.version != version:
        raise Invalid("address %s is not IPv%d" % (address, version))
    if not port_text.isdigit() or (len(port_text) > 1 and port_text[0] == "0") \
            or int(port_text) > 65535:
        raise Invalid("bad port %r" % port_text[:10])
    return ip_text(ip), int(port_text)


def parse_v1(line: bytes) -> Header:
    """`PROXY TCP4 src dst sport dport`, `PROXY TCP6 ...` or `PROXY UNKNOWN[ ...]` (no CRLF)."""
    try:
        text = line.decode("ascii")
    except UnicodeDecodeError:
        raise Invalid("PROXY v1 line is not ASCII") from None
    parts = text.split(" ")
    if len(parts) < 2 or parts[0] != "PROXY":
        raise Invalid("bad PROXY v1 line")
    if parts[1] == "UNKNOWN":
        return Header(1, "PROXY", "UNKNOWN", None, None)
    if parts[1] not in ("TCP4", "TCP6") or len(parts) != 6:
        raise Invalid("bad PROXY v1 line %r" % text[:60])
    version = 4 if parts[1] == "TCP4" else 6
    return Header(1, "PROXY", parts[1], _ip_port(parts[2], parts[4], version),
                  _ip_port(parts[3], parts[5], version))


def _unix_path(raw: bytes) -> str:
    return raw.split(b"\x00", 1)[0].decode("utf-8", "replace")


def parse_v2(ver_cmd: int, family: int, body: bytes) -> Header:
    if ver_cmd >> 4 != 2:
        raise Invalid("PROXY v2 version %d" % (ver_cmd >> 4))
    command = ver_cmd & 0x0F
    if command == 0:  # LOCAL: the balancer's own connection (health checks); keep the peer
        return Header(2, "LOCAL", "UNKNOWN", None, None)
    if command != 1:
        raise Invalid("PROXY v2 command %d" % command)
    address_family, transport = family >> 4, family & 0x0F
    if address_family == 0:
        return Header(2, "PROXY", "UNKNOWN", None, None)
    if transport != 1:  # only STREAM carries HTTP
        raise Invalid("PROXY v2 transport %d is not STREAM" % transport)
    if address_family == 1:
        if len(body) < 12:
            raise Invalid("PROXY v2 TCP4 addresses truncated")
        src, dst, sport, dport = struct.unpack("!4s4sHH", body[:12])
        return Header(2, "PROXY", "TCP4", (str(ipaddress.IPv4Address(src)), sport),
                      (str(ipaddress.IPv4Address(dst)), dport))
    if address_family == 2:
        if len(body) < 36:
            raise Invalid("PROXY v2 TCP6 addresses truncated")
        src, dst, sport, dport = struct.unpack("!16s16sHH", body[:36])
        return Header(2, "PROXY", "TCP6", (ip_text(ipaddress.IPv6Address(src)), sport),
                      (ip_text(ipaddress.IPv6Address(dst)), dport))
    if address_family == 3:
        if len(body) < 216:
            raise Invalid("PROXY v2 UNIX addresses truncated")
        return Header(2, "PROXY", "UNIX", _unix_path(body[:108]), _unix_path(body[108:216]))
    raise Invalid("PROXY v2 address family %d" % address_family)


class RejectLog:
    """One log line per burst of connections without a valid header: the first one is logged at
    once, the ones that follow within `window_s` are counted and reported in one line when the
    window is over (at the next rejection, or from `flush()` on the engine's tick)."""

    def __init__(self, window_s: float = 10.0,
                 clock: Callable[[], float] = time.monotonic,
                 emit: Optional[Callable[[str], Any]] = None) -> None:
        self.window_s = window_s
        self.clock = clock
        self.emit = emit or log.warning
        self.window_end = 0.0
        self.suppressed = 0
        self.last_reason = ""

    def reject(self, listener: str, reason: str) -> None:
        now = self.clock()
        if now < self.window_end:
            self.suppressed += 1
            self.last_reason = reason
            return
        self.flush(now)
        self.window_end = now + self.window_s
        self.emit("%s: closed a connection without a valid PROXY protocol header (%s); more in "
                  "the next %.0fs are counted, not logged" % (listener, reason, self.window_s))

    def flush(self, now: Optional[float] = None) -> None:
        now = self.clock() if now is None else now
        if self.suppressed and now >= self.window_end:
            self.emit("closed %d more connections without a valid PROXY protocol header "
                      "(last: %s)" % (self.suppressed, self.last_reason))
            self.suppressed = 0
