"""Trusted forwarding headers through every engine, over TCP and a unix socket: the exact environ
(WSGI) and scope (ASGI) values the app sees, and the client the access log shows.

The rule itself is tabled in test_forwarded_rule.py; here the point is that each engine applies
it, from trusted peers only, and that a malformed header is served as if it were absent."""
import json

import pytest

from harness import Client

pytestmark = pytest.mark.timeout(60)

# Every header the rule knows, named: these tests are about each engine applying it. The
# default (X-Forwarded-For and -Proto only) has its own tests.
EVERY_HEADER = ["x-forwarded-for", "x-forwarded-proto", "x-forwarded-host", "x-forwarded-port",
                "forwarded"]
CHAIN = ("X-Forwarded-For: 198.51.100.1, 203.0.113.7, 10.1.2.3\r\n"
         "X-Forwarded-Proto: https\r\nX-Forwarded-Host: shop.example\r\n")


def get(listeners, path, headers, unix=False):
    """GET `path` with extra header lines, sent as latin-1 (a byte such as 0xb2, "²", as a
    client sends it, where the harness's request() would send UTF-8)."""
    c = Client(unix_path=listeners.unix_path) if unix else Client(listeners.port)
    try:
        c.send(("GET %s HTTP/1.1\r\nHost: test\r\n%s\r\n" % (path, headers)).encode("latin-1"))
        return c.response("GET")
    finally:
        c.close()


def wsgi_env(listeners, headers, unix=False):
    status, _, body = get(listeners, "/env", headers, unix)
    assert status == 200
    env = json.loads(body)
    return {k: env[k] for k in ("wsgi.url_scheme", "REMOTE_ADDR", "REMOTE_PORT", "SERVER_NAME",
                                "SERVER_PORT")}, env["headers"].get("HTTP_HOST")


def spawn_wsgi(spawn, trusted, access_log=False, headers=EVERY_HEADER):
    overrides = {"proxy": {"trusted": trusted, "headers": headers}}
    if access_log:
        overrides["logging"] = {"access_log": True, "access_log_format": "ACCESS {remote} {path}"}
    return spawn("edge_app:application", health_path="/healthz", overrides=overrides).wait_ready()


@pytest.mark.usefixtures("engine")
class TestWSGI:
    def test_trusted_tcp_peer_chain(self, listeners, spawn):
        w = spawn_wsgi(spawn, ["127.0.0.1", "10.0.0.0/8"], access_log=True)
        env, host = wsgi_env(listeners, CHAIN)
        assert env == {"wsgi.url_scheme": "https", "REMOTE_ADDR": "203.0.113.7", "REMOTE_PORT": "",
                       "SERVER_NAME": "shop.example", "SERVER_PORT": "443"}
        assert host == "shop.example"
        from harness import wait_until
        wait_until(lambda: any("ACCESS 203.0.113.7:- /env" in line for line in w.stdout), 10,
                   "the access log showing the forwarded client")

    def test_rfc7239_forwarded(self, listeners, spawn):
        spawn_wsgi(spawn, ["127.0.0.1"])
        env, host = wsgi_env(listeners, 'Forwarded: for="[2001:db8::7]:4711";proto=https;'
                                        'host="api.example:8443"\r\n')
        assert env == {"wsgi.url_scheme": "https", "REMOTE_ADDR": "2001:db8::7",
                       "REMOTE_PORT": "4711", "SERVER_NAME": "api.example", "SERVER_PORT": "8443"}
        assert host == "api.example:8443"

    def test_untrusted_peer_changes_nothing(self, listeners, spawn):
        spawn_wsgi(spawn, ["10.0.0.0/8", "unix"])  # not 127.0.0.1
        env, host = wsgi_env(listeners, CHAIN)
        assert env["wsgi.url_scheme"] == "http" and env["REMOTE_ADDR"] == "127.0.0.1"
        assert env["REMOTE_PORT"] not in ("", None)
        assert (env["SERVER_NAME"], env["SERVER_PORT"]) == ("127.0.0.1", str(listeners.port))
        assert host == "test"

    def test_unix_peer_trusted_with_unix(self, listeners, spawn):
        spawn_wsgi(spawn, ["unix", "10.0.0.0/8"])
        env, host = wsgi_env(listeners, CHAIN, unix=True)
        assert env == {"wsgi.url_scheme": "https", "REMOTE_ADDR": "203.0.113.7", "REMOTE_PORT": "",
                       "SERVER_NAME": "shop.example", "SERVER_PORT": "443"}
        # ... and the TCP peer (127.0.0.1) is not trusted by `unix`.
        env, _ = wsgi_env(listeners, CHAIN)
        assert (env["wsgi.url_scheme"], env["REMOTE_ADDR"]) == ("http", "127.0.0.1")

    def test_unix_peer_untrusted(self, listeners, spawn):
        spawn_wsgi(spawn, ["127.0.0.1"])
        env, _ = wsgi_env(listeners, CHAIN, unix=True)
        assert (env["wsgi.url_scheme"], env["REMOTE_ADDR"], env["SERVER_NAME"]) == (
            "http", "", "localhost")

    def test_malformed_values_are_ignored_not_500(self, listeners, spawn):
        spawn_wsgi(spawn, ["127.0.0.1"])
        for bad in ("X-Forwarded-For: not-an-ip\r\n", "X-Forwarded-Proto: gopher\r\n",
                    "X-Forwarded-Host: a/b\r\n", "Forwarded: for=\"1.2.3.4\r\n",
                    "X-Forwarded-Port: 70000\r\n", "X-Forwarded-Port: \xb2\r\n"):
            env, host = wsgi_env(listeners, bad)
            assert (env["wsgi.url_scheme"], env["REMOTE_ADDR"], env["SERVER_PORT"], host) == (
                "http", "127.0.0.1", str(listeners.port), "test"), bad
        # Each on its own: a bad header beside the proxy's X-Forwarded-For leaves the client
        # it names (the client writes the other headers; it must not look like the proxy).
        for bad in ("X-Forwarded-Host: a/b\r\n", "X-Forwarded-Port: \xb2\r\n",
                    "X-Forwarded-Proto: https, https, http\r\n", "X-Forwarded-For: garbage\r\n"):
            env, host = wsgi_env(listeners, bad + "X-Forwarded-For: 203.0.113.7\r\n")
            assert (env["REMOTE_ADDR"], host) == ("203.0.113.7", "test"), bad

    def test_by_default_only_for_and_proto_count(self, listeners, spawn):
        # A proxy that does not set X-Forwarded-Host or Forwarded passes the client's own.
        spawn("edge_app:application", health_path="/healthz",
              overrides={"proxy": {"trusted": ["127.0.0.1"]}}).wait_ready()
        env, host = wsgi_env(listeners, CHAIN + "Forwarded: for=198.51.100.9;host=evil\r\n")
        assert env == {"wsgi.url_scheme": "https", "REMOTE_ADDR": "10.1.2.3", "REMOTE_PORT": "",
                       "SERVER_NAME": "127.0.0.1", "SERVER_PORT": "443"}
        assert host == "test"

    def test_no_proxy_section_changes_nothing(self, listeners, spawn):
        spawn("edge_app:application", health_path="/healthz").wait_ready()
        env, _ = wsgi_env(listeners, CHAIN)
        assert (env["wsgi.url_scheme"], env["REMOTE_ADDR"]) == ("http", "127.0.0.1")


