// Python's manager protocol (multiprocessing/managers.py), the server's side: the objects an mp
// manager server keeps for Python clients (PythonSide). The client's side (mp::PyManagerClient,
// mp::PyProxy) is manager_python_client.cpp. One file because the servants, the replies and the
// serve loop are one server: each servant's methods raise what the reply code pickles, as
// Python's Server and its shared objects do.
//
// The protocol, as CPython's Server and BaseProxy implement it: after the authkey handshake the
// client sends one pickled request, the tuple (ident, methodname, args, kwds); a connection's
// first request (ident None) names one of the server's public functions (create, incref,
// decref, dummy, accept_connection, shutdown, number_of_objects ...), answered with
// ('#RETURN', result) and the connection closes, except after accept_connection: then each
// request calls a method of the object `ident`, until the client hangs up. Failures come back as
// ('#ERROR', exception) (the exception the method raised, pickled), ('#TRACEBACK', text) or
// ('#UNSERIALIZABLE', text). Objects are counted: create gives the first reference, incref and
// decref move it, and the object goes at zero.

#include "mp/managers.hpp"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <condition_variable>
#include <deque>
#include <functional>
#include <limits>
#include <map>
#include <mutex>
#include <optional>
#include <stdexcept>
#include <string>
#include <thread>
#include <unordered_map>
#include <unordered_set>
#include <vector>

#include <poll.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <unistd.h>

#include "manager_internal.hpp"
#include "mp/detail/future_core.hpp"
#include "py_internal.hpp"
#include "sys/pidfd.hpp"

namespace mp {

namespace detail::managers {

namespace {

using py::Kind;
using py::Object;
using Clock = std::chrono::steady_clock;

/// A Python exception for the client: sent as ('#ERROR', type(arg)), which Python raises as is.
struct PyRaise {
    std::string type;
    Object arg;
};
[[noreturn]] void raise(std::string type, Object arg) { throw PyRaise{std::move(type), std::move(arg)}; }

// ---- Python's == and hash() on py::Objects (dict keys, list.index/count/remove, `in`) ----------
// py::Object's own == is strict (1, 1.0 and True differ); a Python server's dict and list compare
// as Python does: numbers by value across bool, int and float, bytes with bytearray by content,
// set with frozenset by members, containers item by item. hash_of agrees with equal: equal
// numbers hash alike, whatever their types.

bool equal(const Object& a, const Object& b);
std::size_t hash_of(const Object& o);

struct ObjectHash {
    std::size_t operator()(const Object& o) const { return hash_of(o); }
};
struct ObjectEqual {
    bool operator()(const Object& a, const Object& b) const { return equal(a, b); }
};

std::size_t mix(std::size_t h, std::size_t v) { return h ^ (v + 0x9e3779b97f4a7c15ULL + (h << 6) + (h >> 2)); }

bool is_number(const Object& o) noexcept {
    return o.kind() == Kind::boolean || o.kind() == Kind::integer || o.kind() == Kind::floating;
}

// A whole number of at most 64 bits, one way only: `bits` holds an int64 value (big false) or a
// value from 2**63 to 2**64 - 1 (big true).
struct Whole {
    bool big;
    std::uint64_t bits;
    friend bool operator==(const Whole&, const Whole&) = default;
    friend bool operator<(const Whole& x, const Whole& y) {
        if (x.big != y.big) return y.big;  // every int64 value is below 2**63
        return x.big ? x.bits < y.bits : static_cast<std::int64_t>(x.bits) < static_cast<std::int64_t>(y.bits);
    }
};

// A double's value when it is a whole number of at most 64 bits (3.0, -0.0, 2.0**63).
std::optional<Whole> whole_of(double v) {
    if (!(v >= -0x1p63 && v < 0x1p64) || std::trunc(v) != v) return std::nullopt;
    if (v < 0x1p63) return Whole{false, static_cast<std::uint64_t>(static_cast<std::int64_t>(v))};
    return Whole{true, static_cast<std::uint64_t>(v)};
}

// A number's value when it is a whole number of at most 64 bits (a bool, an int, or a float such
// as 3.0 or -0.0); nothing for a float with a fraction, NaN, an infinity or beyond 2**64.
std::optional<Whole> whole_value(const Object& o) {
    return o.visit([](const auto& v) -> std::optional<Whole> {
        using V = std::decay_t<decltype(v)>;
        if constexpr (std::is_same_v<V, bool> || std::is_same_v<V, std::int64_t>) {
            return Whole{false, static_cast<std::uint64_t>(static_cast<std::int64_t>(v))};
        } else if constexpr (std::is_same_v<V, std::uint64_t>) {
            return Whole{v > static_cast<std::uint64_t>(std::numeric_limits<std::int64_t>::max()), v};
        } else if constexpr (std::is_same_v<V, double>) {
            return whole_of(v);
        } else {
            return std::nullopt;
        }
    });
}

// Whether every item of `a` is an item of `b` (sets: their items are hashable).
bool members_of(const py::Items& a, const py::Items& b) {
    std::unordered_set<Object, ObjectHash, ObjectEqual> in_b(b.begin(), b.end());
    return std::all_of(a.begin(), a.end(), [&](const Object& e) { return in_b.count(e) != 0; });
}

std::string_view bytes_of(const Object& o) {
    return o.visit([](const auto& v) -> std::string_view {
        using V = std::decay_t<decltype(v)>;
        if constexpr (std::is_same_v<V, py::Bytes> || std::is_same_v<V, py::ByteArray>)
            return v.data;
        else
            return {};
    });
}

bool equal(const Object& a, const Object& b) {
    if (is_number(a) && is_number(b)) {
        const auto x = whole_value(a), y = whole_value(b);
        if (x && y) return *x == *y;
        if (x || y) return false;  // a whole number and a float that is not one, or NaN
        return a.as<double>() == b.as<double>();
    }
    auto same_items = [](const py::Items& p, const py::Items& q) {
        return p.size() == q.size() && std::equal(p.begin(), p.end(), q.begin(), equal);
    };
    switch (a.kind()) {
        case Kind::none: return b.kind() == Kind::none;
        case Kind::str: return b.kind() == Kind::str && a.as<std::string>() == b.as<std::string>();
        case Kind::bytes:
        case Kind::bytearray:
            return (b.kind() == Kind::bytes || b.kind() == Kind::bytearray) && bytes_of(a) == bytes_of(b);
        case Kind::tuple:
        case Kind::list: return b.kind() == a.kind() && same_items(a.items(), b.items());
        case Kind::set:
        case Kind::frozenset:
            return (b.kind() == Kind::set || b.kind() == Kind::frozenset) && a.items().size() == b.items().size() &&
                   members_of(a.items(), b.items());
        case Kind::dict: {
            if (b.kind() != Kind::dict || a.dict().size() != b.dict().size()) return false;
            std::unordered_map<Object, const Object*, ObjectHash, ObjectEqual> in_b;
            for (const auto& [k, v] : b.dict()) in_b.emplace(k, &v);
            return std::all_of(a.dict().begin(), a.dict().end(), [&](const auto& kv) {
                auto it = in_b.find(kv.first);
                return it != in_b.end() && equal(kv.second, *it->second);
            });
        }
        default: return false;  // a number against a non-number
    }
}

std::size_t hash_of(const Object& o) {
    if (is_number(o)) {
        if (const auto w = whole_value(o)) return mix(w->bits, w->big);
        return std::hash<double>{}(o.as<double>());
    }
    return o.visit([&](const auto& v) -> std::size_t {
        using V = std::decay_t<decltype(v)>;
        if constexpr (std::is_same_v<V, py::None>) {
            return 0x5bd1e995;
        } else if constexpr (std::is_same_v<V, std::string>) {
            return std::hash<std::string>{}(v);
        } else if constexpr (std::is_same_v<V, py::Bytes>) {
            return mix(1, std::hash<std::string>{}(v.data));
        } else if constexpr (std::is_same_v<V, py::Tuple>) {
            std::size_t h = 2;
            for (const Object& e : v) h = mix(h, hash_of(e));
            return h;
        } else if constexpr (std::is_same_v<V, py::FrozenSet>) {
            std::size_t h = 3;  // order-independent
            for (const Object& e : v) h += hash_of(e) * 0x100000001b3ULL;
            return h;
        } else {
            raise("TypeError", std::string("unhashable type: '") + o.type_name() + "'");
        }
    });
}

/// Python's < between two numbers, exact as Python's: an int and a float compare by their values,
/// not with the int rounded to a double (2**53 + 1 > 2.0**53).
bool number_less(const Object& a, const Object& b) {
    const auto x = whole_value(a), y = whole_value(b);
    if (x && y) return *x < *y;
    if (!x && !y) return a.as<double>() < b.as<double>();  // two floats
    // A whole number against a float that is not one of 64 bits: a fraction, beyond them, NaN or
    // an infinity. They are never equal.
    const Whole w = x ? *x : *y;
    const double f = (x ? b : a).as<double>();
    if (std::isnan(f)) return false;
    bool w_below;  // w < f
    if (f >= 0x1p64)
        w_below = true;
    else if (f < -0x1p63)
        w_below = false;
    else
        w_below = !(*whole_of(std::floor(f)) < w);  // f has a fraction: w < f iff w <= floor(f)
    return x ? w_below : !w_below;
}

/// Python's < for the kinds list.sort() meets in plain data: numbers, str, bytes and bytearray,
/// sets (a proper subset is less), and tuples and lists of them.
bool less(const Object& a, const Object& b) {
    if (is_number(a) && is_number(b)) return number_less(a, b);
    const Kind ka = a.kind(), kb = b.kind();
    auto bytes_like = [](Kind k) { return k == Kind::bytes || k == Kind::bytearray; };
    auto set_like = [](Kind k) { return k == Kind::set || k == Kind::frozenset; };
    if (ka == Kind::str && kb == Kind::str) return a.as<std::string>() < b.as<std::string>();
    if (bytes_like(ka) && bytes_like(kb)) return bytes_of(a) < bytes_of(b);
    if (set_like(ka) && set_like(kb))
        return a.items().size() < b.items().size() && members_of(a.items(), b.items());
    if ((ka == Kind::tuple || ka == Kind::list) && kb == ka) {
        // As Python: the first items that differ (by ==) decide, with <, so equal items that have
        // no order ((1, None) against (1, None)) are never compared with <; a prefix is less.
        const py::Items p = a.items(), q = b.items();
        const std::size_t n = std::min(p.size(), q.size());
        std::size_t i = 0;
        while (i < n && equal(p[i], q[i])) ++i;
        return i < n ? less(p[i], q[i]) : p.size() < q.size();
    }
    raise("TypeError", std::string("'<' not supported between instances of '") + a.type_name() + "' and '" +
                           b.type_name() + "'");
}

/// What Python's iter() yields from a value mp's model holds: a tuple's, list's or set's items, a
/// dict's keys, a str's characters (strs of one code point), the ints of bytes or a bytearray;
/// nothing for a value that is not iterable.
std::optional<std::vector<Object>> iterate(const Object& o) {
    std::vector<Object> out;
    switch (o.kind()) {
        case Kind::tuple:
        case Kind::list:
        case Kind::set:
        case Kind::frozenset: {
            const py::Items items = o.items();
            out.assign(items.begin(), items.end());
            return out;
        }
        case Kind::dict:
            for (const auto& kv : o.dict()) out.push_back(kv.first);
            return out;
        case Kind::str: {
            // UTF-8: a character starts at each byte that is not a continuation byte (10xxxxxx).
            const std::string s = o.as<std::string>();
            for (std::size_t i = 0, j; i < s.size(); i = j) {
                for (j = i + 1; j < s.size() && (static_cast<unsigned char>(s[j]) & 0xC0) == 0x80; ++j) {
                }
                out.emplace_back(s.substr(i, j - i));
            }
            return out;
        }
        case Kind::bytes:
        case Kind::bytearray:
            for (const char c : bytes_of(o)) out.emplace_back(static_cast<int>(static_cast<unsigned char>(c)));
            return out;
        default: return std::nullopt;
    }
}

// ---- arguments ---------------------------------------------------------------------------------

/// A call's positional and keyword arguments, read as Python binds them to a signature.
struct Args {
    py::Items args;
    py::DictItems kwds;
    const std::string* method = nullptr;

