// Tests of mp::py (include/mp/py.hpp): pickles read from and written for the real python3 on
// this machine, protocols 2 to 5, every plain type both ways; the refusals (every opcode that
// imports, calls or builds, the classic os.system payload, a memo bomb, a recursive list, deep
// nesting, oversized lengths); every truncation of a pickle and random corruptions end in
// UnpicklingError, never a crash.

#include <gtest/gtest.h>

#include <mp/py.hpp>

#include "helpers/python.hpp"

#include <array>
#include <cerrno>
#include <cstdlib>
#include <new>
#include <fcntl.h>
#include <functional>
#include <algorithm>
#include <optional>
#include <system_error>
#include <tuple>
#include <variant>
#include <cstdint>
#include <limits>
#include <cmath>
#include <map>
#include <random>
#include <set>
#include <string>
#include <sys/wait.h>
#include <unistd.h>
#include <csignal>
#include <unordered_map>
#include <vector>

namespace py = mp::py;
using namespace std::string_literals;

// Counts this thread's allocations, for the check that a typed read builds no intermediate Object.
namespace {
thread_local std::size_t g_allocations = 0;
thread_local std::size_t g_big_allocations = 0;  // of 64 KiB or more: a big container's buffer
}
// GCC takes the free() below for a mismatch with the operator new it cannot see is also malloc's.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wmismatched-new-delete"
#endif
void* operator new(std::size_t n) {
    ++g_allocations;
    g_big_allocations += n >= (std::size_t{64} << 10);
    if (void* p = std::malloc(n ? n : 1)) return p;
    throw std::bad_alloc();
}
void operator delete(void* p) noexcept { std::free(p); }
void operator delete(void* p, std::size_t) noexcept { std::free(p); }

namespace {

std::string hex(std::string_view s) {
    static constexpr char digits[] = "0123456789abcdef";
    std::string out;
    for (unsigned char c : s) {
        out.push_back(digits[c >> 4]);
        out.push_back(digits[c & 15]);
    }
    return out;
}

std::string unhex(std::string_view h) {
    std::string out;
    for (std::size_t i = 0; i + 1 < h.size(); i += 2) out.push_back(static_cast<char>(std::stoi(std::string(h.substr(i, 2)), nullptr, 16)));
    return out;
}

// Runs python3 -c code with args; returns its standard output (the test fails if it exits non-zero).
std::string python(const std::string& code, const std::vector<std::string>& args = {}) {
    int fds[2];
    if (::pipe2(fds, O_CLOEXEC) != 0) throw std::system_error(errno, std::generic_category(), "pipe2");
    const pid_t pid = mp::test::start_python(code, args, fds[1]);
    ::close(fds[1]);
    std::string out;
    char buf[65536];
    for (ssize_t n; (n = ::read(fds[0], buf, sizeof buf)) != 0;) {
        if (n < 0 && errno == EINTR) continue;
        if (n < 0) break;
        out.append(buf, static_cast<std::size_t>(n));
    }
    ::close(fds[0]);
    int status = 0;
    ::waitpid(pid, &status, 0);
    EXPECT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 0) << "python3 failed; output:\n" << out;
    return out;
}

std::vector<std::string> lines(const std::string& s) {
    std::vector<std::string> out;
    std::size_t start = 0;
    for (std::size_t nl; (nl = s.find('\n', start)) != std::string::npos; start = nl + 1) out.push_back(s.substr(start, nl - start));
    return out;
}

// Python expressions covering every plain type, nesting and sharing.
const std::vector<std::string> kExpressions = {
    "None", "True", "False", "0", "1", "255", "256", "65535", "65536", "-1", "-256", "2**31-1", "-2**31",
    "2**31", "-2**31-1", "2**63-1", "-2**63", "2**63", "2**64-1", "1.5", "-0.0", "1e100", "0.1",
    "float('inf')", "''", "'abc'", "'h\\u00e9 \\u4e16\\U0001f600'", "'x'*300", "'quote\\'s'", "b''", "b'ab\\x00\\xff'",
    "b'y'*300", "bytearray()", "bytearray(b'xy\\x80')", "()", "(1,)", "(1, 2)", "(1, 2, 3)", "(1, 2, 3, 4, 5)",
    "[]", "[1, [2, [3, []]]]", "list(range(2500))", "{}", "{'a': 1, 'b': [1, 2], 3: None, (1, 'k'): 2.5}",
    "set()", "{1, 2, 3}", "frozenset()", "frozenset({'a', (1, 2)})", "{'s': {1}, 'f': frozenset({2})}",
    "[[1, 2]] * 3", "(lambda s: [s, s, {'k': s}])([1, 'shared'])", "['same string'] * 4",
    "{i: str(i) for i in range(1200)}",
};

}  // namespace

// Every expression, pickled by Python at protocols 2 to 5, reads back as an Object whose repr is
// Python's repr of the value.
TEST(PyPickle, ReadsWhatPythonWritesAtEveryProtocol) {
    std::string code =
        "import pickle, sys\n"
        "for e in sys.argv[1:]:\n"
        "    v = eval(e)\n"
        "    for p in (2, 3, 4, 5):\n"
        "        print(p, pickle.dumps(v, protocol=p).hex(), repr(v))\n";
    std::vector<std::string> out = lines(python(code, kExpressions));
    ASSERT_EQ(out.size(), kExpressions.size() * 4);
    for (const std::string& line : out) {
        const std::size_t a = line.find(' '), b = line.find(' ', a + 1);
        const std::string pickle = unhex(std::string_view(line).substr(a + 1, b - a - 1));
        const std::string expected = line.substr(b + 1);
        SCOPED_TRACE("protocol " + line.substr(0, a) + ": " + expected);
        py::Object o;
        ASSERT_NO_THROW(o = py::loads(pickle));
        EXPECT_EQ(o.repr(), expected);
    }
}

// A Python manager's dict answers keys(), values() and items() with a view, which
// multiprocessing.managers registers with its pickler as builtins.list(list(view)): mp reads that
// as the list it is (it was refused as a call of builtins.list, so a C++ client could not list a
// Python manager's dict). Other arguments to builtins.list stay refused.
TEST(PyPickle, ReadsTheDictViewsPythonsManagerSendsAsLists) {
    std::string code =
        "import multiprocessing.managers\n"
        "from multiprocessing.reduction import ForkingPickler\n"
        "d = {'a': 1, 'b': [2, 'x']}\n"
        "for v in (d.keys(), d.values(), d.items(), {}.keys()):\n"
        "    for p in (2, 3, 4, 5):\n"
        "        print(bytes(ForkingPickler.dumps(v, p)).hex(), repr(list(v)))\n";
    std::vector<std::string> out = lines(python(code));
    ASSERT_EQ(out.size(), 16u);
    for (const std::string& line : out) {
        const std::size_t a = line.find(' ');
        const std::string pickle = unhex(std::string_view(line).substr(0, a));
        SCOPED_TRACE(line.substr(a + 1));
        py::Object o;
        ASSERT_NO_THROW(o = py::loads(pickle));
        EXPECT_EQ(o.kind(), py::Kind::list);
        EXPECT_EQ(o.repr(), line.substr(a + 1));
    }
    EXPECT_EQ(py::loads<std::vector<std::string>>(unhex(out[2].substr(0, out[2].find(' ')))),
              (std::vector<std::string>{"a", "b"}));
    // builtins.list of anything but one list is not a form Python's pickler writes.
    EXPECT_THROW(py::loads("\x80\x02" "c__builtin__\nlist\nK\x01\x85R."s), py::UnpicklingError);
    EXPECT_THROW(py::loads("\x80\x02" "c__builtin__\nlist\n)R."s), py::UnpicklingError);
}

