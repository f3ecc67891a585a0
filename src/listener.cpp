// mp::Listener, mp::Client and the authkey handshake (see connection.hpp and handshake.hpp).

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

// ---------------------------------------------------------------- the handshake

namespace detail::handshake {
namespace {

constexpr std::string_view kChallenge = "#CHALLENGE#";
constexpr std::string_view kWelcome = "#WELCOME#";
constexpr std::string_view kFailure = "#FAILURE#";
// Python 3.12: challenges of this length (and 16-byte answers) are the legacy HMAC-MD5 form.
constexpr std::size_t kMd5OnlyMessageLength = 20;
constexpr std::size_t kMd5DigestLength = 16;
constexpr std::size_t kMaxDigestNameLength = 8;  // "sha3_256"

// recv with the handshake's deadline: try first, wait only when nothing is there yet.
void read_exact(int fd, char* buf, std::size_t n, Clock::time_point deadline) {
    while (n > 0) {
        ssize_t r = ::recv(fd, buf, n, MSG_DONTWAIT);
        if (r > 0) {
            buf += r;
            n -= static_cast<std::size_t>(r);
            continue;
        }
        if (r == 0) throw AuthenticationError("connection closed during the handshake");
        if (errno == EINTR) continue;
        if (errno != EAGAIN && errno != EWOULDBLOCK) sys::throw_system_error(errno, "recv");
        const auto left = deadline - Clock::now();
        if (left <= Clock::duration::zero() ||
            !sys::wait_fd(fd, POLLIN, std::chrono::duration_cast<std::chrono::nanoseconds>(left)))
            throw AuthenticationError("handshake timed out");
    }
}

std::size_t frame_length(const unsigned char* header) {
    const std::int32_t n = static_cast<std::int32_t>(
        (std::uint32_t{header[0]} << 24) | (std::uint32_t{header[1]} << 16) |
        (std::uint32_t{header[2]} << 8) | std::uint32_t{header[3]});
    // -1 announces a 64-bit length, always beyond 256 for a sender that means it.
    if (n < 0 || static_cast<std::size_t>(n) > kMaxMessage)
        throw AuthenticationError("bad message length in the handshake");
    return static_cast<std::size_t>(n);
}

void put_frame(std::string& out, std::string_view body) {
    const auto n = static_cast<std::uint32_t>(body.size());
    out += static_cast<char>(n >> 24);
    out += static_cast<char>(n >> 16);
    out += static_cast<char>(n >> 8);
    out += static_cast<char>(n);
    out += body;
}

// Two frames in one write: one segment on the wire, one wake-up of the peer.
void write_messages(int fd, std::string_view a, std::string_view b) {
    std::string out;
    out.reserve(8 + a.size() + b.size());
    put_frame(out, a);
    put_frame(out, b);
    sys::write_full(fd, out.data(), out.size());
}

// A fresh challenge body in Python 3.12's form: {sha256} and 40 random bytes.
std::string make_challenge() {
    return "{sha256}" + sys::crypto::random_string(kChallengeLength);
}

// The answer to the peer's #CHALLENGE# message (Python's answer_challenge checks).
std::string answer_for(std::string_view authkey, std::string_view challenge) {
    if (!challenge.starts_with(kChallenge))
        throw AuthenticationError("Protocol error, expected challenge");
    const std::string_view message = challenge.substr(kChallenge.size());
    if (message.size() < kMd5OnlyMessageLength)
        throw AuthenticationError("challenge too short: " + std::to_string(message.size()) +
                                  " bytes");
    return create_response(authkey, message);
}

// The peer's failure, as the handshake reports it: a reset or a broken pipe in the middle of a
// handshake is one more way for a peer not to authenticate, not an error of ours.
[[noreturn]] void peer_failed(int err) {
    throw AuthenticationError("connection failed during the handshake (" +
                              std::system_category().message(err) + ")");
}

// Sends handshake bytes without waiting. A handshake sends a few hundred bytes in all, far less
// than any socket's send buffer, so a send that would block means a peer that does not read.
void send_now(int fd, std::string_view bytes) {
    for (;;) {
        const ssize_t r = ::send(fd, bytes.data(), bytes.size(), MSG_DONTWAIT | MSG_NOSIGNAL);
        if (r == static_cast<ssize_t>(bytes.size())) return;
        if (r < 0 && errno == EINTR) continue;
        if (r >= 0 || errno == EAGAIN || errno == EWOULDBLOCK)
            throw AuthenticationError("the peer does not read the handshake");
        peer_failed(errno);
    }
}

std::string framed(std::string_view body) {
    std::string out;
    put_frame(out, body);
    return out;
}

// Checks the peer's answer to our challenge; tells it #FAILURE# (if it still listens) when wrong.
void check_answer(int fd, std::string_view authkey, std::string_view message,
                  std::string_view response) {
    try {
        verify_challenge(authkey, message, response);
    } catch (const AuthenticationError&) {
        try {
            send_now(fd, framed(kFailure));
        } catch (const AuthenticationError&) {
            // The peer went away; it learns of its failure by the closed connection.
        }
        throw;
    }
}

// The Client's messages, read with as few system calls as the protocol allows: each wait is one
// poll (the server always has to send first, so trying the socket before waiting would only
// fail), and a read takes whatever has arrived, so that frames sent in one write come in one
// recv. The server sends nothing after its answer until it has our #WELCOME#, so the Client
// never reads past the handshake.
class MessageReader {
public:
    MessageReader(int fd, Clock::time_point deadline) : fd_(fd), deadline_(deadline) {}

