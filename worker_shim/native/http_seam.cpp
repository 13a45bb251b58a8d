// libhttp-parser behind the RequestParser seam (see http_seam.hpp).
//
// libhttp-parser 2.9 rejects CL+TE, repeated Content-Length, bad chunk sizes, a bare CR and a
// Transfer-Encoding that does not end in chunked. It accepts a bare LF, obs-fold, whitespace
// before a colon and more, so every byte goes through molt's FramingGuard (framing_guard.hpp)
// before the library sees it.
#include "http_seam.hpp"

#include <fcntl.h>
#include <http_parser.h>
#include <stdlib.h>
#include <time.h>
#include <unistd.h>

#include <algorithm>
#include <cctype>
#include <cstring>

namespace molt::native {

namespace {

double monotonic_now() {
    timespec ts{};
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return static_cast<double>(ts.tv_sec) + static_cast<double>(ts.tv_nsec) / 1e9;
}

std::string lower(std::string text) {
    std::transform(text.begin(), text.end(), text.begin(),
                   [](unsigned char c) { return static_cast<char>(std::tolower(c)); });
    return text;
}

std::string trim(const std::string& text) {
    const auto first = text.find_first_not_of(" \t");
    if (first == std::string::npos) return "";
    const auto last = text.find_last_not_of(" \t");
    return text.substr(first, last - first + 1);
}

bool all_digits(const std::string& text) {
    return !text.empty() && std::all_of(text.begin(), text.end(),
                                        [](unsigned char c) { return std::isdigit(c) != 0; });
}

}  // namespace

// --- Body ------------------------------------------------------------------------------------

Body::Body(Body&& other) noexcept
    : memory_(std::move(other.memory_)),
      spool_fd_(std::exchange(other.spool_fd_, -1)),
      size_(std::exchange(other.size_, 0)) {}

Body& Body::operator=(Body&& other) noexcept {
    if (this != &other) {
        if (spool_fd_ >= 0) ::close(spool_fd_);
        memory_ = std::move(other.memory_);
        spool_fd_ = std::exchange(other.spool_fd_, -1);
        size_ = std::exchange(other.size_, 0);
    }
    return *this;
}

Body::~Body() {
    if (spool_fd_ >= 0) ::close(spool_fd_);
}

namespace {
bool write_all(int fd, const char* data, std::size_t len) {
    while (len > 0) {
        const ssize_t n = ::write(fd, data, len);
        if (n < 0) return false;
        data += n;
        len -= static_cast<std::size_t>(n);
    }
    return true;
}
}  // namespace

bool Body::append(const char* data, std::size_t len, std::uint64_t buffer_limit) {
    size_ += len;
    if (spool_fd_ < 0 && size_ > buffer_limit) {
        // Spill to disk: a big upload must not cost its size in RAM per thread.
        const char* dir = getenv("TMPDIR");
        spool_fd_ = ::open(dir && *dir ? dir : "/tmp", O_TMPFILE | O_RDWR | O_CLOEXEC, 0600);
        if (spool_fd_ < 0) return false;
        if (!write_all(spool_fd_, memory_.data(), memory_.size())) return false;
        std::string().swap(memory_);
    }
    if (spool_fd_ >= 0) return write_all(spool_fd_, data, len);
    memory_.append(data, len);
    return true;
}

std::size_t Body::read_at(std::uint64_t offset, char* out, std::size_t len) const {
    if (offset >= size_) return 0;
    len = static_cast<std::size_t>(std::min<std::uint64_t>(len, size_ - offset));
    if (spool_fd_ < 0) {
        std::memcpy(out, memory_.data() + offset, len);
        return len;
    }
    std::size_t done = 0;
    while (done < len) {
        const ssize_t n =
            ::pread(spool_fd_, out + done, len - done, static_cast<off_t>(offset + done));
        if (n <= 0) break;
        done += static_cast<std::size_t>(n);
    }
    return done;
}

// --- the parser ------------------------------------------------------------------------------

struct RequestParser::Impl {
    explicit Impl(RequestParser& owner) : owner(owner) {
        http_parser_init(&parser, HTTP_REQUEST);
        parser.data = this;
        std::memset(&settings, 0, sizeof settings);
        settings.on_message_begin = [](http_parser* p) { return self(p).message_begin(); };
        settings.on_url = [](http_parser* p, const char* at, std::size_t n) {
            return self(p).url(at, n);
        };
        settings.on_header_field = [](http_parser* p, const char* at, std::size_t n) {
            return self(p).header_field(at, n);
        };
        settings.on_header_value = [](http_parser* p, const char* at, std::size_t n) {
            return self(p).header_value(at, n);
        };
        settings.on_headers_complete = [](http_parser* p) { return self(p).headers_complete(); };
        settings.on_body = [](http_parser* p, const char* at, std::size_t n) {
            return self(p).body(at, n);
        };
        settings.on_message_complete = [](http_parser* p) { return self(p).message_complete(); };
    }

