"""The one set of helpers for everything that runs molt for real: the test suites
(integration, e2e, reliability, systemd, docs, shim) and the benchmarks in bench/.

It owns waiting (wait_until: poll observable state with a bound), running wrk and reading
its output (Wrk, parse_wrk), and driving molt (Molt: write a config, start the master, wait
for the first live generation, HUP, reload --wait, status, stop, the master's output).

Everything here is bounded in time: every wait polls observable state (the control
socket, a log line, an HTTP answer) until a deadline, and raises with the master's log
when the deadline passes. Nothing sleeps for a fixed time to "let things settle".
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Callable, Optional

REPO = Path(__file__).resolve().parent.parent
APPS = REPO / "tests" / "apps"
PYTHON = "/usr/bin/python3"


def molt_bin() -> str:
    env = os.environ.get("MOLT_BIN")
    if env:
        return env
    return str(REPO / "build" / "bin" / "molt")


# ----- waiting ------------------------------------------------------------------------------
class WaitTimeout(AssertionError, TimeoutError):
    """A bounded wait ran out: a failed assertion to a test, a TimeoutError to the bench."""


def wait_until(predicate: Callable[[], object], timeout: float, what: str = "condition",
               interval: float = 0.02, on_timeout: Optional[Callable[[], str]] = None):
    """Polls `predicate` until it returns something true (and returns that), for at most
    `timeout` seconds; then raises WaitTimeout naming `what`, with on_timeout()'s text."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            extra = on_timeout() if on_timeout else ""
            raise WaitTimeout(f"timed out after {timeout}s waiting for {what}\n{extra}")
        time.sleep(interval)


# ----- processes ----------------------------------------------------------------------------
def process_running(pid: int) -> bool:
    """The process exists and is not a zombie (an exited child nobody reaped yet)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def all_threads_stopped(pid: int) -> bool:
    """Every thread of `pid` has taken its SIGSTOP: kill() returns before a thread that was
    running gets to it, and such a thread can still make one more system call (an accept)."""
    try:
        tids = os.listdir(f"/proc/{pid}/task")
        states = []
        for tid in tids:
            with open(f"/proc/{pid}/task/{tid}/stat") as f:
                states.append(f.read().rsplit(")", 1)[1].split()[0])
    except OSError:
        return False
    return bool(states) and all(state == "T" for state in states)


# ----- sockets and HTTP ---------------------------------------------------------------------
def free_port() -> int:
    """A port nobody listens on right now (bind 0, read it, close it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def connections_held(pid: int, port: int) -> int:
    """How many established TCP connections to local `port` process `pid` holds: its socket
    fds (/proc/PID/fd) matched by inode against /proc/net/tcp and tcp6."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue  # closed meanwhile
        if target.startswith("socket:["):
            inodes.add(target[len("socket:["):-1])
    held = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as f:
            next(f)
            for line in f:
                fields = line.split()
                local_port = int(fields[1].rsplit(":", 1)[1], 16)
                if fields[3] == "01" and local_port == port and fields[9] in inodes:
                    held += 1  # 01: ESTABLISHED
    return held


def uid_of(pid: int) -> int:
    """The real user id process `pid` runs as (/proc/PID/status)."""
    with open(f"/proc/{pid}/status") as f:
        return int(next(line for line in f if line.startswith("Uid:")).split()[1])


def read_to_eof(sock: socket.socket, timeout: Optional[float] = None) -> bytes:
    """Everything up to a clean EOF; a reset or a timeout raises. `timeout`, when given,
    replaces the socket's own."""
    if timeout is not None:
        sock.settimeout(timeout)
    chunks = []
    while True:
        data = sock.recv(65536)  # ConnectionResetError / socket.timeout propagate
        if not data:
            return b"".join(chunks)
        chunks.append(data)


def http_get(port: int, path: str = "/", host: str = "127.0.0.1", timeout: float = 5.0,
             unix: Optional[str] = None,
             headers: Optional[dict] = None) -> tuple[int, dict, bytes]:
    """One HTTP/1.1 request on a fresh connection; returns (status, headers, body)."""
    extra = "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
    if unix:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(timeout)
        sock.connect(unix)
    else:
        sock = socket.create_connection((host, port), timeout=timeout)
    with sock:
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: test\r\n{extra}Connection: close\r\n\r\n"
                     .encode())
        data = read_to_eof(sock)
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {}
    for line in lines[1:]:
        key, _, value = line.partition(":")
        headers[key.strip().lower()] = value.strip()
    if headers.get("transfer-encoding", "").lower() == "chunked":
        body = dechunk(body)
    return status, headers, body