// What mp writes, Python's pickle.loads reads as the equal value (compared in Python).
TEST(PyPickle, PythonReadsWhatMpWrites) {
    struct Point {
        int x;
        double y;
        std::string label;
    };
    std::vector<std::pair<std::string, std::string>> cases;  // (pickle, Python expression of the value)
    auto add = [&](const auto& v, std::string expr) { cases.emplace_back(py::dumps(v), std::move(expr)); };
    add(py::None{}, "None");
    add(std::nullopt, "None");
    add(std::monostate{}, "None");
    add(true, "True");
    add(false, "False");
    add(0, "0");
    add(255, "255");
    add(256, "256");
    add(65536, "65536");
    add(-1, "-1");
    add(std::numeric_limits<std::int32_t>::min(), "-2**31");
    add(std::int64_t{1} << 31, "2**31");
    add(std::numeric_limits<std::int64_t>::max(), "2**63-1");
    add(std::numeric_limits<std::int64_t>::min(), "-2**63");
    add(std::numeric_limits<std::uint64_t>::max(), "2**64-1");
    add(std::uint64_t{1} << 63, "2**63");
    add(std::int64_t{-129}, "-129");
    add(std::int64_t{-(std::int64_t{1} << 40)}, "-2**40");
    add(1.5, "1.5");
    add(1.5f, "1.5");
    add(-0.0, "-0.0");
    add(std::numeric_limits<double>::infinity(), "float('inf')");
    add("abc", "'abc'");
    add(std::string("h\xc3\xa9 \xe4\xb8\x96"), "'h\\u00e9 \\u4e16'");
    add(std::string(300, 'x'), "'x'*300");
    add(std::string_view("sv"), "'sv'");
    add(py::Bytes{"ab\0\xff"s}, "b'ab\\x00\\xff'");
    add(py::Bytes{std::string(300, 'y')}, "b'y'*300");
    add(py::ByteArray{"xy"}, "bytearray(b'xy')");
    add(py::ByteArray{}, "bytearray()");
    add(std::tuple<>{}, "()");
    add(std::tuple<int>{1}, "(1,)");
    add(std::pair<int, std::string>{1, "a"}, "(1, 'a')");
    add(std::tuple<int, int, int, std::string, bool>{1, 2, 3, "four", true}, "(1, 2, 3, 'four', True)");
    add(std::vector<int>{}, "[]");
    add(std::vector<std::vector<int>>{{1, 2}, {}, {3}}, "[[1, 2], [], [3]]");
    add(std::array<int, 3>{7, 8, 9}, "[7, 8, 9]");
    add(std::map<std::string, int>{{"a", 1}, {"b", 2}}, "{'a': 1, 'b': 2}");
    add(std::unordered_map<int, std::vector<std::string>>{{5, {"x"}}}, "{5: ['x']}");
    add(std::set<int>{3, 1, 2}, "{1, 2, 3}");
    add(std::optional<int>{4}, "4");
    add(std::optional<int>{}, "None");
    add(Point{1, 2.5, "p"}, "(1, 2.5, 'p')");
    add(std::vector<Point>{{1, 0.5, "a"}, {2, 1.5, "b"}}, "[(1, 0.5, 'a'), (2, 1.5, 'b')]");
    add(py::Object::frozenset({1, "a"}), "frozenset({1, 'a'})");
    add(py::Object::dict({{"k", py::Object::list({1, py::None{}, 2.5})}, {py::Object::tuple({1, 2}), "t"}}),
        "{'k': [1, None, 2.5], (1, 2): 't'}");
    std::vector<int> big(5000);
    for (int i = 0; i < 5000; ++i) big[static_cast<std::size_t>(i)] = i * 1000;
    add(big, "[i * 1000 for i in range(5000)]");

    std::string code =
        "import pickle, sys\n"
        "args = sys.argv[1:]\n"
        "for i in range(0, len(args), 2):\n"
        "    got = pickle.loads(bytes.fromhex(args[i])); want = eval(args[i + 1])\n"
        "    ok = got == want and type(got) is type(want) and repr(got) == repr(want)\n"
        "    print('ok' if ok else 'MISMATCH %r != %r' % (got, want))\n";
    std::vector<std::string> args;
    for (auto& [p, e] : cases) {
        args.push_back(hex(p));
        args.push_back(e);
    }
    std::vector<std::string> out = lines(python(code, args));
    ASSERT_EQ(out.size(), cases.size());
    for (std::size_t i = 0; i < cases.size(); ++i) EXPECT_EQ(out[i], "ok") << cases[i].second;
}

// Python's multiprocessing pickles with its default protocol; mp writes protocol 4, framed.
TEST(PyPickle, WritesProtocolFourWithAFrame) {
    const std::string p = py::dumps(std::map<std::string, int>{{"a", 1}});
    ASSERT_GE(p.size(), 11u);
    EXPECT_EQ(p.substr(0, 3), "\x80\x04\x95"s);
    EXPECT_EQ(py::dumps(true), "\x80\x04\x88."s);  // bodies under 4 bytes are not framed (as Python)
    std::string check = python(
        "import pickle, pickletools, sys\n"
        "p = bytes.fromhex(sys.argv[1])\n"
        "ops = [op.name for op, arg, pos in pickletools.genops(p)]\n"
        "print(ops[0], ops[1], pickle.loads(p))\n",
        {hex(p)});
    EXPECT_EQ(check, "PROTO FRAME {'a': 1}\n");
}

TEST(PyPickle, TypedReadsFromPython) {
    std::string out = python(
        "import pickle\n"
        "vals = [{'a': 1, 'b': 2}, [1.5, 2, -3], (7, 'seven', None), {1, 2}, b'\\x00by', bytearray(b'ba'),\n"
        "        [[1, 2], [3]], {'k': [1, 2]}, (1, 2.5, 'p'), 2**64-1, -2**63, 'h\\u00e9']\n"
        "for v in vals: print(pickle.dumps(v).hex())\n");
    std::vector<std::string> p = lines(out);
    ASSERT_EQ(p.size(), 12u);
    auto pk = [&](std::size_t i) { return unhex(p[i]); };
    EXPECT_EQ((py::loads<std::map<std::string, int>>(pk(0))), (std::map<std::string, int>{{"a", 1}, {"b", 2}}));
    EXPECT_EQ((py::loads<std::unordered_map<std::string, long>>(pk(0)).at("b")), 2);
    EXPECT_EQ(py::loads<std::vector<double>>(pk(1)), (std::vector<double>{1.5, 2.0, -3.0}));
    auto t = py::loads<std::tuple<int, std::string, std::optional<int>>>(pk(2));
    EXPECT_EQ(std::get<0>(t), 7);
    EXPECT_EQ(std::get<1>(t), "seven");
    EXPECT_FALSE(std::get<2>(t).has_value());
    EXPECT_EQ(py::loads<std::set<int>>(pk(3)), (std::set<int>{1, 2}));
    EXPECT_EQ(py::loads<py::Bytes>(pk(4)).data, "\0by"s);
    EXPECT_EQ(py::loads<py::ByteArray>(pk(5)).data, "ba");
    EXPECT_EQ(py::loads<py::Bytes>(pk(5)).data, "ba");  // bytes takes a bytearray
    EXPECT_EQ(py::loads<std::vector<std::vector<int>>>(pk(6)), (std::vector<std::vector<int>>{{1, 2}, {3}}));
    EXPECT_EQ((py::loads<std::map<std::string, std::vector<int>>>(pk(7)).at("k")), (std::vector<int>{1, 2}));
    struct Point {
        int x;
        double y;
        std::string label;
    };
    Point pt = py::loads<Point>(pk(8));
    EXPECT_EQ(pt.x, 1);
    EXPECT_EQ(pt.y, 2.5);
    EXPECT_EQ(pt.label, "p");
    EXPECT_EQ(py::loads<std::uint64_t>(pk(9)), std::numeric_limits<std::uint64_t>::max());
    EXPECT_EQ(py::loads<std::int64_t>(pk(10)), std::numeric_limits<std::int64_t>::min());
    EXPECT_EQ(py::loads<std::string>(pk(11)), "h\xc3\xa9");

    // Of another shape, or out of the C++ type's range: UnpicklingError naming both.
    EXPECT_THROW(py::loads<std::vector<int>>(pk(0)), py::UnpicklingError);
    EXPECT_THROW(py::loads<std::int64_t>(pk(9)), py::UnpicklingError);
    EXPECT_THROW(py::loads<std::uint64_t>(pk(10)), py::UnpicklingError);
    EXPECT_THROW((py::loads<std::tuple<int, int>>(pk(2))), py::UnpicklingError);
    EXPECT_THROW(py::loads<std::vector<std::int8_t>>(py::dumps(std::vector<int>{1, 300})), py::UnpicklingError);
    EXPECT_THROW(py::loads<bool>(py::dumps(1)), py::UnpicklingError);
    // A finite float past float's range: refused as an int past int8's is (it became inf, by a
    // conversion C++ leaves undefined); inf, NaN and what fits come through.
    EXPECT_THROW(py::loads<float>(py::dumps(1e300)), py::UnpicklingError);
    EXPECT_THROW(py::loads<std::vector<float>>(py::dumps(std::vector<double>{1.5, -1e39})), py::UnpicklingError);
    EXPECT_THROW(py::loads<float>(py::dumps(py::Object(1e300))), py::UnpicklingError);
    EXPECT_EQ(py::loads<float>(py::dumps(1.5)), 1.5f);
    EXPECT_EQ(py::loads<float>(py::dumps(std::numeric_limits<double>::infinity())),
              std::numeric_limits<float>::infinity());
    EXPECT_TRUE(std::isnan(py::loads<float>(py::dumps(std::nan("")))));
    EXPECT_EQ(py::loads<double>(py::dumps(1e300)), 1e300);
    try {
        (void)py::loads<float>(py::dumps(1e300));
    } catch (const py::UnpicklingError& e) {
        EXPECT_NE(std::string(e.what()).find("float 1e+300 does not fit"), std::string::npos) << e.what();
    }
    try {
        py::loads<std::string>(pk(1));
        FAIL() << "no exception";
    } catch (const py::UnpicklingError& e) {
        EXPECT_NE(std::string(e.what()).find("expected a Python str, got list [1.5, 2, -3]"), std::string::npos) << e.what();
    }
}

