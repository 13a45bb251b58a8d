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

bool is_tchar(unsigned char c) {
    return std::isalnum(c) != 0 || std::strchr("!#$%&'*+-.^_`|~", c) != nullptr;
}

bool is_token(const std::string& text, std::size_t from, std::size_t to) {
    if (from >= to) return false;
    for (std::size_t i = from; i < to; ++i) {
        if (!is_tchar(static_cast<unsigned char>(text[i]))) return false;
    }
    return true;
}

// VCHAR, obs-text, SP, HTAB: every byte but the other controls and DEL.
bool is_field_text(const std::string& text, std::size_t from) {
    for (std::size_t i = from; i < text.size(); ++i) {
        const auto c = static_cast<unsigned char>(text[i]);
        if ((c < 0x20 && c != '\t') || c == 0x7f) return false;
    }
    return true;
}

struct Field {
    std::string name;   // lower case
    std::string value;  // without the surrounding whitespace
};

std::optional<Field> parse_field(const std::string& line) {
    const auto colon = line.find(':');
    if (colon == std::string::npos || !is_token(line, 0, colon) || !is_field_text(line, colon)) {
        return std::nullopt;
    }
    Field field;
    field.name = line.substr(0, colon);
    std::transform(field.name.begin(), field.name.end(), field.name.begin(),
                   [](unsigned char c) { return static_cast<char>(std::tolower(c)); });
    const auto first = line.find_first_not_of(" \t", colon + 1);
    if (first != std::string::npos) {
        field.value = line.substr(first, line.find_last_not_of(" \t") + 1 - first);
    }
    return field;
}

bool all_digits(const std::string& text) {
    return !text.empty() && std::all_of(text.begin(), text.end(),
                                        [](unsigned char c) { return std::isdigit(c) != 0; });
}

std::string lower(std::string text) {
    std::transform(text.begin(), text.end(), text.begin(),
                   [](unsigned char c) { return static_cast<char>(std::tolower(c)); });
    return text;
}

// Whether a comma-separated field value (Connection) lists `token`, case-insensitively, as
// the parser library reads it.
bool has_token(const std::string& value, const char* token) {
    std::size_t start = 0;
    while (start <= value.size()) {
        std::size_t end = value.find(',', start);
        if (end == std::string::npos) end = value.size();
        std::size_t a = start, b = end;
        while (a < b && (value[a] == ' ' || value[a] == '\t')) ++a;
        while (b > a && (value[b - 1] == ' ' || value[b - 1] == '\t')) --b;
        if (lower(value.substr(a, b - a)) == token) return true;
        start = end + 1;
    }
    return false;
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
        case State::unguarded:
            return "unguarded";
    }
    return "?";
}

std::size_t FramingGuard::limit() const {
    return state_ == State::head ? head_line_limit_ : kChunkLineLimit;
}

std::optional<FramingViolation> FramingGuard::scan(const char* data, std::size_t len) {
    std::size_t i = 0;
    while (!done_ && i < len) {
        if (state_ == State::unguarded) return std::nullopt;
        if (state_ == State::body || state_ == State::chunk_data) {
            const auto take = static_cast<std::size_t>(std::min<std::uint64_t>(left_, len - i));
            left_ -= take;
            i += take;
            if (left_ == 0) state_ = state_ == State::body ? State::head : State::chunk_end;
            continue;
        }
        const auto* newline = static_cast<const char*>(std::memchr(data + i, '\n', len - i));
        const std::size_t end = newline ? static_cast<std::size_t>(newline - data) : len;
        line_.append(data + i, end - i);
        i = newline ? end + 1 : len;
        if (line_.size() > limit()) {
            if (state_ == State::head) {
                // Longer than the parser's own limits allow: its 414 or 431 answers it.
                state_ = State::unguarded;
                line_.clear();
                return std::nullopt;
            }
            done_ = true;
            return FramingViolation{end, 400, std::string(name(state_)) + " too long"};
        }
        if (!newline) return std::nullopt;
        std::string text;
        text.swap(line_);
        if (text.empty() || text.back() != '\r') {
            done_ = true;
            return FramingViolation{end, 400, std::string("bare LF in the ") + name(state_)};
        }
        text.pop_back();
        if (auto verdict = line(text)) {
            done_ = true;
            return FramingViolation{end, verdict->status, std::move(verdict->reason)};
        }
    }
    return std::nullopt;
}

