"""The standby: the next generation's zygote, forked by this one before its import.

Starting an interpreter and importing the shim (and the native engine's extension) is most of
what a hello-world rollover costs, and none of it depends on the release. So a zygote, asked
with STANDBY= before it imports its release, forks a copy of itself at that point, which
waits. On the next HUP, when the new zygote's launch would be the same (interpreter,
arguments, user, environment apart from molt's per-generation variables: the master decides,
loop/standby.cpp), the master sends it START= instead of starting an interpreter, and it
boots on as that generation's zygote:

    zygote N: config, engine module, extension -> [STANDBY=: fork the standby] -> import N
    standby:  adopted by the master -> wait for START= -> chdir, environment -> boot as zygote N+1

It shares the pages it holds with zygote N and N's workers; it costs the tree the pages that
zygote N writes after the fork, which only the standby then holds in their old form (about
3 MiB; `preload_standby: false` turns it off; docs/architecture.md, "The standby"). It is
forked like a worker (an intermediate that exits,
so the master, the subreaper, is its parent and reaper), holds the fds the master sent with
the request, and dies with the master (PR_SET_PDEATHSIG) or when its channel closes.
"""
from __future__ import annotations

import ctypes
import importlib
import json
import os
import socket
import sys
from typing import Any, Dict, List

from . import proctitle
from .contract import Key, WorkerExit
from .lifecycle import fail
from .protocol import Channel, decode
from .zygote import (EMPTY, FDS_PER_FORK, Forks, adopted_by, close_all, intermediates,
                     receive, return_to_exit)


def fork_if_asked(channel: Channel) -> bool:
    """In a zygote before its import: if the master's STANDBY= request is queued, fork the
    standby. True in the standby once START= has set it up as the next zygote (its caller
    boots again from the top); False in the zygote."""
    sock = channel.sock
    if sock is None:
        return False
    got = receive(sock, block=False)
    if got is None or got is EMPTY:
        return False  # none asked (or the master is gone: the zygote's own loop sees it)
    data, fds = got
    if Key.STANDBY not in decode(data):
        close_all(fds)
        return False
    if len(fds) != FDS_PER_FORK:
        close_all(fds)
        channel.send(**{Key.STANDBY_ERROR: "expected %d fds, got %d" % (FDS_PER_FORK, len(fds))})
        return False
    mine = from_the_release()
    if mine:
        close_all(fds)
        channel.send(**{Key.STANDBY_ERROR: "modules imported before the app came from the "
                        "release directory (%s): the next release must import its own"
                        % ", ".join(mine[:5])})
        return False
    master = os.getppid()
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    try:
        forks = Forks()  # the workers' double fork (zygote.py), its interpreter work once
        intermediate = forks.intermediate()
    except OSError as exc:
        close_all(fds)
        channel.send(**{Key.STANDBY_ERROR: "fork() failed: %s" % exc.strerror})
        return False
    if intermediate != 0:
        close_all(fds)
        intermediates.append(intermediate)  # reaped in serve_forks(), or by the kernel
        return False
    pid = -1  # the intermediate: fork the standby, say its pid, exit whatever happens
    try:
        pid = forks.child()
        if pid > 0:
            channel.send(**{Key.STANDBY_PID: pid})
    except OSError as exc:
        channel.send(**{Key.STANDBY_ERROR: "fork() failed: %s" % exc.strerror})
    finally:
        if pid != 0:  # not the standby
            return_to_exit(0)
    return wait_for_start(channel, master, fds)


def from_the_release() -> List[str]:
    """Modules loaded so far from the working directory, the release (`python -m` put it
    first on sys.path): a release that ships its own copy of the engine's server library,
    say. A standby would carry them into the next release, so none is forked."""
    here = os.path.realpath(os.getcwd()) + os.sep
    found = []
    for name, module in list(sys.modules.items()):
        where = getattr(module, "__file__", None)
        if where and real_path(where).startswith(here):
            found.append(name)
    return sorted(found)


# Absolute module file -> its real path. A zygote fills it when it checks its modules before
# forking the standby, so the standby inherits it (and adds what it loads while it waits for
# START=): its own check as the next zygote then makes no system call on the HUP's path (it was
# ~250 realpath() calls, 6 ms, between START= and the import). A relative path is resolved
# each time (it depends on the working directory, which START= changes).
resolved_files: Dict[str, str] = {}


def real_path(where: str) -> str:
    if not os.path.isabs(where):
        return os.path.realpath(where)
    real = resolved_files.get(where)
    if real is None:
        real = resolved_files[where] = os.path.realpath(where)
    return real


def resolve_module_files() -> None:
    for module in list(sys.modules.values()):
        where = getattr(module, "__file__", None)
        if where and os.path.isabs(where):
            real_path(where)


def wait_for_start(channel: Channel, master: int, fds: List[int]) -> bool:
    """In the standby: take the fds the master sent to the contract's positions, wait to be
    the master's child, then for START=. Exits when the master closes the channel."""
    channel_fd = channel.fileno()
    if channel.sock is not None:
        channel.sock.detach()  # the zygote's channel fd number is the standby's own now
    own_channel, out_fd, err_fd = fds
    os.dup2(own_channel, channel_fd)
    os.dup2(out_fd, 1)
    os.dup2(err_fd, 2)
    close_all(fds)
    proctitle.set_title("molt: standby", "molt standby")
    libc = ctypes.CDLL(None, use_errno=True)
    if not adopted_by(master, libc):
        return_to_exit(0)
    resolve_module_files()  # what is not cached yet, while nothing waits for us (resolved_files)
    sock = socket.socket(fileno=channel_fd)
    sock.setblocking(True)
    while True:
        got = receive(sock, block=True)
        if got is None:
            return_to_exit(0)  # the master is gone, or did not need us
        data, received = got
        close_all(received)
        start = decode(data).get(Key.START)
        if start is not None:
            break
    sock.detach()  # boot() wraps the same fd in its own Channel
    try:
        error = take_release(json.loads(start))
    except (ValueError, AttributeError) as exc:
        error = "bad %s= message: %s" % (Key.START, exc)
    if error:
        return_to_exit(fail(Channel(channel_fd), WorkerExit.IMPORT_FAILED, error))
    return True


def take_release(start: Dict[str, Any]) -> str:
    """What the new zygote's own spawn would have given it: its directory (the release's, as
    `python -m` puts the working directory first on sys.path) and its environment (molt's
    per-generation variables; everything else the master found equal, or it would not have
    used the standby)."""
    try:
        old = os.getcwd()
    except OSError:  # deleted since the standby started in it (an old release pruned, a
        old = sys.path[0] if sys.path else ""  # directory replaced in place): its path then
    cwd = str(start.get("cwd") or old)
    for name in start.get("drop") or []:
        os.environ.pop(str(name), None)
    for name, value in (start.get("env") or {}).items():
        os.environ[str(name)] = str(value)
    try:
        os.chdir(cwd)
    except OSError as exc:  # what a spawn into that directory would have failed with
        return "chdir %s: %s" % (cwd, exc.strerror)
    if sys.path and sys.path[0] == old:
        sys.path[0] = cwd
    sys.path_importer_cache.pop(old, None)
    importlib.invalidate_caches()
    return ""
