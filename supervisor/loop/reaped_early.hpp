#pragma once
// Children the master reaped before it knew them: a worker forked by a zygote (or the zygote's
// spare, handed a fork request) can exit before the zygote's FORKED= answer is read, and an
// app's orphaned subprocess is re-parented to the master, the subreaper. The exit is kept so
// that an answer naming the pid can replay it. Kept briefly: an answer comes within
// milliseconds of its fork, and a pid kept longer could be reused by a later worker, whose
// answer would then replay a stranger's exit. Pure; tests/unit/edges/reaped_early_tests.cpp.

#include <sys/types.h>

#include <chrono>
#include <map>
#include <optional>

namespace molt::loop {

class ReapedEarly {
  public:
    using Time = std::chrono::milliseconds;  // the master's clock (core::Time)
    static constexpr Time kKeptFor{10'000};
    static constexpr std::size_t kMaxKept = 256;

    void remember(pid_t pid, int status, Time now) {
        forget_older_than(now - kKeptFor);
        kept_[pid] = Entry{status, now};
        while (kept_.size() > kMaxKept) forget_oldest();
    }

    // The exit status of `pid` if it was reaped lately; the entry is gone afterwards.
    std::optional<int> take(pid_t pid, Time now) {
        forget_older_than(now - kKeptFor);
        auto it = kept_.find(pid);
        if (it == kept_.end()) return std::nullopt;
        int status = it->second.status;
        kept_.erase(it);
        return status;
    }

    // Whether `pid` was reaped lately; the entry stays.
    bool contains(pid_t pid, Time now) {
        forget_older_than(now - kKeptFor);
        return kept_.count(pid) > 0;
    }

    std::size_t size() const { return kept_.size(); }

  private:
    struct Entry {
        int status;
        Time reaped;
    };

    void forget_older_than(Time oldest) {
        std::erase_if(kept_, [&](const auto& entry) { return entry.second.reaped < oldest; });
    }

    void forget_oldest() {
        auto oldest = kept_.begin();
        for (auto it = kept_.begin(); it != kept_.end(); ++it)
            if (it->second.reaped < oldest->second.reaped) oldest = it;
        kept_.erase(oldest);
    }

    std::map<pid_t, Entry> kept_;
};

}  // namespace molt::loop
