"""The zygote (`preload:`): imports the release once, then only forks the generation's workers.

    [on STANDBY=, before the import: fork the next zygote-to-be, standby.py]
    import the app -> look for what is unsafe to fork -> gc.freeze() -> READY=1
    -> on FORK=<id> (SLOT=, the worker's channel + stdout + stderr as SCM_RIGHTS):
       hand it to the spare, if one waits, and report FORKED=<id> PID=<the spare's pid>;
       otherwise fork an intermediate, which forks the worker, reports FORKED=<id> PID=<pid>
       and exits
    -> once no request came for SPARE_IDLE_S: fork the next spare (class Spare)

The master is the workers' parent and their only reaper: it is PR_SET_CHILD_SUBREAPER, so the
worker, orphaned when the intermediate exits, is re-parented to the master, never to the
zygote (docs/architecture.md, "Zygote", says why a double fork rather than CLONE_PARENT). The
zygote runs no thread and no event loop: each worker starts its own after the fork, in
serve(), exactly as a worker that imported the app itself.
"""
from __future__ import annotations

import array
import atexit
import ctypes
import gc
import importlib
import logging
import os
import select
import signal
import socket
import sys
import threading
import time
import traceback
from typing import Any, Callable, List, Optional, Tuple

from . import config, proctitle
from .contract import Env, Key, WorkerExit
from .lifecycle import fail
from .protocol import MAX_PACKET, Channel, decode, one_line

log = logging.getLogger("molt_shim")

PR_SET_PDEATHSIG = 1
FDS_PER_FORK = 3  # the worker's channel, stdout, stderr


def fork_hazards(cfg: config.WorkerConfig) -> List[str]:
    """What the import left behind that a fork would copy half-alive: threads (a fork keeps
    only the calling one, holding whatever locks the others held), sockets and event loops
    (every worker would share one connection or one epoll set). Android's zygote checks its
    fds against an allow-list before every fork for the same reason."""
    found: List[str] = []
    others = [t for t in threading.enumerate() if t is not threading.main_thread()]
    if others:
        found.append("%d thread(s) running (%s)" % (
            len(others), ", ".join(sorted(t.name for t in others))))
    try:
        tasks = len(os.listdir("/proc/self/task"))
    except OSError:
        tasks = 1
    native = tasks - 1 - len([t for t in others if t.is_alive()])
    if native > 0:
        found.append("%d thread(s) not started from Python (a C extension's)" % native)
    allowed = set(cfg.listen_fds) | {0, 1, 2, cfg.channel_fd}
    try:
        fds = sorted(int(name) for name in os.listdir("/proc/self/fd"))
    except OSError:
        fds = []
    for fd in fds:
        if fd in allowed:
            continue
        try:
            target = os.readlink("/proc/self/fd/%d" % fd)
        except OSError:
            continue  # the directory listing's own fd, already closed
        if target.startswith("socket:"):
            found.append("an open socket (fd %d: %s)" % (fd, describe_socket(fd)))
        elif target in ("anon_inode:[eventpoll]", "anon_inode:[eventfd]"):
            found.append("an event loop or its wake-up fd (fd %d: %s)" % (fd, target[11:-1]))
    return found


def describe_socket(fd: int) -> str:
    try:
        sock = socket.socket(fileno=os.dup(fd))
    except OSError as exc:
        return str(exc)
    try:
        kind = {socket.AF_INET: "tcp", socket.AF_INET6: "tcp6", socket.AF_UNIX: "unix"}.get(
            sock.family, str(sock.family))
        if sock.type == socket.SOCK_DGRAM:
            kind = kind.replace("tcp", "udp")
        parts = [kind]
        for name, get in (("local", sock.getsockname), ("peer", sock.getpeername)):
            try:
                address = get()
            except OSError:
                continue
            if address:
                parts.append("%s %s" % (name, address))
        return " ".join(parts)
    finally:
        sock.close()


