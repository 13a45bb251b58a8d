"""The command line against the real binary: every gunicorn flag molt accepts has its effect
on the running master and its workers, every flag molt refuses exits 2 naming the molt
equivalent, every subcommand has --help, unknown flags and commands get a "did you mean",
and `molt check --offline` accepts every bundled example config."""
from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

import pytest

from molt_testlib import APPS, PYTHON, REPO, http_get, molt_bin, wait_until

ECHO = "cli_echo_app:application"


def run_molt(*args: str, timeout: float = 15) -> subprocess.CompletedProcess:
    return subprocess.run([molt_bin(), *args], capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL)


def echo(port: int = 0, unix: str | None = None) -> dict:
    status, _, body = http_get(port, "/", unix=unix)
    assert status == 200, body
    return json.loads(body)


# ----- gunicorn's flags, applied -------------------------------------------------------------

def test_gunicorn_flags_molt_has_are_applied_with_gunicorn_meaning(molt, tmp_path):
    control = tmp_path / "control.sock"
    web = tmp_path / "web.sock"
    log = tmp_path / "molt-error.log"
    pidfile = tmp_path / "molt.pid"
    args = ["run", ECHO, "--chdir", str(APPS), "--python", PYTHON, "--control", str(control),
            "--listen", f"unix:{web}", "-b", "127.0.0.1:0",
            "-w", "2", "--threads", "3", "-k", "gthread",
            "--timeout", "17", "--graceful-timeout", "9", "--keep-alive", "4",
            "--max-requests=1000", "--max-requests-jitter", "7",
            "--access-logfile=-", "--error-logfile", str(log), "--log-level", "debug",
            "--pid", str(pidfile), "--user", "nobody", "--group", "nogroup",
            "-e", "CLI_TEST_ONE=1", "--env", "CLI_TEST_TWO=a=b"]
    m = molt({"control": {"socket": str(control)}}, args=args, start=False)
    m.start(timeout=60)

    assert m.status()["master"]["target_workers"] == 2
    listen = m.status()["master"]["listen"]
    assert listen[0] == f"unix:{web}" and listen[1].startswith("tcp://127.0.0.1:"), listen
    answer = echo(m.port)
    assert echo(unix=str(web))["worker_config"]["app"] == ECHO
    config = answer["worker_config"]
    assert config["interface"] == "wsgi"
    assert config["threads"] == 3
    assert config["timeouts"]["heartbeat_ms"] == 17000
    assert config["timeouts"]["graceful_ms"] == 9000
    assert config["timeouts"]["keepalive_ms"] == 4000
    assert config["recycle"] == {"max_requests": 1000, "max_requests_jitter": 7}
    assert config["logging"]["level"] == "debug"
    assert config["logging"]["access_log"] is True
    assert answer["uid"] == 65534 and answer["gid"] == 65534  # nobody:nogroup
    assert answer["cwd"] == str(APPS)
    assert answer["env"] == {"CLI_TEST_ONE": "1", "CLI_TEST_TWO": "a=b"}
    assert int(pidfile.read_text().strip()) == m.pid
    # The master's log went to --error-logfile, access lines included.
    wait_until(lambda: '"GET / HTTP/1.1" 200' in log.read_text(), 10, "an access line in the log",
               on_timeout=lambda: log.read_text())
    assert m.stop() == 0


def test_uvicorn_worker_class_means_asgi(molt, tmp_path):
    control = tmp_path / "control.sock"
    args = ["run", "cli_echo_app:asgi", "--chdir", str(APPS), "--python", PYTHON,
            "--control", str(control), "--bind", "127.0.0.1:0",
            "-k", "uvicorn.workers.UvicornWorker", "--error-logfile", "-"]
    m = molt({"control": {"socket": str(control)}}, args=args, start=False)
    m.start(timeout=60)
    assert echo(m.port)["worker_config"]["interface"] == "asgi"
    assert m.stop() == 0


def test_flag_values_meet_the_config_validation():
    out = run_molt("run", ECHO, "--chdir", str(APPS), "-w", "0", "--timeout", "soon",
               "--log-level", "loud")
    assert out.returncode == 78, out
    assert "<command line>: workers: must be at least 1, got 0" in out.stderr
    assert "<command line>: timeouts.heartbeat: " in out.stderr
    assert "<command line>: logging.level: expected one of" in out.stderr


def test_each_flag_takes_one_value_and_the_app_may_come_last():
    out = run_molt("run", "--listen", "tcp://127.0.0.1:0", "--chdir", "/nonexistent", ECHO)
    assert out.returncode == 78, out
    assert out.stderr.startswith('<command line>: chdir: cannot use directory "/nonexistent"')


# ----- gunicorn's flags, refused -------------------------------------------------------------

