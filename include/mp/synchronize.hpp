#pragma once
/// \file
/// Process-shared synchronisation, as Python's multiprocessing.synchronize: Lock, RLock,
/// Semaphore, BoundedSemaphore, Condition, Event and Barrier.
///
///     mp::Lock lock;
///     mp::Process p([lock]() mutable { std::lock_guard g(lock); /* ... */ });
///     p.start();
///     { std::lock_guard g(lock); /* ... */ }
///     p.join();
///
/// Sharing. Every object is a cheap, copyable handle on a small block of shared memory (a memfd,
/// so nothing appears in /dev/shm and nothing can leak there). Copies refer to the same lock,
/// semaphore, ...; the memory goes when the last handle in the last process goes.
/// Each object keeps its memfd open while a handle on it lives in the process (to send it on):
/// one descriptor per Lock, RLock, Semaphore, Event, Condition or Barrier, two per Value or
/// Array with a lock. Python's locks keep none, so a program that makes thousands of them may
/// need a higher RLIMIT_NOFILE (`ulimit -n`; making one fails with std::system_error EMFILE).
/// - fork: a Process target's arguments (and captures) are copied into the child, and the copies
///   refer to the same shared state: pass the handle by value.
/// - forkserver (and anything else that sends values with mp::Codec): every type has a Codec
///   that sends its memfd along (SCM_RIGHTS); the receiver maps the same memory. Receiving an
///   object this process already has (the same memfd) gives a handle on the existing mapping.
///
/// Waiting. Every blocking call has a timed form taking a std::chrono duration (or, for the
/// std-style names, a time point of any clock); timeouts are measured on the steady clock. A
/// waiting thread sleeps in the kernel (futex), so it uses next to no CPU; semaphores, events,
/// conditions and barriers wake every 50 ms to look again (see "Death of other parties"). A
/// thread blocked on a Lock or RLock first spins for a few microseconds (reading the lock at
/// growing intervals, ~1,000 pause instructions) before it sleeps: most critical sections are
/// shorter than a sleep and its wake-up, and a waiter that has not gone to sleep costs the
/// holder's unlock no system call. Asleep, it needs no periodic look: a wake-up given to a waiter
/// that dies before it takes the lock is passed on by the lock's next holder.
///
/// Locks. Lock and RLock are robust, process-shared mutexes on one futex word (its holder's
/// thread id; the kernel's robust-futex list marks it when the holder dies):
/// - They meet Lockable and TimedLockable (lock, try_lock, unlock, try_lock_for, try_lock_until),
///   so std::lock_guard, std::unique_lock and std::scoped_lock work; Python's acquire/release are
///   there too.
/// - Unlike Python's multiprocessing.Lock (a semaphore), a Lock is owned by the thread that
///   acquired it and only that thread may release it. Use a Semaphore (or BoundedSemaphore) of 1
///   to hand a permit from one process to another.
/// - Owner death: when the thread or process holding a lock dies (even by SIGKILL), the next
///   acquirer gets the lock normally, and owner_died() returns true while it holds it. The lock
///   itself is consistent again at once; what it protected may be half-updated, so check
///   owner_died() after acquiring wherever that matters:
///       std::lock_guard g(lock);
///       if (lock.owner_died()) repair_shared_state();
///   A Condition's or Barrier's lock is recovered the same way (a Barrier whose internal lock was
///   recovered is broken, since its count can no longer be trusted).
/// - Destroying handles never releases a lock: when the last handle in a process goes while a
///   thread of that process holds the lock, it stays held (and its memory stays mapped, with its
///   descriptor open, until the process ends), so a process that ends holding it, by returning, throwing or being killed,
///   under any start method, is a dead owner for the next acquirer.
///
/// Errors (misuse throws std::system_error, as std::mutex and std::unique_lock do):
/// - releasing a Lock or RLock that the calling thread does not hold (Python's ValueError
///   "semaphore or lock released too many times" for a Lock, AssertionError for an RLock
///   released by a non-owner): std::errc::operation_not_permitted;
/// - a blocking acquire of a Lock the calling thread already holds (it would wait forever):
///   std::errc::resource_deadlock_would_occur; try_lock returns false and a timed acquire waits
///   out its timeout and returns false, as Python does;
/// - Condition::wait/notify without holding its lock: std::errc::operation_not_permitted;
/// - releasing a BoundedSemaphore above its initial value (Python's ValueError):
///   std::errc::value_too_large;
/// - a negative initial value or a Barrier of fewer than one party: std::invalid_argument;
/// - a broken Barrier: mp::BrokenBarrierError.
///
/// Death of other parties. A process killed while it waits on a Semaphore, Event or Condition
/// leaves the others working. release() and notify() wake as many sleepers as they grant; one
/// killed after it was woken and before it took its permit or wake-up leaves it to another
/// waiter (one that was waiting when notify() ran, for a Condition), which takes it within the
/// 50 ms wait slice. A party killed inside Barrier::wait() breaks the barrier: the other
/// parties get BrokenBarrierError (those already waiting within about 100 ms, a party arriving
/// to complete the round at once), and reset() makes it usable again. A semaphore count is not owned, so a process killed between
/// acquire and release takes its permit with it (as in Python). A Condition waiter killed inside
/// wait() may let one later notify() wake one waiter more than it asked for (a spurious wake-up,
/// which wait_for absorbs).

