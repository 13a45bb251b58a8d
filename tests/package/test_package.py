"""The Debian package, built by the project's own build and installed into the real / (CI
runs as root on a throwaway machine): lintian finds no error, the installed units verify and
say /usr/bin/molt, the installed molt runs the bundled example through the unit's own
ExecStart= and ExecReload= lines, the man pages render, completion completes, and
`dpkg --purge` leaves no file of the package behind (also when a test failed).

Run: /usr/bin/python3 -m pytest -q tests/package   (MOLT_BUILD_DIR overrides build/)"""
from __future__ import annotations

import contextlib
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from molt_testlib import REPO, http_get, uid_of, wait_until

BUILD = Path(os.environ.get("MOLT_BUILD_DIR", REPO / "build"))
UNIT_DIR = Path("/lib/systemd/system")
CONFIG = Path("/etc/molt/molt.yaml")
ANALYZE = shutil.which("systemd-analyze") or "/usr/bin/systemd-analyze"

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="installs into / with dpkg (root)")


def run(*args: str, timeout: float = 120, check: bool = True, **kwargs) -> subprocess.CompletedProcess:
    result = subprocess.run(list(args), capture_output=True, text=True, timeout=timeout, **kwargs)
    if check:
        assert result.returncode == 0, f"{shlex.join(args)}: {result.stdout}{result.stderr}"
    return result


def dpkg(*args: str) -> subprocess.CompletedProcess:
    """dpkg, retried while another install on the machine holds the dpkg lock."""
    deadline = time.monotonic() + 120
    while True:
        result = run("dpkg", *args, check=False)
        if "lock" not in result.stderr or time.monotonic() > deadline:
            return result
        time.sleep(1)


def project_version() -> str:
    cache = (BUILD / "CMakeCache.txt").read_text()
    return next(line.split("=", 1)[1] for line in cache.splitlines()
                if line.startswith("CMAKE_PROJECT_VERSION:"))


def service(unit: Path) -> dict[str, str]:
    """The [Service] section of a unit, last value of each key."""
    values: dict[str, str] = {}
    section = ""
    for raw in unit.read_text().splitlines():
        line = raw.strip()
        if line.startswith("["):
            section = line
        elif section == "[Service]" and line and line[0] not in "#;":
            key, _, value = line.partition("=")
            values[key.strip()] = value.strip()
    return values


@contextlib.contextmanager
def started(command: list[str], log_path: Path):
    """A process with its output in log_path; killed (by pid) if still running at the end."""
    with open(log_path, "w") as log:
        proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd="/")
        try:
            yield proc
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=10)


def stop_with_sigterm(proc: subprocess.Popen, log_path: Path):
    """molt's graceful stop: every worker drains, then the master exits 0."""
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 0, log_path.read_text()


@pytest.fixture(scope="module")
def deb() -> Path:
    """Built as `bash scripts/dev package` builds it: CPack's DEB generator in the build tree."""
    run("cmake", "--build", str(BUILD), "-j2", timeout=900)
    arch = run("dpkg", "--print-architecture").stdout.strip()
    path = BUILD / f"molt_{project_version()}_{arch}.deb"
    path.unlink(missing_ok=True)
    run("cpack", "-G", "DEB", cwd=BUILD, timeout=300)
    assert path.is_file(), sorted(p.name for p in BUILD.glob("*.deb"))
    return path


@pytest.fixture(scope="module")
def package_files(deb) -> list[Path]:
    """Every regular file and symlink the package ships, as installed paths."""
    names = run("dpkg-deb", "-c", str(deb)).stdout.splitlines()
    return [Path(line.split(maxsplit=5)[5].split(" -> ")[0].lstrip("."))
            for line in names if line[0] in "-l"]


@pytest.fixture(scope="module")
def installed(deb, package_files):
    dpkg("--purge", "molt")
    result = dpkg("-i", str(deb))
    try:
        assert result.returncode == 0, result.stdout + result.stderr
        yield deb
    finally:
        dpkg("--purge", "molt")


