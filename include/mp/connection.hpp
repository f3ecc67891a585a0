#pragma once
/// \file
/// mp::Connection and mp::Pipe: message channels between processes, as Python's
/// multiprocessing.connection; mp::Listener and mp::Client to connect over TCP or Unix sockets
/// with an authkey; and mp::connection::wait over several of them.
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
#include <sys/types.h>
#include <vector>

#include "mp/detail/deadline.hpp"
#include "mp/detail/fd.hpp"
#include "mp/errors.hpp"
#include "mp/py.hpp"
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

/// Tag: the descriptor is known to be a connected stream socket (Listener/Client); a Unix one
/// may carry descriptors, a TCP one cannot.
struct KnownSocket {
    bool unix_family = false;
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
    /// Takes ownership of `fd`, a connected stream socket, readable and writable.
    Connection(detail::KnownSocket, int fd);

    /// Sends `value` encoded with mp::Codec as one message. A value that carries file
    /// descriptors (a Connection, or anything whose Codec attaches one) sends them along with
    /// the frame (SCM_RIGHTS), which needs a Unix socket connection (a duplex Pipe(), or a
    /// Listener/Client on a Unix path): over a pipe or TCP that is mp::Error, and nothing is
    /// sent. The frame's bytes stay Python-compatible; a Python
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

    /// Sends `value` pickled (protocol 4, mp/py.hpp's types: numbers, str, bytes, tuples,
    /// lists, dicts, sets, py::Object ...) as one message, which a Python peer's conn.recv()
    /// returns as the equal Python object. mp::py::PicklingError (nothing sent) for a
    /// std::string that is not UTF-8.
    ///
    ///     c.send_py(std::map<std::string, int>{{"job", 3}});   // Python: c.recv() == {'job': 3}
    template <class T>
    void send_py(const T& value) {
        send_bytes(py::dumps(value));
    }

    /// Receives one message that a Python peer sent with conn.send(obj) and reads it as a T
    /// (py::Object, the default, for a value of any plain shape). The pickle is read safely (no
    /// import, no call: mp/py.hpp); a frame longer than limits.max_size is refused before its
    /// body is read. mp::py::UnpicklingError when the pickle is refused, malformed, or not a T
    /// (the message is consumed either way).
    ///
    ///     auto job = c.recv_py<std::map<std::string, int>>();   // Python: c.send({'job': 3})
    template <class T = py::Object>
    T recv_py(const py::Limits& limits = {}) {
        return py::loads<T>(recv_bytes(limits.max_size), limits);
    }

    /// Sends `buffer[offset, offset + size)` as one message; `size` defaults to the rest of the
    /// buffer. Throws std::invalid_argument when that range is not inside the buffer.
    void send_bytes(std::string_view buffer, std::size_t offset = 0,
                    std::optional<std::size_t> size = std::nullopt);
    /// The same for any contiguous buffer of plain values (`std::vector<int>`,
    /// `std::span<const std::byte>`, `std::array<double, N>` ...); `offset` and `size` count
    /// bytes, as in Python.
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
    [[nodiscard]] bool poll();
    /// Waits at most `timeout` (zero or negative: not at all) for a message or end of file;
    /// std::nullopt waits without limit (Python's poll(None)).
    [[nodiscard]] bool poll(detail::Timeout timeout);

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
    friend void send_handle(Connection& conn, int fd, pid_t destination_pid);
    friend int recv_handle(Connection& conn);
    void check_writable(const char* op) const;
    void write_message(std::string_view body, std::span<const int> fds = {});
    std::string recv_message(std::vector<int>& fds);

    std::shared_ptr<detail::ConnectionState> impl_;
};

/// A connected pair of Connections. duplex (the default): a Unix stream socketpair whose ends
/// both send and receive. Not duplex: a pipe, returned as {reader, writer} as in Python.
std::pair<Connection, Connection> Pipe(bool duplex = true);

