// One WSGI call: environ, start_response, wsgi.input, the response framing, errors.
//
// Everything here runs on a serving thread inside GilHeld (handle() takes it); every socket
// write drops it again with GilReleased while the bytes being sent stay owned by a PyRef.
// A Python exception raised by the app becomes a 500 (or a closed connection once the head is
// out) and one log line with the traceback, in handle() only.
#include "wsgi_call.hpp"

#include <errno.h>
#include <strings.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/uio.h>

#include <algorithm>
#include <cctype>
#include <cstring>
#include <optional>

namespace molt::native {

namespace {

// The state of one request/response, owned by handle() on the C++ stack. The start_response
// object points at it for the duration of the call only.
struct Exchange {
    Exchange(Server& srv, Connection& conn, Request& req)
        // An upgrade is answered, then the connection closes: WSGI cannot take it over.
        : srv(srv), conn(conn), req(req), keep_alive(req.keep_alive && !req.upgrade) {}
    Server& srv;
    Connection& conn;
    Request& req;
    bool has_status = false;
    std::string status;
    int code = 0;
    std::string header_block;
    std::optional<long long> content_length;
    bool app_close = false;
    bool headers_sent = false;
    bool chunked = false;
    bool no_body = false;
    long long remaining = -1;  // bytes still allowed by Content-Length; -1 when unbounded
    bool keep_alive;
    std::uint64_t bytes_sent = 0;
    bool client_gone = false;
    std::string gone_why;
};

struct StartResponseObject {
    PyObject_HEAD Exchange* exchange;  // null once the request is over
};

struct InputObject {
    PyObject_HEAD Body* body;
    std::uint64_t pos;
};

bool is_11(const Request& r) {
    return r.version_major == 1 && r.version_minor == 1;
}
bool is_10(const Request& r) {
    return r.version_major == 1 && r.version_minor == 0;
}

std::string lower(std::string text) {
    std::transform(text.begin(), text.end(), text.begin(),
                   [](unsigned char c) { return static_cast<char>(std::tolower(c)); });
    return text;
}

// str -> latin-1 bytes as std::string; false with a Python exception set.
bool latin1(PyObject* text, std::string* out) {
    PyRef encoded = PyRef::steal(PyUnicode_AsEncodedString(text, "latin-1", "strict"));
    if (!encoded) return false;
    char* data = nullptr;
    Py_ssize_t len = 0;
    if (PyBytes_AsStringAndSize(encoded.get(), &data, &len) != 0) return false;
    out->assign(data, static_cast<std::size_t>(len));
    return true;
}

PyRef decode_latin1(const std::string& text) {
    return PyRef::steal(
        PyUnicode_DecodeLatin1(text.data(), static_cast<Py_ssize_t>(text.size()), nullptr));
}

// The traceback of the exception being handled, as text; clears it.
std::string take_exception_text() {
    PyObject* type = nullptr;
    PyObject* value = nullptr;
    PyObject* tb = nullptr;
    PyErr_Fetch(&type, &value, &tb);
    PyErr_NormalizeException(&type, &value, &tb);
    PyRef t = PyRef::steal(type), v = PyRef::steal(value), b = PyRef::steal(tb);
    std::string text;
    PyRef module = PyRef::steal(PyImport_ImportModule("traceback"));
    PyRef lines;
    if (module && t) {
        lines = PyRef::steal(PyObject_CallMethod(module.get(), "format_exception", "OOO", t.get(),
                                                 v ? v.get() : Py_None, b ? b.get() : Py_None));
    }
    if (lines) {
        PyRef empty = PyRef::steal(PyUnicode_FromString(""));
        PyRef joined = PyRef::steal(PyUnicode_Join(empty.get(), lines.get()));
        if (joined) {
            PyRef utf8 = PyRef::steal(PyUnicode_AsEncodedString(joined.get(), "utf-8", "replace"));
            char* data = nullptr;
            Py_ssize_t len = 0;
            if (utf8 && PyBytes_AsStringAndSize(utf8.get(), &data, &len) == 0) {
                text.assign(data, static_cast<std::size_t>(len));
            }
        }
    }
    PyErr_Clear();
    while (!text.empty() && text.back() == '\n') text.pop_back();
    return text.empty() ? "(no traceback)" : text;
}

// --- response framing ------------------------------------------------------------------------

// The response head; false (AssertionError set) when start_response() was never called.
bool build_head(Exchange& ex, std::optional<std::uint64_t> final_len, std::string* out) {
    if (!ex.has_status) {
        PyErr_SetString(PyExc_AssertionError, "the application did not call start_response()");
        return false;
    }
    const Server& srv = ex.srv;
    std::string extra;
    ex.no_body = ex.req.method == "HEAD" || ex.code == 204 || ex.code == 304 || ex.code < 200;
    if (ex.no_body) {
        if (final_len && *final_len && ex.req.method == "HEAD" && !ex.content_length) {
            extra = "Content-Length: " + std::to_string(*final_len) + "\r\n";  // what GET says
        }
    } else if (ex.content_length) {
        ex.remaining = *ex.content_length;
    } else if (final_len) {
        extra = "Content-Length: " + std::to_string(*final_len) + "\r\n";
    } else if (is_11(ex.req)) {
        ex.chunked = true;
        extra = "Transfer-Encoding: chunked\r\n";
    } else {
        ex.keep_alive = false;  // HTTP/1.0 without a length: the close ends the body
    }
    if (ex.app_close || ex.srv.draining() || srv.config().keepalive <= 0) ex.keep_alive = false;
    if (!ex.keep_alive) {
        extra += "Connection: close\r\n";
    } else if (is_10(ex.req)) {
        extra += "Connection: keep-alive\r\n";
    }
    ex.headers_sent = true;
    *out = "HTTP/1.1 " + ex.status + "\r\n" + ex.header_block + extra + ex.srv.date_header() +
           srv.config().version_header + "\r\n";
    return true;
}

// Sends iovecs; false marks the client gone. The first attempt is one non-blocking sendmsg()
// with the GIL held (it cannot block, and a response that fits the socket buffer, nearly all
// of them, then costs no GIL hand-off); only what is left is sent with the GIL released.
bool send_released(Exchange& ex, iovec* iov, int count) {
    ssize_t sent = transport_sendv(ex.conn.fd, ex.conn.ssl.get(), iov, count);  // non-blocking
    if (sent < 0) {
        if (errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR) {
            ex.gone_why = std::strerror(errno);
            ex.client_gone = true;
            return false;
        }
        sent = 0;
    }
    auto left = static_cast<std::size_t>(sent);
    int first = 0;
    while (first < count && left >= iov[first].iov_len) {
        left -= iov[first].iov_len;
        ++first;
    }
    if (first == count) return true;
    iov[first].iov_base = static_cast<char*>(iov[first].iov_base) + left;
    iov[first].iov_len -= left;
    bool ok;
    {
        GilReleased unlocked;
        ok = ex.srv.send_all(ex.conn, iov + first, count - first, &ex.gone_why);
    }
    if (!ok) ex.client_gone = true;
    return ok;
}

// One body chunk (bytes, owned by the caller), with the head first if it is not out yet.
// False: a Python exception is set, or the client is gone (ex.client_gone).
bool write_chunk(Exchange& ex, PyObject* bytes) {
    char* data = nullptr;
    Py_ssize_t len = 0;
    if (PyBytes_AsStringAndSize(bytes, &data, &len) != 0) return false;
    std::string head;
    if (!ex.headers_sent && !build_head(ex, std::nullopt, &head)) return false;
    auto size = static_cast<std::size_t>(len);
    char prefix[32];
    iovec iov[4];
    int count = 0;
    if (!head.empty()) iov[count++] = {head.data(), head.size()};
    if (!ex.no_body && size > 0) {
        if (ex.remaining >= 0) {
            size = std::min<std::size_t>(size, static_cast<std::size_t>(ex.remaining));
            ex.remaining -= static_cast<long long>(size);  // never more than the app announced
            iov[count++] = {data, size};
        } else if (ex.chunked) {
            const int n = std::snprintf(prefix, sizeof prefix, "%zx\r\n", size);
            iov[count++] = {prefix, static_cast<std::size_t>(n)};
            iov[count++] = {data, size};
            iov[count++] = {const_cast<char*>("\r\n"), 2};
            size += static_cast<std::size_t>(n) + 2;
        } else {
            iov[count++] = {data, size};
        }
        ex.bytes_sent += size;
    }
    if (count == 0) return true;
    return send_released(ex, iov, count);
}

// A body chunk as the app gave it: bytes, or bytearray/memoryview (copied); else TypeError.
bool write_object(Exchange& ex, PyObject* chunk) {
    if (PyBytes_CheckExact(chunk)) return write_chunk(ex, chunk);
    if (!PyByteArray_Check(chunk) && !PyMemoryView_Check(chunk)) {
        PyRef name = PyRef::steal(
            PyObject_GetAttrString(reinterpret_cast<PyObject*>(Py_TYPE(chunk)), "__name__"));
        PyErr_Format(PyExc_TypeError, "response body chunks must be bytes, got %S",
                     name ? name.get() : Py_None);
        return false;
    }
    PyRef copy = PyRef::steal(PyBytes_FromObject(chunk));
    return copy && write_chunk(ex, copy.get());
}

void check_length(Exchange& ex) {
    if (ex.remaining > 0 && !ex.no_body) {
        ex.srv.log(kWarning, ex.req.method + " " + ex.req.target.substr(0, 200) + ": app sent " +
                                 std::to_string(ex.remaining) +
                                 " bytes less than its Content-Length; closing");
        ex.keep_alive = false;
    }
}

bool finish(Exchange& ex) {
    if (!ex.headers_sent) {
        std::string head;
        if (!build_head(ex, 0, &head)) return false;
        iovec iov{head.data(), head.size()};
        if (!send_released(ex, &iov, 1)) return false;
    } else if (ex.chunked) {
        iovec iov{const_cast<char*>("0\r\n\r\n"), 5};
        if (!send_released(ex, &iov, 1)) return false;
    }
    check_length(ex);
    return true;
}

// The fast path for a one-element list: head and body in one writev, exact Content-Length.
bool finish_single(Exchange& ex, PyObject* item) {
    if (!PyBytes_CheckExact(item)) return write_object(ex, item) && finish(ex);
    const Py_ssize_t len = PyBytes_Size(item);
    std::string head;
    if (!build_head(ex, static_cast<std::uint64_t>(len), &head)) return false;
    // build_head() set the framing; write_chunk() sends the head it is given first.
    char* data = nullptr;
    Py_ssize_t size = 0;
    PyBytes_AsStringAndSize(item, &data, &size);
    iovec iov[2] = {{head.data(), head.size()}, {data, 0}};
    std::size_t body = ex.no_body ? 0 : static_cast<std::size_t>(size);
    if (ex.remaining >= 0) {
        body = std::min<std::size_t>(body, static_cast<std::size_t>(ex.remaining));
        ex.remaining -= static_cast<long long>(body);
    }
    iov[1].iov_len = body;
    ex.bytes_sent += body;
    if (!send_released(ex, iov, 2)) return false;
    check_length(ex);
    return true;
}

// wsgi.file_wrapper: sendfile() a regular file. 1 sent, 0 not possible (iterate instead),
// -1 failed (exception set or client gone).
int send_file(Exchange& ex, PyObject* wrapper) {
    PyRef filelike = PyRef::steal(PyObject_GetAttrString(wrapper, "filelike"));
    if (!filelike) {
        PyErr_Clear();
        return 0;
    }
    PyRef fileno = PyRef::steal(PyObject_CallMethod(filelike.get(), "fileno", nullptr));
    const long fd = fileno ? PyLong_AsLong(fileno.get()) : -1;
    struct stat st {};
    if (fd < 0 || PyErr_Occurred() || fstat(static_cast<int>(fd), &st) != 0 ||
        !S_ISREG(st.st_mode)) {
        PyErr_Clear();
        return 0;
    }
    long long offset = 0;
    if (PyObject_HasAttrString(filelike.get(), "tell")) {
        PyRef tell = PyRef::steal(PyObject_CallMethod(filelike.get(), "tell", nullptr));
        offset = tell ? PyLong_AsLongLong(tell.get()) : -1;
        if (offset < 0 || PyErr_Occurred()) {
            PyErr_Clear();
            return 0;
        }
    }
    std::uint64_t size = static_cast<std::uint64_t>(std::max<long long>(0, st.st_size - offset));
    std::string head;
    if (ex.content_length) {
        size = std::min<std::uint64_t>(
            size, static_cast<std::uint64_t>(std::max(0LL, *ex.content_length)));
        if (!build_head(ex, std::nullopt, &head)) return -1;
    } else if (!build_head(ex, size, &head)) {
        return -1;
    }
    iovec iov{head.data(), head.size()};
    std::optional<Corked> corked;
    if (!ex.no_body) corked.emplace(ex.conn);
    if (!send_released(ex, &iov, 1)) return -1;
    if (ex.no_body) return 1;
    ex.remaining = ex.content_length ? *ex.content_length - static_cast<long long>(size) : -1;
    std::uint64_t sent = 0;
    bool ok;
    {
        GilReleased unlocked;
        ok = ex.srv.send_file(ex.conn, static_cast<int>(fd), offset, size, &sent, &ex.gone_why);
        corked.reset();
    }
    ex.bytes_sent += sent;
    if (!ok) {
        ex.client_gone = true;
        return -1;
    }
    if (sent < size) ex.keep_alive = false;
    check_length(ex);
    return 1;
}

// --- start_response --------------------------------------------------------------------------

bool valid_status(PyObject* status, std::string* out) {
    if (!PyUnicode_CheckExact(status) || !latin1(status, out)) {
        PyErr_Clear();
        return false;
    }
    const std::string& s = *out;
    // A final status: 200-599 (a 1xx is informational, never the response; the client would
    // wait on for the final one).
    return s.size() >= 4 && s[0] >= '2' && s[0] <= '5' &&
           std::isdigit(static_cast<unsigned char>(s[1])) &&
           std::isdigit(static_cast<unsigned char>(s[2])) && s[3] == ' ' &&
           s.find_first_of("\r\n") == std::string::npos;
}

PyObject* start_response_call(PyObject* self, PyObject* args, PyObject* kwargs) {
    auto* sr = reinterpret_cast<StartResponseObject*>(self);
    static const char* kwlist[] = {"status", "headers", "exc_info", nullptr};
    PyObject* status = nullptr;
    PyObject* headers = nullptr;
    PyObject* exc_info = Py_None;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "OO|O:start_response",
                                     const_cast<char**>(kwlist), &status, &headers, &exc_info)) {
        return nullptr;
    }
    Exchange* ex = sr->exchange;
    if (ex == nullptr) {
        PyErr_SetString(PyExc_RuntimeError, "start_response() called after the request ended");
        return nullptr;
    }
    if (exc_info != Py_None) {
        if (ex->headers_sent) {
            // Re-raise the app's exception: too late to change the response.
            PyObject* type = PySequence_GetItem(exc_info, 0);
            PyObject* value = type ? PySequence_GetItem(exc_info, 1) : nullptr;
            PyObject* tb = value ? PySequence_GetItem(exc_info, 2) : nullptr;
            if (tb == nullptr) {
                Py_XDECREF(type);
                Py_XDECREF(value);
                return nullptr;
            }
            PyErr_Restore(type, value, tb == Py_None ? (Py_DECREF(tb), nullptr) : tb);
            return nullptr;
        }
    } else if (ex->has_status) {
        PyErr_SetString(PyExc_AssertionError, "start_response() called twice without exc_info");
        return nullptr;
    }
    std::string status_text;
    if (!valid_status(status, &status_text)) {
        PyRef repr = PyRef::steal(PyObject_Repr(status));
        PyErr_Format(PyExc_ValueError, "invalid status line %U", repr ? repr.get() : Py_None);
        return nullptr;
    }
    std::string block;
    std::optional<long long> content_length;
    bool app_close = false;
    PyRef it = PyRef::steal(PyObject_GetIter(headers));
    if (!it) return nullptr;
    while (PyRef item = PyRef::steal(PyIter_Next(it.get()))) {
        if (!PyTuple_Check(item.get()) || PyTuple_Size(item.get()) != 2) {
            PyErr_Format(PyExc_TypeError, "response header %R is not a (name, value) pair",
                         item.get());
            return nullptr;
        }
        PyObject* name = PyTuple_GetItem(item.get(), 0);   // borrowed
        PyObject* value = PyTuple_GetItem(item.get(), 1);  // borrowed
        if (!PyUnicode_CheckExact(name) || !PyUnicode_CheckExact(value)) {
            PyErr_Format(PyExc_TypeError, "header %R: name and value must be str", item.get());
            return nullptr;
        }
        std::string n, v;
        if (!latin1(name, &n) || !latin1(value, &v)) return nullptr;
        if (n.empty() || n.find_first_of(" \t\r\n:") != std::string::npos) {
            PyErr_Format(PyExc_ValueError, "invalid response header name %R", name);
            return nullptr;
        }
        if (v.find_first_of("\r\n") != std::string::npos) {
            PyErr_SetString(PyExc_ValueError, "CR or LF inside a response header");
            return nullptr;
        }
        const std::string lname = lower(n);
        if (lname == "connection" || lname == "transfer-encoding" || lname == "keep-alive" ||
            lname == "upgrade" || lname == "proxy-connection" || lname == "te" ||
            lname == "trailer") {
            // PEP 3333 forbids hop-by-hop headers; the server owns framing. Honour an
            // explicit close, drop the rest.
            if (lname == "connection" && lower(v).find("close") != std::string::npos) {
                app_close = true;
            }
            continue;
        }
        if (lname == "content-length") {
            // Digits only (as a request's): int() would take "-1" (no limit at all), "+5",
            // "1_0" or " 5", and send them as they are.
            if (v.empty() || v.size() > 18 ||
                !std::all_of(v.begin(), v.end(), [](char c) { return c >= '0' && c <= '9'; })) {
                PyErr_Format(PyExc_ValueError, "invalid Content-Length %R", value);
                return nullptr;
            }
            content_length = std::stoll(v);
        }
        block += n + ": " + v + "\r\n";
    }
    if (PyErr_Occurred()) return nullptr;
    ex->has_status = true;
    ex->status = status_text;
    ex->code = std::stoi(status_text.substr(0, 3));
    ex->header_block = std::move(block);
    ex->content_length = content_length;
    ex->app_close = app_close;
    return PyObject_GetAttrString(self, "write");
}

