#pragma once
/// \file
/// Python's socketserver for C++: TCP, UDP and Unix socket servers that hand each request to a
/// handler object, synchronously, in a thread, in a forked child, or (beyond Python) in one of N
/// pre-forked worker processes.
///
///     struct Echo : mp::StreamRequestHandler {
///         void handle() override { wfile.write(rfile.readline()); }
///     };
///     mp::ThreadingTCPServer srv({"127.0.0.1", 9000}, mp::handler<Echo>());
///     std::thread t([&] { srv.serve_forever(); });
///     ...; srv.shutdown(); t.join(); srv.server_close();
///
/// A service that stops on SIGINT/SIGTERM, giving requests under way 5 s before their
/// connections are closed (no signal code of its own; nothing printed on the way out):
///
///     mp::ThreadingTCPServer srv({"0.0.0.0", 9000}, mp::handler<Echo>(),
///                                {.shutdown_timeout = std::chrono::seconds(5)});
///     auto stop = mp::stop_on_signals({SIGINT, SIGTERM});
///     srv.serve_forever(stop.token());  // returns once stopped and every handler has ended
///
/// Python's mixins are a policy here: SocketServer<kind, family, concurrency>, with the Python
/// names as aliases (TCPServer, ThreadingTCPServer, ForkingUnixStreamServer, ...). Hooks that
/// Python users override (verify_request, handle_error, handle_timeout, service_actions,
/// process_request, finish_request) are virtual; subclass an alias to override them.
///
/// Destructor policy: the destructor calls server_close(), then joins every handler thread still
/// running (daemon_threads or not: a detached thread would outlive the server it uses) and
/// every forked child still running (mp::Process's policy). A subclass whose overridden hooks
/// run in handler threads should call server_close() in its own destructor, and then not set
/// daemon_threads or block_on_close = false: server_close() does not wait for the handlers then,
/// and one still running would call the hooks of a subclass already destroyed (the base's
/// destructor, which joins it, runs after the subclass's).

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <csignal>
#include <initializer_list>
#include <map>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <stop_token>
#include <string_view>
#include <signal.h>
#include <sys/types.h>
#include <thread>
#include <utility>
#include <vector>

#include "mp/connection.hpp"
#include "mp/detail/fd.hpp"
#include "mp/errors.hpp"

namespace mp {

class Process;

/// A server's address is mp::Address (connection.hpp): host and port for TCP/UDP (IPv4, or IPv6
/// for a numeric IPv6 host), or a Unix path ('\0' first: a Linux abstract name).
using ServerAddress = Address;

/// One request as a handler sees it. Stream servers: fd() is the accepted connection (the
/// server closes it after the handler). Datagram servers: data is the packet and fd() the
/// server's own socket, to answer with sendto.
class Request {
public:
    Request() = default;
    Request(Request&& o) noexcept
        : data(std::move(o.data)), conn_(std::move(o.conn_)), server_sock_(std::exchange(o.server_sock_, -1)) {}
    Request& operator=(Request&& o) noexcept;
    Request(const Request&) = delete;
    Request& operator=(const Request&) = delete;
    ~Request() = default;

    int fd() const noexcept { return conn_ ? conn_.get() : server_sock_; }
    std::string data;

private:
    friend class BaseServer;
    void close() noexcept;
    detail::Fd conn_;       // a stream server's accepted connection: the request's own
    int server_sock_ = -1;  // a datagram server's socket: the server's, only lent
};

/// Python's rfile: buffered reads from a socket (StreamRequestHandler) or from a packet
/// (DatagramRequestHandler).
class InputFile {
public:
    InputFile() = default;
    /// Reads `fd`; each wait for data is bounded by `timeout` (mp::TimeoutError) when set.
    InputFile(int fd, detail::Timeout timeout) : fd_(fd), timeout_(timeout) {}
    /// Reads the bytes of `data` (a datagram).
    explicit InputFile(std::string data) : buf_(std::move(data)), eof_(true) {}

