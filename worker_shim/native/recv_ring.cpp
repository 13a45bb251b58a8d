// Many sockets' reads without a system call each (see recv_ring.hpp).
#include "recv_ring.hpp"

#include <errno.h>
#include <liburing.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cstdlib>

namespace molt::native {
namespace {

constexpr unsigned kEntries = 256;      // submission queue; completions twice as many
constexpr unsigned kBuffers = 128;      // shared by every connection of the worker
constexpr unsigned kBufferSize = 8192;  // a larger arrival takes several, in order
constexpr uint16_t kGroup = 1;
constexpr uint64_t kCancelTag = ~0ull;  // a cancel's own completion

}  // namespace

struct RecvRing::Ring {
    io_uring ring{};
    bool open = false;
    io_uring_buf_ring* buffers = nullptr;
    char* memory = nullptr;
    ~Ring() {
        if (open) io_uring_queue_exit(&ring);  // unregisters the buffers
        std::free(buffers);
        std::free(memory);
    }
};

namespace {

io_uring_sqe* next_sqe(io_uring& ring) {
    io_uring_sqe* sqe = io_uring_get_sqe(&ring);
    if (sqe != nullptr) return sqe;
    while (io_uring_submit(&ring) == -EINTR) {
    }
    return io_uring_get_sqe(&ring);
}

void prep_multishot(io_uring_sqe* sqe, int fd, uint64_t tag) {
    io_uring_prep_recv_multishot(sqe, fd, nullptr, 0, 0);
    sqe->flags |= IOSQE_BUFFER_SELECT;
    sqe->buf_group = kGroup;
    io_uring_sqe_set_data64(sqe, tag);
}

// Whether this kernel completes a multishot recv from the buffer ring (6.0 and later; 5.19
// takes the buffer ring but answers the multishot with -EINVAL): one is armed on a socket
// pair, fed a byte, and cancelled.
bool multishot_works(io_uring& ring, io_uring_buf_ring* buffers, char* memory) {
    int pair[2];
    if (socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0, pair) != 0) {
        return false;
    }
    prep_multishot(io_uring_get_sqe(&ring), pair[0], 1);
    bool works = false;
    if (io_uring_submit(&ring) == 1 && write(pair[1], "x", 1) == 1) {
        io_uring_cqe* cqe = nullptr;
        if (io_uring_wait_cqe(&ring, &cqe) == 0) {
            works = cqe->res == 1 && (cqe->flags & IORING_CQE_F_MORE) != 0;
            const bool armed = (cqe->flags & IORING_CQE_F_MORE) != 0;
            if (cqe->flags & IORING_CQE_F_BUFFER) {
                const unsigned id = cqe->flags >> IORING_CQE_BUFFER_SHIFT;
                io_uring_buf_ring_add(buffers, memory + size_t{id} * kBufferSize, kBufferSize,
                                      static_cast<unsigned short>(id),
                                      io_uring_buf_ring_mask(kBuffers), 0);
                io_uring_buf_ring_advance(buffers, 1);
            }
            io_uring_cqe_seen(&ring, cqe);
            if (armed) {  // cancelled, and both completions (the recv's, the cancel's) taken
                io_uring_prep_cancel64(io_uring_get_sqe(&ring), 1, 0);
                io_uring_submit(&ring);
                for (int seen = 0; seen < 2 && io_uring_wait_cqe(&ring, &cqe) == 0; ++seen) {
                    io_uring_cqe_seen(&ring, cqe);
                }
            }
        }
    }
    close(pair[0]);
    close(pair[1]);
    return works;
}

}  // namespace

