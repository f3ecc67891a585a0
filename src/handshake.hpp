#pragma once
// The authkey handshake of CPython's multiprocessing.connection (deliver_challenge /
// answer_challenge), both the Python <= 3.11 HMAC-MD5 form and the 3.12+ `{digest}` form, on a
// raw connected stream socket. Private to mp; the fuzz target drives it directly.

#include <chrono>
#include <optional>
#include <string>
#include <string_view>
#include <utility>

#include "mp/errors.hpp"

namespace mp::detail::handshake {

using Clock = std::chrono::steady_clock;

/// The AuthenticationError of a handshake whose peer went away in the middle of it (end of file,
/// a reset, a broken pipe) rather than refusing our key or breaking the protocol. Users see an
/// AuthenticationError, as documented for Listener and Client; a manager's client tells it apart:
/// to it a server that closes on a new connection is a server that has gone (mp::EOFError).
class PeerGone : public AuthenticationError {
public:
    using AuthenticationError::AuthenticationError;
};

/// Handshake messages longer than this are refused (Python's recv_bytes(256)).
inline constexpr std::size_t kMaxMessage = 256;
/// Random bytes in a challenge we send (Python 3.12's MESSAGE_LENGTH).
inline constexpr std::size_t kChallengeLength = 40;

/// Reads one frame of at most kMaxMessage bytes from `fd`, reading exactly the frame's bytes
/// (nothing of what follows it). mp::AuthenticationError for an oversized or malformed length,
/// end of file, or the deadline passing first.
std::string read_message(int fd, Clock::time_point deadline);
/// Writes `body` as one frame.
void write_message(int fd, std::string_view body);

/// Python 3.12's _get_digest_name_and_payload: {"", message} for the legacy 16- and 20-byte
/// forms, {digest, payload} for `{digest}payload` with an allowed digest; AuthenticationError
/// otherwise.
std::pair<std::string_view, std::string_view> digest_name_and_payload(std::string_view message);
/// Python 3.12's _create_response: raw HMAC-MD5 for a legacy challenge, else `{digest}` + HMAC.
std::string create_response(std::string_view authkey, std::string_view message);
/// Python 3.12's _verify_challenge; AuthenticationError when `response` is not a valid MAC of
/// `message` (compared in constant time).
void verify_challenge(std::string_view authkey, std::string_view message,
                      std::string_view response);

/// Python's deliver_challenge: sends a `{sha256}` challenge and checks the answer; sends
/// #WELCOME# or #FAILURE#.
void deliver_challenge(int fd, std::string_view authkey, Clock::time_point deadline);
/// Python's answer_challenge: answers the peer's challenge and expects #WELCOME#.
void answer_challenge(int fd, std::string_view authkey, Clock::time_point deadline);

/// The Listener's side of one handshake as a state machine that never waits, so that one thread
/// can drive many peers at once (a peer that stalls holds up nobody). The constructor sends our
/// challenge; advance() reads what has arrived and answers as far as it allows. The protocol is
/// server_handshake's (below). Every failure of the peer (a wrong or malformed answer, end of
/// file, a reset, a peer that does not read) is mp::AuthenticationError, never a system error:
/// to the server it is all the same event, a peer that did not authenticate. Before throwing it
/// reads (without waiting) what the peer sent but we did not, as server_handshake.
class ServerHandshake {
public:
    /// `authkey` must outlive the object.
    ServerHandshake(int fd, std::string_view authkey);
    ServerHandshake(const ServerHandshake&) = delete;
    ServerHandshake& operator=(const ServerHandshake&) = delete;

    /// True once the peer is authenticated (nothing past its #WELCOME# has been read); false
    /// when it needs more bytes from the peer (wait for the socket to be readable).
    bool advance();

private:
    enum class Stage { answer, challenge, welcome };
    bool step();
    std::optional<std::string_view> frame() const;
    void consume(std::size_t n);

    int fd_;
    std::string_view authkey_;
    std::string message_;  // our challenge's payload
    Stage stage_ = Stage::answer;
    bool welcomed_ = false;  // #WELCOME# for the peer's answer has gone out
    std::size_t end_ = 0;
    char buf_[2 * (4 + kMaxMessage)];
};

/// The Listener's side: Python's deliver_challenge (a `{sha256}` challenge; #WELCOME# or
/// #FAILURE#), then answer_challenge. Welcome and answer share one write when the client sent
/// its challenge early (an mp Client does). When it throws, it has first read (without waiting)
/// what the peer sent but we did not, so that closing `fd` sends no reset that could overtake
/// our #FAILURE#. A blocking ServerHandshake (which the Listener drives without blocking):
/// waits for the peer until `deadline`.
void server_handshake(int fd, std::string_view authkey, Clock::time_point deadline);
/// The Client's side: Python's answer_challenge, then deliver_challenge, with our challenge
/// sent in the same write as our answer (wire-compatible: the server reads it only after
/// welcoming us).
void client_handshake(int fd, std::string_view authkey, Clock::time_point deadline);

}  // namespace mp::detail::handshake
