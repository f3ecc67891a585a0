/// Tests for mp::Codec (include/mp/serialize.hpp): round trips of every built-in kind, cereal
/// types, user specialisations, byte-copied structs, and decoding of hostile input (truncated,
/// forged lengths, bad tags, trailing bytes, deep nesting, random corruption), which must always
/// end in mp::DecodeError, never a crash, a hang or a huge allocation.

#include <atomic>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <list>
#include <map>
#include <memory>
#include <new>
#include <optional>
#include <random>
#include <set>
#include <span>
#include <string>
#include <string_view>
#include <tuple>
#include <unordered_map>
#include <unordered_set>
#include <variant>
#include <vector>

#include <cereal/types/map.hpp>
#include <cereal/types/memory.hpp>
#include <cereal/types/optional.hpp>
#include <cereal/types/polymorphic.hpp>
#include <cereal/types/string.hpp>
#include <cereal/types/variant.hpp>
#include <cereal/types/vector.hpp>
#include <gtest/gtest.h>

#include "mp/serialize.hpp"

// ---- allocation watch -------------------------------------------------------------------------
// The largest single allocation (and the total) since the last reset, so a test can show that a
// forged length was refused before anything was allocated for it. Replacing operator new is confined to this test
// binary (each *_test.cpp is its own program).

namespace {
std::atomic<std::size_t> g_largest_allocation{0};
std::atomic<std::size_t> g_total_allocated{0};

void note_allocation(std::size_t n) noexcept {
    g_total_allocated.fetch_add(n, std::memory_order_relaxed);
    std::size_t seen = g_largest_allocation.load(std::memory_order_relaxed);
    while (n > seen && !g_largest_allocation.compare_exchange_weak(seen, n)) {
    }
}
}  // namespace

// noinline: once inlined, GCC would see malloc'd memory from `new` reach free() in `delete` and
// warn (-Wmismatched-new-delete), although the pair is consistent.
[[gnu::noinline]] void* operator new(std::size_t n) {
    note_allocation(n);
    if (void* p = std::malloc(n == 0 ? 1 : n)) return p;
    throw std::bad_alloc();
}
[[gnu::noinline]] void operator delete(void* p) noexcept { std::free(p); }
[[gnu::noinline]] void operator delete(void* p, std::size_t) noexcept { std::free(p); }

namespace {

using namespace std::chrono_literals;

constexpr std::size_t kMiB = std::size_t{1} << 20;

/// Resets the allocation watch for the rest of the scope.
struct AllocationWatch {
    AllocationWatch() {
        g_largest_allocation.store(0);
        g_total_allocated.store(0);
    }
    std::size_t largest() const { return g_largest_allocation.load(); }
    std::size_t total() const { return g_total_allocated.load(); }
};

/// Every strict prefix of value's encoding must be refused with DecodeError.
template <class T>
void expect_every_prefix_refused(const T& value) {
    const std::string bytes = mp::encode(value);
    ASSERT_NO_THROW((void)mp::decode<T>(bytes));
    for (std::size_t n = 0; n < bytes.size(); ++n)
        EXPECT_THROW((void)mp::decode<T>(std::string_view(bytes).substr(0, n)), mp::DecodeError)
            << "prefix of " << n << " of " << bytes.size() << " bytes";
}

template <class T>
T round_trip(const T& v) {
    return mp::decode<T>(mp::encode(v));
}

/// Decoding `bytes` as T must throw mp::DecodeError whose message contains `needle`.
template <class T>
void expect_decode_error(std::string_view bytes, std::string_view needle) {
    try {
        (void)mp::decode<T>(bytes);
        ADD_FAILURE() << "decoding did not throw; expected an error containing '" << needle << "'";
    } catch (const mp::DecodeError& e) {
        EXPECT_NE(std::string_view(e.what()).find(needle), std::string_view::npos)
            << "message: " << e.what() << "\nexpected to contain: " << needle;
    }
}

/// Overwrites 8 bytes at `offset` with a little-endian length.
void patch_size(std::string& bytes, std::size_t offset, std::uint64_t n) {
    ASSERT_LE(offset + 8, bytes.size());
    for (int i = 0; i < 8; ++i) bytes[offset + i] = static_cast<char>((n >> (8 * i)) & 0xff);
}

constexpr std::uint64_t kForged = std::uint64_t{1} << 60;

}  // namespace

// ---- user types -------------------------------------------------------------------------------

