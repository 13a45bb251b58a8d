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
    // Queued; they reach the kernel at submit() (or at the next reap()).
    void arm(int fd, uint64_t tag);
    void cancel(uint64_t tag);
    void submit();

    // Each completion waiting, in order, to `on_completion(const Completion&)`; its buffer goes
    // back to the ring when the call returns. What the callbacks queued is submitted after.
    template <class F>
    void reap(F&& on_completion) {
        while (take_batch()) {
            for (const Taken& t : batch_) {
                on_completion(Completion{t.tag, t.result, t.more, t.data});
                give_back(t);
            }
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
    bool take_batch();
    void give_back(const Taken& t);

    std::unique_ptr<Ring> ring_;
    std::vector<Taken> batch_;
};

}  // namespace molt::native
