// The supervisor core: every decision the master makes, and nothing else.
//
// This is plain C++ with no libuv and no syscalls. The loop layer (supervisor/loop) feeds it
// events (a signal arrived, a worker was spawned, sent READY, exited, a deadline passed) with
// the current monotonic time, and carries out the actions it returns (spawn, send DRAIN,
// kill, notify systemd, log). Because time is only ever an argument, the whole rollover logic
// is unit-tested with a fake clock in tests/unit/core.
//
// The rules live in one place, Supervisor::reconcile(): after every event it compares what
// is (generations and their workers) with what should be, and emits the actions that close
// the gap. Rollover, crash replacement, recycling, scaling and stopping are all expressed as
// rules there.
#pragma once

#include <chrono>
#include <cstdint>
#include <deque>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <variant>
#include <vector>

#include "config/config.hpp"

namespace molt::core {

// Monotonic time since an arbitrary origin. The loop passes uv_now(); tests pass a fake clock.
using Time = std::chrono::milliseconds;
using Duration = std::chrono::milliseconds;
using GenerationId = std::uint64_t;
using WorkerId = std::uint64_t;
using Pid = int;
using Ticket = std::uint64_t;  // identifies one reload request, for `molt ctl reload --wait`

enum class WorkerState { spawned, booting, ready, draining, exited };
enum class GenerationState { starting, live, draining, gone, failed };
enum class MasterState { starting, running, stopping, stopping_fast, stopped };
// Where the one rollover at a time stands. `running` means a starting generation exists;
// `finishing` means the new generation is live and the old workers are confirming that they
// stopped accepting (STOPPING=1), so that `reload --wait` returns only when no old worker can
// take a new connection.
enum class RolloverPhase { idle, preparing, running, finishing };
enum class Signal { abort, kill, interrupt, terminate };
enum class LogLevel { debug, info, warning, error };
enum class Trigger { startup, reload, rollback, watch };
// Why a ready worker asks to be replaced. The replacement boots first: capacity never dips.
enum class RetireReason { max_requests, max_rss, max_lifetime };
// Why a worker is being stopped or replaced, as counted by metrics.
enum class RestartReason { crash, heartbeat, request_timeout, recycle, boot_timeout, killed };

const char* to_string(WorkerState state);
const char* to_string(MasterState state);
const char* to_string(GenerationState state);
const char* to_string(Signal signal);
const char* to_string(Trigger trigger);
const char* to_string(RetireReason reason);
const char* to_string(RestartReason reason);

// What a generation runs: a config snapshot and a release directory resolved once, with
// realpath, when the generation starts.
struct Release {
    std::shared_ptr<const config::Config> config;
    std::string release_dir;
    std::string version;
    std::string digest;
};

// How a worker process ended, as the loop observed it with waitpid().
struct ExitStatus {
    int code = 0;    // meaningful when signal == 0
    int signal = 0;  // terminating signal number, 0 when it exited
    bool core_dumped = false;
    bool oom_suspected = false;  // the kernel's oom_kill counter moved since the last check
    std::string describe() const;
};

struct Heartbeat {
    std::uint64_t requests = 0;
    std::uint64_t inflight = 0;
    std::uint64_t oldest_ms = 0;
    std::uint64_t rss = 0;
};

struct Worker {
    WorkerId id = 0;
    GenerationId generation = 0;
    int slot = 0;
    Pid pid = 0;
    WorkerState state = WorkerState::spawned;
    Time spawned_at{0};
    std::optional<Time> ready_at;
    Time boot_deadline{0};
    Time last_heartbeat{0};
    // When set, the worker gets SIGKILL at this time: the end of a drain, of the grace after
    // SIGABRT, or of a fast stop.
    std::optional<Time> kill_at;
    std::optional<RetireReason> retiring;  // set: a replacement is booting or due
    // Set once the master has decided to stop this worker (and why): it no longer covers its
    // slot, and no further liveness checks apply to it.
    std::optional<RestartReason> stop_reason;
    std::optional<Time> stopped_accepting_at;  // when it confirmed a drain with STOPPING=1
    Heartbeat counters;
    std::string error;  // the worker's own ERROR= text
};

struct Generation {
    GenerationId id = 0;
    GenerationState state = GenerationState::starting;
    Release release;
    Trigger trigger = Trigger::startup;
    int target = 1;    // how many workers it should have
    int admitted = 0;  // rollover in batches: slots [0, admitted) are handed over to it
    Time started_at{0};
    std::optional<Time> live_at;
    std::optional<Time> ended_at;
    std::string failure;               // why it failed, with the worker's own error text
    std::map<int, int> slot_restarts;  // slot -> replacements so far
};

// One line of `molt ctl history`.
struct HistoryEntry {
    GenerationId id = 0;
    std::string release_dir;
    std::string version;
    std::string digest;
    Trigger trigger = Trigger::startup;
    Time started_at{0};
    std::optional<Time> live_at;
    GenerationState state = GenerationState::starting;
    std::string failure;
};

// A worker handed over by the previous master image across a binary upgrade.
struct AdoptedWorker {
    Pid pid = 0;
    int slot = 0;
    Heartbeat counters;
};

// What the previous master image knew and the new one keeps (besides the workers).
struct AdoptedState {
    GenerationId generation = 0;
    Release release;
    Trigger trigger = Trigger::startup;
    int target = 1;
    std::vector<AdoptedWorker> workers;
    std::deque<HistoryEntry> history;
    std::map<RestartReason, std::uint64_t> restarts;
    std::uint64_t rollovers_ok = 0;
    std::uint64_t rollovers_failed = 0;
};

// ----- actions: what the loop layer must do ------------------------------------------------
struct SpawnWorker {
    WorkerId worker;
    GenerationId generation;
    int slot;
    Release release;
};
struct SendToWorker {
    WorkerId worker;
    Pid pid;
    std::string message;  // e.g. "DRAIN=1"
};
struct SignalWorker {
    WorkerId worker;
    Pid pid;
    Signal signal;
    std::string reason;
};
// Load and validate the config, resolve the release directory; answer with
// Supervisor::release_prepared() or release_rejected().
struct PrepareRelease {
    std::optional<std::string> release_dir;  // rollback: use this directory, not config.chdir
};
struct NotifySystemd {
    std::string message;  // sd_notify text, e.g. "READY=1\nSTATUS=..."
};
struct RolloverFinished {
    std::vector<Ticket> tickets;
    GenerationId generation = 0;  // 0 when no generation was started (config rejected)
    bool ok = false;
    std::string reason;
    Duration took{0};
};
struct WriteLog {
    LogLevel level;
    std::string text;
    GenerationId generation = 0;  // 0: not about one generation
    Pid pid = 0;                  // 0: not about one worker
};
struct ExitMaster {
    int code;
};
using Action = std::variant<SpawnWorker, SendToWorker, SignalWorker, PrepareRelease, NotifySystemd,
                            RolloverFinished, WriteLog, ExitMaster>;
using Actions = std::vector<Action>;

// Tunables that are not user config: how the master paces retries and escalations.
struct Policy {
    Duration backoff_base{250};      // second consecutive crash of a slot waits this long
    Duration backoff_cap{16000};     // ... doubling up to this
    Duration backoff_reset{10000};   // a worker ready this long clears its slot's crash count
    Duration abort_grace{5000};      // SIGABRT -> SIGKILL
    Duration fast_stop_grace{3000};  // SIGINT -> SIGKILL on a fast stop
    Duration drain_ack_grace{1000};  // how long a rollover waits for old workers' STOPPING=1
    std::size_t history_size = 32;
};

class Supervisor {
  public:
    explicit Supervisor(Policy policy = {});

