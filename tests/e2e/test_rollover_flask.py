"""The promise: HUP deploys a Flask release with zero failed requests, and a broken
release never takes the service down. Real master, real workers, real Flask, real wrk."""
from __future__ import annotations

import os
import signal
import time

import pytest

from molt_testlib import (Releases, Wrk, flask_release, process_running, release_tree,
                          wait_until)


def deploy_layout(tmp_path, versions=("a", "b")):
    return release_tree(tmp_path / "site", flask_release, versions)


def body(m) -> str:
    status, _, data = m.get("/")
    assert status == 200
    return data.decode()


def rollovers_under_load(m, releases: Releases, count: int, duration: int) -> dict:
    """`count` HUP rollovers between releases a and b under wrk keep-alive load (wrk runs at
    most `duration` seconds and is stopped once the last rollover is done); wrk's result."""
    load = Wrk(m.url("/"), duration=duration, connections=32, threads=2)
    try:
        for i in range(count):
            version = "b" if i % 2 == 0 else "a"
            releases.activate(version)
            before = m.live_generation()
            m.signal(signal.SIGHUP)
            # Done, as `molt ctl reload --wait` means it: the new generation is live and the
            # old workers have stopped accepting. Between "live" and that, a new connection
            # can still reach an old worker that has not read its DRAIN yet.
            wait_until(lambda: (m.live_generation() or 0) > before
                       and not m.status()["rollover_in_progress"], 30,
                       f"rollover {i + 1} to complete", on_timeout=m.log)
            assert body(m) == f"version {version}\n"
    finally:
        result = load.stop()
    return result


@pytest.mark.timeout(240)
def test_ten_hup_rollovers_under_keepalive_load_fail_no_request(molt, tmp_path):
    # On the Python engine: the fifty-rollover soaks (test_native_engine_e2e.py) run the
    # native one, which `engine: auto` picks.
    releases = deploy_layout(tmp_path)
    m = molt(releases.config(engine="python"))
    assert body(m) == "version a\n"
    assert "(engine python: wsgi" in m.log()
    result = rollovers_under_load(m, releases, 10, 40)
    assert result["requests"] > 1000, result["output"]
    assert result["failed"] == 0, result["output"]
    assert m.alive()
    assert m.status()["rollovers"] == {"ok": 10, "failed": 0}


@pytest.mark.timeout(120)
def test_a_release_that_fails_to_import_leaves_the_old_one_serving(molt, tmp_path):
    releases = deploy_layout(tmp_path)
    releases.add("broken", files={"app.py": "import flask\nraise RuntimeError('db url missing')\n"})
    m = molt(releases.config())
    load = Wrk(m.url("/"), duration=8, connections=16)
    try:
        releases.activate("broken")
        answer = m.reload()
    finally:
        result = load.result()
    assert answer["ok"] is False
    assert "RuntimeError: db url missing" in answer["error"]
    assert "exited with status 3" in answer["error"]
    assert result["failed"] == 0, result["output"]
    assert body(m) == "version a\n"
    assert m.alive()
    status = m.status()
    assert status["last_rollover"]["ok"] is False
    assert [g["state"] for g in status["generations"]] == ["live"]


@pytest.mark.timeout(120)
def test_a_release_that_hangs_in_import_times_out_and_the_old_one_keeps_serving(molt, tmp_path):
    releases = deploy_layout(tmp_path)
    releases.add("hangs", files={"app.py": "import time\ntime.sleep(3600)\n"})
    m = molt(releases.config(timeouts={"boot": "2s", "graceful": "10s"}))
    load = Wrk(m.url("/"), duration=6, connections=16)
    try:
        releases.activate("hangs")
        started = time.monotonic()
        answer = m.reload()
        took = time.monotonic() - started
    finally:
        result = load.result()
    assert answer["ok"] is False
    assert "did not send READY within timeouts.boot (2000ms)" in answer["error"]
    assert took < 10
    assert result["failed"] == 0, result["output"]
    assert body(m) == "version a\n"
    # The hung workers are killed and reaped; only the live generation remains.
    wait_until(lambda: len(m.status()["generations"]) == 1, 10, "the failed generation to be reaped")