/// Python's multiprocessing.reduction.send_handle: sends a duplicate of descriptor `fd` (which
/// stays the caller's) to the process at the other end of `conn`, which takes it with
/// recv_handle. `conn` must be a Unix stream socket: a duplex Pipe(), or a Listener/Client
/// connection on a Unix path or abstract name; a TCP connection or a pipe is mp::Error and
/// nothing is sent. `fd` not open: std::system_error(EBADF). `destination_pid` is unused, as in
/// Python on Unix (Windows needs it). The wire form is Python's (one byte, 1, carrying the
/// descriptor as SCM_RIGHTS), so a Python peer's recv_handle/send_handle is the other end just
/// as well; it is not a Connection frame, so both sides must agree on when a handle comes.
void send_handle(Connection& conn, int fd, pid_t destination_pid = 0);
/// Python's multiprocessing.reduction.recv_handle: receives a descriptor sent by send_handle and
/// returns it, close-on-exec, owned by the caller (close it). mp::EOFError when the peer
/// closed; mp::DecodeError when what arrives is not a handle (a Connection frame, say): the
/// stream is then out of step and, as with a bad frame, `conn` stops being readable. Not a Unix
/// socket: mp::Error.
int recv_handle(Connection& conn);

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
    static constexpr bool shares_state = true;  // a copy refers to the same object
    /// A flags byte and a 4-byte descriptor index.
    static constexpr std::size_t min_encoded_size = 1;
    static void encode(Encoder& e, const Connection& c);
    static Connection decode(Decoder& d);
};

// ---------------------------------------------------------------- Listener and Client

/// Where a Listener listens and a Client connects (Python's `address` argument). Three kinds:
///   - TCP: `Address("127.0.0.1", 6000)`, `Address("::1", 0)`, `Address("localhost", 6000)`
///     (Python's `(host, port)` tuple). The host is a name or a numeric IPv4 or IPv6 address;
///     an empty host listens on every IPv4 interface (Python's `('', port)`). Port 0 lets the
///     system pick one; Listener::address() then holds the real port.
///   - a Unix socket path: `Address("/tmp/app.sock")` (Python's str address);
///   - a Linux abstract Unix name: `Address(std::string("\0app", 4))` or
///     `Address::abstract("app")`: no file, gone when the last socket closes.
/// The kind decides the socket family, as Python's address_type() does; there is no separate
/// `family` argument.
struct Address {
    enum class Family { tcp, unix_path, unix_abstract };

    /// A Unix address with no name (what last_accepted() gives for an unnamed Unix peer).
    Address() = default;
    /// A TCP address.
    Address(std::string host_, std::uint16_t port_)
        : family(Family::tcp), host(std::move(host_)), port(port_) {}
    /// A Unix socket: a path, or an abstract name when `path_` starts with '\0'.
    Address(std::string path_)  // NOLINT(google-explicit-constructor): Python passes a str
        : family(!path_.empty() && path_[0] == '\0' ? Family::unix_abstract : Family::unix_path),
          path(std::move(path_)) {}
    Address(const char* path_) : Address(std::string(path_)) {}  // NOLINT
    /// The abstract Unix name `name` (stored as '\0' + name in `path`).
    static Address abstract(std::string_view name) {
        Address a;
        a.family = Family::unix_abstract;
        a.path.reserve(name.size() + 1);
        a.path += '\0';
        a.path += name;
        return a;
    }

    bool is_tcp() const noexcept { return family == Family::tcp; }
    bool is_unix() const noexcept { return family != Family::tcp; }

    /// "127.0.0.1:6000", "[::1]:6000", "/tmp/app.sock", "@app" (abstract; '@' stands for '\0').
    std::string to_string() const;
    friend bool operator==(const Address&, const Address&) = default;

    Family family = Family::unix_path;
    std::string host;         ///< TCP only.
    std::uint16_t port = 0;   ///< TCP only.
    std::string path;         ///< Unix only; starts with '\0' for an abstract name.
};

/// Options of a Listener.
struct ListenerOptions {
    /// When set, every accepted connection must pass the mutual HMAC challenge with this key
    /// (see "Authentication" at Listener) before accept() returns it. std::nullopt: no
    /// authentication, as Python's authkey=None. An empty key is a key (HMAC takes it).
    std::optional<std::string> authkey{};
    /// listen()'s backlog. Python's default is 1, which makes a burst of TCP clients wait for
    /// SYN retries (a second each); mp takes 64.
    int backlog = 64;
    /// The longest the whole handshake of one connection may take (Python: no limit); a peer
    /// still in it then is dropped, and accept() reports it with
    /// mp::AuthenticationError("handshake timed out"). Handshakes run concurrently (see
    /// accept()), so a peer that stalls or trickles bytes delays nobody else.
    std::chrono::milliseconds handshake_timeout{5000};
    /// The most peers in the handshake at once. A new connection beyond it drops the peer that
    /// has been in its handshake longest (accept() reports it with mp::AuthenticationError
    /// "too many pending handshakes"): idle peers cannot hold every slot and lock honest
    /// clients out, and the descriptors they cost stay bounded.
    std::size_t max_pending_handshakes = 128;
};

