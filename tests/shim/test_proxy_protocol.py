"""The PROXY protocol (v1 and v2) on listeners with `proxy_protocol: true`: the parser as a table,
then every engine over real sockets: the client address the app sees, LOCAL, a truncated and a
garbage header, plain HTTP on a PROXY listener (closed without a response), and one log line
per burst of such connections."""
import ipaddress
import json
import socket
import struct
import sys
import threading
import time

import pytest

from harness import SHIM_DIR, Client, closed_while_dribbling, wait_until

sys.path.insert(0, SHIM_DIR)
from molt_shim import proxyproto  # noqa: E402
from molt_shim.proxyproto import NEED_MORE, Header, HeaderReader, Invalid, RejectLog  # noqa: E402

pytestmark = pytest.mark.timeout(60)

SIG = proxyproto.V2_SIGNATURE


def v2(command: int, family: int, body: bytes) -> bytes:
    return SIG + bytes([0x20 | command, family]) + struct.pack("!H", len(body)) + body


def v2_tcp4(src="203.0.113.7", dst="10.0.0.1", sport=5555, dport=80, tlvs=b""):
    return v2(1, 0x11, ipaddress.IPv4Address(src).packed + ipaddress.IPv4Address(dst).packed
              + struct.pack("!HH", sport, dport) + tlvs)


def v2_tcp6(src="2001:db8::7", dst="2001:db8::1", sport=4711, dport=443):
    return v2(1, 0x21, ipaddress.IPv6Address(src).packed + ipaddress.IPv6Address(dst).packed
              + struct.pack("!HH", sport, dport))


def v2_unix(src=b"/run/haproxy-client.sock", dst=b"/run/molt.sock"):
    return v2(1, 0x31, src.ljust(108, b"\0") + dst.ljust(108, b"\0"))


V2_LOCAL = v2(0, 0x00, b"")

PARSE_TABLE = [
    (b"PROXY TCP4 203.0.113.7 10.0.0.1 5555 80\r\n",
     Header(1, "PROXY", "TCP4", ("203.0.113.7", 5555), ("10.0.0.1", 80))),
    (b"PROXY TCP6 2001:db8::7 2001:db8::1 4711 443\r\n",
     Header(1, "PROXY", "TCP6", ("2001:db8::7", 4711), ("2001:db8::1", 443))),
    (b"PROXY UNKNOWN\r\n", Header(1, "PROXY", "UNKNOWN", None, None)),
    (b"PROXY UNKNOWN ffff::1 ffff::2 1 2\r\n", Header(1, "PROXY", "UNKNOWN", None, None)),
    (v2_tcp4(), Header(2, "PROXY", "TCP4", ("203.0.113.7", 5555), ("10.0.0.1", 80))),
    (v2_tcp4(tlvs=b"\x04\x00\x02ab"),  # TLVs are skipped
     Header(2, "PROXY", "TCP4", ("203.0.113.7", 5555), ("10.0.0.1", 80))),
    (v2_tcp6(), Header(2, "PROXY", "TCP6", ("2001:db8::7", 4711), ("2001:db8::1", 443))),
    (v2_unix(), Header(2, "PROXY", "UNIX", "/run/haproxy-client.sock", "/run/molt.sock")),
    (V2_LOCAL, Header(2, "LOCAL", "UNKNOWN", None, None)),
    (v2(1, 0x00, b""), Header(2, "PROXY", "UNKNOWN", None, None)),
]


@pytest.mark.parametrize("raw,header", PARSE_TABLE)
def test_parse_whole_and_byte_by_byte(raw, header):
    assert HeaderReader().feed(raw + b"GET / HTTP/1.1\r\n") == (header, b"GET / HTTP/1.1\r\n")
    reader = HeaderReader()
    for i in range(len(raw) - 1):
        assert reader.feed(raw[i:i + 1]) == NEED_MORE
    assert reader.feed(raw[-1:]) == (header, b"")