    /// One line with its '\n' (at most `limit` bytes); the rest at end of file; "" at EOF.
    std::string readline(std::size_t limit = static_cast<std::size_t>(-1));
    /// Up to `n` bytes: fewer only at end of file.
    std::string read(std::size_t n);
    /// Everything up to end of file.
    std::string read();

private:
    bool fill();
    int fd_ = -1;  // lent by the Request, which closes it
    detail::Timeout timeout_;
    std::string buf_;
    std::size_t pos_ = 0;
    bool eof_ = false;
};

/// Python's wfile: unbuffered writes to a socket, or the reply being built (datagrams).
class OutputFile {
public:
    OutputFile() = default;
    /// Writes go straight to `fd` (all of them; a closed peer is std::system_error(EPIPE)).
    explicit OutputFile(int fd) : fd_(fd) {}
    void write(std::string_view bytes);
    /// What was written (datagram reply); empty for a socket.
    const std::string& getvalue() const noexcept { return buf_; }

private:
    int fd_ = -1;  // lent by the Request, which closes it
    std::string buf_;
};

class BaseServer;

/// A handler is made for each request; the server calls setup(), handle(), then finish() (also
/// when handle() throws; the exception then goes to the server's handle_error).
class BaseRequestHandler {
public:
    virtual ~BaseRequestHandler() = default;
    virtual void setup() {}
    virtual void handle() {}
    virtual void finish() {}

    /// The connection (stream) or the packet and the server's socket (datagram).
    Request& request() const noexcept { return *request_; }
    const ServerAddress& client_address() const noexcept { return *client_; }
    BaseServer& server() const noexcept { return *server_; }

private:
    friend class BaseServer;
    Request* request_ = nullptr;
    const ServerAddress* client_ = nullptr;
    BaseServer* server_ = nullptr;
};

/// rfile/wfile over the connection. Set `timeout` (in the constructor) to bound each read.
class StreamRequestHandler : public BaseRequestHandler {
public:
    void setup() override;
    void finish() override {}

    InputFile rfile;
    OutputFile wfile;
    /// Bounds each wait for data in rfile (mp::TimeoutError); none by default, as Python.
    detail::Timeout timeout;
    /// Sets TCP_NODELAY on the connection (TCP only).
    bool disable_nagle_algorithm = false;
};

/// rfile reads the packet; what is written to wfile is sent back to the client in finish().
class DatagramRequestHandler : public BaseRequestHandler {
public:
    void setup() override;
    void finish() override;

    InputFile rfile;
    OutputFile wfile;
};

using HandlerFactory = std::function<std::unique_ptr<BaseRequestHandler>()>;

/// The factory for a handler class: mp::TCPServer srv(addr, mp::handler<MyHandler>());
template <class H>
HandlerFactory handler() {
    static_assert(std::is_base_of_v<BaseRequestHandler, H>, "a handler derives from mp::BaseRequestHandler");
    return [] { return std::make_unique<H>(); };
}

enum class SocketKind { stream, datagram };
enum class AddressFamily { inet, unix_socket };
enum class Concurrency {
    none,       ///< the request is handled in serve_forever's thread
    threading,  ///< a thread per request (ThreadingMixIn)
    forking,    ///< a forked child per request (ForkingMixIn)
};

struct ServerOptions {
    /// False: the caller calls server_bind() and server_activate() itself.
    bool bind_and_activate = true;
    bool allow_reuse_address = false;  ///< SO_REUSEADDR
    bool allow_reuse_port = false;     ///< SO_REUSEPORT
    int request_queue_size = 5;        ///< listen() backlog
    /// handle_request() waits this long for a request, then calls handle_timeout(); none: forever.
    detail::Timeout timeout{};
    std::size_t max_packet_size = 8192;  ///< datagram servers
    /// Threading: server_close() does not wait for the handler threads (the destructor does; see
    /// the destructor policy above for a subclass with hooks). A datagram handler still running
    /// after server_close() cannot reply: its reply fails (std::system_error ENOTSOCK, to
    /// handle_error; Python's fails with EBADF), and the socket's number is kept from other
    /// sockets until the destructor has joined the handlers.
    bool daemon_threads = false;
    /// Threading/forking: server_close() waits for the handler threads / children.
    bool block_on_close = true;
    /// Forking: at most this many children at once; the next request waits for one to end.
    std::size_t max_children = 40;
    /// Prefork: the number of worker processes.
    std::size_t workers = 4;
    /// After a stop (shutdown(), or the stop token given to serve_forever): how long requests
    /// under way may go on. Then their connections are shut down for reading and writing, so a
    /// handler waiting for its client reads end of file and one writing to a stalled client
    /// fails; a forked child still running a second later is killed (SIGKILL). A prefork worker
    /// holds its connection in its own process: one still running its request at the deadline is
    /// sent SIGTERM instead, and SIGKILL a second later. A handler thread that ignores its
    /// connection cannot be stopped and is waited for. None (or `forever` and longer,
    /// seconds::max() included): requests under way take as long as they take, as in Python.
    /// Zero or negative: their connections are shut down at once.
    detail::Timeout shutdown_timeout{};
};

/// A socket server (Python's BaseServer and TCPServer/UDPServer in one).
class BaseServer {
public:
    BaseServer(const BaseServer&) = delete;
    BaseServer& operator=(const BaseServer&) = delete;
    virtual ~BaseServer();

