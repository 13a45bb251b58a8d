// The config loader: YAML -> validated Config, with every error collected.
//
// One table (key_table) lists every key: its dotted path, its type and default for the
// reference, and the function that reads it. Validation, "did you mean" and
// docs/config.md all come from that table, so they cannot disagree. yaml-cpp throws; every
// public function here catches at its boundary.
#include "config/config.hpp"

#include <arpa/inet.h>
#include <fcntl.h>
#include <fmt/format.h>
#include <grp.h>
#include <pwd.h>
#include <sys/stat.h>
#include <unistd.h>
#include <yaml-cpp/yaml.h>

#include <algorithm>
#include <array>
#include <cctype>
#include <cerrno>
#include <charconv>
#include <climits>
#include <cstring>
#include <filesystem>
#include <nlohmann/json.hpp>
#include <tuple>

#include "config/tls_files.hpp"
#include "config/units.hpp"

namespace molt::config {
namespace fs = std::filesystem;
using YAML::Node;

namespace {

constexpr std::size_t kMaxUnixPath = 107;  // sun_path holds 108 bytes with the NUL

// ---------------------------------------------------------------------------------------
// Text helpers

// A value as errors quote it: cut to a readable length, with its true size, so that a 50 MB
// scalar costs one line of error, not 50 MB of log.
constexpr std::size_t kQuotedValueLimit = 80;
constexpr std::size_t kErrorMessageLimit = 400;  // the net for a value quoted without excerpt()

std::string excerpt(std::string_view text, std::size_t limit = kQuotedValueLimit) {
    if (text.size() <= limit) return std::string(text);
    return fmt::format("{}... ({} bytes)", text.substr(0, limit), text.size());
}

std::string describe(const Node& node) {
    switch (node.Type()) {
        case YAML::NodeType::Null:
            return "nothing (null)";
        case YAML::NodeType::Sequence:
            return "a sequence";
        case YAML::NodeType::Map:
            return "a mapping";
        case YAML::NodeType::Scalar:
            return fmt::format("\"{}\"", excerpt(node.Scalar()));
        default:
            return "an undefined value";
    }
}

// Optimal string alignment distance: Levenshtein plus adjacent transpositions, so that
// "wrokers" is one edit from "workers".
std::size_t edit_distance(std::string_view a, std::string_view b) {
    std::vector<std::vector<std::size_t>> d(a.size() + 1, std::vector<std::size_t>(b.size() + 1));
    for (std::size_t i = 0; i <= a.size(); ++i) d[i][0] = i;
    for (std::size_t j = 0; j <= b.size(); ++j) d[0][j] = j;
    for (std::size_t i = 1; i <= a.size(); ++i) {
        for (std::size_t j = 1; j <= b.size(); ++j) {
            const std::size_t cost = a[i - 1] == b[j - 1] ? 0 : 1;
            d[i][j] = std::min({d[i - 1][j] + 1, d[i][j - 1] + 1, d[i - 1][j - 1] + cost});
            if (i > 1 && j > 1 && a[i - 1] == b[j - 2] && a[i - 2] == b[j - 1]) {
                d[i][j] = std::min(d[i][j], d[i - 2][j - 2] + 1);
            }
        }
    }
    return d[a.size()][b.size()];
}

}  // namespace

// Declared in config.hpp: every "did you mean" uses it, the command line's too.
std::optional<std::string> closest(std::string_view word, const std::vector<std::string>& options) {
    // A prefix of three or more letters is a plain abbreviation: "warn" for "warning".
    if (word.size() >= 3) {
        for (const auto& option : options) {
            if (option.starts_with(word)) return option;
        }
    }
    const std::size_t limit = word.size() <= 4 ? 1 : 2;
    std::optional<std::string> best;
    std::size_t best_distance = limit + 1;
    for (const auto& option : options) {
        const std::size_t distance = edit_distance(word, option);
        if (distance < best_distance) {
            best = option;
            best_distance = distance;
        }
    }
    return best;
}

namespace {

std::string join(const std::vector<std::string>& items, std::string_view separator) {
    std::string text;
    for (const auto& item : items) {
        if (!text.empty()) text += separator;
        text += item;
    }
    return text;
}

bool is_identifier(std::string_view text) {
    if (text.empty() || std::isdigit(static_cast<unsigned char>(text[0]))) return false;
    return std::all_of(text.begin(), text.end(), [](char c) {
        return std::isalnum(static_cast<unsigned char>(c)) || c == '_';
    });
}

bool is_dotted_identifier(std::string_view text) {
    while (true) {
        const auto dot = text.find('.');
        if (!is_identifier(text.substr(0, dot))) return false;
        if (dot == std::string_view::npos) return true;
        text.remove_prefix(dot + 1);
    }
}

// "" when `app` is a valid module:callable, else why not. A trailing "()" means a factory
// the shim calls without arguments (gunicorn's `module:create_app()`).
std::string check_app(std::string_view app) {
    const auto colon = app.find(':');
    if (colon == std::string_view::npos) {
        return fmt::format(
            "expected module:callable, e.g. myproject.wsgi:application; \"{}\" has "
            "no `:callable`",
            excerpt(app));
    }
    const auto module = app.substr(0, colon);
    auto callable = app.substr(colon + 1);
    if (!is_dotted_identifier(module)) {
        return fmt::format("\"{}\" is not a Python module path (expected names separated by dots)",
                           excerpt(module));
    }
    if (callable.ends_with("()")) callable.remove_suffix(2);
    if (!is_dotted_identifier(callable)) {
        return fmt::format(
            "\"{}\" is not a Python callable name (expected `name`, `obj.name` or "
            "a factory `name()` without arguments)",
            excerpt(app.substr(colon + 1)));
    }
    return {};
}

std::string os_error(int error_number) {
    return std::strerror(error_number);
}

}  // namespace

// ---------------------------------------------------------------------------------------
// Listen addresses

namespace {

bool parse_port(std::string_view text, std::uint16_t& port) {
    if (text.empty() || text.size() > 5) return false;
    unsigned value = 0;
    const auto [end, ec] = std::from_chars(text.data(), text.data() + text.size(), value);
    if (ec != std::errc{} || end != text.data() + text.size() || value > 65535) return false;
    port = static_cast<std::uint16_t>(value);
    return true;
}

bool is_host_char(char c) {
    return std::isalnum(static_cast<unsigned char>(c)) || c == '.' || c == '-' || c == '_';
}

bool is_ipv6_char(char c) {
    return std::isxdigit(static_cast<unsigned char>(c)) || c == ':' || c == '.' || c == '%';
}

std::string tcp_text(const std::string& host, std::uint16_t port) {
    if (host.find(':') != std::string::npos) return fmt::format("tcp://[{}]:{}", host, port);
    return fmt::format("tcp://{}:{}", host, port);
}

// `rest` is what follows "tcp://" (or a whole gunicorn-style "host:port").
std::optional<ListenAddress> parse_tcp(std::string_view rest, std::string& why) {
    ListenAddress address;
    address.kind = ListenAddress::Kind::tcp;
    std::string_view host;
    std::string_view port;
    if (rest.starts_with('[')) {
        const auto close = rest.find(']');
        if (close == std::string_view::npos) {
            why = "missing `]` after the IPv6 address";
            return std::nullopt;
        }
        host = rest.substr(1, close - 1);
        if (host.empty() || !std::all_of(host.begin(), host.end(), is_ipv6_char)) {
            why = fmt::format("\"{}\" is not an IPv6 address", host);
            return std::nullopt;
        }
        if (rest.substr(close + 1, 1) != ":") {
            why = "missing port: expected [address]:port, e.g. tcp://[::1]:8000";
            return std::nullopt;
        }
        port = rest.substr(close + 2);
    } else {
        const auto colon = rest.rfind(':');
        if (colon == std::string_view::npos) {
            why = "missing port: expected host:port, e.g. tcp://127.0.0.1:8000";
            return std::nullopt;
        }
        host = rest.substr(0, colon);
        port = rest.substr(colon + 1);
        if (host.find(':') != std::string_view::npos) {
            why = "IPv6 addresses need brackets, e.g. tcp://[::1]:8000";
            return std::nullopt;
        }
        if (host.empty() || host == "*") host = "0.0.0.0";
        if (!std::all_of(host.begin(), host.end(), is_host_char)) {
            why = fmt::format("\"{}\" is not a host name or IP address", host);
            return std::nullopt;
        }
    }
    if (!parse_port(port, address.port)) {
        why = fmt::format("invalid port \"{}\": expected a number from 0 to 65535", port);
        return std::nullopt;
    }
    address.host = std::string(host);
    address.text = tcp_text(address.host, address.port);
    return address;
}

std::optional<ListenAddress> parse_unix(std::string_view path, std::string& why) {
    if (path.empty()) {
        why = "missing path: expected unix:/path/to/app.sock";
        return std::nullopt;
    }
    if (path.size() > kMaxUnixPath) {
        why = fmt::format("unix socket path is {} bytes long; the limit is {}", path.size(),
                          kMaxUnixPath);
        return std::nullopt;
    }
    ListenAddress address;
    address.kind = ListenAddress::Kind::unix_path;
    address.path = std::string(path);
    address.text = "unix:" + address.path;
    return address;
}

std::optional<ListenAddress> parse_address_text(std::string_view text, std::string& why) {
    if (text.starts_with("tcp://")) return parse_tcp(text.substr(6), why);
    if (text.starts_with("unix://")) return parse_unix(text.substr(7), why);
    if (text.starts_with("unix:")) return parse_unix(text.substr(5), why);
    if (const auto scheme = text.find("://"); scheme != std::string_view::npos) {
        why = fmt::format("unknown scheme \"{}\": expected tcp://host:port or unix:/path",
                          text.substr(0, scheme));
        return std::nullopt;
    }
    if (text.starts_with('/')) return parse_unix(text, why);
    if (text.empty()) {
        why = "empty address: expected tcp://host:port or unix:/path";
        return std::nullopt;
    }
    return parse_tcp(text, why);
}

}  // namespace

std::optional<ListenAddress> parse_listen_address(const std::string& text, std::string* error) {
    std::string why;
    auto address = parse_address_text(text, why);
    if (!address) {
        if (error != nullptr) *error = why;
        return std::nullopt;
    }
    address->name = address->text;
    return address;
}

// ---------------------------------------------------------------------------------------
// The loading context: where errors go, and the typed readers every key uses.

namespace {

struct ListenDraft {
    ListenAddress address;
    bool explicit_backlog = false;
    bool explicit_name = false;
    YAML::Mark mark;
    std::string key;
};

class Context {
  public:
    std::string file;
    fs::path base_dir;  // relative paths are resolved against it
    bool check_filesystem = true;
    bool has_marks = true;  // false for nodes built from the command line
    std::string key;        // dotted key being read, e.g. "timeouts.boot"
    std::vector<ConfigError> errors;
    std::map<std::string, YAML::Mark> marks;  // where each key's value was, for late checks
    std::vector<ListenDraft> listen;
    bool listen_given = false;
    std::optional<int> global_backlog;

    void error_at(const YAML::Mark& mark, std::string error_key, std::string message) {
        ConfigError error;
        error.file = file;
        if (has_marks && !mark.is_null()) {
            error.line = mark.line + 1;
            error.column = mark.column + 1;
        }
        error.key = excerpt(error_key);
        error.message = excerpt(message, kErrorMessageLimit);
        errors.push_back(std::move(error));
    }
    // An empty value's mark is wherever the next token starts; the key is where to look.
    YAML::Mark key_mark = YAML::Mark::null_mark();

    void error(const Node& node, std::string message) {
        error_at(node.IsNull() ? key_mark : node.Mark(), key, std::move(message));
    }
    // For checks made after reading, at the place the key's value was written.
    void late_error(const std::string& at_key, std::string message) {
        const auto found = marks.find(at_key);
        error_at(found == marks.end() ? YAML::Mark::null_mark() : found->second, at_key,
                 std::move(message));
    }

    std::optional<std::string> scalar(const Node& node, std::string_view expected) {
        if (node.IsScalar()) return node.Scalar();
        error(node, fmt::format("expected {}, got {}", expected, describe(node)));
        return std::nullopt;
    }

    std::optional<std::int64_t> integer(const Node& node, std::int64_t min, std::int64_t max) {
        const auto text = scalar(node, "an integer");
        if (!text) return std::nullopt;
        std::int64_t value = 0;
        const auto* end = text->data() + text->size();
        const auto [ptr, ec] = std::from_chars(text->data(), end, value);
        if (text->empty() || ptr != end || ec == std::errc::invalid_argument) {
            error(node, fmt::format("expected an integer, got {}", describe(node)));
            return std::nullopt;
        }
        if (ec == std::errc::result_out_of_range || value > max) {
            error(node, fmt::format("must be at most {}, got {}", max, excerpt(*text)));
            return std::nullopt;
        }
        if (value < min) {
            error(node, fmt::format("must be at least {}, got {}", min, value));
            return std::nullopt;
        }
        return value;
    }

    template <typename T>
    void set_integer(const Node& node, T& out, std::int64_t min,
                     std::int64_t max = std::numeric_limits<T>::max()) {
        const auto limit = std::min<std::uint64_t>(static_cast<std::uint64_t>(max), INT64_MAX);
        if (auto value = integer(node, min, static_cast<std::int64_t>(limit))) {
            out = static_cast<T>(*value);
        }
    }

