// The Python objects a request sees (start_response, wsgi.input) and their type specs.
#pragma once

#include "engine.hpp"

namespace molt::native {

// Heap types made from these specs in the module's exec slot (see module.cpp).
extern PyType_Spec start_response_spec;
extern PyType_Spec input_spec;

// A new instance of a heap type (its tp_alloc: zeroed, and a reference to the type taken).
template <typename T>
T* alloc_object(PyObject* type) {
    auto* tp = reinterpret_cast<PyTypeObject*>(type);
    auto alloc = reinterpret_cast<allocfunc>(PyType_GetSlot(tp, Py_tp_alloc));
    return reinterpret_cast<T*>(alloc(tp, 0));
}

// The end of every tp_dealloc here: free the object, drop its reference to the heap type.
inline void free_heap_object(PyObject* self) {
    PyTypeObject* type = Py_TYPE(self);
    auto free_fn = reinterpret_cast<freefunc>(PyType_GetSlot(type, Py_tp_free));
    free_fn(self);
    Py_DECREF(type);
}

}  // namespace molt::native