    static Impl& self(http_parser* p) { return *static_cast<Impl*>(p->data); }

    // Records the first error; a non-zero return stops the library.
    int fail(int status, std::string reason) {
        if (!owner.error_) owner.error_ = HttpError{status, std::move(reason)};
        return 1;
    }

    int message_begin() {
        owner.current_ = std::make_unique<Request>();
        owner.head_done_ = false;
        field.clear();
        value.clear();
        in_value = false;
        header_count = 0;
        head_size = 0;
        return 0;
    }

    int url(const char* at, std::size_t n) {
        Request& req = *owner.current_;
        req.target.append(at, n);
        if (req.target.size() > owner.limits_.max_request_line) {
            return fail(414, "request line longer than " +
                                 std::to_string(owner.limits_.max_request_line) + " bytes");
        }
        return 0;
    }

    int header_field(const char* at, std::size_t n) {
        if (owner.head_done_) return 0;  // a trailer: never a request header (Host injection)
        if (in_value) {
            if (finish_header() != 0) return 1;
        }
        field.append(at, n);
        return 0;
    }

    int header_value(const char* at, std::size_t n) {
        if (owner.head_done_) return 0;
        in_value = true;
        value.append(at, n);
        return 0;
    }

    // One complete header line: the limits and the framing headers, as the Python engine.
    int finish_header() {
        Request& req = *owner.current_;
        const HttpLimits& lim = owner.limits_;
        in_value = false;
        ++header_count;
        head_size += field.size() + value.size() + 4;
        if (header_count > lim.max_headers) {
            return fail(431, "more than " + std::to_string(lim.max_headers) + " header fields");
        }
        if (head_size > lim.max_header_size) {
            return fail(431, "header section larger than " + std::to_string(lim.max_header_size) +
                                 " bytes");
        }
        const std::string name = lower(field);
        if (name == "transfer-encoding") {
            if (lower(trim(value)) != "chunked") {
                return fail(501, "unsupported Transfer-Encoding '" + value.substr(0, 100) + "'");
            }
            req.chunked = true;
        } else if (name == "content-length") {
            const std::string digits = trim(value);
            if (req.content_length || !all_digits(digits) || digits.size() > 18) {
                return fail(400, "invalid or repeated Content-Length");
            }
            req.content_length = std::stoull(digits);
        } else if (name == "expect" && lower(value) == "100-continue") {
            req.expect_continue = true;
        } else if (name == "connection" && lower(value) == "close") {
            req.asked_close = true;
        }
        req.headers.emplace_back(std::move(field), std::move(value));
        field.clear();
        value.clear();
        return 0;
    }

    // on_headers_complete's return value means something (1: no body), so a failure there
    // returns -1, which the library takes as an error.
    int headers_complete() {
        if (headers_check() == 0) return 0;
        return -1;
    }

    int headers_check() {
        if (in_value && finish_header() != 0) return 1;
        Request& req = *owner.current_;
        if (req.chunked && req.content_length) {
            return fail(400, "both Content-Length and Transfer-Encoding");
        }
        req.method = http_method_str(static_cast<http_method>(parser.method));
        req.version_major = parser.http_major;
        req.version_minor = parser.http_minor;
        // RFC 9112 §6.1: a chunked HTTP/1.0 request is served, then the connection closed.
        req.keep_alive = http_should_keep_alive(&parser) != 0 &&
                         !(req.chunked && parser.http_major == 1 && parser.http_minor == 0);
        req.upgrade = parser.upgrade != 0;  // the library sets it before this callback
        // RFC 9110 §10.1.1: a 100-continue expectation in an HTTP/1.0 request is ignored (such
        // a client may take the 100 for its final response).
        if (parser.http_major == 1 && parser.http_minor == 0) req.expect_continue = false;
        req.started = monotonic_now();
        owner.head_done_ = true;
        const std::uint64_t limit = owner.limits_.max_body_size;
        if (limit && req.content_length && *req.content_length > limit) {
            return fail(413, "Content-Length " + std::to_string(*req.content_length) +
                                 " exceeds max_body_size " + std::to_string(limit));
        }
        if (owner.delivery_ == Delivery::streamed) {
            owner.streamed_body_ = 0;
            req.complete_at_head =
                !req.upgrade && !req.chunked && (!req.content_length || *req.content_length == 0);
            owner.head_complete_ = req.complete_at_head;
            owner.events_.push_back(StreamEvent{StreamEvent::Kind::head, std::move(req), {}});
        }
        return 0;
    }

