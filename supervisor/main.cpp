// molt's command line: run, check, ctl, version, config-reference.
//
// Exit codes (docs/signals.md): 0 success; 1 failure at run time (cannot listen, the first
// generation failed, a rollover failed for `ctl reload --wait`); 2 usage; 69 no master
// answers on the control socket; 75 `--wait` timed out; 78 the config is invalid.
#include <fmt/format.h>
#include <poll.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <cstring>
#include <fstream>
#include <iostream>
#include <nlohmann/json.hpp>
#include <set>
#include <sstream>

#include "config/config.hpp"
#include "config/units.hpp"
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

const char* kUsageText = R"(usage:
  molt run -c molt.yaml [--reload]
  molt run MODULE:CALLABLE [--reload] [--listen URL]... [--workers N] [--threads N]
           [--interface wsgi|asgi] [--chdir DIR] [--python PATH] [--control SOCKET]
  molt check -c molt.yaml
  molt ctl (-c molt.yaml | --socket PATH) status [--json]
  molt ctl ... reload [--wait] [--timeout 120s]
  molt ctl ... rollback [--wait] [--timeout 120s]
  molt ctl ... history [--json]
  molt ctl ... scale N
  molt ctl ... stop [--fast]
  molt version
  molt config-reference
)";

int usage(const std::string& problem) {
    if (!problem.empty()) std::cerr << "molt: " << problem << "\n";
    std::cerr << kUsageText;
    return kUsage;
}

struct Args {
    std::vector<std::string> positional;
    std::map<std::string, std::vector<std::string>> options;  // --name -> values
    std::set<std::string> flags;
};

// Options that take a value; everything else starting with - is a flag.
const std::set<std::string> kValued = {
    "-c",       "--config",  "--listen", "--workers", "--threads", "--interface", "--chdir",
    "--python", "--control", "--socket", "--timeout", "-b",        "--bind",      "-w"};

std::optional<Args> parse_args(int argc, char** argv, int from, std::string& error) {
    Args args;
    for (int i = from; i < argc; ++i) {
        std::string arg = argv[i];
        std::string value;
        auto eq = arg.find('=');
        if (arg.rfind("--", 0) == 0 && eq != std::string::npos) {
            value = arg.substr(eq + 1);
            arg = arg.substr(0, eq);
            args.options[arg].push_back(value);
            continue;
        }
        if (kValued.count(arg)) {
            if (i + 1 >= argc) {
                error = arg + " needs a value";
                return std::nullopt;
            }
            args.options[arg].push_back(argv[++i]);
        } else if (arg.size() > 1 && arg[0] == '-' &&
                   !std::isdigit(static_cast<unsigned char>(arg[1]))) {
            args.flags.insert(arg);
        } else {
            args.positional.push_back(arg);
        }
    }
    return args;
}

std::optional<std::string> option(const Args& args, std::initializer_list<const char*> names) {
    for (const char* name : names) {
        auto it = args.options.find(name);
        if (it != args.options.end() && !it->second.empty()) return it->second.back();
    }
    return std::nullopt;
}

void print_errors(const std::vector<molt::config::ConfigError>& errors) {
    for (const auto& error : errors) std::cerr << error.to_string() << "\n";
}

std::string shim_dir() {
    if (const char* dir = std::getenv("MOLT_SHIM_DIR"); dir && *dir) return dir;
    return molt::os::executable_dir() + "/../lib/molt";
}

// ----- run -----------------------------------------------------------------------------------

std::vector<std::string> original_argv;

std::string build_id() {
    static const std::string id = molt::os::file_digest(molt::os::executable_path());
    return id;
}

int cmd_run(const Args& args) {
    molt::loop::MasterOptions options;
    options.version = MOLT_VERSION;
    options.shim_dir = shim_dir();
    options.executable = molt::os::executable_path();
    options.build = build_id();
    options.argv = original_argv;
    options.dev_reload = args.flags.count("--reload") > 0;
    molt::config::LoadResult loaded;
    if (auto path = option(args, {"-c", "--config"})) {
        if (!args.positional.empty())
            return usage("give either -c FILE or MODULE:CALLABLE, not both");
        options.config_path = *path;
        loaded = molt::config::load_config_file(*path);
    } else {
        if (args.positional.size() != 1) return usage("molt run needs -c FILE or MODULE:CALLABLE");
        molt::config::CommandLineConfig cli;
        cli.app = args.positional[0];
        for (const char* name : {"--listen", "--bind", "-b"}) {
            if (auto it = args.options.find(name); it != args.options.end()) {
                for (const auto& value : it->second) cli.listen.push_back(value);
            }
        }
        try {
            if (auto w = option(args, {"--workers", "-w"})) cli.workers = std::stoi(*w);
            if (auto t = option(args, {"--threads"})) cli.threads = std::stoi(*t);
        } catch (const std::exception&) {
            return usage("--workers and --threads take whole numbers");
        }
        cli.interface = option(args, {"--interface"});
        cli.chdir = option(args, {"--chdir"});
        cli.python = option(args, {"--python"});
        cli.control_socket = option(args, {"--control"});
        options.command_line = cli;
        loaded = molt::config::config_from_command_line(cli);
    }
    if (!loaded.errors.empty()) {
        print_errors(loaded.errors);
        return kConfigError;
    }
    molt::loop::Master master(loaded.config, options);
    return master.run();
}