namespace user {

/// Has no codec: not trivially copyable, no cereal function, no specialisation.
struct NoCodec {
    std::string text;
};

/// Trivially copyable, standard layout: byte-copied.
struct Pod {
    std::int32_t id;
    double weight;
    char tag[4];
    bool operator==(const Pod& o) const {
        return id == o.id && weight == o.weight && std::memcmp(tag, o.tag, sizeof tag) == 0;
    }
};

/// Trivially copyable but without a default constructor: decoded without one.
struct PodNoDefault {
    explicit PodNoDefault(int v) : value(v) {}
    int value;
    bool operator==(const PodNoDefault&) const = default;
};

/// cereal: member serialize.
struct MemberSerialize {
    std::string name;
    std::vector<int> values;
    std::map<std::string, std::optional<double>> extra;
    template <class Archive>
    void serialize(Archive& ar) {
        ar(name, values, extra);
    }
    bool operator==(const MemberSerialize&) const = default;
};

/// cereal: free serialize.
struct FreeSerialize {
    int a = 0;
    std::vector<std::string> words;
    std::variant<int, std::string> choice;
    bool flag = false;
    bool operator==(const FreeSerialize&) const = default;
};
template <class Archive>
void serialize(Archive& ar, FreeSerialize& f) {
    ar(f.a, f.words, f.choice, f.flag);
}

/// cereal: save/load member pair (the wire form differs from the object on purpose).
class SaveLoad {
public:
    SaveLoad() = default;
    explicit SaveLoad(int x) : x_(x) {}
    int x() const { return x_; }
    template <class Archive>
    void save(Archive& ar) const {
        ar(std::to_string(x_));
    }
    template <class Archive>
    void load(Archive& ar) {
        std::string s;
        ar(s);
        x_ = std::stoi(s);
    }

private:
    int x_ = 0;
};

/// cereal: free save/load pair.
struct FreeSaveLoad {
    std::vector<int> v;
};
template <class Archive>
void save(Archive& ar, const FreeSaveLoad& f) {
    ar(f.v);
}
template <class Archive>
void load(Archive& ar, FreeSaveLoad& f) {
    ar(f.v);
}

/// cereal: minimal save/load.
struct Minimal {
    int v = 0;
    template <class Archive>
    std::int64_t save_minimal(const Archive&) const {
        return v;
    }
    template <class Archive>
    void load_minimal(const Archive&, const std::int64_t& x) {
        v = static_cast<int>(x);
    }
};

/// cereal: versioned serialize.
struct Versioned {
    int v = 0;
    std::uint32_t loaded_version = 0;
    template <class Archive>
    void serialize(Archive& ar, const std::uint32_t version) {
        ar(v);
        loaded_version = version;
    }
};

/// Trivially copyable AND has a cereal serialize: cereal must win (it sends only `a`).
struct TrivialWithCereal {
    int a = 0;
    int b = 0;
    template <class Archive>
    void serialize(Archive& ar) {
        ar(a);
    }
};

/// A recursive cereal type.
struct Tree {
    int value = 0;
    std::vector<Tree> kids;
    template <class Archive>
    void serialize(Archive& ar) {
        ar(value, kids);
    }
    bool operator==(const Tree&) const = default;
};

/// cereal type whose default constructor is private, opened to cereal.
class PrivateDefault {
public:
    explicit PrivateDefault(std::string s) : s_(std::move(s)) {}
    const std::string& s() const { return s_; }
    template <class Archive>
    void serialize(Archive& ar) {
        ar(s_);
    }

private:
    friend class cereal::access;
    PrivateDefault() = default;
    std::string s_;
};

/// cereal type that writes nothing.
struct EmptyCereal {
    template <class Archive>
    void serialize(Archive&) {}
    bool operator==(const EmptyCereal&) const = default;
};

/// cereal polymorphism through std::unique_ptr<Base>.
struct Shape {
    virtual ~Shape() = default;
    virtual double area() const = 0;
    template <class Archive>
    void serialize(Archive&) {}
};
struct Square : Shape {
    double side = 0;
    Square() = default;
    explicit Square(double s) : side(s) {}
    double area() const override { return side * side; }
    template <class Archive>
    void serialize(Archive& ar) {
        ar(cereal::base_class<Shape>(this), side);
    }
};

/// A user specialisation (see below).
struct Celsius {
    double degrees = 0;
    std::string sensor;
    bool operator==(const Celsius&) const = default;
};

/// Trivially copyable, but the user's Codec must be used, also inside a vector (no bulk copy).
struct Offset {
    std::int32_t v;
    bool operator==(const Offset&) const = default;
};

/// A recursive type through a user Codec: exercises Decoder::max_depth.
struct Chain {
    std::vector<Chain> next;
};

/// Holds cereal's own containers of empty elements.
struct EmptyHolder {
    std::vector<std::vector<EmptyCereal>> v;
    template <class Archive>
    void serialize(Archive& ar) {
        ar(v);
    }
};

/// Has a codec, but copying it throws: leaves a variant valueless.
struct ThrowingCopy {
    ThrowingCopy() = default;
    ThrowingCopy(const ThrowingCopy&) { throw std::runtime_error("copy"); }
    ThrowingCopy& operator=(const ThrowingCopy&) = default;
};

}  // namespace user

CEREAL_CLASS_VERSION(user::Versioned, 3)
CEREAL_REGISTER_TYPE(user::Square)
CEREAL_REGISTER_POLYMORPHIC_RELATION(user::Shape, user::Square)

template <>
struct mp::Codec<user::Celsius> {
    static void encode(mp::Encoder& e, const user::Celsius& c) {
        e.put(c.degrees);
        e.put(c.sensor);
    }
    static user::Celsius decode(mp::Decoder& d) {
        return user::Celsius{d.get<double>(), d.get<std::string>()};
    }
    static constexpr std::size_t min_encoded_size = sizeof(double) + 8;
};

template <>
struct mp::Codec<user::Offset> {
    static void encode(mp::Encoder& e, const user::Offset& o) {
        e.put(static_cast<std::int64_t>(o.v) + 1000);
    }
    static user::Offset decode(mp::Decoder& d) {
        return user::Offset{static_cast<std::int32_t>(d.get<std::int64_t>() - 1000)};
    }
};

template <>
struct mp::Codec<user::ThrowingCopy> {
    static void encode(mp::Encoder& e, const user::ThrowingCopy&) { e.put(std::uint8_t{0}); }
    static user::ThrowingCopy decode(mp::Decoder& d) {
        (void)d.get<std::uint8_t>();
        return {};
    }
};

template <>
struct mp::Codec<user::Chain> {
    static void encode(mp::Encoder& e, const user::Chain& c) { e.put(c.next); }
    static user::Chain decode(mp::Decoder& d) {
        return user::Chain{d.get<std::vector<user::Chain>>()};
    }
};

// ---- compile-time: what has a codec and what has not ------------------------------------------

enum class Color : std::uint8_t { red, green };

