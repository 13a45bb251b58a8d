// The ASGI engine's own TCP I/O (see asgi_io.hpp).
#include "asgi_io.hpp"

#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <unistd.h>

#include <cstdint>
#include <cstring>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "accept_balance.hpp"
#include "recv_ring.hpp"
#include "send_batch.hpp"
#include "wsgi_call.hpp"

namespace molt::native {
namespace {

constexpr size_t kReadSize = 64 * 1024;
constexpr size_t kDefaultHighWater = 64 * 1024;  // asyncio's default; low is a quarter
constexpr int kAcceptsPerWakeup = 64;            // the listener stays readable for the rest
constexpr int kEventsPerPoll = 128;
constexpr int kMaxIovecs = 64;
constexpr uint64_t kListenerTag = 1ull << 63;
constexpr uint32_t kGenerationMask = 0x7fffffffu;
// A connection read this many times is kept alive, and the loop's own epoll watches it for
// reading from then on: a wake-up for it then costs one epoll_wait, not two (the loop's, then
// the hub's nested one; about 1.1 us each on this machine class). Not from the first read:
// the move costs about five system calls (uvloop's add_reader() tries the descriptor with an
// epoll_ctl() pair and sets it non-blocking, the loop adds it, remove_reader() takes it out),
// more than the wake-ups of a connection that serves a request or two save.
constexpr uint32_t kReadsBeforeTheLoopWatches = 4;

struct IoHubObject;
struct IoTransportObject;

// The protocol methods a transport calls, interned once per hub.
struct Names {
    PyRef data_received, connection_made, connection_lost, eof_received, pause_writing,
        resume_writing, read_now, lost_now, readable, run, look_again, send_held;
    bool init() {
        data_received = PyRef::steal(PyUnicode_InternFromString("data_received"));
        connection_made = PyRef::steal(PyUnicode_InternFromString("connection_made"));
        connection_lost = PyRef::steal(PyUnicode_InternFromString("connection_lost"));
        eof_received = PyRef::steal(PyUnicode_InternFromString("eof_received"));
        pause_writing = PyRef::steal(PyUnicode_InternFromString("pause_writing"));
        resume_writing = PyRef::steal(PyUnicode_InternFromString("resume_writing"));
        read_now = PyRef::steal(PyUnicode_InternFromString("_read_now"));
        lost_now = PyRef::steal(PyUnicode_InternFromString("_connection_lost"));
        readable = PyRef::steal(PyUnicode_InternFromString("_readable"));
        run = PyRef::steal(PyUnicode_InternFromString("run"));
        look_again = PyRef::steal(PyUnicode_InternFromString("_look_again"));
        send_held = PyRef::steal(PyUnicode_InternFromString("send_held"));
        return data_received && connection_made && connection_lost && eof_received &&
               pause_writing && resume_writing && read_now && lost_now && readable && run &&
               look_again && send_held;
    }
};

struct Listener {
    int fd = -1;  // -1: removed
    PyRef factory;
    PyRef sockname;  // empty: a wildcard address, asked per connection
    bool read_at_once = false;
    bool paused = false;    // accept() ran out of descriptors or memory: accept_failed
    AsideListener balance;  // out of the accept queue while this worker holds more than its share
};

// In the hub's epoll, accepting.
bool accepting(const Listener& l) {
    return l.fd >= 0 && !l.paused && !l.balance.aside;
}

struct Hub {
    int epfd = -1;
    PyRef transport_type;
    PyRef call_soon, call_later, add_reader, remove_reader;  // the loop's
    PyRef context;        // the context it was made in, kept: what the loop's handles for it copy
    PyRef report;         // report(message, exception, protocol, transport)
    PyRef accept_failed;  // accept_failed(listener_fd, exception)
    Names names;
    std::vector<PyRef> open;            // by fd: the open connections' transports
    std::vector<uint32_t> generations;  // by fd: an event for a closed connection is dropped
    std::vector<Listener> listeners;    // epoll data: kListenerTag | index
    std::vector<char> read_buffer = std::vector<char>(kReadSize);
    size_t connections = 0;  // open transports
    // The generation's accept board (accept_balance.hpp); inactive without one.
    std::unique_ptr<AcceptBoard> board;
    bool looking_again = false;        // a look at the listeners standing aside is scheduled
    std::vector<PyRef> held;           // transports whose writes wait for hub.send_held()
    std::unique_ptr<SendBatch> sends;  // how send_held() sends them: one system call for all
    std::unique_ptr<RecvRing> reads;   // kept-alive connections' reads; null: the loop's reader

    ~Hub() {
        if (epfd >= 0) close(epfd);
    }
};

// What the socket has not taken yet. Sent bytes are skipped, not erased, until they are most
// of the buffer: erasing from the front after every partial send would copy the rest each
// time (quadratic for one large write to a slow client).
class OutBuffer {
  public:
    bool empty() const { return head_ == bytes_.size(); }
    size_t size() const { return bytes_.size() - head_; }
    const char* data() const { return bytes_.data() + head_; }
    void append(const char* data, size_t size) { bytes_.append(data, size); }
    void consume(size_t n) {
        head_ += n;
        if (head_ == bytes_.size()) {
            clear();
        } else if (head_ > kCompactAfter && head_ > bytes_.size() / 2) {
            bytes_.erase(0, head_);
            head_ = 0;
        }
    }
    void clear() {
        bytes_.clear();
        head_ = 0;
    }
    void release() {
        clear();
        bytes_.shrink_to_fit();
    }

