#pragma once
/// \file
/// mp::Codec<T>: how a value crosses a process boundary as bytes.
///
/// Built-in kinds (each container, pair, tuple, optional and variant only when all its element
/// types have a codec, so `mp::Encodable<std::vector<X>>` is simply false when X has none):
///   - arithmetic types (bool checked to be 0/1) and enums, std::byte included;
///   - std::string (any std::basic_string of a character type);
///   - std::vector (one bulk copy for arithmetic, enum and byte-copied elements, so
///     std::vector<std::byte> is a byte buffer), std::vector<bool> (packed bits), std::array,
///     std::deque, std::list;
///   - std::map, std::multimap, std::unordered_map, std::unordered_multimap, std::set,
///     std::multiset, std::unordered_set, std::unordered_multiset;
///   - std::optional, std::variant, std::monostate, std::tuple, std::pair;
///   - std::chrono::duration and std::chrono::time_point (a steady_clock time point means
///     something on the same machine only);
///   - std::unique_ptr<T> (null allowed; not for polymorphic T, which would be sliced);
///   - user types with a cereal serialize() (member or free) or save()/load() pair, through mp's
///     own cereal archives. Include the cereal headers for the standard types such a type holds,
///     exactly as with cereal itself (e.g. <cereal/types/vector.hpp>, <cereal/types/string.hpp>);
///     inside such a type cereal rules, so each member needs cereal support (an mp Codec is not
///     consulted there). A type with a cereal function is always encoded with it, even when it is
///     trivially copyable. Standard types that cereal knows and mp does not (std::shared_ptr, a
///     std::unique_ptr to a polymorphic type) work the same way once their cereal header is
///     included; cereal accepts those for any element type, so a missing element function shows
///     up as cereal's compile error rather than mp's;
///   - other trivially copyable, standard-layout classes (plain structs of numbers): copied byte
///     for byte. A pointer or reference inside such a struct is copied as an address that means
///     nothing in the other process, and its bool or enum members are not checked on decode:
///     give such a type a cereal serialize() or a Codec instead.
/// Deliberately without a codec: raw pointers (`T*`), std::string_view and std::span (they refer
/// to this process's memory: send a std::string or std::vector).
///
/// Adding a kind: give the type a cereal serialize(), or specialise mp::Codec:
///
///     struct Reading { double celsius; std::string sensor; };
///     template <> struct mp::Codec<Reading> {
///         static void encode(mp::Encoder& e, const Reading& r) { e.put(r.celsius); e.put(r.sensor); }
///         static Reading decode(mp::Decoder& d) {
///             return Reading{d.get<double>(), d.get<std::string>()};  // braces: left to right
///         }
///         // Optional: the fewest bytes one value can take, which lets a container of Readings
///         // refuse a forged length sooner.
///         static constexpr std::size_t min_encoded_size = sizeof(double) + 8;
///     };
///
/// A Codec reads lengths with Decoder::read_size, which refuses a count the remaining bytes cannot
/// hold. A type with no codec is a compile error that says "this type has no codec" and names
/// the type (for a container, the element type that has none).
///
/// A handle whose decoded copy refers to the same object as the original (as mp's queues, locks,
/// connections, shared memory and proxies do) says so in its Codec with
/// `static constexpr bool shares_state = true;`: work sent to another process may then take it
/// by non-const reference, which for any other type is a compile error (the callee would change
/// only its own copy).
///
/// Wire format: fixed-size values in native byte order (both ends run the same architecture; MPI
/// checks that), lengths and counts as 8 little-endian bytes, a variant's index as 4 bytes, an
/// optional's or unique_ptr's presence as one byte 0/1.
///
/// Decoding never trusts its input: truncated, forged or malformed bytes throw mp::DecodeError,
/// never crash, hang or allocate far beyond the input's size. What that costs:
///   - a container's length may not exceed the bytes after it, counting each element as at least
///     one byte. So every built-in kind but an empty std::array takes at least one byte
///     (std::monostate, std::tuple<> and a cereal value that writes nothing are sent as one zero
///     byte); a user Codec whose encoding can be empty should do the same. Inside a cereal type, where cereal's own containers are
///     used, a container of elements that cereal writes as nothing (empty types) may hold no more
///     elements than bytes follow it, and all such lengths together no more than the input's size;
///   - values nest at most Decoder::max_depth levels deep (a recursive cereal type is counted in
///     cereal's own steps, a few per level), so a forged deep nesting cannot exhaust the stack.

#include <algorithm>
#include <array>
#include <bit>
#include <chrono>
#include <concepts>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <deque>
#include <list>
#include <map>
#include <memory>
#include <new>
#include <optional>
#include <set>
#include <span>
#include <stdexcept>
#include <string>
#include <string_view>
#include <tuple>
#include <type_traits>
#include <unordered_map>
#include <unordered_set>
#include <utility>
#include <variant>
#include <vector>

#include <cereal/cereal.hpp>

#include "mp/errors.hpp"

