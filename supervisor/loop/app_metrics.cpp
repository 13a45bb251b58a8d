// metrics.app_multiprocess: one PROMETHEUS_MULTIPROC_DIR per generation, under a directory the
// master makes on first use and removes at exit. prometheus_client's multiprocess mode writes
// one file per process and metric type; the master does what the app cannot do for itself:
// mark a dead worker (mark_process_dead: its live gauges go) and drop a gone generation's files.
#include <stdlib.h>

#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <system_error>

#include "supervisor/loop/launch.hpp"
#include "supervisor/loop/master.hpp"

namespace molt::loop {

namespace fs = std::filesystem;

namespace {

constexpr const char* kGenerationPrefix = "generation-";

std::string generation_dir(const std::string& root, core::GenerationId generation) {
    return root + "/" + kGenerationPrefix + std::to_string(generation);
}

}  // namespace

std::string Master::app_metrics_dir(const config::Config& config, core::GenerationId generation) {
    if (!config.metrics.app_multiprocess) return {};
    if (app_metrics_root_.empty()) {
        // systemd's RuntimeDirectory= when there is one, the temporary directory otherwise.
        const char* base = std::getenv("RUNTIME_DIRECTORY");
        if (base == nullptr || *base == '\0') base = std::getenv("TMPDIR");
        if (base == nullptr || *base == '\0') base = "/tmp";
        std::string pattern = std::string(base) + "/molt-app-metrics.XXXXXX";
        if (::mkdtemp(pattern.data()) == nullptr) {
            log().warning("metrics.app_multiprocess: cannot create a directory under " +
                          std::string(base) + ": " + std::strerror(errno));
            return {};
        }
        // mkdtemp makes it 0700; workers that run as user: must be able to pass through it.
        std::error_code mode_error;
        fs::permissions(pattern,
                        fs::perms::owner_all | fs::perms::group_exec | fs::perms::others_exec,
                        mode_error);
        app_metrics_root_ = pattern;
    }
    std::string dir = generation_dir(app_metrics_root_, generation);
    std::error_code error;
    fs::create_directory(dir, error);
    if (error) {
        log().warning("metrics.app_multiprocess: " + dir + ": " + error.message());
        return {};
    }
    // Workers that run as user:/group: must be able to write their files there.
    os::SpawnRequest identity;
    std::string failure = resolve_identity(config, identity);
    if (failure.empty()) failure = os::change_owner(dir, identity.uid, identity.gid);
    if (!failure.empty()) log().warning("metrics.app_multiprocess: " + failure);
    return dir;
}

// What prometheus_client.multiprocess.mark_process_dead(pid) does: the dead process's live
// gauges (gauge_live*_PID.db) no longer count. Its counters and histograms stay: they are
// what the generation served.
void Master::app_metrics_process_dead(core::GenerationId generation, pid_t pid) {
    if (app_metrics_root_.empty()) return;
    std::string suffix = "_" + std::to_string(pid) + ".db";
    std::error_code error;
    for (const auto& entry :
         fs::directory_iterator(generation_dir(app_metrics_root_, generation), error)) {
        std::string name = entry.path().filename().string();
        if (name.rfind("gauge_live", 0) == 0 && name.size() > suffix.size() &&
            name.compare(name.size() - suffix.size(), suffix.size(), suffix) == 0) {
            fs::remove(entry.path(), error);
        }
    }
}

// A generation's directory goes when the generation does: not starting, live or draining, and
// no worker of it left (a failed generation's workers may still be stopping).
void Master::sweep_app_metrics_dirs() {
    if (app_metrics_root_.empty()) return;
    std::error_code error;
    for (const auto& entry : fs::directory_iterator(app_metrics_root_, error)) {
        std::string name = entry.path().filename().string();
        if (name.rfind(kGenerationPrefix, 0) != 0) continue;
        core::GenerationId id =
            std::strtoull(name.c_str() + std::strlen(kGenerationPrefix), nullptr, 10);
        if (!generation_exists(id)) fs::remove_all(entry.path(), error);
    }
}

void Master::remove_app_metrics_root() {
    if (app_metrics_root_.empty()) return;
    std::error_code error;
    fs::remove_all(app_metrics_root_, error);
    app_metrics_root_.clear();
}

std::optional<Master::AppMetricsScrape> Master::app_metrics_scrape() {
    if (!config_ || !config_->metrics.app_multiprocess) return std::nullopt;
    sweep_app_metrics_dirs();
    AppMetricsScrape scrape;
    scrape.python = config_->python;
    if (app_metrics_root_.empty()) return scrape;
    std::error_code error;
    for (const auto& entry : fs::directory_iterator(app_metrics_root_, error)) {
        scrape.dirs.push_back(entry.path().string());
    }
    return scrape;
}

}  // namespace molt::loop
