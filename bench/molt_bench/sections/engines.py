"""The WSGI engines (issue 13): molt's native engine and its Python engine against uWSGI,
gunicorn gthread and nginx (`return 200`, and the same static file), 4 workers each, the same
wrk: hello keep-alive, `Connection: close`, a 64 KiB response, a 16 KiB POST, a Flask page and
a 1 MiB static file; p99 at the same load, CPU per request, and memory per idle keep-alive
connection."""
from __future__ import annotations

import os
import shlex
import shutil
import signal
import socket
import selectors
import statistics
import subprocess
import time
from pathlib import Path
from typing import Optional

from ..common import (APPS, TICK_S, Params, descendants, die_with_us, rss_kib, say, testlib,
                      tree_cpu_ticks)
from ..load import wrk_result
from ..peers import Gunicorn, MoltServer, Nginx, Server, Uwsgi
from ..report import MEDIAN_ONLY, Report, fmt_ms, ratio, ratio_verdict, run_rps

APP = "engines_app:application"
STATIC_NAME = "file-1mib.bin"
IDLE_CONNECTIONS = 400

# (key, title, path, Connection: close, wrk Lua script or None, server labels measured)
CASES = [
    ("hello_ka", "Hello world, keep-alive", "/", False, None,
     ["molt-native", "molt-python", "uwsgi", "gunicorn-gthread", "nginx"]),
    ("hello_close", "Hello world, `Connection: close`", "/", True, None,
     ["molt-native", "molt-python", "uwsgi-close", "gunicorn-gthread", "nginx",
      "nginx-deferred"]),
    ("body_64k", "64 KiB response, keep-alive", "/64k", False, None,
     ["molt-native", "molt-python", "uwsgi", "gunicorn-gthread"]),
    ("post_16k", "16 KiB POST, keep-alive", "/post", False, "post16k.lua",
     ["molt-native", "molt-python", "uwsgi", "gunicorn-gthread"]),
    ("flask", "A Flask page (template), keep-alive", "/flask/", False, None,
     ["molt-native", "molt-python", "uwsgi", "gunicorn-gthread"]),
    ("static_1m", "Static file, 1 MiB, keep-alive", "/static/" + STATIC_NAME, False, None,
     ["molt-native", "molt-python", "nginx"]),
]


def server_rss_kib(s: Server) -> int:
    return sum(rss_kib(pid) for pid in [s.pid] + descendants(s.pid))


def queued_connections(port: int) -> int:
    """Connections in the listen queue of 127.0.0.1:port now (Recv-Q of the listening socket):
    connected, and not taken by any worker."""
    out = subprocess.run(["ss", "-Hltn", f"sport = :{port}"], capture_output=True, text=True,
                         check=False).stdout.split()
    return int(out[1]) if len(out) > 1 and out[1].isdigit() else 0


def one_run(p: Params, s: Server, path: str, close: bool, script: Optional[Path]) -> dict:
    extra = ["-s", str(script)] if script else None
    cpu_before = tree_cpu_ticks(s.pid)
    load = testlib.Wrk(f"http://127.0.0.1:{s.port}{path}", p.duration, p.wrk_conns,
                       p.wrk_threads, close=close, timeout=None, extra=extra,
                       preexec_fn=die_with_us(signal.SIGKILL))
    # wrk's latencies are those of answered requests only: a server that holds fewer
    # keep-alive connections than wrk opens leaves the rest queued, unanswered and untimed.
    time.sleep(p.duration / 2)
    queued = queued_connections(s.port)
    r = wrk_result(load)
    cpu = (tree_cpu_ticks(s.pid) - cpu_before) * TICK_S
    r["cpu_us_per_request"] = cpu / r["requests"] * 1e6 if r["requests"] else float("nan")
    r["queued"] = queued
    return r


def idle_memory(s: Server, count: int, bound_s: float = 10.0) -> dict:
    """KiB of server RSS per idle keep-alive connection: open `count` connections, one
    request each, and compare the process tree's RSS before and after (connections held).
    Servers with a thread per connection (uWSGI) answer only as many as they have threads:
    the others wait, so the figure is per answered connection, and how many were is kept."""
    before = server_rss_kib(s)
    socks: list[socket.socket] = []
    answered = 0
    try:
        for _ in range(count):
            c = socket.create_connection(("127.0.0.1", s.port), timeout=5)
            c.sendall(b"GET / HTTP/1.1\r\nHost: bench\r\n\r\n")
            c.setblocking(False)
            socks.append(c)
        pending = {c: b"" for c in socks}
        deadline = time.monotonic() + bound_s
        with selectors.DefaultSelector() as sel:
            for c in socks:
                sel.register(c, selectors.EVENT_READ)
            while pending and time.monotonic() < deadline:
                for key, _ in sel.select(timeout=max(0.0, deadline - time.monotonic())):
                    c = key.fileobj
                    try:
                        chunk = c.recv(4096)
                    except BlockingIOError:
                        continue
                    pending[c] += chunk
                    if not chunk or pending[c].endswith(b"Hello, world!"):
                        answered += bool(chunk)
                        sel.unregister(c)
                        del pending[c]
        after = server_rss_kib(s)
    finally:
        for c in socks:
            c.close()
    return {"kib": (after - before) / max(1, answered), "answered": answered, "opened": count}


