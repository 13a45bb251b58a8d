"""The worker's lifecycle, the same for every engine: what the master sees of a worker.

    start -> warm-up -> READY=1 -> serving (heartbeats) -> drain (STOPPING=1) -> final heartbeat

The lifecycle owns the master channel, the signals, the phases and the exit code; an engine
(molt_shim/engines/base.py) owns the sockets and the app calls. Signal handlers and channel
reads only queue an event; `tick()`, called from the engine's serving loop, acts on the queue.
That keeps the handlers trivial (nothing runs inside a handler that could deadlock on a lock
the interrupted code holds) and puts every transition on one thread.
"""
from __future__ import annotations

import enum
import logging
import os
import random
import signal
import sys
import threading
import time
from collections import deque
from typing import Any, Callable, Deque, Dict, Optional, Sequence, Tuple

from . import proctitle
from .contract import Key, WorkerExit
from .engines.base import Counters, Engine
from .protocol import Channel, rss_bytes

log = logging.getLogger("molt_shim")


class Phase(enum.Enum):
    STARTING = "starting"  # engine start-up (threads, ASGI lifespan)
    WARMING_UP = "warming up"  # the warm-up request
    SERVING = "serving"  # READY sent, accepting
    DRAINING = "draining"  # STOPPING sent, finishing what is open
    STOPPED = "stopped"  # the serving loop has returned
    FAILED = "failed"  # ERROR sent, exit 5 (start-up) or 4 (warm-up)


# The only moves there are; anything else is a bug in this module.
NEXT_PHASES: Dict[Phase, Tuple[Phase, ...]] = {
    Phase.STARTING: (Phase.WARMING_UP, Phase.SERVING, Phase.FAILED),
    Phase.WARMING_UP: (Phase.SERVING, Phase.FAILED),
    Phase.SERVING: (Phase.DRAINING,),
    Phase.DRAINING: (Phase.STOPPED,),
    Phase.STOPPED: (),
    Phase.FAILED: (),
}


class Event(enum.Enum):
    """What a signal or the master asked for; queued, acted on at the next tick."""

    DRAIN = "drain"
    REOPEN_LOGS = "reopen logs"


def fail(channel: Channel, code: WorkerExit, reason: str) -> WorkerExit:
    """Boot failure: ERROR= to the master, the reason on stderr, the documented exit code."""
    reason = " ".join(reason.splitlines())[:1000]
    log.error("boot failed: %s", reason)
    channel.send(**{Key.ERROR: reason})
    sys.stderr.flush()
    return code


def heartbeat(counters: Counters) -> Dict[str, object]:
    oldest = int((time.monotonic() - counters.oldest_started) * 1000) if counters.inflight else 0
    beat: Dict[str, object] = {
        Key.WATCHDOG: 1, Key.REQUESTS: counters.requests, Key.INFLIGHT: counters.inflight,
        Key.OLDEST_MS: max(0, oldest), Key.RSS: rss_bytes()}
    if counters.durations:
        beat[Key.DURATIONS] = counters.durations
    if counters.exceptions:
        beat[Key.EXCEPTIONS] = counters.exceptions
    return beat


class Retirement:
    """recycle.max_requests (+ jitter): asks the master once for a replacement. The worker
    keeps serving; the master spawns the replacement first, then sends DRAIN."""

    def __init__(self, channel: Channel, max_requests: int, jitter: int) -> None:
        self._channel = channel
        self.at = max_requests + random.randint(0, max(0, jitter)) if max_requests > 0 else 0
        self.sent = False
        self._lock = threading.Lock()  # serving threads and the tick may both cross `at`

    def check(self, requests: int) -> None:
        """Called with the new total after requests (any thread) and at every tick."""
        if self.at and requests >= self.at and not self.sent:
            with self._lock:  # taken once per worker life, at the threshold only
                if self.sent:
                    return
                self.sent = True
            self._channel.send(**{Key.RETIRE: "max_requests"})


class SignalQueue:
    """SIGTERM and SIGUSR1 become queued events; the wake-up pipe makes the serving loop tick.

    signal.set_wakeup_fd() has the interpreter's C-level handler write to the pipe whichever
    thread the kernel interrupted, so a main thread asleep in epoll wakes at once (a Python
    handler alone would run only once that thread woke up by itself)."""

    def __init__(self, events: "Deque[Tuple[Event, str]]") -> None:
        self._events = events
        self.wake_r, self.wake_w = os.pipe()
        for fd in (self.wake_r, self.wake_w):
            os.set_blocking(fd, False)
            os.set_inheritable(fd, False)

    def install(self) -> None:
        signal.set_wakeup_fd(self.wake_w, warn_on_full_buffer=False)
        signal.signal(signal.SIGTERM,
                      lambda signum, frame: self._events.append((Event.DRAIN, "SIGTERM")))
        signal.signal(signal.SIGUSR1,
                      lambda signum, frame: self._events.append((Event.REOPEN_LOGS, "SIGUSR1")))

    def drain_pipe(self) -> None:
        try:
            while os.read(self.wake_r, 4096):
                pass
        except OSError:  # EAGAIN: empty
            pass


EXIT_RESERVE_S = 1.0  # at most this much of timeouts.graceful is kept for the way out


def drain_allowance(graceful_s: float) -> float:
    """How long a draining worker waits for its connections: timeouts.graceful, less a reserve
    (a quarter of it, at most EXIT_RESERVE_S) for what comes after: the engine's close (the
    ASGI lifespan shutdown) and hooks.worker_exit. The master sends SIGKILL at graceful from
    its DRAIN; a worker that waited all of it lost both to the kill."""
    return graceful_s - min(EXIT_RESERVE_S, graceful_s / 4)


