"""Figure 2's framework app: FastAPI (Debian's python3-fastapi) with a JSON endpoint and a
WebSocket echo, the two things the ASGI section measures on top of the plain callable."""
from fastapi import FastAPI, WebSocket, WebSocketDisconnect

app = FastAPI()


@app.get("/")
async def index():
    return {"ok": True}  # the bench's readiness probe asks for /


@app.get("/json")
async def json_hello():
    return {"message": "Hello, world!"}


@app.websocket("/ws")
async def ws_echo(websocket: WebSocket):
    await websocket.accept()
    try:
        while True:
            await websocket.send_text(await websocket.receive_text())
    except WebSocketDisconnect:
        pass
