// The operations on mp's shared lock and condition state (see sync_state.hpp): a robust
// process-shared mutex with mp's own record of the holder, and a condition that wakes exactly n.

#include "sync_state.hpp"

#include <algorithm>
#include <cerrno>
#include <climits>
#include <ctime>
#include <string>

#include "sys/error.hpp"
#include "sys/futex.hpp"

namespace mp::detail::sync {

namespace {

timespec to_timespec(std::chrono::steady_clock::time_point t) noexcept {
    auto ns = std::chrono::duration_cast<std::chrono::nanoseconds>(t.time_since_epoch()).count();
    if (ns < 0) ns = 0;
    timespec ts{};
    ts.tv_sec = static_cast<time_t>(ns / 1'000'000'000);
    ts.tv_nsec = static_cast<long>(ns % 1'000'000'000);
    return ts;
}

}  // namespace

[[noreturn]] void throw_errc(std::errc e, const char* what) {
    throw std::system_error(std::make_error_code(e), what);
}

const char* kind_name(Kind k) {
    switch (k) {
        case Kind::lock: return "mp::Lock";
        case Kind::rlock: return "mp::RLock";
        case Kind::semaphore: return "mp::Semaphore";
        case Kind::bounded_semaphore: return "mp::BoundedSemaphore";
        case Kind::condition: return "mp::Condition";
        case Kind::event: return "mp::Event";
        case Kind::barrier: return "mp::Barrier";
    }
    return "mp synchronisation object";
}

// ---------------------------------------------------------------------------------------------
// Mutex operations.

namespace {


// Records a holding just taken: a holder that died is recovered here, owner_died is set for the
// new holder to see (the lock itself needs no repair).
// Each field is written only when it changes: the word's cache line is contended, and a store
// after a waiter's read costs another transfer of the line; in the common case (a depth of 1, no
// death) the previous holder left both as they should be.
void took(MutexCore& c, sys::FutexMutex::Result r, std::uint32_t depth) noexcept {
    const std::uint32_t died = r == sys::FutexMutex::Result::owner_died ? 1 : 0;
    if (c.owner_died.load(std::memory_order_relaxed) != died)
        c.owner_died.store(died, std::memory_order_relaxed);
    if (c.count != depth) c.count = depth;
}

}  // namespace

// Whether a thread of this process holds `m`: its word names the holder's thread id, and
// tgkill(getpid(), tid, 0) succeeds only for a thread of this process (a dead holder's id is
// cleared from the word by the kernel, so a reused id is never mistaken for it).
bool held_in_this_process(const MutexCore& m) noexcept {
    const pid_t tid = m.mutex.owner();
    return tid != 0 && ::syscall(SYS_tgkill, ::getpid(), tid, 0) == 0;
}

void mutex_force_release(MutexCore& c) noexcept {
    c.count = 0;
    c.mutex.unlock();
}

// Acquire with Lock/RLock semantics; `what` names the operation in errors.
bool mutex_acquire(MutexCore& c, bool recursive, LockMode mode, const Deadline& deadline,
                   const char* what) {
    if (mode == LockMode::timed && !deadline) mode = LockMode::block;
    // One call: a free lock costs one CAS, with no read of the (contended) word before it; only
    // a busy lock learns whether this thread is the holder.
    static const Deadline forever{};
    const auto r = c.mutex.lock(current_tid(), mode != LockMode::try_once,
                                mode == LockMode::block ? forever : deadline);
    switch (r) {
        case sys::FutexMutex::Result::acquired:
        case sys::FutexMutex::Result::owner_died: took(c, r, 1); return true;
        case sys::FutexMutex::Result::busy: return false;
        case sys::FutexMutex::Result::held_by_caller: break;
    }
    if (recursive) {
        ++c.count;
        return true;
    }
    switch (mode) {
        case LockMode::try_once: return false;
        case LockMode::block: throw_errc(std::errc::resource_deadlock_would_occur, what);
        case LockMode::timed: break;
    }
    // Python's Lock would wait out the timeout and fail: only this thread can release.
    timespec ts = to_timespec(*deadline);
    while (::clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &ts, nullptr) == EINTR) {
    }
    return false;
}

void mutex_release(MutexCore& c, bool recursive, const char* what) {
    if (!held_by_me(c)) {
        if (c.mutex.owner() == 0)
            throw std::system_error(std::make_error_code(std::errc::operation_not_permitted),
                                    std::string(what) + ": the lock is not held (released too many times)");
        throw std::system_error(std::make_error_code(std::errc::operation_not_permitted),
                                std::string(what) + ": the lock is held by another thread");
    }
    if (recursive && c.count > 1) {
        --c.count;
        return;
    }
    // The depth (1) stays for the next holder, who finds it as it needs it (see took).
    c.mutex.unlock();
}

// Releases every level (Condition::wait); returns the depth to restore.
std::uint32_t mutex_release_all(MutexCore& c) {
    const std::uint32_t depth = c.count;
    c.count = 0;
    c.mutex.unlock();
    return depth;
}

void mutex_reacquire(MutexCore& c, std::uint32_t depth) {
    took(c, c.mutex.lock(current_tid(), true, std::nullopt), depth);
}

// ---------------------------------------------------------------------------------------------
// Condition operations (see CondCore).
namespace {


constexpr std::uint64_t one_signal = std::uint64_t{1} << 32;

std::uint32_t waiting_of(std::uint64_t v) noexcept { return static_cast<std::uint32_t>(v); }
std::uint32_t signals_of(std::uint64_t v) noexcept { return static_cast<std::uint32_t>(v >> 32); }

// Takes a granted wake-up if one is pending.
bool take_signal(CondCore& c) noexcept {
    std::uint64_t v = c.counts.load();
    while (signals_of(v) > 0) {
        if (c.counts.compare_exchange_weak(v, v - one_signal)) return true;
    }
    return false;
}

// A waiter leaving without having taken a signal (timeout, error): it takes a signal when it is
// eligible for one (a notify since it registered, which may have granted it the wake-up), else
// gives back its waiting unit. Returns whether it counts as woken.
bool leave_wait(CondCore& c, std::uint32_t my_seq) noexcept {
    std::uint64_t v = c.counts.load();
    for (;;) {
        const bool eligible = c.seq.load() != my_seq;
        std::uint64_t next;
        bool woken;
        if (eligible && signals_of(v) > 0) {
            next = v - one_signal;
            woken = true;
        } else if (waiting_of(v) > 0) {
            next = v - 1;
            woken = false;
        } else if (signals_of(v) > 0) {
            // A notify granted this waiter's unit but has not bumped seq yet.
            next = v - one_signal;
            woken = true;
        } else {
            return false;  // unreachable while the invariant holds
        }
        if (c.counts.compare_exchange_weak(v, next)) return woken;
    }
}

}  // namespace

// Condition::wait on `m` (held by the caller, checked by the caller).
bool cond_wait(CondCore& c, MutexCore& m, const Deadline& deadline) {
    // Registered under the lock: a notify that runs after we release the lock sees us.
    const std::uint32_t my_seq = c.seq.load();
    c.counts.fetch_add(1);
    const std::uint32_t depth = mutex_release_all(m);
    bool woken = false;
    try {
        for (;;) {
            // Read seq before checking for a signal: a notify between the check and the sleep
            // changes seq, so the sleep returns at once. The sleep is sliced: a notify wakes as
            // many sleepers as it grants signals, and a woken waiter killed before it takes its
            // signal leaves that signal for an eligible waiter that looks again.
            const std::uint32_t s = c.seq.load();
            if (s != my_seq && take_signal(c)) {
                woken = true;
                break;
            }
            if (sys::futex_wait_sliced(c.seq, s, deadline) == sys::FutexResult::timed_out) {
                woken = leave_wait(c, my_seq);
                break;
            }
        }
    } catch (...) {
        (void)leave_wait(c, my_seq);
        mutex_reacquire(m, depth);
        throw;
    }
    mutex_reacquire(m, depth);
    return woken;
}

void cond_notify(CondCore& c, std::uint32_t n) {
    if (n == 0) return;
    std::uint64_t v = c.counts.load();
    std::uint32_t granted;
    std::uint64_t next;
    do {
        granted = std::min(n, waiting_of(v));
        if (granted == 0) return;
        next = v - granted + granted * one_signal;
    } while (!c.counts.compare_exchange_weak(v, next));
    c.seq.fetch_add(1);
    // Wake as many sleepers as there are pending signals: a woken thread that finds none (an
    // awake waiter took it first) simply sleeps again, so the count of true returns stays exact.
    sys::futex_wake(c.seq, static_cast<int>(std::min<std::uint32_t>(signals_of(next), INT_MAX)));
}

}  // namespace mp::detail::sync
