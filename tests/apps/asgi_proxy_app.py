"""An ASGI app that answers with what its scope says about the client, server, scheme and host
(tests/shim/test_proxy_headers.py)."""
import json


async def app(scope, receive, send):
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
    hosts = [v.decode("latin-1") for k, v in scope["headers"] if k == b"host"]
    client = scope.get("client")
    server = scope.get("server")
    answer = {"scheme": scope["scheme"], "client": list(client) if client else None,
              "server": list(server) if server else None, "host": hosts}
    tls = scope.get("extensions", {}).get("tls")
    if tls is not None:  # a TLS connection: the ASGI TLS extension (tests/shim/test_tls.py)
        answer["tls"] = tls
    if scope["type"] == "websocket":  # the same, as the one message of a WebSocket
        await receive()  # websocket.connect
        await send({"type": "websocket.accept"})
        await send({"type": "websocket.send", "text": json.dumps(answer)})
        await send({"type": "websocket.close"})
        return
    body = json.dumps(answer).encode()
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"application/json")]})
    await send({"type": "http.response.body", "body": body})
