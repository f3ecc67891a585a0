#pragma once
// The untyped state behind mp::Future<T> and mp::AsyncResult<T>: a state machine
// (pending -> running -> finished, or pending -> cancelled), the result as encoded bytes (decoded
// by the typed handle, in the caller's thread) or an exception, done callbacks and waiters.
// The pool's thread completes it; any thread may wait on it.

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstddef>
#include <cstdint>
#include <exception>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <span>
#include <string>
#include <utility>
#include <vector>

#include "mp/errors.hpp"
#include "mp/serialize.hpp"

namespace mp::detail {

/// An exception as it crosses a process boundary.
struct ErrorInfo {
    std::string type_name{};  // demangled, e.g. "std::out_of_range"
    std::string message{};    // what()
    std::string origin{};     // e.g. "ForkServerPoolWorker-2 (pid 1234)"
};

/// Inside a catch block: appends the exception being handled (type name, what(), this process).
void encode_current_exception(Encoder& e);
/// Reads what encode_current_exception wrote.
ErrorInfo decode_error_info(Decoder& d);
/// The exception to raise here for `info`: a standard exception type (std::out_of_range,
/// std::invalid_argument, ...) and mp's own come back as themselves with the remote message;
/// anything else is an mp::RemoteError keeping type name, message and origin.
std::exception_ptr make_remote_exception(const ErrorInfo& info);

class FutureCore;

/// Something waiting for any of several futures (mp::wait, mp::as_completed).
class FutureWaiter {
public:
    /// Called by the completing thread with the core's lock held: must not block or call back.
    virtual void on_done(FutureCore& core) noexcept = 0;

protected:
    ~FutureWaiter() = default;
};

class FutureCore : public std::enable_shared_from_this<FutureCore> {
public:
    enum class State : std::uint8_t { pending, running, finished, cancelled };

    State state() const noexcept { return state_.load(std::memory_order_acquire); }
    bool done() const noexcept {
        State s = state();
        return s == State::finished || s == State::cancelled;
    }

    /// pending -> cancelled (runs the callbacks in this thread); false once running or done, or
    /// when withdraw() finds that the work has started (the core is then running).
    bool cancel();
    /// pending -> running, by the pool once a worker has started the work; false when cancelled.
    bool set_running() noexcept;
    /// -> finished with a value (encoded). Only the first completion counts: false (and nothing
    /// stored) when the core was already done.
    bool set_result(std::string bytes);
    /// -> finished with an exception; false when already done.
    bool set_exception(std::exception_ptr error);
    /// -> finished with a value that is not encoded (mp::Promise<T>'s, a T the typed handle
    /// reads through value()); false when already done.
    bool set_value(std::shared_ptr<const void> value);

    /// Waits until done or `timeout` (std::nullopt: no limit) passes; true when done.
    bool wait(std::optional<std::chrono::nanoseconds> timeout) const;
    /// The encoded value; valid once finished without an exception.
    const std::string& bytes() const noexcept { return bytes_; }
    /// The exception, once finished with one; nullptr otherwise.
    std::exception_ptr error() const noexcept { return error_; }
    /// The value given to set_value, once finished with one; nullptr otherwise (then bytes()).
    const void* value() const noexcept { return value_.get(); }

    /// Runs `cb` once done: at once in this thread when already done, else in the thread that
    /// completes the core (the pool's result thread) or the one that cancels it. An exception
    /// escaping `cb` is printed to stderr and ignored, as Python logs it.
    void add_done_callback(std::function<void(FutureCore&)> cb);

    /// A core that ends as this one does (a value as empty bytes, the same exception, or
    /// cancelled), but only once `cb` has run on this one: Python's AsyncResult is ready only
    /// after its callback returned, so whoever waits for the result sees what the callback did.
    /// What escapes `cb` is printed, as add_done_callback does, and the core still ends.
    std::shared_ptr<FutureCore> after_callback(std::function<void(FutureCore&)> cb);

