"""Warm-up: one real request to health_path through the worker's own HTTP code path.

It runs over a socketpair fed to the server's connection handler, so the request exercises
the parser, environ building and response framing exactly as a client would (and a Django
project has loaded its URLconf and views by the time it answers).
"""
from __future__ import annotations

import socket
import time
from typing import Callable, Mapping, Optional, Tuple


def build_request(path: str, host: str, headers: Mapping[str, str] = {}) -> bytes:
    """`health.host` is its Host header and `health.headers` are added (the master validated
    them: no CR/LF, not Host, Content-Length, Connection or Transfer-Encoding)."""
    extra = "".join("%s: %s\r\n" % item for item in headers.items())
    return ("GET %s HTTP/1.1\r\nHost: %s\r\nUser-Agent: molt-warmup\r\n%sConnection: close\r\n\r\n"
            % (path, host, extra)).encode("latin-1")


def parse_response(raw: bytes) -> Tuple[int, bytes]:
    """Status code and body start from a response we framed ourselves."""
    head, _, body = raw.partition(b"\r\n\r\n")
    while head.startswith(b"HTTP/1.1 1") and b" 101 " not in head[:13]:  # skip interim 1xx
        head, _, body = body.partition(b"\r\n\r\n")
    parts = head.split(b" ", 2)
    if len(parts) < 2 or not parts[1].isdigit():
        return 0, raw[:200]
    return int(parts[1]), body


def run_client(sock: socket.socket, request: bytes, timeout: float) -> bytes:
    """Send the request and read until EOF or the deadline."""
    deadline = time.monotonic() + timeout
    sock.settimeout(max(0.01, timeout))
    sock.sendall(request)
    chunks = []
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError("no complete warm-up response within %.1fs" % timeout)
        sock.settimeout(remaining)
        data = sock.recv(65536)
        if not data:
            return b"".join(chunks)
        chunks.append(data)


def verdict(path: str, raw: bytes) -> Optional[str]:
    """None when the warm-up passed, else the one-line ERROR= text."""
    status, body = parse_response(raw)
    if 200 <= status < 300:
        return None
    snippet = body[:200].decode("utf-8", "replace").replace("\r", " ").replace("\n", " ")
    if status == 0:
        return "warm-up GET %s: no valid HTTP response (got %r)" % (path, raw[:100])
    return "warm-up GET %s answered %d: %s" % (path, status, snippet.strip())


def over_socketpair(hand_over: Callable[[socket.socket], None], path: str, host: str,
                    timeout: float, headers: Mapping[str, str] = {}) -> Optional[str]:
    """The warm-up for an engine that serves from threads: `hand_over` gives the server end
    of a socketpair to the engine's connection handling; this thread plays the client."""
    server_end, client_end = socket.socketpair()
    try:
        hand_over(server_end)
        raw = run_client(client_end, build_request(path, host, headers), timeout)
    except (OSError, TimeoutError) as exc:
        return "warm-up GET %s failed: %s" % (path, exc)
    finally:
        client_end.close()
    return verdict(path, raw)
