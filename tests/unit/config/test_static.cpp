// The `static:` key: URL prefixes mapped to directories, served by the WSGI engines.
#include <doctest/doctest.h>

#include <nlohmann/json.hpp>

#include "helpers.hpp"

namespace molt::config::test {
namespace {

using nlohmann::json;

TEST_CASE("static entries are read in order and reach the worker as written") {
    const Config c = valid(
        "app: a:b\nstatic:\n  - {prefix: /static/, dir: staticfiles}\n"
        "  - {prefix: /media/, dir: /srv/media}\n");
    REQUIRE(c.statics.size() == 2);
    CHECK(c.statics[0].prefix == "/static/");
    CHECK(c.statics[0].dir == "staticfiles");  // relative: inside the release, per generation
    const json sent = json::parse(worker_config_json(c, "/srv/app", "v1", 1, 0)).at("static");
    CHECK(sent == json::parse(R"([{"prefix": "/static/", "dir": "staticfiles"},
                                 {"prefix": "/media/", "dir": "/srv/media"}])"));
}

TEST_CASE("static defaults to nothing") {
    CHECK(valid("app: a:b\n").statics.empty());
}

TEST_CASE("a static prefix must start and end with a slash") {
    CHECK(only_error("app: a:b\nstatic: [{prefix: static/, dir: s}]\n") ==
          "/srv/app/molt.yaml:2:19: static[0].prefix: must be a URL path of visible ASCII that "
          "starts and ends with `/`, like /static/, got \"static/\"");
    CHECK(only_error("app: a:b\nstatic: [{prefix: /static, dir: s}]\n")
              .find("static[0].prefix: must be a URL path") != std::string::npos);
}

TEST_CASE("a static prefix is visible ASCII") {
    // Matched against the path as it arrives: other bytes come percent-encoded and would never
    // match (and the Python engine answered nothing at all with one).
    for (const char* prefix : {"/\xe9\x9d\x99/", "/\xc3\xbc/", "\"/a b/\"", "/a%20/"}) {
        CAPTURE(prefix);
        CHECK(only_error(std::string("app: a:b\nstatic: [{prefix: ") + prefix + ", dir: s}]\n")
                  .find("static[0].prefix: must be a URL path of visible ASCII") !=
              std::string::npos);
    }
}

TEST_CASE("a static entry needs both keys, no others, and a prefix only once") {
    CHECK(only_error("app: a:b\nstatic: [{prefix: /s/}]\n").find("static[0]: missing `dir`") !=
          std::string::npos);
    CHECK(only_error("app: a:b\nstatic: [{prefix: /s/, dir: s, root: x}]\n")
              .find("static[0].root: unknown key") != std::string::npos);
    CHECK(only_error("app: a:b\nstatic: [{prefix: /s/, dir: a}, {prefix: /s/, dir: b}]\n")
              .find("static[1]: duplicate `prefix`") != std::string::npos);
    CHECK(only_error("app: a:b\nstatic: {prefix: /s/, dir: a}\n")
              .find("static: expected a list of {prefix, dir} mappings") != std::string::npos);
}

TEST_CASE("static is for WSGI apps") {
    CHECK(only_error("app: a:b\ninterface: asgi\nstatic: [{prefix: /s/, dir: a}]\n")
              .find("static: is served by the WSGI engines") != std::string::npos);
}

TEST_CASE("a static dir must exist, unless the check is offline") {
    TempDir dir;
    dir.write("release/assets/app.css", "body{}");
    const std::string yaml =
        "app: a:b\nchdir: release\nstatic:\n  - {prefix: /a/, dir: assets}\n"
        "  - {prefix: /b/, dir: missing}\n";
    const std::string file = dir.write("molt.yaml", yaml);
    const auto checked = load_config_file(file, true);
    REQUIRE(checked.errors.size() == 1);
    CHECK(checked.errors[0].key == "static[1].dir");
    CHECK(checked.errors[0].message.find("is not a directory (a relative dir is inside the "
                                         "release, `chdir`)") != std::string::npos);
    CHECK(load_config_file(file, false).errors.empty());
}

}  // namespace
}  // namespace molt::config::test
