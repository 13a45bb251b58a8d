"""Helpers for the systemd suite: molt under systemd-socket-activate, and a stand-in for
systemd's notify socket that records every datagram with its sender's pid.

systemd is not PID 1 here, so nothing in this suite talks to a service manager. What molt
sees is still exactly what systemd gives a service: LISTEN_FDS/LISTEN_PID/LISTEN_FDNAMES
with the sockets at fd 3.. (from systemd-socket-activate, which execs molt in its own
process, so LISTEN_PID is molt's pid), and a NOTIFY_SOCKET datagram socket.
"""
from __future__ import annotations

import shutil
import socket
import os
import struct
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Optional

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from molt_testlib import Molt, free_port, molt_bin, wait_until  # noqa: E402,F401

SOCKET_ACTIVATE = shutil.which("systemd-socket-activate") or "/usr/bin/systemd-socket-activate"

# A WSGI app that shows what a worker's environment holds: systemd's variables must not be
# there (the master keeps them to itself).
ENV_APP = (
    "import os\n"
    "VERSION = {version!r}\n"
    "KEYS = ('NOTIFY_SOCKET', 'LISTEN_FDS', 'LISTEN_PID', 'LISTEN_FDNAMES', 'WATCHDOG_USEC',\n"
    "        'WATCHDOG_PID')\n"
    "def application(environ, start_response):\n"
    "    if environ.get('PATH_INFO') == '/env':\n"
    "        body = ';'.join('%s=%s' % (k, os.environ.get(k)) for k in KEYS)\n"
    "    else:\n"
    "        body = 'version ' + VERSION\n"
    "    data = (body + '\\n').encode()\n"
    "    start_response('200 OK', [('Content-Type', 'text/plain'),\n"
    "                              ('Content-Length', str(len(data)))])\n"
    "    return [data]\n"
)


def env_release(version: str) -> dict:
    return {"app.py": ENV_APP.format(version=version), "REVISION": version + "\n"}


def listening_tcp_ports(pid: int) -> set[int]:
    """TCP ports that process `pid` itself has listening sockets on (from /proc), so that
    "molt bound nothing" is not confused with someone else using a port."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    ports = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as f:
            next(f)
            for row in f:
                fields = row.split()
                local, state, inode = fields[1], fields[3], fields[9]
                if state == "0A" and inode in inodes:  # 0A: LISTEN
                    ports.add(int(local.rsplit(":", 1)[1], 16))
    return ports


def short_tmpdir() -> Path:
    """sun_path holds 107 bytes; pytest's tmp_path can be longer than that allows."""
    return Path(tempfile.mkdtemp(prefix="molt-sd-", dir="/tmp"))


class NotifyListener:
    """An AF_UNIX datagram socket standing in for systemd's NOTIFY_SOCKET.

    Records (monotonic time, sender pid, {KEY: VALUE}, raw text) for every datagram; the
    sender's pid comes from SCM_CREDENTIALS, as systemd reads it for NotifyAccess=main."""

    def __init__(self, path: Path):
        self.path = str(path)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        self.sock.bind(self.path)
        self.sock.settimeout(0.1)
        self.messages: list[tuple[float, int, dict, str]] = []
        self.lock = threading.Lock()
        self.running = True
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        cred_size = struct.calcsize("3i")
        while self.running:
            try:
                data, ancdata, _, _ = self.sock.recvmsg(65536, socket.CMSG_SPACE(cred_size))
            except socket.timeout:
                continue
            except OSError:
                break
            pid = -1
            for level, kind, payload in ancdata:
                if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
                    pid = struct.unpack("3i", payload[:cred_size])[0]
            text = data.decode()
            fields = {}
            for line in text.split("\n"):
                if "=" in line:
                    key, _, value = line.partition("=")
                    fields[key] = value
            with self.lock:
                self.messages.append((time.monotonic(), pid, fields, text))

    def close(self):
        self.running = False
        self.thread.join(5)
        self.sock.close()

    def all(self) -> list[tuple[float, int, dict, str]]:
        with self.lock:
            return list(self.messages)

    def state(self, start: int = 0) -> list[dict]:
        """Messages from index `start` on, without the watchdog pings."""
        return [m[2] for m in self.all()[start:] if m[2] != {"WATCHDOG": "1"}]

    def count(self) -> int:
        with self.lock:
            return len(self.messages)

    def pings(self) -> list[float]:
        return [m[0] for m in self.all() if m[2] == {"WATCHDOG": "1"}]

    def dump(self) -> str:
        return "\n".join(f"{t:.3f} pid={pid} {text!r}" for t, pid, _, text in self.all())


class SocketActivatedMolt(Molt):
    """molt started the way systemd starts a socket-activated service: systemd-socket-activate
    binds the sockets, waits for the first connection, and execs molt with LISTEN_FDS.

    `listen` are systemd-socket-activate addresses ("127.0.0.1:PORT" or a path); `fdnames`
    becomes --fdname; `setenv` entries are passed with -E (systemd-socket-activate passes
    only TERM, PATH, USER and HOME through otherwise)."""

    def __init__(self, workdir: Path, config: dict, listen: list[str],
                 fdnames: Optional[list[str]] = None, setenv: Optional[dict] = None):
        super().__init__(workdir, config)
        self.listen = listen
        self.fdnames = fdnames
        self.setenv = dict(setenv or {})

    def command(self) -> list[str]:
        cmd = [SOCKET_ACTIVATE]
        for address in self.listen:
            cmd += ["-l", address]
        if self.fdnames:
            cmd.append("--fdname=" + ":".join(self.fdnames))
        for key, value in self.setenv.items():
            cmd += ["-E", f"{key}={value}"]
        return cmd + [molt_bin(), "run", "-c", str(self.config_path)]

    def start(self, wait_live: bool = True, timeout: float = 30.0) -> "SocketActivatedMolt":
        super().start(wait_live=False)
        # systemd-socket-activate has bound the sockets once it says so; until then a
        # connection would be refused rather than queued.
        wait_until(lambda: self.log().count("Listening on ") >= len(self.listen) or
                   not self.alive(), 10, "systemd-socket-activate to listen",
                   on_timeout=self.log)
        assert self.alive(), self.log()
        return self

    def wait_exec(self, timeout: float = 10.0):
        """After the first connection the process becomes molt, with the same pid."""
        wait_until(lambda: f"master pid={self.pid} " in self.log() or not self.alive(),
                   timeout, "molt to be exec'd in place of systemd-socket-activate",
                   on_timeout=self.log)
        assert self.alive(), self.log()
