"""The demo app /etc/molt/molt.yaml runs until it points at a real release: standard library
only, so the package needs nothing beyond python3."""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Iterable

REVISION = (Path(__file__).parent / "REVISION").read_text().strip()


def application(environ: dict, start_response: Callable) -> Iterable[bytes]:
    if environ.get("PATH_INFO") == "/healthz":
        body = b"ok\n"
    else:
        body = f"hello from molt (demo app, revision {REVISION})\n".encode()
    start_response("200 OK", [("Content-Type", "text/plain; charset=utf-8"),
                              ("Content-Length", str(len(body)))])
    return [body]
