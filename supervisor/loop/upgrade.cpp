// Binary upgrade on SIGUSR2: the master re-executes itself in place, so its PID (systemd's
// MainPID) never changes, and the new image adopts the listeners and the live generation's
// workers without restarting them.
//
//   1. Only from a steady state (one live generation, every worker ready): a handover in the
//      middle of a rollover would have to serialise half-made decisions.
//   2. The new binary is first run in a child as `molt upgrade-check [-c FILE]`: it must start,
//      load the config with its own loader and exit 0. If not, nothing changes.
//   3. The state goes into MOLT_UPGRADE_STATE (JSON), the fds it names lose close-on-exec,
//      every signal is blocked (the mask survives exec, so a HUP in the gap stays pending
//      instead of killing the master with the default action), and execve() runs.
//   4. The new image finds MOLT_UPGRADE_STATE and calls run_adopted() instead of binding.
#include <fcntl.h>
#include <fmt/format.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>

#include "supervisor/loop/master.hpp"
#include "supervisor/loop/servers.hpp"
#include "supervisor/loop/worker_process.hpp"

extern char** environ;

namespace molt::loop {

namespace {

using json = nlohmann::json;

void set_cloexec(int fd, bool on) {
    int flags = fcntl(fd, F_GETFD);
    if (flags >= 0) fcntl(fd, F_SETFD, on ? flags | FD_CLOEXEC : flags & ~FD_CLOEXEC);
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
    auto [read_end, write_end] = std::get<os::Pipe>(pipe);
    os::SpawnRequest request;
    request.program = options_.executable;
    request.argv = {options_.executable, "upgrade-check"};
    if (!options_.config_path.empty()) {
        request.argv.push_back("-c");
        request.argv.push_back(options_.config_path);
    }
    // The check child is not the service: it must not talk to systemd or take its sockets.
    for (char** entry = environ; *entry; ++entry) {
        std::string item = *entry;
        if (item.rfind("NOTIFY_SOCKET=", 0) == 0 || item.rfind("LISTEN_", 0) == 0 ||
            item.rfind("WATCHDOG_", 0) == 0) {
            continue;
        }
        request.env.push_back(std::move(item));
    }
    // The new binary parses the very state it would adopt, with its own code, before any exec.
    request.env.push_back("MOLT_UPGRADE_STATE_CHECK=" +
                          upgrade_state().dump(-1, ' ', false, json::error_handler_t::replace));
    request.stdout_fd = write_end;
    request.stderr_fd = write_end;
    auto pid = os::spawn_process(request);
    os::close_fd(write_end);
    if (!os::ok(pid)) {
        os::close_fd(read_end);
        log_.error("binary upgrade aborted: " + os::error_of(pid));
        return;
    }
    fcntl(read_end, F_SETFL, fcntl(read_end, F_GETFL) | O_NONBLOCK);
    upgrade_check_pid_ = std::get<pid_t>(pid);
    upgrade_check_fd_ = read_end;
    uv_timer_start(
        &upgrade_timer_,
        [](uv_timer_t* t) {
            auto* master = static_cast<Master*>(t->data);
            if (master->upgrade_check_pid_ <= 0) return;
            master->log_.error("binary upgrade: the check did not finish within 30s; killing it");
            os::send_signal(master->upgrade_check_pid_, SIGKILL);  // its exit aborts the upgrade
        },
        30000, 0);
    log_.info(fmt::format("binary upgrade: checking {} (pid {})", options_.executable,
                          upgrade_check_pid_));
}

void Master::finish_upgrade_check(int status) {
    uv_timer_stop(&upgrade_timer_);
    std::string output;
    char buffer[4096];
    for (int rounds = 0; rounds < 16; ++rounds) {
        ssize_t n = ::read(upgrade_check_fd_, buffer, sizeof buffer);
        if (n <= 0) break;
        output.append(buffer, static_cast<size_t>(n));
    }
    os::close_fd(upgrade_check_fd_);
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

json Master::upgrade_state() const {
    json listeners = json::array();
    for (const auto& l : listeners_) {
        listeners.push_back(json{{"fd", l.fd},
                                 {"text", l.address.text},
                                 {"name", l.address.name},
                                 {"path", l.address.path},
                                 {"bound", l.bound},
                                 {"from_systemd", l.from_systemd},
                                 {"remove_on_exit", l.remove_on_exit}});
    }
    const core::Generation& gen = core_.generations().at(*core_.live_generation());
    json workers = json::array();
    for (const auto& [id, w] : core_.workers()) {
        auto it = processes_.find(w.pid);
        if (it == processes_.end()) continue;
        const WorkerProcess& p = *it->second;
        workers.push_back(json{{"pid", w.pid},
                               {"slot", w.slot},
                               {"channel_fd", p.channel_fd},
                               {"out_fd", p.out_fd()},
                               {"err_fd", p.err_fd()},
                               {"requests", w.counters.requests},
                               {"rss", w.counters.rss}});
    }
    json history = json::array();
    for (const auto& h : core_.history()) {
        history.push_back(json{{"id", h.id},
                               {"release_dir", h.release_dir},
                               {"version", h.version},
                               {"digest", h.digest},
                               {"trigger", static_cast<int>(h.trigger)},
                               {"started_at", h.started_at.count()},
                               {"live_at", h.live_at ? json(h.live_at->count()) : json(nullptr)},
                               {"state", static_cast<int>(h.state)},
                               {"failure", h.failure}});
    }
    json restarts = json::object();
    for (const auto& [reason, n] : core_.restarts()) {
        restarts[std::to_string(static_cast<int>(reason))] = n;
    }
    return json{{"from_build", options_.build},
                {"started_at", started_at_.count()},
                {"wall_started_at", wall_started_at_},
                {"listeners", listeners},
                {"generation",
                 {{"id", gen.id},
                  {"release_dir", gen.release.release_dir},
                  {"version", gen.release.version},
                  {"digest", gen.release.digest},
                  {"trigger", static_cast<int>(gen.trigger)},
                  {"target", gen.target}}},
                {"workers", workers},
                {"history", history},
                {"restarts", restarts},
                {"rollovers_ok", core_.rollovers(true)},
                {"rollovers_failed", core_.rollovers(false)},
                {"retired_requests", retired_requests_},
                {"next_ticket", next_ticket_}};
}

std::vector<int> Master::handed_over_fds() const {
    std::vector<int> fds;
    for (const auto& l : listeners_) fds.push_back(l.fd);
    for (const auto& [pid, p] : processes_) {
        for (int fd : {p->channel_fd, p->out_fd(), p->err_fd()}) {
            if (fd >= 0) fds.push_back(fd);
        }
    }
    return fds;
}

void Master::exec_new_image(const std::string& new_version) {
    std::string state = upgrade_state().dump(-1, ' ', false, json::error_handler_t::replace);
    std::vector<std::string> env;
    for (char** entry = environ; *entry; ++entry) {
        if (std::strncmp(*entry, "MOLT_UPGRADE_STATE=", 19) != 0) env.emplace_back(*entry);
    }
    env.push_back("MOLT_UPGRADE_STATE=" + state);
    std::vector<char*> envp, argv;
    for (auto& e : env) envp.push_back(e.data());
    envp.push_back(nullptr);
    std::vector<std::string> args = options_.argv;
    for (auto& a : args) argv.push_back(a.data());
    argv.push_back(nullptr);

    auto fds = handed_over_fds();
    for (int fd : fds) set_cloexec(fd, false);
    log_.info(
        fmt::format("binary upgrade: {} passed its check ({}); re-executing in place, pid {} "
                    "stays, {} worker(s) stay",
                    options_.executable, new_version, getpid(), core_.workers().size()));
    sigset_t all, old;
    sigfillset(&all);
    sigprocmask(SIG_BLOCK, &all, &old);
    ::execve(options_.executable.c_str(), argv.data(), envp.data());
    int err = errno;
    sigprocmask(SIG_SETMASK, &old, nullptr);
    for (int fd : fds) set_cloexec(fd, true);
    log_.error(fmt::format("binary upgrade aborted: {}; this master keeps running",
                           os::failed("execve(" + options_.executable + ")", err)));
}

int Master::run_adopted(const std::string& text) {
    if (std::string problem = validate_upgrade_state(text); !problem.empty()) {
        // Nothing sane to adopt: the workers see EOF on their channels and drain by themselves.
        log_.error("binary upgrade failed: MOLT_UPGRADE_STATE " + problem + "; exiting");
        return 1;
    }
    try {
        return adopt(json::parse(text));
    } catch (const std::exception& e) {
        log_.error(std::string("binary upgrade failed while adopting: ") + e.what() + "; exiting");
        return 1;
    }
}

std::string validate_upgrade_state(const std::string& text) {
    json state = json::parse(text, nullptr, false);
    if (state.is_discarded() || !state.is_object()) return "is not a JSON object";
    using T = json::value_t;
    auto need = [](const json& object,
                   std::initializer_list<std::pair<const char*, T>> fields) -> std::string {
        if (!object.is_object()) return "has an entry that is not an object";
        for (const auto& [name, type] : fields) {
            if (!object.contains(name)) return std::string("lacks \"") + name + "\"";
            bool fits = type == T::number_integer ? object[name].is_number_integer()
                                                  : object[name].type() == type;
            if (!fits) return std::string("has a wrong type for \"") + name + "\"";
        }
        return {};
    };
    std::string problem = need(state, {{"generation", T::object},
                                       {"listeners", T::array},
                                       {"workers", T::array},
                                       {"history", T::array},
                                       {"restarts", T::object}});
    if (!problem.empty()) return problem;
    problem = need(state["generation"], {{"id", T::number_integer},
                                         {"release_dir", T::string},
                                         {"version", T::string},
                                         {"digest", T::string},
                                         {"trigger", T::number_integer},
                                         {"target", T::number_integer}});
    for (const auto& l : state["listeners"]) {
        if (!problem.empty()) break;
        problem = need(l, {{"fd", T::number_integer},
                           {"text", T::string},
                           {"name", T::string},
                           {"path", T::string},
                           {"bound", T::string},
                           {"from_systemd", T::boolean},
                           {"remove_on_exit", T::boolean}});
    }
    for (const auto& w : state["workers"]) {
        if (!problem.empty()) break;
        problem = need(w, {{"pid", T::number_integer},
                           {"slot", T::number_integer},
                           {"channel_fd", T::number_integer},
                           {"out_fd", T::number_integer},
                           {"err_fd", T::number_integer}});
    }
    for (const auto& h : state["history"]) {
        if (!problem.empty()) break;
        problem = need(h, {{"id", T::number_integer},
                           {"release_dir", T::string},
                           {"version", T::string},
                           {"digest", T::string},
                           {"trigger", T::number_integer},
                           {"started_at", T::number_integer},
                           {"state", T::number_integer},
                           {"failure", T::string}});
    }
    return problem;
}

int Master::adopt(const json& state) {
    started_at_ = core::Time(state.value("started_at", std::int64_t{0}));
    wall_started_at_ = state.value("wall_started_at", std::uint64_t{0});
    retired_requests_ = state.value("retired_requests", std::uint64_t{0});
    next_ticket_ = state.value("next_ticket", core::Ticket{1});
    for (const auto& l : state["listeners"]) {
        os::Listener listener;
        listener.fd = l["fd"];
        listener.address.text = l["text"];
        listener.address.name = l["name"];
        listener.address.path = l["path"];
        listener.address.kind = listener.address.path.empty()
                                    ? config::ListenAddress::Kind::tcp
                                    : config::ListenAddress::Kind::unix_path;
        listener.bound = l["bound"];
        listener.from_systemd = l["from_systemd"];
        listener.remove_on_exit = l["remove_on_exit"];
        set_cloexec(listener.fd, true);
        listeners_.push_back(listener);
    }

    const json& g = state["generation"];
    core::AdoptedState adopted;
    adopted.generation = g["id"];
    adopted.trigger = static_cast<core::Trigger>(g["trigger"].get<int>());
    adopted.target = g["target"];
    adopted.release.config = config_;
    adopted.release.release_dir = g["release_dir"];
    adopted.release.version = g["version"];
    adopted.release.digest = g["digest"];
    for (const auto& w : state["workers"]) {
        pid_t pid = w["pid"];
        int slot = w["slot"];
        int channel = w["channel_fd"], out = w["out_fd"], err = w["err_fd"];
        for (int fd : {channel, out, err}) set_cloexec(fd, true);
        track_process(adopted.generation, slot, pid, channel, out, err);
        core::AdoptedWorker worker;
        worker.pid = pid;
        worker.slot = slot;
        worker.counters.requests = w.value("requests", std::uint64_t{0});
        worker.counters.rss = w.value("rss", std::uint64_t{0});
        adopted.workers.push_back(worker);
    }
    for (const auto& h : state["history"]) {
        core::HistoryEntry entry;
        entry.id = h["id"];
        entry.release_dir = h["release_dir"];
        entry.version = h["version"];
        entry.digest = h["digest"];
        entry.trigger = static_cast<core::Trigger>(h["trigger"].get<int>());
        entry.started_at = core::Time(h["started_at"].get<std::int64_t>());
        if (!h["live_at"].is_null()) entry.live_at = core::Time(h["live_at"].get<std::int64_t>());
        entry.state = static_cast<core::GenerationState>(h["state"].get<int>());
        entry.failure = h["failure"];
        adopted.history.push_back(entry);
    }
    for (const auto& [reason, n] : state["restarts"].items()) {
        adopted.restarts[static_cast<core::RestartReason>(std::stoi(reason))] = n;
    }
    adopted.rollovers_ok = state.value("rollovers_ok", std::uint64_t{0});
    adopted.rollovers_failed = state.value("rollovers_failed", std::uint64_t{0});

    if (auto error = start_services(); !error.empty()) {
        // The workers are serving; losing the control socket must not take them down.
        log_.error("after the binary upgrade: " + error);
    }
    log_.info(fmt::format("binary upgrade complete: now molt {} build {} (was build {}), pid {}",
                          options_.version, options_.build, state.value("from_build", "?"),
                          getpid()));
    feed(core_.adopt(now(), std::move(adopted)));
    // Children that exited while no image was listening for SIGCHLD are reaped now; then the
    // signals held back across exec are let through to the new handlers.
    reap_children();
    sigset_t all;
    sigfillset(&all);
    sigprocmask(SIG_UNBLOCK, &all, nullptr);
    uv_run(&loop_, UV_RUN_DEFAULT);
    return exit_code_.value_or(1);
}

}  // namespace molt::loop
