#pragma once
/// \file
/// Managers: state kept in a server process and used from other processes through proxies, as
/// Python's multiprocessing.managers.
///
///     mp::Manager m;                                   // starts the server process (fork)
///     auto d = m.dict<std::string, int>();
///     mp::Process p([](auto d) { d.set("a", 1); }, d); // a proxy passes to children
///     p.start(); p.join();
///     d.get("a");                                      // 1
///
///     mp::BaseManager srv(mp::Address("127.0.0.1", 0), "secret");
///     srv.register_type<Counter>("Counter", {{"inc", &Counter::inc}, {"get", &Counter::get}});
///     srv.start();                                     // or serve_forever() in this process
///     // elsewhere (the same program, registering the same types):
///     mp::BaseManager cli(address, "secret");
///     cli.register_type<Counter>("Counter", {...});
///     cli.connect();
///     auto c = cli.create("Counter");
///     c.call("inc", 5);  c.call<int>("get");
///
/// Protocol. Each proxy call is one request and one reply over a connection to the server
/// (a Unix or TCP stream socket carrying mp::Connection frames). The server serves every client
/// connection with its own thread, as Python's does; a call on a dict, list, Namespace, Value,
/// Array or a registered type holds that object's mutex, so each call is atomic. Queues, locks,
/// events, conditions, semaphores and barriers synchronise themselves, so a blocking call on
/// one does not hold up others. Each thread of each process opens its own connection to a
/// server on first use (a fork child opens a new one: it never shares its parent's).
/// Same host: over a Unix socket address (what mp::Manager uses), an authenticated connection
/// also gets a block of shared memory from the server (a memfd passed over the socket, never
/// named in /dev/shm), and each call goes through it instead of the socket: the request and the
/// reply are copied in, and the waiting side spins briefly, then sleeps on a futex. Messages over
/// 64 KiB still travel over the socket, which also tells each side that the other died. TCP
/// connections always use the socket.
///
/// Authentication. Every connection starts with a mutual HMAC-SHA256 challenge on the
/// manager's authkey (both directions, compared in constant time); a wrong key is
/// mp::AuthenticationError on the client and the server keeps serving others. An mp::Manager
/// makes a random key. A TCP address requires a non-empty key (std::invalid_argument).
///
/// Errors a proxy call raises:
///   - an exception thrown by the method on the server: the same standard or mp exception type
///     when it is one (std::out_of_range for a missing dict key or list index, mp::Empty for
///     get_nowait on an empty queue, ...), otherwise mp::RemoteError with its type name,
///     message and origin;
///   - a method the type does not expose, or an object that no longer exists: mp::RemoteError;
///   - the server died (or shut down) before or during the call: mp::EOFError when the
///     connection breaks, std::system_error (ECONNREFUSED / ENOENT) when no server listens.
///     A call never hangs on a dead server.
/// A client killed in the middle of a call costs the server only that connection's thread.
///
/// Python clients. Every mp manager server also speaks Python's manager protocol
/// (multiprocessing.managers, CPython 3.8 to 3.13): it tells the two apart by a connection's
/// first request (a pickle begins with the byte 0x80, an mp request never does), so there is no
/// option to set. A Python `BaseManager(address=..., authkey=...)` subclass with
/// `register('dict')`, or a `SyncManager`, can connect() and use `dict`, `list`, `Namespace`,
/// `Queue`, `JoinableQueue`, `Lock`, `RLock`, `Event` and `Value` with plain-data arguments (the
/// mp/py.hpp types; anything else in a request is refused with a RemoteError naming what was
/// refused), and the names given to register_shared(). These objects hold Python values
/// (py::Object) and live in the server as Python's: create() gives the first reference,
/// incref/decref move it, the object goes at zero. A Python exception a method raises as
/// Python's would (KeyError, IndexError, queue.Empty ...) reaches the Python caller as that
/// exception; any other failure (a C++ exception, a refused pickle) as a RemoteError whose text
/// names it. Differences from Python's server: a lock held by a client that disconnects is
/// released; over a Unix socket (where the kernel tells the peer's pid), the references a
/// client process took and never dropped (it was killed) are dropped when it is seen to end
/// (over TCP they stay, as in Python); no iterator proxies (`iter(d)`; use `list(d.keys())`), no slices, and
/// `list.sort(key=...)` is refused. Types registered with register_type() are for mp clients only.
/// PyManagerClient (below) is the other direction: C++ calling a Python manager server.
///
/// Nesting. A proxy is a value like any other: a dict or list may hold proxies to other managed
/// objects (`m.dict<std::string, mp::ListProxy<int>>()`, Python 3.6+'s nested proxies). The
/// server decodes a stored proxy as any process does, taking a reference of its own, so the
/// referent lives while it is stored; a proxy read back works in whichever process reads it. One
/// taken out (pop, popitem) keeps its referent: the server keeps its copy until the caller has
/// taken a reference of its own. A proxy in flight otherwise (put in a Queue, sent over a Pipe)
/// holds no reference: keep the sender's copy until the receiver has its own.
///
/// Lifetime. An object lives in the server while a proxy to it exists in the process that
/// created it or in a process that decoded one (a proxy passed through mp::Codec takes a
/// reference of its own); proxies copied into a fork child use the parent's reference, so keep
/// the parent's proxy (or the Process) alive while the child runs, as in Python. Destroying an
/// mp::Manager (or BaseManager that started a server) shuts the server down and joins it.

#include <atomic>
#include <chrono>
#include <concepts>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <initializer_list>
#include <map>
#include <memory>
#include <optional>
#include <ranges>
#include <string>
#include <string_view>
#include <tuple>
#include <type_traits>
#include <typeinfo>
#include <unordered_map>
#include <utility>
#include <vector>

#include <sys/types.h>

#include "mp/connection.hpp"
#include "mp/detail/manager_protocol.hpp"
#include "mp/detail/manager_servants.hpp"
#include "mp/detail/task.hpp"
#include "mp/errors.hpp"
#include "mp/pool.hpp"
#include "mp/py.hpp"
#include "mp/serialize.hpp"
#include "mp/shareable_list.hpp"

