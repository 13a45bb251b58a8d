"""The edge through the real master: certificates validated at `molt check` and at HUP, a
certificate rotated by HUP under wrk load over HTTPS with zero failed requests, and the
`proxy:` and `listen[].proxy_protocol` settings reaching the workers."""
from __future__ import annotations

import json
import shutil
import shlex
import socket
import ssl
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from molt_testlib import APPS, PYTHON, Wrk, molt_bin, wait_until

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import tlscerts  # noqa: E402

pytestmark = pytest.mark.timeout(180)


@pytest.fixture
def certs(tmp_path):
    d = tmp_path / "certs"
    d.mkdir()
    return tlscerts.make(str(d))


def live_cert(certs, tmp_path) -> tuple[Path, Path]:
    """The certificate and key the config points at (copies, so a test can replace them)."""
    cert, key = tmp_path / "live.pem", tmp_path / "live.key"
    shutil.copy(certs.cert, cert)
    shutil.copy(certs.key, key)
    return cert, key


def subject_cn(port: int, ca: str) -> str:
    """The common name of the certificate a new TLS connection gets."""
    ctx = ssl.create_default_context(cafile=ca)
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        with ctx.wrap_socket(raw, server_hostname="localhost") as s:
            return dict(x[0] for x in s.getpeercert()["subject"])["commonName"]


def test_check_reports_bad_certificate_files_with_their_position(tmp_path, certs):
    other_key = tmp_path / "other.key"
    subprocess.run(["openssl", "genrsa", "-out", str(other_key), "2048"], check=True,
                   capture_output=True, timeout=60)
    cases = {
        "mismatch": (certs.cert, str(other_key), "does not match the certificate"),
        "missing": (str(tmp_path / "nope.pem"), certs.key, "cannot load the certificate chain"),
        "not a key": (certs.cert, certs.cert, "cannot load the private key"),
    }
    for name, (cert, key, message) in cases.items():
        config = tmp_path / "molt.yaml"
        config.write_text(f"app: hello_app:application\nchdir: {APPS}\npython: {PYTHON}\n"
                          "listen:\n  - address: tcp://127.0.0.1:0\n"
                          f"    tls: {{cert: {cert}, key: {key}}}\n")
        out = subprocess.run([molt_bin(), "check", "-c", str(config)], capture_output=True,
                             text=True, timeout=30)
        assert out.returncode == 78, (name, out)
        assert f"{config}:6:17: listen[0].tls.cert: " in out.stderr, (name, out.stderr)
        assert message in out.stderr, (name, out.stderr)
        offline = subprocess.run([molt_bin(), "check", "--offline", "-c", str(config)],
                                 capture_output=True, text=True, timeout=30)
        assert offline.returncode == 0, (name, offline)


def test_a_key_with_a_passphrase_is_refused_not_prompted_for(tmp_path, certs):
    """OpenSSL's default asks for the passphrase on the terminal: `molt check` (and so the
    master, at start and at every HUP) waited there. Run under a pseudo-terminal (script) so
    that a prompt would hang; the answer is the config error instead."""
    encrypted = tmp_path / "encrypted.key"
    subprocess.run(["openssl", "pkey", "-in", certs.key, "-aes256", "-passout", "pass:secret",
                    "-out", str(encrypted)], check=True, capture_output=True, timeout=60)
    config = tmp_path / "molt.yaml"
    config.write_text(f"app: hello_app:application\nchdir: {APPS}\npython: {PYTHON}\n"
                      "listen:\n  - address: tcp://127.0.0.1:0\n"
                      f"    tls: {{cert: {certs.cert}, key: {encrypted}}}\n")
    command = shlex.join([molt_bin(), "check", "-c", str(config)])
    out = subprocess.run(["script", "-qec", command, "/dev/null"], capture_output=True,
                         text=True, timeout=30, stdin=subprocess.DEVNULL)
    assert out.returncode == 78, out
    assert "is encrypted with a passphrase" in out.stdout, out.stdout  # the pty's output
    assert "pass phrase" not in out.stdout