def test_the_package_has_the_debian_layout(deb, package_files):
    names = {str(p) for p in package_files}
    for expected in ["/usr/bin/molt", "/usr/lib/molt/molt_shim/__main__.py",
                     "/lib/systemd/system/molt.service", "/lib/systemd/system/molt@.service",
                     "/lib/systemd/system/molt.socket", "/lib/systemd/system/molt@.socket",
                     "/etc/molt/molt.yaml", "/usr/share/man/man5/molt.yaml.5.gz",
                     "/usr/share/doc/molt/copyright", "/usr/share/molt/fleet/rollout.yml"]:
        assert expected in names, sorted(names)
    if (REPO / "docs/man/molt.1").exists():
        assert "/usr/share/man/man1/molt.1.gz" in names
    if (REPO / "completion/molt.bash").exists():
        assert "/usr/share/bash-completion/completions/molt" in names
    control = run("dpkg-deb", "-f", str(deb), "Depends").stdout
    assert "python3 (>= 3.8)" in control
    # From dpkg-shlibdeps on the binary, not written by hand.
    for library in ("libuv1", "libyaml-cpp", "libsystemd0", "libstdc++6", "liburing2"):
        assert library in control, control
    assert run("dpkg-deb", "-I", str(deb), "conffiles").stdout.split() == ["/etc/molt/molt.yaml"]
    assert not any("__pycache__" in str(p) for p in package_files)  # compiled at install


def test_the_shim_is_byte_compiled_at_install_and_cleaned_at_removal(deb):
    shim = Path("/usr/lib/molt/molt_shim")
    dpkg("--purge", "molt")
    try:
        result = dpkg("-i", str(deb))
        assert result.returncode == 0, result.stdout + result.stderr
        # With the interpreter the workers run (python: /usr/bin/python3).
        tag = run("/usr/bin/python3", "-c", "import sys; print(sys.implementation.cache_tag)"
                  ).stdout.strip()
        assert (shim / "__pycache__" / f"__main__.{tag}.pyc").is_file()
        assert (shim / "__pycache__" / f"zygote.{tag}.pyc").is_file()
    finally:
        assert dpkg("--purge", "molt").returncode == 0
    assert not shim.exists()


@pytest.mark.timeout(300)
@pytest.mark.parametrize("prefix", ["opt/molt", "usr/local"])
def test_cmake_install_generates_the_units_for_the_prefix_it_installs_to(tmp_path, prefix):
    """The same install rules without the package: any prefix, chosen at install time."""
    root = tmp_path / prefix
    run("cmake", "--install", str(BUILD), "--prefix", str(root), timeout=120)
    for name, config in [("molt.service", "/etc/molt/molt.yaml"),
                         ("molt@.service", "/etc/molt/%i.yaml")]:
        lines = service(root / "lib/systemd/system" / name)
        assert shlex.split(lines["ExecStart"]) == [f"{root}/bin/molt", "run", "-c", config]
        assert shlex.split(lines["ExecReload"])[0] == f"{root}/bin/molt"
    result = run(ANALYZE, "verify", "--man=no", str(root / "lib/systemd/system/molt.service"),
                 check=False, timeout=60)
    assert result.returncode == 0 and result.stdout + result.stderr == "", result.stdout + result.stderr
    example = (root / "etc/molt/molt.yaml").read_text()
    assert f"chdir: {root}/share/molt/example" in example
    check = run(str(root / "bin/molt"), "check", "-c", str(root / "etc/molt/molt.yaml"),
                check=False)
    assert check.returncode == 0, check.stdout + check.stderr


def test_lintian_reports_no_error(deb):
    result = run("lintian", "--fail-on", "error", "--display-level", ">=warning", str(deb),
                 check=False, timeout=280)
    errors = [line for line in result.stdout.splitlines() if line.startswith("E:")]
    assert result.returncode == 0 and not errors, result.stdout + result.stderr


