"""Trusted forwarding headers: who the client is when a proxy stands in between.

The one copy of the rule for every engine (`proxy:` in the config). A peer the config trusts
may tell, with `X-Forwarded-For/-Proto/-Host/-Port` or RFC 7239 `Forwarded`, the scheme, client
address and port, and host the app should see. The client is the right-most address of the
chain that is not itself trusted (every proxy appends the address it got the request from, so
everything left of the first untrusted hop could be made up by the client). From a peer that
is not trusted nothing changes. Each header is judged on its own: a malformed one is ignored
with a debug line, never an error, and the others still count (a client behind the proxy
writes the left part of every list, so one bad value must not undo the proxy's own); hops left
of the client's are never parsed at all, in X-Forwarded-For as in `Forwarded`.

`resolve()` is the pure rule (strings in, a `Forwarded` out); `ProxyRule.adjust_environ()` and
`ProxyRule.adjust_scope()` apply it to a WSGI environ and an ASGI scope.
"""
from __future__ import annotations

import ipaddress
import logging
import re
from dataclasses import dataclass
from typing import (Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple,
                    TypeVar, Union)

from .addresses import Address, ip_text, parse_ip

log = logging.getLogger("molt_shim")

ALL_HEADERS = ("x-forwarded-for", "x-forwarded-proto", "x-forwarded-host", "x-forwarded-port",
               "forwarded")
# What `proxy.headers` honours unless it says otherwise: the two headers every proxy sets (nginx's
# `$proxy_add_x_forwarded_for` and `$scheme`, HAProxy's `option forwardfor`, the cloud load
# balancers), as uvicorn's --proxy-headers and Werkzeug's ProxyFix. A proxy that does not set
# a header passes the client's own through, so honouring it by default lets any client choose
# its host (X-Forwarded-Host: password-reset links to another site) or, with Forwarded, which
# wins, its address.
DEFAULT_HEADERS = ("x-forwarded-for", "x-forwarded-proto")
# WSGI environ key of each header.
ENVIRON_KEYS = {name: "HTTP_" + name.upper().replace("-", "_") for name in ALL_HEADERS}
DEFAULT_PORTS = {"http": 80, "https": 443}

Network = Union[ipaddress.IPv4Network, ipaddress.IPv6Network]
T = TypeVar("T")
# RFC 3986 reg-name / IPv4 / [IPv6], with an optional port; no spaces, slashes or '@'.
_HOST_RE = re.compile(r"^(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9._~!$&'()*+,;=%-]+)(?::([0-9]{1,5}))?$")
_TOKEN_RE = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")


class Malformed(ValueError):
    """A forwarding header that cannot be understood; the request goes on without it."""


@dataclass(frozen=True)
class Forwarded:
    """What a trusted proxy said about the client; None: not said (keep what the socket says)."""

    scheme: Optional[str] = None
    client: Optional[str] = None  # an IP address, without brackets
    client_port: Optional[int] = None
    host: Optional[str] = None  # the name only (an IPv6 literal keeps its brackets)
    port: Optional[int] = None  # from the host, else from X-Forwarded-Port

    def __bool__(self) -> bool:
        return any(v is not None for v in (self.scheme, self.client, self.host, self.port))


class Trust:
    """The `proxy.trusted` list: addresses, CIDRs, `unix` and `*`."""

    def __init__(self, entries: Iterable[str]) -> None:
        self.everyone = False
        self.unix = False
        self.networks: List[Network] = []
        for entry in entries:
            entry = str(entry).strip()
            if entry == "*":
                self.everyone = True
            elif entry == "unix":
                self.unix = True
            elif entry:
                try:
                    self.networks.append(ipaddress.ip_network(entry, strict=False))
                except ValueError:
                    log.warning("proxy.trusted: ignoring %r (not an address or a CIDR)", entry)
        self._cache: Dict[str, bool] = {}

    def __bool__(self) -> bool:
        return self.everyone or self.unix or bool(self.networks)

    def address(self, text: str) -> bool:
        """Whether an IP address (text) is trusted; False for anything that is not one."""
        cached = self._cache.get(text)
        if cached is not None:
            return cached
        try:
            ip = parse_ip(text)
        except ValueError:
            verdict = False
        else:
            if ip.version == 6 and ip.ipv4_mapped is not None:
                ip = ip.ipv4_mapped  # ::ffff:10.0.0.1 is 10.0.0.1 (a dual-stack listener)
            verdict = self.everyone or any(ip in net for net in self.networks)
        if len(self._cache) < 4096:  # bounded: addresses are the clients'
            self._cache[text] = verdict
        return verdict

    def peer(self, address: Optional[str], is_unix: bool) -> bool:
        """Whether the connection's peer is trusted (a unix socket peer has no address)."""
        if is_unix:
            return self.everyone or self.unix
        return address is not None and self.address(address)