static_assert(!mp::Encodable<user::NoCodec>);
static_assert(!mp::Encodable<std::vector<user::NoCodec>>);
static_assert(!mp::Encodable<int*>);
static_assert(!mp::Encodable<const char*>);
static_assert(!mp::Encodable<void (*)()>);
static_assert(!mp::Encodable<std::string_view>);
static_assert(!mp::Encodable<std::span<int>>);
static_assert(!mp::Encodable<std::array<int*, 2>>);  // not byte-copied as addresses
static_assert(!mp::Encodable<std::optional<user::NoCodec>>);
static_assert(!mp::Encodable<std::map<int, user::NoCodec>>);
static_assert(!mp::Encodable<std::map<user::NoCodec, int>>);
static_assert(!mp::Encodable<std::set<user::NoCodec>>);
static_assert(!mp::Encodable<std::variant<int, user::NoCodec>>);
static_assert(!mp::Encodable<std::tuple<int, user::NoCodec>>);
static_assert(!mp::Encodable<std::pair<user::NoCodec, int>>);
static_assert(!mp::Encodable<std::unique_ptr<user::NoCodec>>);
static_assert(!mp::Encodable<std::deque<std::list<user::NoCodec>>>);

static_assert(mp::Encodable<int>);
static_assert(mp::Encodable<const std::string&>);
static_assert(mp::Encodable<Color>);
static_assert(mp::Encodable<std::byte>);
static_assert(mp::Encodable<user::Pod>);
static_assert(mp::Encodable<user::MemberSerialize>);
static_assert(mp::Encodable<user::FreeSerialize>);
static_assert(mp::Encodable<user::SaveLoad>);
static_assert(mp::Encodable<user::Celsius>);
static_assert(mp::Encodable<std::unique_ptr<user::Shape>>);  // through cereal
static_assert(mp::Encodable<std::shared_ptr<user::MemberSerialize>>);  // cereal's memory.hpp
static_assert(
    mp::Encodable<std::map<std::string, std::vector<std::optional<std::variant<int, std::string>>>>>);

// ---- round trips: scalars ---------------------------------------------------------------------

TEST(SerializeScalar, ArithmeticRoundTrip) {
    EXPECT_EQ(round_trip(0), 0);
    EXPECT_EQ(round_trip(-123456789), -123456789);
    EXPECT_EQ(round_trip(std::int64_t{1} << 62), std::int64_t{1} << 62);
    EXPECT_EQ(round_trip(std::uint8_t{255}), 255);
    EXPECT_EQ(round_trip('x'), 'x');
    EXPECT_EQ(round_trip(char32_t{0x1F600}), char32_t{0x1F600});
    EXPECT_EQ(round_trip(true), true);
    EXPECT_EQ(round_trip(false), false);
    EXPECT_EQ(round_trip(3.25f), 3.25f);
    EXPECT_EQ(round_trip(-1e300), -1e300);
    EXPECT_EQ(round_trip(1.5L), 1.5L);
    EXPECT_EQ(mp::encode(std::int32_t{7}).size(), 4u);
}

TEST(SerializeScalar, EnumsAndBytes) {
    EXPECT_EQ(round_trip(Color::green), Color::green);
    EXPECT_EQ(round_trip(std::byte{0xAB}), std::byte{0xAB});
}

TEST(SerializeScalar, MonostateIsOneByte) {
    EXPECT_EQ(mp::encode(std::monostate{}).size(), 1u);
    EXPECT_EQ(round_trip(std::monostate{}), std::monostate{});
}

// ---- round trips: strings and sequences -------------------------------------------------------

TEST(SerializeString, RoundTrip) {
    EXPECT_EQ(round_trip(std::string()), "");
    EXPECT_EQ(round_trip(std::string("hello")), "hello");
    const std::string with_nul("a\0b\0", 4);
    EXPECT_EQ(round_trip(with_nul), with_nul);
    EXPECT_EQ(mp::encode(std::string("abc")).size(), 8u + 3u);
    EXPECT_EQ(round_trip(std::u16string(u"grüße")), u"grüße");
    EXPECT_EQ(round_trip(std::wstring(L"wide")), L"wide");
}

TEST(SerializeString, Large) {
    std::string big(10 * kMiB, '\0');
    for (std::size_t i = 0; i < big.size(); ++i) big[i] = static_cast<char>(i * 31);
    EXPECT_EQ(round_trip(big), big);
}

TEST(SerializeVector, RoundTrip) {
    EXPECT_EQ(round_trip(std::vector<int>{}), std::vector<int>{});
    EXPECT_EQ(round_trip(std::vector<int>{1, -2, 3}), (std::vector<int>{1, -2, 3}));
    EXPECT_EQ(round_trip(std::vector<std::string>{"a", "", "ccc"}),
              (std::vector<std::string>{"a", "", "ccc"}));
    EXPECT_EQ(round_trip(std::vector<Color>{Color::red, Color::green}),
              (std::vector<Color>{Color::red, Color::green}));
    // Arithmetic elements are one bulk copy: count + raw bytes.
    EXPECT_EQ(mp::encode(std::vector<std::int32_t>{1, 2, 3}).size(), 8u + 12u);
}

TEST(SerializeVector, LargeTenMegabytes) {
    std::vector<double> v(10 * kMiB / sizeof(double));
    for (std::size_t i = 0; i < v.size(); ++i) v[i] = static_cast<double>(i) * 0.5;
    const std::string bytes = mp::encode(v);
    EXPECT_EQ(bytes.size(), 8 + v.size() * sizeof(double));
    EXPECT_EQ(mp::decode<std::vector<double>>(bytes), v);
}

