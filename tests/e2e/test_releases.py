"""Release management: change detection, history and rollback, version labels."""
from __future__ import annotations

import os
import time

import pytest

from molt_testlib import Releases, Wrk, flask_release, release_tree, wait_until


def layout(tmp_path, versions=("a", "b")) -> Releases:
    return release_tree(tmp_path / "site", flask_release, versions)


def config(releases: Releases, **extra) -> dict:
    c = {"app": "app:app", "chdir": str(releases.current), "workers": 1, "version_file": "REVISION",
         "health": {"path": "/healthz"}}
    c.update(extra)
    return c


def wait_generation(m, generation: int):
    wait_until(lambda: m.live_generation() == generation and not m.status()["rollover_in_progress"],
               30, f"generation {generation} to be live", on_timeout=m.log)


def live(m) -> dict:
    status = m.status()
    return next(g for g in status["generations"] if g["id"] == status["live_generation"])


def wait_settled(m, count: int):
    """The watcher has settled `count` bursts of events in all (changed or not)."""
    def settled():
        log = m.log()
        return (log.count("changed; starting a rollover") +
                log.count("content is unchanged; no rollover")) >= count
    wait_until(settled, 10, f"{count} settled watch events", on_timeout=m.log)


@pytest.mark.timeout(90)
def test_flipping_the_watched_symlink_gives_exactly_one_rollover(molt, tmp_path):
    releases = layout(tmp_path)
    m = molt(config(releases, watch=[str(releases.current)]))
    releases.activate("b")
    wait_generation(m, 2)
    assert m.get("/")[2] == b"version b\n"
    wait_settled(m, 1)
    assert m.log().count("changed; starting a rollover") == 1
    assert live(m)["trigger"] == "watch"


@pytest.mark.timeout(90)
def test_touching_the_watch_file_gives_exactly_one_rollover_per_touch(molt, tmp_path):
    releases = layout(tmp_path)
    touch = tmp_path / "site" / "restart.txt"
    touch.write_text("")
    m = molt(config(releases, watch=[str(touch)]))
    for expected in (2, 3):
        os.utime(touch, ns=(time.time_ns(), time.time_ns()))
        wait_generation(m, expected)
        wait_settled(m, expected - 1)
    assert m.log().count("changed; starting a rollover") == 2


@pytest.mark.timeout(90)
def test_a_source_tree_rolls_over_on_real_edits_only(molt, tmp_path):
    releases = layout(tmp_path, versions=("a",))
    source = releases.root / "releases" / "a"
    m = molt(config(releases, watch=[str(source)]))
    app = source / "app.py"

    # Rewriting a file with identical content (editors, git checkout) starts nothing.
    app.write_text(app.read_text())
    wait_settled(m, 1)
    assert "content is unchanged; no rollover" in m.log()
    assert m.live_generation() == 1

    # A burst of real edits (a deploy tool, a save-all) gives one rollover.
    text = app.read_text().replace("VERSION = 'a'", "VERSION = 'edited'")
    for _ in range(5):
        app.write_text(text)
    (source / "new_module.py").write_text("X = 1\n")
    wait_generation(m, 2)
    wait_settled(m, 2)
    assert m.get("/")[2] == b"version edited\n"
    assert m.log().count("changed; starting a rollover") == 1


@pytest.mark.timeout(90)
def test_dev_mode_keeps_the_last_good_generation_when_a_save_breaks_the_code(molt, tmp_path):
    releases = layout(tmp_path, versions=("a",))
    source = releases.root / "releases" / "a"
    m = molt(config(releases, chdir=str(source)), start=False)
    m.args = ["run", "-c", str(m.config_path), "--reload"]
    m.start()
    app = source / "app.py"
    good = app.read_text()
    app.write_text(good + "\ndef broken(:\n")
    wait_until(lambda: m.status()["rollovers"]["failed"] == 1, 30, "the broken save to fail",
               on_timeout=m.log)
    assert "SyntaxError" in m.status()["last_rollover"]["reason"]
    assert m.get("/")[2] == b"version a\n"
    app.write_text(good.replace("VERSION = 'a'", "VERSION = 'fixed'"))
    wait_generation(m, 3)
    assert m.get("/")[2] == b"version fixed\n"


