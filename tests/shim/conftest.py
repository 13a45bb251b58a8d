import os
import sys
import tempfile

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from harness import Listeners, Worker  # noqa: E402


def pytest_collection_modifyitems(items):
    # A hard bound on every test, also those that forget their own marker.
    for item in items:
        if item.get_closest_marker("timeout") is None:
            item.add_marker(pytest.mark.timeout(60))


@pytest.fixture
def listeners():
    d = tempfile.mkdtemp(prefix="molt-shim-")
    ls = Listeners(d)
    yield ls
    ls.close()


@pytest.fixture
def spawn(listeners):
    workers = []

    def _spawn(app="edge_app:application", **kw):
        w = Worker(kw.pop("listeners", listeners), app, **kw)
        workers.append(w)
        return w

    yield _spawn
    for w in workers:
        w.stop()