    void set_duration(const Node& node, Duration& out, Duration min = Duration{0}) {
        const auto text = scalar(node, kDurationForms);
        if (!text) return;
        const auto value = parse_duration(*text);
        if (!value) {
            error(node, fmt::format("invalid duration \"{}\": expected {}", excerpt(*text),
                                    kDurationForms));
        } else if (*value < min) {
            error(node, min == Duration{1} ? fmt::format("must be greater than 0, got {}", *text)
                                           : fmt::format("must be at least {}, got {}",
                                                         format_duration(min), *text));
        } else {
            out = *value;
        }
    }

    void set_size(const Node& node, std::uint64_t& out, std::uint64_t min = 0) {
        const auto text = scalar(node, kSizeForms);
        if (!text) return;
        const auto value = parse_size(*text);
        if (!value) {
            error(node, fmt::format("invalid size \"{}\": expected {}{}", excerpt(*text),
                                    kSizeForms, ambiguity_hint(*text)));
        } else if (*value < min) {
            error(node, fmt::format("must be at least {}, got {}", format_size(min), *text));
        } else {
            out = *value;
        }
    }

    void set_bool(const Node& node, bool& out) {
        const auto text = scalar(node, "true or false");
        if (!text) return;
        bool value = false;
        if (YAML::convert<bool>::decode(node, value)) {
            out = value;
        } else {
            error(node, fmt::format("expected true or false, got {}", describe(node)));
        }
    }

    void set_string(const Node& node, std::string& out) {
        if (auto text = scalar(node, "a string")) out = std::move(*text);
    }

    // A non-empty path; relative ones are made absolute against the config's directory
    // (lexically: a `current` symlink must stay a symlink, to be resolved per generation).
    std::optional<std::string> path(const Node& node) {
        auto text = scalar(node, "a path");
        if (!text) return std::nullopt;
        if (text->empty()) {
            error(node, "expected a path, got an empty string");
            return std::nullopt;
        }
        return resolve(*text);
    }
    void set_path(const Node& node, std::string& out) {
        if (auto text = path(node)) out = std::move(*text);
    }

    std::string resolve(const std::string& text) const {
        const fs::path path(text);
        auto resolved = (path.is_absolute() ? path : base_dir / path).lexically_normal().string();
        // "dir/." normalises to "dir/"; keep one spelling per directory.
        if (resolved.size() > 1 && resolved.ends_with('/')) resolved.pop_back();
        return resolved;
    }

    // Index of `text` in `options`, with a "did you mean" on a near miss.
    std::optional<std::size_t> choice(const Node& node, const std::vector<std::string>& options) {
        const std::string expected = "one of " + join(options, ", ");
        const auto text = scalar(node, expected);
        if (!text) return std::nullopt;
        const auto found = std::find(options.begin(), options.end(), *text);
        if (found != options.end()) return static_cast<std::size_t>(found - options.begin());
        std::string message = fmt::format("expected {}, got {}", expected, describe(node));
        if (auto near = closest(*text, options))
            message += fmt::format("; did you mean `{}`?", *near);
        error(node, message);
        return std::nullopt;
    }

    // A file mode written as octal digits: "0660", 0660 or 660 (YAML ints are read as
    // their digits, so `mode: 660` means 0660, not decimal 660).
    void set_mode(const Node& node, std::uint32_t& out) {
        const auto text = scalar(node, "an octal file mode like \"0660\"");
        if (!text) return;
        std::string_view digits = *text;
        if (digits.starts_with("0o")) digits.remove_prefix(2);
        std::uint32_t value = 0;
        const auto* end = digits.data() + digits.size();
        const auto [ptr, ec] = std::from_chars(digits.data(), end, value, 8);
        if (digits.empty() || ptr != end || ec != std::errc{} || value > 0777) {
            error(node, fmt::format("expected an octal file mode from 0000 to 0777 like \"0660\", "
                                    "got {}",
                                    describe(node)));
            return;
        }
        out = value;
    }

