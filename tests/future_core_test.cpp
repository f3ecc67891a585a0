// Tests for mp/detail/future_core.hpp: FutureCore's state machine, callbacks and waits (after
// Python's concurrent.futures.Future and test_concurrent_futures), when_all, wait_cores (Python's
// wait), CompletionQueue (as_completed), exceptions crossing a process boundary, and ProgressBar.
// Every wait is bounded; no assertion depends on speed (only "at least the timeout" lower bounds).

#include <gtest/gtest.h>

#include <algorithm>
#include <any>
#include <atomic>
#include <cerrno>
#include <chrono>
#include <cstdint>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <future>
#include <ios>
#include <functional>
#include <memory>
#include <mutex>
#include <new>
#include <optional>
#include <regex>
#include <stdexcept>
#include <string>
#include <system_error>
#include <limits>
#include <thread>
#include <typeinfo>
#include <variant>
#include <cxxabi.h>
#include <linux/futex.h>
#include <sys/syscall.h>
#include <unistd.h>
#include <vector>

#include "helpers/proc_state.hpp"
#include "helpers/timeouts.hpp"
#include "mp/detail/deadline.hpp"
#include "mp/detail/future_core.hpp"
#include "mp/errors.hpp"
#include "mp/process.hpp"
#include "mp/py.hpp"
#include "mp/serialize.hpp"

using namespace std::chrono_literals;
using Clock = std::chrono::steady_clock;
using mp::detail::CompletionQueue;
using mp::detail::ErrorInfo;
using mp::detail::FutureCore;
using mp::detail::FutureWaiter;
using mp::detail::ProgressBar;
using mp::detail::ReturnWhen;
using State = FutureCore::State;

namespace fc_test {
// In a named namespace so its demangled name is predictable.
struct SensorFault : std::runtime_error {
    using std::runtime_error::runtime_error;
};
// Registered with mp::register_exception by the test that uses them, and only there.
struct BadInput : std::invalid_argument {
    using std::invalid_argument::invalid_argument;
};
struct Unregistered : std::invalid_argument {
    using std::invalid_argument::invalid_argument;
};
}  // namespace fc_test

