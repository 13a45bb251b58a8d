"""Worker configuration: MOLT_* environment plus the MOLT_WORKER_CONFIG JSON.

The master owns validation; the shim is lenient: every missing key takes its default, so an
older master (or a hand-written test harness) can start a newer shim.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Mapping

from .contract import Env
from .forwarded import DEFAULT_HEADERS

DEFAULT_ACCESS_LOG_FORMAT = (
    '{remote} "{method} {path} {protocol}" {status} {bytes} {duration_ms}ms '
    "gen={generation} worker={worker}"
)

DEFAULTS: Dict[str, Any] = {
    "app": "",
    "interface": "wsgi",
    "engine": "auto",  # the WSGI engine: "auto" | "python" | "native" (engines/__init__.py)
    "lifespan": "auto",  # the ASGI lifespan protocol: "auto" | "on" | "off" (uvicorn's meaning)
    "preload": "auto",  # "auto" | "true" | "false": the zygote (zygote.py) forks the workers
    "hooks": {"post_fork": "", "worker_exit": ""},  # "module:function", or "" for none
    "root_path": "",  # SCRIPT_NAME for WSGI, the scope's root_path for ASGI
    "asgi": {  # uvicorn's settings, uvicorn's defaults
        "loop": "auto",  # "auto" (uvloop when importable) | "asyncio" | "uvloop"
        "limit_concurrency": 0,  # 0: no limit
        "ws_max_size": 16 * 1024 * 1024,
        "ws_ping_interval_ms": 20000,
        "ws_ping_timeout_ms": 20000,
        "ws_per_message_deflate": True,
        "server_header": False,  # uvicorn's --server-header (it defaults to on; molt to off)
        "date_header": True,
    },
    "proxy": {"trusted": [], "headers": list(DEFAULT_HEADERS)},
    "chdir": "",
    "static": [],  # [{"prefix": "/static/", "dir": "..."}]: served by the engine (static.py)
    "threads": 8,
    # The accept board's hot workers: 0 all (what a master without the key meant), N, or -1
    # (auto), which resolve_accepting_workers() turns into a number before the app's import.
    "accepting_workers": 0,
    "generation": 0,
    "worker": 0,
    "version": "",
    "health_path": "",
    "health_host": "localhost",
    "health_headers": {},
    "timeouts": {
        "boot_ms": 60000,
        "graceful_ms": 30000,
        "heartbeat_ms": 30000,
        "keepalive_ms": 5000,
        "request_ms": 0,
    },
    "heartbeat_interval_ms": 5000,
    "recycle": {"max_requests": 0, "max_requests_jitter": 0},
    "http": {
        "max_request_line": 8192,
        "max_header_size": 65536,
        "max_headers": 100,
        "max_body_size": 0,
        "body_buffer_size": 1048576,
        "header_timeout_ms": 10000,
        "send_timeout_ms": 30000,
        "version_header": "",
    },
    # Per-request metrics (the duration histogram, status classes, exceptions): on when the
    # master serves metrics (metrics.listen), so a worker counts only what someone can read.
    "metrics": {"requests": False},
    "logging": {"level": "info", "format": "text", "access_log": False,
                "access_log_format": DEFAULT_ACCESS_LOG_FORMAT, "access_log_file": ""},
}


def _merge(defaults: Mapping[str, Any], given: Mapping[str, Any]) -> Dict[str, Any]:
    """Recursively overlay `given` on `defaults`; unknown keys are kept (forward compatible)."""
    out: Dict[str, Any] = dict(defaults)
    for key, value in given.items():
        if isinstance(value, Mapping) and isinstance(defaults.get(key), Mapping):
            out[key] = _merge(defaults[key], value)
        elif value is not None:
            out[key] = value
    return out


@dataclass
class WorkerConfig:
    raw: Dict[str, Any]
    channel_fd: int = -1
    listen_fds: List[int] = field(default_factory=list)
    listen_names: List[str] = field(default_factory=list)
    label_names: Dict[str, str] = field(default_factory=dict)  # listener label -> its name
    # The generation's TLS session-ticket keys (Env.TLS_TICKET_KEYS; 80 bytes), or b"".
    tls_ticket_keys: bytes = b""
    accept_board_fd: int = -1  # Env.ACCEPT_BOARD_FD, or -1

    # Typed accessors for the values used on hot paths or in several modules.
    @property
    def app(self) -> str:
        return str(self.raw["app"])

    @property
    def interface(self) -> str:
        return str(self.raw["interface"]).lower()

    @property
    def engine(self) -> str:
        return str(self.raw["engine"] or "auto").lower()

    @property
    def lifespan(self) -> str:
        value = str(self.raw["lifespan"] or "auto").lower()
        return value if value in ("auto", "on", "off") else "auto"

    @property
    def preload(self) -> str:
        value = str(self.raw["preload"]).lower()
        return value if value in ("auto", "true", "false") else "auto"

    def hook(self, name: str) -> str:
        return str(self.raw["hooks"].get(name) or "")

    @property
    def root_path(self) -> str:
        """The mount prefix (SCRIPT_NAME / root_path): the config's `root_path`, else a
        SCRIPT_NAME from the worker's environment (how it was set before the key existed)."""
        return str(self.raw["root_path"] or os.environ.get("SCRIPT_NAME", "")).rstrip("/")

    @property
    def asgi(self) -> Dict[str, Any]:
        return self.raw["asgi"]

    @property
    def proxy(self) -> Any:
        """The trusted-proxy rule (forwarded.ProxyRule), or None when no peer is trusted."""
        from . import forwarded

        return forwarded.from_config(self.raw)

    def listener_options(self, name: str) -> Dict[str, Any]:
        """Per-listener settings (`proxy_protocol`, `tls`), by the listener's name or the
        label the engines know it by."""
        listeners = self.raw.get("listeners") or {}
        options = listeners.get(self.label_names.get(name, name)) or listeners.get(name) or {}
        return options if isinstance(options, dict) else {}

    def proxy_protocol(self, name: str) -> bool:
        return bool(self.listener_options(name).get("proxy_protocol"))

    @property
    def chdir(self) -> str:
        return str(self.raw["chdir"] or "")

    @property
    def static(self) -> List[Dict[str, Any]]:
        return list(self.raw.get("static") or [])

    @property
    def threads(self) -> int:
        return max(1, int(self.raw["threads"]))

    @property
    def accepting_workers(self) -> int:
        return int(self.raw["accepting_workers"])

    def resolve_accepting_workers(self, usable_cpus: Callable[[], int]) -> None:
        """`accepting_workers: auto` (-1) made a number, once, before the app is imported (an
        import may pin its thread to one CPU: OpenMP, MKL) and before the zygote forks (every
        worker then counts the same): on the ASGI engine one per CPU (usable_cpus(), the
        extension's: the affinity capped by a cgroup quota); on the WSGI engines 0, every
        worker (a threaded worker's concurrency is its threads, and its kept-alive connections
        wait for them: concentrating them would halve what a blocking app serves)."""
        if self.accepting_workers != -1:
            return
        self.raw["accepting_workers"] = usable_cpus() if self.interface == "asgi" else 0

    @property
    def generation(self) -> int:
        return int(self.raw["generation"])

    @property
    def worker(self) -> int:
        return int(self.raw["worker"])

    @property
    def version(self) -> str:
        return str(self.raw["version"] or "")

    @property
    def health_path(self) -> str:
        return str(self.raw["health_path"] or "")

    @property
    def request_metrics(self) -> bool:
        return bool(self.raw["metrics"]["requests"])

    @property
    def health_headers(self) -> Dict[str, str]:
        return {str(k): str(v) for k, v in dict(self.raw["health_headers"] or {}).items()}

    @property
    def health_host(self) -> str:
        return str(self.raw["health_host"] or "localhost")

    def timeout_s(self, name: str) -> float:
        return float(self.raw["timeouts"][name + "_ms"]) / 1000.0

    @property
    def heartbeat_interval_s(self) -> float:
        return max(0.05, float(self.raw["heartbeat_interval_ms"]) / 1000.0)

    @property
    def http(self) -> Dict[str, Any]:
        return self.raw["http"]

    @property
    def header_timeout_s(self) -> float:
        return max(0.05, float(self.http["header_timeout_ms"]) / 1000.0)

    @property
    def send_timeout_s(self) -> float:
        """http.send_timeout: the longest a response waits for its client to take more bytes."""
        return max(0.05, float(self.http["send_timeout_ms"]) / 1000.0)

    @property
    def max_requests(self) -> int:
        return int(self.raw["recycle"]["max_requests"] or 0)

    @property
    def max_requests_jitter(self) -> int:
        return int(self.raw["recycle"]["max_requests_jitter"] or 0)

    @property
    def log_level(self) -> str:
        return str(self.raw["logging"]["level"] or "info").upper()

    @property
    def access_log(self) -> bool:
        return bool(self.raw["logging"]["access_log"])

    @property
    def log_format(self) -> str:
        return str(self.raw["logging"]["format"] or "text")

    @property
    def access_log_file(self) -> str:
        return str(self.raw["logging"]["access_log_file"] or "")

    @property
    def access_log_format(self) -> str:
        return str(self.raw["logging"]["access_log_format"] or DEFAULT_ACCESS_LOG_FORMAT)

    @property
    def version_header(self) -> str:
        return str(self.http.get("version_header") or "")

    @property
    def version_header_line(self) -> str:
        """The version header as a raw response line ("Name: value\\r\\n"), or ""."""
        return "%s: %s\r\n" % (self.version_header, self.version) if self.version_header else ""

    @property
    def drain_idle_s(self) -> float:
        """Idle window after which a draining worker closes a keep-alive connection."""
        return max(0.05, min(self.timeout_s("keepalive"), 1.0))


