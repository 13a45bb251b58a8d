// Ownership of Python references and the GIL as scopes.
//
// Every PyObject* the engine keeps is a PyRef (it Py_DECREFs on scope exit); a raw pointer is a
// borrowed reference and is named so. GilReleased and GilHeld make every native I/O path show
// where Python may run: a serving thread holds the GIL only inside GilHeld, and every blocking
// syscall made while Python could run sits inside GilReleased.
#pragma once

#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <utility>

namespace molt::native {

class PyRef {
  public:
    PyRef() = default;
    static PyRef steal(PyObject* owned) { return PyRef(owned); }
    static PyRef borrow(PyObject* borrowed) {
        Py_XINCREF(borrowed);
        return PyRef(borrowed);
    }
    PyRef(const PyRef&) = delete;
    PyRef& operator=(const PyRef&) = delete;
    PyRef(PyRef&& other) noexcept : obj_(std::exchange(other.obj_, nullptr)) {}
    PyRef& operator=(PyRef&& other) noexcept {
        if (this != &other) {
            Py_XDECREF(obj_);
            obj_ = std::exchange(other.obj_, nullptr);
        }
        return *this;
    }
    ~PyRef() { Py_XDECREF(obj_); }

    PyObject* get() const { return obj_; }
    PyObject* release() { return std::exchange(obj_, nullptr); }  // hands the reference over
    explicit operator bool() const { return obj_ != nullptr; }

  private:
    explicit PyRef(PyObject* owned) : obj_(owned) {}
    PyObject* obj_ = nullptr;
};

// "Python may run on other threads here": releases the GIL for the scope.
class GilReleased {
  public:
    GilReleased() : state_(PyEval_SaveThread()) {}
    ~GilReleased() { PyEval_RestoreThread(state_); }
    GilReleased(const GilReleased&) = delete;
    GilReleased& operator=(const GilReleased&) = delete;

  private:
    PyThreadState* state_;
};

// "This serving thread runs Python here": takes the GIL with the thread's own thread state
// (made once when the thread starts) and gives it back at scope exit.
class GilHeld {
  public:
    explicit GilHeld(PyThreadState* thread_state) : state_(thread_state) {
        PyEval_RestoreThread(state_);
    }
    ~GilHeld() { PyEval_SaveThread(); }
    GilHeld(const GilHeld&) = delete;
    GilHeld& operator=(const GilHeld&) = delete;

  private:
    PyThreadState* state_;
};

}  // namespace molt::native
