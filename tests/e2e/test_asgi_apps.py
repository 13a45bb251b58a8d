"""ASGI apps behind the real master: the Django project `django-admin startproject` generates,
served through its asgi.py, an app whose lifespan startup fails a rollover, and
timeouts.request on an ASGI worker."""
from __future__ import annotations

import socket
import subprocess

import pytest

from molt_testlib import APPS, PYTHON, Wrk, process_running, read_to_eof, wait_until


def startproject(tmp_path):
    """The project exactly as a new user gets it (generated now, not checked in)."""
    site = tmp_path / "site"
    site.mkdir()
    subprocess.run([PYTHON, "-m", "django", "startproject", "mysite", str(site)], check=True)
    # Only ALLOWED_HOSTS on top, in a module of its own: the generated files stay as they are
    # (asgi.py only setdefault()s DJANGO_SETTINGS_MODULE, so the environment picks this one).
    (site / "mysite" / "molt_test_settings.py").write_text(
        'from .settings import *  # noqa: F401,F403\nALLOWED_HOSTS = ["test", "localhost"]\n')
    return site


@pytest.mark.timeout(120)
def test_the_generated_django_project_boots_through_its_asgi_py(molt, tmp_path):
    site = startproject(tmp_path)
    # Django raises on the lifespan scope; lifespan: auto (the default) serves it without.
    m = molt({"app": "mysite.asgi:application", "interface": "asgi", "chdir": str(site),
              "workers": 2, "health": {"path": "/admin/login/"},
              "env": {"DJANGO_SETTINGS_MODULE": "mysite.molt_test_settings"}})
    status, _, body = m.get("/admin/login/")
    assert status == 200
    assert b"Django administration" in body
    # No static route is configured for ASGI: an explicit 404, not a hang or a 500.
    assert m.get("/static/admin/css/base.css")[0] == 404
    assert m.reload()["ok"] is True
    assert m.get("/admin/login/")[0] == 200


@pytest.mark.timeout(120)
def test_a_failed_lifespan_startup_fails_the_rollover_and_the_old_generation_serves(molt):
    m = molt({"app": "lifespan_app:app", "interface": "asgi", "chdir": str(APPS), "workers": 2,
              "health": {"path": "/"}})
    assert m.get("/")[2] == b"lifespan ran"

    # The deploy bug: the new release's startup cannot reach its database.
    m.config["env"] = {"LIFESPAN_BROKEN": "1"}
    m.write_config()
    load = Wrk(m.url("/"), duration=6, connections=8)
    try:
        answer = m.reload()
    finally:
        result = load.result()
    assert answer["ok"] is False
    assert "exited with status 5 (ASGI lifespan startup failed)" in answer["error"]
    assert "warm-up" not in answer["error"]
    assert result["failed"] == 0, result["output"]
    assert m.get("/")[2] == b"lifespan ran"
    assert m.live_generation() == 1


@pytest.mark.timeout(120)
def test_timeouts_request_aborts_an_asgi_worker_whose_request_hangs(molt):
    m = molt({"app": "asgi_app:app", "interface": "asgi", "chdir": str(APPS), "workers": 1,
              "health": {"path": "/healthz"}, "timeouts": {"request": "2s"}})
    with socket.create_connection(("127.0.0.1", m.port), timeout=30) as hung:
        hung.sendall(b"GET /slow?s=600 HTTP/1.1\r\nHost: t\r\n\r\n")
        wait_until(lambda: "(timeouts.request is " in m.log(), 30, "the request timeout",
                   on_timeout=m.log)
        assert read_to_eof(hung) == b""  # the worker was aborted: no answer, a closed socket
    wait_until(lambda: m.get("/")[0] == 200, 30, "a replacement worker serving")


@pytest.mark.timeout(60)
def test_a_drain_that_runs_out_of_time_still_runs_the_lifespan_shutdown_and_the_exit_hook(
        molt, tmp_path):
    """A worker whose drain reaches timeouts.graceful (a request that will not end) stops
    waiting a moment before the master's SIGKILL: the request's task is cancelled, then the
    lifespan shutdown and hooks.worker_exit run. It waited for all of graceful, and the
    master's kill came in the same millisecond as its way out."""
    files = {name: tmp_path / name for name in ("shutdown", "exits", "cancelled")}
    m = molt({"app": "asgi_app:app", "interface": "asgi", "chdir": str(APPS), "workers": 1,
              "timeouts": {"graceful": "4s"}, "hooks": {"worker_exit": "asgi_app:worker_exit"},
              "env": {"ASGI_SHUTDOWN_MARKER": str(files["shutdown"]),
                      "EXIT_LOG": str(files["exits"]),
                      "ASGI_CANCEL_MARKER": str(files["cancelled"])}})
    (old,) = m.worker_pids()
    hung = socket.create_connection(("127.0.0.1", m.port), timeout=30)
    hung.sendall(b"GET /slow?s=60 HTTP/1.1\r\nHost: t\r\n\r\n")
    wait_until(lambda: any(w["pid"] == old and w["inflight"] >= 1 for w in m.workers()), 10,
               "the request in flight (a heartbeat says so)")
    assert m.reload()["ok"] is True
    wait_until(lambda: not process_running(old), 10, "the old worker gone")
    hung.close()
    assert files["cancelled"].read_text() == "cancelled"
    assert files["shutdown"].read_text() == "stopped"
    assert files["exits"].read_text().split() == [str(old)]
    # The worker is a zombie before the master reaps it and logs how it ended: wait for that
    # line, then say which ending it was (a SIGKILL at graceful is the failure).
    wait_until(lambda: f"pid={old} worker slot=0: draining -> exited" in m.log(), 10,
               "the master's line for the old worker's exit", on_timeout=m.log)
    assert f"pid={old} worker slot=0: draining -> exited (exited with status 0)" in m.log()
    wait_until(lambda: "a request cancelled at the end of the drain: GET /slow" in m.log(), 10,
               "the worker's line for the cancelled request", on_timeout=m.log)

