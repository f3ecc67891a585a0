// The operations on mp's shared lock and condition state (see sync_state.hpp): a robust
// process-shared mutex with mp's own record of the holder, and a condition that wakes exactly n.

#include "sync_state.hpp"

#include <algorithm>
#include <cerrno>
#include <climits>
#include <ctime>
#include <string>

#include "sys/error.hpp"
#include "sys/robust_mutex.hpp"

namespace mp::detail::sync {

namespace {

void on_fork_child() noexcept { cached_tid = 0; }

[[maybe_unused]] const int atfork_registered = ::pthread_atfork(nullptr, nullptr, &on_fork_child);

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

void init_robust_mutex(pthread_mutex_t& m) {
    pthread_mutexattr_t attr;
    sys::check_ret(::pthread_mutexattr_init(&attr), "pthread_mutexattr_init");
    struct AttrGuard {
        pthread_mutexattr_t* a;
        ~AttrGuard() { ::pthread_mutexattr_destroy(a); }
    } guard{&attr};
    sys::check_ret(::pthread_mutexattr_setpshared(&attr, PTHREAD_PROCESS_SHARED),
                   "pthread_mutexattr_setpshared");
    sys::check_ret(::pthread_mutexattr_setrobust(&attr, PTHREAD_MUTEX_ROBUST),
                   "pthread_mutexattr_setrobust");
    // Error-checking: an unlock by a thread that does not hold it fails instead of corrupting.
    sys::check_ret(::pthread_mutexattr_settype(&attr, PTHREAD_MUTEX_ERRORCHECK),
                   "pthread_mutexattr_settype");
    sys::check_ret(::pthread_mutex_init(&m, &attr), "pthread_mutex_init");
}

void init_mutex(MutexCore& c) { init_robust_mutex(c.mutex); }

namespace {


// Locks the pthread mutex itself; false when busy or timed out. A holder that died is recovered
// here: the mutex is made consistent at once (so a later holder never finds it unrecoverable)
// and owner_died is set for the new holder to see. A wait goes in slices (sys::lock_robust): a
// robust mutex can lose its wake-up when a waiter is killed.
bool lock_mutex(MutexCore& c, LockMode mode, const Deadline& deadline) {
    const int rc = sys::lock_robust(&c.mutex, mode != LockMode::try_once,
                                    mode == LockMode::block ? Deadline{} : deadline);
    switch (rc) {
        case 0:
            c.owner_died.store(0, std::memory_order_relaxed);
            return true;
        case EOWNERDEAD:
            sys::check_ret(::pthread_mutex_consistent(&c.mutex), "pthread_mutex_consistent");
            c.owner_died.store(1, std::memory_order_relaxed);
            return true;
        case EBUSY:
        case ETIMEDOUT:
            return false;
        default:
            sys::throw_system_error(rc, "pthread_mutex_lock (robust)");
    }
}

void unlock_mutex(MutexCore& c) {
    sys::check_ret(::pthread_mutex_unlock(&c.mutex), "pthread_mutex_unlock");
}

}  // namespace

// Whether a thread of this process holds `m`: its futex word names the holder's thread id, and
// tgkill(getpid(), tid, 0) succeeds only for a thread of this process (a dead holder's id is
// cleared from the word by the kernel, so a reused id is never mistaken for it).
bool held_in_this_process(const pthread_mutex_t& m) noexcept {
#if defined(__GLIBC__)
    const auto tid = static_cast<pid_t>(
        static_cast<unsigned>(__atomic_load_n(&m.__data.__lock, __ATOMIC_RELAXED)) &
        FUTEX_TID_MASK);
    return tid != 0 && ::syscall(SYS_tgkill, ::getpid(), tid, 0) == 0;
#else
    (void)m;
    return true;  // unknown: keep the mapping (the cost is a small leak, never a lost death)
#endif
}

// Acquire with Lock/RLock semantics; `what` names the operation in errors.
bool mutex_acquire(MutexCore& c, bool recursive, LockMode mode, const Deadline& deadline,
                   const char* what) {
    const pid_t me = current_tid();
    if (held_by_me(c)) {
        if (recursive) {
            ++c.count;
            return true;
        }
        switch (mode) {
            case LockMode::try_once: return false;
            case LockMode::block: throw_errc(std::errc::resource_deadlock_would_occur, what);
            case LockMode::timed: {
                // Python's Lock would wait out the timeout and fail: only this thread can release.
                timespec ts = to_timespec(*deadline);
                while (::clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &ts, nullptr) == EINTR) {
                }
                return false;
            }
        }
    }
    if (mode == LockMode::timed && !deadline) mode = LockMode::block;
    if (!lock_mutex(c, mode, deadline)) return false;
    c.owner.store(me, std::memory_order_relaxed);
    c.count = 1;
    return true;
}

void mutex_release(MutexCore& c, bool recursive, const char* what) {
    if (!held_by_me(c)) {
        if (c.owner.load(std::memory_order_relaxed) == 0)
            throw std::system_error(std::make_error_code(std::errc::operation_not_permitted),
                                    std::string(what) + ": the lock is not held (released too many times)");
        throw std::system_error(std::make_error_code(std::errc::operation_not_permitted),
                                std::string(what) + ": the lock is held by another thread");
    }
    if (recursive && c.count > 1) {
        --c.count;
        return;
    }
    // Clear the record before unlocking: afterwards another thread may own it and write it.
    c.count = 0;
    c.owner.store(0, std::memory_order_relaxed);
    unlock_mutex(c);
}

// Releases every level (Condition::wait); returns the depth to restore.
std::uint32_t mutex_release_all(MutexCore& c) {
    const std::uint32_t depth = c.count;
    c.count = 0;
    c.owner.store(0, std::memory_order_relaxed);
    unlock_mutex(c);
    return depth;
}

void mutex_reacquire(MutexCore& c, std::uint32_t depth) {
    (void)lock_mutex(c, LockMode::block, std::nullopt);
    c.owner.store(current_tid(), std::memory_order_relaxed);
    c.count = depth;
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
            // changes seq, so the sleep returns at once.
            const std::uint32_t s = c.seq.load();
            if (s != my_seq && take_signal(c)) {
                woken = true;
                break;
            }
            if (futex_wait(c.seq, s, deadline) == FutexResult::timed_out) {
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
    futex_wake(c.seq, static_cast<int>(std::min<std::uint32_t>(signals_of(next), INT_MAX)));
}

}  // namespace mp::detail::sync