TEST(SerializeVector, Bytes) {
    std::vector<std::byte> buf(1000);
    for (std::size_t i = 0; i < buf.size(); ++i) buf[i] = static_cast<std::byte>(i);
    EXPECT_EQ(round_trip(buf), buf);
    EXPECT_EQ(mp::encode(buf).size(), 8u + 1000u);
}

TEST(SerializeVector, Bool) {
    for (std::size_t n : {0u, 1u, 7u, 8u, 9u, 64u, 1001u}) {
        std::vector<bool> v(n);
        for (std::size_t i = 0; i < n; ++i) v[i] = (i * 7 % 3) == 0;
        EXPECT_EQ(round_trip(v), v) << n;
        EXPECT_EQ(mp::encode(v).size(), 8 + (n + 7) / 8) << n;  // packed bits
    }
    std::vector<bool> big(10'000'000);
    for (std::size_t i = 0; i < big.size(); i += 3) big[i] = true;
    EXPECT_EQ(round_trip(big), big);
}

TEST(SerializeSequence, ArrayDequeList) {
    EXPECT_EQ(round_trip(std::array<int, 3>{1, 2, 3}), (std::array<int, 3>{1, 2, 3}));
    EXPECT_EQ(mp::encode(std::array<int, 3>{1, 2, 3}).size(), 12u);  // no count
    EXPECT_EQ(round_trip(std::array<std::string, 2>{"x", "yz"}),
              (std::array<std::string, 2>{"x", "yz"}));
    EXPECT_EQ(round_trip(std::array<int, 0>{}), (std::array<int, 0>{}));
    EXPECT_EQ(round_trip(std::array<bool, 3>{true, false, true}),
              (std::array<bool, 3>{true, false, true}));
    EXPECT_EQ(round_trip(std::deque<int>{}), std::deque<int>{});
    EXPECT_EQ(round_trip(std::deque<std::string>{"a", "b"}), (std::deque<std::string>{"a", "b"}));
    EXPECT_EQ(round_trip(std::list<double>{1.5, 2.5}), (std::list<double>{1.5, 2.5}));
    EXPECT_EQ(round_trip(std::list<std::vector<int>>{{1}, {}, {2, 3}}),
              (std::list<std::vector<int>>{{1}, {}, {2, 3}}));
}

// ---- round trips: associative containers ------------------------------------------------------

TEST(SerializeAssociative, Maps) {
    const std::map<std::string, int> m{{"one", 1}, {"two", 2}, {"three", 3}};
    EXPECT_EQ(round_trip(m), m);
    EXPECT_EQ(round_trip(std::map<int, int>{}), (std::map<int, int>{}));
    const std::unordered_map<int, std::string> um{{1, "a"}, {2, "b"}, {-5, ""}};
    EXPECT_EQ(round_trip(um), um);
    const std::multimap<int, std::string> mm{{1, "first"}, {1, "second"}, {0, "zero"}, {1, "third"}};
    EXPECT_EQ(round_trip(mm), mm);  // equal keys keep their order
    const std::unordered_multimap<int, int> umm{{1, 1}, {1, 2}, {3, 3}};
    auto back = round_trip(umm);
    EXPECT_EQ(back.size(), 3u);
    EXPECT_EQ(back.count(1), 2u);
    const std::map<int, int, std::greater<>> desc{{1, 1}, {2, 2}};
    EXPECT_EQ(round_trip(desc), desc);
}

