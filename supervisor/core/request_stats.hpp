// Request metrics as the workers report them in their heartbeats (`DURATIONS=`, `EXCEPTIONS=`)
// and as the master sums them for /metrics. Pure: parsing, adding, nothing else.
//
// Wire form of DURATIONS= (written by molt_shim/request_metrics.py and the native engine's
// RequestMetrics::encode): one entry per status class that has requests, ';'-separated, each
// `<class>:<sum of durations in microseconds>:<b0>,<b1>,...`, where bI counts the requests with
// a duration in (kDurationBuckets[I-1], kDurationBuckets[I]] seconds (the last one: above the
// last bound). Not cumulative over buckets; cumulative over the worker's life. Trailing zero
// buckets are left out. Example: `2xx:51234:10,40,3;5xx:1200:0,1`.
#pragma once

#include <array>
#include <cstdint>
#include <optional>
#include <string_view>

namespace molt::core {

// Upper bounds in seconds (Prometheus `le`), the same in both engines and here.
inline constexpr std::array<double, 13> kDurationBuckets = {
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0};
inline constexpr std::size_t kBucketCount = kDurationBuckets.size() + 1;  // + the +Inf one
inline constexpr std::array<std::string_view, 5> kStatusClasses = {"1xx", "2xx", "3xx", "4xx",
                                                                   "5xx"};

struct ClassDurations {
    std::array<std::uint64_t, kBucketCount> buckets{};  // per bucket, not cumulative
    std::uint64_t sum_us = 0;
    std::uint64_t count() const;
};

struct RequestStats {
    std::array<ClassDurations, kStatusClasses.size()> by_class{};
    std::uint64_t exceptions = 0;

    void add(const RequestStats& other);
    bool empty() const;
};

// The DURATIONS= value parsed into `out.by_class` (exceptions untouched); nullopt when it is
// malformed (the master then keeps the worker's previous value).
std::optional<RequestStats> parse_durations(std::string_view text);

}  // namespace molt::core
