// molt's command line: run, check, ctl, version, config-reference, on CLI11.
//
// A thin edge: it parses, maps `molt run` flags onto config keys through the one table in
// supervisor/cli/run_flags.cpp, and calls the config loader, the master or the control
// socket. Exit codes (docs/signals.md): 0 success; 1 failure at run time (cannot listen, the
// first generation failed, a rollover failed for `ctl reload --wait`); 2 usage (an unknown
// command or flag, a refused gunicorn flag); 69 no master answers on the control socket; 75
// `--wait` timed out; 78 the config is invalid.
#include <fmt/format.h>
#include <poll.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include <CLI/CLI.hpp>
#include <algorithm>
#include <cctype>
#include <cerrno>
#include <chrono>
#include <cstdint>
#include <cstring>
#include <fstream>
#include <iostream>
#include <nlohmann/json.hpp>
#include <sstream>
#include <variant>

#include "config/config.hpp"
#include "config/units.hpp"
#include "supervisor/cli/run_flags.hpp"
#include "supervisor/loop/master.hpp"

#ifndef MOLT_VERSION
#define MOLT_VERSION "0.0.0"
#endif

namespace {

using json = nlohmann::json;
constexpr int kUsage = 2;
constexpr int kUnavailable = 69;
constexpr int kTimedOut = 75;
constexpr int kConfigError = 78;

// The top-level help's synopsis; `molt SUBCOMMAND --help` lists each one's flags.
const char* kSynopsis = R"(Synopsis:
  molt run -c molt.yaml [--reload]
  molt run MODULE:CALLABLE [--reload] [--listen URL]... [--workers N] [--threads N]
           [--interface wsgi|asgi] [--chdir DIR] [--python PATH] [--control SOCKET]
           [gunicorn's flags: molt run --help]
  molt check [--offline] -c molt.yaml
  molt ctl (-c molt.yaml | --socket PATH) status [--json]
  molt ctl ... reload [--wait] [--timeout 120s]
  molt ctl ... rollback [--wait] [--timeout 120s]
  molt ctl ... history [--json]
  molt ctl ... scale N
  molt ctl ... stop [--fast]
  molt version
  molt config-reference

Every subcommand takes --help. Exit codes: 0 ok, 1 failed, 2 usage, 69 no master answers,
75 timed out, 78 invalid config.)";

int usage(const std::string& problem, const std::string& command = "molt") {
    std::cerr << "molt: " << problem << "\n";
    std::cerr << "Run '" << command << " --help' for the usage.\n";
    return kUsage;
}

void print_errors(const std::vector<molt::config::ConfigError>& errors) {
    for (const auto& error : errors) std::cerr << error.to_string() << "\n";
}

std::string shim_dir() {
    if (const char* dir = std::getenv("MOLT_SHIM_DIR"); dir && *dir) return dir;
    return molt::os::executable_dir() + "/../lib/molt";
}

std::vector<std::string> original_argv;

std::string build_id() {
    static const std::string id = molt::os::file_digest(molt::os::executable_path());
    return id;
}

// A gunicorn Python config handed to -c would fail as YAML with a confusing message.
std::optional<std::string> python_config_problem(const std::string& path) {
    if (path.size() < 3 || path.compare(path.size() - 3, 3, ".py") != 0) return std::nullopt;
    return fmt::format(
        "-c {}: molt reads a YAML config, not a gunicorn Python config; "
        "docs/migrating-from-gunicorn.md maps each setting",
        path);
}

// ----- run -----------------------------------------------------------------------------------

struct RunArgs {
    std::string config_path;
    std::string target;  // MODULE:CALLABLE
    bool dev_reload = false;
    // Per row of run_flags(): the values given, in order ("true" per use of a switch).
    std::vector<std::vector<std::string>> values;
};

// A boolean flag's value: "true" (true, yes, on, 1) or "false" (false, no, off, 0), any case;
// anything else is the flag's error.
CLI::Validator boolean_flag_value() {
    return CLI::Validator(
        [](std::string& value) -> std::string {
            std::string lower;
            for (const char c : value) lower += static_cast<char>(std::tolower(c));
            if (lower == "true" || lower == "yes" || lower == "on" || lower == "1") {
                value = "true";
            } else if (lower == "false" || lower == "no" || lower == "off" || lower == "0") {
                value = "false";
            } else {
                return "expected true or false (yes/no, on/off, 1/0), got \"" + value + "\"";
            }
            return {};
        },
        "");  // no type in --help: the flag is used bare
}

void add_run_flags(CLI::App& run, RunArgs& args) {
    const auto& flags = molt::cli::run_flags();
    args.values.resize(flags.size());
    for (std::size_t i = 0; i < flags.size(); ++i) {
        const auto& flag = flags[i];
        std::string help(flag.help);
        if (flag.refusal.empty() && !flag.key.empty()) help += fmt::format(" [{}]", flag.key);
        const char* group = flag.refusal.empty() ? "Options" : "gunicorn flags molt refuses";
        if (flag.value_name.empty()) {
            // `--preload` is true, `--preload=false` (no, off, 0) false: a value is read, never
            // dropped, and one that is neither is an error.
            run.add_flag(std::string(flag.names), args.values[i], help)
                ->multi_option_policy(CLI::MultiOptionPolicy::TakeAll)
                ->check(boolean_flag_value())
                ->group(group);
        } else {
            // One value per use (`--listen A app:app` must not take app:app), every use kept.
            run.add_option(std::string(flag.names), args.values[i], help)
                ->type_name(std::string(flag.value_name))
                ->expected(1)
                ->allow_extra_args(false)
                ->multi_option_policy(CLI::MultiOptionPolicy::TakeAll)
                ->group(group);
        }
    }
}

// "-w/--workers": a flag's names as its users know them.
std::string spelled(const molt::cli::RunFlag& flag) {
    std::string names(flag.names);
    std::replace(names.begin(), names.end(), ',', '/');
    return names;
}

// The config-free form's settings, or the usage problem of the first refused flag.
std::variant<molt::config::CommandLineConfig, std::string> command_line_config(
    const RunArgs& args) {
    molt::config::CommandLineConfig cli;
    cli.app = args.target;
    const auto& flags = molt::cli::run_flags();
    for (std::size_t i = 0; i < flags.size(); ++i) {
        for (const auto& value : args.values[i]) {
            auto translation = molt::cli::translate(flags[i], value);
            if (!translation.refusal.empty()) {
                return fmt::format("{}: {}", spelled(flags[i]), translation.refusal);
            }
            if (translation.setting) cli.settings.push_back(*translation.setting);
        }
    }
    return cli;
}

// With -c FILE the file is the whole config (a reload re-reads it), so flags that set keys
// would silently stop applying at the first reload: they are refused.
std::optional<std::string> flags_beside_a_file(const RunArgs& args) {
    const auto& flags = molt::cli::run_flags();
    for (std::size_t i = 0; i < flags.size(); ++i) {
        if (args.values[i].empty()) continue;
        if (!flags[i].refusal.empty()) {
            return fmt::format("{}: {}", spelled(flags[i]), flags[i].refusal);
        }
        return fmt::format("{}: with -c FILE the file is the whole config; set `{}` in {}",
                           spelled(flags[i]), flags[i].key, args.config_path);
    }
    return std::nullopt;
}

int cmd_run(const RunArgs& args) {
    molt::loop::MasterOptions options;
    options.version = MOLT_VERSION;
    options.shim_dir = shim_dir();
    options.executable = molt::os::executable_path();
    options.build = build_id();
    options.argv = original_argv;
    options.dev_reload = args.dev_reload;
    molt::config::LoadResult loaded;
    if (!args.config_path.empty()) {
        if (!args.target.empty())
            return usage("give either -c FILE or MODULE:CALLABLE, not both", "molt run");
        if (auto problem = python_config_problem(args.config_path))
            return usage(*problem, "molt run");
        if (auto problem = flags_beside_a_file(args)) return usage(*problem, "molt run");
        options.config_path = args.config_path;
        loaded = molt::config::load_config_file(args.config_path);
    } else {
        if (args.target.empty())
            return usage("molt run needs -c FILE or MODULE:CALLABLE", "molt run");
        auto cli = command_line_config(args);
        if (auto* problem = std::get_if<std::string>(&cli)) return usage(*problem, "molt run");
        options.command_line = std::get<molt::config::CommandLineConfig>(cli);
        loaded = molt::config::config_from_command_line(*options.command_line);
    }
    if (!loaded.errors.empty()) {
        print_errors(loaded.errors);
        return kConfigError;
    }
    molt::loop::Master master(loaded.config, options);
    return master.run();
}

// ----- check ---------------------------------------------------------------------------------

// With `user:`, the workers run as that user: it must be able to run the python, enter the
// release and read the worker shim, or every worker fails with "No module named molt_shim" or
// a permission error. Asked as that user, so modes, ACLs and parent directories all count.
std::vector<std::string> user_access_problems(const molt::config::Config& config) {
    std::vector<molt::os::AccessCheck> checks{
        // A release archive (.pyz) is read; a release directory is read and entered.
        {config.chdir, molt::os::is_regular_file(config.chdir) ? R_OK : R_OK | X_OK},
        {shim_dir() + "/molt_shim/__main__.py", R_OK},
    };
    auto python = molt::os::find_program(config.python);
    if (molt::os::ok(python)) checks.push_back({std::get<0>(python), X_OK});
    auto refused = molt::os::inaccessible_as(config.user, config.group, checks);
    if (!molt::os::ok(refused)) return {"user: " + molt::os::error_of(refused)};
    std::vector<std::string> lines;
    for (const auto& why : std::get<0>(refused)) {
        lines.push_back(
            fmt::format("user: \"{}\" cannot use {} (chdir, python and the worker "
                        "shim must be readable by the workers' user)",
                        config.user, why));
    }
    return lines;
}

int cmd_check(const std::string& path, bool offline) {
    if (auto problem = python_config_problem(path)) return usage(*problem, "molt check");
    auto loaded = molt::config::load_config_file(path, !offline);
    if (!loaded.errors.empty()) {
        print_errors(loaded.errors);
        std::cerr << fmt::format("{}: {} error{}\n", path, loaded.errors.size(),
                                 loaded.errors.size() == 1 ? "" : "s");
        return kConfigError;
    }
    const auto& config = *loaded.config;
    if (!offline && !config.user.empty()) {
        if (auto refused = user_access_problems(config); !refused.empty()) {
            for (const auto& line : refused) std::cerr << fmt::format("{}: {}\n", path, line);
            std::cerr << fmt::format("{}: {} error{}\n", path, refused.size(),
                                     refused.size() == 1 ? "" : "s");
            return kConfigError;
        }
    }
    std::vector<std::string> listen;
    for (const auto& a : config.listen) listen.push_back(a.text);
    std::cout << fmt::format(
        "{}: ok: {} ({}), {} worker(s) x {} thread(s), listen {}{}\n", path, config.app,
        config.interface == molt::config::Interface::asgi ? "asgi" : "wsgi", config.workers,
        config.threads, fmt::join(listen, ", "),
        offline ? " (offline: chdir, python, user and group not looked up)" : "");
    return 0;
}

// ----- ctl -----------------------------------------------------------------------------------

struct Reply {
    int code = 0;  // 0 when `body` holds the answer
    std::string error;
    json body;
};

Reply control_request(const std::string& socket_path, const json& request,
                      std::optional<std::chrono::milliseconds> timeout) {
    Reply reply;
    int fd = ::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    sockaddr_un sun{};
    sun.sun_family = AF_UNIX;
    if (socket_path.size() >= sizeof sun.sun_path) {
        return {kUsage, "control socket path too long: " + socket_path, {}};
    }
    std::strcpy(sun.sun_path, socket_path.c_str());
    if (::connect(fd, reinterpret_cast<sockaddr*>(&sun), sizeof sun) < 0) {
        int err = errno;
        ::close(fd);
        return {kUnavailable,
                fmt::format("cannot reach the master at {}: {} (is molt running with "
                            "control.socket set?)",
                            socket_path, std::strerror(err)),
                {}};
    }
    std::string text = request.dump() + "\n";
    if (::send(fd, text.data(), text.size(), MSG_NOSIGNAL) < 0) {
        int err = errno;
        ::close(fd);
        return {kUnavailable,
                fmt::format("send to {} failed: {}", socket_path, std::strerror(err)),
                {}};
    }
    std::string answer;
    auto deadline = timeout ? std::chrono::steady_clock::now() + *timeout
                            : std::chrono::steady_clock::time_point::max();
    char buffer[65536];
    for (;;) {
        int wait_ms = -1;
        if (timeout) {
            auto left = std::chrono::duration_cast<std::chrono::milliseconds>(
                deadline - std::chrono::steady_clock::now());
            if (left.count() <= 0) {
                ::close(fd);
                return {kTimedOut, "timed out waiting for the master's answer", {}};
            }
            wait_ms = static_cast<int>(left.count());
        }
        pollfd p{fd, POLLIN, 0};
        int rc = ::poll(&p, 1, wait_ms);
        if (rc < 0 && errno == EINTR) continue;
        if (rc == 0) continue;  // the deadline check above ends it
        ssize_t n = ::recv(fd, buffer, sizeof buffer, 0);
        if (n < 0 && errno == EINTR) continue;
        if (n <= 0) break;
        answer.append(buffer, static_cast<size_t>(n));
    }
    ::close(fd);
    reply.body = json::parse(answer, nullptr, false);
    if (reply.body.is_discarded() || !reply.body.is_object()) {
        return {1,
                answer.empty() ? "the master closed the connection without an answer"
                               : "the master's answer is not JSON: " + answer.substr(0, 200),
                {}};
    }
    return reply;
}

std::string human_duration(double seconds) {
    auto s = static_cast<long long>(seconds);
    if (s < 60) return fmt::format("{}s", s);
    if (s < 3600) return fmt::format("{}m{:02}s", s / 60, s % 60);
    if (s < 86400) return fmt::format("{}h{:02}m", s / 3600, (s % 3600) / 60);
    return fmt::format("{}d{:02}h", s / 86400, (s % 86400) / 3600);
}

std::string human_bytes(std::uint64_t bytes) {
    if (bytes < 1024 * 1024) return fmt::format("{:.0f}KiB", bytes / 1024.0);
    return fmt::format("{:.1f}MiB", bytes / (1024.0 * 1024.0));
}

void print_status(const json& s) {
    const json& m = s["master"];
    std::cout << fmt::format("molt {}  master pid {}  {}  up {}  app {}\n", m.value("version", "?"),
                             m.value("pid", 0), m.value("state", "?"),
                             human_duration(m.value("uptime_s", 0.0)), m.value("app", "?"));
    std::vector<std::string> listen = m.value("listen", std::vector<std::string>{});
    std::cout << fmt::format("listening on {}\n", fmt::join(listen, ", "));
    for (const auto& g : s["generations"]) {
        std::string took =
            g.contains("rollover_ms")
                ? fmt::format(", rollover took {}ms", g["rollover_ms"].get<long long>())
                : "";
        std::cout << fmt::format("generation {} {}: version {}  {}{}\n", g.value("id", 0),
                                 g.value("state", "?"), g.value("version", "?"),
                                 g.value("release_dir", "?"), took);
        if (g.contains("failure"))
            std::cout << "  failure: " << g["failure"].get<std::string>() << "\n";
        const json zygote = g.contains("preload") ? g["preload"].value("zygote", json()) : json();
        if (zygote.is_object()) {
            const json spare = zygote.value("spare_pid", json());
            std::cout << fmt::format(
                "  zygote pid {} {}, {} fork(s), PSS {}{}\n", zygote.value("pid", 0),
                zygote.value("state", "?"), zygote.value("forks", 0),
                human_bytes(zygote.value("pss_bytes", std::uint64_t{0})),
                spare.is_number() ? fmt::format(", spare worker pid {}", spare.get<int>()) : "");
        }
    }
    if (s.contains("standby") && s["standby"].is_object()) {
        std::cout << fmt::format("standby pid {}, PSS {}: the next reload's zygote\n",
                                 s["standby"].value("pid", 0),
                                 human_bytes(s["standby"].value("pss_bytes", std::uint64_t{0})));
    }
    const json& last = s["last_rollover"];
    if (!last.is_null()) {
        std::cout << fmt::format(
            "last rollover: {} (generation {}, {}ms){}\n",
            last.value("ok", false) ? "ok" : "FAILED", last.value("generation", 0),
            last.value("took_ms", 0),
            last.value("ok", false) ? "" : ": " + last.value("reason", std::string()));
    }
    if (s.value("rollover_in_progress", false)) std::cout << "a rollover is in progress\n";
    std::cout << fmt::format("\n{:<5}{:<6}{:<9}{:<10}{:>9}{:>11}{:>10}{:>11}{:>10}\n", "GEN",
                             "SLOT", "PID", "STATE", "UPTIME", "REQUESTS", "INFLIGHT", "RSS",
                             "RESTARTS");
    for (const auto& g : s["generations"]) {
        for (const auto& w : g["workers"]) {
            std::string state = w.value("state", "?");
            if (w.contains("retiring") && !w["retiring"].is_null()) state += "*";
            std::cout << fmt::format("{:<5}{:<6}{:<9}{:<10}{:>9}{:>11}{:>10}{:>11}{:>10}\n",
                                     g.value("id", 0), w.value("slot", 0), w.value("pid", 0), state,
                                     human_duration(w.value("uptime_s", 0.0)),
                                     w.value("requests", 0), w.value("inflight", 0),
                                     human_bytes(w.value("rss_bytes", std::uint64_t{0})),
                                     w.value("restarts", 0));
        }
    }
}

struct CtlArgs {
    std::string config_path;
    std::string socket_path;
    bool json = false;
    bool wait = false;
    bool fast = false;
    std::string timeout;  // a duration, empty: the default
    int workers = 0;      // scale N
};

std::optional<std::string> resolve_socket(const CtlArgs& args, int& code) {
    code = kUsage;
    if (!args.socket_path.empty()) return args.socket_path;
    if (!args.config_path.empty()) {
        std::ifstream file(args.config_path);
        if (!file) {
            usage("cannot read " + args.config_path + ": " + std::strerror(errno), "molt ctl");
            return std::nullopt;
        }
        std::stringstream text;
        text << file.rdbuf();
        auto loaded = molt::config::load_config_text(text.str(), args.config_path, false);
        if (!loaded.errors.empty()) {
            print_errors(loaded.errors);
            code = kConfigError;
            return std::nullopt;
        }
        if (loaded.config->control.socket.empty()) {
            std::cerr << "molt: " << args.config_path
                      << " sets no control.socket; molt ctl needs one\n";
            return std::nullopt;
        }
        return loaded.config->control.socket;
    }
    if (const char* env = std::getenv("MOLT_CONTROL_SOCKET"); env && *env) return env;
    usage("molt ctl needs -c FILE or --socket PATH", "molt ctl");
    return std::nullopt;
}

int cmd_ctl(const std::string& command, const CtlArgs& args) {
    int code = 0;
    auto socket_path = resolve_socket(args, code);
    if (!socket_path) return code;
    std::optional<std::chrono::milliseconds> timeout;
    if (!args.timeout.empty()) {
        auto parsed = molt::config::parse_duration(args.timeout);
        if (!parsed) return usage("--timeout takes a duration like 120s", "molt ctl " + command);
        timeout = *parsed;
    }

    json request{{"command", command}};
    if (command == "reload" || command == "rollback") {
        request["wait"] = args.wait;
    } else if (command == "scale") {
        request["workers"] = args.workers;
    } else if (command == "stop") {
        request["fast"] = args.fast;
    }
    if (!args.wait && !timeout) timeout = std::chrono::seconds(30);

    Reply reply = control_request(*socket_path, request, timeout);
    if (reply.code != 0) {
        std::cerr << "molt: " << reply.error << "\n";
        return reply.code;
    }
    const json& body = reply.body;
    bool ok = body.value("ok", false);
    if (args.json) {
        std::cout << body.dump(2) << "\n";
        return ok ? 0 : 1;
    }
    if (!ok) {
        std::cerr << "molt: " << command << " failed: " << body.value("error", std::string("?"))
                  << "\n";
        return 1;
    }
    if (command == "status") {
        print_status(body);
    } else if (command == "history") {
        std::cout << fmt::format("{:<5}{:<10}{:<10}{:<20}{}\n", "GEN", "TRIGGER", "RESULT",
                                 "VERSION", "RELEASE");
        for (const auto& e : body["history"]) {
            std::cout << fmt::format("{:<5}{:<10}{:<10}{:<20}{}\n", e.value("id", 0),
                                     e.value("trigger", "?"), e.value("state", "?"),
                                     e.value("version", "?"), e.value("release_dir", "?"));
            if (e.contains("failure"))
                std::cout << "     " << e["failure"].get<std::string>() << "\n";
        }
    } else if (command == "reload" || command == "rollback") {
        if (body.contains("generation")) {
            std::cout << fmt::format("generation {} is live ({}ms)\n", body.value("generation", 0),
                                     body.value("took_ms", 0));
        } else {
            std::cout << command << " started"
                      << (body.contains("target") && !body["target"].is_null()
                              ? " onto " + body["target"].get<std::string>()
                              : "")
                      << "\n";
        }
    } else if (command == "scale") {
        std::cout << "scaling to " << body.value("workers", 0) << " workers\n";
    } else if (command == "stop") {
        std::cout << "stopping (" << body.value("stopping", "graceful") << ")\n";
    }
    return 0;
}

// Run by a master, in a child, before it re-executes itself as this binary: proves that the
// binary starts and that its own loader accepts the config the master runs.
int cmd_upgrade_check(const std::string& config_path) {
    if (const char* state = std::getenv("MOLT_UPGRADE_STATE_CHECK")) {
        std::string problem = molt::loop::validate_upgrade_state(state);
        if (!problem.empty()) {
            std::cerr << "molt: cannot adopt the running master's state: it " << problem << "\n";
            return 1;
        }
    }
    if (!config_path.empty()) {
        auto loaded = molt::config::load_config_file(config_path);
        if (!loaded.errors.empty()) {
            print_errors(loaded.errors);
            return kConfigError;
        }
    }
    std::cout << "molt " << MOLT_VERSION << " build " << build_id() << "\n";
    return 0;
}

// ----- parsing -------------------------------------------------------------------------------

// Every name a parser level knows (its flags and subcommands), for "did you mean".
std::vector<std::string> known_names(const CLI::App& app) {
    std::vector<std::string> names;
    for (const CLI::Option* option : app.get_options()) {
        for (const auto& name : option->get_lnames()) names.push_back("--" + name);
        for (const auto& name : option->get_snames()) names.push_back("-" + name);
    }
    for (const CLI::App* sub : app.get_subcommands([](const CLI::App*) { return true; })) {
        if (!sub->get_group().empty()) names.push_back(sub->get_name());
    }
    return names;
}

// The deepest subcommand the command line selected (the root when none).
CLI::App* selected(CLI::App& root) {
    CLI::App* app = &root;
    while (!app->get_subcommands().empty()) app = app->get_subcommands().front();
    return app;
}

std::string command_path(const CLI::App& app) {
    if (app.get_parent() == nullptr) return "molt";
    return command_path(*app.get_parent()) + " " + app.get_name();
}

// An argument no level knew: an unknown flag, command or extra word; exit 2 with a hint.
int unknown_argument(CLI::App& app, const std::string& argument) {
    const std::string word = argument.substr(0, argument.find('='));
    const bool is_flag = word.size() > 1 && word[0] == '-';
    std::vector<std::string> candidates;
    for (const CLI::App* level = &app; level != nullptr; level = level->get_parent()) {
        for (auto& name : known_names(*level)) {
            if ((name[0] == '-') == is_flag) candidates.push_back(std::move(name));
        }
        if (!level->get_fallthrough()) break;
    }
    std::string what = is_flag ? "unknown flag"
                               : (app.get_subcommands([](const CLI::App*) { return true; }).empty()
                                      ? "unexpected argument"
                                      : "unknown command");
    std::string problem = fmt::format("{} for {}: {}", what, command_path(app), word);
    if (auto near = molt::config::closest(word, candidates)) {
        problem += fmt::format("; did you mean {}?", *near);
    }
    return usage(problem, command_path(app));
}

CLI::App* declare_run(CLI::App& app, RunArgs& args) {
    CLI::App* run = app.add_subcommand("run", "Run the master in the foreground");
    run->add_option("-c,--config", args.config_path, "The config file")->type_name("FILE");
    run->add_option("target", args.target,
                    "The app without a config file: module:callable (the config-free form)")
        ->type_name("MODULE:CALLABLE");
    run->add_flag("--reload", args.dev_reload,
                  "Development: watch the chdir tree and roll over on every change");
    add_run_flags(*run, args);
    run->footer(
        "Without -c, the flags become the config, validated like a file. gunicorn's flags keep "
        "gunicorn's meaning; a config key in [brackets] is the one a flag sets. With -c FILE, "
        "the file is the whole config: only --reload goes with it.");
    return run;
}

struct CheckArgs {
    std::string path;
    bool offline = false;
};

CLI::App* declare_check(CLI::App& app, CheckArgs& args) {
    CLI::App* check = app.add_subcommand(
        "check",
        "Validate a config and exit 0, or 78 with every error as file:line:col: key: message");
    auto* with_c =
        check->add_option("-c,--config", args.path, "The config file")->type_name("FILE");
    check->add_option("file", args.path, "The config file (instead of -c)")
        ->type_name("FILE")
        ->excludes(with_c);
    check->add_flag("--offline", args.offline,
                    "Skip what needs the target host: chdir, python, user and group lookups");
    return check;
}

CLI::App* declare_ctl(CLI::App& app, CtlArgs& args) {
    CLI::App* ctl = app.add_subcommand("ctl", "Talk to a running master on its control socket");
    ctl->add_option("-c,--config", args.config_path,
                    "Find the socket in this config's control.socket")
        ->type_name("FILE");
    ctl->add_option("--socket", args.socket_path,
                    "The control socket (default: $MOLT_CONTROL_SOCKET)")
        ->type_name("PATH");
    ctl->require_subcommand(0, 1);
    ctl->fallthrough();  // -c and --socket may also follow the command
    const auto command = [&](const char* name, const char* help) {
        CLI::App* sub = ctl->add_subcommand(name, help);
        sub->add_flag("--json", args.json, "Print the master's answer as JSON");
        return sub;
    };
    command("status", "Generations, workers and the last rollover");
    for (auto [name, help] :
         {std::pair{"reload", "Start a rollover onto the current config and release"},
          std::pair{"rollback", "Roll back to the release of the last generation that was live"}}) {
        CLI::App* sub = command(name, help);
        sub->add_flag("--wait", args.wait,
                      "Wait for the result: exit 0 once live, 1 when it failed");
        sub->add_option("--timeout", args.timeout,
                        "Give up waiting after this long (exit 75; the rollover goes on)")
            ->type_name("DURATION");
    }
    command("history", "Every generation with its result");
    command("scale", "Set the number of workers per generation")
        ->add_option("N", args.workers, "Workers")
        ->required();  // the master judges the count
    command("stop", "Stop the master (graceful, like TERM)")
        ->add_flag("--fast", args.fast, "Stop fast, like INT");
    return ctl;
}

}  // namespace

