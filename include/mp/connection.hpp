#pragma once
/// mp::Connection and mp::Pipe: message channels between processes, as Python's
/// multiprocessing.connection, and mp::connection::wait over several of them.
///
///     void echo(mp::Connection c) {                    // echoes until an empty message
///         for (std::string m; !(m = c.recv_bytes()).empty();) c.send_bytes(m);
///     }
///     auto [a, b] = mp::Pipe();                        // duplex: both ends read and write
///     mp::Process p(echo, b);
///     p.start();
///     b.close();                                       // the child has its own copy
///     a.send_bytes("hello");  a.recv_bytes();          // "hello"
///     a.send(std::vector<int>{1, 2, 3});               // any type with an mp::Codec ...
///     a.recv<std::vector<int>>();                      // ... and back
///     a.send_bytes("");  p.join();
///
/// Wire format: each message is one frame, byte-compatible with CPython's
/// multiprocessing.connection.Connection: a 4-byte big-endian signed length, or -1 followed by
/// an 8-byte big-endian length for a message longer than 2^31 - 1 bytes, then the bytes. So a
/// Python program can read what send_bytes writes and vice versa. send()/recv() put mp::Codec
/// bytes in the frame, not pickle. Descriptors sent with send() (a Connection inside the
/// value) ride on the frame's first bytes as SCM_RIGHTS ancillary data, invisible to a reader
/// that does not ask for them: recv_bytes closes them, and for Python the kernel does.
///
/// Reading ahead. A connection over a socket (Pipe(), or any stream socket given to the
/// constructor) receives with one recvmsg of up to 64 KiB, which usually brings a small frame's
/// header and body together, and keeps the bytes of the frames behind it in a receive buffer
/// that the handle's copies in this process share (a small message then costs one system call
/// each way, as a bare socket ping-pong). A large body is read straight into its destination.
/// What this means for a user:
///   - poll() and connection::wait count buffered bytes as ready; a poll/select/epoll of
///     fileno() alone does not see them, so wait on the Connection, not on its descriptor;
///   - one process receives from a socket end at a time. A fork child inherits a copy of the
///     buffer with its memory, and a Connection sent with send() or to a forkserver child takes
///     its buffered bytes along (mp::Error if descriptors of read-ahead frames wait in it:
///     receive those first), so an end handed to another process goes on exactly where this one
///     stopped; but two processes receiving from one socket end, even under a lock, would each
///     keep frames the other expects;
///   - a connection over a pipe (Pipe(false)'s reader, or any non-socket) never reads past the
///     frame it returns, as Python, so its reading end may be shared by processes that take turns
///     under a lock (Python's SimpleQueue pattern).
///
/// Handles and ownership. A Connection is a cheap, copyable handle that shares one descriptor
/// among its copies in this process (a Process target under fork receives copies of its
/// arguments, so a Connection must be copyable). The descriptor is closed when the last copy is
/// destroyed, or at once for every copy by close(). A Connection given to a Process keeps the
/// parent's descriptor open inside the Process object too: call close() on the parent's copy
/// after start() when the parent should see end of file once the child is done (as in Python).
/// End of file reaches a reader only when every process holding the other end has closed it,
/// and a fork child inherits every descriptor of its parent, the parent's own end included: a
/// fork child that reads until end of file must close() its inherited copy of the parent's end
/// first (or the two sides agree on a last message, as Python's tests do). A forkserver child
/// holds only the descriptors passed to it.
///
/// Errors (Python's exception in brackets):
///   - the peer closed: mp::EOFError [EOFError], also when it closed in the middle of a frame;
///   - a use after close(), a send on a read-only end, a receive or poll on a write-only end:
///     std::system_error with std::errc::bad_file_descriptor, what() saying "handle is closed",
///     "connection is read-only" or "connection is write-only" [OSError];
///   - a frame longer than `maxlength`, or a length no frame can have (negative, or beyond what
///     this process could hold): mp::DecodeError "bad message length", thrown before any of the
///     body is returned or allocated (a socket may hold some of it in its receive buffer)
///     [OSError]. The stream then sits inside a frame, so the connection stops being readable,
///     and is closed when it was not writable either (exactly what Python does);
///   - a message that does not fit recv_bytes_into's buffer: mp::BufferTooShort, which carries
///     the whole message; the stream stays in step;
///   - an offset or size outside the buffer: std::invalid_argument [ValueError];
///   - bytes that do not decode as the T asked of recv<T>(): mp::DecodeError;
///   - a failing system call: std::system_error naming it (EPIPE when the reader has gone).
/// Writing never raises SIGPIPE: sockets are written with MSG_NOSIGNAL, and a write to a pipe
/// runs with SIGPIPE blocked in the calling thread and consumes the SIGPIPE it caused, so a
/// closed reader is std::system_error(EPIPE) and the program's signal dispositions are left
/// alone.
///
/// Threads: like Python's, one Connection serves one sender and one receiver at a time (poll()
/// and connection::wait on it count as receiving: they look at the receive buffer). Two
/// threads (or processes) sending at once may interleave frames; guard the end with a lock. Do
/// not close() a connection that another thread is using.

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <initializer_list>
#include <memory>
#include <optional>
#include <ranges>
#include <span>
#include <string>
#include <string_view>
#include <type_traits>
#include <utility>
#include <variant>
#include <vector>

