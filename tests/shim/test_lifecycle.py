"""Boot, protocol messages, signals and exit codes of a worker, against real apps."""
import json
import os
import signal
import socket

import pytest

from harness import APPS_DIR, Client, get, wait_until

pytestmark = pytest.mark.timeout(60)

DJANGO = os.path.join(APPS_DIR, "django_site")


def test_ready_then_drain_exits_zero(listeners, spawn):
    w = spawn(health_path="/healthz").wait_ready()
    assert get(listeners.port, "/") == (200, b"hello")
    w.drain()
    assert w.wait_exit() == 0
    assert "drained" in w.stderr_text()


@pytest.mark.parametrize("release", ["a", "b"])
def test_flask_release_answers_its_version(listeners, spawn, release):
    w = spawn("app:app", chdir=os.path.join(APPS_DIR, "flask_release_" + release),
              health_path="/healthz").wait_ready()
    assert get(listeners.port, "/") == (200, ("release-" + release).encode())
    w.drain()
    assert w.wait_exit() == 0


def test_django_site_serves(listeners, spawn):
    w = spawn("mysite.wsgi:application", chdir=DJANGO, health_path="/healthz",
              env={"DJANGO_SETTINGS_MODULE": "mysite.settings"}).wait_ready()
    assert get(listeners.port, "/") == (200, b"django says hi")
    w.drain()
    assert w.wait_exit() == 0


def test_django_broken_view_fails_warmup_exit_4(listeners, spawn):
    w = spawn("mysite.wsgi:application", chdir=DJANGO, health_path="/healthz",
              env={"DJANGO_SETTINGS_MODULE": "mysite.settings",
                   "DJANGO_URLCONF": "mysite.urls_broken"})
    assert w.wait_exit() == 4
    error = w.wait_message("ERROR")["ERROR"]
    assert error.startswith("warm-up GET /healthz answered 500")
    assert not w.find("READY")
    assert "module_that_does_not_exist" in w.stderr_text()  # Django logs the traceback


def test_warmup_non_2xx_exit_4(listeners, spawn):
    w = spawn("warmup_fail_app:application", health_path="/healthz")
    assert w.wait_exit() == 4
    assert w.wait_message("ERROR")["ERROR"] == \
        "warm-up GET /healthz answered 503: database unreachable"


def test_import_error_exit_3(listeners, spawn):
    w = spawn("import_error_app:application")
    assert w.wait_exit() == 3
    error = w.wait_message("ERROR")["ERROR"]
    assert error.startswith("RuntimeError: deliberate import failure in import_error_app")
    assert "\n" not in error
    assert "Traceback (most recent call last)" in w.stderr_text()


def test_missing_module_and_attribute_exit_3(listeners, spawn):
    w1 = spawn("no_such_module_xyz:app")
    w2 = spawn("edge_app:nope")
    assert w1.wait_exit() == 3 and w2.wait_exit() == 3
    assert "ModuleNotFoundError" in w1.wait_message("ERROR")["ERROR"]
    assert "AttributeError" in w2.wait_message("ERROR")["ERROR"]


def test_hanging_import_never_ready(listeners, spawn):
    w = spawn("hang_app:application")
    with pytest.raises(AssertionError):
        w.wait_message("READY", timeout=1.0)
    assert w.alive()  # the master's boot timeout deals with it; we only prove it hangs


def test_heartbeat_counters(listeners, spawn):
    w = spawn().wait_ready()
    c = Client(listeners.port)
    for _ in range(5):
        assert c.request("/")[0] == 200
    c.close()
    beat = wait_until(lambda: [m for m in w.find("WATCHDOG") if m.get("REQUESTS") == "5"], 10,
                      "heartbeat with REQUESTS=5")[0]
    assert beat["WATCHDOG"] == "1" and beat["INFLIGHT"] == "0" and beat["OLDEST_MS"] == "0"
    assert int(beat["RSS"]) > 1_000_000


