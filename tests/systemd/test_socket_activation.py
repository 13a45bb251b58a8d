"""Socket activation: molt started by systemd-socket-activate adopts the sockets it is given
(LISTEN_FDS), binds nothing itself, serves through them across rollovers, and never closes
or unlinks them.

systemd-socket-activate binds, waits for the first connection, then execs molt in its own
process (LISTEN_PID is its pid, so molt's pid is the pid we started). The first request of
every test is therefore queued in the socket before molt even runs, and must be answered."""
from __future__ import annotations

import os
import re
import signal
import stat
import subprocess

import pytest

from molt_testlib import (Releases, Wrk, flask_release, http_get, molt_bin, release_tree,
                          wait_until)
from sdtestlib import NotifyListener, env_release, free_port, listening_tcp_ports

ENV_ROUTE = (
    "import os\n"
    "@app.route('/env')\n"
    "def env():\n"
    "    keys = ('NOTIFY_SOCKET', 'LISTEN_FDS', 'LISTEN_PID', 'LISTEN_FDNAMES')\n"
    "    return ';'.join('%s=%s' % (k, os.environ.get(k)) for k in keys) + '\\n'\n"
)
NO_SYSTEMD_ENV = "NOTIFY_SOCKET=None;LISTEN_FDS=None;LISTEN_PID=None;LISTEN_FDNAMES=None"


def flask_layout(tmp_path, versions=("a", "b")) -> Releases:
    releases = Releases(tmp_path / "site")
    for v in versions:
        files = flask_release(v)
        files["app.py"] += ENV_ROUTE
        releases.add(v, files=files)
    releases.activate(versions[0])
    return releases


def env_layout(tmp_path, versions=("a", "b")) -> Releases:
    return release_tree(tmp_path / "site", env_release, versions)


def listening_lines(log: str) -> list[str]:
    return [line for line in log.splitlines() if " listening on " in line]


def ctl_reload(m) -> subprocess.CompletedProcess:
    return subprocess.run([molt_bin(), "ctl", "-c", str(m.config_path), "reload", "--wait",
                           "--timeout", "60s"], capture_output=True, text=True, timeout=90)


def wait_serving(version: str, port: int = 0, unix: str | None = None):
    """The new release answers. Bounded wait, not an immediate check: `reload --wait` returns
    when the new generation is live and DRAIN was sent, and an old worker may accept a
    connection or two before it reads its DRAIN (a window of milliseconds)."""
    def answers() -> bool:
        status, _, body = http_get(port, "/", unix=unix)
        return status == 200 and body == f"version {version}\n".encode()

    wait_until(answers, 5, f"version {version} to answer")


def hup_and_wait(m, what: str):
    before = m.live_generation()
    os.kill(m.pid, signal.SIGHUP)
    wait_until(lambda: (m.live_generation() or 0) > before, 60, what, on_timeout=m.log)


@pytest.mark.timeout(180)
def test_tcp_socket_from_systemd_serves_across_hup_and_ctl_rollovers(activated, tmp_path):
    releases = flask_layout(tmp_path)
    port = free_port()
    unused = free_port()  # the config's own address: molt must not bind it
    config = releases.config(listen=[{"address": f"tcp://127.0.0.1:{unused}", "name": "web"}])
    m = activated(config, [f"127.0.0.1:{port}"], fdnames=["web"]).start()
    assert "master pid=" not in m.log()  # nothing runs until a client connects

    # This connection wakes systemd-socket-activate; it waits in the queue until a worker
    # of the first generation accepts it.
    status, _, data = http_get(port, "/", timeout=60)
    assert (status, data) == (200, b"version a\n")
    m.wait_exec()
    m.wait_live()

    log = m.log()
    assert f"listening on tcp://127.0.0.1:{port} (socket from systemd)" in log
    assert all(line.endswith("(socket from systemd)") for line in listening_lines(log)), log
    assert m.status()["master"]["listen"] == [f"tcp://127.0.0.1:{port}"]
    # The only listening socket the master holds is systemd's.
    assert listening_tcp_ports(m.pid) == {port}, "molt bound an address despite LISTEN_FDS"
    for worker in m.worker_pids():  # workers accept on the inherited socket, never bind
        assert listening_tcp_ports(worker) == {port}
    # The adopted socket was matched to the `listen:` entry named `web`.
    assert re.search(r"ready: app:app .* on web \(tcp://127\.0\.0\.1:\d+\)$", log, re.M), log

    status, _, data = http_get(port, "/env")
    assert data.decode().strip() == NO_SYSTEMD_ENV

    load = Wrk(f"http://127.0.0.1:{port}/", duration=20, connections=16, threads=2)
    try:
        for i in range(4):
            version = "b" if i % 2 == 0 else "a"
            releases.activate(version)
            if i % 2 == 0:
                hup_and_wait(m, f"HUP rollover {i + 1} to go live")
            else:
                answer = ctl_reload(m)
                assert answer.returncode == 0, answer.stderr + m.log()
                assert re.match(r"generation \d+ is live", answer.stdout), answer.stdout
            wait_serving(version, port=port)
    finally:
        result = load.stop()
    assert result["requests"] > 500, result["output"]
    assert result["failed"] == 0, result["output"]

    # Still only the one socket from systemd, still nothing bound by molt itself.
    assert len(listening_lines(m.log())) == 1, m.log()
    assert listening_tcp_ports(m.pid) == {port}
    assert m.stop() == 0