  private:
    static std::string ambiguity_hint(std::string_view text) {
        const auto unit = text.find_first_not_of("0123456789 ");
        if (unit == std::string_view::npos || text.size() != unit + 1) return {};
        const char letter = static_cast<char>(std::tolower(static_cast<unsigned char>(text[unit])));
        if (std::string_view("kmgt").find(letter) == std::string_view::npos) return {};
        return fmt::format(
            " (\"{}\" is ambiguous: write {}{}iB for 1024-based or {}{}B for "
            "1000-based)",
            text[unit], text.substr(0, unit), static_cast<char>(std::toupper(letter)),
            text.substr(0, unit), static_cast<char>(std::toupper(letter)));
    }
};

}  // namespace

// ---------------------------------------------------------------------------------------
// Readers for the keys that need more than one typed reader.

namespace {

const std::vector<std::string> kAccessLogPlaceholders = {
    "method",     "path",   "query",   "status",   "bytes",      "duration_ms", "remote",
    "generation", "worker", "version", "protocol", "user_agent", "referer"};

bool is_header_token(std::string_view text);

// "" when the access log format only uses known {placeholders}; Python str.format rules:
// "{{" and "}}" are literal braces.
std::string check_access_log_format(std::string_view format) {
    for (std::size_t i = 0; i < format.size(); ++i) {
        if (format.substr(i, 2) == "{{" || format.substr(i, 2) == "}}") {
            ++i;
        } else if (format[i] == '}') {
            return "unmatched `}` (write `}}` for a literal brace)";
        } else if (format[i] == '{') {
            const auto close = format.find('}', i);
            if (close == std::string_view::npos)
                return "unclosed `{` (write `{{` for a literal brace)";
            const std::string name(format.substr(i + 1, close - i - 1));
            // {request_header[x-request-id]} and {response_header[content-type]}: any header.
            for (std::string_view kind : {"request_header[", "response_header["}) {
                if (name.rfind(kind, 0) != 0) continue;
                const std::string header = name.substr(kind.size(), name.size() - kind.size() - 1);
                if (name.back() != ']' || !is_header_token(header)) {
                    return fmt::format(
                        "`{{{}}}`: write `{{{}NAME]}}` with a header name like "
                        "x-request-id",
                        name, kind);
                }
            }
            if (name.rfind("request_header[", 0) == 0 || name.rfind("response_header[", 0) == 0) {
                i = close;
                continue;
            }
            if (std::find(kAccessLogPlaceholders.begin(), kAccessLogPlaceholders.end(), name) ==
                kAccessLogPlaceholders.end()) {
                if (auto near = closest(name, kAccessLogPlaceholders)) {
                    return fmt::format("unknown placeholder `{{{}}}`; did you mean `{{{}}}`?", name,
                                       *near);
                }
                return fmt::format("unknown placeholder `{{{}}}`; known: {{{}}}", name,
                                   join(kAccessLogPlaceholders, "} {"));
            }
            i = close;
        }
    }
    return {};
}

bool is_header_token(std::string_view text) {
    return !text.empty() && std::all_of(text.begin(), text.end(), [](char c) {
        return std::isalnum(static_cast<unsigned char>(c)) ||
               std::string_view("!#$%&'*+-.^_`|~").find(c) != std::string_view::npos;
    });
}

bool is_env_name(std::string_view name) {
    return !name.empty() && name.find('=') == std::string_view::npos &&
           name.find('\0') == std::string_view::npos;
}

// Variables molt sets itself for every worker; a user value would be overwritten or break
// the worker's view of its sockets.
bool is_reserved_env(std::string_view name) {
    return name.starts_with("MOLT_") || name == "NOTIFY_SOCKET" || name == "LISTEN_FDS" ||
           name == "LISTEN_PID" || name == "LISTEN_FDNAMES";
}

void read_env(Context& ctx, const Node& node, Config& config) {
    if (node.IsNull()) return;
    if (!node.IsMap()) {
        ctx.error(node, fmt::format("expected a mapping of NAME: value, got {}", describe(node)));
        return;
    }
    for (const auto& item : node) {
        const std::string name = item.first.IsScalar() ? item.first.Scalar() : "";
        const std::string key = "env." + name;
        if (!is_env_name(name)) {
            ctx.error_at(item.first.Mark(), "env",
                         fmt::format("invalid variable name {}", describe(item.first)));
        } else if (is_reserved_env(name)) {
            ctx.error_at(item.first.Mark(), key,
                         "is set by molt for each worker; choose another name");
        } else if (config.env.count(name) != 0) {
            ctx.error_at(item.first.Mark(), key, "duplicate variable");
        } else if (!item.second.IsScalar()) {
            ctx.error_at(
                item.second.IsNull() ? item.first.Mark() : item.second.Mark(), key,
                fmt::format("expected a string or number (quote it; \"\" for empty), got {}",
                            describe(item.second)));
        } else {
            config.env[name] = item.second.Scalar();
        }
    }
}

// Reads one address string; relative unix paths are resolved like every other path.
std::optional<ListenAddress> read_address(Context& ctx, const Node& node) {
    const auto text = ctx.scalar(node, "an address like tcp://127.0.0.1:8000 or unix:/path");
    if (!text) return std::nullopt;
    std::string why;
    auto address = parse_address_text(*text, why);
    if (address && address->kind == ListenAddress::Kind::unix_path) {
        address = parse_unix(ctx.resolve(address->path), why);
    }
    if (!address) ctx.error(node, fmt::format("invalid address \"{}\": {}", *text, why));
    return address;
}

template <typename Visit>
void for_each_key(Context& ctx, const Node& map, const std::string& spec_prefix,
                  const std::string& display_prefix, Visit visit);

// `listen[].tls`: the files are loaded with OpenSSL here (unless --offline), so a bad one is a
// config error with the file's position, not a worker that cannot start.
void read_tls(Context& ctx, const Node& node, Tls& tls) {
    if (!node.IsMap()) {
        ctx.error(node,
                  fmt::format("expected a mapping with `cert` and `key`, got {}", describe(node)));
        return;
    }
    const std::string key = ctx.key;
    const std::size_t errors_before = ctx.errors.size();
    Node cert_node;
    for_each_key(ctx, node, "listen[].tls", key, [&](const auto& spec, const Node& value) {
        if (spec.path == "listen[].tls.cert") {
            cert_node = value;
            ctx.set_path(value, tls.cert);
        } else if (spec.path == "listen[].tls.key") {
            ctx.set_path(value, tls.key);
        } else if (spec.path == "listen[].tls.client_ca") {
            auto text = ctx.scalar(value, "a path or \"\"");
            if (text && !text->empty()) tls.client_ca = ctx.resolve(*text);
        } else if (spec.path == "listen[].tls.min_version") {
            auto text = ctx.scalar(value, "\"1.2\" or \"1.3\"");
            if (text && *text != "1.2" && *text != "1.3") {
                ctx.error(value,
                          fmt::format("must be \"1.2\" or \"1.3\", got {}", describe(value)));
            } else if (text) {
                tls.min_version = *text;
            }
        }
    });
    ctx.key = key;
    if (tls.cert.empty() || tls.key.empty()) {
        if (ctx.errors.size() == errors_before) ctx.error(node, "needs both `cert` and `key`");
        tls = Tls{};
        return;
    }
    if (ctx.errors.size() != errors_before || !ctx.check_filesystem) return;
    if (const auto why = check_tls_files(tls.cert, tls.key, tls.client_ca); !why.empty()) {
        ctx.key = key + ".cert";
        ctx.error(cert_node, why);
        ctx.key = key;
    }
}

void read_listen_entry(Context& ctx, const Node& node, const std::string& key) {
    ListenDraft draft;
    draft.key = key;
    draft.mark = node.Mark();
    ctx.key = key;
    ctx.marks[key] = node.Mark();
    if (node.IsScalar()) {
        auto address = read_address(ctx, node);
        if (!address) return;
        draft.address = std::move(*address);
        ctx.listen.push_back(std::move(draft));
        return;
    }
    if (!node.IsMap()) {
        ctx.error(node, fmt::format("expected an address or a mapping with `address`, got {}",
                                    describe(node)));
        return;
    }
    const std::size_t errors_before = ctx.errors.size();
    std::optional<ListenAddress> address;
    bool address_given = false;
    std::string defer_accept_key;  // set when given: it is an error on a unix address
    YAML::Mark defer_accept_mark;
    ListenAddress options;
    for_each_key(ctx, node, "listen[]", key, [&](const auto& spec, const Node& value) {
        if (spec.path == "listen[].address") {
            address_given = true;
            address = read_address(ctx, value);
        } else if (spec.path == "listen[].backlog") {
            draft.explicit_backlog = true;
            ctx.set_integer(value, options.backlog, 1);
        } else if (spec.path == "listen[].mode") {
            ctx.set_mode(value, options.mode);
        } else if (spec.path == "listen[].proxy_protocol") {
            ctx.set_bool(value, options.proxy_protocol);
        } else if (spec.path == "listen[].defer_accept") {
            defer_accept_key = ctx.key;
            defer_accept_mark = value.Mark();
            ctx.set_duration(value, options.defer_accept);
        } else if (spec.path == "listen[].tls") {
            read_tls(ctx, value, options.tls);
        } else if (spec.path == "listen[].name") {
            draft.explicit_name = true;
            ctx.set_string(value, options.name);
            if (options.name.empty()) ctx.error(value, "must not be empty");
        }
    });
    if (!address_given) ctx.error_at(node.Mark(), key, "missing `address`");
    if (!defer_accept_key.empty() && address && address->kind != ListenAddress::Kind::tcp) {
        ctx.error_at(defer_accept_mark, defer_accept_key, "applies to TCP addresses only");
    }
    if (!address || ctx.errors.size() != errors_before) return;
    draft.address = std::move(*address);
    draft.address.backlog = options.backlog;
    draft.address.defer_accept = options.defer_accept;
    draft.address.mode = options.mode;
    draft.address.name = options.name;
    draft.address.proxy_protocol = options.proxy_protocol;
    draft.address.tls = std::move(options.tls);
    ctx.listen.push_back(std::move(draft));
}

void read_listen(Context& ctx, const Node& node, Config&) {
    ctx.listen_given = true;
    if (node.IsSequence()) {
        if (node.size() == 0) {
            ctx.error(node, fmt::format("needs at least one address; leave `listen` out for the "
                                        "default {}",
                                        kDefaultListen));
        }
        const std::string list_key = ctx.key;
        for (std::size_t i = 0; i < node.size(); ++i) {
            read_listen_entry(ctx, node[i], fmt::format("{}[{}]", list_key, i));
        }
    } else {
        read_listen_entry(ctx, node, ctx.key);
    }
}

void read_watch(Context& ctx, const Node& node, Config& config) {
    if (node.IsScalar()) {
        if (auto path = ctx.path(node)) config.watch.push_back(std::move(*path));
        return;
    }
    if (!node.IsSequence()) {
        ctx.error(node, fmt::format("expected a path or a list of paths, got {}", describe(node)));
        return;
    }
    const std::string list_key = ctx.key;
    for (std::size_t i = 0; i < node.size(); ++i) {
        ctx.key = fmt::format("{}[{}]", list_key, i);
        if (auto path = ctx.path(node[i])) config.watch.push_back(std::move(*path));
    }
}

// A hook: empty, or `module:function` (a dotted module path and a Python name).
void read_hook(Context& ctx, const Node& node, std::string& out) {
    auto text = ctx.scalar(node, "module:function");
    if (!text) return;
    auto colon = text->find(':');
    if (!text->empty() && (colon == std::string::npos || colon == 0 || colon + 1 == text->size())) {
        ctx.error(node, fmt::format("expected module:function, like myapp.hooks:post_fork, got {}",
                                    describe(node)));
        return;
    }
    out = *text;
}

void read_static_entry(Context& ctx, const Node& node, const std::string& key, Config& config) {
    ctx.key = key;
    ctx.marks[key] = node.Mark();
    if (!node.IsMap()) {
        ctx.error(node, fmt::format("expected a mapping like {{prefix: /static/, dir: static}}, "
                                    "got {}",
                                    describe(node)));
        return;
    }
    const std::size_t errors_before = ctx.errors.size();
    StaticMount mount;
    for_each_key(ctx, node, "static[]", key, [&](const auto& spec, const Node& value) {
        if (spec.path == "static[].prefix") {
            ctx.set_string(value, mount.prefix);
            const auto& p = mount.prefix;
            // Visible ASCII only: a request's path is matched as it arrives, so a prefix with
            // other bytes would never match (clients percent-encode them), and the Python
            // engine could not even compare it (latin-1).
            const bool visible_ascii =
                std::all_of(p.begin(), p.end(), [](char c) { return c > ' ' && c < 0x7f; });
            if (p.empty() || p.front() != '/' || p.back() != '/' || !visible_ascii ||
                p.find_first_of("?#%") != std::string::npos) {
                ctx.error(value, fmt::format("must be a URL path of visible ASCII that starts "
                                             "and ends with `/`, like /static/, got {}",
                                             describe(value)));
            }
        } else if (spec.path == "static[].dir") {
            ctx.set_string(value, mount.dir);
            if (mount.dir.empty()) ctx.error(value, "must not be empty");
        }
    });
    if (ctx.errors.size() != errors_before) return;
    if (mount.prefix.empty()) ctx.error_at(node.Mark(), key, "missing `prefix`");
    if (mount.dir.empty()) ctx.error_at(node.Mark(), key, "missing `dir`");
    for (const auto& other : config.statics) {
        if (other.prefix == mount.prefix) ctx.error_at(node.Mark(), key, "duplicate `prefix`");
    }
    if (ctx.errors.size() == errors_before) config.statics.push_back(std::move(mount));
}

void read_static(Context& ctx, const Node& node, Config& config) {
    if (!node.IsSequence()) {
        ctx.error(node, fmt::format("expected a list of {{prefix, dir}} mappings, got {}",
                                    describe(node)));
        return;
    }
    const std::string list_key = ctx.key;
    for (std::size_t i = 0; i < node.size(); ++i) {
        read_static_entry(ctx, node[i], fmt::format("{}[{}]", list_key, i), config);
    }
}

// Each static directory must exist now: relative ones inside the release directory.
void check_static(Context& ctx, const Config& config) {
    for (std::size_t i = 0; i < config.statics.size(); ++i) {
        const auto& mount = config.statics[i];
        std::error_code release_ec;
        if (fs::path(mount.dir).is_relative() && !fs::is_directory(config.chdir, release_ec)) {
            continue;  // the release itself is missing: `chdir` says so already
        }
        const fs::path dir = fs::path(mount.dir).is_absolute() ? fs::path(mount.dir)
                                                               : fs::path(config.chdir) / mount.dir;
        std::error_code ec;
        if (!fs::is_directory(dir, ec)) {
            ctx.late_error(fmt::format("static[{}].dir", i),
                           fmt::format("\"{}\" is not a directory{}", dir.string(),
                                       fs::path(mount.dir).is_absolute()
                                           ? ""
                                           : " (a relative dir is inside the release, `chdir`)"));
        }
    }
}

// The forwarding headers `proxy.headers` may name (lower case, as in the shim's rule).
constexpr std::array<std::string_view, 5> kForwardingHeaders = {
    "x-forwarded-for", "x-forwarded-proto", "x-forwarded-host", "x-forwarded-port", "forwarded"};

// Whether `text` is an IPv4/IPv6 address, or one with a `/prefix` that fits its family.
bool is_address_or_cidr(const std::string& text) {
    const auto slash = text.find('/');
    const std::string address = text.substr(0, slash);
    unsigned char buffer[sizeof(in6_addr)];
    int max_prefix = 0;
    if (inet_pton(AF_INET, address.c_str(), buffer) == 1) {
        max_prefix = 32;
    } else if (inet_pton(AF_INET6, address.c_str(), buffer) == 1) {
        max_prefix = 128;
    } else {
        return false;
    }
    if (slash == std::string::npos) return true;
    const std::string prefix = text.substr(slash + 1);
    int bits = -1;
    const auto [end, ec] = std::from_chars(prefix.data(), prefix.data() + prefix.size(), bits);
    return ec == std::errc() && end == prefix.data() + prefix.size() && bits >= 0 &&
           bits <= max_prefix;
}

// A scalar or a list of scalars, each checked by `accept` (which reports its own errors).
template <typename Accept>
void read_text_list(Context& ctx, const Node& node, const char* what, Accept accept) {
    if (node.IsScalar()) {
        if (auto text = ctx.scalar(node, what)) accept(node, *text);
        return;
    }
    if (!node.IsSequence()) {
        ctx.error(node, fmt::format("expected {} or a list of them, got {}", what, describe(node)));
        return;
    }
    const std::string list_key = ctx.key;
    for (std::size_t i = 0; i < node.size(); ++i) {
        ctx.key = fmt::format("{}[{}]", list_key, i);
        if (auto text = ctx.scalar(node[i], what)) accept(node[i], *text);
    }
    ctx.key = list_key;
}

void read_proxy_trusted(Context& ctx, const Node& node, Config& config) {
    config.proxy.trusted.clear();
    read_text_list(ctx, node, "an address, a CIDR, `unix` or `*`",
                   [&](const Node& item, const std::string& text) {
                       if (text == "unix" || text == "*" || is_address_or_cidr(text)) {
                           config.proxy.trusted.push_back(text);
                       } else {
                           ctx.error(item, fmt::format("\"{}\" is not an IP address, a CIDR "
                                                       "(10.0.0.0/8), `unix` or `*`",
                                                       excerpt(text)));
                       }
                   });
}

void read_proxy_headers(Context& ctx, const Node& node, Config& config) {
    config.proxy.headers.clear();
    read_text_list(ctx, node, "a forwarding header name", [&](const Node& item, std::string text) {
        std::transform(text.begin(), text.end(), text.begin(),
                       [](unsigned char c) { return static_cast<char>(std::tolower(c)); });
        if (std::find(kForwardingHeaders.begin(), kForwardingHeaders.end(), text) ==
            kForwardingHeaders.end()) {
            ctx.error(item, fmt::format("\"{}\" is not one of x-forwarded-for, x-forwarded-proto, "
                                        "x-forwarded-host, x-forwarded-port, forwarded",
                                        excerpt(text)));
        } else if (std::find(config.proxy.headers.begin(), config.proxy.headers.end(), text) ==
                   config.proxy.headers.end()) {
            config.proxy.headers.push_back(text);
        }
    });
}

void read_app(Context& ctx, const Node& node, Config& config) {
    const auto text = ctx.scalar(node, "module:callable");
    if (!text) return;
    if (const auto why = check_app(*text); !why.empty()) {
        ctx.error(node, why);
    } else {
        config.app = *text;
    }
}

// A python with a slash is a path (resolved like other paths); a bare name such as
// "python3" is kept as written and looked up in PATH.
void read_python(Context& ctx, const Node& node, Config& config) {
    const auto text = ctx.scalar(node, "a path or a command name");
    if (!text) return;
    if (text->empty()) {
        ctx.error(node, "expected a path or a command name, got an empty string");
    } else {
        config.python = text->find('/') == std::string::npos ? *text : ctx.resolve(*text);
    }
}

void read_control_socket(Context& ctx, const Node& node, Config& config) {
    auto path = ctx.path(node);
    if (!path) return;
    if (path->size() > kMaxUnixPath) {
        ctx.error(node, fmt::format("unix socket path is {} bytes long; the limit is {}",
                                    path->size(), kMaxUnixPath));
        return;
    }
    config.control.socket = std::move(*path);
}

void read_metrics_listen(Context& ctx, const Node& node, Config& config) {
    if (auto address = read_address(ctx, node)) {
        address->name = address->text;
        config.metrics.listen = std::move(*address);
    }
}

void read_health_path(Context& ctx, const Node& node, Config& config) {
    const auto text = ctx.scalar(node, "a URL path like /healthz");
    if (!text) return;
    if (!text->empty() &&
        (!text->starts_with('/') || text->find_first_of(" \t\r\n") != std::string::npos)) {
        ctx.error(node, fmt::format("must be a URL path starting with `/`, like /healthz, got {}",
                                    describe(node)));
        return;
    }
    config.health.path = *text;
}

// A header value without control characters (no CR/LF smuggling); names: is_header_token.
bool is_header_value(const std::string& value) {
    return std::none_of(value.begin(), value.end(),
                        [](unsigned char c) { return (c < 0x20 && c != '\t') || c == 0x7f; });
}

void read_health_host(Context& ctx, const Node& node, Config& config) {
    const auto text = ctx.scalar(node, "a host name like myproject.example");
    if (!text) return;
    if (text->empty() || !is_header_value(*text) || text->find(' ') != std::string::npos) {
        ctx.error(node, fmt::format("must be a host name (optionally with :port), got {}",
                                    describe(node)));
        return;
    }
    config.health.host = *text;
}

void read_health_headers(Context& ctx, const Node& node, Config& config) {
    if (node.IsNull()) return;
    if (!node.IsMap()) {
        ctx.error(node,
                  fmt::format("expected a mapping of Header-Name: value, got {}", describe(node)));
        return;
    }
    for (const auto& item : node) {
        const std::string name = item.first.IsScalar() ? item.first.Scalar() : "";
        const std::string key = "health.headers." + name;
        std::string lower = name;
        std::transform(lower.begin(), lower.end(), lower.begin(),
                       [](unsigned char c) { return static_cast<char>(std::tolower(c)); });
        if (!is_header_token(name)) {
            ctx.error_at(item.first.Mark(), "health.headers",
                         fmt::format("invalid header name {}", describe(item.first)));
        } else if (lower == "host" || lower == "content-length" || lower == "connection" ||
                   lower == "transfer-encoding") {
            ctx.error_at(item.first.Mark(), key,
                         lower == "host" ? "set it with health.host"
                                         : "is set by molt for the warm-up request");
        } else if (!item.second.IsScalar() || !is_header_value(item.second.Scalar())) {
            ctx.error_at(item.second.IsNull() ? item.first.Mark() : item.second.Mark(), key,
                         fmt::format("expected a header value without control characters, got {}",
                                     describe(item.second)));
        } else {
            config.health.headers[name] = item.second.Scalar();
        }
    }
}

void read_version_file(Context& ctx, const Node& node, Config& config) {
    const auto text = ctx.scalar(node, "a path relative to the release directory");
    if (!text) return;
    if (text->empty() || fs::path(*text).is_absolute()) {
        ctx.error(node, fmt::format("must be a path relative to the release directory (`chdir`), "
                                    "like REVISION, got {}",
                                    describe(node)));
        return;
    }
    config.version_file = *text;
}

void read_name(Context& ctx, const Node& node, std::string& out) {
    const auto text = ctx.scalar(node, "a name");
    if (!text) return;
    if (text->empty()) {
        ctx.error(node, "must not be empty");
        return;
    }
    out = *text;
}

}  // namespace

// ---------------------------------------------------------------------------------------
// The key table: the one list of keys for validation, "did you mean" and the reference.

namespace {

using Apply = void (*)(Context&, const Node&, Config&);
using ShowDefault = std::string (*)(const Config&);

std::string accepting_workers_text(int n) {
    if (n == kAcceptingAuto) return "`auto`";
    if (n == kAcceptingAll) return "`all`";
    return fmt::format("`{}`", n);
}

struct KeySpec {
    std::string_view path;  // dotted; "listen[].x" are keys of a listen mapping entry
    std::string_view type;  // "section" for mappings of further keys
    ShowDefault show_default;
    std::string_view meaning;
    Apply apply;  // null for sections and listen entry keys (read by read_listen_entry)
};

std::string none(const Config&) {
    return "(none)";
}
std::string quoted(const std::string& text) {
    return "`" + text + "`";
}
std::string octal(std::uint32_t mode) {
    return fmt::format("`{:04o}`", mode);
}

const std::vector<KeySpec>& key_table() {
    static const std::vector<KeySpec> table = {
        {"app", "module:callable", [](const Config&) -> std::string { return "(required)"; },
         "The application: a dotted module path, `:`, and a callable in it, e.g. "
         "`myproject.wsgi:application`. `module:create_app()` calls a factory without arguments.",
         read_app},
        {"interface", "`wsgi` or `asgi`", [](const Config&) -> std::string { return "`wsgi`"; },
         "How the worker calls the application.",
         [](Context& ctx, const Node& n, Config& c) {
             if (auto i = ctx.choice(n, {"wsgi", "asgi"})) c.interface = static_cast<Interface>(*i);
         }},
        {"engine", "`auto`, `native` or `python`",
         [](const Config&) -> std::string { return "`auto`"; },
         "The WSGI data path inside each worker. `native` serves requests with the C++ engine "
         "(the `_molt_native` extension installed with the shim); when it cannot load for the "
         "configured interpreter the worker logs why in one line and uses the Python engine. "
         "`python` always uses the Python engine. `auto` is `native` whenever the extension "
         "loads, else `python` (with one info line). Both engines serve the same requests with "
         "the same answers (the shim's conformance suite runs against each). "
         "ASGI apps always use the Python side.",
         [](Context& ctx, const Node& n, Config& c) {
             if (auto i = ctx.choice(n, {"auto", "native", "python"})) {
                 c.engine = static_cast<Engine>(*i);
             }
         }},
        {"lifespan", "`auto`, `on` or `off`", [](const Config&) -> std::string { return "`auto`"; },
         "The ASGI lifespan protocol (uvicorn's meaning). `auto`: run it, and when the app raises "
         "on the lifespan scope (as Django does) serve without it, with one log line. `on`: such "
         "an app fails its boot. `off`: never send it. Under `auto` and `on`, an app that "
         "reports `lifespan.startup.failed` fails the worker's boot with exit code 5. WSGI apps "
         "ignore it.",
         [](Context& ctx, const Node& n, Config& c) {
             if (auto i = ctx.choice(n, {"auto", "on", "off"})) {
                 c.lifespan = static_cast<Lifespan>(*i);
             }
         }},
        {"preload", "`auto`, `true` or `false`",
         [](const Config&) -> std::string { return "`auto`"; },
         "Import each release once, in a per-generation zygote, and fork the generation's "
         "workers from it (copy-on-write memory, a crashed worker is re-forked, not re-imported). "
         "Every reload starts a new zygote on the new release, so new code always loads. `auto`: "
         "preload unless the import left the process unsafe to fork (a thread other than the "
         "main one, an open socket or event loop); then every worker imports the app itself, "
         "and the log names what was found. `true`: fork anyway, with a warning naming it. "
         "`false`: every worker imports the app itself.",
         [](Context& ctx, const Node& n, Config& c) {
             auto text = ctx.scalar(n, "auto, true or false");
             if (!text) return;
             bool value = false;
             if (*text == "auto") {
                 c.preload = Preload::auto_;
             } else if (YAML::convert<bool>::decode(n, value)) {
                 c.preload = value ? Preload::on : Preload::off;
             } else {
                 ctx.error(n, fmt::format("expected auto, true or false, got {}", describe(n)));
             }
         }},
        {"preload_standby", "boolean",
         [](const Config& c) { return fmt::format("`{}`", c.preload_standby); },
         "With preload, each zygote forks a standby before it imports its release: a paused "
         "copy with the interpreter and molt's code loaded, which the next reload turns into "
         "its zygote instead of starting Python again when `python`, `user`, `group` and "
         "`env` are unchanged. A reload is then faster by the interpreter's start-up (about "
         "100 ms here); the standby holds the pages the zygote's import changes after the fork "
         "(about 3 MiB). `false`: every zygote is a new interpreter.",
         [](Context& ctx, const Node& n, Config& c) { ctx.set_bool(n, c.preload_standby); }},
        {"hooks", "section", nullptr,
         "Python callables, `module:function`, that the worker calls at fork-sensitive moments "
         "(imported from the release like the app).",
         nullptr},
        {"hooks.post_fork", "module:function", none,
         "Called with no arguments in each worker after it was forked from the zygote (or, "
         "without preload, after its import), before the warm-up request: reopen database "
         "connections, reseed what needs it, replace sockets opened at import. An exception "
         "fails the worker's boot.",
         [](Context& ctx, const Node& n, Config& c) { read_hook(ctx, n, c.hooks.post_fork); }},
        {"hooks.worker_exit", "module:function", none,
         "Called with no arguments in each worker after its drain, before it exits.",
         [](Context& ctx, const Node& n, Config& c) { read_hook(ctx, n, c.hooks.worker_exit); }},
        {"root_path", "URL path", none,
         "The URL prefix the app is mounted under behind a proxy that strips it: `SCRIPT_NAME` "
         "for WSGI apps, the scope's `root_path` for ASGI apps (uvicorn's `--root-path`). Empty "
         "or starting with `/`.",
         [](Context& ctx, const Node& n, Config& c) {
             auto text = ctx.scalar(n, "a URL path like /api");
             if (!text) return;
             if (!text->empty() && !text->starts_with('/')) {
                 ctx.error(n, fmt::format("must be empty or a URL path starting with `/`, like "
                                          "/api, got {}",
                                          describe(n)));
                 return;
             }
             while (text->size() > 1 && text->ends_with('/')) text->pop_back();
             c.root_path = *text == "/" ? "" : *text;
         }},
        {"static", "list of mappings", [](const Config&) -> std::string { return "`[]`"; },
         "Static files served by the WSGI engine itself, without calling the app (what "
         "WhiteNoise or uWSGI's `static-map` do): each entry maps a URL `prefix` to a `dir`. "
         "GET and HEAD only, with ETag/Last-Modified and conditional requests, single byte "
         "ranges, and precompressed `.br`/`.gz` siblings chosen by Accept-Encoding. Paths that "
         "leave the directory (`..`, symlinks out of it) and directories are 404. The native "
         "engine serves them without taking the GIL. See docs/static.md.",
         read_static},
        {"static[].prefix", "URL path", [](const Config&) -> std::string { return "(required)"; },
         "The URL prefix, visible ASCII starting and ending with `/`, e.g. `/static/`; matched "
         "against the request path as received (before `root_path` is stripped). The longest "
         "prefix wins.",
         nullptr},
        {"static[].dir", "path", [](const Config&) -> std::string { return "(required)"; },
         "The directory served. A relative path is inside the release directory (`chdir`), so "
         "each generation serves its own release's files. It must exist (`molt check --offline` "
         "skips that check); a worker whose static directory is missing fails its boot.",
         nullptr},
        {"chdir", "path",
         [](const Config&) -> std::string { return "the config file's directory"; },
         "The release directory the workers run in. Resolved with realpath when each generation "
         "starts, so pointing it at a `current` symlink picks up each new release. It may also "
         "be a single `.pyz` or `.zip` archive (imported through zipimport; the workers run in "
         "the directory that holds it).",
         [](Context& ctx, const Node& n, Config& c) { ctx.set_path(n, c.chdir); }},
        {"python", "path or command", [](const Config& c) { return quoted(c.python); },
         "The Python interpreter that runs the workers, e.g. a virtualenv's `bin/python`. A bare "
         "name is looked up in `PATH`.",
         read_python},
        {"env", "mapping of strings", [](const Config&) -> std::string { return "`{}`"; },
         "Extra environment variables for the workers. Values must be scalars; `MOLT_*`, "
         "`NOTIFY_SOCKET` and `LISTEN_*` are reserved.",
         read_env},
        {"listen", "address, or list of addresses or mappings",
         [](const Config&) -> std::string { return quoted(kDefaultListen); },
         "Where to accept connections. Each entry is an address string or a mapping with the "
         "`listen[].*` keys below. Ignored for sockets passed by systemd (`LISTEN_FDS`).",
         read_listen},
        {"listen[].address", "address", [](const Config&) -> std::string { return "(required)"; },
         "`tcp://host:port`, `tcp://[::1]:port` or `unix:/path`.", nullptr},
        {"listen[].backlog", "integer >= 1",
         [](const Config&) -> std::string { return "top-level `backlog`"; },
         "The listen queue length for this address.", nullptr},
        {"listen[].mode", "octal mode", [](const Config&) { return octal(ListenAddress{}.mode); },
         "File mode of a unix socket.", nullptr},
        {"listen[].name", "string", [](const Config&) -> std::string { return "the address text"; },
         "Name matched against systemd's `LISTEN_FDNAMES`, and passed to workers.", nullptr},
        {"listen[].proxy_protocol", "boolean",
         [](const Config&) -> std::string { return "`false`"; },
         "Every connection on this address starts with a PROXY protocol header (v1 or v2, as "
         "HAProxy and AWS NLB send it), which names the client. A connection without a valid "
         "header is closed without a response, logged once per burst. Every engine reads it. "
         "Together with `tls` (a load balancer passing TLS through, the header in the clear "
         "before the handshake) it needs the native engine: `engine: native` or `auto`, "
         "interface wsgi.",
         nullptr},
        {"listen[].defer_accept", "duration",
         [](const Config&) -> std::string { return format_duration(ListenAddress{}.defer_accept); },
         "TCP only: the kernel hands a connection to a worker only once its first bytes have "
         "arrived (`TCP_DEFER_ACCEPT`, nginx's `deferred`), so a worker never wakes for a "
         "connection that has nothing to read yet; a client that sends nothing is accepted "
         "after about this long (whole seconds, rounded up), and `http.header_timeout` runs "
         "from then; a worker reads such a connection in the wake-up that accepted it. `0` "
         "turns it off. Sockets passed by systemd keep their own setting "
         "(`DeferAcceptSec=`).",
         nullptr},
        {"listen[].tls", "section", nullptr,
         "TLS on this address (HTTPS). The workers of each generation load the files when they "
         "start, so replacing them and sending HUP rotates the certificate; the master loads "
         "them first, and a file it cannot load, or a key that does not match, fails the "
         "check (and the reload, keeping the old generation). See docs/proxy-tls.md.",
         nullptr},
        {"listen[].tls.cert", "path", none,
         "PEM certificate chain, the server's certificate first (required with `tls`).", nullptr},
        {"listen[].tls.key", "path", none, "PEM private key of the certificate (required).",
         nullptr},
        {"listen[].tls.client_ca", "path", none,
         "PEM CA certificates for mutual TLS: clients must present a certificate they signed; "
         "the verified subject reaches WSGI apps as `SSL_CLIENT_S_DN`, ASGI apps in "
         "`scope[\"extensions\"][\"tls\"]`. Empty: no client certificates asked for.",
         nullptr},
        {"listen[].tls.min_version", "`\"1.2\"` or `\"1.3\"`",
         [](const Config&) -> std::string { return "`\"1.2\"`"; }, "Oldest TLS version accepted.",
         nullptr},
        {"backlog", "integer >= 1",
         [](const Config&) { return std::to_string(ListenAddress{}.backlog); },
         "Default listen queue length for every `listen` entry (the kernel caps it at "
         "`net.core.somaxconn`).",
         [](Context& ctx, const Node& n, Config&) {
             int backlog = 0;
             ctx.set_integer(n, backlog, 1);
             if (backlog > 0) ctx.global_backlog = backlog;
         }},
        {"workers", "integer, 1 to 1024", [](const Config& c) { return std::to_string(c.workers); },
         "Worker processes per generation.",
         [](Context& ctx, const Node& n, Config& c) {
             ctx.set_integer(n, c.workers, 1, kMaxWorkers);
         }},
        {"threads", "integer >= 1", [](const Config& c) { return std::to_string(c.threads); },
         "Request threads per WSGI worker.",
         [](Context& ctx, const Node& n, Config& c) { ctx.set_integer(n, c.threads, 1); }},
        {"accepting_workers", "auto, all or integer >= 1",
         [](const Config& c) { return accepting_workers_text(c.accepting_workers); },
         "How many of a generation's workers take new connections while they can. The others "
         "are a reserve: each stays out of the accept queue while that many workers ahead of "
         "it can accept, and steps in when one of them cannot (its stamp 0.5 s old: hung in "
         "the app, stopped, gone; every thread busy; draining), within 0.1 s. `auto`: for "
         "ASGI, one per CPU molt may run on (its affinity, capped by a cgroup CPU quota), so "
         "that a machine with fewer cores than workers does not share them between more busy "
         "event loops than it can run at once (measured, 4 workers on 2 cores: a quarter less "
         "CPU per keep-alive request); for WSGI, every worker (a threaded worker's "
         "concurrency is its threads, and its kept-alive connections wait for them). `all`: "
         "every worker takes them, spread by connection count.",
         [](Context& ctx, const Node& n, Config& c) {
             auto text = ctx.scalar(n, "auto, all or an integer >= 1");
             if (!text) return;
             if (*text == "auto") {
                 c.accepting_workers = kAcceptingAuto;
             } else if (*text == "all") {
                 c.accepting_workers = kAcceptingAll;
             } else if (long long number = 0; YAML::convert<long long>::decode(n, number)) {
                 ctx.set_integer(n, c.accepting_workers, 1, kMaxWorkers);
             } else {
                 ctx.error(
                     n, fmt::format("expected auto, all or an integer >= 1, got {}", describe(n)));
             }
         }},
        {"timeouts", "section", nullptr, "Time limits.", nullptr},
        {"timeouts.boot", "duration > 0",
         [](const Config& c) { return format_duration(c.timeouts.boot); },
         "From spawning a worker to its `READY=1`. A new generation whose workers miss it fails "
         "and the old one keeps serving.",
         [](Context& ctx, const Node& n, Config& c) {
             ctx.set_duration(n, c.timeouts.boot, Duration{1});
         }},
        {"timeouts.graceful", "duration > 0",
         [](const Config& c) { return format_duration(c.timeouts.graceful); },
         "From `DRAIN` to SIGKILL: how long in-flight requests get to finish. A worker stops "
         "waiting for them a little before (a quarter of it, at most 1s), aborts what is left "
         "(an ASGI app's tasks are cancelled), and uses that time for the ASGI lifespan "
         "shutdown and `hooks.worker_exit`.",
         [](Context& ctx, const Node& n, Config& c) {
             ctx.set_duration(n, c.timeouts.graceful, Duration{1});
         }},
        {"timeouts.heartbeat", "duration >= 1s",
         [](const Config& c) { return format_duration(c.timeouts.heartbeat); },
         "A worker silent this long gets SIGABRT (the shim dumps every thread's traceback), then "
         "SIGKILL. Workers beat every heartbeat/6, between 100ms and 5s.",
         [](Context& ctx, const Node& n, Config& c) {
             ctx.set_duration(n, c.timeouts.heartbeat, std::chrono::seconds(1));
         }},
        {"timeouts.request", "duration",
         [](const Config& c) { return format_duration(c.timeouts.request); },
         "A worker whose oldest request runs longer is aborted like a silent one; a request runs "
         "from when its app starts (a WSGI request's body is read before, at the client's pace). "
         "0 turns it off.",
         [](Context& ctx, const Node& n, Config& c) { ctx.set_duration(n, c.timeouts.request); }},
        {"timeouts.keepalive", "duration",
         [](const Config& c) { return format_duration(c.timeouts.keepalive); },
         "How long an idle keep-alive connection stays open: from when the last response has "
         "been handed to the kernel (a large response still going out to a slow client is not "
         "idle; `http.send_timeout` watches it; on ASGI's h11 fallback, from when it is handed "
         "to the transport) until the next request begins. Empty lines between requests do not "
         "count as one. 0 closes after each response.",
         [](Context& ctx, const Node& n, Config& c) { ctx.set_duration(n, c.timeouts.keepalive); }},
        {"health", "section", nullptr, "The warm-up request.", nullptr},
        {"health.path", "URL path",
         [](const Config& c) {
             return c.health.path.empty() ? std::string("(none)") : quoted(c.health.path);
         },
         "A GET request each worker runs against its own app before `READY=1`; if it fails, "
         "the worker's boot fails. Empty: no warm-up request.",
         read_health_path},
        {"health.host", "host name", [](const Config& c) { return quoted(c.health.host); },
         "The warm-up request's `Host` header. Django checks it against `ALLOWED_HOSTS`: set one "
         "of your real host names here.",
         read_health_host},
        {"health.headers", "mapping of strings",
         [](const Config&) -> std::string { return "`{}`"; },
         "Extra headers of the warm-up request, e.g. `{X-Forwarded-Proto: https}` for an app "
         "that redirects plain HTTP. `Host` is `health.host`.",
         read_health_headers},
        {"rollover", "section", nullptr, "How a reload replaces workers.", nullptr},
        {"rollover.batch", "integer >= 0",
         [](const Config& c) { return std::to_string(c.rollover.batch); },
         "Replace workers this many at a time, for hosts that cannot hold two generations in "
         "memory. 0 starts the whole new generation at once.",
         [](Context& ctx, const Node& n, Config& c) { ctx.set_integer(n, c.rollover.batch, 0); }},
        {"recycle", "section", nullptr,
         "When a worker is replaced by a fresh one (the new one "
         "is ready before the old one drains).",
         nullptr},
        {"recycle.max_requests", "integer >= 0",
         [](const Config& c) { return std::to_string(c.recycle.max_requests); },
         "Requests a worker serves before it is replaced. 0 turns it off.",
         [](Context& ctx, const Node& n, Config& c) {
             ctx.set_integer(n, c.recycle.max_requests, 0);
         }},
        {"recycle.max_requests_jitter", "integer >= 0",
         [](const Config& c) { return std::to_string(c.recycle.max_requests_jitter); },
         "A random 0..N added to `max_requests` per worker, so workers do not all restart at once.",
         [](Context& ctx, const Node& n, Config& c) {
             ctx.set_integer(n, c.recycle.max_requests_jitter, 0);
         }},
        {"recycle.max_rss", "size", [](const Config& c) { return format_size(c.recycle.max_rss); },
         "Resident memory above which a worker is replaced. 0 turns it off.",
         [](Context& ctx, const Node& n, Config& c) { ctx.set_size(n, c.recycle.max_rss); }},
        {"recycle.max_lifetime", "duration",
         [](const Config& c) { return format_duration(c.recycle.max_lifetime); },
         "Age after which a worker is replaced. 0 turns it off.",
         [](Context& ctx, const Node& n, Config& c) {
             ctx.set_duration(n, c.recycle.max_lifetime);
         }},
        {"control", "section", nullptr, "The control socket used by `molt ctl`.", nullptr},
        {"control.socket", "path", none,
         "Unix socket path for `molt ctl`. Empty: no control socket.", read_control_socket},
        {"control.mode", "octal mode", [](const Config& c) { return octal(c.control.mode); },
         "File mode of the control socket.",
         [](Context& ctx, const Node& n, Config& c) { ctx.set_mode(n, c.control.mode); }},
        {"metrics", "section", nullptr, "The Prometheus endpoint.", nullptr},
        {"metrics.listen", "address", none,
         "Address serving metrics in Prometheus text format. Empty: no metrics endpoint.",
         read_metrics_listen},
        {"metrics.app_multiprocess", "boolean",
         [](const Config& c) { return fmt::format("`{}`", c.metrics.app_multiprocess); },
         "Give each generation its own `PROMETHEUS_MULTIPROC_DIR` (for `prometheus_client` in "
         "multiprocess mode), mark dead workers, remove the directory when the generation is "
         "gone, and serve the app's metrics on `metrics.listen` beside molt's own.",
         [](Context& ctx, const Node& n, Config& c) {
             ctx.set_bool(n, c.metrics.app_multiprocess);
         }},
        {"logging", "section", nullptr, "Logs.", nullptr},
        {"logging.level", "`debug`, `info`, `warning` or `error`",
         [](const Config&) -> std::string { return "`info`"; },
         "The least severe level written, for the master and the workers.",
         [](Context& ctx, const Node& n, Config& c) {
             if (auto i = ctx.choice(n, {"debug", "info", "warning", "error"})) {
                 c.logging.level = static_cast<LogLevel>(*i);
             }
         }},
        {"logging.format", "`text` or `json`",
         [](const Config&) -> std::string { return "`text`"; }, "Format of the master's log lines.",
         [](Context& ctx, const Node& n, Config& c) {
             if (auto i = ctx.choice(n, {"text", "json"}))
                 c.logging.format = static_cast<LogFormat>(*i);
         }},
        {"logging.access_log", "boolean",
         [](const Config& c) { return fmt::format("`{}`", c.logging.access_log); },
         "Whether workers log one line per request.",
         [](Context& ctx, const Node& n, Config& c) { ctx.set_bool(n, c.logging.access_log); }},
        {"logging.access_log_format", "string",
         [](const Config& c) { return quoted(c.logging.access_log_format); },
         "The access log line under `logging.format: text`. Placeholders: `{method}` `{path}` "
         "(with the query string) `{query}` `{status}` `{bytes}` `{duration_ms}` `{remote}` "
         "`{generation}` `{worker}` `{version}` `{protocol}` `{user_agent}` `{referer}`, and any "
         "header: `{request_header[x-request-id]}`, `{response_header[content-type]}` (`-` when "
         "absent); `{{` and `}}` are literal braces. Under `format: json` each line is a JSON "
         "object with fixed fields, plus the headers named here (see logging.md).",
         [](Context& ctx, const Node& n, Config& c) {
             auto text = ctx.scalar(n, "a string");
             if (!text) return;
             if (auto why = check_access_log_format(*text); !why.empty()) {
                 ctx.error(n, why);
             } else {
                 c.logging.access_log_format = std::move(*text);
             }
         }},
        {"logging.access_log_file", "path",
         [](const Config&) -> std::string { return "(the master's log)"; },
         "A file the workers append access lines to themselves (the master never touches "
         "them), reopened on SIGUSR1 after logrotate renamed it. Setting it turns the access "
         "log on. Empty: the lines go through the master into its log. gunicorn's "
         "`--access-logfile PATH`.",
         [](Context& ctx, const Node& n, Config& c) {
             // "" is the default spelled out: no file of their own.
             if (n.IsScalar() && n.Scalar().empty()) {
                 c.logging.access_log_file.clear();
             } else {
                 ctx.set_path(n, c.logging.access_log_file);
             }
         }},
        {"logging.file", "path", [](const Config&) -> std::string { return "(stderr)"; },
         "The master's log file, reopened on SIGUSR1. Empty: stderr, which systemd sends to the "
         "journal.",
         [](Context& ctx, const Node& n, Config& c) { ctx.set_path(n, c.logging.file); }},
        {"http", "section", nullptr,
         "HTTP limits enforced by the workers, WSGI and ASGI alike, with the same responses "
         "(which applies to which interface: [asgi.md](asgi.md)).",
         nullptr},
        {"http.max_request_line", "size >= 1",
         [](const Config& c) { return format_size(c.http.max_request_line); },
         "Longest request line; longer ones are refused.",
         [](Context& ctx, const Node& n, Config& c) {
             ctx.set_size(n, c.http.max_request_line, 1);
         }},
        {"http.max_header_size", "size >= 1",
         [](const Config& c) { return format_size(c.http.max_header_size); },
         "All header lines of a request together; more is refused.",
         [](Context& ctx, const Node& n, Config& c) {
             ctx.set_size(n, c.http.max_header_size, 1);
         }},
        {"http.max_headers", "integer >= 1",
         [](const Config& c) { return std::to_string(c.http.max_headers); },
         "Most header fields in a request; more are refused.",
         [](Context& ctx, const Node& n, Config& c) { ctx.set_integer(n, c.http.max_headers, 1); }},
        {"http.max_body_size", "size",
         [](const Config& c) { return format_size(c.http.max_body_size); },
         "Largest request body; larger gets 413. 0: unlimited.",
         [](Context& ctx, const Node& n, Config& c) { ctx.set_size(n, c.http.max_body_size); }},
        {"http.body_buffer_size", "size",
         [](const Config& c) { return format_size(c.http.body_buffer_size); },
         "Request bodies larger than this are spooled to a temporary file.",
         [](Context& ctx, const Node& n, Config& c) { ctx.set_size(n, c.http.body_buffer_size); }},
        {"http.header_timeout", "duration > 0",
         [](const Config& c) { return format_duration(c.http.header_timeout); },
         "The whole request head must arrive within this time (a slowloris guard).",
         [](Context& ctx, const Node& n, Config& c) {
             ctx.set_duration(n, c.http.header_timeout, Duration{1});
         }},
        {"http.send_timeout", "duration > 0",
         [](const Config& c) { return format_duration(c.http.send_timeout); },
         "The longest a response may wait for the client to take more bytes (nginx's "
         "`send_timeout`): a client that reads nothing for this long is disconnected, so a slow "
         "reader holds a serving thread for at most this time.",
         [](Context& ctx, const Node& n, Config& c) {
             ctx.set_duration(n, c.http.send_timeout, Duration{1});
         }},
        {"http.version_header", "header name", none,
         "If set, every response carries this header with the generation's version label, e.g. "
         "`X-Molt-Version`.",
         [](Context& ctx, const Node& n, Config& c) {
             auto text = ctx.scalar(n, "a header name");
             if (!text) return;
             if (!text->empty() && !is_header_token(*text)) {
                 ctx.error(n,
                           fmt::format("\"{}\" is not a valid HTTP header name", excerpt(*text)));
             } else {
                 c.http.version_header = std::move(*text);
             }
         }},
        {"asgi", "section", nullptr,
         "Settings of ASGI workers, with uvicorn's meaning (WSGI workers ignore them).", nullptr},
        {"asgi.loop", "`auto`, `asyncio` or `uvloop`",
         [](const Config&) -> std::string { return "`auto`"; },
         "The worker's event loop. `auto`: uvloop when it is importable (Debian's "
         "`python3-uvloop`), else asyncio's. `uvloop` without uvloop fails the boot.",
         [](Context& ctx, const Node& n, Config& c) {
             if (auto i = ctx.choice(n, {"auto", "asyncio", "uvloop"})) {
                 c.asgi.loop = static_cast<AsgiLoop>(*i);
             }
         }},
        {"asgi.limit_concurrency", "integer",
         [](const Config& c) { return std::to_string(c.asgi.limit_concurrency); },
         "Most connections or running requests per worker; a request above it gets 503. 0: no "
         "limit.",
         [](Context& ctx, const Node& n, Config& c) {
             ctx.set_integer(n, c.asgi.limit_concurrency, 0);
         }},
        {"asgi.ws_max_size", "size >= 1",
         [](const Config& c) { return format_size(c.asgi.ws_max_size); },
         "Largest WebSocket message a client may send.",
         [](Context& ctx, const Node& n, Config& c) { ctx.set_size(n, c.asgi.ws_max_size, 1); }},
        {"asgi.ws_ping_interval", "duration",
         [](const Config& c) { return format_duration(c.asgi.ws_ping_interval); },
         "How often the worker pings an open WebSocket. 0: never.",
         [](Context& ctx, const Node& n, Config& c) {
             ctx.set_duration(n, c.asgi.ws_ping_interval);
         }},
        {"asgi.ws_ping_timeout", "duration",
         [](const Config& c) { return format_duration(c.asgi.ws_ping_timeout); },
         "A WebSocket whose pong is this late is closed. 0: wait forever.",
         [](Context& ctx, const Node& n, Config& c) {
             ctx.set_duration(n, c.asgi.ws_ping_timeout);
         }},
        {"asgi.ws_per_message_deflate", "boolean",
         [](const Config& c) -> std::string {
             return c.asgi.ws_per_message_deflate ? "`true`" : "`false`";
         },
         "Offer the permessage-deflate WebSocket extension.",
         [](Context& ctx, const Node& n, Config& c) {
             ctx.set_bool(n, c.asgi.ws_per_message_deflate);
         }},
        {"asgi.server_header", "boolean",
         [](const Config& c) -> std::string { return c.asgi.server_header ? "`true`" : "`false`"; },
         "Send `Server: molt` with every response (uvicorn's `--server-header`; uvicorn sends "
         "its own by default, molt does not, as for WSGI).",
         [](Context& ctx, const Node& n, Config& c) { ctx.set_bool(n, c.asgi.server_header); }},
        {"asgi.date_header", "boolean",
         [](const Config& c) -> std::string { return c.asgi.date_header ? "`true`" : "`false`"; },
         "Send a `Date` header with every response (uvicorn's `--date-header`; `false` is its "
         "`--no-date-header`). An app that sets its own `Date` gets both.",
         [](Context& ctx, const Node& n, Config& c) { ctx.set_bool(n, c.asgi.date_header); }},
        {"proxy", "section", nullptr,
         "Forwarding headers from a reverse proxy or load balancer (gunicorn's "
         "`forwarded_allow_ips` and `secure_scheme_headers`, uvicorn's `--proxy-headers`). See "
         "docs/proxy-tls.md.",
         nullptr},
        {"proxy.trusted", "list of addresses, CIDRs, `unix`, `*`",
         [](const Config&) -> std::string { return "`[]`"; },
         "The peers whose forwarding headers are believed: IP addresses, CIDRs "
         "(`10.0.0.0/8`), `unix` for clients of a unix socket, `*` for every peer. From a "
         "trusted peer the headers set the scheme, client address and port, and host the app "
         "sees (and the access log shows); the client is the right-most address of the chain "
         "that is not trusted. From any other peer they change nothing. Empty: trust no one.",
         read_proxy_trusted},
        {"proxy.headers", "list of header names",
         [](const Config&)
             -> std::string { return fmt::format("`[{}]`", fmt::join(Proxy{}.headers, ", ")); },
         "The forwarding headers honoured from trusted peers: `x-forwarded-for`, "
         "`x-forwarded-proto`, `x-forwarded-host`, `x-forwarded-port`, and RFC 7239 "
         "`forwarded` (which wins over the `x-forwarded-*` ones when both are sent). Name only "
         "those your proxy sets (or overwrites): one it does not set reaches molt as the client "
         "wrote it. Each is judged on its own; a malformed one is ignored.",
         read_proxy_headers},
        {"watch", "path, or list of paths", [](const Config&) -> std::string { return "`[]`"; },
         "File changes under these paths start a rollover (debounced).", read_watch},
        {"version_file", "relative path", none,
         "A file in the release directory whose first line is the generation's version label, "
         "e.g. `REVISION`.",
         read_version_file},
        {"user", "string", none, "User the workers run as (the master must start as root).",
         [](Context& ctx, const Node& n, Config& c) { read_name(ctx, n, c.user); }},
        {"group", "string", none, "Group the workers run as.",
         [](Context& ctx, const Node& n, Config& c) { read_name(ctx, n, c.group); }},
        {"pidfile", "path", none, "File the master writes its PID to.",
         [](Context& ctx, const Node& n, Config& c) { ctx.set_path(n, c.pidfile); }},
    };
    return table;
}

const KeySpec* find_spec(std::string_view path) {
    for (const auto& spec : key_table()) {
        if (spec.path == path) return &spec;
    }
    return nullptr;
}

std::string_view parent_of(std::string_view path) {
    const auto dot = path.rfind('.');
    return dot == std::string_view::npos ? std::string_view{} : path.substr(0, dot);
}

std::string_view last_part(std::string_view path) {
    const auto dot = path.rfind('.');
    return dot == std::string_view::npos ? path : path.substr(dot + 1);
}

std::vector<std::string> child_names(std::string_view prefix) {
    std::vector<std::string> names;
    for (const auto& spec : key_table()) {
        if (parent_of(spec.path) == prefix) names.emplace_back(last_part(spec.path));
    }
    return names;
}

// gunicorn settings people carry over, and where molt keeps them.
const std::map<std::string, std::string>& gunicorn_names() {
    static const std::map<std::string, std::string> names = {
        {"bind", "listen"},
        {"timeout", "timeouts.heartbeat"},
        {"graceful_timeout", "timeouts.graceful"},
        {"keepalive", "timeouts.keepalive"},
        {"loglevel", "logging.level"},
        {"accesslog", "logging.access_log"},
        {"access_log_format", "logging.access_log_format"},
        {"errorlog", "logging.file"},
        {"raw_env", "env"},
        {"wsgi_app", "app"},
        {"worker_class", "interface"},
        {"limit_request_line", "http.max_request_line"},
        {"limit_request_fields", "http.max_headers"},
        {"limit_request_field_size", "http.max_header_size"},
        {"reload", "watch"},
    };
    return names;
}

std::string unknown_key_message(const std::string& name, const std::string& prefix) {
    if (prefix.empty()) {
        const auto& aliases = gunicorn_names();
        if (auto found = aliases.find(name); found != aliases.end()) {
            return fmt::format("unknown key; did you mean `{}`? (gunicorn's `{}`)", found->second,
                               name);
        }
    }
    if (const KeySpec* dotted = find_spec(prefix.empty() ? name : prefix + "." + name)) {
        return fmt::format("unknown key; dotted keys are not expanded: nest `{}` under `{}`",
                           last_part(dotted->path), parent_of(dotted->path));
    }
    const auto siblings = child_names(prefix);
    if (auto near = closest(name, siblings)) {
        return fmt::format("unknown key; did you mean `{}`?", *near);
    }
    // A key written at the wrong level, e.g. `boot: 60s` at the top instead of under
    // `timeouts`.
    for (const auto& spec : key_table()) {
        if (last_part(spec.path) == name && spec.path.find("[]") == std::string_view::npos) {
            return fmt::format("unknown key; did you mean `{}`?", spec.path);
        }
    }
    if (siblings.size() <= 8) {
        return fmt::format("unknown key; expected one of: {}", join(siblings, ", "));
    }
    return "unknown key; see docs/config.md for every key";
}

// Reports unknown and repeated keys of `map`, and calls visit(spec, value) for the others.
// `spec_prefix` finds the keys in the table ("listen[]"), `display_prefix` names them in
// errors ("listen[2]").
template <typename Visit>
void for_each_key(Context& ctx, const Node& map, const std::string& spec_prefix,
                  const std::string& display_prefix, Visit visit) {
    std::map<std::string, YAML::Mark> seen;
    for (const auto& item : map) {
        const Node& key_node = item.first;
        if (!key_node.IsScalar()) {
            ctx.error_at(key_node.Mark(), display_prefix,
                         fmt::format("keys must be names, got {}", describe(key_node)));
            continue;
        }
        const std::string& name = key_node.Scalar();
        const std::string display = display_prefix.empty() ? name : display_prefix + "." + name;
        const KeySpec* spec = find_spec(spec_prefix.empty() ? name : spec_prefix + "." + name);
        // Only direct children count: "timeouts.boot" written as one key is not `boot`.
        if (spec != nullptr && parent_of(spec->path) != spec_prefix) spec = nullptr;
        if (spec == nullptr) {
            ctx.error_at(key_node.Mark(), display, unknown_key_message(name, spec_prefix));
            continue;
        }
        const auto [first, inserted] = seen.emplace(name, key_node.Mark());
        if (!inserted) {
            ctx.error_at(
                key_node.Mark(), display,
                first->second.is_null() || !ctx.has_marks
                    ? std::string("duplicate key")
                    : fmt::format("duplicate key; first set at line {}", first->second.line + 1));
            continue;
        }
        ctx.key = display;
        ctx.key_mark = key_node.Mark();
        ctx.marks[display] = item.second.IsNull() ? key_node.Mark() : item.second.Mark();
        visit(*spec, item.second);
    }
}

void read_section(Context& ctx, const Node& map, const std::string& prefix, Config& config) {
    for_each_key(ctx, map, prefix, prefix, [&](const KeySpec& spec, const Node& value) {
        if (spec.type != "section") {
            if (spec.apply != nullptr) spec.apply(ctx, value, config);
        } else if (value.IsMap()) {
            read_section(ctx, value, std::string(spec.path), config);
        } else if (!value.IsNull()) {
            ctx.error(value, fmt::format("expected a mapping, got {}", describe(value)));
        }
    });
}

}  // namespace

// ---------------------------------------------------------------------------------------
// Checks that need the whole document, then the filesystem checks.

namespace {

void finish_listen(Context& ctx, Config& config) {
    if (!ctx.listen_given) {
        ListenDraft draft;
        draft.address = *parse_listen_address(kDefaultListen, nullptr);
        draft.key = "listen";
        draft.mark = YAML::Mark::null_mark();
        ctx.listen.push_back(std::move(draft));
    }
    std::map<std::string, std::string> key_by_text;
    std::map<std::string, std::string> key_by_name;
    for (auto& draft : ctx.listen) {
        auto& address = draft.address;
        if (!draft.explicit_backlog && ctx.global_backlog) address.backlog = *ctx.global_backlog;
        if (!draft.explicit_name) address.name = address.text;
        // The PROXY header comes before the TLS handshake, in the clear; the native engine
        // reads it there (worker_shim/native/engine.cpp, read_proxy_header), the Python
        // engines would look for it inside TLS. A worker that falls back to the Python engine
        // (the extension cannot load there) refuses to boot instead, saying why.
        if (address.proxy_protocol && address.tls.enabled() &&
            (config.interface == Interface::asgi || config.engine == Engine::python)) {
            ctx.error_at(draft.mark, draft.key,
                         "`proxy_protocol` together with `tls` needs the native engine "
                         "(interface: wsgi, engine: native or auto), which reads the PROXY "
                         "header before the TLS handshake");
        }
        if (auto [first, fresh] = key_by_text.emplace(address.text, draft.key); !fresh) {
            ctx.error_at(
                draft.mark, draft.key,
                fmt::format("duplicate address {} (also in {})", address.text, first->second));
        } else if (auto [named, unique] = key_by_name.emplace(address.name, draft.key); !unique) {
            ctx.error_at(
                draft.mark, draft.key,
                fmt::format("duplicate name \"{}\" (also in {})", address.name, named->second));
        }
        config.listen.push_back(address);
    }
    if (config.metrics.listen) {
        if (auto found = key_by_text.find(config.metrics.listen->text);
            found != key_by_text.end()) {
            ctx.late_error("metrics.listen",
                           fmt::format("{} is already used by {}", config.metrics.listen->text,
                                       found->second));
        }
    }
}

void check_chdir(Context& ctx, const Config& config) {
    struct stat info {};
    if (::stat(config.chdir.c_str(), &info) != 0) {
        ctx.late_error(
            "chdir", fmt::format("cannot use directory \"{}\": {}", config.chdir, os_error(errno)));
    } else if (S_ISREG(info.st_mode)) {
        // A release shipped as one archive (zipapp .pyz, or .zip): workers import from it.
        // Judged by what `current` points at, as the master resolves it per generation.
        char resolved[PATH_MAX];
        std::string_view path =
            ::realpath(config.chdir.c_str(), resolved) ? resolved : config.chdir.c_str();
        bool archive = path.ends_with(".pyz") || path.ends_with(".zip");
        if (!archive) {
            ctx.late_error("chdir", fmt::format("\"{}\" is a file, not a directory or a .pyz/.zip "
                                                "release",
                                                config.chdir));
        } else if (::access(config.chdir.c_str(), R_OK) != 0) {
            ctx.late_error("chdir", fmt::format("cannot read release archive \"{}\": {}",
                                                config.chdir, os_error(errno)));
        }
    } else if (!S_ISDIR(info.st_mode)) {
        ctx.late_error("chdir", fmt::format("\"{}\" is not a directory", config.chdir));
    } else if (::access(config.chdir.c_str(), R_OK | X_OK) != 0) {
        ctx.late_error("chdir", fmt::format("cannot read directory \"{}\": {}", config.chdir,
                                            os_error(errno)));
    }
}

std::optional<std::string> find_in_path(const std::string& name) {
    const char* path_env = std::getenv("PATH");
    std::string_view dirs = path_env != nullptr ? path_env : "/usr/local/bin:/usr/bin:/bin";
    while (true) {
        const auto colon = dirs.find(':');
        const std::string dir(dirs.substr(0, colon));
        const std::string candidate = (dir.empty() ? std::string(".") : dir) + "/" + name;
        if (::access(candidate.c_str(), X_OK) == 0) return candidate;
        if (colon == std::string_view::npos) return std::nullopt;
        dirs.remove_prefix(colon + 1);
    }
}

void check_python(Context& ctx, const Config& config) {
    const std::string& python = config.python;
    if (python.find('/') == std::string::npos) {
        if (!find_in_path(python)) {
            ctx.late_error("python", fmt::format("\"{}\" was not found in PATH", python));
        }
        return;
    }
    struct stat info {};
    if (::stat(python.c_str(), &info) != 0) {
        ctx.late_error("python", fmt::format("cannot use \"{}\": {}", python, os_error(errno)));
    } else if (!S_ISREG(info.st_mode)) {
        ctx.late_error("python", fmt::format("\"{}\" is not a file", python));
    } else if (::access(python.c_str(), X_OK) != 0) {
        ctx.late_error("python",
                       fmt::format("\"{}\" is not executable: {}", python, os_error(errno)));
    }
}

// The names must exist on this host; the master looks them up again at each spawn.
void check_user_and_group(Context& ctx, const Config& config) {
    if (!config.user.empty() && ::getpwnam(config.user.c_str()) == nullptr) {
        ctx.late_error("user", fmt::format("no user named \"{}\" on this host", config.user));
    }
    if (!config.group.empty() && ::getgrnam(config.group.c_str()) == nullptr) {
        ctx.late_error("group", fmt::format("no group named \"{}\" on this host", config.group));
    }
}

void finish(Context& ctx, Config& config) {
    if (config.app.empty() && ctx.marks.count("app") == 0) {
        ctx.error_at(YAML::Mark::null_mark(), "app",
                     "app is required: the module:callable to serve, e.g. "
                     "myproject.wsgi:application");
    }
    finish_listen(ctx, config);
    if (config.chdir.empty() && ctx.marks.count("chdir") == 0) config.chdir = ctx.base_dir.string();
    if (!config.statics.empty() && config.interface == Interface::asgi) {
        ctx.late_error("static",
                       "is served by the WSGI engines; interface asgi cannot use it "
                       "(serve the files from the app, e.g. Starlette's StaticFiles)");
    }
    if (ctx.check_filesystem) {
        if (!config.chdir.empty()) check_chdir(ctx, config);
        if (!config.chdir.empty()) check_static(ctx, config);
        if (!config.python.empty()) check_python(ctx, config);
        check_user_and_group(ctx, config);
    }
}

LoadResult load_root(const Node& root, Context& ctx) {
    auto config = std::make_shared<Config>();
    config->source = ctx.file;
    if (root.IsMap()) {
        read_section(ctx, root, "", *config);
        finish(ctx, *config);
    } else if (root.IsNull()) {
        finish(ctx, *config);
    } else {
        ctx.error_at(root.Mark(), "",
                     fmt::format("the config must be a mapping of keys, got {}", describe(root)));
    }
    LoadResult result;
    if (ctx.errors.empty()) {
        result.config = std::move(config);
        return result;
    }
    std::stable_sort(ctx.errors.begin(), ctx.errors.end(), [](const auto& a, const auto& b) {
        return std::tie(a.line, a.column) < std::tie(b.line, b.column);
    });
    result.errors = std::move(ctx.errors);
    return result;
}

// Relative paths in a config resolve against its file's directory; labels like "<stdin>"
// name no file, so they resolve against the current directory.
fs::path base_dir_for(const std::string& label) {
    std::error_code ec;
    if (label.empty() || label.starts_with('<')) {
        auto cwd = fs::current_path(ec);
        return ec ? fs::path("/") : cwd;
    }
    auto absolute = fs::absolute(label, ec);
    if (ec) return fs::path("/");
    return absolute.lexically_normal().parent_path();
}

LoadResult single_error(const std::string& file, const YAML::Mark& mark, std::string message) {
    Context ctx;
    ctx.file = file;
    ctx.error_at(mark, "", std::move(message));
    LoadResult result;
    result.errors = std::move(ctx.errors);
    return result;
}

}  // namespace

LoadResult load_config_text(const std::string& text, const std::string& label,
                            bool check_filesystem) {
    try {
        std::vector<Node> documents;
        try {
            documents = YAML::LoadAll(text);
        } catch (const YAML::ParserException& e) {
            return single_error(label, e.mark, e.msg);
        }
        if (documents.size() > 1) {
            return single_error(
                label, documents[1].Mark(),
                fmt::format("expected one YAML document, found {}", documents.size()));
        }
        Context ctx;
        ctx.file = label;
        ctx.base_dir = base_dir_for(label);
        ctx.check_filesystem = check_filesystem;
        return load_root(documents.empty() ? Node() : documents.front(), ctx);
    } catch (const std::exception& e) {
        return single_error(label, YAML::Mark::null_mark(),
                            fmt::format("internal error while loading: {}", e.what()));
    }
}

LoadResult load_config_file(const std::string& path, bool check_host) {
    const auto refuse = [&](const std::string& why) {
        return single_error(path, YAML::Mark::null_mark(), why);
    };
    // O_NONBLOCK: opening a FIFO must not wait for a writer; anything but a regular file is
    // refused below, before the first read (a FIFO would hang, /dev/zero never ends).
    const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC | O_NONBLOCK);
    if (fd < 0) return refuse(fmt::format("cannot read config file: {}", os_error(errno)));
    struct stat st {};
    if (::fstat(fd, &st) < 0) {
        const int saved = errno;
        ::close(fd);
        return refuse(fmt::format("cannot read config file: {}", os_error(saved)));
    }
    if (!S_ISREG(st.st_mode)) {
        ::close(fd);
        return refuse(S_ISDIR(st.st_mode)
                          ? fmt::format("cannot read config file: {}", os_error(EISDIR))
                          : std::string("cannot read config file: not a regular file (a FIFO "
                                        "or a device is never read as a config)"));
    }
    std::string text;
    char buffer[16384];
    // The cap holds for a file that grows while it is read, too: one byte past it is enough.
    while (text.size() <= kMaxConfigFileBytes) {
        const ssize_t n = ::read(fd, buffer, sizeof buffer);
        if (n < 0 && errno == EINTR) continue;
        if (n < 0) {
            const int saved = errno;
            ::close(fd);
            return refuse(fmt::format("cannot read config file: {}", os_error(saved)));
        }
        if (n == 0) break;
        text.append(buffer, static_cast<std::size_t>(n));
    }
    ::close(fd);
    if (text.size() > kMaxConfigFileBytes) {
        return refuse(
            fmt::format("config file too large: more than {} bytes", kMaxConfigFileBytes));
    }
    return load_config_text(text, path, check_host);
}

