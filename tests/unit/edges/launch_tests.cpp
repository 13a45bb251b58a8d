#include <doctest/doctest.h>
#include <unistd.h>

#include <algorithm>
#include <functional>
#include <memory>
#include <nlohmann/json.hpp>

#include "supervisor/loop/launch.hpp"

using namespace molt;

namespace {

bool has(const std::vector<std::string>& env, const std::string& entry) {
    return std::find(env.begin(), env.end(), entry) != env.end();
}

bool has_name(const std::vector<std::string>& env, const std::string& name) {
    return std::any_of(env.begin(), env.end(),
                       [&](const std::string& e) { return e.rfind(name + "=", 0) == 0; });
}

std::vector<os::Listener> two_listeners() {
    std::vector<os::Listener> listeners(2);
    listeners[0].address.name = "web";
    listeners[1].address.name = "unix:/run/a.sock";
    return listeners;
}

}  // namespace

TEST_CASE("a child's environment loses systemd's and molt's own variables, and only those") {
    auto env = loop::child_environment({"PATH=/usr/bin", "NOTIFY_SOCKET=/run/systemd/notify",
                                        "NOTIFY_SOCKETS=kept", "LISTEN_FDS=2", "LISTEN_PID=1",
                                        "WATCHDOG_USEC=10", "MOLT_UPGRADE_STATE={}", "HOME=/root",
                                        "EMPTY="});
    CHECK(env ==
          std::vector<std::string>{"PATH=/usr/bin", "NOTIFY_SOCKETS=kept", "HOME=/root", "EMPTY="});
}

TEST_CASE("a worker's environment follows the contract") {
    auto config = std::make_shared<config::Config>();
    config->env = {{"DJANGO_SETTINGS_MODULE", "site.settings"}, {"HOME", "/srv/app"}};
    core::SpawnWorker spawn{7, 3, 1, {config, "/srv/app/releases/42", "42", "d"}};
    auto listeners = two_listeners();
    loop::WorkerLaunch launch{
        spawn,
        listeners,
        "/opt/molt/lib/molt",
        {"HOME=/root", "PYTHONPATH=/inherited", "LISTEN_FDS=2", "MOLT_WORKER=99", "LANG=C.UTF-8"}};
    auto env = loop::worker_environment(launch);

    CHECK(has(env, "LANG=C.UTF-8"));
    CHECK(has(env, "HOME=/srv/app"));  // the config's env: wins
    CHECK_FALSE(has(env, "HOME=/root"));
    CHECK(has(env, "DJANGO_SETTINGS_MODULE=site.settings"));
    CHECK(has(env, "PYTHONPATH=/opt/molt/lib/molt:/inherited"));
    CHECK(has(env, "PYTHONUNBUFFERED=1"));
    CHECK_FALSE(has_name(env, "LISTEN_FDS"));
    CHECK(has(env, "MOLT_LISTEN_FDS=3,4"));
    CHECK(has(env, "MOLT_CHANNEL_FD=5"));
    CHECK(has(env, "MOLT_LISTEN_NAMES=web,unix:/run/a.sock"));
    CHECK(has(env, "MOLT_GENERATION=3"));
    CHECK(has(env, "MOLT_WORKER=1"));  // ours, not the master's MOLT_WORKER=99
    CHECK(std::count_if(env.begin(), env.end(),
                        [](const std::string& e) { return e.rfind("MOLT_WORKER=", 0) == 0; }) == 1);
    CHECK(has_name(env, "MOLT_WORKER_CONFIG"));
}

TEST_CASE("the config's PYTHONPATH replaces the inherited one after the shim's directory") {
    auto config = std::make_shared<config::Config>();
    config->env = {{"PYTHONPATH", "/srv/app/lib"}};
    core::SpawnWorker spawn{1, 1, 0, {config, "/srv/app", "app", "d"}};
    std::vector<os::Listener> listeners;
    loop::WorkerLaunch launch{spawn, listeners, "/shim", {"PYTHONPATH=/inherited"}};
    auto env = loop::worker_environment(launch);
    CHECK(has(env, "PYTHONPATH=/shim:/srv/app/lib"));
    CHECK(has(env, "MOLT_CHANNEL_FD=3"));  // no listeners: the channel comes first
}

