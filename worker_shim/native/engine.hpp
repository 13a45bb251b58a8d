// The native WSGI engine: serving threads, connections, drain and the sweep.
//
// Threading model (the same leader/followers shape as the Python engine, without the GIL on
// the I/O path): `threads` native threads share one epoll. The thread that takes an event does
// the whole job, accept or read, parse, run the app and write, with no hand-off between threads,
// and then waits for the next event itself; another thread takes over the epoll only when a
// request takes longer than kPromoteAfter (poll_token.hpp).
// It holds the GIL only inside handle() (environ, the app call, start_response), and releases
// it again around every send. Connections are edge-triggered, registered once, and served only
// by the thread that took them out of `parked_` (one owner); listeners
// are EPOLLEXCLUSIVE and a worker leaves a listener's wait queue while it accepts, so new
// connections go round-robin over the workers with a thread free. Python's main thread runs
// the lifecycle and calls tick() (the sweep), counters(), stop_accepting() and drained().
//
// Locks: `mu_` guards the connection tables and the listeners; `stats_mu_` the in-flight
// table; `log_mu_` the log queue. No thread ever waits for the GIL while it holds one of them.
#pragma once

#include <sys/socket.h>
#include <sys/uio.h>

#include <atomic>
#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <unordered_map>
#include <utility>
#include <vector>

#include "accept_balance.hpp"
#include "http_seam.hpp"
#include "poll_token.hpp"
#include "py_handle.hpp"
#include "static_files.hpp"
#include "transport.hpp"

namespace molt::native {

struct EngineConfig {
    HttpLimits limits;
    double header_timeout = 10;
    // http.send_timeout: the longest a response waits for its client to take more bytes.
    double send_timeout = 30;
    double keepalive = 5;
    double drain_idle = 1;       // idle window for keep-alive connections while draining
    std::string version_header;  // a full header line ("X-Version: v1\r\n") or ""
    std::string script_name;
    int threads = 1;
    std::vector<StaticMount> statics;  // longest prefix first
    MimeTypes mime_types;
    // The trusted-proxy rule (molt_shim.forwarded.ProxyRule.adjust_environ), called only for a
    // request that carries one of `forwarding_headers` (lower case); null without `proxy:`.
    PyRef proxy_rule;
    std::vector<std::string> forwarding_headers;
    bool request_metrics = false;          // the duration histogram, status classes and exceptions
    bool access_request_headers = false;   // the access log format names a request header
    bool access_response_headers = false;  // ... a response header
    // PROXY listeners: molt_shim.engines.native's reader of a complete header (the Python
    // parser, one copy of the rule); null when no listener has `proxy_protocol`.
    PyRef proxy_header;
    // The generation's accept board (accept_balance.hpp): the shared memory's fd, or -1.
    int accept_board_fd = -1;
    std::uint32_t generation = 0;
    int accepting_workers = 0;  // the board's hot workers: 0 all, N, or -1 one per CPU
};

// One access-log line of a request answered without Python (a static file): queued by the
// serving thread, handed to the shim's AccessLog by the main thread at its next tick.
struct AccessEntry {
    std::string remote;
    std::string method;
    std::string target;
    std::string protocol;
    int status;
    std::uint64_t bytes;
    double duration_ms;
};

// The request duration histogram's upper bounds in seconds, the same as the Python engines'
// (molt_shim/request_metrics.py, BUCKETS_S) and the master's (core/request_stats.hpp); the
// wire form is documented there.
constexpr double kDurationBuckets[] = {0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1,
                                       0.25,  0.5,    1.0,   2.5,  5.0,   10.0};
constexpr int kBucketCount = sizeof(kDurationBuckets) / sizeof(kDurationBuckets[0]) + 1;
constexpr int kStatusClasses = 5;  // 1xx .. 5xx

// Cumulative request durations and app exceptions of one worker (guarded by stats_mu_).
struct RequestMetrics {
    std::uint64_t buckets[kStatusClasses][kBucketCount] = {};
    std::uint64_t sum_us[kStatusClasses] = {};
    std::uint64_t exceptions = 0;
    void observe(int status, double seconds, bool raised);
    std::string encode() const;  // the heartbeat's DURATIONS= value
};

enum class ConnState { idle, busy, linger, closed };

struct Connection {
    Connection(int fd, int listener, const HttpLimits& limits)
        : fd(fd), listener(listener), parser(limits) {}
    int fd;
    int listener;  // index into the listeners, -1 for the warm-up connection
    std::string remote_addr;
    std::string remote_port;
    bool tcp = false;         // the client's address is TCP's (a PROXY header may say so)
    bool tcp_socket = false;  // the accepted socket itself is TCP (TCP_CORK applies)
    RequestParser parser;
    ConnState state = ConnState::busy;
    double idle_since = 0;
    double accepted_at = 0;   // the first head is due http.header_timeout after this
    double head_started = 0;  // a request head has begun and is not complete yet
    double linger_until = 0;
    bool in_epoll = false;
    // An event came while the connection was not parked (a thread or the sweep had it): the
    // next park re-arms it in the epoll instead of relying on a later edge.
    bool wake_pending = false;
    // The last read found the socket empty (recv_some()): a park needs no re-arm.
    bool drained = false;
    bool warmup = false;
    bool continue_sent = false;
    std::uint64_t served = 0;
    // PROXY listener: the header is still being read (`preamble` holds its bytes so far).
    bool proxy_pending = false;
    std::string preamble;
    // TLS listener: the session over `fd` (null: plain), and what the environ says about it,
    // filled in at the first request (the handshake is done by then).
    SslPtr ssl;
    bool tls_known = false;
    TlsPeer tls;