namespace {

// Whether a key takes a list, by its type in the key table ("address, or list of ...").
bool takes_list(std::string_view key) {
    const KeySpec* spec = find_spec(key);
    return spec != nullptr && spec->type.find("list of") != std::string_view::npos;
}

// Puts one command-line setting into the document: "timeouts.graceful" goes under
// `timeouts`, a list key collects its values.
void place_setting(Node& root, const Setting& setting) {
    Node section = root;
    std::string_view rest = setting.key;
    for (auto dot = rest.find('.'); dot != std::string_view::npos; dot = rest.find('.')) {
        Node child = section[std::string(rest.substr(0, dot))];
        section.reset(child);
        rest.remove_prefix(dot + 1);
    }
    const std::string name(rest);
    if (takes_list(setting.key)) {
        section[name].push_back(setting.value);
    } else {
        section[name] = setting.value;
    }
}

}  // namespace

LoadResult config_from_command_line(const CommandLineConfig& cli) {
    try {
        // The flags become a YAML document so that they go through exactly the same
        // validation as a file.
        Node root(YAML::NodeType::Map);
        if (!cli.app.empty()) root["app"] = cli.app;
        for (const auto& setting : cli.settings) place_setting(root, setting);
        Context ctx;
        ctx.file = "<command line>";
        ctx.base_dir = base_dir_for(ctx.file);
        ctx.has_marks = false;
        return load_root(root, ctx);
    } catch (const std::exception& e) {
        return single_error("<command line>", YAML::Mark::null_mark(),
                            fmt::format("internal error while loading: {}", e.what()));
    }
}

