// The OS layer: every syscall the master makes goes through here, and every failure comes
// back as text that reads like nginx's: "kill(4312, SIGTERM) failed: No such process".
#pragma once

#include <sys/types.h>

#include <optional>
#include <string>
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
// as stdin, and no fds but 0-2 and `fds`. An exec failure is written to the child's stderr
// and ends it with status 127, so the master reports it like any other boot failure.
Result<pid_t> spawn_process(const SpawnRequest& request);

// kill(pid, sig); empty on success, the error text otherwise. `no_such_process` is set on ESRCH.
std::string send_signal(pid_t pid, int sig, bool* no_such_process = nullptr);

const char* signal_name(int sig);

struct SocketPair {
    int master_end = -1;
    int worker_end = -1;
};
Result<SocketPair>
make_channel();  // AF_UNIX SOCK_SEQPACKET, close-on-exec, master end non-blocking

struct Pipe {
    int read_end = -1;
    int write_end = -1;
};
Result<Pipe> make_pipe();

void close_fd(int& fd);

// The kernel's count of OOM kills so far (/proc/vmstat oom_kill); 0 when unknown.
unsigned long long oom_kill_count();

// Resident set size of a process in bytes (/proc/PID/statm); 0 when unknown.
unsigned long long resident_bytes(pid_t pid);

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

// Resolve user/group names to ids; errors name the missing user.
Result<uid_t> lookup_user(const std::string& name, gid_t* primary_group);
Result<gid_t> lookup_group(const std::string& name);

// ----- listeners -------------------------------------------------------------------------

struct Listener {
    config::ListenAddress address;
    int fd = -1;
    std::string bound;  // canonical address actually bound, e.g. with the kernel's port for :0
    bool from_systemd = false;
    bool remove_on_exit = false;  // a Unix socket file the master created
};

// Binds and listens on every address. Fails as a whole, with every problem named, so that a
// second molt on the same address stops at start with a clear error.
Result<std::vector<Listener>> open_listeners(const std::vector<config::ListenAddress>& addresses);

// Adopts sockets passed by systemd (LISTEN_FDS/LISTEN_FDNAMES), matching `listen:` entries by
// name or by address. Returns nullopt when no sockets were passed.
std::optional<Result<std::vector<Listener>>> adopt_systemd_listeners(
    const std::vector<config::ListenAddress>& addresses);

// Removes socket files this master created; leaves systemd's alone.
void close_listeners(std::vector<Listener>& listeners);

// The address a socket is bound to, as "tcp://host:port" or "unix:/path".
std::string socket_address(int fd);

}  // namespace molt::os
