// Tests of mp::ProcessPoolExecutor, mp::Future (as the executor hands it out), mp::wait and
// mp::as_completed (include/mp/futures.hpp).
//
// Ported from CPython's Lib/test/test_concurrent_futures (executor, wait, as_completed, future,
// shutdown, initializer, process pool, deadlock), plus the failures mp handles where Python's
// pool breaks: workers that crash, exit, are killed or overrun, workers recycled by task count or
// memory, a parent killed by SIGKILL, a parent that already runs threads.
//
// ctest runs every TEST in a process of its own and the shared main (helpers/test_main.cpp)
// fails a test that leaves a child, an fd or a /dev/shm entry behind. Tasks that must wait for
// the test wait on a file (a gate) in a temporary directory, never longer than kGateLimit, so a
// broken test cannot hang a worker. Every wait of the test itself is bounded; nothing asserts on
// speed.

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <chrono>
#include <csignal>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <fcntl.h>
#include <filesystem>
#include <fstream>
#include <future>
#include <gtest/gtest.h>
#include <map>
#include <mutex>
#include <optional>
#include <poll.h>
#include <pthread.h>
#include <random>
#include <regex>
#include <set>
#include <sstream>
#include <stdexcept>
#include <string>
#include <system_error>
#include <sys/mman.h>
#include <sys/resource.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <thread>
#include <typeinfo>
#include <unistd.h>
#include <utility>
#include <vector>

#include "helpers/codec.hpp"
#include "helpers/gate_file.hpp"
#include "helpers/kernel.hpp"
#include "helpers/leak_check.hpp"
#include "helpers/lines.hpp"
#include "helpers/temp_dir.hpp"
#include "helpers/timeouts.hpp"
#include "mp/futures.hpp"
#include "mp/pool.hpp"
#include "mp/queue.hpp"
#include "mp/synchronize.hpp"
#include "mp/util.hpp"
#include "process_impl.hpp"
#include "sys/fd.hpp"
#include "sys/pidfd.hpp"