# -- parsing ----------------------------------------------------------------------------------
def _split_list(value: str) -> List[str]:
    return [part.strip() for part in value.split(",")]


def _node(text: str, brackets_required: bool) -> Tuple[Optional[str], Optional[int]]:
    """An address with an optional port: `1.2.3.4`, `1.2.3.4:5`, `[::1]`, `[::1]:5`, and (X-F-F
    only) a bare `::1`. Returns (None, None) for RFC 7239's `unknown` and `_obfuscated` nodes."""
    if text.lower() == "unknown" or text.startswith("_"):  # RFC 7239's tokens: any case
        return None, None
    port: Optional[int] = None
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            raise Malformed("unclosed [ in %r" % text)
        host, rest = text[1:end], text[end + 1:]
        if rest:
            if not rest.startswith(":"):
                raise Malformed("junk after ] in %r" % text)
            port = _port(rest[1:])
        ip = _ip(host)
        if ip.version != 6:
            raise Malformed("[%s] is not an IPv6 address" % host)
        return ip_text(ip), port
    if text.count(":") == 1:
        host, _, port_text = text.partition(":")
        port = _port(port_text)
        ip = _ip(host)
        if ip.version != 4:
            raise Malformed("%r is not an IPv4 address" % host)
        return ip_text(ip), port
    if ":" in text and brackets_required:
        raise Malformed("IPv6 address %r without brackets" % text)
    return ip_text(_ip(text)), None


def _ip(text: str) -> Address:
    try:
        return parse_ip(text)
    except ValueError:
        raise Malformed("%r is not an IP address" % text[:100]) from None


def _port(text: str) -> int:
    # ASCII digits: "²".isdigit() is True, and int() refuses it.
    if not (text.isascii() and text.isdigit()) or not 0 < int(text) < 65536:
        raise Malformed("%r is not a port" % text[:20])
    return int(text)


def _scheme(text: str) -> str:
    scheme = text.strip().lower()
    if scheme not in DEFAULT_PORTS:
        raise Malformed("scheme %r is not http or https" % text[:20])
    return scheme


def _host(text: str) -> Tuple[str, Optional[int]]:
    match = _HOST_RE.match(text.strip())
    if match is None or len(text) > 255:
        raise Malformed("%r is not a host[:port]" % text[:100])
    return match.group(1), _port(match.group(2)) if match.group(2) else None


def parse_forwarded(value: str) -> List[Dict[str, str]]:
    """RFC 7239: comma-separated elements of `;`-separated `name=value` pairs (value a token or
    a quoted string). Names are lower-cased; a quoted value is unquoted."""
    elements: List[Dict[str, str]] = []
    i, n = 0, len(value)
    element: Dict[str, str] = {}
    while i < n:
        while i < n and value[i] in " \t":
            i += 1
        eq = value.find("=", i)
        if eq < 0:
            raise Malformed("pair without '=' in Forwarded")
        name = value[i:eq].strip().lower()
        if not _TOKEN_RE.match(name):
            raise Malformed("bad parameter name %r in Forwarded" % name[:40])
        i = eq + 1
        if i < n and value[i] == '"':
            out = []
            i += 1
            while i < n and value[i] != '"':
                if value[i] == "\\" and i + 1 < n:
                    i += 1
                out.append(value[i])
                i += 1
            if i >= n:
                raise Malformed("unclosed quoted string in Forwarded")
            i += 1
            text = "".join(out)
        else:
            start = i
            while i < n and value[i] not in ";, \t":
                i += 1
            text = value[start:i]
            if not _TOKEN_RE.match(text):
                raise Malformed("bad value %r in Forwarded" % text[:40])
        if name in element:
            raise Malformed("parameter %r twice in one Forwarded element" % name)
        element[name] = text
        while i < n and value[i] in " \t":
            i += 1
        if i < n and value[i] == ";":
            i += 1
        elif i < n and value[i] == ",":
            elements.append(element)
            element = {}
            i += 1
        elif i < n:
            raise Malformed("junk after a value in Forwarded")
    if not element:
        raise Malformed("empty element in Forwarded")
    elements.append(element)
    return elements