@pytest.mark.parametrize("engine", ["python", "native"])
def test_rotation_by_hup_under_https_load(molt, tmp_path, certs, engine):
    cert, key = live_cert(certs, tmp_path)
    m = molt({"app": "hello_app:application", "chdir": str(APPS), "workers": 2, "threads": 4,
              "engine": engine,
              "listen": [{"address": "tcp://127.0.0.1:0",
                          "tls": {"cert": str(cert), "key": str(key)}}]})
    # The engine asked for serves TLS itself (no fallback to the other one).
    wait_until(lambda: f"(engine {engine}:" in m.log(), 10, "the workers' ready lines")
    port = m.port
    assert subject_cn(port, certs.ca) == "localhost"
    new_cert, new_key = tlscerts.server_cert(certs.dir, certs.ca, certs.ca_key, "rotated",
                                             cn="rotated")
    generation = m.live_generation()
    wrk = Wrk(f"https://127.0.0.1:{port}/", duration=12, connections=16, threads=2)
    try:
        wait_until(lambda: wrk.proc.poll() is None, 5, "wrk running")
        # Replace both files, then HUP: the new generation loads them.
        shutil.copy(new_cert, cert)
        shutil.copy(new_key, key)
        answer = m.reload()
        assert answer["ok"] is True, answer
        assert m.live_generation() > generation
        assert subject_cn(port, certs.ca) == "rotated"
        wait_until(lambda: m.log().count(f"(engine {engine}:") >= 4, 10, "new ready lines")
    finally:
        result = wrk.stop()
    assert result["requests"] > 0
    assert result["failed"] == 0, result


def resumed_sessions(port: int, ca: str, version: str, connections: int = 16) -> tuple:
    """One client making `connections` HTTPS connections one after the other, each offering
    the session of the one before (as browsers and wrk do): (how many resumed, the worker pids
    that answered, the last /env answer)."""
    ctx = ssl.create_default_context(cafile=ca)
    ctx.maximum_version = ssl.TLSVersion.TLSv1_2 if version == "1.2" else ssl.TLSVersion.TLSv1_3
    session, resumed, pids, env = None, 0, set(), {}
    for i in range(connections):
        with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
            with ctx.wrap_socket(raw, server_hostname="localhost", session=session) as s:
                path = "/pid" if i < connections - 1 else "/env"
                s.sendall(f"GET {path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n"
                          .encode())
                answer = b""
                while chunk := s.recv(65536):
                    answer += chunk
                body = answer.split(b"\r\n\r\n", 1)[1]
                if path == "/pid":
                    pids.add(int(body))
                else:
                    env = json.loads(body)
                resumed += s.session_reused
                session = s.session
    return resumed, pids, env


@pytest.mark.parametrize("version", ["1.3", "1.2"])
def test_tls_sessions_resume_on_every_worker_of_a_generation(molt, tmp_path, certs, version):
    # The master gives one random session-ticket key to all the workers of a generation
    # (MOLT_TLS_TICKET_KEYS), so a client that reconnects resumes its TLS session on whichever
    # worker takes the connection. Before, each worker had its own key and the accept
    # rotation sent each new connection to another worker: no session ever resumed.
    cert, key = live_cert(certs, tmp_path)
    m = molt({"app": "edge_app:application", "chdir": str(APPS), "workers": 4, "threads": 2,
              "engine": "native",
              "listen": [{"address": "tcp://127.0.0.1:0",
                          "tls": {"cert": str(cert), "key": str(key)}}]})
    for generation in (1, 2):
        resumed, pids, env = resumed_sessions(m.port, certs.ca, version)
        assert len(pids) >= 2, pids  # the connections were spread over the workers
        assert resumed == 15, (generation, resumed, pids)  # every one after the first
        assert env["MOLT_TLS_TICKET_KEYS"] is None  # the key is the engine's, not the app's
        if generation == 1:
            assert m.reload()["ok"] is True  # a new generation: a new key, the same rule


def test_a_bad_certificate_at_hup_keeps_the_old_generation(molt, tmp_path, certs):
    cert, key = live_cert(certs, tmp_path)
    m = molt({"app": "hello_app:application", "chdir": str(APPS), "workers": 1,
              "listen": [{"address": "tcp://127.0.0.1:0",
                          "tls": {"cert": str(cert), "key": str(key)}}]})
    generation = m.live_generation()
    subprocess.run(["openssl", "genrsa", "-out", str(key), "2048"], check=True,
                   capture_output=True, timeout=60)  # a key that no longer matches
    answer = m.reload()
    assert answer["ok"] is False
    assert "does not match the certificate" in answer["error"]
    assert m.live_generation() == generation
    assert subject_cn(m.port, certs.ca) == "localhost"


