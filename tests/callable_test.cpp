// Transferable callables: code named by (module build id, offset), invokers that register
// themselves, and refusal of what cannot or must not run.
#include <gtest/gtest.h>

#include <cstdlib>
#include <fstream>
#include <functional>
#include <sys/wait.h>
#include <unistd.h>

#include "mp/detail/task.hpp"
#include "mp/queue.hpp"
#include "mp/synchronize.hpp"

namespace d = mp::detail;

namespace {

int square(int x) { return x * x; }
std::string greet(std::string who, int times) {
    std::string s;
    for (int i = 0; i < times; ++i) s += "hi " + who + ";";
    return s;
}
void nothing() {}
void fill(std::vector<int>& v) { v.assign(3, 1); }
int count(const std::vector<int>& v) { return static_cast<int>(v.size()); }
int by_value(std::vector<int> v) { return static_cast<int>(v.size()); }
void produce(mp::Queue<int>& q, int n) { q.put(n); }
void set_event(mp::Event& e) { e.set(); }

struct Multiply {
    long operator()(long a, long b) const { return a * b; }
};

template <class R>
R run_and_decode(const d::Task& t) {
    return mp::decode<R>(d::run_task(t.bytes));
}

}  // namespace

TEST(Callable, CodeRefRoundTrip) {
    auto addr = reinterpret_cast<std::uintptr_t>(&square);
    d::CodeRef r = d::code_ref(addr);
    EXPECT_NE(r.module, 0u);
    EXPECT_EQ(d::resolve_code(r), addr);
}

TEST(Callable, FunctionPointerLambdaAndFunctionObject) {
    auto t1 = d::make_task(square, 12);
    ASSERT_TRUE(t1);
    EXPECT_EQ(run_and_decode<int>(*t1), 144);

    auto t2 = d::make_task(&greet, std::string("egon"), 2);
    ASSERT_TRUE(t2);
    EXPECT_EQ(run_and_decode<std::string>(*t2), "hi egon;hi egon;");

    auto lambda = [](int a, double b) { return a + b; };
    auto t3 = d::make_task(lambda, 2, 0.5);
    ASSERT_TRUE(t3);
    EXPECT_DOUBLE_EQ(run_and_decode<double>(*t3), 2.5);

    auto t4 = d::make_transferable_task(Multiply{}, 6L, 7L);
    EXPECT_EQ(run_and_decode<long>(t4), 42);

    auto t5 = d::make_task(nothing);
    ASSERT_TRUE(t5);
    EXPECT_EQ(d::run_task(t5->bytes), "");
}

TEST(Callable, ExceptionsPropagate) {
    auto thrower = [](int x) -> int { throw std::out_of_range("bad " + std::to_string(x)); };
    auto t = d::make_task(thrower, 5);
    ASSERT_TRUE(t);
    EXPECT_THROW(d::run_task(t->bytes), std::out_of_range);
}

TEST(Callable, NotTransferableGivesNoTask) {
    int captured = 3;
    auto capturing = [captured](int x) { return x + captured; };
    static_assert(!d::Transferable<decltype(capturing)>);
    EXPECT_FALSE(d::make_task(capturing, 1));
    struct NoCodec {
        std::function<void()> f;  // not trivially copyable, no cereal serialize
    };
    EXPECT_FALSE(d::make_task([](const NoCodec&) {}, NoCodec{}));
    static_assert(d::Transferable<decltype(&square)>);
    static_assert(d::Transferable<Multiply>);
}