std::string ConfigError::to_string() const {
    std::string text = file;
    if (line > 0) text += fmt::format(":{}:{}", line, column);
    text += ": ";
    if (!key.empty()) text += key + ": ";
    return text + message;
}

// ---------------------------------------------------------------------------------------
// JSON for the worker, the canonical dump and its digest.

namespace {

using nlohmann::json;

constexpr std::array<const char*, 2> kInterfaceNames{"wsgi", "asgi"};
constexpr std::array<const char*, 3> kEngineNames{"auto", "native", "python"};
constexpr std::array<const char*, 3> kLifespanNames{"auto", "on", "off"};
constexpr std::array<const char*, 3> kPreloadNames{"auto", "true", "false"};
constexpr std::array<const char*, 3> kAsgiLoopNames{"auto", "asyncio", "uvloop"};

constexpr std::array<const char*, 4> kLevelNames{"debug", "info", "warning", "error"};
constexpr std::array<const char*, 2> kFormatNames{"text", "json"};

std::int64_t ms(Duration duration) {
    return duration.count();
}

json listen_json(const ListenAddress& address) {
    return {{"kind", address.kind == ListenAddress::Kind::tcp ? "tcp" : "unix"},
            {"host", address.host},
            {"port", address.port},
            {"path", address.path},
            {"backlog", address.backlog},
            {"mode", address.mode},
            {"name", address.name},
            {"text", address.text},
            {"proxy_protocol", address.proxy_protocol},
            {"defer_accept_ms", ms(address.defer_accept)},
            {"tls", address.tls.enabled()}};
}

// What a worker must know per listener, by listener name: the names are what MOLT_LISTEN_NAMES
// gives it (systemd's LISTEN_FDNAMES when sockets are passed in).
json listener_options_json(const Config& c) {
    json options = json::object();
    for (const auto& address : c.listen) {
        json tls;  // null: plain HTTP
        if (address.tls.enabled()) {
            tls = {{"cert", address.tls.cert},
                   {"key", address.tls.key},
                   {"client_ca", address.tls.client_ca},
                   {"min_version", address.tls.min_version}};
        }
        options[address.name] = {{"proxy_protocol", address.proxy_protocol}, {"tls", tls}};
    }
    return options;
}

// The `asgi:` section, the same in the full config and in what each worker is given.
json asgi_json(const Asgi& a) {
    return {{"loop", kAsgiLoopNames[static_cast<std::size_t>(a.loop)]},
            {"limit_concurrency", a.limit_concurrency},
            {"ws_max_size", a.ws_max_size},
            {"ws_ping_interval_ms", ms(a.ws_ping_interval)},
            {"ws_ping_timeout_ms", ms(a.ws_ping_timeout)},
            {"ws_per_message_deflate", a.ws_per_message_deflate},
            {"server_header", a.server_header},
            {"date_header", a.date_header}};
}

// The `static:` entries, the same in the full config and in what each worker is given.
json static_json(const std::vector<StaticMount>& mounts) {
    json out = json::array();
    for (const auto& m : mounts) out.push_back({{"prefix", m.prefix}, {"dir", m.dir}});
    return out;
}

// The `proxy:` section, the same in the full config and in what each worker is given.
json proxy_json(const Proxy& p) {
    return {{"trusted", p.trusted}, {"headers", p.headers}};
}

// The HTTP limits, the same in the full config and in what each worker is given.
json http_json(const Http& h) {
    return {{"max_request_line", h.max_request_line}, {"max_header_size", h.max_header_size},
            {"max_headers", h.max_headers},           {"max_body_size", h.max_body_size},
            {"body_buffer_size", h.body_buffer_size}, {"header_timeout_ms", ms(h.header_timeout)},
            {"send_timeout_ms", ms(h.send_timeout)},  {"version_header", h.version_header}};
}

json full_json(const Config& c) {
    json listen = json::array();
    for (const auto& address : c.listen) listen.push_back(listen_json(address));
    const auto& t = c.timeouts;
    const auto& h = c.http;
    return {
        {"app", c.app},
        {"interface", kInterfaceNames[static_cast<std::size_t>(c.interface)]},
        {"engine", kEngineNames[static_cast<std::size_t>(c.engine)]},
        {"lifespan", kLifespanNames[static_cast<std::size_t>(c.lifespan)]},
        {"preload", kPreloadNames[static_cast<std::size_t>(c.preload)]},
        {"preload_standby", c.preload_standby},
        {"hooks", {{"post_fork", c.hooks.post_fork}, {"worker_exit", c.hooks.worker_exit}}},
        {"root_path", c.root_path},
        {"static", static_json(c.statics)},
        {"asgi", asgi_json(c.asgi)},
        {"proxy", proxy_json(c.proxy)},
        {"chdir", c.chdir},
        {"python", c.python},
        {"env", c.env},
        {"listen", listen},
        {"workers", c.workers},
        {"threads", c.threads},
        {"accepting_workers", c.accepting_workers},
        {"timeouts",
         {{"boot_ms", ms(t.boot)},
          {"graceful_ms", ms(t.graceful)},
          {"heartbeat_ms", ms(t.heartbeat)},
          {"request_ms", ms(t.request)},
          {"keepalive_ms", ms(t.keepalive)}}},
        {"health",
         {{"path", c.health.path}, {"host", c.health.host}, {"headers", c.health.headers}}},
        {"rollover", {{"batch", c.rollover.batch}}},
        {"recycle",
         {{"max_requests", c.recycle.max_requests},
          {"max_requests_jitter", c.recycle.max_requests_jitter},
          {"max_rss", c.recycle.max_rss},
          {"max_lifetime_ms", ms(c.recycle.max_lifetime)}}},
        {"control", {{"socket", c.control.socket}, {"mode", c.control.mode}}},
        {"metrics", {{"listen", c.metrics.listen ? listen_json(*c.metrics.listen) : json()}}},
        {"logging",
         {{"level", kLevelNames[static_cast<std::size_t>(c.logging.level)]},
          {"format", kFormatNames[static_cast<std::size_t>(c.logging.format)]},
          {"access_log", c.logging.access_log},
          {"access_log_format", c.logging.access_log_format},
          {"access_log_file", c.logging.access_log_file},
          {"file", c.logging.file}}},
        {"http", http_json(h)},
        {"watch", c.watch},
        {"version_file", c.version_file},
        {"user", c.user},
        {"group", c.group},
        {"pidfile", c.pidfile},
    };
}

std::uint64_t fnv1a64(std::string_view data) {
    std::uint64_t hash = 0xcbf29ce484222325ULL;
    for (const char c : data) {
        hash ^= static_cast<unsigned char>(c);
        hash *= 0x100000001b3ULL;
    }
    return hash;
}

}  // namespace

