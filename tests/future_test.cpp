// Tests for the standalone futures of mp/futures.hpp: mp::Promise<T> and the mp::Future<T> it
// completes, ported from CPython's test_concurrent_futures (test_future.py FutureTests, and the
// parts of test_wait.py / test_as_completed.py that use hand-made futures). Python builds its
// futures in a given state by poking _state; here each state is reached through the public API.
// Every wait is bounded; no assertion depends on speed.

#include <gtest/gtest.h>

#include <atomic>
#include <chrono>
#include <memory>
#include <stdexcept>
#include <string>
#include <system_error>
#include <thread>
#include <vector>

#include "mp/errors.hpp"
#include "mp/futures.hpp"

using namespace std::chrono_literals;

namespace {

constexpr auto LONG = 20s;  // a bound that is never reached unless something is broken

struct States {
    mp::Promise<int> pending, running, cancelled, exception, successful;
    States() {
        EXPECT_TRUE(running.set_running_or_notify_cancel());
        EXPECT_TRUE(cancelled.future().cancel());
        exception.set_exception(std::system_error(std::make_error_code(std::errc::io_error)));
        successful.set_result(42);
    }
};

std::string what_of(const std::exception_ptr& e) {
    try {
        std::rethrow_exception(e);
    } catch (const std::exception& x) {
        return x.what();
    }
}

}  // namespace

TEST(FutureTests, DoneCallbackWithResult) {
    int callback_result = 0;
    mp::Promise<int> p;
    p.future().add_done_callback([&](const mp::Future<int>& f) { callback_result = f.result(); });
    p.set_result(5);
    EXPECT_EQ(callback_result, 5);
}

TEST(FutureTests, DoneCallbackWithException) {
    std::exception_ptr callback_exception;
    mp::Promise<int> p;
    p.future().add_done_callback(
        [&](const mp::Future<int>& f) { callback_exception = f.exception(); });
    p.set_exception(std::runtime_error("test"));
    ASSERT_TRUE(callback_exception);
    EXPECT_EQ(what_of(callback_exception), "test");
}

TEST(FutureTests, DoneCallbackWithCancel) {
    bool was_cancelled = false;
    mp::Promise<int> p;
    auto f = p.future();
    f.add_done_callback([&](const mp::Future<int>& g) { was_cancelled = g.cancelled(); });
    EXPECT_TRUE(f.cancel());
    EXPECT_TRUE(was_cancelled);
}

TEST(FutureTests, DoneCallbackRaises) {
    bool raising_was_called = false, fn_was_called = false;
    mp::Promise<int> p;
    auto f = p.future();
    f.add_done_callback([&](const mp::Future<int>&) {
        raising_was_called = true;
        throw std::runtime_error("doh!");
    });
    f.add_done_callback([&](const mp::Future<int>&) { fn_was_called = true; });
    testing::internal::CaptureStderr();
    p.set_result(5);
    const std::string err = testing::internal::GetCapturedStderr();
    EXPECT_TRUE(raising_was_called);
    EXPECT_TRUE(fn_was_called);
    EXPECT_NE(err.find("doh!"), std::string::npos) << err;
}

TEST(FutureTests, DoneCallbackAlreadySuccessful) {
    int callback_result = 0;
    mp::Promise<int> p;
    p.set_result(5);
    p.future().add_done_callback([&](const mp::Future<int>& f) { callback_result = f.result(); });
    EXPECT_EQ(callback_result, 5);
}

TEST(FutureTests, DoneCallbackAlreadyFailed) {
    std::exception_ptr callback_exception;
    mp::Promise<int> p;
    p.set_exception(std::runtime_error("test"));
    p.future().add_done_callback(
        [&](const mp::Future<int>& f) { callback_exception = f.exception(); });
    ASSERT_TRUE(callback_exception);
    EXPECT_EQ(what_of(callback_exception), "test");
}

