// The standby: the next generation's zygote, forked by this one before its import.
//
// A zygote's boot up to its import (an interpreter, the shim, the native engine's extension)
// is the same for every release, and it is most of what a hello-world rollover costs. So
// right after starting a zygote the master asks it, with STANDBY= and the fds a worker would
// get, to fork a copy of itself at that point (molt_shim/standby.py). The copy waits, sharing
// every page with its zygote. When the next generation's zygote is due and its launch has the
// same key (launch.hpp: program, arguments, identity, environment apart from the
// per-generation variables), the master sends the standby START= instead of starting a
// process; the core sees the same zygote_spawned() either way. A launch with another key, a
// standby that died, or a START= that could not be sent: the zygote is spawned as before.
//
// The standby belongs to no generation: it is in processes_ (its output is logged, its exit
// reaped) with `standby` set, its exit is not the core's business, and nothing waits for it.
// It is killed when the master shuts down, dies with it (PR_SET_PDEATHSIG) and is not handed
// over in a binary upgrade (its channel closes at exec; it exits on EOF).
#include <fmt/format.h>
#include <signal.h>
#include <sys/wait.h>

#include "supervisor/common/text.hpp"
#include "supervisor/contract/worker_contract.hpp"
#include "supervisor/loop/launch.hpp"
#include "supervisor/loop/master.hpp"
#include "supervisor/loop/worker_process.hpp"

namespace molt::loop {

namespace {

constexpr std::size_t kMaxPacket = 64 * 1024;  // what the shim reads in one packet

std::optional<std::string> key_of(const os::SpawnRequest& launch) {
    auto resolved = os::real_path(launch.program);
    return standby_key(launch, os::ok(resolved) ? std::get<0>(resolved) : launch.program);
}

}  // namespace

// A config that can use no standby (no zygote, or preload_standby: false) ends the one there is.
bool Master::standby_usable_by(const config::Config& config) {
    if (config.preload == config::Preload::off) {
        end_standby("preload is off: no zygote will need it");
        return false;
    }
    if (!config.preload_standby) {
        end_standby("preload_standby is false");
        return false;
    }
    return true;
}

// Returns the standby's pid when it became `generation`'s zygote (0: spawn one instead).
pid_t Master::start_standby(core::GenerationId generation, const os::SpawnRequest& launch) {
    if (standby_.pid == 0) return 0;
    auto it = processes_.find(standby_.pid);
    if (it == processes_.end()) {
        standby_ = {};
        return 0;
    }
    auto key = key_of(launch);
    if (!key || *key != standby_.key) {
        end_standby(
            "the new zygote's launch differs from the standby's (the python, its arguments, the "
            "user or group, or the environment): starting a new interpreter");
        return 0;
    }
    auto start = standby_start(launch, standby_.env);
    std::string message = start ? fmt::format("{}={}", contract::key::start, *start) : "";
    if (message.empty() || message.size() > kMaxPacket) {
        end_standby("the new zygote's environment cannot be sent to the standby");
        return 0;
    }
    pid_t pid = standby_.pid;
    if (std::string error = os::send_packet(it->second->channel_fd.get(), message, pid);
        !error.empty()) {
        end_standby("the standby could not be told to start: " + error);
        return 0;
    }
    WorkerProcess& process = *it->second;
    process.standby = false;
    process.zygote = true;
    process.generation = generation;
    process.slot = kZygoteSlot;
    standby_ = {};
    log_.write(core::LogLevel::info,
               fmt::format("the standby (pid {}) becomes the zygote: no interpreter to start", pid),
               generation, pid);
    return pid;
}

// Right after a zygote was started (or a standby became one): its fork of the next standby.
void Master::ask_for_standby(pid_t zygote, const os::SpawnRequest& launch) {
    if (standby_.pid != 0 || pending_standby_ || exit_code_) return;
    auto key = key_of(launch);
    if (!key) return;  // no later launch could use it
    auto zygote_process = processes_.find(zygote);
    if (zygote_process == processes_.end()) return;
    auto ends = os::make_child_ends();
    if (!os::ok(ends)) {
        log_.warning("no standby: " + os::error_of(ends));
        return;
    }
    auto& [channel, out_pipe, err_pipe] = std::get<os::ChildEnds>(ends);
    auto& [master_end, standby_end] = channel;
    std::string error = os::send_packet_with_fds(
        zygote_process->second->channel_fd.get(), fmt::format("{}=1", contract::key::standby),
        {standby_end.get(), out_pipe.write_end.get(), err_pipe.write_end.get()}, zygote);
    if (!error.empty()) {
        log_.warning("no standby: " + error);
        return;
    }
    pending_standby_ = PendingStandby{zygote,
                                      {0, *key, launch.env},
                                      std::move(master_end),
                                      std::move(out_pipe.read_end),
                                      std::move(err_pipe.read_end)};
}

void Master::on_standby_answer(WorkerProcess& zygote, const std::string& packet) {
    if (!pending_standby_ || pending_standby_->zygote != zygote.pid) return;
    PendingStandby pending = std::move(*pending_standby_);
    pending_standby_.reset();
    auto fields = contract::parse_message(packet);
    pid_t pid =
        static_cast<pid_t>(std::atoi(fields[std::string(contract::key::standby_pid)].c_str()));
    if (pid <= 0) {
        // Not an error for the service: the next zygote is started as a new process.
        log_.write(core::LogLevel::info,
                   "no standby: " + fields[std::string(contract::key::standby_error)],
                   zygote.generation, zygote.pid);
        return;
    }
    WorkerProcess& process =
        track_process(zygote.generation, kStandbySlot, pid, std::move(pending.channel),
                      pending.out.release(), pending.err.release());
    process.standby = true;
    standby_ = std::move(pending.standby);
    standby_.pid = pid;
    log_.write(core::LogLevel::debug,
               fmt::format("standby ready (pid {}) for the next zygote", pid), zygote.generation,
               pid);
    if (auto status = reaped_early_.take(pid, now())) {
        standby_exited(process, *status);  // it exited before this answer was read
    }
}

void Master::standby_exited(WorkerProcess& process, int status) {
    pid_t pid = process.pid;
    bool expected = standby_.pid != pid;  // end_standby() forgot it before killing it
    if (standby_.pid == pid) standby_ = {};
    auto it = processes_.find(pid);
    WorkerProcess* worker = it->second.release();
    processes_.erase(it);
    worker->drain_output();
    close_worker_handles(worker);
    if (!expected) {
        std::string how = WIFSIGNALED(status)
                              ? fmt::format("killed by {}", text::signal_name(WTERMSIG(status)))
                              : fmt::format("exited with code {}", WEXITSTATUS(status));
        log_.warning(fmt::format(
            "the standby (pid {}) {}; the next zygote starts a new interpreter", pid, how));
    }
}

void Master::end_standby(const std::string& why) {
    pending_standby_.reset();
    if (standby_.pid == 0) return;
    pid_t pid = standby_.pid;
    standby_ = {};
    if (!why.empty()) log_.info(fmt::format("standby (pid {}) ended: {}", pid, why));
    os::send_signal(pid, SIGKILL);  // reaped like any child; standby_exited() says nothing
}

}  // namespace molt::loop
