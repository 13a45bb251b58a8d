// The one seam between the engine and the HTTP/1.1 parser library (libhttp-parser).
//
// The engine speaks in requests and headers: it feeds bytes and takes complete requests (head
// and de-chunked body) or one error with the status to answer. Everything library-specific,
// callbacks and error codes included, stays in http_seam.cpp, so another library (llhttp) can
// replace it behind this header.
#pragma once

#include <cstddef>
#include <cstdint>
#include <deque>
#include <memory>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "framing_guard.hpp"

namespace molt::native {

struct HttpLimits {
    std::uint64_t max_request_line = 8192;
    std::uint64_t max_header_size = 65536;
    std::uint64_t max_headers = 100;
    std::uint64_t max_body_size = 0;           // 0: unlimited
    std::uint64_t body_buffer_size = 1 << 20;  // above it a body spills to a temporary file
};

// A request body: in memory, or in an unlinked temporary file once it grew past the buffer.
class Body {
  public:
    Body() = default;
    Body(const Body&) = delete;
    Body& operator=(const Body&) = delete;
    Body(Body&& other) noexcept;
    Body& operator=(Body&& other) noexcept;
    ~Body();

    // False when the spill file could not be written.
    bool append(const char* data, std::size_t len, std::uint64_t buffer_limit);
    std::uint64_t size() const { return size_; }
    // Copies up to `len` bytes at `offset` into `out`; returns how many.
    std::size_t read_at(std::uint64_t offset, char* out, std::size_t len) const;

  private:
    std::string memory_;
    int spool_fd_ = -1;
    std::uint64_t size_ = 0;
};

struct Request {
    std::string method;
    std::string target;  // the request-target as sent
    int version_major = 1;
    int version_minor = 1;
    bool keep_alive = true;
    bool expect_continue = false;
    bool asked_close = false;  // a Connection header whose value is exactly "close"
    bool upgrade = false;      // the library saw an upgrade (or CONNECT): no more requests follow
    // Delivery::streamed: the head said there is no body (no Content-Length or 0, not
    // chunked, no upgrade), so no end event follows its head event.
    bool complete_at_head = false;
    bool chunked = false;
    std::optional<std::uint64_t> content_length;
    std::vector<std::pair<std::string, std::string>> headers;  // as sent, in order
    Body body;
    double started = 0;  // monotonic seconds when the head was complete
};

struct HttpError {
    int status;
    std::string reason;
};

// Splits a request-target into path and query (origin-form, absolute-form, '*').
std::pair<std::string, std::string> split_target(const std::string& target);

// The name and version of the parser library, for log lines.
std::string parser_name();

// How requests are handed over: whole (head and body together in ready(): the WSGI engine, which
// calls the app once the body is in) or streamed (events(): the head as soon as it is complete,
// then its body as it arrives, then its end: ASGI's receive()).
enum class Delivery { whole, streamed };

struct StreamEvent {
    enum class Kind { head, body, end };
    Kind kind;
    Request head;       // Kind::head: the request without its body
    std::string chunk;  // Kind::body
};

class RequestParser {
  public:
    explicit RequestParser(const HttpLimits& limits, Delivery delivery = Delivery::whole);
    ~RequestParser();
    RequestParser(const RequestParser&) = delete;
    RequestParser& operator=(const RequestParser&) = delete;

    // Parses what arrived; complete requests are appended to ready(). After an error or an
    // upgrade request nothing more is parsed.
    void feed(const char* data, std::size_t len);

    std::deque<Request>& ready() { return ready_; }  // Delivery::whole
    // Delivery::streamed: what feed() parsed, in order; the caller takes them all and clears.
    std::vector<StreamEvent>& events() { return events_; }
    const std::optional<HttpError>& error() const { return error_; }
    bool upgrade() const { return upgrade_; }
    // A request has begun (its head may still be incomplete).
    bool in_request() const { return current_ != nullptr; }
    // The current request's head is complete and its body is being read (Delivery::whole).
    const Request* in_body() const { return head_done_ ? current_.get() : nullptr; }
    // A request's head has begun and is not complete yet.
    bool in_head() const { return current_ != nullptr && !head_done_; }

    struct Impl;

  private:
    void parse(const char* data, std::size_t len);

    std::unique_ptr<Impl> impl_;
    const HttpLimits limits_;
    const Delivery delivery_;
    FramingGuard framing_;
    std::deque<Request> ready_;
    std::vector<StreamEvent> events_;  // a vector: a deque allocated a node for most events
    std::uint64_t streamed_body_ = 0;  // body bytes of the current request (Delivery::streamed)
    bool head_complete_ = false;       // its head event said complete: no end event
    std::unique_ptr<Request> current_;
    bool head_done_ = false;
    bool upgrade_ = false;
    std::optional<HttpError> error_;

    friend struct Impl;
};

}  // namespace molt::native
