// _molt_native: the module (multi-phase init, PEP 489), its state and the Server type.
//
// The Python side (molt_shim/engines/native.py) builds a Server with make_server() and drives
// it from the lifecycle's thread; the serving threads live in engine.cpp. The module keeps no
// globals: its heap types live in the module state, and a Server holds the module alive.
#include <exception>
#include <string>

#include "accept_balance.hpp"
#include "asgi_cycle.hpp"
#include "asgi_io.hpp"
#include "asgi_parser.hpp"
#include "framing_guard.hpp"
#include "spare.hpp"
#include "suspend_hook.hpp"
#include "task_registry.hpp"
#include "task_starter.hpp"
#include "wsgi_call.hpp"

namespace molt::native {
namespace {

struct ModuleState {
    PyObject* server_type;
    PyObject* errors_type;
    PyObject* start_response_type;
    PyObject* input_type;
    PyObject* guard_type;
    PyObject* asgi_parser_type;
    PyObject* io_hub_type;
    PyObject* io_transport_type;
    PyObject* suspend_hook_type;
    PyObject* task_registry_type;
    PyObject* task_starter_type;
    PyObject* asgi_cycle_type;
    PyObject* cycle_rules_type;
    PyObject* send_name;  // "send": what a SuspendHook calls on its coroutine per step
    PyObject* env_keys[static_cast<int>(EnvKey::count)];
    AsgiStrings asgi_strings;
};

ModuleState* state_of(PyObject* module) {
    return static_cast<ModuleState*>(PyModule_GetState(module));
}

struct ServerObject {
    PyObject_HEAD Server* server;
    PyObject* module;  // strong: the types handle() creates objects of live in its state
};

Server* server_of(PyObject* self) {
    Server* server = reinterpret_cast<ServerObject*>(self)->server;
    if (server == nullptr) PyErr_SetString(PyExc_RuntimeError, "the server is closed");
    return server;
}

// Runs a Server method, turning a C++ exception into a Python one (none crosses into CPython).
template <typename F>
PyObject* guarded(PyObject* self, F&& body) {
    Server* server = server_of(self);
    if (server == nullptr) return nullptr;
    try {
        return body(*server);
    } catch (const std::exception& exc) {
        PyErr_Format(PyExc_RuntimeError, "native engine: %s", exc.what());
    } catch (...) {
        PyErr_SetString(PyExc_RuntimeError, "native engine: unknown C++ exception");
    }
    return nullptr;
}

PyObject* server_start(PyObject* self, PyObject*) {
    return guarded(self, [](Server& s) {
        s.start();
        Py_RETURN_NONE;
    });
}

PyObject* server_listen(PyObject* self, PyObject*) {
    return guarded(self, [](Server& s) {
        s.listen();
        Py_RETURN_NONE;
    });
}

PyObject* server_submit_warmup(PyObject* self, PyObject* arg) {
    const long fd = PyLong_AsLong(arg);
    if (fd < 0 && PyErr_Occurred()) return nullptr;
    return guarded(self, [fd](Server& s) {
        s.submit_warmup(static_cast<int>(fd));
        Py_RETURN_NONE;
    });
}

PyObject* server_tick(PyObject* self, PyObject*) {
    return guarded(self, [](Server& s) {
        s.tick();
        Py_RETURN_NONE;
    });
}

PyObject* server_stop_accepting(PyObject* self, PyObject*) {
    return guarded(self, [](Server& s) {
        s.stop_accepting();
        Py_RETURN_NONE;
    });
}

PyObject* server_drained(PyObject* self, PyObject*) {
    return guarded(self, [](Server& s) { return PyBool_FromLong(s.drained() ? 1 : 0); });
}

PyObject* server_counters(PyObject* self, PyObject*) {
    return guarded(self, [](Server& s) {
        const Server::Counters c = s.counters();
        return Py_BuildValue("(KKdKs#K)", static_cast<unsigned long long>(c.requests),
                             static_cast<unsigned long long>(c.inflight), c.oldest_started,
                             static_cast<unsigned long long>(c.connections), c.durations.data(),
                             static_cast<Py_ssize_t>(c.durations.size()),
                             static_cast<unsigned long long>(c.exceptions));
    });
}

PyObject* server_take_logs(PyObject* self, PyObject*) {
    return guarded(self, [](Server& s) -> PyObject* {
        const auto lines = s.take_logs();
        PyRef out = PyRef::steal(PyList_New(0));
        if (!out) return nullptr;
        for (const auto& [level, text] : lines) {
            PyRef entry = PyRef::steal(
                Py_BuildValue("(iN)", level,
                              PyUnicode_DecodeUTF8(
                                  text.data(), static_cast<Py_ssize_t>(text.size()), "replace")));
            if (!entry || PyList_Append(out.get(), entry.get()) != 0) return nullptr;
        }
        return out.release();
    });
}

PyObject* server_take_access(PyObject* self, PyObject*) {
    return guarded(self, [](Server& s) -> PyObject* {
        const auto entries = s.take_access();
        PyRef out = PyRef::steal(PyList_New(0));
        if (!out) return nullptr;
        for (const AccessEntry& e : entries) {
            PyRef entry = PyRef::steal(Py_BuildValue(
                "(NNNNiKdOO)",
                PyUnicode_DecodeLatin1(e.remote.data(), static_cast<Py_ssize_t>(e.remote.size()),
                                       nullptr),
                PyUnicode_DecodeLatin1(e.method.data(), static_cast<Py_ssize_t>(e.method.size()),
                                       nullptr),
                PyUnicode_DecodeLatin1(e.target.data(), static_cast<Py_ssize_t>(e.target.size()),
                                       nullptr),
                PyUnicode_DecodeLatin1(e.protocol.data(),
                                       static_cast<Py_ssize_t>(e.protocol.size()), nullptr),
                e.status, static_cast<unsigned long long>(e.bytes), e.duration_ms, Py_None,
                Py_None));  // no request/response header placeholders for static
            if (!entry || PyList_Append(out.get(), entry.get()) != 0) return nullptr;
        }
        return out.release();
    });
}

// --- wsgi.errors: a text stream whose lines go to the worker's log (level ERROR) ------------

struct ErrorsObject {
    PyObject_HEAD PyObject* server;  // strong: the ServerObject whose log queue it writes to
    std::string* pending;            // the current partial line (the GIL guards it)
};

void errors_emit(ErrorsObject* self, bool all) {
    Server* server = reinterpret_cast<ServerObject*>(self->server)->server;
    std::string& pending = *self->pending;
    std::size_t start = 0;
    for (std::size_t nl; (nl = pending.find('\n', start)) != std::string::npos; start = nl + 1) {
        if (server != nullptr) server->log(kError, pending.substr(start, nl - start));
    }
    pending.erase(0, start);
    // A line never grows without bound, and flush() sends what there is.
    if ((all || pending.size() > 65536) && !pending.empty()) {
        if (server != nullptr) server->log(kError, pending);
        pending.clear();
    }
}

PyObject* errors_write(PyObject* self, PyObject* text) {
    if (!PyUnicode_Check(text)) {
        PyErr_SetString(PyExc_TypeError, "wsgi.errors.write() takes a str");
        return nullptr;
    }
    PyRef utf8 = PyRef::steal(PyUnicode_AsEncodedString(text, "utf-8", "replace"));
    if (!utf8) return nullptr;
    auto* errors = reinterpret_cast<ErrorsObject*>(self);
    errors->pending->append(PyBytes_AsString(utf8.get()),
                            static_cast<std::size_t>(PyBytes_Size(utf8.get())));
    errors_emit(errors, false);
    return PyLong_FromSsize_t(PyObject_Length(text));
}

PyObject* errors_writelines(PyObject* self, PyObject* lines) {
    PyRef it = PyRef::steal(PyObject_GetIter(lines));
    if (!it) return nullptr;
    while (PyRef line = PyRef::steal(PyIter_Next(it.get()))) {
        PyRef written = PyRef::steal(errors_write(self, line.get()));
        if (!written) return nullptr;
    }
    if (PyErr_Occurred()) return nullptr;
    Py_RETURN_NONE;
}

PyObject* errors_flush(PyObject* self, PyObject*) {
    errors_emit(reinterpret_cast<ErrorsObject*>(self), true);
    Py_RETURN_NONE;
}

void errors_dealloc(PyObject* self) {
    auto* errors = reinterpret_cast<ErrorsObject*>(self);
    if (errors->pending != nullptr) errors_emit(errors, true);
    delete errors->pending;
    Py_XDECREF(errors->server);
    free_heap_object(self);
}

PyMethodDef errors_methods[] = {
    {"write", errors_write, METH_O, "Write text; each complete line goes to the worker's log."},
    {"writelines", errors_writelines, METH_O, "Write every string of an iterable."},
    {"flush", errors_flush, METH_NOARGS, "Log the pending partial line."},
    {nullptr, nullptr, 0, nullptr}};

PyType_Slot errors_slots[] = {
    {Py_tp_methods, errors_methods},
    {Py_tp_dealloc, reinterpret_cast<void*>(errors_dealloc)},
    {Py_tp_doc, const_cast<char*>("wsgi.errors: lines go to the worker's log at level ERROR.")},
    {0, nullptr}};

PyType_Spec errors_spec = {"_molt_native.Errors", sizeof(ErrorsObject), 0, Py_TPFLAGS_DEFAULT,
                           errors_slots};

PyObject* server_errors_stream(PyObject* self, PyObject*) {
    if (server_of(self) == nullptr) return nullptr;
    PyObject* module = reinterpret_cast<ServerObject*>(self)->module;
    auto* errors = alloc_object<ErrorsObject>(state_of(module)->errors_type);
    if (errors == nullptr) return nullptr;
    Py_INCREF(self);
    errors->server = self;
    errors->pending = new std::string();
    return reinterpret_cast<PyObject*>(errors);
}

void close_server(ServerObject* obj) {
    if (obj->server == nullptr) return;
    try {
        obj->server->close();
    } catch (...) {
    }
    if (obj->server->abandoned()) {
        obj->server = nullptr;  // threads still use it; the process exit reclaims it
        return;
    }
    delete obj->server;  // holds PyRefs: the GIL is held here
    obj->server = nullptr;
}

// Stops the threads and closes the connections; the object still answers counters() and
// take_logs() afterwards (the final heartbeat, the last log lines).
PyObject* server_close(PyObject* self, PyObject*) {
    return guarded(self, [](Server& s) {
        s.close();
        Py_RETURN_NONE;
    });
}

void server_dealloc(PyObject* self) {
    auto* obj = reinterpret_cast<ServerObject*>(self);
    close_server(obj);
    Py_XDECREF(obj->module);
    free_heap_object(self);
}

PyMethodDef server_methods[] = {
    {"start", server_start, METH_NOARGS, "Start the serving threads (listeners not yet used)."},
    {"listen", server_listen, METH_NOARGS, "Join the listeners' wait queues."},
    {"submit_warmup", server_submit_warmup, METH_O, "Serve one connection fd (the warm-up)."},
    {"tick", server_tick, METH_NOARGS, "The sweep: idle, header-timeout and linger closes."},
    {"stop_accepting", server_stop_accepting, METH_NOARGS, "Begin the drain."},
    {"drained", server_drained, METH_NOARGS, "No connection open and no request in flight."},
    {"counters", server_counters, METH_NOARGS,
     "(requests, inflight, oldest_started, connections, durations, exceptions)"},
    {"take_logs", server_take_logs, METH_NOARGS, "Queued log lines as [(level, text)]."},
    {"errors_stream", server_errors_stream, METH_NOARGS,
     "A wsgi.errors stream writing to this server's log queue."},
    {"take_access", server_take_access, METH_NOARGS,
     "Access-log entries of requests answered without Python (static files)."},
    {"close", server_close, METH_NOARGS, "Stop the threads and close every connection."},
    {nullptr, nullptr, 0, nullptr}};

PyType_Slot server_slots[] = {
    {Py_tp_methods, server_methods},
    {Py_tp_dealloc, reinterpret_cast<void*>(server_dealloc)},
    {Py_tp_doc, const_cast<char*>("A native WSGI server; made by make_server().")},
    {0, nullptr}};

PyType_Spec server_spec = {"_molt_native.Server", sizeof(ServerObject), 0, Py_TPFLAGS_DEFAULT,
                           server_slots};

// Reads an int-like config value; false with an exception set.
bool config_number(PyObject* cfg, const char* key, double* out) {
    PyObject* value = PyDict_GetItemString(cfg, key);  // borrowed
    if (value == nullptr) {
        PyErr_Format(PyExc_KeyError, "make_server config lacks %s", key);
        return false;
    }
    *out = PyFloat_AsDouble(value);
    return !PyErr_Occurred();
}

bool config_text(PyObject* cfg, const char* key, std::string* out) {
    PyObject* value = PyDict_GetItemString(cfg, key);  // borrowed
    if (value == nullptr || !PyUnicode_Check(value)) {
        PyErr_Format(PyExc_TypeError, "make_server config: %s must be a str", key);
        return false;
    }
    PyRef utf8 = PyRef::steal(PyUnicode_AsEncodedString(value, "latin-1", "strict"));
    if (!utf8) return false;
    out->assign(PyBytes_AsString(utf8.get()), static_cast<std::size_t>(PyBytes_Size(utf8.get())));
    return true;
}

// A str as the bytes it stands for: file-system paths with surrogateescape, the rest latin-1.
bool text_bytes(PyObject* value, const char* encoding, const char* errors, std::string* out) {
    if (!PyUnicode_Check(value)) {
        PyErr_SetString(PyExc_TypeError, "make_server config: static entries must be str");
        return false;
    }
    PyRef bytes = PyRef::steal(PyUnicode_AsEncodedString(value, encoding, errors));
    if (!bytes) return false;
    out->assign(PyBytes_AsString(bytes.get()), static_cast<std::size_t>(PyBytes_Size(bytes.get())));
    return true;
}

// "static": [(prefix, root)] in match order, "mime_types": {extension: type}.
bool read_statics(PyObject* cfg, EngineConfig* c) {
    PyObject* mounts = PyDict_GetItemString(cfg, "static");     // borrowed
    PyObject* types = PyDict_GetItemString(cfg, "mime_types");  // borrowed
    if (mounts == nullptr) return true;
    PyRef it = PyRef::steal(PyObject_GetIter(mounts));
    if (!it) return false;
    while (PyRef item = PyRef::steal(PyIter_Next(it.get()))) {
        PyObject* prefix = nullptr;
        PyObject* root = nullptr;
        if (!PyArg_ParseTuple(item.get(), "OO", &prefix, &root)) return false;
        StaticMount mount;
        if (!text_bytes(prefix, "latin-1", "strict", &mount.prefix) ||
            !text_bytes(root, "utf-8", "surrogateescape", &mount.root)) {
            return false;
        }
        c->statics.push_back(std::move(mount));
    }
    if (PyErr_Occurred()) return false;
    if (types == nullptr || !PyDict_Check(types)) return true;
    Py_ssize_t pos = 0;
    PyObject* key = nullptr;
    PyObject* value = nullptr;
    while (PyDict_Next(types, &pos, &key, &value)) {
        std::string ext;
        std::string type;
        if (!text_bytes(key, "latin-1", "strict", &ext) ||
            !text_bytes(value, "latin-1", "strict", &type)) {
            return false;
        }
        c->mime_types.emplace(std::move(ext), std::move(type));
    }
    return true;
}

// The optional trusted-proxy rule: a callable and the header names that make it worth calling.
bool read_proxy_config(PyObject* cfg, EngineConfig* c) {
    PyObject* rule = PyDict_GetItemString(cfg, "proxy_rule");  // borrowed
    if (rule == nullptr || rule == Py_None) return true;
    PyObject* names = PyDict_GetItemString(cfg, "forwarding_headers");  // borrowed
    if (!PyCallable_Check(rule) || names == nullptr || !PyTuple_Check(names)) {
        PyErr_SetString(PyExc_TypeError,
                        "make_server config: proxy_rule must be callable, forwarding_headers a "
                        "tuple of str");
        return false;
    }
    for (Py_ssize_t i = 0; i < PyTuple_Size(names); ++i) {
        PyRef bytes =
            PyRef::steal(PyUnicode_AsEncodedString(PyTuple_GetItem(names, i), "latin-1", "strict"));
        if (!bytes) return false;
        c->forwarding_headers.emplace_back(PyBytes_AsString(bytes.get()),
                                           static_cast<std::size_t>(PyBytes_Size(bytes.get())));
    }
    c->proxy_rule = PyRef::borrow(rule);
    return true;
}

// A listener's options, {"proxy_protocol": bool, "tls": {cert, key, client_ca, min_version}};
// the certificates are loaded here, when the worker starts (one generation, one set of them).
bool read_listener_options(PyObject* options, ListenerSlot* slot) {
    if (options == nullptr || options == Py_None) return true;
    if (!PyDict_Check(options)) {
        PyErr_SetString(PyExc_TypeError, "make_server: listener options must be a dict");
        return false;
    }
    PyObject* proxy = PyDict_GetItemString(options, "proxy_protocol");  // borrowed
    slot->proxy_protocol = proxy != nullptr && PyObject_IsTrue(proxy) == 1;
    PyObject* tls = PyDict_GetItemString(options, "tls");  // borrowed
    if (tls == nullptr || tls == Py_None) return true;
    TlsOptions opts;
    if (!PyDict_Check(tls)) {
        PyErr_SetString(PyExc_TypeError, "make_server: tls must be a dict");
        return false;
    }
    // File paths as the bytes they stand for (surrogateescape), like the static roots.
    auto path = [tls](const char* key, std::string* out) {
        PyObject* value = PyDict_GetItemString(tls, key);  // borrowed
        if (value == nullptr) {
            PyErr_Format(PyExc_KeyError, "make_server: tls lacks %s", key);
            return false;
        }
        return text_bytes(value, "utf-8", "surrogateescape", out);
    };
    if (!path("cert", &opts.cert) || !path("key", &opts.key) ||
        !path("client_ca", &opts.client_ca) ||
        !config_text(tls, "min_version", &opts.min_version)) {
        return false;
    }
    if (PyObject* keys = PyDict_GetItemString(tls, "ticket_keys")) {  // borrowed; optional
        char* data = nullptr;
        Py_ssize_t size = 0;
        if (PyBytes_AsStringAndSize(keys, &data, &size) != 0) return false;
        opts.ticket_keys.assign(data, static_cast<std::size_t>(size));
    }
    try {
        slot->tls = std::shared_ptr<SSL_CTX>(make_tls_context(opts).release(), SslCtxFree());
    } catch (const std::exception& exc) {
        PyErr_Format(PyExc_OSError, "listener %s: %s", slot->name.c_str(), exc.what());
        return false;
    }
    return true;
}

// The reader of complete PROXY headers (molt_shim.engines.native), for PROXY listeners.
bool read_proxy_header_reader(PyObject* cfg, EngineConfig* c) {
    PyObject* reader = PyDict_GetItemString(cfg, "proxy_header");  // borrowed
    if (reader == nullptr || reader == Py_None) return true;
    if (!PyCallable_Check(reader)) {
        PyErr_SetString(PyExc_TypeError, "make_server config: proxy_header must be callable");
        return false;
    }
    c->proxy_header = PyRef::borrow(reader);
    return true;
}

bool read_config(PyObject* cfg, EngineConfig* c) {
    if (!PyDict_Check(cfg)) {
        PyErr_SetString(PyExc_TypeError, "make_server config must be a dict");
        return false;
    }
    double v[10];
    const char* keys[] = {"max_request_line", "max_header_size",  "max_headers", "max_body_size",
                          "body_buffer_size", "header_timeout_s", "keepalive_s", "drain_idle_s",
                          "threads",          "send_timeout_s"};
    for (int i = 0; i < 10; ++i) {
        if (!config_number(cfg, keys[i], &v[i])) return false;
    }
    c->limits.max_request_line = static_cast<std::uint64_t>(v[0]);
    c->limits.max_header_size = static_cast<std::uint64_t>(v[1]);
    c->limits.max_headers = static_cast<std::uint64_t>(v[2]);
    c->limits.max_body_size = static_cast<std::uint64_t>(v[3]);
    c->limits.body_buffer_size = static_cast<std::uint64_t>(v[4]);
    c->header_timeout = v[5];
    c->keepalive = v[6];
    c->drain_idle = v[7];
    c->threads = static_cast<int>(v[8]);
    c->send_timeout = v[9];
    // Optional (older callers do not pass it): off unless given and true.
    auto flag = [cfg](const char* key) {
        PyObject* value = PyDict_GetItemString(cfg, key);  // borrowed
        return value != nullptr && PyObject_IsTrue(value) == 1;
    };
    c->request_metrics = flag("request_metrics");
    // Optional: the generation's accept board (absent: every worker accepts as it comes).
    double board_fd = -1, generation = 0, accepting = 0;  // absent: every worker is hot
    if (PyDict_GetItemString(cfg, "accept_board_fd") != nullptr &&
        (!config_number(cfg, "accept_board_fd", &board_fd) ||
         !config_number(cfg, "generation", &generation))) {
        return false;
    }
    if (PyDict_GetItemString(cfg, "accepting_workers") != nullptr &&
        !config_number(cfg, "accepting_workers", &accepting)) {
        return false;
    }
    c->accept_board_fd = static_cast<int>(board_fd);
    c->generation = static_cast<std::uint32_t>(generation);
    c->accepting_workers = static_cast<int>(accepting);
    c->access_request_headers = flag("access_request_headers");
    c->access_response_headers = flag("access_response_headers");
    return config_text(cfg, "version_header", &c->version_header) &&
           config_text(cfg, "script_name", &c->script_name) && read_statics(cfg, c) &&
           read_proxy_config(cfg, c) && read_proxy_header_reader(cfg, c);
}

PyObject* make_server(PyObject* module, PyObject* args, PyObject* kwargs) {
    static const char* kwlist[] = {"app",        "listeners", "warmup_env", "file_wrapper",
                                   "access_log", "config",    nullptr};
    PyObject* app = nullptr;
    PyObject* listeners = nullptr;
    PyObject* warmup_env = nullptr;
    PyObject* file_wrapper = nullptr;
    PyObject* access_log = nullptr;
    PyObject* cfg = nullptr;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "OOOOOO:make_server", const_cast<char**>(kwlist),
                                     &app, &listeners, &warmup_env, &file_wrapper, &access_log,
                                     &cfg)) {
        return nullptr;
    }
    EngineConfig config;
    if (!read_config(cfg, &config)) return nullptr;
    std::vector<ListenerSlot> slots;
    PyRef it = PyRef::steal(PyObject_GetIter(listeners));
    if (!it) return nullptr;
    while (PyRef item = PyRef::steal(PyIter_Next(it.get()))) {
        int fd = -1;
        const char* name = nullptr;
        PyObject* env = nullptr;
        PyObject* options = nullptr;
        if (!PyArg_ParseTuple(item.get(), "isO!|O", &fd, &name, &PyDict_Type, &env, &options))
            return nullptr;
        ListenerSlot slot{fd, name, true, PyRef::borrow(env), false, nullptr, {}};
        if (!read_listener_options(options, &slot)) return nullptr;
        if (slot.proxy_protocol && !config.proxy_header) {
            PyErr_SetString(PyExc_TypeError,
                            "make_server: a proxy_protocol listener needs config proxy_header");
            return nullptr;
        }
        slots.push_back(std::move(slot));
    }
    if (PyErr_Occurred()) return nullptr;
    ModuleState* st = state_of(module);
    auto* so = alloc_object<ServerObject>(st->server_type);
    PyRef obj = PyRef::steal(reinterpret_cast<PyObject*>(so));
    if (!obj) return nullptr;
    Py_INCREF(module);
    so->module = module;
    try {
        so->server = new Server(std::move(config), PyRef::borrow(app), std::move(slots),
                                PyRef::borrow(warmup_env),
                                PyRef::borrow(file_wrapper == Py_None ? nullptr : file_wrapper),
                                PyRef::borrow(access_log == Py_None ? nullptr : access_log),
                                PyShared{st->start_response_type, st->input_type, st->env_keys});
    } catch (const std::exception& exc) {
        PyErr_Format(PyExc_RuntimeError, "native engine: %s", exc.what());
        return nullptr;
    }
    return obj.release();
}

