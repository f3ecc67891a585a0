#pragma once
/// \file
/// mp::py — Python's pickle format for plain data, so a C++ process can exchange values with Python
/// code (multiprocessing.connection's send/recv, managers) without embedding Python.
///
///     std::string p = mp::py::dumps(std::map<std::string, int>{{"a", 1}});  // pickle.loads(p) == {'a': 1}
///     auto v = mp::py::loads<std::vector<double>>(bytes_from_python);        // pickle.dumps([1.5, 2])
///     mp::py::Object o = mp::py::loads(bytes_from_python);                   // any plain value
///
/// A pickle is a program for a small stack machine, and a pickle from an untrusted peer can ask that
/// machine to import and call anything (os.system). mp's reader runs only the data opcodes: every
/// opcode that would import, call or build an object (GLOBAL, STACK_GLOBAL, REDUCE, BUILD, INST,
/// OBJ, NEWOBJ, NEWOBJ_EX, EXT1/2/4, PERSID, BINPERSID) is refused with mp::py::UnpicklingError
/// naming the opcode and, for globals, the module and name. The one exception is the handful of
/// names Python's own pickler writes for plain data at protocols 2 and 3 (builtins.set, frozenset,
/// bytearray and bytes, and _codecs.encode for bytes), and builtins.list of a list, which
/// multiprocessing's pickler writes for dict.keys(), values() and items() (a Python manager's
/// replies): they are recognised by name and rebuilt as data; nothing is imported or called.
/// Lengths are checked against the input before anything is allocated, and nesting, input size and the size that shared references expand to are bounded
/// (py::Limits). A truncated or malformed pickle is an UnpicklingError, never a crash.
///
/// Reading: protocols 2 to 5 as CPython 3.8 to 3.14 write them (protocol 0 and 1 pickles that
/// use only the binary opcodes are read too). Writing: protocol 4, the protocol Python's
/// multiprocessing uses by default (pickle.DEFAULT_PROTOCOL in 3.8 to 3.13; 3.14's default, 5,
/// reads it too), framed as Python frames it.
///
/// Types, both ways (C++ -> Python when writing; Python -> C++ when reading):
///   None       py::None, std::nullopt (an empty std::optional), std::monostate, nullptr
///   bool       bool
///   int        the integer types; Python ints from -2**63 to 2**64-1 (larger: UnpicklingError;
///              reading checks that the value fits the C++ type)
///   float      float and double (reading a double also takes an int, as Python code often sends 1)
///   str        std::string (UTF-8), std::string_view and const char* (writing only)
///   bytes      py::Bytes (reading also takes a bytearray)
///   bytearray  py::ByteArray
///   tuple      std::tuple, std::pair, aggregates (a plain struct is the
///              tuple of its fields, up to 16); reading also takes a list of the right length
///   list       std::vector, std::list, std::deque, std::array (writing) (reading also takes a tuple)
///   dict       std::map, std::unordered_map; reading also std::vector<std::pair<K, V>> (or a
///              std::deque of pairs): list(d.items()), in insertion order, the cheapest to read (one
///              allocation for a small dict). A key that a pickle sets twice (Python's pickler never
///              does) stays where it first appeared, with the last value, as in Python's dict; keys
///              are compared with K's ==. Written, the vector is a list of 2-tuples (dict() takes it).
///   set        std::set, std::unordered_set (reading also takes a frozenset)
///   frozenset  py::Object::frozenset(...)
///   anything   py::Object, a dynamic value of any of the above
/// Other types: specialise mp::py::Convert<T> (see below).

#include <mp/errors.hpp>

#include <algorithm>
#include <array>
#include <bit>
#include <cmath>
#include <concepts>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <deque>
#include <exception>
#include <limits>
#include <list>
#include <map>
#include <memory>
#include <optional>
#include <set>
#include <span>
#include <string>
#include <string_view>
#include <tuple>
#include <type_traits>
#include <unordered_map>
#include <unordered_set>
#include <utility>
#include <variant>
#include <vector>

namespace mp::py {

/// A pickle could not be read: malformed or truncated, an opcode mp refuses (the message names
/// it, and the module and name of a global), or a value that does not fit the requested C++ type.
class UnpicklingError : public DecodeError {
public:
    using DecodeError::DecodeError;
};

/// A value could not be written as a pickle (a std::string that is not UTF-8: send it as py::Bytes).
class PicklingError : public Error {
public:
    using Error::Error;
};

/// Python's None.
struct None {
    friend bool operator==(None, None) noexcept { return true; }
};

/// Python's bytes: a byte string distinct from str (std::string) and from a list of ints.
struct Bytes {
    std::string data;
    friend bool operator==(const Bytes&, const Bytes&) = default;
};

/// Python's bytearray.
struct ByteArray {
    std::string data;
    friend bool operator==(const ByteArray&, const ByteArray&) = default;
};

/// Bounds on what the reader accepts; what a value beyond them gets is an UnpicklingError.
struct Limits {
    /// Containers inside containers (Python's own pickler stops near 1000).
    std::size_t max_depth = 1000;
    /// Bytes of pickle accepted, and the size a value may reach once its shared references are
    /// counted as copies (each value counts 1, plus the bytes of a str or bytes): a "billion
    /// laughs" pickle of lists that reference one another is refused rather than expanded.
    std::size_t max_size = std::size_t{1} << 30;
};

class Object;

namespace detail {
struct Node;  // a container's items; shared between the Objects (and memo entries) that hold it
}  // namespace detail

/// A read-only view of a tuple, list, set or frozenset's items.
class Items {
public:
    Items() = default;
    std::size_t size() const noexcept;
    bool empty() const noexcept { return size() == 0; }
    const Object* begin() const noexcept;
    const Object* end() const noexcept;
    const Object& operator[](std::size_t i) const;  ///< checked: std::out_of_range

private:
    friend class Object;
    explicit Items(std::shared_ptr<const detail::Node> node) : node_(std::move(node)) {}
    std::shared_ptr<const detail::Node> node_;
};

/// A read-only view of a dict's (key, value) pairs, in insertion order.
class DictItems {
public:
    DictItems() = default;
    std::size_t size() const noexcept;
    bool empty() const noexcept { return size() == 0; }
    const std::pair<Object, Object>* begin() const noexcept;
    const std::pair<Object, Object>* end() const noexcept;
    /// The value stored under a str key, or nullptr.
    const Object* find(std::string_view key) const noexcept;
    const Object* find(const char* key) const noexcept { return find(std::string_view(key)); }
    /// The value stored under key (compared as Object's ==), or nullptr.
    const Object* find(const Object& key) const noexcept;

private:
    friend class Object;
    explicit DictItems(std::shared_ptr<const detail::Node> node) : node_(std::move(node)) {}
    std::shared_ptr<const detail::Node> node_;
};

/// Tag types that say which container an Items view holds, for Object::visit.
struct Tuple : Items {};
struct List : Items {};
struct Set : Items {};
struct FrozenSet : Items {};
struct Dict : DictItems {};

/// A Python value of any of the plain kinds, for data whose shape is not known in advance.
/// Containers are shared, read-only and cheap to copy (a copy shares the items). Build one from
/// C++ values (`Object(3)`, `Object("s")`, `Object::list({1, "a"})`) or read one with py::loads.
///
///     mp::py::Object o = mp::py::loads(data);
///     if (o.kind() == mp::py::Kind::dict)
///         if (auto* n = o.dict().find("count")) total += n->as<int>();
///     o.visit([](const auto& v) { ... });   // None, bool, int64_t, uint64_t, double, std::string,
///                                           // Bytes, ByteArray, Tuple, List, Dict, Set, FrozenSet
class Object {
public:
    enum class Kind { none, boolean, integer, floating, str, bytes, bytearray, tuple, list, dict, set, frozenset };

    Object() noexcept : v_(None{}) {}
    Object(None) noexcept : v_(None{}) {}
    Object(std::nullptr_t) noexcept : v_(None{}) {}
    Object(bool b) noexcept : v_(b) {}
    template <std::integral I>
        requires(!std::same_as<I, bool> && !std::same_as<I, char>)
    Object(I i) noexcept {
        if constexpr (std::is_unsigned_v<I>) {
            if (static_cast<std::uint64_t>(i) > static_cast<std::uint64_t>(std::numeric_limits<std::int64_t>::max()))
                v_ = static_cast<std::uint64_t>(i);
            else
                v_ = static_cast<std::int64_t>(i);
        } else {
            v_ = static_cast<std::int64_t>(i);
        }
    }
    Object(double d) noexcept : v_(d) {}
    Object(float d) noexcept : v_(static_cast<double>(d)) {}
    Object(std::string s) noexcept : v_(std::move(s)) {}
    Object(std::string_view s) : v_(std::string(s)) {}
    Object(const char* s) : v_(std::string(s)) {}
    Object(Bytes b) noexcept : v_(std::move(b)) {}
    Object(ByteArray b) noexcept : v_(std::move(b)) {}

    static Object tuple(std::vector<Object> items);
    static Object list(std::vector<Object> items);
    static Object set(std::vector<Object> items);
    static Object frozenset(std::vector<Object> items);
    static Object dict(std::vector<std::pair<Object, Object>> items);

    Kind kind() const noexcept;
    /// The Python type's name ("int", "str", "dict", ...), for messages.
    const char* type_name() const noexcept;
    bool is_none() const noexcept { return kind() == Kind::none; }

