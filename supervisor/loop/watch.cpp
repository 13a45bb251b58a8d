#include "supervisor/loop/watch.hpp"

#include <dirent.h>
#include <fmt/format.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <climits>
#include <cstring>
#include <fstream>

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

std::uint64_t hash_tree(std::uint64_t hash, const std::string& dir, const std::string& rel) {
    DIR* d = ::opendir(dir.c_str());
    if (d == nullptr) return hash;
    std::vector<std::string> names;
    while (dirent* entry = ::readdir(d)) {
        std::string name = entry->d_name;
        if (name != "." && name != ".." && !ignored(name)) names.push_back(name);
    }
    ::closedir(d);
    std::sort(names.begin(), names.end());
    for (const auto& name : names) {
        std::string path = dir + "/" + name;
        struct stat st {};
        if (::lstat(path.c_str(), &st) != 0) continue;
        hash = fnv(hash, rel + "/" + name + "\n");
        if (S_ISDIR(st.st_mode)) {
            hash = hash_tree(hash, path, rel + "/" + name);
        } else if (S_ISLNK(st.st_mode)) {
            char target[PATH_MAX];
            ssize_t n = ::readlink(path.c_str(), target, sizeof target);
            if (n > 0) hash = fnv(hash, std::string_view(target, static_cast<std::size_t>(n)));
        } else if (S_ISREG(st.st_mode)) {
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
    struct stat st {};
    if (::lstat(path.c_str(), &st) != 0) return "missing";
    if (S_ISLNK(st.st_mode)) {
        char target[PATH_MAX];
        ssize_t n = ::readlink(path.c_str(), target, sizeof target);
        return "link:" + std::string(target, n > 0 ? static_cast<std::size_t>(n) : 0);
    }
    if (S_ISDIR(st.st_mode)) {
        return fmt::format("tree:{:016x}", hash_tree(1469598103934665603ULL, path, ""));
    }
    return fmt::format("file:{}.{:09}:{}", st.st_mtim.tv_sec, st.st_mtim.tv_nsec, st.st_size);
}

std::vector<std::string> Watcher::start() {
    std::vector<std::string> problems;
    uv_timer_init(loop_, &timer_);
    timer_.data = this;
    for (const auto& path : paths_) {
        fingerprints_[path] = fingerprint(path);
        struct stat st {};
        bool is_dir = ::lstat(path.c_str(), &st) == 0 && S_ISDIR(st.st_mode);
        if (is_dir) {
            watch_tree(path);
        } else {
            // A symlink or file is replaced by rename: only its directory sees that.
            std::string parent = parent_of(path);
            if (::access(parent.c_str(), F_OK) != 0) {
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
    DIR* d = ::opendir(root.c_str());
    if (d == nullptr) return;
    std::vector<std::string> subdirs;
    while (dirent* entry = ::readdir(d)) {
        std::string name = entry->d_name;
        if (name == "." || name == ".." || ignored(name)) continue;
        std::string path = root + "/" + name;
        struct stat st {};
        if (::lstat(path.c_str(), &st) == 0 && S_ISDIR(st.st_mode)) subdirs.push_back(path);
    }
    ::closedir(d);
    for (const auto& sub : subdirs) watch_tree(sub);
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
    struct stat st {};
    if (handle.names.empty() && ::lstat(path.c_str(), &st) == 0 && S_ISDIR(st.st_mode)) {
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
