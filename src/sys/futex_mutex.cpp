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
    // Having slept, this thread cannot know whether others still sleep: it takes the lock with
    // kWaiters set, so its unlock wakes the next (Drepper's state 2).
    std::uint32_t waiters = 0;
    try {
        for (;;) {
            if ((v & kTid) == 0) {
                // Free, or its holder died (the kernel cleared the id and set kOwnerDied).
                const std::uint32_t nv = self | (v & kWaiters) | waiters;
                if (word.compare_exchange_weak(v, nv, std::memory_order_acquire,
                                               std::memory_order_relaxed)) {
                    link(head);
                    detail::set_pending(head, nullptr);
                    tsan_post_lock(this, may_fail, true);
                    return (v & kOwnerDied) != 0 ? Result::owner_died : Result::acquired;
                }
                continue;
            }
            if (!block) break;
            // No spin before sleeping (as glibc's default mutex and Drepper's): a waiter that
            // spins takes the lock the instant it is released, so a lock taken in a loop by two
            // processes changes hands, and its cache line and the data's move between CPUs, on
            // every acquisition. W7 (bench/): 54-80 ns per increment with a 100-read spin,
            // 35-55 ns without, against the bare three-state mutex's 25-30 ns.
            if ((v & kWaiters) == 0) {
                if (!word.compare_exchange_weak(v, v | kWaiters, std::memory_order_relaxed))
                    continue;
                v |= kWaiters;
            }
            // Sliced (futex_wait_sliced): the unlock clears the word (and with it kWaiters) and
            // wakes one waiter; if that one is killed before it runs while another thread takes
            // the free lock with the one-CAS fast path (which sets no kWaiters), nobody is left
            // to wake the other sleepers: the dead waiter's robust-list cleanup finds a word
            // naming a live owner, and that owner's unlock sees no kWaiters.
            if (deadline && std::chrono::steady_clock::now() >= *deadline) break;
            (void)futex_wait_sliced(word, v, deadline);
            waiters = kWaiters;
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
    if ((word.exchange(leave, std::memory_order_release) & kWaiters) != 0) wake();
    detail::set_pending(head, nullptr);
    tsan_post_unlock(this);
}

void FutexMutex::wake() noexcept {
    // Only EFAULT/EINVAL could fail here, for a word that is not ours to wake: ignore.
    (void)::syscall(SYS_futex, reinterpret_cast<std::uint32_t*>(&word), FUTEX_WAKE, 1, nullptr,
                    nullptr, 0);
}

}  // namespace mp::sys