namespace mp {

class Encoder;
class Decoder;

namespace detail {
template <class>
inline constexpr bool dependent_false = false;

/// Lengths travel little-endian whatever the host (a no-op on x86 and ARM).
constexpr std::uint64_t little_endian(std::uint64_t v) noexcept {
    if constexpr (std::endian::native == std::endian::big)
        return __builtin_bswap64(v);
    else
        return v;
}
}  // namespace detail

// The one text of every "no codec" error (a macro, since static_assert takes only a literal;
// undefined at the end of this header).
#define MP_NO_CODEC_MESSAGE                                                                       \
    "mp::Codec: this type has no codec (the type is named in has_codec<...>; for a container, "   \
    "pair, tuple, optional or variant, the element type that has none). Make it one of: a plain " \
    "struct of numbers (trivially copyable, standard layout), a type with a cereal serialize() "  \
    "function (member or free), or a type with an mp::Codec<T> specialisation"

/// The customisation point. The primary template means "no codec": using it is a compile error
/// that names the fix.
template <class T, class Enable = void>
struct Codec {
    static constexpr bool mp_no_codec = true;
    template <class U = T>
    static void encode(Encoder&, const U&) {
        static_assert(detail::dependent_false<U>, MP_NO_CODEC_MESSAGE);
    }
    template <class U = T>
    static U decode(Decoder&) {
        static_assert(detail::dependent_false<U>, MP_NO_CODEC_MESSAGE);
    }
};

/// True when T (without cv/ref) can cross a process boundary.
template <class T>
concept Encodable = !requires { Codec<std::remove_cvref_t<T>>::mp_no_codec; };

namespace detail {

/// The first of Ts without a codec, or void.
template <class... Ts>
struct first_without_codec {
    using type = void;
};
template <class T, class... Ts>
struct first_without_codec<T, Ts...> {
    using type = std::conditional_t<Encodable<T>, typename first_without_codec<Ts...>::type, T>;
};

/// The type to blame when T has no codec: T itself, or for a standard template that lacks one
/// only because of an element type (std::vector<X>, std::optional<X>, std::map<K, X> ...), the
/// innermost such element.
template <class T>
struct missing_codec {
    using type = T;
};
template <class T>
using missing_codec_t = typename missing_codec<std::remove_cvref_t<T>>::type;
template <template <class...> class Tm, class... P>
    requires(!Encodable<Tm<P...>>) && (!(Encodable<P> && ...))
struct missing_codec<Tm<P...>> {
    using type = missing_codec_t<typename first_without_codec<P...>::type>;
};
template <class T, std::size_t N>
    requires(!Encodable<T>)
struct missing_codec<std::array<T, N>> {
    using type = missing_codec_t<T>;
};

/// Named in the no-codec errors, so that the compiler prints the type: false for every T used.
template <class T>
inline constexpr bool has_codec = Encodable<T>;

/// A handle whose decoded copy refers to the same object as the original (a queue, a lock, a
/// connection, shared memory, a proxy): its Codec says `static constexpr bool shares_state =
/// true`. Work run in another process may take such an argument by non-const reference.
template <class T>
concept shared_handle = requires { requires Codec<std::remove_cvref_t<T>>::shares_state; };

}  // namespace detail

/// Appends a value's bytes to a buffer.
class Encoder {
public:
    Encoder() = default;
    /// Starts after `initial` (e.g. a frame header already written).
    explicit Encoder(std::string initial) : buf_(std::move(initial)) {}

    /// Appends n raw bytes.
    void write(const void* data, std::size_t n) {
        if (n != 0) buf_.append(static_cast<const char*>(data), n);
    }
    /// A length or count, as 8 little-endian bytes.
    void write_size(std::uint64_t n) {
        n = detail::little_endian(n);
        write(&n, sizeof n);
    }

    /// Appends value's encoding (through Codec<T>). When a codec throws, part of the value may
    /// have been written: discard the buffer.
    template <class T>
    void put(const T& value) {
        if constexpr (Encodable<T>)
            Codec<std::remove_cvref_t<T>>::encode(*this, value);
        else
            static_assert(detail::has_codec<detail::missing_codec_t<T>>, MP_NO_CODEC_MESSAGE);
    }

    /// The bytes written so far.
    std::string& bytes() noexcept { return buf_; }
    /// Moves the bytes out.
    std::string take() noexcept { return std::move(buf_); }

    /// Sends a file descriptor along with the bytes (SCM_RIGHTS where the bytes go to another
    /// process); returns its index for the receiver's Decoder::take_fd. The descriptor is
    /// borrowed: it must stay open until the bytes have been sent. Throws mp::Error (the
    /// message given to refuse_fds) where the bytes go by a way that carries no descriptors.
    std::uint32_t attach_fd(int fd) {
        if (refused_ != nullptr) throw Error(refused_);
        fds_.push_back(fd);
        return static_cast<std::uint32_t>(fds_.size() - 1);
    }
    /// From now on attach_fd throws mp::Error(why): for bytes that go where descriptors cannot
    /// (a Queue's shared memory, a task's result), so that a value holding a handle is refused
    /// before anything is sent, rather than arriving without its descriptor. `why` must outlive
    /// the Encoder (a string literal).
    void refuse_fds(const char* why) noexcept { refused_ = why; }
    /// The descriptors attached so far, in index order.
    const std::vector<int>& fds() const noexcept { return fds_; }
    /// Moves the attached descriptors out.
    std::vector<int> take_fds() noexcept { return std::move(fds_); }

private:
    std::string buf_;
    std::vector<int> fds_;
    const char* refused_ = nullptr;
};

/// Reads values back from a byte buffer, checking every length against what is left.
class Decoder {
public:
    /// How many get() calls may nest. Built-in kinds nest only as deep as their type does; the
    /// limit is there for recursive user types, so forged input cannot overflow the stack.
    static constexpr std::size_t max_depth = 1000;

    /// Reads from `bytes`, which must outlive the decoder.
    explicit Decoder(std::string_view bytes) noexcept : data_(bytes) {}
    /// Reads from `bytes` with the descriptors that arrived with them; take_fd hands them out and
    /// leaves -1 behind, so whoever owns `fds` closes only those not taken.
    Decoder(std::string_view bytes, std::span<int> fds) noexcept : data_(bytes), fds_(fds) {}

    /// The descriptor attached at `index` by the sender; the caller owns it from now on. Throws
    /// DecodeError when no such descriptor arrived or it was taken already.
    int take_fd(std::uint32_t index) {
        if (index >= fds_.size() || fds_[index] < 0)
            throw DecodeError("mp::Codec: file descriptor #" + std::to_string(index) +
                              " did not arrive with the message (or was taken twice)");
        return std::exchange(fds_[index], -1);
    }

    /// Copies n bytes out; throws DecodeError when fewer remain.
    void read(void* out, std::size_t n) {
        require(n);
        if (n != 0) std::memcpy(out, data_.data() + pos_, n);
        pos_ += n;
    }
    /// A view of the next n bytes (valid while the buffer lives); throws when fewer remain.
    std::string_view read_view(std::size_t n) {
        require(n);
        std::string_view v = data_.substr(pos_, n);
        pos_ += n;
        return v;
    }
    /// A count of elements each at least `min_element_bytes` long: refused with DecodeError when
    /// the buffer could not hold that many, so a forged count never drives an allocation.
    /// `min_element_bytes == 0` reads the count unchecked: the caller must bound it.
    std::uint64_t read_size(std::size_t min_element_bytes = 1) {
        std::uint64_t n;
        read(&n, sizeof n);
        n = detail::little_endian(n);
        if (min_element_bytes != 0 && n > remaining() / min_element_bytes)
            throw DecodeError("mp::Codec: length " + std::to_string(n) + " exceeds the remaining " +
                              std::to_string(remaining()) +
                              " bytes (truncated or malformed input)");
        return n;
    }

