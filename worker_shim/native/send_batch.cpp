// Many sockets' sends in one system call (see send_batch.hpp).
#include "send_batch.hpp"

#include <errno.h>
#include <liburing.h>
#include <sys/socket.h>

#include <cstdint>

namespace molt::native {

// The submission queue's size: a larger batch is submitted in parts of this many.
constexpr unsigned kRingEntries = 64;

struct SendBatch::Ring {
    io_uring ring{};
    bool open = false;
    ~Ring() {
        if (open) io_uring_queue_exit(&ring);
    }
};

SendBatch::SendBatch(bool use_ring) {
    if (!use_ring) return;
    auto ring = std::make_unique<Ring>();
    // Completions are only ever reaped right after the submit that made them: the kernel
    // need not interrupt the worker to post them (COOP_TASKRUN), nor hand a request to a
    // thread of its own (none can block: MSG_DONTWAIT).
    io_uring_params params{};
    params.flags = IORING_SETUP_COOP_TASKRUN;
    ring->open = io_uring_queue_init_params(kRingEntries, &ring->ring, &params) == 0;
    if (!ring->open) {
        params = io_uring_params{};  // a kernel before 5.19 has no COOP_TASKRUN
        ring->open = io_uring_queue_init_params(kRingEntries, &ring->ring, &params) == 0;
    }
    if (ring->open) ring_ = std::move(ring);
}

SendBatch::~SendBatch() = default;

void SendBatch::add(int fd, const char* data, size_t size) {
    queued_.push_back(Send{fd, data, size});
}

// A result not in yet.
constexpr ssize_t kNoResult = INT64_MIN;

const std::vector<ssize_t>& SendBatch::run() {
    results_.assign(queued_.size(), kNoResult);
    for (size_t from = 0; from < queued_.size(); from += kRingEntries) {
        const size_t left = queued_.size() - from;
        const size_t count = left < kRingEntries ? left : kRingEntries;
        if (ring_) run_in_ring(from, count);
        run_with_send(from, count);  // what the ring did not take (all of it, without one)
    }
    queued_.clear();
    return results_;
}

void SendBatch::run_with_send(size_t from, size_t count) {
    for (size_t i = from; i < from + count; ++i) {
        if (results_[i] != kNoResult) continue;
        const Send& s = queued_[i];
        ssize_t n;
        do {
            n = send(s.fd, s.data, s.size, MSG_NOSIGNAL | MSG_DONTWAIT);
        } while (n < 0 && errno == EINTR);
        results_[i] = n < 0 ? -errno : n;
    }
}

void SendBatch::run_in_ring(size_t from, size_t count) {
    io_uring& ring = ring_->ring;
    for (size_t i = from; i < from + count; ++i) {
        io_uring_sqe* sqe = io_uring_get_sqe(&ring);  // never null: the queue is empty here
        io_uring_prep_send(sqe, queued_[i].fd, queued_[i].data, queued_[i].size,
                           MSG_NOSIGNAL | MSG_DONTWAIT);
        io_uring_sqe_set_data64(sqe, i);
    }
    int submitted;
    do {
        submitted = io_uring_submit_and_wait(&ring, static_cast<unsigned>(count));
    } while (submitted == -EINTR);
    const size_t taken = submitted < 0 ? 0 : static_cast<size_t>(submitted);
    // Every request taken completed during the submit (MSG_DONTWAIT). Were one ever to go on
    // in the kernel, its buffer must outlive it: wait for it rather than return.
    for (size_t done = 0; done < taken;) {
        unsigned head;
        unsigned seen = 0;
        io_uring_cqe* cqe;
        io_uring_for_each_cqe(&ring, head, cqe) {
            const size_t i = static_cast<size_t>(io_uring_cqe_get_data64(cqe));
            if (i < results_.size()) results_[i] = cqe->res;
            ++seen;
        }
        io_uring_cq_advance(&ring, seen);
        done += seen;
        if (done < taken && io_uring_wait_cqe(&ring, &cqe) < 0) break;
    }
    if (taken < count) {
        // The ring took fewer than all (out of memory, say): it is given up, and with it the
        // requests it did not take; send() makes them, and every later one.
        ring_.reset();
    }
}

}  // namespace molt::native
