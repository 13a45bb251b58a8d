"""The master <-> worker contract is written once per language: the C++ header
supervisor/contract/worker_contract.hpp (printed as JSON by the molt_contract_dump test binary)
and the shim's molt_shim/contract.py. These tests fail when the two disagree."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Dict, List

import pytest

from molt_testlib import REPO, molt_bin

sys.path.insert(0, str(REPO / "worker_shim"))
from molt_shim import contract  # noqa: E402


def cpp_contract() -> Dict[str, object]:
    dump = Path(molt_bin()).parent / "molt_contract_dump"
    assert dump.exists(), f"{dump} is missing: build the tests (cmake --build build)"
    out = subprocess.run([str(dump)], capture_output=True, text=True, timeout=10, check=True)
    return json.loads(out.stdout)


def differences(cpp: Dict[str, object], python: Dict[str, object]) -> List[str]:
    """Every entry on which the two sides disagree, named, in a stable order."""
    found = []
    for name in sorted(set(cpp) | set(python)):
        if name not in python:
            found.append(f"{name}: only in worker_contract.hpp")
        elif name not in cpp:
            found.append(f"{name}: only in contract.py")
        elif cpp[name] != python[name]:
            found.append(f"{name}: C++ {cpp[name]!r} != Python {python[name]!r}")
    return found


def test_the_cpp_and_python_contracts_agree():
    assert differences(cpp_contract(), contract.as_json()) == []


def test_the_comparison_names_a_disagreement():
    # Guards the test above against comparing nothing: a changed copy must be reported.
    cpp = cpp_contract()
    changed = json.loads(json.dumps(cpp))
    changed["exit"]["warmup_failed"] = 5
    changed["worker_to_master_keys"].append("FORK")
    del changed["first_listen_fd"]
    assert differences(cpp, changed) == [
        "exit: C++ {'import_failed': 3, 'lifespan_failed': 5, 'ok': 0, 'warmup_failed': 4} != "
        "Python {'import_failed': 3, 'lifespan_failed': 5, 'ok': 0, 'warmup_failed': 5}",
        "first_listen_fd: only in worker_contract.hpp",
        f"worker_to_master_keys: C++ {cpp['worker_to_master_keys']!r} != Python "
        f"{changed['worker_to_master_keys']!r}",
    ]


@pytest.mark.parametrize("name, scrubbed", [
    ("NOTIFY_SOCKET", True), ("LISTEN_FDS", True), ("LISTEN_FDNAMES", True),
    ("WATCHDOG_USEC", True), ("MOLT_UPGRADE_STATE", True), ("NOTIFY_SOCKETX", False),
    ("PATH", False), ("DJANGO_SETTINGS_MODULE", False)])
def test_the_shared_scrub_rule_reads_the_same_on_both_sides(name, scrubbed):
    cpp = cpp_contract()
    cpp_says = name in cpp["scrubbed_names"] or any(
        name.startswith(prefix) for prefix in cpp["scrubbed_prefixes"])
    assert cpp_says == contract.is_scrubbed(name) == scrubbed
