// Many sockets' sends in one system call.
//
// The ASGI hub holds the small responses a loop iteration produces and sends them together
// (hub.send_held()). One send() each costs a system call each, and on this machine class a
// system call is dear (about 1.1 us for an empty one, page-table isolation in a virtual
// machine). A SendBatch queues them as io_uring send requests and submits them in one
// io_uring_enter(). Each request carries MSG_DONTWAIT, so the kernel performs it during that
// submit or answers -EAGAIN (it never parks one to finish later; were one ever to stay,
// run() cancels it and waits): when run() returns, every result is in and no buffer is
// still in the kernel's hands. The caller's buffers need to live only until run() returns.
//
// Where io_uring cannot be had (a kernel without it or without its send, before 5.6; a
// seccomp filter that refuses it, as recent Docker's default profile does;
// MOLT_SHIM_IO_URING=0), run() makes one send() per request, with the same results; and so it
// does from the first request the ring refuses on.
#pragma once

#include <sys/types.h>

#include <cstddef>
#include <cstdint>
#include <memory>
#include <vector>

namespace molt::native {

class SendBatch {
  public:
    // use_ring false: one send() per request, never io_uring.
    explicit SendBatch(bool use_ring = true);
    ~SendBatch();
    SendBatch(const SendBatch&) = delete;
    SendBatch& operator=(const SendBatch&) = delete;

    // Whether run() submits through io_uring (false: it could not be set up, or was not
    // asked for).
    bool uses_ring() const { return ring_ != nullptr; }

    // Queues send(fd, data, size, MSG_NOSIGNAL | MSG_DONTWAIT); its result is the one at
    // the same index in run()'s.
    void add(int fd, const char* data, size_t size);

    // Sends what was queued, and forgets it. Each result: the bytes the socket took (a
    // short count: it is full), or -errno (-EAGAIN: it took nothing).
    const std::vector<ssize_t>& run();

  private:
    struct Send {
        int fd;
        const char* data;
        size_t size;
    };
    struct Ring;
    void run_with_send(size_t from, size_t count);
    void run_in_ring(size_t from, size_t count);
    size_t reap(uint32_t batch);
    void finish_in_the_kernel(uint32_t batch, size_t from, size_t taken, size_t done);

    std::unique_ptr<Ring> ring_;
    std::vector<Send> queued_;
    std::vector<ssize_t> results_;
    bool unusable_ = false;  // the ring refused a request: given up after this part
};

}  // namespace molt::native
