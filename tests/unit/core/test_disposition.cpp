// A worker's disposition (what the master decided about it) and the deadlines the rules
// register: every transition of Supervisor::dispose(), including the ones it refuses.
#include "harness.hpp"

using namespace molt::test;

namespace {

struct Serving : Harness {
    explicit Serving(std::shared_ptr<const config::Config> config = make_config(2),
                     Policy policy = {})
        : Harness(policy) {
        start(make_release("/srv/app/v1", std::move(config)));
        make_all_ready(1);
        REQUIRE(gen_state(1) == GenerationState::live);
        all.clear();
    }
    Pid in_slot(int slot, Disposition disposition = Disposition::serving) const {
        for (const auto& [id, w] : sup.workers()) {
            if (w.slot == slot && w.disposition == disposition) return w.pid;
        }
        FAIL("no worker in slot " << slot << " that is " << to_string(disposition));
        return 0;
    }
    Disposition disposition(Pid pid) const { return worker(pid).disposition; }
    // The disposition changes logged so far, as "from -> to" for one pid.
    std::vector<std::string> changes(Pid pid) const {
        std::vector<std::string> result;
        for (const auto& line : of<WriteLog>(all)) {
            auto arrow = line.text.find(" -> ");
            if (line.pid != pid || arrow == std::string::npos) continue;
            auto colon = line.text.rfind(": ", arrow);
            auto paren = line.text.find(" (", arrow);
            result.push_back(line.text.substr(colon + 2, paren - colon - 2));
        }
        return result;
    }
};

bool contains(const std::vector<std::string>& lines, const std::string& line) {
    return std::find(lines.begin(), lines.end(), line) != lines.end();
}

}  // namespace

TEST_CASE("a new worker is serving, and every change of disposition is logged with gen and pid") {
    Serving h;
    Pid pid = h.in_slot(0);
    CHECK(h.disposition(pid) == Disposition::serving);
    h.say(pid, "RETIRE=max_requests");
    CHECK(h.disposition(pid) == Disposition::retiring);
    CHECK(contains(h.changes(pid), "serving -> retiring"));
    for (const auto& line : h.of<WriteLog>(h.all)) {
        if (line.text.find("serving -> retiring") != std::string::npos) {
            CHECK(line.generation == 1);
            CHECK(line.pid == pid);
        }
    }
}

TEST_CASE("recycling: serving -> retiring -> draining -> stopped_accepting, then exit") {
    Serving h;
    Pid old = h.in_slot(0);
    h.say(old, "RETIRE=max_requests");
    Pid successor = h.in_slot(0);  // the only serving worker of slot 0 now
    CHECK(successor != old);
    h.workers_confirm_drain = false;
    h.ready(successor);
    CHECK(h.disposition(old) == Disposition::draining);
    CHECK(h.worker(old).state == WorkerState::draining);
    CHECK(h.worker(old).kill_at == h.now + 5s);  // timeouts.graceful
    h.say(old, "STOPPING=1");
    CHECK(h.disposition(old) == Disposition::stopped_accepting);
    CHECK(h.worker(old).kill_at == h.now + 5s);  // confirming does not postpone the SIGKILL
    auto changes = h.changes(old);
    CHECK(contains(changes, "retiring -> draining"));
    CHECK(contains(changes, "draining -> stopped_accepting"));
    h.exit(old, 0);
    CHECK_FALSE(h.has_worker(old));
}

TEST_CASE("a retiring worker still gets liveness checks; aborting it ends the retirement") {
    // The successor's boot deadline lies beyond the heartbeat check, so the clock reaches the
    // check without skipping a deadline (a skipped one reads as a paused master).
    Serving h(make_config(1, [](config::Config& c) { c.timeouts.boot = 60s; }));
    Pid pid = h.in_slot(0);
    h.say(pid, "RETIRE=max_requests");
    Pid successor = h.in_slot(0);
    h.say(successor, "WATCHDOG=1");  // booting: not yet subject to the heartbeat rule
    h.advance(30s);                  // the retiring worker sent no heartbeat
    CHECK(h.disposition(pid) == Disposition::aborting);
    CHECK(h.signals_to(pid).at(0).signal == Signal::abort);
    // An aborting worker is not recycled when its successor gets ready: its SIGKILL is due.
    h.ready(successor);
    CHECK_FALSE(h.drained(pid));
    h.advance_to_deadline();
    CHECK(h.disposition(pid) == Disposition::killed);
    h.killed(pid, 9);
    CHECK(h.sup.restarts().at(RestartReason::heartbeat) == 1);
}

TEST_CASE("a drain may follow an abort, but a killed worker is neither drained nor interrupted") {
    Serving h(make_config(2));
    Pid quiet = h.in_slot(0);
    Pid chatty = h.in_slot(1);
    h.advance(25s);
    h.say(chatty, "WATCHDOG=1");
    h.advance(5s);  // quiet: no heartbeat for 30 s
    REQUIRE(h.disposition(quiet) == Disposition::aborting);
    h.advance(5s);  // the abort grace ends: SIGKILL
    REQUIRE(h.disposition(quiet) == Disposition::killed);
    REQUIRE(h.signals_to(quiet).size() == 2);
    h.run(h.sup.stop(h.now, true));  // a fast stop interrupts every worker still running
    CHECK(h.signals_to(quiet).size() == 2);
    CHECK_FALSE(h.drained(quiet));
    CHECK(h.disposition(quiet) == Disposition::killed);
    CHECK(h.disposition(chatty) == Disposition::interrupted);
    CHECK(h.signals_to(chatty).back().signal == Signal::interrupt);
}