PyObject* start_response_write(PyObject* self, PyObject* data) {
    Exchange* ex = reinterpret_cast<StartResponseObject*>(self)->exchange;
    if (ex == nullptr) {
        PyErr_SetString(PyExc_RuntimeError, "write() called after the request ended");
        return nullptr;
    }
    if (!write_object(*ex, data)) {
        if (ex->client_gone && !PyErr_Occurred()) {
            PyErr_Format(PyExc_OSError, "client disconnected: %s", ex->gone_why.c_str());
        }
        return nullptr;
    }
    Py_RETURN_NONE;
}

PyMethodDef start_response_methods[] = {
    {"write", start_response_write, METH_O, "Write a body chunk (the PEP 3333 write callable)."},
    {nullptr, nullptr, 0, nullptr}};

PyType_Slot start_response_slots[] = {
    {Py_tp_call, reinterpret_cast<void*>(start_response_call)},
    {Py_tp_methods, start_response_methods},
    {Py_tp_dealloc, reinterpret_cast<void*>(free_heap_object)},
    {Py_tp_doc, const_cast<char*>("The start_response callable of one request.")},
    {0, nullptr}};

// --- wsgi.input ------------------------------------------------------------------------------

bool size_arg(PyObject* args, long long* size) {
    PyObject* arg = Py_None;
    if (!PyArg_ParseTuple(args, "|O", &arg)) return false;
    *size = -1;
    if (arg != Py_None) {
        *size = PyLong_AsLongLong(arg);
        if (*size == -1 && PyErr_Occurred()) return false;
    }
    return true;
}

