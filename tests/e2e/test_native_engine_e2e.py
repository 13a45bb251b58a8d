"""The native engine behind the real master: a Flask release served by engine: native rolls
over under wrk keep-alive load with zero failed requests."""
from __future__ import annotations

import signal

import pytest

from molt_testlib import Wrk, wait_until
from test_rollover_flask import base_config, body, deploy_layout


@pytest.mark.timeout(240)
def test_hup_rollovers_on_the_native_engine_fail_no_request(molt, tmp_path):
    releases = deploy_layout(tmp_path)
    m = molt(base_config(releases, engine="native"))
    assert body(m) == "version a\n"
    wait_until(lambda: m.log().count("native engine, parser http-parser") >= 2, 10,
               "both workers on the native engine", on_timeout=m.log)
    load = Wrk(m.url("/"), duration=30, connections=32, threads=2)
    try:
        for i in range(6):
            version = "b" if i % 2 == 0 else "a"
            releases.activate(version)
            before = m.live_generation()
            m.signal(signal.SIGHUP)
            wait_until(lambda: (m.live_generation() or 0) > before
                       and not m.status()["rollover_in_progress"], 30,
                       f"rollover {i + 1} to complete", on_timeout=m.log)
            assert body(m) == f"version {version}\n"
    finally:
        result = load.result()
    assert result["requests"] > 1000, result["output"]
    assert result["failed"] == 0, result["output"]
    assert "engine native unavailable" not in m.log()
    assert m.status()["rollovers"] == {"ok": 6, "failed": 0}
