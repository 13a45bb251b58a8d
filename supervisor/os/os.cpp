#include "supervisor/os/os.hpp"

#include <fcntl.h>
#include <grp.h>
#include <pwd.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <climits>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>

namespace molt::os {

std::string failed(const std::string& call, int err) {
    return call + " failed: " + std::strerror(err);
}

const char* signal_name(int sig) {
    switch (sig) {
        case SIGHUP:
            return "SIGHUP";
        case SIGINT:
            return "SIGINT";
        case SIGQUIT:
            return "SIGQUIT";
        case SIGABRT:
            return "SIGABRT";
        case SIGKILL:
            return "SIGKILL";
        case SIGTERM:
            return "SIGTERM";
        case SIGUSR1:
            return "SIGUSR1";
        case SIGUSR2:
            return "SIGUSR2";
        case SIGCHLD:
            return "SIGCHLD";
        case SIGTTIN:
            return "SIGTTIN";
        case SIGTTOU:
            return "SIGTTOU";
        default:
            return "signal";
    }
}

namespace {

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

[[noreturn]] void run_child(const SpawnRequest& request, char* const* argv, char* const* envp) {
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
    pid_t pid = fork();
    if (pid < 0) return Error{failed("fork()", errno)};
    if (pid == 0) run_child(request, argv.data(), envp.data());
    // Also from the parent, so a signal sent right after fork already reaches the group.
    setpgid(pid, pid);
    return pid;
}

std::string send_signal(pid_t pid, int sig, bool* no_such_process) {
    if (::kill(pid, sig) == 0) return {};
    int err = errno;
    if (no_such_process) *no_such_process = err == ESRCH;
    return failed("kill(" + std::to_string(pid) + ", " + signal_name(sig) + ")", err);
}

Result<SocketPair> make_channel() {
    int fds[2];
    if (socketpair(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0, fds) < 0) {
        return Error{failed("socketpair(AF_UNIX, SOCK_SEQPACKET)", errno)};
    }
    fcntl(fds[0], F_SETFL, fcntl(fds[0], F_GETFL) | O_NONBLOCK);
    return SocketPair{fds[0], fds[1]};
}

Result<Pipe> make_pipe() {
    int fds[2];
    if (pipe2(fds, O_CLOEXEC) < 0) return Error{failed("pipe2()", errno)};
    return Pipe{fds[0], fds[1]};
}

void close_fd(int& fd) {
    if (fd >= 0) ::close(fd);
    fd = -1;
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

}  // namespace molt::os
