// Crashes, liveness, recycling, scaling and stopping.
#include "harness.hpp"

using namespace molt::test;

namespace {

struct Live : Harness {
    explicit Live(std::shared_ptr<const config::Config> config = make_config(2), Policy policy = {})
        : Harness(policy) {
        start(make_release("/srv/app/v1", std::move(config)));
        make_all_ready(1);
        REQUIRE(gen_state(1) == GenerationState::live);
        all.clear();
    }
    Pid slot_pid(int slot) const {
        for (const auto& [id, w] : sup.workers()) {
            if (w.slot == slot && w.state != WorkerState::draining) return w.pid;
        }
        FAIL("no worker in slot " << slot);
        return 0;
    }
};

}  // namespace

TEST_CASE("a crashed ready worker is replaced at once, then with capped exponential backoff") {
    Policy policy;
    policy.backoff_base = 250ms;
    policy.backoff_cap = 2s;
    Live h(make_config(2), policy);

    h.killed(h.slot_pid(0), 9);
    REQUIRE(h.of<SpawnWorker>(h.last).size() == 1);  // first crash: no wait
    CHECK(h.of<SpawnWorker>(h.last)[0].slot == 0);

    std::vector<Duration> waits;
    for (int crash = 0; crash < 6; ++crash) {
        h.exit(h.slot_pid(0), 1);  // the replacement dies while booting
        Time crashed_at = h.now;
        CHECK(h.of<SpawnWorker>(h.last).empty());
        h.advance_to_deadline();
        REQUIRE(h.of<SpawnWorker>(h.last).size() == 1);
        waits.push_back(h.now - crashed_at);
    }
    CHECK(waits == std::vector<Duration>{250ms, 500ms, 1000ms, 2000ms, 2000ms, 2000ms});
    CHECK(h.sup.restarts().at(RestartReason::crash) == 7);
    CHECK(h.sup.generations().at(1).slot_restarts.at(0) == 7);
}

TEST_CASE("a worker that stayed up long enough resets its slot's backoff") {
    Live h;
    h.exit(h.slot_pid(1), 1);
    h.ready(h.slot_pid(1));
    h.advance(11s);  // healthy for longer than backoff_reset
    h.say(h.slot_pid(1), "WATCHDOG=1");
    h.exit(h.slot_pid(1), 1);
    CHECK(h.of<SpawnWorker>(h.last).size() == 1);  // immediate again
}

TEST_CASE("a worker killed by SIGKILL while the OOM counter moved is logged with the hint") {
    Live h;
    h.killed(h.slot_pid(0), 9, /*oom=*/true);
    bool hinted = false;
    for (const auto& line : h.of<WriteLog>(h.all)) {
        hinted = hinted || (line.level == LogLevel::error &&
                            line.text.find("killed by SIGKILL") != std::string::npos &&
                            line.text.find("OOM killer") != std::string::npos);
    }
    CHECK(hinted);
}

TEST_CASE("a crash while draining is not replaced") {
    Live h;
    h.hup(make_release("/srv/app/v2", make_config(2)));
    h.make_all_ready(2);
    auto draining = h.pids(1, WorkerState::draining);
    REQUIRE(draining.size() == 2);
    h.killed(draining[0], 11);
    CHECK(h.of<SpawnWorker>(h.last).empty());
    h.exit(draining[1], 0);
    CHECK(h.gen_state(1) == GenerationState::gone);
    CHECK(h.pids(2).size() == 2);
}

TEST_CASE("a draining worker that outlives timeouts.graceful gets SIGKILL") {
    Live h;
    h.hup(make_release("/srv/app/v2", make_config(2)));
    h.make_all_ready(2);
    auto draining = h.pids(1, WorkerState::draining);
    h.exit(draining[0], 0);
    h.advance(4999ms);
    CHECK(h.signals_to(draining[1]).empty());
    h.advance_to_deadline();
    REQUIRE(h.signals_to(draining[1]).size() == 1);
    CHECK(h.signals_to(draining[1])[0].signal == Signal::kill);
    h.killed(draining[1], 9);
    CHECK(h.gen_state(1) == GenerationState::gone);
}