    /// Argument `i` (or keyword `name`), or `fallback` when neither was given.
    std::optional<Object> get(std::size_t i, const char* name) const {
        if (i < args.size()) return args[i];
        if (name)
            if (const Object* o = kwds.find(name)) return *o;
        return std::nullopt;
    }
    Object get(std::size_t i, const char* name, Object fallback) const {
        auto o = get(i, name);
        return o ? *o : fallback;
    }
    Object need(std::size_t i, const char* name) const {
        auto o = get(i, name);
        if (!o) raise("TypeError", *method + "() missing required argument '" + name + "'");
        return *o;
    }
    void at_most(std::size_t n) const {
        if (args.size() + kwds.size() > n)
            raise("TypeError", *method + "() takes at most " + std::to_string(n) + " arguments (" +
                                   std::to_string(args.size() + kwds.size()) + " given)");
    }
};

bool truthy(const Object& o) {
    switch (o.kind()) {
        case Kind::none: return false;
        case Kind::boolean: return o.as<bool>();
        case Kind::integer: return o.as<std::int64_t>() != 0 || o.visit([](const auto& v) {
                                       return std::is_same_v<std::decay_t<decltype(v)>, std::uint64_t>;
                                   });
        case Kind::floating: return o.as<double>() != 0.0;
        case Kind::str: return !o.as<std::string>().empty();
        case Kind::bytes: case Kind::bytearray: return !o.as<py::Bytes>().data.empty();
        case Kind::dict: return !o.dict().empty();
        default: return !o.items().empty();
    }
}

std::int64_t to_index(const Object& o) {
    if (o.kind() == Kind::boolean) return o.as<bool>() ? 1 : 0;
    if (o.kind() != Kind::integer)
        raise("TypeError", std::string("indices must be integers, not ") + o.type_name());
    try {
        return o.as<std::int64_t>();
    } catch (const py::UnpicklingError&) {
        raise("IndexError", "cannot fit 'int' into an index-sized integer");
    }
}

/// No deadline (a timeout of None).
constexpr Clock::time_point kNever = Clock::time_point::max();

/// A timeout argument (None: none) as a deadline.
Clock::time_point deadline_of(const Object& timeout) {
    if (timeout.is_none()) return kNever;
    double s = timeout.kind() == Kind::integer || timeout.kind() == Kind::floating
                   ? timeout.as<double>()
                   : (raise("TypeError", std::string("timeout must be a number, not ") + timeout.type_name()), 0.0);
    if (std::isnan(s)) raise("ValueError", "timeout must be a number, not NaN");
    if (s < 0) s = 0;
    if (s > 1e9) return kNever;  // "forever", as far as anyone can tell
    return Clock::now() + std::chrono::duration_cast<Clock::duration>(std::chrono::duration<double>(s));
}

/// queue.Queue's put and get: the timeout counts only when they block, and a negative one is a
/// ValueError (threading's Lock, Event and Condition take it as "do not wait" instead).
Clock::time_point queue_deadline(bool block, const Object& timeout) {
    if (!block || timeout.is_none()) return kNever;
    if ((timeout.kind() == Kind::integer || timeout.kind() == Kind::floating) && timeout.as<double>() < 0)
        raise("ValueError", "'timeout' must be a non-negative number");
    return deadline_of(timeout);
}

/// Whether a Lock.acquire timeout is negative: -1 is threading's "no timeout" (as is None, from
/// mp's C++ client), any other a ValueError. Python reads it as whole nanoseconds rounded away
/// from zero, so -0.9999999999 is -1 there too.
enum class Negative { no, unset, other };
Negative negative_lock_timeout(const Object& timeout) {
    if (timeout.is_none()) return Negative::unset;
    if (timeout.kind() == Kind::integer) {
        if (timeout.as<double>() >= 0) return Negative::no;  // an int past int64 is a large positive
        return timeout.as<std::int64_t>() == -1 ? Negative::unset : Negative::other;
    }
    if (timeout.kind() != Kind::floating) return Negative::no;  // deadline_of judges it
    const double ns = timeout.as<double>() * 1e9;
    if (!(ns < 0)) return Negative::no;  // NaN too
    return std::floor(ns) == -1e9 ? Negative::unset : Negative::other;
}

/// Waits on cv until ready() or the deadline; false on timeout. Wakes every 100 ms to see
/// whether the client is still there (a client killed in a blocking call ends its thread).
template <class Pred>
bool wait_until(std::condition_variable& cv, std::unique_lock<std::mutex>& lk, Clock::time_point deadline,
                Pred ready) {
    if (ready()) return true;
    for (;;) {
        auto slice = Clock::now() + std::chrono::milliseconds(100);
        if (deadline < slice) slice = deadline;
        const bool woke = cv.wait_until(lk, slice, ready);
        // Checked before taking what it waited for too: a client killed in q.get() must not
        // swallow the next item put.
        if (client_gone()) throw ClientGone();
        if (woke) return true;
        if (deadline != kNever && Clock::now() >= deadline) return false;
    }
}

// ---- the servants ------------------------------------------------------------------------------

/// An object a Python client uses: calls arrive by method name with Python's arguments.
class Servant {
public:
    virtual ~Servant() = default;
    /// Python's name of the class, for messages and repr.
    virtual const char* type_name() const = 0;
    /// The methods Python's proxy for it calls (the create reply carries them: AutoProxy uses them).
    virtual const std::vector<std::string>& exposed() const = 0;
    virtual Object call(const std::string& method, const Args& a) = 0;
    /// A copy of the value (proxy._getvalue()), and its repr (str(proxy)).
    virtual Object value() = 0;
    virtual std::string repr() { return value().repr(); }
    /// The connection `caller` ended: what it held is released.
    virtual void disconnected(std::uint64_t /*caller*/) {}
};

/// dict: insertion order kept, as Python's. Deleted slots are left empty and compacted later.
class DictServant final : public Servant {
public:
    const char* type_name() const override { return "dict"; }
    const std::vector<std::string>& exposed() const override {
        static const std::vector<std::string> e{"__contains__", "__delitem__", "__getitem__", "__iter__",
                                                "__len__", "__setitem__", "clear", "copy", "get", "items",
                                                "keys", "pop", "popitem", "setdefault", "update", "values"};
        return e;
    }
    Object value() override {
        std::lock_guard lk(mu_);
        return snapshot();
    }
    /// dict(arg, **kwds) and update(arg, **kwds): arg a dict, or an iterable of pairs (any
    /// iterables of two items), as Python's; what came before a bad pair stays, as there.
    void update_from(const Args& a) {
        if (a.args.size() > 1)
            raise("TypeError", *a.method + " expected at most 1 argument, got " + std::to_string(a.args.size()));
        if (auto arg = a.get(0, nullptr)) {
            if (arg->kind() == Kind::dict) {
                for (const auto& [k, v] : arg->dict()) set(k, v);
            } else {
                const auto pairs = iterate(*arg);
                if (!pairs) raise("TypeError", std::string("'") + arg->type_name() + "' object is not iterable");
                for (std::size_t i = 0; i < pairs->size(); ++i) {
                    const auto kv = iterate((*pairs)[i]);
                    const std::string element = "dictionary update sequence element #" + std::to_string(i);
                    if (!kv) raise("TypeError", "cannot convert " + element + " to a sequence");
                    if (kv->size() != 2)
                        raise("ValueError", element + " has length " + std::to_string(kv->size()) + "; 2 is required");
                    set((*kv)[0], (*kv)[1]);
                }
            }
        }
        for (const auto& [k, v] : a.kwds) set(k, v);
    }
    Object call(const std::string& m, const Args& a) override {
        std::lock_guard lk(mu_);
        if (m == "__getitem__") {
            Object k = a.need(0, "key");
            if (const Object* v = find(k)) return *v;
            raise("KeyError", k);
        }
        if (m == "__setitem__") {
            set(a.need(0, "key"), a.need(1, "value"));
            return {};
        }
        if (m == "__delitem__") {
            Object k = a.need(0, "key");
            if (!erase(k)) raise("KeyError", k);
            return {};
        }
        if (m == "__contains__") return find(a.need(0, "key")) != nullptr;
        if (m == "__len__") return static_cast<std::int64_t>(index_.size());
        if (m == "get") {
            const Object* v = find(a.need(0, "key"));
            return v ? *v : a.get(1, "default", Object());
        }
        if (m == "setdefault") {
            Object k = a.need(0, "key");
            if (const Object* v = find(k)) return *v;
            Object d = a.get(1, "default", Object());
            set(k, d);
            return d;
        }
        if (m == "pop") {
            Object k = a.need(0, "key");
            // Python's dict.pop answers an empty dict before it hashes the key: d.pop([1]) of {} is
            // a KeyError there, a TypeError otherwise.
            if (!index_.empty())
                if (const Object* v = find(k)) {
                    Object r = *v;
                    erase(k);
                    return r;
                }
            if (auto d = a.get(1, "default")) return *d;
            raise("KeyError", k);
        }
        if (m == "popitem") {
            for (auto it = slots_.rbegin(); it != slots_.rend(); ++it) {
                if (!*it) continue;
                Object r = Object::tuple({(*it)->first, (*it)->second});
                erase((*it)->first);
                return r;
            }
            raise("KeyError", "popitem(): dictionary is empty");
        }
        if (m == "keys" || m == "values" || m == "items") {
            // Python's own server cannot pickle a dict view; a list is what a caller can use.
            std::vector<Object> out;
            out.reserve(index_.size());
            for (const auto& s : slots_) {
                if (!s) continue;
                if (m == "keys") out.push_back(s->first);
                else if (m == "values") out.push_back(s->second);
                else out.push_back(Object::tuple({s->first, s->second}));
            }
            return Object::list(std::move(out));
        }
        if (m == "copy") return snapshot();
        if (m == "clear") {
            slots_.clear();
            index_.clear();
            return {};
        }
        if (m == "update") {
            update_from(a);
            return {};
        }
        if (m == "__iter__")
            raise("NotImplementedError",
                  "mp's manager does not hand out iterator proxies: use list(d.keys()) or d.copy()");
        raise("AttributeError", "'dict' object has no attribute '" + m + "'");
    }

private:
    // Python hashes a key before it looks for it, so an unhashable one (a list, dict, set or
    // bytearray, or a tuple holding one) is a TypeError even in a dict where it could not be:
    // find, set and erase hash it first, as libstdc++'s unordered_map scans a small map with ==
    // alone.
    static const Object& hashable(const Object& k) {
        (void)hash_of(k);
        return k;
    }
    const Object* find(const Object& k) const {
        auto it = index_.find(hashable(k));
        return it == index_.end() ? nullptr : &slots_[it->second]->second;
    }
    void set(const Object& k, const Object& v) {
        auto [it, fresh] = index_.try_emplace(hashable(k), slots_.size());
        if (fresh)
            slots_.emplace_back(std::in_place, k, v);
        else
            slots_[it->second]->second = v;
    }
    bool erase(const Object& k) {
        auto it = index_.find(hashable(k));
        if (it == index_.end()) return false;
        slots_[it->second].reset();
        index_.erase(it);
        if (slots_.size() > 32 && index_.size() < slots_.size() / 2) compact();
        return true;
    }
    void compact() {
        std::vector<std::optional<std::pair<Object, Object>>> kept;
        kept.reserve(index_.size());
        for (auto& s : slots_)
            if (s) {
                index_[s->first] = kept.size();
                kept.push_back(std::move(s));
            }
        slots_ = std::move(kept);
    }
    Object snapshot() const {
        std::vector<std::pair<Object, Object>> out;
        out.reserve(index_.size());
        for (const auto& s : slots_)
            if (s) out.push_back(*s);
        return Object::dict(std::move(out));
    }