namespace mp {

/// A method a registered type exposes: a name and a member function pointer (const or not), or a
/// callable taking the object first. Arguments and results need mp::Codecs.
template <class T>
struct Exposed {
    template <class M>
    Exposed(std::string n, M m) : name(std::move(n)), fn(detail::managers::make_method<T>(m)) {}
    std::string name;
    detail::managers::Method fn;
};

/// A proxy for any object in a manager: call(name, args...) runs the method on the server.
class BaseProxy {
public:
    BaseProxy() = default;
    /// Calls `method` with `args` on the server and decodes its result as R (void: none).
    template <class R = void, class... A>
    R call(std::string_view method, const A&... args) const {
        const detail::managers::ProxyState& s = state();
        Encoder e;
        detail::managers::begin_request(e, detail::managers::Op::call, s.id, method);
        (e.put(args), ...);
        std::string reply = detail::managers::request(s.address, s.authkey, e.bytes());
        if constexpr (!std::is_void_v<R>) {
            Decoder d(reply);
            R r = d.get<R>();
            d.finish();
            return r;
        }
    }
    /// The object's id in the server.
    std::uint64_t id() const { return state().id; }
    /// The type name it was created with.
    const std::string& type_id() const { return state().type_id; }
    /// The server's address.
    const Address& address() const { return state().address; }
    explicit operator bool() const noexcept { return state_ != nullptr; }

