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
