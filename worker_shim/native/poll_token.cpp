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
    bool promoted = false;  // the timer fired: the holder has been serving for too long
    for (;;) {
        {
            std::lock_guard<std::mutex> lock(mu_);
            // Free, or its holder is still inside the event it took when the timer was set.
            // (Several followers may wake for one expiry: the first takes the token, the
            // others find it taken by a thread that is not serving, and sleep again.)
            if (!held_ || (promoted && serving_)) {
                held_ = true;
                serving_ = false;
                ++turn_;
                return true;
            }
        }
        const bool timer = timer_fd_ >= 0;
        pollfd fds[2] = {{stop_fd_, POLLIN, 0}, {timer_fd_, POLLIN, 0}};
        // Without a timer (timerfd_create failed) a follower looks every 10 ms instead.
        if (::poll(fds, timer ? 2 : 1, timer ? -1 : 10) < 0 && errno != EINTR) return false;
        if (fds[0].revents != 0) return false;
        promoted = !timer || (fds[1].revents & POLLIN) != 0;
        if (timer && promoted) {
            std::uint64_t expirations = 0;
            (void)!::read(timer_fd_, &expirations, sizeof expirations);
        }
    }
}

std::uint64_t PollToken::serving() {
    std::lock_guard<std::mutex> lock(mu_);
    serving_ = true;
    arm(promote_after_);
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
    itimerspec spec{};
    spec.it_value.tv_sec = static_cast<time_t>(after.count() / 1000000000);
    spec.it_value.tv_nsec = static_cast<long>(after.count() % 1000000000);
    timerfd_settime(timer_fd_, 0, &spec, nullptr);
}

}  // namespace molt::native