    // ----- events --------------------------------------------------------------------------
    // Start the first generation. The master exits 1 if it fails.
    Actions start(Time now, Release release);
    // After a binary upgrade: the live generation and its ready workers, as they were.
    Actions adopt(Time now, AdoptedState state);
    // Whether nothing is in motion (one live generation, every worker ready): the only state
    // in which the master hands itself over to a new binary.
    bool steady() const;
    // HUP, `molt ctl reload`, a watched file. Queued while a rollover runs; several queued
    // requests become one rollover (on the config as it is when that rollover starts).
    Actions request_reload(Time now, Ticket ticket, Trigger trigger = Trigger::reload,
                           std::optional<std::string> release_dir = std::nullopt);
    Actions release_prepared(Time now, Release release);
    Actions release_rejected(Time now, const std::string& reason);

    Actions spawned(Time now, WorkerId worker, Pid pid);
    Actions spawn_failed(Time now, WorkerId worker, const std::string& error);
    Actions message(Time now, Pid pid, const std::string& text);
    Actions exited(Time now, Pid pid, const ExitStatus& status, const std::string& stderr_tail);
    Actions tick(Time now);
    // kill() failed. ESRCH means the process is already gone although nobody reaped it here:
    // it is treated as exited, so the master never waits for a ghost.
    Actions signal_failed(Time now, Pid pid, bool no_such_process, const std::string& error);

    Actions stop(Time now, bool fast);
    Actions scale(Time now, int workers);  // TTIN/TTOU/`molt ctl scale N`
    Actions reopen_logs(Time now);

