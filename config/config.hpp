// The validated, immutable molt configuration.
//
// This header is the single source of truth for every config key: the loader
// (config.cpp) fills it from YAML or from the command line, the master reads it, and the
// worker shim receives the part it needs as JSON (worker_config_json). A Config is never
// changed after loading; a rollover loads a new one and the generation keeps a
// shared_ptr to the snapshot it started with.
#pragma once

#include <chrono>
#include <cstdint>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

namespace molt::config {

using Duration = std::chrono::milliseconds;

enum class Interface { wsgi, asgi };
// Which WSGI data path a worker runs: the native C++ engine or the Python one.
enum class Engine { auto_, native, python };
// The ASGI lifespan protocol, uvicorn's meaning: `auto` runs an app without it when the app
// raises on (or does not support) the lifespan scope; `on` makes that a boot failure.
enum class Lifespan { auto_, on, off };
// The ASGI worker's event loop: uvloop when importable (auto), or always asyncio's own.
enum class AsgiLoop { auto_, asyncio, uvloop };
// Whether a generation's workers are forked from a zygote that imported the release once:
// `auto` unless the import left the process unsafe to fork (then per-worker import, logged),
// `on` (`true`) forks anyway with a warning, `off` (`false`) imports in every worker.
enum class Preload { auto_, on, off };
enum class LogLevel { debug, info, warning, error };
enum class LogFormat { text, json };

// One `listen:` entry. A plain string ("tcp://0.0.0.0:8000", "unix:/run/app.sock") or a
// mapping {address: ..., backlog: N, mode: "0660", name: web}.
// TLS on one listener (`listen[].tls`); off when `cert` is empty.
struct Tls {
    std::string cert;       // PEM certificate chain, leaf first
    std::string key;        // PEM private key
    std::string client_ca;  // PEM CAs for client certificates; empty: no client certificates
    std::string min_version = "1.2";  // "1.2" or "1.3"
    bool enabled() const { return !cert.empty(); }
};

struct ListenAddress {
    enum class Kind { tcp, unix_path };
    Kind kind = Kind::tcp;
    std::string host;        // tcp: "0.0.0.0", "::1", "localhost"; brackets removed
    std::uint16_t port = 0;  // tcp: 0 lets the kernel pick (tests use it)
    std::string path;        // unix: filesystem path
    int backlog = 2048;
    std::uint32_t mode = 0660;    // unix socket file mode
    std::string name;             // matched against LISTEN_FDNAMES; defaults to the address text
    std::string text;             // canonical form, e.g. "tcp://127.0.0.1:8000", "unix:/run/a.sock"
    bool proxy_protocol = false;  // every connection starts with a PROXY v1/v2 header
    // tcp: TCP_DEFER_ACCEPT, whole seconds; 0 = off. A connection reaches accept() only
    // once its first bytes have arrived (or after this long).
    Duration defer_accept{std::chrono::seconds(1)};
    Tls tls;
};

struct Timeouts {
    Duration boot{std::chrono::seconds(60)};       // spawn -> READY=1
    Duration graceful{std::chrono::seconds(30)};   // DRAIN -> SIGKILL
    Duration heartbeat{std::chrono::seconds(30)};  // silence -> SIGABRT, then SIGKILL
    Duration request{0};                           // oldest request age; 0 = off
    Duration keepalive{std::chrono::seconds(5)};   // idle keep-alive connection lifetime
};

struct Health {
    std::string path;                // warm-up request path; empty = no warm-up request
    std::string host = "localhost";  // its Host header (Django's ALLOWED_HOSTS must allow it)
    std::map<std::string, std::string> headers;  // extra request headers, name -> value
};

struct Rollover {
    int batch = 0;  // 0: the whole generation at once
};

struct Recycle {
    std::uint64_t max_requests = 0;  // 0 = off
    std::uint64_t max_requests_jitter = 0;
    std::uint64_t max_rss = 0;  // bytes; 0 = off
    Duration max_lifetime{0};   // 0 = off
};

struct Control {
    std::string socket;  // empty = no control socket
    std::uint32_t mode = 0600;
};

struct Metrics {
    std::optional<ListenAddress> listen;
    bool app_multiprocess = false;  // PROMETHEUS_MULTIPROC_DIR per generation, served on listen
};

struct Logging {
    LogLevel level = LogLevel::info;
    LogFormat format = LogFormat::text;
    bool access_log = false;
    // Placeholders: {method} {path} {query} {status} {bytes} {duration_ms} {remote}
    // {generation} {worker} {version} {protocol} {user_agent} {referer}
    std::string access_log_format =
        "{remote} \"{method} {path} {protocol}\" {status} {bytes} {duration_ms}ms gen={generation} "
        "worker={worker}";
    std::string access_log_file;  // workers append access lines here; empty = the master's log
    std::string file;             // master log file; empty = stderr (journald)
};

// HTTP limits enforced by the worker shim.
struct Http {
    std::uint64_t max_request_line = 8 * 1024;
    std::uint64_t max_header_size = 64 * 1024;  // all header lines together
    std::uint32_t max_headers = 100;
    std::uint64_t max_body_size = 0;                    // 0 = unlimited; above it: 413
    std::uint64_t body_buffer_size = 1024 * 1024;       // above it the body spools to disk
    Duration header_timeout{std::chrono::seconds(10)};  // slowloris guard: whole head must arrive
    Duration send_timeout{std::chrono::seconds(30)};    // slow readers: longest wait to send more
    std::string version_header;                         // e.g. "X-Molt-Version"; empty = no header
};

// The `asgi:` section: uvicorn's settings, with uvicorn's meaning and defaults.
struct Asgi {
    AsgiLoop loop = AsgiLoop::auto_;
    std::uint32_t limit_concurrency = 0;  // 0 = no limit; above it: 503
    std::uint64_t ws_max_size = 16 * 1024 * 1024;
    Duration ws_ping_interval{std::chrono::seconds(20)};  // 0 = no pings
    Duration ws_ping_timeout{std::chrono::seconds(20)};
    bool ws_per_message_deflate = true;
    bool server_header = false;  // uvicorn sends `server: uvicorn` by default; molt says nothing
    bool date_header = true;
};

// Python callables ("module:function") the shim runs at fork-sensitive moments.
struct Hooks {
    std::string post_fork;    // in each worker, after the fork (or the import), before warm-up
    std::string worker_exit;  // in each worker, after its drain
};

// One `static:` entry: URL prefix -> directory, served by the WSGI engine without the app.
struct StaticMount {
    std::string prefix;  // starts and ends with '/'
    std::string dir;     // absolute, or relative to the release directory (per generation)
};

// Which peers may say, through forwarding headers, who the client is (`proxy:`).
struct Proxy {
    std::vector<std::string> trusted;  // addresses, CIDRs, "unix", "*"; empty: trust no one
    // The two every proxy sets; the others are opted into (forwarded.py's DEFAULT_HEADERS).
    std::vector<std::string> headers = {"x-forwarded-for", "x-forwarded-proto"};
};

// `accepting_workers:` auto and all, as the worker is given them (N >= 1 is itself).
inline constexpr int kAcceptingAuto = -1;
inline constexpr int kAcceptingAll = 0;

struct Config {
    std::string source;  // the file it came from, or "<command line>"