@pytest.mark.timeout(120)
def test_rollback_after_a_bad_but_booting_release_under_load(molt, tmp_path):
    releases = layout(tmp_path, versions=("good",))
    # Boots and passes its health check, but answers every real request wrongly.
    releases.add("bad", files=dict(flask_release("bad"), **{"app.py": flask_release("bad")["app.py"]
                                                            .replace("return 'version ' + VERSION + '\\n'",
                                                                     "return 'oops', 500")}))
    m = molt(config(releases, workers=2))
    releases.activate("bad")
    assert m.reload()["ok"] is True
    assert m.get("/")[0] == 500

    history = m.ctl("history")
    assert "good" in history.stdout and "bad" in history.stdout
    load = Wrk(m.url("/"), duration=8, connections=16)
    try:
        rolled = m.ctl("rollback", "--wait")
    finally:
        result = load.stop()
    assert rolled.returncode == 0, rolled.stderr
    assert m.get("/")[2] == b"version good\n"
    assert live(m)["trigger"] == "rollback"
    assert live(m)["release_dir"].endswith("/releases/good")
    assert os.readlink(releases.current).endswith("bad")  # current still points elsewhere
    assert result["connect"] + result["read"] + result["write"] + result["timeout"] == 0, \
        result["output"]
    assert "rollback started" in m.log()


@pytest.mark.timeout(60)
def test_rolling_back_to_a_directory_that_is_gone_fails_cleanly(molt, tmp_path):
    releases = layout(tmp_path)
    m = molt(config(releases))
    releases.activate("b")
    assert m.reload()["ok"] is True
    import shutil
    shutil.rmtree(releases.root / "releases" / "a")
    rolled = m.ctl("rollback", "--wait")
    assert rolled.returncode == 1
    assert "rollback target" in rolled.stderr and "No such file or directory" in rolled.stderr
    assert m.get("/")[2] == b"version b\n"


@pytest.mark.timeout(60)
def test_the_version_label_comes_from_the_release(molt, tmp_path):
    releases = layout(tmp_path)
    m = molt(config(releases, http={"version_header": "X-Release"}))
    status, headers, _ = m.get("/")
    assert headers.get("x-release") == "a"
    assert live(m)["version"] == "a"
    releases.activate("b")
    m.reload()
    assert m.get("/")[1].get("x-release") == "b"
    assert "version=b" in m.log()


def build_pyz(tmp_path, name: str, files: dict) -> "Path":
    import zipapp
    from pathlib import Path

    source = tmp_path / f"src-{name}"
    source.mkdir()
    for rel, text in files.items():
        (source / rel).write_text(text)
    target = tmp_path / "site" / "releases" / f"{name}.pyz"
    target.parent.mkdir(parents=True, exist_ok=True)
    zipapp.create_archive(source, target)
    return target


def activate_file(root, target):
    link = root / "current"
    tmp = root / ".current.new"
    if tmp.is_symlink():
        tmp.unlink()
    tmp.symlink_to(target)
    os.replace(tmp, link)


@pytest.mark.timeout(120)
def test_rollover_between_two_pyz_releases_under_load_and_a_corrupt_one(molt, tmp_path):
    site = tmp_path / "site"
    entry = "# molt imports app:app; this only makes the archive a valid zipapp\n"
    a = build_pyz(tmp_path, "app-a", {"app.py": flask_release("a")["app.py"], "__main__.py": entry})
    b = build_pyz(tmp_path, "app-b", {"app.py": flask_release("b")["app.py"], "__main__.py": entry})
    corrupt = site / "releases" / "app-c.pyz"
    corrupt.write_bytes(a.read_bytes()[: len(a.read_bytes()) // 2])  # a truncated upload
    activate_file(site, a)
    m = molt({"app": "app:app", "chdir": str(site / "current"), "workers": 2,
              "health": {"path": "/healthz"}})
    assert m.get("/")[2] == b"version a\n"
    assert live(m)["version"] == "app-a.pyz"

    load = Wrk(m.url("/"), duration=10, connections=16)
    try:
        for target, expected in ((b, b"version b\n"), (a, b"version a\n"), (b, b"version b\n")):
            activate_file(site, target)
            assert m.reload()["ok"] is True
            assert m.get("/")[2] == expected
        activate_file(site, corrupt)
        answer = m.reload()
    finally:
        result = load.stop()
    assert answer["ok"] is False
    assert "exited with status 3" in answer["error"]
    assert m.get("/")[2] == b"version b\n"
    assert result["failed"] == 0, result["output"]


@pytest.mark.timeout(60)
def test_an_app_factory_is_called_once_per_worker(molt, tmp_path):
    app_dir = tmp_path / "factory"
    app_dir.mkdir()
    (app_dir / "site_app.py").write_text(
        "from flask import Flask\n"
        "def create_app():\n"
        "    app = Flask('made')\n"
        "    app.add_url_rule('/', 'i', lambda: 'made by a factory\\n')\n"
        "    return app\n")
    m = molt({"app": "site_app:create_app()", "chdir": str(app_dir), "workers": 1})
    assert m.get("/")[2] == b"made by a factory\n"
