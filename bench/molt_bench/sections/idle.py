"""Figure 7: the masters of figure 1 (and their workers) left alone, CPU and wake-ups."""
from __future__ import annotations

import os
import time

from ..common import alive, cpu_ticks, ctxt, Params, say
from ..peers import Server
from ..report import Report


def measure(p: Params, servers: list[Server], results: dict):
    """Figure 7: the masters (and their workers) left alone for p.idle seconds, all at once."""
    hz = os.sysconf("SC_CLK_TCK")
    time.sleep(1.0)    # let keep-alive connections of the last load time out first
    before = {}
    for s in servers:
        ws = s.workers()
        before[s.label] = (cpu_ticks(s.pid), ctxt(s.pid),
                           {w: (cpu_ticks(w), ctxt(w)) for w in ws if alive(w)})
    t0 = time.monotonic()
    time.sleep(p.idle)
    elapsed = time.monotonic() - t0
    out = {}
    for s in servers:
        cpu0, (v0, n0), wbefore = before[s.label]
        v1, n1 = ctxt(s.pid)
        wcpu = wv = 0
        for w, (c, (wv0, _)) in wbefore.items():
            if alive(w):
                wcpu += cpu_ticks(w) - c
                wv += ctxt(w)[0] - wv0
        out[s.label] = {
            "master_cpu_ms_per_s": (cpu_ticks(s.pid) - cpu0) * 1000 / hz / elapsed,
            "master_vol_ctxt_per_s": (v1 - v0) / elapsed,
            "master_nonvol_ctxt_per_s": (n1 - n0) / elapsed,
            "workers_cpu_ms_per_s": wcpu * 1000 / hz / elapsed,
            "workers_vol_ctxt_per_s": wv / elapsed,
            "seconds": elapsed,
        }
        say(f"  idle {s.label}: master {out[s.label]['master_cpu_ms_per_s']:.2f} ms CPU/s, "
            f"{out[s.label]['master_vol_ctxt_per_s']:.1f} wake-ups/s")
    results["idle"] = out


def report(doc: Report):
    """Writes figure 7 of the report."""
    results, p, add = doc.results, doc.p, doc.add
    if "idle" not in results:
        return
    idl = results["idle"]
    add("## 7. Master idle CPU and wake-ups")
    add("")
    add(f"The four servers of figure 1 (4 workers each), left alone together for "
        f"{p['idle']} s after their last load. CPU: `utime+stime` delta from "
        "`/proc/PID/stat`; wake-ups: the `voluntary_ctxt_switches` delta from "
        "`/proc/PID/status` (a proxy: a process that sleeps and wakes switches "
        "voluntarily once per wake-up).")
    add("")
    add("| server | master CPU ms/s | master wake-ups/s | master involuntary switches/s | "
        "all workers CPU ms/s | all workers wake-ups/s |")
    add("|---|---:|---:|---:|---:|---:|")
    for label, r in idl.items():
        add(f"| {label} | {r['master_cpu_ms_per_s']:.2f} | {r['master_vol_ctxt_per_s']:.1f} | "
            f"{r['master_nonvol_ctxt_per_s']:.1f} | {r['workers_cpu_ms_per_s']:.2f} | "
            f"{r['workers_vol_ctxt_per_s']:.1f} |")
    add("")
    add(f"CPU time is counted in clock ticks of {1000 // os.sysconf('SC_CLK_TCK')} ms, so "
        f"values under ~{1000 / os.sysconf('SC_CLK_TCK') / p['idle']:.0f} ms/s over a "
        f"{p['idle']} s window are at the resolution limit. The worker columns are extra: "
        "they show how often the idle workers of each server wake up.")
    add("")
