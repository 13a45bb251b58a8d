#include "supervisor/core/supervisor.hpp"

#include <fmt/format.h>

#include <algorithm>
#include <array>
#include <charconv>
#include <string_view>
#include <utility>

#include "supervisor/common/text.hpp"
#include "supervisor/contract/worker_contract.hpp"

namespace molt::core {

namespace {

constexpr int kSigKill = 9;  // Linux signal numbers, for describing exits without <csignal>
// A wake of the loop this late after its deadline means the master did not run: see
// Supervisor::account_for_pause.
constexpr Duration kPauseThreshold{500};

std::string ms(Duration d) {
    return fmt::format("{}ms", d.count());
}

using contract::parse_message;

std::uint64_t to_u64(const std::string& text) {
    std::uint64_t value = 0;
    std::from_chars(text.data(), text.data() + text.size(), value);
    return value;
}

namespace key = contract::key;

// The DRAIN message, as the shim expects it.
std::string drain_message() {
    return fmt::format("{}=1", key::drain);
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

// The name of each value of an enum, in declaration order (the enums are dense from 0).
// tests/unit/core/test_policy.cpp checks the last value of each, so a value added without
// its name shows up as "?" there.
template <typename Enum, std::size_t N>
const char* name_of(Enum value, const std::array<const char*, N>& names) {
    auto index = static_cast<std::size_t>(value);
    return index < N ? names[index] : "?";
}

}  // namespace

const char* to_string(WorkerState state) {
    return name_of(state, std::array{"spawned", "booting", "ready", "draining", "exited"});
}

const char* to_string(Disposition disposition) {
    return name_of(disposition, std::array{"serving", "retiring", "aborting", "draining",
                                           "stopped_accepting", "interrupted", "killed"});
}

const char* to_string(RolloverPhase phase) {
    return name_of(phase, std::array{"idle", "preparing", "running", "finishing"});
}

const char* to_string(GenerationState state) {
    return name_of(state, std::array{"starting", "live", "draining", "gone", "failed"});
}

const char* to_string(ZygoteState state) {
    return name_of(state, std::array{"none", "booting", "ready", "stopping", "gone"});
}

const char* to_string(MasterState state) {
    return name_of(state,
                   std::array{"starting", "running", "stopping", "stopping_fast", "stopped"});
}

const char* to_string(Signal signal) {
    return name_of(signal, std::array{"SIGABRT", "SIGKILL", "SIGINT", "SIGTERM"});
}

const char* to_string(Trigger trigger) {
    return name_of(trigger, std::array{"startup", "reload", "rollback", "watch"});
}

const char* to_string(RetireReason reason) {
    return name_of(reason, std::array{"max_requests", "max_rss", "max_lifetime"});
}

const char* to_string(RestartReason reason) {
    return name_of(reason, std::array{"crash", "heartbeat", "request_timeout", "recycle",
                                      "boot_timeout", "killed"});
}

std::string ExitStatus::describe() const {
    std::string text;
    if (signal != 0) {
        text = "killed by " + molt::text::signal_name(signal);
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

std::optional<std::string> reload_refusal(const config::Config& serving,
                                          const config::Config& next) {
    std::vector<std::string> have, want;
    for (const auto& address : serving.listen) have.push_back(address.text);
    for (const auto& address : next.listen) want.push_back(address.text);
    if (have != want) {
        return fmt::format(
            "listen: changing listen addresses needs a restart (serving {}, the config now says "
            "{})",
            fmt::join(have, ", "), fmt::join(want, ", "));
    }
    // What else the master sets up once, at its start: a reload that changed them would
    // half-apply (a pidfile never written and the old one left behind at exit, `molt ctl`
    // looking for a socket nobody listens on).
    auto mode = [](const config::Config& c) {  // the socket's: nothing without one
        return c.control.socket.empty() ? std::string() : fmt::format("{:04o}", c.control.mode);
    };
    auto metrics = [](const config::Config& c) {
        return c.metrics.listen ? c.metrics.listen->text : "";
    };
    const std::pair<const char*, std::pair<std::string, std::string>> once[] = {
        {"pidfile", {serving.pidfile, next.pidfile}},
        {"control.socket", {serving.control.socket, next.control.socket}},
        {"control.mode", {mode(serving), mode(next)}},
        {"metrics.listen", {metrics(serving), metrics(next)}},
    };
    for (const auto& [key, values] : once) {
        if (values.first != values.second) {
            return fmt::format(
                "{}: changing it needs a restart (serving \"{}\", the config now "
                "says \"{}\")",
                key, values.first, values.second);
        }
    }
    return std::nullopt;
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
    account_for_pause(now);
    configured_workers_ = target_workers_ = release.config->workers;
    rollover_.started_at = now;
    rollover_.trigger = Trigger::startup;
    set_phase(RolloverPhase::running, "the first generation starts");
    begin_generation(now, std::move(release), Trigger::startup);
    reconcile(now);
    return take();
}

Actions Supervisor::adopt(Time now, AdoptedState state) {
    account_for_pause(now);
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
        worker.forked = adopted.forked;
        workers_.emplace(worker.id, worker);
    }
    if (state.zygote > 0) {
        gen.zygote.state = ZygoteState::ready;
        gen.zygote.pid = state.zygote;
        gen.zygote.started_at = gen.zygote.boot_deadline = now;
        gen.zygote.ready_at = now;
    }
    gen.zygote.fallback = std::move(state.zygote_fallback);
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
    if (master_state_ != MasterState::running || rollover_.phase != RolloverPhase::idle || !live_ ||
        generations_.size() != 1) {
        return false;
    }
    return std::all_of(workers_.begin(), workers_.end(), [](const auto& entry) {
        return entry.second.state == WorkerState::ready && covers_slot(entry.second);
    });
}

std::optional<std::string> Supervisor::upgrade_refusal(
    const std::optional<ConfigFileNow>& file) const {
    if (!steady()) {
        return std::string(
            "binary upgrade refused: the master is not steady (a rollover, recycle or restart is "
            "in progress); send SIGUSR2 again when `molt ctl status` shows only ready workers");
    }
    const Generation& live = generations_.at(*live_);
    if (file && file->digest != live.release.digest) {
        return fmt::format(
            "binary upgrade refused: {} changed since generation {} started; run a reload "
            "(kill -HUP or `molt ctl reload --wait`) first, then SIGUSR2",
            file->path, live.id);
    }
    return std::nullopt;
}

Actions Supervisor::request_reload(Time now, Ticket ticket, Trigger trigger,
                                   std::optional<std::string> release_dir,
                                   std::string destination) {
    account_for_pause(now);
    if (master_state_ == MasterState::stopping || master_state_ == MasterState::stopping_fast ||
        master_state_ == MasterState::stopped) {
        emit(RolloverFinished{{ticket}, 0, false, "the master is stopping", Duration{0}});
        return take();
    }
    ReloadQueue& queue = rollover_.queued;
    if (!queue.empty() && queue.destination != destination) {
        // Queued requests become one rollover only when they go to the same place: a rollback
        // behind a reload (or the other way round) supersedes it, and its clients hear so
        // rather than the answer of a rollover onto a release they did not ask for.
        emit(RolloverFinished{std::exchange(queue.tickets, {}), 0, false,
                              fmt::format("superseded by a {} requested after it, before it "
                                          "started",
                                          to_string(trigger)),
                              Duration{0}, true});
    }
    queue.destination = std::move(destination);
    queue.tickets.push_back(ticket);
    queue.trigger = trigger;
    queue.release_dir = std::move(release_dir);
    if (rollover_.phase != RolloverPhase::idle || master_state_ == MasterState::starting) {
        log(LogLevel::info, fmt::format("{} queued: a rollover is in progress, it starts after",
                                        to_string(trigger)));
    }
    reconcile(now);
    return take();
}

Actions Supervisor::release_prepared(Time now, Release release) {
    account_for_pause(now);
    if (rollover_.phase != RolloverPhase::preparing) return take();
    set_phase(RolloverPhase::running, "the release is prepared");
    begin_generation(now, std::move(release), rollover_.trigger);
    reconcile(now);
    return take();
}

Actions Supervisor::release_rejected(Time now, const std::string& reason) {
    account_for_pause(now);
    if (rollover_.phase != RolloverPhase::preparing) return take();
    std::string keeps = live_ ? fmt::format("; generation {} keeps serving", *live_) : "";
    log(LogLevel::error,
        fmt::format("{} rejected: {}{}", to_string(rollover_.trigger), reason, keeps));
    finish_rollover(now, 0, false, reason);
    reconcile(now);
    return take();
}

Actions Supervisor::spawned(Time now, WorkerId id, Pid pid) {
    account_for_pause(now);
    auto it = workers_.find(id);
    if (it == workers_.end()) return take();
    Worker& worker = it->second;
    worker.pid = pid;
    set_state(now, worker, WorkerState::booting, "process started");
    // Its generation may have failed (or been scaled down) between the SpawnWorker action and
    // this answer, e.g. when an earlier spawn of the same batch failed: it must not live on.
    GenerationState gen_state = generations_.at(worker.generation).state;
    bool wanted = gen_state == GenerationState::starting || gen_state == GenerationState::live;
    if (!wanted || !covers_slot(worker)) {
        kill(now, worker, RestartReason::killed, "no longer needed when its process started");
    }
    reconcile(now);
    return take();
}

Actions Supervisor::spawn_failed(Time now, WorkerId id, const std::string& error) {
    account_for_pause(now);
    auto it = workers_.find(id);
    if (it == workers_.end()) return take();
    ExitStatus status;
    status.code = 127;
    it->second.error = "could not start the worker process: " + error;
    // A worker that never ran is treated exactly like one that died at once.
    worker_ended(now, it->second, status, "");
    return take();
}

Actions Supervisor::zygote_spawned(Time now, GenerationId id, Pid pid) {
    account_for_pause(now);
    Generation* gen = find_generation(id);
    if (gen == nullptr) return take();
    gen->zygote.pid = pid;
    log(LogLevel::debug, "zygote process started", id, pid);
    if (gen->zygote.state == ZygoteState::stopping) {
        // Its generation ended between SpawnZygote and this answer.
        emit(SignalWorker{0, pid, Signal::kill, "its generation no longer starts workers"});
    }
    reconcile(now);
    return take();
}

Actions Supervisor::zygote_spawn_failed(Time now, GenerationId id, const std::string& error) {
    account_for_pause(now);
    Generation* gen = find_generation(id);
    if (gen == nullptr) return take();
    ExitStatus status;
    status.code = 127;
    gen->zygote.error = "could not start the zygote process: " + error;
    zygote_ended(now, *gen, status, "");
    return take();
}

Actions Supervisor::message(Time now, Pid pid, const std::string& text) {
    account_for_pause(now);
    if (Generation* zygote_gen = find_by_zygote(pid)) {
        zygote_message(now, *zygote_gen, text);
        reconcile(now);
        return take();
    }
    Worker* worker = find_by_pid(pid);
    if (worker == nullptr) return take();
    Generation* gen = find_generation(worker->generation);
    const auto& config = *gen->release.config;
    auto fields = parse_message(text);

    if (auto it = fields.find(key::error); it != fields.end()) {
        worker->error = molt::text::truncate_utf8(it->second, 2000);
        log(LogLevel::error, fmt::format("worker slot={} reports: {}", worker->slot, worker->error),
            gen->id, pid);
    }
    if (fields.count(key::stopping) && worker->disposition == Disposition::draining) {
        dispose(now, *worker, Disposition::stopped_accepting, "it confirmed with STOPPING=1");
    }
    bool gated = gen->state == GenerationState::starting || gen->state == GenerationState::live;
    bool ready = fields.count(key::ready) && worker->state == WorkerState::booting;
    if (ready && (!gated || !covers_slot(*worker))) {
        log(LogLevel::debug,
            fmt::format("worker slot={} sent READY but is being stopped; ignored", worker->slot),
            gen->id, pid);
    } else if (ready) {
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
    if (fields.count(key::watchdog) || fields.count(key::requests)) {
        worker->last_heartbeat = now;
        if (auto it = fields.find(key::requests); it != fields.end()) {
            worker->counters.requests = to_u64(it->second);
        }
        if (auto it = fields.find(key::inflight); it != fields.end()) {
            worker->counters.inflight = to_u64(it->second);
        }
        if (auto it = fields.find(key::oldest_ms); it != fields.end()) {
            worker->counters.oldest_ms = to_u64(it->second);
        }
        if (auto it = fields.find(key::rss); it != fields.end()) {
            worker->counters.rss = to_u64(it->second);
        }
        if (auto it = fields.find(key::durations); it != fields.end()) {
            // A malformed value keeps the last good one: counters must never go backwards.
            if (auto stats = parse_durations(it->second)) {
                stats->exceptions = worker->counters.stats.exceptions;
                worker->counters.stats = *stats;
            }
        }
        if (auto it = fields.find(key::exceptions); it != fields.end()) {
            worker->counters.stats.exceptions = to_u64(it->second);
        }
        if (config.recycle.max_rss > 0 && worker->counters.rss > config.recycle.max_rss) {
            retire(now, *worker, RetireReason::max_rss,
                   fmt::format("uses {} bytes, above recycle.max_rss", worker->counters.rss));
        }
    }
    if (auto it = fields.find(key::retire); it != fields.end()) {
        RetireReason reason = it->second == "max_rss"        ? RetireReason::max_rss
                              : it->second == "max_lifetime" ? RetireReason::max_lifetime
                                                             : RetireReason::max_requests;
        retire(now, *worker, reason, fmt::format("asks to retire ({})", it->second));
    }
    reconcile(now);
    return take();
}

Actions Supervisor::exited(Time now, Pid pid, const ExitStatus& status,
                           const std::string& stderr_tail) {
    account_for_pause(now);
    if (Generation* gen = find_by_zygote(pid)) {
        zygote_ended(now, *gen, status, stderr_tail);
        return take();
    }
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

    // The master stopped it on purpose (not for a fault of the release): it was killed as no
    // longer needed, or it was draining.
    bool deliberate = worker->stop_reason == RestartReason::killed || was == WorkerState::draining;
    if (gen->state == GenerationState::starting && deliberate) {
        // Scaled down (killed while booting, or drained after READY): expected, not a broken
        // release.
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
    account_for_pause(now);
    if (Generation* gen = find_by_zygote(pid)) {
        log(LogLevel::warning, "signalling the zygote failed: " + error, gen->id, pid);
        if (!no_such_process) return take();
        ExitStatus vanished;
        vanished.code = -1;
        return exited(now, pid, vanished, "");
    }
    Worker* worker = find_by_pid(pid);
    if (worker == nullptr) return take();
    log(LogLevel::warning, fmt::format("signalling worker slot={} failed: {}", worker->slot, error),
        worker->generation, pid);
    if (!no_such_process) return take();
    ExitStatus vanished;
    vanished.code = -1;
    return exited(now, pid, vanished, "");
}

Actions Supervisor::send_failed(Time /*now*/, Pid pid, const std::string& message,
                                const std::string& error) {
    Worker* worker = find_by_pid(pid);
    if (worker == nullptr) return take();
    if (message != drain_message()) {
        log(LogLevel::warning, error, worker->generation, pid);
        return take();
    }
    // The channel is gone but the process is not: SIGTERM means the same to the shim.
    log(LogLevel::warning, error + "; sending SIGTERM instead", worker->generation, pid);
    send_signal(*worker, Signal::terminate, "its channel is gone, so DRAIN could not be sent");
    return take();
}

Actions Supervisor::tick(Time now) {
    account_for_pause(now);
    reconcile(now);
    return take();
}

Actions Supervisor::stop(Time now, bool fast) {
    account_for_pause(now);
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

    std::vector<Ticket> abandoned = std::exchange(rollover_.queued, ReloadQueue{}).tickets;
    if (!abandoned.empty()) {
        emit(RolloverFinished{abandoned, 0, false, "the master is stopping", Duration{0}});
    }
    if (starting_) fail_generation(now, generations_.at(*starting_), "the master is stopping");
    if (rollover_.phase == RolloverPhase::preparing) {
        finish_rollover(now, 0, false, "the master is stopping");
    }
    if (rollover_.phase == RolloverPhase::finishing) {
        finish_rollover(now, rollover_.finishing_generation, true, "");  // it did go live
    }
    if (live_) retire_generation(now, generations_.at(*live_));

    for (auto& [id, worker] : workers_) {
        if (fast) {
            interrupt(now, worker, "fast stop");
        } else if (worker.state == WorkerState::ready) {
            drain(now, worker, "graceful stop");
        }
    }
    reconcile(now);
    return take();
}

Actions Supervisor::scale(Time now, int workers) {
    account_for_pause(now);
    if (workers < 1 || workers > config::kMaxWorkers) {
        log(LogLevel::warning,
            fmt::format("cannot scale to {} workers: from 1 to {}", workers, config::kMaxWorkers));
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
            emit(SendToWorker{worker.id, worker.pid, fmt::format("{}=1", key::reopen_logs)});
        }
    }
    return take();
}

// ----- the rules ---------------------------------------------------------------------------

// The loop promises to call again by next_deadline(). Waking much later than that means the
// master itself did not run: SIGSTOP, a VM freeze, heavy swapping, a debugger. Its workers may
// have gone on serving and heartbeating into channels nobody read (the loop reads them before
// a deadline tick, see Master::arm_deadline_timer), or been frozen with it and not had their
// turn to speak yet. Either way their silence during the pause was not observed, so it is
// not held against them: every silence clock (the heartbeat, the oldest request's age, the
// boot deadline) is moved forward by the time since the master's last event, the latest the
// pause can have begun. That credits a healthy worker with at least heartbeat - its beat
// interval (5/6 of timeouts.heartbeat) after the pause, and a worker that is really stuck is
// still aborted at most one timeouts.heartbeat later. Grace periods (kill_at) are not
// silences and keep running. A late wake below kPauseThreshold is ordinary scheduling: not
// crediting it keeps a stuck worker's deadline from being pushed back by a busy loop. Any pause
// that could make a healthy worker's deadline due lasts at least 5/6 of the 1 s minimum
// heartbeat, above the threshold.
void Supervisor::account_for_pause(Time now) {
    Time last_event = std::exchange(observed_until_, std::max(observed_until_, now));
    if (!next_deadline_ || now - *next_deadline_ < kPauseThreshold || now <= last_event) return;
    Duration unobserved = now - last_event;
    log(LogLevel::warning,
        fmt::format("the master did not run for {} past its deadline (stopped, frozen or "
                    "starved); the workers' silence since its last event ({} ago) is not held "
                    "against them",
                    ms(now - *next_deadline_), ms(unobserved)));
    for (auto& [id, worker] : workers_) {
        if (worker.state == WorkerState::exited) continue;
        worker.last_heartbeat += unobserved;
        worker.boot_deadline += unobserved;
    }
    // A zygote importing the release is judged like a booting worker.
    for (auto& [id, gen] : generations_) gen.zygote.boot_deadline += unobserved;
}

void Supervisor::reconcile(Time now) {
    // One rule's action can make another rule due (a worker aborted by the liveness rule
    // leaves its slot uncovered; a generation that goes live starts its workers' lifetime), so
    // the rules run again until a pass changes nothing. That last pass registered every
    // deadline there is. Each change emits an action (at least its log line), and no rule acts
    // twice on the same state, so this settles in a few passes; the bound is a safety net.
    constexpr int kMaxPasses = 8;
    for (int pass = 0; pass < kMaxPasses; ++pass) {
        std::size_t emitted = out_.size();
        reconcile_pass(now);
        if (out_.size() == emitted) return;
    }
    log(LogLevel::error, fmt::format("the rules did not settle in {} passes", kMaxPasses));
}

void Supervisor::reconcile_pass(Time now) {
    bool stopping = master_state_ == MasterState::stopping ||
                    master_state_ == MasterState::stopping_fast ||
                    master_state_ == MasterState::stopped;
    // Every rule registers its next deadline during the pass (due_at), so the previous
    // pass's deadlines are void.
    next_deadline_.reset();
    // Single workers first: a worker aborted or retired here leaves its slot uncovered, and
    // the slot rules below refill it in the same pass.
    reconcile_workers(now);
    if (!stopping) {
        if (starting_) reconcile_starting(now, generations_.at(*starting_));
        if (live_) reconcile_live(now, generations_.at(*live_));
    }

    reconcile_zygotes(now);

    // A draining or failed generation whose last worker (and zygote) is gone is gone.
    for (auto& [id, gen] : generations_) {
        bool ending =
            gen.state == GenerationState::draining || gen.state == GenerationState::failed;
        if (ending && workers_of(id).empty() && !zygote_alive(gen.zygote) && !gen.ended_at) {
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
    if (gen.zygote.state == ZygoteState::booting) {
        // Its workers are forked once it has imported the release; until then, nothing to do
        // but watch its boot deadline, which is the workers' (it does their import).
        if (now < gen.zygote.boot_deadline) {
            due_at(gen.zygote.boot_deadline);
        } else {
            std::string detail = gen.zygote.error.empty() ? "" : ": " + gen.zygote.error;
            fail_generation(now, gen,
                            fmt::format("the zygote pid={} did not send READY within "
                                        "timeouts.boot ({}){}",
                                        gen.zygote.pid, ms(config.timeouts.boot), detail));
        }
        return;
    }
    for (Worker* worker : workers_of(gen.id)) {
        bool booting =
            worker->state == WorkerState::spawned || worker->state == WorkerState::booting;
        if (booting && covers_slot(*worker)) {
            if (now < worker->boot_deadline) {
                due_at(worker->boot_deadline);
            } else {
                worker->stop_reason = RestartReason::boot_timeout;
                std::string detail = worker->error.empty() ? "" : ": " + worker->error;
                fail_generation(
                    now, gen,
                    fmt::format("worker slot={} pid={} did not send READY within "
                                "timeouts.boot ({}){}",
                                worker->slot, worker->pid, ms(config.timeouts.boot), detail));
                return;
            }
        }
        if (worker->slot >= gen.target) stop_scaled_down(now, *worker);
    }

    Generation* old = live_ ? &generations_.at(*live_) : nullptr;
    // Which admitted slots have a worker, and a ready one: one pass, as in reconcile_live.
    const auto admitted = static_cast<std::size_t>(std::max(gen.admitted, 0));
    std::vector<bool> covered(admitted), ready(admitted);
    for (Worker* w : workers_of(gen.id)) {
        if (w->slot < 0 || w->slot >= gen.admitted || !covers_slot(*w)) continue;
        covered[static_cast<std::size_t>(w->slot)] = true;
        if (w->state == WorkerState::ready) ready[static_cast<std::size_t>(w->slot)] = true;
    }
    for (std::size_t slot = 0; slot < admitted; ++slot) {
        if (!covered[slot]) spawn(now, gen, static_cast<int>(slot));
    }
    for (std::size_t slot = 0; slot < admitted; ++slot) {
        if (!ready[slot]) return;
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
    // The generation's workers by slot, in one pass: a scan of them per slot cost slots x
    // workers per event, and `scale 1000` with every spawn failing (out of fds) kept the loop
    // from polling for minutes, heartbeats unread, until healthy workers were killed.
    std::vector<std::vector<Worker*>> by_slot(static_cast<std::size_t>(std::max(gen.target, 0)));
    for (Worker* w : workers_of(gen.id)) {
        if (w->slot >= 0 && w->slot < gen.target && is_alive(w->state)) {
            by_slot[static_cast<std::size_t>(w->slot)].push_back(w);
        }
    }
    for (int slot = 0; slot < gen.target; ++slot) {
        if (slot_handed_over(gen, slot)) continue;
        const std::vector<Worker*>& in_slot = by_slot[static_cast<std::size_t>(slot)];
        bool covered = false;
        bool covered_and_ready = false;
        for (Worker* w : in_slot) {
            if (!covers_slot(*w)) continue;
            covered = true;
            covered_and_ready = covered_and_ready || w->state == WorkerState::ready;
        }
        if (!covered) {
            // A slot waiting out its crash backoff is due when its not_before passes.
            Time not_before = slot_health_[slot].not_before;
            if (now >= not_before) {
                spawn(now, gen, slot);
            } else {
                due_at(not_before);
            }
            continue;
        }
        if (!covered_and_ready) continue;
        for (Worker* w : in_slot) {
            if (w->disposition == Disposition::retiring && w->state == WorkerState::ready) {
                restarts_[RestartReason::recycle]++;
                gen.slot_restarts[slot]++;
                drain(now, *w,
                      fmt::format("recycled ({}), its replacement is ready",
                                  to_string(w->retiring.value_or(RetireReason::max_requests))));
            }
        }
    }
    for (Worker* w : workers_of(gen.id)) {
        if (w->slot >= gen.target) stop_scaled_down(now, *w);
    }
}

void Supervisor::stop_scaled_down(Time now, Worker& worker) {
    if (!is_alive(worker.state)) return;
    if (worker.state == WorkerState::ready) {
        drain(now, worker, "scaled down");
    } else if (covers_slot(worker)) {
        kill(now, worker, RestartReason::killed, "scaled down while booting");
    }
}

void Supervisor::reconcile_workers(Time now) {
    for (auto& [id, worker] : workers_) {
        if (worker.state == WorkerState::exited) continue;
        const Generation& gen = generations_.at(worker.generation);
        const auto& config = *gen.release.config;
        switch (worker.disposition) {
            case Disposition::serving:
            case Disposition::retiring:
                check_liveness(now, worker, gen, config);
                break;
            case Disposition::aborting:
            case Disposition::draining:
            case Disposition::stopped_accepting:
            case Disposition::interrupted:
                if (now < *worker.kill_at) {
                    due_at(*worker.kill_at);
                } else {
                    kill(now, worker, RestartReason::killed,
                         worker.state == WorkerState::draining
                             ? fmt::format("still running {} after DRAIN (timeouts.graceful)",
                                           ms(config.timeouts.graceful))
                             : "still running after the grace period");
                }
                break;
            case Disposition::killed:
                break;  // only its exit is left to see
        }
    }
}

void Supervisor::check_liveness(Time now, Worker& worker, const Generation& gen,
                                const config::Config& config) {
    bool booting = worker.state == WorkerState::spawned || worker.state == WorkerState::booting;
    if (booting && gen.state == GenerationState::live) {
        // A starting generation's boot deadline is reconcile_starting()'s: it fails the
        // generation. Here, a replacement in the live generation is killed and replaced.
        if (now < worker.boot_deadline) {
            due_at(worker.boot_deadline);
        } else {
            if (worker.forked && worker.pid == 0) {
                // The zygote never answered the fork request: it is of no more use.
                stop_zygote(now, generations_.at(worker.generation),
                            fmt::format("it did not answer a fork request within timeouts.boot "
                                        "({})",
                                        ms(config.timeouts.boot)));
            }
            kill(now, worker, RestartReason::boot_timeout,
                 fmt::format("no READY within timeouts.boot ({})", ms(config.timeouts.boot)));
        }
        return;
    }
    if (worker.state != WorkerState::ready) return;
    Time heartbeat_due = worker.last_heartbeat + config.timeouts.heartbeat;
    if (now >= heartbeat_due) {
        abort_worker(now, worker, RestartReason::heartbeat,
                     fmt::format("no heartbeat for {} (timeouts.heartbeat); its thread "
                                 "tracebacks follow in its stderr",
                                 ms(now - worker.last_heartbeat)));
        return;
    }
    due_at(heartbeat_due);
    auto limit = config.timeouts.request;
    if (limit.count() > 0 && worker.counters.inflight > 0) {
        // The oldest request's age grows with the time since the heartbeat that reported it.
        Time request_due = worker.last_heartbeat + limit - Duration(worker.counters.oldest_ms);
        if (now >= request_due) {
            Duration age = Duration(worker.counters.oldest_ms) + (now - worker.last_heartbeat);
            abort_worker(now, worker, RestartReason::request_timeout,
                         fmt::format("a request has run for {} (timeouts.request is {})", ms(age),
                                     ms(limit)));
            return;
        }
        due_at(request_due);
    }
    auto lifetime = config.recycle.max_lifetime;
    if (lifetime.count() > 0 && gen.state == GenerationState::live &&
        worker.disposition == Disposition::serving) {
        Time lifetime_due = *worker.ready_at + lifetime;
        if (now >= lifetime_due) {
            retire(now, worker, RetireReason::max_lifetime, "reached recycle.max_lifetime");
        } else {
            due_at(lifetime_due);
        }
    }
}

void Supervisor::finish_stop_if_done(Time /*now*/) {
    if (master_state_ == MasterState::stopped || !workers_.empty()) return;
    for (const auto& [id, gen] : generations_) {
        if (zygote_alive(gen.zygote)) return;
    }
    master_state_ = MasterState::stopped;
    log(LogLevel::info, fmt::format("every worker has exited; master exits {}", exit_code_));
    emit(ExitMaster{exit_code_});
}

void Supervisor::maybe_start_queued_rollover(Time now) {
    if (rollover_.queued.empty() || rollover_.phase != RolloverPhase::idle ||
        master_state_ != MasterState::running) {
        return;
    }
    ReloadQueue request = std::exchange(rollover_.queued, ReloadQueue{});
    rollover_.tickets = std::move(request.tickets);
    rollover_.trigger = request.trigger;
    rollover_.started_at = now;
    set_phase(RolloverPhase::preparing, "a queued reload request");
    emit(NotifySystemd{"RELOADING=1"});
    log(LogLevel::info, fmt::format("{} started", to_string(rollover_.trigger)));
    emit(PrepareRelease{std::move(request.release_dir)});
}

// The zygote's rule: it lives only while its generation may still start workers.
void Supervisor::reconcile_zygotes(Time now) {
    bool stopping = master_state_ == MasterState::stopping ||
                    master_state_ == MasterState::stopping_fast ||
                    master_state_ == MasterState::stopped;
    for (auto& [id, gen] : generations_) {
        bool wanted = !stopping && (gen.state == GenerationState::starting ||
                                    gen.state == GenerationState::live);
        if (!wanted &&
            (gen.zygote.state == ZygoteState::booting || gen.zygote.state == ZygoteState::ready)) {
            stop_zygote(now, gen,
                        stopping
                            ? "the master is stopping"
                            : fmt::format("generation {} is {}", gen.id, to_string(gen.state)));
        }
    }
}

// ----- the zygote --------------------------------------------------------------------------

void Supervisor::zygote_message(Time now, Generation& gen, const std::string& text) {
    Zygote& zygote = gen.zygote;
    auto fields = parse_message(text);
    if (auto it = fields.find(key::error); it != fields.end()) {
        zygote.error = molt::text::truncate_utf8(it->second, 2000);
        log(LogLevel::error, "zygote reports: " + zygote.error, gen.id, zygote.pid);
    }
    if (auto it = fields.find(key::preload_refused); it != fields.end()) {
        if (zygote.state == ZygoteState::booting) {
            zygote.fallback = molt::text::truncate_utf8(it->second, 2000);
            log(LogLevel::warning,
                fmt::format("preload: auto falls back to importing the app in each worker: {}",
                            zygote.fallback),
                gen.id, zygote.pid);
            set_state(now, gen, ZygoteState::gone, "it refused to fork (preload: auto)");
        }
    }
    if (fields.count(key::ready) && zygote.state == ZygoteState::booting) {
        zygote.ready_at = now;
        set_state(now, gen, ZygoteState::ready,
                  fmt::format("imported the release in {}", ms(now - zygote.started_at)));
    }
}

void Supervisor::zygote_ended(Time now, Generation& gen, const ExitStatus& status,
                              const std::string& stderr_tail) {
    Zygote& zygote = gen.zygote;
    ZygoteState was = zygote.state;
    // Its own words explain an unexpected end; a zygote stopped on purpose needs none.
    std::string detail = was == ZygoteState::stopping ? ""
                         : !zygote.error.empty()      ? zygote.error
                                                      : last_line(stderr_tail);
    std::string how = status.describe() + (detail.empty() ? "" : ": " + detail);
    set_state(now, gen, ZygoteState::gone, how);
    forget_pending_forks(now, gen);
    if (was == ZygoteState::booting && gen.state == GenerationState::starting) {
        // The release's import failed in the zygote: exactly like a worker that failed to
        // import, the generation fails with the zygote's own words and the old one serves on.
        fail_generation(now, gen,
                        fmt::format("the zygote pid={} {} before READY{}", zygote.pid,
                                    status.describe(), detail.empty() ? "" : ": " + detail));
    } else if (was == ZygoteState::ready) {
        zygote.fallback = "the zygote " + how;
        log(LogLevel::error,
            fmt::format("the zygote {}; its workers serve on, later workers of generation {} "
                        "import the app themselves",
                        how, gen.id),
            gen.id, zygote.pid);
    }
    reconcile(now);
}

void Supervisor::forget_pending_forks(Time now, Generation& gen) {
    std::vector<WorkerId> pending;
    for (Worker* worker : workers_of(gen.id)) {
        if (worker->forked && worker->pid == 0) pending.push_back(worker->id);
    }
    for (WorkerId id : pending) {
        Worker& worker = workers_.at(id);
        log(LogLevel::warning,
            fmt::format("worker slot={}: its fork request died with the zygote; the slot is "
                        "filled again",
                        worker.slot),
            gen.id);
        set_state(now, worker, WorkerState::exited, "never forked");
        workers_.erase(id);
    }
}

void Supervisor::stop_zygote(Time now, Generation& gen, const std::string& why) {
    Zygote& zygote = gen.zygote;
    if (zygote.state != ZygoteState::booting && zygote.state != ZygoteState::ready) return;
    set_state(now, gen, ZygoteState::stopping, why);
    if (zygote.pid > 0) {
        log(LogLevel::info, "sending SIGKILL to the zygote: " + why, gen.id, zygote.pid);
        emit(SignalWorker{0, zygote.pid, Signal::kill, why});
    }
}

void Supervisor::set_state(Time now, Generation& gen, ZygoteState next, const std::string& why) {
    (void)now;
    if (gen.zygote.state == next) return;
    log(LogLevel::info,
        fmt::format("zygote: {} -> {} ({})", to_string(gen.zygote.state), to_string(next), why),
        gen.id, gen.zygote.pid);
    gen.zygote.state = next;
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
    if (gen.release.config->preload != config::Preload::off) {
        gen.zygote.state = ZygoteState::booting;
        gen.zygote.started_at = now;
        gen.zygote.boot_deadline = now + gen.release.config->timeouts.boot;
        log(LogLevel::info, "starting the zygote (preload): it imports the release once", gen.id);
        emit(SpawnZygote{gen.id, gen.release});
    }
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
    rollover_.finishing_generation = gen.id;
    rollover_.finishing_deadline = now + policy_.drain_ack_grace;
    set_phase(
        RolloverPhase::finishing,
        fmt::format("generation {} is live; waiting for the old workers' STOPPING=1", gen.id));
    maybe_finish_rollover(now);
}

void Supervisor::maybe_finish_rollover(Time now) {
    if (rollover_.phase != RolloverPhase::finishing) return;
    // A worker that got DRAIN has not confirmed until it reaches stopped_accepting; one that
    // was killed or interrupted meanwhile takes no connection either.
    bool confirmed = std::none_of(workers_.begin(), workers_.end(), [](const auto& entry) {
        return entry.second.disposition == Disposition::draining;
    });
    if (!confirmed && now < rollover_.finishing_deadline) {
        due_at(rollover_.finishing_deadline);
        return;
    }
    if (!confirmed) {
        log(LogLevel::warning,
            fmt::format("some draining workers did not confirm within {} that they stopped "
                        "accepting (STOPPING=1); reporting the rollover done anyway",
                        ms(policy_.drain_ack_grace)),
            rollover_.finishing_generation);
    }
    finish_rollover(now, rollover_.finishing_generation, true, "");
}

void Supervisor::fail_generation(Time now, Generation& gen, const std::string& reason) {
    gen.failure = reason;
    set_state(now, gen, GenerationState::failed, reason);
    if (starting_ == gen.id) starting_.reset();
    for (Worker* worker : workers_of(gen.id)) {
        if (worker->state == WorkerState::ready) {
            drain(now, *worker, "its generation failed");
        } else if (is_alive(worker->state)) {
            kill(now, *worker, RestartReason::killed, fmt::format("generation {} failed", gen.id));
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
        } else if (is_alive(worker->state) && covers_slot(*worker)) {
            // A replacement still booting in the old generation is no longer needed.
            kill(now, *worker, RestartReason::killed,
                 "its generation is draining before it was ready");
        }
    }
    record_history(gen);
}

void Supervisor::finish_rollover(Time now, GenerationId gen, bool ok, const std::string& reason) {
    Trigger trigger = rollover_.trigger;
    RolloverFinished result{std::exchange(rollover_.tickets, {}), gen, ok, reason,
                            now - rollover_.started_at};
    set_phase(RolloverPhase::idle, ok ? "done" : "failed");
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
    worker.forked = gen.zygote.state == ZygoteState::ready;
    Pid via = worker.forked ? gen.zygote.pid : 0;
    log(LogLevel::debug,
        fmt::format("{} worker slot={}", worker.forked ? "forking" : "spawning", slot), gen.id,
        via);
    if (worker.forked) gen.zygote.forks++;
    emit(SpawnWorker{worker.id, gen.id, slot, gen.release, via});
    workers_.emplace(worker.id, std::move(worker));
}

bool Supervisor::covers_slot(const Worker& worker) {
    return is_alive(worker.state) && worker.disposition == Disposition::serving;
}

bool Supervisor::dispose(Time now, Worker& worker, Disposition next, const std::string& why) {
    using D = Disposition;
    D from = worker.disposition;
    bool allowed = false;
    std::optional<Duration> grace;  // until SIGKILL, for the dispositions that have one
    switch (next) {
        case D::serving:
            break;  // nothing returns to serving
        case D::retiring:
            allowed = from == D::serving;
            break;
        case D::aborting:
            allowed = from == D::serving || from == D::retiring;
            grace = policy_.abort_grace;
            break;
        case D::draining:
            allowed = from == D::serving || from == D::retiring || from == D::aborting;
            grace = generations_.at(worker.generation).release.config->timeouts.graceful;
            break;
        case D::stopped_accepting:
            allowed = from == D::draining;
            break;
        case D::interrupted:
            allowed = from != D::interrupted && from != D::killed;
            grace = policy_.fast_stop_grace;
            break;
        case D::killed:
            allowed = from != D::killed;
            break;
    }
    if (!allowed) return false;
    log(LogLevel::debug,
        fmt::format("worker slot={}: {} -> {} ({})", worker.slot, to_string(from), to_string(next),
                    why),
        worker.generation, worker.pid);
    worker.disposition = next;
    if (next == D::killed) {
        worker.kill_at.reset();  // nothing left to escalate to
    } else if (grace) {
        // A sooner SIGKILL already due (after a SIGABRT) stays.
        Time deadline = now + *grace;
        worker.kill_at = worker.kill_at ? std::min(*worker.kill_at, deadline) : deadline;
    }
    return true;
}

void Supervisor::drain(Time now, Worker& worker, const std::string& why) {
    if (worker.state == WorkerState::draining || worker.state == WorkerState::exited) return;
    if (!dispose(now, worker, Disposition::draining, why)) return;
    set_state(now, worker, WorkerState::draining, why);
    emit(SendToWorker{worker.id, worker.pid, drain_message()});
}

void Supervisor::retire(Time now, Worker& worker, RetireReason reason, const std::string& why) {
    const Generation& gen = generations_.at(worker.generation);
    // Only a serving worker of the live generation is replaced; a successor boots first.
    if (worker.state != WorkerState::ready || gen.state != GenerationState::live) return;
    if (!dispose(now, worker, Disposition::retiring, why)) return;
    worker.retiring = reason;
    log(LogLevel::info, fmt::format("worker slot={} {}; replacing it", worker.slot, why), gen.id,
        worker.pid);
}

void Supervisor::abort_worker(Time now, Worker& worker, RestartReason reason,
                              const std::string& why) {
    if (!dispose(now, worker, Disposition::aborting, why)) return;
    worker.stop_reason = reason;
    send_signal(worker, Signal::abort, why);
}

void Supervisor::interrupt(Time now, Worker& worker, const std::string& why) {
    if (!dispose(now, worker, Disposition::interrupted, why)) return;
    if (!worker.stop_reason) worker.stop_reason = RestartReason::killed;
    send_signal(worker, Signal::interrupt, why);
}

void Supervisor::kill(Time now, Worker& worker, RestartReason reason, const std::string& why) {
    if (!worker.stop_reason) worker.stop_reason = reason;
    dispose(now, worker, Disposition::killed, why);
    // Sent even when it was already killed: a worker killed before it had a pid gets its
    // signal once spawned() tells its pid.
    send_signal(worker, Signal::kill, why);
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
    if (gen.state == next) return;
    // The phase that ends now, for /metrics (molt_generation_phase_seconds).
    if (next == GenerationState::live) last_phases_.boot = now - gen.started_at;
    if (next == GenerationState::draining) {
        gen.draining_at = now;
        if (gen.live_at) last_phases_.live = now - *gen.live_at;
    }
    if (next == GenerationState::gone && gen.draining_at) {
        last_phases_.drain = now - *gen.draining_at;
    }
    log(next == GenerationState::failed ? LogLevel::error : LogLevel::info,
        fmt::format("generation {}: {} -> {} ({})", gen.id, to_string(gen.state), to_string(next),
                    why),
        gen.id);
    gen.state = next;
}

void Supervisor::set_phase(RolloverPhase next, const std::string& why) {
    if (rollover_.phase == next) return;
    log(LogLevel::debug, fmt::format("rollover ({}): {} -> {} ({})", to_string(rollover_.trigger),
                                     to_string(rollover_.phase), to_string(next), why));
    rollover_.phase = next;
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

Worker* Supervisor::find_by_pid(Pid pid) {
    for (auto& [id, worker] : workers_) {
        if (worker.pid == pid) return &worker;
    }
    return nullptr;
}

Generation* Supervisor::find_by_zygote(Pid pid) {
    if (pid <= 0) return nullptr;
    for (auto& [id, gen] : generations_) {
        if (gen.zygote.pid == pid && zygote_alive(gen.zygote)) return &gen;
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