    /// The items of a tuple, list, set or frozenset (UnpicklingError for other kinds).
    Items items() const;
    /// The pairs of a dict (UnpicklingError for other kinds).
    DictItems dict() const;

    /// The value as T (any type the table in this header lists, or with a Convert<T>);
    /// UnpicklingError when it is of another kind or does not fit.
    template <class T>
    T as() const;

    /// Calls f with the value: None, bool, std::int64_t, std::uint64_t (only above INT64_MAX),
    /// double, const std::string&, const Bytes&, const ByteArray&, Tuple, List, Dict, Set, FrozenSet.
    template <class F>
    decltype(auto) visit(F&& f) const;

    /// Same kind and equal values, recursively (1 and 1.0 and True differ, unlike in Python; a
    /// float NaN differs from itself). Integers compare by value whatever alternative holds them.
    friend bool operator==(const Object& a, const Object& b);

    /// Python's repr() of the value, for messages and tests.
    std::string repr() const;

private:
    friend struct detail::Node;
    friend class Reader;
    friend class Writer;
    struct Container {
        Kind kind;
        std::shared_ptr<const detail::Node> node;
    };
    using Value = std::variant<None, bool, std::int64_t, std::uint64_t, double, std::string, Bytes, ByteArray, Container>;
    explicit Object(Container c) noexcept : v_(std::move(c)) {}
    Value v_;
};

using Kind = Object::Kind;

namespace detail {
struct Node {
    std::vector<Object> items;                    // tuple, list, set, frozenset
    std::vector<std::pair<Object, Object>> pairs;  // dict
    std::uint32_t depth = 1;                       // containers on the longest path down, this one included
    bool hashable = true;                          // a tuple or frozenset of hashable items
};
}  // namespace detail

inline std::size_t Items::size() const noexcept { return node_ ? node_->items.size() : 0; }
inline const Object* Items::begin() const noexcept { return node_ ? node_->items.data() : nullptr; }
inline const Object* Items::end() const noexcept { return node_ ? node_->items.data() + node_->items.size() : nullptr; }
inline std::size_t DictItems::size() const noexcept { return node_ ? node_->pairs.size() : 0; }
inline const std::pair<Object, Object>* DictItems::begin() const noexcept {
    return node_ ? node_->pairs.data() : nullptr;
}
inline const std::pair<Object, Object>* DictItems::end() const noexcept {
    return node_ ? node_->pairs.data() + node_->pairs.size() : nullptr;
}

template <class F>
decltype(auto) Object::visit(F&& f) const {
    return std::visit(
        [&](const auto& v) -> decltype(auto) {
            using V = std::decay_t<decltype(v)>;
            if constexpr (std::is_same_v<V, Container>) {
                switch (v.kind) {
                    case Kind::tuple: return std::forward<F>(f)(Tuple{Items(v.node)});
                    case Kind::list: return std::forward<F>(f)(List{Items(v.node)});
                    case Kind::set: return std::forward<F>(f)(Set{Items(v.node)});
                    case Kind::frozenset: return std::forward<F>(f)(FrozenSet{Items(v.node)});
                    default: return std::forward<F>(f)(Dict{DictItems(v.node)});
                }
            } else {
                return std::forward<F>(f)(v);
            }
        },
        v_);
}

/// Writes pickle opcodes (protocol 4). Used by dumps() and by Convert<T> specialisations:
/// a container is begun, its items written one by one, and ended.
class Writer {
public:
    Writer();
    void none();
    void boolean(bool b);
    void integer(std::int64_t i);
    void integer(std::uint64_t i);
    void floating(double d);
    void str(std::string_view s);  ///< PicklingError unless s is UTF-8
    void bytes(std::string_view b);
    void bytearray(std::string_view b);
    void object(const Object& o);
    /// An exception of one of Python's built-in classes (`type` as "KeyError"; also "queue.Empty"
    /// and "queue.Full") raised with the one argument `arg` (None: no arguments), as Python
    /// pickles KeyError('k'): what a manager's '\#ERROR' reply carries. PicklingError for any other
    /// class. (mp's reader refuses these in a value; only the manager client reads them, from an
    /// '\#ERROR' reply.)
    void exception(std::string_view type, const Object& arg);

    /// A tuple of n items: begin_tuple(n), the n items, end_tuple(n).
    void begin_tuple(std::size_t n);
    void end_tuple(std::size_t n);
    /// A list, set or frozenset: begin_X(), the items, end_X().
    void begin_list();
    void end_list();
    void begin_set();
    void end_set();
    void begin_frozenset();
    void end_frozenset();
    /// A dict: begin_dict(), key, value, key, value ..., end_dict().
    void begin_dict();
    void end_dict();

