"""The zygote (`preload:`): imports the release once, then only forks the generation's workers.

    import the app -> look for what is unsafe to fork -> gc.freeze() -> READY=1
    -> on FORK=<id> (SLOT=, the worker's channel + stdout + stderr as SCM_RIGHTS):
       fork an intermediate, which forks the worker, reports FORKED=<id> PID=<pid> and exits

The master is the workers' parent and their only reaper: it is PR_SET_CHILD_SUBREAPER, so the
worker, orphaned when the intermediate exits, is re-parented to the master, never to the
zygote (docs/architecture.md, "Zygote", says why a double fork rather than CLONE_PARENT). The
zygote runs no thread and no event loop: each worker starts its own after the fork, in
serve(), exactly as a worker that imported the app itself.
"""
from __future__ import annotations

import array
import atexit
import ctypes
import gc
import logging
import os
import signal
import socket
import sys
import threading
import time
import traceback
from typing import Any, Callable, List, Optional, Tuple

from . import config, proctitle
from .contract import Env, Key, WorkerExit
from .lifecycle import fail
from .protocol import MAX_PACKET, Channel, decode, one_line

log = logging.getLogger("molt_shim")

PR_SET_PDEATHSIG = 1
FDS_PER_FORK = 3  # the worker's channel, stdout, stderr


def fork_hazards(cfg: config.WorkerConfig) -> List[str]:
    """What the import left behind that a fork would copy half-alive: threads (a fork keeps
    only the calling one, holding whatever locks the others held), sockets and event loops
    (every worker would share one connection or one epoll set). Android's zygote checks its
    fds against an allow-list before every fork for the same reason."""
    found: List[str] = []
    others = [t for t in threading.enumerate() if t is not threading.main_thread()]
    if others:
        found.append("%d thread(s) running (%s)" % (
            len(others), ", ".join(sorted(t.name for t in others))))
    try:
        tasks = len(os.listdir("/proc/self/task"))
    except OSError:
        tasks = 1
    native = tasks - 1 - len([t for t in others if t.is_alive()])
    if native > 0:
        found.append("%d thread(s) not started from Python (a C extension's)" % native)
    allowed = set(cfg.listen_fds) | {0, 1, 2, cfg.channel_fd}
    try:
        fds = sorted(int(name) for name in os.listdir("/proc/self/fd"))
    except OSError:
        fds = []
    for fd in fds:
        if fd in allowed:
            continue
        try:
            target = os.readlink("/proc/self/fd/%d" % fd)
        except OSError:
            continue  # the directory listing's own fd, already closed
        if target.startswith("socket:"):
            found.append("an open socket (fd %d: %s)" % (fd, describe_socket(fd)))
        elif target in ("anon_inode:[eventpoll]", "anon_inode:[eventfd]"):
            found.append("an event loop or its wake-up fd (fd %d: %s)" % (fd, target[11:-1]))
    return found


def describe_socket(fd: int) -> str:
    try:
        sock = socket.socket(fileno=os.dup(fd))
    except OSError as exc:
        return str(exc)
    try:
        kind = {socket.AF_INET: "tcp", socket.AF_INET6: "tcp6", socket.AF_UNIX: "unix"}.get(
            sock.family, str(sock.family))
        if sock.type == socket.SOCK_DGRAM:
            kind = kind.replace("tcp", "udp")
        parts = [kind]
        for name, get in (("local", sock.getsockname), ("peer", sock.getpeername)):
            try:
                address = get()
            except OSError:
                continue
            if address:
                parts.append("%s %s" % (name, address))
        return " ".join(parts)
    finally:
        sock.close()


def run(cfg: config.WorkerConfig, channel: Channel, import_app: Callable[[], Any],
        become_worker: Callable[[Any, config.WorkerConfig, Channel], int]) -> int:
    """The zygote's whole life. `become_worker(app, cfg, channel)` is serve() for one worker."""
    proctitle.set_title("molt: zygote gen=%d" % cfg.generation, "molt g%d zygote" % cfg.generation)
    master = os.getppid()
    # ctypes is loaded before the first fork: each worker would otherwise pay for it.
    libc = ctypes.CDLL(None, use_errno=True)
    started = time.monotonic()
    try:
        app = import_app()
    except BaseException as exc:  # SystemExit from an app module counts as a failed import too
        traceback.print_exc(file=sys.stderr)
        return fail(channel, WorkerExit.IMPORT_FAILED,
                    "%s (importing %s)" % (one_line(exc), cfg.app))
    import_what_warm_up_needs()
    hazards = fork_hazards(cfg)
    if hazards:
        why = "the import of %s left %s" % (cfg.app, "; ".join(hazards))
        if cfg.preload == "auto":
            log.warning("preload: auto: not forking from a process where %s; every worker "
                        "imports the app itself (preload: true forks anyway)", why)
            channel.send(**{Key.PRELOAD_REFUSED: why})
            return WorkerExit.OK
        log.warning("preload: true: forking although %s; hooks.post_fork must replace them",
                    why)
    # Keep the collector off the shared pages: objects that exist now are never traversed
    # again, so a worker's collections do not dirty (and un-share) them.
    gc.collect()
    gc.freeze()
    log.info("zygote: imported %s in %.0f ms; forking workers", cfg.app,
             (time.monotonic() - started) * 1000)
    channel.send(**{Key.READY: 1})
    return serve_forks(cfg, channel, master, libc, lambda c, ch: become_worker(app, c, ch))