def dechunk(data: bytes) -> bytes:
    """Decodes a complete chunked body (strictly: a malformed one raises)."""
    out = b""
    while True:
        size_line, _, data = data.partition(b"\r\n")
        size = int(size_line.split(b";")[0], 16)
        if size == 0:
            return out
        out += data[:size]
        assert data[size:size + 2] == b"\r\n", "chunk not followed by CRLF"
        data = data[size + 2:]


# ----- server processes ---------------------------------------------------------------------
class ServerProcess:
    """A long-running program started here: its argv, its output in `<name>.log` in its
    work directory, and a stop by its pid (stop_signal, then SIGKILL after a bound)."""

    def __init__(self, workdir: Path, name: str, argv: Optional[list[str]] = None,
                 env: Optional[dict] = None, preexec_fn: Optional[Callable[[], None]] = None,
                 stop_signal: int = signal.SIGTERM):
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.name = name
        self.argv = list(argv or [])
        self.env = dict(os.environ if env is None else env)
        self.preexec_fn = preexec_fn
        self.stop_signal = stop_signal
        self.log_path = self.workdir / f"{name}.log"
        self.proc: Optional[subprocess.Popen] = None
        self._log = None

    def command(self) -> list[str]:
        return self.argv

    def start(self) -> "ServerProcess":
        self.argv = self.command()
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(self.argv, stdout=self._log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, env=self.env, cwd=self.workdir,
                                     preexec_fn=self.preexec_fn)
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def signal(self, signum: int):
        os.kill(self.pid, signum)

    def stop(self, timeout: float = 30.0) -> int:
        """Graceful stop (stop_signal); SIGKILL and raise WaitTimeout if the program does not
        exit within timeout. Returns its exit status."""
        if self.proc is None:
            return 0
        try:
            if self.proc.poll() is None:
                self.proc.send_signal(self.stop_signal)
                try:
                    self.proc.wait(timeout)
                except subprocess.TimeoutExpired:
                    self.kill_everything()
                    raise WaitTimeout(f"{self.name} did not stop within {timeout}s\n{self.log()}")
        finally:
            if self._log:
                self._log.close()
        return self.proc.returncode

    def kill_everything(self):
        """Cleanup after a failure: SIGKILL to the program, by pid."""
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