    std::string app;  // module:callable
    Interface interface = Interface::wsgi;
    Engine engine = Engine::auto_;
    Lifespan lifespan = Lifespan::auto_;
    Preload preload = Preload::auto_;
    bool preload_standby = true;  // each zygote forks the next one before its import
    Hooks hooks;
    std::string root_path;  // the prefix the app is mounted under: SCRIPT_NAME / root_path
    std::vector<StaticMount> statics;  // `static:`
    Asgi asgi;
    Proxy proxy;
    // Absolute (a relative one is joined to the config's directory, lexically: symlinks kept);
    // the master resolves it with realpath per generation.
    std::string chdir;
    std::string python = "/usr/bin/python3";
    std::map<std::string, std::string> env;
    std::vector<ListenAddress> listen;
    int workers = 1;  // 1 to kMaxWorkers
    int threads = 1;
    // How many of a generation's workers take new connections while they can (the accept
    // board's hot workers): kAcceptingAuto (one per CPU molt may use), kAcceptingAll, or N.
    int accepting_workers = kAcceptingAuto;
    Timeouts timeouts;
    Health health;
    Rollover rollover;
    Recycle recycle;
    Control control;
    Metrics metrics;
    Logging logging;
    Http http;
    std::vector<std::string> watch;
    std::string version_file;  // relative to the release directory
    std::string user;
    std::string group;
    std::string pidfile;
};

struct ConfigError {
    std::string file;
    int line = 0;  // 1-based; 0 when unknown
    int column = 0;
    std::string key;  // dotted path, e.g. "timeouts.boot"
    std::string message;