def test_retire_on_max_requests(listeners, spawn):
    w = spawn(overrides={"recycle": {"max_requests": 3, "max_requests_jitter": 0}}).wait_ready()
    c = Client(listeners.port)
    for _ in range(2):
        c.request("/")
    assert not w.find("RETIRE")
    c.request("/")
    assert w.wait_message("RETIRE", 5)["RETIRE"] == "max_requests"
    assert c.request("/")[0] == 200  # keeps serving until DRAIN
    assert len(w.find("RETIRE")) == 1
    c.close()
    w.drain()
    assert w.wait_exit() == 0


def test_sigabrt_dumps_all_threads(listeners, spawn):
    w = spawn(threads=3).wait_ready()
    w.signal(signal.SIGABRT)
    assert w.wait_exit() == -signal.SIGABRT
    text = w.stderr_text()
    assert "Fatal Python error: Aborted" in text
    assert text.count("hread 0x") >= 4  # "Current thread" (the loop) + three serving threads
    assert "_thread_main" in text


def test_channel_eof_drains_and_exits_zero(listeners, spawn):
    w = spawn().wait_ready()
    w.close_channel()
    assert w.wait_exit() == 0
    assert "master channel closed" in w.stderr_text()


def test_a_worker_whose_channel_closed_before_ready_never_serves(listeners, spawn, tmp_path):
    # A zygote killed with a fork unanswered: the master forgets the request and closes its
    # end of that worker's channel. The worker went on to serve, untracked, until it noticed.
    (tmp_path / "slow_import.py").write_text(
        "import time\ntime.sleep(1.5)\n\n\n"
        "def application(environ, start_response):\n"
        "    start_response('200 OK', [])\n    return [b'served']\n")
    w = spawn("slow_import:application", chdir=str(tmp_path))
    w.close_channel()  # during the import: READY cannot be delivered
    assert w.wait_exit() == 1
    text = w.stderr_text()
    assert "exiting without serving" in text, text
    assert "ready:" not in text


def test_sigterm_drains(listeners, spawn):
    w = spawn().wait_ready()
    w.signal(signal.SIGTERM)
    assert w.wait_exit() == 0
    assert "draining (SIGTERM)" in w.stderr_text()


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGQUIT])
def test_fast_exit_signals(listeners, spawn, sig):
    w = spawn().wait_ready()
    c = Client(listeners.port)
    c.send(b"GET /slow?s=30 HTTP/1.1\r\nHost: t\r\n\r\n")
    wait_until(lambda: [m for m in w.find("WATCHDOG") if m["INFLIGHT"] == "1"], 10, "in flight")
    w.signal(sig)
    assert w.wait_exit(5) == 0  # prompt, despite the 30 s request
    c.close()


def test_sighup_ignored_sigusr1_and_reopen_logs_harmless(listeners, spawn):
    w = spawn(overrides={"logging": {"access_log": True}}).wait_ready()
    w.signal(signal.SIGHUP)
    w.signal(signal.SIGUSR1)
    w.send("REOPEN_LOGS=1")
    assert get(listeners.port, "/") == (200, b"hello")
    assert w.alive()


def test_notify_socket_and_listen_vars_hidden(listeners, spawn):
    spawn(env={"NOTIFY_SOCKET": "/run/systemd/notify", "LISTEN_FDS": "2",
                   "LISTEN_PID": "1", "LISTEN_FDNAMES": "a:b"}).wait_ready()
    env = json.loads(get(listeners.port, "/env")[1])
    assert env["NOTIFY_SOCKET"] is None and env["LISTEN_FDS"] is None


def test_listener_fds_not_inherited_by_app_children(listeners, spawn):
    # The shim marks the inherited fds close-on-exec so an app's subprocess cannot keep a
    # listener (or the channel) alive after the worker is gone.
    w = spawn().wait_ready()
    fds = os.listdir("/proc/%d/fd" % w.pid)
    assert "3" in fds
    with open("/proc/%d/fdinfo/3" % w.pid) as f:
        flags = int([line for line in f if line.startswith("flags:")][0].split()[1], 8)
    assert flags & 0o2000000  # O_CLOEXEC