TEST_CASE("a silent worker gets SIGABRT at timeouts.heartbeat, its successor boots at once") {
    Live h;
    Pid quiet = h.slot_pid(0);
    Pid chatty = h.slot_pid(1);
    for (int i = 0; i < 6; ++i) {
        h.advance(5s);
        h.say(chatty, "WATCHDOG=1\nREQUESTS=10\nINFLIGHT=0\nOLDEST_MS=0");
    }
    REQUIRE(h.signals_to(quiet).size() == 1);
    CHECK(h.signals_to(quiet)[0].signal == Signal::abort);
    CHECK(h.signals_to(chatty).empty());
    // The successor does not wait for the hung worker to finish dumping its tracebacks.
    REQUIRE(h.pids(1, WorkerState::booting).size() == 1);
    h.advance_to_deadline();
    REQUIRE(h.signals_to(quiet).size() == 2);
    CHECK(h.signals_to(quiet)[1].signal == Signal::kill);
    h.advance(1s);
    CHECK(h.signals_to(quiet).size() == 2);  // not aborted again while it is being reaped
    h.killed(quiet, 9);
    CHECK(h.of<SpawnWorker>(h.last).empty());
    CHECK(h.sup.workers().size() == 2);
    CHECK(h.sup.restarts().at(RestartReason::heartbeat) == 1);
}

TEST_CASE("a paused master aborts nobody: the time it did not run is not silence") {
    // Issue 18 point 2: the master was stopped (SIGSTOP, a VM freeze) for three heartbeat
    // periods while both workers kept heartbeating into their channels. The loop wakes late,
    // the deadline tick runs before the queued heartbeats are read, and must abort no one.
    Live h(make_config(2, [](config::Config& c) { c.timeouts.heartbeat = 2s; }));
    Pid a = h.slot_pid(0);
    Pid b = h.slot_pid(1);
    h.advance(1s);
    h.say(a, "WATCHDOG=1\nREQUESTS=1\nINFLIGHT=0\nOLDEST_MS=0");
    REQUIRE(h.sup.next_deadline() == Time(2s));  // b's heartbeat check
    h.now = Time(8s);                            // the timer fires 6 s late
    h.run(h.sup.tick(h.now));
    CHECK(h.of<SignalWorker>(h.all).empty());
    CHECK(h.of<SpawnWorker>(h.all).empty());
    bool told = false;
    for (const auto& line : h.of<WriteLog>(h.last)) {
        told |= line.text.find("the master did not run for 6000ms") != std::string::npos;
    }
    CHECK(told);
    // The heartbeats queued meanwhile are read right after the tick.
    h.say(a, "WATCHDOG=1\nREQUESTS=2\nINFLIGHT=0\nOLDEST_MS=0");
    h.say(b, "WATCHDOG=1\nREQUESTS=2\nINFLIGHT=0\nOLDEST_MS=0");
    CHECK(h.of<SignalWorker>(h.all).empty());

    // A worker that is really stuck is still aborted after a full heartbeat of observed
    // silence: b stops talking, a goes on.
    h.advance(1s);
    h.say(a, "WATCHDOG=1");
    h.advance(1s);
    REQUIRE(h.signals_to(b).size() == 1);
    CHECK(h.signals_to(b)[0].signal == Signal::abort);
    CHECK(h.signals_to(a).empty());
}

TEST_CASE("a pause counts once, and a stuck worker's observed silence before it still counts") {
    Live h(make_config(1, [](config::Config& c) { c.timeouts.heartbeat = 10s; }));
    Pid pid = h.slot_pid(0);
    h.advance(6s);  // 6 s of observed silence (the deadline is at 10 s)
    h.now = Time(30s);
    h.run(h.sup.tick(h.now));  // 20 s late: 6 s of silence were observed, the rest was not
    CHECK(h.signals_to(pid).empty());
    // It had been silent for 6 s of the master's time: 4 s are left, counted once however
    // many events arrive at the end of the pause.
    CHECK(h.sup.next_deadline() == Time(34s));
    h.run(h.sup.message(h.now, pid, "STATUS=still here"));
    CHECK(h.sup.next_deadline() == Time(34s));
    h.advance_to_deadline();
    REQUIRE(h.signals_to(pid).size() == 1);
    CHECK(h.signals_to(pid)[0].signal == Signal::abort);
}