    std::mutex mu_;
    std::vector<std::optional<std::pair<Object, Object>>> slots_;
    std::unordered_map<Object, std::size_t, ObjectHash, ObjectEqual> index_;
};

// A predicate: whether an item equals v, as Python's == says (list.index, count, remove, `in`).
auto equal_to(Object v) {
    return [v = std::move(v)](const Object& e) { return equal(e, v); };
}

class ListServant final : public Servant {
public:
    const char* type_name() const override { return "list"; }
    const std::vector<std::string>& exposed() const override {
        static const std::vector<std::string> e{"__add__", "__contains__", "__delitem__", "__getitem__", "__len__",
                                                "__mul__", "__reversed__", "__rmul__", "__setitem__", "append",
                                                "count", "extend", "index", "insert", "pop", "remove", "reverse",
                                                "sort", "__imul__"};
        return e;
    }
    Object value() override {
        std::lock_guard lk(mu_);
        return Object::list(items_);
    }
    void extend(const Object& o) {
        auto items = iterate(o);
        if (!items) raise("TypeError", std::string("'") + o.type_name() + "' object is not iterable");
        items_.insert(items_.end(), std::make_move_iterator(items->begin()), std::make_move_iterator(items->end()));
    }
    Object call(const std::string& m, const Args& a) override {
        std::lock_guard lk(mu_);
        if (m == "__getitem__") return items_[position(a.need(0, "index"), "list index out of range")];
        if (m == "__setitem__") {
            items_[position(a.need(0, "index"), "list assignment index out of range")] = a.need(1, "value");
            return {};
        }
        if (m == "__delitem__") {
            std::size_t i = position(a.need(0, "index"), "list assignment index out of range");
            items_.erase(items_.begin() + static_cast<std::ptrdiff_t>(i));
            return {};
        }
        if (m == "__len__") return static_cast<std::int64_t>(items_.size());
        if (m == "__contains__") return std::any_of(items_.begin(), items_.end(), equal_to(a.need(0, "value")));
        if (m == "append") {
            items_.push_back(a.need(0, "object"));
            return {};
        }
        if (m == "extend") {
            extend(a.need(0, "iterable"));
            return {};
        }
        if (m == "insert") {
            std::int64_t i = to_index(a.need(0, "index"));
            const auto n = static_cast<std::int64_t>(items_.size());
            if (i < 0) i = std::max<std::int64_t>(0, i + n);
            i = std::min(i, n);
            items_.insert(items_.begin() + i, a.need(1, "object"));
            return {};
        }
        if (m == "pop") {
            if (items_.empty()) raise("IndexError", "pop from empty list");
            std::size_t i = position(a.get(0, "index", Object(-1)), "pop index out of range");
            Object r = items_[i];
            items_.erase(items_.begin() + static_cast<std::ptrdiff_t>(i));
            return r;
        }
        if (m == "remove" || m == "index") {
            Object v = a.need(0, "value");
            auto first = items_.begin(), last = items_.end();
            if (m == "index") {
                // index(value, start, stop) looks in items_[start:stop] only, its bounds clamped
                // as a slice's, as Python's list.index.
                const auto n = static_cast<std::int64_t>(items_.size());
                auto bound = [n](const Object& o) {
                    // An int past int64 (2**63 .. 2**64-1) is past the end, as in Python.
                    const bool past_int64 = o.visit(
                        [](const auto& x) { return std::is_same_v<std::decay_t<decltype(x)>, std::uint64_t>; });
                    std::int64_t i = past_int64 ? n : to_index(o);
                    if (i < 0) i = std::max<std::int64_t>(0, i + n);
                    return std::min(i, n);
                };
                const std::int64_t start = bound(a.get(1, "start", Object(0)));
                const std::int64_t stop = std::max(start, bound(a.get(2, "stop", Object(n))));
                first = items_.begin() + start;
                last = items_.begin() + stop;
            }
            auto it = std::find_if(first, last, equal_to(v));
            if (it == last)
                raise("ValueError", m == "remove" ? "list.remove(x): x not in list" : v.repr() + " is not in list");
            if (m == "index") return static_cast<std::int64_t>(it - items_.begin());
            items_.erase(it);
            return {};
        }
        if (m == "count")
            return static_cast<std::int64_t>(std::count_if(items_.begin(), items_.end(), equal_to(a.need(0, "value"))));
        if (m == "reverse") {
            std::reverse(items_.begin(), items_.end());
            return {};
        }
        if (m == "__reversed__") return Object::list(std::vector<Object>(items_.rbegin(), items_.rend()));
        if (m == "sort") {
            // list.sort(*, key=None, reverse=False), its arguments checked as Python 3.11's do.
            const std::size_t given = a.args.size() + a.kwds.size();
            if (given > 2)
                raise("TypeError", std::string("sort() takes at most 2 ") + (a.args.empty() ? "keyword " : "") +
                                       "arguments (" + std::to_string(given) + " given)");
            if (!a.args.empty()) raise("TypeError", "sort() takes no positional arguments");
            for (const auto& kv : a.kwds) {
                const std::string name = kv.first.kind() == Kind::str ? kv.first.as<std::string>() : kv.first.repr();
                if (name != "key" && name != "reverse")
                    raise("TypeError", "'" + name + "' is an invalid keyword argument for sort()");
            }
            if (a.get(0, "key", Object()).kind() != Kind::none)
                raise("TypeError", "mp's manager sorts plain values only: key= needs a Python function");
            const bool reverse = truthy(a.get(1, "reverse", Object(false)));
            std::vector<Object> sorted = items_;  // a failed comparison leaves the list as it was
            std::stable_sort(sorted.begin(), sorted.end(),
                             [&](const Object& x, const Object& y) { return reverse ? less(y, x) : less(x, y); });
            items_ = std::move(sorted);
            return {};
        }
        if (m == "__add__") {
            Object o = a.need(0, "value");
            if (o.kind() != Kind::list)
                raise("TypeError", std::string("can only concatenate list (not \"") + o.type_name() + "\") to list");
            std::vector<Object> r = items_;
            r.insert(r.end(), o.items().begin(), o.items().end());
            return Object::list(std::move(r));
        }
        if (m == "__mul__" || m == "__rmul__" || m == "__imul__") {
            const std::int64_t n = std::max<std::int64_t>(0, to_index(a.need(0, "value")));
            if (n > 0 && items_.size() > (std::size_t{1} << 26) / static_cast<std::uint64_t>(n))
                raise("MemoryError", "the list would be too long");
            std::vector<Object> r;
            r.reserve(items_.size() * static_cast<std::size_t>(n));
            for (std::int64_t i = 0; i < n; ++i) r.insert(r.end(), items_.begin(), items_.end());
            if (m != "__imul__") return Object::list(std::move(r));
            items_ = std::move(r);
            return {};
        }
        raise("AttributeError", "'list' object has no attribute '" + m + "'");
    }

private:
    std::size_t position(const Object& index, const char* error) const {
        if (index.kind() != Kind::integer && index.kind() != Kind::boolean)
            raise("TypeError", std::string("list indices must be integers, not ") + index.type_name() +
                                   " (mp's manager takes no slices)");
        std::int64_t i = to_index(index);
        const auto n = static_cast<std::int64_t>(items_.size());
        if (i < 0) i += n;
        if (i < 0 || i >= n) raise("IndexError", error);
        return static_cast<std::size_t>(i);
    }
    std::mutex mu_;
    std::vector<Object> items_;
};

class NamespaceServant final : public Servant {
public:
    const char* type_name() const override { return "Namespace"; }
    const std::vector<std::string>& exposed() const override {
        static const std::vector<std::string> e{"__getattribute__", "__setattr__", "__delattr__"};
        return e;
    }
    explicit NamespaceServant(const py::DictItems& kwds) {
        for (const auto& [k, v] : kwds) attrs_.insert_or_assign(k.as<std::string>(), v);
    }
    Object value() override {
        std::lock_guard lk(mu_);
        std::vector<std::pair<Object, Object>> out;
        for (const auto& [k, v] : attrs_) out.emplace_back(Object(k), v);
        return Object::dict(std::move(out));
    }
    std::string repr() override {
        std::lock_guard lk(mu_);
        std::string r = "Namespace(";
        bool first = true;
        for (const auto& [k, v] : attrs_) {
            r += (first ? "" : ", ") + k + "=" + v.repr();
            first = false;
        }
        return r + ")";
    }
    Object call(const std::string& m, const Args& a) override {
        Object name = a.need(0, "name");
        if (name.kind() != Kind::str)
            raise("TypeError", std::string("attribute name must be string, not '") + name.type_name() + "'");
        const std::string n = name.as<std::string>();
        std::lock_guard lk(mu_);
        if (m == "__getattribute__") {
            auto it = attrs_.find(n);
            if (it == attrs_.end()) raise("AttributeError", "'Namespace' object has no attribute '" + n + "'");
            return it->second;
        }
        if (m == "__setattr__") {
            attrs_.insert_or_assign(n, a.need(1, "value"));
            return {};
        }
        if (m == "__delattr__") {
            if (attrs_.erase(n) == 0) raise("AttributeError", n);
            return {};
        }
        raise("AttributeError", "'Namespace' object has no attribute '" + m + "'");
    }

private:
    std::mutex mu_;
    std::map<std::string, Object> attrs_;
};

/// queue.Queue (and JoinableQueue: the same class has task_done and join in Python).
class QueueServant final : public Servant {
public:
    explicit QueueServant(std::int64_t maxsize) : maxsize_(maxsize) {}
    const char* type_name() const override { return "Queue"; }
    const std::vector<std::string>& exposed() const override {
        // public_methods(queue.Queue()) in CPython 3.11, which AutoProxy turns into the proxy.
        static const std::vector<std::string> e{"empty", "full", "get", "get_nowait", "join",
                                                "put", "put_nowait", "qsize", "task_done"};
        return e;
    }
    Object value() override {
        std::lock_guard lk(mu_);
        return Object::list(std::vector<Object>(items_.begin(), items_.end()));
    }
    std::string repr() override { return "<queue.Queue object (mp)>"; }
    Object call(const std::string& m, const Args& a) override {
        std::unique_lock lk(mu_);
        if (m == "put" || m == "put_nowait") {
            Object item = a.need(0, "item");
            const bool block = m == "put" && truthy(a.get(1, "block", Object(true)));
            const auto deadline = queue_deadline(block, a.get(2, "timeout", Object()));
            auto room = [&] { return maxsize_ <= 0 || static_cast<std::int64_t>(items_.size()) < maxsize_; };
            if (!(block ? wait_until(cv_, lk, deadline, room) : room())) raise("queue.Full", Object());
            items_.push_back(std::move(item));
            ++unfinished_;
            cv_.notify_all();
            return {};
        }
        if (m == "get" || m == "get_nowait") {
            const bool block = m == "get" && truthy(a.get(0, "block", Object(true)));
            const auto deadline = queue_deadline(block, a.get(1, "timeout", Object()));
            auto any = [&] { return !items_.empty(); };
            if (!(block ? wait_until(cv_, lk, deadline, any) : any())) raise("queue.Empty", Object());
            Object r = std::move(items_.front());
            items_.pop_front();
            cv_.notify_all();
            return r;
        }
        if (m == "qsize") return static_cast<std::int64_t>(items_.size());
        if (m == "empty") return items_.empty();
        if (m == "full") return maxsize_ > 0 && static_cast<std::int64_t>(items_.size()) >= maxsize_;
        if (m == "task_done") {
            if (unfinished_ <= 0) raise("ValueError", "task_done() called too many times");
            if (--unfinished_ == 0) cv_.notify_all();
            return {};
        }
        if (m == "join") {
            wait_until(cv_, lk, kNever, [&] { return unfinished_ == 0; });
            return {};
        }
        raise("AttributeError", "'Queue' object has no attribute '" + m + "'");
    }

private:
    std::mutex mu_;
    std::condition_variable cv_;
    std::deque<Object> items_;
    std::int64_t maxsize_;
    std::int64_t unfinished_ = 0;
};

/// threading.Lock and RLock. A connection's thread owns what it acquired (as in Python's
/// server, whose thread per connection calls acquire); when the connection ends (a killed
/// client), what it held is released, which Python's server does not do.
class LockServant final : public Servant {
public:
    explicit LockServant(bool reentrant) : reentrant_(reentrant) {}
    const char* type_name() const override { return reentrant_ ? "RLock" : "Lock"; }
    const std::vector<std::string>& exposed() const override {
        static const std::vector<std::string> e{"acquire", "release"};
        return e;
    }
    Object value() override { raise("TypeError", std::string("cannot pickle '_thread.") + (reentrant_ ? "RLock" : "lock") + "' object"); }
    std::string repr() override {
        std::lock_guard lk(mu_);
        return std::string("<") + (count_ ? "locked" : "unlocked") + " _thread." + (reentrant_ ? "RLock" : "lock") +
               " object (mp)>";
    }
    Object call(const std::string& m, const Args& a) override {
        std::unique_lock lk(mu_);
        if (m == "acquire") {
            const bool block = truthy(a.get(0, "blocking", Object(true)));
            Object t = a.get(1, "timeout", Object(-1));
            const auto negative = negative_lock_timeout(t);
            if (negative == Negative::unset) t = Object();
            if (!block && !t.is_none()) raise("ValueError", "can't specify a timeout for a non-blocking call");
            if (negative == Negative::other) raise("ValueError", "timeout value must be positive");
            if (reentrant_ && count_ > 0 && owner_ == t_caller) {
                ++count_;
                return true;
            }
            auto free = [&] { return count_ == 0; };
            if (!(block ? wait_until(cv_, lk, deadline_of(t), free) : free())) return false;
            owner_ = t_caller;
            count_ = 1;
            return true;
        }
        if (m == "release") {
            if (count_ == 0 || (reentrant_ && owner_ != t_caller))
                raise("RuntimeError", reentrant_ ? "cannot release un-acquired lock" : "release unlocked lock");
            if (--count_ == 0) cv_.notify_all();
            return {};
        }
        raise("AttributeError", "'lock' object has no attribute '" + m + "'");
    }
    void disconnected(std::uint64_t caller) override {
        std::lock_guard lk(mu_);
        if (count_ > 0 && owner_ == caller) {
            count_ = 0;
            cv_.notify_all();
        }
    }

private:
    std::mutex mu_;
    std::condition_variable cv_;
    bool reentrant_;
    std::uint64_t owner_ = 0;
    std::int64_t count_ = 0;
};

class EventServant final : public Servant {
public:
    const char* type_name() const override { return "Event"; }
    const std::vector<std::string>& exposed() const override {
        static const std::vector<std::string> e{"is_set", "set", "clear", "wait"};
        return e;
    }
    Object value() override { raise("TypeError", "cannot pickle 'Event' object"); }
    std::string repr() override {
        std::lock_guard lk(mu_);
        return std::string("<threading.Event (mp) ") + (set_ ? "set" : "unset") + ">";
    }
    Object call(const std::string& m, const Args& a) override {
        std::unique_lock lk(mu_);
        if (m == "is_set") return set_;
        if (m == "set") {
            set_ = true;
            cv_.notify_all();
            return {};
        }
        if (m == "clear") {
            set_ = false;
            return {};
        }
        if (m == "wait") return wait_until(cv_, lk, deadline_of(a.get(0, "timeout", Object())), [&] { return set_; });
        raise("AttributeError", "'Event' object has no attribute '" + m + "'");
    }

private:
    std::mutex mu_;
    std::condition_variable cv_;
    bool set_ = false;
};

/// managers.Value(typecode, value): get() and set(), as Python's (the typecode is kept for repr
/// only, as there).
class ValueServant final : public Servant {
public:
    ValueServant(Object typecode, Object value) : typecode_(std::move(typecode)), value_(std::move(value)) {}
    const char* type_name() const override { return "Value"; }
    const std::vector<std::string>& exposed() const override {
        static const std::vector<std::string> e{"get", "set"};
        return e;
    }
    Object value() override {
        std::lock_guard lk(mu_);
        return value_;
    }
    std::string repr() override {
        std::lock_guard lk(mu_);
        return "Value(" + typecode_.repr() + ", " + value_.repr() + ")";
    }
    Object call(const std::string& m, const Args& a) override {
        std::lock_guard lk(mu_);
        if (m == "get") return value_;
        if (m == "set") {
            value_ = a.need(0, "value");
            return {};
        }
        raise("AttributeError", "'Value' object has no attribute '" + m + "'");
    }

private:
    std::mutex mu_;
    Object typecode_;
    Object value_;
};

/// A new object of one of the Python types the server offers, from create's arguments.
std::shared_ptr<Servant> make_servant(const std::string& type, const Args& a) {
    if (type == "dict") {
        auto d = std::make_shared<DictServant>();
        d->update_from(a);
        return d;
    }
    if (type == "list") {
        a.at_most(1);
        auto l = std::make_shared<ListServant>();
        if (auto init = a.get(0, nullptr)) l->extend(*init);
        return l;
    }
    if (type == "Namespace") {
        if (!a.args.empty()) raise("TypeError", "Namespace() takes keyword arguments only");
        return std::make_shared<NamespaceServant>(a.kwds);
    }
    if (type == "Queue" || type == "JoinableQueue") {
        a.at_most(1);
        return std::make_shared<QueueServant>(to_index(a.get(0, "maxsize", Object(0))));
    }
    if (type == "Lock" || type == "RLock") {
        a.at_most(0);
        return std::make_shared<LockServant>(type == "RLock");
    }
    if (type == "Event") {
        a.at_most(0);
        return std::make_shared<EventServant>();
    }
    if (type == "Value") {
        a.at_most(3);
        return std::make_shared<ValueServant>(a.need(0, "typecode"), a.need(1, "value"));
    }
    return nullptr;
}

// ---- replies -----------------------------------------------------------------------------------

std::string reply_return(const Object& result) {
    py::Writer w;
    w.begin_tuple(2);
    w.str("#RETURN");
    w.object(result);
    w.end_tuple(2);
    return w.finish();
}

std::string reply_text(std::string_view kind, std::string_view text) {
    py::Writer w;
    w.begin_tuple(2);
    w.str(kind);
    w.str(text);
    w.end_tuple(2);
    return w.finish();
}

std::string reply_error(const PyRaise& e) {
    py::Writer w;
    w.begin_tuple(2);
    w.str("#ERROR");
    w.exception(e.type, e.arg);
    w.end_tuple(2);
    return w.finish();
}

/// What Python's RemoteError shows for a failure that is not a Python exception: a C++
/// exception thrown by the server (its type and what()), or a request mp could not read.
std::string traceback_text(std::exception_ptr ep) {
    ErrorInfo info;
    try {
        std::rethrow_exception(ep);
    } catch (const py::UnpicklingError& e) {
        return std::string("mp manager (C++) refused the request: ") + e.what() + "\n";
    } catch (...) {
        Encoder enc;
        encode_current_exception(enc);
        Decoder d(enc.bytes());
        info = decode_error_info(d);
    }
    // Ended by a newline, as Python's traceback.format_exc(): RemoteError's str() puts its closing
    // line of dashes right after the text.
    return "Traceback (the mp manager, C++, pid " + std::to_string(::getpid()) + "):\n" + info.type_name + ": " +
           info.message + "\n";
}

}  // namespace

// ---- the server's side -------------------------------------------------------------------------

struct PythonSide::Impl {
    struct Entry {
        std::shared_ptr<Servant> servant;
        std::string type_id;
        std::int64_t refs = 0;
    };
    std::mutex mu;
    std::unordered_map<std::string, Entry> objects;
    std::uint64_t next = 0;
    // register_shared: type_id -> the one object every create(type_id) returns, made on first use.
    std::map<std::string, std::string> shared_types;
    std::map<std::string, std::pair<std::string, std::shared_ptr<Servant>>> shared_objects;  // ident, servant
    // The references each client process holds (peers on a Unix socket, whose pid the kernel
    // tells): a process that dies without its decrefs (killed) has them dropped for it.
    std::map<pid_t, std::map<std::string, std::int64_t>> held;