Duration heartbeat_interval(const Config& config) {
    return std::clamp<Duration>(config.timeouts.heartbeat / 6, Duration{100}, Duration{5000});
}

std::string worker_config_json(const Config& config, const std::string& release_dir,
                               const std::string& version, std::uint64_t generation, int worker) {
    const auto& t = config.timeouts;
    const auto& h = config.http;
    const json document = {
        {"app", config.app},
        {"interface", kInterfaceNames[static_cast<std::size_t>(config.interface)]},
        {"engine", kEngineNames[static_cast<std::size_t>(config.engine)]},
        {"lifespan", kLifespanNames[static_cast<std::size_t>(config.lifespan)]},
        {"preload", kPreloadNames[static_cast<std::size_t>(config.preload)]},
        {"hooks",
         {{"post_fork", config.hooks.post_fork}, {"worker_exit", config.hooks.worker_exit}}},
        {"root_path", config.root_path},
        {"static", static_json(config.statics)},
        {"asgi", asgi_json(config.asgi)},
        {"proxy", proxy_json(config.proxy)},
        {"listeners", listener_options_json(config)},
        {"chdir", release_dir},
        {"threads", config.threads},
        {"accepting_workers", config.accepting_workers},
        {"generation", generation},
        {"worker", worker},
        {"version", version},
        {"health_path", config.health.path},
        {"health_host", config.health.host},
        {"health_headers", config.health.headers},
        {"timeouts",
         {{"boot_ms", ms(t.boot)},
          {"graceful_ms", ms(t.graceful)},
          {"heartbeat_ms", ms(t.heartbeat)},
          {"keepalive_ms", ms(t.keepalive)},
          {"request_ms", ms(t.request)}}},
        {"heartbeat_interval_ms", ms(heartbeat_interval(config))},
        {"recycle",
         {{"max_requests", config.recycle.max_requests},
          {"max_requests_jitter", config.recycle.max_requests_jitter}}},
        {"http", http_json(h)},
        // Workers count per request only when someone can read it (metrics.listen).
        {"metrics", {{"requests", config.metrics.listen.has_value()}}},
        {"logging",
         {{"level", kLevelNames[static_cast<std::size_t>(config.logging.level)]},
          {"format", kFormatNames[static_cast<std::size_t>(config.logging.format)]},
          // A file of its own turns the access log on.
          {"access_log", config.logging.access_log || !config.logging.access_log_file.empty()},
          {"access_log_format", config.logging.access_log_format},
          {"access_log_file", config.logging.access_log_file}}},
    };
    // Replace, not throw, on invalid UTF-8: a worker must always get a parseable document.
    return document.dump(-1, ' ', false, json::error_handler_t::replace);
}