    /// Internal: wraps a state (used by the managers and the Codec).
    explicit BaseProxy(std::shared_ptr<detail::managers::ProxyState> s) : state_(std::move(s)) {}
    const std::shared_ptr<detail::managers::ProxyState>& shared_state() const { return state_; }

private:
    const detail::managers::ProxyState& state() const {
        return detail::deref_handle(state_, "mp proxy");
    }
    std::shared_ptr<detail::managers::ProxyState> state_;
};

/// A proxy travels to another process as its server address, authkey, type and id; the
/// receiver takes a server reference of its own and opens its own connection.
template <class P>
    requires std::derived_from<P, BaseProxy>
struct Codec<P> {
    static constexpr bool shares_state = true;  // a copy refers to the same object
    static void encode(Encoder& e, const P& p) {
        const auto& s = p.shared_state();
        if (!s) detail::throw_empty_handle("mp proxy (sent to another process)");
        detail::managers::t_proxy_encoded = true;
        detail::managers::encode_address(e, s->address);
        e.put(s->authkey);
        e.put(s->type_id);
        e.put(s->id);
    }
    static P decode(Decoder& d) {
        Address a = detail::managers::decode_address(d);
        std::string key = d.get<std::string>();
        std::string type = d.get<std::string>();
        auto id = d.get<std::uint64_t>();
        return P(detail::managers::adopt(std::move(a), std::move(key), std::move(type), id, true));
    }
};

// ---- the built-in proxies ----------------------------------------------------------------------

/// Timeouts travel as nanoseconds (saturated by detail::Timeout before they leave); std::nullopt
/// waits without limit.
using OptTimeout = std::optional<std::chrono::nanoseconds>;

/// dict<K, V>: Python's DictProxy. Keeps insertion order, as Python's dict: keys(), values(),
/// items() and popitem() follow it. A missing key (get, pop, popitem on an empty dict) throws
/// std::out_of_range (Python's KeyError).
template <class K, class V>
class DictProxy : public BaseProxy {
public:
    using BaseProxy::BaseProxy;
    void set(const K& k, const V& v) const { call("set", k, v); }
    V get(const K& k) const { return call<V>("get", k); }
    /// The value, or `fallback` when the key is missing (Python's d.get(k, default)).
    V get(const K& k, const V& fallback) const { return call<V>("get_or", k, fallback); }
    bool contains(const K& k) const { return call<bool>("contains", k); }
    std::size_t size() const { return call<std::uint64_t>("size"); }
    std::vector<K> keys() const { return call<std::vector<K>>("keys"); }
    std::vector<V> values() const { return call<std::vector<V>>("values"); }
    std::vector<std::pair<K, V>> items() const { return call<std::vector<std::pair<K, V>>>("items"); }
    /// Removes the key; returns its value (std::out_of_range when missing).
    V pop(const K& k) const { return call<V>("pop", k); }
    /// Removes the key and returns its value, or returns `fallback` when it is missing.
    V pop(const K& k, const V& fallback) const { return call<V>("pop_or", k, fallback); }
    /// Removes and returns the pair inserted last (std::out_of_range when the dict is empty).
    std::pair<K, V> popitem() const { return call<std::pair<K, V>>("popitem"); }
    /// Removes the key if present; returns whether it was.
    bool erase(const K& k) const { return call<bool>("erase", k); }
    /// The key's value; when it is missing, first sets it to `v` (Python's default is None: here V{}).
    V setdefault(const K& k, const V& v = V{}) const { return call<V>("setdefault", k, v); }
    /// Sets each pair of `pairs` (a map, another dict's items(), a vector of pairs ...) in its
    /// order; a key given twice ends with its last value. One call: atomic for other clients.
    template <std::ranges::input_range Rg>
        requires std::convertible_to<std::ranges::range_reference_t<Rg>, std::pair<K, V>>
    void update(const Rg& pairs) const {
        std::vector<std::pair<K, V>> v;
        for (auto&& kv : pairs) v.emplace_back(kv);
        call("update", v);
    }
    void update(std::initializer_list<std::pair<K, V>> pairs) const {
        call("update", std::vector<std::pair<K, V>>(pairs));
    }
    /// Copies another managed dict's items in (its items() then one update: two calls).
    void update(const DictProxy& other) const { call("update", other.items()); }
    void clear() const { call("clear"); }
    /// A copy of the whole dict.
    std::map<K, V> copy() const { return call<std::map<K, V>>("copy"); }
};

/// list<T>: Python's ListProxy. An index out of range throws std::out_of_range; negative indexes
/// count from the end.
template <class T>
class ListProxy : public BaseProxy {
public:
    using BaseProxy::BaseProxy;
    void append(const T& v) const { call("append", v); }
    void extend(const std::vector<T>& v) const { call("extend", v); }
    T get(std::int64_t i) const { return call<T>("get", i); }
    void set(std::int64_t i, const T& v) const { call("set", i, v); }
    void insert(std::int64_t i, const T& v) const { call("insert", i, v); }
    T pop(std::int64_t i = -1) const { return call<T>("pop", i); }
    /// Removes the first element equal to v (std::invalid_argument when none).
    void remove(const T& v) const { call("remove", v); }
    std::size_t index(const T& v) const { return call<std::uint64_t>("index", v); }
    std::size_t count(const T& v) const { return call<std::uint64_t>("count", v); }
    std::size_t size() const { return call<std::uint64_t>("size"); }
    void clear() const { call("clear"); }
    void reverse() const { call("reverse"); }
    void sort() const { call("sort"); }
    std::vector<T> to_vector() const { return call<std::vector<T>>("copy"); }
};

/// Namespace: named attributes of any encodable type (get<T> of the wrong type is DecodeError;
/// of a missing name std::out_of_range).
class NamespaceProxy : public BaseProxy {
public:
    using BaseProxy::BaseProxy;
    template <class T>
    void set(const std::string& name, const T& v) const {
        Encoder e;
        e.put(v);
        call("set", name, e.bytes());
    }
    template <class T>
    T get(const std::string& name) const {
        std::string b = call<std::string>("get", name);
        Decoder d(b);
        T r = d.get<T>();
        d.finish();
        return r;
    }
    bool contains(const std::string& name) const { return call<bool>("contains", name); }
    void erase(const std::string& name) const { call("erase", name); }
    std::vector<std::string> names() const { return call<std::vector<std::string>>("names"); }
};

/// Queue<T> (maxsize 0: unbounded): mp::Empty / mp::Full as the local queues.
template <class T>
class QueueProxy : public BaseProxy {
public:
    using BaseProxy::BaseProxy;
    /// Blocks while a bounded queue is full (mp::Full after `timeout`).
    void put(const T& v, detail::Timeout timeout = std::nullopt) const {
        call("put", encode(v), true, OptTimeout(timeout));
    }
    void put_nowait(const T& v) const { call("put", encode(v), false, OptTimeout{}); }
    /// Blocks until an item arrives (mp::Empty after `timeout`).
    T get(detail::Timeout timeout = std::nullopt) const { return decode(call<std::string>("get", true, OptTimeout(timeout))); }
    T get_nowait() const { return decode(call<std::string>("get", false, OptTimeout{})); }
    std::size_t qsize() const { return call<std::uint64_t>("qsize"); }
    bool empty() const { return qsize() == 0; }
    bool full() const { return call<bool>("full"); }

private:
    // The server keeps items as bytes, so one queue servant serves every T.
    static std::string encode(const T& v) {
        Encoder e;
        e.put(v);
        return std::move(e.bytes());
    }
    static T decode(const std::string& b) {
        Decoder d(b);
        T r = d.get<T>();
        d.finish();
        return r;
    }
};

/// JoinableQueue<T>: a Queue with task_done() and join().
template <class T>
class JoinableQueueProxy : public QueueProxy<T> {
public:
    using QueueProxy<T>::QueueProxy;
    /// std::invalid_argument when called more times than items were put (Python's ValueError).
    void task_done() const { this->call("task_done"); }
    void join() const { this->call("join"); }
};

/// What the proxies of lock-like objects share (Lock, RLock, Semaphore, Condition's lock):
/// acquire and release, and the standard names, so std::lock_guard and std::unique_lock work.
class AcquirableProxy : public BaseProxy {
public:
    using BaseProxy::BaseProxy;
    /// Returns false when `timeout` passed first; blocking=false just tries.
    bool acquire(bool blocking = true, detail::Timeout timeout = std::nullopt) const {
        return call<bool>("acquire", blocking, OptTimeout(timeout));
    }
    /// Throws what the server's object raised: a std::runtime_error (remote) when a lock is not
    /// held by the caller, std::invalid_argument past a bounded semaphore's value.
    void release() const { call("release"); }
    void lock() const { (void)acquire(); }
    /// True when it acquired.
    [[nodiscard]] bool try_lock() const { return acquire(false); }
    void unlock() const { release(); }
};

/// Lock / RLock: owned by the calling thread's connection (as Python's, whose server thread per
/// connection owns it). A lock whose owner disconnects (a killed process) is released: on a Unix
/// socket as soon as the process ends, though a fork child of it keeps copies of its
/// connections; over TCP once its connection closes. A thread
/// that ends while its process goes on says so first: a plain Lock it holds then stays held, as
/// Python's, for another thread to release; an RLock (or a Condition's lock) is released, as no
/// other thread could release it.
class LockProxy : public AcquirableProxy {
public:
    using AcquirableProxy::AcquirableProxy;
};
using RLockProxy = LockProxy;

/// Semaphore / BoundedSemaphore (releasing a bounded one past its value: std::invalid_argument).
class SemaphoreProxy : public AcquirableProxy {
public:
    using AcquirableProxy::AcquirableProxy;
    int get_value() const { return call<int>("get_value"); }
};

class EventProxy : public BaseProxy {
public:
    using BaseProxy::BaseProxy;
    void set() const { call("set"); }
    void clear() const { call("clear"); }
    bool is_set() const { return call<bool>("is_set"); }
    /// True when the event is set (at once or within `timeout`).
    bool wait(detail::Timeout timeout = std::nullopt) const { return call<bool>("wait", OptTimeout(timeout)); }
};

/// Condition with its own (reentrant) lock, owned like an RLock.
class ConditionProxy : public AcquirableProxy {
public:
    using AcquirableProxy::AcquirableProxy;
    /// Releases the lock, waits for a notify (or the timeout), takes the lock back; false on
    /// timeout. The caller must hold the lock.
    bool wait(detail::Timeout timeout = std::nullopt) const { return call<bool>("wait", OptTimeout(timeout)); }
    void notify(int n = 1) const { call("notify", n); }
    void notify_all() const { call("notify_all"); }
};

/// Barrier(parties): wait() returns 0..parties-1; mp::BrokenBarrierError when broken, aborted or
/// timed out.
class BarrierProxy : public BaseProxy {
public:
    using BaseProxy::BaseProxy;
    int wait(detail::Timeout timeout = std::nullopt) const { return call<int>("wait", OptTimeout(timeout)); }
    void abort() const { call("abort"); }
    void reset() const { call("reset"); }
    int parties() const { return call<int>("parties"); }
    int n_waiting() const { return call<int>("n_waiting"); }
    bool broken() const { return call<bool>("broken"); }
};

/// Value<T>: get/set, and for arithmetic T an atomic fetch_add (returns the old value).
template <class T>
class ValueProxy : public BaseProxy {
public:
    using BaseProxy::BaseProxy;
    T get() const { return call<T>("get"); }
    void set(const T& v) const { call("set", v); }
    T fetch_add(const T& delta) const
        requires std::is_arithmetic_v<T>
    {
        return call<T>("fetch_add", delta);
    }
};

/// Array<T> of a fixed size.
template <class T>
class ArrayProxy : public BaseProxy {
public:
    using BaseProxy::BaseProxy;
    T get(std::int64_t i) const { return call<T>("get", i); }
    void set(std::int64_t i, const T& v) const { call("set", i, v); }
    std::size_t size() const { return call<std::uint64_t>("size"); }
    std::vector<T> to_vector() const { return call<std::vector<T>>("copy"); }
};

// ---- a Pool in the manager ---------------------------------------------------------------------

namespace detail::managers {
/// A call (or chunk of calls) for a managed Pool: the encoded task and its item count (0: one call).
using PoolJob = std::pair<std::string, std::uint64_t>;

/// Collects what submit_chunks builds, to send in one request.
struct PoolJobCollector {
    std::vector<PoolJob> jobs;
    std::shared_ptr<FutureCore> submit(Task task, JobOptions options) {
        if (!task.fds.empty()) throw Error("mp: work for a managed Pool cannot carry descriptors");
        jobs.emplace_back(std::move(task.bytes), options.items);
        return nullptr;
    }
};

/// A managed Pool's results of one call: they wait in the server under `id` until the last
/// handle in the process that made the call goes.
struct PoolTicket {
    BaseProxy pool;
    std::uint64_t id = 0;
    std::vector<std::size_t> sizes{};  // a map's chunk sizes; empty for a single call
    pid_t owner = 0;
    PoolTicket(BaseProxy p, std::uint64_t i, std::vector<std::size_t> s);
    PoolTicket(const PoolTicket&) = delete;
    PoolTicket& operator=(const PoolTicket&) = delete;
    ~PoolTicket();
};

template <class T>
T decode_single(const std::vector<std::string>& parts, const std::vector<std::size_t>&) {
    if (parts.size() != 1) throw DecodeError("mp: a managed Pool's reply has the wrong shape");
    return decode_value<T>(parts[0]);
}
template <class R>
std::vector<R> decode_chunks(const std::vector<std::string>& parts, const std::vector<std::size_t>& sizes) {
    if (parts.size() != sizes.size()) throw DecodeError("mp: a managed Pool's reply has the wrong shape");
    std::vector<R> out;
    for (std::size_t c = 0; c < parts.size(); ++c)
        for (const ChunkItem& it : split_chunk(parts[c], sizes[c])) {
            if (!it.ok) throw_item_error(it);
            out.push_back(decode_item<R>(it.bytes));
        }
    return out;
}

/// A callback run by the manager's process (as Python's, which pickles it to the server): the
/// server appends the call's outcome to the prefix the client built, as the last argument of a
/// call, and runs it. On success that is the results of every job and their item counts, decoded
/// here into the T the callback takes (a map's: the std::vector of its items); on failure the
/// exception's ErrorInfo, rebuilt as the local Pool's would be.
template <class Fn, class T, bool Chunked, bool Failed>
void invoke_pool_callback(Decoder& in, Encoder&) {
    Fn f = read_callable<Fn>(in);
    if constexpr (Failed) {
        ErrorInfo info = decode_error_info(in);
        in.finish();
        f(make_remote_exception(info));
    } else {
        auto parts = in.get<std::vector<std::string>>();
        auto counts = in.get<std::vector<std::uint64_t>>();
        in.finish();
        if constexpr (Chunked) {
            const T v = decode_chunks<typename T::value_type>(parts, {counts.begin(), counts.end()});
            f(v);
        } else {
            if (parts.size() != 1) throw DecodeError("mp: a managed Pool's reply has the wrong shape");
            const T v = decode_item<T>(parts[0]);
            f(v);
        }
    }
}
template <class Fn, class T, bool Chunked, bool Failed>
inline const bool pool_callback_registered = register_invoker(&invoke_pool_callback<Fn, T, Chunked, Failed>);

/// The encoded callable a managed Pool runs with a call's outcome (`T` on success, an
/// std::exception_ptr on failure); empty for no callback (nullptr).
template <class T, bool Chunked, bool Failed, class CB>
std::string pool_callback(const CB& cb) {
    using Fn = std::decay_t<CB>;
    using Arg = std::conditional_t<Failed, std::exception_ptr, T>;
    if constexpr (std::is_null_pointer_v<Fn>) {
        return {};
    } else if constexpr (!Transferable<Fn>) {
        static_assert(Transferable<Fn>,
                      "mp: a managed Pool runs its callbacks in the manager's process (as Python's, "
                      "which pickles them): pass a plain function or a captureless lambda");
        return {};
    } else if constexpr (!std::is_invocable_v<Fn&, const Arg&>) {
        static_assert(std::is_invocable_v<Fn&, const Arg&>,
                      "mp: a managed Pool's callback takes the result (const T&; std::monostate "
                      "for void; a std::vector of them for a map), its error_callback an "
                      "std::exception_ptr");
        return {};
    } else {
        (void)pool_callback_registered<Fn, T, Chunked, Failed>;
        Encoder e;
        CodeRef r = code_ref(reinterpret_cast<std::uintptr_t>(&invoke_pool_callback<Fn, T, Chunked, Failed>));
        e.put(r.module);
        e.put(r.offset);
        if constexpr (FunctionPointer<Fn>) {
            Fn fp = cb;
            if (fp == nullptr) return {};
            CodeRef fr = code_ref(reinterpret_cast<std::uintptr_t>(fp));
            e.put(fr.module);
            e.put(fr.offset);
        }
        return e.take();
    }
}

/// One finished chunk of a managed imap: its index, whether it ran (else `bytes` is the
/// ErrorInfo of what failed it as a whole), and its items' outcomes; when its worker died, that
/// worker's pid and status (a channel older than ErrorInfo's own WorkerDied form; the client
/// raises mp::WorkerDied from it).
using Died = std::optional<std::pair<std::int32_t, std::int32_t>>;
using IMapChunk = std::tuple<std::uint64_t, bool, std::string, Died>;
/// What get() returns: each job's results, or the death of the worker that failed the call.
using PoolResults = std::pair<std::vector<std::string>, Died>;
}  // namespace detail::managers

/// The result of a managed Pool's apply_async, map_async or starmap_async (Python's
/// AsyncResult proxy): get, wait, ready and successful as mp::AsyncResult's, each a call to the
/// manager.
template <class T>
class AsyncResultProxy {
public:
    /// How the results' bytes (one part per job) become a T.
    using Decode = T (*)(const std::vector<std::string>& parts, const std::vector<std::size_t>& sizes);
    AsyncResultProxy(std::shared_ptr<detail::managers::PoolTicket> t, Decode decode)
        : t_(std::move(t)), decode_(decode) {}
    /// Waits for and returns the value; throws what the work threw (as a local Pool would:
    /// mp::WorkerDied, a standard or mp exception type, else mp::RemoteError), or TimeoutError
    /// when `timeout` passes first (the work goes on).
    T get(detail::Timeout timeout = std::nullopt) const {
        const auto& t = ticket();
        auto [parts, died] = t.pool.template call<detail::managers::PoolResults>("get", t.id, OptTimeout(timeout));
        if (died) throw WorkerDied(died->first, died->second);
        return decode_(parts, t.sizes);
    }
    /// Waits until ready (with callbacks: until they returned, as Python's); false when
    /// `timeout` passed first.
    bool wait(detail::Timeout timeout = std::nullopt) const {
        return ticket().pool.template call<bool>("wait", ticket().id, OptTimeout(timeout));
    }
    bool ready() const { return ticket().pool.template call<bool>("ready", ticket().id); }
    /// Whether the call completed without raising; mp::Error (remote) when not ready.
    bool successful() const { return ticket().pool.template call<bool>("successful", ticket().id); }

private:
    const detail::managers::PoolTicket& ticket() const {
        return detail::deref_handle(t_, "mp::AsyncResultProxy");
    }
    std::shared_ptr<detail::managers::PoolTicket> t_;
    Decode decode_;
};

/// The results of a managed Pool's imap or imap_unordered (Python's IteratorProxy over the
/// server's IMapIterator), read as mp::Pool's imap results are: next(timeout), or a range-for.
/// Each chunk is one call to the manager. It keeps the pool alive in the server, so it may
/// outlive every PoolProxy to it (it then reads on; the pool goes with the last of them). A
/// manager that dies while it is read makes next() throw mp::EOFError (or std::system_error
/// "connect" when this thread had no connection to it yet), never hang. Not to be moved while a
/// range-for runs over it.
template <class R>
class IMapResultsProxy {
public:
    IMapResultsProxy(std::shared_ptr<detail::managers::PoolTicket> t, std::exception_ptr input_error)
        : t_(std::move(t)), input_error_(std::move(input_error)) {}

