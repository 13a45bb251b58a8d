#include "accept_balance.hpp"

#include <fcntl.h>
#include <linux/futex.h>
#include <poll.h>
#include <sched.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <csignal>
#include <cstdlib>
#include <ctime>
#include <fstream>
#include <sstream>
#include <string>

namespace molt::native {

namespace {

// A sibling whose main thread has not stamped its entry for this long is not counted: it is
// stopped, hung or dead (a worker killed with -9 leaves its entry behind), and nobody waits
// for it. The tick stamps every 100 ms.
constexpr std::int64_t kAliveMs = 500;
// An entry not stamped for this long, whose process is gone, may be taken by a new worker.
constexpr std::int64_t kReclaimMs = 5000;
constexpr std::size_t kMaxBoardBytes = 1 << 20;

std::int64_t now_ms() {
    timespec ts{};
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return static_cast<std::int64_t>(ts.tv_sec) * 1000 + ts.tv_nsec / 1000000;
}

}  // namespace

// One worker's entry, written only by its owner (the claim aside) and read by its siblings.
// The atomics are lock-free, so they work across processes on a shared mapping.
struct alignas(64) AcceptBoard::Entry {
    std::atomic<std::int32_t> pid;  // 0: free
    std::atomic<std::uint32_t> generation;
    std::atomic<std::int32_t> connections;
    std::atomic<std::int32_t> busy;  // serving threads inside an event
    std::atomic<std::int32_t> threads;
    std::atomic<std::int32_t> in_queue;  // 1: a listener of this worker is in its epoll
    std::atomic<std::int64_t> stamp_ms;  // CLOCK_MONOTONIC (system-wide), milliseconds
    std::atomic<std::uint32_t> call;     // futex word: 1 when a sibling called this one back
};
static_assert(sizeof(AcceptBoard::Entry) == 64, "one cache line per worker");
static_assert(std::atomic<std::int32_t>::is_always_lock_free &&
                  std::atomic<std::int64_t>::is_always_lock_free,
              "the board's atomics must work across processes");

bool connection_queued(int listener_fd) {
    pollfd p{listener_fd, POLLIN, 0};
    return ::poll(&p, 1, 0) > 0;
}

bool should_step_aside(int mine, std::optional<int> least_accepting) {
    return least_accepting.has_value() && mine > 2 * *least_accepting + 2;
}

bool should_step_aside(int mine, int cpus, const SiblingsView& siblings) {
    return is_reserve(cpus, siblings) || should_step_aside(mine, siblings.least_hot);
}

namespace {

std::string read_text(const std::string& path) {
    std::ifstream f(path);
    std::stringstream text;
    if (f) text << f.rdbuf();
    return text.str();
}

// The CPUs one cgroup directory's quota allows, rounded up; 0: none there. v2: cpu.max
// ("max 100000" or "QUOTA PERIOD"); v1: cpu.cfs_quota_us (-1: none) over cpu.cfs_period_us.
int quota_in(const std::string& dir, bool v2) {
    long long quota = 0, period = 0;
    if (v2) {
        std::istringstream in(read_text(dir + "/cpu.max"));
        std::string q;
        if (!(in >> q >> period) || q == "max") return 0;
        quota = std::strtoll(q.c_str(), nullptr, 10);
    } else {
        quota = std::strtoll(read_text(dir + "/cpu.cfs_quota_us").c_str(), nullptr, 10);
        period = std::strtoll(read_text(dir + "/cpu.cfs_period_us").c_str(), nullptr, 10);
    }
    if (quota <= 0 || period <= 0 || quota > (1LL << 50)) return 0;  // none, or nonsense
    return static_cast<int>(std::min<long long>((quota + period - 1) / period, 1 << 20));
}

}  // namespace

int cgroup_cpu_limit(const std::string& proc_cgroup, const std::string& root) {
    int limit = 0;
    std::istringstream lines(proc_cgroup);
    std::string line;
    while (std::getline(lines, line)) {
        // "HIERARCHY:CONTROLLERS:PATH": v2 is "0::PATH"; v1's cpu controller "N:cpu,cpuacct:PATH".
        const auto first = line.find(':');
        const auto second = first == std::string::npos ? first : line.find(':', first + 1);
        if (second == std::string::npos) continue;
        const std::string controllers = line.substr(first + 1, second - first - 1);
        const bool v2 = line.compare(0, first, "0") == 0 && controllers.empty();
        bool v1 = false;
        std::istringstream names(controllers);
        for (std::string name; std::getline(names, name, ',');) v1 = v1 || name == "cpu";
        if (!v2 && !v1) continue;
        // The limits of every ancestor apply too: the smallest along the path to the root.
        std::string path = line.substr(second + 1);
        const std::string base = v2 ? root : root + "/cpu";
        while (true) {
            const int here = quota_in(base + (path == "/" ? "" : path), v2);
            if (here > 0 && (limit == 0 || here < limit)) limit = here;
            if (path.empty() || path == "/") break;
            const auto slash = path.rfind('/');
            path = slash == 0 || slash == std::string::npos ? "/" : path.substr(0, slash);
        }
    }
    return limit;
}

int usable_cpus() {
    cpu_set_t set;
    CPU_ZERO(&set);
    int cpus = sched_getaffinity(0, sizeof(set), &set) == 0 ? CPU_COUNT(&set) : 0;
    if (cpus <= 0) cpus = static_cast<int>(sysconf(_SC_NPROCESSORS_ONLN));
    const int quota = cgroup_cpu_limit(read_text("/proc/self/cgroup"), "/sys/fs/cgroup");
    if (quota > 0 && quota < cpus) cpus = quota;
    return std::max(1, cpus);
}

AcceptBoard::AcceptBoard(int board_fd, std::uint32_t generation, int threads, int cpus)
    : generation_(generation), cpus_(cpus < 0 ? usable_cpus() : cpus) {
    if (board_fd < 0) return;
    struct stat st {};
    if (fstat(board_fd, &st) != 0 || st.st_size < static_cast<off_t>(sizeof(Entry)) ||
        static_cast<std::size_t>(st.st_size) > kMaxBoardBytes || st.st_size % sizeof(Entry) != 0) {
        return;
    }
    void* map = mmap(nullptr, static_cast<std::size_t>(st.st_size), PROT_READ | PROT_WRITE,
                     MAP_SHARED, board_fd, 0);
    if (map == MAP_FAILED) return;
    map_ = map;
    map_size_ = static_cast<std::size_t>(st.st_size);
    entries_ = static_cast<Entry*>(map);
    capacity_ = map_size_ / sizeof(Entry);
    const std::int32_t me = static_cast<std::int32_t>(getpid());
    const std::int64_t now = now_ms();
    for (std::size_t i = 0; i < capacity_ && mine_ == nullptr; ++i) {
        Entry& e = entries_[i];
        std::int32_t owner = e.pid.load();
        const bool reclaimable = owner != 0 && now - e.stamp_ms.load() > kReclaimMs &&
                                 kill(owner, 0) != 0 && errno == ESRCH;
        if (owner != 0 && !reclaimable) continue;
        // Not visible as a sibling until claimed and filled in: generation 0 is never a worker's.
        if (!e.pid.compare_exchange_strong(owner, me)) continue;
        e.generation.store(0);
        e.connections.store(0);
        e.busy.store(0);
        e.threads.store(std::max(1, threads));
        e.in_queue.store(0);
        e.stamp_ms.store(now);
        e.call.store(0);
        mine_ = &e;  // generation 0 until publish(): no sibling counts it yet
    }
    // The mapping is enough: a program the app runs gets no handle on the board.
    fcntl(board_fd, F_SETFD, fcntl(board_fd, F_GETFD) | FD_CLOEXEC);
}

void AcceptBoard::publish() {
    if (mine_ != nullptr) {
        mine_->stamp_ms.store(now_ms());
        mine_->generation.store(generation_);
    }
}

AcceptBoard::~AcceptBoard() {
    if (mine_ != nullptr) {
        leave();
        mine_->pid.store(0);
    }
    if (map_ != nullptr) munmap(map_, map_size_);
}

void AcceptBoard::set_connections(std::size_t n) {
    if (mine_ != nullptr)
        mine_->connections.store(static_cast<std::int32_t>(n), std::memory_order_relaxed);
}

void AcceptBoard::thread_busy() {
    if (mine_ != nullptr) mine_->busy.fetch_add(1, std::memory_order_relaxed);
}

void AcceptBoard::thread_free() {
    if (mine_ != nullptr) mine_->busy.fetch_sub(1, std::memory_order_relaxed);
}

void AcceptBoard::set_in_queue(bool in) {
    if (mine_ != nullptr) mine_->in_queue.store(in ? 1 : 0, std::memory_order_relaxed);
}

void AcceptBoard::stamp() {
    if (mine_ != nullptr) mine_->stamp_ms.store(now_ms(), std::memory_order_relaxed);
}

void AcceptBoard::leave() {
    if (mine_ == nullptr) return;
    mine_->generation.store(0);
    mine_->in_queue.store(0);
}

SiblingsView AcceptBoard::scan_siblings(int mine) {
    SiblingsView view;
    if (mine_ == nullptr) return view;
    const std::int64_t now = now_ms();
    int alive_seen = 0;  // alive workers of the generation so far, this one included
    for (std::size_t i = 0; i < capacity_; ++i) {
        Entry& e = entries_[i];
        if (&e == mine_) {
            ++alive_seen;
            continue;
        }
        if (e.pid.load(std::memory_order_relaxed) == 0 ||
            e.generation.load(std::memory_order_relaxed) != generation_ ||
            now - e.stamp_ms.load(std::memory_order_relaxed) > kAliveMs) {
            continue;
        }
        const bool hot = cpus_ <= 0 || alive_seen < cpus_;
        ++alive_seen;
        const bool can_accept =
            e.busy.load(std::memory_order_relaxed) < e.threads.load(std::memory_order_relaxed);
        if (!can_accept) continue;
        if (&e < mine_) ++view.ahead;
        if (!hot) continue;  // a reserve: neither counted nor called back
        const int n = e.connections.load(std::memory_order_relaxed);
        if (!view.least_hot || n < *view.least_hot) view.least_hot = n;
        if (e.in_queue.load(std::memory_order_relaxed) == 0 && native::should_step_aside(mine, n) &&
            e.call.exchange(1) == 0) {
            // It stands aside holding so few that this worker steps aside for it: call it
            // back. Its watcher looks again and rejoins, since no sibling then holds few
            // enough for it to stand aside.
            syscall(SYS_futex, &e.call, FUTEX_WAKE, 1, nullptr, nullptr, 0);
        }
    }
    return view;
}

bool AcceptBoard::should_step_aside() {
    if (mine_ == nullptr) return false;
    const int mine = mine_->connections.load(std::memory_order_relaxed);
    const SiblingsView siblings = scan_siblings(mine);
    reserve_ = is_reserve(cpus_, siblings);
    return native::should_step_aside(mine, cpus_, siblings);
}

void AcceptBoard::wait_for_call(int timeout_ms) {
    if (mine_ == nullptr) return;
    timespec ts{timeout_ms / 1000, (timeout_ms % 1000) * 1000000L};
    // Returns at once if a call came since the last wait (the word is 1 already).
    syscall(SYS_futex, &mine_->call, FUTEX_WAIT, 0, timeout_ms < 0 ? nullptr : &ts, nullptr, 0);
    mine_->call.store(0);
}

bool AcceptBoard::take_call() {
    // A load first: the siblings read this cache line on every accept.
    return mine_ != nullptr && mine_->call.load(std::memory_order_relaxed) != 0 &&
           mine_->call.exchange(0) != 0;
}

void AcceptBoard::interrupt_wait() {
    if (mine_ == nullptr) return;
    mine_->call.store(1);
    syscall(SYS_futex, &mine_->call, FUTEX_WAKE, 1, nullptr, nullptr, 0);
}

}  // namespace molt::native
