"""The engine interface: what the lifecycle (molt_shim/lifecycle.py) asks of an HTTP engine.

An engine serves HTTP for one imported app on the inherited listeners. The lifecycle owns
everything the master sees: READY, heartbeats, RETIRE, signals, the drain (STOPPING), the final
heartbeat and the exit code. An engine owns sockets, threads or an event loop, and the app calls.

Every method below is called on the lifecycle's thread (the process's main thread), in this
order, each at most once except where said:

    start() -> warm_up() [only with health_path] -> describe() -> run(loop) -> close()

`run()` owns the main thread while serving. From inside `run()` the engine calls the loop
hooks (`LoopHooks`); the lifecycle calls `stop_accepting()`, `counters()` and `drained()` only
from inside `loop.tick()`, so on the same thread that runs the engine's loop: an engine needs
no lock against the lifecycle. `counters()` is also called once after `close()` returned (the
final heartbeat), so it must answer from what it last saw.

Signal handlers never call an engine: they queue, and the lifecycle acts at the next tick.
"""
from __future__ import annotations

import socket
from dataclasses import dataclass
from typing import Any, Callable, List, Optional, Sequence, Tuple

try:
    from typing import Protocol
except ImportError:  # Python 3.7: the interface is documentation only there
    Protocol = object  # type: ignore[assignment]


@dataclass(frozen=True)
class Counters:
    """What a heartbeat reports, as the engine sees it now."""

    requests: int  # finished HTTP requests since READY (the warm-up request is not counted)
    inflight: int  # requests whose app has not returned yet
    oldest_started: float  # time.monotonic() at which the oldest in-flight one started
    connections: int  # open client connections (for the drain's log line)
    # molt_shim.request_metrics: the DURATIONS= value and the app exceptions, cumulative;
    # empty and 0 when the engine does not count them (metrics off).
    durations: str = ""
    exceptions: int = 0


@dataclass
class EngineContext:
    """What an engine is built from. Everything here exists before the engine does."""

    app: Any  # the imported WSGI or ASGI callable
    cfg: Any  # molt_shim.config.WorkerConfig
    listeners: List[Tuple[socket.socket, str]]  # inherited listening sockets with their labels
    access_log: Any  # molt_shim.accesslog.AccessLog, or None when the access log is off
    # Called with the new total after every finished request by engines that count per
    # request (the lifecycle sends RETIRE=max_requests from it at once). An engine that only
    # counts in counters() may ignore it: the lifecycle also checks at every tick.
    on_request_count: Callable[[int], None]


class LoopHooks(Protocol):
    """What the lifecycle offers the engine's serving loop (implemented by lifecycle.Lifecycle).

    The engine's loop must watch `watch_fds()` for readability, call `on_readable(fd)` when one
    is readable, and call `tick(now)` after every wake-up and at least as often as the delay it
    returned. That is all an engine needs to do for heartbeats, the master channel and signals.
    """

    def watch_fds(self) -> Sequence[int]:
        """The descriptors to watch, fixed for the whole run: the master channel (when there
        is one) and the lifecycle's wake-up pipe (signals write to it)."""
        ...

    def on_readable(self, fd: int) -> bool:
        """Read what is there and queue it (this never acts). False: stop watching this fd for
        good (the master closed the channel; EOF would stay readable)."""
        ...

    def tick(self, now: float) -> Optional[float]:
        """Act on what was queued: begin the drain (which calls stop_accepting()), send a due
        heartbeat, check whether the drain is done. Returns the longest the loop may wait
        before the next tick (seconds), or None: stop serving now, return from run()."""
        ...


class Engine(Protocol):
    """One HTTP engine. See the module docstring for the call order and threads."""

    # The MOLT_WORKER_CONFIG `engine` value this implements ("python", "native"), or the
    # interface's engine name ("uvicorn"); used in log lines.
    name: str

    def start(self) -> Optional[str]:
        """Get ready to serve: serving threads, event loop, ASGI lifespan startup. Listeners
        are not accepted from yet. None, or a one-line reason the app's own start-up (the ASGI
        lifespan startup) failed: exit 5, WorkerExit.LIFESPAN_FAILED."""
        ...

    def warm_up(self, path: str, host: str, timeout_s: float) -> Optional[str]:
        """Serve `GET path` (Host: host) through the engine's real request path, without
        counting it. None when it answered 2xx within timeout_s, else the one-line ERROR= text
        (see molt_shim.warmup.verdict)."""
        ...

    def describe(self) -> str:
        """A few words for the `ready:` log line, e.g. "wsgi, 8 threads, parser httptools"."""
        ...

    def run(self, loop: LoopHooks) -> None:
        """Accept on the listeners and serve until loop.tick() returns None."""
        ...

    def stop_accepting(self) -> None:
        """The drain begins (called once, from inside tick()): stop accepting at once, take
        what is already queued for this worker (bounded), close our listener descriptors (never
        shutdown() a shared listener), answer further requests on open connections with
        `Connection: close` and close idle keep-alive connections after
        cfg.drain_idle_s. When this returns, no new connection can reach this worker."""
        ...

    def counters(self) -> Counters:
        """The counts for heartbeats and the RETIRE check: called at every tick (keep it cheap),
        and once after close()."""
        ...

    def drained(self) -> bool:
        """While draining: True when no connection is open and no request is in flight (the
        lifecycle then stops the loop; it also stops it at the graceful deadline)."""
        ...

    def close(self) -> None:
        """After run() returned, or after start()/warm_up() failed: stop serving threads,
        close what is left, run the ASGI lifespan shutdown. Called once."""
        ...


# An engine module exposes one factory of this type (see molt_shim/engines/__init__.py).
EngineFactory = Callable[[EngineContext], Engine]
