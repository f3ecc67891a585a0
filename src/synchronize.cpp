// The public synchronisation objects (Lock, RLock, Semaphore, BoundedSemaphore, Condition, Event,
// Barrier), their per-process Impl types and their codecs, built on the shared state in
// sync_state.hpp.
// One file because the Impl types, the find-or-attach of received objects and the codecs are
// one mechanism: each object is shared by a handle, an Impl and its block, the same way.

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
#include <type_traits>
#include <unistd.h>
#include <vector>

#include "mp/detail/shared_block.hpp"
#include "sync_state.hpp"
#include "sys/cpu_relax.hpp"
#include "sys/error.hpp"
#include "sys/futex.hpp"
#include "sys/robust_mutex.hpp"
#include "sys/fd.hpp"

namespace mp::detail {

using namespace sync;

namespace {

// ---------------------------------------------------------------------------------------------
// Attaching a received descriptor, once per process (see detail::attached): the tag recorded
// with an Impl is its block's Kind.

template <class Impl, class Core>
std::shared_ptr<Impl> attach_shared(int fd, std::initializer_list<Kind> kinds, const char* what) {
    auto refuse = [&](Kind kind) {
        throw DecodeError(std::string(what) + ": the received memory holds " +
                          (kind == Kind{} ? "no mp synchronisation object" : kind_name(kind)));
    };
    auto accepts = [&](Kind kind) {
        return std::find(kinds.begin(), kinds.end(), kind) != kinds.end();
    };
    return std::static_pointer_cast<Impl>(attached::find_or_attach(
        fd, sizeof(Block<Core>), what,
        [&](std::uint32_t tag) {
            if (!accepts(static_cast<Kind>(tag)))
                refuse(tag >= 1 && tag <= static_cast<std::uint32_t>(Kind::barrier)
                           ? static_cast<Kind>(tag)
                           : Kind{});
        },
        [&](SharedBlock b) -> std::pair<std::shared_ptr<void>, std::uint32_t> {
            if (b.size() < sizeof(Block<Core>))
                throw DecodeError(std::string(what) + ": the received memory is too small");
            const auto* h = static_cast<const Header*>(b.data());
            if (h->magic != block_magic || !accepts(h->kind))
                refuse(h->magic == block_magic ? h->kind : Kind{});
            const auto kind = h->kind;
            return {std::make_shared<Impl>(std::move(b)), static_cast<std::uint32_t>(kind)};
        }));
}

// Records an object created by this process, so that receiving it back maps nothing new.
template <class Impl>
std::shared_ptr<Impl> register_created(std::shared_ptr<Impl> impl) {
    const auto kind = static_cast<const Header*>(impl->block.data())->kind;
    attached::record(impl->block, static_cast<std::uint32_t>(kind), [&] { return impl; });
    return impl;
}

void forget_attached(const SharedBlock& b) noexcept { attached::forget(b); }

}  // namespace

// ---------------------------------------------------------------------------------------------
// Impl types: one per object, shared by the handles of this process.

// The shared block of an Impl and the object in it; the last handle in this process going
// forgets the mapping (MutexImpl, which may keep it, does without).
template <class Core>
struct Attached {
    explicit Attached(SharedBlock b) : block(std::move(b)), core(core_of<Core>(block)) {}
    Attached(const Attached&) = delete;
    Attached& operator=(const Attached&) = delete;
    ~Attached() { forget_attached(block); }
    SharedBlock block;
    Core* core;
};

struct MutexImpl {
    explicit MutexImpl(SharedBlock b) : block(std::move(b)), core(core_of<MutexCore>(block)) {
        recursive = static_cast<const Header*>(block.data())->kind == Kind::rlock;
    }
    MutexImpl(const MutexImpl&) = delete;
    MutexImpl& operator=(const MutexImpl&) = delete;
    ~MutexImpl() {
        // The last handle in this process going is no release: a lock still held here stays
        // held, so that a process (or thread) that ends holding it is a dead owner, whatever
        // its start method ran after the target (a forkserver child destroys the target's
        // arguments; a fork child does not). Its memory stays mapped too: a held lock is linked
        // into its thread's robust-futex list through the lock's memory, and the kernel walks
        // that list when the thread dies to mark the lock's owner dead; unmapped, the walk
        // stops there and the lock would stay held by nobody for ever.
        if (block && held_in_this_process(*core)) {
            if (pin_held(block)) return;
            // Not pinned: unmapping a lock this thread holds must at least unlink it from the
            // robust list first.
            if (held_by_me(*core)) mutex_force_release(*core);
        }
        forget_attached(block);
    }
    SharedBlock block;
    MutexCore* core;
    bool recursive = false;

private:
    static bool pin_held(SharedBlock& block) noexcept;
};

struct SemaphoreImpl : Attached<SemaphoreCore> {
    using Attached::Attached;
};

struct ConditionImpl : Attached<CondCore> {
    using Attached::Attached;
};

struct EventImpl : Attached<EventCore> {
    using Attached::Attached;
};

struct BarrierImpl : Attached<BarrierCore> {
    explicit BarrierImpl(SharedBlock b)
        : Attached(std::move(b)),
          slots(reinterpret_cast<PartySlot*>(static_cast<char*>(block.data()) +
                                             sizeof(Block<BarrierCore>))) {
        // Received memory must hold the slots its party count promises.
        const auto parties = static_cast<std::size_t>(std::max(core->parties, 0));
        if (core->parties < 1 || core->parties > Barrier::max_parties ||
            (block.size() - sizeof(Block<BarrierCore>)) / sizeof(PartySlot) / 2 < parties)
            throw DecodeError("mp::Barrier: the received memory is too small for its parties");
    }
    BarrierImpl(const BarrierImpl&) = delete;
    BarrierImpl& operator=(const BarrierImpl&) = delete;
    ~BarrierImpl() {
        if (held_by_me(core->mutex)) mutex_force_release(core->mutex);
    }
    PartySlot* slots;
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
        return l.checked();
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

// Moves the block of a held lock whose last handle went into a MutexImpl that lives until the
// process ends, and makes it the one a handle received later attaches to (so the holder can
// still release it through that handle, at the address its robust list knows). False when that
// could not be done (out of memory): the caller then unmaps as before.
bool MutexImpl::pin_held(SharedBlock& block) noexcept {
    static auto* pinned = new std::vector<std::shared_ptr<MutexImpl>>;  // never destroyed
    try {
        const auto kind = static_cast<const Header*>(block.data())->kind;
        // Everything that may throw comes before the block moves (record promises as much, and
        // make_shared allocates before it moves): a MutexImpl destroyed here would come back to
        // this function with the registry's mutex held.
        attached::record(block, static_cast<std::uint32_t>(kind), [&] {
            pinned->reserve(pinned->size() + 1);
            auto keep = std::make_shared<MutexImpl>(std::move(block));
            pinned->push_back(keep);
            return std::shared_ptr<void>(std::move(keep));
        });
        return true;
    } catch (...) {
        return false;
    }
}

namespace {

std::shared_ptr<MutexImpl> new_mutex(Kind kind) {
    SharedBlock b = create_block<MutexCore>(kind);  // zero bytes: an unlocked mutex
    return register_created(std::make_shared<MutexImpl>(std::move(b)));
}

}  // namespace

}  // namespace mp::detail

namespace mp {

using namespace detail;

// ---------------------------------------------------------------------------------------------
// Lock, RLock

const std::shared_ptr<MutexImpl>& detail::BasicLock::checked() const { return check_handle(impl_, type_); }

bool detail::BasicLock::acquire(bool block) {
    checked();
    return mutex_acquire(*impl_->core, impl_->recursive,
                         block ? LockMode::block : LockMode::try_once, std::nullopt,
                         impl_->recursive ? "mp::RLock::acquire: the calling thread holds it"
                                          : "mp::Lock::acquire: the calling thread already holds "
                                            "this lock and would wait forever");
}

bool detail::BasicLock::acquire_until(const Deadline& deadline) {
    checked();
    return mutex_acquire(*impl_->core, impl_->recursive, LockMode::timed, deadline,
                         impl_->recursive ? "mp::RLock::acquire" : "mp::Lock::acquire");
}

void detail::BasicLock::release() {
    checked();
    mutex_release(*impl_->core, impl_->recursive,
                  impl_->recursive ? "mp::RLock::release" : "mp::Lock::release");
}

bool detail::BasicLock::owner_died() const {
    checked();
    return held_by_me(*impl_->core) &&
           impl_->core->owner_died.load(std::memory_order_relaxed) != 0;
}

bool detail::BasicLock::held() const {
    checked();
    return held_by_me(*impl_->core);
}

namespace {

// The holder's thread id; 0 when free. The futex word is the truth (the kernel clears its owner
// when the holder dies).
pid_t holder_tid(const MutexCore& c) noexcept { return c.mutex.owner(); }

}  // namespace

bool detail::BasicLock::locked() const {
    checked();
    return holder_tid(*impl_->core) != 0;
}

LockHolder detail::BasicLock::holder() const {
    checked();
    const pid_t tid = holder_tid(*impl_->core);
    if (tid == 0) return LockHolder::none;
    if (held_by_me(*impl_->core)) return LockHolder::this_thread;
    // Thread ids are unique system-wide: signal 0 to it within our own thread group tells
    // whether it is one of ours.
    return ::syscall(SYS_tgkill, ::getpid(), tid, 0) == 0 ? LockHolder::other_thread
                                                           : LockHolder::other_process;
}

Lock::Lock() : BasicLock(new_mutex(Kind::lock), "mp::Lock") {}

RLock::RLock() : BasicLock(new_mutex(Kind::rlock), "mp::RLock") {}

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
    // A BoundedSemaphore(0) is bounded too: no release() may leave a permit.
    c->max = bounded ? static_cast<std::uint32_t>(value) : static_cast<std::uint32_t>(INT_MAX);
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
    // Sliced: release() wakes one sleeper, which may be killed before it takes the permit.
    for (;;) {
        if (try_take(c)) return true;
        if (sys::futex_wait_sliced(c.value, 0, deadline) == sys::FutexResult::timed_out)
            return try_take(c);
    }
}

void Semaphore::release() {
    check_handle(impl_, "mp::Semaphore");
    SemaphoreCore& c = *impl_->core;
    std::uint32_t v = c.value.load();
    for (;;) {
        if (v >= c.max) {
            const bool bounded = static_cast<const Header*>(impl_->block.data())->kind ==
                                 Kind::bounded_semaphore;
            throw std::system_error(std::make_error_code(std::errc::value_too_large),
                                    bounded ? "mp::BoundedSemaphore::release: semaphore "
                                              "released too many times"
                                            : "mp::Semaphore::release: the count would "
                                              "overflow");
        }
        if (c.value.compare_exchange_weak(v, v + 1)) break;
    }
    if (c.waiters.load() != 0) sys::futex_wake(c.value, 1);
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
    if (c.waiters.load() != 0) sys::futex_wake_all(c.word);
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
        if (sys::futex_wait(c.word, w, deadline) == sys::FutexResult::timed_out)
            return c.word.load() != start;
        w = c.word.load();
    }
}

