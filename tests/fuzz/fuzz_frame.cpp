// libFuzzer target: the frame decoder. Arbitrary bytes arrive on one end of a socketpair and a
// Connection receives from the other with recv_bytes(maxlength) / recv_bytes_into until end of
// file or a refused frame. Every outcome but a crash, a leak or a hang is fine.

#include <cstddef>
#include <cstdint>
#include <span>
#include <string>
#include <sys/socket.h>
#include <unistd.h>
#include <vector>

#include "mp/connection.hpp"
#include "mp/errors.hpp"

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
    if (size < 1 || size > 100000) return 0;  // the socket buffer holds it all: no blocking
    int sv[2];
    if (::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv) != 0) return 0;
    // The first byte picks the receive call and maxlength; the rest is the stream.
    const std::uint8_t mode = data[0];
    std::size_t off = 1;
    while (off < size) {
        ssize_t n = ::send(sv[1], data + off, size - off, MSG_NOSIGNAL);
        if (n <= 0) break;
        off += static_cast<std::size_t>(n);
    }
    ::shutdown(sv[1], SHUT_WR);
    mp::Connection c(sv[0]);
    const std::size_t maxlength = std::size_t{1} << (mode & 31);
    try {
        for (int i = 0; i < 10000; ++i) {
            if (mode & 0x80) {
                std::vector<std::byte> buf(64);
                try {
                    (void)c.recv_bytes_into(std::span<std::byte>(buf), mode & 7);
                } catch (const mp::BufferTooShort&) {
                }
            } else {
                (void)c.recv_bytes(maxlength);
            }
        }
    } catch (const mp::EOFError&) {
    } catch (const mp::DecodeError&) {
    } catch (const std::system_error&) {
    }
    ::close(sv[1]);
    return 0;
}
