// mp::Connection and Pipe(): framing (Python's 4-byte and -1 + 8-byte headers), buffered
// reads with descriptors that arrived in the same messages, send/recv of objects, wait().
// One file because the read buffer, the descriptor batches and the frame parser are one state
// (detail::ConnectionState) that every receive path shares.

#include "mp/connection.hpp"

#include <algorithm>
#include <cerrno>
#include <csignal>
#include <cstring>
#include <ctime>
#include <fcntl.h>
#include <limits>
#include <memory>
#include <poll.h>
#include <pthread.h>
#include <stdexcept>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/uio.h>
#include <system_error>
#include <unistd.h>

#include "sys/error.hpp"
#include "sys/fd.hpp"

namespace mp {

namespace detail {
struct ConnectionState {
    sys::Fd fd;
    bool readable = false;
    bool writable = false;
    // Sockets are written with sendmsg(MSG_NOSIGNAL); anything else needs the SIGPIPE dance.
    bool is_socket = false;
    // Descriptors may arrive (a Unix socket, or a socket of unknown family): read with recvmsg.
    bool may_carry_fds = false;

    // The receive buffer (see "Reading ahead" in connection.hpp). rbuf[rpos, rend) holds bytes
    // taken from the descriptor that no receive has returned yet; they always start at a frame
    // boundary or inside the frame being received. `consumed` is the stream offset of
    // rbuf[rpos]. A socket fills it with one recvmsg of up to kReadAhead bytes; a pipe only
    // ever reads the header bytes it needs, so its stream never runs ahead of the frames
    // returned (its reading end may be shared between processes, as Python's queues do).
    std::unique_ptr<char[]> rbuf;
    std::size_t rpos = 0;
    std::size_t rend = 0;
    std::uint64_t consumed = 0;
    // Descriptors (SCM_RIGHTS) that arrived with buffered bytes. The kernel ends a recvmsg right
    // after the bytes the descriptors rode on, which are the first bytes of the frame that
    // carries them (one sendmsg each), so a batch belongs to the frame holding stream offset
    // `end - 1`, where `end` is where the read that brought it ended.
    struct FdBatch {
        std::uint64_t end;
        std::vector<int> fds;
        bool truncated;  // MSG_CTRUNC: the kernel dropped some
    };
    std::vector<FdBatch> fd_batches;