namespace {

constexpr auto SHORT = 50ms;  // a timeout that is meant to pass
constexpr auto LONG = 20s;    // a bound that is never reached unless something is broken

std::shared_ptr<FutureCore> make_core() { return std::make_shared<FutureCore>(); }

std::vector<std::shared_ptr<FutureCore>> make_cores(std::size_t n) {
    std::vector<std::shared_ptr<FutureCore>> v;
    for (std::size_t i = 0; i < n; ++i) v.push_back(make_core());
    return v;
}

std::vector<FutureCore*> raw(const std::vector<std::shared_ptr<FutureCore>>& v) {
    std::vector<FutureCore*> out;
    for (const auto& c : v) out.push_back(c.get());
    return out;
}

std::exception_ptr boom(const char* what = "boom") {
    return std::make_exception_ptr(std::runtime_error(what));
}

std::string what_of(const std::exception_ptr& e) {
    try {
        std::rethrow_exception(e);
    } catch (const std::exception& x) {
        return x.what();
    } catch (...) {
        return "?";
    }
}

// Counts the on_done calls it gets.
class CountingWaiter final : public FutureWaiter {
public:
    void on_done(FutureCore& core) noexcept override {
        calls.fetch_add(1);
        last = &core;
    }
    std::atomic<int> calls{0};
    std::atomic<FutureCore*> last{nullptr};
};

// A thread joined at scope exit, so a failing assertion never leaves it running.
class Joined {
public:
    template <class F>
    explicit Joined(F f) : t_(std::move(f)) {}
    ~Joined() {
        if (t_.joinable()) t_.join();
    }
    Joined(Joined&&) = default;

private:
    std::thread t_;
};

// The ErrorInfo for throwing `x`, as a worker would send it.
template <class E>
ErrorInfo round_trip_info(const E& x) {
    mp::Encoder e;
    try {
        throw x;
    } catch (...) {
        mp::detail::encode_current_exception(e);
    }
    const std::string bytes = e.take();
    mp::Decoder d(bytes);
    ErrorInfo info = mp::detail::decode_error_info(d);
    d.finish();
    return info;
}

std::string my_origin() {
    return mp::current_process().name + " (pid " + std::to_string(::getpid()) + ")";
}

// ---------------------------------------------------------------------------------------------
// FutureCore: states

TEST(FutureCore, StartsPending) {
    FutureCore c;
    EXPECT_EQ(c.state(), State::pending);
    EXPECT_FALSE(c.done());
    EXPECT_EQ(c.error(), nullptr);
    EXPECT_TRUE(c.bytes().empty());
}

TEST(FutureCore, SetRunningOnlyFromPending) {
    FutureCore c;
    EXPECT_TRUE(c.set_running());
    EXPECT_EQ(c.state(), State::running);
    EXPECT_FALSE(c.set_running());
    EXPECT_FALSE(c.done());

    FutureCore cancelled;
    ASSERT_TRUE(cancelled.cancel());
    EXPECT_FALSE(cancelled.set_running());
    EXPECT_EQ(cancelled.state(), State::cancelled);

    FutureCore finished;
    finished.set_result("x");
    EXPECT_FALSE(finished.set_running());
    EXPECT_EQ(finished.state(), State::finished);
}

TEST(FutureCore, CancelPendingRunsCallbacks) {
    FutureCore c;
    std::vector<std::thread::id> ran;
    c.add_done_callback([&](FutureCore& f) {
        EXPECT_EQ(&f, &c);
        EXPECT_EQ(f.state(), State::cancelled);
        ran.push_back(std::this_thread::get_id());
    });
    CountingWaiter w;
    ASSERT_TRUE(c.add_waiter(&w));
    EXPECT_TRUE(c.cancel());
    EXPECT_EQ(c.state(), State::cancelled);
    EXPECT_TRUE(c.done());
    EXPECT_EQ(c.error(), nullptr);
    ASSERT_EQ(ran.size(), 1u);
    EXPECT_EQ(ran[0], std::this_thread::get_id());
    EXPECT_EQ(w.calls.load(), 1);
    c.remove_waiter(&w);
}

TEST(FutureCore, CancelTwiceSucceedsAndRunsCallbacksOnce) {
    FutureCore c;
    int calls = 0;
    c.add_done_callback([&](FutureCore&) { ++calls; });
    EXPECT_TRUE(c.cancel());
    EXPECT_TRUE(c.cancel());  // as Python
    EXPECT_EQ(calls, 1);
}

TEST(FutureCore, CancelFailsOnceRunningOrFinished) {
    FutureCore running;
    ASSERT_TRUE(running.set_running());
    int calls = 0;
    running.add_done_callback([&](FutureCore&) { ++calls; });
    EXPECT_FALSE(running.cancel());
    EXPECT_EQ(running.state(), State::running);
    EXPECT_EQ(calls, 0);
    running.set_result("v");
    EXPECT_EQ(calls, 1);

    FutureCore finished;
    finished.set_result("v");
    EXPECT_FALSE(finished.cancel());
    EXPECT_EQ(finished.state(), State::finished);

    FutureCore failed;
    failed.set_exception(boom());
    EXPECT_FALSE(failed.cancel());
}

TEST(FutureCore, SetResultOnlyFirstCompletionCounts) {
    FutureCore c;
    ASSERT_TRUE(c.set_running());
    int calls = 0;
    c.add_done_callback([&](FutureCore&) { ++calls; });
    c.set_result("first");
    c.set_result("second");
    c.set_exception(boom());
    EXPECT_EQ(c.state(), State::finished);
    EXPECT_EQ(c.bytes(), "first");
    EXPECT_EQ(c.error(), nullptr);
    EXPECT_EQ(calls, 1);
}

TEST(FutureCore, SetResultFromPendingIsAllowed) {
    FutureCore c;  // as Python: set_result does not require running
    c.set_result("v");
    EXPECT_EQ(c.state(), State::finished);
    EXPECT_EQ(c.bytes(), "v");
}

TEST(FutureCore, SetExceptionStoresTheException) {
    FutureCore c;
    ASSERT_TRUE(c.set_running());
    auto e = boom("it failed");
    c.set_exception(e);
    c.set_result("ignored");
    c.set_exception(boom("ignored too"));
    EXPECT_EQ(c.state(), State::finished);
    EXPECT_EQ(c.error(), e);
    EXPECT_EQ(what_of(c.error()), "it failed");
    EXPECT_TRUE(c.bytes().empty());
}

TEST(FutureCore, CompletionAfterCancelIsIgnored) {
    FutureCore c;
    ASSERT_TRUE(c.cancel());
    c.set_result("late");
    c.set_exception(boom());
    EXPECT_EQ(c.state(), State::cancelled);
    EXPECT_TRUE(c.bytes().empty());
    EXPECT_EQ(c.error(), nullptr);
}

// ---------------------------------------------------------------------------------------------
// FutureCore: callbacks

TEST(FutureCore, CallbackAddedBeforeRunsInCompletingThread) {
    auto c = make_core();
    std::thread::id ran_in;
    int calls = 0;
    c->add_done_callback([&](FutureCore& f) {
        ++calls;
        ran_in = std::this_thread::get_id();
        EXPECT_EQ(f.bytes(), "v");
    });
    EXPECT_EQ(calls, 0);
    std::thread::id completer;
    std::thread t([&] {
        completer = std::this_thread::get_id();
        c->set_result("v");
    });
    t.join();
    EXPECT_EQ(calls, 1);
    EXPECT_EQ(ran_in, completer);
    EXPECT_NE(ran_in, std::this_thread::get_id());
}

TEST(FutureCore, CallbackAddedAfterRunsAtOnceInCaller) {
    auto c = make_core();
    std::thread t([&] { c->set_exception(boom()); });
    t.join();
    std::thread::id ran_in;
    int calls = 0;
    c->add_done_callback([&](FutureCore& f) {
        ++calls;
        ran_in = std::this_thread::get_id();
        EXPECT_NE(f.error(), nullptr);
    });
    EXPECT_EQ(calls, 1);
    EXPECT_EQ(ran_in, std::this_thread::get_id());
}

TEST(FutureCore, CallbacksRunInOrderOfAddition) {
    FutureCore c;
    std::vector<int> order;
    for (int i = 0; i < 5; ++i) c.add_done_callback([&order, i](FutureCore&) { order.push_back(i); });
    c.set_result("");
    EXPECT_EQ(order, (std::vector<int>{0, 1, 2, 3, 4}));
}

TEST(FutureCore, ThrowingCallbackIsReportedAndTheOthersRun) {
    FutureCore c;
    int after = 0;
    c.add_done_callback([](FutureCore&) { throw std::runtime_error("callback failed"); });
    c.add_done_callback([](FutureCore&) { throw 7; });
    c.add_done_callback([&](FutureCore&) { ++after; });
    testing::internal::CaptureStderr();
    c.set_result("v");
    c.add_done_callback([](FutureCore&) { throw std::logic_error("late callback failed"); });
    const std::string err = testing::internal::GetCapturedStderr();
    EXPECT_EQ(after, 1);
    EXPECT_EQ(err,
              "mp: exception calling callback for future: callback failed\n"
              "mp: exception calling callback for future: unknown exception\n"
              "mp: exception calling callback for future: late callback failed\n");
}

TEST(FutureCore, CallbackMayAddAnotherCallback) {
    FutureCore c;
    int inner = 0;
    c.add_done_callback([&](FutureCore& f) {
        f.add_done_callback([&](FutureCore&) { ++inner; });  // done already: runs at once
    });
    c.set_result("");
    EXPECT_EQ(inner, 1);
}

TEST(FutureCore, CallbackMayReleaseTheLastOwner) {
    auto holder = std::make_shared<std::shared_ptr<FutureCore>>(make_core());
    std::weak_ptr<FutureCore> weak = *holder;
    int later = 0;
    (*holder)->add_done_callback([holder](FutureCore&) { holder->reset(); });
    (*holder)->add_done_callback([&](FutureCore& f) {
        // The core must still be alive here, although its owner let go in the first callback.
        EXPECT_EQ(f.bytes(), "v");
        ++later;
    });
    FutureCore* c = holder->get();
    c->set_result("v");
    EXPECT_EQ(later, 1);
    EXPECT_TRUE(weak.expired());
}

// ---------------------------------------------------------------------------------------------
// FutureCore: waiting

TEST(FutureCore, WaitIsWokenBySetResultFromAnotherThread) {
    auto c = make_core();
    Joined t([c] {
        std::this_thread::sleep_for(SHORT);
        c->set_result("v");
    });
    EXPECT_TRUE(c->wait(LONG));
    EXPECT_EQ(c->bytes(), "v");
}

TEST(FutureCore, WaitIsWokenByCancelFromAnotherThread) {
    auto c = make_core();
    Joined t([c] {
        std::this_thread::sleep_for(SHORT);
        c->cancel();
    });
    EXPECT_TRUE(c->wait(LONG));
    EXPECT_EQ(c->state(), State::cancelled);
}

TEST(FutureCore, WaitWithoutLimitReturnsWhenDone) {
    auto c = make_core();
    Joined t([c] {
        std::this_thread::sleep_for(SHORT);
        c->set_exception(boom());
    });
    EXPECT_TRUE(c->wait(std::nullopt));
    EXPECT_NE(c->error(), nullptr);
}

TEST(FutureCore, WaitTimesOut) {
    FutureCore c;
    ASSERT_TRUE(c.set_running());
    const auto t0 = Clock::now();
    EXPECT_FALSE(c.wait(SHORT));
    EXPECT_GE(Clock::now() - t0, SHORT);
    EXPECT_FALSE(c.done());
}

TEST(FutureCore, WaitWithZeroOrNegativeTimeoutJustLooks) {
    FutureCore c;
    EXPECT_FALSE(c.wait(0ns));
    EXPECT_FALSE(c.wait(-1s));
    c.set_result("");
    EXPECT_TRUE(c.wait(0ns));
    EXPECT_TRUE(c.wait(-1s));
}

TEST(FutureCore, WaitWithHugeTimeoutDoesNotOverflow) {
    auto c = make_core();
    Joined t([c] {
        std::this_thread::sleep_for(SHORT);
        c->set_result("");
    });
    EXPECT_TRUE(c->wait(std::chrono::nanoseconds::max()));
}

TEST(FutureCore, ManyThreadsWaitOnOneCore) {
    auto c = make_core();
    std::atomic<int> woke{0};
    {
        std::vector<Joined> waiters;
        for (int i = 0; i < 8; ++i)
            waiters.emplace_back([c, &woke] {
                if (c->wait(LONG)) woke.fetch_add(1);
            });
        std::this_thread::sleep_for(SHORT);
        c->set_result("");
    }
    EXPECT_EQ(woke.load(), 8);
}

// wait() sleeps on a futex and the completing thread wakes it only when the word says someone
// sleeps: a wake-up lost on the way (the mark dropped by set_running, or not seen by the end)
// would still let wait(LONG) return true, but only at its limit. So each sleeper checks that it
// was woken well before it.
void expect_sleepers_woken(const std::function<void(FutureCore&)>& end) {
    auto c = make_core();
    std::atomic<int> woken{0};
    {
        std::vector<Joined> sleepers;
        for (int i = 0; i < 4; ++i)
            sleepers.emplace_back([c, &woken] {
                const auto t0 = Clock::now();
                if (c->wait(LONG) && Clock::now() - t0 < LONG / 2) woken.fetch_add(1);
            });
        std::this_thread::sleep_for(SHORT);
        end(*c);
    }
    EXPECT_EQ(woken.load(), 4);
}

TEST(FutureCore, SleepersAreWokenWhenItFinishesAfterStarting) {
    expect_sleepers_woken([](FutureCore& c) {
        ASSERT_TRUE(c.set_running());
        std::this_thread::sleep_for(SHORT);
        c.set_result("v");
    });
}

TEST(FutureCore, SleepersAreWokenByEveryEnd) {
    expect_sleepers_woken([](FutureCore& c) { c.set_result("v"); });
    expect_sleepers_woken([](FutureCore& c) { c.set_exception(boom()); });
    expect_sleepers_woken([](FutureCore& c) { EXPECT_TRUE(c.cancel()); });
}

TEST(FutureCore, ASleeperThatTimedOutDoesNotHideTheNextOne) {
    auto c = make_core();
    EXPECT_FALSE(c->wait(SHORT));  // leaves the sleeping mark behind
    expect_sleepers_woken([](FutureCore& core) { core.set_result(""); });
}

// The lock inside every core (one word, not a std::mutex): mutual exclusion under contention,
// including the hand-over to a sleeping thread.
TEST(WordMutex, ExcludesUnderContention) {
    mp::detail::WordMutex mu;
    long counter = 0;  // not atomic: the lock alone guards it (TSan checks that too)
    std::atomic<int> inside{0};
    std::atomic<long> overlaps{0};
    constexpr int kThreads = 4, kRounds = 20000;
    {
        std::vector<Joined> threads;
        for (int t = 0; t < kThreads; ++t)
            threads.emplace_back([&] {
                for (int i = 0; i < kRounds; ++i) {
                    std::lock_guard lock(mu);
                    if (inside.fetch_add(1) != 0) overlaps.fetch_add(1);
                    // A read, a preemption now and then, a write: a second thread let in while
                    // this one holds the lock (in the fast path or after sleeping) is seen in
                    // `inside` and loses an increment.
                    const long seen = counter;
                    if (i % 100 == 0) std::this_thread::yield();
                    counter = seen + 1;
                    inside.fetch_sub(1);
                }
            });
    }
    EXPECT_EQ(overlaps.load(), 0);
    EXPECT_EQ(counter, long{kThreads} * kRounds);
    ASSERT_TRUE(mu.try_lock());
    std::thread other([&] { EXPECT_FALSE(mu.try_lock()); });
    other.join();
    mu.unlock();
}

// What thread `tid` sleeps on once it sleeps in a futex call inside [object, object + size);
// nullopt when it does not within LONG.
std::optional<mp::test::FutexCall> futex_sleep_in(const std::atomic<pid_t>& tid, const void* object,
                                                  std::size_t size) {
    const auto begin = reinterpret_cast<std::uintptr_t>(object);
    for (const auto end = Clock::now() + LONG; Clock::now() < end;
         std::this_thread::sleep_for(1ms)) {
        if (tid.load() == 0) continue;
        const auto call = mp::test::futex_call_of(tid.load());
        if (call && call->word >= begin && call->word < begin + size &&
            mp::test::proc_state(tid.load()) == 'S')
            return call;
    }
    return std::nullopt;
}

pid_t this_tid() { return static_cast<pid_t>(::syscall(SYS_gettid)); }

// The fast path: threads released at the same instant all find the word free, and only one may
// take it (a load and a store in place of the compare-and-swap would let both in now and then).
TEST(WordMutex, ExcludesThreadsThatArriveTogether) {
    mp::detail::WordMutex mu;
    std::atomic<int> inside{0};
    std::atomic<long> overlaps{0};
    std::atomic<long> arrived{0};
    constexpr int kThreads = 2;  // one per core of a small machine: both run at once
    constexpr long kRounds = 100000;
    // Rounds stop at this time on a slow or busy machine (fewer chances to catch a bad lock,
    // never a failure of their own).
    const auto budget = Clock::now() + 3s;
    {
        std::vector<Joined> threads;
        for (int t = 0; t < kThreads; ++t)
            threads.emplace_back([&, t] {
                for (long round = 1; round <= kRounds; ++round) {
                    arrived.fetch_add(1);
                    for (int spins = 0; arrived.load() < round * kThreads; ++spins)
                        if (spins % 1024 == 1023) {
                            if (Clock::now() > budget) return;
                            std::this_thread::yield();
                        }
                    // The last to arrive leaves first: a varying delay lines the two attempts
                    // up exactly in some rounds.
                    for (long d = (round * 37 + t * 11) % 97; d > 0; --d) (void)arrived.load();
                    std::lock_guard lock(mu);
                    // Held a while, so that a second holder is seen.
                    bool alone = inside.fetch_add(1) == 0;
                    for (int k = 0; k < 64 && alone; ++k) alone = inside.load() == 1;
                    if (!alone) overlaps.fetch_add(1);
                    inside.fetch_sub(1);
                }
            });
    }
    EXPECT_EQ(overlaps.load(), 0);
    RecordProperty("rounds", std::to_string(arrived.load() / kThreads));
}

// Only threads of one process use a core's words: their futexes are private (FUTEX_PRIVATE_FLAG),
// which spares the kernel the shared-memory lookup on every sleep and wake. A waker and a sleeper
// must agree on it (the kernel keys the two kinds apart), so both ends use it.
TEST(WordMutex, SleepsOnAPrivateFutex) {
    mp::detail::WordMutex mu;
    mu.lock();
    std::atomic<pid_t> tid{0};
    std::optional<mp::test::FutexCall> call;
    {
        Joined contender([&] {
            tid = this_tid();
            std::lock_guard lock(mu);
        });
        call = futex_sleep_in(tid, &mu, sizeof mu);
        mu.unlock();  // wakes it (through a private wake: a shared one would leave it asleep)
    }
    ASSERT_TRUE(call.has_value()) << "the contender never slept on the mutex's word";
    EXPECT_NE(call->op & FUTEX_PRIVATE_FLAG, 0u) << "futex op " << call->op;
}

TEST(FutureCore, WaitSleepsOnAPrivateFutex) {
    auto c = make_core();
    std::atomic<pid_t> tid{0};
    std::atomic<bool> done{false};
    std::optional<mp::test::FutexCall> call;
    {
        Joined waiter([&] {
            tid = this_tid();
            done = c->wait(LONG);
        });
        call = futex_sleep_in(tid, c.get(), sizeof(FutureCore));
        c->set_result("");
    }
    ASSERT_TRUE(call.has_value()) << "wait() never slept on the core";
    EXPECT_NE(call->op & FUTEX_PRIVATE_FLAG, 0u) << "futex op " << call->op;
    EXPECT_TRUE(done.load());
}

TEST(FutureCore, WaitersAreNotifiedOnceAndCanBeRemoved) {
    FutureCore c;
    CountingWaiter kept, removed;
    ASSERT_TRUE(c.add_waiter(&kept));
    ASSERT_TRUE(c.add_waiter(&removed));
    c.remove_waiter(&removed);
    c.set_result("");
    EXPECT_EQ(kept.calls.load(), 1);
    EXPECT_EQ(kept.last.load(), &c);
    EXPECT_EQ(removed.calls.load(), 0);
    // Done: a new waiter is refused (and never called).
    CountingWaiter late;
    EXPECT_FALSE(c.add_waiter(&late));
    c.set_result("again");
    EXPECT_EQ(late.calls.load(), 0);
    EXPECT_EQ(kept.calls.load(), 1);
    c.remove_waiter(&kept);  // harmless once done
    c.remove_waiter(&late);  // harmless when not registered
}

TEST(FutureCore, SetRunningRacesCancel) {
    for (int round = 0; round < 500; ++round) {
        FutureCore c;
        std::atomic<bool> go{false};
        bool ran = false, cancelled = false;
        std::thread a([&] {
            while (!go.load()) {
            }
            ran = c.set_running();
        });
        std::thread b([&] {
            while (!go.load()) {
            }
            cancelled = c.cancel();
        });
        go.store(true);
        a.join();
        b.join();
        ASSERT_NE(ran, cancelled) << "round " << round;
        EXPECT_EQ(c.state(), ran ? State::running : State::cancelled);
    }
}

TEST(FutureCore, ConcurrentCompletionStress) {
    constexpr std::size_t kCores = 400;
    constexpr int kCompleters = 4;
    constexpr int kWaiters = 3;
    auto cores = make_cores(kCores);
    std::vector<std::atomic<int>> callbacks(kCores);
    for (std::size_t i = 0; i < kCores; ++i)
        cores[i]->add_done_callback([&callbacks, i](FutureCore&) { callbacks[i].fetch_add(1); });

    std::atomic<bool> go{false};
    std::atomic<int> waits_ok{0};
    std::atomic<std::size_t> late_callbacks{0};
    {
        std::vector<Joined> threads;
        for (int w = 0; w < kWaiters; ++w)
            threads.emplace_back([&, w] {
                while (!go.load()) {
                }
                // Each waiter waits on the cores in a different order.
                for (std::size_t k = 0; k < kCores; ++k) {
                    const std::size_t i = (k * 7 + static_cast<std::size_t>(w) * 13) % kCores;
                    if (cores[i]->wait(LONG)) waits_ok.fetch_add(1);
                }
            });
        for (int t = 0; t < kCompleters; ++t)
            threads.emplace_back([&, t] {
                while (!go.load()) {
                }
                // Every completer tries every core: only the first completion of each counts.
                for (std::size_t k = 0; k < kCores; ++k) {
                    const std::size_t i = (k + static_cast<std::size_t>(t) * 97) % kCores;
                    switch ((i + static_cast<std::size_t>(t)) % 4) {
                        case 0: cores[i]->set_result(std::to_string(t)); break;
                        case 1: cores[i]->set_exception(boom()); break;
                        case 2: cores[i]->cancel(); break;
                        default:
                            cores[i]->set_running();
                            cores[i]->add_done_callback(
                                [&](FutureCore&) { late_callbacks.fetch_add(1); });
                            break;
                    }
                }
            });
        go.store(true);
    }
    EXPECT_EQ(waits_ok.load(), static_cast<int>(kCores) * kWaiters);
    for (std::size_t i = 0; i < kCores; ++i) {
        EXPECT_TRUE(cores[i]->done()) << i;
        EXPECT_EQ(callbacks[i].load(), 1) << i;
    }
    // Each added callback ran exactly once, whether added before or after completion.
    EXPECT_EQ(late_callbacks.load(), kCores);
}

// ---------------------------------------------------------------------------------------------
// when_all

TEST(WhenAll, EmptyFinishesAtOnce) {
    auto all = FutureCore::when_all({});
    EXPECT_EQ(all->state(), State::finished);
    EXPECT_EQ(all->error(), nullptr);
    EXPECT_TRUE(all->bytes().empty());
}

TEST(WhenAll, FinishesWhenEveryPartHas) {
    auto parts = make_cores(3);
    auto all = FutureCore::when_all(parts);
    parts[1]->set_result("b");
    parts[0]->set_result("a");
    EXPECT_FALSE(all->done());
    parts[2]->set_result("c");
    EXPECT_EQ(all->state(), State::finished);
    EXPECT_EQ(all->error(), nullptr);
    EXPECT_TRUE(all->bytes().empty());
}

TEST(WhenAll, PartsAlreadyDone) {
    auto parts = make_cores(3);
    for (auto& p : parts) p->set_result("x");
    auto all = FutureCore::when_all(parts);
    EXPECT_EQ(all->state(), State::finished);
    EXPECT_EQ(all->error(), nullptr);
}

TEST(WhenAll, FailsAsSoonAsOnePartFails) {
    auto parts = make_cores(3);
    auto all = FutureCore::when_all(parts);
    parts[0]->set_result("a");
    auto e = boom("part 1 failed");
    parts[1]->set_exception(e);
    EXPECT_EQ(all->state(), State::finished);
    EXPECT_EQ(all->error(), e);
    parts[2]->set_exception(boom("later"));
    EXPECT_EQ(all->error(), e);
}

TEST(WhenAll, CancelledPartFailsWithCancelledError) {
    auto parts = make_cores(2);
    auto all = FutureCore::when_all(parts);
    ASSERT_TRUE(parts[1]->cancel());
    ASSERT_EQ(all->state(), State::finished);
    ASSERT_NE(all->error(), nullptr);
    EXPECT_THROW(std::rethrow_exception(all->error()), mp::CancelledError);
    parts[0]->set_result("");
}

TEST(WhenAll, AlreadyFailedPartFailsAtOnce) {
    auto parts = make_cores(2);
    parts[0]->set_exception(boom("early"));
    auto all = FutureCore::when_all(parts);
    EXPECT_EQ(all->state(), State::finished);
    EXPECT_EQ(what_of(all->error()), "early");
    parts[1]->set_result("");
}

TEST(WhenAll, ADuplicatedPartCountsForEachPlace) {
    auto a = make_core();
    auto b = make_core();
    std::vector<std::shared_ptr<FutureCore>> parts{a, a, b};
    auto all = FutureCore::when_all(parts);
    a->set_result("");
    EXPECT_FALSE(all->done());
    b->set_result("");
    EXPECT_EQ(all->state(), State::finished);
}

TEST(WhenAll, PartsCompletedFromManyThreads) {
    for (int round = 0; round < 50; ++round) {
        auto parts = make_cores(64);
        auto all = FutureCore::when_all(parts);
        std::atomic<int> finished_callbacks{0};
        all->add_done_callback([&](FutureCore&) { finished_callbacks.fetch_add(1); });
        {
            std::vector<Joined> threads;
            for (std::size_t t = 0; t < 4; ++t)
                threads.emplace_back([&, t] {
                    for (std::size_t i = t; i < parts.size(); i += 4) parts[i]->set_result("");
                });
        }
        ASSERT_TRUE(all->wait(LONG));
        EXPECT_EQ(all->error(), nullptr);
        EXPECT_EQ(finished_callbacks.load(), 1);
    }
}

TEST(WhenAll, KeepsNoReferenceCycle) {
    std::weak_ptr<FutureCore> finished_all, abandoned_all;
    {
        auto parts = make_cores(2);
        auto all = FutureCore::when_all(parts);
        finished_all = all;
        all.reset();
        EXPECT_FALSE(finished_all.expired());  // the pending parts' callbacks hold it
        for (auto& p : parts) p->set_result("");
        EXPECT_TRUE(finished_all.expired());  // callbacks ran and were released
    }
    {
        auto parts = make_cores(2);
        abandoned_all = FutureCore::when_all(parts);
    }
    EXPECT_TRUE(abandoned_all.expired());  // parts dropped unfinished: nothing left over
}

// ---------------------------------------------------------------------------------------------
// wait_cores

TEST(WaitCores, EmptyInputReturnsAtOnce) {
    std::vector<FutureCore*> none;
    for (ReturnWhen mode :
         {ReturnWhen::first_completed, ReturnWhen::first_exception, ReturnWhen::all_completed})
        EXPECT_TRUE(mp::detail::wait_cores(none, std::nullopt, mode).empty());
}

TEST(WaitCores, AllCompletedTimesOutWithWhatIsDone) {
    auto cores = make_cores(3);
    cores[2]->set_result("");
    const auto t0 = Clock::now();
    auto done = mp::detail::wait_cores(raw(cores), SHORT, ReturnWhen::all_completed);
    EXPECT_GE(Clock::now() - t0, SHORT);
    EXPECT_EQ(done, (std::vector<std::size_t>{2}));
}

TEST(WaitCores, AllCompletedWaitsForEvery) {
    auto cores = make_cores(4);
    cores[1]->cancel();
    Joined t([&] {
        std::this_thread::sleep_for(SHORT);
        cores[3]->set_result("");
        cores[0]->set_exception(boom());  // an exception does not end an all_completed wait
        std::this_thread::sleep_for(SHORT);
        cores[2]->set_result("");
    });
    auto done = mp::detail::wait_cores(raw(cores), LONG, ReturnWhen::all_completed);
    EXPECT_EQ(done, (std::vector<std::size_t>{0, 1, 2, 3}));
}

TEST(WaitCores, FirstCompletedReturnsAtTheFirst) {
    auto cores = make_cores(3);
    Joined t([&] {
        std::this_thread::sleep_for(SHORT);
        cores[1]->set_result("");
    });
    auto done = mp::detail::wait_cores(raw(cores), LONG, ReturnWhen::first_completed);
    ASSERT_FALSE(done.empty());
    EXPECT_EQ(done.front(), 1u);
    EXPECT_TRUE(cores[1]->done());
    for (auto& c : cores) c->set_result("");
}

TEST(WaitCores, FirstCompletedWithOneAlreadyDoneReturnsAtOnce) {
    auto cores = make_cores(3);
    cores[2]->cancel();
    auto done = mp::detail::wait_cores(raw(cores), LONG, ReturnWhen::first_completed);
    EXPECT_EQ(done, (std::vector<std::size_t>{2}));
}

TEST(WaitCores, FirstCompletedTimesOut) {
    auto cores = make_cores(2);
    const auto t0 = Clock::now();
    EXPECT_TRUE(mp::detail::wait_cores(raw(cores), SHORT, ReturnWhen::first_completed).empty());
    EXPECT_GE(Clock::now() - t0, SHORT);
}

TEST(WaitCores, FirstExceptionReturnsOnAFailure) {
    auto cores = make_cores(3);
    cores[0]->set_result("");
    Joined t([&] {
        std::this_thread::sleep_for(SHORT);
        cores[2]->set_exception(boom());
    });
    auto done = mp::detail::wait_cores(raw(cores), LONG, ReturnWhen::first_exception);
    EXPECT_EQ(done, (std::vector<std::size_t>{0, 2}));
    EXPECT_FALSE(cores[1]->done());
}

TEST(WaitCores, FirstExceptionDoesNotCountCancelled) {
    auto cores = make_cores(3);
    cores[0]->cancel();
    cores[1]->set_result("");
    const auto t0 = Clock::now();
    auto done = mp::detail::wait_cores(raw(cores), SHORT, ReturnWhen::first_exception);
    EXPECT_GE(Clock::now() - t0, SHORT);  // as Python: a cancelled future is no exception
    EXPECT_EQ(done, (std::vector<std::size_t>{0, 1}));
}

TEST(WaitCores, FirstExceptionReturnsWhenAllDoneWithoutFailure) {
    auto cores = make_cores(2);
    cores[0]->cancel();
    Joined t([&] {
        std::this_thread::sleep_for(SHORT);
        cores[1]->set_result("");
    });
    auto done = mp::detail::wait_cores(raw(cores), LONG, ReturnWhen::first_exception);
    EXPECT_EQ(done, (std::vector<std::size_t>{0, 1}));
}

TEST(WaitCores, FirstExceptionAlreadyFailedReturnsAtOnce) {
    auto cores = make_cores(2);
    cores[1]->set_exception(boom());
    auto done = mp::detail::wait_cores(raw(cores), std::nullopt, ReturnWhen::first_exception);
    EXPECT_EQ(done, (std::vector<std::size_t>{1}));
}

TEST(WaitCores, ZeroOrNegativeTimeoutJustLooks) {
    auto cores = make_cores(3);
    cores[1]->set_result("");
    for (auto timeout : {std::chrono::nanoseconds(0), std::chrono::nanoseconds(-5s)})
        EXPECT_EQ(mp::detail::wait_cores(raw(cores), timeout, ReturnWhen::all_completed),
                  (std::vector<std::size_t>{1}));
}

TEST(WaitCores, WithoutLimitWaits) {
    auto cores = make_cores(2);
    Joined t([&] {
        std::this_thread::sleep_for(SHORT);
        for (auto& c : cores) c->set_result("");
    });
    EXPECT_EQ(mp::detail::wait_cores(raw(cores), std::nullopt, ReturnWhen::all_completed),
              (std::vector<std::size_t>{0, 1}));
}

TEST(WaitCores, DuplicatedCores) {
    auto a = make_core();
    auto b = make_core();
    std::vector<FutureCore*> cores{a.get(), b.get(), a.get()};
    Joined t([&] {
        std::this_thread::sleep_for(SHORT);
        a->set_result("");
        std::this_thread::sleep_for(SHORT);
        b->set_result("");
    });
    EXPECT_EQ(mp::detail::wait_cores(cores, LONG, ReturnWhen::all_completed),
              (std::vector<std::size_t>{0, 1, 2}));
}

TEST(WaitCores, LeavesNoWaiterBehind) {
    // The waiter lives on wait_cores' stack: completing the cores afterwards must not reach it
    // (ASan would report a use after return).
    auto cores = make_cores(3);
    cores[0]->set_result("");
    mp::detail::wait_cores(raw(cores), 1ms, ReturnWhen::all_completed);
    mp::detail::wait_cores(raw(cores), LONG, ReturnWhen::first_completed);
    cores[1]->set_result("");
    mp::detail::wait_cores(raw(cores), 1ms, ReturnWhen::first_exception);
    cores[2]->set_exception(boom());
    CountingWaiter w;
    EXPECT_FALSE(cores[2]->add_waiter(&w));
}

TEST(WaitCores, ManyWaitersWhileCoresCompleteConcurrently) {
    constexpr std::size_t kCores = 200;
    auto cores = make_cores(kCores);
    std::atomic<int> ok{0};
    {
        std::vector<Joined> threads;
        for (int w = 0; w < 3; ++w)
            threads.emplace_back([&] {
                auto done = mp::detail::wait_cores(raw(cores), LONG, ReturnWhen::all_completed);
                if (done.size() == kCores) ok.fetch_add(1);
            });
        for (int w = 0; w < 3; ++w)
            threads.emplace_back([&] {
                while (true) {
                    auto done =
                        mp::detail::wait_cores(raw(cores), LONG, ReturnWhen::first_completed);
                    if (done.empty()) return;  // the bound ran out: counted as a failure below
                    if (done.size() == kCores) {
                        ok.fetch_add(1);
                        return;
                    }
                }
            });
        for (std::size_t t = 0; t < 2; ++t)
            threads.emplace_back([&, t] {
                for (std::size_t i = t; i < kCores; i += 2) {
                    if (i % 10 == 3)
                        cores[i]->cancel();
                    else
                        cores[i]->set_result("");
                }
            });
    }
    EXPECT_EQ(ok.load(), 6);
}

// ---------------------------------------------------------------------------------------------
// CompletionQueue

TEST(CompletionQueue, AlreadyDoneInInputOrderThenInCompletionOrder) {
    auto cores = make_cores(5);
    cores[3]->set_result("");
    cores[1]->cancel();
    CompletionQueue q(raw(cores));
    EXPECT_EQ(q.total(), 5u);
    EXPECT_EQ(q.handed_out(), 0u);
    cores[4]->set_exception(boom());
    cores[0]->set_result("");
    cores[2]->set_result("");
    std::vector<std::size_t> order;
    while (auto i = q.next(Clock::now() + LONG)) order.push_back(*i);
    EXPECT_EQ(order, (std::vector<std::size_t>{1, 3, 4, 0, 2}));
    EXPECT_EQ(q.handed_out(), 5u);
    EXPECT_EQ(q.next(Clock::now()), std::nullopt);
}

TEST(CompletionQueue, EmptyInputEndsAtOnce) {
    CompletionQueue q({});
    EXPECT_EQ(q.next(std::nullopt), std::nullopt);
}

TEST(CompletionQueue, TimeoutMessageCountsTheUnfinished) {
    auto cores = make_cores(3);
    cores[1]->set_result("");
    CompletionQueue q(raw(cores));
    EXPECT_EQ(q.next(Clock::now() + LONG), 1u);
    const auto t0 = Clock::now();
    try {
        q.next(Clock::now() + SHORT);
        ADD_FAILURE() << "no TimeoutError";
    } catch (const mp::TimeoutError& e) {
        EXPECT_STREQ(e.what(), "2 (of 3) futures unfinished");
    }
    EXPECT_GE(Clock::now() - t0, SHORT);
    // A passed deadline still hands out what is ready.
    cores[0]->set_result("");
    EXPECT_EQ(q.next(Clock::now() - 1s), 0u);
    try {
        q.next(Clock::now() - 1s);
        ADD_FAILURE() << "no TimeoutError";
    } catch (const mp::TimeoutError& e) {
        EXPECT_STREQ(e.what(), "1 (of 3) futures unfinished");
    }
}

TEST(CompletionQueue, IsWokenByACompletionInAnotherThread) {
    auto cores = make_cores(2);
    CompletionQueue q(raw(cores));
    Joined t([&] {
        std::this_thread::sleep_for(SHORT);
        cores[1]->set_result("");
        std::this_thread::sleep_for(SHORT);
        cores[0]->cancel();
    });
    EXPECT_EQ(q.next(Clock::now() + LONG), 1u);
    EXPECT_EQ(q.next(std::nullopt), 0u);
    EXPECT_EQ(q.next(std::nullopt), std::nullopt);
}

TEST(CompletionQueue, DuplicatedCoresHandOutEachIndex) {
    auto a = make_core();
    auto b = make_core();
    a->set_result("");
    CompletionQueue q({a.get(), b.get(), a.get(), b.get()});
    b->set_result("");
    std::vector<std::size_t> order;
    while (auto i = q.next(Clock::now() + LONG)) order.push_back(*i);
    EXPECT_EQ(order, (std::vector<std::size_t>{0, 2, 1, 3}));
}

TEST(CompletionQueue, DestructorLeavesEveryCore) {
    auto cores = make_cores(3);
    {
        CompletionQueue q(raw(cores));
        cores[0]->set_result("");
        EXPECT_EQ(q.next(Clock::now() + LONG), 0u);
    }
    // The queue is gone: completing the rest must not reach it (ASan would report it).
    cores[1]->set_result("");
    cores[2]->cancel();
}

TEST(CompletionQueue, ConcurrentCompletions) {
    constexpr std::size_t kCores = 300;
    auto cores = make_cores(kCores);
    CompletionQueue q(raw(cores));
    std::vector<std::size_t> got;
    {
        std::vector<Joined> threads;
        for (std::size_t t = 0; t < 3; ++t)
            threads.emplace_back([&, t] {
                for (std::size_t i = t; i < kCores; i += 3) cores[i]->set_result("");
            });
        while (auto i = q.next(Clock::now() + LONG)) got.push_back(*i);
    }
    std::sort(got.begin(), got.end());
    ASSERT_EQ(got.size(), kCores);
    for (std::size_t i = 0; i < kCores; ++i) EXPECT_EQ(got[i], i);
}

// ---------------------------------------------------------------------------------------------
// Exceptions across processes

TEST(RemoteException, OutOfRangeComesBackAsItself) {
    const ErrorInfo info = round_trip_info(std::out_of_range("index 7 of 3"));
    EXPECT_EQ(info.type_name, "std::out_of_range");
    EXPECT_EQ(info.message, "index 7 of 3");
    EXPECT_EQ(info.origin, my_origin());
    try {
        std::rethrow_exception(mp::detail::make_remote_exception(info));
    } catch (const std::out_of_range& e) {
        EXPECT_STREQ(e.what(), "index 7 of 3");
    } catch (...) {
        ADD_FAILURE() << "not a std::out_of_range";
    }
}

TEST(RemoteException, StandardTypesComeBackAsThemselves) {
    auto check = [](const auto& original) {
        using E = std::remove_cvref_t<decltype(original)>;
        const ErrorInfo info = round_trip_info(original);
        try {
            std::rethrow_exception(mp::detail::make_remote_exception(info));
        } catch (const E& e) {
            EXPECT_STREQ(e.what(), original.what()) << info.type_name;
            EXPECT_EQ(typeid(e), typeid(E)) << info.type_name;
        } catch (...) {
            ADD_FAILURE() << info.type_name << " came back as another type";
        }
    };
    check(std::runtime_error("a"));
    check(std::logic_error("b"));
    check(std::invalid_argument("c"));
    check(std::length_error("d"));
    check(std::domain_error("e"));
    check(std::range_error("f"));
    check(std::overflow_error("g"));
    check(std::underflow_error("h"));
    check(std::bad_alloc());
    check(mp::Error("i"));
    check(mp::TimeoutError("j"));
    check(mp::ProcessError("k"));
    check(mp::DecodeError("l"));
    check(mp::AuthenticationError("m"));
    check(mp::BrokenProcessPool("n"));
    check(mp::CancelledError("o"));
    check(mp::EOFError("p"));
    check(mp::QueueClosed("q"));
    check(mp::Empty("r"));
    check(mp::Full("s"));
    check(mp::BrokenBarrierError("t"));
}

// The exception make_remote_exception rebuilds from `original`'s ErrorInfo, caught as E.
template <class E>
std::optional<E> back_as(const E& original) {
    const ErrorInfo info = round_trip_info(original);
    try {
        std::rethrow_exception(mp::detail::make_remote_exception(info));
    } catch (const E& e) {
        EXPECT_STREQ(e.what(), original.what()) << info.type_name;
        return e;
    } catch (const std::exception& e) {
        ADD_FAILURE() << info.type_name << " came back as another type: " << e.what();
    } catch (...) {
        ADD_FAILURE() << info.type_name << " came back as another type";
    }
    return std::nullopt;
}

TEST(RemoteException, MpsOwnTypesComeBackAsThemselves) {
    EXPECT_TRUE(back_as(mp::ShutDown()));
    EXPECT_TRUE(back_as(mp::ShutDown("shut down for good")));
    EXPECT_TRUE(back_as(mp::py::UnpicklingError("bad opcode")));
    EXPECT_TRUE(back_as(mp::py::PicklingError("not UTF-8")));
    EXPECT_TRUE(back_as(mp::EmptyHandle("empty")));
    EXPECT_TRUE(back_as(mp::InvalidStateError("finished")));
    EXPECT_TRUE(back_as(mp::BrokenPromise()));
    if (auto e = back_as(mp::WorkerDied(4242, -9))) {
        EXPECT_EQ(e->pid(), 4242);
        EXPECT_EQ(e->signal(), 9);
        EXPECT_EQ(e->exit_code(), std::nullopt);
    }
    if (auto e = back_as(mp::WorkerDied(77, 3))) {
        EXPECT_EQ(e->pid(), 77);
        EXPECT_EQ(e->exit_code(), 3);
        EXPECT_EQ(e->where(), "");
    }
    if (auto e = back_as(mp::WorkerDied(78, -11, "MPIRank-2@node7"))) {
        EXPECT_EQ(e->pid(), 78);
        EXPECT_EQ(e->signal(), 11);
        EXPECT_EQ(e->where(), "MPIRank-2@node7");
        EXPECT_STREQ(e->what(), "worker process 78 of MPIRank-2@node7 was killed by signal 11 (SIGSEGV)");
    }
    if (auto e = back_as(mp::BufferTooShort(std::string("\0the whole message", 18)))) {
        EXPECT_EQ(e->message(), std::string("\0the whole message", 18));
    }
}

TEST(RemoteException, SystemErrorKeepsItsCode) {
    const std::system_error with_arg(ENOENT, std::generic_category(), "open /nowhere");
    if (auto e = back_as(with_arg)) {
        EXPECT_EQ(e->code(), std::error_code(ENOENT, std::generic_category()));
    }
    const std::system_error without_arg(std::error_code(EACCES, std::system_category()));
    if (auto e = back_as(without_arg)) {
        EXPECT_EQ(e->code(), std::error_code(EACCES, std::system_category()));
    }
    const std::system_error odd_arg(EPIPE, std::system_category(), "write: Broken pipe: twice");
    if (auto e = back_as(odd_arg)) {
        EXPECT_EQ(e->code(), std::error_code(EPIPE, std::system_category()));
    }
    // As itself, with the same type: not a look-alike.
    const ErrorInfo info = round_trip_info(with_arg);
    try {
        std::rethrow_exception(mp::detail::make_remote_exception(info));
    } catch (const std::exception& e) {
        EXPECT_EQ(typeid(e), typeid(std::system_error));
    }
}

TEST(RemoteException, StreamAndFilesystemErrorsKeepCodeAndPaths) {
    namespace fs = std::filesystem;
    if (auto e = back_as(std::ios_base::failure("read failed"))) {
        EXPECT_EQ(e->code(), std::io_errc::stream);
    }
    if (auto e = back_as(std::ios_base::failure("eof", std::error_code(EIO, std::generic_category())))) {
        EXPECT_EQ(e->code(), std::error_code(EIO, std::generic_category()));
    }
    const auto enoent = std::make_error_code(std::errc::no_such_file_or_directory);
    if (auto e = back_as(fs::filesystem_error("copy", fs::path("/a b"), fs::path("/c"), enoent))) {
        EXPECT_EQ(e->code(), enoent);
        EXPECT_EQ(e->path1(), fs::path("/a b"));
        EXPECT_EQ(e->path2(), fs::path("/c"));
    }
    if (auto e = back_as(fs::filesystem_error("remove", fs::path("/x"), enoent))) {
        EXPECT_EQ(e->path1(), fs::path("/x"));
        EXPECT_TRUE(e->path2().empty());
    }
    if (auto e = back_as(fs::filesystem_error("", enoent))) {
        EXPECT_EQ(e->code(), enoent);
    }
}

TEST(RemoteException, FutureAndRegexErrorsKeepTheirCodes) {
    for (const std::future_errc c : {std::future_errc::broken_promise, std::future_errc::future_already_retrieved,
                                     std::future_errc::promise_already_satisfied, std::future_errc::no_state}) {
        if (auto e = back_as(std::future_error(c))) {
            EXPECT_EQ(e->code(), std::make_error_code(c));
        }
    }
    // As the library throws it (get() of a future whose promise went away).
    std::future<int> orphan = std::promise<int>().get_future();
    try {
        (void)orphan.get();
        FAIL() << "no future_error";
    } catch (const std::future_error& original) {
        if (auto e = back_as(original)) {
            EXPECT_EQ(e->code(), std::future_errc::broken_promise);
        }
    }
    if (auto e = back_as(std::regex_error(std::regex_constants::error_paren))) {
        EXPECT_EQ(e->code(), std::regex_constants::error_paren);
    }
    // As the library throws it, with its own message ("Unexpected end of regex when in an open
    // parenthesis." or the like), which comes back too.
    try {
        std::regex bad("(ab");
        FAIL() << "no regex_error";
    } catch (const std::regex_error& original) {
        if (auto e = back_as(original)) {
            EXPECT_EQ(e->code(), original.code());
        }
    }
}

TEST(RemoteException, BadCastAndBadVariantAccessComeBackAsThemselves) {
    EXPECT_TRUE(back_as(std::bad_cast()));
    std::variant<int, std::string> v = 1;
    try {
        (void)std::get<std::string>(v);
        FAIL() << "no bad_variant_access";
    } catch (const std::bad_variant_access& original) {
        // Its message (libstdc++: "std::get: wrong index for variant") comes back too.
        EXPECT_TRUE(back_as(original));
    }
    EXPECT_TRUE(back_as(std::bad_variant_access()));
}

// E's name as ErrorInfo spells it (demangled typeid; "std::ios_base::failure[abi:cxx11]").
template <class E>
std::string name_of() {
    int status = 0;
    char* out = abi::__cxa_demangle(typeid(E).name(), nullptr, nullptr, &status);
    std::string name = status == 0 ? out : typeid(E).name();
    std::free(out);
    return name;
}

TEST(RemoteException, AStreamsOwnFailureComesBackAsIosBaseFailure) {
    // libstdc++'s streams throw std::__ios_failure, its own subclass of ios_base::failure: it
    // comes back as the standard type, with its code and message. (Encoded where it is caught:
    // round_trip_info would throw a copy sliced to ios_base::failure.)
    std::ifstream in;
    in.exceptions(std::ios::failbit);
    mp::Encoder enc;
    std::error_code code;
    std::string what;
    try {
        in.open("/nonexistent/mp-future-core-test");
        FAIL() << "no ios_base::failure";
    } catch (const std::ios_base::failure& original) {
        code = original.code();
        what = original.what();
        mp::detail::encode_current_exception(enc);
    }
    const std::string bytes = enc.take();
    mp::Decoder d(bytes);
    const ErrorInfo info = mp::detail::decode_error_info(d);
    EXPECT_EQ(info.type_name, name_of<std::ios_base::failure>());
    try {
        std::rethrow_exception(mp::detail::make_remote_exception(info));
    } catch (const std::ios_base::failure& e) {
        EXPECT_EQ(e.code(), code);
        EXPECT_EQ(e.what(), what);
    } catch (const std::exception& e) {
        ADD_FAILURE() << "came back as another type: " << e.what();
    }
}

TEST(RemoteException, OtherStandardTypesComeBackAsThemselves) {
    std::optional<int> none;
    try {
        (void)none.value();
        FAIL() << "no bad_optional_access";
    } catch (const std::bad_optional_access& original) {
        EXPECT_TRUE(back_as(original));
    }
    EXPECT_TRUE(back_as(std::bad_any_cast()));
    EXPECT_TRUE(back_as(std::bad_function_call()));
    EXPECT_TRUE(back_as(std::bad_weak_ptr()));
    EXPECT_TRUE(back_as(std::bad_typeid()));
    EXPECT_TRUE(back_as(std::bad_exception()));
    EXPECT_TRUE(back_as(std::bad_array_new_length()));
    // std::exception itself (back_as cannot tell it from the others).
    try {
        std::rethrow_exception(mp::detail::make_remote_exception(round_trip_info(std::exception())));
    } catch (const std::exception& e) {
        EXPECT_EQ(typeid(e), typeid(std::exception));
        EXPECT_STREQ(e.what(), std::exception().what());
    }
}

// An ErrorInfo as a forged or damaged peer might send it.
ErrorInfo forged(std::string type_name, std::string detail) {
    return {std::move(type_name), "forged", "Peer (pid 1)", std::move(detail)};
}

template <class... V>
std::string encoded(const V&... v) {
    mp::Encoder e;
    (e.put(v), ...);
    return e.take();
}

TEST(RemoteException, AForgedDetailIsARemoteError) {
    const std::string worker_died = name_of<mp::WorkerDied>();
    const std::string system_error = name_of<std::system_error>();
    const std::string fs_error = name_of<std::filesystem::filesystem_error>();
    const ErrorInfo cases[] = {
        // -INT_MIN is no signal number: WorkerDied::signal() would overflow.
        forged(worker_died, encoded(std::int32_t{7}, std::numeric_limits<std::int32_t>::min())),
        forged(worker_died, encoded(std::int32_t{7})),
        forged(system_error, ""),
        forged(system_error, encoded(std::uint8_t{200}, std::int32_t{2})),
        forged(fs_error, encoded(std::uint8_t{1}, std::int32_t{2}, std::string("/only-one-path"))),
        // A future_error's code must be in the future category and one of its four values; a
        // regex_error's one of the thirteen error types.
        forged(name_of<std::future_error>(), encoded(std::uint8_t{2}, std::int32_t{4})),
        forged(name_of<std::future_error>(), encoded(std::uint8_t{4}, std::int32_t{99})),
        forged(name_of<std::future_error>(), ""),
        forged(name_of<std::regex_error>(), encoded(std::int32_t{-1})),
        forged(name_of<std::regex_error>(), ""),
    };
    for (const ErrorInfo& info : cases) {
        try {
            std::rethrow_exception(mp::detail::make_remote_exception(info));
        } catch (const mp::RemoteError& e) {
            EXPECT_EQ(e.type_name(), info.type_name);
            EXPECT_EQ(e.message(), "forged");
        } catch (...) {
            ADD_FAILURE() << info.type_name << " with " << info.detail.size() << " bytes of detail: not a RemoteError";
        }
    }
}

TEST(RemoteException, ARebuiltExceptionKeepsItsTypeOnTheNextHop) {
    std::variant<int, std::string> v = 1;
    std::exception_ptr first;
    try {
        (void)std::get<std::string>(v);
    } catch (const std::bad_variant_access&) {
        mp::Encoder e;
        mp::detail::encode_current_exception(e);
        const std::string bytes = e.take();
        mp::Decoder d(bytes);
        first = mp::detail::make_remote_exception(mp::detail::decode_error_info(d));
    }
    ASSERT_TRUE(first);
    // Passed on by a process that caught it.
    mp::Encoder e;
    try {
        std::rethrow_exception(first);
    } catch (...) {
        mp::detail::encode_current_exception(e);
    }
    const std::string bytes = e.take();
    mp::Decoder d(bytes);
    const ErrorInfo info = mp::detail::decode_error_info(d);
    EXPECT_EQ(info.type_name, "std::bad_variant_access");
    EXPECT_THROW(std::rethrow_exception(mp::detail::make_remote_exception(info)), std::bad_variant_access);
}

class OtherCategory final : public std::error_category {
public:
    const char* name() const noexcept override { return "other"; }
    std::string message(int) const override { return "other failure"; }
};

TEST(RemoteException, SystemErrorOfAnotherCategoryBecomesRemoteError) {
    static const OtherCategory other;
    const ErrorInfo info = round_trip_info(std::system_error(5, other, "op"));
    try {
        std::rethrow_exception(mp::detail::make_remote_exception(info));
    } catch (const mp::RemoteError& e) {
        EXPECT_EQ(e.type_name(), "std::system_error");
        EXPECT_EQ(e.message(), "op: other failure");
    } catch (...) {
        ADD_FAILURE() << "not an mp::RemoteError";
    }
}

TEST(RemoteException, CustomTypeBecomesRemoteError) {
    const ErrorInfo info = round_trip_info(fc_test::SensorFault("sensor 3 is on fire"));
    EXPECT_EQ(info.type_name, "fc_test::SensorFault");
    try {
        std::rethrow_exception(mp::detail::make_remote_exception(info));
    } catch (const mp::RemoteError& e) {
        EXPECT_EQ(e.type_name(), "fc_test::SensorFault");
        EXPECT_EQ(e.message(), "sensor 3 is on fire");
        EXPECT_NE(e.origin().find("(pid " + std::to_string(::getpid()) + ")"), std::string::npos)
            << e.origin();
        EXPECT_EQ(e.origin(), my_origin());
        EXPECT_EQ(std::string(e.what()),
                  "fc_test::SensorFault: sensor 3 is on fire (raised in " + my_origin() + ")");
    } catch (...) {
        ADD_FAILURE() << "not an mp::RemoteError";
    }
}

// A user's type comes back as a RemoteError until the reading process registers it; then as
// itself, with the remote message. Another type stays a RemoteError.
TEST(RemoteException, ARegisteredUserTypeComesBackAsItself) {
    const ErrorInfo info = round_trip_info(fc_test::BadInput("field 'age' is not a number"));
    EXPECT_THROW(std::rethrow_exception(mp::detail::make_remote_exception(info)), mp::RemoteError);
    mp::register_exception<fc_test::BadInput>();
    mp::register_exception<fc_test::BadInput>();  // again: harmless
    mp::register_exception<std::out_of_range>();   // one mp knows already: harmless
    try {
        std::rethrow_exception(mp::detail::make_remote_exception(info));
    } catch (const fc_test::BadInput& e) {
        EXPECT_EQ(std::string(e.what()), "field 'age' is not a number");
    } catch (...) {
        ADD_FAILURE() << "not a fc_test::BadInput";
    }
    EXPECT_THROW(std::rethrow_exception(
                     mp::detail::make_remote_exception(round_trip_info(fc_test::Unregistered("x")))),
                 mp::RemoteError);
    EXPECT_THROW(std::rethrow_exception(mp::detail::make_remote_exception(round_trip_info(std::out_of_range("y")))),
                 std::out_of_range);
}

TEST(RemoteException, NonStandardThrowBecomesRemoteError) {
    const ErrorInfo info = round_trip_info(42);
    EXPECT_EQ(info.type_name, "int");
    EXPECT_EQ(info.message, "unknown exception");
    EXPECT_THROW(std::rethrow_exception(mp::detail::make_remote_exception(info)),
                 mp::RemoteError);
}

TEST(RemoteException, RemoteErrorKeepsItsOriginAcrossHops) {
    // A worker passing on a RemoteError from its own child reports the original, not itself.
    const mp::RemoteError first("app::Fault", "deep down", "Process-1:2 (pid 4242)");
    const ErrorInfo info = round_trip_info(first);
    EXPECT_EQ(info.type_name, "app::Fault");
    EXPECT_EQ(info.message, "deep down");
    EXPECT_EQ(info.origin, "Process-1:2 (pid 4242)");
    try {
        std::rethrow_exception(mp::detail::make_remote_exception(info));
    } catch (const mp::RemoteError& e) {
        EXPECT_STREQ(e.what(), first.what());
    }
}

TEST(RemoteException, OriginUsesTheProcessName) {
    const std::string saved = mp::current_process().name;
    mp::current_process().name = "ForkServerPoolWorker-2";
    const ErrorInfo info = round_trip_info(std::runtime_error("x"));
    mp::current_process().name = saved;
    EXPECT_EQ(info.origin, "ForkServerPoolWorker-2 (pid " + std::to_string(::getpid()) + ")");
}

TEST(RemoteException, TruncatedInfoIsADecodeError) {
    mp::Encoder e;
    try {
        throw std::runtime_error("x");
    } catch (...) {
        mp::detail::encode_current_exception(e);
    }
    std::string bytes = e.take();
    bytes.resize(bytes.size() - 3);
    mp::Decoder d(bytes);
    EXPECT_THROW(mp::detail::decode_error_info(d), mp::DecodeError);
}

TEST(RemoteException, EncodedAfterOtherValues) {
    // The pool writes outcomes one after another into one buffer.
    mp::Encoder e;
    e.put(std::string("before"));
    try {
        throw std::invalid_argument("bad");
    } catch (...) {
        mp::detail::encode_current_exception(e);
    }
    e.put(std::uint32_t{7});
    const std::string bytes = e.take();
    mp::Decoder d(bytes);
    EXPECT_EQ(d.get<std::string>(), "before");
    const ErrorInfo info = mp::detail::decode_error_info(d);
    EXPECT_EQ(info.type_name, "std::invalid_argument");
    EXPECT_EQ(d.get<std::uint32_t>(), 7u);
    d.finish();
}

// ---------------------------------------------------------------------------------------------
// ProgressBar

TEST(ProgressBar, RenderBeforeAnyProgress) {
    testing::internal::CaptureStderr();
    {
        ProgressBar bar("map", 100);
        const std::string line = bar.render();
        EXPECT_EQ(line.rfind("map 0/100 [", 0), 0u) << line;
        EXPECT_NE(line.find("  0%"), std::string::npos) << line;
        EXPECT_NE(line.find("ETA ?"), std::string::npos) << line;
    }
    testing::internal::GetCapturedStderr();
}

TEST(ProgressBar, RenderShowsCountBarPercentRateAndEta) {
    testing::internal::CaptureStderr();
    {
        ProgressBar bar("map", 100);
        std::this_thread::sleep_for(2ms);  // a nonzero elapsed time for the rate
        bar.advance(30);
        const std::string line = bar.render();
        static const std::regex format(
            R"(map 30/100 \[=====> {14}\]  30% [0-9]+\.[0-9]/s ETA [0-9]+:[0-9]{2}(:[0-9]{2})?)");
        EXPECT_TRUE(std::regex_match(line, format)) << line;
    }
    testing::internal::GetCapturedStderr();
}

TEST(ProgressBar, CompleteAndOverfull) {
    testing::internal::CaptureStderr();
    {
        ProgressBar bar("imap", 4);
        std::this_thread::sleep_for(2ms);
        bar.advance(4);
        const std::string full = bar.render();
        EXPECT_NE(full.find("4/4 [====================] 100%"), std::string::npos) << full;
        EXPECT_NE(full.find("ETA 0:00"), std::string::npos) << full;
        bar.advance(2);  // more than announced: clamped, never past 100%
        const std::string over = bar.render();
        EXPECT_NE(over.find("6/4 [====================] 100%"), std::string::npos) << over;
    }
    testing::internal::GetCapturedStderr();
}

TEST(ProgressBar, AddTotalGrowsTheTotal) {
    testing::internal::CaptureStderr();
    {
        ProgressBar bar("as_completed", 0);
        EXPECT_NE(bar.render().find("0/0"), std::string::npos);
        bar.add_total(10);
        bar.add_total(5);
        bar.advance(3);
        EXPECT_NE(bar.render().find("3/15"), std::string::npos) << bar.render();
    }
    testing::internal::GetCapturedStderr();
}

TEST(ProgressBar, FinalLineAtDestructionOffATerminal) {
    testing::internal::CaptureStderr();  // a file: not a terminal
    {
        ProgressBar bar("map", 5);
        for (int i = 0; i < 5; ++i) bar.advance();
    }
    const std::string err = testing::internal::GetCapturedStderr();
    // Plain lines (no carriage return), the last one the final state.
    ASSERT_FALSE(err.empty());
    EXPECT_EQ(err.find('\r'), std::string::npos) << err;
    EXPECT_EQ(err.back(), '\n');
    const std::size_t last = err.rfind('\n', err.size() - 2);
    const std::string final_line = err.substr(last == std::string::npos ? 0 : last + 1);
    EXPECT_EQ(final_line.rfind("map 5/5 [====================] 100% ", 0), 0u) << err;
}

TEST(ProgressBar, ConcurrentAdvance) {
    testing::internal::CaptureStderr();
    {
        ProgressBar bar("map", 4000);
        {
            std::vector<Joined> threads;
            for (int t = 0; t < 4; ++t)
                threads.emplace_back([&] {
                    for (int i = 0; i < 1000; ++i) {
                        bar.advance();
                        if (i % 100 == 0) (void)bar.render();
                    }
                });
        }
        EXPECT_EQ(bar.render().rfind("map 4000/4000 ", 0), 0u) << bar.render();
    }
    testing::internal::GetCapturedStderr();
}

TEST(ProgressBar, AdvancedByFutureCallbacks) {
    testing::internal::CaptureStderr();
    {
        auto bar = std::make_shared<ProgressBar>("submit", 3);
        auto cores = make_cores(3);
        for (auto& c : cores) c->add_done_callback([bar](FutureCore&) { bar->advance(); });
        {
            Joined t([&] {
                for (auto& c : cores) c->set_result("");
            });
        }
        EXPECT_EQ(bar->render().rfind("submit 3/3 ", 0), 0u) << bar->render();
    }
    testing::internal::GetCapturedStderr();
}

// ---- detail::Timeout: the conversion behind every timeout of the library (issue 12 item 5) ----

TEST(Timeout, ForeverDurationsOfEveryTypeMeanNoLimit) {
    using mp::detail::Timeout;
    mp::test::for_each_forever([](auto d) { EXPECT_FALSE(Timeout(d).has_value()); });
    EXPECT_FALSE(Timeout().has_value());
    EXPECT_FALSE(Timeout(std::nullopt).has_value());
    EXPECT_FALSE(Timeout(std::optional<std::chrono::seconds>(std::chrono::seconds::max())).has_value());
    EXPECT_FALSE(Timeout(mp::detail::forever).has_value());
    EXPECT_FALSE(mp::detail::deadline_after(std::chrono::hours::max()).has_value());
}

TEST(Timeout, ZeroNegativeAndNaNMeanZero) {
    using mp::detail::Timeout;
    mp::test::for_each_no_wait([](auto d) {
        const Timeout t(d);
        ASSERT_TRUE(t.has_value());
        EXPECT_EQ(*t, 0ns);
    });
    const Timeout nan{std::chrono::duration<double>(std::numeric_limits<double>::quiet_NaN())};
    ASSERT_TRUE(nan.has_value());
    EXPECT_EQ(*nan, 0ns);
    const auto before = Clock::now();
    const auto d = mp::detail::deadline_after(std::chrono::seconds::min());
    ASSERT_TRUE(d.has_value());
    EXPECT_GE(*d, before);
    EXPECT_LE(*d, Clock::now());
}

TEST(Timeout, OrdinaryDurationsKeepTheirLengthRoundedUp) {
    using mp::detail::Timeout;
    EXPECT_EQ(*Timeout(1500ms), 1500ms);
    EXPECT_EQ(*Timeout(std::chrono::duration<double>(0.25)), 250ms);
    EXPECT_EQ(*Timeout(std::chrono::duration<double, std::nano>(1.5)), 2ns);
    EXPECT_EQ(*Timeout(std::chrono::duration<long long, std::pico>(1)), 1ns);
    EXPECT_EQ(*Timeout(std::chrono::hours(24 * 365 * 30)), std::chrono::hours(24 * 365 * 30));
    EXPECT_EQ(*Timeout(std::optional<std::chrono::seconds>(2s)), 2s);
    EXPECT_EQ(mp::detail::remaining(std::nullopt), Timeout());
    EXPECT_EQ(mp::detail::remaining(Clock::now() - 1s), Timeout(0s));
    const Timeout left = mp::detail::remaining(Clock::now() + 1h);
    ASSERT_TRUE(left.has_value());
    EXPECT_GT(*left, 59min);
    EXPECT_LE(*left, 1h);
}

TEST(Timeout, FutureCoreWaitWithEveryTimeout) {
    auto core = std::make_shared<FutureCore>();
    mp::test::for_each_no_wait([&](auto t) { EXPECT_FALSE(core->wait(mp::detail::Timeout(t))); });
    std::thread finisher([&] {
        std::this_thread::sleep_for(30ms);
        core->set_result("x");
    });
    mp::test::for_each_forever([&](auto forever) { EXPECT_TRUE(core->wait(mp::detail::Timeout(forever))); });
    finisher.join();
}

}  // namespace
