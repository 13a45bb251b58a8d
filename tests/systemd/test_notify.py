"""sd_notify: the exact messages molt sends to NOTIFY_SOCKET, recorded by a real AF_UNIX
datagram socket standing in for systemd, with each sender's pid (SCM_CREDENTIALS).

The sequences systemd relies on: READY=1 once the first generation is live; for every
rollover RELOADING=1 with MONOTONIC_USEC= first and READY=1 last, also when the rollover
failed (so `systemctl reload` and Type=notify-reload never hang); STOPPING=1 on stop;
WATCHDOG=1 at half of WATCHDOG_USEC."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import time

import pytest

from molt_testlib import Releases, molt_bin, release_tree, wait_until
from sdtestlib import env_release

BROKEN_APP = "raise RuntimeError('db url missing')\n"


def layout(tmp_path) -> Releases:
    releases = release_tree(tmp_path / "site", env_release)
    releases.add("broken", files={"app.py": BROKEN_APP, "REVISION": "broken\n"})
    return releases


def config_for(releases: Releases, **extra) -> dict:
    config = {
        "app": "app:application",
        "chdir": str(releases.current),
        "workers": 2,
        "version_file": "REVISION",
        "timeouts": {"boot": "20s", "graceful": "10s"},
    }
    config.update(extra)
    return config


def monotonic_usec() -> int:
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000


def rollover_messages(listener, mark: int, m) -> list[dict]:
    """Waits for the READY=1 that ends the rollover started after message `mark`."""
    wait_until(lambda: any("READY" in f for f in listener.state(mark)), 30,
               "READY=1 ending the rollover", on_timeout=lambda: listener.dump() + m.log())
    seq = listener.state(mark)
    end = next(i for i, f in enumerate(seq) if "READY" in f)
    return seq[:end + 1]


def assert_rollover_shape(seq: list[dict], started_after: int, started_before: int):
    # RELOADING=1 first, with the monotonic time it was sent at (systemd 253+ matches it
    # against the time it asked for the reload).
    assert set(seq[0]) == {"RELOADING", "MONOTONIC_USEC"}, seq
    assert seq[0]["RELOADING"] == "1"
    assert re.fullmatch(r"\d+", seq[0]["MONOTONIC_USEC"]), seq
    assert started_after <= int(seq[0]["MONOTONIC_USEC"]) <= started_before
    # Then only status updates, then READY=1 with the status.
    assert all(set(f) == {"STATUS"} for f in seq[1:-1]), seq
    assert set(seq[-1]) == {"READY", "STATUS"} and seq[-1]["READY"] == "1", seq


@pytest.mark.timeout(150)
def test_notify_sequence_for_start_reloads_failures_and_stop(molt, tmp_path, notify_listener):
    releases = layout(tmp_path)
    env = dict(os.environ, NOTIFY_SOCKET=notify_listener.path)
    env.pop("WATCHDOG_USEC", None)
    m = molt(config_for(releases), env=env)

    # ----- start: READY=1 with STATUS=, and nothing before it.
    wait_until(lambda: notify_listener.state(), 10, "READY=1", on_timeout=notify_listener.dump)
    first = notify_listener.state()[0]
    assert first == {"READY": "1", "STATUS": "gen 1 live (a): 2/2 ready"}, notify_listener.dump()

    # The app sees none of systemd's variables.
    assert m.get("/env")[2].decode().startswith("NOTIFY_SOCKET=None;LISTEN_FDS=None;")

    # ----- a good reload (HUP).
    releases.activate("b")
    mark, before = notify_listener.count(), monotonic_usec()
    m.signal(signal.SIGHUP)
    seq = rollover_messages(notify_listener, mark, m)
    assert_rollover_shape(seq, before, monotonic_usec())
    assert re.match(r"gen 1 draining \(a\): \d/2 ready; gen 2 live \(b\): 2/2 ready$",
                    seq[-1]["STATUS"]), seq
    # Once the old generation is gone the status says so.
    settled = {"STATUS": "gen 2 live (b): 2/2 ready"}
    wait_until(lambda: notify_listener.state(mark)[-1] == settled, 15, "the status to settle",
               on_timeout=notify_listener.dump)

    # ----- a failed reload (the release fails to import), through `ctl reload --wait`.
    releases.activate("broken")
    mark, before = notify_listener.count(), monotonic_usec()
    answer = subprocess.run([molt_bin(), "ctl", "-c", str(m.config_path), "reload", "--wait"],
                            capture_output=True, text=True, timeout=60)
    assert answer.returncode == 1, answer
    assert "RuntimeError: db url missing" in answer.stderr
    seq = rollover_messages(notify_listener, mark, m)
    assert_rollover_shape(seq, before, monotonic_usec())
    status = seq[-1]["STATUS"]
    assert status.startswith("reload failed: "), status
    assert "RuntimeError: db url missing" in status, status
    assert "; gen 2 live (b): 2/2 ready" in status, status  # still serving b
    assert m.get("/")[2] == b"version b\n"

    # ----- a reload with an invalid config file (HUP: the master re-reads it).
    releases.activate("a")
    good_config = m.config_path.read_text()
    m.write_config(good_config.replace('"workers"', '"wrokers"'))
    mark, before = notify_listener.count(), monotonic_usec()
    m.signal(signal.SIGHUP)
    seq = rollover_messages(notify_listener, mark, m)
    assert_rollover_shape(seq, before, monotonic_usec())
    status = seq[-1]["STATUS"]
    assert status.startswith("reload failed: config invalid: "), status
    assert "wrokers" in status and str(m.config_path) in status, status
    assert "; gen 2 live (b): 2/2 ready" in status, status
    m.write_config(good_config)

    # `molt ctl -c` (the units' ExecReload=) reads the file too, so with a broken file it
    # fails at once, exit 78, with the errors, and never asks the master.
    m.write_config(good_config.replace('"workers"', '"wrokers"'))
    mark = notify_listener.count()
    answer = subprocess.run([molt_bin(), "ctl", "-c", str(m.config_path), "reload", "--wait"],
                            capture_output=True, text=True, timeout=60)
    assert answer.returncode == 78, answer
    assert "wrokers" in answer.stderr
    m.write_config(good_config)
    # The next good reload is still answered (and proves the failed ctl sent nothing).
    mark, before = notify_listener.count(), monotonic_usec()
    m.signal(signal.SIGHUP)
    seq = rollover_messages(notify_listener, mark, m)
    assert_rollover_shape(seq, before, monotonic_usec())
    assert re.search(r"gen 4 live \(a\): 2/2 ready$", seq[-1]["STATUS"]), seq

    # ----- stop: STOPPING=1 first, and no READY or RELOADING after it.
    wait_until(lambda: len(m.status()["generations"]) == 1, 15, "generation 2 to be gone")
    mark = notify_listener.count()
    assert m.stop() == 0
    seq = [f for _, _, f, _ in notify_listener.all()[mark:]]
    assert seq[0] == {"STOPPING": "1"}, seq
    assert all(set(f) == {"STATUS"} for f in seq[1:]), seq

    # Every datagram came from the master (NotifyAccess=main would drop any other sender),
    # and no watchdog pings were sent without WATCHDOG_USEC.
    assert {pid for _, pid, _, _ in notify_listener.all()} == {m.pid}
    assert notify_listener.pings() == []


@pytest.mark.timeout(60)
def test_watchdog_pings_at_half_of_watchdog_usec(molt, tmp_path, notify_listener):
    releases = layout(tmp_path)
    env = dict(os.environ, NOTIFY_SOCKET=notify_listener.path, WATCHDOG_USEC="400000")
    env.pop("WATCHDOG_PID", None)
    m = molt(config_for(releases), env=env)

    # WATCHDOG_USEC=400000: a ping every 200 ms. Count pings over a bounded window rather
    # than timing each one: 10 intervals take 2 s nominally.
    start = len(notify_listener.pings())
    wait_until(lambda: len(notify_listener.pings()) >= start + 11, 15, "11 watchdog pings",
               on_timeout=notify_listener.dump)
    pings = notify_listener.pings()[start:start + 11]
    span = pings[-1] - pings[0]
    assert 1.0 <= span <= 6.0, (span, notify_listener.dump())
    assert {pid for _, pid, _, _ in notify_listener.all()} == {m.pid}
    # The workers do not inherit the watchdog (nor the socket).
    body = m.get("/env")[2].decode()
    assert "NOTIFY_SOCKET=None" in body and "WATCHDOG_USEC=None" in body, body

    assert m.stop() == 0


@pytest.mark.timeout(60)
def test_no_watchdog_pings_when_watchdog_pid_is_another_process(molt, tmp_path,
                                                               notify_listener):
    """WATCHDOG_PID names the process systemd watches; a molt that inherited the variables
    (say, from a shell started by a service) must not ping for it."""
    releases = layout(tmp_path)
    env = dict(os.environ, NOTIFY_SOCKET=notify_listener.path, WATCHDOG_USEC="400000",
               WATCHDOG_PID="1")
    m = molt(config_for(releases, workers=1), env=env)
    started = time.monotonic()
    wait_until(lambda: notify_listener.state(), 10, "READY=1", on_timeout=notify_listener.dump)
    # Watch for at least 1 s (five ping intervals), bounded by observable events (reload
    # round trips) rather than a sleep.
    for i in range(100):
        if time.monotonic() - started >= 1.0:
            break
        releases.activate("ab"[i % 2])
        mark = notify_listener.count()
        m.signal(signal.SIGHUP)
        rollover_messages(notify_listener, mark, m)
    assert time.monotonic() - started >= 1.0
    assert notify_listener.pings() == []
    assert m.stop() == 0


@pytest.mark.timeout(60)
def test_watchdog_pings_continue_after_a_binary_upgrade(molt, tmp_path, notify_listener):
    releases = layout(tmp_path)
    env = dict(os.environ, NOTIFY_SOCKET=notify_listener.path, WATCHDOG_USEC="400000")
    m = molt(config_for(releases, workers=1), env=env)
    m.signal(signal.SIGUSR2)
    wait_until(lambda: "binary upgrade complete" in m.log(), 30, "the binary upgrade",
               on_timeout=m.log)
    after = len(notify_listener.pings())
    try:
        # Five pings are due within a second; allow five.
        wait_until(lambda: len(notify_listener.pings()) >= after + 5, 5,
                   "watchdog pings from the re-executed master", on_timeout=notify_listener.dump)
    finally:
        assert m.stop() == 0
    assert {pid for _, pid, _, _ in notify_listener.all()} == {m.pid}