namespace {

using namespace std::chrono_literals;
using Clock = std::chrono::steady_clock;
using mp::test::read_line;
using mp::test::TempDir;
using mp::test::wait_file;
using Gate = mp::test::FileGate;

/// The bound on a wait that is expected to succeed.
constexpr auto kLong = 10s;

// ---------------------------------------------------------------------------------------------
// Work run in the workers
// ---------------------------------------------------------------------------------------------

int square(int x) { return x * x; }
int mul(int a, int b) { return a * b; }
long long power(int base, int exp) {
    long long r = 1;
    for (int i = 0; i < exp; ++i) r *= base;
    return r;
}
std::string repeat(std::string s, int n) {
    std::string out;
    for (int i = 0; i < n; ++i) out += s;
    return out;
}
std::vector<int> iota_vec(int n) {
    std::vector<int> v(static_cast<std::size_t>(n));
    for (int i = 0; i < n; ++i) v[static_cast<std::size_t>(i)] = i;
    return v;
}
void do_nothing(int) {}
int worker_pid(int) { return static_cast<int>(::getpid()); }

/// Python's divmod(a, b)[0]; a zero divisor is std::out_of_range("division by zero").
int divide(int a, int b) {
    if (b == 0) throw std::out_of_range("division by zero");
    return a / b;
}

int sleep_ms(int ms) {
    std::this_thread::sleep_for(std::chrono::milliseconds(ms));
    return ms;
}
int sleep_pid(int ms) {
    std::this_thread::sleep_for(std::chrono::milliseconds(ms));
    return static_cast<int>(::getpid());
}
int nap_square(int x) {
    ::usleep(100);
    return x * x;
}

/// 0 at once for x == 0; otherwise waits for the file `gate` as wait_file does.
int zero_or_wait(int x, std::string gate) { return x == 0 ? 0 : wait_file(std::move(gate)); }

/// Creates `started`, then waits for `gate` as wait_file does.
int start_then_wait(std::string started, std::string gate) {
    std::ofstream(started) << "started\n";
    return wait_file(gate);
}

/// Sleeps `ms`, then dies as die(how).
int die_after(int ms, int how);

/// The side effect of a task: creates the file `path`.
int touch_file(std::string path) {
    std::ofstream(path) << "ran\n";
    return 1;
}

enum Death { kSegv = 0, kAbort = 1, kExit7 = 2, kSigkill = 3 };

/// Ends the worker it runs in: a real segfault, abort(), exit(7) or SIGKILL. The default
/// dispositions come back first, so a sanitizer's handler does not turn a signal into an exit.
int die(int how) {
    rlimit no_core{0, 0};
    ::setrlimit(RLIMIT_CORE, &no_core);
    switch (how) {
    case kSegv: {
        ::signal(SIGSEGV, SIG_DFL);
        void* page = ::mmap(nullptr, 4096, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        *static_cast<volatile int*>(page) = 1;
        break;
    }
    case kAbort:
        ::signal(SIGABRT, SIG_DFL);
        std::abort();
    case kExit7:
        std::exit(7);
    case kSigkill:
        ::raise(SIGKILL);
        break;
    default:
        break;
    }
    return -1;
}

int die_after(int ms, int how) {
    std::this_thread::sleep_for(std::chrono::milliseconds(ms));
    return die(how);
}

/// x squared, except that x == 7 segfaults.
int square_or_segv(int x) {
    if (x == 7) die(kSegv);
    return x * x;
}

struct CustomError : std::exception {
    std::string msg;
    explicit CustomError(std::string m) : msg(std::move(m)) {}
    const char* what() const noexcept override { return msg.c_str(); }
};

int throw_out_of_range(std::string what) { throw std::out_of_range(what); }
int throw_invalid_argument(std::string what) { throw std::invalid_argument(what); }
int throw_runtime_error(std::string what) { throw std::runtime_error(what); }
int throw_custom(std::string what) { throw CustomError(what + " in pid " + std::to_string(::getpid())); }

/// Allocates and touches `mb` megabytes and keeps them: the worker's resident memory grows.
int hog_memory(int mb) {
    static std::vector<char*> kept;
    const std::size_t n = static_cast<std::size_t>(mb) << 20;
    char* p = static_cast<char*>(std::malloc(n));
    if (p == nullptr) return -1;
    for (std::size_t i = 0; i < n; i += 4096) p[i] = 1;
    kept.push_back(p);
    return static_cast<int>(::getpid());
}

int g_init_value = -1;
void init_global(int v) { g_init_value = v; }
void init_that_throws(int) { throw std::runtime_error("initializer failed"); }
int read_global(int) { return g_init_value; }
void init_sleep_ms(int ms) { std::this_thread::sleep_for(std::chrono::milliseconds(ms)); }
// The first worker to run it (the one that creates `path`) never returns; the others do.
void init_first_hangs(std::string path) {
    const int fd = ::open(path.c_str(), O_CREAT | O_EXCL | O_WRONLY | O_CLOEXEC, 0600);
    if (fd < 0) return;
    ::close(fd);
    std::this_thread::sleep_for(std::chrono::hours(1));
}

// ---------------------------------------------------------------------------------------------
// Test helpers
// ---------------------------------------------------------------------------------------------

/// Polls `pred` every 5 ms until it holds or `limit` passes.
template <class P>
bool eventually(P pred, std::chrono::milliseconds limit = kLong) {
    const auto deadline = Clock::now() + limit;
    while (!pred()) {
        if (Clock::now() >= deadline) return false;
        std::this_thread::sleep_for(5ms);
    }
    return true;
}

/// Submits gated tasks until every worker is inside one (started it: not merely handed it),
/// then makes sure one more is pending. A worker inside a task for over a millisecond is given
/// no more, so that one, and what is submitted next, stays pending until the gate opens.
/// Submits only while nothing is pending (a worker may take two before it starts the first, and
/// another may still be starting), so it waits however slowly the workers start; bounded by
/// kLong (a failure then).
template <class Ex>
std::vector<mp::Future<int>> saturate(Ex& ex, const Gate& gate) {
    const auto n = static_cast<std::size_t>(ex.max_workers());
    std::vector<mp::Future<int>> blockers;
    const auto deadline = Clock::now() + kLong;
    for (;;) {
        const auto st = ex.stats();
        bool all_inside = st.workers.size() == n;
        for (const auto& w : st.workers) all_inside = all_inside && w.running == 1;
        if (all_inside) break;
        if (Clock::now() >= deadline) {
            ADD_FAILURE() << "saturate: the workers did not all start a gated task (" << st.workers.size()
                          << " workers, " << st.running << " tasks handed out, " << st.pending << " pending)";
            return blockers;
        }
        if (st.pending == 0) blockers.push_back(ex.submit(wait_file, gate.path()));
        std::this_thread::sleep_for(5ms);
    }
    // Not a guess about another process: each worker is in its task until the gate opens, and
    // this makes sure it has been for over a millisecond before the pool sees the next task.
    std::this_thread::sleep_for(5ms);
    if (ex.stats().pending == 0) blockers.push_back(ex.submit(wait_file, gate.path()));
    return blockers;
}

/// The exception a future ended with, as a string "<kind>: what()" for messages.
template <class T>
std::exception_ptr error_of(const mp::Future<T>& f) {
    return f.exception(kLong);
}

/// Runs `f`, which must throw E; returns the exception (or std::nullopt, with a failure).
template <class E, class F>
std::optional<E> catch_as(F&& f) {
    try {
        f();
    } catch (const E& e) {
        return e;
    } catch (const std::exception& e) {
        ADD_FAILURE() << "expected " << typeid(E).name() << ", got " << typeid(e).name() << ": "
                      << e.what();
        return std::nullopt;
    } catch (...) {
        ADD_FAILURE() << "expected " << typeid(E).name() << ", got a non-std exception";
        return std::nullopt;
    }
    ADD_FAILURE() << "expected " << typeid(E).name() << ", nothing was thrown";
    return std::nullopt;
}

std::set<pid_t> worker_pids(const mp::PoolStats& st) {
    std::set<pid_t> out;
    for (const auto& w : st.workers) out.insert(w.pid);
    return out;
}

/// Sends SIGCONT to a stopped worker when it goes out of scope, unless the pool has replaced it.
class StoppedWorker {
public:
    StoppedWorker(const mp::ProcessPoolExecutor& ex, pid_t pid) : ex_(ex), pid_(pid) {
        EXPECT_EQ(::kill(pid, SIGSTOP), 0);
    }
    ~StoppedWorker() { resume(); }
    StoppedWorker(const StoppedWorker&) = delete;
    StoppedWorker& operator=(const StoppedWorker&) = delete;
    void resume() {
        if (pid_ != 0 && ex_.stats().workers.size() > 0)
            for (const auto& w : ex_.stats().workers)
                if (w.pid == pid_) ::kill(pid_, SIGCONT);
        pid_ = 0;
    }

private:
    const mp::ProcessPoolExecutor& ex_;
    pid_t pid_;
};

/// Waits until the executor has answered everything it was given.
bool settled(const mp::ProcessPoolExecutor& ex) {
    return eventually([&] {
        const auto st = ex.stats();
        return st.pending == 0 && st.running == 0;
    });
}

// ---------------------------------------------------------------------------------------------
// ExecutorTest (CPython executor.py, test_process_pool.py)
// ---------------------------------------------------------------------------------------------

// A map whose calls each take a handle: a chunk carries at most 253 descriptors, so map starts
// a new chunk before one would pass it, whatever the chunksize (before, chunksize 1000 failed
// with mp::Error "a task may carry at most 253 descriptors").
int twice_holding(mp::Lock lock, int x) {
    std::lock_guard hold(lock);
    return 2 * x;
}

TEST(ExecutorTest, MapOfCallsThatEachTakeAHandleStaysUnderTheDescriptorLimit) {
    mp::ProcessPoolExecutor ex({.max_workers = 2});
    const mp::Lock lock;
    const std::vector<mp::Lock> locks(700, lock);
    std::vector<int> xs(700);
    for (int i = 0; i < 700; ++i) xs[static_cast<std::size_t>(i)] = i;
    std::vector<int> got;
    for (int y : ex.map({.chunksize = 1000, .timeout = kLong}, twice_holding, locks, xs)) got.push_back(y);
    ASSERT_EQ(got.size(), 700u);
    for (int i = 0; i < 700; ++i) EXPECT_EQ(got[static_cast<std::size_t>(i)], 2 * i);
    // One task over the limit is still refused, alone, and the executor serves on.
    const std::vector<mp::Lock> too_many(300, lock);
    EXPECT_THROW((void)ex.submit([](const std::vector<mp::Lock>& v) { return v.size(); }, too_many), mp::Error);
    EXPECT_EQ(ex.submit(twice_holding, lock, 21).result(kLong), 42);
}

TEST(ExecutorTest, Submit) {
    mp::ProcessPoolExecutor ex({.max_workers = 2});
    mp::Future<long long> f = ex.submit(power, 2, 8);
    EXPECT_TRUE(f.valid());
    EXPECT_EQ(f.result(kLong), 256);
    EXPECT_TRUE(f.done());
    EXPECT_FALSE(f.cancelled());
    EXPECT_FALSE(f.running());
}

TEST(ExecutorTest, SubmitStringsVectorsAndVoid) {
    mp::ProcessPoolExecutor ex({.max_workers = 2});
    auto s = ex.submit(repeat, std::string("ab"), 3);
    auto v = ex.submit(iota_vec, 5);
    mp::Future<void> n = ex.submit(do_nothing, 1);
    auto lambda = ex.submit([](int a, int b) { return a - b; }, 10, 4);
    EXPECT_EQ(s.result(kLong), "ababab");
    EXPECT_EQ(v.result(kLong), (std::vector<int>{0, 1, 2, 3, 4}));
    n.result(kLong);
    EXPECT_TRUE(n.done());
    EXPECT_EQ(lambda.result(kLong), 6);
}

TEST(ExecutorTest, MapOverAVoidFunction) {
    // A void call writes no result bytes: each item is a std::monostate.
    mp::ProcessPoolExecutor ex({.max_workers = 2});
    std::vector<int> in(10, 1);
    for (std::size_t chunksize : {std::size_t{1}, std::size_t{3}}) {
        auto results = ex.map({.chunksize = chunksize, .timeout = kLong}, do_nothing, in);
        EXPECT_EQ(results.to_vector().size(), in.size()) << "chunksize " << chunksize;
    }
}

mp::Queue<int> make_queue() { return mp::Queue<int>(); }
mp::Lock make_lock(int) { return mp::Lock(); }
std::vector<mp::Event> make_events(int n) { return std::vector<mp::Event>(static_cast<std::size_t>(n)); }

// A task's result comes back as bytes: one holding a handle (its descriptor would not come with
// it) fails that task with mp::Error saying so, as if the task had thrown it; the worker goes on.
// Such a result was sent without its descriptor and failed in result() with a DecodeError about
// a missing descriptor. A map fails only the items whose result holds one.
TEST(ExecutorTest, AResultHoldingAHandleFailsItsTaskClearly) {
    auto expect_refused = [](auto&& get) {
        try {
            get();
            ADD_FAILURE() << "a result holding a handle arrived";
        } catch (const mp::Error& e) {
            EXPECT_NE(std::string(e.what()).find("result holds a handle"), std::string::npos) << e.what();
        }
    };
    for (const mp::StartMethod method : {mp::StartMethod::fork, mp::StartMethod::forkserver}) {
        SCOPED_TRACE(static_cast<int>(method));
        mp::ProcessPoolExecutor ex({.max_workers = 1, .start_method = method});
        auto q = ex.submit(make_queue);
        expect_refused([&] { q.result(kLong); });
        auto l = ex.submit(make_lock, 1);
        expect_refused([&] { l.result(kLong); });
        std::vector<int> sizes = {0, 2, 0, 1};
        auto items = ex.map({.chunksize = 2, .timeout = kLong}, make_events, sizes);
        std::size_t i = 0, refused = 0;
        for (auto it = items.begin(); it != items.end(); ++i) {
            try {
                EXPECT_TRUE((*it).empty()) << "item " << i;
            } catch (const mp::Error& e) {
                EXPECT_NE(std::string(e.what()).find("result holds a handle"), std::string::npos) << e.what();
                ++refused;
            }
            ++it;
        }
        EXPECT_EQ(i, sizes.size());
        EXPECT_EQ(refused, 2u);
        EXPECT_EQ(ex.submit(power, 2, 3).result(kLong), 8);  // the same worker goes on
        EXPECT_EQ(ex.stats().worker_deaths, 0u);
    }
    // The error is looked at once the pool has ended: its thread may drop the last reference to
    // the exception after apply() returns, and the exception's reference count lives in
    // libstdc++, which TSan does not see (it reported that drop as racing with e.what()).
    std::exception_ptr error;
    {
        mp::Pool pool(mp::PoolOptions{.processes = 1});
        try {
            (void)pool.apply(make_lock, 2);
        } catch (...) {
            error = std::current_exception();
        }
    }
    ASSERT_TRUE(error) << "a result holding a handle arrived";
    expect_refused([&] { std::rethrow_exception(error); });
}

TEST(ExecutorTest, DefaultFutureIsNotValid) {
    mp::Future<int> f;
    EXPECT_FALSE(f.valid());
}

TEST(ExecutorTest, MaxWorkersZeroOrNegativeIsInvalidArgument) {
    for (int n : {0, -1}) {
        auto e = catch_as<std::invalid_argument>([&] { mp::ProcessPoolExecutor ex({.max_workers = n}); });
        if (e) {
            EXPECT_NE(std::string(e->what()).find("max_workers must be greater than 0"), std::string::npos)
            << e->what();
        }
    }
}

// No thread to be had (EAGAIN from pthread_create: RLIMIT_NPROC, no memory for the stack): the
// constructor throws a std::system_error that says which thread could not start, as every failing
// call mp makes names itself (std::thread's own says only "Resource temporarily unavailable"),
// and leaves no worker behind (the leak check). Provoked by a default thread stack no mapping can
// hold; the workers, forked before the thread, inherit it and are killed with the pool.
TEST(ExecutorTest, NoThreadToStartIsASystemErrorThatNamesIt) {
#if defined(__SANITIZE_ADDRESS__) || defined(__SANITIZE_THREAD__)
    // The sanitizers' own pthread_create sizes and maps their per-thread state from the stack
    // attribute: what this provokes is theirs to handle, not mp's. The ci and clang builds run it.
    GTEST_SKIP() << "a 64 TiB default thread stack is not for a sanitizer's runtime";
#endif
    pthread_attr_t saved;
    ASSERT_EQ(::pthread_getattr_default_np(&saved), 0);
    pthread_attr_t huge;
    ASSERT_EQ(::pthread_attr_init(&huge), 0);
    ASSERT_EQ(::pthread_attr_setstacksize(&huge, std::size_t{1} << 46), 0);  // 64 TiB
    ASSERT_EQ(::pthread_setattr_default_np(&huge), 0);
    bool can_start = true;
    try {
        std::thread([] {}).join();
    } catch (const std::system_error&) {
        can_start = false;
    }
    for (auto method : {mp::StartMethod::fork, mp::StartMethod::spawn}) {
        if (can_start) break;  // the runtime (a sanitizer's) ignores the default: nothing to test
        SCOPED_TRACE(mp::to_string(method));
        auto e = catch_as<std::system_error>(
            [&] { mp::ProcessPoolExecutor ex({.max_workers = 2, .start_method = method}); });
        if (e) {
            EXPECT_EQ(e->code(), std::errc::resource_unavailable_try_again);
            EXPECT_NE(std::string(e->what()).find("mp: the pool could not start its thread"), std::string::npos)
                << e->what();
        }
    }
    ASSERT_EQ(::pthread_setattr_default_np(&saved), 0);
    ::pthread_attr_destroy(&huge);
    ::pthread_attr_destroy(&saved);
    if (can_start) GTEST_SKIP() << "a thread started with a 64 TiB default stack (the default is not honoured here)";
}

TEST(ExecutorTest, MaxWorkersIsReported) {
    mp::ProcessPoolExecutor ex({.max_workers = 3});
    EXPECT_EQ(ex.max_workers(), 3);
}

// Under fork the first workers are forked by the constructor, in the caller's thread, as
// Python's Pool does: they are copies of the program as it was then, whatever the caller does
// next, and no pool thread forks beside the caller (an allocator that is not fork-safe, such as
// ASan's, could hand a worker a lock the caller held at that instant).
int g_value_at_construction = 0;
int read_value_at_construction(int) { return g_value_at_construction; }

TEST(ExecutorTest, ForkWorkersAreCopiesOfTheProgramAtConstruction) {
    g_value_at_construction = 1;
    mp::ProcessPoolExecutor ex({.max_workers = 2, .start_method = mp::StartMethod::fork});
    g_value_at_construction = 2;
    std::vector<mp::Future<int>> fs;
    for (int i = 0; i < 8; ++i) fs.push_back(ex.submit(read_value_at_construction, i));
    for (auto& f : fs) EXPECT_EQ(f.result(kLong), 1);
    ex.shutdown();
    g_value_at_construction = 0;
}

TEST(ExecutorTest, ForkPoolWorkersAreCopiesOfTheProgramAtConstruction) {
    g_value_at_construction = 1;
    mp::Pool pool({.processes = 2, .start_method = mp::StartMethod::fork});
    g_value_at_construction = 2;
    for (int i = 0; i < 8; ++i) EXPECT_EQ(pool.apply(read_value_at_construction, i), 1);
    pool.close();
    pool.join();
    g_value_at_construction = 0;
}

TEST(ExecutorTest, MapZipsRangesInOrder) {
    mp::ProcessPoolExecutor ex({.max_workers = 2});
    std::vector<int> a(10), b(10);
    for (int i = 0; i < 10; ++i) a[static_cast<std::size_t>(i)] = b[static_cast<std::size_t>(i)] = i;
    std::vector<long long> ref;
    for (int i = 0; i < 10; ++i) ref.push_back(power(i, i));
    EXPECT_EQ(ex.map(power, a, b).to_vector(), ref);
    EXPECT_EQ(ex.map({.chunksize = 3}, power, a, b).to_vector(), ref);
}

TEST(ExecutorTest, MapStopsAtTheShortestRange) {
    mp::ProcessPoolExecutor ex({.max_workers = 2});
    std::vector<int> a{1, 2, 3, 4, 5};
    std::vector<int> b{10, 20, 30};
    auto r = ex.map(mul, a, b);
    EXPECT_EQ(r.size(), 3u);
    EXPECT_EQ(r.to_vector(), (std::vector<int>{10, 40, 90}));
}

TEST(ExecutorTest, MapChunksize) {
    mp::ProcessPoolExecutor ex({.max_workers = 2});
    std::vector<int> a(40);
    for (int i = 0; i < 40; ++i) a[static_cast<std::size_t>(i)] = i % 7;
    std::vector<long long> ref;
    for (int x : a) ref.push_back(power(x, x));
    for (std::size_t cs : {1u, 6u, 40u, 50u}) {
        EXPECT_EQ(ex.map({.chunksize = cs}, power, a, a).to_vector(), ref) << "chunksize " << cs;
    }
}

TEST(ExecutorTest, MapOfAnEmptyRange) {
    mp::ProcessPoolExecutor ex({.max_workers = 2});
    std::vector<int> none;
    auto r = ex.map(square, none);
    EXPECT_EQ(r.size(), 0u);
    EXPECT_TRUE(r.to_vector().empty());
}

TEST(ExecutorTest, MapIteratesLazilyWithRangeFor) {
    mp::ProcessPoolExecutor ex({.max_workers = 2});
    std::vector<int> in{1, 2, 3, 4};
    std::vector<int> out;
    for (int y : ex.map(square, in)) out.push_back(y);
    EXPECT_EQ(out, (std::vector<int>{1, 4, 9, 16}));
}

TEST(ExecutorTest, MapException) {
    mp::ProcessPoolExecutor ex({.max_workers = 2});
    std::vector<int> a{1, 1, 1, 1}, b{2, 3, 0, 5};
    auto r = ex.map(divide, a, b);
    auto it = r.begin();
    EXPECT_EQ(*it, 0);
    ++it;
    EXPECT_EQ(*it, 0);
    ++it;
    auto e = catch_as<std::out_of_range>([&] { (void)*it; });
    if (e) {
        EXPECT_STREQ(e->what(), "division by zero");
    }
}

TEST(ExecutorTest, MapTimeout) {
    // The slow item waits for a gate that opens only after the check, so it cannot finish
    // within the timeout however slow the machine is. The fast items must not depend on the
    // timeout either (it counts from map()): the executor is warm, and the results are read only
    // once both have answered, as a done item is returned even after the deadline.
    TempDir dir;
    mp::ProcessPoolExecutor ex({.max_workers = 2});
    Gate gate(dir);  // opens before the executor shuts down
    ASSERT_EQ(ex.submit(square, 3).result(kLong), 9);
    std::vector<int> in{0, 0, 1};
    std::vector<std::string> gates(in.size(), gate.path());
    std::vector<int> results;
    auto r = ex.map({.timeout = 1s}, zero_or_wait, in, gates);
    ASSERT_TRUE(eventually([&] { return ex.stats().done == 3; }));
    // The pool thread counts a result just before it sets it: a task answered after that has
    // both fast items set (the idle worker, the emptier one, runs it).
    ASSERT_EQ(ex.submit(square, 4).result(kLong), 16);
    auto e = catch_as<mp::TimeoutError>([&] {
        for (int v : r) results.push_back(v);
    });
    EXPECT_EQ(results, (std::vector<int>{0, 0}));
}

// Appends `i` to the file `ran`, then (item 1 only) waits for `gate`.
int note_then_wait_at_one(int i, std::string ran, std::string gate) {
    const int fd = ::open(ran.c_str(), O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0600);
    if (fd >= 0) {
        const std::string line = std::to_string(i) + "\n";
        (void)!::write(fd, line.data(), line.size());
        ::close(fd);
    }
    if (i == 1) return wait_file(gate);
    return i;
}

// ex.map of note_then_wait_at_one over 0 .. n-1: every call notes its item in `ran`, item 1
// then waits for `gate`.
auto map_noting(mp::ProcessPoolExecutor& ex, int n, const std::string& ran, const Gate& gate) {
    std::vector<int> in(static_cast<std::size_t>(n));
    for (int i = 0; i < n; ++i) in[static_cast<std::size_t>(i)] = i;
    return ex.map(note_then_wait_at_one, in, std::vector<std::string>(in.size(), ran),
                  std::vector<std::string>(in.size(), gate.path()));
}

std::vector<int> lines_as_ints(const std::string& path) {
    std::ifstream in(path);
    std::vector<int> out;
    for (int v; in >> v;) out.push_back(v);
    std::sort(out.begin(), out.end());
    return out;
}

TEST(ExecutorTest, LeavingAMapLoopEarlyCancelsWhatHasNotStarted) {
    // As closing Python's map generator: after the first result the loop ends; the item the one
    // worker may be running (1, which waits for the gate) finishes, no later one runs.
    TempDir dir;
    Gate gate(dir);
    const std::string ran = dir.file("ran");
    {
        mp::ProcessPoolExecutor ex({.max_workers = 1});
        for (int v : map_noting(ex, 10, ran, gate)) {
            EXPECT_EQ(v, 0);
            break;
        }
        gate.open();
        ex.shutdown(true);
    }
    const std::vector<int> got = lines_as_ints(ran);
    ASSERT_FALSE(got.empty());
    EXPECT_EQ(got.front(), 0);
    EXPECT_LE(got.size(), 2u);
    EXPECT_TRUE(got.size() == 1 || got[1] == 1) << "item " << got.back() << " ran";
}

TEST(ExecutorTest, AMapNeverIteratedStillRunsEveryCall) {
    // As Python's map whose generator never started: dropping it cancels nothing.
    TempDir dir;
    Gate gate(dir);
    gate.open();
    const std::string ran = dir.file("ran");
    {
        mp::ProcessPoolExecutor ex({.max_workers = 1});
        (void)map_noting(ex, 5, ran, gate);
        ex.shutdown(true);
    }
    EXPECT_EQ(lines_as_ints(ran), (std::vector<int>{0, 1, 2, 3, 4}));
}

TEST(ExecutorTest, ACopyOfMapResultsStillIteratingKeepsItsWork) {
    TempDir dir;
    Gate gate(dir);
    gate.open();
    const std::string ran = dir.file("ran");
    mp::ProcessPoolExecutor ex({.max_workers = 1});
    auto r = map_noting(ex, 5, ran, gate);
    {
        auto copy = r;
        for (int v : copy) {
            EXPECT_EQ(v, 0);
            break;
        }
    }
    EXPECT_EQ(r.to_vector(), (std::vector<int>{0, 1, 2, 3, 4}));
}

int throw_system_error(int e) { throw std::system_error(e, std::generic_category(), "open /nowhere"); }
int throw_shut_down(int) { throw mp::ShutDown(); }
int throw_worker_died(int pid) { throw mp::WorkerDied(pid, -9); }
int throw_filesystem_error(std::string p) {
    throw std::filesystem::filesystem_error("remove", p, std::make_error_code(std::errc::permission_denied));
}
int get_orphaned_future(int) {
    std::future<int> orphan = std::promise<int>().get_future();  // the promise is gone
    return orphan.get();
}
int compile_regex(std::string pattern) { return static_cast<int>(std::regex(pattern).mark_count()); }

namespace exec_test {
struct BadRow : std::invalid_argument {
    using std::invalid_argument::invalid_argument;
};
}  // namespace exec_test

using mp::test::make_fails_to_load;

// A result that arrives but cannot be decoded here: exception() is what result() throws (it was
// nullptr while result() threw).
TEST(ExecutorFuture, AResultThatCannotBeDecodedIsTheFuturesException) {
    mp::ProcessPoolExecutor ex({.max_workers = 1});
    auto f = ex.submit(make_fails_to_load, 14);
    ASSERT_TRUE(f.wait(kLong));
    const std::exception_ptr e = f.exception();
    ASSERT_TRUE(e) << "exception() is nullptr while result() throws";
    try {
        std::rethrow_exception(e);
    } catch (const std::exception& x) {
        EXPECT_NE(std::string(x.what()).find("cannot load 14"), std::string::npos) << x.what();
    }
    EXPECT_THROW((void)f.result(), std::exception);
    EXPECT_EQ(ex.submit(square, 3).result(kLong), 9);  // the pool is unharmed
}

int throw_bad_row(int row) { throw exec_test::BadRow("row " + std::to_string(row) + " is malformed"); }

// A user's exception type, registered in the reading process, comes back from a worker as
// itself. Its error is read once the pool has ended (see AResultHoldingAHandleFailsItsTaskClearly).
TEST(ExecutorTest, ARegisteredExceptionTypeComesBackAsItself) {
    mp::register_exception<exec_test::BadRow>();
    std::exception_ptr error;
    {
        mp::ProcessPoolExecutor ex({.max_workers = 1});
        auto f = ex.submit(throw_bad_row, 7);
        ASSERT_TRUE(f.wait(kLong));
        error = f.exception();
    }
    try {
        std::rethrow_exception(error);
    } catch (const exec_test::BadRow& e) {
        EXPECT_EQ(std::string(e.what()), "row 7 is malformed");
    } catch (...) {
        ADD_FAILURE() << "not an exec_test::BadRow";
    }
}

TEST(ExecutorTest, SystemAndMpExceptionsComeBackAsThemselves) {
#if defined(__SANITIZE_THREAD__)
    // The pool thread may drop a future's exception after the test has read it; the exception's
    // reference count lives in libstdc++, which TSan does not see, so it reports a race (as it
    // did for AResultHoldingAHandleFailsItsTaskClearly). The plain, clang and ASan builds run it.
    GTEST_SKIP() << "TSan cannot see libstdc++'s exception reference counts";
#endif
    mp::ProcessPoolExecutor ex({.max_workers = 1});
    if (auto e = catch_as<std::system_error>([&] { (void)ex.submit(throw_system_error, ENOENT).result(kLong); })) {
        EXPECT_EQ(e->code(), std::error_code(ENOENT, std::generic_category()));
        EXPECT_EQ(std::string(e->what()), std::system_error(ENOENT, std::generic_category(), "open /nowhere").what());
    }
    EXPECT_TRUE(catch_as<mp::ShutDown>([&] { (void)ex.submit(throw_shut_down, 0).result(kLong); }));
    if (auto e = catch_as<mp::WorkerDied>([&] { (void)ex.submit(throw_worker_died, 1234).result(kLong); })) {
        EXPECT_EQ(e->pid(), 1234);
        EXPECT_EQ(e->signal(), 9);
    }
    if (auto e = catch_as<std::filesystem::filesystem_error>(
            [&] { (void)ex.submit(throw_filesystem_error, std::string("/x/y")).result(kLong); })) {
        EXPECT_EQ(e->path1(), std::filesystem::path("/x/y"));
        EXPECT_EQ(e->code(), std::make_error_code(std::errc::permission_denied));
    }
    if (auto e = catch_as<std::future_error>([&] { (void)ex.submit(get_orphaned_future, 0).result(kLong); })) {
        EXPECT_EQ(e->code(), std::future_errc::broken_promise);
    }
    if (auto e = catch_as<std::regex_error>([&] { (void)ex.submit(compile_regex, std::string("a{2")).result(kLong); })) {
        EXPECT_EQ(e->code(), std::regex_constants::error_brace);
    }
}

TEST(ExecutorTest, MapWithASegfaultingItemFailsOnlyThatItem) {
    mp::ProcessPoolExecutor ex({.max_workers = 2});
    std::vector<int> in(20);
    for (int i = 0; i < 20; ++i) in[static_cast<std::size_t>(i)] = i;
    auto r = ex.map({.chunksize = 1}, square_or_segv, in);
    // A failed item cancels the chunks not yet started (as Python's map): let every chunk
    // finish first, so that each other item has its value.
    ASSERT_TRUE(settled(ex));
    int i = 0;
    int died = 0;
    for (auto it = r.begin(); it != r.end(); ++it, ++i) {
        try {
            EXPECT_EQ(*it, i * i) << "item " << i;
        } catch (const mp::WorkerDied& e) {
            ++died;
            EXPECT_EQ(i, 7);
            EXPECT_GT(e.pid(), 0);
            EXPECT_EQ(e.signal(), std::optional<int>(SIGSEGV));
            EXPECT_FALSE(e.exit_code().has_value());
        } catch (const std::exception& e) {
            ADD_FAILURE() << "item " << i << ": unexpected exception " << e.what();
        }
    }
    EXPECT_EQ(i, 20);
    EXPECT_EQ(died, 1);
    EXPECT_EQ(ex.submit(square, 7).result(kLong), 49);
}

TEST(ExecutorTest, ShutdownRaceIssue12456) {
    mp::ProcessPoolExecutor ex({.max_workers = 2});
    std::vector<int> in(3, 2);
    auto r = ex.map(square, in);
    ex.shutdown();
    EXPECT_EQ(r.to_vector(), (std::vector<int>{4, 4, 4}));
}

TEST(ExecutorTest, Saturation) {
    // test_saturation: many more blocked jobs than workers never start more than max_workers.
    TempDir dir;
    Gate gate(dir);
    mp::ProcessPoolExecutor ex({.max_workers = 2});
    std::vector<mp::Future<int>> fs;
    for (int i = 0; i < 30; ++i) fs.push_back(ex.submit(wait_file, gate.path()));
    std::this_thread::sleep_for(100ms);
    const auto st = ex.stats();
    EXPECT_LE(st.workers.size(), 2u);
    EXPECT_EQ(st.workers_started, st.workers.size());
    gate.open();
    for (auto& f : fs) EXPECT_EQ(f.result(kLong), 1);
}

// ---------------------------------------------------------------------------------------------
// Exceptions (test_traceback, test_error_during_func_exec_on_worker)
// ---------------------------------------------------------------------------------------------

TEST(ExecutorException, StandardTypesArriveAsThemselves) {
    mp::ProcessPoolExecutor ex({.max_workers = 2});
    auto oor = ex.submit(throw_out_of_range, std::string("index 42 is out of range"));
    auto inv = ex.submit(throw_invalid_argument, std::string("bad argument"));
    auto rt = ex.submit(throw_runtime_error, std::string("123"));
    if (auto e = catch_as<std::out_of_range>([&] { oor.result(kLong); })) {
        EXPECT_STREQ(e->what(), "index 42 is out of range");
    }
    if (auto e = catch_as<std::invalid_argument>([&] { inv.result(kLong); })) {
        EXPECT_STREQ(e->what(), "bad argument");
    }
    if (auto e = catch_as<std::runtime_error>([&] { rt.result(kLong); })) {
        EXPECT_STREQ(e->what(), "123");
    }
    // The pool goes on.
    EXPECT_EQ(ex.submit(square, 3).result(kLong), 9);
}

TEST(ExecutorException, CustomTypeArrivesAsRemoteError) {
    mp::ProcessPoolExecutor ex({.max_workers = 1});
    const int pid = ex.submit(worker_pid, 0).result(kLong);
    auto f = ex.submit(throw_custom, std::string("custom failure"));
    if (auto e = catch_as<mp::RemoteError>([&] { f.result(kLong); })) {
        EXPECT_NE(e->type_name().find("CustomError"), std::string::npos) << e->type_name();
        EXPECT_EQ(e->message(), "custom failure in pid " + std::to_string(pid));
        EXPECT_NE(e->origin().find(std::to_string(pid)), std::string::npos) << e->origin();
    }
}

TEST(ExecutorException, ExceptionReturnsTheErrorOrNull) {
    mp::ProcessPoolExecutor ex({.max_workers = 2});
    auto ok = ex.submit(square, 4);
    auto bad = ex.submit(divide, 1, 0);
    EXPECT_EQ(ok.exception(kLong), nullptr);
    auto e = bad.exception(kLong);
    ASSERT_NE(e, nullptr);
    EXPECT_THROW(std::rethrow_exception(e), std::out_of_range);
    EXPECT_TRUE(bad.done());
}

// ---------------------------------------------------------------------------------------------
// Future (test_future.py, through the executor)
// ---------------------------------------------------------------------------------------------

TEST(ExecutorFuture, ResultAndExceptionWithTimeout) {
    TempDir dir;
    Gate gate(dir);
    mp::ProcessPoolExecutor ex({.max_workers = 1});
    auto f = ex.submit(wait_file, gate.path());
    EXPECT_THROW(f.result(50ms), mp::TimeoutError);
    EXPECT_THROW(f.exception(50ms), mp::TimeoutError);
    EXPECT_FALSE(f.wait(10ms));
    EXPECT_FALSE(f.done());
    gate.open();
    EXPECT_EQ(f.result(kLong), 1);
    EXPECT_TRUE(f.wait(0ms));
}

TEST(ExecutorFuture, RunningWhileAWorkerHasIt) {
    TempDir dir;
    Gate gate(dir);
    mp::ProcessPoolExecutor ex({.max_workers = 1});
    auto f = ex.submit(wait_file, gate.path());
    EXPECT_TRUE(eventually([&] { return f.running(); }));
    EXPECT_FALSE(f.cancel());  // test_cancel: a running future cannot be cancelled
    EXPECT_FALSE(f.cancelled());
    gate.open();
    EXPECT_EQ(f.result(kLong), 1);
    EXPECT_FALSE(f.running());
    EXPECT_FALSE(f.cancel());  // nor a finished one
}

TEST(ExecutorFuture, AResultDoesNotWaitForTheNextTaskOfItsWorker) {
    // One worker holds both tasks; the first one's value must arrive while the second runs
    // (Python sends each result as it is produced).
    TempDir dir;
    Gate gate(dir);
    mp::ProcessPoolExecutor ex({.max_workers = 1});
    auto quick = ex.submit(square, 2);
    auto slow = ex.submit(wait_file, gate.path());
    // The slow one cannot end before the gate opens (it waits kGateLimit, over kLong): so the
    // wait may be long without letting a result that waits for the next task pass.
    EXPECT_EQ(quick.result(kLong), 4);
    EXPECT_FALSE(slow.done());
    gate.open();
    EXPECT_EQ(slow.result(kLong), 1);
}

TEST(ExecutorBalance, TasksQueuedBehindALongOneMoveToAnIdleWorker) {
    // Tiny tasks first, so each worker takes many at a time; then a blocked task with quick
    // ones submitted in the same burst: those handed to the blocked task's worker must be taken
    // back and run by the other worker, not wait for the gate.
    TempDir dir;
    Gate gate(dir);
    mp::ProcessPoolExecutor ex({.max_workers = 2});
    std::vector<int> warm(2000, 3);
    for (int v : ex.map(square, warm)) ASSERT_EQ(v, 9);
    auto blocked = ex.submit(wait_file, gate.path());
    std::vector<mp::Future<int>> quick;
    for (int i = 0; i < 40; ++i) quick.push_back(ex.submit(square, i));
    for (int i = 0; i < 40; ++i) EXPECT_EQ(quick[static_cast<std::size_t>(i)].result(10s), i * i) << i;
    EXPECT_FALSE(blocked.done());
    gate.open();
    EXPECT_EQ(blocked.result(kLong), 1);
}

TEST(ExecutorBalance, TasksQueuedInAStoppedWorkerMoveToAnotherOne) {
    // issue 12 item 4: a worker stopped (SIGSTOP) while idle is handed its share of a burst;
    // it never starts them, so they must move to the other worker, not wait for it.
    mp::ProcessPoolExecutor ex({.max_workers = 2});
    std::vector<int> warm(2000, 3);
    for (int v : ex.map(square, warm)) ASSERT_EQ(v, 9);
    ASSERT_TRUE(settled(ex));
    const auto st = ex.stats();
    ASSERT_EQ(st.workers.size(), 2u);
    StoppedWorker stopped(ex, st.workers[0].pid);
    std::vector<mp::Future<int>> fs;
    for (int i = 0; i < 10; ++i) fs.push_back(ex.submit(worker_pid, i));
    for (auto& f : fs) {
        ASSERT_TRUE(f.wait(5s)) << "a task stayed with the stopped worker";
        EXPECT_NE(f.result(0s), st.workers[0].pid);
    }
    stopped.resume();
    EXPECT_EQ(ex.submit(square, 3).result(kLong), 9);
}

std::size_t length_of(std::string s) { return s.size(); }

TEST(ExecutorBalance, ATaskTooLargeToSendAtOnceIsNotTakenBackAsStalled) {
    // A worker still reading a large task off its socket has not started it, but is not stalled
    // either: the task must not bounce between workers (each taking longer to receive it than
    // the stall limit) but run, once.
    mp::ProcessPoolExecutor ex({.max_workers = 2});
    EXPECT_EQ(ex.submit(square, 2).result(kLong), 4);
    const std::string big(std::size_t{96} << 20, 'x');
    std::vector<mp::Future<std::size_t>> fs;
    for (int i = 0; i < 2; ++i) fs.push_back(ex.submit(length_of, big));
    for (auto& f : fs) EXPECT_EQ(f.result(60s), big.size());
}

TEST(ExecutorFuture, CopiesShareTheState) {
    mp::ProcessPoolExecutor ex({.max_workers = 1});
    auto f = ex.submit(square, 5);
    mp::Future<int> g = f;
    EXPECT_TRUE(f == g);
    EXPECT_EQ(g.result(kLong), 25);
    EXPECT_TRUE(f.done());
    EXPECT_FALSE(f == ex.submit(square, 5));
}

TEST(ExecutorFuture, DoneCallbackWithResultRunsOnceOutsideTheWorkers) {
    TempDir dir;
    Gate gate(dir);
    mp::ProcessPoolExecutor ex({.max_workers = 1});
    auto f = ex.submit([](std::string gate_path, int x) { return wait_file(gate_path) * x * x; },
                       gate.path(), 6);
    std::mutex mu;
    std::vector<int> seen;
    std::vector<pid_t> pids;
    std::vector<std::thread::id> threads;
    f.add_done_callback([&](const mp::Future<int>& done) {
        std::lock_guard lk(mu);
        seen.push_back(done.result(0s));
        pids.push_back(::getpid());
        threads.push_back(std::this_thread::get_id());
    });
    gate.open();
    EXPECT_EQ(f.result(kLong), 36);
    ASSERT_TRUE(eventually([&] {
        std::lock_guard lk(mu);
        return !seen.empty();
    }));
    std::this_thread::sleep_for(20ms);
    std::lock_guard lk(mu);
    EXPECT_EQ(seen, (std::vector<int>{36}));
    EXPECT_EQ(pids, (std::vector<pid_t>{::getpid()}));
    ASSERT_EQ(threads.size(), 1u);
    EXPECT_NE(threads[0], std::this_thread::get_id());
}

TEST(ExecutorFuture, DoneCallbackWithException) {
    mp::ProcessPoolExecutor ex({.max_workers = 1});
    auto f = ex.submit(divide, 1, 0);
    std::atomic<int> calls{0};
    std::atomic<bool> had_error{false};
    f.exception(kLong);
    f.add_done_callback([&](const mp::Future<int>& done) {
        had_error = done.exception(0s) != nullptr;
        ++calls;
    });
    // Already done: the callback ran at once, in this thread.
    EXPECT_EQ(calls.load(), 1);
    EXPECT_TRUE(had_error.load());
}

TEST(ExecutorFuture, DoneCallbackWithCancelRunsInTheCancellingThread) {
    TempDir dir;
    Gate gate(dir);
    mp::ProcessPoolExecutor ex({.max_workers = 1});
    auto blockers = saturate(ex, gate);
    auto f = ex.submit(square, 3);
    std::atomic<int> calls{0};
    std::thread::id where;
    bool was_cancelled = false;
    f.add_done_callback([&](const mp::Future<int>& done) {
        was_cancelled = done.cancelled();
        where = std::this_thread::get_id();
        ++calls;
    });
    EXPECT_TRUE(f.cancel());
    EXPECT_EQ(calls.load(), 1);
    EXPECT_TRUE(was_cancelled);
    EXPECT_EQ(where, std::this_thread::get_id());
    EXPECT_THROW(f.result(kLong), mp::CancelledError);
    EXPECT_THROW(f.exception(kLong), mp::CancelledError);
    gate.open();
    for (auto& b : blockers) EXPECT_EQ(b.result(kLong), 1);
}

TEST(ExecutorFuture, DoneCallbackThatThrowsDoesNotStopTheOthers) {
    mp::ProcessPoolExecutor ex({.max_workers = 1});
    TempDir dir;
    Gate gate(dir);
    auto f = ex.submit(wait_file, gate.path());
    std::atomic<int> order{0};
    std::atomic<int> first{-1}, second{-1};
    f.add_done_callback([&](const mp::Future<int>&) {
        first = order++;
        throw std::runtime_error("doh!");
    });
    f.add_done_callback([&](const mp::Future<int>&) { second = order++; });
    gate.open();
    EXPECT_EQ(f.result(kLong), 1);
    ASSERT_TRUE(eventually([&] { return second.load() >= 0; }));
    EXPECT_EQ(first.load(), 0);
    EXPECT_EQ(second.load(), 1);
    // The pool is unharmed.
    EXPECT_EQ(ex.submit(square, 2).result(kLong), 4);
}

// The last handle to an executor dropped in a done callback, on the pool's own thread, which
// cannot join itself: the executor shuts down as shutdown(wait=false) and its thread finishes the
// queued work detached (was: std::system_error EDEADLK out of the destructor, std::terminate).
TEST(ExecutorFuture, ExecutorDestroyedInItsOwnDoneCallbackFinishesItsWork) {
    auto ex = std::make_unique<mp::ProcessPoolExecutor>(mp::ExecutorOptions{.max_workers = 1});
    TempDir dir;
    Gate gate(dir);
    auto first = ex->submit(wait_file, gate.path());
    auto queued = ex->submit(square, 7);
    std::atomic<bool> destroyed{false};
    std::atomic<bool> on_other_thread{false};
    const auto caller = std::this_thread::get_id();
    first.add_done_callback([&](const mp::Future<int>&) {
        on_other_thread = std::this_thread::get_id() != caller;
        ex.reset();
        destroyed = true;
    });
    gate.open();
    EXPECT_EQ(queued.result(kLong), 49);
    ASSERT_TRUE(eventually([&] { return destroyed.load(); }));
    EXPECT_TRUE(on_other_thread.load());
    EXPECT_EQ(first.result(kLong), 1);
    mp::detail::join_detached_pools();  // what the program's exit does: its workers are gone then
}

// The same with the executor shared with the callback, whose copy is the last (a common shape:
// the callback keeps what it needs alive).
TEST(ExecutorFuture, ExecutorWhoseLastOwnerIsADoneCallbackEndsCleanly) {
    TempDir dir;
    Gate gate(dir);
    std::optional<mp::Future<int>> first;
    std::atomic<bool> deleted{false};
    {
        std::shared_ptr<mp::ProcessPoolExecutor> ex(
            new mp::ProcessPoolExecutor(mp::ExecutorOptions{.max_workers = 1}),
            [&](mp::ProcessPoolExecutor* p) {
                delete p;
                deleted = true;
            });
        first = ex->submit(wait_file, gate.path());
        first->add_done_callback([ex](const mp::Future<int>&) {});
    }
    gate.open();
    EXPECT_EQ(first->result(kLong), 1);
    ASSERT_TRUE(eventually([&] { return deleted.load(); }));
    mp::detail::join_detached_pools();
}

// ---------------------------------------------------------------------------------------------
// mp::wait (test_wait.py). The completed futures of Python's tests come from the executor:
// SUCCESSFUL (a value), EXCEPTION (out_of_range), CANCELLED (cancelled while pending).
// ---------------------------------------------------------------------------------------------

struct FinishedFutures {
    mp::Future<int> successful, exception, cancelled;
};

/// A 3-worker executor's finished futures, with the gate closed again afterwards.
FinishedFutures make_finished(mp::ProcessPoolExecutor& ex, const TempDir& dir) {
    FinishedFutures out;
    out.successful = ex.submit(mul, 21, 2);
    out.exception = ex.submit(divide, 1, 0);
    out.successful.wait(kLong);
    out.exception.wait(kLong);
    {
        Gate gate(dir, "finished-gate");
        auto blockers = saturate(ex, gate);
        out.cancelled = ex.submit(square, 1);
        EXPECT_TRUE(out.cancelled.cancel());
        gate.open();
        for (auto& b : blockers) b.wait(kLong);
    }
    EXPECT_TRUE(settled(ex));
    return out;
}

TEST(ExecutorWait, DuplicateFuturesIssue20369) {
    mp::ProcessPoolExecutor ex({.max_workers = 2});
    auto f = ex.submit(sleep_ms, 100);
    auto g = ex.submit(square, 2);
    auto r = mp::wait(std::vector{f, g, f, g, f}, kLong, mp::ALL_COMPLETED);
    // Once each, as in Python's sets (each was in `done` as often as given).
    ASSERT_EQ(r.done.size(), 2u);
    EXPECT_TRUE(r.done[0] == f);
    EXPECT_TRUE(r.done[1] == g);
    EXPECT_TRUE(r.not_done.empty());
    // as_completed too, and over many copies without quadratic time.
    std::vector<mp::Future<int>> many(20000, g);
    many.push_back(f);
    std::size_t n = 0;
    for (const auto& d : mp::as_completed(many, {.timeout = kLong})) {
        EXPECT_TRUE(d == f || d == g);
        ++n;
    }
    EXPECT_EQ(n, 2u);
}

TEST(ExecutorWait, FirstCompleted) {
    TempDir dir;
    mp::ProcessPoolExecutor ex({.max_workers = 3});
    auto fin = make_finished(ex, dir);
    Gate gate(dir);
    auto f1 = ex.submit(mul, 21, 2);
    auto f2 = ex.submit(wait_file, gate.path());
    // Python's CANCELLED_FUTURE is cancelled but not yet notified; mp's cancel notifies at once,
    // so a fresh pending future stands in for it.
    auto pending = ex.submit(wait_file, gate.path());
    auto r = mp::wait(std::vector{pending, f1, f2}, kLong, mp::FIRST_COMPLETED);
    EXPECT_EQ(r.done, (std::vector{f1}));
    EXPECT_EQ(r.not_done, (std::vector{pending, f2}));
    EXPECT_EQ(f1.result(0s), 42);
}

TEST(ExecutorWait, FirstCompletedSomeAlreadyCompleted) {
    TempDir dir;
    mp::ProcessPoolExecutor ex({.max_workers = 3});
    auto fin = make_finished(ex, dir);
    Gate gate(dir);
    auto f1 = ex.submit(wait_file, gate.path());
    auto r = mp::wait(std::vector{fin.cancelled, fin.successful, f1}, kLong, mp::FIRST_COMPLETED);
    EXPECT_EQ(r.done, (std::vector{fin.cancelled, fin.successful}));
    EXPECT_EQ(r.not_done, (std::vector{f1}));
}

TEST(ExecutorWait, FirstException) {
    TempDir dir;
    mp::ProcessPoolExecutor ex({.max_workers = 3});
    Gate gate(dir);
    auto f1 = ex.submit(mul, 2, 21);
    f1.wait(kLong);
    auto f2 = ex.submit([](int ms) -> int {
        std::this_thread::sleep_for(std::chrono::milliseconds(ms));
        throw std::runtime_error("this is an exception");
    }, 100);
    auto f3 = ex.submit(wait_file, gate.path());
    auto r = mp::wait(std::vector{f1, f2, f3}, kLong, mp::FIRST_EXCEPTION);
    EXPECT_EQ(r.done, (std::vector{f1, f2}));
    EXPECT_EQ(r.not_done, (std::vector{f3}));
}

TEST(ExecutorWait, FirstExceptionSomeAlreadyComplete) {
    TempDir dir;
    mp::ProcessPoolExecutor ex({.max_workers = 3});
    auto fin = make_finished(ex, dir);
    Gate gate(dir);
    auto f1 = ex.submit(divide, 21, 0);
    auto f2 = ex.submit(wait_file, gate.path());
    auto r = mp::wait(std::vector{fin.successful, fin.cancelled, f1, f2}, kLong, mp::FIRST_EXCEPTION);
    EXPECT_EQ(r.done, (std::vector{fin.successful, fin.cancelled, f1}));
    EXPECT_EQ(r.not_done, (std::vector{f2}));
}

TEST(ExecutorWait, FirstExceptionOneAlreadyFailed) {
    TempDir dir;
    mp::ProcessPoolExecutor ex({.max_workers = 3});
    auto fin = make_finished(ex, dir);
    Gate gate(dir);
    auto f1 = ex.submit(wait_file, gate.path());
    auto r = mp::wait(std::vector{fin.exception, f1}, kLong, mp::FIRST_EXCEPTION);
    EXPECT_EQ(r.done, (std::vector{fin.exception}));
    EXPECT_EQ(r.not_done, (std::vector{f1}));
}

TEST(ExecutorWait, AllCompleted) {
    TempDir dir;
    mp::ProcessPoolExecutor ex({.max_workers = 3});
    auto fin = make_finished(ex, dir);
    auto f1 = ex.submit(divide, 2, 0);
    auto f2 = ex.submit(mul, 2, 21);
    std::vector all{fin.successful, fin.cancelled, fin.exception, f1, f2};
    auto r = mp::wait(all, kLong, mp::ALL_COMPLETED);
    EXPECT_EQ(r.done, all);
    EXPECT_TRUE(r.not_done.empty());
    // Without a timeout and without a mode: ALL_COMPLETED.
    auto r2 = mp::wait(all);
    EXPECT_EQ(r2.done, all);
}

TEST(ExecutorWait, Timeout) {
    TempDir dir;
    mp::ProcessPoolExecutor ex({.max_workers = 3});
    auto fin = make_finished(ex, dir);
    Gate gate(dir);
    auto f = ex.submit(wait_file, gate.path());
    auto r = mp::wait(std::vector{fin.cancelled, fin.exception, fin.successful, f}, 50ms,
                      mp::ALL_COMPLETED);
    EXPECT_EQ(r.done, (std::vector{fin.cancelled, fin.exception, fin.successful}));
    EXPECT_EQ(r.not_done, (std::vector{f}));
}

TEST(ExecutorWait, ManyFuturesAllCompleted) {
    mp::ProcessPoolExecutor ex({.max_workers = 2});
    std::vector<mp::Future<int>> fs;
    for (int i = 0; i < 200; ++i) fs.push_back(ex.submit(square, i));
    auto r = mp::wait(fs, 60s);
    EXPECT_EQ(r.done.size(), 200u);
    EXPECT_TRUE(r.not_done.empty());
    for (int i = 0; i < 200; ++i) EXPECT_EQ(fs[static_cast<std::size_t>(i)].result(0s), i * i);
}

// ---------------------------------------------------------------------------------------------
// mp::as_completed (test_as_completed.py)
// ---------------------------------------------------------------------------------------------

TEST(ExecutorAsCompleted, NoTimeout) {
    TempDir dir;
    mp::ProcessPoolExecutor ex({.max_workers = 3});
    auto fin = make_finished(ex, dir);
    auto f1 = ex.submit(mul, 2, 21);
    auto f2 = ex.submit(mul, 7, 6);
    std::vector all{fin.cancelled, fin.exception, fin.successful, f1, f2};
    std::vector<mp::Future<int>> completed;
    for (const auto& f : mp::as_completed(all, mp::AsCompletedOptions{.timeout = 60s}))
        completed.push_back(f);
    ASSERT_EQ(completed.size(), all.size());
    for (auto& f : all) EXPECT_NE(std::find(completed.begin(), completed.end(), f), completed.end());
    // Those already done come first, in input order.
    EXPECT_TRUE(completed[0] == fin.cancelled);
    EXPECT_TRUE(completed[1] == fin.exception);
    EXPECT_TRUE(completed[2] == fin.successful);
}

TEST(ExecutorAsCompleted, FutureTimesOut) {
    TempDir dir;
    mp::ProcessPoolExecutor ex({.max_workers = 3});
    auto fin = make_finished(ex, dir);
    Gate gate(dir);
    for (auto timeout : {0ms, 100ms}) {
        auto f = ex.submit(wait_file, gate.path());
        std::vector<mp::Future<int>> completed;
        EXPECT_THROW(
            {
                for (const auto& c : mp::as_completed(std::vector{fin.cancelled, fin.exception, fin.successful, f},
                                                      timeout))
                    completed.push_back(c);
            },
            mp::TimeoutError)
            << "timeout " << timeout.count() << " ms";
        EXPECT_EQ(completed, (std::vector{fin.cancelled, fin.exception, fin.successful}));
    }
}

TEST(ExecutorAsCompleted, DuplicateFuturesAreYieldedOnce) {
    mp::ProcessPoolExecutor ex({.max_workers = 2});
    auto f = ex.submit(sleep_ms, 100);
    int n = 0;
    for (const auto& c : mp::as_completed(std::vector{f, f, f}, kLong)) {
        EXPECT_TRUE(c == f);
        ++n;
    }
    EXPECT_EQ(n, 1);
}

TEST(ExecutorAsCompleted, TimeoutMessageCountsTheUnfinished) {
    TempDir dir;
    mp::ProcessPoolExecutor ex({.max_workers = 3});
    auto fin = make_finished(ex, dir);
    Gate gate(dir);
    auto running = ex.submit(wait_file, gate.path());
    ASSERT_TRUE(eventually([&] { return running.running(); }));
    auto other = ex.submit(wait_file, gate.path());
    auto e = catch_as<mp::TimeoutError>([&] {
        for (const auto& c : mp::as_completed(std::vector{fin.cancelled, other, running, fin.successful}, 0ms))
            (void)c;
    });
    if (e) {
        EXPECT_STREQ(e->what(), "2 (of 4) futures unfinished");
    }
}

TEST(ExecutorAsCompleted, YieldsInCompletionOrder) {
    TempDir dir;
    mp::ProcessPoolExecutor ex({.max_workers = 3});
    Gate first(dir, "first"), second(dir, "second");
    // Each runs in a worker of its own before the gates open.
    auto a = ex.submit(start_then_wait, dir.file("a-started"), second.path());
    auto b = ex.submit(start_then_wait, dir.file("b-started"), first.path());
    ASSERT_TRUE(eventually([&] { return dir.exists("a-started") && dir.exists("b-started"); }));
    std::vector<mp::Future<int>> order;
    auto ac = mp::as_completed(std::vector{a, b}, 30s);
    first.open();
    auto it = ac.begin();  // waits for the first to finish
    order.push_back(*it);
    second.open();
    ++it;
    order.push_back(*it);
    ++it;
    EXPECT_TRUE(it == ac.end());
    EXPECT_EQ(order, (std::vector{b, a}));
}

// ---------------------------------------------------------------------------------------------
// Cancel and shutdown (test_future.py test_cancel, test_shutdown.py)
// ---------------------------------------------------------------------------------------------

TEST(ExecutorCancel, ATaskHandedToAWorkerThatHasNotStartedItCanBeCancelled) {
    // issue 12 item 15: a task is running only once a worker has started it. The only worker
    // is stopped, so it starts nothing: the tasks handed to it (or taken back from it) are not
    // running, can be cancelled, and then never run.
    TempDir dir;
    mp::ProcessPoolExecutor ex({.max_workers = 1});
    std::vector<int> warm(2000, 3);
    for (int v : ex.map(square, warm)) ASSERT_EQ(v, 9);  // tiny tasks: the worker takes many
    ASSERT_TRUE(settled(ex));
    StoppedWorker stopped(ex, ex.stats().workers.at(0).pid);
    std::vector<mp::Future<int>> targets;
    for (int i = 0; i < 5; ++i) targets.push_back(ex.submit(touch_file, dir.file("ran-" + std::to_string(i))));
    std::this_thread::sleep_for(50ms);  // the pool hands them to the worker meanwhile
    for (auto& t : targets) {
        EXPECT_FALSE(t.running());
        EXPECT_TRUE(t.cancel());
        EXPECT_TRUE(t.cancelled());
    }
    stopped.resume();
    EXPECT_EQ(ex.submit(square, 4).result(kLong), 16);
    ex.shutdown(true);
    for (int i = 0; i < 5; ++i) EXPECT_FALSE(dir.exists("ran-" + std::to_string(i))) << i;
    EXPECT_EQ(ex.stats().cancelled, 5u);
}

TEST(ExecutorCancel, APendingTaskNeverRuns) {
    TempDir dir;
    Gate gate(dir);
    mp::ProcessPoolExecutor ex({.max_workers = 2});
    auto blockers = saturate(ex, gate);
    std::vector<mp::Future<int>> targets;
    for (int i = 0; i < 5; ++i) targets.push_back(ex.submit(touch_file, dir.file("ran-" + std::to_string(i))));
    for (auto& t : targets) {
        EXPECT_TRUE(t.cancel());
        EXPECT_TRUE(t.cancelled());
        EXPECT_TRUE(t.done());
        EXPECT_FALSE(t.running());
        EXPECT_TRUE(t.cancel());  // cancelling again keeps it cancelled
        EXPECT_THROW(t.result(kLong), mp::CancelledError);
    }
    auto after = ex.submit(touch_file, dir.file("after"));
    gate.open();
    for (auto& b : blockers) EXPECT_EQ(b.result(kLong), 1);
    EXPECT_EQ(after.result(kLong), 1);
    ex.shutdown(true);
    for (int i = 0; i < 5; ++i) EXPECT_FALSE(dir.exists("ran-" + std::to_string(i))) << i;
    EXPECT_TRUE(dir.exists("after"));
    EXPECT_GE(ex.stats().cancelled, 5u);
}

TEST(ExecutorShutdown, CancelFuturesCancelsEveryPendingOne) {
    TempDir dir;
    Gate gate(dir);
    mp::ProcessPoolExecutor ex({.max_workers = 2});
    auto blockers = saturate(ex, gate);
    std::vector<mp::Future<int>> targets;
    for (int i = 0; i < 50; ++i) targets.push_back(ex.submit(touch_file, dir.file("ran-" + std::to_string(i))));
    // The gate opens once shutdown has cancelled the pending tasks (or after kLong, and then
    // the checks below fail): a target cannot start before that.
    std::thread opener([&] {
        (void)eventually([&] {
            return std::all_of(targets.begin(), targets.end(), [](const auto& t) { return t.cancelled(); });
        });
        gate.open();
    });
    ex.shutdown(true, true);
    opener.join();
    for (auto& t : targets) EXPECT_TRUE(t.cancelled());
    for (int i = 0; i < 50; ++i) EXPECT_FALSE(dir.exists("ran-" + std::to_string(i))) << i;
    // Every blocker either ran (it was in a worker) or was cancelled with the rest.
    for (auto& b : blockers) {
        ASSERT_TRUE(b.done());
        if (!b.cancelled()) {
            EXPECT_EQ(b.result(0s), 1);
        }
    }
    EXPECT_THROW(ex.submit(square, 2), mp::Error);
}

// CPython test_shutdown.py, ExecutorShutdownTest.test_cancel_futures (the process pool's):
// 50 queued 0.1 s tasks on 5 workers; shutdown(cancel_futures) must cancel most of them.
// CPython also asserts that at least one was not cancelled: its futures count as running once
// in the call queue (max_workers + 1 of them). Here a task runs only once a worker has started
// it, and all 50 may still be cancelled if none had started; the warm variant waits for the
// workers to be busy (the case of issue 12 item 15) and checks that those tasks finish.
// The 50 tasks wait for a gate rather than sleep 0.1 s, so none can finish (and free its worker
// for the next) before shutdown has cancelled the rest, however late that is: the gate opens
// once every task is cancelled or started.
void check_test_cancel_futures(bool warm) {
    TempDir dir;
    mp::ProcessPoolExecutor ex({.max_workers = 5});
    Gate gate(dir);  // opens (at the latest) before the executor shuts down
    if (warm) {
        // Tiny tasks first: each worker learns to take many at a time (issue 12 item 15: then
        // nothing was cancelled, every task was already "running" in a worker's queue).
        std::vector<int> in(5000, 2);
        for (int v : ex.map(square, in)) ASSERT_EQ(v, 4);
    } else {
        // ExecutorMixin._prime_executor
        std::vector<mp::Future<int>> prime;
        for (int i = 0; i < 5; ++i) prime.push_back(ex.submit(sleep_ms, 100));
        for (auto& f : prime) ASSERT_EQ(f.result(kLong), 100);
    }
    std::vector<mp::Future<int>> fs;
    for (int i = 0; i < 50; ++i) fs.push_back(ex.submit(wait_file, gate.path()));
    if (warm) {
        ASSERT_TRUE(eventually([&] {
            std::size_t busy = 0;
            for (const auto& w : ex.stats().workers) busy += w.running;
            return busy == 5;
        }));
    }
    std::thread opener([&] {
        (void)eventually([&] {
            return std::all_of(fs.begin(), fs.end(), [](const auto& f) { return f.cancelled() || f.running(); });
        });
        gate.open();
    });
    ex.shutdown(true, true);
    opener.join();
    std::size_t cancelled = 0, others = 0;
    for (auto& f : fs) {
        if (f.cancelled()) {
            ++cancelled;
            continue;
        }
        ++others;
        EXPECT_TRUE(f.done());
        EXPECT_EQ(f.exception(0s), nullptr);
        if (f.exception(0s) == nullptr) {
            EXPECT_EQ(f.result(0s), 1);
        }
    }
    EXPECT_GT(cancelled, 20u);
    if (warm) {
        EXPECT_GE(others, 5u);
    }
}

TEST(ExecutorShutdown, test_cancel_futures) { check_test_cancel_futures(false); }
TEST(ExecutorShutdown, test_cancel_futures_on_a_warm_executor) { check_test_cancel_futures(true); }

TEST(ExecutorShutdown, CancelFuturesWithoutWait) {
    TempDir dir;
    Gate gate(dir);
    mp::ProcessPoolExecutor ex({.max_workers = 2});
    auto blockers = saturate(ex, gate);
    std::vector<mp::Future<int>> targets;
    for (int i = 0; i < 10; ++i) targets.push_back(ex.submit(square, i));
    ex.shutdown(false, true);
    for (auto& t : targets) EXPECT_TRUE(eventually([&] { return t.cancelled(); }));
    gate.open();
    for (auto& b : blockers) {
        ASSERT_TRUE(b.wait(kLong));
        if (!b.cancelled()) {
            EXPECT_EQ(b.result(0s), 1);
        }
    }
}

TEST(ExecutorShutdown, SubmitAfterShutdownThrows) {
    mp::ProcessPoolExecutor ex({.max_workers = 2});
    EXPECT_EQ(ex.submit(square, 2).result(kLong), 4);
    ex.shutdown();
    try {
        ex.submit(square, 2);
        ADD_FAILURE() << "submit after shutdown did not throw";
    } catch (const mp::BrokenProcessPool& e) {
        ADD_FAILURE() << "submit after shutdown: BrokenProcessPool instead of mp::Error: " << e.what();
    } catch (const mp::Error&) {
    }
    std::vector<int> in{1, 2};
    EXPECT_THROW((void)ex.map(square, in), mp::Error);
    ex.shutdown();  // twice is fine
}

TEST(ExecutorShutdown, ShutdownWaitsForEveryTaskIssue12364) {
    mp::ProcessPoolExecutor ex({.max_workers = 2});
    std::vector<mp::Future<int>> fs;
    for (int i = 0; i < 50; ++i) fs.push_back(ex.submit(sleep_ms, 10));
    ex.shutdown();
    for (auto& f : fs) {
        EXPECT_TRUE(f.done());
        EXPECT_EQ(f.result(0s), 10);
    }
}

TEST(ExecutorShutdown, NoWaitStillDeliversResults) {
    std::optional<mp::MapResults<int>> res;
    std::vector<int> in;
    for (int i = -5; i < 5; ++i) in.push_back(i);
    {
        mp::ProcessPoolExecutor ex({.max_workers = 2});
        res.emplace(ex.map([](int x) { return x < 0 ? -x : x; }, in));
        ex.shutdown(false);
    }
    EXPECT_EQ(res->to_vector(), (std::vector<int>{5, 4, 3, 2, 1, 0, 1, 2, 3, 4}));
}

TEST(ExecutorShutdown, DestructorWaitsForTheWork) {
    std::vector<mp::Future<int>> fs;
    {
        mp::ProcessPoolExecutor ex({.max_workers = 2});
        for (int i = 0; i < 6; ++i) fs.push_back(ex.submit(sleep_pid, 50));
    }
    for (auto& f : fs) {
        EXPECT_TRUE(f.done());
        EXPECT_GT(f.result(0s), 0);
    }
}

TEST(ExecutorShutdown, WorkersExitAfterShutdown) {
    mp::ProcessPoolExecutor ex({.max_workers = 3});
    std::vector<mp::Future<int>> fs;
    for (int i = 0; i < 9; ++i) fs.push_back(ex.submit(sleep_pid, 20));
    for (auto& f : fs) f.wait(kLong);
    const auto pids = worker_pids(ex.stats());
    EXPECT_FALSE(pids.empty());
    ex.shutdown(true);
    for (pid_t p : pids) EXPECT_TRUE(mp::test::wait_pid_stopped(p, 5000ms)) << "worker " << p;
    EXPECT_TRUE(ex.stats().workers.empty());
}

TEST(ExecutorShutdown, MaxTasksEarlyShutdown) {
    mp::ProcessPoolExecutor ex({.max_workers = 3, .max_tasks_per_child = 1});
    std::vector<mp::Future<int>> fs;
    for (int i = 0; i < 6; ++i) fs.push_back(ex.submit(mul, i, i));
    ex.shutdown();
    for (int i = 0; i < 6; ++i) EXPECT_EQ(fs[static_cast<std::size_t>(i)].result(0s), i * i);
}

// ---------------------------------------------------------------------------------------------
// Initializer (test_init.py)
// ---------------------------------------------------------------------------------------------

TEST(ExecutorInitializer, RunsInEveryWorkerWithItsArguments) {
    mp::ProcessPoolExecutor ex({.max_workers = 2}, init_global, 42);
    std::vector<mp::Future<int>> fs;
    for (int i = 0; i < 10; ++i) fs.push_back(ex.submit(read_global, i));
    for (auto& f : fs) EXPECT_EQ(f.result(kLong), 42);
}

int record_start(std::string dir) {
    std::ofstream(dir + "/init-" + std::to_string(::getpid())) << "x\n";
    return 0;
}
void init_record(std::string dir) { (void)record_start(std::move(dir)); }

TEST(ExecutorInitializer, EveryWorkerStartsAndRunsItEvenWhenShutDownAtOnce) {
    // As Pool (issue 12 item 18): the executor starts all max_workers when constructed, not on
    // demand as CPython's does (outside fork); each runs the initializer.
    TempDir dir;
    {
        mp::ProcessPoolExecutor ex({.max_workers = 3}, init_record, dir.file(""));
        ex.shutdown(true);
    }
    std::size_t n = 0;
    for (const auto& e : std::filesystem::directory_iterator(dir.file("")))
        if (e.path().filename().string().rfind("init-", 0) == 0) ++n;
    EXPECT_EQ(n, 3u);
}

TEST(ExecutorInitializer, ReplacementWorkersRunItToo) {
    mp::ProcessPoolExecutor ex({.max_workers = 1, .max_tasks_per_child = 2}, init_global, 7);
    std::set<int> pids;
    for (int i = 0; i < 6; ++i) {
        EXPECT_EQ(ex.submit(read_global, i).result(kLong), 7);
        pids.insert(ex.submit(worker_pid, 0).result(kLong));
    }
    EXPECT_GE(pids.size(), 3u);
}

TEST(ExecutorInitializer, FailingInitializerBreaksThePool) {
    mp::ProcessPoolExecutor ex({.max_workers = 2}, init_that_throws, 0);
    std::vector<mp::Future<int>> fs;
    try {
        for (int i = 0; i < 5; ++i) fs.push_back(ex.submit(square, i));
    } catch (const mp::BrokenProcessPool&) {
        // The pool may already know it is broken.
    }
    for (auto& f : fs) EXPECT_THROW(f.result(kLong), mp::BrokenProcessPool);
    EXPECT_TRUE(eventually([&] {
        try {
            ex.submit(square, 1).wait(kLong);
            return false;
        } catch (const mp::BrokenProcessPool&) {
            return true;
        }
    }));
}

// ---------------------------------------------------------------------------------------------
// Worker death: only the task fails, with WorkerDied; a replacement starts
// ---------------------------------------------------------------------------------------------

void check_death_fails_only_its_task(Death how, std::optional<mp::StartMethod> method = std::nullopt) {
    mp::ProcessPoolExecutor ex({.max_workers = 2, .start_method = method});
    std::vector<mp::Future<int>> before, after;
    for (int i = 0; i < 10; ++i) before.push_back(ex.submit(square, i));
    for (auto& f : before) f.wait(kLong);
    const auto started = ex.stats().workers_started;
    auto victim = ex.submit(die, static_cast<int>(how));
    for (int i = 0; i < 10; ++i) after.push_back(ex.submit(square, i));

    if (auto e = catch_as<mp::WorkerDied>([&] { victim.result(kLong); })) {
        EXPECT_GT(e->pid(), 0);
        switch (how) {
        case kSegv:
            EXPECT_EQ(e->signal(), std::optional<int>(SIGSEGV)) << e->what();
            break;
        case kAbort:
            EXPECT_EQ(e->signal(), std::optional<int>(SIGABRT)) << e->what();
            break;
        case kSigkill:
            EXPECT_EQ(e->signal(), std::optional<int>(SIGKILL)) << e->what();
            break;
        case kExit7:
            EXPECT_EQ(e->exit_code(), std::optional<int>(7)) << e->what();
            EXPECT_FALSE(e->signal().has_value());
            break;
        }
        EXPECT_TRUE(eventually([&] { return worker_pids(ex.stats()).count(e->pid()) == 0; }));
    }
    for (int i = 0; i < 10; ++i) {
        EXPECT_EQ(before[static_cast<std::size_t>(i)].result(kLong), i * i);
        EXPECT_EQ(after[static_cast<std::size_t>(i)].result(kLong), i * i);
    }
    EXPECT_TRUE(eventually([&] { return ex.stats().workers_started > started; }));
    EXPECT_GE(ex.stats().worker_deaths, 1u);
    EXPECT_EQ(ex.submit(square, 7).result(kLong), 49);
    // And again: the replacement may die too.
    EXPECT_THROW(ex.submit(die, static_cast<int>(how)).result(kLong), mp::WorkerDied);
    EXPECT_EQ(ex.submit(square, 8).result(kLong), 64);
}

TEST(ExecutorWorkerDeath, SegfaultFailsOnlyItsTask) { check_death_fails_only_its_task(kSegv); }
TEST(ExecutorWorkerDeath, AbortFailsOnlyItsTask) { check_death_fails_only_its_task(kAbort); }
TEST(ExecutorWorkerDeath, ExitFailsOnlyItsTask) { check_death_fails_only_its_task(kExit7); }
TEST(ExecutorWorkerDeath, SigkillFailsOnlyItsTask) { check_death_fails_only_its_task(kSigkill); }

TEST(ExecutorWorkerDeath, WorkerKilledFromOutside) {
    // test_killed_child, where mp fails only the task instead of breaking the pool.
    TempDir dir;
    Gate gate(dir);
    mp::ProcessPoolExecutor ex({.max_workers = 1});
    auto f = ex.submit(start_then_wait, dir.file("started"), gate.path());
    ASSERT_TRUE(eventually([&] { return dir.exists("started") && !ex.stats().workers.empty(); }));
    const pid_t pid = ex.stats().workers.at(0).pid;
    ASSERT_GT(pid, 0);
    ASSERT_EQ(::kill(pid, SIGKILL), 0);
    if (auto e = catch_as<mp::WorkerDied>([&] { f.result(kLong); })) {
        EXPECT_EQ(e->pid(), pid);
        EXPECT_EQ(e->signal(), std::optional<int>(SIGKILL));
    }
    EXPECT_EQ(ex.submit(square, 7).result(kLong), 49);
}

TEST(ExecutorWorkerDeath, BreakOnWorkerDeathBreaksThePool) {
    TempDir dir;
    Gate gate(dir);
    mp::ProcessPoolExecutor ex({.max_workers = 2, .break_on_worker_death = true});
    EXPECT_EQ(ex.submit(square, 2).result(kLong), 4);
    // The victim goes first and dies once the rest is queued behind it and beside it.
    auto victim = ex.submit(die_after, 300, static_cast<int>(kSigkill));
    std::vector<mp::Future<int>> unfinished;
    for (int i = 0; i < 4; ++i) unfinished.push_back(ex.submit(wait_file, gate.path()));
    for (int i = 0; i < 4; ++i) unfinished.push_back(ex.submit(square, i));
    // The task that killed its worker may say so (WorkerDied) or fail as the rest.
    EXPECT_THROW(victim.result(kLong), mp::Error);
    if (auto e = victim.exception(0s)) {
        try {
            std::rethrow_exception(e);
        } catch (const mp::WorkerDied&) {
        } catch (const mp::BrokenProcessPool&) {
        } catch (const std::exception& x) {
            ADD_FAILURE() << "the victim failed with " << x.what();
        }
    }
    for (auto& f : unfinished) {
        ASSERT_TRUE(f.wait(kLong));
        // A task that finished before the pool broke keeps its value.
        if (f.exception(0s) != nullptr) {
            EXPECT_THROW(f.result(0s), mp::BrokenProcessPool);
        }
    }
    // The gated ones cannot have finished: the gate is still closed.
    for (int i = 0; i < 4; ++i)
        EXPECT_THROW(unfinished[static_cast<std::size_t>(i)].result(0s), mp::BrokenProcessPool);
    EXPECT_THROW(ex.submit(square, 2), mp::BrokenProcessPool);
    std::vector<int> in{1, 2};
    EXPECT_THROW((void)ex.map(square, in), mp::BrokenProcessPool);
}

TEST(ExecutorWorkerDeath, BreakOnWorkerDeathWithAnExitInATask) {
    mp::ProcessPoolExecutor ex({.max_workers = 1, .break_on_worker_death = true});
    auto victim = ex.submit(die, static_cast<int>(kExit7));
    // The task that killed its worker may say so (WorkerDied) or fail as the rest.
    EXPECT_THROW(victim.result(kLong), mp::Error);
    if (auto e = victim.exception(0s)) {
        try {
            std::rethrow_exception(e);
        } catch (const mp::WorkerDied&) {
        } catch (const mp::BrokenProcessPool&) {
        } catch (const std::exception& x) {
            ADD_FAILURE() << "the victim failed with " << x.what();
        }
    }
    EXPECT_THROW(ex.submit(square, 2), mp::BrokenProcessPool);
}

/// 1000 SIGKILLs of random workers while ~20,000 small tasks run (more batches while the kills
/// go on). `only_answered`: kill only workers that have already answered a task (so none that
/// is still starting). What is checked is that every task ends with its value or WorkerDied
/// (none lost, none wrong, nothing else), that the pool replaces the workers and goes on, not
/// how fast workers restart: the kills go on until there are 1000 or kKillTime has passed
/// (each kill waits for a replacement to start; under ASan on a loaded 2-core machine 1000 did
/// not always fit in the 60 s this once had), and at least kMinKills are required, a floor far
/// below any rate seen, so that the test cannot pass having killed next to nothing.
void thousand_random_kills(bool only_answered) {
    mp::ProcessPoolExecutor ex({.max_workers = 4});
    EXPECT_EQ(ex.submit(square, 3).result(kLong), 9);
    constexpr int kKills = 1000;
    constexpr int kMinKills = 100;
    constexpr auto kKillTime = 75s;  // no batch starts after this
    const auto start = Clock::now();
    const auto deadline = start + kKillTime;
    // A batch not done by then is a hang, reported before ctest's 120 s limit ends the test.
    const auto hang_deadline = start + 105s;
    std::atomic<bool> stop{false};
    std::atomic<int> kills{0};
    std::thread killer([&] {
        std::mt19937 rng(20240607);
        std::set<pid_t> killed;
        while (!stop.load() && kills.load() < kKills) {
            std::vector<pid_t> live;
            for (const auto& w : ex.stats().workers)
                if (w.pid > 0 && killed.count(w.pid) == 0 && (!only_answered || w.done + w.failed > 0))
                    live.push_back(w.pid);
            if (live.empty()) {
                std::this_thread::sleep_for(200us);
                continue;
            }
            const pid_t victim = live[rng() % live.size()];
            if (::kill(victim, SIGKILL) == 0) {
                killed.insert(victim);
                ++kills;
            }
            std::this_thread::sleep_for(500us);
        }
    });

    std::size_t total = 0, values = 0, died = 0, other = 0;
    int batches = 0;
    try {
    do {
        const int n = batches == 0 ? 20000 : 5000;
        std::vector<mp::Future<int>> batch;
        batch.reserve(static_cast<std::size_t>(n));
        for (int i = 0; i < n; ++i) batch.push_back(ex.submit(nap_square, i % 1000));
        // Inputs are i % 1000: the expected value is computed from that.
        auto r = mp::wait(batch, hang_deadline - Clock::now());
        EXPECT_TRUE(r.not_done.empty()) << r.not_done.size() << " futures did not finish";
        for (int i = 0; i < n; ++i) {
            const auto& f = batch[static_cast<std::size_t>(i)];
            if (!f.done()) continue;
            ++total;
            try {
                EXPECT_EQ(f.result(0s), (i % 1000) * (i % 1000));
                ++values;
            } catch (const mp::WorkerDied& e) {
                EXPECT_GT(e.pid(), 0);
                ++died;
            } catch (const std::exception& e) {
                if (other++ < 5) ADD_FAILURE() << "unexpected exception: " << e.what();
            }
        }
        ++batches;
        if (!r.not_done.empty()) break;
    } while (kills.load() < kKills && Clock::now() < deadline);
    } catch (const std::exception& e) {
        ADD_FAILURE() << "after " << total << " tasks and " << kills.load()
                      << " kills, the executor threw: " << e.what();
    }
    stop = true;
    killer.join();
    EXPECT_GE(kills.load(), kMinKills) << "only " << kills.load() << " kills in " << batches << " batches";
    EXPECT_EQ(other, 0u);
    EXPECT_EQ(values + died, total);
    EXPECT_GT(values, 0u);
    EXPECT_EQ(ex.submit(square, 7).result(kLong), 49);
    // The last kills may not have been seen yet by the pool thread.
    EXPECT_TRUE(eventually([&] {
        return ex.stats().worker_deaths >= static_cast<std::size_t>(kills.load()) / 2;
    })) << ex.stats().worker_deaths << " deaths seen for " << kills.load() << " kills";
    const auto st = ex.stats();
    EXPECT_GT(st.workers_started, 4u);
    std::printf("random kills: %d kills in %.1f s, %d batches, %zu tasks, %zu WorkerDied, %zu workers started\n",
                kills.load(), std::chrono::duration<double>(Clock::now() - start).count(), batches, total, died,
                st.workers_started);
}

/// Kills the forkserver (found by mp's own client, checked by name against pid reuse) and
/// waits until it has ended.
bool kill_forkserver() {
    const pid_t server = mp::detail::forkserver::server_pid();
    if (server <= 0) return false;
    const int fd = static_cast<int>(::syscall(SYS_pidfd_open, server, 0));
    if (fd < 0) return false;
    mp::sys::Fd pidfd(fd);
    std::ifstream comm("/proc/" + std::to_string(server) + "/comm");
    std::string name;
    std::getline(comm, name);
    if (name != "mp-forkserver" || !mp::sys::pidfd_send_signal(pidfd.get(), SIGKILL)) return false;
    return mp::sys::pidfd_wait_exit(pidfd.get(), std::chrono::nanoseconds(5s));
}

TEST(ExecutorWorkerDeath, AKilledForkserverIsRestartedWhileWorkersAreReplaced) {
    // issue 12 item 3: the forkserver killed again and again while the pool replaces the
    // workers that died with it: the pool restarts it and goes on; only tasks that were running
    // fail (WorkerDied), none with BrokenProcessPool or a wrong answer.
    mp::ProcessPoolExecutor ex({.max_workers = 2});
    EXPECT_EQ(ex.submit(square, 2).result(kLong), 4);
    std::atomic<bool> stop{false};
    std::atomic<int> kills{0};
    std::thread killer([&] {
        std::mt19937 rng(12);
        std::size_t started = 0;
        while (!stop.load()) {
            // Once the pool has started a worker since the last kill (so it is not starved of
            // workers for good, however slow a start is), soon enough to hit the server while it
            // starts the others.
            const std::size_t now_started = ex.stats().workers_started;
            if (now_started == started) {
                std::this_thread::sleep_for(1ms);
                continue;
            }
            std::this_thread::sleep_for(std::chrono::milliseconds(rng() % 30));
            if (kill_forkserver()) ++kills;
            started = now_started;
        }
    });
    // At least 4 s of batches, and more until there have been over 10 kills (a kill waits for
    // a worker start first: however slow those are), within 30 s.
    std::size_t values = 0, died = 0;
    const auto start = Clock::now();
    const auto at_least = start + 4s, at_most = start + 30s;
    try {
        while ((Clock::now() < at_least || kills.load() <= 10) && Clock::now() < at_most) {
            std::vector<mp::Future<int>> fs;
            for (int i = 0; i < 200; ++i) fs.push_back(ex.submit(nap_square, i));
            for (int i = 0; i < 200; ++i) {
                const auto& f = fs[static_cast<std::size_t>(i)];
                ASSERT_TRUE(f.wait(60s)) << "a future did not finish";
                try {
                    EXPECT_EQ(f.result(0s), i * i);
                    ++values;
                } catch (const mp::WorkerDied&) {
                    ++died;
                }
            }
        }
    } catch (const std::exception& e) {
        ADD_FAILURE() << "after " << kills.load() << " kills of the forkserver: " << e.what();
    }
    stop = true;
    killer.join();
    mp::detail::forkserver::ensure_running();  // a killed server is replaced (not left connected)
    EXPECT_GT(kills.load(), 10);
    EXPECT_GT(values, 0u);
    EXPECT_EQ(ex.submit(square, 7).result(kLong), 49);
    std::printf("forkserver kills: %d in %.1f s, %zu values, %zu WorkerDied\n", kills.load(),
                std::chrono::duration<double>(Clock::now() - start).count(), values, died);
}

/// Lowers RLIMIT_NOFILE so that this process can open no descriptor; restores it on leaving.
class NoDescriptors {
public:
    NoDescriptors() {
        EXPECT_EQ(::getrlimit(RLIMIT_NOFILE, &old_), 0);
        rlimit low{3, old_.rlim_max};
        EXPECT_EQ(::setrlimit(RLIMIT_NOFILE, &low), 0);
    }
    ~NoDescriptors() { restore(); }
    NoDescriptors(const NoDescriptors&) = delete;
    NoDescriptors& operator=(const NoDescriptors&) = delete;
    void restore() {
        if (!restored_) {
            EXPECT_EQ(::setrlimit(RLIMIT_NOFILE, &old_), 0);
        }
        restored_ = true;
    }

private:
    rlimit old_{};
    bool restored_ = false;
};

void check_recovers_from_emfile(int workers, mp::StartMethod method) {
    // issue 12 item 7: a worker dies while the process is out of descriptors, so its
    // replacement cannot start; once descriptors are available again the pool must recover.
#if defined(__SANITIZE_ADDRESS__)
    // The asan preset has UBSan's vptr check, which needs a descriptor of its own: in a process
    // out of them it reports the pool thread's std::system_error as an object of a wrong type.
    // The plain and TSan builds run this test.
    GTEST_SKIP() << "UBSan's vptr check cannot run in a process out of descriptors";
#endif
    mp::ProcessPoolExecutor ex({.max_workers = workers, .start_method = method});
    std::vector<mp::Future<int>> warm;
    for (int i = 0; i < workers * 4; ++i) warm.push_back(ex.submit(square, i));
    for (auto& f : warm) ASSERT_TRUE(f.wait(kLong));
    ASSERT_TRUE(eventually([&] { return ex.stats().workers.size() == static_cast<std::size_t>(workers); }));
    const pid_t victim = ex.stats().workers.at(0).pid;
    const std::size_t started = ex.stats().workers_started;
    std::size_t started_without_descriptors = 0;
    {
        NoDescriptors limit;
        ASSERT_EQ(::kill(victim, SIGKILL), 0);
        // Long enough for several attempts to start a replacement, all refused.
        std::this_thread::sleep_for(500ms);
        // Read before the limit goes: a replacement may start as soon as it does.
        started_without_descriptors = ex.stats().workers_started;
        limit.restore();
    }
    EXPECT_EQ(started_without_descriptors, started) << "a replacement started without descriptors";
    EXPECT_EQ(ex.submit(square, 6).result(kLong), 36);
    EXPECT_TRUE(eventually([&] { return ex.stats().workers.size() == static_cast<std::size_t>(workers); }));
    std::vector<int> in{1, 2, 3, 4, 5, 6, 7, 8};
    std::vector<int> out;
    for (int v : ex.map(square, in)) out.push_back(v);
    EXPECT_EQ(out, (std::vector<int>{1, 4, 9, 16, 25, 36, 49, 64}));
}

TEST(ExecutorWorkerDeath, OutOfDescriptorsWhileTheOnlyWorkerIsReplaced) {
    check_recovers_from_emfile(1, mp::StartMethod::forkserver);
}
TEST(ExecutorWorkerDeath, OutOfDescriptorsWhileAWorkerIsReplaced) {
    check_recovers_from_emfile(2, mp::StartMethod::forkserver);
}
TEST(ExecutorFork, OutOfDescriptorsWhileAWorkerIsReplaced) { check_recovers_from_emfile(2, mp::StartMethod::fork); }
TEST(ExecutorSpawn, OutOfDescriptorsWhileAWorkerIsReplaced) { check_recovers_from_emfile(2, mp::StartMethod::spawn); }

TEST(ExecutorWorkerDeath, ThousandRandomKillsDuringALargeMap) { thousand_random_kills(false); }
TEST(ExecutorWorkerDeath, ThousandKillsOfWorkersThatHaveAnswered) { thousand_random_kills(true); }

// ---------------------------------------------------------------------------------------------
// Timeouts
// ---------------------------------------------------------------------------------------------

TEST(ExecutorTimeout, ExecutorTaskTimeoutFailsTheOverdueTask) {
    mp::ProcessPoolExecutor ex({.max_workers = 2, .task_timeout = 1s});
    EXPECT_EQ(ex.submit(square, 2).result(kLong), 4);
    const auto started = ex.stats().workers_started;
    auto overdue = ex.submit(sleep_pid, 10000);
    std::vector<mp::Future<int>> others;
    for (int i = 0; i < 10; ++i) others.push_back(ex.submit(sleep_ms, 50));
    EXPECT_THROW(overdue.result(8s), mp::TimeoutError);
    EXPECT_TRUE(overdue.done());
    for (auto& f : others) EXPECT_EQ(f.result(kLong), 50);
    EXPECT_TRUE(eventually([&] { return ex.stats().workers_started > started; }));
    EXPECT_EQ(ex.submit(square, 7).result(kLong), 49);
}

TEST(ExecutorTimeout, TheOverdueWorkerIsKilledAndReplaced) {
    TempDir dir;
    mp::ProcessPoolExecutor ex({.max_workers = 1});
    const int first_pid = ex.submit(worker_pid, 0).result(kLong);
    auto overdue = ex.submit(mp::TaskOptions{.timeout = 500ms}, sleep_pid, 10000);
    EXPECT_THROW(overdue.result(8s), mp::TimeoutError);
    EXPECT_TRUE(mp::test::wait_pid_stopped(first_pid, 5000ms));
    const int second_pid = ex.submit(worker_pid, 0).result(kLong);
    EXPECT_NE(second_pid, first_pid);
}

TEST(ExecutorTimeout, ATimeLimitBoundsTheTimeToTheResultEvenInAStoppedWorker) {
    // issue 12 item 4: the only worker is stopped; a task with a time limit must still get a
    // result: the worker that does not start it in time is killed, a replacement runs it.
    mp::ProcessPoolExecutor ex({.max_workers = 1, .task_timeout = 1s});
    EXPECT_EQ(ex.submit(square, 2).result(kLong), 4);
    const pid_t first = ex.stats().workers.at(0).pid;
    StoppedWorker stopped(ex, first);
    auto f = ex.submit(worker_pid, 0);
    ASSERT_TRUE(f.wait(kLong)) << "the time limit did not bound the time to the result";
    EXPECT_NE(f.result(0s), first);
}

TEST(ExecutorTimeout, TaskOptionsTimeoutOverridesTheDefault) {
    mp::ProcessPoolExecutor ex({.max_workers = 2, .task_timeout = 500ms});
    // A longer limit for this one task lets it finish.
    auto slow_ok = ex.submit(mp::TaskOptions{.timeout = 20s}, sleep_ms, 1200);
    // A shorter limit on a pool without one.
    mp::ProcessPoolExecutor ex2({.max_workers = 1});
    auto overdue = ex2.submit(mp::TaskOptions{.timeout = 1s}, sleep_ms, 10000);
    auto fine = ex2.submit(mp::TaskOptions{.timeout = 5s}, sleep_ms, 10);
    EXPECT_EQ(slow_ok.result(kLong), 1200);
    EXPECT_THROW(overdue.result(8s), mp::TimeoutError);
    EXPECT_EQ(fine.result(kLong), 10);
}

TEST(ExecutorTimeout, MapTaskTimeout) {
    mp::ProcessPoolExecutor ex({.max_workers = 2});
    std::vector<int> in{10, 10000, 20, 30};
    auto r = ex.map({.chunksize = 1, .task_timeout = 1s}, sleep_ms, in);
    ASSERT_TRUE(settled(ex));
    std::vector<int> got;
    int timeouts = 0;
    for (auto it = r.begin(); it != r.end(); ++it) {
        try {
            got.push_back(*it);
        } catch (const mp::TimeoutError&) {
            ++timeouts;
        }
    }
    EXPECT_EQ(got, (std::vector<int>{10, 20, 30}));
    EXPECT_EQ(timeouts, 1);
}

// ---------------------------------------------------------------------------------------------
// Worker lifetime: max_tasks_per_child, max_memory_per_child
// ---------------------------------------------------------------------------------------------

TEST(ExecutorLifetime, MaxTasksPerChildOneWorker) {
    // test_max_tasks_per_child
    mp::ProcessPoolExecutor ex({.max_workers = 1, .max_tasks_per_child = 3});
    const int original = ex.submit(worker_pid, 0).result(kLong);
    EXPECT_EQ(ex.submit(worker_pid, 0).result(kLong), original);
    EXPECT_EQ(ex.submit(worker_pid, 0).result(kLong), original);
    const int next = ex.submit(worker_pid, 0).result(kLong);
    EXPECT_NE(next, original);
    EXPECT_LE(ex.stats().workers.size(), 1u);
}

// A task that a worker was handed but skipped (taken back because the worker did not start it
// in time, or cancelled while queued in it) is not one of its max_tasks_per_child: the worker
// counts only what it ran. The pool counted the skipped one too, so it thought the worker full
// while the worker waited for more, and with one worker nothing ran again (session 6's hang of
// TimeoutAndMaxTasksPerChild under load, where a starved worker had a task taken back).
void expect_skipped_task_not_counted(bool cancel) {
    mp::ProcessPoolExecutor ex({.max_workers = 1, .max_tasks_per_child = 2});
    const int pid = ex.submit(worker_pid, 0).result(kLong);
    ASSERT_TRUE(settled(ex));
    std::optional<mp::Future<int>> skipped;
    {
        StoppedWorker stopped(ex, pid);
        skipped = ex.submit(worker_pid, 1);
        // Stopped for 30 times the stall limit: the pool hands the task over and takes it back.
        std::this_thread::sleep_for(300ms);
        if (cancel) {
            EXPECT_TRUE(skipped->cancel());
        }
    }
    auto next = ex.submit(worker_pid, 2);
    if (!next.wait(5s)) {
        ADD_FAILURE() << "no task ran after the worker skipped one";
        ::kill(pid, SIGKILL);  // the pool replaces it, so the executor can end
    }
    if (cancel) {
        EXPECT_EQ(next.result(kLong), pid);
    } else {
        EXPECT_EQ(skipped->result(kLong), pid);
        EXPECT_NE(next.result(kLong), pid);  // the worker retired after its second task
    }
    EXPECT_EQ(ex.stats().worker_deaths, 0u);
}

TEST(ExecutorLifetime, ATaskTakenBackFromAWorkerIsNotOneOfItsMaxTasks) { expect_skipped_task_not_counted(false); }

TEST(ExecutorLifetime, ATaskCancelledInAWorkerIsNotOneOfItsMaxTasks) { expect_skipped_task_not_counted(true); }

TEST(ExecutorLifetime, MaxTasksPerChildRecyclesWorkers) {
    mp::ProcessPoolExecutor ex({.max_workers = 2, .max_tasks_per_child = 3});
    std::vector<mp::Future<int>> fs;
    for (int i = 0; i < 12; ++i) fs.push_back(ex.submit(sleep_pid, 5));
    std::map<int, int> per_pid;
    for (auto& f : fs) ++per_pid[f.result(kLong)];
    EXPECT_GE(per_pid.size(), 4u);
    for (auto& [pid, n] : per_pid) EXPECT_LE(n, 3) << "pid " << pid << " ran " << n << " tasks";
    EXPECT_GE(ex.stats().workers_started, 4u);
}

TEST(ExecutorLifetime, MaxMemoryPerChildRetiresTheWorker) {
    mp::ProcessPoolExecutor ex({.max_workers = 1, .max_memory_per_child = 100u << 20});
    const int small = ex.submit(worker_pid, 0).result(kLong);
    EXPECT_EQ(ex.submit(worker_pid, 0).result(kLong), small);
    const int hog = ex.submit(hog_memory, 200).result(kLong);
    EXPECT_EQ(hog, small);
    const int next = ex.submit(worker_pid, 0).result(kLong);
    EXPECT_NE(next, hog);
    EXPECT_EQ(ex.stats().worker_deaths, 0u);
}

// ---------------------------------------------------------------------------------------------
// The parent's side: killed by SIGKILL, already running threads
// ---------------------------------------------------------------------------------------------

// `with_fork_child`: the parent also runs a fork child (started after the pool) that outlives
// it; the child must not hold the parent's ends of the workers' sockets (ParentOnlyFd), or the
// workers would live as long as it does.
void sleep_15s() { std::this_thread::sleep_for(15s); }

void run_parent_death(std::optional<mp::StartMethod> method, bool with_fork_child = false) {
    int fds[2];
    ASSERT_EQ(::pipe2(fds, O_CLOEXEC), 0);
    const pid_t child = ::fork();
    ASSERT_GE(child, 0);
    if (child == 0) {
        ::close(fds[0]);
        try {
            mp::ProcessPoolExecutor ex({.max_workers = 2, .start_method = method});
            std::vector<mp::Future<int>> fs;
            for (int i = 0; i < 4; ++i) fs.push_back(ex.submit(sleep_ms, 30000));
            const auto deadline = Clock::now() + 10s;
            std::string line;
            while (Clock::now() < deadline) {
                const auto st = ex.stats();
                if (st.workers.size() == 2 && st.running >= 2 && st.workers[0].pid > 0 && st.workers[1].pid > 0) {
                    line = std::to_string(st.workers[0].pid) + " " + std::to_string(st.workers[1].pid) + "\n";
                    break;
                }
                std::this_thread::sleep_for(5ms);
            }
            std::optional<mp::Process> keeper;
            if (!line.empty() && with_fork_child) {
                keeper.emplace(mp::ProcessOptions{.start_method = mp::StartMethod::fork}, sleep_15s);
                keeper->start();
                line.insert(line.size() - 1, " " + std::to_string(keeper->pid()));
            }
            if (!line.empty()) (void)!::write(fds[1], line.data(), line.size());
            std::this_thread::sleep_for(30s);  // the test kills this process
        } catch (...) {
        }
        ::_exit(0);
    }
    ::close(fds[1]);
    const auto line = read_line(fds[0], 20000ms);
    ::close(fds[0]);
    std::vector<pid_t> pids;
    if (line) {
        std::istringstream in(*line);
        pid_t p;
        while (in >> p) pids.push_back(p);
    }
    ::kill(child, SIGKILL);
    int status = 0;
    EXPECT_EQ(::waitpid(child, &status, 0), child);
    pid_t keeper = 0;
    if (with_fork_child && pids.size() == 3) {
        keeper = pids.back();
        pids.pop_back();
    }
    // Ends the fork child (orphaned, 15 s of sleep left) however this test ends.
    struct EndKeeper {
        pid_t pid;
        ~EndKeeper() {
            if (pid > 0) ::kill(pid, SIGKILL);
        }
    } end_keeper{keeper};
    ASSERT_EQ(pids.size(), 2u) << "the child did not report its workers";
    ASSERT_EQ(with_fork_child, keeper > 0) << "the child did not report its fork child";
    for (pid_t p : pids) {
        // Well before the fork child's 15 s end: the workers go at once.
        const auto deadline = Clock::now() + (with_fork_child ? 5s : kLong);
        bool gone = false;
        while (Clock::now() < deadline) {
            if (::kill(p, 0) != 0 && errno == ESRCH) {
                gone = true;
                break;
            }
            std::this_thread::sleep_for(10ms);
        }
        EXPECT_TRUE(gone) << "worker " << p << " outlived its killed parent (state '"
                          << mp::test::proc_info(p).state << "')";
        if (!gone) ::kill(p, SIGKILL);
    }
}

// ---------------------------------------------------------------------------------------------
// A worker's own children: a ProcessPoolExecutor's workers are not daemons (Python 3.9+), so a
// task may start a process and join it; the workers still die with their parent (above).
// ---------------------------------------------------------------------------------------------

void exit_with(int code) { std::exit(code); }

// Starts a process that exits with `code`, joins it, and returns its exit code. By the
// forkserver: a worker runs a second thread (its result flusher), and a fork from a threaded
// process can hang under GCC 12's ASan (its allocator is not fork-safe; CI's ASan stage hung
// here once with the worker's default, fork).
int exit_code_of_a_child_of_the_task(int code) {
    mp::Process p({.start_method = mp::StartMethod::forkserver}, exit_with, code);
    p.start();
    p.join();
    return p.exitcode().value_or(-1);
}

bool worker_is_a_daemon(int) { return mp::current_process().daemon; }

class ExecutorWorkerChildren : public ::testing::TestWithParam<mp::StartMethod> {};

INSTANTIATE_TEST_SUITE_P(StartMethods, ExecutorWorkerChildren,
                         ::testing::Values(mp::StartMethod::fork, mp::StartMethod::forkserver,
                                           mp::StartMethod::spawn),
                         [](const auto& p) { return mp::to_string(p.param); });

TEST_P(ExecutorWorkerChildren, ATaskStartsAndJoinsAProcessOfItsOwn) {
    mp::ProcessPoolExecutor ex({.max_workers = 1, .start_method = GetParam()});
    EXPECT_FALSE(ex.submit(worker_is_a_daemon, 0).result(kLong));
    // Several in a row on the same worker: each child is joined and leaves nothing behind.
    for (int code = 3; code < 6; ++code)
        EXPECT_EQ(ex.submit(exit_code_of_a_child_of_the_task, code).result(kLong), code);
    ex.shutdown();
    EXPECT_TRUE(mp::active_children().empty());
}

TEST(ExecutorParentDeath, WorkersDieWhenTheParentIsKilled) { run_parent_death(std::nullopt); }
TEST(ExecutorParentDeath, ForkWorkersDieWhenTheParentIsKilled) { run_parent_death(mp::StartMethod::fork); }
TEST(ExecutorParentDeath, SpawnWorkersDieWhenTheParentIsKilled) { run_parent_death(mp::StartMethod::spawn); }
TEST(ExecutorParentDeath, WorkersDieWhenTheParentIsKilledWhileItsForkChildLives) {
    run_parent_death(std::nullopt, true);
}

void run_with_busy_threads(std::optional<mp::StartMethod> method) {
#if defined(__SANITIZE_ADDRESS__)
    // glibc's allocator is fork-safe (fork takes and resets its locks), so a forkserver forked
    // while threads allocate is sound. ASan's allocator (GCC 12) is not: a server forked while a
    // thread holds its lock hands that held lock to every worker. For such allocators the
    // documented practice applies: start the forkserver before the threads.
    if (method != mp::StartMethod::fork) mp::set_start_method(mp::StartMethod::forkserver);
#endif
    std::atomic<bool> stop{false};
    std::mutex held;
    std::vector<std::thread> threads;
    std::atomic<int> locked{0};
    for (int i = 0; i < 4; ++i) {
        threads.emplace_back([&, i] {
            if (i == 0) {
                std::lock_guard lk(held);
                ++locked;
                while (!stop.load()) std::this_thread::sleep_for(1ms);
                return;
            }
            ++locked;
            // With forkserver, churn the allocator too: the workers must not inherit a lock a
            // thread held. (fork copies the parent's locks by design, see ExecutorOptions.)
            if (method == mp::StartMethod::fork) {
                while (!stop.load()) std::this_thread::sleep_for(1ms);
                return;
            }
            while (!stop.load()) {
                std::vector<std::string> v;
                for (int k = 0; k < 64; ++k) v.emplace_back(static_cast<std::size_t>(100 + k), 'x');
            }
        });
    }
    ASSERT_TRUE(eventually([&] { return locked.load() == 4; }));
    {
        mp::ProcessPoolExecutor ex({.max_workers = 2, .start_method = method});
        std::vector<mp::Future<int>> fs;
        for (int i = 0; i < 50; ++i) fs.push_back(ex.submit(square, i));
        for (int i = 0; i < 50; ++i) EXPECT_EQ(fs[static_cast<std::size_t>(i)].result(kLong), i * i);
        std::vector<int> in(100);
        for (int i = 0; i < 100; ++i) in[static_cast<std::size_t>(i)] = i;
        auto r = ex.map({.chunksize = 7}, square, in).to_vector();
        for (int i = 0; i < 100; ++i) EXPECT_EQ(r[static_cast<std::size_t>(i)], i * i);
        // Replacements start while the threads still run.
        EXPECT_THROW(ex.submit(die, static_cast<int>(kSigkill)).result(kLong), mp::WorkerDied);
        EXPECT_EQ(ex.submit(square, 7).result(kLong), 49);
    }
    stop = true;
    for (auto& t : threads) t.join();
}

TEST(ExecutorThreadedParent, ForkserverPoolWorksWhileThreadsHoldLocks) { run_with_busy_threads(std::nullopt); }
TEST(ExecutorThreadedParent, ForkPoolWorksWhileThreadsHoldLocks) {
    run_with_busy_threads(mp::StartMethod::fork);
}

int pid_after(int ms) {
    std::this_thread::sleep_for(std::chrono::milliseconds(ms));
    return static_cast<int>(::getpid());
}

// PR_SET_PDEATHSIG fires when the thread that forked the child ends, not the process: a fork
// pool's first workers, forked by the thread that constructed the pool, were killed when that
// thread ended, with the task they ran (mp::WorkerDied). They are forked by the pool's own
// thread now, which outlives them.
TEST(ExecutorThreadedParent, ForkWorkersOutliveTheThreadThatMadeThePool) {
    std::unique_ptr<mp::ProcessPoolExecutor> ex;
    std::optional<mp::Future<int>> running;
    std::thread maker([&] {
        ex = std::make_unique<mp::ProcessPoolExecutor>(
            mp::ExecutorOptions{.max_workers = 1, .start_method = mp::StartMethod::fork});
        running = ex->submit(pid_after, 500);
        // The worker has the task when this thread ends.
        EXPECT_TRUE(eventually([&] { return running->running() || running->done(); }));
    });
    maker.join();
    int first = 0;
    ASSERT_NO_THROW(first = running->result(kLong));
    EXPECT_EQ(ex->submit(pid_after, 0).result(kLong), first) << "the worker was replaced";
    ex->shutdown();
}

// ---------------------------------------------------------------------------------------------
// Progress bar, stats
// ---------------------------------------------------------------------------------------------

/// Runs `f` with fd 2 sent to a temporary file; returns what was written there.
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
    try {
        f();
    } catch (...) {
        std::fflush(stderr);
        ::dup2(saved, 2);
        ::close(saved);
        throw;
    }
    std::fflush(stderr);
    ::dup2(saved, 2);
    ::close(saved);
    std::ifstream in(path);
    std::stringstream ss;
    ss << in.rdbuf();
    return ss.str();
}

TEST(ExecutorProgress, MapDrawsTheTotal) {
    std::vector<int> in(100);
    for (int i = 0; i < 100; ++i) in[static_cast<std::size_t>(i)] = i;
    std::vector<int> got;
    const std::string out = capture_stderr([&] {
        mp::ProcessPoolExecutor ex({.max_workers = 2});
        auto r = ex.map({.chunksize = 5, .progress = true}, square, in);
        got = r.to_vector();
    });
    EXPECT_EQ(got.size(), 100u);
    EXPECT_NE(out.find("100/100"), std::string::npos) << "stderr was: " << out;
    EXPECT_EQ(out.find('\r'), std::string::npos) << "not a terminal: plain lines expected";
}

TEST(ExecutorProgress, AsCompletedDrawsTheTotal) {
    const std::string out = capture_stderr([&] {
        mp::ProcessPoolExecutor ex({.max_workers = 2});
        std::vector<mp::Future<int>> fs;
        for (int i = 0; i < 10; ++i) fs.push_back(ex.submit(square, i));
        int n = 0;
        for (const auto& f : mp::as_completed(fs, {.timeout = 30s, .progress = true})) {
            (void)f;
            ++n;
        }
        EXPECT_EQ(n, 10);
    });
    EXPECT_NE(out.find("10/10"), std::string::npos) << "stderr was: " << out;
}

TEST(ExecutorStats, CountsAndWorkers) {
    mp::ProcessPoolExecutor ex({.max_workers = 2});
    std::vector<mp::Future<int>> fs;
    for (int i = 0; i < 10; ++i) fs.push_back(ex.submit(square, i));
    for (int i = 0; i < 3; ++i) fs.push_back(ex.submit(divide, i, 0));
    for (auto& f : fs) f.wait(kLong);
    ASSERT_TRUE(eventually([&] {
        const auto st = ex.stats();
        return st.done + st.failed == 13;
    }));
    const auto st = ex.stats();
    EXPECT_EQ(st.submitted, 13u);
    EXPECT_EQ(st.done, 10u);
    EXPECT_EQ(st.failed, 3u);
    EXPECT_EQ(st.pending, 0u);
    EXPECT_EQ(st.running, 0u);
    EXPECT_EQ(st.cancelled, 0u);
    EXPECT_EQ(st.worker_deaths, 0u);
    EXPECT_EQ(st.workers_started, 2u);
    ASSERT_EQ(st.workers.size(), 2u);
    std::size_t done = 0, failed = 0;
    std::set<std::string> names;
    for (const auto& w : st.workers) {
        EXPECT_GT(w.pid, 0);
        EXPECT_TRUE(mp::test::pid_running(w.pid));
        names.insert(w.name);
        EXPECT_EQ(w.assigned, 0u);
        EXPECT_EQ(w.running, 0u);
        done += w.done;
        failed += w.failed;
    }
    EXPECT_EQ(names, (std::set<std::string>{"ForkServerPoolWorker-1", "ForkServerPoolWorker-2"}));
    EXPECT_EQ(done, 10u);
    EXPECT_EQ(failed, 3u);
}

TEST(ExecutorStats, RunningAndPendingWhileBlocked) {
    TempDir dir;
    Gate gate(dir);
    mp::ProcessPoolExecutor ex({.max_workers = 1});
    auto blockers = saturate(ex, gate);
    const auto st = ex.stats();
    EXPECT_GE(st.running, 1u);
    EXPECT_GE(st.pending, 1u);
    EXPECT_EQ(st.submitted, blockers.size());
    ASSERT_EQ(st.workers.size(), 1u);
    EXPECT_EQ(st.workers[0].running, 1u);
    EXPECT_GE(st.workers[0].assigned, 1u);
    gate.open();
    for (auto& b : blockers) EXPECT_EQ(b.result(kLong), 1);
}

// ---------------------------------------------------------------------------------------------
// The fork and spawn start methods: the core behaviour again
// ---------------------------------------------------------------------------------------------

class ExecutorStartMethod : public ::testing::TestWithParam<mp::StartMethod> {};

INSTANTIATE_TEST_SUITE_P(StartMethods, ExecutorStartMethod,
                         ::testing::Values(mp::StartMethod::fork, mp::StartMethod::spawn),
                         [](const auto& p) { return mp::to_string(p.param); });

TEST_P(ExecutorStartMethod, SubmitMapAndExceptions) {
    mp::ProcessPoolExecutor ex({.max_workers = 2, .start_method = GetParam()});
    EXPECT_EQ(ex.submit(power, 2, 8).result(kLong), 256);
    std::vector<int> in{1, 2, 3, 4, 5};
    EXPECT_EQ(ex.map({.chunksize = 2}, square, in).to_vector(), (std::vector<int>{1, 4, 9, 16, 25}));
    if (auto e = catch_as<std::out_of_range>([&] { ex.submit(throw_out_of_range, std::string("oops")).result(kLong); })) {
        EXPECT_STREQ(e->what(), "oops");
    }
    EXPECT_THROW(ex.submit(throw_custom, std::string("x")).result(kLong), mp::RemoteError);
    const auto st = ex.stats();
    ASSERT_FALSE(st.workers.empty());
    const std::string prefix = GetParam() == mp::StartMethod::fork ? "ForkPoolWorker-" : "SpawnPoolWorker-";
    for (const auto& w : st.workers) EXPECT_EQ(w.name.rfind(prefix, 0), 0u) << w.name;
}

TEST_P(ExecutorStartMethod, SegfaultFailsOnlyItsTask) { check_death_fails_only_its_task(kSegv, GetParam()); }
TEST_P(ExecutorStartMethod, ExitFailsOnlyItsTask) { check_death_fails_only_its_task(kExit7, GetParam()); }

TEST_P(ExecutorStartMethod, TimeoutAndMaxTasksPerChild) {
    mp::ProcessPoolExecutor ex({.max_workers = 1, .start_method = GetParam(), .max_tasks_per_child = 2});
    std::set<int> pids;
    for (int i = 0; i < 6; ++i) pids.insert(ex.submit(worker_pid, 0).result(kLong));
    EXPECT_GE(pids.size(), 3u);
    EXPECT_THROW(ex.submit(mp::TaskOptions{.timeout = 500ms}, sleep_ms, 10000).result(8s), mp::TimeoutError);
    EXPECT_EQ(ex.submit(square, 7).result(kLong), 49);
}

// See PoolWorkerLifetime.MaxMemoryPerChildCountsWhatTheWorkerGainsNotTheParentsPages: under fork
// the 256 MiB the parent holds were counted as the worker's, and retired it after every task.
TEST_P(ExecutorStartMethod, MaxMemoryPerChildIgnoresWhatTheParentHolds) {
    const std::vector<char> parent(256u << 20, 1);
    mp::ProcessPoolExecutor ex({.max_workers = 1, .start_method = GetParam(), .max_memory_per_child = 100u << 20});
    std::set<int> pids;
    for (int i = 0; i < 6; ++i) pids.insert(ex.submit(worker_pid, i).result(kLong));
    EXPECT_EQ(pids.size(), 1u);
    EXPECT_EQ(ex.submit(hog_memory, 200).result(kLong), *pids.begin());
    EXPECT_EQ(pids.count(ex.submit(worker_pid, 0).result(kLong)), 0u);
    EXPECT_EQ(ex.stats().worker_deaths, 0u);
    EXPECT_EQ(parent.back(), 1);
}

TEST_P(ExecutorStartMethod, InitializerRuns) {
    mp::ProcessPoolExecutor ex({.max_workers = 2, .start_method = GetParam()}, init_global, 5);
    for (int i = 0; i < 4; ++i) EXPECT_EQ(ex.submit(read_global, 0).result(kLong), 5);
}

// ---------------------------------------------------------------------------------------------
// A pool copied into a child of the program's own fork() (found from outside: its destructor
// joined the parent's thread handle, which means nothing there: std::terminate, or a wait for
// ever on the child's own pool thread that happened to reuse its address).
// ---------------------------------------------------------------------------------------------

// Runs `child` in a child of a plain fork(); its exit code, or -1 if it did not end in time.
// The test process runs pool threads: under ASan (GCC 12's allocator is not fork-safe) the child
// could inherit one of its locks held and hang in its first allocation, so these tests skip
// there (as PoolForkStdout); the ci and clang builds run them.
#if defined(__SANITIZE_ADDRESS__)
#define MP_SKIP_PLAIN_FORK_UNDER_ASAN() \
    GTEST_SKIP() << "ASan's allocator is not fork-safe in a threaded parent (GCC 12's libasan)"
#else
#define MP_SKIP_PLAIN_FORK_UNDER_ASAN() (void)0
#endif
template <class F>
int in_forked_child(F&& child) {
    std::fflush(nullptr);
    const pid_t pid = ::fork();
    if (pid == 0) ::_exit(child());
    const auto deadline = Clock::now() + kLong;
    int status = 0;
    while (::waitpid(pid, &status, WNOHANG) == 0) {
        if (Clock::now() >= deadline) {
            ::kill(pid, SIGKILL);
            ::waitpid(pid, &status, 0);
            return -1;
        }
        std::this_thread::sleep_for(5ms);
    }
    return WIFEXITED(status) ? WEXITSTATUS(status) : 100 + WTERMSIG(status);
}

TEST(ExecutorForkedProgram, APoolCopiedByForkIsLeftToTheParent) {
    MP_SKIP_PLAIN_FORK_UNDER_ASAN();
    auto inherited = std::make_unique<mp::ProcessPoolExecutor>(mp::ExecutorOptions{.max_workers = 1});
    auto inherited_pool = std::make_unique<mp::Pool>(mp::PoolOptions{.processes = 1});
    ASSERT_EQ(inherited->submit(square, 2).result(kLong), 4);
    ASSERT_EQ(inherited_pool->apply(square, 3), 9);
    const int code = in_forked_child([&]() -> int {
        try {
            (void)inherited->submit(square, 3);
            return 1;  // accepted: it would never finish
        } catch (const mp::Error&) {
        }
        try {
            (void)inherited_pool->apply_async(square, 3);
            return 2;
        } catch (const mp::Error&) {
        }
        mp::ProcessPoolExecutor own({.max_workers = 1});
        if (own.submit(square, 5).result(kLong) != 25) return 3;
        inherited.reset();  // with the child's own pool thread running: returns at once
        inherited_pool.reset();
        return 0;
    });
    EXPECT_EQ(code, 0) << "1, 2: the copy took work; 3: the child's own pool failed; -1: hung; >100: signal";
    // The parent's pools are untouched.
    EXPECT_EQ(inherited->submit(square, 6).result(kLong), 36);
    EXPECT_EQ(inherited_pool->apply(square, 7), 49);
}

TEST(ExecutorForkedProgram, AChildThatReturnsWithTheCopyLeavesCleanly) {
    MP_SKIP_PLAIN_FORK_UNDER_ASAN();
    mp::ProcessPoolExecutor inherited({.max_workers = 1});
    ASSERT_EQ(inherited.submit(square, 2).result(kLong), 4);
    // As a child that returns from main: the copy is destroyed in the child (was: std::terminate).
    const int code = in_forked_child([&]() -> int {
        {
            mp::ProcessPoolExecutor own({.max_workers = 1});
            if (own.submit(square, 3).result(kLong) != 9) return 3;
        }
        inherited.~ProcessPoolExecutor();  // then _exit: never destroyed twice
        return 0;
    });
    EXPECT_EQ(code, 0);
    EXPECT_EQ(inherited.submit(square, 6).result(kLong), 36);
}

// ---------------------------------------------------------------------------------------------
// A task's time limit and the pool's initializer (found from outside: a task waiting for an
// initializer that never returned waited for ever, task_timeout or not, and so did shutdown).
// ---------------------------------------------------------------------------------------------

class ExecutorInitializerTimeout : public ::testing::TestWithParam<mp::StartMethod> {
protected:
    // shutdown(wait) in another thread, bounded: false if it had not returned within `limit`
    // (the workers are then killed so that it does).
    static bool shuts_down_within(mp::ProcessPoolExecutor& ex, std::chrono::milliseconds limit) {
        auto done = std::async(std::launch::async, [&] { ex.shutdown(true); });
        if (done.wait_for(limit) == std::future_status::ready) return true;
        ex.kill_workers();
        done.wait();
        return false;
    }
    // A one-worker executor whose initializer never returns, task_timeout 1 s; its worker's pid.
    mp::ProcessPoolExecutor& start_hung() {
        hung.emplace(mp::ExecutorOptions{.max_workers = 1, .start_method = GetParam(), .task_timeout = 1s},
                     init_first_hangs, hung_dir.path + "/hung");
        stuck = only_worker(*hung);
        return *hung;
    }
    TempDir hung_dir;
    std::optional<mp::ProcessPoolExecutor> hung;
    pid_t stuck = 0;