class Molt(ServerProcess):
    """A molt master under test, started from a config dict written as YAML (JSON is YAML)
    to `<name>.yaml` in its work directory; its output goes to `<name>.log`."""

    def __init__(self, workdir: Path, config: dict, args: Optional[list[str]] = None,
                 env: Optional[dict] = None, binary: Optional[str] = None, name: str = "molt",
                 preexec_fn: Optional[Callable[[], None]] = None):
        super().__init__(workdir, name, env=env, preexec_fn=preexec_fn)
        self.config = dict(config)
        self.config.setdefault("python", PYTHON)
        self.config.setdefault("listen", ["tcp://127.0.0.1:0"])
        self.config.setdefault("control", {"socket": str(self.workdir / "control.sock")})
        self.config_path = self.workdir / f"{name}.yaml"
        self.write_config()
        self.args = args
        self.binary = binary or molt_bin()
        self.port: Optional[int] = None

    # ----- lifecycle ----------------------------------------------------------------------
    def write_config(self, text: Optional[str] = None):
        self.config_path.write_text(text if text is not None else json.dumps(self.config, indent=2))

    def command(self) -> list[str]:
        return [self.binary, *(self.args or ["run", "-c", str(self.config_path)])]

    def start(self, wait_live: bool = True, timeout: float = 30.0) -> "Molt":
        super().start()
        if wait_live:
            self.wait_live(timeout)
        return self

    def wait_live(self, timeout: float = 30.0):
        """Until the first generation is live (the master exiting first fails at once); then
        `port` is the TCP port molt listens on."""
        def live():
            if not self.alive():
                raise AssertionError(f"molt exited with {self.proc.returncode}\n{self.log()}")
            status = self.try_status()
            return status and status.get("live_generation")
        wait_until(live, timeout, "the first generation to go live", on_timeout=self.log)
        self.port = self.tcp_port()

    def tcp_port(self) -> Optional[int]:
        for address in self.status()["master"]["listen"]:
            m = re.match(r"tcp://.*:(\d+)$", address)
            if m:
                return int(m.group(1))
        return None

    def hup(self):
        """A rollover the way an operator starts one: `kill -HUP master`."""
        self.signal(signal.SIGHUP)

    def worker_pids(self) -> list[int]:
        try:
            status = self.status()
        except Exception:
            return []
        return [w["pid"] for g in status["generations"] for w in g["workers"] if w["pid"] > 0]

    def kill_everything(self):
        """Cleanup after a failed test: the master and the workers it had, by pid."""
        pids = self.worker_pids()
        super().kill_everything()
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    # ----- control ------------------------------------------------------------------------
    def ctl(self, *args: str, timeout: float = 120.0) -> subprocess.CompletedProcess:
        return subprocess.run([self.binary, "ctl", "-c", str(self.config_path), *args],
                              capture_output=True, text=True, timeout=timeout)

    def try_status(self) -> Optional[dict]:
        """The status, or None while the control socket is not there or not answering."""
        path = self.config["control"]["socket"]
        if not os.path.exists(path):
            return None
        try:
            return control_request(path, {"command": "status"})
        except (OSError, ValueError):
            return None

    def status(self) -> dict:
        return control_request(self.config["control"]["socket"], {"command": "status"})

    def reload(self, timeout: float = 60.0) -> dict:
        """Starts a rollover and waits for its result (like `molt ctl reload --wait`)."""
        return control_request(self.config["control"]["socket"], {"command": "reload", "wait": True},
                               timeout=timeout)

    def live_generation(self) -> Optional[int]:
        return self.status().get("live_generation")

    def workers(self, state: Optional[str] = None, generation: Optional[int] = None) -> list[dict]:
        out = []
        for g in self.status()["generations"]:
            if generation is not None and g["id"] != generation:
                continue
            for w in g["workers"]:
                if state is None or w["state"] == state:
                    out.append(dict(w, generation=g["id"]))
        return out

    def get(self, path: str = "/") -> tuple[int, dict, bytes]:
        assert self.port is not None
        return http_get(self.port, path)

    def url(self, path: str = "/") -> str:
        return f"http://127.0.0.1:{self.port}{path}"


def control_request(path: str, request: dict, timeout: float = 10.0) -> dict:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    with sock:
        sock.connect(path)
        sock.sendall(json.dumps(request).encode() + b"\n")
        data = read_to_eof(sock)
    return json.loads(data)


# ----- load ---------------------------------------------------------------------------------
def wrk_argv(url: str, duration: float, connections: int = 20, threads: int = 2,
             close: bool = False, timeout: Optional[str] = "10s",
             extra: Optional[list[str]] = None) -> list[str]:
    """The wrk command line. `close` sends `Connection: close` (a new connection per
    request); `timeout` None keeps wrk's own 2 s."""
    argv = ["wrk", f"-t{threads}", f"-c{connections}", f"-d{int(duration)}s", "--latency"]
    if timeout:
        argv += ["--timeout", timeout]
    if close:
        argv += ["-H", "Connection: close"]
    return argv + list(extra or []) + [url]


