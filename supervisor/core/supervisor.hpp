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
// rules there. A rule that finds its condition not yet due registers the time it becomes due,
// so next_deadline() is what the rules said during the last pass, not a second copy of them.
//
// The core also owns the master's policies that need no syscall: when a reload is refused
// (reload_refusal), when a binary upgrade is refused (Supervisor::upgrade_refusal), and what
// replaces a DRAIN that could not be sent (Supervisor::send_failed).
#pragma once

#include <algorithm>
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
#include "supervisor/core/request_stats.hpp"

namespace molt::core {

// Monotonic time since an arbitrary origin. The loop passes uv_now(); tests pass a fake clock.
using Time = std::chrono::milliseconds;
using Duration = std::chrono::milliseconds;
using GenerationId = std::uint64_t;
using WorkerId = std::uint64_t;
using Pid = int;
using Ticket = std::uint64_t;  // identifies one reload request, for `molt ctl reload --wait`

// How far a worker's process got: the public states that metrics and `molt ctl status` show.
enum class WorkerState { spawned, booting, ready, draining, exited };
// What the master has decided about a worker, apart from how far its process got. Only a
// `serving` worker covers its slot (Supervisor::covers_slot); every other disposition means a
// successor may take the slot. Every change goes through Supervisor::dispose(), which logs it
// and sets the SIGKILL deadline (Worker::kill_at) that the disposition implies.
//
//   serving -> retiring            it asked to be replaced; it serves until its successor is ready
//   serving|retiring -> aborting   SIGABRT for a liveness reason; SIGKILL after Policy::abort_grace
//   serving|retiring|aborting
//            -> draining           DRAIN sent; SIGKILL after timeouts.graceful (or sooner, if an
//                                  abort already set an earlier deadline)
//   draining -> stopped_accepting  it confirmed the drain with STOPPING=1
//   any but killed -> interrupted  fast stop: SIGINT; SIGKILL after Policy::fast_stop_grace
//   any -> killed                  SIGKILL sent; only its exit is left to see
enum class Disposition {
    serving,
    retiring,
    aborting,
    draining,
    stopped_accepting,
    interrupted,
    killed
};
enum class GenerationState { starting, live, draining, gone, failed };
// A generation's zygote (`preload:`): the process that imported the release once and forks the
// generation's workers. It is one more way for a slot to be filled, not a second lifecycle:
// a worker it forked is a worker like any other.
//
//   none                 the generation has no zygote (preload: false)
//   booting -> ready     READY=1: a slot is filled by asking it to fork (SpawnWorker.via_zygote)
//   booting -> gone      it refused (preload: auto found the import unsafe to fork: the
//                        generation's workers import the app themselves) or it died before READY
//                        (the generation fails with the zygote's own error text)
//   ready -> gone        it died: its workers live on, later slots are filled by a plain spawn
//   booting|ready -> stopping  SIGKILL sent: its generation no longer starts workers
//   stopping -> gone     its exit was seen
enum class ZygoteState { none, booting, ready, stopping, gone };
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
const char* to_string(Disposition disposition);
const char* to_string(MasterState state);
const char* to_string(RolloverPhase phase);
const char* to_string(GenerationState state);
const char* to_string(ZygoteState state);
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
    RequestStats stats = {};  // DURATIONS= and EXCEPTIONS=, cumulative over the worker's life
};

struct Worker {
    WorkerId id = 0;
    GenerationId generation = 0;
    int slot = 0;
    Pid pid = 0;
    WorkerState state = WorkerState::spawned;
    Disposition disposition = Disposition::serving;
    Time spawned_at{0};
    std::optional<Time> ready_at;
    Time boot_deadline{0};
    Time last_heartbeat{0};
    // The following belong to the disposition and are set only by Supervisor::dispose() and
    // its callers:
    // SIGKILL is due at this time while aborting, draining, stopped_accepting or interrupted.
    std::optional<Time> kill_at;
    // Why it asked to be replaced; kept once it drains, for `molt ctl status`.
    std::optional<RetireReason> retiring;
    // Why the master stopped it (aborting, interrupted, killed): counted as a restart of that
    // kind when it exits; `killed` means a deliberate stop, not a fault of the release.
    std::optional<RestartReason> stop_reason;
    Heartbeat counters;
    std::string error;  // the worker's own ERROR= text
    // Born from its generation's zygote (asked with SpawnWorker.via_zygote) rather than spawned
    // and imported on its own. Nothing else about the worker differs.
    bool forked = false;
};

struct Zygote {
    ZygoteState state = ZygoteState::none;
    Pid pid = 0;  // 0 until zygote_spawned()
    Time started_at{0};
    Time boot_deadline{0};
    std::optional<Time> ready_at;
    std::string error;        // its own ERROR= text
    std::string fallback;     // why the generation's workers (now) import the app themselves
    std::uint64_t forks = 0;  // workers it forked
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
    std::optional<Time> draining_at;  // when it stopped being live (or failed to become so)
    std::optional<Time> ended_at;
    std::string failure;               // why it failed, with the worker's own error text
    std::map<int, int> slot_restarts;  // slot -> replacements so far
    Zygote zygote;
};

