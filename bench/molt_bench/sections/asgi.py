"""Figure 2: ASGI against uvicorn --workers and gunicorn with UvicornWorker: a plain callable
(keep-alive and Connection: close), a FastAPI JSON endpoint, and a WebSocket echo."""
from __future__ import annotations

import json
import shlex
import shutil
import statistics
import subprocess
from pathlib import Path

from ..common import APPS, BENCH, PYTHON, Params, say
from ..load import throughput
from ..peers import Gunicorn, MoltServer, Server, Uvicorn
from ..report import Report, ratio_verdict, run_rps

WS_CONNECTIONS = 32


def best_loop() -> str:
    """The loop every server here runs on: uvloop when importable (molt's `asgi.loop: auto`,
    uvicorn's `--loop auto` and gunicorn's UvicornWorker all pick it then), else asyncio."""
    found = subprocess.run([PYTHON, "-c", "import uvloop"], capture_output=True).returncode == 0
    return "uvloop" if found else "asyncio"


def servers_for(work: Path, app: str, app_dir: Path, loop: str) -> list[Server]:
    return [
        MoltServer(work, "molt", app, app_dir, 4, interface="asgi",
                   extra={"asgi": {"loop": loop}}),
        Uvicorn(work, "uvicorn", app, app_dir, 4, loop=loop),
        Gunicorn(work, "gunicorn-uvicorn", app, app_dir, 4,
                 worker_class="uvicorn.workers.UvicornWorker"),
    ]


def started(servers: list[Server], results: dict, section: str) -> list[Server]:
    for s in servers:
        s.start()
    for s in servers:
        s.wait_ready(4)
        results["commands"][f"{section} {s.label}"] = shlex.join(s.argv)
    return servers


def ws_echo_rate(p: Params, servers: list[Server], results: dict, key: str):
    """Interleaved runs of bench/ws_echo_load against each server; the median rate."""
    runs: dict[str, list[dict]] = {s.label: [] for s in servers}
    argv = [PYTHON, str(BENCH / "ws_echo_load"), "URL", "--connections", str(WS_CONNECTIONS),
            "--seconds", str(p.duration)]
    for rep in range(p.repeats):
        for s in servers:
            run_argv = [a if a != "URL" else f"ws://127.0.0.1:{s.port}/ws" for a in argv]
            out = subprocess.run(run_argv, capture_output=True, text=True,
                                 timeout=p.duration + 60)
            r = json.loads(out.stdout) if out.returncode == 0 else {
                "rate": 0.0, "failed": WS_CONNECTIONS, "first_error": out.stderr[-300:]}
            runs[s.label].append(r)
            say(f"  {key} {s.label} #{rep + 1}: {r['rate']:.0f} round trips/s "
                f"failed {r['failed']}")
    results["commands"]["ws_echo_load"] = shlex.join(
        [a if a != "URL" else "ws://127.0.0.1:PORT/ws" for a in argv])
    results[key] = {label: {"rate": statistics.median(r["rate"] for r in rs),
                            "runs": [r["rate"] for r in rs],
                            "errors": sum(r.get("failed", 0) + r.get("wrong", 0) for r in rs)}
                    for label, rs in runs.items()}


def measure(p: Params, work: Path, results: dict):
    loop = best_loop()
    results["asgi_loop"] = loop
    say(f"ASGI hello world, 4 workers, every server on {loop} (figure 2)")
    app_dir = work / "hello_asgi"
    app_dir.mkdir(exist_ok=True)
    shutil.copy(APPS / "hello_asgi.py", app_dir / "hello_asgi.py")
    servers = servers_for(work / "asgi", "hello_asgi:app", app_dir, loop)
    try:
        started(servers, results, "asgi")
        results["commands"]["molt.yaml (asgi)"] = json.dumps(servers[0].config)
        throughput(p, servers, False, results, "asgi_keepalive")
        throughput(p, servers, True, results, "asgi_close")
    finally:
        for s in servers:
            s.stop()

    say(f"ASGI FastAPI JSON endpoint and WebSocket echo, 4 workers on {loop} (figure 2)")
    app_dir = work / "fastapi_bench"
    app_dir.mkdir(exist_ok=True)
    shutil.copy(APPS / "fastapi_bench.py", app_dir / "fastapi_bench.py")
    servers = servers_for(work / "asgi_fastapi", "fastapi_bench:app", app_dir, loop)
    try:
        started(servers, results, "asgi_fastapi")
        throughput(p, servers, False, results, "asgi_fastapi", path="/json")
        ws_echo_rate(p, servers, results, "asgi_ws_echo")
    finally:
        for s in servers:
            s.stop()


