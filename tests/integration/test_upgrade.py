"""Binary upgrade on SIGUSR2: same master PID, same workers, new build, no failed request,
for a WSGI and an ASGI generation (an open WebSocket included); a broken new binary leaves the
old master in charge."""
from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
from pathlib import Path

import pytest

from molt_testlib import APPS, Molt, Wrk, molt_bin, wait_until


def start_upgradable(tmp_path, config: dict):
    """molt started from a copy of the binary that the test can replace, like a package
    upgrade."""
    binary = tmp_path / "bin" / "molt"
    binary.parent.mkdir()
    shutil.copy2(molt_bin(), binary)
    # The shim as the build installs it (the package and the native extension side by side),
    # which the copy cannot find next to itself: without the extension, engine: auto would
    # quietly be the Python engine.
    shim = Path(molt_bin()).resolve().parent.parent / "lib" / "molt"
    env = dict(os.environ, MOLT_SHIM_DIR=str(shim))
    m = Molt(tmp_path / "run", config, env=env, binary=str(binary))
    m.start()
    return m, binary


@pytest.fixture
def upgradable(tmp_path):
    m, binary = start_upgradable(
        tmp_path, {"app": "hello_app:application", "chdir": str(APPS), "workers": 2})
    yield m, binary
    m.kill_everything()


def killed_and_forked_again(m, pid: int, workers: int):
    """kill -9 of a worker: its replacement is forked from the (adopted) zygote."""
    os.kill(pid, signal.SIGKILL)
    wait_until(lambda: pid not in m.worker_pids() and len(m.workers("ready")) == workers, 20,
               "the replacement", on_timeout=m.log)
    assert all(w["forked"] for w in m.workers("ready")), m.status()


def assert_kept_in_place(m, before: dict, workers_before: list, load_result: dict):
    """After the upgrade: the same master, the same workers and generation, no failed request
    during it, and its zygote adopted."""
    after = m.status()
    assert after["master"]["pid"] == before["master"]["pid"] == m.pid
    assert sorted(m.worker_pids()) == workers_before
    assert after["live_generation"] == before["live_generation"]
    assert load_result["requests"] > 100 and load_result["failed"] == 0, load_result["output"]
    assert "binary upgrade complete" in m.log()
    zygote = before["generations"][0]["preload"]["zygote"]
    assert zygote and after["generations"][0]["preload"]["zygote"]["pid"] == zygote["pid"]


def upgrade_in_place(m, binary, before: dict):
    """A new build (the same program with different bytes, so its build digest differs),
    SIGUSR2, and the new image answering."""
    replace_binary(binary, binary.read_bytes() + b"\0new build\0")
    m.signal(signal.SIGUSR2)
    wait_until(lambda: (m.try_status() or before)["master"]["build"] != before["master"]["build"],
               15, "the new image to answer", on_timeout=m.log)


def accept_board(pid: int) -> int:
    """The inode of the accept board (a memfd) a worker holds."""
    for name in os.listdir(f"/proc/{pid}/fd"):
        path = f"/proc/{pid}/fd/{name}"
        try:
            if "molt-accept-board" in os.readlink(path):
                return os.stat(path).st_ino
        except OSError:
            continue
    raise AssertionError(f"worker {pid} holds no accept board")


def replace_binary(path, content: bytes, mode=0o755):
    """Atomic replacement, as dpkg does it: the running image keeps the old inode."""
    new = path.with_suffix(".new")
    new.write_bytes(content)
    os.chmod(new, mode)
    os.replace(new, path)


@pytest.mark.timeout(90)
def test_usr2_reexecutes_in_place_and_keeps_workers_under_load(upgradable):
    m, binary = upgradable
    # The zygote's spare (a worker forked ahead) waits before the upgrade, for after it.
    spare = wait_until(lambda: m.status()["generations"][0]["preload"]["zygote"]["spare_pid"],
                       20, "the zygote's spare", on_timeout=m.log)
    before = m.status()
    workers_before = sorted(m.worker_pids())
    board = accept_board(workers_before[0])
    load = Wrk(m.url("/"), duration=6, connections=16)
    try:
        upgrade_in_place(m, binary, before)
    finally:
        result = load.result()
    assert_kept_in_place(m, before, workers_before, result)
    assert "(engine native: wsgi" in m.log()  # engine: auto picked the native engine
    # Its zygote (preload: auto, the default) was adopted too, and the new image knows its
    # spare (handed over for the status); a crashed worker is re-forked, by that spare, which
    # waited through the re-exec.
    assert m.status()["generations"][0]["preload"]["zygote"]["spare_pid"] == spare
    killed_and_forked_again(m, workers_before[0], 2)
    assert spare in m.worker_pids()
    # The adopted generation still rolls over normally afterwards, and the new generation's
    # workers balance their connections on the board the adopted ones used (handed over).
    assert m.reload()["ok"] is True
    assert m.live_generation() == before["live_generation"] + 1
    live = m.workers("ready", generation=m.live_generation())
    assert live and {accept_board(w["pid"]) for w in live} == {board}


