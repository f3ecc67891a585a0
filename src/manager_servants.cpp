// The built-in servants that synchronise themselves (locks, semaphores, events, conditions,
// barriers, queues: a blocking call on one does not hold up the others), the Namespace, and the
// registry of built-in types every program carries. The templated servants (dict, list, value,
// array) are in include/mp/detail/manager_servants.hpp.

#include "mp/managers.hpp"

#include <chrono>
#include <condition_variable>
#include <deque>
#include <map>
#include <mutex>
#include <stdexcept>
#include <string>
#include <vector>

#include <poll.h>

#include "manager_internal.hpp"
#include "mp/detail/deadline.hpp"

namespace mp {
namespace detail::managers {

/// The connection a server thread serves: lock ownership is per connection.
thread_local std::uint64_t t_caller = 0;

/// The client connection a server thread serves (-1 outside one).
thread_local int t_client_fd = -1;

/// True when the peer of the connection this thread serves has hung up.
bool client_gone() {
    if (t_client_fd < 0) return false;
    pollfd p{t_client_fd, POLLRDHUP, 0};
    return ::poll(&p, 1, 0) > 0 && (p.revents & (POLLRDHUP | POLLHUP | POLLERR)) != 0;
}

namespace {

using Clock = std::chrono::steady_clock;

std::mutex& builtins_mutex() {
    static std::mutex m;
    return m;
}
TypeTable make_builtins();
// Filled with this file's types when first used, not by an initialiser of this file: a Manager
// at namespace scope forks its server during static initialisation, when a static libmp's
// initialisers have not run yet (they come after the program's), and the server serves the
// table as it was at the fork.
TypeTable& builtins() {
    // Never destroyed: a manager may start from a static destructor.
    static TypeTable* t = new TypeTable(make_builtins());
    return *t;
}

// The entry of a servant made with no arguments that synchronises itself (its calls block).
template <class S>
TypeEntry blocking_entry(decltype(TypeEntry::methods) methods) {
    TypeEntry t;
    t.serialised = false;
    t.make = make_servant<S>;
    t.methods = std::move(methods);
    return t;
}

/// Waits until ready() or the timeout (none: forever); false on timeout. Wakes every 100 ms to
/// see whether the client is still there, so a client killed in a blocking call does not leave
/// its thread (and the locks it holds) behind forever.
template <class Pred>
bool wait_for(std::condition_variable& cv, std::unique_lock<std::mutex>& lk, bool blocking,
              const OptTimeout& timeout, Pred ready) {
    if (ready()) return true;
    if (!blocking) return false;
    // Saturated again here: the value came from a peer.
    const mp::detail::Deadline deadline = mp::detail::deadline_after(mp::detail::Timeout(timeout));
    for (;;) {
        auto slice = Clock::now() + std::chrono::milliseconds(100);
        if (deadline && *deadline < slice) slice = *deadline;
        const bool woke = cv.wait_until(lk, slice, ready);
        // Checked before taking what it waited for too: a client killed in q.get() must not
        // swallow the next item put.
        if (client_gone()) throw ClientGone();
        if (woke) return true;
        if (deadline && Clock::now() >= *deadline) return false;
    }
}

// ---- servants that synchronise themselves -------------------------------------------------------

struct NamespaceServant {
    std::map<std::string, std::string> attrs;
};

TypeEntry namespace_entry() {
    using S = NamespaceServant;
    TypeEntry t;
    t.make = make_servant<S>;
    t.methods = {
        {"set", make_method<S>([](S& s, const std::string& k, const std::string& v) {
             s.attrs.insert_or_assign(k, v);
         })},
        {"get", make_method<S>([](S& s, const std::string& k) -> std::string {
             auto it = s.attrs.find(k);
             if (it == s.attrs.end())
                 throw std::out_of_range("AttributeError: the Namespace has no attribute '" + k +
                                         "'");
             return it->second;
         })},
        {"contains", make_method<S>([](S& s, const std::string& k) { return s.attrs.contains(k); })},
        {"erase", make_method<S>([](S& s, const std::string& k) {
             if (s.attrs.erase(k) == 0)
                 throw std::out_of_range("AttributeError: the Namespace has no attribute '" + k +
                                         "'");
         })},
        {"names", make_method<S>([](S& s) {
             std::vector<std::string> r;
             for (auto& kv : s.attrs) r.push_back(kv.first);
             return r;
         })},
    };
    return t;
}

// A servant whose calls block: they wait on cv under m.
struct Monitor {
    std::mutex m;
    std::condition_variable cv;
};

// Who holds a lock servant (Lock, RLock, Condition's lock) and how many times; guarded by the
// servant's mutex.
struct Ownership {
    std::uint64_t owner = 0;
    int count = 0;

