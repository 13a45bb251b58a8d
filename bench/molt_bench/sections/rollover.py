"""Figures 3 and 4: rollovers under a keep-alive load, failed requests and p99 latency
against steady state."""
from __future__ import annotations

import shlex
import statistics
import time
from pathlib import Path

from ..common import APPS, Params, release_dir, say, wait_until
from ..load import run_wrk, start_wrk, wrk_command
from ..peers import Gunicorn, MoltServer, SERVER_FILTER, Uwsgi
from ..report import fmt_ms, ratio, Report


def measure(p: Params, work: Path, results: dict):
    say(f"{p.rollovers} rollovers under keep-alive load (figures 3 and 4)")
    results["rollover"] = {}
    results["steady"] = {}
    makers = [
        lambda d: MoltServer(work / "roll", "molt", "app:application", d, 4, threads=4),
        lambda d: Gunicorn(work / "roll", "gunicorn-gthread", "app:application", d, 4, threads=4),
        lambda d: Uwsgi(work / "roll", "uwsgi", "app:application", d, 4, threads=4),
    ]
    for make in makers:
        s = make(Path("/nonexistent"))
        if SERVER_FILTER and s.label not in SERVER_FILTER:
            continue
        d = release_dir(work / "roll-releases", s.label, APPS / "release_app.py")
        s = make(d)
        try:
            s.start()
            s.wait_ready(4)
            results["commands"]["rollover " + s.label] = shlex.join(s.argv)
            # Steady state first, with the same load.
            steady = run_wrk(p, s.port, p.steady, p.rollover_conns)
            results["steady"][s.label] = {k: steady[k] for k in
                                          ("rps", "p50", "p99", "socket_errors", "non2xx")}
            results["commands"]["wrk rollover"] = wrk_command(p, 600, p.rollover_conns) + \
                "   (stopped with SIGINT 1 s after the last rollover)"
            load = start_wrk(p, s.port, 600, p.rollover_conns)
            took, timeouts, done = [], 0, 0
            try:
                time.sleep(1.0)
                for i in range(p.rollovers):
                    version = str(i + 2)
                    (d / "VERSION").write_text(version + "\n")
                    before_gen = s.live_generation()
                    old = set(s.workers())
                    t0 = time.monotonic()
                    s.reload()
                    try:
                        wait_until(lambda: s.rolled(before_gen, old, 4), 30,
                                   f"{s.label} rollover {i + 1}", interval=0.01)
                    except TimeoutError:
                        timeouts += 1
                        say(f"  {s.label}: rollover {i + 1} not done after 30 s")
                        if not s.alive() or timeouts >= 2:
                            say(f"  {s.label}: giving up its rollovers")
                            break
                        continue
                    done += 1
                    took.append(time.monotonic() - t0)
                    rest = p.rollover_interval - (time.monotonic() - t0)
                    if rest > 0:
                        time.sleep(rest)
                time.sleep(1.0)
            finally:
                load.interrupt()
                r = load.result(timeout=30)
            entry = {k: r[k] for k in ("rps", "p50", "p99", "requests", "connect", "read",
                                       "write", "timeout", "non2xx", "socket_errors", "elapsed")}
            entry.update(rollovers=done, timeouts=timeouts,
                         rollover_s_median=statistics.median(took) if took else None,
                         alive_after=s.alive())
            if isinstance(s, MoltServer):
                status = s.try_status() or {}
                entry["molt_rollovers"] = status.get("rollovers")
            results["rollover"][s.label] = entry
            say(f"  {s.label}: {done} rollovers, {r['requests']} requests, socket errors "
                f"{r['socket_errors']}, non-2xx {r['non2xx']}, p99 {r['p99']:.1f}ms "
                f"(steady {steady['p99']:.1f}ms)")
        finally:
            s.stop()


