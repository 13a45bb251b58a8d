// Durations and sizes as they are written in molt.yaml and on the command line.
//
// Durations: one or more `<integer><unit>` parts with units h, m, s, ms, largest first
// ("1h", "1m30s", "500ms"), or a bare integer meaning seconds ("60", "0"). Sizes: an
// integer with an optional unit: B, KB/MB/GB/TB (powers of 1000) or KiB/MiB/GiB/TiB (powers
// of 1024), case-insensitive, an optional space before the unit; a bare integer is bytes.
// Single-letter units ("100k", "512m") are rejected: they mean 1000 in some tools and 1024
// in others.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <string_view>

#include "config/config.hpp"

namespace molt::config {

// Parses a duration; nullopt when the text is not one of the accepted forms, is negative,
// or overflows. Never throws.
std::optional<Duration> parse_duration(std::string_view text);

// Parses a size in bytes; nullopt when the text is not one of the accepted forms or
// overflows. Never throws.
std::optional<std::uint64_t> parse_size(std::string_view text);

// Canonical text that parse_duration reads back: "0s", "500ms", "1m30s", "1h".
std::string format_duration(Duration duration);

// Canonical text that parse_size reads back: the largest exact binary unit ("512MiB"),
// else the largest exact decimal unit ("100KB"), else bytes ("1234B"); zero is "0".
std::string format_size(std::uint64_t bytes);

// Human-readable lists of the accepted forms, used in error messages and the reference.
inline constexpr std::string_view kDurationForms =
    "a duration like 30s, 500ms, 2m, 1h, 1m30s, or a whole number of seconds";
inline constexpr std::string_view kSizeForms =
    "a size like 512MiB, 1GiB, 100KB (1000-based), 64KiB (1024-based), or a whole number of "
    "bytes";

}  // namespace molt::config