TEST(FutureTests, DoneCallbackAlreadyCancelled) {
    bool was_cancelled = false;
    mp::Promise<int> p;
    EXPECT_TRUE(p.future().cancel());
    p.future().add_done_callback([&](const mp::Future<int>& f) { was_cancelled = f.cancelled(); });
    EXPECT_TRUE(was_cancelled);
}

TEST(FutureTests, DoneCallbackRaisesAlreadySucceeded) {
    mp::Promise<int> p;
    p.set_result(5);
    testing::internal::CaptureStderr();
    p.future().add_done_callback([](const mp::Future<int>&) { throw std::runtime_error("doh!"); });
    const std::string err = testing::internal::GetCapturedStderr();
    EXPECT_NE(err.find("exception calling callback for"), std::string::npos) << err;
    EXPECT_NE(err.find("doh!"), std::string::npos) << err;
}

TEST(FutureTests, Cancel) {
    States s;
    auto f1 = s.pending.future();
    EXPECT_TRUE(f1.cancel());
    EXPECT_TRUE(f1.cancelled());
    EXPECT_FALSE(s.running.future().cancel());
    EXPECT_TRUE(s.running.future().running());
    EXPECT_TRUE(s.cancelled.future().cancel());  // cancelling twice succeeds
    EXPECT_TRUE(s.cancelled.future().cancelled());
    EXPECT_FALSE(s.exception.future().cancel());
    EXPECT_FALSE(s.exception.future().cancelled());
    EXPECT_FALSE(s.successful.future().cancel());
    EXPECT_EQ(s.successful.future().result(0s), 42);
}

TEST(FutureTests, Cancelled) {
    States s;
    EXPECT_FALSE(s.pending.future().cancelled());
    EXPECT_FALSE(s.running.future().cancelled());
    EXPECT_TRUE(s.cancelled.future().cancelled());
    EXPECT_FALSE(s.exception.future().cancelled());
    EXPECT_FALSE(s.successful.future().cancelled());
}

TEST(FutureTests, Done) {
    States s;
    EXPECT_FALSE(s.pending.future().done());
    EXPECT_FALSE(s.running.future().done());
    EXPECT_TRUE(s.cancelled.future().done());
    EXPECT_TRUE(s.exception.future().done());
    EXPECT_TRUE(s.successful.future().done());
}

TEST(FutureTests, Running) {
    States s;
    EXPECT_FALSE(s.pending.future().running());
    EXPECT_TRUE(s.running.future().running());
    EXPECT_FALSE(s.cancelled.future().running());
    EXPECT_FALSE(s.exception.future().running());
    EXPECT_FALSE(s.successful.future().running());
}

TEST(FutureTests, ResultWithTimeout) {
    States s;
    EXPECT_THROW(s.pending.future().result(0s), mp::TimeoutError);
    EXPECT_THROW(s.running.future().result(0s), mp::TimeoutError);
    EXPECT_THROW(s.cancelled.future().result(0s), mp::CancelledError);
    EXPECT_THROW(s.exception.future().result(0s), std::system_error);
    EXPECT_EQ(s.successful.future().result(0s), 42);
}

TEST(FutureTests, ResultWithSuccess) {
    mp::Promise<int> p;
    std::thread t([p] {
        std::this_thread::sleep_for(100ms);  // let the main thread wait first (usually)
        p.set_result(42);
    });
    EXPECT_EQ(p.future().result(LONG), 42);
    t.join();
}

TEST(FutureTests, ResultWithCancel) {
    mp::Promise<int> p;
    auto f = p.future();
    std::thread t([f] {
        std::this_thread::sleep_for(100ms);
        f.cancel();
    });
    EXPECT_THROW(f.result(LONG), mp::CancelledError);
    t.join();
}

