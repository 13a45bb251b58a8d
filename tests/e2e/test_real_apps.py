"""Real apps from Debian packages behind the real master: Django, and an ASGI Starlette app
with WebSockets. (Fifty rollovers under wrk keep-alive load: Flask and Django in
test_native_engine_e2e.py, FastAPI in test_asgi_frameworks.py, the Python engine in
test_rollover_flask.py.)"""
from __future__ import annotations

import asyncio
import shutil

import pytest

from molt_testlib import APPS, Wrk


def copy_django(tmp_path):
    site = tmp_path / "django_site"
    shutil.copytree(APPS / "django_site", site)
    return site


@pytest.mark.timeout(120)
def test_django_serves_and_a_broken_view_module_fails_the_rollover_not_the_user(molt, tmp_path):
    site = copy_django(tmp_path)
    m = molt({"app": "mysite.wsgi:application", "chdir": str(site), "workers": 2, "threads": 2,
              "health": {"path": "/healthz"},
              "env": {"DJANGO_SETTINGS_MODULE": "mysite.settings"}})
    assert m.get("/")[2] == b"django says hi"

    # The deploy bug: the URLconf now points at a views module that cannot be imported.
    # Django imports it lazily, on the first request; the warm-up request is that request.
    m.config["env"]["DJANGO_URLCONF"] = "mysite.urls_broken"
    m.write_config()
    load = Wrk(m.url("/"), duration=6, connections=8)
    try:
        answer = m.reload()
    finally:
        result = load.result()
    assert answer["ok"] is False
    assert "exited with status 4 (warm-up request failed)" in answer["error"]
    assert "module_that_does_not_exist" in answer["error"] or "500" in answer["error"]
    assert result["failed"] == 0, result["output"]
    assert m.get("/")[2] == b"django says hi"


@pytest.mark.timeout(120)
def test_asgi_app_with_lifespan_and_websockets_rolls_over_without_errors(molt, tmp_path):
    import websockets

    m = molt({"app": "asgi_app:app", "interface": "asgi", "chdir": str(APPS), "workers": 2,
              "health": {"path": "/healthz"}})
    assert m.get("/")[2] == b"asgi hello"

    async def echo():
        async with websockets.connect(f"ws://127.0.0.1:{m.port}/ws") as ws:
            await ws.send("ping over molt")
            return await ws.recv()

    assert asyncio.run(echo()) == "echo:ping over molt"
    load = Wrk(m.url("/"), duration=10, connections=16)
    try:
        for _ in range(3):
            assert m.reload()["ok"] is True
    finally:
        result = load.stop()
    assert result["failed"] == 0, result["output"]
    assert asyncio.run(echo()) == "echo:ping over molt"
    assert m.live_generation() == 4