    /// The next result: in input order (imap) or as chunks finish (imap_unordered). Throws the
    /// item's exception (a chunk that failed as a whole, its worker killed say, raises for each
    /// of its items), or TimeoutError when `timeout` passes first (the result stays next). What
    /// the input threw comes once, after the results of the items read before it; then
    /// std::nullopt, as after the last.
    std::optional<R> next(detail::Timeout timeout = std::nullopt) {
        const auto& t = detail::deref_handle(t_, "mp::IMapResultsProxy");
        for (;;) {
            if (remaining_failed_ != 0) {
                --remaining_failed_;
                std::rethrow_exception(failed_);
            }
            if (pos_ < items_.size()) {
                const detail::ChunkItem& it = items_[pos_++];
                if (!it.ok) detail::throw_item_error(it);
                return detail::decode_item<R>(it.bytes);
            }
            if (taken_ == t.sizes.size()) {
                if (auto e = std::exchange(input_error_, nullptr)) std::rethrow_exception(e);
                return std::nullopt;
            }
            auto chunk = t.pool.template call<std::optional<detail::managers::IMapChunk>>(
                "imap_next", t.id, OptTimeout(timeout));
            if (!chunk) throw TimeoutError("imap: no result in time");
            auto& [index, ran, bytes, died] = *chunk;
            if (index >= t.sizes.size()) throw DecodeError("mp: a managed imap's reply has the wrong shape");
            ++taken_;
            pos_ = 0;
            items_.clear();
            chunk_ = std::make_shared<const std::string>(std::move(bytes));
            if (!ran) {
                Decoder d(*chunk_);
                failed_ = died ? std::make_exception_ptr(WorkerDied(died->first, died->second))
                               : detail::make_remote_exception(detail::decode_error_info(d));
                remaining_failed_ = t.sizes[index];
                continue;
            }
            items_ = detail::split_chunk(*chunk_, t.sizes[index]);  // views into chunk_
        }
    }

