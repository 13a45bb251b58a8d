"""The servers under test: molt (driven by the tests' own Molt) and its peers gunicorn,
uWSGI and uvicorn, each a master process started here and stopped here by its pid."""
from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import Optional

from .common import (MOLT, PYTHON, alive, children, descendants, die_with_us, kill_pid, probe,
                     say, testlib, wait_until)

# The environment of every server: no .pyc files written into the release directories.
BENCH_ENV_EXTRA = {"PYTHONDONTWRITEBYTECODE": "1"}


def server_process(workdir: Path, label: str, argv: list[str],
                   stop_signal: int = signal.SIGTERM) -> testlib.ServerProcess:
    """A peer's master: started in its work directory, and killed with `stop_signal` if
    this script dies."""
    return testlib.ServerProcess(workdir, label, argv, env=dict(os.environ, **BENCH_ENV_EXTRA),
                                 preexec_fn=die_with_us(stop_signal), stop_signal=stop_signal)


class Server:
    """One server under test: its master (a ServerProcess: argv, log, stop by pid), the
    loopback port it serves on, and every worker pid it was seen with, so that nothing it
    leaves behind outlives its section."""

    name = "?"
    scheme = "http"  # "https" for a server under test over TLS

    def __init__(self, process: testlib.ServerProcess, label: str, port: int = 0):
        self.process = process
        self.label = label
        self.port = port
        self.seen: set[int] = set()

    @property
    def argv(self) -> list[str]:
        return self.process.argv

    @property
    def pid(self) -> int:
        return self.process.pid

    def alive(self) -> bool:
        return self.process.alive()

    def start(self) -> "Server":
        self.process.start()
        RUNNING.append(self)
        return self

    def workers(self) -> list[int]:
        pids = [p for p in children(self.pid) if self.is_worker(p)]
        self.seen.update(pids)
        return pids

    def is_worker(self, pid: int) -> bool:
        return True

    def wait_ready(self, count: int, timeout: float = 60.0):
        def ready():
            if not self.alive():
                raise RuntimeError(f"{self.label} exited with {self.process.proc.returncode}: "
                                   f"{self.log_tail()}")
            return len(self.workers()) >= count and probe(
                self.port, https=self.scheme == "https")[0] == "200"
        wait_until(ready, timeout, f"{self.label} to serve with {count} workers")

    def reload(self):
        self.process.signal(signal.SIGHUP)

    def rolled(self, before_gen: int, old: set[int], n: int) -> bool:
        """The rollover is done: every one of the n workers is a new process and the old ones
        are gone. (Not "the new release answers a probe": under a keep-alive load uWSGI's
        threads are all held by wrk's connections, and a new connection waits in the backlog
        until the load ends.)"""
        if not self.alive():
            raise RuntimeError(f"{self.label} exited during a reload: {self.log_tail()}")
        ws = set(self.workers())
        return len(ws) == n and not ws & old

    def live_generation(self) -> int:
        return 0

    def log_tail(self, n: int = 2000) -> str:
        return self.process.log()[-n:]

    def stop(self, timeout: float = 15.0):
        if self.process.proc is None:
            return
        for p in descendants(self.pid):
            self.seen.add(p)
        try:
            self.process.stop(timeout)
        except testlib.WaitTimeout:
            say(f"  {self.label} did not stop within {timeout} s; killed")
        # Whatever it left behind (e.g. workers orphaned by a dead master) goes too, by pid.
        deadline = time.monotonic() + 5
        while any(alive(p) for p in self.seen) and time.monotonic() < deadline:
            time.sleep(0.05)
        for p in self.seen:
            if alive(p):
                kill_pid(p)
        if self in RUNNING:
            RUNNING.remove(self)


RUNNING: list[Server] = []
SERVER_FILTER: set[str] = set()     # --servers: one-server sections run only these labels


class MoltServer(Server):
    name = "molt"

    def __init__(self, workdir: Path, label: str, app: str, chdir: Path, workers: int,
                 threads: int = 1, interface: str = "wsgi", extra: Optional[dict] = None):
        config = {
            "app": app, "interface": interface, "chdir": str(chdir), "python": PYTHON,
            "listen": ["tcp://127.0.0.1:0"], "workers": workers,
            "control": {"socket": str(workdir / f"{label}.ctl.sock")},
            "logging": {"level": "info", "access_log": False},
        }
        if interface == "wsgi":
            config["threads"] = threads
        config.update(extra or {})
        self.molt = testlib.Molt(workdir, config, name=label, binary=str(MOLT),
                                 env=dict(os.environ, **BENCH_ENV_EXTRA),
                                 preexec_fn=die_with_us(signal.SIGTERM))
        super().__init__(self.molt, label)

    @property
    def config(self) -> dict:
        return self.molt.config

    def start(self) -> "Server":
        self.molt.start(wait_live=False)
        RUNNING.append(self)
        return self

    def status(self) -> dict:
        return self.molt.status()

    def try_status(self) -> Optional[dict]:
        return self.molt.try_status()

    def workers(self) -> list[int]:
        status = self.try_status()
        if not status:
            return []
        pids = [w["pid"] for g in status["generations"] for w in g["workers"]
                if w["pid"] > 0 and g["id"] == status.get("live_generation")]
        self.seen.update(pids)
        return pids

    def wait_ready(self, count: int, timeout: float = 60.0):
        self.molt.wait_live(timeout)
        self.port = self.molt.port or 0
        super().wait_ready(count, timeout)

    def rolled(self, before_gen: int, old: set[int], n: int) -> bool:
        """molt's rollover is done when its new generation is live."""
        return self.live_generation() > before_gen

    def live_generation(self) -> int:
        status = self.try_status()
        return (status or {}).get("live_generation") or 0


