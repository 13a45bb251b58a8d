"""Loads as the bench runs them: the tests' Wrk with the bench's shape (wrk's own 2 s
timeout, -t from the run's parameters, killed if this script dies), interleaved throughput
runs, and which server process holds wrk's connections."""
from __future__ import annotations

import os
import re
import select
import shlex
import signal
import statistics
import subprocess
import time
from typing import Optional

from .common import TICK_S, Params, cpu_ticks, die_with_us, say, testlib, tree_cpu_ticks
from .peers import Server


def url_of(port: int, path: str = "/", scheme: str = "http") -> str:
    return f"{scheme}://127.0.0.1:{port}{path}"


def start_wrk(p: Params, port: int, duration: float, conns: int, close: bool = False,
              path: str = "/", scheme: str = "http",
              extra: Optional[list[str]] = None) -> testlib.Wrk:
    """wrk in the background against the server on `port`."""
    return testlib.Wrk(url_of(port, path, scheme), duration, conns, p.wrk_threads, close=close,
                       timeout=None, extra=extra, preexec_fn=die_with_us(signal.SIGKILL))


def run_wrk(p: Params, port: int, duration: float, conns: int, close: bool = False,
            path: str = "/", scheme: str = "http", extra: Optional[list[str]] = None) -> dict:
    return start_wrk(p, port, duration, conns, close, path, scheme, extra).result()


def wrk_result(load: testlib.Wrk) -> dict:
    """load.result(), plus `wrk_cpu_us` when it could be read: wrk's own CPU (utime + stime
    of all its threads) per request. On a machine whose cores wrk shares with the server,
    this is the part of each request that no server can make cheaper: the ratios of
    requests/s are bounded by it. Read from /proc while wrk is a zombie (its pidfd turns
    readable at the exit; result() reaps it); wrk's report is far smaller than a pipe, so it
    never blocks on its output."""
    deadline = time.monotonic() + load.duration + 30
    cpu = None
    try:
        pidfd = os.pidfd_open(load.proc.pid)
    except OSError:
        pidfd = None  # already reaped, or no pidfds: the figure is left out
    if pidfd is not None:
        try:
            poller = select.poll()
            poller.register(pidfd, select.POLLIN)
            if poller.poll(max(0.0, deadline - time.monotonic()) * 1000):  # it has exited
                cpu = cpu_ticks(load.proc.pid) * TICK_S
        except OSError:
            pass
        finally:
            os.close(pidfd)
    r = load.result(timeout=max(1.0, deadline - time.monotonic()))
    if cpu is not None and r["requests"]:
        r["wrk_cpu_us"] = cpu / r["requests"] * 1e6
    return r


def wrk_command(p: Params, duration: float, conns: int, close: bool = False, path: str = "/",
                scheme: str = "http", extra: Optional[list[str]] = None) -> str:
    """The wrk command line for the report, with PORT for the server's port."""
    return shlex.join(testlib.wrk_argv(f"{scheme}://127.0.0.1:PORT{path}", duration, conns,
                                       p.wrk_threads, close, timeout=None, extra=extra))


def median_of(results: list[dict]) -> dict:
    keys = ("rps", "p50", "p99") + tuple(k for k in ("cpu_us", "wrk_cpu_us")
                                         if all(k in r for r in results))
    out = {k: statistics.median([r[k] for r in results]) for k in keys}
    out["runs"] = [{k: r[k] for k in keys + ("socket_errors", "non2xx")} for r in results]
    out["errors"] = sum(r["failed"] for r in results)
    return out


def throughput(p: Params, servers: list[Server], close: bool, results: dict, key: str,
               path: str = "/", extra: Optional[list[str]] = None):
    """Interleaved repeats: server A, B, C, A, B, C, ...; the median of each server's runs.
    Each server is loaded over its own scheme (`Server.scheme`); `extra`: more wrk options
    (request headers)."""
    runs: dict[str, list[dict]] = {s.label: [] for s in servers}
    for s in servers:     # a short warm-up each, not counted
        run_wrk(p, s.port, 1, p.wrk_conns, close, path, s.scheme, extra)
    spread: dict[str, list[list[int]]] = {s.label: [] for s in servers}
    for rep in range(p.repeats):
        for s in servers:
            cpu_before = tree_cpu_ticks(s.pid)
            w = start_wrk(p, s.port, p.duration, p.wrk_conns, close, path, s.scheme, extra)
            if not close:  # keep-alive: also see which workers hold the connections, mid-run
                time.sleep(p.duration / 2)
                spread[s.label].append(connections_per_process(s.port))
            r = wrk_result(w)
            # The server's whole process tree, per request answered: steadier from run to run
            # than requests/s on a shared machine (wrk's own CPU is not in it).
            cpu_s = (tree_cpu_ticks(s.pid) - cpu_before) * TICK_S
            r["cpu_us"] = cpu_s / r["requests"] * 1e6 if r["requests"] else float("nan")
            runs[s.label].append(r)
            say(f"  {key} {s.label} #{rep + 1}: {r['rps']:.0f} req/s p50 {r['p50']:.2f}ms "
                f"p99 {r['p99']:.2f}ms cpu {r['cpu_us']:.1f}us/req "
                f"wrk {r.get('wrk_cpu_us', float('nan')):.1f}us/req "
                f"errors {r['failed']}")
            results["commands"]["wrk " + key] = wrk_command(p, p.duration, p.wrk_conns, close,
                                                            path, servers[0].scheme, extra)
    results[key] = {label: median_of(rs) for label, rs in runs.items()}
    if not close:
        results[key + "_spread"] = spread


def connections_per_process(port: int) -> list[int]:
    """Established connections to `port`, counted per server process, largest first."""
    out = subprocess.run(["ss", "-tnpH", "state", "established", f"sport = :{port}"],
                         capture_output=True, text=True).stdout
    counts: dict[str, int] = {}
    for pid in re.findall(r"pid=(\d+)", out):
        counts[pid] = counts.get(pid, 0) + 1
    return sorted(counts.values(), reverse=True)