def run(cfg: config.WorkerConfig, channel: Channel, import_app: Callable[[], Any],
        become_worker: Callable[..., int]) -> int:
    """The zygote's whole life. `become_worker(app, cfg, channel, before_ready)` is serve()
    for one worker."""
    proctitle.set_title("molt: zygote gen=%d" % cfg.generation, "molt g%d zygote" % cfg.generation)
    master = os.getppid()
    # ctypes is loaded before the first fork: each worker would otherwise pay for it.
    libc = ctypes.CDLL(None, use_errno=True)
    started = time.monotonic()
    # CPython's recipe for fork without exec (the gc module's docs): no collection in the
    # parent, so it leaves no freed holes that the children's allocations would fill (each
    # such write un-shares a page), and gc.freeze() right before forking. It also makes the
    # import itself faster: the collector's passes over a growing heap are a third of a large
    # app's import time (docs/architecture.md, "Preload: where the time goes").
    gc.disable()
    try:
        app = import_app()
    except BaseException as exc:  # SystemExit from an app module counts as a failed import too
        traceback.print_exc(file=sys.stderr)
        return fail(channel, WorkerExit.IMPORT_FAILED,
                    "%s (importing %s)" % (one_line(exc), cfg.app))
    import_what_warm_up_needs()
    import_what_workers_need(cfg)
    hazards = fork_hazards(cfg)
    if hazards:
        why = "the import of %s left %s" % (cfg.app, "; ".join(hazards))
        if cfg.preload == "auto":
            log.warning("preload: auto: not forking from a process where %s; every worker "
                        "imports the app itself (preload: true forks anyway)", why)
            channel.send(**{Key.PRELOAD_REFUSED: why})
            return WorkerExit.OK
        log.warning("preload: true: forking although %s; hooks.post_fork must replace them",
                    why)
    # Keep the collector off the shared pages: objects that exist now are never traversed
    # again, so a worker's collections do not dirty (and un-share) them. Each worker enables
    # the collector again right after the fork.
    gc.freeze()
    log.info("zygote: imported %s in %.0f ms; forking workers", cfg.app,
             (time.monotonic() - started) * 1000)
    channel.send(**{Key.READY: 1})
    return serve_forks(cfg, channel, master, libc,
                       lambda c, ch, adopted: become_worker(app, c, ch, adopted))


def import_what_warm_up_needs() -> None:
    """Django imports the URLconf, and through it every views module, on the first request:
    the zygote does it once, so the workers share those modules too. A failure is left to
    each worker's warm-up request, which reports it exactly as without preload."""
    if "django" not in sys.modules:
        return
    try:
        from django.conf import settings  # type: ignore

        if settings.configured:
            from django.urls import get_resolver  # type: ignore

            get_resolver().url_patterns
    except Exception as exc:
        log.debug("zygote: the URLconf did not import (%s); the warm-up will say why",
                  one_line(exc))


def import_shim_modules() -> None:
    """What a worker would otherwise load after the fork, in every worker, and that is the
    same for every release (so the standby, forked before the import, has it too): the
    native engine's extension (its dlopen() and relocations alone were ~900 page faults per
    worker, each one a private copy of a shared page), the trusted-proxy rule's module and
    the warm-up client. Loaded here, they are shared pages of the zygote."""
    from . import forwarded, warmup  # noqa: F401

    if (__package__ + ".engines.uvicorn_asgi" in sys.modules
            or __package__ + ".engines.native" in sys.modules):
        # The native engine runs in it; the ASGI engine runs its framing guard.
        from .engines.native import load_extension
        load_extension()  # a failure is each worker's to report, as without preload


def import_what_workers_need(cfg: config.WorkerConfig) -> None:
    """After the import, what every ASGI worker would load after the fork from the
    interpreter's path: the engine's parsers and loop module, and what uvicorn's
    Config.load() imports (its protocols, websockets and the lifespan: 40 modules).
    Imported, not run: no loop and no fd exists until the worker makes its own after the
    fork."""
    if __package__ + ".engines.uvicorn_asgi" not in sys.modules:
        return
    wanted = ["httptools", "h11", "uvicorn.protocols.http.auto",
              "uvicorn.protocols.websockets.auto", "uvicorn.lifespan.on"]
    if str(cfg.asgi.get("loop") or "auto") in ("auto", "uvloop"):
        wanted.append("uvloop")
    for name in wanted:
        try:
            importlib.import_module(name)
        except Exception:  # noqa: BLE001 - the worker says so, exactly as without preload
            pass


