#include "sys/fd.hpp"

#include <algorithm>
#include <cerrno>
#include <climits>
#include <cstring>
#include <fcntl.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>


#include "mp/detail/deadline.hpp"
#include "sys/error.hpp"

namespace mp::detail {

void Fd::reset(int fd) noexcept {
    if (fd_ >= 0) ::close(fd_);
    fd_ = fd;
}

Fd Fd::dup() const { return Fd(sys::check(::fcntl(fd_, F_DUPFD_CLOEXEC, 0), "fcntl(F_DUPFD_CLOEXEC)")); }

}  // namespace mp::detail

namespace mp::sys {

std::size_t read_full(int fd, void* buf, std::size_t n) {
    auto* p = static_cast<char*>(buf);
    std::size_t got = 0;
    while (got < n) {
        ssize_t r = ::read(fd, p + got, n - got);
        if (r > 0) {
            got += static_cast<std::size_t>(r);
        } else if (r == 0) {
            break;
        } else if (errno == EAGAIN) {
            wait_fd(fd, POLLIN, std::nullopt);
        } else if (errno != EINTR) {
            throw_system_error(errno, "read");
        }
    }
    return got;
}

void write_stderr(std::string_view s) noexcept {
    while (!s.empty()) {
        const ssize_t n = ::write(STDERR_FILENO, s.data(), s.size());
        if (n < 0) {
            if (errno == EINTR) continue;
            return;
        }
        s.remove_prefix(static_cast<std::size_t>(n));
    }
}

void write_full(int fd, const void* buf, std::size_t n) {
    const auto* p = static_cast<const char*>(buf);
    bool is_socket = true;
    while (n > 0) {
        // send(MSG_NOSIGNAL) keeps a closed peer from killing us with SIGPIPE; a pipe or file
        // is not a socket, so fall back to write for those.
        ssize_t r = is_socket ? ::send(fd, p, n, MSG_NOSIGNAL) : ::write(fd, p, n);
        if (r >= 0) {
            p += r;
            n -= static_cast<std::size_t>(r);
        } else if (errno == ENOTSOCK && is_socket) {
            is_socket = false;
        } else if (errno == EAGAIN) {
            wait_fd(fd, POLLOUT, std::nullopt);
        } else if (errno != EINTR) {
            throw_system_error(errno, is_socket ? "send" : "write");
        }
    }
}

std::pair<Fd, Fd> make_pipe(int flags) {
    int fds[2];
    check(::pipe2(fds, O_CLOEXEC | flags), "pipe2");
    return {Fd(fds[0]), Fd(fds[1])};
}

std::pair<Fd, Fd> make_socketpair(int type) {
    int fds[2];
    check(::socketpair(AF_UNIX, type | SOCK_CLOEXEC, 0, fds), "socketpair");
    return {Fd(fds[0]), Fd(fds[1])};
}

int poll_timeout_ms(std::optional<std::chrono::nanoseconds> timeout) noexcept {
    if (!timeout) return -1;
    if (*timeout <= std::chrono::nanoseconds::zero()) return 0;
    return static_cast<int>(std::min<std::chrono::milliseconds::rep>(
        std::chrono::ceil<std::chrono::milliseconds>(*timeout).count(), INT_MAX));
}

bool wait_fd(int fd, short events, std::optional<std::chrono::nanoseconds> timeout) {
    using clock = std::chrono::steady_clock;
    // Through mp's one saturating conversion: a caller's "what is left of a far deadline" can be
    // close to nanoseconds::max(), which then means no limit rather than an overflow.
    const auto deadline = mp::detail::deadline_after(mp::detail::Timeout(timeout))
                              .value_or(clock::time_point::max());
    if (deadline == clock::time_point::max()) timeout.reset();
    for (;;) {
        std::optional<std::chrono::nanoseconds> left;
        if (timeout) left = deadline - clock::now();
        pollfd p{fd, events, 0};
        int r = ::poll(&p, 1, poll_timeout_ms(left));
        if (r > 0) return true;
        if (r == 0) {
            if (clock::now() >= deadline) return false;
            continue;
        }
        if (errno != EINTR) throw_system_error(errno, "poll");
    }
}

void attach_rights(msghdr& msg, FdControl& control, std::span<const int> fds) {
    if (fds.empty()) return;
    if (fds.size() > kMaxFds) throw_system_error(EMSGSIZE, "sendmsg (too many descriptors)");
    std::memset(control.buf, 0, CMSG_SPACE(sizeof(int) * fds.size()));
    msg.msg_control = control.buf;
    msg.msg_controllen = CMSG_SPACE(sizeof(int) * fds.size());
    cmsghdr* c = CMSG_FIRSTHDR(&msg);
    c->cmsg_level = SOL_SOCKET;
    c->cmsg_type = SCM_RIGHTS;
    c->cmsg_len = CMSG_LEN(sizeof(int) * fds.size());
    std::memcpy(CMSG_DATA(c), fds.data(), sizeof(int) * fds.size());
}

void send_fds(int sock, const void* data, std::size_t n, std::span<const int> fds) {
    iovec iov{const_cast<void*>(data), n};
    msghdr msg{};
    msg.msg_iov = &iov;
    msg.msg_iovlen = 1;
    FdControl control;
    attach_rights(msg, control, fds);
    for (;;) {
        ssize_t r = ::sendmsg(sock, &msg, MSG_NOSIGNAL);
        if (r >= 0) {
            if (static_cast<std::size_t>(r) != n) throw_system_error(EMSGSIZE, "sendmsg");
            return;
        }
        if (errno == EAGAIN) {
            wait_fd(sock, POLLOUT, std::nullopt);
        } else if (errno != EINTR) {
            throw_system_error(errno, "sendmsg");
        }
    }
}

RecvMsg::RecvMsg(void* data, std::size_t n) noexcept : iov{data, n} {
    msg.msg_iov = &iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.buf;
    msg.msg_controllen = sizeof control.buf;
}

std::optional<std::size_t> recv_msg(int sock, RecvMsg& m, bool block, const char* what) {
    for (;;) {
        const ssize_t r = ::recvmsg(sock, &m.msg, MSG_CMSG_CLOEXEC);
        if (r >= 0) return static_cast<std::size_t>(r);
        if (errno == EAGAIN || errno == EWOULDBLOCK) {
            if (!block) return std::nullopt;
            wait_fd(sock, POLLIN, std::nullopt);
        } else if (errno != EINTR) {
            throw_system_error(errno, what);
        }
    }
}

std::size_t recv_fds(int sock, void* data, std::size_t n, std::span<Fd> fds) {
    RecvMsg m(data, n);
    const std::size_t r = *recv_msg(sock, m, true, "recvmsg");
    std::size_t stored = 0;
    // Take ownership of every descriptor received, even surplus ones, so none leaks.
    for_each_right(m.msg, [&](int fd) {
        Fd owned(fd);
        if (stored < fds.size()) fds[stored++] = std::move(owned);
    });
    if (m.truncated()) throw_system_error(EMSGSIZE, "recvmsg (descriptors truncated)");
    return r;
}

}  // namespace mp::sys
