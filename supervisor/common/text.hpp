// Small pure text helpers shared by the core, the loop and the OS layer: no libuv, no syscalls.
#pragma once

#include <cstddef>
#include <string>
#include <string_view>

namespace molt::text {

// "SIGTERM" for a signal the C library knows, "signal 77" otherwise, so that a log line or an
// error text always says which signal it was.
std::string signal_name(int signal);

// At most `max` bytes of `text`, cut before a UTF-8 continuation byte so that no multi-byte
// sequence is split (log lines and JSON built from a worker's words stay valid UTF-8).
std::string truncate_utf8(std::string_view text, std::size_t max);

}  // namespace molt::text
