// A fake world for the supervisor core: a fake clock and a fake process table.
//
// The harness plays the loop layer's part mechanically (every SpawnWorker gets a pid at
// once, every PrepareRelease is answered with the release the test queued), and records
// every action, so a test reads like the story it checks: start, make workers ready, send
// a HUP, crash one, advance the clock, and assert what the master did.
#pragma once

#include <doctest/doctest.h>

#include <algorithm>
#include <deque>
#include <memory>
#include <string>
#include <vector>

#include "supervisor/core/supervisor.hpp"

namespace molt::test {

using namespace molt::core;
using namespace std::chrono_literals;
namespace config = molt::config;

inline std::shared_ptr<const config::Config> make_config(int workers, auto&& tweak) {
    auto config = std::make_shared<config::Config>();
    config->app = "app:application";
    config->workers = workers;
    config->timeouts.boot = 10s;
    config->timeouts.graceful = 5s;
    config->timeouts.heartbeat = 30s;
    // The zygote has its own tests (test_zygote.cpp); everything else runs without it.
    config->preload = config::Preload::off;
    tweak(*config);
    return config;
}

inline std::shared_ptr<const config::Config> make_config(int workers = 2) {
    return make_config(workers, [](config::Config&) {});
}

inline Release make_release(const std::string& dir, std::shared_ptr<const config::Config> config) {
    return Release{std::move(config), dir, dir.substr(dir.rfind('/') + 1), "digest"};
}

struct Harness {
    Supervisor sup;
    Time now{0};
    Pid next_pid = 1000;
    std::vector<Action> all;                      // every action, in order
    std::vector<Action> last;                     // the actions of the last event
    std::deque<std::optional<Release>> releases;  // answers to PrepareRelease (nullopt: reject)
    Ticket next_ticket = 1;
    std::optional<int> exit_code;
    // Like the real shim, a worker confirms DRAIN=1 with STOPPING=1 once it stopped accepting.
    bool workers_confirm_drain = true;
    // Spawns (counted from 1) that fail the way fork() does at a pids limit.
    std::vector<int> failing_spawns;
    int spawns = 0;
    // Zygotes get a pid at once; with hold_forks, a fork request waits in pending_forks until
    // the test answers it (fork_done / fork_failed), as a busy zygote would.
    bool hold_forks = false;
    std::vector<SpawnWorker> pending_forks;
    std::vector<SpawnZygote> zygotes_started;
    std::vector<Pid> zygote_pids;

    explicit Harness(Policy policy = {}) : sup(policy) {}

    void run(Actions actions) {
        last.clear();
        std::deque<Action> queue(actions.begin(), actions.end());
        while (!queue.empty()) {
            Action action = std::move(queue.front());
            queue.pop_front();
            all.push_back(action);
            last.push_back(action);
            Actions more;
            if (auto* zygote = std::get_if<SpawnZygote>(&action)) {
                zygotes_started.push_back(*zygote);
                zygote_pids.push_back(next_pid);
                more = sup.zygote_spawned(now, zygote->generation, next_pid++);
            } else if (auto* fork = std::get_if<SpawnWorker>(&action);
                       fork && fork->via_zygote != 0 && hold_forks) {
                pending_forks.push_back(*fork);
            } else if (auto* spawn = std::get_if<SpawnWorker>(&action)) {
                ++spawns;
                if (std::find(failing_spawns.begin(), failing_spawns.end(), spawns) !=
                    failing_spawns.end()) {
                    more = sup.spawn_failed(now, spawn->worker,
                                            "fork() failed: Resource temporarily unavailable");
                } else {
                    more = sup.spawned(now, spawn->worker, next_pid++);
                }
            } else if (std::get_if<PrepareRelease>(&action)) {
                REQUIRE_MESSAGE(!releases.empty(), "PrepareRelease without a queued release");
                auto release = releases.front();
                releases.pop_front();
                more = release ? sup.release_prepared(now, *release)
                               : sup.release_rejected(now, "config invalid: bad key");
            } else if (auto* send = std::get_if<SendToWorker>(&action)) {
                if (send->message == "DRAIN=1" && workers_confirm_drain) {
                    more = sup.message(now, send->pid, "STOPPING=1");
                }
            } else if (auto* exit = std::get_if<ExitMaster>(&action)) {
                exit_code = exit->code;
            }
            queue.insert(queue.end(), more.begin(), more.end());
            if (auto* line = std::get_if<WriteLog>(&action)) {
                CHECK_MESSAGE(line->text.find("did not settle") == std::string::npos, line->text);
            }
        }
        // The loop must never be asked to wake for something that is already due: that
        // would be a busy loop.
        if (auto deadline = sup.next_deadline()) CHECK(*deadline > now);
    }