class Wrk:
    """wrk in the background, bounded by -d, or stopped early with interrupt() (it still
    reports); result() parses what clients saw."""

    def __init__(self, url: str, duration: float = 10, connections: int = 20, threads: int = 2,
                 close: bool = False, timeout: Optional[str] = "10s",
                 extra: Optional[list[str]] = None,
                 preexec_fn: Optional[Callable[[], None]] = None):
        # The tests' default timeout: a request answered late is latency, measured by bench/;
        # a request not answered within 10 s counts as failed.
        self.duration = duration
        self.argv = wrk_argv(url, duration, connections, threads, close, timeout, extra)
        self.started = time.monotonic()
        self.proc = subprocess.Popen(self.argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     text=True, preexec_fn=preexec_fn)

    def interrupt(self):
        """SIGINT: wrk stops early and still prints its report."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)

    def stop(self) -> dict:
        """interrupt() and result(): what was under load is done, wrk need not run out its
        duration."""
        self.interrupt()
        return self.result(timeout=60)

    def result(self, timeout: Optional[float] = None) -> dict:
        """parse_wrk() of the whole output, plus `elapsed` (seconds since the start). A wrk
        still running `timeout` seconds on (default: 30 s past its -d) is killed and raises."""
        bound = self.duration + 30 if timeout is None else timeout
        try:
            out, _ = self.proc.communicate(timeout=bound)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            out, _ = self.proc.communicate()
            raise WaitTimeout(f"wrk still running {bound}s on: {' '.join(self.argv)}\n{out}")
        result = parse_wrk(out)
        result["elapsed"] = time.monotonic() - self.started
        return result


def run_wrk(url: str, duration: float, **kwargs) -> dict:
    """One wrk run in the foreground: Wrk(...).result()."""
    return Wrk(url, duration, **kwargs).result()


def _ms(text: str) -> float:
    m = re.match(r"([\d.]+)(us|ms|s|m)$", text)
    if not m:
        return float("nan")
    scale = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60000.0}[m.group(2)]
    return float(m.group(1)) * scale


def parse_wrk(out: str) -> dict:
    """What wrk's report says: requests, rps, the p50/p99 latency in ms (from --latency; nan
    when absent), the socket errors by kind, non-2xx answers; `socket_errors` sums the kinds
    and `failed` is every request a client saw fail (socket errors + non-2xx)."""
    r = {"output": out, "requests": 0, "rps": 0.0, "p50": float("nan"), "p99": float("nan"),
         "connect": 0, "read": 0, "write": 0, "timeout": 0, "non2xx": 0}
    if m := re.search(r"(\d+) requests in", out):
        r["requests"] = int(m.group(1))
    if m := re.search(r"Requests/sec:\s+([\d.]+)", out):
        r["rps"] = float(m.group(1))
    if m := re.search(r"^\s+50%\s+(\S+)", out, re.M):
        r["p50"] = _ms(m.group(1))
    if m := re.search(r"^\s+99%\s+(\S+)", out, re.M):
        r["p99"] = _ms(m.group(1))
    if m := re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out):
        r.update(connect=int(m.group(1)), read=int(m.group(2)), write=int(m.group(3)),
                 timeout=int(m.group(4)))
    if m := re.search(r"Non-2xx or 3xx responses: (\d+)", out):
        r["non2xx"] = int(m.group(1))
    r["socket_errors"] = r["connect"] + r["read"] + r["write"] + r["timeout"]
    r["failed"] = r["socket_errors"] + r["non2xx"]
    return r


# ----- release trees ------------------------------------------------------------------------
class Releases:
    """A deploy layout: releases/<name>/ directories and a `current` symlink."""

    def __init__(self, root: Path):
        self.root = Path(root)
        (self.root / "releases").mkdir(parents=True, exist_ok=True)
        self.current = self.root / "current"

    def add(self, name: str, source: Path | str | None = None, files: Optional[dict] = None) -> Path:
        target = self.root / "releases" / name
        if source is not None:
            shutil.copytree(source, target, dirs_exist_ok=True)
        target.mkdir(parents=True, exist_ok=True)
        for rel, text in (files or {}).items():
            (target / rel).parent.mkdir(parents=True, exist_ok=True)
            (target / rel).write_text(text)
        return target

    def config(self, **extra) -> dict:
        """A molt config for the Flask releases of this layout (`app:app`, 2 workers x 2
        threads, REVISION as the version, /healthz warm-up); `extra` overrides keys."""
        config = {
            "app": "app:app",
            "chdir": str(self.current),
            "workers": 2,
            "threads": 2,
            "version_file": "REVISION",
            "health": {"path": "/healthz"},
            "timeouts": {"boot": "20s", "graceful": "10s"},
        }
        config.update(extra)
        return config

    def activate(self, name: str):
        """Flips `current` atomically, the way a deploy tool does."""
        tmp = self.root / f".current-{name}"
        if tmp.is_symlink():
            tmp.unlink()
        tmp.symlink_to(self.root / "releases" / name)
        os.replace(tmp, self.current)


def release_tree(root: Path, files_for: Callable[[str], dict],
                 versions: tuple = ("a", "b")) -> Releases:
    """A deploy layout with one release per version (files from `files_for`), the first
    one active."""
    releases = Releases(root)
    for v in versions:
        releases.add(v, files=files_for(v))
    releases.activate(versions[0])
    return releases


def flask_release(version: str) -> dict:
    """Files of a small Flask release that answers its version."""
    return {
        "app.py": (
            "from flask import Flask\n"
            "app = Flask(__name__)\n"
            f"VERSION = {version!r}\n"
            "@app.route('/')\n"
            "def index():\n"
            "    return 'version ' + VERSION + '\\n'\n"
            "@app.route('/healthz')\n"
            "def healthz():\n"
            "    return 'ok\\n'\n"
        ),
        "REVISION": version + "\n",
    }
