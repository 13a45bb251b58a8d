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
// the queue with nobody taking them. The rule is `should_step_aside`, pure; the rest is
// bookkeeping.
#pragma once

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <optional>

namespace molt::native {

// A worker holding `mine` connections should stay out of the accept queue when it holds more
// than twice the connections of the sibling with the fewest among those that can accept now
// (listening, a thread free, alive; none: nullopt), plus 2. Exact balance is not the aim: on
// fewer cores than workers, a worker with more keep-alive connections serves more requests
// per wake-up (measured: [16, 16, 16, 16] used about 5 % more CPU per request than [21, 18,
// 16, 9]); one holding most of them serves them behind one GIL while its siblings idle ([55,
// 3, 3, 3]).
bool should_step_aside(int mine, std::optional<int> least_accepting);

// One worker's view of the shared board. Without a board (no fd, a malformed one, or no free
// entry) every call is a no-op and should_step_aside() says no: the worker accepts as before.
class AcceptBoard {
  public:
    // board_fd: the memfd, or -1. generation: this worker's.
    AcceptBoard(int board_fd, std::uint32_t generation, int threads);
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
    // The watcher thread: wait until a sibling calls this worker back, interrupt_wait() is
    // called, or timeout_ms passes (-1: no timeout).
    void wait_for_call(int timeout_ms);
    void interrupt_wait();

    struct Entry;  // defined in accept_balance.cpp, one cache line each

  private:
    // The fewest connections a free, alive sibling holds; on the way, siblings standing aside
    // that this worker would step aside for are called back.
    std::optional<int> scan_siblings(int mine);

    void* map_ = nullptr;
    std::size_t map_size_ = 0;
    Entry* entries_ = nullptr;
    std::size_t capacity_ = 0;
    Entry* mine_ = nullptr;  // set once, in the constructor
    std::uint32_t generation_;
};

}  // namespace molt::native