    void start(Release release) { run(sup.start(now, std::move(release))); }
    Ticket hup(std::optional<Release> release) {
        releases.push_back(std::move(release));
        Ticket ticket = next_ticket++;
        run(sup.request_reload(now, ticket));
        return ticket;
    }
    void advance(Duration d) {
        now += d;
        run(sup.tick(now));
    }
    // Advance to the next deadline the core asked for (what the loop's timer does).
    void advance_to_deadline() {
        auto deadline = sup.next_deadline();
        REQUIRE(deadline.has_value());
        now = *deadline;
        run(sup.tick(now));
    }
    void ready(Pid pid) { run(sup.message(now, pid, "READY=1")); }
    // The oldest held fork request is answered: the zygote forked it (returns its pid) or not.
    Pid fork_done() {
        REQUIRE(!pending_forks.empty());
        SpawnWorker fork = pending_forks.front();
        pending_forks.erase(pending_forks.begin());
        Pid pid = next_pid++;
        run(sup.spawned(now, fork.worker, pid));
        return pid;
    }
    void fork_failed(const std::string& error) {
        REQUIRE(!pending_forks.empty());
        SpawnWorker fork = pending_forks.front();
        pending_forks.erase(pending_forks.begin());
        run(sup.spawn_failed(now, fork.worker, error));
    }
    void say(Pid pid, const std::string& text) { run(sup.message(now, pid, text)); }
    void exit(Pid pid, int code, const std::string& tail = "") {
        ExitStatus status;
        status.code = code;
        run(sup.exited(now, pid, status, tail));
    }
    void signal_failed_esrch(Pid pid) {
        run(sup.signal_failed(now, pid, true, "kill() failed: No such process"));
    }
    void killed(Pid pid, int signal, bool oom = false) {
        ExitStatus status;
        status.signal = signal;
        status.oom_suspected = oom;
        run(sup.exited(now, pid, status, ""));
    }

    // ----- queries ------------------------------------------------------------------------
    std::vector<Pid> pids(GenerationId gen, std::optional<WorkerState> state = std::nullopt) const {
        std::vector<Pid> result;
        for (const auto& [id, w] : sup.workers()) {
            if (w.generation == gen && (!state || w.state == *state)) result.push_back(w.pid);
        }
        return result;
    }
    const Worker& worker(Pid pid) const {
        for (const auto& [id, w] : sup.workers()) {
            if (w.pid == pid) return w;
        }
        FAIL("no worker with pid " << pid);
        throw std::logic_error("unreachable");
    }
    bool has_worker(Pid pid) const {
        return std::any_of(sup.workers().begin(), sup.workers().end(),
                           [&](const auto& e) { return e.second.pid == pid; });
    }
    GenerationState gen_state(GenerationId gen) const {
        auto it = sup.generations().find(gen);
        return it == sup.generations().end() ? GenerationState::gone : it->second.state;
    }
    int ready_serving() const {  // workers that accept connections (ready, not draining)
        int n = 0;
        for (const auto& [id, w] : sup.workers()) n += w.state == WorkerState::ready ? 1 : 0;
        return n;
    }
    void make_all_ready(GenerationId gen) {
        for (Pid pid : pids(gen, WorkerState::booting)) ready(pid);
    }
    void exit_all_draining(int code = 0) {
        for (const auto& [id, w] : std::map<WorkerId, Worker>(sup.workers())) {
            if (w.state == WorkerState::draining) exit(w.pid, code);
        }
    }

    template <typename T>
    std::vector<T> of(const std::vector<Action>& actions) const {
        std::vector<T> result;
        for (const auto& a : actions) {
            if (auto* t = std::get_if<T>(&a)) result.push_back(*t);
        }
        return result;
    }
    std::vector<SignalWorker> signals_to(Pid pid) const {
        std::vector<SignalWorker> result;
        for (const auto& s : of<SignalWorker>(all)) {
            if (s.pid == pid) result.push_back(s);
        }
        return result;
    }
    bool drained(Pid pid) const {
        for (const auto& m : of<SendToWorker>(all)) {
            if (m.pid == pid && m.message == "DRAIN=1") return true;
        }
        return false;
    }
    std::vector<std::string> notifications() const {
        std::vector<std::string> result;
        for (const auto& n : of<NotifySystemd>(all)) result.push_back(n.message);
        return result;
    }
};

}  // namespace molt::test
