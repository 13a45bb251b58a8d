"""root_path (SCRIPT_NAME for WSGI too) and the asgi: section, uvicorn's meaning."""
import json
import sys

import pytest

from harness import SHIM_DIR, Client, get, wait_until

pytestmark = pytest.mark.timeout(60)


def scope_of(port):
    status, body = get(port, "/x")
    assert status == 200, body
    return json.loads(body)


def test_root_path_reaches_an_asgi_app(listeners, spawn):
    spawn("asgi_scope_app:app", interface="asgi", overrides={"root_path": "/prefix/"}).wait_ready()
    assert scope_of(listeners.port)["root_path"] == "/prefix"


def test_root_path_is_script_name_for_wsgi(listeners, spawn):
    spawn(overrides={"root_path": "/prefix"}).wait_ready()
    env = json.loads(get(listeners.port, "/env")[1])
    assert env["SCRIPT_NAME"] == "/prefix" and env["PATH_INFO"] == "/env"


@pytest.mark.parametrize("choice, module", [("auto", "uvloop"), ("uvloop", "uvloop"),
                                            ("asyncio", "asyncio.unix_events")])
def test_asgi_loop(listeners, spawn, choice, module):
    w = spawn("asgi_scope_app:app", interface="asgi",
              overrides={"asgi": {"loop": choice}}).wait_ready()
    assert scope_of(listeners.port)["loop"] == module
    wait_until(lambda: "ready:" in w.stderr_text(), 10, "the ready line")
    assert "loop %s" % module.split(".")[0] in w.stderr_text()


@pytest.mark.parametrize("choice", ["uvloop", "auto"])
def test_asgi_loop_without_uvloop(listeners, spawn, tmp_path, choice):
    # A uvloop that cannot be imported (here: one that raises, first on the path): `uvloop`
    # fails the boot saying what to install; `auto` serves on asyncio.
    (tmp_path / "uvloop.py").write_text("raise ImportError('uvloop is not installed here')\n")
    w = spawn("asgi_scope_app:app", interface="asgi", pythonpath=[str(tmp_path)],
              overrides={"asgi": {"loop": choice}})
    if choice == "uvloop":
        assert w.wait_exit() == 3
        assert w.wait_message("ERROR")["ERROR"] == (
            "asgi.loop is uvloop, but uvloop cannot be imported (uvloop is not installed "
            "here): install python3-uvloop, or use loop: auto")
    else:
        w.wait_ready()
        assert scope_of(listeners.port)["loop"] == "asyncio.unix_events"


def test_limit_concurrency_answers_503_above_it(listeners, spawn):
    # uvicorn's rule: a request is refused when the open connections (its own included)
    # reach the limit.
    spawn("asgi_scope_app:app", interface="asgi",
          overrides={"asgi": {"limit_concurrency": 2}}).wait_ready()
    first = Client(listeners.port)
    assert first.request("/x")[0] == 200  # one connection: under the limit; kept open
    second = Client(listeners.port)
    status, _, body = second.request("/x")
    assert (status, body) == (503, b"Service Unavailable")
    first.close()
    second.close()


@pytest.mark.parametrize("server_header, date_header", [(False, True), (True, False)])
def test_server_and_date_header_choices(listeners, spawn, server_header, date_header):
    spawn("asgi_scope_app:app", interface="asgi",
          overrides={"asgi": {"server_header": server_header,
                              "date_header": date_header}}).wait_ready()
    c = Client(listeners.port)
    for _ in range(2):  # the first response, and one on a kept-alive connection
        status, headers, _ = c.request("/x")
        assert status == 200
        assert headers.get("Server") == ("molt" if server_header else None)
        assert ("Date" in headers) == date_header
    c.close()


def listen_backlog(sock):
    """The backlog of a listening TCP socket, as the kernel holds it (TCP_INFO tcpi_sacked)."""
    import socket
    import struct

    info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 104)
    return struct.unpack_from("I", info, 28)[0]


@pytest.mark.parametrize("loop", ["uvloop", "asyncio"])
def test_the_shared_listener_keeps_the_masters_backlog(listeners, spawn, loop):
    # uvloop's server listen()s again on the socket it is given: the worker must hand it the
    # backlog the master chose, or every worker would shrink the one shared queue.
    listeners.tcp.listen(777)
    before = listen_backlog(listeners.tcp)
    spawn("asgi_scope_app:app", interface="asgi", overrides={"asgi": {"loop": loop}}).wait_ready()
    assert scope_of(listeners.port)["loop"].startswith(loop)
    assert listen_backlog(listeners.tcp) == before


def test_accepting_workers_auto_is_counted_once_per_interface():
    """`accepting_workers: auto` (-1 from the master) becomes a number before the app's import:
    the CPUs for the ASGI engine, 0 (every worker) for WSGI's threaded workers; a master that
    sends no key meant every worker."""
    sys.path.insert(0, SHIM_DIR)
    from molt_shim import config

    def load(extra):
        return config.load({"MOLT_WORKER_CONFIG": json.dumps({"app": "a:b", **extra})})

    asgi = load({"interface": "asgi", "accepting_workers": -1})
    asgi.resolve_accepting_workers(lambda: 3)
    assert asgi.accepting_workers == 3
    wsgi = load({"interface": "wsgi", "accepting_workers": -1})
    wsgi.resolve_accepting_workers(lambda: 3)
    assert wsgi.accepting_workers == 0
    fixed = load({"interface": "asgi", "accepting_workers": 2})
    fixed.resolve_accepting_workers(lambda: 3)
    assert fixed.accepting_workers == 2
    assert load({"interface": "asgi"}).accepting_workers == 0