    int body(const char* at, std::size_t n) {
        const std::uint64_t limit = owner.limits_.max_body_size;
        if (owner.delivery_ == Delivery::streamed) {
            if (limit && owner.streamed_body_ + n > limit) {
                return fail(413, "body exceeds max_body_size " + std::to_string(limit));
            }
            owner.streamed_body_ += n;
            auto& events = owner.events_;
            if (events.empty() || events.back().kind != StreamEvent::Kind::body) {
                events.push_back(StreamEvent{StreamEvent::Kind::body, {}, {}});
            }
            events.back().chunk.append(at, n);
            return 0;
        }
        Request& req = *owner.current_;
        if (limit && req.body.size() + n > limit) {
            return fail(413, "body exceeds max_body_size " + std::to_string(limit));
        }
        if (!req.body.append(at, n, owner.limits_.body_buffer_size)) {
            return fail(500,
                        "could not buffer the request body: " + std::string(std::strerror(errno)));
        }
        return 0;
    }

    int message_complete() {
        if (owner.delivery_ == Delivery::streamed) {
            if (!owner.head_complete_) {
                owner.events_.push_back(StreamEvent{StreamEvent::Kind::end, {}, {}});
            }
        } else {
            owner.ready_.push_back(std::move(*owner.current_));
        }
        owner.current_.reset();
        owner.head_done_ = false;
        if (parser.upgrade) owner.upgrade_ = true;
        return 0;
    }

    RequestParser& owner;
    http_parser parser{};
    http_parser_settings settings{};
    std::string field;
    std::string value;
    bool in_value = false;
    std::uint64_t header_count = 0;
    std::uint64_t head_size = 0;
};

RequestParser::RequestParser(const HttpLimits& limits, Delivery delivery)
    : impl_(std::make_unique<Impl>(*this)),
      limits_(limits),
      delivery_(delivery),
      framing_(limits.max_request_line, limits.max_header_size) {}

RequestParser::~RequestParser() = default;

void RequestParser::feed(const char* data, std::size_t len) {
    // molt's own framing check first: the library sees only what it let through, and its
    // verdict wins over whatever the library would say about the same bytes. What the
    // library stopped at before them comes first in the stream and stands: its own error (a
    // limit's 413 or 431), or an upgrade, after which the bytes are the new protocol's.
    auto violation = framing_.scan(data, len);
    parse(data, violation ? violation->offset : len);
    if (violation && !error_ && !upgrade_) {
        error_ = HttpError{violation->status, "malformed request: " + violation->reason};
    }
}

void RequestParser::parse(const char* data, std::size_t len) {
    if (error_ || upgrade_ || len == 0) return;
    Impl& im = *impl_;
    http_parser_execute(&im.parser, &im.settings, data, len);
    const auto err = HTTP_PARSER_ERRNO(&im.parser);
    if (!error_ && !upgrade_ && err != HPE_OK) {
        const int status = err == HPE_HEADER_OVERFLOW ? 431 : 400;
        error_ = HttpError{status, std::string("malformed request: ") + http_errno_name(err) +
                                       " (" + http_errno_description(err) + ")"};
    }
}

std::pair<std::string, std::string> split_target(const std::string& target) {
    if (!target.empty() && target[0] == '/') {
        const auto query_at = target.find('?');
        std::string path = target.substr(0, query_at);
        std::string query = query_at == std::string::npos ? "" : target.substr(query_at + 1);
        const auto fragment = path.find('#');
        if (fragment != std::string::npos) path.resize(fragment);
        return {path, query};
    }
    http_parser_url url;
    http_parser_url_init(&url);
    if (http_parser_parse_url(target.data(), target.size(), 0, &url) != 0) return {target, ""};
    auto field = [&](int f) -> std::string {
        if (!(url.field_set & (1 << f))) return "";
        return target.substr(url.field_data[f].off, url.field_data[f].len);
    };
    std::string path = field(UF_PATH);
    return {path.empty() ? "/" : path, field(UF_QUERY)};
}

std::string parser_name() {
    const unsigned long v = http_parser_version();
    return "http-parser " + std::to_string((v >> 16) & 255) + "." + std::to_string((v >> 8) & 255) +
           "." + std::to_string(v & 255);
}

}  // namespace molt::native
