"""Starlette ASGI app: lifespan, HTTP routes, a WebSocket echo."""
import asyncio
import os

from starlette.applications import Starlette
from starlette.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.routing import Route, WebSocketRoute

STATE = {"started": False, "stopped": False}


async def startup():
    STATE["started"] = True


async def shutdown():
    STATE["stopped"] = True
    marker = os.environ.get("ASGI_SHUTDOWN_MARKER")
    if marker:
        with open(marker, "w") as f:
            f.write("stopped")


async def home(request):
    return PlainTextResponse("asgi hello")


async def healthz(request):
    if not STATE["started"]:
        return PlainTextResponse("lifespan not started", status_code=503)
    return PlainTextResponse("ok")


async def state(request):
    return JSONResponse(dict(STATE, notify=os.environ.get("NOTIFY_SOCKET")))


async def slow(request):
    await asyncio.sleep(float(request.query_params.get("s", "1")))
    return PlainTextResponse("slow done")


async def echo(request):
    return PlainTextResponse((await request.body()).decode("latin-1"))


async def headers(request):
    # The body first: fields that arrive after it (trailers) must not show up here.
    await request.body()
    return JSONResponse({"headers": [[k, v] for k, v in request.headers.items()]})


async def big(request):
    # One large body in 64 KiB sends: a client that reads nothing stops it at the transport's
    # high-water mark (uvicorn's flow control), not in a thread.
    n = int(request.query_params.get("n", "1000000"))

    async def chunks():
        for _ in range(n // 65536):
            yield b"x" * 65536

    return StreamingResponse(chunks(), media_type="application/octet-stream",
                             headers={"content-length": str(n // 65536 * 65536)})


async def ws_echo(websocket):
    await websocket.accept()
    try:
        while True:
            text = await websocket.receive_text()
            await websocket.send_text("echo:" + text)
    except Exception:
        pass


app = Starlette(
    routes=[Route("/", home), Route("/healthz", healthz), Route("/state", state),
            Route("/slow", slow), Route("/echo", echo, methods=["POST"]), Route("/big", big),
            Route("/headers", headers, methods=["POST"]),
            WebSocketRoute("/ws", ws_echo)],
    on_startup=[startup], on_shutdown=[shutdown])