    /// Handles requests until shutdown(); checks for shutdown at least every poll_interval
    /// (shutdown() also wakes it at once; none, or seconds::max(): only then). std::logic_error
    /// after server_close().
    virtual void serve_forever(detail::Timeout poll_interval = std::chrono::milliseconds(500));
    /// serve_forever that also stops when `stop` is requested (from any thread, or by a signal
    /// through mp::stop_on_signals). After a stop by the token with options().shutdown_timeout
    /// set, it returns only when every request under way has ended (see shutdown(timeout)), so
    /// a program may simply return from main afterwards.
    void serve_forever(std::stop_token stop, detail::Timeout poll_interval = std::chrono::milliseconds(500));
    /// From another thread: makes serve_forever return and waits until it has. Called while
    /// serve_forever is not running, it returns at once and the next serve_forever returns at once.
    /// As in Python, calling it from serve_forever's own thread (a non-threading handler) deadlocks.
    /// With options().shutdown_timeout set, the requests under way get that long (see there).
    /// From a handler in a forked child (a forking server's, a prefork worker's), where Python's
    /// deadlocks: asks the serving process to stop, as a shutdown() there would, and returns at
    /// once (the child cannot wait for its parent); the handler then ends its request as usual.
    void shutdown();
    /// shutdown() with a deadline: requests under way get `timeout`, then their connections are
    /// closed (as ServerOptions::shutdown_timeout says; none, or seconds::max(): no deadline).
    /// Returns once serve_forever has returned and every handler thread and forked child has ended.
    /// From a threading handler: waits for the other handler threads (not its own). From a forked
    /// handler: as shutdown() (the serving process applies options().shutdown_timeout).
    void shutdown(detail::Timeout timeout);
    /// Waits for one request (at most options().timeout) and handles it; handle_timeout() if none
    /// came. std::logic_error after server_close().
    void handle_request();
    /// Closes the socket; waits for handler threads / children per block_on_close. Idempotent.
    /// Not while serve_forever runs (it polls the socket): shutdown() first, also from a handler
    /// thread, whose own thread it then leaves for a later join.
    virtual void server_close();

    void server_bind();
    void server_activate();
    /// The bound address (the real port when 0 was asked for).
    const ServerAddress& server_address() const noexcept { return address_; }
    int fileno() const noexcept { return sock_; }
    const ServerOptions& options() const noexcept { return options_; }

    /// Forking: the children still running (after the last collect).
    std::size_t active_children() const;
    /// Forking: reaps the children that ended; with blocking, waits for all of them.
    void collect_children(bool blocking = false);

    // ---- hooks ----
    /// False: the request is closed unanswered.
    virtual bool verify_request(const Request& request, const ServerAddress& client_address);
    /// Called inside the catch block of a handler's exception (std::current_exception() is it).
    /// The default prints Python's dashed block with the client address and the error to stderr.
    virtual void handle_error(const Request& request, const ServerAddress& client_address);
    /// handle_request() saw no request within the timeout.
    virtual void handle_timeout() {}
    /// Called once per serve_forever loop (the forking server collects its children here).
    virtual void service_actions();
    virtual void process_request(Request& request, const ServerAddress& client_address);
    /// Makes the handler and runs it.
    virtual void finish_request(Request& request, const ServerAddress& client_address);
    /// Stream: shuts the connection down for writing and closes it.
    virtual void shutdown_request(Request& request);
    virtual void close_request(Request& request);

protected:
    struct Kind {
        SocketKind socket{};
        AddressFamily family{};
        Concurrency concurrency{};
    };
    BaseServer(ServerAddress address, HandlerFactory factory, Kind kind, ServerOptions options);

