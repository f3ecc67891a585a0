// mp::Listener and mp::Client (see connection.hpp); the handshake they run is handshake.cpp.

#include <arpa/inet.h>
#include <cerrno>
#include <cstddef>
#include <cstdlib>
#include <cstring>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <algorithm>
#include <poll.h>
#include <sys/epoll.h>
#include <sys/timerfd.h>
#include <stdexcept>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <system_error>
#include <unistd.h>

#include "handshake.hpp"
#include "mp/connection.hpp"
#include "mp/detail/deadline.hpp"
#include "sys/crypto.hpp"
#include "sys/error.hpp"
#include "sys/fd.hpp"

namespace mp {

// ---------------------------------------------------------------- addresses

namespace {

using detail::handshake::Clock;

// Built with append only: GCC 12 at -O3 sees a false -Wrestrict in `"x" + std::string`.
std::string Address_to_string(const Address& a) {
    std::string s;
    switch (a.family) {
    case Address::Family::tcp: {
        const bool v6 = a.host.find(':') != std::string::npos;
        if (v6) s += '[';
        s += a.host;
        if (v6) s += ']';
        s += ':';
        s += std::to_string(a.port);
        return s;
    }
    case Address::Family::unix_abstract:
        s += '@';
        s.append(a.path, 1);
        return s;
    case Address::Family::unix_path:
        break;
    }
    return a.path;
}

struct SockAddr {
    sockaddr_storage ss{};
    socklen_t len = 0;
    sockaddr* get() { return reinterpret_cast<sockaddr*>(&ss); }
};

SockAddr unix_sockaddr(const Address& a, const char* op) {
    SockAddr s;
    auto* un = reinterpret_cast<sockaddr_un*>(&s.ss);
    un->sun_family = AF_UNIX;
    const bool abstract = a.family == Address::Family::unix_abstract;
    // A path needs room for its terminating NUL; an abstract name is counted by the length.
    if (a.path.empty() || a.path.size() + (abstract ? 0 : 1) > sizeof un->sun_path)
        throw std::system_error(ENAMETOOLONG, std::system_category(),
                                std::string(op) + ": AF_UNIX path empty or too long");
    std::memcpy(un->sun_path, a.path.data(), a.path.size());
    s.len = static_cast<socklen_t>(offsetof(sockaddr_un, sun_path) + a.path.size() +
                                   (abstract ? 0 : 1));
    return s;
}

Address from_sockaddr(const sockaddr_storage& ss, socklen_t len) {
    if (ss.ss_family == AF_INET || ss.ss_family == AF_INET6) {
        char host[INET6_ADDRSTRLEN] = {};
        std::uint16_t port = 0;
        if (ss.ss_family == AF_INET) {
            const auto* in = reinterpret_cast<const sockaddr_in*>(&ss);
            ::inet_ntop(AF_INET, &in->sin_addr, host, sizeof host);
            port = ntohs(in->sin_port);
        } else {
            const auto* in6 = reinterpret_cast<const sockaddr_in6*>(&ss);
            ::inet_ntop(AF_INET6, &in6->sin6_addr, host, sizeof host);
            port = ntohs(in6->sin6_port);
        }
        return Address(std::string(host), port);
    }
    const auto* un = reinterpret_cast<const sockaddr_un*>(&ss);
    const std::size_t off = offsetof(sockaddr_un, sun_path);
    if (len <= off) return Address();  // unnamed
    std::size_t n = len - off;
    if (un->sun_path[0] == '\0') return Address(std::string(un->sun_path, n));
    return Address(std::string(un->sun_path, ::strnlen(un->sun_path, n)));
}

struct AddrInfo {
    addrinfo* list = nullptr;
    AddrInfo() = default;
    AddrInfo(const AddrInfo&) = delete;
    AddrInfo& operator=(const AddrInfo&) = delete;
    ~AddrInfo() {
        if (list) ::freeaddrinfo(list);
    }
};

void resolve(AddrInfo& out, const Address& a, bool passive) {
    addrinfo hints{};
    hints.ai_socktype = SOCK_STREAM;
    hints.ai_flags = AI_NUMERICSERV | (passive ? AI_PASSIVE : 0);
    // An empty host listens on every IPv4 interface, as Python's ('', port).
    hints.ai_family = a.host.empty() ? AF_INET : AF_UNSPEC;
    const std::string port = std::to_string(a.port);
    const int rc = ::getaddrinfo(a.host.empty() ? nullptr : a.host.c_str(), port.c_str(), &hints,
                                 &out.list);
    if (rc != 0)
        throw std::invalid_argument("mp: cannot resolve host '" + a.host +
                                    "': " + ::gai_strerror(rc));
}

void set_nodelay(int fd) {
    int one = 1;
    sys::check(::setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one),
               "setsockopt(TCP_NODELAY)");
}

// A blocking connect; an EINTR leaves the connection going on in the background, so wait for
// its outcome rather than calling connect again.
void connect_fd(int fd, const sockaddr* sa, socklen_t len) {
    if (::connect(fd, sa, len) == 0) return;
    if (errno != EINTR) sys::throw_system_error(errno, "connect");
    (void)sys::wait_fd(fd, POLLOUT, std::nullopt);
    int err = 0;
    socklen_t l = sizeof err;
    sys::check(::getsockopt(fd, SOL_SOCKET, SO_ERROR, &err, &l), "getsockopt(SO_ERROR)");
    if (err != 0) sys::throw_system_error(err, "connect");
}

std::string random_hex(std::size_t bytes) {
    const std::string r = sys::crypto::random_string(bytes);
    static const char digits[] = "0123456789abcdef";
    std::string s;
    for (char c : r) {
        const auto b = static_cast<unsigned char>(c);
        s += digits[b >> 4];
        s += digits[b & 15];
    }
    return s;
}

// Where a Listener without an address puts its socket: as Python's tempfile.gettempdir(), the
// first of $TMPDIR, $TEMP, $TMP, /tmp, /var/tmp, /usr/tmp that is a directory this process may
// create files in, and short enough for a socket's path (108 bytes with the name); else the
// working directory. (A $TMPDIR that did not exist failed every such Listener with "bind: No
// such file or directory", which Python's does not.)
std::string socket_directory() {
    constexpr std::size_t kName = sizeof("/mp-listener-") - 1 + 16;
    auto usable = [](const std::string& dir) {
        struct stat st {};
        return !dir.empty() && dir.size() + kName < sizeof(sockaddr_un{}.sun_path) &&
               ::stat(dir.c_str(), &st) == 0 && S_ISDIR(st.st_mode) && ::access(dir.c_str(), W_OK | X_OK) == 0;
    };
    for (const char* var : {"TMPDIR", "TEMP", "TMP"})
        if (const char* v = std::getenv(var); v != nullptr && usable(v)) return v;
    for (const char* dir : {"/tmp", "/var/tmp", "/usr/tmp"})
        if (usable(dir)) return dir;
    return ".";
}

Address arbitrary_unix_address() { return Address(socket_directory() + "/mp-listener-" + random_hex(8)); }

}  // namespace

