"""bench/run end to end, so that the benchmark cannot silently rot: the quick mode of the
ASGI section (real molt, real uvicorn and gunicorn peers, real wrk) into a temp directory,
and its report written again from the saved results."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from molt_testlib import REPO, molt_bin  # noqa: E402

RUN = REPO / "bench" / "run"


@pytest.mark.timeout(300)
def test_quick_asgi_section_end_to_end(tmp_path):
    work, report = tmp_path / "work", tmp_path / "benchmarks.md"
    env = dict(os.environ, MOLT_BIN=molt_bin())
    done = subprocess.run([str(RUN), "--quick", "--only", "asgi", "--work", str(work), "--keep",
                           "--out", str(report)],
                          capture_output=True, text=True, timeout=280, env=env)
    assert done.returncode == 0, done.stdout + done.stderr

    results = json.loads((work / "results.json").read_text())
    assert results["params"]["quick"] is True and results["notes"] == []
    for key in ("asgi_keepalive", "asgi_close", "asgi_fastapi"):
        assert set(results[key]) == {"molt", "uvicorn", "gunicorn-uvicorn"}, results[key]
        for label, figures in results[key].items():
            assert len(figures["runs"]) == 1, (key, label)     # quick: one repetition
            assert figures["rps"] > 0, (key, label, figures)
            assert figures["cpu_us"] > 0, (key, label, figures)  # the server tree's CPU
    for label, figures in results["asgi_ws_echo"].items():
        assert figures["rate"] > 0 and figures["errors"] == 0, (label, figures)
    assert results["asgi_loop"] in ("uvloop", "asyncio")
    # The bench drove molt through the shared helpers: its first generation went live, and
    # the stop at the end of the section was a clean drain, not a kill.
    assert "molt.yaml (asgi)" in results["commands"]
    log = (work / "asgi" / "molt.log").read_text()
    assert "generation 1: starting -> live" in log, log
    assert "master exits 0" in log, log

    text = report.read_text()
    assert "bench/run --quick` on" in text
    assert "## 2. ASGI, 4 workers" in text
    assert "### FastAPI JSON endpoint, keep-alive" in text and "### WebSocket echo" in text
    assert text.index("## Targets") < text.index("## Machine and versions")
    assert "| molt |" in text and "| uvicorn |" in text and "| gunicorn-uvicorn |" in text
    assert "ASGI keep-alive: molt ≥ 1.2× the better peer" in text
    assert "| CPU µs/request | server ÷ molt (CPU) |" in text
    assert "## 1. WSGI" not in text and "failed in this run" not in text

    # The reporters alone, from the saved results: the same report again.
    again = tmp_path / "again.md"
    subprocess.run([str(RUN), "--from-results", str(work / "results.json"), "--out", str(again)],
                   check=True, capture_output=True, timeout=60, env=env)
    assert again.read_text() == text


@pytest.mark.timeout(170)
def test_quick_observe_section_end_to_end(tmp_path):
    """The cost-of-observability section: three molt masters, metrics off, on, and on with
    the access log written to a file, measured in the same run."""
    work, report = tmp_path / "work", tmp_path / "benchmarks.md"
    env = dict(os.environ, MOLT_BIN=molt_bin())
    done = subprocess.run([str(RUN), "--quick", "--only", "observe", "--work", str(work),
                           "--keep", "--out", str(report)],
                          capture_output=True, text=True, timeout=150, env=env)
    assert done.returncode == 0, done.stdout + done.stderr
    results = json.loads((work / "results.json").read_text())
    rows = results["observe_keepalive"]
    assert len(rows) == 3 and all(r["rps"] > 0 and r["errors"] == 0 for r in rows.values())
    # Only the third master wrote an access log file, one line per request it served.
    assert results["observe_access_lines"] > 0
    text = report.read_text()
    assert "## 12. The cost of metrics and the access log" in text
    assert "÷ metrics off" in text
