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
    std::string detail{};     // what rebuilding the type needs beyond what(), by type: a
                              // system_error's category and value (and a filesystem_error's
                              // paths), a WorkerDied's pid and status, a BufferTooShort's message
};

/// Inside a catch block: appends the exception being handled (type name, what(), this process).
void encode_current_exception(Encoder& e);
/// Reads what encode_current_exception wrote.
ErrorInfo decode_error_info(Decoder& d);
/// The exception to raise here for `info`: a standard exception type (std::out_of_range,
/// std::invalid_argument, std::bad_cast, std::bad_variant_access, ...) and mp's own come back as
/// themselves with the remote message; a std::system_error, std::ios_base::failure or
/// std::filesystem::filesystem_error too, with its error code (and paths), when its category is
/// the generic, system or iostream one. Anything else is an mp::RemoteError keeping type name,
/// message and origin.
std::exception_ptr make_remote_exception(const ErrorInfo& info);

class FutureCore;

/// A mutex in one 32-bit word, for the threads of one process (Drepper's three-state futex
/// mutex: 0 free, 1 locked, 2 locked with sleepers; its futex is process-private). A pool holds a
/// FutureCore per queued task, and std::mutex alone is 40 bytes. Not sys::FutexMutex, the
/// other futex mutex: that one lives in memory shared between processes and is robust (the
/// owner's thread id in its word, linked into the kernel's robust list so a dead holder's lock
/// is recovered), which costs a list update per lock and needs the owner's id; a future's lock
/// is never shared with another process, and its holder cannot die without its waiters.
class WordMutex {
public:
    void lock() noexcept {
        std::uint32_t c = 0;
        if (!word_.compare_exchange_strong(c, 1, std::memory_order_acquire, std::memory_order_relaxed))
            lock_contended(c);
    }
    bool try_lock() noexcept {
        std::uint32_t c = 0;
        return word_.compare_exchange_strong(c, 1, std::memory_order_acquire, std::memory_order_relaxed);
    }
    void unlock() noexcept {
        if (word_.exchange(0, std::memory_order_release) == 2) wake_one();
    }

private:
    void lock_contended(std::uint32_t c) noexcept;
    void wake_one() noexcept;
    std::atomic<std::uint32_t> word_{0};
};

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

    State state() const noexcept { return state_of(word_.load(std::memory_order_acquire)); }
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
    const void* value() const noexcept { return rare_ ? rare_->value.get() : nullptr; }

    /// Runs `cb` once done: at once in this thread when already done, else in the thread that
    /// completes the core (the pool's result thread) or the one that cancels it. An exception
    /// escaping `cb` is printed to stderr and ignored, as Python logs it.
    void add_done_callback(std::function<void(FutureCore&)> cb);

    /// A core that ends as this one does (a value as empty bytes, the same exception, or
    /// cancelled), but only once `cb` has run on this one: Python's AsyncResult is ready only
    /// after its callback returned, so whoever waits for the result sees what the callback did.
    /// What escapes `cb` is printed, as add_done_callback does, and the core still ends.
    /// With `elsewhere`, a core already done hands `cb` to it instead of running it in this
    /// thread: a pool passes its own thread, where its callbacks always run (as Python's).
    using Runner = std::function<void(std::function<void()>)>;
    std::shared_ptr<FutureCore> after_callback(std::function<void(FutureCore&)> cb,
                                               const Runner& elsewhere = nullptr);

    /// Registers `w` unless already done; returns false (and does not register) when done.
    bool add_waiter(FutureWaiter* w);
    void remove_waiter(FutureWaiter* w);

    /// A core that finishes when every one of `parts` has (value: empty bytes), or fails as soon
    /// as one fails (with its exception) or is cancelled (CancelledError).
    static std::shared_ptr<FutureCore> when_all(std::span<const std::shared_ptr<FutureCore>> parts);

    virtual ~FutureCore() = default;

protected:
    /// Asked by cancel() while pending, with state_mutex() held: take the work back from
    /// wherever it waits; false when it has already started. The default: nothing to take back.
    virtual bool withdraw() noexcept { return true; }
    /// The lock cancel() holds around withdraw(): a subclass guards where its work waits with
    /// it (a pool holds a core per queued task, so a second mutex per task would cost memory).
    /// Never call into the core while holding it.
    WordMutex& state_mutex() const noexcept { return mu_; }

private:
    // The word: the State in the low byte, plus kSleeping once a thread in wait() sleeps on the
    // word (a futex), so that the completing thread makes the wake-up call only then.
    static constexpr std::uint32_t kStateMask = 0xff;
    static constexpr std::uint32_t kSleeping = 0x100;
    static State state_of(std::uint32_t word) noexcept { return static_cast<State>(word & kStateMask); }
    static bool is_done(std::uint32_t word) noexcept {
        return state_of(word) == State::finished || state_of(word) == State::cancelled;
    }

    // set_result, set_exception and set_value: the outcome, unless the future is done already
    // (then false).
    bool finish(std::string bytes, std::exception_ptr error, std::shared_ptr<const void> value);
    // With the final state stored under `lk` (`before`: the word it replaced): tells waiters,
    // wakes sleepers, releases `lk` and runs the callbacks outside it.
    void complete(std::unique_lock<WordMutex>& lk, std::uint32_t before);
    // Keeps `cb` (moved from) for when the core ends; false, with `cb` untouched, once done.
    bool store_callback(std::function<void(FutureCore&)>& cb);

    // What most futures never get, made on first use: done callbacks and waiters (mp::wait,
    // as_completed), and a value that is not encoded (a Promise's). A pool's batch holds a core
    // per task, so every word the core itself saves is saved per task.
    struct Rare {
        std::vector<std::function<void(FutureCore&)>> callbacks;
        std::vector<FutureWaiter*> waiters;
        std::shared_ptr<const void> value;  // written before the core is finished, then fixed
    };

    // Under mu_.
    Rare& rare() {
        if (!rare_) rare_ = std::make_unique<Rare>();
        return *rare_;
    }

    // mutable: wait() marks it kSleeping.
    mutable std::atomic<std::uint32_t> word_{static_cast<std::uint32_t>(State::pending)};
    mutable WordMutex mu_;
    std::string bytes_;
    std::exception_ptr error_;
    std::unique_ptr<Rare> rare_;  // once made, kept: value() reads it without the lock
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