    using iterator = detail::PullIterator<IMapResultsProxy, R>;
    iterator begin() { return iterator(this); }
    std::default_sentinel_t end() const noexcept { return {}; }

private:
    friend iterator;
    R* pull() {
        current_ = next();
        return current_ ? &*current_ : nullptr;
    }
    std::shared_ptr<detail::managers::PoolTicket> t_;
    std::exception_ptr input_error_;
    std::optional<R> current_;  // what the iterator points at
    std::size_t taken_ = 0;     // chunks fetched
    std::shared_ptr<const std::string> chunk_;
    std::vector<detail::ChunkItem> items_;
    std::size_t pos_ = 0;
    std::exception_ptr failed_;
    std::size_t remaining_failed_ = 0;
};

/// A Pool that lives in the manager's process (Python's SyncManager.Pool): its workers are the
/// server's children, so the Pool outlives the process that made it while a proxy to it lives
/// anywhere. Work is as for mp::Pool: transferable callables, arguments and results with codecs
/// (no descriptors). Each call is a request to the manager; the results stay in the server until
/// fetched. Dropping the last proxy (and the last result or imap of it) terminates the pool (as
/// destroying an mp::Pool that runs).
///
/// Callbacks run where Python's do: in the manager's process (Python pickles them to the
/// server, so a lambda is refused there), in the pool's result thread. So they must be
/// transferable (a plain function or captureless lambda); what they change is the server's, and
/// a result is ready only once its callback returned.
///
/// imap and imap_unordered read their whole input when called (Python's proxy pickles it
/// whole), so it must be finite; the results are lazy, a chunk per call to the manager.
class PoolProxy : public BaseProxy {
public:
    using BaseProxy::BaseProxy;