// --- FramingGuard for the ASGI engine: the same C++ rules, one scan() per data_received ----
// The Python guard (molt_shim/framing_guard.py) costs 5-10 us per request line by line; the
// ASGI engine's protocol runs it on every byte a client sends, so it takes this one when the
// extension loads. scan() answers as the Python guard's does: None, or
// (offset, (status, reason)).

struct GuardObject {
    PyObject_HEAD FramingGuard* guard;
};

PyObject* guard_scan(PyObject* self, PyObject* data) {
    if (!PyBytes_Check(data)) {
        PyErr_SetString(PyExc_TypeError, "FramingGuard.scan() takes bytes");
        return nullptr;
    }
    FramingGuard* guard = reinterpret_cast<GuardObject*>(self)->guard;
    if (guard == nullptr) {  // an instance not made by framing_guard()
        PyErr_SetString(PyExc_RuntimeError, "FramingGuard: not made by framing_guard()");
        return nullptr;
    }
    std::optional<FramingViolation> found;
    try {
        found = guard->scan(PyBytes_AsString(data), static_cast<std::size_t>(PyBytes_Size(data)));
    } catch (const std::exception& exc) {
        PyErr_Format(PyExc_RuntimeError, "framing guard: %s", exc.what());
        return nullptr;
    }
    if (!found) Py_RETURN_NONE;
    return Py_BuildValue(
        "(n(iN))", static_cast<Py_ssize_t>(found->offset), found->status,
        PyUnicode_DecodeUTF8(found->reason.data(), static_cast<Py_ssize_t>(found->reason.size()),
                             "replace"));
}

