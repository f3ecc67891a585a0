// The authkey handshake of CPython's multiprocessing.connection (handshake.hpp): framing, the
// challenge and response in both of Python's forms, the blocking client and server sides, and
// the non-blocking ServerHandshake the Listener drives.

#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cerrno>
#include <cstddef>
#include <cstring>
#include <optional>
#include <string>
#include <string_view>
#include <system_error>

#include "handshake.hpp"
#include "mp/errors.hpp"
#include "sys/crypto.hpp"
#include "sys/error.hpp"
#include "sys/fd.hpp"

namespace mp {

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
        if (r == 0) throw PeerGone("connection closed during the handshake");
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
    throw PeerGone("connection failed during the handshake (" + std::system_category().message(err) + ")");
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
            if (r == 0) throw PeerGone("connection closed during the handshake");
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
        if (r == 0) throw PeerGone("connection closed during the handshake");
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

}  // namespace mp