    /// Decodes the next value (through Codec<T>).
    template <class T>
    T get() {
        if constexpr (Encodable<T>) {
            Nesting level(*this);
            return Codec<std::remove_cvref_t<T>>::decode(*this);
        } else {
            static_assert(detail::has_codec<detail::missing_codec_t<T>>, MP_NO_CODEC_MESSAGE);
            throw DecodeError("mp::Codec: no codec");  // not reached: the assertion fails
        }
    }

    /// Bytes not yet read.
    std::size_t remaining() const noexcept { return data_.size() - pos_; }
    /// Bytes read so far.
    std::size_t position() const noexcept { return pos_; }
    /// How many get() calls are under way (0 outside any).
    std::size_t depth() const noexcept { return depth_; }
    /// Throws DecodeError unless every byte was consumed.
    void finish() const {
        if (remaining() != 0)
            throw DecodeError("mp::Codec: " + std::to_string(remaining()) +
                              " trailing bytes after the value (malformed input)");
    }

private:
    // One level of get(): released on the way out, exceptions included, so a caller that catches
    // a DecodeError may keep using the decoder.
    class Nesting {
    public:
        explicit Nesting(Decoder& owner) : owner_(owner) {
            if (owner_.depth_ == max_depth)
                throw DecodeError("mp::Codec: values nest deeper than " +
                                  std::to_string(max_depth) + " levels (malformed input)");
            ++owner_.depth_;
        }
        ~Nesting() { --owner_.depth_; }
        Nesting(const Nesting&) = delete;
        Nesting& operator=(const Nesting&) = delete;

    private:
        Decoder& owner_;
    };

    void require(std::size_t n) const {
        if (n > remaining())
            throw DecodeError("mp::Codec: truncated input: need " + std::to_string(n) +
                              " bytes, " + std::to_string(remaining()) + " left");
    }

    std::string_view data_;
    std::span<int> fds_;
    std::size_t pos_ = 0;
    std::size_t depth_ = 0;
};

namespace detail {

/// The fewest bytes one T can encode to, when its Codec says (`min_encoded_size`), else 0.
template <class T>
consteval std::size_t min_encoded_size() {
    if constexpr (requires { Codec<std::remove_cvref_t<T>>::min_encoded_size; })
        return Codec<std::remove_cvref_t<T>>::min_encoded_size;
    else
        return 0;
}

/// A T whose encoding is exactly its object bytes, so an array of them is one memcpy. Only
/// mp's own codecs say so (`mp_bytewise`): a user's Codec specialisation is always called.
template <class T>
concept bytewise = std::is_trivially_copyable_v<T> && requires {
    requires Codec<T>::mp_bytewise;
};

/// Reads an element count for a container of T, each element counted as at least one byte so
/// that the loop that follows is bounded by the input's size.
template <class T>
std::uint64_t read_count(Decoder& d) {
    return d.read_size(std::max<std::size_t>(1, min_encoded_size<T>()));
}

/// How many Ts to reserve for a count already checked against the input: no more than fit in the
/// bytes that remain, so a forged count of large elements that encode small (optional<big>, a
/// cereal type) cannot reserve many times the input's size. A legitimate larger container just
/// grows as it decodes.
template <class T>
std::size_t reserve_limit(std::uint64_t n, const Decoder& d) {
    return static_cast<std::size_t>(std::min<std::uint64_t>(n, d.remaining() / sizeof(T) + 1));
}

/// The presence byte of an optional or a unique_ptr: exactly 0 or 1.
inline bool read_flag(Decoder& d, const char* what) {
    unsigned char b;
    d.read(&b, 1);
    if (b > 1)
        throw DecodeError(std::string("mp::Codec: invalid ") + what + " flag byte " +
                          std::to_string(b) + " (expected 0 or 1)");
    return b == 1;
}

/// The one zero byte of an empty value (std::monostate, std::tuple<>).
inline void read_empty(Decoder& d, const char* what) {
    unsigned char b;
    d.read(&b, 1);
    if (b != 0)
        throw DecodeError(std::string("mp::Codec: invalid ") + what + " byte " +
                          std::to_string(b) + " (expected 0)");
}

/// Standard templates that mp encodes itself (or refuses, as views of this process's memory):
/// they never fall through to the cereal or the byte-copy kinds, so `std::array<int*, 2>` has no
/// codec rather than a memcpy of addresses.
template <class T>
struct is_builtin_template : std::false_type {};
template <class C, class Tr, class A>
struct is_builtin_template<std::basic_string<C, Tr, A>> : std::true_type {};
template <class C, class Tr>
struct is_builtin_template<std::basic_string_view<C, Tr>> : std::true_type {};
template <class T, std::size_t E>
struct is_builtin_template<std::span<T, E>> : std::true_type {};
template <class T, class A>
struct is_builtin_template<std::vector<T, A>> : std::true_type {};
template <class T, std::size_t N>
struct is_builtin_template<std::array<T, N>> : std::true_type {};
template <class T, class A>
struct is_builtin_template<std::deque<T, A>> : std::true_type {};
template <class T, class A>
struct is_builtin_template<std::list<T, A>> : std::true_type {};
template <class K, class V, class C, class A>
struct is_builtin_template<std::map<K, V, C, A>> : std::true_type {};
template <class K, class V, class C, class A>
struct is_builtin_template<std::multimap<K, V, C, A>> : std::true_type {};
template <class K, class V, class H, class E, class A>
struct is_builtin_template<std::unordered_map<K, V, H, E, A>> : std::true_type {};
template <class K, class V, class H, class E, class A>
struct is_builtin_template<std::unordered_multimap<K, V, H, E, A>> : std::true_type {};
template <class K, class C, class A>
struct is_builtin_template<std::set<K, C, A>> : std::true_type {};
template <class K, class C, class A>
struct is_builtin_template<std::multiset<K, C, A>> : std::true_type {};
template <class K, class H, class E, class A>
struct is_builtin_template<std::unordered_set<K, H, E, A>> : std::true_type {};
template <class K, class H, class E, class A>
struct is_builtin_template<std::unordered_multiset<K, H, E, A>> : std::true_type {};
template <class T>
struct is_builtin_template<std::optional<T>> : std::true_type {};
template <class... Ts>
struct is_builtin_template<std::variant<Ts...>> : std::true_type {};
template <class... Ts>
struct is_builtin_template<std::tuple<Ts...>> : std::true_type {};
template <class A, class B>
struct is_builtin_template<std::pair<A, B>> : std::true_type {};
template <class R, class P>
struct is_builtin_template<std::chrono::duration<R, P>> : std::true_type {};
template <class C, class D>
struct is_builtin_template<std::chrono::time_point<C, D>> : std::true_type {};
// A polymorphic pointee is left to cereal (<cereal/types/memory.hpp> and its registration),
// which knows the dynamic type; mp's own codec would slice it.
template <class T>
struct is_builtin_template<std::unique_ptr<T>> : std::bool_constant<!std::is_polymorphic_v<T>> {};
template <class T>
struct is_builtin_template<std::reference_wrapper<T>> : std::true_type {};
template <class T>
struct is_builtin_template<std::initializer_list<T>> : std::true_type {};

}  // namespace detail

// ---- scalars ----------------------------------------------------------------------------------

/// Arithmetic types and enums: their bytes as they are in memory (both ends run on the same
/// architecture; MPI checks that). A bool must be 0 or 1.
template <class T>
    requires(std::is_arithmetic_v<T> || std::is_enum_v<T>)
struct Codec<T> {
    static constexpr std::size_t min_encoded_size = sizeof(T);
    static constexpr bool mp_bytewise = !std::is_same_v<T, bool>;

