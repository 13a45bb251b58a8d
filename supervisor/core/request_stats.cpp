#include "supervisor/core/request_stats.hpp"

#include <charconv>

namespace molt::core {

namespace {

std::optional<std::uint64_t> number(std::string_view text) {
    std::uint64_t value = 0;
    auto [end, error] = std::from_chars(text.data(), text.data() + text.size(), value);
    if (error != std::errc() || end != text.data() + text.size() || text.empty()) {
        return std::nullopt;
    }
    return value;
}

// Splits `text` at the first `sep`: returns the part before it and leaves the rest in `text`.
std::string_view take(std::string_view& text, char sep) {
    auto at = text.find(sep);
    std::string_view head = text.substr(0, at);
    text = at == std::string_view::npos ? std::string_view() : text.substr(at + 1);
    return head;
}

bool parse_class(std::string_view entry, RequestStats& out) {
    // <class>:<sum_us>:<b0>,<b1>,... with at least one bucket and no empty field.
    auto first = entry.find(':');
    auto second = first == std::string_view::npos ? first : entry.find(':', first + 1);
    if (second == std::string_view::npos || second + 1 == entry.size()) return false;
    std::string_view name = entry.substr(0, first);
    std::size_t cls = 0;
    while (cls < kStatusClasses.size() && kStatusClasses[cls] != name) ++cls;
    if (cls == kStatusClasses.size()) return false;
    auto sum = number(entry.substr(first + 1, second - first - 1));
    if (!sum) return false;
    ClassDurations& durations = out.by_class[cls];
    durations.sum_us = *sum;
    std::string_view buckets = entry.substr(second + 1);
    for (std::size_t bucket = 0;; ++bucket) {
        auto comma = buckets.find(',');
        auto count = number(buckets.substr(0, comma));
        if (!count || bucket >= kBucketCount) return false;
        durations.buckets[bucket] = *count;
        if (comma == std::string_view::npos) return true;
        buckets = buckets.substr(comma + 1);
    }
}

}  // namespace

std::uint64_t ClassDurations::count() const {
    std::uint64_t total = 0;
    for (auto n : buckets) total += n;
    return total;
}

void RequestStats::add(const RequestStats& other) {
    for (std::size_t cls = 0; cls < by_class.size(); ++cls) {
        for (std::size_t b = 0; b < kBucketCount; ++b) {
            by_class[cls].buckets[b] += other.by_class[cls].buckets[b];
        }
        by_class[cls].sum_us += other.by_class[cls].sum_us;
    }
    exceptions += other.exceptions;
}

bool RequestStats::empty() const {
    for (const auto& cls : by_class) {
        if (cls.count() != 0) return false;
    }
    return exceptions == 0;
}

std::optional<RequestStats> parse_durations(std::string_view text) {
    RequestStats out;
    while (!text.empty()) {
        if (!parse_class(take(text, ';'), out)) return std::nullopt;
    }
    return out;
}

}  // namespace molt::core
