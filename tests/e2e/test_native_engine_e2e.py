"""The native engine behind the real master: a Flask release served by engine: native rolls
over under wrk keep-alive load with zero failed requests."""
from __future__ import annotations

import pytest

from molt_testlib import wait_until
from test_rollover_flask import base_config, body, deploy_layout, rollovers_under_load


@pytest.mark.timeout(240)
def test_hup_rollovers_on_the_native_engine_fail_no_request(molt, tmp_path):
    releases = deploy_layout(tmp_path)
    m = molt(base_config(releases, engine="native"))
    assert body(m) == "version a\n"
    wait_until(lambda: m.log().count("native engine, parser http-parser") >= 2, 10,
               "both workers on the native engine", on_timeout=m.log)
    result = rollovers_under_load(m, releases, 6, 30)
    assert result["requests"] > 1000, result["output"]
    assert result["failed"] == 0, result["output"]
    assert "engine native unavailable" not in m.log()
    assert m.status()["rollovers"] == {"ok": 6, "failed": 0}