@pytest.mark.parametrize("raw", [
    b"GET / HTTP/1.1\r\n",
    b"PROXZ TCP4",
    b"PROXY TCP4 203.0.113.7 10.0.0.1 5555\r\n",
    b"PROXY TCP4 2001:db8::1 10.0.0.1 1 2\r\n",
    b"PROXY TCP4 1.2.3.4 5.6.7.8 99999 80\r\n",
    b"PROXY TCP5 1.2.3.4 5.6.7.8 1 2\r\n",
    b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2" + b" " * 100,  # no CRLF within 107 bytes
    b"\r\n\r\n\x00\r\nQUIX\n",
    SIG + b"\x30\x11\x00\x00",  # version 3
    SIG + b"\x22\x11\x00\x00",  # command 2
    v2(1, 0x11, b"\x01\x02\x03"),  # truncated addresses
    v2(1, 0x12, b"\0" * 12),  # UDP
    SIG + b"\x21\x11\xff\xff",  # absurd length
])
def test_parse_invalid(raw):
    with pytest.raises(Invalid):
        HeaderReader().feed(raw)


def test_reject_log_once_per_burst():
    now = [100.0]
    lines = []
    rejects = RejectLog(window_s=10.0, clock=lambda: now[0], emit=lines.append)
    for _ in range(50):
        rejects.reject("1.2.3.4:5", "garbage")
    assert len(lines) == 1
    rejects.flush()
    assert len(lines) == 1  # the window is not over
    now[0] += 11
    rejects.flush()
    assert len(lines) == 2 and "49 more" in lines[1]
    rejects.flush()
    assert len(lines) == 2


# -- through the engines ------------------------------------------------------------------------
def spawn_pp(spawn, listeners, interface="wsgi", trusted=None, extra=None):
    overrides = {"listeners": {name: {"proxy_protocol": True} for name in listeners.names}}
    overrides.update(extra or {})
    if trusted is not None:
        overrides["proxy"] = {"trusted": trusted}
    if interface == "asgi":
        return spawn("asgi_proxy_app:app", interface="asgi", health_path="/healthz",
                     overrides=overrides).wait_ready()
    w = spawn("edge_app:application", health_path="/healthz", overrides=overrides).wait_ready()
    assert_engine_serves(w)
    return w


def assert_engine_serves(w):
    """The engine asked for serves the listener itself (no fallback to another engine)."""
    if w.config.get("engine") == "native":
        wait_until(lambda: "ready: " in w.stderr_text(), 10, "the worker's ready line")
        text = w.stderr_text()
        assert "native engine" in text and "using the Python engine" not in text, text


def ask(listeners, preamble, interface, unix=False, path="/env"):
    c = Client(unix_path=listeners.unix_path) if unix else Client(listeners.port)
    try:
        c.send(preamble)
        status, _, body = c.request("/" if interface == "asgi" else path)
    finally:
        c.close()
    assert status == 200
    data = json.loads(body)
    if interface == "asgi":
        return data["client"]
    return [data["REMOTE_ADDR"], data["REMOTE_PORT"]]


def refused(listeners, data, unix=False):
    """Sends `data` and returns what came back before the server closed (b"": no response)."""
    if unix:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect(listeners.unix_path)
    else:
        s = socket.create_connection(("127.0.0.1", listeners.port))
    try:
        s.sendall(data)
        s.shutdown(socket.SHUT_WR)  # a truncated header then ends with EOF, not a wait
        s.settimeout(20)
        chunks = []
        while True:
            try:
                chunk = s.recv(65536)
            except ConnectionResetError:
                break
            if not chunk:
                break
            chunks.append(chunk)
        return b"".join(chunks)
    finally:
        s.close()


def expected(interface, addr, port):
    return [addr, port] if interface == "asgi" else [addr, str(port) if port else ""]


