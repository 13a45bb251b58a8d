"""The threaded engine's parking lot (engines/connections.py), in-process: who owns a
connection when the sweep and a serving thread race for it."""
import socket
import sys

from harness import SHIM_DIR

sys.path.insert(0, SHIM_DIR)
from molt_shim.engines.connections import LINGER, Connection, Parking  # noqa: E402
from molt_shim.wsgi.request import Limits  # noqa: E402


def connection(lot: Parking):
    ours, peer = socket.socketpair()
    ours.setblocking(False)
    conn = Connection(ours, "", {}, Limits(8192, 65536, 100, 0, 1 << 20))
    lot.add(conn)
    return conn, peer


def test_the_sweep_never_takes_a_newer_connection_on_a_reused_fd():
    # The sweep walks a list made before: by the time it takes a connection, a serving thread
    # may have closed it and a new connection may have been given the same fd number. take()
    # popped that new one out of `parked`, so its next event found no owner and it hung.
    lot = Parking()
    old, old_peer = connection(lot)
    lot.park(old, LINGER)
    seen = list(lot.parked.values())  # the sweep's look
    assert lot.parked.pop(old.fd) is old  # a serving thread takes it and closes it
    lot.close_now(old)
    new, new_peer = connection(lot)
    assert new.fd == old.fd  # the kernel gives the lowest free number again
    lot.park(new)
    assert lot.take(seen[0]) is False
    assert lot.parked.get(new.fd) is new  # still parked: its next event finds it
    assert lot.take(new) is True
    for sock in (old_peer, new_peer, new.sock):
        sock.close()
