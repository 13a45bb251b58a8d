// The native engine's I/O core (see engine.hpp for the threading model).
#include "engine.hpp"

#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <openssl/err.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/sendfile.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#include <algorithm>
#include <cstring>
#include <iterator>

namespace molt::native {

namespace {

constexpr std::size_t kRecvSize = 65536;
constexpr double kLingerS = 2.0;      // how long a closing connection is read-discarded
constexpr int kDrainBacklogMax = 64;  // what a draining worker still accepts from the queue
constexpr double kCloseWaitS = 2.0;   // how long close() waits for a thread inside the app
// How long a serving thread may be inside one event before another thread takes over the
// epoll: quick requests then cost no hand-off, a slow one delays the worker's other
// connections by at most this (poll_token.hpp).
constexpr std::chrono::microseconds kPromoteAfter{1000};
// Connections are edge-triggered and registered once: parking one after a read that emptied
// its socket costs no system call (the next bytes raise an edge). Ownership is `parked_` (a
// thread serves only a connection it took out of it), so an event for a connection that is
// being served is not served twice; it is remembered instead (Connection::wake_pending,
// serve_event()), and the park that follows re-arms the connection (EPOLL_CTL_MOD), which
// delivers an event at once if bytes are queued. A park after a read that may have left bytes
// queued (a full buffer, a TLS record) re-arms too.
constexpr std::uint32_t kConnectionEvents = EPOLLIN | EPOLLET;
constexpr std::uint32_t kListen = EPOLLIN | EPOLLEXCLUSIVE;
const char kContinue100[] = "HTTP/1.1 100 Continue\r\n\r\n";

const char* reason_phrase(int status) {
    switch (status) {
        case 400:
            return "Bad Request";
        case 408:
            return "Request Timeout";
        case 413:
            return "Payload Too Large";
        case 414:
            return "URI Too Long";
        case 431:
            return "Request Header Fields Too Large";
        case 500:
            return "Internal Server Error";
        case 501:
            return "Not Implemented";
        case 505:
            return "HTTP Version Not Supported";
        default:
            return "Error";
    }
}

bool wait_fd(int fd, short events, double timeout_s) {
    if (timeout_s <= 0) return false;
    pollfd p{fd, events, 0};
    int rc;
    do {
        rc = ::poll(&p, 1, static_cast<int>(timeout_s * 1000.0) + 1);
    } while (rc < 0 && errno == EINTR);
    return rc > 0;
}

std::string fmt_seconds(double s) {
    char buf[32];
    std::snprintf(buf, sizeof buf, "%.1fs", s);
    return buf;
}

bool out_of_resources(int err) {
    return err == EMFILE || err == ENFILE || err == ENOBUFS || err == ENOMEM;
}

}  // namespace

double monotonic() {
    timespec ts{};
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return static_cast<double>(ts.tv_sec) + static_cast<double>(ts.tv_nsec) / 1e9;
}

std::string Connection::remote() const {
    if (tcp) return remote_addr + ":" + remote_port;
    return "unix:" + remote_addr;
}

Server::Server(EngineConfig config, PyRef app, std::vector<ListenerSlot> listeners,
               PyRef warmup_env, PyRef file_wrapper, PyRef access_log, PyShared shared)
    : config_(std::move(config)),
      app_(std::move(app)),
      listeners_(std::move(listeners)),
      warmup_env_(std::move(warmup_env)),
      file_wrapper_(std::move(file_wrapper)),
      access_log_(std::move(access_log)),
      shared_(shared) {
    ep_ = epoll_create1(EPOLL_CLOEXEC);
    stop_fd_ = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    epoll_event ev{};
    ev.events = EPOLLIN;  // level-triggered: once written, every thread sees it
    ev.data.fd = stop_fd_;
    epoll_ctl(ep_, EPOLL_CTL_ADD, stop_fd_, &ev);
    poll_token_ = std::make_unique<PollToken>(stop_fd_, kPromoteAfter);
    board_ = std::make_unique<AcceptBoard>(config_.accept_board_fd, config_.generation,
                                           config_.threads, config_.accepting_workers);
}

Server::~Server() {
    stop_board_watcher();
    // close() has joined the threads; what is left is descriptors.
    for (auto& [fd, conn] : conns_) ::close(fd);
    for (auto& lst : listeners_) {
        if (lst.open) ::close(lst.fd);
    }
    if (ep_ >= 0) ::close(ep_);
    if (stop_fd_ >= 0) ::close(stop_fd_);
}

void Server::log(int level, std::string text) {
    std::lock_guard<std::mutex> lock(log_mu_);
    if (logs_.size() < 10000) logs_.emplace_back(level, std::move(text));
}

std::vector<std::pair<int, std::string>> Server::take_logs() {
    std::lock_guard<std::mutex> lock(log_mu_);
    return std::exchange(logs_, {});
}

std::vector<AccessEntry> Server::take_access() {
    std::lock_guard<std::mutex> lock(log_mu_);
    return std::exchange(access_, {});
}

std::string Server::date_header() {
    // One formatted Date per second and thread; names spelled out so no locale applies.
    thread_local time_t cached_second = 0;
    thread_local std::string cached;
    const time_t now = ::time(nullptr);
    if (now != cached_second) {
        static const char* const days[] = {"Sun", "Mon", "Tue", "Wed", "Thu", "Fri", "Sat"};
        static const char* const months[] = {"Jan", "Feb", "Mar", "Apr", "May", "Jun",
                                             "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"};
        tm t{};
        gmtime_r(&now, &t);
        char buf[64];
        std::snprintf(buf, sizeof buf, "Date: %s, %02d %s %04d %02d:%02d:%02d GMT\r\n",
                      days[t.tm_wday], t.tm_mday, months[t.tm_mon], t.tm_year + 1900, t.tm_hour,
                      t.tm_min, t.tm_sec);
        cached = buf;
        cached_second = now;
    }
    return cached;
}

// --- counters --------------------------------------------------------------------------------

std::uint64_t Server::begin_request(double started) {
    std::lock_guard<std::mutex> lock(stats_mu_);
    const std::uint64_t token = next_token_++;
    inflight_.emplace(token, started);
    return token;
}

void Server::end_request(std::uint64_t token, int status, double seconds, bool raised) {
    std::lock_guard<std::mutex> lock(stats_mu_);
    inflight_.erase(token);
    ++requests_;
    if (config_.request_metrics) metrics_.observe(status, seconds, raised);
}

void RequestMetrics::observe(int status, double seconds, bool raised) {
    // No status at all (the app raised before answering) counts as a 5xx, as in Python.
    const int cls = status <= 0 ? 4 : std::min(4, std::max(0, status / 100 - 1));
    const double* end = std::end(kDurationBuckets);
    const auto bucket =
        std::lower_bound(std::begin(kDurationBuckets), end, seconds) - std::begin(kDurationBuckets);
    ++buckets[cls][bucket];
    sum_us[cls] += static_cast<std::uint64_t>(seconds * 1e6);
    if (raised) ++exceptions;
}

std::string RequestMetrics::encode() const {
    static const char* const names[kStatusClasses] = {"1xx", "2xx", "3xx", "4xx", "5xx"};
    std::string out;
    for (int cls = 0; cls < kStatusClasses; ++cls) {
        int last = kBucketCount;
        while (last > 0 && buckets[cls][last - 1] == 0) --last;
        if (last == 0) continue;
        if (!out.empty()) out += ';';
        out += names[cls];
        out += ':' + std::to_string(sum_us[cls]) + ':';
        for (int i = 0; i < last; ++i) {
            if (i) out += ',';
            out += std::to_string(buckets[cls][i]);
        }
    }
    return out;
}

Server::Counters Server::counters() {
    Counters out{};
    {
        std::lock_guard<std::mutex> lock(stats_mu_);
        out.requests = requests_;
        out.inflight = inflight_.size();
        out.oldest_started = monotonic();
        for (const auto& [token, started] : inflight_) {
            out.oldest_started = std::min(out.oldest_started, started);
        }
        if (config_.request_metrics) out.durations = metrics_.encode();
        out.exceptions = metrics_.exceptions;
    }
    std::lock_guard<std::mutex> lock(mu_);
    out.connections = conns_.size();
    return out;
}

// --- threads ---------------------------------------------------------------------------------

void Server::start() {
    // The serving threads block the asynchronous signals, so the kernel delivers them to
    // Python's main thread, which runs the handlers (drain, fast exit, the SIGABRT dump)
    // without waiting for its next tick. They inherit the mask of the thread that makes them.
    sigset_t all;
    sigset_t previous;
    sigemptyset(&all);
    for (int sig : {SIGHUP, SIGINT, SIGQUIT, SIGTERM, SIGUSR1, SIGUSR2, SIGCHLD, SIGALRM, SIGABRT,
                    SIGPIPE, SIGTTIN, SIGTTOU, SIGWINCH}) {
        sigaddset(&all, sig);
    }
    pthread_sigmask(SIG_BLOCK, &all, &previous);
    for (int i = 0; i < std::max(1, config_.threads); ++i) {
        running_.fetch_add(1);
        threads_.emplace_back([this] { thread_main(); });
    }
    if (board_->active()) board_watcher_ = std::thread([this] { watch_board(); });
    pthread_sigmask(SIG_SETMASK, &previous, nullptr);
}

void Server::watch_board() {
    // Off the request path: wakes when a sibling calls this worker back into the accept queue
    // (it took more than its share while this one stood aside), and every kAsideRecheckMs
    // while a listener is aside, to look again.
    while (!board_stop_.load()) {
        board_->wait_for_call(stepped_aside_.load(std::memory_order_relaxed) ? kAsideRecheckMs
                                                                             : -1);
        if (board_stop_.load()) break;
        reconsider_aside();
    }
}

void Server::thread_main() {
    // This thread's own Python thread state, made once; GilHeld uses it per request.
    PyGILState_STATE gil = PyGILState_Ensure();
    PyThreadState* ts = PyEval_SaveThread();
    bool stop = false;
    while (!stop && poll_token_->acquire()) {
        for (;;) {  // holding the token: wait for an event, serve it, again
            epoll_event ev{};
            const int n = epoll_wait(ep_, &ev, 1, -1);
            if (n < 0) {
                if (errno == EINTR) continue;
                log(kError, std::string("epoll_wait failed: ") + std::strerror(errno));
                poll_token_->release();
                stop = true;
                break;
            }
            if (n == 0) continue;
            if (ev.data.fd == stop_fd_) {
                stop = true;
                break;
            }
            const std::uint64_t turn = poll_token_->serving();
            // Busy from the event to its end (a body read or a 100-continue wait included):
            // a sibling steps aside only for a worker with a thread free to take its turn.
            board_->thread_busy();
            serve_event(ev.data.fd, ts);
            board_->thread_free();
            if (!poll_token_->done_serving(turn)) break;  // another thread took over meanwhile
        }
    }
    PyEval_RestoreThread(ts);
    PyGILState_Release(gil);
    running_.fetch_sub(1);
}

void Server::serve_event(int fd, PyThreadState* ts) {
    try {
        Connection* conn = nullptr;
        int listener = -1;
        {
            // One critical section: a connection that is not parked now is being served (by a
            // thread or the sweep), and the mark must be set before that owner parks it, or
            // its park would not re-arm it and the edge would be lost.
            std::lock_guard<std::mutex> lock(mu_);
            if (auto parked = parked_.find(fd); parked != parked_.end()) {
                conn = parked->second;
                parked_.erase(parked);
            } else if (auto busy = conns_.find(fd); busy != conns_.end()) {
                busy->second->wake_pending = true;
                return;
            } else {
                for (std::size_t i = 0; i < listeners_.size(); ++i) {
                    if (listeners_[i].open && listeners_[i].fd == fd)
                        listener = static_cast<int>(i);
                }
            }
        }
        if (conn != nullptr) {
            if (conn->state == ConnState::linger) {
                discard(conn);
            } else {
                conn->state = ConnState::busy;
                serve(conn, true, ts);
            }
            return;
        }
        if (listener >= 0) accept_from(listener, ts);
        // else: a stale event for a connection closed since; nothing to do
    } catch (const std::exception& exc) {  // a bug here must not end the serving thread
        log(kError, std::string("internal error while serving: ") + exc.what());
    } catch (...) {
        log(kError, "internal error while serving: unknown exception");
    }
}

void Server::stop_board_watcher() {
    if (!board_watcher_.joinable()) return;
    board_stop_.store(true);
    board_->interrupt_wait();
    board_watcher_.join();
}

void Server::close() {
    stop_board_watcher();
    if (!threads_.empty()) {
        const std::uint64_t one = 1;
        (void)!::write(stop_fd_, &one, sizeof one);
        GilReleased unlocked;  // the threads need the GIL to finish their request and exit
        // A thread still inside a hung app call (graceful timeout) must not keep the worker
        // from exiting: wait a bounded time, then leave such threads to the process exit.
        const double deadline = monotonic() + kCloseWaitS;
        while (running_.load() > 0 && monotonic() < deadline) ::usleep(5000);
        if (running_.load() == 0) {
            for (auto& t : threads_) t.join();
        } else {
            log(kWarning, std::to_string(running_.load()) +
                              " serving thread(s) still busy at exit; not waiting for them");
            for (auto& t : threads_) t.detach();
            abandoned_ = true;
            return;  // the threads may still use the connections and this object
        }
        threads_.clear();
    }
    std::vector<Connection*> left;
    {
        std::lock_guard<std::mutex> lock(mu_);
        for (auto& [fd, conn] : parked_) left.push_back(conn);
    }
    for (Connection* conn : left) {
        if (take_parked(conn->fd) == conn) close_now(conn);
    }
}

// --- accepting -------------------------------------------------------------------------------

void Server::listen() {
    std::lock_guard<std::mutex> lock(mu_);
    for (auto& lst : listeners_) {
        // Non-blocking: accept() runs under mu_ and must never wait for a connection that
        // another worker took first.
        const int flags = fcntl(lst.fd, F_GETFL);
        if (flags >= 0) fcntl(lst.fd, F_SETFL, flags | O_NONBLOCK);
        epoll_event ev{};
        ev.events = kListen;
        ev.data.fd = lst.fd;
        epoll_ctl(ep_, EPOLL_CTL_ADD, lst.fd, &ev);
    }
    board_->publish();  // a sibling from now on: it accepts
    update_in_queue_locked();
}

Connection* Server::add_connection(int fd, int listener_index, const sockaddr_storage& addr) {
    // addr: the peer as accept4() returned it (AF_UNIX for a Unix socket, named or not).
    const bool tcp_peer = addr.ss_family != AF_UNIX;
    auto conn = std::make_unique<Connection>(fd, listener_index, config_.limits);
    conn->tcp = tcp_peer;
    conn->tcp_socket = addr.ss_family == AF_INET || addr.ss_family == AF_INET6;
    conn->idle_since = conn->accepted_at = monotonic();
    if (tcp_peer) {
        char host[INET6_ADDRSTRLEN] = "";
        int port = 0;
        if (addr.ss_family == AF_INET) {
            const auto* a = reinterpret_cast<const sockaddr_in*>(&addr);
            inet_ntop(AF_INET, &a->sin_addr, host, sizeof host);
            port = ntohs(a->sin_port);
        } else if (addr.ss_family == AF_INET6) {
            const auto* a = reinterpret_cast<const sockaddr_in6*>(&addr);
            inet_ntop(AF_INET6, &a->sin6_addr, host, sizeof host);
            port = ntohs(a->sin6_port);
        } else {
            conn->tcp = false;
        }
        conn->remote_addr = host;
        conn->remote_port = std::to_string(port);
    }
    if (listener_index >= 0) {
        const ListenerSlot& lst = listeners_[static_cast<std::size_t>(listener_index)];
        conn->proxy_pending = lst.proxy_protocol;
        if (lst.tls) {
            // The handshake runs inside the first reads (SSL_read performs it), driven by
            // epoll like any read: a client that opens TLS and sends nothing holds no thread,
            // and the first-request timeout (http.header_timeout) closes it.
            conn->ssl.reset(SSL_new(lst.tls.get()));
            if (!conn->ssl || SSL_set_fd(conn->ssl.get(), fd) != 1) {
                ERR_clear_error();
                ::close(fd);
                return nullptr;  // out of memory: the caller treats it like a failed accept
            }
            SSL_set_accept_state(conn->ssl.get());
        }
    }
    Connection* raw = conn.get();
    conns_[fd] = std::move(conn);
    board_->set_connections(conns_.size());
    return raw;
}

void Server::accept_from(int index, PyThreadState* ts) {
    // With EPOLLEXCLUSIVE the kernel wakes the first worker in the socket's wait queue that has
    // a thread waiting, and that order never changes by itself. So a worker leaves the queue to
    // accept (one thread at a time) and joins again at the back: new connections go
    // round-robin over the workers that have a thread free.
    Connection* conn = nullptr;
    int accept_errno = 0;
    {
        std::lock_guard<std::mutex> lock(mu_);
        ListenerSlot& lst = listeners_[static_cast<std::size_t>(index)];
        if (!lst.open) return;                                            // closed by the drain
        if (epoll_ctl(ep_, EPOLL_CTL_DEL, lst.fd, nullptr) != 0) return;  // another thread accepts
        // The peer's address comes with accept4(): no getpeername()/getsockname() per
        // connection (two of the nine syscalls of a `Connection: close` request).
        sockaddr_storage peer{};
        socklen_t peer_len = sizeof peer;
        const int fd = accept4(lst.fd, reinterpret_cast<sockaddr*>(&peer), &peer_len,
                               SOCK_NONBLOCK | SOCK_CLOEXEC);
        if (fd < 0) {
            accept_errno = errno;
        } else {
            conn = add_connection(fd, index, peer);
            if (conn == nullptr) accept_errno = ENOMEM;
        }
    }
    if (conn == nullptr) {
        if (accept_errno != EAGAIN && accept_errno != EWOULDBLOCK && accept_errno != EINTR) {
            const std::string name = listeners_[static_cast<std::size_t>(index)].name;
            if (out_of_resources(accept_errno)) {
                // The listener stays readable: back off outside the queue, say so once a second.
                const double now = monotonic();
                if (now - accept_error_logged_ > 1.0) {
                    accept_error_logged_ = now;
                    log(kError, "accept() on " + name + " failed: " + std::strerror(accept_errno));
                }
                ::usleep(100000);
            } else if (!draining_) {
                log(kInfo, "accept() on " + name + ": " + std::strerror(accept_errno));
            }
        }
        rejoin(index);
        return;
    }
    if (conn->proxy_pending || conn->ssl) {
        // The first bytes are a PROXY header or a TLS handshake: serve() reads them.
        rejoin(index);
        serve(conn, true, ts);
        return;
    }
    char buf[kRecvSize];
    const ssize_t n = ::recv(conn->fd, buf, sizeof buf, 0);
    const int recv_errno = errno;
    // Back in the queue once the first bytes are read, before the app runs: a slow first
    // request must not stop this worker's other threads from accepting.
    rejoin(index);
    if (n < 0 && (recv_errno == EAGAIN || recv_errno == EWOULDBLOCK || recv_errno == EINTR)) {
        park(conn);
    } else if (n <= 0) {
        close_now(conn);  // connected and left without a byte
    } else {
        conn->head_started = monotonic();
        conn->parser.feed(buf, static_cast<std::size_t>(n));
        serve(conn, false, ts);
    }
}

bool Server::rejoin(int index) {
    std::lock_guard<std::mutex> lock(mu_);
    ListenerSlot& lst = listeners_[static_cast<std::size_t>(index)];
    if (!lst.open) return false;
    if (lst.balance.step_aside(*board_, [&] { return connection_queued(lst.fd); })) {
        update_in_queue_locked();
        return true;
    }
    epoll_event ev{};
    ev.events = kListen;
    ev.data.fd = lst.fd;
    if (epoll_ctl(ep_, EPOLL_CTL_ADD, lst.fd, &ev) != 0 && errno != EEXIST) {
        if (std::find(rejoin_failed_.begin(), rejoin_failed_.end(), index) ==
            rejoin_failed_.end()) {
            log(kError,
                "listening on " + lst.name + " again failed (retrying): " + std::strerror(errno));
            rejoin_failed_.push_back(index);
        }
        return false;
    }
    rejoin_failed_.erase(std::remove(rejoin_failed_.begin(), rejoin_failed_.end(), index),
                         rejoin_failed_.end());
    update_in_queue_locked();
    return true;
}

void Server::update_in_queue_locked() {
    bool in_queue = false;
    bool aside = false;
    for (const auto& lst : listeners_) {
        in_queue = in_queue || (lst.open && !lst.balance.aside);
        aside = aside || (lst.open && lst.balance.aside);
    }
    board_->set_in_queue(in_queue);
    // The watcher re-checks every kAsideRecheckMs while a listener is aside: wake it to
    // start doing so (it waits without a timeout while this worker is in the queue).
    if (aside && !stepped_aside_.exchange(true)) board_->interrupt_wait();
    if (!aside) stepped_aside_.store(false, std::memory_order_relaxed);
}

void Server::reconsider_aside() {
    if (!stepped_aside_.load(std::memory_order_relaxed)) return;
    std::vector<int> back;
    {
        std::lock_guard<std::mutex> lock(mu_);
        const bool still = board_->should_step_aside();
        for (std::size_t i = 0; i < listeners_.size(); ++i) {
            ListenerSlot& lst = listeners_[i];
            if (!lst.open || !lst.balance.aside) continue;
            // Each arrival wakes one worker (EPOLLEXCLUSIVE), and this one may have been it.
            if (lst.balance.come_back(still, connection_queued(lst.fd))) {
                back.push_back(static_cast<int>(i));
            }
        }
    }
    for (int index : back) rejoin(index);
}

void Server::submit_warmup(int fd) {
    std::lock_guard<std::mutex> lock(mu_);
    sockaddr_storage unix_peer{};
    unix_peer.ss_family = AF_UNIX;
    Connection* conn = add_connection(fd, -1, unix_peer);
    conn->warmup = true;
    park_locked(conn, ConnState::idle, true);
}

// --- one connection (the thread that owns it) --------------------------------------------------

void Server::serve(Connection* conn, bool must_read, PyThreadState* ts) {
    // Read, run the app, write, until the connection would block; then park it.
    RequestParser& parser = conn->parser;
    if (conn->proxy_pending) {
        const Preamble step = read_proxy_header(conn, ts);
        if (step == Preamble::wait) {
            // Not a request: the clock keeps running from the accept (a header trickled a
            // byte at a time must not hold a draining worker past drain_idle).
            park(conn, ConnState::idle, false);
            return;
        }
        if (step == Preamble::close) {
            close_now(conn);
            return;
        }
        must_read = true;  // the request usually came with the header
    }
    char buf[kRecvSize];
    // The keep-alive time runs from the last response, not from the last read: bytes that
    // begin no request (empty lines, RFC 9112 §2.2) must not keep an idle connection open.
    bool answered = false;
    for (;;) {
        while (!parser.ready().empty()) {
            Request req = std::move(parser.ready().front());
            parser.ready().pop_front();
            conn->continue_sent = false;
            const StaticMount* mount =
                config_.statics.empty() ? nullptr : match_static(config_.statics, req.target);
            const bool keep =
                mount != nullptr ? serve_static(*conn, req, *mount) : handle(*conn, req, ts);
            ++conn->served;
            if (!keep) {
                if (!req.keep_alive && parser.ready().empty() && !parser.in_request()) {
                    // The client asked to close and sent nothing more we have seen: a plain
                    // close. Closes of our own choosing linger, so no request meets a reset.
                    close_now(conn);
                } else {
                    close_graceful(conn);
                }
                return;
            }
            answered = true;
            must_read = false;
        }
        if (parser.error()) {
            send_error(conn, parser.error()->status, parser.error()->reason, true);
            return;
        }
        if (parser.upgrade()) {
            // WSGI cannot take over the socket: the request was answered, now close.
            close_graceful(conn);
            return;
        }
        ssize_t n;
        int read_errno = 0;
        const Request* body_of = parser.in_body();
        if (body_of != nullptr) {
            // Inside a request body: read with a deadline (the app runs on the whole body).
            if (body_of->expect_continue && !conn->continue_sent) {
                conn->continue_sent = true;
                iovec iov{const_cast<char*>(kContinue100), sizeof kContinue100 - 1};
                std::string why;
                if (!send_all(*conn, &iov, 1, &why)) {
                    close_now(conn);
                    return;
                }
            }
            const double deadline = monotonic() + config_.header_timeout;
            for (;;) {
                n = recv_some(*conn, buf, sizeof buf);
                if (n >= 0) break;
                if (errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR) {
                    n = 0;  // reset by the peer: same outcome as EOF for a request body
                    break;
                }
                if (!wait_fd(conn->fd, POLLIN, deadline - monotonic())) {
                    send_error(
                        conn, 408,
                        "request body not received within " + fmt_seconds(config_.header_timeout),
                        true);
                    return;
                }
            }
        } else if (!parser.in_request() && !must_read && !transport_pending(conn->ssl.get())) {
            park(conn, ConnState::idle, answered);
            return;
        } else {
            must_read = false;
            n = recv_some(*conn, buf, sizeof buf);
            read_errno = errno;
            if (n < 0) {
                if (read_errno == EAGAIN || read_errno == EWOULDBLOCK || read_errno == EINTR) {
                    park(conn, ConnState::idle, answered);
                } else if (read_errno == EPROTO && conn->ssl) {
                    log(kInfo, conn->remote() + ": TLS error: " + tls_error_text());
                    close_now(conn);
                } else {
                    log(kInfo, conn->remote() + ": connection error: " + std::strerror(read_errno));
                    close_now(conn);
                }
                return;
            }
        }
        if (n == 0) {
            if (const Request* cur = parser.in_body()) {
                const std::string want =
                    cur->content_length ? std::to_string(*cur->content_length) : "chunked";
                log(kWarning, conn->remote() +
                                  ": client closed the connection with an incomplete request "
                                  "body (" +
                                  std::to_string(cur->body.size()) + " of " + want +
                                  " bytes); app not called");
            } else if (parser.in_request()) {
                log(kInfo, conn->remote() + ": client closed the connection inside a request head");
            }
            close_now(conn);
            return;
        }
        if (!parser.in_request()) conn->head_started = monotonic();  // a head may begin here
        parser.feed(buf, static_cast<std::size_t>(n));
    }
}

// Until the client has taken bytes from the socket's send buffer. http.send_timeout (nginx's
// send_timeout) bounds each wait, not the whole response: a client that reads nothing holds
// its serving thread this long at most, one that keeps reading is never cut off.
bool Server::wait_writable(Connection& conn, std::string* why) const {
    if (wait_fd(conn.fd, POLLOUT, config_.send_timeout)) return true;
    *why = "the client took no response bytes for " + fmt_seconds(config_.send_timeout) +
           " (http.send_timeout)";
    return false;
}

bool Server::send_all(Connection& conn, const iovec* iov_in, int count, std::string* why) {
    std::vector<iovec> iov(iov_in, iov_in + count);
    std::size_t first = 0;
    while (first < iov.size()) {
        if (iov[first].iov_len == 0) {
            ++first;
            continue;
        }
        const ssize_t sent = transport_sendv(conn.fd, conn.ssl.get(), &iov[first],
                                             static_cast<int>(iov.size() - first));
        if (sent < 0) {
            if (errno == EINTR) continue;
            if (errno != EAGAIN && errno != EWOULDBLOCK) {
                *why = std::strerror(errno);
                return false;
            }
            if (!wait_writable(conn, why)) return false;
            continue;
        }
        auto left = static_cast<std::size_t>(sent);
        while (left > 0 && first < iov.size()) {
            if (left >= iov[first].iov_len) {
                left -= iov[first].iov_len;
                ++first;
            } else {
                iov[first].iov_base = static_cast<char*>(iov[first].iov_base) + left;
                iov[first].iov_len -= left;
                left = 0;
            }
        }
    }
    return true;
}

Corked::Corked(const Connection& conn) : fd_(conn.tcp_socket ? conn.fd : -1) {
    const int on = 1;
    if (fd_ >= 0) ::setsockopt(fd_, IPPROTO_TCP, TCP_CORK, &on, sizeof on);
}

Corked::~Corked() {
    const int off = 0;
    if (fd_ >= 0) ::setsockopt(fd_, IPPROTO_TCP, TCP_CORK, &off, sizeof off);
}

bool Server::send_file(Connection& conn, int file_fd, std::int64_t offset, std::uint64_t size,
                       std::uint64_t* sent_total, std::string* why) {
    if (conn.ssl) return copy_file(conn, file_fd, offset, size, sent_total, why);
    off_t off = static_cast<off_t>(offset);
    while (size > 0) {
        const ssize_t n =
            ::sendfile(conn.fd, file_fd, &off,
                       static_cast<std::size_t>(std::min<std::uint64_t>(size, 1 << 30)));
        if (n < 0) {
            if (errno == EINTR) continue;
            if (errno != EAGAIN && errno != EWOULDBLOCK) {
                *why = std::strerror(errno);
                return false;
            }
            if (!wait_writable(conn, why)) return false;
            continue;
        }
        if (n == 0) break;  // the file shrank under us
        size -= static_cast<std::uint64_t>(n);
        *sent_total += static_cast<std::uint64_t>(n);
    }
    return true;
}

// sendfile() cannot encrypt: on a TLS connection the file's bytes go through send_all().
bool Server::copy_file(Connection& conn, int file_fd, std::int64_t offset, std::uint64_t size,
                       std::uint64_t* sent_total, std::string* why) {
    char buf[kRecvSize];
    while (size > 0) {
        const ssize_t n = ::pread(file_fd, buf, std::min<std::uint64_t>(size, sizeof buf),
                                  static_cast<off_t>(offset));
        if (n < 0 && errno == EINTR) continue;
        if (n < 0) {
            *why = std::strerror(errno);
            return false;
        }
        if (n == 0) break;  // the file shrank under us
        iovec iov{buf, static_cast<std::size_t>(n)};
        if (!send_all(conn, &iov, 1, why)) return false;
        offset += n;
        size -= static_cast<std::uint64_t>(n);
        *sent_total += static_cast<std::uint64_t>(n);
    }
    return true;
}

ssize_t Server::recv_some(Connection& conn, char* buf, std::size_t size) const {
    const ssize_t n = transport_recv(conn.fd, conn.ssl.get(), buf, size, config_.send_timeout);
    // The socket had nothing more: it would block, or a plain read took less than it asked
    // for. Not after a TLS read that returned bytes (one record's: others may be queued), nor
    // one that gave up waiting to write (it reports EAGAIN too, with bytes maybe queued).
    const int read_errno = errno;
    conn.drained = n < 0 ? (read_errno == EAGAIN || read_errno == EWOULDBLOCK) &&
                               !transport_waits_to_write(conn.ssl.get())
                         : !conn.ssl && n > 0 && static_cast<std::size_t>(n) < size;
    errno = read_errno;
    return n;
}

// --- the PROXY protocol header -----------------------------------------------------------------

// Reads the header's bytes and no more: what follows belongs to the client (an HTTP request,
// or a TLS handshake that OpenSSL must read from the socket itself). The bytes are peeked,
// and only those proxy_header_length() counts as header are consumed, so a parked connection
// wakes again only for new bytes. The complete header goes to the Python parser.
Server::Preamble Server::read_proxy_header(Connection* conn, PyThreadState* ts) {
    char buf[kProxyHeaderMax];
    std::size_t length = 0;
    while (length == 0) {
        const ssize_t n = ::recv(conn->fd, buf, sizeof buf - conn->preamble.size(), MSG_PEEK);
        if (n < 0 && errno == EINTR) continue;
        if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) return Preamble::wait;
        if (n <= 0) return Preamble::close;  // gone before its header was complete
        const std::size_t have = conn->preamble.size();
        std::string candidate = conn->preamble + std::string(buf, static_cast<std::size_t>(n));
        length = proxy_header_length(candidate);
        const std::size_t take = length == 0     ? static_cast<std::size_t>(n)
                                 : length > have ? length - have
                                                 : 0;
        if (take > 0 && ::recv(conn->fd, buf, take, 0) != static_cast<ssize_t>(take))
            return Preamble::close;
        conn->preamble.append(buf, take);
    }
    conn->proxy_pending = false;
    GilHeld gil(ts);
    PyRef data = PyRef::steal(
        PyBytes_FromStringAndSize(conn->preamble.data(), static_cast<Py_ssize_t>(length)));
    PyRef remote = PyRef::steal(PyUnicode_DecodeLatin1(
        conn->remote().data(), static_cast<Py_ssize_t>(conn->remote().size()), "replace"));
    PyRef source;
    if (data && remote) {
        source = PyRef::steal(PyObject_CallFunctionObjArgs(config_.proxy_header.get(), remote.get(),
                                                           data.get(), nullptr));
    }
    std::string().swap(conn->preamble);
    if (!source) {  // the reader logs its own failures; this is a bug in calling it
        PyErr_Clear();
        log(kError, conn->remote() + ": the PROXY header reader failed");
        return Preamble::close;
    }
    if (source.get() == Py_False) return Preamble::close;  // invalid: the reader logged it
    set_proxied_peer(conn, source.get());
    return Preamble::done;
}

