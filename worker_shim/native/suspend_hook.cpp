// suspend_hook(): a coroutine's suspensions as calls (see suspend_hook.hpp).
#include "suspend_hook.hpp"

#include "wsgi_call.hpp"

namespace molt::native {
namespace {

struct SuspendHookObject {
    PyObject_HEAD PyObject* coroutine;
    PyObject* on_suspend;
    PyObject* send_name;  // "send", interned by the module
    bool running;
};

SuspendHookObject* hook_of(PyObject* self) {
    return reinterpret_cast<SuspendHookObject*>(self);
}

// What one step of the coroutine gave: a value it yielded (it suspends: on_suspend runs before
// the value reaches the loop), or nullptr with StopIteration (its return) or its exception set.
PyObject* after_step(SuspendHookObject* hook, PyObject* yielded) {
    if (yielded != nullptr) {
        PyRef r = PyRef::steal(PyObject_CallObject(hook->on_suspend, nullptr));
        if (!r) PyErr_WriteUnraisable(hook->on_suspend);  // the app's step stands
    }
    return yielded;
}

PyObject* send_step(PyObject* self, PyObject* value) {
    SuspendHookObject* hook = hook_of(self);
    if (hook->coroutine == nullptr) {
        PyErr_SetNone(PyExc_StopIteration);
        return nullptr;
    }
    hook->running = true;
    PyObject* yielded =
        PyObject_CallMethodObjArgs(hook->coroutine, hook->send_name, value, nullptr);
    hook->running = false;
    return after_step(hook, yielded);
}

PyObject* hook_iternext(PyObject* self) {
    return send_step(self, Py_None);
}

// `await` passes what the loop sends in (a future's result), or what it throws (a cancel).
PyObject* hook_throw(PyObject* self, PyObject* args) {
    SuspendHookObject* hook = hook_of(self);
    if (hook->coroutine == nullptr) {
        PyErr_SetString(PyExc_RuntimeError, "the coroutine is gone");
        return nullptr;
    }
    PyRef method = PyRef::steal(PyObject_GetAttrString(hook->coroutine, "throw"));
    if (!method) return nullptr;
    hook->running = true;
    PyObject* yielded = PyObject_CallObject(method.get(), args);
    hook->running = false;
    return after_step(hook, yielded);
}

PyObject* hook_close(PyObject* self, PyObject*) {
    SuspendHookObject* hook = hook_of(self);
    if (hook->coroutine == nullptr) Py_RETURN_NONE;
    return PyObject_CallMethod(hook->coroutine, "close", nullptr);
}

PyObject* hook_await(PyObject* self) {
    Py_INCREF(self);
    return self;
}

PyObject* hook_running(PyObject* self, void*) {
    return PyBool_FromLong(hook_of(self)->running);
}

int hook_traverse(PyObject* self, visitproc visit, void* arg) {
    SuspendHookObject* hook = hook_of(self);
    Py_VISIT(hook->coroutine);
    Py_VISIT(hook->on_suspend);
    Py_VISIT(Py_TYPE(self));
    return 0;
}

int hook_clear(PyObject* self) {
    SuspendHookObject* hook = hook_of(self);
    Py_CLEAR(hook->coroutine);
    Py_CLEAR(hook->on_suspend);
    Py_CLEAR(hook->send_name);
    return 0;
}

void hook_dealloc(PyObject* self) {
    PyObject_GC_UnTrack(self);
    hook_clear(self);
    free_heap_object(self);
}

PyObject* made_by_suspend_hook(PyTypeObject*, PyObject*, PyObject*) {
    PyErr_SetString(PyExc_TypeError, "SuspendHook is made by _molt_native.suspend_hook()");
    return nullptr;
}

PyMethodDef hook_methods[] = {{"send", send_step, METH_O, "Resumes the coroutine with a value."},
                              {"throw", hook_throw, METH_VARARGS, "Raises in the coroutine."},
                              {"close", hook_close, METH_NOARGS, "Closes the coroutine."},
                              {nullptr, nullptr, 0, nullptr}};

PyGetSetDef hook_getset[] = {
    {"running", hook_running, nullptr, "Whether the coroutine runs now.", nullptr},
    {nullptr, nullptr, nullptr, nullptr, nullptr}};

PyType_Slot hook_slots[] = {
    {Py_am_await, reinterpret_cast<void*>(hook_await)},
    {Py_tp_iter, reinterpret_cast<void*>(hook_await)},
    {Py_tp_iternext, reinterpret_cast<void*>(hook_iternext)},
    {Py_tp_methods, hook_methods},
    {Py_tp_getset, hook_getset},
    {Py_tp_traverse, reinterpret_cast<void*>(hook_traverse)},
    {Py_tp_clear, reinterpret_cast<void*>(hook_clear)},
    {Py_tp_dealloc, reinterpret_cast<void*>(hook_dealloc)},
    {Py_tp_new, reinterpret_cast<void*>(made_by_suspend_hook)},
    {Py_tp_doc, const_cast<char*>("A coroutine whose suspensions call on_suspend(); made by "
                                  "suspend_hook().")},
    {0, nullptr}};

}  // namespace

PyType_Spec suspend_hook_spec = {"_molt_native.SuspendHook", sizeof(SuspendHookObject), 0,
                                 Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC, hook_slots};

int suspend_hook_running(PyObject* obj) {
    if (PyType_GetSlot(Py_TYPE(obj), Py_tp_dealloc) != reinterpret_cast<void*>(hook_dealloc)) {
        return -1;
    }
    return hook_of(obj)->running ? 1 : 0;
}

PyObject* new_suspend_hook(PyObject* type, PyObject* send_name, PyObject* args) {
    if (PyTuple_Size(args) != 2) {
        PyErr_SetString(PyExc_TypeError, "suspend_hook(coroutine, on_suspend)");
        return nullptr;
    }
    PyObject* coroutine = PyTuple_GetItem(args, 0);
    PyObject* on_suspend = PyTuple_GetItem(args, 1);
    auto* hook = alloc_object<SuspendHookObject>(type);
    if (hook == nullptr) return nullptr;
    Py_INCREF(coroutine);
    hook->coroutine = coroutine;
    Py_INCREF(on_suspend);
    hook->on_suspend = on_suspend;
    Py_INCREF(send_name);
    hook->send_name = send_name;
    hook->running = false;
    return reinterpret_cast<PyObject*>(hook);
}

}  // namespace molt::native