PyObject* input_bytes(InputObject* in, std::uint64_t len) {
    PyRef out = PyRef::steal(PyBytes_FromStringAndSize(nullptr, static_cast<Py_ssize_t>(len)));
    if (!out) return nullptr;
    const std::size_t got = in->body->read_at(in->pos, PyBytes_AsString(out.get()), len);
    in->pos += got;
    if (got != len) return PyBytes_FromStringAndSize(PyBytes_AsString(out.get()), got);
    return out.release();
}

PyObject* input_read(PyObject* self, PyObject* args) {
    auto* in = reinterpret_cast<InputObject*>(self);
    long long size;
    if (!size_arg(args, &size)) return nullptr;
    const std::uint64_t left = in->body->size() - std::min(in->pos, in->body->size());
    const std::uint64_t n = size < 0 ? left : std::min<std::uint64_t>(left, size);
    return input_bytes(in, n);
}

// The length of the next line (up to and with its LF), at most `limit` bytes.
std::uint64_t next_line_length(InputObject* in, long long limit) {
    const std::uint64_t total = in->body->size();
    std::uint64_t end = in->pos;
    char buf[8192];
    while (end < total) {
        const std::size_t got = in->body->read_at(end, buf, sizeof buf);
        if (got == 0) break;
        const void* lf = std::memchr(buf, '\n', got);
        if (lf != nullptr) {
            end += static_cast<std::uint64_t>(static_cast<const char*>(lf) - buf) + 1;
            break;
        }
        end += got;
        if (limit >= 0 && end - in->pos >= static_cast<std::uint64_t>(limit)) break;
    }
    std::uint64_t len = end - in->pos;
    if (limit >= 0) len = std::min<std::uint64_t>(len, static_cast<std::uint64_t>(limit));
    return len;
}