int main(int argc, char** argv) {
    original_argv.assign(argv, argv + argc);
    molt::os::init_process_title(argc, argv);

    CLI::App app(
        "molt: a pre-fork supervisor for Python WSGI and ASGI apps, with zero-downtime "
        "rollovers on SIGHUP.",
        "molt");
    // Unknown arguments are collected and reported below with a "did you mean", rather than
    // by CLI11's own message; subcommands inherit this.
    app.allow_extras();
    app.require_subcommand(0, 1);
    app.option_defaults()->multi_option_policy(CLI::MultiOptionPolicy::TakeLast);
    bool show_version = false;
    app.add_flag("-V,--version", show_version, "Print the version and build, and exit");

    RunArgs run_args;
    CLI::App* run = declare_run(app, run_args);
    CheckArgs check_args;
    CLI::App* check = declare_check(app, check_args);
    CtlArgs ctl_args;
    CLI::App* ctl = declare_ctl(app, ctl_args);

    CLI::App* version = app.add_subcommand("version", "Print the version and build");
    CLI::App* reference =
        app.add_subcommand("config-reference", "Print the config reference (docs/config.md)");
    CLI::App* help = app.add_subcommand("help", "Print this help");
    help->group("");
    std::string upgrade_config;
    CLI::App* upgrade = app.add_subcommand("upgrade-check", "Run by SIGUSR2 before the re-exec");
    upgrade->add_option("-c,--config", upgrade_config);
    upgrade->group("");  // hidden: the master runs it, people do not

    app.footer(kSynopsis);  // after the subcommands, which would inherit it

    try {
        app.parse(argc, argv);
    } catch (const CLI::CallForHelp& e) {
        return app.exit(e);
    } catch (const CLI::ParseError& e) {
        CLI::App* at = selected(app);
        return usage(e.what(), command_path(*at));
    }

    CLI::App* at = selected(app);
    auto extras = app.remaining(true);
    if (!extras.empty()) return unknown_argument(*at, extras.front());

    if (show_version || version->parsed()) {
        std::cout << "molt " << MOLT_VERSION << " build " << build_id() << "\n";
        return 0;
    }
    if (help->parsed()) {
        // app.help() would describe the selected subcommand, `help` itself.
        std::cout << app.get_formatter()->make_help(&app, "molt", CLI::AppFormatMode::Normal);
        return 0;
    }
    if (reference->parsed()) {
        std::cout << molt::config::config_reference_markdown();
        return 0;
    }
    if (run->parsed()) return cmd_run(run_args);
    if (check->parsed()) {
        if (check_args.path.empty()) return usage("molt check needs -c FILE", "molt check");
        return cmd_check(check_args.path, check_args.offline);
    }
    if (ctl->parsed()) {
        if (at == ctl) return usage("molt ctl needs a command", "molt ctl");
        return cmd_ctl(at->get_name(), ctl_args);
    }
    if (upgrade->parsed()) return cmd_upgrade_check(upgrade_config);
    std::cerr << app.help();
    return kUsage;
}
