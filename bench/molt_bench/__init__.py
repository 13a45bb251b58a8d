"""bench/run's parts: the servers under test (peers), the loads (load), one module per
report section (sections/), the report's frame (report) and its charts (charts). Waiting,
wrk and driving molt are tests/molt_testlib.py's, shared with the test suites."""
from __future__ import annotations

from pathlib import Path

from . import charts
from .common import DOCS
from .report import Report
from .sections import REPORTERS


def draw_charts(results: dict) -> dict:
    """The charts next to docs/benchmarks.md; which of them were drawn."""
    return {
        "throughput": charts.chart_throughput(results, DOCS / "bench-throughput.png"),
        "rollover": charts.chart_rollover(results, DOCS / "bench-rollover.png"),
        "memory": charts.chart_memory(results, DOCS / "bench-memory.png"),
    }


def write_report(results: dict, path: Path, drawn: dict):
    doc = Report(results, drawn)
    doc.header()
    for reporter in REPORTERS:
        reporter(doc)
    path.write_text(doc.finish())
