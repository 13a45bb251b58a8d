"""Starlette ASGI app: lifespan, HTTP routes, a WebSocket echo."""
import asyncio
import json
import os

from starlette.applications import Starlette
from starlette.requests import ClientDisconnect
from starlette.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocketDisconnect

STATE = {"started": False, "stopped": False}
# What /upload-watch saw: how many uploads began, and how the last one ended ("complete", or
# the message that ended it, e.g. "http.disconnect" when the server cut the body).
UPLOADS = {"started": 0, "ended_with": None}
WS_LATE = {"waiting": 0}  # /ws-late connections whose app has not accepted yet
WS_ENDED = []  # the close code each /ws connection's app saw in its websocket.disconnect


async def startup():
    STATE["started"] = True
    STATE["started_in"] = os.getpid()  # a worker's own pid: lifespan runs after any fork


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
    return JSONResponse(dict(STATE, notify=os.environ.get("NOTIFY_SOCKET"), pid=os.getpid()))


async def slow(request):
    try:
        await asyncio.sleep(float(request.query_params.get("s", "1")))
    except asyncio.CancelledError:  # a drain that ran out of time cancels it
        marker = os.environ.get("ASGI_CANCEL_MARKER")
        if marker:
            with open(marker, "w") as f:
                f.write("cancelled")
        raise
    return PlainTextResponse("slow done")


async def echo(request):
    try:
        body = await request.body()
    except ClientDisconnect:  # the server cut the request (a framing violation in its body)
        return PlainTextResponse("", status_code=400)
    return PlainTextResponse(body.decode("latin-1"))


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
    except WebSocketDisconnect as exc:
        WS_ENDED.append(exc.code)
    except Exception:
        pass


async def ws_ended(request):
    return JSONResponse(WS_ENDED)


async def ws_late(websocket):
    """Accepts only once the file named by ?go= exists (the test creates it when it wants the
    handshake to complete), then echoes. /ws-late-waiting: how many are waiting."""
    go = websocket.query_params["go"]
    WS_LATE["waiting"] += 1
    while not os.path.exists(go):
        await asyncio.sleep(0.01)
    WS_LATE["waiting"] -= 1
    await ws_echo(websocket)


async def ws_addresses(websocket):
    """The WebSocket scope's client and server, as JSON, then a normal close."""
    await websocket.accept()
    await websocket.send_text(json.dumps([websocket.scope["client"],
                                          websocket.scope["server"]]))
    await websocket.close()


async def ws_late_waiting(request):
    return PlainTextResponse(str(WS_LATE["waiting"]))


starlette_app = Starlette(
    routes=[Route("/", home), Route("/healthz", healthz), Route("/state", state),
            Route("/slow", slow), Route("/echo", echo, methods=["POST"]), Route("/big", big),
            Route("/headers", headers, methods=["POST"]),
            Route("/ws-late-waiting", ws_late_waiting),
            Route("/ws-ended", ws_ended), WebSocketRoute("/ws", ws_echo), WebSocketRoute("/ws-late", ws_late),
            WebSocketRoute("/ws-addresses", ws_addresses)],
    on_startup=[startup], on_shutdown=[shutdown])


SCOPE_TEXT = ("type", "http_version", "method", "scheme", "path", "root_path")
SCOPE_BYTES = ("raw_path", "query_string")


async def upload_watch(receive, send):
    UPLOADS["started"] += 1
    UPLOADS["ended_with"] = None
    while True:
        message = await receive()
        if message["type"] != "http.request" or not message.get("more_body"):
            break
    UPLOADS["ended_with"] = "complete" if message["type"] == "http.request" else message["type"]
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"got it"})


async def app(scope, receive, send):
    """The Starlette app; a path that ends in /scope answers with the scope the server made
    (the tests of the ASGI parsers compare it); /upload-watch reads a body message by message
    and /uploads says how the last one ended."""
    if scope["type"] == "http" and scope["path"] == "/upload-watch":
        return await upload_watch(receive, send)
    if scope["type"] == "http" and scope["path"] == "/uploads":
        body = json.dumps(UPLOADS).encode()
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": body})
        return
    if scope["type"] == "http" and scope["path"].endswith("/scope"):
        seen = {k: scope.get(k) for k in SCOPE_TEXT}
        seen.update({k: scope[k].decode("latin-1") for k in SCOPE_BYTES})
        seen["headers"] = [[n.decode("latin-1"), v.decode("latin-1")] for n, v in scope["headers"]]
        seen["client"], seen["server"] = scope.get("client"), scope.get("server")
        seen["asgi"] = scope.get("asgi")
        seen["task"] = asyncio.current_task().get_name()  # the engine's TaskStarter: request-N
        body = json.dumps(seen).encode()
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"application/json"),
                                (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})
        return
    await starlette_app(scope, receive, send)


def worker_exit():
    """hooks.worker_exit: appends this worker's pid to $EXIT_LOG."""
    with open(os.environ["EXIT_LOG"], "a") as f:
        f.write("%d\n" % os.getpid())
