"""The user docs against the real molt: the quickstart runs, the deploy script deploys, and
every command, flag, config key, quoted message and relative link the docs name exists.

Run: /usr/bin/python3 -m pytest -q tests/docs   (MOLT_BIN overrides build/bin/molt)

Conventions the docs follow so that this suite can check them:

* Every ```sh block of docs/quickstart.md runs, in order, in one bash process, in an empty
  directory, with the built molt first on PATH and port 8000 replaced by a free port. A block
  right after `<!-- docs-test: skip ... -->` is not run (the build from source).
* Headings of docs/troubleshooting.md quote a message in backticks; that text must appear
  literally in supervisor/, config/ or worker_shim/.
"""
from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import tarfile
from pathlib import Path

import pytest

from molt_testlib import PYTHON, REPO, control_request, molt_bin, wait_until

DOCS = REPO / "docs"
OWNED = ["quickstart.md", "signals.md", "control.md", "deploy.md", "releases.md",
         "kubernetes.md", "migrating-from-gunicorn.md", "troubleshooting.md", "static.md"]
SOURCE_DIRS = [REPO / "supervisor", REPO / "config", REPO / "worker_shim"]


# ----- helpers -------------------------------------------------------------------------------

def read(name: str) -> str:
    return (DOCS / name).read_text()


def fenced_blocks(text: str):
    """(language, body, text before the block) for every fenced code block."""
    for m in re.finditer(r"^```([\w-]*)\n(.*?)^```\s*$", text, re.S | re.M):
        yield m.group(1), m.group(2), text[:m.start()]


def inline_code(text: str) -> list[str]:
    without_blocks = re.sub(r"^```.*?^```\s*$", "", text, flags=re.S | re.M)
    return re.findall(r"`([^`\n]+)`", without_blocks)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def molt_help() -> str:
    out = subprocess.run([molt_bin(), "--help"], capture_output=True, text=True, timeout=10)
    assert out.returncode == 0, out.stderr
    return out.stdout


# Every parser level of molt, for `molt ... --help`.
SUBCOMMANDS = [["run"], ["check"], ["ctl"], ["ctl", "status"], ["ctl", "reload"],
               ["ctl", "rollback"], ["ctl", "history"], ["ctl", "scale"], ["ctl", "stop"],
               ["version"], ["config-reference"]]


def subcommand_help(sub: list[str]) -> str:
    out = subprocess.run([molt_bin(), *sub, "--help"], capture_output=True, text=True, timeout=10)
    assert out.returncode == 0, out
    return out.stdout


def have_flask() -> bool:
    return subprocess.run([PYTHON, "-c", "import flask"], capture_output=True).returncode == 0


def env_with_molt() -> dict:
    env = dict(os.environ)
    env["PATH"] = str(Path(molt_bin()).resolve().parent) + os.pathsep + env.get("PATH", "")
    env.pop("MOLT_CONTROL_SOCKET", None)
    return env


def source_text() -> str:
    """Every source file, with adjacent string literals joined ("a "\n  "b" -> "a b") and
    fmt's doubled braces undone, so that a message split over lines is found whole."""
    parts = []
    for root in SOURCE_DIRS:
        for path in sorted(root.rglob("*")):
            if path.suffix in {".cpp", ".hpp", ".py"} and "__pycache__" not in path.parts:
                parts.append(path.read_text(errors="replace"))
    text = "\n".join(parts)
    text = re.sub(r'"\s*\n\s*(?:f|r|b)?"', "", text)
    return text.replace("{{", "{").replace("}}", "}")


def kill_if_running(pid: int):
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


# ----- the quickstart runs -------------------------------------------------------------------

def quickstart_script(port: int) -> str:
    blocks = []
    for lang, body, before in fenced_blocks(read("quickstart.md")):
        if lang != "sh":
            continue
        if re.search(r"<!--\s*docs-test:\s*skip[^>]*-->\s*$", before):
            continue
        blocks.append(body.replace("8000", str(port)))
    assert len(blocks) >= 6, "the quickstart lost its runnable blocks"
    return "\n".join(blocks)


