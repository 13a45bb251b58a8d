// Listening sockets: bound once by the master and shared, at fixed fds, by every worker of
// every generation. No SO_REUSEPORT: with it, closing one socket would drop the connections
// queued on it, and a second molt could silently share the address.
#include <arpa/inet.h>
#include <fcntl.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <systemd/sd-daemon.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <cstring>

#include "supervisor/os/os.hpp"

namespace molt::os {

namespace {

Result<Fd> open_tcp(const config::ListenAddress& address) {
    addrinfo hints{};
    hints.ai_family = AF_UNSPEC;
    hints.ai_socktype = SOCK_STREAM;
    hints.ai_flags = AI_PASSIVE | AI_NUMERICSERV;
    addrinfo* found = nullptr;
    std::string port = std::to_string(address.port);
    const char* host = address.host.empty() ? nullptr : address.host.c_str();
    if (int rc = getaddrinfo(host, port.c_str(), &hints, &found); rc != 0) {
        return Error{address.text + ": cannot resolve " + address.host + ": " + gai_strerror(rc)};
    }
    std::string error;
    Fd fd;
    for (addrinfo* ai = found; ai != nullptr && !fd; ai = ai->ai_next) {
        fd.reset(::socket(ai->ai_family, ai->ai_socktype | SOCK_CLOEXEC, ai->ai_protocol));
        if (!fd) {
            error = failed("socket()", errno);
            continue;
        }
        int one = 1;
        if (::setsockopt(fd.get(), SOL_SOCKET, SO_REUSEADDR, &one, sizeof one) < 0) {
            error = failed("setsockopt(" + address.text + ", SO_REUSEADDR)", errno);
            fd.reset();
            continue;
        }
        // An IPv6 listener listens on IPv6 only, so [::]:8000 and 0.0.0.0:8000 can be
        // listed side by side and each means what it says.
        if (ai->ai_family == AF_INET6 &&
            ::setsockopt(fd.get(), IPPROTO_IPV6, IPV6_V6ONLY, &one, sizeof one) < 0) {
            error = failed("setsockopt(" + address.text + ", IPV6_V6ONLY)", errno);
            fd.reset();
            continue;
        }
        if (::bind(fd.get(), ai->ai_addr, ai->ai_addrlen) < 0) {
            int err = errno;
            error = failed("bind(" + address.text + ")", err);
            if (err == EADDRINUSE) error += " (is another molt or server already listening there?)";
            fd.reset();
            continue;
        }
        // A worker is woken for a connection only once its request has arrived: without
        // this, most `Connection: close` requests found nothing to read at accept() and
        // cost the worker a park in epoll and a second wake-up (docs/architecture.md,
        // "Deferred accept").
        using std::chrono::ceil;
        using std::chrono::seconds;
        int defer = static_cast<int>(ceil<seconds>(address.defer_accept).count());
        if (defer > 0 &&
            ::setsockopt(fd.get(), IPPROTO_TCP, TCP_DEFER_ACCEPT, &defer, sizeof defer) < 0) {
            error = failed("setsockopt(" + address.text + ", TCP_DEFER_ACCEPT)", errno);
            fd.reset();
            continue;
        }
        if (::listen(fd.get(), address.backlog) < 0) {
            error = failed("listen(" + address.text + ")", errno);
            fd.reset();
        }
    }
    freeaddrinfo(found);
    if (!fd) return Error{error};
    if (auto problem = set_nonblocking(fd.get()); !problem.empty()) return Error{problem};
    return fd;
}

Result<Fd> open_unix(const config::ListenAddress& address) {
    sockaddr_un sun{};
    sun.sun_family = AF_UNIX;
    if (address.path.size() >= sizeof sun.sun_path) {
        return Error{address.text + ": path longer than " +
                     std::to_string(sizeof sun.sun_path - 1) + " bytes"};
    }
    std::memcpy(sun.sun_path, address.path.c_str(), address.path.size() + 1);
    Fd fd(::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0));
    if (!fd) return Error{failed("socket(AF_UNIX)", errno)};

    struct stat st {};
    if (::lstat(address.path.c_str(), &st) == 0) {
        if (!S_ISSOCK(st.st_mode)) {
            return Error{address.text + ": " + address.path + " exists and is not a socket"};
        }
        // A live server answers; a stale file from a crashed process refuses.
        if (::connect(fd.get(), reinterpret_cast<sockaddr*>(&sun), sizeof sun) == 0) {
            return Error{address.text + ": another process is already listening on " +
                         address.path};
        }
        if (auto error = remove_file(address.path); !error.empty()) {
            return Error{address.text + ": stale socket file: " + error};
        }
        fd.reset(::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0));
        if (!fd) return Error{failed("socket(AF_UNIX)", errno)};
    }
    if (::bind(fd.get(), reinterpret_cast<sockaddr*>(&sun), sizeof sun) < 0) {
        return Error{failed("bind(" + address.text + ")", errno)};
    }
    // From here on the socket file is ours: a failure removes it again.
    std::string error;
    if (::chmod(address.path.c_str(), address.mode) < 0) {
        error = failed("chmod(" + address.path + ")", errno);
    } else if (::listen(fd.get(), address.backlog) < 0) {
        error = failed("listen(" + address.text + ")", errno);
    } else {
        error = set_nonblocking(fd.get());
    }
    if (!error.empty()) {
        ::unlink(address.path.c_str());
        return Error{error};
    }
    return fd;
}

}  // namespace

