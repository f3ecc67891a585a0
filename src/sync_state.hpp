#pragma once
// The state that mp's locks, conditions, semaphores, events and barriers keep in shared memory:
// the block layout (a header naming the kind of object, then its core) and the operations on a
// robust process-shared mutex and on the condition built beside it. synchronize.cpp builds the
// public objects on top; nothing here knows about handles, codecs or the attach registry.

#include <atomic>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <linux/futex.h>
#include <new>
#include <pthread.h>
#include <sys/syscall.h>
#include <sys/types.h>
#include <system_error>
#include <unistd.h>

#include "mp/detail/shared_block.hpp"
#include "mp/synchronize.hpp"
#include "sys/futex.hpp"
#include "sys/futex_mutex.hpp"

namespace mp::detail::sync {

// The calling thread's id (cached: see sys::this_thread_id).
inline pid_t current_tid() noexcept { return sys::this_thread_id(); }

[[noreturn]] void throw_errc(std::errc e, const char* what);

// ---------------------------------------------------------------------------------------------
// Shared block layout: a header naming the kind of object, then the object's state.

constexpr std::uint32_t block_magic = 0x6d705359;  // "mpSY"

enum class Kind : std::uint32_t {
    lock = 1,
    rlock,
    semaphore,
    bounded_semaphore,
    condition,
    event,
    barrier,
};

struct Header {
    std::uint32_t magic;
    Kind kind;
};

// A robust, process-shared mutex (sys::FutexMutex: its word holds the holder's thread id, and
// the kernel marks it when the holder dies) plus what only the holder writes: `count`, the RLock
// depth, and `owner_died`, set while the current holding was recovered from a dead holder. Both
// share the word's cache line and mean something only while the mutex is held: each holder
// writes them only when they differ from what the last one left (see took in sync_state.cpp).
struct MutexCore {
    sys::FutexMutex mutex;
    std::uint32_t count;                     // recursion depth (RLock), 1 for a held Lock
    std::atomic<std::uint32_t> owner_died;   // 1: the current holding was recovered from the dead
};

// A semaphore: the futex word is the count itself. `waiters` counts threads that may sleep, so
// release skips the wake-up system call when there are none. A waiter killed while registered
// leaves `waiters` too high forever: that only costs releasers a (harmless) system call.
struct SemaphoreCore {
    std::atomic<std::uint32_t> value;
    std::atomic<std::uint32_t> waiters;
    // The most permits release() may leave: a BoundedSemaphore's initial value (0 included),
    // else INT_MAX.
    std::uint32_t max;
};

// A condition variable that wakes exactly n waiters (see cond_wait and cond_notify).
//   seq:    the futex word; bumped by every notify that grants anything, so a waiter can tell
//           whether a notify happened since it registered ("eligible") and sleeps on it.
//   counts: low 32 bits: waiters registered and not granted a wake-up ("waiting");
//           high 32 bits: wake-ups granted and not yet taken ("signals").
// Invariant: waiting + signals == threads inside wait() (plus waiters that died there). Each
// waiter leaves by taking one unit: a signal (wait returns true) or, on timeout, a waiting unit
// (false). Registration and notify happen under the lock, so a waiter registered after a notify
// is never eligible for it.
struct CondCore {
    std::atomic<std::uint32_t> seq;
    std::atomic<std::uint64_t> counts;
};

// An event: bit 0 is the flag, the upper bits count set() calls, so a waiter notices a set()
// even when clear() follows before it runs.
struct EventCore {
    std::atomic<std::uint32_t> word;
    std::atomic<std::uint32_t> waiters;
};

// A barrier: Python's threading.Barrier state machine under a robust mutex and a condition,
// plus two PartySlots per party, which the block holds after the core. Every field is written
// with the mutex held.
struct BarrierCore {
    MutexCore mutex;
    CondCore cond;
    std::int32_t parties;
    std::int32_t state;  // 0 filling, 1 draining, 2 running the action, -1 resetting, -2 broken
    std::int32_t count;  // parties counted in the round: the slots occupied as `counted`
    std::int32_t has_timeout;
    std::int64_t timeout_ns;
    std::int32_t slots_ready;   // slots [0, slots_ready) have been initialised
    std::int32_t entering;      // parties waiting to enter that hold a slot: at most `parties`
    std::int64_t next_scan_ns;  // steady clock: when a waiter next looks for dead parties
    std::int32_t break_next;    // a party died waiting to enter: the next round opens broken
    std::int32_t reserved;
};

// A party's proof of life: it holds its slot's robust mutex from arrival until it leaves wait().
// When its process dies, the kernel marks the mutex's owner dead, and a trylock by anyone else
// returns EOWNERDEAD instead of EBUSY: a dead party is known without its help and without pids
// (which may be reused). The block holds 2 x parties slots: the round's counted parties, and as
// many again waiting for the previous round to drain (or a reset, or the action) to enter the next.
struct PartySlot {
    pthread_mutex_t mutex;
    std::int32_t occupied;  // 0 free, 1 counted in `count`, 2 waiting to enter (`entering`)
    std::int32_t reserved;
};
inline constexpr std::int32_t slot_free = 0, slot_counted = 1, slot_entering = 2;

template <class Core>
struct Block {
    Header header;
    Core core;
};

const char* kind_name(Kind k);

template <class Core>
SharedBlock create_block(Kind kind, std::size_t extra = 0) {
    SharedBlock b = SharedBlock::create(sizeof(Block<Core>) + extra, kind_name(kind));
    // The memfd is zero-filled: zero is the initial state of every atomic here.
    auto* blk = new (b.data()) Block<Core>{};
    blk->header.magic = block_magic;
    blk->header.kind = kind;
    return b;
}

template <class Core>
Core* core_of(const SharedBlock& b) noexcept {
    return &static_cast<Block<Core>*>(b.data())->core;
}

// ---------------------------------------------------------------------------------------------
// Mutex operations.

enum class LockMode { block, try_once, timed };

// The word names the holder; the kernel clears a dead holder's id, so a thread that happens to
// get a dead holder's (reused) id never mistakes that holding for its own.
inline bool held_by_me(const MutexCore& c) noexcept { return c.mutex.owner() == current_tid(); }

// Whether a thread of this process holds `m` (see sync_state.cpp).
bool held_in_this_process(const MutexCore& m) noexcept;

// Releases a lock the calling thread holds, whatever its depth (a handle going away).
void mutex_force_release(MutexCore& c) noexcept;

// Acquire with Lock/RLock semantics; `what` names the operation in errors.
bool mutex_acquire(MutexCore& c, bool recursive, LockMode mode, const Deadline& deadline,
                   const char* what);
void mutex_release(MutexCore& c, bool recursive, const char* what);

// ---------------------------------------------------------------------------------------------
// Condition operations (see CondCore).

// Condition::wait on `m` (held by the caller, checked by the caller).
bool cond_wait(CondCore& c, MutexCore& m, const Deadline& deadline);
void cond_notify(CondCore& c, std::uint32_t n);

}  // namespace mp::detail::sync
