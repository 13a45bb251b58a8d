"""The fleet rollout that ships with molt (fleet/rollout.yml, Debian's ansible) against three
real molt instances on 127.0.0.2, .3 and .4, behind a real nginx that the test configures and
starts, with wrk through nginx on keep-alive connections for the whole of each rollout.

nginx keeps idle keep-alive connections to every instance and never retries a failed request
on another one (`proxy_next_upstream off`), so every error of an instance reaches wrk.

Run: /usr/bin/python3 -m pytest -q tests/fleet   (MOLT_BIN overrides build/bin/molt)"""
from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

from molt_testlib import PYTHON, REPO, Molt, Releases, Wrk, http_get, molt_bin, wait_until

PLAYBOOK = REPO / "fleet" / "rollout.yml"
NGINX = shutil.which("nginx") or "/usr/sbin/nginx"
ANSIBLE = shutil.which("ansible-playbook") or "/usr/bin/ansible-playbook"
HOSTS = {"web1": "127.0.0.2", "web2": "127.0.0.3", "web3": "127.0.0.4"}


def release_files(version: str, broken: bool = False) -> dict[str, str]:
    if broken:
        # Boots far enough to fail the way a bad deploy does: the import raises.
        return {"app.py": "raise ImportError('No module named settings_production')\n",
                "REVISION": version + "\n"}
    return {
        "app.py": (
            "def application(environ, start_response):\n"
            f"    body = b'version {version}\\n'\n"
            "    start_response('200 OK', [('Content-Type', 'text/plain'),\n"
            "                              ('Content-Length', str(len(body)))])\n"
            "    return [body]\n"),
        "REVISION": version + "\n",
    }


def free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


@dataclass
class Host:
    name: str
    address: str
    port: int
    root: Path
    molt: Molt

    def version(self) -> str:
        status, headers, body = http_get(self.port, "/", host=self.address)
        assert status == 200, (status, body)
        return headers.get("x-release", "")

    def current(self) -> str:
        return os.path.basename(os.path.realpath(self.root / "current"))


@pytest.fixture
def fleet(molt, tmp_path) -> dict[str, Host]:
    hosts = {}
    for name, address in HOSTS.items():
        root = tmp_path / name
        Releases(root).add("v1", files=release_files("v1"))
        Releases(root).activate("v1")
        port = free_port(address)
        m = molt({"app": "app:application", "chdir": str(root / "current"), "workers": 2,
                  "threads": 4, "listen": [f"tcp://{address}:{port}"],
                  "version_file": "REVISION", "http": {"version_header": "X-Release"},
                  "health": {"path": "/"}, "timeouts": {"boot": "20s", "graceful": "10s"}},
                 subdir=name)
        hosts[name] = Host(name, address, port, root, m)
    for host in hosts.values():
        assert host.version() == "v1"
    return hosts


def answers(port: int) -> bool:
    try:
        return http_get(port, "/")[0] == 200
    except OSError:
        return False