# -- the rule ---------------------------------------------------------------------------------
Node = Tuple[Optional[str], Optional[int]]  # (address, port); (None, None): unknown, obfuscated


def _client_hop(hops: Sequence[T], node: Callable[[T], Node], trust: Trust) -> Tuple[int, Node]:
    """The right-most hop that is not trusted (an `unknown` one never is), and its node; the
    left-most when every hop is trusted. Read from the right: hops left of the client's are
    the client's own writing and are never parsed (a malformed one there changes nothing)."""
    found: Node = (None, None)
    for index in range(len(hops) - 1, -1, -1):
        found = node(hops[index])
        if found[0] is None or not trust.address(found[0]):
            return index, found
    return 0, found


def _forwarded_node(element: Dict[str, str]) -> Node:
    return _node(element["for"], True) if "for" in element else (None, None)


def _xff_node(part: str) -> Node:
    return _node(part, False)


def _judged(what: str, parse: Callable[[], T]) -> Optional[T]:
    """One header's value, or None (with a debug line) when it is malformed."""
    try:
        return parse()
    except Malformed as exc:
        log.debug("ignoring %s: %s", what, exc)
        return None


def _forwarded_elements(value: str) -> List[str]:
    """RFC 7239's elements, split at the commas outside quoted strings, found from the right:
    the proxies' elements (on the right) come out whole even when the client's part, left of
    them, opened a quote it never closed."""
    parts: List[str] = []
    end = len(value)
    quoted = False
    for i in range(len(value) - 1, -1, -1):
        c = value[i]
        if c == '"' and (i == 0 or value[i - 1] != "\\"):
            quoted = not quoted
        elif c == "," and not quoted:
            parts.append(value[i + 1:end])
            end = i
    parts.append(value[:end])
    parts.reverse()
    return parts


def _forwarded_element(text: str) -> Dict[str, str]:
    elements = parse_forwarded(text)
    if len(elements) != 1:
        raise Malformed("a comma inside a Forwarded element")
    return elements[0]


def _from_forwarded(value: str, trust: Trust) -> Forwarded:
    parts = _forwarded_elements(value)
    elements: Dict[int, Dict[str, str]] = {}

    def node(index: int) -> Node:  # each element parsed only when the walk reaches it
        elements[index] = _forwarded_element(parts[index])
        return _forwarded_node(elements[index])

    hop, (client, client_port) = _client_hop(range(len(parts)), node, trust)
    element = elements[hop]
    host_port = _judged("Forwarded host", lambda: _host(element["host"])) \
        if "host" in element else None
    host, port = host_port if host_port is not None else (None, None)
    scheme = _judged("Forwarded proto", lambda: _scheme(element["proto"])) \
        if "proto" in element else None
    return Forwarded(scheme, client, client_port, host, port)


def _per_hop(values: List[str], hop: int, hops: int, name: str) -> str:
    """One value of an X-Forwarded-Proto/-Host/-Port list: the only one, or the chosen hop's
    when there is one per hop."""
    if len(values) == 1:
        return values[0]
    if len(values) == hops:
        return values[hop]
    raise Malformed("%s has %d values for %d hops" % (name, len(values), hops))


