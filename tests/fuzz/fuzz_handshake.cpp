// libFuzzer target: the authkey handshake. Arbitrary bytes play the peer's side of the
// conversation (its framed messages, or garbage) against the Listener side (server_handshake), the Client side
// (client_handshake), and the
// response parser alone. Anything but mp::AuthenticationError / std::system_error, a crash, a
// leak or a hang is a bug; and a garbage peer must never be welcomed.

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <string>
#include <string_view>
#include <sys/socket.h>
#include <system_error>
#include <unistd.h>

#include "handshake.hpp"
#include "mp/errors.hpp"

namespace hs = mp::detail::handshake;

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
    if (size < 1 || size > 8192) return 0;
    const std::string_view key = "fuzz-key";
    const std::uint8_t mode = data[0] % 3;
    const std::string_view rest(reinterpret_cast<const char*>(data + 1), size - 1);
    if (mode == 2) {
        try {
            hs::verify_challenge(key, "{sha256}0123456789012345678901234567890123456789", rest);
            // Only a real MAC of that message may pass: it cannot come out of garbage.
            if (rest != hs::create_response(key, "{sha256}0123456789012345678901234567890123456789"))
                std::abort();
        } catch (const mp::AuthenticationError&) {
        }
        try {
            (void)hs::create_response(key, rest);
        } catch (const mp::AuthenticationError&) {
        }
        return 0;
    }
    int sv[2];
    if (::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv) != 0) return 0;
    (void)::send(sv[1], rest.data(), rest.size(), MSG_NOSIGNAL);
    ::shutdown(sv[1], SHUT_WR);
    const auto deadline = hs::Clock::now() + std::chrono::milliseconds(200);
    bool welcomed = false;
    try {
        // Either way, a welcome is impossible: our challenge is random, garbage cannot answer it.
        if (mode == 0)
            hs::server_handshake(sv[0], key, deadline);
        else
            hs::client_handshake(sv[0], key, deadline);
        welcomed = true;
    } catch (const mp::AuthenticationError&) {
    } catch (const std::system_error&) {
    }
    ::close(sv[0]);
    ::close(sv[1]);
    if (welcomed) std::abort();
    return 0;
}