REFUSED = [
    (["-k", "gevent"], "-k gthread --threads N"),
    (["--worker-class", "eventlet"], "uvicorn.workers.UvicornWorker"),
    (["-D"], "systemd"),
    (["--daemon"], "systemd"),
    (["--worker-connections", "1000"], "--threads N"),
    (["--access-logformat", "%(h)s"], "logging.access_log_format"),
    (["-e", "NO_EQUALS_SIGN"], "NAME=VALUE"),
    # A dot made the name a path into the config: a mapping error, or an internal error.
    (["-e", "A.B=1"], "a NAME with a `.` goes in the config file's `env:`"),
]


@pytest.mark.parametrize("flags,equivalent", REFUSED, ids=[" ".join(f) for f, _ in REFUSED])
def test_gunicorn_flags_molt_lacks_are_refused_with_the_equivalent(flags, equivalent):
    out = run_molt("run", ECHO, "--chdir", str(APPS), *flags)
    assert out.returncode == 2, out
    assert equivalent in out.stderr, out.stderr
    assert re.search(rf"^molt: (\S+/)?{re.escape(flags[0])}(/\S+)?: ", out.stderr, re.M), out.stderr


def test_preload_on_the_command_line_means_preload_true(molt, tmp_path):
    control = tmp_path / "control.sock"
    args = ["run", ECHO, "--chdir", str(APPS), "--python", PYTHON, "--control", str(control),
            "--bind", "127.0.0.1:0", "-w", "2", "--timeout", "30", "--preload",
            "--max-requests=1000", "--access-logfile=-"]
    m = molt({"control": {"socket": str(control)}}, args=args, start=False)
    m.start(timeout=60)
    assert echo(m.port)["worker_config"]["preload"] == "true"
    gen = m.status()["generations"][0]
    assert gen["preload"]["mode"] == "true" and gen["preload"]["preloaded"] is True, gen
    assert m.stop() == 0


def test_flags_that_set_keys_are_refused_beside_a_config_file(tmp_path):
    config = tmp_path / "molt.yaml"
    config.write_text(f"app: {ECHO}\nchdir: {APPS}\n")
    out = run_molt("run", "-c", str(config), "--workers", "4")
    assert out.returncode == 2, out
    assert f"set `workers` in {config}" in out.stderr
    gunicorn_config = tmp_path / "gunicorn.conf.py"
    gunicorn_config.write_text("workers = 4\n")
    out = run_molt("run", "-c", str(gunicorn_config))
    assert out.returncode == 2 and "not a gunicorn Python config" in out.stderr, out


# ----- help, unknown flags and commands ------------------------------------------------------

SUBCOMMANDS = [[], ["run"], ["check"], ["ctl"], ["ctl", "status"], ["ctl", "reload"],
               ["ctl", "rollback"], ["ctl", "history"], ["ctl", "scale"], ["ctl", "stop"],
               ["version"], ["config-reference"]]


@pytest.mark.parametrize("sub", SUBCOMMANDS, ids=[" ".join(s) or "molt" for s in SUBCOMMANDS])
def test_every_subcommand_has_help(sub):
    out = run_molt(*sub, "--help")
    assert out.returncode == 0, out
    assert "--help" in out.stdout
    assert out.stderr == ""


def test_the_top_level_help_lists_every_subcommand():
    out = run_molt("--help")
    for name in ("run", "check", "ctl", "version", "config-reference"):
        assert re.search(rf"^\s+{name}\s", out.stdout, re.M), out.stdout
    assert "upgrade-check" not in out.stdout  # hidden: only the master runs it
    assert run_molt("help").stdout == out.stdout
    ctl = run_molt("ctl", "--help").stdout
    for name in ("status", "reload", "rollback", "history", "scale", "stop"):
        assert re.search(rf"^\s+{name}\s", ctl, re.M), ctl


def test_run_help_lists_every_gunicorn_flag():
    text = run_molt("run", "--help").stdout
    for flag in ["-b", "--bind", "-w", "--workers", "--threads", "--timeout", "--graceful-timeout",
                 "--keep-alive", "--max-requests", "--max-requests-jitter", "--access-logfile",
                 "--error-logfile", "--log-level", "--chdir", "--pid", "--user", "--group",
                 "--preload", "-k", "-e", "--env"]:
        assert re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", text), flag


UNKNOWN = [
    (["run", ECHO, "--wrokers", "2"], "unknown flag for molt run: --wrokers; did you mean --workers?"),
    (["run", ECHO, "--max-request=10"],
     "unknown flag for molt run: --max-request; did you mean --max-requests?"),
    (["ctl", "--socket", "/nonexistent.sock", "status", "--jsno"],
     "unknown flag for molt ctl status: --jsno; did you mean --json?"),
    (["check", "--ofline", "x.yaml"], "unknown flag for molt check: --ofline; did you mean --offline?"),
    (["rnu", ECHO], "unknown command for molt: rnu; did you mean run?"),
    (["ctl", "--socket", "/nonexistent.sock", "statsu"],
     "unknown command for molt ctl: statsu; did you mean status?"),
]


