#include "config/units.hpp"

#include <array>
#include <charconv>
#include <limits>

namespace molt::config {
namespace {

std::string_view trim(std::string_view text) {
    const auto first = text.find_first_not_of(" \t");
    if (first == std::string_view::npos) return {};
    const auto last = text.find_last_not_of(" \t");
    return text.substr(first, last - first + 1);
}

// Reads the leading run of decimal digits; nullopt when there is none or it overflows.
std::optional<std::uint64_t> take_integer(std::string_view& text) {
    std::uint64_t value = 0;
    const auto* begin = text.data();
    const auto [end, ec] = std::from_chars(begin, begin + text.size(), value);
    if (ec != std::errc{} || end == begin) return std::nullopt;
    text.remove_prefix(static_cast<std::size_t>(end - begin));
    return value;
}

bool multiply_add(std::uint64_t& total, std::uint64_t value, std::uint64_t factor,
                  std::uint64_t limit) {
    if (factor != 0 && value > limit / factor) return false;
    const std::uint64_t product = value * factor;
    if (product > limit - total) return false;
    total += product;
    return true;
}

struct DurationUnit {
    std::string_view suffix;
    std::uint64_t millis;
};

// Largest first; a duration must use them in this order, each at most once, so that a
// typo like "30s1m" is an error rather than a surprise.
constexpr std::array<DurationUnit, 4> kDurationUnits{{
    {"h", 3'600'000},
    {"m", 60'000},
    {"s", 1'000},
    {"ms", 1},
}};

// Index into kDurationUnits of the unit `text` starts with; "ms" wins over "m".
std::optional<std::size_t> take_duration_unit(std::string_view& text) {
    for (std::size_t i : {std::size_t{3}, std::size_t{0}, std::size_t{1}, std::size_t{2}}) {
        if (text.starts_with(kDurationUnits[i].suffix)) {
            text.remove_prefix(kDurationUnits[i].suffix.size());
            return i;
        }
    }
    return std::nullopt;
}

struct SizeUnit {
    std::string_view suffix;  // lower case
    std::uint64_t factor;
};

constexpr std::uint64_t kKi = 1024;
constexpr std::array<SizeUnit, 9> kSizeUnits{{
    {"b", 1},
    {"kb", 1000},
    {"mb", 1000 * 1000},
    {"gb", 1000 * 1000 * 1000},
    {"tb", 1000ULL * 1000 * 1000 * 1000},
    {"kib", kKi},
    {"mib", kKi* kKi},
    {"gib", kKi* kKi* kKi},
    {"tib", kKi* kKi* kKi* kKi},
}};

std::string to_lower(std::string_view text) {
    std::string lower(text);
    for (char& c : lower) {
        if (c >= 'A' && c <= 'Z') c = static_cast<char>(c - 'A' + 'a');
    }
    return lower;
}

}  // namespace

std::optional<Duration> parse_duration(std::string_view text) {
    text = trim(text);
    if (text.empty()) return std::nullopt;
    // Durations are stored as signed milliseconds; stay well inside that range.
    constexpr auto kLimit = static_cast<std::uint64_t>(std::numeric_limits<std::int64_t>::max());
    std::uint64_t total = 0;
    if (text.find_first_not_of("0123456789") == std::string_view::npos) {
        const auto seconds = take_integer(text);
        if (!seconds || !multiply_add(total, *seconds, 1000, kLimit)) return std::nullopt;
        return Duration(static_cast<std::int64_t>(total));
    }
    std::optional<std::size_t> previous_unit;
    while (!text.empty()) {
        const auto value = take_integer(text);
        if (!value) return std::nullopt;
        const auto unit = take_duration_unit(text);
        if (!unit || (previous_unit && *unit <= *previous_unit)) return std::nullopt;
        if (!multiply_add(total, *value, kDurationUnits[*unit].millis, kLimit)) return std::nullopt;
        previous_unit = unit;
    }
    return Duration(static_cast<std::int64_t>(total));
}

std::optional<std::uint64_t> parse_size(std::string_view text) {
    text = trim(text);
    const auto value = take_integer(text);
    if (!value) return std::nullopt;
    const std::string unit = to_lower(trim(text));
    if (unit.empty()) return value;
    for (const auto& candidate : kSizeUnits) {
        if (unit != candidate.suffix) continue;
        std::uint64_t total = 0;
        if (!multiply_add(total, *value, candidate.factor,
                          std::numeric_limits<std::uint64_t>::max())) {
            return std::nullopt;
        }
        return total;
    }
    return std::nullopt;
}

std::string format_duration(Duration duration) {
    auto millis = duration.count();
    if (millis == 0) return "0s";
    std::string text;
    if (millis < 0) {
        text = "-";
        millis = -millis;
    }
    for (const auto& unit : kDurationUnits) {
        const auto size = static_cast<std::int64_t>(unit.millis);
        if (millis >= size) {
            text += std::to_string(millis / size);
            text += unit.suffix;
            millis %= size;
        }
    }
    return text;
}

std::string format_size(std::uint64_t bytes) {
    if (bytes == 0) return "0";
    static constexpr std::array<std::string_view, 4> kBinary{"TiB", "GiB", "MiB", "KiB"};
    static constexpr std::array<std::string_view, 4> kDecimal{"TB", "GB", "MB", "KB"};
    for (std::size_t i = 0; i < kBinary.size(); ++i) {
        const std::uint64_t factor = kSizeUnits[8 - i].factor;
        if (bytes % factor == 0) return std::to_string(bytes / factor) + std::string(kBinary[i]);
    }
    for (std::size_t i = 0; i < kDecimal.size(); ++i) {
        const std::uint64_t factor = kSizeUnits[4 - i].factor;
        if (bytes % factor == 0) return std::to_string(bytes / factor) + std::string(kDecimal[i]);
    }
    return std::to_string(bytes) + "B";
}

}  // namespace molt::config