TEST(PyPickle, ObjectApi) {
    py::Object o = py::loads(py::dumps(std::map<std::string, std::vector<int>>{{"a", {1, 2}}, {"b", {}}}));
    EXPECT_EQ(o.kind(), py::Kind::dict);
    EXPECT_STREQ(o.type_name(), "dict");
    ASSERT_NE(o.dict().find("a"), nullptr);
    EXPECT_EQ(o.dict().find("a")->items().size(), 2u);
    EXPECT_EQ(o.dict().find("a")->items()[1].as<int>(), 2);
    EXPECT_EQ(o.dict().find("zzz"), nullptr);
    EXPECT_EQ(o.dict().find(py::Object("b")), o.dict().find("b"));
    EXPECT_THROW(o.items(), py::UnpicklingError);
    EXPECT_THROW(o.dict().find("a")->items()[2], std::out_of_range);
    int lists = 0;
    for (const auto& [k, v] : o.dict())
        v.visit([&](const auto& x) {
            if constexpr (std::is_same_v<std::decay_t<decltype(x)>, py::List>) ++lists;
        });
    EXPECT_EQ(lists, 2);
    EXPECT_EQ(o, py::loads(py::dumps(o)));
    EXPECT_NE(py::Object(1), py::Object(1.0));
    EXPECT_NE(py::Object(true), py::Object(1));
    EXPECT_EQ(py::Object(std::uint64_t{5}), py::Object(5));
    EXPECT_EQ(py::Object::list({1, "a", py::Bytes{"b"}}).repr(), "[1, 'a', b'b']");
    EXPECT_THROW(py::Object::set({py::Object::list({})}), py::PicklingError);
    EXPECT_THROW(py::Object::dict({{py::Object::list({}), 1}}), py::PicklingError);
    EXPECT_THROW(py::dumps(std::string("\xff\xfe")), py::PicklingError);  // not UTF-8: send py::Bytes
}

TEST(PyPickle, IntegerBoundaries) {
    // LONG1 encodings, including non-minimal ones a pickle may carry.
    auto long1 = [](std::initializer_list<int> bytes) {
        std::string p = "\x80\x02\x8a"s;
        p.push_back(static_cast<char>(bytes.size()));
        for (int b : bytes) p.push_back(static_cast<char>(b));
        return p + ".";
    };
    EXPECT_EQ(py::loads<int>(long1({})), 0);
    EXPECT_EQ(py::loads<int>(long1({0xff})), -1);
    EXPECT_EQ(py::loads<int>(long1({0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff})), -1);
    EXPECT_EQ(py::loads<int>(long1({5, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0})), 5);
    EXPECT_EQ(py::loads<std::uint64_t>(long1({0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0})),
              std::numeric_limits<std::uint64_t>::max());
    EXPECT_THROW(py::loads(long1({0, 0, 0, 0, 0, 0, 0, 0, 1})), py::UnpicklingError);           // 2**64
    EXPECT_THROW(py::loads(long1({0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x7f, 0xff})), py::UnpicklingError);  // -2**63-1
    const std::string big = unhex(lines(python("import pickle; print(pickle.dumps(2**100).hex())")).at(0));
    try {
        py::loads(big);
        FAIL() << "no exception";
    } catch (const py::UnpicklingError& e) {
        EXPECT_NE(std::string(e.what()).find("does not fit in 64 bits"), std::string::npos) << e.what();
    }
}

// =============================================================================================
// What the reader refuses
// =============================================================================================

namespace {
std::string refusal(const std::string& pickle) {
    try {
        py::loads(pickle);
    } catch (const py::UnpicklingError& e) {
        return e.what();
    }
    return "(no exception)";
}
}  // namespace

// ---- the typed fast path (py::loads<T> straight from the pickle, issue 15's W12a) ----------------

namespace {

// What py::loads<T> gave before the fast path: the full reader's Object, converted.
template <class T>
std::optional<T> full_reader(const std::string& p, const py::Limits& limits = {}) {
    try {
        return py::detail::load<T>(py::loads(p, limits));
    } catch (const py::UnpicklingError&) {
        return std::nullopt;
    }
}

// loads<T> reads p as the full reader does: the same value, or an UnpicklingError from both.
template <class T>
void expect_as_full_reader(const std::string& p, const py::Limits& limits = {}) {
    const std::optional<T> full = full_reader<T>(p, limits);
    std::optional<T> fast;
    try {
        fast = py::loads<T>(p, limits);
    } catch (const py::UnpicklingError&) {
    }
    EXPECT_EQ(fast.has_value(), full.has_value()) << hex(p);
    if (fast && full) {
        EXPECT_TRUE(*fast == *full) << hex(p);
    }
}

// The fast reader alone reads p (no fallback) into the full reader's value.
template <class T>
void expect_fast(const std::string& p) {
    T out{};
    EXPECT_TRUE(py::detail::FastReader(p, {}).top(out)) << hex(p);
    const std::optional<T> full = full_reader<T>(p);
    ASSERT_TRUE(full.has_value()) << hex(p);
    EXPECT_TRUE(out == *full) << hex(p);
}

}  // namespace

// The shapes Python's pickler writes at protocols 4 and 5 (batches of 1000 and a last batch of
// one, memo references to repeated strings, empty containers, tuples of every length) are read
// by the fast reader itself, to the value the full reader gives.
TEST(PyPickleFast, ReadsPythonsOwnShapesDirectly) {
    const std::vector<std::string> values = {
        "{'key%d' % i: i for i in range(10)}",
        "{i: str(i) for i in range(2001)}",
        "list(range(2001))",
        "['same string', 'other'] * 3",
        "(1, 'a', None)",
        "(1, 2, 3, 4, 5)",
        "[{}, {'a': 1}, {}, {'b': 2, 'c': 3}]",
        "{3, 1, 2}",
        "frozenset({'a', 'b'})",
        "{(1, 'k'): [1.5, 2], (2, 'k'): []}",
        "[b'ab', b'ab', b'c']",
        "{'x': None, 'y': [1, -2**40, 2**63-1]}",
        "[(1, 2), (3, 4)]",
        "[True, False, True]",
    };
    std::string code =
        "import pickle, sys\n"
        "for e in sys.argv[1:]:\n"
        "    for p in (4, 5): print(pickle.dumps(eval(e), protocol=p).hex())\n";
    const std::vector<std::string> out = lines(python(code, values));
    ASSERT_EQ(out.size(), values.size() * 2);
    for (std::size_t i = 0; i < out.size(); ++i) {
        SCOPED_TRACE(values[i / 2]);
        const std::string p = unhex(out[i]);
        switch (i / 2) {
            case 0:
                expect_fast<std::map<std::string, std::int64_t>>(p);
                expect_fast<std::unordered_map<std::string, int>>(p);
                expect_fast<std::map<std::string, double>>(p);
                break;
            case 1: expect_fast<std::map<int, std::string>>(p); break;
            case 2: expect_fast<std::vector<long>>(p); break;
            case 3: expect_fast<std::vector<std::string>>(p); break;
            case 4: expect_fast<std::tuple<int, std::string, std::optional<int>>>(p); break;
            case 5:
                expect_fast<std::vector<int>>(p);
                expect_fast<std::tuple<int, int, int, int, long>>(p);
                break;
            case 6: expect_fast<std::vector<std::map<std::string, int>>>(p); break;
            case 7: expect_fast<std::set<int>>(p); break;
            case 8: expect_fast<std::set<std::string>>(p); break;
            case 9: expect_fast<std::map<std::pair<int, std::string>, std::vector<double>>>(p); break;
            case 10: expect_fast<std::vector<py::Bytes>>(p); break;
            case 11: expect_fast<std::map<std::string, std::optional<std::vector<std::int64_t>>>>(p); break;
            case 12: expect_fast<std::vector<std::pair<int, int>>>(p); break;
            case 13: expect_fast<std::vector<bool>>(p); break;
        }
    }
}