// The client the header named, as the reader gives it: (address, port), port "" for a unix
// socket path; or None (LOCAL, UNKNOWN): the socket's peer stays.
void Server::set_proxied_peer(Connection* conn, PyObject* source) {
    const char* addr = nullptr;
    const char* port = nullptr;
    if (source == Py_None || !PyArg_ParseTuple(source, "ss", &addr, &port)) {
        PyErr_Clear();
        return;
    }
    conn->remote_addr = addr;
    conn->remote_port = port;
    conn->tcp = *port != '\0';
}

// --- parking and closing -----------------------------------------------------------------------

Connection* Server::take_parked(int fd) {
    std::lock_guard<std::mutex> lock(mu_);
    auto it = parked_.find(fd);
    if (it == parked_.end()) return nullptr;
    Connection* conn = it->second;
    parked_.erase(it);
    return conn;
}

void Server::park(Connection* conn, ConnState state, bool restart_clock) {
    std::lock_guard<std::mutex> lock(mu_);
    park_locked(conn, state, restart_clock);
}

void Server::park_locked(Connection* conn, ConnState state, bool restart_clock) {
    conn->state = state;
    // Only a parked connection with an incomplete head runs the header timeout (408).
    if (!conn->parser.in_request()) conn->head_started = 0;
    if (restart_clock) {
        const double now = monotonic();
        conn->idle_since = now;
        if (state == ConnState::linger) conn->linger_until = now + kLingerS;
    }
    parked_[conn->fd] = conn;  // before arming: the event may fire at once
    // Registered, its last read left nothing queued and no event came meanwhile: the next
    // bytes raise an edge. Otherwise re-arm it, which delivers an event if bytes are queued.
    const bool quiet = conn->in_epoll && conn->drained && !conn->wake_pending;
    conn->drained = false;  // true again only after a read that says so
    conn->wake_pending = false;
    if (quiet) return;
    epoll_event ev{};
    ev.events = kConnectionEvents;
    ev.data.fd = conn->fd;
    int rc = epoll_ctl(ep_, conn->in_epoll ? EPOLL_CTL_MOD : EPOLL_CTL_ADD, conn->fd, &ev);
    if (rc != 0 && errno == ENOENT) rc = epoll_ctl(ep_, EPOLL_CTL_ADD, conn->fd, &ev);
    if (rc != 0 && errno == EEXIST) rc = epoll_ctl(ep_, EPOLL_CTL_MOD, conn->fd, &ev);
    if (rc != 0) {
        // Out of kernel memory: nobody would ever wake this connection, so close it.
        parked_.erase(conn->fd);
        conn->state = ConnState::closed;
        const int fd = conn->fd;
        ::close(fd);
        conns_.erase(fd);
        board_->set_connections(conns_.size());
        return;
    }
    conn->in_epoll = true;
}