    static pid_t only_worker(mp::ProcessPoolExecutor& ex) {
        pid_t pid = 0;
        (void)eventually([&] {
            const auto st = ex.stats();
            if (st.workers.size() == 1) pid = st.workers[0].pid;
            return pid > 0;
        });
        return pid;
    }
};

INSTANTIATE_TEST_SUITE_P(StartMethods, ExecutorInitializerTimeout,
                         ::testing::Values(mp::StartMethod::fork, mp::StartMethod::forkserver,
                                           mp::StartMethod::spawn),
                         [](const auto& p) { return mp::to_string(p.param); });

TEST_P(ExecutorInitializerTimeout, ATaskWaitingForAnInitializerThatNeverReturnsTimesOut) {
    auto& ex = start_hung();
    ASSERT_GT(stuck, 0);
    auto f = ex.submit(square, 3);
    auto e = catch_as<mp::TimeoutError>([&] { (void)f.result(kLong); });
    ASSERT_TRUE(e.has_value()) << "the task did not time out while the initializer hung";
    EXPECT_NE(std::string(e->what()).find("initializer"), std::string::npos) << e->what();
    // The worker was left to its initializer, and shutdown does not wait for it.
    EXPECT_EQ(ex.stats().workers_started, 1u);
    EXPECT_TRUE(shuts_down_within(ex, 30s)) << "shutdown waited for an initializer that never returns";
    EXPECT_TRUE(mp::test::wait_pid_stopped(stuck, 5000ms));
}

TEST_P(ExecutorInitializerTimeout, ShutdownStopsWaitingForAHungInitializerAfterTheTaskTimeout) {
    auto& ex = start_hung();
    ASSERT_GT(stuck, 0);
    EXPECT_TRUE(shuts_down_within(ex, 30s)) << "shutdown waited for an initializer that never returns";
    EXPECT_TRUE(mp::test::wait_pid_stopped(stuck, 5000ms));
    EXPECT_EQ(ex.stats().worker_deaths, 0u);  // an end the pool asked for
}

TEST_P(ExecutorInitializerTimeout, ASlowInitializerFailsOnlyTheTasksThatWaitedLongerThanTheirLimit) {
    mp::ProcessPoolExecutor ex({.max_workers = 1, .start_method = GetParam(), .task_timeout = 300ms},
                               init_sleep_ms, 3000);
    auto late = ex.submit(square, 2);
    EXPECT_THROW((void)late.result(kLong), mp::TimeoutError);
    // A limit longer than what is left of the initializer: the same worker, not killed, runs it.
    EXPECT_EQ(ex.submit(mp::TaskOptions{.timeout = kLong}, square, 3).result(kLong), 9);
    EXPECT_EQ(ex.submit(square, 4).result(kLong), 16);
    EXPECT_EQ(ex.stats().workers_started, 1u);
}

TEST_P(ExecutorInitializerTimeout, TasksGoToTheWorkersWhoseInitializerReturned) {
    TempDir dir;
    mp::ProcessPoolExecutor ex({.max_workers = 2, .start_method = GetParam(), .task_timeout = 1s},
                               init_first_hangs, dir.path + "/hung");
    std::vector<mp::Future<int>> first;
    for (int i = 0; i < 20; ++i) first.push_back(ex.submit(square, i));
    int ok = 0, timed_out = 0;
    for (auto& f : first) {
        try {
            ok += f.result(kLong) >= 0;
        } catch (const mp::TimeoutError&) {
            ++timed_out;
        }
    }
    EXPECT_EQ(ok + timed_out, 20);
    // The stuck worker held a few at most; after its first overrun it gets no more.
    EXPECT_LE(timed_out, 2);
    for (int i = 0; i < 20; ++i) EXPECT_EQ(ex.submit(square, i).result(kLong), i * i);
    EXPECT_EQ(ex.stats().workers_started, 2u);
    EXPECT_TRUE(shuts_down_within(ex, 30s)) << "shutdown waited for an initializer that never returns";
}


// ---------------------------------------------------------------------------------------------
// Misuse (issue 12 item 6): an empty handle (default-constructed, or moved from) throws
// mp::EmptyHandle on use instead of crashing.
// ---------------------------------------------------------------------------------------------

template <class F>
void expect_empty_handle(F&& use, const char* type) {
    try {
        use();
        ADD_FAILURE() << "no exception";
    } catch (const mp::EmptyHandle& e) {
        EXPECT_NE(std::string(e.what()).find(type), std::string::npos) << e.what();
    }
}

void expect_unusable(const mp::Future<int>& f) {
    EXPECT_FALSE(f.valid());
    expect_empty_handle([&] { (void)f.result(); }, "mp::Future");
    expect_empty_handle([&] { (void)f.result(1s); }, "mp::Future");
    expect_empty_handle([&] { (void)f.exception(); }, "mp::Future");
    expect_empty_handle([&] { (void)f.wait(0s); }, "mp::Future");
    expect_empty_handle([&] { (void)f.done(); }, "mp::Future");
    expect_empty_handle([&] { (void)f.running(); }, "mp::Future");
    expect_empty_handle([&] { (void)f.cancelled(); }, "mp::Future");
    expect_empty_handle([&] { (void)f.cancel(); }, "mp::Future");
    expect_empty_handle([&] { f.add_done_callback([](const mp::Future<int>&) {}); }, "mp::Future");
    expect_empty_handle([&] { (void)mp::wait(std::vector{f}, 0s); }, "mp::Future");
    expect_empty_handle([&] { (void)mp::as_completed(std::vector{f}); }, "mp::Future");
}

TEST(ExecutorMisuse, DefaultConstructedFutureThrowsEmptyHandle) { expect_unusable(mp::Future<int>()); }

TEST(ExecutorMisuse, MovedFromFutureAndMapResultsThrowEmptyHandle) {
    mp::ProcessPoolExecutor ex({.max_workers = 1});
    auto f = ex.submit(square, 3);
    auto g = std::move(f);
    expect_unusable(f);  // NOLINT(bugprone-use-after-move): the point of the test
    EXPECT_EQ(g.result(kLong), 9);

    auto results = ex.map(square, std::vector{1, 2});
    auto moved = std::move(results);
    expect_empty_handle([&] { (void)results.begin(); }, "mp::MapResults");  // NOLINT(bugprone-use-after-move)
    expect_empty_handle([&] { (void)results.to_vector(); }, "mp::MapResults");
    expect_empty_handle([&] { (void)results.size(); }, "mp::MapResults");
    expect_empty_handle([&] { results.cancel(); }, "mp::MapResults");
    EXPECT_EQ(moved.to_vector(), (std::vector{1, 4}));
}

// ---------------------------------------------------------------------------------------------
// Timeout values (issue 12 item 5): every call that takes a timeout, at durations that mean "for
// ever" (it must wait: the value arrives later and is returned) and at zero and negative ones
// (it only looks), each of its own type.
// ---------------------------------------------------------------------------------------------

TEST(ExecutorTimeoutValues, FutureResultExceptionWait) {
    TempDir dir;  // outlives the pool, whose destructor waits for the gated tasks
    mp::ProcessPoolExecutor ex({.max_workers = 2});
    mp::test::for_each_forever([&](auto forever) {
        EXPECT_EQ(ex.submit(sleep_ms, 50).result(forever), 50);
        EXPECT_EQ(ex.submit(sleep_ms, 50).exception(forever), nullptr);
        auto f = ex.submit(sleep_ms, 50);
        EXPECT_TRUE(f.wait(forever));
        EXPECT_TRUE(f.done());
    });
    Gate gate(dir);
    auto pending = ex.submit(wait_file, gate.path());
    mp::test::for_each_no_wait([&](auto t) {
        EXPECT_THROW(pending.result(t), mp::TimeoutError);
        EXPECT_THROW(pending.exception(t), mp::TimeoutError);
        EXPECT_FALSE(pending.wait(t));
    });
    gate.open();
    ASSERT_EQ(pending.result(kLong), 1);
    // Done: no wait is needed, whatever the timeout.
    mp::test::for_each_no_wait([&](auto t) { EXPECT_EQ(pending.result(t), 1); });
}

TEST(ExecutorTimeoutValues, WaitAndAsCompleted) {
    TempDir dir;  // outlives the pool, whose destructor waits for the gated tasks
    mp::ProcessPoolExecutor ex({.max_workers = 2});
    mp::test::for_each_forever([&](auto forever) {
        std::vector fs{ex.submit(sleep_ms, 50), ex.submit(sleep_ms, 60)};
        auto r = mp::wait(fs, forever);
        EXPECT_EQ(r.done.size(), 2u);
        EXPECT_TRUE(r.not_done.empty());
        std::vector gs{ex.submit(sleep_ms, 50), ex.submit(sleep_ms, 60)};
        EXPECT_FALSE(mp::wait(gs, forever, mp::FIRST_COMPLETED).done.empty());
        std::vector hs{ex.submit(sleep_ms, 50), ex.submit(sleep_ms, 60)};
        int n = 0;
        for (auto& f : mp::as_completed(hs, forever)) n += f.result(0s) > 0;
        EXPECT_EQ(n, 2);
        std::vector is{ex.submit(sleep_ms, 50)};
        n = 0;
        for (auto& f : mp::as_completed(is, {.timeout = forever})) n += f.result(0s) > 0;
        EXPECT_EQ(n, 1);
    });
    Gate gate(dir);
    std::vector pending{ex.submit(wait_file, gate.path())};
    mp::test::for_each_no_wait([&](auto t) {
        EXPECT_EQ(mp::wait(pending, t).not_done.size(), 1u);
        EXPECT_EQ(mp::wait(pending, t, mp::FIRST_COMPLETED).not_done.size(), 1u);
        EXPECT_THROW(for (auto& f : mp::as_completed(pending, t)) (void)f, mp::TimeoutError);
        EXPECT_THROW(for (auto& f : mp::as_completed(pending, {.timeout = t})) (void)f, mp::TimeoutError);
    });
}

TEST(ExecutorTimeoutValues, MapTimeoutAndTaskTimeouts) {
    TempDir dir;  // outlives the pool, whose destructor waits for the gated tasks
    mp::ProcessPoolExecutor ex({.max_workers = 2});
    const std::vector<int> naps{50, 60, 70};
    mp::test::for_each_forever([&](auto forever) {
        EXPECT_EQ(ex.map({.timeout = forever}, sleep_ms, naps).to_vector(), naps);
        EXPECT_EQ(ex.map({.task_timeout = forever}, sleep_ms, naps).to_vector(), naps);
        EXPECT_EQ(ex.submit({.timeout = forever}, sleep_ms, 50).result(kLong), 50);
        mp::ProcessPoolExecutor limited({.max_workers = 1, .task_timeout = forever});
        EXPECT_EQ(limited.submit(sleep_ms, 50).result(kLong), 50);
    });
    Gate gate(dir);
    const std::vector<std::string> gated{gate.path()};
    mp::test::for_each_no_wait([&](auto t) {
        EXPECT_THROW(ex.map({.timeout = t}, wait_file, gated).to_vector(), mp::TimeoutError);
    });
    // A task time limit of zero or less has passed by the time a worker starts the task.
    EXPECT_THROW(ex.submit({.timeout = -1s}, sleep_ms, 5000).result(kLong), mp::TimeoutError);
    EXPECT_THROW(ex.submit({.timeout = std::chrono::hours::min()}, sleep_ms, 5000).result(kLong),
                 mp::TimeoutError);
}


TEST(ExecutorTimeoutValues, ATaskTimeLimitOfZeroOrLessCostsNoWorker) {
    // Its limit has passed when it is due: it fails once, and no worker is started for it
    // (each attempt used to go to a fresh worker with a fresh zero deadline, dozens in a row).
    mp::ProcessPoolExecutor ex({.max_workers = 2});
    ASSERT_EQ(ex.submit(sleep_ms, 1).result(kLong), 1);
    ASSERT_TRUE(eventually([&] { return ex.stats().workers_started == 2; }));
    const auto before = ex.stats();
    for (auto t : {std::chrono::nanoseconds(0), std::chrono::nanoseconds(-1'000'000'000)}) {
        auto e = catch_as<mp::TimeoutError>([&] { (void)ex.submit({.timeout = t}, sleep_ms, 10).result(kLong); });
        EXPECT_TRUE(e.has_value());
    }
    EXPECT_EQ(ex.submit(sleep_ms, 1).result(kLong), 1);
    const auto after = ex.stats();
    EXPECT_EQ(after.workers_started, before.workers_started);
    EXPECT_EQ(after.failed, before.failed + 2);
    // A pool-wide limit of zero: likewise, for every task.
    mp::ProcessPoolExecutor zero({.max_workers = 1, .task_timeout = std::chrono::nanoseconds(0)});
    EXPECT_THROW((void)zero.submit(sleep_ms, 10).result(kLong), mp::TimeoutError);
    EXPECT_THROW((void)zero.submit(sleep_ms, 10).result(kLong), mp::TimeoutError);
    EXPECT_LE(zero.stats().workers_started, 1u);
}

TEST(ExecutorTimeoutValues, ATaskTimeLimitTooShortToStartCostsFewWorkers) {
    // A limit of a nanosecond passes before any worker can start the task: after a few workers
    // killed for it, it fails rather than costing a new worker each time.
    mp::ProcessPoolExecutor ex({.max_workers = 1});
    ASSERT_EQ(ex.submit(sleep_ms, 1).result(kLong), 1);
    const auto before = ex.stats().workers_started;
    EXPECT_THROW((void)ex.submit({.timeout = std::chrono::nanoseconds(1)}, sleep_ms, 10).result(kLong),
                 mp::TimeoutError);
    EXPECT_EQ(ex.submit(sleep_ms, 1).result(kLong), 1);
    EXPECT_LE(ex.stats().workers_started, before + 3);
}

// With SIGCHLD ignored the kernel reaps our children itself, so a fork or spawn worker that
// ends cannot be waited for (ECHILD). It has ended all the same: the pool replaces it (a task
// it was running fails with WorkerDied), as under forkserver, instead of breaking with an
// "internal error" (found from outside: every task after the first failed with
// BrokenProcessPool).
TEST(ExecutorSigchldIgnored, WorkersThatEndAreReplaced) {
    mp_test::ChildrenReapedByKernel ignore_sigchld;
    for (mp::StartMethod m : {mp::StartMethod::fork, mp::StartMethod::spawn, mp::StartMethod::forkserver}) {
        SCOPED_TRACE(static_cast<int>(m));
        mp::ProcessPoolExecutor ex({.max_workers = 1, .start_method = m, .max_tasks_per_child = 1});
        for (int i = 0; i < 4; ++i) EXPECT_EQ(ex.submit(square, i).result(kLong), i * i);
        EXPECT_THROW((void)ex.submit(die, static_cast<int>(kSigkill)).result(kLong), mp::WorkerDied);
        EXPECT_EQ(ex.submit(square, 5).result(kLong), 25);
        // How it ended: the kernel keeps it for the pidfd from Linux 6.15; before, it is unknown,
        // and the error says so rather than make up a SIGKILL (which it did).
        try {
            (void)ex.submit(die, static_cast<int>(kExit7)).result(kLong);
            ADD_FAILURE() << "the task did not fail";
        } catch (const mp::WorkerDied& e) {
            if (mp_test::kernel_keeps_exit_status()) {
                EXPECT_EQ(e.exit_code(), 7) << e.what();
            } else {
                EXPECT_EQ(e.exit_code(), std::nullopt) << e.what();
                EXPECT_EQ(e.signal(), std::nullopt) << e.what();
                EXPECT_NE(std::string(e.what()).find("unknown"), std::string::npos) << e.what();
            }
        }
        EXPECT_EQ(ex.submit(square, 6).result(kLong), 36);
    }
}

// WorkerDied for a status no one knows any more: neither an exit code nor a signal.
TEST(WorkerDiedStatus, UnknownIsNeitherAnExitCodeNorASignal) {
    const mp::WorkerDied unknown(42, mp::WorkerDied::unknown_status);
    EXPECT_EQ(unknown.exit_code(), std::nullopt);
    EXPECT_EQ(unknown.signal(), std::nullopt);
    EXPECT_NE(std::string(unknown.what()).find("unknown"), std::string::npos) << unknown.what();
    const mp::WorkerDied killed(42, -SIGKILL);
    EXPECT_EQ(killed.signal(), SIGKILL);
    EXPECT_EQ(killed.exit_code(), std::nullopt);
}
}  // namespace

// ---------------------------------------------------------------------------------------------
// terminate_workers() / kill_workers() (Python 3.14; CPython's test_terminate_workers,
// test_kill_workers and test_force_shutdown_workers*), under every start method
// ---------------------------------------------------------------------------------------------

namespace {

// "Forever", as far as a test goes: the worker is signalled long before.
int put_wait_put(mp::Queue<int> q) {
    q.put(1);
    std::this_thread::sleep_for(30s);
    q.put(2);
    return 0;
}

class ExecutorForceShutdown : public ::testing::TestWithParam<mp::StartMethod> {
public:
    // The operation under test: terminate_workers or kill_workers.
    using Stop = void (mp::ProcessPoolExecutor::*)();

    // test_force_shutdown_workers: the running task is stopped before its second put, the
    // one queued behind it is cancelled, and the pool takes no more work.
    void check_stops_the_running_task(Stop stop) {
        mp::Queue<int> q;
        mp::ProcessPoolExecutor ex({.max_workers = 1, .start_method = GetParam()});
        auto running = ex.submit(put_wait_put, q);
        auto queued = ex.submit(put_wait_put, q);
        ASSERT_EQ(q.get(kLong), 1);
        (ex.*stop)();
        EXPECT_THROW((void)running.result(kLong), mp::BrokenProcessPool);
        EXPECT_TRUE(queued.cancelled());
        EXPECT_THROW((void)ex.submit(square, 2), mp::Error);  // Python: RuntimeError or broken
        ex.shutdown(true);  // the worker is gone: this does not wait for the task's 30 s
        EXPECT_THROW((void)q.get(100ms), mp::Empty);  // the second put never happened
    }

    // test_force_shutdown_workers_stops_pool: the worker process has ended once the pool is
    // shut down (waited for), although its task would have run on for 30 s.
    void check_stops_pool(Stop stop) {
        mp::Queue<int> q;
        mp::ProcessPoolExecutor ex({.max_workers = 1, .start_method = GetParam()});
        const int pid = ex.submit(worker_pid, 0).result(kLong);
        auto running = ex.submit(put_wait_put, q);
        ASSERT_EQ(q.get(kLong), 1);
        (ex.*stop)();
        EXPECT_THROW((void)ex.submit(square, 2), mp::Error);
        ex.shutdown(true);
        EXPECT_EQ(::kill(pid, 0), -1);  // reaped (by us, or by the forkserver)
        EXPECT_TRUE(running.done());
        EXPECT_THROW((void)q.get(100ms), mp::Empty);
    }
};

INSTANTIATE_TEST_SUITE_P(StartMethods, ExecutorForceShutdown,
                         ::testing::Values(mp::StartMethod::fork, mp::StartMethod::forkserver,
                                           mp::StartMethod::spawn),
                         [](const auto& p) { return mp::to_string(p.param); });

TEST_P(ExecutorForceShutdown, TerminateWorkers) {
    check_stops_the_running_task(&mp::ProcessPoolExecutor::terminate_workers);
}
TEST_P(ExecutorForceShutdown, KillWorkers) {
    check_stops_the_running_task(&mp::ProcessPoolExecutor::kill_workers);
}
TEST_P(ExecutorForceShutdown, ForceShutdownWorkersStopsPool) {
    check_stops_pool(&mp::ProcessPoolExecutor::terminate_workers);
    check_stops_pool(&mp::ProcessPoolExecutor::kill_workers);
}

// terminate_workers() sends SIGTERM, which a task may ignore: its worker then finishes the task
// and answers after the pool has failed its future. That answer is dropped quietly; before, the
// pool took it for an answer to a task it never gave, logged an internal error and stopped
// waiting for its workers (a zombie). kill_workers() gives the task no such chance.
int ignore_sigterm_then_answer(mp::Queue<int> q) {
    std::signal(SIGTERM, SIG_IGN);
    q.put(1);
    std::this_thread::sleep_for(300ms);
    q.put(2);
    return 7;
}

TEST_P(ExecutorForceShutdown, TerminateWorkersWhileATaskIgnoresSigterm) {
    std::vector<std::string> errors;
    std::mutex errors_mu;
    mp::get_logger().set_sink([&](const mp::LogRecord& r) {
        std::lock_guard lock(errors_mu);
        errors.emplace_back(r.message);
    });
    for (Stop stop : {&mp::ProcessPoolExecutor::terminate_workers, &mp::ProcessPoolExecutor::kill_workers}) {
        const bool sigterm = stop == &mp::ProcessPoolExecutor::terminate_workers;
        SCOPED_TRACE(sigterm ? "terminate_workers" : "kill_workers");
        mp::Queue<int> q;
        mp::ProcessPoolExecutor ex({.max_workers = 1, .start_method = GetParam()});
        auto running = ex.submit(ignore_sigterm_then_answer, q);
        ASSERT_EQ(q.get(kLong), 1);
        (ex.*stop)();
        EXPECT_THROW((void)running.result(kLong), mp::BrokenProcessPool);
        if (sigterm) {
            EXPECT_EQ(q.get(kLong), 2);  // it ran on, and its answer reaches the pool
        } else {
            EXPECT_THROW((void)q.get(500ms), mp::Empty);
        }
        ex.shutdown(true);  // bounded: the task ends 300 ms after it started
    }
    mp::get_logger().set_sink({});
    std::lock_guard lock(errors_mu);
    EXPECT_TRUE(errors.empty()) << errors.front();
}

// test_force_shutdown_workers_dead_workers: after a worker died, it raises nothing.
TEST_P(ExecutorForceShutdown, ForceShutdownWorkersDeadWorkers) {
    for (Stop stop : {&mp::ProcessPoolExecutor::terminate_workers, &mp::ProcessPoolExecutor::kill_workers}) {
        mp::ProcessPoolExecutor ex({.max_workers = 1, .start_method = GetParam()});
        EXPECT_THROW((void)ex.submit(die, static_cast<int>(kExit7)).result(kLong), mp::WorkerDied);
        EXPECT_NO_THROW((ex.*stop)());
        EXPECT_NO_THROW((ex.*stop)());  // and again
    }
}

// test_force_shutdown_workers_not_started_yet: right after construction, nothing to stop but
// the workers themselves; no error, and the destructor does not hang.
TEST_P(ExecutorForceShutdown, ForceShutdownWorkersNotStartedYet) {
    for (Stop stop : {&mp::ProcessPoolExecutor::terminate_workers, &mp::ProcessPoolExecutor::kill_workers}) {
        mp::ProcessPoolExecutor ex({.max_workers = 2, .start_method = GetParam()});
        EXPECT_NO_THROW((ex.*stop)());
    }
}

}  // namespace
