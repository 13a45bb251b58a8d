"""How bench/ judges a target from runs with a spread: met only when every run (or every
interleaved pair) holds, "met in the median only" when the median does and some run not."""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

from molt_bench.report import MEDIAN_ONLY, below_verdict, ratio_verdict  # noqa: E402


def test_a_time_under_a_limit_in_every_run_or_in_the_median_only():
    assert below_verdict({"median": 0.045, "min": 0.043, "max": 0.049}, 0.05) is True
    assert below_verdict({"median": 0.045, "min": 0.043, "max": 0.051}, 0.05) == MEDIAN_ONLY
    assert below_verdict({"median": 0.050, "min": 0.043, "max": 0.051}, 0.05) is False


def test_a_throughput_ratio_in_every_pair_or_in_the_medians_only():
    assert ratio_verdict([55, 56, 57], [62, 64, 66], 0.8) is True
    assert ratio_verdict([55, 45, 56], [62, 74, 68], 0.8) == MEDIAN_ONLY
    assert ratio_verdict([45, 46, 47], [62, 64, 66], 0.8) is False


def test_the_preload_figure_judges_memory_and_throughput_by_every_pair():
    """Figure 9's PSS targets (lower is better: uWSGI's tree at least molt's in every pair) and
    its throughput target use the same rule as the others, not the medians alone."""
    from molt_bench.report import Report
    from molt_bench.sections import preload

    def spread(runs):
        return {"median": sorted(runs)[1], "min": min(runs), "max": max(runs), "runs": runs}

    def verdicts(molt_pss, uwsgi_pss, preloaded_rps, plain_rps):
        figure = {"modules": 12, "import": {"cpu_s": 0.6, "wall_s": 0.6, "rss_mib": 97},
                  "tree_pss_mib": {"molt-preload": spread(molt_pss),
                                   "molt-preload-no-standby": spread(molt_pss),
                                   "uwsgi": spread(uwsgi_pss)},
                  "rps": {"molt-preload": spread(preloaded_rps),
                          "molt-no-preload": spread(plain_rps)}}
        doc = Report({"preload": figure, "commands": {}, "params": {}}, {})
        preload.report(doc)
        return {name: ok for name, ok, _value in doc.targets}

    got = verdicts([145.95, 146.24, 145.96], [146.46, 147.40, 145.90], [54.7, 44.1, 52.0],
                   [46.9, 45.4, 53.3])
    assert got["preloaded whole-tree PSS <= uWSGI's"] == MEDIAN_ONLY  # one pair 145.96 > 145.90
    assert got["preloaded throughput unchanged (within 5 %)"] is True  # every pair >= 0.95
    got = verdicts([145.3, 145.4, 145.6], [145.8, 146.3, 147.0], [40.0, 50.0, 50.0],
                   [50.0, 50.0, 50.0])
    assert got["preloaded whole-tree PSS <= uWSGI's"] is True
    assert got["preloaded throughput unchanged (within 5 %)"] == MEDIAN_ONLY