#include "mp/errors.hpp"
#include "mp/serialize.hpp"

namespace mp {

class Connection;

namespace detail {
/// What a Connection handle shares among its copies (defined in src/connection.cpp).
struct ConnectionState;
/// Bytes received into `c`'s buffer that no receive has returned yet (0 when closed).
std::size_t buffered_bytes(const Connection& c) noexcept;

/// Descriptors that arrived with a message; the destructor closes those nobody took (-1).
struct ReceivedFds {
    ReceivedFds() = default;
    ReceivedFds(const ReceivedFds&) = delete;
    ReceivedFds& operator=(const ReceivedFds&) = delete;
    ~ReceivedFds();
    std::vector<int> fds;
};

/// A contiguous range whose elements are plain bytes of memory (numbers, PODs, std::byte).
template <class R>
concept byte_buffer = std::ranges::contiguous_range<R> && std::ranges::sized_range<R> &&
                      std::is_trivially_copyable_v<std::ranges::range_value_t<R>>;
}  // namespace detail

/// One end of a message channel (Python's multiprocessing.connection.Connection).
class Connection {
public:
    /// A closed connection: readable() and writable() are false, and every operation throws.
    Connection() noexcept = default;
    /// Takes ownership of `fd` (a stream socket, a pipe end, a terminal, ...). Throws
    /// std::invalid_argument when fd < 0 or when neither readable nor writable [ValueError];
    /// the descriptor then stays the caller's.
    explicit Connection(int fd, bool readable = true, bool writable = true);

    /// Sends `value` encoded with mp::Codec as one message. A value that carries file
    /// descriptors (a Connection, or anything whose Codec attaches one) sends them along with
    /// the frame (SCM_RIGHTS), which needs a duplex (Unix socket) connection: over a pipe that
    /// is mp::Error, and nothing is sent. The frame's bytes stay Python-compatible; a Python
    /// peer just does not get the descriptors.
    template <class T>
    void send(const T& value) {
        check_writable("send");
        Encoder e;
        e.put(value);
        write_message(e.bytes(), e.fds());
    }

    /// Receives one message and decodes it as a T (mp::DecodeError when it is not one). The
    /// descriptors that came with it go to the Codecs that ask for them (a Connection inside
    /// T); any others are closed.
    template <class T>
    T recv() {
        detail::ReceivedFds received;
        std::string bytes = recv_message(received.fds);
        Decoder d(bytes, received.fds);
        T value = d.get<T>();
        d.finish();
        return value;
    }

    /// Sends `buffer[offset, offset + size)` as one message; `size` defaults to the rest of the
    /// buffer. Throws std::invalid_argument when that range is not inside the buffer.
    void send_bytes(std::string_view buffer, std::size_t offset = 0,
                    std::optional<std::size_t> size = std::nullopt);
    /// The same for any contiguous buffer of plain values (std::vector<int>, std::span<const
    /// std::byte>, std::array<double, N>, ...); `offset` and `size` count bytes, as in Python.
    template <detail::byte_buffer R>
        requires(!std::is_convertible_v<const R&, std::string_view>)
    void send_bytes(const R& buffer, std::size_t offset = 0,
                    std::optional<std::size_t> size = std::nullopt) {
        send_bytes(std::string_view(reinterpret_cast<const char*>(std::ranges::data(buffer)),
                                    std::ranges::size(buffer) *
                                        sizeof(std::ranges::range_value_t<R>)),
                   offset, size);
    }

    /// Receives one message. A frame that announces more than `maxlength` bytes is refused with
    /// mp::DecodeError before its body is read (see Errors above for the connection's state
    /// afterwards). Blocks until a message or end of file arrives.
    std::string recv_bytes(std::optional<std::size_t> maxlength = std::nullopt);

    /// Receives one message into `buffer` starting at byte `offset`; returns its size. A message
    /// that does not fit throws mp::BufferTooShort carrying it (nothing is written to `buffer`).
    /// Throws std::invalid_argument when offset > buffer.size().
    std::size_t recv_bytes_into(std::span<std::byte> buffer, std::size_t offset = 0);
    /// The same for any writable contiguous buffer of plain values; `offset` counts bytes.
    template <detail::byte_buffer R>
        requires(!std::is_const_v<std::remove_reference_t<std::ranges::range_reference_t<R>>>)
    std::size_t recv_bytes_into(R&& buffer, std::size_t offset = 0) {
        return recv_bytes_into(
            std::span<std::byte>(reinterpret_cast<std::byte*>(std::ranges::data(buffer)),
                                 std::ranges::size(buffer) *
                                     sizeof(std::ranges::range_value_t<R>)),
            offset);
    }