TEST_CASE("READY queued while the master was paused still counts within timeouts.boot") {
    Harness h;
    h.start(make_release("/srv/app/v1", make_config(1)));  // timeouts.boot is 10 s
    Pid pid = h.pids(1).at(0);
    h.run(h.sup.message(h.now, pid, "STATUS=importing"));
    h.now = Time(25s);  // stopped from 0 to 25 s; READY was sent at 3 s
    h.run(h.sup.tick(h.now));
    CHECK(h.gen_state(1) == GenerationState::starting);
    h.ready(pid);
    CHECK(h.gen_state(1) == GenerationState::live);
}

TEST_CASE("timeouts.request aborts a worker whose oldest request runs too long") {
    Live h(make_config(1, [](config::Config& c) { c.timeouts.request = 20s; }));
    Pid pid = h.slot_pid(0);
    h.say(pid, "WATCHDOG=1\nREQUESTS=3\nINFLIGHT=1\nOLDEST_MS=15000");
    h.advance(4999ms);
    CHECK(h.signals_to(pid).empty());
    h.advance_to_deadline();
    REQUIRE(h.signals_to(pid).size() == 1);
    CHECK(h.signals_to(pid)[0].signal == Signal::abort);
    CHECK(h.signals_to(pid)[0].reason.find("timeouts.request") != std::string::npos);
}

TEST_CASE("recycling spawns the replacement first, so capacity never dips") {
    Live h(make_config(2));
    Pid old = h.slot_pid(0);
    h.say(old, "RETIRE=max_requests");
    auto spawns = h.of<SpawnWorker>(h.last);
    REQUIRE(spawns.size() == 1);
    CHECK(spawns[0].slot == 0);
    CHECK_FALSE(h.drained(old));
    CHECK(h.ready_serving() == 2);

    Pid successor = h.pids(1, WorkerState::booting).at(0);
    h.ready(successor);
    CHECK(h.drained(old));
    CHECK(h.ready_serving() == 2);
    h.exit(old, 0);
    CHECK(h.sup.restarts().at(RestartReason::recycle) == 1);
    CHECK(h.sup.workers().size() == 2);
}

TEST_CASE("a successor that fails to boot leaves the retiring worker serving") {
    Live h(make_config(1));
    Pid old = h.slot_pid(0);
    h.say(old, "RETIRE=max_requests");
    Pid successor = h.pids(1, WorkerState::booting).at(0);
    h.exit(successor, 3);
    CHECK_FALSE(h.drained(old));
    CHECK(h.ready_serving() == 1);
}

TEST_CASE("max_rss and max_lifetime retire a worker the same way") {
    auto config = make_config(1, [](config::Config& c) {
        c.recycle.max_rss = 100 * 1024 * 1024;
        c.recycle.max_lifetime = 60s;
    });
    Live h(config);
    Pid pid = h.slot_pid(0);
    h.say(pid, "WATCHDOG=1\nRSS=104857601");
    CHECK(h.worker(pid).retiring == RetireReason::max_rss);
    h.ready(h.pids(1, WorkerState::booting).at(0));
    CHECK(h.drained(pid));

    Pid next = h.pids(1, WorkerState::ready).at(0);
    for (int i = 0; i < 12; ++i) {
        h.advance(5s);
        h.say(next, "WATCHDOG=1");
    }
    CHECK(h.worker(next).retiring == RetireReason::max_lifetime);
}

TEST_CASE("scale up and down: TTIN adds a slot, TTOU drains the highest") {
    Live h(make_config(2));
    h.run(h.sup.scale(h.now, 3));
    auto spawns = h.of<SpawnWorker>(h.last);
    REQUIRE(spawns.size() == 1);
    CHECK(spawns[0].slot == 2);
    h.make_all_ready(1);
    Pid third = h.slot_pid(2);
    h.run(h.sup.scale(h.now, 2));
    CHECK(h.drained(third));
    h.run(h.sup.scale(h.now, 0));
    CHECK(h.sup.target_workers() == 2);  // refused
}

