// The master ⇄ worker contract, C++ side: message keys, exit codes, environment names and the
// fd layout a worker is started with. The Python side is worker_shim/molt_shim/contract.py;
// tests/integration/test_contract.py fails when the two disagree (it compares this header, as
// dumped by the molt_contract_dump test binary, with the Python module). docs/protocol.md is the
// prose form of the same facts.
#pragma once

#include <array>
#include <cstddef>
#include <functional>
#include <map>
#include <string>
#include <string_view>

namespace molt::contract {

// How a worker process ends. Anything else is a crash.
enum class WorkerExit : int {
    ok = 0,               // drained (or asked to stop) and exited cleanly
    import_failed = 3,    // the app (or the shim, or uvicorn for ASGI) could not be imported
    warmup_failed = 4,    // the warm-up request did not pass
    lifespan_failed = 5,  // the app's ASGI lifespan startup failed
};

// What a known exit code means, for log lines and rollover failures; nullptr when unknown.
constexpr const char* describe(int exit_code) {
    switch (exit_code) {
        case static_cast<int>(WorkerExit::import_failed):
            return "app import failed";
        case static_cast<int>(WorkerExit::warmup_failed):
            return "warm-up request failed";
        case static_cast<int>(WorkerExit::lifespan_failed):
            return "ASGI lifespan startup failed";
        default:
            return nullptr;
    }
}

// Message keys (sd_notify syntax, KEY=VALUE lines, one message per SEQPACKET packet).
// A message's sd_notify-style "KEY=VALUE" lines; a line without `=` is ignored, a repeated
// key keeps its last value.
inline std::map<std::string, std::string, std::less<>> parse_message(std::string_view text) {
    std::map<std::string, std::string, std::less<>> fields;
    while (!text.empty()) {
        auto end = text.find('\n');
        auto line = text.substr(0, end);
        if (auto eq = line.find('='); eq != std::string_view::npos) {
            fields[std::string(line.substr(0, eq))] = std::string(line.substr(eq + 1));
        }
        if (end == std::string_view::npos) break;
        text.remove_prefix(end + 1);
    }
    return fields;
}

namespace key {
// worker -> master
inline constexpr std::string_view ready = "READY";          // booted and warm: counts as ready
inline constexpr std::string_view watchdog = "WATCHDOG";    // heartbeat
inline constexpr std::string_view requests = "REQUESTS";    // requests served so far
inline constexpr std::string_view inflight = "INFLIGHT";    // requests being served now
inline constexpr std::string_view oldest_ms = "OLDEST_MS";  // age of the oldest in flight
inline constexpr std::string_view rss = "RSS";              // resident set size in bytes
inline constexpr std::string_view error = "ERROR";          // one-line boot failure reason
inline constexpr std::string_view retire = "RETIRE";        // asks to be replaced, with why
inline constexpr std::string_view stopping = "STOPPING";    // stopped accepting (drain began)
// zygote -> master (the zygote also sends READY and ERROR, with a worker's meaning)
inline constexpr std::string_view forked = "FORKED";  // FORK=<id> done: with PID= or FORK_ERROR=
inline constexpr std::string_view pid = "PID";        // the forked worker's pid
inline constexpr std::string_view fork_error = "FORK_ERROR";  // why FORK=<id> produced no worker
inline constexpr std::string_view preload_refused =
    "PRELOAD_REFUSED";  // preload: auto found the import unsafe to fork (says why); exits 0
// Request durations by status class, cumulative: core/request_stats.hpp has the wire form.
inline constexpr std::string_view durations = "DURATIONS";
inline constexpr std::string_view exceptions = "EXCEPTIONS";  // exceptions raised by the app
// zygote -> master: STANDBY= done, the standby's pid (or STANDBY_ERROR= saying why not)
inline constexpr std::string_view standby_pid = "STANDBY_PID";
inline constexpr std::string_view standby_error = "STANDBY_ERROR";
// zygote -> master: the pid of its spare (a worker forked ahead, waiting for the next FORK=),
// once it waits; 0 once it was handed a request or found dead
inline constexpr std::string_view spare_pid = "SPARE_PID";
// master -> worker
inline constexpr std::string_view drain = "DRAIN";              // stop accepting, finish, exit 0
inline constexpr std::string_view reopen_logs = "REOPEN_LOGS";  // reopen log files
// master -> zygote: fork the worker <id> (with SLOT=), its channel and stdout/stderr pipes
// attached as SCM_RIGHTS in that order
inline constexpr std::string_view fork = "FORK";
inline constexpr std::string_view slot = "SLOT";
// master -> zygote, before its import: fork a standby (the next generation's zygote, paused
// before the import) on the channel, stdout and stderr sent as SCM_RIGHTS.
inline constexpr std::string_view standby = "STANDBY";
// master -> standby: become this generation's zygote. JSON: {"cwd": the release directory,
// "env": the variables that differ, "drop": the variables to remove}.
inline constexpr std::string_view start = "START";
}  // namespace key

inline constexpr std::array<std::string_view, 18> worker_to_master_keys = {
    key::ready,       key::watchdog,      key::requests,        key::inflight,  key::oldest_ms,
    key::rss,         key::error,         key::retire,          key::stopping,  key::forked,
    key::pid,         key::fork_error,    key::preload_refused, key::durations, key::exceptions,
    key::standby_pid, key::standby_error, key::spare_pid};
inline constexpr std::array<std::string_view, 6> master_to_worker_keys = {
    key::drain, key::reopen_logs, key::fork, key::slot, key::standby, key::start};

// The environment a worker is started with.
namespace env {
inline constexpr std::string_view channel_fd = "MOLT_CHANNEL_FD";
inline constexpr std::string_view listen_fds = "MOLT_LISTEN_FDS";      // e.g. "3,4"
inline constexpr std::string_view listen_names = "MOLT_LISTEN_NAMES";  // ","-separated, one per fd
inline constexpr std::string_view generation = "MOLT_GENERATION";
inline constexpr std::string_view worker = "MOLT_WORKER";                // the slot
inline constexpr std::string_view worker_config = "MOLT_WORKER_CONFIG";  // JSON
// "1": this process is its generation's zygote (imports, then forks workers on FORK=)
inline constexpr std::string_view zygote = "MOLT_ZYGOTE";
// 160 hex digits: the generation's TLS session-ticket keys, the same in each of its workers so
// that a client resumes its session on whichever worker it reaches. Only with a TLS listener.
inline constexpr std::string_view tls_ticket_keys = "MOLT_TLS_TICKET_KEYS";
// The master's accept board, shared memory where each worker says how many connections it
// holds, so that a generation's workers keep their share of them (native engine). The fd
// follows the channel.
inline constexpr std::string_view accept_board_fd = "MOLT_ACCEPT_BOARD_FD";
}  // namespace env

inline constexpr std::array<std::string_view, 9> worker_env_names = {
    env::channel_fd,    env::listen_fds, env::listen_names,    env::generation,     env::worker,
    env::worker_config, env::zygote,     env::tls_ticket_keys, env::accept_board_fd};

// The accept board's size: one 64-byte entry per worker process, for both generations of a
// rollover.
inline constexpr std::size_t accept_board_bytes = 256 * 64;

// Variables of the master's own environment that never reach a worker: they belong to the
// master's supervisor (systemd) or to the master itself. A variable is removed when its name
// equals one of `scrubbed_names` or starts with one of `scrubbed_prefixes`.
inline constexpr std::array<std::string_view, 1> scrubbed_names = {"NOTIFY_SOCKET"};
inline constexpr std::array<std::string_view, 3> scrubbed_prefixes = {"LISTEN_", "WATCHDOG_",
                                                                      "MOLT_"};

constexpr bool is_scrubbed(std::string_view name) {
    for (auto exact : scrubbed_names)
        if (name == exact) return true;
    for (auto prefix : scrubbed_prefixes)
        if (name.substr(0, prefix.size()) == prefix) return true;
    return false;
}

// The fd layout: listeners at first_listen_fd, first_listen_fd + 1, ... in config order, and
// the channel right after the last listener.
inline constexpr int first_listen_fd = 3;
constexpr int channel_fd_for(int listener_count) {
    return first_listen_fd + listener_count;
}

}  // namespace molt::contract