void guard_dealloc(PyObject* self) {
    delete reinterpret_cast<GuardObject*>(self)->guard;
    free_heap_object(self);
}

PyMethodDef guard_methods[] = {
    {"scan", guard_scan, METH_O,
     "scan(data) -> None, or (offset, (status, reason)) for the first framing violation."},
    {nullptr, nullptr, 0, nullptr}};

PyType_Slot guard_slots[] = {
    {Py_tp_methods, guard_methods},
    {Py_tp_dealloc, reinterpret_cast<void*>(guard_dealloc)},
    {Py_tp_doc, const_cast<char*>("molt's HTTP/1.1 framing guard; made by framing_guard().")},
    {0, nullptr}};

PyType_Spec guard_spec = {"_molt_native.FramingGuard", sizeof(GuardObject), 0, Py_TPFLAGS_DEFAULT,
                          guard_slots};

PyObject* make_framing_guard(PyObject* module, PyObject* args) {
    unsigned long long max_request_line = 0;
    unsigned long long max_header_size = 0;
    if (!PyArg_ParseTuple(args, "KK", &max_request_line, &max_header_size)) return nullptr;
    auto* obj = alloc_object<GuardObject>(state_of(module)->guard_type);
    if (obj == nullptr) return nullptr;
    try {
        obj->guard = new FramingGuard(max_request_line, max_header_size);
    } catch (const std::exception& exc) {
        Py_DECREF(reinterpret_cast<PyObject*>(obj));  // guard_dealloc deletes nullptr: fine
        PyErr_Format(PyExc_RuntimeError, "framing guard: %s", exc.what());
        return nullptr;
    }
    return reinterpret_cast<PyObject*>(obj);
}

