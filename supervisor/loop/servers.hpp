// The master's two small servers, both on the one loop:
//
// * ControlServer: a Unix socket, one JSON request per connection, one JSON answer
//   (docs/control.md). Bounded request size, a deadline to send the request, a cap on
//   concurrent clients: a slow or hostile client can neither block nor crash the master.
// * MetricsServer: GET /metrics in Prometheus text format.
#pragma once

#include <uv.h>

#include <memory>
#include <set>
#include <string>

#include "config/config.hpp"
#include "supervisor/loop/master.hpp"

namespace molt::loop {

class Master;
struct Connection;

// How one server knows that a request is whole, and what it answers when it cannot serve it.
struct Dialect {
    bool (*complete)(const std::string& request);  // the bytes so far hold a whole request
    std::string too_large;                         // the request went over the size cap
    std::string busy;                              // too many clients at once
    std::string (*internal_error)(const std::string& what);  // handle() threw
};

// What the two servers share: accepting with a cap, reading a bounded request with a
// deadline, writing one answer and closing, and removing their socket file at exit. When the
// cap is reached, a newcomer evicts the oldest connection that has not sent a whole request
// yet: a flood of idle connections (from any local user) then costs the flood its own oldest
// connections, never a scrape or a `molt ctl status` that is sending its request.
class OneShotServer {
  public:
    OneShotServer(Master& master, Dialect dialect) : master_(master), dialect_(dialect) {}
    virtual ~OneShotServer();
    void close();
    void forget(Connection* connection);  // after its handles are closed

  protected:
    friend struct Connection;
    virtual void handle(const std::shared_ptr<Connection>& connection,
                        const std::string& request) = 0;

    std::string start(uv_stream_t* server);
    void on_connection();
    bool admit(Connection& newcomer);

    Master& master_;
    const Dialect dialect_;
    uv_stream_t* server_ = nullptr;
    std::set<std::shared_ptr<Connection>> connections_;
    std::uint64_t accepted_ = 0;  // connections accepted so far: the next one's serial
    bool closed_ = false;
    std::string socket_path_;  // a Unix socket file this server bound: removed at exit
};

// A client connection; answer() writes once and closes. The server's set owns it until
// libuv has closed both of its handles; callbacks that may outlive it hold a weak_ptr.
struct Connection : std::enable_shared_from_this<Connection> {
    OneShotServer* server = nullptr;
    union {
        uv_tcp_t tcp;
        uv_pipe_t pipe;
    } handle{};
    uv_timer_t timer{};
    std::string request;
    std::uint64_t serial = 0;      // accept order: the oldest idle connection is evicted first
    bool awaiting_request = true;  // no whole request yet (an idle connection)
    bool answered = false;
    bool closed = false;
    int open_handles = 0;

    uv_stream_t* stream() { return reinterpret_cast<uv_stream_t*>(&handle); }
    void answer(const std::string& text);
    void close();
};

class ControlServer : public OneShotServer {
  public:
    explicit ControlServer(Master& master);
    std::string listen(const std::string& path, std::uint32_t mode);

  private:
    void handle(const std::shared_ptr<Connection>& connection, const std::string& request) override;

    uv_pipe_t pipe_{};
};

class MetricsServer : public OneShotServer {
  public:
    explicit MetricsServer(Master& master);
    std::string listen(const config::ListenAddress& address);
    // The app's metrics (metrics.app_multiprocess) are read; molt's own go out with them.
    void answer_app_metrics(const std::shared_ptr<Connection>& connection,
                            const std::string& app_metrics);

  private:
    void handle(const std::shared_ptr<Connection>& connection, const std::string& request) override;
    void answer_metrics(const std::shared_ptr<Connection>& connection,
                        const std::string& app_metrics);
    void scrape_app_metrics(const std::shared_ptr<Connection>& connection,
                            const Master::AppMetricsScrape& scrape);

    uv_tcp_t tcp_{};
    uv_pipe_t pipe_{};
};

}  // namespace molt::loop