# Intermediates the zygote reaps itself: the standby's (standby.py), if one was forked before
# the import, and, in a zygote with another thread alive, every one (serve_forks()).
intermediates: List[int] = []
Fork = Tuple[str, int, List[int]]  # a fork request: its id, the slot, the worker's 3 fds
EMPTY = (b"", [])  # what receive() gives when nothing is queued (non-blocking)


def receive(sock: socket.socket, block: bool) -> Optional[Tuple[bytes, List[int]]]:
    """One packet and the fds attached to it; EMPTY when `block` is off and none is queued;
    None once the master is gone."""
    fds = array.array("i")
    try:
        data, ancdata, _flags, _addr = sock.recvmsg(
            MAX_PACKET, socket.CMSG_SPACE(FDS_PER_FORK * fds.itemsize),
            0 if block else socket.MSG_DONTWAIT)
    except BlockingIOError:
        return EMPTY
    except OSError:
        return None
    for level, kind, payload in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(payload[: len(payload) - (len(payload) % fds.itemsize)])
    if not data:
        for fd in fds:
            os.close(fd)
        return None
    return data, list(fds)


def serve_forks(cfg: config.WorkerConfig, channel: Channel, master: int, libc: Any,
                become_worker: Callable[..., int]) -> int:
    """Wait for fork requests; answer every request queued at that moment with one fork of an
    intermediate, which forks all of their workers (a generation's start asks for all its
    slots at once).

    Between requests the zygote sleeps: every page it writes once it has forked is a page its
    children keep a private copy of (the spare's cost, in docs/architecture.md). So nothing
    wakes it but the master: the spare says nothing to it (Spare), and the kernel reaps its
    intermediates, because the zygote ignores SIGCHLD. Each intermediate sets it back to the
    default before it forks (Forks.intermediate(), fork_spare()), so the workers' exits still
    reach the master, their subreaper, and the app's own children are waited for as usual.
    Not with another thread alive (preload: true over a fork hazard): that thread may wait for
    children of its own, so the zygote reaps its intermediates itself, within REAP_S."""
    sock = channel.sock
    if sock is None:
        return WorkerExit.OK
    sock.setblocking(True)
    kernel_reaps = Forks.single_threaded()
    if kernel_reaps:
        signal.signal(signal.SIGCHLD, signal.SIG_IGN)
    spare = Spare(channel)
    while True:
        reap(intermediates)
        wait = spare.wait_s(time.monotonic())
        if intermediates:
            wait = REAP_S if wait is None else min(wait, REAP_S)
        readable = select.select([sock], [], [], wait)[0]
        if not readable:
            if spare.is_due(time.monotonic()):
                intermediate = spare.fork(cfg, channel, master, libc, become_worker)
                if intermediate and not kernel_reaps:
                    intermediates.append(intermediate)
            continue
        batch: List[Fork] = []
        got = receive(sock, block=True)
        while got is not None and got is not EMPTY:
            data, fds = got
            message = decode(data)
            request = message.get(Key.FORK, "")
            if Key.STANDBY in message:  # too late: this process has imported its release
                close_all(fds)
                channel.send(**{Key.STANDBY_ERROR: "asked after the zygote's import"})
            elif not request:
                close_all(fds)
            elif len(fds) != FDS_PER_FORK:
                close_all(fds)
                channel.send(**{Key.FORKED: request,
                                Key.FORK_ERROR: "expected %d fds, got %d" % (FDS_PER_FORK,
                                                                              len(fds))})
            else:
                slot = int(message.get(Key.SLOT, "0") or 0)
                handed_to = spare.hand(data, fds) if not batch else 0
                if handed_to:
                    close_all(fds)  # the spare has its own copies now
                    channel.send(**{Key.FORKED: request, Key.PID: handed_to})
                else:
                    batch.append((request, slot, fds))
            got = receive(sock, block=False)
        try:
            if batch:
                intermediate = fork_workers(cfg, channel, master, libc, batch, become_worker,
                                            spare)
                if intermediate and not kernel_reaps:
                    intermediates.append(intermediate)
        finally:
            for _request, _slot, fds in batch:
                close_all(fds)
        spare.after_requests(time.monotonic())
        if got is None:
            return WorkerExit.OK  # the master is gone: so is the generation


