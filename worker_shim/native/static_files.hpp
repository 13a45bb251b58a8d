// Static files (`static:`) without Python: the rules of molt_shim/static.py, in C++.
//
// The two copies are the two languages' one copy each: the Python engine serves the same
// mounts with the same answers (tests/shim/test_static.py runs one table against both). The
// MIME table and the resolved mounts come from Python, so they exist once. Nothing here
// takes the GIL: a static request never runs Python.
#pragma once

#include <cstdint>
#include <string>
#include <unordered_map>
#include <vector>

#include "http_seam.hpp"

namespace molt::native {

struct StaticMount {
    std::string prefix;  // starts and ends with '/'
    std::string root;    // realpath of the directory
};

using MimeTypes = std::unordered_map<std::string, std::string>;

// What to answer: a status, its header lines ("Name: value\r\n", framing headers excluded),
// and the bytes [offset, offset + length) of `fd`, or `body` for the statuses without a file.
class StaticPlan {
  public:
    StaticPlan() = default;
    StaticPlan(const StaticPlan&) = delete;
    StaticPlan& operator=(const StaticPlan&) = delete;
    StaticPlan(StaticPlan&& other) noexcept;
    StaticPlan& operator=(StaticPlan&& other) noexcept;
    ~StaticPlan();

    int status = 404;
    std::string headers;
    int fd = -1;  // owned
    std::uint64_t offset = 0;
    std::uint64_t length = 0;
    std::string body;
};

const char* static_reason(int status);

// The mount serving this request target (longest prefix first, origin-form only), or null.
const StaticMount* match_static(const std::vector<StaticMount>& mounts, const std::string& target);

// The answer to one request under `mount` (see molt_shim/static.py for the rules).
StaticPlan plan_static(const StaticMount& mount, const MimeTypes& types, const Request& req);

// "%41" -> "A"; an invalid escape is kept as written (what urllib's unquote_to_bytes does).
std::string percent_decode(const std::string& path);

}  // namespace molt::native
