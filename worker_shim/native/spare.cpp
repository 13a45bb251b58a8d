#include "spare.hpp"

#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <cstring>

#include "supervisor/contract/worker_contract.hpp"

namespace molt::native {
namespace {

constexpr int kFdsPerFork = 3;             // the worker's channel, stdout, stderr
constexpr std::size_t kMaxPacket = 65536;  // molt_shim.protocol.MAX_PACKET
char packet[kMaxPacket];                   // .bss: pages are touched only as far as written

void name_self(const char* comm) {
    int fd = open("/proc/self/comm", O_WRONLY | O_CLOEXEC);
    if (fd < 0) return;
    ssize_t ignored = write(fd, comm, strnlen(comm, 15));
    (void)ignored;
    close(fd);
}

// The intermediate exits right after forking us; its pidfd turns readable once it has, and
// by then the kernel has re-parented us (zygote.adopted_by, in Python, is the same rule). To
// anyone but the master (it died meanwhile, and an outer subreaper or init took us) we are
// nobody's worker: false.
bool adopted_by(pid_t master) {
    pid_t parent = getppid();
    if (parent != master && parent != 1) {
        int pidfd = static_cast<int>(syscall(SYS_pidfd_open, parent, 0));
        if (pidfd >= 0) {
            pollfd gone{pidfd, POLLIN, 0};
            poll(&gone, 1, 10'000);
            close(pidfd);
        } else {
            for (int tries = 0; getppid() == parent && tries < 50'000; ++tries) {  // Linux < 5.3
                timespec pause{0, 200'000};
                nanosleep(&pause, nullptr);
            }
        }
    }
    if (getppid() != master) return false;
    prctl(PR_SET_PDEATHSIG, SIGKILL, 0, 0, 0);
    return getppid() == master;  // the master may have died before the signal was set
}

// Blocks until the zygote sends a request; its length and fds, or -1 (EOF: the zygote is gone).
ssize_t wait_for_request(int sock, int fds[kFdsPerFork], int& nfds) {
    alignas(cmsghdr) char control[CMSG_SPACE(sizeof(int) * kFdsPerFork)];
    iovec data{packet, sizeof packet};
    msghdr msg{};
    msg.msg_iov = &data;
    msg.msg_iovlen = 1;
    msg.msg_control = control;
    msg.msg_controllen = sizeof control;
    ssize_t got;
    do {
        got = recvmsg(sock, &msg, 0);
    } while (got < 0 && errno == EINTR);
    nfds = 0;
    if (got > 0) {
        for (cmsghdr* c = CMSG_FIRSTHDR(&msg); c != nullptr; c = CMSG_NXTHDR(&msg, c)) {
            if (c->cmsg_level != SOL_SOCKET || c->cmsg_type != SCM_RIGHTS) continue;
            std::size_t n = (c->cmsg_len - CMSG_LEN(0)) / sizeof(int);
            for (std::size_t i = 0; i < n && nfds < kFdsPerFork; ++i)
                std::memcpy(&fds[nfds++], CMSG_DATA(c) + i * sizeof(int), sizeof(int));
        }
    }
    return got > 0 ? got : -1;
}

bool send_text(int fd, const char* text, int length) {
    ssize_t sent;
    do {
        sent = send(fd, text, static_cast<std::size_t>(length), MSG_NOSIGNAL);
    } while (sent < 0 && errno == EINTR);
    return sent == length;
}

// In the intermediate, once the spare is forked: the master learns its pid on the zygote's
// channel (SPARE_PID=), and the pid is left on the pair for the zygote, which reads it at the
// next request. Nothing wakes the zygote (zygote.Spare says why).
void tell_of_spare(int channel, int sock, pid_t spare) {
    const std::string_view key = contract::key::spare_pid;
    char text[48];
    int length = std::snprintf(text, sizeof text, "%.*s=%d", static_cast<int>(key.size()),
                               key.data(), static_cast<int>(spare));
    if (channel >= 0) send_text(channel, text, length);
    length = std::snprintf(text, sizeof text, "%d", static_cast<int>(spare));
    send_text(sock, text, length);
}

// In the spare: returns only once it was handed a request (the rest end in _exit()).
PyObject* be_the_spare(int sock, int zygote_end, int channel, pid_t master, const char* comm) {
    close(zygote_end);
    int null = open("/dev/null", O_RDWR | O_CLOEXEC);
    if (null >= 0 && channel >= 0) {
        dup3(null, channel, O_CLOEXEC);
        close(null);
    }
    name_self(comm);
    if (!adopted_by(master)) _exit(0);
    int fds[kFdsPerFork];
    int nfds = 0;
    ssize_t got = wait_for_request(sock, fds, nfds);
    if (got < 0) _exit(0);
    close(sock);
    PyOS_AfterFork_Child();
    // (packet, [fds]); no memory for these few small objects means nothing to serve with.
    PyObject* fd_list = PyList_New(nfds);
    PyObject* data = PyBytes_FromStringAndSize(packet, got);
    PyObject* result = fd_list && data ? PyTuple_New(2) : nullptr;
    if (result == nullptr) _exit(1);
    for (int i = 0; i < nfds; ++i) {
        PyObject* fd = PyLong_FromLong(fds[i]);
        if (fd == nullptr) _exit(1);
        PyList_SetItem(fd_list, i, fd);
    }
    PyTuple_SetItem(result, 0, data);
    PyTuple_SetItem(result, 1, fd_list);
    return result;
}

// In the zygote, right after forking the spare: every page it writes from now on is a page the
// spare keeps a private copy of, and the Python loop it would return to writes dozens (frames,
// the select() call's objects). Nothing is due before the master's next message (the spare
// waits, the kernel reaps the intermediate), so wait for it here. A signal returns early, to
// the loop, which handles it and waits there.
bool wait_for_the_master(int channel) {
    // A signal that came during the fork (which the kernel restarts) is handled first.
    if (PyErr_CheckSignals() < 0) return false;
    if (channel < 0) return true;
    pollfd message{channel, POLLIN, 0};
    PyThreadState* saved = PyEval_SaveThread();
    poll(&message, 1, -1);
    PyEval_RestoreThread(saved);
    return true;
}

}  // namespace

PyObject* fork_spare(PyObject*, PyObject* args) {
    int sock = -1, zygote_end = -1, channel = -1, master = 0;
    const char* comm = "";
    if (!PyArg_ParseTuple(args, "iiiis", &sock, &zygote_end, &channel, &master, &comm))
        return nullptr;
    PyOS_BeforeFork();
    pid_t pid = fork();
    if (pid != 0) {
        int error = errno;
        PyOS_AfterFork_Parent();
        if (pid < 0) {
            errno = error;
            return PyErr_SetFromErrno(PyExc_OSError);
        }
        if (!wait_for_the_master(channel)) return nullptr;  // the signal handler's exception
        return PyLong_FromLong(pid);
    }
    // The intermediate. The zygote ignores SIGCHLD, so the kernel reaps the children of a
    // process that does: a spare that died before this process exits would never reach the
    // master. The spare inherits the default from here.
    signal(SIGCHLD, SIG_DFL);
    pid_t spare = fork();  // its only work is this fork, and saying so
    if (spare != 0) {
        if (spare > 0) tell_of_spare(channel, sock, spare);
        _exit(spare < 0 ? 1 : 0);  // a failed fork reads as EOF in the zygote
    }
    return be_the_spare(sock, zygote_end, channel, master, comm);
}

}  // namespace molt::native