    /// fn(args...) in a worker of the managed pool; waits for the result.
    template <class F, class... A>
    detail::call_result_t<F, A...> apply(const F& fn, const A&... args) const {
        return apply_async(fn, args...).get();
    }
    /// fn(args...) in a worker, without waiting.
    template <class F, class... A, class R = detail::call_result_t<F, A...>>
        requires(!(sizeof...(A) == 1 && (detail::is_args<A> && ...)))
    AsyncResultProxy<R> apply_async(const F& fn, const A&... args) const {
        return apply_async(fn, mp::Args<A...>{std::tuple<A...>(args...)}, nullptr, nullptr);
    }
    /// With callbacks, as mp::Pool's: apply_async(f, mp::args(1, 2), on_ok, on_err), where
    /// on_ok(const R&) (std::monostate for void) or on_err(std::exception_ptr) runs in the
    /// manager's process; either may be nullptr.
    template <class F, class... A, class CB, class ECB = std::nullptr_t, class R = detail::call_result_t<F, A...>>
    AsyncResultProxy<R> apply_async(const F& fn, const mp::Args<A...>& a, const CB& callback,
                                    const ECB& error_callback = nullptr) const {
        detail::check_work<F, A...>();
        detail::managers::PoolJobCollector c;
        c.submit(std::apply([&](const A&... v) { return *detail::make_task(fn, v...); }, a.values), {});
        return AsyncResultProxy<R>(send(c, {}, detail::managers::pool_callback<detail::item_t<R>, false, false>(callback),
                                        detail::managers::pool_callback<detail::item_t<R>, false, true>(error_callback)),
                                   &detail::managers::decode_single<R>);
    }
    /// fn over `range`, results in order; blocks. chunksize 0: Python's default.
    template <class F, class Rg>
    auto map(const F& fn, Rg&& range, std::size_t chunksize = 0) const {
        return map_async(fn, std::forward<Rg>(range), chunksize).get();
    }
    /// callback(const std::vector<R>&) or error_callback(std::exception_ptr) runs in the
    /// manager's process (see the class comment).
    template <class F, class Rg, class CB = std::nullptr_t, class ECB = std::nullptr_t,
              class V = std::ranges::range_value_t<Rg>, class R = detail::item_t<detail::call_result_t<F, V>>>
    AsyncResultProxy<std::vector<R>> map_async(const F& fn, Rg&& range, std::size_t chunksize = 0,
                                               const CB& callback = nullptr,
                                               const ECB& error_callback = nullptr) const {
        detail::check_work<F, V>();
        if (chunksize == 0) chunksize = detail::default_chunksize(detail::range_count(range), processes());
        detail::managers::PoolJobCollector c;
        auto set = detail::submit_chunks<F, V>(c, fn, chunksize, std::nullopt, detail::zip_rows(range));
        return chunks<R>(c, std::move(set.sizes), callback, error_callback);
    }
    /// fn(a, b, ...) for each tuple (or pair) of `range`, results in order; blocks.
    template <class F, class Rg>
    auto starmap(const F& fn, Rg&& range, std::size_t chunksize = 0) const {
        return starmap_async(fn, std::forward<Rg>(range), chunksize).get();
    }
    template <class F, class Rg, class CB = std::nullptr_t, class ECB = std::nullptr_t,
              class Tup = std::ranges::range_value_t<Rg>>
    auto starmap_async(const F& fn, Rg&& range, std::size_t chunksize = 0, const CB& callback = nullptr,
                       const ECB& error_callback = nullptr) const {
        return star<F, Tup>(fn, range, chunksize, callback, error_callback,
                            std::make_index_sequence<std::tuple_size_v<Tup>>{});
    }
    /// Lazy results in input order; chunksize 0 means 1, as Python's imap. The input is read
    /// whole now (see the class comment); what it throws comes from next() after the results of
    /// the items before it (the items of its unfinished chunk are dropped), as mp::Pool's.
    template <class F, class Rg, class V = std::ranges::range_value_t<Rg>,
              class R = detail::item_t<detail::call_result_t<F, V>>>
    IMapResultsProxy<R> imap(const F& fn, Rg&& range, std::size_t chunksize = 0) const {
        return lazy<F, V, R>(fn, range, chunksize, true);
    }
    /// Lazy results as they finish (whole chunks keep their inner order); the input as imap's.
    template <class F, class Rg, class V = std::ranges::range_value_t<Rg>,
              class R = detail::item_t<detail::call_result_t<F, V>>>
    IMapResultsProxy<R> imap_unordered(const F& fn, Rg&& range, std::size_t chunksize = 0) const {
        return lazy<F, V, R>(fn, range, chunksize, false);
    }
    /// No more work; the workers exit once the submitted work is done.
    void close() const { call("close"); }
    /// Kills the workers now; unfinished work fails with BrokenProcessPool.
    void terminate() const { call("terminate"); }
    /// Waits for the workers to exit (mp::Error unless close() or terminate() came first).
    void join() const { call("join"); }
    int processes() const { return call<int>("processes"); }

private:
    std::shared_ptr<detail::managers::PoolTicket> send(const detail::managers::PoolJobCollector& c,
                                                       std::vector<std::size_t> sizes, std::string callback = {},
                                                       std::string error_callback = {}) const {
        auto id = call<std::uint64_t>("submit", c.jobs, OptTimeout{}, callback, error_callback);
        return std::make_shared<detail::managers::PoolTicket>(*this, id, std::move(sizes));
    }
    template <class R, class CB, class ECB>
    AsyncResultProxy<std::vector<R>> chunks(const detail::managers::PoolJobCollector& c, std::vector<std::size_t> sizes,
                                            const CB& callback, const ECB& error_callback) const {
        return AsyncResultProxy<std::vector<R>>(
            send(c, std::move(sizes), detail::managers::pool_callback<std::vector<R>, true, false>(callback),
                 detail::managers::pool_callback<std::vector<R>, true, true>(error_callback)),
            &detail::managers::decode_chunks<R>);
    }
    template <class F, class Tup, class Rg, class CB, class ECB, std::size_t... I>
    auto star(const F& fn, Rg& range, std::size_t chunksize, const CB& callback, const ECB& error_callback,
              std::index_sequence<I...>) const {
        using R = detail::item_t<detail::star_result_t<F, Tup>>;
        detail::check_work<F, std::tuple_element_t<I, Tup>...>();
        if (chunksize == 0) chunksize = detail::default_chunksize(detail::range_count(range), processes());
        detail::managers::PoolJobCollector c;
        auto set = detail::submit_chunks<F, std::tuple_element_t<I, Tup>...>(c, fn, chunksize, std::nullopt,
                                                                            detail::star_rows(range));
        return chunks<R>(c, std::move(set.sizes), callback, error_callback);
    }
    template <class F, class V, class R, class Rg>
    IMapResultsProxy<R> lazy(const F& fn, Rg& range, std::size_t chunksize, bool ordered) const {
        detail::check_work<F, V>();
        detail::managers::PoolJobCollector c;
        std::exception_ptr input_error;
        try {
            (void)detail::submit_chunks<F, V>(c, fn, chunksize == 0 ? 1 : chunksize, std::nullopt,
                                              detail::zip_rows(range));
        } catch (...) {
            // The chunks read before it still run: the error comes after their results.
            input_error = std::current_exception();
        }
        std::vector<std::size_t> sizes;
        for (const auto& job : c.jobs) sizes.push_back(job.second);
        auto id = call<std::uint64_t>("imap", c.jobs, ordered);
        return IMapResultsProxy<R>(std::make_shared<detail::managers::PoolTicket>(*this, id, std::move(sizes)),
                                   std::move(input_error));
    }
};

// ---- BaseManager -------------------------------------------------------------------------------

namespace detail::managers {
struct ServerHandle;
}

/// Python's BaseManager: a server of registered types at an address with an authkey.
///
/// Destructor policy: a manager that start()ed a server shuts it down (a shutdown request, then
/// SIGKILL after 5 s) and joins it; one that only connect()ed does nothing to the server.
///
/// Hostile peers: the server authenticates a connection before it gives it a thread, and runs
/// the handshakes of every pending peer at once in its accept loop (see mp::Listener::accept;
/// at most 128 pending, 5 s each), so peers that connect and stall cost no thread and delay no
/// honest client. A message is at most max_message bytes: a larger request throws mp::Error in
/// the client before anything is sent, a larger reply comes back as mp::RemoteError, and a
/// peer whose frame announces more is disconnected. Memory for a long message grows as its
/// bytes arrive, so a frame header alone reserves nothing large. Out of descriptors, the server
/// backs off from accepting (up to 1 s at a time) and keeps serving its connected clients; when
/// no thread can be started for an authenticated client, that connection is closed and the
/// server stays up.
class BaseManager {
public:
    /// The longest request or reply, in bytes (1 GiB).
    static constexpr std::size_t max_message = std::size_t{1} << 30;

