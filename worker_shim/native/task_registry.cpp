// TaskRegistry: WeakSet.add and its callback in C (see task_registry.hpp).
#include "task_registry.hpp"

#include "wsgi_call.hpp"

namespace molt::native {
namespace {

struct TaskRegistryObject {
    PyObject_HEAD PyObject* data;  // the WeakSet's set of weak references
    PyObject* pending;             // its list of references that died while it was iterated
    PyObject* iterating;           // its set of running iterations
    PyObject* drop;                // this registry's bound drop(): every reference's callback
};

TaskRegistryObject* registry_of(PyObject* self) {
    return reinterpret_cast<TaskRegistryObject*>(self);
}

// WeakSet._commit_removals: the pending references, last first, out of the set.
int commit_removals(TaskRegistryObject* reg) {
    for (Py_ssize_t n = PyList_Size(reg->pending); n > 0; n = PyList_Size(reg->pending)) {
        PyRef item = PyRef::borrow(PyList_GetItem(reg->pending, n - 1));
        if (!item || PyList_SetSlice(reg->pending, n - 1, n, nullptr) < 0) return -1;
        if (PySet_Discard(reg->data, item.get()) < 0) return -1;
    }
    return PyErr_Occurred() ? -1 : 0;
}

PyObject* registry_add(PyObject* self, PyObject* item) {
    TaskRegistryObject* reg = registry_of(self);
    if (commit_removals(reg) < 0) return nullptr;
    PyRef ref = PyRef::steal(PyWeakref_NewRef(item, reg->drop));
    if (!ref || PySet_Add(reg->data, ref.get()) < 0) return nullptr;
    Py_RETURN_NONE;
}

PyObject* registry_drop(PyObject* self, PyObject* ref) {
    TaskRegistryObject* reg = registry_of(self);
    Py_ssize_t iterating = PySet_Size(reg->iterating);
    if (iterating < 0) return nullptr;
    if (iterating > 0) {
        if (PyList_Append(reg->pending, ref) < 0) return nullptr;
    } else if (PySet_Discard(reg->data, ref) < 0) {
        return nullptr;
    }
    Py_RETURN_NONE;
}

int registry_traverse(PyObject* self, visitproc visit, void* arg) {
    TaskRegistryObject* reg = registry_of(self);
    Py_VISIT(reg->data);
    Py_VISIT(reg->pending);
    Py_VISIT(reg->iterating);
    Py_VISIT(reg->drop);
    Py_VISIT(Py_TYPE(self));
    return 0;
}

int registry_clear(PyObject* self) {
    TaskRegistryObject* reg = registry_of(self);
    Py_CLEAR(reg->data);
    Py_CLEAR(reg->pending);
    Py_CLEAR(reg->iterating);
    Py_CLEAR(reg->drop);
    return 0;
}

void registry_dealloc(PyObject* self) {
    PyObject_GC_UnTrack(self);
    registry_clear(self);
    free_heap_object(self);
}

PyObject* made_by_task_registry(PyTypeObject*, PyObject*, PyObject*) {
    PyErr_SetString(PyExc_TypeError, "TaskRegistry is made by _molt_native.task_registry()");
    return nullptr;
}

PyMethodDef registry_methods[] = {
    {"add", registry_add, METH_O, "WeakSet.add: a weak reference to the item, into the set."},
    {"drop", registry_drop, METH_O,
     "The references' callback: out of the set, or pending while the set is iterated."},
    {nullptr, nullptr, 0, nullptr}};

PyType_Slot registry_slots[] = {
    {Py_tp_methods, registry_methods},
    {Py_tp_traverse, reinterpret_cast<void*>(registry_traverse)},
    {Py_tp_clear, reinterpret_cast<void*>(registry_clear)},
    {Py_tp_dealloc, reinterpret_cast<void*>(registry_dealloc)},
    {Py_tp_new, reinterpret_cast<void*>(made_by_task_registry)},
    {Py_tp_doc, const_cast<char*>("A WeakSet's add() and its callback in C; made by "
                                  "task_registry().")},
    {0, nullptr}};

}  // namespace

PyType_Spec task_registry_spec = {"_molt_native.TaskRegistry", sizeof(TaskRegistryObject), 0,
                                  Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC, registry_slots};

PyObject* new_task_registry(PyObject* type, PyObject* args) {
    PyObject* data = nullptr;
    PyObject* pending = nullptr;
    PyObject* iterating = nullptr;
    if (!PyArg_ParseTuple(args, "O!O!O!:task_registry", &PySet_Type, &data, &PyList_Type, &pending,
                          &PySet_Type, &iterating)) {
        return nullptr;
    }
    auto* reg = alloc_object<TaskRegistryObject>(type);
    if (reg == nullptr) return nullptr;
    PyObject* self = reinterpret_cast<PyObject*>(reg);
    Py_INCREF(data);
    reg->data = data;
    Py_INCREF(pending);
    reg->pending = pending;
    Py_INCREF(iterating);
    reg->iterating = iterating;
    reg->drop = PyObject_GetAttrString(self, "drop");  // a cycle through the registry: GC'd
    if (reg->drop == nullptr) {
        Py_DECREF(self);
        return nullptr;
    }
    return self;
}

}  // namespace molt::native