void Server::close_now(Connection* conn) {
    std::lock_guard<std::mutex> lock(mu_);
    if (conn->state == ConnState::closed) return;
    conn->state = ConnState::closed;
    const int fd = conn->fd;
    // The fd number is ours until close(): forget it everywhere first, under the same lock
    // that a new accept() of the same number takes.
    auto it = parked_.find(fd);
    if (it != parked_.end() && it->second == conn) parked_.erase(it);
    if (conn->in_epoll) epoll_ctl(ep_, EPOLL_CTL_DEL, fd, nullptr);
    ::close(fd);
    conns_.erase(fd);  // deletes conn
    board_->set_connections(conns_.size());
}

void Server::close_graceful(Connection* conn) {
    // TLS: close_notify first, one attempt (a client that reads nothing does not get it).
    SSL* ssl = conn->ssl.get();
    if (ssl != nullptr && SSL_is_init_finished(ssl)) {
        ERR_clear_error();
        SSL_shutdown(ssl);
        ERR_clear_error();
    }
    // shutdown(SHUT_WR), then read-discard until the peer closes, so no RST is sent.
    if (::shutdown(conn->fd, SHUT_WR) != 0) {
        close_now(conn);
        return;
    }
    park(conn, ConnState::linger);
}

void Server::discard(Connection* conn) {
    char buf[kRecvSize];
    for (int i = 0; i < 16; ++i) {
        const ssize_t n = ::recv(conn->fd, buf, sizeof buf, 0);
        if (n == 0) break;
        if (n < 0) {
            if (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR) {
                conn->drained = errno != EINTR;
                park(conn, ConnState::linger, false);
                return;
            }
            break;
        }
    }
    close_now(conn);
}