TEST_CASE("a fast stop interrupts a draining worker and brings its SIGKILL forward") {
    Serving h(make_config(1, [](config::Config& c) { c.timeouts.graceful = 60s; }));
    Pid pid = h.in_slot(0);
    h.run(h.sup.stop(h.now, false));
    CHECK(h.disposition(pid) == Disposition::stopped_accepting);  // the harness confirmed
    CHECK(h.worker(pid).kill_at == h.now + 60s);
    h.run(h.sup.stop(h.now, true));
    CHECK(h.disposition(pid) == Disposition::interrupted);
    CHECK(h.worker(pid).kill_at == h.now + 3s);  // Policy::fast_stop_grace
    h.advance_to_deadline();
    CHECK(h.now == 3s);
    CHECK(h.signals_to(pid).back().signal == Signal::kill);
    CHECK(h.disposition(pid) == Disposition::killed);
    CHECK_FALSE(h.worker(pid).kill_at.has_value());
}

TEST_CASE("a kill is sent once per decision and counted under the first stop reason") {
    Serving h(make_config(1, [](config::Config& c) { c.timeouts.request = 10s; }));
    Pid pid = h.in_slot(0);
    h.say(pid, "WATCHDOG=1\nINFLIGHT=1\nOLDEST_MS=9000");
    h.advance_to_deadline();  // the request reaches 10 s
    REQUIRE(h.disposition(pid) == Disposition::aborting);
    CHECK(h.worker(pid).stop_reason == RestartReason::request_timeout);
    h.advance_to_deadline();  // the abort grace ends
    CHECK(h.disposition(pid) == Disposition::killed);
    CHECK(h.worker(pid).stop_reason == RestartReason::request_timeout);
    h.advance(1min);
    CHECK(h.signals_to(pid).size() == 2);  // SIGABRT, SIGKILL; nothing while it is reaped
    h.killed(pid, 9);
    CHECK(h.sup.restarts().at(RestartReason::request_timeout) == 1);
}

TEST_CASE("covers its slot: only a serving worker does, so a successor boots beside the others") {
    Serving h(make_config(1));
    Pid pid = h.in_slot(0);
    h.say(pid, "RETIRE=max_requests");
    CHECK(h.pids(1).size() == 2);
    CHECK_FALSE(h.sup.steady());  // a retiring worker is motion
    Pid successor = h.in_slot(0);
    h.ready(successor);
    h.exit(pid, 0);
    CHECK(h.sup.steady());
}

TEST_CASE("READY after the boot deadline of a replacement in the live generation is ignored") {
    Serving h(make_config(1));
    Pid pid = h.in_slot(0);
    h.exit(pid, 1);  // a crash: the replacement boots at once
    Pid replacement = h.in_slot(0);
    REQUIRE(h.worker(replacement).state == WorkerState::booting);
    h.advance_to_deadline();  // timeouts.boot (10 s)
    CHECK(h.now == 10s);
    CHECK(h.disposition(replacement) == Disposition::killed);
    CHECK(h.worker(replacement).stop_reason == RestartReason::boot_timeout);
    h.ready(replacement);
    CHECK(h.worker(replacement).state == WorkerState::booting);
    h.killed(replacement, 9);
    CHECK(h.sup.restarts().at(RestartReason::boot_timeout) == 1);
    CHECK(h.gen_state(1) == GenerationState::live);
}

TEST_CASE("a worker scaled down after READY in a starting generation may exit without failing it") {
    Serving h(make_config(3));
    h.hup(make_release("/srv/app/v2", make_config(3)));
    Pid third = 0;
    for (Pid pid : h.pids(2)) {
        if (h.worker(pid).slot == 2) third = pid;
    }
    h.ready(third);
    h.run(h.sup.scale(h.now, 2));
    REQUIRE(h.drained(third));
    h.exit(third, 0);
    CHECK(h.gen_state(2) == GenerationState::starting);
    h.make_all_ready(2);
    CHECK(h.sup.live_generation() == 2);
}

TEST_CASE("the crash backoff is a deadline the slot rule registered, and acting on it refills") {
    Policy policy;
    policy.backoff_base = 250ms;
    Serving h(make_config(1), policy);
    h.exit(h.in_slot(0), 1);  // first crash: replaced at once
    h.ready(h.in_slot(0));
    h.exit(h.in_slot(0), 1);  // second crash: 250 ms backoff
    CHECK(h.pids(1).empty());
    REQUIRE(h.sup.next_deadline() == h.now + 250ms);
    h.advance(249ms);
    CHECK(h.pids(1).empty());
    h.advance_to_deadline();
    CHECK(h.pids(1).size() == 1);
}

TEST_CASE(
    "recycle.max_lifetime: the rule's deadline wakes the master, the successor boots at once") {
    Serving h(make_config(1, [](config::Config& c) {
        c.timeouts.heartbeat = 100s;
        c.recycle.max_lifetime = 50s;
    }));
    Pid pid = h.in_slot(0);
    CHECK(h.sup.next_deadline() == h.now + 50s);  // sooner than the heartbeat check
    h.advance_to_deadline();
    CHECK(h.disposition(pid) == Disposition::retiring);
    CHECK(h.worker(pid).retiring == RetireReason::max_lifetime);
    // Retired and replaced in the same pass, not at whatever event comes next.
    auto spawns = h.of<SpawnWorker>(h.last);
    REQUIRE(spawns.size() == 1);
    CHECK(spawns[0].slot == 0);
    CHECK(h.sup.next_deadline() == h.now + 10s);  // the successor's boot deadline
}

TEST_CASE("a silent worker's successor is spawned in the same pass that aborts it") {
    Serving h(make_config(1));
    Pid pid = h.in_slot(0);
    h.advance(30s);
    CHECK(h.disposition(pid) == Disposition::aborting);
    CHECK(h.of<SpawnWorker>(h.last).size() == 1);
}
