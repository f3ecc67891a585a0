// Tests for mp/synchronize.hpp: the behaviours CPython's _test_multiprocessing checks for Lock,
// RLock, Semaphore, Condition, Event and Barrier (_TestLock, _TestSemaphore, _TestCondition,
// _TestEvent, _TestBarrier), plus death tests (SIGKILL a holder or a waiter) and the codecs used
// by the forkserver start method. Every wait is bounded; no assertion depends on speed (only
// "at least the timeout" lower bounds).

#include <gtest/gtest.h>

#include <array>
#include <atomic>
#include <csignal>
#include <fcntl.h>
#include <linux/futex.h>
#include <optional>
#include <pthread.h>
#include <chrono>
#include <cmath>
#include <future>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <sched.h>
#include <mutex>
#include <new>
#include <random>
#include <stdexcept>
#include <string>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <system_error>
#include <thread>
#include <unistd.h>
#include <vector>

#include "helpers/proc_state.hpp"
#include "helpers/timeouts.hpp"
#include "helpers/shared_object.hpp"
#include "helpers/start_methods.hpp"
#include "mp/process.hpp"
#include "mp/shared_memory.hpp"
#include "mp/synchronize.hpp"
#include "sync_state.hpp"
#include "sys/futex.hpp"

using namespace std::chrono_literals;
using Clock = std::chrono::steady_clock;

namespace {

constexpr auto DELTA = 100ms;   // "nothing happened in the meantime" pauses
constexpr auto TIMEOUT1 = 100ms;
constexpr auto TIMEOUT2 = 200ms;
constexpr auto LONG = 20s;      // a bound that is never reached unless something is broken

using mp::test::Shared;

// In a child: leave with `code` when `ok` is false (gtest assertions do not cross processes).
void require(bool ok, int code) {
    if (!ok) ::_exit(code);
}

// Starts a fork child running `f`.
template <class F>
std::unique_ptr<mp::Process> spawn(F f) {
    auto p = std::make_unique<mp::Process>(std::move(f));
    p->start();
    return p;
}

// Joins within LONG; kills and fails the test otherwise.
void join_ok(mp::Process& p, int expected_exit = 0) {
    if (!p.join(LONG)) {
        p.kill();
        p.join();
        ADD_FAILURE() << "child " << p.pid() << " did not finish in time";
        return;
    }
    EXPECT_EQ(p.exitcode(), expected_exit) << "child " << p.name();
}

void kill_and_join(mp::Process& p) {
    p.kill();
    ASSERT_TRUE(p.join(LONG));
    EXPECT_EQ(p.exitcode(), -SIGKILL);
}

// Polls until f() == value or LONG passes; returns the last value.
template <class F>
auto reaches(F f, decltype(f()) value) {
    auto end = Clock::now() + LONG;
    auto v = f();
    while (v != value && Clock::now() < end) {
        std::this_thread::sleep_for(10ms);
        v = f();
    }
    return v;
}

// True once thread (or process) `tid` sleeps in a process-shared FUTEX_WAIT_BITSET, the wait
// every mp primitive makes (threads of this process, glibc's and the sanitizers' own locks,
// use private futexes); false after `limit`.
bool asleep_in_shared_futex_wait(pid_t tid, std::chrono::milliseconds limit) {
    const auto end = Clock::now() + limit;
    for (;;) {
        const auto call = mp::test::futex_call_of(tid);
        if (call && (call->op & FUTEX_PRIVATE_FLAG) == 0 &&
            (call->op & FUTEX_CMD_MASK) == FUTEX_WAIT_BITSET && mp::test::proc_state(tid) == 'S')
            return true;
        if (Clock::now() > end) return false;
        std::this_thread::sleep_for(1ms);
    }
}

// Gives `pid`, a waiter staged pinned to one CPU at SCHED_IDLE, every CPU this process may use
// and, where allowed, SCHED_OTHER again (leaving SCHED_IDLE needs CAP_SYS_NICE or a high enough
// RLIMIT_NICE: failing is fine). Neither wakes it nor touches what it waits for: whether it wakes
// is still up to the code under test, but once it does it no longer needs a CPU another job may
// keep busy.
void unpin(pid_t pid) {
    cpu_set_t all;
    if (sched_getaffinity(0, sizeof all, &all) == 0) (void)sched_setaffinity(pid, sizeof all, &all);
    sched_param none{};
    (void)sched_setscheduler(pid, SCHED_OTHER, &none);
}

template <class F>
double elapsed_of(F f) {
    auto t0 = Clock::now();
    f();
    return std::chrono::duration<double>(Clock::now() - t0).count();
}

std::errc code_of(const std::system_error& e) { return static_cast<std::errc>(e.code().value()); }

}  // namespace

// ============================================================================ futex wrapper

TEST(SyncFutex, WaitReturnsAtOnceWhenTheWordDiffers) {
    std::atomic<std::uint32_t> word{1};
    EXPECT_EQ(mp::sys::futex_wait(word, 0, mp::detail::deadline_after(LONG)),
              mp::sys::FutexResult::woken);
}

TEST(SyncFutex, WaitTimesOutAtTheDeadline) {
    std::atomic<std::uint32_t> word{0};
    auto deadline = mp::detail::deadline_after(TIMEOUT1);
    EXPECT_EQ(mp::sys::futex_wait(word, 0, deadline), mp::sys::FutexResult::timed_out);
    EXPECT_GE(Clock::now(), *deadline);
    // A deadline in the past is a poll.
    EXPECT_EQ(mp::sys::futex_wait(word, 0, Clock::now() - 1s),
              mp::sys::FutexResult::timed_out);
}

// Fork only by nature: the raw futex word is in the test's own anonymous shared mapping, below
// mp's handles, which only a fork child shares.
TEST(SyncFutex, WakeCountsSleepersAcrossProcessesAndBitsets) {
    Shared<std::atomic<std::uint32_t>> word;
    // Each child sleeps once, with its own bit, and exits when woken.
    auto sleeper = [&](std::uint32_t bits) {
        return spawn([&, bits] {
            require(mp::sys::futex_wait(*word, 0, mp::detail::deadline_after(LONG), bits) ==
                        mp::sys::FutexResult::woken,
                    2);
        });
    };
    auto a = sleeper(1);
    auto b = sleeper(2);
    // A wake reports a sleeper only once it sleeps in the kernel: retry until it does.
    auto wake_one = [&](std::uint32_t bits) {
        auto end = Clock::now() + LONG;
        int n = 0;
        while (n == 0 && Clock::now() < end) {
            n = mp::sys::futex_wake(*word, 1, bits);
            if (n == 0) std::this_thread::sleep_for(1ms);
        }
        return n;
    };
    EXPECT_EQ(wake_one(1), 1);
    join_ok(*a);
    EXPECT_EQ(mp::sys::futex_wake(*word, 1, 4), 0);  // no sleeper has bit 4
    EXPECT_EQ(wake_one(2), 1);
    join_ok(*b);
    EXPECT_EQ(mp::sys::futex_wake_all(*word), 0);  // nobody left
}

// The kernel keys a private futex (FUTEX_PRIVATE_FLAG) apart from a shared one on the same word:
// a wake reaches only sleepers of its own scope, so each scope is seen to reach the call.
TEST(SyncFutex, AWakeReachesOnlySleepersOfItsScope) {
    using mp::sys::FutexScope;
    std::atomic<std::uint32_t> word{0};
    for (const FutexScope sleeps : {FutexScope::process_private, FutexScope::shared}) {
        const FutexScope other = sleeps == FutexScope::shared ? FutexScope::process_private
                                                              : FutexScope::shared;
        std::atomic<pid_t> tid{0};
        std::thread sleeper([&] {
            tid = static_cast<pid_t>(::syscall(SYS_gettid));
            (void)mp::sys::futex_wait(word, 0, mp::detail::deadline_after(LONG),
                                      mp::sys::futex_bitset_any, sleeps);
        });
        for (auto end = Clock::now() + LONG; Clock::now() < end; std::this_thread::sleep_for(1ms))
            if (tid != 0 && mp::test::in_futex_on(tid, &word) && mp::test::proc_state(tid) == 'S')
                break;
        const int by_other = mp::sys::futex_wake_all(word, mp::sys::futex_bitset_any, other);
        const int by_same = mp::sys::futex_wake_all(word, mp::sys::futex_bitset_any, sleeps);
        sleeper.join();
        EXPECT_EQ(by_other, 0) << "sleeping " << (sleeps == FutexScope::shared ? "shared" : "private");
        EXPECT_EQ(by_same, 1) << "sleeping " << (sleeps == FutexScope::shared ? "shared" : "private");
    }
}

TEST(SyncFutex, DeadlineHelpersSaturate) {
    using namespace std::chrono;
    // "For ever" is no deadline at all (detail::Timeout's rule), never an overflow.
    EXPECT_EQ(mp::detail::deadline_after(nanoseconds::max()), std::nullopt);
    EXPECT_EQ(mp::detail::deadline_after(hours::max()), std::nullopt);
    const auto past = *mp::detail::deadline_after(-5s);
    EXPECT_LE(past, steady_clock::now());
    const auto before = steady_clock::now();
    auto d = mp::detail::deadline_after(duration<double>(0.5));
    EXPECT_GE(*d, before + 500ms);
    EXPECT_FALSE(mp::detail::expired(std::nullopt));
    EXPECT_TRUE(mp::detail::expired(steady_clock::now() - 1ms));
    auto s = mp::detail::deadline_at(system_clock::now() + 1h);
    EXPECT_GT(*s, before + 59min);
    // Time points far from now, of any clock and duration: a past one is a deadline now (poll
    // once), a far one is none. `when - now` in the common duration, or a cast of a coarse max()
    // to nanoseconds, overflowed: min() waited without limit, max() failed at once.
    const auto passed = [](mp::detail::Deadline dl) { return dl && *dl <= steady_clock::now(); };
    EXPECT_TRUE(passed(mp::detail::deadline_at(system_clock::time_point::min())));
    EXPECT_TRUE(passed(mp::detail::deadline_at(steady_clock::time_point::min())));
    EXPECT_TRUE(passed(mp::detail::deadline_at(time_point<system_clock, hours>::min())));
    EXPECT_TRUE(passed(mp::detail::deadline_at(time_point<steady_clock, seconds>::min())));
    EXPECT_TRUE(passed(mp::detail::deadline_at(system_clock::now() - 1s)));
    EXPECT_TRUE(passed(mp::detail::deadline_at(time_point<system_clock, duration<double>>(duration<double>(NAN)))));
    EXPECT_EQ(mp::detail::deadline_at(system_clock::time_point::max()), std::nullopt);
    EXPECT_EQ(mp::detail::deadline_at(steady_clock::time_point::max()), std::nullopt);
    EXPECT_EQ(mp::detail::deadline_at(time_point<system_clock, hours>::max()), std::nullopt);
    EXPECT_EQ(mp::detail::deadline_at(time_point<steady_clock, seconds>::max()), std::nullopt);
    // A steady time point in range is kept, rounded up to the clock's tick.
    const auto at = steady_clock::now() + 1h;
    EXPECT_EQ(mp::detail::deadline_at(at), at);
    const auto coarse = time_point_cast<seconds>(steady_clock::now()) + 1h;
    EXPECT_EQ(mp::detail::deadline_at(coarse), time_point_cast<steady_clock::duration>(coarse));
}

// The *_until calls with those time points: one long past polls once (false at once, though the
// semaphore is released later), one far ahead waits without limit (true once it is released).
TEST(SyncFutex, UntilTimePointsFarFromNowPollOrWaitWithoutLimit) {
    using namespace std::chrono;
    mp::Semaphore sem(0);
    {
        // Should a past time point wait after all, a release ends it (and the test fails).
        std::promise<void> done;
        std::thread rescue([&sem, f = done.get_future()] {
            if (f.wait_for(2s) == std::future_status::timeout) {
                sem.release();
                sem.release();
            }
        });
        EXPECT_FALSE(sem.try_lock_until(system_clock::time_point::min()));
        EXPECT_FALSE(sem.try_lock_until(time_point<steady_clock, seconds>::min()));
        done.set_value();
        rescue.join();
    }
    for (const bool steady : {true, false}) {
        std::thread releaser([&sem] {
            std::this_thread::sleep_for(100ms);
            sem.release();
        });
        const bool got = steady ? sem.try_lock_until(time_point<steady_clock, seconds>::max())
                                : sem.try_lock_until(time_point<system_clock, hours>::max());
        releaser.join();
        EXPECT_TRUE(got) << (steady ? "steady_clock" : "system_clock");
    }
    mp::Condition cond;
    std::lock_guard hold(cond);
    EXPECT_FALSE(cond.wait_until(system_clock::time_point::min()));
}

// ============================================================================ Lock

TEST(SyncLock, PythonTestLock) {
    mp::Lock lock;
    EXPECT_TRUE(lock.acquire());
    EXPECT_FALSE(lock.acquire(false));
    lock.release();
    try {
        lock.release();
        FAIL() << "releasing an unlocked Lock must throw";
    } catch (const std::system_error& e) {
        EXPECT_EQ(code_of(e), std::errc::operation_not_permitted);
        EXPECT_NE(std::string(e.what()).find("released too many times"), std::string::npos);
    }
}

