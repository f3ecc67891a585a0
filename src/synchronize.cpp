#include "mp/synchronize.hpp"

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <climits>
#include <cstring>
#include <ctime>
#include <initializer_list>
#include <linux/futex.h>
#include <map>
#include <mutex>
#include <new>
#include <pthread.h>
#include <stdexcept>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <system_error>
#include <unistd.h>

#include "mp/detail/shared_block.hpp"
#include "sys/cpu_relax.hpp"
#include "sys/error.hpp"
#include "sys/robust_mutex.hpp"
#include "sys/fd.hpp"

namespace mp::detail {

namespace {

// ---------------------------------------------------------------------------------------------
// The calling thread's id, cached. The cache is cleared in a forked child (pthread_atfork), where
// the surviving thread has a new id; mp forks only through fork(), which runs the handlers.

thread_local pid_t cached_tid = 0;

// Handles of objects received through a Codec, by memfd inode (see attach_shared below).
struct AttachRegistry {
    std::mutex mu;
    std::map<std::pair<dev_t, ino_t>, std::pair<std::weak_ptr<void>, std::uint32_t>> live;
};
AttachRegistry& registry() {
    static auto* r = new AttachRegistry;  // never destroyed: handles may outlive static teardown
    return *r;
}

void on_fork_child() noexcept {
    cached_tid = 0;
    // Another thread of the parent may have held the registry's mutex at the moment of fork.
    new (&registry().mu) std::mutex;
}

[[maybe_unused]] const int atfork_registered = [] {
    (void)registry();
    return ::pthread_atfork(nullptr, nullptr, &on_fork_child);
}();

pid_t current_tid() noexcept {
    if (cached_tid == 0) cached_tid = static_cast<pid_t>(::syscall(SYS_gettid));
    return cached_tid;
}

[[noreturn]] void throw_errc(std::errc e, const char* what) {
    throw std::system_error(std::make_error_code(e), what);
}

timespec to_timespec(std::chrono::steady_clock::time_point t) noexcept {
    auto ns = std::chrono::duration_cast<std::chrono::nanoseconds>(t.time_since_epoch()).count();
    if (ns < 0) ns = 0;
    timespec ts{};
    ts.tv_sec = static_cast<time_t>(ns / 1'000'000'000);
    ts.tv_nsec = static_cast<long>(ns % 1'000'000'000);
    return ts;
}

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

// A robust, process-shared, error-checking pthread mutex plus mp's own record of the holder.
// The mutex's futex word is the truth about ownership (the kernel marks it when the holder dies);
// `owner` lets a thread ask "do I hold it?" without a system call, and `count` is the RLock depth.
// `owner` and `count` are written only by the holder.
struct MutexCore {
    pthread_mutex_t mutex;
    std::atomic<std::int32_t> owner;         // holder's thread id, 0 when free
    std::uint32_t count;                     // recursion depth (RLock), 1 for a held Lock
    std::atomic<std::uint32_t> owner_died;   // 1: the current holding was recovered from the dead
};

// A semaphore: the futex word is the count itself. `waiters` counts threads that may sleep, so
// release skips the wake-up system call when there are none. A waiter killed while registered
// leaves `waiters` too high forever: that only costs releasers a (harmless) system call.
struct SemaphoreCore {
    std::atomic<std::uint32_t> value;
    std::atomic<std::uint32_t> waiters;
    std::uint32_t max;  // the bound of a BoundedSemaphore, else 0
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

// A barrier: Python's threading.Barrier state machine under a robust mutex and a condition.
struct BarrierCore {
    MutexCore mutex;
    CondCore cond;
    std::int32_t parties;
    std::int32_t state;  // 0 filling, 1 draining, -1 resetting, -2 broken
    std::int32_t count;  // parties inside wait()
    std::int32_t has_timeout;
    std::int64_t timeout_ns;
    // Bumped when the mutex is recovered from a dead holder: `count` is then reset to 0 (the dead
    // party may or may not have been counted), and parties that entered before must not
    // decrement it again when they leave.
    std::uint32_t epoch;
};

template <class Core>
struct Block {
    Header header;
    Core core;
};

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

template <class Core>
SharedBlock create_block(Kind kind) {
    SharedBlock b = SharedBlock::create(sizeof(Block<Core>), kind_name(kind));
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

void init_mutex(MutexCore& c) {
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
    sys::check_ret(::pthread_mutex_init(&c.mutex, &attr), "pthread_mutex_init");
}

enum class LockMode { block, try_once, timed };

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

// The futex word of a robust mutex holds its owner's thread id; the kernel clears it when the
// owner dies. Checking it too means a thread that happens to get a dead holder's (reused) id
// never mistakes the stale `owner` record for its own holding.
bool futex_owner_is(const MutexCore& c, pid_t tid) noexcept {
#if defined(__GLIBC__)
    const int word = __atomic_load_n(&c.mutex.__data.__lock, __ATOMIC_RELAXED);
    return (static_cast<unsigned>(word) & FUTEX_TID_MASK) == static_cast<unsigned>(tid);
#else
    (void)c;
    (void)tid;
    return true;
#endif
}

bool held_by_me(const MutexCore& c) noexcept {
    const pid_t me = current_tid();
    return c.owner.load(std::memory_order_relaxed) == me && futex_owner_is(c, me);
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

// ---------------------------------------------------------------------------------------------
// Attaching a received descriptor. The same memfd received twice in one process is mapped once:
// a robust mutex locked through one mapping and unlocked through another would corrupt glibc's
// per-thread robust list, which links mutexes by address.

template <class Impl, class Core>
std::shared_ptr<Impl> attach_shared(int raw_fd, std::initializer_list<Kind> kinds,
                                    const char* what) {
    sys::Fd fd(raw_fd);
    struct stat st {};
    sys::check(::fstat(fd.get(), &st), "fstat");
    const auto key = std::make_pair(st.st_dev, st.st_ino);
    auto check = [&](const SharedBlock& b) {
        if (b.size() < sizeof(Block<Core>))
            throw DecodeError(std::string(what) + ": the received memory is too small");
        const auto* h = static_cast<const Header*>(b.data());
        if (h->magic != block_magic ||
            std::find(kinds.begin(), kinds.end(), h->kind) == kinds.end())
            throw DecodeError(std::string(what) + ": the received memory holds " +
                              (h->magic == block_magic ? kind_name(h->kind)
                                                       : "no mp synchronisation object"));
    };
    auto& reg = registry();
    // Declared before the guard, so destroyed after it: dropping the last reference runs the
    // Impl's destructor, which takes the registry's mutex.
    std::shared_ptr<void> existing;
    std::lock_guard g(reg.mu);
    if (auto it = reg.live.find(key); it != reg.live.end()) {
        if ((existing = it->second.first.lock())) {
            const auto kind = static_cast<Kind>(it->second.second);
            if (std::find(kinds.begin(), kinds.end(), kind) == kinds.end())
                throw DecodeError(std::string(what) + ": the received memory holds " +
                                  kind_name(kind));
            return std::static_pointer_cast<Impl>(existing);  // `fd` closes: the mapping has its own
        }
    }
    if (!S_ISREG(st.st_mode) || st.st_size < static_cast<off_t>(sizeof(Block<Core>)))
        throw DecodeError(std::string(what) + ": the received descriptor is not its shared memory");
    SharedBlock b = SharedBlock::attach(fd.release());
    check(b);
    const auto kind = static_cast<const Header*>(b.data())->kind;
    auto impl = std::make_shared<Impl>(std::move(b));
    reg.live[key] = {impl, static_cast<std::uint32_t>(kind)};
    return impl;
}

// Records an object created by this process, so that receiving it back maps nothing new.
template <class Impl>
std::shared_ptr<Impl> register_created(std::shared_ptr<Impl> impl) {
    struct stat st {};
    sys::check(::fstat(impl->block.fd(), &st), "fstat");
    const auto kind = static_cast<const Header*>(impl->block.data())->kind;
    auto& reg = registry();
    std::lock_guard g(reg.mu);
    reg.live[{st.st_dev, st.st_ino}] = {impl, static_cast<std::uint32_t>(kind)};
    return impl;
}

void forget_attached(const SharedBlock& b) noexcept {
    // Called from an Impl's destructor; erase only if the entry is ours and dead.
    if (!b) return;
    struct stat st {};
    if (::fstat(b.fd(), &st) != 0) return;
    auto& reg = registry();
    std::lock_guard g(reg.mu);
    auto it = reg.live.find({st.st_dev, st.st_ino});
    if (it != reg.live.end() && it->second.first.expired()) reg.live.erase(it);
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// Impl types: one per object, shared by the handles of this process.

struct MutexImpl {
    explicit MutexImpl(SharedBlock b) : block(std::move(b)), core(core_of<MutexCore>(block)) {
        recursive = static_cast<const Header*>(block.data())->kind == Kind::rlock;
    }
    MutexImpl(const MutexImpl&) = delete;
    MutexImpl& operator=(const MutexImpl&) = delete;
    ~MutexImpl() {
        // glibc links held robust mutexes into a per-thread list through the mutex memory:
        // unmapping one this thread holds would leave the list pointing at unmapped memory.
        if (held_by_me(*core)) {
            core->count = 0;
            core->owner.store(0, std::memory_order_relaxed);
            ::pthread_mutex_unlock(&core->mutex);
        }
        forget_attached(block);
    }
    SharedBlock block;
    MutexCore* core;
    bool recursive = false;
};

struct SemaphoreImpl {
    explicit SemaphoreImpl(SharedBlock b) : block(std::move(b)), core(core_of<SemaphoreCore>(block)) {}
    SemaphoreImpl(const SemaphoreImpl&) = delete;
    SemaphoreImpl& operator=(const SemaphoreImpl&) = delete;
    ~SemaphoreImpl() { forget_attached(block); }
    SharedBlock block;
    SemaphoreCore* core;
};

struct ConditionImpl {
    explicit ConditionImpl(SharedBlock b) : block(std::move(b)), core(core_of<CondCore>(block)) {}
    ConditionImpl(const ConditionImpl&) = delete;
    ConditionImpl& operator=(const ConditionImpl&) = delete;
    ~ConditionImpl() { forget_attached(block); }
    SharedBlock block;
    CondCore* core;
};

struct EventImpl {
    explicit EventImpl(SharedBlock b) : block(std::move(b)), core(core_of<EventCore>(block)) {}
    EventImpl(const EventImpl&) = delete;
    EventImpl& operator=(const EventImpl&) = delete;
    ~EventImpl() { forget_attached(block); }
    SharedBlock block;
    EventCore* core;
};

struct BarrierImpl {
    explicit BarrierImpl(SharedBlock b) : block(std::move(b)), core(core_of<BarrierCore>(block)) {}
    BarrierImpl(const BarrierImpl&) = delete;
    BarrierImpl& operator=(const BarrierImpl&) = delete;
    ~BarrierImpl() {
        if (held_by_me(core->mutex)) {
            core->mutex.owner.store(0, std::memory_order_relaxed);
            ::pthread_mutex_unlock(&core->mutex.mutex);
        }
        forget_attached(block);
    }
    SharedBlock block;
    BarrierCore* core;
    std::function<void()> action;      // this process's copy of the action
    std::optional<std::string> task;   // the action as a transferable task, when it is one
};

/// Private access for the codecs and Condition.
// A handle moved from holds nothing: every use of it is mp::EmptyHandle, never a crash.
template <class P>
const std::shared_ptr<P>& check_handle(const std::shared_ptr<P>& p, const char* type) {
    if (!p) throw_empty_handle(type);
    return p;
}

struct SyncAccess {
    static const std::shared_ptr<MutexImpl>& impl(const BasicLock& l) {
        return check_handle(l.impl_, "mp::Lock");
    }
    static const std::shared_ptr<SemaphoreImpl>& impl(const Semaphore& s) {
        return check_handle(s.impl_, "mp::Semaphore");
    }
    static const std::shared_ptr<ConditionImpl>& impl(const Condition& c) {
        return check_handle(c.impl_, "mp::Condition");
    }
    static const std::shared_ptr<BasicLock>& lock(const Condition& c) {
        return check_handle(c.lock_, "mp::Condition");
    }
    static const std::shared_ptr<EventImpl>& impl(const Event& e) {
        return check_handle(e.impl_, "mp::Event");
    }
    static const std::shared_ptr<BarrierImpl>& impl(const Barrier& b) {
        return check_handle(b.impl_, "mp::Barrier");
    }
    static Lock make_lock(std::shared_ptr<MutexImpl> i) { return Lock(std::move(i)); }
    static RLock make_rlock(std::shared_ptr<MutexImpl> i) { return RLock(std::move(i)); }
    static Semaphore make_semaphore(std::shared_ptr<SemaphoreImpl> i) {
        return Semaphore(std::move(i));
    }
    static BoundedSemaphore make_bounded(std::shared_ptr<SemaphoreImpl> i) {
        return BoundedSemaphore(std::move(i));
    }
    static Condition make_condition(std::shared_ptr<ConditionImpl> i,
                                    std::shared_ptr<BasicLock> l) {
        return Condition(std::move(i), std::move(l));
    }
    static Event make_event(std::shared_ptr<EventImpl> i) { return Event(std::move(i)); }
    static Barrier make_barrier(std::shared_ptr<BarrierImpl> i) { return Barrier(std::move(i)); }
};

namespace {

std::shared_ptr<MutexImpl> new_mutex(Kind kind) {
    SharedBlock b = create_block<MutexCore>(kind);
    init_mutex(*core_of<MutexCore>(b));
    return register_created(std::make_shared<MutexImpl>(std::move(b)));
}

}  // namespace

}  // namespace mp::detail

namespace mp {

using namespace detail;

// ---------------------------------------------------------------------------------------------
// Lock, RLock

bool detail::BasicLock::acquire(bool block) {
    check_handle(impl_, "mp::Lock");
    return mutex_acquire(*impl_->core, impl_->recursive,
                         block ? LockMode::block : LockMode::try_once, std::nullopt,
                         impl_->recursive ? "mp::RLock::acquire: the calling thread holds it"
                                          : "mp::Lock::acquire: the calling thread already holds "
                                            "this lock and would wait forever");
}

bool detail::BasicLock::acquire_until(const Deadline& deadline) {
    check_handle(impl_, "mp::Lock");
    return mutex_acquire(*impl_->core, impl_->recursive, LockMode::timed, deadline,
                         impl_->recursive ? "mp::RLock::acquire" : "mp::Lock::acquire");
}

void detail::BasicLock::release() {
    check_handle(impl_, "mp::Lock");
    mutex_release(*impl_->core, impl_->recursive,
                  impl_->recursive ? "mp::RLock::release" : "mp::Lock::release");
}

bool detail::BasicLock::owner_died() const {
    check_handle(impl_, "mp::Lock");
    return held_by_me(*impl_->core) &&
           impl_->core->owner_died.load(std::memory_order_relaxed) != 0;
}

bool detail::BasicLock::held() const {
    check_handle(impl_, "mp::Lock");
    return held_by_me(*impl_->core);
}

Lock::Lock() : BasicLock(new_mutex(Kind::lock)) {}

RLock::RLock() : BasicLock(new_mutex(Kind::rlock)) {}

unsigned RLock::recursion_count() const {
    check_handle(SyncAccess::impl(*this), "mp::RLock");
    const auto& i = SyncAccess::impl(*this);
    return held_by_me(*i->core) ? i->core->count : 0;
}

// ---------------------------------------------------------------------------------------------
// Semaphore, BoundedSemaphore

namespace {

std::shared_ptr<SemaphoreImpl> new_semaphore(int value, bool bounded) {
    if (value < 0) throw std::invalid_argument("mp::Semaphore: the initial value must be >= 0");
    SharedBlock b = create_block<SemaphoreCore>(bounded ? Kind::bounded_semaphore
                                                        : Kind::semaphore);
    auto* c = core_of<SemaphoreCore>(b);
    c->value.store(static_cast<std::uint32_t>(value));
    c->max = bounded ? static_cast<std::uint32_t>(value) : 0;
    return register_created(std::make_shared<SemaphoreImpl>(std::move(b)));
}

bool try_take(SemaphoreCore& c) noexcept {
    std::uint32_t v = c.value.load();
    while (v > 0) {
        if (c.value.compare_exchange_weak(v, v - 1)) return true;
    }
    return false;
}

}  // namespace

Semaphore::Semaphore(int value) : impl_(new_semaphore(value, false)) {}
Semaphore::Semaphore(int value, bool bounded) : impl_(new_semaphore(value, bounded)) {}
BoundedSemaphore::BoundedSemaphore(int value) : Semaphore(value, true) {}

bool Semaphore::acquire(bool block) {
    check_handle(impl_, "mp::Semaphore");
    if (!block) return try_take(*impl_->core);
    return acquire_until(std::nullopt);
}

bool Semaphore::acquire_until(const Deadline& deadline) {
    check_handle(impl_, "mp::Semaphore");
    SemaphoreCore& c = *impl_->core;
    if (try_take(c)) return true;
    // A short spin: a release often follows within a few hundred nanoseconds, far cheaper than
    // sleeping and being woken.
    for (int i = 0; i < 100; ++i) {
        sys::cpu_relax();
        if (c.value.load(std::memory_order_relaxed) != 0 && try_take(c)) return true;
    }
    // Registering before re-reading the value pairs with release()'s increment-then-read of
    // `waiters` (both sequentially consistent): either we see the permit or it sees us.
    c.waiters.fetch_add(1);
    struct Unregister {
        SemaphoreCore& c;
        ~Unregister() { c.waiters.fetch_sub(1); }
    } unregister{c};
    for (;;) {
        if (try_take(c)) return true;
        if (futex_wait(c.value, 0, deadline) == FutexResult::timed_out) return try_take(c);
    }
}

void Semaphore::release() {
    check_handle(impl_, "mp::Semaphore");
    SemaphoreCore& c = *impl_->core;
    std::uint32_t v = c.value.load();
    for (;;) {
        if (c.max != 0 ? v >= c.max : v >= static_cast<std::uint32_t>(INT_MAX))
            throw std::system_error(std::make_error_code(std::errc::value_too_large),
                                    c.max != 0 ? "mp::BoundedSemaphore::release: semaphore "
                                                 "released too many times"
                                               : "mp::Semaphore::release: the count would "
                                                 "overflow");
        if (c.value.compare_exchange_weak(v, v + 1)) break;
    }
    if (c.waiters.load() != 0) futex_wake(c.value, 1);
}

int Semaphore::get_value() const {
    check_handle(impl_, "mp::Semaphore");
    return static_cast<int>(impl_->core->value.load());
}

// ---------------------------------------------------------------------------------------------
// Condition

namespace {
std::shared_ptr<ConditionImpl> new_condition() {
    return register_created(std::make_shared<ConditionImpl>(create_block<CondCore>(Kind::condition)));
}
}  // namespace

Condition::Condition() : Condition(RLock()) {}
Condition::Condition(Lock lock)
    : impl_(new_condition()), lock_(std::make_shared<Lock>(std::move(lock))) {}
Condition::Condition(RLock lock)
    : impl_(new_condition()), lock_(std::make_shared<RLock>(std::move(lock))) {}

bool Condition::wait_until_deadline(const Deadline& deadline) {
    check_handle(impl_, "mp::Condition");
    MutexCore& m = *SyncAccess::impl(*lock_)->core;
    if (!held_by_me(m))
        throw_errc(std::errc::operation_not_permitted,
                   "mp::Condition::wait: the calling thread must hold the condition's lock");
    return cond_wait(*impl_->core, m, deadline);
}

void Condition::notify(int n) {
    check_handle(impl_, "mp::Condition");
    if (!held_by_me(*SyncAccess::impl(*lock_)->core))
        throw_errc(std::errc::operation_not_permitted,
                   "mp::Condition::notify: the calling thread must hold the condition's lock");
    if (n <= 0) return;
    cond_notify(*impl_->core, static_cast<std::uint32_t>(n));
}

void Condition::notify_all() { notify(INT_MAX); }

// ---------------------------------------------------------------------------------------------
// Event

Event::Event()
    : impl_(register_created(std::make_shared<EventImpl>(create_block<EventCore>(Kind::event)))) {}

bool Event::is_set() const {
    check_handle(impl_, "mp::Event");
    return (impl_->core->word.load() & 1u) != 0;
}

void Event::set() {
    check_handle(impl_, "mp::Event");
    EventCore& c = *impl_->core;
    std::uint32_t w = c.word.load();
    do {
        if (w & 1u) return;  // already set: nothing changes, nobody to wake
    } while (!c.word.compare_exchange_weak(w, (w + 2u) | 1u));
    if (c.waiters.load() != 0) futex_wake_all(c.word);
}

void Event::clear() {
    check_handle(impl_, "mp::Event");
    impl_->core->word.fetch_and(~1u);
}

bool Event::wait_until_deadline(const Deadline& deadline) {
    check_handle(impl_, "mp::Event");
    EventCore& c = *impl_->core;
    const std::uint32_t start = c.word.load();
    if (start & 1u) return true;
    c.waiters.fetch_add(1);
    struct Unregister {
        EventCore& c;
        ~Unregister() { c.waiters.fetch_sub(1); }
    } unregister{c};
    std::uint32_t w = start;
    for (;;) {
        // Any change of the word since we started means a set() happened (clear() alone only
        // turns bit 0 off, and it was already off).
        if (w != start) return true;
        if (futex_wait(c.word, w, deadline) == FutexResult::timed_out)
            return c.word.load() != start;
        w = c.word.load();
    }
}

// ---------------------------------------------------------------------------------------------
// Barrier: Python's threading.Barrier, process-shared.

namespace {

constexpr std::int32_t filling = 0, draining = 1, resetting = -1, broken_state = -2;

// Holds the barrier's mutex; a recovered mutex breaks the barrier (its count may be wrong).
class BarrierGuard {
public:
    explicit BarrierGuard(BarrierCore& c) : c_(c) {
        (void)mutex_acquire(c_.mutex, false, LockMode::block, std::nullopt, "mp::Barrier");
        check_recovered();
    }
    ~BarrierGuard() {
        try {
            mutex_release(c_.mutex, false, "mp::Barrier");
        } catch (...) {
        }
    }
    BarrierGuard(const BarrierGuard&) = delete;
    BarrierGuard& operator=(const BarrierGuard&) = delete;

    void check_recovered() {
        if (c_.mutex.owner_died.exchange(0, std::memory_order_relaxed) != 0) {
            c_.state = broken_state;
            c_.count = 0;
            ++c_.epoch;
            cond_notify(c_.cond, UINT32_MAX);
        }
    }
    bool wait(const Deadline& deadline) {
        bool woken = cond_wait(c_.cond, c_.mutex, deadline);
        check_recovered();
        return woken;
    }

private:
    BarrierCore& c_;
};

void barrier_break(BarrierCore& c) {
    c.state = broken_state;
    cond_notify(c.cond, UINT32_MAX);
}

}  // namespace

Barrier::Barrier(int parties, detail::Timeout timeout)
    : Barrier(parties, timeout, {}, std::nullopt) {}

Barrier::Barrier(int parties, detail::Timeout timeout,
                 std::function<void()> action, std::optional<std::string> task) {
    if (parties < 1) throw std::invalid_argument("mp::Barrier: parties must be >= 1");
    SharedBlock b = create_block<BarrierCore>(Kind::barrier);
    auto* c = core_of<BarrierCore>(b);
    init_mutex(c->mutex);
    c->parties = parties;
    c->state = filling;
    c->count = 0;
    c->has_timeout = timeout ? 1 : 0;
    c->timeout_ns = timeout ? timeout->count() : 0;
    impl_ = register_created(std::make_shared<BarrierImpl>(std::move(b)));
    impl_->action = std::move(action);
    impl_->task = std::move(task);
}

int Barrier::wait() {
    check_handle(impl_, "mp::Barrier");
    const BarrierCore& c = *impl_->core;
    // The default timeout is shared state: every process waits with the same one.
    if (c.has_timeout) return wait_until_deadline(deadline_after(std::chrono::nanoseconds(c.timeout_ns)));
    return wait_until_deadline(std::nullopt);
}

int Barrier::wait_until_deadline(const Deadline& deadline) {
    check_handle(impl_, "mp::Barrier");
    BarrierCore& c = *impl_->core;
    BarrierGuard g(c);
    // Wait while the barrier drains or resets (Python's _enter).
    while (c.state == draining || c.state == resetting) (void)g.wait(std::nullopt);
    if (c.state < 0) throw BrokenBarrierError();
    const int index = c.count++;
    // Python's `finally`: leave the barrier, and the last one out reopens it (_exit).
    struct Leave {
        BarrierCore& c;
        std::uint32_t epoch;
        ~Leave() {
            if (c.epoch != epoch) return;  // recovered meanwhile: count was reset without us
            if (--c.count == 0 && (c.state == resetting || c.state == draining)) {
                c.state = filling;
                cond_notify(c.cond, UINT32_MAX);
            }
        }
    } leave{c, c.epoch};
    if (index + 1 == c.parties) {
        // The last to arrive runs the action, then releases the others (_release).
        try {
            if (impl_->action) impl_->action();
        } catch (...) {
            barrier_break(c);
            throw;
        }
        c.state = draining;
        cond_notify(c.cond, UINT32_MAX);
    } else {
        // _wait: wait_for(state != filling, timeout).
        while (c.state == filling) {
            if (expired(deadline) || (!g.wait(deadline) && c.state == filling)) {
                barrier_break(c);
                throw BrokenBarrierError();
            }
        }
        if (c.state < 0) throw BrokenBarrierError();
    }
    return index;
}

void Barrier::reset() {
    check_handle(impl_, "mp::Barrier");
    BarrierCore& c = *impl_->core;
    BarrierGuard g(c);
    if (c.count > 0) {
        if (c.state == filling || c.state == broken_state) c.state = resetting;
    } else {
        c.state = filling;
    }
    cond_notify(c.cond, UINT32_MAX);
}

void Barrier::abort() {
    check_handle(impl_, "mp::Barrier");
    BarrierCore& c = *impl_->core;
    BarrierGuard g(c);
    barrier_break(c);
}

int Barrier::parties() const {
    check_handle(impl_, "mp::Barrier");
    return impl_->core->parties;
}

int Barrier::n_waiting() const {
    check_handle(impl_, "mp::Barrier");
    BarrierCore& c = *impl_->core;
    BarrierGuard g(c);
    return c.state == filling ? c.count : 0;
}

bool Barrier::broken() const {
    check_handle(impl_, "mp::Barrier");
    BarrierCore& c = *impl_->core;
    BarrierGuard g(c);
    return c.state == broken_state;
}

// ---------------------------------------------------------------------------------------------
// Codecs

namespace {

using detail::Kind;
using detail::SyncAccess;

std::uint32_t send_block(Encoder& e, const detail::SharedBlock& b) {
    return e.attach_fd(b.fd());
}

int receive_fd(Decoder& d) { return d.take_fd(d.get<std::uint32_t>()); }

}  // namespace

void Codec<Lock>::encode(Encoder& e, const Lock& v) {
    e.put(send_block(e, SyncAccess::impl(v)->block));
}
Lock Codec<Lock>::decode(Decoder& d) {
    return SyncAccess::make_lock(detail::attach_shared<detail::MutexImpl, detail::MutexCore>(
        receive_fd(d), {Kind::lock}, "mp::Lock"));
}

void Codec<RLock>::encode(Encoder& e, const RLock& v) {
    e.put(send_block(e, SyncAccess::impl(v)->block));
}
RLock Codec<RLock>::decode(Decoder& d) {
    return SyncAccess::make_rlock(detail::attach_shared<detail::MutexImpl, detail::MutexCore>(
        receive_fd(d), {Kind::rlock}, "mp::RLock"));
}

void Codec<Semaphore>::encode(Encoder& e, const Semaphore& v) {
    e.put(send_block(e, SyncAccess::impl(v)->block));
}
Semaphore Codec<Semaphore>::decode(Decoder& d) {
    // A BoundedSemaphore sent as a Semaphore stays bounded: the bound is in the shared state.
    return SyncAccess::make_semaphore(
        detail::attach_shared<detail::SemaphoreImpl, detail::SemaphoreCore>(
            receive_fd(d), {Kind::semaphore, Kind::bounded_semaphore}, "mp::Semaphore"));
}

void Codec<BoundedSemaphore>::encode(Encoder& e, const BoundedSemaphore& v) {
    e.put(send_block(e, SyncAccess::impl(v)->block));
}
BoundedSemaphore Codec<BoundedSemaphore>::decode(Decoder& d) {
    return SyncAccess::make_bounded(
        detail::attach_shared<detail::SemaphoreImpl, detail::SemaphoreCore>(
            receive_fd(d), {Kind::bounded_semaphore}, "mp::BoundedSemaphore"));
}

void Codec<Condition>::encode(Encoder& e, const Condition& v) {
    const auto& lock = SyncAccess::lock(v);
    const auto& li = SyncAccess::impl(*lock);
    e.put(static_cast<std::uint8_t>(li->recursive ? 1 : 0));
    e.put(send_block(e, li->block));
    e.put(send_block(e, SyncAccess::impl(v)->block));
}
Condition Codec<Condition>::decode(Decoder& d) {
    const auto recursive = d.get<std::uint8_t>();
    if (recursive > 1) throw DecodeError("mp::Condition: malformed lock kind");
    const int lock_fd = receive_fd(d);
    std::shared_ptr<detail::BasicLock> lock;
    if (recursive != 0)
        lock = std::make_shared<RLock>(SyncAccess::make_rlock(
            detail::attach_shared<detail::MutexImpl, detail::MutexCore>(lock_fd, {Kind::rlock},
                                                                        "mp::Condition")));
    else
        lock = std::make_shared<Lock>(SyncAccess::make_lock(
            detail::attach_shared<detail::MutexImpl, detail::MutexCore>(lock_fd, {Kind::lock},
                                                                        "mp::Condition")));
    auto impl = detail::attach_shared<detail::ConditionImpl, detail::CondCore>(
        receive_fd(d), {Kind::condition}, "mp::Condition");
    return SyncAccess::make_condition(std::move(impl), std::move(lock));
}

void Codec<Event>::encode(Encoder& e, const Event& v) {
    e.put(send_block(e, SyncAccess::impl(v)->block));
}
Event Codec<Event>::decode(Decoder& d) {
    return SyncAccess::make_event(detail::attach_shared<detail::EventImpl, detail::EventCore>(
        receive_fd(d), {Kind::event}, "mp::Event"));
}

void Codec<Barrier>::encode(Encoder& e, const Barrier& v) {
    const auto& impl = SyncAccess::impl(v);
    if (impl->action && !impl->task)
        throw Error("mp::Barrier: its action cannot be sent to another process (it captures "
                    "state); use a function or a captureless lambda, or the fork start method");
    e.put(send_block(e, impl->block));
    e.put(impl->task);
}
Barrier Codec<Barrier>::decode(Decoder& d) {
    auto impl = detail::attach_shared<detail::BarrierImpl, detail::BarrierCore>(
        receive_fd(d), {Kind::barrier}, "mp::Barrier");
    auto task = d.get<std::optional<std::string>>();
    if (task && !impl->task) {
        impl->task = *task;
        impl->action = [bytes = std::move(*task)] { (void)detail::run_task(bytes); };
    }
    return SyncAccess::make_barrier(std::move(impl));
}

}  // namespace mp
