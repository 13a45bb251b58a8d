#include <doctest/doctest.h>

#include <string>

#include "supervisor/loop/upgrade_state.hpp"

using namespace molt;

namespace {

loop::UpgradeState sample() {
    loop::UpgradeState state;
    state.from_build = "abcd1234";
    state.started_at = 1500;
    state.wall_started_at = 1700000000000;
    state.retired_requests = 12;
    state.next_ticket = 4;
    loop::HandedOverListener listener;
    listener.fd = 3;
    listener.address.text = "unix:/run/a.sock";
    listener.address.name = "a";
    listener.address.path = "/run/a.sock";
    listener.bound = "unix:/run/a.sock";
    listener.remove_on_exit = true;
    state.listeners.push_back(listener);
    loop::HandedOverWorker worker;
    worker.worker = {4312, 1, {}};
    worker.worker.counters.requests = 77;
    worker.worker.counters.rss = 1 << 20;
    worker.channel_fd = 7;
    worker.out_fd = 8;
    worker.err_fd = 9;
    state.workers.push_back(worker);
    state.accept_board_fd = 10;
    auto& adopted = state.adopted;
    adopted.generation = 2;
    adopted.release = {nullptr, "/srv/app/releases/2", "2", "ffee"};
    adopted.trigger = core::Trigger::watch;
    adopted.target = 1;
    core::HistoryEntry first;
    first.id = 1;
    first.trigger = core::Trigger::startup;
    first.state = core::GenerationState::gone;
    first.started_at = core::Time(100);
    first.live_at = core::Time(400);
    core::HistoryEntry second;
    second.id = 2;
    second.trigger = core::Trigger::watch;
    second.state = core::GenerationState::live;
    second.failure = "";
    adopted.history = {first, second};
    adopted.restarts = {{core::RestartReason::heartbeat, 2}, {core::RestartReason::crash, 1}};
    adopted.rollovers_ok = 1;
    return state;
}

std::string replaced(std::string text, const std::string& from, const std::string& to) {
    auto at = text.find(from);
    REQUIRE(at != std::string::npos);
    return text.replace(at, from.size(), to);
}

}  // namespace

TEST_CASE("the upgrade state reads back what was written") {
    auto parsed = loop::parse_upgrade_state(loop::serialise_upgrade_state(sample()));
    REQUIRE(os::ok(parsed));
    const auto& state = std::get<loop::UpgradeState>(parsed);
    CHECK(state.from_build == "abcd1234");
    CHECK(state.started_at == 1500);
    CHECK(state.wall_started_at == 1700000000000);
    CHECK(state.retired_requests == 12);
    CHECK(state.next_ticket == 4);
    REQUIRE(state.listeners.size() == 1);
    CHECK(state.listeners[0].fd == 3);
    CHECK(state.listeners[0].address.kind == config::ListenAddress::Kind::unix_path);
    CHECK(state.listeners[0].remove_on_exit);
    REQUIRE(state.workers.size() == 1);
    CHECK(state.workers[0].worker.pid == 4312);
    CHECK(state.workers[0].worker.counters.requests == 77);
    CHECK(state.workers[0].err_fd == 9);
    CHECK(state.accept_board_fd == 10);
    CHECK(state.adopted.trigger == core::Trigger::watch);
    CHECK(state.adopted.release.release_dir == "/srv/app/releases/2");
    REQUIRE(state.adopted.history.size() == 2);
    CHECK(state.adopted.history[0].state == core::GenerationState::gone);
    CHECK(state.adopted.history[0].live_at == core::Time(400));
    CHECK_FALSE(state.adopted.history[1].live_at.has_value());
    CHECK(state.adopted.restarts.at(core::RestartReason::heartbeat) == 2);
    CHECK(state.adopted.rollovers_ok == 1);
}

TEST_CASE("a state written before the accept board hands none over") {
    std::string text =
        replaced(loop::serialise_upgrade_state(sample()), "\"accept_board_fd\":10,", "");
    auto parsed = loop::parse_upgrade_state(text);
    REQUIRE(os::ok(parsed));
    CHECK(std::get<loop::UpgradeState>(parsed).accept_board_fd == -1);
}

TEST_CASE("a zygote is handed over with its spare; a state written before the spare has none") {
    auto state = sample();
    loop::HandedOverWorker zygote;
    zygote.worker = {4400, -1, {}};
    zygote.channel_fd = 11;
    zygote.out_fd = 12;
    zygote.err_fd = 13;
    state.zygote = zygote;
    state.zygote_spare = 4401;
    std::string text = loop::serialise_upgrade_state(state);
    auto parsed = loop::parse_upgrade_state(text);
    REQUIRE(os::ok(parsed));
    const auto& read = std::get<loop::UpgradeState>(parsed);
    REQUIRE(read.zygote.has_value());
    CHECK(read.zygote->worker.pid == 4400);
    CHECK(read.zygote->err_fd == 13);
    CHECK(read.zygote_spare == 4401);

    auto older = loop::parse_upgrade_state(replaced(text, ",\"spare_pid\":4401", ""));
    REQUIRE(os::ok(older));
    CHECK(std::get<loop::UpgradeState>(older).zygote.has_value());
    CHECK(std::get<loop::UpgradeState>(older).zygote_spare == 0);
}

TEST_CASE("the upgrade state stores enums by name, with its format") {
    std::string text = loop::serialise_upgrade_state(sample());
    CHECK(text.find("\"format\":1") != std::string::npos);
    CHECK(text.find("\"trigger\":\"watch\"") != std::string::npos);
    CHECK(text.find("\"state\":\"gone\"") != std::string::npos);
    CHECK(text.find("\"heartbeat\":2") != std::string::npos);
}

TEST_CASE("a state this binary cannot read is refused with the reason") {
    std::string good = loop::serialise_upgrade_state(sample());
    auto problem = [](const std::string& text) {
        auto parsed = loop::parse_upgrade_state(text);
        return os::ok(parsed) ? std::string() : os::error_of(parsed);
    };
    CHECK(problem(good).empty());
    CHECK(problem(replaced(good, "\"format\":1", "\"format\":2")) ==
          "is format 2; this molt reads format 1");
    CHECK(problem(replaced(good, "\"format\":1,", "")).rfind("has no \"format\"", 0) == 0);
    CHECK(problem(replaced(good, "\"state\":\"gone\"", "\"state\":\"vanished\"")) ==
          "has an unknown generation state \"vanished\" (this molt knows starting, live, "
          "draining, gone, failed)");
    CHECK(problem(replaced(good, "\"trigger\":\"watch\"", "\"trigger\":3")) ==
          "has a wrong type for \"trigger\"");
    CHECK(problem(replaced(good, "\"heartbeat\":2", "\"meteor\":2"))
              .rfind("has an unknown restart reason \"meteor\"", 0) == 0);
    CHECK(problem(replaced(good, "\"next_ticket\":4,", "")) == "lacks \"next_ticket\"");
    CHECK(problem("[1]") == "is not a JSON object");
}
