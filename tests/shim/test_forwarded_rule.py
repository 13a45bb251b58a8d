"""The trusted-proxy rule (molt_shim/forwarded.py) as a table: headers in, what the app sees out.

The rule is pure, so it is tested in-process; tests/shim/test_proxy_headers.py checks the same
rule through every engine over real sockets."""
import os
import sys

import pytest

from harness import SHIM_DIR

sys.path.insert(0, SHIM_DIR)
from molt_shim.forwarded import (  # noqa: E402
    ALL_HEADERS, DEFAULT_HEADERS, Forwarded, ProxyRule, Trust, from_config, parse_forwarded,
    resolve)

TRUST = Trust(["127.0.0.1", "10.0.0.0/8", "fd00::/8", "unix"])

XFF = "x-forwarded-for"
XFP = "x-forwarded-proto"
XFH = "x-forwarded-host"
XFPORT = "x-forwarded-port"
FWD = "forwarded"

# (headers, expected Forwarded) for a trusted peer honouring every header.
TABLE = [
    ({}, Forwarded()),
    ({XFF: "203.0.113.7"}, Forwarded(client="203.0.113.7")),
    ({XFF: "203.0.113.7:5555"}, Forwarded(client="203.0.113.7", client_port=5555)),
    ({XFF: "2001:db8::1"}, Forwarded(client="2001:db8::1")),
    ({XFF: "[2001:db8::1]:443"}, Forwarded(client="2001:db8::1", client_port=443)),
    # The right-most untrusted hop: the left ones could be made up by the client.
    ({XFF: "1.1.1.1, 203.0.113.7, 10.0.0.2"}, Forwarded(client="203.0.113.7")),
    ({XFF: "198.51.100.1,203.0.113.7"}, Forwarded(client="203.0.113.7")),
    # Every hop trusted: the left-most one is the client.
    ({XFF: "10.0.0.3, 10.0.0.2"}, Forwarded(client="10.0.0.3")),
    ({XFP: "https"}, Forwarded(scheme="https")),
    ({XFP: "HTTPS"}, Forwarded(scheme="https")),
    ({XFH: "example.com"}, Forwarded(host="example.com")),
    ({XFH: "example.com:8443"}, Forwarded(host="example.com", port=8443)),
    ({XFH: "[2001:db8::5]:8443"}, Forwarded(host="[2001:db8::5]", port=8443)),
    ({XFPORT: "8443"}, Forwarded(port=8443)),
    ({XFH: "example.com:444", XFPORT: "8443"}, Forwarded(host="example.com", port=444)),
    # One proto per hop: the chosen hop's.
    ({XFF: "203.0.113.7, 10.0.0.2", XFP: "https, http"},
     Forwarded(scheme="https", client="203.0.113.7")),
    # A malformed list is left out on its own: the client still counts.
    ({XFF: "203.0.113.7, 10.0.0.2", XFP: "http, https, http"}, Forwarded(client="203.0.113.7")),
    ({XFF: "203.0.113.7", XFP: "https", XFH: "shop.example"},
     Forwarded(scheme="https", client="203.0.113.7", host="shop.example")),
    # RFC 7239.
    ({FWD: "for=203.0.113.7;proto=https;host=example.com"},
     Forwarded(scheme="https", client="203.0.113.7", host="example.com")),
    ({FWD: 'for="[2001:db8::1]:4711";proto=https'},
     Forwarded(scheme="https", client="2001:db8::1", client_port=4711)),
    ({FWD: 'For="203.0.113.7:80", for=10.0.0.2;proto=http'},
     Forwarded(client="203.0.113.7", client_port=80)),
    ({FWD: "for=198.51.100.1;proto=http, for=203.0.113.7;proto=https;host=a.example, "
           "for=10.0.0.2;proto=http"},
     Forwarded(scheme="https", client="203.0.113.7", host="a.example")),
    ({FWD: "for=unknown;proto=https"}, Forwarded(scheme="https")),
    ({FWD: "for=_hidden, for=10.0.0.2"}, Forwarded()),
    # Forwarded wins over X-Forwarded-*.
    ({FWD: "for=203.0.113.7", XFF: "198.51.100.1", XFP: "https"},
     Forwarded(client="203.0.113.7")),
    # Malformed: ignored as a whole, never an error.
    ({XFF: "not-an-address"}, Forwarded()),
    ({XFF: "203.0.113.7:99999"}, Forwarded()),
    ({XFF: "203.0.113.7, , 10.0.0.2"}, Forwarded()),
    ({XFF: "unknown"}, Forwarded()),
    ({XFP: "gopher"}, Forwarded()),
    ({XFH: "evil.example/path"}, Forwarded()),
    ({XFH: "a b"}, Forwarded()),
    ({XFPORT: "0"}, Forwarded()),
    ({XFPORT: "http"}, Forwarded()),
    ({FWD: "for=2001:db8::1"}, Forwarded()),  # IPv6 must be quoted and bracketed
    ({FWD: 'for="203.0.113.7'}, Forwarded()),
    ({FWD: "for"}, Forwarded()),
    ({FWD: "for=1.2.3.4;for=5.6.7.8"}, Forwarded()),
    ({FWD: "for=1.2.3.4,"}, Forwarded()),
    ({FWD: "for=203.0.113.7;proto=ftp"}, Forwarded(client="203.0.113.7")),
    # Each header on its own: a client behind the proxy writes the left part of every list,
    # and one bad value must not make its request look like the proxy's own.
    ({XFF: "garbage, 203.0.113.7"}, Forwarded(client="203.0.113.7")),
    ({XFF: "1.2.3.4:99999, 203.0.113.7, 10.0.0.2"}, Forwarded(client="203.0.113.7")),
    ({XFF: "203.0.113.7", XFH: "a/b"}, Forwarded(client="203.0.113.7")),
    ({XFF: "203.0.113.7", XFPORT: "99999"}, Forwarded(client="203.0.113.7")),
    ({XFF: "203.0.113.7", XFP: "https, https, http"}, Forwarded(client="203.0.113.7")),
    ({XFF: "garbage", XFP: "https"}, Forwarded(scheme="https")),
    # Forwarded, too, is read from the right: what the client wrote left of the proxy's
    # elements is never parsed, an unclosed quote of its own included.
    ({FWD: "x, for=203.0.113.7;proto=https"}, Forwarded(scheme="https", client="203.0.113.7")),
    ({FWD: 'for="1.2.3.4, for=203.0.113.7'}, Forwarded(client="203.0.113.7")),
    ({FWD: 'for="_a\\"b";by=x, for=203.0.113.9'}, Forwarded(client="203.0.113.9")),
    # Honoured and sent, it decides: broken in the proxy's part, nothing is taken from it,
    # nor from X-Forwarded-For (a proxy that sets Forwarded may pass the client's own).
    ({FWD: "garbage", XFF: "203.0.113.7"}, Forwarded()),
    ({FWD: "for=garbage", XFF: "203.0.113.7"}, Forwarded()),
    ({FWD: "for=UNKNOWN;proto=https"}, Forwarded(scheme="https")),  # RFC 7239 tokens: any case
    # Digits are ASCII ("²".isdigit() is True, and int() refused it: a 500).
    ({XFPORT: "\xb2"}, Forwarded()),
    ({XFF: "203.0.113.7:\xb9"}, Forwarded()),
    ({XFH: "example.com:\xb9"}, Forwarded()),
    # inet_ntop()'s text, as the socket's own address; a zone is refused, as inet_pton() does.
    ({XFF: "::ffff:198.51.100.9"}, Forwarded(client="::ffff:198.51.100.9")),
    ({XFF: "fe80::1%eth0"}, Forwarded()),
    ({XFF: "203.0.113.7, ::1%x y"}, Forwarded()),
]