/// Options of Client().
struct ClientOptions {
    /// The key for the mutual HMAC challenge; must match the Listener's (std::nullopt: none).
    std::optional<std::string> authkey{};
    /// The longest the handshake may take once connected (mp::AuthenticationError after it).
    std::chrono::milliseconds handshake_timeout{5000};
};

/// A listening socket that hands out Connections (Python's multiprocessing.connection.Listener).
///
///     mp::Listener l(mp::Address("127.0.0.1", 0), {.authkey = "secret"});
///     // elsewhere: auto c = mp::Client(l.address(), {.authkey = "secret"});
///     mp::Connection c = l.accept();   // authenticated both ways
///     c.send_bytes("hello");
///
/// Sockets: close-on-exec; TCP listeners set SO_REUSEADDR, and every TCP connection (accepted
/// or made by Client) sets TCP_NODELAY, which Python does not (a Python server answers a new
/// client's first request only after a 40 ms delayed ACK).
///
/// Authentication (with an authkey): byte-compatible with CPython's deliver_challenge /
/// answer_challenge. accept() first delivers a challenge (`#CHALLENGE#{sha256}` + 40 random
/// bytes, as Python 3.12+) and checks the peer's HMAC of it, then answers the peer's challenge;
/// Client() does the reverse, except that it sends its own challenge in the same write as its
/// answer rather than after the server's #WELCOME# (a server, Python's included, reads it only
/// once it has welcomed the client, so the bytes on the wire stay Python's; it saves a round
/// trip per connection, and the server then sends #WELCOME# and its answer in one write).
/// Both forms of the answer are accepted: Python 3.12's
/// `{digest}` + HMAC (md5, sha256, sha384, sha3_256 or sha3_384) and Python <= 3.11's raw
/// 16-byte HMAC-MD5; a 20-byte challenge (Python <= 3.11) is answered with raw HMAC-MD5,
/// a `{digest}`-prefixed one with that digest. Random bytes and HMACs come from OpenSSL's
/// libcrypto; digests are compared in constant time. A handshake message longer than 256
/// bytes is refused. Failures are mp::AuthenticationError, with Python's messages: "digest
/// received was wrong" on the side whose challenge was answered wrongly, "digest sent was
/// rejected" on the other; the connection is closed and no payload passes.
///
/// Destructor: close(). A Unix path listener unlinks its path then, in the process that
/// created it only (a fork child's copy closes its descriptor but leaves the file, as
/// Python's Finalize). Move-only.
///
/// Threads: accept(), last_accepted() and fileno() may be called from several threads at
/// once; close(), moving and destruction may not overlap any other call.
class Listener;

namespace detail {
/// A Listener's handshakes in progress (defined in src/listener.cpp).
struct ListenerState;
/// Listener::accept(), except that it returns std::nullopt once `stop_fd` polls readable (a
/// server loop's shutdown signal).
std::optional<Connection> accept_or_stop(Listener& listener, int stop_fd);
}  // namespace detail

class Listener {
public:
    /// Listens on a fresh Unix socket path in the temporary directory (Python's Listener()):
    /// the first usable of $TMPDIR, $TEMP, $TMP, /tmp, /var/tmp, /usr/tmp, as Python's
    /// tempfile.gettempdir() (one that is missing, not writable or too long for a socket's path
    /// is passed over).
    Listener();
    /// Binds and listens on `address`. Throws std::system_error naming the failing call
    /// (EADDRINUSE, ...), or std::invalid_argument for a host that does not resolve.
    explicit Listener(const Address& address, ListenerOptions options = {});
    Listener(Listener&& o) noexcept;
    Listener& operator=(Listener&& o) noexcept;
    Listener(const Listener&) = delete;
    Listener& operator=(const Listener&) = delete;
    ~Listener();