    /// The next message.
    std::string next() {
        if (end_ - begin_ < 4) fill(4);
        const std::size_t n = body_length();
        fill(4 + n);
        std::string body(buf_ + begin_ + 4, n);
        begin_ += 4 + n;
        return body;
    }

    /// After the last message: the peer must not have sent anything more yet.
    void expect_drained() const {
        if (begin_ != end_) throw AuthenticationError("unexpected data in the handshake");
    }

private:
    std::size_t body_length() const {
        return frame_length(reinterpret_cast<const unsigned char*>(buf_ + begin_));
    }

    // Until `need` bytes from begin_ are buffered; waits before each read.
    void fill(std::size_t need) {
        if (begin_ != 0) {
            std::memmove(buf_, buf_ + begin_, end_ - begin_);
            end_ -= begin_;
            begin_ = 0;
        }
        while (end_ < need) {
            const auto left = deadline_ - Clock::now();
            if (left <= Clock::duration::zero() ||
                !sys::wait_fd(fd_, POLLIN,
                              std::chrono::duration_cast<std::chrono::nanoseconds>(left)))
                throw AuthenticationError("handshake timed out");
            // Room for a whole message after the one being read.
            const ssize_t r = ::recv(fd_, buf_ + end_, sizeof buf_ - end_, MSG_DONTWAIT);
            if (r > 0) {
                end_ += static_cast<std::size_t>(r);
                continue;
            }
            if (r == 0) throw AuthenticationError("connection closed during the handshake");
            if (errno != EINTR && errno != EAGAIN && errno != EWOULDBLOCK) peer_failed(errno);
        }
    }

