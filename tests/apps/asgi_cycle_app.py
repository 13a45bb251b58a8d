"""Raw ASGI app for molt's request cycle (engines/asgi_cycle.py): each route one behaviour."""
import asyncio


async def app(scope, receive, send):
    if scope["type"] != "http":
        return  # lifespan: auto serves an app that returns from the lifespan scope
    path = scope["path"]
    if path == "/head-then-wait":
        # The head must reach the client while the body is still being made.
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"text/plain")]})
        await asyncio.sleep(float(scope["query_string"] or b"2"))
        await send({"type": "http.response.body", "body": b"late body"})
        return
    if path == "/crlf-in-header":
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"x-injected", b"a\r\nx-evil: 1")]})
        await send({"type": "http.response.body", "body": b"never"})
        return
    if path == "/raise-after-start":
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"text/plain")]})
        raise RuntimeError("boom after the head")
    if path == "/list-headers":
        # Header pairs as lists, not tuples (some frameworks build them so).
        await send({"type": "http.response.start", "status": 200,
                    "headers": [[b"content-type", b"text/plain"], [b"content-length", b"2"]]})
        await send({"type": "http.response.body", "body": b"ok"})
        return
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"text/plain"), (b"content-length", b"5")]})
    await send({"type": "http.response.body", "body": b"hello"})
