#include <doctest/doctest.h>
#include <signal.h>

#include "supervisor/common/text.hpp"

using molt::text::signal_name;
using molt::text::truncate_utf8;

TEST_CASE("signal_name names the signals molt sends and receives") {
    CHECK(signal_name(SIGTERM) == "SIGTERM");
    CHECK(signal_name(SIGKILL) == "SIGKILL");
    CHECK(signal_name(SIGHUP) == "SIGHUP");
    CHECK(signal_name(SIGUSR2) == "SIGUSR2");
    CHECK(signal_name(SIGTTIN) == "SIGTTIN");
    CHECK(signal_name(SIGSEGV) == "SIGSEGV");
}

TEST_CASE("signal_name says which number an unknown signal was") {
    CHECK(signal_name(0) == "signal 0");
    CHECK(signal_name(200) == "signal 200");
}

TEST_CASE("truncate_utf8 keeps short text and cuts long text at the limit") {
    CHECK(truncate_utf8("abc", 3) == "abc");
    CHECK(truncate_utf8("abcdef", 4) == "abcd");
    CHECK(truncate_utf8("", 0) == "");
}

TEST_CASE("truncate_utf8 never splits a multi-byte sequence") {
    std::string text =
        "ab\xC3\xA9"
        "cd";                                       // "abécd": é is 2 bytes at 2..3
    CHECK(truncate_utf8(text, 3) == "ab");          // would split é
    CHECK(truncate_utf8(text, 4) == "ab\xC3\xA9");  // é complete
    std::string euro = "\xE2\x82\xAC\xE2\x82\xAC";  // two 3-byte sequences
    CHECK(truncate_utf8(euro, 5) == "\xE2\x82\xAC");
    CHECK(truncate_utf8(euro, 2) == "");
}
