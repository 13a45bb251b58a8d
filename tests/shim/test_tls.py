"""TLS on a listener (`listen[].tls`) through each engine, with curl and openssl s_client:
handshake, ALPN, mutual TLS accepted and refused, the verified subject in the environ, a file
response through TLS, and a client that opens TLS and sends nothing (closed by the timeout,
holding no thread meanwhile)."""
import asyncio
import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import time

import pytest
import websockets

from harness import REPO, closed_while_dribbling, wait_until

sys.path.insert(0, os.path.join(REPO, "tests"))
import tlscerts  # noqa: E402

pytestmark = pytest.mark.timeout(90)


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    return tlscerts.make(str(tmp_path_factory.mktemp("certs")))


def spawn_tls(spawn, listeners, certs, interface="wsgi", client_ca=False, threads=4, extra=None):
    tls = {"cert": certs.cert, "key": certs.key, "client_ca": certs.ca if client_ca else "",
           "min_version": "1.2"}
    overrides = dict({"listeners": {listeners.names[0]: {"tls": tls}}}, **(extra or {}))
    if interface == "asgi":
        return spawn("asgi_proxy_app:app", interface="asgi", overrides=overrides).wait_ready()
    w = spawn("tls_app:application", overrides=overrides, threads=threads).wait_ready()
    engine = w.config.get("engine")
    if engine:  # the engine asked for serves TLS itself (no fallback to another engine)
        wait_until(lambda: "(engine %s:" % engine in w.stderr_text(), 10, "the ready line")
    return w


def curl(listeners, certs, path="/", client=False, extra=(), input=None):
    args = ["curl", "-sS", "--max-time", "20", "--cacert", certs.ca,
            "--resolve", "localhost:%d:127.0.0.1" % listeners.port]
    if client:
        args += ["--cert", certs.client_cert, "--key", certs.client_key]
    args += list(extra) + ["https://localhost:%d%s" % (listeners.port, path)]
    return subprocess.run(args, capture_output=True, timeout=30, input=input)


@pytest.mark.usefixtures("engine")
def test_https_through_the_wsgi_engines(listeners, spawn, certs):
    spawn_tls(spawn, listeners, certs)
    out = curl(listeners, certs, "/env", extra=["-w", "\n%{http_version}"])
    assert out.returncode == 0, out.stderr
    body, version = out.stdout.decode().rsplit("\n", 1)
    env = json.loads(body)
    assert (env["wsgi.url_scheme"], env["HTTPS"], env["SSL_CLIENT_S_DN"]) == ("https", "on", None)
    assert env["SSL_PROTOCOL"] in ("TLSv1.2", "TLSv1.3") and version == "1.1"
    # A large response goes through the TLS layer whole; plain HTTP on the other listener.
    big = curl(listeners, certs, "/big")
    assert big.returncode == 0 and big.stdout == b"x" * 1_000_000
    plain = subprocess.run(["curl", "-sS", "--max-time", "20", "--unix-socket",
                            listeners.unix_path, "http://localhost/env"], capture_output=True)
    assert json.loads(plain.stdout)["wsgi.url_scheme"] == "http"
    # Keep-alive: several requests on one TLS connection (curl reuses it for repeated URLs).
    many = curl(listeners, certs, "/env", extra=["-o", "/dev/null", "-w", "%{num_connects}\n",
                                                   "https://localhost:%d/env" % listeners.port,
                                                   "-o", "/dev/null"])
    assert many.returncode == 0 and many.stdout.split() == [b"1", b"0"], many


@pytest.mark.usefixtures("engine")
def test_files_through_tls(listeners, spawn, certs, tmp_path):
    """wsgi.file_wrapper and `static:` files go through the TLS layer (sendfile() would put
    the file's plain bytes on the wire)."""
    data = os.urandom(3_000_000)
    (tmp_path / "blob.bin").write_bytes(data)
    spawn_tls(spawn, listeners, certs,
              extra={"static": [{"prefix": "/static/", "dir": str(tmp_path)}]})
    wrapped = curl(listeners, certs, "/file?%s" % (tmp_path / "blob.bin"))
    assert wrapped.returncode == 0 and wrapped.stdout == data, wrapped.stderr
    static = curl(listeners, certs, "/static/blob.bin")
    assert static.returncode == 0 and static.stdout == data, static.stderr
    ranged = curl(listeners, certs, "/static/blob.bin", extra=["-r", "100-199"])
    assert ranged.returncode == 0 and ranged.stdout == data[100:200], ranged.stderr