void Server::send_error(Connection* conn, int status, const std::string& reason, bool blocking) {
    // An error status and a close. blocking=false (the sweep) makes one send attempt only.
    const std::string phrase = reason_phrase(status);
    log(kWarning, conn->remote() + ": " + std::to_string(status) + " " + phrase + ": " + reason);
    const std::string body = std::to_string(status) + " " + phrase + "\n";
    const std::string head = "HTTP/1.1 " + std::to_string(status) + " " + phrase +
                             "\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: " +
                             std::to_string(body.size()) + "\r\nConnection: close\r\n" +
                             date_header() + config_.version_header + "\r\n";
    const std::string all = head + body;
    if (blocking) {
        iovec iov{const_cast<char*>(all.data()), all.size()};
        std::string why;
        if (!send_all(*conn, &iov, 1, &why)) {
            close_now(conn);
            return;
        }
    } else {
        iovec iov{const_cast<char*>(all.data()), all.size()};
        (void)transport_sendv(conn->fd, conn->ssl.get(), &iov, 1);  // the socket never blocks
    }
    close_graceful(conn);
}

// --- the sweep and the drain (Python's main thread) --------------------------------------------

std::string Server::overdue(const Connection& conn, double now) const {
    if (conn.state == ConnState::linger) return now >= conn.linger_until ? "linger" : "";
    if (conn.state != ConnState::idle) return "";
    // A connection that has not sent its first request yet gets the header timeout from its
    // accept, not the keepalive (which may be 0, or longer), except while draining. From the
    // accept, not from its last read: a PROXY header or a TLS handshake sent a byte at a time
    // parks it again and again, and must not hold it for ever (slowloris before the head).
    if (conn.served == 0 && !draining_) {
        if (now - conn.accepted_at < config_.header_timeout) return "";
        return conn.head_started > 0 ? "408" : "idle";
    }
    if (conn.head_started > 0) return now - conn.head_started > config_.header_timeout ? "408" : "";
    const double limit = draining_ ? config_.drain_idle : config_.keepalive;
    return now - conn.idle_since >= limit ? "idle" : "";
}