  private:
    static constexpr size_t kCompactAfter = 64 * 1024;
    std::string bytes_;
    size_t head_ = 0;
};

// One accepted connection. The Python references are dropped when it closes, so a protocol
// and its transport, which hold each other, do not wait for the cycle collector.
struct Connection {
    int fd = -1;
    uint32_t generation = 0;
    PyRef hub;  // the IoHubObject
    PyRef protocol;
    PyRef peername;
    PyRef sockname;
    OutBuffer pending;
    size_t high = kDefaultHighWater;
    size_t low = kDefaultHighWater / 4;
    bool registered = false;    // in the hub's epoll set
    bool on_loop = false;       // read when the loop's epoll says so (kReadsBeforeTheLoopWatches)
    bool on_ring = false;       // read by the hub's RecvRing instead (kReadsBeforeTheLoopWatches)
    bool ring_armed = false;    // on_ring, and its multishot recv has not ended
    std::string stash;          // on_ring: bytes that came while reading was paused
    bool stash_eof = false;     // ... and the peer's FIN after them
    int stash_error = 0;        // ... or an error after them
    bool loop_reading = false;  // on_loop and the loop's reader is on (not paused, no EOF yet)
    bool at_eof = false;        // the peer's FIN was read: nothing more will come
    uint32_t reads = 0;         // wake-ups that read, while the hub watched it
    bool closing = false;       // close() was asked: the descriptor goes once `pending` is out
    bool closed = false;        // the descriptor is closed; connection_lost is scheduled
    bool eof_pending = false;   // write_eof() was asked: the FIN goes once `pending` is out
    bool reading_paused = false;
    bool maybe_readable = false;  // bytes may wait: no short read since the last edge
    bool protocol_paused = false;
    bool lost = false;  // connection_lost() was delivered
    bool held = false;  // `pending` holds writes until hub.send_held(), at the loop's next turn
};

struct IoHubObject {
    PyObject_HEAD Hub* hub;
};

struct IoTransportObject {
    PyObject_HEAD Connection* conn;
};

Hub& hub_of(PyObject* hub_object) {
    return *reinterpret_cast<IoHubObject*>(hub_object)->hub;
}
Connection& conn_of(PyObject* transport) {
    return *reinterpret_cast<IoTransportObject*>(transport)->conn;
}
Hub& hub_of(Connection& c) {
    return hub_of(c.hub.get());
}

// An event's data: the descriptor, and its generation in bits 32-62 (bit 63 is kListenerTag).
uint64_t event_data(const Connection& c) {
    return (static_cast<uint64_t>(c.generation & kGenerationMask) << 32) |
           static_cast<uint32_t>(c.fd);
}

PyObject* address(const sockaddr_storage& ss) {
    char host[INET6_ADDRSTRLEN];
    if (ss.ss_family == AF_INET) {
        const auto* a = reinterpret_cast<const sockaddr_in*>(&ss);
        inet_ntop(AF_INET, &a->sin_addr, host, sizeof host);
        return Py_BuildValue("(si)", host, ntohs(a->sin_port));
    }
    if (ss.ss_family == AF_INET6) {  // as asyncio gives it: (host, port, flowinfo, scope_id)
        const auto* a = reinterpret_cast<const sockaddr_in6*>(&ss);
        inet_ntop(AF_INET6, &a->sin6_addr, host, sizeof host);
        return Py_BuildValue("(siII)", host, ntohs(a->sin6_port), ntohl(a->sin6_flowinfo),
                             a->sin6_scope_id);
    }
    Py_RETURN_NONE;
}

// The current Python exception, handed to `report` as asyncio's transports hand a failing
// protocol method to the loop's exception handler; returned for connection_lost().
PyRef report_error(Connection& c, PyObject* transport, const char* message) {
    PyObject* type = nullptr;
    PyObject* value = nullptr;
    PyObject* traceback = nullptr;
    PyErr_Fetch(&type, &value, &traceback);
    PyErr_NormalizeException(&type, &value, &traceback);
    if (value != nullptr && traceback != nullptr) PyException_SetTraceback(value, traceback);
    PyRef exc = PyRef::steal(value);
    Py_XDECREF(type);
    Py_XDECREF(traceback);
    PyObject* protocol = c.protocol ? c.protocol.get() : Py_None;
    PyRef r = PyRef::steal(PyObject_CallFunction(hub_of(c).report.get(), "sOOO", message,
                                                 exc ? exc.get() : Py_None, protocol, transport));
    if (!r) PyErr_WriteUnraisable(hub_of(c).report.get());
    return exc;
}

// fn(a[, b]) in the hub's own context, a copy of the one it was made in (the worker's, after the
// app's import). The loop copies the caller's context into each handle it makes (add_reader,
// call_soon): a transport call made from an app's task (resume_reading from receive(), or from
// send() after a pipelined response) would otherwise run the connection's later reads, and so
// the tasks of its later requests, in that request's context variables.
PyRef call_in_hub_context(Hub& hub, PyObject* fn, PyObject* a, PyObject* b = nullptr) {
    return PyRef::steal(
        PyObject_CallMethodObjArgs(hub.context.get(), hub.names.run.get(), fn, a, b, nullptr));
}

// The loop's reader for a connection it watches: add_reader(fd, transport._readable). False
// with a Python error set.
bool start_loop_reader(Connection& c, PyObject* transport) {
    Hub& hub = hub_of(c);
    PyRef readable = PyRef::steal(PyObject_GetAttr(transport, hub.names.readable.get()));
    PyRef fd = PyRef::steal(PyLong_FromLong(c.fd));
    PyRef r = readable && fd
                  ? call_in_hub_context(hub, hub.add_reader.get(), fd.get(), readable.get())
                  : PyRef();
    if (!r) return false;
    c.loop_reading = true;
    return true;
}

// A failure (a loop already closed, in a worker's last moments) is reported, not raised: the
// callers are closing or pausing, and go on.
void stop_loop_reader(Connection& c) {
    if (!c.loop_reading) return;
    c.loop_reading = false;
    Hub& hub = hub_of(c);
    PyRef r = PyRef::steal(PyObject_CallFunction(hub.remove_reader.get(), "i", c.fd));
    if (!r) PyErr_WriteUnraisable(hub.remove_reader.get());
}

bool standing_aside(const Hub& hub);
void look_again(PyObject* hub_object, bool timed);

// Closes the descriptor and schedules the transport's _connection_lost(exc), which tells
// whichever protocol is the transport's by then (a WebSocket upgrade sets its protocol after
// feeding it, and the feeding may close). Drops the hub's reference to the transport: the
// caller holds its own while it still uses it.
void finish(Connection& c, PyObject* exc) {
    if (c.closed) return;
    c.closed = true;
    c.closing = true;
    Hub& hub = hub_of(c);
    stop_loop_reader(c);  // before the descriptor goes: its number may be reused at once
    if (c.ring_armed) {   // or the ring's reference would keep the socket (and its FIN)
        hub.reads->cancel(event_data(c));
        c.ring_armed = false;
    }
    c.stash.clear();
    hub.generations[c.fd]++;
    close(c.fd);  // leaves the hub's epoll set with it
    c.pending.release();
    PyRef own = std::move(hub.open[c.fd]);  // released last: it may be what keeps `c` alive
    hub.board->set_connections(--hub.connections);
    if (standing_aside(hub)) look_again(c.hub.get(), false);
    PyRef lost = PyRef::steal(PyObject_GetAttr(own.get(), hub.names.lost_now.get()));
    PyRef r = lost ? call_in_hub_context(hub, hub.call_soon.get(), lost.get(), exc ? exc : Py_None)
                   : PyRef();
    if (lost && !r) {  // the context refused (entered already, by a finalizer run inside it)
        PyErr_Clear();
        r = PyRef::steal(PyObject_CallFunctionObjArgs(hub.call_soon.get(), lost.get(),
                                                      exc ? exc : Py_None, nullptr));
    }
    if (!r) {  // the loop is closed (a worker's last moments): nobody will hear it
        PyErr_WriteUnraisable(own.get());
        c.protocol = PyRef();  // or it and the transport would hold each other for ever
        c.lost = true;
    }
}

void fail(Connection& c, int err) {
    PyRef exc = PyRef::steal(
        PyObject_CallFunction(err == EPIPE ? PyExc_BrokenPipeError : PyExc_ConnectionResetError,
                              "is", err, strerror(err)));
    if (!exc) PyErr_Clear();
    finish(c, exc.get());
}

void call_protocol(Connection& c, PyObject* transport, PyObject* name, const char* message) {
    PyRef r = PyRef::steal(PyObject_CallMethodObjArgs(c.protocol.get(), name, nullptr));
    if (!r) report_error(c, transport, message);
}

void pause_protocol_if_full(Connection& c, PyObject* transport) {
    if (c.protocol && !c.protocol_paused && c.pending.size() > c.high) {
        c.protocol_paused = true;
        call_protocol(c, transport, hub_of(c).names.pause_writing.get(),
                      "protocol.pause_writing() failed");
    }
}

void resume_protocol_if_drained(Connection& c, PyObject* transport) {
    if (c.protocol && c.protocol_paused && c.pending.size() <= c.low) {
        c.protocol_paused = false;
        call_protocol(c, transport, hub_of(c).names.resume_writing.get(),
                      "protocol.resume_writing() failed");
    }
}

void watch(Connection& c, int op) {
    epoll_event ev{};
    ev.events = EPOLLET;
    if (!c.on_loop && !c.on_ring) ev.events |= EPOLLIN | EPOLLRDHUP;
    if (!c.pending.empty() && !c.held) ev.events |= EPOLLOUT;  // held: send_held() sends them
    ev.data.u64 = event_data(c);
    epoll_ctl(hub_of(c).epfd, op, c.fd, &ev);
}

// The hub reads the connection again, from the loop's epoll: re-armed, its edge-triggered
// registration reports what is already waiting.
void back_to_the_hub(Connection& c) {
    stop_loop_reader(c);
    c.on_loop = false;
    c.reads = 0;
    c.maybe_readable = true;
    watch(c, EPOLL_CTL_MOD);
}

// EPOLLOUT only while something waits to be written: otherwise every connection would wake
// the loop once more when it is registered (a new socket is writable).
void want_writable(Connection& c) {
    if (c.registered) watch(c, EPOLL_CTL_MOD);
}

// out_registered: the hub's epoll watches the connection's EPOLLOUT (bytes waited for it);
// false for held bytes (watch() leaves EPOLLOUT out while a connection's bytes are held).
void after_pending_written(Connection& c, PyObject* transport, bool out_registered) {
    if (out_registered) want_writable(c);
    resume_protocol_if_drained(c, transport);
    if (c.closed) return;
    if (c.closing) {
        finish(c, nullptr);
    } else if (c.eof_pending) {  // nothing is appended after it: this runs once
        shutdown(c.fd, SHUT_WR);
    }
}

// What one send of `pending` did: `result` is the bytes it took, or -errno. True: send the
// rest (if any); false: the connection waits for EPOLLOUT now, or failed, or closed.
bool took(Connection& c, PyObject* transport, ssize_t result, bool out_registered) {
    if (result < 0) {
        if (result == -EINTR) return true;
        if (result != -EAGAIN) {
            fail(c, static_cast<int>(-result));
        } else if (!out_registered) {  // the rest waits for EPOLLOUT now
            want_writable(c);
            pause_protocol_if_full(c, transport);
        }
        return false;
    }
    c.pending.consume(static_cast<size_t>(result));
    resume_protocol_if_drained(c, transport);  // at the low-water mark, as asyncio does
    return !c.closed;
}

void write_pending(Connection& c, PyObject* transport, bool out_registered = true) {
    while (!c.pending.empty()) {
        ssize_t n = send(c.fd, c.pending.data(), c.pending.size(), MSG_NOSIGNAL | MSG_DONTWAIT);
        if (!took(c, transport, n < 0 ? -errno : n, out_registered)) return;
    }
    after_pending_written(c, transport, out_registered);
}

// The peer's FIN: eof_received(), and the connection closes unless the protocol keeps it open.
void the_peer_ended(Connection& c, PyObject* transport) {
    Hub& hub = hub_of(c);
    c.at_eof = true;
    stop_loop_reader(c);  // level-triggered, it would report the end again and again
    PyRef keep_open = PyRef::steal(
        PyObject_CallMethodObjArgs(c.protocol.get(), hub.names.eof_received.get(), nullptr));
    if (!keep_open) report_error(c, transport, "protocol.eof_received() failed");
    if (c.closing) return;
    if (!keep_open || PyObject_IsTrue(keep_open.get()) != 1) {
        PyErr_Clear();
        c.closing = true;
        if (c.pending.empty()) finish(c, nullptr);
    }
}

// data_received(bytes); false: the protocol raised, and the connection is finished.
bool deliver(Connection& c, PyObject* transport, const char* bytes, size_t size) {
    PyRef data = PyRef::steal(PyBytes_FromStringAndSize(bytes, static_cast<Py_ssize_t>(size)));
    PyRef r = data
                  ? PyRef::steal(PyObject_CallMethodObjArgs(
                        c.protocol.get(), hub_of(c).names.data_received.get(), data.get(), nullptr))
                  : PyRef();
    if (r) return true;
    PyRef exc = report_error(c, transport, "protocol.data_received() failed");
    finish(c, exc.get());
    return false;
}

// Reads and hands over what arrived. A short read emptied the socket: bytes arriving later are
// a new edge in the hub's epoll (edge-triggered), or a new report from the loop's
// (level-triggered), so it stops there unless the peer's FIN came with the hub's edge
// (`to_the_end`): nothing more would wake it for that.
void read_ready(Connection& c, PyObject* transport, bool to_the_end) {
    Hub& hub = hub_of(c);
    while (!c.closing && !c.reading_paused) {
        ssize_t n = read(c.fd, hub.read_buffer.data(), hub.read_buffer.size());
        if (n < 0) {
            if (errno == EINTR) continue;
            if (errno == EAGAIN)
                c.maybe_readable = false;
            else
                fail(c, errno);
            return;
        }
        if (n == 0) {
            c.maybe_readable = false;
            the_peer_ended(c, transport);
            return;
        }
        if (!deliver(c, transport, hub.read_buffer.data(), static_cast<size_t>(n))) return;
        if (static_cast<size_t>(n) < hub.read_buffer.size() && !to_the_end) {
            c.maybe_readable = false;
            return;
        }
    }
    c.maybe_readable = !c.closing;  // paused with bytes perhaps waiting: resume reads them
}

// -- Reads through the RecvRing (a kept-alive connection, where the kernel allows) -------------

bool has_stash(const Connection& c) {
    return !c.stash.empty() || c.stash_eof || c.stash_error != 0;
}

// Arms the connection's multishot recv unless it is armed, or nothing more is to be read now.
// If the ring has no room (the kernel out of memory), the hub's epoll reads it again, and
// moves it to the ring again after as many reads.
void read_on_the_ring(Connection& c) {
    if (c.ring_armed || c.reading_paused || c.closing || c.at_eof || has_stash(c)) return;
    Hub& hub = hub_of(c);
    if (!hub.reads->arm(c.fd, event_data(c))) {
        c.on_ring = false;
        back_to_the_hub(c);
        return;
    }
    hub.reads->submit();
    c.ring_armed = true;
}

// What came while reading was paused, in order: the bytes, then the FIN or the error; then
// the ring reads on. Stops where the protocol pauses again or closes.
void deliver_the_stash(Connection& c, PyObject* transport) {
    if (c.reading_paused || c.closing) return;
    if (!c.stash.empty()) {
        std::string bytes;
        bytes.swap(c.stash);
        if (!deliver(c, transport, bytes.data(), bytes.size())) return;
        if (c.reading_paused || c.closing) return;
    }
    if (c.stash_error != 0) {
        const int err = c.stash_error;
        c.stash_error = 0;
        fail(c, err);
        return;
    }
    if (c.stash_eof) {
        c.stash_eof = false;
        the_peer_ended(c, transport);
        return;
    }
    read_on_the_ring(c);
}

// One completion of a connection's multishot recv.
void ring_completion(Hub& hub, const RecvRing::Completion& done) {
    const int fd = static_cast<int>(done.tag & 0xffffffffu);
    const uint32_t generation = static_cast<uint32_t>(done.tag >> 32);
    if (fd < 0 || static_cast<size_t>(fd) >= hub.open.size() || !hub.open[fd]) return;
    PyRef transport = PyRef::borrow(hub.open[fd].get());
    Connection& c = conn_of(transport.get());
    if ((c.generation & kGenerationMask) != generation || c.closed) return;
    if (!done.more) c.ring_armed = false;
    if (done.result == -ECANCELED || done.result == -ENOBUFS) {  // a pause; out of buffers
        read_on_the_ring(c);  // if reading resumed meanwhile, or the buffers are back
        return;
    }
    if (c.closing) return;  // nothing more is handed over after close(), as read_ready()
    const bool keep = c.reading_paused || has_stash(c);
    if (done.result > 0) {
        const size_t size = static_cast<size_t>(done.result);
        if (keep) {
            c.stash.append(done.data, size);
        } else if (!deliver(c, transport.get(), done.data, size)) {
            return;
        }
        if (!done.more) read_on_the_ring(c);
        return;
    }
    if (keep) {
        if (done.result == 0) {
            c.stash_eof = true;
        } else {
            c.stash_error = -done.result;
        }
        return;
    }
    if (done.result == 0) {
        the_peer_ended(c, transport.get());
    } else {
        fail(c, -done.result);
    }
}

// -- IoTransport --------------------------------------------------------------------------------

// After bytes the socket did not take were appended to `pending`: wait for EPOLLOUT if they
// are the first, and pause the protocol if they are over the limit.
void after_appending(Connection& c, PyObject* transport, bool was_empty) {
    if (was_empty) want_writable(c);
    pause_protocol_if_full(c, transport);
}

void keep_unsent(Connection& c, PyObject* transport, const char* data, size_t size) {
    if (size == 0) return;
    const bool was_empty = c.pending.empty();
    c.pending.append(data, size);
    after_appending(c, transport, was_empty);
}

bool accepts_writes(const Connection& c) {
    return !c.closing && !c.eof_pending;
}

// A write to a connection with nothing waiting, up to its high-water mark, is held until
// hub.send_held(), which the first held write of a loop iteration schedules with call_soon(),
// as uvloop's own transports queue theirs: the responses a batch of requests produces then
// leave together, and the client reads them in one wake-up rather than one each (wrk against
// FastAPI, one worker, 16 connections: 1.99 epoll_wait per request against 0.38). A
// sequential request pays one more turn of the loop. False (send at once) if the loop will not
// schedule it: closed, in a worker's last moments. The engine calls send_held() itself before
// it closes the loop.
bool hold(Connection& c, PyObject* transport) {
    Hub& hub = hub_of(c);
    if (c.held) return true;  // sent early (EPOLLOUT), and still on the list
    if (hub.held.empty()) {
        PyRef send_held = PyRef::steal(PyObject_GetAttr(c.hub.get(), hub.names.send_held.get()));
        PyRef r =
            send_held ? call_in_hub_context(hub, hub.call_soon.get(), send_held.get()) : PyRef();
        if (!r) {
            PyErr_Clear();
            return false;
        }
    }
    hub.held.push_back(PyRef::borrow(transport));
    c.held = true;
    return true;
}

// A write that would take what is held over the high-water mark sends the held bytes first,
// and goes at once itself if the socket takes them: a large body is not copied behind a
// held head.
void send_held_if_over(Connection& c, PyObject* transport, size_t size) {
    if (!c.held || c.pending.size() + size <= c.high) return;
    c.held = false;
    write_pending(c, transport, false);
}

PyObject* transport_write(PyObject* self, PyObject* data) {
    Connection& c = conn_of(self);
    PyRef bytes =
        PyBytes_Check(data) ? PyRef::borrow(data) : PyRef::steal(PyBytes_FromObject(data));
    if (!bytes) return nullptr;
    char* p = nullptr;
    Py_ssize_t size = 0;
    if (PyBytes_AsStringAndSize(bytes.get(), &p, &size) < 0) return nullptr;
    if (!accepts_writes(c) || size == 0) Py_RETURN_NONE;
    send_held_if_over(c, self, static_cast<size_t>(size));
    if (c.closed) Py_RETURN_NONE;
    if (c.pending.empty() && static_cast<size_t>(size) <= c.high && hold(c, self)) {
        c.pending.append(p, static_cast<size_t>(size));
        Py_RETURN_NONE;
    }
    size_t sent = 0;
    if (c.pending.empty()) {
        while (sent < static_cast<size_t>(size)) {
            ssize_t n = send(c.fd, p + sent, size - sent, MSG_NOSIGNAL | MSG_DONTWAIT);
            if (n < 0) {
                if (errno == EINTR) continue;
                if (errno == EAGAIN) break;
                PyRef keep = PyRef::borrow(self);
                fail(c, errno);
                Py_RETURN_NONE;
            }
            sent += static_cast<size_t>(n);
        }
    }
    keep_unsent(c, self, p + sent, size - sent);
    Py_RETURN_NONE;
}

// One sendmsg() for a response's head and body (molt's cycle writes them as a pair).
PyObject* transport_writelines(PyObject* self, PyObject* seq) {
    Connection& c = conn_of(self);
    PyRef items = PyRef::steal(PySequence_Fast(seq, "writelines() takes an iterable"));
    if (!items) return nullptr;
    std::vector<PyRef> parts;
    const Py_ssize_t count = PySequence_Size(items.get());
    for (Py_ssize_t i = 0; i < count; ++i) {
        PyRef item = PyRef::steal(PySequence_GetItem(items.get(), i));
        if (!item) return nullptr;
        PyRef bytes = PyBytes_Check(item.get()) ? std::move(item)
                                                : PyRef::steal(PyBytes_FromObject(item.get()));
        if (!bytes) return nullptr;
        parts.push_back(std::move(bytes));
    }
    if (!accepts_writes(c)) Py_RETURN_NONE;
    std::vector<iovec> iov;
    size_t total = 0;
    for (const PyRef& part : parts) {
        char* p = nullptr;
        Py_ssize_t size = 0;
        PyBytes_AsStringAndSize(part.get(), &p, &size);
        if (size > 0) iov.push_back(iovec{p, static_cast<size_t>(size)});
        total += static_cast<size_t>(size);
    }
    send_held_if_over(c, self, total);
    if (c.closed) Py_RETURN_NONE;
    size_t sent = 0;
    if (c.pending.empty() && !iov.empty() && iov.size() <= static_cast<size_t>(kMaxIovecs)) {
        msghdr msg{};
        msg.msg_iov = iov.data();
        msg.msg_iovlen = iov.size();
        ssize_t n;
        do {
            n = sendmsg(c.fd, &msg, MSG_NOSIGNAL | MSG_DONTWAIT);
        } while (n < 0 && errno == EINTR);
        if (n < 0 && errno != EAGAIN) {
            PyRef keep = PyRef::borrow(self);
            fail(c, errno);
            Py_RETURN_NONE;
        }
        sent = n < 0 ? 0 : static_cast<size_t>(n);
    }
    if (sent == total) Py_RETURN_NONE;
    size_t skip = sent;  // what sendmsg took, from the front
    const bool was_empty = c.pending.empty();
    for (const iovec& v : iov) {
        if (skip >= v.iov_len) {
            skip -= v.iov_len;
            continue;
        }
        c.pending.append(static_cast<const char*>(v.iov_base) + skip, v.iov_len - skip);
        skip = 0;
    }
    after_appending(c, self, was_empty);
    Py_RETURN_NONE;
}

PyObject* transport_close(PyObject* self, PyObject*) {
    Connection& c = conn_of(self);
    if (c.closing) Py_RETURN_NONE;
    c.closing = true;
    stop_loop_reader(c);  // nothing more is read: level-triggered, it would report it for ever
    PyRef keep = PyRef::borrow(self);
    if (c.held) {
        // Nothing more will follow what is held: it goes now, and the descriptor with it
        // (write_pending finishes the connection once every byte is out).
        c.held = false;
        write_pending(c, self, false);
    } else if (c.pending.empty()) {
        finish(c, nullptr);
    }
    Py_RETURN_NONE;
}

PyObject* transport_abort(PyObject* self, PyObject*) {
    PyRef keep = PyRef::borrow(self);
    finish(conn_of(self), nullptr);
    Py_RETURN_NONE;
}

PyObject* transport_write_eof(PyObject* self, PyObject*) {
    Connection& c = conn_of(self);
    if (!accepts_writes(c)) Py_RETURN_NONE;
    c.eof_pending = true;
    if (c.pending.empty()) {
        shutdown(c.fd, SHUT_WR);
    }
    Py_RETURN_NONE;
}

PyObject* transport_can_write_eof(PyObject*, PyObject*) {
    Py_RETURN_TRUE;
}

PyObject* transport_is_closing(PyObject* self, PyObject*) {
    return PyBool_FromLong(conn_of(self).closing);
}

PyObject* transport_is_reading(PyObject* self, PyObject*) {
    const Connection& c = conn_of(self);
    return PyBool_FromLong(!c.reading_paused && !c.closing);
}

PyObject* transport_pause_reading(PyObject* self, PyObject*) {
    Connection& c = conn_of(self);
    c.reading_paused = true;
    stop_loop_reader(c);
    if (c.ring_armed && !c.closing) {  // what comes before the cancel is kept for the resume
        hub_of(c).reads->cancel(event_data(c));
    }
    Py_RETURN_NONE;
}

// Bytes that arrived while reading was paused gave their edge already: they are read in the
// next loop iteration (asyncio's transports, too, never call data_received inside
// resume_reading()). On the loop's epoll, its reader is simply on again.
PyObject* transport_resume_reading(PyObject* self, PyObject*) {
    Connection& c = conn_of(self);
    if (!c.reading_paused) Py_RETURN_NONE;
    c.reading_paused = false;
    if (c.on_ring) {
        if (has_stash(c)) {  // delivered first, in the next loop iteration; then read on
            Hub& hub = hub_of(c);
            PyRef read_now = PyRef::steal(PyObject_GetAttr(self, hub.names.read_now.get()));
            if (!read_now) return nullptr;
            PyRef r = call_in_hub_context(hub, hub.call_soon.get(), read_now.get());
            if (!r) return nullptr;
        } else {
            read_on_the_ring(c);
        }
        Py_RETURN_NONE;
    }
    if (c.on_loop) {
        if (!c.closing && !c.at_eof && !c.loop_reading && !start_loop_reader(c, self)) {
            report_error(c, self, "loop.add_reader() failed: the hub reads the connection again");
            back_to_the_hub(c);
        }
        Py_RETURN_NONE;
    }
    if (c.maybe_readable && !c.closing) {
        Hub& hub = hub_of(c);
        PyRef read_now = PyRef::steal(PyObject_GetAttr(self, hub.names.read_now.get()));
        if (!read_now) return nullptr;
        PyRef r = call_in_hub_context(hub, hub.call_soon.get(), read_now.get());
        if (!r) return nullptr;
    }
    Py_RETURN_NONE;
}

PyObject* transport_read_now(PyObject* self, PyObject*) {
    Connection& c = conn_of(self);
    if (c.on_ring) {
        PyRef keep = PyRef::borrow(self);
        deliver_the_stash(c, self);
        Py_RETURN_NONE;
    }
    if (c.maybe_readable && !c.closing) {
        PyRef keep = PyRef::borrow(self);
        read_ready(c, self, true);
    }
    Py_RETURN_NONE;
}

// The loop's reader, for a connection its epoll watches.
PyObject* transport_readable(PyObject* self, PyObject*) {
    Connection& c = conn_of(self);
    if (!c.closing && !c.reading_paused) {
        PyRef keep = PyRef::borrow(self);
        read_ready(c, self, false);
    }
    Py_RETURN_NONE;
}

// finish()'s deferred call: the protocol hears connection_lost() once, and the transport lets
// go of it (a protocol and its transport hold each other; neither type is collected).
PyObject* transport_connection_lost(PyObject* self, PyObject* exc) {
    Connection& c = conn_of(self);
    PyRef protocol = std::move(c.protocol);
    c.lost = true;
    if (!protocol) Py_RETURN_NONE;
    PyRef r = PyRef::steal(PyObject_CallMethodObjArgs(
        protocol.get(), hub_of(c).names.connection_lost.get(), exc, nullptr));
    if (!r) {
        c.protocol = std::move(protocol);  // for the report
        report_error(c, self, "protocol.connection_lost() failed");
        c.protocol = PyRef();
    }
    Py_RETURN_NONE;
}

// What uvicorn asks a transport's `socket` for (its get_remote_addr and get_local_addr): the
// addresses the accept gave. uvicorn reads a 4-item IPv6 `peername` as no address at all.
PyObject* transport_getpeername(PyObject* self, PyObject*) {
    const PyRef& name = conn_of(self).peername;
    return PyRef::borrow(name ? name.get() : Py_None).release();
}

PyObject* transport_getsockname(PyObject* self, PyObject*) {
    const PyRef& name = conn_of(self).sockname;
    return PyRef::borrow(name ? name.get() : Py_None).release();
}

PyObject* transport_get_extra_info(PyObject* self, PyObject* args) {
    const Connection& c = conn_of(self);
    const char* name = nullptr;
    PyObject* default_value = Py_None;
    if (!PyArg_ParseTuple(args, "s|O", &name, &default_value)) return nullptr;
    PyObject* value = default_value;
    if (std::strcmp(name, "peername") == 0 && c.peername) value = c.peername.get();
    if (std::strcmp(name, "sockname") == 0 && c.sockname) value = c.sockname.get();
    if (std::strcmp(name, "socket") == 0) value = self;  // getpeername(), getsockname()
    return PyRef::borrow(value).release();
}

PyObject* transport_set_protocol(PyObject* self, PyObject* protocol) {
    Connection& c = conn_of(self);
    if (!c.lost) c.protocol = PyRef::borrow(protocol);  // the one connection_lost() goes to
    Py_RETURN_NONE;
}

PyObject* transport_get_protocol(PyObject* self, PyObject*) {
    const Connection& c = conn_of(self);
    return PyRef::borrow(c.protocol ? c.protocol.get() : Py_None).release();
}

PyObject* transport_get_write_buffer_size(PyObject* self, PyObject*) {
    return PyLong_FromSize_t(conn_of(self).pending.size());
}

PyObject* transport_get_write_buffer_limits(PyObject* self, PyObject*) {
    const Connection& c = conn_of(self);
    return Py_BuildValue("(nn)", static_cast<Py_ssize_t>(c.low), static_cast<Py_ssize_t>(c.high));
}

// asyncio's rule: high defaults to 4 x low, or 64 KiB; low to a quarter of high.
PyObject* transport_set_write_buffer_limits(PyObject* self, PyObject* args, PyObject* kwargs) {
    static const char* kNames[] = {"high", "low", nullptr};
    PyObject* high_arg = Py_None;
    PyObject* low_arg = Py_None;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "|OO", const_cast<char**>(kNames), &high_arg,
                                     &low_arg)) {
        return nullptr;
    }
    size_t low = low_arg == Py_None ? 0 : PyLong_AsSize_t(low_arg);
    size_t high = high_arg == Py_None ? 0 : PyLong_AsSize_t(high_arg);
    if (PyErr_Occurred()) return nullptr;
    if (high_arg == Py_None) high = low_arg == Py_None ? kDefaultHighWater : 4 * low;
    if (low_arg == Py_None) low = high / 4;
    if (low > high) {
        PyErr_Format(PyExc_ValueError, "high (%zu) must be >= low (%zu)", high, low);
        return nullptr;
    }
    Connection& c = conn_of(self);
    c.high = high;
    c.low = low;
    pause_protocol_if_full(c, self);
    Py_RETURN_NONE;
}

