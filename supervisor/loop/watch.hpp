// Change detection for `watch:` and `molt run --reload`: kernel file events (inotify through
// libuv), debounced, then a fingerprint decides whether anything really changed.
//
// What counts as a change depends on what is watched:
//   * a symlink (the `current` of a deploy): where it points;
//   * a file (a touch file, REVISION): its mtime and size, so `touch` is a deploy trigger;
//   * a directory (a source tree): the content of every file in it, so an editor that
//     rewrites a file unchanged, or a `git checkout` of the same commit, starts nothing.
// A burst of events (a deploy tool writing hundreds of files) gives one rollover.
#pragma once

#include <uv.h>

#include <functional>
#include <map>
#include <memory>
#include <string>
#include <vector>

namespace molt::loop {

class Watcher {
  public:
    // Called once per settled burst of events: with the changed paths, or with "" when files
    // were written but every fingerprint is as it was.
    using OnChange = std::function<void(const std::string& what)>;
    Watcher(uv_loop_t* loop, std::vector<std::string> paths, OnChange on_change,
            std::uint64_t debounce_ms = 300);
    ~Watcher();
    // Starts watching; returns problems (a path that does not exist yet is watched through
    // its parent directory, so it is not a problem).
    std::vector<std::string> start();
    void close();

    // The fingerprint of one watched path as defined above. Public for tests and logs.
    static std::string fingerprint(const std::string& path);

  private:
    struct Handle;
    void watch_directory(const std::string& dir, const std::string& only_name);
    void watch_tree(const std::string& root);
    void on_event(const std::string& dir, const char* name);
    void settle();

    uv_loop_t* loop_;
    std::vector<std::string> paths_;
    OnChange on_change_;
    std::uint64_t debounce_ms_;
    std::map<std::string, std::unique_ptr<Handle>> handles_;  // by watched directory
    std::map<std::string, std::string> fingerprints_;         // by watched path
    uv_timer_t timer_{};
    bool closed_ = false;
};

}  // namespace molt::loop