#include <chrono>
#include <concepts>
#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <type_traits>
#include <utility>

#include "mp/detail/deadline.hpp"
#include "mp/detail/task.hpp"
#include "mp/errors.hpp"
#include "mp/serialize.hpp"

namespace mp {

namespace detail {
struct MutexImpl;
struct SemaphoreImpl;
struct ConditionImpl;
struct EventImpl;
struct BarrierImpl;
struct SyncAccess;
}  // namespace detail

/// Who holds a Lock or RLock at this moment (what Python's RLock repr tells: its own name,
/// 'SomeOtherThread', 'SomeOtherProcess' or 'None').
enum class LockHolder { none, this_thread, other_thread, other_process };

namespace detail {

/// The standard names (Lockable, TimedLockable), so std::lock_guard, std::unique_lock and
/// std::scoped_lock work, for a D with acquire(bool), release() and acquire_until(Deadline).
template <class D>
class StdLockable {
public:
    /// Waits at most `timeout`; returns false when it ran out.
    template <class Rep, class Period>
    [[nodiscard]] bool acquire(std::chrono::duration<Rep, Period> timeout) {
        return self().acquire_until(deadline_after(timeout));
    }
    /// std-style acquire (Lockable).
    void lock() { (void)self().acquire(true); }
    /// std-style non-blocking acquire (Lockable); true when it acquired.
    [[nodiscard]] bool try_lock() { return self().acquire(false); }
    /// std-style release (Lockable).
    void unlock() { self().release(); }
    /// std-style timed acquire (TimedLockable); true when it acquired.
    template <class Rep, class Period>
    [[nodiscard]] bool try_lock_for(std::chrono::duration<Rep, Period> timeout) {
        return self().acquire_until(deadline_after(timeout));
    }
    /// std-style timed acquire until a time point of any clock (TimedLockable).
    template <class Clock, class Duration>
    [[nodiscard]] bool try_lock_until(std::chrono::time_point<Clock, Duration> when) {
        return self().acquire_until(deadline_at(when));
    }

private:
    D& self() noexcept { return static_cast<D&>(*this); }
};

/// What Lock and RLock share; see those classes.
class BasicLock : public StdLockable<BasicLock> {
public:
    /// Waits for the lock (block = true) or tries once (block = false); returns whether the lock
    /// was acquired. Never returns false when blocking.
    bool acquire(bool block = true);
    /// acquire(timeout): see StdLockable.
    using StdLockable<BasicLock>::acquire;
    /// Releases the lock; throws std::system_error(operation_not_permitted) when the calling
    /// thread does not hold it.
    void release();

