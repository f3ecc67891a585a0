// Managers: the server process (one thread per client connection, as Python's Server), the
// built-in servants that synchronise themselves (queues, locks, events, ...), and the client's
// per-thread connections.

#include "mp/managers.hpp"

#include <algorithm>
#include <condition_variable>
#include <deque>
#include <mutex>
#include <stdexcept>
#include <system_error>
#include <thread>

#include <poll.h>
#include <pthread.h>
#include <sys/socket.h>
#include <unistd.h>

#include "manager_channel.hpp"
#include "mp/detail/future_core.hpp"
#include "mp/process.hpp"
#include "sys/crypto.hpp"

namespace mp {
namespace detail::managers {

namespace {

/// What a server raises for a method the type does not expose or an object it does not hold
/// (Python raises AttributeError / KeyError there); the client sees mp::RemoteError.
struct AttributeError : std::runtime_error {
    using std::runtime_error::runtime_error;
};
struct NoSuchObject : std::runtime_error {
    using std::runtime_error::runtime_error;
};

using Clock = std::chrono::steady_clock;
constexpr auto kHandshakeTimeout = std::chrono::seconds(5);
constexpr std::size_t kMaxMessage = BaseManager::max_message;

/// The connection a server thread serves: lock ownership is per connection.
thread_local std::uint64_t t_caller = 0;

std::mutex& builtins_mutex() {
    static std::mutex m;
    return m;
}
TypeTable& builtins() {
    static TypeTable t;
    return t;
}

/// The client connection a server thread serves (-1 outside one).
thread_local int t_client_fd = -1;

/// Thrown out of a blocking wait when the client went away: the thread then ends, and what the
/// client held is released.
struct ClientGone : std::runtime_error {
    ClientGone() : std::runtime_error("the client disconnected") {}
};

/// True when the peer of the connection this thread serves has hung up.
bool client_gone() {
    if (t_client_fd < 0) return false;
    pollfd p{t_client_fd, POLLRDHUP, 0};
    return ::poll(&p, 1, 0) > 0 && (p.revents & (POLLRDHUP | POLLHUP | POLLERR)) != 0;
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
        if (cv.wait_until(lk, slice, ready)) return true;
        if (deadline && Clock::now() >= *deadline) return false;
        if (client_gone()) throw ClientGone();
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

struct LockServant {
    explicit LockServant(bool re) : reentrant(re) {}
    std::mutex m;
    std::condition_variable cv;
    std::uint64_t owner = 0;
    int count = 0;
    bool reentrant;

    bool acquire(bool blocking, OptTimeout timeout) {
        std::unique_lock lk(m);
        if (reentrant && count > 0 && owner == t_caller) {
            ++count;
            return true;
        }
        if (!wait_for(cv, lk, blocking, timeout, [&] { return count == 0; })) return false;
        owner = t_caller;
        count = 1;
        return true;
    }
    void release() {
        std::lock_guard lk(m);
        if (count == 0) throw std::runtime_error("release unlocked lock");
        // A plain Lock may be released by anyone, as Python's; an RLock only by its owner.
        if (reentrant && owner != t_caller) throw std::runtime_error("cannot release un-acquired lock");
        if (--count == 0) {
            owner = 0;
            cv.notify_one();
        }
    }
    void disconnect(std::uint64_t caller) {
        std::lock_guard lk(m);
        if (count > 0 && owner == caller) {
            count = 0;
            owner = 0;
            cv.notify_one();
        }
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
    t.on_disconnect = [](void* o, std::uint64_t caller) { static_cast<S*>(o)->disconnect(caller); };
    return t;
}

struct SemaphoreServant {
    SemaphoreServant(int v, bool b) : value(v), initial(v), bounded(b) {}
    std::mutex m;
    std::condition_variable cv;
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

struct EventServant {
    std::mutex m;
    std::condition_variable cv;
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
    TypeEntry t;
    t.serialised = false;
    t.make = make_servant<S>;
    t.methods = {{"set", make_method(&S::set)},
                 {"clear", make_method(&S::clear)},
                 {"is_set", make_method(&S::is_set)},
                 {"wait", make_method(&S::wait)}};
    return t;
}

/// A condition variable with its own reentrant lock, owned per connection.
struct ConditionServant {
    std::mutex m;
    std::condition_variable cv;  // every change notifies all: few waiters, simple
    std::uint64_t owner = 0;
    int count = 0;
    std::deque<std::shared_ptr<bool>> waiters;  // tickets, oldest first

    bool acquire(bool blocking, OptTimeout timeout) {
        std::unique_lock lk(m);
        if (count > 0 && owner == t_caller) {
            ++count;
            return true;
        }
        if (!wait_for(cv, lk, blocking, timeout, [&] { return count == 0; })) return false;
        owner = t_caller;
        count = 1;
        return true;
    }
    void check_owned() const {
        if (count == 0 || owner != t_caller) throw std::runtime_error("cannot use un-acquired lock");
    }
    void release() {
        std::lock_guard lk(m);
        check_owned();
        if (--count == 0) {
            owner = 0;
            cv.notify_all();
        }
    }
    bool wait(OptTimeout timeout) {
        std::unique_lock lk(m);
        check_owned();
        auto ticket = std::make_shared<bool>(false);
        waiters.push_back(ticket);
        int saved = std::exchange(count, 0);
        owner = 0;
        cv.notify_all();
        bool notified;
        try {
            notified = wait_for(cv, lk, true, timeout, [&] { return *ticket; });
        } catch (...) {
            std::erase(waiters, ticket);
            throw;
        }
        if (!notified) std::erase(waiters, ticket);
        wait_for(cv, lk, true, std::nullopt, [&] { return count == 0; });
        owner = t_caller;
        count = saved;
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
        if (count > 0 && owner == caller) {
            count = 0;
            owner = 0;
            cv.notify_all();
        }
    }
};

TypeEntry condition_entry() {
    using S = ConditionServant;
    TypeEntry t;
    t.serialised = false;
    t.make = make_servant<S>;
    t.methods = {{"acquire", make_method(&S::acquire)},
                 {"release", make_method(&S::release)},
                 {"wait", make_method(&S::wait)},
                 {"notify", make_method(&S::notify)},
                 {"notify_all", make_method(&S::notify_all)}};
    t.on_disconnect = [](void* o, std::uint64_t caller) { static_cast<S*>(o)->disconnect(caller); };
    return t;
}

struct BarrierServant {
    explicit BarrierServant(int n) : n_parties(n) {}
    std::mutex m;
    std::condition_variable cv;
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

const bool kRegistered = [] {
    register_builtin("Namespace", namespace_entry);
    register_builtin("Lock", [] { return lock_entry(false); });
    register_builtin("RLock", [] { return lock_entry(true); });
    register_builtin("Semaphore", [] { return semaphore_entry(false); });
    register_builtin("BoundedSemaphore", [] { return semaphore_entry(true); });
    register_builtin("Event", event_entry);
    register_builtin("Condition", condition_entry);
    register_builtin("Barrier", barrier_entry);
    return true;
}();

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

void encode_address(Encoder& e, const Address& a) {
    e.put(static_cast<std::uint8_t>(a.family));
    e.put(a.host);
    e.put(a.port);
    e.put(a.path);
}

Address decode_address(Decoder& d) {
    auto family = d.get<std::uint8_t>();
    if (family > 2) throw DecodeError("mp: bad manager address family");
    Address a;
    a.family = static_cast<Address::Family>(family);
    a.host = d.get<std::string>();
    a.port = d.get<std::uint16_t>();
    a.path = d.get<std::string>();
    return a;
}

// ---- the server -------------------------------------------------------------------------------

namespace {

struct Object {
    std::shared_ptr<void> value;
    const TypeEntry* type = nullptr;
    std::string type_id;
    std::mutex mu;
    std::int64_t refs = 1;
};

class Server : public std::enable_shared_from_this<Server> {
public:
    // The Listener runs the handshakes, all of them in the accept loop and at once (none holds
    // up another, and an unauthenticated peer costs no thread); a client gets its thread only
    // once it has authenticated.
    Server(const Address& address, std::string authkey, TypeTable types)
        : listener_(address,
                    {.authkey = std::move(authkey), .handshake_timeout = kHandshakeTimeout}),
          types_(std::move(types)) {
        auto [r, w] = Pipe(false);
        wake_r_ = r;
        wake_w_ = w;
    }

    const Address& address() const { return listener_.address(); }

    /// Accepts until shutdown; then closes every client connection and returns.
    void serve() {
        while (!stopping_.load()) {
            std::optional<Connection> c;
            try {
                c = accept_or_stop(listener_, wake_r_.fileno());
            } catch (const std::exception&) {
                // A peer that failed its handshake or vanished, or no descriptor or memory for
                // a new one: the Listener then leaves its backlog alone for a while (no spinning
                // here), and the clients' threads carry on.
                continue;
            }
            if (!c || stopping_.load()) break;
            std::uint64_t caller = ++next_caller_;
            {
                std::lock_guard lk(mu_);
                clients_.emplace(caller, c->fileno());
            }
            try {
                std::thread(&Server::serve_client, shared_from_this(), std::move(*c), caller)
                    .detach();
            } catch (const std::system_error&) {
                // No thread to be had (EAGAIN: RLIMIT_NPROC, memory): refuse this client (its
                // connection closes with the arguments std::thread had taken) and stay up.
                std::lock_guard lk(mu_);
                clients_.erase(caller);
            }
        }
        listener_.close();
        std::lock_guard lk(mu_);
        // Wake the client threads out of their reads; they close their own ends.
        for (auto& [id, fd] : clients_) ::shutdown(fd, SHUT_RDWR);
    }

private:
    const TypeEntry* find_type(const std::string& name) {
        if (auto it = types_.find(name); it != types_.end()) return &it->second;
        std::lock_guard lk(builtins_mutex());
        if (auto it = builtins().find(name); it != builtins().end()) return &it->second;
        return nullptr;
    }

    std::shared_ptr<Object> find_object(std::uint64_t id) {
        std::lock_guard lk(mu_);
        auto it = objects_.find(id);
        if (it == objects_.end())
            throw NoSuchObject("no object with id " + std::to_string(id) + " in the manager");
        return it->second;
    }

    void handle(Decoder& in, Encoder& out) {
        auto op = static_cast<Op>(in.get<std::uint8_t>());
        auto id = in.get<std::uint64_t>();
        std::string name(in.read_view(in.read_size(1)));
        Decoder& a = in;  // the arguments are the rest of the message
        switch (op) {
            case Op::call: {
                auto obj = find_object(id);
                auto m = obj->type->methods.find(name);
                if (m == obj->type->methods.end())
                    throw AttributeError("method '" + name + "' of '" + obj->type_id +
                                         "' object is not exposed");
                if (obj->type->serialised) {
                    std::lock_guard lk(obj->mu);
                    m->second(obj->value.get(), a, out);
                } else {
                    m->second(obj->value.get(), a, out);
                }
                return;
            }
            case Op::create: {
                const TypeEntry* t = find_type(name);
                if (!t) throw AttributeError("type '" + name + "' is not registered with the manager");
                auto obj = std::make_shared<Object>();
                obj->value = t->make(a);
                obj->type = t;
                obj->type_id = name;
                std::lock_guard lk(mu_);
                std::uint64_t nid = ++next_object_;
                objects_.emplace(nid, std::move(obj));
                out.put(nid);
                return;
            }
            case Op::incref: {
                std::lock_guard lk(mu_);
                auto it = objects_.find(id);
                if (it == objects_.end())
                    throw NoSuchObject("no object with id " + std::to_string(id) + " in the manager");
                ++it->second->refs;
                return;
            }
            case Op::decref: {
                std::shared_ptr<Object> dead;  // destroyed outside the lock
                std::lock_guard lk(mu_);
                auto it = objects_.find(id);
                if (it != objects_.end() && --it->second->refs <= 0) {
                    dead = std::move(it->second);
                    objects_.erase(it);
                }
                return;
            }
            case Op::shutdown:
                stopping_.store(true);
                return;
            case Op::ping:
                return;
            case Op::channel:
                break;  // asked for once, before any call (serve_client): not here
        }
        throw DecodeError("mp: unknown manager request");
    }

    void serve_client(Connection c, std::uint64_t caller) {
        t_caller = caller;
        t_client_fd = c.fileno();
        try {
            Channel channel;
            std::string msg;
            for (;;) {
                if (channel) {
                    channel.receive(c, msg, kMaxMessage, [this] {
                        if (stopping_.load() || client_gone()) throw ClientGone();
                    });
                } else {
                    msg = c.recv_bytes(kMaxMessage);
                    if (!msg.empty() && msg[0] == static_cast<char>(Op::channel)) {
                        channel = offer_channel(c);
                        continue;
                    }
                }
                Encoder out;
                out.put(std::uint8_t{0});
                bool stop = false;
                try {
                    Decoder in(msg);
                    handle(in, out);
                    if (out.bytes().size() > kMaxMessage)
                        throw Error("mp: a reply of " + std::to_string(out.bytes().size()) +
                                    " bytes is over the manager's limit of " +
                                    std::to_string(kMaxMessage));
                    stop = stopping_.load();
                } catch (...) {
                    out = Encoder();
                    out.put(std::uint8_t{1});
                    encode_current_exception(out);
                }
                if (channel)
                    channel.reply(c, out.bytes());
                else
                    c.send_bytes(out.bytes());
                if (stop) {
                    char b = 1;
                    (void)!::write(wake_w_.fileno(), &b, 1);
                }
            }
        } catch (...) {
            // End of file (the client left or was killed), a failed handshake, or shutdown.
        }
        {
            std::lock_guard lk(mu_);
            clients_.erase(caller);
        }
        release_owned(caller);
        c.close();
    }

    /// Answers a client's request for a shared-memory channel (a Unix socket only: the peer is on
    /// this host, and has passed the handshake). Without one (no memfd to be had, or TCP) the
    /// client goes on over the socket.
    Channel offer_channel(Connection& c) {
        Channel channel;
        ChannelOffer offer;
        if (listener_.address().is_unix()) {
            try {
                channel = Channel::create(offer.fd);
            } catch (const std::system_error&) {
                channel = Channel();
                offer.fd.reset();
            }
        }
        c.send(offer);
        return channel;  // the memfd closes here: the client has its own copy
    }

    /// Releases what a departed connection held (locks), so a killed client cannot wedge others.
    void release_owned(std::uint64_t caller) {
        std::vector<std::shared_ptr<Object>> held;
        {
            std::lock_guard lk(mu_);
            for (auto& [id, obj] : objects_)
                if (obj->type->on_disconnect) held.push_back(obj);
        }
        for (auto& obj : held) obj->type->on_disconnect(obj->value.get(), caller);
    }

    Listener listener_;
    TypeTable types_;
    Connection wake_r_, wake_w_;
    std::atomic<bool> stopping_{false};
    std::mutex mu_;
    std::unordered_map<std::uint64_t, std::shared_ptr<Object>> objects_;
    std::unordered_map<std::uint64_t, int> clients_;
    std::uint64_t next_object_ = 0;
    std::atomic<std::uint64_t> next_caller_{0};
};

// ---- the client's connections ------------------------------------------------------------------

/// This process's id, cached: getpid() is a system call, and a proxy call looks it up each time
/// (to notice a fork child). Cleared in a fork child (pthread_atfork); mp forks only through
/// fork(), which runs the handlers.
std::atomic<pid_t> g_pid{0};
[[maybe_unused]] const int g_pid_atfork =
    ::pthread_atfork(nullptr, nullptr, [] { g_pid.store(0, std::memory_order_relaxed); });

pid_t current_pid() noexcept {
    pid_t p = g_pid.load(std::memory_order_relaxed);
    if (p == 0) {
        p = ::getpid();
        g_pid.store(p, std::memory_order_relaxed);
    }
    return p;
}

/// A connection to a server and, on a Unix socket, its shared-memory channel.
struct Link {
    Connection socket;
    Channel channel;
};

/// One connection per server (and key) per thread; a fork child starts afresh.
struct ClientConnections {
    pid_t pid = 0;
    std::map<std::string, Link> by_address;
    // The last one used, so that a run of calls to one server skips the map.
    Link* last = nullptr;
    Address last_address;
    std::string last_key;
};
thread_local ClientConnections t_connections;

std::string connection_key(const Address& address, const std::string& authkey) {
    return address.to_string() + '\n' + authkey;
}

/// Connects and authenticates; over a Unix socket, also asks for a channel.
Link open_link(const Address& address, const std::string& authkey) {
    Link l{Client(address, {.authkey = authkey}), Channel()};
    if (address.is_unix()) {
        Encoder e;
        begin_request(e, Op::channel, 0, {});
        l.socket.send_bytes(e.bytes());
        auto offer = l.socket.recv<ChannelOffer>();
        if (offer.fd) l.channel = Channel::attach(std::move(offer.fd));
    }
    return l;
}

Link& connection_to(const Address& address, const std::string& authkey) {
    ClientConnections& cc = t_connections;
    pid_t pid = current_pid();
    if (cc.pid != pid) {
        // A fork child's copies of its parent's connections (and channels): never used, just
        // dropped (closing a socket copy and unmapping a channel touch nothing the parent uses).
        cc.by_address.clear();
        cc.last = nullptr;
        cc.pid = pid;
    }
    if (cc.last && cc.last_address == address && cc.last_key == authkey) return *cc.last;
    std::string key = connection_key(address, authkey);
    auto it = cc.by_address.find(key);
    if (it == cc.by_address.end())
        it = cc.by_address.emplace(key, open_link(address, authkey)).first;
    cc.last = &it->second;
    cc.last_address = address;
    cc.last_key = authkey;
    return it->second;
}

/// Drops this thread's connection to a server that went away (so no descriptor lingers).
void drop_connection(const Address& address, const std::string& authkey) {
    ClientConnections& cc = t_connections;
    if (cc.pid != current_pid()) return;
    cc.by_address.erase(connection_key(address, authkey));
    cc.last = nullptr;
}

std::string random_key() { return sys::crypto::random_string(32); }

}  // namespace

std::string request(const Address& address, const std::string& authkey, std::string& message) {
    // The server would drop the connection on reading the header; say why instead.
    if (message.size() > kMaxMessage)
        throw Error("mp: a manager request of " + std::to_string(message.size()) +
                    " bytes is over the limit of " + std::to_string(kMaxMessage));
    std::string reply;
    {
        Link& link = connection_to(address, authkey);
        try {
            if (link.channel) {
                reply = link.channel.call(link.socket, message);
            } else {
                link.socket.send_bytes(message);
                reply = link.socket.recv_bytes();
            }
        } catch (...) {
            // The server is gone (or the stream is out of step): the next call reconnects.
            drop_connection(address, authkey);
            throw;
        }
    }
    if (reply.empty()) throw DecodeError("mp: empty reply from the manager");
    if (reply[0] == 0) {
        reply.erase(0, 1);
        return reply;
    }
    Decoder d(std::string_view(reply).substr(1));
    ErrorInfo info = decode_error_info(d);
    std::rethrow_exception(make_remote_exception(info));
}

std::string request(const Address& address, const std::string& authkey, Op op, std::uint64_t id,
                    std::string_view name, std::string_view args) {
    Encoder e;
    begin_request(e, op, id, name);
    e.write(args.data(), args.size());
    return request(address, authkey, e.bytes());
}

std::shared_ptr<ProxyState> adopt(Address address, std::string authkey, std::string type_id,
                                  std::uint64_t id, bool incref) {
    auto s = std::make_shared<ProxyState>();
    s->address = std::move(address);
    s->authkey = std::move(authkey);
    s->type_id = std::move(type_id);
    s->id = id;
    if (incref) request(s->address, s->authkey, Op::incref, id, {}, {});
    s->owner = ::getpid();
    return s;
}

ProxyState::~ProxyState() {
    if (owner != ::getpid()) return;
    try {
        request(address, authkey, Op::decref, id, {}, {});
    } catch (...) {
        // The server is gone: nothing left to release.
    }
}

struct ServerHandle {
    std::unique_ptr<Process> process;
};

}  // namespace detail::managers

// ---- BaseManager ---------------------------------------------------------------------------------

namespace dm = detail::managers;

namespace {
Address fresh_unix_address() {
    static std::atomic<int> counter{0};
    return Address::abstract("mp-manager-" + std::to_string(::getpid()) + "-" +
                             std::to_string(++counter) + "-" +
                             std::to_string(std::chrono::steady_clock::now().time_since_epoch().count()));
}
}  // namespace

BaseManager::BaseManager() : address_(fresh_unix_address()), authkey_(dm::random_key()) {}

BaseManager::BaseManager(Address address, std::string authkey)
    : address_(std::move(address)), authkey_(std::move(authkey)) {
    if (address_.is_tcp() && authkey_.empty())
        throw std::invalid_argument("mp::BaseManager: a TCP address needs an authkey");
}

BaseManager::~BaseManager() {
    if (server_) {
        try {
            shutdown();
        } catch (...) {
        }
    }
}

pid_t BaseManager::server_pid() const noexcept { return server_ ? server_->process->pid() : 0; }

void BaseManager::start() {
    if (server_ || connected_) throw ProcessError("mp::BaseManager: already started or connected");
    auto [reader, writer] = Pipe(false);
    auto handle = std::make_unique<dm::ServerHandle>();
    handle->process = std::make_unique<Process>(
        ProcessOptions{.name = "ManagerServer", .daemon = true, .start_method = StartMethod::fork},
        [address = address_, key = authkey_, types = types_](Connection ready) {
            std::shared_ptr<dm::Server> s;
            try {
                s = std::make_shared<dm::Server>(address, key, types);
            } catch (const std::exception& e) {
                ready.send_bytes(std::string("E") + e.what());
                return;
            }
            Encoder e;
            e.put(std::uint8_t{'A'});
            dm::encode_address(e, s->address());
            ready.send_bytes(e.bytes());
            ready.close();
            s->serve();
        },
        writer);
    handle->process->start();
    writer.close();
    // The server binds in the child and reports its address (the real port for port 0).
    std::string msg;
    try {
        if (!reader.poll(std::chrono::seconds(30)))
            throw ProcessError("mp::BaseManager: the server did not start within 30 s");
        msg = reader.recv_bytes();
    } catch (const EOFError&) {
        handle->process->join();
        throw ProcessError("mp::BaseManager: the server process died while starting");
    } catch (...) {
        handle->process->kill();
        handle->process->join();
        throw;
    }
    if (msg.empty() || msg[0] != 'A') {
        handle->process->join();
        throw ProcessError("mp::BaseManager: the server could not start: " +
                           (msg.empty() ? std::string() : msg.substr(1)));
    }
    Decoder d(std::string_view(msg).substr(1));
    address_ = dm::decode_address(d);
    server_ = std::move(handle);
}

void BaseManager::serve_forever(std::function<void(const Address&)> on_ready) {
    auto s = std::make_shared<dm::Server>(address_, authkey_, types_);
    address_ = s->address();
    if (on_ready) on_ready(address_);
    s->serve();
}

void BaseManager::connect() {
    dm::request(address_, authkey_, dm::Op::ping, 0, {}, {});
    connected_ = true;
}

void BaseManager::shutdown() {
    if (!server_) {
        if (connected_) {
            connected_ = false;
            dm::request(address_, authkey_, dm::Op::shutdown, 0, {}, {});
            dm::drop_connection(address_, authkey_);
        }
        return;
    }
    auto handle = std::move(server_);
    if (handle->process->is_alive()) {
        try {
            dm::request(address_, authkey_, dm::Op::shutdown, 0, {}, {});
        } catch (...) {
            // Not answering: it is killed below.
        }
        if (!handle->process->join(std::chrono::seconds(5))) {
            handle->process->kill();
            handle->process->join();
        }
    } else {
        handle->process->join();
    }
    dm::drop_connection(address_, authkey_);
}

std::shared_ptr<dm::ProxyState> BaseManager::create_state(const std::string& type_id,
                                                          std::string args) {
    std::string reply = dm::request(address_, authkey_, dm::Op::create, 0, type_id, args);
    Decoder d(reply);
    auto id = d.get<std::uint64_t>();
    d.finish();
    return dm::adopt(address_, authkey_, type_id, id, false);
}

// ---- SyncManager -------------------------------------------------------------------------------

SyncManager::SyncManager() : BaseManager() { start(); }

NamespaceProxy SyncManager::Namespace() { return NamespaceProxy(create_state("Namespace", {})); }
LockProxy SyncManager::Lock() { return LockProxy(create_state("Lock", {})); }
RLockProxy SyncManager::RLock() { return RLockProxy(create_state("RLock", {})); }
SemaphoreProxy SyncManager::Semaphore(int value) {
    return SemaphoreProxy(create_state("Semaphore", encode_args(value)));
}
SemaphoreProxy SyncManager::BoundedSemaphore(int value) {
    return SemaphoreProxy(create_state("BoundedSemaphore", encode_args(value)));
}
EventProxy SyncManager::Event() { return EventProxy(create_state("Event", {})); }
ConditionProxy SyncManager::Condition() { return ConditionProxy(create_state("Condition", {})); }
BarrierProxy SyncManager::Barrier(int parties) {
    return BarrierProxy(create_state("Barrier", encode_args(parties)));
}

}  // namespace mp
