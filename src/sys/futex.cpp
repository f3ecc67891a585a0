#include "sys/futex.hpp"

#include <cerrno>
#include <climits>
#include <ctime>
#include <linux/futex.h>
#include <sys/syscall.h>
#include <unistd.h>

#include "sys/error.hpp"

namespace mp::sys {

namespace {

// The kernel reads the word as a plain u32: std::atomic<uint32_t> must be exactly that.
static_assert(sizeof(std::atomic<std::uint32_t>) == sizeof(std::uint32_t));
static_assert(std::atomic<std::uint32_t>::is_always_lock_free);

std::uint32_t* address(const std::atomic<std::uint32_t>& word) noexcept {
    // The kernel never writes the word for WAIT/WAKE; the cast only satisfies the prototype.
    return reinterpret_cast<std::uint32_t*>(const_cast<std::atomic<std::uint32_t>*>(&word));
}

long futex(std::uint32_t* addr, int op, FutexScope scope, std::uint32_t val, const timespec* ts,
           std::uint32_t val3) noexcept {
    if (scope == FutexScope::process_private) op |= FUTEX_PRIVATE_FLAG;
    return ::syscall(SYS_futex, addr, op, val, ts, nullptr, val3);
}

}  // namespace

FutexResult futex_wait(const std::atomic<std::uint32_t>& word, std::uint32_t expected,
                       const mp::detail::Deadline& deadline, std::uint32_t bitset,
                       FutexScope scope) {
    timespec ts{};
    const timespec* tsp = nullptr;
    if (deadline) {
        // steady_clock is CLOCK_MONOTONIC, FUTEX_WAIT_BITSET's default clock: the deadline is
        // passed through unchanged (absolute), so a retry after EINTR needs no recomputation.
        const auto ns = std::chrono::duration_cast<std::chrono::nanoseconds>(
                            deadline->time_since_epoch())
                            .count();
        if (ns < 0) return FutexResult::timed_out;
        ts.tv_sec = static_cast<time_t>(ns / 1'000'000'000);
        ts.tv_nsec = static_cast<long>(ns % 1'000'000'000);
        tsp = &ts;
    }
    if (futex(address(word), FUTEX_WAIT_BITSET, scope, expected, tsp, bitset) == 0)
        return FutexResult::woken;
    switch (errno) {
        case EAGAIN:  // the word no longer held `expected`
        case EINTR:   // a signal handler ran: the caller re-checks and calls again
            return FutexResult::woken;
        case ETIMEDOUT:
            return FutexResult::timed_out;
        default:
            throw_system_error(errno, "futex(FUTEX_WAIT_BITSET)");
    }
}

FutexResult futex_wait_sliced(const std::atomic<std::uint32_t>& word, std::uint32_t expected,
                              const mp::detail::Deadline& deadline) {
    const auto recheck = std::chrono::steady_clock::now() + futex_recheck_interval;
    const bool capped = !deadline || recheck < *deadline;
    if (futex_wait(word, expected, capped ? mp::detail::Deadline(recheck) : deadline) ==
            FutexResult::timed_out &&
        !capped)
        return FutexResult::timed_out;
    return FutexResult::woken;
}

int futex_wake(const std::atomic<std::uint32_t>& word, int count, std::uint32_t bitset,
               FutexScope scope) {
    if (count <= 0) return 0;
    const long woken = futex(address(word), FUTEX_WAKE_BITSET, scope,
                             static_cast<std::uint32_t>(count), nullptr, bitset);
    if (woken < 0) throw_system_error(errno, "futex(FUTEX_WAKE_BITSET)");
    return static_cast<int>(woken);
}

int futex_wake_all(const std::atomic<std::uint32_t>& word, std::uint32_t bitset,
                   FutexScope scope) {
    return futex_wake(word, INT_MAX, bitset, scope);
}

}  // namespace mp::sys