PyObject* input_readline(PyObject* self, PyObject* args) {
    auto* in = reinterpret_cast<InputObject*>(self);
    long long size;
    if (!size_arg(args, &size)) return nullptr;
    return input_bytes(in, next_line_length(in, size));
}

PyObject* input_readlines(PyObject* self, PyObject* args) {
    auto* in = reinterpret_cast<InputObject*>(self);
    long long hint;
    if (!size_arg(args, &hint)) return nullptr;
    PyRef lines = PyRef::steal(PyList_New(0));
    if (!lines) return nullptr;
    std::uint64_t total = 0;
    while (in->pos < in->body->size()) {
        PyRef line = PyRef::steal(input_bytes(in, next_line_length(in, -1)));
        if (!line || PyList_Append(lines.get(), line.get()) != 0) return nullptr;
        total += static_cast<std::uint64_t>(PyBytes_Size(line.get()));
        if (hint > 0 && total >= static_cast<std::uint64_t>(hint)) break;
    }
    return lines.release();
}

PyObject* input_iter(PyObject* self) {
    Py_INCREF(self);
    return self;
}

PyObject* input_next(PyObject* self) {
    auto* in = reinterpret_cast<InputObject*>(self);
    if (in->pos >= in->body->size()) return nullptr;  // StopIteration
    return input_bytes(in, next_line_length(in, -1));
}

