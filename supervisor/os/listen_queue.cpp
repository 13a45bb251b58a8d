// The accept queue of a listening socket, for /metrics (os.hpp: listen_queue).
#include <linux/inet_diag.h>
#include <linux/netlink.h>
#include <linux/rtnetlink.h>
#include <linux/sock_diag.h>
#include <linux/unix_diag.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>

#include "supervisor/os/os.hpp"

namespace molt::os {

namespace {

// A listening TCP socket reports its accept queue in TCP_INFO: tcpi_unacked is the current
// length (sk_ack_backlog) and tcpi_sacked the limit (sk_max_ack_backlog).
Result<ListenQueue> tcp_listen_queue(int fd) {
    tcp_info info{};
    socklen_t size = sizeof info;
    if (::getsockopt(fd, IPPROTO_TCP, TCP_INFO, &info, &size) != 0) {
        return Error{failed("getsockopt(" + std::to_string(fd) + ", TCP_INFO)", errno)};
    }
    return ListenQueue{info.tcpi_unacked, info.tcpi_sacked};
}

// A listening Unix socket: the kernel's unix_diag answers with UNIX_DIAG_RQLEN, which for a
// listener holds the accept queue's length and its limit. /proc/net/unix has no queue length.
Result<ListenQueue> unix_listen_queue(int fd) {
    struct stat st {};
    if (::fstat(fd, &st) != 0) return Error{failed("fstat(" + std::to_string(fd) + ")", errno)};
    Fd nl(::socket(AF_NETLINK, SOCK_DGRAM | SOCK_CLOEXEC, NETLINK_SOCK_DIAG));
    if (!nl) return Error{failed("socket(AF_NETLINK, NETLINK_SOCK_DIAG)", errno)};
    struct {
        nlmsghdr header;
        unix_diag_req request;
    } query{};
    query.header.nlmsg_len = sizeof query;
    query.header.nlmsg_type = SOCK_DIAG_BY_FAMILY;
    query.header.nlmsg_flags = NLM_F_REQUEST;
    query.request.sdiag_family = AF_UNIX;
    query.request.udiag_states = ~0U;
    query.request.udiag_ino = static_cast<__u32>(st.st_ino);
    query.request.udiag_show = UDIAG_SHOW_RQLEN;
    query.request.udiag_cookie[0] = INET_DIAG_NOCOOKIE;
    query.request.udiag_cookie[1] = INET_DIAG_NOCOOKIE;
    if (::send(nl.get(), &query, sizeof query, 0) < 0) {
        return Error{failed("send(NETLINK_SOCK_DIAG)", errno)};
    }
    alignas(nlmsghdr) char buffer[8192];
    ssize_t got = ::recv(nl.get(), buffer, sizeof buffer, 0);
    if (got < 0) return Error{failed("recv(NETLINK_SOCK_DIAG)", errno)};
    auto* header = reinterpret_cast<nlmsghdr*>(buffer);
    for (auto left = static_cast<unsigned>(got); NLMSG_OK(header, left);
         header = NLMSG_NEXT(header, left)) {
        if (header->nlmsg_type == NLMSG_ERROR) {
            auto* error = static_cast<nlmsgerr*>(NLMSG_DATA(header));
            return Error{failed("NETLINK_SOCK_DIAG unix query", -error->error)};
        }
        if (header->nlmsg_type != SOCK_DIAG_BY_FAMILY) continue;
        auto* message = static_cast<unix_diag_msg*>(NLMSG_DATA(header));
        int attr_left = static_cast<int>(header->nlmsg_len - NLMSG_LENGTH(sizeof *message));
        for (auto* attr = reinterpret_cast<rtattr*>(message + 1); RTA_OK(attr, attr_left);
             attr = RTA_NEXT(attr, attr_left)) {
            if (attr->rta_type != UNIX_DIAG_RQLEN) continue;
            unix_diag_rqlen lengths{};
            std::memcpy(&lengths, RTA_DATA(attr), sizeof lengths);
            return ListenQueue{lengths.udiag_rqueue, lengths.udiag_wqueue};
        }
    }
    return Error{"NETLINK_SOCK_DIAG: no queue length for inode " + std::to_string(st.st_ino)};
}

}  // namespace

Result<ListenQueue> listen_queue(int fd) {
    sockaddr_storage address{};
    socklen_t size = sizeof address;
    if (::getsockname(fd, reinterpret_cast<sockaddr*>(&address), &size) != 0) {
        return Error{failed("getsockname(" + std::to_string(fd) + ")", errno)};
    }
    if (address.ss_family == AF_UNIX) return unix_listen_queue(fd);
    return tcp_listen_queue(fd);
}

}  // namespace molt::os
