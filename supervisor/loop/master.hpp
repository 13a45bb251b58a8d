// The loop layer: one thread, one libuv loop. It turns libuv callbacks (signals, SIGCHLD,
// channel packets, worker output, timers, control requests) into supervisor-core events,
// and carries out the actions the core returns. It makes no decisions of its own.
#pragma once

#include <uv.h>

#include <functional>
#include <map>
#include <memory>
#include <nlohmann/json.hpp>
#include <optional>
#include <string>
#include <vector>

#include "config/config.hpp"
#include "supervisor/core/supervisor.hpp"
#include "supervisor/loop/log.hpp"
#include "supervisor/loop/reaped_early.hpp"
#include "supervisor/os/os.hpp"

namespace molt::loop {

struct WorkerLaunch;  // launch.hpp

struct WorkerProcess;
struct UpgradeState;
class ControlServer;
class MetricsServer;
class Watcher;

struct MasterOptions {
    std::string config_path;  // empty: the config came from the command line
    std::optional<config::CommandLineConfig> command_line;
    std::string shim_dir;  // the directory holding molt_shim/
    std::string version;
    std::string build;              // a digest of the executable, to tell two builds apart
    std::string executable;         // absolute path, for the binary upgrade's re-exec
    std::vector<std::string> argv;  // the original command line, for the same
    bool dev_reload = false;        // `molt run --reload`: watch the app's source tree
};

// Checks that this binary can adopt a binary-upgrade state (MOLT_UPGRADE_STATE): its format,
// every field run_adopted() reads with the right type, every enum name known (the same
// parser run_adopted() uses). Empty when it is usable, otherwise why not. `molt upgrade-check`
// runs it with the new binary's own code before the old master execs into it.
std::string validate_upgrade_state(const std::string& text);

class Master {
  public:
    Master(std::shared_ptr<const config::Config> config, MasterOptions options);
    ~Master();
    Master(const Master&) = delete;
    Master& operator=(const Master&) = delete;

    // Binds, starts the first generation and runs the loop. Returns the process exit code.
    int run();

    // ----- used by the control socket and metrics endpoint --------------------------------
    core::Ticket request_reload(core::Trigger trigger, std::optional<std::string> release_dir);
    // Calls `done` once the rollover that serves `ticket` has finished.
    void on_rollover_finished(core::Ticket ticket,
                              std::function<void(const core::RolloverFinished&)> done);
    void scale(int workers);
    void stop(bool fast);
    nlohmann::json status_json() const;
    nlohmann::json history_json() const;
    std::string metrics_text() const;
    // metrics.app_multiprocess (app_metrics.cpp): what a scrape of the app's own metrics reads,
    // the python that can read it and the directories of the generations that still exist;
    // nullopt when it is off.
    struct AppMetricsScrape {
        std::string python;
        std::vector<std::string> dirs;
    };
    std::optional<AppMetricsScrape> app_metrics_scrape();
    // "wsgi" or "asgi": the interface a generation's workers serve (status.cpp).
    std::string interface_of(core::GenerationId generation) const;
    const core::Supervisor& core() const { return core_; }
    Log& log() { return log_; }
    uv_loop_t* loop() { return &loop_; }

  private:
    std::string app_metrics_dir(const config::Config& config, core::GenerationId generation);
    void app_metrics_process_dead(core::GenerationId generation, pid_t pid);
    void sweep_app_metrics_dirs();
    void remove_app_metrics_root();
    std::string app_metrics_root_;  // made on first use, removed at exit
    // A generation still has processes, or may start some (tls_tickets.cpp, app_metrics.cpp).
    bool generation_exists(core::GenerationId generation) const;
    // MOLT_TLS_TICKET_KEYS for a generation's workers: random, made on the generation's first
    // launch and forgotten with it; "" when no listener has TLS (tls_tickets.cpp).
    std::string tls_ticket_keys(const config::Config& config, core::GenerationId generation);
    std::map<core::GenerationId, std::string> tls_ticket_keys_;
    // Everything a spawn of `spawn` needs from the master (listeners, shim, environment, the
    // generation's metrics directory and ticket keys): one place for a worker and a zygote.
    WorkerLaunch launch_of(const core::SpawnWorker& spawn, bool zygote);
    friend struct WorkerProcess;

    // Parts of metrics_text() (status.cpp), one family group each.
    void request_metrics_text(std::string& out) const;
    void worker_load_metrics_text(std::string& out) const;
    void listen_queue_metrics_text(std::string& out) const;
    void phase_metrics_text(std::string& out, core::Time now) const;

    core::Time now();
    std::string start_services();  // the error that prevents starting, if any
    void start_watching();
    WorkerProcess& track_process(core::GenerationId generation, int slot, pid_t pid,
                                 os::Fd channel_fd, int out_fd, int err_fd);
    void feed(core::Actions actions);
    void execute(const core::Action& action, std::vector<core::Actions>& more);
    void arm_deadline_timer();

    void on_signal(int signum);
    void reap_children();
    void read_every_channel();
    void on_worker_packet(WorkerProcess& worker);
    void on_worker_exit(pid_t pid, int status);

