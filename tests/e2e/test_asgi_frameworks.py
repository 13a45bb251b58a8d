"""ASGI frameworks and WebSockets behind the real master: FastAPI (JSON, a streaming response,
a request body streamed in chunks, a WebSocket echo), a client that leaves mid-response, the
asgi.ws_* keys, WebSockets drained with a close frame at a rollover, and fifty ASGI rollovers
under wrk keep-alive load."""
from __future__ import annotations

import asyncio
import base64
import json
import os
import signal
import socket
import struct

import pytest

from molt_testlib import APPS, Wrk, dechunk, read_to_eof, wait_until


def fastapi(molt, tmp_path, workers=2, subdir="molt", **extra):
    record = tmp_path / "record"
    record.mkdir(exist_ok=True)
    config = {"app": "fastapi_app:app", "interface": "asgi", "chdir": str(APPS),
              "workers": workers, "health": {"path": "/healthz"},
              "env": {"RECORD_DIR": str(record)}}
    config.update(extra)
    return molt(config, subdir=subdir), record


def recorded(record, name):
    path = record / name
    return path.read_text().split() if path.exists() else []


def json_body(raw):
    head, _, body = raw.partition(b"\r\n\r\n")
    if b"transfer-encoding: chunked" in head.lower():
        body = dechunk(body)
    return json.loads(body)


@pytest.mark.timeout(120)
def test_fastapi_json_streaming_chunked_upload_and_websocket_echo(molt, tmp_path):
    import websockets

    m, record = fastapi(molt, tmp_path)
    status, _, body = m.get("/json")
    assert (status, json.loads(body)) == (200, {"message": "Hello, world!"})

    status, headers, body = m.get("/stream?chunks=4")
    assert status == 200 and headers["transfer-encoding"] == "chunked"
    assert body == b"part 0\npart 1\npart 2\npart 3\n"

    # A chunked request body, each chunk sent only once the app has read the one before: the
    # app reads the body as a stream while it arrives, not once it is all in.
    chunks = [b"a" * 1000, b"b" * 3000, b"c" * 5]
    head = (b"POST /upload?id=up HTTP/1.1\r\nHost: t\r\n"
            b"Content-Type: application/octet-stream\r\n"
            b"Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n")
    with socket.create_connection(("127.0.0.1", m.port), timeout=10) as s:
        s.sendall(head)
        for n, chunk in enumerate(chunks, 1):
            s.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
            wait_until(lambda: len(recorded(record, "up")) == n, 10, f"the app to read chunk {n}")
        s.sendall(b"0\r\n\r\n")
        raw = read_to_eof(s)
    assert raw.startswith(b"HTTP/1.1 200 "), raw
    assert json_body(raw) == {"bytes": 4005, "pieces": 3}
    assert recorded(record, "up") == ["piece:1000", "piece:3000", "piece:5"]

    async def echo():
        async with websockets.connect(f"ws://127.0.0.1:{m.port}/ws") as ws:
            await ws.send("text over molt")
            text = await ws.recv()
            await ws.send(b"\x00\x01binary")
            return text, await ws.recv()

    assert asyncio.run(echo()) == ("text over molt", b"\x00\x01binary")


@pytest.mark.timeout(60)
def test_a_client_that_leaves_mid_response_is_an_http_disconnect_for_the_app(molt, tmp_path):
    m, record = fastapi(molt, tmp_path)
    with socket.create_connection(("127.0.0.1", m.port), timeout=10) as s:
        s.sendall(b"GET /hold/?id=left HTTP/1.1\r\nHost: t\r\n\r\n")
        got = b""
        while b"first part" not in got:
            chunk = s.recv(4096)
            assert chunk, got
            got += chunk
        assert got.startswith(b"HTTP/1.1 200 ")
    wait_until(lambda: recorded(record, "left") == ["http.disconnect"], 10,
               "the app to see http.disconnect", on_timeout=m.log)


@pytest.mark.timeout(120)
def test_websockets_are_drained_with_close_code_1012_at_a_rollover(molt, tmp_path):
    import websockets

    m, record = fastapi(molt, tmp_path)

    async def scenario():
        async with websockets.connect(f"ws://127.0.0.1:{m.port}/ws?id=drained") as ws:
            await ws.send("before")
            assert await ws.recv() == "before"
            answer = await asyncio.get_running_loop().run_in_executor(None, m.reload)
            assert answer["ok"] is True, answer
            with pytest.raises(websockets.ConnectionClosed) as closed:
                await asyncio.wait_for(ws.recv(), 30)
            return closed.value

    closed = asyncio.run(scenario())
    assert closed.rcvd is not None, "no close frame from the server"
    assert (closed.rcvd.code, closed.rcvd.reason) == (1012, "service restart")
    wait_until(lambda: recorded(record, "drained") == ["ws:1012"], 10,
               "the app to see websocket.disconnect 1012", on_timeout=m.log)
    assert m.get("/json")[0] == 200


# --- the asgi.ws_* keys, seen on the wire --------------------------------------------------

