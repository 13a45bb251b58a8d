// The request metrics of heartbeats (DURATIONS=, EXCEPTIONS=) and the phase durations the
// master shows on /metrics.
#include "harness.hpp"
#include "supervisor/core/request_stats.hpp"

using namespace molt::test;

TEST_CASE("DURATIONS= parses per class, with trailing zero buckets left out") {
    auto stats = parse_durations("2xx:51234:10,40,3;5xx:1200:0,1");
    REQUIRE(stats.has_value());
    CHECK(stats->by_class[1].sum_us == 51234);
    CHECK(stats->by_class[1].buckets[0] == 10);
    CHECK(stats->by_class[1].buckets[2] == 3);
    CHECK(stats->by_class[1].buckets[3] == 0);
    CHECK(stats->by_class[1].count() == 53);
    CHECK(stats->by_class[4].count() == 1);
    CHECK(stats->by_class[0].count() == 0);
    CHECK(parse_durations("")->empty());
    // Every bucket, the +Inf one included, and no more.
    CHECK(parse_durations("4xx:1:0,0,0,0,0,0,0,0,0,0,0,0,0,9")->by_class[3].buckets[13] == 9);
    for (const char* bad : {"2xx:1:0,0,0,0,0,0,0,0,0,0,0,0,0,0,1", "6xx:1:1", "2xx:1", "2xx::1",
                            "2xx:1:a", "2xx:1:1,", "2xx:-1:1", "2xx:1:1;;"}) {
        CAPTURE(bad);
        CHECK_FALSE(parse_durations(bad).has_value());
    }
}

TEST_CASE("RequestStats adds bucket by bucket") {
    auto a = *parse_durations("2xx:10:1,2");
    a.exceptions = 2;
    auto b = *parse_durations("2xx:5:0,1,1;5xx:7:1");
    b.exceptions = 1;
    a.add(b);
    CHECK(a.by_class[1].buckets[1] == 3);
    CHECK(a.by_class[1].buckets[2] == 1);
    CHECK(a.by_class[1].sum_us == 15);
    CHECK(a.by_class[4].count() == 1);
    CHECK(a.exceptions == 3);
}

TEST_CASE("a heartbeat's request metrics replace the worker's last ones; a bad one is ignored") {
    Harness h;
    h.start(make_release("/srv/app/v1", make_config(1)));
    h.make_all_ready(1);
    Pid pid = h.pids(1)[0];
    h.say(pid, "WATCHDOG=1\nREQUESTS=3\nDURATIONS=2xx:300:1,2\nEXCEPTIONS=1");
    const auto& worker = [&]() -> const Worker& {
        for (const auto& [id, w] : h.sup.workers()) {
            if (w.pid == pid) return w;
        }
        FAIL("no worker");
        throw;
    };
    CHECK(worker().counters.stats.by_class[1].count() == 3);
    CHECK(worker().counters.stats.exceptions == 1);
    h.say(pid, "WATCHDOG=1\nREQUESTS=4\nDURATIONS=2xx:oops");
    CHECK(worker().counters.stats.by_class[1].count() == 3);
    h.say(pid, "WATCHDOG=1\nREQUESTS=4\nDURATIONS=2xx:400:1,3");
    CHECK(worker().counters.stats.by_class[1].count() == 4);
    CHECK(worker().counters.stats.exceptions == 1);  // kept when not sent again
}

TEST_CASE("the last boot, live and drain durations follow the generations") {
    Harness h;
    h.start(make_release("/srv/app/v1", make_config(1)));
    h.advance(2s);
    h.make_all_ready(1);
    CHECK(h.sup.last_phases().boot == Duration(2000));
    CHECK_FALSE(h.sup.last_phases().live.has_value());
    h.advance(10s);
    h.hup(make_release("/srv/app/v2", make_config(1)));
    h.advance(1s);
    h.make_all_ready(2);
    CHECK(h.sup.last_phases().boot == Duration(1000));
    CHECK(h.sup.last_phases().live == Duration(11000));
    CHECK_FALSE(h.sup.last_phases().drain.has_value());
    h.advance(3s);
    h.exit(h.pids(1)[0], 0);
    CHECK(h.sup.last_phases().drain == Duration(3000));
}
