// The zygote (preload): one more way for a slot to be filled, against the fake clock.
#include "harness.hpp"

using namespace molt::test;

namespace {

std::shared_ptr<const config::Config> preloaded(int workers = 2, int batch = 0) {
    return make_config(workers, [&](config::Config& c) {
        c.preload = config::Preload::auto_;
        c.rollover.batch = batch;
    });
}

bool logged(const Harness& h, const std::string& needle) {
    for (const auto& line : h.of<WriteLog>(h.all)) {
        if (line.text.find(needle) != std::string::npos) return true;
    }
    return false;
}

// Started with a preloaded config, its zygote ready and every worker ready.
struct Preloaded : Harness {
    Pid zygote = 0;
    explicit Preloaded(std::shared_ptr<const config::Config> config = preloaded()) {
        start(make_release("/srv/app/v1", std::move(config)));
        REQUIRE(zygotes_started.size() == 1);
        zygote = zygote_pids.back();
        CHECK(of<SpawnWorker>(all).empty());  // nothing is spawned before the zygote is ready
        ready(zygote);
        make_all_ready(1);
        REQUIRE(gen_state(1) == GenerationState::live);
        all.clear();
    }
    Pid slot_pid(int slot) const {
        for (const auto& [id, w] : sup.workers()) {
            if (w.slot == slot && w.state == WorkerState::ready) return w.pid;
        }
        FAIL("no ready worker in slot " << slot);
        return 0;
    }
    const Zygote& zygote_of(GenerationId gen) const { return sup.generations().at(gen).zygote; }
};

}  // namespace

TEST_CASE("a preloaded generation forks every worker from its zygote once it is ready") {
    Harness h;
    h.start(make_release("/srv/app/v1", preloaded(3)));
    REQUIRE(h.zygotes_started.size() == 1);
    Pid zygote = h.zygote_pids[0];
    CHECK(h.sup.generations().at(1).zygote.state == ZygoteState::booting);
    CHECK(h.of<SpawnWorker>(h.all).empty());

    h.ready(zygote);
    CHECK(h.sup.generations().at(1).zygote.state == ZygoteState::ready);
    auto spawns = h.of<SpawnWorker>(h.last);
    REQUIRE(spawns.size() == 3);
    for (const auto& spawn : spawns) CHECK(spawn.via_zygote == zygote);
    for (const auto& [id, w] : h.sup.workers()) CHECK(w.forked);
    h.make_all_ready(1);
    CHECK(h.gen_state(1) == GenerationState::live);
    CHECK(h.sup.generations().at(1).zygote.forks == 3);
}

TEST_CASE("preload: false spawns plainly and starts no zygote") {
    Harness h;
    h.start(make_release("/srv/app/v1", make_config(2)));
    CHECK(h.zygotes_started.empty());
    for (const auto& spawn : h.of<SpawnWorker>(h.all)) CHECK(spawn.via_zygote == 0);
}

TEST_CASE("a zygote whose import fails fails the first generation with its own error text") {
    Harness h;
    h.start(make_release("/srv/app/v1", preloaded()));
    Pid zygote = h.zygote_pids[0];
    h.say(zygote, "ERROR=ModuleNotFoundError: No module named 'missing' (importing app:app)");
    h.exit(zygote, 3);
    CHECK(h.gen_state(1) == GenerationState::gone);
    CHECK(h.exit_code == 1);
    CHECK(h.of<SpawnWorker>(h.all).empty());
    auto finished = h.of<RolloverFinished>(h.all);
    REQUIRE(finished.size() == 1);
    CHECK(finished[0].reason.find("zygote") != std::string::npos);
    CHECK(finished[0].reason.find("No module named 'missing'") != std::string::npos);
}

TEST_CASE("a broken release fails once in its zygote and the old generation keeps serving") {
    Preloaded h;
    Ticket ticket = h.hup(make_release("/srv/app/v2", preloaded()));
    REQUIRE(h.zygotes_started.size() == 2);
    Pid zygote = h.zygote_pids[1];
    h.exit(zygote, 3, "Traceback...\nImportError: cannot import name 'x'\n");
    auto finished = h.of<RolloverFinished>(h.all);
    REQUIRE(finished.size() == 1);
    CHECK(finished[0].tickets == std::vector<Ticket>{ticket});
    CHECK_FALSE(finished[0].ok);
    CHECK(finished[0].reason.find("ImportError: cannot import name 'x'") != std::string::npos);
    CHECK(h.sup.live_generation() == GenerationId{1});
    CHECK(h.pids(1, WorkerState::ready).size() == 2);
    CHECK(h.of<SpawnWorker>(h.all).empty());  // no worker of v2 was ever started
    CHECK(h.zygote_of(1).state == ZygoteState::ready);
}

