// See poll_token.hpp.
#include "poll_token.hpp"

#include <errno.h>
#include <poll.h>
#include <sys/timerfd.h>
#include <unistd.h>

namespace molt::native {

PollToken::PollToken(int stop_fd, std::chrono::microseconds promote_after)
    : stop_fd_(stop_fd), promote_after_(promote_after) {
    timer_fd_ = timerfd_create(CLOCK_MONOTONIC, TFD_NONBLOCK | TFD_CLOEXEC);
}

PollToken::~PollToken() {
    if (timer_fd_ >= 0) ::close(timer_fd_);
}

bool PollToken::acquire() {
    std::unique_lock<std::mutex> lock(mu_);
    bool watching = false;  // this thread is the watcher
    for (;;) {
        if (stopped_) {
            if (watching) watcher_ = false;
            return false;
        }
        const auto now = Clock::now();
        // Free, or its holder has been inside one event for promote_after_.
        if (!held_ || (serving_ && now - serving_since_ >= promote_after_)) {
            held_ = true;
            serving_ = false;
            ++turn_;
            if (watching) watcher_ = false;
            // Whoever takes the token (the watcher, or a sleeper that found the holder overdue
            // or the token free), a sleeper must watch next.
            if (!watcher_ && sleeping_ > 0) turn_cv_.notify_one();
            return true;
        }
        if (watcher_ && !watching) {  // another thread watches: sleep until it leaves
            ++sleeping_;
            turn_cv_.wait(lock);
            --sleeping_;
            continue;
        }
        watcher_ = watching = true;
        // The holder may have started serving while nobody watched, and then set no timer,
        // or this thread woke for a timer set for an earlier event: set it for what is left
        // of the holder's time, unless it is set already.
        if (serving_ && timer_due_ <= now) arm(serving_since_ + promote_after_ - now, now);
        lock.unlock();
        const bool timer = timer_fd_ >= 0;
        pollfd fds[2] = {{stop_fd_, POLLIN, 0}, {timer_fd_, POLLIN, 0}};
        // Without a timer (timerfd_create failed) the watcher looks every 10 ms instead.
        const int n = ::poll(fds, timer ? 2 : 1, timer ? -1 : 10);
        const int poll_errno = errno;
        if (timer && n > 0 && (fds[1].revents & POLLIN) != 0) {
            std::uint64_t expirations = 0;
            (void)!::read(timer_fd_, &expirations, sizeof expirations);
        }
        lock.lock();
        if (n > 0 && fds[0].revents != 0) {  // the server stops: every waiting thread returns
            stopped_ = true;
            turn_cv_.notify_all();
        } else if (n < 0 && poll_errno != EINTR) {  // this thread gives up; another watches
            watcher_ = false;
            if (sleeping_ > 0) turn_cv_.notify_one();
            return false;
        }
    }
}

std::uint64_t PollToken::serving() {
    std::lock_guard<std::mutex> lock(mu_);
    serving_ = true;
    serving_since_ = Clock::now();
    // Nobody to take over (threads: 1, or every other thread is inside an event): no timer,
    // and no system call; a thread that starts watching later sets it (acquire()). A timer
    // still set for an earlier event fires no later than this one's would, and the watcher it
    // wakes sets it again for what is left: under load the timer is set about once per
    // promote_after, not once per event.
    if (watcher_ && timer_due_ <= serving_since_) arm(promote_after_, serving_since_);
    return turn_;
}

bool PollToken::done_serving(std::uint64_t turn) {
    std::lock_guard<std::mutex> lock(mu_);
    if (turn != turn_) return false;
    // The timer is left set: if it fires while this thread waits in epoll_wait, the watcher
    // wakes, finds the holder not serving and sleeps again. Disarming it here would cost a
    // system call on every request.
    serving_ = false;
    return true;
}

void PollToken::release() {
    std::lock_guard<std::mutex> lock(mu_);
    held_ = false;
    serving_ = false;
    ++turn_;
    arm(std::chrono::nanoseconds(1), Clock::now());
}

void PollToken::arm(std::chrono::nanoseconds after, Clock::time_point now) {
    if (timer_fd_ < 0) return;
    if (after.count() <= 0) after = std::chrono::nanoseconds(1);  // 0 would disarm it
    timer_due_ = now + after;
    itimerspec spec{};
    spec.it_value.tv_sec = static_cast<time_t>(after.count() / 1000000000);
    spec.it_value.tv_nsec = static_cast<long>(after.count() % 1000000000);
    timerfd_settime(timer_fd_, 0, &spec, nullptr);
}

}  // namespace molt::native