    /// The pickle (PROTO 4, a FRAME, the opcodes, STOP). The writer is empty afterwards.
    std::string finish();

private:
    void op(char c) { out_.push_back(c); }
    void counted(unsigned char op1, unsigned char op4, unsigned char op8, std::string_view data);
    std::string out_;
};

/// Specialise for a type of yours, with `static void dump(Writer&, const T&)` (write it as one
/// value) and `static T load(const Object&)` (read it back, or throw UnpicklingError).
template <class T>
struct Convert {};

namespace detail {

template <class T>
struct is_specialisation_of_optional : std::false_type {};
template <class T>
struct is_specialisation_of_optional<std::optional<T>> : std::true_type {};

template <class T>
concept has_convert = requires(Writer& w, const T& t, const Object& o) {
    Convert<T>::dump(w, t);
    { Convert<T>::load(o) } -> std::same_as<T>;
};

template <class T>
concept string_like = std::is_same_v<T, std::string> || std::is_same_v<T, std::string_view> ||
                      std::is_same_v<T, const char*> || std::is_same_v<T, char*>;

template <class T>
concept tuple_like = requires { std::tuple_size<T>::value; } && !requires(T t) { t.begin(); };

template <class T>
concept map_like = requires(T t) {
    typename T::key_type;
    typename T::mapped_type;
    t.begin();
};

template <class T>
concept set_like = requires(T t) {
    typename T::key_type;
    t.begin();
} && !map_like<T>;

template <class T>
concept sequence_like = requires(T t) {
    typename T::value_type;
    t.begin();
    t.end();
} && !map_like<T> && !set_like<T> && !string_like<T>;

// An aggregate's field count, by brace-initialising it from n "anything" values.
struct any_field {
    template <class T>
    operator T() const;  // never defined: only used in unevaluated contexts
};
template <class T, class... A>
concept brace_constructible = requires { T{std::declval<A>()...}; };
template <class T, class... A>
constexpr std::size_t field_count() {
    if constexpr (sizeof...(A) > 16)
        return 17;
    else if constexpr (brace_constructible<T, A..., any_field>)
        return field_count<T, A..., any_field>();
    else
        return sizeof...(A);
}

template <class T>
concept plain_aggregate = std::is_aggregate_v<T> && std::is_class_v<T> && !std::is_array_v<T> &&
                          !tuple_like<T> && field_count<T>() >= 1 && field_count<T>() <= 16;

// The fields of an aggregate as a tuple of references (or of const references).
template <class T, class F>
decltype(auto) with_fields(T& t, F&& f) {
    constexpr std::size_t n = field_count<std::remove_const_t<T>>();
    // clang-format off
    if constexpr (n == 1) { auto& [a] = t; return f(a); }
    else if constexpr (n == 2) { auto& [a, b] = t; return f(a, b); }
    else if constexpr (n == 3) { auto& [a, b, c] = t; return f(a, b, c); }
    else if constexpr (n == 4) { auto& [a, b, c, d] = t; return f(a, b, c, d); }
    else if constexpr (n == 5) { auto& [a, b, c, d, e] = t; return f(a, b, c, d, e); }
    else if constexpr (n == 6) { auto& [a, b, c, d, e, g] = t; return f(a, b, c, d, e, g); }
    else if constexpr (n == 7) { auto& [a, b, c, d, e, g, h] = t; return f(a, b, c, d, e, g, h); }
    else if constexpr (n == 8) { auto& [a, b, c, d, e, g, h, i] = t; return f(a, b, c, d, e, g, h, i); }
    else if constexpr (n == 9) { auto& [a, b, c, d, e, g, h, i, j] = t; return f(a, b, c, d, e, g, h, i, j); }
    else if constexpr (n == 10) { auto& [a, b, c, d, e, g, h, i, j, k] = t; return f(a, b, c, d, e, g, h, i, j, k); }
    else if constexpr (n == 11) { auto& [a, b, c, d, e, g, h, i, j, k, l] = t; return f(a, b, c, d, e, g, h, i, j, k, l); }
    else if constexpr (n == 12) { auto& [a, b, c, d, e, g, h, i, j, k, l, m] = t; return f(a, b, c, d, e, g, h, i, j, k, l, m); }
    else if constexpr (n == 13) { auto& [a, b, c, d, e, g, h, i, j, k, l, m, o] = t; return f(a, b, c, d, e, g, h, i, j, k, l, m, o); }
    else if constexpr (n == 14) { auto& [a, b, c, d, e, g, h, i, j, k, l, m, o, p] = t; return f(a, b, c, d, e, g, h, i, j, k, l, m, o, p); }
    else if constexpr (n == 15) { auto& [a, b, c, d, e, g, h, i, j, k, l, m, o, p, q] = t; return f(a, b, c, d, e, g, h, i, j, k, l, m, o, p, q); }
    else { auto& [a, b, c, d, e, g, h, i, j, k, l, m, o, p, q, r] = t; return f(a, b, c, d, e, g, h, i, j, k, l, m, o, p, q, r); }
    // clang-format on
}

template <class T>
inline constexpr bool dependent_false = false;

// ---- a dict read into a sequence of pairs (the flat form: one allocation, insertion order) ----

template <class T>
struct is_pair : std::false_type {};
template <class A, class B>
struct is_pair<std::pair<A, B>> : std::true_type {};

// A key type whose equal values hash alike (key_hash below), so a dict read as pairs can merge
// repeated keys in linear time whatever the input.
template <class K>
struct hashable_key
    : std::bool_constant<std::is_same_v<K, None> || std::is_same_v<K, std::monostate> ||
                         std::is_same_v<K, std::nullptr_t> || (std::is_arithmetic_v<K> && !std::is_same_v<K, char>) ||
                         std::is_same_v<K, std::string> || std::is_same_v<K, Bytes> || std::is_same_v<K, ByteArray>> {};
template <class K>
struct hashable_key<std::optional<K>> : hashable_key<K> {};
template <class... A>
struct hashable_key<std::tuple<A...>> : std::bool_constant<(hashable_key<A>::value && ...)> {};
template <class A, class B>
struct hashable_key<std::pair<A, B>> : std::bool_constant<hashable_key<A>::value && hashable_key<B>::value> {};
template <class K>
    requires(set_like<K> || (sequence_like<K> && !tuple_like<K>))
struct hashable_key<K> : hashable_key<typename K::value_type> {};

// std::vector<std::pair<K, V>> and the like: what a dict reads into as its items, in order.
template <class T>
concept pair_sequence = sequence_like<T> && is_pair<typename T::value_type>::value &&
                        hashable_key<typename T::value_type::first_type>::value &&
                        std::is_move_assignable_v<typename T::value_type> && requires(T t, std::size_t i) {
                            t[i];
                            t.emplace_back();
                            t.pop_back();
                            t.resize(i);
                        };

// The seed of key_hash, drawn from the kernel once per process: which keys share a slot of
// merge_repeated_keys's table cannot be chosen by whoever wrote the pickle (no hash flooding).
std::uint64_t key_hash_seed() noexcept;

inline std::uint64_t hash_fmix(std::uint64_t x) noexcept {  // MurmurHash3's finaliser: a bijection
    x ^= x >> 33;
    x *= 0xff51afd7ed558ccdu;
    x ^= x >> 33;
    x *= 0xc4ceb9fe1a85ec53u;
    return x ^ (x >> 33);
}
// N bytes at p as a number in the machine's byte order (one load).
template <std::size_t N>
std::uint64_t load_word(const unsigned char* p) noexcept {
    std::conditional_t<N == 8, std::uint64_t, std::uint32_t> w;
    std::memcpy(&w, p, N);
    return w;
}
// The last 1 to 8 bytes at p as one word (overlapping loads, which see each of them): for a
// given n, distinct bytes give distinct words.
inline std::uint64_t tail_word(const unsigned char* p, std::size_t n) noexcept {
    if (n >= 4) return load_word<4>(p) | (load_word<4>(p + n - 4) << 32);
    if (n > 0) return p[0] | (std::uint64_t{p[n / 2]} << 8) | (std::uint64_t{p[n - 1]} << 16);
    return 0;
}
// A std::string of the `size` bytes at `at`, for a pair's piecewise constructor or an emplace:
// as std::string(at, size), but when a short string's worth of bytes from `at` can be read
// (`readable`; the reader's input goes on past a key), the string is made from 15 of them and cut
// to size. A copy of constant length is inlined by the compiler; one of a length known only at
// run time is a call to memcpy, which costs more than copying a short key. Made in place,
// through the conversion (guaranteed copy elision).
struct ShortString {
    static constexpr std::size_t kShort = 15;  // fits the small-string buffer of libstdc++, libc++ and MSVC
    const char* at;
    std::size_t size;
    std::size_t readable;
    operator std::string() const { return size <= kShort && readable >= kShort ? cut() : whole(); }
    std::string cut() const {
        std::string s(at, kShort);
        s.resize(size);
        return s;
    }
    // Out of line: kept out of every emplace_back that inlines the short case.
    [[gnu::noinline]] std::string whole() const { return std::string(at, size); }
};
inline std::uint64_t hash_bytes(std::uint64_t h, std::string_view s) noexcept {
    const auto* p = reinterpret_cast<const unsigned char*>(s.data());
    std::size_t n = s.size();
    h += n;
    for (; n > 8; p += 8, n -= 8) h = hash_fmix(h ^ load_word<8>(p));
    return hash_fmix(h ^ tail_word(p, n));
}

// A key's hash under the seed, its bits well mixed; equal keys (by K's ==) hash alike: -0.0 as
// 0.0, a set whatever its iteration order.
template <class K>
std::uint64_t key_hash(std::uint64_t seed, const K& k) noexcept {
    if constexpr (std::is_same_v<K, std::string>) {
        return hash_bytes(seed, k);
    } else if constexpr (std::is_same_v<K, Bytes> || std::is_same_v<K, ByteArray>) {
        return hash_bytes(seed, k.data);
    } else if constexpr (std::is_floating_point_v<K>) {
        return hash_fmix(seed ^ (k == 0 ? 0 : std::bit_cast<std::uint64_t>(static_cast<double>(k))));
    } else if constexpr (std::is_arithmetic_v<K>) {
        return hash_fmix(seed ^ static_cast<std::uint64_t>(k));
    } else if constexpr (is_specialisation_of_optional<K>::value) {
        return k ? hash_fmix(key_hash(seed, *k) + 1) : seed;
    } else if constexpr (tuple_like<K>) {
        return std::apply([&](const auto&... e) {
            std::uint64_t h = seed;
            ((h = hash_fmix(h ^ key_hash(seed, e))), ...);
            return h;
        }, k);
    } else if constexpr (set_like<K>) {
        std::uint64_t h = seed;
        for (const auto& e : k) h += key_hash(seed, e);
        return hash_fmix(h);
    } else if constexpr (sequence_like<K>) {
        std::uint64_t h = seed;
        for (const auto& e : k) h = hash_fmix(h ^ key_hash(seed, e));
        return h;
    } else {
        return seed;  // None: every key of the type is equal
    }
}

// What merge_repeated_keys_small compares before the keys themselves: equal keys give equal
// fingerprints. A str or bytes key of up to 8 bytes is told from another of its length by its
// word alone; longer ones by their first and last 8 bytes. No seed: the small merge bounds its
// comparisons by the number of pairs, not by how the fingerprints spread. Taken to 16 bits (the
// top of a multiplicative hash): what the small merge compares.
inline std::uint64_t key_word(const unsigned char* p, std::size_t n) noexcept {  // up to 8 bytes: all of them
    return n <= 8 ? tail_word(p, n) : load_word<8>(p) ^ (load_word<8>(p + n - 8) * 0x9e3779b97f4a7c15u);
}
inline std::int16_t word_fingerprint(std::uint64_t key_word, std::size_t n) noexcept {
    return static_cast<std::int16_t>(((key_word ^ (n * 0xc2b2ae3d27d4eb4fu)) * 0x9e3779b97f4a7c15u) >> 48);
}
inline std::int16_t bytes_fingerprint(std::string_view s) noexcept {
    return word_fingerprint(key_word(reinterpret_cast<const unsigned char*>(s.data()), s.size()), s.size());
}
template <class K>
std::int16_t key_fingerprint(const K& k) noexcept {
    if constexpr (std::is_same_v<K, std::string>)
        return bytes_fingerprint(k);
    else if constexpr (std::is_same_v<K, Bytes> || std::is_same_v<K, ByteArray>)
        return bytes_fingerprint(k.data);
    else
        return static_cast<std::int16_t>((key_hash(0, k) * 0x9e3779b97f4a7c15u) >> 48);
}

// The pairs a Python dict keeps when a pickle sets a key twice (Python's pickler never writes
// that; a crafted or hand-written pickle can): the key stays where it first appeared and takes
// the last value. Linear in the number of pairs: an open-addressing table of indices; a small
// dict (the common message) takes merge_repeated_keys_small instead, which costs less than
// hashing every key and filling a table.
inline constexpr std::size_t kSmallMerge = 16;
using SmallFingerprints = std::array<std::int16_t, kSmallMerge>;

// merge_repeated_keys for up to kSmallMerge pairs, given fp[i] == key_fingerprint(pairs[i].first)
// (a reader computes them from the input as it goes). First, whether any two keys may be equal:
// every fingerprint against all of them at once, 8 to a vector (GCC's and Clang's vector
// extension; SSE2 on x86-64), a fixed amount of work per key with no branch on the data. A plain
// double loop over the pairs costs more than all the reading of the message: 45 compares and a
// mispredicted exit per key for 10 keys. Only when two fingerprints are equal are keys compared.
template <class Seq>
void merge_repeated_keys_small(Seq& pairs, SmallFingerprints& fp) {
    using Lanes = std::int16_t __attribute__((vector_size(16)));
    static_assert(kSmallMerge == 2 * sizeof(Lanes) / sizeof(std::int16_t));
    const std::size_t n = pairs.size();
    Lanes low, high;
    std::memcpy(&low, fp.data(), sizeof low);
    std::memcpy(&high, fp.data() + kSmallMerge / 2, sizeof high);
    // The lanes past n hold the first key's fingerprint: then when the n fingerprints are
    // distinct, the first key matches itself and the kSmallMerge - n copies, every other key
    // only itself, kSmallMerge matches in all; any two equal fingerprints make more.
    const Lanes lane = {0, 1, 2, 3, 4, 5, 6, 7}, count = Lanes{} + static_cast<std::int16_t>(n);
    const Lanes first = Lanes{} + fp[0];
    low = lane < count ? low : first;
    high = lane + 8 < count ? high : first;
    Lanes matches = {};  // -1 per equal pair of fingerprints (a true compare is all ones)
    for (std::size_t i = 0; i < n; ++i) {
        const Lanes key = Lanes{} + fp[i];
        matches += (low == key) + (high == key);
    }
    int total = 0;
    for (int l = 0; l < 8; ++l) total += matches[l];
    if (total == -static_cast<int>(kSmallMerge)) return;  // each key matched only itself
    auto kept_equal = [&](std::size_t kept, std::size_t i) {  // the first of [0, kept) whose key is i's, or kept
        for (std::size_t j = 0; j < kept; ++j)
            if (fp[j] == fp[i] && pairs[j].first == pairs[i].first) return j;
        return kept;
    };
    std::size_t first_repeat = 1;
    while (first_repeat < n && kept_equal(first_repeat, first_repeat) == first_repeat) ++first_repeat;
    if (first_repeat == n) return;
    // From the first repeat on, [0, out) holds the pairs kept so far, each key once.
    std::size_t out = first_repeat;
    for (std::size_t i = first_repeat; i < n; ++i) {
        const std::size_t j = kept_equal(out, i);
        if (j != out) {
            pairs[j].second = std::move(pairs[i].second);
            continue;
        }
        if (out != i) {
            pairs[out] = std::move(pairs[i]);
            fp[out] = fp[i];
        }
        ++out;
    }
    pairs.resize(out);
}

template <class Seq>
void merge_repeated_keys(Seq& pairs) {
    const std::size_t n = pairs.size();
    if (n < 2) return;
    if (n <= kSmallMerge) {
        SmallFingerprints fp{};  // the lanes past the pairs are read (and not used)
        for (std::size_t i = 0; i < n; ++i) fp[i] = key_fingerprint(pairs[i].first);
        merge_repeated_keys_small(pairs, fp);
        return;
    }
    const int bits = static_cast<int>(std::bit_width(2 * n - 1));  // 2n slots or more: short probes
    const std::size_t mask = (std::size_t{1} << bits) - 1;
    // slot: 1 + the index of a pair kept so far, or 0. The keys' hashes are all computed first
    // (independent of one another, so they overlap in the CPU) and compared before the keys
    // are. A small dict keeps both on the stack.
    std::array<std::uint32_t, 64> small_slots;
    std::array<std::uint64_t, 32> small_hashes;
    std::vector<std::uint32_t> big_slots;
    std::vector<std::uint64_t> big_hashes;
    std::uint32_t* slots = small_slots.data();
    std::uint64_t* hashes = small_hashes.data();
    if (mask < small_slots.size()) {
        std::fill_n(slots, mask + 1, 0u);
    } else {
        big_slots.assign(mask + 1, 0);
        big_hashes.resize(n);
        slots = big_slots.data();
        hashes = big_hashes.data();
    }
    const std::uint64_t seed = key_hash_seed();
    for (std::size_t i = 0; i < n; ++i) hashes[i] = key_hash(seed, pairs[i].first);
    bool merged = false;
    std::vector<bool> dropped;
    for (std::size_t i = 0; i < n; ++i) {
        const std::uint64_t h = hashes[i];
        for (std::size_t s = static_cast<std::size_t>(h >> (64 - bits));; s = (s + 1) & mask) {
            if (slots[s] == 0) {
                slots[s] = static_cast<std::uint32_t>(i + 1);
                break;
            }
            const std::size_t k = slots[s] - 1;
            if (hashes[k] == h && pairs[k].first == pairs[i].first) {
                pairs[k].second = std::move(pairs[i].second);
                if (!merged) dropped.assign(n, false);
                merged = true;
                dropped[i] = true;
                break;
            }
        }
    }
    if (!merged) return;
    std::size_t out = 0;
    for (std::size_t i = 0; i < n; ++i)
        if (!dropped[i]) {
            if (out != i) pairs[out] = std::move(pairs[i]);
            ++out;
        }
    pairs.resize(out);
}

[[noreturn]] void wrong_kind(const Object& o, const char* wanted);
[[noreturn]] void wrong_length(const Object& o, std::size_t wanted);
[[noreturn]] void out_of_range(const Object& o, const char* type);

// Whether a Python float converts to T without overflow (a float's range is narrower than a
// double's; converting a finite value out of range is undefined): NaN and infinities do.
template <class T>
bool fits_floating(double d) noexcept {
    if constexpr (sizeof(T) >= sizeof(double))
        return true;
    else
        return !std::isfinite(d) || std::fabs(d) <= static_cast<double>(std::numeric_limits<T>::max());
}

template <class T>
void dump(Writer& w, const T& v) {
    if constexpr (has_convert<T>) {
        Convert<T>::dump(w, v);
    } else if constexpr (std::is_same_v<T, Object>) {
        w.object(v);
    } else if constexpr (std::is_same_v<T, None> || std::is_same_v<T, std::nullopt_t> ||
                         std::is_same_v<T, std::monostate> || std::is_same_v<T, std::nullptr_t>) {
        w.none();
    } else if constexpr (std::is_same_v<T, bool>) {
        w.boolean(v);
    } else if constexpr (std::is_integral_v<T> && !std::is_same_v<T, char>) {
        if constexpr (std::is_signed_v<T>)
            w.integer(static_cast<std::int64_t>(v));
        else
            w.integer(static_cast<std::uint64_t>(v));
    } else if constexpr (std::is_floating_point_v<T>) {
        w.floating(static_cast<double>(v));
    } else if constexpr (string_like<T>) {
        w.str(std::string_view(v));
    } else if constexpr (std::is_array_v<T> && std::is_same_v<std::remove_extent_t<T>, char>) {
        w.str(std::string_view(v));  // a string literal
    } else if constexpr (std::is_same_v<T, Bytes>) {
        w.bytes(v.data);
    } else if constexpr (std::is_same_v<T, ByteArray>) {
        w.bytearray(v.data);
    } else if constexpr (is_specialisation_of_optional<T>::value) {
        if (v)
            dump(w, *v);
        else
            w.none();
    } else if constexpr (tuple_like<T>) {
        w.begin_tuple(std::tuple_size_v<T>);
        std::apply([&](const auto&... e) { (dump(w, e), ...); }, v);
        w.end_tuple(std::tuple_size_v<T>);
    } else if constexpr (map_like<T>) {
        w.begin_dict();
        for (const auto& [key, value] : v) {
            dump(w, key);
            dump(w, value);
        }
        w.end_dict();
    } else if constexpr (set_like<T>) {
        w.begin_set();
        for (const auto& e : v) dump(w, e);
        w.end_set();
    } else if constexpr (sequence_like<T>) {
        w.begin_list();
        for (const auto& e : v) dump(w, e);
        w.end_list();
    } else if constexpr (plain_aggregate<T>) {
        constexpr std::size_t n = field_count<T>();
        w.begin_tuple(n);
        with_fields(v, [&](const auto&... f) { (dump(w, f), ...); });
        w.end_tuple(n);
    } else {
        static_assert(dependent_false<T>,
                      "mp::py: this type has no pickle form. Use one of the types listed in mp/py.hpp "
                      "(numbers, std::string, py::Bytes, std containers, std::tuple/pair/optional, "
                      "plain structs of up to 16 fields, py::Object) or specialise mp::py::Convert<T>.");
    }
}

template <class T>
T load(const Object& o);

template <class T, std::size_t... I>
T load_tuple(const Items& items, std::index_sequence<I...>) {
    return T{load<std::tuple_element_t<I, T>>(items[I])...};
}

template <class T>
T load(const Object& o) {
    if constexpr (has_convert<T>) {
        return Convert<T>::load(o);
    } else if constexpr (std::is_same_v<T, Object>) {
        return o;
    } else if constexpr (std::is_same_v<T, None> || std::is_same_v<T, std::monostate> ||
                         std::is_same_v<T, std::nullptr_t>) {
        if (!o.is_none()) wrong_kind(o, "None");
        return T{};
    } else if constexpr (std::is_same_v<T, bool>) {
        if (o.kind() != Kind::boolean) wrong_kind(o, "bool");
        return o.visit([](const auto& v) -> bool {
            if constexpr (std::is_same_v<std::decay_t<decltype(v)>, bool>) return v;
            return false;
        });
    } else if constexpr (std::is_integral_v<T> && !std::is_same_v<T, char>) {
        if (o.kind() != Kind::integer) wrong_kind(o, "int");
        return o.visit([&](const auto& v) -> T {
            using V = std::decay_t<decltype(v)>;
            if constexpr (std::is_same_v<V, std::int64_t> || std::is_same_v<V, std::uint64_t>) {
                if (!std::in_range<T>(v)) out_of_range(o, "the C++ integer type");
                return static_cast<T>(v);
            }
            return T{};
        });
    } else if constexpr (std::is_floating_point_v<T>) {
        return o.visit([&](const auto& v) -> T {
            using V = std::decay_t<decltype(v)>;
            if constexpr (std::is_same_v<V, double>) {
                if (!fits_floating<T>(v)) out_of_range(o, "the C++ floating type");
                return static_cast<T>(v);
            } else if constexpr (std::is_same_v<V, std::int64_t> || std::is_same_v<V, std::uint64_t>) {
                return static_cast<T>(v);
            }
            wrong_kind(o, "float");
        });
    } else if constexpr (std::is_same_v<T, std::string>) {
        return o.visit([&](const auto& v) -> std::string {
            if constexpr (std::is_same_v<std::decay_t<decltype(v)>, std::string>) return v;
            wrong_kind(o, "str");
        });
    } else if constexpr (std::is_same_v<T, Bytes> || std::is_same_v<T, ByteArray>) {
        return o.visit([&](const auto& v) -> T {
            using V = std::decay_t<decltype(v)>;
            if constexpr (std::is_same_v<V, Bytes> || std::is_same_v<V, ByteArray>) return T{v.data};
            wrong_kind(o, std::is_same_v<T, Bytes> ? "bytes" : "bytearray");
        });
    } else if constexpr (is_specialisation_of_optional<T>::value) {
        if (o.is_none()) return T{};
        return T{load<typename T::value_type>(o)};
    } else if constexpr (tuple_like<T>) {
        constexpr std::size_t n = std::tuple_size_v<T>;
        if (o.kind() != Kind::tuple && o.kind() != Kind::list) wrong_kind(o, "tuple");
        Items items = o.items();
        if (items.size() != n) wrong_length(o, n);
        return load_tuple<T>(items, std::make_index_sequence<n>{});
    } else if constexpr (map_like<T>) {
        if (o.kind() != Kind::dict) wrong_kind(o, "dict");
        T out;
        for (const auto& [key, value] : o.dict())
            out.insert_or_assign(load<typename T::key_type>(key), load<typename T::mapped_type>(value));
        return out;
    } else if constexpr (set_like<T>) {
        if (o.kind() != Kind::set && o.kind() != Kind::frozenset) wrong_kind(o, "set");
        T out;
        for (const auto& e : o.items()) out.insert(load<typename T::key_type>(e));
        return out;
    } else if constexpr (sequence_like<T> && requires(T t) { t.push_back(std::declval<typename T::value_type>()); }) {
        if constexpr (pair_sequence<T>) {
            if (o.kind() == Kind::dict) {
                T out;
                const DictItems pairs = o.dict();
                if constexpr (requires(T t) { t.reserve(std::size_t{}); }) out.reserve(pairs.size());
                for (const auto& [key, value] : pairs)
                    out.emplace_back(load<typename T::value_type::first_type>(key),
                                     load<typename T::value_type::second_type>(value));
                merge_repeated_keys(out);
                return out;
            }
        }
        if (o.kind() != Kind::list && o.kind() != Kind::tuple) wrong_kind(o, "list");
        T out;
        Items items = o.items();
        if constexpr (requires(T t) { t.reserve(std::size_t{}); }) out.reserve(items.size());
        for (const auto& e : items) out.push_back(load<typename T::value_type>(e));
        return out;
    } else if constexpr (plain_aggregate<T> && std::is_default_constructible_v<T>) {
        constexpr std::size_t n = field_count<T>();
        if (o.kind() != Kind::tuple && o.kind() != Kind::list) wrong_kind(o, "tuple");
        Items items = o.items();
        if (items.size() != n) wrong_length(o, n);
        T out{};
        with_fields(out, [&](auto&... f) {
            std::size_t i = 0;
            ((f = load<std::remove_cvref_t<decltype(f)>>(items[i++])), ...);
        });
        return out;
    } else {
        static_assert(dependent_false<T>,
                      "mp::py: this type cannot be read from a pickle. Use one of the types listed in "
                      "mp/py.hpp (numbers, std::string, py::Bytes, std containers, std::tuple/pair/"
                      "optional, default-constructible plain structs of up to 16 fields, py::Object) or "
                      "specialise mp::py::Convert<T>.");
        std::terminate();  // never compiled: only so that the assertion is the one error reported
    }
}

}  // namespace detail

template <class T>
T Object::as() const {
    return detail::load<T>(*this);
}

namespace detail {

bool valid_utf8(std::string_view s) noexcept;

template <class T>
concept none_like = std::is_same_v<T, None> || std::is_same_v<T, std::monostate> || std::is_same_v<T, std::nullptr_t>;

// The types loads<T> reads straight from the pickle, without building an Object first.
template <class T>
struct fast_readable : std::false_type {};
template <class T>
inline constexpr bool fast_readable_v = !has_convert<T> && fast_readable<T>::value;
template <class T>
    requires(none_like<T> || std::is_arithmetic_v<T> || std::is_same_v<T, std::string> || std::is_same_v<T, Bytes> ||
             std::is_same_v<T, ByteArray>)
struct fast_readable<T> : std::bool_constant<!std::is_same_v<T, char>> {};
template <class T>
struct fast_readable<std::optional<T>> : std::bool_constant<fast_readable_v<T>> {};
template <class T>
    requires(map_like<T>)
struct fast_readable<T>
    : std::bool_constant<fast_readable_v<typename T::key_type> && fast_readable_v<typename T::mapped_type> &&
                         requires(T t, typename T::key_type k, typename T::mapped_type v) {
                             t.insert_or_assign(std::move(k), std::move(v));
                         }> {};
template <class T>
    requires(set_like<T>)
struct fast_readable<T> : std::bool_constant<fast_readable_v<typename T::key_type>> {};
template <class T>
    requires(sequence_like<T> && !tuple_like<T>)
struct fast_readable<T>
    : std::bool_constant<fast_readable_v<typename T::value_type> &&
                         requires(T t) { t.push_back(std::declval<typename T::value_type>()); }> {};
template <class... A>
struct fast_readable<std::tuple<A...>> : std::bool_constant<(fast_readable_v<A> && ...)> {};
template <class A, class B>
struct fast_readable<std::pair<A, B>> : std::bool_constant<fast_readable_v<A> && fast_readable_v<B>> {};

// loads<T>'s fast path: a recursive-descent reader of the opcode sequences Python's pickler
// writes for data of T's shape, straight into T. It reads a subset of what the stack machine in
// py_pickle.cpp reads and answers false for anything outside it (a shared container, a protocol 2
// set, a value of another kind, ...): loads<T> then runs the full reader, which gives the value or
// the precise error. So this reader never has to explain a refusal; it only must never accept what
// the full reader refuses, or read a different value. Its bounds are the full reader's: input
// size, nesting depth, and str/bytes copies through the memo, counted as that reader counts them.
class FastReader {
public:
    FastReader(std::string_view in, const Limits& limits) noexcept
        : begin_(reinterpret_cast<const unsigned char*>(in.data())), p_(begin_), end_(begin_ + in.size()),
          limits_(limits) {}