void input_dealloc(PyObject* self) {
    delete reinterpret_cast<InputObject*>(self)->body;
    free_heap_object(self);
}

PyMethodDef input_methods[] = {
    {"read", input_read, METH_VARARGS, "read(size=-1) -> bytes"},
    {"readline", input_readline, METH_VARARGS, "readline(size=-1) -> bytes"},
    {"readlines", input_readlines, METH_VARARGS, "readlines(hint=-1) -> list of bytes"},
    {nullptr, nullptr, 0, nullptr}};

PyType_Slot input_slots[] = {
    {Py_tp_methods, input_methods},
    {Py_tp_iter, reinterpret_cast<void*>(input_iter)},
    {Py_tp_iternext, reinterpret_cast<void*>(input_next)},
    {Py_tp_dealloc, reinterpret_cast<void*>(input_dealloc)},
    {Py_tp_doc, const_cast<char*>("wsgi.input: the request body, buffered before the app runs.")},
    {0, nullptr}};

// --- environ ---------------------------------------------------------------------------------

// The CGI name for a header (a new reference); None for names with '_' (they could spoof a '-'
// header). Null with an exception set on failure.
PyRef header_key(Server& srv, const std::string& name) {
    auto found = srv.header_keys.find(name);
    if (found != srv.header_keys.end()) return PyRef::borrow(found->second.get());
    std::string key;
    for (char c : name) {
        key.push_back(static_cast<char>(std::toupper(static_cast<unsigned char>(c))));
    }
    PyRef value;
    if (key.find('_') != std::string::npos) {
        value = PyRef::borrow(Py_None);
    } else {
        std::replace(key.begin(), key.end(), '-', '_');
        if (key != "CONTENT_TYPE" && key != "CONTENT_LENGTH") key = "HTTP_" + key;
        value = PyRef::steal(PyUnicode_InternFromString(key.c_str()));
        if (!value) return value;
    }
    if (srv.header_keys.size() < 4096) {  // bounded: header names are attacker-chosen
        srv.header_keys.emplace(name, PyRef::borrow(value.get()));
    }
    return value;
}

