"""Engine choice (MOLT_WORKER_CONFIG `engine`) and the lifecycle every engine runs under."""
import os
import signal

import pytest

from harness import HAVE_NATIVE, NATIVE_DIR, NATIVE_ENV, SHIM_DIR, Client, get, wait_until

pytestmark = pytest.mark.timeout(30)

NATIVE_PRESENT = os.path.exists(os.path.join(SHIM_DIR, "molt_shim", "engines", "native.py"))


def main_thread_waits_in_epoll(pid):
    with open("/proc/%d/wchan" % pid) as f:
        return f.read() == "do_epoll_wait"


def ready_line(w):
    return wait_until(lambda: [line for line in w.stderr if line.startswith("INFO ready: ")],
                      5, "the ready line")[0]


@pytest.mark.parametrize("engine", ["python", "PYTHON"])
def test_python_serves_with_the_threaded_engine(listeners, spawn, engine):
    w = spawn(engine=engine).wait_ready()
    assert get(listeners.port, "/") == (200, b"hello")
    assert "(engine python: wsgi, 4 threads, parser " in ready_line(w)
    assert "native" not in w.stderr_text()


@pytest.mark.parametrize("engine", [None, "auto"])
def test_auto_without_the_extension_says_so_once_and_serves_with_python(listeners, spawn,
                                                                        engine):
    # The shim imported from the source tree has no extension next to it.
    w = spawn(engine=engine).wait_ready()
    assert get(listeners.port, "/") == (200, b"hello")
    assert "(engine python: wsgi, 4 threads, parser " in ready_line(w)
    lines = [ln for ln in w.stderr if "native engine unavailable" in ln]
    assert len(lines) == 1 and lines[0].startswith("INFO engine auto: "), w.stderr_text()


@pytest.mark.skipif(not HAVE_NATIVE, reason="the native extension is not built")
@pytest.mark.parametrize("engine", [None, "auto"])
def test_auto_means_native_when_the_extension_loads(listeners, spawn, engine):
    w = spawn(engine=engine, pythonpath=[NATIVE_DIR], env=NATIVE_ENV).wait_ready()
    assert get(listeners.port, "/") == (200, b"hello")
    assert "(engine native: wsgi, 4 threads, native engine, parser " in ready_line(w)
    assert "unavailable" not in w.stderr_text()


@pytest.mark.skipif(NATIVE_PRESENT, reason="the native engine is in this tree")
def test_native_engine_missing_fails_boot_clearly(listeners, spawn):
    w = spawn(engine="native")
    assert w.wait_exit() == 3
    error = w.wait_message("ERROR")["ERROR"]
    assert error.startswith("engine native is not available in this molt"), error
    assert "use engine: auto or python" in error
    assert not w.find("READY")


def test_unknown_engine_fails_boot(listeners, spawn):
    w = spawn(engine="turbo")
    assert w.wait_exit() == 3
    assert w.wait_message("ERROR")["ERROR"] == \
        "unknown engine 'turbo' (expected auto, native, python)"


def test_native_engine_with_asgi_fails_boot(listeners, spawn):
    w = spawn("asgi_app:app", interface="asgi", engine="native")
    assert w.wait_exit() == 3
    assert "engine native serves WSGI only" in w.wait_message("ERROR")["ERROR"]


@pytest.mark.parametrize("interface", ["wsgi", "asgi"])
def test_sigterm_wakes_an_idle_worker_at_once(listeners, spawn, interface):
    # A heartbeat interval far beyond the test's bound: the drain can only start in time if
    # the signal itself wakes the serving loop (the handler only queues it).
    app = "asgi_app:app" if interface == "asgi" else "edge_app:application"
    w = spawn(app, interface=interface, overrides={"heartbeat_interval_ms": 60000}).wait_ready()
    w.wait_message("WATCHDOG")  # the serving loop has ticked once; now it sleeps ~60 s
    wait_until(lambda: main_thread_waits_in_epoll(w.pid), 5, "the serving loop asleep")
    w.signal(signal.SIGTERM)
    w.wait_message("STOPPING", timeout=5)
    assert w.wait_exit(timeout=5) == 0
    assert "draining (SIGTERM)" in w.stderr_text()


@pytest.mark.parametrize("interface", ["wsgi", "asgi"])
def test_sigusr1_is_queued_and_serving_goes_on(listeners, spawn, interface):
    app = "asgi_app:app" if interface == "asgi" else "edge_app:application"
    w = spawn(app, interface=interface, overrides={"logging": {"access_log": True}}).wait_ready()
    c = Client(listeners.port)
    for _ in range(3):
        w.signal(signal.SIGUSR1)
        assert c.request("/")[0] == 200
    c.close()
    assert w.alive()
    w.drain()
    assert w.wait_exit() == 0
    assert not w.find("ERROR")


@pytest.mark.parametrize("interface", ["wsgi", "asgi"])
def test_one_drain_however_many_requests_for_it(listeners, spawn, interface):
    # DRAIN, SIGTERM and the channel's EOF all ask for the same drain: one STOPPING, exit 0.
    app = "asgi_app:app" if interface == "asgi" else "edge_app:application"
    w = spawn(app, interface=interface).wait_ready()
    w.drain()
    w.signal(signal.SIGTERM)
    w.close_channel()
    assert w.wait_exit() == 0
    assert len(w.find("STOPPING")) <= 1
    assert w.stderr_text().count("draining (") == 1
