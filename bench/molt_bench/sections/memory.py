"""Figure 6: master and worker memory with 16 workers, idle."""
from __future__ import annotations

import shlex
import shutil
import statistics
import time
from pathlib import Path

from ..common import APPS, Params, pss_kib, rss_kib, say
from ..load import run_wrk
from ..peers import Gunicorn, MoltServer, Server, Uwsgi
from ..report import ratio, Report


def measure(p: Params, work: Path, results: dict):
    n = p.memory_workers
    say(f"memory with {n} workers (figure 6)")
    app_dir = work / "hello"
    app_dir.mkdir(exist_ok=True)
    shutil.copy(APPS / "hello_wsgi.py", app_dir / "hello_wsgi.py")
    app = "hello_wsgi:application"
    servers: list[Server] = [
        MoltServer(work / "mem", "molt", app, app_dir, n, threads=4),
        Gunicorn(work / "mem", "gunicorn-gthread", app, app_dir, n, threads=4),
        Uwsgi(work / "mem", "uwsgi", app, app_dir, n, threads=4),
    ]
    out = {}
    try:
        for s in servers:
            s.start()
        for s in servers:
            s.wait_ready(n, timeout=120)
            results["commands"]["memory " + s.label] = shlex.join(s.argv)
        for s in servers:    # touch the request path of (most) workers, then let them idle
            run_wrk(p, s.port, 2, 64, close=True)
        time.sleep(1.0)
        for s in servers:
            ws = s.workers()
            out[s.label] = {
                "master_rss_kib": rss_kib(s.pid),
                "master_pss_kib": pss_kib(s.pid),
                "worker_rss_kib_median": statistics.median([rss_kib(w) for w in ws]),
                "worker_pss_kib_median": statistics.median([pss_kib(w) for w in ws]),
                "workers": len(ws),
                "total_rss_kib": rss_kib(s.pid) + sum(rss_kib(w) for w in ws),
                "total_pss_kib": pss_kib(s.pid) + sum(pss_kib(w) for w in ws),
            }
            say(f"  {s.label}: master {out[s.label]['master_rss_kib'] / 1024:.1f} MiB, worker "
                f"{out[s.label]['worker_rss_kib_median'] / 1024:.1f} MiB RSS")
    finally:
        for s in servers:
            s.stop()
    results["memory"] = out


def report(doc: Report):
    """Writes figure 6 of the report, and the targets they decide."""
    results, p, add, charts, targets = doc.results, doc.p, doc.add, doc.charts, doc.targets
    if "memory" not in results:
        return
    mem = results["memory"]
    add(f"## 6. Memory with {p['memory_workers']} workers")
    add("")
    add("`VmRSS` from `/proc/PID/status` (and `Pss` from `/proc/PID/smaps_rollup`, which "
        "splits shared pages among the processes that share them) after a short "
        "`Connection: close` load, idle. Worker pids: `molt ctl status --json` for molt, "
        "`/proc/PID/task/*/children` of the master for the others. Same app and thread "
        "count as figure 1.")
    add("")
    doc.commands("memory", mem)
    add("| server | master RSS MiB | master PSS MiB | worker RSS MiB (median) | "
        "worker PSS MiB (median) | all processes RSS MiB | all processes PSS MiB |")
    add("|---|---:|---:|---:|---:|---:|---:|")
    for label, r in mem.items():
        add(f"| {label} | {r['master_rss_kib'] / 1024:.1f} | {r['master_pss_kib'] / 1024:.1f} "
            f"| {r['worker_rss_kib_median'] / 1024:.1f} | {r['worker_pss_kib_median'] / 1024:.1f}"
            f" | {r['total_rss_kib'] / 1024:.0f} | {r['total_pss_kib'] / 1024:.0f} |")
    add("")
    if "gunicorn-gthread" in mem and "molt" in mem:
        add(f"molt master ÷ gunicorn master (RSS): "
            f"{ratio(mem['molt']['master_rss_kib'], mem['gunicorn-gthread']['master_rss_kib'])}; "
            f"molt worker ÷ gunicorn worker (RSS): "
            f"{ratio(mem['molt']['worker_rss_kib_median'], mem['gunicorn-gthread']['worker_rss_kib_median'])}.")
        add("")
    if "molt" in mem:
        mr = mem["molt"]["master_rss_kib"] / 1024
        targets.append(("molt master RSS < 8 MiB with 16 workers", mr < 8, f"{mr:.1f} MiB"))
    if charts.get("memory"):
        add("![memory](bench-memory.png)")
        add("")