// Where the fast reader stops (another shape, a value out of range, a shared container, an
// unhashable key, a limit) loads<T> still answers as the full reader does.
TEST(PyPickleFast, AgreesWithTheFullReaderOutsideItsSubset) {
    const std::vector<std::string> out = lines(python(
        "import pickle\n"
        "l = [1, 2]\n"
        "vals = [({}, ('a', 1, 'b', 2)), [{}, (1, 2, 3, 4)], [l, l], ['x' * 1000] * 20, [[[1]]],\n"
        "        {'a': 300}, {'a': 'b'}, {1, 2}, b'b', {'k': 2**64-1}, [1, 2]]\n"
        "for v in vals: print(pickle.dumps(v, protocol=4).hex())\n"
        "print(pickle.dumps({1, 2}, protocol=2).hex())\n"));
    ASSERT_EQ(out.size(), 12u);
    auto pk = [&](std::size_t i) { return unhex(out[i]); };
    expect_as_full_reader<std::tuple<std::map<std::string, int>, std::tuple<std::string, int, std::string, int>>>(pk(0));
    expect_as_full_reader<std::tuple<std::map<std::string, int>, std::vector<int>>>(pk(0));
    expect_as_full_reader<std::tuple<std::map<int, int>, std::tuple<int, int, int, int>>>(pk(1));
    expect_as_full_reader<std::vector<std::map<int, int>>>(pk(1));
    expect_as_full_reader<std::vector<std::vector<int>>>(pk(2));  // a shared list
    py::Limits small;
    small.max_size = 10000;  // 20 copies of 1000 bytes through the memo: over it
    expect_as_full_reader<std::vector<std::string>>(pk(3), small);
    EXPECT_THROW(py::loads<std::vector<std::string>>(pk(3), small), py::UnpicklingError);
    EXPECT_EQ(py::loads<std::vector<std::string>>(pk(3)).size(), 20u);
    py::Limits shallow;
    shallow.max_depth = 2;
    EXPECT_THROW(py::loads<std::vector<std::vector<std::vector<int>>>>(pk(4), shallow), py::UnpicklingError);
    expect_as_full_reader<std::vector<std::vector<std::vector<int>>>>(pk(4));
    EXPECT_THROW((py::loads<std::map<std::string, std::int8_t>>(pk(5))), py::UnpicklingError);
    EXPECT_THROW((py::loads<std::map<std::string, int>>(pk(6))), py::UnpicklingError);
    expect_as_full_reader<std::set<int>>(pk(7));
    expect_as_full_reader<py::ByteArray>(pk(8));
    EXPECT_EQ((py::loads<std::map<std::string, std::uint64_t>>(pk(9)).at("k")), std::numeric_limits<std::uint64_t>::max());
    expect_as_full_reader<std::pair<int, int>>(pk(10));
    expect_as_full_reader<std::set<int>>(pk(11));  // protocol 2: builtins.set REDUCE
    // Unhashable keys, which Python never writes, are refused as the full reader refuses them.
    EXPECT_THROW((py::loads<std::map<std::vector<int>, int>>("\x80\x04}(]K\x01""aK\x02u."s)), py::UnpicklingError);
    EXPECT_EQ((py::loads<std::map<std::vector<int>, int>>("\x80\x04}(K\x01\x85K\x02u."s).size()), 1u);
    // A memo index other than the next one, and a FRAME longer than the input.
    expect_as_full_reader<std::vector<std::string>>("\x80\x04](\x8c\x01xq\x05h\x05""e."s);
    expect_as_full_reader<int>("\x80\x04\x95\x10\0\0\0\0\0\0\0K\x01."s);
    // The fuzzer's find: a dict read as pairs first looks for EMPTY_DICT, then for EMPTY_LIST. The
    // first look refused the too-long frame but had already stepped past its header, so the second
    // look read the list behind it and accepted what the full reader (and Python) refuse.
    const std::string long_frame = "\x80\x04\x95\x06\0\x02\0\0\0\0\0]\x94."s;
    EXPECT_THROW((py::loads<std::vector<std::pair<std::string, std::int64_t>>>(long_frame)), py::UnpicklingError);
    expect_as_full_reader<std::vector<std::pair<std::string, std::int64_t>>>(long_frame);
    expect_as_full_reader<std::vector<std::pair<int, int>>>(long_frame);
    expect_as_full_reader<std::vector<int>>(long_frame);
}

// Every truncation and random corruption of a message reads, through loads<T>, as the full reader
// reads it: the fast reader accepts nothing the full reader refuses.
TEST(PyPickleFast, AgreesWithTheFullReaderOnEveryTruncationAndCorruption) {
    const std::vector<std::string> out = lines(python(
        "import pickle\n"
        "print(pickle.dumps({'key%d' % i: i for i in range(10)}).hex())\n"
        "print(pickle.dumps([(1, 'a', 2.5), (2, 'a', -1.0), (3, 'bb', 0.0)]).hex())\n"
        "print(pickle.dumps({'s': {1, 2}, 't': {3}}).hex())\n"));
    ASSERT_EQ(out.size(), 3u);
    std::mt19937 rng(4242);
    for (std::size_t k = 0; k < out.size(); ++k) {
        const std::string p = unhex(out[k]);
        auto check = [&](const std::string& q) {
            if (k == 0) {
                expect_as_full_reader<std::map<std::string, std::int64_t>>(q);
                expect_as_full_reader<std::map<std::string, std::uint8_t>>(q);
                expect_as_full_reader<std::vector<std::pair<std::string, std::int64_t>>>(q);
                expect_as_full_reader<std::vector<std::pair<std::optional<std::string>, std::uint8_t>>>(q);
            } else if (k == 1) {
                expect_as_full_reader<std::vector<std::tuple<int, std::string, double>>>(q);
                expect_as_full_reader<std::vector<std::vector<double>>>(q);
            } else {
                expect_as_full_reader<std::map<std::string, std::set<int>>>(q);
                expect_as_full_reader<std::vector<std::pair<std::string, std::set<int>>>>(q);
            }
        };
        for (std::size_t n = 0; n <= p.size(); ++n) check(p.substr(0, n));
        for (int i = 0; i < 3000; ++i) {
            std::string q = p;
            const int flips = 1 + static_cast<int>(rng() % 3);
            for (int f = 0; f < flips; ++f) q[rng() % q.size()] = static_cast<char>(rng() & 0xff);
            check(q);
            if (::testing::Test::HasFailure()) return;
        }
    }
}

// The W12a message read as a std::map makes the map's ten nodes and nothing else: no Object,
// no container node, no vector of pairs on the way (before the fast reader: twelve allocations).
TEST(PyPickleFast, ATypedDictOfTenAllocatesOnlyItsTenNodes) {
    const std::string p = unhex(lines(python("import pickle; print(pickle.dumps({'key%d' % i: i for i in range(10)}).hex())"))[0]);
    (void)py::loads<std::map<std::string, std::int64_t>>(p);  // warm any per-thread buffer
    const std::size_t before = g_allocations;
    const auto m = py::loads<std::map<std::string, std::int64_t>>(p);
    const std::size_t made = g_allocations - before;
    ASSERT_EQ(m.size(), 10u);
    EXPECT_EQ(made, 10u);
}

// ---- a dict read as its pairs (std::vector<std::pair<K, V>>, the flat type for speed) -----------

namespace {
using Pairs = std::vector<std::pair<std::string, std::int64_t>>;

// For each pickle of a dict, python3's pickle of list(pickle.loads(it).items()): what its dict kept.
std::vector<std::string> python_items(const std::vector<std::string>& pickles) {
    std::vector<std::string> args;
    for (const auto& p : pickles) args.push_back(hex(p));
    std::vector<std::string> out = lines(python(
        "import pickle, sys\n"
        "for h in sys.argv[1:]: print(pickle.dumps(list(pickle.loads(bytes.fromhex(h)).items())).hex())\n",
        args));
    for (std::string& h : out) h = unhex(h);
    return out;
}
}  // namespace

