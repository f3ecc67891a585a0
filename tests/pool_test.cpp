// Tests of mp::Pool and mp::AsyncResult (include/mp/pool.hpp).
//
// Ported from CPython's Lib/test/_test_multiprocessing.py (_TestPool, _TestPoolWorkerErrors,
// _TestPoolWorkerLifetime), plus what mp adds: a worker that dies fails only its task (or
// chunk) with mp::WorkerDied, per-task timeouts, memory limits, a progress bar, stats.
//
// Every suite runs under each start method (StartMethods/<Suite>.<Test>/{fork,forkserver,spawn}):
// pool work is transferable by design, so only the pool's options differ.
//
// ctest runs every TEST in a process of its own and the shared main (helpers/test_main.cpp)
// fails a test that leaves a child, an fd or a /dev/shm entry behind. Tasks that must wait for
// the test wait on a file (a gate), never longer than kGateLimit. Every wait of the test is
// bounded; nothing asserts on speed.

#include <algorithm>
#include <atomic>
#include <chrono>
#include <csignal>
#include <cstdio>
#include <cstdlib>
#include <fcntl.h>
#include <filesystem>
#include <fstream>
#include <functional>
#include <future>
#include <gtest/gtest.h>
#include <map>
#include <mutex>
#include <optional>
#include <iterator>
#include <ranges>
#include <set>
#include <sstream>
#include <stdexcept>
#include <string>
#include <sys/mman.h>
#include <sys/resource.h>
#include <thread>
#include <tuple>
#include <type_traits>
#include <typeinfo>
#include <unistd.h>
#include <utility>
#include <vector>

#include "helpers/codec.hpp"
#include "helpers/gate_file.hpp"
#include "helpers/leak_check.hpp"
#include "helpers/lines.hpp"
#include "helpers/run_child.hpp"
#include "helpers/start_methods.hpp"
#include "helpers/temp_dir.hpp"
#include "helpers/timeouts.hpp"
#include "mp/pool.hpp"
#include "mp/synchronize.hpp"
#include "mp/shared_memory.hpp"

