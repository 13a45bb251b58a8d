"""preload: a per-generation zygote imports each release once and forks its workers, and every
HUP still loads new code. Real master, real Flask/Django/Starlette, real wrk.

Each app appends its pid to IMPORT_LOG when its module is imported, so a test counts imports
(one per generation when preloaded, one per worker otherwise) instead of timing anything."""
from __future__ import annotations

import json
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
from pathlib import Path

import pytest

from molt_testlib import (APPS, Releases, Wrk, connections_held, flask_release, free_port, http_get,
                          uid_of, wait_until)

MARK_IMPORT = (
    "import os as _os\n"
    "with open(_os.environ['IMPORT_LOG'], 'a') as _log:\n"
    "    _log.write('%d\\n' % _os.getpid())\n"
)


def marked_flask_release(version: str) -> dict:
    files = flask_release(version)
    files["app.py"] = MARK_IMPORT + files["app.py"]
    return files


def release_a(root: Path) -> tuple[Releases, Path]:
    """One marked Flask release "a", active, under `root`, and the import log its imports
    append to."""
    releases = Releases(root / "site")
    releases.add("a", files=marked_flask_release("a"))
    releases.activate("a")
    return releases, root / "imports.log"


def imports(log: Path) -> list[int]:
    return [int(line) for line in log.read_text().split()] if log.exists() else []


def config_for(releases: Releases, log: Path, **extra) -> dict:
    config = releases.config(env={"IMPORT_LOG": str(log)}, preload="auto")
    config.update(extra)
    return {key: value for key, value in config.items() if value is not None}


def body(m, path: str = "/") -> str:
    status, _, data = m.get(path)
    assert status == 200, data
    return data.decode()


def generation(m, gen_id: int) -> dict:
    return next(g for g in m.status()["generations"] if g["id"] == gen_id)


def assert_preloaded(m, gen_id: int):
    gen = generation(m, gen_id)
    assert gen["preload"]["preloaded"] is True, gen
    assert gen["preload"]["zygote"]["pid"] > 0, gen
    assert gen["preload"]["zygote"]["rss_bytes"] > 0, gen
    assert all(w["forked"] for w in gen["workers"]), gen
    assert all(w["pss_bytes"] > 0 for w in gen["workers"] if w["state"] == "ready"), gen


def rollover(m, expect: str, path: str = "/"):
    before = m.live_generation()
    m.signal(signal.SIGHUP)
    wait_until(lambda: (m.live_generation() or 0) > before
               and not m.status()["rollover_in_progress"], 40,
               "the rollover to complete", on_timeout=m.log)
    assert body(m, path) == expect


@pytest.mark.timeout(180)
def test_flask_preloaded_rollovers_under_load_load_new_code_once_per_generation(molt, tmp_path):
    log = tmp_path / "imports.log"
    releases = Releases(tmp_path / "site")
    for version in ("a", "b"):
        releases.add(version, files=marked_flask_release(version))
    releases.activate("a")
    m = molt(config_for(releases, log))
    assert body(m) == "version a\n"
    assert_preloaded(m, m.live_generation())
    assert "(engine native: wsgi" in m.log()  # engine: auto picked the native engine
    assert len(imports(log)) == 1  # the zygote's, not one per worker

    load = Wrk(m.url("/"), duration=25, connections=32)
    try:
        for i in range(4):
            version = "b" if i % 2 == 0 else "a"
            releases.activate(version)
            rollover(m, f"version {version}\n")
            assert_preloaded(m, m.live_generation())
    finally:
        result = load.stop()
    assert result["requests"] > 500, result["output"]
    assert result["failed"] == 0, result["output"]
    assert len(imports(log)) == 5  # one import per generation
    assert m.status()["rollovers"] == {"ok": 4, "failed": 0}


@pytest.mark.timeout(180)
def test_django_preloaded_rollovers_under_load(molt, tmp_path):
    log = tmp_path / "imports.log"
    releases = Releases(tmp_path / "site")
    for version in ("v1", "v2"):
        target = releases.add(version, source=APPS / "django_site")
        wsgi = target / "mysite" / "wsgi.py"
        wsgi.write_text(MARK_IMPORT + wsgi.read_text())
        views = target / "pages" / "views.py"
        views.write_text(views.read_text().replace("django says hi", f"django {version}"))
    releases.activate("v1")
    m = molt(config_for(releases, log, app="mysite.wsgi:application", version_file=None,
                        env={"IMPORT_LOG": str(log),
                             "DJANGO_SETTINGS_MODULE": "mysite.settings"}))
    assert body(m) == "django v1"
    assert_preloaded(m, m.live_generation())

    load = Wrk(m.url("/"), duration=15, connections=16)
    try:
        for version in ("v2", "v1"):
            releases.activate(version)
            rollover(m, f"django {version}")
    finally:
        result = load.stop()
    assert result["failed"] == 0, result["output"]
    assert len(imports(log)) == 3


