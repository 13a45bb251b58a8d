// task_starter(loop, task_type) -> TaskStarter: starter(coroutine) starts the coroutine as a
// task on `loop`, as loop.create_task(coroutine) does, for less.
//
// What loop.create_task() adds to the task itself, per request (bench/asgi_inproc --count,
// and a micro-benchmark on uvloop: 19.4k instructions per task made and run through
// create_task(), 17.6k through Task(coroutine, loop=loop, name=...)): uvloop's Python-level
// wrapper, and the name CPython 3.11's Task formats for every unnamed task
// (PyUnicode_FromFormat("Task-%" PRIu64): vsprintf, found by `perf record` on a worker under
// load). A TaskStarter calls `task_type(coroutine, loop=loop, name="request-N")`, N counted
// per starter, unless the loop has a task factory (loop.set_task_factory()) or is closed: then
// it calls loop.create_task(coroutine), so the factory sees every task as it would otherwise,
// and a closed loop refuses it before a task is made.
#pragma once

#include "py_handle.hpp"

namespace molt::native {

extern PyType_Spec task_starter_spec;

PyObject* new_task_starter(PyObject* type, PyObject* args);

}  // namespace molt::native
