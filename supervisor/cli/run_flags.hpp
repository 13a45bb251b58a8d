// The flags of `molt run`: the one table that says what each flag means in molt. A flag
// either sets a config key (molt's own flags, and gunicorn's where molt has the feature), or
// is refused with a text naming molt's equivalent. main.cpp turns the table into parser
// options, docs/man/molt.1 and docs/migrating-from-gunicorn.md list it, and
// tests/integration/test_cli.py checks every row against the real binary.
#pragma once

#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "config/config.hpp"

namespace molt::cli {

// What one value of a flag becomes.
struct Translation {
    std::optional<config::Setting> setting;  // none: molt's default already means it
    std::string refusal;                     // not empty: refused (usage error), says why
};

struct RunFlag {
    std::string_view names;       // CLI11 spelling: "-w,--workers"
    std::string_view value_name;  // shown in --help; empty for a switch
    std::string_view key;         // the config key it sets (or the one to use instead)
    std::string_view help;
    // gunicorn's value to molt's; null when the value is the key's value as written.
    Translation (*translate)(const std::string& value) = nullptr;
    std::string_view refusal = {};  // not empty: molt lacks the feature whatever the value
};

const std::vector<RunFlag>& run_flags();

// The setting (or refusal) for one value of `flag`; a switch is passed "true".
Translation translate(const RunFlag& flag, const std::string& value);

}  // namespace molt::cli