    // The whole pickle as one T, through STOP and the end of the input.
    template <class T>
    bool top(T& out) {
        if (static_cast<std::size_t>(end_ - begin_) > limits_.max_size) return false;
        if (peek() == PROTO) {
            if (end_ - p_ < 2 || p_[1] > 5) return false;
            p_ += 2;
        }
        if (!value(out, 0, false)) return false;
        return next() == STOP && p_ == end_;
    }

private:
    enum : unsigned char {
        MARK = '(', STOP = '.', BININT = 'J', BININT1 = 'K', BININT2 = 'M', NONE = 'N', BINBYTES = 'B',
        SHORT_BINBYTES = 'C', BINUNICODE = 'X', APPEND = 'a', EMPTY_DICT = '}', APPENDS = 'e', BINGET = 'h',
        LONG_BINGET = 'j', EMPTY_LIST = ']', BINPUT = 'q', LONG_BINPUT = 'r', SETITEM = 's', TUPLE = 't',
        EMPTY_TUPLE = ')', SETITEMS = 'u', BINFLOAT = 'G', PROTO = 0x80, TUPLE1 = 0x85, NEWTRUE = 0x88,
        NEWFALSE = 0x89, LONG1 = 0x8a, SHORT_BINUNICODE = 0x8c, BINUNICODE8 = 0x8d, BINBYTES8 = 0x8e,
        EMPTY_SET = 0x8f, ADDITEMS = 0x90, FROZENSET = 0x91, MEMOIZE = 0x94, FRAME = 0x95, BYTEARRAY8 = 0x96,
    };
    static constexpr std::size_t kContainer = ~std::size_t{0};

