"""The extension's IoHub and IoTransport (worker_shim/native/asgi_io.cpp) against the asyncio
transport contract, in this process, on a real loop and real loopback sockets. The ASGI suite
(test_asgi.py and the HTTP tables) runs the worker's own protocols on it; these pin down what
those protocols only rely on in passing."""
import asyncio
import contextvars
import importlib.util
import os
import socket
import struct
import subprocess
import sys
import threading
import time

import pytest

from harness import HAVE_NATIVE, HUB_READS, HUB_SENDS, NATIVE_DIR, NATIVE_PRELOAD

pytestmark = [pytest.mark.timeout(30),
              pytest.mark.skipif(not HAVE_NATIVE or bool(NATIVE_PRELOAD),
                                 reason="needs the extension, unsanitized, in this process")]


def extension():
    spec = importlib.util.spec_from_file_location(
        "_molt_native", os.path.join(NATIVE_DIR, "_molt_native.abi3.so"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class Recorder(asyncio.Protocol):
    """Notes every call a transport makes; `on_data(protocol, data)` may act on the
    transport from inside data_received."""

    def __init__(self, on_data=None):
        self.calls = []
        self.transport = None
        self.on_data = on_data
        self.lost = asyncio.get_event_loop().create_future()

    def connection_made(self, transport):
        self.calls.append("made")
        self.transport = transport

    def data_received(self, data):
        if self.on_data is not None:
            self.on_data(self, data)

    def eof_received(self):
        self.calls.append("eof")

    def pause_writing(self):
        self.calls.append(("pause", self.transport.get_write_buffer_size()))

    def resume_writing(self):
        self.calls.append(("resume", self.transport.get_write_buffer_size()))

    def connection_lost(self, exc):
        self.calls.append(("lost", exc))
        if not self.lost.done():
            self.lost.set_result(exc)


def serve(protocol_factory, client, timeout=10.0, new_loop=asyncio.new_event_loop,
          io_uring=True, hubs=None):
    """Runs a loop with an IoHub on a fresh listener; `client(port)` runs in a thread; returns
    once it has and every protocol made has lost its connection. io_uring: whether the hub may
    send its held writes in one io_uring submit; the hub is appended to `hubs`."""
    loop = new_loop()
    made = []
    failures = []
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(128)
    listener.setblocking(False)
    port = listener.getsockname()[1]

    def report(message, exc, protocol, transport):
        failures.append((message, exc))

    hub = extension().io_hub(loop, report, lambda fd, exc: failures.append(exc), -1, 0,
                             io_uring)
    if hubs is not None:
        hubs.append(hub)

    def factory():
        protocol = protocol_factory()
        made.append(protocol)
        return protocol

    async def main():
        hub.listen(listener.fileno(), factory, listener.getsockname(), False)
        loop.add_reader(hub.fileno(), hub.poll)
        if hub.reads_fileno() >= 0:
            loop.add_reader(hub.reads_fileno(), hub.reap)
        done = loop.run_in_executor(None, client, port)
        await asyncio.wait_for(done, timeout)
        for protocol in made:
            await asyncio.wait_for(protocol.lost, timeout)
        loop.remove_reader(hub.fileno())
        if hub.reads_fileno() >= 0:
            loop.remove_reader(hub.reads_fileno())
        return done.result()

    try:
        asyncio.set_event_loop(loop)
        result = loop.run_until_complete(main())
    finally:
        asyncio.set_event_loop(None)
        loop.close()
        listener.close()
    assert failures == []
    return made, result


def test_connection_lost_goes_to_the_protocol_set_after_a_close():
    """uvicorn's WebSocket upgrade feeds the new protocol the handshake, then set_protocol()s
    it; a handshake the library refuses closes the transport while it is fed. The new
    protocol must hear connection_lost(), once, and the old one not at all."""
    second = []

    def close_then_hand_over(protocol, data):
        protocol.transport.write(b"HTTP/1.1 400 Bad Request\r\n\r\n")
        protocol.transport.close()
        successor = Recorder()
        successor.lost = protocol.lost  # serve() waits on the first protocol's
        second.append(successor)
        protocol.transport.set_protocol(successor)

    def client(port):
        with socket.create_connection(("127.0.0.1", port)) as s:
            s.sendall(b"GET /ws HTTP/1.1\r\n\r\n")
            return s.recv(100)

    made, answer = serve(lambda: Recorder(on_data=close_then_hand_over), client)
    assert answer == b"HTTP/1.1 400 Bad Request\r\n\r\n"
    assert made[0].calls == ["made"], made[0].calls
    assert second[0].calls == [("lost", None)], second[0].calls


@pytest.mark.parametrize("shape", ["one write", "held head, then one write", "small writes"])
def test_flow_control_resumes_at_the_low_water_mark_and_delivers_every_byte(shape):
    """Writes far over the high-water mark (and over what the kernel buffers for a client with
    a small receive buffer): the protocol is paused, resumed once what waits is at or under the
    low-water mark (a quarter of 64 KiB), and the client gets every byte in order. As one
    write; behind a small write the hub holds to the end of the loop iteration (sent first, the
    large one then at once); and as many small writes, held, then over the mark."""
    payload = bytes(range(256)) * 65536  # 16 MiB: more than the kernel buffers on loopback

    def write_it(protocol, data):
        if shape == "one write":
            protocol.transport.write(payload)
        elif shape == "held head, then one write":
            protocol.transport.write(payload[:100])
            protocol.transport.write(payload[100:])
        else:
            for i in range(0, len(payload), 4096):
                protocol.transport.write(payload[i:i + 4096])
        protocol.transport.close()

    def client(port):
        got = bytearray()
        with socket.socket() as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16384)  # before the handshake
            s.connect(("127.0.0.1", port))
            s.sendall(b"go")
            while True:
                chunk = s.recv(8192)
                if not chunk:
                    break
                got += chunk
        return bytes(got)

    made, got = serve(lambda: Recorder(on_data=write_it), client)
    assert got == payload
    calls = made[0].calls
    pauses = [c for c in calls if c[0] == "pause"]
    resumes = [c for c in calls if c[0] == "resume"]
    assert pauses and pauses[0][1] > 64 * 1024, calls
    assert resumes and all(size <= 16 * 1024 for _, size in resumes), calls
    assert calls[-1] == ("lost", None) and calls.count(("lost", None)) == 1, calls


def test_the_types_are_made_by_the_hub_only():
    module = extension()
    loop = asyncio.new_event_loop()
    try:
        hub_type = type(module.io_hub(loop, lambda *a: None, lambda *a: None))
    finally:
        loop.close()
    with pytest.raises(TypeError, match="made by _molt_native.io_hub"):
        hub_type()


@pytest.mark.parametrize("io_uring", [True, False], ids=["ring", "loop"])
def test_a_kept_alive_connection_moves_to_the_loop_and_keeps_every_rule(io_uring):
    """After a few reads a connection is read by the hub's RecvRing (a multishot recv, where
    the kernel allows) or watched by the loop's own epoll (the hub keeps only its EPOLLOUT):
    reads, pause and resume (bytes that come while paused are handed over after the resume),
    a large write and the peer's FIN must work there as on the hub, and the FIN is heard
    once."""
    loop_fds = []  # how many descriptors the loop watches at each request
    payload = bytes(range(256)) * 4096  # 1 MiB: over the high-water mark, waits for EPOLLOUT

    def answer(protocol, data):
        transport = protocol.transport
        loop_fds.append(len(asyncio.get_event_loop()._selector.get_map()))
        if data == b"pause":
            transport.pause_reading()
            transport.write(b"paused")
            asyncio.get_event_loop().call_later(0.3, transport.resume_reading)
        elif data == b"big":
            transport.write(payload)
        else:
            transport.write(b"re:" + data)

    def recv_exactly(s, n):
        got = b""
        while len(got) < n:
            chunk = s.recv(n - len(got))
            assert chunk, got
            got += chunk
        return got

    def client(port):
        with socket.create_connection(("127.0.0.1", port)) as s:
            s.settimeout(10)
            for i in range(8):
                s.sendall(b"%d" % i)
                assert recv_exactly(s, 4) == b"re:%d" % i
            s.sendall(b"pause")
            assert recv_exactly(s, 6) == b"paused"
            s.sendall(b"x")  # arrives while reading is paused: read after the resume
            assert recv_exactly(s, 4) == b"re:x"
            s.sendall(b"big")
            assert recv_exactly(s, len(payload)) == payload
            s.shutdown(socket.SHUT_WR)
            return s.recv(10)  # the server closes after the FIN: b""

    hubs = []
    made, tail = serve(lambda: Recorder(on_data=answer), client, io_uring=io_uring, hubs=hubs)
    assert tail == b""
    if hubs[0].reads() == "io_uring":
        assert io_uring and HUB_SENDS == "io_uring"
        # Its own waker, the hub's and the ring's: the connection is never the loop's.
        assert loop_fds[-1] == loop_fds[0], loop_fds
    else:
        # Its own waker and the hub's; then this connection's too, from the move on.
        assert loop_fds[-1] == loop_fds[0] + 1, loop_fds
    calls = made[0].calls
    assert calls.count("eof") == 1 and calls[-1] == ("lost", None), calls


def ping_pong(s, count):
    for i in range(count):
        s.sendall(b"%d" % i)
        assert s.recv(100) == b"re:%d" % i


WHO = contextvars.ContextVar("who")
SET_AT_IMPORT = contextvars.ContextVar("set_at_import")


@pytest.mark.parametrize("requests_before", [1, 6], ids=["on-the-hub", "on-the-loop"])
def test_reads_after_a_resume_from_an_apps_task_do_not_run_in_its_context(requests_before):
    """resume_reading() called from a task (an app's receive() after a large body) must not
    hand that task's context variables to the connection's later reads, and so to the tasks
    of its later requests; and every read, on the hub or on the loop, sees what the worker's
    context held when the hub was made (an app's module may set a variable as it is
    imported)."""
    seen = []

    def answer(protocol, data):
        seen.append((data, WHO.get(None), SET_AT_IMPORT.get(None)))
        if data == b"pause":
            protocol.transport.pause_reading()

            async def resume_from_a_request():
                WHO.set("request 1")
                await asyncio.sleep(0.2)
                protocol.transport.resume_reading()

            asyncio.get_event_loop().create_task(resume_from_a_request())
        protocol.transport.write(b"re:" + data)

    def client(port):
        with socket.create_connection(("127.0.0.1", port)) as s:
            s.settimeout(10)
            ping_pong(s, requests_before)
            s.sendall(b"pause")
            assert s.recv(100) == b"re:pause"
            s.sendall(b"after")
            assert s.recv(100) == b"re:after"
            ping_pong(s, 2)

    token = SET_AT_IMPORT.set("worker")
    try:
        serve(lambda: Recorder(on_data=answer), client)
    finally:
        SET_AT_IMPORT.reset(token)
    assert all(who is None and base == "worker" for _, who, base in seen), seen


@pytest.mark.skipif(importlib.util.find_spec("uvloop") is None, reason="no uvloop")
@pytest.mark.parametrize("paused", [False, True], ids=["reading", "paused"])
def test_a_reset_behind_unread_bytes_ends_a_connection_the_loop_watches(paused):
    """On uvloop, the loop's reader stops silently at an error on its descriptor, after one
    read that takes the bytes queued before the reset: the hub reads such a connection to the
    end (while reading is paused, from the resume on), so its protocol hears the reset."""
    import uvloop

    def answer(protocol, data):
        if data == b"unread":
            return  # a body the app has not answered yet: no write finds the reset either
        protocol.transport.write(b"re:" + data)
        if data == b"stall":
            if paused:  # the reset comes while reading is paused (a pipelined request ...)
                protocol.transport.pause_reading()
                asyncio.get_event_loop().call_later(0.5, protocol.transport.resume_reading)
            else:  # the loop is busy while the bytes and the reset arrive: after the reply, held
                # to the end of the loop iteration, has gone (send_held was scheduled first)
                asyncio.get_event_loop().call_soon(time.sleep, 0.3)

    def client(port):
        with socket.create_connection(("127.0.0.1", port)) as s:
            s.settimeout(10)
            ping_pong(s, 6)
            s.sendall(b"stall")
            assert s.recv(100) == b"re:stall"
            s.sendall(b"unread")
            time.sleep(0.1)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        # closed with a reset (SO_LINGER 0)

    made, _ = serve(lambda: Recorder(on_data=answer), client, new_loop=uvloop.new_event_loop)
    calls = made[0].calls
    assert isinstance(calls[-1][1], ConnectionResetError), calls


class Suspends:
    """An awaitable that suspends once (what a future does until it is done)."""

    def __await__(self):
        yield None


def test_the_suspend_hook_runs_a_coroutine_and_calls_back_at_each_suspension():
    hook_of = extension().suspend_hook
    seen = []

    async def app():
        seen.append(("running", hook.running))
        await Suspends()
        await asyncio.sleep(0)
        return 42

    async def main():
        nonlocal hook
        hook = hook_of(app(), lambda: seen.append(("suspended", hook.running)))
        return await hook

    hook = None
    assert asyncio.run(main()) == 42
    assert seen == [("running", True), ("suspended", False), ("suspended", False)], seen
    assert not hook.running


def test_the_suspend_hook_passes_exceptions_cancels_and_closes_through():
    hook_of = extension().suspend_hook
    ended = []

    async def raises():
        await asyncio.sleep(0)
        raise KeyError("app")

    async def waits_for_ever():
        try:
            await asyncio.sleep(3600)
        finally:
            ended.append("finally")

    async def main():
        with pytest.raises(KeyError, match="app"):
            await hook_of(raises(), lambda: None)
        task = asyncio.get_running_loop().create_task(
            _await(hook_of(waits_for_ever(), lambda: None)))
        await asyncio.sleep(0)  # the task has run its first step: it waits in the sleep
        assert ended == []
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert ended == ["finally"]
        unfinished = hook_of(waits_for_ever(), lambda: None)
        assert unfinished.send(None) is not None  # suspended in the sleep
        unfinished.close()
        assert ended == ["finally", "finally"]

    asyncio.run(main())
    hook = hook_of(waits_for_ever(), lambda: None)
    hook.close()
    with pytest.raises(TypeError, match="made by _molt_native.suspend_hook"):
        type(hook)()


async def _await(awaitable):
    return await awaitable


def board_entry(board_fd, pid_index):
    """Entry `pid_index` of an accept board (accept_balance.cpp's layout): its connection
    count and whether it is in the accept queue."""
    pid, generation, connections, busy, threads, in_queue, stamp = struct.unpack_from(
        "iIiiiiq", os.pread(board_fd, 64, 64 * pid_index))
    return {"connections": connections, "in_queue": in_queue}


def test_a_hub_over_its_share_stands_aside_takes_what_nobody_takes_and_comes_back():
    """Two hubs of one generation on one accept board and one listener. The loop polls only
    the first; the second is alive and in the queue and never accepts (as a sibling whose
    loop is busy). The first stands aside at its third connection (more than twice the
    second's none, plus 2); a fourth then waits in a queue nobody reads, and the first takes
    it after looking again (kAsideStrandedChecks looks) and stands aside again; two closed
    bring it back into the queue."""
    loop = asyncio.new_event_loop()
    board = os.memfd_create("test-accept-board")
    os.ftruncate(board, 8 * 64)
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    listener.setblocking(False)
    port = listener.getsockname()[1]
    failures = []

    def report(message, exc, protocol, transport):
        failures.append((message, exc))

    module = extension()
    first = module.io_hub(loop, report, lambda fd, exc: failures.append(exc), board, 7)
    idle = module.io_hub(loop, report, lambda fd, exc: failures.append(exc), board, 7)
    made = []

    def factory():
        made.append(Recorder())
        return made[-1]

    async def until(check, what):
        deadline = time.monotonic() + 10
        while not check():
            assert time.monotonic() < deadline, what
            idle.alive()  # the sibling's loop would stamp it every 0.1 s
            await asyncio.sleep(0.005)

    async def main():
        first.listen(listener.fileno(), factory, listener.getsockname(), False)
        idle.listen(listener.fileno(), factory, listener.getsockname(), False)
        loop.add_reader(first.fileno(), first.poll)
        clients = []
        for n in (1, 2, 3):
            idle.alive()  # fresh when `first` decides, after the accept
            clients.append(socket.create_connection(("127.0.0.1", port)))
            await until(lambda: first.connections() == n, f"connection {n} taken")
        assert first.standing_aside() == [listener.fileno()]
        assert board_entry(board, 0) == {"connections": 3, "in_queue": 0}
        assert board_entry(board, 1) == {"connections": 0, "in_queue": 1}
        idle.alive()
        clients.append(socket.create_connection(("127.0.0.1", port)))
        await until(lambda: first.connections() == 4, "the stranded connection taken")
        assert first.standing_aside() == [listener.fileno()]
        clients[0].close()
        clients[1].close()
        await until(lambda: first.standing_aside() == [], "back in the queue")
        assert board_entry(board, 0) == {"connections": 2, "in_queue": 1}
        assert idle.connections() == 0
        for c in clients[2:]:
            c.close()
        for protocol in made:
            await asyncio.wait_for(protocol.lost, 10)
        loop.remove_reader(first.fileno())

    try:
        asyncio.set_event_loop(loop)
        loop.run_until_complete(main())
    finally:
        asyncio.set_event_loop(None)
        loop.close()
        listener.close()
        os.close(board)
    assert failures == []


@pytest.mark.parametrize("then", ["nothing", "close", "write_eof", "abort"])
def test_a_small_write_is_held_to_the_end_of_the_loop_iteration_and_keeps_every_rule(then):
    """A write to a connection with nothing waiting waits for the end of the loop iteration
    (hub.send_held()), so that the responses of a batch of requests leave together: it shows
    in get_write_buffer_size() until then. A close() or write_eof() right after it still
    sends it first; an abort() drops it."""
    seen = []

    def answer(protocol, data):
        t = protocol.transport
        t.write(b"held")
        seen.append(t.get_write_buffer_size())
        if then == "nothing":
            t.write(b" and joined")  # appended to what is held, one send for both
            seen.append(t.get_write_buffer_size())
            asyncio.get_event_loop().call_later(0.05, t.close)
        else:
            getattr(t, then)()

    def client(port):
        with socket.create_connection(("127.0.0.1", port)) as s:
            s.sendall(b"go")
            got = b""
            while True:
                try:
                    chunk = s.recv(100)
                except ConnectionResetError:
                    return got, "reset"
                if not chunk:
                    return got, "eof"
                got += chunk

    made, (got, end) = serve(lambda: Recorder(on_data=answer), client)
    if then == "nothing":
        assert seen == [4, 15]
        assert got == b"held and joined"
    elif then == "abort":
        assert seen == [4]
        assert got == b""
    else:
        assert seen == [4]
        assert (got, end) == (b"held", "eof")


class Resumed(Recorder):
    """A Recorder that runs `on_resume(protocol)` when resume_writing() comes."""

    def __init__(self, on_data=None):
        super().__init__(on_data)
        self.on_resume = None

    def resume_writing(self):
        super().resume_writing()
        if self.on_resume is not None:
            self.on_resume(self)


@pytest.mark.parametrize("io_uring", [True, False], ids=["io_uring", "send"])
def test_the_held_writes_of_many_connections_leave_together_and_keep_every_rule(io_uring):
    """What one loop iteration's writes held, to 70 connections at once (more than one submit
    of the ring's 64), goes out in one batch (hub.sends(): one io_uring submit, or one send()
    each where io_uring cannot be had or is not asked for), and each result is the
    connection's own: a client that reads gets its bytes; a client that reads slowly gets
    the part its socket took, then the rest on EPOLLOUT, every byte in order; a client that
    reset its connection ends it with ConnectionResetError or BrokenPipeError, and no other
    connection hears of it. A protocol called back for one connection's result (c0's
    resume_writing) that aborts, writes to or closes connections later in the same batch
    (c1, c2, c3) leaves each with its own bytes, in order."""
    count = 70
    slow_payload = bytes(range(256)) * 32768  # 8 MiB: more than the kernel buffers
    transports = {}
    after_batch = []
    loop_hubs = []
    all_read = threading.Event()
    reset_sent = threading.Event()

    def note(protocol, data):
        protocol.transport.pause_reading()  # the reset must reach the write, not a read
        transports[data] = protocol
        if len(transports) == count + 2:
            all_read.set()
            write_when_reset()

    def write_when_reset():
        loop = asyncio.get_event_loop()
        loop.call_later(0.01, write_to_all if reset_sent.is_set() else write_when_reset)

    def act_on_the_others(protocol):
        transports[b"c1"].transport.abort()
        transports[b"c2"].transport.write(b" and more")
        transports[b"c3"].transport.close()

    def write_to_all():
        for key, protocol in transports.items():  # in the order the connections came
            t = protocol.transport
            if key == b"slow":
                t.set_write_buffer_limits(high=len(slow_payload) * 2)  # held all the same
                t.write(slow_payload)
            else:
                t.write(b"answer to " + key)
            assert t.get_write_buffer_size() > 0  # held until the batch
        c0 = transports[b"c0"]
        c0.transport.set_write_buffer_limits(high=4)  # paused now; resumed by its result
        c0.on_resume = act_on_the_others
        asyncio.get_event_loop().call_soon(after_sent)  # after hub.send_held()

    def after_sent():
        for key, protocol in transports.items():
            after_batch.append((key, protocol.transport.get_write_buffer_size()))
            if key != b"slow":
                protocol.transport.close()
        transports[b"slow"].transport.close()  # once the rest is out

    def client(port):
        socks = []
        for i in range(count):
            s = socket.create_connection(("127.0.0.1", port))
            s.sendall(b"c%d" % i)
            socks.append(s)
        slow = socket.socket()
        slow.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16384)
        slow.connect(("127.0.0.1", port))
        slow.sendall(b"slow")
        reset = socket.create_connection(("127.0.0.1", port))
        reset.sendall(b"reset")
        assert all_read.wait(10)  # its bytes read before the reset comes
        reset.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        reset.close()  # an RST, through by the time close() returns (loopback)
        reset_sent.set()
        answers = []
        for s in socks:
            s.settimeout(10)
            got = b""
            while chunk := s.recv(100):
                got += chunk
            answers.append(got)
            s.close()
        got = bytearray()
        slow.settimeout(10)
        while chunk := slow.recv(65536):
            got += chunk
        slow.close()
        return answers, bytes(got)

    made, (answers, slow_got) = serve(lambda: Resumed(on_data=note), client,
                                      io_uring=io_uring, hubs=loop_hubs)
    assert loop_hubs[0].sends() == (HUB_SENDS if io_uring else "send")
    want = [b"answer to c%d" % i for i in range(count)]
    want[2] += b" and more"
    assert answers == want
    assert slow_got == slow_payload
    left = dict(after_batch)
    assert all(left[b"c%d" % i] == 0 for i in range(count)), after_batch
    assert 0 < left[b"slow"] < len(slow_payload), after_batch  # the rest waited for EPOLLOUT
    assert left[b"reset"] == 0, after_batch
    ends = {key: [c for c in protocol.calls if c[0] == "lost"]
            for key, protocol in transports.items()}
    assert isinstance(ends[b"reset"][0][1], (ConnectionResetError, BrokenPipeError)), ends
    assert all(ends[k] == [("lost", None)] for k in ends if k != b"reset"), ends
    calls = transports[b"c0"].calls
    assert ("pause", 12) in calls and ("resume", 0) in calls, calls