// A dict read into a vector of pairs gives Python's list(d.items()): the same pairs in insertion
// order, at every protocol; Python's own shapes (protocols 4, 5) by the fast reader alone. What mp
// writes for the vector (a list of 2-tuples) Python turns back into the same dict with dict().
TEST(PyPickleFlat, ADictReadsAsItsPairsInInsertionOrder) {
    const std::vector<std::string> values = {
        "{'key%d' % i: i for i in range(10)}",
        "{'b': 1, 'a': -2, 'c': 2**62}",
        "(lambda d: (d.pop('a'), d.__setitem__('a', 7), d)[2])({'a': 1, 'b': 2})",
        "{}",
        "{'only': 1}",
        "{'k%04d' % (2500 - i): i for i in range(2500)}",
        "{'h\u00e9': 1, 'x' * 40: 2, '': 3}",
    };
    std::string code =
        "import pickle, sys\n"
        "for e in sys.argv[1:]:\n"
        "    d = eval(e)\n"
        "    for p in (2, 3, 4, 5): print(p, pickle.dumps(d, protocol=p).hex(), pickle.dumps(list(d.items()), protocol=p).hex())\n";
    const std::vector<std::string> out = lines(python(code, values));
    ASSERT_EQ(out.size(), values.size() * 4);
    std::vector<std::string> written;
    for (std::size_t i = 0; i < out.size(); ++i) {
        SCOPED_TRACE(values[i / 4] + " at protocol " + out[i].substr(0, 1));
        const std::size_t a = out[i].find(' '), b = out[i].find(' ', a + 1);
        const std::string dict = unhex(out[i].substr(a + 1, b - a - 1));
        const std::string items = unhex(out[i].substr(b + 1));
        const Pairs pairs = py::loads<Pairs>(dict);
        EXPECT_EQ(pairs, py::loads<Pairs>(items));  // a list of 2-tuples: the long-standing reading
        EXPECT_EQ(pairs, full_reader<Pairs>(dict));
        if (out[i][0] >= '4') expect_fast<Pairs>(dict);
        if (out[i][0] == '4') written.push_back(hex(py::dumps(pairs)));
    }
    written.insert(written.begin(), values.begin(), values.end());
    const std::string back = python(
        "import pickle, sys\n"
        "n = (len(sys.argv) - 1) // 2\n"
        "for e, h in zip(sys.argv[1:1 + n], sys.argv[1 + n:]):\n"
        "    d = eval(e); got = dict(pickle.loads(bytes.fromhex(h)))\n"
        "    print('ok' if got == d and list(got) == list(d) else 'MISMATCH %r' % got)\n",
        written);
    std::string all_ok;
    for (std::size_t i = 0; i < values.size(); ++i) all_ok += "ok\n";
    EXPECT_EQ(back, all_ok);

    // Other key and value types, and dicts inside: the same rule all the way down.
    const std::vector<std::string> other = lines(python(
        "import pickle\n"
        "print(pickle.dumps({3: 'c', 1: 'a', 2: None}).hex())\n"
        "print(pickle.dumps({(1, 'x'): [1.5], (0, 'y'): []}).hex())\n"
        "print(pickle.dumps({'outer': {'z': 1, 'a': 2}, 'e': {}}).hex())\n"));
    ASSERT_EQ(other.size(), 3u);
    using IntKeys = std::vector<std::pair<int, std::optional<std::string>>>;
    EXPECT_EQ(py::loads<IntKeys>(unhex(other[0])), (IntKeys{{3, "c"}, {1, "a"}, {2, std::nullopt}}));
    using TupleKeys = std::vector<std::pair<std::pair<int, std::string>, std::vector<double>>>;
    EXPECT_EQ(py::loads<TupleKeys>(unhex(other[1])), (TupleKeys{{{1, "x"}, {1.5}}, {{0, "y"}, {}}}));
    using Nested = std::vector<std::pair<std::string, Pairs>>;
    EXPECT_EQ(py::loads<Nested>(unhex(other[2])), (Nested{{"outer", {{"z", 1}, {"a", 2}}}, {"e", {}}}));
    for (const std::string& h : other) {
        expect_as_full_reader<IntKeys>(unhex(h));
        expect_as_full_reader<TupleKeys>(unhex(h));
        expect_as_full_reader<Nested>(unhex(h));
    }
    expect_fast<Nested>(unhex(other[2]));
    // Values of another type are refused as for a std::map.
    EXPECT_THROW(py::loads<Pairs>(unhex(other[0])), py::UnpicklingError);
    EXPECT_THROW((py::loads<std::vector<std::pair<std::string, std::int8_t>>>(py::dumps(std::map<std::string, int>{{"a", 300}}))),
                 py::UnpicklingError);
}

// Python's pickler never sets a key twice, but a pickle can (hand-written or crafted), and
// Python's dict then keeps one entry: where the key first appeared, with its last value. The
// vector keeps exactly what pickle.loads's dict keeps, whichever reader reads it.
TEST(PyPickleFlat, ARepeatedKeyKeepsItsFirstPlaceAndItsLastValue) {
    auto int1 = [](int i) { return "K"s + static_cast<char>(i); };
    auto str1 = [](const std::string& k) { return "\x8c"s + static_cast<char>(k.size()) + k; };
    std::vector<std::string> pickles;
    // One batch: 1, 3, 1 again, 4, 3 again.
    pickles.push_back("\x80\x04}(" + int1(1) + int1(10) + int1(3) + int1(30) + int1(1) + int1(11) + int1(4) + int1(40) +
                      int1(3) + int1(31) + "u.");
    // Single SETITEMs, and a repeat across two batches.
    pickles.push_back("\x80\x04}" + int1(2) + int1(20) + "s" + int1(2) + int1(21) + "s(" + int1(5) + int1(50) + "u(" +
                      int1(2) + int1(22) + int1(5) + int1(51) + "u.");
    // Past the small table: 200 keys, every one set twice, the second round in reverse.
    std::string big = "\x80\x04}(";
    for (int i = 0; i < 200; ++i) big += "M" + std::string{static_cast<char>(i & 0xff), static_cast<char>(i >> 8)} + int1(1);
    for (int i = 199; i >= 0; --i) big += "M" + std::string{static_cast<char>(i & 0xff), static_cast<char>(i >> 8)} + int1(i & 0x7f);
    pickles.push_back(big + "u.");
    std::vector<std::string> strs;
    strs.push_back("\x80\x04}(" + str1("b") + int1(1) + str1("a") + int1(2) + str1("b") + int1(3) + "u.");
    // The same key through the memo: the str filed under 0 and fetched again.
    strs.push_back("\x80\x04}(" + str1("k") + "\x94" + int1(1) + str1("j") + int1(2) + "h\x00"s + int1(3) + "u.");
    std::vector<std::string> all = pickles;
    all.insert(all.end(), strs.begin(), strs.end());
    const std::vector<std::string> out = python_items(all);
    ASSERT_EQ(out.size(), all.size());
    using IntPairs = std::vector<std::pair<int, int>>;
    for (std::size_t i = 0; i < pickles.size(); ++i) {
        SCOPED_TRACE(i);
        const IntPairs kept = py::loads<IntPairs>(out[i]);
        EXPECT_EQ(py::loads<IntPairs>(pickles[i]), kept);
        EXPECT_EQ(full_reader<IntPairs>(pickles[i]), kept);
        EXPECT_EQ((py::loads<std::map<int, int>>(pickles[i]).size()), kept.size());
    }
    EXPECT_EQ(py::loads<IntPairs>(pickles[0]), (IntPairs{{1, 11}, {3, 31}, {4, 40}}));
    EXPECT_EQ(py::loads<IntPairs>(pickles[2]).size(), 200u);
    for (std::size_t i = 0; i < strs.size(); ++i) {
        SCOPED_TRACE(hex(strs[i]));
        const Pairs kept = py::loads<Pairs>(out[pickles.size() + i]);
        EXPECT_EQ(py::loads<Pairs>(strs[i]), kept);
        EXPECT_EQ(full_reader<Pairs>(strs[i]), kept);
    }
    EXPECT_EQ(py::loads<Pairs>(strs[0]), (Pairs{{"b", 3}, {"a", 2}}));
    // Equal keys are equal as the C++ key type compares them: 0.0 and -0.0 are one key, as in Python.
    using Floats = std::vector<std::pair<double, int>>;
    const Floats f = py::loads<Floats>(py::dumps(py::Object::dict({{0.0, 1}, {2.5, 2}, {-0.0, 3}})));
    ASSERT_EQ(f.size(), 2u);
    EXPECT_EQ(f[0].second, 3);
    EXPECT_EQ(f[1], (std::pair<double, int>{2.5, 2}));
}

