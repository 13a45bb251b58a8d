"""What every part of the bench shares: paths, the run's parameters, process bookkeeping
from /proc, the one-request probe, release directories, setup (packages, the molt build)
and the machine description. Waiting, wrk and driving molt are the test suites' own
helpers (tests/molt_testlib.py), imported here once for the whole bench."""
from __future__ import annotations

import ctypes
import http.client
import os
import platform
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

BENCH = Path(__file__).resolve().parent.parent
REPO = BENCH.parent
APPS = BENCH / "apps"
DOCS = REPO / "docs"
PYTHON = "/usr/bin/python3"

sys.path.insert(0, str(REPO / "tests"))
import molt_testlib as testlib  # noqa: E402,F401  (the bench's modules take it from here)
from molt_testlib import wait_until  # noqa: E402,F401

MOLT = Path(testlib.molt_bin())    # build/bin/molt, or $MOLT_BIN

# Debian package for each tool or module the run needs.
NEEDS = [
    ("cmd", "gunicorn", "gunicorn"),
    ("cmd", "uwsgi", "uwsgi"),
    ("file", "/usr/lib/uwsgi/plugins/python3_plugin.so", "uwsgi-plugin-python3"),
    ("module", "uvicorn", "python3-uvicorn"),
    ("module", "uvloop", "python3-uvloop"),
    ("module", "fastapi", "python3-fastapi"),
    ("module", "websockets", "python3-websockets"),
    ("module", "flask", "python3-flask"),
    ("module", "matplotlib", "python3-matplotlib"),
    ("cmd", "wrk", "wrk"),
    ("cmd", "nginx", "nginx"),
    ("cmd", "cmake", "cmake"),
]


class Params:
    """Durations and counts of a full run, or of a --quick one."""

    def __init__(self, quick: bool):
        self.quick = quick
        self.wrk_threads = 2
        self.wrk_conns = 64
        self.duration = 3 if quick else 10          # seconds per throughput measurement
        self.repeats = 1 if quick else 3            # interleaved repeats, median taken
        self.rollovers = 10 if quick else 50
        self.rollover_conns = 32
        self.rollover_interval = 0.75               # seconds from one HUP to the next, at least
        self.steady = 5 if quick else 20            # steady-state run for figure 4
        self.hup_repeats = 2 if quick else 5
        self.import_sleep = 0.3
        self.memory_workers = 16
        self.idle = 4 if quick else 10
        self.broken_watch = 3 if quick else 6


# ----- process bookkeeping ------------------------------------------------------------------
_libc = ctypes.CDLL("libc.so.6", use_errno=True)
PR_SET_PDEATHSIG = 1


def die_with_us(sig: int) -> Callable[[], None]:
    """preexec_fn: the child gets `sig` if this script dies, so nothing outlives a run."""
    def fn():
        _libc.prctl(PR_SET_PDEATHSIG, sig, 0, 0, 0)
        # A script started in the background of a non-interactive shell inherits SIGINT and
        # SIGQUIT ignored; the servers must see them (SIGINT stops uWSGI, and stops wrk early).
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        signal.signal(signal.SIGQUIT, signal.SIG_DFL)
    return fn


def children(pid: int) -> list[int]:
    out: list[int] = []
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            try:
                with open(f"/proc/{pid}/task/{task}/children") as f:
                    out.extend(int(x) for x in f.read().split())
            except OSError:
                pass
    except OSError:
        pass
    return out


def descendants(pid: int) -> list[int]:
    out, todo = [], [pid]
    while todo:
        for child in children(todo.pop()):
            out.append(child)
            todo.append(child)
    return out


def proc_status(pid: int) -> dict:
    fields = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                key, _, value = line.partition(":")
                fields[key] = value.strip()
    except OSError:
        pass
    return fields


def rss_kib(pid: int) -> int:
    value = proc_status(pid).get("VmRSS", "0 kB")
    return int(value.split()[0])


