// The strict framing check (see framing_guard.hpp). Grammar from RFC 9110 §5.6.2 (token),
// §5.5 (field values) and RFC 9112 §3 (request line), §5.1 (no whitespace before the colon),
// §7.1 (chunk size line).
#include "framing_guard.hpp"

#include <algorithm>
#include <cctype>
#include <cstring>

namespace molt::native {

namespace {

constexpr std::size_t kChunkLineLimit = 4096;

// RFC 9110 §5.6.2: ALPHA, DIGIT and "!#$%&'*+-.^_`|~".
struct TcharTable {
    bool yes[256] = {};
    constexpr TcharTable() {
        for (int c = '0'; c <= '9'; ++c) yes[c] = true;
        for (int c = 'a'; c <= 'z'; ++c) yes[c] = yes[c - 'a' + 'A'] = true;
        for (const char* p = "!#$%&'*+-.^_`|~"; *p != 0; ++p)
            yes[static_cast<unsigned char>(*p)] = true;
    }
};
constexpr TcharTable kTchar;

bool is_token(std::string_view text) {
    if (text.empty()) return false;
    for (const char c : text) {
        if (!kTchar.yes[static_cast<unsigned char>(c)]) return false;
    }
    return true;
}

// VCHAR, obs-text, SP, HTAB: every byte but the other controls and DEL.
bool is_field_text(std::string_view text) {
    for (const char ch : text) {
        const auto c = static_cast<unsigned char>(ch);
        if ((c < 0x20 && c != '\t') || c == 0x7f) return false;
    }
    return true;
}

char lower_ascii(char c) {
    return c >= 'A' && c <= 'Z' ? static_cast<char>(c - 'A' + 'a') : c;
}

// `text` equals the lower-case `word`, ignoring ASCII case.
bool iequals(std::string_view text, std::string_view word) {
    if (text.size() != word.size()) return false;
    for (std::size_t i = 0; i < text.size(); ++i) {
        if (lower_ascii(text[i]) != word[i]) return false;
    }
    return true;
}

// A header field, as views into its line.
struct Field {
    std::string_view name;   // as sent (compare with iequals)
    std::string_view value;  // without the surrounding whitespace
};

std::optional<Field> parse_field(std::string_view line) {
    const auto colon = line.find(':');
    if (colon == std::string_view::npos || !is_token(line.substr(0, colon)) ||
        !is_field_text(line.substr(colon))) {
        return std::nullopt;
    }
    Field field{line.substr(0, colon), {}};
    const auto first = line.find_first_not_of(" \t", colon + 1);
    if (first != std::string_view::npos) {
        field.value = line.substr(first, line.find_last_not_of(" \t") + 1 - first);
    }
    return field;
}

bool all_digits(std::string_view text) {
    return !text.empty() &&
           std::all_of(text.begin(), text.end(), [](char c) { return c >= '0' && c <= '9'; });
}

// The value of a string of at most 18 decimal or 16 hex digits (checked by the caller).
std::uint64_t parse_number(std::string_view digits, int base) {
    std::uint64_t value = 0;
    for (const char c : digits) {
        const int digit = c <= '9' ? c - '0' : lower_ascii(c) - 'a' + 10;
        value = value * static_cast<std::uint64_t>(base) + static_cast<std::uint64_t>(digit);
    }
    return value;
}

}  // namespace

const char* FramingGuard::name(State state) {
    switch (state) {
        case State::head:
            return "head";
        case State::body:
            return "body";
        case State::chunk_size:
            return "chunk size line";
        case State::chunk_data:
            return "chunk data";
        case State::chunk_end:
            return "CRLF after chunk data";
        case State::trailer:
            return "trailer section";
    }
    return "?";
}

std::size_t FramingGuard::limit() const {
    return state_ == State::head ? head_line_limit_ : kChunkLineLimit;
}

std::optional<FramingViolation> FramingGuard::scan(const char* data, std::size_t len) {
    std::size_t i = 0;
    while (!done_ && i < len) {
        if (state_ == State::body || state_ == State::chunk_data) {
            const auto take = static_cast<std::size_t>(std::min<std::uint64_t>(left_, len - i));
            left_ -= take;
            i += take;
            if (left_ == 0) state_ = state_ == State::body ? State::head : State::chunk_end;
            continue;
        }
        const auto* newline = static_cast<const char*>(std::memchr(data + i, '\n', len - i));
        const std::size_t end = newline ? static_cast<std::size_t>(newline - data) : len;
        // The line, read where it lies when it is all in `data` (no copy), else gathered.
        std::string_view text;
        if (newline && line_.empty()) {
            text = std::string_view(data + i, end - i);
        } else {
            line_.append(data + i, end - i);
            text = line_;
        }
        i = newline ? end + 1 : len;
        if (text.size() > limit()) {
            done_ = true;
            if (state_ == State::head) {
                // Longer than max_request_line + max_header_size: over one of them whatever
                // the line is (the library, which counts neither whitespace nor the method,
                // could take it).
                return head_.empty() ? FramingViolation{end, 414, "request line too long"}
                                     : FramingViolation{end, 431, "header field line too long"};
            }
            return FramingViolation{end, 400, std::string(name(state_)) + " too long"};
        }
        if (!newline) return std::nullopt;
        if (text.empty() || text.back() != '\r') {
            done_ = true;
            return FramingViolation{end, 400, std::string("bare LF in the ") + name(state_)};
        }
        text.remove_suffix(1);
        auto verdict = line(text);
        line_.clear();  // after line(): `text` may be a view of it
        if (verdict) {
            done_ = true;
            return FramingViolation{end, verdict->status, std::move(verdict->reason)};
        }
    }
    return std::nullopt;
}

std::optional<FramingGuard::Verdict> FramingGuard::line(std::string_view text) {
    if (text.find('\r') != std::string_view::npos) {
        return Verdict{400, std::string("bare CR in the ") + name(state_)};
    }
    switch (state_) {
        case State::head: {
            if (!text.empty()) {
                head_.append(text);
                head_.push_back('\n');
                return std::nullopt;
            }
            if (head_.empty()) return std::nullopt;  // RFC 9112 §2.2: leading empty lines
            auto verdict = head();
            head_.clear();
            return verdict;
        }
        case State::chunk_end:
            if (!text.empty()) return Verdict{400, "chunk data longer than its size"};
            state_ = State::chunk_size;
            return std::nullopt;
        case State::chunk_size: {
            std::size_t digits = 0;
            while (digits < text.size() &&
                   std::isxdigit(static_cast<unsigned char>(text[digits]))) {
                ++digits;
            }
            if (digits == 0 || digits > 16 || (digits < text.size() && text[digits] != ';') ||
                !is_field_text(text.substr(digits))) {
                return Verdict{400, "invalid chunk size line"};
            }
            left_ = parse_number(text.substr(0, digits), 16);
            state_ = left_ ? State::chunk_data : State::trailer;
            return std::nullopt;
        }
        case State::trailer:
            if (text.empty()) {
                state_ = State::head;
                return std::nullopt;
            }
            if (!parse_field(text)) return Verdict{400, "malformed trailer field"};
            return std::nullopt;
        default:
            return std::nullopt;
    }
}

std::optional<FramingGuard::Verdict> FramingGuard::head() {
    const std::string_view lines(head_);
    std::size_t next = lines.find('\n');
    // method SP target [SP version]: exactly single spaces, a token method, a visible target.
    const std::string_view request_line = lines.substr(0, next);
    ++next;
    const auto first_space = request_line.find(' ');
    if (first_space == std::string_view::npos || !is_token(request_line.substr(0, first_space))) {
        return Verdict{400, "malformed request line"};
    }
    const auto second_space = request_line.find(' ', first_space + 1);
    const std::size_t target_end =
        second_space == std::string_view::npos ? request_line.size() : second_space;
    if (target_end == first_space + 1) return Verdict{400, "malformed request line"};
    for (std::size_t i = first_space + 1; i < target_end; ++i) {
        const auto c = static_cast<unsigned char>(request_line[i]);
        if (c <= 0x20 || c == 0x7f) return Verdict{400, "malformed request line"};
    }
    if (second_space == std::string_view::npos) {
        return Verdict{400, "HTTP/0.9 request line (no version)"};
    }
    const std::string_view version = request_line.substr(second_space + 1);
    if (version.size() != 8 || version.compare(0, 5, "HTTP/") != 0 ||
        !std::isdigit(static_cast<unsigned char>(version[5])) || version[6] != '.' ||
        !std::isdigit(static_cast<unsigned char>(version[7]))) {
        return Verdict{400, "malformed HTTP version"};
    }
    if (version != "HTTP/1.0" && version != "HTTP/1.1") {
        return Verdict{505, "HTTP version " + std::string(version) + " not supported"};
    }
    int hosts = 0;
    int lengths = 0;
    std::string_view length;  // the first Content-Length
    int codings = 0;
    std::string_view coding;  // the first Transfer-Encoding
    while (next < lines.size()) {
        const std::size_t end = lines.find('\n', next);
        const std::string_view line = lines.substr(next, end - next);
        next = end + 1;
        if (line[0] == ' ' || line[0] == '\t') {
            return Verdict{400, "obsolete line folding in a header field"};
        }
        auto field = parse_field(line);
        if (!field) {
            return Verdict{400, "malformed header field (a name is a token followed by ':')"};
        }
        if (iequals(field->name, "host")) {
            ++hosts;
        } else if (iequals(field->name, "content-length")) {
            if (lengths++ == 0) length = field->value;
        } else if (iequals(field->name, "transfer-encoding")) {
            if (codings++ == 0) coding = field->value;
        }
    }
    if (hosts > 1) return Verdict{400, "more than one Host field"};
    if (hosts == 0 && version == "HTTP/1.1") {
        return Verdict{400, "no Host field in an HTTP/1.1 request"};
    }
    if (codings > 0 && lengths > 0) {
        return Verdict{400, "both Content-Length and Transfer-Encoding"};
    }
    if (lengths > 1 || (lengths == 1 && (!all_digits(length) || length.size() > 18))) {
        return Verdict{400, "invalid or repeated Content-Length"};
    }
    if (codings > 0) {
        // The fields' values joined with commas must be exactly `chunked`: one field.
        if (codings > 1 || !iequals(coding, "chunked")) {
            return Verdict{501, "unsupported Transfer-Encoding (only one `chunked`)"};
        }
        state_ = State::chunk_size;
    } else if (lengths == 1) {
        left_ = parse_number(length, 10);
        if (left_) state_ = State::body;
    }
    return std::nullopt;
}

}  // namespace molt::native
