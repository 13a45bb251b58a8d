// The master's policies that live in the core: when a reload or a binary upgrade is refused,
// what replaces a DRAIN that could not be sent, and how a worker's exit is described.
#include "harness.hpp"
#include "supervisor/contract/worker_contract.hpp"

using namespace molt::test;

namespace {

config::ListenAddress tcp(const std::string& text) {
    config::ListenAddress address;
    address.text = text;
    return address;
}

struct Steady : Harness {
    explicit Steady(int workers = 2) {
        start(make_release("/srv/app/v1", make_config(workers)));  // digest "digest"
        make_all_ready(1);
        REQUIRE(sup.steady());
        all.clear();
    }
};

}  // namespace

TEST_CASE("a reload that changes listen: is refused, naming both address lists") {
    config::Config serving;
    serving.listen = {tcp("tcp://127.0.0.1:8000"), tcp("unix:/run/app.sock")};
    config::Config same = serving;
    CHECK_FALSE(reload_refusal(serving, same).has_value());

    config::Config moved = serving;
    moved.listen[0] = tcp("tcp://127.0.0.1:8099");
    auto refusal = reload_refusal(serving, moved);
    REQUIRE(refusal.has_value());
    CHECK(*refusal ==
          "listen: changing listen addresses needs a restart (serving tcp://127.0.0.1:8000, "
          "unix:/run/app.sock, the config now says tcp://127.0.0.1:8099, unix:/run/app.sock)");

    config::Config reordered = serving;
    std::swap(reordered.listen[0], reordered.listen[1]);  // fds 3, 4 would swap meaning
    CHECK(reload_refusal(serving, reordered).has_value());
}

TEST_CASE("a reload that changes what the master sets up at its start is refused") {
    config::Config serving;
    serving.pidfile = "/run/molt/p1.pid";
    serving.control.socket = "/run/molt/ctl.sock";
    config::Config next = serving;
    next.workers = 7;  // the rest may change
    CHECK_FALSE(reload_refusal(serving, next).has_value());
    next.pidfile = "/run/molt/p2.pid";
    CHECK(reload_refusal(serving, next) ==
          "pidfile: changing it needs a restart (serving \"/run/molt/p1.pid\", the config now "
          "says \"/run/molt/p2.pid\")");
    next = serving;
    next.control.socket = "/run/molt/ctl2.sock";
    CHECK(reload_refusal(serving, next).value_or("").starts_with("control.socket: "));
    next = serving;
    next.control.mode = 0660;
    CHECK(reload_refusal(serving, next).value_or("").starts_with("control.mode: "));
    serving.control.socket = next.control.socket = "";  // no socket: its mode is nobody's
    CHECK_FALSE(reload_refusal(serving, next).has_value());
    next = serving;
    next.metrics.listen = tcp("tcp://127.0.0.1:9191");
    CHECK(reload_refusal(serving, next).value_or("").starts_with("metrics.listen: "));
}

TEST_CASE("a binary upgrade is allowed only when steady and the config file is unchanged") {
    Steady h;
    CHECK_FALSE(h.sup.upgrade_refusal(std::nullopt).has_value());  // no config file
    CHECK_FALSE(h.sup.upgrade_refusal(ConfigFileNow{"/etc/molt.yaml", "digest"}).has_value());

    auto changed = h.sup.upgrade_refusal(ConfigFileNow{"/etc/molt.yaml", "other"});
    REQUIRE(changed.has_value());
    CHECK(changed->rfind("binary upgrade refused: /etc/molt.yaml changed since generation 1 "
                         "started",
                         0) == 0);
    // A file that no longer loads cannot be what the generation runs.
    CHECK(h.sup.upgrade_refusal(ConfigFileNow{"/etc/molt.yaml", std::nullopt}).has_value());
}

TEST_CASE("a binary upgrade is refused while anything is in motion") {
    SUBCASE("a rollover") {
        Steady h;
        h.hup(make_release("/srv/app/v2", make_config(2)));
        auto refusal = h.sup.upgrade_refusal(std::nullopt);
        REQUIRE(refusal.has_value());
        CHECK(refusal->rfind("binary upgrade refused: the master is not steady", 0) == 0);
    }
    SUBCASE("a recycle") {
        Steady h;
        h.say(h.pids(1).at(0), "RETIRE=max_requests");
        CHECK(h.sup.upgrade_refusal(std::nullopt).has_value());
    }
    SUBCASE("a restart after a crash") {
        Steady h;
        h.exit(h.pids(1).at(0), 1);
        CHECK(h.sup.upgrade_refusal(std::nullopt).has_value());
        h.make_all_ready(1);
        CHECK_FALSE(h.sup.upgrade_refusal(std::nullopt).has_value());
    }
    SUBCASE("a stop") {
        Steady h;
        h.run(h.sup.stop(h.now, false));
        CHECK(h.sup.upgrade_refusal(std::nullopt).has_value());
    }
}

