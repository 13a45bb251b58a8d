"""The report (docs/benchmarks.md): the parts every run has (how to reproduce, machine,
noise, targets, notes) and the table helpers the sections share. Each section's own text is
written by its reporter in sections/ (one per section, in report order)."""
from __future__ import annotations

from typing import Optional, Union


def ratio(a: Optional[float], b: Optional[float]) -> str:
    if not a or not b:
        return "n/a"
    r = a / b
    return f"{r:.2f}×" if r >= 0.1 else f"{r:.3f}×"


def fmt_ms(v: float) -> str:
    return f"{v:.2f}" if v < 10 else f"{v:.1f}"


# A target's verdict: True (met), False (missed), None (no target), or MEDIAN_ONLY.
MEDIAN_ONLY = "median only"


def verdict(ok: Union[bool, str, None]) -> str:
    if ok is None:
        return "n/a"
    if ok == MEDIAN_ONLY:
        return "**met in the median only**"
    return "**met**" if ok else "**missed**"


def ratio_verdict(mine: list[float], peer: list[float], factor: float, strictly: bool = False):
    """Whether molt's req/s reach `factor` × the peer's: met when every interleaved run pair
    does (the margin is larger than the spread), MEDIAN_ONLY when the medians do but some
    pair does not, missed otherwise. `strictly`: above the factor, not at it."""
    import statistics

    def reaches(a: float, b: float) -> bool:
        return a / b > factor if strictly else a / b >= factor

    if not mine or not peer:
        return None
    if not reaches(statistics.median(mine), statistics.median(peer)):
        return False
    if len(mine) == len(peer) and all(reaches(a, b) for a, b in zip(mine, peer)):
        return True
    return MEDIAN_ONLY


def below_verdict(spread: dict, limit: float):
    """Whether a measured time stays under `limit` (a spread: median, min, max): met when
    every run does, MEDIAN_ONLY when the median does but some run does not, missed otherwise."""
    if spread["median"] >= limit:
        return False
    return True if spread["max"] < limit else MEDIAN_ONLY


def run_rps(row: dict) -> list[float]:
    """The req/s of each run behind a throughput row (load.median_of's `runs`)."""
    return [r["rps"] for r in row.get("runs", [])]