PyObject* made_by_the_hub(PyTypeObject*, PyObject*, PyObject*) {
    PyErr_SetString(PyExc_TypeError, "IoHub and IoTransport are made by _molt_native.io_hub()");
    return nullptr;
}

void transport_dealloc(PyObject* self) {
    delete reinterpret_cast<IoTransportObject*>(self)->conn;
    free_heap_object(self);
}

PyCFunction with_keywords(PyObject* (*f)(PyObject*, PyObject*, PyObject*)) {
    return reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)(void)>(f));
}

PyMethodDef transport_methods[] = {
    {"write", transport_write, METH_O, nullptr},
    {"writelines", transport_writelines, METH_O, nullptr},
    {"close", transport_close, METH_NOARGS, nullptr},
    {"abort", transport_abort, METH_NOARGS, nullptr},
    {"write_eof", transport_write_eof, METH_NOARGS, nullptr},
    {"can_write_eof", transport_can_write_eof, METH_NOARGS, nullptr},
    {"is_closing", transport_is_closing, METH_NOARGS, nullptr},
    {"is_reading", transport_is_reading, METH_NOARGS, nullptr},
    {"pause_reading", transport_pause_reading, METH_NOARGS, nullptr},
    {"resume_reading", transport_resume_reading, METH_NOARGS, nullptr},
    {"_read_now", transport_read_now, METH_NOARGS, "resume_reading()'s deferred read"},
    {"_readable", transport_readable, METH_NOARGS, "the loop's reader, once it watches"},
    {"_connection_lost", transport_connection_lost, METH_O, "close's deferred notice"},
    {"getpeername", transport_getpeername, METH_NOARGS, "get_extra_info('socket') answers"},
    {"getsockname", transport_getsockname, METH_NOARGS, "get_extra_info('socket') answers"},
    {"get_extra_info", transport_get_extra_info, METH_VARARGS, nullptr},
    {"set_protocol", transport_set_protocol, METH_O, nullptr},
    {"get_protocol", transport_get_protocol, METH_NOARGS, nullptr},
    {"get_write_buffer_size", transport_get_write_buffer_size, METH_NOARGS, nullptr},
    {"get_write_buffer_limits", transport_get_write_buffer_limits, METH_NOARGS, nullptr},
    {"set_write_buffer_limits", with_keywords(transport_set_write_buffer_limits),
     METH_VARARGS | METH_KEYWORDS, nullptr},
    {nullptr, nullptr, 0, nullptr}};