def import_what_warm_up_needs() -> None:
    """Django imports the URLconf, and through it every views module, on the first request:
    the zygote does it once, so the workers share those modules too. A failure is left to
    each worker's warm-up request, which reports it exactly as without preload."""
    if "django" not in sys.modules:
        return
    try:
        from django.conf import settings  # type: ignore

        if settings.configured:
            from django.urls import get_resolver  # type: ignore

            get_resolver().url_patterns
    except Exception as exc:
        log.debug("zygote: the URLconf did not import (%s); the warm-up will say why",
                  one_line(exc))


def receive(sock: socket.socket) -> Optional[Tuple[bytes, List[int]]]:
    """One packet and the fds attached to it; None once the master is gone."""
    fds = array.array("i")
    try:
        data, ancdata, _flags, _addr = sock.recvmsg(
            MAX_PACKET, socket.CMSG_SPACE(FDS_PER_FORK * fds.itemsize))
    except OSError:
        return None
    for level, kind, payload in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(payload[: len(payload) - (len(payload) % fds.itemsize)])
    if not data:
        for fd in fds:
            os.close(fd)
        return None
    return data, list(fds)


def serve_forks(cfg: config.WorkerConfig, channel: Channel, master: int, libc: Any,
                become_worker: Callable[[config.WorkerConfig, Channel], int]) -> int:
    sock = channel.sock
    if sock is None:
        return WorkerExit.OK
    sock.setblocking(True)
    while True:
        got = receive(sock)
        if got is None:
            return WorkerExit.OK  # the master is gone: so is the generation
        data, fds = got
        message = decode(data)
        request = message.get(Key.FORK, "")
        try:
            if not request:
                continue
            if len(fds) != FDS_PER_FORK:
                channel.send(**{Key.FORKED: request,
                                Key.FORK_ERROR: "expected %d fds, got %d" % (FDS_PER_FORK, len(fds))})
                continue
            slot = int(message.get(Key.SLOT, "0") or 0)
            fork_worker(cfg, channel, master, libc, request, slot, fds, become_worker)
        finally:
            for fd in fds:
                os.close(fd)


def fork_worker(cfg: config.WorkerConfig, channel: Channel, master: int, libc: Any,
                request: str, slot: int, fds: List[int],
                become_worker: Callable[[config.WorkerConfig, Channel], int]) -> None:
    for stream in (sys.stdout, sys.stderr):  # nothing buffered may be written twice
        stream.flush()
    try:
        intermediate = os.fork()
    except OSError as exc:
        channel.send(**{Key.FORKED: request, Key.FORK_ERROR: "fork() failed: %s" % exc.strerror})
        return
    if intermediate == 0:
        # The intermediate: fork the worker, say its pid, exit at once so that it is
        # re-parented to the master (the subreaper).
        code = 0
        try:
            pid = os.fork()
            if pid == 0:
                try:
                    code = worker_main(cfg, channel, master, libc, slot, fds, become_worker)
                except BaseException:
                    traceback.print_exc(file=sys.stderr)
                    code = 1
                try:
                    atexit._run_exitfuncs()  # what finish_process() does for any worker
                except Exception:
                    pass
            else:
                channel.send(**{Key.FORKED: request, Key.PID: pid})
        except OSError as exc:
            channel.send(**{Key.FORKED: request,
                            Key.FORK_ERROR: "fork() failed: %s" % exc.strerror})
        finally:
            for stream in (sys.stdout, sys.stderr):
                try:
                    stream.flush()
                except Exception:
                    pass
            os._exit(code)
    os.waitpid(intermediate, 0)


def worker_main(cfg: config.WorkerConfig, channel: Channel, master: int, libc: Any, slot: int,
                fds: List[int], become_worker: Callable[[config.WorkerConfig, Channel], int]) -> int:
    """In the forked worker: take the fds the master made for it to the contract positions,
    wait to be the master's child, then become an ordinary worker."""
    if channel.sock is not None:
        channel.sock.detach()  # the zygote's channel fd number is reused just below
    channel_fd, out_fd, err_fd = fds
    os.dup2(channel_fd, cfg.channel_fd)
    os.dup2(out_fd, 1)
    os.dup2(err_fd, 2)
    for fd in fds:
        os.close(fd)
    fds.clear()
    # The parent-death signal is bound to the parent at the time it is set, and the
    # intermediate is about to exit: set it once the master is the parent.
    deadline = time.monotonic() + 10.0
    while os.getppid() != master:
        if os.getppid() == 1 or time.monotonic() > deadline:
            return 1  # the master is gone (or no subreaper): nobody would supervise us
        time.sleep(0.0002)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != master:
        return 1
    os.environ[Env.WORKER] = str(slot)
    os.environ.pop(Env.ZYGOTE, None)
    cfg.raw["worker"] = slot
    title = "molt: worker gen=%d slot=%d" % (cfg.generation, slot)
    proctitle.set_title(title, "molt g%d s%d" % (cfg.generation, slot))
    return become_worker(cfg, Channel(cfg.channel_fd))