TEST_CASE("the spawn request places the listeners, then the channel, and names a bad user") {
    auto config = std::make_shared<config::Config>();
    config->python = "/bin/sh";
    core::SpawnWorker spawn{1, 1, 0, {config, "/tmp", "tmp", "d"}};
    auto listeners = two_listeners();
    listeners[0].fd = os::Fd(::dup(0));
    listeners[1].fd = os::Fd(::dup(0));
    loop::WorkerLaunch launch{spawn, listeners, "/shim", {}};
    auto request = loop::worker_spawn_request(launch, {40, 41, 42});
    REQUIRE(os::ok(request));
    const auto& r = std::get<os::SpawnRequest>(request);
    CHECK(r.fds == std::vector<int>{listeners[0].fd.get(), listeners[1].fd.get(), 40});
    CHECK(r.stdout_fd == 41);
    CHECK(r.stderr_fd == 42);
    CHECK(r.cwd == "/tmp");
    CHECK(r.argv == std::vector<std::string>{"/bin/sh", "-m", "molt_shim"});

    // The accept board, when the master has one, follows the channel (fd 6 here).
    CHECK_FALSE(has_name(r.env, "MOLT_ACCEPT_BOARD_FD"));
    launch.accept_board = 43;
    auto with_board = loop::worker_spawn_request(launch, {40, 41, 42});
    REQUIRE(os::ok(with_board));
    const auto& b = std::get<os::SpawnRequest>(with_board);
    CHECK(b.fds == std::vector<int>{listeners[0].fd.get(), listeners[1].fd.get(), 40, 43});
    CHECK(has(b.env, "MOLT_ACCEPT_BOARD_FD=6"));

    config->user = "no-such-user-molt-test";
    auto refused = loop::worker_spawn_request(launch, {40, 41, 42});
    REQUIRE_FALSE(os::ok(refused));
    CHECK(os::error_of(refused) == "no user named no-such-user-molt-test");
}

TEST_CASE("a standby stands in only for a launch that differs in per-generation variables") {
    os::SpawnRequest launch;
    launch.program = "/usr/bin/python3";
    launch.argv = {"python3", "-m", "molt_shim"};
    launch.env = {"PATH=/usr/bin", "PYTHONPATH=/usr/lib/molt:/srv/lib", "MOLT_GENERATION=1",
                  "MOLT_WORKER_CONFIG={\"generation\": 1}", "PROMETHEUS_MULTIPROC_DIR=/run/m/1"};
    launch.cwd = "/srv/releases/a";
    auto key = loop::standby_key(launch, "/usr/bin/python3.11");
    REQUIRE(key);

    os::SpawnRequest next = launch;
    next.env = {"MOLT_WORKER_CONFIG={\"generation\": 2}", "PATH=/usr/bin",
                "PYTHONPATH=/usr/lib/molt:/srv/lib", "MOLT_GENERATION=2",
                "PROMETHEUS_MULTIPROC_DIR=/run/m/2"};  // another order: the same launch
    next.cwd = "/srv/releases/b";
    CHECK(loop::standby_key(next, "/usr/bin/python3.11") == key);
    // The same `python:` resolving to another interpreter (a virtualenv inside the release).
    CHECK(loop::standby_key(next, "/usr/bin/python3.12") != key);

    for (auto change : std::vector<std::function<void(os::SpawnRequest&)>>{
             [](os::SpawnRequest& r) { r.env.push_back("DJANGO_SETTINGS_MODULE=site.prod"); },
             [](os::SpawnRequest& r) { r.env[0] = "PATH=/usr/local/bin:/usr/bin"; },
             [](os::SpawnRequest& r) { r.program = "/usr/bin/python3.11"; },
             [](os::SpawnRequest& r) { r.argv.push_back("-X"); },
             [](os::SpawnRequest& r) { r.uid = 1000; },
             [](os::SpawnRequest& r) { r.gid = 1000; }}) {
        os::SpawnRequest other = next;
        change(other);
        CHECK(loop::standby_key(other, "/usr/bin/python3.11") != key);
    }
    // A relative PYTHONPATH entry was resolved in the directory the standby started in.
    os::SpawnRequest relative = launch;
    relative.env[1] = "PYTHONPATH=/usr/lib/molt:lib";
    CHECK_FALSE(loop::standby_key(relative, "/usr/bin/python3.11"));
    // JSON cannot carry a value that is not UTF-8 unchanged.
    os::SpawnRequest binary = launch;
    binary.env.push_back("BLOB=\xff\xfe");
    CHECK_FALSE(loop::standby_key(binary, "/usr/bin/python3.11"));
}

TEST_CASE("START= gives a standby the new directory and per-generation variables") {
    os::SpawnRequest next;
    next.env = {"PATH=/usr/bin", "MOLT_GENERATION=2", "MOLT_ZYGOTE=1",
                "PROMETHEUS_MULTIPROC_DIR=/run/m/2"};
    next.cwd = "/srv/releases/b";
    auto start = loop::standby_start(next, {"PATH=/usr/bin", "MOLT_GENERATION=1", "MOLT_ZYGOTE=1",
                                            "MOLT_WORKER=0", "PROMETHEUS_MULTIPROC_DIR=/run/m/1"});
    REQUIRE(start);
    auto json = nlohmann::json::parse(*start);
    CHECK(json["cwd"] == "/srv/releases/b");
    CHECK(json["env"] == nlohmann::json{{"MOLT_GENERATION", "2"},
                                        {"MOLT_ZYGOTE", "1"},
                                        {"PROMETHEUS_MULTIPROC_DIR", "/run/m/2"}});
    CHECK(json["drop"] == nlohmann::json::array({"MOLT_WORKER"}));
    CHECK_FALSE(loop::is_per_generation_variable("PATH=/usr/bin"));
    CHECK(loop::is_per_generation_variable("MOLT_CHANNEL_FD=5"));
}