// ---------------------------------------------------------------------------------------------
// Barrier: Python's threading.Barrier, process-shared.

namespace {

constexpr std::int32_t filling = 0, draining = 1, running_action = 2, resetting = -1,
                       broken_state = -2;

// How often a waiting party wakes to look for parties that died inside wait(). However many
// wait, their looks are at least half of it apart (BarrierCore::next_scan_ns).
constexpr auto party_check_interval = std::chrono::milliseconds(100);

std::int64_t steady_ns() noexcept {
    return std::chrono::duration_cast<std::chrono::nanoseconds>(
               std::chrono::steady_clock::now().time_since_epoch())
        .count();
}

// Takes a free slot for the calling thread as `kind` (the barrier's mutex held); returns its
// index, or -1 when none is free. Slots are initialised on first use, lowest first: a barrier for
// many parties touches only as many as were ever inside wait() at once. There is always one for a
// counted party: at most `parties` are counted and at most `parties` entering hold one.
int claim_slot(BarrierCore& c, PartySlot* slots, std::int32_t kind) noexcept {
    for (int i = 0; i < 2 * c.parties; ++i) {
        if (i == c.slots_ready) {
            // Error-checking: reap_dead_parties tells the caller's own slot (EDEADLK) from a live
            // party's (EBUSY).
            sys::init_robust_mutex(slots[i].mutex, true);
            slots[i].occupied = 0;
            c.slots_ready = i + 1;
        }
        PartySlot& s = slots[i];
        if (s.occupied != 0) continue;
        int rc = ::pthread_mutex_trylock(&s.mutex);
        // A party that died while it held the barrier's mutex, between freeing its slot and
        // unlocking it: the slot is free all the same.
        if (rc == EOWNERDEAD) rc = ::pthread_mutex_consistent(&s.mutex);
        if (rc == 0) {
            s.occupied = kind;
            return i;
        }
    }
    return -1;
}

void release_slot(PartySlot* slots, int i) noexcept {
    slots[i].occupied = slot_free;
    (void)::pthread_mutex_unlock(&slots[i].mutex);
}

struct Dead {
    int counted = 0;   // parties of the round (or of one that completed and drains)
    int entering = 0;  // parties that waited to enter the next round
};

// Frees the slot of every party that died inside wait() (the barrier's mutex held). EBUSY is a
// live party; EDEADLK is the calling thread's own slot (error-checking mutex).
Dead reap_dead_parties(BarrierCore& c, PartySlot* slots) noexcept {
    Dead dead;
    for (int i = 0; i < c.slots_ready; ++i) {
        PartySlot& s = slots[i];
        if (s.occupied == slot_free) continue;
        int rc = ::pthread_mutex_trylock(&s.mutex);
        if (rc == EOWNERDEAD) rc = ::pthread_mutex_consistent(&s.mutex);
        if (rc != 0) continue;
        if (s.occupied == slot_counted) {
            --c.count;
            ++dead.counted;
        } else {
            --c.entering;
            ++dead.entering;
        }
        release_slot(slots, i);
    }
    return dead;
}

// The previous round has drained, or a reset completed: the next round opens, broken if a party
// died waiting to enter it.
void reopen(BarrierCore& c) noexcept {
    c.state = c.break_next != 0 ? broken_state : filling;
    c.break_next = 0;
}

// The barrier whose action the calling thread runs: its wait() there could never return.
thread_local const BarrierCore* action_of = nullptr;

void barrier_break(BarrierCore& c) {
    c.state = broken_state;
    cond_notify(c.cond, UINT32_MAX);
}

// Holds the barrier's mutex; a recovered mutex breaks the barrier (its count may be wrong).
class BarrierGuard {
public:
    BarrierGuard(BarrierCore& c, PartySlot* slots) : c_(c), slots_(slots) {
        (void)mutex_acquire(c_.mutex, false, LockMode::block, std::nullopt, "mp::Barrier");
        check_recovered();
    }
    // As above, giving up at `deadline` (false: not acquired). The mutex is held only for
    // bookkeeping, never across a wait or the action, so this is rarely more than a moment.
    BarrierGuard(BarrierCore& c, PartySlot* slots, const Deadline& deadline, bool& acquired)
        : c_(c), slots_(slots) {
        held_ = acquired =
            mutex_acquire(c_.mutex, false, LockMode::timed, deadline, "mp::Barrier");
        if (held_) check_recovered();
    }
    ~BarrierGuard() {
        if (!held_) return;
        try {
            mutex_release(c_.mutex, false, "mp::Barrier");
        } catch (...) {
        }
    }
    BarrierGuard(const BarrierGuard&) = delete;
    BarrierGuard& operator=(const BarrierGuard&) = delete;