bool set_text(PyObject* env, PyObject* key, const std::string& value) {
    PyRef text = decode_latin1(value);
    return text && PyDict_SetItem(env, key, text.get()) == 0;
}

// Whether the request carries a header the trusted-proxy rule reads (case-insensitive).
bool has_forwarding_header(const EngineConfig& config, const Request& req) {
    for (const auto& [name, value] : req.headers) {
        for (const auto& wanted : config.forwarding_headers) {
            if (strcasecmp(name.c_str(), wanted.c_str()) == 0) return true;
        }
    }
    return false;
}

// Applies the trusted-proxy rule to the environ when the request may need it. Returns the
// client the access log should show when a trusted proxy named one, else "". The rule never
// fails a request: an exception from it is logged and the environ kept as the socket made it.
std::string apply_proxy_rule(Server& srv, Connection& conn, Request& req, PyObject* env) {
    const EngineConfig& config = srv.config();
    if (!config.proxy_rule || !has_forwarding_header(config, req)) return "";
    PyRef seen = PyRef::steal(PyObject_CallFunctionObjArgs(config.proxy_rule.get(), env, nullptr));
    if (!seen) {
        srv.log(kError,
                conn.remote() + ": error in the trusted-proxy rule\n" + take_exception_text());
        return "";
    }
    if (!PyUnicode_Check(seen.get())) return "";
    PyRef bytes = PyRef::steal(PyUnicode_AsEncodedString(seen.get(), "latin-1", "replace"));
    if (!bytes) {
        PyErr_Clear();
        return "";
    }
    return std::string(PyBytes_AsString(bytes.get()),
                       static_cast<std::size_t>(PyBytes_Size(bytes.get())));
}

// A TLS connection's keys, as molt_shim/tls.py (connection_environ) sets them for the Python
// engine: HTTPS, the scheme, the protocol and a verified client certificate's names.
bool set_tls_environ(Connection& conn, PyObject* env) {
    if (!conn.tls_known) {  // the handshake is done: a request came through it
        conn.tls = tls_peer(conn.ssl.get());
        conn.tls_known = true;
    }
    auto set = [env](const char* key, const std::string& value) {  // names are UTF-8
        PyRef text = PyRef::steal(
            PyUnicode_DecodeUTF8(value.data(), static_cast<Py_ssize_t>(value.size()), "replace"));
        return text && PyDict_SetItemString(env, key, text.get()) == 0;
    };
    const TlsPeer& peer = conn.tls;
    if (!set("HTTPS", "on") || !set("wsgi.url_scheme", "https") ||
        (!peer.protocol.empty() && !set("SSL_PROTOCOL", peer.protocol))) {
        return false;
    }
    if (!peer.verified) return true;
    return set("SSL_CLIENT_S_DN", peer.subject) && set("SSL_CLIENT_I_DN", peer.issuer) &&
           set("SSL_CLIENT_VERIFY", "SUCCESS");
}

