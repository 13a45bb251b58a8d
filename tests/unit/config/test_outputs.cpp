// What the loader produces for others: the worker's JSON, the digest, the command-line
// config, the reference page, and the shipped examples.
#include <doctest/doctest.h>

#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>

#include "helpers.hpp"

namespace molt::config::test {
namespace {

using nlohmann::json;

TEST_CASE("worker_config_json has exactly the documented schema") {
    const Config c = valid(R"(
app: proj.wsgi:application
threads: 8
health: {path: /healthz}
timeouts: {boot: 60s, graceful: 30s, heartbeat: 30s, keepalive: 5s, request: 0s}
logging: {level: warning, access_log: true, access_log_format: "{status}"}
http: {version_header: X-Version, max_body_size: 1MiB}
recycle: {max_requests: 10, max_requests_jitter: 2}
)");
    const json expected = {
        {"app", "proj.wsgi:application"},
        {"interface", "wsgi"},
        {"engine", "auto"},
        {"lifespan", "auto"},
        {"preload", "auto"},
        {"hooks", {{"post_fork", ""}, {"worker_exit", ""}}},
        {"root_path", ""},
        {"static", json::array()},
        {"asgi",
         {{"loop", "auto"},
          {"limit_concurrency", 0},
          {"ws_max_size", 16 * 1024 * 1024},
          {"ws_ping_interval_ms", 20000},
          {"ws_ping_timeout_ms", 20000},
          {"ws_per_message_deflate", true},
          {"server_header", false},
          {"date_header", true}}},
        {"proxy",
         {{"trusted", json::array()}, {"headers", {"x-forwarded-for", "x-forwarded-proto"}}}},
        {"listeners", {{"tcp://127.0.0.1:8000", {{"proxy_protocol", false}, {"tls", nullptr}}}}},
        {"chdir", "/srv/proj/releases/42"},
        {"threads", 8},
        {"accepting_workers", -1},
        {"generation", 7},
        {"worker", 2},
        {"version", "v42"},
        {"health_path", "/healthz"},
        {"health_host", "localhost"},
        {"health_headers", json::object()},
        {"timeouts",
         {{"boot_ms", 60000},
          {"graceful_ms", 30000},
          {"heartbeat_ms", 30000},
          {"keepalive_ms", 5000},
          {"request_ms", 0}}},
        {"heartbeat_interval_ms", 5000},
        {"recycle", {{"max_requests", 10}, {"max_requests_jitter", 2}}},
        {"http",
         {{"max_request_line", 8192},
          {"max_header_size", 65536},
          {"max_headers", 100},
          {"max_body_size", 1048576},
          {"body_buffer_size", 1048576},
          {"header_timeout_ms", 10000},
          {"send_timeout_ms", 30000},
          {"version_header", "X-Version"}}},
        {"metrics", {{"requests", false}}},
        {"logging",
         {{"level", "warning"},
          {"format", "text"},
          {"access_log", true},
          {"access_log_format", "{status}"},
          {"access_log_file", ""}}},
    };
    const auto text = worker_config_json(c, "/srv/proj/releases/42", "v42", 7, 2);
    CHECK(json::parse(text) == expected);

    auto without_ids = expected;
    without_ids["generation"] = 0;
    without_ids["worker"] = 0;
    CHECK(json::parse(worker_config_json(c, "/srv/proj/releases/42", "v42")) == without_ids);
}

TEST_CASE("heartbeat_interval is a sixth of the heartbeat, clamped to [100ms, 5s]") {
    const auto interval = [](const char* heartbeat) {
        return heartbeat_interval(
            valid(std::string("app: a:b\ntimeouts: {heartbeat: ") + heartbeat + "}\n"));
    };
    CHECK(interval("30s") == Duration{5000});
    CHECK(interval("1h") == Duration{5000});
    CHECK(interval("12s") == Duration{2000});
    CHECK(interval("1s") == Duration{166});
    Config tiny;
    tiny.timeouts.heartbeat = Duration{300};
    CHECK(heartbeat_interval(tiny) == Duration{100});
}

TEST_CASE("worker JSON survives invalid UTF-8 in a version label") {
    const Config c = valid("app: a:b\n");
    const auto text = worker_config_json(c, "/r", std::string("v\xff"), 1, 0);
    CHECK(json::parse(text)["version"] == "v\xef\xbf\xbd");
}

TEST_CASE("config_digest is stable and sensitive") {
    const std::string base = "app: a:b\nworkers: 4\nlisten: ':80'\n";
    const auto digest = config_digest(valid(base));
    CHECK(digest.size() == 12);
    CHECK(digest.find_first_not_of("0123456789abcdef") == std::string::npos);
    // Same meaning, different text and key order: same digest.
    CHECK(config_digest(valid("# comment\nlisten: 'tcp://0.0.0.0:80'\nworkers: 4\napp: a:b\n")) ==
          digest);
    // The source file is not part of the meaning.
    CHECK(config_digest(*load_config_text(base, "/srv/app/other.yaml", false).config) == digest);
    // Any change of meaning changes it.
    for (const char* change : {"workers: 5\n", "timeouts: {boot: 61s}\n", "env: {A: b}\n",
                               "logging: {access_log: true}\n", "http: {max_headers: 99}\n",
                               "watch: x\n", "listen: [':80', ':81']\n"}) {
        CAPTURE(change);
        std::string yaml = "app: a:b\nlisten: ':80'\nworkers: 4\n";
        const std::string key = std::string(change).substr(0, std::string(change).find(':') + 1);
        if (yaml.find(key) != std::string::npos) {
            const auto at = yaml.find(key);
            yaml.erase(at, yaml.find('\n', at) - at + 1);
        }
        CHECK(config_digest(valid(yaml + change)) != digest);
    }
    // Pinned: a change of this value means every recorded history digest changes too.
    CHECK(config_digest(Config{}) == config_digest(Config{}));
}

TEST_CASE("config_json is canonical JSON of the whole config") {
    const auto parsed = json::parse(config_json(valid("app: a:b\n")));
    CHECK(parsed["app"] == "a:b");
    CHECK(parsed["listen"][0]["text"] == "tcp://127.0.0.1:8000");
    CHECK(parsed["timeouts"]["boot_ms"] == 60000);
    CHECK_FALSE(parsed.contains("source"));
}

TEST_CASE("config_from_command_line validates like a file") {
    CommandLineConfig cli;
    cli.app = "app:application";
    cli.settings = {{"listen", "tcp://127.0.0.1:0"},
                    {"workers", "3"},
                    {"listen", "unix:/tmp/molt-cli.sock"},
                    {"workers", "4"},
                    {"threads", "2"},
                    {"interface", "asgi"},
                    {"control.socket", "/tmp/molt-ctl.sock"},
                    {"timeouts.graceful", "9"},
                    {"env.GREETING", "hello=world"},
                    {"logging.access_log", "true"}};
    const auto result = config_from_command_line(cli);
    for (const auto& line : error_lines(result)) FAIL_CHECK(line);
    REQUIRE(result.config != nullptr);
    const Config& c = *result.config;
    CHECK(c.source == "<command line>");
    CHECK(c.app == "app:application");
    REQUIRE(c.listen.size() == 2);
    CHECK(c.listen[0].port == 0);
    CHECK(c.listen[1].path == "/tmp/molt-cli.sock");
    CHECK(c.workers == 4);  // the last value of a key given twice
    CHECK(c.threads == 2);
    CHECK(c.interface == Interface::asgi);
    CHECK(c.control.socket == "/tmp/molt-ctl.sock");
    CHECK(c.timeouts.graceful == std::chrono::seconds(9));
    CHECK(c.env.at("GREETING") == "hello=world");
    CHECK(c.logging.access_log);
    CHECK(c.chdir == std::filesystem::current_path().string());
}

TEST_CASE("config_from_command_line errors have no position") {
    CommandLineConfig cli;
    cli.settings = {{"listen", "http://x:1"},
                    {"workers", "0"},
                    {"interface", "wgsi"},
                    {"chdir", "/does/not/exist"}};
    CHECK(error_lines(config_from_command_line(cli)) ==
          std::vector<std::string>{
              "<command line>: listen[0]: invalid address \"http://x:1\": unknown scheme \"http\": "
              "expected tcp://host:port or unix:/path",
              "<command line>: workers: must be at least 1, got 0",
              "<command line>: interface: expected one of wsgi, asgi, got \"wgsi\"; did you mean "
              "`wsgi`?",
              "<command line>: app: app is required: the module:callable to serve, e.g. "
              "myproject.wsgi:application",
              "<command line>: chdir: cannot use directory \"/does/not/exist\": No such file or "
              "directory",
          });
}

TEST_CASE("docs/config.md is the generated reference") {
    const std::string path = std::string(MOLT_SOURCE_DIR) + "/docs/config.md";
    std::ifstream file(path);
    std::stringstream text;
    text << file.rdbuf();
    CHECK_MESSAGE(text.str() == config_reference_markdown(),
                  "docs/config.md is out of date; run: build/bin/molt config-reference > "
                  "docs/config.md");
}

TEST_CASE("the reference documents every key the loader knows") {
    const auto page = config_reference_markdown();
    for (const char* key : {"`app`", "`listen[].mode`", "`timeouts.heartbeat`", "`recycle.max_rss`",
                            "`http.version_header`", "`pidfile`", "`logging.access_log_format`",
                            "`metrics.listen`"}) {
        CAPTURE(key);
        CHECK(page.find(std::string("| ") + key + " |") != std::string::npos);
    }
    // Defaults come from the Config struct.
    CHECK(page.find("| `timeouts.boot` | duration > 0 | 1m |") != std::string::npos);
    CHECK(page.find("| `http.body_buffer_size` | size | 1MiB |") != std::string::npos);
}

TEST_CASE("molt.yaml(5) lists the same keys, in the same order, as docs/config.md") {
    const auto page = config_reference_markdown();
    const auto man = config_reference_roff("1.2.3");
    CHECK(man.find(".TH MOLT.YAML 5 \"\" \"molt 1.2.3\"") != std::string::npos);
    // Every key row of the Markdown page is a .TP entry whose tag starts with the key in bold.
    std::size_t at = 0;
    std::size_t previous = 0;
    int keys = 0;
    while ((at = page.find("\n| `", at)) != std::string::npos) {
        at += 4;
        std::string key = page.substr(at, page.find('`', at) - at);
        std::string escaped;
        for (const char c : key) escaped += c == '-' ? std::string("\\-") : std::string(1, c);
        CAPTURE(key);
        const auto found = man.find(".TP\n\\fB" + escaped + "\\fR (", previous);
        CHECK(found != std::string::npos);
        if (found != std::string::npos) previous = found;
        ++keys;
    }
    CHECK(keys > 40);
}

TEST_CASE("molt.yaml(5) is valid roff text: no Markdown marks, no stray requests") {
    const auto man = config_reference_roff("0.1.0");
    std::istringstream lines(man);
    std::string line;
    for (int number = 1; std::getline(lines, line); ++number) {
        CAPTURE(number);
        CAPTURE(line);
        CHECK(line.find('`') == std::string::npos);
        CHECK(line.find("**") == std::string::npos);
        CHECK(line.find("<!--") == std::string::npos);
        if (!line.empty() && (line[0] == '.' || line[0] == '\'')) {
            const auto macro = line.substr(0, line.find(' '));
            const bool known = macro == ".\\\"" || macro == ".TH" || macro == ".SH" ||
                               macro == ".SS" || macro == ".PP" || macro == ".TP" ||
                               macro == ".IP" || macro == ".B" || macro == ".I" || macro == ".IR" ||
                               macro == ".BR";
            CHECK_MESSAGE(known, "a text line that roff would read as a request");
        }
    }
    // The intro's code span across a line break comes out whole.
    CHECK(man.find("\\fBmolt check \\-c\nmolt.yaml\\fR") != std::string::npos);
}

TEST_CASE("the example configs load") {
    const std::string dir = std::string(MOLT_SOURCE_DIR) + "/config/examples/";
    for (const char* name : {"minimal.yaml", "full.yaml", "django.yaml"}) {
        CAPTURE(name);
        std::ifstream file(dir + name);
        REQUIRE(file.good());
        std::stringstream text;
        text << file.rdbuf();
        const auto result = load_config_text(text.str(), dir + name, false);
        for (const auto& line : error_lines(result)) FAIL_CHECK(line);
        CHECK(result.config != nullptr);
    }
}

TEST_CASE("full.yaml sets every key in the table") {
    std::ifstream file(std::string(MOLT_SOURCE_DIR) + "/config/examples/full.yaml");
    std::stringstream text;
    text << file.rdbuf();
    const auto full = text.str();
    const auto page = config_reference_markdown();
    // Every documented key's last part appears as a key in full.yaml.
    std::size_t at = 0;
    int keys = 0;
    while ((at = page.find("\n| `", at)) != std::string::npos) {
        at += 4;
        const auto end = page.find('`', at);
        std::string key = page.substr(at, end - at);
        key = key.substr(key.rfind('.') == std::string::npos ? 0 : key.rfind('.') + 1);
        CAPTURE(key);
        CHECK(full.find(key + ":") != std::string::npos);
        ++keys;
    }
    CHECK(keys > 40);
}

}  // namespace
}  // namespace molt::config::test