    void unlock() {
        mutex_release(c_.mutex, false, "mp::Barrier");
        held_ = false;
    }
    void relock() {
        (void)mutex_acquire(c_.mutex, false, LockMode::block, std::nullopt, "mp::Barrier");
        held_ = true;
        check_recovered();
    }

    // The holder died inside its bookkeeping: the barrier is broken, and `count` and `entering`
    // are recounted from the slots of the parties still alive (the dead one may have been half
    // counted).
    void check_recovered() {
        if (c_.mutex.owner_died.exchange(0, std::memory_order_relaxed) == 0) return;
        c_.state = broken_state;
        c_.break_next = 0;
        (void)reap_dead_parties(c_, slots_);
        std::int32_t counted = 0, entering = 0;
        for (int i = 0; i < c_.slots_ready; ++i) {
            counted += slots_[i].occupied == slot_counted ? 1 : 0;
            entering += slots_[i].occupied == slot_entering ? 1 : 0;
        }
        c_.count = counted;
        c_.entering = entering;
        cond_notify(c_.cond, UINT32_MAX);
    }

    // Removes the parties that died inside wait(). One that died waiting for the round to
    // complete (or while the action ran) can never arrive: the round breaks, as a timeout
    // would break it. One that died after the round completed, or while the barrier was
    // broken or resetting, only leaves. One that died waiting for the previous round to drain
    // (or a reset, or the action) breaks the round it was waiting to enter: the current one if
    // that has opened, else the next, as it opens. Rate-limited unless `now`.
    void check_parties(bool now) {
        if (!now) {
            const std::int64_t t = steady_ns();
            if (t < c_.next_scan_ns) return;
            c_.next_scan_ns =
                t + std::chrono::duration_cast<std::chrono::nanoseconds>(party_check_interval)
                        .count() / 2;
        }
        const Dead dead = reap_dead_parties(c_, slots_);
        if (dead.counted == 0 && dead.entering == 0) return;
        if (dead.entering != 0) {
            if (c_.state == filling) c_.state = broken_state;
            else if (c_.state != broken_state) c_.break_next = 1;
        }
        if (dead.counted != 0) {
            if (c_.state == filling || c_.state == running_action) {
                c_.state = broken_state;
            } else if (c_.count == 0 && (c_.state == draining || c_.state == resetting)) {
                reopen(c_);
            }
        }
        cond_notify(c_.cond, UINT32_MAX);
    }