TEST(FutureTests, ExceptionWithTimeout) {
    States s;
    EXPECT_THROW(s.pending.future().exception(0s), mp::TimeoutError);
    EXPECT_THROW(s.running.future().exception(0s), mp::TimeoutError);
    EXPECT_THROW(s.cancelled.future().exception(0s), mp::CancelledError);
    auto e = s.exception.future().exception(0s);
    ASSERT_TRUE(e);
    EXPECT_THROW(std::rethrow_exception(e), std::system_error);
    EXPECT_EQ(s.successful.future().exception(0s), nullptr);
}

TEST(FutureTests, ExceptionWithSuccess) {
    mp::Promise<int> p;
    std::thread t([p] {
        std::this_thread::sleep_for(100ms);
        p.set_exception(std::system_error(std::make_error_code(std::errc::io_error)));
    });
    auto e = p.future().exception(LONG);
    ASSERT_TRUE(e);
    EXPECT_THROW(std::rethrow_exception(e), std::system_error);
    t.join();
}

TEST(FutureTests, MultipleSetResult) {
    mp::Promise<int> p;
    p.set_result(1);
    try {
        p.set_result(2);
        ADD_FAILURE() << "no InvalidStateError";
    } catch (const mp::InvalidStateError& e) {
        EXPECT_STREQ(e.what(), "set_result: the future is already finished");
    }
    EXPECT_TRUE(p.future().done());
    EXPECT_EQ(p.future().result(), 1);
}

TEST(FutureTests, MultipleSetException) {
    mp::Promise<int> p;
    p.set_exception(std::invalid_argument("first"));
    EXPECT_THROW(p.set_exception(std::runtime_error("second")), mp::InvalidStateError);
    EXPECT_EQ(what_of(p.future().exception()), "first");
}

// Python: set_result on a cancelled future raises InvalidStateError too (the executor that
// lost the race learns it), and the future stays cancelled.
TEST(FutureTests, SetResultAfterCancelIsInvalidState) {
    mp::Promise<int> p;
    EXPECT_TRUE(p.future().cancel());
    EXPECT_THROW(p.set_result(1), mp::InvalidStateError);
    EXPECT_THROW(p.set_exception(std::runtime_error("x")), mp::InvalidStateError);
    EXPECT_TRUE(p.future().cancelled());
}

// As concurrent.futures' executors use it: true moves to running (and cancel then fails), false
// says the future was cancelled first; on a running or finished future it is an error.
TEST(FutureTests, SetRunningOrNotifyCancel) {
    mp::Promise<int> p;
    EXPECT_TRUE(p.set_running_or_notify_cancel());
    EXPECT_TRUE(p.future().running());
    EXPECT_FALSE(p.future().cancel());
    EXPECT_THROW(p.set_running_or_notify_cancel(), mp::InvalidStateError);
    p.set_result(3);
    EXPECT_FALSE(p.future().running());
    EXPECT_THROW(p.set_running_or_notify_cancel(), mp::InvalidStateError);
    EXPECT_EQ(p.future().result(0s), 3);

    mp::Promise<int> q;
    EXPECT_TRUE(q.future().cancel());
    EXPECT_FALSE(q.set_running_or_notify_cancel());
    EXPECT_TRUE(q.future().cancelled());
}

// mp's own: no waiter blocks for ever on a promise nobody can fulfil any more.
TEST(FutureTests, LastPromiseGoneIsBrokenPromise) {
    mp::Future<int> f;
    {
        mp::Promise<int> p;
        f = p.future();
        mp::Promise<int> copy = p;  // copies share the future: only the last one breaks it
    }
    ASSERT_TRUE(f.done());
    EXPECT_THROW(f.result(0s), mp::BrokenPromise);

    mp::Future<int> kept;
    {
        mp::Promise<int> p;
        kept = p.future();
        p.set_result(7);
    }
    EXPECT_EQ(kept.result(0s), 7);
}