// The merge of repeated keys takes a short route for up to 16 pairs (fingerprints compared all at
// once, keys only where those match) and a hash table above. Around that size, with keys that a
// fingerprint tells apart only by their last byte, keys that share all the bytes a fingerprint
// sees (the first and last 8) and differ in the middle, and repeats at the first and last places,
// the vector keeps what Python's dict keeps, through the fast reader and the full one.
TEST(PyPickleFlat, RepeatedKeysAroundTheSmallMergeAreMergedAsPythonsDictDoes) {
    auto str1 = [](const std::string& k) { return "\x8c"s + static_cast<char>(k.size()) + k + "\x94"; };
    const std::vector<std::function<std::string(int)>> key_kinds = {
        [](int i) { return "k"s + static_cast<char>('A' + i); },                           // 2 bytes, the last differs
        [](int i) { return "key_long_name_"s + static_cast<char>('A' + i); },              // 15 bytes, the last differs
        [](int i) { return "AAAAAAAA"s + static_cast<char>('A' + i) + "ZZZZZZZZ"; },       // differ in the middle only
    };
    // Which earlier place the key at each place repeats: none, the first at the last place, the
    // last two the same, the first at the second place, every key twice (second half).
    const std::vector<std::function<int(int, int)>> repeats = {
        [](int, int) { return -1; },
        [](int i, int n) { return i == n - 1 ? 0 : -1; },
        [](int i, int n) { return i == n - 1 ? n - 2 : -1; },
        [](int i, int) { return i == 1 ? 0 : -1; },
        [](int i, int n) { return i >= n / 2 ? i - n / 2 : -1; },
    };
    std::vector<std::string> pickles;
    std::vector<std::size_t> sizes;  // pairs in each pickle
    for (const int n : {2, 3, 15, 16, 17, 32, 33})
        for (const auto& key : key_kinds)
            for (const auto& repeat : repeats) {
                std::string p = "\x80\x04}\x94(";
                for (int i = 0; i < n; ++i) {
                    const int r = repeat(i, n);
                    p += str1(key(r < 0 ? i : r)) + "K" + static_cast<char>(i);
                }
                pickles.push_back(p + "u.");
                sizes.push_back(static_cast<std::size_t>(n));
            }
    const std::vector<std::string> out = python_items(pickles);
    ASSERT_EQ(out.size(), pickles.size());
    std::size_t merged = 0;
    for (std::size_t i = 0; i < pickles.size(); ++i) {
        SCOPED_TRACE(hex(pickles[i]));
        const Pairs kept = py::loads<Pairs>(out[i]);
        const Pairs fast = py::loads<Pairs>(pickles[i]);
        EXPECT_EQ(fast, kept);
        EXPECT_EQ(full_reader<Pairs>(pickles[i]), kept);
        expect_fast<Pairs>(pickles[i]);
        merged += fast.size() != sizes[i];
    }
    EXPECT_EQ(merged, pickles.size() * 4 / 5);  // every case but the no-repeat one merged something
}

// Each int width Python writes for a str key's value (BININT1, BININT2, BININT, negative too), in
// the middle of a dict and as its last pair (where the input ends within a word of the value),
// read into pairs as Python reads it; a value out of the pair's range is refused.
TEST(PyPickleFlat, StrIntPairsOfEveryWidthReadAsPythonReadsThem) {
    const std::vector<std::string> values = {"0", "255", "256", "65535", "65536", "-1", "-2**31", "2**31-1", "2**31", "-2**63"};
    std::vector<std::string> exprs;
    for (const std::string& v : values) {
        exprs.push_back("{'a': " + v + ", 'bb': 1}");
        exprs.push_back("{'bb': 1, 'a': " + v + "}");
        exprs.push_back("{'a': " + v + "}");
    }
    const std::vector<std::string> out = lines(python(
        "import pickle, sys\n"
        "for e in sys.argv[1:]:\n"
        "    d = eval(e)\n"
        "    for p in (4, 5): print(pickle.dumps(d, protocol=p).hex(), ' '.join('%s=%d' % kv for kv in d.items()))\n",
        exprs));
    ASSERT_EQ(out.size(), exprs.size() * 2);
    for (const std::string& line : out) {
        SCOPED_TRACE(line);
        const std::string p = unhex(line.substr(0, line.find(' ')));
        std::string got;
        for (const auto& [k, v] : py::loads<Pairs>(p)) got += (got.empty() ? "" : " ") + k + "=" + std::to_string(v);
        EXPECT_EQ(got, line.substr(line.find(' ') + 1));
        expect_fast<Pairs>(p);
        expect_as_full_reader<std::vector<std::pair<std::string, std::int16_t>>>(p);
        expect_as_full_reader<std::vector<std::pair<std::string, std::uint32_t>>>(p);
    }
    const auto wide = std::find_if(out.begin(), out.end(), [](const std::string& l) { return l.ends_with(" a=65535 bb=1"); });
    ASSERT_NE(wide, out.end());
    EXPECT_THROW((py::loads<std::vector<std::pair<std::string, std::int16_t>>>(unhex(wide->substr(0, wide->find(' '))))),
                 py::UnpicklingError);
}

// Keys of every length from 0 to 20 bytes (a short string's buffer holds 15; the fast reader
// takes up to 8 in one word), ASCII or not, first, in the middle and last in the message (where
// fewer than 8 or 15 bytes of input follow the key), read as Python reads them.
TEST(PyPickleFlat, StrKeysOfEveryLengthAndPlaceReadAsPythonReadsThem) {
    const std::vector<std::string> out = lines(python(
        "import pickle\n"
        "for n in range(21):\n"
        "    for key in ('k' * n, '\u00e9' + 'k' * max(n - 2, 0), 'k' * max(n - 1, 0) + '\\x7f'):\n"
        "        for d in ({key: 1, 'b': 2, 'c': 3}, {'a': 1, key: 2, 'c': 3}, {'a': 1, 'b': 2, key: 3}, {key: 300}):\n"
        "            print(pickle.dumps(d).hex(), ' '.join('%s=%d' % (k.encode().hex(), v) for k, v in d.items()))\n"));
    ASSERT_EQ(out.size(), 21u * 3 * 4);
    for (const std::string& line : out) {
        SCOPED_TRACE(line);
        const std::string p = unhex(line.substr(0, line.find(' ')));
        std::string got;
        for (const auto& [k, v] : py::loads<Pairs>(p)) got += (got.empty() ? "" : " ") + hex(k) + "=" + std::to_string(v);
        EXPECT_EQ(got, line.substr(line.find(' ') + 1));
        expect_fast<Pairs>(p);
        EXPECT_EQ(py::loads<Pairs>(p), full_reader<Pairs>(p));
    }
}

// Past the memo's entries kept inline (48): a dict of 60 str keys, then one of its keys again,
// which Python writes as a memo fetch of that key's entry.
TEST(PyPickleFlat, MemoEntriesPastTheInlineOnesAreFetchedAsPythonFiledThem) {
    const std::string p = unhex(lines(python(
        "import pickle\n"
        "d = {'k%d' % i: i for i in range(60)}\n"
        "print(pickle.dumps((d, list(d)[55], list(d)[3])).hex())\n"))[0]);
    using Message = std::tuple<Pairs, std::string, std::string>;
    const auto [pairs, late, early] = py::loads<Message>(p);
    ASSERT_EQ(pairs.size(), 60u);
    EXPECT_EQ(pairs[55], (std::pair<std::string, std::int64_t>{"k55", 55}));
    EXPECT_EQ(late, "k55");
    EXPECT_EQ(early, "k3");
    expect_fast<Message>(p);
    expect_as_full_reader<Message>(p);
}

// The W12a message read as pairs makes one allocation, the vector's: the keys fit std::string's
// own buffer, and the reader makes no pair, Object or table on the heap on the way.
TEST(PyPickleFlat, TheW12aMessageAsPairsIsOneAllocation) {
    const std::string p = unhex(lines(python("import pickle; print(pickle.dumps({'key%d' % i: i for i in range(10)}).hex())"))[0]);
    (void)py::loads<Pairs>(p);
    const std::size_t before = g_allocations;
    const Pairs pairs = py::loads<Pairs>(p);
    const std::size_t made = g_allocations - before;
    ASSERT_EQ(pairs.size(), 10u);
    EXPECT_EQ(pairs[9], (std::pair<std::string, std::int64_t>{"key9", 9}));
    EXPECT_EQ(made, 1u);
}

TEST(PyPickleSafety, TheClassicOsSystemPayloadIsRefusedBeforeAnythingRuns) {
    // The textbook payload (protocol 0), as found in every pickle-security write-up.
    EXPECT_NE(refusal("cos\nsystem\n(S'echo pwned'\ntR."s).find("global os.system refused"), std::string::npos)
        << refusal("cos\nsystem\n(S'echo pwned'\ntR."s);
    // The same from Python's own pickler at every protocol (os.system lives in posix on Linux).
    std::vector<std::string> p = lines(python(
        "import os, pickle\n"
        "class Evil:\n"
        "    def __reduce__(self): return (os.system, ('echo pwned',))\n"
        "for proto in range(6): print(pickle.dumps(Evil(), protocol=proto).hex())\n"));
    ASSERT_EQ(p.size(), 6u);
    for (const std::string& h : p) {
        std::string why = refusal(unhex(h));
        EXPECT_NE(why.find("global posix.system refused"), std::string::npos) << why;
    }
}

