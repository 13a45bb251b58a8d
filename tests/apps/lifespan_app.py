"""ASGI apps for the lifespan modes.

* `no_lifespan`: raises on the lifespan scope, as the asgi.py Django generates does.
* `app`: a Starlette app whose startup raises when LIFESPAN_BROKEN is set in the environment
  (Starlette then reports `lifespan.startup.failed`, as every framework does); otherwise it
  serves and says whether its startup ran, and (/where) in which process and on which loop.
"""
import asyncio
import os

from starlette.applications import Starlette
from starlette.responses import JSONResponse, PlainTextResponse
from starlette.routing import Route

STARTED = {"lifespan": False, "pid": None, "loop": None}


async def no_lifespan(scope, receive, send):
    if scope["type"] != "http":
        raise ValueError("this app can only handle HTTP, not %s" % scope["type"])
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"text/plain")]})
    await send({"type": "http.response.body", "body": b"served without lifespan"})


async def startup():
    if os.environ.get("LIFESPAN_BROKEN"):
        raise RuntimeError("the database is unreachable")
    STARTED["lifespan"] = True
    STARTED["pid"] = os.getpid()
    STARTED["loop"] = id(asyncio.get_running_loop())


async def home(request):
    return PlainTextResponse("lifespan ran" if STARTED["lifespan"] else "no lifespan")


async def where(request):
    """This process, the one that ran the startup, and whether it ran on the loop serving
    this request (a loop made before a fork would not be the one running here)."""
    return JSONResponse({"pid": os.getpid(), "startup_pid": STARTED["pid"],
                         "startup_on_this_loop": STARTED["loop"] == id(asyncio.get_running_loop())})


app = Starlette(routes=[Route("/", home), Route("/where", where)], on_startup=[startup])
