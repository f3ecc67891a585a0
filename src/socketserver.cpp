// socketserver: the servers, the request handlers and their rfile/wfile (PreforkTCPServer and
// SignalStop: socketserver_prefork.cpp).
// One file because BaseServer is one state machine (the serve loop, shutdown and its closer
// thread, per-request threads and children) whose parts share its private state.

#include "mp/socketserver.hpp"

#include <algorithm>
#include <arpa/inet.h>
#include <atomic>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <cxxabi.h>
#include <exception>
#include <fcntl.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <signal.h>
#include <stdexcept>
#include <sys/socket.h>
#include <sys/un.h>
#include <typeinfo>
#include <unistd.h>

#include "mp/errors.hpp"
#include "mp/process.hpp"
#include "describe.hpp"
#include "sys/error.hpp"
#include "sys/fd.hpp"
#include "sys/pidfd.hpp"

namespace mp {

namespace {

using Clock = std::chrono::steady_clock;

struct SockAddr {
    sockaddr_storage storage{};
    socklen_t len = 0;
    const sockaddr* get() const noexcept { return reinterpret_cast<const sockaddr*>(&storage); }
    sockaddr* get() noexcept { return reinterpret_cast<sockaddr*>(&storage); }
};

SockAddr unix_sockaddr(const std::string& path) {
    SockAddr a;
    auto* un = reinterpret_cast<sockaddr_un*>(&a.storage);
    if (path.size() >= sizeof un->sun_path) {
        throw std::invalid_argument("socketserver: Unix socket path too long: " + path);
    }
    un->sun_family = AF_UNIX;
    std::memcpy(un->sun_path, path.data(), path.size());
    // An abstract name (leading NUL) is exactly its bytes; a path ends at its NUL.
    a.len = static_cast<socklen_t>(offsetof(sockaddr_un, sun_path) + path.size() + (path[0] == '\0' ? 0 : 1));
    return a;
}

SockAddr inet_sockaddr(const ServerAddress& addr) {
    addrinfo hints{};
    hints.ai_family = addr.host.find(':') != std::string::npos ? AF_INET6 : AF_INET;
    hints.ai_flags = AI_PASSIVE;
    addrinfo* res = nullptr;
    const std::string port = std::to_string(addr.port);
    int rc = ::getaddrinfo(addr.host.empty() ? nullptr : addr.host.c_str(), port.c_str(), &hints, &res);
    if (rc != 0) {
        throw std::system_error(EINVAL, std::system_category(),
                                "getaddrinfo " + addr.host + ": " + ::gai_strerror(rc));
    }
    SockAddr a;
    std::memcpy(&a.storage, res->ai_addr, res->ai_addrlen);
    a.len = res->ai_addrlen;
    ::freeaddrinfo(res);
    return a;
}

ServerAddress from_sockaddr(const sockaddr_storage& s, socklen_t len) {
    char host[INET6_ADDRSTRLEN] = {};
    switch (s.ss_family) {
    case AF_INET: {
        const auto* in = reinterpret_cast<const sockaddr_in*>(&s);
        ::inet_ntop(AF_INET, &in->sin_addr, host, sizeof host);
        return ServerAddress(host, ntohs(in->sin_port));
    }
    case AF_INET6: {
        const auto* in6 = reinterpret_cast<const sockaddr_in6*>(&s);
        ::inet_ntop(AF_INET6, &in6->sin6_addr, host, sizeof host);
        return ServerAddress(host, ntohs(in6->sin6_port));
    }
    case AF_UNIX: {
        const auto* un = reinterpret_cast<const sockaddr_un*>(&s);
        const std::size_t off = offsetof(sockaddr_un, sun_path);
        if (len <= off) return ServerAddress{};  // an unbound client
        std::size_t n = len - off;
        if (un->sun_path[0] != '\0') n = ::strnlen(un->sun_path, n);
        return ServerAddress(std::string(un->sun_path, n));
    }
    default:
        return ServerAddress{};
    }
}

SockAddr to_sockaddr(const ServerAddress& a) { return a.is_unix() ? unix_sockaddr(a.path) : inet_sockaddr(a); }

using detail::demangle;

}  // namespace

// ---- Request ----

Request& Request::operator=(Request&& o) noexcept {
    if (this != &o) {
        close();
        data = std::move(o.data);
        conn_ = std::move(o.conn_);
        server_sock_ = std::exchange(o.server_sock_, -1);
    }
    return *this;
}

void Request::close() noexcept {
    conn_.reset();
    server_sock_ = -1;
}

// ---- rfile / wfile ----

bool InputFile::fill() {
    if (eof_ || fd_ < 0) return false;
    if (pos_ > 0) {
        buf_.erase(0, pos_);
        pos_ = 0;
    }
    char chunk[8192];
    for (;;) {
        if (timeout_ && !sys::wait_fd(fd_, POLLIN, *timeout_)) throw TimeoutError("rfile: read timed out");
        ssize_t n = ::recv(fd_, chunk, sizeof chunk, 0);
        if (n < 0) {
            if (errno == EINTR) continue;
            if (errno == EAGAIN || errno == EWOULDBLOCK) {
                (void)sys::wait_fd(fd_, POLLIN, std::nullopt);
                continue;
            }
            if (errno == ECONNRESET) {
                eof_ = true;
                return false;
            }
            sys::throw_system_error(errno, "recv");
        }
        if (n == 0) {
            eof_ = true;
            return false;
        }
        buf_.append(chunk, static_cast<std::size_t>(n));
        return true;
    }
}

std::string InputFile::readline(std::size_t limit) {
    std::size_t scanned = pos_;
    for (;;) {
        const std::size_t nl = buf_.find('\n', scanned);
        const std::size_t avail = buf_.size() - pos_;
        if (nl != std::string::npos && nl - pos_ + 1 <= limit) {
            std::string line = buf_.substr(pos_, nl - pos_ + 1);
            pos_ = nl + 1;
            return line;
        }
        if (avail >= limit) {
            std::string line = buf_.substr(pos_, limit);
            pos_ += limit;
            return line;
        }
        const std::size_t before = pos_;
        scanned = buf_.size();
        if (!fill()) {
            std::string rest = buf_.substr(pos_);
            pos_ = buf_.size();
            return rest;
        }
        scanned -= before - pos_;  // fill() may have moved the unread bytes to the front
    }
}

std::string InputFile::read(std::size_t n) {
    while (buf_.size() - pos_ < n && fill()) {
    }
    const std::size_t take = std::min(n, buf_.size() - pos_);
    std::string out = buf_.substr(pos_, take);
    pos_ += take;
    return out;
}

std::string InputFile::read() {
    while (fill()) {
    }
    std::string out = buf_.substr(pos_);
    pos_ = buf_.size();
    return out;
}

void OutputFile::write(std::string_view bytes) {
    if (fd_ >= 0) {
        sys::write_full(fd_, bytes.data(), bytes.size());
    } else {
        buf_.append(bytes);
    }
}

// ---- handlers ----

void StreamRequestHandler::setup() {
    const int fd = request().fd();
    if (disable_nagle_algorithm) {
        int one = 1;
        (void)::setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    }
    rfile = InputFile(fd, timeout);
    wfile = OutputFile(fd);
}

void DatagramRequestHandler::setup() {
    rfile = InputFile(request().data);
    wfile = OutputFile();
}

void DatagramRequestHandler::finish() {
    const std::string& reply = wfile.getvalue();
    const ServerAddress& to = client_address();
    if (to == ServerAddress{}) return;  // an unbound Unix client cannot be answered
    SockAddr a = to_sockaddr(to);
    for (;;) {
        ssize_t n = ::sendto(request().fd(), reply.data(), reply.size(), MSG_NOSIGNAL, a.get(), a.len);
        if (n >= 0) return;
        if (errno != EINTR) sys::throw_system_error(errno, "sendto");
    }
}

// ---- BaseServer ----

BaseServer::BaseServer(ServerAddress address, HandlerFactory factory, Kind kind, ServerOptions options)
    : address_(std::move(address)), factory_(std::move(factory)), kind_(kind), options_(std::move(options)) {
    if (!factory_) throw std::invalid_argument("socketserver: no handler factory");
    if ((kind_.family == AddressFamily::unix_socket) != address_.is_unix()) {
        throw std::invalid_argument(kind_.family == AddressFamily::unix_socket
                                        ? "socketserver: a Unix server needs a path"
                                        : "socketserver: an inet server needs a host and port");
    }
    int family = AF_UNIX;
    if (!address_.is_unix()) family = address_.host.find(':') != std::string::npos ? AF_INET6 : AF_INET;
    const int type = kind_.socket == SocketKind::stream ? SOCK_STREAM : SOCK_DGRAM;
    sys::Fd sock(sys::check(::socket(family, type | SOCK_CLOEXEC, 0), "socket"));
    auto [r, w] = sys::make_pipe(O_NONBLOCK);
    sock_ = sock.release();
    wake_r_ = r.release();
    wake_w_ = w.release();
    if (options_.bind_and_activate) {
        try {
            server_bind();
            server_activate();
        } catch (...) {
            ::close(sock_);
            ::close(wake_r_);
            ::close(wake_w_);
            throw;
        }
    }
}

BaseServer::~BaseServer() {
    server_close();
    join_threads(true);
    if (retired_sock_ >= 0) ::close(retired_sock_);
    for (auto& c : children_) reap(c);
    children_.clear();
    stop_closer();
    for (auto& [id, fd] : connections_) ::close(fd);
    ::close(wake_r_);
    ::close(wake_w_);
}

void BaseServer::server_bind() {
    int one = 1;
    if (options_.allow_reuse_address) {
        sys::check(::setsockopt(sock_, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one), "setsockopt SO_REUSEADDR");
    }
    if (options_.allow_reuse_port) {
        sys::check(::setsockopt(sock_, SOL_SOCKET, SO_REUSEPORT, &one, sizeof one), "setsockopt SO_REUSEPORT");
    }
    SockAddr a = to_sockaddr(address_);
    sys::check(::bind(sock_, a.get(), a.len), "bind");
    SockAddr bound;
    bound.len = sizeof bound.storage;
    sys::check(::getsockname(sock_, bound.get(), &bound.len), "getsockname");
    ServerAddress real = from_sockaddr(bound.storage, bound.len);
    if (!address_.is_unix()) address_.port = real.port;  // keep the host as given
}

void BaseServer::server_activate() {
    if (kind_.socket == SocketKind::stream) sys::check(::listen(sock_, options_.request_queue_size), "listen");
}

void BaseServer::server_close() {
    const bool wait = options_.block_on_close &&
                      !(kind_.concurrency == Concurrency::threading && options_.daemon_threads);
    if (sock_ >= 0) {
        // A datagram handler replies through the server's socket (Request::fd): one still running
        // after this returns (server_close does not wait for it) must not find that number
        // taken by another socket of the program's. It is kept, on /dev/null (a reply then fails
        // with ENOTSOCK, as Python's fails with EBADF), until the destructor has joined them.
        int null = -1;
        if (kind_.socket == SocketKind::datagram && kind_.concurrency == Concurrency::threading && !wait &&
            retired_sock_ < 0)
            null = ::open("/dev/null", O_RDONLY | O_CLOEXEC);
        if (null >= 0 && ::dup3(null, sock_, O_CLOEXEC) >= 0) {
            retired_sock_ = sock_;
        } else {
            ::close(sock_);
        }
        if (null >= 0) ::close(null);
        sock_ = -1;
    }
    if (wait && kind_.concurrency != Concurrency::none) {
        // After a stop with a deadline, handlers past it have their connections closed.
        if (auto deadline = close_deadline()) {
            finish_handlers(deadline);
            return;
        }
    }
    if (kind_.concurrency == Concurrency::threading) {
        if (wait) join_threads(true);
    } else if (kind_.concurrency == Concurrency::forking) {
        collect_children(wait);
    }
}

bool BaseServer::begin_serving() {
    {
        std::lock_guard lock(mu_);
        if (shutdown_request_) {
            shutdown_request_ = false;
            return false;
        }
        serving_ = true;
        serving_pid_.store(sys::self_pid(), std::memory_order_relaxed);
    }
    stop_closer();  // a deadline from an earlier stop does not apply to this session
    return true;
}

void BaseServer::end_serving() noexcept {
    std::lock_guard lock(mu_);
    serving_ = false;
    serving_pid_.store(0, std::memory_order_relaxed);
    shutdown_request_ = false;
    (void)drain_wakeup();  // a handler's stop for the session that is ending: nothing left to stop
    cv_.notify_all();
}

bool BaseServer::shutdown_requested() {
    std::lock_guard lock(mu_);
    return shutdown_request_;
}

namespace {
// The byte a forked handler's shutdown() writes to the wake-up pipe; this process's own
// shutdown() writes kWakeUp after setting the flag.
constexpr char kWakeUp = 1;
constexpr char kStopFromChild = 2;
}  // namespace

bool BaseServer::drain_wakeup() noexcept {
    char buf[64];
    bool child_asked = false;
    for (ssize_t n; (n = ::read(wake_r_, buf, sizeof buf)) > 0;) {
        for (ssize_t i = 0; i < n; ++i) child_asked = child_asked || buf[i] == kStopFromChild;
    }
    return child_asked;
}

void BaseServer::take_wakeup() noexcept {
    if (drain_wakeup()) request_shutdown(options_.shutdown_timeout);
}

bool BaseServer::in_forked_handler() const noexcept {
    const pid_t serving = serving_pid_.load(std::memory_order_relaxed);
    return serving != 0 && serving != sys::self_pid();
}

void BaseServer::check_open() const {
    if (sock_ < 0) throw std::logic_error("socketserver: the server is closed (server_close was called)");
}

void BaseServer::serve_forever(detail::Timeout poll_interval) {
    check_open();
    if (!begin_serving()) return;
    try {
        std::vector<pollfd> fds;
        while (!shutdown_requested()) {
            fds.assign({{sock_, POLLIN, 0}, {wake_r_, POLLIN, 0}});
            // A forking server's children too: one that ends is reaped at once (service_actions),
            // which closes this process's duplicate of its connection, so its client sees the
            // end as the child goes (Python's parent closes its copy right after the fork), not
            // a poll_interval later.
            if (kind_.concurrency == Concurrency::forking)
                for (const Child& c : children_) fds.push_back({c.process->sentinel(), POLLIN, 0});
            int n = ::poll(fds.data(), fds.size(), sys::poll_timeout_ms(poll_interval));
            if (n < 0) {
                if (errno == EINTR) continue;
                sys::throw_system_error(errno, "poll");
            }
            if (n > 0 && fds[1].revents != 0) take_wakeup();
            if (shutdown_requested()) break;
            if (n > 0 && (fds[0].revents & (POLLIN | POLLERR | POLLHUP))) handle_request_noblock();
            service_actions();
        }
    } catch (...) {
        end_serving();
        throw;
    }
    end_serving();
}

void BaseServer::serve_forever(std::stop_token stop, detail::Timeout poll_interval) {
    {
        // Runs in the thread that requests the stop (a SignalStop's watcher, say): it only sets
        // the flag and arms the closer, and never waits.
        std::stop_callback on_stop(stop, [this] { request_shutdown(options_.shutdown_timeout); });
        serve_forever(poll_interval);
    }  // no callback runs past here
    if (stop.stop_requested() && options_.shutdown_timeout) finish_handlers(close_deadline());
}

void BaseServer::shutdown() {
    request_shutdown(options_.shutdown_timeout);
    if (in_forked_handler()) return;  // its copy of serving_ never changes
    std::unique_lock lock(mu_);
    cv_.wait(lock, [this] { return !serving_; });
}

void BaseServer::shutdown(detail::Timeout timeout) {
    request_shutdown(timeout);
    if (in_forked_handler()) return;  // see shutdown()
    {
        std::unique_lock lock(mu_);
        cv_.wait(lock, [this] { return !serving_; });
    }
    finish_handlers(close_deadline());
}

void BaseServer::request_shutdown(detail::Timeout timeout) noexcept {
    // The deadline before the request: serve_forever acts on the request as soon as it sees it
    // (a prefork server ends its workers by the deadline then), so the deadline must be set by
    // that time. Set after, a prefork stop could find none and wait for a busy worker for ever.
    if (in_forked_handler()) {
        // A forked handler: this copy's flag and deadline are nobody's. The serving process
        // reads the byte (take_wakeup) and stops as if its own shutdown() had been called.
        (void)!::write(wake_w_, &kStopFromChild, 1);
        return;
    }
    if (timeout) set_close_deadline(*timeout);
    std::lock_guard lock(mu_);
    shutdown_request_ = true;
    (void)!::write(wake_w_, &kWakeUp, 1);  // a full pipe already wakes serve_forever
}

void BaseServer::set_close_deadline(std::chrono::nanoseconds timeout) noexcept {
    // Never negative, and below detail::forever: now() + timeout cannot overflow.
    const auto at = Clock::now() + timeout;
    std::lock_guard lock(connections_mu_);
    if (close_at_ && *close_at_ <= at) return;  // an earlier deadline stands
    close_at_ = at;
    if (closer_.joinable()) {
        closer_cv_.notify_all();
        return;
    }
    try {
        closer_quit_ = false;
        closer_ = std::thread([this] { closer_main(); });
    } catch (...) {
        close_at_.reset();  // no thread to keep the deadline: requests are waited for instead
    }
}

std::optional<std::chrono::steady_clock::time_point> BaseServer::close_deadline() {
    std::lock_guard lock(connections_mu_);
    return close_at_;
}

void BaseServer::closer_main() {
    std::unique_lock lock(connections_mu_);
    while (!closer_quit_) {
        if (close_at_ && Clock::now() >= *close_at_) {
            closing_ = true;
            for (auto& [id, fd] : connections_) (void)::shutdown(fd, SHUT_RDWR);
            // From now on add_connection shuts new connections down itself.
            closer_cv_.wait(lock, [this] { return closer_quit_; });
            return;
        }
        if (close_at_)
            closer_cv_.wait_until(lock, *close_at_);
        else
            closer_cv_.wait(lock);
    }
}

void BaseServer::stop_closer() noexcept {
    std::thread t;
    {
        std::lock_guard lock(connections_mu_);
        closer_quit_ = true;
        t = std::move(closer_);
    }
    closer_cv_.notify_all();
    if (t.joinable()) t.join();
    std::lock_guard lock(connections_mu_);
    closer_quit_ = false;
    closing_ = false;
    close_at_.reset();
}

std::uint64_t BaseServer::add_connection(int fd) {
    if (kind_.socket != SocketKind::stream || fd < 0) return 0;
    const int copy = sys::check(::fcntl(fd, F_DUPFD_CLOEXEC, 0), "fcntl F_DUPFD_CLOEXEC");
    std::lock_guard lock(connections_mu_);
    if (closing_) (void)::shutdown(copy, SHUT_RDWR);  // accepted after the deadline
    try {
        connections_.emplace(next_connection_, copy);
    } catch (...) {
        ::close(copy);
        throw;
    }
    return next_connection_++;
}

void BaseServer::remove_connection(std::uint64_t id) noexcept {
    if (id == 0) return;
    std::lock_guard lock(connections_mu_);
    auto it = connections_.find(id);
    if (it == connections_.end()) return;
    ::close(it->second);
    connections_.erase(it);
}

void BaseServer::close_connections_in_child() noexcept {
    // The forked child's copies of the other requests' descriptors: closed, so that each
    // connection ends with its own handler. No lock: the child has one thread, and only the
    // parent's serving thread (this one, before fork) changes the map of a forking server.
    for (auto& [id, fd] : connections_) {
        ::close(fd);
        fd = -1;
    }
}

void BaseServer::reap(Child& c) {
    try {
        c.process->join();
    } catch (const ProcessError&) {
        // Its exit status was collected by someone else (the program ignores SIGCHLD, on a
        // kernel before Linux 6.15, which keeps none for mp): it has ended all the same. Python's
        // ForkingMixIn likewise takes the ChildProcessError and serves on.
    }
    remove_connection(std::exchange(c.connection, 0));
}

void BaseServer::finish_handlers(std::optional<Clock::time_point> deadline) {
    std::lock_guard guard(finish_mu_);
    // Threads blocked on their connections see end of file once the closer has shut them down.
    join_threads(true);
    // A child that outlives its closed connection by this much is killed.
    constexpr auto kill_grace = std::chrono::seconds(1);
    const Clock::time_point kill_at = deadline ? *deadline + kill_grace : Clock::time_point::max();
    for (;;) {
        std::erase_if(children_, [this](Child& c) {
            if (c.process->is_alive()) return false;
            reap(c);
            return true;
        });
        if (children_.empty()) break;
        if (Clock::now() >= kill_at) {
            for (auto& c : children_) {
                try {
                    c.process->kill();
                } catch (const std::exception&) {
                    // it ended meanwhile: join below reaps it
                }
                reap(c);
            }
            children_.clear();
            break;
        }
        std::vector<pollfd> fds;
        for (auto& c : children_) fds.push_back({c.process->sentinel(), POLLIN, 0});
        std::optional<std::chrono::nanoseconds> left;
        if (deadline) left = kill_at - Clock::now();
        if (::poll(fds.data(), fds.size(), sys::poll_timeout_ms(left)) < 0 && errno != EINTR)
            sys::throw_system_error(errno, "poll");
    }
    stop_closer();
}

void BaseServer::handle_request() {
    check_open();
    std::optional<Clock::time_point> deadline;
    if (options_.timeout) deadline = Clock::now() + *options_.timeout;
    for (;;) {
        std::optional<std::chrono::nanoseconds> left;
        if (deadline) left = *deadline - Clock::now();
        pollfd fd{sock_, POLLIN, 0};
        int n = ::poll(&fd, 1, sys::poll_timeout_ms(left));
        if (n < 0) {
            if (errno == EINTR) continue;
            sys::throw_system_error(errno, "poll");
        }
        if (n == 0) {
            if (deadline && Clock::now() < *deadline) continue;  // poll's rounding
            handle_timeout();
            return;
        }
        handle_request_noblock();
        return;
    }
}

bool BaseServer::get_request(Request& request, ServerAddress& client) {
    SockAddr peer;
    peer.len = sizeof peer.storage;
    if (kind_.socket == SocketKind::stream) {
        int fd = ::accept4(sock_, peer.get(), &peer.len, SOCK_CLOEXEC);
        if (fd < 0) return false;  // the client left, or another worker took it (EAGAIN)
        request.conn_.reset(fd);
    } else {
        request.data.resize(options_.max_packet_size);
        ssize_t n = ::recvfrom(sock_, request.data.data(), request.data.size(), MSG_DONTWAIT, peer.get(), &peer.len);
        if (n < 0) return false;
        request.data.resize(static_cast<std::size_t>(n));
        request.server_sock_ = sock_;
    }
    client = from_sockaddr(peer.storage, peer.len);
    return true;
}

void BaseServer::handle_request_noblock() {
    Request request;
    ServerAddress client;
    if (!get_request(request, client)) return;
    bool ok = false;
    try {
        ok = verify_request(request, client);
    } catch (...) {
        handle_error(request, client);
        shutdown_request(request);
        return;
    }
    if (!ok) {
        shutdown_request(request);
        return;
    }
    try {
        process_request(request, client);
    } catch (...) {
        handle_error(request, client);
        shutdown_request(request);
    }
}

bool BaseServer::verify_request(const Request&, const ServerAddress&) { return true; }

void BaseServer::handle_error(const Request&, const ServerAddress& client_address) {
    std::string what;
    try {
        throw;
    } catch (const std::exception& e) {
        what = demangle(typeid(e).name()) + ": " + e.what();
    } catch (...) {
        const std::type_info* t = abi::__cxa_current_exception_type();
        what = t != nullptr ? demangle(t->name()) : "unknown exception";
    }
    const std::string dashes(40, '-');
    std::fprintf(stderr, "%s\nException occurred during processing of request from %s\n%s\n%s\n",
                 dashes.c_str(), client_address.to_string().c_str(), what.c_str(), dashes.c_str());
    std::fflush(stderr);
}

void BaseServer::service_actions() {
    if (kind_.concurrency == Concurrency::forking) collect_children(false);
}

void BaseServer::finish_request(Request& request, const ServerAddress& client_address) {
    std::unique_ptr<BaseRequestHandler> h = factory_();
    h->request_ = &request;
    h->client_ = &client_address;
    h->server_ = this;
    h->setup();
    try {
        h->handle();
    } catch (...) {
        h->finish();
        throw;
    }
    h->finish();
}

void BaseServer::shutdown_request(Request& request) {
    if (kind_.socket == SocketKind::stream && request.conn_) {
        // Explicitly shut down: close alone may not send FIN while a forked copy holds the fd.
        (void)::shutdown(request.conn_.get(), SHUT_WR);
    }
    close_request(request);
}

void BaseServer::close_request(Request& request) { request.close(); }

void BaseServer::process_request(Request& request, const ServerAddress& client_address) {
    switch (kind_.concurrency) {
    case Concurrency::none: {
        struct Registered {
            BaseServer& server;
            std::uint64_t id;
            ~Registered() { server.remove_connection(id); }
        } registered{*this, add_connection(request.fd())};
        finish_request(request, client_address);
        shutdown_request(request);
        return;
    }
    case Concurrency::threading: {
        join_threads(false);  // forget the threads that ended (Python's _Threads.reap)
        auto done = std::make_shared<bool>(false);
        const std::uint64_t id = add_connection(request.fd());
        std::lock_guard lock(threads_mu_);
        try {
            threads_.push_back(HandlerThread{
                std::thread([this, done, id, req = std::move(request), client = client_address]() mutable {
                    try {
                        finish_request(req, client);
                    } catch (...) {
                        handle_error(req, client);
                    }
                    remove_connection(id);
                    shutdown_request(req);
                    std::lock_guard l(threads_mu_);
                    *done = true;
                }),
                done});
        } catch (...) {
            remove_connection(id);
            throw;
        }
        return;
    }
    case Concurrency::forking: {
        collect_children(false);
        if (children_.size() >= options_.max_children) {
            // Still at the limit: a stop came while waiting (collect_children). The request is
            // not served; the stop's deadline, if any, ends the children that hold the limit.
            shutdown_request(request);
            return;
        }
        const std::uint64_t id = add_connection(request.fd());
        auto child = std::make_unique<Process>(
            ProcessOptions{.start_method = StartMethod::fork}, [this, &request, &client_address] {
                // The child is a copy: the request and address still live on its copied stack.
                close_connections_in_child();
                try {
                    finish_request(request, client_address);
                } catch (...) {
                    handle_error(request, client_address);
                }
                shutdown_request(request);
            });
        try {
            child->start();
            children_.push_back(Child{std::move(child), id});
        } catch (...) {
            remove_connection(id);
            throw;
        }
        // The child has it; shutting it down here would end its connection. The connection's
        // entry (a duplicate) stays until the child is reaped, for a shutdown deadline.
        close_request(request);
        return;
    }
    }
}

void BaseServer::join_threads(bool all) {
    std::vector<std::thread> to_join;
    {
        std::lock_guard lock(threads_mu_);
        // A handler that calls shutdown(timeout) or server_close() runs in one of these threads:
        // it cannot join itself (std::thread::join would throw, and the moved-out thread then
        // end the program), so it stays listed for a later join and the others are waited for.
        const auto self = std::this_thread::get_id();
        auto it = std::partition(threads_.begin(), threads_.end(), [all, self](const HandlerThread& t) {
            return t.thread.get_id() == self || (!all && !*t.done);
        });
        for (auto j = it; j != threads_.end(); ++j) to_join.push_back(std::move(j->thread));
        threads_.erase(it, threads_.end());
    }
    for (auto& t : to_join) {
        if (t.joinable()) t.join();
    }
}

std::size_t BaseServer::active_children() const { return children_.size(); }

void BaseServer::collect_children(bool blocking) {
    if (blocking) {
        for (auto& c : children_) reap(c);
        children_.clear();
        return;
    }
    // At the limit, wait for any child to end before taking another request, or for a stop
    // (shutdown(), a stop token, a handler's shutdown()): then this returns still at the limit,
    // so that serve_forever can end and a stop's deadline kill the children that hold it.
    while (children_.size() >= options_.max_children && !children_.empty() && !shutdown_requested()) {
        std::vector<pollfd> fds;
        for (auto& c : children_) fds.push_back({c.process->sentinel(), POLLIN, 0});
        fds.push_back({wake_r_, POLLIN, 0});
        if (::poll(fds.data(), fds.size(), -1) < 0 && errno != EINTR) sys::throw_system_error(errno, "poll");
        if (fds.back().revents != 0) take_wakeup();
        std::erase_if(children_, [this](Child& c) {
            if (c.process->is_alive()) return false;
            reap(c);
            return true;
        });
    }
    std::erase_if(children_, [this](Child& c) {
        if (c.process->is_alive()) return false;
        reap(c);
        return true;
    });
}

}  // namespace mp