@pytest.mark.parametrize("interface", ["wsgi", "asgi"])
@pytest.mark.usefixtures("engine")
def test_client_address_from_each_header_form(interface, listeners, spawn, engine):
    if interface == "asgi" and engine != "python":
        pytest.skip("ASGI has one engine")
    spawn_pp(spawn, listeners, interface)
    for unix in (False, True):
        assert ask(listeners, b"PROXY TCP4 203.0.113.7 10.0.0.1 5555 80\r\n", interface,
                   unix) == expected(interface, "203.0.113.7", 5555)
        assert ask(listeners, b"PROXY TCP6 2001:db8::7 2001:db8::1 4711 443\r\n", interface,
                   unix) == expected(interface, "2001:db8::7", 4711)
        assert ask(listeners, v2_tcp4(), interface, unix) == expected(
            interface, "203.0.113.7", 5555)
        assert ask(listeners, v2_tcp6(), interface, unix) == expected(
            interface, "2001:db8::7", 4711)
    # UNIX and LOCAL: the socket's own peer stays (LOCAL), or the path is the client (UNIX).
    local = ask(listeners, V2_LOCAL, interface)
    assert local[0] == "127.0.0.1"
    unix_client = ask(listeners, v2_unix(), interface)
    assert unix_client == (None if interface == "asgi" else ["/run/haproxy-client.sock", ""])