@pytest.mark.timeout(120)
def test_usr2_keeps_an_asgi_generation_and_an_open_websocket(tmp_path):
    """The ASGI engine across a binary upgrade: its workers are not restarted, a WebSocket
    opened before the upgrade still echoes after it, a crashed worker is re-forked from the
    adopted zygote, and the adopted generation rolls over to workers that each ran their
    lifespan."""
    import websockets

    m, binary = start_upgradable(tmp_path, {"app": "asgi_app:app", "interface": "asgi",
                                            "chdir": str(APPS), "workers": 2})
    try:
        before = m.status()
        workers_before = sorted(m.worker_pids())

        async def across_the_upgrade():
            async with websockets.connect(f"ws://127.0.0.1:{m.port}/ws") as ws:
                await ws.send("before")
                assert await ws.recv() == "echo:before"
                load = Wrk(m.url("/"), duration=6, connections=16)

                def upgrade():
                    try:
                        upgrade_in_place(m, binary, before)
                    finally:
                        result = load.result()
                    return result

                result = await asyncio.get_running_loop().run_in_executor(None, upgrade)
                await ws.send("after")
                assert await asyncio.wait_for(ws.recv(), 10) == "echo:after"
                return result

        assert_kept_in_place(m, before, workers_before, asyncio.run(across_the_upgrade()))
        killed_and_forked_again(m, workers_before[0], 2)

        assert m.reload()["ok"] is True
        live = m.live_generation()
        assert live == before["live_generation"] + 1
        new_pids = {w["pid"] for w in m.workers("ready", generation=live)}
        assert len(new_pids) == 2 and not new_pids & set(workers_before), m.status()
        started = {}

        def every_new_worker_answered():  # new connections spread over both workers
            status, _, body = m.get("/state")
            assert status == 200, body
            state = json.loads(body)
            started[state["pid"]] = state.get("started_in")
            return set(started) >= new_pids

        wait_until(every_new_worker_answered, 20, "both new workers to answer /state",
                   interval=0.01, on_timeout=m.log)
        # Each ran its own lifespan startup, in its own process (not in the zygote before it
        # forked them).
        assert all(started[pid] == pid for pid in new_pids), started
        assert m.get("/")[::2] == (200, b"asgi hello")
    finally:
        m.kill_everything()


@pytest.mark.timeout(60)
def test_a_broken_new_binary_leaves_the_old_master_in_charge(upgradable):
    m, binary = upgradable
    before = m.status()
    good = binary.read_bytes()
    replace_binary(binary, b"#!/bin/sh\necho 'cannot start: missing libfoo.so' >&2\nexit 1\n")
    m.signal(signal.SIGUSR2)
    wait_until(lambda: "binary upgrade aborted" in m.log(), 10, "the check to fail")
    assert "cannot start: missing libfoo.so" in m.log()
    replace_binary(binary, good)
    after = m.status()
    assert after["master"]["build"] == before["master"]["build"]
    assert sorted(m.worker_pids()) == sorted(w["pid"] for g in before["generations"]
                                             for w in g["workers"])
    assert m.alive()


@pytest.mark.timeout(60)
def test_usr2_during_a_rollover_is_refused(upgradable, tmp_path):
    m, binary = upgradable
    m.config["timeouts"] = {"boot": "30s"}
    m.config["app"] = "hang_app:application"  # the next generation never becomes ready
    m.write_config()
    m.signal(signal.SIGHUP)
    wait_until(lambda: m.status()["rollover_in_progress"], 10, "the rollover to start")
    m.signal(signal.SIGUSR2)
    wait_until(lambda: "binary upgrade refused: the master is not steady" in m.log(), 10,
               "the refusal")
    assert m.alive()