def ws_handshake(port, extensions=""):
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    key = base64.b64encode(os.urandom(16)).decode()
    s.sendall(("GET /ws HTTP/1.1\r\nHost: t\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
               "Sec-WebSocket-Key: %s\r\nSec-WebSocket-Version: 13\r\n%s\r\n"
               % (key, extensions)).encode())
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = s.recv(1)
        assert chunk, head
        head += chunk
    assert head.startswith(b"HTTP/1.1 101 "), head
    return s, head.decode("latin-1").lower()


def read_frame(s):
    """One frame from the server (never masked): (opcode, payload)."""
    def exactly(n):
        data = b""
        while len(data) < n:
            chunk = s.recv(n - len(data))
            if not chunk:
                raise EOFError("connection closed after %d of %d bytes" % (len(data), n))
            data += chunk
        return data

    first, second = exactly(2)
    size = second & 0x7F
    if size == 126:
        size = struct.unpack("!H", exactly(2))[0]
    elif size == 127:
        size = struct.unpack("!Q", exactly(8))[0]
    return first & 0x0F, exactly(size)


def client_frame(opcode, payload):
    mask = os.urandom(4)
    size = len(payload)
    head = bytes([0x80 | opcode])
    if size < 126:
        head += bytes([0x80 | size])
    elif size < 65536:
        head += bytes([0x80 | 126]) + struct.pack("!H", size)
    else:
        head += bytes([0x80 | 127]) + struct.pack("!Q", size)
    return head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


@pytest.mark.timeout(120)
def test_ws_max_size_closes_with_1009_and_deflate_follows_the_key(molt, tmp_path):
    m, _ = fastapi(molt, tmp_path, workers=1,
                   asgi={"ws_max_size": "1KiB", "ws_per_message_deflate": False})
    offer = "Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits\r\n"
    s, head = ws_handshake(m.port, offer)
    with s:
        assert "permessage-deflate" not in head  # not negotiated: the key is false
        s.sendall(client_frame(0x1, b"x" * 1024))  # at the limit: echoed
        assert read_frame(s) == (0x1, b"x" * 1024)
        s.sendall(client_frame(0x1, b"x" * 1025))  # over it: close 1009 (message too big)
        opcode, payload = read_frame(s)
        assert opcode == 0x8 and struct.unpack("!H", payload[:2])[0] == 1009, payload
    m.stop()

    m2, _ = fastapi(molt, tmp_path, workers=1, subdir="molt2")  # the default: deflate offered and accepted
    s, head = ws_handshake(m2.port, offer)
    with s:
        assert "sec-websocket-extensions: permessage-deflate" in head


@pytest.mark.timeout(120)
def test_ws_ping_interval_and_timeout(molt, tmp_path):
    m, _ = fastapi(molt, tmp_path, workers=1,
                   asgi={"ws_ping_interval": "300ms", "ws_ping_timeout": "300ms"})
    s, _ = ws_handshake(m.port)
    with s:
        # A client that answers the first ping stays open...
        opcode, payload = read_frame(s)
        assert opcode == 0x9  # ping
        s.sendall(client_frame(0xA, payload))  # pong
        opcode, payload = read_frame(s)
        assert opcode == 0x9  # the next ping: the connection lives on
        # ...and one that stops answering is closed after ws_ping_timeout.
        frames = []
        try:
            while True:
                frames.append(read_frame(s)[0])
        except (EOFError, ConnectionResetError):
            pass
        assert set(frames) <= {0x8, 0x9}, frames  # pings, perhaps a close frame, then EOF


@pytest.mark.timeout(300)
def test_fifty_asgi_rollovers_under_keepalive_load(molt, tmp_path):
    m, _ = fastapi(molt, tmp_path)
    load = Wrk(m.url("/json"), duration=120, connections=32)
    try:
        for i in range(50):
            # A WebSocket open across every rollover: its worker drains it with a close frame.
            ws, _ = ws_handshake(m.port)
            before = m.live_generation()
            m.signal(signal.SIGHUP)
            wait_until(lambda: (m.live_generation() or 0) > before, 30, f"rollover {i + 1}",
                       on_timeout=m.log)
            with ws:
                opcode, payload = read_frame(ws)
                while opcode == 0x9:  # a ping (asgi.ws_ping_interval) may come first
                    opcode, payload = read_frame(ws)
            assert (opcode, payload[:2]) == (0x8, struct.pack("!H", 1012)), (i, payload)
    finally:
        result = load.stop()
    assert result["requests"] > 2000, result["output"]
    assert result["connect"] == result["read"] == result["write"] == result["timeout"] == 0, \
        result["output"]
    assert result["non2xx"] == 0, result["output"]
    # A rollover is counted once the old workers confirmed STOPPING=1, a moment after the new
    # generation is live (which is all the loop above waits for).
    wait_until(lambda: m.status()["rollovers"] == {"ok": 50, "failed": 0}, 30,
               "the last rollover to be counted", on_timeout=m.log)
