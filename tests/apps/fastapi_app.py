"""FastAPI (Debian's python3-fastapi): a JSON endpoint, a streaming response, a request body
read as a stream, a WebSocket echo, and a raw ASGI route that records what it receives after
its response started (a client that goes away mid-response must show up as http.disconnect).

RECORD_DIR, when set, is where /hold writes what it saw: a file per request, named by the
request's `id` query parameter, so a test can read it whichever worker served it."""
import asyncio
import os

from fastapi import FastAPI, Request, WebSocket, WebSocketDisconnect
from fastapi.responses import StreamingResponse

app = FastAPI()


@app.get("/healthz")
async def healthz():
    return {"ok": True}


@app.get("/json")
async def json_hello():
    return {"message": "Hello, world!"}


@app.get("/stream")
async def stream(chunks: int = 5):
    async def parts():
        for i in range(chunks):
            yield b"part %d\n" % i
            await asyncio.sleep(0)

    return StreamingResponse(parts(), media_type="text/plain")


@app.post("/upload")
async def upload(request: Request):
    """Counts the body as the server hands it over, chunk by chunk (each piece recorded as
    it arrives, under the request's `id`)."""
    received = 0
    pieces = 0
    async for piece in request.stream():
        if piece:
            pieces += 1
            received += len(piece)
            record(request.query_params.get("id"), "piece:%d" % len(piece))
    return {"bytes": received, "pieces": pieces}


@app.websocket("/ws")
async def ws_echo(websocket: WebSocket):
    await websocket.accept()
    try:
        while True:
            message = await websocket.receive()
            if message["type"] == "websocket.disconnect":
                record(websocket.query_params.get("id"), "ws:%s" % message.get("code"))
                return
            if message.get("text") is not None:
                await websocket.send_text(message["text"])
            else:
                await websocket.send_bytes(message.get("bytes") or b"")
    except WebSocketDisconnect as exc:
        record(websocket.query_params.get("id"), "ws:%s" % exc.code)


def record(name, what):
    directory = os.environ.get("RECORD_DIR")
    if directory and name:
        with open(os.path.join(directory, name), "a") as f:
            f.write(what + "\n")


async def hold(scope, receive, send):
    """Starts a chunked response, then waits for what the server says next."""
    name = dict(p.split("=", 1) for p in scope["query_string"].decode().split("&") if "=" in p)
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"text/plain")]})
    await send({"type": "http.response.body", "body": b"first part\n", "more_body": True})
    message = await receive()
    while message["type"] == "http.request" and message.get("more_body"):
        message = await receive()
    if message["type"] == "http.request":
        message = await receive()  # the body is in: the next event is the client's fate
    record(name.get("id"), message["type"])


app.mount("/hold", hold)