    // ----- queries -------------------------------------------------------------------------
    // The earliest time at which tick() has something to do; nullopt when nothing is due.
    std::optional<Time> next_deadline() const;

    MasterState state() const { return master_state_; }
    RolloverPhase rollover_phase() const { return rollover_phase_; }
    const std::map<GenerationId, Generation>& generations() const { return generations_; }
    const std::map<WorkerId, Worker>& workers() const { return workers_; }
    const std::deque<HistoryEntry>& history() const { return history_; }
    std::optional<GenerationId> live_generation() const { return live_; }
    std::optional<GenerationId> starting_generation() const { return starting_; }
    int target_workers() const { return target_workers_; }
    // The release directory a rollback would go to: the newest one that was live before the
    // current live generation and differs from it.
    std::optional<std::string> rollback_target() const;
    const std::map<RestartReason, std::uint64_t>& restarts() const { return restarts_; }
    std::uint64_t rollovers(bool ok) const { return ok ? rollovers_ok_ : rollovers_failed_; }
    std::optional<RolloverFinished> last_rollover() const { return last_rollover_; }
    std::string status_line() const;

  private:
    struct SlotHealth {
        int consecutive_failures = 0;
        Time not_before{0};
    };

    // The rules. Called after every event; idempotent.
    void reconcile(Time now);
    void reconcile_starting(Time now, Generation& gen);
    void reconcile_live(Time now, Generation& gen);
    void reconcile_workers(Time now);
    void finish_stop_if_done(Time now);
    void maybe_start_queued_rollover(Time now);
    void maybe_finish_rollover(Time now);

    void begin_generation(Time now, Release release, Trigger trigger);
    void go_live(Time now, Generation& gen);
    void fail_generation(Time now, Generation& gen, const std::string& reason);
    void retire_generation(Time now, Generation& gen);
    void finish_rollover(Time now, GenerationId gen, bool ok, const std::string& reason);

    void spawn(Time now, Generation& gen, int slot);
    void set_state(Time now, Worker& worker, WorkerState next, const std::string& why);
    void set_state(Time now, Generation& gen, GenerationState next, const std::string& why);
    void drain(Time now, Worker& worker, const std::string& why);
    void send_signal(Worker& worker, Signal signal, const std::string& reason);
    void worker_ended(Time now, Worker& worker, const ExitStatus& status,
                      const std::string& stderr_tail);
    void on_crash(Time now, Worker& worker, Generation& gen, const ExitStatus& status,
                  const std::string& stderr_tail);
    void record_history(const Generation& gen);
    void update_status();

    void log(LogLevel level, std::string text, GenerationId gen = 0, Pid pid = 0);
    void emit(Action action) { out_.push_back(std::move(action)); }
    Actions take();

    Worker* find_by_pid(Pid pid);
    Generation* find_generation(GenerationId id);
    bool slot_handed_over(const Generation& gen, int slot) const;
    std::vector<Worker*> workers_of(GenerationId gen);
    Time heartbeat_deadline(const Worker& worker, const config::Config& config) const;

    Policy policy_;
    MasterState master_state_ = MasterState::starting;
    std::map<GenerationId, Generation> generations_;
    std::map<WorkerId, Worker> workers_;
    std::map<int, SlotHealth> slot_health_;  // per slot of the live generation
    std::optional<GenerationId> live_;
    std::optional<GenerationId> starting_;
    GenerationId next_generation_ = 1;
    WorkerId next_worker_ = 1;
    int target_workers_ = 1;
    int configured_workers_ = 1;  // `workers:` of the last config, to tell a config change
                                  // from a TTIN/TTOU scale that should survive reloads

    // Reload requests that arrived while a rollover ran (or while preparing a release).
    std::vector<Ticket> queued_tickets_;
    std::optional<Trigger> queued_trigger_;
    std::optional<std::string> queued_release_dir_;
    // Tickets of the rollover now being prepared or run.
    std::vector<Ticket> current_tickets_;
    Trigger current_trigger_ = Trigger::startup;
    RolloverPhase rollover_phase_ = RolloverPhase::idle;
    Time rollover_started_at_{0};
    Time finishing_deadline_{0};
    GenerationId finishing_generation_ = 0;
    int exit_code_ = 0;
    std::deque<HistoryEntry> history_;
    std::map<RestartReason, std::uint64_t> restarts_;
    std::uint64_t rollovers_ok_ = 0;
    std::uint64_t rollovers_failed_ = 0;
    std::optional<RolloverFinished> last_rollover_;
    std::string last_status_;
    Actions out_;
};

}  // namespace molt::core
