#pragma once
// A robust, process-shared mutex on one futex word, without pthread: the word holds the owner's
// thread id plus the kernel's FUTEX_WAITERS and FUTEX_OWNER_DIED bits, so locking is one CAS,
// unlocking one CAS, and FUTEX_WAKE is called only when a waiter announced itself.
//
// FUTEX_WAITERS outlives the unlock that wakes a waiter: the word is left "free, waiters"
// (FUTEX_WAITERS alone), so whoever takes the lock next (by the slow path: the fast path's CAS
// expects 0) carries the bit and wakes the next sleeper at its unlock. A woken waiter that is
// killed before it takes the lock therefore cannot strand the others (glibc's robust mutexes,
// which clear the bit, can: a thread taking the free lock on the fast path would unlock without
// a wake while they sleep). The bit is cleared by an unlock whose FUTEX_WAKE found nobody asleep
// (nobody can fall asleep on a word without an owner), so a lock that stops being contended
// goes back to the one-CAS paths. Waits need no time slices for this.
//
// Robustness comes from the kernel's robust-futex list (set_robust_list(2),
// Documentation/locking/robust-futex-ABI.rst): a thread registers one list head; at its death the
// kernel walks the list of locks it holds and, for each whose word still names it, sets
// FUTEX_OWNER_DIED, clears the id and wakes a waiter. A thread has exactly one head, and glibc has
// registered its own for every thread (pthread robust mutexes live on it), so this mutex links
// itself into glibc's list, laid out the way glibc lays out its entries: the word at the list's
// futex_offset from the entry, a {prev, next} pair, the head's own prev word just before it. The
// offset is checked against the kernel's record of the head at the first use on each thread.

#include <atomic>
#include <chrono>
#include <cstdint>
#include <linux/futex.h>
#include <optional>
#include <sys/syscall.h>
#include <sys/types.h>
#include <unistd.h>

namespace mp::sys {

namespace detail {
// Cleared in a forked child (pthread_atfork, in futex_mutex.cpp), where the surviving thread has
// a new id; mp forks only through fork(), which runs the handlers.
inline thread_local pid_t cached_tid = 0;
}  // namespace detail

/// The calling thread's kernel id (what a FutexMutex's word holds), cached per thread.
inline pid_t this_thread_id() noexcept {
    if (detail::cached_tid == 0) detail::cached_tid = static_cast<pid_t>(::syscall(SYS_gettid));
    return detail::cached_tid;
}

/// Lives in memory shared between processes; all-zero bytes are an unlocked mutex.
struct FutexMutex {
    enum class Result { busy, acquired, owner_died, held_by_caller };

    /// Takes the mutex for thread `me` (the caller's kernel thread id). With `block` false, fails
    /// (busy) at once when held; else waits until `deadline` (absolute, steady clock;
    /// std::nullopt: for ever). owner_died: acquired, and the previous holder died holding it
    /// (its protected state may be half-updated). held_by_caller: `me` holds it already (never
    /// waits: the caller decides between recursion and an error).
    Result lock(pid_t me, bool block, const std::optional<std::chrono::steady_clock::time_point>& deadline);

    /// Releases the mutex, which the calling thread holds.
    void unlock() noexcept;

    /// Releases the mutex, which the calling thread holds, as if the holder had died: the next
    /// locker gets owner_died (for a holder whose repair of the protected state failed).
    void abandon() noexcept;

    /// The holder's thread id, 0 when free (or held by a thread that died: the kernel cleared it).
    pid_t owner() const noexcept {
        return static_cast<pid_t>(word.load(std::memory_order_relaxed) & FUTEX_TID_MASK);
    }