    // Memo entries: where the scalar filed under each index starts (GET reads it again from
    // there), or kContainer (GET of a container means sharing, which only the full reader handles).
    // Small messages keep their memo on the stack.
    struct Memo {
        static constexpr std::size_t kInline = 48;
        std::size_t n = 0;
        std::array<std::size_t, kInline> small;
        std::vector<std::size_t> big;
        void push(std::size_t at) {
            if (n < kInline) [[likely]]
                small[n] = at;
            else
                push_big(at);
            ++n;
        }
        [[gnu::noinline]] void push_big(std::size_t at) { big.push_back(at); }
        std::size_t get(std::size_t i) const { return i < kInline ? small[i] : big[i - kInline]; }
        void truncate(std::size_t m) {
            if (m < n && n > kInline) big.resize(m > kInline ? m - kInline : 0);
            n = m;
        }
    };

    // A FRAME only groups opcodes and the input is all here; its length must still fit. A frame
    // that does not fit is not stepped over: every later look at the input refuses it again.
    bool skip_frames() {
        while (p_ < end_ && *p_ == FRAME) {
            if (end_ - p_ < 9) return false;
            std::uint64_t n = 0;
            for (int i = 8; i >= 1; --i) n = (n << 8) | p_[i];
            if (n > static_cast<std::uint64_t>(end_ - p_ - 9)) return false;
            p_ += 9;
        }
        return true;
    }
    int peek() {
        if (p_ != end_ && *p_ != FRAME) [[likely]]
            return *p_;
        if (!skip_frames() || p_ == end_) return -1;
        return *p_;
    }
    int next() {
        int op = peek();
        if (op >= 0) ++p_;
        return op;
    }
    static std::uint64_t le(const unsigned char* q, int n) {
        std::uint64_t v = 0;
        for (int i = n; i-- > 0;) v = (v << 8) | q[i];
        return v;
    }
    // Whether s is all ASCII (then valid UTF-8): a word at a time, overlapping at the end.
    static bool ascii(std::string_view s) {
        const auto* q = reinterpret_cast<const unsigned char*>(s.data());
        const std::size_t n = s.size();
        std::uint64_t any = 0;
        if (n >= 8) {
            for (std::size_t i = 0; i + 8 <= n; i += 8) any |= load_word<8>(q + i);
            any |= load_word<8>(q + n - 8);
        } else if (n >= 4) {
            any = load_word<4>(q) | load_word<4>(q + n - 4);
        } else {
            for (std::size_t i = 0; i < n; ++i) any |= q[i];
        }
        return (any & 0x8080808080808080u) == 0;
    }
    // A counted str or bytes at q (its opcode already read): its bytes, or false.
    [[gnu::always_inline]] bool counted(const unsigned char*& q, int width, std::string_view& out) const {
        if (end_ - q < width) return false;
        const std::uint64_t n = le(q, width);
        q += width;
        if (n > static_cast<std::uint64_t>(end_ - q)) return false;
        out = std::string_view(reinterpret_cast<const char*>(q), static_cast<std::size_t>(n));
        q += n;
        return true;
    }
    bool count_copy(std::size_t n) {
        copied_ += n;
        return copied_ <= limits_.max_size;
    }