std::string Address::to_string() const { return Address_to_string(*this); }

// ---------------------------------------------------------------- Listener

namespace detail {

// The handshakes in progress, all driven from one epoll set so that any number of peers
// proceed at once. Its members: the listening socket (level-triggered; left out during an
// out-of-descriptors back-off, else it would poll readable all along and a retrying loop would
// spin), a timerfd armed for the nearest handshake deadline or the end of the back-off, and
// each pending peer one-shot, so that of several threads in accept() exactly one takes each
// event (it re-arms the peer when done with it). Everything is guarded by `mu`, which is held
// only for work that never waits (the handshake steps are non-blocking), never across a wait.
struct ListenerState {
    static constexpr std::uint64_t kListenId = 0;
    static constexpr std::uint64_t kTimerId = 1;

    struct Peer {
        sys::Fd fd;
        Address address;
        std::unique_ptr<handshake::ServerHandshake> hs;
        Clock::time_point deadline;
    };

    std::mutex mu;
    std::string authkey;   // here, not in the Listener: a handshake keeps a view of it
    pid_t pid = 0;         // the process whose epoll set this is (a fork child makes its own)
    sys::Fd epoll, timer;
    bool listening = false;  // the listening socket is in the set
    // Ids only grow and every peer has the same timeout: begin() is the oldest, due first.
    std::map<std::uint64_t, Peer> peers;
    std::uint64_t next_id = 2;
    std::optional<Address> last_accepted;
    std::chrono::milliseconds backoff{0};
    Clock::time_point resume_at;
    std::optional<Clock::time_point> armed;  // when the timer fires, if it is set
};

}  // namespace detail