std::string worker_config_json(const Config& config, const std::string& release_dir,
                               const std::string& version) {
    return worker_config_json(config, release_dir, version, 0, 0);
}

std::string config_json(const Config& config) {
    return full_json(config).dump(-1, ' ', false, json::error_handler_t::replace);
}

std::string config_digest(const Config& config) {
    return fmt::format("{:016x}", fnv1a64(config_json(config))).substr(0, 12);
}

// ---------------------------------------------------------------------------------------
// The reference page.

namespace {

constexpr std::string_view kReferenceIntro = R"(# Configuration reference

molt reads one YAML file, given with `-c` to `molt run`, `molt check` and `molt ctl`. Every key
is optional except `app`. Unknown keys are errors (with a "did you mean"), and `molt check -c
molt.yaml` prints every error at once as `file:line:col: key: message` and exits 78. A reload
(`SIGHUP`) re-reads the file; if it is invalid, nothing changes and the reload is reported as
failed. Examples: `config/examples/minimal.yaml`, `full.yaml` (every key) and `django.yaml`.

<!-- Generated by `molt config-reference` from the key table in config/config.cpp, the same
     table the loader validates against. Do not edit by hand; regenerate with
     `build/bin/molt config-reference > docs/config.md`. -->

## Value forms

- **duration**: one or more `<integer><unit>` parts, largest unit first, units `h`, `m`, `s`,
  `ms`: `30s`, `500ms`, `2m`, `1h`, `1m30s`. A bare integer means seconds (`boot: 60` is one
  minute, as in gunicorn); `0` is zero.
- **size**: an integer with an optional unit: `B`, `KB` `MB` `GB` `TB` (powers of 1000) or
  `KiB` `MiB` `GiB` `TiB` (powers of 1024), any letter case, an optional space before the
  unit: `512MiB`, `1GiB`, `100KB`, `64 KiB`. A bare integer means bytes. Single letters
  (`100k`, `512m`) are rejected, because tools disagree on whether they mean 1000 or 1024.
- **address**: `tcp://host:port`, `tcp://[::1]:port`, `unix:/path` or `unix:///path`.
  gunicorn's `--bind` forms also work: `host:port`, `[::1]:port`, `:port`, `/path`. An empty
  host or `*` (`tcp://:8000`, `tcp://*:8000`) means `0.0.0.0`; write `tcp://[::]:8000` for
  every IPv6 address. Port 0 lets the kernel pick.
- **path**: a relative path is resolved against the directory of the config file (for
  `molt run app:callable ...` without a file: the current directory). This applies to
  `chdir`, `python` (when it contains a `/`), `listen` unix paths, `control.socket`,
  `metrics.listen`, `logging.file`, `watch` and `pidfile`; `version_file` is relative to the
  release directory instead. Symlinks are not resolved at load time: `chdir` is resolved with
  realpath when each generation starts.
- **octal mode**: octal digits, quoted or not: `"0660"`, `0660` and `660` all mean `rw-rw----`.
- **boolean**: `true` or `false` (YAML's `yes`/`no`/`on`/`off` are accepted too).

`molt check` also checks that `chdir` is a readable directory and that `python` is an
executable file (or, for a bare name, is found in `PATH`).

## Keys
)";

std::string cell(std::string text) {
    std::string escaped;
    for (const char c : text) {
        if (c == '|') escaped += '\\';
        escaped += c;
    }
    return escaped;
}

void append_rows(std::string& page, const std::vector<const KeySpec*>& specs) {
    page += "| Key | Type | Default | Meaning |\n|---|---|---|---|\n";
    const Config defaults;
    for (const KeySpec* spec : specs) {
        page += fmt::format("| `{}` | {} | {} | {} |\n", spec->path, cell(std::string(spec->type)),
                            cell(spec->show_default(defaults)), cell(std::string(spec->meaning)));
    }
}

// The keys as the reference shows them: the top-level scalars first, then one group per
// section. Both renderers walk these groups, so the page and the man page list the same keys
// in the same order.
struct ReferenceGroup {
    std::string_view section;  // empty for the top level
    std::string_view meaning;
    std::vector<const KeySpec*> keys;
};

std::vector<ReferenceGroup> reference_groups() {
    std::vector<ReferenceGroup> groups(1);
    for (const auto& spec : key_table()) {
        // Keys of a list's entries (listen[], static[]) are rows of the top level; keys of a
        // section are rows of that section's own table.
        const bool nested = !parent_of(spec.path).empty() && !spec.path.starts_with("listen[]") &&
                            !spec.path.starts_with("static[]");
        if (spec.type != "section" && !nested) groups.front().keys.push_back(&spec);
    }
    for (const auto& section : key_table()) {
        if (section.type != "section") continue;
        ReferenceGroup group{section.path, section.meaning, {}};
        for (const auto& spec : key_table()) {
            if (parent_of(spec.path) == section.path) group.keys.push_back(&spec);
        }
        groups.push_back(std::move(group));
    }
    return groups;
}

// --- roff: the same text for man(7). The reference is written in a small subset of
// Markdown (inline `code` and **bold**, "## " headings, "- " bullets, an HTML comment), so a
// converter of exactly that subset keeps one copy of every sentence.

std::string roff_escape(std::string_view text) {
    std::string out;
    for (const char c : text) {
        if (c == '\\') {
            out += "\\e";
        } else if (c == '-') {
            out += "\\-";  // a real minus, so that options and paths can be searched and copied
        } else {
            out += c;
        }
    }
    return out;
}

// `code` and **bold** become bold; everything else is escaped text.
std::string roff_inline(std::string_view text) {
    std::string out;
    std::size_t i = 0;
    while (i < text.size()) {
        const bool strong = text.substr(i, 2) == "**";
        const std::string_view mark = strong ? "**" : text[i] == '`' ? "`" : "";
        const std::size_t close =
            mark.empty() ? std::string_view::npos : text.find(mark, i + mark.size());
        if (close == std::string_view::npos) {
            out += roff_escape(text.substr(i, 1));
            ++i;
            continue;
        }
        out += "\\fB" + roff_escape(text.substr(i + mark.size(), close - i - mark.size())) + "\\fR";
        i = close + mark.size();
    }
    return out;
}

// Text for roff: inline marks converted, and no line starting with a control character (roff
// would read it as a request). A code span may run across lines, so whole paragraphs come here.
std::string roff_text(std::string_view markdown) {
    const std::string converted = roff_inline(markdown);
    std::string out;
    bool line_start = true;
    for (const char c : converted) {
        if (line_start && (c == '.' || c == '\'')) out += "\\&";
        out += c;
        line_start = c == '\n';
    }
    if (!out.empty() && out.back() != '\n') out += '\n';
    return out;
}

std::string upper(std::string_view text) {
    std::string out(text);
    std::transform(out.begin(), out.end(), out.begin(),
                   [](unsigned char c) { return static_cast<char>(std::toupper(c)); });
    return out;
}

// The intro of the page: "# " (the title) and comments are dropped, "## X" becomes .SH X, a
// "- " item becomes a bullet, any other run of lines a paragraph.
std::string roff_from_markdown(std::string_view markdown) {
    std::string out;
    std::string block;        // the paragraph or bullet being collected, still Markdown
    std::string block_macro;  // ".PP" or ".IP \(bu 2"
    const auto flush = [&] {
        if (!block.empty()) out += block_macro + "\n" + roff_text(block);
        block.clear();
    };
    bool in_comment = false;
    std::size_t start = 0;
    while (start < markdown.size()) {
        std::size_t end = markdown.find('\n', start);
        if (end == std::string_view::npos) end = markdown.size();
        std::string_view line = markdown.substr(start, end - start);
        start = end + 1;
        if (in_comment || line.starts_with("<!--")) {
            in_comment = line.find("-->") == std::string_view::npos;
            continue;
        }
        if (line.starts_with("# ")) continue;
        if (line.empty() || line.starts_with("## ") || line.starts_with("- ")) flush();
        if (line.starts_with("## ")) {
            out += ".SH " + upper(line.substr(3)) + "\n";
        } else if (line.starts_with("- ")) {
            block_macro = ".IP \\(bu 2";
            block = line.substr(2);
        } else if (!line.empty()) {
            if (block.empty()) block_macro = ".PP";
            if (line.starts_with("  ")) line.remove_prefix(2);
            block += block.empty() ? std::string(line) : "\n" + std::string(line);
        }
    }
    flush();
    return out;
}

}  // namespace

