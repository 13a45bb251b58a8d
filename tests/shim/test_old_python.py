"""The shim must run on the app's Python, 3.8 or later: boot it on a 3.8 interpreter when the
machine has one (pyenv), with only pure-Python h11 available (no httptools build for it)."""
import glob
import os

import pytest

from harness import Client

CANDIDATES = sorted(glob.glob("/root/.pyenv/versions/3.8*/bin/python3.8")
                    + glob.glob("/usr/bin/python3.8"))
H11_DIR = "/usr/lib/python3/dist-packages/h11"


@pytest.mark.timeout(60)
@pytest.mark.skipif(not CANDIDATES or not os.path.isdir(H11_DIR), reason="no Python 3.8 here")
def test_worker_on_python38_with_h11_fallback(listeners, spawn, tmp_path):
    (tmp_path / "h11").symlink_to(H11_DIR)
    w = spawn(python=CANDIDATES[0], pythonpath=[str(tmp_path)], health_path="/healthz").wait_ready()
    c = Client(listeners.port)
    assert c.request("/")[2] == b"hello"
    c.send(b"POST /echo HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n")
    assert c.response()[2] == b"ok"
    c.close()
    w.drain()
    assert w.wait_exit() == 0, w.stderr_text()
    assert "parser h11" in w.stderr_text()
