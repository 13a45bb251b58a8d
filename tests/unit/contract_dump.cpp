// Prints the C++ side of the master <-> worker contract (supervisor/contract/worker_contract.hpp)
// as JSON, in exactly the shape of the shim's molt_shim.contract.as_json(), so that
// tests/integration/test_contract.py can compare the two sides.
#include <iostream>
#include <nlohmann/json.hpp>
#include <string>

#include "supervisor/contract/worker_contract.hpp"

namespace contract = molt::contract;

namespace {

template <typename Names>
nlohmann::json strings(const Names& names) {
    nlohmann::json list = nlohmann::json::array();
    for (std::string_view name : names) list.push_back(std::string(name));
    return list;
}

}  // namespace

int main() {
    // The enum's names, as the shim spells its IntEnum members (lower case).
    nlohmann::json exits = {
        {"ok", static_cast<int>(contract::WorkerExit::ok)},
        {"import_failed", static_cast<int>(contract::WorkerExit::import_failed)},
        {"warmup_failed", static_cast<int>(contract::WorkerExit::warmup_failed)},
        {"lifespan_failed", static_cast<int>(contract::WorkerExit::lifespan_failed)},
    };
    nlohmann::json dump = {
        {"exit", exits},
        {"worker_to_master_keys", strings(contract::worker_to_master_keys)},
        {"master_to_worker_keys", strings(contract::master_to_worker_keys)},
        {"worker_env_names", strings(contract::worker_env_names)},
        {"scrubbed_names", strings(contract::scrubbed_names)},
        {"scrubbed_prefixes", strings(contract::scrubbed_prefixes)},
        {"first_listen_fd", contract::first_listen_fd},
    };
    std::cout << dump.dump(2) << "\n";
    return 0;
}
