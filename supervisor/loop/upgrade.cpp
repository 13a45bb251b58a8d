// Binary upgrade on SIGUSR2: the master re-executes itself in place, so its PID (systemd's
// MainPID) never changes, and the new image adopts the listeners and the live generation's
// workers without restarting them.
//
//   1. Only from a steady state (one live generation, every worker ready): a handover in the
//      middle of a rollover would have to serialise half-made decisions.
//   2. The new binary is first run in a child as `molt upgrade-check [-c FILE]`: it must start,
//      load the config with its own loader and exit 0. If not, nothing changes.
//   3. The state goes into MOLT_UPGRADE_STATE (versioned JSON with enums by name, see
//      upgrade_state.hpp; the check of step 2 already parsed it), the fds it names lose
//      close-on-exec, every signal is blocked (the mask survives exec, so a HUP in the gap
//      stays pending instead of killing the master with the default action), and execve()
//      runs.
//   4. The new image finds MOLT_UPGRADE_STATE and calls run_adopted() instead of binding.
#include <fmt/format.h>
#include <signal.h>
#include <sys/wait.h>

#include "supervisor/loop/launch.hpp"
#include "supervisor/loop/master.hpp"
#include "supervisor/loop/servers.hpp"
#include "supervisor/loop/upgrade_state.hpp"
#include "supervisor/loop/worker_process.hpp"