PyType_Slot transport_slots[] = {
    {Py_tp_methods, transport_methods},
    {Py_tp_new, reinterpret_cast<void*>(made_by_the_hub)},
    {Py_tp_dealloc, reinterpret_cast<void*>(transport_dealloc)},
    {Py_tp_doc, const_cast<char*>("An accepted TCP connection as an asyncio transport; made "
                                  "by IoHub.")},
    {0, nullptr}};

// -- IoHub --------------------------------------------------------------------------------------

void make_room(Hub& hub, int fd) {
    const size_t need = static_cast<size_t>(fd) + 1;
    if (need > hub.open.size()) {
        hub.open.resize(need + 64);
        hub.generations.resize(need + 64, 0);
    }
}

void update_in_queue(Hub& hub);

void pause_listener(Hub& hub, size_t index, int err) {
    Listener& l = hub.listeners[index];
    epoll_ctl(hub.epfd, EPOLL_CTL_DEL, l.fd, nullptr);
    l.paused = true;
    update_in_queue(hub);
    const int fd = l.fd;
    PyRef exc = PyRef::steal(PyObject_CallFunction(PyExc_OSError, "is", err, strerror(err)));
    PyRef r =
        exc ? PyRef::steal(PyObject_CallFunction(hub.accept_failed.get(), "iO", fd, exc.get()))
            : PyRef();
    if (!r) PyErr_WriteUnraisable(hub.accept_failed.get());
}

