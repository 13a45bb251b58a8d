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
    bool counted = false;  // this thread is one of waiting_
    for (;;) {
        {
            std::lock_guard<std::mutex> lock(mu_);
            if (counted) --waiting_;
            counted = false;
            const auto now = Clock::now();
            // Free, or its holder has been inside one event for promote_after_. (Several
            // followers may wake for one expiry: the first takes the token, the others find
            // it taken by a thread that is not serving yet, and sleep again.)
            if (!held_ || (serving_ && now - serving_since_ >= promote_after_)) {
                held_ = true;
                serving_ = false;
                ++turn_;
                return true;
            }
            // The holder may have started serving while no thread waited, and then armed no
            // timer: set it for what is left of its time.
            if (serving_) arm(serving_since_ + promote_after_ - now);
            ++waiting_;
            counted = true;
        }
        const bool timer = timer_fd_ >= 0;
        pollfd fds[2] = {{stop_fd_, POLLIN, 0}, {timer_fd_, POLLIN, 0}};
        // Without a timer (timerfd_create failed) a follower looks every 10 ms instead.
        const int n = ::poll(fds, timer ? 2 : 1, timer ? -1 : 10);
        if ((n < 0 && errno != EINTR) || fds[0].revents != 0) {
            std::lock_guard<std::mutex> lock(mu_);
            --waiting_;
            return false;
        }
        if (timer && (fds[1].revents & POLLIN) != 0) {
            std::uint64_t expirations = 0;
            (void)!::read(timer_fd_, &expirations, sizeof expirations);
        }
    }
}

std::uint64_t PollToken::serving() {
    std::lock_guard<std::mutex> lock(mu_);
    serving_ = true;
    serving_since_ = Clock::now();
    // Nobody to take over (threads: 1, or every other thread is inside an event): no timer,
    // and no system call. A thread that starts waiting later sets it (acquire()).
    if (waiting_ > 0) arm(promote_after_);
    return turn_;
}

bool PollToken::done_serving(std::uint64_t turn) {
    std::lock_guard<std::mutex> lock(mu_);
    if (turn != turn_) return false;
    // The timer is left armed: if it fires while this thread waits in epoll_wait, one
    // follower wakes, finds the holder not serving and sleeps again. Disarming it here
    // would cost a system call on every request.
    serving_ = false;
    return true;
}

void PollToken::release() {
    std::lock_guard<std::mutex> lock(mu_);
    held_ = false;
    serving_ = false;
    ++turn_;
    arm(std::chrono::nanoseconds(1));
}

void PollToken::arm(std::chrono::nanoseconds after) {
    if (timer_fd_ < 0) return;
    if (after.count() <= 0) after = std::chrono::nanoseconds(1);  // 0 would disarm it
    itimerspec spec{};
    spec.it_value.tv_sec = static_cast<time_t>(after.count() / 1000000000);
    spec.it_value.tv_nsec = static_cast<long>(after.count() % 1000000000);
    timerfd_settime(timer_fd_, 0, &spec, nullptr);
}

}  // namespace molt::native
