#pragma once
// A move-only owner of a file descriptor and the EINTR-safe I/O built on it.

#include <chrono>
#include <cstddef>
#include <optional>
#include <span>
#include <string_view>
#include <sys/socket.h>
#include <cstring>
#include <sys/types.h>
#include <utility>

#include "mp/detail/fd.hpp"

namespace mp::sys {

/// The owner of a descriptor (defined in the public detail header: public classes hold one too).
using mp::detail::Fd;

/// Reads until `buf` is full or end of file; returns the bytes read (short only at EOF).
/// Retries on EINTR; waits for readiness on a non-blocking descriptor.
[[nodiscard]] std::size_t read_full(int fd, void* buf, std::size_t n);
/// Writes all of `buf`; retries on EINTR and short writes. Never raises SIGPIPE on a socket
/// (EPIPE is thrown as std::system_error instead).
void write_full(int fd, const void* buf, std::size_t n);
/// Writes `s` to standard error, best effort: retries EINTR and short writes, gives up quietly on
/// any other error. For diagnostics, which must not become errors of their own.
void write_stderr(std::string_view s) noexcept;

/// pipe2 with O_CLOEXEC (plus `flags`): {read end, write end}.
std::pair<Fd, Fd> make_pipe(int flags = 0);
/// socketpair(AF_UNIX, type | SOCK_CLOEXEC).
std::pair<Fd, Fd> make_socketpair(int type);

/// Waits until `fd` polls with any of `events` (or an error/hang-up). std::nullopt waits forever.
/// Returns false on timeout. Retries on EINTR with the remaining time.
bool wait_fd(int fd, short events, std::optional<std::chrono::nanoseconds> timeout);

/// poll()'s timeout for an optional wait (none: -1): rounded up to whole milliseconds, so a
/// short wait does not spin on poll(0), and capped at INT_MAX, so a long one does not wrap (the
/// caller polls again).
int poll_timeout_ms(std::optional<std::chrono::nanoseconds> timeout) noexcept;

/// The most descriptors one message carries (the kernel's SCM_MAX_FD).
inline constexpr std::size_t kMaxFds = 253;

/// Room for the SCM_RIGHTS control data of one message (kept on the stack: no allocation).
struct FdControl {
    alignas(cmsghdr) char buf[CMSG_SPACE(sizeof(int) * kMaxFds)];
};

/// Makes `msg` carry `fds` as SCM_RIGHTS, in `control`; nothing when `fds` is empty. Throws
/// std::system_error(EMSGSIZE) for more than kMaxFds.
void attach_rights(msghdr& msg, FdControl& control, std::span<const int> fds);

/// Calls take(fd) for every descriptor a received message carried, in order. Every one must be
/// taken (owned or closed) by `take`, or it leaks.
template <class Take>
void for_each_right(msghdr& msg, Take&& take) {
    for (cmsghdr* c = CMSG_FIRSTHDR(&msg); c != nullptr; c = CMSG_NXTHDR(&msg, c)) {
        if (c->cmsg_level != SOL_SOCKET || c->cmsg_type != SCM_RIGHTS) continue;
        const std::size_t count = (c->cmsg_len - CMSG_LEN(0)) / sizeof(int);
        for (std::size_t i = 0; i < count; ++i) {
            int fd;
            std::memcpy(&fd, CMSG_DATA(c) + i * sizeof(int), sizeof fd);
            take(fd);
        }
    }
}
/// One message to receive, with room for kMaxFds descriptors. `msg` points into the object
/// itself, so it does not move.
struct RecvMsg {
    RecvMsg(void* data, std::size_t n) noexcept;
    RecvMsg(const RecvMsg&) = delete;
    RecvMsg& operator=(const RecvMsg&) = delete;
    /// The kernel dropped descriptors that did not fit (MSG_CTRUNC).
    bool truncated() const noexcept { return (msg.msg_flags & MSG_CTRUNC) != 0; }

    iovec iov{};
    FdControl control;
    msghdr msg{};
};
/// The one receive loop for messages that may carry descriptors: recvmsg into `m` (descriptors
/// close-on-exec, to be taken with for_each_right), retried on EINTR. On EAGAIN (a non-blocking
/// socket with nothing to read): waits for data when `block`, else returns std::nullopt. Other
/// errors throw std::system_error named `what`. Returns the byte count, 0 at end of file.
std::optional<std::size_t> recv_msg(int sock, RecvMsg& m, bool block, const char* what);

/// Sends bytes and descriptors over a Unix socket in one message (SCM_RIGHTS).
void send_fds(int sock, const void* data, std::size_t n, std::span<const int> fds);
/// Receives one message of at most `n` bytes and up to `fds.size()` descriptors (close-on-exec).
/// Returns the byte count (0 at EOF); received descriptors are stored in `fds`, others left empty.
std::size_t recv_fds(int sock, void* data, std::size_t n, std::span<Fd> fds);

}  // namespace mp::sys
