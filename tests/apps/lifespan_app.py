"""ASGI apps for the lifespan modes.

* `no_lifespan`: raises on the lifespan scope, as the asgi.py Django generates does.
* `app`: a Starlette app whose startup raises when LIFESPAN_BROKEN is set in the environment
  (Starlette then reports `lifespan.startup.failed`, as every framework does); otherwise it
  serves and says whether its startup ran.
"""
import os

from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Route

STARTED = {"lifespan": False}


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


async def home(request):
    return PlainTextResponse("lifespan ran" if STARTED["lifespan"] else "no lifespan")


app = Starlette(routes=[Route("/", home)], on_startup=[startup])