    static void encode(Encoder& e, const T& v) { e.write(&v, sizeof v); }
    static T decode(Decoder& d) {
        if constexpr (std::is_same_v<T, bool>) {
            // Checked as a byte before it becomes a bool: any other value is undefined behaviour.
            unsigned char raw;
            d.read(&raw, 1);
            if (raw > 1)
                throw DecodeError("mp::Codec: invalid bool byte " + std::to_string(raw) +
                                  " (expected 0 or 1)");
            return raw == 1;
        } else {
            T v;
            d.read(&v, sizeof v);
            return v;
        }
    }
};

/// A raw pointer has no codec: the address means nothing in another process.
template <class T>
struct Codec<T*> {
    static constexpr bool mp_no_codec = true;
    template <class U = T>
    static void encode(Encoder&, const U* const&) {
        static_assert(detail::dependent_false<U>,
                      "mp::Codec: this type has no codec: a raw pointer's address means nothing in "
                      "another process. Send the value itself (or a std::unique_ptr/std::optional).");
    }
    template <class U = T>
    static U* decode(Decoder&) {
        static_assert(detail::dependent_false<U>,
                      "mp::Codec: this type has no codec: a raw pointer's address means nothing in "
                      "another process. Send the value itself (or a std::unique_ptr/std::optional).");
    }
};

/// std::string_view has no codec: it refers to this process's memory. Send a std::string.
template <class C, class Tr>
struct Codec<std::basic_string_view<C, Tr>> {
    static constexpr bool mp_no_codec = true;
    template <class U = C>
    static void encode(Encoder&, const std::basic_string_view<U, Tr>&) {
        static_assert(detail::dependent_false<U>,
                      "mp::Codec: this type has no codec: a std::string_view refers to this "
                      "process's memory and cannot be decoded. Send a std::string.");
    }
    template <class U = C>
    static std::basic_string_view<U, Tr> decode(Decoder&) {
        static_assert(detail::dependent_false<U>,
                      "mp::Codec: this type has no codec: a std::string_view refers to this "
                      "process's memory and cannot be decoded. Send a std::string.");
    }
};

/// std::span has no codec: it refers to this process's memory. Send a std::vector.
template <class T, std::size_t E>
struct Codec<std::span<T, E>> {
    static constexpr bool mp_no_codec = true;
    template <class U = T>
    static void encode(Encoder&, const std::span<U, E>&) {
        static_assert(detail::dependent_false<U>,
                      "mp::Codec: this type has no codec: a std::span refers to this process's "
                      "memory and cannot be decoded. Send a std::vector.");
    }
    template <class U = T>
    static std::span<U, E> decode(Decoder&) {
        static_assert(detail::dependent_false<U>,
                      "mp::Codec: this type has no codec: a std::span refers to this process's "
                      "memory and cannot be decoded. Send a std::vector.");
    }
};

/// std::monostate: one zero byte, so that a container of them still has a length to check.
template <>
struct Codec<std::monostate> {
    static constexpr std::size_t min_encoded_size = 1;
    static void encode(Encoder& e, const std::monostate&) { e.put(std::uint8_t{0}); }
    static std::monostate decode(Decoder& d) {
        detail::read_empty(d, "std::monostate");
        return {};
    }
};

// ---- strings and sequences --------------------------------------------------------------------

/// std::string (and the other std::basic_string of a character type): length, then the
/// characters.
template <class C, class Tr, class A>
    requires std::is_arithmetic_v<C>
struct Codec<std::basic_string<C, Tr, A>> {
    using S = std::basic_string<C, Tr, A>;
    static constexpr std::size_t min_encoded_size = 8;

    static void encode(Encoder& e, const S& s) {
        e.write_size(s.size());
        e.write(s.data(), s.size() * sizeof(C));
    }
    static S decode(Decoder& d) {
        const auto n = static_cast<std::size_t>(d.read_size(sizeof(C)));
        if constexpr (sizeof(C) == 1) {
            std::string_view raw = d.read_view(n);
            return S(reinterpret_cast<const C*>(raw.data()), n);
        } else {
            // The input may be unaligned for C: copy bytes, never read a C through a cast pointer.
            S s(n, C{});
            d.read(s.data(), n * sizeof(C));
            return s;
        }
    }
};

/// std::vector<T>: count, then the elements; one memcpy when T is arithmetic, an enum, or a
/// byte-copied struct.
template <class T, class A>
    requires Encodable<T>
struct Codec<std::vector<T, A>> {
    using V = std::vector<T, A>;
    static constexpr std::size_t min_encoded_size = 8;

    static void encode(Encoder& e, const V& v) {
        e.write_size(v.size());
        if constexpr (detail::bytewise<T>) {
            e.write(v.data(), v.size() * sizeof(T));
        } else {
            for (const T& x : v) e.put(x);
        }
    }
    static V decode(Decoder& d) {
        V v;
        if constexpr (detail::bytewise<T> && std::is_default_constructible_v<T>) {
            // read_size checked that n whole elements follow, so this allocation is backed by input.
            const auto n = static_cast<std::size_t>(d.read_size(sizeof(T)));
            v.resize(n);
            d.read(v.data(), n * sizeof(T));
        } else {
            const auto n = detail::read_count<T>(d);
            v.reserve(detail::reserve_limit<T>(n, d));
            for (std::uint64_t i = 0; i < n; ++i) v.push_back(d.get<T>());
        }
        return v;
    }
};

/// std::vector<bool>: count, then the bits packed eight to a byte (unused high bits zero).
template <class A>
struct Codec<std::vector<bool, A>> {
    using V = std::vector<bool, A>;
    static constexpr std::size_t min_encoded_size = 8;

