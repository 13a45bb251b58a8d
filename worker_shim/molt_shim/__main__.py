"""Entry point: `python -m molt_shim`, started by the molt master (see README.md)."""
from __future__ import annotations

import atexit
import faulthandler
import importlib
import logging
import os
import signal
import socket
import sys
import time
import traceback
from typing import Any, List, Tuple

from . import accesslog, config, loader, proctitle
from .protocol import Channel, dispatch
from .stats import Stats

EXIT_OK = 0
EXIT_IMPORT = 3
EXIT_WARMUP = 4

log = logging.getLogger("molt_shim")


def setup_logging(level: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    # The master prefixes every line with gen/worker, so the line itself stays short.
    handler.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
    log.addHandler(handler)
    log.setLevel(getattr(logging, level, logging.INFO))
    log.propagate = False


def one_line(exc: BaseException, limit: int = 1000) -> str:
    text = "%s: %s" % (type(exc).__name__, exc)
    text = " ".join(text.splitlines())
    return text[:limit]


def fail(channel: Channel, code: int, reason: str) -> int:
    """Boot failure: ERROR= to the master, the reason on stderr, the documented exit code."""
    reason = " ".join(reason.splitlines())[:1000]
    log.error("boot failed: %s", reason)
    channel.send(ERROR=reason)
    return code


def scrub_environment() -> None:
    # Those belong to the master's own supervisor (systemd); an app that saw them could
    # notify systemd or adopt sockets in our name.
    for key in list(os.environ):
        if key == "NOTIFY_SOCKET" or key.startswith("LISTEN_"):
            del os.environ[key]


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
    os._exit(EXIT_OK)


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
    raise_malloc_mmap_threshold()
    faulthandler.enable(all_threads=True)  # SIGABRT (heartbeat timeout): dump every thread
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    signal.signal(signal.SIGINT, fast_exit)
    signal.signal(signal.SIGQUIT, fast_exit)
    try:
        cfg = config.load(os.environ)
    except (ValueError, TypeError) as exc:
        setup_logging("INFO")
        return fail(Channel(int(os.environ.get("MOLT_CHANNEL_FD", "-1") or -1)), EXIT_IMPORT,
                    "bad MOLT_WORKER_CONFIG: %s" % one_line(exc))
    setup_logging(cfg.log_level)
    channel = Channel(cfg.channel_fd)
    scrub_environment()
    listeners = wrap_listeners(cfg)
    title = "molt: worker gen=%d slot=%d" % (cfg.generation, cfg.worker)
    proctitle.set_title(title, "molt g%d s%d" % (cfg.generation, cfg.worker))

    if cfg.interface == "asgi":
        try:
            importlib.import_module("uvicorn")  # only checking that it is there
        except ImportError as exc:
            return fail(channel, EXIT_IMPORT,
                        "interface asgi needs uvicorn, which is not importable by %s (%s): "
                        "install python3-uvicorn (Debian) or pip install uvicorn"
                        % (sys.executable, one_line(exc, 200)))
    try:
        loader.prepare_path(cfg.chdir)
        app = loader.import_app(cfg.app)
    except BaseException as exc:  # SystemExit from an app module counts as a failed import too
        traceback.print_exc(file=sys.stderr)
        return fail(channel, EXIT_IMPORT, "%s (importing %s)" % (one_line(exc), cfg.app))

    stats = Stats(channel, cfg.max_requests, cfg.max_requests_jitter)
    access = accesslog.make(cfg)
    if cfg.interface == "asgi":
        from .asgi_server import serve_asgi

        code = serve_asgi(app, cfg, channel, stats, listeners, access, title)
    else:
        code = serve_wsgi(app, cfg, channel, stats, listeners, access, title)
    if access is not None:
        access.close()
    return code


def serve_wsgi(app: Any, cfg: config.WorkerConfig, channel: Channel, stats: Stats,
               listeners: List[Tuple[socket.socket, str]], access: Any, title: str) -> int:
    if cfg.engine == "native":  # `auto` means python until native passes the whole suite
        from .engines.native import serve_native

        code = serve_native(app, cfg, channel, stats, listeners, access, title,
                            lambda exit_code, reason: fail(channel, exit_code, reason))
        if code is not None:
            return code
    from . import warmup
    from .wsgi_server import WSGIServer

    server = WSGIServer(app, cfg, channel, stats, listeners, access)
    drain_requests: List[str] = []

    def request_drain(why: str) -> None:
        drain_requests.append(why)
        server.wake()

    signal.signal(signal.SIGTERM, lambda s, f: request_drain("SIGTERM"))
    signal.signal(signal.SIGUSR1, lambda s, f: access.reopen() if access else None)
    server.on_drain = lambda: proctitle.set_title(
        title + " draining", "molt g%d s%d drn" % (cfg.generation, cfg.worker))
    server.start_pool()
    if cfg.health_path:
        error = warmup.wsgi_warmup(server, cfg.health_path, cfg.health_host, cfg.timeout_s("boot"))
        if error is not None:
            return fail(channel, EXIT_WARMUP, error)
    channel.send(READY=1)
    log.info("ready: %s (wsgi, %d threads, parser %s) on %s", cfg.app, cfg.threads,
             __import__("molt_shim.httpparse").httpparse.parser_name(),
             ", ".join(name for _, name in listeners) or "no listeners")

    interval = cfg.heartbeat_interval_s
    next_beat = [time.monotonic()]

    def on_tick(now: float) -> None:
        if drain_requests:
            server.begin_drain(drain_requests.pop(0))
        if now >= next_beat[0]:
            next_beat[0] = now + interval
            channel.send(**stats.heartbeat())

    def on_channel() -> None:
        messages = channel.receive()
        if messages is None:
            server.forget_channel()
            request_drain("master channel closed")
            return
        dispatch(messages, request_drain, access.reopen if access is not None else None)

    server.run(on_tick, on_channel)
    channel.send(**stats.heartbeat())  # the last counts, so the master's totals are exact
    log.info("drained; exiting (%d requests served)", stats.requests)
    return EXIT_OK


if __name__ == "__main__":
    code = main()
    finish_process(code)
