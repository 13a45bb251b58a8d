// Many sockets' reads without a system call each.
//
// A kept-alive connection of the ASGI hub was read with one read() per request, woken by the
// loop's epoll. A RecvRing reads such connections through io_uring instead: each has one
// multishot recv armed, which the kernel completes each time bytes arrive, into a buffer it
// picks from a ring of buffers shared by every connection. The ring's descriptor is readable
// while completions wait; the loop watches it, and reap() hands each completion over: no
// read() at all, and one wake-up for all the connections that got bytes.
//
// A multishot holds a reference to its socket: a connection's must be cancelled before its
// descriptor is closed, or the socket (and its FIN) would wait for the next bytes. A
// completion of a closed connection is told from its successor's by the tag the caller gives
// (the hub's descriptor and generation).
//
// open() answers null where that cannot be had: a kernel before 6.0 (no multishot recv), a
// seccomp filter that refuses io_uring. The hub then has the loop's epoll watch the
// connection, as before.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

namespace molt::native {

class RecvRing {
  public:
    struct Completion {
        uint64_t tag;
        int result;        // bytes (in data), 0: the peer's FIN, or -errno
        bool more;         // the multishot stays armed; false: it ended (re-arm to read on)
        const char* data;  // valid until the callback returns
    };

    static std::unique_ptr<RecvRing> open();
    ~RecvRing();
    RecvRing(const RecvRing&) = delete;
    RecvRing& operator=(const RecvRing&) = delete;

    int fd() const;
    // Queued; it reaches the kernel at submit() (or at the next reap()). False: the ring has
    // no room and could not make some (the kernel out of memory): nothing was armed.
    bool arm(int fd, uint64_t tag);
    // Cancels the multishot with this tag, now: when it returns, the ring holds no
    // reference to the socket any more (through the queue, or synchronously where it is
    // full).
    void cancel(uint64_t tag);
    void submit();

    // The completions waiting when it is called (not those that come meanwhile: the loop
    // calls again, the descriptor being readable), in order, to `on_completion(const
    // Completion&)`. Consecutive bytes of one connection go as one completion. Each buffer
    // goes back to the ring when its call returns; what the calls queued is submitted after.
    // A callback may call reap() again (a loop run from inside one): each call has its own
    // completions.
    template <class F>
    void reap(F&& on_completion) {
        std::vector<Taken> taken = take_all();
        std::string joined;
        for (size_t i = 0; i < taken.size();) {
            size_t end = i + 1;
            const Taken& first = taken[i];
            Completion c{first.tag, first.result, first.more, first.data};
            if (first.result > 0) {  // the bytes that follow it for the same connection too
                while (end < taken.size() && taken[end].tag == first.tag && taken[end].result > 0) {
                    ++end;
                }
                if (end > i + 1) {
                    joined.clear();
                    for (size_t j = i; j < end; ++j) joined.append(taken[j].data, taken[j].result);
                    c = Completion{first.tag, static_cast<int>(joined.size()), taken[end - 1].more,
                                   joined.data()};
                }
            }
            on_completion(c);
            for (size_t j = i; j < end; ++j) give_back(taken[j]);
            i = end;
        }
        submit();
    }

  private:
    struct Ring;
    struct Taken {
        uint64_t tag;
        int result;
        bool more;
        const char* data;
        int buffer;  // -1: none
    };
    explicit RecvRing(std::unique_ptr<Ring> ring);
    std::vector<Taken> take_all();
    void give_back(const Taken& t);

    std::unique_ptr<Ring> ring_;
};

}  // namespace molt::native