def measure(p: Params, work: Path, results: dict):
    say("WSGI engines: molt native and python against uWSGI, gunicorn gthread and nginx")
    home = work / "engines"
    app_dir = home / "app"
    (app_dir / "static").mkdir(parents=True, exist_ok=True)
    shutil.copy(APPS / "engines_app.py", app_dir / "engines_app.py")
    (app_dir / "static" / STATIC_NAME).write_bytes(os.urandom(1 << 20))
    script = home / "post16k.lua"
    script.write_text('wrk.method = "POST"\nwrk.body = string.rep("x", 16384)\n'
                      'wrk.headers["Content-Type"] = "application/octet-stream"\n')
    molt_extra = {"static": [{"prefix": "/static/", "dir": "static"}],
                  "timeouts": {"keepalive": "75s"}}
    servers: list[Server] = [
        MoltServer(home, "molt-native", APP, app_dir, 4, threads=4,
                   extra=dict(molt_extra, engine="native")),
        MoltServer(home, "molt-python", APP, app_dir, 4, threads=4,
                   extra=dict(molt_extra, engine="python")),
        Uwsgi(home, "uwsgi", APP, app_dir, 4, threads=4),
        Uwsgi(home, "uwsgi-close", APP, app_dir, 4, threads=4, keepalive=False),
        Gunicorn(home, "gunicorn-gthread", APP, app_dir, 4, threads=4),
        Nginx(home, "nginx", 4, app_dir / "static"),
        # molt's listeners defer accept by default (listen[].defer_accept); nginx's do with
        # `listen ... deferred`, off by default. The target is against nginx's default; this
        # one shows the same kernel help given to nginx.
        Nginx(home, "nginx-deferred", 4, app_dir / "static", deferred=True),
    ]
    by_label = {s.label: s for s in servers}
    try:
        for s in servers:
            s.start()
        for s in servers:
            s.wait_ready(4)
            results["commands"]["engines " + s.label] = shlex.join(s.argv)
        results["commands"]["molt.yaml (engines)"] = str(servers[0].config)
        results["commands"]["nginx.conf (engines)"] = by_label["nginx"].conf.read_text()
        out: dict = {}
        for key, _, path, close, lua, labels in CASES:
            runs: dict[str, list[dict]] = {label: [] for label in labels}
            for label in labels:  # a short warm-up each, not counted
                testlib.Wrk(f"http://127.0.0.1:{by_label[label].port}{path}", 1, p.wrk_conns,
                            p.wrk_threads, close=close, timeout=None,
                            extra=["-s", str(script)] if lua else None).result()
            for rep in range(p.repeats):  # interleaved: A, B, C, A, B, C, ...
                for label in labels:
                    r = one_run(p, by_label[label], path, close, script if lua else None)
                    runs[label].append(r)
                    say(f"  {key} {label} #{rep + 1}: {r['rps']:.0f} req/s p99 {r['p99']:.2f}ms "
                        f"cpu {r['cpu_us_per_request']:.1f}us/req "
                        f"wrk {r.get('wrk_cpu_us', float('nan')):.1f}us/req "
                        f"errors {r['failed']}")
            out[key] = {label: summary(rs) for label, rs in runs.items()}
            results["commands"]["wrk engines " + key] = shlex.join(testlib.wrk_argv(
                f"http://127.0.0.1:PORT{path}", p.duration, p.wrk_conns, p.wrk_threads, close,
                timeout=None, extra=["-s", "post16k.lua"] if lua else None))
        out["idle_kib_per_connection"] = {
            label: idle_memory(by_label[label], IDLE_CONNECTIONS)
            for label in ("molt-native", "molt-python", "uwsgi", "gunicorn-gthread", "nginx")}
        results["engines"] = out
    finally:
        for s in servers:
            s.stop()


def summary(runs: list[dict]) -> dict:
    def med(key: str) -> float:
        return statistics.median(r[key] for r in runs)

    rps = [r["rps"] for r in runs]
    out = {"rps": med("rps"), "p50": med("p50"), "p99": med("p99"),
           "cpu_us": med("cpu_us_per_request"), "min_rps": min(rps), "max_rps": max(rps),
           "runs": [{"rps": x} for x in rps],
           "errors": sum(r["failed"] for r in runs),
           "queued": max(r.get("queued", 0) for r in runs)}
    if all("wrk_cpu_us" in r for r in runs):
        out["wrk_cpu_us"] = med("wrk_cpu_us")
    return out


