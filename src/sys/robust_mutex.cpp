#include "sys/robust_mutex.hpp"

#include <algorithm>
#include <cerrno>
#include <cstdint>
#include <ctime>

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

}  // namespace mp::sys
