// The `lifespan:` key: the ASGI lifespan protocol, passed on in MOLT_WORKER_CONFIG.
#include <doctest/doctest.h>

#include <nlohmann/json.hpp>

#include "helpers.hpp"

namespace molt::config::test {
namespace {

using nlohmann::json;

std::string lifespan_sent_to_worker(const Config& c) {
    return json::parse(worker_config_json(c, "/srv/app", "v1", 1, 0)).at("lifespan");
}

TEST_CASE("lifespan defaults to auto and reaches the worker") {
    const Config c = valid("app: a:b\n");
    CHECK(c.lifespan == Lifespan::auto_);
    CHECK(lifespan_sent_to_worker(c) == "auto");
}

TEST_CASE("lifespan takes on and off") {
    const Config on = valid("app: a:b\ninterface: asgi\nlifespan: on\n");
    CHECK(on.lifespan == Lifespan::on);
    CHECK(lifespan_sent_to_worker(on) == "on");
    const Config off = valid("app: a:b\ninterface: asgi\nlifespan: off\n");
    CHECK(off.lifespan == Lifespan::off);
    CHECK(lifespan_sent_to_worker(off) == "off");
}

TEST_CASE("an unknown lifespan is an error with a suggestion") {
    CHECK(only_error("app: a:b\nlifespan: offf\n") ==
          "/srv/app/molt.yaml:2:11: lifespan: expected one of auto, on, off, got \"offf\"; "
          "did you mean `off`?");
}

TEST_CASE("the lifespan changes the config digest") {
    CHECK(config_digest(valid("app: a:b\nlifespan: off\n")) != config_digest(valid("app: a:b\n")));
}

}  // namespace
}  // namespace molt::config::test