@pytest.mark.timeout(180)
@pytest.mark.skipif(not have_flask(), reason="Flask is not importable by /usr/bin/python3")
def test_the_quickstart_runs_end_to_end(tmp_path):
    port = free_port()
    script = ("set -eu\n"
              "cleanup() { if [ -n \"${molt_pid:-}\" ] && kill -0 \"$molt_pid\" 2>/dev/null; "
              "then kill -KILL \"$molt_pid\"; fi; }\n"
              "trap cleanup EXIT\n" + quickstart_script(port))
    (tmp_path / "quickstart.sh").write_text(script)
    result = subprocess.run(["bash", str(tmp_path / "quickstart.sh")], cwd=tmp_path,
                            env=env_with_molt(), capture_output=True, text=True, timeout=150)
    log = tmp_path / "hello" / "molt.log"
    context = (f"exit {result.returncode}\n--- stdout\n{result.stdout}\n--- stderr\n"
               f"{result.stderr}\n--- molt.log\n{log.read_text() if log.exists() else ''}")
    assert result.returncode == 0, context
    out = result.stdout
    assert re.search(r"^molt \d+\.\d+\.\d+ build \w+$", out, re.M), context
    assert "molt.yaml: ok: app:app (wsgi), 2 worker(s) x 4 thread(s)" in out, context
    assert "hello from version 1" in out, context
    assert "generation 1 live" in out, context
    assert re.search(r"^generation 2 is live \(\d+ms\)$", out, re.M), context
    assert "hello from version 2" in out, context
    assert "reload failed with exit code 1" in out, context
    assert "No module named 'no_such_module'" in result.stderr, context
    assert out.count("hello from version 2") == 2, "the broken release must not serve\n" + context
    assert re.search(r"^3\s+reload\s+failed", out, re.M), context
    assert "stopping (graceful)" in out, context
    assert "every worker has exited; master exits 0" in log.read_text(), context


# ----- the deploy script deploys -------------------------------------------------------------

def deploy_script() -> str:
    for lang, body, _ in fenced_blocks(read("deploy.md")):
        if lang == "sh" and body.startswith("#!/bin/sh\n# deploy.sh"):
            return body
    raise AssertionError("docs/deploy.md has no deploy.sh block")


def flask_archive(path: Path, version: str, broken: bool = False):
    src = path.parent / f"src-{version}"
    src.mkdir()
    (src / "app.py").write_text(
        "from flask import Flask\n"
        + ("raise RuntimeError('DATABASE_URL is not set')\n" if broken else "")
        + "app = Flask(__name__)\n"
        "@app.route('/')\n"
        f"def index():\n    return 'release {version}\\n'\n"
        "@app.route('/healthz')\n"
        "def healthz():\n    return 'ok\\n'\n")
    with tarfile.open(path, "w:gz") as tar:
        tar.add(src / "app.py", arcname="app.py")


def http_get(port: int, path: str = "/") -> tuple[str, dict]:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(f"GET {path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n".encode())
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    headers = {}
    for line in head.decode("latin-1").split("\r\n")[1:]:
        key, _, value = line.partition(":")
        headers[key.strip().lower()] = value.strip()
    return body.decode(), headers


