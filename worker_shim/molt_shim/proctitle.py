"""Best-effort process title: setproctitle when installed, else the kernel's comm name."""
from __future__ import annotations

import os
from typing import Any

# Looked for once: a failed import is not cached, and a zygote's every worker would otherwise
# search sys.path (and list the release directory) for it again after the fork.
try:
    import setproctitle as _setproctitle  # type: ignore
except Exception:  # not installed, or broken
    _setproctitle: Any = None


def set_title(full: str, short: str) -> None:
    """`full` goes to setproctitle; `short` (<= 15 bytes, the kernel's comm limit) to comm.

    Writing /proc/self/comm is what prctl(PR_SET_NAME) does, without loading ctypes (a
    noticeable part of a worker's start-up, which every rollover waits for), and with os.open
    rather than open(): a text file object is 1.1 ms of CPU in a freshly forked worker (its
    codec lookup writes to shared pages), the bare write 0.3 ms."""
    if _setproctitle is not None:
        try:
            _setproctitle.setproctitle(full)
            return
        except Exception:
            pass
    try:
        fd = os.open("/proc/self/comm", os.O_WRONLY | os.O_CLOEXEC)
    except OSError:
        return
    try:
        os.write(fd, short.encode("utf-8", "replace")[:15])
    except OSError:
        pass
    finally:
        os.close(fd)