    int fd_;
    Clock::time_point deadline_;
    std::size_t begin_ = 0, end_ = 0;
    char buf_[2 * (4 + kMaxMessage)];
};

// Reads what a refused peer sent but we did not (an mp Client's early challenge): closing a
// socket with unread bytes resets the connection, and the reset could reach the peer before our
// #FAILURE#, which it should read ("digest sent was rejected", not a reset).
void discard_unread(int fd) noexcept {
    char sink[512];
    for (int i = 0; i < 8 && ::recv(fd, sink, sizeof sink, MSG_DONTWAIT) > 0; ++i) {
    }
}

}  // namespace

std::string read_message(int fd, Clock::time_point deadline) {
    unsigned char header[4];
    read_exact(fd, reinterpret_cast<char*>(header), sizeof header, deadline);
    std::string body(frame_length(header), '\0');
    read_exact(fd, body.data(), body.size(), deadline);
    return body;
}

void write_message(int fd, std::string_view body) {
    char buf[4 + kMaxMessage + 64];
    const auto n = static_cast<std::uint32_t>(body.size());
    buf[0] = static_cast<char>(n >> 24);
    buf[1] = static_cast<char>(n >> 16);
    buf[2] = static_cast<char>(n >> 8);
    buf[3] = static_cast<char>(n);
    std::memcpy(buf + 4, body.data(), body.size());  // callers send short messages only
    sys::write_full(fd, buf, 4 + body.size());
}

std::pair<std::string_view, std::string_view> digest_name_and_payload(std::string_view message) {
    if (message.size() == kMd5OnlyMessageLength || message.size() == kMd5DigestLength)
        return {{}, message};
    if (!message.empty() && message[0] == '{') {
        // Python: message.find(b'}', 1, _MAX_DIGEST_LEN + 2)
        const std::size_t end = std::min(message.size(), kMaxDigestNameLength + 2);
        const std::size_t curly = message.substr(0, end).find('}', 1);
        if (curly != std::string_view::npos) {
            std::string_view name = message.substr(1, curly - 1);
            if (sys::crypto::known_digest(name)) return {name, message.substr(curly + 1)};
        }
    }
    throw AuthenticationError(
        "unsupported message length, missing digest prefix, or unsupported digest");
}

std::string create_response(std::string_view authkey, std::string_view message) {
    const std::string_view name = digest_name_and_payload(message).first;
    if (name.empty()) return sys::crypto::hmac("md5", authkey, message);  // legacy server: raw HMAC-MD5
    // The MAC covers the whole message, the {digest} prefix included.
    std::string r = "{";
    r += name;
    r += '}';
    r += sys::crypto::hmac(name, authkey, message);
    return r;
}

void verify_challenge(std::string_view authkey, std::string_view message,
                      std::string_view response) {
    auto [name, mac] = digest_name_and_payload(response);
    if (name.empty()) name = "md5";
    const std::string expected = sys::crypto::hmac(name, authkey, message);
    if (expected.size() != mac.size())
        throw AuthenticationError("expected '" + std::string(name) + "' of length " +
                                  std::to_string(expected.size()) + " got " +
                                  std::to_string(mac.size()));
    if (!sys::crypto::equal_constant_time(expected, mac))
        throw AuthenticationError("digest received was wrong");
}

void deliver_challenge(int fd, std::string_view authkey, Clock::time_point deadline) {
    const std::string message = make_challenge();
    std::string challenge(kChallenge);
    challenge += message;
    write_message(fd, challenge);
    check_answer(fd, authkey, message, read_message(fd, deadline));
    write_message(fd, kWelcome);
}

void answer_challenge(int fd, std::string_view authkey, Clock::time_point deadline) {
    write_message(fd, answer_for(authkey, read_message(fd, deadline)));
    if (read_message(fd, deadline) != kWelcome) throw AuthenticationError("digest sent was rejected");
}

// Python's Listener: deliver_challenge, then answer_challenge, one step per call of advance().
ServerHandshake::ServerHandshake(int fd, std::string_view authkey)
    : fd_(fd), authkey_(authkey), message_(make_challenge()) {
    std::string challenge(kChallenge);
    challenge += message_;
    try {
        send_now(fd_, framed(challenge));
    } catch (...) {
        discard_unread(fd_);
        throw;
    }
}

bool ServerHandshake::advance() {
    try {
        return step();
    } catch (...) {
        discard_unread(fd_);
        throw;
    }
}

std::optional<std::string_view> ServerHandshake::frame() const {
    if (end_ < 4) return std::nullopt;
    const std::size_t n = frame_length(reinterpret_cast<const unsigned char*>(buf_));
    if (end_ < 4 + n) return std::nullopt;
    return std::string_view(buf_ + 4, n);
}

void ServerHandshake::consume(std::size_t n) {
    std::memmove(buf_, buf_ + n, end_ - n);
    end_ -= n;
}

// Reads take whatever has arrived, so that frames sent in one write (an mp peer pipelines its
// answer and its challenge) come in one recv; only the last message is read exactly.
bool ServerHandshake::step() {
    for (;;) {
        if (const std::optional<std::string_view> f = frame()) {
            const std::size_t size = 4 + f->size();
            switch (stage_) {
            case Stage::answer:
                check_answer(fd_, authkey_, message_, *f);
                consume(size);
                // An mp Client sends its challenge together with its answer, a Python one only
                // after our #WELCOME#. When it is (partly) here, welcome and answer go out in
                // one write once it is whole.
                if (end_ == 0) {
                    send_now(fd_, framed(kWelcome));
                    welcomed_ = true;
                }
                stage_ = Stage::challenge;
                continue;
            case Stage::challenge: {
                const std::string answer = answer_for(authkey_, *f);
                consume(size);
                std::string out;
                if (!welcomed_) put_frame(out, kWelcome);
                put_frame(out, answer);
                send_now(fd_, out);
                stage_ = Stage::welcome;
                continue;
            }
            case Stage::welcome:
                if (*f != kWelcome) throw AuthenticationError("digest sent was rejected");
                if (end_ != size) throw AuthenticationError("unexpected data in the handshake");
                end_ = 0;
                return true;
            }
        }
        std::size_t room = sizeof buf_ - end_;
        if (stage_ == Stage::welcome) {
            // A peer may send its first request right behind its #WELCOME#: those bytes belong
            // to the Connection, so never read past that frame.
            const std::size_t want =
                4 + (end_ >= 4 ? frame_length(reinterpret_cast<const unsigned char*>(buf_))
                               : kWelcome.size());
            room = std::min(room, want - end_);
        }
        // Two whole frames fit the buffer, and a whole frame is always taken above.
        if (room == 0) throw AuthenticationError("unexpected data in the handshake");
        const ssize_t r = ::recv(fd_, buf_ + end_, room, MSG_DONTWAIT);
        if (r > 0) {
            end_ += static_cast<std::size_t>(r);
            continue;
        }
        if (r == 0) throw AuthenticationError("connection closed during the handshake");
        if (errno == EINTR) continue;
        if (errno == EAGAIN || errno == EWOULDBLOCK) return false;
        peer_failed(errno);
    }
}

void server_handshake(int fd, std::string_view authkey, Clock::time_point deadline) {
    ServerHandshake hs(fd, authkey);
    while (!hs.advance()) {
        const auto left = deadline - Clock::now();
        if (left <= Clock::duration::zero() ||
            !sys::wait_fd(fd, POLLIN, std::chrono::duration_cast<std::chrono::nanoseconds>(left))) {
            discard_unread(fd);
            throw AuthenticationError("handshake timed out");
        }
    }
}

namespace {

void client_handshake_impl(int fd, std::string_view authkey, Clock::time_point deadline) {
    // Python's Client: answer_challenge, then deliver_challenge; but our challenge goes out in
    // the same write as our answer instead of after the server's #WELCOME# (a Python or mp
    // Listener reads it only once it has welcomed us), which saves a round trip per connection.
    // The server sends nothing after its answer until it has our #WELCOME#, so every read here
    // may take whatever has arrived.
    MessageReader in(fd, deadline);
    const std::string response = answer_for(authkey, in.next());
    const std::string message = make_challenge();
    std::string challenge(kChallenge);
    challenge += message;
    write_messages(fd, response, challenge);
    if (in.next() != kWelcome) throw AuthenticationError("digest sent was rejected");
    check_answer(fd, authkey, message, in.next());
    in.expect_drained();
    write_message(fd, kWelcome);
}

}  // namespace

void client_handshake(int fd, std::string_view authkey, Clock::time_point deadline) {
    try {
        client_handshake_impl(fd, authkey, deadline);
    } catch (const std::system_error& e) {
        peer_failed(e.code().value());
    }
}

}  // namespace detail::handshake

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

