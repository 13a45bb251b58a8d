// The ASGI engine's request parser (see asgi_parser.hpp).
#include "asgi_parser.hpp"

#include <cctype>
#include <exception>
#include <string>

#include "http_seam.hpp"
#include "wsgi_call.hpp"

namespace molt::native {

constexpr const char* AsgiStrings::kMethodNames[];

bool AsgiStrings::init() {
    static constexpr const char* kKeyNames[] = {"type", "asgi",     "http_version", "method",
                                                "path", "raw_path", "query_string", "headers"};
    static_assert(sizeof(kKeyNames) / sizeof(kKeyNames[0]) == count, "one name per key");
    for (int i = 0; i < count; ++i) {
        keys[i] = PyUnicode_InternFromString(kKeyNames[i]);
        if (keys[i] == nullptr) return false;
    }
    version_11 = PyUnicode_InternFromString("1.1");
    version_10 = PyUnicode_InternFromString("1.0");
    if (version_11 == nullptr || version_10 == nullptr) return false;
    for (int i = 0; i < kMethods; ++i) {
        methods[i] = PyUnicode_InternFromString(kMethodNames[i]);
        if (methods[i] == nullptr) return false;
    }
    return true;
}

void AsgiStrings::clear() {
    for (PyObject*& key : keys) Py_CLEAR(key);
    Py_CLEAR(version_11);
    Py_CLEAR(version_10);
    for (PyObject*& method : methods) Py_CLEAR(method);
}

int AsgiStrings::visit(visitproc visit, void* arg) {
    for (PyObject* key : keys) Py_VISIT(key);
    Py_VISIT(version_11);
    Py_VISIT(version_10);
    for (PyObject* method : methods) Py_VISIT(method);
    return 0;
}

namespace {

struct AsgiParserObject {
    PyObject_HEAD RequestParser* parser;
    PyObject* module;  // strong: `strings` lives in its state
    const AsgiStrings* strings;
    PyObject* base;  // what every scope starts as: the connection's fields, the request's keys
    PyObject* asgi;
    PyObject* unquote;
    bool target_not_ascii;  // a head whose target could not be a scope's path: a 400
};

AsgiParserObject* as_parser(PyObject* self) {
    return reinterpret_cast<AsgiParserObject*>(self);
}

bool set(PyObject* dict, PyObject* key, PyObject* value) {
    return value != nullptr && PyDict_SetItem(dict, key, value) == 0;
}

PyObject* bytes_of(const std::string& text) {
    return PyBytes_FromStringAndSize(text.data(), static_cast<Py_ssize_t>(text.size()));
}

PyObject* headers_of(const Request& req) {
    PyRef list = PyRef::steal(PyList_New(static_cast<Py_ssize_t>(req.headers.size())));
    if (!list) return nullptr;
    Py_ssize_t i = 0;
    std::string name;
    for (const auto& [field, value] : req.headers) {
        name.assign(field);
        for (char& c : name) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
        PyRef name_b = PyRef::steal(bytes_of(name));
        PyRef value_b = PyRef::steal(bytes_of(value));
        if (!name_b || !value_b) return nullptr;
        PyObject* pair = PyTuple_Pack(2, name_b.get(), value_b.get());
        if (pair == nullptr) return nullptr;
        PyList_SetItem(list.get(), i++, pair);  // steals `pair`
    }
    return list.release();
}

// The request's scope: `base` and a copy of `asgi`, then what this request says. Null with a
// Python exception set, or null without one when the target has a byte that is not ASCII: a
// 400, as on httptools (where the path's decode raises inside a parser callback).
PyObject* scope_of(AsgiParserObject* self, const Request& req) {
    const AsgiStrings& s = *self->strings;
    auto [path, query] = split_target(req.target);
    // A fragment (which no client should send) is not part of the query, as httptools'
    // parse_url reads it; the WSGI environ keeps it, as the Python WSGI engine does.
    const auto fragment = query.find('#');
    if (fragment != std::string::npos) query.resize(fragment);
    PyRef path_text = PyRef::steal(
        PyUnicode_DecodeASCII(path.data(), static_cast<Py_ssize_t>(path.size()), "strict"));
    if (!path_text) {
        if (!PyErr_ExceptionMatches(PyExc_UnicodeDecodeError)) return nullptr;
        PyErr_Clear();
        self->target_not_ascii = true;
        return nullptr;
    }
    if (path.find('%') != std::string::npos) {
        path_text =
            PyRef::steal(PyObject_CallFunctionObjArgs(self->unquote, path_text.get(), nullptr));
        if (!path_text) return nullptr;
    }
    PyRef scope = PyRef::steal(PyDict_Copy(self->base));
    if (!scope) return nullptr;
    PyRef asgi = PyRef::steal(PyDict_Copy(self->asgi));
    PyObject* version = nullptr;
    PyRef version_made;
    if (req.version_major == 1 && req.version_minor == 1) {
        version = s.version_11;
    } else if (req.version_major == 1 && req.version_minor == 0) {
        version = s.version_10;
    } else {
        version_made =
            PyRef::steal(PyUnicode_FromFormat("%d.%d", req.version_major, req.version_minor));
        version = version_made.get();
    }
    PyObject* method = nullptr;
    PyRef method_made;
    for (int i = 0; i < AsgiStrings::kMethods; ++i) {
        if (req.method == AsgiStrings::kMethodNames[i]) {
            method = s.methods[i];
            break;
        }
    }
    if (method == nullptr) {
        method_made = PyRef::steal(PyUnicode_DecodeASCII(
            req.method.data(), static_cast<Py_ssize_t>(req.method.size()), "replace"));
        method = method_made.get();
    }
    PyRef raw_path = PyRef::steal(bytes_of(path));
    PyRef query_string = PyRef::steal(bytes_of(query));
    PyRef headers = PyRef::steal(headers_of(req));
    using K = AsgiStrings::Key;
    if (!set(scope.get(), s.keys[K::asgi], asgi.get()) ||
        !set(scope.get(), s.keys[K::http_version], version) ||
        !set(scope.get(), s.keys[K::method], method) ||
        !set(scope.get(), s.keys[K::path], path_text.get()) ||
        !set(scope.get(), s.keys[K::raw_path], raw_path.get()) ||
        !set(scope.get(), s.keys[K::query_string], query_string.get()) ||
        !set(scope.get(), s.keys[K::headers], headers.get())) {
        return nullptr;
    }
    return scope.release();
}

PyObject* flag(bool value) {
    return value ? Py_True : Py_False;
}

// The object's parser; null with RuntimeError for an instance not made by asgi_parser() (the
// type can be called from Python, and would then have none).
RequestParser* parser_of(PyObject* self) {
    RequestParser* parser = as_parser(self)->parser;
    if (parser == nullptr)
        PyErr_SetString(PyExc_RuntimeError, "AsgiParser: not made by asgi_parser()");
    return parser;
}

PyObject* events_of(AsgiParserObject* self, RequestParser* parser);

PyObject* parser_feed(PyObject* self_, PyObject* data) {
    AsgiParserObject* self = as_parser(self_);
    RequestParser* parser = parser_of(self_);
    if (parser == nullptr) return nullptr;
    if (!PyBytes_Check(data)) {
        PyErr_SetString(PyExc_TypeError, "AsgiParser.feed() takes bytes");
        return nullptr;
    }
    if (self->target_not_ascii) return PyList_New(0);
    try {  // no C++ exception (bad_alloc) may cross into CPython
        parser->feed(PyBytes_AsString(data), static_cast<std::size_t>(PyBytes_Size(data)));
        return events_of(self, parser);
    } catch (const std::exception& exc) {
        parser->events().clear();
        PyErr_Format(PyExc_RuntimeError, "ASGI parser: %s", exc.what());
        return nullptr;
    }
}

// The events feed() parsed, as Python objects; the parser's list is left empty.
PyObject* events_of(AsgiParserObject* self, RequestParser* parser) {
    // Read from a vector of our own: Python code called below (the `unquote` given) could
    // feed() this parser again, which appends to, and may reallocate, the parser's. Its
    // capacity goes back to the parser afterwards, so no feed allocates once it has grown.
    std::vector<StreamEvent> events;
    events.swap(parser->events());
    struct Consumed {  // every event is taken, or dropped with the error that stopped us
        std::vector<StreamEvent>& events;
        std::vector<StreamEvent>& parsers;
        ~Consumed() {
            events.clear();
            if (parsers.empty()) parsers.swap(events);
        }
    } consumed{events, parser->events()};
    PyRef out = PyRef::steal(PyList_New(0));
    if (!out) return nullptr;
    for (const StreamEvent& event : events) {
        PyRef item;
        switch (event.kind) {
            case StreamEvent::Kind::head: {
                PyRef scope = PyRef::steal(scope_of(self, event.head));
                if (!scope) {
                    if (PyErr_Occurred()) return nullptr;
                    return out.release();  // target_not_ascii: the 400 is the answer
                }
                const Request& req = event.head;
                item = PyRef::steal(PyTuple_Pack(5, scope.get(), flag(req.asked_close),
                                                 flag(req.expect_continue), flag(req.upgrade),
                                                 flag(req.complete_at_head)));
                break;
            }
            case StreamEvent::Kind::body:
                item = PyRef::steal(bytes_of(event.chunk));
                break;
            case StreamEvent::Kind::end:
                item = PyRef::borrow(Py_None);
                break;
        }
        if (!item || PyList_Append(out.get(), item.get()) < 0) return nullptr;
    }
    return out.release();
}

PyObject* parser_error(PyObject* self_, void*) {
    AsgiParserObject* self = as_parser(self_);
    RequestParser* parser = parser_of(self_);
    if (parser == nullptr) return nullptr;
    if (self->target_not_ascii) {  // the first error: nothing after that head was parsed
        return Py_BuildValue("(is)", 400, "malformed request: a request target that is not ASCII");
    }
    const auto& error = parser->error();
    if (error) {
        return Py_BuildValue(
            "(iN)", error->status,
            PyUnicode_DecodeUTF8(error->reason.data(),
                                 static_cast<Py_ssize_t>(error->reason.size()), "replace"));
    }
    Py_RETURN_NONE;
}

PyObject* parser_in_head(PyObject* self_, void*) {
    RequestParser* parser = parser_of(self_);
    return parser == nullptr ? nullptr : PyBool_FromLong(parser->in_head());
}

void parser_dealloc(PyObject* self_) {
    AsgiParserObject* self = as_parser(self_);
    delete self->parser;
    Py_XDECREF(self->base);
    Py_XDECREF(self->asgi);
    Py_XDECREF(self->unquote);
    Py_XDECREF(self->module);
    free_heap_object(self_);
}

PyMethodDef parser_methods[] = {
    {"feed", parser_feed, METH_O,
     "feed(data) -> [event]: (scope, asked_close, expect_100, upgrade, complete) for a "
     "complete head (complete: it has no body, and no end event follows), bytes for body, "
     "None for the request's end."},
    {nullptr, nullptr, 0, nullptr}};

PyGetSetDef parser_getset[] = {
    {"error", parser_error, nullptr, "None, or (status, reason): nothing more is parsed.", nullptr},
    {"in_head", parser_in_head, nullptr, "A request head has begun and is not complete.", nullptr},
    {nullptr, nullptr, nullptr, nullptr, nullptr}};

PyType_Slot parser_slots[] = {
    {Py_tp_methods, parser_methods},
    {Py_tp_getset, parser_getset},
    {Py_tp_dealloc, reinterpret_cast<void*>(parser_dealloc)},
    {Py_tp_doc, const_cast<char*>("The ASGI engine's HTTP/1.1 request parser; made by "
                                  "asgi_parser().")},
    {0, nullptr}};

}  // namespace

PyType_Spec asgi_parser_spec = {"_molt_native.AsgiParser", sizeof(AsgiParserObject), 0,
                                Py_TPFLAGS_DEFAULT, parser_slots};

PyObject* new_asgi_parser(PyObject* type, PyObject* module, const AsgiStrings* strings,
                          PyObject* args) {
    unsigned long long max_request_line = 0;
    unsigned long long max_header_size = 0;
    unsigned long long max_headers = 0;
    unsigned long long max_body_size = 0;
    PyObject* base = nullptr;
    PyObject* asgi = nullptr;
    PyObject* unquote = nullptr;
    if (!PyArg_ParseTuple(args, "(KKKK)O!O!O", &max_request_line, &max_header_size, &max_headers,
                          &max_body_size, &PyDict_Type, &base, &PyDict_Type, &asgi, &unquote)) {
        return nullptr;
    }
    auto* obj = alloc_object<AsgiParserObject>(type);
    if (obj == nullptr) return nullptr;
    HttpLimits limits;
    limits.max_request_line = max_request_line;
    limits.max_header_size = max_header_size;
    limits.max_headers = max_headers;
    limits.max_body_size = max_body_size;
    try {
        obj->parser = new RequestParser(limits, Delivery::streamed);
    } catch (const std::exception& exc) {
        Py_DECREF(reinterpret_cast<PyObject*>(obj));  // parser_dealloc deletes nullptr: fine
        PyErr_Format(PyExc_RuntimeError, "ASGI parser: %s", exc.what());
        return nullptr;
    }
    obj->module = PyRef::borrow(module).release();
    obj->strings = strings;
    // Every scope is a copy of `base` with the request's own keys already in it (None until
    // the request says): a copy of the whole table, then seven values replaced, where adding
    // them one by one resized each scope's table once.
    PyRef scope_template = PyRef::steal(PyDict_Copy(base));
    if (!scope_template) {
        Py_DECREF(reinterpret_cast<PyObject*>(obj));
        return nullptr;
    }
    using K = AsgiStrings::Key;
    for (K key :
         {K::asgi, K::http_version, K::method, K::path, K::raw_path, K::query_string, K::headers}) {
        int present = PyDict_Contains(scope_template.get(), strings->keys[key]);
        if (present < 0 || (present == 0 && PyDict_SetItem(scope_template.get(), strings->keys[key],
                                                           Py_None) < 0)) {
            Py_DECREF(reinterpret_cast<PyObject*>(obj));
            return nullptr;
        }
    }
    obj->base = scope_template.release();
    obj->asgi = PyRef::borrow(asgi).release();
    obj->unquote = PyRef::borrow(unquote).release();
    return reinterpret_cast<PyObject*>(obj);
}

}  // namespace molt::native