PyObject* make_asgi_parser(PyObject* module, PyObject* args) {
    ModuleState* st = state_of(module);
    return new_asgi_parser(st->asgi_parser_type, module, &st->asgi_strings, args);
}

PyObject* make_io_hub(PyObject* module, PyObject* args) {
    ModuleState* st = state_of(module);
    return new_io_hub(st->io_hub_type, st->io_transport_type, args);
}

PyObject* usable_cpus_py(PyObject*, PyObject*) {
    return PyLong_FromLong(usable_cpus());
}

PyObject* make_suspend_hook(PyObject* module, PyObject* args) {
    ModuleState* st = state_of(module);
    return new_suspend_hook(st->suspend_hook_type, st->send_name, args);
}

PyObject* make_task_registry(PyObject* module, PyObject* args) {
    return new_task_registry(state_of(module)->task_registry_type, args);
}

PyObject* make_task_starter(PyObject* module, PyObject* args) {
    return new_task_starter(state_of(module)->task_starter_type, args);
}

PyObject* make_cycle_rules(PyObject* module, PyObject* args) {
    return new_cycle_rules(state_of(module)->cycle_rules_type, args);
}

PyObject* parser_name_py(PyObject*, PyObject*) {
    return PyUnicode_FromString(parser_name().c_str());
}