TEST(PyPickleSafety, ExceptionsAreWrittenForManagersButNeverReadAsValues) {
    // Writer::exception (a manager's '#ERROR' reply) writes what Python's pickler would ...
    py::Writer w;
    w.exception("KeyError", py::Object("k"));
    const std::string p = w.finish();
    EXPECT_EQ(python("import pickle, sys\n"
                     "e = pickle.loads(bytes.fromhex(sys.argv[1]))\n"
                     "print(type(e).__name__, e.args)\n",
                     {hex(p)}),
              "KeyError ('k',)\n");
    // ... but py::loads refuses it like any other global: only the manager client's '#ERROR'
    // reader takes exceptions.
    EXPECT_NE(refusal(p).find("global builtins.KeyError refused"), std::string::npos) << refusal(p);
    // Only Python's built-in exception classes (and queue.Empty/Full) can be written.
    py::Writer other;
    EXPECT_THROW(other.exception("SystemExit", py::Object()), py::PicklingError);
    EXPECT_THROW(other.exception("os.system", py::Object()), py::PicklingError);
}

TEST(PyPickleSafety, EveryOpcodeThatImportsCallsOrBuildsIsRefusedByName) {
    // Each refused opcode after a valid prefix (and with enough operand bytes after it), so the
    // refusal names it rather than a truncation.
    const std::vector<std::pair<std::string, std::string>> cases = {
        {"\x80\x02N)R."s, "opcode REDUCE refused"},     {"\x80\x02N}b."s, "opcode BUILD refused"},
        {"\x80\x02\x82\x01."s, "opcode EXT1 refused"},   {"\x80\x02\x83\x01\x00."s, "opcode EXT2 refused"},
        {"\x80\x02\x84\x01\x00\x00\x00."s, "opcode EXT4 refused"}, {"\x80\x02N)\x81."s, "opcode NEWOBJ refused"},
        {"\x80\x04N)}\x92."s, "opcode NEWOBJ_EX refused"}, {"\x80\x02Pid\n."s, "opcode PERSID refused"},
        {"\x80\x02NQ."s, "opcode BINPERSID refused"},    {"(imod\nname\n."s, "opcode INST refused"},
        {"(N)o."s, "opcode OBJ refused"},                {"\x80\x05\x97."s, "opcode NEXT_BUFFER refused"},
        {"\x80\x05\x98."s, "opcode READONLY_BUFFER refused"},
        {"\x80\x04\x8c\x02os\x8c\x06system\x93."s, "global os.system refused"},
        {"\x80\x02" "c__builtin__\neval\n."s, "global __builtin__.eval refused"},
        {"\x80\x02" "cbuiltins\ngetattr\n."s, "global builtins.getattr refused"},
        {"I1\n."s, "opcode INT (protocol 0 or 1"},
        {"\x80\x09N."s, "unsupported pickle protocol 9"},
        {"\x80\x02\xff."s, "unknown opcode 0xff"},
        // A recognised global called with anything but plain data.
        {"\x80\x02" "c__builtin__\nset\nN\x85R."s, "set() or frozenset() of a NoneType"},
        {"\x80\x02" "c_codecs\nencode\nX\x01\x00\x00\x00" "aX\x05\x00\x00\x00rot13\x86R."s, "REDUCE of _codecs.encode"},
    };
    for (const auto& [pickle, expected] : cases) {
        std::string why = refusal(pickle);
        EXPECT_NE(why.find(expected), std::string::npos) << hex(pickle) << " -> " << why;
    }
}

TEST(PyPickleSafety, AMemoBombIsRefusedNotExpanded) {
    // Billion laughs: each level a list of ten references to the level below. Python reads it as
    // shared lists; copied into C++ values it would be 10**30 items.
    std::vector<std::string> p = lines(python(
        "import pickle\n"
        "a = ['lol']\n"
        "for i in range(30): a = [a] * 10\n"
        "print(pickle.dumps(a).hex())\n"
        "s = 'x' * 1000000\n"
        "print(pickle.dumps([s] * 1100).hex())\n"
        "b = [1, 2]\n"
        "print(pickle.dumps([b, b, (b, b)]).hex())\n"));
    ASSERT_EQ(p.size(), 3u);
    EXPECT_NE(refusal(unhex(p[0])).find("expand to more than"), std::string::npos) << refusal(unhex(p[0]));
    EXPECT_NE(refusal(unhex(p[1])).find("expand to more than"), std::string::npos) << refusal(unhex(p[1]));
    // Sharing within the limits is read, each reference a copy of the same value.
    py::Object shared = py::loads(unhex(p[2]));
    EXPECT_EQ(shared.repr(), "[[1, 2], [1, 2], ([1, 2], [1, 2])]");
    EXPECT_EQ((py::loads<std::tuple<std::vector<int>, std::vector<int>, std::pair<std::vector<int>, std::vector<int>>>>(unhex(p[2]))),
              (std::tuple<std::vector<int>, std::vector<int>, std::pair<std::vector<int>, std::vector<int>>>{{1, 2}, {1, 2}, {{1, 2}, {1, 2}}}));
    py::Limits small;
    small.max_size = 4;
    EXPECT_THROW(py::loads(unhex(p[2]), small), py::UnpicklingError);
}

TEST(PyPickleSafety, RecursiveValuesAreRefusedAndFreed) {
    std::vector<std::string> p = lines(python(
        "import pickle\n"
        "a = []; a.append(a); print(pickle.dumps(a).hex())\n"
        "d = {}; d['self'] = [d]; print(pickle.dumps(d).hex())\n"
        "t = []; t.append((t,)); print(pickle.dumps(t, protocol=2).hex())\n"
        // garbage: a recursive list left in the memo while the result is another value
        "print((b'\\x80\\x04]\\x94h\\x00a0N.').hex())\n"));
    ASSERT_EQ(p.size(), 4u);
    for (std::size_t i = 0; i < 3; ++i)
        EXPECT_NE(refusal(unhex(p[i])).find("contains itself"), std::string::npos) << refusal(unhex(p[i]));
    // The leak checker (LeakSanitizer in the sanitizer builds) sees whether the cycles were broken.
    EXPECT_TRUE(py::loads(unhex(p[3])).is_none());
}

TEST(PyPickleSafety, NestingIsBounded) {
    auto nested = [](std::size_t n) { return "\x80\x04"s + std::string(n, ']') + std::string(n - 1, 'a') + "."; };
    EXPECT_NO_THROW(py::loads(nested(1000)));
    EXPECT_NE(refusal(nested(1001)).find("nested deeper than 1000"), std::string::npos);
    EXPECT_NE(refusal(nested(200000)).find("nested deeper than 1000"), std::string::npos);
    py::Limits deep;
    deep.max_depth = 5000;
    EXPECT_NO_THROW(py::loads(nested(5000), deep));
    // Tuples nest the same way (TUPLE1 of TUPLE1 ...).
    EXPECT_NE(refusal("\x80\x04)"s + std::string(1500, '\x85') + ".").find("nested deeper"), std::string::npos);
    // And through shared references (checked after reading).
    std::string shared = "\x80\x04]\x94"s;  // list 0
    for (int i = 0; i < 1100; ++i) shared += "]\x94h\x00" "a0"s;  // nothing deep, only sharing
    shared += ".";
    EXPECT_NO_THROW(py::loads(shared));
}

TEST(PyPickleSafety, LengthsBeyondTheInputAreRefusedBeforeAllocating) {
    const std::vector<std::string> cases = {
        "\x80\x04\x8d\xff\xff\xff\xff\xff\xff\xff\x7f."s,  // BINUNICODE8 of 2**63 bytes
        "\x80\x04\x8e\xff\xff\xff\xff\xff\xff\xff\xff."s,  // BINBYTES8
        "\x80\x05\x96\x00\x00\x00\x00\x00\x00\x00\x01."s,  // BYTEARRAY8
        "\x80\x04X\xff\xff\xff\xff."s,                     // BINUNICODE
        "\x80\x04\x8b\xff\xff\xff\x7f."s,                  // LONG4
        "\x80\x04\x95\xff\xff\xff\xff\xff\xff\xff\xffN."s,  // FRAME
    };
    for (const std::string& c : cases) EXPECT_NE(refusal(c).find("runs past the end"), std::string::npos) << refusal(c);
    py::Limits tiny;
    tiny.max_size = 8;
    EXPECT_THROW(py::loads(py::dumps(std::string(100, 'x')), tiny), py::UnpicklingError);
}

