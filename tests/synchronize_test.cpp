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
#include <optional>
#include <pthread.h>
#include <chrono>
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
#include <system_error>
#include <thread>
#include <unistd.h>
#include <vector>

#include "helpers/proc_state.hpp"
#include "helpers/timeouts.hpp"
#include "helpers/shared_object.hpp"
#include "mp/process.hpp"
#include "mp/shared_memory.hpp"
#include "mp/synchronize.hpp"

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
    EXPECT_EQ(mp::detail::futex_wait(word, 0, mp::detail::deadline_after(LONG)),
              mp::detail::FutexResult::woken);
}

TEST(SyncFutex, WaitTimesOutAtTheDeadline) {
    std::atomic<std::uint32_t> word{0};
    auto deadline = mp::detail::deadline_after(TIMEOUT1);
    EXPECT_EQ(mp::detail::futex_wait(word, 0, deadline), mp::detail::FutexResult::timed_out);
    EXPECT_GE(Clock::now(), *deadline);
    // A deadline in the past is a poll.
    EXPECT_EQ(mp::detail::futex_wait(word, 0, Clock::now() - 1s),
              mp::detail::FutexResult::timed_out);
}

TEST(SyncFutex, WakeCountsSleepersAcrossProcessesAndBitsets) {
    Shared<std::atomic<std::uint32_t>> word;
    // Each child sleeps once, with its own bit, and exits when woken.
    auto sleeper = [&](std::uint32_t bits) {
        return spawn([&, bits] {
            require(mp::detail::futex_wait(*word, 0, mp::detail::deadline_after(LONG), bits) ==
                        mp::detail::FutexResult::woken,
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
            n = mp::detail::futex_wake(*word, 1, bits);
            if (n == 0) std::this_thread::sleep_for(1ms);
        }
        return n;
    };
    EXPECT_EQ(wake_one(1), 1);
    join_ok(*a);
    EXPECT_EQ(mp::detail::futex_wake(*word, 1, 4), 0);  // no sleeper has bit 4
    EXPECT_EQ(wake_one(2), 1);
    join_ok(*b);
    EXPECT_EQ(mp::detail::futex_wake_all(*word), 0);  // nobody left
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

TEST(SyncLock, MutualExclusionAcrossProcesses) {
    mp::Lock lock;
    Shared<long> counter;
    constexpr int n = 20000;
    auto work = [&] {
        for (int i = 0; i < n; ++i) {
            std::lock_guard g(lock);
            // A non-atomic read-modify-write: only the lock keeps increments from being lost.
            long v = *counter;
            *const_cast<volatile long*>(&*counter) = v + 1;
        }
    };
    auto p1 = spawn(work);
    auto p2 = spawn(work);
    work();
    join_ok(*p1);
    join_ok(*p2);
    EXPECT_EQ(*counter, 3L * n);
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

TEST(SyncLock, HolderKilledIsRecoveredAndReported) {
    mp::Lock lock;
    mp::Semaphore holding(0);
    auto p = spawn([&] {
        lock.lock();
        holding.release();
        std::this_thread::sleep_for(60s);
    });
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

TEST(SyncLock, WaiterIsWokenWhenHolderIsKilled) {
    mp::Lock lock;
    mp::Semaphore holding(0);
    Shared<std::atomic<int>> seen;
    auto holder = spawn([&] {
        lock.lock();
        holding.release();
        std::this_thread::sleep_for(60s);
    });
    ASSERT_TRUE(holding.acquire(LONG));
    auto waiter = spawn([&] {
        require(lock.acquire(LONG), 2);  // blocks in the kernel until the holder dies
        *seen = lock.owner_died() ? 1 : 2;
        lock.release();
    });
    std::this_thread::sleep_for(DELTA);
    kill_and_join(*holder);
    join_ok(*waiter);
    EXPECT_EQ(seen->load(), 1);
}

// A waiter survives a wake-up lost with a killed waiter (glibc's robust mutexes can lose one:
// the unlock clears FUTEX_WAITERS and wakes one waiter; if that one is killed before it runs
// while another thread takes the free lock on the fast path, nobody wakes the other waiters,
// which would sleep on a free lock). This test is that other thread: it holds the lock while two
// children queue up on it, releases, takes it back with try_lock before the woken child runs
// (both are pinned to this CPU at SCHED_IDLE, so a wake-up never preempts the test), kills that
// child and releases. The survivor must get the lock.
TEST(SyncLock, WaiterSurvivesAWakeUpLostWithAKilledWaiter) {
    using mp::test::in_futex_on;
    using mp::test::proc_state;
    cpu_set_t saved;
    ASSERT_EQ(sched_getaffinity(0, sizeof saved, &saved), 0);
    struct RestoreAffinity {
        cpu_set_t& set;
        ~RestoreAffinity() { sched_setaffinity(0, sizeof set, &set); }
    } restore{saved};
    auto asleep = [](mp::Process& p) {
        const auto t0 = Clock::now();
        while (!(in_futex_on(p.pid()) && proc_state(p.pid()) == 'S')) {
            if (Clock::now() - t0 > LONG) return false;
            std::this_thread::sleep_for(1ms);
        }
        return true;
    };
    int staged = 0;
    for (int attempt = 0; attempt < 10 && staged < 3; ++attempt) {
        mp::Lock lock;
        const int cpu = sched_getcpu();
        ASSERT_GE(cpu, 0);
        cpu_set_t one;
        CPU_ZERO(&one);
        CPU_SET(cpu, &one);
        auto waiter = [&] {
            sched_param none{};
            if (sched_setaffinity(0, sizeof one, &one) != 0 ||
                sched_setscheduler(0, SCHED_IDLE, &none) != 0)
                std::_Exit(3);
            if (!lock.acquire(LONG)) std::_Exit(4);
            lock.release();
        };
        lock.lock();
        auto w1 = spawn(waiter);
        ASSERT_TRUE(asleep(*w1));
        auto w2 = spawn(waiter);
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
        ASSERT_EQ(sched_setaffinity(0, sizeof saved, &saved), 0);
        if (retaken) lock.release();
        if (woken == nullptr) {  // not staged: the woken waiter ran first
            join_ok(*w1);
            join_ok(*w2);
            continue;
        }
        ++staged;
        // Without a bounded wait for the mutex, `other` sleeps on a free lock for ever.
        const bool finished = other->join(5s);
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
// one it still held marked dead, and none of those it released.
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

// Python 3.14's Lock.locked(), and who holds it as RLock's repr names the holder: this thread,
// 'SomeOtherThread', 'SomeOtherProcess' or 'None', also after the holder was killed.
TEST(SyncLock, LockedAndHolder) {
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
    auto p = spawn([&] {
        lock.lock();
        holding.release();
        std::this_thread::sleep_for(60s);
    });
    ASSERT_TRUE(holding.acquire(LONG));
    EXPECT_TRUE(lock.locked());
    EXPECT_EQ(lock.holder(), mp::LockHolder::other_process);
    kill_and_join(*p);
    EXPECT_FALSE(lock.locked()) << "a dead holder's lock is free for the next acquirer";
    EXPECT_EQ(lock.holder(), mp::LockHolder::none);
}

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

TEST(SyncRLock, ExclusiveAcrossProcessesAndHolderDeath) {
    mp::RLock lock;
    mp::Semaphore holding(0);
    auto p = spawn([&] {
        lock.acquire();
        lock.acquire();
        lock.acquire();
        holding.release();
        std::this_thread::sleep_for(60s);
    });
    ASSERT_TRUE(holding.acquire(LONG));
    EXPECT_FALSE(lock.acquire(false));
    kill_and_join(*p);
    ASSERT_TRUE(lock.acquire(LONG));
    EXPECT_TRUE(lock.owner_died());
    EXPECT_EQ(lock.recursion_count(), 1u);  // the dead holder's depth is not inherited
    lock.release();
    EXPECT_FALSE(lock.held());
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

TEST(SyncSemaphore, LockableAndReleasableByAnotherProcess) {
    mp::Semaphore sem(0);
    auto p = spawn([&] { sem.release(); });
    EXPECT_TRUE(sem.acquire(LONG));
    join_ok(*p);
    sem.release();
    {
        std::lock_guard g(sem);
        EXPECT_EQ(sem.get_value(), 0);
    }
    EXPECT_EQ(sem.get_value(), 1);
}

TEST(SyncSemaphore, BlockedWaitersAreWokenOnePerRelease) {
    mp::Semaphore sem(0);
    Shared<std::atomic<int>> got;
    std::vector<std::unique_ptr<mp::Process>> ps;
    for (int i = 0; i < 3; ++i)
        ps.push_back(spawn([&] {
            require(sem.acquire(LONG), 2);
            ++*got;
        }));
    std::thread t([&] {
        EXPECT_TRUE(sem.acquire(LONG));
        ++*got;
    });
    std::this_thread::sleep_for(DELTA);
    EXPECT_EQ(got->load(), 0);
    sem.release();
    EXPECT_EQ(reaches([&] { return got->load(); }, 1), 1);
    for (int i = 0; i < 3; ++i) sem.release();
    EXPECT_EQ(reaches([&] { return got->load(); }, 4), 4);
    t.join();
    for (auto& p : ps) join_ok(*p);
    EXPECT_EQ(sem.get_value(), 0);
}

TEST(SyncSemaphore, WaiterKilledDoesNotWedgeOthers) {
    mp::Semaphore sem(0);
    mp::Semaphore ready(0);
    auto victim = spawn([&] {
        ready.release();
        (void)sem.acquire(60s);
        ::_exit(7);  // not reached: killed first (or woken, which the test would notice)
    });
    ASSERT_TRUE(ready.acquire(LONG));
    std::this_thread::sleep_for(DELTA);
    kill_and_join(*victim);
    auto other = spawn([&] { require(sem.acquire(LONG), 2); });
    std::this_thread::sleep_for(DELTA);
    sem.release();
    join_ok(*other);
    sem.release();
    EXPECT_EQ(sem.get_value(), 1);
    EXPECT_TRUE(sem.acquire(false));
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

TEST(SyncCondition, PythonTestNotify) {
    mp::Condition cond;
    mp::Semaphore sleeping(0), woken(0);
    auto p = spawn([&] { cond_f(cond, sleeping, woken); });
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

TEST(SyncCondition, PythonTestNotifyAll) {
    mp::Condition cond;
    mp::Semaphore sleeping(0), woken(0);
    std::vector<std::unique_ptr<mp::Process>> ps;
    std::vector<std::thread> ts;
    // Some that time out.
    for (int i = 0; i < 3; ++i) {
        ps.push_back(spawn([&] { cond_f(cond, sleeping, woken, TIMEOUT1); }));
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
    for (int i = 0; i < 3; ++i) {
        ps.push_back(spawn([&] { cond_f(cond, sleeping, woken); }));
        ts.emplace_back([&] { cond_f(cond, sleeping, woken); });
    }
    for (int i = 0; i < 6; ++i) ASSERT_TRUE(sleeping.acquire(LONG));
    std::this_thread::sleep_for(DELTA);
    EXPECT_EQ(woken.get_value(), 0);
    {
        std::lock_guard g(cond);
        cond.notify_all();
    }
    EXPECT_EQ(reaches([&] { return woken.get_value(); }, 6), 6);
    for (auto& t : ts) t.join();
    for (auto& p : ps) join_ok(*p);
}

TEST(SyncCondition, PythonTestNotifyN) {
    mp::Condition cond;
    mp::Semaphore sleeping(0), woken(0);
    std::vector<std::unique_ptr<mp::Process>> ps;
    std::vector<std::thread> ts;
    for (int i = 0; i < 3; ++i) {
        ps.push_back(spawn([&] { cond_f(cond, sleeping, woken); }));
        ts.emplace_back([&] { cond_f(cond, sleeping, woken); });
    }
    for (int i = 0; i < 6; ++i) ASSERT_TRUE(sleeping.acquire(LONG));
    std::this_thread::sleep_for(DELTA);
    EXPECT_EQ(woken.get_value(), 0);
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

TEST(SyncCondition, PythonTestWaitfor) {
    mp::Condition cond;
    Shared<std::atomic<int>> state;
    *state = -1;
    auto p = spawn([&] {
        std::lock_guard g(cond);
        *state = 0;
        cond.notify();
        bool result = cond.wait_for([&] { return state->load() == 4; });
        require(result && state->load() == 4, 1);
    });
    {
        std::lock_guard g(cond);
        EXPECT_TRUE(cond.wait_for([&] { return state->load() == 0; }, LONG));
        EXPECT_EQ(state->load(), 0);
    }
    for (int i = 0; i < 4; ++i) {
        std::this_thread::sleep_for(10ms);
        std::lock_guard g(cond);
        ++*state;
        cond.notify();
    }
    join_ok(*p);
}

TEST(SyncCondition, PythonTestWaitforTimeout) {
    mp::Condition cond;
    Shared<std::atomic<int>> state, success;
    mp::Semaphore sem(0);
    auto p = spawn([&] {
        sem.release();
        std::lock_guard g(cond);
        auto t0 = Clock::now();
        bool result = cond.wait_for([&] { return state->load() == 4; }, 100ms);
        if (!result && Clock::now() - t0 >= 100ms) *success = 1;
    });
    ASSERT_TRUE(sem.acquire(LONG));
    for (int i = 0; i < 3; ++i) {
        std::this_thread::sleep_for(10ms);
        std::lock_guard g(cond);
        ++*state;
        cond.notify();
    }
    join_ok(*p);
    EXPECT_EQ(success->load(), 1);
}

TEST(SyncCondition, PythonTestWaitResult) {
    mp::Condition c;
    std::lock_guard g(c);
    EXPECT_FALSE(c.wait(0ms));
    EXPECT_FALSE(c.wait(100ms));
    auto p = spawn([&] {
        std::lock_guard g2(c);
        c.notify();
    });
    EXPECT_TRUE(c.wait(LONG));
    join_ok(*p);
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

TEST(SyncCondition, WithPlainLockAndUniqueLock) {
    mp::Lock lock;
    mp::Condition c(lock);
    Shared<std::atomic<int>> flag;
    auto p = spawn([&] {
        std::unique_lock u(c);
        *flag = 1;
        c.notify_all();
    });
    {
        std::unique_lock u(c);
        EXPECT_TRUE(c.wait_for([&] { return flag->load() == 1; }, LONG));
        EXPECT_TRUE(lock.held());
    }
    join_ok(*p);
}

TEST(SyncCondition, WaiterKilledDoesNotWedgeOthers) {
    mp::Condition cond;
    mp::Semaphore sleeping(0), woken(0);
    auto victim = spawn([&] { cond_f(cond, sleeping, woken); });
    ASSERT_TRUE(sleeping.acquire(LONG));
    std::this_thread::sleep_for(DELTA);  // let it sleep (it released the lock)
    kill_and_join(*victim);
    auto other = spawn([&] { cond_f(cond, sleeping, woken); });
    ASSERT_TRUE(sleeping.acquire(LONG));
    {
        std::lock_guard g(cond);
        cond.notify_all();
    }
    join_ok(*other);
    EXPECT_EQ(woken.get_value(), 1);
}

TEST(SyncCondition, LockHolderKilledIsReportedToWaiter) {
    mp::Condition cond;
    mp::Semaphore sleeping(0);
    Shared<std::atomic<int>> died;
    std::thread waiter([&] {
        std::lock_guard g(cond);
        sleeping.release();
        EXPECT_TRUE(cond.wait(LONG));
        *died = cond.owner_died() ? 1 : 2;
    });
    ASSERT_TRUE(sleeping.acquire(LONG));
    auto killer = spawn([&] {
        cond.acquire();
        cond.notify();
        std::this_thread::sleep_for(60s);  // killed while holding the lock
    });
    std::this_thread::sleep_for(DELTA);
    kill_and_join(*killer);
    waiter.join();
    EXPECT_EQ(died->load(), 1);
}

TEST(SyncCondition, ProducerConsumerStress) {
    // A one-slot mailbox guarded by a Condition: producers wait for it to empty, consumers for
    // it to fill, and every notify wakes exactly one waiter, so a lost wake-up would stall the
    // run (bounded by LONG) and a double delivery would show in the sums.
    struct Box {
        long value;
        bool full;
        long consumed_sum;
        long consumed;
    };
    mp::Lock lock;
    mp::Condition cond(lock);
    Shared<Box> box;
    constexpr long per_producer = 2000;
    auto producer = [&](long base) {
        for (long i = 1; i <= per_producer; ++i) {
            std::unique_lock u(cond);
            require(cond.wait_for([&] { return !box->full; }, LONG), 2);
            box->value = base + i;
            box->full = true;
            cond.notify_all();
        }
    };
    auto consumer = [&](long count) {
        for (long i = 0; i < count; ++i) {
            std::unique_lock u(cond);
            if (!cond.wait_for([&] { return box->full; }, LONG)) return false;
            box->consumed_sum += box->value;
            ++box->consumed;
            box->full = false;
            cond.notify(1 + static_cast<int>(i % 2));
        }
        return true;
    };
    auto p1 = spawn([&] { producer(0); });
    auto p2 = spawn([&] { producer(1'000'000); });
    auto c1 = spawn([&] { require(consumer(per_producer), 3); });
    std::thread c2([&] { EXPECT_TRUE(consumer(per_producer)); });
    c2.join();
    join_ok(*c1);
    join_ok(*p1);
    join_ok(*p2);
    const long expected = 2 * (per_producer * (per_producer + 1) / 2) + per_producer * 1'000'000;
    EXPECT_EQ(box->consumed, 2 * per_producer);
    EXPECT_EQ(box->consumed_sum, expected);
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

TEST(SyncEvent, PythonTestEvent) {
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
    auto p = spawn([&] {
        std::this_thread::sleep_for(TIMEOUT2);
        event.set();
    });
    EXPECT_TRUE(event.wait(LONG));
    join_ok(*p);
}

TEST(SyncEvent, SetWakesEveryWaiter) {
    mp::Event event;
    Shared<std::atomic<int>> woken;
    std::vector<std::unique_ptr<mp::Process>> ps;
    for (int i = 0; i < 3; ++i)
        ps.push_back(spawn([&] {
            require(event.wait(LONG), 2);
            ++*woken;
        }));
    std::thread t([&] {
        event.wait();
        ++*woken;
    });
    std::this_thread::sleep_for(DELTA);
    EXPECT_EQ(woken->load(), 0);
    event.set();
    t.join();
    for (auto& p : ps) join_ok(*p);
    EXPECT_EQ(woken->load(), 4);
}

TEST(SyncEvent, SetThenClearStillWakesWaiter) {
    mp::Event event;
    mp::Semaphore waiting(0);
    std::thread t([&] {
        waiting.release();
        EXPECT_TRUE(event.wait(LONG));
    });
    ASSERT_TRUE(waiting.acquire(LONG));
    std::this_thread::sleep_for(DELTA);
    event.set();
    event.clear();
    t.join();
    EXPECT_FALSE(event.is_set());
}

TEST(SyncEvent, WaiterKilledDoesNotWedgeOthers) {
    mp::Event event;
    mp::Semaphore ready(0);
    auto victim = spawn([&] {
        ready.release();
        event.wait();
    });
    ASSERT_TRUE(ready.acquire(LONG));
    std::this_thread::sleep_for(DELTA);
    kill_and_join(*victim);
    auto other = spawn([&] { require(event.wait(LONG), 2); });
    event.set();
    join_ok(*other);
}

// ============================================================================ Barrier

namespace {

constexpr int N = 5;

struct Counters {
    std::atomic<int> a, b, c;
};

// Python's Bunch + run_threads: f runs in N-1 forked children and in this process.
template <class F>
void run_parties(F f) {
    std::vector<std::unique_ptr<mp::Process>> ps;
    for (int i = 0; i < N - 1; ++i) ps.push_back(spawn(f));
    f();
    for (auto& p : ps) join_ok(*p);
}

}  // namespace

TEST(SyncBarrier, PythonTestBarrier10) {
    mp::Barrier barrier(N, 30s);
    Shared<Counters> r;
    constexpr int passes = 10;
    run_parties([&] {
        for (int i = 0; i < passes; ++i) {
            ++r->a;
            require(r->b.load() == i * N, 2);
            (void)barrier.wait();
            ++r->b;
            require(r->a.load() == (i + 1) * N, 3);
            (void)barrier.wait();
        }
        require(barrier.n_waiting() == 0, 4);
        require(!barrier.broken(), 5);
    });
    EXPECT_EQ(r->a.load(), passes * N);
    barrier.abort();
}

TEST(SyncBarrier, PythonTestWaitReturn) {
    mp::Barrier barrier(N, 30s);
    Shared<std::array<std::atomic<int>, N>> seen;
    run_parties([&] {
        int i = barrier.wait();
        require(i >= 0 && i < N, 2);
        ++(*seen)[static_cast<std::size_t>(i)];
    });
    for (auto& s : *seen) EXPECT_EQ(s.load(), 1);  // each index exactly once, so one 0
}

TEST(SyncBarrier, PythonTestAction) {
    Shared<std::atomic<int>> results;
    mp::Barrier barrier(N, [&] { ++*results; });
    run_parties([&] {
        (void)barrier.wait();
        require(results->load() == 1, 2);  // the action ran before anyone was released
    });
    EXPECT_EQ(results->load(), 1);
}

TEST(SyncBarrier, ThrowingActionBreaksTheBarrier) {
    mp::Barrier barrier(2, [] { throw std::runtime_error("action failed"); });
    std::thread t([&] { EXPECT_THROW((void)barrier.wait(LONG), mp::BrokenBarrierError); });
    std::this_thread::sleep_for(DELTA);
    EXPECT_THROW((void)barrier.wait(LONG), std::runtime_error);
    t.join();
    EXPECT_TRUE(barrier.broken());
}

TEST(SyncBarrier, PythonTestAbort) {
    mp::Barrier barrier(N, 30s);
    Shared<Counters> r;
    run_parties([&] {
        try {
            int i = barrier.wait();
            if (i == N / 2) {
                barrier.abort();
                return;
            }
            (void)barrier.wait();
            ++r->a;
        } catch (const mp::BrokenBarrierError&) {
            ++r->b;
        }
    });
    EXPECT_EQ(r->a.load(), 0);
    EXPECT_EQ(r->b.load(), N - 1);
    EXPECT_TRUE(barrier.broken());
}

TEST(SyncBarrier, PythonTestReset) {
    mp::Barrier barrier(N, 30s);
    Shared<Counters> r;
    run_parties([&] {
        int i = barrier.wait();
        if (i == N / 2) {
            auto end = Clock::now() + LONG;
            while (barrier.n_waiting() < N - 1 && Clock::now() < end)
                std::this_thread::sleep_for(1ms);
            barrier.reset();
        } else {
            try {
                (void)barrier.wait();
                ++r->a;
            } catch (const mp::BrokenBarrierError&) {
                ++r->b;
            }
        }
        (void)barrier.wait();
        ++r->c;
    });
    EXPECT_EQ(r->a.load(), 0);
    EXPECT_EQ(r->b.load(), N - 1);
    EXPECT_EQ(r->c.load(), N);
}

TEST(SyncBarrier, PythonTestAbortAndReset) {
    mp::Barrier barrier(N, 30s);
    mp::Barrier barrier2(N, 30s);
    Shared<Counters> r;
    run_parties([&] {
        try {
            int i = barrier.wait();
            if (i == N / 2) throw std::runtime_error("abort");
            (void)barrier.wait();
            ++r->a;
        } catch (const mp::BrokenBarrierError&) {
            ++r->b;
        } catch (const std::runtime_error&) {
            barrier.abort();
        }
        if (barrier2.wait() == N / 2) barrier.reset();
        (void)barrier2.wait();
        (void)barrier.wait();
        ++r->c;
    });
    EXPECT_EQ(r->a.load(), 0);
    EXPECT_EQ(r->b.load(), N - 1);
    EXPECT_EQ(r->c.load(), N);
}

TEST(SyncBarrier, PythonTestTimeout) {
    mp::Barrier barrier(N, 30s);
    Shared<std::atomic<int>> results;
    run_parties([&] {
        int i = barrier.wait();
        if (i == N / 2) std::this_thread::sleep_for(1s);  // one party is late
        try {
            (void)barrier.wait(500ms);
        } catch (const mp::BrokenBarrierError&) {
            ++*results;
        }
    });
    EXPECT_EQ(results->load(), N);
}

TEST(SyncBarrier, PythonTestDefaultTimeout) {
    mp::Barrier barrier(N, 500ms);
    Shared<std::atomic<int>> results;
    run_parties([&] {
        int i = barrier.wait(30s);
        if (i == N / 2) std::this_thread::sleep_for(1s);
        try {
            (void)barrier.wait();
        } catch (const mp::BrokenBarrierError&) {
            ++*results;
        }
    });
    EXPECT_EQ(results->load(), N);
}

TEST(SyncBarrier, PythonTestSingleThread) {
    mp::Barrier b(1);
    EXPECT_EQ(b.wait(), 0);
    EXPECT_EQ(b.wait(), 0);
    EXPECT_EQ(b.parties(), 1);
    EXPECT_THROW(mp::Barrier(0), std::invalid_argument);
}

TEST(SyncBarrier, PythonTestThousand) {
    mp::Barrier barrier(N, 30s);
    mp::Lock lock;
    constexpr int passes = 1000;
    Shared<std::array<std::atomic<int>, passes>> arrived;
    std::vector<std::thread> ts;
    std::vector<std::unique_ptr<mp::Process>> ps;
    auto f = [&] {
        for (int i = 0; i < passes; ++i) {
            (void)barrier.wait();
            std::lock_guard g(lock);
            ++(*arrived)[static_cast<std::size_t>(i)];
        }
    };
    for (int j = 0; j < 2; ++j) ps.push_back(spawn(f));
    for (int j = 0; j < N - 2; ++j) ts.emplace_back(f);
    for (auto& t : ts) t.join();
    for (auto& p : ps) join_ok(*p);
    for (auto& a : *arrived) EXPECT_EQ(a.load(), N);
}

TEST(SyncBarrier, PartyKilledInsideTheActionBreaksTheBarrier) {
    // A party killed inside the action is a party that died inside wait(): the round it was
    // completing breaks.
    mp::Semaphore in_action(0);
    mp::Barrier barrier(2, [&] {
        in_action.release();
        std::this_thread::sleep_for(60s);
    });
    std::thread first([&] { EXPECT_THROW((void)barrier.wait(1s), mp::BrokenBarrierError); });
    ASSERT_EQ(reaches([&] { return barrier.n_waiting(); }, 1), 1);
    auto last = spawn([&] { (void)barrier.wait(); });  // arrives last: runs the action
    ASSERT_TRUE(in_action.acquire(LONG));
    kill_and_join(*last);
    first.join();
    EXPECT_TRUE(barrier.broken());
    EXPECT_THROW((void)barrier.wait(LONG), mp::BrokenBarrierError);
    barrier.reset();
    EXPECT_FALSE(barrier.broken());
    EXPECT_EQ(barrier.n_waiting(), 0);
}

// ---- Parties that die, stop or misbehave: a dead party breaks the barrier, and every timed wait
// returns by its deadline.

namespace {
// In a child: a wait that must end in BrokenBarrierError (anything else: exit code 3).
template <class Wait>
auto expect_broken(Wait w) {
    return [w]() mutable {
        try {
            (void)w();
        } catch (const mp::BrokenBarrierError&) {
            return;
        }
        require(false, 3);
    };
}
}  // namespace

TEST(SyncBarrier, LastArrivalAfterADeathDoesNotPassOneShort) {
    mp::Barrier barrier(3);
    auto dead = spawn([&] { (void)barrier.wait(); });
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
    auto later = spawn(expect_broken([&] { return barrier.wait(LONG); }));  // until reset()
    join_ok(*later);
}

TEST(SyncBarrier, PartyKilledInsideWaitWakesTheOthersWithBrokenBarrier) {
    // The survivors wait without a timeout: only the death can end their wait.
    mp::Barrier barrier(4);
    auto dead = spawn([&] { (void)barrier.wait(); });
    ASSERT_EQ(reaches([&] { return barrier.n_waiting(); }, 1), 1);
    auto s1 = spawn(expect_broken([&] { return barrier.wait(); }));
    auto s2 = spawn(expect_broken([&] { return barrier.wait(); }));
    ASSERT_EQ(reaches([&] { return barrier.n_waiting(); }, 3), 3);
    kill_and_join(*dead);
    join_ok(*s1);
    join_ok(*s2);
    EXPECT_TRUE(barrier.broken());
    EXPECT_EQ(barrier.n_waiting(), 0);
}

TEST(SyncBarrier, TimedWaitAfterADeathAndAResetReturnsByItsDeadline) {
    mp::Barrier barrier(2);
    auto dead = spawn([&] { (void)barrier.wait(); });
    ASSERT_EQ(reaches([&] { return barrier.n_waiting(); }, 1), 1);
    kill_and_join(*dead);
    barrier.reset();  // must not wait for the dead party to leave
    // Alone, it times out (and breaks the barrier), by its deadline.
    auto late = spawn(expect_broken([&] { return barrier.wait(1s); }));
    join_ok(*late);
    EXPECT_TRUE(barrier.broken());
}

TEST(SyncBarrier, ResetAfterADeathMakesTheBarrierUsableAgain) {
    constexpr int parties = 3;
    mp::Barrier barrier(parties);
    auto dead = spawn([&] { (void)barrier.wait(); });
    ASSERT_EQ(reaches([&] { return barrier.n_waiting(); }, 1), 1);
    kill_and_join(*dead);
    barrier.reset();
    EXPECT_FALSE(barrier.broken());
    EXPECT_EQ(barrier.n_waiting(), 0);
    // Fresh parties pass, twice, each arrival index given once per round.
    Shared<std::array<std::atomic<int>, parties>> seen;
    std::vector<std::unique_ptr<mp::Process>> ps;
    for (int i = 0; i < parties; ++i)
        ps.push_back(spawn([&] {
            for (int round = 0; round < 2; ++round) {
                const int index = barrier.wait(LONG);
                require(index >= 0 && index < parties, 2);
                ++(*seen)[static_cast<std::size_t>(index)];
            }
        }));
    for (auto& p : ps) join_ok(*p);
    for (auto& n : *seen) EXPECT_EQ(n.load(), 2);
    EXPECT_FALSE(barrier.broken());
}

TEST(SyncBarrier, TimedWaitReturnsByItsDeadlineWhileAPartyIsStopped) {
    mp::Barrier barrier(2);
    auto stopped = spawn(expect_broken([&] { return barrier.wait(); }));
    ASSERT_EQ(reaches([&] { return barrier.n_waiting(); }, 1), 1);
    ASSERT_EQ(::kill(stopped->pid(), SIGSTOP), 0);
    barrier.reset();  // the stopped party cannot leave: the reset stays pending
    auto late = spawn(expect_broken([&] { return barrier.wait(500ms); }));
    join_ok(*late);
    ASSERT_EQ(::kill(stopped->pid(), SIGCONT), 0);
    join_ok(*stopped);
}

TEST(SyncBarrier, TimedWaitDoesNotDependOnTheActionsDuration) {
    mp::Semaphore in_action(0), finish(0);
    mp::Barrier barrier(2, [&] {
        in_action.release();
        (void)finish.acquire(LONG);
    });
    auto first = spawn(expect_broken([&] { return barrier.wait(500ms); }));
    ASSERT_EQ(reaches([&] { return barrier.n_waiting(); }, 1), 1);
    // Arrives last and runs the action, which lasts until `finish` (or LONG).
    auto last = spawn(expect_broken([&] { return barrier.wait(); }));
    ASSERT_TRUE(in_action.acquire(LONG));
    join_ok(*first);  // its deadline passed while the action ran: the barrier broke
    finish.release();
    join_ok(*last);   // the action ended on a broken barrier: nobody was released
    EXPECT_TRUE(barrier.broken());
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

TEST(SyncBarrier, ProcessKilledHoldingTheInternalLockLeavesTheCountRight) {
    // n_waiting() holds the barrier's internal lock for most of its run: a process calling it in
    // a loop, killed, often dies holding that lock. The next holder recovers it, breaks the
    // barrier and recounts the parties inside wait() from their slots (the waiter here).
    mp::Barrier barrier(2);
    const unsigned seed = std::random_device{}();
    SCOPED_TRACE("seed " + std::to_string(seed));
    std::mt19937 rng(seed);
    int recovered = 0;
    for (int it = 0; it < 20; ++it) {
        auto waiter = spawn(expect_broken([&] { return barrier.wait(LONG); }));
        ASSERT_EQ(reaches([&] { return barrier.n_waiting(); }, 1), 1);
        auto spinner = spawn([&] {
            for (;;) (void)barrier.n_waiting();
        });
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
        auto other = spawn([&] { require(barrier.wait(LONG) >= 0, 2); });
        EXPECT_GE(barrier.wait(LONG), 0);
        join_ok(*other);
    }
    std::printf("%d of 20 kills landed while the internal lock was held\n", recovered);
}

TEST(SyncBarrier, RandomKillsNeverHangASurvivor) {
    // Parties run many rounds with timed waits; one or two are SIGKILLed at a random moment
    // (inside wait() mostly, between waits sometimes). Every survivor must end, by finishing or
    // with BrokenBarrierError, and reset() must make the barrier usable for the next parties.
    constexpr int parties = 4, rounds = 200, iterations = 30;
    mp::Barrier barrier(parties);
    Shared<std::atomic<int>> finished, broken;
    const unsigned seed = std::random_device{}();
    SCOPED_TRACE("seed " + std::to_string(seed));
    std::mt19937 rng(seed);
    for (int it = 0; it <= iterations; ++it) {
        const bool last = it == iterations;  // no kill: every party finishes
        // Short enough to keep the test short when a party dies between waits (only the
        // timeout ends that round), long for the last iteration, which must not break.
        const std::chrono::milliseconds timeout = last ? LONG : 500ms;
        finished->store(0);
        std::vector<std::unique_ptr<mp::Process>> ps;
        for (int i = 0; i < parties; ++i)
            ps.push_back(spawn([&] {
                try {
                    for (int r = 0; r < rounds; ++r) (void)barrier.wait(timeout);
                    ++*finished;
                } catch (const mp::BrokenBarrierError&) {
                    ++*broken;
                }
            }));
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
            EXPECT_EQ(finished->load(), parties);
        }
        barrier.reset();
        ASSERT_FALSE(barrier.broken()) << "iteration " << it;
        ASSERT_EQ(barrier.n_waiting(), 0) << "iteration " << it;
    }
    std::printf("%d survivors ended with BrokenBarrierError over %d iterations\n", broken->load(),
                iterations);
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

// ---- forkserver: the objects travel as memfds over the server's socket.

namespace {
const mp::ProcessOptions forkserver{.start_method = mp::StartMethod::forkserver};

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

TEST(SyncForkserver, PrimitivesAsArguments) { primitives_as_arguments(forkserver); }
TEST(SyncSpawn, PrimitivesAsArguments) { primitives_as_arguments({.start_method = mp::StartMethod::spawn}); }

TEST(SyncForkserver, BarrierWithTransferableAction) {
    action_runs = 0;
    mp::Barrier b(2, barrier_action);
    mp::Semaphore out(0);
    mp::Process p(forkserver, fs_barrier, b, out);
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
const mp::ProcessOptions forked{.start_method = mp::StartMethod::fork};

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

TEST(SyncLock, TestLock_test_lock_locked_2processes_Fork) { test_lock_locked_2processes(forked); }

TEST(SyncLock, TestLock_test_lock_locked_2processes_Forkserver) {
    test_lock_locked_2processes(forkserver);
}

TEST(SyncLock, TestLock_test_lock_locked_2processes_Spawn) {
    test_lock_locked_2processes({.start_method = mp::StartMethod::spawn});
}

TEST(SyncLock, TargetThrowingHoldingTheLockIsADeadOwnerSpawn) {
    target_throws_holding_locks({.start_method = mp::StartMethod::spawn});
}

TEST(SyncLock, TargetThrowingHoldingTheLockIsADeadOwnerFork) {
    target_throws_holding_locks(forked);
}

TEST(SyncLock, TargetThrowingHoldingTheLockIsADeadOwnerForkserver) {
    target_throws_holding_locks(forkserver);
}

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

TEST(SyncForkserver, HolderKilledIsRecovered) {
    mp::Lock lock;
    mp::Semaphore holding(0);
    mp::Process p(forkserver, fs_hold_lock, lock, holding);
    p.start();
    ASSERT_TRUE(holding.acquire(LONG));
    EXPECT_FALSE(lock.try_lock());
    kill_and_join(p);
    ASSERT_TRUE(lock.try_lock_for(LONG));
    EXPECT_TRUE(lock.owner_died());
    lock.unlock();
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
