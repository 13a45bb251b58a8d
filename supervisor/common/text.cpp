#include "supervisor/common/text.hpp"

#include <cstring>

namespace molt::text {

std::string signal_name(int signal) {
    // sigabbrev_np (glibc 2.32) knows every signal of the platform, real-time ones included,
    // and is safe to call from any thread; it answers without the "SIG" prefix.
    if (const char* abbreviation = ::sigabbrev_np(signal)) {
        return std::string("SIG") + abbreviation;
    }
    return "signal " + std::to_string(signal);
}

std::string truncate_utf8(std::string_view text, std::size_t max) {
    if (text.size() <= max) return std::string(text);
    std::size_t end = max;
    while (end > 0 && (static_cast<unsigned char>(text[end]) & 0xC0) == 0x80) --end;
    return std::string(text.substr(0, end));
}

}  // namespace molt::text