std::string socket_address(int fd) {
    sockaddr_storage storage{};
    socklen_t length = sizeof storage;
    if (getsockname(fd, reinterpret_cast<sockaddr*>(&storage), &length) < 0) return "?";
    char host[INET6_ADDRSTRLEN] = {};
    if (storage.ss_family == AF_INET) {
        auto* in = reinterpret_cast<sockaddr_in*>(&storage);
        inet_ntop(AF_INET, &in->sin_addr, host, sizeof host);
        return "tcp://" + std::string(host) + ":" + std::to_string(ntohs(in->sin_port));
    }
    if (storage.ss_family == AF_INET6) {
        auto* in6 = reinterpret_cast<sockaddr_in6*>(&storage);
        inet_ntop(AF_INET6, &in6->sin6_addr, host, sizeof host);
        return "tcp://[" + std::string(host) + "]:" + std::to_string(ntohs(in6->sin6_port));
    }
    if (storage.ss_family == AF_UNIX) {
        auto* sun = reinterpret_cast<sockaddr_un*>(&storage);
        return "unix:" + std::string(sun->sun_path);
    }
    return "?";
}

Result<std::vector<Listener>> open_listeners(const std::vector<config::ListenAddress>& addresses) {
    std::vector<Listener> listeners;
    std::string errors;
    for (const auto& address : addresses) {
        auto fd = address.kind == config::ListenAddress::Kind::tcp ? open_tcp(address)
                                                                   : open_unix(address);
        if (!ok(fd)) {
            errors += (errors.empty() ? "" : "; ") + error_of(fd);
            continue;
        }
        Listener listener;
        listener.address = address;
        listener.fd = std::move(std::get<Fd>(fd));
        listener.bound = socket_address(listener.fd.get());
        listener.remove_on_exit = address.kind == config::ListenAddress::Kind::unix_path;
        listeners.push_back(std::move(listener));
    }
    if (!errors.empty()) {
        if (auto cleanup = close_listeners(listeners); !cleanup.empty()) errors += "; " + cleanup;
        return Error{errors};
    }
    return listeners;
}

std::optional<Result<std::vector<Listener>>> adopt_systemd_listeners(
    const std::vector<config::ListenAddress>& addresses) {
    char** names = nullptr;
    int count = sd_listen_fds_with_names(1, &names);  // 1: unset LISTEN_* in our environment
    if (count <= 0) {
        if (count < 0)
            return Result<std::vector<Listener>>(Error{failed("sd_listen_fds()", -count)});
        return std::nullopt;
    }
    std::vector<Listener> listeners;
    std::string errors;
    for (int i = 0; i < count; ++i) {
        int fd = SD_LISTEN_FDS_START + i;
        std::string name = names && names[i] ? names[i] : "";
        std::string bound = socket_address(fd);
        Listener listener;
        listener.fd = Fd(fd);
        listener.bound = bound;
        listener.from_systemd = true;
        // Match a `listen:` entry by address first, else by LISTEN_FDNAMES: one socket unit
        // with several ListenStream= lines gives all of them the same name, so only the
        // address tells them apart. An unmatched socket is still served, under its own address.
        listener.address.text = bound;
        listener.address.name = name.empty() || name == "unknown" ? bound : name;
        const config::ListenAddress* match = nullptr;
        for (const auto& address : addresses) {
            if (address.text == bound) {
                match = &address;
                break;
            }
        }
        for (const auto& address : addresses) {
            if (match != nullptr) break;
            if (address.name == name) match = &address;
        }
        if (match != nullptr) listener.address = *match;
        for (const std::string& problem : {set_close_on_exec(fd, true), set_nonblocking(fd)}) {
            if (!problem.empty()) errors += (errors.empty() ? "" : "; ") + problem;
        }
        listeners.push_back(std::move(listener));
    }
    if (names) {
        for (int i = 0; i < count; ++i) free(names[i]);
        free(names);
    }
    if (!errors.empty()) return Result<std::vector<Listener>>(Error{errors});
    return Result<std::vector<Listener>>(std::move(listeners));
}

std::string close_listeners(std::vector<Listener>& listeners) {
    std::string errors;
    for (auto& listener : listeners) {
        if (listener.remove_on_exit && !listener.from_systemd) {
            std::string error = remove_file(listener.address.path);
            if (!error.empty()) errors += (errors.empty() ? "" : "; ") + error;
        }
        listener.fd.reset();
    }
    return errors;
}

}  // namespace molt::os