namespace molt::loop {

namespace {

// Sets close-on-exec on every fd; the first failure is returned (all are still tried).
std::string set_close_on_exec(const std::vector<int>& fds, bool on) {
    std::string first;
    for (int fd : fds) {
        std::string error = os::set_close_on_exec(fd, on);
        if (first.empty()) first = error;
    }
    return first;
}

}  // namespace

void Master::begin_upgrade() {
    if (upgrade_check_pid_ > 0) {
        log_.warning("binary upgrade already being checked; SIGUSR2 ignored");
        return;
    }
    std::optional<core::ConfigFileNow> file;
    if (!options_.config_path.empty()) {
        auto loaded = config::load_config_file(options_.config_path);
        file = core::ConfigFileNow{options_.config_path, std::nullopt};
        if (loaded.errors.empty()) file->digest = config::config_digest(*loaded.config);
    }
    if (auto refusal = core_.upgrade_refusal(file)) {
        log_.warning(*refusal);
        return;
    }
    auto pipe = os::make_pipe();
    if (!os::ok(pipe)) {
        log_.error("binary upgrade aborted: " + os::error_of(pipe));
        return;
    }
    auto& [read_end, write_end] = std::get<os::Pipe>(pipe);
    if (auto error = os::set_nonblocking(read_end.get()); !error.empty()) {
        log_.error("binary upgrade aborted: " + error);
        return;
    }
    os::SpawnRequest request;
    request.program = options_.executable;
    request.argv = {options_.executable, "upgrade-check"};
    if (!options_.config_path.empty()) {
        request.argv.push_back("-c");
        request.argv.push_back(options_.config_path);
    }
    // The check child is not the service: like a worker, it must not talk to systemd or take
    // its sockets.
    request.env = child_environment(os::environment());
    // The new binary parses the very state it would adopt, with its own code, before any exec.
    request.env.push_back(std::string(kCheckStateVariable) + "=" +
                          serialise_upgrade_state(upgrade_state()));
    request.stdout_fd = write_end.get();
    request.stderr_fd = write_end.get();
    auto pid = os::spawn_process(request);
    write_end.reset();  // the child holds its copy; EOF comes when it exits
    if (!os::ok(pid)) {
        log_.error("binary upgrade aborted: " + os::error_of(pid));
        return;
    }
    upgrade_check_pid_ = std::get<pid_t>(pid);
    upgrade_check_output_ = std::move(read_end);
    uv_timer_start(
        &upgrade_timer_,
        [](uv_timer_t* t) {
            auto* master = static_cast<Master*>(t->data);
            if (master->upgrade_check_pid_ <= 0) return;
            master->log_.error("binary upgrade: the check did not finish within 30s; killing it");
            // Its exit aborts the upgrade.
            std::string error = os::send_signal(master->upgrade_check_pid_, SIGKILL);
            if (!error.empty()) master->log_.error("binary upgrade: " + error);
        },
        30000, 0);
    log_.info(fmt::format("binary upgrade: checking {} (pid {})", options_.executable,
                          upgrade_check_pid_));
}

void Master::finish_upgrade_check(int status) {
    uv_timer_stop(&upgrade_timer_);
    std::string output = os::read_available(upgrade_check_output_.get(), 64 * 1024);
    upgrade_check_output_.reset();
    upgrade_check_pid_ = 0;
    while (!output.empty() && (output.back() == '\n' || output.back() == ' ')) output.pop_back();

    bool passed = WIFEXITED(status) && WEXITSTATUS(status) == 0 && output.rfind("molt ", 0) == 0;
    if (!passed) {
        std::string how = WIFEXITED(status)
                              ? fmt::format("exited with status {}", WEXITSTATUS(status))
                              : fmt::format("killed by signal {}", WTERMSIG(status));
        log_.error(
            fmt::format("binary upgrade aborted: {} failed its check ({}): {}; this master "
                        "keeps running",
                        options_.executable, how, output.substr(0, 500)));
        return;
    }
    if (!core_.steady()) {
        log_.error(
            "binary upgrade aborted: a rollover or restart began during the check; send "
            "SIGUSR2 again");
        return;
    }
    exec_new_image(output);
}

UpgradeState Master::upgrade_state() const {
    UpgradeState state;
    state.from_build = options_.build;
    state.started_at = started_at_.count();
    state.wall_started_at = wall_started_at_;
    state.retired_requests = retired_requests_;
    state.next_ticket = next_ticket_;
    for (const auto& l : listeners_) {
        state.listeners.push_back(
            {l.fd.get(), l.address, l.bound, l.from_systemd, l.remove_on_exit});
    }
    for (const auto& [id, w] : core_.workers()) {
        auto it = processes_.find(w.pid);
        if (it == processes_.end()) continue;
        const WorkerProcess& p = *it->second;
        core::AdoptedWorker worker{w.pid, w.slot, w.counters, w.forked};
        state.workers.push_back({worker, p.channel_fd.get(), p.out_fd(), p.err_fd()});
    }
    const core::Generation& gen = core_.generations().at(*core_.live_generation());
    state.zygote_fallback = gen.zygote.fallback;
    state.accept_board_fd = accept_board_.get();
    if (gen.zygote.state == core::ZygoteState::ready) {
        if (auto it = processes_.find(gen.zygote.pid); it != processes_.end()) {
            const WorkerProcess& p = *it->second;
            state.zygote = HandedOverWorker{core::AdoptedWorker{gen.zygote.pid, -1, {}, false},
                                            p.channel_fd.get(), p.out_fd(), p.err_fd()};
            state.zygote_spare = spare_of(gen.zygote.pid);
        }
    }
    core::AdoptedState& adopted = state.adopted;
    adopted.generation = gen.id;
    adopted.release = gen.release;
    adopted.trigger = gen.trigger;
    adopted.target = gen.target;
    adopted.history.assign(core_.history().begin(), core_.history().end());
    adopted.restarts = core_.restarts();
    adopted.rollovers_ok = core_.rollovers(true);
    adopted.rollovers_failed = core_.rollovers(false);
    return state;
}

std::vector<int> Master::handed_over_fds() const {
    std::vector<int> fds;
    for (const auto& l : listeners_) fds.push_back(l.fd.get());
    if (accept_board_) fds.push_back(accept_board_.get());
    auto state = upgrade_state();
    pid_t zygote = state.zygote ? state.zygote->worker.pid : 0;
    for (const auto& [pid, p] : processes_) {
        // Not handed over (a zygote not ready, the standby): each exits when its channel closes.
        if ((p->zygote && pid != zygote) || p->standby) continue;
        for (int fd : {p->channel_fd.get(), p->out_fd(), p->err_fd()}) {
            if (fd >= 0) fds.push_back(fd);
        }
    }
    return fds;
}

void Master::exec_new_image(const std::string& new_version) {
    std::string state = serialise_upgrade_state(upgrade_state());
    // The master's own environment, as it was, plus the state: the new image is the service.
    std::string prefix = std::string(kStateVariable) + "=";
    std::vector<std::string> env;
    for (auto& entry : os::environment()) {
        if (entry.rfind(prefix, 0) != 0) env.push_back(std::move(entry));
    }
    env.push_back(prefix + state);

    auto fds = handed_over_fds();
    if (auto error = set_close_on_exec(fds, false); !error.empty()) {
        set_close_on_exec(fds, true);
        log_.error("binary upgrade aborted: " + error + "; this master keeps running");
        return;
    }
    log_.info(
        fmt::format("binary upgrade: {} passed its check ({}); re-executing in place, pid {} "
                    "stays, {} worker(s) stay",
                    options_.executable, new_version, os::self_pid(), core_.workers().size()));
    sigset_t old = os::block_all_signals();
    std::string error = os::exec_image(options_.executable, options_.argv, env);
    os::set_signal_mask(old);
    set_close_on_exec(fds, true);
    log_.error(fmt::format("binary upgrade aborted: {}; this master keeps running", error));
}

int Master::run_adopted(const std::string& text) {
    auto parsed = parse_upgrade_state(text);
    if (!os::ok(parsed)) {
        // Nothing sane to adopt: the workers see EOF on their channels and drain by themselves.
        // (`molt upgrade-check` refuses such a state before the old master execs, so this is
        // only reached by a state that was changed in between.)
        log_.error(fmt::format("binary upgrade failed: {} {}; exiting", kStateVariable,
                               os::error_of(parsed)));
        return 1;
    }
    return adopt(std::move(std::get<UpgradeState>(parsed)));
}

std::string validate_upgrade_state(const std::string& text) {
    auto parsed = parse_upgrade_state(text);
    return os::ok(parsed) ? std::string() : os::error_of(parsed);
}

int Master::adopt(UpgradeState state) {
    started_at_ = core::Time(state.started_at);
    wall_started_at_ = state.wall_started_at;
    retired_requests_ = state.retired_requests;
    next_ticket_ = state.next_ticket;
    std::vector<std::string> problems;
    for (auto& l : state.listeners) {
        os::Listener listener;
        listener.fd = os::Fd(l.fd);
        listener.address = l.address;
        listener.bound = l.bound;
        listener.from_systemd = l.from_systemd;
        listener.remove_on_exit = l.remove_on_exit;
        if (auto error = os::set_close_on_exec(l.fd, true); !error.empty())
            problems.push_back(error);
        listeners_.push_back(std::move(listener));
    }

    core::AdoptedState adopted = std::move(state.adopted);
    adopted.release.config = config_;
    for (const auto& w : state.workers) {
        for (int fd : {w.channel_fd, w.out_fd, w.err_fd}) {
            if (auto error = os::set_close_on_exec(fd, true); !error.empty()) {
                problems.push_back(error);
            }
        }
        track_process(adopted.generation, w.worker.slot, w.worker.pid, os::Fd(w.channel_fd),
                      w.out_fd, w.err_fd);
        adopted.workers.push_back(w.worker);
    }
    if (state.zygote) {
        const HandedOverWorker& z = *state.zygote;
        for (int fd : {z.channel_fd, z.out_fd, z.err_fd}) {
            if (auto error = os::set_close_on_exec(fd, true); !error.empty()) {
                problems.push_back(error);
            }
        }
        track_process(adopted.generation, kZygoteSlot, z.worker.pid, os::Fd(z.channel_fd), z.out_fd,
                      z.err_fd)
            .zygote = true;
        adopted.zygote = z.worker.pid;
        // A spare that exited across the exec is reaped by this image as a pid it does not
        // know, which takes it out of spares_ again (on_worker_exit).
        if (state.zygote_spare > 0) spares_[z.worker.pid] = state.zygote_spare;
    }
    adopted.zygote_fallback = state.zygote_fallback;
    if (state.accept_board_fd >= 0) {
        if (auto error = os::set_close_on_exec(state.accept_board_fd, true); !error.empty()) {
            problems.push_back(error);
        }
        accept_board_ = os::Fd(state.accept_board_fd);
    }
    if (auto error = os::become_subreaper(); !error.empty()) log_.warning(error);
    // A worker would inherit an fd still open across its exec: worth a line, not a stop.
    for (const auto& problem : problems) log_.warning("after the binary upgrade: " + problem);

    if (auto error = start_services(); !error.empty()) {
        // The workers are serving; losing the control socket must not take them down.
        log_.error("after the binary upgrade: " + error);
    }
    log_.info(fmt::format("binary upgrade complete: now molt {} build {} (was build {}), pid {}",
                          options_.version, options_.build, state.from_build, os::self_pid()));
    feed(core_.adopt(now(), std::move(adopted)));
    // Children that exited while no image was listening for SIGCHLD are reaped now; then the
    // signals held back across exec are let through to the new handlers.
    reap_children();
    os::unblock_all_signals();
    uv_run(&loop_, UV_RUN_DEFAULT);
    return exit_code_.value_or(1);
}

}  // namespace molt::loop
