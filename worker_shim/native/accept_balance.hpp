// Keeping a generation's connections spread over its workers.
//
// Every worker of a generation accepts from the same listening socket. The kernel hands a new
// connection to whichever worker is waiting in epoll_wait at that moment (EPOLLEXCLUSIVE), and
// when every worker is busy, to whichever comes back first. On a machine with fewer cores than
// workers, a burst of connections (a load balancer opening its pool, wrk starting) lands on the
// workers that happen to be running: [40, 24, 0, 0] over four workers was common, and a worker
// holding 40 keep-alive connections serves them behind one GIL while two others idle. Measured
// with 4 workers x 4 threads, wrk -c64 keep-alive: 44-56k req/s unbalanced against 64-72k.
//
// The board is one shared memfd per master (MOLT_ACCEPT_BOARD_FD): each worker publishes, in
// its own entry, its generation, how many connections it holds, whether it is in the accept
// queue and how many of its threads are busy. A worker that holds more connections than a
// sibling that could accept right now (listening, a thread free, alive; in the queue, or
// standing aside and then called back) by more than the slack steps out of the accept queue,
// and steps back in when that is no longer so: a worker that takes connections while siblings
// with fewer stand aside calls them back (a futex on their entry, which their watcher thread
// waits on), and a worker aside looks again every few ms, and takes connections that wait in
// the queue with nobody taking them. Only the first workers in board order, one per CPU, take
// part (hot); the others are a reserve, aside while those can accept (SiblingsView). The rule
// is `should_step_aside`, pure; the rest is bookkeeping.
#pragma once

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <optional>
#include <string>

namespace molt::native {

// A worker holding `mine` connections should stay out of the accept queue when it holds more
// than twice the connections of the sibling with the fewest among those that can accept now
// (listening, a thread free, alive; none: nullopt), plus 2. Exact balance is not the aim: on
// fewer cores than workers, a worker with more keep-alive connections serves more requests
// per wake-up (measured: [16, 16, 16, 16] used about 5 % more CPU per request than [21, 18,
// 16, 9]); one holding most of them serves them behind one GIL while its siblings idle ([55,
// 3, 3, 3]).
bool should_step_aside(int mine, std::optional<int> least_accepting);

// How the board sees this worker's siblings of its generation. The first `cpus` alive workers
// in board order (stamped within kAliveMs, not draining; this worker counted where its own
// entry lies) are the hot ones: the machine can run that many at once, and connections are
// spread over those only. A worker with `cpus` workers ahead of it that can accept now (alive,
// a thread free) is a reserve: it stays out of the accept queue, and steps in as soon as one
// of them cannot (it stopped stamping: hung in an app, stopped, killed; or, native engine,
// every thread is busy). A hot worker compares itself with the hot ones that can accept now,
// never with a reserve: one busy for a moment does not make its siblings step aside for the
// reserve behind it. Measured, 4
// ASGI workers on 2 cores, wrk -c64 keep-alive: [43, 21] used 12.0-13.3 us of CPU per request
// where [21, 21, 13, 9] used 15.8-17.9, interleaved, every pair (fewer processes runnable at
// once: fewer context switches, more requests per wake-up).
struct SiblingsView {
    int ahead = 0;                 // siblings before this worker that can accept now
    std::optional<int> least_hot;  // the fewest connections among the other hot ones that can
};

// Whether a worker that sees `siblings` is a reserve: `cpus` workers ahead of it can accept.
inline bool is_reserve(int cpus, const SiblingsView& siblings) {
    return cpus > 0 && siblings.ahead >= cpus;
}

// The whole rule: a reserve steps aside; a hot worker by should_step_aside() against the
// other hot workers. cpus <= 0: no reserve (every free sibling is hot).
bool should_step_aside(int mine, int cpus, const SiblingsView& siblings);

// How many CPUs this process may run on: its affinity mask, capped by a cgroup CPU quota
// (cgroup_cpu_limit) where there is one. At least 1.
int usable_cpus();

// The CPUs a cgroup CPU quota allows this process, rounded up: the smallest quota on its
// cgroup's path to the root, v2 (cpu.max) or v1 (the cpu controller's cpu.cfs_quota_us over
// cpu.cfs_period_us); 0 when there is none. proc_cgroup: /proc/self/cgroup's text; root:
// where the hierarchies are mounted (/sys/fs/cgroup).
int cgroup_cpu_limit(const std::string& proc_cgroup, const std::string& root);

class AcceptBoard;

// Whether a connection waits in the listening socket's accept queue (a poll() that does not
// wait): what the stranded-queue rule below asks.
bool connection_queued(int listener_fd);

// How often a listener out of the accept queue is looked at again, and how many looks in a
// row may find a connection queued before the worker takes it whatever the board says.
constexpr int kAsideRecheckMs = 10;
constexpr int kAsideStrandedChecks = 5;
// How often a reserve (SiblingsView) that has only stale stamps to watch for looks again: the
// ASGI engine's loop, which is never counted busy, becomes hot only when a hot sibling stops
// stamping (kAliveMs, 0.5 s), so looking every 10 ms bought nothing and cost an idle reserve
// about 1 % of a core (a Python callback each time); every 100 ms, about 0.3 %. The native
// engine's watcher thread keeps kAsideRecheckMs: a hot sibling whose threads are all busy
// makes a reserve hot at once, and its look costs no Python.
constexpr int kReserveRecheckMs = 100;
// A reserve looking every kReserveRecheckMs takes a queue found non-empty at this many looks in
// a row (100 ms: a hot worker in its epoll would have taken it by then), not kAsideStrandedChecks.
constexpr int kReserveStrandedChecks = 2;

// One listener's standing aside, for both engines. A connection can wait in the queue with
// nobody woken for it (the siblings woken for it may have stepped aside since, or be busy):
// a queue found non-empty kAsideStrandedChecks looks in a row is taken by this worker until it
// is empty; a shorter wait is the siblings not having run yet on a busy machine.
struct AsideListener {
    bool aside = false;  // out of the accept queue while this worker holds more than its share
    int waited = 0;      // while aside: looks in a row that found a connection queued
    bool taking_stranded = false;  // queued connections nobody took: in until the queue empties