    /// Accepts one request without waiting long; false when nothing could be taken.
    void handle_request_noblock();
    /// serve_forever's bookkeeping: false when a pending shutdown says not to start.
    bool begin_serving();
    void end_serving() noexcept;
    bool shutdown_requested();
    /// Becomes readable when shutdown() is called.
    int wakeup_fd() const noexcept { return wake_r_; }
    /// Empties wakeup_fd() (a byte left unread keeps it readable and serve_forever's poll
    /// spinning): true when a forked handler asked for the stop.
    bool drain_wakeup() noexcept;
    /// serve_forever's loop, when wakeup_fd() is readable: empties it, and turns a stop asked for
    /// by a forked handler (which cannot set this process's flag) into a shutdown request.
    void take_wakeup() noexcept;
    /// Whether this is a forked handler's copy of a server that its parent is serving.
    bool in_forked_handler() const noexcept;
    void check_open() const;
    /// When the connections of requests under way get closed, if a stop with a deadline came.
    std::optional<std::chrono::steady_clock::time_point> close_deadline();

private:
    struct Child {
        std::unique_ptr<Process> process{};
        std::uint64_t connection = 0;  // its entry in connections_ (0: none)
    };

    bool get_request(Request& request, ServerAddress& client);
    void join_threads(bool all);
    /// With a timeout, arms the closer first; then sets the shutdown flag and wakes serve_forever.
    void request_shutdown(detail::Timeout timeout) noexcept;
    /// Sets the close deadline (now + timeout, unless an earlier one stands) and the closer.
    void set_close_deadline(std::chrono::nanoseconds timeout) noexcept;
    /// Waits for handler threads and children; past the close deadline, kills the children.
    void finish_handlers(std::optional<std::chrono::steady_clock::time_point> deadline);
    void reap(Child& c);
    // Connections of requests under way (stream servers), each as a duplicate descriptor of
    // the server's own, so that the closer can shut the socket down without racing the close of
    // the handler's descriptor (a reused number would be another socket).
    std::uint64_t add_connection(int fd);
    void remove_connection(std::uint64_t id) noexcept;
    void close_connections_in_child() noexcept;
    void closer_main();
    void stop_closer() noexcept;

    ServerAddress address_;
    HandlerFactory factory_;
    Kind kind_;
    ServerOptions options_;
    int sock_ = -1;
    /// A datagram server closed while its handler threads may still run (they reply through the
    /// socket's number): the number, kept on /dev/null until they are joined, not reused meanwhile.
    int retired_sock_ = -1;
    int wake_r_ = -1, wake_w_ = -1;
    // The process in serve_forever (0: none): a forked handler, whose copy still names its
    // parent, cannot stop its own copy of the loop and asks that process instead. Atomic: read
    // in a forked child without a lock another thread may have held at the fork.
    std::atomic<pid_t> serving_pid_{0};

    std::mutex mu_;
    std::condition_variable cv_;
    bool serving_ = false;
    bool shutdown_request_ = false;

    struct HandlerThread {
        std::thread thread{};
        std::shared_ptr<bool> done{};  // guarded by threads_mu_
    };
    std::mutex threads_mu_;
    std::vector<HandlerThread> threads_;
    std::vector<Child> children_;

    std::mutex finish_mu_;  // one finish_handlers at a time
    std::mutex connections_mu_;
    std::condition_variable closer_cv_;
    std::map<std::uint64_t, int> connections_;  // id -> duplicate descriptor
    std::uint64_t next_connection_ = 1;
    std::optional<std::chrono::steady_clock::time_point> close_at_;  // armed closer's deadline
    bool closing_ = false;       // the deadline passed: new connections are closed at once
    bool closer_quit_ = false;
    std::thread closer_;
};

/// Python's server classes as one template: a socket kind, an address family, a concurrency.
template <SocketKind S, AddressFamily F, Concurrency C>
class SocketServer : public BaseServer {
public:
    SocketServer(ServerAddress address, HandlerFactory factory, ServerOptions options = {})
        : BaseServer(std::move(address), std::move(factory), Kind{S, F, C}, std::move(options)) {}
};

using TCPServer = SocketServer<SocketKind::stream, AddressFamily::inet, Concurrency::none>;
using UDPServer = SocketServer<SocketKind::datagram, AddressFamily::inet, Concurrency::none>;
using UnixStreamServer = SocketServer<SocketKind::stream, AddressFamily::unix_socket, Concurrency::none>;
using UnixDatagramServer = SocketServer<SocketKind::datagram, AddressFamily::unix_socket, Concurrency::none>;
using ThreadingTCPServer = SocketServer<SocketKind::stream, AddressFamily::inet, Concurrency::threading>;
using ThreadingUDPServer = SocketServer<SocketKind::datagram, AddressFamily::inet, Concurrency::threading>;
using ThreadingUnixStreamServer =
    SocketServer<SocketKind::stream, AddressFamily::unix_socket, Concurrency::threading>;
using ThreadingUnixDatagramServer =
    SocketServer<SocketKind::datagram, AddressFamily::unix_socket, Concurrency::threading>;
using ForkingTCPServer = SocketServer<SocketKind::stream, AddressFamily::inet, Concurrency::forking>;
using ForkingUDPServer = SocketServer<SocketKind::datagram, AddressFamily::inet, Concurrency::forking>;
using ForkingUnixStreamServer = SocketServer<SocketKind::stream, AddressFamily::unix_socket, Concurrency::forking>;
using ForkingUnixDatagramServer =
    SocketServer<SocketKind::datagram, AddressFamily::unix_socket, Concurrency::forking>;

/// Beyond Python: serve_forever starts options().workers processes that all accept on the one
/// listening socket and handle requests one at a time. A worker that dies (a crash, a kill) is
/// replaced. shutdown() is graceful: each worker finishes the request it is handling, then
/// exits, and serve_forever returns once all have been joined. Workers are daemon processes: a
/// parent that dies without shutting down takes them with it. Workers are forked, so each holds
/// a copy of every descriptor the parent had open without FD_CLOEXEC's help (fork keeps them
/// all): a socket the parent closes stays open in the workers until they exit. Open other
/// connections after serve_forever's workers have started, or close them in the handler's setup.
/// A signal sent to the whole process group (a terminal's Ctrl-C) reaches the workers too, whose
/// dispositions are the default ones (as any forked handler's, mp::SignalStop's included): they
/// end at once, mid-request. For a graceful stop on such a signal, stop the parent only (kill
/// its pid) or let the handler's setup ignore SIGINT: a worker goes with its parent anyway.
class PreforkTCPServer : public BaseServer {
public:
    PreforkTCPServer(ServerAddress address, HandlerFactory factory, ServerOptions options = {});
    ~PreforkTCPServer() override;