class Gunicorn(Server):
    name = "gunicorn"

    def __init__(self, workdir: Path, label: str, app: str, chdir: Path, workers: int,
                 threads: int = 0, worker_class: str = "", extra: Optional[list[str]] = None):
        port = testlib.free_port()
        kind = ["-k", "gthread", "--threads", str(threads)] if threads else []
        if worker_class:
            kind = ["-k", worker_class]
        argv = ["gunicorn", *kind, "-w", str(workers), "-b", f"127.0.0.1:{port}",
                "--chdir", str(chdir), *(extra or []), app]
        super().__init__(server_process(workdir, label, argv), label, port)


class Uwsgi(Server):
    name = "uWSGI"

    def __init__(self, workdir: Path, label: str, app: str, chdir: Path, workers: int,
                 threads: int = 1, keepalive: bool = True, https: Optional[tuple] = None):
        port = testlib.free_port()
        # --http11-socket keeps every connection open, even when the request says
        # "Connection: close"; --http-socket closes after each response.
        socket_option = ["--http11-socket" if keepalive else "--http-socket", f"127.0.0.1:{port}"]
        if https:  # (cert, key): uWSGI's own TLS on the socket
            # It closes after each response whatever the request asked (no keep-alive over
            # TLS without its router); say so, as for --http-socket below.
            socket_option = ["--https-socket", f"127.0.0.1:{port},{https[0]},{https[1]}",
                             "--add-header", "Connection: close"]
        if not keepalive:
            # Say so, or wrk takes the HTTP/1.1 answer for keep-alive and counts every close
            # as a read error.
            socket_option += ["--add-header", "Connection: close"]
        argv = ["uwsgi", "--plugin", "python3", *socket_option,
                "--master", "--processes", str(workers), "--threads", str(threads),
                "--chdir", str(chdir), "--module", app, "--disable-logging"]
        # SIGTERM means "brutal reload" to uWSGI 2.0; SIGINT stops it.
        super().__init__(server_process(workdir, label, argv, signal.SIGINT), label, port)


class Uvicorn(Server):
    name = "uvicorn"

    def __init__(self, workdir: Path, label: str, app: str, chdir: Path, workers: int,
                 loop: str = "auto"):
        port = testlib.free_port()
        argv = [PYTHON, "-m", "uvicorn", "--workers", str(workers), "--host", "127.0.0.1",
                "--port", str(port), "--app-dir", str(chdir), "--no-access-log",
                "--log-level", "warning", "--loop", loop, app]
        super().__init__(server_process(workdir, label, argv), label, port)

    def is_worker(self, pid: int) -> bool:
        # multiprocessing's spawn start method may add a resource tracker process.
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                return b"resource_tracker" not in f.read()
        except OSError:
            return False


class Nginx(Server):
    """nginx as the C reference: `return 200` with the hello body, and a static directory.
    Its config is written into the section's work directory; it runs in the foreground
    (`daemon off`) as a child of this script and is stopped by its pid."""

    name = "nginx"

    def __init__(self, workdir: Path, label: str, workers: int, static_dir: Path,
                 hello: str = "Hello, world!", deferred: bool = False):
        port = testlib.free_port()
        home = workdir / label
        (home / "tmp").mkdir(parents=True, exist_ok=True)
        temp = "".join(f"    {kind}_temp_path {home / 'tmp'};\n"
                       for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
        self.conf = home / "nginx.conf"
        # Run as root, nginx's workers would switch to `nobody`, who cannot read the bench's
        # private work directory: they stay the user that runs the bench.
        user = "user root;\n" if os.geteuid() == 0 else ""
        self.conf.write_text(
            f"{user}worker_processes {workers};\n"
            "daemon off;\n"
            f"pid {home / 'nginx.pid'};\n"
            f"error_log {home / 'error.log'} warn;\n"
            "events { worker_connections 8192; }\n"
            "http {\n"
            "    access_log off;\n"
            "    sendfile on;\n"
            "    tcp_nopush on;\n"
            "    keepalive_timeout 65;\n"
            "    keepalive_requests 100000000;\n"
            f"{temp}"
            "    types { text/plain txt; application/octet-stream bin; }\n"
            "    server {\n"
            f"        listen 127.0.0.1:{port}{' deferred' if deferred else ''};\n"
            f"        location / {{ default_type text/plain; return 200 \"{hello}\"; }}\n"
            f"        location /static/ {{ alias {static_dir}/; }}\n"
            "    }\n"
            "}\n")
        argv = ["nginx", "-p", str(home), "-e", str(home / "error.log"), "-c", str(self.conf)]
        # SIGQUIT is nginx's graceful stop, SIGTERM its fast one.
        super().__init__(server_process(workdir, label, argv), label, port)
