"""bench/asgi_inproc, the in-process harness that changes to the ASGI engine are decided by,
cannot silently rot: it drives the worker's real protocol class on a real uvloop loop, and
--generic lists instructions of molt's shim that CPython 3.11 left generic, each of them run
once per request or more. The reads the thirteenth pass made specialisable stay so
(docs/architecture.md, "ASGI: reads that stay generic")."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from molt_testlib import REPO, molt_bin  # noqa: E402

HARNESS = REPO / "bench" / "asgi_inproc"
# file:line function: the instruction and its argument (per request)
LINE = re.compile(r"[a-z_]+\.py:\d+ \w+: [A-Z_]+ \S+ \((\d+\.\d\d) per request\)$")


def shim_tree() -> str:
    """The build's shim tree: molt_shim/ and the extension beside it."""
    return str(Path(molt_bin()).absolute().parent.parent / "lib" / "molt")


def harness(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["/usr/bin/python3", str(HARNESS), shim_tree(), *args],
                          capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("mode", ["keepalive", "close"])
def test_the_harness_serves_requests_through_the_real_protocol(mode):
    done = harness(mode, "-n", "300", "--rounds", "2")
    assert done.returncode == 0, done.stdout + done.stderr
    assert re.search(r" %s: \d+\.\d\d us each \(median of 2" % mode, done.stdout), done.stdout


def test_generic_lists_the_shims_per_request_reads_and_not_the_ones_made_specialisable():
    done = harness("keepalive", "-n", "500", "--generic")
    if done.returncode == 2 and "3.11" in done.stderr:
        pytest.skip(done.stderr.strip())
    assert done.returncode == 0, done.stdout + done.stderr
    *listed, total = done.stdout.splitlines()
    assert re.fullmatch(r"\d+ generic instructions per request", total), total
    for line in listed:
        match = LINE.match(line)
        assert match and float(match.group(1)) >= 0.5, line
    names = {line.split()[3] for line in listed}
    # The worker's values (with_cycle's variables) and the per-connection flags (the
    # instance's own): read through self as class attributes, each was a generic lookup.
    made_specialisable = {"limit_concurrency", "start_task", "tasks", "server_state", "app",
                          "connections", "_rejected", "_deferred_error", "_upgrading",
                          "_tls_extension", "on_head"}
    assert not names & made_specialisable, listed