    // Takes it for the caller (once more, when reentrant and the caller holds it).
    bool acquire(std::condition_variable& cv, std::unique_lock<std::mutex>& lk, bool reentrant, bool blocking,
                 const OptTimeout& timeout) {
        if (reentrant && count > 0 && owner == t_caller) {
            ++count;
            return true;
        }
        if (!wait_for(cv, lk, blocking, timeout, [&] { return count == 0; })) return false;
        owner = t_caller;
        count = 1;
        return true;
    }
    // Once less; true when that frees it.
    bool release() {
        if (--count != 0) return false;
        owner = 0;
        return true;
    }
    // A client gone while holding it gives it up; true when it held it.
    bool drop(std::uint64_t caller) {
        if (count == 0 || owner != caller) return false;
        count = 0;
        owner = 0;
        return true;
    }
    // The holder's thread ended, in a process that goes on: the lock stays held, owned by no
    // connection, for another thread to release (a plain Lock's rule).
    void orphan(std::uint64_t caller) {
        if (count > 0 && owner == caller) owner = 0;
    }
};

struct LockServant : Monitor {
    explicit LockServant(bool re) : reentrant(re) {}
    Ownership held;
    bool reentrant;

    bool acquire(bool blocking, OptTimeout timeout) {
        std::unique_lock lk(m);
        return held.acquire(cv, lk, reentrant, blocking, timeout);
    }
    void release() {
        std::lock_guard lk(m);
        if (held.count == 0) throw std::runtime_error("release unlocked lock");
        // A plain Lock may be released by anyone, as Python's; an RLock only by its owner.
        if (reentrant && held.owner != t_caller) throw std::runtime_error("cannot release un-acquired lock");
        if (held.release()) cv.notify_one();
    }
    // A process that died gives up what it held. A thread that ended gives up an RLock (no other
    // thread may release it, so kept it would be held for ever) but not a plain Lock: Python's
    // stays held, for any thread to release.
    void disconnect(std::uint64_t caller, bool thread_ended) {
        std::lock_guard lk(m);
        if (thread_ended && !reentrant)
            held.orphan(caller);
        else if (held.drop(caller))
            cv.notify_one();
    }
};

TypeEntry lock_entry(bool reentrant) {
    using S = LockServant;
    TypeEntry t;
    t.serialised = false;
    t.make = [reentrant](Decoder& in) -> std::shared_ptr<void> {
        in.finish();
        return std::make_shared<S>(reentrant);
    };
    t.methods = {{"acquire", make_method(&S::acquire)}, {"release", make_method(&S::release)}};
    t.on_disconnect = [](void* o, std::uint64_t caller, bool thread_ended) {
        static_cast<S*>(o)->disconnect(caller, thread_ended);
    };
    return t;
}

struct SemaphoreServant : Monitor {
    SemaphoreServant(int v, bool b) : value(v), initial(v), bounded(b) {}
    int value, initial;
    bool bounded;
    bool acquire(bool blocking, OptTimeout timeout) {
        std::unique_lock lk(m);
        if (!wait_for(cv, lk, blocking, timeout, [&] { return value > 0; })) return false;
        --value;
        return true;
    }
    void release() {
        std::lock_guard lk(m);
        if (bounded && value >= initial)
            throw std::invalid_argument("ValueError: Semaphore released too many times");
        ++value;
        cv.notify_one();
    }
    int get_value() {
        std::lock_guard lk(m);
        return value;
    }
};

TypeEntry semaphore_entry(bool bounded) {
    using S = SemaphoreServant;
    TypeEntry t;
    t.serialised = false;
    t.make = [bounded](Decoder& in) -> std::shared_ptr<void> {
        int v = in.get<int>();
        in.finish();
        if (v < 0) throw std::invalid_argument("ValueError: semaphore initial value must be >= 0");
        return std::make_shared<S>(v, bounded);
    };
    t.methods = {{"acquire", make_method(&S::acquire)},
                 {"release", make_method(&S::release)},
                 {"get_value", make_method(&S::get_value)}};
    return t;
}

struct EventServant : Monitor {
    bool flag = false;
    void set() {
        std::lock_guard lk(m);
        flag = true;
        cv.notify_all();
    }
    void clear() {
        std::lock_guard lk(m);
        flag = false;
    }
    bool is_set() {
        std::lock_guard lk(m);
        return flag;
    }
    bool wait(OptTimeout timeout) {
        std::unique_lock lk(m);
        return wait_for(cv, lk, true, timeout, [&] { return flag; });
    }
};

TypeEntry event_entry() {
    using S = EventServant;
    TypeEntry t = blocking_entry<S>({{"set", make_method(&S::set)},
                 {"clear", make_method(&S::clear)},
                 {"is_set", make_method(&S::is_set)},
                 {"wait", make_method(&S::wait)}});
    return t;
}

/// A condition variable with its own reentrant lock, owned per connection. Every change
/// notifies all on cv: few waiters, simple.
struct ConditionServant : Monitor {
    Ownership held;  // reentrant
    std::deque<std::shared_ptr<bool>> waiters;  // tickets, oldest first