    /// True while the calling thread holds the lock and got it from a holder that died holding
    /// it (the protected data may be inconsistent). Meaningful only while holding the lock.
    bool owner_died() const;
    /// True when the calling thread holds the lock.
    bool held() const;
    /// True while any thread of any process holds the lock (Python 3.14's locked()). A snapshot:
    /// another thread or process may take or release it at once. A lock whose holder died is
    /// not locked: the next acquirer gets it (and owner_died()).
    bool locked() const;
    /// Who holds the lock now (a snapshot, as locked()).
    LockHolder holder() const;

protected:
    BasicLock(std::shared_ptr<MutexImpl> impl, const char* type) noexcept
        : impl_(std::move(impl)), type_(type) {}
    bool acquire_until(const Deadline& deadline);

private:
    friend struct detail::SyncAccess;
    friend class StdLockable<BasicLock>;
    const std::shared_ptr<MutexImpl>& checked() const;
    std::shared_ptr<MutexImpl> impl_;
    const char* type_;  // "mp::Lock" or "mp::RLock", for the message of a handle moved from
};

}  // namespace detail

/// A process-shared, robust, non-recursive mutex (Python's multiprocessing.Lock, with owner
/// semantics: only the acquiring thread may release it). See the header comment.
class Lock : public detail::BasicLock {
public:
    /// A new, unlocked lock in fresh shared memory.
    Lock();

private:
    friend struct detail::SyncAccess;
    explicit Lock(std::shared_ptr<detail::MutexImpl> impl) noexcept : BasicLock(std::move(impl), "mp::Lock") {}
};

/// A process-shared, robust, recursive mutex (Python's multiprocessing.RLock): the holding
/// thread may acquire it again, and must release it as many times.
class RLock : public detail::BasicLock {
public:
    /// A new, unlocked recursive lock in fresh shared memory.
    RLock();
    /// How many times the calling thread holds the lock (0 when it does not hold it).
    unsigned recursion_count() const;

private:
    friend struct detail::SyncAccess;
    explicit RLock(std::shared_ptr<detail::MutexImpl> impl) noexcept
        : BasicLock(std::move(impl), "mp::RLock") {}
};

/// A process-shared counting semaphore (Python's multiprocessing.Semaphore). Not owned: any
/// thread of any process may release. Also Lockable (lock = acquire, unlock = release).
class Semaphore : public detail::StdLockable<Semaphore> {
public:
    /// A semaphore holding `value` permits; throws std::invalid_argument when negative.
    explicit Semaphore(int value = 1);

    /// Takes a permit, waiting for one (block = true) or not (block = false); returns whether a
    /// permit was taken.
    bool acquire(bool block = true);
    /// acquire(timeout): waits at most `timeout` for a permit (see StdLockable).
    using detail::StdLockable<Semaphore>::acquire;
    /// Returns a permit and wakes one waiter. A BoundedSemaphore throws
    /// std::system_error(value_too_large) when that would exceed its initial value.
    void release();
    /// The number of permits available now (a snapshot: other processes may change it at once).
    int get_value() const;

protected:
    Semaphore(int value, bool bounded);
    explicit Semaphore(std::shared_ptr<detail::SemaphoreImpl> impl) noexcept
        : impl_(std::move(impl)) {}

private:
    friend struct detail::SyncAccess;
    friend class detail::StdLockable<Semaphore>;
    bool acquire_until(const detail::Deadline& deadline);
    std::shared_ptr<detail::SemaphoreImpl> impl_;
};

/// A Semaphore that may not be released above its initial value (Python's BoundedSemaphore):
/// an extra release() throws std::system_error(value_too_large) and changes nothing.
class BoundedSemaphore : public Semaphore {
public:
    /// A bounded semaphore holding (at most) `value` permits.
    explicit BoundedSemaphore(int value = 1);

private:
    friend struct detail::SyncAccess;
    explicit BoundedSemaphore(std::shared_ptr<detail::SemaphoreImpl> impl) noexcept
        : Semaphore(std::move(impl)) {}
};

/// A process-shared condition variable bound to a Lock or RLock (Python's
/// multiprocessing.Condition). The lock must be held around wait() and notify(). notify(n) wakes
/// exactly min(n, number of waiters) of the threads waiting when it is called; a waiter that
/// arrives later is not woken by it. Also Lockable, through its lock.
class Condition {
public:
    /// A condition with a new RLock.
    Condition();
    /// A condition on `lock` (shared: it is the same lock as the caller's).
    explicit Condition(Lock lock);
    /// A condition on `lock` (shared: it is the same lock as the caller's).
    explicit Condition(RLock lock);