TEST_CASE("a zygote that sends no READY within timeouts.boot fails its generation") {
    Preloaded h;
    h.hup(make_release("/srv/app/v2", preloaded()));
    Pid zygote = h.zygote_pids[1];
    h.advance(10s);
    CHECK(h.gen_state(2) == GenerationState::failed);
    CHECK(logged(h, "did not send READY within timeouts.boot"));
    REQUIRE(h.signals_to(zygote).size() == 1);
    CHECK(h.signals_to(zygote)[0].signal == Signal::kill);
    h.killed(zygote, 9);
    CHECK(h.gen_state(2) == GenerationState::gone);
    CHECK(h.sup.live_generation() == GenerationId{1});
}

TEST_CASE("a crashed worker is re-forked from its generation's zygote") {
    Preloaded h;
    h.killed(h.slot_pid(0), 9);
    auto spawns = h.of<SpawnWorker>(h.last);
    REQUIRE(spawns.size() == 1);
    CHECK(spawns[0].slot == 0);
    CHECK(spawns[0].via_zygote == h.zygote);
}

TEST_CASE("a zygote that dies after forking leaves its workers alone; later slots spawn plainly") {
    Preloaded h;
    h.killed(h.zygote, 9);
    CHECK(h.zygote_of(1).state == ZygoteState::gone);
    CHECK(h.pids(1, WorkerState::ready).size() == 2);
    CHECK(h.of<SignalWorker>(h.all).empty());
    CHECK(logged(h, "its workers serve on"));
    CHECK(h.zygote_of(1).fallback.find("killed by SIGKILL") != std::string::npos);

    h.exit(h.slot_pid(1), 1);
    auto spawns = h.of<SpawnWorker>(h.last);
    REQUIRE(spawns.size() == 1);
    CHECK(spawns[0].via_zygote == 0);
    CHECK(h.gen_state(1) == GenerationState::live);
}

TEST_CASE("a zygote that dies before it forked a pending worker: the slot is filled plainly") {
    Preloaded h;
    h.hold_forks = true;
    h.killed(h.slot_pid(0), 9);
    REQUIRE(h.pending_forks.size() == 1);
    h.killed(h.zygote, 9);
    h.pending_forks.clear();  // never answered
    auto spawns = h.of<SpawnWorker>(h.last);
    REQUIRE(spawns.size() == 1);
    CHECK(spawns[0].slot == 0);
    CHECK(spawns[0].via_zygote == 0);
    CHECK(logged(h, "its fork request died with the zygote"));
}

TEST_CASE("a new generation's zygote dying while its first forks are pending does not fail it") {
    Preloaded h;
    h.hold_forks = true;
    h.hup(make_release("/srv/app/v2", preloaded()));
    Pid zygote = h.zygote_pids[1];
    h.ready(zygote);
    REQUIRE(h.pending_forks.size() == 2);
    Pid first = h.fork_done();
    h.killed(zygote, 9);  // the second request dies with it
    h.pending_forks.clear();
    CHECK(h.gen_state(2) == GenerationState::starting);
    auto plain = h.of<SpawnWorker>(h.last);
    REQUIRE(plain.size() == 1);
    CHECK(plain[0].via_zygote == 0);
    h.ready(first);
    h.make_all_ready(2);
    CHECK(h.gen_state(2) == GenerationState::live);
}

TEST_CASE("a fork request that fails is a spawn failure like any other") {
    SUBCASE("in a starting generation it fails the rollover") {
        Preloaded h;
        h.hold_forks = true;
        h.hup(make_release("/srv/app/v2", preloaded()));
        h.ready(h.zygote_pids[1]);
        h.fork_failed("fork() failed: Resource temporarily unavailable");
        CHECK(h.gen_state(2) == GenerationState::failed);
        auto finished = h.of<RolloverFinished>(h.all);
        REQUIRE(finished.size() == 1);
        CHECK(finished[0].reason.find("Resource temporarily unavailable") != std::string::npos);
        CHECK(h.sup.live_generation() == GenerationId{1});
        // The failed generation's zygote is not left behind.
        CHECK(h.signals_to(h.zygote_pids[1]).size() == 1);
    }
    SUBCASE("in the live generation the slot is retried with backoff") {
        Preloaded h;
        h.hold_forks = true;
        h.killed(h.slot_pid(0), 9);
        h.fork_failed("fork() failed: Resource temporarily unavailable");
        CHECK(h.gen_state(1) == GenerationState::live);
        CHECK(h.pending_forks.empty());
        h.advance_to_deadline();
        REQUIRE(h.pending_forks.size() == 1);
        CHECK(h.pending_forks[0].via_zygote == h.zygote);
    }
}