PyMethodDef module_methods[] = {
    {"make_server", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)(void)>(make_server)),
     METH_VARARGS | METH_KEYWORDS,
     "make_server(app, listeners, warmup_env, file_wrapper, access_log, config) -> Server"},
    {"parser_name", parser_name_py, METH_NOARGS, "The HTTP parser library and its version."},
    {"framing_guard", make_framing_guard, METH_VARARGS,
     "framing_guard(max_request_line, max_header_size) -> FramingGuard"},
    {"fork_spare", fork_spare, METH_VARARGS,
     "fork_spare(sock, zygote_end, channel, master, comm) -> intermediate pid | (packet, fds)"},
    {"asgi_parser", make_asgi_parser, METH_VARARGS,
     "asgi_parser((max_request_line, max_header_size, max_headers, max_body_size), base, asgi, "
     "unquote) -> AsgiParser"},
    {"usable_cpus", usable_cpus_py, METH_NOARGS,
     "usable_cpus() -> int: the CPUs this thread may run on (its affinity), capped by a cgroup "
     "CPU quota; what `accepting_workers: auto` means for the ASGI engine"},
    {"io_hub", make_io_hub, METH_VARARGS,
     "io_hub(loop, report, accept_failed[, board_fd, generation, io_uring, accepting_workers]) "
     "-> IoHub: the ASGI engine's TCP I/O"},
    {"suspend_hook", make_suspend_hook, METH_VARARGS,
     "suspend_hook(coroutine, on_suspend) -> an awaitable running the coroutine that calls "
     "on_suspend() each time it suspends"},
    {"task_registry", make_task_registry, METH_VARARGS,
     "task_registry(data, pending_removals, iterating) -> TaskRegistry: a WeakSet's add() and "
     "its references' callback in C, on that WeakSet's containers"},
    {"task_starter", make_task_starter, METH_VARARGS,
     "task_starter(loop, task_type) -> TaskStarter: starter(coroutine) is "
     "loop.create_task(coroutine), for less"},
    {"asgi_cycle_rules", make_cycle_rules, METH_VARARGS,
     "asgi_cycle_rules(ctl, status_lines, known_headers, header_line, (content_length, chunked, "
     "close), close_line) -> CycleRules: what the AsgiCycles of one engine share"},
    {nullptr, nullptr, 0, nullptr}};

