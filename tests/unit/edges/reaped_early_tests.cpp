#include <doctest/doctest.h>

#include "supervisor/loop/reaped_early.hpp"

using molt::loop::ReapedEarly;
using std::chrono::milliseconds;

TEST_CASE("an exit reaped before its fork answer is replayed once") {
    ReapedEarly early;
    early.remember(4242, 9, milliseconds(1000));
    CHECK_FALSE(early.take(4243, milliseconds(1001)).has_value());
    auto status = early.take(4242, milliseconds(1002));
    REQUIRE(status.has_value());
    CHECK(*status == 9);
    CHECK_FALSE(early.take(4242, milliseconds(1003)).has_value());
}

TEST_CASE("an exit kept longer than kKeptFor is forgotten: its pid may belong to a new worker") {
    ReapedEarly early;
    early.remember(4242, 0, milliseconds(0));
    CHECK(early.take(4242, ReapedEarly::kKeptFor + milliseconds(1)) == std::nullopt);
    early.remember(7, 0, milliseconds(0));
    early.remember(8, 0, ReapedEarly::kKeptFor + milliseconds(5));  // forgets 7 on the way
    CHECK(early.size() == 1);
}

TEST_CASE("at most kMaxKept exits are kept, the oldest forgotten first (not the lowest pid)") {
    ReapedEarly early;
    early.remember(1, 0, milliseconds(5));  // the lowest pid, but not the oldest
    for (pid_t pid = 1000; pid < 1000 + static_cast<pid_t>(ReapedEarly::kMaxKept); ++pid)
        early.remember(pid, 0, milliseconds(pid == 1000 ? 1 : 10));
    CHECK(early.size() == ReapedEarly::kMaxKept);
    CHECK_FALSE(early.take(1000, milliseconds(11)).has_value());  // the oldest went
    CHECK(early.take(1, milliseconds(11)).has_value());
}

TEST_CASE("contains() looks without taking: a late SPARE_PID= and a FORKED= both see it") {
    ReapedEarly early;
    early.remember(4242, 9, milliseconds(1000));
    CHECK(early.contains(4242, milliseconds(1001)));
    CHECK_FALSE(early.contains(4243, milliseconds(1001)));
    CHECK(early.take(4242, milliseconds(1002)).has_value());  // still there to be taken
    CHECK_FALSE(early.contains(4242, milliseconds(1003)));
    early.remember(7, 0, milliseconds(0));
    CHECK_FALSE(early.contains(7, ReapedEarly::kKeptFor + milliseconds(1)));
}