    std::size_t buffered() const noexcept { return rend - rpos; }
    void drop_buffered() noexcept {
        rpos = rend = 0;
        for (FdBatch& b : fd_batches)
            for (int f : b.fds) ::close(f);
        fd_batches.clear();
    }
    ~ConnectionState() { drop_buffered(); }
};

std::size_t buffered_bytes(const Connection& c) noexcept {
    return c.impl_ && c.impl_->fd ? c.impl_->buffered() : 0;
}
}  // namespace detail

namespace {

using std::chrono::nanoseconds;

// A frame's length field: 4 bytes, big-endian, signed; -1 announces an 8-byte length.
constexpr std::uint64_t kMaxShortLength = 0x7fffffff;
// Bodies up to this size are allocated at once; a longer announced length allocates as its
// bytes actually arrive, so a forged header cannot make us reserve memory the peer never sends.
// Small, because it is what a 4-byte header alone costs: at 64 MiB, eight peers that each sent
// one header and stalled held half a gigabyte of a manager's memory. Growing from 1 MiB costs a
// real large message a few copies of a third of its size at most.
constexpr std::size_t kEagerAllocation = std::size_t{1} << 20;

// True when `fd` is a Unix-domain socket: the only kind that carries descriptors. A Connection
// made from a bare descriptor may be any socket, so the family is asked, not assumed.
bool is_unix_socket(int fd) {
    int domain = 0;
    socklen_t len = sizeof domain;
    return ::getsockopt(fd, SOL_SOCKET, SO_DOMAIN, &domain, &len) == 0 && domain == AF_UNIX;
}

[[noreturn]] void throw_bad_fd(const char* op, const char* what) {
    throw std::system_error(std::make_error_code(std::errc::bad_file_descriptor),
                            std::string("mp::Connection::") + op + ": " + what);
}

void put_be32(unsigned char* p, std::uint32_t v) {
    for (int i = 3; i >= 0; --i, v >>= 8) p[i] = static_cast<unsigned char>(v & 0xff);
}
void put_be64(unsigned char* p, std::uint64_t v) {
    for (int i = 7; i >= 0; --i, v >>= 8) p[i] = static_cast<unsigned char>(v & 0xff);
}
std::uint64_t get_be(const unsigned char* p, int n) {
    std::uint64_t v = 0;
    for (int i = 0; i < n; ++i) v = (v << 8) | p[i];
    return v;
}

// Blocks SIGPIPE in this thread for the duration of a write to a pipe, and swallows the SIGPIPE
// that the write raised (it is thread-directed and stays pending while blocked). One that was
// already pending before the write belongs to somebody else and is left alone.
class SigpipeGuard {
public:
    explicit SigpipeGuard(bool active) : active_(active) {
        if (!active_) return;
        sigemptyset(&pipe_);
        sigaddset(&pipe_, SIGPIPE);
        sys::check_ret(::pthread_sigmask(SIG_BLOCK, &pipe_, &old_), "pthread_sigmask");
        sigset_t pending;
        sigemptyset(&pending);
        ::sigpending(&pending);
        was_pending_ = sigismember(&pending, SIGPIPE) == 1;
    }
    // Called when a write failed with EPIPE: the kernel queued a SIGPIPE for this thread.
    void consume() noexcept {
        if (!active_ || was_pending_) return;
        const timespec zero{0, 0};
        while (::sigtimedwait(&pipe_, nullptr, &zero) == -1 && errno == EINTR) {
        }
    }
    ~SigpipeGuard() {
        if (active_) ::pthread_sigmask(SIG_SETMASK, &old_, nullptr);
    }
    SigpipeGuard(const SigpipeGuard&) = delete;
    SigpipeGuard& operator=(const SigpipeGuard&) = delete;

private:
    bool active_;
    bool was_pending_ = false;
    sigset_t pipe_{};
    sigset_t old_{};
};

// Writes every byte of `iov[0..count)` with as few system calls as the kernel allows: one for a
// frame that fits the socket or pipe buffer. EINTR and short writes are retried.
//
// `fds` (sockets only) ride on the first sendmsg as SCM_RIGHTS: the kernel attaches them to the
// first bytes it queues, which are the frame's header, so the reader gets them with the header.
void write_iov(int fd, bool is_socket, iovec* iov, int count, std::span<const int> fds = {}) {
    SigpipeGuard guard(!is_socket);
    sys::FdControl control;
    while (count > 0) {
        ssize_t r;
        if (is_socket) {
            msghdr msg{};
            msg.msg_iov = iov;
            msg.msg_iovlen = static_cast<std::size_t>(count);
            sys::attach_rights(msg, control, fds);
            r = ::sendmsg(fd, &msg, MSG_NOSIGNAL);
            if (r > 0) fds = {};  // sent with the first bytes; never again
        } else {
            r = ::writev(fd, iov, count);
        }
        if (r < 0) {
            const int err = errno;
            if (err == EINTR) continue;
            if (err == EAGAIN || err == EWOULDBLOCK) {  // a descriptor the user made non-blocking
                sys::wait_fd(fd, POLLOUT, std::nullopt);
                continue;
            }
            if (err == EPIPE) guard.consume();
            sys::throw_system_error(err, is_socket ? "sendmsg" : "writev");
        }
        auto done = static_cast<std::size_t>(r);
        while (count > 0 && done >= iov->iov_len) {
            done -= iov->iov_len;
            ++iov;
            --count;
        }
        if (count > 0) {
            iov->iov_base = static_cast<char*>(iov->iov_base) + done;
            iov->iov_len -= done;
        }
    }
}

// Reads exactly n bytes. `mid_frame` says whether bytes of this frame were already read, so an
// end of file here is a truncated frame rather than a clean end.
void read_exact(int fd, void* buf, std::size_t n, bool mid_frame) {
    const std::size_t got = sys::read_full(fd, buf, n);
    if (got == n) return;
    if (got == 0 && !mid_frame) throw EOFError();
    throw EOFError("mp::Connection: got end of file during message (the peer closed mid-frame)");
}

// One socket buffer's worth: a recvmsg of this much usually brings a small frame's header and
// body together (and any frames queued behind it), so a small message costs one system call.
constexpr std::size_t kReadAhead = std::size_t{64} << 10;
// Frames up to this long are copied into one buffer and sent with send().
constexpr std::size_t kSmallFrame = 512;
// The longest frame header: -1, then an 8-byte length.
constexpr std::size_t kMaxHeader = 12;

// One recvmsg into s.rbuf[s.rend, kReadAhead), keeping any descriptors that came along in
// s.fd_batches (never leaked: the state closes those nobody takes). Returns the byte count, 0
// at end of file.
std::size_t recv_some(detail::ConnectionState& s) {
    if (!s.may_carry_fds) {  // TCP: no descriptors can come, a plain recv does
        for (;;) {
            const ssize_t r = ::recv(s.fd.get(), s.rbuf.get() + s.rend, kReadAhead - s.rend, 0);
            if (r >= 0) {
                s.rend += static_cast<std::size_t>(r);
                return static_cast<std::size_t>(r);
            }
            if (errno == EAGAIN || errno == EWOULDBLOCK) {
                sys::wait_fd(s.fd.get(), POLLIN, std::nullopt);
            } else if (errno != EINTR) {
                sys::throw_system_error(errno, "recv");
            }
        }
    }
    sys::RecvMsg m(s.rbuf.get() + s.rend, kReadAhead - s.rend);
    const std::size_t got = *sys::recv_msg(s.fd.get(), m, true, "recvmsg");
    s.rend += got;
    std::vector<int> fds;
    if (m.msg.msg_controllen != 0) {
        // Reserve first so that no push_back can fail half-way; if even that fails, close what
        // arrived rather than leak it.
        try {
            fds.reserve(sys::kMaxFds);
        } catch (...) {
            sys::for_each_right(m.msg, [](int received) { ::close(received); });
            throw;
        }
        sys::for_each_right(m.msg, [&](int received) { fds.push_back(received); });
    }
    const bool truncated = m.truncated();
    if (!fds.empty() || truncated) {
        // push_back may throw: the descriptors are closed rather than leaked.
        try {
            s.fd_batches.push_back({s.consumed + s.buffered(), std::move(fds), truncated});
        } catch (...) {
            for (int f : fds) ::close(f);
            throw;
        }
    }
    return got;
}

// Makes the first `need` (<= kMaxHeader) bytes of the current frame available at s.rbuf +
// s.rpos. A socket reads as much as it holds (up to kReadAhead); a pipe reads no further than
// `need`. `mid_frame`: bytes of this frame were already returned, so end of file here is a
// truncated frame even with nothing buffered.
void fill(detail::ConnectionState& s, std::size_t need, bool mid_frame) {
    if (s.buffered() >= need) return;
    if (!s.rbuf)
        s.rbuf = std::make_unique_for_overwrite<char[]>(s.is_socket ? kReadAhead : kMaxHeader);
    if (s.rpos > 0) {  // fewer than kMaxHeader bytes: slide them to the front
        std::memmove(s.rbuf.get(), s.rbuf.get() + s.rpos, s.buffered());
        s.rend -= s.rpos;
        s.rpos = 0;
    }
    while (s.rend < need) {
        std::size_t got;
        if (s.is_socket) {
            got = recv_some(s);
        } else {
            got = sys::read_full(s.fd.get(), s.rbuf.get() + s.rend, need - s.rend);
            s.rend += got;
            if (s.rend < need) got = 0;  // read_full stops short only at end of file
        }
        if (got == 0) {
            if (s.rend == 0 && !mid_frame) throw EOFError();
            throw EOFError(
                "mp::Connection: got end of file during message (the peer closed mid-frame)");
        }
    }
}

// Moves `n` body bytes to `dst`: first what the buffer holds, then the rest straight from the
// descriptor (exactly the rest, so the stream never runs past this frame there, and a large
// body is not copied twice).
void take_body(detail::ConnectionState& s, char* dst, std::size_t n) {
    const std::size_t from_buffer = std::min(n, s.buffered());
    if (from_buffer > 0) std::memcpy(dst, s.rbuf.get() + s.rpos, from_buffer);
    s.rpos += from_buffer;
    if (s.rpos == s.rend) s.rpos = s.rend = 0;
    if (from_buffer < n) read_exact(s.fd.get(), dst + from_buffer, n - from_buffer, true);
    s.consumed += n;
}

std::string describe_length(std::int64_t announced, std::uint64_t length, bool long_form) {
    if (!long_form && announced < 0) return std::to_string(announced);
    return std::to_string(length);
}

}  // namespace

// ---------------------------------------------------------------- Connection

Connection::Connection(int fd, bool readable, bool writable) {
    if (fd < 0) throw std::invalid_argument("mp::Connection: invalid handle " + std::to_string(fd));
    if (!readable && !writable)
        throw std::invalid_argument(
            "mp::Connection: at least one of readable and writable must be true");
    struct stat st {};
    const bool is_socket = ::fstat(fd, &st) == 0 && S_ISSOCK(st.st_mode);
    impl_ = std::make_shared<detail::ConnectionState>();
    impl_->fd.reset(fd);
    impl_->readable = readable;
    impl_->writable = writable;
    impl_->is_socket = is_socket;
    impl_->may_carry_fds = is_socket;
}

Connection::Connection(detail::KnownSocket kind, int fd) {
    if (fd < 0) throw std::invalid_argument("mp::Connection: invalid handle " + std::to_string(fd));
    impl_ = std::make_shared<detail::ConnectionState>();
    impl_->fd.reset(fd);
    impl_->readable = true;
    impl_->writable = true;
    impl_->is_socket = true;
    impl_->may_carry_fds = kind.unix_family;
}

void Connection::check_writable(const char* op) const {
    if (!impl_ || !impl_->fd) throw_bad_fd(op, "handle is closed");
    if (!impl_->writable) throw_bad_fd(op, "connection is read-only");
}

void Connection::write_message(std::string_view body, std::span<const int> fds) {
    if (!fds.empty()) {
        // A TCP socket takes SCM_RIGHTS without a word and drops the descriptors: the family is
        // checked here (may_carry_fds is also true for a bare socket of unknown family).
        if (!impl_->may_carry_fds || !is_unix_socket(impl_->fd.get()))
            throw Error("mp::Connection::send: the value carries file descriptors, which travel "
                        "only over a Unix socket connection (a duplex Pipe(), or a "
                        "Listener/Client on a Unix path), not TCP or a pipe");
        if (fds.size() > sys::kMaxFds)
            throw Error("mp::Connection::send: the value carries " + std::to_string(fds.size()) +
                        " file descriptors; one message holds at most " +
                        std::to_string(sys::kMaxFds));
    }
    const std::uint64_t n = body.size();
    if (impl_->is_socket && fds.empty() && n <= kSmallFrame) {
        // A small frame is copied behind its header and leaves in one send.
        char frame[4 + kSmallFrame];
        put_be32(reinterpret_cast<unsigned char*>(frame), static_cast<std::uint32_t>(n));
        std::memcpy(frame + 4, body.data(), n);
        sys::write_full(impl_->fd.get(), frame, 4 + n);
        return;
    }
    unsigned char header[12];
    iovec iov[2];
    if (n > kMaxShortLength) {
        put_be32(header, 0xffffffffu);  // -1: an 8-byte length follows
        put_be64(header + 4, n);
        iov[0] = {header, 12};
    } else {
        put_be32(header, static_cast<std::uint32_t>(n));
        iov[0] = {header, 4};
    }
    // Header and body leave in one sendmsg/writev: no Nagle delay on a TCP socket (Python
    // concatenates small messages for the same reason) and no copy of a large body. An empty
    // body is not written separately, so the frame is never split around a zero-length write.
    iov[1] = {const_cast<char*>(body.data()), body.size()};
    write_iov(impl_->fd.get(), impl_->is_socket, iov, n == 0 ? 1 : 2, fds);
}

void Connection::send_bytes(std::string_view buffer, std::size_t offset,
                            std::optional<std::size_t> size) {
    check_writable("send_bytes");
    const std::size_t n = buffer.size();
    if (offset > n) throw std::invalid_argument("mp::Connection::send_bytes: buffer length < offset");
    if (!size) {
        size = n - offset;
    } else if (*size > n - offset) {
        throw std::invalid_argument("mp::Connection::send_bytes: buffer length < offset + size");
    }
    write_message(buffer.substr(offset, *size));
}

namespace {

detail::ConnectionState& check_readable_impl(const std::shared_ptr<detail::ConnectionState>& impl,
                                      const char* op) {
    if (!impl || !impl->fd) throw_bad_fd(op, "handle is closed");
    if (!impl->readable) throw_bad_fd(op, "connection is write-only");
    return *impl;
}

// The frame being received: where it starts in the stream and its body length.
struct Frame {
    std::uint64_t start;
    std::uint64_t length;
};

// Reads a frame header. A length that is negative (other than the -1 marker), beyond
// `maxlength`, or beyond what this process could ever hold is refused before anything of the
// body is returned or allocated: the stream is then out of step, so (as Python) the connection
// stops being readable, or is closed when it was not writable either.
Frame read_header(detail::ConnectionState& s, std::optional<std::size_t> maxlength,
                  const char* op) {
    const std::uint64_t start = s.consumed;
    fill(s, 4, false);
    const auto* h = reinterpret_cast<const unsigned char*>(s.rbuf.get() + s.rpos);
    const auto announced = static_cast<std::int32_t>(static_cast<std::uint32_t>(get_be(h, 4)));
    std::uint64_t length;
    std::size_t header_size = 4;
    bool long_form = false;
    bool bad = false;
    if (announced == -1) {
        fill(s, kMaxHeader, true);
        h = reinterpret_cast<const unsigned char*>(s.rbuf.get() + s.rpos);
        length = get_be(h + 4, 8);
        header_size = kMaxHeader;
        long_form = true;
        bad = length > static_cast<std::uint64_t>(std::numeric_limits<std::ptrdiff_t>::max());
    } else {
        length = static_cast<std::uint64_t>(announced);
        bad = announced < 0;
    }
    if (!bad && maxlength && length > *maxlength) bad = true;
    if (bad) {
        std::string msg = std::string("mp::Connection::") + op + ": bad message length " +
                          describe_length(announced, length, long_form);
        if (maxlength) msg += " (maxlength " + std::to_string(*maxlength) + ")";
        if (s.writable) {
            s.readable = false;
        } else {
            s.drop_buffered();
            s.fd.reset();
        }
        throw DecodeError(msg);
    }
    s.rpos += header_size;
    s.consumed += header_size;
    return {start, length};
}

// Reads a body of `n` bytes into a fresh string. Lengths above kEagerAllocation grow the buffer
// as the bytes come in, so memory follows what the peer really sent: a forged length costs at
// most kGrowth times the bytes that did arrive. Growing by 4 rather than 2 keeps the copies and
// fresh page faults of a real large message low (a 1 GiB body: 1, 4, 16, 64, 256 MiB, then
// 1 GiB).
std::string read_body(detail::ConnectionState& s, std::uint64_t n) {
    constexpr std::size_t kGrowth = 4;
    std::string out;
    const auto total = static_cast<std::size_t>(n);
    if (total <= kEagerAllocation) {
        out.resize(total);
        take_body(s, out.data(), total);
        return out;
    }
    std::size_t have = 0;
    std::size_t cap = kEagerAllocation;
    while (have < total) {
        out.resize(cap);
        take_body(s, out.data() + have, cap - have);
        have = cap;
        cap = cap > total / kGrowth ? total : cap * kGrowth;
    }
    return out;
}

// Once frame `f` is wholly received: hands the descriptors that came with it to `out` (or
// closes them when nobody asked, as the kernel does for a plain read), and closes any stray
// ones from before it. Returns true when the kernel dropped some of the frame's descriptors.
bool finish_frame(detail::ConnectionState& s, const Frame& f, std::vector<int>* out) {
    bool truncated = false;
    const std::uint64_t next = s.consumed;
    auto it = s.fd_batches.begin();
    for (; it != s.fd_batches.end() && it->end <= next; ++it) {
        const bool ours = it->end > f.start;
        if (ours) truncated = truncated || it->truncated;
        for (int& fd : it->fds) {
            if (ours && out != nullptr) {
                out->push_back(fd);  // reserved below: cannot throw
            } else {
                ::close(fd);
            }
            fd = -1;
        }
    }
    s.fd_batches.erase(s.fd_batches.begin(), it);
    return truncated;
}

// Room in `out` for the descriptors finish_frame may hand over, so that it cannot throw.
void reserve_frame_fds(const detail::ConnectionState& s, std::vector<int>& out) {
    std::size_t n = out.size();
    for (const auto& b : s.fd_batches) n += b.fds.size();
    out.reserve(n);
}

}  // namespace

std::string Connection::recv_bytes(std::optional<std::size_t> maxlength) {
    detail::ConnectionState& s = check_readable_impl(impl_, "recv_bytes");
    const Frame f = read_header(s, maxlength, "recv_bytes");
    std::string out = read_body(s, f.length);
    (void)finish_frame(s, f, nullptr);
    return out;
}

std::string Connection::recv_message(std::vector<int>& fds) {
    detail::ConnectionState& s = check_readable_impl(impl_, "recv");
    const Frame f = read_header(s, std::nullopt, "recv");
    std::string out = read_body(s, f.length);
    reserve_frame_fds(s, fds);
    if (finish_frame(s, f, &fds))
        throw DecodeError("mp::Connection::recv: descriptors were dropped (more than " +
                          std::to_string(sys::kMaxFds) +
                          " in one message, or this process is out of descriptors: EMFILE)");
    return out;
}

namespace {

[[noreturn]] void throw_not_unix(const char* op) {
    throw Error(std::string("mp::") + op +
                ": descriptors travel only over a Unix socket connection (a duplex Pipe(), or a "
                "Listener/Client on a Unix path), not TCP or a pipe");
}

}  // namespace

void send_handle(Connection& conn, int fd, pid_t /*destination_pid*/) {
    conn.check_writable("send_handle");
    detail::ConnectionState& s = *conn.impl_;
    if (!s.is_socket || !is_unix_socket(s.fd.get())) throw_not_unix("send_handle");
    // sendmsg would say EBADF too, but about the socket or the descriptor: say which.
    if (::fcntl(fd, F_GETFD) == -1) sys::throw_system_error(errno, "mp::send_handle: fcntl(fd)");
    // Python's sendfds: the count modulo 256 as the one byte the descriptor rides on.
    const unsigned char one = 1;
    const int fds[1] = {fd};
    sys::send_fds(s.fd.get(), &one, 1, fds);
}

int recv_handle(Connection& conn) {
    detail::ConnectionState& s = check_readable_impl(conn.impl_, "recv_handle");
    if (!s.may_carry_fds || !is_unix_socket(s.fd.get())) throw_not_unix("recv_handle");
    // Through the receive buffer, not straight from the socket: a frame received before may have
    // read this byte (and its descriptor, kept in fd_batches) ahead.
    const Frame f{s.consumed, 1};
    fill(s, 1, false);
    const auto byte = static_cast<unsigned char>(s.rbuf[s.rpos]);
    ++s.rpos;
    ++s.consumed;
    if (s.rpos == s.rend) s.rpos = s.rend = 0;
    std::vector<int> fds;
    reserve_frame_fds(s, fds);
    const bool truncated = finish_frame(s, f, &fds);
    if (byte == 1 && fds.size() == 1 && !truncated) return fds[0];
    for (int fd : fds) ::close(fd);
    // One byte of something else is gone: later frames cannot be found any more.
    if (s.writable) {
        s.readable = false;
    } else {
        s.drop_buffered();
        s.fd.reset();
    }
    throw DecodeError("mp::recv_handle: expected one descriptor sent by send_handle, got " +
                      std::to_string(fds.size()) + (truncated ? " (truncated)" : "") +
                      " with byte " + std::to_string(byte));
}

detail::ReceivedFds::~ReceivedFds() {
    for (int fd : fds)
        if (fd >= 0) ::close(fd);
}

std::size_t Connection::recv_bytes_into(std::span<std::byte> buffer, std::size_t offset) {
    detail::ConnectionState& s = check_readable_impl(impl_, "recv_bytes_into");
    if (offset > buffer.size())
        throw std::invalid_argument("mp::Connection::recv_bytes_into: offset too large");
    const Frame f = read_header(s, std::nullopt, "recv_bytes_into");
    if (f.length > buffer.size() - offset) {
        std::string whole = read_body(s, f.length);
        (void)finish_frame(s, f, nullptr);
        throw BufferTooShort(std::move(whole));
    }
    const auto size = static_cast<std::size_t>(f.length);
    take_body(s, reinterpret_cast<char*>(buffer.data() + offset), size);
    (void)finish_frame(s, f, nullptr);
    return size;
}

bool Connection::poll() { return poll(nanoseconds::zero()); }

bool Connection::poll(detail::Timeout timeout) {
    detail::ConnectionState& s = check_readable_impl(impl_, "poll");
    if (s.buffered() > 0) return true;  // read ahead: no need to ask the descriptor
    return sys::wait_fd(s.fd.get(), POLLIN, timeout);
}

void Connection::close() noexcept {
    if (!impl_) return;
    impl_->drop_buffered();
    impl_->fd.reset();
}

bool Connection::closed() const noexcept { return !impl_ || !impl_->fd; }

int Connection::fileno() const {
    if (closed()) throw_bad_fd("fileno", "handle is closed");
    return impl_->fd.get();
}

bool Connection::readable() const noexcept { return impl_ && impl_->readable; }
bool Connection::writable() const noexcept { return impl_ && impl_->writable; }

std::pair<Connection, Connection> Pipe(bool duplex) {
    if (duplex) {
        auto [a, b] = sys::make_socketpair(SOCK_STREAM);
        Connection ca(a.get());
        (void)a.release();
        Connection cb(b.get());
        (void)b.release();
        return {std::move(ca), std::move(cb)};
    }
    auto [r, w] = sys::make_pipe();
    Connection reader(r.get(), true, false);
    (void)r.release();
    Connection writer(w.get(), false, true);
    (void)w.release();
    return {std::move(reader), std::move(writer)};
}

// ---------------------------------------------------------------- Codec<Connection>

namespace {
constexpr unsigned char kReadable = 1;
constexpr unsigned char kWritable = 2;
constexpr unsigned char kBuffered = 4;  // received bytes follow, read ahead by the sender
}  // namespace

void Codec<Connection>::encode(Encoder& e, const Connection& c) {
    unsigned char flags = 0;
    if (!c.closed()) flags = static_cast<unsigned char>((c.readable() ? kReadable : 0) |
                                                        (c.writable() ? kWritable : 0));
    // Bytes already read ahead from the descriptor travel with it, so the receiver goes on
    // exactly where this handle would have (as a fork child inherits them with its memory).
    const std::size_t buffered = detail::buffered_bytes(c);
    if (buffered > 0) {
        if (!c.impl_->fd_batches.empty())
            throw Error("mp::Codec<Connection>: the connection has read ahead frames that carry "
                        "descriptors; receive them before sending the connection on");
        flags = static_cast<unsigned char>(flags | kBuffered);
    }
    e.write(&flags, 1);
    if (flags != 0) e.put(e.attach_fd(c.fileno()));
    if (buffered > 0)
        e.put(std::string(c.impl_->rbuf.get() + c.impl_->rpos, buffered));
}

Connection Codec<Connection>::decode(Decoder& d) {
    unsigned char flags;
    d.read(&flags, 1);
    if (flags == 0) return Connection();
    if (flags > (kReadable | kWritable | kBuffered) || (flags & (kReadable | kWritable)) == 0)
        throw DecodeError("mp::Codec<Connection>: invalid flags byte " + std::to_string(flags));
    const int fd = d.take_fd(d.get<std::uint32_t>());
    Connection c(fd, (flags & kReadable) != 0, (flags & kWritable) != 0);
    if (flags & kBuffered) {
        const auto bytes = d.get<std::string>();
        auto& s = *c.impl_;
        const std::size_t capacity = s.is_socket ? kReadAhead : kMaxHeader;
        if (bytes.size() > capacity)
            throw DecodeError("mp::Codec<Connection>: more buffered bytes than a receive buffer "
                              "holds");
        s.rbuf = std::make_unique_for_overwrite<char[]>(capacity);
        std::memcpy(s.rbuf.get(), bytes.data(), bytes.size());
        s.rend = bytes.size();
    }
    return c;
}

// ---------------------------------------------------------------- wait

namespace connection {
namespace {

int waitable_fd(const Waitable& w) {
    if (const auto* c = std::get_if<Connection*>(&w)) {
        if (*c == nullptr || (*c)->closed()) throw_bad_fd("wait", "handle is closed");
        return (*c)->fileno();
    }
    return std::get<int>(w);
}

// Polls `fds` for readability; fills `ready` (one flag per fd). A descriptor counts as ready on
// a hang-up or error too, as Python's selectors report them (the next read then says why).
void poll_ready(std::span<pollfd> fds, detail::Timeout timeout) {
    if (fds.empty() && !timeout)
        throw std::invalid_argument(
            "mp::connection::wait: nothing to wait for and no timeout (it would never return)");
    const detail::Deadline deadline = detail::deadline_after(timeout);
    for (;;) {
        timespec ts{};
        timespec* tsp = nullptr;
        if (timeout) {
            const nanoseconds left = *detail::remaining(deadline);
            ts.tv_sec = static_cast<time_t>(left.count() / 1'000'000'000);
            ts.tv_nsec = static_cast<long>(left.count() % 1'000'000'000);
            tsp = &ts;
        }
        const int r = ::ppoll(fds.data(), fds.size(), tsp, nullptr);
        if (r >= 0) {
            for (const pollfd& p : fds)
                if (p.revents & POLLNVAL)
                    throw std::system_error(
                        std::make_error_code(std::errc::bad_file_descriptor),
                        "mp::connection::wait: descriptor " + std::to_string(p.fd) + " is not open");
            return;  // r == 0 is the timeout: every revents is 0
        }
        if (errno != EINTR) sys::throw_system_error(errno, "ppoll");
        if (detail::expired(deadline)) {
            for (pollfd& p : fds) p.revents = 0;
            return;
        }
    }
}

// True when `w` is a Connection whose receive buffer already holds bytes: ready, whatever its
// descriptor says (the descriptor may have nothing more to give).
bool buffered_ready(Connection* c) { return c != nullptr && detail::buffered_bytes(*c) > 0; }
bool buffered_ready(int) { return false; }
bool buffered_ready(const Waitable& w) {
    const auto* c = std::get_if<Connection*>(&w);
    return c != nullptr && buffered_ready(*c);
}

template <class T, class FdOf>
std::vector<T> wait_any(std::span<const T> objects, detail::Timeout timeout,
                        FdOf fd_of) {
    std::vector<pollfd> fds;
    fds.reserve(objects.size());
    std::vector<bool> buffered(objects.size());
    bool any_buffered = false;
    for (std::size_t i = 0; i < objects.size(); ++i) {
        const int fd = fd_of(objects[i]);
        // ppoll skips a negative descriptor silently: it would never be ready.
        if (fd < 0)
            throw std::system_error(std::make_error_code(std::errc::bad_file_descriptor),
                                    "mp::connection::wait: descriptor " + std::to_string(fd) +
                                        " is not open");
        fds.push_back(pollfd{fd, POLLIN, 0});
        buffered[i] = buffered_ready(objects[i]);
        any_buffered = any_buffered || buffered[i];
    }
    // Something is ready already: just look at the others (still checking every descriptor).
    poll_ready(fds, any_buffered ? detail::Timeout(nanoseconds::zero()) : timeout);
    std::vector<T> ready;
    for (std::size_t i = 0; i < objects.size(); ++i)
        if (buffered[i] || fds[i].revents != 0) ready.push_back(objects[i]);
    return ready;
}

}  // namespace

std::vector<Connection*> wait(std::span<Connection* const> objects,
                              detail::Timeout timeout) {
    return wait_any<Connection*>(objects, timeout,
                                 [](Connection* c) { return waitable_fd(Waitable(c)); });
}

std::vector<Connection*> wait(std::initializer_list<Connection*> objects,
                              detail::Timeout timeout) {
    return wait(std::span<Connection* const>(objects.begin(), objects.size()), timeout);
}

std::vector<int> wait(std::span<const int> fds, detail::Timeout timeout) {
    return wait_any<int>(fds, timeout, [](int fd) { return fd; });
}

std::vector<int> wait(std::initializer_list<int> fds, detail::Timeout timeout) {
    return wait(std::span<const int>(fds.begin(), fds.size()), timeout);
}

std::vector<Waitable> wait(std::span<const Waitable> objects, detail::Timeout timeout) {
    return wait_any<Waitable>(objects, timeout, [](const Waitable& w) { return waitable_fd(w); });
}

std::vector<Waitable> wait(std::initializer_list<Waitable> objects,
                           detail::Timeout timeout) {
    return wait(std::span<const Waitable>(objects.begin(), objects.size()), timeout);
}

}  // namespace connection
}  // namespace mp