    static void encode(Encoder& e, const V& v) {
        e.write_size(v.size());
        std::string packed((v.size() + 7) / 8, '\0');
        for (std::size_t i = 0; i < v.size(); ++i)
            if (v[i]) packed[i / 8] = static_cast<char>(packed[i / 8] | (1 << (i % 8)));
        e.write(packed.data(), packed.size());
    }
    static V decode(Decoder& d) {
        const std::uint64_t n = d.read_size(0);  // bounded just below, in bits
        const std::uint64_t bytes = n / 8 + (n % 8 != 0 ? 1 : 0);
        if (bytes > d.remaining())
            throw DecodeError("mp::Codec: std::vector<bool> of " + std::to_string(n) +
                              " bits exceeds the remaining " + std::to_string(d.remaining()) +
                              " bytes (truncated or malformed input)");
        std::string_view packed = d.read_view(static_cast<std::size_t>(bytes));
        if (n % 8 != 0 && (static_cast<unsigned char>(packed.back()) >> (n % 8)) != 0)
            throw DecodeError("mp::Codec: std::vector<bool> has bits set past its length");
        V v(static_cast<std::size_t>(n));
        for (std::size_t i = 0; i < v.size(); ++i)
            v[i] = ((static_cast<unsigned char>(packed[i / 8]) >> (i % 8)) & 1) != 0;
        return v;
    }
};

/// std::array<T, N>: the N elements, no count.
template <class T, std::size_t N>
    requires Encodable<T>
struct Codec<std::array<T, N>> {
    using Arr = std::array<T, N>;
    static constexpr std::size_t min_encoded_size = N * detail::min_encoded_size<T>();
    static constexpr bool mp_bytewise = detail::bytewise<T> && sizeof(Arr) == N * sizeof(T);

