"""A small Python stand-in for the master's side of the worker protocol.

It is a protocol peer, not a mock of the shim: it owns real listening sockets, hands them to a
real `python -m molt_shim` at fds 3.., speaks the SEQPACKET channel and reads the worker's
stdout/stderr, exactly like the C++ master does.
"""
from __future__ import annotations

import http.client
import json
import os
import select
import signal
import shutil
import socket
import subprocess
import sys
import threading
import time
from typing import Any, Dict, List, Optional, Tuple

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# Waiting and clean-EOF reads are the shared helpers of every suite (tests/molt_testlib.py);
# the shim tests import them from here. read_to_eof raises on a reset or a timeout (unlike
# Client.read_all, which takes both for an end).
sys.path.insert(0, os.path.join(REPO, "tests"))
from molt_testlib import read_to_eof, wait_until  # noqa: E402,F401
SHIM_DIR = os.environ.get("MOLT_TEST_SHIM_DIR") or os.path.join(REPO, "worker_shim")
APPS_DIR = os.path.join(REPO, "tests", "apps")
PYTHON = "/usr/bin/python3"


def _native_dir() -> str:
    """lib/molt of the build tree the tests run against (ctest sets MOLT_BIN; the sanitizer
    run names its own tree with MOLT_TEST_NATIVE_DIR)."""
    if os.environ.get("MOLT_TEST_NATIVE_DIR"):
        return os.environ["MOLT_TEST_NATIVE_DIR"]
    molt_bin = os.environ.get("MOLT_BIN", "")
    if molt_bin:
        return os.path.join(os.path.dirname(os.path.dirname(molt_bin)), "lib", "molt")
    return os.path.join(REPO, "build", "lib", "molt")


# The native engine's extension (build/lib/molt/_molt_native.abi3.so): a Worker started with
# engine="native" imports it from there.
NATIVE_DIR = _native_dir()
HAVE_NATIVE = os.path.exists(os.path.join(NATIVE_DIR, "_molt_native.abi3.so"))


def io_uring_available() -> bool:
    """Whether this kernel lets this process set up an io_uring (io_uring_setup(2), one
    entry): not where it is built without it, or a seccomp filter refuses it. The ASGI hub
    then sends each held write with its own send()."""
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)
    params = ctypes.create_string_buffer(120)  # struct io_uring_params, zeroed
    fd = libc.syscall(425, 1, params)  # __NR_io_uring_setup on every Linux architecture
    if fd < 0:
        return False
    os.close(fd)
    return True


def kernel_at_least(major: int, minor: int) -> bool:
    release = os.uname().release.split(".")
    return (int(release[0]), int(release[1].split("-")[0])) >= (major, minor)


# How the ASGI hub sends what a loop iteration's writes held, and reads a kept-alive
# connection (the worker's ready: line): a multishot recv needs Linux 6.0.
HUB_SENDS = "io_uring" if io_uring_available() else "send"
HUB_READS = "io_uring" if HUB_SENDS == "io_uring" and kernel_at_least(6, 0) else "loop"

if not HAVE_NATIVE and os.environ.get("MOLT_BIN"):
    raise AssertionError("MOLT_BIN is set but %s has no _molt_native.abi3.so" % NATIVE_DIR)
# An ASan+UBSan build of the extension needs the sanitizer runtime loaded first.
NATIVE_PRELOAD = os.environ.get("MOLT_TEST_NATIVE_PRELOAD", "")
NATIVE_ENV = {"LD_PRELOAD": NATIVE_PRELOAD, "ASAN_OPTIONS": "detect_leaks=0:abort_on_error=1",
              "UBSAN_OPTIONS": "print_stacktrace=1:halt_on_error=1"} if NATIVE_PRELOAD else {}


def native_extension() -> Any:
    """_molt_native from NATIVE_DIR, loaded into this process once and put in sys.modules,
    where the shim's load_extension() finds it (the in-process contract tests)."""
    if "_molt_native" not in sys.modules:
        import importlib.util

        spec = importlib.util.spec_from_file_location(
            "_molt_native", os.path.join(NATIVE_DIR, "_molt_native.abi3.so"))
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        sys.modules["_molt_native"] = module
    return sys.modules["_molt_native"]


