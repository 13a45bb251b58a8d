"""The extension's IoHub and IoTransport (worker_shim/native/asgi_io.cpp) against the asyncio
transport contract, in this process, on a real loop and real loopback sockets. The ASGI suite
(test_asgi.py and the HTTP tables) runs the worker's own protocols on it; these pin down what
those protocols only rely on in passing."""
import asyncio
import importlib.util
import os
import socket

import pytest

from harness import HAVE_NATIVE, NATIVE_DIR, NATIVE_PRELOAD

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


def serve(protocol_factory, client, timeout=10.0):
    """Runs a loop with an IoHub on a fresh listener; `client(port)` runs in a thread; returns
    once it has and every protocol made has lost its connection."""
    loop = asyncio.new_event_loop()
    made = []
    failures = []
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    listener.setblocking(False)
    port = listener.getsockname()[1]

    def report(message, exc, protocol, transport):
        failures.append((message, exc))

    hub = extension().io_hub(loop.call_soon, report, lambda fd, exc: failures.append(exc))

    def factory():
        protocol = protocol_factory()
        made.append(protocol)
        return protocol

    async def main():
        hub.listen(listener.fileno(), factory, listener.getsockname(), False)
        loop.add_reader(hub.fileno(), hub.poll)
        done = loop.run_in_executor(None, client, port)
        await asyncio.wait_for(done, timeout)
        for protocol in made:
            await asyncio.wait_for(protocol.lost, timeout)
        loop.remove_reader(hub.fileno())
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


def test_flow_control_resumes_at_the_low_water_mark_and_delivers_every_byte():
    """One write far over the high-water mark (and over what the kernel buffers for a client
    with a small receive buffer): the protocol is paused, resumed once what waits is at or under the low-water mark (a quarter of
    64 KiB), and the client gets every byte in order."""
    payload = bytes(range(256)) * 65536  # 16 MiB: more than the kernel buffers on loopback

    def write_it(protocol, data):
        protocol.transport.write(payload)
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
    hub_type = type(module.io_hub(lambda *a: None, lambda *a: None, lambda *a: None))
    with pytest.raises(TypeError, match="made by _molt_native.io_hub"):
        hub_type()