namespace {

using State = detail::ListenerState;
using Peers = std::map<std::uint64_t, State::Peer>;

void epoll_control(int ep, int op, int fd, std::uint32_t events, std::uint64_t id) {
    epoll_event ev{};
    ev.events = events;
    ev.data.u64 = id;
    sys::check(::epoll_ctl(ep, op, fd, &ev), "epoll_ctl");
}

// The state's epoll set for this process. A fork child that inherited a Listener must not share
// its parent's set (their one-shot events and timer would steal each other's): it drops its
// copies of the pending peers, which belong to the parent, and makes its own.
void own(State& st, int listen_fd) {
    const pid_t pid = ::getpid();
    if (st.pid == pid) return;
    st.peers.clear();
    st.epoll.reset(sys::check(::epoll_create1(EPOLL_CLOEXEC), "epoll_create1"));
    st.timer.reset(sys::check(::timerfd_create(CLOCK_MONOTONIC, TFD_NONBLOCK | TFD_CLOEXEC),
                              "timerfd_create"));
    epoll_control(st.epoll.get(), EPOLL_CTL_ADD, listen_fd, EPOLLIN, State::kListenId);
    epoll_control(st.epoll.get(), EPOLL_CTL_ADD, st.timer.get(), EPOLLIN, State::kTimerId);
    st.listening = true;
    st.backoff = std::chrono::milliseconds(0);
    st.armed.reset();
    st.pid = pid;
}

// Makes sure the timer fires by the oldest handshake's deadline and the end of the back-off
// (steady_clock is CLOCK_MONOTONIC). A timer already set for earlier is left alone: firing early
// costs one wake-up (on_timer sets it again), while setting it for every peer that comes and
// goes would cost a system call each.
void arm_timer(State& st) {
    std::optional<Clock::time_point> when;
    if (!st.peers.empty()) when = st.peers.begin()->second.deadline;
    if (!st.listening) when = when ? std::min(*when, st.resume_at) : st.resume_at;
    if (!when || (st.armed && *st.armed <= *when)) return;
    const auto ns = std::max<std::int64_t>(
        1, std::chrono::duration_cast<std::chrono::nanoseconds>(when->time_since_epoch()).count());
    itimerspec its{};
    its.it_value.tv_sec = static_cast<time_t>(ns / 1'000'000'000);
    its.it_value.tv_nsec = static_cast<long>(ns % 1'000'000'000);
    sys::check(::timerfd_settime(st.timer.get(), TFD_TIMER_ABSTIME, &its, nullptr),
               "timerfd_settime");
    st.armed = when;
}

// Takes a peer out of the set (explicitly: a fork child may still hold a copy of its socket,
// which would keep the registration alive past our close).
Peers::iterator drop(State& st, Peers::iterator it) {
    (void)::epoll_ctl(st.epoll.get(), EPOLL_CTL_DEL, it->second.fd.get(), nullptr);
    return st.peers.erase(it);
}

// Runs on the timer: ends the back-off when due, drops the peers past their deadline. Returns
// how many it dropped.
std::size_t on_timer(State& st, int listen_fd) {
    std::uint64_t ticks;
    (void)!::read(st.timer.get(), &ticks, sizeof ticks);
    st.armed.reset();
    const auto now = Clock::now();
    if (!st.listening && now >= st.resume_at) {
        epoll_control(st.epoll.get(), EPOLL_CTL_ADD, listen_fd, EPOLLIN, State::kListenId);
        st.listening = true;
    }
    std::size_t expired = 0;
    for (auto it = st.peers.begin(); it != st.peers.end() && it->second.deadline <= now;) {
        it = drop(st, it);
        ++expired;
    }
    arm_timer(st);
    return expired;
}

// Out of descriptors (or memory) for a new connection: retrying at once would fail again and
// spin, so leave the backlog alone for a while, longer while it lasts.
void back_off(State& st, int listen_fd) {
    using std::chrono::milliseconds;
    st.backoff = std::clamp(st.backoff * 2, milliseconds(10), milliseconds(1000));
    st.resume_at = Clock::now() + st.backoff;
    if (st.listening) {
        (void)::epoll_ctl(st.epoll.get(), EPOLL_CTL_DEL, listen_fd, nullptr);
        st.listening = false;
    }
    arm_timer(st);
}

bool out_of_resources(int err) {
    return err == EMFILE || err == ENFILE || err == ENOBUFS || err == ENOMEM;
}

// Errors accept(2) passes on from a connection that failed before we took it: the next one is
// fine (the man page: treat them as EAGAIN).
bool peer_gone_before_accept(int err) {
    return err == ECONNABORTED || err == EPROTO || err == ENETDOWN || err == ENOPROTOOPT ||
           err == EHOSTDOWN || err == ENONET || err == EHOSTUNREACH || err == EOPNOTSUPP ||
           err == ENETUNREACH;
}

// The handshake's deadline: mp's one saturating timeout conversion (detail/deadline.hpp), with
// "no limit" (a timeout of milliseconds::max()) as the farthest time point.
Clock::time_point handshake_deadline(std::chrono::milliseconds timeout) {
    return detail::deadline_after(timeout).value_or(Clock::time_point::max());
}

}  // namespace

Listener::Listener() : Listener(arbitrary_unix_address()) {}

Listener::Listener(const Address& address, ListenerOptions options)
    : address_(address), options_(std::move(options)), creator_pid_(::getpid()) {
    sys::Fd fd;
    // Non-blocking: several threads (or processes) may be woken for one connection, and those
    // that lose the race must not block in accept4.
    constexpr int kType = SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK;
    if (address.is_tcp()) {
        AddrInfo ai;
        resolve(ai, address, true);
        std::system_error last(EADDRNOTAVAIL, std::system_category(), "bind");
        for (addrinfo* p = ai.list; p != nullptr; p = p->ai_next) {
            sys::Fd s(::socket(p->ai_family, kType, 0));
            if (!s) {
                last = std::system_error(errno, std::system_category(), "socket");
                continue;
            }
            int one = 1;
            sys::check(::setsockopt(s.get(), SOL_SOCKET, SO_REUSEADDR, &one, sizeof one),
                       "setsockopt(SO_REUSEADDR)");
            if (::bind(s.get(), p->ai_addr, p->ai_addrlen) != 0) {
                last = std::system_error(errno, std::system_category(), "bind");
                continue;
            }
            fd = std::move(s);
            break;
        }
        if (!fd) throw last;
    } else {
        SockAddr sa = unix_sockaddr(address, "bind");
        fd.reset(sys::check(::socket(AF_UNIX, kType, 0), "socket"));
        sys::check(::bind(fd.get(), sa.get(), sa.len), "bind");
    }
    const auto unlink_path = [&] {
        if (address.family == Address::Family::unix_path) ::unlink(address.path.c_str());
    };
    if (::listen(fd.get(), options_.backlog) != 0) {
        const int err = errno;
        unlink_path();
        sys::throw_system_error(err, "listen");
    }
    if (address.is_tcp()) {
        SockAddr sa;
        sa.len = sizeof sa.ss;
        sys::check(::getsockname(fd.get(), sa.get(), &sa.len), "getsockname");
        address_ = from_sockaddr(sa.ss, sa.len);
    }
    try {
        state_ = std::make_unique<detail::ListenerState>();
        if (options_.authkey) state_->authkey = *options_.authkey;
        own(*state_, fd.get());
    } catch (...) {
        unlink_path();
        throw;
    }
    fd_ = std::move(fd);
}

Listener::Listener(Listener&& o) noexcept
    : fd_(std::move(o.fd_)),
      address_(std::move(o.address_)),
      options_(std::move(o.options_)),
      creator_pid_(o.creator_pid_),
      state_(std::move(o.state_)) {}

Listener& Listener::operator=(Listener&& o) noexcept {
    if (this != &o) {
        close();
        fd_ = std::move(o.fd_);
        address_ = std::move(o.address_);
        options_ = std::move(o.options_);
        creator_pid_ = o.creator_pid_;
        state_ = std::move(o.state_);
    }
    return *this;
}

Listener::~Listener() { close(); }

void Listener::close() noexcept {
    if (!fd_) return;
    if (state_) {
        std::lock_guard lk(state_->mu);
        state_->peers.clear();
        state_->epoll.reset();
        state_->timer.reset();
        state_->pid = 0;
    }
    fd_.reset();
    if (address_.family == Address::Family::unix_path && ::getpid() == creator_pid_)
        ::unlink(address_.path.c_str());
}

bool Listener::closed() const noexcept { return !fd_; }

std::optional<Address> Listener::last_accepted() const {
    if (!state_) return std::nullopt;
    std::lock_guard lk(state_->mu);
    return state_->last_accepted;
}

int Listener::fileno() const {
    if (!fd_)
        throw std::system_error(std::make_error_code(std::errc::bad_file_descriptor),
                                "mp::Listener::fileno: listener is closed");
    std::lock_guard lk(state_->mu);
    own(*state_, fd_.get());
    return state_->epoll.get();
}

Connection Listener::accept() { return *accept_impl(-1); }

std::optional<Connection> detail::accept_or_stop(Listener& listener, int stop_fd) {
    return listener.accept_impl(stop_fd);
}

std::optional<Connection> Listener::accept_impl(int stop_fd) {
    if (!fd_)
        throw std::system_error(std::make_error_code(std::errc::bad_file_descriptor),
                                "mp::Listener::accept: listener is closed");
    State& st = *state_;
    const bool unix_family = !address_.is_tcp();
    for (;;) {
        int ep;
        {
            std::lock_guard lk(st.mu);
            own(st, fd_.get());
            ep = st.epoll.get();
        }
        if (stop_fd >= 0) {
            pollfd p[2] = {{ep, POLLIN, 0}, {stop_fd, POLLIN, 0}};
            if (::poll(p, 2, -1) < 0) {
                if (errno == EINTR) continue;
                sys::throw_system_error(errno, "poll");
            }
            if (p[1].revents != 0) return std::nullopt;
        }
        // One event per wait: a one-shot event taken but not handled would leave its peer
        // disarmed until its deadline.
        epoll_event ev{};
        const int n = ::epoll_wait(ep, &ev, 1, stop_fd >= 0 ? 0 : -1);
        if (n < 0) {
            if (errno == EINTR) continue;
            sys::throw_system_error(errno, "epoll_wait");
        }
        if (n == 0) continue;

        std::lock_guard lk(st.mu);
        const std::uint64_t id = ev.data.u64;
        if (id == State::kTimerId) {
            if (on_timer(st, fd_.get()) > 0) throw AuthenticationError("handshake timed out");
            continue;
        }
        if (id == State::kListenId) {
            SockAddr peer;
            peer.len = sizeof peer.ss;
            const int r = ::accept4(fd_.get(), peer.get(), &peer.len, SOCK_CLOEXEC);
            if (r < 0) {
                const int err = errno;
                // EAGAIN: another thread (or process) took it.
                if (err == EAGAIN || err == EWOULDBLOCK || err == EINTR ||
                    peer_gone_before_accept(err))
                    continue;
                if (out_of_resources(err)) back_off(st, fd_.get());
                sys::throw_system_error(err, "accept4");
            }
            st.backoff = std::chrono::milliseconds(0);
            sys::Fd c(r);
            // Best effort: it fails only for a peer already gone, which the handshake or the
            // first read reports.
            if (address_.is_tcp()) {
                int one = 1;
                (void)::setsockopt(c.get(), IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
            }
            Address from = from_sockaddr(peer.ss, peer.len);
            if (!options_.authkey) {
                st.last_accepted = std::move(from);
                return Connection(detail::KnownSocket{unix_family}, c.release());
            }
            // Sends our challenge (AuthenticationError when the peer is already gone).
            auto hs = std::make_unique<detail::handshake::ServerHandshake>(c.get(), st.authkey);
            bool evicted = false;
            if (st.peers.size() >= std::max<std::size_t>(options_.max_pending_handshakes, 1)) {
                drop(st, st.peers.begin());
                evicted = true;
            }
            const std::uint64_t pid = st.next_id++;
            epoll_control(ep, EPOLL_CTL_ADD, c.get(), EPOLLIN | EPOLLONESHOT, pid);
            st.peers.emplace(pid, State::Peer{std::move(c), std::move(from), std::move(hs),
                                              handshake_deadline(options_.handshake_timeout)});
            arm_timer(st);
            if (evicted) throw AuthenticationError("too many pending handshakes");
            continue;
        }
        auto it = st.peers.find(id);
        if (it == st.peers.end()) continue;  // dropped after its event fired
        bool done = false;
        try {
            done = it->second.hs->advance();
        } catch (...) {
            drop(st, it);
            arm_timer(st);
            throw;
        }
        if (!done) {
            epoll_control(ep, EPOLL_CTL_MOD, it->second.fd.get(), EPOLLIN | EPOLLONESHOT, id);
            continue;
        }
        sys::Fd c = std::move(it->second.fd);
        (void)::epoll_ctl(ep, EPOLL_CTL_DEL, c.get(), nullptr);
        st.last_accepted = std::move(it->second.address);
        st.peers.erase(it);
        arm_timer(st);
        return Connection(detail::KnownSocket{unix_family}, c.release());
    }
}

// ---------------------------------------------------------------- Client

Connection Client(const Address& address, ClientOptions options) {
    sys::Fd fd;
    if (address.is_tcp()) {
        AddrInfo ai;
        resolve(ai, address, false);
        std::system_error last(EADDRNOTAVAIL, std::system_category(), "connect");
        for (addrinfo* p = ai.list; p != nullptr; p = p->ai_next) {
            sys::Fd s(::socket(p->ai_family, SOCK_STREAM | SOCK_CLOEXEC, 0));
            if (!s) {
                last = std::system_error(errno, std::system_category(), "socket");
                continue;
            }
            try {
                connect_fd(s.get(), p->ai_addr, p->ai_addrlen);
            } catch (const std::system_error& e) {
                last = e;
                continue;
            }
            fd = std::move(s);
            break;
        }
        if (!fd) throw last;
        set_nodelay(fd.get());
    } else {
        SockAddr sa = unix_sockaddr(address, "connect");
        fd.reset(sys::check(::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0), "socket"));
        connect_fd(fd.get(), sa.get(), sa.len);
    }
    if (options.authkey)
        detail::handshake::client_handshake(fd.get(), *options.authkey,
                                            handshake_deadline(options.handshake_timeout));
    return Connection(detail::KnownSocket{!address.is_tcp()}, fd.release());
}

}  // namespace mp