void Server::tick() {
    GilReleased unlocked;
    board_->stamp();
    reconsider_aside();
    const double now = monotonic();
    std::vector<int> retry;
    std::vector<Connection*> due;
    {
        std::lock_guard<std::mutex> lock(mu_);
        retry = rejoin_failed_;
        // Taking a connection out of `parked_` under the lock makes the sweep its owner: a
        // serving thread that gets its event later finds nothing to take.
        for (auto it = parked_.begin(); it != parked_.end();) {
            if (!overdue(*it->second, now).empty()) {
                due.push_back(it->second);
                it = parked_.erase(it);
            } else {
                ++it;
            }
        }
    }
    for (int index : retry) rejoin(index);
    for (Connection* conn : due) {
        std::string verdict = overdue(*conn, now);
        if (verdict == "idle") {
            // The client may have sent its next request already (the keep-alive race): closing
            // would lose it. The pending epoll event then delivers it as usual. Empty lines
            // alone begin no request (RFC 9112 §2.2): they do not keep the connection.
            char bytes[64];
            const ssize_t n = ::recv(conn->fd, bytes, sizeof bytes, MSG_PEEK | MSG_DONTWAIT);
            const bool request_begun = n > 0 && std::any_of(bytes, bytes + n, [](char c) {
                                           return c != '\r' && c != '\n';
                                       });
            if (transport_pending(conn->ssl.get()) || (conn->ssl && n > 0) || request_begun) {
                verdict.clear();
            }
        }
        if (verdict.empty()) {
            park(conn, conn->state, false);
        } else if (verdict == "linger") {
            close_now(conn);
        } else if (verdict == "408") {
            conn->state = ConnState::busy;
            send_error(conn, 408,
                       "request head not complete within " + fmt_seconds(config_.header_timeout),
                       false);
        } else {
            conn->state = ConnState::busy;
            close_graceful(conn);
        }
    }
}