    /// A Unix socket in a fresh temporary directory and a random authkey.
    BaseManager();
    /// `address` (TCP port 0: any free port; address() tells which after start) and `authkey`
    /// (required for TCP: std::invalid_argument when empty).
    BaseManager(Address address, std::string authkey);
    BaseManager(const BaseManager&) = delete;
    BaseManager& operator=(const BaseManager&) = delete;
    virtual ~BaseManager();

    /// Registers a type the server can create: `type_id` names it, `CtorArgs` are what
    /// create(type_id, args...) passes to its constructor, `methods` are exposed (others are a
    /// RemoteError). Register the same types on the server's and the clients' managers, before
    /// start() or serve_forever().
    template <class T, class... CtorArgs>
    void register_type(const std::string& type_id, std::initializer_list<Exposed<T>> methods) {
        detail::managers::TypeEntry entry;
        entry.make = [](Decoder& in) -> std::shared_ptr<void> {
            std::tuple<std::decay_t<CtorArgs>...> args{in.get<std::decay_t<CtorArgs>>()...};
            in.finish();
            return std::apply([](auto&... a) { return std::make_shared<T>(a...); }, args);
        };
        for (const Exposed<T>& m : methods) entry.methods[m.name] = m.fn;
        types_[type_id] = std::move(entry);
    }

    /// Makes `type_id` name one object of the Python type `python_type` ("dict", "list",
    /// "Namespace", "Queue", "JoinableQueue", "Lock", "RLock", "Event"), made on first use and
    /// returned by every create(type_id) from a Python client: Python's
    /// `register(type_id, callable=lambda: obj)`. Python clients then
    /// `register(type_id)` and call `manager.type_id()`; PyManagerClient::create(type_id) gets the
    /// same object from C++. Before start() or serve_forever().
    void register_shared(const std::string& type_id, const std::string& python_type) {
        python_shared_.emplace_back(type_id, python_type);
    }

    /// Forks a server process listening at address() (bound before the fork, so it is ready
    /// when start returns). ProcessError when already started or connected.
    void start() { start_with(std::nullopt); }
    /// Python's start(initializer, initargs): the server process calls initializer(args...)
    /// before it serves, so start() returns after it. The initializer must be transferable
    /// (a plain function or captureless lambda, arguments with codecs, proxies included), as a
    /// Pool's. One that throws is ProcessError naming its error; no server is left running.
    template <class F, class... A>
    void start(const F& initializer, const A&... args) {
        start_with(detail::make_transferable_task(initializer, args...));
    }
    /// Serves in this process until a client asks for shutdown(); then returns. `on_ready` is
    /// called with the bound address (the real port when 0 was asked for) once it listens.
    void serve_forever(std::function<void(const Address&)> on_ready = {});
    /// Checks that a server answers at address() with this authkey (AuthenticationError on a
    /// wrong key, std::system_error when nothing listens).
    void connect();
    /// Asks the server to stop (also one this manager only connected to, e.g. one in
    /// serve_forever elsewhere); when this manager started it, waits for it to exit (SIGKILL
    /// after 5 s). Idempotent.
    void shutdown();

    /// Creates a `type_id` object on the server with constructor arguments `args`.
    template <class... A>
    BaseProxy create(const std::string& type_id, const A&... args) {
        return BaseProxy(create_state(type_id, encode_args(args...)));
    }

    const Address& address() const noexcept { return address_; }
    const std::string& authkey() const noexcept { return authkey_; }
    /// The server process's pid when this manager started it, else 0.
    pid_t server_pid() const noexcept;

protected:
    template <class... A>
    static std::string encode_args(const A&... args) {
        Encoder e;
        (e.put(args), ...);
        return std::move(e.bytes());
    }
    std::shared_ptr<detail::managers::ProxyState> create_state(const std::string& type_id,
                                                               std::string args);
    void start_with(std::optional<detail::Task> initializer);
    template <class S, class P, class... A>
    P make_builtin(const A&... args) {
        return P(create_state(detail::managers::Builtin<S>::name(), encode_args(args...)));
    }

private:
    Address address_;
    std::string authkey_;
    detail::managers::TypeTable types_;
    std::vector<std::pair<std::string, std::string>> python_shared_;
    std::unique_ptr<detail::managers::ServerHandle> server_;
    bool connected_ = false;
};

/// Python's SyncManager / multiprocessing.Manager(): a started server with the built-in types.
class SyncManager : public BaseManager {
public:
    /// Starts the server at once (a Unix socket, a random authkey).
    SyncManager();
    /// Starts the server at once, which first calls initializer(args...) (see
    /// BaseManager::start(initializer, args...)).
    template <class F, class... A>
        requires(!std::same_as<std::decay_t<F>, Address>)
    explicit SyncManager(const F& initializer, const A&... args) : BaseManager() {
        start(initializer, args...);
    }
    /// A manager at `address` with `authkey`; call start() or connect().
    SyncManager(Address address, std::string authkey)
        : BaseManager(std::move(address), std::move(authkey)) {}

