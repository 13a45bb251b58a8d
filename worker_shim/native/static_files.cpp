// Static files without Python (see static_files.hpp; the rules are molt_shim/static.py's).
#include "static_files.hpp"

#include <errno.h>
#include <fcntl.h>
#include <sys/stat.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

#include <algorithm>
#include <cctype>
#include <climits>
#include <cstdlib>
#include <cstring>
#include <optional>
#include <utility>

#include "engine.hpp"

namespace molt::native {

StaticPlan::StaticPlan(StaticPlan&& other) noexcept {
    *this = std::move(other);
}

StaticPlan& StaticPlan::operator=(StaticPlan&& other) noexcept {
    if (this != &other) {
        if (fd >= 0) ::close(fd);
        status = other.status;
        headers = std::move(other.headers);
        fd = std::exchange(other.fd, -1);
        offset = other.offset;
        length = other.length;
        body = std::move(other.body);
    }
    return *this;
}

StaticPlan::~StaticPlan() {
    if (fd >= 0) ::close(fd);
}

const char* static_reason(int status) {
    switch (status) {
        case 200:
            return "OK";
        case 206:
            return "Partial Content";
        case 304:
            return "Not Modified";
        case 404:
            return "Not Found";
        case 405:
            return "Method Not Allowed";
        case 416:
            return "Range Not Satisfiable";
        default:
            return "Error";
    }
}

std::string percent_decode(const std::string& path) {
    if (path.find('%') == std::string::npos) return path;
    auto hex = [](char c) -> int {
        if (c >= '0' && c <= '9') return c - '0';
        if (c >= 'a' && c <= 'f') return c - 'a' + 10;
        if (c >= 'A' && c <= 'F') return c - 'A' + 10;
        return -1;
    };
    std::string out;
    out.reserve(path.size());
    for (std::size_t i = 0; i < path.size(); ++i) {
        if (path[i] == '%' && i + 2 < path.size() && hex(path[i + 1]) >= 0 &&
            hex(path[i + 2]) >= 0) {
            out.push_back(static_cast<char>(hex(path[i + 1]) * 16 + hex(path[i + 2])));
            i += 2;
        } else {
            out.push_back(path[i]);
        }
    }
    return out;
}

namespace {

struct Encoding {
    const char* suffix;
    const char* coding;
    const char* tag;
};
// Precompressed siblings in the order they are preferred.
constexpr Encoding kEncodings[] = {{".br", "br", "br"}, {".gz", "gzip", "gz"}};
constexpr const char* kDefaultType = "application/octet-stream";
const char* const kMonths[] = {"Jan", "Feb", "Mar", "Apr", "May", "Jun",
                               "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"};

std::string lower(std::string text) {
    std::transform(text.begin(), text.end(), text.begin(),
                   [](unsigned char c) { return static_cast<char>(std::tolower(c)); });
    return text;
}

std::string trim(const std::string& text) {
    const auto begin = text.find_first_not_of(" \t");
    if (begin == std::string::npos) return "";
    const auto end = text.find_last_not_of(" \t");
    return text.substr(begin, end - begin + 1);
}

std::vector<std::string> split(const std::string& text, char sep) {
    std::vector<std::string> parts;
    std::size_t start = 0;
    for (;;) {
        const auto at = text.find(sep, start);
        parts.push_back(text.substr(start, at - start));
        if (at == std::string::npos) return parts;
        start = at + 1;
    }
}

bool all_digits(const std::string& text) {
    return !text.empty() &&
           std::all_of(text.begin(), text.end(), [](char c) { return c >= '0' && c <= '9'; });
}

// A request header by name, repeated fields joined with ',' (as the environ has them).
std::optional<std::string> header(const Request& req, const char* name) {
    std::optional<std::string> out;
    for (const auto& [key, value] : req.headers) {
        if (key.size() != std::strlen(name) || lower(key) != name) continue;
        out = out ? *out + "," + value : value;
    }
    return out;
}

std::string http_date(time_t when) {
    static const char* const days[] = {"Sun", "Mon", "Tue", "Wed", "Thu", "Fri", "Sat"};
    tm t{};
    gmtime_r(&when, &t);
    char buf[64];
    std::snprintf(buf, sizeof buf, "%s, %02d %s %04d %02d:%02d:%02d GMT", days[t.tm_wday],
                  t.tm_mday, kMonths[t.tm_mon], t.tm_year + 1900, t.tm_hour, t.tm_min, t.tm_sec);
    return buf;
}

// IMF-fixdate as a Unix time; nothing for any other form.
std::optional<long long> parse_http_date(const std::string& raw) {
    const std::string t = trim(raw);
    if (t.size() != 29 || t.compare(3, 2, ", ") != 0 || t[7] != ' ' || t[11] != ' ' ||
        t[16] != ' ' || t[19] != ':' || t[22] != ':' || t.compare(25, 4, " GMT") != 0) {
        return std::nullopt;
    }
    int month = -1;
    for (int m = 0; m < 12; ++m) {
        if (t.compare(8, 3, kMonths[m]) == 0) month = m;
    }
    const std::string digits[] = {t.substr(5, 2), t.substr(12, 4), t.substr(17, 2), t.substr(20, 2),
                                  t.substr(23, 2)};
    if (month < 0 || !std::all_of(std::begin(digits), std::end(digits), all_digits)) {
        return std::nullopt;
    }
    tm parts{};
    parts.tm_mday = std::atoi(digits[0].c_str());
    parts.tm_year = std::atoi(digits[1].c_str()) - 1900;
    parts.tm_hour = std::atoi(digits[2].c_str());
    parts.tm_min = std::atoi(digits[3].c_str());
    parts.tm_sec = std::atoi(digits[4].c_str());
    parts.tm_mon = month;
    if (parts.tm_mday < 1 || parts.tm_mday > 31 || parts.tm_year < 70 || parts.tm_hour > 23 ||
        parts.tm_min > 59 || parts.tm_sec > 60) {
        return std::nullopt;
    }
    return static_cast<long long>(timegm(&parts));
}

// Whether Accept-Encoding allows `coding` (a q of all zero digits means no).
bool accepts(const std::string& header_value, const std::string& coding) {
    std::unordered_map<std::string, bool> ok_for;
    for (const std::string& part : split(header_value, ',')) {
        const auto params = split(part, ';');
        bool ok = true;
        for (std::size_t i = 1; i < params.size(); ++i) {
            const auto eq = params[i].find('=');
            if (lower(trim(params[i].substr(0, eq))) != "q") continue;
            const std::string value = eq == std::string::npos ? "" : params[i].substr(eq + 1);
            ok = value.find_first_of("123456789") != std::string::npos;
        }
        ok_for[lower(trim(params[0]))] = ok;
    }
    if (auto it = ok_for.find(coding); it != ok_for.end()) return it->second;
    if (coding == "gzip") {
        if (auto it = ok_for.find("x-gzip"); it != ok_for.end()) return it->second;
    }
    auto any = ok_for.find("*");
    return any != ok_for.end() && any->second;
}

bool etag_matches(const std::string& header_value, const std::string& etag) {
    for (const std::string& raw : split(header_value, ',')) {
        std::string candidate = trim(raw);
        if (candidate == "*") return true;
        if (candidate.rfind("W/", 0) == 0) candidate = candidate.substr(2);
        if (candidate == etag) return true;
    }
    return false;
}

// The range to send: {first, last}; {-1, -1} when unsatisfiable; nothing when the header is
// to be ignored (malformed, or several ranges).
std::optional<std::pair<long long, long long>> byte_range(const std::string& value,
                                                          long long size) {
    const auto eq = value.find('=');
    if (eq == std::string::npos) return std::nullopt;
    const std::string spec = trim(value.substr(eq + 1));
    if (lower(trim(value.substr(0, eq))) != "bytes" || spec.find(',') != std::string::npos) {
        return std::nullopt;
    }
    const auto dash = spec.find('-');
    if (dash == std::string::npos) return std::nullopt;
    const std::string first_text = trim(spec.substr(0, dash));
    const std::string last_text = trim(spec.substr(dash + 1));
    if ((!first_text.empty() && !all_digits(first_text)) ||
        (!last_text.empty() && !all_digits(last_text)) || first_text.size() > 18 ||
        last_text.size() > 18) {
        return std::nullopt;
    }
    if (first_text.empty()) {
        if (last_text.empty()) return std::nullopt;
        const long long suffix = std::atoll(last_text.c_str());
        if (suffix == 0 || size == 0) return std::make_pair(-1LL, -1LL);
        return std::make_pair(std::max(0LL, size - suffix), size - 1);
    }
    const long long first = std::atoll(first_text.c_str());
    const long long last = last_text.empty() ? size - 1 : std::atoll(last_text.c_str());
    if (!last_text.empty() && last < first) return std::nullopt;
    if (first >= size) return std::make_pair(-1LL, -1LL);
    return std::make_pair(first, std::min(last, size - 1));
}

// realpath(path) when it lies inside `root`.
std::optional<std::string> inside(const std::string& root, const std::string& path) {
    char* resolved = ::realpath(path.c_str(), nullptr);
    if (resolved == nullptr) return std::nullopt;
    std::string real(resolved);
    std::free(resolved);
    if (real.size() <= root.size() || real.compare(0, root.size(), root) != 0 ||
        real[root.size()] != '/') {
        return std::nullopt;
    }
    return real;
}

// An open regular file, or -1.
int open_regular(const std::string& path, struct stat* st) {
    const int fd = ::open(path.c_str(), O_RDONLY | O_NOFOLLOW | O_CLOEXEC | O_NONBLOCK);
    if (fd < 0) return -1;
    if (fstat(fd, st) != 0 || !S_ISREG(st->st_mode)) {
        ::close(fd);
        return -1;
    }
    return fd;
}

bool is_regular(const std::string& path) {
    struct stat st {};
    return ::stat(path.c_str(), &st) == 0 && S_ISREG(st.st_mode);
}

std::string line(const std::string& name, const std::string& value) {
    return name + ": " + value + "\r\n";
}

StaticPlan error_plan(int status, const std::string& extra = "") {
    StaticPlan plan;
    plan.status = status;
    plan.body = std::to_string(status) + " " + static_reason(status) + "\n";
    plan.headers = line("Content-Type", "text/plain; charset=utf-8") +
                   line("Content-Length", std::to_string(plan.body.size())) + extra;
    return plan;
}

std::string path_of(const std::string& target) {
    return target.substr(0, std::min(target.find('?'), target.find('#')));
}

}  // namespace

const StaticMount* match_static(const std::vector<StaticMount>& mounts, const std::string& target) {
    if (target.empty() || target[0] != '/') return nullptr;
    const std::string path = target.substr(0, target.find('?'));
    for (const StaticMount& mount : mounts) {
        if (path.compare(0, mount.prefix.size(), mount.prefix) == 0) return &mount;
    }
    return nullptr;
}

StaticPlan plan_static(const StaticMount& mount, const MimeTypes& types, const Request& req) {
    if (req.method != "GET" && req.method != "HEAD") {
        return error_plan(405, line("Allow", "GET, HEAD"));
    }
    const std::string rel = percent_decode(path_of(req.target).substr(mount.prefix.size()));
    if (rel.empty() || rel.find('\0') != std::string::npos) return error_plan(404);
    for (const std::string& segment : split(rel, '/')) {
        if (segment.empty() || segment == "." || segment == "..") return error_plan(404);
    }
    const auto real = inside(mount.root, mount.root + "/" + rel);
    struct stat st {};
    int fd = real ? open_regular(*real, &st) : -1;
    if (fd < 0) return error_plan(404);
    StaticPlan plan;
    plan.fd = fd;
    const std::string name = rel.substr(rel.rfind('/') + 1);
    const auto dot = name.rfind('.');
    const auto type =
        dot == std::string::npos ? types.end() : types.find(lower(name.substr(dot + 1)));
    std::string content_type = type == types.end() ? kDefaultType : type->second;
    const std::string accept = header(req, "accept-encoding").value_or("");
    std::string encoding_lines;
    std::string tag;
    bool has_variants = false;
    for (const Encoding& enc : kEncodings) {
        const auto sibling = inside(mount.root, *real + enc.suffix);
        if (!sibling) continue;
        if (!tag.empty() || !accepts(accept, enc.coding)) {
            has_variants = has_variants || is_regular(*sibling);
            continue;
        }
        struct stat other_st {};
        const int other = open_regular(*sibling, &other_st);
        if (other >= 0) {
            ::close(plan.fd);
            plan.fd = other;
            st = other_st;
            tag = enc.tag;
            has_variants = true;
            encoding_lines += line("Content-Encoding", enc.coding);
        }
    }
    if (has_variants) encoding_lines += line("Vary", "Accept-Encoding");
    const long long mtime = static_cast<long long>(st.st_mtime);
    const long long size = static_cast<long long>(st.st_size);
    char etag_buf[96];
    std::snprintf(etag_buf, sizeof etag_buf, "\"%llx-%llx%s%s\"", mtime, size,
                  tag.empty() ? "" : "-", tag.c_str());
    const std::string etag = etag_buf;
    const std::string validators =
        line("ETag", etag) + line("Last-Modified", http_date(static_cast<time_t>(mtime)));
    const auto inm = header(req, "if-none-match");
    const auto ims = header(req, "if-modified-since");
    const auto since = !inm && ims ? parse_http_date(*ims) : std::nullopt;
    if ((inm && etag_matches(*inm, etag)) || (since && mtime <= *since)) {
        StaticPlan not_modified;
        not_modified.status = 304;
        not_modified.headers = (has_variants ? line("Vary", "Accept-Encoding") : "") + validators;
        return not_modified;
    }
    auto range_header = header(req, "range");
    if (range_header) {
        if (auto if_range = header(req, "if-range")) {
            const std::string value = trim(*if_range);
            const bool fresh = value.rfind('"', 0) == 0 || value.rfind("W/", 0) == 0
                                   ? value == etag
                                   : parse_http_date(value) == std::optional<long long>(mtime);
            if (!fresh) range_header.reset();
        }
    }
    const auto span = range_header ? byte_range(*range_header, size) : std::nullopt;
    std::string range_line;
    plan.status = 200;
    plan.length = static_cast<std::uint64_t>(size);
    if (span && span->first < 0) {
        // Its size is the chosen variant's: the Vary says which one (docs/static.md).
        return error_plan(416, (has_variants ? line("Vary", "Accept-Encoding") : "") +
                                   line("Content-Range", "bytes */" + std::to_string(size)));
    }
    if (span) {
        plan.status = 206;
        plan.offset = static_cast<std::uint64_t>(span->first);
        plan.length = static_cast<std::uint64_t>(span->second - span->first + 1);
        range_line =
            line("Content-Range", "bytes " + std::to_string(span->first) + "-" +
                                      std::to_string(span->second) + "/" + std::to_string(size));
    }
    plan.headers = line("Content-Type", content_type) +
                   line("Content-Length", std::to_string(plan.length)) + encoding_lines +
                   range_line + validators + line("Accept-Ranges", "bytes");
    return plan;
}

// --- the engine's side: one static response on a serving thread --------------------------------

bool Server::serve_static(Connection& conn, const Request& req, const StaticMount& mount) {
    const std::uint64_t token = conn.warmup ? 0 : begin_request(monotonic());  // as handle()
    const StaticPlan plan = plan_static(mount, config_.mime_types, req);
    // The framing rules of every response (wsgi_call.cpp's build_head, response.py's _head).
    // An upgrade is answered, then the connection closes (WSGI cannot take it over).
    bool keep = req.keep_alive && !req.upgrade && !draining() && config_.keepalive > 0;
    const bool http10 = req.version_major == 1 && req.version_minor == 0;
    std::string head = "HTTP/1.1 " + std::to_string(plan.status) + " " +
                       static_reason(plan.status) + "\r\n" + plan.headers;
    if (!keep) {
        head += "Connection: close\r\n";
    } else if (http10) {
        head += "Connection: keep-alive\r\n";
    }
    head += date_header() + config_.version_header + "\r\n";
    const bool with_body = req.method != "HEAD" && plan.status != 304;
    iovec iov[2] = {{head.data(), head.size()},
                    {const_cast<char*>(plan.body.data()), with_body ? plan.body.size() : 0}};
    std::string why;
    std::uint64_t sent = with_body ? plan.body.size() : 0;
    std::optional<Corked> corked;
    if (with_body && plan.fd >= 0) corked.emplace(conn);
    bool ok = send_all(conn, iov, 2, &why);
    if (ok && with_body && plan.fd >= 0) {
        sent = 0;
        ok = send_file(conn, plan.fd, static_cast<std::int64_t>(plan.offset), plan.length, &sent,
                       &why);
        corked.reset();
        if (ok && sent < plan.length) {
            log(kWarning, req.method + " " + req.target.substr(0, 200) +
                              ": the file shrank while it was sent; closing");
            keep = false;
        }
    }
    if (!ok) {
        log(kInfo, conn.remote() + ": client disconnected during the response to " + req.method +
                       " " + req.target.substr(0, 200) + ": " + why);
        keep = false;
    }
    if (conn.warmup) return keep;  // neither counted nor logged
    const double elapsed = monotonic() - req.started;
    end_request(token, plan.status, elapsed, false);
    if (access_log() != nullptr) {
        AccessEntry entry{
            conn.remote(),
            req.method,
            req.target,
            "HTTP/" + std::to_string(req.version_major) + "." + std::to_string(req.version_minor),
            plan.status,
            sent,
            elapsed * 1000.0};
        std::lock_guard<std::mutex> lock(log_mu_);
        if (access_.size() < 100000) access_.push_back(std::move(entry));
    }
    return keep;
}

}  // namespace molt::native
