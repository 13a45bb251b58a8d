"""Figure 8: a broken release, then a reload: what clients see."""
from __future__ import annotations

import shlex
import shutil
import threading
import time
from pathlib import Path

from ..common import alive, APPS, Params, probe, release_dir, say
from ..peers import Gunicorn, MoltServer, SERVER_FILTER, Uvicorn, Uwsgi
from ..report import Report


def measure(p: Params, work: Path, results: dict):
    say("a broken release, then a reload (figure 8)")
    out = {}
    makers = [
        lambda d: MoltServer(work / "broken", "molt", "app:app", d, 4, threads=4),
        lambda d: Gunicorn(work / "broken", "gunicorn-gthread", "app:app", d, 4, threads=4),
        lambda d: Uwsgi(work / "broken", "uwsgi", "app:app", d, 4, threads=4),
        lambda d: Uvicorn(work / "broken", "uvicorn", "asgi_app:app", d, 4),
    ]
    for make in makers:
        label = make(Path("/nonexistent")).label
        if SERVER_FILTER and label not in SERVER_FILTER:
            continue
        d = release_dir(work / "broken-releases", label, APPS / "flask_app.py", version="good")
        if label == "uvicorn":
            # uvicorn serves ASGI: the same Flask app, wrapped by uvicorn's WSGI middleware.
            (d / "asgi_app.py").write_text(
                "from uvicorn.middleware.wsgi import WSGIMiddleware\n"
                "from app import app as _flask\n"
                "app = WSGIMiddleware(_flask)\n")
        s = make(d)
        timeline: list[tuple[float, str]] = []
        try:
            s.start()
            s.wait_ready(4)
            results["commands"]["broken " + s.label] = shlex.join(s.argv)
            stop = threading.Event()
            t_reload = [0.0]

            def poll():
                while not stop.is_set():
                    t = time.monotonic()
                    outcome, body = probe(s.port, "/", 1.0)
                    if outcome == "200":
                        outcome += " " + body.decode(errors="replace").strip()
                    timeline.append((t, outcome))
                    time.sleep(max(0.0, 0.02 - (time.monotonic() - t)))
            poller = threading.Thread(target=poll, daemon=True)
            poller.start()
            time.sleep(1.0)
            shutil.copy(APPS / "broken_app.py", d / "app.py")
            t_reload[0] = time.monotonic()
            s.reload()
            time.sleep(p.broken_watch)
            stop.set()
            poller.join(10)
            after = [o for t, o in timeline if t >= t_reload[0]]
            counts: dict[str, int] = {}
            for o in after:
                counts[o] = counts.get(o, 0) + 1
            first_bad = next((t - t_reload[0] for t, o in timeline
                              if t >= t_reload[0] and not o.startswith("200")), None)
            entry = {"after_reload": counts, "requests": len(after),
                     "first_failure_s": first_bad, "master_alive": s.alive(),
                     "watched_s": p.broken_watch,
                     "workers_left": len([w for w in s.seen if alive(w)])}
            if isinstance(s, MoltServer):
                status = s.try_status() or {}
                entry["molt_rollovers"] = status.get("rollovers")
                hist = [g for g in status.get("generations", [])]
                entry["live_generation"] = status.get("live_generation")
                entry["generations"] = [(g["id"], g["state"]) for g in hist]
            out[label] = entry
            say(f"  {label}: {counts}, master alive: {s.alive()}")
        finally:
            s.stop()
    results["broken"] = out


def report(doc: Report):
    """Writes figure 8 of the report, and the targets they decide."""
    results, p, add, targets = doc.results, doc.p, doc.add, doc.targets
    if "broken" not in results:
        return
    b = results["broken"]
    add("## 8. A broken deploy, then a reload")
    add("")
    add("Each server runs a good Flask release (`bench/apps/flask_app.py`, 4 workers). "
        "Then its `app.py` is replaced by one that raises at import "
        "(`bench/apps/broken_app.py`) and the server gets its reload (`kill -HUP master` "
        "for all four: molt's and gunicorn's rollover, uWSGI's graceful reload; uvicorn "
        "`--workers` has no reload, a HUP is what an operator would try). A client "
        "sends `GET /` on a new connection every ~20 ms, from 1 s before the reload to "
        f"{p['broken_watch']} s after it. The counts are what that client saw after the "
        "reload.")
    add("")
    doc.commands("broken", b)
    add("| server | what clients saw after the reload | first failure after | master "
        "alive after | pre-reload workers still running at the end |")
    add("|---|---|---:|---|---:|")
    for label, r in b.items():
        seen = ", ".join(f"{v}× `{k}`" for k, v in sorted(r["after_reload"].items(),
                                                        key=lambda kv: -kv[1]))
        ff = f"{r['first_failure_s'] * 1000:.0f} ms" if r["first_failure_s"] is not None \
            else "never"
        add(f"| {label} | {seen} | {ff} | {'yes' if r['master_alive'] else '**no**'} | "
            f"{r['workers_left']} |")
    add("")
    if "molt" in b:
        mb = b["molt"]
        ok = all(k.startswith("200") for k in mb["after_reload"]) and mb["master_alive"]
        add(f"molt after the broken reload: `rollovers: {mb.get('molt_rollovers')}`, "
            f"generations {mb.get('generations')}.")
        add("")
        targets.append(("broken deploy: molt keeps serving the old release, no failure",
                        ok, ", ".join(f"{v}× {k}" for k, v in mb["after_reload"].items())))
