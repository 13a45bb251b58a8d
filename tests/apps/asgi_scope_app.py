"""A plain ASGI app that answers with what its scope says, and which event loop runs it."""
import asyncio
import json


async def app(scope, receive, send):
    if scope["type"] != "http":
        raise ValueError("HTTP only")
    body = json.dumps({"root_path": scope.get("root_path"), "path": scope["path"],
                       "loop": type(asyncio.get_running_loop()).__module__}).encode()
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"application/json")]})
    await send({"type": "http.response.body", "body": body})
