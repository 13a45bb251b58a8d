"""Importing the application: sys.path hygiene, chdir and module:callable resolution."""
from __future__ import annotations

import importlib
import os
import sys
from typing import Any


def prepare_path(chdir: str) -> None:
    """chdir into the release, put it first on sys.path and take the shim's own dir off it.

    The shim's directory must not shadow the app's modules; `python -m` also puts the
    master's working directory first, which has nothing to do with the release either.
    """
    shim_parent = os.path.realpath(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    start_cwd = os.path.realpath(os.getcwd())
    cleaned = []
    for entry in sys.path:
        real = os.path.realpath(entry or ".")
        if real == shim_parent or (entry in ("", ".") or real == start_cwd):
            continue
        cleaned.append(entry)
    if chdir and os.path.isfile(chdir):
        # A release shipped as one zip or .pyz archive: Python imports from it through
        # zipimport; the working directory is the one that holds it.
        os.chdir(os.path.dirname(chdir))
        cleaned.insert(0, chdir)
    elif chdir:
        os.chdir(chdir)
        cleaned.insert(0, chdir)
    sys.path[:] = cleaned


def import_app(spec: str) -> Any:
    """Resolve 'package.module:attr.sub'; a missing ':attr' means 'application', then 'app'.
    'module:create_app()' calls the factory with no arguments and serves what it returns."""
    module_name, _, attr = spec.partition(":")
    if attr.endswith("()"):
        factory = import_app("%s:%s" % (module_name, attr[:-2]))
        app = factory()
        if not callable(app):
            raise TypeError("%s returned %r, which is not callable" % (spec, type(app).__name__))
        return app
    if not module_name:
        raise ImportError("empty app spec %r (expected module:callable)" % spec)
    module = importlib.import_module(module_name)
    names = [attr] if attr else ["application", "app"]
    for name in names:
        obj: Any = module
        try:
            for part in name.split("."):
                obj = getattr(obj, part)
        except AttributeError:
            continue
        if not callable(obj):
            raise TypeError("%s:%s is not callable" % (module_name, name))
        return obj
    raise AttributeError("module %r has no attribute %r" % (module_name, " or ".join(names)))