    /// Waits for a connection, authenticates it when an authkey is set, and returns it.
    /// Handshakes run concurrently: accept() takes each new peer into its handshake and drives
    /// every pending one as its bytes arrive (one thread, no waiting on any single peer), and
    /// returns the first that completes; the others stay pending with the Listener and go on in
    /// the next accept() call (in any thread). So an honest client is served within its own
    /// round trips however many peers stall (up to max_pending_handshakes).
    /// Throws mp::AuthenticationError when a peer fails the handshake in any way: a wrong key,
    /// a malformed message, end of file or a reset during it, a stall past handshake_timeout,
    /// or being dropped for a newer peer (see max_pending_handshakes); the next accept() serves
    /// the next peer. std::system_error(EMFILE, ENFILE, ENOBUFS or ENOMEM) when the process is
    /// out of descriptors or memory for a new connection: the Listener then leaves new
    /// connections queued in the backlog for a back-off (10 ms, doubling to 1 s while it lasts)
    /// during which accept() goes on with pending handshakes only, so that a loop that retries
    /// does not spin. std::system_error(EBADF) "listener is closed" after close()
    /// [Python: OSError].
    Connection accept();
    /// Stops listening (and unlinks a Unix path, see above); drops the pending handshakes.
    /// Idempotent. Not to be called while another thread is in accept().
    void close() noexcept;
    bool closed() const noexcept;
    /// The address listened on, with the real port when 0 was asked for.
    const Address& address() const noexcept { return address_; }
    /// The peer of the last accepted connection (an unnamed Unix peer has an empty path);
    /// std::nullopt before the first.
    std::optional<Address> last_accepted() const;
    /// A descriptor for poll / connection::wait that polls readable when accept() has
    /// something to do: a new connection, bytes from a peer in its handshake, a handshake
    /// deadline or the end of a back-off. It is an epoll descriptor, not the listening socket:
    /// a loop that waits on the socket itself would miss the handshakes a previous accept()
    /// left pending. Throws (EBADF) when closed.
    int fileno() const;

private:
    friend std::optional<Connection> detail::accept_or_stop(Listener&, int);
    std::optional<Connection> accept_impl(int stop_fd);

    detail::Fd fd_;  // the listening socket
    Address address_;
    ListenerOptions options_;
    int creator_pid_ = 0;  // the process that unlinks a Unix path
    std::unique_ptr<detail::ListenerState> state_;
};

/// Connects to a Listener at `address` (Python's multiprocessing.connection.Client) and, with
/// an authkey, answers its challenge and then challenges it. Returns the connected Connection.
/// Throws std::system_error naming the call (ECONNREFUSED, ENOENT, ...), std::invalid_argument
/// for a host that does not resolve, mp::AuthenticationError when the handshake fails (the
/// server refused us, or reset or closed the connection, or went silent, during it).
Connection Client(const Address& address, ClientOptions options = {});

namespace connection {

/// One object wait() watches: a Connection (by address, as Python's wait returns the objects
/// themselves) or a raw descriptor: a socket, a pipe end, or a Process::sentinel().
using Waitable = std::variant<Connection*, int>;

/// Waits until at least one of `objects` is ready to read (a message, data, end of file or
/// a hang-up; a Connection with bytes in its receive buffer, without asking its descriptor; a
/// sentinel when its process has ended) or `timeout` passes (std::nullopt: no
/// limit; zero or negative: just look). Returns the ready ones in the order given, empty after
/// a timeout. A closed Connection throws std::system_error (EBADF), as does a descriptor that
/// is not open (a negative one included), before any waiting. An empty list with no timeout, which could never return, throws
/// std::invalid_argument (Python would sleep forever); with a timeout it just sleeps.
std::vector<Connection*> wait(std::span<Connection* const> objects,
                              detail::Timeout timeout = std::nullopt);
/// wait({&a, &b}, 1s)
std::vector<Connection*> wait(std::initializer_list<Connection*> objects,
                              detail::Timeout timeout = std::nullopt);
/// Raw descriptors: sockets, pipes, Process sentinels.
std::vector<int> wait(std::span<const int> fds,
                      detail::Timeout timeout = std::nullopt);
/// wait({sock, p.sentinel()}, 1s)
std::vector<int> wait(std::initializer_list<int> fds,
                      detail::Timeout timeout = std::nullopt);
/// A mix of connections and descriptors.
std::vector<Waitable> wait(std::span<const Waitable> objects,
                           detail::Timeout timeout = std::nullopt);
/// wait({&a, p.sentinel(), &b}, 1s)
std::vector<Waitable> wait(std::initializer_list<Waitable> objects,
                           detail::Timeout timeout = std::nullopt);

}  // namespace connection
}  // namespace mp