TEST(SyncLock, StandardLockables) {
    mp::Lock a;
    mp::Lock b;
    {
        std::lock_guard g(a);
        EXPECT_TRUE(a.held());
    }
    EXPECT_FALSE(a.held());
    {
        std::unique_lock u(a, 100ms);
        EXPECT_TRUE(u.owns_lock());
    }
    {
        std::scoped_lock s(a, b);
        EXPECT_TRUE(a.held());
        EXPECT_TRUE(b.held());
    }
    EXPECT_TRUE(a.try_lock());
    a.unlock();
}

TEST(SyncLock, TimeoutsWhileAnotherThreadHolds) {
    mp::Lock lock;
    mp::Semaphore held(0), done(0);
    std::thread t([&] {
        lock.lock();
        held.release();
        (void)done.acquire(LONG);
        lock.unlock();
    });
    ASSERT_TRUE(held.acquire(LONG));
    EXPECT_FALSE(lock.try_lock());
    EXPECT_GE(elapsed_of([&] { EXPECT_FALSE(lock.try_lock_for(TIMEOUT1)); }), 0.09);
    EXPECT_FALSE(lock.try_lock_until(std::chrono::system_clock::now() + 50ms));
    EXPECT_FALSE(lock.acquire(TIMEOUT1));
    // A thread that does not hold it may not release it.
    try {
        lock.release();
        FAIL();
    } catch (const std::system_error& e) {
        EXPECT_EQ(code_of(e), std::errc::operation_not_permitted);
    }
    done.release();
    EXPECT_TRUE(lock.try_lock_for(LONG));
    lock.unlock();
    t.join();
}

TEST(SyncLock, SelfDeadlockIsReported) {
    mp::Lock lock;
    lock.lock();
    try {
        lock.lock();
        FAIL() << "a blocking re-acquire by the holder would hang";
    } catch (const std::system_error& e) {
        EXPECT_EQ(code_of(e), std::errc::resource_deadlock_would_occur);
    }
    // As Python: a timed acquire by the holder waits its timeout and fails.
    EXPECT_GE(elapsed_of([&] { EXPECT_FALSE(lock.acquire(TIMEOUT1)); }), 0.09);
    lock.unlock();
}

TEST(SyncLock, CopiesShareTheLock) {
    mp::Lock a;
    mp::Lock b = a;
    a.lock();
    EXPECT_TRUE(b.held());
    EXPECT_FALSE(b.try_lock());
    b.unlock();
    EXPECT_FALSE(a.held());
}

TEST(SyncLock, HolderThreadExitIsReported) {
    mp::Lock lock;
    std::thread([&] { lock.lock(); }).join();
    // The thread has ended, so the lock is free at once (recovered) for a single try.
    ASSERT_TRUE(lock.try_lock());
    EXPECT_TRUE(lock.owner_died());
    lock.unlock();
}

// mp's locks link themselves into the same per-thread robust-futex list as glibc's robust
// pthread mutexes (a thread has one list). A holder that takes mp locks and pthread robust
// mutexes interleaved, releases some out of order, and dies holding the rest must leave every
// one it still held marked dead, and none of those it released. Fork only by nature: the pthread
// mutexes live in an anonymous shared mapping of the test's, which only a fork child shares.
TEST(SyncLock, HolderKilledHoldingLocksAndPthreadMutexesInterleavedRecoversEach) {
    struct PMutexes {
        pthread_mutex_t m[2];
    };
    Shared<PMutexes> pm;
    for (auto& m : pm->m) {
        pthread_mutexattr_t a;
        ASSERT_EQ(pthread_mutexattr_init(&a), 0);
        ASSERT_EQ(pthread_mutexattr_setpshared(&a, PTHREAD_PROCESS_SHARED), 0);
        ASSERT_EQ(pthread_mutexattr_setrobust(&a, PTHREAD_MUTEX_ROBUST), 0);
        ASSERT_EQ(pthread_mutex_init(&m, &a), 0);
        pthread_mutexattr_destroy(&a);
    }
    mp::Lock a, b, c, d;
    mp::RLock r;
    mp::Semaphore holding(0);
    auto p = spawn([&] {
        a.lock();
        require(pthread_mutex_lock(&pm->m[0]) == 0, 2);
        b.lock();
        r.lock();
        r.lock();
        require(pthread_mutex_lock(&pm->m[1]) == 0, 3);
        c.lock();
        d.lock();
        // Out of order: from the middle, the newest, and glibc's own between mp's.
        b.unlock();
        d.unlock();
        require(pthread_mutex_unlock(&pm->m[0]) == 0, 4);
        r.unlock();  // still held once
        holding.release();
        std::this_thread::sleep_for(60s);
    });
    ASSERT_TRUE(holding.acquire(LONG));
    kill_and_join(*p);
    for (mp::Lock* l : {&a, &c}) {
        ASSERT_TRUE(l->acquire(LONG));
        EXPECT_TRUE(l->owner_died());
        l->release();
    }
    for (mp::Lock* l : {&b, &d}) {
        ASSERT_TRUE(l->acquire(LONG));
        EXPECT_FALSE(l->owner_died());
        l->release();
    }
    ASSERT_TRUE(r.acquire(LONG));
    EXPECT_TRUE(r.owner_died());
    EXPECT_EQ(r.recursion_count(), 1u);
    r.release();
    EXPECT_EQ(pthread_mutex_lock(&pm->m[0]), 0);
    EXPECT_EQ(pthread_mutex_unlock(&pm->m[0]), 0);
    ASSERT_EQ(pthread_mutex_lock(&pm->m[1]), EOWNERDEAD);
    EXPECT_EQ(pthread_mutex_consistent(&pm->m[1]), 0);
    EXPECT_EQ(pthread_mutex_unlock(&pm->m[1]), 0);
    for (auto& m : pm->m) pthread_mutex_destroy(&m);
}

// The same within one process: threads that end holding locks, while this thread's own list
// (shared with glibc) stays intact for the locks it takes around them.
TEST(SyncLock, ThreadsEndingHoldingLocksLeaveTheOtherListsIntact) {
    mp::Lock mine, theirs1, theirs2;
    mp::RLock r;
    mine.lock();
    std::thread([&] {
        theirs1.lock();
        r.lock();
        theirs2.lock();
        r.unlock();
    }).join();
    for (mp::Lock* l : {&theirs1, &theirs2}) {
        ASSERT_TRUE(l->try_lock());
        EXPECT_TRUE(l->owner_died());
        l->unlock();
    }
    ASSERT_TRUE(r.acquire(false));
    EXPECT_FALSE(r.owner_died());
    r.release();
    EXPECT_TRUE(mine.held());
    mine.unlock();
    ASSERT_TRUE(mine.try_lock());
    EXPECT_FALSE(mine.owner_died());
    mine.unlock();
}

// ============================================================================ RLock

// RLock's repr in Python: (holder, count) = (own name, depth), ('SomeOtherThread', nonzero),
// ('None', 0).
TEST(SyncRLock, LockedHolderAndCount) {
    mp::RLock lock;
    EXPECT_FALSE(lock.locked());
    EXPECT_EQ(lock.holder(), mp::LockHolder::none);
    EXPECT_EQ(lock.recursion_count(), 0u);
    ASSERT_TRUE(lock.acquire());
    ASSERT_TRUE(lock.acquire());
    EXPECT_TRUE(lock.locked());
    EXPECT_EQ(lock.holder(), mp::LockHolder::this_thread);
    EXPECT_EQ(lock.recursion_count(), 2u);
    std::thread t([&] {
        EXPECT_TRUE(lock.locked());
        EXPECT_EQ(lock.holder(), mp::LockHolder::other_thread);
        EXPECT_EQ(lock.recursion_count(), 0u);
    });
    t.join();
    lock.release();
    EXPECT_TRUE(lock.locked());
    EXPECT_EQ(lock.recursion_count(), 1u);
    lock.release();
    EXPECT_FALSE(lock.locked());
    EXPECT_EQ(lock.holder(), mp::LockHolder::none);
}

TEST(SyncRLock, PythonTestRLock) {
    mp::RLock lock;
    EXPECT_TRUE(lock.acquire());
    EXPECT_TRUE(lock.acquire());
    EXPECT_TRUE(lock.acquire());
    EXPECT_EQ(lock.recursion_count(), 3u);
    lock.release();
    lock.release();
    lock.release();
    EXPECT_EQ(lock.recursion_count(), 0u);
    EXPECT_THROW(lock.release(), std::system_error);
    { std::lock_guard g(lock); }
}

TEST(SyncRLock, ReleaseByNonOwnerThrows) {
    mp::RLock lock;
    lock.acquire();
    std::thread([&] {
        try {
            lock.release();
            ADD_FAILURE() << "a non-owner released the RLock";
        } catch (const std::system_error& e) {
            EXPECT_EQ(code_of(e), std::errc::operation_not_permitted);
        }
        EXPECT_FALSE(lock.try_lock());
        EXPECT_FALSE(lock.try_lock_for(TIMEOUT1));
    }).join();
    lock.release();
}

// ============================================================================ Semaphore

namespace {
void python_test_semaphore(mp::Semaphore& sem) {
    EXPECT_EQ(sem.get_value(), 2);
    EXPECT_TRUE(sem.acquire());
    EXPECT_EQ(sem.get_value(), 1);
    EXPECT_TRUE(sem.acquire());
    EXPECT_EQ(sem.get_value(), 0);
    EXPECT_FALSE(sem.acquire(false));
    EXPECT_EQ(sem.get_value(), 0);
    sem.release();
    EXPECT_EQ(sem.get_value(), 1);
    sem.release();
    EXPECT_EQ(sem.get_value(), 2);
}
}  // namespace

TEST(SyncSemaphore, PythonTestSemaphore) {
    mp::Semaphore sem(2);
    python_test_semaphore(sem);
    sem.release();
    EXPECT_EQ(sem.get_value(), 3);
    sem.release();
    EXPECT_EQ(sem.get_value(), 4);
}

TEST(SyncSemaphore, PythonTestBoundedSemaphore) {
    mp::BoundedSemaphore sem(2);
    python_test_semaphore(sem);
    try {
        sem.release();
        FAIL() << "over-release of a BoundedSemaphore must throw";
    } catch (const std::system_error& e) {
        EXPECT_EQ(code_of(e), std::errc::value_too_large);
    }
    EXPECT_EQ(sem.get_value(), 2);
}

// Python's BoundedSemaphore(0).release() raises ValueError: a bound of zero is a bound.
TEST(SyncSemaphore, BoundedSemaphoreOfZeroRefusesEveryRelease) {
    mp::BoundedSemaphore sem(0);
    for (int i = 0; i < 2; ++i) {
        try {
            sem.release();
            FAIL() << "release() of a BoundedSemaphore(0) must throw";
        } catch (const std::system_error& e) {
            EXPECT_EQ(code_of(e), std::errc::value_too_large);
        }
        EXPECT_EQ(sem.get_value(), 0);
    }
    EXPECT_FALSE(sem.acquire(false));
    // A plain Semaphore(0) is not bounded.
    mp::Semaphore plain(0);
    plain.release();
    plain.release();
    EXPECT_EQ(plain.get_value(), 2);
}

TEST(SyncSemaphore, PythonTestTimeout) {
    mp::Semaphore sem(0);
    EXPECT_FALSE(sem.acquire(false));
    EXPECT_GE(elapsed_of([&] { EXPECT_FALSE(sem.acquire(TIMEOUT2)); }), 0.19);
    EXPECT_GE(elapsed_of([&] { EXPECT_FALSE(sem.try_lock_for(TIMEOUT1)); }), 0.09);
    EXPECT_FALSE(sem.try_lock_until(std::chrono::system_clock::now() + 10ms));
    EXPECT_FALSE(sem.acquire(-1s));
}

TEST(SyncSemaphore, InvalidInitialValue) {
    EXPECT_THROW(mp::Semaphore(-1), std::invalid_argument);
    EXPECT_THROW(mp::BoundedSemaphore(-1), std::invalid_argument);
}

// ============================================================================ Condition

namespace {
// Python's _TestCondition.f.
void cond_f(mp::Condition& cond, mp::Semaphore& sleeping, mp::Semaphore& woken,
            std::optional<std::chrono::milliseconds> timeout = std::nullopt) {
    cond.acquire();
    sleeping.release();
    if (timeout)
        (void)cond.wait(*timeout);
    else
        cond.wait();
    woken.release();
    cond.release();
}
}  // namespace

TEST(SyncCondition, NotifyDoesNotWakeLaterWaiters) {
    mp::Condition cond;
    mp::Semaphore sleeping(0), woken(0);
    std::thread first([&] { cond_f(cond, sleeping, woken); });
    ASSERT_TRUE(sleeping.acquire(LONG));
    cond.acquire();
    cond.notify();  // granted to `first`, which cannot run until we release the lock
    cond.release();
    std::thread second([&] { cond_f(cond, sleeping, woken); });
    ASSERT_TRUE(sleeping.acquire(LONG));
    EXPECT_EQ(reaches([&] { return woken.get_value(); }, 1), 1);
    std::this_thread::sleep_for(DELTA);
    EXPECT_EQ(woken.get_value(), 1);
    first.join();
    {
        std::lock_guard g(cond);
        cond.notify();
    }
    second.join();
}

