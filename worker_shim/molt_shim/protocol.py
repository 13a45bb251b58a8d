"""The worker's end of the master channel: one sd_notify-style message per SEQPACKET packet."""
from __future__ import annotations

import logging
import os
import socket
import threading
from typing import Dict, List, Optional

log = logging.getLogger("molt_shim")

MAX_PACKET = 65536


def encode(fields: Dict[str, object]) -> bytes:
    # Values are single lines by contract; flatten anything that is not, so a newline inside
    # an error text cannot forge a second key.
    lines = []
    for key, value in fields.items():
        text = " ".join(str(value).splitlines())
        lines.append("%s=%s" % (key, text))
    return "\n".join(lines).encode("utf-8", "replace")


def decode(packet: bytes) -> Dict[str, str]:
    out: Dict[str, str] = {}
    for line in packet.decode("utf-8", "replace").splitlines():
        key, sep, value = line.partition("=")
        if sep:
            out[key.strip()] = value
    return out


class Channel:
    """Thread-safe sender and non-blocking receiver.

    Without MOLT_CHANNEL_FD (a worker started by hand) the channel is inert, which keeps
    `python -m molt_shim` usable for debugging.
    """

    def __init__(self, fd: int) -> None:
        self._lock = threading.Lock()
        self.sock: Optional[socket.socket] = None
        self.closed = False
        # A send failed because the master's end is closed (not a full buffer, not an inert
        # channel): whoever waits to be counted by the master knows it never will be.
        self.peer_closed = False
        if fd >= 0:
            os.set_inheritable(fd, False)  # app subprocesses must not keep the channel open
            self.sock = socket.socket(fileno=fd)
            self.sock.setblocking(False)

    def fileno(self) -> int:
        return self.sock.fileno() if self.sock is not None else -1

    def send(self, **fields: object) -> bool:
        if self.sock is None or self.closed:
            return False
        data = encode(fields)
        with self._lock:
            try:
                # A SEQPACKET send is atomic; the master drains its end promptly, so a full
                # buffer means it is wedged and dropping one heartbeat is the right outcome.
                self.sock.send(data)
                return True
            except (BlockingIOError, InterruptedError):
                log.warning("channel full, dropped message %s", list(fields)[0])
            except OSError as exc:
                log.debug("channel send failed: %s", exc)
                self.peer_closed = True
            return False

    def receive(self) -> Optional[List[Dict[str, str]]]:
        """All pending messages; None once the master has gone (EOF or error)."""
        if self.sock is None:
            return []
        messages: List[Dict[str, str]] = []
        while True:
            try:
                packet = self.sock.recv(MAX_PACKET)
            except (BlockingIOError, InterruptedError):
                return messages
            except OSError:
                return None if not messages else messages
            if not packet:
                return None if not messages else messages
            messages.append(decode(packet))

    def close(self) -> None:
        self.closed = True
        if self.sock is not None:
            with self._lock:
                self.sock.close()


def one_line(exc: BaseException, limit: int = 1000) -> str:
    """An exception as one line of an ERROR= message."""
    text = " ".join(("%s: %s" % (type(exc).__name__, exc)).splitlines())
    return text[:limit]


def rss_bytes() -> int:
    try:
        with open("/proc/self/statm", "rb") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0