@pytest.mark.parametrize("args,message", UNKNOWN, ids=[" ".join(a) for a, _ in UNKNOWN])
def test_unknown_flags_and_commands_exit_2_with_did_you_mean(args, message):
    out = run_molt(*args)
    assert out.returncode == 2, out
    assert message in out.stderr, out.stderr
    assert "--help" in out.stderr


def test_usage_errors_of_the_parser_exit_2():
    assert run_molt("ctl", "--socket", "/nonexistent.sock", "scale", "many").returncode == 2
    assert run_molt("run", ECHO, "--workers").returncode == 2  # a flag without its value
    assert run_molt("run").returncode == 2
    assert run_molt("ctl", "--socket", "/nonexistent.sock").returncode == 2
    assert run_molt("ctl", "--socket", "/nonexistent.sock", "status").returncode == 69


def test_ctl_options_may_follow_the_command(tmp_path):
    out = run_molt("ctl", "status", "--socket", str(tmp_path / "none.sock"))
    assert out.returncode == 69, out


# ----- molt check --offline ------------------------------------------------------------------

def bundled_configs(tmp_path: Path) -> list[Path]:
    configs = sorted((REPO / "config" / "examples").glob("*.yaml"))
    for template in sorted((REPO / "examples").glob("*/molt.yaml.in")):
        # As examples/run fills it in, for a root that does not exist on this host.
        text = (template.read_text().replace("@ROOT@", "/srv/molt-example")
                .replace("@PORT@", "8000").replace("@METRICS_PORT@", "9191"))
        path = tmp_path / f"{template.parent.name}.yaml"
        path.write_text(text)
        configs.append(path)
    assert len(configs) >= 4, configs
    return configs


def test_check_offline_accepts_every_bundled_example_config(tmp_path):
    for path in bundled_configs(tmp_path):
        out = run_molt("check", "--offline", "-c", str(path))
        assert out.returncode == 0, f"{path}\n{out.stderr}"
        assert f"{path}: ok: " in out.stdout and "(offline:" in out.stdout, out.stdout


def test_check_without_offline_looks_at_the_host(tmp_path):
    full = REPO / "config" / "examples" / "full.yaml"
    out = run_molt("check", "-c", str(full))
    assert out.returncode == 78, out
    assert re.search(r"full\.yaml:\d+:\d+: chdir: cannot use directory", out.stderr), out.stderr
    config = tmp_path / "molt.yaml"
    config.write_text(f"app: {ECHO}\nchdir: {APPS}\nuser: no-such-molt-user\n")
    out = run_molt("check", str(config))
    assert out.returncode == 78, out
    assert 'user: no user named "no-such-molt-user" on this host' in out.stderr
    assert run_molt("check", "--offline", str(config)).returncode == 0


def test_ctl_commands_reach_a_running_master(molt):
    m = molt({"app": "hello_app:application", "chdir": str(APPS)})
    socket_path = m.config["control"]["socket"]
    # The socket may follow the command; the count is the master's to judge (exit 1).
    assert run_molt("ctl", "status", "--json", "--socket", socket_path).returncode == 0
    zero = m.ctl("scale", "0")
    assert zero.returncode == 1 and "scale failed" in zero.stderr, zero
    assert m.ctl("scale", "2").returncode == 0
    wait_until(lambda: m.status()["master"]["target_workers"] == 2, 10, "target 2")


@pytest.mark.parametrize("flag,preload", [("--preload", "true"), ("--preload=false", "false"),
                                          ("--preload=no", "false"), ("--preload=yes", "true")])
def test_a_boolean_flag_takes_a_value_and_never_drops_it(molt, tmp_path, flag, preload):
    # `--preload=false` was read as `--preload` is not given: silently ignored.
    control = tmp_path / "control.sock"
    args = ["run", ECHO, "--chdir", str(APPS), "--python", PYTHON, "--control", str(control),
            "--bind", "127.0.0.1:0", flag, "--error-logfile", "-"]
    m = molt({"control": {"socket": str(control)}}, args=args, start=False)
    m.start(timeout=60)
    assert m.status()["generations"][0]["preload"]["mode"] == preload, m.status()
    assert m.stop() == 0


def test_a_boolean_flag_with_another_value_is_refused():
    out = run_molt("run", ECHO, "--chdir", str(APPS), "--preload=maybe")
    assert out.returncode == 2, out
    assert '--preload: expected true or false (yes/no, on/off, 1/0), got "maybe"' in out.stderr
