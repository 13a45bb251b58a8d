#include "supervisor/loop/log.hpp"

#include <fmt/format.h>

#include <cerrno>
#include <cstring>
#include <ctime>
#include <nlohmann/json.hpp>

#include "supervisor/os/os.hpp"

namespace molt::loop {

namespace {

const char* level_name(core::LogLevel level) {
    switch (level) {
        case core::LogLevel::debug:
            return "debug";
        case core::LogLevel::info:
            return "info";
        case core::LogLevel::warning:
            return "warning";
        case core::LogLevel::error:
            return "error";
    }
    return "info";
}

core::LogLevel from_config(config::LogLevel level) {
    switch (level) {
        case config::LogLevel::debug:
            return core::LogLevel::debug;
        case config::LogLevel::info:
            return core::LogLevel::info;
        case config::LogLevel::warning:
            return core::LogLevel::warning;
        case config::LogLevel::error:
            return core::LogLevel::error;
    }
    return core::LogLevel::info;
}

std::string timestamp() {
    std::uint64_t now_us = os::wall_clock_us();
    auto seconds = static_cast<std::time_t>(now_us / 1000000);
    std::tm tm{};
    gmtime_r(&seconds, &tm);
    char buffer[32];
    std::strftime(buffer, sizeof buffer, "%Y-%m-%dT%H:%M:%S", &tm);
    return fmt::format("{}.{:03d}Z", buffer, static_cast<int>(now_us / 1000 % 1000));
}

}  // namespace

void Log::configure(const config::Logging& logging) {
    level_ = from_config(logging.level);
    format_ = logging.format;
    if (logging.file != path_) {
        path_ = logging.file;
        std::string error = reopen();
        if (!error.empty()) write(core::LogLevel::error, error);
    }
}

std::string Log::reopen() {
    if (path_.empty()) {
        if (file_) std::fclose(file_);
        file_ = nullptr;
        return {};
    }
    std::FILE* next = std::fopen(path_.c_str(), "ae");  // e: not inherited by an exec
    if (next == nullptr) {
        return fmt::format("fopen({}) failed: {}; logging continues to the old file", path_,
                           std::strerror(errno));
    }
    std::setvbuf(next, nullptr, _IOLBF, 0);
    if (file_) std::fclose(file_);
    file_ = next;
    return {};
}

Log::~Log() {
    if (file_) std::fclose(file_);
}

void Log::emit(std::string_view line) {
    std::FILE* out = file_ ? file_ : stderr;
    // A full disk must not stop the master: a failed write is dropped, not retried.
    std::fwrite(line.data(), 1, line.size(), out);
    std::fflush(out);
}

void Log::write(core::LogLevel level, std::string_view text, std::uint64_t gen, int pid) {
    if (level < level_) return;
    if (format_ == config::LogFormat::json) {
        nlohmann::json line{
            {"ts", timestamp()}, {"level", level_name(level)}, {"source", "master"}};
        if (gen) line["gen"] = gen;
        if (pid) line["pid"] = pid;
        line["msg"] = std::string(text);
        emit(line.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace) + "\n");
        return;
    }
    std::string prefix = fmt::format("{} {:<7}", timestamp(), level_name(level));
    if (gen) prefix += fmt::format(" gen={}", gen);
    if (pid) prefix += fmt::format(" pid={}", pid);
    emit(fmt::format("{} {}\n", prefix, text));
}

namespace {

// A non-empty JSON object on one line (a worker's structured line), checked without building it.
bool is_json_object(std::string_view line) {
    return line.size() > 2 && line.front() == '{' && line.back() == '}' && line[1] != '}' &&
           nlohmann::json::accept(line);
}

}  // namespace

void Log::worker_line(std::uint64_t gen, int slot, int pid, std::string_view stream,
                      std::string_view line) {
    std::string_view source = slot == kZygoteSlot    ? "zygote"
                              : slot == kStandbySlot ? "standby"
                                                     : "worker";
    if (format_ == config::LogFormat::json) {
        nlohmann::json out{{"ts", timestamp()},
                           {"level", stream == "stderr" ? "warning" : "info"},
                           {"source", std::string(source)},
                           {"stream", std::string(stream)},
                           {"gen", gen},
                           {"worker", slot},
                           {"pid", pid}};
        if (stream == "stdout" && is_json_object(line)) {
            // The worker's structured line (the access log under `format: json`): its fields
            // join ours in one flat object. Spliced, not re-serialised: the master checks it
            // is one valid object and copies the bytes.
            std::string head = out.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace);
            head.pop_back();  // the closing brace
            emit(head + "," + std::string(line.substr(1)) + "\n");
            return;
        }
        out["msg"] = std::string(line);
        emit(out.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace) + "\n");
        return;
    }
    if (slot < 0) {
        emit(fmt::format("{} {:<7} gen={} pid={} {}: {}\n", timestamp(), source, gen, pid, stream,
                         line));
        return;
    }
    emit(fmt::format("{} worker  gen={} worker={} pid={} {}: {}\n", timestamp(), gen, slot, pid,
                     stream, line));
}

}  // namespace molt::loop
