// socketserver: the servers, the request handlers and their rfile/wfile.

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
#include "sys/error.hpp"
#include "sys/fd.hpp"

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

int poll_ms(std::optional<std::chrono::nanoseconds> t) {
    if (!t) return -1;
    if (*t <= std::chrono::nanoseconds::zero()) return 0;
    auto ms = std::chrono::ceil<std::chrono::milliseconds>(*t).count();
    return static_cast<int>(std::min<long long>(ms, 1'000'000'000));
}

std::string demangle(const char* name) {
    int status = 0;
    char* d = abi::__cxa_demangle(name, nullptr, nullptr, &status);
    std::string out = (status == 0 && d != nullptr) ? d : name;
    std::free(d);
    return out;
}

}  // namespace

// ---- Request ----

Request& Request::operator=(Request&& o) noexcept {
    if (this != &o) {
        close();
        data = std::move(o.data);
        fd_ = std::exchange(o.fd_, -1);
        owned_ = std::exchange(o.owned_, false);
    }
    return *this;
}

void Request::close() noexcept {
    if (owned_ && fd_ >= 0) ::close(fd_);
    fd_ = -1;
    owned_ = false;
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
    if (sock_ >= 0) {
        ::close(sock_);
        sock_ = -1;
    }
    const bool wait = options_.block_on_close &&
                      !(kind_.concurrency == Concurrency::threading && options_.daemon_threads);
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
    }
    stop_closer();  // a deadline from an earlier stop does not apply to this session
    return true;
}

void BaseServer::end_serving() noexcept {
    std::lock_guard lock(mu_);
    serving_ = false;
    shutdown_request_ = false;
    drain_wakeup();
    cv_.notify_all();
}

bool BaseServer::shutdown_requested() {
    std::lock_guard lock(mu_);
    return shutdown_request_;
}

void BaseServer::drain_wakeup() noexcept {
    char buf[64];
    while (::read(wake_r_, buf, sizeof buf) > 0) {
    }
}

void BaseServer::check_open() const {
    if (sock_ < 0) throw std::logic_error("socketserver: the server is closed (server_close was called)");
}