TEST(SerializeAssociative, LargeMap) {
    std::map<int, std::string> m;
    for (int i = 0; i < 100'000; ++i) m.emplace(i, std::to_string(i));
    EXPECT_EQ(round_trip(m), m);
}

TEST(SerializeAssociative, Sets) {
    const std::set<std::string> s{"b", "a", "c"};
    EXPECT_EQ(round_trip(s), s);
    const std::unordered_set<int> us{5, 6, 7};
    EXPECT_EQ(round_trip(us), us);
    const std::multiset<int> ms{1, 1, 2};
    EXPECT_EQ(round_trip(ms), ms);
    const std::unordered_multiset<int> ums{3, 3, 4};
    EXPECT_EQ(round_trip(ums), ums);
    EXPECT_EQ(round_trip(std::set<int>{}), std::set<int>{});
}

// ---- round trips: optional, variant, tuple, pair, chrono, unique_ptr -------------------------

TEST(SerializeWrapper, Optional) {
    EXPECT_EQ(round_trip(std::optional<int>{}), std::nullopt);
    EXPECT_EQ(round_trip(std::optional<int>{42}), 42);
    EXPECT_EQ(round_trip(std::optional<std::string>{"s"}), "s");
    EXPECT_EQ(mp::encode(std::optional<int>{}).size(), 1u);
    EXPECT_EQ(mp::encode(std::optional<int>{1}).size(), 5u);
}

TEST(SerializeWrapper, Variant) {
    using V = std::variant<std::monostate, int, std::string, std::vector<double>>;
    EXPECT_EQ(round_trip(V{}), V{});
    EXPECT_EQ(round_trip(V{7}), V{7});
    EXPECT_EQ(round_trip(V{std::string("seven")}), V{std::string("seven")});
    EXPECT_EQ(round_trip(V{std::vector<double>{1.0, 2.0}}), (V{std::vector<double>{1.0, 2.0}}));
    // Repeated alternative types are told apart by index.
    using Twice = std::variant<int, int>;
    const Twice second(std::in_place_index<1>, 5);
    EXPECT_EQ(round_trip(second).index(), 1u);
    EXPECT_EQ(std::get<1>(round_trip(second)), 5);
}

TEST(SerializeWrapper, TupleAndPair) {
    const auto t = std::make_tuple(1, std::string("two"), 3.0, std::vector<int>{4});
    EXPECT_EQ(round_trip(t), t);
    EXPECT_EQ(round_trip(std::tuple<>{}), std::tuple<>{});
    EXPECT_EQ(round_trip(std::pair<std::string, int>{"k", 9}), (std::pair<std::string, int>{"k", 9}));
    const std::tuple<user::PodNoDefault, int> nd{user::PodNoDefault(3), 4};
    EXPECT_EQ(round_trip(nd), nd);
}

TEST(SerializeChrono, DurationsAndTimePoints) {
    EXPECT_EQ(round_trip(1500ms), 1500ms);
    EXPECT_EQ(round_trip(std::chrono::nanoseconds(-5)), std::chrono::nanoseconds(-5));
    EXPECT_EQ(round_trip(std::chrono::duration<double>(2.5)), std::chrono::duration<double>(2.5));
    EXPECT_EQ(round_trip(std::chrono::hours(24)), std::chrono::hours(24));
    const auto now = std::chrono::system_clock::now();
    EXPECT_EQ(round_trip(now), now);
    const auto t0 = std::chrono::steady_clock::now();
    EXPECT_EQ(round_trip(t0), t0);
    const std::vector<std::chrono::microseconds> many{1us, 2us, 3us};
    EXPECT_EQ(round_trip(many), many);
    EXPECT_EQ(mp::encode(many).size(), 8u + 3 * sizeof(std::int64_t));
}

TEST(SerializeWrapper, UniquePtr) {
    EXPECT_EQ(round_trip(std::unique_ptr<int>{}), nullptr);
    auto back = round_trip(std::make_unique<std::string>("owned"));
    ASSERT_NE(back, nullptr);
    EXPECT_EQ(*back, "owned");
}

// ---- round trips: nesting ---------------------------------------------------------------------

using Nested = std::map<std::string, std::vector<std::optional<std::variant<int, std::string>>>>;

Nested sample_nested() {
    return Nested{
        {"alpha", {1, std::string("one"), std::nullopt}},
        {"", {}},
        {"gamma", {std::nullopt, -7, std::string(40, 'g')}},
    };
}

TEST(SerializeNested, RoundTrip) {
    EXPECT_EQ(round_trip(sample_nested()), sample_nested());
    using Deep = std::vector<std::map<int, std::set<std::tuple<int, std::string>>>>;
    const Deep deep{{{1, {{1, "a"}, {2, "b"}}}}, {}, {{3, {}}}};
    EXPECT_EQ(round_trip(deep), deep);
    const std::unordered_map<std::string, std::pair<std::list<int>, std::deque<bool>>> mixed{
        {"x", {{1, 2}, {true, false}}}};
    EXPECT_EQ(round_trip(mixed), mixed);
}

// ---- byte-copied structs ----------------------------------------------------------------------

TEST(SerializePod, TriviallyCopyableStruct) {
    const user::Pod p{42, 2.5, {'a', 'b', 'c', 'd'}};
    EXPECT_EQ(mp::encode(p).size(), sizeof(user::Pod));
    EXPECT_EQ(round_trip(p), p);
    EXPECT_EQ(round_trip(user::PodNoDefault(9)), user::PodNoDefault(9));

    std::vector<user::Pod> many(10'000);
    for (std::size_t i = 0; i < many.size(); ++i)
        many[i] = user::Pod{static_cast<std::int32_t>(i), static_cast<double>(i) / 3, {'x', 0, 0, 0}};
    EXPECT_EQ(mp::encode(many).size(), 8 + many.size() * sizeof(user::Pod));  // one bulk copy
    EXPECT_EQ(round_trip(many), many);
    const std::array<user::Pod, 2> arr{user::Pod{1, 1.0, {}}, user::Pod{2, 2.0, {}}};
    EXPECT_EQ(round_trip(arr), arr);
    const std::vector<user::PodNoDefault> nd{user::PodNoDefault(1), user::PodNoDefault(2)};
    EXPECT_EQ(round_trip(nd), nd);
}

// ---- cereal -----------------------------------------------------------------------------------

TEST(SerializeCereal, MemberSerialize) {
    const user::MemberSerialize v{"name", {1, 2, 3}, {{"k", 1.5}, {"none", std::nullopt}}};
    EXPECT_EQ(round_trip(v), v);
    EXPECT_EQ(round_trip(user::MemberSerialize{}), user::MemberSerialize{});
}

TEST(SerializeCereal, FreeSerialize) {
    const user::FreeSerialize v{7, {"a", "bb"}, std::string("choice"), true};
    EXPECT_EQ(round_trip(v), v);
}

TEST(SerializeCereal, SaveLoadPairs) {
    EXPECT_EQ(round_trip(user::SaveLoad(1234)).x(), 1234);
    EXPECT_EQ(round_trip(user::FreeSaveLoad{{5, 6}}).v, (std::vector<int>{5, 6}));
    EXPECT_EQ(round_trip(user::Minimal{-17}).v, -17);
}

TEST(SerializeCereal, Versioned) {
    const auto back = round_trip(user::Versioned{5, 0});
    EXPECT_EQ(back.v, 5);
    EXPECT_EQ(back.loaded_version, 3u);
}

TEST(SerializeCereal, PreferredOverByteCopy) {
    // The type is trivially copyable, but its serialize() sends only `a`.
    const std::string bytes = mp::encode(user::TrivialWithCereal{1, 2});
    EXPECT_EQ(bytes.size(), sizeof(int));
    const auto back = mp::decode<user::TrivialWithCereal>(bytes);
    EXPECT_EQ(back.a, 1);
    EXPECT_EQ(back.b, 0);
}

TEST(SerializeCereal, InsideBuiltinContainers) {
    const std::vector<user::MemberSerialize> v{{"a", {1}, {}}, {"b", {}, {{"x", 2.0}}}};
    EXPECT_EQ(round_trip(v), v);
    const std::map<int, user::FreeSerialize> m{{1, {1, {"w"}, 3, false}}};
    EXPECT_EQ(round_trip(m), m);
    const std::optional<user::Tree> t = user::Tree{1, {{2, {}}, {3, {{4, {}}}}}};
    EXPECT_EQ(round_trip(t), t);
    // An empty cereal value is one zero byte in mp's containers, so their length is checkable.
    const std::vector<user::EmptyCereal> empties(5);
    EXPECT_EQ(mp::encode(empties).size(), 8u + 5u);
    EXPECT_EQ(round_trip(empties), empties);
    // Inside cereal's own vector they take nothing: allowed while bytes follow (the limit).
    EXPECT_EQ(round_trip(user::EmptyHolder{{{user::EmptyCereal{}}, {}}}).v.size(), 2u);
    expect_decode_error<user::EmptyHolder>(mp::encode(user::EmptyHolder{{{}, {user::EmptyCereal{}}}}),
                                           "exceeds the remaining 0 bytes");
}

TEST(SerializeCereal, RecursiveAndPrivateDefault) {
    user::Tree deep{0, {}};
    user::Tree* at = &deep;
    for (int i = 1; i < 500; ++i) {
        at->kids.push_back(user::Tree{i, {}});
        at = &at->kids.back();
    }
    EXPECT_EQ(round_trip(deep), deep);
    EXPECT_EQ(round_trip(user::PrivateDefault("p")).s(), "p");
}

TEST(SerializeCereal, SmartPointersAndPolymorphism) {
    const auto shared = std::make_shared<user::MemberSerialize>(user::MemberSerialize{"s", {1}, {}});
    const auto back = round_trip(shared);
    ASSERT_NE(back, nullptr);
    EXPECT_EQ(*back, *shared);

    std::unique_ptr<user::Shape> shape = std::make_unique<user::Square>(3.0);
    const auto shape_back = round_trip(shape);
    ASSERT_NE(shape_back, nullptr);
    EXPECT_EQ(shape_back->area(), 9.0);
    EXPECT_NE(dynamic_cast<user::Square*>(shape_back.get()), nullptr);
}

// ---- user specialisations ---------------------------------------------------------------------

TEST(SerializeUserCodec, Specialisation) {
    const user::Celsius c{21.5, "kitchen"};
    EXPECT_EQ(round_trip(c), c);
    const std::vector<user::Celsius> many{c, {-3.0, ""}};
    EXPECT_EQ(round_trip(many), many);
}

TEST(SerializeUserCodec, WinsOverByteCopyAlsoInVectors) {
    const user::Offset o{5};
    EXPECT_EQ(mp::encode(o).size(), 8u);  // the user's int64, not the struct's 4 bytes
    EXPECT_EQ(round_trip(o), o);
    const std::vector<user::Offset> v{{1}, {2}, {3}};
    EXPECT_EQ(mp::encode(v).size(), 8u + 3 * 8u);  // element by element through the user's codec
    EXPECT_EQ(round_trip(v), v);
}

// ---- hostile input ----------------------------------------------------------------------------

TEST(SerializeMalformed, EveryTruncationOfNestedValue) {
    expect_every_prefix_refused(sample_nested());
}

TEST(SerializeMalformed, EveryTruncationOfEveryKind) {
    using All = std::tuple<bool, std::string, std::vector<int>, std::vector<bool>,
                           std::array<std::int16_t, 2>, std::deque<std::string>, std::list<int>,
                           std::set<int>, std::unordered_map<int, std::string>, std::optional<int>,
                           std::variant<int, std::string>, std::pair<int, char>, std::monostate,
                           std::chrono::milliseconds, std::optional<std::string>, user::Pod,
                           user::Celsius, user::MemberSerialize, user::FreeSerialize>;
    const All value{true,
                    "str",
                    {1, 2},
                    {true, false, true},
                    {3, 4},
                    {"d"},
                    {5},
                    {6, 7},
                    {{8, "eight"}},
                    9,
                    std::string("ten"),
                    {11, 'c'},
                    {},
                    12ms,
                    std::string("thirteen"),
                    user::Pod{14, 15.0, {}},
                    user::Celsius{16.0, "s"},
                    user::MemberSerialize{"m", {17}, {{"o", 18.0}}},
                    user::FreeSerialize{19, {"w"}, 20, true}};
    EXPECT_EQ(round_trip(value), value);
    expect_every_prefix_refused(value);
    expect_every_prefix_refused(std::make_unique<std::vector<std::string>>(2, "up"));
    expect_every_prefix_refused(std::multimap<std::string, std::set<std::int64_t>>{{"k", {1, 2}}});
    expect_every_prefix_refused(std::chrono::system_clock::now());
    expect_every_prefix_refused(std::vector<user::EmptyCereal>(3));
    expect_every_prefix_refused(std::tuple<>{});
}

TEST(SerializeMalformed, EveryTruncationOfCerealValue) {
    expect_every_prefix_refused(user::Tree{1, {{2, {}}, {3, {{4, {}}}}}});
    expect_every_prefix_refused(
        user::MemberSerialize{"name", {1, 2, 3}, {{"k", 1.5}, {"none", std::nullopt}}});
    expect_every_prefix_refused(user::FreeSerialize{1, {"a", "b"}, std::string("c"), true});
    expect_every_prefix_refused(user::SaveLoad(77));
    expect_every_prefix_refused(std::make_shared<std::string>("shared"));
    expect_every_prefix_refused(user::EmptyCereal{});
}

TEST(SerializeMalformed, ForgedLengthsThrowWithoutAllocating) {
    AllocationWatch watch;
    {
        std::string b = mp::encode(std::vector<int>{1, 2});
        patch_size(b, 0, kForged);
        expect_decode_error<std::vector<int>>(b, "exceeds the remaining");
    }
    {
        std::string b = mp::encode(std::string("abc"));
        patch_size(b, 0, kForged);
        expect_decode_error<std::string>(b, "exceeds the remaining");
    }
    {
        std::string b = mp::encode(std::vector<std::string>{"a", "b"});
        patch_size(b, 0, kForged);
        expect_decode_error<std::vector<std::string>>(b, "exceeds the remaining");
        // The inner length, too.
        b = mp::encode(std::vector<std::string>{"a", "b"});
        patch_size(b, 8, kForged);
        expect_decode_error<std::vector<std::string>>(b, "exceeds the remaining");
    }
    {
        std::string b = mp::encode(std::vector<bool>{true, false});
        patch_size(b, 0, kForged);
        expect_decode_error<std::vector<bool>>(b, "exceeds the remaining");
        patch_size(b, 0, ~std::uint64_t{0});  // n + 7 would overflow
        expect_decode_error<std::vector<bool>>(b, "exceeds the remaining");
    }
    {
        std::string b = mp::encode(std::map<int, int>{{1, 2}});
        patch_size(b, 0, kForged);
        expect_decode_error<std::map<int, int>>(b, "exceeds the remaining");
        b = mp::encode(std::unordered_map<int, int>{{1, 2}});
        patch_size(b, 0, kForged);
        expect_decode_error<std::unordered_map<int, int>>(b, "exceeds the remaining");
    }
    {
        std::string b = mp::encode(std::deque<int>{1});
        patch_size(b, 0, kForged);
        expect_decode_error<std::deque<int>>(b, "exceeds the remaining");
        b = mp::encode(std::set<int>{1});
        patch_size(b, 0, kForged);
        expect_decode_error<std::set<int>>(b, "exceeds the remaining");
    }
    {
        // Through cereal: the SizeTag of MemberSerialize::name and ::values.
        std::string b = mp::encode(user::MemberSerialize{"abc", {1}, {}});
        patch_size(b, 0, kForged);
        expect_decode_error<user::MemberSerialize>(b, "exceeds the remaining");
        b = mp::encode(user::MemberSerialize{"abc", {1}, {}});
        patch_size(b, 8 + 3, kForged);
        expect_decode_error<user::MemberSerialize>(b, "exceeds the remaining");
    }
    EXPECT_LT(watch.largest(), kMiB);
}

TEST(SerializeMalformed, PlausibleLengthOfLargeElementsReservesLittle) {
    // A count the bytes could hold at one byte per element, of elements that take 4 KiB in memory
    // but can take one byte on the wire: refused at the first element, having reserved about the
    // input's size, not count * 4 KiB (16 MiB here).
    using Big = std::optional<std::array<char, 4096>>;
    mp::Encoder e;
    e.write_size(4096);
    e.put(std::uint8_t{2});  // a bad flag: the first element fails
    for (int i = 1; i < 4096; ++i) e.put(std::uint8_t{0});
    const std::string bytes = e.take();
    AllocationWatch watch;
    expect_decode_error<std::vector<Big>>(bytes, "invalid std::optional flag byte 2");
    EXPECT_LT(watch.total(), 64 * 1024u);
}

TEST(SerializeMalformed, BadTags) {
    {
        std::string b = mp::encode(std::variant<int, std::string>(5));
        b[0] = 7;  // index, 4 bytes
        expect_decode_error<std::variant<int, std::string>>(b, "std::variant index 7 out of range");
    }
    {
        std::string b = mp::encode(std::optional<int>(5));
        b[0] = 2;
        expect_decode_error<std::optional<int>>(b, "invalid std::optional flag byte 2");
    }
    {
        std::string b = mp::encode(std::unique_ptr<int>());
        b[0] = static_cast<char>(0xff);
        expect_decode_error<std::unique_ptr<int>>(b, "invalid std::unique_ptr flag byte 255");
    }
    {
        std::string b = mp::encode(true);
        b[0] = 2;
        expect_decode_error<bool>(b, "invalid bool byte 2");
        expect_decode_error<std::vector<std::tuple<bool>>>(
            std::string("\x01\0\0\0\0\0\0\0\x05", 9), "invalid bool byte 5");
    }
    {
        std::string b = mp::encode(std::monostate{});
        b[0] = 1;
        expect_decode_error<std::monostate>(b, "invalid std::monostate byte 1");
    }
    {
        std::string b = mp::encode(std::vector<bool>{true, true, true});
        b[8] = static_cast<char>(0xff);  // bits beyond the third set
        expect_decode_error<std::vector<bool>>(b, "bits set past its length");
    }
}

TEST(SerializeMalformed, BadTagsInsideCereal) {
    {
        std::string b = mp::encode(user::FreeSerialize{1, {}, 2, true});
        b.back() = 3;  // the bool
        expect_decode_error<user::FreeSerialize>(b, "invalid bool byte 3");
    }
    {
        std::string b = mp::encode(user::FreeSerialize{1, {}, 2, true});
        // a (4) + words count (8), then cereal's variant index (int32).
        b[12] = 9;
        expect_decode_error<user::FreeSerialize>(b, "mp::Codec: cereal:");
    }
    {
        std::string b = mp::encode(std::make_shared<int>(5));
        b[3] = 0;  // clear the "first occurrence" bit of the 32-bit pointer id: an id never seen
        expect_decode_error<std::shared_ptr<int>>(b, "mp::Codec: cereal:");
    }
}

TEST(SerializeMalformed, TrailingBytes) {
    expect_decode_error<int>(mp::encode(1) + "x", "1 trailing bytes");
    expect_decode_error<std::string>(mp::encode(std::string("a")) + "xyz", "3 trailing bytes");
    expect_decode_error<user::MemberSerialize>(mp::encode(user::MemberSerialize{}) + "?",
                                               "trailing bytes");
}

TEST(SerializeMalformed, DuplicateKeys) {
    mp::Encoder e;
    e.write_size(2);
    e.put(1);
    e.put(10);
    e.put(1);
    e.put(11);
    const std::string bytes = e.take();
    expect_decode_error<std::map<int, int>>(bytes, "duplicate key");
    expect_decode_error<std::unordered_map<int, int>>(bytes, "duplicate key");
    EXPECT_EQ((mp::decode<std::multimap<int, int>>(bytes).count(1)), 2u);
    expect_decode_error<std::set<std::int64_t>>(mp::encode(std::vector<std::int64_t>{4, 4}),
                                                "duplicate key");
}

TEST(SerializeMalformed, ForgedDeepNestingThroughUserCodec) {
    // [count = 1] repeated: each level is one Chain holding one Chain.
    mp::Encoder e;
    for (int i = 0; i < 100'000; ++i) e.write_size(1);
    e.write_size(0);
    expect_decode_error<user::Chain>(e.bytes(), "nest deeper than");
    // A legitimate chain well inside the limit.
    user::Chain c;
    user::Chain* at = &c;
    for (int i = 0; i < 100; ++i) {
        at->next.emplace_back();
        at = &at->next.back();
    }
    EXPECT_EQ(round_trip(c).next.size(), 1u);
}

TEST(SerializeMalformed, ForgedDeepNestingThroughCereal) {
    // Tree{value, kids = [Tree{...}]}: int, count 1, repeated.
    mp::Encoder e;
    for (int i = 0; i < 100'000; ++i) {
        e.put(i);
        e.write_size(1);
    }
    e.put(0);
    e.write_size(0);
    expect_decode_error<user::Tree>(e.bytes(), "nest deeper than");
}

TEST(SerializeMalformed, ZeroByteElementsCannotAmplify) {
    // In cereal's own vector<vector<EmptyCereal>>, elements take no bytes, so each inner count
    // could claim the whole input again: 4096 x 20000 elements from 32 KiB. The total of counts
    // is bounded by the input's size instead.
    mp::Encoder e;
    constexpr std::uint64_t outer = 4096;
    e.write_size(outer);
    for (std::uint64_t i = 0; i < outer; ++i) e.write_size(20'000);
    AllocationWatch watch;
    expect_decode_error<user::EmptyHolder>(e.bytes(), "add up to more than");
    EXPECT_LT(watch.total(), kMiB);
}

TEST(SerializeMalformed, RandomCorruptionOnlyEverThrowsDecodeError) {
    const std::string nested = mp::encode(sample_nested());
    const std::string cereal = mp::encode(user::MemberSerialize{"corrupt me", {1, 2, 3, 4}, {{"a", 1.0}, {"b", std::nullopt}}});
    const std::string tree = mp::encode(user::Tree{1, {{2, {}}, {3, {{4, {}}}}}});
    std::mt19937_64 rng(20240601);
    int decoded = 0;
    int refused = 0;
    auto attempt = [&](auto tag, const std::string& original) {
        using T = typename decltype(tag)::type;
        std::string b = original;
        const int flips = 1 + static_cast<int>(rng() % 4);
        for (int i = 0; i < flips; ++i) {
            const std::size_t at = rng() % b.size();
            switch (rng() % 3) {
                case 0: b[at] = static_cast<char>(rng()); break;
                case 1: b[at] = static_cast<char>(0xff); break;
                default: b.resize(at); break;
            }
            if (b.empty()) break;
        }
        try {
            (void)mp::decode<T>(b);
            ++decoded;
        } catch (const mp::DecodeError&) {
            ++refused;
        }
        // Any other exception escapes and fails the test.
    };
    for (int i = 0; i < 3000; ++i) {
        attempt(std::type_identity<Nested>{}, nested);
        attempt(std::type_identity<user::MemberSerialize>{}, cereal);
        attempt(std::type_identity<user::Tree>{}, tree);
    }
    EXPECT_GT(refused, 0);
    EXPECT_EQ(decoded + refused, 9000);
}

TEST(SerializeEncoder, ValuelessVariantCannotBeEncoded) {
    std::variant<int, user::ThrowingCopy> v;
    const user::ThrowingCopy source;
    try {
        v.emplace<1>(source);  // the old value is gone, the copy throws: valueless
    } catch (const std::runtime_error&) {
    }
    ASSERT_TRUE(v.valueless_by_exception());
    EXPECT_THROW((void)mp::encode(v), mp::Error);
}

TEST(SerializeEncoder, DecoderApi) {
    mp::Encoder e;
    e.put(std::string("ab"));
    e.put(7);
    e.write_size(3);
    e.write("xyz", 3);
    const std::string bytes = e.take();
    mp::Decoder d(bytes);
    EXPECT_EQ(d.get<std::string>(), "ab");
    EXPECT_EQ(d.position(), 10u);
    EXPECT_EQ(d.get<int>(), 7);
    EXPECT_EQ(d.depth(), 0u);
    EXPECT_EQ(d.read_size(1), 3u);
    EXPECT_EQ(d.read_view(3), "xyz");
    EXPECT_EQ(d.remaining(), 0u);
    EXPECT_NO_THROW(d.finish());
    EXPECT_THROW(d.read_view(1), mp::DecodeError);
}