TEST_CASE("a TTIN scale survives a reload that does not change workers:") {
    Live h(make_config(2));
    h.run(h.sup.scale(h.now, 3));
    h.make_all_ready(1);
    h.hup(make_release("/srv/app/v2", make_config(2)));
    CHECK(h.pids(2).size() == 3);
    h.make_all_ready(2);
    h.hup(make_release("/srv/app/v3", make_config(5)));
    CHECK(h.pids(3).size() == 5);
}

TEST_CASE("graceful stop drains everything and exits 0 when the last worker is gone") {
    Live h(make_config(2));
    h.hup(make_release("/srv/app/v2", make_config(2)));  // a rollover is in flight
    auto booting = h.pids(2);
    h.run(h.sup.stop(h.now, false));
    auto notes = h.notifications();
    CHECK(std::find(notes.begin(), notes.end(), "STOPPING=1") != notes.end());
    for (Pid pid : h.pids(1)) CHECK(h.drained(pid));
    for (Pid pid : booting) CHECK(h.signals_to(pid).at(0).signal == Signal::kill);
    for (Pid pid : booting) h.killed(pid, 9);
    CHECK_FALSE(h.exit_code.has_value());
    h.exit_all_draining();
    REQUIRE(h.exit_code.has_value());
    CHECK(*h.exit_code == 0);
    // No READY=1 after STOPPING=1: systemd would read it as "started again".
    for (const auto& note : h.notifications()) CHECK(note.find("READY=1") == std::string::npos);
}

TEST_CASE("a reload requested while stopping is refused at once") {
    Live h;
    h.run(h.sup.stop(h.now, false));
    h.run(h.sup.request_reload(h.now, 42));
    auto finished = h.of<RolloverFinished>(h.last);
    REQUIRE(finished.size() == 1);
    CHECK(finished[0].tickets == std::vector<Ticket>{42});
    CHECK_FALSE(finished[0].ok);
}

TEST_CASE("fast stop interrupts every worker, then kills what is left") {
    Live h(make_config(2));
    h.run(h.sup.stop(h.now, true));
    auto pids = h.pids(1);
    for (Pid pid : pids) CHECK(h.signals_to(pid).at(0).signal == Signal::interrupt);
    h.exit(pids[0], 0);
    h.advance_to_deadline();
    CHECK(h.signals_to(pids[1]).back().signal == Signal::kill);
    h.killed(pids[1], 9);
    CHECK(h.exit_code == 0);
}

TEST_CASE("INT during a graceful stop escalates to a fast stop") {
    Live h(make_config(1));
    h.run(h.sup.stop(h.now, false));
    h.run(h.sup.stop(h.now, true));
    Pid pid = h.pids(1).at(0);
    CHECK(h.signals_to(pid).back().signal == Signal::interrupt);
    CHECK(h.sup.state() == MasterState::stopping_fast);
}

TEST_CASE("a kill that fails with ESRCH counts as an exit, so nothing waits for a ghost") {
    Live h(make_config(1));
    Pid pid = h.slot_pid(0);
    h.run(h.sup.signal_failed(h.now, pid, true, "kill(1000, SIGTERM) failed: No such process"));
    CHECK_FALSE(h.has_worker(pid));
    CHECK(h.of<SpawnWorker>(h.last).size() == 1);
}

TEST_CASE("USR1 asks every worker to reopen its logs") {
    Live h(make_config(2));
    h.run(h.sup.reopen_logs(h.now));
    auto sent = h.of<SendToWorker>(h.last);
    REQUIRE(sent.size() == 2);
    CHECK(sent[0].message == "REOPEN_LOGS=1");
}

TEST_CASE("an idle master asks to wake only for real deadlines") {
    Live h(make_config(4, [](config::Config& c) { c.timeouts.heartbeat = 30s; }));
    auto deadline = h.sup.next_deadline();
    REQUIRE(deadline.has_value());
    CHECK(*deadline == h.now + 30s);  // the heartbeat check, nothing sooner
}

