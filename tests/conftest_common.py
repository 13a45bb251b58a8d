"""Fixtures shared by the integration and e2e suites (imported by their conftest.py)."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from molt_testlib import Molt  # noqa: E402


@pytest.fixture
def molt(tmp_path):
    """Factory: molt(config_dict, **kwargs) -> started-or-not Molt; always cleaned up."""
    started: list[Molt] = []

    def make(config: dict, start: bool = True, subdir: str = "molt", **kwargs) -> Molt:
        m = Molt(tmp_path / subdir, config, **kwargs)
        started.append(m)
        if start:
            m.start()
        return m

    yield make
    for m in started:
        m.kill_everything()
