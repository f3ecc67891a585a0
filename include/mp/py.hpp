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
/// bytearray and bytes, and _codecs.encode for bytes): they are recognised by name and rebuilt as
/// data; nothing is imported or called. Lengths are checked against the input before anything is
/// allocated, and nesting, input size and the size that shared references expand to are bounded
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
///   dict       std::map, std::unordered_map
///   set        std::set, std::unordered_set (reading also takes a frozenset)
///   frozenset  py::Object::frozenset(...)
///   anything   py::Object, a dynamic value of any of the above
/// Other types: specialise mp::py::Convert<T> (see below).

#include <mp/errors.hpp>

#include <array>
#include <concepts>
#include <cstddef>
#include <cstdint>
#include <deque>
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

[[noreturn]] void wrong_kind(const Object& o, const char* wanted);
[[noreturn]] void wrong_length(const Object& o, std::size_t wanted);
[[noreturn]] void out_of_range(const Object& o, const char* type);

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
            if constexpr (std::is_same_v<V, double> || std::is_same_v<V, std::int64_t> ||
                          std::is_same_v<V, std::uint64_t>)
                return static_cast<T>(v);
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
    }
}

}  // namespace detail

template <class T>
T Object::as() const {
    return detail::load<T>(*this);
}

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
    if constexpr (std::is_same_v<T, Object>)
        return loads(pickle, limits);
    else
        return detail::load<T>(loads(pickle, limits));
}

}  // namespace mp::py
