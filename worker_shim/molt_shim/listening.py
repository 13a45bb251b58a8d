"""What the WSGI and ASGI servers share about accepting from the inherited listeners."""
from __future__ import annotations

import errno
import select

# Linux 4.5: a new connection wakes one worker's epoll, not every worker's.
EPOLLEXCLUSIVE = getattr(select, "EPOLLEXCLUSIVE", 1 << 28)

# Connections a draining worker accepts from the shared queue before it closes its listener:
# an exclusive wake-up may have gone to it alone, and nobody else would be told.
DRAIN_BACKLOG_MAX = 64


def out_of_resources(exc: OSError) -> bool:
    """accept() failed for want of descriptors or memory: the listener stays readable, so the
    caller must back off instead of retrying at loop speed. Other errors (ECONNABORTED...)
    concern one client that is already gone."""
    return exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)
