"""Figure 5: from a HUP to the new release serving, with an app whose import sleeps."""
from __future__ import annotations

import os
import shlex
import statistics
import subprocess
import time
from pathlib import Path

from ..common import (APPS, descendants, Params, probe, PYTHON, release_dir, REPO, say,
                      wait_until)
from ..peers import Gunicorn, MoltServer, SERVER_FILTER
from ..report import ratio, Report


# What a molt worker imports before the app: the shim's entry point, server and parser.
SHIM_IMPORTS = "molt_shim.__main__, molt_shim.engines.threaded_wsgi, molt_shim.httpparse"


def measure_import(d: Path) -> dict:
    """The app's own import time (in-process), and python start + import as a command."""
    code = ("import time,sys; t=time.perf_counter(); sys.path.insert(0,'.'); import app; "
            "print(time.perf_counter()-t)")
    inproc, whole = [], []
    for _ in range(3):
        t0 = time.perf_counter()
        out = subprocess.run([PYTHON, "-c", code], cwd=d, capture_output=True, text=True,
                             timeout=30, env=dict(os.environ, PYTHONDONTWRITEBYTECODE="1"))
        whole.append(time.perf_counter() - t0)
        inproc.append(float(out.stdout.strip()))
    def wall(argv: list[str], cwd: Path) -> float:
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            subprocess.run(argv, cwd=cwd, timeout=30, capture_output=True)
            times.append(time.perf_counter() - t0)
        return statistics.median(times)
    return {"import_s": statistics.median(inproc), "python_plus_import_s": statistics.median(whole),
            "python_start_s": wall([PYTHON, "-c", "pass"], d),
            # What a molt worker imports before the app: the shim.
            "shim_import_s": wall([PYTHON, "-c", "import " + SHIM_IMPORTS],
                                  REPO / "worker_shim")}


def measure(p: Params, work: Path, results: dict):
    say(f"HUP to serving, with an app whose import sleeps {p.import_sleep}s (figure 5)")
    out: dict = {}
    makers = [
        lambda d: MoltServer(work / "hup", "molt", "app:application", d, 4, threads=4),
        lambda d: Gunicorn(work / "hup", "gunicorn-gthread", "app:application", d, 4, threads=4),
    ]
    results["hup"] = out
    for make in makers:
        label = make(Path("/nonexistent")).label
        if SERVER_FILTER and label not in SERVER_FILTER:
            continue
        d = release_dir(work / "hup-releases", label, APPS / "release_app.py",
                        import_sleep=p.import_sleep)
        if "import" not in out:
            out["import"] = measure_import(d)
        s = make(d)
        try:
            s.start()
            s.wait_ready(4)
            results["commands"]["hup " + s.label] = shlex.join(s.argv)
            first, complete, rollover_ms = [], [], []
            for i in range(p.hup_repeats):
                version = str(100 + i)
                (d / "VERSION").write_text(version + "\n")
                before_gen = s.live_generation()
                old = set(s.workers())
                t0 = time.monotonic()
                s.reload()

                def new_served():
                    outcome, body = probe(s.port, "/", 1.0)
                    return outcome == "200" and body.strip().decode() == version
                wait_until(new_served, 30, f"{label} to serve version {version}", interval=0.003)
                first.append(time.monotonic() - t0)
                wait_until(lambda: s.rolled(before_gen, old, 4), 30,
                           f"{label} rollover to finish", interval=0.005)
                complete.append(time.monotonic() - t0)
                if isinstance(s, MoltServer):
                    status = s.status()
                    live = [g for g in status["generations"] if g["id"] == s.live_generation()]
                    if live and "rollover_ms" in live[0]:
                        rollover_ms.append(live[0]["rollover_ms"])
                # Let the old generation finish draining before the next HUP: its workers
                # gone (counting processes broke when molt's zygote got a standby beside it).
                wait_until(lambda: not old & set(descendants(s.pid)),
                           30, f"{label} old workers to exit", interval=0.02)
                time.sleep(0.3)
            out[label] = {"first_new_response_s": statistics.median(first), "runs": first,
                          "complete_s": statistics.median(complete)}
            if rollover_ms:
                out[label]["rollover_ms_median"] = statistics.median(rollover_ms)
                out[label]["rollover_ms_runs"] = rollover_ms
            say(f"  {label}: HUP to first new response {statistics.median(first) * 1000:.0f} ms"
                + (f", status rollover_ms {statistics.median(rollover_ms):.0f}"
                   if rollover_ms else ""))
        finally:
            s.stop()
    results["hup"] = out


def report(doc: Report):
    """Writes figure 5 of the report, and the targets they decide."""
    results, p, add, targets = doc.results, doc.p, doc.add, doc.targets
    if "hup" not in results:
        return
    h = results["hup"]
    imp = h["import"]
    add("## 5. From HUP to the new release serving")
    add("")
    add(f"The release app sleeps {p['import_sleep']} s while it is imported. After each "
        "`kill -HUP`, a client polls `GET /` on new connections every ~3 ms until the new "
        f"`VERSION` answers; median of {p['hup_repeats']} rollovers, 4 workers, no other load. "
        "Import time is the app's own `import app`, timed inside Python (median of 3).")
    add("")
    add(f"* app import alone: **{imp['import_s'] * 1000:.0f} ms**; "
        f"`python3 -c 'import app'` as a whole process: {imp['python_plus_import_s'] * 1000:.0f} "
        f"ms; `python3 -c pass`: {imp['python_start_s'] * 1000:.0f} ms; "
        f"`python3 -c 'import {SHIM_IMPORTS}'` (what a molt worker imports before the app): "
        f"{imp['shim_import_s'] * 1000:.0f} ms.")
    add("")
    add("| server | HUP → first new response (ms) | overhead over the import (ms) | "
        "HUP → rollover complete (ms) | runs, first new response (ms) | "
        "molt status `rollover_ms` |")
    add("|---|---:|---:|---:|---|---:|")
    for label, r in h.items():
        if label == "import":
            continue
        t = r["first_new_response_s"]
        add(f"| {label} | {t * 1000:.0f} | {(t - imp['import_s']) * 1000:.0f} | "
            f"{r['complete_s'] * 1000:.0f} | "
            f"{', '.join(f'{x * 1000:.0f}' for x in r['runs'])} | "
            f"{r.get('rollover_ms_median', '')} |")
    add("")
    add("Rollover complete: for molt, the new generation is live (all 4 new workers "
        "ready; old ones draining); for gunicorn, 4 new workers and the old ones gone. "
        "gunicorn answers from its first new worker as soon as that one has imported the "
        "app, because it stops the old workers at once instead of waiting for the new "
        "generation; molt switches when all 4 are ready. uWSGI is left out here: its "
        "graceful reload of threaded workers can stall for the 60 s worker mercy (see "
        "figure 3).")
    add("")
    if "molt" in h:
        over = (h["molt"]["first_new_response_s"] - imp["import_s"]) * 1000
        targets.append(("molt rollover overhead over the app's import < 50 ms", over < 50,
                        f"{over:.0f} ms"))
        if "gunicorn-gthread" in h:
            add(f"molt ÷ gunicorn (HUP → new release serving): "
                f"{ratio(h['molt']['first_new_response_s'], h['gunicorn-gthread']['first_new_response_s'])}.")
            add("")