    /// Acquires the underlying lock (see Lock::acquire).
    bool acquire(bool block = true) { return base_lock().acquire(block); }
    /// Acquires the underlying lock, waiting at most `timeout`.
    template <class Rep, class Period>
    [[nodiscard]] bool acquire(std::chrono::duration<Rep, Period> timeout) {
        return base_lock().acquire(timeout);
    }
    /// Releases the underlying lock.
    void release() { base_lock().release(); }
    /// std-style acquire of the underlying lock.
    void lock() { base_lock().lock(); }
    /// std-style non-blocking acquire of the underlying lock.
    [[nodiscard]] bool try_lock() { return base_lock().try_lock(); }
    /// std-style release of the underlying lock.
    void unlock() { base_lock().unlock(); }
    /// std-style timed acquire of the underlying lock.
    template <class Rep, class Period>
    [[nodiscard]] bool try_lock_for(std::chrono::duration<Rep, Period> timeout) {
        return base_lock().try_lock_for(timeout);
    }
    /// std-style timed acquire of the underlying lock until a time point of any clock.
    template <class Clock, class Duration>
    [[nodiscard]] bool try_lock_until(std::chrono::time_point<Clock, Duration> when) {
        return base_lock().try_lock_until(when);
    }
    /// See Lock::owner_died (about the underlying lock).
    bool owner_died() const { return base_lock().owner_died(); }

    /// Releases the lock (all levels of an RLock), sleeps until notified, and reacquires the lock
    /// (restoring its level) before returning. Throws std::system_error(operation_not_permitted)
    /// when the calling thread does not hold the lock.
    void wait() { (void)wait_until_deadline(std::nullopt); }
    /// As wait(), for at most `timeout`; returns false when it ran out (the lock is held again
    /// either way).
    template <class Rep, class Period>
    [[nodiscard]] bool wait(std::chrono::duration<Rep, Period> timeout) {
        return wait_until_deadline(detail::deadline_after(timeout));
    }
    /// As wait(), until a time point of any clock; returns false when it passed.
    template <class Clock, class Duration>
    [[nodiscard]] bool wait_until(std::chrono::time_point<Clock, Duration> when) {
        return wait_until_deadline(detail::deadline_at(when));
    }
    /// Waits until pred() is true (checked first, and after each wake-up, with the lock held);
    /// returns its last result (Python's wait_for).
    template <class Predicate>
        requires std::predicate<Predicate&>
    bool wait_for(Predicate pred) {
        return wait_for_deadline(pred, std::nullopt);
    }
    /// As wait_for(pred), giving up after `timeout`: returns pred()'s last result (false when
    /// the time ran out with the predicate still false).
    template <class Predicate, class Rep, class Period>
        requires std::predicate<Predicate&>
    [[nodiscard]] bool wait_for(Predicate pred, std::chrono::duration<Rep, Period> timeout) {
        return wait_for_deadline(pred, detail::deadline_after(timeout));
    }