def test_access_log_to_stdout(listeners, spawn):
    w = spawn(overrides={"logging": {"access_log": True}}).wait_ready()
    get(listeners.port, "/?x=1")
    line = wait_until(lambda: [ln for ln in w.stdout if '"GET /?x=1 HTTP/1.1"' in ln], 5,
                      "access log line")[0]
    assert line.startswith("127.0.0.1:") and " 200 5 " in line and line.endswith("gen=1 worker=0")


def test_drain_closes_idle_keepalive_gracefully(listeners, spawn):
    w = spawn().wait_ready()
    c = Client(listeners.port)
    assert c.request("/")[0] == 200
    w.drain()
    assert c.read_all(10) == b""  # clean FIN (shutdown before close), not a reset
    assert w.wait_exit() == 0
    c.close()


def test_unix_listener_closed_on_drain_but_still_bound(listeners, spawn):
    # Draining must not shutdown() the shared socket: the master's socket keeps listening.
    w = spawn().wait_ready()
    w.drain()
    assert w.wait_exit() == 0
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(5)
    s.connect(listeners.unix_path)  # queued in the backlog for the next generation
    s.close()


def test_connection_queued_during_drain_is_served_by_the_next_worker(listeners, spawn):
    # A draining worker closes only its own descriptor: a connection waiting in the shared
    # backlog is still there for the next generation.
    old = spawn(generation=1).wait_ready()
    old.drain()
    assert old.wait_exit() == 0
    queued = Client(listeners.port)  # accepted by the kernel, no worker alive right now
    queued.send(b"GET /pid HTTP/1.1\r\nHost: t\r\n\r\n")
    new = spawn(generation=2).wait_ready()
    status, _, body = queued.response()
    assert (status, body) == (200, str(new.pid).encode())
    queued.close()


def test_keepalive_zero_closes_after_each_response(listeners, spawn):
    spawn(overrides={"timeouts": {"keepalive_ms": 0}}).wait_ready()
    c = Client(listeners.port)
    status, headers, body = c.request("/")
    assert (status, body) == (200, b"hello") and headers["Connection"] == "close"
    assert c.read_all(5) == b""
    c.close()


@pytest.mark.parametrize("interface", ["wsgi", "asgi"])
def test_out_of_file_descriptors_backs_off_and_recovers(listeners, spawn, interface):
    # A worker at its descriptor limit cannot accept: it says so (at most once a second),
    # does not spin on the still-readable listener, and serves again once fds are free.
    # (ASGI: the extension's IoHub pauses the listener and the engine takes it back.)
    limit = ("import resource, runpy; resource.setrlimit(resource.RLIMIT_NOFILE, (40, 40)); "
             "runpy.run_module('molt_shim', run_name='__main__')")
    app = {"wsgi": {}, "asgi": {"app": "asgi_app:app", "interface": "asgi"}}[interface]
    w = spawn(python_args=["-c", limit], **app).wait_ready()
    idle = []
    try:
        for _ in range(60):  # more than the worker can hold; the kernel queues the rest
            idle.append(socket.create_connection(("127.0.0.1", listeners.port), timeout=10))
        wait_until(lambda: "Too many open files" in w.stderr_text(), 10, "the EMFILE log line")
        assert w.alive()
    finally:
        for s in idle:
            s.close()
    assert get(listeners.port, "/")[1] in (b"hello", b"asgi hello")  # served again
    assert w.stderr_text().count("Too many open files") <= 12  # rate-limited, no spin
    assert w.alive()


def test_process_title_without_setproctitle_is_the_comm_name():
    """Without setproctitle (not in Debian's archive), the title goes to /proc/self/comm,
    cut to the kernel's 15 bytes, as `ps`, `top` and `pidstat` show it."""
    import subprocess
    import sys

    from harness import SHIM_DIR
    code = ("import molt_shim.proctitle as p; p._setproctitle = None; "
            "p.set_title('molt: worker gen=7 slot=3', 'molt g7 s3 xyz-more'); "
            "print(open('/proc/self/comm').read().rstrip(chr(10)))")
    out = subprocess.run([sys.executable, "-c", code], env=dict(os.environ, PYTHONPATH=SHIM_DIR),
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "molt g7 s3 xyz-"
