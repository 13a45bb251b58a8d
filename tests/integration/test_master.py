"""The real master with real Python workers: config errors, CLI forms, listeners, signals,
the control socket (including abuse) and the metrics endpoint."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest

from molt_testlib import (APPS, PYTHON, REPO, Molt, control_request, http_get, molt_bin,
                          process_running, wait_until)

HELLO = {"app": "hello_app:application", "chdir": str(APPS), "workers": 2}
EDGE = {"app": "edge_app:application", "chdir": str(APPS), "workers": 2, "threads": 4}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ----- config and CLI ------------------------------------------------------------------------

def test_check_accepts_a_good_config_and_run_rejects_a_bad_one_with_78(tmp_path):
    good = tmp_path / "good.yaml"
    good.write_text(f"app: hello_app:application\nchdir: {APPS}\npython: {PYTHON}\n")
    ok = subprocess.run([molt_bin(), "check", "-c", str(good)], capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    assert "ok: hello_app:application" in ok.stdout

    bad = tmp_path / "bad.yaml"
    bad.write_text(f"app: hello_app:application\nchdir: {APPS}\nwrokers: 4\n"
                   "timeouts:\n  boot: soon\n")
    for command in (["check", "-c", str(bad)], ["run", "-c", str(bad)]):
        result = subprocess.run([molt_bin(), *command], capture_output=True, text=True, timeout=10)
        assert result.returncode == 78, result
        assert f"{bad}:3:1: wrokers: unknown key; did you mean `workers`?" in result.stderr
        assert f"{bad}:5:9: timeouts.boot:" in result.stderr


def test_a_fifo_or_a_device_as_the_config_is_refused_at_once(tmp_path):
    # Issue 18 point 7: a FIFO nobody writes used to hang both commands; /dev/zero aborted.
    fifo = tmp_path / "molt.yaml"
    os.mkfifo(fifo)
    for path in (str(fifo), "/dev/zero"):
        for command in (["check", "-c", path], ["run", "-c", path]):
            result = subprocess.run([molt_bin(), *command], capture_output=True, text=True,
                                    timeout=10)
            assert result.returncode == 78, result
            assert (f"{path}: cannot read config file: not a regular file (a FIFO or a device "
                    "is never read as a config)") in result.stderr


@pytest.mark.skipif(os.geteuid() != 0, reason="taking another user's identity needs root")
def test_check_notices_that_the_user_cannot_read_the_release_or_the_shim(tmp_path):
    # Issue 18 point 9: with `user:`, a release or a shim that user cannot read used to pass
    # the check, and every worker then failed with "No module named molt_shim".
    import shutil
    import tempfile

    root = Path(tempfile.mkdtemp(prefix="molt-user-check-"))
    try:
        root.chmod(0o755)  # readable by anyone, unlike pytest's own tmp_path
        release = root / "release"
        release.mkdir()
        (release / "app.py").write_text("def application(e, s):\n    return []\n")
        config = root / "molt.yaml"
        config.write_text(f"app: app:application\nchdir: {release}\npython: {PYTHON}\n"
                          "user: nobody\n")

        def check(binary: str = molt_bin()) -> subprocess.CompletedProcess:
            return subprocess.run([binary, "check", "-c", str(config)], capture_output=True,
                                  text=True, timeout=30)

        release.chmod(0o755)
        result = check()
        assert result.returncode == 0, result.stderr
        release.chmod(0o700)
        result = check()
        assert result.returncode == 78
        assert (f'{config}: user: "nobody" cannot use {release}: Permission denied'
                in result.stderr)
        release.chmod(0o755)
        # A copy of molt whose shim (lib/molt next to bin/) only root can read.
        (root / "bin").mkdir()
        shutil.copy(molt_bin(), root / "bin" / "molt")
        shim = root / "lib" / "molt"
        shutil.copytree(Path(REPO) / "worker_shim" / "molt_shim", shim / "molt_shim")
        (root / "lib").chmod(0o700)
        result = check(str(root / "bin" / "molt"))
        assert result.returncode == 78
        assert (f'user: "nobody" cannot use {root}/bin/../lib/molt/molt_shim/__main__.py: '
                "Permission denied" in result.stderr)
        # --offline looks nothing up.
        offline = subprocess.run([str(root / "bin" / "molt"), "check", "--offline", "-c",
                                  str(config)], capture_output=True, text=True, timeout=30)
        assert offline.returncode == 0, offline.stderr
    finally:
        shutil.rmtree(root)


def test_the_config_free_form_serves(tmp_path):
    port = free_port()
    control = tmp_path / "ctl.sock"
    proc = subprocess.Popen([molt_bin(), "run", "hello_app:application", "--listen",
                             f"tcp://127.0.0.1:{port}", "--workers", "2", "--chdir", str(APPS),
                             "--python", PYTHON, "--control", str(control)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_until(lambda: control.exists(), 15, "the control socket")
        wait_until(lambda: json.loads(subprocess.run(
            [molt_bin(), "ctl", "--socket", str(control), "status", "--json"],
            capture_output=True, text=True).stdout or "{}").get("live_generation"), 20, "live")
        assert http_get(port, "/")[2] == b"Hello, world!"
    finally:
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0, out


def test_a_bad_config_at_hup_keeps_the_old_one_running(molt):
    m = molt(HELLO)
    generation = m.live_generation()
    m.write_config("app: hello_app:application\nworkers: [oops]\n")
    answer = m.reload()
    assert answer["ok"] is False
    assert "config invalid" in answer["error"]
    assert "molt.yaml:2:10: workers:" in answer["error"]
    assert m.live_generation() == generation
    assert http_get(m.port, "/")[0] == 200
    assert m.alive()


def test_changing_listen_addresses_is_refused_with_a_reason(molt):
    m = molt(HELLO)
    m.config["listen"] = ["tcp://127.0.0.1:0", "tcp://127.0.0.1:1"]
    m.write_config()
    answer = m.reload()
    assert answer["ok"] is False
    assert "changing listen addresses needs a restart" in answer["error"]


# ----- listeners -----------------------------------------------------------------------------

def test_a_second_molt_on_the_same_address_fails_at_start(molt, tmp_path):
    port = free_port()
    first = molt(dict(HELLO, listen=[f"tcp://127.0.0.1:{port}"]), subdir="first")
    second = molt(dict(HELLO, listen=[f"tcp://127.0.0.1:{port}"]), subdir="second", start=False)
    second.start(wait_live=False)
    assert second.proc.wait(15) == 1
    assert "Address already in use" in second.log()
    assert "another molt or server already listening" in second.log()
    assert http_get(first.port, "/")[0] == 200


def test_no_worker_outlives_a_killed_master_and_a_restart_binds(molt):
    # Issue 18 point 1: kill -9 the master while a generation boots a release whose import
    # hangs, with an old worker stopped by SIGSTOP too: nothing of it is left a second later,
    # and a fresh molt on the same port binds and serves.
    port = free_port()
    m = molt(dict(HELLO, listen=[f"tcp://127.0.0.1:{port}"]), subdir="first")
    old = m.worker_pids()
    assert len(old) == 2
    m.config["app"] = "hang_app:application"
    m.write_config()
    m.hup()
    def zygotes() -> list[int]:
        # With preload (the default, auto) each generation also has a zygote: generation 2's
        # is the process whose import hangs.
        return [g["preload"]["zygote"]["pid"] for g in m.status()["generations"]
                if g["preload"]["zygote"] and g["preload"]["zygote"]["pid"] > 0]

    def hung_boot():
        booting = [w["pid"] for w in m.workers(generation=2) if w["pid"] > 0]
        gens = {g["id"]: g for g in m.status()["generations"]}
        zygote = gens.get(2, {}).get("preload", {}).get("zygote")
        if zygote and zygote["pid"] > 0 and zygote["state"] == "booting":
            return [zygote["pid"]]
        return booting if len(booting) == 2 else None

    booting = wait_until(hung_boot, 15, "the hung boot")
    everyone = old + booting + zygotes()
    os.kill(old[0], signal.SIGSTOP)
    m.proc.kill()
    m.proc.wait(5)
    wait_until(lambda: not any(process_running(pid) for pid in everyone), 1.0,
               "every worker to die with its master",
               on_timeout=lambda: f"still running: {[p for p in everyone if process_running(p)]}")
    fresh = molt(dict(HELLO, listen=[f"tcp://127.0.0.1:{port}"]), subdir="second")
    assert http_get(port, "/")[2] == b"Hello, world!"
    assert fresh.alive()


# ----- pidfile -------------------------------------------------------------------------------

def test_the_pidfile_holds_the_master_pid_and_goes_away_at_stop(molt, tmp_path):
    pidfile = tmp_path / "molt.pid"
    pidfile.write_text("99999\n")  # a stale one from a crash is replaced
    m = molt(dict(HELLO, pidfile=str(pidfile)))
    assert pidfile.read_text() == f"{m.pid}\n"
    assert not pidfile.is_symlink()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith("molt.pid")] == ["molt.pid"]
    assert m.stop() == 0
    assert not pidfile.exists()


def test_a_pidfile_that_is_a_symlink_is_refused_at_start(molt, tmp_path):
    # A link planted at the pidfile's path must not make the master write through it.
    target = tmp_path / "precious"
    target.write_text("keep me\n")
    pidfile = tmp_path / "molt.pid"
    pidfile.symlink_to(target)
    m = molt(dict(HELLO, pidfile=str(pidfile)), start=False)
    m.start(wait_live=False)
    assert m.proc.wait(15) == 1
    assert "is a symbolic link; molt does not write through links" in m.log()
    assert target.read_text() == "keep me\n"
    assert pidfile.is_symlink()


def test_an_unwritable_pidfile_stops_the_start_with_the_reason(molt, tmp_path):
    pidfile = tmp_path / "missing-dir" / "molt.pid"
    m = molt(dict(HELLO, pidfile=str(pidfile)), start=False)
    m.start(wait_live=False)
    assert m.proc.wait(15) == 1
    assert f"cannot start: open({pidfile}.tmp." in m.log()
    assert "No such file or directory" in m.log()


def test_unix_and_ipv6_listeners_with_mode_and_cleanup(molt, tmp_path):
    path = tmp_path / "web.sock"
    m = molt(dict(HELLO, listen=[{"address": f"unix:{path}", "mode": "0660"},
                                 "tcp://[::1]:0", "tcp://127.0.0.1:0"]))
    assert oct(path.stat().st_mode & 0o777) == "0o660"
    assert http_get(0, "/", unix=str(path))[2] == b"Hello, world!"
    v6 = [a for a in m.status()["master"]["listen"] if a.startswith("tcp://[::1]")][0]
    port6 = int(v6.rsplit(":", 1)[1])
    assert http_get(port6, "/", host="::1")[2] == b"Hello, world!"
    assert m.stop() == 0
    assert not path.exists(), "the socket file is removed on a clean exit"


def listening_socket_of(pid: int, address: tuple) -> socket.socket:
    """A duplicate of process `pid`'s listening socket on `address` (pidfd_getfd(2), as root),
    to read its options from here."""
    import ctypes

    syscall = ctypes.CDLL(None, use_errno=True).syscall
    pidfd = os.pidfd_open(pid)
    try:
        for name in os.listdir(f"/proc/{pid}/fd"):
            if not os.readlink(f"/proc/{pid}/fd/{name}").startswith("socket:"):
                continue
            fd = syscall(438, pidfd, int(name), 0)  # SYS_pidfd_getfd
            assert fd >= 0, os.strerror(ctypes.get_errno())
            sock = socket.socket(fileno=fd)
            if (sock.family == socket.AF_INET and sock.getsockname() == address
                    and sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)):
                return sock
            sock.close()
    finally:
        os.close(pidfd)
    raise AssertionError(f"no listening socket on {address} in pid {pid}")


def test_tcp_listeners_defer_accept_until_the_request_arrives(molt):
    # TCP_DEFER_ACCEPT (default 1 s): a worker is woken only once a connection has bytes to
    # read. Set by the master on the sockets it opens, 0 turns it off, and a client that is
    # slow to send loses nothing.
    m = molt(dict(HELLO, listen=["tcp://127.0.0.1:0",
                                 {"address": "tcp://127.0.0.2:0", "defer_accept": 0}]))
    deferred, immediate = [(a[len("tcp://"):].rsplit(":", 1)[0], int(a.rsplit(":", 1)[1]))
                           for a in m.status()["master"]["listen"]]
    for address, want in ((deferred, 1), (immediate, 0)):
        with listening_socket_of(m.pid, address) as sock:
            assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_DEFER_ACCEPT) == want, address
    with socket.create_connection(deferred, timeout=10) as slow:
        time.sleep(0.5)  # connected, nothing sent yet: the kernel holds it
        slow.sendall(b"GET / HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
        answer = b""
        while chunk := slow.recv(4096):
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 200 ") and answer.endswith(b"Hello, world!")


def test_a_stale_unix_socket_file_is_replaced(molt, tmp_path):
    path = tmp_path / "stale.sock"
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(path))
    s.close()  # the file stays, nobody listens: what a crashed server leaves behind
    molt(dict(HELLO, listen=[f"unix:{path}"]))
    assert http_get(0, "/", unix=str(path))[0] == 200


# ----- signals -------------------------------------------------------------------------------

def test_ttin_and_ttou_add_and_remove_a_worker(molt):
    m = molt(HELLO)
    m.signal(signal.SIGTTIN)
    wait_until(lambda: len(m.workers("ready")) == 3, 15, "a third worker")
    # Standard signals do not queue: a second TTOU sent before the first is handled would be
    # merged into it, so each waits for the master's answer.
    for target in (2, 1):
        m.signal(signal.SIGTTOU)
        wait_until(lambda: m.status()["master"]["target_workers"] == target, 10, f"target {target}")
    wait_until(lambda: len(m.workers()) == 1, 15, "scale down to one worker", on_timeout=m.log)
    assert m.status()["master"]["target_workers"] == 1
    m.signal(signal.SIGTTOU)  # never below one
    time_limit = time.monotonic() + 1
    while time.monotonic() < time_limit:
        assert len(m.workers("ready")) == 1
    assert "cannot scale to 0 workers" in m.log()


def test_usr1_reopens_the_master_log_for_logrotate(molt, tmp_path):
    log_file = tmp_path / "master.log"
    m = molt(dict(HELLO, logging={"file": str(log_file)}))
    os.rename(log_file, tmp_path / "master.log.1")  # what logrotate does
    m.signal(signal.SIGUSR1)
    wait_until(log_file.exists, 10, "the master to reopen its log file")
    m.signal(signal.SIGHUP)
    wait_until(lambda: "generation 2: starting -> live" in log_file.read_text(), 20,
               "lines in the new file")
    assert "generation 2" not in (tmp_path / "master.log.1").read_text()


def test_term_drains_in_flight_requests_then_exits_zero(molt, tmp_path):
    app_dir = tmp_path / "app"
    app_dir.mkdir()
    marker = tmp_path / "started"
    (app_dir / "slow.py").write_text(
        "import pathlib, time\n"
        "def application(environ, start_response):\n"
        f"    pathlib.Path({str(marker)!r}).touch()\n"
        "    time.sleep(1.5)\n"
        "    start_response('200 OK', [('Content-Length', '4')])\n"
        "    return [b'done']\n")
    m = molt({"app": "slow:application", "chdir": str(app_dir), "workers": 1})
    results = {}
    t = threading.Thread(target=lambda: results.update(slow=http_get(m.port, "/", timeout=10)))
    t.start()
    wait_until(marker.exists, 10, "the slow request to be in flight")
    m.signal(signal.SIGTERM)
    wait_until(lambda: "graceful stop: draining every worker" in m.log(), 10, "the stop")
    # While it stops, `scale` says so (it answered ok with the old count).
    answer = control_request(m.config["control"]["socket"], {"command": "scale", "workers": 3})
    assert answer == {"ok": False, "error": "the master is stopping; it does not scale"}
    t.join(15)
    assert results["slow"][0] == 200
    assert results["slow"][2] == b"done"
    assert m.proc.wait(20) == 0


def test_int_stops_fast(molt):
    m = molt(HELLO)
    pids = m.worker_pids()
    m.signal(signal.SIGINT)
    assert m.proc.wait(10) == 0
    for pid in pids:
        assert not os.path.exists(f"/proc/{pid}") or open(f"/proc/{pid}/stat").read().split()[2] == "Z"


# ----- molt ctl ------------------------------------------------------------------------------

def test_ctl_status_table_and_json(molt):
    m = molt(HELLO)
    table = m.ctl("status")
    assert table.returncode == 0, table.stderr
    assert "generation 1 live" in table.stdout
    assert "SLOT" in table.stdout and "RESTARTS" in table.stdout
    data = json.loads(m.ctl("status", "--json").stdout)
    zygote = data["generations"][0]["preload"]["zygote"]
    assert f"  zygote pid {zygote['pid']} ready, 2 fork(s), PSS " in table.stdout, table.stdout
    wait_until(lambda: m.status()["standby"], 20, "a standby", on_timeout=m.log)
    table = m.ctl("status").stdout
    assert f"standby pid {m.status()['standby']['pid']}, PSS " in table, table
    assert data["live_generation"] == 1
    assert len(data["generations"][0]["workers"]) == 2
    assert all(w["rss_bytes"] > 1_000_000 for w in data["generations"][0]["workers"])


def test_ctl_reload_wait_reports_success_and_failure(molt, tmp_path):
    app_dir = tmp_path / "app"
    app_dir.mkdir()
    (app_dir / "app.py").write_text(
        "def application(e, s):\n    s('200 OK', [])\n    return [b'one']\n")
    m = molt({"app": "app:application", "chdir": str(app_dir), "workers": 2})
    good = m.ctl("reload", "--wait", "--timeout", "60s")
    assert good.returncode == 0, good.stderr
    assert "generation 2 is live" in good.stdout
    assert json.loads(m.ctl("status", "--json").stdout)["live_generation"] == 2

    (app_dir / "app.py").write_text("import no_such_module_anywhere\n")
    bad = m.ctl("reload", "--wait")
    assert bad.returncode == 1
    assert "ModuleNotFoundError: No module named 'no_such_module_anywhere'" in bad.stderr
    assert http_get(m.port, "/")[2] == b"one"


def test_two_concurrent_reload_waits_both_get_the_answer(molt):
    m = molt(HELLO)
    results = []

    def reload():
        results.append(m.ctl("reload", "--wait"))

    threads = [threading.Thread(target=reload) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert [r.returncode for r in results] == [0, 0], [r.stderr for r in results]


def test_ctl_scale_history_and_unreachable_master(molt, tmp_path):
    m = molt(HELLO)
    assert m.ctl("scale", "3").returncode == 0
    wait_until(lambda: len(m.workers("ready")) == 3, 15, "three workers")
    m.reload()
    history = m.ctl("history")
    assert history.returncode == 0 and "reload" in history.stdout and "startup" in history.stdout
    gone = subprocess.run([molt_bin(), "ctl", "--socket", str(tmp_path / "nope.sock"), "status"],
                          capture_output=True, text=True)
    assert gone.returncode == 69
    assert "cannot reach the master" in gone.stderr


def test_control_socket_survives_abuse(molt):
    m = molt(HELLO)
    path = m.config["control"]["socket"]
    assert oct(os.stat(path).st_mode & 0o777) == "0o600"

    def raw(payload: bytes) -> bytes:
        s = socket.socket(socket.AF_UNIX)
        s.settimeout(10)
        s.connect(path)
        try:
            s.sendall(payload)
            s.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        data = b""
        try:
            while chunk := s.recv(65536):
                data += chunk
        except OSError:
            pass
        s.close()
        return data

    assert b"malformed request" in raw(b"\x00\xff garbage\n")
    assert b"malformed request" in raw(b"[1,2,3]\n")
    assert b"unknown command" in raw(b'{"command": "explode"}\n')
    assert b"request too large" in raw(b"x" * 200_000)
    assert b'"wait\\" must be true or false' in raw(b'{"command": "reload", "wait": 1}\n')
    assert b'"fast\\" must be true or false' in raw(b'{"command": "stop", "fast": "yes"}\n')
    assert b"scale needs" in raw(b'{"command": "scale", "workers": "many"}\n')
    # Out of range, not truncated to 32 bits (2^32 + 2 was taken as 2, -(2^32 - 1) as 1).
    assert b"scale needs" in raw(b'{"command": "scale", "workers": 4294967298}\n')
    assert b"scale needs" in raw(b'{"command": "scale", "workers": -4294967295}\n')
    # At most 1024: `scale 100000` (a typo) had the master spawn until it ran out of fds.
    assert b"a whole number from 1 to 1024" in raw(b'{"command": "scale", "workers": 1025}\n')
    silent = [socket.socket(socket.AF_UNIX) for _ in range(5)]
    for s in silent:
        s.connect(path)  # connect and never write
    crowd = []
    for _ in range(200):
        s = socket.socket(socket.AF_UNIX)
        s.connect(path)
        crowd.append(s)
    for s in crowd:
        s.close()
    for s in silent:
        s.close()
    assert m.status()["live_generation"] == 1
    assert http_get(m.port, "/")[0] == 200


def test_the_master_endpoints_answer_under_a_flood_of_idle_connections(molt):
    # Issue 18 point 8: one local user opens more idle connections than the servers admit
    # (256 each), to the metrics endpoint and to the control socket, and keeps them open. A
    # scrape and `molt ctl status` still succeed: a newcomer evicts the oldest connection that
    # has not sent a request, never a scrape. Before, both answered "busy" until the flood
    # timed out.
    metrics_port = free_port()
    m = molt(dict(HELLO, metrics={"listen": f"tcp://127.0.0.1:{metrics_port}"}))
    flood = []
    try:
        for _ in range(320):
            flood.append(socket.create_connection(("127.0.0.1", metrics_port), timeout=10))
            control = socket.socket(socket.AF_UNIX)
            # Blocking: a Unix socket with a timeout answers EAGAIN at once when the listen
            # backlog is full, where a blocking connect waits for the master to accept.
            control.connect(m.config["control"]["socket"])
            control.settimeout(10)
            flood.append(control)
        for _ in range(3):
            status, _, body = http_get(metrics_port, "/metrics")
            assert status == 200 and b"molt_generation 1" in body
            result = m.ctl("status", timeout=30)
            assert result.returncode == 0, result.stderr
            assert m.status()["live_generation"] == 1
        # The evicted ones were told why: the oldest flood connection got "busy".
        assert flood[0].recv(4096).startswith(b"HTTP/1.1 503 Service Unavailable")
        assert b"too many control clients at once" in flood[1].recv(4096)
    finally:
        for s in flood:
            s.close()
    assert http_get(m.port, "/")[0] == 200


# ----- metrics -------------------------------------------------------------------------------

def scrape(port: int) -> dict:
    from prometheus_client.parser import text_string_to_metric_families

    status, headers, body = http_get(port, "/metrics")
    assert status == 200
    assert headers["content-type"].startswith("text/plain; version=0.0.4")
    samples = {}
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            key = sample.name + json.dumps(sample.labels, sort_keys=True)
            samples[key] = sample.value
    return samples


def test_metrics_parse_and_move_with_rollovers_and_crashes(molt):
    metrics_port = free_port()
    m = molt(dict(HELLO, metrics={"listen": f"tcp://127.0.0.1:{metrics_port}"}))
    before = scrape(metrics_port)
    assert before['molt_generation{}'] == 1
    assert before['molt_workers{"generation": "1", "state": "ready"}'] == 2
    assert before['molt_rollovers_total{"result": "ok"}'] == 0

    m.reload()
    victim = m.workers("ready")[0]["pid"]
    os.kill(victim, signal.SIGKILL)
    wait_until(lambda: victim not in m.worker_pids() and len(m.workers("ready")) == 2, 15,
               "the crashed worker's replacement")
    after = scrape(metrics_port)
    assert after['molt_generation{}'] == 2
    assert after['molt_rollovers_total{"result": "ok"}'] == 1
    assert after['molt_worker_restarts_total{"reason": "crash"}'] == 1
    assert after['molt_master_resident_memory_bytes{}'] > 0
    status, _, _ = http_get(metrics_port, "/nope")
    assert status == 404


def test_json_logs_are_one_object_per_line_with_generation_and_pid(molt):
    m = molt(dict(EDGE, logging={"format": "json", "access_log": True}))
    http_get(m.port, "/")
    m.reload()
    wait_until(lambda: '"source":"worker"' in m.log(), 10, "a worker line")
    assert m.stop() == 0
    records = [json.loads(line) for line in m.log().splitlines() if line.strip()]
    master = [r for r in records if r["source"] == "master"]
    workers = [r for r in records if r["source"] == "worker"]
    assert master and workers
    assert all({"ts", "level", "msg"} <= set(r) for r in records)
    assert any(r.get("gen") == 2 and r.get("pid") for r in master)
    assert all({"gen", "worker", "pid", "stream"} <= set(r) for r in workers)


def test_error_text_that_is_not_utf8_cannot_crash_the_master(molt, tmp_path):
    app_dir = tmp_path / "app"
    app_dir.mkdir()
    (app_dir / "app.py").write_text("def application(e, s):\n    s('200 OK', [])\n    return [b'ok']\n")
    m = molt({"app": "app:application", "chdir": str(app_dir), "workers": 1})
    # 1000 three-byte characters: any byte limit cuts one in half. Plus raw invalid bytes on
    # stderr, which become the failure detail when no ERROR= is sent.
    (app_dir / "app.py").write_text(
        "import os, sys\n"
        "os.write(2, b'\\xff\\xfe broken bytes\\n')\n"
        "raise RuntimeError('\u20ac' * 1000)\n")
    answer = m.reload()
    assert answer["ok"] is False
    (app_dir / "app.py").write_text("import os\nos.write(2, b'\\xff\\xfe\\n')\nos._exit(1)\n")
    assert m.reload()["ok"] is False
    assert m.ctl("status").returncode == 0
    assert m.ctl("history", "--json").returncode == 0
    assert m.alive() and http_get(m.port, "/")[2] == b"ok"


def test_changing_watch_paths_by_reload_swaps_the_watcher(molt, tmp_path):
    first, second = tmp_path / "first.txt", tmp_path / "second.txt"
    first.write_text("")
    second.write_text("")
    m = molt(dict(HELLO, watch=[str(first)]))
    m.config["watch"] = [str(second)]
    m.write_config()
    assert m.reload()["ok"] is True  # the reload that replaces the watcher
    os.utime(second)
    wait_until(lambda: m.live_generation() == 3, 20, "a rollover from the new watch path",
               on_timeout=m.log)
    assert m.alive()


def test_too_few_file_descriptors_stop_the_start_with_the_reason(tmp_path):
    """With `ulimit -n` too low for the master's own event loop, signal pipe or control socket,
    it exits 1 saying why: it aborted on a libuv assertion (uv_close of a handle never
    initialised), and had it got further it would have run with the default signal actions."""
    config = tmp_path / "molt.yaml"
    config.write_text(json.dumps({"app": "hello_app:application", "chdir": str(APPS),
                                  "python": PYTHON, "listen": ["tcp://127.0.0.1:0"],
                                  "control": {"socket": str(tmp_path / "ctl.sock")}}))
    for limit in range(6, 12):  # each runs out somewhere else, before the first worker
        out = subprocess.run(["bash", "-c", f"ulimit -n {limit}; exec {molt_bin()} run -c {config}"],
                             capture_output=True, text=True, timeout=30)
        assert out.returncode == 1, (limit, out.returncode, out.stderr[-2000:])
        assert "too many open files" in out.stderr.lower(), (limit, out.stderr)
        assert not (tmp_path / "ctl.sock").exists(), limit