REAP_S = 0.05  # how soon an intermediate the zygote reaps itself is reaped


def reap(intermediates: List[int]) -> None:
    for pid in list(intermediates):
        try:
            done, _status = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            done = pid
        if done:
            intermediates.remove(pid)


def close_all(fds: List[int]) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass
    fds.clear()


def fork_workers(cfg: config.WorkerConfig, channel: Channel, master: int, libc: Any,
                 batch: List[Fork], become_worker: Callable[..., int], spare: "Spare") -> int:
    """Fork the intermediate, which forks one worker per request, says each pid and exits at
    once, so that the workers are re-parented to the master (the subreaper). Returns the
    intermediate's pid (0 when it could not be forked: every request got FORK_ERROR)."""
    for stream in (sys.stdout, sys.stderr):  # nothing buffered may be written twice
        stream.flush()
    forks = Forks()
    try:
        intermediate = forks.intermediate()
    except OSError as exc:
        for request, _slot, _fds in batch:
            channel.send(**{Key.FORKED: request,
                            Key.FORK_ERROR: "fork() failed: %s" % exc.strerror})
        return 0
    if intermediate != 0:
        return intermediate
    try:
        spare.close_copy()  # the zygote's end of its spare's socket is not the workers' to hold
        for n, (request, slot, fds) in enumerate(batch):
            try:
                pid = forks.child()
            except OSError as exc:
                channel.send(**{Key.FORKED: request,
                                Key.FORK_ERROR: "fork() failed: %s" % exc.strerror})
                continue
            if pid == 0:
                for _other, _slot, theirs in batch[n + 1:]:  # later workers' ends
                    close_all(theirs)
                be_worker(cfg, channel, master, libc, slot, fds, become_worker)
            close_all(fds)  # this worker has them; later workers must not
            if not channel.send(**{Key.FORKED: request, Key.PID: pid}) and channel.peer_closed:
                break  # the master no longer reads this zygote (it died): fork no more
    finally:
        return_to_exit(0)
    return 0  # not reached


def be_worker(cfg: config.WorkerConfig, channel: Channel, master: int, libc: Any, slot: int,
              fds: List[int], become_worker: Callable[..., int]) -> None:
    """In a forked worker, after the interpreter's after-fork work: its whole life, then exit
    (never returns)."""
    try:
        code = worker_main(cfg, channel, master, libc, slot, fds, become_worker)
    except BaseException:
        traceback.print_exc(file=sys.stderr)
        code = 1
    try:
        atexit._run_exitfuncs()  # what finish_process() does for any worker
    except Exception:
        pass
    return_to_exit(code)


SPARE_IDLE_S = 0.1  # a new spare is forked once no fork request came for this long


