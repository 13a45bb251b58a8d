#include "supervisor/loop/launch.hpp"

#include <algorithm>
#include <nlohmann/json.hpp>
#include <string_view>

#include "config/config.hpp"
#include "supervisor/contract/worker_contract.hpp"

namespace molt::loop {

namespace {

std::string_view name_of(std::string_view entry) {
    return entry.substr(0, entry.find('='));
}

std::string assignment(std::string_view name, const std::string& value) {
    return std::string(name) + "=" + value;
}

std::string joined(const std::vector<std::string>& items) {
    std::string text;
    for (std::size_t i = 0; i < items.size(); ++i) text += (i ? "," : "") + items[i];
    return text;
}

// JSON text, or nullopt when a value is not UTF-8 (JSON cannot carry it unchanged).
std::optional<std::string> dumped(const nlohmann::json& value) {
    try {
        return value.dump();
    } catch (const nlohmann::json::exception&) {
        return std::nullopt;
    }
}

}  // namespace

// user: and group: resolved to ids; group: wins over the user's primary group.
std::string resolve_identity(const config::Config& config, os::SpawnRequest& request) {
    if (!config.user.empty()) {
        gid_t primary = 0;
        auto uid = os::lookup_user(config.user, &primary);
        if (!os::ok(uid)) return os::error_of(uid);
        request.uid = std::get<uid_t>(uid);
        request.user = config.user;
        request.gid = primary;
    }
    if (!config.group.empty()) {
        auto gid = os::lookup_group(config.group);
        if (!os::ok(gid)) return os::error_of(gid);
        request.gid = std::get<gid_t>(gid);
    }
    return {};
}

std::vector<std::string> child_environment(const std::vector<std::string>& master_environment) {
    std::vector<std::string> env;
    for (const auto& entry : master_environment) {
        // systemd's variables are the master's alone: a child must never notify systemd or
        // take the listening sockets as its own.
        if (!contract::is_scrubbed(name_of(entry))) env.push_back(entry);
    }
    return env;
}

std::vector<std::string> worker_environment(const WorkerLaunch& launch) {
    const core::SpawnWorker& spawn = launch.spawn;
    const config::Config& config = *spawn.release.config;
    std::vector<std::string> env;
    // The shim's directory first, then the config's `env: {PYTHONPATH: ...}`, which wins over
    // the master's own PYTHONPATH as any configured variable does.
    std::string inherited_pythonpath;
    for (auto& entry : child_environment(launch.master_environment)) {
        std::string_view name = name_of(entry);
        if (name == "PYTHONPATH") {
            inherited_pythonpath = entry.substr(name.size() + 1);
        } else if (!config.env.count(std::string(name))) {
            env.push_back(std::move(entry));
        }
    }
    auto configured = config.env.find("PYTHONPATH");
    std::string extra = configured != config.env.end() ? configured->second : inherited_pythonpath;
    std::string pythonpath = launch.shim_dir + (extra.empty() ? "" : ":" + extra);
    for (const auto& [key, value] : config.env) {
        if (key == "PYTHONPATH") continue;
        // molt owns the app's metrics directory when it marks dead workers and cleans up.
        if (key == "PROMETHEUS_MULTIPROC_DIR" && !launch.app_metrics_dir.empty()) continue;
        env.push_back(key + "=" + value);
    }
    if (!launch.app_metrics_dir.empty()) {
        env.push_back("PROMETHEUS_MULTIPROC_DIR=" + launch.app_metrics_dir);
    }

    std::vector<std::string> fds, names;
    for (std::size_t i = 0; i < launch.listeners.size(); ++i) {
        fds.push_back(std::to_string(contract::first_listen_fd + static_cast<int>(i)));
        names.push_back(launch.listeners[i].address.name);
    }
    int channel = contract::channel_fd_for(static_cast<int>(launch.listeners.size()));
    std::string config_json = config::worker_config_json(
        config, spawn.release.release_dir, spawn.release.version, spawn.generation, spawn.slot);
    env.push_back("PYTHONPATH=" + pythonpath);
    env.push_back("PYTHONUNBUFFERED=1");
    env.push_back(assignment(contract::env::channel_fd, std::to_string(channel)));
    env.push_back(assignment(contract::env::listen_fds, joined(fds)));
    env.push_back(assignment(contract::env::listen_names, joined(names)));
    env.push_back(assignment(contract::env::generation, std::to_string(spawn.generation)));
    env.push_back(assignment(contract::env::worker, std::to_string(spawn.slot)));
    env.push_back(assignment(contract::env::worker_config, config_json));
    if (launch.zygote) env.push_back(assignment(contract::env::zygote, "1"));
    if (!launch.tls_ticket_keys.empty()) {
        env.push_back(assignment(contract::env::tls_ticket_keys, launch.tls_ticket_keys));
    }
    if (launch.accept_board >= 0) {
        env.push_back(assignment(contract::env::accept_board_fd, std::to_string(channel + 1)));
    }
    return env;
}

os::Result<os::SpawnRequest> worker_spawn_request(const WorkerLaunch& launch,
                                                  const WorkerStreams& streams) {
    const config::Config& config = *launch.spawn.release.config;
    auto program = os::find_program(config.python);
    if (!os::ok(program)) return os::Error{os::error_of(program)};
    os::SpawnRequest request;
    request.program = std::get<0>(program);
    request.argv = {config.python, "-m", "molt_shim"};
    // The contract's fd layout: listeners from first_listen_fd in config order, then the
    // channel (spawn_process places request.fds at 3, 4, ... in this order).
    static_assert(contract::first_listen_fd == 3);
    for (const auto& listener : launch.listeners) request.fds.push_back(listener.fd.get());
    request.fds.push_back(streams.channel);
    if (launch.accept_board >= 0) request.fds.push_back(launch.accept_board);
    request.env = worker_environment(launch);
    request.stdout_fd = streams.out;
    request.stderr_fd = streams.err;
    // A release shipped as one archive (zip, .pyz) runs from the directory that holds it.
    const std::string& dir = launch.spawn.release.release_dir;
    request.cwd = os::is_regular_file(dir) ? dir.substr(0, dir.rfind('/')) : dir;
    if (auto error = resolve_identity(config, request); !error.empty()) return os::Error{error};
    return request;
}

bool is_per_generation_variable(std::string_view entry) {
    std::string_view name = name_of(entry);
    return name.substr(0, 5) == "MOLT_" || name == "PROMETHEUS_MULTIPROC_DIR";
}

std::optional<std::string> standby_key(const os::SpawnRequest& request,
                                       const std::string& resolved_program) {
    std::vector<std::string> env;
    for (const auto& entry : request.env) {
        if (name_of(entry) == "PYTHONPATH") {
            std::string_view paths = std::string_view(entry).substr(entry.find('=') + 1);
            for (std::size_t start = 0; start <= paths.size();) {
                std::size_t end = std::min(paths.find(':', start), paths.size());
                if (end > start && paths[start] != '/') return std::nullopt;
                start = end + 1;
            }
        }
        if (!is_per_generation_variable(entry)) env.push_back(entry);
    }
    std::sort(env.begin(), env.end());
    nlohmann::json key{{"program", request.program},
                       {"resolved_program", resolved_program},
                       {"argv", request.argv},
                       {"env", env},
                       {"uid", request.uid ? static_cast<long long>(*request.uid) : -1},
                       {"gid", request.gid ? static_cast<long long>(*request.gid) : -1},
                       {"user", request.user}};
    return dumped(key);
}

std::optional<std::string> standby_start(const os::SpawnRequest& request,
                                         const std::vector<std::string>& standby_env) {
    nlohmann::json set = nlohmann::json::object();
    std::vector<std::string> names;
    for (const auto& entry : request.env) {
        if (!is_per_generation_variable(entry)) continue;
        std::string_view name = name_of(entry);
        set[std::string(name)] = entry.substr(name.size() + 1);
        names.emplace_back(name);
    }
    nlohmann::json drop = nlohmann::json::array();
    for (const auto& entry : standby_env) {
        std::string name(name_of(entry));
        if (is_per_generation_variable(entry) &&
            std::find(names.begin(), names.end(), name) == names.end()) {
            drop.push_back(name);
        }
    }
    nlohmann::json start{{"cwd", request.cwd}, {"env", set}, {"drop", drop}};
    return dumped(start);
}

}  // namespace molt::loop
