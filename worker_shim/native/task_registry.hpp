// task_registry(data, pending_removals, iterating) -> TaskRegistry: a weakref.WeakSet's add()
// and its references' callback in C, for the WeakSet in which asyncio keeps every task.
//
// CPython 3.11's C Task registers itself in `_asyncio._all_tasks`, a weakref.WeakSet, when it
// is made: a call of WeakSet.add (Python) that makes a weak reference whose callback, also
// Python, takes it out again when the task is freed. The ASGI engine makes a task per request,
// and those two Python calls cost about 2.6k instructions of it (bench/asgi_inproc --count).
// A TaskRegistry does what WeakSet.add and its callback do, on the WeakSet's own containers,
// so asyncio.all_tasks() and every other reader of the set see what they saw before:
//
//   add(item):  commits the pending removals (WeakSet._commit_removals), then adds a weak
//               reference to `item` whose callback is drop()
//   drop(ref):  while the set is being iterated (`iterating` is not empty), appends `ref` to
//               `pending_removals`; otherwise discards it from `data`
//
// The engine installs `registry.add` as that one WeakSet's own `add` (engines/uvicorn_asgi.py,
// install_native_tasks()); anything else that holds a WeakSet is untouched. One difference
// from WeakSet's own callback, which does nothing once the WeakSet is gone: the registry holds
// the containers themselves, so a WeakSet that dies leaves them to the cyclic collector, and
// callbacks until then keep them up to date. asyncio's WeakSet lives as long as the process.
#pragma once

#include "py_handle.hpp"

namespace molt::native {

extern PyType_Spec task_registry_spec;

PyObject* new_task_registry(PyObject* type, PyObject* args);

}  // namespace molt::native