    static void encode(Encoder& e, const Arr& a) {
        if constexpr (detail::bytewise<T>) {
            e.write(a.data(), N * sizeof(T));
        } else {
            for (const T& x : a) e.put(x);
        }
    }
    static Arr decode(Decoder& d) {
        if constexpr (detail::bytewise<T> && std::is_default_constructible_v<T>) {
            Arr a{};
            d.read(a.data(), N * sizeof(T));
            return a;
        } else if constexpr (std::is_default_constructible_v<T> && std::is_move_assignable_v<T>) {
            Arr a{};
            for (T& x : a) x = d.get<T>();
            return a;
        } else {
            // No default constructor: build it in place, in order (braced lists evaluate left to
            // right).
            return [&]<std::size_t... I>(std::index_sequence<I...>) {
                return Arr{{(static_cast<void>(I), d.get<T>())...}};
            }(std::make_index_sequence<N>{});
        }
    }
};

namespace detail {

template <class Seq>
void encode_sequence(Encoder& e, const Seq& s) {
    e.write_size(s.size());
    for (const auto& x : s) e.put(x);
}

template <class Seq>
Seq decode_sequence(Decoder& d) {
    using T = typename Seq::value_type;
    const auto n = read_count<T>(d);
    Seq s;
    for (std::uint64_t i = 0; i < n; ++i) s.push_back(d.get<T>());
    return s;
}

}  // namespace detail

/// std::deque<T>: count, then the elements.
template <class T, class A>
    requires Encodable<T>
struct Codec<std::deque<T, A>> {
    static constexpr std::size_t min_encoded_size = 8;
    static void encode(Encoder& e, const std::deque<T, A>& s) { detail::encode_sequence(e, s); }
    static std::deque<T, A> decode(Decoder& d) {
        return detail::decode_sequence<std::deque<T, A>>(d);
    }
};

/// std::list<T>: count, then the elements.
template <class T, class A>
    requires Encodable<T>
struct Codec<std::list<T, A>> {
    static constexpr std::size_t min_encoded_size = 8;
    static void encode(Encoder& e, const std::list<T, A>& s) { detail::encode_sequence(e, s); }
    static std::list<T, A> decode(Decoder& d) {
        return detail::decode_sequence<std::list<T, A>>(d);
    }
};

// ---- associative containers -------------------------------------------------------------------

namespace detail {

template <class M>
void encode_map(Encoder& e, const M& m) {
    e.write_size(m.size());
    for (const auto& [k, v] : m) {
        e.put(k);
        e.put(v);
    }
}

// A map or set decoded from a count and its entries. A unique-key container refuses a repeated
// key rather than silently dropping an entry. The hint (end) keeps the sender's order among equal
// keys of a multimap and makes sorted input linear for a std::map.
template <class M, bool IsMap, bool UniqueKeys>
M decode_associative(Decoder& d) {
    using K = typename M::key_type;
    std::uint64_t n;
    if constexpr (IsMap) {
        using V = typename M::mapped_type;
        n = d.read_size(std::max<std::size_t>(1, min_encoded_size<K>() + min_encoded_size<V>()));
    } else {
        n = read_count<K>(d);
    }
    M m;
    if constexpr (requires { m.reserve(std::size_t{}); })
        m.reserve(reserve_limit<typename M::value_type>(n, d));
    for (std::uint64_t i = 0; i < n; ++i) {
        const std::size_t before = m.size();
        if constexpr (IsMap) {
            K k = d.get<K>();
            m.emplace_hint(m.end(), std::move(k), d.get<typename M::mapped_type>());
        } else {
            m.emplace_hint(m.end(), d.get<K>());
        }
        if constexpr (UniqueKeys)
            if (m.size() == before)
                throw DecodeError("mp::Codec: duplicate key in a map or set (malformed input)");
    }
    return m;
}

}  // namespace detail

/// std::map<K, V>: count, then key/value pairs in order.
template <class K, class V, class C, class A>
    requires Encodable<K> && Encodable<V>
struct Codec<std::map<K, V, C, A>> {
    using M = std::map<K, V, C, A>;
    static constexpr std::size_t min_encoded_size = 8;
    static void encode(Encoder& e, const M& m) { detail::encode_map(e, m); }
    static M decode(Decoder& d) { return detail::decode_associative<M, true, true>(d); }
};

/// std::multimap<K, V>: count, then key/value pairs in order.
template <class K, class V, class C, class A>
    requires Encodable<K> && Encodable<V>
struct Codec<std::multimap<K, V, C, A>> {
    using M = std::multimap<K, V, C, A>;
    static constexpr std::size_t min_encoded_size = 8;
    static void encode(Encoder& e, const M& m) { detail::encode_map(e, m); }
    static M decode(Decoder& d) { return detail::decode_associative<M, true, false>(d); }
};

/// std::unordered_map<K, V>: count, then key/value pairs.
template <class K, class V, class H, class E, class A>
    requires Encodable<K> && Encodable<V>
struct Codec<std::unordered_map<K, V, H, E, A>> {
    using M = std::unordered_map<K, V, H, E, A>;
    static constexpr std::size_t min_encoded_size = 8;
    static void encode(Encoder& e, const M& m) { detail::encode_map(e, m); }
    static M decode(Decoder& d) { return detail::decode_associative<M, true, true>(d); }
};

/// std::unordered_multimap<K, V>: count, then key/value pairs.
template <class K, class V, class H, class E, class A>
    requires Encodable<K> && Encodable<V>
struct Codec<std::unordered_multimap<K, V, H, E, A>> {
    using M = std::unordered_multimap<K, V, H, E, A>;
    static constexpr std::size_t min_encoded_size = 8;
    static void encode(Encoder& e, const M& m) { detail::encode_map(e, m); }
    static M decode(Decoder& d) { return detail::decode_associative<M, true, false>(d); }
};

/// std::set<K>: count, then the keys in order.
template <class K, class C, class A>
    requires Encodable<K>
struct Codec<std::set<K, C, A>> {
    using S = std::set<K, C, A>;
    static constexpr std::size_t min_encoded_size = 8;
    static void encode(Encoder& e, const S& s) { detail::encode_sequence(e, s); }
    static S decode(Decoder& d) { return detail::decode_associative<S, false, true>(d); }
};

/// std::multiset<K>: count, then the keys in order.
template <class K, class C, class A>
    requires Encodable<K>
struct Codec<std::multiset<K, C, A>> {
    using S = std::multiset<K, C, A>;
    static constexpr std::size_t min_encoded_size = 8;
    static void encode(Encoder& e, const S& s) { detail::encode_sequence(e, s); }
    static S decode(Decoder& d) { return detail::decode_associative<S, false, false>(d); }
};

/// std::unordered_set<K>: count, then the keys.
template <class K, class H, class E, class A>
    requires Encodable<K>
struct Codec<std::unordered_set<K, H, E, A>> {
    using S = std::unordered_set<K, H, E, A>;
    static constexpr std::size_t min_encoded_size = 8;
    static void encode(Encoder& e, const S& s) { detail::encode_sequence(e, s); }
    static S decode(Decoder& d) { return detail::decode_associative<S, false, true>(d); }
};

/// std::unordered_multiset<K>: count, then the keys.
template <class K, class H, class E, class A>
    requires Encodable<K>
struct Codec<std::unordered_multiset<K, H, E, A>> {
    using S = std::unordered_multiset<K, H, E, A>;
    static constexpr std::size_t min_encoded_size = 8;
    static void encode(Encoder& e, const S& s) { detail::encode_sequence(e, s); }
    static S decode(Decoder& d) { return detail::decode_associative<S, false, false>(d); }
};

// ---- optional, variant, tuple, pair -----------------------------------------------------------

/// std::optional<T>: a presence byte (0 or 1), then the value if present.
template <class T>
    requires Encodable<T>
struct Codec<std::optional<T>> {
    static constexpr std::size_t min_encoded_size = 1;
    static void encode(Encoder& e, const std::optional<T>& v) {
        const unsigned char flag = v.has_value() ? 1 : 0;
        e.write(&flag, 1);
        if (v) e.put(*v);
    }
    static std::optional<T> decode(Decoder& d) {
        if (!detail::read_flag(d, "std::optional")) return std::nullopt;
        return std::optional<T>(std::in_place, d.get<T>());
    }
};

/// std::variant<Ts...>: the alternative's index (4 bytes, checked), then its value. A variant
/// left valueless by an exception cannot be encoded (mp::Error).
template <class... Ts>
    requires(Encodable<Ts> && ...)
struct Codec<std::variant<Ts...>> {
    using V = std::variant<Ts...>;
    static constexpr std::size_t min_encoded_size =
        sizeof(std::uint32_t) + std::min({detail::min_encoded_size<Ts>()...});

    static void encode(Encoder& e, const V& v) {
        if (v.valueless_by_exception())
            throw Error("mp::Codec: cannot encode a valueless std::variant");
        e.put(static_cast<std::uint32_t>(v.index()));
        std::visit([&e](const auto& x) { e.put(x); }, v);
    }
    static V decode(Decoder& d) {
        const auto index = d.get<std::uint32_t>();
        if (index >= sizeof...(Ts))
            throw DecodeError("mp::Codec: std::variant index " + std::to_string(index) +
                              " out of range (the variant has " + std::to_string(sizeof...(Ts)) +
                              " alternatives)");
        return decode_alternative(d, index, std::index_sequence_for<Ts...>{});
    }

private:
    template <std::size_t I>
    static V decode_at(Decoder& d) {
        return V(std::in_place_index<I>, d.get<std::variant_alternative_t<I, V>>());
    }
    template <std::size_t... I>
    static V decode_alternative(Decoder& d, std::uint32_t index, std::index_sequence<I...>) {
        static constexpr V (*table[])(Decoder&) = {&decode_at<I>...};
        return table[index](d);
    }
};

/// std::tuple<Ts...>: the elements in order, no header (std::tuple<> is one zero byte).
template <class... Ts>
    requires(Encodable<Ts> && ...) && (!std::is_reference_v<Ts> && ...)
struct Codec<std::tuple<Ts...>> {
    using Tup = std::tuple<Ts...>;
    static constexpr std::size_t min_encoded_size =
        sizeof...(Ts) == 0 ? 1 : (std::size_t{0} + ... + detail::min_encoded_size<Ts>());