    /// True when a message (or end of file) is ready to be received, or received bytes wait in
    /// the receive buffer; never waits (Python's poll() / poll(0)).
    bool poll();
    /// Waits at most `timeout` (zero or negative: not at all) for a message or end of file;
    /// std::nullopt waits without limit (Python's poll(None)).
    bool poll(std::optional<std::chrono::nanoseconds> timeout);

    /// Closes the descriptor for every copy of this handle in this process, dropping what its
    /// receive buffer held. Idempotent. Copies in other processes are theirs to close.
    void close() noexcept;
    /// True after close() (by any copy) and for a default-constructed Connection.
    bool closed() const noexcept;
    /// The descriptor, still owned by the connection. Throws (EBADF) when closed. Bytes already in
    /// the receive buffer do not show on it: poll() or connection::wait() see them.
    int fileno() const;
    /// True when this end may receive (false for Pipe(false)'s writer).
    bool readable() const noexcept;
    /// True when this end may send (false for Pipe(false)'s reader).
    bool writable() const noexcept;

    /// True when both handles share one descriptor (copies of one another).
    friend bool operator==(const Connection& a, const Connection& b) noexcept {
        return a.impl_ == b.impl_;
    }

private:
    friend std::size_t detail::buffered_bytes(const Connection& c) noexcept;
    friend struct Codec<Connection>;
    void check_writable(const char* op) const;
    void write_message(std::string_view body, std::span<const int> fds = {});
    std::string recv_message(std::vector<int>& fds);

    std::shared_ptr<detail::ConnectionState> impl_;
};

/// A connected pair of Connections. duplex (the default): a Unix stream socketpair whose ends
/// both send and receive. Not duplex: a pipe, returned as {reader, writer} as in Python.
std::pair<Connection, Connection> Pipe(bool duplex = true);

/// A Connection crosses to a forkserver child (or any process mp sends encoded arguments to,
/// or through Connection::send over a duplex connection) with its descriptor attached
/// (SCM_RIGHTS); the receiver owns a new descriptor for the same
/// channel, with the same readable/writable sides, and the bytes this end had read ahead (see
/// "Reading ahead" above; mp::Error when descriptors of read-ahead frames wait there). The
/// descriptor is borrowed while the
/// arguments are encoded, so keep the Connection open until Process::start() has returned. A
/// closed Connection arrives closed.
template <>
struct Codec<Connection> {
    /// A flags byte and a 4-byte descriptor index.
    static constexpr std::size_t min_encoded_size = 1;
    static void encode(Encoder& e, const Connection& c);
    static Connection decode(Decoder& d);
};

namespace connection {

/// One object wait() watches: a Connection (by address, as Python's wait returns the objects
/// themselves) or a raw descriptor: a socket, a pipe end, or a Process::sentinel().
using Waitable = std::variant<Connection*, int>;

/// Waits until at least one of `objects` is ready to read (a message, data, end of file or
/// a hang-up; a Connection with bytes in its receive buffer, without asking its descriptor; a
/// sentinel when its process has ended) or `timeout` passes (std::nullopt: no
/// limit; zero or negative: just look). Returns the ready ones in the order given, empty after
/// a timeout. A closed Connection throws std::system_error (EBADF), as does a descriptor that
/// is not open. An empty list with no timeout, which could never return, throws
/// std::invalid_argument (Python would sleep forever); with a timeout it just sleeps.
std::vector<Connection*> wait(std::span<Connection* const> objects,
                              std::optional<std::chrono::nanoseconds> timeout = std::nullopt);
/// wait({&a, &b}, 1s)
std::vector<Connection*> wait(std::initializer_list<Connection*> objects,
                              std::optional<std::chrono::nanoseconds> timeout = std::nullopt);
/// Raw descriptors: sockets, pipes, Process sentinels.
std::vector<int> wait(std::span<const int> fds,
                      std::optional<std::chrono::nanoseconds> timeout = std::nullopt);
/// wait({sock, p.sentinel()}, 1s)
std::vector<int> wait(std::initializer_list<int> fds,
                      std::optional<std::chrono::nanoseconds> timeout = std::nullopt);
/// A mix of connections and descriptors.
std::vector<Waitable> wait(std::span<const Waitable> objects,
                           std::optional<std::chrono::nanoseconds> timeout = std::nullopt);
/// wait({&a, p.sentinel(), &b}, 1s)
std::vector<Waitable> wait(std::initializer_list<Waitable> objects,
                           std::optional<std::chrono::nanoseconds> timeout = std::nullopt);

}  // namespace connection
}  // namespace mp
