// Many sockets' sends in one system call (see send_batch.hpp).
#include "send_batch.hpp"

#include <errno.h>
#include <liburing.h>
#include <sys/socket.h>

#include <cstdint>

namespace molt::native {
namespace {

// The submission queue's size: a larger batch is submitted in parts of this many.
constexpr unsigned kRingEntries = 64;
// A result not in yet; a request the ring refused (send() makes it).
constexpr ssize_t kNoResult = INT64_MIN;
constexpr ssize_t kRefused = INT64_MIN + 1;
// user_data: the batch's number in the upper half (a completion from another batch is not
// this one's), the request's index in the lower; a cancel's completions carry batch 0.
constexpr uint64_t kCancelTag = 0;

uint64_t tag(uint32_t batch, size_t index) {
    return (static_cast<uint64_t>(batch) << 32) | static_cast<uint32_t>(index);
}

bool sends_with_the_ring(io_uring& ring) {
    // IORING_OP_SEND came in 5.6, the probe in 5.6 too: a ring of 5.1-5.5 would answer every
    // send with -EINVAL.
    io_uring_probe* probe = io_uring_get_probe_ring(&ring);
    if (probe == nullptr) return false;
    const bool supported = io_uring_opcode_supported(probe, IORING_OP_SEND) != 0;
    io_uring_free_probe(probe);
    return supported;
}

}  // namespace

struct SendBatch::Ring {
    io_uring ring{};
    bool open = false;
    uint32_t batch = 0;
    ~Ring() {
        if (open) io_uring_queue_exit(&ring);
    }
};

SendBatch::SendBatch(bool use_ring) {
    if (!use_ring) return;
    auto ring = std::make_unique<Ring>();
    // Completions are only ever reaped right after the submit that made them: the kernel
    // need not interrupt the worker to post them (COOP_TASKRUN).
    io_uring_params params{};
    params.flags = IORING_SETUP_COOP_TASKRUN;
    ring->open = io_uring_queue_init_params(kRingEntries, &ring->ring, &params) == 0;
    if (!ring->open) {
        params = io_uring_params{};  // a kernel before 5.19 has no COOP_TASKRUN
        ring->open = io_uring_queue_init_params(kRingEntries, &ring->ring, &params) == 0;
    }
    if (ring->open && sends_with_the_ring(ring->ring)) ring_ = std::move(ring);
}

SendBatch::~SendBatch() = default;

void SendBatch::add(int fd, const char* data, size_t size) {
    queued_.push_back(Send{fd, data, size});
}

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

// The completions in the queue: this batch's results noted (their count returned), the rest
// (a cancel's) passed over.
size_t SendBatch::reap(uint32_t batch) {
    io_uring& ring = ring_->ring;
    size_t results = 0;
    unsigned head;
    unsigned seen = 0;
    io_uring_cqe* cqe;
    io_uring_for_each_cqe(&ring, head, cqe) {
        ++seen;
        const uint64_t data = io_uring_cqe_get_data64(cqe);
        const size_t i = static_cast<uint32_t>(data);
        if ((data >> 32) != batch || i >= results_.size() || results_[i] != kNoResult) continue;
        int res = cqe->res;
        if (res == -ECANCELED) res = -EAGAIN;  // cancelled below before it sent a byte
        if (res == -EINVAL || res == -EOPNOTSUPP) {
            // The ring will not send this (a kernel or filter that refuses the operation):
            // left to send(), which answers it for what it is, and the ring is given up.
            results_[i] = kRefused;
            unusable_ = true;
        } else {
            results_[i] = res;
        }
        ++results;
    }
    io_uring_cq_advance(&ring, seen);
    return results;
}

void SendBatch::run_in_ring(size_t from, size_t count) {
    io_uring& ring = ring_->ring;
    uint32_t batch = ++ring_->batch;
    if (batch == kCancelTag) batch = ++ring_->batch;
    for (size_t i = from; i < from + count; ++i) {
        io_uring_sqe* sqe = io_uring_get_sqe(&ring);  // never null: the queue is empty here
        io_uring_prep_send(sqe, queued_[i].fd, queued_[i].data, queued_[i].size,
                           MSG_NOSIGNAL | MSG_DONTWAIT);
        io_uring_sqe_set_data64(sqe, tag(batch, i));
    }
    // One system call: each send completes during it (MSG_DONTWAIT: done, or -EAGAIN), and
    // its completion is in the queue when it returns.
    int submitted;
    do {
        submitted = io_uring_submit(&ring);
    } while (submitted == -EINTR);
    const size_t taken = submitted < 0 ? 0 : static_cast<size_t>(submitted);
    size_t done = reap(batch);
    if (done < taken) finish_in_the_kernel(batch, from, taken, done);
    for (size_t i = from; i < from + count; ++i) {
        if (results_[i] == kRefused) results_[i] = kNoResult;
    }
    if (taken < count || unusable_) {
        // The ring took fewer than all (out of memory, say), or refused one: it is given up,
        // and the requests it did not take with it (they are still in its queue); send()
        // makes them, and every later one.
        ring_.reset();
        unusable_ = false;
    }
}

// Never seen on the kernels molt was measured on: a request taken that did not complete
// during the submit. Its buffer is the caller's, valid only until run() returns, so it must
// not stay in the kernel's hands: whatever completes is reaped, the rest is cancelled (a
// cancelled send has sent nothing: -EAGAIN), and run() waits for each.
void SendBatch::finish_in_the_kernel(uint32_t batch, size_t from, size_t taken, size_t done) {
    io_uring& ring = ring_->ring;
    io_uring_get_events(&ring);  // completions waiting for this task's work to run
    done += reap(batch);
    if (done >= taken) return;
    for (size_t i = from; i < from + taken; ++i) {
        if (results_[i] != kNoResult) continue;
        io_uring_sqe* sqe = io_uring_get_sqe(&ring);
        if (sqe == nullptr) break;
        io_uring_prep_cancel64(sqe, tag(batch, i), 0);
        io_uring_sqe_set_data64(sqe, tag(kCancelTag, 0));
    }
    while (io_uring_submit(&ring) == -EINTR) {
    }
    while (done < taken) {
        io_uring_cqe* cqe;
        const int r = io_uring_wait_cqe(&ring, &cqe);
        if (r == -EINTR) continue;
        if (r < 0) break;
        done += reap(batch);
    }
    for (size_t i = from; i < from + taken; ++i) {
        if (results_[i] == kNoResult) results_[i] = -EAGAIN;  // the ring failed us: unsent
    }
}

}  // namespace molt::native
