// Startup and rollover: the generation state machine and its awkward orders.
#include "harness.hpp"

using namespace molt::test;

TEST_CASE("the first generation goes live only when every worker is ready") {
    Harness h;
    h.start(make_release("/srv/app/releases/v1", make_config(3)));
    CHECK(h.pids(1).size() == 3);
    CHECK(h.gen_state(1) == GenerationState::starting);
    CHECK(h.sup.state() == MasterState::starting);

    auto pids = h.pids(1);
    h.ready(pids[0]);
    h.ready(pids[1]);
    CHECK(h.gen_state(1) == GenerationState::starting);
    CHECK(h.notifications().empty());

    h.ready(pids[2]);
    CHECK(h.gen_state(1) == GenerationState::live);
    CHECK(h.sup.state() == MasterState::running);
    REQUIRE(h.notifications().size() == 1);
    CHECK(h.notifications()[0].rfind("READY=1\nSTATUS=gen 1 live (v1): 3/3 ready", 0) == 0);
}

TEST_CASE("a first generation that fails to import makes the master exit 1 after reaping") {
    Harness h;
    h.start(make_release("/srv/app/v1", make_config(2)));
    auto pids = h.pids(1);
    h.say(pids[0], "ERROR=ModuleNotFoundError: No module named 'app'");
    h.exit(pids[0], 3);
    CHECK(h.gen_state(1) == GenerationState::failed);
    // The other worker is killed, and the master waits for it before exiting.
    REQUIRE(h.signals_to(pids[1]).size() == 1);
    CHECK(h.signals_to(pids[1])[0].signal == Signal::kill);
    CHECK_FALSE(h.exit_code.has_value());
    h.killed(pids[1], 9);
    REQUIRE(h.exit_code.has_value());
    CHECK(*h.exit_code == 1);
}

struct Live : Harness {
    Live(int workers = 2) {
        start(make_release("/srv/app/releases/v1", make_config(workers)));
        make_all_ready(1);
        REQUIRE(gen_state(1) == GenerationState::live);
        all.clear();
    }
};

TEST_CASE("a HUP rolls over: new generation ready first, then the old one drains") {
    Live h(2);
    auto old_pids = h.pids(1);
    Ticket ticket = h.hup(make_release("/srv/app/releases/v2", make_config(2)));
    CHECK(h.notifications().at(0) == "RELOADING=1");
    CHECK(h.gen_state(2) == GenerationState::starting);
    auto new_pids = h.pids(2);
    REQUIRE(new_pids.size() == 2);

    // Nothing old drains while a single new worker is still booting.
    h.ready(new_pids[0]);
    CHECK_FALSE(h.drained(old_pids[0]));
    CHECK_FALSE(h.drained(old_pids[1]));
    CHECK(h.gen_state(2) == GenerationState::starting);

    h.ready(new_pids[1]);
    CHECK(h.gen_state(2) == GenerationState::live);
    CHECK(h.gen_state(1) == GenerationState::draining);
    CHECK(h.drained(old_pids[0]));
    CHECK(h.drained(old_pids[1]));
    auto finished = h.of<RolloverFinished>(h.all);
    REQUIRE(finished.size() == 1);
    CHECK(finished[0].ok);
    CHECK(finished[0].tickets == std::vector<Ticket>{ticket});
    CHECK(finished[0].generation == 2);
    CHECK(h.sup.rollovers(true) == 1);

    h.exit_all_draining(0);
    CHECK(h.gen_state(1) == GenerationState::gone);
    CHECK(h.sup.generations().size() == 1);
    CHECK(h.sup.live_generation() == 2);
}