@pytest.mark.timeout(180)
@pytest.mark.skipif(not have_flask(), reason="Flask is not importable by /usr/bin/python3")
def test_the_deploy_script_deploys_refuses_a_broken_release_and_rolls_back(tmp_path):
    root = tmp_path / "srv"
    first = root / "releases" / "1"
    first.mkdir(parents=True)
    archives = {}
    for version, broken in (("1", False), ("2", False), ("3", True)):
        archives[version] = tmp_path / f"app-{version}.tar.gz"
        flask_archive(archives[version], version, broken)
    with tarfile.open(archives["1"]) as tar:
        tar.extractall(first)
    (first / "REVISION").write_text("1\n")
    (root / "current").symlink_to(first)
    script = tmp_path / "deploy.sh"
    script.write_text(deploy_script())
    script.chmod(0o755)
    config = tmp_path / "molt.yaml"
    control = tmp_path / "molt.sock"
    config.write_text(f"app: app:app\nchdir: {root / 'current'}\npython: {PYTHON}\n"
                      "listen: tcp://127.0.0.1:0\nworkers: 2\nversion_file: REVISION\n"
                      "health: {path: /healthz}\nhttp: {version_header: X-Release}\n"
                      f"control: {{socket: {control}}}\n")
    log = open(tmp_path / "molt.log", "wb")
    master = subprocess.Popen([molt_bin(), "run", "-c", str(config)], stdout=log,
                              stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
        def live():
            assert master.poll() is None, (tmp_path / "molt.log").read_text()
            try:
                return control_request(str(control), {"command": "status"}).get("live_generation")
            except OSError:
                return None
        wait_until(live, 30, "molt to serve release 1")
        status = control_request(str(control), {"command": "status"})
        port = int(status["master"]["listen"][0].rsplit(":", 1)[1])
        env = dict(env_with_molt(), APP_ROOT=str(root), MOLT_CONFIG=str(config))

        def deploy(version):
            return subprocess.run([str(script), version, str(archives[version])], env=env,
                                  capture_output=True, text=True, timeout=120)

        good = deploy("2")
        assert good.returncode == 0, good.stderr
        assert "deploy: 2 is live" in good.stdout
        body, headers = http_get(port)
        assert body == "release 2\n" and headers.get("x-release") == "2"

        bad = deploy("3")
        assert bad.returncode == 1
        assert "RuntimeError: DATABASE_URL is not set" in bad.stderr
        assert "deploy: 3 failed; the previous release keeps serving" in bad.stderr
        assert os.readlink(root / "current").endswith("/releases/2"), "current flipped back"
        assert http_get(port)[0] == "release 2\n"

        rolled = subprocess.run([molt_bin(), "ctl", "-c", str(config), "rollback", "--wait"],
                                capture_output=True, text=True, timeout=120)
        assert rolled.returncode == 0, rolled.stderr
        assert http_get(port)[1].get("x-release") == "1"
    finally:
        if master.poll() is None:
            master.send_signal(signal.SIGTERM)
            try:
                master.wait(30)
            except subprocess.TimeoutExpired:
                kill_if_running(master.pid)
        log.close()
    assert master.returncode == 0, (tmp_path / "molt.log").read_text()


# ----- every command and flag exists ---------------------------------------------------------

HIDDEN_COMMANDS = {"upgrade-check"}  # not in --help; checked by running it below


def molt_invocations(text: str) -> list[str]:
    """`molt ...` command lines in code blocks and inline code, up to a shell separator."""
    snippets = [body for _, body, _ in fenced_blocks(text)] + inline_code(text)
    found = []
    for snippet in snippets:
        # `molt` where a command starts: line start, after a prompt or a shell operator
        for m in re.finditer(r"(?:^|\$ |! |\$\(|-- |&& |\|\| )molt[ \t]+([a-z][\w-]*[^\n`|;)&#]*)",
                             snippet, re.M):
            found.append(m.group(1).strip())
    return found


def test_every_molt_command_and_flag_in_the_docs_exists():
    help_text = molt_help()
    commands = set(re.findall(r"^\s*molt ([a-z][\w-]*)", help_text, re.M))
    ctl_commands = set(re.findall(r"molt ctl .*?(?:\)|\.\.\.) ([a-z]+)", help_text))
    flags = set(re.findall(r"(?<![\w-])(--?[a-zA-Z][\w-]*)",
                           help_text + "".join(subcommand_help(s) for s in SUBCOMMANDS)))
    assert {"run", "check", "ctl", "version", "config-reference"} <= commands
    assert {"status", "reload", "rollback", "history", "scale", "stop"} <= ctl_commands
    problems = []
    for name in OWNED:
        for call in molt_invocations(read(name)):
            words = call.split()
            sub = words[0]
            if sub not in commands | HIDDEN_COMMANDS | {"ctl"}:
                problems.append(f"{name}: unknown command `molt {call}`")
                continue
            if sub == "ctl":
                # skip option values (-c FILE, --socket PATH, --timeout 120s)
                i, args = 1, []
                while i < len(words):
                    if words[i] in ("-c", "--socket", "--config", "--timeout"):
                        i += 2
                        continue
                    args.append(words[i])
                    i += 1
                positional = [w for w in args if not w.startswith("-")]
                if positional and positional[0] not in ctl_commands and not positional[0].isupper():
                    problems.append(f"{name}: unknown ctl command in `molt {call}`")
            for word in words[1:]:
                flag = word.split("=", 1)[0]
                if re.fullmatch(r"--?[a-zA-Z][\w-]*", flag) and flag not in flags:
                    problems.append(f"{name}: flag {flag} of `molt {call}` is not in molt --help")
    assert not problems, "\n".join(problems)


def test_the_hidden_upgrade_check_command_exists():
    out = subprocess.run([molt_bin(), "upgrade-check"], capture_output=True, text=True, timeout=10)
    assert out.returncode == 0 and out.stdout.startswith("molt "), out


# ----- every config key exists ---------------------------------------------------------------

def config_reference_keys() -> set[str]:
    return set(re.findall(r"^\| `([^`]+)` \|", read("config.md"), re.M))


def test_every_dotted_config_key_in_the_docs_is_in_the_reference():
    keys = config_reference_keys()
    sections = {k.split(".")[0] for k in keys if "." in k}
    problems = []
    for name in OWNED:
        text = read(name)
        candidates = set(inline_code(text))
        for lang, body, _ in fenced_blocks(text):
            if lang in ("sh", "yaml", "python"):  # not `text`: it shows output, typos included
                candidates |= set(re.findall(r"[a-z_\[\]]+\.[a-z_.]+", body))
        for token in candidates:
            token = token.strip().rstrip(":")
            token = re.sub(r"[:=].*$", "", token)  # `timeouts.boot: 60s` -> the key
            if not re.fullmatch(r"[a-z_]+(\[\])?(\.[a-z_]+)+", token):
                continue
            if token.split(".")[0].replace("[]", "") not in {s.replace("[]", "") for s in sections}:
                continue  # a module path, a file name, not a config key
            if token not in keys:
                problems.append(f"{name}: `{token}` is not in docs/config.md")
    assert not problems, "\n".join(sorted(set(problems)))


def molt_yaml_blocks():
    keys = config_reference_keys()
    top = {k for k in keys if "." not in k and "[" not in k}
    for name in OWNED:
        for lang, body, _ in fenced_blocks(read(name)):
            if lang != "yaml":
                continue
            block_keys = set(re.findall(r"^([a-z_]+):", body, re.M))
            if block_keys & top:
                yield name, body


def test_every_molt_config_snippet_passes_molt_check_except_for_missing_paths(tmp_path):
    checked = 0
    for i, (name, body) in enumerate(molt_yaml_blocks()):
        text = body if re.search(r"^app:", body, re.M) else "app: app:app\n" + body
        path = tmp_path / f"snippet{i}.yaml"
        path.write_text(text)
        out = subprocess.run([molt_bin(), "check", "-c", str(path)], capture_output=True,
                             text=True, timeout=10)
        errors = [line for line in out.stderr.splitlines()
                  if re.match(rf"{re.escape(str(path))}:\d+:\d+: ", line)
                  and not re.search(r": (chdir|python|static\[\d+\]\.dir): "
                                    r"(cannot use|\"[^\"]*\" is not)", line)]
        assert not errors, f"{name}: snippet\n{body}\nfails molt check:\n" + "\n".join(errors)
        checked += 1
    assert checked >= 5


# ----- quoted messages still exist -----------------------------------------------------------

def test_every_troubleshooting_heading_quotes_a_message_from_the_source():
    source = source_text()
    headings = re.findall(r"^#{2,4} (.*)$", read("troubleshooting.md"), re.M)
    quoted = [q for h in headings for q in re.findall(r"`([^`]+)`", h)]
    assert len(quoted) >= 25, quoted
    missing = [q for q in quoted if q not in source and q not in {"USR2", "molt ctl"}]
    assert not missing, "not found in supervisor/, config/, worker_shim/:\n" + "\n".join(missing)


# Parts of a message that are filled in at run time: they separate the literal fragments.
DYNAMIC = re.compile("|".join([
    r"\"[^\"]*\"", r"'[^']*'", r"`[^`]*`",             # quoted values
    r"(?:tcp|unix)://\S+|unix:\S+",                       # addresses
    r"/[\w./@-]*",                                        # paths
    r"\b[\w.]+=\S*",                                      # slot=1 pid=2 version=v3
    r"\b\d[\w.]*",                                        # numbers, 250ms, 8f3d705b
    r"\bSIG[A-Z0-9]+\b",                                  # signal names
    r"\b(?:starting|live|draining|gone|failed|spawned|booting|ready|exited|startup|reload|"
    r"rollback|watch|crash|heartbeat|request_timeout|recycle|boot_timeout|killed)\b",
    r"\b[a-z_]+\.[a-z_.]+\b",                             # molt.yaml, timeouts.boot
    r"\b\w+\(",                                           # bind(, realpath(: syscall names
    r"No such file or directory|Address already in use|Permission denied|Connection refused",
    r"\bexpected\b",                                      # "expected " + a list of forms
]))
# Where the worker's own text (a Python exception, a child's output) begins.
FOREIGN = re.compile(r"(before READY: |reports: |; replacing it in [^:]*: |failed its check "
                     r"\([^)]*\): |keeps serving: |exiting: |failed after \w+: |reload failed: "
                     r"worker|rollback failed: rollback target|syntax\.yaml|expected one of: |"
                     r"rejected: |config invalid: |passed its check \()")


def message_fragments(line: str) -> list[str]:
    line = re.sub(r"^(info|warning|error|debug)\s+(gen=\d+\s+)?(pid=\d+\s+)?", "", line)
    line = re.sub(r"^molt: ", "", line)
    line = re.sub(r"^\S+\.yaml:\d+:\d+: [\w.\[\]]+: ", "", line)
    m = FOREIGN.search(line)
    if m:
        line = line[:m.end()]
    pieces = DYNAMIC.split(line)
    out = []
    for piece in pieces:
        piece = piece.strip(" ()[]:;,.")
        if len(re.sub(r"[^a-z]", "", piece)) >= 12:
            out.append(piece)
    return out


def test_every_master_line_quoted_in_troubleshooting_still_exists():
    source = source_text()
    problems, checked = [], 0
    for lang, body, _ in fenced_blocks(read("troubleshooting.md")):
        if lang != "text":
            continue
        for line in body.splitlines():
            if line.startswith(("worker ", " ", ".")) or not line.strip():
                continue
            for fragment in message_fragments(line):
                checked += 1
                if fragment not in source:
                    problems.append(f"{fragment!r}  (from: {line})")
    assert checked >= 40, checked
    assert not problems, "quoted but not in the source:\n" + "\n".join(problems)


# ----- links resolve -------------------------------------------------------------------------

def github_slug(heading: str) -> str:
    text = heading.strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    text = re.sub(r"^```.*?^```\s*$", "", path.read_text(), flags=re.S | re.M)
    return {github_slug(h) for h in re.findall(r"^#{1,6} (.*)$", text, re.M)}


def test_every_relative_link_between_docs_resolves():
    problems = []
    for doc in sorted(DOCS.glob("*.md")):
        text = re.sub(r"^```.*?^```\s*$", "", doc.read_text(), flags=re.S | re.M)
        for target in re.findall(r"\[[^\]]*\]\(([^)\s]+)\)", text):
            if re.match(r"[a-z]+:", target):
                continue  # http:, https:, mailto:
            file_part, _, anchor = target.partition("#")
            path = (doc.parent / file_part).resolve() if file_part else doc
            if not path.exists():
                problems.append(f"{doc.name}: {target}: no such file")
                continue
            if anchor and path.suffix == ".md" and anchor not in anchors(path):
                problems.append(f"{doc.name}: {target}: no heading with that anchor")
    assert not problems, "\n".join(problems)