    /// Wakes min(n, waiting) of the threads now waiting (none for n <= 0). Throws
    /// std::system_error(operation_not_permitted) when the calling thread does not hold the lock.
    void notify(int n = 1);
    /// Wakes every thread now waiting.
    void notify_all();

private:
    friend struct detail::SyncAccess;
    Condition(std::shared_ptr<detail::ConditionImpl> impl, std::shared_ptr<detail::BasicLock> lock)
        : impl_(std::move(impl)), lock_(std::move(lock)) {}
    bool wait_until_deadline(const detail::Deadline& deadline);
    template <class Predicate>
    bool wait_for_deadline(Predicate& pred, const detail::Deadline& deadline) {
        bool result = static_cast<bool>(pred());
        while (!result) {
            if (detail::expired(deadline)) break;
            (void)wait_until_deadline(deadline);
            result = static_cast<bool>(pred());
        }
        return result;
    }

    std::shared_ptr<detail::ConditionImpl> impl_;
    // The lock as a Lock or RLock object (both share the same MutexImpl as the user's copy).
    std::shared_ptr<detail::BasicLock> lock_;
    // mp::EmptyHandle on a condition moved from.
    detail::BasicLock& base_lock() const { return detail::deref_handle(lock_, "mp::Condition"); }
};

/// A process-shared flag that threads can wait for (Python's multiprocessing.Event).
class Event {
public:
    /// A new event, not set.
    Event();

    /// True when the flag is set.
    bool is_set() const;
    /// Sets the flag and wakes every waiter.
    void set();
    /// Clears the flag.
    void clear();
    /// Waits until the flag is set.
    void wait() { (void)wait_until_deadline(std::nullopt); }
    /// Waits at most `timeout`; returns true when the flag was set (also when it was set and
    /// cleared again while this thread waited), false when the time ran out.
    template <class Rep, class Period>
    [[nodiscard]] bool wait(std::chrono::duration<Rep, Period> timeout) {
        return wait_until_deadline(detail::deadline_after(timeout));
    }

private:
    friend struct detail::SyncAccess;
    explicit Event(std::shared_ptr<detail::EventImpl> impl) noexcept : impl_(std::move(impl)) {}
    bool wait_until_deadline(const detail::Deadline& deadline);
    std::shared_ptr<detail::EventImpl> impl_;
};

/// A process-shared barrier for a fixed number of parties (Python's multiprocessing.Barrier,
/// with threading.Barrier's semantics).
///
/// The action, when given, runs in exactly one party (the last to arrive) before any party is
/// released; if it throws, the barrier breaks and that party's wait() rethrows. The action runs
/// in whichever process arrives last, so it must exist there: under fork any callable works
/// (the child has a copy); sent through mp::Codec (forkserver), the action must be transferable
/// (a function, a function pointer or a captureless lambda), or encoding throws mp::Error. It
/// runs without the barrier's internal lock: it may call abort(), reset(), n_waiting() or
/// broken(); a wait() on the same barrier from inside it throws
/// std::system_error(resource_deadlock_would_occur). If the barrier breaks while the action runs
/// (another party's timeout, abort, reset), nobody is released and that party's wait() throws
/// BrokenBarrierError once the action returns.
///
/// Dead and stuck parties. Each party inside wait() holds a robust token in the shared state, so
/// a party killed there is noticed: it breaks the round it was waiting for (the others get
/// BrokenBarrierError; one that arrives to complete the round checks first, so a round never
/// passes one party short), and leaves a round that had already completed, or a pending reset,
/// without holding them up. That includes a party killed while its wait() waited for the previous
/// round to drain (or for a reset, or the action) before entering the next: the next round opens
/// broken (reset() mends it); of the parties waiting so at once, the first `parties` hold a token. A timed wait returns by its deadline whatever the other parties do:
/// also while a previous round still drains or a reset is pending (for instance behind a stopped
/// party), in which case the barrier breaks as on any timeout. (The one exception is a peer
/// stopped during the barrier's own few instructions of bookkeeping: a wait that must reacquire
/// the internal lock after sleeping waits for it.)
class Barrier {
public:
    /// The most parties a barrier may have.
    static constexpr int max_parties = 1 << 30;

