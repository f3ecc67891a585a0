#include "sys/crypto.hpp"

#include <dlfcn.h>
#include <sys/random.h>

#include <openssl/crypto.h>
#include <openssl/evp.h>
#include <openssl/hmac.h>

#include <cerrno>
#include <mutex>

#include "mp/errors.hpp"
#include "sys/error.hpp"

#ifndef MP_LIBCRYPTO_SONAME
#error "MP_LIBCRYPTO_SONAME (the soname of OpenSSL's libcrypto, e.g. libcrypto.so.3) must be defined"
#endif

namespace mp::sys::crypto {

void random_bytes(std::span<std::byte> out) {
    std::size_t done = 0;
    while (done < out.size()) {
        ssize_t n = ::getrandom(out.data() + done, out.size() - done, 0);
        if (n < 0) {
            if (errno == EINTR) continue;
            throw_system_error(errno, "getrandom");
        }
        done += static_cast<std::size_t>(n);
    }
}

std::string random_string(std::size_t n) {
    std::string s(n, '\0');
    random_bytes(std::as_writable_bytes(std::span<char>(s.data(), s.size())));
    return s;
}

bool known_digest(std::string_view name) noexcept {
    return name == "md5" || name == "sha256" || name == "sha384" || name == "sha3_256" ||
           name == "sha3_384";
}

namespace {

// The few libcrypto functions mp calls, typed from OpenSSL's own declarations.
struct Libcrypto {
    decltype(&::HMAC) hmac = nullptr;
    decltype(&::CRYPTO_memcmp) memcmp = nullptr;
    decltype(&::EVP_md5) md5 = nullptr;
    decltype(&::EVP_sha256) sha256 = nullptr;
    decltype(&::EVP_sha384) sha384 = nullptr;
    decltype(&::EVP_sha3_256) sha3_256 = nullptr;
    decltype(&::EVP_sha3_384) sha3_384 = nullptr;
    std::string error;  // why it could not be loaded; empty when loaded
};

template <class F>
bool bind(void* lib, const char* name, F& fn, std::string& error) {
    void* sym = ::dlsym(lib, name);
    if (sym == nullptr) {
        error = std::string("no symbol ") + name + " in " MP_LIBCRYPTO_SONAME;
        return false;
    }
    fn = reinterpret_cast<F>(sym);
    return true;
}

const Libcrypto& libcrypto() {
    // Loaded once and never closed: the handles of a process's handshakes live as long as it.
    static const Libcrypto lib = [] {
        Libcrypto l;
        void* h = ::dlopen(MP_LIBCRYPTO_SONAME, RTLD_NOW | RTLD_LOCAL);
        if (h == nullptr) {
            const char* why = ::dlerror();
            l.error = std::string("cannot load ") + MP_LIBCRYPTO_SONAME + ": " + (why ? why : "?");
            return l;
        }
        // Initialised here, before anything else of OpenSSL runs, without its clean-up at exit:
        // that clean-up would run when this first handshake's static objects are destroyed, and
        // a handshake made later in the exit (a static manager's shutdown, a static proxy's
        // release) would crash in the freed library. The process's end frees it all.
        decltype(&::OPENSSL_init_crypto) init = nullptr;
        if (bind(h, "OPENSSL_init_crypto", init, l.error)) (void)init(OPENSSL_INIT_NO_ATEXIT, nullptr);
        if (l.error.empty() && bind(h, "HMAC", l.hmac, l.error) && bind(h, "CRYPTO_memcmp", l.memcmp, l.error) &&
            bind(h, "EVP_md5", l.md5, l.error) && bind(h, "EVP_sha256", l.sha256, l.error) &&
            bind(h, "EVP_sha384", l.sha384, l.error) &&
            bind(h, "EVP_sha3_256", l.sha3_256, l.error) &&
            bind(h, "EVP_sha3_384", l.sha3_384, l.error)) {
            return l;
        }
        l.hmac = nullptr;
        return l;
    }();
    if (!lib.error.empty())
        throw Error("mp: Listener/Client authentication needs OpenSSL's libcrypto (" + lib.error +
                    "; on Debian: apt-get install libssl3)");
    return lib;
}

}  // namespace

std::string hmac(std::string_view name, std::string_view key, std::string_view message) {
    const Libcrypto& l = libcrypto();
    const EVP_MD* md = nullptr;
    if (name == "md5") md = l.md5();
    else if (name == "sha256") md = l.sha256();
    else if (name == "sha384") md = l.sha384();
    else if (name == "sha3_256") md = l.sha3_256();
    else if (name == "sha3_384") md = l.sha3_384();
    if (md == nullptr) throw AuthenticationError("unsupported digest '" + std::string(name) + "'");
    unsigned char out[EVP_MAX_MD_SIZE];
    unsigned int len = 0;
    // OpenSSL reads a null key as "no key given"; an empty key must still be a key.
    static const unsigned char empty = 0;
    const void* k = key.empty() ? static_cast<const void*>(&empty) : key.data();
    if (l.hmac(md, k, static_cast<int>(key.size()),
               reinterpret_cast<const unsigned char*>(message.data()), message.size(), out,
               &len) == nullptr)
        throw AuthenticationError("HMAC failed");
    return std::string(reinterpret_cast<const char*>(out), len);
}

bool equal_constant_time(std::string_view a, std::string_view b) {
    if (a.size() != b.size()) return false;
    return libcrypto().memcmp(a.data(), b.data(), a.size()) == 0;
}

}  // namespace mp::sys::crypto