// A new connection's transport, in the hub's table; nullptr with a Python error set.
PyObject* adopt(PyObject* hub_object, int fd, const sockaddr_storage& peer, const Listener& l) {
    Hub& hub = hub_of(hub_object);
    auto* obj = alloc_object<IoTransportObject>(hub.transport_type.get());
    if (obj == nullptr) return nullptr;
    auto* c = new Connection();
    obj->conn = c;
    c->fd = fd;
    c->generation = ++hub.generations[fd];
    c->hub = PyRef::borrow(hub_object);
    c->peername = PyRef::steal(address(peer));
    if (l.sockname) {
        c->sockname = PyRef::borrow(l.sockname.get());
    } else {
        sockaddr_storage local{};
        socklen_t size = sizeof local;
        getsockname(fd, reinterpret_cast<sockaddr*>(&local), &size);
        c->sockname = PyRef::steal(address(local));
    }
    PyObject* transport = reinterpret_cast<PyObject*>(obj);
    hub.open[fd] = PyRef::steal(transport);
    hub.board->set_connections(++hub.connections);
    return transport;
}

// Level-triggered. Not EPOLLEXCLUSIVE: the kernel counts an exclusive wake-up only when a
// thread waits in this epoll itself, and the loop waits in its own (this one is nested in
// it), so every worker is woken per arrival, as under uvloop's server; all but one find the
// queue empty.
bool watch_listener(Hub& hub, size_t index) {
    epoll_event ev{};
    ev.events = EPOLLIN;
    ev.data.u64 = kListenerTag | index;
    return epoll_ctl(hub.epfd, EPOLL_CTL_ADD, hub.listeners[index].fd, &ev) == 0;
}