    /// A barrier for `parties` parties (1 to max_parties, else std::invalid_argument); `timeout` is the
    /// default for wait() (std::nullopt: wait forever).
    explicit Barrier(int parties, detail::Timeout timeout = std::nullopt);
    /// As above, with an action run by one party before the others are released.
    template <class F>
        requires std::invocable<std::decay_t<F>&>
    Barrier(int parties, F&& action, detail::Timeout timeout = std::nullopt)
        : Barrier(parties, timeout, std::function<void()>(action), action_task(action)) {}

    /// Waits for all parties; returns this party's arrival index, 0 .. parties()-1 (exactly one
    /// party gets each). Throws BrokenBarrierError when the barrier is or becomes broken (abort,
    /// reset while waiting, a timeout in any party, a throwing action, a party that died inside
    /// wait(), a recovered lock).
    int wait();
    /// As wait(), with `timeout` instead of the default; when it runs out the barrier breaks and
    /// BrokenBarrierError is thrown.
    template <class Rep, class Period>
    int wait(std::chrono::duration<Rep, Period> timeout) {
        return wait_until_deadline(detail::deadline_after(timeout));
    }
    /// Returns the barrier to its initial state; parties waiting now get BrokenBarrierError.
    void reset();
    /// Breaks the barrier: parties waiting now and later get BrokenBarrierError until reset().
    void abort();
    /// The number of parties needed to pass.
    int parties() const;
    /// The number of parties waiting now.
    int n_waiting() const;
    /// True when the barrier is broken.
    bool broken() const;

private:
    friend struct detail::SyncAccess;
    Barrier(int parties, detail::Timeout timeout,
            std::function<void()> action, std::optional<std::string> task);
    explicit Barrier(std::shared_ptr<detail::BarrierImpl> impl) noexcept
        : impl_(std::move(impl)) {}
    template <class F>
    static std::optional<std::string> action_task(const F& action) {
        if (auto t = detail::make_task(action)) return std::move(t->bytes);
        return std::nullopt;
    }
    int wait_until_deadline(const detail::Deadline& deadline);
    std::shared_ptr<detail::BarrierImpl> impl_;
};

namespace detail {
/// The codec of a synchronisation type: it sends its shared memory's descriptor
/// (Encoder::attach_fd); decoding maps it and checks that it holds an object of the expected kind
/// (else mp::DecodeError). Defined, for the types below only, in synchronize.cpp.
template <class T>
struct SyncCodec {
    static constexpr bool shares_state = true;  // a copy refers to the same object
    static void encode(Encoder& e, const T& v);
    static T decode(Decoder& d);
};
extern template struct SyncCodec<Lock>;
extern template struct SyncCodec<RLock>;
extern template struct SyncCodec<Semaphore>;
extern template struct SyncCodec<BoundedSemaphore>;
extern template struct SyncCodec<Condition>;
extern template struct SyncCodec<Event>;
extern template struct SyncCodec<Barrier>;
}  // namespace detail

template <> struct Codec<Lock> : detail::SyncCodec<Lock> {};
template <> struct Codec<RLock> : detail::SyncCodec<RLock> {};
template <> struct Codec<Semaphore> : detail::SyncCodec<Semaphore> {};
template <> struct Codec<BoundedSemaphore> : detail::SyncCodec<BoundedSemaphore> {};
template <> struct Codec<Condition> : detail::SyncCodec<Condition> {};
template <> struct Codec<Event> : detail::SyncCodec<Event> {};
template <> struct Codec<Barrier> : detail::SyncCodec<Barrier> {};

}  // namespace mp