@pytest.mark.timeout(120)
def test_a_broken_release_fails_once_in_its_zygote_with_its_import_error(molt, tmp_path):
    log = tmp_path / "imports.log"
    releases = Releases(tmp_path / "site")
    releases.add("a", files=marked_flask_release("a"))
    releases.add("broken", files={"app.py": MARK_IMPORT + "from nowhere_to_be_found import x\n",
                                  "REVISION": "broken\n"})
    releases.activate("a")
    m = molt(config_for(releases, log))
    load = Wrk(m.url("/"), duration=6, connections=8)
    try:
        releases.activate("broken")
        answer = m.reload()
    finally:
        result = load.result()
    assert answer["ok"] is False
    assert "zygote" in answer["error"], answer
    assert "No module named 'nowhere_to_be_found'" in answer["error"], answer
    assert "exited with status 3" in answer["error"], answer
    assert len(imports(log)) == 2  # generation 1's zygote and the broken one's, once
    assert result["failed"] == 0, result["output"]
    assert body(m) == "version a\n"


@pytest.mark.timeout(150)
def test_kill_9_of_a_worker_and_of_the_zygote_under_load(molt, tmp_path):
    releases, log = release_a(tmp_path)
    connections = 16
    m = molt(config_for(releases, log))
    gen = m.live_generation()

    # A worker: its replacement is forked from the zygote, not imported again.
    victim = next(w for w in m.workers("ready") if w["slot"] == 0)
    load = Wrk(m.url("/"), duration=6, connections=connections)
    try:
        # wrk's connections stay where they were accepted: the victim's, counted just before
        # the kill, are the only ones whose requests may fail.
        wait_until(lambda: sum(connections_held(w["pid"], m.port)
                               for w in m.workers("ready")) == connections, 10,
                   "all of wrk's connections accepted", on_timeout=m.log)
        held = connections_held(victim["pid"], m.port)
        os.kill(victim["pid"], signal.SIGKILL)
        wait_until(lambda: any(w["slot"] == 0 and w["pid"] != victim["pid"]
                               for w in m.workers("ready")), 20,
                   "a replacement in slot 0", on_timeout=m.log)
    finally:
        result = load.result()
    replacement = next(w for w in m.workers("ready") if w["slot"] == 0)
    assert replacement["forked"] is True
    assert len(imports(log)) == 1
    # Only the connections the killed worker held can have failed, and the others did not.
    assert result["failed"] <= held, (held, result["output"])

    # The zygote: its workers serve on untouched; not one request fails.
    zygote = generation(m, gen)["preload"]["zygote"]["pid"]
    serving = sorted(w["pid"] for w in m.workers("ready"))
    load = Wrk(m.url("/"), duration=5, connections=connections)
    try:
        os.kill(zygote, signal.SIGKILL)
        wait_until(lambda: generation(m, gen)["preload"]["zygote"] is None, 20,
                   "the master to see the zygote's death", on_timeout=m.log)
    finally:
        result = load.result()
    assert result["failed"] == 0, result["output"]
    assert sorted(w["pid"] for w in m.workers("ready")) == serving
    assert "killed by SIGKILL" in generation(m, gen)["preload"]["fallback"]
    assert "later workers of generation" in m.log()

    # Later replacements import the app themselves.
    os.kill(serving[0], signal.SIGKILL)
    # The victim's absence first: it holds once true, so the count read after it is the
    # replacement's (the other order can read two ready workers, then see the victim reaped).
    wait_until(lambda: serving[0] not in m.worker_pids() and len(m.workers("ready")) == 2, 30,
               "a plain replacement", on_timeout=m.log)
    assert len(imports(log)) == 2
    assert body(m) == "version a\n"


def pipe_fds(pid: int) -> list[int]:
    fds = []
    for name in os.listdir(f"/proc/{pid}/fd"):
        try:
            if os.readlink(f"/proc/{pid}/fd/{name}").startswith("pipe:"):
                fds.append(int(name))
        except OSError:
            pass  # closed while listed
    return sorted(fds)