def _int_list(text: str) -> List[int]:
    return [int(part) for part in text.split(",") if part.strip()]


TICKET_KEY_BYTES = 80  # OpenSSL's session-ticket key layout: name 16, HMAC 32, AES 32


def load(environ: Mapping[str, str]) -> WorkerConfig:
    raw_json = environ.get(Env.WORKER_CONFIG, "") or "{}"
    given = json.loads(raw_json)
    if not isinstance(given, dict):
        raise ValueError("%s is not a JSON object" % Env.WORKER_CONFIG)
    raw = _merge(DEFAULTS, given)
    # The separate env variables win for identity: they are what the master logs.
    if environ.get(Env.GENERATION):
        raw["generation"] = int(environ[Env.GENERATION])
    if environ.get(Env.WORKER):
        raw["worker"] = int(environ[Env.WORKER])
    fds = _int_list(environ.get(Env.LISTEN_FDS, ""))
    names = [n for n in environ.get(Env.LISTEN_NAMES, "").split(",")]
    names = (names + [""] * len(fds))[: len(fds)]
    channel = environ.get(Env.CHANNEL_FD, "")
    try:
        ticket_keys = bytes.fromhex(environ.get(Env.TLS_TICKET_KEYS, ""))
    except ValueError:
        ticket_keys = b"?"  # reported below with the wrong length
    if len(ticket_keys) not in (0, TICKET_KEY_BYTES):
        raise ValueError("%s must be %d hex digits" % (Env.TLS_TICKET_KEYS, 2 * TICKET_KEY_BYTES))
    board = environ.get(Env.ACCEPT_BOARD_FD, "")
    return WorkerConfig(raw=raw, channel_fd=int(channel) if channel else -1,
                        listen_fds=fds, listen_names=names, tls_ticket_keys=ticket_keys,
                        accept_board_fd=int(board) if board.isdigit() else -1)