TEST(SyncCondition, PythonTestTimeout) {
    mp::Condition cond;
    cond.acquire();
    bool res = true;
    EXPECT_GE(elapsed_of([&] { res = cond.wait(TIMEOUT1); }), 0.09);
    EXPECT_TRUE(cond.try_lock());  // RLock: held again after the wait
    cond.release();
    cond.release();
    EXPECT_FALSE(res);
}

TEST(SyncCondition, WaitAndNotifyRequireTheLock) {
    mp::Condition c;
    try {
        c.wait();
        FAIL();
    } catch (const std::system_error& e) {
        EXPECT_EQ(code_of(e), std::errc::operation_not_permitted);
    }
    EXPECT_THROW((void)c.wait(10ms), std::system_error);
    EXPECT_THROW(c.notify(), std::system_error);
    EXPECT_THROW(c.notify_all(), std::system_error);
}

TEST(SyncCondition, WaitRestoresRecursionLevel) {
    mp::RLock lock;
    mp::Condition c(lock);
    lock.acquire();
    lock.acquire();
    c.acquire();
    EXPECT_EQ(lock.recursion_count(), 3u);
    std::thread t([&] {
        // The waiter released every level, so this thread can take the lock.
        std::lock_guard g(c);
        c.notify();
    });
    c.wait();
    EXPECT_EQ(lock.recursion_count(), 3u);
    t.join();
    lock.release();
    lock.release();
    lock.release();
    EXPECT_FALSE(lock.held());
}

TEST(SyncCondition, TimeoutsRacingNotifiesKeepCountsExact) {
    // Waiters with tiny timeouts race notify(1): afterwards a single fresh waiter must still be
    // woken by exactly one notify (the waiting/signal counts did not drift).
    mp::Condition cond;
    std::atomic<bool> stop{false};
    std::vector<std::thread> ts;
    for (int i = 0; i < 4; ++i)
        ts.emplace_back([&, i] {
            while (!stop) {
                std::lock_guard g(cond);
                (void)cond.wait(std::chrono::microseconds(50 + 10 * i));
            }
        });
    auto end = Clock::now() + 300ms;
    while (Clock::now() < end) {
        std::lock_guard g(cond);
        cond.notify(1);
    }
    stop = true;
    for (auto& t : ts) t.join();
    mp::Semaphore sleeping(0), woken(0);
    std::thread w([&] { cond_f(cond, sleeping, woken); });
    ASSERT_TRUE(sleeping.acquire(LONG));
    {
        std::lock_guard g(cond);
        cond.notify(1);
    }
    EXPECT_TRUE(woken.acquire(LONG));
    w.join();
}

// ============================================================================ Event

TEST(SyncEvent, SetThenClearStillWakesWaiter) {
    mp::Event event;
    mp::Semaphore waiting(0);
    std::atomic<pid_t> tid{0};
    std::atomic<bool> woken{false};
    std::thread t([&] {
        tid = static_cast<pid_t>(::syscall(SYS_gettid));
        waiting.release();
        // Longer than the check below: its timeout would also return true (the word changed).
        EXPECT_TRUE(event.wait(2 * LONG));
        woken = true;
    });
    ASSERT_TRUE(waiting.acquire(LONG));
    // set() then clear() must wake a waiter already asleep in event.wait(), so wait until it is:
    // its only process-shared futex wait after the release above.
    ASSERT_TRUE(asleep_in_shared_futex_wait(tid.load(), LONG)) << "the waiter never slept in event.wait()";
    event.set();
    event.clear();
    EXPECT_TRUE(reaches([&] { return woken.load(); }, true)) << "set() then clear() did not wake the waiter";
    t.join();
    EXPECT_FALSE(event.is_set());
}

// ============================================================================ Barrier

namespace {

constexpr int N = 5;
}  // namespace

TEST(SyncBarrier, ThrowingActionBreaksTheBarrier) {
    mp::Barrier barrier(2, [] { throw std::runtime_error("action failed"); });
    std::thread t([&] { EXPECT_THROW((void)barrier.wait(LONG), mp::BrokenBarrierError); });
    // This thread must arrive last, so that it runs the action.
    ASSERT_EQ(reaches([&] { return barrier.n_waiting(); }, 1), 1);
    EXPECT_THROW((void)barrier.wait(LONG), std::runtime_error);
    t.join();
    EXPECT_TRUE(barrier.broken());
}

TEST(SyncBarrier, PythonTestSingleThread) {
    mp::Barrier b(1);
    EXPECT_EQ(b.wait(), 0);
    EXPECT_EQ(b.wait(), 0);
    EXPECT_EQ(b.parties(), 1);
    EXPECT_THROW(mp::Barrier(0), std::invalid_argument);
}

TEST(SyncBarrier, WaitInsideItsOwnActionIsReported) {
    mp::Barrier* self = nullptr;
    mp::Barrier barrier(1, [&] { (void)self->wait(1s); });
    self = &barrier;
    try {
        (void)barrier.wait(LONG);
        ADD_FAILURE() << "wait() inside the action returned";
    } catch (const std::system_error& e) {
        EXPECT_EQ(code_of(e), std::errc::resource_deadlock_would_occur) << e.what();
    }
    EXPECT_TRUE(barrier.broken());  // a throwing action breaks the barrier
}

// ============================================================================ Codecs

namespace {
template <class T>
T round_trip(const T& v, std::vector<int>& fds_out) {
    mp::Encoder e;
    e.put(v);
    std::string bytes = e.take();
    // Duplicate the descriptors as SCM_RIGHTS would.
    fds_out.clear();
    for (int fd : e.fds()) fds_out.push_back(::fcntl(fd, F_DUPFD_CLOEXEC, 0));
    mp::Decoder d(bytes, fds_out);
    T out = d.get<T>();
    d.finish();
    for (int fd : fds_out)
        if (fd >= 0) ::close(fd);
    return out;
}
}  // namespace

TEST(SyncCodec, RoundTripInOneProcessSharesTheObject) {
    std::vector<int> fds;
    mp::Lock lock;
    mp::Lock lock2 = round_trip(lock, fds);
    lock.lock();
    EXPECT_TRUE(lock2.held());  // the same mapping, so locking through either is safe
    lock2.unlock();

    mp::BoundedSemaphore sem(1);
    auto sem2 = round_trip(sem, fds);
    EXPECT_TRUE(sem2.acquire(false));
    EXPECT_EQ(sem.get_value(), 0);
    sem.release();
    EXPECT_THROW(sem2.release(), std::system_error);

    mp::Event ev;
    round_trip(ev, fds).set();
    EXPECT_TRUE(ev.is_set());

    mp::Condition cond;
    auto cond2 = round_trip(cond, fds);
    cond2.acquire();
    cond.notify();  // same lock
    cond.release();

    mp::Barrier b(1);
    EXPECT_EQ(round_trip(b, fds).wait(), 0);
}

TEST(SyncCodec, WrongKindOrMissingFdIsADecodeError) {
    mp::Lock lock;
    mp::Encoder e;
    e.put(lock);
    std::string bytes = e.take();
    {
        std::vector<int> fds{::fcntl(e.fds()[0], F_DUPFD_CLOEXEC, 0)};
        mp::Decoder d(bytes, fds);
        EXPECT_THROW((void)d.get<mp::Semaphore>(), mp::DecodeError);
        for (int fd : fds)
            if (fd >= 0) ::close(fd);
    }
    {
        mp::Decoder d(bytes);
        EXPECT_THROW((void)d.get<mp::Lock>(), mp::DecodeError);
    }
    // An fd that is not a synchronisation object at all.
    {
        int fd = ::memfd_create("not-a-lock", MFD_CLOEXEC);
        ASSERT_GE(fd, 0);
        ASSERT_EQ(::ftruncate(fd, 4096), 0);
        std::vector<int> fds{fd};
        mp::Decoder d(bytes, fds);
        EXPECT_THROW((void)d.get<mp::Lock>(), mp::DecodeError);
        for (int f : fds)
            if (f >= 0) ::close(f);
    }
}

TEST(SyncCodec, CapturingBarrierActionCannotBeSent) {
    int x = 0;
    mp::Barrier b(2, [&x] { ++x; });
    mp::Encoder e;
    EXPECT_THROW(e.put(b), mp::Error);
}

// ---- Passed as arguments: the objects travel as memfds (over a socket to a forkserver or spawn
// child).

namespace {
void fs_hold_lock(mp::Lock lock, mp::Semaphore holding) {
    lock.lock();
    holding.release();
    std::this_thread::sleep_for(60s);
}
void fs_release(mp::Semaphore sem) { sem.release(); }
void fs_set(mp::Event ev) { ev.set(); }
void fs_notify(mp::Condition c, mp::Semaphore ready) {
    ready.release();
    std::lock_guard g(c);
    c.notify_all();
}
void fs_barrier(mp::Barrier b, mp::Semaphore out) {
    out.release();
    (void)b.wait();
    out.release();
}
void fs_count(mp::Lock lock, mp::RLock rlock, mp::BoundedSemaphore bsem) {
    std::lock_guard g(lock);
    std::lock_guard g2(rlock);
    if (!bsem.acquire(false)) throw std::runtime_error("no permit");
}
int action_runs = 0;
void barrier_action() { ++action_runs; }
}  // namespace

// Under forkserver and spawn alike: the primitives travel as descriptors with the task.
static void primitives_as_arguments(const mp::ProcessOptions& how) {
    mp::Semaphore sem(0);
    mp::Process p1(how, fs_release, sem);
    p1.start();
    EXPECT_TRUE(sem.acquire(LONG));
    join_ok(p1);

    mp::Event ev;
    mp::Process p2(how, fs_set, ev);
    p2.start();
    EXPECT_TRUE(ev.wait(LONG));
    join_ok(p2);

    mp::Lock lock;
    mp::RLock rlock;
    mp::BoundedSemaphore bsem(1);
    mp::Process p3(how, fs_count, lock, rlock, bsem);
    p3.start();
    join_ok(p3);
    EXPECT_EQ(bsem.get_value(), 0);
    EXPECT_TRUE(lock.try_lock());
    lock.unlock();

    mp::Condition cond;
    mp::Semaphore ready(0);
    {
        std::unique_lock u(cond);
        mp::Process p4(how, fs_notify, cond, ready);
        p4.start();
        ASSERT_TRUE(ready.acquire(LONG));
        EXPECT_TRUE(cond.wait(LONG));
        u.unlock();
        join_ok(p4);
    }
}

// Every start method: the suites below run as StartMethods/<Suite>.<Test>/{fork,forkserver,spawn}.
namespace {
class SyncPrimitivesAcross : public mp::test::StartMethodTest {};
MP_INSTANTIATE_START_METHODS(SyncPrimitivesAcross);
class SyncLockAcross : public mp::test::StartMethodTest {};
MP_INSTANTIATE_START_METHODS(SyncLockAcross);

// A waiter pinned to `cpu` at SCHED_IDLE that takes `lock` and gives it back.
void acquire_pinned_at_idle(mp::Lock lock, int cpu) {
    if (!mp::test::pin_at_idle(cpu)) std::_Exit(3);
    // Its own deadline (which would also end a lost wake-up) well past the test's join(LONG).
    if (!lock.acquire(3 * LONG)) std::_Exit(4);
    lock.release();
}
}  // namespace

// A waiter survives a wake-up lost with a killed waiter (glibc's robust mutexes can lose one:
// the unlock clears FUTEX_WAITERS and wakes one waiter; if that one is killed before it runs
// while another thread takes the free lock on the fast path, nobody wakes the other waiters,
// which would sleep on a free lock). This test is that other thread: it holds the lock while two
// children queue up on it, releases, takes it back with try_lock before the woken child runs
// (both are pinned to this CPU at SCHED_IDLE, so a wake-up never preempts the test), kills that
// child and releases. The survivor must get the lock.
TEST_P(SyncLockAcross, WaiterSurvivesAWakeUpLostWithAKilledWaiter) {
    using mp::test::proc_state;
    const mp::test::RestoreAffinity saved;
    ASSERT_TRUE(saved.restore());
    auto asleep = [](mp::Process& p) { return mp::test::wait_asleep_in_futex(p.pid(), LONG); };
    int staged = 0;
    for (int attempt = 0; attempt < 10 && staged < 3; ++attempt) {
        mp::Lock lock;
        const int cpu = sched_getcpu();
        ASSERT_GE(cpu, 0);
        cpu_set_t one;
        CPU_ZERO(&one);
        CPU_SET(cpu, &one);
        lock.lock();
        auto w1 = std::make_unique<mp::Process>(options(), acquire_pinned_at_idle, lock, cpu);
        w1->start();
        ASSERT_TRUE(asleep(*w1));
        auto w2 = std::make_unique<mp::Process>(options(), acquire_pinned_at_idle, lock, cpu);
        w2->start();
        ASSERT_TRUE(asleep(*w2));
        // From here to the kill this thread runs on the waiters' CPU, which the woken one
        // cannot take from it.
        ASSERT_EQ(sched_setaffinity(0, sizeof one, &one), 0);
        lock.release();  // wakes one waiter
        const bool retaken = lock.try_lock();
        const char s1 = proc_state(w1->pid()), s2 = proc_state(w2->pid());
        mp::Process* woken = nullptr;
        mp::Process* other = nullptr;
        if (retaken && s1 == 'R' && s2 == 'S') woken = w1.get(), other = w2.get();
        if (retaken && s2 == 'R' && s1 == 'S') woken = w2.get(), other = w1.get();
        if (woken != nullptr) kill_and_join(*woken);
        ASSERT_TRUE(saved.restore());
        if (retaken) lock.release();
        if (woken == nullptr) {  // not staged: the woken waiter ran first
            join_ok(*w1);
            join_ok(*w2);
            continue;
        }
        ++staged;
        unpin(other->pid());
        // Without a bounded wait for the mutex, `other` sleeps on a free lock for ever.
        const bool finished = other->join(LONG);
        EXPECT_TRUE(finished) << "the surviving waiter is still waiting for a free lock";
        if (!finished) {
            other->kill();
            other->join();
        } else {
            EXPECT_EQ(other->exitcode(), 0);
        }
    }
    EXPECT_GE(staged, 1) << "the lost wake-up was never staged";
}


