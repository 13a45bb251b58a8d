import os
import sys
import tempfile

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from harness import HAVE_NATIVE, Listeners, Worker  # noqa: E402


def pytest_collection_modifyitems(items):
    # A hard bound on every test, also those that forget their own marker.
    for item in items:
        if item.get_closest_marker("timeout") is None:
            item.add_marker(pytest.mark.timeout(60))


# The WSGI engines the conformance suite runs against (MOLT_WORKER_CONFIG's `engine`): a new
# engine is tested by adding its name here. The protocol, fuzz, drain and concurrency modules
# take the `engine` fixture (pytestmark usefixtures), and `spawn` passes it on. The native one
# runs when its extension is built (the harness finds it in build/lib/molt).
WSGI_ENGINES = ["python"] + (["native"] if HAVE_NATIVE else [])


@pytest.fixture(scope="module", params=WSGI_ENGINES)
def engine(request):
    return request.param


@pytest.fixture
def listeners():
    d = tempfile.mkdtemp(prefix="molt-shim-")
    ls = Listeners(d)
    yield ls
    ls.close()


@pytest.fixture
def spawn(request, listeners):
    workers = []
    # Only tests that take the `engine` fixture run once per engine; the others get the
    # shim's default.
    engine = request.getfixturevalue("engine") if "engine" in request.fixturenames else None

    def _spawn(app="edge_app:application", **kw):
        kw.setdefault("engine", engine)
        w = Worker(kw.pop("listeners", listeners), app, **kw)
        workers.append(w)
        return w

    yield _spawn
    for w in workers:
        w.stop()