    bool acquire(bool blocking, OptTimeout timeout) {
        std::unique_lock lk(m);
        return held.acquire(cv, lk, true, blocking, timeout);
    }
    void check_owned() const {
        if (held.count == 0 || held.owner != t_caller) throw std::runtime_error("cannot use un-acquired lock");
    }
    void release() {
        std::lock_guard lk(m);
        check_owned();
        if (held.release()) cv.notify_all();
    }
    bool wait(OptTimeout timeout) {
        std::unique_lock lk(m);
        check_owned();
        auto ticket = std::make_shared<bool>(false);
        waiters.push_back(ticket);
        int saved = std::exchange(held.count, 0);
        held.owner = 0;
        cv.notify_all();
        bool notified;
        try {
            notified = wait_for(cv, lk, true, timeout, [&] { return *ticket; });
        } catch (...) {
            std::erase(waiters, ticket);
            throw;
        }
        if (!notified) std::erase(waiters, ticket);
        wait_for(cv, lk, true, std::nullopt, [&] { return held.count == 0; });
        held.owner = t_caller;
        held.count = saved;
        return notified;
    }
    void notify(int n) {
        std::lock_guard lk(m);
        check_owned();
        for (; n > 0 && !waiters.empty(); --n) {
            *waiters.front() = true;
            waiters.pop_front();
        }
        cv.notify_all();
    }
    void notify_all() { notify(static_cast<int>(waiters.size())); }
    void disconnect(std::uint64_t caller) {
        std::lock_guard lk(m);
        if (held.drop(caller)) cv.notify_all();
    }
};

TypeEntry condition_entry() {
    using S = ConditionServant;
    TypeEntry t = blocking_entry<S>({{"acquire", make_method(&S::acquire)},
                 {"release", make_method(&S::release)},
                 {"wait", make_method(&S::wait)},
                 {"notify", make_method(&S::notify)},
                 {"notify_all", make_method(&S::notify_all)}});
    // Its lock is an RLock (Python's Condition() makes one): released when its holder goes.
    t.on_disconnect = [](void* o, std::uint64_t caller, bool) { static_cast<S*>(o)->disconnect(caller); };
    return t;
}

struct BarrierServant : Monitor {
    explicit BarrierServant(int n) : n_parties(n) {}
    int n_parties;
    int count = 0;
    std::uint64_t generation = 0;
    bool is_broken = false;
    // Generations that ended broken (abort, reset or a timeout while parties waited).
    std::uint64_t broken_generation = ~std::uint64_t{0};