    /// Python's Server.create: the object, its ident (a str, as Python's '%x' % id(obj)) and the
    /// methods its proxy may call; the caller holds the first reference.
    Object create(const std::string& type_id, const Args& a, pid_t peer) {
        std::shared_ptr<Servant> s;
        std::string ident;
        std::lock_guard lk(mu);
        if (auto sh = shared_types.find(type_id); sh != shared_types.end()) {
            auto& slot = shared_objects[type_id];
            if (!slot.second) {
                slot.second = make_servant(sh->second, Args{{}, {}, &type_id});
                slot.first = ident_of(++next);
            }
            ident = slot.first;
            s = slot.second;
        } else {
            s = make_servant(type_id, a);
            if (!s)
                raise("KeyError", "mp's manager has no type '" + type_id +
                                      "' for Python clients (it serves dict, list, Namespace, Queue, "
                                      "JoinableQueue, Lock, RLock, Event, Value and the register_shared() names)");
            ident = ident_of(++next);
        }
        auto& e = objects[ident];
        e.servant = s;
        e.type_id = type_id;
        ++e.refs;
        if (peer > 0) {
            ++held[peer][ident];
            watch(peer);
        }
        std::vector<Object> exposed(s->exposed().begin(), s->exposed().end());
        return Object::tuple({Object(ident), Object::tuple(std::move(exposed))});
    }
    static std::string ident_of(std::uint64_t n) {
        char buf[32];
        std::snprintf(buf, sizeof buf, "%llx", static_cast<unsigned long long>(n));
        return std::string("mp") + buf;
    }
    std::shared_ptr<Servant> find(const Object& ident) {
        std::lock_guard lk(mu);
        auto it = ident.kind() == Kind::str ? objects.find(ident.as<std::string>()) : objects.end();
        if (it == objects.end()) raise("KeyError", ident);
        return it->second.servant;
    }
    void incref(const Object& ident, pid_t peer) {
        std::lock_guard lk(mu);
        auto it = ident.kind() == Kind::str ? objects.find(ident.as<std::string>()) : objects.end();
        if (it == objects.end()) raise("KeyError", ident);
        ++it->second.refs;
        if (peer > 0) {
            ++held[peer][it->first];
            watch(peer);
        }
    }
    void decref(const Object& ident, pid_t peer) {
        std::shared_ptr<Servant> dead;  // destroyed outside the lock
        std::lock_guard lk(mu);
        auto it = ident.kind() == Kind::str ? objects.find(ident.as<std::string>()) : objects.end();
        if (it == objects.end()) raise("KeyError", ident);
        if (peer > 0) forget(peer, it->first, 1);
        if (--it->second.refs <= 0) {
            dead = std::move(it->second.servant);
            objects.erase(it);
        }
    }
    void forget(pid_t peer, const std::string& ident, std::int64_t n) {
        auto p = held.find(peer);
        if (p == held.end()) return;
        auto i = p->second.find(ident);
        if (i != p->second.end() && (i->second -= n) <= 0) p->second.erase(i);
        if (p->second.empty()) held.erase(p);
    }
    // Watching the client processes that hold references (a pidfd each, opened at the first
    // reference, while the process is alive: it names that process for good): a thread polls
    // them, and drops every reference a process still held when it ends. Whatever connections
    // it used: create and incref come on short ones, which close at once.
    std::map<pid_t, sys::Fd> watched;
    sys::Fd wake;  // an eventfd: the watcher polls the pidfds again (a new one, or it stops)
    bool stopping = false;
    std::thread watcher;

