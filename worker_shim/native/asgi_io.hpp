// The ASGI engine's own TCP I/O: accept, read and write in C++, feeding asyncio protocols.
//
// uvloop's server, which served the ASGI engine's TCP listeners before, asks the kernel for
// each accepted connection's addresses and sets TCP_NODELAY on it (three system calls), and
// makes each connection's first read wait for a second wake-up even when the request came with
// it. An IoHub is one epoll descriptor the loop watches (`loop.add_reader(hub.fileno(),
// hub.poll)`): the listeners are in it, the connections edge-triggered. poll() accepts what is
// queued, makes each connection an IoTransport (an asyncio transport: write,
// writelines, close, abort, write_eof, pause/resume_reading, flow control, get_extra_info,
// set_protocol) and hands it to the listener's protocol factory, reads what arrives and calls
// the protocol's data_received; a small write to a connection with nothing waiting is held
// until the loop has run what was ready (hub.send_held(), as uvloop's transports queue theirs,
// so that a batch's responses leave together, in one io_uring submit: send_batch.hpp), a
// larger one goes straight to the socket, and only what the socket will not take waits for
// EPOLLOUT. connection_lost comes in the next loop
// iteration, as asyncio's own transports call it. The protocol is molt's own
// (engines/asgi_cycle.py, and uvicorn's WebSocket protocols after an upgrade): every HTTP rule
// stays in one place.
//
// A listener whose socket has TCP_DEFER_ACCEPT (`listen[].defer_accept`) is read at once after
// each accept: the kernel hands over a connection only once its first bytes are in, so the
// request reaches the protocol in the wake-up that accepted it, and a connection is added to
// the epoll set only after that read (not at all if it was closed meanwhile).
//
// A connection read a few times is kept alive: its reads move to the hub's RecvRing (a
// multishot recv through io_uring, whose descriptor the loop watches: `loop.add_reader(
// hub.reads_fileno(), hub.reap)`; recv_ring.hpp), so that its requests cost no read() at all
// and one wake-up serves every connection that got bytes; where the kernel has no multishot
// recv, to the loop's own epoll (`loop.add_reader(fd, transport._readable)`), so that a
// wake-up for it costs the loop's epoll_wait alone, not that and the hub's nested one. The
// hub keeps watching its EPOLLOUT.
// docs/architecture.md, "ASGI: molt's own I/O", has the measurements.
//
// With the generation's accept board, a worker that holds more than its share of the
// connections takes its listeners out of the hub's epoll after an accept, and looks again every
// 10 ms, when one of its connections ends, and at the poll after a sibling called it back
// (accept_balance.hpp; "ASGI on the accept board" in docs/architecture.md).
#pragma once

#include "py_handle.hpp"

namespace molt::native {

extern PyType_Spec io_hub_spec;
extern PyType_Spec io_transport_spec;

// io_hub(loop, report, accept_failed[, board_fd, generation, io_uring, accepting_workers]) ->
// IoHub, on `loop` (its
// call_soon, call_later, add_reader and remove_reader). `report(message, exception, protocol,
// transport)` is called when a protocol method raised (the loop's exception handler, as
// asyncio's transports do); `accept_failed(listener_fd, OSError)` when accept() ran out of
// descriptors or memory (the listener is then paused; resume_listener() takes it back).
// board_fd (MOLT_ACCEPT_BOARD_FD, or -1) and the worker's generation: the accept board
// (accept_balance.hpp), on which a worker holding more than its share of the generation's
// connections stands aside after an accept; the engine calls alive() every 0.1 s. io_uring
// (default true): send_held() sends its batch in one system call where the kernel allows
// (send_batch.hpp); false: one send() each. accepting_workers: the board's hot workers (0, the
// default: every worker; -1: one per CPU; N; `accepting_workers:` in the config).
PyObject* new_io_hub(PyObject* hub_type, PyObject* transport_type, PyObject* args);

}  // namespace molt::native