class Listeners:
    """The sockets the master would hold: TCP on 127.0.0.1:0 and a Unix socket.

    `tmpdir` is the caller's fresh temporary directory; it is handed over, and close()
    removes it with whatever the test put there."""

    def __init__(self, tmpdir: str, unix: bool = True) -> None:
        self.tmpdir = tmpdir
        self.tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.tcp.bind(("127.0.0.1", 0))
        self.tcp.listen(1024)
        self.port = self.tcp.getsockname()[1]
        self.socks = [self.tcp]
        self.names = ["tcp://127.0.0.1:%d" % self.port]
        self.unix_path = ""
        if unix:
            self.unix_path = os.path.join(tmpdir, "molt-test.sock")
            u = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            u.bind(self.unix_path)
            u.listen(1024)
            self.socks.append(u)
            self.names.append("unix:" + self.unix_path)

    def close(self) -> None:
        for s in self.socks:
            s.close()
        shutil.rmtree(self.tmpdir, ignore_errors=True)


class Worker:
    def __init__(self, listeners: Listeners, app: str, chdir: str = APPS_DIR,
                 interface: str = "wsgi", threads: int = 4, health_path: str = "",
                 generation: int = 1, slot: int = 0, overrides: Optional[Dict[str, Any]] = None,
                 env: Optional[Dict[str, str]] = None, pythonpath: Optional[List[str]] = None,
                 python_args: Optional[List[str]] = None, python: str = PYTHON,
                 engine: Optional[str] = None) -> None:
        self.listeners = listeners
        cfg: Dict[str, Any] = {
            "app": app, "interface": interface, "chdir": chdir, "threads": threads,
            "generation": generation, "worker": slot, "version": "v%d" % generation,
            "health_path": health_path,
            "timeouts": {"boot_ms": 20000, "graceful_ms": 15000, "heartbeat_ms": 30000,
                         "keepalive_ms": 5000, "request_ms": 0},
            "heartbeat_interval_ms": 200,
            "http": {"header_timeout_ms": 2000},
        }
        if engine is not None:  # absent: the shim's default ("auto")
            cfg["engine"] = engine
        # The native engine, and the ASGI engine's framing guard, load the extension from
        # the build tree's lib/molt (beside the molt_shim it imports from there).
        if engine == "native" or (interface == "asgi" and HAVE_NATIVE):
            pythonpath = [NATIVE_DIR] + (pythonpath or [])
            env = dict(NATIVE_ENV, **(env or {}))
        for key, value in (overrides or {}).items():
            if isinstance(value, dict) and isinstance(cfg.get(key), dict):
                cfg[key] = dict(cfg[key], **value)
            else:
                cfg[key] = value
        self.config = cfg
        self.master_end, child_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        nlisten = len(listeners.socks)
        chan_target = 3 + nlisten
        sources = [s.fileno() for s in listeners.socks] + [child_end.fileno()]
        targets = list(range(3, 3 + nlisten)) + [chan_target]

        def place_fds() -> None:
            # Move every source out of the way first, so no dup2 overwrites a later source.
            high = [os.dup(fd) for fd in sources]
            for i, fd in enumerate(high):
                os.dup2(fd, 200 + i)
            for i, target in enumerate(targets):
                os.dup2(200 + i, target)

        child_env = {k: v for k, v in os.environ.items() if not k.startswith("MOLT_")}
        child_env.update({
            "PYTHONPATH": os.pathsep.join((pythonpath or []) + [SHIM_DIR]),
            "MOLT_CHANNEL_FD": str(chan_target),
            "MOLT_LISTEN_FDS": ",".join(str(t) for t in targets[:-1]),
            "MOLT_LISTEN_NAMES": ",".join(listeners.names),
            "MOLT_GENERATION": str(generation),
            "MOLT_WORKER": str(slot),
            "MOLT_WORKER_CONFIG": json.dumps(cfg),
            "PYTHONUNBUFFERED": "1",
        })
        child_env.update(env or {})
        self.proc = subprocess.Popen(
            [python] + (python_args or ["-m", "molt_shim"]), stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=child_env,
            pass_fds=targets, preexec_fn=place_fds, cwd="/")
        child_end.close()
        self.pid = self.proc.pid
        self.messages: List[Dict[str, str]] = []
        self.stdout: List[str] = []
        self.stderr: List[str] = []
        self.channel_eof = False
        self._cv = threading.Condition()
        self._threads = [
            threading.Thread(target=self._read_channel, daemon=True),
            threading.Thread(target=self._read_lines, args=(self.proc.stdout, self.stdout), daemon=True),
            threading.Thread(target=self._read_lines, args=(self.proc.stderr, self.stderr), daemon=True),
        ]
        for t in self._threads:
            t.start()

    # -- reading the worker -----------------------------------------------------------------
    def _read_channel(self) -> None:
        while True:
            try:
                packet = self.master_end.recv(65536)
            except OSError:
                packet = b""
            if not packet:
                with self._cv:
                    self.channel_eof = True
                    self._cv.notify_all()
                return
            msg: Dict[str, str] = {}
            for line in packet.decode("utf-8", "replace").split("\n"):
                key, _, value = line.partition("=")
                msg[key] = value
            with self._cv:
                self.messages.append(msg)
                self._cv.notify_all()

    def _read_lines(self, stream: Any, sink: List[str]) -> None:
        for raw in iter(stream.readline, b""):
            sink.append(raw.decode("utf-8", "replace").rstrip("\n"))

    def find(self, key: str) -> List[Dict[str, str]]:
        with self._cv:
            return [m for m in self.messages if key in m]

    def wait_message(self, key: str, timeout: float = 20.0) -> Dict[str, str]:
        deadline = time.monotonic() + timeout
        with self._cv:
            while True:
                for m in self.messages:
                    if key in m:
                        return m
                if self.channel_eof or time.monotonic() >= deadline:
                    raise AssertionError("no %s message from worker (exit=%s); stderr:\n%s"
                                         % (key, self.proc.poll(), self.stderr_text()))
                self._cv.wait(min(0.1, max(0.0, deadline - time.monotonic())))

    def wait_ready(self, timeout: float = 30.0) -> "Worker":
        self.wait_message("READY", timeout)
        return self

    # -- talking to the worker --------------------------------------------------------------
    def send(self, text: str) -> None:
        self.master_end.send(text.encode())

    def drain(self) -> None:
        self.send("DRAIN=1")

    def close_channel(self) -> None:
        self.master_end.shutdown(socket.SHUT_RDWR)

    def signal(self, sig: int) -> None:
        if self.proc.poll() is None:
            os.kill(self.pid, sig)

    def wait_exit(self, timeout: float = 20.0) -> int:
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError("worker %d did not exit within %.1fs; stderr:\n%s"
                                 % (self.pid, timeout, self.stderr_text()))
        for t in self._threads[1:]:
            t.join(5)  # collect the last output lines
        return code

    def stderr_text(self) -> str:
        return "\n".join(self.stderr)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self) -> None:
        """Cleanup: SIGKILL our own child by pid if it is still there."""
        if self.proc.poll() is None:
            os.kill(self.pid, signal.SIGKILL)
            self.proc.wait(10)
        self.master_end.close()


