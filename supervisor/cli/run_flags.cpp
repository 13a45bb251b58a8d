#include "supervisor/cli/run_flags.hpp"

#include <fmt/format.h>

#include <array>

namespace molt::cli {

namespace {

Translation set(std::string key, std::string value) {
    return {config::Setting{std::move(key), std::move(value)}, {}};
}

Translation refuse(std::string why) {
    return {std::nullopt, std::move(why)};
}

// gunicorn's worker classes that molt serves, by the interface that serves them.
constexpr std::array<std::string_view, 4> kWsgiWorkers = {
    "sync", "gthread", "gunicorn.workers.sync.SyncWorker", "gunicorn.workers.gthread.ThreadWorker"};
constexpr std::array<std::string_view, 4> kAsgiWorkers = {
    "uvicorn.workers.UvicornWorker", "uvicorn.workers.UvicornH11Worker",
    "uvicorn_worker.UvicornWorker", "uvicorn_worker.UvicornH11Worker"};

Translation worker_class(const std::string& value) {
    for (auto name : kWsgiWorkers) {
        if (value == name) return set("interface", "wsgi");
    }
    for (auto name : kAsgiWorkers) {
        if (value == name) return set("interface", "asgi");
    }
    return refuse(fmt::format(
        "molt has no `{}` worker (no green threads): a WSGI app runs on threads (-k gthread "
        "--threads N, config `interface: wsgi`), an ASGI app on uvicorn's event loop (-k "
        "uvicorn.workers.UvicornWorker, config `interface: asgi`)",
        value));
}

Translation access_logfile(const std::string& value) {
    if (value == "-") return set("logging.access_log", "true");
    // A file of their own, written by the workers and reopened on SIGUSR1, as gunicorn's
    // (a file turns the access log on).
    return set("logging.access_log_file", value);
}

Translation error_logfile(const std::string& value) {
    if (value == "-") return {};  // stderr is molt's default
    return set("logging.file", value);
}

Translation environment(const std::string& value) {
    const auto eq = value.find('=');
    if (eq == std::string::npos || eq == 0) {
        return refuse(fmt::format("expected NAME=VALUE, got \"{}\"", value));
    }
    // The config's rule for a name (no `=`, no NUL) applies when it is read; a `.` would make
    // the flag's setting a path into the config (`env.A.B`), so it needs the config file.
    const std::string name = value.substr(0, eq);
    if (name.find('.') != std::string::npos) {
        return refuse(
            fmt::format("a NAME with a `.` goes in the config file's `env:`, got \"{}\"", value));
    }
    return set("env." + name, value.substr(eq + 1));
}

}  // namespace

const std::vector<RunFlag>& run_flags() {
    static const std::vector<RunFlag> flags = {
        // molt's own
        {"--interface", "wsgi|asgi", "interface", "How workers call the app"},
        {"--python", "PATH", "python", "The interpreter that runs the workers"},
        {"--control", "SOCKET", "control.socket", "Control socket for `molt ctl --socket`"},
        // gunicorn's, with gunicorn's meaning
        // molt's --listen and gunicorn's --bind are one flag, so their order is kept.
        {"-b,--bind,--listen", "ADDRESS", "listen",
         "tcp://HOST:PORT, unix:/PATH, or gunicorn's HOST:PORT, [::1]:PORT, :PORT, unix:PATH, "
         "/PATH (repeatable)"},
        {"-w,--workers", "N", "workers", "Worker processes"},
        {"--threads", "N", "threads", "Request threads per WSGI worker"},
        {"-k,--worker-class", "CLASS", "interface",
         "sync or gthread: WSGI; uvicorn.workers.UvicornWorker: ASGI", worker_class},
        {"--chdir", "DIR", "chdir", "The release directory the workers run in"},
        {"-e,--env", "NAME=VALUE", "env", "An environment variable for the workers (repeatable)",
         environment},
        {"--timeout", "SECONDS", "timeouts.heartbeat",
         "A worker silent this long is aborted with tracebacks, then killed"},
        {"--graceful-timeout", "SECONDS", "timeouts.graceful",
         "How long draining workers get to finish before SIGKILL"},
        {"--keep-alive", "SECONDS", "timeouts.keepalive",
         "How long an idle keep-alive connection stays open"},
        {"--max-requests", "N", "recycle.max_requests",
         "Requests a worker serves before it is replaced; 0: never"},
        {"--max-requests-jitter", "N", "recycle.max_requests_jitter",
         "A random 0..N added to --max-requests per worker"},
        {"--access-logfile", "PATH", "logging.access_log_file",
         "-: one line per request in molt's log; PATH: the workers append them to PATH "
         "(reopened on SIGUSR1)",
         access_logfile},
        {"--error-logfile,--log-file", "FILE", "logging.file",
         "The master's log file, reopened on SIGUSR1; -: stderr", error_logfile},
        {"--log-level", "LEVEL", "logging.level", "debug, info, warning or error"},
        {"--pid", "FILE", "pidfile", "File the master writes its PID to"},
        {"--user", "USER", "user", "User the workers run as"},
        {"--group", "GROUP", "group", "Group the workers run as"},
        {"--preload", "", "preload",
         "Import the app once per release in a zygote and fork the workers from it (config "
         "`preload: true`); every reload still loads new code"},
        // gunicorn's, refused with molt's equivalent
        {"-D,--daemon", "", "", "Refused: molt stays in the foreground", nullptr,
         "molt stays in the foreground: run it under systemd (docs/systemd.md) or a container "
         "runtime"},
        {"--worker-connections", "N", "threads", "Refused: molt has no green-thread workers",
         nullptr,
         "molt has no green-thread workers: use --threads N for a WSGI app, or serve an ASGI app "
         "with -k uvicorn.workers.UvicornWorker"},
        {"--access-logformat", "FORMAT", "logging.access_log_format",
         "Refused: gunicorn's placeholders differ from molt's", nullptr,
         "gunicorn's %(h)s placeholders are not molt's: set `logging.access_log_format` in a "
         "config file with molt's {remote} {method} {path} {status} ... "
         "(docs/migrating-from-gunicorn.md maps each one)"},
    };
    return flags;
}

Translation translate(const RunFlag& flag, const std::string& value) {
    if (!flag.refusal.empty()) return refuse(std::string(flag.refusal));
    if (flag.translate != nullptr) return flag.translate(value);
    return set(std::string(flag.key), value);
}

}  // namespace molt::cli