TEST_P(SyncPrimitivesAcross, PrimitivesAsArguments) { primitives_as_arguments(options()); }

TEST_P(SyncPrimitivesAcross, BarrierWithTransferableAction) {
    action_runs = 0;
    mp::Barrier b(2, barrier_action);
    mp::Semaphore out(0);
    mp::Process p(options(), fs_barrier, b, out);
    p.start();
    ASSERT_TRUE(out.acquire(LONG));
    // Let the child arrive first, so that this process is the last party and runs the action.
    EXPECT_EQ(reaches([&] { return b.n_waiting(); }, 1), 1);
    EXPECT_EQ(b.wait(LONG), 1);
    EXPECT_EQ(action_runs, 1);
    ASSERT_TRUE(out.acquire(LONG));
    join_ok(p);
}

// ---- A process that ends holding a lock is a dead owner under every start method (a forkserver
// child destroys the target's arguments on its way out, a fork child does not).

namespace {
void lock_locked_child(mp::Lock lock, mp::Event event, mp::Value<std::int8_t> res) {
    (void)lock.acquire();
    res.set(lock.held() ? 1 : 0);  // Python's lock.locked()
    event.set();
}

void hold_and_throw(mp::Lock lock, mp::RLock rlock, mp::Event event) {
    (void)lock.acquire();
    (void)rlock.acquire();
    (void)rlock.acquire();
    event.set();
    throw std::runtime_error("leaving with the locks held (the test expects this)");
}

void nothing() {}

// The forkserver is forked from this process when it first starts a child: objects created
// before that are known to it (and to its children) already, so a child would not be the only
// holder of its handles. Real programs start it early (a pool does): start it before the objects.
void start_method_ready(const mp::ProcessOptions& how) {
    mp::Process p(how, nothing);
    p.start();
    join_ok(p);
}

// CPython: _TestLock.test_lock_locked_2processes. The child leaves holding the lock: Python's
// lock stays locked; mp's goes to the next acquirer, which is told its owner died.
void test_lock_locked_2processes(const mp::ProcessOptions& how) {
    start_method_ready(how);
    mp::Lock lock;
    mp::Event event;
    mp::Value<std::int8_t> res(0);
    mp::Process p(how, lock_locked_child, lock, event, res);
    p.start();
    ASSERT_TRUE(event.wait(LONG));
    EXPECT_EQ(res.get(), 1);
    join_ok(p);
    ASSERT_TRUE(lock.try_lock_for(LONG));
    EXPECT_TRUE(lock.owner_died());
    lock.unlock();
}

void target_throws_holding_locks(const mp::ProcessOptions& how) {
    start_method_ready(how);
    mp::Lock lock;
    mp::RLock rlock;
    mp::Event event;
    mp::Process p(how, hold_and_throw, lock, rlock, event);
    p.start();
    ASSERT_TRUE(event.wait(LONG));
    join_ok(p, 1);
    ASSERT_TRUE(lock.try_lock_for(LONG));
    EXPECT_TRUE(lock.owner_died());
    lock.unlock();
    ASSERT_TRUE(rlock.try_lock_for(LONG));
    EXPECT_TRUE(rlock.owner_died());
    EXPECT_EQ(rlock.recursion_count(), 1u);
    rlock.unlock();
}
}  // namespace

TEST_P(SyncLockAcross, TestLock_test_lock_locked_2processes) { test_lock_locked_2processes(options()); }

TEST_P(SyncLockAcross, TargetThrowingHoldingTheLockIsADeadOwner) {
    target_throws_holding_locks(options());
}

// Fork only by nature: the child drops its copy of the very handle object the parent holds,
// which only fork makes (a forkserver or spawn child decodes a handle of its own).
TEST(SyncLock, LastHandleGoingDoesNotReleaseTheLock) {
    // This process's only handle lives in `only`; the fork child drops its copy of it while
    // holding the lock, then ends.
    std::optional<mp::Lock> only(std::in_place);
    auto p = spawn([&] {
        require(only->acquire(), 2);
        only.reset();
    });
    join_ok(*p);
    ASSERT_TRUE(only->try_lock_for(LONG));
    EXPECT_TRUE(only->owner_died());
    only->unlock();
}

// ---- The cross-process tests of each primitive, under every start method: the children are
// transferable functions that get the primitives, and the shared counters they report through,
// as arguments.

namespace {
class SyncRLockAcross : public mp::test::StartMethodTest {};
MP_INSTANTIATE_START_METHODS(SyncRLockAcross);
class SyncSemaphoreAcross : public mp::test::StartMethodTest {};
MP_INSTANTIATE_START_METHODS(SyncSemaphoreAcross);
class SyncEventAcross : public mp::test::StartMethodTest {};
MP_INSTANTIATE_START_METHODS(SyncEventAcross);
class SyncConditionAcross : public mp::test::StartMethodTest {};
MP_INSTANTIATE_START_METHODS(SyncConditionAcross);

// Counters in shared memory that a child of any start method adds to.
using Tally = mp::RawArray<int>;
void bump(const Tally& c, std::size_t i = 0) { std::atomic_ref<int>(c[i]).fetch_add(1); }

// Starts a child running f(args...) with the given options.
template <class F, class... Args>
std::unique_ptr<mp::Process> start(const mp::ProcessOptions& how, F f, Args... args) {
    auto p = std::make_unique<mp::Process>(how, f, std::move(args)...);
    p->start();
    return p;
}

void add_under_lock(mp::Lock lock, mp::RawValue<long> counter, int n, mp::Barrier start_line) {
    // Together, or a spawn child's start-up outlasts the others' whole loop.
    require(start_line.wait(LONG) >= 0, 2);
    for (int i = 0; i < n; ++i) {
        std::lock_guard g(lock);
        // A non-atomic read-modify-write: only the lock keeps increments from being lost.
        volatile long& c = counter.get_obj();
        c = c + 1;
    }
}

void wait_for_dead_holder(mp::Lock lock, mp::RawValue<int> seen) {
    require(lock.acquire(LONG), 2);  // blocks in the kernel until the holder dies
    seen.set(lock.owner_died() ? 1 : 2);
    lock.release();
}

void hold_rlock_thrice(mp::RLock lock, mp::Semaphore holding) {
    for (int i = 0; i < 3; ++i) (void)lock.acquire();
    holding.release();
    std::this_thread::sleep_for(60s);
}

// What a waiting child waits for: a Semaphore's permit or an Event's setting.
bool await_for(mp::Semaphore& sem, std::chrono::seconds timeout) { return sem.acquire(timeout); }
bool await_for(mp::Event& event, std::chrono::seconds timeout) { return event.wait(timeout); }

template <class P>
void await_and_count(P p, Tally woken) {
    require(await_for(p, LONG), 2);
    bump(woken);
}

template <class P>
void await_or_exit_2(P p) {
    require(await_for(p, LONG), 2);
}

template <class P>
void await_until_killed(P p, mp::Semaphore ready) {
    ready.release();
    (void)await_for(p, 60s);
    ::_exit(7);  // not reached: killed first (or woken, which the test would notice)
}

void set_after(mp::Event event, std::chrono::milliseconds pause) {
    std::this_thread::sleep_for(pause);
    event.set();
}
}  // namespace

TEST_P(SyncLockAcross, MutualExclusionAcrossProcesses) {
    mp::Lock lock;
    mp::RawValue<long> counter(0);
    constexpr int n = 100000;
    mp::Barrier start_line(3);
    auto p1 = start(options(), add_under_lock, lock, counter, n, start_line);
    auto p2 = start(options(), add_under_lock, lock, counter, n, start_line);
    add_under_lock(lock, counter, n, start_line);
    join_ok(*p1);
    join_ok(*p2);
    EXPECT_EQ(counter.get(), 3L * n);
}

TEST_P(SyncLockAcross, HolderKilledIsRecoveredAndReported) {
    mp::Lock lock;
    mp::Semaphore holding(0);
    auto p = start(options(), fs_hold_lock, lock, holding);
    ASSERT_TRUE(holding.acquire(LONG));
    EXPECT_FALSE(lock.try_lock());
    kill_and_join(*p);
    ASSERT_TRUE(lock.acquire(LONG));
    EXPECT_TRUE(lock.owner_died());
    lock.release();
    // Consistent again: the next holder hears nothing.
    {
        std::lock_guard g(lock);
        EXPECT_FALSE(lock.owner_died());
    }
}

TEST_P(SyncLockAcross, WaiterIsWokenWhenHolderIsKilled) {
    mp::Lock lock;
    mp::Semaphore holding(0);
    mp::RawValue<int> seen(0);
    auto holder = start(options(), fs_hold_lock, lock, holding);
    ASSERT_TRUE(holding.acquire(LONG));
    auto waiter = start(options(), wait_for_dead_holder, lock, seen);
    std::this_thread::sleep_for(DELTA);
    kill_and_join(*holder);
    join_ok(*waiter);
    EXPECT_EQ(seen.get(), 1);
}

// Python 3.14's Lock.locked(), and who holds it as RLock's repr names the holder: this thread,
// 'SomeOtherThread', 'SomeOtherProcess' or 'None', also after the holder was killed.
TEST_P(SyncLockAcross, LockedAndHolder) {
    mp::Lock lock;
    EXPECT_FALSE(lock.locked());
    EXPECT_EQ(lock.holder(), mp::LockHolder::none);
    ASSERT_TRUE(lock.acquire());
    EXPECT_TRUE(lock.locked());
    EXPECT_EQ(lock.holder(), mp::LockHolder::this_thread);
    std::thread t([&] {
        EXPECT_TRUE(lock.locked());
        EXPECT_EQ(lock.holder(), mp::LockHolder::other_thread);
    });
    t.join();
    lock.release();
    EXPECT_FALSE(lock.locked());
    EXPECT_EQ(lock.holder(), mp::LockHolder::none);

    mp::Semaphore holding(0);
    auto p = start(options(), fs_hold_lock, lock, holding);
    ASSERT_TRUE(holding.acquire(LONG));
    EXPECT_TRUE(lock.locked());
    EXPECT_EQ(lock.holder(), mp::LockHolder::other_process);
    kill_and_join(*p);
    EXPECT_FALSE(lock.locked()) << "a dead holder's lock is free for the next acquirer";
    EXPECT_EQ(lock.holder(), mp::LockHolder::none);
}

TEST_P(SyncRLockAcross, ExclusiveAcrossProcessesAndHolderDeath) {
    mp::RLock lock;
    mp::Semaphore holding(0);
    auto p = start(options(), hold_rlock_thrice, lock, holding);
    ASSERT_TRUE(holding.acquire(LONG));
    EXPECT_FALSE(lock.acquire(false));
    kill_and_join(*p);
    ASSERT_TRUE(lock.acquire(LONG));
    EXPECT_TRUE(lock.owner_died());
    EXPECT_EQ(lock.recursion_count(), 1u);  // the dead holder's depth is not inherited
    lock.release();
    EXPECT_FALSE(lock.held());
}

TEST_P(SyncSemaphoreAcross, LockableAndReleasableByAnotherProcess) {
    mp::Semaphore sem(0);
    auto p = start(options(), fs_release, sem);
    EXPECT_TRUE(sem.acquire(LONG));
    join_ok(*p);
    sem.release();
    {
        std::lock_guard g(sem);
        EXPECT_EQ(sem.get_value(), 0);
    }
    EXPECT_EQ(sem.get_value(), 1);
}

