#pragma once
// Locking a robust, process-shared pthread mutex (the queues' locks, mp::Lock and friends).

#include <pthread.h>

#include <cerrno>
#include <chrono>
#include <optional>
#include <utility>

namespace mp::sys {

/// Takes `m`: at once when it is free; else, with `block`, waits until `deadline` (std::nullopt:
/// for ever). Returns pthread's code: 0, EOWNERDEAD (the caller repairs and marks it
/// consistent), EBUSY (not `block`, or held by this thread as an error-checking mutex),
/// ETIMEDOUT, or another error.
///
/// A wait never sleeps in one unbounded (or deadline-long) pthread call but in slices of 50 ms,
/// re-reading the lock word after each: a robust mutex can lose its wake-up when a waiter is
/// killed. The unlock clears the lock word (and with it FUTEX_WAITERS) and wakes one waiter; if
/// that one is killed before it runs while another thread takes the free lock on the fast path
/// (which does not set FUTEX_WAITERS again), the kernel's robust-list cleanup for the dead
/// waiter wakes nobody (the word names a live owner) and neither does the new owner's unlock:
/// the other waiters would sleep on a free lock for good. With the slices it costs at most 50 ms.
int lock_robust(pthread_mutex_t* m, bool block,
                std::optional<std::chrono::steady_clock::time_point> deadline);

/// Makes `m` a process-shared robust mutex. error_check: an unlock by a thread that does not
/// hold it fails (EPERM) instead of corrupting it. Throws std::system_error naming the call.
void init_robust_mutex(pthread_mutex_t& m, bool error_check = false);

/// Marks `m` consistent after its dead owner's state was repaired; std::system_error
/// ("pthread_mutex_consistent") when that fails (not robust, or not inconsistent).
void make_consistent(pthread_mutex_t& m);

/// Holds a robust mutex for a scope. lock() on EOWNERDEAD runs `repair`, then marks the mutex
/// consistent; a repairer that dies first leaves it inconsistent, so the next locker repairs
/// again. A blocking lock waits in lock_robust's slices.
class RobustGuard {
public:
    RobustGuard() = default;
    RobustGuard(const RobustGuard&) = delete;
    RobustGuard& operator=(const RobustGuard&) = delete;
    ~RobustGuard() { unlock(); }

    /// block false: one try; true: until `deadline` (std::nullopt: for ever). False when it was
    /// busy or the deadline passed; other failures throw std::system_error.
    template <class Repair>
    [[nodiscard]] bool lock(pthread_mutex_t* m, bool block,
                            std::optional<std::chrono::steady_clock::time_point> deadline, Repair repair) {
        const int rc = lock_robust(m, block, deadline);
        if (rc == EBUSY || rc == ETIMEDOUT) return false;
        if (rc != 0 && rc != EOWNERDEAD) throw_lock_error(rc);
        m_ = m;  // held from here, also when the repair throws: the destructor unlocks
        if (rc == EOWNERDEAD) {
            repair();
            make_consistent(*m);
        }
        return true;
    }
    void unlock() noexcept {
        if (m_ != nullptr) ::pthread_mutex_unlock(std::exchange(m_, nullptr));
    }
    bool owns() const noexcept { return m_ != nullptr; }

private:
    [[noreturn]] static void throw_lock_error(int rc);
    pthread_mutex_t* m_ = nullptr;
};

}  // namespace mp::sys