@pytest.mark.usefixtures("engine")
def test_pipelined_requests_and_bodies_through_tls(listeners, spawn, certs):
    """Two requests in one TLS record, then three records sent back to back: all five are
    answered, none is left waiting where epoll cannot see it. Then request bodies,
    small and large, with Content-Length and chunked, read through TLS."""
    spawn_tls(spawn, listeners, certs)
    ctx = ssl.create_default_context(cafile=certs.ca)
    with socket.create_connection(("127.0.0.1", listeners.port), timeout=20) as raw:
        with ctx.wrap_socket(raw, server_hostname="localhost") as s:
            one = b"GET /env HTTP/1.1\r\nHost: localhost\r\n\r\n"
            last = b"GET /env HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
            s.sendall(one * 2)  # one TLS record
            s.sendall(one)  # then three records, sent back to back
            s.sendall(one)
            s.sendall(last)
            data = b""
            while chunk := s.recv(65536):
                data += chunk
    assert data.count(b"HTTP/1.1 200 OK") == 5, data
    body = os.urandom(300_000)
    posted = curl(listeners, certs, "/echo", extra=["--data-binary", "@-"], input=body)
    assert posted.returncode == 0 and posted.stdout == body, posted.stderr
    chunked = curl(listeners, certs, "/echo", input=body[:5000],
                   extra=["--data-binary", "@-", "-H", "Transfer-Encoding: chunked"])
    assert chunked.returncode == 0 and chunked.stdout == body[:5000], chunked.stderr


@pytest.mark.usefixtures("engine")
def test_alpn_and_handshake_with_s_client(listeners, spawn, certs):
    spawn_tls(spawn, listeners, certs)
    out = subprocess.run(
        ["openssl", "s_client", "-connect", "127.0.0.1:%d" % listeners.port, "-alpn",
         "h2,http/1.1", "-CAfile", certs.ca, "-servername", "localhost", "-verify_return_error", "-ign_eof"],
        input=b"GET /env HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n",
        capture_output=True, timeout=30)
    text = out.stdout.decode(errors="replace")
    assert "ALPN protocol: http/1.1" in text, text
    assert "Verify return code: 0 (ok)" in text
    assert '"wsgi.url_scheme": "https"' in text
    # TLS 1.1 is below min_version: refused.
    old = subprocess.run(["openssl", "s_client", "-connect", "127.0.0.1:%d" % listeners.port,
                          "-tls1_1"], input=b"", capture_output=True, timeout=30)
    assert b"Cipher is (NONE)" in old.stdout or old.returncode != 0


@pytest.mark.parametrize("interface", ["wsgi", "asgi"])
@pytest.mark.usefixtures("engine")
def test_mutual_tls(listeners, spawn, certs, interface, engine):
    if interface == "asgi" and engine != "python":
        pytest.skip("ASGI has one engine")
    w = spawn_tls(spawn, listeners, certs, interface, client_ca=True)
    refused = curl(listeners, certs, "/env")
    assert refused.returncode != 0  # no client certificate: the handshake fails
    if engine == "native":  # one info line with OpenSSL's reason
        wait_until(lambda: "TLS error" in w.stderr_text() and "certificate" in w.stderr_text(),
                   10, "the handshake failure's log line")
    ok = curl(listeners, certs, "/env", client=True)
    assert ok.returncode == 0, ok.stderr
    data = json.loads(ok.stdout)
    if interface == "wsgi":
        assert data["SSL_CLIENT_S_DN"] == "/O=Example/CN=client one"
        assert data["SSL_CLIENT_I_DN"] == "/O=molt tests/CN=molt test CA"
        assert data["SSL_CLIENT_VERIFY"] == "SUCCESS"
    else:  # the ASGI TLS extension: the same verified subject, in RFC 4514 form
        assert data["scheme"] == "https"
        ext = data["tls"]
        assert ext["client_cert_name"] == "CN=client one,O=Example"
        assert ext["client_cert_error"] is None
        assert ext["tls_version"] in (0x0303, 0x0304)
        with open(certs.client_cert) as f:
            leaf = f.read().split("-----END CERTIFICATE-----")[0]
        assert [pem.replace("\n", "") for pem in ext["client_cert_chain"]] == [
            (leaf + "-----END CERTIFICATE-----").replace("\n", "")]
        # A WebSocket's scope has it too (uvicorn builds that scope; it had no extensions).
        context = ssl.create_default_context(cafile=certs.ca)
        context.load_cert_chain(certs.client_cert, certs.client_key)

        async def wss():
            async with websockets.connect("wss://localhost:%d/" % listeners.port, ssl=context,
                                          host="127.0.0.1", port=listeners.port) as ws:
                return json.loads(await asyncio.wait_for(ws.recv(), 10))

        scope = asyncio.run(wss())
        assert scope["scheme"] == "wss"
        assert scope["tls"]["client_cert_name"] == "CN=client one,O=Example"


def test_asgi_https(listeners, spawn, certs):
    spawn_tls(spawn, listeners, certs, "asgi")
    out = curl(listeners, certs, "/")
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    assert data["scheme"] == "https"
    assert data["tls"]["client_cert_name"] is None and data["tls"]["client_cert_chain"] == []


