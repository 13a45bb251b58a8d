"""A Starlette app that answers with its request URL and client (tests/e2e/test_edge.py)."""
from starlette.applications import Starlette
from starlette.responses import JSONResponse
from starlette.routing import Route


async def index(request):
    return JSONResponse({"url": str(request.url), "remote": request.client.host})


app = Starlette(routes=[Route("/", index)])
