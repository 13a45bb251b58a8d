"""The native engine: the WSGI data path in C++ (the `_molt_native` extension, built from
worker_shim/native/ and installed next to the shim), behind the engine interface of base.py.

Native threads accept, read, parse (libhttp-parser), frame and write with the GIL released; a
serving thread takes the GIL once per request to build environ and run the app. This module
only builds the extension's Server from the worker config, drives its sweep from the
lifecycle's loop and turns its queued log lines into the shim's logger.

The lifecycle (molt_shim/lifecycle.py) drives it like every engine; it never sees the master
channel.
"""
from __future__ import annotations

import logging
import os
import select
import socket
import sys
import time
from typing import Any, Dict, Optional, Tuple

from .. import proxyproto, static
from . import EngineUnavailable
from .base import Counters, EngineContext, LoopHooks

log = logging.getLogger("molt_shim")

SWEEP_S = 0.1  # how often idle, header-timeout and linger closes are checked


def _install_dir() -> str:
    """lib/molt: the directory holding the molt_shim package as it was imported (the build
    tree mirrors the install tree, so this works in both). The loader takes it off sys.path."""
    return os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def load_extension() -> Tuple[Any, str]:
    """The extension module, or None and the one-line reason it cannot be used."""
    import importlib.machinery
    import importlib.util

    if "_molt_native" in sys.modules:
        return sys.modules["_molt_native"], ""
    where = _install_dir()
    candidates = [os.path.join(where, "_molt_native" + suffix)
                  for suffix in importlib.machinery.EXTENSION_SUFFIXES]
    path = next((c for c in candidates if os.path.exists(c)), "")
    if not path:
        return None, "no _molt_native extension in %s (built with -DMOLT_NATIVE=ON?)" % where
    try:
        spec = importlib.util.spec_from_file_location("_molt_native", path)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    except (ImportError, OSError, AssertionError) as exc:
        return None, "cannot load %s into %s (Python %d.%d): %s" % (
            path, sys.executable, sys.version_info[0], sys.version_info[1], exc)
    sys.modules["_molt_native"] = module
    return module, ""


# The environ pieces and wsgi.file_wrapper are the Python engine's own: one copy of each rule.
from ..wsgi.request import listener_environ, server_environ
from ..wsgi.response import FileWrapper


class NativeEngine:
    name = "native"

    def __init__(self, ctx: EngineContext, module: Any) -> None:
        cfg = ctx.cfg
        http = cfg.http
        script_name = cfg.root_path
        base = server_environ(cfg.threads > 1, FileWrapper, script_name)
        listeners = []
        for sock, label in ctx.listeners:
            is_tcp = sock.family in (socket.AF_INET, socket.AF_INET6)
            env = listener_environ(base, sock.getsockname() if is_tcp else None, is_tcp)
            listeners.append((sock.fileno(), label, env, _listener_options(cfg, label)))
        warmup_env = dict(base, SERVER_NAME="localhost", SERVER_PORT="80")
        if listeners:
            warmup_env = listeners[0][2]
        version_header = ("%s: %s\r\n" % (cfg.version_header, cfg.version)
                          if cfg.version_header else "")
        mounts = static.mounts(cfg.static, cfg.chdir)
        self._cfg = cfg
        self._module = module
        self._access_log = ctx.access_log
        self._proxy_rejects = proxyproto.RejectLog()
        self._server: Any = module.make_server(
            app=ctx.app, listeners=listeners, warmup_env=warmup_env, file_wrapper=FileWrapper,
            access_log=ctx.access_log, config={
                "max_request_line": int(http["max_request_line"]),
                "max_header_size": int(http["max_header_size"]),
                "max_headers": int(http["max_headers"]),
                "max_body_size": int(http["max_body_size"] or 0),
                "body_buffer_size": int(http["body_buffer_size"]),
                "header_timeout_s": cfg.header_timeout_s,
                "send_timeout_s": cfg.send_timeout_s,
                "keepalive_s": max(0.0, cfg.timeout_s("keepalive")),
                "drain_idle_s": cfg.drain_idle_s,
                "threads": cfg.threads,
                "accept_board_fd": cfg.accept_board_fd,
                "generation": cfg.generation,
                "accepting_workers": max(0, cfg.accepting_workers),  # auto unresolved: all
                "version_header": version_header,
                "script_name": script_name,
                "static": [(m.prefix, os.fsdecode(m.root)) for m in mounts],
                "mime_types": static.MIME_TYPES,
                **_proxy_config(cfg),
                "proxy_header": _proxy_header_reader(self._proxy_rejects),
                "request_metrics": cfg.request_metrics,
                "access_request_headers": bool(getattr(ctx.access_log, "wants_request_headers",
                                                       False)),
                "access_response_headers": bool(getattr(ctx.access_log,
                                                        "wants_response_headers", False)),
            })
        # wsgi.errors is native too: its lines join the engine's log queue (level ERROR).
        errors = self._server.errors_stream()
        for env in [entry[2] for entry in listeners] + [warmup_env]:
            env["wsgi.errors"] = errors
        # The engine owns the descriptors from here on (it closes them when draining).
        for sock, _ in ctx.listeners:
            sock.detach()
        self._last = Counters(0, 0, time.monotonic(), 0)

    # -- the engine interface --------------------------------------------------------------------
    def start(self) -> Optional[str]:
        self._server.start()
        return None

    def warm_up(self, path: str, host: str, timeout_s: float) -> Optional[str]:
        from .. import warmup

        server_end, client_end = socket.socketpair()
        try:
            server_end.setblocking(False)
            self._server.submit_warmup(server_end.detach())
            raw = warmup.run_client(client_end, warmup.build_request(path, host, self._cfg.health_headers), timeout_s)
        except (OSError, TimeoutError) as exc:
            return "warm-up GET %s failed: %s" % (path, exc)
        finally:
            client_end.close()
            self.flush_logs()
        return warmup.verdict(path, raw)

    def describe(self) -> str:
        return "wsgi, %d threads, native engine, parser %s" % (
            self._cfg.threads, self._module.parser_name())

    def run(self, loop: LoopHooks) -> None:
        self._server.listen()
        ep = select.epoll()
        watched = set()
        for fd in loop.watch_fds():
            if fd >= 0:
                ep.register(fd, select.EPOLLIN)
                watched.add(fd)
        delay: Optional[float] = SWEEP_S
        try:
            while delay is not None:
                try:
                    events = ep.poll(max(0.0, min(delay, SWEEP_S)))
                except InterruptedError:
                    events = []
                for fd, _ in events:
                    if fd in watched and not loop.on_readable(fd):
                        ep.unregister(fd)
                        watched.discard(fd)
                self._server.tick()
                self.flush_logs()
                delay = loop.tick(time.monotonic())
        finally:
            ep.close()

    def stop_accepting(self) -> None:
        self._server.stop_accepting()

    def counters(self) -> Counters:
        if self._server is not None:
            self._last = Counters(*self._server.counters())
        return self._last

    def drained(self) -> bool:
        return bool(self._server.drained())

    def close(self) -> None:
        if self._server is None:
            return
        self.counters()
        self._server.close()  # joins the serving threads (it releases the GIL to do so)
        self.flush_logs()
        self._server = None

    # -- log lines queued by native threads ------------------------------------------------------
    def flush_logs(self) -> None:
        self._proxy_rejects.flush()
        server = self._server
        if server is None:
            return
        for level, text in server.take_logs():
            log.log(level, "%s", text)
        if self._access_log is not None:
            for entry in server.take_access():
                self._access_log.put(entry)