    // Under mu: `peer` holds a reference; watch it if not yet.
    void watch(pid_t peer) {
        if (watched.contains(peer)) return;
        sys::Fd fd;
        try {
            fd = sys::pidfd_open(peer);
        } catch (const std::system_error&) {
            // Gone already (ESRCH), or out of descriptors: its references stay, as in Python's
            // server, which never drops a client's references.
            return;
        }
        if (!wake) {
            wake = sys::Fd(::eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK));
            if (!wake) return;
        }
        watched.emplace(peer, std::move(fd));
        if (!watcher.joinable()) {
            watcher = std::thread([this] { watch_loop(); });
        } else {
            const std::uint64_t one = 1;
            (void)!::write(wake.get(), &one, sizeof one);
        }
    }
    void watch_loop() {
        std::vector<pollfd> fds;
        std::vector<pid_t> pids;
        for (;;) {
            fds.assign(1, pollfd{wake.get(), POLLIN, 0});
            pids.assign(1, 0);
            {
                std::lock_guard lk(mu);
                if (stopping) return;
                for (auto& [pid, fd] : watched) {
                    fds.push_back(pollfd{fd.get(), POLLIN, 0});
                    pids.push_back(pid);
                }
            }
            if (::poll(fds.data(), fds.size(), -1) < 0) continue;  // EINTR
            if (fds[0].revents != 0) {
                std::uint64_t n;
                (void)!::read(wake.get(), &n, sizeof n);
            }
            for (std::size_t i = 1; i < fds.size(); ++i)
                if (fds[i].revents != 0) drop_references_of(pids[i]);
        }
    }
    /// The references process `peer` (ended) never dropped are dropped for it.
    void drop_references_of(pid_t peer) {
        std::vector<std::shared_ptr<Servant>> dead;  // destroyed outside the lock
        std::lock_guard lk(mu);
        watched.erase(peer);
        auto p = held.find(peer);
        if (p == held.end()) return;
        for (auto& [ident, n] : p->second) {
            auto it = objects.find(ident);
            if (it != objects.end() && (it->second.refs -= n) <= 0) {
                dead.push_back(std::move(it->second.servant));
                objects.erase(it);
            }
        }
        held.erase(p);
    }
    ~Impl() {
        {
            std::lock_guard lk(mu);
            stopping = true;
        }
        if (watcher.joinable()) {
            const std::uint64_t one = 1;
            (void)!::write(wake.get(), &one, sizeof one);
            watcher.join();
        }
    }
};

PythonSide::PythonSide(std::vector<std::pair<std::string, std::string>> shared) : impl_(std::make_unique<Impl>()) {
    for (auto& [type_id, type] : shared) impl_->shared_types[type_id] = type;
}
PythonSide::~PythonSide() = default;

std::size_t PythonSide::objects() const {
    std::lock_guard lk(impl_->mu);
    return impl_->objects.size();
}

void PythonSide::release_owned(std::uint64_t caller) {
    std::vector<std::shared_ptr<Servant>> all;
    {
        std::lock_guard lk(impl_->mu);
        for (auto& [id, e] : impl_->objects) all.push_back(e.servant);
        for (auto& [id, s] : impl_->shared_objects)
            if (s.second) all.push_back(s.second);
    }
    for (auto& s : all) s->disconnected(caller);
}

bool PythonSide::serve(Connection& c, std::string msg, const std::function<bool()>& stopping) {
    Impl& im = *impl_;
    pid_t peer = 0;
    ucred cred{};
    socklen_t len = sizeof cred;
    if (::getsockopt(c.fileno(), SOL_SOCKET, SO_PEERCRED, &cred, &len) == 0) peer = cred.pid;  // Unix only
    // One request tuple, read; a request mp cannot read is answered with '#TRACEBACK'. Its Args
    // point at its method name, so it stays where it was made.
    struct Request {
        Object ident;
        std::string method;
        Args a;
        explicit Request(const std::string& m) {
            Object req = py::loads(m);
            if (req.kind() != Kind::tuple || req.items().size() != 4 || req.items()[1].kind() != Kind::str ||
                req.items()[2].kind() != Kind::tuple || req.items()[3].kind() != Kind::dict)
                throw py::UnpicklingError("mp: a manager request is the tuple (ident, methodname, args, kwds), not " +
                                          req.repr().substr(0, 200));
            ident = req.items()[0];
            method = req.items()[1].as<std::string>();
            a.args = req.items()[2].items();
            a.kwds = req.items()[3].dict();
            a.method = &method;
        }
        Request(const Request&) = delete;
        Request& operator=(const Request&) = delete;
    };
    // The reply to one request: handle(request) for one mp can read; a Python exception raised
    // (PyRaise) goes to on_raise; any other error is a '#TRACEBACK'; a client gone is thrown on.
    auto answer = [&msg](auto&& handle, auto&& on_raise) -> std::string {
        try {
            Request r(msg);
            return handle(r);
        } catch (const PyRaise& e) {
            return on_raise(e);
        } catch (const ClientGone&) {
            throw;
        } catch (...) {
            return reply_text("#TRACEBACK", traceback_text(std::current_exception()));
        }
    };

    // The connection's first request: one of the server's public functions.
    bool serving = false, stop = false;
    std::string reply;
    {
        // The server's own functions answer a Python exception with a traceback, as Python's
        // handle_request.
        auto traceback = [](const PyRaise& e) {
            return reply_text("#TRACEBACK",
                              e.type + ": " + (e.arg.kind() == Kind::str ? e.arg.as<std::string>() : e.arg.repr()) + "\n");
        };
        reply = answer([&](Request& req) {
            const std::string& fn = req.method;
            Args& a = req.a;
            Object result;
            if (fn == "create") {
                if (a.args.empty() || a.args[0].kind() != Kind::str) raise("TypeError", "create() needs a typeid");
                const std::string type_id = a.args[0].as<std::string>();
                std::vector<Object> rest(a.args.begin() + 1, a.args.end());
                Object rest_args = Object::tuple(std::move(rest));
                Args ca{rest_args.items(), a.kwds, &type_id};
                result = im.create(type_id, ca, peer);
            } else if (fn == "incref" || fn == "decref") {
                Object id = a.need(0, "ident");
                fn == "incref" ? im.incref(id, peer) : im.decref(id, peer);
            } else if (fn == "dummy") {
            } else if (fn == "accept_connection") {
                serving = true;
            } else if (fn == "shutdown") {
                stop = true;
            } else if (fn == "number_of_objects") {
                result = static_cast<std::int64_t>(objects());
            } else if (fn == "debug_info") {
                std::lock_guard lk(im.mu);
                std::string r;
                for (auto& [id, e] : im.objects)
                    r += "  " + id + ":       refcount=" + std::to_string(e.refs) + "\n    " + e.type_id + "\n";
                result = r;
            } else {
                raise("AssertionError", Object(Object(fn).repr() + " unrecognized (mp's manager serves create, "
                                                                  "incref, decref, dummy, accept_connection, "
                                                                  "shutdown, number_of_objects, debug_info)"));
            }
            return reply_return(result);
        }, traceback);
        c.send_bytes(reply);
        if (!serving) return stop;
    }

    // accept_connection: method calls on objects until the client hangs up.
    for (;;) {
        if (stopping()) return false;
        msg = c.recv_bytes(kMaxMessage);
        reply = answer([&](Request& req) {
            const std::string& method = req.method;
            std::shared_ptr<Servant> s = im.find(req.ident);
            const auto& ex = s->exposed();
            if (std::find(ex.begin(), ex.end(), method) != ex.end()) return reply_return(s->call(method, req.a));
            if (method == "__repr__" || method == "__str__") return reply_return(Object(s->repr()));
            if (method == "#GETVALUE") return reply_return(s->value());
            raise("AttributeError", "method '" + method + "' of '" + s->type_name() + "' object is not in exposed");
        }, [](const PyRaise& e) {
            try {
                return reply_error(e);
            } catch (...) {
                return reply_text("#TRACEBACK", e.type + ": " + e.arg.repr());
            }
        });
        if (reply.size() > kMaxMessage)
            reply = reply_text("#TRACEBACK", "mp manager: a reply of " + std::to_string(reply.size()) +
                                                 " bytes is over the limit of " + std::to_string(kMaxMessage));
        c.send_bytes(reply);
    }
}

}  // namespace detail::managers
}  // namespace mp