@pytest.mark.timeout(120)
def test_a_failed_release_followed_by_a_good_one(molt, tmp_path):
    releases = deploy_layout(tmp_path, versions=("a", "b"))
    releases.add("broken", files={"app.py": "syntax error here\n"})
    m = molt(releases.config())
    releases.activate("broken")
    assert m.reload()["ok"] is False
    releases.activate("b")
    answer = m.reload()
    assert answer["ok"] is True, answer
    assert body(m) == "version b\n"
    assert m.status()["rollovers"] == {"ok": 1, "failed": 1}


@pytest.mark.timeout(120)
def test_kill_9_of_a_worker_under_load_is_replaced_within_a_second(molt, tmp_path):
    releases = deploy_layout(tmp_path)
    m = molt(releases.config(workers=2))
    load = Wrk(m.url("/"), duration=6, connections=8)
    try:
        victim = m.workers("ready")[0]
        killed_at = time.monotonic()
        os.kill(victim["pid"], signal.SIGKILL)

        def replaced():
            ready = [w for w in m.workers("ready") if w["slot"] == victim["slot"]]
            return ready and ready[0]["pid"] != victim["pid"]

        wait_until(replaced, 5, "a replacement worker to be ready", on_timeout=m.log)
        assert time.monotonic() - killed_at < 1.0
    finally:
        load.result()
    assert "killed by SIGKILL (crash); replacing it in 0ms" in m.log()
    assert m.status()["generations"][0]["workers"][0]["restarts"] + \
        m.status()["generations"][0]["workers"][1]["restarts"] == 1


@pytest.mark.timeout(60)
def test_workers_never_outlive_a_master_killed_with_sigkill(molt, tmp_path):
    releases = deploy_layout(tmp_path)
    m = molt(releases.config())
    pids = m.worker_pids()
    assert len(pids) == 2
    m.proc.kill()
    m.proc.wait(5)

    def all_gone():
        for pid in pids:
            try:
                os.kill(pid, 0)
                # A zombie is gone for our purpose: it no longer runs.
                with open(f"/proc/{pid}/stat") as f:
                    if f.read().split()[2] != "Z":
                        return False
            except (ProcessLookupError, FileNotFoundError):
                continue
        return True

    wait_until(all_gone, 15, "the orphaned workers to see EOF and exit")


@pytest.mark.timeout(120)
def test_rollover_in_batches_keeps_serving(molt, tmp_path):
    releases = deploy_layout(tmp_path)
    m = molt(releases.config(workers=3, rollover={"batch": 1}))
    old = m.status()["generations"][0]
    load = Wrk(m.url("/"), duration=10, connections=16)
    try:
        releases.activate("b")
        answer = m.reload()
    finally:
        result = load.stop()
    assert answer["ok"] is True, answer
    assert result["failed"] == 0, result["output"]
    assert "rollover batch: 2 of 3 slots handed over" in m.log()
    assert body(m) == "version b\n"
    # Preloaded (preload: auto, the default): the new generation has its own zygote, every
    # worker of it was forked, and the old zygote went with its generation.
    new = next(g for g in m.status()["generations"] if g["id"] == m.live_generation())
    assert old["preload"]["preloaded"] and new["preload"]["preloaded"], (old, new)
    assert new["preload"]["zygote"]["pid"] != old["preload"]["zygote"]["pid"]
    assert len(new["workers"]) == 3 and all(w["forked"] for w in new["workers"]), new
    wait_until(lambda: not process_running(old["preload"]["zygote"]["pid"]), 15,
               "the old generation's zygote to be gone", on_timeout=m.log)