// How long the latest generations spent in each phase, for /metrics: `boot` from the start
// to live, `live` from live to draining, `drain` from draining to gone. Each is the last one
// completed (a generation still draining does not change `drain` yet).
struct PhaseDurations {
    std::optional<Duration> boot;
    std::optional<Duration> live;
    std::optional<Duration> drain;
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
    bool forked = false;
};

// What the previous master image knew and the new one keeps (besides the workers).
struct AdoptedState {
    GenerationId generation = 0;
    Release release;
    Trigger trigger = Trigger::startup;
    int target = 1;
    std::vector<AdoptedWorker> workers;
    Pid zygote = 0;  // the live generation's ready zygote, 0 when there is none
    std::string zygote_fallback;
    std::deque<HistoryEntry> history;
    std::map<RestartReason, std::uint64_t> restarts;
    std::uint64_t rollovers_ok = 0;
    std::uint64_t rollovers_failed = 0;
};

// Why a reload to `next` must be refused while the master serves `serving`, or nullopt when it
// may go ahead. Listen addresses cannot change on a reload: the master binds them once and
// every generation inherits the same sockets.
std::optional<std::string> reload_refusal(const config::Config& serving,
                                          const config::Config& next);

// The config file as it is now, for the binary-upgrade check.
struct ConfigFileNow {
    std::string path;
    std::optional<std::string> digest;  // nullopt: the file no longer loads
};

// Reload requests waiting for the rollover in progress; several become one rollover.
struct ReloadQueue {
    std::vector<Ticket> tickets;
    Trigger trigger = Trigger::reload;       // of the newest request
    std::optional<std::string> release_dir;  // the newest request says where to go
    std::string destination;                 // what the queued requests compare by
    bool empty() const { return tickets.empty(); }
};

// The one rollover at a time: the requests queued behind it, the one in progress and, once its
// generation is live, the finishing phase in which the old workers confirm their drain.
struct Rollover {
    RolloverPhase phase = RolloverPhase::idle;
    ReloadQueue queued;
    // The rollover in progress (phase != idle).
    std::vector<Ticket> tickets;
    Trigger trigger = Trigger::startup;
    Time started_at{0};
    // phase == finishing: the generation that went live, and until when the old workers may
    // take to confirm that they stopped accepting.
    GenerationId finishing_generation = 0;
    Time finishing_deadline{0};
};

// ----- actions: what the loop layer must do ------------------------------------------------
struct SpawnWorker {
    WorkerId worker;
    GenerationId generation;
    int slot;
    Release release;
    // Not 0: ask this zygote (of the same generation) to fork the worker instead of spawning
    // a fresh interpreter; the answer is the same spawned()/spawn_failed().
    Pid via_zygote = 0;
};
// Start the generation's zygote; answer with zygote_spawned() or zygote_spawn_failed().
struct SpawnZygote {
    GenerationId generation;
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
    bool superseded = false;  // a request for another release came before it started
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
using Action = std::variant<SpawnWorker, SpawnZygote, SendToWorker, SignalWorker, PrepareRelease,
                            NotifySystemd, RolloverFinished, WriteLog, ExitMaster>;
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
    // Whether nothing is in motion (one live generation, every worker ready and serving): the
    // only state in which the master hands itself over to a new binary.
    bool steady() const;
    // The log line saying why a binary upgrade must be refused now ("binary upgrade refused:
    // ..."), or nullopt when it may go ahead. `file` is the config file as it is now, when the
    // master runs from one: the adopted generation keeps the config the new image loads from
    // it, so the two must not disagree.
    std::optional<std::string> upgrade_refusal(const std::optional<ConfigFileNow>& file) const;
    // HUP, `molt ctl reload`, a watched file. Queued while a rollover runs; several queued
    // requests for the same `destination` become one rollover (on the config as it is when
    // that rollover starts); one for another supersedes the queued ones. `destination`: the
    // directory the request would go to as the loop sees it now (a reload's resolved chdir,
    // a rollback's directory), only to compare requests.
    Actions request_reload(Time now, Ticket ticket, Trigger trigger = Trigger::reload,
                           std::optional<std::string> release_dir = std::nullopt,
                           std::string destination = {});
    Actions release_prepared(Time now, Release release);
    Actions release_rejected(Time now, const std::string& reason);

