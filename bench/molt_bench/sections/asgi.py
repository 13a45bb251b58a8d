"""Figure 2: ASGI hello world against uvicorn --workers and gunicorn with UvicornWorker."""
from __future__ import annotations

import json
import shlex
import shutil
from pathlib import Path

from ..common import APPS, Params, say
from ..load import throughput
from ..peers import Gunicorn, MoltServer, Server, Uvicorn
from ..report import Report


def measure(p: Params, work: Path, results: dict):
    say("ASGI hello world, 4 workers (figure 2)")
    app_dir = work / "hello_asgi"
    app_dir.mkdir(exist_ok=True)
    shutil.copy(APPS / "hello_asgi.py", app_dir / "hello_asgi.py")
    servers: list[Server] = [
        MoltServer(work / "asgi", "molt", "hello_asgi:app", app_dir, 4, interface="asgi"),
        Uvicorn(work / "asgi", "uvicorn", "hello_asgi:app", app_dir, 4),
        Gunicorn(work / "asgi", "gunicorn-uvicorn", "hello_asgi:app", app_dir, 4,
                 worker_class="uvicorn.workers.UvicornWorker"),
    ]
    try:
        for s in servers:
            s.start()
        for s in servers:
            s.wait_ready(4)
            results["commands"]["asgi " + s.label] = shlex.join(s.argv)
        results["commands"]["molt.yaml (asgi)"] = json.dumps(servers[0].config)
        throughput(p, servers, False, results, "asgi_keepalive")
        throughput(p, servers, True, results, "asgi_close")
    finally:
        for s in servers:
            s.stop()


def report(doc: Report):
    """Writes figure 2 of the report, and the targets they decide."""
    results, c, add, targets = doc.results, doc.c, doc.add, doc.targets
    if "asgi_keepalive" not in results:
        return
    add("## 2. ASGI hello world, 4 workers")
    add("")
    add("A plain ASGI callable (`bench/apps/hello_asgi.py`), no framework. The peer the "
        "target names is `uvicorn --workers 4`. This uvicorn (0.17.6, Debian 12) binds its "
        "socket itself in `--workers` mode with `socket.socket(family=...)`, whose `proto` "
        "is 0, so asyncio's `_set_nodelay()` (which requires `proto == IPPROTO_TCP`) never "
        "sets `TCP_NODELAY` on its connections: every keep-alive response, written as a "
        "head and a body, waits on Nagle and the client's delayed ACK (~40 ms; a client "
        "doing sequential keep-alive requests on one connection measured 40-450 ms each, "
        "against 0.2 ms with `--workers 1`). So the table also has uvicorn's workers under "
        "gunicorn (`-k uvicorn.workers.UvicornWorker`), whose listener has `TCP_NODELAY` "
        "set (accepted sockets inherit it): the fairer ASGI peer.")
    add("")
    doc.commands("asgi", results["asgi_keepalive"])
    add(f"molt's config: `{c.get('molt.yaml (asgi)', '')}`. Same wrk commands as figure 1.")
    add("")
    doc.tp_table("asgi_keepalive", "molt", "Keep-alive")
    doc.spread_note("asgi_keepalive")
    doc.tp_table("asgi_close", "molt", "`Connection: close`")
    for key, mode in (("asgi_keepalive", "keep-alive"), ("asgi_close", "close")):
        if key not in results:
            continue
        a = results[key]
        for peer in ("uvicorn", "gunicorn-uvicorn"):
            if peer in a:
                r = a["molt"]["rps"] / a[peer]["rps"]
                name = "uvicorn --workers 4" if peer == "uvicorn" else \
                    "gunicorn -k UvicornWorker"
                targets.append((f"ASGI {mode}: molt ≥ 0.95× {name}", r >= 0.95,
                                f"{r:.2f}×"))