std::unique_ptr<RecvRing> RecvRing::open() {
    auto r = std::make_unique<Ring>();
    io_uring_params params{};
    // Completions are posted when the worker next enters the kernel (the loop's epoll_wait,
    // which the ring's descriptor wakes), not by interrupting it.
    params.flags = IORING_SETUP_COOP_TASKRUN;
    r->open = io_uring_queue_init_params(kEntries, &r->ring, &params) == 0;
    if (!r->open) return nullptr;
    void* ring_memory = nullptr;
    if (posix_memalign(&ring_memory, 4096, kBuffers * sizeof(io_uring_buf)) != 0) return nullptr;
    r->buffers = static_cast<io_uring_buf_ring*>(ring_memory);
    r->memory = static_cast<char*>(std::malloc(size_t{kBuffers} * kBufferSize));
    if (r->memory == nullptr) return nullptr;
    io_uring_buf_reg reg{};
    reg.ring_addr = reinterpret_cast<uintptr_t>(r->buffers);
    reg.ring_entries = kBuffers;
    reg.bgid = kGroup;
    if (io_uring_register_buf_ring(&r->ring, &reg, 0) != 0) return nullptr;
    io_uring_buf_ring_init(r->buffers);
    for (unsigned i = 0; i < kBuffers; ++i) {
        io_uring_buf_ring_add(r->buffers, r->memory + size_t{i} * kBufferSize, kBufferSize,
                              static_cast<unsigned short>(i), io_uring_buf_ring_mask(kBuffers),
                              static_cast<int>(i));
    }
    io_uring_buf_ring_advance(r->buffers, kBuffers);
    if (!multishot_works(r->ring, r->buffers, r->memory)) return nullptr;
    return std::unique_ptr<RecvRing>(new RecvRing(std::move(r)));
}

RecvRing::RecvRing(std::unique_ptr<Ring> ring) : ring_(std::move(ring)) {}

RecvRing::~RecvRing() = default;

int RecvRing::fd() const {
    return ring_->ring.ring_fd;
}

bool RecvRing::arm(int fd, uint64_t tag) {
    io_uring_sqe* sqe = next_sqe(ring_->ring);
    if (sqe == nullptr) return false;
    prep_multishot(sqe, fd, tag);
    return true;
}

void RecvRing::cancel(uint64_t tag) {
    io_uring_sqe* sqe = next_sqe(ring_->ring);
    if (sqe != nullptr) {
        io_uring_prep_cancel64(sqe, tag, 0);
        io_uring_sqe_set_data64(sqe, kCancelTag);
        submit();  // the cancel runs in it: the multishot lets go of the socket
        return;
    }
    io_uring_sync_cancel_reg reg{};  // no room in the queue: the kernel cancels it in the call
    reg.addr = tag;
    reg.timeout.tv_sec = -1;
    reg.timeout.tv_nsec = -1;
    while (io_uring_register_sync_cancel(&ring_->ring, &reg) == -EINTR) {
    }
}

void RecvRing::submit() {
    if (io_uring_sq_ready(&ring_->ring) == 0) return;
    while (io_uring_submit(&ring_->ring) == -EINTR) {
    }
}

std::vector<RecvRing::Taken> RecvRing::take_all() {
    if (IO_URING_READ_ONCE(*ring_->ring.sq.kflags) & IORING_SQ_CQ_OVERFLOW) {
        io_uring_get_events(&ring_->ring);  // completions the queue had no room for
    }
    std::vector<Taken> taken;
    taken.reserve(io_uring_cq_ready(&ring_->ring));
    unsigned head;
    unsigned seen = 0;
    io_uring_cqe* cqe;
    io_uring_for_each_cqe(&ring_->ring, head, cqe) {
        ++seen;
        Taken t{io_uring_cqe_get_data64(cqe), cqe->res, (cqe->flags & IORING_CQE_F_MORE) != 0,
                nullptr, -1};
        if (cqe->flags & IORING_CQE_F_BUFFER) {
            t.buffer = static_cast<int>(cqe->flags >> IORING_CQE_BUFFER_SHIFT);
            t.data = ring_->memory + size_t(t.buffer) * kBufferSize;
        }
        if (t.tag == kCancelTag) continue;  // a cancel's own: never with a buffer
        taken.push_back(t);
    }
    io_uring_cq_advance(&ring_->ring, seen);
    return taken;
}

void RecvRing::give_back(const Taken& t) {
    if (t.buffer < 0) return;
    io_uring_buf_ring_add(ring_->buffers, ring_->memory + size_t(t.buffer) * kBufferSize,
                          kBufferSize, static_cast<unsigned short>(t.buffer),
                          io_uring_buf_ring_mask(kBuffers), 0);
    io_uring_buf_ring_advance(ring_->buffers, 1);
}

}  // namespace molt::native
