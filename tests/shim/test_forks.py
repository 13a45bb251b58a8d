"""The zygote's double fork (zygote.Forks), in a plain interpreter: what each side inherits.

The zygote ignores SIGCHLD so that the kernel reaps its intermediates and nothing wakes it
between requests (zygote.serve_forks). A process that ignores SIGCHLD has all its children
reaped by the kernel, so an intermediate that kept it would swallow the exit of a worker that
died before the intermediate itself exited: the master, the workers' subreaper, would never
see it. Each intermediate therefore has the default again, with or without another thread
alive (the raw libc fork, or os.fork())."""
import signal
import subprocess

import pytest

from harness import PYTHON, SHIM_DIR

PROBE = r'''
import os, signal, sys, threading, time
from molt_shim.zygote import Forks

if sys.argv[1] == "thread":  # another thread alive: Forks uses os.fork()
    threading.Thread(target=time.sleep, args=(5,), daemon=True).start()
signal.signal(signal.SIGCHLD, signal.SIG_IGN)
forks = Forks()
r, w = os.pipe()
if forks.intermediate() == 0:
    ignored = next(line for line in open("/proc/self/status") if line.startswith("SigIgn:"))
    os.write(w, b"%d %s" % (forks.raw, ignored.split()[1].encode()))
    os._exit(0)
os.close(w)
print(os.read(r, 100).decode())
ignored = next(line for line in open("/proc/self/status") if line.startswith("SigIgn:"))
print(ignored.split()[1])
'''


@pytest.mark.parametrize("threads", ["single", "thread"])
def test_an_intermediate_has_the_default_sigchld_back(threads):
    out = subprocess.run([PYTHON, "-c", PROBE, threads], capture_output=True, text=True,
                         timeout=30, env={"PYTHONPATH": SHIM_DIR}, check=True).stdout.split()
    raw, in_intermediate, in_zygote = out
    assert raw == ("1" if threads == "single" else "0")
    bit = 1 << (signal.SIGCHLD - 1)
    assert int(in_zygote, 16) & bit  # the zygote still ignores it
    assert not int(in_intermediate, 16) & bit