REFUSING_IO_URING = """
import errno, sys
import seccomp
rules = seccomp.SyscallFilter(defaction=seccomp.ALLOW)
rules.add_rule(seccomp.ERRNO(errno.EPERM), "io_uring_setup")
rules.load()  # this process and every child: the workers too
from harness import io_uring_available
assert not io_uring_available()
import pytest
sys.exit(pytest.main(sys.argv[1:]))
"""


@pytest.mark.timeout(120)
@pytest.mark.skipif(importlib.util.find_spec("seccomp") is None,
                    reason="python3-seccomp is not installed")
def test_where_io_uring_is_refused_the_hub_sends_one_by_one_with_the_same_results():
    """Under a seccomp filter that refuses io_uring_setup (as recent Docker's default profile
    does), the hub cannot make its ring and sends each held write with its own send(): the
    batch test above passes there and says `send`, and a worker behind it says `sends send`
    on its ready line and serves every case of test_asgi_parsers."""
    here = os.path.dirname(os.path.abspath(__file__))
    result = subprocess.run(
        [sys.executable, "-c", REFUSING_IO_URING, "-q", "-p", "no:cacheprovider",
         os.path.join(here, "test_asgi_io.py") +
         "::test_the_held_writes_of_many_connections_leave_together_and_keep_every_rule",
         os.path.join(here, "test_asgi.py") + "::test_asgi_parsers"],
        cwd=here, capture_output=True, text=True, timeout=110)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert result.stdout.splitlines()[-1].startswith("7 passed"), result.stdout[-3000:]