    Actions spawned(Time now, WorkerId worker, Pid pid);
    Actions spawn_failed(Time now, WorkerId worker, const std::string& error);
    Actions zygote_spawned(Time now, GenerationId generation, Pid pid);
    Actions zygote_spawn_failed(Time now, GenerationId generation, const std::string& error);
    // From a worker or a zygote (the pid tells which).
    Actions message(Time now, Pid pid, const std::string& text);
    Actions exited(Time now, Pid pid, const ExitStatus& status, const std::string& stderr_tail);
    Actions tick(Time now);
    // kill() failed. ESRCH means the process is already gone although nobody reaped it here:
    // it is treated as exited, so the master never waits for a ghost.
    Actions signal_failed(Time now, Pid pid, bool no_such_process, const std::string& error);
    // A SendToWorker could not be sent (the channel is gone). A DRAIN becomes SIGTERM, which
    // means the same to the shim; anything else is only logged.
    Actions send_failed(Time now, Pid pid, const std::string& message, const std::string& error);

    Actions stop(Time now, bool fast);
    Actions scale(Time now, int workers);  // TTIN/TTOU/`molt ctl scale N`
    Actions reopen_logs(Time now);

    // ----- queries -------------------------------------------------------------------------
    // The earliest time at which tick() has something to do; nullopt when nothing is due.
    // The rules registered it during the last pass of reconcile().
    std::optional<Time> next_deadline() const { return next_deadline_; }

    MasterState state() const { return master_state_; }
    RolloverPhase rollover_phase() const { return rollover_.phase; }
    const Rollover& rollover() const { return rollover_; }
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
    const PhaseDurations& last_phases() const { return last_phases_; }
    std::string status_line() const;
    // A zygote process that exists (or is being started): booting, ready or stopping.
    static bool zygote_alive(const Zygote& zygote) {
        return zygote.state == ZygoteState::booting || zygote.state == ZygoteState::ready ||
               zygote.state == ZygoteState::stopping;
    }

  private:
    struct SlotHealth {
        int consecutive_failures = 0;
        Time not_before{0};
    };

    // The rules. Called after every event; idempotent. reconcile() repeats reconcile_pass()
    // until a pass changes nothing.
    // Liveness is judged only on what the master could observe: time during which its own
    // loop did not run is taken off every silence clock. See the definition.
    void account_for_pause(Time now);
    void reconcile(Time now);
    void reconcile_pass(Time now);
    void reconcile_starting(Time now, Generation& gen);
    void reconcile_live(Time now, Generation& gen);
    void reconcile_workers(Time now);
    void check_liveness(Time now, Worker& worker, const Generation& gen,
                        const config::Config& config);
    void stop_scaled_down(Time now, Worker& worker);
    void finish_stop_if_done(Time now);
    void reconcile_zygotes(Time now);

    // The zygote (preload).
    Generation* find_by_zygote(Pid pid);
    void zygote_message(Time now, Generation& gen, const std::string& text);
    void zygote_ended(Time now, Generation& gen, const ExitStatus& status,
                      const std::string& stderr_tail);
    void set_state(Time now, Generation& gen, ZygoteState next, const std::string& why);
    void stop_zygote(Time now, Generation& gen, const std::string& why);
    // Fork requests the zygote never answered: forgotten, so their slots are filled again.
    void forget_pending_forks(Time now, Generation& gen);

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
    void set_phase(RolloverPhase next, const std::string& why);
    // The one transition function of a worker's disposition; false when the change is not
    // allowed from where the worker is (it then keeps its disposition).
    bool dispose(Time now, Worker& worker, Disposition next, const std::string& why);
    void drain(Time now, Worker& worker, const std::string& why);
    void retire(Time now, Worker& worker, RetireReason reason, const std::string& why);
    void abort_worker(Time now, Worker& worker, RestartReason reason, const std::string& why);
    void interrupt(Time now, Worker& worker, const std::string& why);
    // SIGKILL with the reason it will be counted under (an earlier stop reason stays).
    void kill(Time now, Worker& worker, RestartReason reason, const std::string& why);
    void send_signal(Worker& worker, Signal signal, const std::string& reason);
    // Deadlines: a rule that is not due yet registers when it will be.
    void due_at(Time deadline) {
        next_deadline_ = next_deadline_ ? std::min(*next_deadline_, deadline) : deadline;
    }
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
    // The one "covers its slot" rule: a worker that is alive and serving. A slot that no
    // worker covers gets a new one (after its crash backoff).
    static bool covers_slot(const Worker& worker);
    std::vector<Worker*> workers_of(GenerationId gen);

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

    Rollover rollover_;
    std::optional<Time> next_deadline_;
    // Up to when the master has observed its workers: the last event's time, or the end of a
    // pause already accounted for (account_for_pause).
    Time observed_until_{0};
    int exit_code_ = 0;
    std::deque<HistoryEntry> history_;
    std::map<RestartReason, std::uint64_t> restarts_;
    std::uint64_t rollovers_ok_ = 0;
    std::uint64_t rollovers_failed_ = 0;
    std::optional<RolloverFinished> last_rollover_;
    PhaseDurations last_phases_;
    std::string last_status_;
    Actions out_;
};

}  // namespace molt::core