    static void encode(Encoder& e, const Tup& t) {
        if constexpr (sizeof...(Ts) == 0)
            e.put(std::uint8_t{0});
        else
            std::apply([&e](const auto&... x) { (e.put(x), ...); }, t);
    }
    static Tup decode(Decoder& d) {
        if constexpr (sizeof...(Ts) == 0) {
            detail::read_empty(d, "std::tuple<>");
            return {};
        } else {
            return Tup{d.get<Ts>()...};  // a braced list evaluates left to right
        }
    }
};

/// std::pair<A, B>: first, then second.
template <class A, class B>
    requires Encodable<A> && Encodable<B> && (!std::is_reference_v<A>) &&
             (!std::is_reference_v<B>)
struct Codec<std::pair<A, B>> {
    static constexpr std::size_t min_encoded_size =
        detail::min_encoded_size<A>() + detail::min_encoded_size<B>();
    static void encode(Encoder& e, const std::pair<A, B>& p) {
        e.put(p.first);
        e.put(p.second);
    }
    static std::pair<A, B> decode(Decoder& d) {
        return std::pair<A, B>{d.get<A>(), d.get<B>()};  // a braced list evaluates left to right
    }
};

// ---- time and ownership -----------------------------------------------------------------------

/// std::chrono::duration<R, P>: its count.
template <class R, class P>
    requires Encodable<R>
struct Codec<std::chrono::duration<R, P>> {
    using D = std::chrono::duration<R, P>;
    static constexpr std::size_t min_encoded_size = detail::min_encoded_size<R>();
    static constexpr bool mp_bytewise = detail::bytewise<R> && sizeof(D) == sizeof(R);
    static void encode(Encoder& e, const D& v) { e.put(v.count()); }
    static D decode(Decoder& d) { return D(d.get<R>()); }
};

/// std::chrono::time_point<Clock, D>: its time since the clock's epoch. Only a clock whose epoch
/// both processes share makes sense (system_clock anywhere; steady_clock on one machine).
template <class Clock, class D>
    requires Encodable<D>
struct Codec<std::chrono::time_point<Clock, D>> {
    using TP = std::chrono::time_point<Clock, D>;
    static constexpr std::size_t min_encoded_size = detail::min_encoded_size<D>();
    static void encode(Encoder& e, const TP& v) { e.put(v.time_since_epoch()); }
    static TP decode(Decoder& d) { return TP(d.get<D>()); }
};

/// std::unique_ptr<T>: a presence byte (0 or 1), then the pointee. Not for arrays, nor for a
/// polymorphic T (its dynamic type would be lost: use cereal's polymorphic support).
template <class T>
    requires Encodable<T> && (!std::is_array_v<T>) && (!std::is_polymorphic_v<T>)
struct Codec<std::unique_ptr<T>> {
    static constexpr std::size_t min_encoded_size = 1;
    static void encode(Encoder& e, const std::unique_ptr<T>& p) {
        const unsigned char flag = p ? 1 : 0;
        e.write(&flag, 1);
        if (p) e.put(*p);
    }
    static std::unique_ptr<T> decode(Decoder& d) {
        if (!detail::read_flag(d, "std::unique_ptr")) return nullptr;
        return std::make_unique<T>(d.get<T>());
    }
};

// ---- cereal -----------------------------------------------------------------------------------

namespace detail {

/// cereal output archive writing through an mp::Encoder, in the layout of cereal's binary archive.
class CerealOutputArchive
    : public cereal::OutputArchive<CerealOutputArchive, cereal::AllowEmptyClassElision> {
public:
    explicit CerealOutputArchive(Encoder& out)
        : cereal::OutputArchive<CerealOutputArchive, cereal::AllowEmptyClassElision>(this),
          out_(out) {}

    void saveBinary(const void* data, std::size_t n) { out_.write(data, n); }

private:
    Encoder& out_;
};

/// cereal input archive reading through an mp::Decoder, so every read is bounds-checked, every
/// container length (cereal's SizeTag) is checked before cereal allocates for it, and nesting is
/// bounded.
class CerealInputArchive
    : public cereal::InputArchive<CerealInputArchive, cereal::AllowEmptyClassElision> {
public:
    /// cereal steps (one per value it processes, a few per level of the user's types) allowed to
    /// nest in one archive.
    static constexpr std::size_t max_steps = 4 * Decoder::max_depth;

    explicit CerealInputArchive(Decoder& in)
        : cereal::InputArchive<CerealInputArchive, cereal::AllowEmptyClassElision>(this),
          in_(in),
          input_size_(in.remaining()),
          element_budget_(in.remaining()) {}

    void loadBinary(void* data, std::size_t n) { in_.read(data, n); }
    Decoder& decoder() noexcept { return in_; }

    // A container length from cereal. Each element counts as at least one byte, against what
    // remains and against all lengths so far together: without the total, containers of
    // zero-byte elements (empty types) nested in each other could claim the input's size
    // squared.
    void admit_count(std::uint64_t n) {
        if (n > in_.remaining())
            throw DecodeError("mp::Codec: cereal container length " + std::to_string(n) +
                              " exceeds the remaining " + std::to_string(in_.remaining()) +
                              " bytes (truncated or malformed input)");
        if (n > element_budget_)
            throw DecodeError("mp::Codec: cereal container lengths add up to more than the " +
                              std::to_string(input_size_) + " input bytes (malformed input)");
        element_budget_ -= n;
    }

    // Called by cereal around every value. On an exception the count is left high, which is
    // harmless: the archive is abandoned with it.
    void enter() {
        if (steps_ == max_steps)
            throw DecodeError("mp::Codec: cereal values nest deeper than " +
                              std::to_string(max_steps) + " steps (malformed input)");
        ++steps_;
    }
    void leave() noexcept { --steps_; }

private:
    Decoder& in_;
    std::uint64_t input_size_;
    std::uint64_t element_budget_;
    std::size_t steps_ = 0;
};

// What cereal's binary archive defines for itself, for mp's archives. cereal finds these by
// argument-dependent lookup on the archive type.

template <class T>
    requires std::is_arithmetic_v<T>
void CEREAL_SAVE_FUNCTION_NAME(CerealOutputArchive& ar, const T& t) {
    ar.saveBinary(std::addressof(t), sizeof(t));
}

template <class T>
    requires std::is_arithmetic_v<T>
void CEREAL_LOAD_FUNCTION_NAME(CerealInputArchive& ar, T& t) {
    t = ar.decoder().get<T>();  // mp's codec: a bool byte is checked
}

template <class Archive, class T>
CEREAL_ARCHIVE_RESTRICT(CerealInputArchive, CerealOutputArchive)
CEREAL_SERIALIZE_FUNCTION_NAME(Archive& ar, cereal::NameValuePair<T>& t) {
    ar(t.value);
}

template <class T>
void CEREAL_SAVE_FUNCTION_NAME(CerealOutputArchive& ar, const cereal::SizeTag<T>& t) {
    ar(t.size);
}

template <class T>
void CEREAL_LOAD_FUNCTION_NAME(CerealInputArchive& ar, cereal::SizeTag<T>& t) {
    ar(t.size);
    ar.admit_count(static_cast<std::uint64_t>(t.size));  // before cereal resizes anything
}

template <class T>
void CEREAL_SAVE_FUNCTION_NAME(CerealOutputArchive& ar, const cereal::BinaryData<T>& bd) {
    ar.saveBinary(bd.data, static_cast<std::size_t>(bd.size));
}

template <class T>
void CEREAL_LOAD_FUNCTION_NAME(CerealInputArchive& ar, cereal::BinaryData<T>& bd) {
    ar.loadBinary(bd.data, static_cast<std::size_t>(bd.size));
}

// More specialised than cereal's own (empty) prologue/epilogue, so chosen for mp's input archive.
template <class T>
void prologue(CerealInputArchive& ar, const T&) {
    ar.enter();
}
template <class T>
void epilogue(CerealInputArchive& ar, const T&) {
    ar.leave();
}

}  // namespace detail
}  // namespace mp