TEST_CASE("a worker that fails to import fails the new generation; the old keeps serving") {
    Live h(2);
    auto old_pids = h.pids(1);
    h.hup(make_release("/srv/app/releases/broken", make_config(2)));
    auto new_pids = h.pids(2);
    h.ready(new_pids[1]);
    h.say(new_pids[0], "ERROR=SyntaxError: invalid syntax (views.py, line 3)");
    h.exit(new_pids[0], 3);

    CHECK(h.gen_state(2) == GenerationState::failed);
    CHECK(h.sup.live_generation() == 1);
    CHECK_FALSE(h.drained(old_pids[0]));
    CHECK_FALSE(h.drained(old_pids[1]));
    CHECK(h.drained(new_pids[1]));  // the ready one drains: it may hold a connection already
    auto finished = h.of<RolloverFinished>(h.all);
    REQUIRE(finished.size() == 1);
    CHECK_FALSE(finished[0].ok);
    CHECK(finished[0].reason.find("SyntaxError: invalid syntax (views.py, line 3)") !=
          std::string::npos);
    CHECK(finished[0].reason.find("exited with status 3") != std::string::npos);
    // systemd hears the end of the reload, with why it failed.
    int ready_notes = 0;
    for (const auto& note : h.notifications()) {
        if (note.rfind("READY=1", 0) != 0) continue;
        ++ready_notes;
        CHECK(note.rfind("READY=1\nSTATUS=reload failed: worker slot=0", 0) == 0);
    }
    CHECK(ready_notes == 1);
    CHECK(h.sup.rollovers(false) == 1);
}

TEST_CASE("without ERROR= the failure reason is the last line of the worker's stderr") {
    Live h(1);
    h.hup(make_release("/srv/app/v2", make_config(1)));
    h.exit(h.pids(2)[0], 1,
           "Traceback (most recent call last):\n  ...\nKeyError: 'DATABASE_URL'\n");
    auto finished = h.of<RolloverFinished>(h.all);
    REQUIRE(finished.size() == 1);
    CHECK(finished[0].reason.find("KeyError: 'DATABASE_URL'") != std::string::npos);
}

TEST_CASE("a worker that hangs in import past timeouts.boot fails the generation") {
    Live h(2);
    h.hup(make_release("/srv/app/v2", make_config(2)));
    auto new_pids = h.pids(2);
    h.ready(new_pids[0]);
    h.advance(9999ms);
    CHECK(h.gen_state(2) == GenerationState::starting);
    h.advance_to_deadline();
    CHECK(h.now == 10000ms);
    CHECK(h.gen_state(2) == GenerationState::failed);
    REQUIRE(h.signals_to(new_pids[1]).size() == 1);
    CHECK(h.signals_to(new_pids[1])[0].signal == Signal::kill);
    auto finished = h.of<RolloverFinished>(h.all);
    REQUIRE(finished.size() == 1);
    CHECK(finished[0].reason.find("did not send READY within timeouts.boot (10000ms)") !=
          std::string::npos);
    h.killed(new_pids[1], 9);
    h.exit_all_draining();
    CHECK(h.gen_state(2) == GenerationState::gone);
    CHECK(h.sup.live_generation() == 1);
    CHECK(h.pids(1).size() == 2);
}

TEST_CASE("READY that arrives after the boot deadline does not rescue the generation") {
    Live h(1);
    h.hup(make_release("/srv/app/v2", make_config(1)));
    Pid late = h.pids(2)[0];
    h.now += 10s;  // the timer has not fired yet when the message is read
    h.ready(late);
    CHECK(h.gen_state(2) == GenerationState::failed);
    CHECK(h.sup.live_generation() == 1);
    CHECK(h.signals_to(late).size() == 1);
}

TEST_CASE("a failed generation followed by a good one") {
    Live h(2);
    h.hup(make_release("/srv/app/broken", make_config(2)));
    for (Pid pid : h.pids(2)) h.exit(pid, 3);
    CHECK(h.gen_state(2) == GenerationState::gone);

    h.hup(make_release("/srv/app/v3", make_config(2)));
    CHECK(h.gen_state(3) == GenerationState::starting);
    h.make_all_ready(3);
    CHECK(h.sup.live_generation() == 3);
    auto finished = h.of<RolloverFinished>(h.all);
    REQUIRE(finished.size() == 2);
    CHECK_FALSE(finished[0].ok);
    CHECK(finished[1].ok);
    CHECK(h.sup.rollovers(true) == 1);
    CHECK(h.sup.rollovers(false) == 1);
}

TEST_CASE("an invalid config at HUP changes nothing and reports the failure") {
    Live h(2);
    auto before = h.pids(1);
    Ticket ticket = h.hup(std::nullopt);
    CHECK(h.of<SpawnWorker>(h.all).empty());
    CHECK(h.pids(1) == before);
    auto finished = h.of<RolloverFinished>(h.all);
    REQUIRE(finished.size() == 1);
    CHECK_FALSE(finished[0].ok);
    CHECK(finished[0].tickets == std::vector<Ticket>{ticket});
    CHECK(h.notifications().back().rfind("READY=1\nSTATUS=reload failed: config invalid", 0) == 0);
}