Address arbitrary_unix_address() {
    const char* tmp = std::getenv("TMPDIR");
    std::string dir = tmp != nullptr && *tmp != '\0' ? tmp : "/tmp";
    return Address(dir + "/mp-listener-" + random_hex(8));
}

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
    fd_ = fd.release();
}

Listener::Listener(Listener&& o) noexcept
    : fd_(std::exchange(o.fd_, -1)),
      address_(std::move(o.address_)),
      options_(std::move(o.options_)),
      creator_pid_(o.creator_pid_),
      state_(std::move(o.state_)) {}

Listener& Listener::operator=(Listener&& o) noexcept {
    if (this != &o) {
        close();
        fd_ = std::exchange(o.fd_, -1);
        address_ = std::move(o.address_);
        options_ = std::move(o.options_);
        creator_pid_ = o.creator_pid_;
        state_ = std::move(o.state_);
    }
    return *this;
}

Listener::~Listener() { close(); }

void Listener::close() noexcept {
    if (fd_ < 0) return;
    if (state_) {
        std::lock_guard lk(state_->mu);
        state_->peers.clear();
        state_->epoll.reset();
        state_->timer.reset();
        state_->pid = 0;
    }
    ::close(std::exchange(fd_, -1));
    if (address_.family == Address::Family::unix_path && ::getpid() == creator_pid_)
        ::unlink(address_.path.c_str());
}

bool Listener::closed() const noexcept { return fd_ < 0; }

std::optional<Address> Listener::last_accepted() const {
    if (!state_) return std::nullopt;
    std::lock_guard lk(state_->mu);
    return state_->last_accepted;
}

int Listener::fileno() const {
    if (fd_ < 0)
        throw std::system_error(std::make_error_code(std::errc::bad_file_descriptor),
                                "mp::Listener::fileno: listener is closed");
    std::lock_guard lk(state_->mu);
    own(*state_, fd_);
    return state_->epoll.get();
}

Connection Listener::accept() { return *accept_impl(-1); }

std::optional<Connection> detail::accept_or_stop(Listener& listener, int stop_fd) {
    return listener.accept_impl(stop_fd);
}

std::optional<Connection> Listener::accept_impl(int stop_fd) {
    if (fd_ < 0)
        throw std::system_error(std::make_error_code(std::errc::bad_file_descriptor),
                                "mp::Listener::accept: listener is closed");
    State& st = *state_;
    const bool unix_family = !address_.is_tcp();
    for (;;) {
        int ep;
        {
            std::lock_guard lk(st.mu);
            own(st, fd_);
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
            if (on_timer(st, fd_) > 0) throw AuthenticationError("handshake timed out");
            continue;
        }
        if (id == State::kListenId) {
            SockAddr peer;
            peer.len = sizeof peer.ss;
            const int r = ::accept4(fd_, peer.get(), &peer.len, SOCK_CLOEXEC);
            if (r < 0) {
                const int err = errno;
                // EAGAIN: another thread (or process) took it.
                if (err == EAGAIN || err == EWOULDBLOCK || err == EINTR ||
                    peer_gone_before_accept(err))
                    continue;
                if (out_of_resources(err)) back_off(st, fd_);
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
