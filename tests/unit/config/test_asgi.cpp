// `root_path` and the `asgi:` section: uvicorn's settings, passed on in MOLT_WORKER_CONFIG.
#include <doctest/doctest.h>

#include <nlohmann/json.hpp>

#include "helpers.hpp"

namespace molt::config::test {
namespace {

using nlohmann::json;

json sent_to_worker(const Config& c) {
    return json::parse(worker_config_json(c, "/srv/app", "v1", 1, 0));
}

TEST_CASE("the asgi section has uvicorn's defaults and reaches the worker") {
    const json sent = sent_to_worker(valid("app: a:b\n"));
    CHECK(sent.at("root_path") == "");
    CHECK(sent.at("asgi") == json{{"loop", "auto"},
                                  {"limit_concurrency", 0},
                                  {"ws_max_size", 16 * 1024 * 1024},
                                  {"ws_ping_interval_ms", 20000},
                                  {"ws_ping_timeout_ms", 20000},
                                  {"ws_per_message_deflate", true},
                                  {"server_header", false},
                                  {"date_header", true}});
}

TEST_CASE("every asgi key is read") {
    const Config c = valid(
        "app: a:b\ninterface: asgi\nroot_path: /api/\n"
        "asgi: {loop: uvloop, limit_concurrency: 50, ws_max_size: 1MiB, ws_ping_interval: 5s,\n"
        "       ws_ping_timeout: 0s, ws_per_message_deflate: false, server_header: true,\n"
        "       date_header: false}\n");
    CHECK(c.root_path == "/api");  // trailing slash dropped, as uvicorn's joins expect
    CHECK(c.asgi.loop == AsgiLoop::uvloop);
    const json sent = sent_to_worker(c);
    CHECK(sent.at("root_path") == "/api");
    CHECK(sent.at("asgi") == json{{"loop", "uvloop"},
                                  {"limit_concurrency", 50},
                                  {"ws_max_size", 1024 * 1024},
                                  {"ws_ping_interval_ms", 5000},
                                  {"ws_ping_timeout_ms", 0},
                                  {"ws_per_message_deflate", false},
                                  {"server_header", true},
                                  {"date_header", false}});
}

TEST_CASE("root_path / means no prefix") {
    CHECK(valid("app: a:b\nroot_path: /\n").root_path == "");
}

TEST_CASE("bad asgi values are errors") {
    CHECK(only_error("app: a:b\nroot_path: api\n") ==
          "/srv/app/molt.yaml:2:12: root_path: must be empty or a URL path starting with `/`, "
          "like /api, got \"api\"");
    CHECK(only_error("app: a:b\nasgi: {loop: uvlop}\n") ==
          "/srv/app/molt.yaml:2:14: asgi.loop: expected one of auto, asyncio, uvloop, got "
          "\"uvlop\"; did you mean `uvloop`?");
    CHECK(only_error("app: a:b\nasgi: {ws_max_siz: 1MiB}\n").find("did you mean `ws_max_size`") !=
          std::string::npos);
}

}  // namespace
}  // namespace molt::config::test
