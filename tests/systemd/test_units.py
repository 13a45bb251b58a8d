"""The unit files in systemd/: they pass `systemd-analyze verify`, they say what
docs/systemd.md says they say, and their ExecReload= command reports the rollover's result.

The files in systemd/ are templates: the install (any prefix, and the Debian package) fills in
@MOLT_BINARY@ with the installed binary's path. systemd is not PID 1 here, and verify insists
that ExecStart='s binary exists: the units are rendered into a temporary directory with the
built binary instead. tests/package/ verifies the units the package installs."""
from __future__ import annotations

import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

from molt_testlib import REPO, molt_bin, release_tree, wait_until
from sdtestlib import env_release

UNITS_DIR = REPO / "systemd"
UNITS = ["molt.service", "molt.socket", "molt@.service", "molt@.socket"]
BINARY_PLACEHOLDER = "@MOLT_BINARY@"  # filled in by packaging/install_layout.cmake
ANALYZE = shutil.which("systemd-analyze") or "/usr/bin/systemd-analyze"


def template(name: str) -> Path:
    return UNITS_DIR / f"{name}.in"


def parse_unit(path: Path) -> dict[str, dict[str, list[str]]]:
    """[Section] -> key -> every value (systemd allows a key more than once)."""
    sections: dict[str, dict[str, list[str]]] = {}
    current = None
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line[0] in "#;":
            continue
        if line.startswith("["):
            current = sections.setdefault(line.strip("[]"), {})
            continue
        key, _, value = line.partition("=")
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


def seconds(value: str) -> float:
    m = re.fullmatch(r"(\d+)(ms|s|min)?", value)
    assert m, value
    factor = {"ms": 0.001, "s": 1, None: 1, "min": 60}[m.group(2)]
    return int(m.group(1)) * factor


@pytest.fixture
def unit_copies(tmp_path) -> Path:
    out = tmp_path / "units"
    out.mkdir()
    for name in UNITS:
        text = template(name).read_text()
        (out / name).write_text(text.replace(BINARY_PLACEHOLDER, str(Path(molt_bin()).resolve())))
    # An instance of each template, as `systemctl enable molt@shop` would load it.
    (out / "molt@shop.service").symlink_to("molt@.service")
    (out / "molt@shop.socket").symlink_to("molt@.socket")
    return out


def test_every_unit_file_exists():
    assert sorted(p.name for p in UNITS_DIR.iterdir()) == sorted(f"{u}.in" for u in UNITS)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("name", UNITS + ["molt@shop.service", "molt@shop.socket"])
def test_unit_passes_systemd_analyze_verify(unit_copies, name):
    result = subprocess.run([ANALYZE, "verify", "--man=no", str(unit_copies / name)],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout + result.stderr == "", result.stdout + result.stderr


@pytest.mark.parametrize("name,config", [("molt.service", "/etc/molt/molt.yaml"),
                                         ("molt@.service", "/etc/molt/%i.yaml")])
def test_service_units_say_what_the_docs_say(name, config):
    service = parse_unit(template(name))["Service"]
    one = {key: values[-1] for key, values in service.items()}
    assert one["Type"] == "notify"
    assert one["NotifyAccess"] == "main"
    assert one["ExecStart"] == f"{BINARY_PLACEHOLDER} run -c {config}"
    reload = shlex.split(one["ExecReload"])
    assert reload[:4] == [BINARY_PLACEHOLDER, "ctl", "-c", config]
    assert reload[4:6] == ["reload", "--wait"]
    # ctl gives up before systemd kills it, and both outlast timeouts.boot (60s by default).
    ctl_timeout = seconds(reload[reload.index("--timeout") + 1])
    assert 60 < ctl_timeout < seconds(one["TimeoutStartSec"])
    assert one["KillMode"] == "mixed"
    assert seconds(one["TimeoutStopSec"]) > 30  # timeouts.graceful defaults to 30s
    assert one["OOMPolicy"] == "continue"
    assert one["RestartPreventExitStatus"] == "78"
    assert "WatchdogSec" in one
    assert one["RuntimeDirectory"] in ("molt", "molt/%i")
    for hardening in ("NoNewPrivileges", "PrivateTmp"):
        assert one[hardening] == "yes"
    assert one["ProtectSystem"] in ("full", "strict")
    assert "MemoryDenyWriteExecute" not in one  # breaks ctypes/cffi callbacks and JITs


@pytest.mark.parametrize("name,service", [("molt.socket", "molt.service"),
                                          ("molt@.socket", "molt@%i.service")])
def test_socket_units_pass_one_named_listener(name, service):
    socket = {k: v[-1] for k, v in parse_unit(template(name))["Socket"].items()}
    assert socket["FileDescriptorName"] == "web"
    assert socket["Accept"] == "no"
    assert socket["Service"] == service
    # Not under the service's RuntimeDirectory, which systemd deletes when the service stops.
    assert not socket["ListenStream"].startswith("/run/molt/")


@pytest.mark.timeout(120)
def test_exec_reload_waits_for_the_rollover_and_fails_with_the_reason(molt, tmp_path):
    """Runs the unit's own ExecReload= line (paths swapped for the test's) against a master:
    exit 0 when the new generation is live, non-zero with the reason when it failed."""
    releases = release_tree(tmp_path / "site", env_release)
    releases.add("broken", files={"app.py": "raise ImportError('no module named settings')\n"})
    m = molt({"app": "app:application", "chdir": str(releases.current), "workers": 2,
              "version_file": "REVISION", "timeouts": {"boot": "20s"}})
    line = {k: v[-1] for k, v in parse_unit(template("molt.service"))["Service"].items()}
    command = [molt_bin() if arg == BINARY_PLACEHOLDER else
               str(m.config_path) if arg == "/etc/molt/molt.yaml" else arg
               for arg in shlex.split(line["ExecReload"])]

    releases.activate("b")
    ok = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0, ok.stderr
    assert re.fullmatch(r"generation 2 is live \(\d+ms\)\n", ok.stdout), ok.stdout
    wait_until(lambda: m.get("/")[2] == b"version b\n", 5, "release b to answer")

    releases.activate("broken")
    failed = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert failed.returncode == 1, failed
    assert failed.stderr.startswith("molt: reload failed: "), failed.stderr
    assert "ImportError: no module named settings" in failed.stderr
    assert m.get("/")[2] == b"version b\n"
    assert m.stop() == 0
