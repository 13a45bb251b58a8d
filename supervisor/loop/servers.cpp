#include "supervisor/loop/servers.hpp"

#include <fmt/format.h>
#include <signal.h>

#include <cstdint>
#include <limits>
#include <nlohmann/json.hpp>

#include "supervisor/loop/master.hpp"
#include "supervisor/os/os.hpp"

namespace molt::loop {

namespace {

constexpr std::size_t kMaxRequest = 64 * 1024;
constexpr std::size_t kMaxClients = 256;
constexpr std::uint64_t kRequestDeadlineMs = 5000;
// An answer not taken by its client within this is dropped with the connection: a client that
// never reads must not hold an fd and the answer's memory for ever.
constexpr std::uint64_t kAnswerDeadlineMs = 10000;

using json = nlohmann::json;

// Text from workers (error messages, stderr lines) may not be valid UTF-8: replace, never throw.
std::string dump(const json& body) {
    return body.dump(-1, ' ', false, json::error_handler_t::replace) + "\n";
}

// When a server closes at exit. A file someone already removed is fine; anything else is
// worth a line.
void remove_socket_file(Master& master, const std::string& path) {
    if (auto error = os::remove_file(path); !error.empty()) master.log().warning(error);
}

void on_connection_handle_closed(uv_handle_t* handle) {
    auto* connection = static_cast<Connection*>(handle->data);
    if (--connection->open_handles == 0) connection->server->forget(connection);
}

}  // namespace

// ----- connections -------------------------------------------------------------------------

void Connection::close() {
    if (closed) return;
    closed = true;
    open_handles = 2;
    uv_close(reinterpret_cast<uv_handle_t*>(&timer), on_connection_handle_closed);
    uv_close(reinterpret_cast<uv_handle_t*>(stream()), on_connection_handle_closed);
}

void Connection::answer(const std::string& text) {
    if (answered || closed) return;
    answered = true;
    uv_read_stop(stream());
    struct Write {
        uv_write_t req{};
        std::string data;
        std::shared_ptr<Connection> connection;
    };
    auto* write = new Write{{}, text, shared_from_this()};
    uv_buf_t buf = uv_buf_init(write->data.data(), static_cast<unsigned>(write->data.size()));
    write->req.data = write;
    int rc = uv_write(&write->req, stream(), &buf, 1, [](uv_write_t* req, int) {
        auto* w = static_cast<Write*>(req->data);
        w->connection->close();
        delete w;
    });
    if (rc != 0) {
        write->connection->close();
        delete write;
        return;
    }
    // Closing the stream cancels the write; its callback then runs (and finds it closed).
    uv_timer_start(
        &timer, [](uv_timer_t* t) { static_cast<Connection*>(t->data)->close(); },
        kAnswerDeadlineMs, 0);
}

// ----- the shared server part --------------------------------------------------------------

OneShotServer::~OneShotServer() {
    if (!socket_path_.empty()) remove_socket_file(master_, socket_path_);
}

std::string OneShotServer::start(uv_stream_t* server) {
    server_ = server;
    server_->data = this;
    int rc = uv_listen(server_, 128, [](uv_stream_t* s, int status) {
        if (status == 0) static_cast<OneShotServer*>(s->data)->on_connection();
    });
    if (rc != 0) return fmt::format("listen() failed: {}", uv_strerror(rc));
    return {};
}

void OneShotServer::on_connection() {
    auto connection = std::make_shared<Connection>();
    Connection* c = connection.get();
    c->server = this;
    if (server_->type == UV_TCP) {
        uv_tcp_init(master_.loop(), &c->handle.tcp);
    } else {
        uv_pipe_init(master_.loop(), &c->handle.pipe, 0);
    }
    uv_timer_init(master_.loop(), &c->timer);
    c->stream()->data = c;
    c->timer.data = c;
    connections_.insert(connection);
    if (uv_accept(server_, c->stream()) != 0) {
        c->close();
        return;
    }
    c->serial = accepted_++;
    if (!admit(*c)) return;
    uv_timer_start(
        &c->timer,
        // No complete request in time: hang up without an answer.
        [](uv_timer_t* t) { static_cast<Connection*>(t->data)->close(); }, kRequestDeadlineMs, 0);
    uv_read_start(
        c->stream(),
        [](uv_handle_t*, size_t suggested, uv_buf_t* buf) {
            buf->base = new char[suggested];
            buf->len = suggested;
        },
        [](uv_stream_t* stream, ssize_t nread, const uv_buf_t* buf) {
            auto* c = static_cast<Connection*>(stream->data);
            std::unique_ptr<char[]> owned(buf->base);
            if (c->answered || c->closed) return;
            if (nread > 0) {
                c->request.append(buf->base, static_cast<size_t>(nread));
                if (c->request.size() > kMaxRequest) {
                    c->answer(c->server->dialect_.too_large);
                    return;
                }
                if (!c->server->dialect_.complete(c->request)) return;
            } else if (nread == 0 || c->request.empty()) {
                if (nread < 0) c->close();
                return;
            }
            // A whole request, or EOF after a request without its final newline.
            c->awaiting_request = false;
            uv_timer_stop(&c->timer);
            uv_read_stop(stream);
            try {
                c->server->handle(c->shared_from_this(), c->request);
            } catch (const std::exception& e) {
                // Exceptions stop here: a bad request must never take the master down.
                c->answer(c->server->dialect_.internal_error(e.what()));
            }
        });
}

// Past kMaxClients open connections, the oldest one still waiting for its request is answered
// "busy" and closed to make room; when none is, the oldest whose answer its client has not
// taken yet is closed. Connections whose request is being handled (a `reload --wait` waits for a
// whole rollover) are never evicted; when every connection is such a one, the newcomer is the one
// answered "busy".
bool OneShotServer::admit(Connection& newcomer) {
    std::size_t open = 0;
    Connection* oldest_idle = nullptr;      // still waiting for its request
    Connection* oldest_answered = nullptr;  // its client has not taken all of its answer yet
    auto older = [](Connection* a, Connection* b) { return b == nullptr || a->serial < b->serial; };
    for (const auto& connection : connections_) {
        if (connection->closed) continue;  // on its way out
        ++open;
        Connection* c = connection.get();
        if (c == &newcomer) continue;
        if (c->awaiting_request && older(c, oldest_idle)) oldest_idle = c;
        if (c->answered && older(c, oldest_answered)) oldest_answered = c;
    }
    if (open <= kMaxClients) return true;
    if (oldest_idle != nullptr) {
        oldest_idle->answer(dialect_.busy);
    } else if (oldest_answered != nullptr) {
        oldest_answered->close();  // a reader too slow for its answer, only when none is idle
    } else {
        newcomer.answer(dialect_.busy);
        return false;
    }
    return true;
}

void OneShotServer::forget(Connection* connection) {
    for (auto it = connections_.begin(); it != connections_.end(); ++it) {
        if (it->get() == connection) {
            connections_.erase(it);
            return;
        }
    }
}

void OneShotServer::close() {
    if (closed_) return;
    closed_ = true;
    for (const auto& connection : connections_) connection->close();
    if (server_) uv_close(reinterpret_cast<uv_handle_t*>(server_), nullptr);
}

// ----- control -----------------------------------------------------------------------------

std::string ControlServer::listen(const std::string& path, std::uint32_t mode) {
    // Bound like any listener: a live socket at the path is an error, a stale file is replaced.
    config::ListenAddress address;
    address.kind = config::ListenAddress::Kind::unix_path;
    address.path = path;
    address.text = "unix:" + path;
    address.mode = mode;
    address.backlog = 128;
    auto opened = os::open_listeners({address});
    if (!os::ok(opened)) return "control.socket: " + os::error_of(opened);
    int fd = std::get<0>(opened).front().fd.release();  // libuv owns it from here
    uv_pipe_init(master_.loop(), &pipe_, 0);
    uv_pipe_open(&pipe_, fd);
    socket_path_ = path;  // ours from now on: removed when the master exits
    return start(reinterpret_cast<uv_stream_t*>(&pipe_));
}

ControlServer::ControlServer(Master& master)
    : OneShotServer(
          master,
          Dialect{
              [](const std::string& request) { return request.find('\n') != std::string::npos; },
              dump(json{{"ok", false}, {"error", "request too large"}}),
              dump(json{{"ok", false}, {"error", "too many control clients at once"}}),
              [](const std::string& what) {
                  return dump(json{{"ok", false}, {"error", "internal error: " + what}});
              },
          }) {}

void ControlServer::handle(const std::shared_ptr<Connection>& connection,
                           const std::string& request) {
    auto reply = [&](const json& body) { connection->answer(dump(body)); };
    auto error = [&](const std::string& text) { reply(json{{"ok", false}, {"error", text}}); };
    json parsed = json::parse(request.substr(0, request.find('\n')), nullptr, false);
    if (parsed.is_discarded() || !parsed.is_object() || !parsed.contains("command") ||
        !parsed["command"].is_string()) {
        error("malformed request: send one JSON object with a \"command\" string, then a newline");
        return;
    }
    std::string command = parsed["command"];
    for (const char* flag : {"wait", "fast"}) {
        if (parsed.contains(flag) && !parsed[flag].is_boolean()) {
            error(fmt::format("\"{}\" must be true or false", flag));
            return;
        }
    }
    bool wait = parsed.value("wait", false);
    if (command == "status") {
        json body = master_.status_json();
        body["ok"] = true;
        reply(body);
    } else if (command == "history") {
        reply(json{{"ok", true}, {"history", master_.history_json()}});
    } else if (command == "reload" || command == "rollback") {
        std::optional<std::string> target;
        core::Trigger trigger = core::Trigger::reload;
        if (command == "rollback") {
            target = master_.core().rollback_target();
            if (!target) {
                error(
                    "nothing to roll back to: no earlier generation went live with another "
                    "release directory");
                return;
            }
            trigger = core::Trigger::rollback;
        }
        auto state = master_.core().state();
        if (state != core::MasterState::running && state != core::MasterState::starting) {
            error("the master is stopping; no rollover will start");
            return;
        }
        core::Ticket ticket = master_.request_reload(trigger, target);
        if (!wait) {
            reply(json{{"ok", true},
                       {"started", true},
                       {"ticket", ticket},
                       {"target", target ? json(*target) : json(nullptr)}});
            return;
        }
        std::weak_ptr<Connection> weak = connection;
        master_.on_rollover_finished(ticket, [weak](const core::RolloverFinished& done) {
            auto c = weak.lock();
            if (!c) return;  // the client gave up
            json body{
                {"ok", done.ok}, {"generation", done.generation}, {"took_ms", done.took.count()}};
            if (!done.ok) body["error"] = done.reason;
            c->answer(dump(body));
        });
    } else if (command == "scale") {
        // Range-checked as a 64-bit number first: get<int>() would truncate 2^32 + 2 to 2.
        if (!parsed.contains("workers") || !parsed["workers"].is_number_integer() ||
            parsed["workers"].get<std::int64_t>() < 1 ||
            parsed["workers"].get<std::int64_t>() > config::kMaxWorkers) {
            error(fmt::format("scale needs \"workers\": a whole number from 1 to {}",
                              config::kMaxWorkers));
            return;
        }
        auto state = master_.core().state();
        if (state != core::MasterState::running && state != core::MasterState::starting) {
            error("the master is stopping; it does not scale");
            return;
        }
        master_.scale(parsed["workers"].get<int>());
        reply(json{{"ok", true}, {"workers", master_.core().target_workers()}});
    } else if (command == "stop") {
        reply(json{{"ok", true}, {"stopping", parsed.value("fast", false) ? "fast" : "graceful"}});
        master_.stop(parsed.value("fast", false));
    } else {
        error("unknown command \"" + command +
              "\"; known: status, reload, rollback, scale, stop, history");
    }
}

// ----- metrics -----------------------------------------------------------------------------

std::string MetricsServer::listen(const config::ListenAddress& configured) {
    // Every connection is accepted at once, idle or not: the eviction of idle connections
    // under a flood (eviction below) must see them, and a scrape is no hot path.
    config::ListenAddress address = configured;
    address.defer_accept = config::Duration{0};
    auto opened = os::open_listeners({address});
    if (!os::ok(opened)) return "metrics.listen: " + os::error_of(opened);
    os::Listener& listener = std::get<0>(opened).front();
    if (address.kind == config::ListenAddress::Kind::unix_path) {
        uv_pipe_init(master_.loop(), &pipe_, 0);
        uv_pipe_open(&pipe_, listener.fd.release());
        socket_path_ = address.path;
    } else {
        uv_tcp_init(master_.loop(), &tcp_);
        uv_tcp_open(&tcp_, listener.fd.release());
    }
    std::string error = start(address.kind == config::ListenAddress::Kind::unix_path
                                  ? reinterpret_cast<uv_stream_t*>(&pipe_)
                                  : reinterpret_cast<uv_stream_t*>(&tcp_));
    if (error.empty()) {
        std::string where = listener.bound.rfind("tcp://", 0) == 0
                                ? "http://" + listener.bound.substr(6)
                                : listener.bound;
        master_.log().info(fmt::format("metrics on {}/metrics", where));
    }
    return error;
}

namespace {

std::string empty_http_answer(const char* status) {
    return fmt::format("HTTP/1.1 {}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n", status);
}

}  // namespace

MetricsServer::MetricsServer(Master& master)
    : OneShotServer(master, Dialect{
                                [](const std::string& request) {
                                    return request.find("\r\n\r\n") != std::string::npos ||
                                           request.find("\n\n") != std::string::npos;
                                },
                                empty_http_answer("431 Request Header Fields Too Large"),
                                empty_http_answer("503 Service Unavailable"),
                                [](const std::string&) {
                                    return empty_http_answer("500 Internal Server Error");
                                },
                            }) {}

void MetricsServer::handle(const std::shared_ptr<Connection>& connection,
                           const std::string& request) {
    bool metrics = request.rfind("GET /metrics ", 0) == 0 || request.rfind("GET /metrics?", 0) == 0;
    if (!metrics) {
        std::string body = "molt serves /metrics only\n";
        connection->answer(fmt::format(
            "HTTP/1.1 404 Not Found\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n"
            "Connection: close\r\n\r\n{}",
            body.size(), body));
        return;
    }
    auto scrape = master_.app_metrics_scrape();
    if (!scrape || scrape->dirs.empty()) {
        answer_metrics(connection, "");
        return;
    }
    scrape_app_metrics(connection, *scrape);
}

void MetricsServer::answer_metrics(const std::shared_ptr<Connection>& connection,
                                   const std::string& app_metrics) {
    // molt's own families are read when the answer goes out, after the app's scrape.
    std::string body = master_.metrics_text() + app_metrics;
    connection->answer(
        fmt::format("HTTP/1.1 200 OK\r\nContent-Type: text/plain; version=0.0.4; charset=utf-8\r\n"
                    "Content-Length: {}\r\nConnection: close\r\n\r\n{}",
                    body.size(), body));
}

namespace {

// Run by the configured python: prometheus_client merges the files of every generation that
// still exists (as MultiProcessCollector does for one directory).
constexpr const char* kAppMetricsScript = R"(import glob, sys
from prometheus_client import generate_latest
from prometheus_client.multiprocess import MultiProcessCollector
files = [f for d in sys.argv[1:] for f in glob.glob(d + "/*.db")]
class Collector:
    def collect(self):
        return MultiProcessCollector.merge(files, accumulate=True)
sys.stdout.write(generate_latest(Collector()).decode())
)";

// One scrape of the app's metrics in a child process, never blocking the loop: its output is
// read through a pipe, and a timer bounds it (then molt's own metrics go out alone).
struct AppScrape {
    uv_process_t process{};
    uv_pipe_t out{};
    uv_timer_t timer{};
    std::string output;
    std::weak_ptr<Connection> connection;
    MetricsServer* server = nullptr;
    int open_handles = 3;
    bool answered = false;