int module_exec(PyObject* module) {
    ModuleState* st = state_of(module);
    st->server_type = PyType_FromSpec(&server_spec);
    st->errors_type = PyType_FromSpec(&errors_spec);
    st->start_response_type = PyType_FromSpec(&start_response_spec);
    st->input_type = PyType_FromSpec(&input_spec);
    st->guard_type = PyType_FromSpec(&guard_spec);
    st->asgi_parser_type = PyType_FromSpec(&asgi_parser_spec);
    st->io_hub_type = PyType_FromSpec(&io_hub_spec);
    st->io_transport_type = PyType_FromSpec(&io_transport_spec);
    st->suspend_hook_type = PyType_FromSpec(&suspend_hook_spec);
    st->task_registry_type = PyType_FromSpec(&task_registry_spec);
    st->task_starter_type = PyType_FromSpec(&task_starter_spec);
    st->asgi_cycle_type = PyType_FromSpec(&asgi_cycle_spec);
    st->cycle_rules_type = PyType_FromSpec(&cycle_rules_spec);
    st->send_name = PyUnicode_InternFromString("send");
    if (!st->server_type || !st->errors_type || !st->start_response_type || !st->input_type ||
        !st->guard_type || !st->asgi_parser_type || !st->io_hub_type || !st->io_transport_type ||
        !st->suspend_hook_type || !st->task_registry_type || !st->task_starter_type ||
        !st->asgi_cycle_type || !st->cycle_rules_type || !st->send_name ||
        !st->asgi_strings.init()) {
        return -1;
    }
    // The base class of engines/asgi_cycle.py's Cycle (AddObject steals a reference on success).
    Py_INCREF(st->asgi_cycle_type);
    if (PyModule_AddObject(module, "AsgiCycle", st->asgi_cycle_type) < 0) {
        Py_DECREF(st->asgi_cycle_type);
        return -1;
    }
    for (int i = 0; i < static_cast<int>(EnvKey::count); ++i) {
        st->env_keys[i] = PyUnicode_InternFromString(kEnvKeyNames[i]);
        if (st->env_keys[i] == nullptr) return -1;
    }
    return 0;
}