@pytest.mark.timeout(120)
def test_unix_socket_from_systemd_survives_reloads_and_is_not_unlinked_on_stop(
        activated, tmp_path, short_dir):
    releases = env_layout(tmp_path, versions=("a", "b", "c"))
    path = str(short_dir / "web.sock")
    listener = NotifyListener(short_dir / "notify")
    try:
        config = {
            "app": "app:application",
            "chdir": str(releases.current),
            "workers": 2,
            "version_file": "REVISION",
            "timeouts": {"boot": "20s", "graceful": "10s"},
            "listen": [{"address": f"unix:{path}", "name": "web", "mode": "0600"}],
        }
        m = activated(config, [path], fdnames=["web"],
                      setenv={"NOTIFY_SOCKET": listener.path}).start()
        before = os.stat(path)
        assert stat.S_ISSOCK(before.st_mode)

        status, _, data = http_get(0, "/", unix=path, timeout=60)
        assert (status, data) == (200, b"version a\n")
        m.wait_exec()
        m.wait_live()
        assert f"listening on unix:{path} (socket from systemd)" in m.log()
        assert all(line.endswith("(socket from systemd)") for line in listening_lines(m.log()))

        # NOTIFY_SOCKET passed by the activator reaches molt (READY=1 from the master's pid)
        # and no worker: the app sees none of systemd's variables.
        wait_until(lambda: any("READY" in f for f in listener.state()), 10, "READY=1",
                   on_timeout=listener.dump)
        assert {pid for _, pid, _, _ in listener.all()} == {m.pid}
        _, _, data = http_get(0, "/env", unix=path)
        assert "NOTIFY_SOCKET=None;LISTEN_FDS=None;LISTEN_PID=None;LISTEN_FDNAMES=None" in \
            data.decode()

        for i, (version, how) in enumerate([("b", "hup"), ("c", "ctl"), ("a", "hup")]):
            releases.activate(version)
            if how == "hup":
                hup_and_wait(m, f"rollover {i + 1} to go live")
            else:
                answer = ctl_reload(m)
                assert answer.returncode == 0, answer.stderr + m.log()
            now = os.stat(path)
            # The same socket file: molt neither re-created nor re-chmod-ed it.
            assert (now.st_ino, now.st_mode) == (before.st_ino, before.st_mode)
            wait_serving(version, unix=path)

        assert m.stop() == 0
        # molt was exec'd in the activator's process, so nothing else could have removed it:
        # the socket file belongs to whoever created it (systemd), not to molt.
        after = os.lstat(path)
        assert stat.S_ISSOCK(after.st_mode) and after.st_ino == before.st_ino
        assert "STOPPING" in "".join(text for _, _, _, text in listener.all())
    finally:
        listener.close()


