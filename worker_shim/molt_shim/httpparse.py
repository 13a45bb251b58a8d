"""HTTP/1.1 request parser front: httptools (C, fast) or an h11 adapter with the same API.

The servers are written against httptools' callback API (on_message_begin, on_url, on_header,
on_headers_complete, on_body, on_message_complete); the h11 adapter replays h11 events as
those callbacks so the fallback needs no second server implementation.
"""
from __future__ import annotations

import os
from typing import Any, Optional, Tuple


class _H11Error(Exception):
    pass


class _H11Upgrade(Exception):
    pass


httptools: Any = None
if os.environ.get("MOLT_SHIM_PARSER", "") != "h11":  # the override exists to test the fallback
    try:
        import httptools
    except ImportError:
        httptools = None

HAVE_HTTPTOOLS = httptools is not None

if HAVE_HTTPTOOLS:
    ParserError: Tuple[type, ...] = (httptools.HttpParserError,)
    ParserUpgrade: type = httptools.HttpParserUpgrade

    def make_parser(proto: Any) -> Any:
        return httptools.HttpRequestParser(proto)

    def split_url(url: bytes) -> Tuple[bytes, bytes]:
        parsed = httptools.parse_url(url)
        return parsed.path or b"/", parsed.query or b""

else:
    ParserError = (_H11Error,)
    ParserUpgrade = _H11Upgrade

    def make_parser(proto: Any) -> Any:
        return H11Parser(proto)

    def split_url(url: bytes) -> Tuple[bytes, bytes]:
        from urllib.parse import urlsplit

        parts = urlsplit(url)
        return parts.path or b"/", parts.query or b""


class H11Parser:
    """httptools.HttpRequestParser look-alike built on h11 (one h11.Connection per request)."""

    def __init__(self, proto: Any) -> None:
        import h11

        self._h11 = h11
        self._proto = proto
        self._conn = h11.Connection(h11.SERVER, max_incomplete_event_size=128 * 1024)
        self._method = b""
        self._version = "1.1"
        self._keep_alive = True
        self._upgrade = False

    def get_method(self) -> bytes:
        return self._method

    def get_http_version(self) -> str:
        return self._version

    def should_keep_alive(self) -> bool:
        return self._keep_alive

    def should_upgrade(self) -> bool:
        return self._upgrade

    def feed_data(self, data: bytes) -> None:
        h11 = self._h11
        err = ParserError[0]
        self._conn.receive_data(data)
        while True:
            try:
                event = self._conn.next_event()
            except h11.RemoteProtocolError as exc:
                raise err(str(exc)) from None
            except Exception as exc:  # callbacks raise; mirror httptools' wrapping
                raise err("callback failed: %s" % exc) from exc
            if event is h11.NEED_DATA:
                return
            if event is h11.PAUSED or isinstance(event, h11.ConnectionClosed):
                return
            if isinstance(event, h11.Request):
                self._on_request(event)
            elif isinstance(event, h11.Data):
                self._call("on_body", bytes(event.data))
            elif isinstance(event, h11.EndOfMessage):
                self._call("on_message_complete")
                # h11 wants a response before the next cycle; we frame responses ourselves,
                # so start a fresh connection object on the bytes already received.
                rest, closed = self._conn.trailing_data
                self._conn = h11.Connection(h11.SERVER, max_incomplete_event_size=128 * 1024)
                if rest:
                    self._conn.receive_data(bytes(rest))
                if closed:
                    self._conn.receive_data(b"")

    def _call(self, name: str, *args: Any) -> None:
        fn = getattr(self._proto, name, None)
        if fn is not None:
            try:
                fn(*args)
            except Exception as exc:
                raise ParserError[0]("callback failed: %s" % exc) from exc

    def _on_request(self, event: Any) -> None:
        self._method = bytes(event.method)
        self._version = event.http_version.decode("ascii")
        conn_tokens = b",".join(v for k, v in event.headers if k == b"connection").lower()
        if self._version == "1.0":
            self._keep_alive = b"keep-alive" in conn_tokens
        else:
            self._keep_alive = b"close" not in conn_tokens
        self._upgrade = any(k == b"upgrade" for k, _ in event.headers) and b"upgrade" in conn_tokens
        self._call("on_message_begin")
        self._call("on_url", bytes(event.target))
        for name, value in event.headers.raw_items():
            self._call("on_header", bytes(name), bytes(value))
        self._call("on_headers_complete")


def parser_name() -> str:
    return "httptools" if HAVE_HTTPTOOLS else "h11"


def status_of(exc: BaseException) -> Optional[int]:
    """Map a parser error to a status: header overflow is 431, everything else 400."""
    text = str(exc).lower()
    if "overflow" in text or "too large" in text or "too long" in text:
        return 431
    return 400
