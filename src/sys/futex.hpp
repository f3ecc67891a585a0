#pragma once
// A thin futex wrapper: sleep until a 32-bit word in (shared) memory changes, and wake sleepers
// on it. Used by the synchronisation primitives and the queues (process-shared words), and by the
// futures (words only the threads of one process touch: FutexScope::process_private).
//
// The pattern every caller follows (no lost wake-up, because the kernel compares the word with
// `expected` atomically with going to sleep):
//
//     waiter:  while (!condition(word.load())) {
//                  if (futex_wait(word, observed, deadline) == FutexResult::timed_out) return false;
//              }
//     waker:   change word (or state the waiter re-reads after observing word); futex_wake(word, n);
//
// futex_wait returns `woken` for a real wake-up, for a word that already differed from
// `expected` (EAGAIN) and for a signal that interrupted the sleep (EINTR): in every case the
// caller re-checks its condition and, when it must still wait, calls again with the same
// absolute deadline, so interruptions never stretch a timeout.
//
// Timeouts are absolute std::chrono::steady_clock time points (CLOCK_MONOTONIC on Linux), which
// is what FUTEX_WAIT_BITSET takes natively: retries need no arithmetic and no clock jump
// (settimeofday, NTP) moves a deadline.

#include <atomic>
#include <chrono>
#include <cstdint>
#include <optional>
#include <type_traits>

#include "mp/detail/deadline.hpp"

namespace mp::sys {

/// Matches every waiter (FUTEX_BITSET_MATCH_ANY).
inline constexpr std::uint32_t futex_bitset_any = 0xffffffffu;

/// Who may sleep on and wake a word. A waiter and its waker must name the same scope: the kernel
/// keys the two kinds apart, so a shared wake never wakes a private sleeper, nor the reverse.
enum class FutexScope {
    /// The word may live in memory shared between processes (a shared futex).
    shared,
    /// Only threads of this process use the word (FUTEX_PRIVATE_FLAG): the kernel keys it by
    /// address alone, skipping the page lookup and reference a shared futex costs.
    process_private,
};

/// Why futex_wait returned.
enum class FutexResult {
    /// Woken, or the word already differed, or a signal interrupted the sleep: re-check.
    woken,
    /// The deadline passed (the word may still equal `expected`).
    timed_out,
};

/// Sleeps while `word` holds `expected`, until woken or `deadline` (absolute, steady clock).
/// By default the word may live in memory shared between processes (`scope`). `bitset`
/// (non-zero) chooses which futex_wake calls wake this sleeper: a wake whose bitset shares a bit
/// with it. Throws std::system_error("futex") only for misuse the kernel refuses (a bad address,
/// a zero bitset).
FutexResult futex_wait(const std::atomic<std::uint32_t>& word, std::uint32_t expected,
                       const mp::detail::Deadline& deadline = std::nullopt,
                       std::uint32_t bitset = futex_bitset_any,
                       FutexScope scope = FutexScope::shared);

/// How long futex_wait_sliced sleeps at most before its caller looks again.
inline constexpr auto futex_recheck_interval = std::chrono::milliseconds(50);

/// futex_wait on a shared word, sleeping at most futex_recheck_interval: `timed_out` only once
/// `deadline` has passed; otherwise the caller re-checks its condition and calls again.
///
/// For waits whose wake-up can be lost to a process killed at the wrong moment: a waker that
/// wakes exactly as many sleepers as it grants (a semaphore's release, a queue's single wake) can
/// pick one that is killed before it takes its grant, which then waits, unseen, until a live
/// waiter looks again. (FutexMutex needs no slices: it keeps FUTEX_WAITERS for the next holder.) The slices bound that loss to 50 ms; the
/// wake-up paths, and a wait that is woken, cost the same as futex_wait's.
FutexResult futex_wait_sliced(const std::atomic<std::uint32_t>& word, std::uint32_t expected,
                              const mp::detail::Deadline& deadline = std::nullopt);

/// Wakes at most `count` sleepers on `word` (in any process, for a shared word) whose bitset
/// shares a bit with `bitset` and that sleep with the same `scope`; returns how many were woken.
/// Cheap when nobody sleeps (one system call, no wait), but callers that can tell nobody waits
/// should skip it.
int futex_wake(const std::atomic<std::uint32_t>& word, int count = 1,
               std::uint32_t bitset = futex_bitset_any, FutexScope scope = FutexScope::shared);

/// Wakes every sleeper on `word`; returns how many were woken.
int futex_wake_all(const std::atomic<std::uint32_t>& word,
                   std::uint32_t bitset = futex_bitset_any,
                   FutexScope scope = FutexScope::shared);

}  // namespace mp::sys