    // "file:line:col: key: message"
    std::string to_string() const;
};

// The largest config file read (a config is a few kB; this stops a runaway file early).
inline constexpr std::size_t kMaxConfigFileBytes = 1024 * 1024;

// The most workers a generation may have (`workers:`, `scale`, SIGTTIN): past it a typo
// (`scale 100000`) would have the master spawn until the host runs out of processes.
inline constexpr int kMaxWorkers = 1024;

struct LoadResult {
    std::shared_ptr<const Config> config;  // null when errors is not empty
    std::vector<ConfigError> errors;
};

// Reads and validates a YAML file. Never throws. The host checks (chdir readable, python
// executable, user and group known) run unless check_host is false: `molt check --offline`
// validates a config on a machine that is not the one it is for.
// Only a regular file of at most kMaxConfigFileBytes is read: a FIFO, a device or a directory
// is refused with an error, never waited on.
LoadResult load_config_file(const std::string& path, bool check_host = true);

// Validates YAML text; `label` is used as the file name in errors. Never throws.
// The host checks run unless check_filesystem is false.
LoadResult load_config_text(const std::string& text, const std::string& label,
                            bool check_filesystem = true);

// One config key given on the command line: a dotted key ("timeouts.graceful", "env.NAME")
// and its value as it would be written in YAML.
struct Setting {
    std::string key;
    std::string value;
};

// The config-free form: `molt run app:callable --listen URL --workers N ...`. The settings
// become a YAML document in order, so they meet exactly the validation a file meets: a key
// given twice keeps the last value, except that a key taking a list (`listen`, `watch`)
// collects every value.
struct CommandLineConfig {
    std::string app;
    std::vector<Setting> settings;
};
LoadResult config_from_command_line(const CommandLineConfig& cli);

// The candidate closest to `word`, if it is close enough to be a plausible typo (a prefix of
// three or more letters counts). Used for every "did you mean".
std::optional<std::string> closest(std::string_view word, const std::vector<std::string>& options);

// Parses "tcp://host:port", "tcp://[::1]:port", "unix:/path", "unix:///path". Never throws.
// Also accepts gunicorn's --bind forms: "host:port", "[::1]:port", ":port" and "/path".
// An empty host or "*" means 0.0.0.0. A relative unix path is kept as written (the loader
// resolves it against the config file's directory). On failure `error` (if not null) says
// why.
std::optional<ListenAddress> parse_listen_address(const std::string& text, std::string* error);

// The JSON document given to each worker as MOLT_WORKER_CONFIG. See docs/protocol.md.
std::string worker_config_json(const Config& config, const std::string& release_dir,
                               const std::string& version);

// Same document with the per-worker fields filled in; the master calls this one. The
// three-argument form above emits generation 0 and worker 0.
std::string worker_config_json(const Config& config, const std::string& release_dir,
                               const std::string& version, std::uint64_t generation, int worker);

// A short stable digest of the config's meaning (used in history and logs): 12 hex digits of
// FNV-1a 64 over config_json(). `source` is not part of it.
std::string config_digest(const Config& config);

// The whole config as canonical JSON (sorted keys, durations in ms, sizes in bytes), without
// `source`. For `molt check --print` and the digest.
std::string config_json(const Config& config);

// How often the shim heartbeats: timeouts.heartbeat / 6, clamped to [100ms, 5s], so that a
// few lost beats never look like a hang.
Duration heartbeat_interval(const Config& config);

// The listen address used when `listen:` is absent.
inline constexpr const char* kDefaultListen = "tcp://127.0.0.1:8000";

// The complete docs/config.md page, generated from the same key table the loader validates
// against, so the reference cannot drift from the code. `molt config-reference` prints it.
std::string config_reference_markdown();

// The same reference as the molt.yaml(5) man page (man(7) macros): every sentence and every
// key comes from the same table and intro, so the man page cannot drift from docs/config.md.
// `version` goes into the page's header line.
std::string config_reference_roff(std::string_view version);

}  // namespace molt::config
