// parse_listen_address: every accepted form, its canonical text, and the refusals.
#include <doctest/doctest.h>

#include "config/config.hpp"

namespace molt::config {
namespace {

TEST_CASE("parse_listen_address accepts tcp, unix and gunicorn bind forms") {
    using Kind = ListenAddress::Kind;
    const struct {
        const char* input;
        Kind kind;
        const char* host;
        int port;
        const char* path;
        const char* text;
    } cases[] = {
        {"tcp://127.0.0.1:8000", Kind::tcp, "127.0.0.1", 8000, "", "tcp://127.0.0.1:8000"},
        {"tcp://localhost:80", Kind::tcp, "localhost", 80, "", "tcp://localhost:80"},
        {"tcp://[::1]:8080", Kind::tcp, "::1", 8080, "", "tcp://[::1]:8080"},
        {"tcp://[::]:8080", Kind::tcp, "::", 8080, "", "tcp://[::]:8080"},
        {"tcp://:8000", Kind::tcp, "0.0.0.0", 8000, "", "tcp://0.0.0.0:8000"},
        {"tcp://*:8000", Kind::tcp, "0.0.0.0", 8000, "", "tcp://0.0.0.0:8000"},
        {"tcp://127.0.0.1:0", Kind::tcp, "127.0.0.1", 0, "", "tcp://127.0.0.1:0"},
        {"tcp://host:65535", Kind::tcp, "host", 65535, "", "tcp://host:65535"},
        {"0.0.0.0:8000", Kind::tcp, "0.0.0.0", 8000, "", "tcp://0.0.0.0:8000"},
        {"[::1]:9000", Kind::tcp, "::1", 9000, "", "tcp://[::1]:9000"},
        {":8000", Kind::tcp, "0.0.0.0", 8000, "", "tcp://0.0.0.0:8000"},
        {"unix:/run/app.sock", Kind::unix_path, "", 0, "/run/app.sock", "unix:/run/app.sock"},
        {"unix:///run/app.sock", Kind::unix_path, "", 0, "/run/app.sock", "unix:/run/app.sock"},
        {"unix:app.sock", Kind::unix_path, "", 0, "app.sock", "unix:app.sock"},
        {"/run/app.sock", Kind::unix_path, "", 0, "/run/app.sock", "unix:/run/app.sock"},
    };
    for (const auto& c : cases) {
        CAPTURE(c.input);
        std::string error;
        const auto address = parse_listen_address(c.input, &error);
        REQUIRE_MESSAGE(address.has_value(), error);
        CHECK(address->kind == c.kind);
        CHECK(address->host == c.host);
        CHECK(address->port == c.port);
        CHECK(address->path == c.path);
        CHECK(address->text == c.text);
        CHECK(address->name == c.text);
        CHECK(address->backlog == 2048);
        CHECK(address->mode == 0660);
    }
}

TEST_CASE("parse_listen_address explains what is wrong") {
    const struct {
        const char* input;
        const char* error;
    } cases[] = {
        {"http://0.0.0.0:80", "unknown scheme \"http\": expected tcp://host:port or unix:/path"},
        {"tcp://localhost", "missing port: expected host:port, e.g. tcp://127.0.0.1:8000"},
        {"tcp://localhost:", "invalid port \"\": expected a number from 0 to 65535"},
        {"tcp://localhost:65536", "invalid port \"65536\": expected a number from 0 to 65535"},
        {"tcp://localhost:http", "invalid port \"http\": expected a number from 0 to 65535"},
        {"tcp://localhost:-1", "invalid port \"-1\": expected a number from 0 to 65535"},
        {"tcp://::1:8000", "IPv6 addresses need brackets, e.g. tcp://[::1]:8000"},
        {"tcp://[::1]8000", "missing port: expected [address]:port, e.g. tcp://[::1]:8000"},
        {"tcp://[::1:8000", "missing `]` after the IPv6 address"},
        {"tcp://[zz]:8000", "\"zz\" is not an IPv6 address"},
        {"tcp://my host:80", "\"my host\" is not a host name or IP address"},
        {"unix:", "missing path: expected unix:/path/to/app.sock"},
        {"unix://", "missing path: expected unix:/path/to/app.sock"},
        {"", "empty address: expected tcp://host:port or unix:/path"},
        {"localhost", "missing port: expected host:port, e.g. tcp://127.0.0.1:8000"},
    };
    for (const auto& c : cases) {
        CAPTURE(c.input);
        std::string error;
        CHECK_FALSE(parse_listen_address(c.input, &error).has_value());
        CHECK(error == c.error);
    }
}

TEST_CASE("parse_listen_address limits unix paths to what sun_path holds") {
    std::string error;
    CHECK(parse_listen_address("unix:/" + std::string(106, 'a'), &error).has_value());
    CHECK_FALSE(parse_listen_address("unix:/" + std::string(107, 'a'), &error).has_value());
    CHECK(error == "unix socket path is 108 bytes long; the limit is 107");
    // A null error pointer is allowed.
    CHECK_FALSE(parse_listen_address("nope", nullptr).has_value());
}

}  // namespace
}  // namespace molt::config