# The servers a table of HTTP behaviour runs on (the limits, the timeouts, slow readers):
# "wsgi-" and each WSGI engine, "asgi-" and each ASGI parser ("asgi" alone: the native parser
# and the extension's own TCP I/O when the extension is built, httptools and the loop's
# transports without it; the other parsers run on the loop's transports, as a worker without
# the extension does).
SERVERS = (["wsgi-python"] + (["wsgi-native"] if HAVE_NATIVE else []) + ["asgi"]
           + (["asgi-httptools"] if HAVE_NATIVE else []) + ["asgi-h11"])
SERVER_APPS = {"wsgi": "edge_app:application", "asgi": "asgi_app:app"}


def server_worker(variant: str, listeners: Listeners, **kwargs: Any) -> Worker:
    """A Worker (not waited for) for one of SERVERS, on the edge app or the ASGI app;
    `kwargs` as Worker's. It knows its `variant`."""
    interface, _, which = variant.partition("-")
    if interface == "wsgi":
        w = Worker(listeners, SERVER_APPS["wsgi"], engine=which, **kwargs)
    else:
        env = dict(kwargs.pop("env", None) or {},
                   **({"MOLT_SHIM_PARSER": which, "MOLT_SHIM_IO": "loop"} if which else {}))
        w = Worker(listeners, SERVER_APPS["asgi"], interface="asgi", env=env or None, **kwargs)
    w.variant = variant
    return w


# -- HTTP client helpers ---------------------------------------------------------------------
class _NoClose:
    """A shared buffered reader that http.client cannot close between responses."""

    def __init__(self, f: Any) -> None:
        self._f = f

    def makefile(self, *args: Any, **kwargs: Any) -> "_NoClose":
        return self

    def close(self) -> None:
        pass

    def __getattr__(self, name: str) -> Any:
        return getattr(self._f, name)


