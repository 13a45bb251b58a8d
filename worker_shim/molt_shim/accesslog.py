"""Access log written by a background thread, so a slow stdout never blocks a request."""
from __future__ import annotations

import logging
import queue
import sys
import threading
from typing import Any, Optional, Tuple

from .config import DEFAULT_ACCESS_LOG_FORMAT

log = logging.getLogger("molt_shim")

# (remote, method, path, protocol, status, bytes, duration_ms)
Entry = Tuple[str, str, str, str, int, int, float]


class AccessLog:
    def __init__(self, fmt: str, generation: int, worker: int) -> None:
        self._fmt = fmt
        self._generation = generation
        self._worker = worker
        try:  # Reject an unusable format once, at start, instead of on every request.
            self._format(("127.0.0.1", "GET", "/", "HTTP/1.1", 200, 0, 0.0))
        except (KeyError, IndexError, ValueError) as exc:
            log.error("bad access_log_format (%s); using the default", exc)
            self._fmt = DEFAULT_ACCESS_LOG_FORMAT
        self._queue: "queue.SimpleQueue[Optional[Entry]]" = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="molt-accesslog", daemon=True)
        self._thread.start()

    def _format(self, entry: Entry) -> str:
        remote, method, path, protocol, status, nbytes, duration_ms = entry
        return self._fmt.format(remote=remote, method=method, path=path, protocol=protocol,
                                status=status, bytes=nbytes, duration_ms="%.1f" % duration_ms,
                                generation=self._generation, worker=self._worker)

    def put(self, entry: Entry) -> None:
        self._queue.put(entry)

    def _run(self) -> None:
        out = sys.stdout
        while True:
            entry = self._queue.get()
            lines = []
            while entry is not None:
                lines.append(self._format(entry))
                try:
                    entry = self._queue.get_nowait()
                except queue.Empty:
                    break
            try:
                if lines:
                    out.write("\n".join(lines) + "\n")
                out.flush()
            except (OSError, ValueError):
                pass
            if entry is None:
                return

    def close(self, timeout: float = 2.0) -> None:
        """Flush what is queued (bounded) before the process exits."""
        self._queue.put(None)
        self._thread.join(timeout)

    def reopen(self) -> None:
        # The access log goes to stdout, a pipe owned by the master: nothing to reopen.
        pass


def make(cfg: Any) -> Optional[AccessLog]:
    if not cfg.access_log:
        return None
    return AccessLog(cfg.access_log_format, cfg.generation, cfg.worker)