TEST_P(SyncSemaphoreAcross, BlockedWaitersAreWokenOnePerRelease) {
    mp::Semaphore sem(0);
    Tally got(1);
    std::vector<std::unique_ptr<mp::Process>> ps;
    for (int i = 0; i < 3; ++i) ps.push_back(start(options(), await_and_count<mp::Semaphore>, sem, got));
    std::thread t([&] {
        EXPECT_TRUE(sem.acquire(LONG));
        bump(got);
    });
    std::this_thread::sleep_for(DELTA);
    EXPECT_EQ(got.get(0), 0);
    sem.release();
    EXPECT_EQ(reaches([&] { return got.get(0); }, 1), 1);
    for (int i = 0; i < 3; ++i) sem.release();
    EXPECT_EQ(reaches([&] { return got.get(0); }, 4), 4);
    t.join();
    for (auto& p : ps) join_ok(*p);
    EXPECT_EQ(sem.get_value(), 0);
}

namespace {
// A Semaphore waiter pinned to `cpu` at SCHED_IDLE; its own deadline lies well past the test's
// bound (it would also end a lost wake-up, too late for the test).
void acquire_permit_pinned_at_idle(mp::Semaphore sem, int cpu) {
    if (!mp::test::pin_at_idle(cpu)) std::_Exit(3);
    if (!sem.acquire(3 * LONG)) std::_Exit(4);
}
}  // namespace

// release() wakes one sleeper. When that one is killed before it takes the permit, the permit
// stays (value 1) and another live sleeper must still get it: its sleep is cut into slices.
// Staged as in WaiterSurvivesAWakeUpLostWithAKilledWaiter: both waiters are pinned at SCHED_IDLE
// to the CPU this thread runs on while it releases and kills, so neither runs in between; a
// trial counts when the permit is seen still free after the kill.
TEST_P(SyncSemaphoreAcross, PermitOfAWokenWaiterKilledBeforeTakingItGoesToAnother) {
    using mp::test::proc_state;
    const mp::test::RestoreAffinity saved;
    ASSERT_TRUE(saved.restore());
    int staged = 0;
    for (int attempt = 0; attempt < 10 && staged < 2; ++attempt) {
        mp::Semaphore sem(0);
        const int cpu = sched_getcpu();
        ASSERT_GE(cpu, 0);
        cpu_set_t one;
        CPU_ZERO(&one);
        CPU_SET(cpu, &one);
        auto w1 = start(options(), acquire_permit_pinned_at_idle, sem, cpu);
        ASSERT_TRUE(mp::test::wait_asleep_in_futex(w1->pid(), LONG));
        auto w2 = start(options(), acquire_permit_pinned_at_idle, sem, cpu);
        ASSERT_TRUE(mp::test::wait_asleep_in_futex(w2->pid(), LONG));
        ASSERT_EQ(sched_setaffinity(0, sizeof one, &one), 0);
        sem.release();  // wakes one sleeper
        const char s1 = proc_state(w1->pid()), s2 = proc_state(w2->pid());
        mp::Process* woken = nullptr;
        mp::Process* other = nullptr;
        if (s1 == 'R' && s2 == 'S') woken = w1.get(), other = w2.get();
        if (s2 == 'R' && s1 == 'S') woken = w2.get(), other = w1.get();
        if (woken != nullptr) {
            woken->kill();
            ASSERT_TRUE(woken->join(LONG));
        }
        ASSERT_TRUE(saved.restore());
        if (woken == nullptr || woken->exitcode() != -SIGKILL || sem.get_value() != 1) {
            // Not staged (the woken waiter ran first, or took the permit before it died):
            // whoever still waits gets a permit of its own.
            for (auto* p : {w1.get(), w2.get()})
                if (p != woken) sem.release();
            for (auto* p : {w1.get(), w2.get()}) {
                if (p == woken) continue;
                unpin(p->pid());
                join_ok(*p);
            }
            continue;
        }
        ++staged;
        unpin(other->pid());
        const bool finished = other->join(LONG);
        EXPECT_TRUE(finished) << "a permit is free (value " << sem.get_value()
                              << ") but the live waiter still sleeps";
        if (!finished) {
            kill_and_join(*other);
            break;
        }
        EXPECT_EQ(other->exitcode(), 0);
        EXPECT_EQ(sem.get_value(), 0);
    }
    EXPECT_GE(staged, 1) << "the woken waiter always ran before it could be killed";
}

TEST_P(SyncSemaphoreAcross, WaiterKilledDoesNotWedgeOthers) {
    mp::Semaphore sem(0);
    mp::Semaphore ready(0);
    auto victim = start(options(), await_until_killed<mp::Semaphore>, sem, ready);
    ASSERT_TRUE(ready.acquire(LONG));
    std::this_thread::sleep_for(DELTA);
    kill_and_join(*victim);
    auto other = start(options(), await_or_exit_2<mp::Semaphore>, sem);
    std::this_thread::sleep_for(DELTA);
    sem.release();
    join_ok(*other);
    sem.release();
    EXPECT_EQ(sem.get_value(), 1);
    EXPECT_TRUE(sem.acquire(false));
}

TEST_P(SyncEventAcross, PythonTestEvent) {
    mp::Event event;
    EXPECT_FALSE(event.is_set());
    EXPECT_FALSE(event.wait(0s));
    EXPECT_GE(elapsed_of([&] { EXPECT_FALSE(event.wait(TIMEOUT1)); }), 0.09);
    event.set();
    EXPECT_TRUE(event.is_set());
    event.wait();
    EXPECT_TRUE(event.wait(TIMEOUT1));
    event.clear();
    EXPECT_FALSE(event.is_set());
    auto p = start(options(), set_after, event, std::chrono::milliseconds(TIMEOUT2));
    EXPECT_TRUE(event.wait(LONG));
    join_ok(*p);
}

TEST_P(SyncEventAcross, SetWakesEveryWaiter) {
    mp::Event event;
    Tally woken(1);
    std::vector<std::unique_ptr<mp::Process>> ps;
    for (int i = 0; i < 3; ++i) ps.push_back(start(options(), await_and_count<mp::Event>, event, woken));
    std::thread t([&] {
        event.wait();
        bump(woken);
    });
    std::this_thread::sleep_for(DELTA);
    EXPECT_EQ(woken.get(0), 0);
    event.set();
    t.join();
    for (auto& p : ps) join_ok(*p);
    EXPECT_EQ(woken.get(0), 4);
}

TEST_P(SyncEventAcross, WaiterKilledDoesNotWedgeOthers) {
    mp::Event event;
    mp::Semaphore ready(0);
    auto victim = start(options(), await_until_killed<mp::Event>, event, ready);
    ASSERT_TRUE(ready.acquire(LONG));
    std::this_thread::sleep_for(DELTA);
    kill_and_join(*victim);
    auto other = start(options(), await_or_exit_2<mp::Event>, event);
    event.set();
    join_ok(*other);
}

namespace {
void cond_f_child(mp::Condition cond, mp::Semaphore sleeping, mp::Semaphore woken) {
    cond_f(cond, sleeping, woken);
}

void cond_f_timed_child(mp::Condition cond, mp::Semaphore sleeping, mp::Semaphore woken,
                        std::chrono::milliseconds timeout) {
    cond_f(cond, sleeping, woken, timeout);
}

// Python's _TestCondition: three children and three threads of this process run cond_f on
// `cond` without a timeout; returns when all six sleep and none was woken.
void start_six_sleepers(const mp::ProcessOptions& how, mp::Condition& cond,
                        mp::Semaphore& sleeping, mp::Semaphore& woken,
                        std::vector<std::unique_ptr<mp::Process>>& ps,
                        std::vector<std::thread>& ts) {
    for (int i = 0; i < 3; ++i) {
        ps.push_back(start(how, cond_f_child, cond, sleeping, woken));
        ts.emplace_back([&] { cond_f(cond, sleeping, woken); });
    }
    for (int i = 0; i < 6; ++i) ASSERT_TRUE(sleeping.acquire(LONG));
    std::this_thread::sleep_for(DELTA);
    EXPECT_EQ(woken.get_value(), 0);
}

void wait_for_state_4(mp::Condition cond, mp::RawValue<int> state) {
    std::lock_guard g(cond);
    state.set(0);
    cond.notify();
    bool result = cond.wait_for([&] { return state.get() == 4; }, LONG);
    require(result && state.get() == 4, 1);
}

void wait_for_state_4_times_out(mp::Condition cond, mp::RawValue<int> state,
                                mp::RawValue<int> success, mp::Semaphore started) {
    started.release();
    std::lock_guard g(cond);
    auto t0 = Clock::now();
    bool result = cond.wait_for([&] { return state.get() == 4; }, 100ms);
    if (!result && Clock::now() - t0 >= 100ms) success.set(1);
}

void notify_once(mp::Condition cond) {
    std::lock_guard g(cond);
    cond.notify();
}

void set_flag_and_notify_all(mp::Condition cond, mp::RawValue<int> flag) {
    std::unique_lock u(cond);
    flag.set(1);
    cond.notify_all();
}

void notify_and_hang(mp::Condition cond, mp::Semaphore notified) {
    cond.acquire();
    cond.notify();
    notified.release();
    std::this_thread::sleep_for(60s);  // killed while holding the lock
}

// ProducerConsumerStress's one-slot mailbox.
struct Box {
    long value;
    bool full;
    long consumed_sum;
    long consumed;
};
constexpr long per_producer = 2000;

void produce(mp::Condition cond, mp::RawValue<Box> box, long base) {
    Box& b = box.get_obj();
    for (long i = 1; i <= per_producer; ++i) {
        std::unique_lock u(cond);
        require(cond.wait_for([&] { return !b.full; }, LONG), 2);
        b.value = base + i;
        b.full = true;
        cond.notify_all();
    }
}

bool consume(mp::Condition& cond, Box& b, long count) {
    for (long i = 0; i < count; ++i) {
        std::unique_lock u(cond);
        if (!cond.wait_for([&] { return b.full; }, LONG)) return false;
        b.consumed_sum += b.value;
        ++b.consumed;
        b.full = false;
        cond.notify(1 + static_cast<int>(i % 2));
    }
    return true;
}

void consume_child(mp::Condition cond, mp::RawValue<Box> box, long count) {
    require(consume(cond, box.get_obj(), count), 3);
}
}  // namespace

TEST_P(SyncConditionAcross, PythonTestNotify) {
    mp::Condition cond;
    mp::Semaphore sleeping(0), woken(0);
    auto p = start(options(), cond_f_child, cond, sleeping, woken);
    std::thread t([&] { cond_f(cond, sleeping, woken); });
    ASSERT_TRUE(sleeping.acquire(LONG));
    ASSERT_TRUE(sleeping.acquire(LONG));
    std::this_thread::sleep_for(DELTA);
    EXPECT_EQ(woken.get_value(), 0);
    {
        std::lock_guard g(cond);
        cond.notify();
    }
    EXPECT_EQ(reaches([&] { return woken.get_value(); }, 1), 1);
    std::this_thread::sleep_for(DELTA);
    EXPECT_EQ(woken.get_value(), 1);  // exactly one
    {
        std::lock_guard g(cond);
        cond.notify();
    }
    EXPECT_EQ(reaches([&] { return woken.get_value(); }, 2), 2);
    t.join();
    join_ok(*p);
}

TEST_P(SyncConditionAcross, PythonTestNotifyAll) {
    mp::Condition cond;
    mp::Semaphore sleeping(0), woken(0);
    std::vector<std::unique_ptr<mp::Process>> ps;
    std::vector<std::thread> ts;
    // Some that time out.
    for (int i = 0; i < 3; ++i) {
        ps.push_back(start(options(), cond_f_timed_child, cond, sleeping, woken,
                           std::chrono::milliseconds(TIMEOUT1)));
        ts.emplace_back([&] { cond_f(cond, sleeping, woken, TIMEOUT1); });
    }
    for (int i = 0; i < 6; ++i) ASSERT_TRUE(sleeping.acquire(LONG));
    for (int i = 0; i < 6; ++i) ASSERT_TRUE(woken.acquire(LONG));
    EXPECT_EQ(woken.get_value(), 0);
    for (auto& t : ts) t.join();
    for (auto& p : ps) join_ok(*p);
    ps.clear();
    ts.clear();
    // Some that wait for ever.
    start_six_sleepers(options(), cond, sleeping, woken, ps, ts);
    {
        std::lock_guard g(cond);
        cond.notify_all();
    }
    EXPECT_EQ(reaches([&] { return woken.get_value(); }, 6), 6);
    for (auto& t : ts) t.join();
    for (auto& p : ps) join_ok(*p);
}

TEST_P(SyncConditionAcross, PythonTestNotifyN) {
    mp::Condition cond;
    mp::Semaphore sleeping(0), woken(0);
    std::vector<std::unique_ptr<mp::Process>> ps;
    std::vector<std::thread> ts;
    start_six_sleepers(options(), cond, sleeping, woken, ps, ts);
    {
        std::lock_guard g(cond);
        cond.notify(2);
    }
    EXPECT_EQ(reaches([&] { return woken.get_value(); }, 2), 2);
    std::this_thread::sleep_for(DELTA);
    EXPECT_EQ(woken.get_value(), 2);  // exactly two
    {
        std::lock_guard g(cond);
        cond.notify(4);
    }
    EXPECT_EQ(reaches([&] { return woken.get_value(); }, 6), 6);
    {
        std::lock_guard g(cond);
        cond.notify(3);  // nobody left: does nothing
    }
    EXPECT_EQ(woken.get_value(), 6);
    for (auto& t : ts) t.join();
    for (auto& p : ps) join_ok(*p);
}