class Lifecycle:
    """Drives one engine from start to exit; implements engines.base.LoopHooks for its loop."""

    def __init__(self, cfg: Any, channel: Channel, engine: Engine, access_log: Any,
                 retirement: Retirement, title: str, listener_names: Sequence[str],
                 before_ready: Optional[Callable[[], bool]] = None) -> None:
        self.cfg = cfg
        self.channel = channel
        self.engine = engine
        self.access_log = access_log
        self.retirement = retirement
        self.title = title
        self.listener_names = listener_names
        self.before_ready = before_ready  # False: do not serve, exit 1 (a forked worker)
        self.phase = Phase.STARTING
        self._events: Deque[Tuple[Event, str]] = deque()
        self._signals = SignalQueue(self._events)
        self._next_beat = 0.0
        self._drain_deadline = 0.0
        self._interval = cfg.heartbeat_interval_s

    # -- phases ---------------------------------------------------------------------------------
    def _enter(self, phase: Phase, why: str = "") -> None:
        """The one place the phase changes."""
        if phase not in NEXT_PHASES[self.phase]:
            raise AssertionError("lifecycle: no move from %s to %s" % (self.phase, phase))
        log.debug("lifecycle: %s -> %s%s", self.phase.value, phase.value,
                  " (%s)" % why if why else "")
        self.phase = phase

    def run(self) -> WorkerExit:
        """The whole life after the app was imported. Returns the exit code."""
        self._signals.install()
        cfg, engine = self.cfg, self.engine
        # Each boot step fails with its own exit code, so the master can say which one it was.
        error = engine.start()
        code = WorkerExit.LIFESPAN_FAILED
        if error is None and cfg.health_path:
            self._enter(Phase.WARMING_UP)
            error = engine.warm_up(cfg.health_path, cfg.health_host, cfg.timeout_s("boot"))
            code = WorkerExit.WARMUP_FAILED
        if error is not None:
            self._enter(Phase.FAILED, error)
            engine.close()
            return fail(self.channel, code, error)
        if self.before_ready is not None and not self.before_ready():
            log.error("forked worker: the master is gone (or is no subreaper); exiting")
            engine.close()
            return 1  # type: ignore[return-value]  # as any crash: nobody is there to read it
        if not self.channel.send(**{Key.READY: 1}) and self.channel.peer_closed:
            # The master closed its end before the worker was ready: it does not count this
            # worker (a zygote that died with this fork unanswered, a master gone). Serving
            # now would answer requests nobody supervises.
            log.error("the master's end of the channel is closed: exiting without serving")
            engine.close()
            return 1  # type: ignore[return-value]  # as any crash: nobody is there to read it
        self._enter(Phase.SERVING)
        log.info("ready: %s (engine %s: %s) on %s", cfg.app, engine.name, engine.describe(),
                 ", ".join(self.listener_names) or "no listeners")
        self._next_beat = time.monotonic()
        engine.run(self)
        self._enter(Phase.STOPPED)
        engine.close()
        counters = engine.counters()
        self.channel.send(**heartbeat(counters))  # the last counts: the master's totals are exact
        log.info("drained; exiting (%d requests served)", counters.requests)
        return WorkerExit.OK

    # -- engines.base.LoopHooks -----------------------------------------------------------------
    def watch_fds(self) -> Sequence[int]:
        fds = [self._signals.wake_r]
        if self.channel.fileno() >= 0:
            fds.append(self.channel.fileno())
        return fds

    def on_readable(self, fd: int) -> bool:
        if fd == self._signals.wake_r:
            self._signals.drain_pipe()
            return True
        messages = self.channel.receive()
        if messages is None:
            self._events.append((Event.DRAIN, "master channel closed"))
            return False
        for msg in messages:  # unknown keys are ignored: the master may add fields
            if msg.get(Key.DRAIN) == "1":
                self._events.append((Event.DRAIN, "DRAIN from master"))
            if msg.get(Key.REOPEN_LOGS) == "1":
                self._events.append((Event.REOPEN_LOGS, "REOPEN_LOGS from master"))
        return True

    def tick(self, now: float) -> Optional[float]:
        while self._events:
            event, why = self._events.popleft()
            if event is Event.DRAIN:
                self._begin_drain(why)
            elif self.access_log is not None:
                self.access_log.reopen()
        counters = self.engine.counters()
        self.retirement.check(counters.requests)  # engines that count only in counters()
        if now >= self._next_beat:
            self._next_beat = now + self._interval
            self.channel.send(**heartbeat(counters))
        if self.phase is Phase.DRAINING:
            if self.engine.drained():
                return None
            if now >= self._drain_deadline:
                log.warning("graceful timeout: exiting with %d connection(s) open",
                            counters.connections)
                return None
            return min(self._next_beat, self._drain_deadline) - now
        return max(0.0, self._next_beat - now)

    # -- the drain ------------------------------------------------------------------------------
    def _begin_drain(self, why: str) -> None:
        if self.phase is not Phase.SERVING:
            return
        self._drain_deadline = time.monotonic() + drain_allowance(self.cfg.timeout_s("graceful"))
        self.engine.stop_accepting()
        # From now on no new connection can reach this worker, so the rollover can be
        # reported done (`molt ctl reload --wait` returns).
        self.channel.send(**{Key.STOPPING: 1})
        self._enter(Phase.DRAINING, why)
        counters = self.engine.counters()
        log.info("draining (%s): %d connection(s), %d request(s) in flight", why,
                 counters.connections, counters.inflight)
        proctitle.set_title(self.title + " draining",
                            "molt g%d s%d drn" % (self.cfg.generation, self.cfg.worker))

