// The ASGI request cycle's state and its response side, in C++: the base class of
// engines/asgi_cycle.py's Cycle when the extension is there.
//
// Per keep-alive request, the app's two send() calls of a hello world cost about 11k
// instructions of Python (the message checks, the head made from the app's header fields, the
// body framed, the write, the end of the response); the same rules here cost a fraction of
// that (docs/architecture.md, "ASGI: the response side in C"). What stays in Python is what
// waits or is rare: send()'s wait for its client to take bytes (Cycle.send awaits
// flow.drain() and then calls deliver()), receive(), a header field seen for the first time
// (asgi_cycle.header_line(), the one copy of the field checks; its answer is remembered in
// KNOWN_HEADERS, the same dict the Python side reads), a head that has to wait for the end of
// the loop iteration (Cycle.queue_head()), and waking receive()'s waiters (Cycle.wake()).
//
// The cycle's fields keep their Python names and are Python objects (member descriptors of
// the T_OBJECT_EX kind, which CPython's attribute specialisation treats as __slots__): the
// protocol, the ticks and the tests read and set them as before. Without the extension, or
// with MOLT_SHIM_CYCLE=python, asgi_cycle.PyCycleBase is the same class in Python.
//
// asgi_cycle_rules(ctl, status_lines, known_headers, header_line, (content_length, chunked,
// close), close_line) -> CycleRules, what every cycle of one engine shares: its DrainControl
// (default_head, default_close), uvicorn's status lines, the remembered header fields, the
// header check, the three kinds of field header_line() names, and the `connection: close` line.
// Each cycle is made with them: AsgiCycle(rules, protocol, scope, keep_alive, asked_close,
// expect_100), as PyCycleBase (whose rules are the DrainControl itself).
#pragma once

#include "py_handle.hpp"

namespace molt::native {

extern PyType_Spec asgi_cycle_spec;
extern PyType_Spec cycle_rules_spec;

PyObject* new_cycle_rules(PyObject* type, PyObject* args);

}  // namespace molt::native
