#include "sys/futex_mutex.hpp"

#include <algorithm>
#include <cerrno>
#include <cstddef>
#include <linux/futex.h>
#include <pthread.h>
#include <sys/syscall.h>
#include <system_error>
#include <unistd.h>

#include "sys/atfork.hpp"
#include "sys/cpu_relax.hpp"
#include "sys/error.hpp"
#include "sys/futex.hpp"

#if defined(__SANITIZE_THREAD__)
#include <sanitizer/tsan_interface.h>
#endif

namespace mp::sys {
namespace {

static_assert(sizeof(void*) == 8, "the robust-list layout below is glibc's 64-bit one");
static_assert(sizeof(std::atomic<std::uint32_t>) == 4);
// glibc's pthread_mutex_t: the lock word at 0, the list pair at 24 (prev) and 32 (next).
static_assert(offsetof(FutexMutex, word) == 0 && offsetof(FutexMutex, prev) == 24 &&
              offsetof(FutexMutex, next) == 32);
constexpr long kFutexOffset =
    static_cast<long>(offsetof(FutexMutex, word)) - static_cast<long>(offsetof(FutexMutex, next));
static_assert(offsetof(FutexMutex, next) - offsetof(FutexMutex, prev) == sizeof(void*));

constexpr std::uint32_t kTid = FUTEX_TID_MASK;
constexpr std::uint32_t kWaiters = FUTEX_WAITERS;
constexpr std::uint32_t kOwnerDied = FUTEX_OWNER_DIED;

// A blocked lock's spin before it sleeps (see lock_slow).
constexpr int kSpinRounds = 8;
constexpr int kSpinPause = 8;

[[gnu::init_priority(101)]] const ChildAtFork atfork_registered{[] { detail::cached_tid = 0; }};

robust_list_head* this_thread_head() {
    if (detail::robust_head != nullptr) return detail::robust_head;
    robust_list_head* head = nullptr;
    std::size_t len = 0;
    if (::syscall(SYS_get_robust_list, 0, &head, &len) != 0)
        throw_system_error(errno, "get_robust_list");
    if (head == nullptr || len != sizeof(robust_list_head) || head->futex_offset != kFutexOffset)
        throw std::system_error(std::make_error_code(std::errc::not_supported),
                                "get_robust_list: the thread's robust-futex list is not glibc's "
                                "(mp's locks link themselves into it)");
    detail::robust_head = head;
    return head;
}

// ThreadSanitizer does not see this mutex's happens-before (the CAS is relaxed on failure): tell
// it with acquire/release on the word, not with its mutex annotations, whose ownership record
// a forked child inherits (the child's first lock of a lock the parent held at the fork would
// be reported as a lock held by another thread). Only happens-before is modelled, and a
// self-deadlock never reaches here (lock returns held_by_caller first).
#if defined(__SANITIZE_THREAD__)
void tsan_pre_lock(void*, bool) {}
void tsan_post_lock(void* m, bool, bool ok) {
    if (ok) __tsan_acquire(m);
}
void tsan_pre_unlock(void* m) { __tsan_release(m); }
void tsan_post_unlock(void*) {}
#else
void tsan_pre_lock(void*, bool) {}
void tsan_post_lock(void*, bool, bool) {}
void tsan_pre_unlock(void*) {}
void tsan_post_unlock(void*) {}
#endif

}  // namespace

FutexMutex::Result FutexMutex::lock_slow(
    pid_t me, bool block, const std::optional<std::chrono::steady_clock::time_point>& deadline,
    std::uint32_t seen) {
    robust_list_head* head = this_thread_head();
    const auto self = static_cast<std::uint32_t>(me);
    std::uint32_t v = seen;
    if ((v & kTid) == self) return Result::held_by_caller;
    // ThreadSanitizer wants a lock that may fail (a try, or a deadline) announced as a try.
    const bool may_fail = !block || deadline.has_value();
    tsan_pre_lock(this, may_fail);
    detail::set_pending(head, &next);
    // FUTEX_WAITERS stays in the word when the unlock that wakes a sleeper finds it there (see
    // release): a waiter takes the lock with the bit as it finds it, and a woken waiter's own
    // unlock passes the wake-up on.
    int spins = 0;
    try {
        for (;;) {
            if ((v & kTid) == 0) {
                // Free, or its holder died (the kernel cleared the id and set kOwnerDied).
                if (word.compare_exchange_weak(v, self | (v & kWaiters), std::memory_order_acquire,
                                               std::memory_order_relaxed)) {
                    link(head);
                    detail::set_pending(head, nullptr);
                    tsan_post_lock(this, may_fail, true);
                    return (v & kOwnerDied) != 0 ? Result::owner_died : Result::acquired;
                }
                continue;
            }
            if (!block) break;
            // Spin before sleeping, reading the word at growing intervals and without writing
            // it: a critical section is usually far shorter than a sleep and its wake-up (two
            // system calls, ~250 ns each here, plus a halted CPU's wake-up), and a waiter that
            // has not set FUTEX_WAITERS costs the holder's unlock nothing. The intervals keep
            // the waiter off the word's cache line, so a holder that takes the lock again at
            // once keeps it for a run instead of handing it (and the line, and the data's lines)
            // across CPUs on every acquisition: W7 (bench/) ran at 45-60 ns per increment with
            // no spin (every waiter slept; most sleeps ended at once with EAGAIN, after the
            // holder paid a FUTEX_WAKE), and at 50-80 ns with an unspaced 100-read spin. The
            // budget, kSpinRounds rounds of kSpinPause << round pauses (at most << 5), is about
            // 1,000 pauses: some 20 us where a pause costs 23 ns (this AMD EPYC), 3-40 us
            // elsewhere. A deadline that has passed skips it. With the spin, W7 runs at 14-16 ns
            // in some executables and 22-50 ns in others built from the same source (code
            // placement; bench/README.md, W7-spin), never slower than without it.
            if (spins < kSpinRounds && (spins > 0 || !deadline ||
                                        std::chrono::steady_clock::now() < *deadline)) {
                for (int i = kSpinPause << std::min(spins, 5); i > 0; --i) cpu_relax();
                ++spins;
                v = word.load(std::memory_order_relaxed);
                continue;
            }
            if ((v & kWaiters) == 0) {
                if (!word.compare_exchange_weak(v, v | kWaiters, std::memory_order_relaxed))
                    continue;
                v |= kWaiters;
            }
            // No time slices: a woken waiter killed before it takes the lock leaves FUTEX_WAITERS
            // in the word (release keeps it), so the next holder wakes the next sleeper.
            if (deadline && std::chrono::steady_clock::now() >= *deadline) break;
            (void)futex_wait(word, v, deadline);
            spins = 0;  // woken (or the word moved on): spin again before sleeping again
            v = word.load(std::memory_order_relaxed);
        }
    } catch (...) {
        detail::set_pending(head, nullptr);
        tsan_post_lock(this, may_fail, false);
        throw;
    }
    detail::set_pending(head, nullptr);
    tsan_post_lock(this, may_fail, false);
    return Result::busy;
}

void FutexMutex::unlock_slow(std::uint32_t leave) noexcept {
    // Set by the lock this thread holds; the lookup cannot fail where that lock succeeded.
    robust_list_head* head = detail::robust_head;
    if (head == nullptr) head = this_thread_head();
    tsan_pre_unlock(this);
    detail::set_pending(head, &next);
    unlink();
    release(word.load(std::memory_order_relaxed), leave);
    detail::set_pending(head, nullptr);
    tsan_post_unlock(this);
}

void FutexMutex::release(std::uint32_t seen, std::uint32_t leave) noexcept {
    // While this thread holds the mutex only waiters write the word, and only to set kWaiters.
    std::uint32_t left = leave | (seen & kWaiters);
    while (!word.compare_exchange_weak(seen, left, std::memory_order_release,
                                       std::memory_order_relaxed))
        left = leave | (seen & kWaiters);
    if ((left & kWaiters) == 0) return;
    // Only EFAULT/EINVAL could fail here, for a word that is not ours to wake: taken as "woke
    // nobody". Having woken nobody, the bit goes: no one can sleep on a word naming no owner, so
    // none sleeps now; a thread that took the lock meanwhile keeps it (the CAS fails).
    const long woken = ::syscall(SYS_futex, reinterpret_cast<std::uint32_t*>(&word), FUTEX_WAKE,
                                 1, nullptr, nullptr, 0);
    if (woken <= 0) (void)word.compare_exchange_strong(left, leave, std::memory_order_relaxed);
}

}  // namespace mp::sys
