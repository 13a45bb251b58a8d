// The OS layer: every syscall the master makes goes through here, and every failure comes
// back as text that reads like nginx's: "kill(4312, SIGTERM) failed: No such process".
#pragma once

#include <signal.h>
#include <sys/types.h>

#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <variant>
#include <vector>

#include "config/config.hpp"

namespace molt::os {

// "call failed: strerror(err)"
std::string failed(const std::string& call, int err);

struct Error {
    std::string text;
};

template <typename T>
using Result = std::variant<T, Error>;  // a value, or what went wrong

template <typename T>
bool ok(const Result<T>& r) {
    return r.index() == 0;
}

template <typename T>
const std::string& error_of(const Result<T>& r) {
    return std::get<Error>(r).text;
}

// An owned file descriptor: move-only, closed exactly once (by the destructor or reset()).
// release() hands the fd to a new owner (libuv, an exec'd image) that closes it itself.
class Fd {
  public:
    Fd() = default;
    explicit Fd(int fd) : fd_(fd) {}
    Fd(Fd&& other) noexcept : fd_(other.release()) {}
    Fd& operator=(Fd&& other) noexcept {
        if (this != &other) reset(other.release());
        return *this;
    }
    Fd(const Fd&) = delete;
    Fd& operator=(const Fd&) = delete;
    ~Fd() { reset(); }

    int get() const { return fd_; }
    explicit operator bool() const { return fd_ >= 0; }
    int release() {
        int fd = fd_;
        fd_ = -1;
        return fd;
    }
    void reset(int fd = -1);

