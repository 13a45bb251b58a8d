#include "supervisor/loop/watch.hpp"

#include <fmt/format.h>

#include <algorithm>
#include <fstream>

#include "supervisor/os/os.hpp"

namespace molt::loop {

namespace {

constexpr std::size_t kMaxHashedFile = 16 * 1024 * 1024;

// Byproducts that change without the source changing.
bool ignored(const std::string& name) {
    if (name.empty() || name == "__pycache__" || name == ".git" || name == ".hg" ||
        name == "node_modules" || name == ".mypy_cache" || name == ".pytest_cache") {
        return true;
    }
    auto ends_with = [&](std::string_view suffix) {
        return name.size() >= suffix.size() &&
               name.compare(name.size() - suffix.size(), suffix.size(), suffix) == 0;
    };
    return ends_with(".pyc") || ends_with(".swp") || ends_with(".swx") || ends_with("~") ||
           name.rfind(".#", 0) == 0 || name == "4913";  // vim's write probe
}

std::uint64_t fnv(std::uint64_t hash, std::string_view data) {
    for (unsigned char c : data) hash = (hash ^ c) * 1099511628211ULL;
    return hash;
}

std::uint64_t hash_file(std::uint64_t hash, const std::string& path) {
    std::ifstream file(path, std::ios::binary);
    char buffer[65536];
    std::size_t total = 0;
    while (file && total < kMaxHashedFile) {
        file.read(buffer, sizeof buffer);
        auto n = static_cast<std::size_t>(file.gcount());
        if (n == 0) break;
        hash = fnv(hash, std::string_view(buffer, n));
        total += n;
    }
    return hash;
}

// A directory's entries without the ignored byproducts; none when it cannot be read.
std::vector<std::string> watched_entries(const std::string& dir) {
    auto listed = os::list_directory(dir);
    if (!os::ok(listed)) return {};
    auto names = std::move(std::get<0>(listed));
    names.erase(std::remove_if(names.begin(), names.end(), ignored), names.end());
    return names;
}

bool is_directory(const std::string& path) {
    return os::file_info(path).kind == os::FileInfo::Kind::directory;
}

std::uint64_t hash_tree(std::uint64_t hash, const std::string& dir, const std::string& rel) {
    // An unreadable directory hashes as empty; the next event that reaches it tries again.
    std::vector<std::string> names = watched_entries(dir);
    std::sort(names.begin(), names.end());
    for (const auto& name : names) {
        std::string path = dir + "/" + name;
        auto kind = os::file_info(path).kind;
        if (kind == os::FileInfo::Kind::missing) continue;
        hash = fnv(hash, rel + "/" + name + "\n");
        if (kind == os::FileInfo::Kind::directory) {
            hash = hash_tree(hash, path, rel + "/" + name);
        } else if (kind == os::FileInfo::Kind::symlink) {
            hash = fnv(hash, os::read_link(path));
        } else if (kind == os::FileInfo::Kind::regular) {
            hash = hash_file(hash, path);
        }
    }
    return hash;
}

std::string parent_of(const std::string& path) {
    auto slash = path.rfind('/');
    if (slash == std::string::npos) return ".";
    if (slash == 0) return "/";
    return path.substr(0, slash);
}

std::string name_of(const std::string& path) {
    return path.substr(path.rfind('/') + 1);
}

}  // namespace

struct Watcher::Handle {
    Watcher* owner = nullptr;
    std::string dir;
    std::vector<std::string> names;  // empty: every entry counts
    uv_fs_event_t event{};
};

Watcher::Watcher(uv_loop_t* loop, std::vector<std::string> paths, OnChange on_change,
                 std::uint64_t debounce_ms)
    : loop_(loop),
      paths_(std::move(paths)),
      on_change_(std::move(on_change)),
      debounce_ms_(debounce_ms) {}

Watcher::~Watcher() {
    close();
}

std::string Watcher::fingerprint(const std::string& path) {
    os::FileInfo info = os::file_info(path);
    switch (info.kind) {
        case os::FileInfo::Kind::missing:
            return "missing";
        case os::FileInfo::Kind::symlink:
            return "link:" + os::read_link(path);
        case os::FileInfo::Kind::directory:
            return fmt::format("tree:{:016x}", hash_tree(1469598103934665603ULL, path, ""));
        default:
            return fmt::format("file:{}.{:09}:{}", info.mtime_sec, info.mtime_nsec, info.size);
    }
}

std::vector<std::string> Watcher::start() {
    std::vector<std::string> problems;
    uv_timer_init(loop_, &timer_);
    timer_.data = this;
    for (const auto& path : paths_) {
        fingerprints_[path] = fingerprint(path);
        if (is_directory(path)) {
            watch_tree(path);
        } else {
            // A symlink or file is replaced by rename: only its directory sees that.
            std::string parent = parent_of(path);
            if (!os::exists(parent)) {
                problems.push_back(
                    fmt::format("watch: {}: its directory {} does not exist", path, parent));
                continue;
            }
            watch_directory(parent, name_of(path));
        }
    }
    return problems;
}

void Watcher::watch_directory(const std::string& dir, const std::string& only_name) {
    auto& handle = handles_[dir];
    if (handle) {
        if (only_name.empty()) {
            handle->names.clear();
        } else if (!handle->names.empty()) {
            handle->names.push_back(only_name);
        }
        return;
    }
    handle = std::make_unique<Handle>();
    handle->owner = this;
    handle->dir = dir;
    if (!only_name.empty()) handle->names.push_back(only_name);
    uv_fs_event_init(loop_, &handle->event);
    handle->event.data = handle.get();
    uv_fs_event_start(
        &handle->event,
        [](uv_fs_event_t* event, const char* filename, int, int) {
            auto* h = static_cast<Handle*>(event->data);
            h->owner->on_event(h->dir, filename);
        },
        dir.c_str(), 0);
}

void Watcher::watch_tree(const std::string& root) {
    // inotify is not recursive: every directory of the tree gets its own watch.
    watch_directory(root, "");
    for (const auto& name : watched_entries(root)) {
        std::string path = root + "/" + name;
        if (is_directory(path)) watch_tree(path);
    }
}

void Watcher::on_event(const std::string& dir, const char* name) {
    if (closed_) return;
    std::string entry = name ? name : "";
    if (ignored(entry)) return;
    const Handle& handle = *handles_.at(dir);
    if (!handle.names.empty() &&
        std::find(handle.names.begin(), handle.names.end(), entry) == handle.names.end()) {
        return;
    }
    // A new subdirectory of a watched tree needs its own watch.
    std::string path = dir + "/" + entry;
    if (handle.names.empty() && is_directory(path)) {
        watch_tree(path);
    }
    uv_timer_start(
        &timer_, [](uv_timer_t* t) { static_cast<Watcher*>(t->data)->settle(); }, debounce_ms_, 0);
}

void Watcher::settle() {
    std::vector<std::string> changed;
    for (auto& [path, old] : fingerprints_) {
        std::string now = fingerprint(path);
        if (now != old) {
            changed.push_back(path);
            old = now;
        }
    }
    // An empty list tells the owner that files were written but nothing changed.
    on_change_(fmt::format("{}", fmt::join(changed, ", ")));
}

void Watcher::close() {
    if (closed_) return;
    closed_ = true;
    if (handles_.empty() && timer_.loop == nullptr) return;
    for (auto& [dir, handle] : handles_) {
        uv_fs_event_stop(&handle->event);
        // Ownership passes to libuv until the close callback.
        Handle* raw = handle.release();
        uv_close(reinterpret_cast<uv_handle_t*>(&raw->event),
                 [](uv_handle_t* h) { delete static_cast<Handle*>(h->data); });
    }
    handles_.clear();
    if (timer_.loop != nullptr) uv_close(reinterpret_cast<uv_handle_t*>(&timer_), nullptr);
}

}  // namespace molt::loop