def report(doc: Report):
    results, add = doc.results, doc.add
    data = results.get("engines")
    if not data:
        return
    add("## 10. WSGI engines: native and Python against uWSGI, gunicorn and nginx")
    add("")
    add("4 workers each (molt and uWSGI 4 threads per worker, gunicorn gthread 4 threads), "
        "the same wrk for every server, interleaved, median of the runs (spread in "
        "brackets). nginx answers `return 200` with the same 13-byte body, and serves the "
        "same 1 MiB file from the same directory as molt's `static:`; *nginx-deferred* is "
        "the same nginx with `listen ... deferred` (`TCP_DEFER_ACCEPT`, which molt's "
        "listeners have by default). The app is "
        "`bench/apps/engines_app.py`. CPU is the server's whole process tree (utime + stime) "
        "divided by the requests of the run; wrk's is wrk's own, the same way (wrk shares the "
        "two cores, so no server can be faster than wrk's cost allows). "
        "*Left queued* is the listen queue halfway "
        "through a run (the most of any run): connections wrk opened that no worker took. "
        "wrk times answered requests only, so a server that leaves connections queued shows "
        "a p99 that is not at the same load.")
    add("")
    doc.commands("engines", [k[len("engines "):] for k in doc.c if k.startswith("engines ")])
    for key, title, _, _, _, labels in CASES:
        rows = data.get(key)
        if not rows:
            continue
        add(f"### {title}")
        add("")
        wrk_cpu = all("wrk_cpu_us" in rows[label] for label in labels)
        add("| server | req/s (min–max) | p50 ms | p99 ms | CPU µs/request | "
            + ("wrk's CPU µs/request | " if wrk_cpu else "") + "errors | left queued |")
        add("|---|---|---|---|---|" + ("---|" if wrk_cpu else "") + "---|---|")
        for label in labels:
            r = rows[label]
            wrk_text = f"{r['wrk_cpu_us']:.1f} | " if wrk_cpu else ""
            add(f"| {label} | {r['rps']:,.0f} ({r['min_rps']:,.0f}–{r['max_rps']:,.0f}) | "
                f"{fmt_ms(r['p50'])} | {fmt_ms(r['p99'])} | {r['cpu_us']:.1f} | {wrk_text}"
                f"{r['errors']} | {r.get('queued', 0)} |")
        add("")
    mem = data.get("idle_kib_per_connection", {})
    if mem:
        add(f"Memory per idle keep-alive connection ({IDLE_CONNECTIONS} connections held open "
            "after one request each; RSS of the whole process tree): "
            + ", ".join(f"{label} {m['kib']:.1f} KiB"
                        + ("" if m["answered"] == m["opened"]
                           else f" ({m['answered']} of {m['opened']} answered)")
                        for label, m in mem.items()) + ".")
        add("")

    def rps(key: str, label: str) -> Optional[float]:
        return data.get(key, {}).get(label, {}).get("rps")

    def target(name: str, key: str, peer: str, factor: float):
        a, b = rps(key, "molt-native"), rps(key, peer)
        if a and b:
            rows = data[key]
            doc.target(name, ratio_verdict(run_rps(rows["molt-native"]), run_rps(rows[peer]),
                                           factor), ratio(a, b))

    target("native engine, hello keep-alive ≥ 0.8× nginx", "hello_ka", "nginx", 0.8)
    target("native engine, `Connection: close` ≥ 0.9× nginx", "hello_close", "nginx", 0.9)
    a, b = rps("hello_close", "molt-native"), rps("hello_close", "nginx-deferred")
    if a and b:
        doc.target("native engine, `Connection: close` against nginx `listen ... deferred` "
                   "(no target)", None, ratio(a, b))
    target("native engine, 64 KiB response ≥ 1.5× uWSGI", "body_64k", "uwsgi", 1.5)
    target("native engine, 16 KiB POST ≥ 1.5× uWSGI", "post_16k", "uwsgi", 1.5)
    hello_cpu = data.get("hello_ka", {}).get("molt-native", {}).get("cpu_us")
    for key, what in (("body_64k", "64 KiB response"), ("post_16k", "16 KiB POST")):
        rows = data.get(key, {})
        if "molt-native" in rows and "uwsgi" in rows:
            doc.wrk_bound(what, rows["molt-native"], rows["uwsgi"], "uWSGI", 1.5,
                          f"molt's hello world keep-alive: {hello_cpu:.1f}"
                          if hello_cpu is not None else "")
    add("")
    flask = data.get("flask", {})
    if flask:
        # Ahead of each peer in every interleaved pair (ratio_verdict), as the other targets.
        peers = [v for k, v in flask.items() if not k.startswith("molt")]
        verdicts = [ratio_verdict(run_rps(flask["molt-native"]), run_rps(v), 1.0, strictly=True)
                    for v in peers]
        verdict = (False if False in verdicts
                   else MEDIAN_ONLY if MEDIAN_ONLY in verdicts else all(verdicts))
        best_peer = max(v["rps"] for v in peers)
        doc.target("native engine, Flask page ahead of every peer", verdict,
                   ratio(flask["molt-native"]["rps"], best_peer))
    a, b = rps("static_1m", "molt-native"), rps("static_1m", "nginx")
    if a and b:
        doc.target("native engine, 1 MiB static file against nginx (no target)", None,
                   ratio(a, b))
    a, b = rps("hello_ka", "molt-native"), rps("hello_ka", "molt-python")
    if a and b:
        doc.target("native engine against molt's Python engine, hello keep-alive", None,
                   ratio(a, b))
