"""Fixtures for the systemd suite; the helpers live in sdtestlib.py."""
from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from conftest_common import molt  # noqa: E402,F401
from sdtestlib import NotifyListener, SocketActivatedMolt, short_tmpdir  # noqa: E402


@pytest.fixture
def activated(tmp_path):
    """Factory for SocketActivatedMolt; every one is killed (by pid) after the test."""
    started: list[SocketActivatedMolt] = []

    def make(config: dict, listen: list[str], subdir: str = "molt", **kwargs):
        m = SocketActivatedMolt(tmp_path / subdir, config, listen, **kwargs)
        started.append(m)
        return m

    yield make
    for m in started:
        m.kill_everything()


@pytest.fixture
def notify_listener():
    directory = short_tmpdir()
    listener = NotifyListener(directory / "notify")
    yield listener
    listener.close()
    shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture
def short_dir():
    directory = short_tmpdir()
    yield directory
    shutil.rmtree(directory, ignore_errors=True)

