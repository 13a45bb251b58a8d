// The ASGI request cycle's state and its response side (see asgi_cycle.hpp). Each function
// here is the C++ form of the method of the same name in engines/asgi_cycle.py's PyCycleBase,
// statement for statement: the tests run both (MOLT_SHIM_CYCLE=python).
#include "asgi_cycle.hpp"

#include <structmember.h>

#include <cstddef>
#include <string>

#include "suspend_hook.hpp"
#include "wsgi_call.hpp"

namespace molt::native {
namespace {

constexpr Py_ssize_t kJoinMax = 16 * 1024;  // asgi_cycle.JOIN_MAX: copied behind the head
constexpr Py_ssize_t kUnframed = -1;        // asgi_cycle.UNFRAMED: the close ends the body

enum Name {
    kType,
    kStatus,
    kHeaders,
    kBody,
    kMoreBody,
    kMethod,
    kHttpVersion,
    kHead,
    kVersion10,
    kResponseStart,
    kResponseBody,
    kDefaultHead,
    kDefaultClose,
    kWrite,
    kWritelines,
    kIsClosing,
    kClose,
    kWake,
    kQueueHead,
    kTransport,
    kFlow,
    kOnResponseComplete,
    kGet,
    kDecode,
    kNames
};

constexpr const char* kNameText[] = {"type",
                                     "status",
                                     "headers",
                                     "body",
                                     "more_body",
                                     "method",
                                     "http_version",
                                     "HEAD",
                                     "1.0",
                                     "http.response.start",
                                     "http.response.body",
                                     "default_head",
                                     "default_close",
                                     "write",
                                     "writelines",
                                     "is_closing",
                                     "close",
                                     "wake",
                                     "queue_head",
                                     "transport",
                                     "flow",
                                     "on_response_complete",
                                     "get",
                                     "decode"};
static_assert(sizeof(kNameText) / sizeof(kNameText[0]) == kNames, "one text per name");

struct CycleRulesObject {
    PyObject_HEAD PyObject* ctl;  // the engine's DrainControl: default_head, default_close
    PyObject* status_lines;       // uvicorn's STATUS_LINE: status -> b"HTTP/1.1 200 OK\r\n"
    PyObject* known_headers;      // asgi_cycle.KNOWN_HEADERS: (name, value) -> (line, kind)
    PyObject* header_line;        // asgi_cycle.header_line: a field seen for the first time
    PyObject* kind_content_length;
    PyObject* kind_chunked;
    PyObject* kind_close;
    PyObject* close_line;  // b"connection: close\r\n"
    PyObject* empty_bytes;
    PyObject* empty_tuple;
    PyObject* chunk_format;  // b"%x\r\n%b\r\n", for a body that is not bytes
    PyObject* last_chunk;    // b"0\r\n\r\n"
    PyObject* names[kNames];
};

struct AsgiCycleObject {
    PyObject_HEAD PyObject* protocol;
    PyObject* scope;
    PyObject* transport;
    PyObject* flow;
    PyObject* keep_alive;
    PyObject* asked_close;
    PyObject* waiting_for_100_continue;
    PyObject* body;
    PyObject* more_body;
    PyObject* request_read;
    PyObject* waiters;
    PyObject* disconnected;
    PyObject* response_started;
    PyObject* response_complete;
    PyObject* chunked;
    PyObject* remaining;
    PyObject* head;
    PyObject* on_response;
    PyObject* task;
    PyObject* hook;
    PyObject* rules;  // CycleRulesObject
};

AsgiCycleObject* as_cycle(PyObject* self) {
    return reinterpret_cast<AsgiCycleObject*>(self);
}

// A field's value, a reference of its own (a callback may replace the field while it is used);
// null with Python's own AttributeError when the field is unset (deleted, or cleared), as a read
// of PyCycleBase's slot raises.
PyRef field(PyObject* self, PyObject* value, const char* name) {
    if (value != nullptr) return PyRef::borrow(value);
    return PyRef::steal(PyObject_GetAttrString(self, name));
}
#define FIELD(name) field(self, as_cycle(self)->name, #name)

// A field takes a new value (a new reference of its own); the old one is dropped after, as
// Py_XSETREF does (not in the stable ABI).
void set_field(PyObject** field, PyObject* value) {
    PyObject* old = *field;
    Py_XINCREF(value);
    *field = value;
    Py_XDECREF(old);
}

void set_flag(PyObject** field, bool value) {
    set_field(field, value ? Py_True : Py_False);
}

// A value's truth, as `if value:` reads it: 1, 0, or -1 with an exception (also for a value
// that could not be read).
int truth(const PyRef& value) {
    if (!value) return -1;
    if (value.get() == Py_True) return 1;
    if (value.get() == Py_False || value.get() == Py_None) return 0;
    return PyObject_IsTrue(value.get());
}

// message.get(key, default), for a plain dict without a call.
PyRef message_get(CycleRulesObject* r, PyObject* message, PyObject* key, PyObject* fallback) {
    if (PyDict_CheckExact(message)) {
        PyObject* value = PyDict_GetItemWithError(message, key);
        if (value != nullptr) return PyRef::borrow(value);
        if (PyErr_Occurred()) return PyRef();
        return PyRef::borrow(fallback);
    }
    return PyRef::steal(
        PyObject_CallMethodObjArgs(message, r->names[kGet], key, fallback, nullptr));
}

// obj[key], for a plain dict without a call (the message, the scope, the status lines); a
// missing key raises as obj[key] does.
PyRef item(PyObject* obj, PyObject* key) {
    if (PyDict_CheckExact(obj)) {
        PyObject* value = PyDict_GetItemWithError(obj, key);
        if (value != nullptr) return PyRef::borrow(value);
        if (PyErr_Occurred()) return PyRef();
    }
    return PyRef::steal(PyObject_GetItem(obj, key));
}

// obj == text (an interned str): identity first, as the comparisons in Python.
int equals(PyObject* obj, PyObject* text) {
    if (obj == text) return 1;
    return PyObject_RichCompareBool(obj, text, Py_EQ);
}

// RuntimeError(format % arg), as PyCycleBase raises it; always null.
PyObject* raise_formatted(PyObject* format, PyObject* arg) {
    if (format == nullptr) return nullptr;
    PyRef message = PyRef::steal(PyUnicode_Format(format, arg));
    if (message) PyErr_SetObject(PyExc_RuntimeError, message.get());
    return nullptr;
}

// The message's type is `expected`, or false with the RuntimeError PyCycleBase.deliver raises.
bool expect_kind(PyObject* kind, PyObject* expected) {
    int eq = equals(kind, expected);
    if (eq == 0) {
        PyRef format = PyRef::steal(
            PyUnicode_FromFormat("Expected ASGI message '%U', but got '%%s'.", expected));
        raise_formatted(format.get(), kind);
    }
    return eq == 1;
}

bool append_bytes(std::string& out, PyObject* bytes) {
    char* data = nullptr;
    Py_ssize_t size = 0;
    if (PyBytes_AsStringAndSize(bytes, &data, &size) < 0) return false;
    out.append(data, static_cast<size_t>(size));
    return true;
}

PyRef call_method(PyObject* obj, PyObject* name, PyObject* arg = nullptr) {
    return PyRef::steal(PyObject_CallMethodObjArgs(obj, name, arg, nullptr));
}

// int(value.decode()) of a Content-Length header_line() has checked (ASCII digits, at most
// 18 of them): -1 with an exception if it is not one.
Py_ssize_t content_length(PyObject* decode_name, PyObject* value) {
    if (PyBytes_Check(value)) {
        char* data = nullptr;
        Py_ssize_t size = 0;
        if (PyBytes_AsStringAndSize(value, &data, &size) < 0) return -1;
        Py_ssize_t n = 0;
        bool digits = size > 0 && size <= 18;
        for (Py_ssize_t i = 0; digits && i < size; ++i) {
            if (data[i] < '0' || data[i] > '9') digits = false;
            n = n * 10 + (data[i] - '0');
        }
        if (digits) return n;
    }
    PyRef text = call_method(value, decode_name);
    if (!text) return -1;
    PyRef number = PyRef::steal(PyNumber_Long(text.get()));
    if (!number) return -1;
    return PyLong_AsSsize_t(number.get());
}

// The status is 304 or 204 (`status == 304 or status == 204`).
int no_body_status(PyObject* status) {
    if (PyLong_CheckExact(status)) {
        long code = PyLong_AsLong(status);
        if (code == -1 && PyErr_Occurred()) return -1;
        return code == 304 || code == 204;
    }
    for (long code : {304L, 204L}) {
        PyRef number = PyRef::steal(PyLong_FromLong(code));
        if (!number) return -1;
        int eq = PyObject_RichCompareBool(status, number.get(), Py_EQ);
        if (eq != 0) return eq;
    }
    return 0;
}

// self.scope["method"] == "HEAD": 1, 0, or -1 with an exception.
int head_request(PyObject* self, CycleRulesObject* r) {
    PyRef scope = FIELD(scope);
    if (!scope) return -1;
    PyRef method = item(scope.get(), r->names[kMethod]);
    if (!method) return -1;
    return equals(method.get(), r->names[kHead]);
}

// PyCycleBase.start_response: the head made from the app's http.response.start, kept until its
// first body message. Nothing of the cycle changes unless the head is valid.
bool start_response(PyObject* self, CycleRulesObject* r, PyObject* message) {
    PyRef status = item(message, r->names[kStatus]);
    if (!status) return false;
    PyRef status_line = item(r->status_lines, status.get());
    if (!status_line) return false;
    PyRef default_head = PyRef::steal(PyObject_GetAttr(r->ctl, r->names[kDefaultHead]));
    if (!default_head) return false;
    PyRef default_close = PyRef::steal(PyObject_GetAttr(r->ctl, r->names[kDefaultClose]));
    int close_sent = truth(default_close);
    if (close_sent < 0) return false;
    int keep_alive = truth(FIELD(keep_alive));
    if (keep_alive < 0) return false;
    keep_alive = keep_alive && !close_sent;
    int chunked = -1;  // None: no framing header from the app (yet)
    Py_ssize_t remaining = 0;
    std::string head;
    head.reserve(256);
    if (!append_bytes(head, status_line.get()) || !append_bytes(head, default_head.get())) {
        return false;
    }
    PyRef headers = message_get(r, message, r->names[kHeaders], r->empty_tuple);
    if (!headers) return false;
    PyRef fields = PyRef::steal(PyObject_GetIter(headers.get()));
    if (!fields) return false;
    while (PyRef pair = PyRef::steal(PyIter_Next(fields.get()))) {
        PyRef entry = PyRef::borrow(PyDict_GetItemWithError(r->known_headers, pair.get()));
        if (!entry) {
            if (PyErr_Occurred()) {  // unhashable (a list): header_line() says what it is
                if (!PyErr_ExceptionMatches(PyExc_TypeError) &&
                    !PyErr_ExceptionMatches(PyExc_KeyError)) {
                    return false;
                }
                PyErr_Clear();
            }
            entry = PyRef::steal(PyObject_CallFunctionObjArgs(r->header_line, pair.get(), nullptr));
            if (!entry) return false;
        }
        if (!PyTuple_Check(entry.get()) || PyTuple_Size(entry.get()) != 2) {
            PyErr_SetString(PyExc_TypeError, "header_line() gives (line, kind)");
            return false;
        }
        if (!append_bytes(head, PyTuple_GetItem(entry.get(), 0))) return false;
        PyObject* kind = PyTuple_GetItem(entry.get(), 1);
        if (kind == Py_None) continue;
        if (kind == r->kind_content_length) {
            if (chunked == -1) {
                PyRef value = PyRef::steal(PySequence_GetItem(pair.get(), 1));
                if (!value) return false;
                remaining = content_length(r->names[kDecode], value.get());
                if (remaining == -1 && PyErr_Occurred()) return false;
                chunked = 0;
            }
        } else if (kind == r->kind_chunked) {
            remaining = 0;
            chunked = 1;
        } else {  // close
            keep_alive = 0;
            close_sent = 1;
        }
    }
    if (PyErr_Occurred()) return false;
    int asked_close = truth(FIELD(asked_close));
    if (asked_close < 0) return false;
    if (asked_close && !close_sent && !append_bytes(head, r->close_line)) return false;
    int no_body = no_body_status(status.get());
    if (no_body < 0) return false;
    if (no_body) {
        // No body, whatever a Content-Length says: the response ends with its head.
        chunked = -1;
        remaining = 0;
    } else if (chunked == -1) {
        int is_head = head_request(self, r);
        if (is_head < 0) return false;
        if (!is_head) {
            PyRef scope = FIELD(scope);
            if (!scope) return false;
            PyRef version = item(scope.get(), r->names[kHttpVersion]);
            if (!version) return false;
            int is_10 = equals(version.get(), r->names[kVersion10]);
            if (is_10 < 0) return false;
            if (is_10) {
                remaining = kUnframed;  // no chunked coding for HTTP/1.0: the close ends it
            } else {
                chunked = 1;
                head.append("transfer-encoding: chunked\r\n");
            }
        }
    }
    head.append("\r\n");
    PyRef head_bytes = PyRef::steal(PyBytes_FromStringAndSize(head.data(), head.size()));
    PyRef remaining_obj = PyRef::steal(PyLong_FromSsize_t(remaining));
    if (!head_bytes || !remaining_obj) return false;
    // Only a valid head starts the response: an app whose headers raise gets a 500.
    AsgiCycleObject* c = as_cycle(self);
    set_flag(&c->response_started, true);
    set_flag(&c->waiting_for_100_continue, false);
    set_flag(&c->keep_alive, keep_alive != 0);
    set_field(&c->chunked, chunked < 0 ? Py_None : chunked ? Py_True : Py_False);
    set_field(&c->remaining, remaining_obj.get());
    set_field(&c->head, head_bytes.get());
    PyRef hook = FIELD(hook);
    if (!hook) return false;
    if (hook.get() != Py_None) {
        int running = suspend_hook_running(hook.get());
        if (running < 0) {
            running = truth(PyRef::steal(PyObject_GetAttrString(hook.get(), "running")));
            if (running < 0) return false;
        }
        if (running) return true;  // it goes with the first body, or alone at the suspension
    }
    return static_cast<bool>(call_method(self, r->names[kQueueHead]));
}

// b"%x\r\n%b\r\n" % (len(body), body) if body else b"", and the last chunk when nothing more
// comes: bytes framed here, any other body by the same expression as PyCycleBase's.
PyRef chunk(CycleRulesObject* r, PyObject* body, bool more_body) {
    PyRef framed;
    if (PyBytes_Check(body)) {
        char* data = nullptr;
        Py_ssize_t size = 0;
        if (PyBytes_AsStringAndSize(body, &data, &size) < 0) return PyRef();
        std::string out;
        if (size > 0) {
            char length[32];
            int n = snprintf(length, sizeof length, "%zx\r\n", static_cast<size_t>(size));
            out.reserve(static_cast<size_t>(size) + 24);
            out.append(length, static_cast<size_t>(n));
            out.append(data, static_cast<size_t>(size));
            out.append("\r\n");
        }
        if (!more_body) out.append("0\r\n\r\n");
        return PyRef::steal(PyBytes_FromStringAndSize(out.data(), out.size()));
    }
    int nonempty = PyObject_IsTrue(body);
    if (nonempty < 0) return PyRef();
    if (nonempty) {
        Py_ssize_t size = PyObject_Size(body);
        if (size < 0) return PyRef();
        PyRef args = PyRef::steal(Py_BuildValue("(nO)", size, body));
        if (!args) return PyRef();
        framed = PyRef::steal(PyNumber_Remainder(r->chunk_format, args.get()));
    } else {
        framed = PyRef::borrow(r->empty_bytes);
    }
    if (!framed || more_body) return framed;
    return PyRef::steal(PyNumber_Add(framed.get(), r->last_chunk));
}

// head + body, one object for one write.
PyRef joined(PyObject* head, PyObject* body) {
    if (!PyBytes_Check(head) || !PyBytes_Check(body)) {
        return PyRef::steal(PyNumber_Add(head, body));
    }
    Py_ssize_t head_size = PyBytes_Size(head);
    Py_ssize_t body_size = PyBytes_Size(body);
    PyRef out = PyRef::steal(PyBytes_FromStringAndSize(nullptr, head_size + body_size));
    if (!out) return out;
    char* to = PyBytes_AsString(out.get());
    memcpy(to, PyBytes_AsString(head), static_cast<size_t>(head_size));
    memcpy(to + head_size, PyBytes_AsString(body), static_cast<size_t>(body_size));
    return out;
}

// The remaining Content-Length (PyCycleBase.remaining): -2 with an exception.
Py_ssize_t remaining_of(PyObject* self) {
    PyRef value = FIELD(remaining);
    if (!value) return -2;
    Py_ssize_t n = PyLong_AsSsize_t(value.get());
    return n == -1 && PyErr_Occurred() ? -2 : n;
}

// PyCycleBase.send_body: a body message framed, written (with the head when it has not gone),
// and the response's end. Each field is read where PyCycleBase reads it: the callbacks (the
// transport's, on_response, wake) may change them.
bool send_body(PyObject* self, CycleRulesObject* r, PyObject* message_body, bool more_body) {
    AsgiCycleObject* c = as_cycle(self);
    PyRef body = PyRef::borrow(message_body);
    int is_head = head_request(self, r);
    if (is_head < 0) return false;
    int chunked = is_head ? 0 : truth(FIELD(chunked));
    if (chunked < 0) return false;
    if (is_head) {
        PyRef zero = PyRef::steal(PyLong_FromLong(0));
        if (!zero) return false;
        set_field(&c->remaining, zero.get());
        body = PyRef::borrow(r->empty_bytes);
    } else if (chunked) {
        body = chunk(r, body.get(), more_body);
        if (!body) return false;
    } else {
        Py_ssize_t remaining = remaining_of(self);
        if (remaining == -2) return false;
        if (remaining != kUnframed) {
            Py_ssize_t size = PyObject_Size(body.get());
            if (size < 0) return false;
            if (size > remaining) {
                PyErr_SetString(PyExc_RuntimeError, "Response content longer than Content-Length");
                return false;
            }
            PyRef left = PyRef::steal(PyLong_FromSsize_t(remaining - size));
            if (!left) return false;
            set_field(&c->remaining, left.get());
        }
    }
    PyRef head = FIELD(head);
    if (!head) return false;
    PyRef transport = FIELD(transport);
    if (!transport) return false;
    int closing = truth(call_method(transport.get(), r->names[kIsClosing]));
    if (closing < 0) return false;
    if (closing) {  // closed under the app (a timeout, a reset): dropped
        head = PyRef::borrow(Py_None);
        set_field(&c->head, Py_None);
        body = PyRef::borrow(r->empty_bytes);
    }
    if (head.get() != Py_None) {
        set_field(&c->head, Py_None);
        Py_ssize_t size = PyObject_Size(body.get());
        if (size < 0) return false;
        transport = FIELD(transport);
        if (!transport) return false;
        PyRef written;
        if (size <= kJoinMax) {
            PyRef data = joined(head.get(), body.get());
            if (!data) return false;
            written = call_method(transport.get(), r->names[kWrite], data.get());
        } else {
            PyRef parts = PyRef::steal(PyTuple_Pack(2, head.get(), body.get()));
            if (!parts) return false;
            written = call_method(transport.get(), r->names[kWritelines], parts.get());
        }
        if (!written) return false;
    } else {
        int nonempty = PyObject_IsTrue(body.get());
        if (nonempty < 0) return false;
        if (nonempty) {
            transport = FIELD(transport);
            if (!transport || !call_method(transport.get(), r->names[kWrite], body.get())) {
                return false;
            }
        }
    }
    if (more_body) return true;
    Py_ssize_t remaining = remaining_of(self);
    if (remaining == -2) return false;
    if (remaining > 0) {
        PyErr_SetString(PyExc_RuntimeError, "Response content shorter than Content-Length");
        return false;
    }
    set_flag(&c->response_complete, true);
    int waiting = truth(FIELD(waiters));
    if (waiting < 0) return false;
    if (waiting && !call_method(self, r->names[kWake])) return false;
    int keep_alive = truth(FIELD(keep_alive));
    if (keep_alive < 0) return false;
    if (!keep_alive) {
        transport = FIELD(transport);
        if (!transport || !call_method(transport.get(), r->names[kClose])) return false;
    }
    PyRef on_response = FIELD(on_response);
    if (!on_response) return false;
    return static_cast<bool>(PyRef::steal(PyObject_CallObject(on_response.get(), nullptr)));
}

// Cycle.deliver(message): send() once its client has taken the bytes before (Cycle.send waits
// for that in Python, then calls this).
PyObject* cycle_deliver(PyObject* self, PyObject* message) {
    PyRef rules = PyRef::borrow(as_cycle(self)->rules);  // held: a callback may re-init the cycle
    if (!rules) {
        PyErr_SetString(PyExc_RuntimeError, "AsgiCycle.__init__ has not run");
        return nullptr;
    }
    auto* r = reinterpret_cast<CycleRulesObject*>(rules.get());
    int disconnected = truth(FIELD(disconnected));
    if (disconnected < 0) return nullptr;
    if (disconnected) Py_RETURN_NONE;
    PyRef kind = item(message, r->names[kType]);
    if (!kind) return nullptr;
    int started = truth(FIELD(response_started));
    if (started < 0) return nullptr;
    if (!started) {
        if (!expect_kind(kind.get(), r->names[kResponseStart])) return nullptr;
        if (!start_response(self, r, message)) return nullptr;
        Py_RETURN_NONE;
    }
    int complete = truth(FIELD(response_complete));
    if (complete < 0) return nullptr;
    if (complete) {
        PyRef format = PyRef::steal(PyUnicode_FromString(
            "Unexpected ASGI message '%s' sent, after response already completed."));
        return raise_formatted(format.get(), kind.get());
    }
    if (!expect_kind(kind.get(), r->names[kResponseBody])) return nullptr;
    PyRef body = message_get(r, message, r->names[kBody], r->empty_bytes);
    if (!body) return nullptr;
    PyRef more = message_get(r, message, r->names[kMoreBody], Py_False);
    if (!more) return nullptr;
    int more_body = PyObject_IsTrue(more.get());
    if (more_body < 0) return nullptr;
    if (!send_body(self, r, body.get(), more_body != 0)) return nullptr;
    Py_RETURN_NONE;
}

void cycle_rules_dealloc(PyObject* self);

// AsgiCycle(rules, protocol, scope, keep_alive, asked_close, expect_100): PyCycleBase.__init__.
int cycle_init(PyObject* self, PyObject* args, PyObject* kwargs) {
    PyObject* rules = nullptr;
    PyObject* protocol = nullptr;
    PyObject* scope = nullptr;
    PyObject* keep_alive = nullptr;
    PyObject* asked_close = nullptr;
    PyObject* expect_100 = nullptr;
    if (kwargs != nullptr && PyDict_Size(kwargs) != 0) {
        PyErr_SetString(PyExc_TypeError, "AsgiCycle() takes no keyword arguments");
        return -1;
    }
    if (!PyArg_UnpackTuple(args, "AsgiCycle", 6, 6, &rules, &protocol, &scope, &keep_alive,
                           &asked_close, &expect_100)) {
        return -1;
    }
    if (PyType_GetSlot(Py_TYPE(rules), Py_tp_dealloc) !=
        reinterpret_cast<void*>(cycle_rules_dealloc)) {
        PyErr_SetString(PyExc_TypeError, "AsgiCycle(): rules must be made by asgi_cycle_rules()");
        return -1;
    }
    auto* r = reinterpret_cast<CycleRulesObject*>(rules);
    PyRef transport = PyRef::steal(PyObject_GetAttr(protocol, r->names[kTransport]));
    if (!transport) return -1;
    PyRef flow = PyRef::steal(PyObject_GetAttr(protocol, r->names[kFlow]));
    if (!flow) return -1;
    PyRef on_response = PyRef::steal(PyObject_GetAttr(protocol, r->names[kOnResponseComplete]));
    if (!on_response) return -1;
    PyRef zero = PyRef::steal(PyLong_FromLong(0));
    if (!zero) return -1;
    AsgiCycleObject* c = as_cycle(self);
    set_field(&c->rules, rules);
    set_field(&c->protocol, protocol);
    set_field(&c->scope, scope);
    set_field(&c->transport, transport.get());
    set_field(&c->flow, flow.get());
    set_field(&c->keep_alive, keep_alive);
    set_field(&c->asked_close, asked_close);  // the request said Connection: close
    set_field(&c->waiting_for_100_continue, expect_100);
    set_field(&c->body, r->empty_bytes);
    set_flag(&c->more_body, true);
    set_flag(&c->request_read, false);  // the app has received the request's last body message
    set_field(&c->waiters, Py_None);    // the futures of the receive() calls waiting now
    set_flag(&c->disconnected, false);
    set_flag(&c->response_started, false);
    set_flag(&c->response_complete, false);
    set_field(&c->chunked, Py_None);
    set_field(&c->remaining, zero.get());  // response body bytes still due under Content-Length
    set_field(&c->head, Py_None);          // the response head, until its first body goes
    set_field(&c->on_response, on_response.get());  // None once the app returned
    set_field(&c->task, Py_None);
    set_field(&c->hook, Py_None);  // the extension's SuspendHook the app runs in, while it runs
    return 0;
}

constexpr PyMemberDef member(const char* name, Py_ssize_t offset, int flags = 0) {
    return {name, T_OBJECT_EX, offset, flags, nullptr};
}

// Every field, as the Python class's __slots__ (T_OBJECT_EX: an unset field reads as
// AttributeError, and CPython specialises reads and writes of these as it does a slot's). The
// rules come first: a clear drops them before the fields a re-entered deliver() would read.
PyMemberDef cycle_members[] = {
    member("rules", offsetof(AsgiCycleObject, rules), READONLY),
    member("protocol", offsetof(AsgiCycleObject, protocol)),
    member("scope", offsetof(AsgiCycleObject, scope)),
    member("transport", offsetof(AsgiCycleObject, transport)),
    member("flow", offsetof(AsgiCycleObject, flow)),
    member("keep_alive", offsetof(AsgiCycleObject, keep_alive)),
    member("asked_close", offsetof(AsgiCycleObject, asked_close)),
    member("waiting_for_100_continue", offsetof(AsgiCycleObject, waiting_for_100_continue)),
    member("body", offsetof(AsgiCycleObject, body)),
    member("more_body", offsetof(AsgiCycleObject, more_body)),
    member("request_read", offsetof(AsgiCycleObject, request_read)),
    member("waiters", offsetof(AsgiCycleObject, waiters)),
    member("disconnected", offsetof(AsgiCycleObject, disconnected)),
    member("response_started", offsetof(AsgiCycleObject, response_started)),
    member("response_complete", offsetof(AsgiCycleObject, response_complete)),
    member("chunked", offsetof(AsgiCycleObject, chunked)),
    member("remaining", offsetof(AsgiCycleObject, remaining)),
    member("head", offsetof(AsgiCycleObject, head)),
    member("on_response", offsetof(AsgiCycleObject, on_response)),
    member("task", offsetof(AsgiCycleObject, task)),
    member("hook", offsetof(AsgiCycleObject, hook)),
    {nullptr, 0, 0, 0, nullptr}};

PyObject*& field_at(PyObject* self, Py_ssize_t offset) {
    return *reinterpret_cast<PyObject**>(reinterpret_cast<char*>(self) + offset);
}

// Whether this interpreter leaves the visit of a heap type to its heap base's tp_traverse (3.9
// on): 3.8's subtype_traverse visits it itself, and a second visit from here would miscount it
// for the instances of Cycle, AsgiCycle's Python subclass (bpo-40217).
bool base_visits_heap_type() {
    static const bool visits = [] {
        int major = 0;
        int minor = 0;
        return sscanf(Py_GetVersion(), "%d.%d", &major, &minor) == 2 &&
               (major > 3 || (major == 3 && minor >= 9));
    }();
    return visits;
}

int cycle_traverse(PyObject* self, visitproc visit, void* arg) {
    for (const PyMemberDef* m = cycle_members; m->name != nullptr; ++m) {
        Py_VISIT(field_at(self, m->offset));
    }
    if (base_visits_heap_type()) Py_VISIT(Py_TYPE(self));
    return 0;
}

int cycle_clear(PyObject* self) {
    for (const PyMemberDef* m = cycle_members; m->name != nullptr; ++m) {
        Py_CLEAR(field_at(self, m->offset));
    }
    return 0;
}

void cycle_dealloc(PyObject* self) {
    PyObject_GC_UnTrack(self);
    cycle_clear(self);
    free_heap_object(self);
}

PyMethodDef cycle_methods[] = {
    {"deliver", cycle_deliver, METH_O,
     "send(message) once the client has taken what was written before: the response's head, "
     "its body, its end."},
    {nullptr, nullptr, 0, nullptr}};

PyType_Slot cycle_slots[] = {
    {Py_tp_init, reinterpret_cast<void*>(cycle_init)},
    {Py_tp_new, reinterpret_cast<void*>(PyType_GenericNew)},
    {Py_tp_members, cycle_members},
    {Py_tp_methods, cycle_methods},
    {Py_tp_traverse, reinterpret_cast<void*>(cycle_traverse)},
    {Py_tp_clear, reinterpret_cast<void*>(cycle_clear)},
    {Py_tp_dealloc, reinterpret_cast<void*>(cycle_dealloc)},
    {Py_tp_doc, const_cast<char*>("One ASGI request and its response: the state and the response "
                                  "side of engines/asgi_cycle.py's Cycle.")},
    {0, nullptr}};

// -- CycleRules ---------------------------------------------------------------------------------

constexpr Py_ssize_t kRulesFields[] = {offsetof(CycleRulesObject, ctl),
                                       offsetof(CycleRulesObject, status_lines),
                                       offsetof(CycleRulesObject, known_headers),
                                       offsetof(CycleRulesObject, header_line),
                                       offsetof(CycleRulesObject, kind_content_length),
                                       offsetof(CycleRulesObject, kind_chunked),
                                       offsetof(CycleRulesObject, kind_close),
                                       offsetof(CycleRulesObject, close_line),
                                       offsetof(CycleRulesObject, empty_bytes),
                                       offsetof(CycleRulesObject, empty_tuple),
                                       offsetof(CycleRulesObject, chunk_format),
                                       offsetof(CycleRulesObject, last_chunk)};

int cycle_rules_traverse(PyObject* self, visitproc visit, void* arg) {
    for (Py_ssize_t offset : kRulesFields) Py_VISIT(field_at(self, offset));
    for (PyObject* name : reinterpret_cast<CycleRulesObject*>(self)->names) Py_VISIT(name);
    Py_VISIT(Py_TYPE(self));
    return 0;
}

int cycle_rules_clear(PyObject* self) {
    for (Py_ssize_t offset : kRulesFields) Py_CLEAR(field_at(self, offset));
    for (PyObject*& name : reinterpret_cast<CycleRulesObject*>(self)->names) Py_CLEAR(name);
    return 0;
}

void cycle_rules_dealloc(PyObject* self) {
    PyObject_GC_UnTrack(self);
    cycle_rules_clear(self);
    free_heap_object(self);
}

PyObject* made_by_cycle_rules(PyTypeObject*, PyObject*, PyObject*) {
    PyErr_SetString(PyExc_TypeError, "CycleRules is made by _molt_native.asgi_cycle_rules()");
    return nullptr;
}

PyType_Slot cycle_rules_slots[] = {
    {Py_tp_traverse, reinterpret_cast<void*>(cycle_rules_traverse)},
    {Py_tp_clear, reinterpret_cast<void*>(cycle_rules_clear)},
    {Py_tp_dealloc, reinterpret_cast<void*>(cycle_rules_dealloc)},
    {Py_tp_new, reinterpret_cast<void*>(made_by_cycle_rules)},
    {Py_tp_doc, const_cast<char*>("What the ASGI cycles of one engine share; made by "
                                  "asgi_cycle_rules().")},
    {0, nullptr}};

}  // namespace

PyType_Spec asgi_cycle_spec = {"_molt_native.AsgiCycle", sizeof(AsgiCycleObject), 0,
                               Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE | Py_TPFLAGS_HAVE_GC,
                               cycle_slots};

PyType_Spec cycle_rules_spec = {"_molt_native.CycleRules", sizeof(CycleRulesObject), 0,
                                Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC, cycle_rules_slots};

PyObject* new_cycle_rules(PyObject* type, PyObject* args) {
    PyObject* ctl = nullptr;
    PyObject* status_lines = nullptr;
    PyObject* known_headers = nullptr;
    PyObject* header_line = nullptr;
    PyObject* kind_content_length = nullptr;
    PyObject* kind_chunked = nullptr;
    PyObject* kind_close = nullptr;
    PyObject* close_line = nullptr;
    if (!PyArg_ParseTuple(args, "OOO!O(OOO)O!", &ctl, &status_lines, &PyDict_Type, &known_headers,
                          &header_line, &kind_content_length, &kind_chunked, &kind_close,
                          &PyBytes_Type, &close_line)) {
        return nullptr;
    }
    auto* r = alloc_object<CycleRulesObject>(type);
    if (r == nullptr) return nullptr;
    PyObject* self = reinterpret_cast<PyObject*>(r);
    set_field(&r->ctl, ctl);
    set_field(&r->status_lines, status_lines);
    set_field(&r->known_headers, known_headers);
    set_field(&r->header_line, header_line);
    set_field(&r->kind_content_length, kind_content_length);
    set_field(&r->kind_chunked, kind_chunked);
    set_field(&r->kind_close, kind_close);
    set_field(&r->close_line, close_line);
    r->empty_bytes = PyBytes_FromStringAndSize("", 0);
    r->empty_tuple = PyTuple_New(0);
    r->chunk_format = PyBytes_FromString("%x\r\n%b\r\n");
    r->last_chunk = PyBytes_FromString("0\r\n\r\n");
    bool made = r->empty_bytes != nullptr && r->empty_tuple != nullptr &&
                r->chunk_format != nullptr && r->last_chunk != nullptr;
    for (int i = 0; made && i < kNames; ++i) {
        r->names[i] = PyUnicode_InternFromString(kNameText[i]);
        made = r->names[i] != nullptr;
    }
    if (!made) {
        Py_DECREF(self);
        return nullptr;
    }
    return self;
}

}  // namespace molt::native