def _from_x_forwarded(headers: Mapping[str, str], honoured: Sequence[str],
                      trust: Trust) -> Forwarded:
    hop, hops = 0, 1  # without a client hop, only a single value per header applies
    client = client_port = None
    if "x-forwarded-for" in honoured and headers.get("x-forwarded-for"):
        parts = _split_list(headers["x-forwarded-for"])
        try:
            hop, (client, client_port) = _client_hop(parts, _xff_node, trust)
            hops = len(parts)
        except Malformed as exc:
            log.debug("ignoring X-Forwarded-For: %s", exc)

    def value(name: str, label: str) -> Optional[str]:
        if name not in honoured or not headers.get(name):
            return None
        return _judged(label, lambda: _per_hop(_split_list(headers[name]), hop, hops, label))

    proto = value("x-forwarded-proto", "X-Forwarded-Proto")
    scheme = _judged("X-Forwarded-Proto", lambda: _scheme(proto)) if proto is not None else None
    host = port = None
    host_text = value("x-forwarded-host", "X-Forwarded-Host")
    if host_text is not None:
        host, port = _judged("X-Forwarded-Host", lambda: _host(host_text)) or (None, None)
    port_text = value("x-forwarded-port", "X-Forwarded-Port")
    if port_text is not None and port is None:
        port = _judged("X-Forwarded-Port", lambda: _port(port_text))
    return Forwarded(scheme, client, client_port, host, port)


def resolve(headers: Mapping[str, str], honoured: Sequence[str], trust: Trust,
            peer_trusted: bool) -> Forwarded:
    """The pure rule. `headers`: lower-case name -> value (repeated fields joined with ",").
    An empty Forwarded when the peer is not trusted or nothing usable is sent; what is
    malformed is logged at debug level and left out."""
    if not peer_trusted:
        return Forwarded()
    if "forwarded" in honoured and headers.get("forwarded"):
        # When honoured and sent, it decides: broken in the proxies' part, nothing is taken
        # from it, nor from headers the proxy that sets it may not set (they are the client's).
        try:
            return _from_forwarded(headers["forwarded"], trust)
        except Malformed as exc:
            log.debug("ignoring Forwarded: %s", exc)
            return Forwarded()
    return _from_x_forwarded(headers, honoured, trust)


def host_header(host: str, port: Optional[int], scheme: str) -> str:
    if port is None or DEFAULT_PORTS.get(scheme) == port:
        return host
    return "%s:%d" % (host, port)


