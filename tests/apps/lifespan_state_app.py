"""A Starlette app whose lifespan yields state (ASGI 2.3), as FastAPI's docs show: every
request and WebSocket sees it, each on a copy of its own."""
import contextlib

from starlette.applications import Starlette
from starlette.responses import JSONResponse
from starlette.routing import Route, WebSocketRoute


@contextlib.asynccontextmanager
async def lifespan(app):
    yield {"pool": "ready"}


async def state(request):
    # A request that sets something on its state must not pass it to the next one.
    leaked = getattr(request.state, "touched", False)
    request.state.touched = True
    return JSONResponse({"pool": request.state.pool, "leaked": leaked})


async def ws(websocket):
    await websocket.accept()
    await websocket.send_text(websocket.state.pool)
    await websocket.close()


app = Starlette(routes=[Route("/state", state), WebSocketRoute("/ws", ws)], lifespan=lifespan)