    // A look while aside: whether to come back now. still_aside: the board's answer now;
    // queued: a connection waits in the listener's queue; stranded_after: how many looks in a
    // row must find one (kReserveStrandedChecks for a reserve's slower looks).
    bool come_back(bool still_aside, bool queued, int stranded_after = kAsideStrandedChecks) {
        waited = queued ? waited + 1 : 0;
        taking_stranded = waited >= stranded_after;
        if (still_aside && !taking_stranded) return false;
        waited = 0;
        return true;
    }
    // Back in the queue, whichever look brought it back.
    void rejoined() {
        aside = false;
        waited = 0;
    }
    // After an accept, or coming back: whether to stand aside now (sets `aside`).
    // `queued` is asked only while taking stranded connections.
    template <class Queued>
    bool step_aside(AcceptBoard& board, Queued queued);
};

// One worker's view of the shared board. Without a board (no fd, a malformed one, or no free
// entry) every call is a no-op and should_step_aside() says no: the worker accepts as before.
class AcceptBoard {
  public:
    // board_fd: the memfd, or -1. generation: this worker's. cpus: how many workers are hot
    // (SiblingsView); -1: usable_cpus(); 0: every one.
    AcceptBoard(int board_fd, std::uint32_t generation, int threads, int cpus = -1);
    ~AcceptBoard();
    AcceptBoard(const AcceptBoard&) = delete;
    AcceptBoard& operator=(const AcceptBoard&) = delete;

    bool active() const { return mine_ != nullptr; }
    // Visible to the siblings from now on: the worker has its listeners in its epoll. Before,
    // they would step aside for a worker that cannot accept yet (it is still booting).
    void publish();
    void set_connections(std::size_t n);
    void thread_busy();  // a serving thread took an event
    void thread_free();  // ... and is done with it
    void set_in_queue(bool in);
    void stamp();  // alive: called by the main thread's tick, every 100 ms
    // The drain began: no longer a sibling. The entry stays this worker's until the board is
    // destroyed (after the serving threads, which still count requests into it).
    void leave();
    // Whether this worker should stay out of the accept queue now. Siblings standing aside
    // that now hold fewer connections than this one by more than the slack are called back.
    bool should_step_aside();
    // Whether the last should_step_aside() found this worker a reserve.
    bool reserve() const { return reserve_; }
    // The watcher thread: wait until a sibling calls this worker back, interrupt_wait() is
    // called, or timeout_ms passes (-1: no timeout).
    void wait_for_call(int timeout_ms);
    void interrupt_wait();
    // Without a watcher thread (the ASGI engine's loop): whether a sibling called this worker
    // back since the last time; clears the call.
    bool take_call();

    struct Entry;  // defined in accept_balance.cpp, one cache line each

  private:
    // The free, alive siblings as the rule sees them; on the way, hot siblings standing aside
    // that this worker would step aside for are called back.
    SiblingsView scan_siblings(int mine);

    void* map_ = nullptr;
    std::size_t map_size_ = 0;
    Entry* entries_ = nullptr;
    std::size_t capacity_ = 0;
    Entry* mine_ = nullptr;  // set once, in the constructor
    std::uint32_t generation_;
    int cpus_;
    bool reserve_ = false;
};

template <class Queued>
bool AsideListener::step_aside(AcceptBoard& board, Queued queued) {
    if (taking_stranded && !queued()) taking_stranded = false;
    aside = !taking_stranded && board.should_step_aside();
    return aside;
}

}  // namespace molt::native
