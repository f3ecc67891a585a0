#pragma once
// Random bytes and HMAC for mp's authentication.
//
// Random bytes come from the kernel (getrandom), which is where OpenSSL's own generator seeds
// from. HMAC and the constant-time compare come from OpenSSL's libcrypto, loaded with dlopen the
// first time a handshake needs it: a program that only starts processes, uses queues, locks or
// pools never loads libcrypto (it adds ~10% to every fork of a process that has it mapped), and
// libmp has no DT_NEEDED entry for it. Only Listener/Client handshakes (and so managers) load it.
//
// A forked child of a threaded parent that runs the first handshake of its program calls dlopen,
// which takes the dynamic loader's lock: the general "fork in a threaded parent" caveat of the
// fork start method. A process that has done one handshake before forking hands the loaded
// library to its children.

#include <cstddef>
#include <span>
#include <string>
#include <string_view>

namespace mp::sys::crypto {

/// Fills `out` with cryptographically secure random bytes (getrandom). Throws std::system_error.
void random_bytes(std::span<std::byte> out);
/// `n` random bytes as a string.
std::string random_string(std::size_t n);

/// True for the digests Python's multiprocessing.connection accepts in a `{name}` prefix:
/// md5, sha256, sha384, sha3_256, sha3_384. Does not load libcrypto.
bool known_digest(std::string_view name) noexcept;

/// HMAC of `message` under `key` with digest `name` (one of known_digest's). Loads libcrypto on
/// first use; throws mp::Error when it cannot be loaded (naming the library and why), and
/// mp::AuthenticationError when the digest is unknown or the computation fails.
std::string hmac(std::string_view name, std::string_view key, std::string_view message);

/// Compares two equal-length buffers in time independent of their contents (CRYPTO_memcmp).
bool equal_constant_time(std::string_view a, std::string_view b);

}  // namespace mp::sys::crypto
