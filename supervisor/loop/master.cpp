#include "supervisor/loop/master.hpp"

#include <fmt/format.h>
#include <signal.h>
#include <sys/wait.h>

#include <fstream>

#include "supervisor/common/text.hpp"
#include "supervisor/contract/worker_contract.hpp"
#include "supervisor/loop/launch.hpp"
#include "supervisor/loop/servers.hpp"
#include "supervisor/loop/upgrade_state.hpp"
#include "supervisor/loop/watch.hpp"
#include "supervisor/loop/worker_process.hpp"

namespace molt::loop {

namespace {

constexpr std::size_t kStderrTail = 4096;    // kept per worker for failure reports
constexpr std::size_t kMaxLine = 16 * 1024;  // a longer line is split

int to_signum(core::Signal signal) {
    switch (signal) {
        case core::Signal::abort:
            return SIGABRT;
        case core::Signal::kill:
            return SIGKILL;
        case core::Signal::interrupt:
            return SIGINT;
        case core::Signal::terminate:
            return SIGTERM;
    }
    return SIGTERM;
}

bool starts_with(const std::string& text, std::string_view prefix) {
    return text.compare(0, prefix.size(), prefix) == 0;
}

}  // namespace

void WorkerProcess::line(bool is_err, std::string_view text) {
    master->log().worker_line(generation, slot, pid, is_err ? "stderr" : "stdout", text);
}

void WorkerProcess::consume(bool is_err, const char* data, std::size_t size) {
    std::string& partial = is_err ? err_partial : out_partial;
    if (is_err) {
        stderr_tail.append(data, size);
        if (stderr_tail.size() > kStderrTail) {
            stderr_tail.erase(0, stderr_tail.size() - kStderrTail);
        }
    }
    partial.append(data, size);
    std::size_t start = 0;
    for (;;) {
        auto newline = partial.find('\n', start);
        if (newline == std::string::npos) break;
        line(is_err, std::string_view(partial).substr(start, newline - start));
        start = newline + 1;
    }
    partial.erase(0, start);
    if (partial.size() > kMaxLine) {
        line(is_err, partial);
        partial.clear();
    }
}

void WorkerProcess::drain_output() {
    for (uv_pipe_t* pipe : {&out, &err}) {
        int fd = fd_of(pipe);
        if (fd < 0) continue;
        std::string rest = os::read_available(fd, 64 * 8192);
        consume(pipe == &err, rest.data(), rest.size());
    }
    if (!out_partial.empty()) line(false, out_partial);
    if (!err_partial.empty()) line(true, err_partial);
    out_partial.clear();
    err_partial.clear();
}

namespace {

void on_handle_closed(uv_handle_t* handle) {
    auto* worker = static_cast<WorkerProcess*>(handle->data);
    if (--worker->open_handles == 0) delete worker;
}

void alloc_buffer(uv_handle_t* /*handle*/, size_t suggested, uv_buf_t* buf) {
    buf->base = new char[suggested];
    buf->len = suggested;
}

void on_output(uv_stream_t* stream, ssize_t nread, const uv_buf_t* buf) {
    auto* worker = static_cast<WorkerProcess*>(stream->data);
    if (nread > 0) {
        worker->consume(stream == reinterpret_cast<uv_stream_t*>(&worker->err), buf->base,
                        static_cast<std::size_t>(nread));
    } else if (nread < 0) {
        uv_read_stop(stream);
    }
    delete[] buf->base;
}

}  // namespace

void close_worker_handles(WorkerProcess* worker) {
    for (uv_handle_t* handle : {reinterpret_cast<uv_handle_t*>(&worker->channel),
                                reinterpret_cast<uv_handle_t*>(&worker->out),
                                reinterpret_cast<uv_handle_t*>(&worker->err)}) {
        if (!uv_is_closing(handle)) uv_close(handle, on_handle_closed);
    }
    worker->channel_fd.reset();
}

Master::Master(std::shared_ptr<const config::Config> config, MasterOptions options)
    : config_(std::move(config)), options_(std::move(options)) {
    loop_init_error_ = uv_loop_init(&loop_);  // fails without fds (its epoll): run() says so
}

Master::~Master() {
    remove_app_metrics_root();
    if (loop_init_error_ == 0) uv_loop_close(&loop_);
}

core::Time Master::now() {
    uv_update_time(&loop_);
    return core::Time(static_cast<std::int64_t>(uv_now(&loop_)));
}

// ----- startup -----------------------------------------------------------------------------

int Master::run() {
    os::ignore_signal(SIGPIPE);
    log_.configure(config_->logging);
    if (loop_init_error_ != 0) {
        log_.error(std::string("cannot start: the event loop: ") + uv_strerror(loop_init_error_));
        return 1;
    }
    if (const char* state = std::getenv(kStateVariable)) {
        std::string text = state;
        os::unset_environment(kStateVariable);  // never passed on to workers
        return run_adopted(text);
    }
    wall_started_at_ = os::wall_clock_us() / 1000;
    started_at_ = now();
    if (auto error = os::become_subreaper(); !error.empty()) {
        // Without it a zygote's workers would be re-parented to init: no preload then.
        log_.warning(error + "; workers forked by a zygote could not be supervised");
    }

    auto adopted = os::adopt_systemd_listeners(config_->listen);
    auto opened = adopted ? std::move(*adopted) : os::open_listeners(config_->listen);
    if (!os::ok(opened)) {
        log_.error("cannot listen: " + os::error_of(opened));
        return 1;
    }
    listeners_ = std::move(std::get<0>(opened));
    for (const auto& listener : listeners_) {
        log_.info(fmt::format("listening on {}{}", listener.bound,
                              listener.from_systemd ? " (socket from systemd)" : ""));
    }

    core::Release release;
    if (auto error = resolve_release(*config_, std::nullopt, release)) {
        log_.error(*error);
        close_listeners();
        return 1;
    }
    if (!config_->pidfile.empty()) {
        if (auto error = os::write_pidfile(config_->pidfile, os::self_pid()); !error.empty()) {
            // Whoever reads the pidfile (systemd's PIDFile=, a logrotate script) would act on
            // a stale or foreign pid: stop at start, as with a busy listen address.
            log_.error("cannot start: " + error);
            close_listeners();
            return 1;
        }
    }
    if (auto error = start_services(); !error.empty()) {
        // Like a busy listen address: stop before any worker starts, and say why.
        log_.error("cannot start: " + error);
        begin_shutdown(1);
        uv_run(&loop_, UV_RUN_DEFAULT);  // lets libuv finish closing what was opened
        return 1;
    }
    log_.info(fmt::format("molt {} master pid={} starting {} worker(s) of {}", options_.version,
                          os::self_pid(), config_->workers, config_->app));
    feed(core_.start(now(), release));
    uv_run(&loop_, UV_RUN_DEFAULT);
    return exit_code_.value_or(1);
}

// Signals, timers, the control socket and the metrics endpoint: the same for a fresh start and
// for an image that adopted its predecessor's workers.
std::string Master::start_services() {
    // The timers first: they take no fds, so begin_shutdown() can always close them.
    uv_timer_init(&loop_, &deadline_timer_);
    deadline_timer_.data = this;
    uv_timer_init(&loop_, &upgrade_timer_);
    upgrade_timer_.data = this;

    uv_timer_init(&loop_, &pss_timer_);
    pss_timer_.data = this;
    constexpr std::uint64_t kPssSampleMs = 5000;
    uv_timer_start(
        &pss_timer_, [](uv_timer_t* t) { static_cast<Master*>(t->data)->sample_pss(); },
        kPssSampleMs, kPssSampleMs);

    uv_timer_init(&loop_, &watchdog_timer_);
    watchdog_timer_.data = this;
    if (std::uint64_t watchdog_usec = os::systemd_watchdog_us(); watchdog_usec > 0) {
        // Pinged from the loop itself: if the loop stalls, systemd notices.
        std::uint64_t every = std::max<std::uint64_t>(watchdog_usec / 2000, 1);
        uv_timer_start(
            &watchdog_timer_,
            [](uv_timer_t* t) { static_cast<Master*>(t->data)->notify("WATCHDOG=1"); }, every,
            every);
    }

    // Every service is started even when one fails: after a binary upgrade the master carries
    // on with what it could start, and a lost metrics port must not leave `watch:` off too.
    std::string errors;
    auto note = [&errors](const std::string& error) {
        if (!error.empty()) errors += (errors.empty() ? "" : "; ") + error;
    };
    // Out of fds, uv_loop_init() already failed (it makes the loop's signal pipe), so these are
    // not expected to fail; if one does, the master must not run with that signal's default
    // action (HUP and TERM would kill it, nothing would reap a worker). Only handles that were
    // initialised are kept (begin_shutdown() closes what is in signals_).
    for (int signum :
         {SIGHUP, SIGTERM, SIGINT, SIGQUIT, SIGTTIN, SIGTTOU, SIGUSR1, SIGUSR2, SIGCHLD}) {
        uv_signal_t& handle = signals_[signum];
        int rc = uv_signal_init(&loop_, &handle);
        if (rc != 0) {
            signals_.erase(signum);
            note(fmt::format("cannot handle signal {}: {}", signum, uv_strerror(rc)));
            continue;
        }
        handle.data = this;
        rc = uv_signal_start(
            &handle, [](uv_signal_t* h, int sig) { static_cast<Master*>(h->data)->on_signal(sig); },
            signum);
        if (rc != 0) note(fmt::format("cannot handle signal {}: {}", signum, uv_strerror(rc)));
    }
    if (!config_->control.socket.empty()) {
        control_ = std::make_unique<ControlServer>(*this);
        note(control_->listen(config_->control.socket, config_->control.mode));
    }
    if (config_->metrics.listen) {
        metrics_ = std::make_unique<MetricsServer>(*this);
        note(metrics_->listen(*config_->metrics.listen));
    }

    oom_kills_seen_ = os::oom_kill_count();
    start_watching();
    return errors;
}

// `watch:` paths, plus the app's source tree in development mode. Restarted when a reload
// brings a different list.
void Master::start_watching() {
    std::vector<std::string> paths = config_->watch;
    if (options_.dev_reload) {
        auto real = os::real_path(config_->chdir);
        if (os::ok(real)) paths.push_back(std::get<0>(real));
    }
    if (paths == watched_ && (watcher_ || paths.empty())) return;
    if (watcher_) {
        watcher_->close();
        retired_watchers_.push_back(std::move(watcher_));
    }
    watched_ = paths;
    if (paths.empty()) return;
    watcher_ = std::make_unique<Watcher>(&loop_, paths, [this](const std::string& what) {
        if (what.empty()) {
            log_.info("watch: files were written but their content is unchanged; no rollover");
            return;
        }
        log_.info(fmt::format("watch: {} changed; starting a rollover", what));
        request_reload(core::Trigger::watch, std::nullopt);
    });
    for (const auto& problem : watcher_->start()) log_.warning(problem);
    log_.info(fmt::format("watching {} for changes", fmt::join(paths, ", ")));
}

// ----- the action executor -----------------------------------------------------------------

void Master::feed(core::Actions actions) {
    pending_.push_back(std::move(actions));
    if (feeding_) return;  // the outer feed() picks it up
    feeding_ = true;
    while (!pending_.empty()) {
        core::Actions batch = std::move(pending_.front());
        pending_.erase(pending_.begin());
        for (const auto& action : batch) {
            std::vector<core::Actions> more;
            execute(action, more);
            for (auto& m : more) pending_.push_back(std::move(m));
        }
    }
    feeding_ = false;
    arm_deadline_timer();
    update_process_title();
}

void Master::sample_pss() {
    std::map<pid_t, unsigned long long> fresh;
    for (const auto& [pid, process] : processes_) fresh[pid] = os::proportional_bytes(pid);
    pss_ = std::move(fresh);
}

unsigned long long Master::pss_of(pid_t pid) const {
    if (pid <= 0) return 0;
    auto it = pss_.find(pid);
    if (it == pss_.end()) it = pss_.emplace(pid, os::proportional_bytes(pid)).first;
    return it->second;
}

// `ps` shows which generation serves, whatever told us (systemd or not).
void Master::update_process_title() {
    auto live = core_.live_generation();
    if (live == titled_generation_) return;
    titled_generation_ = live;
    os::set_process_title(live ? fmt::format("molt: master gen={}", *live) : "molt: master");
}

void Master::execute(const core::Action& action, std::vector<core::Actions>& more) {
    std::visit(
        [&](const auto& a) {
            using T = std::decay_t<decltype(a)>;
            if constexpr (std::is_same_v<T, core::SpawnWorker>) {
                more.push_back(a.via_zygote != 0 ? ask_zygote(a) : spawn(a));
            } else if constexpr (std::is_same_v<T, core::SpawnZygote>) {
                more.push_back(spawn_zygote(a));
            } else if constexpr (std::is_same_v<T, core::SendToWorker>) {
                more.push_back(send_to_worker(a));
            } else if constexpr (std::is_same_v<T, core::SignalWorker>) {
                core::Actions failed;
                signal_worker(a, failed);
                more.push_back(std::move(failed));
            } else if constexpr (std::is_same_v<T, core::PrepareRelease>) {
                more.push_back(prepare_release(a));
            } else if constexpr (std::is_same_v<T, core::NotifySystemd>) {
                notify(a.message);
            } else if constexpr (std::is_same_v<T, core::RolloverFinished>) {
                finish_rollover(a);
            } else if constexpr (std::is_same_v<T, core::WriteLog>) {
                log_.write(a.level, a.text, a.generation, a.pid);
            } else if constexpr (std::is_same_v<T, core::ExitMaster>) {
                begin_shutdown(a.code);
            }
        },
        action);
}

void Master::arm_deadline_timer() {
    if (exit_code_) return;
    auto deadline = core_.next_deadline();
    if (!deadline) {
        uv_timer_stop(&deadline_timer_);
        return;
    }
    auto wait = std::max<std::int64_t>((*deadline - now()).count(), 0);
    uv_timer_start(
        &deadline_timer_,
        [](uv_timer_t* t) {
            auto* master = static_cast<Master*>(t->data);
            master->read_every_channel();
            master->feed(master->core_.tick(master->now()));
        },
        static_cast<std::uint64_t>(wait), 0);
}

// ----- events ------------------------------------------------------------------------------

void Master::on_signal(int signum) {
    if (signum == SIGCHLD) {
        reap_children();
        return;
    }
    log_.info(fmt::format("received {}", text::signal_name(signum)));
    switch (signum) {
        case SIGHUP:
            request_reload(core::Trigger::reload, std::nullopt);
            break;
        case SIGTERM:
            stop(false);
            break;
        case SIGINT:
        case SIGQUIT:
            stop(true);
            break;
        case SIGTTIN:
            scale(core_.target_workers() + 1);
            break;
        case SIGTTOU:
            scale(core_.target_workers() - 1);
            break;
        case SIGUSR1: {
            std::string error = log_.reopen();
            if (!error.empty()) log_.error(error);
            feed(core_.reopen_logs(now()));
            break;
        }
        case SIGUSR2:
            begin_upgrade();
            break;
        default:
            break;
    }
}

void Master::reap_children() {
    // The only waitpid() in molt: every child is reaped here, on the loop.
    while (auto child = os::reap_child()) {
        if (child->pid == upgrade_check_pid_) {
            finish_upgrade_check(child->status);
            continue;
        }
        on_worker_exit(child->pid, child->status);
    }
}

void Master::on_worker_exit(pid_t pid, int status) {
    if (auto it = processes_.find(pid); it != processes_.end() && it->second->standby) {
        standby_exited(*it->second, status);
        return;
    }
    if (!processes_.count(pid)) {
        // Not (yet) known: a forked worker whose zygote's FORKED= is still unread, a zygote's
        // spare that was never used, or an orphan of an app's subprocess re-parented to this
        // subreaper. Kept for on_forked() a while. A spare that died waiting is no longer
        // shown; its zygote finds out when it next tries to hand it a request.
        reaped_early_.remember(pid, status, now());
        std::erase_if(spares_, [&](const auto& entry) { return entry.second == pid; });
        return;
    }
    core::ExitStatus exit;
    if (WIFSIGNALED(status)) {
        exit.signal = WTERMSIG(status);
        exit.core_dumped = WCOREDUMP(status);
    } else {
        exit.code = WEXITSTATUS(status);
    }
    if (exit.signal == SIGKILL) {
        auto count = os::oom_kill_count();
        exit.oom_suspected = count > oom_kills_seen_;
        oom_kills_seen_ = count;
    }
    std::string tail;
    if (auto it = processes_.find(pid); it != processes_.end()) {
        // Its last words first: an ERROR= or a final heartbeat may still sit in the channel.
        on_worker_packet(*it->second);
        it = processes_.find(pid);
    }
    if (auto it = processes_.find(pid); it != processes_.end() && it->second->zygote) {
        forget_forks_of(pid);  // whatever it did not answer, it never will
        spares_.erase(pid);    // its spare exits when it sees the zygote's end close
        if (pending_standby_ && pending_standby_->zygote == pid) pending_standby_.reset();
    }
    if (auto it = processes_.find(pid); it != processes_.end()) {
        WorkerProcess* worker = it->second.release();
        processes_.erase(it);
        app_metrics_process_dead(worker->generation, pid);
        worker->drain_output();
        tail = worker->stderr_tail;
        close_worker_handles(worker);
    }
    for (const auto& [id, w] : core_.workers()) {
        if (w.pid != pid) continue;
        retired_requests_ += w.counters.requests;
        retired_stats_[interface_of(w.generation)].add(w.counters.stats);
    }
    feed(core_.exited(now(), pid, exit, tail));
    sweep_app_metrics_dirs();
}

// libuv runs due timers before it polls for I/O. After the master was stopped, the heartbeats
// the workers sent meanwhile are still queued in their channels when the deadline timer fires:
// read them first, so the deadlines are judged on everything the workers said.
void Master::read_every_channel() {
    std::vector<pid_t> pids;
    for (const auto& [pid, process] : processes_) {
        if (uv_is_active(reinterpret_cast<uv_handle_t*>(&process->channel))) pids.push_back(pid);
    }
    for (pid_t pid : pids) {
        // A message's actions may end or start processes: look each one up again.
        if (auto it = processes_.find(pid); it != processes_.end()) on_worker_packet(*it->second);
    }
}

void Master::on_worker_packet(WorkerProcess& worker) {
    for (;;) {
        os::Packet packet = os::receive_packet(worker.channel_fd.get());
        if (packet.status == os::Packet::Status::packet) {
            if (worker.zygote && starts_with(packet.data, contract::key::forked)) {
                on_forked(worker, packet.data);
            } else if (worker.zygote && starts_with(packet.data, contract::key::spare_pid)) {
                on_spare_pid(worker, packet.data);
            } else if (worker.zygote && (starts_with(packet.data, contract::key::standby_pid) ||
                                         starts_with(packet.data, contract::key::standby_error))) {
                on_standby_answer(worker, packet.data);
            } else {
                feed(core_.message(now(), worker.pid, std::move(packet.data)));
            }
            continue;
        }
        if (packet.status == os::Packet::Status::closed) {
            // The worker closed its end (or the channel broke); its exit arrives through
            // SIGCHLD.
            if (!packet.error.empty()) {
                log_.write(core::LogLevel::warning, packet.error, worker.generation, worker.pid);
            }
            uv_poll_stop(&worker.channel);
        }
        break;
    }
}

// ----- actions -----------------------------------------------------------------------------

WorkerLaunch Master::launch_of(const core::SpawnWorker& spawn, bool zygote) {
    const config::Config& config = *spawn.release.config;
    return {spawn,
            listeners_,
            options_.shim_dir,
            os::environment(),
            zygote,
            app_metrics_dir(config, spawn.generation),
            tls_ticket_keys(config, spawn.generation),
            accept_board()};
}

int Master::accept_board() {
    // Made once, when the first worker starts; without it workers accept as they come.
    if (!accept_board_ && !accept_board_failed_) {
        auto board = os::make_shared_memory("molt-accept-board", contract::accept_board_bytes);
        if (os::ok(board)) {
            accept_board_ = std::move(std::get<os::Fd>(board));
        } else {
            accept_board_failed_ = true;
            log_.warning("no accept board, workers will not balance connections: " +
                         os::error_of(board));
        }
    }
    return accept_board_.get();
}

core::Actions Master::spawn(const core::SpawnWorker& spawn) {
    auto fail = [&](const std::string& error) {
        return core_.spawn_failed(now(), spawn.worker, error);
    };
    standby_usable_by(*spawn.release.config);  // ends it when it is not
    // Every fd made here is owned: whatever fails below, each closes exactly once.
    auto ends = os::make_child_ends();
    if (!os::ok(ends)) return fail(os::error_of(ends));
    auto& [channel, out_pipe, err_pipe] = std::get<os::ChildEnds>(ends);
    auto& [master_end, worker_end] = channel;

    auto request = worker_spawn_request(
        launch_of(spawn, false),
        {worker_end.get(), out_pipe.write_end.get(), err_pipe.write_end.get()});
    if (!os::ok(request)) return fail(os::error_of(request));
    auto pid = os::spawn_process(std::get<os::SpawnRequest>(request));
    if (!os::ok(pid)) return fail(os::error_of(pid));

    // The worker's ends stay open here only until this returns: the child holds its copies.
    pid_t child = std::get<pid_t>(pid);
    track_process(spawn.generation, spawn.slot, child, std::move(master_end),
                  out_pipe.read_end.release(), err_pipe.read_end.release());
    return core_.spawned(now(), spawn.worker, child);
}

core::Actions Master::spawn_zygote(const core::SpawnZygote& zygote) {
    auto fail = [&](const std::string& error) {
        return core_.zygote_spawn_failed(now(), zygote.generation, error);
    };
    auto ends = os::make_child_ends();
    if (!os::ok(ends)) return fail(os::error_of(ends));
    auto& [channel, out_pipe, err_pipe] = std::get<os::ChildEnds>(ends);
    auto& [master_end, zygote_end] = channel;

    // The zygote is started exactly as the generation's slot-0 worker would be (environment,
    // fds, directory, user/group), and told that it is the zygote.
    core::SpawnWorker as_worker{0, zygote.generation, 0, zygote.release, 0};
    auto request = worker_spawn_request(
        launch_of(as_worker, true),
        {zygote_end.get(), out_pipe.write_end.get(), err_pipe.write_end.get()});
    if (!os::ok(request)) return fail(os::error_of(request));
    const os::SpawnRequest& spawn_request = std::get<os::SpawnRequest>(request);
    bool standby = standby_usable_by(*zygote.release.config);
    pid_t child = standby ? start_standby(zygote.generation, spawn_request) : 0;
    if (child == 0) {
        auto pid = os::spawn_process(spawn_request);
        if (!os::ok(pid)) return fail(os::error_of(pid));
        child = std::get<pid_t>(pid);
        track_process(zygote.generation, kZygoteSlot, child, std::move(master_end),
                      out_pipe.read_end.release(), err_pipe.read_end.release())
            .zygote = true;
    }
    if (standby) ask_for_standby(child, spawn_request);
    return core_.zygote_spawned(now(), zygote.generation, child);
}

// A fork request: the worker's channel and output pipes are made here, as for a spawn, and
// handed to the zygote with the request; its FORKED= answer is the spawn's result.
core::Actions Master::ask_zygote(const core::SpawnWorker& spawn) {
    auto fail = [&](const std::string& error) {
        return core_.spawn_failed(now(), spawn.worker, error);
    };
    auto zygote = processes_.find(spawn.via_zygote);
    if (zygote == processes_.end()) return fail("the zygote is gone");
    auto ends = os::make_child_ends();
    if (!os::ok(ends)) return fail(os::error_of(ends));
    auto& [channel, out_pipe, err_pipe] = std::get<os::ChildEnds>(ends);
    auto& [master_end, worker_end] = channel;
    std::string message = fmt::format("{}={}\n{}={}", contract::key::fork, spawn.worker,
                                      contract::key::slot, spawn.slot);
    std::string error = os::send_packet_with_fds(
        zygote->second->channel_fd.get(), message,
        {worker_end.get(), out_pipe.write_end.get(), err_pipe.write_end.get()}, spawn.via_zygote);
    if (!error.empty()) return fail(error);
    // The zygote holds its own copies now; the worker's ends close here when this returns.
    pending_forks_[spawn.worker] = PendingFork{spawn.generation,
                                               spawn.slot,
                                               spawn.via_zygote,
                                               std::move(master_end),
                                               std::move(out_pipe.read_end),
                                               std::move(err_pipe.read_end)};
    return {};
}

void Master::on_forked(WorkerProcess& zygote, const std::string& packet) {
    auto fields = contract::parse_message(packet);
    core::WorkerId id =
        std::strtoull(fields[std::string(contract::key::forked)].c_str(), nullptr, 10);
    auto it = pending_forks_.find(id);
    if (it == pending_forks_.end() || it->second.zygote != zygote.pid) {
        log_.write(core::LogLevel::warning, "zygote answered an unknown fork request: " + packet,
                   zygote.generation, zygote.pid);
        return;
    }
    PendingFork fork = std::move(it->second);
    pending_forks_.erase(it);
    pid_t pid = static_cast<pid_t>(std::atoi(fields[std::string(contract::key::pid)].c_str()));
    if (pid <= 0) {
        std::string error = fields[std::string(contract::key::fork_error)];
        feed(core_.spawn_failed(
            now(), id, "the zygote could not fork it: " + (error.empty() ? packet : error)));
        return;
    }
    track_process(fork.generation, fork.slot, pid, std::move(fork.channel), fork.out.release(),
                  fork.err.release());
    feed(core_.spawned(now(), id, pid));
    if (auto status = reaped_early_.take(pid, now())) {
        on_worker_exit(pid, *status);  // it exited (and was reaped) before this answer was read
    }
}

void Master::on_spare_pid(WorkerProcess& zygote, const std::string& packet) {
    auto fields = contract::parse_message(packet);
    auto pid = static_cast<pid_t>(std::atoi(fields[std::string(contract::key::spare_pid)].c_str()));
    if (pid > 0 && !reaped_early_.contains(pid, now())) {  // not already dead
        spares_[zygote.pid] = pid;
    } else {
        spares_.erase(zygote.pid);
    }
}

void Master::forget_forks_of(pid_t zygote) {
    std::erase_if(pending_forks_, [&](const auto& entry) { return entry.second.zygote == zygote; });
}

// Watches a worker's channel and output pipes (a fresh spawn, or one adopted after exec).
WorkerProcess& Master::track_process(core::GenerationId generation, int slot, pid_t pid,
                                     os::Fd channel_fd, int out_fd, int err_fd) {
    auto worker = std::make_unique<WorkerProcess>();
    worker->master = this;
    worker->generation = generation;
    worker->slot = slot;
    worker->pid = pid;
    worker->channel_fd = std::move(channel_fd);
    uv_poll_init(&loop_, &worker->channel, worker->channel_fd.get());
    uv_pipe_init(&loop_, &worker->out, 0);
    uv_pipe_init(&loop_, &worker->err, 0);
    uv_pipe_open(&worker->out, out_fd);
    uv_pipe_open(&worker->err, err_fd);
    worker->open_handles = 3;
    for (uv_handle_t* handle : {reinterpret_cast<uv_handle_t*>(&worker->channel),
                                reinterpret_cast<uv_handle_t*>(&worker->out),
                                reinterpret_cast<uv_handle_t*>(&worker->err)}) {
        handle->data = worker.get();
    }
    uv_poll_start(&worker->channel, UV_READABLE, [](uv_poll_t* handle, int, int) {
        auto* w = static_cast<WorkerProcess*>(handle->data);
        w->master->on_worker_packet(*w);
    });
    uv_read_start(reinterpret_cast<uv_stream_t*>(&worker->out), alloc_buffer, on_output);
    uv_read_start(reinterpret_cast<uv_stream_t*>(&worker->err), alloc_buffer, on_output);
    WorkerProcess& tracked = *worker;
    processes_.emplace(pid, std::move(worker));
    return tracked;
}

core::Actions Master::prepare_release(const core::PrepareRelease& prepare) {
    std::shared_ptr<const config::Config> next = config_;
    if (!options_.config_path.empty()) {
        auto loaded = config::load_config_file(options_.config_path);
        if (!loaded.errors.empty()) {
            std::string text = "config invalid: ";
            for (std::size_t i = 0; i < loaded.errors.size(); ++i) {
                text += (i ? "; " : "") + loaded.errors[i].to_string();
            }
            return core_.release_rejected(now(), text);
        }
        next = loaded.config;
    }
    if (auto refusal = core::reload_refusal(*config_, *next)) {
        return core_.release_rejected(now(), *refusal);
    }
    core::Release release;
    if (auto error = resolve_release(*next, prepare.release_dir, release)) {
        return core_.release_rejected(now(), *error);
    }
    config_ = next;
    log_.configure(next->logging);
    start_watching();
    return core_.release_prepared(now(), release);
}

std::optional<std::string> Master::resolve_release(const config::Config& config,
                                                   const std::optional<std::string>& override_dir,
                                                   core::Release& release) {
    std::string dir = override_dir.value_or(config.chdir);
    auto real = os::real_path(dir);
    if (!os::ok(real)) {
        return fmt::format("{}: {}", override_dir ? "rollback target" : "chdir",
                           os::error_of(real));
    }
    release.release_dir = std::get<0>(real);
    release.version = release.release_dir.substr(release.release_dir.rfind('/') + 1);
    if (!config.version_file.empty()) {
        std::ifstream file(release.release_dir + "/" + config.version_file);
        std::string first;
        if (file && std::getline(file, first)) {
            auto end = first.find_last_not_of(" \t\r");
            first = end == std::string::npos ? "" : first.substr(0, end + 1);
            first = text::truncate_utf8(first, 100);
            if (!first.empty()) release.version = first;
        }
    }
    release.config =
        std::shared_ptr<const config::Config>(std::make_shared<config::Config>(config));
    release.digest = config::config_digest(config);
    return std::nullopt;
}

core::Actions Master::send_to_worker(const core::SendToWorker& send) {
    auto it = processes_.find(send.pid);
    if (it == processes_.end()) return {};
    WorkerProcess& worker = *it->second;
    std::string error = os::send_packet(worker.channel_fd.get(), send.message, send.pid);
    if (error.empty()) return {};
    return core_.send_failed(now(), send.pid, send.message, error);
}

void Master::signal_worker(const core::SignalWorker& signal, core::Actions& more) {
    bool no_such_process = false;
    std::string error = os::send_signal(signal.pid, to_signum(signal.signal), &no_such_process);
    if (!error.empty()) more = core_.signal_failed(now(), signal.pid, no_such_process, error);
}

void Master::notify(const std::string& message) {
    std::string text = message;
    if (starts_with(message, "RELOADING=1")) {
        text += fmt::format("\nMONOTONIC_USEC={}", os::monotonic_us());
    }
    if (auto error = os::notify_systemd(text); !error.empty()) log_.warning(error);
}

void Master::finish_rollover(const core::RolloverFinished& finished) {
    for (core::Ticket ticket : finished.tickets) {
        auto [begin, end] = waiters_.equal_range(ticket);
        std::vector<std::function<void(const core::RolloverFinished&)>> callbacks;
        for (auto it = begin; it != end; ++it) callbacks.push_back(std::move(it->second));
        waiters_.erase(begin, end);
        if (callbacks.empty()) {
            finished_[ticket] = finished;
            while (finished_.size() > 256) finished_.erase(finished_.begin());
        }
        for (auto& callback : callbacks) callback(finished);
    }
    if (finished.superseded) {
        log_.info(finished.reason);
    } else if (finished.generation != 0 || !finished.ok) {
        log_.write(finished.ok ? core::LogLevel::info : core::LogLevel::error,
                   finished.ok ? fmt::format("rollover to generation {} done in {}ms",
                                             finished.generation, finished.took.count())
                               : fmt::format("rollover failed after {}ms: {}",
                                             finished.took.count(), finished.reason),
                   finished.generation);
    }
}

void Master::close_listeners() {
    if (auto error = os::close_listeners(listeners_); !error.empty()) log_.warning(error);
}

void Master::begin_shutdown(int code) {
    if (exit_code_) return;
    exit_code_ = code;
    uv_timer_stop(&deadline_timer_);
    uv_close(reinterpret_cast<uv_handle_t*>(&deadline_timer_), nullptr);
    uv_close(reinterpret_cast<uv_handle_t*>(&watchdog_timer_), nullptr);
    uv_close(reinterpret_cast<uv_handle_t*>(&pss_timer_), nullptr);
    uv_close(reinterpret_cast<uv_handle_t*>(&upgrade_timer_), nullptr);
    for (auto& [signum, handle] : signals_) {
        uv_close(reinterpret_cast<uv_handle_t*>(&handle), nullptr);
    }
    if (control_) control_->close();
    if (metrics_) metrics_->close();
    if (watcher_) watcher_->close();
    close_listeners();
    if (!config_->pidfile.empty()) {
        if (auto error = os::remove_file(config_->pidfile); !error.empty()) log_.warning(error);
    }
    end_standby("");  // nothing outlives the master
    for (auto& [pid, worker] : processes_) close_worker_handles(worker.release());
    processes_.clear();
    pending_forks_.clear();
    // Waiters still pending learn that no answer is coming.
    core::RolloverFinished stopped{{}, 0, false, "the master stopped", core::Duration{0}};
    auto waiters = std::move(waiters_);
    for (auto& [ticket, callback] : waiters) callback(stopped);
}

// ----- used by the control socket ----------------------------------------------------------

core::Ticket Master::request_reload(core::Trigger trigger, std::optional<std::string> release_dir) {
    core::Ticket ticket = next_ticket_++;
    // Where it would go as things are now, so that a HUP after `current` was pointed back at
    // v1 and a rollback to v1 count as one request (the release itself is resolved when the
    // rollover starts).
    std::string destination = release_dir.value_or(config_->chdir);
    if (auto real = os::real_path(destination); os::ok(real)) {
        destination = std::get<std::string>(real);
    }
    feed(core_.request_reload(now(), ticket, trigger, std::move(release_dir),
                              std::move(destination)));
    return ticket;
}

void Master::on_rollover_finished(core::Ticket ticket,
                                  std::function<void(const core::RolloverFinished&)> done) {
    if (auto it = finished_.find(ticket); it != finished_.end()) {
        auto result = it->second;
        finished_.erase(it);
        done(result);
        return;
    }
    waiters_.emplace(ticket, std::move(done));
}

void Master::scale(int workers) {
    feed(core_.scale(now(), workers));
}

void Master::stop(bool fast) {
    feed(core_.stop(now(), fast));
}

}  // namespace molt::loop