@pytest.mark.timeout(120)
def test_sockets_are_matched_by_address_first_then_by_fdname(activated, tmp_path, short_dir):
    """Two sockets with the same name (one socket unit with two ListenStream= lines gives
    every socket its FileDescriptorName=): only the address tells which entry each is."""
    releases = env_layout(tmp_path, versions=("a",))
    port = free_port()
    path = str(short_dir / "web.sock")
    config = {
        "app": "app:application",
        "chdir": str(releases.current),
        "timeouts": {"boot": "20s"},
        "listen": [{"address": f"unix:{path}", "name": "web"},
                   {"address": f"tcp://127.0.0.1:{port}", "name": "api"}],
    }
    m = activated(config, [f"127.0.0.1:{port}", path], fdnames=["web", "web"]).start()
    assert http_get(port, "/", timeout=60)[2] == b"version a\n"
    m.wait_exec()
    m.wait_live()
    assert http_get(0, "/", unix=path)[2] == b"version a\n"
    log = m.log()
    # fd 3 is the TCP socket (named "web" by systemd, but its address is the `api` entry).
    assert re.search(r"ready: app:application .* on api \(tcp://[^)]+\), web \(unix:[^)]+\)$", log, re.M), log
    assert m.status()["master"]["listen"] == [f"tcp://127.0.0.1:{port}", f"unix:{path}"]
    assert m.stop() == 0


@pytest.mark.timeout(120)
def test_sockets_are_matched_by_fdname_when_addresses_differ(activated, tmp_path):
    releases = env_layout(tmp_path, versions=("a",))
    port_internal, port_public = free_port(), free_port()
    config = {
        "app": "app:application",
        "chdir": str(releases.current),
        "timeouts": {"boot": "20s"},
        # Addresses that are not the ones systemd bound: only the names match.
        "listen": [{"address": "tcp://127.0.0.1:1", "name": "public"},
                   {"address": "tcp://127.0.0.1:2", "name": "internal"}],
    }
    m = activated(config, [f"127.0.0.1:{port_internal}", f"127.0.0.1:{port_public}"],
                  fdnames=["internal", "public"]).start()
    assert http_get(port_public, "/", timeout=60)[2] == b"version a\n"
    m.wait_exec()
    m.wait_live()
    assert http_get(port_internal, "/")[2] == b"version a\n"
    assert re.search(r"ready: app:application .* on internal \([^)]+\), public \([^)]+\)$", m.log(), re.M), m.log()
    assert m.stop() == 0


@pytest.mark.timeout(60)
def test_listen_fds_for_another_pid_are_ignored_and_molt_binds_itself(molt, tmp_path):
    """LISTEN_PID names the process the sockets are for; a molt that inherited the variables
    from its parent must not take fd 3 as a listener."""
    releases = env_layout(tmp_path, versions=("a",))
    env = dict(os.environ, LISTEN_FDS="1", LISTEN_PID="1", LISTEN_FDNAMES="web")
    m = molt({"app": "app:application", "chdir": str(releases.current),
              "listen": ["tcp://127.0.0.1:0"]}, env=env)
    assert "(socket from systemd)" not in m.log()
    assert m.get("/")[2] == b"version a\n"
    assert m.get("/env")[2].decode().strip().startswith(
        "NOTIFY_SOCKET=None;LISTEN_FDS=None;LISTEN_PID=None;LISTEN_FDNAMES=None")
    assert m.stop() == 0


@pytest.mark.timeout(120)
def test_sockets_from_systemd_survive_a_binary_upgrade(activated, tmp_path, short_dir):
    """SIGUSR2 re-executes the master in place (LISTEN_PID stays right); the adopted socket
    is carried over, still marked as systemd's, so stop still leaves its file alone."""
    releases = env_layout(tmp_path, versions=("a", "b"))
    path = str(short_dir / "web.sock")
    config = {"app": "app:application", "chdir": str(releases.current),
              "version_file": "REVISION", "timeouts": {"boot": "20s"},
              "listen": [{"address": f"unix:{path}", "name": "web"}]}
    m = activated(config, [path], fdnames=["web"]).start()
    inode = os.stat(path).st_ino
    assert http_get(0, "/", unix=path, timeout=60)[2] == b"version a\n"
    m.wait_exec()
    m.wait_live()
    os.kill(m.pid, signal.SIGUSR2)
    wait_until(lambda: "binary upgrade complete" in m.log(), 30, "the binary upgrade",
               on_timeout=m.log)
    assert http_get(0, "/", unix=path)[2] == b"version a\n"
    releases.activate("b")
    hup_and_wait(m, "a rollover after the upgrade")
    wait_serving("b", unix=path)
    assert m.stop() == 0
    assert os.lstat(path).st_ino == inode
