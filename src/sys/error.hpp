#pragma once
// One helper per system-call error convention. Each throws std::system_error whose what()
// names the call, so a failure report says which operation failed and why.

#include <cerrno>
#include <string>
#include <system_error>
#include <thread>
#include <utility>

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

/// Convention 4: std::thread's constructor, whose std::system_error (EAGAIN when no thread can
/// be created: RLIMIT_NPROC, memory for the stack) names nothing; this one says which of mp's
/// threads could not start.
template <class F>
std::thread start_thread(const char* what, F&& body) {
    try {
        return std::thread(std::forward<F>(body));
    } catch (const std::system_error& e) {
        throw std::system_error(e.code(), std::string(what) + " (pthread_create)");
    }
}

}  // namespace mp::sys