def report(doc: Report):
    """Writes figure 2 of the report, and the targets they decide."""
    results, c, add, targets = doc.results, doc.c, doc.add, doc.targets
    if "asgi_keepalive" not in results:
        return
    loop = results.get("asgi_loop", "asyncio")
    add("## 2. ASGI, 4 workers")
    add("")
    add(f"Every server runs on **{loop}**, the best loop each supports here: molt's "
        "`asgi.loop: auto`, `uvicorn --loop` and gunicorn's UvicornWorker all pick uvloop "
        "(Debian's `python3-uvloop`) when it is importable. First a plain ASGI callable "
        "(`bench/apps/hello_asgi.py`), no framework. This uvicorn (0.17.6, Debian 12) binds "
        "its socket itself in `--workers` mode with `socket.socket(family=...)`, whose `proto` "
        "is 0, so asyncio's `_set_nodelay()` never sets `TCP_NODELAY` on its connections "
        "(uvloop sets it on every TCP transport, so on uvloop that trap is gone). The table "
        "also has uvicorn's workers under gunicorn (`-k uvicorn.workers.UvicornWorker`).")
    add("")
    doc.commands("asgi", results["asgi_keepalive"])
    add(f"molt's config: `{c.get('molt.yaml (asgi)', '')}`. Same wrk commands as figure 1.")
    add("")
    doc.tp_table("asgi_keepalive", "molt", "Keep-alive")
    doc.spread_note("asgi_keepalive")
    doc.tp_table("asgi_close", "molt", "`Connection: close`")
    if "asgi_fastapi" in results:
        add("A FastAPI app (`bench/apps/fastapi_bench.py`, Debian's `python3-fastapi`): "
            "`GET /json` with keep-alive, the same wrk shape.")
        add("")
        doc.tp_table("asgi_fastapi", "molt", "FastAPI JSON endpoint, keep-alive")
    if "asgi_ws_echo" in results:
        rows = results["asgi_ws_echo"]
        add("### WebSocket echo (the same FastAPI app)")
        add("")
        add(f"`{c.get('ws_echo_load', '')}`: {WS_CONNECTIONS} connections, each sends a 32-byte "
            "text message and waits for its echo, in a loop (`bench/ws_echo_load`, on "
            "Debian's `python3-websockets`).")
        add("")
        add("| server | round trips/s | molt ÷ server | errors | runs |")
        add("|---|---:|---:|---:|---|")
        base = rows["molt"]["rate"]
        for label, r in rows.items():
            share = f"{base / r['rate']:.2f}×" if label != "molt" and r["rate"] else "—"
            add(f"| {label} | {r['rate']:,.0f} | {share} | {r['errors']} | "
                + ", ".join(f"{x:,.0f}" for x in r["runs"]) + " |")
        add("")
    engines = results.get("engines", {})
    for key, mode, c_key in (("asgi_keepalive", "keep-alive", "hello_ka"),
                             ("asgi_close", "`Connection: close`", "hello_close")):
        a = results.get(key, {})
        peers = [peer for peer in ("uvicorn", "gunicorn-uvicorn") if peer in a]
        if "molt" in a and peers:
            best = max(peers, key=lambda peer: a[peer]["rps"])
            # What a C server costs for the same exchange on this machine (figure 10's nginx,
            # answering from its config): how far below the peer the needed figure lies.
            nginx = engines.get(c_key, {}).get("nginx", {}).get("cpu_us")
            doc.wrk_bound(f"ASGI {mode}", a["molt"], a[best], best, 1.2,
                          f"figure 10's nginx costs {nginx:.1f}" if nginx is not None else "")
    add("")
    for key, mode in (("asgi_keepalive", "keep-alive"), ("asgi_close", "close")):
        if key not in results:
            continue
        a = results[key]
        peers = [peer for peer in ("uvicorn", "gunicorn-uvicorn") if peer in a]
        if peers:
            best = max(peers, key=lambda peer: a[peer]["rps"])
            r = a["molt"]["rps"] / a[best]["rps"]
            name = "uvicorn --workers 4" if best == "uvicorn" else "gunicorn -k UvicornWorker"
            targets.append((f"ASGI {mode}: molt ≥ 1.2× the better peer ({name}, {loop})",
                            ratio_verdict(run_rps(a["molt"]), run_rps(a[best]), 1.2),
                            f"{r:.2f}×"))