    core::Actions spawn(const core::SpawnWorker& spawn);
    core::Actions spawn_zygote(const core::SpawnZygote& spawn);
    core::Actions ask_zygote(const core::SpawnWorker& spawn);
    void on_forked(WorkerProcess& zygote, const std::string& packet);
    void forget_forks_of(pid_t zygote);
    void on_spare_pid(WorkerProcess& zygote, const std::string& packet);
    pid_t spare_of(pid_t zygote) const {
        auto it = spares_.find(zygote);
        return it == spares_.end() ? 0 : it->second;
    }
    // The standby (standby.cpp).
    bool standby_usable_by(const config::Config& config);
    pid_t start_standby(core::GenerationId generation, const os::SpawnRequest& launch);
    void ask_for_standby(pid_t zygote, const os::SpawnRequest& launch);
    void on_standby_answer(WorkerProcess& zygote, const std::string& packet);
    void standby_exited(WorkerProcess& standby, int status);
    void end_standby(const std::string& why);
    core::Actions prepare_release(const core::PrepareRelease& prepare);
    std::optional<std::string> resolve_release(const config::Config& config,
                                               const std::optional<std::string>& override_dir,
                                               core::Release& release);
    core::Actions send_to_worker(const core::SendToWorker& send);
    void signal_worker(const core::SignalWorker& signal, core::Actions& more);
    void notify(const std::string& message);
    void finish_rollover(const core::RolloverFinished& finished);
    void begin_shutdown(int code);
    void close_listeners();  // logs what could not be cleaned up
    void update_process_title();

    // Binary upgrade (upgrade.cpp).
    void begin_upgrade();
    void finish_upgrade_check(int status);
    UpgradeState upgrade_state() const;
    std::vector<int> handed_over_fds() const;
    void exec_new_image(const std::string& new_version);
    int run_adopted(const std::string& state);
    int adopt(UpgradeState state);

    uv_loop_t loop_{};
    int loop_init_error_ = 0;                       // uv_loop_init()'s, or 0
    std::shared_ptr<const config::Config> config_;  // the newest valid config
    MasterOptions options_;
    core::Supervisor core_;
    Log log_;
    std::vector<os::Listener> listeners_;
    // Shared memory where a generation's workers keep their share of connections
    // (worker_shim/native/accept_balance.hpp); made at the first launch.
    os::Fd accept_board_;
    bool accept_board_failed_ = false;
    int accept_board();
    std::map<pid_t, std::unique_ptr<WorkerProcess>> processes_;
    // A worker a zygote was asked to fork: the master's ends of its channel and output pipes,
    // kept until the zygote answers FORKED= (then tracked like a spawned worker's).
    struct PendingFork {
        core::GenerationId generation = 0;
        int slot = 0;
        pid_t zygote = 0;
        os::Fd channel;
        os::Fd out;
        os::Fd err;
    };
    std::map<core::WorkerId, PendingFork> pending_forks_;
    // The standby: an interpreter a zygote forked before its import, which the next zygote
    // launch with the same key (launch.hpp, standby_key) becomes instead of a new process.
    struct Standby {
        pid_t pid = 0;  // 0: none
        std::string key;
        std::vector<std::string> env;  // what it was started with: its zygote's environment
    };
    Standby standby_;
    // Asked of a zygote, not answered yet (one at a time).
    struct PendingStandby {
        pid_t zygote = 0;
        Standby standby;
        os::Fd channel;
        os::Fd out;
        os::Fd err;
    };
    std::optional<PendingStandby> pending_standby_;
    // zygote pid -> its spare's (SPARE_PID=): shown in status, nothing else depends on it.
    std::map<pid_t, pid_t> spares_;
    // Children reaped before the master knew them (reaped_early.hpp says which and why).
    ReapedEarly reaped_early_;
    std::map<int, uv_signal_t> signals_;
    uv_timer_t deadline_timer_{};
    uv_timer_t watchdog_timer_{};
    // PSS of each worker and zygote, sampled every kPssSampleMs (reading smaps_rollup walks
    // every mapping, too slow to do for each status request); a pid not sampled yet is read
    // once on demand.
    uv_timer_t pss_timer_{};
    mutable std::map<pid_t, unsigned long long> pss_;
    void sample_pss();
    unsigned long long pss_of(pid_t pid) const;
    std::unique_ptr<ControlServer> control_;
    std::unique_ptr<MetricsServer> metrics_;
    std::unique_ptr<Watcher> watcher_;
    // Closed watchers live until the loop ends: one may be replaced from inside its own
    // callback, and libuv finishes closing its handles later.
    std::vector<std::unique_ptr<Watcher>> retired_watchers_;
    std::vector<std::string> watched_;
    core::Ticket next_ticket_ = 1;
    std::multimap<core::Ticket, std::function<void(const core::RolloverFinished&)>> waiters_;
    std::map<core::Ticket, core::RolloverFinished> finished_;  // results not yet collected
    unsigned long long oom_kills_seen_ = 0;
    std::uint64_t retired_requests_ = 0;  // requests served by workers that have exited
    // Request metrics of workers that have exited, by interface ("wsgi", "asgi"): added to
    // the live workers' at scrape time, so the counters never go backwards.
    std::map<std::string, core::RequestStats> retired_stats_;
    std::optional<int> exit_code_;
    core::Time started_at_{0};
    std::uint64_t wall_started_at_ = 0;
    pid_t upgrade_check_pid_ = 0;
    uv_timer_t upgrade_timer_{};                              // bounds the check run
    os::Fd upgrade_check_output_;                             // the check's stdout and stderr
    std::optional<core::GenerationId> titled_generation_{0};  // 0: nothing shown yet
    bool feeding_ = false;
    std::vector<core::Actions> pending_;
};

}  // namespace molt::loop
