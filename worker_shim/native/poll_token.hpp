// Which of a worker's serving threads waits for events, and when another one takes over.
//
// One thread at a time holds the token: it sleeps in epoll_wait and serves the event it gets
// itself, then goes back to epoll_wait, so a quick request costs no hand-off between threads
// (no futex wake-up, no context switch). Only when the holder has been serving for longer
// than `promote_after` does a timer wake the watcher, which takes the token (and the epoll)
// over; the first thread, once done, waits for the token in turn. So a slow app call (a
// database query, a sleep) still does not stop the worker from serving its other connections,
// after at most `promote_after`.
//
// Of the threads waiting for the token, one, the watcher, waits in poll() on that timer and on
// the server's stop eventfd; the others sleep on a condition variable until the watcher leaves
// (it took the token, or the server stops). So a timer expiry wakes one thread, not all of
// them. The timer is set only while a watcher waits (`threads: 1` pays no system call for
// it), and only when it is not set already: one set for an earlier event fires early, and
// the watcher it wakes sets it again for what is left of the holder's time. Under load it is
// set about once per `promote_after`, not once per event.
//
// Before this, the holder handed the token over as soon as it had an event (a mutex around
// epoll_wait), which cost 1.5 futex calls and about one context switch per request
// (docs/architecture.md, "One poller, promoted on a timer"); and then, every waiting thread
// polled the timer, set again at every event (one timerfd_settime per request).
#pragma once

#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <mutex>

namespace molt::native {

class PollToken {
  public:
    // stop_fd: readable once the server stops (level-triggered, never read).
    PollToken(int stop_fd, std::chrono::microseconds promote_after);
    ~PollToken();
    PollToken(const PollToken&) = delete;
    PollToken& operator=(const PollToken&) = delete;

    // Blocks until this thread holds the token; false when the server stops first.
    bool acquire();
    // The holder got an event and serves it now: from here on another thread may take the
    // token after `promote_after`. Returns the holder's turn, for done_serving().
    std::uint64_t serving();
    // Done with that event: true while the thread still holds the token (it waits for the
    // next event itself), false when another thread took it over meanwhile.
    bool done_serving(std::uint64_t turn);
    // The holder leaves (its epoll_wait failed): another thread takes the token at once.
    void release();

  private:
    using Clock = std::chrono::steady_clock;
    void arm(std::chrono::nanoseconds after, Clock::time_point now);

    const int stop_fd_;
    const std::chrono::microseconds promote_after_;
    int timer_fd_ = -1;
    std::mutex mu_;
    bool held_ = false;                // a thread holds the token
    bool serving_ = false;             // ... and is serving an event, not waiting in epoll_wait
    std::uint64_t turn_ = 0;           // counts the token's changes of hands
    Clock::time_point serving_since_;  // when the holder took the event it serves
    bool watcher_ = false;             // a thread in acquire() polls the timer
    int sleeping_ = 0;                 // threads in acquire() waiting on turn_cv_
    std::condition_variable turn_cv_;  // wakes a sleeper when the watcher leaves
    bool stopped_ = false;             // the watcher saw the stop eventfd
    Clock::time_point timer_due_;      // when the timer fires, or fired last
};

}  // namespace molt::native