@pytest.mark.parametrize("headers,expected", TABLE)
def test_rule_for_a_trusted_peer(headers, expected):
    assert resolve(headers, ALL_HEADERS, TRUST, peer_trusted=True) == expected


@pytest.mark.parametrize("headers,expected", TABLE)
def test_an_untrusted_peer_changes_nothing(headers, expected):
    assert resolve(headers, ALL_HEADERS, TRUST, peer_trusted=False) == Forwarded()


def test_only_honoured_headers_count():
    headers = {XFF: "203.0.113.7", XFP: "https", FWD: "for=198.51.100.1"}
    assert resolve(headers, (XFP,), TRUST, True) == Forwarded(scheme="https")
    assert resolve(headers, (XFF, XFP), TRUST, True) == Forwarded(
        scheme="https", client="203.0.113.7")


def test_the_default_headers_are_the_two_every_proxy_sets():
    # Any other header is the client's own unless the proxy sets it: opted into by name.
    rule = from_config({"proxy": {"trusted": ["127.0.0.1"]}})
    assert rule is not None and rule.honoured == DEFAULT_HEADERS == (XFF, XFP)
    headers = {XFF: "203.0.113.7", XFH: "evil.example", FWD: "for=198.51.100.1"}
    assert rule.resolve(headers, True) == Forwarded(client="203.0.113.7")
    # An empty list honours nothing (it did not fall back to every header).
    assert from_config({"proxy": {"trusted": ["127.0.0.1"], "headers": []}}) is None
    assert from_config({"proxy": {"trusted": ["127.0.0.1"], "headers": [FWD]}}).honoured == (FWD,)