// Polymorphic types registered with CEREAL_REGISTER_TYPE also bind to mp's archives; minimal
// save/load need the input/output pairing.
CEREAL_REGISTER_ARCHIVE(mp::detail::CerealOutputArchive)
CEREAL_REGISTER_ARCHIVE(mp::detail::CerealInputArchive)
CEREAL_SETUP_ARCHIVE_TRAITS(mp::detail::CerealInputArchive, mp::detail::CerealOutputArchive)

namespace mp {
namespace detail {

template <class T>
concept not_builtin = std::is_class_v<T> && !is_builtin_template<T>::value;

/// Exactly one cereal save and one cereal load (or serialize) for T, as cereal itself requires.
template <class T>
concept cereal_serializable =
    cereal::traits::is_output_serializable<T, CerealOutputArchive>::value &&
    cereal::traits::is_input_serializable<T, CerealInputArchive>::value;

/// No cereal function at all for T: a type that has one (even a broken one) is never byte-copied.
template <class T>
concept no_cereal_functions =
    cereal::traits::detail::count_output_serializers<T, CerealOutputArchive>::value == 0 &&
    cereal::traits::detail::count_input_serializers<T, CerealInputArchive>::value == 0;

template <class T>
concept cereal_kind = not_builtin<T> && cereal_serializable<T>;

template <class T>
concept byte_copied_struct = not_builtin<T> && std::is_trivially_copyable_v<T> &&
                             std::is_standard_layout_v<T> && no_cereal_functions<T>;

}  // namespace detail

/// A user type with a cereal serialize() (member or free) or save()/load() pair, encoded by
/// cereal through mp's archives. A cereal::Exception while encoding becomes mp::Error; a
/// cereal::Exception, std::bad_alloc or std::length_error while decoding becomes mp::DecodeError.
template <class T>
    requires detail::cereal_kind<T>
struct Codec<T> {
    // A value that cereal writes as nothing (an empty type) is sent as one zero byte instead, so
    // that every value takes at least one byte and a container of them has a length to check.
    static constexpr std::size_t min_encoded_size = 1;

    static void encode(Encoder& e, const T& v) {
        const std::size_t start = e.bytes().size();
        try {
            detail::CerealOutputArchive ar(e);
            ar(v);
        } catch (const cereal::Exception& ex) {  // e.g. an unregistered polymorphic type
            throw Error(std::string("mp::Codec: cereal: ") + ex.what());
        }
        if (e.bytes().size() == start) e.put(std::uint8_t{0});
    }
    static T decode(Decoder& d) {
        const std::size_t start = d.position();
        T v = decode_with_cereal(d);
        if (d.position() == start) detail::read_empty(d, "empty cereal value");
        return v;
    }

private:
    static T decode_with_cereal(Decoder& d) {
        try {
            detail::CerealInputArchive ar(d);
            if constexpr (std::is_default_constructible_v<T>) {
                T v{};
                ar(v);
                return v;
            } else {
                // A private default constructor opened to cereal by `friend class cereal::access`.
                std::unique_ptr<T> v(cereal::access::construct<T>());
                ar(*v);
                return std::move(*v);
            }
        } catch (const cereal::Exception& ex) {
            throw DecodeError(std::string("mp::Codec: cereal: ") + ex.what() +
                              " (malformed input)");
        } catch (const std::bad_alloc&) {
            throw DecodeError("mp::Codec: cereal: out of memory while decoding (malformed input?)");
        } catch (const std::length_error& ex) {
            throw DecodeError(std::string("mp::Codec: cereal: ") + ex.what() +
                              " (malformed input)");
        }
    }
};

/// A trivially copyable, standard-layout class without cereal functions: its object bytes. Any
/// pointer or reference member is copied as a meaningless address, and bool or enum members are
/// not checked when decoding; give such a type a cereal serialize() or a Codec instead.
template <class T>
    requires detail::byte_copied_struct<T>
struct Codec<T> {
    static constexpr std::size_t min_encoded_size = sizeof(T);
    static constexpr bool mp_bytewise = true;
    static void encode(Encoder& e, const T& v) { e.write(std::addressof(v), sizeof(T)); }
    static T decode(Decoder& d) {
        std::array<std::byte, sizeof(T)> raw;
        d.read(raw.data(), sizeof(T));
        return std::bit_cast<T>(raw);  // needs no default constructor
    }
};

// ---- whole buffers ----------------------------------------------------------------------------

// encode/decode are deliberately unconstrained: for a type without a codec the static_assert in
// Codec names the problem, where a `requires Encodable<T>` would only say "no matching function".

/// Encodes one value into a fresh buffer.
template <class T>
std::string encode(const T& value) {
    Encoder e;
    e.put(value);
    return e.take();
}

/// Decodes a whole buffer into a T; throws DecodeError on truncated, oversized, malformed or
/// trailing bytes.
template <class T>
T decode(std::string_view bytes) {
    Decoder d(bytes);
    T v = d.get<T>();
    d.finish();
    return v;
}

}  // namespace mp

#undef MP_NO_CODEC_MESSAGE