void Server::stop_accepting() {
    GilReleased unlocked;
    if (draining_.exchange(true)) return;
    stop_board_watcher();
    board_->leave();  // no longer a sibling that can take connections
    std::lock_guard<std::mutex> lock(mu_);
    for (std::size_t i = 0; i < listeners_.size(); ++i) {
        ListenerSlot& lst = listeners_[i];
        if (!lst.open) continue;
        epoll_ctl(ep_, EPOLL_CTL_DEL, lst.fd, nullptr);
        // With EPOLLEXCLUSIVE a new connection woke this worker only: take what is queued
        // (bounded) and answer it with Connection: close. Later arrivals wake the others.
        for (int k = 0; k < kDrainBacklogMax; ++k) {
            sockaddr_storage peer{};
            socklen_t peer_len = sizeof peer;
            const int fd = accept4(lst.fd, reinterpret_cast<sockaddr*>(&peer), &peer_len,
                                   SOCK_NONBLOCK | SOCK_CLOEXEC);
            if (fd < 0) break;
            Connection* conn = add_connection(fd, static_cast<int>(i), peer);
            if (conn != nullptr) park_locked(conn, ConnState::idle, true);
        }
        // Closing our descriptor leaves the shared socket (and its queue) to the other
        // workers; shutdown() would break them all.
        ::close(lst.fd);
        lst.open = false;
    }
}

bool Server::drained() {
    std::uint64_t inflight;
    {
        std::lock_guard<std::mutex> lock(stats_mu_);
        inflight = inflight_.size();
    }
    std::lock_guard<std::mutex> lock(mu_);
    return conns_.empty() && inflight == 0;
}

}  // namespace molt::native