    std::string remote() const;
};

// TCP_CORK for as long as it lives, on a TCP connection: a response's head and a file's bytes
// then leave in full-sized segments, the head riding in the first. Without it (TCP_NODELAY is
// on) the head goes alone and sendfile() cuts the file wherever the send buffer had room,
// and every extra segment is work for the client's kernel. nginx's `tcp_nopush`.
class Corked {
  public:
    explicit Corked(const Connection& conn);
    ~Corked();  // uncorking sends what is left at once
    Corked(const Corked&) = delete;
    Corked& operator=(const Corked&) = delete;

  private:
    int fd_;
};

struct ListenerSlot {
    int fd;
    std::string name;
    bool open = true;
    PyRef base_env;  // the environ every request on this listener starts from
    bool proxy_protocol = false;
    std::shared_ptr<SSL_CTX> tls;  // listen[].tls, loaded when the worker starts; null: plain
    AsideListener balance;  // out of the accept queue while this worker holds more than its share
};

// The module-level Python objects handle() needs (owned by the module state).
// The environ keys every request sets, interned once per module.
enum class EnvKey {
    request_method,
    path_info,
    query_string,
    raw_uri,
    server_protocol,
    remote_addr,
    remote_port,
    content_length,
    wsgi_input,
    count
};
constexpr const char* kEnvKeyNames[] = {"REQUEST_METHOD", "PATH_INFO",       "QUERY_STRING",
                                        "RAW_URI",        "SERVER_PROTOCOL", "REMOTE_ADDR",
                                        "REMOTE_PORT",    "CONTENT_LENGTH",  "wsgi.input"};

struct PyShared {
    PyObject* start_response_type;  // borrowed from the module state
    PyObject* input_type;
    PyObject* const* env_keys;  // EnvKey::count interned str, borrowed from the module state
    PyObject* key(EnvKey k) const { return env_keys[static_cast<int>(k)]; }
};

class Server {
  public:
    Server(EngineConfig config, PyRef app, std::vector<ListenerSlot> listeners, PyRef warmup_env,
           PyRef file_wrapper, PyRef access_log, PyShared shared);
    ~Server();

    // Called on Python's main thread with the GIL held.
    void start();   // serving threads; listeners not yet accepted from
    void listen();  // join the listeners' wait queues
    void submit_warmup(int fd);
    void tick();            // the sweep: idle, 408 and linger closes
    void stop_accepting();  // the drain begins
    bool drained();
    void close();  // stop and join the serving threads, close what is left
    struct Counters {
        std::uint64_t requests;
        std::uint64_t inflight;
        double oldest_started;
        std::uint64_t connections;
        std::string durations;  // "" when request metrics are off
        std::uint64_t exceptions;
    };
    Counters counters();
    std::vector<std::pair<int, std::string>> take_logs();
    std::vector<AccessEntry> take_access();
    bool draining() const { return draining_.load(); }
    // close() left threads running (inside a hung app call): the object must outlive them,
    // that is, it must never be deleted.
    bool abandoned() const { return abandoned_; }

    // Logging from any thread, GIL or not; the main thread emits the queue at each tick.
    void log(int level, std::string text);

    // Implemented in wsgi_call.cpp: run the app for one request (takes the GIL).
    bool handle(Connection& conn, Request& req, PyThreadState* thread_state);
    // Implemented in static_files.cpp: answer a request under a `static:` prefix (no GIL).
    bool serve_static(Connection& conn, const Request& req, const StaticMount& mount);