class Report:
    """The report's lines as they are written, and the targets the sections met or missed."""

    def __init__(self, results: dict, charts: dict):
        self.results = results
        self.p = results["params"]
        self.c = results["commands"]
        self.charts = charts
        self.lines: list[str] = []
        self.targets: list[tuple[str, Union[bool, str, None], str]] = []

    def add(self, line: str):
        self.lines.append(line)

    def target(self, name: str, ok: Union[bool, str, None], value: str):
        self.targets.append((name, ok, value))

    def wrk_bound(self, what: str, mine: dict, peer: dict, peer_name: str, factor: float,
                  reference: str = ""):
        """One bullet: the ratio of requests/s that the CPU per request allows once wrk's own
        is counted, and what molt would have to cost for `factor`. On two saturated cores
        shared with wrk, requests/s ≈ 2 s ÷ (server + wrk CPU per request)."""
        if "wrk_cpu_us" not in mine or "wrk_cpu_us" not in peer:
            return
        theirs = peer["cpu_us"] + peer["wrk_cpu_us"]
        ours = mine["cpu_us"] + mine["wrk_cpu_us"]
        needed = theirs / factor - mine["wrk_cpu_us"]
        self.add(f"* {what}: with wrk's own CPU per request counted, molt + wrk cost "
                 f"{mine['cpu_us']:.1f} + {mine['wrk_cpu_us']:.1f} µs against {peer_name} + "
                 f"wrk {peer['cpu_us']:.1f} + {peer['wrk_cpu_us']:.1f}: the CPU allows "
                 f"**{ratio(theirs, ours)}** (measured {ratio(mine['rps'], peer['rps'])}). "
                 f"{factor}× would need molt at {needed:.1f} µs per request or less"
                 + (f" ({reference})" if reference else "")
                 + f"; a server that cost nothing would reach {ratio(theirs, mine['wrk_cpu_us'])}.")

    def commands(self, section: str, labels, *more: str):
        """A shell block: the command line of each server of `section` (as the section
        recorded it in results["commands"]), then the `more` lines."""
        self.add("```sh")
        for label in labels:
            self.add(self.c.get(f"{section} {label}", ""))
        for line in more:
            self.add(line)
        self.add("```")
        self.add("")

    def header(self):
        results, p, m, add = self.results, self.p, self.results["machine"], self.add
        add("# Benchmarks")
        add("")
        add("molt against gunicorn, uWSGI and uvicorn on the same machine, in the same run. "
            "Every figure is measured side by side with its peers and given as a ratio; the "
            "absolute numbers move from run to run, the ratios much less.")
        add("")
        add("## How to reproduce")
        add("")
        add("```sh")
        add("bench/run            # full run, ~12-15 minutes; rewrites this file and docs/bench-*.png")
        add("bench/run --quick    # smoke run, ~3 minutes, short loads and no repeats")
        add("bench/run --only wsgi,asgi,rollover,hup,memory,broken   # some sections only")
        add("bench/compare wsgi keepalive /tmp/old,worker_shim   # A/B two shim trees against the peer")
        add("```")
        add("")
        add("`bench/run` installs what is missing with apt (gunicorn, uwsgi, uwsgi-plugin-python3, "
            "python3-uvicorn, python3-flask, python3-matplotlib, wrk), builds molt if "
            "`build/bin/molt` is missing, and starts every server itself on a free loopback port. "
            "Every server is stopped by its pid at the end of its section (and dies with the script "
            "through `PR_SET_PDEATHSIG` if the script is killed); every load is bounded by wrk's "
            "`-d`. The apps are in `bench/apps/`.")
        add("")
        add(f"This file was written by `bench/run{' --quick' if p['quick'] else ''}` on "
            f"{results['date']}, in {results['elapsed_s'] / 60:.1f} minutes"
            + (" — **a quick smoke run: single short measurements, treat the numbers as rough**."
               if p["quick"] else "."))
        add("")
        add("## Machine and versions")
        add("")
        add("| | |")
        add("|---|---|")
        add(f"| CPU | {m['nproc']} × {m['cpu']} |")
        add(f"| RAM | {m['ram_gib']} GiB |")
        add(f"| kernel | {m['kernel']} |")
        add(f"| Debian | {m['debian']} |")
        for k in ("molt", "gunicorn", "uwsgi", "uvicorn", "flask", "python", "wrk"):
            add(f"| {k} | {m[k]} |")
        add(f"| load average at start | {', '.join(f'{x:.2f}' for x in m['load_before'])} |")
        add("")
        add("**Noise.** This is a shared 2-core VM: other engineers build and run test suites on it "
            "at the same time, and wrk itself runs on the same two cores as the server under test "
            "(it takes about one of them). So each throughput figure is the median of "
            f"{p['repeats']} runs of {p['duration']} s, interleaved (molt, peer, peer, molt, ...) so "
            "that a burst of foreign load hits every server alike, and the report gives ratios. "
            "The per-run numbers are in the tables' last column; when they spread widely, trust "
            "the ratio less. Latency percentiles under a saturating load mostly measure queueing.")
        add("")

    def tp_table(self, key: str, base: str, title: str):
        results, add = self.results, self.add
        if key not in results:
            return
        rows = results[key]
        cpu = all("cpu_us" in r for r in rows.values())
        add(f"### {title}")
        add("")
        wrk_cpu = cpu and all("wrk_cpu_us" in r for r in rows.values())
        if cpu:
            add("| server | requests/s | p50 ms | p99 ms | molt ÷ server (req/s) | CPU µs/request "
                "| server ÷ molt (CPU) | " + ("wrk's CPU µs/request | " if wrk_cpu else "")
                + "errors | runs (req/s; CPU µs) |")
            add("|---|---:|---:|---:|---:|---:|---:|" + ("---:|" if wrk_cpu else "") + "---:|---|")
        else:
            add("| server | requests/s | p50 ms | p99 ms | molt ÷ server (req/s) | errors "
                "| runs (req/s) |")
            add("|---|---:|---:|---:|---:|---:|---|")
        for label, r in rows.items():
            runs_text = ", ".join(f"{x['rps']:,.0f}" for x in r["runs"])
            share = ratio(rows[base]["rps"], r["rps"]) if label != base else "—"
            if cpu:
                runs_text += "; " + ", ".join(f"{x['cpu_us']:.1f}" for x in r["runs"])
                cheaper = ratio(r["cpu_us"], rows[base]["cpu_us"]) if label != base else "—"
                wrk_text = f"{r['wrk_cpu_us']:.1f} | " if wrk_cpu else ""
                add(f"| {label} | {r['rps']:,.0f} | {fmt_ms(r['p50'])} | {fmt_ms(r['p99'])} | "
                    f"{share} | {r['cpu_us']:.1f} | {cheaper} | {wrk_text}{r['errors']} | "
                    f"{runs_text} |")
            else:
                add(f"| {label} | {r['rps']:,.0f} | {fmt_ms(r['p50'])} | {fmt_ms(r['p99'])} | "
                    f"{share} | {r['errors']} | {runs_text} |")
        add("")
        if cpu:
            add("CPU µs/request: the user and system time of the server's whole process tree "
                "during each run, over the requests wrk completed (wrk's own CPU is not in it); "
                "it moves much less from run to run than requests/s on this shared machine."
                + (" wrk's CPU µs/request: wrk's own, the same way. wrk runs on the same two "
                   "cores, so a ratio of requests/s can only approach the ratio of CPU per "
                   "request *including* wrk's: (peer + wrk) ÷ (molt + wrk)." if wrk_cpu else ""))
            add("")

    def spread_note(self, key: str):
        results, add = self.results, self.add
        spread = results.get(key + "_spread")
        if not spread:
            return
        add("Open connections per server process, sampled halfway through each keep-alive run "
            "(wrk's 64 connections; a process holding none is not listed):")
        add("")
        for label, samples in spread.items():
            add(f"* {label}: " + "; ".join(str(x) for x in samples))
        add("")
        held = [sum(x) for x in spread.get("uwsgi", [])]
        if held and max(held) < 64:
            add(f"uWSGI's processes held at most {max(held)} of wrk's 64 connections at every "
                "sample, one per thread: its `--http11-socket` serves one connection per "
                "thread at a time, and the other clients wait to be accepted. gunicorn's sync "
                "worker closes after every response, so it holds almost none.")
            add("")
        add("wrk opens its 64 connections in one burst and each stays with the process that "
            "accepted it, so these show how a server spreads a burst. It varies from run to "
            "run for every server here; a process with more connections batches more events "
            "per wake-up, which on 2 shared cores can move throughput either way.")
        add("")

    def finish(self) -> str:
        """The targets and the notes; then the targets move up, right after "How to
        reproduce", so that a reader sees them first."""
        results, add = self.results, self.add
        add("## Targets")
        add("")
        add("| target | result | this run |")
        add("|---|---|---|")
        for name, ok, value in self.targets:
            add(f"| {name} | {verdict(ok)} | {value} |")
        add("")
        notes = results.get("notes") or []
        if notes:
            add("## Notes")
            add("")
            for n in notes:
                add(f"* {n}")
            add("")
        # Put the targets right after "How to reproduce" so a reader sees them first.
        text = "\n".join(self.lines)
        head, sep, rest = text.partition("## Machine and versions")
        tstart = rest.find("## Targets")
        if tstart >= 0:
            tend = rest.find("\n## ", tstart + 1)
            tblock = rest[tstart:] if tend < 0 else rest[tstart:tend + 1]
            rest = rest[:tstart] + ("" if tend < 0 else rest[tend + 1:])
            text = head + tblock.rstrip() + "\n\n" + sep + rest
        return text.rstrip() + "\n"
