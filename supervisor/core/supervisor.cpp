#include "supervisor/core/supervisor.hpp"

#include <fmt/format.h>

#include <algorithm>
#include <charconv>
#include <string_view>

#include "supervisor/contract/worker_contract.hpp"

namespace molt::core {

namespace {

constexpr int kSigKill = 9;  // Linux signal numbers, for describing exits without <csignal>

const char* signal_name(int signal) {
    switch (signal) {
        case 1:
            return "SIGHUP";
        case 2:
            return "SIGINT";
        case 3:
            return "SIGQUIT";
        case 4:
            return "SIGILL";
        case 6:
            return "SIGABRT";
        case 7:
            return "SIGBUS";
        case 8:
            return "SIGFPE";
        case 9:
            return "SIGKILL";
        case 11:
            return "SIGSEGV";
        case 13:
            return "SIGPIPE";
        case 15:
            return "SIGTERM";
        default:
            return nullptr;
    }
}

std::string ms(Duration d) {
    return fmt::format("{}ms", d.count());
}

// sd_notify-style "KEY=VALUE" lines.
std::map<std::string, std::string, std::less<>> parse_message(std::string_view text) {
    std::map<std::string, std::string, std::less<>> fields;
    while (!text.empty()) {
        auto end = text.find('\n');
        auto line = text.substr(0, end);
        auto eq = line.find('=');
        if (eq != std::string_view::npos) {
            fields[std::string(line.substr(0, eq))] = std::string(line.substr(eq + 1));
        }
        if (end == std::string_view::npos) break;
        text.remove_prefix(end + 1);
    }
    return fields;
}

// Cuts at most `max` bytes without splitting a UTF-8 sequence (the text goes into JSON).
std::string truncate_utf8(const std::string& text, std::size_t max) {
    if (text.size() <= max) return text;
    std::size_t end = max;
    while (end > 0 && (static_cast<unsigned char>(text[end]) & 0xC0) == 0x80) --end;
    return text.substr(0, end);
}

std::uint64_t to_u64(const std::string& text) {
    std::uint64_t value = 0;
    std::from_chars(text.data(), text.data() + text.size(), value);
    return value;
}

bool is_alive(WorkerState state) {
    return state == WorkerState::spawned || state == WorkerState::booting ||
           state == WorkerState::ready;
}

// The last non-empty line of a worker's stderr, which is usually the exception message.
std::string last_line(const std::string& text) {
    auto end = text.find_last_not_of(" \n\r\t");
    if (end == std::string::npos) return {};
    auto begin = text.rfind('\n', end);
    begin = begin == std::string::npos ? 0 : begin + 1;
    return text.substr(begin, end - begin + 1);
}

}  // namespace

const char* to_string(WorkerState state) {
    switch (state) {
        case WorkerState::spawned:
            return "spawned";
        case WorkerState::booting:
            return "booting";
        case WorkerState::ready:
            return "ready";
        case WorkerState::draining:
            return "draining";
        case WorkerState::exited:
            return "exited";
    }
    return "?";
}

const char* to_string(GenerationState state) {
    switch (state) {
        case GenerationState::starting:
            return "starting";
        case GenerationState::live:
            return "live";
        case GenerationState::draining:
            return "draining";
        case GenerationState::gone:
            return "gone";
        case GenerationState::failed:
            return "failed";
    }
    return "?";
}

const char* to_string(MasterState state) {
    switch (state) {
        case MasterState::starting:
            return "starting";
        case MasterState::running:
            return "running";
        case MasterState::stopping:
            return "stopping";
        case MasterState::stopping_fast:
            return "stopping_fast";
        case MasterState::stopped:
            return "stopped";
    }
    return "?";
}

const char* to_string(Signal signal) {
    switch (signal) {
        case Signal::abort:
            return "SIGABRT";
        case Signal::kill:
            return "SIGKILL";
        case Signal::interrupt:
            return "SIGINT";
        case Signal::terminate:
            return "SIGTERM";
    }
    return "?";
}

const char* to_string(Trigger trigger) {
    switch (trigger) {
        case Trigger::startup:
            return "startup";
        case Trigger::reload:
            return "reload";
        case Trigger::rollback:
            return "rollback";
        case Trigger::watch:
            return "watch";
    }
    return "?";
}

const char* to_string(RetireReason reason) {
    switch (reason) {
        case RetireReason::max_requests:
            return "max_requests";
        case RetireReason::max_rss:
            return "max_rss";
        case RetireReason::max_lifetime:
            return "max_lifetime";
    }
    return "?";
}

const char* to_string(RestartReason reason) {
    switch (reason) {
        case RestartReason::crash:
            return "crash";
        case RestartReason::heartbeat:
            return "heartbeat";
        case RestartReason::request_timeout:
            return "request_timeout";
        case RestartReason::recycle:
            return "recycle";
        case RestartReason::boot_timeout:
            return "boot_timeout";
        case RestartReason::killed:
            return "killed";
    }
    return "?";
}

std::string ExitStatus::describe() const {
    std::string text;
    if (signal != 0) {
        const char* name = signal_name(signal);
        text =
            name ? fmt::format("killed by {}", name) : fmt::format("killed by signal {}", signal);
        if (core_dumped) text += " (core dumped)";
        if (signal == kSigKill && oom_suspected) {
            text +=
                "; the kernel's OOM killer ran at that moment: the worker most likely ran out of "
                "memory (check the service's memory limit and recycle.max_rss)";
        }
    } else {
        text = code < 0 ? std::string("vanished (no such process)")
                        : fmt::format("exited with status {}", code);
        if (const char* meaning = contract::describe(code)) text += fmt::format(" ({})", meaning);
    }
    return text;
}

Supervisor::Supervisor(Policy policy) : policy_(policy) {}

Actions Supervisor::take() {
    Actions actions;
    actions.swap(out_);
    return actions;
}

void Supervisor::log(LogLevel level, std::string text, GenerationId gen, Pid pid) {
    emit(WriteLog{level, std::move(text), gen, pid});
}

// ----- events ------------------------------------------------------------------------------

Actions Supervisor::start(Time now, Release release) {
    configured_workers_ = target_workers_ = release.config->workers;
    rollover_started_at_ = now;
    rollover_phase_ = RolloverPhase::running;
    current_trigger_ = Trigger::startup;
    begin_generation(now, std::move(release), Trigger::startup);
    reconcile(now);
    return take();
}

Actions Supervisor::adopt(Time now, AdoptedState state) {
    Generation gen;
    gen.id = state.generation;
    gen.state = GenerationState::live;
    gen.trigger = state.trigger;
    gen.target = state.target;
    gen.admitted = state.target;
    gen.started_at = now;
    gen.live_at = now;
    gen.release = std::move(state.release);
    configured_workers_ = gen.release.config->workers;
    target_workers_ = state.target;
    next_generation_ = gen.id + 1;
    for (const auto& adopted : state.workers) {
        Worker worker;
        worker.id = next_worker_++;
        worker.generation = gen.id;
        worker.slot = adopted.slot;
        worker.pid = adopted.pid;
        worker.state = WorkerState::ready;
        worker.spawned_at = now;
        worker.ready_at = now;
        worker.last_heartbeat = now;
        worker.counters = adopted.counters;
        workers_.emplace(worker.id, worker);
    }
    history_ = std::move(state.history);
    restarts_ = std::move(state.restarts);
    rollovers_ok_ = state.rollovers_ok;
    rollovers_failed_ = state.rollovers_failed;
    log(LogLevel::info,
        fmt::format("adopted generation {} with {} worker(s) from the previous master image",
                    gen.id, state.workers.size()),
        gen.id);
    live_ = gen.id;
    generations_.emplace(gen.id, std::move(gen));
    master_state_ = MasterState::running;
    reconcile(now);  // a slot whose worker did not survive the exec is refilled
    return take();
}

bool Supervisor::steady() const {
    if (master_state_ != MasterState::running || rollover_phase_ != RolloverPhase::idle || !live_ ||
        generations_.size() != 1) {
        return false;
    }
    return std::all_of(workers_.begin(), workers_.end(), [](const auto& entry) {
        return entry.second.state == WorkerState::ready && !entry.second.stop_reason &&
               !entry.second.retiring;
    });
}

Actions Supervisor::request_reload(Time now, Ticket ticket, Trigger trigger,
                                   std::optional<std::string> release_dir) {
    if (master_state_ == MasterState::stopping || master_state_ == MasterState::stopping_fast ||
        master_state_ == MasterState::stopped) {
        emit(RolloverFinished{{ticket}, 0, false, "the master is stopping", Duration{0}});
        return take();
    }
    queued_tickets_.push_back(ticket);
    queued_trigger_ = trigger;
    queued_release_dir_ = std::move(release_dir);  // the newest request says where to go
    if (rollover_phase_ != RolloverPhase::idle || master_state_ == MasterState::starting) {
        log(LogLevel::info, fmt::format("{} queued: a rollover is in progress, it starts after",
                                        to_string(trigger)));
    }
    reconcile(now);
    return take();
}

Actions Supervisor::release_prepared(Time now, Release release) {
    if (rollover_phase_ != RolloverPhase::preparing) return take();
    rollover_phase_ = RolloverPhase::running;
    begin_generation(now, std::move(release), current_trigger_);
    reconcile(now);
    return take();
}

Actions Supervisor::release_rejected(Time now, const std::string& reason) {
    if (rollover_phase_ != RolloverPhase::preparing) return take();
    std::string keeps = live_ ? fmt::format("; generation {} keeps serving", *live_) : "";
    log(LogLevel::error,
        fmt::format("{} rejected: {}{}", to_string(current_trigger_), reason, keeps));
    finish_rollover(now, 0, false, reason);
    reconcile(now);
    return take();
}

Actions Supervisor::spawned(Time now, WorkerId id, Pid pid) {
    auto it = workers_.find(id);
    if (it == workers_.end()) return take();
    Worker& worker = it->second;
    worker.pid = pid;
    set_state(now, worker, WorkerState::booting, "process started");
    // Its generation may have failed (or been scaled down) between the SpawnWorker action and
    // this answer, e.g. when an earlier spawn of the same batch failed: it must not live on.
    GenerationState gen_state = generations_.at(worker.generation).state;
    bool wanted = gen_state == GenerationState::starting || gen_state == GenerationState::live;
    if (!wanted || worker.stop_reason) {
        if (!worker.stop_reason) worker.stop_reason = RestartReason::killed;
        send_signal(worker, Signal::kill, "no longer needed when its process started");
    }
    reconcile(now);
    return take();
}

Actions Supervisor::spawn_failed(Time now, WorkerId id, const std::string& error) {
    auto it = workers_.find(id);
    if (it == workers_.end()) return take();
    ExitStatus status;
    status.code = 127;
    it->second.error = "could not start the worker process: " + error;
    // A worker that never ran is treated exactly like one that died at once.
    worker_ended(now, it->second, status, "");
    return take();
}

Actions Supervisor::message(Time now, Pid pid, const std::string& text) {
    Worker* worker = find_by_pid(pid);
    if (worker == nullptr) return take();
    Generation* gen = find_generation(worker->generation);
    const auto& config = *gen->release.config;
    auto fields = parse_message(text);

    if (auto it = fields.find("ERROR"); it != fields.end()) {
        worker->error = truncate_utf8(it->second, 2000);
        log(LogLevel::error, fmt::format("worker slot={} reports: {}", worker->slot, worker->error),
            gen->id, pid);
    }
    if (fields.count("STOPPING") && worker->state == WorkerState::draining &&
        !worker->stopped_accepting_at) {
        worker->stopped_accepting_at = now;
    }
    bool gated = gen->state == GenerationState::starting || gen->state == GenerationState::live;
    if (fields.count("READY") && worker->state == WorkerState::booting &&
        (!gated || worker->stop_reason)) {
        log(LogLevel::debug,
            fmt::format("worker slot={} sent READY but is being stopped; ignored", worker->slot),
            gen->id, pid);
    } else if (fields.count("READY") && worker->state == WorkerState::booting) {
        if (now >= worker->boot_deadline) {
            // Too late: the deadline already decided. reconcile() fails or kills it.
            log(LogLevel::warning,
                fmt::format("worker slot={} sent READY after its boot deadline; ignored",
                            worker->slot),
                gen->id, pid);
        } else {
            worker->ready_at = now;
            worker->last_heartbeat = now;
            set_state(now, *worker, WorkerState::ready,
                      fmt::format("booted in {}", ms(now - worker->spawned_at)));
        }
    }
    if (fields.count("WATCHDOG") || fields.count("REQUESTS")) {
        worker->last_heartbeat = now;
        if (auto it = fields.find("REQUESTS"); it != fields.end()) {
            worker->counters.requests = to_u64(it->second);
        }
        if (auto it = fields.find("INFLIGHT"); it != fields.end()) {
            worker->counters.inflight = to_u64(it->second);
        }
        if (auto it = fields.find("OLDEST_MS"); it != fields.end()) {
            worker->counters.oldest_ms = to_u64(it->second);
        }
        if (auto it = fields.find("RSS"); it != fields.end()) {
            worker->counters.rss = to_u64(it->second);
        }
        if (config.recycle.max_rss > 0 && worker->counters.rss > config.recycle.max_rss &&
            worker->state == WorkerState::ready && !worker->retiring &&
            gen->state == GenerationState::live) {
            worker->retiring = RetireReason::max_rss;
            log(LogLevel::info,
                fmt::format("worker slot={} uses {} bytes, above recycle.max_rss; replacing it",
                            worker->slot, worker->counters.rss),
                gen->id, pid);
        }
    }
    if (auto it = fields.find("RETIRE"); it != fields.end()) {
        if (worker->state == WorkerState::ready && !worker->retiring &&
            gen->state == GenerationState::live) {
            worker->retiring = it->second == "max_rss"        ? RetireReason::max_rss
                               : it->second == "max_lifetime" ? RetireReason::max_lifetime
                                                              : RetireReason::max_requests;
            log(LogLevel::info,
                fmt::format("worker slot={} asks to retire ({}); replacing it", worker->slot,
                            it->second),
                gen->id, pid);
        }
    }
    reconcile(now);
    return take();
}

Actions Supervisor::exited(Time now, Pid pid, const ExitStatus& status,
                           const std::string& stderr_tail) {
    Worker* worker = find_by_pid(pid);
    if (worker == nullptr) return take();
    worker_ended(now, *worker, status, stderr_tail);
    return take();
}

void Supervisor::worker_ended(Time now, Worker& ended, const ExitStatus& status,
                              const std::string& stderr_tail) {
    Worker* worker = &ended;
    Pid pid = worker->pid;
    Generation* gen = find_generation(worker->generation);
    WorkerState was = worker->state;
    set_state(now, *worker, WorkerState::exited, status.describe());

    bool deliberate = worker->stop_reason == RestartReason::killed;
    if (gen->state == GenerationState::starting && deliberate) {
        // Scaled down while booting: expected, not a broken release.
    } else if (gen->state == GenerationState::starting) {
        // Any death in a generation that is not live yet fails it: the release is broken.
        std::string detail = !worker->error.empty() ? worker->error : last_line(stderr_tail);
        std::string who = pid > 0 ? fmt::format("worker slot={} pid={}", worker->slot, pid)
                                  : fmt::format("worker slot={}", worker->slot);
        std::string reason =
            fmt::format("{} {} {}", who, status.describe(),
                        was == WorkerState::ready ? "after READY" : "before READY");
        if (!detail.empty()) reason += ": " + detail;
        fail_generation(now, *gen, reason);
    } else if (gen->state == GenerationState::live && is_alive(was) && !deliberate) {
        on_crash(now, *worker, *gen, status, stderr_tail);
    } else if (status.signal != 0 || status.code != 0) {
        log(was == WorkerState::draining && status.signal == kSigKill ? LogLevel::error
                                                                      : LogLevel::warning,
            fmt::format("worker slot={} {} while {}", worker->slot, status.describe(),
                        to_string(was)),
            gen->id, pid);
    }
    workers_.erase(worker->id);
    reconcile(now);
}

Actions Supervisor::signal_failed(Time now, Pid pid, bool no_such_process,
                                  const std::string& error) {
    Worker* worker = find_by_pid(pid);
    if (worker == nullptr) return take();
    log(LogLevel::warning, fmt::format("signalling worker slot={} failed: {}", worker->slot, error),
        worker->generation, pid);
    if (!no_such_process) return take();
    ExitStatus vanished;
    vanished.code = -1;
    return exited(now, pid, vanished, "");
}

Actions Supervisor::tick(Time now) {
    reconcile(now);
    return take();
}

Actions Supervisor::stop(Time now, bool fast) {
    bool already_fast = master_state_ == MasterState::stopping_fast;
    bool already = already_fast || master_state_ == MasterState::stopping;
    if (master_state_ == MasterState::stopped || already_fast || (already && !fast)) {
        log(LogLevel::info, "already stopping");
        return take();
    }
    master_state_ = fast ? MasterState::stopping_fast : MasterState::stopping;
    log(LogLevel::info,
        fast ? "fast stop: interrupting every worker" : "graceful stop: draining every worker");
    if (!already) emit(NotifySystemd{"STOPPING=1"});

    std::vector<Ticket> abandoned = std::move(queued_tickets_);
    queued_tickets_.clear();
    if (!abandoned.empty()) {
        emit(RolloverFinished{abandoned, 0, false, "the master is stopping", Duration{0}});
    }
    if (starting_) fail_generation(now, generations_.at(*starting_), "the master is stopping");
    if (rollover_phase_ == RolloverPhase::preparing) {
        finish_rollover(now, 0, false, "the master is stopping");
    }
    if (rollover_phase_ == RolloverPhase::finishing) {
        finish_rollover(now, finishing_generation_, true, "");  // it did go live
    }
    if (live_) retire_generation(now, generations_.at(*live_));

    for (auto& [id, worker] : workers_) {
        if (fast) {
            if (!worker.stop_reason) worker.stop_reason = RestartReason::killed;
            send_signal(worker, Signal::interrupt, "fast stop");
            Time deadline = now + policy_.fast_stop_grace;
            worker.kill_at = worker.kill_at ? std::min(*worker.kill_at, deadline) : deadline;
        } else if (worker.state == WorkerState::ready) {
            drain(now, worker, "graceful stop");
        }
    }
    reconcile(now);
    return take();
}

Actions Supervisor::scale(Time now, int workers) {
    if (workers < 1) {
        log(LogLevel::warning,
            fmt::format("cannot scale to {} workers: at least one is needed", workers));
        return take();
    }
    if (master_state_ != MasterState::running && master_state_ != MasterState::starting) {
        return take();
    }
    log(LogLevel::info, fmt::format("scaling from {} to {} workers", target_workers_, workers));
    target_workers_ = workers;
    std::erase_if(slot_health_, [&](const auto& entry) { return entry.first >= workers; });
    if (live_) generations_.at(*live_).target = workers;
    if (starting_) {
        Generation& gen = generations_.at(*starting_);
        bool all_at_once = gen.admitted >= gen.target;
        gen.target = workers;
        gen.admitted = all_at_once ? workers : std::min(gen.admitted, workers);
    }
    reconcile(now);
    return take();
}

Actions Supervisor::reopen_logs(Time /*now*/) {
    for (auto& [id, worker] : workers_) {
        if (worker.pid > 0 && worker.state != WorkerState::exited) {
            emit(SendToWorker{worker.id, worker.pid, "REOPEN_LOGS=1"});
        }
    }
    return take();
}

// ----- the rules ---------------------------------------------------------------------------

void Supervisor::reconcile(Time now) {
    bool stopping = master_state_ == MasterState::stopping ||
                    master_state_ == MasterState::stopping_fast ||
                    master_state_ == MasterState::stopped;
    if (!stopping) {
        if (starting_) reconcile_starting(now, generations_.at(*starting_));
        if (live_) reconcile_live(now, generations_.at(*live_));
    }
    reconcile_workers(now);

    // A draining or failed generation whose last worker is gone is gone.
    for (auto& [id, gen] : generations_) {
        bool ending =
            gen.state == GenerationState::draining || gen.state == GenerationState::failed;
        if (ending && workers_of(id).empty()) {
            if (gen.state == GenerationState::draining) {
                set_state(now, gen, GenerationState::gone, "its last worker exited");
            }
            gen.ended_at = now;
            record_history(gen);
        }
    }
    std::erase_if(generations_, [&](const auto& entry) {
        const Generation& gen = entry.second;
        return gen.ended_at.has_value() && entry.first != live_ && entry.first != starting_;
    });

    if (stopping) {
        finish_stop_if_done(now);
    } else {
        maybe_finish_rollover(now);
        maybe_start_queued_rollover(now);
    }
    update_status();
}

void Supervisor::reconcile_starting(Time now, Generation& gen) {
    const auto& config = *gen.release.config;
    for (Worker* worker : workers_of(gen.id)) {
        bool booting =
            worker->state == WorkerState::spawned || worker->state == WorkerState::booting;
        if (booting && now >= worker->boot_deadline) {
            worker->stop_reason = RestartReason::boot_timeout;
            std::string detail = worker->error.empty() ? "" : ": " + worker->error;
            fail_generation(
                now, gen,
                fmt::format("worker slot={} pid={} did not send READY within "
                            "timeouts.boot ({}){}",
                            worker->slot, worker->pid, ms(config.timeouts.boot), detail));
            return;
        }
        if (worker->slot >= gen.target && worker->state != WorkerState::draining &&
            !worker->stop_reason) {
            if (worker->state == WorkerState::ready) {
                drain(now, *worker, "scaled down");
            } else {
                worker->stop_reason = RestartReason::killed;
                send_signal(*worker, Signal::kill, "scaled down while booting");
            }
        }
    }

    Generation* old = live_ ? &generations_.at(*live_) : nullptr;
    for (int slot = 0; slot < gen.admitted; ++slot) {
        auto workers = workers_of(gen.id);
        bool has = std::any_of(workers.begin(), workers.end(),
                               [&](Worker* w) { return w->slot == slot && is_alive(w->state); });
        if (!has) spawn(now, gen, slot);
    }
    for (int slot = 0; slot < gen.admitted; ++slot) {
        auto workers = workers_of(gen.id);
        bool ready = std::any_of(workers.begin(), workers.end(), [&](Worker* w) {
            return w->slot == slot && w->state == WorkerState::ready;
        });
        if (!ready) return;
    }

    // Every admitted slot is ready: the old generation hands those slots over.
    if (old != nullptr) {
        for (Worker* worker : workers_of(old->id)) {
            if (worker->slot < gen.admitted && is_alive(worker->state)) {
                drain(now, *worker, fmt::format("replaced by generation {}", gen.id));
            }
        }
    }
    if (gen.admitted >= gen.target) {
        go_live(now, gen);
        return;
    }
    // In batches, the next batch starts only when the old workers it replaces have exited,
    // so the host never holds more than one batch of extra workers.
    if (old != nullptr) {
        for (Worker* worker : workers_of(old->id)) {
            if (worker->slot < gen.admitted) return;
        }
    }
    gen.admitted = std::min(gen.target, gen.admitted + std::max(1, config.rollover.batch));
    log(LogLevel::info,
        fmt::format("rollover batch: {} of {} slots handed over", gen.admitted, gen.target),
        gen.id);
    reconcile_starting(now, gen);
}

bool Supervisor::slot_handed_over(const Generation& gen, int slot) const {
    if (!starting_ || *starting_ == gen.id) return false;
    return slot < generations_.at(*starting_).admitted;
}

void Supervisor::reconcile_live(Time now, Generation& gen) {
    for (int slot = 0; slot < gen.target; ++slot) {
        if (slot_handed_over(gen, slot)) continue;
        std::vector<Worker*> in_slot;
        for (Worker* w : workers_of(gen.id)) {
            if (w->slot == slot && is_alive(w->state)) in_slot.push_back(w);
        }
        bool covered = false;
        bool covered_and_ready = false;
        for (Worker* w : in_slot) {
            if (w->retiring || w->stop_reason) continue;
            covered = true;
            covered_and_ready = covered_and_ready || w->state == WorkerState::ready;
        }
        if (!covered) {
            if (now >= slot_health_[slot].not_before) spawn(now, gen, slot);
            continue;
        }
        if (!covered_and_ready) continue;
        for (Worker* w : in_slot) {
            if (w->retiring && w->state == WorkerState::ready) {
                restarts_[RestartReason::recycle]++;
                gen.slot_restarts[slot]++;
                drain(now, *w,
                      fmt::format("recycled ({}), its replacement is ready",
                                  to_string(*w->retiring)));
            }
        }
    }
    for (Worker* w : workers_of(gen.id)) {
        if (w->slot >= gen.target && is_alive(w->state)) {
            if (w->state == WorkerState::ready) {
                drain(now, *w, "scaled down");
            } else if (!w->stop_reason) {
                w->stop_reason = RestartReason::killed;
                send_signal(*w, Signal::kill, "scaled down while booting");
            }
        }
    }
}

void Supervisor::reconcile_workers(Time now) {
    for (auto& [id, worker] : workers_) {
        if (worker.state == WorkerState::exited) continue;
        const Generation& gen = generations_.at(worker.generation);
        const auto& config = *gen.release.config;
        if (worker.kill_at && now >= *worker.kill_at) {
            worker.kill_at.reset();
            if (!worker.stop_reason && worker.state != WorkerState::draining) {
                worker.stop_reason = RestartReason::killed;
            }
            send_signal(worker, Signal::kill,
                        worker.state == WorkerState::draining
                            ? fmt::format("still running {} after DRAIN (timeouts.graceful)",
                                          ms(config.timeouts.graceful))
                            : "still running after the grace period");
            continue;
        }
        if (worker.state == WorkerState::booting && gen.state == GenerationState::live &&
            !worker.stop_reason && now >= worker.boot_deadline) {
            worker.stop_reason = RestartReason::boot_timeout;
            send_signal(
                worker, Signal::kill,
                fmt::format("no READY within timeouts.boot ({})", ms(config.timeouts.boot)));
            continue;
        }
        if (worker.state != WorkerState::ready || worker.kill_at || worker.stop_reason) continue;
        if (now >= heartbeat_deadline(worker, config)) {
            worker.stop_reason = RestartReason::heartbeat;
            worker.kill_at = now + policy_.abort_grace;
            send_signal(worker, Signal::abort,
                        fmt::format("no heartbeat for {} (timeouts.heartbeat); its thread "
                                    "tracebacks follow in its stderr",
                                    ms(now - worker.last_heartbeat)));
            continue;
        }
        auto limit = config.timeouts.request;
        if (limit.count() > 0 && worker.counters.inflight > 0) {
            Duration age = Duration(worker.counters.oldest_ms) + (now - worker.last_heartbeat);
            if (age >= limit) {
                worker.stop_reason = RestartReason::request_timeout;
                worker.kill_at = now + policy_.abort_grace;
                send_signal(worker, Signal::abort,
                            fmt::format("a request has run for {} (timeouts.request is {})",
                                        ms(age), ms(limit)));
                continue;
            }
        }
        auto lifetime = config.recycle.max_lifetime;
        if (lifetime.count() > 0 && gen.state == GenerationState::live && !worker.retiring &&
            now >= *worker.ready_at + lifetime) {
            worker.retiring = RetireReason::max_lifetime;
            log(LogLevel::info,
                fmt::format("worker slot={} reached recycle.max_lifetime; replacing it",
                            worker.slot),
                gen.id, worker.pid);
        }
    }
}

void Supervisor::finish_stop_if_done(Time /*now*/) {
    if (master_state_ == MasterState::stopped || !workers_.empty()) return;
    master_state_ = MasterState::stopped;
    log(LogLevel::info, fmt::format("every worker has exited; master exits {}", exit_code_));
    emit(ExitMaster{exit_code_});
}

void Supervisor::maybe_start_queued_rollover(Time now) {
    if (queued_tickets_.empty() || rollover_phase_ != RolloverPhase::idle ||
        master_state_ != MasterState::running) {
        return;
    }
    current_tickets_ = std::move(queued_tickets_);
    queued_tickets_.clear();
    current_trigger_ = queued_trigger_.value_or(Trigger::reload);
    rollover_phase_ = RolloverPhase::preparing;
    rollover_started_at_ = now;
    emit(NotifySystemd{"RELOADING=1"});
    std::optional<std::string> dir = std::move(queued_release_dir_);
    queued_release_dir_.reset();
    queued_trigger_.reset();
    log(LogLevel::info, fmt::format("{} started", to_string(current_trigger_)));
    emit(PrepareRelease{std::move(dir)});
}

// ----- transitions -------------------------------------------------------------------------

void Supervisor::begin_generation(Time now, Release release, Trigger trigger) {
    Generation gen;
    gen.id = next_generation_++;
    gen.trigger = trigger;
    // A changed `workers:` wins; otherwise a TTIN/TTOU scale survives the reload.
    if (release.config->workers != configured_workers_) {
        configured_workers_ = target_workers_ = release.config->workers;
    }
    gen.target = target_workers_;
    int batch = release.config->rollover.batch;
    gen.admitted = (batch <= 0 || !live_) ? gen.target : std::min(gen.target, batch);
    gen.started_at = now;
    gen.release = std::move(release);
    std::string batches = gen.admitted < gen.target ? fmt::format(", in batches of {}", batch) : "";
    log(LogLevel::info,
        fmt::format("generation {} starting ({}): {} version={} workers={}{}", gen.id,
                    to_string(trigger), gen.release.release_dir, gen.release.version, gen.target,
                    batches),
        gen.id);
    starting_ = gen.id;
    auto [it, inserted] = generations_.emplace(gen.id, std::move(gen));
    record_history(it->second);
}

void Supervisor::go_live(Time now, Generation& gen) {
    std::optional<GenerationId> previous = live_;
    gen.live_at = now;
    gen.admitted = gen.target;
    set_state(now, gen, GenerationState::live,
              fmt::format("every worker is ready after {}", ms(now - gen.started_at)));
    live_ = gen.id;
    starting_.reset();
    slot_health_.clear();
    if (previous) retire_generation(now, generations_.at(*previous));
    record_history(gen);
    if (master_state_ == MasterState::starting) master_state_ = MasterState::running;
    rollover_phase_ = RolloverPhase::finishing;
    finishing_generation_ = gen.id;
    finishing_deadline_ = now + policy_.drain_ack_grace;
    maybe_finish_rollover(now);
}

void Supervisor::maybe_finish_rollover(Time now) {
    if (rollover_phase_ != RolloverPhase::finishing) return;
    bool confirmed = std::all_of(workers_.begin(), workers_.end(), [](const auto& entry) {
        const Worker& w = entry.second;
        return w.state != WorkerState::draining || w.stopped_accepting_at.has_value();
    });
    if (!confirmed && now < finishing_deadline_) return;
    if (!confirmed) {
        log(LogLevel::warning,
            fmt::format("some draining workers did not confirm within {} that they stopped "
                        "accepting (STOPPING=1); reporting the rollover done anyway",
                        ms(policy_.drain_ack_grace)),
            finishing_generation_);
    }
    finish_rollover(now, finishing_generation_, true, "");
}

void Supervisor::fail_generation(Time now, Generation& gen, const std::string& reason) {
    gen.failure = reason;
    set_state(now, gen, GenerationState::failed, reason);
    if (starting_ == gen.id) starting_.reset();
    for (Worker* worker : workers_of(gen.id)) {
        if (worker->state == WorkerState::ready) {
            drain(now, *worker, "its generation failed");
        } else if (is_alive(worker->state)) {
            if (!worker->stop_reason) worker->stop_reason = RestartReason::killed;
            send_signal(*worker, Signal::kill, fmt::format("generation {} failed", gen.id));
        }
    }
    record_history(gen);
    if (master_state_ == MasterState::stopping || master_state_ == MasterState::stopping_fast) {
        finish_rollover(now, gen.id, false, reason);
        return;
    }
    if (live_) {
        // The live generation keeps its size; a `workers:` change arrives with the next good
        // release.
        const Generation& serving = generations_.at(*live_);
        target_workers_ = serving.target;
        configured_workers_ = serving.release.config->workers;
        log(LogLevel::error,
            fmt::format("rollover to generation {} failed; generation {} keeps serving: {}", gen.id,
                        *live_, reason),
            gen.id);
    } else {
        log(LogLevel::error,
            fmt::format("the first generation failed, nothing to serve; exiting: {}", reason),
            gen.id);
        master_state_ = MasterState::stopping;
        exit_code_ = 1;
    }
    finish_rollover(now, gen.id, false, reason);
}

void Supervisor::retire_generation(Time now, Generation& gen) {
    set_state(now, gen, GenerationState::draining,
              live_ == gen.id ? "the master is stopping" : "a newer generation is live");
    if (live_ == gen.id && master_state_ != MasterState::running) live_.reset();
    for (Worker* worker : workers_of(gen.id)) {
        if (worker->state == WorkerState::ready) {
            drain(now, *worker, fmt::format("generation {} is draining", gen.id));
        } else if (is_alive(worker->state) && !worker->stop_reason) {
            // A replacement still booting in the old generation is no longer needed.
            worker->stop_reason = RestartReason::killed;
            send_signal(*worker, Signal::kill, "its generation is draining before it was ready");
        }
    }
    record_history(gen);
}

void Supervisor::finish_rollover(Time now, GenerationId gen, bool ok, const std::string& reason) {
    Trigger trigger = current_trigger_;
    RolloverFinished result{std::move(current_tickets_), gen, ok, reason,
                            now - rollover_started_at_};
    current_tickets_.clear();
    rollover_phase_ = RolloverPhase::idle;
    if (trigger != Trigger::startup) {
        (ok ? rollovers_ok_ : rollovers_failed_)++;
        last_rollover_ = result;
    }
    emit(result);
    bool stopping = master_state_ != MasterState::running && master_state_ != MasterState::starting;
    if ((trigger == Trigger::startup && !ok) || stopping) return;
    std::string status = status_line();
    last_status_ = status;
    if (ok) {
        emit(NotifySystemd{fmt::format("READY=1\nSTATUS={}", status)});
    } else {
        emit(NotifySystemd{fmt::format("READY=1\nSTATUS={} failed: {}; {}", to_string(trigger),
                                       reason.substr(0, 300), status)});
    }
}

void Supervisor::spawn(Time now, Generation& gen, int slot) {
    Worker worker;
    worker.id = next_worker_++;
    worker.generation = gen.id;
    worker.slot = slot;
    worker.spawned_at = now;
    worker.boot_deadline = now + gen.release.config->timeouts.boot;
    log(LogLevel::debug, fmt::format("spawning worker slot={}", slot), gen.id);
    emit(SpawnWorker{worker.id, gen.id, slot, gen.release});
    workers_.emplace(worker.id, std::move(worker));
}

void Supervisor::drain(Time now, Worker& worker, const std::string& why) {
    if (worker.state == WorkerState::draining || worker.state == WorkerState::exited) return;
    const auto& config = *generations_.at(worker.generation).release.config;
    set_state(now, worker, WorkerState::draining, why);
    Time graceful_end = now + config.timeouts.graceful;
    // A shorter deadline already set (SIGKILL after SIGABRT) stays.
    worker.kill_at = worker.kill_at ? std::min(*worker.kill_at, graceful_end) : graceful_end;
    emit(SendToWorker{worker.id, worker.pid, "DRAIN=1"});
}

void Supervisor::send_signal(Worker& worker, Signal signal, const std::string& reason) {
    if (worker.pid <= 0) return;
    LogLevel level =
        signal == Signal::kill || signal == Signal::abort ? LogLevel::error : LogLevel::info;
    log(level,
        fmt::format("sending {} to worker slot={}: {}", to_string(signal), worker.slot, reason),
        worker.generation, worker.pid);
    emit(SignalWorker{worker.id, worker.pid, signal, reason});
}

void Supervisor::on_crash(Time now, Worker& worker, Generation& gen, const ExitStatus& status,
                          const std::string& stderr_tail) {
    RestartReason reason = worker.stop_reason.value_or(RestartReason::crash);
    restarts_[reason]++;
    gen.slot_restarts[worker.slot]++;
    SlotHealth& health = slot_health_[worker.slot];
    bool was_healthy = worker.ready_at && now - *worker.ready_at >= policy_.backoff_reset;
    if (was_healthy) health.consecutive_failures = 0;
    health.consecutive_failures++;
    Duration delay{0};
    if (health.consecutive_failures > 1) {
        int doublings = std::min(health.consecutive_failures - 2, 30);
        delay =
            std::min(policy_.backoff_cap, policy_.backoff_base * (std::int64_t{1} << doublings));
    }
    health.not_before = now + delay;
    // The last stderr line explains a worker that never became ready; after READY it is
    // usually an unrelated access or info line, so only the worker's own ERROR= is quoted.
    std::string detail = !worker.error.empty() ? worker.error
                         : worker.ready_at     ? std::string()
                                               : last_line(stderr_tail);
    log(LogLevel::error,
        fmt::format("worker slot={} {} ({}); replacing it in {}{}", worker.slot, status.describe(),
                    to_string(reason), ms(delay), detail.empty() ? "" : ": " + detail),
        gen.id, worker.pid);
}

void Supervisor::set_state(Time now, Worker& worker, WorkerState next, const std::string& why) {
    (void)now;
    if (worker.state == next) return;
    log(next == WorkerState::booting ? LogLevel::debug : LogLevel::info,
        fmt::format("worker slot={}: {} -> {} ({})", worker.slot, to_string(worker.state),
                    to_string(next), why),
        worker.generation, worker.pid);
    worker.state = next;
}

void Supervisor::set_state(Time now, Generation& gen, GenerationState next,
                           const std::string& why) {
    (void)now;
    if (gen.state == next) return;
    log(next == GenerationState::failed ? LogLevel::error : LogLevel::info,
        fmt::format("generation {}: {} -> {} ({})", gen.id, to_string(gen.state), to_string(next),
                    why),
        gen.id);
    gen.state = next;
}

void Supervisor::record_history(const Generation& gen) {
    HistoryEntry entry{
        gen.id,      gen.release.release_dir, gen.release.version, gen.release.digest,
        gen.trigger, gen.started_at,          gen.live_at,         gen.state,
        gen.failure};
    for (auto& existing : history_) {
        if (existing.id == gen.id) {
            existing = entry;
            return;
        }
    }
    history_.push_front(entry);
    while (history_.size() > policy_.history_size) history_.pop_back();
}

void Supervisor::update_status() {
    std::string status = status_line();
    if (status == last_status_ || master_state_ == MasterState::starting) return;
    last_status_ = status;
    emit(NotifySystemd{"STATUS=" + status});
}

// ----- queries -----------------------------------------------------------------------------

std::string Supervisor::status_line() const {
    std::string text;
    for (const auto& [id, gen] : generations_) {
        int ready = 0, total = 0;
        for (const auto& [wid, w] : workers_) {
            if (w.generation != id) continue;
            ++total;
            ready += w.state == WorkerState::ready ? 1 : 0;
        }
        if (!text.empty()) text += "; ";
        text += fmt::format(
            "gen {} {} ({}): {}/{} ready", id, to_string(gen.state), gen.release.version, ready,
            gen.state == GenerationState::draining ? total : std::max(total, gen.target));
    }
    return text.empty() ? std::string(to_string(master_state_)) : text;
}

std::optional<std::string> Supervisor::rollback_target() const {
    if (!live_) return std::nullopt;
    const std::string& current = generations_.at(*live_).release.release_dir;
    for (const auto& entry : history_) {
        if (entry.id >= *live_ || !entry.live_at) continue;
        if (entry.release_dir != current) return entry.release_dir;
    }
    return std::nullopt;
}

std::optional<Time> Supervisor::next_deadline() const {
    std::optional<Time> next;
    auto consider = [&](Time t) { next = next ? std::min(*next, t) : t; };
    for (const auto& [id, worker] : workers_) {
        const Generation& gen = generations_.at(worker.generation);
        const auto& config = *gen.release.config;
        if (worker.kill_at) consider(*worker.kill_at);
        bool gated = gen.state == GenerationState::starting || gen.state == GenerationState::live;
        if ((worker.state == WorkerState::booting || worker.state == WorkerState::spawned) &&
            gated && !worker.stop_reason) {
            consider(worker.boot_deadline);
        }
        if (worker.state != WorkerState::ready || worker.kill_at || worker.stop_reason) continue;
        consider(heartbeat_deadline(worker, config));
        if (config.timeouts.request.count() > 0 && worker.counters.inflight > 0) {
            consider(worker.last_heartbeat + config.timeouts.request -
                     Duration(worker.counters.oldest_ms));
        }
        if (config.recycle.max_lifetime.count() > 0 && !worker.retiring &&
            gen.state == GenerationState::live) {
            consider(*worker.ready_at + config.recycle.max_lifetime);
        }
    }
    if (rollover_phase_ == RolloverPhase::finishing) consider(finishing_deadline_);
    if (live_ && master_state_ == MasterState::running) {
        // A slot waiting out its crash backoff: due when its not_before passes. A slot that
        // already has a worker again is not waiting for anything.
        // Exactly the slots reconcile_live() would refill: below the target, not handed over
        // to a starting generation, and without a worker that covers it.
        const Generation& live = generations_.at(*live_);
        for (const auto& [slot, health] : slot_health_) {
            if (health.consecutive_failures == 0 || slot >= live.target ||
                slot_handed_over(live, slot)) {
                continue;
            }
            bool covered = std::any_of(workers_.begin(), workers_.end(), [&](const auto& entry) {
                const Worker& w = entry.second;
                return w.generation == live.id && w.slot == slot && is_alive(w.state) &&
                       !w.retiring && !w.stop_reason;
            });
            if (!covered) consider(health.not_before);
        }
    }
    return next;
}

Time Supervisor::heartbeat_deadline(const Worker& worker, const config::Config& config) const {
    return worker.last_heartbeat + config.timeouts.heartbeat;
}

Worker* Supervisor::find_by_pid(Pid pid) {
    for (auto& [id, worker] : workers_) {
        if (worker.pid == pid) return &worker;
    }
    return nullptr;
}

Generation* Supervisor::find_generation(GenerationId id) {
    auto it = generations_.find(id);
    return it == generations_.end() ? nullptr : &it->second;
}

std::vector<Worker*> Supervisor::workers_of(GenerationId gen) {
    std::vector<Worker*> result;
    for (auto& [id, worker] : workers_) {
        if (worker.generation == gen && worker.state != WorkerState::exited) {
            result.push_back(&worker);
        }
    }
    return result;
}

}  // namespace molt::core
