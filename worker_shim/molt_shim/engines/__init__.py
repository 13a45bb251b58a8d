"""HTTP engines side by side, each implementing engines/base.py's Engine interface.

An engine module exposes `create(ctx: EngineContext) -> Engine`, which may raise
EngineUnavailable (say, an extension that is not built) to fail the boot with that reason.
Which engine serves is decided here, once, from the interface and MOLT_WORKER_CONFIG's `engine`
field; a new WSGI engine is one entry in WSGI_ENGINES (and one in tests/shim/conftest.py's
WSGI_ENGINES).
"""
from __future__ import annotations

import importlib
import sys
from typing import Dict

from ..protocol import one_line
from .base import EngineFactory

# `engine:` value -> module under molt_shim.engines, for interface wsgi.
WSGI_ENGINES: Dict[str, str] = {
    "python": "threaded_wsgi",  # threads on one epoll, in Python
    "native": "native",  # the C++ engine (the _molt_native extension); falls back to python
}
# `engine: auto`: the native engine whenever its extension loads for this interpreter; when
# it cannot, native.create() logs one line and serves with the Python engine.
AUTO_WSGI = "native"
ASGI_ENGINE = "uvicorn_asgi"  # ASGI apps are served with uvicorn's protocols, whatever `engine:`


class EngineUnavailable(Exception):
    """The configured engine cannot run here; the text is the worker's ERROR= line."""


def engine_name(interface: str, engine: str) -> str:
    """The engine that serves: `auto` resolved, ASGI always uvicorn."""
    if interface == "asgi":
        return "uvicorn"
    return AUTO_WSGI if engine == "auto" else engine


def load(interface: str, engine: str) -> EngineFactory:
    """The factory of the engine that serves this worker, or EngineUnavailable."""
    if interface == "asgi":
        if engine == "native":
            raise EngineUnavailable("engine native serves WSGI only; interface asgi runs on "
                                    "uvicorn (use engine: auto)")
        try:
            module = importlib.import_module(__name__ + "." + ASGI_ENGINE)
        except ImportError as exc:
            raise EngineUnavailable(
                "interface asgi needs uvicorn, which is not importable by %s (%s): install "
                "python3-uvicorn (Debian) or pip install uvicorn"
                % (sys.executable, one_line(exc, 200))) from None
        return module.create  # type: ignore[no-any-return]
    name = engine_name(interface, engine)
    module_name = WSGI_ENGINES.get(name)
    if module_name is None:
        raise EngineUnavailable("unknown engine %r (expected auto, %s)"
                                % (engine, ", ".join(sorted(WSGI_ENGINES))))
    try:
        module = importlib.import_module(__name__ + "." + module_name)
    except ImportError as exc:
        raise EngineUnavailable("engine %s is not available in this molt (%s); use engine: "
                                "auto or python" % (name, one_line(exc, 200))) from None
    return module.create  # type: ignore[no-any-return]