TEST_CASE("after a binary upgrade the new image adopts the live generation as it was") {
    Harness h;
    AdoptedState state;
    state.generation = 7;
    state.release = make_release("/srv/app/v7", make_config(3));
    state.target = 3;
    state.workers = {{4001, 0, {10, 0, 0, 0}}, {4002, 1, {20, 0, 0, 0}}};  // slot 2 died meanwhile
    state.rollovers_ok = 6;
    h.run(h.sup.adopt(h.now, state));
    CHECK(h.sup.live_generation() == 7);
    CHECK(h.sup.state() == MasterState::running);
    CHECK(h.worker(4001).state == WorkerState::ready);
    CHECK(h.worker(4002).counters.requests == 20);
    auto spawns = h.of<SpawnWorker>(h.all);
    REQUIRE(spawns.size() == 1);
    CHECK(spawns[0].slot == 2);
    CHECK(h.sup.rollovers(true) == 6);
    CHECK_FALSE(h.sup.steady());  // slot 2 is still booting
    h.make_all_ready(7);
    CHECK(h.sup.steady());
    // The next rollover continues the generation numbering.
    h.hup(make_release("/srv/app/v8", make_config(3)));
    CHECK(h.sup.starting_generation() == 8);
    CHECK_FALSE(h.sup.steady());
}

TEST_CASE("a spawn that fails mid-batch fails the generation and leaves no worker behind") {
    Live h(make_config(3));
    h.failing_spawns = {h.spawns + 2};  // the second worker of the next generation
    h.hup(make_release("/srv/app/v2", make_config(3)));
    CHECK(h.gen_state(2) == GenerationState::failed);
    auto reason = h.of<RolloverFinished>(h.all).at(0).reason;
    CHECK(reason.find("could not start the worker process: fork() failed") != std::string::npos);
    CHECK(reason.find("pid=") == std::string::npos);  // it never had one
    // The first and the third worker were started; both are killed, neither can go ready.
    for (Pid pid : h.pids(2)) {
        REQUIRE_FALSE(h.signals_to(pid).empty());
        CHECK(h.signals_to(pid).back().signal == Signal::kill);
        h.ready(pid);
        CHECK(h.worker(pid).state == WorkerState::booting);
    }
    for (Pid pid : h.pids(2)) h.killed(pid, 9);
    CHECK(h.gen_state(2) == GenerationState::gone);
    CHECK(h.sup.steady());
}

TEST_CASE("TTIN then TTOU before the new worker is ready: no crash, no busy loop") {
    Live h(make_config(2));
    h.run(h.sup.scale(h.now, 3));
    Pid third = h.pids(1, WorkerState::booting).at(0);
    h.run(h.sup.scale(h.now, 2));
    REQUIRE(h.signals_to(third).size() == 1);
    h.killed(third, 9);  // the harness checks next_deadline() is never already past
    CHECK(h.sup.restarts().count(RestartReason::crash) == 0);
    h.advance(1s);
    CHECK(h.sup.workers().size() == 2);
}

TEST_CASE("scaling down while a new generation boots does not fail it") {
    Live h(make_config(3));
    h.hup(make_release("/srv/app/v2", make_config(3)));
    h.run(h.sup.scale(h.now, 2));
    for (Pid pid : h.pids(2)) {
        if (h.worker(pid).slot == 2) {
            CHECK(h.signals_to(pid).size() == 1);
            h.killed(pid, 9);
        }
    }
    CHECK(h.gen_state(2) == GenerationState::starting);
    h.make_all_ready(2);
    CHECK(h.sup.live_generation() == 2);
    CHECK(h.pids(2, WorkerState::ready).size() == 2);
}

TEST_CASE("a drain does not postpone the SIGKILL already due after a SIGABRT") {
    Live h(make_config(1, [](config::Config& c) { c.timeouts.graceful = 60s; }));
    Pid pid = h.pids(1).at(0);
    h.advance(30s);  // no heartbeat: SIGABRT, SIGKILL due 5 s later
    REQUIRE(h.signals_to(pid).size() == 1);
    h.run(h.sup.stop(h.now, false));
    h.advance_to_deadline();
    CHECK(h.now == 35s);
    CHECK(h.signals_to(pid).back().signal == Signal::kill);
}
