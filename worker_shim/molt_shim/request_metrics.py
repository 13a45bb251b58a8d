"""Request duration histogram, responses by status class and app exceptions, for the heartbeat.

One copy of the bookkeeping for the Python engines (threaded_wsgi, uvicorn_asgi); the native
engine keeps the same buckets in C++ (worker_shim/native/engine.hpp, `kDurationBuckets`) and
the master the same again (supervisor/core/request_stats.hpp).
tests/integration/test_observability.py checks that the three agree.

Counts are cumulative over the worker's life, so a lost heartbeat loses nothing: the master
keeps the last value per worker, adds a worker's last value to its totals when it exits, and
its counters never go backwards.

Wire form (the heartbeat's `DURATIONS=` value, docs/protocol.md): one entry per status class
that has requests, `;`-separated, each `<class>:<sum in microseconds>:<b0>,<b1>,...` where
`bI` counts the requests with duration in (BUCKETS_S[I-1], BUCKETS_S[I]] (the last one: above
the last bound), not cumulative, with trailing zero buckets left out. For example
`2xx:51234:10,40,3;5xx:1200:0,1`.
"""
from __future__ import annotations

import bisect
from typing import List

# Upper bounds in seconds (Prometheus `le`), fixed: the master sums bucket by bucket.
BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
CLASSES = ("1xx", "2xx", "3xx", "4xx", "5xx")


def status_class(status: int) -> int:
    """Index into CLASSES. No status at all (the app raised before answering) is a 5xx."""
    if status <= 0:
        return 4
    return min(4, max(0, status // 100 - 1))


class RequestMetrics:
    """observe() once per finished request. Not locked: the threaded engine calls it under
    its counter's lock, the ASGI engine from its one event loop thread."""

    __slots__ = ("buckets", "sum_us", "exceptions")

    def __init__(self) -> None:
        self.buckets: List[List[int]] = [[0] * (len(BUCKETS_S) + 1) for _ in CLASSES]
        self.sum_us = [0] * len(CLASSES)
        self.exceptions = 0

    def observe(self, status: int, seconds: float) -> None:
        cls = status_class(status)
        self.buckets[cls][bisect.bisect_left(BUCKETS_S, seconds)] += 1
        self.sum_us[cls] += int(seconds * 1e6)

    def encode(self) -> str:
        """The DURATIONS= value; "" before the first request."""
        parts = []
        for name, counts, total in zip(CLASSES, self.buckets, self.sum_us):
            last = len(counts)
            while last and not counts[last - 1]:
                last -= 1
            if last:
                parts.append("%s:%d:%s" % (name, total, ",".join(map(str, counts[:last]))))
        return ";".join(parts)
