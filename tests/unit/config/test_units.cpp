// Durations and sizes: the forms users write, and the forms we refuse.
#include <doctest/doctest.h>

#include "config/units.hpp"

namespace molt::config {
namespace {

using std::chrono::hours;
using std::chrono::milliseconds;
using std::chrono::minutes;
using std::chrono::seconds;

TEST_CASE("parse_duration accepts units, compounds and bare seconds") {
    const struct {
        const char* text;
        Duration expected;
    } cases[] = {
        {"30s", seconds(30)},
        {"500ms", milliseconds(500)},
        {"2m", minutes(2)},
        {"1h", hours(1)},
        {"1m30s", seconds(90)},
        {"1h2m3s4ms", hours(1) + minutes(2) + seconds(3) + milliseconds(4)},
        {"1s500ms", milliseconds(1500)},
        {"0", Duration{0}},
        {"0s", Duration{0}},
        {"0ms", Duration{0}},
        {"60", seconds(60)},  // gunicorn-style bare number: seconds
        {" 5s ", seconds(5)},
        {"90m", minutes(90)},
    };
    for (const auto& c : cases) {
        CAPTURE(c.text);
        const auto parsed = parse_duration(c.text);
        REQUIRE(parsed.has_value());
        CHECK(*parsed == c.expected);
    }
}

TEST_CASE("parse_duration rejects everything else") {
    for (const char* text :
         {"", " ", "s", "-5s", "1.5s", "5 s", "5sec", "30S", "1m 30s", "30s1m", "1s1s", "5d", "ms",
          "1h30", "+5s", "99999999999999999999s", "9223372036854775807h"}) {
        CAPTURE(text);
        CHECK_FALSE(parse_duration(text).has_value());
    }
}

TEST_CASE("format_duration is canonical and parses back") {
    CHECK(format_duration(Duration{0}) == "0s");
    CHECK(format_duration(milliseconds(500)) == "500ms");
    CHECK(format_duration(seconds(90)) == "1m30s");
    CHECK(format_duration(hours(1)) == "1h");
    CHECK(format_duration(milliseconds(3'661'001)) == "1h1m1s1ms");
    for (auto d : {milliseconds(1), milliseconds(1500), milliseconds(86'400'000),
                   milliseconds(123'456'789)}) {
        CAPTURE(d.count());
        CHECK(parse_duration(format_duration(d)) == d);
    }
}

TEST_CASE("parse_size accepts decimal and binary units and bare bytes") {
    const struct {
        const char* text;
        std::uint64_t expected;
    } cases[] = {
        {"0", 0},
        {"1234", 1234},
        {"10B", 10},
        {"100KB", 100'000},
        {"100kB", 100'000},
        {"5MB", 5'000'000},
        {"2GB", 2'000'000'000},
        {"1TB", 1'000'000'000'000},
        {"64KiB", 64 * 1024},
        {"512MiB", 512ULL * 1024 * 1024},
        {"512mib", 512ULL * 1024 * 1024},
        {"1GiB", 1024ULL * 1024 * 1024},
        {"2TiB", 2ULL << 40},
        {"64 KiB", 64 * 1024},
        {" 1MiB ", 1024 * 1024},
    };
    for (const auto& c : cases) {
        CAPTURE(c.text);
        const auto parsed = parse_size(c.text);
        REQUIRE(parsed.has_value());
        CHECK(*parsed == c.expected);
    }
}

TEST_CASE("parse_size rejects ambiguous letters, fractions, negatives and overflow") {
    for (const char* text : {"", "k", "100k", "512m", "1g", "1.5GiB", "-1", "1 GiBs", "1PiB", "MiB",
                             "20000000TiB", "18446744073709551616"}) {
        CAPTURE(text);
        CHECK_FALSE(parse_size(text).has_value());
    }
}

TEST_CASE("format_size picks the largest exact unit and parses back") {
    CHECK(format_size(0) == "0");
    CHECK(format_size(512ULL * 1024 * 1024) == "512MiB");
    CHECK(format_size(1024 * 1024) == "1MiB");
    CHECK(format_size(8192) == "8KiB");
    CHECK(format_size(100'000) == "100KB");
    CHECK(format_size(1'000'000) == "1MB");
    CHECK(format_size(1234) == "1234B");
    for (std::uint64_t bytes : {1ULL, 999ULL, 1000ULL, 1024ULL, 1536ULL, 3ULL << 40}) {
        CAPTURE(bytes);
        CHECK(parse_size(format_size(bytes)) == bytes);
    }
}

}  // namespace
}  // namespace molt::config
