"""Figure 1: WSGI hello world against gunicorn (gthread, sync) and uWSGI, keep-alive and
`Connection: close`; the same servers then idle for figure 7."""
from __future__ import annotations

import json
import shlex
import shutil
from pathlib import Path

from . import idle
from ..common import APPS, Params, say
from ..load import throughput
from ..peers import Gunicorn, MoltServer, Server, Uwsgi
from ..report import Report, ratio_verdict, run_rps


def measure(p: Params, work: Path, results: dict):
    say("WSGI hello world, 4 workers (figure 1) and idle master (figure 7)")
    app_dir = work / "hello"
    app_dir.mkdir(exist_ok=True)
    shutil.copy(APPS / "hello_wsgi.py", app_dir / "hello_wsgi.py")
    app = "hello_wsgi:application"
    servers: list[Server] = [
        MoltServer(work / "wsgi", "molt", app, app_dir, 4, threads=4),
        Gunicorn(work / "wsgi", "gunicorn-gthread", app, app_dir, 4, threads=4),
        Gunicorn(work / "wsgi", "gunicorn-sync", app, app_dir, 4),
        Uwsgi(work / "wsgi", "uwsgi", app, app_dir, 4, threads=4),
    ]
    uwsgi_close = Uwsgi(work / "wsgi-close", "uwsgi", app, app_dir, 4, threads=4,
                        keepalive=False)
    try:
        for s in servers + [uwsgi_close]:
            s.start()
        for s in servers:
            s.wait_ready(4)
            results["commands"]["wsgi " + s.label] = shlex.join(s.argv)
        uwsgi_close.wait_ready(4)
        results["commands"]["wsgi uwsgi (close)"] = shlex.join(uwsgi_close.argv)
        results["commands"]["molt.yaml (wsgi)"] = json.dumps(servers[0].config)
        throughput(p, servers, False, results, "wsgi_keepalive")
        throughput(p, servers[:3] + [uwsgi_close], True, results, "wsgi_close")
        if isinstance(servers[0], MoltServer):
            status = servers[0].status()
            results["molt_request_spread"] = [
                w["requests"] for g in status["generations"] for w in g["workers"]]
        idle.measure(p, servers, results)
    finally:
        for s in servers + [uwsgi_close]:
            s.stop()


def report(doc: Report):
    """Writes figure 1 of the report, and the targets they decide."""
    results, c, add, charts, targets = doc.results, doc.c, doc.add, doc.charts, doc.targets
    if "wsgi_keepalive" not in results:
        return
    add("## 1. WSGI hello world, 4 workers")
    add("")
    add("A plain WSGI callable with a 13-byte body (`bench/apps/hello_wsgi.py`). "
        "All four servers run at once (idle when not measured) and are measured in turn.")
    add("")
    doc.commands("wsgi", results["wsgi_keepalive"],
                 c.get("wsgi uwsgi (close)", "") + "   # for the Connection: close runs",
                 c.get("wrk wsgi_keepalive", ""), c.get("wrk wsgi_close", ""))
    add(f"molt's config: `{c.get('molt.yaml (wsgi)', '')}`. uWSGI uses `--http11-socket` "
        "(HTTP/1.1 keep-alive straight from the workers, no router process) with its "
        "defaults otherwise (app loaded in the master, then forked). That socket ignores "
        "a request's `Connection: close` and keeps the connection open (measured: the "
        "response carries no `Connection` header and the socket stays open), which would "
        "turn the close runs into keep-alive runs for uWSGI only; so the "
        "`Connection: close` runs use a second uWSGI with `--http-socket`, which closes "
        "after each response. gunicorn's sync worker "
        "has no keep-alive: it closes after each response in both modes.")
    add("")
    doc.tp_table("wsgi_keepalive", "molt", "Keep-alive")
    doc.spread_note("wsgi_keepalive")
    doc.tp_table("wsgi_close", "molt", "`Connection: close` (a new connection per request)")
    ka = results["wsgi_keepalive"]
    r_gth = ka["molt"]["rps"] / ka["gunicorn-gthread"]["rps"]
    r_uw = ka["molt"]["rps"] / ka["uwsgi"]["rps"]
    cl = results.get("wsgi_close", {})
    def judged(rows: dict, peer: str, factor: float, strictly: bool = False):
        return ratio_verdict(run_rps(rows["molt"]), run_rps(rows[peer]), factor, strictly)

    targets.append(("WSGI keep-alive: molt ≥ 1.5× gunicorn gthread",
                    judged(ka, "gunicorn-gthread", 1.5), f"{r_gth:.2f}×"))
    targets.append(("WSGI keep-alive: molt ahead of uWSGI", judged(ka, "uwsgi", 1.0, True),
                    f"{r_uw:.2f}×"))
    if cl:
        r1 = cl["molt"]["rps"] / cl["gunicorn-gthread"]["rps"]
        r2 = cl["molt"]["rps"] / cl["uwsgi"]["rps"]
        targets.append(("WSGI close: molt ≥ 1.5× gunicorn gthread",
                        judged(cl, "gunicorn-gthread", 1.5), f"{r1:.2f}×"))
        targets.append(("WSGI close: molt ahead of uWSGI", judged(cl, "uwsgi", 1.0, True),
                        f"{r2:.2f}×"))
    if charts.get("throughput"):
        add("![throughput](bench-throughput.png)")
        add("")
    if "molt_request_spread" in results:
        add("Requests served by each molt worker over the whole section (keep-alive "
            f"connections stay with the worker that accepted them): "
            f"{', '.join(f'{x:,}' for x in results['molt_request_spread'])}.")
        add("")