@pytest.mark.timeout(60)
def test_usr2_is_refused_while_the_config_file_differs_from_the_live_generation(upgradable):
    m, binary = upgradable
    m.config["workers"] = 3
    m.write_config()
    m.signal(signal.SIGUSR2)
    wait_until(lambda: "binary upgrade refused" in m.log(), 10, "the refusal")
    assert "changed since generation 1 started" in m.log()
    assert m.reload()["ok"] is True  # after a reload the upgrade goes through
    # ... once the master is steady again: the old generation's workers have exited.
    wait_until(lambda: all(w["state"] == "exited" for w in m.workers(generation=1)), 10,
               "generation 1's workers to exit")
    before = m.status()["master"]["build"]
    replace_binary(binary, binary.read_bytes() + b"\0another build\0")
    m.signal(signal.SIGUSR2)
    wait_until(lambda: (m.try_status() or {"master": {"build": before}})["master"]["build"] != before,
               15, "the upgrade", on_timeout=m.log)


def rewriting_state(real_binary, sed_expression: str) -> bytes:
    """A "new binary" that receives the old master's state rewritten by sed, as if the old
    master had written a state this build cannot read, and checks it with the real molt."""
    return (f"#!/bin/sh\n"
            f"MOLT_UPGRADE_STATE_CHECK=$(printf '%s' \"$MOLT_UPGRADE_STATE_CHECK\" | "
            f"sed -e '{sed_expression}')\n"
            f"export MOLT_UPGRADE_STATE_CHECK\n"
            f"exec {real_binary} \"$@\"\n").encode()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("sed_expression, reason", [
    ('s/"format":1/"format":99/', "is format 99; this molt reads format 1"),
    ('s/"trigger":"startup"/"trigger":"teleport"/',
     'has an unknown trigger "teleport" (this molt knows startup, reload, rollback, watch)'),
    ('s/"format":1,//', 'has no "format"'),
])
def test_a_state_the_new_binary_cannot_read_is_refused_before_the_exec(
        upgradable, tmp_path, sed_expression, reason):
    m, binary = upgradable
    before = m.status()
    real = tmp_path / "real-molt"
    shutil.copy2(binary, real)
    replace_binary(binary, rewriting_state(real, sed_expression))
    m.signal(signal.SIGUSR2)
    wait_until(lambda: "binary upgrade aborted" in m.log(), 10, "the check to fail",
               on_timeout=m.log)
    assert "cannot adopt the running master's state: it " + reason in m.log()
    assert "this master keeps running" in m.log()
    assert "re-executing in place" not in m.log()
    after = m.status()
    assert after["master"]["build"] == before["master"]["build"]
    assert after["master"]["pid"] == m.pid
    assert sorted(m.worker_pids()) == sorted(w["pid"] for g in before["generations"]
                                             for w in g["workers"])
    assert m.get("/")[0] == 200


def test_the_upgrade_state_names_its_enums_and_format():
    """The state is read by name, so check what the old master writes: format and names."""
    import subprocess
    state = ('{"format": 1, "from_build": "x", "started_at": 5, "wall_started_at": 6, '
             '"retired_requests": 0, "next_ticket": 3, "listeners": [], "workers": [], '
             '"generation": {"id": 2, "release_dir": "/srv/a", "version": "a", "digest": "d", '
             '"trigger": "reload", "target": 2}, '
             '"history": [{"id": 1, "release_dir": "/srv/a", "version": "a", "digest": "d", '
             '"trigger": "startup", "started_at": 1, "live_at": null, "state": "gone", '
             '"failure": ""}], "restarts": {"crash": 2}, "rollovers_ok": 1, '
             '"rollovers_failed": 0}')
    check = lambda text: subprocess.run(  # noqa: E731
        [molt_bin(), "upgrade-check"], capture_output=True, text=True,
        env=dict(os.environ, MOLT_UPGRADE_STATE_CHECK=text))
    assert check(state).returncode == 0
    for old, new, reason in [
            ('"state": "gone"', '"state": 3', 'has a wrong type for "state"'),
            ('"state": "gone"', '"state": "vanished"', 'unknown generation state "vanished"'),
            ('{"crash": 2}', '{"meteor": 2}', 'unknown restart reason "meteor"'),
            ('"format": 1', '"format": 2', "is format 2; this molt reads format 1")]:
        bad = check(state.replace(old, new))
        assert bad.returncode == 1 and reason in bad.stderr, (new, bad.stderr)


def test_upgrade_check_rejects_a_state_it_could_not_adopt():
    import subprocess
    bad = subprocess.run([molt_bin(), "upgrade-check"], capture_output=True, text=True,
                         env=dict(os.environ, MOLT_UPGRADE_STATE_CHECK='{"format": 1, "generation": {}}'))
    assert bad.returncode == 1
    assert "cannot adopt the running master's state" in bad.stderr
    good = subprocess.run([molt_bin(), "upgrade-check"], capture_output=True, text=True)
    assert good.returncode == 0 and good.stdout.startswith("molt ")
