"""The cost of observability: the same WSGI hello world on three molt masters run side by
side, interleaved: metrics off (no `metrics.listen`: the workers time nothing), metrics on
(the duration histogram and status counts per request, aggregated by the master), and
metrics on plus the access log written by the workers to a file. Reported as ratios to the
metrics-off run, in the same run."""
from __future__ import annotations

import json
import shlex
import shutil
import socket
from pathlib import Path

from ..common import APPS, Params, say
from ..load import throughput
from ..peers import MoltServer
from ..report import Report

OFF, METRICS, ACCESS = "molt (metrics off)", "molt (metrics)", "molt (metrics + access log file)"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def measure(p: Params, work: Path, results: dict):
    say("The cost of metrics and the access log (WSGI hello world, 4 workers x 4 threads)")
    app_dir = work / "hello"
    app_dir.mkdir(exist_ok=True)
    shutil.copy(APPS / "hello_wsgi.py", app_dir / "hello_wsgi.py")
    app = "hello_wsgi:application"
    root = work / "observe"
    root.mkdir(exist_ok=True)
    metrics = {"metrics": {"listen": f"tcp://127.0.0.1:{free_port()}"}}
    access = {"metrics": {"listen": f"tcp://127.0.0.1:{free_port()}"},
              "logging": {"level": "info", "access_log_file": str(root / "access.log")}}
    servers = [
        MoltServer(root, "metrics-off", app, app_dir, 4, threads=4),
        MoltServer(root, "metrics-on", app, app_dir, 4, threads=4, extra=metrics),
        MoltServer(root, "metrics-access", app, app_dir, 4, threads=4, extra=access),
    ]
    for server, label in zip(servers, (OFF, METRICS, ACCESS)):
        server.label = label
    try:
        for s in servers:
            s.start()
        for s in servers:
            s.wait_ready(4)
            results["commands"]["observe " + s.label] = (
                shlex.join(s.argv) + "   # " + json.dumps(s.config))
        throughput(p, servers, False, results, "observe_keepalive")
        log = root / "access.log"
        results["observe_access_lines"] = (sum(1 for _ in log.open()) if log.exists() else 0)
    finally:
        for s in servers:
            s.stop()


def report(doc: Report):
    results, add = doc.results, doc.add
    rows = results.get("observe_keepalive")
    if not rows:
        return
    add("## 12. The cost of metrics and the access log")
    add("")
    add("The same molt and app three times, measured in turn (interleaved repeats): without "
        "`metrics.listen` (workers time nothing), with it (a duration histogram and status "
        "counts per request, summed by the master from the heartbeats), and with it plus "
        "`logging.access_log_file` (each worker formats and appends its lines on a "
        "background thread).")
    add("")
    doc.commands("observe", rows, doc.c.get("wrk observe_keepalive", ""))
    doc.tp_table("observe_keepalive", OFF, "Keep-alive, WSGI hello world")
    base = rows[OFF]["rps"]
    for label in (METRICS, ACCESS):
        add(f"* {label} ÷ metrics off: **{rows[label]['rps'] / base:.2f}×**")
    add(f"* access lines written: {results.get('observe_access_lines', 0):,}")
    add("")
