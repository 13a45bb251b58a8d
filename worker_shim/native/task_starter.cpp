// TaskStarter: loop.create_task() for a request's task, for less (see task_starter.hpp).
#include "task_starter.hpp"

#include <algorithm>
#include <charconv>

#include "wsgi_call.hpp"

namespace molt::native {
namespace {

struct TaskStarterObject {
    PyObject_HEAD PyObject* loop;
    PyObject* task_type;         // asyncio.Task
    PyObject* get_task_factory;  // the loop's bound get_task_factory
    PyObject* is_closed;         // the loop's bound is_closed
    PyObject* loop_key;          // "loop", "name": Task's keyword arguments
    PyObject* name_key;
    PyObject* create_task_key;   // "create_task"
    unsigned long long started;  // the N of the last "request-N"
};

TaskStarterObject* starter_of(PyObject* self) {
    return reinterpret_cast<TaskStarterObject*>(self);
}

// "request-N", without the format string PyUnicode_FromFormat parses for every task.
PyObject* next_name(TaskStarterObject* starter) {
    static constexpr char kPrefix[] = "request-";
    char buf[sizeof(kPrefix) + 20];
    std::copy(kPrefix, kPrefix + sizeof(kPrefix) - 1, buf);
    char* end = std::to_chars(buf + sizeof(kPrefix) - 1, buf + sizeof(buf), ++starter->started).ptr;
    return PyUnicode_FromStringAndSize(buf, end - buf);
}

// 1 when loop.create_task() is to make the task: the loop has a task factory (which sees every
// task, as under uvicorn) or is closed (create_task() refuses before a task is made); 0 when
// the starter makes it; -1 with an exception.
int needs_create_task(TaskStarterObject* starter) {
    PyRef factory = PyRef::steal(PyObject_CallObject(starter->get_task_factory, nullptr));
    if (!factory) return -1;
    if (factory.get() != Py_None) return 1;
    PyRef closed = PyRef::steal(PyObject_CallObject(starter->is_closed, nullptr));
    return closed ? PyObject_IsTrue(closed.get()) : -1;
}

PyObject* starter_call(PyObject* self, PyObject* args, PyObject* kwargs) {
    TaskStarterObject* starter = starter_of(self);
    if (PyTuple_Size(args) != 1 || (kwargs != nullptr && PyDict_Size(kwargs) != 0)) {
        PyErr_SetString(PyExc_TypeError, "TaskStarter takes one argument: the coroutine");
        return nullptr;
    }
    PyObject* coroutine = PyTuple_GetItem(args, 0);
    int delegate = needs_create_task(starter);
    if (delegate < 0) return nullptr;
    if (delegate) {
        return PyObject_CallMethodObjArgs(starter->loop, starter->create_task_key, coroutine,
                                          nullptr);
    }
    PyRef name = PyRef::steal(next_name(starter));
    PyRef keywords = PyRef::steal(PyDict_New());
    if (!name || !keywords ||
        PyDict_SetItem(keywords.get(), starter->loop_key, starter->loop) < 0 ||
        PyDict_SetItem(keywords.get(), starter->name_key, name.get()) < 0) {
        return nullptr;
    }
    return PyObject_Call(starter->task_type, args, keywords.get());
}

int starter_traverse(PyObject* self, visitproc visit, void* arg) {
    TaskStarterObject* starter = starter_of(self);
    Py_VISIT(starter->loop);
    Py_VISIT(starter->task_type);
    Py_VISIT(starter->get_task_factory);
    Py_VISIT(starter->is_closed);
    Py_VISIT(Py_TYPE(self));
    return 0;
}

int starter_clear(PyObject* self) {
    TaskStarterObject* starter = starter_of(self);
    Py_CLEAR(starter->loop);
    Py_CLEAR(starter->task_type);
    Py_CLEAR(starter->get_task_factory);
    Py_CLEAR(starter->is_closed);
    Py_CLEAR(starter->loop_key);
    Py_CLEAR(starter->name_key);
    Py_CLEAR(starter->create_task_key);
    return 0;
}

void starter_dealloc(PyObject* self) {
    PyObject_GC_UnTrack(self);
    starter_clear(self);
    free_heap_object(self);
}

PyObject* made_by_task_starter(PyTypeObject*, PyObject*, PyObject*) {
    PyErr_SetString(PyExc_TypeError, "TaskStarter is made by _molt_native.task_starter()");
    return nullptr;
}

PyType_Slot starter_slots[] = {
    {Py_tp_call, reinterpret_cast<void*>(starter_call)},
    {Py_tp_traverse, reinterpret_cast<void*>(starter_traverse)},
    {Py_tp_clear, reinterpret_cast<void*>(starter_clear)},
    {Py_tp_dealloc, reinterpret_cast<void*>(starter_dealloc)},
    {Py_tp_new, reinterpret_cast<void*>(made_by_task_starter)},
    {Py_tp_doc, const_cast<char*>("starter(coroutine) -> a task on the loop, as "
                                  "loop.create_task(coroutine); made by task_starter().")},
    {0, nullptr}};

}  // namespace

PyType_Spec task_starter_spec = {"_molt_native.TaskStarter", sizeof(TaskStarterObject), 0,
                                 Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC, starter_slots};

PyObject* new_task_starter(PyObject* type, PyObject* args) {
    PyObject* loop = nullptr;
    PyObject* task_type = nullptr;
    if (!PyArg_ParseTuple(args, "OO:task_starter", &loop, &task_type)) return nullptr;
    PyRef get_task_factory = PyRef::steal(PyObject_GetAttrString(loop, "get_task_factory"));
    if (!get_task_factory) return nullptr;
    PyRef is_closed = PyRef::steal(PyObject_GetAttrString(loop, "is_closed"));
    if (!is_closed) return nullptr;
    auto* starter = alloc_object<TaskStarterObject>(type);
    if (starter == nullptr) return nullptr;
    PyObject* self = reinterpret_cast<PyObject*>(starter);
    Py_INCREF(loop);
    starter->loop = loop;
    Py_INCREF(task_type);
    starter->task_type = task_type;
    starter->get_task_factory = get_task_factory.release();
    starter->is_closed = is_closed.release();
    starter->loop_key = PyUnicode_InternFromString("loop");
    starter->name_key = PyUnicode_InternFromString("name");
    starter->create_task_key = PyUnicode_InternFromString("create_task");
    starter->started = 0;
    if (starter->loop_key == nullptr || starter->name_key == nullptr ||
        starter->create_task_key == nullptr) {
        Py_DECREF(self);
        return nullptr;
    }
    return self;
}

}  // namespace molt::native