void BaseServer::serve_forever(std::chrono::nanoseconds poll_interval) {
    check_open();
    if (!begin_serving()) return;
    try {
        while (!shutdown_requested()) {
            pollfd fds[2] = {{sock_, POLLIN, 0}, {wake_r_, POLLIN, 0}};
            int n = ::poll(fds, 2, poll_ms(poll_interval));
            if (n < 0) {
                if (errno == EINTR) continue;
                sys::throw_system_error(errno, "poll");
            }
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

void BaseServer::serve_forever(std::stop_token stop, std::chrono::nanoseconds poll_interval) {
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
    std::unique_lock lock(mu_);
    cv_.wait(lock, [this] { return !serving_; });
}

void BaseServer::shutdown(std::chrono::nanoseconds timeout) {
    request_shutdown(timeout);
    {
        std::unique_lock lock(mu_);
        cv_.wait(lock, [this] { return !serving_; });
    }
    finish_handlers(close_deadline());
}

void BaseServer::request_shutdown(std::optional<std::chrono::nanoseconds> timeout) noexcept {
    {
        std::lock_guard lock(mu_);
        shutdown_request_ = true;
        const char b = 1;
        (void)!::write(wake_w_, &b, 1);  // a full pipe already wakes serve_forever
    }
    if (!timeout) return;
    // A century is "never" and keeps now() + timeout from overflowing.
    const auto limit = std::chrono::hours(24 * 365 * 100);
    const auto at = Clock::now() + std::min<std::chrono::nanoseconds>(std::max(*timeout, {}), limit);
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
    c.process->join();
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
        if (::poll(fds.data(), fds.size(), poll_ms(left)) < 0 && errno != EINTR)
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
        int n = ::poll(&fd, 1, poll_ms(left));
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
        request.fd_ = fd;
        request.owned_ = true;
    } else {
        request.data.resize(options_.max_packet_size);
        ssize_t n = ::recvfrom(sock_, request.data.data(), request.data.size(), MSG_DONTWAIT, peer.get(), &peer.len);
        if (n < 0) return false;
        request.data.resize(static_cast<std::size_t>(n));
        request.fd_ = sock_;
        request.owned_ = false;
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
    if (kind_.socket == SocketKind::stream && request.fd_ >= 0 && request.owned_) {
        // Explicitly shut down: close alone may not send FIN while a forked copy holds the fd.
        (void)::shutdown(request.fd_, SHUT_WR);
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
        auto it = std::partition(threads_.begin(), threads_.end(),
                                 [all](const HandlerThread& t) { return !all && !*t.done; });
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
    // At the limit, wait for any child to end before taking another request.
    while (children_.size() >= options_.max_children && !children_.empty()) {
        std::vector<pollfd> fds;
        for (auto& c : children_) fds.push_back({c.process->sentinel(), POLLIN, 0});
        if (::poll(fds.data(), fds.size(), -1) < 0 && errno != EINTR) sys::throw_system_error(errno, "poll");
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

// ---- PreforkTCPServer ----

PreforkTCPServer::PreforkTCPServer(ServerAddress address, HandlerFactory factory, ServerOptions options)
    : BaseServer(std::move(address), std::move(factory),
                 Kind{SocketKind::stream, AddressFamily::inet, Concurrency::none}, std::move(options)) {
    if (BaseServer::options().workers == 0) throw std::invalid_argument("PreforkTCPServer: workers must be > 0");
}

PreforkTCPServer::~PreforkTCPServer() = default;

std::unique_ptr<Process> PreforkTCPServer::start_worker(int stop_fd) {
    auto w = std::make_unique<Process>(
        ProcessOptions{.name = "prefork-worker", .daemon = true, .start_method = StartMethod::fork},
        [this, stop_fd] {
            for (;;) {
                pollfd fds[2] = {{fileno(), POLLIN, 0}, {stop_fd, POLLIN, 0}};
                if (::poll(fds, 2, -1) < 0) {
                    if (errno == EINTR) continue;
                    return;
                }
                // Between requests only: a request under way is always finished first.
                if (fds[1].revents != 0) return;
                if (fds[0].revents != 0) handle_request_noblock();
            }
        });
    w->start();
    ++started_;
    return w;
}

void PreforkTCPServer::serve_forever(std::chrono::nanoseconds poll_interval) {
    check_open();
    if (!begin_serving()) return;
    // Every worker polls the one socket: the ones that lose the race to accept see EAGAIN.
    const int flags = ::fcntl(fileno(), F_GETFL);
    if (flags >= 0) (void)::fcntl(fileno(), F_SETFL, flags | O_NONBLOCK);
    // Named references, not a structured binding: clang 14 cannot capture a binding in a lambda.
    auto stop_pipe = sys::make_pipe();
    sys::Fd& stop_r = stop_pipe.first;
    sys::Fd& stop_w = stop_pipe.second;
    auto stop_workers = [&, this] {
        const char b = 1;
        (void)!::write(stop_w.get(), &b, 1);  // stays unread: every worker sees it
        std::vector<std::unique_ptr<Process>> ws;
        {
            std::lock_guard lock(workers_mu_);
            ws.swap(workers_);
        }
        // Past a stop's deadline, a worker still busy with a request is terminated.
        const auto deadline = close_deadline();
        for (auto& w : ws) {
            if (deadline) {
                const auto left = *deadline - Clock::now();
                if (!w->join(std::max(left, Clock::duration::zero()))) {
                    try {
                        w->terminate();
                    } catch (const std::exception&) {
                        // it ended meanwhile
                    }
                }
            }
            w->join();
        }
    };
    try {
        {
            std::lock_guard lock(workers_mu_);
            for (std::size_t i = 0; i < options().workers; ++i) workers_.push_back(start_worker(stop_r.get()));
        }
        while (!shutdown_requested()) {
            std::vector<pollfd> fds{{wakeup_fd(), POLLIN, 0}};
            {
                std::lock_guard lock(workers_mu_);
                for (auto& w : workers_) fds.push_back({w->sentinel(), POLLIN, 0});
            }
            int n = ::poll(fds.data(), fds.size(), poll_ms(poll_interval));
            if (n < 0 && errno != EINTR) sys::throw_system_error(errno, "poll");
            if (shutdown_requested()) break;
            {
                std::lock_guard lock(workers_mu_);
                for (auto& w : workers_) {
                    if (w->is_alive()) continue;
                    w->join();
                    w = start_worker(stop_r.get());  // a crashed or killed worker is replaced
                }
            }
            service_actions();
        }
    } catch (...) {
        stop_workers();
        end_serving();
        throw;
    }
    stop_workers();
    end_serving();
}

std::vector<pid_t> PreforkTCPServer::worker_pids() const {
    std::lock_guard lock(workers_mu_);
    std::vector<pid_t> pids;
    for (auto& w : workers_) pids.push_back(w->pid());
    return pids;
}

std::size_t PreforkTCPServer::workers_started() const {
    std::lock_guard lock(workers_mu_);
    return started_;
}

// ---- SignalStop ----

namespace {

// What the signal handler may read: the self-pipe's write end and the process that owns it.
std::atomic<int> signal_pipe{-1};
std::atomic<pid_t> signal_owner{0};
std::atomic<bool> signal_stop_live{false};

extern "C" void on_stop_signal(int sig) {
    const int saved = errno;
    const int fd = signal_pipe.load(std::memory_order_relaxed);
    if (fd < 0 || ::getpid() != signal_owner.load(std::memory_order_relaxed)) {
        // A forked child (nobody reads the pipe there), or a signal that raced the destructor:
        // act as if the handler had never been installed.
        struct sigaction dfl {};
        dfl.sa_handler = SIG_DFL;
        sigemptyset(&dfl.sa_mask);
        (void)::sigaction(sig, &dfl, nullptr);
        (void)::raise(sig);  // delivered when this handler returns
    } else {
        const auto b = static_cast<unsigned char>(sig);
        (void)!::write(fd, &b, 1);  // non-blocking: a full pipe has a stop pending already
    }
    errno = saved;
}

}  // namespace

SignalStop::SignalStop(std::initializer_list<int> signals) : signals_(signals) {
    for (int sig : signals_) {
        if (sig <= 0 || sig >= NSIG || sig > 255)
            throw std::invalid_argument("mp::SignalStop: not a signal number: " + std::to_string(sig));
    }
    if (signal_stop_live.exchange(true))
        throw Error("mp::SignalStop: another SignalStop is live in this process");
    try {
        auto [r, w] = sys::make_pipe();
        const int flags = sys::check(::fcntl(w.get(), F_GETFL), "fcntl F_GETFL");
        sys::check(::fcntl(w.get(), F_SETFL, flags | O_NONBLOCK), "fcntl F_SETFL");
        pipe_r_ = r.release();
        pipe_w_ = w.release();
        watcher_ = std::thread([this] { watch(); });
        signal_owner.store(::getpid());
        signal_pipe.store(pipe_w_);
        for (int sig : signals_) {
            struct sigaction sa {};
            sa.sa_handler = on_stop_signal;
            sigemptyset(&sa.sa_mask);
            sa.sa_flags = SA_RESTART;
            struct sigaction old {};
            sys::check(::sigaction(sig, &sa, &old), "sigaction");
            previous_.push_back(old);
        }
    } catch (...) {
        restore();
        signal_pipe.store(-1);
        if (watcher_.joinable()) {
            const unsigned char quit = 0;
            (void)!::write(pipe_w_, &quit, 1);
            watcher_.join();
        }
        if (pipe_r_ >= 0) ::close(pipe_r_);
        if (pipe_w_ >= 0) ::close(pipe_w_);
        signal_stop_live.store(false);
        throw;
    }
}

SignalStop::~SignalStop() {
    restore();
    signal_pipe.store(-1);
    const unsigned char quit = 0;
    (void)!::write(pipe_w_, &quit, 1);
    watcher_.join();
    ::close(pipe_r_);
    ::close(pipe_w_);
    signal_stop_live.store(false);
}

void SignalStop::watch() noexcept {
    for (;;) {
        unsigned char b = 0;
        const ssize_t n = ::read(pipe_r_, &b, 1);
        if (n < 0 && errno == EINTR) continue;
        if (n <= 0 || b == 0) return;
        if (signal_.load() != 0) continue;
        signal_.store(b);
        restore();  // a second signal acts as it did before
        source_.request_stop();
    }
}

void SignalStop::restore() noexcept {
    std::lock_guard lock(restore_mu_);
    if (restored_) return;
    restored_ = true;
    for (std::size_t i = 0; i < previous_.size(); ++i) (void)::sigaction(signals_[i], &previous_[i], nullptr);
}

}  // namespace mp