TEST_P(SyncConditionAcross, PythonTestWaitfor) {
    mp::Condition cond;
    mp::RawValue<int> state(-1);
    auto p = start(options(), wait_for_state_4, cond, state);
    {
        std::lock_guard g(cond);
        EXPECT_TRUE(cond.wait_for([&] { return state.get() == 0; }, LONG));
        EXPECT_EQ(state.get(), 0);
    }
    for (int i = 0; i < 4; ++i) {
        std::this_thread::sleep_for(10ms);
        std::lock_guard g(cond);
        state.set(state.get() + 1);
        cond.notify();
    }
    join_ok(*p);
}

TEST_P(SyncConditionAcross, PythonTestWaitforTimeout) {
    mp::Condition cond;
    mp::RawValue<int> state(0), success(0);
    mp::Semaphore started(0);
    auto p = start(options(), wait_for_state_4_times_out, cond, state, success, started);
    ASSERT_TRUE(started.acquire(LONG));
    for (int i = 0; i < 3; ++i) {
        std::this_thread::sleep_for(10ms);
        std::lock_guard g(cond);
        state.set(state.get() + 1);
        cond.notify();
    }
    join_ok(*p);
    EXPECT_EQ(success.get(), 1);
}

TEST_P(SyncConditionAcross, PythonTestWaitResult) {
    mp::Condition c;
    std::lock_guard g(c);
    EXPECT_FALSE(c.wait(0ms));
    EXPECT_FALSE(c.wait(100ms));
    auto p = start(options(), notify_once, c);
    EXPECT_TRUE(c.wait(LONG));
    join_ok(*p);
}

TEST_P(SyncConditionAcross, WithPlainLockAndUniqueLock) {
    mp::Lock lock;
    mp::Condition c(lock);
    mp::RawValue<int> flag(0);
    auto p = start(options(), set_flag_and_notify_all, c, flag);
    {
        std::unique_lock u(c);
        EXPECT_TRUE(c.wait_for([&] { return flag.get() == 1; }, LONG));
        EXPECT_TRUE(lock.held());
    }
    join_ok(*p);
}

TEST_P(SyncConditionAcross, WaiterKilledDoesNotWedgeOthers) {
    mp::Condition cond;
    mp::Semaphore sleeping(0), woken(0);
    auto victim = start(options(), cond_f_child, cond, sleeping, woken);
    ASSERT_TRUE(sleeping.acquire(LONG));
    std::this_thread::sleep_for(DELTA);  // let it sleep (it released the lock)
    kill_and_join(*victim);
    auto other = start(options(), cond_f_child, cond, sleeping, woken);
    ASSERT_TRUE(sleeping.acquire(LONG));
    {
        std::lock_guard g(cond);
        cond.notify_all();
    }
    join_ok(*other);
    EXPECT_EQ(woken.get_value(), 1);
}

namespace {
// The wake-ups `cond` has granted and no waiter has taken yet, read from its shared state (mapped
// again, read-only, from the descriptor its codec sends).
class GrantedSignals {
public:
    explicit GrantedSignals(const mp::Condition& cond) {
        mp::Encoder e;
        e.put(cond);  // the lock's descriptor, then the condition's
        map_ = ::mmap(nullptr, kSize, PROT_READ, MAP_SHARED, e.fds().at(1), 0);
    }
    ~GrantedSignals() {
        if (map_ != MAP_FAILED) ::munmap(map_, kSize);
    }
    GrantedSignals(const GrantedSignals&) = delete;
    GrantedSignals& operator=(const GrantedSignals&) = delete;
    bool ok() const { return map_ != MAP_FAILED; }
    std::uint32_t get() const {
        const auto* b = static_cast<const Block*>(map_);
        return static_cast<std::uint32_t>(b->core.counts.load() >> 32);
    }

private:
    using Block = mp::detail::sync::Block<mp::detail::sync::CondCore>;
    static constexpr std::size_t kSize = sizeof(Block);
    void* map_ = MAP_FAILED;
};

// A waiter pinned to `cpu` at SCHED_IDLE, waiting (with a deadline well past the test's bound)
// for `flag` as most programs do.
void wait_for_flag_pinned_at_idle(mp::Condition cond, mp::RawValue<int> flag, int cpu) {
    if (!mp::test::pin_at_idle(cpu)) std::_Exit(3);
    std::unique_lock g(cond);
    if (!cond.wait_for([&] { return flag.get() != 0; }, 3 * LONG)) std::_Exit(4);
}
}  // namespace

// notify(1) grants one wake-up and wakes one sleeper. When that one is killed before it takes
// the wake-up, the wake-up stays granted and another waiter that was waiting when notify ran must
// take it (its sleep is cut into slices), not sleep on with its predicate true. Staged as in
// WaiterSurvivesAWakeUpLostWithAKilledWaiter: both waiters are pinned at SCHED_IDLE to the CPU
// this thread runs on while it notifies and kills, so neither runs in between; a trial counts
// when the granted wake-up is seen still untaken after the kill.
TEST_P(SyncConditionAcross, WakeUpOfANotifiedWaiterKilledBeforeTakingItGoesToAnother) {
    using mp::test::proc_state;
    const mp::test::RestoreAffinity saved;
    ASSERT_TRUE(saved.restore());
    int staged = 0;
    for (int attempt = 0; attempt < 10 && staged < 2; ++attempt) {
        mp::Condition cond;
        mp::RawValue<int> flag(0);
        GrantedSignals granted(cond);
        ASSERT_TRUE(granted.ok());
        const int cpu = sched_getcpu();
        ASSERT_GE(cpu, 0);
        cpu_set_t one;
        CPU_ZERO(&one);
        CPU_SET(cpu, &one);
        auto w1 = start(options(), wait_for_flag_pinned_at_idle, cond, flag, cpu);
        ASSERT_TRUE(mp::test::wait_asleep_in_futex(w1->pid(), LONG));
        auto w2 = start(options(), wait_for_flag_pinned_at_idle, cond, flag, cpu);
        ASSERT_TRUE(mp::test::wait_asleep_in_futex(w2->pid(), LONG));
        mp::Process* woken = nullptr;
        mp::Process* other = nullptr;
        bool untaken = false;
        {
            std::lock_guard g(cond);
            ASSERT_EQ(sched_setaffinity(0, sizeof one, &one), 0);
            flag.set(1);
            cond.notify(1);
            const char s1 = proc_state(w1->pid()), s2 = proc_state(w2->pid());
            if (s1 == 'R' && s2 == 'S') woken = w1.get(), other = w2.get();
            if (s2 == 'R' && s1 == 'S') woken = w2.get(), other = w1.get();
            if (woken != nullptr) {
                kill_and_join(*woken);
                untaken = granted.get() == 1;
            }
            ASSERT_TRUE(saved.restore());
        }
        if (woken == nullptr || !untaken) {
            // Not staged: let both finish (one may have taken the only wake-up and died).
            std::lock_guard g(cond);
            cond.notify_all();
        }
        if (woken == nullptr) {
            join_ok(*w1);
            join_ok(*w2);
            continue;
        }
        unpin(other->pid());
        if (!untaken) {
            join_ok(*other);
            continue;
        }
        ++staged;
        const bool finished = other->join(LONG);
        EXPECT_TRUE(finished) << "the live waiter sleeps on with a wake-up granted to nobody alive";
        if (!finished) {
            kill_and_join(*other);
            break;
        }
        EXPECT_EQ(other->exitcode(), 0);
        EXPECT_EQ(granted.get(), 0u);
    }
    EXPECT_GE(staged, 1) << "the killed waiter always took its wake-up first";
}

TEST_P(SyncConditionAcross, LockHolderKilledIsReportedToWaiter) {
    mp::Condition cond;
    mp::Semaphore sleeping(0);
    std::atomic<int> died{0};
    std::thread waiter([&] {
        std::lock_guard g(cond);
        sleeping.release();
        EXPECT_TRUE(cond.wait(LONG));
        died = cond.owner_died() ? 1 : 2;
    });
    ASSERT_TRUE(sleeping.acquire(LONG));
    mp::Semaphore notified(0);
    auto killer = start(options(), notify_and_hang, cond, notified);
    // Killed once it holds the lock and has notified (the waiter then needs that lock back).
    ASSERT_TRUE(notified.acquire(LONG));
    kill_and_join(*killer);
    waiter.join();
    EXPECT_EQ(died.load(), 1);
}

TEST_P(SyncConditionAcross, ProducerConsumerStress) {
    // A one-slot mailbox guarded by a Condition: producers wait for it to empty, consumers for
    // it to fill, and every notify wakes exactly one waiter, so a lost wake-up would stall the
    // run (bounded by LONG) and a double delivery would show in the sums.
    mp::Lock lock;
    mp::Condition cond(lock);
    mp::RawValue<Box> box(Box{});
    auto p1 = start(options(), produce, cond, box, 0L);
    auto p2 = start(options(), produce, cond, box, 1'000'000L);
    auto c1 = start(options(), consume_child, cond, box, per_producer);
    std::thread c2([&] { EXPECT_TRUE(consume(cond, box.get_obj(), per_producer)); });
    c2.join();
    join_ok(*c1);
    join_ok(*p1);
    join_ok(*p2);
    const long expected = 2 * (per_producer * (per_producer + 1) / 2) + per_producer * 1'000'000;
    EXPECT_EQ(box.get_obj().consumed, 2 * per_producer);
    EXPECT_EQ(box.get_obj().consumed_sum, expected);
}

namespace {
class SyncBarrierAcross : public mp::test::StartMethodTest {};
MP_INSTANTIATE_START_METHODS(SyncBarrierAcross);

// Python's Bunch + run_threads: f(args...) runs in N-1 children and in this process.
template <class F, class... Args>
void run_parties(const mp::ProcessOptions& how, F f, const Args&... args) {
    std::vector<std::unique_ptr<mp::Process>> ps;
    for (int i = 0; i < N - 1; ++i) ps.push_back(start(how, f, args...));
    f(args...);
    for (auto& p : ps) join_ok(*p);
}

int load(const Tally& t, std::size_t i = 0) { return t.get(i); }

// Tally slots of the Python tests' Bunch results.
constexpr std::size_t A = 0, B = 1, C = 2;

void barrier10_party(mp::Barrier barrier, Tally r, int passes) {
    for (int i = 0; i < passes; ++i) {
        bump(r, A);
        require(load(r, B) == i * N, 2);
        (void)barrier.wait();
        bump(r, B);
        require(load(r, A) == (i + 1) * N, 3);
        (void)barrier.wait();
    }
    require(barrier.n_waiting() == 0, 4);
    require(!barrier.broken(), 5);
}

void wait_return_party(mp::Barrier barrier, Tally seen) {
    int i = barrier.wait();
    require(i >= 0 && i < N, 2);
    bump(seen, static_cast<std::size_t>(i));
}

void abort_party(mp::Barrier barrier, Tally r) {
    try {
        int i = barrier.wait();
        if (i == N / 2) {
            barrier.abort();
            return;
        }
        (void)barrier.wait();
        bump(r, A);
    } catch (const mp::BrokenBarrierError&) {
        bump(r, B);
    }
}

void reset_party(mp::Barrier barrier, Tally r) {
    int i = barrier.wait();
    if (i == N / 2) {
        auto end = Clock::now() + LONG;
        while (barrier.n_waiting() < N - 1 && Clock::now() < end)
            std::this_thread::sleep_for(1ms);
        barrier.reset();
    } else {
        try {
            (void)barrier.wait();
            bump(r, A);
        } catch (const mp::BrokenBarrierError&) {
            bump(r, B);
        }
    }
    (void)barrier.wait();
    bump(r, C);
}

void abort_and_reset_party(mp::Barrier barrier, mp::Barrier barrier2, Tally r) {
    try {
        int i = barrier.wait();
        if (i == N / 2) throw std::runtime_error("abort");
        (void)barrier.wait();
        bump(r, A);
    } catch (const mp::BrokenBarrierError&) {
        bump(r, B);
    } catch (const std::runtime_error&) {
        barrier.abort();
    }
    if (barrier2.wait() == N / 2) barrier.reset();
    (void)barrier2.wait();
    (void)barrier.wait();
    bump(r, C);
}

// The second wait is given `timeout`, or uses the barrier's default when there is none.
void late_party(mp::Barrier barrier, Tally broken,
                std::optional<std::chrono::milliseconds> timeout) {
    int i = barrier.wait(30s);
    if (i == N / 2) {
        // One party is late: it arrives once the others' timeout broke the barrier (a fixed
        // pause raced parties slow to reach their wait). Should none break it, it arrives after
        // LONG, completes the round and nobody counts as broken.
        const auto end = Clock::now() + LONG;
        while (!barrier.broken() && Clock::now() < end) std::this_thread::sleep_for(1ms);
    }
    try {
        (void)(timeout ? barrier.wait(*timeout) : barrier.wait());
    } catch (const mp::BrokenBarrierError&) {
        bump(broken);
    }
}

void thousand_party(mp::Barrier barrier, mp::Lock lock, Tally arrived) {
    for (std::size_t i = 0; i < arrived.size(); ++i) {
        (void)barrier.wait();
        std::lock_guard g(lock);
        bump(arrived, i);
    }
}

void barrier_wait(mp::Barrier barrier) { (void)barrier.wait(); }

// A wait (with `timeout`, or the barrier's default) that must end in BrokenBarrierError;
// anything else: exit code 3.
void wait_expect_broken(mp::Barrier barrier, std::optional<std::chrono::milliseconds> timeout) {
    try {
        (void)(timeout ? barrier.wait(*timeout) : barrier.wait());
    } catch (const mp::BrokenBarrierError&) {
        return;
    }
    require(false, 3);
}

// Passes one round, then waits (without a timeout) for a second that must break.
void pass_then_expect_broken(mp::Barrier barrier) {
    (void)barrier.wait(LONG);
    wait_expect_broken(barrier, std::nullopt);
}

// Waits once (completing a round, in the test below), says so, and waits again.
void wait_twice(mp::Barrier barrier, mp::Event between) {
    (void)barrier.wait(LONG);
    between.set();
    (void)barrier.wait();
}

void two_rounds_party(mp::Barrier barrier, Tally seen) {
    for (int round = 0; round < 2; ++round) {
        const int index = barrier.wait(LONG);
        require(index >= 0 && static_cast<std::size_t>(index) < seen.size(), 2);
        bump(seen, static_cast<std::size_t>(index));
    }
}

void spin_on_n_waiting(mp::Barrier barrier, mp::Semaphore spinning) {
    spinning.release();
    for (;;) (void)barrier.n_waiting();
}

void pass_or_exit_2(mp::Barrier barrier) { require(barrier.wait(LONG) >= 0, 2); }

// Tally slots of RandomKillsNeverHangASurvivor.
constexpr std::size_t FINISHED = 0, BROKEN = 1;

void rounds_party(mp::Barrier barrier, Tally r, int rounds, std::chrono::milliseconds timeout) {
    try {
        for (int i = 0; i < rounds; ++i) (void)barrier.wait(timeout);
        bump(r, FINISHED);
    } catch (const mp::BrokenBarrierError&) {
        bump(r, BROKEN);
    }
}

const std::optional<std::chrono::milliseconds> no_timeout;
}  // namespace