    void break_now() {
        is_broken = true;
        broken_generation = generation;
        cv.notify_all();
    }
    int wait(OptTimeout timeout) {
        std::unique_lock lk(m);
        if (is_broken) throw BrokenBarrierError();
        int index = count++;
        std::uint64_t gen = generation;
        if (count == n_parties) {
            count = 0;
            ++generation;
            cv.notify_all();
            return index;
        }
        bool done = wait_for(cv, lk, true, timeout,
                             [&] { return generation != gen || broken_generation == gen; });
        if (broken_generation == gen) throw BrokenBarrierError();
        if (!done) {
            break_now();
            throw BrokenBarrierError();
        }
        return index;
    }
    void abort() {
        std::lock_guard lk(m);
        break_now();
    }
    void reset() {
        std::lock_guard lk(m);
        if (count > 0) {
            broken_generation = generation;
            cv.notify_all();
        }
        ++generation;
        count = 0;
        is_broken = false;
    }
    int parties() { return n_parties; }
    int n_waiting() {
        std::lock_guard lk(m);
        return count;
    }
    bool broken() {
        std::lock_guard lk(m);
        return is_broken;
    }
};

TypeEntry barrier_entry() {
    using S = BarrierServant;
    TypeEntry t;
    t.serialised = false;
    t.make = [](Decoder& in) -> std::shared_ptr<void> {
        int n = in.get<int>();
        in.finish();
        if (n < 1) throw std::invalid_argument("ValueError: a Barrier needs at least one party");
        return std::make_shared<S>(n);
    };
    t.methods = {{"wait", make_method(&S::wait)},       {"abort", make_method(&S::abort)},
                 {"reset", make_method(&S::reset)},     {"parties", make_method(&S::parties)},
                 {"n_waiting", make_method(&S::n_waiting)}, {"broken", make_method(&S::broken)}};
    return t;
}

TypeTable make_builtins() {
    TypeTable t;
    t.emplace("Namespace", namespace_entry());
    t.emplace("Lock", lock_entry(false));
    t.emplace("RLock", lock_entry(true));
    t.emplace("Semaphore", semaphore_entry(false));
    t.emplace("BoundedSemaphore", semaphore_entry(true));
    t.emplace("Event", event_entry());
    t.emplace("Condition", condition_entry());
    t.emplace("Barrier", barrier_entry());
    t.emplace("Pool", pool_entry());
    t.emplace("SegmentTracker", segment_tracker_entry());
    return t;
}

}  // namespace

/// Items as bytes, so one servant serves every Queue<T>.
struct QueueCore {
    explicit QueueCore(std::int64_t max) : maxsize(max) {}
    std::mutex m;
    std::condition_variable cv;
    std::deque<std::string> items;
    std::int64_t maxsize;
    std::int64_t unfinished = 0;

    bool full_locked() const { return maxsize > 0 && std::int64_t(items.size()) >= maxsize; }
    void put(const std::string& item, bool block, OptTimeout timeout) {
        std::unique_lock lk(m);
        if (!wait_for(cv, lk, block, timeout, [&] { return !full_locked(); })) throw Full();
        items.push_back(item);
        ++unfinished;
        cv.notify_all();
    }
    std::string get(bool block, OptTimeout timeout) {
        std::unique_lock lk(m);
        if (!wait_for(cv, lk, block, timeout, [&] { return !items.empty(); })) throw Empty();
        std::string r = std::move(items.front());
        items.pop_front();
        cv.notify_all();
        return r;
    }
    std::uint64_t qsize() {
        std::lock_guard lk(m);
        return items.size();
    }
    bool full() {
        std::lock_guard lk(m);
        return full_locked();
    }
    void task_done() {
        std::lock_guard lk(m);
        if (unfinished <= 0) throw std::invalid_argument("ValueError: task_done() called too many times");
        if (--unfinished == 0) cv.notify_all();
    }
    void join() {
        std::unique_lock lk(m);
        wait_for(cv, lk, true, std::nullopt, [&] { return unfinished == 0; });
    }
};

TypeEntry queue_entry() {
    using S = QueueCore;
    TypeEntry t;
    t.serialised = false;
    t.make = [](Decoder& in) -> std::shared_ptr<void> {
        auto max = in.get<std::int64_t>();
        in.finish();
        return std::make_shared<S>(max);
    };
    t.methods = {{"put", make_method(&S::put)},           {"get", make_method(&S::get)},
                 {"qsize", make_method(&S::qsize)},       {"full", make_method(&S::full)},
                 {"task_done", make_method(&S::task_done)}, {"join", make_method(&S::join)}};
    return t;
}

bool register_builtin(const std::string& name, TypeEntry (*make_entry)()) {
    std::lock_guard lk(builtins_mutex());
    if (!builtins().contains(name)) builtins().emplace(name, make_entry());
    return true;
}

std::size_t normalise_index(std::int64_t i, std::size_t size, bool allow_end) {
    auto n = static_cast<std::int64_t>(size);
    if (i < 0) i += n;
    if (i < 0 || i > n || (i == n && !allow_end))
        throw std::out_of_range("IndexError: list index out of range");
    return static_cast<std::size_t>(i);
}

const TypeEntry* find_builtin(const std::string& name) {
    std::lock_guard lk(builtins_mutex());
    auto it = builtins().find(name);
    return it == builtins().end() ? nullptr : &it->second;
}

}  // namespace detail::managers
}  // namespace mp