  private:
    int fd_ = -1;
};

struct SpawnRequest {
    std::string program;
    std::vector<std::string> argv;
    std::vector<std::string> env;  // "KEY=VALUE"
    std::vector<int> fds;          // placed at 3, 4, ... in the child, in this order
    int stdout_fd = -1;
    int stderr_fd = -1;
    std::string cwd;
    std::optional<uid_t> uid;
    std::optional<gid_t> gid;
    std::string user;  // for initgroups when uid is set
};

// fork + exec. The child gets its own process group (a terminal's ^C reaches only the
// master, which then decides), default signal dispositions, an empty signal mask, /dev/null
// as stdin, no fds but 0-2 and `fds`, and SIGKILL as its parent-death signal (it never
// outlives the master). An exec failure is written to the child's stderr
// and ends it with status 127, so the master reports it like any other boot failure.
Result<pid_t> spawn_process(const SpawnRequest& request);

// kill(pid, sig); empty on success, the error text otherwise. `no_such_process` is set on ESRCH.
std::string send_signal(pid_t pid, int sig, bool* no_such_process = nullptr);

struct SocketPair {
    Fd master_end;
    Fd worker_end;
};
// AF_UNIX SOCK_SEQPACKET, close-on-exec, master end non-blocking.
Result<SocketPair> make_channel();

struct Pipe {
    Fd read_end;
    Fd write_end;
};
Result<Pipe> make_pipe();  // close-on-exec

// What the master makes for every worker process (spawned, or forked by a zygote): its channel
// and the pipes its stdout and stderr go to.
struct ChildEnds {
    SocketPair channel;
    Pipe out;
    Pipe err;
};
Result<ChildEnds> make_child_ends();

// Zero-filled shared memory of `bytes` (a memfd, close-on-exec), for the workers to map.
Result<Fd> make_shared_memory(const char* name, std::size_t bytes);

// fcntl flags; empty on success, the error text otherwise.
std::string set_nonblocking(int fd);
std::string set_close_on_exec(int fd, bool on);

// Whatever can be read from a non-blocking fd now, up to `limit` bytes (stops at EOF or when
// the fd would block); read errors other than EAGAIN end the read early.
std::string read_available(int fd, std::size_t limit);

// One SEQPACKET packet from a non-blocking channel.
struct Packet {
    enum class Status { packet, empty, closed };  // empty: nothing queued now
    Status status = Status::empty;
    std::string data;   // with Status::packet
    std::string error;  // with Status::closed after a failed recv (not a clean EOF)
};
Packet receive_packet(int fd);

// send() of one packet without blocking and without SIGPIPE; empty on success, otherwise
// "send(DRAIN=1 to pid 4312) failed: Broken pipe".
std::string send_packet(int fd, std::string_view message, pid_t peer);

// send() of one packet with `fds` attached (SCM_RIGHTS), without blocking or SIGPIPE; the
// receiver gets its own copies. Empty on success, otherwise the error text.
std::string send_packet_with_fds(int fd, std::string_view message, const std::vector<int>& fds,
                                 pid_t peer);

// prctl(PR_SET_CHILD_SUBREAPER): orphaned descendants (a worker forked by a zygote's
// short-lived intermediate) are re-parented to this process, so it reaps them. Empty on
// success, otherwise the error text.
std::string become_subreaper();

// waitpid(-1, WNOHANG): one exited child, or nullopt when none is waiting to be reaped.
struct Reaped {
    pid_t pid = 0;
    int status = 0;  // as waitpid reports it (WIFEXITED, WTERMSIG...)
};
std::optional<Reaped> reap_child();

// ----- the process itself ----------------------------------------------------------------

pid_t self_pid();
void ignore_signal(int sig);  // SIG_IGN, e.g. SIGPIPE: a gone peer is an error, not a death

// The process environment as "KEY=VALUE" entries, and unsetenv(3).
std::vector<std::string> environment();
void unset_environment(const char* name);

// Blocks every signal and returns the previous mask; the mask survives exec, so a signal sent
// while one image hands over to the next stays pending instead of acting by default.
sigset_t block_all_signals();
void set_signal_mask(const sigset_t& mask);
void unblock_all_signals();

// execve(2). Returns only on failure, with the error text.
std::string exec_image(const std::string& program, const std::vector<std::string>& argv,
                       const std::vector<std::string>& env);

// sd_notify(3) with `message`: empty on success or when molt does not run under systemd's
// notify protocol (no NOTIFY_SOCKET), otherwise the error text.
std::string notify_systemd(const std::string& message);

// The watchdog interval systemd asks for (WATCHDOG_USEC for this pid), 0 when none. The
// variables stay in the environment, so an image re-executed by a binary upgrade keeps
// pinging; children never see them (contract::is_scrubbed).
std::uint64_t systemd_watchdog_us();

// Clocks: wall time in microseconds since the epoch; monotonic time in microseconds.
std::uint64_t wall_clock_us();
std::uint64_t monotonic_us();

// ----- files ------------------------------------------------------------------------------

// Writes "PID\n" to `path` without ever following a symbolic link: a link at `path` is
// refused (open with O_NOFOLLOW), the text goes to a temporary file created with O_EXCL next
// to it, and rename() puts it in place atomically. Empty on success, the error otherwise.
std::string write_pidfile(const std::string& path, pid_t pid);

// unlink(2); a file that is already gone is not an error.
std::string remove_file(const std::string& path);

// lstat(2) reduced to what the watcher compares.
struct FileInfo {
    enum class Kind { missing, directory, symlink, regular, other };
    Kind kind = Kind::missing;
    std::int64_t mtime_sec = 0;
    std::int64_t mtime_nsec = 0;
    std::int64_t size = 0;
};
FileInfo file_info(const std::string& path);

// The entries of a directory except "." and ".."; an unreadable directory gives an error.
Result<std::vector<std::string>> list_directory(const std::string& path);

// readlink(2); empty when `path` is not a readable link.
std::string read_link(const std::string& path);

// access(F_OK).
bool exists(const std::string& path);

// The kernel's count of OOM kills so far (/proc/vmstat oom_kill); 0 when unknown.
unsigned long long oom_kill_count();

// Resident set size of a process in bytes (/proc/PID/statm); 0 when unknown.
unsigned long long resident_bytes(pid_t pid);

// Proportional set size of a process in bytes (/proc/PID/smaps_rollup): its resident pages,
// each shared page divided by the number of processes sharing it. 0 when unknown.
unsigned long long proportional_bytes(pid_t pid);

// A program named without a slash is looked up in PATH, as execvp would; with a slash it is
// returned as is. An error names what was searched.
Result<std::string> find_program(const std::string& name);

// Whether a path is a regular file (a zip or .pyz release rather than a directory).
bool is_regular_file(const std::string& path);

// realpath(3) as a Result.
Result<std::string> real_path(const std::string& path);

// Process titles, as ps shows them: init once from main() with argv, then set at will.
void init_process_title(int argc, char** argv);
void set_process_title(const std::string& title);

// The running executable (/proc/self/exe) and the directory holding it.
std::string executable_path();
std::string executable_dir();

// 8 hex digits of FNV-1a over a file's bytes; "unknown" when it cannot be read.
std::string file_digest(const std::string& path);

// What `user` (in `group`, or the user's own group when empty, plus its supplementary groups)
// cannot do of `checks`, asked with access(2) by a child that took that identity: modes,
// ACLs and every directory on the way count exactly as they will for a worker. One
// "PATH: reason" per refused check; an error when the identity cannot be taken (not root).
struct AccessCheck {
    std::string path;
    int mode;  // R_OK, W_OK, X_OK as for access(2)
};
Result<std::vector<std::string>> inaccessible_as(const std::string& user, const std::string& group,
                                                 const std::vector<AccessCheck>& checks);

// Resolve user/group names to ids; errors name the missing user.
Result<uid_t> lookup_user(const std::string& name, gid_t* primary_group);
Result<gid_t> lookup_group(const std::string& name);
// chown(path, uid, gid), leaving an id that is not given as it is; empty, or the error text.
std::string change_owner(const std::string& path, std::optional<uid_t> uid,
                         std::optional<gid_t> gid);

// ----- listeners -------------------------------------------------------------------------

struct Listener {
    config::ListenAddress address;
    Fd fd;
    std::string bound;  // canonical address actually bound, e.g. with the kernel's port for :0
    bool from_systemd = false;
    bool remove_on_exit = false;  // a Unix socket file the master created
};

// How full a listening socket's accept queue is: connections the kernel completed that no
// worker has accepted yet, and the backlog limit. TCP: getsockopt(TCP_INFO) on the listener
// (tcpi_unacked, tcpi_sacked); Unix: a sock_diag netlink query (UDIAG_SHOW_RQLEN) for the
// socket's inode. One syscall or one netlink round trip each, run at scrape time only.
struct ListenQueue {
    std::uint64_t depth = 0;
    std::uint64_t limit = 0;
};
Result<ListenQueue> listen_queue(int fd);

// Binds and listens on every address. Fails as a whole, with every problem named, so that a
// second molt on the same address stops at start with a clear error.
Result<std::vector<Listener>> open_listeners(const std::vector<config::ListenAddress>& addresses);

// Adopts sockets passed by systemd (LISTEN_FDS/LISTEN_FDNAMES), matching `listen:` entries by
// name or by address. Returns nullopt when no sockets were passed.
std::optional<Result<std::vector<Listener>>> adopt_systemd_listeners(
    const std::vector<config::ListenAddress>& addresses);

// Closes the sockets and removes the socket files this master created (systemd's stay).
// Empty on success, otherwise what could not be removed.
std::string close_listeners(std::vector<Listener>& listeners);

// The address a socket is bound to, as "tcp://host:port" or "unix:/path".
std::string socket_address(int fd);

}  // namespace molt::os
