#pragma once
// One helper per system-call error convention. Each throws std::system_error whose what()
// names the call, so a failure report says which operation failed and why.

#include <cerrno>
#include <system_error>

namespace mp::sys {

/// Throws std::system_error for `err` naming `call`.
[[noreturn]] inline void throw_system_error(int err, const char* call) {
    throw std::system_error(err, std::system_category(), call);
}

/// Convention 1: -1 and errno (most of libc).
template <class T>
inline T check(T rc, const char* call) {
    if (rc == -1) throw_system_error(errno, call);
    return rc;
}

/// Convention 2: the error number returned directly (pthread_*, posix_spawn*).
inline void check_ret(int err, const char* call) {
    if (err != 0) throw_system_error(err, call);
}

/// Convention 3: a negative errno returned directly (raw syscalls done without libc's wrapper).
inline long check_neg(long rc, const char* call) {
    if (rc < 0) throw_system_error(static_cast<int>(-rc), call);
    return rc;
}

}  // namespace mp::sys