def asgi_scope(listeners, headers, unix=False):
    status, _, body = get(listeners, "/", headers, unix)
    assert status == 200
    return json.loads(body)


def spawn_asgi(spawn, trusted, access_log=False, headers=EVERY_HEADER):
    overrides = {"proxy": {"trusted": trusted, "headers": headers}}
    if access_log:
        overrides["logging"] = {"access_log": True, "access_log_format": "ACCESS {remote} {path}"}
    return spawn("asgi_proxy_app:app", interface="asgi", health_path="/healthz",
                 overrides=overrides).wait_ready()


class TestASGI:
    def test_trusted_tcp_peer_chain(self, listeners, spawn):
        w = spawn_asgi(spawn, ["127.0.0.1", "10.0.0.0/8"], access_log=True)
        scope = asgi_scope(listeners, CHAIN.replace("203.0.113.7", "203.0.113.7:5050"))
        assert scope == {"scheme": "https", "client": ["203.0.113.7", 5050],
                         "server": ["shop.example", 443], "host": ["shop.example"]}
        from harness import wait_until
        wait_until(lambda: any("ACCESS 203.0.113.7:5050 /" in line for line in w.stdout), 10,
                   "the access log showing the forwarded client")

    def test_rfc7239_forwarded(self, listeners, spawn):
        spawn_asgi(spawn, ["127.0.0.1"])
        scope = asgi_scope(listeners, "Forwarded: for=203.0.113.9;proto=https\r\n")
        assert scope == {"scheme": "https", "client": ["203.0.113.9", 0],
                         "server": ["127.0.0.1", 443], "host": ["test"]}

    def test_untrusted_peer_changes_nothing(self, listeners, spawn):
        spawn_asgi(spawn, ["10.0.0.0/8"])
        scope = asgi_scope(listeners, CHAIN)
        assert scope["scheme"] == "http" and scope["client"][0] == "127.0.0.1"
        assert scope["server"] == ["127.0.0.1", listeners.port] and scope["host"] == ["test"]

    def test_unix_peer(self, listeners, spawn):
        spawn_asgi(spawn, ["unix", "10.0.0.0/8"])
        scope = asgi_scope(listeners, CHAIN, unix=True)
        assert scope == {"scheme": "https", "client": ["203.0.113.7", 0],
                         "server": ["shop.example", 443], "host": ["shop.example"]}
        scope = asgi_scope(listeners, CHAIN)  # TCP from 127.0.0.1: not trusted by `unix`
        assert scope["scheme"] == "http" and scope["client"][0] == "127.0.0.1"

    def test_malformed_values_are_ignored_not_500(self, listeners, spawn):
        spawn_asgi(spawn, ["127.0.0.1"])
        for bad in ("X-Forwarded-For: not-an-ip\r\n", "X-Forwarded-Proto: gopher\r\n",
                    "Forwarded: for\r\n", "X-Forwarded-Port: \xb2\r\n"):
            scope = asgi_scope(listeners, bad)
            assert scope["scheme"] == "http" and scope["client"][0] == "127.0.0.1", bad
            assert scope["host"] == ["test"]
        for bad in ("X-Forwarded-Host: a/b\r\n", "X-Forwarded-For: garbage\r\n"):
            scope = asgi_scope(listeners, bad + "X-Forwarded-For: 203.0.113.7\r\n")
            assert scope["client"][0] == "203.0.113.7" and scope["host"] == ["test"], bad
        # The client's own broken Forwarded, left of the proxy's element, changes nothing.
        scope = asgi_scope(listeners, 'Forwarded: for="1.2.3.4, for=203.0.113.7\r\n')
        assert scope["client"][0] == "203.0.113.7"