def test_proxy_settings_reach_the_workers(molt):
    m = molt({"app": "edge_app:application", "chdir": str(APPS), "workers": 1,
              "proxy": {"trusted": ["127.0.0.1"], "headers": ["x-forwarded-for"]},
              "listen": [{"address": "tcp://127.0.0.1:0", "proxy_protocol": True}]})
    with socket.create_connection(("127.0.0.1", m.port), timeout=10) as s:
        s.sendall(b"PROXY TCP4 127.0.0.1 127.0.0.1 4000 80\r\n"
                  b"GET /env HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
                  b"X-Forwarded-For: 203.0.113.7\r\nX-Forwarded-Proto: https\r\n\r\n")
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    env = json.loads(data.split(b"\r\n\r\n", 1)[1])
    # X-Forwarded-Proto is not in proxy.headers: the scheme stays http.
    assert (env["REMOTE_ADDR"], env["wsgi.url_scheme"]) == ("203.0.113.7", "http")
    with socket.create_connection(("127.0.0.1", m.port), timeout=10) as s:
        s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")  # no PROXY header: closed, no answer
        s.settimeout(20)
        assert s.recv(100) == b""


def https_env_after(port: int, ca: str, preamble: bytes) -> dict:
    """GET /env over TLS on a connection that first carries `preamble` in the clear, as a TCP
    load balancer in passthrough mode sends it (AWS NLB, HAProxy `send-proxy` to a TLS
    backend)."""
    raw = socket.create_connection(("127.0.0.1", port), timeout=10)
    raw.sendall(preamble)
    context = ssl.create_default_context(cafile=ca)
    with context.wrap_socket(raw, server_hostname="localhost") as s:
        s.sendall(b"GET /env HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    return json.loads(data.split(b"\r\n\r\n", 1)[1])


def test_a_proxy_header_before_the_tls_handshake_names_the_client(molt, tmp_path, certs):
    cert, key = live_cert(certs, tmp_path)
    listen = {"address": "tcp://127.0.0.1:0", "proxy_protocol": True,
              "tls": {"cert": str(cert), "key": str(key)}}
    m = molt({"app": "edge_app:application", "chdir": str(APPS), "workers": 2,
              "listen": [listen]})
    wait_until(lambda: "(engine native:" in m.log(), 10, "the native engine's ready lines")
    v1 = b"PROXY TCP4 203.0.113.7 10.0.0.1 5555 443\r\n"
    v2 = (b"\r\n\r\n\x00\r\nQUIT\n" + bytes([0x21, 0x11]) + struct.pack("!H", 12)
          + socket.inet_aton("198.51.100.9") + socket.inet_aton("10.0.0.1")
          + struct.pack("!HH", 4711, 443))
    for preamble, client in ((v1, ("203.0.113.7", "5555")), (v2, ("198.51.100.9", "4711"))):
        env = https_env_after(m.port, certs.ca, preamble)
        assert (env["REMOTE_ADDR"], env["REMOTE_PORT"]) == client
        assert env["wsgi.url_scheme"] == "https"
    # The TLS ClientHello is no PROXY header: closed without an answer.
    with pytest.raises((ssl.SSLError, ConnectionError)):
        https_env_after(m.port, certs.ca, b"")

    # The Python engines would look for the header inside TLS: refused with the reason.
    config = tmp_path / "python.yaml"
    config.write_text(json.dumps({"app": "edge_app:application", "chdir": str(APPS),
                                  "engine": "python", "listen": [listen]}))
    out = subprocess.run([molt_bin(), "check", "--offline", "-c", str(config)],
                         capture_output=True, text=True, timeout=30)
    assert out.returncode != 0
    assert "`proxy_protocol` together with `tls` needs the native engine" in out.stderr


@pytest.mark.parametrize("app,interface", [("flask_proxy_app:app", "wsgi"),
                                           ("starlette_proxy_app:app", "asgi")])
def test_real_frameworks_build_public_urls_behind_a_trusted_proxy(molt, app, interface):
    # X-Forwarded-Host is honoured when named: a proxy that sets it (the default is only
    # the two headers every proxy sets).
    m = molt({"app": app, "interface": interface, "chdir": str(APPS), "workers": 1,
              "proxy": {"trusted": ["127.0.0.1"],
                        "headers": ["x-forwarded-for", "x-forwarded-proto", "x-forwarded-host"]}})
    headers = ("X-Forwarded-For: 203.0.113.7\r\nX-Forwarded-Proto: https\r\n"
               "X-Forwarded-Host: shop.example\r\n")

    def get(extra: str) -> dict:
        with socket.create_connection(("127.0.0.1", m.port), timeout=10) as s:
            s.sendall(f"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n{extra}\r\n"
                      .encode())
            data = b""
            while chunk := s.recv(65536):
                data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200"), data
        return json.loads(body)

    seen = get(headers)
    assert seen["url"] == "https://shop.example/"
    assert seen["remote"] == "203.0.113.7"
    plain = get("")
    assert plain["url"] == "http://127.0.0.1/" and plain["remote"] == "127.0.0.1"
