"""Per-request counters for engines that count as they serve (the threaded WSGI engine)."""
from __future__ import annotations

import itertools
import threading
import time
from typing import Callable, Dict, Optional

from .engines.base import Counters
from .request_metrics import RequestMetrics


class RequestCounter:
    """begin()/end() around every request, from any serving thread; counters() for heartbeats.

    `on_count` gets the new total after every finished request (the lifecycle's RETIRE check).
    """

    def __init__(self, on_count: Callable[[int], None],
                 metrics: Optional[RequestMetrics] = None) -> None:
        self.requests = 0
        self.metrics = metrics  # None: metrics off, nothing but the count per request
        self._on_count = on_count
        self._lock = threading.Lock()
        self._ids = itertools.count(1)
        # token -> monotonic start; dict item set/delete are atomic under the GIL, and the
        # heartbeat copies the values in one C call, so no lock is needed here.
        self.inflight: Dict[int, float] = {}

    def begin(self, started: float) -> int:
        token = next(self._ids)
        self.inflight[token] = started
        return token

    def end(self, token: int, status: int = 0, seconds: float = 0.0,
            raised: bool = False) -> None:
        self.inflight.pop(token, None)
        metrics = self.metrics
        with self._lock:
            self.requests += 1
            count = self.requests
            if metrics is not None:
                metrics.observe(status, seconds)
                metrics.exceptions += raised
        self._on_count(count)

    def inflight_count(self) -> int:
        return len(self.inflight)

    def counters(self, connections: int) -> Counters:
        starts = list(self.inflight.values())
        metrics = self.metrics
        if metrics is None:
            return Counters(self.requests, len(starts),
                            min(starts) if starts else time.monotonic(), connections)
        with self._lock:  # one consistent snapshot of the buckets
            durations = metrics.encode()
        return Counters(self.requests, len(starts), min(starts) if starts else time.monotonic(),
                        connections, durations, metrics.exceptions)
