#include "sys/robust_mutex.hpp"

#include <algorithm>
#include <cerrno>
#include <cstdint>
#include <ctime>

#include "sys/error.hpp"

#if defined(__SANITIZE_THREAD__)
#include <sanitizer/tsan_interface.h>
#endif

namespace mp::sys {
namespace {

constexpr auto kRecheck = std::chrono::milliseconds(50);

// pthread_mutex_clocklock on the steady clock until `until`.
int clocklock(pthread_mutex_t* m, std::chrono::steady_clock::time_point until) {
    auto ns = std::chrono::duration_cast<std::chrono::nanoseconds>(until.time_since_epoch()).count();
#if defined(__SANITIZE_THREAD__)
    // ThreadSanitizer intercepts timedlock but not clocklock: convert to the realtime clock (a
    // clock jump could stretch a wait: tests only).
    timespec now{};
    ::clock_gettime(CLOCK_REALTIME, &now);
    ns = std::max<std::int64_t>(0, ns - std::chrono::duration_cast<std::chrono::nanoseconds>(
                                            std::chrono::steady_clock::now().time_since_epoch())
                                            .count()) +
         static_cast<std::int64_t>(now.tv_nsec) +
         static_cast<std::int64_t>(now.tv_sec) * 1'000'000'000;
#endif
    ns = std::max<std::int64_t>(ns, 0);
    timespec ts{};
    ts.tv_sec = static_cast<time_t>(ns / 1'000'000'000);
    ts.tv_nsec = static_cast<long>(ns % 1'000'000'000);
#if defined(__SANITIZE_THREAD__)
    const int rc = ::pthread_mutex_timedlock(m, &ts);
    if (rc == EOWNERDEAD) {
        // Its timedlock interceptor, unlike lock and trylock, ignores EOWNERDEAD (the mutex is
        // held): tell it, or the unlock looks like an unlock of a free mutex.
        __tsan_mutex_pre_lock(m, __tsan_mutex_try_lock);
        __tsan_mutex_post_lock(m, __tsan_mutex_try_lock, 0);
    }
    return rc;
#else
    return ::pthread_mutex_clocklock(m, CLOCK_MONOTONIC, &ts);
#endif
}

}  // namespace

int lock_robust(pthread_mutex_t* m, bool block,
                std::optional<std::chrono::steady_clock::time_point> deadline) {
    // A free mutex is taken at once, without reading the clock.
    int rc = ::pthread_mutex_trylock(m);
    if (rc != EBUSY || !block) return rc;
    for (;;) {
        const auto recheck = std::chrono::steady_clock::now() + kRecheck;
        const bool capped = !deadline || recheck < *deadline;
        rc = clocklock(m, capped ? recheck : *deadline);
        if (rc != ETIMEDOUT || !capped) return rc;
    }
}

void init_robust_mutex(pthread_mutex_t& m, bool error_check) {
    pthread_mutexattr_t attr;
    check_ret(::pthread_mutexattr_init(&attr), "pthread_mutexattr_init");
    struct AttrGuard {
        pthread_mutexattr_t* a;
        ~AttrGuard() { ::pthread_mutexattr_destroy(a); }
    } guard{&attr};
    check_ret(::pthread_mutexattr_setpshared(&attr, PTHREAD_PROCESS_SHARED), "pthread_mutexattr_setpshared");
    check_ret(::pthread_mutexattr_setrobust(&attr, PTHREAD_MUTEX_ROBUST), "pthread_mutexattr_setrobust");
    if (error_check)
        check_ret(::pthread_mutexattr_settype(&attr, PTHREAD_MUTEX_ERRORCHECK), "pthread_mutexattr_settype");
    check_ret(::pthread_mutex_init(&m, &attr), "pthread_mutex_init");
}

void make_consistent(pthread_mutex_t& m) { check_ret(::pthread_mutex_consistent(&m), "pthread_mutex_consistent"); }

void RobustGuard::throw_lock_error(int rc) { throw_system_error(rc, "pthread_mutex_lock (robust)"); }

}  // namespace mp::sys
