"""One module per section of the report: `measure(p, work, results)` runs its servers and
loads and records what it saw in `results`; `report(doc)` writes its part of the report
from `results` (and nothing when the section did not run)."""
from __future__ import annotations

from . import asgi, broken, edge, engines, hup, idle, memory, observe, preload, rollover, wsgi

# What `bench/run --only` names, in the order a full run measures them.
MEASURES = {
    "wsgi": wsgi.measure,       # also measures figure 7 (idle), with the same servers
    "asgi": asgi.measure,
    "rollover": rollover.measure,
    "hup": hup.measure,
    "memory": memory.measure,
    "broken": broken.measure,
    "preload": preload.measure,
    "engines": engines.measure,  # issue 13: the native engine against uWSGI, gunicorn, nginx
    "edge": edge.measure,       # HTTPS against gunicorn and uWSGI; trusted-proxy cost
    "observe": observe.measure,
}

# The report's sections, in the report's order (figures 1 to 12).
REPORTERS = [wsgi.report, asgi.report, rollover.report, hup.report, memory.report, idle.report,
             broken.report, preload.report, engines.report, edge.report, observe.report]
