"""Request counters shared by the serving threads and the heartbeat."""
from __future__ import annotations

import itertools
import random
import threading
import time
from typing import Any, Dict, Optional, Tuple

from .protocol import Channel, rss_bytes


class Stats:
    def __init__(self, channel: Channel, max_requests: int, jitter: int) -> None:
        self.channel = channel
        self.requests = 0
        self._lock = threading.Lock()
        self._ids = itertools.count(1)
        # token -> monotonic start; dict item set/delete are atomic under the GIL, and the
        # heartbeat copies the values in one C call, so no lock is needed here.
        self.inflight: Dict[int, float] = {}
        self.retire_at = max_requests + random.randint(0, max(0, jitter)) if max_requests > 0 else 0
        self.retire_sent = False
        self.observed: Optional[Tuple[int, float]] = None  # (in flight, oldest start) via observe()

    def begin(self, started: float) -> int:
        token = next(self._ids)
        self.inflight[token] = started
        return token

    def end(self, token: int) -> None:
        self.inflight.pop(token, None)
        with self._lock:
            self.requests += 1
            count = self.requests
        self._maybe_retire(count)

    def inflight_count(self) -> int:
        if self.observed is not None:
            return self.observed[0]
        return len(self.inflight)

    def observe(self, requests: int, inflight: int, oldest_started: float) -> None:
        """Counters taken from outside (the ASGI server reads them off its connections at
        each tick instead of paying for begin()/end() on every request)."""
        self.requests = requests
        self.observed = (inflight, oldest_started)
        self._maybe_retire(requests)

    def _maybe_retire(self, count: int) -> None:
        if self.retire_at and count >= self.retire_at and not self.retire_sent:
            self.retire_sent = True
            # Keep serving: the master spawns a replacement first, then sends DRAIN.
            self.channel.send(RETIRE="max_requests")

    def heartbeat(self) -> Dict[str, Any]:
        if self.observed is not None:
            count, first = self.observed
            oldest = int((time.monotonic() - first) * 1000) if count else 0
        else:
            starts = list(self.inflight.values())
            count = len(starts)
            oldest = int((time.monotonic() - min(starts)) * 1000) if starts else 0
        return {"WATCHDOG": 1, "REQUESTS": self.requests, "INFLIGHT": count,
                "OLDEST_MS": max(0, oldest), "RSS": rss_bytes()}