TEST_CASE("a HUP during a rollover is queued, and several queued HUPs become one rollover") {
    Live h(1);
    Ticket first = h.hup(make_release("/srv/app/v2", make_config(1)));
    Ticket second = h.hup(make_release("/srv/app/v3", make_config(1)));
    Ticket third = h.hup(std::nullopt);  // never used: the queue is one rollover
    h.releases.pop_back();
    CHECK(h.sup.generations().count(3) == 0);

    h.make_all_ready(2);
    // Generation 2 is live; the queued requests start generation 3 at once.
    CHECK(h.sup.live_generation() == 2);
    CHECK(h.gen_state(3) == GenerationState::starting);
    h.make_all_ready(3);
    auto finished = h.of<RolloverFinished>(h.all);
    REQUIRE(finished.size() == 2);
    CHECK(finished[0].tickets == std::vector<Ticket>{first});
    CHECK(finished[1].tickets == std::vector<Ticket>{second, third});
    CHECK(finished[1].ok);
}

TEST_CASE("a queued request for another release supersedes the queued ones, saying so") {
    Live h(1);
    h.hup(make_release("/srv/app/v2", make_config(1)));  // a rollover in progress
    Ticket reload = h.next_ticket++;
    h.run(h.sup.request_reload(h.now, reload));
    Ticket rollback = h.next_ticket++;
    h.run(h.sup.request_reload(h.now, rollback, Trigger::rollback, "/srv/app/releases/v0",
                               "/srv/app/releases/v0"));
    auto finished = h.of<RolloverFinished>(h.all);
    REQUIRE(finished.size() == 1);  // the reload's, at once: not the rollback's answer later
    CHECK(finished[0].tickets == std::vector<Ticket>{reload});
    CHECK_FALSE(finished[0].ok);
    CHECK(finished[0].superseded);
    CHECK(finished[0].reason == "superseded by a rollback requested after it, before it started");
    CHECK(h.sup.rollover().queued.tickets == std::vector<Ticket>{rollback});
    CHECK(h.sup.rollover().queued.trigger == Trigger::rollback);
    // A second rollback to the same place joins it, and so does a HUP whose config points there
    // now (`current` was flipped back): the loop passes where each would go.
    Ticket again = h.next_ticket++;
    h.run(h.sup.request_reload(h.now, again, Trigger::rollback, "/srv/app/releases/v0",
                               "/srv/app/releases/v0"));
    Ticket hup = h.next_ticket++;
    h.run(h.sup.request_reload(h.now, hup, Trigger::reload, std::nullopt, "/srv/app/releases/v0"));
    CHECK(h.sup.rollover().queued.tickets == std::vector<Ticket>{rollback, again, hup});
    CHECK(h.of<RolloverFinished>(h.all).size() == 1);
}

TEST_CASE("a crash of a new worker after READY, before the generation is live, fails it") {
    Live h(2);
    h.hup(make_release("/srv/app/v2", make_config(2)));
    auto new_pids = h.pids(2);
    h.ready(new_pids[0]);
    h.killed(new_pids[0], 11);
    CHECK(h.gen_state(2) == GenerationState::failed);
    auto finished = h.of<RolloverFinished>(h.all);
    REQUIRE(finished.size() == 1);
    CHECK(finished[0].reason.find("killed by SIGSEGV after READY") != std::string::npos);
}

TEST_CASE("rollover in batches never holds more than one batch of extra workers") {
    Harness h;
    auto batched = make_config(4, [](config::Config& c) { c.rollover.batch = 1; });
    h.start(make_release("/srv/app/v1", batched));
    h.make_all_ready(1);
    auto old_pids = h.pids(1);
    h.hup(make_release("/srv/app/v2", batched));

    for (int batch = 0; batch < 4; ++batch) {
        CHECK(h.sup.workers().size() <= 5);
        auto booting = h.pids(2, WorkerState::booting);
        REQUIRE(booting.size() == 1);
        h.ready(booting[0]);
        if (batch < 3) {
            // The old worker of that slot drains; the next batch waits for it to exit.
            REQUIRE(h.drained(old_pids[batch]));
            CHECK(h.pids(2, WorkerState::booting).empty());
            h.exit(old_pids[batch], 0);
        }
    }
    CHECK(h.sup.live_generation() == 2);
    h.exit_all_draining();
    CHECK(h.pids(1).empty());
    CHECK(h.pids(2, WorkerState::ready).size() == 4);
}