// A non-const lvalue reference parameter would change the receiving process's copy, which the
// caller never sees: such work is not sendable (a compile error where it is checked). mp handles
// are exempt: their copy refers to the same queue, event, ...
TEST(Callable, MutableReferenceToValueIsNotSendable) {
    std::vector<int> v;
    static_assert(!d::sendable<decltype(&fill), std::vector<int>>);
    static_assert(!d::sendable<decltype([](auto& x) { x.clear(); }), std::vector<int>>);
    EXPECT_FALSE(d::make_task(fill, v));
    EXPECT_TRUE(v.empty());

    static_assert(d::sendable<decltype(&count), std::vector<int>>);
    static_assert(d::sendable<decltype(&by_value), std::vector<int>>);
    auto t = d::make_task(count, std::vector<int>{1, 2});
    ASSERT_TRUE(t);
    EXPECT_EQ(run_and_decode<int>(*t), 2);

    static_assert(d::shared_handle<mp::Queue<int>>);
    static_assert(d::sendable<decltype(&produce), mp::Queue<int>, int>);
    static_assert(d::sendable<decltype(&set_event), mp::Event>);
    auto by_value_task = d::make_task(by_value, std::vector<int>{1, 2, 3});
    ASSERT_TRUE(by_value_task);
    EXPECT_EQ(run_and_decode<int>(*by_value_task), 3);
    mp::Queue<int> q;
    EXPECT_TRUE(d::make_task(produce, q, 1));
    mp::Event e;
    EXPECT_TRUE(d::make_task(set_event, e));
}

TEST(Callable, ForgedCodeIsRefused) {
    auto t = d::make_task(square, 3);
    ASSERT_TRUE(t);
    std::string bytes = t->bytes;

    // An unknown module.
    std::string bad_module = bytes;
    bad_module[0] = static_cast<char>(bad_module[0] ^ 0x5a);
    EXPECT_THROW(d::run_task(bad_module), mp::DecodeError);

    // An offset outside any executable segment.
    std::string bad_offset = bytes;
    std::uint64_t huge = std::uint64_t{1} << 46;
    std::memcpy(bad_offset.data() + 8, &huge, 8);
    EXPECT_THROW(d::run_task(bad_offset), mp::DecodeError);

    // Real code that is not an invoker: the function itself rather than its trampoline.
    std::string not_invoker = bytes;
    d::CodeRef fn = d::code_ref(reinterpret_cast<std::uintptr_t>(&square));
    std::memcpy(not_invoker.data() + 8, &fn.offset, 8);
    EXPECT_THROW(d::run_task(not_invoker), mp::DecodeError);

    // Truncated and trailing bytes.
    EXPECT_THROW(d::run_task(bytes.substr(0, bytes.size() - 1)), mp::DecodeError);
    EXPECT_THROW(d::run_task(bytes + "x"), mp::DecodeError);
    EXPECT_THROW(d::run_task(""), mp::DecodeError);
}

// Entry point for the re-exec test below: a fresh exec of this binary (a different load address
// under ASLR) decodes and runs a task written by another process.
TEST(CallableReexec, HelperEntryPoint) {
    const char* path = std::getenv("MP_CALLABLE_TASK_FILE");
    if (path == nullptr) GTEST_SKIP() << "helper entry point: runs only when re-executed";
    std::ifstream in(path, std::ios::binary);
    std::string bytes((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
    int result = mp::decode<int>(d::run_task(bytes));
    std::_Exit(result == 49 ? 0 : 1);
}

TEST(CallableReexec, TaskRunsInAFreshExecOfTheSameBinary) {
    auto t = d::make_task(square, 7);
    ASSERT_TRUE(t);
    char path[] = "/tmp/mp_callable_task_XXXXXX";
    int fd = ::mkstemp(path);
    ASSERT_GE(fd, 0);
    ASSERT_EQ(::write(fd, t->bytes.data(), t->bytes.size()), static_cast<ssize_t>(t->bytes.size()));
    ::close(fd);
    pid_t pid = ::fork();
    if (pid == 0) {
        ::setenv("MP_CALLABLE_TASK_FILE", path, 1);
        ::execl("/proc/self/exe", "callable_test", "--gtest_filter=CallableReexec.HelperEntryPoint",
                static_cast<char*>(nullptr));
        ::_exit(127);
    }
    int status = 0;
    ASSERT_EQ(::waitpid(pid, &status, 0), pid);
    ::unlink(path);
    ASSERT_TRUE(WIFEXITED(status));
    EXPECT_EQ(WEXITSTATUS(status), 0);
}