@pytest.mark.timeout(90)
def test_workers_forked_in_one_batch_hold_only_their_own_ends(molt, tmp_path):
    """A generation's fork requests are served together by one intermediate: each worker
    must hold its own channel and output pipes only, not the batch's other workers' (their
    pipes would then never see EOF when that worker dies). A replacement, forked alone,
    has exactly the same pipes."""
    releases, log = release_a(tmp_path)
    m = molt(config_for(releases, log, workers=4))
    assert_preloaded(m, m.live_generation())
    batch = {w["pid"]: pipe_fds(w["pid"]) for w in m.workers("ready")}
    assert len(batch) == 4
    assert len({tuple(fds) for fds in batch.values()}) == 1, batch

    victim = next(iter(batch))
    os.kill(victim, signal.SIGKILL)
    wait_until(lambda: victim not in m.worker_pids() and len(m.workers("ready")) == 4, 20,
               "a forked replacement", on_timeout=m.log)
    replacement = next(w for w in m.workers("ready") if w["pid"] not in batch)
    assert replacement["forked"] is True
    assert pipe_fds(replacement["pid"]) == batch[victim]
    assert len(imports(log)) == 1
    assert body(m) == "version a\n"


def spare_pid(m, gen_id: int) -> int:
    zygote = generation(m, gen_id)["preload"]["zygote"]
    return (zygote or {}).get("spare_pid") or 0


def ignores_sigchld(pid: int) -> bool:
    with open(f"/proc/{pid}/status") as f:
        mask = next(int(line.split()[1], 16) for line in f if line.startswith("SigIgn:"))
    return bool(mask & (1 << (signal.SIGCHLD - 1)))


def children_of(pid: int) -> list:
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        return [int(p) for p in f.read().split()]