TEST_CASE("a failed batch rollover refills the old generation's handed-over slots") {
    Harness h;
    auto batched = make_config(2, [](config::Config& c) { c.rollover.batch = 1; });
    h.start(make_release("/srv/app/v1", batched));
    h.make_all_ready(1);
    auto old_pids = h.pids(1);
    h.hup(make_release("/srv/app/v2", batched));
    h.ready(h.pids(2)[0]);
    h.exit(old_pids[0], 0);  // slot 0 handed over
    Pid second = h.pids(2, WorkerState::booting).at(0);
    h.exit(second, 3);
    CHECK(h.gen_state(2) == GenerationState::failed);
    // Generation 1 spawns a worker for slot 0 again, on its own release.
    auto refill = h.pids(1, WorkerState::booting);
    REQUIRE(refill.size() == 1);
    CHECK(h.worker(refill[0]).slot == 0);
    auto spawns = h.of<SpawnWorker>(h.all);
    CHECK(spawns.back().release.release_dir == "/srv/app/v1");
}

TEST_CASE("rollback goes to the previous live release directory") {
    Live h(1);
    CHECK_FALSE(h.sup.rollback_target().has_value());
    h.hup(make_release("/srv/app/releases/v2", make_config(1)));
    h.make_all_ready(2);
    h.hup(make_release("/srv/app/releases/v3-broken", make_config(1)));
    h.exit(h.pids(3)[0], 3);
    REQUIRE(h.sup.rollback_target().has_value());
    CHECK(*h.sup.rollback_target() == "/srv/app/releases/v1");
    CHECK(h.sup.history().size() == 3);
    CHECK(h.sup.history().front().state == GenerationState::failed);
}

TEST_CASE("a rollback request asks for its directory explicitly") {
    Live h(1);
    h.releases.push_back(make_release("/srv/app/releases/v0", make_config(1)));
    h.run(h.sup.request_reload(h.now, 7, Trigger::rollback, "/srv/app/releases/v0"));
    auto prepare = h.of<PrepareRelease>(h.all);
    REQUIRE(prepare.size() == 1);
    CHECK(prepare[0].release_dir == "/srv/app/releases/v0");
    CHECK(h.sup.generations().at(2).trigger == Trigger::rollback);
}

TEST_CASE("a rollover is reported done only when the old workers stopped accepting") {
    Live h(2);
    h.workers_confirm_drain = false;
    auto old_pids = h.pids(1);
    h.hup(make_release("/srv/app/v2", make_config(2)));
    h.make_all_ready(2);
    CHECK(h.sup.live_generation() == 2);  // live at once: new connections may go to it
    CHECK(h.of<RolloverFinished>(h.all).empty());
    CHECK(h.sup.rollover_phase() == RolloverPhase::finishing);

    h.say(old_pids[0], "STOPPING=1");
    CHECK(h.of<RolloverFinished>(h.all).empty());
    h.exit(old_pids[1], 0);  // an exit confirms it too
    auto finished = h.of<RolloverFinished>(h.all);
    REQUIRE(finished.size() == 1);
    CHECK(finished[0].ok);
    CHECK(h.sup.rollover_phase() == RolloverPhase::idle);
}

TEST_CASE("a worker that never confirms its drain delays the report by one second at most") {
    Live h(1);
    h.workers_confirm_drain = false;
    h.hup(make_release("/srv/app/v2", make_config(1)));
    h.make_all_ready(2);
    Time live_at = h.now;
    CHECK(h.of<RolloverFinished>(h.all).empty());
    h.advance_to_deadline();
    CHECK(h.now - live_at == 1000ms);
    REQUIRE(h.of<RolloverFinished>(h.all).size() == 1);
    // A HUP queued meanwhile starts right after.
}

TEST_CASE("a HUP during the confirmation window waits for it") {
    Live h(1);
    h.workers_confirm_drain = false;
    Pid old = h.pids(1)[0];
    h.hup(make_release("/srv/app/v2", make_config(1)));
    h.make_all_ready(2);
    h.hup(make_release("/srv/app/v3", make_config(1)));
    CHECK(h.sup.generations().count(3) == 0);
    h.say(old, "STOPPING=1");
    CHECK(h.sup.starting_generation() == 3);
}