TEST_CASE("a zygote that never answers a fork request is stopped; the slot spawns plainly") {
    Preloaded h;
    h.hold_forks = true;
    h.killed(h.slot_pid(0), 9);
    REQUIRE(h.pending_forks.size() == 1);
    h.advance(10s);
    REQUIRE(h.signals_to(h.zygote).size() == 1);
    CHECK(h.zygote_of(1).state == ZygoteState::stopping);
    h.killed(h.zygote, 9);
    auto spawns = h.of<SpawnWorker>(h.all);
    REQUIRE(spawns.size() >= 2);
    CHECK(spawns.back().via_zygote == 0);
}

TEST_CASE("preload: auto falls back to per-worker import when the zygote refuses, with why") {
    Harness h;
    h.start(make_release("/srv/app/v1", preloaded()));
    Pid zygote = h.zygote_pids[0];
    h.say(zygote, "PRELOAD_REFUSED=the import left 1 thread running: Thread-1 (poller)");
    CHECK(logged(h, "falls back to importing the app in each worker"));
    CHECK(logged(h, "Thread-1 (poller)"));
    auto spawns = h.of<SpawnWorker>(h.all);
    REQUIRE(spawns.size() == 2);
    for (const auto& spawn : spawns) CHECK(spawn.via_zygote == 0);
    h.exit(zygote, 0);  // it leaves by itself
    h.make_all_ready(1);
    CHECK(h.gen_state(1) == GenerationState::live);
    CHECK(h.sup.generations().at(1).zygote.fallback.find("Thread-1") != std::string::npos);
}

TEST_CASE(
    "a batch rollover forks each batch from the new zygote; the old zygote goes with its "
    "generation") {
    Preloaded h(preloaded(4, 2));
    h.hup(make_release("/srv/app/v2", preloaded(4, 2)));
    Pid zygote2 = h.zygote_pids[1];
    h.ready(zygote2);
    auto first = h.of<SpawnWorker>(h.last);
    REQUIRE(first.size() == 2);
    for (const auto& spawn : first) CHECK(spawn.via_zygote == zygote2);
    h.make_all_ready(2);
    h.exit_all_draining();
    auto second = h.of<SpawnWorker>(h.all);
    REQUIRE(second.size() == 4);
    for (const auto& spawn : second) CHECK(spawn.via_zygote == zygote2);
    CHECK(h.signals_to(h.zygote).empty());  // generation 1 still serves two slots
    h.make_all_ready(2);
    CHECK(h.gen_state(2) == GenerationState::live);
    REQUIRE(h.signals_to(h.zygote).size() == 1);
    CHECK(h.signals_to(h.zygote)[0].signal == Signal::kill);
    h.exit_all_draining();
    CHECK(h.gen_state(1) == GenerationState::draining);  // until its zygote's exit is seen
    h.killed(h.zygote, 9);
    CHECK(h.gen_state(1) == GenerationState::gone);
}

TEST_CASE("stop with a zygote alive: it is killed and the master exits after its exit") {
    for (bool fast : {false, true}) {
        CAPTURE(fast);
        Preloaded h;
        h.run(h.sup.stop(h.now, fast));
        REQUIRE(h.signals_to(h.zygote).size() == 1);
        CHECK(h.signals_to(h.zygote)[0].signal == Signal::kill);
        for (Pid pid : h.pids(1)) h.exit(pid, 0);
        CHECK_FALSE(h.exit_code.has_value());
        h.killed(h.zygote, 9);
        REQUIRE(h.exit_code.has_value());
        CHECK(*h.exit_code == 0);
    }
}

TEST_CASE("stop while a new generation's zygote boots kills both zygotes") {
    Preloaded h;
    h.hup(make_release("/srv/app/v2", preloaded()));
    Pid zygote2 = h.zygote_pids[1];
    h.run(h.sup.stop(h.now, true));
    CHECK(h.signals_to(zygote2).size() == 1);
    CHECK(h.signals_to(h.zygote).size() == 1);
    for (Pid pid : h.pids(1)) h.exit(pid, 0);
    h.killed(zygote2, 9);
    CHECK_FALSE(h.exit_code.has_value());
    h.signal_failed_esrch(h.zygote);
    CHECK(h.exit_code == 0);
}