def https_get(raw: socket.socket, ca: str) -> bytes:
    """GET / over TLS on a connected socket, read to the server's close."""
    raw.settimeout(10)
    tls = ssl.create_default_context(cafile=ca).wrap_socket(raw, server_hostname="localhost")
    tls.sendall(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n")
    answer = b""
    while chunk := tls.recv(65536):
        answer += chunk
    tls.close()
    return answer


def test_an_asgi_drain_waits_for_a_handshake_under_way(listeners, spawn, certs):
    """A TLS client accepted before the drain whose handshake has not come after a second
    (the wait for an ordinary connection's connection_made()): the draining worker waits for
    it, bounded by http.header_timeout, and answers it instead of exiting under it."""
    w = spawn_tls(spawn, listeners, certs, "asgi", extra={"http": {"header_timeout_ms": 5000}})
    raw = socket.create_connection(("127.0.0.1", listeners.port))  # accepted, or taken at drain
    w.drain()
    time.sleep(1.8)  # the time itself is the case: past the 1 s an ordinary connection gets
    assert w.alive(), "the draining worker exited under a handshake still in its timeout"
    answer = https_get(raw, certs.ca)
    assert answer.startswith(b"HTTP/1.1 200 OK\r\n")
    assert b"connection: close" in answer.lower()  # a draining worker closes after it
    assert w.wait_exit(10) == 0


def test_connections_an_asgi_drain_takes_from_the_queue_get_tls_too(listeners, spawn, certs):
    """A draining worker takes the connections still queued on its listeners; on a TLS
    listener they must get TLS as the ones it accepted before did (they were served as plain
    HTTP, so their handshake failed)."""
    w = spawn_tls(spawn, listeners, certs, "asgi")
    w.signal(signal.SIGSTOP)  # nothing is accepted meanwhile: the connections stay queued
    try:
        # More than it accepts one by one before it acts on the drain: most are taken then.
        clients = [socket.create_connection(("127.0.0.1", listeners.port)) for _ in range(20)]
        w.drain()
    finally:
        w.signal(signal.SIGCONT)
    for raw in clients:
        answer = https_get(raw, certs.ca)
        assert answer.startswith(b"HTTP/1.1 200 OK\r\n"), answer
    assert w.wait_exit(10) == 0


@pytest.mark.parametrize("interface", ["wsgi", "asgi"])
@pytest.mark.usefixtures("engine")
def test_silent_tls_client_costs_no_thread_and_times_out(listeners, spawn, certs, interface,
                                                          engine):
    if interface == "asgi" and engine != "python":
        pytest.skip("ASGI has one engine")
    spawn_tls(spawn, listeners, certs, interface, threads=1)
    silent = []
    for _ in range(3):  # more silent clients than the worker has threads
        s = socket.create_connection(("127.0.0.1", listeners.port))
        silent.append(s)
    half = socket.create_connection(("127.0.0.1", listeners.port))
    half.sendall(b"\x16\x03\x01\x00\xff")  # a ClientHello's record header, and nothing more
    silent.append(half)
    out = curl(listeners, certs, "/")
    assert out.returncode == 0, out.stderr  # served while the silent ones wait
    for s in silent:  # the handshake timeout (http.header_timeout, 2s here) closes them
        s.settimeout(30)
        try:
            assert s.recv(100) == b""
        except ConnectionResetError:
            pass
        s.close()


@pytest.mark.parametrize("interface", ["wsgi", "asgi"])
@pytest.mark.usefixtures("engine")
def test_a_handshake_dribbled_past_the_header_timeout_is_closed(listeners, spawn, certs,
                                                                 interface, engine):
    """The handshake timeout (http.header_timeout) runs from the accept: a handshake that comes
    a byte at a time, each well within the timeout, does not hold the connection past it."""
    if interface == "asgi" and engine != "python":
        pytest.skip("ASGI has one engine")
    spawn_tls(spawn, listeners, certs, interface, extra={"http": {"header_timeout_ms": 1000}})
    record = b"\x16\x03\x01\x00\xff" + b"\x01" * 40  # a ClientHello's record: 12 s
    assert closed_while_dribbling(listeners.port, record), \
        "a handshake sent a byte every 0.3 s held the connection for 12 s"


@pytest.mark.parametrize("value", ["abc", "zz" * 80, "00" * 79])
def test_a_malformed_ticket_key_fails_the_boot_and_says_so(listeners, spawn, value):
    # MOLT_TLS_TICKET_KEYS comes from the master; anything but 160 hex digits is refused at
    # once with its name, never silently replaced by a key of the worker's own.
    w = spawn(env={"MOLT_TLS_TICKET_KEYS": value})
    assert w.wait_exit() == 3
    error = w.wait_message("ERROR")["ERROR"]
    assert "MOLT_TLS_TICKET_KEYS must be 160 hex digits" in error, error


@pytest.mark.parametrize("engine,why", [
    ("python", "this worker runs the Python engine"),
    ("auto", "the native engine is unavailable here: "),  # no extension beside this shim
])
def test_the_python_engine_refuses_a_proxy_header_before_tls(listeners, spawn, certs, engine,
                                                             why):
    # The config allows the pair only where the native engine runs; a worker left with the
    # Python engine must not serve it wrong, and says why it has no native engine.
    tls = {"cert": certs.cert, "key": certs.key, "client_ca": "", "min_version": "1.2"}
    w = spawn("tls_app:application", engine=engine, overrides={
        "listeners": {listeners.names[0]: {"tls": tls, "proxy_protocol": True}}})
    assert w.wait_exit() == 3
    error = w.wait_message("ERROR")["ERROR"]
    assert "proxy_protocol together with tls needs the native engine" in error, error
    assert why in error, error