    template <class K, class V>
    DictProxy<K, V> dict() {
        return make_builtin<detail::managers::DictServant<K, V>, DictProxy<K, V>>();
    }
    /// A dict holding `initial`'s pairs, in its order.
    template <class K, class V>
    DictProxy<K, V> dict(const std::map<K, V>& initial) {
        return dict(std::vector<std::pair<K, V>>(initial.begin(), initial.end()));
    }
    template <class K, class V>
    DictProxy<K, V> dict(const std::vector<std::pair<K, V>>& initial) {
        return make_builtin<detail::managers::DictServant<K, V>, DictProxy<K, V>>(initial);
    }
    template <class K, class V>
    DictProxy<K, V> dict(std::initializer_list<std::pair<K, V>> initial) {
        return dict(std::vector<std::pair<K, V>>(initial));
    }
    template <class T>
    ListProxy<T> list(const std::vector<T>& initial = {}) {
        return make_builtin<detail::managers::ListServant<T>, ListProxy<T>>(initial);
    }
    NamespaceProxy Namespace();
    template <class T>
    QueueProxy<T> Queue(std::int64_t maxsize = 0) {
        return make_builtin<detail::managers::QueueServant<T>, QueueProxy<T>>(maxsize);
    }
    template <class T>
    JoinableQueueProxy<T> JoinableQueue(std::int64_t maxsize = 0) {
        return make_builtin<detail::managers::QueueServant<T>, JoinableQueueProxy<T>>(maxsize);
    }
    /// A Pool in the manager's process (see PoolProxy); `options` as mp::Pool's.
    PoolProxy Pool(const PoolOptions& options = {}) { return pool_with(options, std::nullopt); }
    PoolProxy Pool(int processes) { return Pool(PoolOptions{.processes = processes}); }
    /// Each of its workers calls initializer(args...) first (transferable, as mp::Pool's).
    template <class F, class... A>
    PoolProxy Pool(const PoolOptions& options, const F& initializer, const A&... args) {
        detail::Task t = detail::make_transferable_task(initializer, args...);
        if (!t.fds.empty()) throw Error("mp: a managed Pool's initializer cannot carry descriptors");
        return pool_with(options, std::move(t.bytes));
    }
    LockProxy Lock();
    RLockProxy RLock();
    SemaphoreProxy Semaphore(int value = 1);
    SemaphoreProxy BoundedSemaphore(int value = 1);
    EventProxy Event();
    ConditionProxy Condition();
    BarrierProxy Barrier(int parties);
    template <class T>
    ValueProxy<T> Value(const T& initial = T{}) {
        return make_builtin<detail::managers::ValueServant<T>, ValueProxy<T>>(initial);
    }
    template <class T>
    ArrayProxy<T> Array(const std::vector<T>& initial) {
        return make_builtin<detail::managers::ArrayServant<T>, ArrayProxy<T>>(initial);
    }
    template <class T>
    ArrayProxy<T> Array(std::size_t size) {
        return Array<T>(std::vector<T>(size));
    }

private:
    PoolProxy pool_with(const PoolOptions& options, std::optional<std::string> initializer);
};

/// multiprocessing.Manager(): a started SyncManager.
using Manager = SyncManager;

/// Python's managers.SharedMemoryManager: makes SharedMemory segments and ShareableLists in
/// this process and has its server track their names, so that shutdown() (and the destructor)
/// unlinks every one still there, whoever else attached to them. The segments are tracked by
/// the manager alone (not by this process's resource tracker): one killed with its server
/// (SIGKILL) leaves them, as Python's does. Segments made through this manager object are
/// tracked; another process that connect()s makes untracked ones.
class SharedMemoryManager : public BaseManager {
public:
    /// Starts the server at once (a Unix socket, a random authkey).
    SharedMemoryManager();
    /// A manager at `address` with `authkey`; call start() (or connect()) before making segments.
    SharedMemoryManager(Address address, std::string authkey)
        : BaseManager(std::move(address), std::move(authkey)) {}
    /// Unlinks the tracked segments, then as BaseManager's.
    ~SharedMemoryManager() override;

    /// A new segment of `size` bytes with a fresh name, unlinked at shutdown.
    mp::SharedMemory SharedMemory(std::size_t size);
    /// A new ShareableList holding `items`, its segment unlinked at shutdown.
    mp::ShareableList ShareableList(const std::vector<mp::ShareableList::Item>& items);
    /// The names of the segments it tracks, in the order they were made.
    std::vector<std::string> segments();
    /// Unlinks every tracked segment (those already unlinked are skipped), then stops the
    /// server as BaseManager::shutdown() does. Idempotent.
    void shutdown();

private:
    BaseProxy tracker();
    BaseProxy tracker_;
};

// ---- Python's manager protocol, from C++ -------------------------------------------------------

namespace detail::managers {
struct PyProxyState;
}

/// Keyword arguments of a call to a Python manager: {{"timeout", 1.5}}.
using PyKwargs = std::vector<std::pair<std::string, py::Object>>;

/// A proxy for an object in a manager that speaks Python's protocol (see PyManagerClient): the
/// methods are Python's (`__getitem__`, `append`, `get` ...), called by name with plain-data
/// arguments, as a Python proxy's _callmethod.
///
///     auto d = m.create("dict");
///     d.call("__setitem__", {"a", 1});
///     int a = d.call("__getitem__", {"a"}).as<int>();
///     q.call("get", {true}, {{"timeout", 1.0}});
///
/// Errors: an exception the method raised in the server is mp::RemoteError whose type_name() is
/// Python's class ("KeyError", "queue.Empty", "FileNotFoundError", "__main__.AppError" for a
/// class of the server program's own: read as a name, nothing imported; its attributes are not
/// kept) and message() its str() ("[Errno 2] no such thing: 'f.txt'"); a server that
/// answered with a traceback (no such method, an unreadable request) is RemoteError of type
/// "Traceback" with that text; a reply mp refuses to read (not plain data) is
/// py::UnpicklingError; a server that died is mp::EOFError. Each thread opens its own
/// connection to the server on its first call (as Python's proxies); a fork child opens a new one.
/// Copies share one server reference, dropped (decref) when the last copy in the process that
/// created the proxy goes.
class PyProxy {
public:
    PyProxy() = default;
    py::Object call(std::string_view method, std::vector<py::Object> args = {}, PyKwargs kwargs = {}) const;
    /// The object's ident in the server (a str in Python's protocol).
    const std::string& id() const;
    const std::string& type_id() const;
    /// The methods the server says the object exposes.
    const std::vector<std::string>& exposed() const;
    explicit operator bool() const noexcept { return state_ != nullptr; }

    /// Internal: made by PyManagerClient::create.
    explicit PyProxy(std::shared_ptr<detail::managers::PyProxyState> s) : state_(std::move(s)) {}

private:
    std::shared_ptr<detail::managers::PyProxyState> state_;
};

/// A client of a manager server that speaks Python's protocol: a Python
/// `multiprocessing.managers.BaseManager`/`SyncManager` server (`serve_forever()`, or started
/// with `start()` at an address C++ knows), or an mp manager (which speaks both). The typeids are
/// the server's: `create("dict")`, `create("Queue", {10})`, or a name the server registered.
///
///     mp::PyManagerClient m({"127.0.0.1", 50000}, "secret");   // Python: m.connect()
///     mp::PyProxy q = m.create("get_queue");                   // register('get_queue', ...)
///     q.call("put", {mp::py::Object::dict({{"job", 3}})});
///
/// The constructor connects and checks the key: mp::AuthenticationError for a wrong one,
/// std::system_error when nothing listens. A Python exception raised by a server function (a
/// typeid that is not registered) is mp::RemoteError with its type and message.
class PyManagerClient {
public:
    PyManagerClient(Address address, std::string authkey);
    /// Python's manager._create(typeid, *args, **kwds): a new object (or, for a typeid
    /// registered with a callable, what the callable returns) and a proxy holding a reference.
    PyProxy create(const std::string& type_id, std::vector<py::Object> args = {}, PyKwargs kwargs = {});
    /// How many objects the server holds (Python's Server.number_of_objects).
    std::int64_t number_of_objects();
    /// Asks the server to stop.
    void shutdown();
    const Address& address() const noexcept { return address_; }

private:
    Address address_;
    std::string authkey_;
};

}  // namespace mp
