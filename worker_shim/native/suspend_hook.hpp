// suspend_hook(coroutine, on_suspend) -> an awaitable that runs `coroutine` and calls
// on_suspend() each time it suspends, that is, yields to the loop; `running` is true while the
// coroutine runs.
//
// The ASGI cycle (engines/asgi_cycle.py) holds a response head back until the app's first body
// message, so head and body go out in one write. When the app suspends in between (a
// streaming response waiting for its next chunk), the head must go out alone. Asked of the loop
// with call_soon() per response, that costs a handle and a loop iteration per request, and one
// more epoll_wait; the hook makes no call for an app that does not suspend, and one per
// suspension for one that does (bench/asgi_inproc --count, per keep-alive request: 67.5k
// instructions with call_soon, 66.0k with the hook, of which the hook itself is about 3k).
//
// An iterator with send(), throw() and close(), as `await` drives one (not am_send: the
// extension is built against the 3.8 stable ABI, which has neither it nor PyIter_Send).
#pragma once

#include "py_handle.hpp"

namespace molt::native {

extern PyType_Spec suspend_hook_spec;

PyObject* new_suspend_hook(PyObject* type, PyObject* send_name, PyObject* args);

// Whether `obj`, a SuspendHook, runs its coroutine now: 1 or 0, or -1 when it is not a hook.
int suspend_hook_running(PyObject* obj);

}  // namespace molt::native