# -- the engines' side --------------------------------------------------------------------------
class ProxyRule:
    """The rule with the config's trust and header list, applied to an environ or a scope."""

    def __init__(self, trusted: Iterable[str], headers: Iterable[str]) -> None:
        self.trust = Trust(trusted)
        self.honoured = tuple(h for h in (str(x).lower() for x in headers) if h in ALL_HEADERS)
        self.environ_keys = tuple((ENVIRON_KEYS[h], h) for h in self.honoured)
        self.header_names = tuple(h.encode("latin-1") for h in self.honoured)
        # resolve() is pure for a given trust list, and a client sends the same forwarding
        # headers on every request: memoised, it costs a dict lookup instead of the parse
        # (measured on a loaded 2-core machine: ~20 us -> ~6 us per request with three
        # X-Forwarded-* headers).
        self._memo: Dict[Tuple[bool, Tuple[Tuple[str, str], ...]], Forwarded] = {}

    def resolve(self, headers: Dict[str, str], peer_trusted: bool) -> Forwarded:
        key = (peer_trusted, tuple(headers.items()))
        fwd = self._memo.get(key)
        if fwd is None:
            fwd = resolve(headers, self.honoured, self.trust, peer_trusted)
            if len(self._memo) >= 1024:  # bounded: the values are the clients'
                self._memo.clear()
            self._memo[key] = fwd
        return fwd

    def __bool__(self) -> bool:
        return bool(self.trust) and bool(self.honoured)

    def adjust_environ(self, env: Dict[str, Any]) -> Optional[str]:
        """Apply the rule to a WSGI environ in place. Returns the client as the access log
        should show it ("addr:port") when it changed, else None."""
        headers = {name: env[key] for key, name in self.environ_keys if key in env}
        if not headers:
            return None
        addr = env.get("REMOTE_ADDR") or ""
        is_unix = not env.get("REMOTE_PORT")
        fwd = self.resolve(headers, self.trust.peer(addr, is_unix))
        if not fwd:
            return None
        scheme = fwd.scheme or env.get("wsgi.url_scheme", "http")
        if fwd.scheme is not None:
            env["wsgi.url_scheme"] = scheme
            if scheme == "https":
                env["HTTPS"] = "on"
            else:
                env.pop("HTTPS", None)
        if fwd.host is not None:
            env["SERVER_NAME"] = fwd.host.strip("[]")
            env["HTTP_HOST"] = host_header(fwd.host, fwd.port, scheme)
        elif fwd.port is not None:
            name = _host_name(env.get("HTTP_HOST") or env.get("SERVER_NAME") or "")
            if name:
                env["HTTP_HOST"] = host_header(name, fwd.port, scheme)
        if fwd.port is not None:
            env["SERVER_PORT"] = str(fwd.port)
        elif fwd.host is not None or fwd.scheme is not None:
            env["SERVER_PORT"] = str(DEFAULT_PORTS[scheme])
        if fwd.client is not None:
            env["REMOTE_ADDR"] = fwd.client
            env["REMOTE_PORT"] = str(fwd.client_port) if fwd.client_port is not None else ""
            return ("[%s]:%s" if ":" in fwd.client else "%s:%s") % (
                fwd.client, env["REMOTE_PORT"] or "-")
        return None

    def adjust_scope(self, scope: Dict[str, Any]) -> Dict[str, Any]:
        """The scope with the rule applied (a copy when anything changes). A scope without a
        client comes from a unix socket."""
        headers: Dict[str, str] = {}
        wanted = self.header_names
        for name, value in scope.get("headers") or ():
            if name in wanted:
                text = value.decode("latin-1")
                key = name.decode("latin-1")
                headers[key] = headers[key] + "," + text if key in headers else text
        if not headers:
            return scope
        client = scope.get("client")
        trusted = self.trust.peer(client[0] if client else None, not client)
        fwd = self.resolve(headers, trusted)
        if not fwd:
            return scope
        scope = dict(scope)
        websocket = scope.get("type") == "websocket"
        scheme = fwd.scheme or ("https" if scope.get("scheme") in ("https", "wss") else "http")
        if fwd.scheme is not None:
            scope["scheme"] = {"http": "ws", "https": "wss"}[scheme] if websocket else scheme
        if fwd.client is not None:
            scope["client"] = (fwd.client, fwd.client_port or 0)
        server = scope.get("server")
        if fwd.host is not None or fwd.port is not None or fwd.scheme is not None:
            name = fwd.host.strip("[]") if fwd.host is not None else (
                server[0] if server else "localhost")
            port = fwd.port if fwd.port is not None else (
                DEFAULT_PORTS[scheme] if fwd.host is not None or fwd.scheme is not None
                else (server[1] if server else None))
            scope["server"] = (name, port)
        if fwd.host is not None or fwd.port is not None:
            old_host = ""
            for name_b, value in scope.get("headers") or ():
                if name_b == b"host":
                    old_host = value.decode("latin-1")
            host = fwd.host if fwd.host is not None else _host_name(old_host)
            if host:
                new = host_header(host, fwd.port, scheme).encode("latin-1")
                scope["headers"] = [(k, v) for k, v in scope.get("headers") or () if k != b"host"]
                scope["headers"].append((b"host", new))
        return scope


def _host_name(host_value: str) -> str:
    """The name part of a Host header value (an IPv6 literal keeps its brackets)."""
    if host_value.endswith("]") or ":" not in host_value:
        return host_value
    return host_value.rsplit(":", 1)[0]


def from_config(raw: Mapping[str, Any]) -> Optional[ProxyRule]:
    """The rule of the worker config's `proxy` section, or None when it trusts no one."""
    section = raw.get("proxy") or {}
    headers = section.get("headers")
    rule = ProxyRule(section.get("trusted") or (), DEFAULT_HEADERS if headers is None else headers)
    return rule if rule else None


class ProxyMiddleware:
    """ASGI: the rule applied to every http and websocket scope, before the app (and before
    the access log, so it shows the client the app saw)."""

    def __init__(self, app: Callable[..., Any], rule: ProxyRule) -> None:
        self.app = app
        self.rule = rule

    async def __call__(self, scope: Dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "lifespan":
            scope = self.rule.adjust_scope(scope)
        await self.app(scope, receive, send)