def pss_kib(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def cpu_split(pid: int) -> tuple[int, int]:
    """CPU time (clock ticks) of a process in user space and in the kernel: utime, stime."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[11]), int(fields[12])


def cpu_ticks(pid: int) -> int:
    return sum(cpu_split(pid))    # utime + stime


TICK_S = 1.0 / os.sysconf("SC_CLK_TCK")


def tree_cpu_ticks(pid: int) -> int:
    """CPU time (utime + stime, clock ticks) of a process and its descendants."""
    total = 0
    for each in [pid] + descendants(pid):
        try:
            total += cpu_ticks(each)
        except OSError:
            pass
    return total


def ctxt(pid: int) -> tuple[int, int]:
    s = proc_status(pid)
    return int(s.get("voluntary_ctxt_switches", 0)), int(s.get("nonvoluntary_ctxt_switches", 0))


alive = testlib.process_running    # a pid that exists and is not a zombie


def kill_pid(pid: int, sig: int = signal.SIGKILL):
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def probe(port: int, path: str = "/", timeout: float = 2.0,
          https: bool = False) -> tuple[str, bytes]:
    """One request on a new connection; the outcome as a client sees it: '200', '500',
    'refused', 'reset', 'timeout', ... and the body. The answer ends at its Content-Length:
    uWSGI's --http11-socket keeps the connection open even when the request says
    "Connection: close"."""
    if https:  # the bench's certificates are made for the run: not verified here
        conn: http.client.HTTPConnection = http.client.HTTPSConnection(
            "127.0.0.1", port, timeout=timeout, context=ssl._create_unverified_context())
    else:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", path, headers={"Host": "bench", "Connection": "close"})
        answer = conn.getresponse()
        return str(answer.status), answer.read()
    except ConnectionRefusedError:
        return "refused", b""
    except (ConnectionResetError, BrokenPipeError):   # RemoteDisconnected is a reset too
        return "reset", b""
    except socket.timeout:
        return "timeout", b""
    except (OSError, http.client.HTTPException, ValueError) as e:
        return type(e).__name__, b""
    finally:
        conn.close()


def say(msg: str):
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def release_dir(root: Path, name: str, app_source: Path, version: str = "1",
                import_sleep: float = 0.0) -> Path:
    d = root / name
    d.mkdir(parents=True, exist_ok=True)
    shutil.copy(app_source, d / "app.py")
    (d / "VERSION").write_text(version + "\n")
    if import_sleep:
        (d / "IMPORT_SLEEP").write_text(f"{import_sleep}\n")
    return d


# ----- setup and machine ------------------------------------------------------------------
def ensure_packages():
    missing = []
    for kind, what, package in NEEDS:
        if kind == "cmd" and shutil.which(what) is None:
            missing.append(package)
        elif kind == "file" and not os.path.exists(what):
            missing.append(package)
        elif kind == "module" and subprocess.run([PYTHON, "-c", f"import {what}"],
                                                 capture_output=True).returncode != 0:
            missing.append(package)
    if not missing:
        return
    say(f"installing with apt: {' '.join(missing)}")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    subprocess.run(["apt-get", "update", "-qq"], check=True, env=env, timeout=600)
    subprocess.run(["apt-get", "install", "-y", "-qq", *missing], check=True, env=env, timeout=900)


def ensure_molt(force: bool):
    if not MOLT.exists() or force:
        say("building molt")
        build = REPO / "build"
        subprocess.run(["cmake", "-S", str(REPO), "-B", str(build),
                        "-DCMAKE_BUILD_TYPE=RelWithDebInfo"], check=True, timeout=600)
        subprocess.run(["cmake", "--build", str(build), "-j2"], check=True, timeout=1800)
    compile_shim()


def compile_shim():
    """The shim's bytecode, fresh, as the Debian package's postinst compiles it at install
    (the peers' Python code is compiled by their packages). The servers run with
    PYTHONDONTWRITEBYTECODE, so a .py file changed since its .pyc was written would be
    compiled again by every interpreter: its compiler's leftovers then weigh in the whole
    tree's PSS (2 MiB more, measured, with one stale module) and in every boot's time."""
    subprocess.run([PYTHON, "-m", "compileall", "-q", str(REPO / "worker_shim" / "molt_shim")],
                   check=True, timeout=120)


def machine_info() -> dict:
    def run(argv: list[str]) -> str:
        try:
            r = subprocess.run(argv, capture_output=True, text=True, timeout=20)
            return (r.stdout + r.stderr).strip()
        except (OSError, subprocess.TimeoutExpired) as e:
            return f"({e})"
    mem = proc_meminfo_total()
    cpu = ""
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    try:
        debian = Path("/etc/debian_version").read_text().strip()
    except OSError:
        debian = "?"
    return {
        "nproc": os.cpu_count(), "cpu": cpu, "ram_gib": round(mem / 1024 / 1024, 1),
        "kernel": platform.release(), "debian": debian,
        "molt": run([str(MOLT), "version"]),
        "gunicorn": run(["gunicorn", "--version"]),
        "uwsgi": run(["uwsgi", "--version"]),
        "uvicorn": run([PYTHON, "-c", "import uvicorn; print(uvicorn.__version__)"]),
        "flask": run([PYTHON, "-c", "import importlib.metadata as m; print(m.version('flask'))"]),
        "python": run([PYTHON, "--version"]),
        "wrk": run(["wrk", "-v"]).splitlines()[0] if run(["wrk", "-v"]) else "?",
        "load_before": os.getloadavg(),
    }


def proc_meminfo_total() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                return int(line.split()[1])
    return 0