    // Waits for a notify, `deadline` or one check interval, whichever comes first, then looks
    // for dead parties: a party that died inside wait() wakes nobody.
    void wait(const Deadline& deadline) {
        Deadline until = std::chrono::steady_clock::now() + party_check_interval;
        if (deadline && *deadline < *until) until = deadline;
        (void)cond_wait(c_.cond, c_.mutex, until);
        check_recovered();
        check_parties(false);
    }

private:
    BarrierCore& c_;
    PartySlot* slots_;
    bool held_ = true;
};

}  // namespace

Barrier::Barrier(int parties, detail::Timeout timeout)
    : Barrier(parties, timeout, {}, std::nullopt) {}

Barrier::Barrier(int parties, detail::Timeout timeout,
                 std::function<void()> action, std::optional<std::string> task) {
    if (parties < 1 || parties > max_parties)
        throw std::invalid_argument("mp::Barrier: parties must be in [1, 2^30]");
    SharedBlock b = create_block<BarrierCore>(
        Kind::barrier, 2 * static_cast<std::size_t>(parties) * sizeof(PartySlot));
    auto* c = core_of<BarrierCore>(b);
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
    PartySlot* slots = impl_->slots;
    if (action_of == &c)
        throw_errc(std::errc::resource_deadlock_would_occur,
                   "mp::Barrier::wait: called from the barrier's own action");
    bool acquired = false;
    BarrierGuard g(c, slots, deadline, acquired);
    if (!acquired) throw BrokenBarrierError();  // a peer stopped inside the bookkeeping
    // Python's _enter (wait while the previous round drains or a reset completes), with the
    // deadline: a party stuck in the previous round must not hold a timed wait beyond it. A
    // party waiting here holds an `entering` slot (while one of `parties` is free), so that
    // dying here breaks the round it waits for; it becomes the party's counted slot.
    struct Entering {
        BarrierCore& c;
        PartySlot* slots;
        int slot = -1;
        ~Entering() {
            if (slot < 0) return;
            release_slot(slots, slot);
            --c.entering;
        }
        int keep() noexcept {
            if (slot >= 0) {
                --c.entering;
                slots[slot].occupied = slot_counted;
            }
            return std::exchange(slot, -1);
        }
    } entering{c, slots};
    while (c.state == draining || c.state == resetting || c.state == running_action) {
        if (entering.slot < 0 && c.entering < c.parties &&
            (entering.slot = claim_slot(c, slots, slot_entering)) >= 0)
            ++c.entering;
        if (expired(deadline)) {
            barrier_break(c);
            throw BrokenBarrierError();
        }
        g.wait(deadline);
    }
    if (c.state < 0) throw BrokenBarrierError();
    int slot = entering.keep();
    if (slot < 0 && (slot = claim_slot(c, slots, slot_counted)) < 0)
        throw Error("mp::Barrier: no free party slot (its shared state is corrupt)");
    const int index = c.count++;
    // Python's `finally`: leave the barrier, and the last one out reopens it (_exit). Runs with
    // the mutex held (the guard outlives it).
    struct Leave {
        BarrierCore& c;
        PartySlot* slots;
        int slot;
        ~Leave() {
            release_slot(slots, slot);
            if (--c.count == 0 && (c.state == resetting || c.state == draining)) {
                reopen(c);
                cond_notify(c.cond, UINT32_MAX);
            }
        }
    } leave{c, slots, slot};
    if (index + 1 == c.parties) {
        // The last to arrive releases the others (_release), unless a party counted in this
        // round has died since it arrived: the round would pass one party short.
        g.check_parties(true);
        if (c.state != filling) throw BrokenBarrierError();
        if (impl_->action) {
            // Without the mutex: the others' timed waits must not depend on the action's time,
            // and a party killed in the action is found dead by its slot like any other.
            c.state = running_action;
            g.unlock();
            struct InAction {
                const BarrierCore* outer;
                explicit InAction(const BarrierCore& c) : outer(std::exchange(action_of, &c)) {}
                ~InAction() { action_of = outer; }
            };
            try {
                InAction in_action(c);
                impl_->action();
            } catch (...) {
                g.relock();
                barrier_break(c);
                throw;
            }
            g.relock();
            // Aborted, reset, timed out by another party, or recovered meanwhile.
            if (c.state != running_action) throw BrokenBarrierError();
        }
        c.state = draining;
        cond_notify(c.cond, UINT32_MAX);
    } else {
        // _wait: wait_for(state != filling, timeout); the action counts as filling still.
        while (c.state == filling || c.state == running_action) {
            if (expired(deadline)) {
                barrier_break(c);
                throw BrokenBarrierError();
            }
            g.wait(deadline);
        }
        if (c.state < 0) throw BrokenBarrierError();
    }
    return index;
}

