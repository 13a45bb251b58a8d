// The ASGI engine's request parser: the native engine's RequestParser (libhttp-parser behind the
// seam, molt's framing guard, the http.* limits, the same error statuses) with streamed
// delivery, handing Python a ready scope for each request head.
//
// The ASGI protocol (molt_shim/engines/asgi_cycle.py) calls feed() once per data_received();
// it answers with a list of events: (scope, asked_close, expect_100, upgrade, complete) for a
// complete head, bytes for a piece of its body, None for its end (none follows a head that
// said complete: no body). After a violation (`error`) or an
// upgrade nothing more is parsed. httptools, the parser this replaces when the extension
// loads, calls back into Python for the start of the message, the URL, every header field and
// the end of the head, and the scope was then built in Python: measured, three of the eleven
// microseconds of Python per keep-alive request (docs/architecture.md, "ASGI: the native
// parser").
#pragma once

#include "py_handle.hpp"

namespace molt::native {

// Strings every scope uses, interned once per module (they live in the module state).
struct AsgiStrings {
    enum Key { type, asgi, http_version, method, path, raw_path, query_string, headers, count };
    PyObject* keys[count];
    PyObject* version_11;
    PyObject* version_10;
    static constexpr const char* kMethodNames[] = {"GET",    "HEAD",  "POST",   "PUT",
                                                   "DELETE", "PATCH", "OPTIONS"};
    static constexpr int kMethods = sizeof(kMethodNames) / sizeof(kMethodNames[0]);
    PyObject* methods[kMethods];

    bool init();  // false with a Python exception set
    void clear();
    int visit(visitproc visit, void* arg);
};

extern PyType_Spec asgi_parser_spec;

// asgi_parser((max_request_line, max_header_size, max_headers, max_body_size), base, asgi,
// unquote): `base` holds the scope fields that are the same for every request of the
// connection (type, server, client, scheme, root_path), `asgi` the scope's "asgi" dict (each
// scope gets a copy), `unquote` is urllib.parse.unquote (for a path with a %-escape).
PyObject* new_asgi_parser(PyObject* type, PyObject* module, const AsgiStrings* strings,
                          PyObject* args);

}  // namespace molt::native
