// The `engine:` key: which WSGI data path a worker runs, passed on in MOLT_WORKER_CONFIG.
#include <doctest/doctest.h>

#include <nlohmann/json.hpp>

#include "helpers.hpp"

namespace molt::config::test {
namespace {

using nlohmann::json;

std::string engine_sent_to_worker(const Config& c) {
    return json::parse(worker_config_json(c, "/srv/app", "v1", 1, 0)).at("engine");
}

TEST_CASE("engine defaults to auto and reaches the worker") {
    const Config c = valid("app: a:b\n");
    CHECK(c.engine == Engine::auto_);
    CHECK(engine_sent_to_worker(c) == "auto");
}

TEST_CASE("engine takes native and python") {
    const Config native = valid("app: a:b\nengine: native\n");
    CHECK(native.engine == Engine::native);
    CHECK(engine_sent_to_worker(native) == "native");
    const Config python = valid("app: a:b\nengine: python\n");
    CHECK(python.engine == Engine::python);
    CHECK(engine_sent_to_worker(python) == "python");
}

TEST_CASE("an unknown engine is an error with a suggestion") {
    CHECK(only_error("app: a:b\nengine: natve\n") ==
          "/srv/app/molt.yaml:2:9: engine: expected one of auto, native, python, got \"natve\"; "
          "did you mean `native`?");
}

TEST_CASE("the engine changes the config digest") {
    CHECK(config_digest(valid("app: a:b\nengine: native\n")) != config_digest(valid("app: a:b\n")));
}

}  // namespace
}  // namespace molt::config::test
