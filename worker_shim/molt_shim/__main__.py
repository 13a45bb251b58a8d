"""Entry point: `python -m molt_shim`, started by the molt master (see README.md)."""
from __future__ import annotations

import atexit
import faulthandler
import logging
import os
import signal
import socket
import sys
import traceback
from typing import Any, Callable, List, Optional, Tuple

from . import accesslog, config, engines, loader, proctitle
from .contract import Env, WorkerExit, is_scrubbed
from .engines.base import EngineContext, EngineFactory
from .lifecycle import Lifecycle, Retirement, fail
from .protocol import Channel, one_line

log = logging.getLogger("molt_shim")


def setup_logging(level: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    # The master prefixes every line with gen/worker, so the line itself stays short.
    handler.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
    log.handlers.clear()  # a standby sets up its logging again when it starts
    log.addHandler(handler)
    log.setLevel(getattr(logging, level, logging.INFO))
    log.propagate = False


def scrub_environment() -> None:
    """Remove what belongs to the master's own supervisor (systemd): an app that saw it could
    notify systemd or adopt sockets in our name. The MOLT_* names stay: they are this worker's
    own (the app may read MOLT_GENERATION), and only the master keeps them from its parent."""
    for key in list(os.environ):
        if is_scrubbed(key) and not key.startswith("MOLT_"):
            del os.environ[key]
    # A secret of the engine's (config.load has read it), not for the app or its children.
    os.environ.pop(Env.TLS_TICKET_KEYS, None)


def wrap_listeners(cfg: config.WorkerConfig) -> List[Tuple[socket.socket, str]]:
    out = []
    for fd, name in zip(cfg.listen_fds, cfg.listen_names):
        os.set_inheritable(fd, False)  # a subprocess of the app must not hold our listeners
        sock = socket.socket(fileno=fd)
        if sock.family in (socket.AF_INET, socket.AF_INET6):
            # Accepted connections inherit TCP_NODELAY from the listener (Linux), so setting
            # it once here saves a setsockopt() per connection. Every worker shares this
            # socket and wants the same, so changing it under them is harmless.
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:
                pass
        bound = bound_address(sock)
        # A listener named by its address shows where it really is (port 0 resolved); one
        # with a name of its own (systemd's FileDescriptorName=, `name:`) shows both.
        if not name or name.startswith(("tcp://", "unix:")):
            label = bound or name or str(fd)
        else:
            label = "%s (%s)" % (name, bound) if bound else name
        cfg.label_names[label] = name  # per-listener settings are keyed by name
        out.append((sock, label))
    return out


def bound_address(sock: socket.socket) -> str:
    """Where a listener really is (a configured port 0 shows the kernel's choice)."""
    try:
        address = sock.getsockname()
    except OSError:
        return ""
    if sock.family == socket.AF_UNIX:
        return "unix:%s" % (address.decode() if isinstance(address, bytes) else address)
    if sock.family == socket.AF_INET6:
        return "tcp://[%s]:%d" % (address[0], address[1])
    return "tcp://%s:%d" % (address[0], address[1])


def finish_process(code: int) -> None:
    """Exit without waiting for non-daemon threads an app may have started, but still run
    the app's atexit hooks and flush our streams."""
    try:
        atexit._run_exitfuncs()
    except Exception:
        pass
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:
            pass
    os._exit(code)


def fast_exit(signum: int, frame: Any) -> None:
    # SIGINT/SIGQUIT: the master wants us gone now. The kernel closes every socket.
    try:
        sys.stderr.write("molt_shim: fast exit on signal %d\n" % signum)
        sys.stderr.flush()
    except Exception:
        pass
    os._exit(WorkerExit.OK)


def raise_malloc_mmap_threshold() -> None:
    """Give this fresh interpreter the allocator state a long-lived process has.

    glibc serves every allocation of 128 KiB or more with its own mmap() until freeing such
    a mapping raises that threshold. asyncio reads each chunk into a new 256 KiB buffer
    (then shrinks it to what arrived), so a fresh worker paid mmap + mremap + munmap and
    the page faults on every read: measured with strace, 3 extra syscalls per request.
    Workers forked from a warm master (gunicorn's) never see this. Freeing one 1 MiB block
    raises the threshold to 1 MiB (and glibc's trim threshold to 2 MiB) once, the same
    dynamic adjustment any long-running process gets; other allocators ignore it."""
    block = bytes(1 << 20)  # calloc: a fresh mapping, its pages never touched
    del block


def main() -> int:
    """Boot: config, environment, listeners, the engine's code, the app; then serve. A standby
    (standby.py) boots twice: once as the zygote it was forked from, up to the fork, and again
    as its own generation's zygote once the master sends it START=."""
    raise_malloc_mmap_threshold()
    faulthandler.enable(all_threads=True)  # SIGABRT (heartbeat timeout): dump every thread
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    signal.signal(signal.SIGINT, fast_exit)
    signal.signal(signal.SIGQUIT, fast_exit)
    while True:
        code = boot()
        if code is not None:
            return code


def boot() -> Optional[int]:
    """One boot, to the exit code; None in a standby told to start (it boots again)."""
    try:
        cfg = config.load(os.environ)
    except (ValueError, TypeError) as exc:
        setup_logging("INFO")
        return fail(Channel(int(os.environ.get(Env.CHANNEL_FD, "-1") or -1)),
                    WorkerExit.IMPORT_FAILED,
                    "bad %s: %s" % (Env.WORKER_CONFIG, one_line(exc)))
    setup_logging(cfg.log_level)
    cfg.resolve_accepting_workers(usable_cpus)
    channel = Channel(cfg.channel_fd)
    scrub_environment()
    title = "molt: worker gen=%d slot=%d" % (cfg.generation, cfg.worker)
    proctitle.set_title(title, "molt g%d s%d" % (cfg.generation, cfg.worker))
    try:
        factory = engines.load(cfg.interface, cfg.engine)
    except engines.EngineUnavailable as exc:
        return fail(channel, WorkerExit.IMPORT_FAILED, str(exc))
    zygote_asked = os.environ.get(Env.ZYGOTE) == "1"
    if zygote_asked:
        from . import standby, zygote

        # Everything up to here is the same for every release: the next zygote is forked
        # now, before the import, when the master asks for it.
        zygote.import_shim_modules()
        if standby.fork_if_asked(channel):
            return None
    listeners = wrap_listeners(cfg)
    if cfg.accept_board_fd >= 0:  # the generation's shared board: not for the app's children
        os.set_inheritable(cfg.accept_board_fd, False)
    if zygote_asked:
        return zygote.run(
            cfg, channel, lambda: import_app(cfg),
            lambda app, child_cfg, child_channel, adopted: serve(
                app, child_cfg, child_channel, listeners, factory,
                "molt: worker gen=%d slot=%d" % (child_cfg.generation, child_cfg.worker),
                adopted))
    try:
        app = import_app(cfg)
    except BaseException as exc:  # SystemExit from an app module counts as a failed import too
        traceback.print_exc(file=sys.stderr)
        return fail(channel, WorkerExit.IMPORT_FAILED, "%s (importing %s)" % (one_line(exc), cfg.app))
    return serve(app, cfg, channel, listeners, factory, title)


def usable_cpus() -> int:
    """What `accepting_workers: auto` counts for the ASGI engine: the extension's usable_cpus()
    (the affinity capped by a cgroup CPU quota), or the affinity alone without it."""
    from .engines.native import load_extension

    module = load_extension()[0]
    if module is not None and hasattr(module, "usable_cpus"):
        return int(module.usable_cpus())
    return len(os.sched_getaffinity(0))


def import_app(cfg: config.WorkerConfig) -> Any:
    """The first half of a worker's life: the release's code, imported once (a zygote can
    stop here, fork, and run serve() in each child)."""
    loader.prepare_path(cfg.chdir)
    return loader.import_app(cfg.app)


def serve(app: Any, cfg: config.WorkerConfig, channel: Channel,
          listeners: List[Tuple[socket.socket, str]], factory: EngineFactory,
          title: str, before_ready: Optional[Callable[[], bool]] = None) -> int:
    """The second half: build the engine and run the lifecycle until the drain is done. A
    worker forked from its generation's zygote starts here, after the fork: every thread and
    event loop of the engine is created in this process (and `before_ready` is its wait to be
    the master's child)."""
    try:
        run_hook(cfg, "post_fork")
    except BaseException as exc:
        traceback.print_exc(file=sys.stderr)
        return fail(channel, WorkerExit.IMPORT_FAILED,
                    "hooks.post_fork (%s) failed: %s" % (cfg.hook("post_fork"), one_line(exc)))
    access = accesslog.make(cfg)
    retirement = Retirement(channel, cfg.max_requests, cfg.max_requests_jitter)
    try:
        engine = factory(EngineContext(app=app, cfg=cfg, listeners=listeners,
                                       access_log=access, on_request_count=retirement.check))
    except engines.EngineUnavailable as exc:
        return fail(channel, WorkerExit.IMPORT_FAILED, str(exc))
    lifecycle = Lifecycle(cfg, channel, engine, access, retirement, title,
                          [name for _, name in listeners], before_ready)
    code = lifecycle.run()
    if code == WorkerExit.OK:
        try:
            run_hook(cfg, "worker_exit")
        except BaseException:
            log.exception("hooks.worker_exit (%s) failed", cfg.hook("worker_exit"))
    if access is not None:
        access.close()
    return code


def run_hook(cfg: config.WorkerConfig, name: str) -> None:
    """Call the configured `hooks.<name>` ("module:function"), if any, with no arguments."""
    spec = cfg.hook(name)
    if spec:
        loader.import_app(spec)()


if __name__ == "__main__":
    code = main()
    finish_process(code)