def test_installed_units_verify_and_run_the_installed_binary(installed, tmp_path):
    for name in ["molt.service", "molt.socket", "molt@.service", "molt@.socket"]:
        assert (UNIT_DIR / name).is_file(), name
    # An instance of each template, as `systemctl enable molt@shop` loads it.
    (tmp_path / "molt@shop.service").symlink_to(UNIT_DIR / "molt@.service")
    (tmp_path / "molt@shop.socket").symlink_to(UNIT_DIR / "molt@.socket")
    for unit in [UNIT_DIR / "molt.service", UNIT_DIR / "molt.socket",
                 tmp_path / "molt@shop.service", tmp_path / "molt@shop.socket"]:
        result = run(ANALYZE, "verify", "--man=no", str(unit), check=False, timeout=60)
        assert result.returncode == 0 and result.stdout + result.stderr == "", (
            f"{unit}: {result.stdout}{result.stderr}")
    for name, config in [("molt.service", CONFIG), ("molt@.service", "/etc/molt/%i.yaml")]:
        lines = service(UNIT_DIR / name)
        assert shlex.split(lines["ExecStart"]) == ["/usr/bin/molt", "run", "-c", str(config)]
        assert shlex.split(lines["ExecReload"])[:4] == ["/usr/bin/molt", "ctl", "-c", str(config)]


@pytest.mark.timeout(120)
def test_installed_molt_runs_the_example_through_the_units_command_lines(installed, tmp_path):
    lines = service(UNIT_DIR / "molt.service")
    start, reload = shlex.split(lines["ExecStart"]), shlex.split(lines["ExecReload"])
    # What systemd would provide: RuntimeDirectory=molt.
    runtime = Path("/run") / lines["RuntimeDirectory"]
    runtime.mkdir(exist_ok=True)
    status = [*start[:1], "ctl", "-c", str(CONFIG), "status", "--json"]

    def live_generation():
        result = run(*status, check=False, timeout=10)
        return result.returncode == 0 and json.loads(result.stdout).get("live_generation")

    try:
        with started(start, tmp_path / "molt.log") as master:
            wait_until(live_generation, 30, "the example's first generation to go live")
            code, headers, body = http_get(0, "/", unix="/run/molt.sock")
            assert code == 200 and body.startswith(b"hello from molt"), body
            assert headers.get("x-release") == "demo-1", headers

            rolled = run(*reload, timeout=130)
            assert "generation 2 is live" in rolled.stdout, rolled.stdout
            assert live_generation() == 2
            assert http_get(0, "/healthz", unix="/run/molt.sock")[0] == 200
            # What `systemctl stop` sends to the master (KillMode=mixed).
            stop_with_sigterm(master, tmp_path / "molt.log")
    finally:
        shutil.rmtree(runtime, ignore_errors=True)


def test_man_pages_render(installed):
    page = run("man", "-l", "/usr/share/man/man5/molt.yaml.5.gz",
               env={**os.environ, "MANWIDTH": "80", "MAN_KEEP_FORMATTING": ""}).stdout
    assert "MOLT.YAML(5)" in page and "timeouts.boot" in page and "version_file" in page
    if not (REPO / "docs/man/molt.1").exists():
        pytest.skip("docs/man/molt.1 (written by the CLI slice) is not in this tree yet")
    page = run("man", "-l", "/usr/share/man/man1/molt.1.gz").stdout
    assert "MOLT(1)" in page.upper() and "reload" in page


def test_bash_completion_lists_the_subcommands(installed):
    completion = Path("/usr/share/bash-completion/completions/molt")
    if not (REPO / "completion/molt.bash").exists():
        pytest.skip("completion/molt.bash (written by the CLI slice) is not in this tree yet")
    script = f"""
        source /usr/share/bash-completion/bash_completion
        source {shlex.quote(str(completion))}
        function=$(complete -p molt | sed -E 's/.*-F ([^ ]+).*/\\1/')
        COMP_WORDS=(molt ""); COMP_CWORD=1; COMP_LINE="molt "; COMP_POINT=5
        "$function" molt "" molt
        printf '%s\\n' "${{COMPREPLY[@]}}"
    """
    words = run("bash", "-c", script).stdout.split()
    for subcommand in ("run", "check", "ctl", "version"):
        assert subcommand in words, words