TEST_P(SyncBarrierAcross, PythonTestBarrier10) {
    mp::Barrier barrier(N, 30s);
    Tally r(2);
    constexpr int passes = 10;
    run_parties(options(), barrier10_party, barrier, r, passes);
    EXPECT_EQ(load(r, A), passes * N);
    barrier.abort();
}

TEST_P(SyncBarrierAcross, PythonTestWaitReturn) {
    mp::Barrier barrier(N, 30s);
    Tally seen(N);
    run_parties(options(), wait_return_party, barrier, seen);
    for (int s : seen.span()) EXPECT_EQ(s, 1);  // each index exactly once, so one 0
}

TEST_P(SyncBarrierAcross, PythonTestAbort) {
    mp::Barrier barrier(N, 30s);
    Tally r(2);
    run_parties(options(), abort_party, barrier, r);
    EXPECT_EQ(load(r, A), 0);
    EXPECT_EQ(load(r, B), N - 1);
    EXPECT_TRUE(barrier.broken());
}

TEST_P(SyncBarrierAcross, PythonTestReset) {
    mp::Barrier barrier(N, 30s);
    Tally r(3);
    run_parties(options(), reset_party, barrier, r);
    EXPECT_EQ(load(r, A), 0);
    EXPECT_EQ(load(r, B), N - 1);
    EXPECT_EQ(load(r, C), N);
}

TEST_P(SyncBarrierAcross, PythonTestAbortAndReset) {
    mp::Barrier barrier(N, 30s);
    mp::Barrier barrier2(N, 30s);
    Tally r(3);
    run_parties(options(), abort_and_reset_party, barrier, barrier2, r);
    EXPECT_EQ(load(r, A), 0);
    EXPECT_EQ(load(r, B), N - 1);
    EXPECT_EQ(load(r, C), N);
}

TEST_P(SyncBarrierAcross, PythonTestTimeout) {
    mp::Barrier barrier(N, 30s);
    Tally broken(1);
    run_parties(options(), late_party, barrier, broken,
                std::optional<std::chrono::milliseconds>(500ms));
    EXPECT_EQ(load(broken), N);
}

TEST_P(SyncBarrierAcross, PythonTestDefaultTimeout) {
    mp::Barrier barrier(N, 500ms);
    Tally broken(1);
    run_parties(options(), late_party, barrier, broken, no_timeout);
    EXPECT_EQ(load(broken), N);
}

TEST_P(SyncBarrierAcross, PythonTestThousand) {
    mp::Barrier barrier(N, 30s);
    mp::Lock lock;
    Tally arrived(1000);
    std::vector<std::thread> ts;
    std::vector<std::unique_ptr<mp::Process>> ps;
    for (int j = 0; j < 2; ++j) ps.push_back(start(options(), thousand_party, barrier, lock, arrived));
    for (int j = 0; j < N - 2; ++j) ts.emplace_back([&] { thousand_party(barrier, lock, arrived); });
    for (auto& t : ts) t.join();
    for (auto& p : ps) join_ok(*p);
    for (int a : arrived.span()) EXPECT_EQ(a, N);
}

// ---- Parties that die, stop or misbehave: a dead party breaks the barrier, and every timed wait
// returns by its deadline.

TEST_P(SyncBarrierAcross, LastArrivalAfterADeathDoesNotPassOneShort) {
    mp::Barrier barrier(3);
    auto dead = start(options(), barrier_wait, barrier);
    ASSERT_EQ(reaches([&] { return barrier.n_waiting(); }, 1), 1);
    std::atomic<int> first_outcome{0};  // 1: BrokenBarrierError, 2: passed
    std::thread first([&] {
        try {
            (void)barrier.wait(LONG);
            first_outcome = 2;
        } catch (const mp::BrokenBarrierError&) {
            first_outcome = 1;
        }
    });
    ASSERT_EQ(reaches([&] { return barrier.n_waiting(); }, 2), 2);
    kill_and_join(*dead);
    // The third arrival completes the count only with the dead party's help: it must break.
    EXPECT_THROW((void)barrier.wait(LONG), mp::BrokenBarrierError);
    first.join();
    EXPECT_EQ(first_outcome.load(), 1);
    EXPECT_TRUE(barrier.broken());
    auto later = start(options(), wait_expect_broken, barrier,
                       std::optional<std::chrono::milliseconds>(LONG));  // until reset()
    join_ok(*later);
}

TEST_P(SyncBarrierAcross, PartyKilledInsideWaitWakesTheOthersWithBrokenBarrier) {
    // The survivors wait without a timeout: only the death can end their wait.
    mp::Barrier barrier(4);
    auto dead = start(options(), barrier_wait, barrier);
    ASSERT_EQ(reaches([&] { return barrier.n_waiting(); }, 1), 1);
    auto s1 = start(options(), wait_expect_broken, barrier, no_timeout);
    auto s2 = start(options(), wait_expect_broken, barrier, no_timeout);
    ASSERT_EQ(reaches([&] { return barrier.n_waiting(); }, 3), 3);
    kill_and_join(*dead);
    join_ok(*s1);
    join_ok(*s2);
    EXPECT_TRUE(barrier.broken());
    EXPECT_EQ(barrier.n_waiting(), 0);
}

TEST_P(SyncBarrierAcross, PartyKilledWaitingForTheRoundToDrainBreaksTheNextRound) {
    mp::Barrier barrier(3);
    auto b = start(options(), pass_then_expect_broken, barrier);
    ASSERT_EQ(reaches([&] { return barrier.n_waiting(); }, 1), 1);
    ASSERT_TRUE(asleep_in_shared_futex_wait(b->pid(), LONG));
    // Stopped, B cannot leave round 1 once it completes: round 1 stays draining.
    ASSERT_EQ(::kill(b->pid(), SIGSTOP), 0);
    auto c = start(options(), pass_then_expect_broken, barrier);
    ASSERT_EQ(reaches([&] { return barrier.n_waiting(); }, 2), 2);
    // A completes round 1, then its second wait() waits for round 1 to drain; it dies there.
    mp::Event between;
    auto a = start(options(), wait_twice, barrier, between);
    ASSERT_TRUE(between.wait(LONG));
    ASSERT_TRUE(asleep_in_shared_futex_wait(a->pid(), LONG));
    kill_and_join(*a);
    ASSERT_EQ(::kill(b->pid(), SIGCONT), 0);
    // B passes round 1 (it completed); B and C wait for round 2 without a timeout, which only
    // A's death, noticed, can end.
    join_ok(*b);
    join_ok(*c);
    EXPECT_TRUE(barrier.broken());
    barrier.reset();
    EXPECT_FALSE(barrier.broken());
    EXPECT_EQ(barrier.n_waiting(), 0);
}

TEST_P(SyncBarrierAcross, TimedWaitAfterADeathAndAResetReturnsByItsDeadline) {
    mp::Barrier barrier(2);
    auto dead = start(options(), barrier_wait, barrier);
    ASSERT_EQ(reaches([&] { return barrier.n_waiting(); }, 1), 1);
    kill_and_join(*dead);
    barrier.reset();  // must not wait for the dead party to leave
    // Alone, it times out (and breaks the barrier), by its deadline.
    auto late = start(options(), wait_expect_broken, barrier,
                      std::optional<std::chrono::milliseconds>(1s));
    join_ok(*late);
    EXPECT_TRUE(barrier.broken());
}

TEST_P(SyncBarrierAcross, ResetAfterADeathMakesTheBarrierUsableAgain) {
    constexpr int parties = 3;
    mp::Barrier barrier(parties);
    auto dead = start(options(), barrier_wait, barrier);
    ASSERT_EQ(reaches([&] { return barrier.n_waiting(); }, 1), 1);
    kill_and_join(*dead);
    barrier.reset();
    EXPECT_FALSE(barrier.broken());
    EXPECT_EQ(barrier.n_waiting(), 0);
    // Fresh parties pass, twice, each arrival index given once per round.
    Tally seen(parties);
    std::vector<std::unique_ptr<mp::Process>> ps;
    for (int i = 0; i < parties; ++i) ps.push_back(start(options(), two_rounds_party, barrier, seen));
    for (auto& p : ps) join_ok(*p);
    for (int n : seen.span()) EXPECT_EQ(n, 2);
    EXPECT_FALSE(barrier.broken());
}

TEST_P(SyncBarrierAcross, TimedWaitReturnsByItsDeadlineWhileAPartyIsStopped) {
    mp::Barrier barrier(2);
    auto stopped = start(options(), wait_expect_broken, barrier, no_timeout);
    ASSERT_EQ(reaches([&] { return barrier.n_waiting(); }, 1), 1);
    ASSERT_EQ(::kill(stopped->pid(), SIGSTOP), 0);
    barrier.reset();  // the stopped party cannot leave: the reset stays pending
    auto late = start(options(), wait_expect_broken, barrier,
                      std::optional<std::chrono::milliseconds>(500ms));
    join_ok(*late);
    ASSERT_EQ(::kill(stopped->pid(), SIGCONT), 0);
    join_ok(*stopped);
}

TEST_P(SyncBarrierAcross, ProcessKilledHoldingTheInternalLockLeavesTheCountRight) {
    // n_waiting() holds the barrier's internal lock for most of its run: a process calling it in
    // a loop, killed, often dies holding that lock. The next holder recovers it, breaks the
    // barrier and recounts the parties inside wait() from their slots (the waiter here).
    mp::Barrier barrier(2);
    const unsigned seed = std::random_device{}();
    SCOPED_TRACE("seed " + std::to_string(seed));
    std::mt19937 rng(seed);
    int recovered = 0;
    for (int it = 0; it < 20; ++it) {
        auto waiter = start(options(), wait_expect_broken, barrier,
                            std::optional<std::chrono::milliseconds>(LONG));
        ASSERT_EQ(reaches([&] { return barrier.n_waiting(); }, 1), 1);
        mp::Semaphore spinning(0);
        auto spinner = start(options(), spin_on_n_waiting, barrier, spinning);
        // The kill below must land inside the loop, not in a spawn child's start-up.
        ASSERT_TRUE(spinning.acquire(LONG));
        std::this_thread::sleep_for(std::chrono::microseconds(500 + rng() % 3000));
        kill_and_join(*spinner);
        if (barrier.broken()) {
            ++recovered;  // it died holding the lock
        } else {
            barrier.abort();
        }
        join_ok(*waiter);
        barrier.reset();
        ASSERT_FALSE(barrier.broken());
        ASSERT_EQ(barrier.n_waiting(), 0);
        // Counted right: two fresh parties pass together.
        auto other = start(options(), pass_or_exit_2, barrier);
        EXPECT_GE(barrier.wait(LONG), 0);
        join_ok(*other);
    }
    std::printf("%d of 20 kills landed while the internal lock was held\n", recovered);
}

