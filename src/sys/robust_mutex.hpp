#pragma once
// Locking a robust, process-shared pthread mutex (the queues' locks, mp::Lock and friends).

#include <chrono>
#include <optional>
#include <pthread.h>

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

}  // namespace mp::sys
