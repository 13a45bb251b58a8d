"""Best-effort process title: setproctitle when installed, else /proc/self/comm via prctl."""
from __future__ import annotations

import ctypes
import ctypes.util

PR_SET_NAME = 15


def set_title(full: str, short: str) -> None:
    """`full` goes to setproctitle; `short` (<= 15 bytes, the kernel's comm limit) to prctl."""
    try:
        import setproctitle  # type: ignore

        setproctitle.setproctitle(full)
        return
    except Exception:
        pass
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        libc.prctl(PR_SET_NAME, ctypes.c_char_p(short.encode()[:15]), 0, 0, 0)
    except Exception:
        pass