// What the siblings read on the board. A worker whose every listener is paused (accept()
// failed) or gone is not one of them until it accepts again: counted, it could be one they
// step aside for, and it cannot take a connection.
void update_in_queue(Hub& hub) {
    bool in_queue = false;
    bool sibling = false;
    for (const Listener& l : hub.listeners) {
        in_queue = in_queue || accepting(l);
        sibling = sibling || (l.fd >= 0 && !l.paused);
    }
    if (sibling) {
        hub.board->publish();
    } else {
        hub.board->leave();
    }
    hub.board->set_in_queue(in_queue);
}

// Back in the accept queue. A listener the epoll will not take is paused as an accept()
// that ran out of memory is: accept_failed() takes it back later.
void come_back(Hub& hub, size_t index) {
    Listener& l = hub.listeners[index];
    l.balance.rejoined();
    if (!l.paused && !watch_listener(hub, index)) pause_listener(hub, index, errno);
}

// While a listener stands aside, hub._look_again() runs every kAsideRecheckMs (a reserve's,
// every kReserveRecheckMs: accept_balance.hpp). If the loop
// will not schedule it (closed, in a worker's last moments), every listener comes back now:
// a worker must not stand aside with nobody to call it back.
void look_again_later(PyObject* hub_object) {
    Hub& hub = hub_of(hub_object);
    if (hub.looking_again) return;
    PyRef method = PyRef::steal(PyObject_GetAttr(hub_object, hub.names.look_again.get()));
    const int ms = hub.board->reserve() ? kReserveRecheckMs : kAsideRecheckMs;
    PyRef delay = PyRef::steal(PyFloat_FromDouble(ms / 1000.0));
    PyRef r = method && delay
                  ? call_in_hub_context(hub, hub.call_later.get(), delay.get(), method.get())
                  : PyRef();
    if (!r && method && delay) {  // the context refused (entered already), as in finish()
        PyErr_Clear();
        r = PyRef::steal(
            PyObject_CallFunctionObjArgs(hub.call_later.get(), delay.get(), method.get(), nullptr));
    }
    if (r) {
        hub.looking_again = true;
        return;
    }
    PyErr_WriteUnraisable(hub_object);
    for (size_t i = 0; i < hub.listeners.size(); ++i) {
        if (hub.listeners[i].fd >= 0 && hub.listeners[i].balance.aside) come_back(hub, i);
    }
    update_in_queue(hub);
}

// After an accept: out of the accept queue while this worker holds more than its share of the
// generation's connections (accept_balance.hpp). True: it stepped aside.
bool step_aside_if_over_share(PyObject* hub_object, size_t index) {
    Hub& hub = hub_of(hub_object);
    Listener& l = hub.listeners[index];
    if (!hub.board->active() || !accepting(l)) return false;
    if (!l.balance.step_aside(*hub.board, [&] { return connection_queued(l.fd); })) return false;
    epoll_ctl(hub.epfd, EPOLL_CTL_DEL, l.fd, nullptr);
    update_in_queue(hub);
    look_again_later(hub_object);
    return true;
}

bool standing_aside(const Hub& hub) {
    for (const Listener& l : hub.listeners) {
        if (l.fd >= 0 && l.balance.aside) return true;
    }
    return false;
}

// The listeners standing aside come back when this worker no longer holds more than its
// share, or (`timed`: the look every kAsideRecheckMs) when connections wait in their queue
// that nobody takes. Looked at sooner too, untimed: when one of this worker's connections
// ends, and at the next poll after a sibling called it back (the native engine's watcher
// thread waits for that call on a futex; the loop has no thread to spare, and a worker aside
// is woken by its own connections soon enough while a burst of them arrives).
void look_again(PyObject* hub_object, bool timed) {
    Hub& hub = hub_of(hub_object);
    const bool still = hub.board->should_step_aside();
    bool aside = false;
    for (size_t i = 0; i < hub.listeners.size(); ++i) {
        Listener& l = hub.listeners[i];
        if (l.fd < 0 || !l.balance.aside) continue;
        const auto queued = [&] { return connection_queued(l.fd); };
        const int stranded_after =
            hub.board->reserve() ? kReserveStrandedChecks : kAsideStrandedChecks;
        const bool back = timed ? l.balance.come_back(still, queued(), stranded_after) : !still;
        if (back && !l.balance.step_aside(*hub.board, queued)) {
            come_back(hub, i);  // may run accept_failed(), which may listen(): `l` may move
        }
        aside = aside || hub.listeners[i].balance.aside;
    }
    update_in_queue(hub);
    if (aside) look_again_later(hub_object);
}

// hub.send_held(): what the connections' writes held since the loop's last turn, sent, in
// one system call (send_batch.hpp). The batch runs before any result is looked at: a protocol
// called back for one connection's result (resume_writing, a failure) may write to, or close,
// another, whose queued bytes the kernel has taken by then.
PyObject* hub_send_held(PyObject* self, PyObject*) {
    Hub& hub = hub_of(self);
    std::vector<PyRef> held;
    held.swap(hub.held);  // a write from a protocol called back below holds anew
    std::vector<PyRef> sending;
    for (PyRef& transport : held) {
        Connection& c = conn_of(transport.get());
        if (!c.held) continue;
        c.held = false;
        if (c.closed || c.pending.empty()) continue;
        hub.sends->add(c.fd, c.pending.data(), c.pending.size());
        sending.push_back(std::move(transport));
    }
    if (sending.empty()) Py_RETURN_NONE;
    const std::vector<ssize_t> results = hub.sends->run();
    for (size_t i = 0; i < sending.size(); ++i) {
        PyObject* transport = sending[i].get();
        Connection& c = conn_of(transport);
        if (c.closed) continue;  // aborted by a protocol called back for an earlier one
        if (took(c, transport, results[i], false)) write_pending(c, transport, false);
    }
    Py_RETURN_NONE;
}

// hub._look_again(), scheduled by look_again_later().
PyObject* hub_look_again(PyObject* self, PyObject*) {
    hub_of(self).looking_again = false;
    if (standing_aside(hub_of(self))) look_again(self, true);
    Py_RETURN_NONE;
}

