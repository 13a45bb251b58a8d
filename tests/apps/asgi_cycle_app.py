"""Raw ASGI app for molt's request cycle (engines/asgi_cycle.py): each route one behaviour."""
import asyncio
import sys


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
    if path == "/head-from-another-task":
        # The same, with the response sent from a task of the app's own: the head must not
        # wait for the request's task to suspend or end.
        async def respond():
            await send({"type": "http.response.start", "status": 200,
                        "headers": [(b"content-type", b"text/plain")]})
            await asyncio.sleep(float(scope["query_string"] or b"2"))
            await send({"type": "http.response.body", "body": b"late body"})

        await asyncio.get_running_loop().create_task(respond())
        return
    if path == "/two-receivers":
        # A disconnect listener (Starlette's StreamingResponse has one) and a second receive()
        # that is cancelled while both wait: the listener must still hear the disconnect.
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"text/plain")]})
        await send({"type": "http.response.body", "body": b"first", "more_body": True})

        async def listener():
            while (await receive())["type"] != "http.disconnect":
                pass
            print("listener saw http.disconnect", file=sys.stderr, flush=True)

        heard = asyncio.ensure_future(listener())
        await asyncio.sleep(0.05)
        try:
            await asyncio.wait_for(receive(), 0.05)
        except asyncio.TimeoutError:
            pass
        print("second receive cancelled", file=sys.stderr, flush=True)
        await asyncio.wait_for(heard, 10)
        return
    if path == "/crlf-in-header":
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"x-injected", b"a\r\nx-evil: 1")]})
        await send({"type": "http.response.body", "body": b"never"})
        return
    if path == "/crlf-in-header-name":
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"x-injected\r\nx-evil", b"1")]})
        await send({"type": "http.response.body", "body": b"never"})
        return
    if path == "/space-in-header-name":
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"x-evil bad", b"1")]})
        await send({"type": "http.response.body", "body": b"never"})
        return
    if path == "/raise-after-start":
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"text/plain")]})
        raise RuntimeError("boom after the head")
    if path == "/stream-to-slow-reader":
        # More than every buffer between here and a client that does not read: send() must
        # wait for it (flow control), and a send() given up while it waits must not break the
        # ones after it.
        chunks = int(scope["query_string"] or b"512")
        chunk = b"x" * 65536
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"application/octet-stream")]})
        given_up = 0
        for _ in range(chunks):
            while True:
                try:
                    await asyncio.wait_for(send({"type": "http.response.body", "body": chunk,
                                                 "more_body": True}), 0.3)
                    break
                except asyncio.TimeoutError:  # still waiting for the client: send it again
                    if not given_up:
                        print("a send waited for the client", file=sys.stderr, flush=True)
                    given_up += 1
        await send({"type": "http.response.body", "body": b""})
        print("streamed %d chunks" % chunks, file=sys.stderr, flush=True)
        return
    if path == "/list-headers":
        # Header pairs as lists, not tuples (some frameworks build them so).
        await send({"type": "http.response.start", "status": 200,
                    "headers": [[b"content-type", b"text/plain"], [b"content-length", b"2"]]})
        await send({"type": "http.response.body", "body": b"ok"})
        return
    if path == "/events":
        # An endless stream (bounded: 30 s) that stops when its client leaves, as a
        # server-sent-events endpoint does: it must hear http.disconnect.
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"text/event-stream")]})
        gone = asyncio.Event()

        async def listener():
            while (await receive())["type"] != "http.disconnect":
                pass
            gone.set()

        heard = asyncio.ensure_future(listener())
        sent = 0
        while not gone.is_set() and sent < 300:
            await send({"type": "http.response.body", "body": b"data: %d\n\n" % sent,
                        "more_body": True})
            sent += 1
            await asyncio.sleep(0.1)
        heard.cancel()
        print("events: %s after %d" % ("saw http.disconnect" if gone.is_set() else "never heard",
                                       sent), file=sys.stderr, flush=True)
        return
    if path == "/one-big-message":
        # The whole body in one message (all of it in the transport's buffer at once).
        size = int(scope["query_string"] or b"33554432")
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"application/octet-stream"),
                                (b"content-length", b"%d" % size)]})
        await send({"type": "http.response.body", "body": b"x" * size})
        return
    if path == "/not-modified":
        # A 304 with the Content-Length the 200 would have had (RFC 9110 §8.6), and no body.
        await send({"type": "http.response.start", "status": 304,
                    "headers": [(b"etag", b'"v1"'), (b"content-length", b"5")]})
        await send({"type": "http.response.body", "body": b""})
        return
    if path == "/echo-body":
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-length", b"%d" % len(body))]})
        await send({"type": "http.response.body", "body": body})
        return
    if path == "/negative-length":
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-length", b"-1")]})
        await send({"type": "http.response.body", "body": b"abcdef"})
        return
    if path == "/side-effect":
        print("side effect ran", file=sys.stderr, flush=True)
    if path == "/no-length":
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"hel", "more_body": True})
        await send({"type": "http.response.body", "body": b"lo"})
        return
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"text/plain"), (b"content-length", b"5")]})
    await send({"type": "http.response.body", "body": b"hello"})