    // A connection's reads, through TLS on a TLS listener (socket semantics, see transport.hpp).
    ssize_t recv_some(Connection& conn, char* buf, std::size_t size) const;
    // Socket writes for handle() (call with the GIL released). False: the client is gone.
    bool wait_writable(Connection& conn, std::string* why) const;
    bool send_all(Connection& conn, const iovec* iov, int count, std::string* why);
    bool send_file(Connection& conn, int file_fd, std::int64_t offset, std::uint64_t size,
                   std::uint64_t* sent, std::string* why);

    const EngineConfig& config() const { return config_; }
    std::string date_header();

  private:
    void thread_main();
    void serve_event(int fd, PyThreadState* ts);  // one epoll event: a connection or a listener
    void serve(Connection* conn, bool must_read, PyThreadState* ts);
    void accept_from(int listener_index, PyThreadState* ts);
    // Back into the accept queue, unless this worker holds more than its share of the
    // generation's connections and a sibling can take them (accept_balance.hpp).
    bool rejoin(int listener_index);
    void reconsider_aside();  // a listener stepped aside: back in when that no longer holds
    void watch_board();       // the board watcher thread
    void stop_board_watcher();
    void update_in_queue_locked();
    void park(Connection* conn, ConnState state = ConnState::idle, bool restart_clock = true);
    void park_locked(Connection* conn, ConnState state, bool restart_clock);
    void close_now(Connection* conn);
    void close_graceful(Connection* conn);
    void send_error(Connection* conn, int status, const std::string& reason, bool blocking);
    void discard(Connection* conn);
    Connection* take_parked(int fd);
    std::string overdue(const Connection& conn, double now) const;
    Connection* add_connection(int fd, int listener_index, const sockaddr_storage& peer);
    enum class Preamble { wait, done, close };
    Preamble read_proxy_header(Connection* conn, PyThreadState* ts);
    void set_proxied_peer(Connection* conn, PyObject* source);
    bool copy_file(Connection& conn, int file_fd, std::int64_t offset, std::uint64_t size,
                   std::uint64_t* sent, std::string* why);

    EngineConfig config_;
    PyRef app_;
    std::vector<ListenerSlot> listeners_;
    PyRef warmup_env_;
    PyRef file_wrapper_;
    PyRef access_log_;
    PyShared shared_;

  public:
    // Used by handle(): read-only after construction, or touched with the GIL held.
    PyObject* app() const { return app_.get(); }
    PyObject* file_wrapper() const { return file_wrapper_.get(); }
    PyObject* access_log() const { return access_log_.get(); }
    const PyShared& shared() const { return shared_; }
    PyObject* base_env(const Connection& conn) const {
        return conn.listener >= 0
                   ? listeners_[static_cast<std::size_t>(conn.listener)].base_env.get()
                   : warmup_env_.get();
    }
    std::unordered_map<std::string, PyRef> header_keys;  // GIL held: header name -> environ key
    std::uint64_t begin_request(double started);
    // status: the response's (0: none); raised: the app raised. Feeds metrics_ when on.
    void end_request(std::uint64_t token, int status, double seconds, bool raised);

  private:
    int ep_ = -1;
    int stop_fd_ = -1;
    std::mutex mu_;
    std::unordered_map<int, std::unique_ptr<Connection>> conns_;
    std::unordered_map<int, Connection*> parked_;
    std::vector<int> rejoin_failed_;
    // At most one serving thread waits in epoll_wait, and it serves what it gets itself; the
    // others take over only when it is slow (poll_token.hpp). Without it more threads run at
    // once and meet at the GIL: 2.5x the context switches and about 25% more CPU per request
    // (docs/architecture.md, "Native engine: where the time goes").
    std::unique_ptr<PollToken> poll_token_;
    std::unique_ptr<AcceptBoard> board_;
    std::atomic<bool> stepped_aside_{false};  // some listener is aside: the watcher re-checks
    std::thread board_watcher_;
    std::atomic<bool> board_stop_{false};
    std::atomic<bool> draining_{false};
    std::vector<std::thread> threads_;
    std::atomic<int> running_{0};
    bool abandoned_ = false;
    std::mutex stats_mu_;
    std::uint64_t requests_ = 0;
    std::uint64_t next_token_ = 1;
    std::map<std::uint64_t, double> inflight_;
    RequestMetrics metrics_;
    std::mutex log_mu_;
    std::vector<std::pair<int, std::string>> logs_;
    std::vector<AccessEntry> access_;
    double accept_error_logged_ = 0;
};

double monotonic();

// Log levels (Python's logging numbers).
constexpr int kDebug = 10;
constexpr int kInfo = 20;
constexpr int kWarning = 30;
constexpr int kError = 40;

}  // namespace molt::native