class Spare:
    """The next worker, forked before anyone asks for it (the zygote's side of it).

    A fork request used to wait for the double fork: the zygote forks an intermediate, which
    forks the worker, and each fork copies the page tables of a process that holds the whole
    release (7 ms each for the bench's 100 MiB app here). A crashed, hung or recycled
    worker's replacement waited for both before its own boot began. So once no request has
    come for SPARE_IDLE_S the zygote forks one worker-to-be ahead, with the same double fork:
    the spare. It is adopted by the master like any worker and waits on its socket pair with
    the zygote, stopped between the fork and the interpreter's after-fork work (Forks). Both
    forks and the wait are C (_molt_native.fork_spare): no Python runs in the spare until it
    is used, so it writes almost no page and costs the tree almost no memory (as Python code,
    each object it touched was a page copied: about 1 MiB). The zygote hands it the next
    request's fds and answers FORKED= with its pid; it runs the after-fork work and becomes
    that worker, exactly as a freshly forked one does (be_worker).

    The zygote is not woken for it, since what the zygote writes after the fork the spare
    keeps the originals of: the intermediate tells the master (SPARE_PID=) and leaves the pid
    on the pair, which the zygote reads at the next request. A spare that died while it
    waited (its end of the pair closed) is found then, when the hand-over fails: that request
    is forked as before, and the next spare follows it. The master, which reaps the spare,
    stops showing it at once.

    One at a time, only where the native extension is loaded (the native engine, ASGI), and
    only when the zygote runs no other thread (Forks.raw): holding the before-fork state needs
    that. When the zygote dies, its end of the pair closes and a waiting spare exits; the
    workers forked from the zygote close their copy of that end (close_copy())."""

    def __init__(self, channel: Channel) -> None:
        self.channel = channel
        self.sock: Optional[socket.socket] = None  # the zygote's end of the pair
        self.due: Optional[float] = time.monotonic() + SPARE_IDLE_S

    def wait_s(self, now: float) -> Optional[float]:
        """How long the zygote may wait for a request before the next spare is due."""
        if self.sock is not None or self.due is None:
            return None
        return max(0.0, self.due - now)

    def is_due(self, now: float) -> bool:
        return self.sock is None and self.due is not None and now >= self.due

    def after_requests(self, now: float) -> None:
        """Requests were just answered: the next spare waits until they have been quiet."""
        if self.sock is None:
            self.due = now + SPARE_IDLE_S

    def hand(self, data: bytes, fds: List[int]) -> int:
        """Give a fork request (the packet and its fds) to the waiting spare. Its pid, or 0
        when none is waiting (the caller forks the request as before)."""
        if self.sock is None:
            return 0
        got = receive(self.sock, block=False)  # its pid, from the intermediate
        if got is EMPTY:
            return 0  # its intermediate is still forking it: it may take the next request
        if got is None:  # the intermediate could not fork it (the master never heard of it)
            log.warning("zygote: the spare worker could not be forked; this request is "
                        "forked as before")
            self.close_copy()
            return 0
        pid = int(got[0])
        try:
            self.sock.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                                        array.array("i", fds))], socket.MSG_NOSIGNAL)
        except OSError:  # it died while it waited (the master has reaped it)
            log.info("zygote: the spare worker (pid %d) is gone; this request is forked as "
                     "before", pid)
            pid = 0
        self.channel.send(**{Key.SPARE_PID: 0})  # no spare waits now
        self.close_copy()
        return pid

    def close_copy(self) -> None:
        """Also in a forked process, which must not hold the zygote's end open."""
        if self.sock is not None:
            self.sock.close()
        self.sock = None

    def fork(self, cfg: config.WorkerConfig, channel: Channel, master: int, libc: Any,
             become_worker: Callable[..., int]) -> int:
        """In the zygote: fork the intermediate that forks the spare. The intermediate's pid
        (0: no spare, and none is tried again until the next request). In the spare, once it
        is handed a request: be that worker (never returns)."""
        self.due = None
        native = sys.modules.get("_molt_native")
        if native is None or not Forks.single_threaded():
            return 0
        pair: List[socket.socket] = []
        try:
            pair = list(socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET))
            ours, theirs = pair
            for stream in (sys.stdout, sys.stderr):  # nothing buffered may be written twice
                stream.flush()
            got = native.fork_spare(theirs.fileno(), ours.fileno(), channel.fileno(), master,
                                    "molt g%d spare" % cfg.generation)
        except OSError as exc:  # no fd or no process left: the requests are forked as before
            for end in pair:
                end.close()
            log.warning("zygote: could not fork a spare worker: %s", exc.strerror or exc)
            return 0
        if isinstance(got, int):
            theirs.close()
            self.sock = ours
            return got
        try:  # the spare, handed a request; it closed both ends in C (fork_spare)
            ours.detach()
            theirs.detach()
            data, fds = got
            if len(fds) == FDS_PER_FORK:
                slot = int(decode(data).get(Key.SLOT, "0") or 0)
                be_worker(cfg, channel, master, libc, slot, fds, become_worker)
            close_all(fds)
        finally:
            return_to_exit(1)  # whatever escapes, never back into the zygote's loop
        return 0  # not reached