def report(doc: Report):
    """Writes figures 3 and 4 of the report, and the targets they decide."""
    results, p, c, add, charts, targets = doc.results, doc.p, doc.c, doc.add, doc.charts, doc.targets
    if "rollover" not in results:
        return
    ro, st = results["rollover"], results["steady"]
    add(f"## 3. Failed requests during {p['rollovers']} rollovers under load")
    add("")
    add("Each server runs `bench/apps/release_app.py` (4 workers, 4 threads) under a "
        "keep-alive wrk load. The release's `VERSION` file is rewritten, then the server "
        "is told to reload, and the next reload waits until this one is done and at least "
        f"{p['rollover_interval']} s have passed. Done means: for molt, the new generation "
        "is live (`live_generation` in `molt ctl status --json` went up); for gunicorn and "
        "uWSGI, all 4 workers are new processes and the old ones have exited (a probe "
        "request cannot tell: under this load uWSGI's 16 threads are all held by wrk's 32 "
        "keep-alive connections, and a new connection waits in the backlog). Reloads: molt and gunicorn `kill -HUP master`; uWSGI `kill -HUP "
        "master` (its graceful reload). uvicorn `--workers 4` has no graceful reload: "
        "**not supported** (figure 8 shows what a HUP does to it).")
    add("")
    doc.commands("rollover", ro, c.get("wrk rollover", ""))
    add("| server | rollovers done | median rollover s | requests | socket errors "
        "(connect/read/write/timeout) | non-2xx | failed | master alive after |")
    add("|---|---:|---:|---:|---|---:|---:|---|")
    for label, r in ro.items():
        med = r["rollover_s_median"]
        add(f"| {label} | {r['rollovers']}/{p['rollovers']}"
            f"{' (' + str(r['timeouts']) + ' timed out)' if r['timeouts'] else ''} | "
            f"{med:.2f} | {r['requests']:,} | {r['socket_errors']} ({r['connect']}/"
            f"{r['read']}/{r['write']}/{r['timeout']}) | {r['non2xx']} | "
            f"**{r['socket_errors'] + r['non2xx']}** | {'yes' if r['alive_after'] else 'no'} |"
            if med is not None else
            f"| {label} | 0/{p['rollovers']} | — | {r['requests']:,} | {r['socket_errors']} | "
            f"{r['non2xx']} | **{r['socket_errors'] + r['non2xx']}** | "
            f"{'yes' if r['alive_after'] else 'no'} |")
    add("| uvicorn --workers 4 | not supported | | | | | | |")
    add("")
    uw = ro.get("uwsgi")
    if uw and uw["timeouts"]:
        add(f"uWSGI's graceful reload stalled in this run ({uw['timeouts']} reload(s) not "
            "done after 30 s; the run gives up on a server after two): its log shows "
            "`Gracefully killing worker N` for one worker, and the other threaded workers "
            "do not stop until uWSGI's `worker-reload-mercy` (60 s by default) runs out. "
            "Its figures cover the reloads it did and the stall.")
        add("")
    if "molt" in ro:
        mf = ro["molt"]["socket_errors"] + ro["molt"]["non2xx"]
        targets.append((f"zero failed requests over {p['rollovers']} molt rollovers",
                        mf == 0 and ro["molt"]["rollovers"] == p["rollovers"],
                        f"{mf} failed"))
    if "molt_rollovers" in ro.get("molt", {}):
        add(f"molt's own count after the run: `rollovers: {ro['molt']['molt_rollovers']}`.")
        add("")
    add("## 4. p99 latency during rollovers against steady state")
    add("")
    add(f"Steady: the same server and wrk load for {p['steady']} s just before its "
        "rollovers (`-d" + str(p['steady']) + "s`). During: the whole run of figure 3.")
    add("")
    add("| server | steady req/s | steady p50 ms | steady p99 ms | during req/s | during p50 ms "
        "| during p99 ms | p99 during ÷ steady | p99 ÷ molt's (during) |")
    add("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for label, r in ro.items():
        s = st[label]
        add(f"| {label} | {s['rps']:,.0f} | {fmt_ms(s['p50'])} | {fmt_ms(s['p99'])} | "
            f"{r['rps']:,.0f} | {fmt_ms(r['p50'])} | {fmt_ms(r['p99'])} | "
            f"{ratio(r['p99'], s['p99'])} | "
            f"{ratio(r['p99'], ro['molt']['p99']) if label != 'molt' and 'molt' in ro else '—'} |")
    add("")
    if charts.get("rollover"):
        add("![rollovers](bench-rollover.png)")
        add("")
