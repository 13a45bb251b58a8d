"""The command line's documentation against the parser: every subcommand and every flag that
`molt SUBCOMMAND --help` prints is in the manual page (docs/man/molt.1), in docs/signals.md
and in the bash completion (completion/molt.bash); the manual page renders without warnings.

Run: /usr/bin/python3 -m pytest -q tests/docs/test_cli_docs.py   (MOLT_BIN overrides the binary)
"""
from __future__ import annotations

import re
import shutil
import subprocess

import pytest

from molt_testlib import REPO, molt_bin

MAN_PAGE = REPO / "docs" / "man" / "molt.1"
SIGNALS = REPO / "docs" / "signals.md"
COMPLETION = REPO / "completion" / "molt.bash"


def help_of(*sub: str) -> str:
    out = subprocess.run([molt_bin(), *sub, "--help"], capture_output=True, text=True, timeout=10)
    assert out.returncode == 0, out
    return out.stdout


def subcommands_in(help_text: str) -> list[str]:
    section = help_text.split("Subcommands:\n", 1)
    if len(section) == 1:
        return []
    names = []
    for line in section[1].splitlines():
        m = re.match(r"^  ([a-z][\w-]*)\s", line)
        if not m:
            break
        names.append(m.group(1))
    return names


def parser_levels() -> dict[tuple[str, ...], str]:
    """Every parser level, found by walking the help from the top: (path) -> help text."""
    levels: dict[tuple[str, ...], str] = {}
    todo: list[tuple[str, ...]] = [()]
    while todo:
        path = todo.pop()
        text = help_of(*path)
        levels[path] = text
        todo.extend(path + (name,) for name in subcommands_in(text))
    return levels


def flags_in(help_text: str) -> set[str]:
    """The flags of an options listing: lines like `  -w,--workers N   help`."""
    flags = set()
    for line in help_text.splitlines():
        m = re.match(r"^  (-[^\s]+)", line)
        if m:
            flags |= set(m.group(1).split(","))
    return flags


def man_text() -> str:
    """The page's source as words: roff's escaped hyphens and font changes undone."""
    text = MAN_PAGE.read_text()
    text = re.sub(r"\\f[BIRP]", "", text).replace("\\-", "-")
    return text


def mentions(text: str, word: str) -> bool:
    return re.search(rf"(?<![\w-]){re.escape(word)}(?![\w-])", text) is not None


def test_the_walk_finds_every_level():
    levels = parser_levels()
    assert {(), ("run",), ("check",), ("ctl",), ("ctl", "reload"), ("ctl", "scale"),
            ("version",), ("config-reference",)} <= set(levels)
    assert "--max-requests" in flags_in(levels[("run",)])
    assert "upgrade-check" not in subcommands_in(levels[()])


@pytest.mark.parametrize("document", [MAN_PAGE, SIGNALS, COMPLETION], ids=lambda p: p.name)
def test_every_subcommand_and_flag_is_documented(document):
    text = man_text() if document == MAN_PAGE else document.read_text()
    missing = []
    for path, help_text in parser_levels().items():
        where = " ".join(("molt",) + path)
        missing += [f"subcommand {where} {name}" for name in subcommands_in(help_text)
                    if not mentions(text, name)]
        missing += [f"flag {flag} of {where}" for flag in sorted(flags_in(help_text))
                    if not mentions(text, flag)]
    assert not missing, f"{document.relative_to(REPO)} lacks:\n" + "\n".join(missing)


@pytest.mark.skipif(shutil.which("groff") is None, reason="groff is not installed")
def test_the_manual_page_renders_without_warnings():
    out = subprocess.run(["groff", "-man", "-Tutf8", "-ww", "-z", str(MAN_PAGE)],
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 0 and out.stderr == "", out.stderr


def test_the_completion_is_valid_bash_and_completes_subcommands():
    script = f"""
        source /usr/share/bash-completion/bash_completion 2>/dev/null || exit 3
        source {COMPLETION}
        COMP_WORDS=(molt ctl -c molt.yaml re); COMP_CWORD=4; COMP_LINE="${{COMP_WORDS[*]}}"
        COMP_POINT=${{#COMP_LINE}}
        _molt
        echo "${{COMPREPLY[*]}}"
    """
    out = subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=30)
    if out.returncode == 3:
        pytest.skip("bash-completion is not installed")
    assert out.returncode == 0, out
    assert out.stdout.split() == ["reload"], out