PyRef build_environ(Server& srv, Connection& conn, Request& req) {
    const PyShared& sh = srv.shared();
    PyRef env = PyRef::steal(PyDict_Copy(srv.base_env(conn)));
    if (!env) return env;
    for (const auto& [name, value] : req.headers) {
        PyRef key_ref = header_key(srv, name);
        PyObject* key = key_ref.get();
        if (key == nullptr) return PyRef();
        if (key == Py_None) continue;
        if (req.chunked && lower(name) == "transfer-encoding") continue;
        PyRef text = decode_latin1(value);
        if (!text) return PyRef();
        PyObject* old = PyDict_GetItem(env.get(), key);  // borrowed
        if (old != nullptr) {
            PyRef comma = PyRef::steal(PyUnicode_FromString(","));
            PyRef joined = PyRef::steal(PyUnicode_Concat(old, comma.get()));
            if (!joined) return PyRef();
            text = PyRef::steal(PyUnicode_Concat(joined.get(), text.get()));
            if (!text) return PyRef();
        }
        if (PyDict_SetItem(env.get(), key, text.get()) != 0) return PyRef();
    }
    if (req.chunked) {  // de-chunked and complete: tell the app its real length
        if (!set_text(env.get(), sh.key(EnvKey::content_length), std::to_string(req.body.size())))
            return PyRef();
    }
    auto [raw_path, query] = split_target(req.target);
    std::string path = percent_decode(raw_path);
    const std::string& script = srv.config().script_name;
    if (!script.empty() && (path == script || path.rfind(script + "/", 0) == 0)) {
        path = path.substr(script.size());
    }
    const std::string version =
        std::to_string(req.version_major) + "." + std::to_string(req.version_minor);
    if (!set_text(env.get(), sh.key(EnvKey::request_method), req.method) ||
        !set_text(env.get(), sh.key(EnvKey::path_info), path) ||
        !set_text(env.get(), sh.key(EnvKey::query_string), query) ||
        !set_text(env.get(), sh.key(EnvKey::raw_uri), req.target) ||
        !set_text(env.get(), sh.key(EnvKey::server_protocol), "HTTP/" + version) ||
        !set_text(env.get(), sh.key(EnvKey::remote_addr), conn.remote_addr) ||
        !set_text(env.get(), sh.key(EnvKey::remote_port), conn.tcp ? conn.remote_port : "")) {
        return PyRef();
    }
    if (conn.ssl && !set_tls_environ(conn, env.get())) return PyRef();
    auto* input = alloc_object<InputObject>(srv.shared().input_type);
    if (input == nullptr) return PyRef();
    input->body = new Body(std::move(req.body));
    input->pos = 0;
    PyRef input_ref = PyRef::steal(reinterpret_cast<PyObject*>(input));
    if (PyDict_SetItem(env.get(), sh.key(EnvKey::wsgi_input), input_ref.get()) != 0) return PyRef();
    return env;
}

void internal_error(Exchange& ex) {
    ex.code = 500;
    const std::string body = "500 Internal Server Error\n";
    std::string all =
        "HTTP/1.1 500 Internal Server Error\r\nContent-Type: text/plain; "
        "charset=utf-8\r\nContent-Length: " +
        std::to_string(body.size()) + "\r\nConnection: close\r\n" + ex.srv.date_header() +
        ex.srv.config().version_header + "\r\n";
    if (ex.req.method != "HEAD") all += body;  // a HEAD's answer is the head alone
    iovec iov{all.data(), all.size()};
    send_released(ex, &iov, 1);
}

// Runs the app's response: the one-element fast path, a file wrapper, or iteration.
bool respond(Exchange& ex, PyObject* result) {
    Server& srv = ex.srv;
    if ((PyList_CheckExact(result) || PyTuple_CheckExact(result)) && PySequence_Size(result) == 1 &&
        !ex.headers_sent) {
        PyRef item = PyRef::steal(PySequence_GetItem(result, 0));
        return item && finish_single(ex, item.get());
    }
    // sendfile() only for a response whose head has not gone: after the app's write() calls
    // (PEP 3333 allows them before a file wrapper) the head is out and the body is chunked,
    // so the wrapper is iterated like any other body.
    if (srv.file_wrapper() != nullptr && ex.has_status && !ex.headers_sent) {
        const int is_wrapper = PyObject_IsInstance(result, srv.file_wrapper());
        if (is_wrapper < 0) return false;
        if (is_wrapper) {
            const int sent = send_file(ex, result);
            if (sent < 0) return false;
            if (sent > 0) return true;
        }
    }
    PyRef it = PyRef::steal(PyObject_GetIter(result));
    if (!it) return false;
    while (PyRef chunk = PyRef::steal(PyIter_Next(it.get()))) {
        const int truthy = PyObject_IsTrue(chunk.get());
        if (truthy < 0) return false;
        if (truthy && !write_object(ex, chunk.get())) return false;
    }
    if (PyErr_Occurred()) return false;
    return finish(ex);
}

}  // namespace