def test_trust_matching():
    assert TRUST.address("127.0.0.1") and TRUST.address("10.200.1.1")
    assert TRUST.address("fd12::1") and TRUST.address("::ffff:10.0.0.1")
    assert not TRUST.address("127.0.0.2") and not TRUST.address("11.0.0.1")
    assert not TRUST.address("garbage") and not TRUST.address("")
    assert TRUST.peer(None, is_unix=True)
    assert not Trust(["127.0.0.1"]).peer(None, is_unix=True)
    assert Trust(["*"]).peer("192.0.2.1", is_unix=False) and Trust(["*"]).peer("", True)
    assert not Trust([])


def test_parse_forwarded_quoting():
    assert parse_forwarded('for="_a\\"b";by=x, host="h:1"') == [
        {"for": '_a"b', "by": "x"}, {"host": "h:1"}]


def _environ(remote="127.0.0.1", port="4000", **extra):
    env = {"REMOTE_ADDR": remote, "REMOTE_PORT": port, "wsgi.url_scheme": "http",
           "SERVER_NAME": "127.0.0.1", "SERVER_PORT": "8000", "HTTP_HOST": "127.0.0.1:8000"}
    env.update(extra)
    return env


def test_environ_from_a_trusted_peer():
    rule = ProxyRule(["127.0.0.1"], ALL_HEADERS)
    env = _environ(HTTP_X_FORWARDED_FOR="203.0.113.7", HTTP_X_FORWARDED_PROTO="https",
                   HTTP_X_FORWARDED_HOST="shop.example")
    assert rule.adjust_environ(env) == "203.0.113.7:-"
    assert (env["REMOTE_ADDR"], env["REMOTE_PORT"]) == ("203.0.113.7", "")
    assert env["wsgi.url_scheme"] == "https" and env["HTTPS"] == "on"
    assert (env["HTTP_HOST"], env["SERVER_NAME"], env["SERVER_PORT"]) == (
        "shop.example", "shop.example", "443")


def test_environ_port_only_keeps_the_host_name():
    rule = ProxyRule(["127.0.0.1"], ALL_HEADERS)
    env = _environ(HTTP_X_FORWARDED_PORT="8443", HTTP_X_FORWARDED_PROTO="https")
    assert rule.adjust_environ(env) is None
    assert (env["HTTP_HOST"], env["SERVER_PORT"]) == ("127.0.0.1:8443", "8443")


def test_environ_from_an_untrusted_peer_is_untouched():
    rule = ProxyRule(["127.0.0.1"], ALL_HEADERS)
    env = _environ(remote="192.0.2.9", HTTP_X_FORWARDED_FOR="203.0.113.7",
                   HTTP_X_FORWARDED_PROTO="https")
    before = dict(env)
    assert rule.adjust_environ(env) is None
    assert env == before


def test_environ_over_a_unix_socket():
    env = _environ(remote="", port="", HTTP_X_FORWARDED_FOR="203.0.113.7")
    assert ProxyRule(["127.0.0.1"], ALL_HEADERS).adjust_environ(dict(env)) is None
    assert ProxyRule(["unix"], ALL_HEADERS).adjust_environ(env) == "203.0.113.7:-"


def test_scope():
    rule = ProxyRule(["127.0.0.1"], ALL_HEADERS)
    scope = {"type": "http", "scheme": "http", "client": ("127.0.0.1", 4000),
             "server": ("127.0.0.1", 8000),
             "headers": [(b"host", b"127.0.0.1:8000"), (b"x-forwarded-for", b"203.0.113.7:9"),
                         (b"x-forwarded-proto", b"https"), (b"x-forwarded-host", b"a.example")]}
    out = rule.adjust_scope(scope)
    assert out is not scope and scope["scheme"] == "http"
    assert out["scheme"] == "https" and out["client"] == ("203.0.113.7", 9)
    assert out["server"] == ("a.example", 443)
    assert (b"host", b"a.example") in out["headers"] and (b"host", b"127.0.0.1:8000") not in out[
        "headers"]
    ws = dict(scope, type="websocket", scheme="ws")
    assert rule.adjust_scope(ws)["scheme"] == "wss"
    untrusted = dict(scope, client=("192.0.2.1", 1))
    assert rule.adjust_scope(untrusted) is untrusted