@pytest.mark.parametrize("interface", ["wsgi", "asgi"])
@pytest.mark.usefixtures("engine")
def test_invalid_headers_are_closed_without_a_response(interface, listeners, spawn, engine):
    if interface == "asgi" and engine != "python":
        pytest.skip("ASGI has one engine")
    w = spawn_pp(spawn, listeners, interface)
    for unix in (False, True):
        assert refused(listeners, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", unix) == b""
        assert refused(listeners, b"\x16\x03\x01\x02\x00garbage", unix) == b""
        assert refused(listeners, b"PROXY TCP4 203.0.113.7 10.0", unix) == b""  # truncated
        assert refused(listeners, v2_tcp4()[:20], unix) == b""  # truncated v2
    # The burst is logged once, not once per connection...
    wait_until(lambda: any("without a valid PROXY protocol header" in line
                           for line in w.stderr), 10, "the rejection log line")
    assert sum("without a valid PROXY protocol header" in line for line in w.stderr) == 1
    # ... and the worker keeps serving valid connections.
    assert ask(listeners, b"PROXY TCP4 203.0.113.7 10.0.0.1 5555 80\r\n", interface) == \
        expected(interface, "203.0.113.7", 5555)


@pytest.mark.usefixtures("engine")
def test_forwarding_headers_are_trusted_by_the_proxied_address(listeners, spawn):
    """The PROXY header's client is the peer the trusted-proxy rule judges."""
    spawn_pp(spawn, listeners, "wsgi", trusted=["10.0.0.0/8"])
    c = Client(listeners.port)
    try:
        c.send(b"PROXY TCP4 10.9.9.9 10.0.0.1 5555 80\r\n")
        _, _, body = c.request("/env", headers="X-Forwarded-For: 198.51.100.3\r\n")
        assert json.loads(body)["REMOTE_ADDR"] == "198.51.100.3"
        c.send(b"")
    finally:
        c.close()
    c = Client(listeners.port)
    try:
        c.send(b"PROXY TCP4 203.0.113.7 10.0.0.1 5555 80\r\n")
        _, _, body = c.request("/env", headers="X-Forwarded-For: 198.51.100.3\r\n")
        assert json.loads(body)["REMOTE_ADDR"] == "203.0.113.7"
    finally:
        c.close()


@pytest.mark.usefixtures("engine")
def test_header_dribbled_byte_by_byte(listeners, spawn):
    """A header that arrives in many small reads, then the request: the engine reads the
    header's bytes and no more, whatever the reads look like."""
    spawn_pp(spawn, listeners)
    for header, want in ((b"PROXY TCP4 203.0.113.7 10.0.0.1 5555 80\r\n", "203.0.113.7"),
                         (v2_tcp6(), "2001:db8::7")):
        s = socket.create_connection(("127.0.0.1", listeners.port))
        try:
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            for i in range(len(header)):
                s.sendall(header[i:i + 1])
            s.sendall(b"GET /env HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            s.settimeout(20)
            data = b""
            while chunk := s.recv(65536):
                data += chunk
        finally:
            s.close()
        assert data.startswith(b"HTTP/1.1 200"), data
        assert json.loads(data.split(b"\r\n\r\n", 1)[1])["REMOTE_ADDR"] == want


@pytest.mark.parametrize("interface", ["wsgi", "asgi"])
@pytest.mark.usefixtures("engine")
def test_a_header_dribbled_past_the_header_timeout_is_closed(interface, listeners, spawn,
                                                              engine):
    """http.header_timeout runs from the accept: a PROXY header sent a byte at a time, each
    byte well within the timeout, does not hold the connection past it (a slowloris before the
    head; each partial read used to start the clock again)."""
    if interface == "asgi" and engine != "python":
        pytest.skip("ASGI has one engine")
    spawn_pp(spawn, listeners, interface, extra={"http": {"header_timeout_ms": 1000}})
    header = b"PROXY TCP4 203.0.113.7 10.0.0.1 5555 80\r\n"  # 40 bytes: 12 s at this pace
    assert closed_while_dribbling(listeners.port, header), \
        "a header sent a byte every 0.3 s held the connection for 12 s"


@pytest.mark.parametrize("interface", ["wsgi", "asgi"])
@pytest.mark.usefixtures("engine")
def test_an_ipv6_peer_without_a_header_is_closed(interface, listeners, spawn, engine):
    """On [::1] (a peer address of four items): a connection that sends no header is closed at
    http.header_timeout, and one that sends a request instead is closed at once, each logged
    as a reject. The ASGI engine formatted the peer as two items: a TypeError before the close,
    so such connections stayed open for ever."""
    if interface == "asgi" and engine != "python":
        pytest.skip("ASGI has one engine")
    v6 = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    v6.bind(("::1", 0))
    v6.listen(64)
    port = v6.getsockname()[1]
    listeners.socks, listeners.names = [v6], ["tcp://[::1]:%d" % port]
    w = spawn_pp(spawn, listeners, interface, extra={"http": {"header_timeout_ms": 1000}})
    silent = socket.create_connection(("::1", port))
    request = socket.create_connection(("::1", port))
    try:
        request.sendall(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")
        for s in (request, silent):
            s.settimeout(5)
            try:
                assert s.recv(100) == b""
            except ConnectionResetError:
                pass
    finally:
        silent.close()
        request.close()
    wait_until(lambda: "without a valid PROXY protocol header" in w.stderr_text(), 5,
               "the reject in the log")
    assert "Traceback" not in w.stderr_text()


@pytest.mark.parametrize("interface", ["wsgi", "asgi"])
@pytest.mark.usefixtures("engine")
def test_a_header_trickled_during_a_drain_does_not_hold_it(interface, listeners, spawn, engine):
    """A draining worker does not wait for ever for a PROXY header that keeps coming slowly:
    the WSGI engines close it at drain_idle (1 s), the ASGI engine, which waits for headers and
    handshakes under way, at http.header_timeout. The native engine restarted its clock at
    every byte, so a v2 header of 4 KiB held the drain until timeouts.graceful."""
    if interface == "asgi" and engine != "python":
        pytest.skip("ASGI has one engine")
    w = spawn_pp(spawn, listeners, interface, extra={"http": {"header_timeout_ms": 4000}})
    header = proxyproto.V2_SIGNATURE + bytes([0x21, 0x11]) + struct.pack("!H", 4000)
    stop = threading.Event()

    def trickle():
        with socket.create_connection(("127.0.0.1", listeners.port)) as s:
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            for i in range(len(header) + 100):  # 2.3 s of the 16-byte prefix, then the body
                if stop.wait(0.15):
                    return
                try:
                    s.sendall(header[i:i + 1] or b"\0")
                except OSError:
                    return

    t = threading.Thread(target=trickle, daemon=True)
    t.start()
    time.sleep(1.0)  # a few bytes in
    w.drain()
    try:
        assert w.wait_exit(8) == 0  # the trickle would last 17 s
    finally:
        stop.set()
        t.join(5)


@pytest.mark.usefixtures("engine")
def test_access_log_shows_the_proxied_client(listeners, spawn):
    w = spawn_pp(spawn, listeners, extra={"logging": {"access_log": True, "level": "info"}})
    assert ask(listeners, b"PROXY TCP4 203.0.113.9 10.0.0.1 6000 80\r\n", "wsgi",
               path="/env?logged") == ["203.0.113.9", "6000"]
    wait_until(lambda: any("203.0.113.9" in line and "/env?logged" in line
                           for line in w.stdout), 10, "the access log line")
