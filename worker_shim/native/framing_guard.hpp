// molt's own check of HTTP/1.1 framing, ahead of the parser library (issue 18 points 4, 5).
//
// The library is lenient where a proxy and molt could read one byte stream as different
// requests. The guard reads the same bytes first, line by line, with the strict RFC 9112
// grammar, and names the first violation; the engine answers it (400, or 505 for an
// unsupported version) and closes. The rules are the Python engine's
// (worker_shim/molt_shim/wsgi/framing_guard.py); tests/shim/test_framing.py runs both.
//
// The guard frames bodies (Content-Length, chunked) only to know where the next line starts.
// It never stops guarding on a guess of its own: the bytes after a head that the parser
// library takes for an upgrade are the new protocol's, and the caller (RequestParser::feed)
// ignores a violation that lies after the library's upgrade, or after the library's own
// error. A head line longer than the parser's limits could allow is refused here (414, 431):
// the library does not count what molt's limits count, and would read on.
#pragma once

#include <cstddef>
#include <cstdint>
#include <optional>
#include <string>
#include <string_view>

namespace molt::native {

struct FramingViolation {
    std::size_t offset;  // of the byte where it shows, in the data passed to scan()
    int status;
    std::string reason;
};

class FramingGuard {
  public:
    FramingGuard(std::uint64_t max_request_line, std::uint64_t max_header_size)
        : head_line_limit_(max_request_line + max_header_size + 64) {}

    // The first violation in `data`; after one the guard says nothing more.
    std::optional<FramingViolation> scan(const char* data, std::size_t len);

  private:
    enum class State { head, body, chunk_size, chunk_data, chunk_end, trailer };
    struct Verdict {
        int status;
        std::string reason;
    };

    std::optional<Verdict> line(std::string_view text);
    std::optional<Verdict> head();
    std::size_t limit() const;
    static const char* name(State state);

    State state_ = State::head;
    std::string line_;  // a line begun in an earlier scan()
    std::uint64_t left_ = 0;
    // The head's lines so far, each ended by '\n' (a line never holds one). Cleared, not
    // freed, after each head: no allocation per request once it has grown.
    std::string head_;
    std::uint64_t head_line_limit_;
    bool done_ = false;
};

}  // namespace molt::native