namespace {

using namespace std::chrono_literals;
using Clock = std::chrono::steady_clock;
using mp::test::TempDir;
using mp::test::wait_file;
using Gate = mp::test::FileGate;

constexpr auto kLong = 10s;

// ---------------------------------------------------------------------------------------------
// Work run in the workers
// ---------------------------------------------------------------------------------------------

int sqr(int x) { return x * x; }

using mp::test::FailsToLoad;
using mp::test::make_fails_to_load;
int sqr_wait(int x, int ms) {
    std::this_thread::sleep_for(std::chrono::milliseconds(ms));
    return x * x;
}
int mul(int a, int b) { return a * b; }
int parse_int(std::string s) { return std::stoi(s); }
int worker_pid(int) { return static_cast<int>(::getpid()); }
int sleep_ms(int ms) {
    std::this_thread::sleep_for(std::chrono::milliseconds(ms));
    return ms;
}
void noop(int) {}

struct CustomError : std::exception {
    const char* what() const noexcept override { return "a custom error"; }
};
int raise_runtime(int x) { throw std::runtime_error("raised for " + std::to_string(x)); }
int raise_custom(int) { throw CustomError(); }
/// x squared, except that 5 throws std::out_of_range.
int sqr_or_raise(int x) {
    if (x == 5) throw std::out_of_range("five");
    return x * x;
}

int segfault() {
    rlimit no_core{0, 0};
    ::setrlimit(RLIMIT_CORE, &no_core);
    ::signal(SIGSEGV, SIG_DFL);
    void* page = ::mmap(nullptr, 4096, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    *static_cast<volatile int*>(page) = 1;
    return -1;
}
/// x squared, except that 7 segfaults.
int sqr_or_segv(int x) {
    if (x == 7) segfault();
    return x * x;
}
int exit_seven(int) { std::exit(7); }

int hog_memory(int mb) {
    static std::vector<char*> kept;
    const std::size_t n = static_cast<std::size_t>(mb) << 20;
    char* p = static_cast<char*>(std::malloc(n));
    if (p == nullptr) return -1;
    for (std::size_t i = 0; i < n; i += 4096) p[i] = 1;
    kept.push_back(p);
    return static_cast<int>(::getpid());
}

int g_value = -1;
std::string g_name;
void init_globals(int v, std::string name) {
    g_value = v;
    g_name = std::move(name);
}
void init_that_throws() { throw std::runtime_error("initializer failed"); }
std::string read_globals(int) { return g_name + ":" + std::to_string(g_value); }

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

template <class P>
bool eventually(P pred, std::chrono::milliseconds limit = kLong) {
    const auto deadline = Clock::now() + limit;
    while (!pred()) {
        if (Clock::now() >= deadline) return false;
        std::this_thread::sleep_for(5ms);
    }
    return true;
}

template <class E, class F>
std::optional<E> catch_as(F&& f) {
    try {
        f();
    } catch (const E& e) {
        return e;
    } catch (const std::exception& e) {
        ADD_FAILURE() << "expected " << typeid(E).name() << ", got " << typeid(e).name() << ": " << e.what();
        return std::nullopt;
    } catch (...) {
        ADD_FAILURE() << "expected " << typeid(E).name() << ", got a non-std exception";
        return std::nullopt;
    }
    ADD_FAILURE() << "expected " << typeid(E).name() << ", nothing was thrown";
    return std::nullopt;
}

std::vector<int> range(int n) {
    std::vector<int> v(static_cast<std::size_t>(n));
    for (int i = 0; i < n; ++i) v[static_cast<std::size_t>(i)] = i;
    return v;
}
std::vector<int> squares(int n) {
    std::vector<int> v;
    for (int i = 0; i < n; ++i) v.push_back(i * i);
    return v;
}

template <class F>
std::string capture_stderr(F&& f) {
    TempDir dir;
    const std::string path = dir.file("stderr");
    std::fflush(stderr);
    const int saved = ::fcntl(2, F_DUPFD_CLOEXEC, 0);
    const int fd = ::open(path.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
    if (saved < 0 || fd < 0) throw std::runtime_error("capture_stderr: cannot redirect");
    ::dup2(fd, 2);
    ::close(fd);
    auto restore = [&] {
        std::fflush(stderr);
        ::dup2(saved, 2);
        ::close(saved);
    };
    try {
        f();
    } catch (...) {
        restore();
        throw;
    }
    restore();
    std::ifstream in(path);
    std::stringstream ss;
    ss << in.rdbuf();
    return ss.str();
}

// ---------------------------------------------------------------------------------------------
// Every suite below runs under fork, forkserver and spawn (StartMethods/<Suite>.<Test>/<method>).
// ---------------------------------------------------------------------------------------------

class PoolMethodTest : public mp::test::StartMethodTest {
protected:
    /// `o` with this run's start method.
    mp::PoolOptions with_method(mp::PoolOptions o) const {
        o.start_method = method();
        return o;
    }
    /// The name of this run's workers, as in Python: "ForkPoolWorker-", "ForkServerPoolWorker-",
    /// "SpawnPoolWorker-".
    std::string worker_prefix() const {
        switch (method()) {
            case mp::StartMethod::fork: return "ForkPoolWorker-";
            case mp::StartMethod::forkserver: return "ForkServerPoolWorker-";
            case mp::StartMethod::spawn: return "SpawnPoolWorker-";
        }
        return "?";
    }
};

class PoolTest : public PoolMethodTest {};
MP_INSTANTIATE_START_METHODS(PoolTest);
class PoolAsyncResult : public PoolMethodTest {};
MP_INSTANTIATE_START_METHODS(PoolAsyncResult);
class PoolMisuse : public PoolMethodTest {};
MP_INSTANTIATE_START_METHODS(PoolMisuse);
class PoolTimeoutValues : public PoolMethodTest {};
MP_INSTANTIATE_START_METHODS(PoolTimeoutValues);
class PoolWorkerDeath : public PoolMethodTest {};
MP_INSTANTIATE_START_METHODS(PoolWorkerDeath);
class PoolTimeout : public PoolMethodTest {};
MP_INSTANTIATE_START_METHODS(PoolTimeout);
class PoolWorkerLifetime : public PoolMethodTest {};
MP_INSTANTIATE_START_METHODS(PoolWorkerLifetime);
class PoolInitializer : public PoolMethodTest {};
MP_INSTANTIATE_START_METHODS(PoolInitializer);
class TestInitializers : public PoolMethodTest {};
MP_INSTANTIATE_START_METHODS(TestInitializers);
class PoolProgress : public PoolMethodTest {};
MP_INSTANTIATE_START_METHODS(PoolProgress);
class PoolStatsTest : public PoolMethodTest {};
MP_INSTANTIATE_START_METHODS(PoolStatsTest);

// ---------------------------------------------------------------------------------------------
// _TestPool
// ---------------------------------------------------------------------------------------------

TEST_P(PoolTest, Apply) {
    mp::Pool pool(with_method(mp::PoolOptions{.processes = 4}));
    EXPECT_EQ(pool.apply(sqr, 5), 25);
    EXPECT_EQ(pool.apply(mul, 3, 4), 12);
    EXPECT_EQ(pool.apply(sqr_wait, 3, 10), 9);
    pool.close();
    pool.join();
}

TEST_P(PoolTest, Map) {
    mp::Pool pool(with_method(mp::PoolOptions{.processes = 4}));
    EXPECT_EQ(pool.map(sqr, range(10)), squares(10));
    EXPECT_EQ(pool.map(sqr, range(100), 10), squares(100));
    EXPECT_EQ(pool.map(sqr, range(100), mp::MapOptions{.chunksize = 1}), squares(100));
}

TEST_P(PoolTest, MapDefaultChunksizeIsPythons) {
    // ceil(n / (4 * workers)): 100 items on 2 workers -> chunks of 13 -> 8 tasks.
    EXPECT_EQ(mp::detail::default_chunksize(100, 2), 13u);
    mp::Pool pool(with_method(mp::PoolOptions{.processes = 2}));
    EXPECT_EQ(pool.map(sqr, range(100)), squares(100));
    EXPECT_EQ(pool.stats().submitted, 8u);
}

TEST_P(PoolTest, Starmap) {
    mp::Pool pool(with_method(mp::PoolOptions{.processes = 4}));
    std::vector<std::tuple<int, int>> args;
    for (int i = 0; i < 10; ++i) args.emplace_back(i, i + 1);
    std::vector<int> ref;
    for (auto& [a, b] : args) ref.push_back(a * b);
    EXPECT_EQ(pool.starmap(mul, args), ref);
    EXPECT_EQ(pool.starmap(mul, args, 2), ref);
    std::vector<std::pair<int, int>> pairs{{2, 3}, {4, 5}};
    EXPECT_EQ(pool.starmap(mul, pairs), (std::vector<int>{6, 20}));
}

TEST_P(PoolTest, StarmapAsync) {
    mp::Pool pool(with_method(mp::PoolOptions{.processes = 4}));
    std::vector<std::tuple<int, int>> args;
    for (int i = 0; i < 100; ++i) args.emplace_back(i, i + 1);
    std::vector<int> ref;
    for (auto& [a, b] : args) ref.push_back(a * b);
    EXPECT_EQ(pool.starmap_async(mul, args).get(kLong), ref);
}

TEST_P(PoolTest, MapAsync) {
    mp::Pool pool(with_method(mp::PoolOptions{.processes = 4}));
    EXPECT_EQ(pool.map_async(sqr, range(10)).get(kLong), squares(10));
    EXPECT_EQ(pool.map_async(sqr, range(10), std::size_t{3}).get(kLong), squares(10));
}

TEST_P(PoolTest, MapAsyncCallbacks) {
    mp::Pool pool(with_method(mp::PoolOptions{.processes = 4}));
    std::mutex mu;
    std::vector<std::vector<int>> call_args;
    std::vector<std::string> errors;
    auto r = pool.map_async(
        sqr, std::vector<int>{1, 2}, {},
        // A lambda does not convert here (the std::function's R is deduced): see the report.
        std::function<void(const std::vector<int>&)>([&](const std::vector<int>& v) {
            std::lock_guard lk(mu);
            call_args.push_back(v);
        }),
        [&](std::exception_ptr e) {
            std::lock_guard lk(mu);
            try {
                std::rethrow_exception(e);
            } catch (const std::exception& x) {
                errors.push_back(x.what());
            }
        });
    EXPECT_EQ(r.get(kLong), (std::vector<int>{1, 4}));
    ASSERT_TRUE(eventually([&] {
        std::lock_guard lk(mu);
        return !call_args.empty();
    }));
    auto bad = pool.map_async(
        raise_runtime, std::vector<int>{1}, {},
        std::function<void(const std::vector<int>&)>([&](const std::vector<int>& v) {
            std::lock_guard lk(mu);
            call_args.push_back(v);
        }),
        [&](std::exception_ptr e) {
            std::lock_guard lk(mu);
            try {
                std::rethrow_exception(e);
            } catch (const std::exception& x) {
                errors.push_back(x.what());
            }
        });
    EXPECT_THROW(bad.get(kLong), std::runtime_error);
    ASSERT_TRUE(eventually([&] {
        std::lock_guard lk(mu);
        return !errors.empty();
    }));
    std::lock_guard lk(mu);
    EXPECT_EQ(call_args, (std::vector<std::vector<int>>{{1, 4}}));
    EXPECT_EQ(errors, (std::vector<std::string>{"raised for 1"}));
}

TEST_P(PoolTest, AnExceptionFromAMapCallbackIsNotAnError) {
    // As apply_async's: what escapes the success callback is printed; error_callback is only
    // for the work's failure, and get() still returns the values.
    mp::Pool pool(with_method(mp::PoolOptions{.processes = 2}));
    std::atomic<int> callbacks{0};
    std::atomic<int> error_callbacks{0};
    const std::string err = capture_stderr([&] {
        auto r = pool.map_async(
            sqr, std::vector<int>{1, 2, 3}, {},
            std::function<void(const std::vector<int>&)>([&](const std::vector<int>&) {
                ++callbacks;
                throw std::runtime_error("thrown by the callback");
            }),
            [&](std::exception_ptr) { ++error_callbacks; });
        EXPECT_EQ(r.get(kLong), (std::vector<int>{1, 4, 9}));
        EXPECT_TRUE(r.successful());
        // The same through apply_async, for comparison.
        auto a = pool.apply_async(sqr, mp::args(5), [&](const int&) {
            ++callbacks;
            throw std::runtime_error("thrown by the callback");
        }, [&](std::exception_ptr) { ++error_callbacks; });
        EXPECT_EQ(a.get(kLong), 25);
    });
    EXPECT_EQ(callbacks.load(), 2);
    EXPECT_EQ(error_callbacks.load(), 0);
    EXPECT_EQ(mp::test::count_of(err, "thrown by the callback"), 2u) << "stderr was: " << err;
    pool.close();
    pool.join();
}

// A pool whose last owner is a callback: its destructor runs on the pool's own thread, which
// cannot join itself (was: std::system_error EDEADLK out of the destructor, std::terminate). It
// terminates the pool there as anywhere else; the result is in by then.
TEST_P(PoolTest, PoolWhoseLastOwnerIsACallbackEndsCleanly) {
    for (const bool closed : {false, true}) {
        std::optional<mp::AsyncResult<int>> r;
        std::atomic<bool> deleted{false};
        {
            std::shared_ptr<mp::Pool> pool(new mp::Pool(with_method(mp::PoolOptions{.processes = 1})),
                                           [&](mp::Pool* p) {
                                               delete p;
                                               deleted = true;
                                           });
            r = pool->apply_async(sqr_wait, mp::args(6, 50), [pool](const int&) {});
            if (closed) pool->close();
        }
        EXPECT_EQ(r->get(kLong), 36) << "closed: " << closed;
        const auto end = std::chrono::steady_clock::now() + kLong;
        while (!deleted && std::chrono::steady_clock::now() < end)
            std::this_thread::sleep_for(std::chrono::milliseconds(1));
        ASSERT_TRUE(deleted.load());
        mp::detail::join_detached_pools();  // what the program's exit does
    }
}

// A result that arrives but cannot be decoded here is the call's failure everywhere: get() throws
// the decoder's exception, successful() is false, error_callback gets it and callback does not
// run (before: successful() true, neither callback, and a log line blaming the callback).
TEST_P(PoolTest, AResultThatCannotBeDecodedIsTheCallsFailure) {
    mp::Pool pool(with_method(mp::PoolOptions{.processes = 1}));
    std::atomic<int> callbacks{0};
    std::mutex mu;
    std::string error;
    auto r = pool.apply_async(make_fails_to_load, mp::args(14), [&](const FailsToLoad&) { ++callbacks; },
                              [&](std::exception_ptr e) {
                                  std::lock_guard lk(mu);
                                  try {
                                      std::rethrow_exception(e);
                                  } catch (const std::exception& x) {
                                      error = x.what();
                                  }
                              });
    ASSERT_TRUE(r.wait(kLong));
    EXPECT_THROW((void)r.get(), std::exception);
    EXPECT_FALSE(r.successful());
    EXPECT_EQ(callbacks.load(), 0);
    {
        std::lock_guard lk(mu);
        EXPECT_NE(error.find("cannot load 14"), std::string::npos) << error;
    }
    auto m = pool.map_async(make_fails_to_load, std::vector<int>{1, 2});
    ASSERT_TRUE(m.wait(kLong));
    EXPECT_THROW((void)m.get(), std::exception);
    EXPECT_FALSE(m.successful());
    EXPECT_EQ(pool.apply(sqr, 3), 9);  // the pool is unharmed
    pool.close();
    pool.join();
}

TEST_P(PoolTest, MapChunksize) {
    mp::Pool pool(with_method(mp::PoolOptions{.processes = 2}));
    EXPECT_EQ(pool.map_async(parse_int, std::vector<std::string>{"1"}, std::size_t{1}).get(kLong),
              (std::vector<int>{1}));
}

TEST_P(PoolTest, MapWithAnExceptionThrowsIt) {
    // test_map_no_failfast: the error arrives, and close/join do not hang.
    mp::Pool pool(with_method(mp::PoolOptions{.processes = 2}));
    if (auto e = catch_as<std::out_of_range>([&] { pool.map(sqr_or_raise, range(10), 1); })) {
        EXPECT_STREQ(e->what(), "five");
    }
    pool.close();
    pool.join();
}

TEST_P(PoolTest, Async) {
    mp::Pool pool(with_method(mp::PoolOptions{.processes = 2}));
    auto res = pool.apply_async(sqr_wait, 7, 100);
    EXPECT_EQ(res.get(kLong), 49);
    EXPECT_TRUE(res.ready());
    EXPECT_TRUE(res.successful());
}

TEST_P(PoolTest, AsyncTimeout) {
    TempDir dir;
    Gate gate(dir);
    mp::Pool pool(with_method(mp::PoolOptions{.processes = 2}));
    auto res = pool.apply_async(wait_file, gate.path());
    EXPECT_THROW(res.get(100ms), mp::TimeoutError);
    EXPECT_FALSE(res.wait(50ms));
    EXPECT_FALSE(res.ready());
    gate.open();
    EXPECT_TRUE(res.wait(kLong));
    EXPECT_EQ(res.get(kLong), 1);
}

TEST_P(PoolTest, Imap) {
    mp::Pool pool(with_method(mp::PoolOptions{.processes = 4}));
    auto it = pool.imap(sqr, range(10));
    std::vector<int> got;
    for (int v : it) got.push_back(v);
    EXPECT_EQ(got, squares(10));

    auto it2 = pool.imap(sqr, range(10));
    for (int i = 0; i < 10; ++i) EXPECT_EQ(it2.next(kLong), std::optional<int>(i * i));
    EXPECT_EQ(it2.next(kLong), std::nullopt);

    auto it3 = pool.imap(sqr, range(1000), 100);
    for (int i = 0; i < 1000; ++i) EXPECT_EQ(it3.next(kLong), std::optional<int>(i * i));
    EXPECT_EQ(it3.next(kLong), std::nullopt);
}

// Calls that each take a handle (here copies of one Lock: each copy's descriptor counts): a
// chunk carries at most 253 descriptors, so map, starmap and imap start a new chunk before one
// would pass it. Before, the default chunksize (1,100 items on one worker: 275) or a larger one
// made every chunk fail with mp::Error "a task may carry at most 253 descriptors".
int twice_under(mp::Lock lock, int x) {
    std::lock_guard hold(lock);
    return 2 * x;
}
int twice_locked(const std::tuple<mp::Lock, int>& row) { return twice_under(std::get<0>(row), std::get<1>(row)); }

TEST_P(PoolTest, MapsOfCallsThatEachTakeAHandleStayUnderTheDescriptorLimit) {
    mp::Pool pool(with_method(mp::PoolOptions{.processes = 1}));
    const mp::Lock lock;
    std::vector<std::tuple<mp::Lock, int>> rows;
    std::vector<int> expected;
    for (int i = 0; i < 1100; ++i) {
        rows.emplace_back(lock, i);
        expected.push_back(2 * i);
    }
    EXPECT_EQ(pool.starmap_async(twice_under, rows).get(kLong), expected);  // default chunksize
    EXPECT_EQ(pool.map_async(twice_locked, rows, std::size_t{1000}).get(kLong), expected);
    auto it = pool.imap(twice_locked, rows, 600);
    for (int i = 0; i < 1100; ++i) ASSERT_EQ(it.next(kLong), std::optional<int>(2 * i));
    EXPECT_EQ(it.next(kLong), std::nullopt);
}

TEST_P(PoolTest, ImapContinuesAfterAFailedItem) {
    mp::Pool pool(with_method(mp::PoolOptions{.processes = 2}));
    for (std::size_t cs : {1u, 3u}) {
        auto it = pool.imap(sqr_or_raise, range(10), cs);
        for (int i = 0; i < 10; ++i) {
            if (i == 5) {
                EXPECT_THROW(it.next(kLong), std::out_of_range) << "chunksize " << cs;
            } else {
                EXPECT_EQ(it.next(kLong), std::optional<int>(i * i)) << "item " << i << ", chunksize " << cs;
            }
        }
        EXPECT_EQ(it.next(kLong), std::nullopt);
    }
}

TEST_P(PoolTest, ImapNextTimeout) {
    TempDir dir;
    Gate gate(dir);
    mp::Pool pool(with_method(mp::PoolOptions{.processes = 2}));
    std::vector<std::string> paths{gate.path()};
    auto it = pool.imap(wait_file, paths);
    EXPECT_THROW(it.next(100ms), mp::TimeoutError);
    gate.open();
    EXPECT_EQ(it.next(kLong), std::optional<int>(1));
    EXPECT_EQ(it.next(kLong), std::nullopt);
}

// exception_throwing_generator(total, when) of CPython's test: 0, 1, ... total - 1, but
// SayWhenError instead of `when` (-1: at once). The input is read in this process, so any
// exception type works.
struct SayWhenError : std::runtime_error {
    SayWhenError() : std::runtime_error("Somebody said when") {}
};
/// A lazy input range: f(0), f(1), ... f(last - 1) (for ever without `last`), each computed when
/// the reader dereferences it: std::views::iota(0, last) | std::views::transform(f), which clang
/// 14 cannot compile against libstdc++ 12 (it fails on every view_interface).
template <class F>
class Generated {
public:
    explicit Generated(F f, std::optional<int> last = std::nullopt) : f_(std::move(f)), last_(last) {}

    class iterator {
    public:
        using value_type = std::invoke_result_t<const F&, int>;
        using difference_type = std::ptrdiff_t;
        iterator() = default;
        explicit iterator(const Generated* g) : g_(g) {}
        value_type operator*() const { return g_->f_(i_); }
        iterator& operator++() {
            ++i_;
            return *this;
        }
        void operator++(int) { ++i_; }
        friend bool operator==(const iterator& it, std::default_sentinel_t) { return it.at_end(); }

    private:
        bool at_end() const { return g_->last_ && i_ >= *g_->last_; }
        const Generated* g_ = nullptr;
        int i_ = 0;
    };

    iterator begin() const { return iterator(this); }
    std::default_sentinel_t end() const { return {}; }

private:
    F f_;
    std::optional<int> last_;
};

auto exception_throwing_generator(int total, int when) {
    return Generated(
        [when](int i) {
            if (when == -1 || i == when) throw SayWhenError();
            return i;
        },
        total);
}

TEST_P(PoolTest, PythonTestImapHandleIterableException) {
    // _TestPool.test_imap_handle_iterable_exception
    mp::Pool pool(with_method(mp::PoolOptions{.processes = 4}));
    // SayWhenError seen at the very first of the iterable
    auto it = pool.imap(sqr, exception_throwing_generator(1, -1), 1);
    EXPECT_THROW(it.next(kLong), SayWhenError);
    // again, make sure it's reentrant
    it = pool.imap(sqr, exception_throwing_generator(1, -1), 1);
    EXPECT_THROW(it.next(kLong), SayWhenError);

    it = pool.imap(sqr, exception_throwing_generator(10, 3), 1);
    for (int i = 0; i < 3; ++i) EXPECT_EQ(it.next(kLong), std::optional<int>(i * i));
    EXPECT_THROW(it.next(kLong), SayWhenError);
    // mp: then the end, as after the last result.
    EXPECT_EQ(it.next(kLong), std::nullopt);

    // SayWhenError seen at start of problematic chunk's results
    it = pool.imap(sqr, exception_throwing_generator(20, 7), 2);
    for (int i = 0; i < 6; ++i) EXPECT_EQ(it.next(kLong), std::optional<int>(i * i));
    EXPECT_THROW(it.next(kLong), SayWhenError);
    it = pool.imap(sqr, exception_throwing_generator(20, 7), 4);
    for (int i = 0; i < 4; ++i) EXPECT_EQ(it.next(kLong), std::optional<int>(i * i));
    EXPECT_THROW(it.next(kLong), SayWhenError);
}

TEST_P(PoolTest, PythonTestImapUnorderedHandleIterableException) {
    // _TestPool.test_imap_unordered_handle_iterable_exception
    mp::Pool pool(with_method(mp::PoolOptions{.processes = 4}));
    // SayWhenError seen at the very first of the iterable
    auto it = pool.imap_unordered(sqr, exception_throwing_generator(1, -1), 1);
    EXPECT_THROW(it.next(kLong), SayWhenError);
    // again, make sure it's reentrant
    it = pool.imap_unordered(sqr, exception_throwing_generator(1, -1), 1);
    EXPECT_THROW(it.next(kLong), SayWhenError);

    for (auto [total, when, chunksize] : {std::tuple(10, 3, std::size_t{1}), std::tuple(20, 7, std::size_t{2})}) {
        it = pool.imap_unordered(sqr, exception_throwing_generator(total, when), chunksize);
        const std::vector<int> all = squares(total);
        std::multiset<int> expected_values(all.begin(), all.end());
        // imap_unordered makes it difficult to anticipate the SayWhenError
        EXPECT_THROW(
            for (int i = 0; i < total; ++i) {
                auto value = it.next(kLong);
                ASSERT_TRUE(value.has_value());
                auto pos = expected_values.find(*value);
                ASSERT_NE(pos, expected_values.end()) << *value;
                expected_values.erase(pos);
            },
            SayWhenError);
    }
}

TEST_P(PoolTest, ImapReadsAnEndlessInputLazily) {
    mp::Pool pool(with_method(mp::PoolOptions{.processes = 2}));
    std::atomic<int> read{0};
    auto counted = Generated([&read](int i) {
        ++read;
        return i;
    });
    constexpr int kTaken = 50;
    {
        auto it = pool.imap(sqr, counted, 3);
        for (int i = 0; i < kTaken; ++i) ASSERT_EQ(it.next(kLong), std::optional<int>(i * i));
        // Read ahead: at most two chunks per worker beyond the chunk being taken.
        EXPECT_LE(read.load(), (kTaken / 3 + 1 + 2 * 2) * 3);
    }
    read = 0;
    {
        auto it = pool.imap_unordered(sqr, counted);
        std::set<int> got;
        for (int i = 0; i < kTaken; ++i) {
            auto v = it.next(kLong);
            ASSERT_TRUE(v.has_value());
            got.insert(*v);
        }
        EXPECT_EQ(got.size(), std::size_t{kTaken});
        EXPECT_LE(read.load(), kTaken + 2 * 2);
    }
}

TEST_P(PoolTest, CloseReadsTheRestOfAnImapsInput) {
    mp::Pool pool(with_method(mp::PoolOptions{.processes = 2}));
    std::atomic<int> read{0};
    auto counted = Generated(
        [&read](int i) {
            ++read;
            return i;
        },
        30);
    auto it = pool.imap(sqr, counted, 2);
    EXPECT_LT(read.load(), 30);
    pool.close();
    EXPECT_EQ(read.load(), 30);
    std::vector<int> got;
    while (auto v = it.next(kLong)) got.push_back(*v);
    EXPECT_EQ(got, squares(30));
    pool.join();
}

TEST_P(PoolTest, ImapUnordered) {
    mp::Pool pool(with_method(mp::PoolOptions{.processes = 4}));
    for (std::size_t cs : {1u, 53u}) {
        std::vector<int> got;
        for (int v : pool.imap_unordered(sqr, range(1000), cs)) got.push_back(v);
        std::sort(got.begin(), got.end());
        EXPECT_EQ(got, squares(1000)) << "chunksize " << cs;
    }
}

TEST_P(PoolTest, ImapUnorderedYieldsInCompletionOrder) {
    TempDir dir;
    Gate gate(dir);
    mp::Pool pool(with_method(mp::PoolOptions{.processes = 2}));
    // The first input waits for the gate; the second is a plain square and comes first.
    std::vector<std::string> in{gate.path(), "fast"};
    auto it = pool.imap_unordered([](std::string p) { return p == "fast" ? 2 : wait_file(p); }, in);
    EXPECT_EQ(it.next(kLong), std::optional<int>(2));
    gate.open();
    EXPECT_EQ(it.next(kLong), std::optional<int>(1));
    EXPECT_EQ(it.next(kLong), std::nullopt);
}

TEST_P(PoolTest, MakePool) {
    for (int n : {0, -1}) {
        if (auto e = catch_as<std::invalid_argument>([&] { mp::Pool p(with_method(mp::PoolOptions{.processes = n})); })) {
            EXPECT_NE(std::string(e->what()).find("Number of processes must be at least 1"), std::string::npos)
                << e->what();
        }
    }
    EXPECT_THROW(mp::Pool(with_method(mp::PoolOptions{.processes = 0})), std::invalid_argument);
    mp::Pool p(with_method(mp::PoolOptions{.processes = 3}));
    EXPECT_EQ(p.processes(), 3);
    p.close();
    p.join();
}

TEST_P(PoolTest, TerminateFailsRunningWorkQuickly) {
    TempDir dir;
    Gate gate(dir);
    mp::Pool pool(with_method(mp::PoolOptions{.processes = 2}));
    std::vector<mp::AsyncResult<int>> rs;
    for (int i = 0; i < 6; ++i) rs.push_back(pool.apply_async(wait_file, gate.path()));
    auto big = pool.map_async(sleep_ms, std::vector<int>(200, 100), std::size_t{1});
    std::this_thread::sleep_for(100ms);
    pool.terminate();
    for (auto& r : rs) EXPECT_THROW(r.get(5s), mp::BrokenProcessPool);
    EXPECT_THROW(big.get(5s), mp::BrokenProcessPool);
    pool.join();
    EXPECT_THROW(pool.apply(sqr, 1), mp::Error);
}

TEST_P(PoolTest, EmptyIterable) {
    mp::Pool pool(with_method(mp::PoolOptions{.processes = 2}));
    std::vector<int> none;
    EXPECT_TRUE(pool.map(sqr, none).empty());
    EXPECT_TRUE(pool.map_async(sqr, none).get(kLong).empty());
    std::vector<std::tuple<int, int>> no_pairs;
    EXPECT_TRUE(pool.starmap(mul, no_pairs).empty());
    int n = 0;
    for (int v : pool.imap(sqr, none)) n += v + 1;
    for (int v : pool.imap_unordered(sqr, none)) n += v + 1;
    EXPECT_EQ(n, 0);
    pool.close();
    pool.join();
}

TEST_P(PoolTest, DestructorAfterCloseWaitsForTheWork) {
    // test_context: the submitted work finishes.
    std::vector<mp::AsyncResult<int>> rs;
    {
        mp::Pool pool(with_method(mp::PoolOptions{.processes = 2}));
        for (int i = 0; i < 6; ++i) rs.push_back(pool.apply_async(sqr_wait, i, 30));
        pool.close();
    }
    for (int i = 0; i < 6; ++i) EXPECT_EQ(rs[static_cast<std::size_t>(i)].get(0s), i * i);
}

TEST_P(PoolTest, DestructorOfARunningPoolTerminatesIt) {
    TempDir dir;
    Gate gate(dir);
    std::optional<mp::AsyncResult<int>> r;
    {
        mp::Pool pool(with_method(mp::PoolOptions{.processes = 1}));
        r.emplace(pool.apply_async(wait_file, gate.path()));
    }
    EXPECT_THROW(r->get(kLong), mp::BrokenProcessPool);
}

TEST_P(PoolTest, ExceptionsArriveWithTheirTypes) {
    // test_traceback / test_wrapped_exception
    mp::Pool pool(with_method(mp::PoolOptions{.processes = 1}));
    if (auto e = catch_as<std::runtime_error>([&] { pool.apply(raise_runtime, 123); })) {
        EXPECT_STREQ(e->what(), "raised for 123");
    }
    const int pid = pool.apply(worker_pid, 0);
    if (auto e = catch_as<mp::RemoteError>([&] { pool.apply(raise_custom, 0); })) {
        EXPECT_NE(e->type_name().find("CustomError"), std::string::npos) << e->type_name();
        EXPECT_EQ(e->message(), "a custom error");
        EXPECT_NE(e->origin().find(std::to_string(pid)), std::string::npos) << e->origin();
    }
    EXPECT_EQ(pool.apply(sqr, 3), 9);
}

TEST_P(PoolTest, ApplyAfterCloseThrows) {
    mp::Pool pool(with_method(mp::PoolOptions{.processes = 2}));
    pool.close();
    EXPECT_THROW(pool.apply(sqr, 1), mp::Error);
    EXPECT_THROW(pool.apply_async(sqr, 1), mp::Error);
    EXPECT_THROW(pool.map(sqr, range(3)), mp::Error);
    EXPECT_THROW(pool.imap(sqr, range(3)), mp::Error);
    pool.join();
}

TEST_P(PoolTest, TerminateFromACallbackReturns) {
    // As Python's terminate() in a callback: it returns normally; the workers go once the
    // callback has returned, and the work still running fails.
    TempDir dir;
    Gate gate(dir);
    mp::Pool pool(with_method(mp::PoolOptions{.processes = 2}));
    auto blocked = pool.apply_async(wait_file, gate.path());
    std::atomic<int> returned{0};
    std::atomic<int> threw{0};
    auto r = pool.apply_async(sqr, mp::args(7), [&](const int&) {
        try {
            pool.terminate();
            returned = 1;
        } catch (...) {
            threw = 1;
        }
    });
    EXPECT_EQ(r.get(kLong), 49);
    EXPECT_EQ(returned.load(), 1);
    EXPECT_EQ(threw.load(), 0);
    EXPECT_THROW(blocked.get(kLong), mp::BrokenProcessPool);
    EXPECT_THROW(pool.apply(sqr, 1), mp::Error);
    pool.join();
}

TEST_P(PoolTest, JoinBeforeCloseThrows) {
    mp::Pool pool(with_method(mp::PoolOptions{.processes = 2}));
    if (auto e = catch_as<mp::Error>([&] { pool.join(); })) {
        EXPECT_NE(std::string(e->what()).find("still running"), std::string::npos) << e->what();
    }
    pool.close();
    pool.join();
}

// ---------------------------------------------------------------------------------------------
// AsyncResult
// ---------------------------------------------------------------------------------------------

TEST_P(PoolAsyncResult, SuccessfulBeforeReadyThrows) {
    TempDir dir;
    Gate gate(dir);
    mp::Pool pool(with_method(mp::PoolOptions{.processes = 2}));
    auto r = pool.apply_async(wait_file, gate.path());
    EXPECT_FALSE(r.ready());
    EXPECT_THROW((void)r.successful(), mp::Error);
    gate.open();
    EXPECT_TRUE(r.wait(kLong));
    EXPECT_TRUE(r.ready());
    EXPECT_TRUE(r.successful());
    auto bad = pool.apply_async(raise_runtime, 1);
    EXPECT_TRUE(bad.wait(kLong));
    EXPECT_FALSE(bad.successful());
    EXPECT_THROW(bad.get(kLong), std::runtime_error);
}

// A map whose one item raised is not successful (get() rethrows it), as Python's MapResult.
TEST_P(PoolAsyncResult, AMapWithAFailedItemIsNotSuccessful) {
    mp::Pool pool(with_method(mp::PoolOptions{.processes = 2}));
    const std::vector<int> in{1, 2, 3, 4};
    auto ok = pool.map_async(sqr, in, 1);
    ASSERT_TRUE(ok.wait(kLong));
    EXPECT_TRUE(ok.successful());
    auto bad = pool.map_async(sqr_or_raise, std::vector<int>{4, 5, 6}, 1);
    ASSERT_TRUE(bad.wait(kLong));
    EXPECT_FALSE(bad.successful());
    EXPECT_THROW(bad.get(kLong), std::exception);
    const std::vector<std::tuple<int, int>> pairs{{1, 2}, {3, 4}};
    auto star_ok = pool.starmap_async(mul, pairs);
    ASSERT_TRUE(star_ok.wait(kLong));
    EXPECT_TRUE(star_ok.successful());
    const std::vector<std::tuple<int>> one{{1}, {2}};
    auto star_bad = pool.starmap_async(raise_runtime, one);
    ASSERT_TRUE(star_bad.wait(kLong));
    EXPECT_FALSE(star_bad.successful());
}

TEST_P(PoolAsyncResult, VoidResult) {
    mp::Pool pool(with_method(mp::PoolOptions{.processes = 1}));
    auto r = pool.apply_async(noop, 1);
    r.get(kLong);
    EXPECT_TRUE(r.successful());
}

TEST_P(PoolAsyncResult, MapAndImapOverAVoidFunction) {
    mp::Pool pool(with_method(mp::PoolOptions{.processes = 2}));
    std::vector<int> in(10, 1);
    EXPECT_EQ(pool.map(noop, in, 3).size(), in.size());
    auto it = pool.imap(noop, in, 4);
    std::size_t n = 0;
    while (it.next(kLong)) ++n;
    EXPECT_EQ(n, in.size());
}

TEST_P(PoolAsyncResult, CallbackRunsInTheParentOnAnotherThread) {
    mp::Pool pool(with_method(mp::PoolOptions{.processes = 2}));
    std::mutex mu;
    std::vector<int> values;
    std::vector<pid_t> pids;
    std::vector<std::thread::id> threads;
    std::vector<mp::AsyncResult<int>> rs;
    for (int i = 0; i < 5; ++i) {
        rs.push_back(pool.apply_async(mul, mp::args(i, 10), [&](const int& v) {
            std::lock_guard lk(mu);
            values.push_back(v);
            pids.push_back(::getpid());
            threads.push_back(std::this_thread::get_id());
        }));
    }
    for (int i = 0; i < 5; ++i) EXPECT_EQ(rs[static_cast<std::size_t>(i)].get(kLong), i * 10);
    ASSERT_TRUE(eventually([&] {
        std::lock_guard lk(mu);
        return values.size() == 5;
    }));
    std::lock_guard lk(mu);
    std::sort(values.begin(), values.end());
    EXPECT_EQ(values, (std::vector<int>{0, 10, 20, 30, 40}));
    for (pid_t p : pids) EXPECT_EQ(p, ::getpid());
    for (auto t : threads) EXPECT_NE(t, std::this_thread::get_id());
}

// A result that is in before its callback is attached (here: a map over nothing, done at once;
// with fast tasks, often an apply_async's too) still has its callback run on the pool's thread,
// as every other, never in the caller's, which may hold what the callback takes.
TEST_P(PoolAsyncResult, CallbackOfAResultAlreadyInRunsOnThePoolsThread) {
    mp::Pool pool(with_method(mp::PoolOptions{.processes = 1}));
    std::atomic<int> calls{0};
    std::thread::id ran_on;
    auto r = pool.map_async(sqr, std::vector<int>{}, {}, [&](const std::vector<int>& v) {
        ran_on = std::this_thread::get_id();
        if (v.empty()) ++calls;
    });
    ASSERT_TRUE(r.wait(kLong));  // ready only once the callback returned
    EXPECT_EQ(calls.load(), 1);
    EXPECT_NE(ran_on, std::this_thread::get_id());
    pool.close();
    pool.join();
}

TEST_P(PoolAsyncResult, ErrorCallback) {
    // _TestPoolWorkerErrors.test_async_error_callback
    mp::Pool pool(with_method(mp::PoolOptions{.processes = 2}));
    std::mutex mu;
    std::vector<std::string> errors;
    std::atomic<int> ok_calls{0};
    auto r = pool.apply_async(
        raise_runtime, mp::args(4), [&](const int&) { ++ok_calls; },
        [&](std::exception_ptr e) {
            std::lock_guard lk(mu);
            try {
                std::rethrow_exception(e);
            } catch (const std::runtime_error& x) {
                errors.push_back(x.what());
            } catch (...) {
                errors.push_back("?");
            }
        });
    EXPECT_THROW(r.get(kLong), std::runtime_error);
    ASSERT_TRUE(eventually([&] {
        std::lock_guard lk(mu);
        return !errors.empty();
    }));
    std::lock_guard lk(mu);
    EXPECT_EQ(errors, (std::vector<std::string>{"raised for 4"}));
    EXPECT_EQ(ok_calls.load(), 0);
}

TEST_P(PoolAsyncResult, ErrorCallbackForAWorkerThatDied) {
    mp::Pool pool(with_method(mp::PoolOptions{.processes = 2}));
    std::atomic<bool> died{false};
    auto r = pool.apply_async(exit_seven, mp::args(0), nullptr, [&](std::exception_ptr e) {
        try {
            std::rethrow_exception(e);
        } catch (const mp::WorkerDied& w) {
            died = w.exit_code() == std::optional<int>(7);
        } catch (...) {
        }
    });
    EXPECT_THROW(r.get(kLong), mp::WorkerDied);
    EXPECT_TRUE(eventually([&] { return died.load(); }));
}

// Python sets an AsyncResult ready only after its callback returned, so wait() and get() see what
// the callback did: no `eventually` below. Each check runs several rounds because the callback
// used to race the waiter (it ran after the result was ready in 21 runs of 25).
constexpr int kCallbackRounds = 25;

std::string what_of(std::exception_ptr e) {
    try {
        std::rethrow_exception(e);
    } catch (const std::exception& x) {
        return std::string(typeid(x).name()) + ": " + x.what();
    }
}

TEST_P(PoolAsyncResult, PythonTestMapAsyncCallbacks) {
    // _TestPool.test_map_async_callbacks (Python's int() is parse_int: std::stoi)
    mp::Pool pool(with_method(mp::PoolOptions{.processes = 2}));
    for (int round = 0; round < kCallbackRounds; ++round) {
        std::vector<std::vector<int>> values;
        std::vector<std::string> errors;
        auto on_value = std::function<void(const std::vector<int>&)>(
            [&](const std::vector<int>& v) { values.push_back(v); });
        auto on_error = [&](std::exception_ptr e) { errors.push_back(what_of(e)); };

        ASSERT_TRUE(pool.map_async(parse_int, std::vector<std::string>{"1"}, {}, on_value, on_error)
                        .wait(kLong));
        ASSERT_EQ(values, (std::vector<std::vector<int>>{{1}})) << "round " << round;
        ASSERT_TRUE(errors.empty());

        ASSERT_TRUE(pool.map_async(parse_int, std::vector<std::string>{"a"}, {}, on_value, on_error)
                        .wait(kLong));
        ASSERT_EQ(errors.size(), 1u) << "round " << round;
        EXPECT_NE(errors[0].find("invalid_argument"), std::string::npos) << errors[0];
        EXPECT_EQ(values.size(), 1u);
    }
    // Python's positional form, a chunksize before the callbacks (map_async and starmap_async).
    std::vector<int> got;
    std::vector<std::string> failed;
    ASSERT_TRUE(pool.map_async(
                        parse_int, std::vector<std::string>{"1", "2"}, 1,
                        [&](const std::vector<int>& v) { got = v; },
                        [&](std::exception_ptr e) { failed.push_back(what_of(e)); })
                    .wait(kLong));
    EXPECT_EQ(got, (std::vector<int>{1, 2}));
    ASSERT_TRUE(pool.starmap_async(
                        mul, std::vector<std::pair<int, int>>{{2, 3}}, std::size_t{1},
                        [&](const std::vector<int>& v) { got = v; }, nullptr)
                    .wait(kLong));
    EXPECT_EQ(got, (std::vector<int>{6}));
    ASSERT_TRUE(pool.map_async(parse_int, std::vector<std::string>{"x"}, 2, nullptr,
                               [&](std::exception_ptr e) { failed.push_back(what_of(e)); })
                    .wait(kLong));
    EXPECT_EQ(failed.size(), 1u);
}

TEST_P(PoolAsyncResult, PythonTestAsyncErrorCallback) {
    // _TestPoolWorkerErrors.test_async_error_callback
    mp::Pool pool(with_method(mp::PoolOptions{.processes = 2}));
    for (int round = 0; round < kCallbackRounds; ++round) {
        std::optional<std::string> scratchpad;
        // A callback that takes a while: the waiter must still wait for it.
        auto res = pool.apply_async(raise_runtime, mp::args(round), nullptr, [&](std::exception_ptr e) {
            std::this_thread::sleep_for(2ms);
            scratchpad = what_of(e);
        });
        EXPECT_THROW(res.get(kLong), std::runtime_error);
        ASSERT_TRUE(scratchpad.has_value()) << "round " << round;
        EXPECT_NE(scratchpad->find("raised for " + std::to_string(round)), std::string::npos);
    }
}

TEST_P(PoolAsyncResult, CallbacksRunBeforeGetReturns) {
    // The value callbacks of apply_async and starmap_async, and a callback that throws (printed;
    // the result still becomes ready).
    mp::Pool pool(with_method(mp::PoolOptions{.processes = 2}));
    for (int round = 0; round < kCallbackRounds; ++round) {
        std::optional<int> got;
        auto r = pool.apply_async(sqr, mp::args(round), [&](const int& v) { got = v; });
        EXPECT_EQ(r.get(kLong), round * round);
        ASSERT_EQ(got, round * round) << "round " << round;

        std::optional<std::vector<int>> products;
        auto s = pool.starmap_async(mul, std::vector<std::pair<int, int>>{{round, 2}, {3, 4}}, {},
                                    [&](const std::vector<int>& v) { products = v; });
        EXPECT_EQ(s.get(kLong), (std::vector<int>{round * 2, 12}));
        ASSERT_EQ(products, (std::vector<int>{round * 2, 12})) << "round " << round;
    }
    std::string err = capture_stderr([&] {
        auto r = pool.apply_async(sqr, mp::args(3), [](const int&) { throw std::runtime_error("cb"); });
        EXPECT_EQ(r.get(kLong), 9);
    });
    EXPECT_NE(err.find("cb"), std::string::npos) << err;
}

// ---------------------------------------------------------------------------------------------
// Misuse (issue 12 item 6): a result moved from throws mp::EmptyHandle on use, never crashes.
// ---------------------------------------------------------------------------------------------

TEST_P(PoolMisuse, MovedFromResultsThrowEmptyHandle) {
    mp::Pool pool(with_method(mp::PoolOptions{.processes = 1}));
    auto r = pool.apply_async(sqr, 3);
    auto r2 = std::move(r);
    EXPECT_THROW((void)r.get(), mp::EmptyHandle);  // NOLINT(bugprone-use-after-move)
    EXPECT_THROW((void)r.get(1s), mp::EmptyHandle);
    EXPECT_THROW((void)r.wait(), mp::EmptyHandle);
    EXPECT_THROW((void)r.ready(), mp::EmptyHandle);
    EXPECT_THROW((void)r.successful(), mp::EmptyHandle);
    EXPECT_EQ(r2.get(kLong), 9);

    auto m = pool.map_async(sqr, std::vector{1, 2});
    auto m2 = std::move(m);
    EXPECT_THROW((void)m.get(), mp::EmptyHandle);  // NOLINT(bugprone-use-after-move)
    EXPECT_EQ(m2.get(kLong), (std::vector{1, 4}));

    auto it = pool.imap(sqr, std::vector{1, 2});
    auto it2 = std::move(it);
    EXPECT_THROW((void)it.next(), mp::EmptyHandle);  // NOLINT(bugprone-use-after-move)
    EXPECT_THROW((void)it.begin(), mp::EmptyHandle);
    EXPECT_EQ(it2.next(kLong), std::optional<int>(1));
    EXPECT_EQ(it2.next(kLong), std::optional<int>(4));
}

// ---------------------------------------------------------------------------------------------
// Timeout values (issue 12 item 5): "for ever" durations wait (the value arrives later and is
// returned), zero and negative ones only look, each of its own type.
// ---------------------------------------------------------------------------------------------

TEST_P(PoolTimeoutValues, AsyncResultGetAndWait) {
    TempDir dir;  // outlives the pool
    mp::Pool pool(with_method(mp::PoolOptions{.processes = 2}));
    mp::test::for_each_forever([&](auto forever) {
        EXPECT_EQ(pool.apply_async(sleep_ms, 50).get(forever), 50);
        EXPECT_TRUE(pool.apply_async(sleep_ms, 50).wait(forever));
        EXPECT_EQ(pool.map_async(sleep_ms, std::vector{50, 60}).get(forever), (std::vector{50, 60}));
    });
    Gate gate(dir);
    auto pending = pool.apply_async(wait_file, gate.path());
    mp::test::for_each_no_wait([&](auto t) {
        EXPECT_THROW(pending.get(t), mp::TimeoutError);
        EXPECT_FALSE(pending.wait(t));
    });
    gate.open();
    ASSERT_EQ(pending.get(kLong), 1);
    mp::test::for_each_no_wait([&](auto t) { EXPECT_EQ(pending.get(t), 1); });
}

TEST_P(PoolTimeoutValues, ImapNext) {
    TempDir dir;
    mp::Pool pool(with_method(mp::PoolOptions{.processes = 2}));
    mp::test::for_each_forever([&](auto forever) {
        auto it = pool.imap(sleep_ms, std::vector{50, 60});
        EXPECT_EQ(it.next(forever), std::optional<int>(50));
        EXPECT_EQ(it.next(forever), std::optional<int>(60));
        EXPECT_EQ(it.next(forever), std::nullopt);
        auto un = pool.imap_unordered(sleep_ms, std::vector{50});
        EXPECT_EQ(un.next(forever), std::optional<int>(50));
        EXPECT_EQ(un.next(forever), std::nullopt);
    });
    Gate gate(dir);
    auto it = pool.imap(wait_file, std::vector{gate.path()});
    auto un = pool.imap_unordered(wait_file, std::vector{gate.path()});
    mp::test::for_each_no_wait([&](auto t) {
        EXPECT_THROW(it.next(t), mp::TimeoutError);
        EXPECT_THROW(un.next(t), mp::TimeoutError);
    });
    gate.open();
    EXPECT_EQ(it.next(kLong), std::optional<int>(1));
    EXPECT_EQ(un.next(kLong), std::optional<int>(1));
}

TEST_P(PoolTimeoutValues, TaskTimeouts) {
    mp::test::for_each_forever([&](auto forever) {
        mp::Pool pool(with_method(mp::PoolOptions{.processes = 1, .task_timeout = forever}));
        EXPECT_EQ(pool.apply(sleep_ms, 50), 50);
        EXPECT_EQ(pool.map(sleep_ms, std::vector{50, 60}, mp::MapOptions{.task_timeout = forever}),
                  (std::vector{50, 60}));
        pool.close();
        pool.join();
    });
    mp::Pool pool(with_method(mp::PoolOptions{.processes = 1, .task_timeout = -1s}));
    EXPECT_THROW(pool.apply(sleep_ms, 5000), mp::TimeoutError);
}

// ---------------------------------------------------------------------------------------------
// Worker death, timeouts
// ---------------------------------------------------------------------------------------------

TEST_P(PoolWorkerDeath, ASegfaultFailsOnlyItsTask) {
    mp::Pool pool(with_method(mp::PoolOptions{.processes = 2}));
    std::vector<mp::AsyncResult<int>> rs;
    for (int i = 0; i < 10; ++i) rs.push_back(pool.apply_async(sqr, i));
    for (auto& r : rs) r.wait(kLong);
    const auto started = pool.stats().workers_started;
    auto bad = pool.apply_async(sqr_or_segv, 7);
    for (int i = 0; i < 10; ++i) rs.push_back(pool.apply_async(sqr, i));
    if (auto e = catch_as<mp::WorkerDied>([&] { bad.get(kLong); })) {
        EXPECT_GT(e->pid(), 0);
        EXPECT_EQ(e->signal(), std::optional<int>(SIGSEGV));
    }
    for (std::size_t i = 0; i < rs.size(); ++i) EXPECT_EQ(rs[i].get(kLong), static_cast<int>((i % 10) * (i % 10)));
    EXPECT_TRUE(eventually([&] { return pool.stats().workers_started > started; }));
    EXPECT_EQ(pool.apply(sqr, 7), 49);
    pool.close();
    pool.join();
}

TEST_P(PoolWorkerDeath, MapFailsWithWorkerDied) {
    mp::Pool pool(with_method(mp::PoolOptions{.processes = 2}));
    EXPECT_THROW(pool.map(sqr_or_segv, range(20), 1), mp::WorkerDied);
    EXPECT_EQ(pool.map(sqr, range(20)), squares(20));
}

TEST_P(PoolWorkerDeath, ImapGivesEveryOtherItem) {
    mp::Pool pool(with_method(mp::PoolOptions{.processes = 2}));
    auto it = pool.imap(sqr_or_segv, range(20), 1);
    for (int i = 0; i < 20; ++i) {
        if (i == 7) {
            if (auto e = catch_as<mp::WorkerDied>([&] { it.next(kLong); })) {
                EXPECT_EQ(e->signal(), std::optional<int>(SIGSEGV));
            }
        } else {
            EXPECT_EQ(it.next(kLong), std::optional<int>(i * i)) << "item " << i;
        }
    }
    EXPECT_EQ(it.next(kLong), std::nullopt);
}

TEST_P(PoolWorkerDeath, ExitInATask) {
    mp::Pool pool(with_method(mp::PoolOptions{.processes = 1}));
    if (auto e = catch_as<mp::WorkerDied>([&] { pool.apply(exit_seven, 0); })) {
        EXPECT_EQ(e->exit_code(), std::optional<int>(7));
    }
    EXPECT_EQ(pool.apply(sqr, 6), 36);
}

TEST_P(PoolTimeout, TaskTimeout) {
    mp::Pool pool(with_method(mp::PoolOptions{.processes = 2, .task_timeout = 1s}));
    auto overdue = pool.apply_async(sleep_ms, 10000);
    std::vector<mp::AsyncResult<int>> rs;
    for (int i = 0; i < 6; ++i) rs.push_back(pool.apply_async(sqr_wait, i, 20));
    EXPECT_THROW(overdue.get(8s), mp::TimeoutError);
    for (int i = 0; i < 6; ++i) EXPECT_EQ(rs[static_cast<std::size_t>(i)].get(kLong), i * i);
    EXPECT_EQ(pool.apply(sqr, 7), 49);
}

// ---------------------------------------------------------------------------------------------
// _TestPoolWorkerLifetime, initializer, memory limit
// ---------------------------------------------------------------------------------------------

TEST_P(PoolWorkerLifetime, MaxTasksPerChildReplacesWorkers) {
    mp::Pool pool(with_method(mp::PoolOptions{.processes = 3, .maxtasksperchild = 10}));
    std::vector<mp::AsyncResult<int>> warm;
    for (int i = 0; i < 3; ++i) warm.push_back(pool.apply_async(sqr, i));
    for (auto& r : warm) r.wait(kLong);
    std::set<pid_t> orig;
    for (const auto& w : pool.stats().workers) orig.insert(w.pid);
    std::vector<mp::AsyncResult<int>> results, pids;
    for (int i = 0; i < 100; ++i) {
        results.push_back(pool.apply_async(sqr, i));
        pids.push_back(pool.apply_async(worker_pid, i));
    }
    std::map<int, int> per_pid;
    for (int i = 0; i < 100; ++i) {
        EXPECT_EQ(results[static_cast<std::size_t>(i)].get(kLong), i * i);
        ++per_pid[pids[static_cast<std::size_t>(i)].get(kLong)];
    }
    // At most 10 tasks per worker: the 100 worker_pid tasks alone ran in 10 workers or more (203
    // tasks in all took 21 or more, but a worker may have run only sqr tasks, unseen here).
    EXPECT_GE(per_pid.size(), 10u);
    for (auto& [pid, n] : per_pid) EXPECT_LE(n, 10) << pid;
    std::set<pid_t> now;
    ASSERT_TRUE(eventually([&] {
        now.clear();
        for (const auto& w : pool.stats().workers) now.insert(w.pid);
        return now.size() == 3 || now.empty();
    }));
    for (pid_t p : now) EXPECT_GT(p, 0);
    EXPECT_NE(orig, now);
    pool.close();
    pool.join();
}

// A Pool's workers are daemons, as multiprocessing.Pool's: a task cannot start a process
// (ProcessPoolExecutor's workers can: executor_test's ExecutorWorkerChildren).
void do_nothing_in_a_child(int) {}

std::string try_to_start_a_child(int) {
    try {
        mp::Process p(do_nothing_in_a_child, 1);
        p.start();
        p.join();
        return "started";
    } catch (const mp::ProcessError& e) {
        return e.what();
    }
}

TEST_P(PoolWorkerLifetime, WorkersAreDaemonsThatCannotStartProcesses) {
    mp::Pool pool(with_method(mp::PoolOptions{.processes = 1}));
    EXPECT_EQ(pool.apply(try_to_start_a_child, 0), "daemonic processes are not allowed to have children");
}

TEST_P(PoolWorkerLifetime, EarlyClose) {
    // Issue #10332: closing a pool whose workers have limited lifetimes before all the tasks
    // completed would make join() hang.
    mp::Pool pool(with_method(mp::PoolOptions{.processes = 3, .maxtasksperchild = 1}));
    std::vector<mp::AsyncResult<int>> rs;
    for (int i = 0; i < 6; ++i) rs.push_back(pool.apply_async(sqr_wait, i, 300));
    pool.close();
    pool.join();
    for (int i = 0; i < 6; ++i) EXPECT_EQ(rs[static_cast<std::size_t>(i)].get(0s), i * i);
}

TEST_P(PoolWorkerLifetime, MaxMemoryPerChild) {
    mp::Pool pool(with_method(mp::PoolOptions{.processes = 1, .max_memory_per_child = 100u << 20}));
    const int first = pool.apply(worker_pid, 0);
    EXPECT_EQ(pool.apply(worker_pid, 0), first);
    EXPECT_EQ(pool.apply(hog_memory, 200), first);
    EXPECT_NE(pool.apply(worker_pid, 0), first);
}

// max_memory_per_child limits what a worker gains, not its size. A fork worker's resident size
// holds every page it shares with the parent, so in a large parent (a whole test binary under
// ASan) the worker was retired after every task. Here the parent holds 256 MiB and the limit is
// 100 MiB: the same worker must run task after task, and still retire once it grows by 200 MiB.
TEST_P(PoolWorkerLifetime, MaxMemoryPerChildCountsWhatTheWorkerGainsNotTheParentsPages) {
    const std::vector<char> parent(256u << 20, 1);
    mp::Pool pool(with_method(mp::PoolOptions{.processes = 1, .max_memory_per_child = 100u << 20}));
    const int first = pool.apply(worker_pid, 0);
    for (int i = 0; i < 5; ++i) EXPECT_EQ(pool.apply(worker_pid, i), first) << "task " << i;
    EXPECT_EQ(pool.apply(hog_memory, 200), first);
    EXPECT_NE(pool.apply(worker_pid, 0), first);
    EXPECT_EQ(parent.back(), 1);
}

void hog_memory_once(int mb) { (void)hog_memory(mb); }

// The initializer's state is the worker's starting point, not growth: a worker whose initializer
// takes more than the limit is not replaced after each task (each replacement would run the
// initializer again, and grow past the limit again).
TEST_P(PoolWorkerLifetime, MaxMemoryPerChildDoesNotCountTheInitializersState) {
    mp::Pool pool(with_method(mp::PoolOptions{.processes = 1, .max_memory_per_child = 100u << 20}),
                  hog_memory_once, 150);
    const int first = pool.apply(worker_pid, 0);
    for (int i = 0; i < 3; ++i) EXPECT_EQ(pool.apply(worker_pid, i), first) << "task " << i;
}

TEST_P(PoolInitializer, RunsInEveryWorkerWithItsArguments) {
    mp::Pool pool(with_method(mp::PoolOptions{.processes = 3}), init_globals, 42, std::string("init"));
    auto r = pool.map(read_globals, range(30), 1);
    for (const auto& s : r) EXPECT_EQ(s, "init:42");
    pool.close();
    pool.join();
}

// CPython _test_multiprocessing.py: initializer(ns) { ns.test += 1 }, with a shared Value for
// the manager's Namespace.
void count_initializer(mp::Value<int> ns) {
    std::lock_guard lock(ns.get_lock());
    ns.get_obj() += 1;
}

// CPython _test_multiprocessing.py: _TestInitializers.test_pool_initializer (issue 12 item 18:
// a Pool closed and joined at once never ran its initializer, its workers not yet started).
TEST_P(TestInitializers, test_pool_initializer) {
    mp::Value<int> ns(0);
    mp::Pool p(with_method(mp::PoolOptions{.processes = 1}), count_initializer, ns);
    p.close();
    p.join();
    EXPECT_EQ(ns.get(), 1);
}

TEST_P(PoolInitializer, EveryWorkerRunsItWhenThePoolIsClosedAtOnce) {
    mp::Value<int> ns(0);
    mp::Pool p(with_method(mp::PoolOptions{.processes = 3}), count_initializer, ns);
    p.close();
    p.join();
    EXPECT_EQ(ns.get(), 3);
}

// The first worker to run it (the one that creates `path`) never returns; the others do.
void init_first_hangs(std::string path) {
    const int fd = ::open(path.c_str(), O_CREAT | O_EXCL | O_WRONLY | O_CLOEXEC, 0600);
    if (fd < 0) return;
    ::close(fd);
    std::this_thread::sleep_for(std::chrono::hours(1));
}

// task_timeout bounds a task waiting for an initializer that never returns, and join() does not
// wait for that initializer (both waited for ever: found from outside, t33_inithang.cpp).
TEST_P(PoolInitializer, TaskTimeoutBoundsAHungInitializerAndJoin) {
    mp::test::TempDir dir;
    auto opts = with_method(mp::PoolOptions{.processes = 1});
    opts.task_timeout = std::chrono::seconds(1);
    mp::Pool pool(opts, init_first_hangs, dir.path + "/hung");
    auto r = pool.apply_async(sqr, 3);
    try {
        (void)r.get(kLong);
        ADD_FAILURE() << "no exception";
    } catch (const mp::TimeoutError& e) {
        EXPECT_NE(std::string(e.what()).find("initializer"), std::string::npos) << e.what();
    }
    pool.close();
    auto joined = std::async(std::launch::async, [&] { pool.join(); });
    const bool in_time = joined.wait_for(kLong) == std::future_status::ready;
    if (!in_time) pool.terminate();
    joined.wait();
    EXPECT_TRUE(in_time) << "join() waited for an initializer that never returns";
}

TEST_P(PoolInitializer, AnInitializerThatThrowsBreaksThePool) {
    mp::Pool pool(with_method(mp::PoolOptions{.processes = 2}), init_that_throws);
    try {
        auto r = pool.apply_async(sqr, 2);
        EXPECT_THROW(r.get(kLong), mp::BrokenProcessPool);
    } catch (const mp::BrokenProcessPool&) {
        // Already known to be broken at submit.
    }
    EXPECT_TRUE(eventually([&] {
        try {
            pool.apply_async(sqr, 2).wait(kLong);
            return false;
        } catch (const mp::BrokenProcessPool&) {
            return true;
        }
    }));
    pool.terminate();
    pool.join();
}

// ---------------------------------------------------------------------------------------------
// Progress bar, stats
// ---------------------------------------------------------------------------------------------

TEST_P(PoolProgress, MapDrawsTheTotal) {
    std::vector<int> got;
    const std::string out = capture_stderr([&] {
        mp::Pool pool(with_method(mp::PoolOptions{.processes = 2}));
        got = pool.map(sqr, range(100), mp::MapOptions{.chunksize = 10, .progress = true});
        pool.close();
        pool.join();
    });
    EXPECT_EQ(got, squares(100));
    EXPECT_NE(out.find("100/100"), std::string::npos) << "stderr was: " << out;
}

TEST_P(PoolProgress, ImapDrawsTheTotal) {
    const std::string out = capture_stderr([&] {
        mp::Pool pool(with_method(mp::PoolOptions{.processes = 2}));
        int n = 0;
        {
            auto it = pool.imap(sqr, range(50), mp::MapOptions{.chunksize = 5, .progress = true});
            for (int v : it) n += v >= 0;
        }
        EXPECT_EQ(n, 50);
        pool.close();
        pool.join();
    });
    EXPECT_NE(out.find("50/50"), std::string::npos) << "stderr was: " << out;
}

TEST_P(PoolStatsTest, CountsAndWorkerNames) {
    mp::Pool pool(with_method(mp::PoolOptions{.processes = 2}));
    std::vector<mp::AsyncResult<int>> rs;
    for (int i = 0; i < 8; ++i) rs.push_back(pool.apply_async(sqr, i));
    for (int i = 0; i < 2; ++i) rs.push_back(pool.apply_async(raise_runtime, i));
    for (auto& r : rs) r.wait(kLong);
    ASSERT_TRUE(eventually([&] {
        const auto st = pool.stats();
        return st.done + st.failed == 10;
    }));
    const auto st = pool.stats();
    EXPECT_EQ(st.submitted, 10u);
    EXPECT_EQ(st.done, 8u);
    EXPECT_EQ(st.failed, 2u);
    EXPECT_EQ(st.pending, 0u);
    EXPECT_EQ(st.running, 0u);
    ASSERT_EQ(st.workers.size(), 2u);
    std::set<std::string> names;
    for (const auto& w : st.workers) {
        EXPECT_GT(w.pid, 0);
        names.insert(w.name);
    }
    EXPECT_EQ(names, (std::set<std::string>{worker_prefix() + "1", worker_prefix() + "2"}));
    pool.close();
    pool.join();
}

// ---------------------------------------------------------------------------------------------
// A fork worker started while another thread of the parent writes to stdout
// ---------------------------------------------------------------------------------------------

// In a child of the test (stdout a file, fully buffered): one thread numbers lines to stdout
// without pause while a fork pool that replaces its worker after every task runs tasks. Each
// replacement is forked with the writer's latest lines in stdout's buffer; the worker must not
// write them again at its end.
int print_while_replacing_workers(std::string path) {
    const int fd = ::open(path.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_APPEND | O_CLOEXEC, 0600);
    if (fd < 0) return 2;
    std::fflush(stdout);
    ::dup2(fd, 1);
    ::close(fd);
    std::setvbuf(stdout, nullptr, _IOFBF, 1 << 16);
    std::atomic<bool> stop{false};
    std::thread writer([&] {
        for (long i = 0; !stop.load(std::memory_order_relaxed); ++i) std::printf("line %ld\n", i);
    });
    int bad = 0;
    {
        mp::Pool pool(mp::PoolOptions{.processes = 2, .maxtasksperchild = 1,
                                      .start_method = mp::StartMethod::fork});
        for (int i = 0; i < 40; ++i)
            if (pool.apply_async(sqr, i).get(kLong) != i * i) ++bad;
        pool.close();
        pool.join();
    }
    stop = true;
    writer.join();
    std::fflush(stdout);
    return bad == 0 ? 0 : 3;
}

TEST(PoolForkStdout, AReplacementWorkerWritesNothingOfTheParentsStdout) {
#if defined(__SANITIZE_ADDRESS__)
    // glibc's allocator is fork-safe (fork takes and resets its locks); ASan's (GCC 12, clang 14)
    // is not: a worker forked while the submitting thread holds one of its locks inherits that
    // lock held, and the worker's first thread deadlocks on it (ASan's thread start allocates).
    // Seen here in 1 of 11 runs: the pool forks a replacement after every task while the main
    // thread submits. Not a question of memory errors: the other builds run it.
    GTEST_SKIP() << "ASan's allocator is not fork-safe in a threaded parent (GCC 12's libasan)";
#endif
    TempDir dir;
    const std::string path = dir.file("stdout");
    ASSERT_EQ(mp::test::run_child(mp::StartMethod::fork, 60s, print_while_replacing_workers, path), 0);
    std::ifstream in(path);
    std::string line;
    long expected = 0;
    long out_of_order = 0;
    while (std::getline(in, line)) {
        if (line != "line " + std::to_string(expected)) {
            if (out_of_order++ < 5) ADD_FAILURE() << "line " << expected << " is: " << line;
        } else {
            ++expected;
        }
    }
    EXPECT_GT(expected, 0);
    EXPECT_EQ(out_of_order, 0) << "lines written twice or torn, of " << expected;
}

}  // namespace