class Client:
    """One raw connection; reads responses with http.client's parser from a shared buffer."""

    def __init__(self, port: int = 0, unix_path: str = "", timeout: float = 10.0) -> None:
        if unix_path:
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self.sock.settimeout(timeout)
            self.sock.connect(unix_path)
        else:
            self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.reader = _NoClose(self.sock.makefile("rb"))

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def response(self, method: str = "GET") -> Tuple[int, http.client.HTTPMessage, bytes]:
        r = http.client.HTTPResponse(self.reader, method=method)  # type: ignore[arg-type]
        r.begin()
        body = r.read()
        return r.status, r.msg, body

    def request(self, path: str = "/", method: str = "GET", headers: str = "",
                body: bytes = b"") -> Tuple[int, http.client.HTTPMessage, bytes]:
        extra = "Content-Length: %d\r\n" % len(body) if body else ""
        self.send(("%s %s HTTP/1.1\r\nHost: test\r\n%s%s\r\n" % (method, path, headers, extra))
                  .encode() + body)
        return self.response(method)

    def read_all(self, timeout: float = 10.0) -> bytes:
        """Everything until EOF (bounded)."""
        self.sock.settimeout(timeout)
        chunks = []
        while True:
            try:
                data = self.reader.read1(65536)
            except (ConnectionResetError, socket.timeout):
                break
            if not data:
                break
            chunks.append(data)
        return b"".join(chunks)

    def close(self) -> None:
        self.reader._f.close()  # the makefile() holds the fd open until it is closed too
        self.sock.close()


def get(port: int, path: str = "/", timeout: float = 10.0) -> Tuple[int, bytes]:
    c = Client(port, timeout=timeout)
    try:
        status, _, body = c.request(path, headers="Connection: close\r\n")
        return status, body
    finally:
        c.close()


def raw_exchange(port: int, data: bytes, timeout: float = 10.0) -> bytes:
    """Send raw bytes and read until the server closes (bounded)."""
    c = Client(port, timeout=timeout)
    try:
        c.send(data)
        return c.read_all(timeout)
    finally:
        c.close()


def early_answer_to_expect_continue(port: int, path: str) -> tuple:
    """An HTTP/1.0 POST of 5 bytes with `Expect: 100-continue`, the body sent only after a
    second: what the server sent before the body, then the rest of its answer (until it
    closes)."""
    c = Client(port)
    try:
        c.send(("POST %s HTTP/1.0\r\nExpect: 100-continue\r\nContent-Length: 5\r\n\r\n"
                % path).encode())
        c.sock.settimeout(1.0)
        try:
            early = c.sock.recv(100)
        except socket.timeout:
            early = b""
        c.send(b"hello")
        return early, c.read_all(5)
    finally:
        c.close()


def closed_while_dribbling(port: int, data: bytes, pace: float = 0.3) -> bool:
    """Send `data` a byte every `pace` seconds (all but its last byte, so it never completes);
    whether the server closed the connection (EOF or a reset) before the bytes ran out."""
    s = socket.create_connection(("127.0.0.1", port))
    try:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for i in range(len(data) - 1):
            try:
                s.sendall(data[i:i + 1])
            except OSError:  # reset
                return True
            if select.select([s], [], [], pace)[0]:  # the close is readable
                try:
                    return s.recv(100) == b""
                except OSError:
                    return True
        return False
    finally:
        s.close()


class LoadPool:
    """Keep-alive clients hammering the shared listener for a bounded time."""

    def __init__(self, port, clients=16, seconds=30.0, expect=b"hello"):
        self.port = port
        self.expect = expect
        self.stop_at = time.monotonic() + seconds
        self.stopped = threading.Event()
        self.ok = 0
        self.errors = []
        self.closes_seen = 0
        self.lock = threading.Lock()
        self.threads = [threading.Thread(target=self.run, daemon=True) for _ in range(clients)]
        for t in self.threads:
            t.start()

    def run(self):
        c = None
        while not self.stopped.is_set() and time.monotonic() < self.stop_at:
            try:
                if c is None:
                    c = Client(self.port, timeout=10)
                status, headers, body = c.request("/")
                if status != 200 or body != self.expect:
                    raise AssertionError("bad response %s %r" % (status, body[:50]))
                with self.lock:
                    self.ok += 1
                if (headers["Connection"] or "").lower() == "close":
                    with self.lock:
                        self.closes_seen += 1
                    c.close()
                    c = None
            except Exception as exc:  # every client-visible failure counts
                with self.lock:
                    self.errors.append(repr(exc))
                if c is not None:
                    c.close()
                c = None
        if c is not None:
            c.close()

    def finish(self):
        self.stopped.set()
        for t in self.threads:
            t.join(15)