    // An int opcode at q (already read): its value, within int64.
    [[gnu::always_inline]] bool integer(int op, const unsigned char*& q, std::int64_t& v) const {
        if (op == BININT1 && q != end_) [[likely]] {  // what Python writes for 0 to 255
            v = *q++;
            return true;
        }
        int n;
        switch (op) {
            case BININT1: n = 1; break;
            case BININT2: n = 2; break;
            case BININT: n = 4; break;
            case LONG1:
                if (q == end_) return false;
                n = *q++;
                if (n > 8) return false;  // past 64 bits, or an unsigned 64-bit value: the full reader
                break;
            default: return false;
        }
        if (end_ - q < n) return false;
        std::uint64_t u = le(q, n);
        q += n;
        if (op == BININT) {
            v = static_cast<std::int32_t>(static_cast<std::uint32_t>(u));
        } else if (op == LONG1 && n > 0 && n < 8 && (u >> (8 * n - 1)) != 0) {
            v = static_cast<std::int64_t>(u | (~std::uint64_t{0} << (8 * n)));  // sign-extend
        } else {
            v = static_cast<std::int64_t>(u);
        }
        return true;
    }

    // A scalar whose opcode starts at q; len gets the bytes a memo copy of it counts.
    template <class T>
    [[gnu::always_inline]] bool scalar(const unsigned char*& q, T& out, std::size_t& len, bool key) const {
        if (q == end_) return false;
        const int op = *q++;
        if constexpr (none_like<T>) {
            return op == NONE;
        } else if constexpr (is_specialisation_of_optional<T>::value) {
            if (op == NONE) {
                out.reset();
                return true;
            }
            --q;
            typename T::value_type v{};
            if (!scalar(q, v, len, key)) return false;
            out = std::move(v);
            return true;
        } else if constexpr (std::is_same_v<T, bool>) {
            if (op != NEWTRUE && op != NEWFALSE) return false;
            out = op == NEWTRUE;
            return true;
        } else if constexpr (std::is_integral_v<T>) {
            std::int64_t v;
            if (!integer(op, q, v) || !std::in_range<T>(v)) return false;
            out = static_cast<T>(v);
            return true;
        } else if constexpr (std::is_floating_point_v<T>) {
            if (op == BINFLOAT) {
                if (end_ - q < 8) return false;
                std::uint64_t bits = 0;
                for (int i = 0; i < 8; ++i) bits = (bits << 8) | q[i];
                q += 8;
                const double d = std::bit_cast<double>(bits);
                if (!fits_floating<T>(d)) return false;  // the full reader says why
                out = static_cast<T>(d);
                return true;
            }
            std::int64_t v;
            if (!integer(op, q, v)) return false;
            out = static_cast<T>(v);
            return true;
        } else if constexpr (std::is_same_v<T, std::string>) {
            std::string_view s;
            const int width = op == SHORT_BINUNICODE ? 1 : op == BINUNICODE ? 4 : op == BINUNICODE8 ? 8 : 0;
            if (width == 0 || !counted(q, width, s)) return false;
            if (!ascii(s) && !valid_utf8(s)) return false;
            out.clear();
            out.append(s);  // the string is new or cleared: append is assign's work without its case analysis
            len = s.size();
            return true;
        } else {
            static_assert(std::is_same_v<T, Bytes> || std::is_same_v<T, ByteArray>);
            std::string_view s;
            // A bytearray is no dict key or set item (unhashable): the full reader refuses it there.
            const int width = op == SHORT_BINBYTES ? 1 : op == BINBYTES ? 4 : op == BINBYTES8 ? 8
                              : (op == BYTEARRAY8 && !key) ? 8 : 0;
            if (width == 0 || !counted(q, width, s)) return false;
            out.data.assign(s);
            len = s.size();
            return true;
        }
    }

    // MEMOIZE / BINPUT / LONG_BINPUT after a value starting at `at` (kContainer for a container).
    bool memo_after(std::size_t at, std::size_t len) {
        for (;;) {
            const int op = peek();
            std::uint64_t index;
            if (op != MEMOIZE && op != BINPUT && op != LONG_BINPUT) [[likely]]
                return true;
            if (op == MEMOIZE) {
                index = memo_.n;
                p_ += 1;
            } else if (op == BINPUT || op == LONG_BINPUT) {
                const int width = op == BINPUT ? 1 : 4;
                if (end_ - p_ < 1 + width) return false;
                index = le(p_ + 1, width);
                p_ += 1 + width;
            } else {
                return true;
            }
            // Python's pickler files each value once, under the next index; anything else is
            // the full reader's to handle.
            if (index != memo_.n) return false;
            memo_.push(at);
            if (at != kContainer && !count_copy(len)) return false;
        }
    }

    template <class T>
    bool value(T& out, std::size_t depth, bool key) {
        if constexpr (is_specialisation_of_optional<T>::value && !fast_scalar<T>) {
            if (peek() == NONE) {
                ++p_;
                out.reset();
                return true;
            }
            typename T::value_type v{};
            if (!value(v, depth, key)) return false;
            out = std::move(v);
            return true;
        } else if constexpr (fast_scalar<T>) {
            return scalar_value(out, key);
        } else {
            if (depth + 1 > limits_.max_depth) return false;
            return container(out, depth + 1, key);
        }
    }

    // A scalar as Python writes it: its opcode and (Python files every str so) one MEMOIZE, read
    // with the position in a register and everything inlined into the container's loop. A memo
    // fetch, a frame or more memo opcodes take scalar_value_rest.
    template <class T>
    [[gnu::always_inline]] bool scalar_value(T& out, bool key) {
        const unsigned char* q = p_;
        if (q == end_ || *q == FRAME || *q == BINGET || *q == LONG_BINGET) [[unlikely]]
            return scalar_value_rest(out, key);
        const std::size_t at = static_cast<std::size_t>(q - begin_);
        std::size_t len = 0;
        if (!scalar(q, out, len, key)) return false;
        if (q != end_ && *q == MEMOIZE) {
            ++q;
            memo_.push(at);
            if (!count_copy(len)) return false;
        }
        p_ = q;
        if (q == end_ || (*q != MEMOIZE && *q != BINPUT && *q != LONG_BINPUT && *q != FRAME)) [[likely]]
            return true;
        return memo_after(at, len);
    }
    template <class T>
    [[gnu::noinline]] bool scalar_value_rest(T& out, bool key) {
        const int op = peek();
        std::size_t len = 0;
        if (op == BINGET || op == LONG_BINGET) {
            const int width = op == BINGET ? 1 : 4;
            if (end_ - p_ < 1 + width) return false;
            const std::uint64_t index = le(p_ + 1, width);
            p_ += 1 + width;
            if (index >= memo_.n) return false;
            const std::size_t at = memo_.get(static_cast<std::size_t>(index));
            if (at == kContainer) return false;
            const unsigned char* q = begin_ + at;
            return scalar(q, out, len, key) && count_copy(len) && memo_after(at, len);
        }
        if (op < 0) return false;
        const std::size_t at = static_cast<std::size_t>(p_ - begin_);
        return scalar(p_, out, len, key) && memo_after(at, len);
    }

