"""Helpers for tests that run the real molt binary with real Python workers.

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


def wait_until(predicate: Callable[[], object], timeout: float, what: str, interval: float = 0.02,
               on_timeout: Optional[Callable[[], str]] = None):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            extra = on_timeout() if on_timeout else ""
            raise AssertionError(f"timed out after {timeout}s waiting for {what}\n{extra}")
        time.sleep(interval)


def read_to_eof(sock: socket.socket) -> bytes:
    data = b""
    while True:
        chunk = sock.recv(65536)
        if not chunk:
            return data
        data += chunk


def http_get(port: int, path: str = "/", host: str = "127.0.0.1", timeout: float = 5.0,
             unix: Optional[str] = None) -> tuple[int, dict, bytes]:
    """One HTTP/1.1 request on a fresh connection; returns (status, headers, body)."""
    if unix:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(timeout)
        sock.connect(unix)
    else:
        sock = socket.create_connection((host, port), timeout=timeout)
    with sock:
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n".encode())
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


class Molt:
    """A molt master under test, started from a config dict written as YAML (JSON is YAML)."""

    def __init__(self, workdir: Path, config: dict, args: Optional[list[str]] = None,
                 env: Optional[dict] = None, binary: Optional[str] = None):
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.config = dict(config)
        self.config.setdefault("python", PYTHON)
        self.config.setdefault("listen", ["tcp://127.0.0.1:0"])
        self.config.setdefault("control", {"socket": str(self.workdir / "control.sock")})
        self.config_path = self.workdir / "molt.yaml"
        self.write_config()
        self.log_path = self.workdir / "molt.log"
        self.args = args
        self.binary = binary or molt_bin()
        self.env = dict(os.environ if env is None else env)
        self.proc: Optional[subprocess.Popen] = None
        self.port: Optional[int] = None

    # ----- lifecycle ----------------------------------------------------------------------
    def write_config(self, text: Optional[str] = None):
        self.config_path.write_text(text if text is not None else json.dumps(self.config, indent=2))

    def start(self, wait_live: bool = True, timeout: float = 30.0) -> "Molt":
        args = self.args or ["run", "-c", str(self.config_path)]
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen([self.binary, *args], stdout=self._log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, env=self.env, cwd=self.workdir)
        if wait_live:
            self.wait_live(timeout)
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def wait_live(self, timeout: float = 30.0):
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

    def signal(self, signum: int):
        os.kill(self.pid, signum)

    def stop(self, timeout: float = 30.0) -> int:
        """Graceful stop (SIGTERM); SIGKILL and fail if it does not exit within timeout."""
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill_everything()
                raise AssertionError(f"molt did not stop within {timeout}s\n{self.log()}")
        self._log.close()
        return self.proc.returncode

    def worker_pids(self) -> list[int]:
        try:
            status = self.status()
        except Exception:
            return []
        return [w["pid"] for g in status["generations"] for w in g["workers"] if w["pid"] > 0]

    def kill_everything(self):
        """Cleanup after a failed test: the master and the workers it had, by pid."""
        pids = self.worker_pids()
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    # ----- control ------------------------------------------------------------------------
    def ctl(self, *args: str, timeout: float = 120.0) -> subprocess.CompletedProcess:
        return subprocess.run([molt_bin(), "ctl", "-c", str(self.config_path), *args],
                              capture_output=True, text=True, timeout=timeout)

    def try_status(self) -> Optional[dict]:
        path = self.config["control"]["socket"]
        if not os.path.exists(path):
            return None
        try:
            return control_request(path, {"command": "status"})
        except OSError:
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
class Wrk:
    """wrk in the background, bounded by -d; result() parses what clients saw."""

    def __init__(self, url: str, duration: float = 10, connections: int = 20, threads: int = 2,
                 extra: Optional[list[str]] = None):
        self.duration = duration
        self.proc = subprocess.Popen(
            # A request answered late is latency, measured by bench/; a request not answered
            # within 10 s counts as failed.
            ["wrk", f"-t{threads}", f"-c{connections}", f"-d{duration}s", "--latency",
             "--timeout", "10s",
             *(extra or []), url],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    def result(self) -> dict:
        out, _ = self.proc.communicate(timeout=self.duration + 30)
        return parse_wrk(out)


def parse_wrk(out: str) -> dict:
    result = {"output": out, "requests": 0, "connect": 0, "read": 0, "write": 0, "timeout": 0,
              "non2xx": 0, "rps": 0.0}
    m = re.search(r"(\d+) requests in", out)
    if m:
        result["requests"] = int(m.group(1))
    m = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    if m:
        result.update(connect=int(m.group(1)), read=int(m.group(2)), write=int(m.group(3)),
                      timeout=int(m.group(4)))
    m = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    if m:
        result["non2xx"] = int(m.group(1))
    m = re.search(r"Requests/sec:\s+([\d.]+)", out)
    if m:
        result["rps"] = float(m.group(1))
    result["failed"] = (result["connect"] + result["read"] + result["write"] + result["timeout"]
                        + result["non2xx"])
    return result


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