int module_traverse(PyObject* module, visitproc visit, void* arg) {
    ModuleState* st = state_of(module);
    if (st == nullptr) return 0;
    Py_VISIT(st->server_type);
    Py_VISIT(st->errors_type);
    Py_VISIT(st->start_response_type);
    Py_VISIT(st->input_type);
    Py_VISIT(st->guard_type);
    Py_VISIT(st->asgi_parser_type);
    Py_VISIT(st->io_hub_type);
    Py_VISIT(st->io_transport_type);
    Py_VISIT(st->suspend_hook_type);
    Py_VISIT(st->task_registry_type);
    Py_VISIT(st->task_starter_type);
    Py_VISIT(st->asgi_cycle_type);
    Py_VISIT(st->cycle_rules_type);
    Py_VISIT(st->send_name);
    for (PyObject* key : st->env_keys) Py_VISIT(key);
    return st->asgi_strings.visit(visit, arg);
}

int module_clear(PyObject* module) {
    ModuleState* st = state_of(module);
    if (st == nullptr) return 0;
    Py_CLEAR(st->server_type);
    Py_CLEAR(st->errors_type);
    Py_CLEAR(st->start_response_type);
    Py_CLEAR(st->input_type);
    Py_CLEAR(st->guard_type);
    Py_CLEAR(st->asgi_parser_type);
    Py_CLEAR(st->io_hub_type);
    Py_CLEAR(st->io_transport_type);
    Py_CLEAR(st->suspend_hook_type);
    Py_CLEAR(st->task_registry_type);
    Py_CLEAR(st->task_starter_type);
    Py_CLEAR(st->asgi_cycle_type);
    Py_CLEAR(st->cycle_rules_type);
    Py_CLEAR(st->send_name);
    for (PyObject*& key : st->env_keys) Py_CLEAR(key);
    st->asgi_strings.clear();
    return 0;
}

void module_free(void* module) {
    module_clear(static_cast<PyObject*>(module));
}

PyModuleDef_Slot module_slots[] = {{Py_mod_exec, reinterpret_cast<void*>(module_exec)},
                                   {0, nullptr}};

PyModuleDef module_def = {PyModuleDef_HEAD_INIT,
                          "_molt_native",
                          "molt's native WSGI engine (C++; see worker_shim/native/).",
                          sizeof(ModuleState),
                          module_methods,
                          module_slots,
                          module_traverse,
                          module_clear,
                          module_free};

}  // namespace
}  // namespace molt::native

PyMODINIT_FUNC PyInit__molt_native(void) {
    return PyModuleDef_Init(&molt::native::module_def);
}