def _proxy_config(cfg: Any) -> Dict[str, Any]:
    """The trusted-proxy rule for the extension: the Python rule (one copy of it), called from
    C++ only for requests that carry one of the headers it reads."""
    rule = cfg.proxy
    if rule is None:
        return {}
    return {"proxy_rule": rule.adjust_environ, "forwarding_headers": rule.honoured}


def _listener_options(cfg: Any, label: str) -> Dict[str, Any]:
    """`proxy_protocol` and `tls` of one listener, in the form the extension reads."""
    options = cfg.listener_options(label)
    tls = options.get("tls")
    return {
        "proxy_protocol": bool(cfg.proxy_protocol(label)),
        "tls": None if not tls else {
            "cert": str(tls["cert"]), "key": str(tls["key"]),
            "client_ca": str(tls.get("client_ca") or ""),
            "min_version": str(tls.get("min_version") or "1.2"),
            "ticket_keys": cfg.tls_ticket_keys},
    }


def _proxy_header_reader(rejects: proxyproto.RejectLog) -> Any:
    """What the extension calls with a complete PROXY header (the bytes its framing counted,
    see native/transport.cpp): the Python parser decides, one copy of the rule. Returns the
    client as (address, port), port "" for a unix socket path; None to keep the socket's peer
    (LOCAL, UNKNOWN); False when the header is invalid (logged once per burst: close)."""

    def read(remote: str, data: bytes) -> Any:
        try:
            verdict = proxyproto.HeaderReader().feed(data)
            if verdict == proxyproto.NEED_MORE:
                raise proxyproto.Invalid("PROXY header truncated")
        except proxyproto.Invalid as exc:
            rejects.reject(remote, str(exc))
            return False
        except Exception:  # a bug in the parser must not end the serving thread
            log.exception("%s: error reading the PROXY header", remote)
            return False
        source = verdict[0].source
        if source is None:
            return None
        if isinstance(source, tuple):
            return (str(source[0]), str(source[1]))
        return (str(source), "")

    return read


def create(ctx: EngineContext) -> Any:
    """The engine factory (engines/__init__.py). When the extension cannot load for this
    interpreter, the worker says why in one line and serves with the Python engine (unless a
    listener needs the native one: then the boot fails with that reason)."""
    engine, why = make(ctx)
    if engine is not None:
        return engine
    from . import threaded_wsgi

    threaded_wsgi.refuse_proxied_tls(ctx, "the native engine is unavailable here: %s" % why)
    fallback = threaded_wsgi.create
    if ctx.cfg.engine == "auto":  # expected where the extension is not built: not a warning
        log.info("engine auto: native engine unavailable, using the Python engine: %s", why)
    else:
        log.warning("engine native unavailable, using the Python engine: %s", why)
    return fallback(ctx)


def make(ctx: EngineContext) -> Tuple[Optional[NativeEngine], str]:
    """The native engine, or None and the one-line reason it cannot be used."""
    module, why = load_extension()
    if module is None:
        return None, why
    try:
        return NativeEngine(ctx, module), ""
    except EngineUnavailable:
        raise  # the config is wrong for every engine (a static directory is missing)
    except Exception as exc:  # a config the extension rejects: say so, use the Python engine
        return None, "the native engine did not start: %s: %s" % (type(exc).__name__, exc)