TEST_CASE("a DRAIN that cannot be sent becomes SIGTERM; other messages are only logged") {
    Steady h(1);
    Pid pid = h.pids(1).at(0);
    h.run(h.sup.send_failed(h.now, pid, "REOPEN_LOGS=1", "send(REOPEN_LOGS=1) failed"));
    CHECK(h.of<SignalWorker>(h.last).empty());
    REQUIRE(h.of<WriteLog>(h.last).size() == 1);
    CHECK(h.of<WriteLog>(h.last)[0].level == LogLevel::warning);
    CHECK(h.of<WriteLog>(h.last)[0].pid == pid);

    h.run(h.sup.send_failed(h.now, pid, "DRAIN=1", "send(DRAIN=1 to pid 1000) failed: EPIPE"));
    auto signals = h.of<SignalWorker>(h.last);
    REQUIRE(signals.size() == 1);
    CHECK(signals[0].pid == pid);
    CHECK(signals[0].signal == Signal::terminate);
    auto logs = h.of<WriteLog>(h.last);
    CHECK(logs.at(0).text == "send(DRAIN=1 to pid 1000) failed: EPIPE; sending SIGTERM instead");

    // A pid the core no longer knows: nothing to do.
    h.run(h.sup.send_failed(h.now, 424242, "DRAIN=1", "failed"));
    CHECK(h.last.empty());
}

TEST_CASE("a SIGTERM that fails with ESRCH after a failed DRAIN counts as the exit") {
    Steady h(1);
    Pid pid = h.pids(1).at(0);
    h.run(h.sup.stop(h.now, false));
    h.run(h.sup.send_failed(h.now, pid, "DRAIN=1", "send failed"));
    h.run(h.sup.signal_failed(h.now, pid, true, "kill(1000, SIGTERM) failed: No such process"));
    CHECK(h.exit_code == 0);
}

TEST_CASE("worker exit codes are described with the contract's meaning") {
    using molt::contract::WorkerExit;
    ExitStatus import_failed;
    import_failed.code = static_cast<int>(WorkerExit::import_failed);
    CHECK(import_failed.describe() == "exited with status 3 (app import failed)");
    ExitStatus warmup_failed;
    warmup_failed.code = static_cast<int>(WorkerExit::warmup_failed);
    CHECK(warmup_failed.describe() == "exited with status 4 (warm-up request failed)");
    ExitStatus other;
    other.code = 1;
    CHECK(other.describe() == "exited with status 1");
}

TEST_CASE("the rollover object: its queue, the current one and the finishing phase") {
    Steady h;
    h.workers_confirm_drain = false;
    Ticket first = h.hup(make_release("/srv/app/v2", make_config(2)));
    CHECK(h.sup.rollover().phase == RolloverPhase::running);
    CHECK(h.sup.rollover().tickets == std::vector<Ticket>{first});
    Ticket second = h.hup(make_release("/srv/app/v3", make_config(2)));
    CHECK(h.sup.rollover().queued.tickets == std::vector<Ticket>{second});
    h.make_all_ready(2);
    CHECK(h.sup.rollover().phase == RolloverPhase::finishing);
    CHECK(h.sup.rollover().finishing_generation == 2);
    CHECK(h.sup.next_deadline() == h.now + 1s);  // Policy::drain_ack_grace
    h.advance_to_deadline();
    // The first finished, and the queued one started at once.
    CHECK(h.sup.rollover().phase == RolloverPhase::running);
    CHECK(h.sup.rollover().tickets == std::vector<Ticket>{second});
    CHECK(h.sup.rollover().queued.empty());
    CHECK(h.sup.starting_generation() == 3);
}

TEST_CASE("every enum value has its name (names are looked up by position)") {
    CHECK(std::string(to_string(WorkerState::spawned)) == "spawned");
    CHECK(std::string(to_string(WorkerState::exited)) == "exited");
    CHECK(std::string(to_string(Disposition::serving)) == "serving");
    CHECK(std::string(to_string(Disposition::killed)) == "killed");
    CHECK(std::string(to_string(GenerationState::failed)) == "failed");
    CHECK(std::string(to_string(ZygoteState::gone)) == "gone");
    CHECK(std::string(to_string(MasterState::stopped)) == "stopped");
    CHECK(std::string(to_string(RolloverPhase::finishing)) == "finishing");
    CHECK(std::string(to_string(Signal::terminate)) == "SIGTERM");
    CHECK(std::string(to_string(Trigger::watch)) == "watch");
    CHECK(std::string(to_string(RetireReason::max_lifetime)) == "max_lifetime");
    CHECK(std::string(to_string(RestartReason::killed)) == "killed");
    CHECK(std::string(to_string(static_cast<Disposition>(99))) == "?");
}
