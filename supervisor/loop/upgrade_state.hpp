// What one master image hands to the next across a binary upgrade (MOLT_UPGRADE_STATE), and
// its JSON form. The form is versioned ("format") and stores every enum by its to_string name,
// so a new binary that adds or reorders an enum value still reads an old state right, and a
// state it cannot read (another format, a name it does not know) is refused by
// `molt upgrade-check` before the old master execs, while the old master keeps running.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "config/config.hpp"
#include "supervisor/core/supervisor.hpp"
#include "supervisor/os/os.hpp"

namespace molt::loop {

// Bump when a field changes meaning or becomes required; parse_upgrade_state reads only this.
inline constexpr int kUpgradeStateFormat = 1;

// The environment variables that carry the state: to the new image across exec, and to the
// `molt upgrade-check` child that proves the new binary can read it.
inline constexpr const char* kStateVariable = "MOLT_UPGRADE_STATE";
inline constexpr const char* kCheckStateVariable = "MOLT_UPGRADE_STATE_CHECK";

struct HandedOverListener {
    int fd = -1;  // stays open across exec
    config::ListenAddress address;
    std::string bound;
    bool from_systemd = false;
    bool remove_on_exit = false;
};

struct HandedOverWorker {
    core::AdoptedWorker worker;
    int channel_fd = -1;  // these three stay open across exec
    int out_fd = -1;
    int err_fd = -1;
};

struct UpgradeState {
    std::string from_build;
    std::int64_t started_at = 0;  // on the loop's monotonic clock, in ms
    std::uint64_t wall_started_at = 0;
    std::uint64_t retired_requests = 0;
    core::Ticket next_ticket = 1;
    std::vector<HandedOverListener> listeners;
    std::vector<HandedOverWorker> workers;
    // The live generation's ready zygote (preload), when it has one; its slot is unused. The
    // field and the workers' "forked" are optional in the JSON form, so format 1 states of
    // builds without a zygote still read (and mean: no zygote).
    std::optional<HandedOverWorker> zygote;
    core::Pid zygote_spare = 0;  // its spare (SPARE_PID=), for status; optional in the JSON
    std::string zygote_fallback;
    // The accept board (worker_shim/native/accept_balance.hpp), or -1: the adopted workers
    // and the ones the new image starts keep balancing on the same one. Optional in the JSON.
    int accept_board_fd = -1;
    // The live generation, history and counters. Its `workers` stay empty (they are in
    // `workers` above, with their fds) and its release's config is the new image's own.
    core::AdoptedState adopted;
};

std::string serialise_upgrade_state(const UpgradeState& state);

// The state, or why this binary cannot adopt it, as a phrase that follows "the state ...":
// "is format 7; this molt reads format 1", "has an unknown trigger \"teleport\"".
os::Result<UpgradeState> parse_upgrade_state(const std::string& text);

}  // namespace molt::loop