    void serve_forever(detail::Timeout poll_interval = std::chrono::milliseconds(500)) override;
    using BaseServer::serve_forever;  // serve_forever(std::stop_token, poll_interval)

    /// The pids of the running workers.
    std::vector<pid_t> worker_pids() const;
    /// Workers started so far by this server (the first N plus the replacements).
    std::size_t workers_started() const;

private:
    std::unique_ptr<Process> start_worker(int stop_fd);

    mutable std::mutex workers_mu_;
    std::vector<std::unique_ptr<Process>> workers_;
    std::size_t started_ = 0;
};

/// Turns signals into a stop request: while it lives, the first of `signals` to arrive
/// requests a stop on token() (from a thread of its own, so whatever the stop runs need not be
/// async-signal-safe) and puts back the signals' previous dispositions, so that a second signal
/// acts as it would have without it (SIGINT or SIGTERM then ends the process at once).
///
///     auto stop = mp::stop_on_signals({SIGINT, SIGTERM});
///     server.serve_forever(stop.token());
///
/// How: a handler that writes the signal's number to a self-pipe and a thread that reads it.
/// A child forked meanwhile inherits the handler, which there restores the default disposition
/// and re-raises the signal, so a child is stopped by SIGTERM as usual. One at a time per
/// process (a second live SignalStop is mp::Error); the destructor restores the dispositions.
/// The signals stay unblocked, so any thread may receive them.
class SignalStop {
public:
    /// Installs the handlers; std::system_error for a signal that cannot be caught.
    explicit SignalStop(std::initializer_list<int> signals = {SIGINT, SIGTERM});
    ~SignalStop();
    SignalStop(const SignalStop&) = delete;
    SignalStop& operator=(const SignalStop&) = delete;

    /// Stopped when a signal arrives (or request_stop is called).
    std::stop_token token() const noexcept { return source_.get_token(); }
    /// The signal that requested the stop; 0 while none has.
    int signal() const noexcept { return signal_.load(); }
    /// Requests the stop without a signal.
    void request_stop() noexcept { source_.request_stop(); }

private:
    void watch() noexcept;
    void restore() noexcept;

    std::stop_source source_;
    std::atomic<int> signal_{0};
    std::vector<int> signals_;
    std::vector<struct sigaction> previous_;  // as before the constructor, one per signal
    std::mutex restore_mu_;
    bool restored_ = false;
    int pipe_r_ = -1;
    int pipe_w_ = -1;
    std::thread watcher_;
};

/// A SignalStop for `signals`: `auto stop = mp::stop_on_signals({SIGINT, SIGTERM});`.
inline SignalStop stop_on_signals(std::initializer_list<int> signals = {SIGINT, SIGTERM}) {
    return SignalStop(signals);
}

}  // namespace mp