// A connection just accepted from listener `index`: its transport, its protocol, its first read
// when the listener defers accepts, and its place in the hub's epoll.
void take_connection(PyObject* hub_object, size_t index, int fd, const sockaddr_storage& peer) {
    Hub& hub = hub_of(hub_object);
    make_room(hub, fd);
    // The factory may run anything; the listener is read again after it.
    PyRef factory = PyRef::borrow(hub.listeners[index].factory.get());
    const bool read_at_once = hub.listeners[index].read_at_once;
    PyRef transport = PyRef::borrow(adopt(hub_object, fd, peer, hub.listeners[index]));
    if (!transport) {
        close(fd);
        PyErr_WriteUnraisable(hub_object);
        return;
    }
    Connection& c = conn_of(transport.get());
    c.protocol = PyRef::steal(PyObject_CallObject(factory.get(), nullptr));
    if (!c.protocol) {
        report_error(c, transport.get(), "the protocol factory failed");
        finish(c, nullptr);
        return;
    }
    PyRef r = PyRef::steal(PyObject_CallMethodObjArgs(
        c.protocol.get(), hub.names.connection_made.get(), transport.get(), nullptr));
    if (!r) {
        report_error(c, transport.get(), "protocol.connection_made() failed");
        finish(c, nullptr);
        return;
    }
    if (read_at_once && !c.reading_paused) read_ready(c, transport.get(), false);
    if (c.closed) return;     // served and closed in this wake-up: never registered
    watch(c, EPOLL_CTL_ADD);  // a socket already readable is reported at once
    c.registered = true;
}

void accept_connections(PyObject* hub_object, size_t index) {
    Hub& hub = hub_of(hub_object);
    for (int i = 0; i < kAcceptsPerWakeup; ++i) {
        if (!accepting(hub.listeners[index])) return;  // unlisten() from Python, or aside
        sockaddr_storage peer{};
        socklen_t size = sizeof peer;
        const int fd = accept4(hub.listeners[index].fd, reinterpret_cast<sockaddr*>(&peer), &size,
                               SOCK_NONBLOCK | SOCK_CLOEXEC);
        if (fd < 0) {
            switch (errno) {
                case EAGAIN:
                    return;
                case EINTR:
                case ECONNABORTED:  // that client is gone; accept(2)'s retryable errors
                case EPROTO:
                case EPERM:
                case ENETDOWN:
                case ENOPROTOOPT:
                case EHOSTDOWN:
                case ENONET:
                case EHOSTUNREACH:
                case EOPNOTSUPP:
                case ENETUNREACH:
                    continue;
                default:  // out of descriptors or memory: the listener stays readable
                    pause_listener(hub, index, errno);
                    return;
            }
        }
        take_connection(hub_object, index, fd, peer);
        if (step_aside_if_over_share(hub_object, index)) return;
    }
}

// A kept-alive connection's reads move to the loop's own epoll. If the loop will not take it,
// the hub keeps it (reported as a protocol's failure is), and tries again as many reads later.
void move_to_the_loop(Connection& c, PyObject* transport) {
    if (hub_of(c).reads) {  // read by the ring: no read() at all from now on
        c.on_ring = true;
        read_on_the_ring(c);
        watch(c, EPOLL_CTL_MOD);  // the hub's epoll: only EPOLLOUT, while bytes wait
        return;
    }
    if (!start_loop_reader(c, transport)) {
        report_error(c, transport, "loop.add_reader() failed: the hub keeps the connection");
        c.reads = 0;
        return;
    }
    c.on_loop = true;
    watch(c, EPOLL_CTL_MOD);  // the hub's epoll: only EPOLLOUT, while bytes wait
}

void serve_event(Hub& hub, const epoll_event& event) {
    const int fd = static_cast<int>(event.data.u64 & 0xffffffffu);
    const uint32_t generation = static_cast<uint32_t>(event.data.u64 >> 32);
    if (static_cast<size_t>(fd) >= hub.open.size() || !hub.open[fd]) return;
    PyRef transport = PyRef::borrow(hub.open[fd].get());
    Connection& c = conn_of(transport.get());
    if ((c.generation & kGenerationMask) != generation) return;  // closed since, fd reused
    const uint32_t e = event.events;
    if ((e & (EPOLLOUT | EPOLLERR | EPOLLHUP)) && !c.pending.empty()) {
        write_pending(c, transport.get());
    }
    if (c.closing || c.at_eof) return;
    if (c.on_ring) return;  // its bytes, its FIN and its errors come by the ring
    if (c.on_loop) {
        // Read from the loop's reader; the hub waits for its EPOLLOUT, and gets EPOLLHUP and
        // EPOLLERR, which epoll always reports. uvloop's reader stops, silently, at an error on
        // its descriptor (libuv reports it as EBADF), after one read that takes the bytes
        // queued before a reset and never its error: such a connection is read to the end
        // here, or, while reading is paused, by the hub again from the resume on.
        if (!(e & (EPOLLHUP | EPOLLERR))) return;
        if (c.reading_paused) {
            back_to_the_hub(c);
        } else {
            read_ready(c, transport.get(), true);
        }
        return;
    }
    if (!(e & (EPOLLIN | EPOLLRDHUP | EPOLLHUP | EPOLLERR))) return;
    c.maybe_readable = true;
    if (c.reading_paused) return;
    read_ready(c, transport.get(), (e & (EPOLLRDHUP | EPOLLHUP | EPOLLERR)) != 0);
    if (!c.closing && !c.reading_paused && !c.at_eof && ++c.reads >= kReadsBeforeTheLoopWatches) {
        move_to_the_loop(c, transport.get());
    }
}

PyObject* hub_poll(PyObject* self, PyObject*) {
    Hub& hub = hub_of(self);
    if (hub.looking_again && hub.board->take_call()) look_again(self, false);
    epoll_event events[kEventsPerPoll];
    int n;
    do {
        n = epoll_wait(hub.epfd, events, kEventsPerPoll, 0);
    } while (n < 0 && errno == EINTR);
    for (int i = 0; i < n; ++i) {
        if (events[i].data.u64 & kListenerTag) {
            const size_t index = static_cast<size_t>(events[i].data.u64 & 0xffffffffu);
            if (index < hub.listeners.size() && accepting(hub.listeners[index])) {
                accept_connections(self, index);
            }
        } else {
            serve_event(hub, events[i]);
        }
    }
    Py_RETURN_NONE;
}

PyObject* hub_fileno(PyObject* self, PyObject*) {
    return PyLong_FromLong(hub_of(self).epfd);
}

int listener_index(const Hub& hub, int fd) {
    for (size_t i = 0; i < hub.listeners.size(); ++i) {
        if (hub.listeners[i].fd == fd) return static_cast<int>(i);
    }
    return -1;
}