std::string config_reference_markdown() {
    std::string page(kReferenceIntro);
    for (const auto& group : reference_groups()) {
        if (group.section.empty()) {
            page += "\n### Top level\n\n";
        } else {
            page += fmt::format("\n### `{}`\n\n{}\n\n", group.section, group.meaning);
        }
        append_rows(page, group.keys);
    }
    return page;
}

std::string config_reference_roff(std::string_view version) {
    std::string page = fmt::format(
        ".\\\" Generated by molt_config_doc from the key table in config/config.cpp, the same\n"
        ".\\\" table the loader validates against and docs/config.md is rendered from.\n"
        ".TH MOLT.YAML 5 \"\" \"molt {}\" \"molt manual\"\n"
        ".SH NAME\n"
        "molt.yaml \\- configuration file of the molt application server\n"
        ".SH SYNOPSIS\n"
        ".B /etc/molt/molt.yaml\n"
        ".SH DESCRIPTION\n",
        roff_escape(version));
    page += roff_from_markdown(kReferenceIntro);
    const Config defaults;
    for (const auto& group : reference_groups()) {
        if (group.section.empty()) {
            page += ".SS Top level\n";
        } else {
            page += ".SS " + roff_inline(group.section) + "\n" + roff_text(group.meaning);
        }
        for (const KeySpec* spec : group.keys) {
            page += ".TP\n";
            page += fmt::format("\\fB{}\\fR ({}; default: {})\n", roff_escape(spec->path),
                                roff_inline(spec->type), roff_inline(spec->show_default(defaults)));
            page += roff_text(spec->meaning);
        }
    }
    page +=
        ".SH FILES\n"
        ".TP\n"
        ".I /etc/molt/molt.yaml\n"
        "The config that molt.service runs; molt@NAME.service runs\n"
        ".IR /etc/molt/NAME.yaml .\n"
        ".SH SEE ALSO\n"
        ".BR molt (1),\n"
        ".BR systemd.service (5)\n";
    return page;
}

}  // namespace molt::config