class Forks:
    """The two forks of a double fork: the zygote's of the intermediate, the intermediate's
    of each child (a batch's workers, or the standby), with the interpreter's fork work done
    once per child instead of twice.

    os.fork() runs PyOS_BeforeFork (the registered `before` hooks, the import lock) in the
    parent and, in the child, PyOS_AfterFork_Child: the GIL and thread states made anew, then
    every `after_in_child` hook (threading's bookkeeping, random's reseed, logging's and
    concurrent.futures' locks). That child work allocates and writes shared pages, ~230
    copy-on-write faults, about 6 ms here, and the intermediate, which only forks and exits,
    paid it for nothing on every respawn and every HUP. So when the zygote runs no other
    thread: the zygote runs the `before` side and forks the intermediate with libc's fork();
    the intermediate inherits the interpreter exactly as it is between before and after, forks
    each child the same way, and each child runs PyOS_AfterFork_Child itself, so it ends up as
    after os.fork(). With another thread alive (preload: true over fork hazards) both are
    os.fork()."""

    def __init__(self) -> None:
        self.raw = Forks.single_threaded()
        self.api = ctypes.PyDLL(None, use_errno=True) if self.raw else None  # the GIL held

    @staticmethod
    def single_threaded() -> bool:
        """No other thread, Python's or native: the before-fork state may be held."""
        return threading.active_count() == 1 and len(os.listdir("/proc/self/task")) == 1

    def _fork(self) -> int:
        pid = self.api.fork()
        if pid < 0:
            errno = ctypes.get_errno()
            raise OSError(errno, os.strerror(errno))
        return pid

    def intermediate(self) -> int:
        if not self.raw:
            pid = os.fork()
        else:
            self.api.PyOS_BeforeFork()
            pid = -1
            try:
                pid = self._fork()
            finally:
                if pid != 0:  # the zygote, whether or not the fork failed
                    self.api.PyOS_AfterFork_Parent()
        if pid == 0:
            # The zygote ignores SIGCHLD (serve_forks()); a process that does has its children
            # reaped by the kernel, and a worker that died before this intermediate exited
            # would never reach the master. Its children inherit the default from here.
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        return pid

    def child(self) -> int:
        """In the intermediate."""
        if not self.raw:
            return os.fork()
        pid = self._fork()
        if pid == 0:
            self.api.PyOS_AfterFork_Child()
        return pid


def return_to_exit(code: int) -> None:
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:
            pass
    os._exit(code)


def worker_main(cfg: config.WorkerConfig, channel: Channel, master: int, libc: Any, slot: int,
                fds: List[int], become_worker: Callable[..., int]) -> int:
    """In the forked worker: take the fds the master made for it to the contract positions
    and become an ordinary worker. It makes sure it is the master's child only just before
    READY (see adopted_by): the intermediate may still be forking the batch's other workers."""
    gc.enable()  # the zygote's import ran without the collector (see run())
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)  # the OS has it; Python's table too now
    if channel.sock is not None:
        channel.sock.detach()  # the zygote's channel fd number is reused just below
    channel_fd, out_fd, err_fd = fds
    os.dup2(channel_fd, cfg.channel_fd)
    os.dup2(out_fd, 1)
    os.dup2(err_fd, 2)
    close_all(fds)
    os.environ[Env.WORKER] = str(slot)
    os.environ.pop(Env.ZYGOTE, None)
    cfg.raw["worker"] = slot
    title = "molt: worker gen=%d slot=%d" % (cfg.generation, slot)
    proctitle.set_title(title, "molt g%d s%d" % (cfg.generation, slot))
    return become_worker(cfg, Channel(cfg.channel_fd), lambda: adopted_by(master, libc))


def adopted_by(master: int, libc: Any) -> bool:
    """Wait to be the master's child (the intermediate has exited), then ask to die with it.
    The parent-death signal is bound to the parent at the time it is set, so it can only be
    set now. False: the master is gone (or is no subreaper), nobody would supervise us."""
    parent = os.getppid()
    if parent not in (master, 1):
        # The intermediate: its pidfd turns readable once it has exited, and by then its
        # children are re-parented (the kernel does that first), so nothing spins here.
        try:
            pidfd = os.pidfd_open(parent)
        except (OSError, AttributeError):  # gone already, or no pidfd (Linux < 5.3)
            pidfd = -1
        if pidfd >= 0:
            try:
                select.select([pidfd], [], [], 10.0)
            finally:
                os.close(pidfd)
        else:
            deadline = time.monotonic() + 10.0
            while os.getppid() == parent and time.monotonic() < deadline:
                time.sleep(0.0002)
    # Re-parented to anyone but the master (it died meanwhile, and an outer subreaper or init
    # took us): nobody's worker.
    if os.getppid() != master:
        return False
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    return os.getppid() == master