def parent_of(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as f:
        return int(f.read().rsplit(")", 1)[1].split()[1])


@pytest.mark.timeout(90)
def test_a_killed_workers_replacement_is_the_spare_forked_ahead_and_a_new_spare_follows(
        molt, tmp_path):
    """The zygote keeps one worker forked ahead (its spare): the master's child, waiting,
    never an importer. A replacement is that spare, an ordinary forked worker from then on;
    then the zygote forks the next spare. A spare killed while it waits leaves the status at
    once; the next request finds it gone and is forked as before, and a new spare follows.
    The zygote's death takes a waiting spare with it. The zygote holds no zombie."""
    releases, log = release_a(tmp_path)
    m = molt(config_for(releases, log, workers=2))
    gen = m.live_generation()
    spare = wait_until(lambda: spare_pid(m, gen), 20, "a spare", on_timeout=m.log)
    # Its intermediate says SPARE_PID= right after the fork, and exits: the master adopts it.
    wait_until(lambda: parent_of(spare) == m.pid, 10, "the master to adopt the spare",
               on_timeout=m.log)
    assert spare not in m.worker_pids() and spare not in imports(log)
    # Its intermediate set SIGCHLD back to the default the zygote ignores (zygote.serve_forks):
    # a spare that died before the intermediate exited would otherwise never reach the master.
    assert not ignores_sigchld(spare)
    assert f"spare worker pid {spare}" in m.ctl("status").stdout

    victim = next(w for w in m.workers("ready") if w["slot"] == 0)
    os.kill(victim["pid"], signal.SIGKILL)
    wait_until(lambda: any(w["slot"] == 0 and w["pid"] != victim["pid"]
                           for w in m.workers("ready")), 20, "a replacement", on_timeout=m.log)
    replacement = next(w for w in m.workers("ready") if w["slot"] == 0)
    assert replacement["pid"] == spare and replacement["forked"] is True
    # It ran the interpreter's after-fork work and started its engine's threads only now.
    assert len(os.listdir(f"/proc/{spare}/task")) > 1
    assert len(imports(log)) == 1
    assert body(m) == "version a\n"
    after = wait_until(lambda: spare_pid(m, gen) not in (0, spare) and spare_pid(m, gen), 20,
                       "the next spare", on_timeout=m.log)

    zygote = generation(m, gen)["preload"]["zygote"]["pid"]
    # The intermediates are the kernel's to reap: none is left as the zygote's zombie (the
    # spare's may still be exiting when its SPARE_PID= has been read).
    wait_until(lambda: children_of(zygote) == [], 10, "no child of the zygote left",
               on_timeout=m.log)
    assert ignores_sigchld(zygote)
    # ... but the app's own children are its to wait for: each worker has the default again,
    # the spare's and the forked ones.
    assert not any(ignores_sigchld(pid) for pid in m.worker_pids())

    os.kill(after, signal.SIGKILL)  # while it waits: the master reaps it and stops showing it
    wait_until(lambda: spare_pid(m, gen) == 0, 10, "the killed spare to leave the status",
               on_timeout=m.log)
    victim = next(w for w in m.workers("ready") if w["slot"] == 1)
    os.kill(victim["pid"], signal.SIGKILL)  # the zygote finds its spare gone, and forks this one
    wait_until(lambda: any(w["slot"] == 1 and w["pid"] != victim["pid"]
                           for w in m.workers("ready")), 20, "a replacement", on_timeout=m.log)
    assert next(w for w in m.workers("ready") if w["slot"] == 1)["pid"] != after
    assert "the spare worker (pid %d) is gone" % after in m.log()
    third = wait_until(lambda: spare_pid(m, gen) not in (0, after) and spare_pid(m, gen), 20,
                       "a spare after the killed one", on_timeout=m.log)
    # Two at once: one is the spare, the other is forked on demand, as before.
    victims = m.worker_pids()
    for pid in victims:
        os.kill(pid, signal.SIGKILL)
    wait_until(lambda: not set(victims) & set(m.worker_pids())
               and len(m.workers("ready")) == 2, 20, "both replacements", on_timeout=m.log)
    assert third in m.worker_pids()
    assert all(w["forked"] for w in m.workers("ready"))
    assert len(imports(log)) == 1
    assert body(m) == "version a\n"

    fourth = wait_until(lambda: spare_pid(m, gen) not in (0, third) and spare_pid(m, gen), 20,
                        "one more spare", on_timeout=m.log)
    os.kill(generation(m, gen)["preload"]["zygote"]["pid"], signal.SIGKILL)
    wait_until(lambda: not alive(fourth), 10, "the waiting spare to go with its zygote",
               on_timeout=m.log)
    assert body(m) == "version a\n"
    assert len(m.workers("ready")) == 2


@pytest.mark.timeout(90)
def test_the_python_engine_forks_each_replacement_on_demand(molt, tmp_path):
    """The spare waits in the native extension, which the Python engine's zygote never loads:
    its replacements are forked on request, as before the spare."""
    releases, log = release_a(tmp_path)
    m = molt(config_for(releases, log, workers=1, engine="python"))
    victim = m.worker_pids()[0]
    os.kill(victim, signal.SIGKILL)
    wait_until(lambda: victim not in m.worker_pids() and len(m.workers("ready")) == 1, 20,
               "a forked replacement", on_timeout=m.log)
    assert m.workers("ready")[0]["forked"] is True
    assert spare_pid(m, m.live_generation()) == 0
    assert len(imports(log)) == 1
    assert body(m) == "version a\n"


def release_with_a_thread_at_import(tmp_path) -> Releases:
    """Release "a", whose import starts a thread (named metrics-poller) that stays alive."""
    releases = Releases(tmp_path / "site")
    files = marked_flask_release("a")
    files["app.py"] += (
        "import threading, time\n"
        "threading.Thread(target=lambda: time.sleep(3600), name='metrics-poller',\n"
        "                 daemon=True).start()\n"
    )
    releases.add("a", files=files)
    releases.activate("a")
    return releases


@pytest.mark.timeout(90)
def test_a_thread_started_at_import_falls_back_under_auto_and_says_why(molt, tmp_path):
    log = tmp_path / "imports.log"
    releases = release_with_a_thread_at_import(tmp_path)
    m = molt(config_for(releases, log))
    assert body(m) == "version a\n"
    gen = generation(m, m.live_generation())
    assert gen["preload"]["preloaded"] is False
    assert "metrics-poller" in gen["preload"]["fallback"]
    assert not any(w["forked"] for w in gen["workers"])
    assert "preload: auto falls back to importing the app in each worker" in m.log()
    assert "metrics-poller" in m.log()
    assert len(imports(log)) == 3  # the zygote's look, then each worker's own import


@pytest.mark.timeout(90)
def test_preload_true_forks_with_a_thread_alive_and_replaces_a_killed_worker(molt, tmp_path):
    # The zygote's intermediate skips the interpreter's after-fork work only while the zygote
    # runs no other thread (zygote.Forks); with one alive it is plain os.fork(), and no spare
    # is forked ahead (zygote.Spare holds the state between the fork and that work).
    log = tmp_path / "imports.log"
    releases = release_with_a_thread_at_import(tmp_path)
    m = molt(config_for(releases, log, preload="true"))
    assert_preloaded(m, m.live_generation())
    assert "preload: true: forking although" in m.log()
    victim = m.worker_pids()[0]
    os.kill(victim, signal.SIGKILL)
    wait_until(lambda: victim not in m.worker_pids() and len(m.workers("ready")) == 2, 20,
               "a forked replacement", on_timeout=m.log)
    assert all(w["forked"] for w in m.workers("ready"))
    assert body(m) == "version a\n"
    assert len(imports(log)) == 1
    assert spare_pid(m, m.live_generation()) == 0


SOCKET_APP = MARK_IMPORT + '''
import os
import socket

def _udp():
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    return sock

SOCK = _udp()  # opened at import: shared by every forked worker unless replaced
IMPORT_PORT = SOCK.getsockname()[1]

def post_fork():
    global SOCK
    SOCK.close()
    SOCK = _udp()

def worker_exit():
    with open(os.environ["EXIT_LOG"], "a") as log:
        log.write("%d " % os.getpid())

def app(environ, start_response):
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [("%d %d" % (IMPORT_PORT, SOCK.getsockname()[1])).encode()]
'''


@pytest.mark.timeout(90)
def test_a_socket_opened_at_import_is_named_and_a_post_fork_hook_replaces_it(molt, tmp_path):
    log = tmp_path / "imports.log"
    releases = Releases(tmp_path / "site")
    releases.add("a", files={"app.py": SOCKET_APP, "REVISION": "a\n"})
    releases.activate("a")
    exits = tmp_path / "exits.log"
    m = molt(config_for(releases, log, preload="true", health={"path": "/"},
                        hooks={"post_fork": "app:post_fork", "worker_exit": "app:worker_exit"},
                        env={"IMPORT_LOG": str(log), "EXIT_LOG": str(exits)}))
    assert_preloaded(m, m.live_generation())
    assert "preload: true: forking although" in m.log()
    assert "an open socket" in m.log()
    import_port, worker_port = (int(x) for x in body(m).split())
    assert worker_port != import_port
    assert len(imports(log)) == 1
    # hooks.worker_exit runs in each worker after its drain.
    old = sorted(w["pid"] for w in m.workers("ready"))
    assert m.reload()["ok"] is True
    wait_until(lambda: exits.exists() and sorted(imports(exits)) == old, 20,
               "worker_exit in both old workers", on_timeout=m.log)


HOOKED_APP = MARK_IMPORT + '''
import os

def post_fork():
    if os.environ.get("POST_FORK_BROKEN"):
        raise RuntimeError("cannot reach the database")
    with open(os.environ["HOOK_LOG"], "a") as log:
        log.write("%d\\n" % os.getpid())

def app(environ, start_response):
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [open("REVISION").read().encode()]
'''


@pytest.mark.timeout(90)
def test_hooks_run_without_preload_too_and_a_failing_post_fork_fails_the_rollover(molt, tmp_path):
    log, hooked = tmp_path / "imports.log", tmp_path / "hooks.log"
    releases = Releases(tmp_path / "site")
    releases.add("a", files={"app.py": HOOKED_APP, "REVISION": "a\n"})
    releases.activate("a")
    env = {"IMPORT_LOG": str(log), "HOOK_LOG": str(hooked)}
    m = molt(config_for(releases, log, preload="false", health={"path": "/"},
                        hooks={"post_fork": "app:post_fork"}, env=env))
    # Not preloaded: each worker imports the app, and its post_fork still runs, once, in it.
    assert sorted(imports(log)) == sorted(imports(hooked)) == sorted(m.worker_pids())
    assert generation(m, m.live_generation())["preload"]["preloaded"] is False

    # A release whose post_fork raises: the rollover fails with the hook's own error and the
    # old generation serves on.
    m.config["env"] = dict(env, POST_FORK_BROKEN="1")
    m.write_config()
    answer = m.reload()
    assert answer["ok"] is False
    assert "hooks.post_fork (app:post_fork) failed: RuntimeError: cannot reach the database" \
        in answer["error"], answer
    assert body(m) == "a\n"
    wait_until(lambda: [g["state"] for g in m.status()["generations"]] == ["live"], 10,
               "the failed generation to be reaped", on_timeout=m.log)


@pytest.mark.timeout(90)
def test_a_recycled_worker_is_forked_again_not_imported_again(molt, tmp_path):
    releases, log = release_a(tmp_path)
    m = molt(config_for(releases, log, recycle={"max_requests": 20, "max_requests_jitter": 0}))
    assert_preloaded(m, m.live_generation())
    first = set(m.worker_pids())

    def both_recycled():  # requests until each first worker has served its 20 and gone
        assert body(m) == "version a\n"
        return len(m.workers("ready")) == 2 and not first & set(m.worker_pids())

    wait_until(both_recycled, 30, "both workers recycled", on_timeout=m.log)
    assert all(w["forked"] for w in m.workers("ready"))
    assert len(imports(log)) == 1  # the zygote's import, still the only one
    assert "max_requests" in m.log()


NOBODY = pwd.getpwnam("nobody")


def nobody_can_read(path: str) -> bool:
    def as_nobody():
        os.setgid(NOBODY.pw_gid)
        os.setuid(NOBODY.pw_uid)

    return subprocess.run(["/usr/bin/python3", "-c", "import sys; open(sys.argv[1]).close()",
                           path], preexec_fn=as_nobody, capture_output=True,
                          timeout=30).returncode == 0


@pytest.mark.skipif(os.geteuid() != 0, reason="taking another user's identity needs root")
@pytest.mark.timeout(90)
def test_the_zygote_its_standby_and_its_workers_run_as_the_configured_user(molt):
    shim = Path(os.environ["MOLT_BIN"]).resolve().parent.parent / "lib/molt/molt_shim/__main__.py"
    if not nobody_can_read(str(shim)):
        pytest.skip(f"user nobody cannot read {shim} (the checkout is not world-readable)")
    root = Path(tempfile.mkdtemp(prefix="molt-preload-user-"))
    try:
        root.chmod(0o755)  # readable by nobody, unlike pytest's own tmp_path
        releases, log = release_a(root)
        log.touch(mode=0o666)
        log.chmod(0o666)
        m = molt(config_for(releases, log, user="nobody", group="nogroup"))
        assert body(m) == "version a\n"

        def assert_as_nobody():
            gen = generation(m, m.live_generation())
            assert_preloaded(m, gen["id"])
            standby = wait_until(lambda: standby_pid(m), 10, "the standby", on_timeout=m.log)
            pids = [gen["preload"]["zygote"]["pid"], standby] + [w["pid"] for w in gen["workers"]]
            assert {pid: uid_of(pid) for pid in pids} == {pid: NOBODY.pw_uid for pid in pids}

        assert_as_nobody()
        assert uid_of(m.status()["master"]["pid"]) == 0
        assert imports(log) == [generation(m, m.live_generation())["preload"]["zygote"]["pid"]]
        # The next zygote is the standby, started as nobody: so are the workers it forks.
        rollover(m, "version a\n")
        assert_as_nobody()
    finally:
        shutil.rmtree(root)


@pytest.mark.timeout(90)
def test_an_asgi_app_preloaded_runs_its_loop_and_lifespan_in_each_worker(molt, tmp_path):
    metrics = free_port()
    m = molt({"app": "lifespan_app:app", "interface": "asgi", "chdir": str(APPS),
              "workers": 2, "preload": "auto", "health": {"path": "/"},
              "metrics": {"listen": f"tcp://127.0.0.1:{metrics}"}})
    assert body(m) == "lifespan ran"
    assert_preloaded(m, m.live_generation())
    text = http_get(metrics, "/metrics")[2].decode()
    assert 'molt_generation_preloaded{generation="1"} 1' in text, text
    assert "molt_zygote_proportional_memory_bytes{generation=\"1\"" in text, text
    assert 'molt_worker_proportional_memory_bytes{generation="1",slot="1"}' in text, text
    assert_lifespan_ran_in_each_worker(m)
    rollover(m, "lifespan ran")
    assert_preloaded(m, m.live_generation())
    assert_lifespan_ran_in_each_worker(m)


def assert_lifespan_ran_in_each_worker(m):
    """Every ready worker of the live generation ran the startup itself, on the loop that
    serves its requests: not the zygote before the fork (the startup would then say the
    zygote's pid, and its loop would not be the one running)."""
    gen = generation(m, m.live_generation())
    pids = {w["pid"] for w in gen["workers"] if w["state"] == "ready"}
    assert len(pids) == 2 and gen["preload"]["zygote"]["pid"] not in pids, gen
    seen = {}

    def every_worker_answered():  # new connections spread over both workers
        where = json.loads(http_get(m.port, "/where")[2])
        seen[where["pid"]] = where
        return set(seen) >= pids

    wait_until(every_worker_answered, 20, "both workers to answer /where", interval=0.01,
               on_timeout=m.log)
    for pid in pids:
        assert seen[pid]["startup_pid"] == pid and seen[pid]["startup_on_this_loop"], seen


# ----- the standby: the next zygote, forked by this one before its import ---------------------

WHERE_APP = MARK_IMPORT + '''
import json
import os
import sys

IMPORTED_IN = os.getcwd()
PATH = [p for p in sys.path]


def app(environ, start_response):
    config = json.loads(os.environ["MOLT_WORKER_CONFIG"])
    body = json.dumps({
        "imported_in": IMPORTED_IN, "cwd": os.getcwd(), "path": PATH,
        "generation": os.environ.get("MOLT_GENERATION"), "config_generation":
        config["generation"], "release_env": os.environ.get("RELEASE_SETTING"),
        "zygote": os.environ.get("MOLT_ZYGOTE"),
        "version": open("REVISION").read().strip()}).encode()
    start_response("200 OK", [("Content-Type", "application/json")])
    return [body]
'''


def where(m) -> dict:
    return json.loads(body(m))


def standby_pid(m) -> int:
    standby = m.status()["standby"]
    return standby["pid"] if standby else 0


def site(tmp_path: Path, **files_by_version: dict) -> tuple[Path, Releases]:
    """The import log and a release tree with these releases, the first one current."""
    releases = Releases(tmp_path / "site")
    for version, files in files_by_version.items():
        releases.add(version, files=files)
    releases.activate(next(iter(files_by_version)))
    return tmp_path / "imports.log", releases


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.timeout(120)
def test_the_standby_takes_a_release_after_its_own_directory_was_deleted(molt, tmp_path):
    """The standby starts in the live release's directory. Deploys that prune old releases
    (or replace a directory in place) delete it under the standby, whose getcwd() then
    failed: the next rollover's zygote exited with FileNotFoundError."""
    log, releases = site(tmp_path, **{v: {"app.py": WHERE_APP, "REVISION": v + "\n"}
                                      for v in ("a", "b")})
    m = molt(config_for(releases, log, health=None, env={"IMPORT_LOG": str(log)}))
    assert where(m)["version"] == "a"
    standby = wait_until(lambda: standby_pid(m), 20, "a standby", on_timeout=m.log)
    releases.activate("b")
    shutil.rmtree(releases.root / "releases" / "a")
    answer = m.reload()
    assert answer["ok"] is True, answer
    assert generation(m, 2)["preload"]["zygote"]["pid"] == standby
    seen = where(m)
    assert seen["version"] == "b"
    assert seen["cwd"] == seen["path"][0] == str((releases.root / "releases" / "b").resolve())


@pytest.mark.timeout(120)
def test_the_next_zygote_is_the_standby_and_its_app_sees_what_a_spawned_ones_sees(molt, tmp_path):
    """Every zygote forks a standby before its import; a HUP whose launch is the same hands it
    the new release instead of starting an interpreter. The app cannot tell: its directory,
    sys.path and molt's variables are the new generation's, as in a spawned zygote."""
    log, releases = site(tmp_path, **{v: {"app.py": WHERE_APP, "REVISION": v + "\n"}
                                      for v in ("a", "b", "c")})
    m = molt(config_for(releases, log, health=None, env={"IMPORT_LOG": str(log),
                                                         "RELEASE_SETTING": "one"}))
    spawned = where(m)
    assert spawned["version"] == "a"
    first = wait_until(lambda: standby_pid(m), 20, "a standby", on_timeout=m.log)
    assert first not in imports(log)  # it never imports a release before it is told to

    load = Wrk(m.url("/"), duration=8, connections=8)
    try:
        for version, gen in (("b", 2), ("c", 3)):
            expected_zygote = standby_pid(m)
            releases.activate(version)
            assert m.reload()["ok"] is True
            assert generation(m, gen)["preload"]["zygote"]["pid"] == expected_zygote
            assert_preloaded(m, gen)
            seen = where(m)
            assert seen["version"] == version
            release = str((releases.root / "releases" / version).resolve())
            assert seen["cwd"] == seen["imported_in"] == release
            assert seen["path"][0] == release
            assert str((releases.root / "releases" / "a").resolve()) not in seen["path"]
            assert len(seen["path"]) == len(spawned["path"])
            assert seen["generation"] == str(gen) and seen["config_generation"] == gen
            assert seen["zygote"] is None and seen["release_env"] == "one"
            wait_until(lambda: standby_pid(m) not in (0, expected_zygote), 20,
                       "the next standby", on_timeout=m.log)
    finally:
        result = load.result()
    assert result["failed"] == 0, result["output"]
    assert "the standby (pid %d) becomes the zygote" % first in m.log()
    assert sorted(imports(log)) == sorted(set(imports(log)))  # one import per zygote
    assert len(imports(log)) == 3


@pytest.mark.timeout(120)
def test_a_changed_environment_starts_a_new_interpreter_and_a_new_standby(molt, tmp_path):
    log, releases = site(tmp_path, a={"app.py": WHERE_APP, "REVISION": "a\n"})
    m = molt(config_for(releases, log, health=None, env={"IMPORT_LOG": str(log),
                                                         "RELEASE_SETTING": "one"}))
    old = wait_until(lambda: standby_pid(m), 20, "a standby", on_timeout=m.log)
    m.config["env"]["RELEASE_SETTING"] = "two"  # acts at an interpreter's start: not standby's
    m.write_config()
    assert m.reload()["ok"] is True
    assert generation(m, 2)["preload"]["zygote"]["pid"] != old
    assert where(m)["release_env"] == "two"
    assert "the new zygote's launch differs from the standby's" in m.log()
    wait_until(lambda: not alive(old), 10, "the unused standby to be gone", on_timeout=m.log)
    new = wait_until(lambda: standby_pid(m), 20, "a new standby", on_timeout=m.log)
    assert new != old
    assert m.reload()["ok"] is True  # and the new one is used
    assert generation(m, 3)["preload"]["zygote"]["pid"] == new


@pytest.mark.timeout(120)
def test_a_standby_killed_is_replaced_by_the_next_zygote_and_nothing_outlives_the_master(
        molt, tmp_path):
    log, releases = site(tmp_path, a=marked_flask_release("a"), b=marked_flask_release("b"))
    m = molt(config_for(releases, log))
    victim = wait_until(lambda: standby_pid(m), 20, "a standby", on_timeout=m.log)
    os.kill(victim, signal.SIGKILL)
    wait_until(lambda: m.status()["standby"] is None, 10, "the master to see it die",
               on_timeout=m.log)
    assert "the standby (pid %d) killed by SIGKILL" % victim in m.log()
    assert body(m) == "version a\n"  # nobody else noticed
    releases.activate("b")
    assert m.reload()["ok"] is True
    assert body(m) == "version b\n"
    standby = wait_until(lambda: standby_pid(m), 20, "a new standby", on_timeout=m.log)
    zygote = generation(m, 2)["preload"]["zygote"]["pid"]
    m.signal(signal.SIGKILL)
    wait_until(lambda: not alive(standby) and not alive(zygote), 10,
               "the standby and the zygote to die with the master")


@pytest.mark.timeout(90)
def test_no_standby_is_forked_when_the_release_ships_a_module_the_shim_imports(molt, tmp_path):
    """A release that vendors uvicorn: the zygote imports the release's copy before the app,
    and a standby would carry it into the next release. So none is forked, every HUP starts
    a new interpreter, and the next release imports its own copy."""
    import shutil

    import uvicorn

    releases = Releases(tmp_path / "site")
    for version in ("a", "b"):
        target = releases.add(version, source=APPS, files={"REVISION": version + "\n"})
        shutil.copytree(Path(uvicorn.__file__).parent, target / "uvicorn",
                        ignore=shutil.ignore_patterns("__pycache__"))
        (target / "uvicorn" / "VENDORED").write_text(version)
    releases.activate("a")
    m = molt({"app": "lifespan_app:app", "interface": "asgi", "chdir": str(releases.current),
              "workers": 2, "preload": "auto", "version_file": "REVISION"})
    assert body(m) == "lifespan ran"
    wait_until(lambda: "no standby: modules imported before the app came from the release "
               "directory (uvicorn" in m.log(), 20, "the zygote to refuse a standby",
               on_timeout=m.log)
    assert m.status()["standby"] is None
    releases.activate("b")
    assert m.reload()["ok"] is True
    assert body(m) == "lifespan ran"
    assert generation(m, 2)["version"] == "b"
    assert m.status()["standby"] is None


@pytest.mark.timeout(90)
@pytest.mark.parametrize("turned_off", [{"preload_standby": False}, {"preload": "false"}],
                         ids=["preload_standby-false", "preload-false"])
def test_the_standby_is_in_the_metrics_and_goes_when_turned_off(molt, tmp_path, turned_off):
    log, releases = site(tmp_path, a=marked_flask_release("a"))
    metrics = free_port()
    m = molt(config_for(releases, log, metrics={"listen": f"tcp://127.0.0.1:{metrics}"}))
    standby = wait_until(lambda: standby_pid(m), 20, "a standby", on_timeout=m.log)
    text = http_get(metrics, "/metrics")[2].decode()
    assert f'molt_standby_proportional_memory_bytes{{pid="{standby}"}} ' in text, text
    m.config.update(turned_off)
    m.write_config()
    assert m.reload()["ok"] is True
    why = ("preload_standby is false" if "preload_standby" in turned_off
           else "preload is off: no zygote will need it")
    assert f"standby (pid {standby}) ended: {why}" in m.log()
    wait_until(lambda: not alive(standby), 10, "the standby to be gone", on_timeout=m.log)
    assert m.reload()["ok"] is True  # and no new one comes
    assert m.status()["standby"] is None
    assert "molt_standby_proportional_memory_bytes{" not in http_get(metrics, "/metrics")[2].decode()
    assert "becomes the zygote" not in m.log()
    assert body(m) == "version a\n"
