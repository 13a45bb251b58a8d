// Loading valid configs: defaults, every key, path resolution, files and the filesystem.
#include <doctest/doctest.h>
#include <sys/stat.h>
#include <unistd.h>

#include "config/units.hpp"
#include "helpers.hpp"

namespace molt::config::test {
namespace {

using std::chrono::seconds;

TEST_CASE("defaults") {
    const Config c = valid("app: myapp:application\n");
    CHECK(c.source == kLabel);
    CHECK(c.app == "myapp:application");
    CHECK(c.interface == Interface::wsgi);
    CHECK(c.chdir == "/srv/app");  // the config file's directory
    CHECK(c.python == "/usr/bin/python3");
    CHECK(c.env.empty());
    REQUIRE(c.listen.size() == 1);
    CHECK(c.listen[0].text == "tcp://127.0.0.1:8000");
    CHECK(c.listen[0].name == "tcp://127.0.0.1:8000");
    CHECK(c.listen[0].backlog == 2048);
    CHECK(c.workers == 1);
    CHECK(c.threads == 1);
    CHECK(c.timeouts.boot == seconds(60));
    CHECK(c.timeouts.graceful == seconds(30));
    CHECK(c.timeouts.heartbeat == seconds(30));
    CHECK(c.timeouts.request == Duration{0});
    CHECK(c.timeouts.keepalive == seconds(5));
    CHECK(c.health.path.empty());
    CHECK(c.rollover.batch == 0);
    CHECK(c.recycle.max_requests == 0);
    CHECK(c.recycle.max_rss == 0);
    CHECK(c.control.socket.empty());
    CHECK(c.control.mode == 0600);
    CHECK_FALSE(c.metrics.listen.has_value());
    CHECK(c.logging.level == LogLevel::info);
    CHECK(c.logging.format == LogFormat::text);
    CHECK_FALSE(c.logging.access_log);
    CHECK(c.logging.file.empty());
    CHECK(c.http.max_request_line == 8192);
    CHECK(c.http.body_buffer_size == 1024 * 1024);
    CHECK(c.watch.empty());
    CHECK(c.version_file.empty());
    CHECK(c.user.empty());
    CHECK(c.pidfile.empty());
}

TEST_CASE("listen[].defer_accept defaults to 1s for either interface, and can be turned off") {
    const Config wsgi =
        valid("app: a:b\nlisten: [tcp://127.0.0.1:1, {address: 'tcp://127.0.0.1:2'}]\n");
    CHECK(wsgi.listen[0].defer_accept == std::chrono::seconds(1));
    CHECK(wsgi.listen[1].defer_accept == std::chrono::seconds(1));
    const Config asgi = valid("app: a:b\ninterface: asgi\n");  // the default listen address
    CHECK(asgi.listen[0].defer_accept == std::chrono::seconds(1));
    const Config off = valid(
        "app: a:b\ninterface: asgi\nlisten: [{address: 'tcp://127.0.0.1:1', defer_accept: 0}]\n");
    CHECK(off.listen[0].defer_accept == Duration{0});
}

TEST_CASE("every key is read into the struct") {
    const Config c = valid(R"(
app: proj.wsgi:create_app()
interface: asgi
chdir: /srv/proj/current
python: venv/bin/python
env: {A: 1, B: "two", C: true, D: ""}
listen:
  - tcp://[::1]:8001
  - {address: 'unix:run/web.sock', backlog: 16, mode: 660, name: web}
  - {address: 'tcp://127.0.0.1:8002', defer_accept: 0}
  - {address: 'tcp://127.0.0.1:8003', defer_accept: 1500ms}
backlog: 64
workers: 4
threads: 8
timeouts: {boot: 2m, graceful: 45s, heartbeat: 10s, request: 1m30s, keepalive: 500ms}
health: {path: /healthz}
rollover: {batch: 2}
recycle: {max_requests: 1000, max_requests_jitter: 50, max_rss: 512MiB, max_lifetime: 1h}
control: {socket: run/ctl.sock, mode: "0660"}
metrics: {listen: "127.0.0.1:9191"}
logging:
  level: debug
  format: json
  access_log: yes
  access_log_format: "{status} {{x}}"
  file: log/molt.log
http: {max_request_line: 4KiB, max_header_size: 32768, max_headers: 50, max_body_size: 10MB,
       body_buffer_size: 0, header_timeout: 5s, version_header: X-Molt-Version}
watch: current
version_file: meta/REVISION
user: www-data
group: www
pidfile: /run/molt.pid
)");
    CHECK(c.app == "proj.wsgi:create_app()");
    CHECK(c.interface == Interface::asgi);
    CHECK(c.chdir == "/srv/proj/current");
    CHECK(c.python == "/srv/app/venv/bin/python");
    CHECK(c.env ==
          std::map<std::string, std::string>{{"A", "1"}, {"B", "two"}, {"C", "true"}, {"D", ""}});
    REQUIRE(c.listen.size() == 4);
    CHECK(c.listen[0].text == "tcp://[::1]:8001");
    CHECK(c.listen[0].host == "::1");
    CHECK(c.listen[0].backlog == 64);                            // the global default
    CHECK(c.listen[0].defer_accept == std::chrono::seconds(1));  // the default
    CHECK(c.listen[2].defer_accept == Duration{0});
    CHECK(c.listen[3].defer_accept == std::chrono::milliseconds(1500));  // given: kept
    CHECK(c.listen[1].text == "unix:/srv/app/run/web.sock");
    CHECK(c.listen[1].path == "/srv/app/run/web.sock");
    CHECK(c.listen[1].backlog == 16);
    CHECK(c.listen[1].mode == 0660);
    CHECK(c.listen[1].name == "web");
    CHECK(c.workers == 4);
    CHECK(c.threads == 8);
    CHECK(c.timeouts.boot == seconds(120));
    CHECK(c.timeouts.graceful == seconds(45));
    CHECK(c.timeouts.heartbeat == seconds(10));
    CHECK(c.timeouts.request == seconds(90));
    CHECK(c.timeouts.keepalive == Duration{500});
    CHECK(c.health.path == "/healthz");
    CHECK(c.rollover.batch == 2);
    CHECK(c.recycle.max_requests == 1000);
    CHECK(c.recycle.max_requests_jitter == 50);
    CHECK(c.recycle.max_rss == 512ULL * 1024 * 1024);
    CHECK(c.recycle.max_lifetime == seconds(3600));
    CHECK(c.control.socket == "/srv/app/run/ctl.sock");
    CHECK(c.control.mode == 0660);
    REQUIRE(c.metrics.listen.has_value());
    CHECK(c.metrics.listen->text == "tcp://127.0.0.1:9191");
    CHECK(c.logging.level == LogLevel::debug);
    CHECK(c.logging.format == LogFormat::json);
    CHECK(c.logging.access_log);
    CHECK(c.logging.access_log_format == "{status} {{x}}");
    CHECK(c.logging.file == "/srv/app/log/molt.log");
    CHECK(c.http.max_request_line == 4096);
    CHECK(c.http.max_header_size == 32768);
    CHECK(c.http.max_headers == 50);
    CHECK(c.http.max_body_size == 10'000'000);
    CHECK(c.http.body_buffer_size == 0);
    CHECK(c.http.header_timeout == seconds(5));
    CHECK(c.http.version_header == "X-Molt-Version");
    CHECK(c.watch == std::vector<std::string>{"/srv/app/current"});
    CHECK(c.version_file == "meta/REVISION");
    CHECK(c.user == "www-data");
    CHECK(c.group == "www");
    CHECK(c.pidfile == "/run/molt.pid");
}

TEST_CASE("relative paths resolve against the config's directory, lexically") {
    const Config c = valid(
        "app: a:b\nchdir: ../releases/./current\nwatch: [src, /abs/x/../y]\n"
        "python: python3\n");
    CHECK(c.chdir == "/srv/releases/current");  // no realpath: symlinks stay for the master
    CHECK(c.watch == std::vector<std::string>{"/srv/app/src", "/abs/y"});
    CHECK(c.python == "python3");  // a bare name is looked up in PATH, not resolved
}

TEST_CASE("a label that names no file resolves against the current directory") {
    const auto result = load_config_text("app: a:b\nchdir: sub\n", "<stdin>", false);
    REQUIRE(result.config != nullptr);
    CHECK(result.config->chdir == (std::filesystem::current_path() / "sub").string());
}

TEST_CASE("modes accept octal digits quoted or not") {
    for (const char* mode : {"660", "0660", "'0660'", "\"660\"", "0o660"}) {
        CAPTURE(mode);
        CHECK(valid(std::string("app: a:b\ncontrol: {mode: ") + mode + "}\n").control.mode == 0660);
    }
    CHECK(valid("app: a:b\ncontrol: {mode: 0}\n").control.mode == 0);
    CHECK(valid("app: a:b\ncontrol: {mode: 777}\n").control.mode == 0777);
    CHECK(errors_of("app: a:b\ncontrol: {mode: 1777}\n").size() == 1);
    CHECK(errors_of("app: a:b\ncontrol: {mode: 668}\n").size() == 1);
}

TEST_CASE("empty sections are allowed") {
    const Config c = valid("app: a:b\ntimeouts:\nhealth: {}\nenv:\n");
    CHECK(c.timeouts.boot == seconds(60));
}

TEST_CASE("load_config_file reads a file and reports OS errors") {
    TempDir dir;
    const auto path = dir.write("molt.yaml", "app: a:b\nchdir: .\nworkers: 3\n");
    const auto result = load_config_file(path);
    for (const auto& line : error_lines(result)) FAIL_CHECK(line);
    REQUIRE(result.config != nullptr);
    CHECK(result.config->workers == 3);
    CHECK(result.config->source == path);
    CHECK(result.config->chdir == dir.path().string());

    const auto missing = (dir.path() / "nope.yaml").string();
    CHECK(
        error_lines(load_config_file(missing)) ==
        std::vector<std::string>{missing + ": cannot read config file: No such file or directory"});
    CHECK(error_lines(load_config_file(dir.path().string())) ==
          std::vector<std::string>{dir.path().string() +
                                   ": cannot read config file: Is a directory"});
}

TEST_CASE("load_config_file refuses a FIFO and a device at once instead of reading them") {
    TempDir dir;
    const auto fifo = (dir.path() / "molt.yaml").string();
    REQUIRE(::mkfifo(fifo.c_str(), 0600) == 0);
    const std::string not_regular =
        ": cannot read config file: not a regular file (a FIFO or a device is never read as a "
        "config)";
    // No writer ever opens the FIFO: the old loader waited for one forever.
    CHECK(error_lines(load_config_file(fifo)) == std::vector<std::string>{fifo + not_regular});
    CHECK(error_lines(load_config_file("/dev/zero")) ==
          std::vector<std::string>{"/dev/zero" + not_regular});
}

TEST_CASE("load_config_file caps the size of a config file") {
    TempDir dir;
    const std::string head = "app: a:b\nchdir: .\n";
    std::string at_cap = head + "# " + std::string(kMaxConfigFileBytes - head.size() - 3, 'x');
    at_cap += "\n";
    REQUIRE(at_cap.size() == kMaxConfigFileBytes);
    const auto fits = dir.write("fits.yaml", at_cap);
    CHECK(error_lines(load_config_file(fits)).empty());
    const auto big = dir.write("big.yaml", at_cap + "#\n");
    CHECK(error_lines(load_config_file(big)) ==
          std::vector<std::string>{big + ": config file too large: more than 1048576 bytes"});
}

TEST_CASE("a huge value is quoted in errors cut to a readable length, with its size") {
    const std::string value(50000, '7');
    const auto error = only_error("app: a:b\ntimeouts:\n  boot: " + value + "x\n");
    CHECK(error.size() < 300);
    CHECK(error == kLabel + ":3:9: timeouts.boot: invalid duration \"" + std::string(80, '7') +
                       "... (50001 bytes)\": expected " + std::string(kDurationForms));
    // A key is quoted the same way, and so is a value no reader cut itself (the app).
    const auto key_error = only_error("app: a:b\n" + std::string(5000, 'k') + ": 1\n");
    CHECK(key_error.size() < 600);
    const auto app_error = only_error("app: " + std::string(100000, 'a') + "\n");
    CHECK(app_error.size() < 600);
}

TEST_CASE("the default chdir of a file config is the file's directory") {
    TempDir dir;
    const auto path = dir.write("conf/molt.yaml", "app: a:b\n");
    const auto result = load_config_file(path);
    REQUIRE(result.config != nullptr);
    CHECK(result.config->chdir == (dir.path() / "conf").string());
}

TEST_CASE("filesystem checks: chdir") {
    TempDir dir;
    const auto file = dir.write("file.txt", "x");
    const auto check = [&](const std::string& chdir) {
        return error_lines(load_config_text("app: a:b\nchdir: " + chdir + "\n",
                                            (dir.path() / "molt.yaml").string(), true));
    };
    CHECK(check(dir.path().string()).empty());
    CHECK(check("missing") == std::vector<std::string>{(dir.path() / "molt.yaml").string() +
                                                       ":2:8: chdir: cannot use directory \"" +
                                                       (dir.path() / "missing").string() +
                                                       "\": No such file or directory"});
    CHECK(check("file.txt") ==
          std::vector<std::string>{(dir.path() / "molt.yaml").string() + ":2:8: chdir: \"" + file +
                                   "\" is a file, not a directory or a .pyz/.zip release"});
    // A release shipped as one archive is a file on purpose.
    dir.write("release.pyz", "PK");
    CHECK(check("release.pyz").empty());
    CHECK(check("file.txt/sub").at(0).ends_with(": Not a directory"));
    // Without check_filesystem none of this is looked at.
    CHECK(load_config_text("app: a:b\nchdir: /does/not/exist\n", kLabel, false).config != nullptr);
}

TEST_CASE("host checks: user and group must exist, unless the check is offline") {
    TempDir dir;
    const std::string text = "app: a:b\nchdir: " + dir.path().string() +
                             "\nuser: no-such-molt-user\ngroup: no-such-molt-group\n";
    CHECK(error_lines(load_config_text(text, kLabel, true)) ==
          std::vector<std::string>{
              std::string(kLabel) + ":3:7: user: no user named \"no-such-molt-user\" on this host",
              std::string(kLabel) +
                  ":4:8: group: no group named \"no-such-molt-group\" on this host"});
    CHECK(load_config_text(text, kLabel, false).config != nullptr);
    const auto root = "app: a:b\nchdir: " + dir.path().string() + "\nuser: root\ngroup: root\n";
    CHECK(error_lines(load_config_text(root, kLabel, true)).empty());
}

TEST_CASE("filesystem checks: an unreadable chdir") {
    if (::geteuid() == 0) {
        MESSAGE("skipped: root can read any directory");
        return;
    }
    TempDir dir;
    const auto locked = dir.path() / "locked";
    std::filesystem::create_directory(locked);
    ::chmod(locked.c_str(), 0);
    const auto lines = error_lines(
        load_config_text("app: a:b\nchdir: locked\n", (dir.path() / "molt.yaml").string(), true));
    ::chmod(locked.c_str(), 0700);  // so that TempDir can remove it
    REQUIRE(lines.size() == 1);
    CHECK(lines[0].ends_with("chdir: cannot read directory \"" + locked.string() +
                             "\": Permission denied"));
}

TEST_CASE("filesystem checks: python") {
    TempDir dir;
    const auto label = (dir.path() / "molt.yaml").string();
    const auto script = dir.write("python", "#!/bin/sh\n");
    const auto check = [&](const std::string& python) {
        return error_lines(load_config_text("app: a:b\npython: " + python + "\n", label, true));
    };
    CHECK(check(script) == std::vector<std::string>{label + ":2:9: python: \"" + script +
                                                    "\" is not executable: Permission denied"});
    ::chmod(script.c_str(), 0755);
    CHECK(check(script).empty());
    CHECK(check("./python").empty());  // relative to the config's directory
    CHECK(check("missing/python") ==
          std::vector<std::string>{label + ":2:9: python: cannot use \"" +
                                   (dir.path() / "missing/python").string() +
                                   "\": No such file or directory"});
    CHECK(check(dir.path().string()) ==
          std::vector<std::string>{label + ":2:9: python: \"" + dir.path().string() +
                                   "\" is not a file"});
    CHECK(check("sh").empty());  // found in PATH
    CHECK(check("no-such-python-molt") ==
          std::vector<std::string>{label +
                                   ":2:9: python: \"no-such-python-molt\" was not found in PATH"});
}

}  // namespace
}  // namespace molt::config::test