    /// Registers `w` unless already done; returns false (and does not register) when done.
    bool add_waiter(FutureWaiter* w);
    void remove_waiter(FutureWaiter* w);

    /// A core that finishes when every one of `parts` has (value: empty bytes), or fails as soon
    /// as one fails (with its exception) or is cancelled (CancelledError).
    static std::shared_ptr<FutureCore> when_all(std::span<const std::shared_ptr<FutureCore>> parts);

    virtual ~FutureCore() = default;

protected:
    /// Asked by cancel() while pending: take the work back from wherever it waits; false when
    /// it has already started. The default: nothing to take back.
    virtual bool withdraw() noexcept { return true; }

private:
    // With the final state already stored under `lk`: wakes waiters and sleepers, releases `lk`
    // and runs the callbacks outside it.
    // set_result, set_exception and set_value: the outcome, unless the future is done already
    // (then false).
    bool finish(std::string bytes, std::exception_ptr error, std::shared_ptr<const void> value);
    void complete(std::unique_lock<std::mutex>& lk);

    std::atomic<State> state_{State::pending};
    mutable std::mutex mu_;
    mutable std::condition_variable cv_;
    mutable int sleepers_ = 0;  // threads in wait(): notify only when someone listens
    std::string bytes_;
    std::exception_ptr error_;
    std::shared_ptr<const void> value_;
    std::vector<std::function<void(FutureCore&)>> callbacks_;
    std::vector<FutureWaiter*> waiters_;
};

/// mp::wait's core: indices of the cores that are done (in input order) once `mode` is met.
enum class ReturnWhen { first_completed, first_exception, all_completed };
std::vector<std::size_t> wait_cores(std::span<FutureCore* const> cores,
                                    std::optional<std::chrono::nanoseconds> timeout, ReturnWhen mode);

/// as_completed's core: hands out indices as their cores finish.
class CompletionQueue final : public FutureWaiter {
public:
    explicit CompletionQueue(std::vector<FutureCore*> cores);
    ~CompletionQueue();
    CompletionQueue(const CompletionQueue&) = delete;
    CompletionQueue& operator=(const CompletionQueue&) = delete;
    /// The next finished index; std::nullopt when all were handed out. Throws TimeoutError
    /// "N (of M) futures unfinished" once `deadline` passes.
    std::optional<std::size_t> next(std::optional<std::chrono::steady_clock::time_point> deadline);
    /// Adds one more core (its index: total() before the call); not from on_done.
    void add(FutureCore* core);
    std::size_t total() const noexcept { return cores_.size(); }
    std::size_t handed_out() const noexcept { return handed_; }
    void on_done(FutureCore& core) noexcept override;

private:
    std::vector<FutureCore*> cores_;
    std::mutex mu_;
    std::condition_variable cv_;
    std::vector<std::size_t> ready_;     // done, not yet handed out
    std::vector<bool> seen_;
    std::vector<std::pair<FutureCore*, std::size_t>> by_core_;  // sorted: on_done's lookup
    std::size_t handed_ = 0;
};

/// Draws "label done/total, rate, ETA" on stderr: redrawn in place on a terminal (at most ten
/// times a second), a plain line at most every few seconds otherwise. Thread-safe.
class ProgressBar {
public:
    ProgressBar(std::string label, std::size_t total);
    ~ProgressBar();  // draws the final state
    ProgressBar(const ProgressBar&) = delete;
    ProgressBar& operator=(const ProgressBar&) = delete;
    void advance(std::size_t n = 1);
    void add_total(std::size_t n);
    /// The line that would be drawn now (for tests).
    std::string render() const;

private:
    void draw(bool final);
    std::string label_;
    std::atomic<std::size_t> total_;
    std::atomic<std::size_t> done_{0};
    std::chrono::steady_clock::time_point start_;
    mutable std::mutex mu_;
    std::chrono::steady_clock::time_point last_draw_{};
    bool tty_;
    bool drawn_ = false;
};

}  // namespace mp::detail
