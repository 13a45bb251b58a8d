#include "supervisor/os/os.hpp"

#include <dirent.h>
#include <fcntl.h>
#include <grp.h>
#include <pwd.h>
#include <signal.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <systemd/sd-daemon.h>
#include <time.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <climits>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>

#include "supervisor/common/text.hpp"

extern char** environ;

namespace molt::os {

std::string failed(const std::string& call, int err) {
    return call + " failed: " + std::strerror(err);
}

namespace {

// "fcntl(7, F_GETFL)"
std::string fmt_call(const char* call, int fd, const char* arguments) {
    return std::string(call) + "(" + std::to_string(fd) + ", " + arguments + ")";
}

// Only async-signal-safe calls below this point run in the child between fork and exec.
[[noreturn]] void child_fail(const char* what) {
    int err = errno;
    const char* text = strerror(err);  // glibc's strerror reads a static table
    (void)!write(2, "molt: worker start failed: ", 27);
    (void)!write(2, what, strlen(what));
    (void)!write(2, ": ", 2);
    (void)!write(2, text, strlen(text));
    (void)!write(2, "\n", 1);
    _exit(127);
}

[[noreturn]] void run_child(const SpawnRequest& request, char* const* argv, char* const* envp,
                            pid_t master) {
    setpgid(0, 0);
    sigset_t all;
    sigemptyset(&all);
    sigprocmask(SIG_SETMASK, &all, nullptr);
    for (int sig = 1; sig < NSIG; ++sig) {
        if (sig != SIGKILL && sig != SIGSTOP) signal(sig, SIG_DFL);
    }
    if (request.stdout_fd >= 0 && dup2(request.stdout_fd, 1) < 0) child_fail("dup2(stdout)");
    if (request.stderr_fd >= 0 && dup2(request.stderr_fd, 2) < 0) child_fail("dup2(stderr)");
    int devnull = open("/dev/null", O_RDONLY);
    if (devnull >= 0 && devnull != 0) {
        dup2(devnull, 0);
        close(devnull);
    }
    // Move every source fd out of the way first, so that placing fd N never clobbers a
    // source that is itself N.
    int count = static_cast<int>(request.fds.size());
    int moved[256];
    if (count > 256) child_fail("too many fds");
    for (int i = 0; i < count; ++i) {
        moved[i] = fcntl(request.fds[i], F_DUPFD_CLOEXEC, 3 + count);
        if (moved[i] < 0) child_fail("fcntl(F_DUPFD_CLOEXEC)");
    }
    for (int i = 0; i < count; ++i) {
        if (dup2(moved[i], 3 + i) < 0) child_fail("dup2");  // dup2 clears close-on-exec
    }
    close_range(3 + count, ~0U, 0);
    if (!request.cwd.empty() && chdir(request.cwd.c_str()) < 0) child_fail("chdir");
    if (request.gid && setgid(*request.gid) < 0) child_fail("setgid");
    if (request.uid) {
        if (!request.user.empty() && request.gid &&
            initgroups(request.user.c_str(), *request.gid) < 0) {
            child_fail("initgroups");
        }
        if (setuid(*request.uid) < 0) child_fail("setuid");
    }
    // Nothing outlives the master: SIGKILL reaches the child when the master dies, whatever the
    // child is doing (an import that hangs, a blocking C call, stopped). Set after the identity
    // change, which clears it; kept across exec (molt never execs a set-id program). The signal
    // follows the thread that forked: the master's loop is its only thread, so that is the
    // master's own death. A binary upgrade re-execs the master in place (same pid): no death,
    // no signal, the workers stay its children.
    if (prctl(PR_SET_PDEATHSIG, SIGKILL) < 0) child_fail("prctl(PR_SET_PDEATHSIG)");
    // The master may have died before the prctl took effect: then no signal is coming.
    if (getppid() != master) _exit(127);
    execve(request.program.c_str(), argv, envp);
    child_fail(request.program.c_str());
}

std::vector<char*> c_strings(const std::vector<std::string>& strings) {
    std::vector<char*> result;
    result.reserve(strings.size() + 1);
    for (const auto& s : strings) result.push_back(const_cast<char*>(s.c_str()));
    result.push_back(nullptr);
    return result;
}

}  // namespace

Result<pid_t> spawn_process(const SpawnRequest& request) {
    // Everything the child needs is allocated before fork: the child must not malloc.
    auto argv = c_strings(request.argv);
    auto envp = c_strings(request.env);
    pid_t master = getpid();
    pid_t pid = fork();
    if (pid < 0) return Error{failed("fork()", errno)};
    if (pid == 0) run_child(request, argv.data(), envp.data(), master);
    // Also from the parent, so a signal sent right after fork already reaches the group.
    setpgid(pid, pid);
    return pid;
}

std::string send_signal(pid_t pid, int sig, bool* no_such_process) {
    if (::kill(pid, sig) == 0) return {};
    int err = errno;
    if (no_such_process) *no_such_process = err == ESRCH;
    return failed("kill(" + std::to_string(pid) + ", " + text::signal_name(sig) + ")", err);
}

void Fd::reset(int fd) {
    // close() is not retried on EINTR: on Linux the fd is released either way.
    if (fd_ >= 0 && fd_ != fd) ::close(fd_);
    fd_ = fd;
}

Result<SocketPair> make_channel() {
    int fds[2];
    if (socketpair(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0, fds) < 0) {
        return Error{failed("socketpair(AF_UNIX, SOCK_SEQPACKET)", errno)};
    }
    SocketPair pair{Fd(fds[0]), Fd(fds[1])};
    if (auto error = set_nonblocking(pair.master_end.get()); !error.empty()) return Error{error};
    return pair;
}

Result<Pipe> make_pipe() {
    int fds[2];
    if (pipe2(fds, O_CLOEXEC) < 0) return Error{failed("pipe2()", errno)};
    return Pipe{Fd(fds[0]), Fd(fds[1])};
}

Result<ChildEnds> make_child_ends() {
    auto channel = make_channel();
    if (!ok(channel)) return Error{error_of(channel)};
    auto out = make_pipe();
    if (!ok(out)) return Error{error_of(out)};
    auto err = make_pipe();
    if (!ok(err)) return Error{error_of(err)};
    return ChildEnds{std::move(std::get<SocketPair>(channel)), std::move(std::get<Pipe>(out)),
                     std::move(std::get<Pipe>(err))};
}

Result<Fd> make_shared_memory(const char* name, std::size_t bytes) {
    Fd fd(memfd_create(name, MFD_CLOEXEC));
    if (!fd) return Error{failed("memfd_create(" + std::string(name) + ")", errno)};
    if (::ftruncate(fd.get(), static_cast<off_t>(bytes)) != 0) {
        return Error{failed(fmt_call("ftruncate", fd.get(), std::to_string(bytes).c_str()), errno)};
    }
    return fd;
}

std::string set_nonblocking(int fd) {
    int flags = ::fcntl(fd, F_GETFL);
    if (flags < 0) return failed(fmt_call("fcntl", fd, "F_GETFL"), errno);
    if (::fcntl(fd, F_SETFL, flags | O_NONBLOCK) < 0) {
        return failed(fmt_call("fcntl", fd, "F_SETFL, O_NONBLOCK"), errno);
    }
    return {};
}

std::string set_close_on_exec(int fd, bool on) {
    int flags = ::fcntl(fd, F_GETFD);
    if (flags < 0) return failed(fmt_call("fcntl", fd, "F_GETFD"), errno);
    int wanted = on ? flags | FD_CLOEXEC : flags & ~FD_CLOEXEC;
    if (::fcntl(fd, F_SETFD, wanted) < 0) {
        return failed(fmt_call("fcntl", fd, on ? "F_SETFD, FD_CLOEXEC" : "F_SETFD, 0"), errno);
    }
    return {};
}

std::string read_available(int fd, std::size_t limit) {
    std::string data;
    char buffer[8192];
    while (data.size() < limit) {
        std::size_t want = std::min(sizeof buffer, limit - data.size());
        ssize_t n = ::read(fd, buffer, want);
        if (n < 0 && errno == EINTR) continue;
        if (n <= 0) break;
        data.append(buffer, static_cast<std::size_t>(n));
    }
    return data;
}

Packet receive_packet(int fd) {
    char buffer[65536];
    for (;;) {
        ssize_t n = ::recv(fd, buffer, sizeof buffer, MSG_DONTWAIT);
        if (n > 0) return Packet{Packet::Status::packet, std::string(buffer, n), {}};
        if (n == 0) return Packet{Packet::Status::closed, {}, {}};
        if (errno == EINTR) continue;
        if (errno == EAGAIN || errno == EWOULDBLOCK) return Packet{};
        return Packet{
            Packet::Status::closed, {}, failed(fmt_call("recv", fd, "MSG_DONTWAIT"), errno)};
    }
}

std::string send_packet(int fd, std::string_view message, pid_t peer) {
    if (::send(fd, message.data(), message.size(), MSG_NOSIGNAL | MSG_DONTWAIT) >= 0) return {};
    return failed("send(" + std::string(message) + " to pid " + std::to_string(peer) + ")", errno);
}

std::string send_packet_with_fds(int fd, std::string_view message, const std::vector<int>& fds,
                                 pid_t peer) {
    iovec data{const_cast<char*>(message.data()), message.size()};
    std::vector<char> control(CMSG_SPACE(sizeof(int) * fds.size()), 0);
    msghdr header{};
    header.msg_iov = &data;
    header.msg_iovlen = 1;
    header.msg_control = control.data();
    header.msg_controllen = control.size();
    cmsghdr* rights = CMSG_FIRSTHDR(&header);
    rights->cmsg_level = SOL_SOCKET;
    rights->cmsg_type = SCM_RIGHTS;
    rights->cmsg_len = CMSG_LEN(sizeof(int) * fds.size());
    std::memcpy(CMSG_DATA(rights), fds.data(), sizeof(int) * fds.size());
    if (::sendmsg(fd, &header, MSG_NOSIGNAL | MSG_DONTWAIT) >= 0) return {};
    return failed("sendmsg(" + std::string(message.substr(0, message.find('\n'))) +
                      " with fds to pid " + std::to_string(peer) + ")",
                  errno);
}

std::string become_subreaper() {
    if (::prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0) return {};
    return failed("prctl(PR_SET_CHILD_SUBREAPER)", errno);
}

std::optional<Reaped> reap_child() {
    for (;;) {
        int status = 0;
        pid_t pid = ::waitpid(-1, &status, WNOHANG);
        if (pid > 0) return Reaped{pid, status};
        // 0: children left, none exited; ECHILD: no children at all.
        if (pid < 0 && errno == EINTR) continue;
        return std::nullopt;
    }
}

pid_t self_pid() {
    return ::getpid();
}

void ignore_signal(int sig) {
    struct sigaction action {};
    action.sa_handler = SIG_IGN;
    ::sigaction(sig, &action, nullptr);
}

std::vector<std::string> environment() {
    std::vector<std::string> entries;
    for (char** entry = environ; *entry; ++entry) entries.emplace_back(*entry);
    return entries;
}

void unset_environment(const char* name) {
    ::unsetenv(name);
}

sigset_t block_all_signals() {
    sigset_t all, old;
    sigfillset(&all);
    ::sigprocmask(SIG_BLOCK, &all, &old);
    return old;
}

void set_signal_mask(const sigset_t& mask) {
    ::sigprocmask(SIG_SETMASK, &mask, nullptr);
}

void unblock_all_signals() {
    sigset_t all;
    sigfillset(&all);
    ::sigprocmask(SIG_UNBLOCK, &all, nullptr);
}

std::string exec_image(const std::string& program, const std::vector<std::string>& argv,
                       const std::vector<std::string>& env) {
    auto args = c_strings(argv);
    auto envp = c_strings(env);
    ::execve(program.c_str(), args.data(), envp.data());
    return failed("execve(" + program + ")", errno);
}

std::string notify_systemd(const std::string& message) {
    int rc = sd_notify(0, message.c_str());
    if (rc >= 0) return {};
    std::string first_line = message.substr(0, message.find('\n'));
    return failed("sd_notify(" + first_line + ")", -rc);
}

std::uint64_t systemd_watchdog_us() {
    std::uint64_t usec = 0;
    return sd_watchdog_enabled(0, &usec) > 0 ? usec : 0;
}

std::uint64_t wall_clock_us() {
    timespec ts{};
    ::clock_gettime(CLOCK_REALTIME, &ts);
    return static_cast<std::uint64_t>(ts.tv_sec) * 1000000 + ts.tv_nsec / 1000;
}

std::uint64_t monotonic_us() {
    timespec ts{};
    ::clock_gettime(CLOCK_MONOTONIC, &ts);
    return static_cast<std::uint64_t>(ts.tv_sec) * 1000000 + ts.tv_nsec / 1000;
}

std::string write_pidfile(const std::string& path, pid_t pid) {
    // A link planted at the pidfile's path (by whoever can write its directory) must not make
    // the master, often root, write or replace the file the link points to.
    Fd existing(::open(path.c_str(), O_RDONLY | O_NOFOLLOW | O_CLOEXEC | O_NONBLOCK));
    if (!existing && errno == ELOOP) {
        return "pidfile " + path +
               " is a symbolic link; molt does not write through links (remove it, or point "
               "pidfile: at a plain path)";
    }
    existing.reset();
    std::string temporary = path + ".tmp." + std::to_string(pid);
    Fd file(::open(temporary.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, 0644));
    if (!file && errno == EEXIST) {
        // Left by a crashed master that had our pid; O_EXCL then makes sure we own the new one.
        ::unlink(temporary.c_str());
        file.reset(
            ::open(temporary.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, 0644));
    }
    if (!file) return failed("open(" + temporary + ", O_CREAT|O_EXCL|O_NOFOLLOW)", errno);
    std::string text = std::to_string(pid) + "\n";
    ssize_t written = ::write(file.get(), text.data(), text.size());
    if (written != static_cast<ssize_t>(text.size())) {
        std::string error = written < 0 ? failed("write(" + temporary + ")", errno)
                                        : "write(" + temporary + ") was short";
        ::unlink(temporary.c_str());
        return error;
    }
    file.reset();
    // rename() replaces whatever is at `path` (a link included) and never follows it.
    if (::rename(temporary.c_str(), path.c_str()) < 0) {
        std::string error = failed("rename(" + temporary + ", " + path + ")", errno);
        ::unlink(temporary.c_str());
        return error;
    }
    return {};
}

std::string remove_file(const std::string& path) {
    if (::unlink(path.c_str()) == 0 || errno == ENOENT) return {};
    return failed("unlink(" + path + ")", errno);
}

FileInfo file_info(const std::string& path) {
    struct stat st {};
    FileInfo info;
    if (::lstat(path.c_str(), &st) != 0) return info;
    info.kind = S_ISDIR(st.st_mode)   ? FileInfo::Kind::directory
                : S_ISLNK(st.st_mode) ? FileInfo::Kind::symlink
                : S_ISREG(st.st_mode) ? FileInfo::Kind::regular
                                      : FileInfo::Kind::other;
    info.mtime_sec = st.st_mtim.tv_sec;
    info.mtime_nsec = st.st_mtim.tv_nsec;
    info.size = st.st_size;
    return info;
}

Result<std::vector<std::string>> list_directory(const std::string& path) {
    DIR* dir = ::opendir(path.c_str());
    if (dir == nullptr) return Error{failed("opendir(" + path + ")", errno)};
    std::vector<std::string> names;
    while (dirent* entry = ::readdir(dir)) {
        std::string name = entry->d_name;
        if (name != "." && name != "..") names.push_back(std::move(name));
    }
    ::closedir(dir);
    return names;
}

std::string read_link(const std::string& path) {
    char target[PATH_MAX];
    ssize_t n = ::readlink(path.c_str(), target, sizeof target);
    return n > 0 ? std::string(target, static_cast<std::size_t>(n)) : std::string();
}

bool exists(const std::string& path) {
    return ::access(path.c_str(), F_OK) == 0;
}

unsigned long long oom_kill_count() {
    std::ifstream vmstat("/proc/vmstat");
    std::string key;
    unsigned long long value = 0;
    while (vmstat >> key >> value) {
        if (key == "oom_kill") return value;
    }
    return 0;
}

unsigned long long resident_bytes(pid_t pid) {
    std::ifstream statm("/proc/" + std::to_string(pid) + "/statm");
    unsigned long long size = 0, resident = 0;
    if (!(statm >> size >> resident)) return 0;
    return resident * static_cast<unsigned long long>(sysconf(_SC_PAGESIZE));
}

unsigned long long proportional_bytes(pid_t pid) {
    std::ifstream rollup("/proc/" + std::to_string(pid) + "/smaps_rollup");
    std::string line;
    while (std::getline(rollup, line)) {
        if (line.rfind("Pss:", 0) != 0) continue;
        unsigned long long kib = 0;
        std::sscanf(line.c_str() + 4, "%llu", &kib);
        return kib * 1024;
    }
    return 0;
}

Result<std::string> find_program(const std::string& name) {
    if (name.find('/') != std::string::npos) return name;
    const char* path = std::getenv("PATH");
    std::string dirs = path ? path : "/usr/local/bin:/usr/bin:/bin";
    std::size_t start = 0;
    while (start <= dirs.size()) {
        std::size_t end = dirs.find(':', start);
        if (end == std::string::npos) end = dirs.size();
        std::string dir = dirs.substr(start, end - start);
        std::string candidate = (dir.empty() ? "." : dir) + "/" + name;
        if (::access(candidate.c_str(), X_OK) == 0) return candidate;
        start = end + 1;
    }
    return Error{name + ": not found in PATH (" + dirs + ")"};
}

bool is_regular_file(const std::string& path) {
    struct stat st {};
    return ::stat(path.c_str(), &st) == 0 && S_ISREG(st.st_mode);
}

Result<std::string> real_path(const std::string& path) {
    char buffer[PATH_MAX];
    if (::realpath(path.c_str(), buffer) == nullptr)
        return Error{failed("realpath(" + path + ")", errno)};
    return std::string(buffer);
}

namespace {
char* title_area = nullptr;
std::size_t title_capacity = 0;
}  // namespace

void init_process_title(int argc, char** argv) {
    // argv's strings are contiguous; ps reads /proc/PID/cmdline from there.
    if (argc < 1) return;
    title_area = argv[0];
    char* end = argv[argc - 1] + std::strlen(argv[argc - 1]);
    title_capacity = static_cast<std::size_t>(end - title_area);
}

void set_process_title(const std::string& title) {
    ::prctl(PR_SET_NAME, title.substr(0, 15).c_str(), 0, 0, 0);
    if (title_area == nullptr || title_capacity == 0) return;
    std::size_t n = std::min(title.size(), title_capacity);
    std::memcpy(title_area, title.data(), n);
    std::memset(title_area + n, 0, title_capacity - n + 1);
}

std::string executable_path() {
    char buffer[PATH_MAX];
    ssize_t n = readlink("/proc/self/exe", buffer, sizeof buffer - 1);
    if (n <= 0) return "";
    return std::string(buffer, static_cast<size_t>(n));
}

std::string executable_dir() {
    std::string path = executable_path();
    if (path.empty()) return ".";
    return path.substr(0, path.rfind('/'));
}

std::string file_digest(const std::string& path) {
    std::ifstream file(path, std::ios::binary);
    if (!file) return "unknown";
    std::uint64_t hash = 1469598103934665603ULL;
    char buffer[65536];
    while (file.read(buffer, sizeof buffer) || file.gcount() > 0) {
        for (std::streamsize i = 0; i < file.gcount(); ++i) {
            hash = (hash ^ static_cast<unsigned char>(buffer[i])) * 1099511628211ULL;
        }
    }
    char text[17];
    std::snprintf(text, sizeof text, "%08llx", static_cast<unsigned long long>(hash >> 32));
    return text;
}

Result<uid_t> lookup_user(const std::string& name, gid_t* primary_group) {
    errno = 0;
    struct passwd* pw = getpwnam(name.c_str());
    if (pw == nullptr) {
        return Error{errno ? failed("getpwnam(" + name + ")", errno) : "no user named " + name};
    }
    if (primary_group) *primary_group = pw->pw_gid;
    return pw->pw_uid;
}

Result<gid_t> lookup_group(const std::string& name) {
    errno = 0;
    struct group* gr = getgrnam(name.c_str());
    if (gr == nullptr) {
        return Error{errno ? failed("getgrnam(" + name + ")", errno) : "no group named " + name};
    }
    return gr->gr_gid;
}

Result<std::vector<std::string>> inaccessible_as(const std::string& user, const std::string& group,
                                                 const std::vector<AccessCheck>& checks) {
    gid_t gid = 0;
    auto uid = lookup_user(user, &gid);
    if (!ok(uid)) return Error{error_of(uid)};
    if (!group.empty()) {
        auto named = lookup_group(group);
        if (!ok(named)) return Error{error_of(named)};
        gid = std::get<0>(named);
    }
    int fds[2];
    if (::pipe2(fds, O_CLOEXEC) != 0) return Error{failed("pipe2", errno)};
    Fd read_end(fds[0]);
    Fd write_end(fds[1]);
    pid_t child = ::fork();
    if (child < 0) return Error{failed("fork", errno)};
    if (child == 0) {
        // The child only takes the identity and asks; each refusal is "index errno\n".
        if (::initgroups(user.c_str(), gid) != 0 || ::setgid(gid) != 0 ||
            ::setuid(std::get<0>(uid)) != 0) {
            ::_exit(2);
        }
        for (std::size_t i = 0; i < checks.size(); ++i) {
            if (::access(checks[i].path.c_str(), checks[i].mode) == 0) continue;
            char line[64];
            int n = std::snprintf(line, sizeof line, "%zu %d\n", i, errno);
            if (::write(write_end.get(), line, static_cast<std::size_t>(n)) < 0) ::_exit(3);
        }
        ::_exit(0);
    }
    write_end = Fd();
    std::string answers;
    char buffer[4096];
    ssize_t n;
    while ((n = ::read(read_end.get(), buffer, sizeof buffer)) > 0 || (n < 0 && errno == EINTR)) {
        if (n > 0) answers.append(buffer, static_cast<std::size_t>(n));
    }
    int status = 0;
    while (::waitpid(child, &status, 0) < 0 && errno == EINTR) {
    }
    if (!WIFEXITED(status) || WEXITSTATUS(status) == 2) {
        return Error{"cannot take the identity of user " + user +
                     " to check what it can read (run molt check as root)"};
    }
    std::vector<std::string> refused;
    std::size_t index = 0;
    int err = 0;
    const char* at = answers.c_str();
    int used = 0;
    while (std::sscanf(at, "%zu %d\n%n", &index, &err, &used) == 2 && index < checks.size()) {
        refused.push_back(checks[index].path + ": " + std::strerror(err));
        at += used;
    }
    return refused;
}

std::string change_owner(const std::string& path, std::optional<uid_t> uid,
                         std::optional<gid_t> gid) {
    if (!uid && !gid) return {};
    if (::chown(path.c_str(), uid ? *uid : static_cast<uid_t>(-1),
                gid ? *gid : static_cast<gid_t>(-1)) < 0) {
        return failed("chown(\"" + path + "\")", errno);
    }
    return {};
}

}  // namespace molt::os