@pytest.mark.parametrize("how", ["close", "abort", "paused, then close"])
def test_a_connection_the_ring_reads_closes_at_once(how):
    """A multishot recv holds a reference to its socket: a connection the RecvRing reads must
    have it cancelled when it closes, or the socket, and the FIN with it, would wait for the
    client's next bytes. The client hears the end at once, without sending anything more."""
    hubs = []

    def answer(protocol, data):
        t = protocol.transport
        if data != b"end":
            t.write(b"re:" + data)
            return
        if how == "abort":
            t.abort()
            return
        if how.startswith("paused"):
            t.pause_reading()  # cancels the multishot; the close must not wait on it either
        t.write(b"bye")
        t.close()

    def client(port):
        with socket.create_connection(("127.0.0.1", port)) as s:
            s.settimeout(5)
            ping_pong(s, 6)  # read by the ring from the fourth on
            s.sendall(b"end")
            got = b""
            while chunk := s.recv(100):
                got += chunk
            return got

    made, got = serve(lambda: Recorder(on_data=answer), client, hubs=hubs)
    assert got == (b"" if how == "abort" else b"bye")
    assert made[0].calls[-1] == ("lost", None), made[0].calls
    assert hubs[0].reads() == HUB_READS


def test_a_large_upload_the_ring_reads_arrives_whole_and_in_order():
    """A connection the RecvRing reads gets 8 MiB at once: more than the ring's shared buffers
    (128 x 8 KiB), so the kernel runs out of them mid-way (-ENOBUFS ends the multishot, armed
    again once they are back) and consecutive completions are joined; every byte arrives, in
    order, and the connection goes on serving."""
    upload = os.urandom(1 << 20) * 8
    hubs = []

    def answer(protocol, data):
        if not hasattr(protocol, "got"):
            protocol.got = bytearray()
            protocol.chunks = 0
        if protocol.chunks < 0 or len(data) < 8 and not protocol.got:
            protocol.transport.write(b"re:" + data)  # the ping-pong before and after
            return
        protocol.got += data
        protocol.chunks += 1
        if len(protocol.got) == len(upload):
            ok = bytes(protocol.got) == upload
            protocol.transport.write(b"whole" if ok else b"wrong")
            protocol.chunks = -1

    def client(port):
        with socket.create_connection(("127.0.0.1", port)) as s:
            s.settimeout(10)
            ping_pong(s, 6)  # read by the ring from the fourth on
            s.sendall(upload)
            verdict = b""
            while len(verdict) < 5 and (chunk := s.recv(5 - len(verdict))):
                verdict += chunk
            ping_pong(s, 2)
            return verdict

    made, verdict = serve(lambda: Recorder(on_data=answer), client, hubs=hubs)
    assert verdict == b"whole"
    assert hubs[0].reads() == HUB_READS
    assert made[0].calls[-1] == ("lost", None), made[0].calls