TEST_P(SyncBarrierAcross, RandomKillsNeverHangASurvivor) {
    // Parties run many rounds with timed waits; one or two are SIGKILLed at a random moment
    // (inside wait() mostly, between waits sometimes). Every survivor must end, by finishing or
    // with BrokenBarrierError, and reset() must make the barrier usable for the next parties.
    constexpr int parties = 4, rounds = 200, iterations = 30;
    mp::Barrier barrier(parties);
    Tally r(2);
    const unsigned seed = std::random_device{}();
    SCOPED_TRACE("seed " + std::to_string(seed));
    std::mt19937 rng(seed);
    for (int it = 0; it <= iterations; ++it) {
        const bool last = it == iterations;  // no kill: every party finishes
        // Short enough to keep the test short when a party dies between waits (only the
        // timeout ends that round), long for the last iteration, which must not break.
        const std::chrono::milliseconds timeout = last ? LONG : 500ms;
        r.set(FINISHED, 0);
        std::vector<std::unique_ptr<mp::Process>> ps;
        for (int i = 0; i < parties; ++i)
            ps.push_back(start(options(), rounds_party, barrier, r, rounds, timeout));
        std::vector<bool> killed(parties, false);
        if (!last) {
            const int kills = 1 + static_cast<int>(rng() % 2);
            for (int k = 0; k < kills; ++k) {
                std::this_thread::sleep_for(std::chrono::microseconds(rng() % 8000));
                const auto victim = rng() % parties;
                ps[victim]->kill();
                killed[victim] = true;
            }
        }
        for (int i = 0; i < parties; ++i) {
            auto& p = *ps[static_cast<std::size_t>(i)];
            if (!p.join(LONG)) {
                for (auto& q : ps) q->kill();
                for (auto& q : ps) q->join();
                FAIL() << "iteration " << it << ": party " << i << " hangs";
            }
            if (!killed[static_cast<std::size_t>(i)] || p.exitcode() != -SIGKILL) {
                EXPECT_EQ(p.exitcode(), 0) << "iteration " << it << ", party " << i;
            }
        }
        if (last) {
            EXPECT_EQ(load(r, FINISHED), parties);
        }
        barrier.reset();
        ASSERT_FALSE(barrier.broken()) << "iteration " << it;
        ASSERT_EQ(barrier.n_waiting(), 0) << "iteration " << it;
    }
    std::printf("%d survivors ended with BrokenBarrierError over %d iterations\n", load(r, BROKEN),
                iterations);
}

namespace {
// A barrier's action is a plain function that travels with the barrier, so it captures nothing:
// each party puts what the action reports through here, in its own process, before it waits.
struct ActionHandles {
    std::optional<Tally> runs;
    std::optional<mp::Semaphore> in_action, finish;
};
ActionHandles action_handles;

// Empties action_handles at the end of a test (their memory is unmapped with the last handle).
struct ClearActionHandles {
    ~ClearActionHandles() { action_handles = {}; }
};

void count_action_run() { bump(*action_handles.runs); }

void signal_then_sleep() {
    action_handles.in_action->release();
    std::this_thread::sleep_for(60s);
}

void signal_then_wait_for_finish() {
    action_handles.in_action->release();
    (void)action_handles.finish->acquire(LONG);
}

void counted_action_party(mp::Barrier barrier, Tally runs) {
    action_handles.runs = runs;
    (void)barrier.wait();
    require(runs.get(0) == 1, 2);  // the action ran before anyone was released
}

void wait_running_sleepy_action(mp::Barrier barrier, mp::Semaphore in_action) {
    action_handles.in_action = in_action;
    (void)barrier.wait();
}

void wait_running_long_action(mp::Barrier barrier, mp::Semaphore in_action,
                              mp::Semaphore finish, mp::Semaphore started, mp::Event go) {
    action_handles.in_action = in_action;
    action_handles.finish = finish;
    started.release();
    require(go.wait(LONG), 4);
    wait_expect_broken(barrier, no_timeout);
}
}  // namespace

TEST_P(SyncBarrierAcross, PythonTestAction) {
    ClearActionHandles clear;
    Tally runs(1);
    mp::Barrier barrier(N, count_action_run);
    run_parties(options(), counted_action_party, barrier, runs);
    EXPECT_EQ(runs.get(0), 1);
}

TEST_P(SyncBarrierAcross, PartyKilledInsideTheActionBreaksTheBarrier) {
    // A party killed inside the action is a party that died inside wait(): the round it was
    // completing breaks.
    ClearActionHandles clear;
    mp::Semaphore in_action(0);
    mp::Barrier barrier(2, signal_then_sleep);
    // Its timeout outlasts the checks below: only the death can break the barrier in time (a
    // short one raced a slow start of `last`, and would break the barrier itself).
    std::thread first([&] { EXPECT_THROW((void)barrier.wait(2 * LONG), mp::BrokenBarrierError); });
    ASSERT_EQ(reaches([&] { return barrier.n_waiting(); }, 1), 1);
    // Arrives last: runs the action.
    auto last = start(options(), wait_running_sleepy_action, barrier, in_action);
    ASSERT_TRUE(in_action.acquire(LONG));
    kill_and_join(*last);
    EXPECT_TRUE(reaches([&] { return barrier.broken(); }, true)) << "the death did not break the barrier";
    first.join();
    EXPECT_TRUE(barrier.broken());
    EXPECT_THROW((void)barrier.wait(LONG), mp::BrokenBarrierError);
    barrier.reset();
    EXPECT_FALSE(barrier.broken());
    EXPECT_EQ(barrier.n_waiting(), 0);
}

TEST_P(SyncBarrierAcross, TimedWaitDoesNotDependOnTheActionsDuration) {
    ClearActionHandles clear;
    mp::Semaphore in_action(0), finish(0), started(0);
    mp::Event go;
    mp::Barrier barrier(2, signal_then_wait_for_finish);
    // Arrives last and runs the action, which lasts until `finish` (or LONG). Started first and
    // held on `go`, so that no process start falls inside `first`'s timeout.
    auto last = start(options(), wait_running_long_action, barrier, in_action, finish, started, go);
    ASSERT_TRUE(started.acquire(LONG));
    auto first = start(options(), wait_expect_broken, barrier,
                       std::optional<std::chrono::milliseconds>(2s));
    ASSERT_EQ(reaches([&] { return barrier.n_waiting(); }, 1), 1);
    go.set();  // `last` needs only to wake and arrive within `first`'s 2 s
    ASSERT_TRUE(in_action.acquire(LONG));
    join_ok(*first);  // its deadline passed while the action ran: the barrier broke
    finish.release();
    join_ok(*last);   // the action ended on a broken barrier: nobody was released
    EXPECT_TRUE(barrier.broken());
}

TEST(SyncTimeoutValues, EveryPrimitive) {
    // issue 12 item 5: "for ever" durations of every type wait (what they wait for comes later),
    // zero and negative ones only look.
    mp::test::for_each_forever([&](auto forever) {
        mp::Lock lock;
        std::atomic<bool> held{false};
        std::thread holder([&] {
            lock.acquire();
            held = true;
            std::this_thread::sleep_for(30ms);
            lock.release();
        });
        while (!held) std::this_thread::sleep_for(1ms);
        EXPECT_TRUE(lock.acquire(forever));
        lock.release();
        holder.join();

        mp::Event event;
        mp::Semaphore sem(0);
        mp::Condition cond;
        bool flag = false;
        mp::Barrier barrier(2, forever);  // the barrier's own default timeout
        std::thread helper([&] {
            std::this_thread::sleep_for(30ms);
            event.set();
            sem.release();
            {
                std::lock_guard g(cond);
                flag = true;
                cond.notify_all();
            }
            EXPECT_NO_THROW(barrier.wait(LONG));
        });
        EXPECT_TRUE(event.wait(forever));
        EXPECT_TRUE(sem.acquire(forever));
        {
            std::unique_lock g(cond);
            EXPECT_TRUE(cond.wait_for([&] { return flag; }, forever));
        }
        EXPECT_NO_THROW(barrier.wait());
        helper.join();
    });
    mp::test::for_each_no_wait([&](auto t) {
        mp::Lock lock;
        std::atomic<int> stage{0};
        std::thread holder([&] {
            lock.acquire();
            stage = 1;
            while (stage != 2) std::this_thread::sleep_for(1ms);
            lock.release();
        });
        while (stage != 1) std::this_thread::sleep_for(1ms);
        EXPECT_FALSE(lock.acquire(t));
        stage = 2;
        holder.join();

        mp::Event event;
        EXPECT_FALSE(event.wait(t));
        event.set();
        EXPECT_TRUE(event.wait(t));
        mp::Semaphore sem(0);
        EXPECT_FALSE(sem.acquire(t));
        mp::Condition cond;
        {
            std::unique_lock g(cond);
            EXPECT_FALSE(cond.wait(t));
        }
        mp::Barrier barrier(2);
        EXPECT_THROW(barrier.wait(t), mp::BrokenBarrierError);
        mp::Barrier short_default(2, t);
        EXPECT_THROW(short_default.wait(), mp::BrokenBarrierError);
    });
}

// ---- Misuse (issue 12 item 6): a primitive moved from throws mp::EmptyHandle, never crashes --

template <class P>
void expect_common_use_throws(P& p) {
    EXPECT_THROW((void)mp::encode(p), mp::EmptyHandle);
    if constexpr (requires { p.acquire(); }) {
        EXPECT_THROW((void)p.acquire(), mp::EmptyHandle);
        EXPECT_THROW((void)p.acquire(false), mp::EmptyHandle);
        EXPECT_THROW((void)p.acquire(1s), mp::EmptyHandle);
        EXPECT_THROW(p.release(), mp::EmptyHandle);
        EXPECT_THROW(p.lock(), mp::EmptyHandle);
        EXPECT_THROW((void)p.try_lock_for(1s), mp::EmptyHandle);
    }
}

TEST(SyncMisuse, MovedFromPrimitivesThrowEmptyHandle) {
    {
        mp::Lock a, b = std::move(a);
        expect_common_use_throws(a);  // NOLINT(bugprone-use-after-move)
        EXPECT_THROW((void)a.owner_died(), mp::EmptyHandle);
        EXPECT_TRUE(b.acquire(false));
        b.release();
    }
    {
        mp::RLock a, b = std::move(a);
        expect_common_use_throws(a);  // NOLINT(bugprone-use-after-move)
        EXPECT_THROW((void)a.recursion_count(), mp::EmptyHandle);
        // The message names the type (it said mp::Lock).
        for (auto use : {+[](mp::RLock& l) { (void)l.recursion_count(); }, +[](mp::RLock& l) { (void)l.acquire(); },
                         +[](mp::RLock& l) { (void)l.locked(); }}) {
            try {
                use(a);
                ADD_FAILURE() << "no exception";
            } catch (const mp::EmptyHandle& e) {
                EXPECT_NE(std::string(e.what()).find("mp::RLock"), std::string::npos) << e.what();
            }
        }
        EXPECT_TRUE(b.acquire(false));
        b.release();
    }
    {
        mp::Semaphore a(1), b = std::move(a);
        expect_common_use_throws(a);  // NOLINT(bugprone-use-after-move)
        EXPECT_THROW((void)a.get_value(), mp::EmptyHandle);
        EXPECT_EQ(b.get_value(), 1);
    }
    {
        mp::BoundedSemaphore a(1), b = std::move(a);
        expect_common_use_throws(a);  // NOLINT(bugprone-use-after-move)
        EXPECT_EQ(b.get_value(), 1);
    }
    {
        mp::Condition a, b = std::move(a);
        expect_common_use_throws(a);  // NOLINT(bugprone-use-after-move)
        EXPECT_THROW((void)a.wait(1s), mp::EmptyHandle);
        EXPECT_THROW(a.notify(), mp::EmptyHandle);
        EXPECT_THROW(a.notify_all(), mp::EmptyHandle);
        EXPECT_THROW((void)a.owner_died(), mp::EmptyHandle);
        std::lock_guard g(b);
        b.notify_all();
    }
    {
        mp::Event a, b = std::move(a);
        expect_common_use_throws(a);  // NOLINT(bugprone-use-after-move)
        EXPECT_THROW(a.set(), mp::EmptyHandle);
        EXPECT_THROW(a.clear(), mp::EmptyHandle);
        EXPECT_THROW((void)a.is_set(), mp::EmptyHandle);
        EXPECT_THROW((void)a.wait(1s), mp::EmptyHandle);
        EXPECT_THROW(a.wait(), mp::EmptyHandle);
        b.set();
        EXPECT_TRUE(b.is_set());
    }
    {
        mp::Barrier a(1), b = std::move(a);
        expect_common_use_throws(a);  // NOLINT(bugprone-use-after-move)
        EXPECT_THROW((void)a.wait(), mp::EmptyHandle);
        EXPECT_THROW((void)a.wait(1s), mp::EmptyHandle);
        EXPECT_THROW(a.reset(), mp::EmptyHandle);
        EXPECT_THROW(a.abort(), mp::EmptyHandle);
        EXPECT_THROW((void)a.parties(), mp::EmptyHandle);
        EXPECT_THROW((void)a.n_waiting(), mp::EmptyHandle);
        EXPECT_THROW((void)a.broken(), mp::EmptyHandle);
        EXPECT_EQ(b.wait(), 0);
    }
}