    // Layout fixed by the robust list (see above); public only so that it stays standard-layout.
    std::atomic<std::uint32_t> word;
    std::uint32_t reserved[5];
    void* prev;  // the robust list's previous entry (its `next` field), while held
    void* next;  // the robust list's next entry; the list links these fields

private:
    Result lock_slow(pid_t me, bool block,
                     const std::optional<std::chrono::steady_clock::time_point>& deadline,
                     std::uint32_t seen);
    void unlock_slow(std::uint32_t leave) noexcept;
    // Stores `leave` (0, or FUTEX_OWNER_DIED) as the word, which the caller holds and last saw
    // as `seen`, keeping FUTEX_WAITERS, and wakes a waiter if the bit was set.
    void release(std::uint32_t seen, std::uint32_t leave) noexcept;
    void link(robust_list_head* head) noexcept;
    void unlink() noexcept;
};

namespace detail {
// This thread's robust-list head (glibc's), once the thread has taken a FutexMutex: looked up
// with get_robust_list at its first lock. A forked child's thread keeps its thread block, hence
// the same head (glibc empties the child's list in fork).
inline thread_local robust_list_head* robust_head = nullptr;

// The kernel may read the list at any instruction (the thread's death), like a signal handler:
// only the compiler's order matters, the thread's own stores are seen in program order.
inline void set_pending(robust_list_head* head, void* entry) noexcept {
    std::atomic_signal_fence(std::memory_order_seq_cst);
    head->list_op_pending = static_cast<robust_list*>(entry);
    std::atomic_signal_fence(std::memory_order_seq_cst);
}
}  // namespace detail

// The fast paths, inline: taking a free mutex is one CAS plus a few stores to this thread's list,
// releasing one CAS (the out-of-line release, with its FUTEX_WAKE, only when a waiter set
// FUTEX_WAITERS). ThreadSanitizer builds take the out-of-line paths, which tell it about the lock.
inline FutexMutex::Result FutexMutex::lock(
    pid_t me, bool block, const std::optional<std::chrono::steady_clock::time_point>& deadline) {
#if !defined(__SANITIZE_THREAD__)
    if (robust_list_head* head = detail::robust_head; head != nullptr) {
        // Announced before the CAS: a death between the CAS and the link still gets the word
        // marked (the kernel checks the pending entry too).
        detail::set_pending(head, &next);
        std::uint32_t v = 0;
        if (word.compare_exchange_strong(v, static_cast<std::uint32_t>(me),
                                         std::memory_order_acquire, std::memory_order_relaxed)) {
            link(head);
            detail::set_pending(head, nullptr);
            return Result::acquired;
        }
        detail::set_pending(head, nullptr);
        // The slow path goes on from the value seen: no second read of a contended line.
        return lock_slow(me, block, deadline, v);
    }
#endif
    return lock_slow(me, block, deadline, word.load(std::memory_order_relaxed));
}

inline void FutexMutex::unlock() noexcept {
#if !defined(__SANITIZE_THREAD__)
    robust_list_head* head = detail::robust_head;  // set by the lock this thread holds
    if (head == nullptr) return unlock_slow(0);    // (unless taken by another copy of this code)
    detail::set_pending(head, &next);
    unlink();
    // Held by this thread with nobody waiting: the word is exactly its id (callers lock with
    // this_thread_id()).
    std::uint32_t v = static_cast<std::uint32_t>(this_thread_id());
    if (!word.compare_exchange_strong(v, 0, std::memory_order_release, std::memory_order_relaxed))
        release(v, 0);
    detail::set_pending(head, nullptr);
#else
    unlock_slow(0);
#endif
}

inline void FutexMutex::abandon() noexcept { unlock_slow(FUTEX_OWNER_DIED); }

inline void FutexMutex::link(robust_list_head* head) noexcept {
    // Entries are the `next` fields; an entry's `prev` sits just before it (for the head,
    // glibc's robust_prev word): glibc's own doubly-linked discipline, which it relies on too.
    void* first = head->list.next;
    *reinterpret_cast<void**>(static_cast<char*>(first) - sizeof(void*)) = &next;
    // Stored only when they change: a thread that takes it again (or a process forked from the
    // same thread, whose list head is at the same address) finds them as they must be.
    if (next != first) next = first;
    if (prev != &head->list) prev = &head->list;
    std::atomic_signal_fence(std::memory_order_seq_cst);
    head->list.next = reinterpret_cast<robust_list*>(&next);
}

inline void FutexMutex::unlink() noexcept {
    *reinterpret_cast<void**>(static_cast<char*>(next) - sizeof(void*)) = prev;
    *static_cast<void**>(prev) = next;
}

}  // namespace mp::sys