PyType_Spec start_response_spec = {"_molt_native.StartResponse", sizeof(StartResponseObject), 0,
                                   Py_TPFLAGS_DEFAULT, start_response_slots};
PyType_Spec input_spec = {"_molt_native.Input", sizeof(InputObject), 0, Py_TPFLAGS_DEFAULT,
                          input_slots};

bool Server::handle(Connection& conn, Request& req, PyThreadState* thread_state) {
    GilHeld gil(thread_state);
    // In flight (timeouts.request) from now, when the app starts: the body was read before,
    // at the client's pace, and a slow upload is no stuck worker.
    const std::uint64_t token = conn.warmup ? 0 : begin_request(monotonic());
    Exchange ex(*this, conn, req);
    const std::string method = req.method;
    const std::string target = req.target.substr(0, 200);
    auto* sr = alloc_object<StartResponseObject>(shared().start_response_type);
    PyRef sr_ref = PyRef::steal(reinterpret_cast<PyObject*>(sr));
    PyRef result;
    bool ok = false;
    std::string remote_seen;  // the client a trusted proxy named, for the access log
    bool raised = false;
    PyRef env;  // kept for the access log's request headers
    if (sr != nullptr) {
        sr->exchange = &ex;
        env = build_environ(*this, conn, req);
        if (env) {
            remote_seen = apply_proxy_rule(*this, conn, req, env.get());
            result =
                PyRef::steal(PyObject_CallFunctionObjArgs(app(), env.get(), sr_ref.get(), nullptr));
            ok = result && respond(ex, result.get());
        }
    }
    if (!ok) {
        ex.keep_alive = false;
        if (ex.client_gone) {
            PyErr_Clear();
            log(kInfo, conn.remote() + ": client disconnected during the response to " + method +
                           " " + target + ": " + ex.gone_why);
            if (ex.code == 0) ex.code = 499;
        } else {
            raised = true;
            log(kError, conn.remote() + ": error in the application handling " + method + " " +
                            target + "\n" + take_exception_text());
            if (!ex.headers_sent) internal_error(ex);
        }
    }
    // A plain list or tuple (most apps' answer) has no close(): asking would build and clear
    // an AttributeError on every request.
    if (result && !PyList_CheckExact(result.get()) && !PyTuple_CheckExact(result.get()) &&
        PyObject_HasAttrString(result.get(), "close")) {
        PyRef closed = PyRef::steal(PyObject_CallMethod(result.get(), "close", nullptr));
        if (!closed) {
            log(kError, "error in close() of the application's response\n" + take_exception_text());
        }
    }
    result = PyRef();
    if (sr != nullptr) sr->exchange = nullptr;
    if (conn.warmup) return ex.keep_alive;  // neither counted nor logged
    const double elapsed = monotonic() - req.started;
    end_request(token, ex.code, elapsed, raised);
    if (access_log() != nullptr) {
        const std::string remote = remote_seen.empty() ? conn.remote() : remote_seen;
        // Headers only when the format names one (accesslog.py formats them on its thread).
        PyObject* request_headers =
            config().access_request_headers && env ? env.get() : Py_None;  // borrowed
        PyRef response_headers =
            config().access_response_headers
                ? PyRef::steal(PyUnicode_DecodeLatin1(
                      ex.header_block.data(), static_cast<Py_ssize_t>(ex.header_block.size()),
                      "replace"))
                : PyRef::borrow(Py_None);
        PyRef entry = PyRef::steal(Py_BuildValue(
            "(s#s#s#sindOO)", remote.data(), static_cast<Py_ssize_t>(remote.size()), method.data(),
            static_cast<Py_ssize_t>(method.size()), req.target.data(),
            static_cast<Py_ssize_t>(req.target.size()),
            ("HTTP/" + std::to_string(req.version_major) + "." + std::to_string(req.version_minor))
                .c_str(),
            ex.code, static_cast<Py_ssize_t>(ex.bytes_sent), elapsed * 1000.0, request_headers,
            response_headers ? response_headers.get() : Py_None));
        PyRef put = entry
                        ? PyRef::steal(PyObject_CallMethod(access_log(), "put", "(O)", entry.get()))
                        : PyRef();
        if (!put) PyErr_Clear();
    }
    return ex.keep_alive;
}

}  // namespace molt::native