    void finish() {
        if (answered) return;
        answered = true;
        if (auto c = connection.lock()) server->answer_app_metrics(c, output);
        uv_timer_stop(&timer);
        close_all();
    }
    void close_all() {
        auto closed = [](uv_handle_t* handle) {
            auto* self = static_cast<AppScrape*>(handle->data);
            if (--self->open_handles == 0) delete self;
        };
        for (auto* handle :
             {reinterpret_cast<uv_handle_t*>(&process), reinterpret_cast<uv_handle_t*>(&out),
              reinterpret_cast<uv_handle_t*>(&timer)}) {
            if (!uv_is_closing(handle)) uv_close(handle, closed);
        }
    }
};

constexpr std::uint64_t kAppScrapeTimeoutMs = 3000;

}  // namespace

void MetricsServer::answer_app_metrics(const std::shared_ptr<Connection>& connection,
                                       const std::string& app_metrics) {
    answer_metrics(connection, app_metrics);
}

void MetricsServer::scrape_app_metrics(const std::shared_ptr<Connection>& connection,
                                       const Master::AppMetricsScrape& scrape) {
    auto* job = new AppScrape;
    job->connection = connection;
    job->server = this;
    uv_loop_t* loop = master_.loop();
    uv_pipe_init(loop, &job->out, 0);
    uv_timer_init(loop, &job->timer);
    job->out.data = job->timer.data = job->process.data = job;

    std::vector<std::string> args = {scrape.python, "-c", kAppMetricsScript};
    for (const auto& dir : scrape.dirs) args.push_back(dir);
    std::vector<char*> argv;
    for (auto& arg : args) argv.push_back(arg.data());
    argv.push_back(nullptr);
    uv_stdio_container_t stdio[3];
    stdio[0].flags = UV_IGNORE;
    stdio[1].flags = static_cast<uv_stdio_flags>(UV_CREATE_PIPE | UV_WRITABLE_PIPE);
    stdio[1].data.stream = reinterpret_cast<uv_stream_t*>(&job->out);
    stdio[2].flags = UV_INHERIT_FD;
    stdio[2].data.fd = 2;
    uv_process_options_t options{};
    options.file = args[0].c_str();
    options.args = argv.data();
    options.stdio = stdio;
    options.stdio_count = 3;
    int rc = uv_spawn(loop, &job->process, &options);
    if (rc != 0) {
        master_.log().warning(fmt::format("metrics.app_multiprocess: cannot run {}: {}",
                                          scrape.python, uv_strerror(rc)));
        job->finish();
        return;
    }
    uv_timer_start(
        &job->timer,
        [](uv_timer_t* timer) {
            auto* self = static_cast<AppScrape*>(timer->data);
            uv_process_kill(&self->process, SIGKILL);
            self->output.clear();  // cut short: molt's own metrics go out alone
            self->finish();
        },
        kAppScrapeTimeoutMs, 0);
    uv_read_start(
        reinterpret_cast<uv_stream_t*>(&job->out),
        [](uv_handle_t*, size_t suggested, uv_buf_t* buf) {
            buf->base = new char[suggested];
            buf->len = suggested;
        },
        [](uv_stream_t* stream, ssize_t nread, const uv_buf_t* buf) {
            std::unique_ptr<char[]> owned(buf->base);
            auto* self = static_cast<AppScrape*>(stream->data);
            if (nread > 0) {
                self->output.append(buf->base, static_cast<size_t>(nread));
            } else if (nread < 0) {
                // The script's stdout closed: it is done. Its exit is not waited for here:
                // the master's reaper (waitpid(-1)) takes every child; a failed script wrote
                // its traceback to stderr and nothing here.
                uv_read_stop(stream);
                self->finish();
            }
        });
}

}  // namespace molt::loop