# ----- the container image: no docker engine here, so its commands run on the host ---------

DOCKERFILE = REPO / "packaging" / "Dockerfile"
IMAGE_UID = 10001


def dockerfile() -> dict[str, list[str]]:
    """Instruction -> its arguments (backslash continuations joined), in file order."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    out: dict[str, list[str]] = {}
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            instruction, _, rest = line.partition(" ")
            out.setdefault(instruction.upper(), []).append(rest.strip())
    return out


def test_the_dockerfile_installs_this_package_as_built(deb, package_files):
    image = dockerfile()
    assert image["FROM"] == ["debian:12-slim"]
    assert image["ARG"] == [f"MOLT_DEB={deb.name}"]  # the file `scripts/dev package` makes
    assert image["STOPSIGNAL"] == ["SIGTERM"]
    assert image["USER"] not in (["root"], ["0"])
    run_lines = " ".join(image["RUN"])
    assert "apt-get install -y --no-install-recommends /tmp/molt.deb" in run_lines
    assert f"--uid {IMAGE_UID}" in run_lines
    shipped = {str(p) for p in package_files}
    # Every path of molt's that the RUN lines name is one the package ships.
    for path in re.findall(r"(?<![\w.])(/(?:usr|etc|lib)/[\w./-]*molt[\w./-]*)", run_lines):
        assert path in shipped, path
    for command in (health_command(image), json.loads(image["CMD"][0])):
        assert command[0] in shipped and command[command.index("-c") + 1] in shipped, command


def health_command(image: dict[str, list[str]]) -> list[str]:
    line = image["HEALTHCHECK"][0]
    return json.loads(line[line.index("CMD") + 3:])


@pytest.mark.timeout(120)
def test_the_images_cmd_and_healthcheck_serve_as_the_non_root_user(installed):
    """The image's CMD and HEALTHCHECK, run as its user, on its config (ports and the
    control socket moved so that nothing on this machine can collide)."""
    image = dockerfile()
    workdir = Path(tempfile.mkdtemp(prefix="molt-image-"))
    try:
        os.chown(workdir, IMAGE_UID, IMAGE_UID)
        config = workdir / "molt.yaml"
        port, metrics = free_port(), free_port()
        text = Path("/usr/share/molt/example/container.yaml").read_text()
        text = (text.replace("0.0.0.0:8000", f"127.0.0.1:{port}")
                .replace("0.0.0.0:9191", f"127.0.0.1:{metrics}")
                .replace("/tmp/molt.sock", str(workdir / "control.sock")))
        config.write_text(text)
        as_user = ["setpriv", f"--reuid={IMAGE_UID}", f"--regid={IMAGE_UID}", "--clear-groups"]

        def image_command(command: list[str]) -> list[str]:
            return [*as_user, *[str(config) if a == "/etc/molt/molt.yaml" else a for a in command]]

        with started(image_command(json.loads(image["CMD"][0])), workdir / "molt.log") as master:
            wait_until(lambda: run(*image_command(health_command(image)), check=False,
                                   timeout=10).returncode == 0, 30, "the HEALTHCHECK to pass")
            wait_until(lambda: answers(port), 30, "the demo app to answer")
            assert uid_of(master.pid) == IMAGE_UID
            stop_with_sigterm(master, workdir / "molt.log")  # the image's STOPSIGNAL
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def answers(port: int) -> bool:
    try:
        return http_get(port, "/")[0] == 200
    except OSError:
        return False


def test_purge_leaves_no_file_of_the_package_behind(installed, package_files):
    result = dpkg("--purge", "molt")
    assert result.returncode == 0, result.stdout + result.stderr
    left = [str(p) for p in package_files if p.exists() or p.is_symlink()]
    assert left == []
    assert not Path("/etc/molt").exists()
    assert run("dpkg-query", "-W", "molt", check=False).returncode != 0
