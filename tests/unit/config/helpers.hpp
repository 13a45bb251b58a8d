// Shared helpers for the config tests.
#pragma once

#include <doctest/doctest.h>
#include <stdlib.h>

#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

#include "config/config.hpp"

namespace molt::config::test {

// The label used for in-memory configs: a fixed absolute path, so relative paths in the
// tests resolve against /srv/app.
inline const std::string kLabel = "/srv/app/molt.yaml";

inline LoadResult load(const std::string& yaml) {
    return load_config_text(yaml, kLabel, false);
}

inline std::vector<std::string> error_lines(const LoadResult& result) {
    std::vector<std::string> lines;
    for (const auto& error : result.errors) lines.push_back(error.to_string());
    return lines;
}

inline std::vector<std::string> errors_of(const std::string& yaml) {
    return error_lines(load(yaml));
}

// The one error a config produces; fails the test if there is not exactly one.
inline std::string only_error(const std::string& yaml) {
    const auto lines = errors_of(yaml);
    INFO("yaml: " << yaml);
    REQUIRE(lines.size() == 1);
    return lines.front();
}

// Loads a config that must be valid.
inline Config valid(const std::string& yaml) {
    const auto result = load(yaml);
    for (const auto& line : error_lines(result)) FAIL_CHECK(line);
    REQUIRE(result.config != nullptr);
    return *result.config;
}

// A fresh directory under /tmp, removed with everything in it at the end of the scope.
class TempDir {
  public:
    TempDir() {
        std::string pattern = (std::filesystem::temp_directory_path() / "molt-config-XXXXXX");
        REQUIRE(::mkdtemp(pattern.data()) != nullptr);
        path_ = pattern;
    }
    ~TempDir() {
        std::error_code ec;
        std::filesystem::permissions(path_, std::filesystem::perms::owner_all,
                                     std::filesystem::perm_options::add, ec);
        std::filesystem::remove_all(path_, ec);
    }
    TempDir(const TempDir&) = delete;
    TempDir& operator=(const TempDir&) = delete;

    const std::filesystem::path& path() const { return path_; }

    std::string write(const std::string& name, const std::string& text) const {
        const auto file = path_ / name;
        std::filesystem::create_directories(file.parent_path());
        std::ofstream(file) << text;
        return file.string();
    }

  private:
    std::filesystem::path path_;
};

}  // namespace molt::config::test