// listen(fd, protocol_factory, sockname_or_None, read_at_once)
PyObject* hub_listen(PyObject* self, PyObject* args) {
    Hub& hub = hub_of(self);
    int fd = -1;
    PyObject* factory = nullptr;
    PyObject* sockname = nullptr;
    int read_at_once = 0;
    if (!PyArg_ParseTuple(args, "iOOp", &fd, &factory, &sockname, &read_at_once)) return nullptr;
    if (listener_index(hub, fd) >= 0) {
        PyErr_Format(PyExc_ValueError, "descriptor %d is already listened on", fd);
        return nullptr;
    }
    Listener l;
    l.fd = fd;
    l.factory = PyRef::borrow(factory);
    if (sockname != Py_None) l.sockname = PyRef::borrow(sockname);
    l.read_at_once = read_at_once != 0;
    hub.listeners.push_back(std::move(l));
    if (!watch_listener(hub, hub.listeners.size() - 1)) {
        hub.listeners.back().fd = -1;
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    // A sibling counts this worker from now on (update_in_queue publishes it): it accepts at
    // the loop's next poll of the hub.
    update_in_queue(hub);
    Py_RETURN_NONE;
}

// Stops accepting on `fd` (a draining worker): what is queued stays for the others.
PyObject* hub_unlisten(PyObject* self, PyObject* arg) {
    Hub& hub = hub_of(self);
    const long fd = PyLong_AsLong(arg);
    if (fd == -1 && PyErr_Occurred()) return nullptr;
    const int index = listener_index(hub, static_cast<int>(fd));
    if (index < 0) Py_RETURN_NONE;
    Listener& l = hub.listeners[index];
    if (accepting(l)) epoll_ctl(hub.epfd, EPOLL_CTL_DEL, l.fd, nullptr);
    l.fd = -1;
    l.factory = PyRef();
    l.sockname = PyRef();
    l.balance = AsideListener();
    update_in_queue(hub);  // the last one gone (the drain): no longer a sibling
    Py_RETURN_NONE;
}

// Takes a listener paused by an accept() failure back (the caller waits a moment first).
PyObject* hub_resume_listener(PyObject* self, PyObject* arg) {
    Hub& hub = hub_of(self);
    const long fd = PyLong_AsLong(arg);
    if (fd == -1 && PyErr_Occurred()) return nullptr;
    const int index = listener_index(hub, static_cast<int>(fd));
    if (index < 0 || !hub.listeners[index].paused) Py_RETURN_NONE;
    // Paused, it was not standing aside (only an accepting listener steps aside). If the
    // epoll will not take it back, it stays paused and accept_failed() hears it again.
    if (!watch_listener(hub, index)) {
        pause_listener(hub, static_cast<size_t>(index), errno);
        Py_RETURN_NONE;
    }
    hub.listeners[index].paused = false;
    update_in_queue(hub);
    Py_RETURN_NONE;
}

// hub.reap(): what the RecvRing read, handed to the protocols; the loop calls it when
// reads_fileno() is readable.
PyObject* hub_reap(PyObject* self, PyObject*) {
    Hub& hub = hub_of(self);
    if (hub.reads) {
        hub.reads->reap([&hub](const RecvRing::Completion& done) { ring_completion(hub, done); });
    }
    Py_RETURN_NONE;
}

PyObject* hub_reads_fileno(PyObject* self, PyObject*) {
    Hub& hub = hub_of(self);
    return PyLong_FromLong(hub.reads ? hub.reads->fd() : -1);
}

// How a kept-alive connection is read: "io_uring" (the RecvRing) or "loop" (its epoll).
PyObject* hub_reads(PyObject* self, PyObject*) {
    return PyUnicode_FromString(hub_of(self).reads ? "io_uring" : "loop");
}

// How send_held() sends: "io_uring" (one system call for the batch) or "send" (one each).
PyObject* hub_sends(PyObject* self, PyObject*) {
    return PyUnicode_FromString(hub_of(self).sends->uses_ring() ? "io_uring" : "send");
}

PyObject* hub_connections(PyObject* self, PyObject*) {
    return PyLong_FromSize_t(hub_of(self).connections);
}

PyObject* hub_alive(PyObject* self, PyObject*) {
    hub_of(self).board->stamp();
    Py_RETURN_NONE;
}

// Which listeners stand aside (accept_balance.hpp), by descriptor.
PyObject* hub_standing_aside(PyObject* self, PyObject*) {
    PyRef out = PyRef::steal(PyList_New(0));
    for (const Listener& l : hub_of(self).listeners) {
        if (!out || l.fd < 0 || !l.balance.aside) continue;
        PyRef fd = PyRef::steal(PyLong_FromLong(l.fd));
        if (!fd || PyList_Append(out.get(), fd.get()) != 0) return nullptr;
    }
    return out.release();
}

void hub_dealloc(PyObject* self) {
    delete reinterpret_cast<IoHubObject*>(self)->hub;
    free_heap_object(self);
}

PyMethodDef hub_methods[] = {
    {"poll", hub_poll, METH_NOARGS,
     "Serves what is ready: accepts, reads, writes. The loop calls it when fileno() is "
     "readable."},
    {"fileno", hub_fileno, METH_NOARGS, "The epoll descriptor the loop watches."},
    {"listen", hub_listen, METH_VARARGS,
     "listen(fd, protocol_factory, sockname_or_None, read_at_once): accept on a TCP "
     "listener."},
    {"unlisten", hub_unlisten, METH_O, "unlisten(fd): stop accepting on it."},
    {"resume_listener", hub_resume_listener, METH_O,
     "resume_listener(fd): accept again after accept_failed paused it."},
    {"connections", hub_connections, METH_NOARGS, "How many accepted connections are open."},
    {"reap", hub_reap, METH_NOARGS,
     "Hands what the ring read to the protocols; the loop calls it when reads_fileno() is "
     "readable."},
    {"reads_fileno", hub_reads_fileno, METH_NOARGS,
     "The RecvRing's descriptor, for the loop to watch; -1 without one."},
    {"reads", hub_reads, METH_NOARGS,
     "How a kept-alive connection is read: 'io_uring' (the ring) or 'loop' (its epoll)."},
    {"sends", hub_sends, METH_NOARGS,
     "How send_held() sends: 'io_uring' (one system call for the batch) or 'send' (one "
     "each)."},
    {"alive", hub_alive, METH_NOARGS,
     "Stamps this worker alive on the accept board; the engine's tick calls it (every 0.1 s): "
     "a sibling not stamped for 0.5 s is not counted."},
    {"standing_aside", hub_standing_aside, METH_NOARGS,
     "The listeners out of the accept queue while this worker holds more than its share."},
    {"send_held", hub_send_held, METH_NOARGS,
     "Sends what every connection's writes held; scheduled by the first held write of a loop "
     "iteration, and called by the engine before it closes the loop."},
    {"_look_again", hub_look_again, METH_NOARGS,
     "Scheduled every 10 ms while a listener stands aside (a reserve's every 100 ms): whether "
     "it comes back."},
    {nullptr, nullptr, 0, nullptr}};

PyType_Slot hub_slots[] = {
    {Py_tp_methods, hub_methods},
    {Py_tp_new, reinterpret_cast<void*>(made_by_the_hub)},
    {Py_tp_dealloc, reinterpret_cast<void*>(hub_dealloc)},
    {Py_tp_doc, const_cast<char*>("The ASGI engine's TCP accept, read and write; made by "
                                  "io_hub().")},
    {0, nullptr}};

}  // namespace

PyType_Spec io_hub_spec = {"_molt_native.IoHub", sizeof(IoHubObject), 0, Py_TPFLAGS_DEFAULT,
                           hub_slots};
PyType_Spec io_transport_spec = {"_molt_native.IoTransport", sizeof(IoTransportObject), 0,
                                 Py_TPFLAGS_DEFAULT, transport_slots};

PyObject* new_io_hub(PyObject* hub_type, PyObject* transport_type, PyObject* args) {
    PyObject* loop = nullptr;
    PyObject* report = nullptr;
    PyObject* accept_failed = nullptr;
    int board_fd = -1;
    unsigned int generation = 0;
    int use_ring = 1;
    int accepting = 0;  // the board's hot workers (accept_balance.hpp): 0 all, -1 one per CPU
    if (!PyArg_ParseTuple(args, "OOO|iIpi", &loop, &report, &accept_failed, &board_fd, &generation,
                          &use_ring, &accepting)) {
        return nullptr;
    }
    auto* obj = alloc_object<IoHubObject>(hub_type);
    if (obj == nullptr) return nullptr;
    PyRef owner = PyRef::steal(reinterpret_cast<PyObject*>(obj));
    obj->hub = new Hub();
    Hub& hub = *obj->hub;
    hub.transport_type = PyRef::borrow(transport_type);
    hub.call_soon = PyRef::steal(PyObject_GetAttrString(loop, "call_soon"));
    hub.call_later = PyRef::steal(PyObject_GetAttrString(loop, "call_later"));
    hub.add_reader = PyRef::steal(PyObject_GetAttrString(loop, "add_reader"));
    hub.remove_reader = PyRef::steal(PyObject_GetAttrString(loop, "remove_reader"));
    if (!hub.call_soon || !hub.call_later || !hub.add_reader || !hub.remove_reader) return nullptr;
    PyRef contextvars = PyRef::steal(PyImport_ImportModule("contextvars"));
    hub.context =
        contextvars ? PyRef::steal(PyObject_CallMethod(contextvars.get(), "copy_context", nullptr))
                    : PyRef();
    if (!hub.context) return nullptr;
    hub.report = PyRef::borrow(report);
    hub.accept_failed = PyRef::borrow(accept_failed);
    if (!hub.names.init()) return nullptr;
    hub.epfd = epoll_create1(EPOLL_CLOEXEC);
    if (hub.epfd < 0) return PyErr_SetFromErrno(PyExc_OSError);
    // One "thread": the loop is never counted busy, a loop that stops is by its stale stamp.
    hub.board = std::make_unique<AcceptBoard>(board_fd, generation, 1, accepting);
    hub.sends = std::make_unique<SendBatch>(use_ring != 0);
    if (use_ring != 0) hub.reads = RecvRing::open();
    return owner.release();
}

}  // namespace molt::native