int cmd_check(const Args& args) {
    auto path = option(args, {"-c", "--config"});
    if (!path) {
        if (args.positional.size() != 1) return usage("molt check needs -c FILE");
        path = args.positional[0];
    }
    auto loaded = molt::config::load_config_file(*path);
    if (!loaded.errors.empty()) {
        print_errors(loaded.errors);
        std::cerr << fmt::format("{}: {} error{}\n", *path, loaded.errors.size(),
                                 loaded.errors.size() == 1 ? "" : "s");
        return kConfigError;
    }
    const auto& config = *loaded.config;
    std::vector<std::string> listen;
    for (const auto& a : config.listen) listen.push_back(a.text);
    std::cout << fmt::format("{}: ok: {} ({}), {} worker(s) x {} thread(s), listen {}\n", *path,
                             config.app,
                             config.interface == molt::config::Interface::asgi ? "asgi" : "wsgi",
                             config.workers, config.threads, fmt::join(listen, ", "));
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

int cmd_ctl(const Args& args) {
    std::string socket_path;
    if (auto socket = option(args, {"--socket"})) {
        socket_path = *socket;
    } else if (auto path = option(args, {"-c", "--config"})) {
        std::ifstream file(*path);
        if (!file) return usage("cannot read " + *path + ": " + std::strerror(errno));
        std::stringstream text;
        text << file.rdbuf();
        auto loaded = molt::config::load_config_text(text.str(), *path, false);
        if (!loaded.errors.empty()) {
            print_errors(loaded.errors);
            return kConfigError;
        }
        socket_path = loaded.config->control.socket;
        if (socket_path.empty()) {
            std::cerr << "molt: " << *path << " sets no control.socket; molt ctl needs one\n";
            return kUsage;
        }
    } else if (const char* env = std::getenv("MOLT_CONTROL_SOCKET"); env && *env) {
        socket_path = env;
    } else {
        return usage("molt ctl needs -c FILE or --socket PATH");
    }
    if (args.positional.empty()) return usage("molt ctl needs a command");
    std::string command = args.positional[0];
    bool as_json = args.flags.count("--json") > 0;
    std::optional<std::chrono::milliseconds> timeout;
    if (auto text = option(args, {"--timeout"})) {
        auto parsed = molt::config::parse_duration(*text);
        if (!parsed) return usage("--timeout takes a duration like 120s");
        timeout = *parsed;
    }

    json request{{"command", command}};
    if (command == "reload" || command == "rollback") {
        request["wait"] = args.flags.count("--wait") > 0;
    } else if (command == "scale") {
        if (args.positional.size() != 2) return usage("molt ctl scale needs a worker count");
        try {
            request["workers"] = std::stoi(args.positional[1]);
        } catch (const std::exception&) {
            return usage("molt ctl scale takes a whole number");
        }
    } else if (command == "stop") {
        request["fast"] = args.flags.count("--fast") > 0;
    } else if (command != "status" && command != "history") {
        return usage("unknown ctl command: " + command);
    }
    if (!request.value("wait", false) && !timeout) timeout = std::chrono::seconds(30);

    Reply reply = control_request(socket_path, request, timeout);
    if (reply.code != 0) {
        std::cerr << "molt: " << reply.error << "\n";
        return reply.code;
    }
    const json& body = reply.body;
    bool ok = body.value("ok", false);
    if (as_json) {
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
int cmd_upgrade_check(const Args& args) {
    if (const char* state = std::getenv("MOLT_UPGRADE_STATE_CHECK")) {
        std::string problem = molt::loop::validate_upgrade_state(state);
        if (!problem.empty()) {
            std::cerr << "molt: cannot adopt the running master's state: it " << problem << "\n";
            return 1;
        }
    }
    if (auto path = option(args, {"-c", "--config"})) {
        auto loaded = molt::config::load_config_file(*path);
        if (!loaded.errors.empty()) {
            print_errors(loaded.errors);
            return kConfigError;
        }
    }
    std::cout << "molt " << MOLT_VERSION << " build " << build_id() << "\n";
    return 0;
}

}  // namespace

int main(int argc, char** argv) {
    original_argv.assign(argv, argv + argc);
    molt::os::init_process_title(argc, argv);
    if (argc < 2) return usage("");
    std::string command = argv[1];
    if (command == "version" || command == "--version" || command == "-V") {
        std::cout << "molt " << MOLT_VERSION << " build " << build_id() << "\n";
        return 0;
    }
    if (command == "help" || command == "--help" || command == "-h") {
        std::cout << kUsageText;
        return 0;
    }
    if (command == "config-reference") {
        std::cout << molt::config::config_reference_markdown();
        return 0;
    }
    std::string error;
    auto args = parse_args(argc, argv, 2, error);
    if (!args) return usage(error);
    if (command == "run") return cmd_run(*args);
    if (command == "check") return cmd_check(*args);
    if (command == "ctl") return cmd_ctl(*args);
    if (command == "upgrade-check") return cmd_upgrade_check(*args);
    return usage("unknown command: " + command);
}
