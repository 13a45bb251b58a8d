// The master's log: one line per event, text or JSON, to stderr (journald) or a file.
// Every line about a generation or a worker carries gen= and pid=.
#pragma once

#include <cstdio>
#include <string>
#include <string_view>

#include "config/config.hpp"
#include "supervisor/core/supervisor.hpp"

namespace molt::loop {

// The slot a process without one is logged (and tracked) under.
inline constexpr int kZygoteSlot = -1;   // a generation's zygote (preload)
inline constexpr int kStandbySlot = -2;  // the standby (standby.cpp)

class Log {
  public:
    void configure(const config::Logging& logging);
    // Reopens the log file after logrotate moved it (USR1). Returns the error text, if any.
    std::string reopen();

    void write(core::LogLevel level, std::string_view text, std::uint64_t gen = 0, int pid = 0);
    // One line of a worker's stdout or stderr, tagged with where it came from: `slot` is the
    // worker's, or kZygoteSlot / kStandbySlot for the processes that have none.
    void worker_line(std::uint64_t gen, int slot, int pid, std::string_view stream,
                     std::string_view line);

    void info(std::string_view text) { write(core::LogLevel::info, text); }
    void warning(std::string_view text) { write(core::LogLevel::warning, text); }
    void error(std::string_view text) { write(core::LogLevel::error, text); }

    ~Log();

  private:
    void emit(std::string_view line);

    core::LogLevel level_ = core::LogLevel::info;
    config::LogFormat format_ = config::LogFormat::text;
    std::string path_;
    std::FILE* file_ = nullptr;  // null: stderr
};

}  // namespace molt::loop