std::optional<FramingGuard::Verdict> FramingGuard::line(const std::string& text) {
    if (text.find('\r') != std::string::npos) {
        return Verdict{400, std::string("bare CR in the ") + name(state_)};
    }
    switch (state_) {
        case State::head: {
            if (!text.empty()) {
                head_.push_back(text);
                return std::nullopt;
            }
            if (head_.empty()) return std::nullopt;  // RFC 9112 §2.2: leading empty lines
            std::vector<std::string> lines;
            lines.swap(head_);
            return head(lines);
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
                !is_field_text(text, digits)) {
                return Verdict{400, "invalid chunk size line"};
            }
            left_ = std::stoull(text.substr(0, digits), nullptr, 16);
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

std::optional<FramingGuard::Verdict> FramingGuard::head(const std::vector<std::string>& lines) {
    // method SP target [SP version]: exactly single spaces, a token method, a visible target.
    const std::string& request_line = lines.front();
    const auto first_space = request_line.find(' ');
    if (first_space == std::string::npos || !is_token(request_line, 0, first_space)) {
        return Verdict{400, "malformed request line"};
    }
    const auto second_space = request_line.find(' ', first_space + 1);
    const std::size_t target_end =
        second_space == std::string::npos ? request_line.size() : second_space;
    if (target_end == first_space + 1) return Verdict{400, "malformed request line"};
    for (std::size_t i = first_space + 1; i < target_end; ++i) {
        const auto c = static_cast<unsigned char>(request_line[i]);
        if (c <= 0x20 || c == 0x7f) return Verdict{400, "malformed request line"};
    }
    if (second_space == std::string::npos) {
        return Verdict{400, "HTTP/0.9 request line (no version)"};
    }
    const std::string version = request_line.substr(second_space + 1);
    if (version.size() != 8 || version.compare(0, 5, "HTTP/") != 0 ||
        !std::isdigit(static_cast<unsigned char>(version[5])) || version[6] != '.' ||
        !std::isdigit(static_cast<unsigned char>(version[7]))) {
        return Verdict{400, "malformed HTTP version"};
    }
    if (version != "HTTP/1.0" && version != "HTTP/1.1") {
        return Verdict{505, "HTTP version " + version + " not supported"};
    }
    int hosts = 0;
    bool upgrade = false;
    bool connection_upgrade = false;
    std::vector<std::string> lengths;
    std::string codings;
    bool has_codings = false;
    for (std::size_t i = 1; i < lines.size(); ++i) {
        const std::string& line = lines[i];
        if (line[0] == ' ' || line[0] == '\t') {
            return Verdict{400, "obsolete line folding in a header field"};
        }
        auto field = parse_field(line);
        if (!field) {
            return Verdict{400, "malformed header field (a name is a token followed by ':')"};
        }
        if (field->name == "host") {
            ++hosts;
        } else if (field->name == "content-length") {
            lengths.push_back(field->value);
        } else if (field->name == "transfer-encoding") {
            codings += (has_codings ? "," : "") + field->value;
            has_codings = true;
        } else if (field->name == "upgrade") {
            upgrade = true;
        } else if (field->name == "connection" && has_token(field->value, "upgrade")) {
            connection_upgrade = true;
        }
    }
    if (hosts > 1) return Verdict{400, "more than one Host field"};
    if (hosts == 0 && version == "HTTP/1.1") {
        return Verdict{400, "no Host field in an HTTP/1.1 request"};
    }
    if (has_codings && !lengths.empty()) {
        return Verdict{400, "both Content-Length and Transfer-Encoding"};
    }
    if (lengths.size() > 1 ||
        (!lengths.empty() && (!all_digits(lengths[0]) || lengths[0].size() > 18))) {
        return Verdict{400, "invalid or repeated Content-Length"};
    }
    if (has_codings) {
        if (lower(codings) != "chunked") {
            return Verdict{501, "unsupported Transfer-Encoding (only one `chunked`)"};
        }
        state_ = State::chunk_size;
    } else if (upgrade && connection_upgrade) {
        // What the parser library takes for an upgrade (both fields): it parses nothing after
        // the head, and the engine answers, then closes or hands the connection over. An
        // Upgrade field alone is an ordinary field: the connection stays open, so what follows
        // is guarded like any other request.
        state_ = State::unguarded;
    } else if (!lengths.empty()) {
        left_ = std::stoull(lengths[0]);
        if (left_) state_ = State::body;
    }
    return std::nullopt;
}

}  // namespace molt::native