// CPython writes a list, dict or set in batches of 1000 items (MARK items APPENDS, SETITEMS or
// ADDITEMS). The reader's containers grow geometrically across batches: reserving exactly one
// batch more each time moved the whole container once per batch, quadratic in its size (a list
// of 800,000 ints took seconds, a few MB from any peer). Counted, not timed: the big buffers
// allocated while 200 batches are read, a few doublings rather than one per batch.
TEST(PyPickleSafety, BatchesOfItemsGrowTheContainerGeometrically) {
    constexpr int kItems = 200'000, kBatch = 1000;
    auto int4 = [](int i) {
        std::string s = "J";
        for (int b = 0; b < 4; ++b) s.push_back(static_cast<char>((i >> (8 * b)) & 0xff));
        return s;
    };
    auto batched = [&](const std::string& empty, const std::string& close, int per_item) {
        std::string p = "\x80\x04" + empty + "\x94";
        for (int i = 0; i < kItems; i += kBatch) {
            p += "(";
            for (int j = i; j < i + kBatch; ++j)
                for (int k = 0; k < per_item; ++k) p += int4(j);
            p += close;
        }
        return p + ".";
    };
    const std::vector<std::pair<const char*, std::string>> pickles = {
        {"list", batched("]", "e", 1)}, {"dict", batched("}", "u", 2)}, {"set", batched("\x8f", "\x90", 1)}};
    for (const auto& [what, p] : pickles) {
        SCOPED_TRACE(what);
        const std::size_t before = g_big_allocations;
        const py::Object o = py::loads(p);
        const std::size_t big = g_big_allocations - before;
        EXPECT_EQ(o.kind() == py::Kind::dict ? o.dict().size() : o.items().size(), static_cast<std::size_t>(kItems));
        EXPECT_LE(big, 40u) << "big allocations while reading " << kItems / kBatch << " batches";
    }
}

TEST(PyPickleSafety, MalformedStacksAreErrors) {
    const std::vector<std::string> cases = {
        ""s, "\x80\x04"s, "."s, "\x80\x04NN."s, "\x80\x04(N."s, "\x80\x04a."s, "\x80\x04Na."s, "\x80\x04N(a."s,
        "\x80\x04e."s, "\x80\x04}(N.u."s, "\x80\x04h\x05."s,
        "\x80\x04N\x85\x85N\x85\x85s."s, "\x80\x04)(Na."s, "\x80\x04X\x01\x00\x00\x00\xff."s, "\x80\x04N.extra"s,
        "\x80\x04}(]\x94N" "u."s,  // a list as a dict key: unhashable
        "\x80\x04\x8f(]" "\x90."s,  // a list in a set
        "\x80\x04" "1."s, "\x80\x04" "0."s, "\x80\x04" "2."s,
        "\x80\x02" "c__builtin__\nset\n."s,  // a global as the result
    };
    for (const std::string& c : cases) {
        std::string why = refusal(c);
        EXPECT_NE(why.find("bad pickle"), std::string::npos) << hex(c) << " -> " << why;
    }
}

TEST(PyPickleSafety, EveryTruncationAndRandomCorruptionIsAnErrorNeverACrash) {
    const std::string whole = lines(python(
        "import pickle\n"
        "v = {'a': [1, 2.5, 'x' * 20, b'b', (None, True)], 'b': {1, 2}, 3: frozenset({'f'}), 'c': bytearray(b'z'),\n"
        "     'big': 2**70 // 2**10, 'neg': -5, 's': [[1]] * 2}\n"
        "print(pickle.dumps(v, protocol=2).hex()); print(pickle.dumps(v, protocol=5).hex())\n"))[1];
    const std::string p = unhex(whole);
    ASSERT_NO_THROW(py::loads(p));
    for (std::size_t n = 0; n < p.size(); ++n) EXPECT_THROW(py::loads(p.substr(0, n)), py::UnpicklingError) << n;
    std::mt19937 rng(12345);
    int read = 0, refused = 0;
    for (int i = 0; i < 20000; ++i) {
        std::string q = p;
        const int flips = 1 + static_cast<int>(rng() % 4);
        for (int f = 0; f < flips; ++f) q[rng() % q.size()] = static_cast<char>(rng() & 0xff);
        try {
            py::Object o = py::loads(q);
            (void)o.repr();
            ++read;
        } catch (const py::UnpicklingError&) {
            ++refused;
        }
    }
    EXPECT_EQ(read + refused, 20000);
    EXPECT_GT(refused, 0);
}

// =============================================================================================
// Over a Connection: Python's multiprocessing.connection send()/recv() on the other end
// =============================================================================================

#include <mp/connection.hpp>

namespace {

constexpr const char* kPythonPickleEcho = R"PY(
import sys
from fractions import Fraction
from multiprocessing.connection import Connection
c = Connection(int(sys.argv[1]))
got = c.recv()
want = {'job': 3, 'args': [1.5, 'x', None], 'tags': {'a', 'b'}, 'key': (1, 'k'), 'blob': b'\x00\xff'}
c.send('same' if got == want else 'DIFFERENT: %r' % (got,))
c.send({'reply': (1, 2), 'data': b'\x00\xff', 'n': 2**63, 'f': frozenset({7}), 'ba': bytearray(b'q')})
c.send(Fraction(1, 3))   # not plain data: the C++ side refuses it and goes on
c.send([s * 2 for s in ('a', 'b')])
while True:              # echo until 'stop'
    m = c.recv()
    if m == 'stop':
        break
    c.send(m)
)PY";

struct PythonPeer {
    pid_t pid = -1;
    PythonPeer(const char* code, int fd) {
        const std::string fd_arg = std::to_string(fd);
        pid = ::fork();
        if (pid == 0) {
            const int flags = ::fcntl(fd, F_GETFD);
            ::fcntl(fd, F_SETFD, flags & ~FD_CLOEXEC);
            ::execlp("python3", "python3", "-c", code, fd_arg.c_str(), static_cast<char*>(nullptr));
            ::_exit(127);
        }
    }
    int wait() {
        int status = -1;
        if (pid > 0 && ::waitpid(std::exchange(pid, -1), &status, 0) < 0) status = -1;
        return status;
    }
    ~PythonPeer() {
        if (pid > 0) {
            ::kill(pid, SIGKILL);
            wait();
        }
    }
};

}  // namespace

TEST(PyConnection, PythonsSendAndRecvTalkToSendPyAndRecvPy) {
    auto [ours, theirs] = mp::Pipe();
    PythonPeer peer(kPythonPickleEcho, theirs.fileno());
    ASSERT_GT(peer.pid, 0);
    theirs.close();

    ours.send_py(py::Object::dict({{"job", 3},
                                   {"args", py::Object::list({1.5, "x", py::None{}})},
                                   {"tags", py::Object::set({"a", "b"})},
                                   {"key", py::Object::tuple({1, "k"})},
                                   {"blob", py::Bytes{"\0\xff"s}}}));
    EXPECT_EQ(ours.recv_py<std::string>(), "same");

    py::Object reply = ours.recv_py();
    ASSERT_EQ(reply.kind(), py::Kind::dict);
    EXPECT_EQ((reply.dict().find("reply")->as<std::pair<int, int>>()), (std::pair<int, int>{1, 2}));
    EXPECT_EQ(reply.dict().find("data")->as<py::Bytes>().data, "\0\xff"s);
    EXPECT_EQ(reply.dict().find("n")->as<std::uint64_t>(), std::uint64_t{1} << 63);
    EXPECT_EQ(reply.dict().find("f")->as<std::set<int>>(), std::set<int>{7});
    EXPECT_EQ(reply.dict().find("ba")->as<py::ByteArray>().data, "q");

    try {
        (void)ours.recv_py();
        ADD_FAILURE() << "a Fraction was read";
    } catch (const py::UnpicklingError& e) {
        EXPECT_NE(std::string(e.what()).find("global fractions.Fraction refused"), std::string::npos) << e.what();
    }
    // The refused message was consumed; the next one reads.
    EXPECT_EQ(ours.recv_py<std::vector<std::string>>(), (std::vector<std::string>{"aa", "bb"}));

    // Round trips through Python's pickle.loads/dumps.
    const std::map<std::string, std::vector<double>> m{{"a", {1.0, 2.5}}, {"b", {}}};
    ours.send_py(m);
    EXPECT_EQ((ours.recv_py<std::map<std::string, std::vector<double>>>()), m);
    const std::string big(100000, 'z');
    ours.send_py(big);
    EXPECT_EQ(ours.recv_py<std::string>(), big);
    ours.send_py(std::tuple<int, std::optional<std::string>, bool>{-7, std::nullopt, true});
    EXPECT_EQ((ours.recv_py<std::tuple<int, std::optional<std::string>, bool>>()),
              (std::tuple<int, std::optional<std::string>, bool>{-7, std::nullopt, true}));
    // A frame over the limit is refused before its body is read.
    ours.send_py(std::string(1000, 'y'));
    py::Limits small;
    small.max_size = 100;
    EXPECT_THROW((void)ours.recv_py(small), mp::DecodeError);

    EXPECT_THROW(ours.send_py(std::string("\xff")), py::PicklingError);
    ours.send_py("stop");
    const int status = peer.wait();
    EXPECT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 0) << status;
}
