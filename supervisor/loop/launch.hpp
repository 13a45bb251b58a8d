// A worker's launch spec, built in one place: the program and its arguments, the environment,
// the fds at their contract positions, the working directory and the identity (user/group).
// Pure functions of their inputs apart from the user/group lookup, so the rules about what a
// worker inherits live here once (molt::contract names them).
#pragma once

#include <optional>
#include <string>
#include <vector>

#include "supervisor/core/supervisor.hpp"
#include "supervisor/os/os.hpp"

namespace molt::loop {

// The master's environment without what belongs to the master alone (contract::is_scrubbed:
// systemd's NOTIFY_SOCKET, LISTEN_* and WATCHDOG_*, and molt's own MOLT_*). Every child the
// master starts (a worker, the binary-upgrade check) starts from this.
// user: and group: resolved to ids (group: wins over the user's primary group) into `request`;
// empty, or why a name does not resolve.
std::string resolve_identity(const config::Config& config, os::SpawnRequest& request);

std::vector<std::string> child_environment(const std::vector<std::string>& master_environment);

// The fds the caller made for this one worker.
struct WorkerStreams {
    int channel = -1;  // the worker's end of the channel
    int out = -1;      // write end of the stdout pipe
    int err = -1;      // write end of the stderr pipe
};

// Everything else a worker needs to be spawned.
struct WorkerLaunch {
    const core::SpawnWorker& spawn;
    const std::vector<os::Listener>& listeners;
    std::string shim_dir;                         // goes first on PYTHONPATH
    std::vector<std::string> master_environment;  // "KEY=VALUE", as os::environment() gives it
    bool zygote = false;               // the generation's zygote (MOLT_ZYGOTE=1), not a worker
    std::string app_metrics_dir = {};  // PROMETHEUS_MULTIPROC_DIR (metrics.app_multiprocess), or ""
    std::string tls_ticket_keys = {};  // MOLT_TLS_TICKET_KEYS (hex), or "" without a TLS listener
    int accept_board = -1;             // the master's accept board (after the channel), or -1
};

// The environment of one worker: the child environment, the config's `env:` over it, the
// shim's directory first on PYTHONPATH, and the contract's MOLT_* names.
std::vector<std::string> worker_environment(const WorkerLaunch& launch);

// The full spawn request; an error names what cannot be resolved (the python program, the
// user or the group).
os::Result<os::SpawnRequest> worker_spawn_request(const WorkerLaunch& launch,
                                                  const WorkerStreams& streams);

// The standby (loop/standby.cpp, molt_shim/standby.py): an interpreter forked by a zygote
// before its import, which the next generation's zygote launch can use instead of starting
// one, when nothing that acts at an interpreter's start differs.
//
// Per-generation variables: molt's MOLT_* and the app metrics directory. The standby is told
// their new values with START=; nothing reads them before the zygote's boot.
bool is_per_generation_variable(std::string_view entry);
// What a standby must share with the zygote launch it stands in for: the program (and the
// file it resolves to: a `python:` inside the release, a virtualenv's, may be another one
// after a deploy), its arguments, the user and group and the environment apart from the
// per-generation variables. nullopt when no standby may stand in for this launch: a relative
// PYTHONPATH entry would have been resolved in the directory the standby started in, or a
// value is not UTF-8.
std::optional<std::string> standby_key(const os::SpawnRequest& request,
                                       const std::string& resolved_program);
// START='s JSON: what turns a standby forked with `standby_env` into the zygote that
// `request` would have started: its working directory, the per-generation variables to
// set and the ones to remove (nullopt when a value is not UTF-8).
std::optional<std::string> standby_start(const os::SpawnRequest& request,
                                         const std::vector<std::string>& standby_env);

}  // namespace molt::loop