    template <class T>
    struct is_scalar : std::bool_constant<none_like<T> || std::is_arithmetic_v<T> || std::is_same_v<T, std::string> ||
                                          std::is_same_v<T, Bytes> || std::is_same_v<T, ByteArray>> {};
    template <class T>
    struct is_scalar<std::optional<T>> : is_scalar<T> {};
    template <class T>
    static constexpr bool fast_scalar = is_scalar<T>::value;

    // The state a speculative parse returns to when what followed was not this container's.
    struct Saved {
        const unsigned char* p;
        std::size_t memo;
        std::size_t copied;
    };
    Saved save() const { return {p_, memo_.n, copied_}; }
    void restore(const Saved& s) {
        p_ = s.p;
        memo_.truncate(s.memo);
        copied_ = s.copied;
    }

    // The items of a list, dict or set after its EMPTY_ opcode: batches of MARK items CLOSE, or
    // (Python writes a batch of one so) one item and SINGLE. After an empty container or a
    // single item, what comes next may be the enclosing container's: a MARK batch that does not
    // close as this one would is left to the full reader; a single item that is not followed by
    // SINGLE was the enclosing container's, and reading resumes before it. read(many) reads one
    // item into its place, or inside a MARK batch (many) perhaps several; keep(true) keeps what it
    // read, keep(false) takes it back (only ever after read(false)).
    template <class Read, class Keep>
    bool batches(int close, int single, Read&& read, Keep&& keep) {
        for (;;) {
            const int op = peek();
            if (op == MARK) {
                ++p_;
                while (peek() != close) {
                    if (!read(true)) return false;
                    keep(true);
                }
                ++p_;
                continue;
            }
            if (single < 0 || op < 0 || op == STOP) return true;
            const Saved s = save();
            if (!read(false) || next() != single) {
                keep(false);
                restore(s);
                return true;
            }
            keep(true);
        }
    }
    // The same, each item read into a fresh Item and handed to add.
    template <class Item, class Add>
    bool batches(int close, int single, std::size_t depth, bool key_items, Add&& add) {
        Item item{};
        return batches(
            close, single,
            [&](bool) {
                item = Item{};
                return read_item(item, depth, key_items);
            },
            [&](bool keep) {
                if (keep) add(std::move(item));
            });
    }
    template <class K, class V>
    struct KeyValue {
        K key;
        V value;
    };
    template <class K, class V>
    bool read_item(KeyValue<K, V>& kv, std::size_t depth, bool) {
        return value(kv.key, depth, true) && value(kv.value, depth, false);
    }
    template <class T>
    bool read_item(T& item, std::size_t depth, bool key) {
        return value(item, depth, key);
    }

    template <class T>
    bool container(T& out, std::size_t depth, bool key) {
        const std::size_t at = kContainer;
        if constexpr (map_like<T>) {
            if (key || next() != EMPTY_DICT || !memo_after(at, 0)) return false;
            out.clear();
            using Pair = KeyValue<typename T::key_type, typename T::mapped_type>;
            // Python's dicts are often in key order already: hinting the end makes each insertion
            // into a std::map one comparison instead of a walk down the tree.
            return batches<Pair>(SETITEMS, SETITEM, depth, true, [&](Pair&& kv) {
                if constexpr (requires { out.insert_or_assign(out.end(), std::move(kv.key), std::move(kv.value)); })
                    out.insert_or_assign(out.end(), std::move(kv.key), std::move(kv.value));
                else
                    out.insert_or_assign(std::move(kv.key), std::move(kv.value));
            });
        } else if constexpr (set_like<T>) {
            out.clear();
            auto add = [&](typename T::key_type&& e) { out.insert(std::move(e)); };
            const int op = next();
            if (op == EMPTY_SET && !key) {
                return memo_after(at, 0) && batches<typename T::key_type>(ADDITEMS, -1, depth, true, add);
            }
            if (op != MARK) return false;
            while (peek() != FROZENSET) {
                typename T::key_type e{};
                if (!value(e, depth, true)) return false;
                add(std::move(e));
            }
            ++p_;
            return memo_after(at, 0);
        } else if constexpr (sequence_like<T>) {
            if constexpr (pair_sequence<T>) {
                if (peek() == EMPTY_DICT) return dict_items(out, depth, key);
            }
            out.clear();
            auto add = [&](typename T::value_type&& e) { out.push_back(std::move(e)); };
            if (peek() == EMPTY_LIST) {
                ++p_;
                return !key && memo_after(at, 0) && batches<typename T::value_type>(APPENDS, APPEND, depth, false, add);
            }
            return tuple_items(depth, key, [&](auto&& read) {
                typename T::value_type e{};
                if (!read(e)) return false;
                add(std::move(e));
                return true;
            });
        } else {
            static_assert(tuple_like<T>);
            // A tuple read into a std::tuple or pair: exactly its N items (the full reader also takes a list).
            std::size_t i = 0;
            bool ok = true;
            auto one = [&](auto& field) { ok = ok && value(field, depth, key); };
            const bool read = tuple_items(depth, key, [&](auto&&) {
                if (i == std::tuple_size_v<T>) return false;
                std::size_t j = 0;
                std::apply([&](auto&... f) { ((j++ == i ? one(f) : void()), ...); }, out);
                ++i;
                return ok;
            });
            return read && i == std::tuple_size_v<T>;
        }
    }

    // A dict read as its pairs, each read in place (no pair on the way, no per-item dispatch).
    // The first kSmallMerge keys' fingerprints are taken as they are read, for the check that
    // no key repeats.
    template <class T>
    bool dict_items(T& out, std::size_t depth, bool key) {
        ++p_;
        if (key || !memo_after(kContainer, 0)) return false;
        out.clear();
        if constexpr (requires { out.reserve(std::size_t{}); }) {
            // Room for the pairs the rest of the input could hold, up to a small dict's worth
            // (one allocation for the messages this type is for; a big dict grows as usual).
            constexpr std::size_t kFirstRoom = 16, kLeastPairBytes = 2;
            out.reserve(std::min(static_cast<std::size_t>(end_ - p_) / kLeastPairBytes, kFirstRoom));
        }
        SmallFingerprints fp{};  // the lanes past the pairs are read (and not used)
        const bool read = batches(
            SETITEMS, SETITEM,
            [&](bool many) {
                if constexpr (std::is_same_v<typename T::value_type::first_type, std::string> &&
                              std::is_integral_v<typename T::value_type::second_type> &&
                              !std::is_same_v<typename T::value_type::second_type, bool>) {
                    if (str_int_run(out, fp, many)) [[likely]]
                        return true;
                }
                return pair_item(out, fp, depth);
            },
            [&](bool keep) {
                if (!keep) out.pop_back();
            });
        if (!read) return false;
        if (out.size() <= kSmallMerge) {
            if (out.size() >= 2) merge_repeated_keys_small(out, fp);
        } else {
            merge_repeated_keys(out);
        }
        return true;
    }

    // One str_int_pair, or (many) as many as follow one another: read first, up to kSmallMerge
    // of them at a time, and appended after. The reading loop then makes no call and keeps the
    // position, memo_.n and copied_ in registers (in memory, each pair would wait for the last
    // one's store of them). Reading and appending in one loop, GCC calls emplace_back out of line
    // (too big to inline into the reader), and the call costs as much as reading the pair;
    // append_run's loop inlines it.
    template <class T>
    bool str_int_run(T& out, SmallFingerprints& fp, bool many) {
        using V = typename T::value_type::second_type;
        RunState run{p_, memo_.n, copied_, limits_.max_size};
        std::array<StrInt, kSmallMerge> got;
        std::size_t k = 0;
        if (!many) {
            k = str_int_pair<V>(run, got[0]);
        } else {
            while (str_int_pair<V>(run, got[k])) {
                if (++k == got.size()) {
                    append_run(out, fp, got.data(), k, end_);
                    k = 0;
                }
            }
        }
        memo_.n = run.memo;
        copied_ = run.copied;
        append_run(out, fp, got.data(), k, end_);
        if (run.q == p_) return false;
        p_ = run.q;
        return true;
    }
    struct RunState {
        const unsigned char* q;
        std::size_t memo;
        std::size_t copied;
        std::size_t max_copied;
    };
    // A pair str_int_pair read: its key (in the input), its value and its key's fingerprint.
    // Trivial, so that a run's array of them is not initialised.
    struct StrInt {
        const unsigned char* key;
        std::size_t size;
        std::int64_t value;
        std::int16_t fingerprint;
    };
    template <class T>
    [[gnu::noinline]] static void append_run(T& out, SmallFingerprints& fp, const StrInt* got, std::size_t k,
                                             const unsigned char* end) {
        using V = typename T::value_type::second_type;
        for (std::size_t i = 0, at = out.size(); i < k; ++i, ++at) {
            const StrInt& e = got[i];
            if (at < kSmallMerge) fp[at] = e.fingerprint;
            const ShortString key{reinterpret_cast<const char*>(e.key), e.size, static_cast<std::size_t>(end - e.key)};
            out.emplace_back(std::piecewise_construct, std::forward_as_tuple(key),
                             std::forward_as_tuple(static_cast<V>(e.value)));
        }
    }