@pytest.fixture
def nginx(fleet, tmp_path):
    """nginx in front of the fleet, with its own prefix, pid and logs; stopped by pid."""
    prefix = tmp_path / "nginx"
    prefix.mkdir()
    port = free_port("127.0.0.1")
    servers = "".join(f"        server {h.address}:{h.port} max_fails=0;\n" for h in fleet.values())
    temp_paths = "".join(f"    {kind}_temp_path {prefix}/{kind};\n"
                         for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
    (prefix / "nginx.conf").write_text(f"""
daemon off;
worker_processes 1;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log warn;
events {{ worker_connections 1024; }}
http {{
    access_log off;
{temp_paths}
    upstream fleet {{
{servers}        keepalive 32;
    }}
    server {{
        listen 127.0.0.1:{port};
        location / {{
            proxy_pass http://fleet;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_next_upstream off;
        }}
    }}
}}
""")
    log = open(prefix / "stderr.log", "w")
    proc = subprocess.Popen([NGINX, "-p", str(prefix), "-c", str(prefix / "nginx.conf"),
                             "-e", str(prefix / "error.log")], stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_until(lambda: proc.poll() is not None or answers(port), 20, "nginx to answer")
        assert proc.poll() is None, (prefix / "error.log").read_text()
        yield port, prefix / "error.log"
    finally:
        proc.send_signal(signal.SIGQUIT)  # nginx's graceful shutdown
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
        log.close()


def write_inventory(tmp_path: Path, fleet: dict[str, Host]) -> Path:
    lines = ["[molt]"]
    for h in fleet.values():
        lines.append(f"{h.name} molt_root={h.root} molt_config={h.molt.config_path} "
                     f"molt_check_url=http://{h.address}:{h.port}/")
    lines += ["", "[molt:vars]", "ansible_connection=local",
              f"ansible_python_interpreter={PYTHON}", f"molt_bin={Path(molt_bin()).resolve()}",
              "molt_reload_timeout=60s"]
    path = tmp_path / "inventory.ini"
    path.write_text("\n".join(lines) + "\n")
    return path


def rollout(tmp_path: Path, inventory: Path, release: str, source: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, ANSIBLE_NOCOLOR="1", ANSIBLE_RETRY_FILES_ENABLED="0",
               ANSIBLE_HOME=str(tmp_path / "ansible"),
               ANSIBLE_LOCAL_TEMP=str(tmp_path / "ansible" / "tmp"),
               ANSIBLE_REMOTE_TEMP=str(tmp_path / "ansible" / "remote"),
               ANSIBLE_HOST_KEY_CHECKING="0", ANSIBLE_DEPRECATION_WARNINGS="0")
    return subprocess.run([ANSIBLE, "-i", str(inventory), str(PLAYBOOK),
                           "-e", f"molt_release={release}", "-e", f"molt_release_src={source}"],
                          capture_output=True, text=True, timeout=240, env=env)


def under_load(port: int, action):
    """Runs action() while wrk keeps 8 keep-alive connections busy through nginx; stops wrk
    (SIGINT: it prints its totals) once the action is done."""
    load = Wrk(f"http://127.0.0.1:{port}/", duration=200, connections=8, threads=2)
    try:
        result = action()
        assert load.proc.poll() is None, "wrk ended before the rollout did"
        load.proc.send_signal(signal.SIGINT)
        return result, load.result()
    finally:
        if load.proc.poll() is None:
            load.proc.kill()
            load.proc.wait(timeout=10)


def upstream_errors(error_log: Path) -> list[str]:
    return [line for line in error_log.read_text().splitlines() if "upstream" in line]


def reload_order(output: str) -> list[str]:
    """The hosts of each `Reload molt` task, in the order ansible ran them."""
    blocks = re.findall(r"TASK \[Reload molt[^\]]*\][^\n]*\n(.*?)(?=\nTASK |\nPLAY )", output, re.S)
    return [" ".join(re.findall(r"^(?:ok|changed|failed|fatal): \[(\w+)\]", b, re.M))
            for b in blocks]


@pytest.mark.timeout(180)
def test_a_release_rolls_across_the_fleet_and_a_broken_one_stops_at_the_first_host(
        fleet, nginx, tmp_path):
    port, error_log = nginx
    inventory = write_inventory(tmp_path, fleet)
    good, broken = tmp_path / "out" / "v2", tmp_path / "out" / "v3"
    for directory, files in [(good, release_files("v2")), (broken, release_files("v3", True))]:
        directory.mkdir(parents=True)
        for name, text in files.items():
            (directory / name).write_text(text)

    # A good release: every host, one at a time, zero failed requests.
    done, load = under_load(port, lambda: rollout(tmp_path, inventory, "v2", good))
    assert done.returncode == 0, done.stdout + done.stderr
    assert reload_order(done.stdout) == ["web1", "web2", "web3"], done.stdout
    assert load["requests"] > 100, load["output"]
    assert load["failed"] == 0, load["output"]
    assert upstream_errors(error_log) == []
    for host in fleet.values():
        assert host.version() == "v2", host.name
        assert host.current() == "v2"
        assert host.molt.live_generation() == 2

    # A broken release: the rollout stops at web1 with molt's reason; nobody stops serving.
    stopped, load = under_load(port, lambda: rollout(tmp_path, inventory, "v3", broken))
    assert stopped.returncode != 0
    output = stopped.stdout + stopped.stderr
    assert "rollout stopped at web1: release v3 failed" in output, output
    assert "settings_production" in output, output  # the worker's own error text
    assert reload_order(stopped.stdout) == ["web1"], stopped.stdout
    assert load["requests"] > 100, load["output"]
    assert load["failed"] == 0 and load["non2xx"] == 0, load["output"]
    assert upstream_errors(error_log) == []
    for host in fleet.values():
        assert host.version() == "v2", host.name
        assert host.current() == "v2", host.name
        assert host.molt.live_generation() == 2, host.name
    assert fleet["web1"].root.joinpath("releases", "v3").is_dir()  # copied, then refused
    for name in ("web2", "web3"):
        assert not fleet[name].root.joinpath("releases", "v3").exists(), name