TEST(FutureTests, MovedFromPromiseIsEmptyHandle) {
    mp::Promise<int> p;
    mp::Promise<int> q = std::move(p);
    EXPECT_THROW(p.future(), mp::EmptyHandle);  // NOLINT(bugprone-use-after-move)
    EXPECT_THROW(p.set_result(1), mp::EmptyHandle);
    q.set_result(1);
    EXPECT_EQ(q.future().result(0s), 1);
}

// The value is kept as it is: a type without a codec works, and each result() is a copy.
TEST(FutureTests, ValueNeedsNoCodec) {
    struct NoCodec {
        std::unique_ptr<int> p;  // not trivially copyable, no serialize(): no codec
        NoCodec(int v) : p(std::make_unique<int>(v)) {}
        NoCodec(const NoCodec& o) : p(std::make_unique<int>(*o.p)) {}
    };
    static_assert(!mp::Encodable<NoCodec>);
    mp::Promise<NoCodec> p;
    p.set_result(NoCodec(9));
    EXPECT_EQ(*p.future().result(0s).p, 9);
    EXPECT_EQ(*p.future().result(0s).p, 9);

    mp::Promise<void> v;
    v.set_result();
    EXPECT_NO_THROW(v.future().result(0s));
    EXPECT_THROW(v.set_result(), mp::InvalidStateError);
}

// test_wait.py: wait() over futures in every state, with hand-made futures.
TEST(WaitTests, FirstCompleted) {
    States s;
    std::vector<mp::Future<int>> fs{s.pending.future(), s.running.future(),
                                    s.successful.future()};
    auto r = mp::wait(fs, LONG, mp::FIRST_COMPLETED);
    ASSERT_EQ(r.done.size(), 1u);
    EXPECT_EQ(r.done[0], s.successful.future());
    EXPECT_EQ(r.not_done.size(), 2u);
}

TEST(WaitTests, FirstException) {
    States s;
    mp::Promise<int> later;
    std::vector<mp::Future<int>> fs{s.successful.future(), later.future(), s.pending.future()};
    std::thread t([later] {
        std::this_thread::sleep_for(50ms);
        later.set_exception(std::runtime_error("late"));
    });
    auto r = mp::wait(fs, LONG, mp::FIRST_EXCEPTION);
    t.join();
    EXPECT_EQ(r.done.size(), 2u);
    ASSERT_EQ(r.not_done.size(), 1u);
    EXPECT_EQ(r.not_done[0], s.pending.future());
}

TEST(WaitTests, AllCompletedWithTimeout) {
    States s;
    std::vector<mp::Future<int>> fs{s.successful.future(), s.exception.future(),
                                    s.cancelled.future(), s.pending.future()};
    auto r = mp::wait(fs, 50ms, mp::ALL_COMPLETED);
    EXPECT_EQ(r.done.size(), 3u);
    EXPECT_EQ(r.not_done.size(), 1u);
}

// test_as_completed.py: finished futures first, then the one set from another thread; a
// pending one left over is a TimeoutError.
TEST(AsCompletedTests, HandMadeFutures) {
    States s;
    mp::Promise<int> later;
    // Made before `later` can finish: the done ones come first, in input order, then `later`.
    auto completed =
        mp::as_completed(std::vector{s.successful.future(), later.future(), s.exception.future()}, LONG);
    std::thread t([later] {
        std::this_thread::sleep_for(50ms);
        later.set_result(5);
    });
    std::vector<mp::Future<int>> order;
    for (const auto& f : completed) order.push_back(f);
    t.join();
    ASSERT_EQ(order.size(), 3u);
    EXPECT_EQ(order[2], later.future());

    std::size_t seen = 0;
    EXPECT_THROW(
        {
            for (const auto& f : mp::as_completed(
                     std::vector{s.successful.future(), s.pending.future()}, 50ms)) {
                (void)f;
                ++seen;
            }
        },
        mp::TimeoutError);
    EXPECT_EQ(seen, 1u);
}
