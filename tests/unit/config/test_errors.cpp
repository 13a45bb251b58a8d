// Validation errors: exact `file:line:col: key: message` text, and that every error is
// collected rather than only the first.
#include <doctest/doctest.h>

#include "helpers.hpp"

namespace molt::config::test {
namespace {

TEST_CASE("an empty document only lacks app") {
    CHECK(errors_of("") == std::vector<std::string>{
                               "/srv/app/molt.yaml: app: app is required: the module:callable to "
                               "serve, e.g. myproject.wsgi:application"});
    CHECK(errors_of("# only a comment\n").size() == 1);
    CHECK(errors_of("---\n").size() == 1);
}

TEST_CASE("the document must be a mapping") {
    CHECK(only_error("- a\n- b\n") ==
          "/srv/app/molt.yaml:1:1: the config must be a mapping of keys, got a sequence");
    CHECK(only_error("just text\n") ==
          "/srv/app/molt.yaml:1:1: the config must be a mapping of keys, got \"just text\"");
}

TEST_CASE("YAML syntax errors become one error at the parser's mark") {
    const auto lines = errors_of("app: a:b\nworkers: [1, 2\n");
    REQUIRE(lines.size() == 1);
    CHECK(lines[0].starts_with("/srv/app/molt.yaml:3:1: "));
    CHECK(only_error("app: a:b\n  workers: 2\n") == "/srv/app/molt.yaml:2:10: illegal map value");
    CHECK(only_error("app: a:b\n---\napp: c:d\n") ==
          "/srv/app/molt.yaml:3:1: expected one YAML document, found 2");
}

TEST_CASE("unknown keys get a did-you-mean") {
    CHECK(only_error("app: a:b\nwrokers: 4\n") ==
          "/srv/app/molt.yaml:2:1: wrokers: unknown key; did you mean `workers`?");
    CHECK(only_error("app: a:b\ntimeouts:\n  bot: 30s\n") ==
          "/srv/app/molt.yaml:3:3: timeouts.bot: unknown key; did you mean `boot`?");
    CHECK(only_error("app: a:b\nlogging: {levl: info}\n") ==
          "/srv/app/molt.yaml:2:11: logging.levl: unknown key; did you mean `level`?");
    CHECK(errors_of("app: a:b\nlisten: [{adress: 'tcp://:80'}]\n") ==
          std::vector<std::string>{
              "/srv/app/molt.yaml:2:10: listen[0]: missing `address`",
              "/srv/app/molt.yaml:2:11: listen[0].adress: unknown key; did you mean `address`?"});
}

TEST_CASE("unknown keys at the wrong level or from gunicorn point to the right key") {
    CHECK(only_error("app: a:b\nboot: 60s\n") ==
          "/srv/app/molt.yaml:2:1: boot: unknown key; did you mean `timeouts.boot`?");
    CHECK(only_error("app: a:b\nbind: 0.0.0.0:80\n") ==
          "/srv/app/molt.yaml:2:1: bind: unknown key; did you mean `listen`? (gunicorn's `bind`)");
    CHECK(only_error("app: a:b\ntimeout: 30\n") ==
          "/srv/app/molt.yaml:2:1: timeout: unknown key; did you mean `timeouts.heartbeat`? "
          "(gunicorn's `timeout`)");
}

TEST_CASE("dotted keys are not expanded") {
    CHECK(only_error("app: a:b\ntimeouts.boot: 5s\n") ==
          "/srv/app/molt.yaml:2:1: timeouts.boot: unknown key; dotted keys are not expanded: nest "
          "`boot` under `timeouts`");
    CHECK(only_error("app: a:b\n'listen[].address': x\n") ==
          "/srv/app/molt.yaml:2:1: listen[].address: unknown key; dotted keys are not expanded: "
          "nest `address` under `listen[]`");
}

TEST_CASE("unknown keys without a near miss list the choices of small sections") {
    CHECK(only_error("app: a:b\nhealth: {zzz: 1}\n") ==
          "/srv/app/molt.yaml:2:10: health.zzz: unknown key; expected one of: path, host, headers");
    CHECK(only_error("app: a:b\nzzzzzz: 1\n") ==
          "/srv/app/molt.yaml:2:1: zzzzzz: unknown key; see docs/config.md for every key");
}

TEST_CASE("duplicate keys are errors") {
    CHECK(only_error("app: a:b\nworkers: 2\nworkers: 3\n") ==
          "/srv/app/molt.yaml:3:1: workers: duplicate key; first set at line 2");
}

TEST_CASE("wrong types name what was expected and what was found") {
    CHECK(only_error("app: a:b\nworkers: [1]\n") ==
          "/srv/app/molt.yaml:2:10: workers: expected an integer, got a sequence");
    CHECK(only_error("app: a:b\nworkers: four\n") ==
          "/srv/app/molt.yaml:2:10: workers: expected an integer, got \"four\"");
    CHECK(only_error("app: a:b\nthreads: 2.5\n") ==
          "/srv/app/molt.yaml:2:10: threads: expected an integer, got \"2.5\"");
    CHECK(only_error("app: a:b\ntimeouts: 30s\n") ==
          "/srv/app/molt.yaml:2:11: timeouts: expected a mapping, got \"30s\"");
    CHECK(only_error("app: a:b\nlogging: {access_log: maybe}\n") ==
          "/srv/app/molt.yaml:2:23: logging.access_log: expected true or false, got \"maybe\"");
    CHECK(only_error("app: {a: b}\n") ==
          "/srv/app/molt.yaml:1:6: app: expected module:callable, got a mapping");
    CHECK(only_error("app: a:b\nworkers:\nthreads: 2\n") ==
          "/srv/app/molt.yaml:2:1: workers: expected an integer, got nothing (null)");
    CHECK(only_error("app:\n") ==
          "/srv/app/molt.yaml:1:1: app: expected module:callable, got nothing (null)");
    CHECK(only_error("app: a:b\nuser: {x: 1}\n") ==
          "/srv/app/molt.yaml:2:7: user: expected a name, got a mapping");
}

TEST_CASE("counts have lower bounds") {
    CHECK(only_error("app: a:b\nworkers: 0\n") ==
          "/srv/app/molt.yaml:2:10: workers: must be at least 1, got 0");
    CHECK(only_error("app: a:b\nthreads: -3\n") ==
          "/srv/app/molt.yaml:2:10: threads: must be at least 1, got -3");
    CHECK(only_error("app: a:b\nrollover: {batch: -1}\n") ==
          "/srv/app/molt.yaml:2:19: rollover.batch: must be at least 0, got -1");
    CHECK(only_error("app: a:b\nworkers: 99999999999\n") ==
          "/srv/app/molt.yaml:2:10: workers: must be at most 1024, got 99999999999");
    CHECK(only_error("app: a:b\nworkers: 1025\n") ==
          "/srv/app/molt.yaml:2:10: workers: must be at most 1024, got 1025");
    CHECK(only_error("app: a:b\naccepting_workers: 0\n") ==
          "/srv/app/molt.yaml:2:20: accepting_workers: must be at least 1, got 0");
    CHECK(only_error("app: a:b\naccepting_workers: most\n") ==
          "/srv/app/molt.yaml:2:20: accepting_workers: expected auto, all or an integer >= 1, "
          "got \"most\"");
    CHECK(only_error("app: a:b\naccepting_workers: 2000\n") ==
          "/srv/app/molt.yaml:2:20: accepting_workers: must be at most 1024, got 2000");
    CHECK(only_error("app: a:b\nhttp: {max_headers: 0}\n") ==
          "/srv/app/molt.yaml:2:21: http.max_headers: must be at least 1, got 0");
    CHECK(valid("app: a:b\nrollover: {batch: 0}\n").rollover.batch == 0);
}

TEST_CASE("bad durations and sizes list the accepted forms") {
    CHECK(only_error("app: a:b\ntimeouts: {boot: 30 seconds}\n") ==
          "/srv/app/molt.yaml:2:18: timeouts.boot: invalid duration \"30 seconds\": expected a "
          "duration like 30s, 500ms, 2m, 1h, 1m30s, or a whole number of seconds");
    CHECK(only_error("app: a:b\nrecycle: {max_rss: 512m}\n") ==
          "/srv/app/molt.yaml:2:20: recycle.max_rss: invalid size \"512m\": expected a size like "
          "512MiB, 1GiB, 100KB (1000-based), 64KiB (1024-based), or a whole number of bytes "
          "(\"m\" is ambiguous: write 512MiB for 1024-based or 512MB for 1000-based)");
    CHECK(only_error("app: a:b\nhttp: {max_body_size: lots}\n") ==
          "/srv/app/molt.yaml:2:23: http.max_body_size: invalid size \"lots\": expected a size "
          "like 512MiB, 1GiB, 100KB (1000-based), 64KiB (1024-based), or a whole number of bytes");
    CHECK(only_error("app: a:b\nhttp: {max_request_line: 0}\n") ==
          "/srv/app/molt.yaml:2:26: http.max_request_line: must be at least 1B, got 0");
}

TEST_CASE("timeouts have lower bounds") {
    CHECK(only_error("app: a:b\ntimeouts: {graceful: 0s}\n") ==
          "/srv/app/molt.yaml:2:22: timeouts.graceful: must be greater than 0, got 0s");
    CHECK(only_error("app: a:b\ntimeouts: {heartbeat: 500ms}\n") ==
          "/srv/app/molt.yaml:2:23: timeouts.heartbeat: must be at least 1s, got 500ms");
    CHECK(only_error("app: a:b\ntimeouts: {boot: 0}\n") ==
          "/srv/app/molt.yaml:2:18: timeouts.boot: must be greater than 0, got 0");
    CHECK(only_error("app: a:b\nhttp: {header_timeout: 0s}\n") ==
          "/srv/app/molt.yaml:2:24: http.header_timeout: must be greater than 0, got 0s");
    const auto config = valid("app: a:b\ntimeouts: {heartbeat: 1s, request: 0, keepalive: 0s}\n");
    CHECK(config.timeouts.heartbeat == std::chrono::seconds(1));
    CHECK(config.timeouts.keepalive == Duration{0});
}

TEST_CASE("app must be module:callable") {
    const std::string prefix = "/srv/app/molt.yaml:1:6: app: ";
    CHECK(only_error("app: myapp\n") ==
          prefix +
              "expected module:callable, e.g. myproject.wsgi:application; \"myapp\" has no "
              "`:callable`");
    CHECK(only_error("app: my-app:application\n") ==
          prefix + "\"my-app\" is not a Python module path (expected names separated by dots)");
    CHECK(only_error("app: pkg..mod:app\n") ==
          prefix + "\"pkg..mod\" is not a Python module path (expected names separated by dots)");
    CHECK(only_error("app: 'pkg.mod:'\n") ==
          prefix +
              "\"\" is not a Python callable name (expected `name`, `obj.name` or a factory "
              "`name()` without arguments)");
    CHECK(only_error("app: pkg.mod:create_app(1)\n") ==
          prefix +
              "\"create_app(1)\" is not a Python callable name (expected `name`, `obj.name` "
              "or a factory `name()` without arguments)");
    CHECK(only_error("app: 1pkg:app\n")
              .ends_with("\"1pkg\" is not a Python module path (expected "
                         "names separated by dots)"));
    for (const char* ok : {"pkg.mod:app", "pkg.mod:create_app()", "m:obj.attr", "_m1:_a2"}) {
        CAPTURE(ok);
        CHECK(valid(std::string("app: ") + ok + "\n").app == ok);
    }
}

TEST_CASE("enums suggest the closest value") {
    CHECK(only_error("app: a:b\ninterface: wgsi\n") ==
          "/srv/app/molt.yaml:2:12: interface: expected one of wsgi, asgi, got \"wgsi\"; did you "
          "mean `wsgi`?");
    CHECK(only_error("app: a:b\nlogging: {level: warn}\n") ==
          "/srv/app/molt.yaml:2:18: logging.level: expected one of debug, info, warning, error, "
          "got \"warn\"; did you mean `warning`?");
    CHECK(only_error("app: a:b\nlogging: {format: xml}\n") ==
          "/srv/app/molt.yaml:2:19: logging.format: expected one of text, json, got \"xml\"");
}

TEST_CASE("listen addresses are checked one by one") {
    CHECK(only_error("app: a:b\nlisten: [http://0.0.0.0:80]\n") ==
          "/srv/app/molt.yaml:2:10: listen[0]: invalid address \"http://0.0.0.0:80\": unknown "
          "scheme \"http\": expected tcp://host:port or unix:/path");
    CHECK(only_error("app: a:b\nlisten:\n  - tcp://:80\n  - tcp://:99999\n") ==
          "/srv/app/molt.yaml:4:5: listen[1]: invalid address \"tcp://:99999\": invalid port "
          "\"99999\": expected a number from 0 to 65535");
    CHECK(only_error("app: a:b\nlisten: 'unix:'\n") ==
          "/srv/app/molt.yaml:2:9: listen: invalid address \"unix:\": missing path: expected "
          "unix:/path/to/app.sock");
    CHECK(only_error("app: a:b\nlisten: []\n") ==
          "/srv/app/molt.yaml:2:9: listen: needs at least one address; leave `listen` out for "
          "the default tcp://127.0.0.1:8000");
    CHECK(only_error("app: a:b\nlisten: [{backlog: 5}]\n") ==
          "/srv/app/molt.yaml:2:10: listen[0]: missing `address`");
    CHECK(only_error("app: a:b\nlisten: [[tcp://:80]]\n") ==
          "/srv/app/molt.yaml:2:10: listen[0]: expected an address or a mapping with `address`, "
          "got a sequence");
    CHECK(only_error("app: a:b\nlisten: [{address: 'unix:/a', mode: 999}]\n") ==
          "/srv/app/molt.yaml:2:37: listen[0].mode: expected an octal file mode from 0000 to "
          "0777 like \"0660\", got \"999\"");
}

TEST_CASE("duplicate listen addresses and names are errors") {
    CHECK(only_error("app: a:b\nlisten: ['tcp://*:80', ':80']\n") ==
          "/srv/app/molt.yaml:2:24: listen[1]: duplicate address tcp://0.0.0.0:80 (also in "
          "listen[0])");
    CHECK(only_error("app: a:b\nlisten: ['unix:/a.sock', 'unix:///a.sock']\n") ==
          "/srv/app/molt.yaml:2:26: listen[1]: duplicate address unix:/a.sock (also in "
          "listen[0])");
    CHECK(only_error("app: a:b\nlisten:\n  - {address: ':80', name: web}\n"
                     "  - {address: ':81', name: web}\n") ==
          "/srv/app/molt.yaml:4:5: listen[1]: duplicate name \"web\" (also in listen[0])");
    CHECK(only_error("app: a:b\nlisten: ':9191'\nmetrics: {listen: 'tcp://0.0.0.0:9191'}\n") ==
          "/srv/app/molt.yaml:3:19: metrics.listen: tcp://0.0.0.0:9191 is already used by listen");
}

TEST_CASE("health.path, version_file, env and the access log format are checked") {
    CHECK(only_error("app: a:b\nhealth: {path: healthz}\n") ==
          "/srv/app/molt.yaml:2:16: health.path: must be a URL path starting with `/`, like "
          "/healthz, got \"healthz\"");
    CHECK(only_error("app: a:b\nversion_file: /srv/REVISION\n") ==
          "/srv/app/molt.yaml:2:15: version_file: must be a path relative to the release "
          "directory (`chdir`), like REVISION, got \"/srv/REVISION\"");
    CHECK(only_error("app: a:b\nenv: [A=1]\n") ==
          "/srv/app/molt.yaml:2:6: env: expected a mapping of NAME: value, got a sequence");
    CHECK(only_error("app: a:b\nenv:\n  A: [1, 2]\n") ==
          "/srv/app/molt.yaml:3:6: env.A: expected a string or number (quote it; \"\" for "
          "empty), got a sequence");
    CHECK(only_error("app: a:b\nenv:\n  A:\n") ==
          "/srv/app/molt.yaml:3:3: env.A: expected a string or number (quote it; \"\" for "
          "empty), got nothing (null)");
    CHECK(only_error("app: a:b\nenv: {MOLT_WORKER: 3}\n") ==
          "/srv/app/molt.yaml:2:7: env.MOLT_WORKER: is set by molt for each worker; choose "
          "another name");
    CHECK(only_error("app: a:b\nenv: {'A=B': 3}\n") ==
          "/srv/app/molt.yaml:2:7: env: invalid variable name \"A=B\"");
    CHECK(only_error("app: a:b\nlogging: {access_log_format: '{status} {sttus}'}\n") ==
          "/srv/app/molt.yaml:2:30: logging.access_log_format: unknown placeholder `{sttus}`; "
          "did you mean `{status}`?");
    CHECK(only_error("app: a:b\nlogging: {access_log_format: '{status'}\n") ==
          "/srv/app/molt.yaml:2:30: logging.access_log_format: unclosed `{` (write `{{` for a "
          "literal brace)");
    CHECK(only_error("app: a:b\nhttp: {version_header: 'X Version'}\n") ==
          "/srv/app/molt.yaml:2:24: http.version_header: \"X Version\" is not a valid HTTP "
          "header name");
    CHECK(only_error("app: a:b\ncontrol: {socket: ''}\n") ==
          "/srv/app/molt.yaml:2:19: control.socket: expected a path, got an empty string");
}

TEST_CASE("every error is collected, in file order") {
    const auto lines = errors_of(
        "wrokers: 4\n"
        "threads: 0\n"
        "interface: wgsi\n"
        "timeouts:\n"
        "  bot: 30s\n"
        "  graceful: 0s\n"
        "listen: [http://x:1, 'tcp://:80', 'tcp://:80']\n"
        "recycle: {max_rss: 1k}\n");
    REQUIRE(lines.size() == 9);
    CHECK(lines[0].starts_with("/srv/app/molt.yaml: app: app is required"));
    CHECK(lines[1] == "/srv/app/molt.yaml:1:1: wrokers: unknown key; did you mean `workers`?");
    CHECK(lines[2] == "/srv/app/molt.yaml:2:10: threads: must be at least 1, got 0");
    CHECK(lines[3].starts_with("/srv/app/molt.yaml:3:12: interface: "));
    CHECK(lines[4] == "/srv/app/molt.yaml:5:3: timeouts.bot: unknown key; did you mean `boot`?");
    CHECK(lines[5] == "/srv/app/molt.yaml:6:13: timeouts.graceful: must be greater than 0, got 0s");
    CHECK(lines[6].starts_with("/srv/app/molt.yaml:7:10: listen[0]: invalid address"));
    CHECK(lines[7] ==
          "/srv/app/molt.yaml:7:35: listen[2]: duplicate address tcp://0.0.0.0:80 "
          "(also in listen[1])");
    CHECK(lines[8].starts_with("/srv/app/molt.yaml:8:20: recycle.max_rss: invalid size \"1k\""));
    CHECK(load("wrokers: 4\n").config == nullptr);
}

TEST_CASE("ConfigError::to_string leaves out what is unknown") {
    ConfigError error{"molt.yaml", 3, 7, "timeouts.boot", "bad"};
    CHECK(error.to_string() == "molt.yaml:3:7: timeouts.boot: bad");
    error.line = 0;
    CHECK(error.to_string() == "molt.yaml: timeouts.boot: bad");
    error.key.clear();
    CHECK(error.to_string() == "molt.yaml: bad");
}

TEST_CASE("proxy and listener edge settings are checked") {
    CHECK(only_error("app: a:b\nproxy: {trusted: [127.0.0.1, 10.0.0.0/33]}\n") ==
          "/srv/app/molt.yaml:2:30: proxy.trusted[1]: \"10.0.0.0/33\" is not an IP address, a "
          "CIDR (10.0.0.0/8), `unix` or `*`");
    CHECK(only_error("app: a:b\nproxy: {headers: [x-real-ip]}\n") ==
          "/srv/app/molt.yaml:2:19: proxy.headers[0]: \"x-real-ip\" is not one of "
          "x-forwarded-for, x-forwarded-proto, x-forwarded-host, x-forwarded-port, forwarded");
    CHECK(errors_of("app: a:b\nproxy: {trusted: [unix, \"*\", \"::1\", fd00::/8]}\n").empty());
    CHECK(only_error("app: a:b\nlisten:\n  - address: tcp://0.0.0.0:1\n    tls: {cert: c.pem}\n") ==
          "/srv/app/molt.yaml:4:10: listen[0].tls: needs both `cert` and `key`");
    CHECK(only_error("app: a:b\nlisten:\n  - address: tcp://0.0.0.0:1\n"
                     "    tls: {cert: c, key: k, min_version: \"1.1\"}\n") ==
          "/srv/app/molt.yaml:4:41: listen[0].tls.min_version: must be \"1.2\" or \"1.3\", got "
          "\"1.1\"");
    for (const char* engine : {"engine: python\n", "interface: asgi\n"}) {
        CHECK(only_error(std::string("app: a:b\n") + engine +
                         "listen:\n  - address: tcp://0.0.0.0:1\n"
                         "    proxy_protocol: true\n    tls: {cert: c, key: k}\n") ==
              "/srv/app/molt.yaml:4:5: listen[0]: `proxy_protocol` together with `tls` needs "
              "the native engine (interface: wsgi, engine: native or auto), which reads the "
              "PROXY header before the TLS handshake");
    }
    for (const char* engine : {"", "engine: native\n"}) {
        CHECK(errors_of(std::string("app: a:b\n") + engine +
                        "listen:\n  - address: tcp://0.0.0.0:1\n"
                        "    proxy_protocol: true\n    tls: {cert: c, key: k}\n")
                  .empty());
    }
    CHECK(only_error("app: a:b\nlisten:\n  - {address: unix:/run/a.sock, defer_accept: 1s}\n") ==
          "/srv/app/molt.yaml:3:47: listen[0].defer_accept: applies to TCP addresses only");
    CHECK(only_error("app: a:b\nlisten:\n  - {address: tcp://0.0.0.0:1, defer_accept: soon}\n")
              .find("listen[0].defer_accept: ") != std::string::npos);
}

}  // namespace
}  // namespace molt::config::test