    // Out of line, so that the loop over the pairs keeps str_int_pair's few instructions inline.
    template <class T>
    [[gnu::noinline]] bool pair_item(T& out, SmallFingerprints& fp, std::size_t depth) {
        auto& pair = out.emplace_back();
        if (!value(pair.first, depth, true) || !value(pair.second, depth, false)) return false;
        if (out.size() <= kSmallMerge) fp[out.size() - 1] = key_fingerprint(pair.first);
        return true;
    }

    static bool memo_next(unsigned op) { return op == MEMOIZE || op == BINPUT || op == LONG_BINPUT || op == FRAME; }
    // BININT1, BININT2 or BININT in the low bytes of w (the bytes from q on; zeros past the end
    // of the input, which is `room` bytes away), not followed by a memo opcode or a frame: v gets
    // it and q moves past it.
    [[gnu::always_inline]] static bool word_int(std::uint64_t w, const unsigned char*& q, std::ptrdiff_t room,
                                                std::int64_t& v) {
        // q moves only when the int is in the input (past its end, even unread, q would be UB).
        switch (w & 0xff) {
            case BININT1:
                if (room < 2 || memo_next((w >> 16) & 0xff)) return false;
                v = static_cast<std::int64_t>((w >> 8) & 0xff);
                q += 2;
                return true;
            case BININT2:
                if (room < 3 || memo_next((w >> 24) & 0xff)) return false;
                v = static_cast<std::int64_t>((w >> 8) & 0xffff);
                q += 3;
                return true;
            case BININT:
                if (room < 5 || memo_next((w >> 40) & 0xff)) return false;
                v = static_cast<std::int32_t>(static_cast<std::uint32_t>(w >> 8));
                q += 5;
                return true;
            default: return false;
        }
    }

    // word_int after a key, whose MEMOIZE (if `memoize`) is the word's first byte: each form a
    // branch of its own with a constant length. `room`: the bytes from q to the input's end.
    [[gnu::always_inline]] static bool memo_word_int(std::uint64_t w, bool memoize, const unsigned char*& q,
                                                     std::ptrdiff_t room, std::int64_t& v) {
        if (memoize) {
            ++q;
            return word_int(w >> 8, q, room - 1, v);
        }
        return word_int(w, q, room, v);
    }

    // The pair Python writes for a str key and a small int value, read in one go: SHORT_BINUNICODE
    // of ASCII, perhaps MEMOIZE, then BININT1, BININT2 or BININT not followed by a memo opcode or a
    // frame. Anything else (and a value out of V's range) leaves everything as it was and answers
    // false: the general route then reads the pair, or refuses it, exactly as it would have.
    // The run moves past the pair when it is read, and `read` has it (its value within V's range).
    template <class V>
    [[gnu::always_inline]] bool str_int_pair(RunState& run, StrInt& read) {
        // A key of up to 8 bytes with 8 more bytes of input after it: its bytes in one word, and
        // what follows it (MEMOIZE?, the int, the next opcode: 7 bytes at most) in another, taken
        // apart in registers: words where bytes one by one make a chain of dependent loads, each
        // waiting for the last to say where the next byte is. With or without MEMOIZE, each int
        // opcode: a branch of its own, with its own constant length, so that where the next pair
        // starts depends on the key's length alone (the CPU predicts the branches and reads
        // ahead; a length computed from the bytes would make each pair wait for the last). A
        // longer key, and the last pair of a message, take str_int_pair_any.
        const unsigned char* q = run.q;
        if (std::endian::native == std::endian::little && end_ - q >= 2 && q[0] == SHORT_BINUNICODE && q[1] <= 8 &&
            end_ - q >= 2 + q[1] + 8) [[likely]] {
            const std::size_t n = q[1];
            const unsigned char* key_at = q + 2;
            const std::uint64_t word = tail_word(key_at, n);  // all of the key
            if ((word & 0x8080808080808080u) != 0) return false;
            q = key_at + n;
            const std::uint64_t w = load_word<8>(q);
            std::int64_t v;
            const bool memoize = (w & 0xff) == MEMOIZE;
            if (!memo_word_int(w, memoize, q, 8, v)) return false;
            if (!std::in_range<V>(v) || (memoize && !memoize_key(run, n))) return false;
            read = {key_at, n, v, word_fingerprint(word, n)};
            run.q = q;
            return true;
        }
        return str_int_pair_any<V>(run, read);
    }
    // The pair's key filed in the memo (Python's pickler files every str) under the next index:
    // where the pair starts, as scalar_value files a scalar.
    [[gnu::always_inline]] bool memoize_key(RunState& run, std::size_t n) {
        if (run.copied + n > run.max_copied) return false;
        const auto at = static_cast<std::size_t>(run.q - begin_);
        if (run.memo < Memo::kInline) [[likely]]
            memo_.small[run.memo] = at;
        else
            memo_.push_big(at);
        ++run.memo;
        run.copied += n;
        return true;
    }
    // str_int_pair for any key length and near the end of the input (the last pair of a message).
    template <class V>
    [[gnu::noinline]] bool str_int_pair_any(RunState& run, StrInt& read) {
        const unsigned char* q = run.q;
        if (end_ - q < 2 || q[0] != SHORT_BINUNICODE) return false;
        const std::size_t n = q[1];
        // The key, an optional MEMOIZE, and the value's shortest form must be in the input.
        if (static_cast<std::size_t>(end_ - q) < 2 + n + 2) return false;
        const unsigned char* key_at = q + 2;
        // A key of up to 8 bytes is all in its word, which tells whether it is ASCII too.
        const std::uint64_t word = key_word(key_at, n);
        if (n <= 8 ? (word & 0x8080808080808080u) != 0
                   : !ascii(std::string_view(reinterpret_cast<const char*>(key_at), n)))
            return false;
        q += 2 + n;
        bool memoize;
        std::int64_t v;
        if (std::endian::native == std::endian::little && end_ - begin_ >= 8) [[likely]] {
            // What follows the key in a word as str_int_pair reads it; near the end of the input,
            // the input's last 8 bytes, shifted.
            const unsigned char* from = std::min(q, end_ - 8);
            const std::uint64_t w = load_word<8>(from) >> (8 * (q - from));
            memoize = (w & 0xff) == MEMOIZE;
            if (!memo_word_int(w, memoize, q, end_ - q, v)) return false;
        } else {
            memoize = *q == MEMOIZE;
            q += memoize;
            const std::ptrdiff_t left = end_ - q;
            if (left >= 2 && q[0] == BININT1) {
                v = q[1];
                q += 2;
            } else if (left >= 3 && q[0] == BININT2) {
                v = q[1] | (q[2] << 8);
                q += 3;
            } else if (left >= 5 && q[0] == BININT) {
                v = static_cast<std::int32_t>(static_cast<std::uint32_t>(le(q + 1, 4)));
                q += 5;
            } else {
                return false;
            }
            if (q != end_ && memo_next(*q)) return false;
        }
        if (!std::in_range<V>(v) || (memoize && !memoize_key(run, n))) return false;
        read = {key_at, n, v, word_fingerprint(word, n)};
        run.q = q;
        return true;
    }

    // A tuple's items: EMPTY_TUPLE; MARK items TUPLE; or one to three items and TUPLE1..3.
    // each(read) reads one item with read(item).
    template <class Each>
    bool tuple_items(std::size_t depth, bool key, Each&& each) {
        auto read = [&](auto& item) { return value(item, depth, key); };
        const int op = peek();
        if (op == EMPTY_TUPLE) {
            ++p_;
            return memo_after(kContainer, 0);
        }
        if (op == MARK) {
            ++p_;
            while (peek() != TUPLE)
                if (!each(read)) return false;
            ++p_;
            return memo_after(kContainer, 0);
        }
        for (int n = 1; n <= 3; ++n) {
            if (!each(read)) return false;
            if (peek() == TUPLE1 + n - 1) {
                ++p_;
                return memo_after(kContainer, 0);
            }
        }
        return false;
    }

    const unsigned char* begin_;
    const unsigned char* p_;
    const unsigned char* end_;
    const Limits& limits_;
    Memo memo_;
    std::size_t copied_ = 0;  // bytes of str and bytes filed in or fetched from the memo
};

}  // namespace detail

/// The pickle of a value (protocol 4), as Python's pickle.dumps(value, protocol=4) would read it back.
template <class T>
std::string dumps(const T& value) {
    Writer w;
    detail::dump(w, value);
    return w.finish();
}

/// Reads a pickle into a dynamic Object (see the safety rules at the top of this header).
Object loads(std::string_view pickle, const Limits& limits = {});

/// Reads a pickle into a T: UnpicklingError if it is malformed, refused, or of another shape.
template <class T>
T loads(std::string_view pickle, const Limits& limits = {}) {
    if constexpr (std::is_same_v<T, Object>) {
        return loads(pickle, limits);
    } else {
        if constexpr (detail::fast_readable_v<T> && std::is_default_constructible_v<T>) {
            T out{};
            if (detail::FastReader(pickle, limits).top(out)) return out;
        }
        // Outside the fast reader's subset, or an error: the full reader says which.
        return detail::load<T>(loads(pickle, limits));
    }
}

}  // namespace mp::py