void Barrier::reset() {
    check_handle(impl_, "mp::Barrier");
    BarrierCore& c = *impl_->core;
    BarrierGuard g(c, impl_->slots);
    g.check_parties(true);  // a dead party would never leave, and the reset never complete
    c.break_next = 0;       // a reset opens a whole barrier, whoever died before it
    if (c.count > 0) {
        if (c.state != draining) c.state = resetting;
    } else {
        c.state = filling;
    }
    cond_notify(c.cond, UINT32_MAX);
}

void Barrier::abort() {
    check_handle(impl_, "mp::Barrier");
    BarrierCore& c = *impl_->core;
    BarrierGuard g(c, impl_->slots);
    barrier_break(c);
}

int Barrier::parties() const {
    check_handle(impl_, "mp::Barrier");
    return impl_->core->parties;
}

int Barrier::n_waiting() const {
    check_handle(impl_, "mp::Barrier");
    BarrierCore& c = *impl_->core;
    BarrierGuard g(c, impl_->slots);
    g.check_parties(true);
    return c.state == filling || c.state == running_action ? c.count : 0;
}

bool Barrier::broken() const {
    check_handle(impl_, "mp::Barrier");
    BarrierCore& c = *impl_->core;
    BarrierGuard g(c, impl_->slots);
    g.check_parties(true);
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

// Most send their block alone; Condition and Barrier (below) add to it.
template <class T>
void encode_sync(Encoder& e, const T& v) {
    e.put(send_block(e, SyncAccess::impl(v)->block));
}

Lock decode_sync(Decoder& d, std::type_identity<Lock>) {
    return SyncAccess::make_lock(detail::attach_shared<detail::MutexImpl, detail::MutexCore>(
        receive_fd(d), {Kind::lock}, "mp::Lock"));
}

RLock decode_sync(Decoder& d, std::type_identity<RLock>) {
    return SyncAccess::make_rlock(detail::attach_shared<detail::MutexImpl, detail::MutexCore>(
        receive_fd(d), {Kind::rlock}, "mp::RLock"));
}

Semaphore decode_sync(Decoder& d, std::type_identity<Semaphore>) {
    // A BoundedSemaphore sent as a Semaphore stays bounded: the bound is in the shared state.
    return SyncAccess::make_semaphore(
        detail::attach_shared<detail::SemaphoreImpl, detail::SemaphoreCore>(
            receive_fd(d), {Kind::semaphore, Kind::bounded_semaphore}, "mp::Semaphore"));
}

BoundedSemaphore decode_sync(Decoder& d, std::type_identity<BoundedSemaphore>) {
    return SyncAccess::make_bounded(
        detail::attach_shared<detail::SemaphoreImpl, detail::SemaphoreCore>(
            receive_fd(d), {Kind::bounded_semaphore}, "mp::BoundedSemaphore"));
}

void encode_sync(Encoder& e, const Condition& v) {
    const auto& lock = SyncAccess::lock(v);
    const auto& li = SyncAccess::impl(*lock);
    e.put(static_cast<std::uint8_t>(li->recursive ? 1 : 0));
    e.put(send_block(e, li->block));
    e.put(send_block(e, SyncAccess::impl(v)->block));
}
Condition decode_sync(Decoder& d, std::type_identity<Condition>) {
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

Event decode_sync(Decoder& d, std::type_identity<Event>) {
    return SyncAccess::make_event(detail::attach_shared<detail::EventImpl, detail::EventCore>(
        receive_fd(d), {Kind::event}, "mp::Event"));
}

void encode_sync(Encoder& e, const Barrier& v) {
    const auto& impl = SyncAccess::impl(v);
    if (impl->action && !impl->task)
        throw Error("mp::Barrier: its action cannot be sent to another process (it captures "
                    "state); use a function or a captureless lambda, or the fork start method");
    e.put(send_block(e, impl->block));
    e.put(impl->task);
}
Barrier decode_sync(Decoder& d, std::type_identity<Barrier>) {
    auto impl = detail::attach_shared<detail::BarrierImpl, detail::BarrierCore>(
        receive_fd(d), {Kind::barrier}, "mp::Barrier");
    auto task = d.get<std::optional<std::string>>();
    if (task && !impl->task) {
        impl->task = *task;
        impl->action = [bytes = std::move(*task)] { (void)detail::run_task(bytes); };
    }
    return SyncAccess::make_barrier(std::move(impl));
}


}  // namespace

namespace detail {
template <class T>
void SyncCodec<T>::encode(Encoder& e, const T& v) {
    encode_sync(e, v);
}
template <class T>
T SyncCodec<T>::decode(Decoder& d) {
    return decode_sync(d, std::type_identity<T>{});
}
template struct SyncCodec<Lock>;
template struct SyncCodec<RLock>;
template struct SyncCodec<Semaphore>;
template struct SyncCodec<BoundedSemaphore>;
template struct SyncCodec<Condition>;
template struct SyncCodec<Event>;
template struct SyncCodec<Barrier>;
}  // namespace detail

}  // namespace mp
