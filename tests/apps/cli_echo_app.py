"""Answers with what the worker was given, so that tests can see the effect of `molt run` flags:
the worker config (MOLT_WORKER_CONFIG), the ids it runs as, its directory and environment."""
from __future__ import annotations

import json
import os


def described() -> bytes:
    return json.dumps({
        "worker_config": json.loads(os.environ.get("MOLT_WORKER_CONFIG", "{}")),
        "uid": os.getuid(),
        "gid": os.getgid(),
        "cwd": os.getcwd(),
        "env": {k: v for k, v in os.environ.items() if k.startswith("CLI_TEST_")},
    }).encode()


def application(environ, start_response):
    body = described()
    start_response("200 OK", [("Content-Type", "application/json"),
                              ("Content-Length", str(len(body)))])
    return [body]


async def asgi(scope, receive, send):
    if scope["type"] != "http":
        return  # no lifespan: the shim goes on without it
    body = described()
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})
