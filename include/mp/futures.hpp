#pragma once
/// \file
/// mp::Future<T>, mp::ProcessPoolExecutor, mp::wait, mp::as_completed: Python's
/// concurrent.futures with worker processes that may crash, hang or leak without taking the
/// pool down.
///
///     int square(int x) { return x * x; }
///     mp::ProcessPoolExecutor ex({.max_workers = 4});
///     mp::Future<int> f = ex.submit(square, 7);
///     f.result();                                   // 49
///     for (int y : ex.map(square, std::vector{1, 2, 3})) ...
///
/// Work is a transferable callable (a function, a function pointer, a captureless lambda or an
/// empty function object) whose arguments and result have an mp::Codec; a capturing lambda is a
/// compile error that says to pass the captured values as arguments.
///
/// Failures arrive through the future:
/// - an exception thrown by the task: the standard exception types (std::exception, those of
///   `<stdexcept>`, std::bad_alloc, std::bad_array_new_length, std::bad_cast, std::bad_typeid,
///   std::bad_any_cast, std::bad_variant_access, std::bad_optional_access,
///   std::bad_function_call, std::bad_weak_ptr, std::bad_exception) and mp's own
///   (mp::WorkerDied with its pid and status, mp::BufferTooShort with its message,
///   mp::py::UnpicklingError, ...) come back as themselves with the remote message; a
///   std::system_error, std::ios_base::failure or std::filesystem::filesystem_error too, with its
///   error code (and paths), when the code's category is the generic, system or iostream one;
///   a std::future_error with its std::future_errc, a std::regex_error with its
///   std::regex_constants::error_type.
///   A type registered with mp::register_exception (mp/errors.hpp) comes back as itself, built
///   from the remote message; any other as mp::RemoteError with its type name, message and the
///   worker it came from;
/// - a worker that died running the task (segfault, abort, exit(), SIGKILL, the OOM killer):
///   mp::WorkerDied with its pid and exit code or signal. Only that task (or chunk) fails; a
///   replacement worker starts and the pool carries on. With
///   ExecutorOptions::break_on_worker_death the pool breaks instead, as Python's does: every
///   unfinished future fails with mp::BrokenProcessPool and so does every later submit;
/// - a task that ran past its timeout: its worker is killed, the future fails with
///   mp::TimeoutError, a replacement starts;
/// - cancel() before the task started: mp::CancelledError.
///
/// Descriptors: a task whose arguments carry descriptors (a Queue, Lock, Event, Value,
/// Connection, ...) holds a duplicate of each, in this process, from submit until it finishes:
/// 2000 pending tasks that each take the same Queue hold its descriptors 2000 times over, and
/// may exceed RLIMIT_NOFILE (1024 by default). A submit that runs out throws std::system_error
/// (EMFILE) and only that submit fails: wait for some submitted work, or raise the limit. One
/// task carries at most 253 descriptors (one message's worth; each copy of a handle counts): a
/// submit over that throws mp::Error. map (and mp::Pool's map, imap, starmap ...) start a new
/// chunk before one would pass it, whatever the chunksize.
///
/// Threads: futures may be waited on from any thread. Done callbacks run in the pool's own
/// thread (the one that collects results), or at once in the calling thread when the future is
/// already done, or in the thread that cancels it; never in a worker. A callback must not block
/// for long: it holds up every other result of the pool.
///
/// Workers start with the forkserver method by default: they are forked from a single-threaded
/// server, not from this process, so a parent that already runs threads is safe. The server is
/// started by spawn (a fresh exec of the program, see process.hpp) at the first pool or at
/// mp::set_start_method(mp::StartMethod::forkserver), so it inherits no lock whenever it starts.
/// When the parent dies, even by SIGKILL, its workers are killed at once, also while a child it
/// forked (an mp::Process under fork) lives on: mp's fork children do not keep the parent's ends
/// of the workers' sockets. A child made by a bare fork() of your own does keep them, and the
/// workers then last as long as that child. Under fork, the first workers are copies of the
/// program as the constructor's caller left it; replacements are forked by the pool's own
/// thread. The main thread forks the first ones itself; in any other thread the constructor
/// waits while the pool's thread forks them (PR_SET_PDEATHSIG fires when the thread that forked
/// a child ends, and the pool's thread outlives its workers, so a pool made in a short-lived
/// thread keeps them), and tasks there see the pool thread's thread_local values.
///
/// Workers are not daemon processes (as Python's since 3.9): a task may start an mp::Process of
/// its own, and a worker leaving the pool joins the children it still has, as any process does
/// at its end. They are killed with the parent all the same. A worker runs a second thread
/// (it sends results back in batches), so a task's child is better started with forkserver or
/// spawn than with fork, the default (see process.hpp, "Start methods"). (A multiprocessing.Pool's workers,
/// mp::Pool's, are daemons: a task there cannot start a process.) A task may start its own
/// ProcessPoolExecutor.

#include <algorithm>
#include <chrono>
#include <csignal>
#include <cstddef>
#include <functional>
#include <iterator>
#include <memory>
#include <optional>
#include <ranges>
#include <stdexcept>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#include "mp/detail/deadline.hpp"
#include "mp/detail/future_core.hpp"
#include "mp/detail/pool_engine.hpp"
#include "mp/detail/task.hpp"
#include "mp/errors.hpp"
#include "mp/process.hpp"
#include "mp/serialize.hpp"

namespace mp {

template <class T>
class Future;

namespace detail {
template <class T>
T decode_value(const std::string& bytes) {
    if constexpr (std::is_void_v<T>) {
        return;
    } else if constexpr (!Encodable<T>) {
        // check_work has reported the missing codec; decoding would only report it again.
        throw Error("mp: the result type has no codec");
    } else {
        return decode<T>(bytes);
    }
}
template <class T>
std::shared_ptr<FutureCore> core_of(const Future<T>& f);
}  // namespace detail

/// The eventual result of work handed to a pool, or of an mp::Promise: a cheap copyable handle;
/// copies share the state.
template <class T>
class Future {
public:
    /// An empty handle (valid() is false): every other member throws mp::EmptyHandle, as they
    /// do on a handle moved from.
    Future() = default;
    explicit Future(std::shared_ptr<detail::FutureCore> core) : core_(std::move(core)) {}

    bool valid() const noexcept { return core_ != nullptr; }
    /// Cancels the work unless a worker has started it: false once running or done. A task
    /// handed to a worker that has not started it yet is still cancellable (and never runs).
    bool cancel() const { return core().cancel(); }
    bool cancelled() const { return core().state() == detail::FutureCore::State::cancelled; }
    /// True while a worker has the task.
    bool running() const { return core().state() == detail::FutureCore::State::running; }
    /// Finished (with a value or an exception) or cancelled.
    bool done() const { return core().done(); }

    /// Waits for the value. Throws what the task threw (see the header), CancelledError when
    /// cancelled, TimeoutError when `timeout` passes first (the work goes on).
    T result(detail::Timeout timeout = std::nullopt) const {
        wait_done(timeout);
        if (cancelled()) throw CancelledError();
        if (auto e = core().error()) std::rethrow_exception(e);
        if constexpr (!std::is_void_v<T> && std::is_copy_constructible_v<T>) {
            // A Promise's value is kept as it is; work done elsewhere arrives encoded.
            if (const void* v = core().value()) return *static_cast<const T*>(v);
        }
        return detail::decode_value<T>(core().bytes());
    }

    /// The exception the work ended with; nullptr when it produced a value. A value that arrived
    /// but cannot be decoded here (its codec throws) is the exception result() would throw: the
    /// decoder's. Throws CancelledError when cancelled, TimeoutError when `timeout` passes first.
    std::exception_ptr exception(detail::Timeout timeout = std::nullopt) const {
        wait_done(timeout);
        if (cancelled()) throw CancelledError();
        if (auto e = core().error()) return e;
        if constexpr (!std::is_void_v<T>) {
            if (core().value() == nullptr) {
                try {
                    (void)detail::decode_value<T>(core().bytes());
                } catch (...) {
                    return std::current_exception();
                }
            }
        }
        return nullptr;
    }

    /// Waits until done; false when `timeout` passed first.
    bool wait(detail::Timeout timeout = std::nullopt) const { return core().wait(timeout); }

    /// Calls fn(future) once done: at once (in this thread) when already done, else in the pool's
    /// result thread (for a Promise's future: the thread that sets it), or in the thread that
    /// cancels it. Callbacks run in the order added. An exception escaping fn is printed to
    /// stderr ("exception calling callback for future") and the next callback still runs.
    void add_done_callback(std::function<void(const Future&)> fn) const {
        core().add_done_callback([fn = std::move(fn)](detail::FutureCore& c) {
            fn(Future(c.shared_from_this()));
        });
    }

    friend bool operator==(const Future& a, const Future& b) noexcept { return a.core_ == b.core_; }

private:
    friend std::shared_ptr<detail::FutureCore> detail::core_of<T>(const Future<T>&);
    void wait_done(detail::Timeout timeout) const {
        if (!core().wait(timeout)) throw TimeoutError("the future did not finish in time");
    }
    detail::FutureCore& core() const { return detail::deref_handle(core_, "mp::Future"); }
    std::shared_ptr<detail::FutureCore> core_;
};

namespace detail {
template <class T>
std::shared_ptr<FutureCore> core_of(const Future<T>& f) {
    return f.core_;
}
template <class T>
std::vector<FutureCore*> raw_cores(const std::vector<Future<T>>& fs);

/// `fs` without repeats (copies of one future), first occurrences in their order: mp::wait and
/// as_completed take a sequence where Python's take a set's worth. O(n log n).
template <class T>
std::vector<Future<T>> unique_futures(std::vector<Future<T>> fs) {
    std::vector<std::pair<const FutureCore*, std::size_t>> keys(fs.size());
    for (std::size_t i = 0; i < fs.size(); ++i) keys[i] = {core_of(fs[i]).get(), i};
    std::sort(keys.begin(), keys.end(), [](const auto& a, const auto& b) {
        return std::less<const FutureCore*>{}(a.first, b.first) || (a.first == b.first && a.second < b.second);
    });
    std::vector<bool> repeat(fs.size(), false);
    for (std::size_t k = 1; k < keys.size(); ++k)
        if (keys[k].first == keys[k - 1].first) repeat[keys[k].second] = true;
    std::vector<Future<T>> out;
    out.reserve(fs.size());
    for (std::size_t i = 0; i < fs.size(); ++i)
        if (!repeat[i]) out.push_back(std::move(fs[i]));
    return out;
}

template <class T>
std::vector<FutureCore*> raw_cores(const std::vector<Future<T>>& fs) {
    std::vector<FutureCore*> out;
    out.reserve(fs.size());
    for (const auto& f : fs) out.push_back(&deref_handle(core_of(f), "mp::Future"));
    return out;
}

/// The input iterator of a sequence an Owner hands out one at a time (as_completed, imap): each
/// step asks owner->pull() for the next element, a pointer that stays valid until the next
/// pull; null ends the sequence (the iterator then equals std::default_sentinel).
template <class Owner, class V>
class PullIterator {
public:
    using iterator_category = std::input_iterator_tag;
    using value_type = std::remove_const_t<V>;
    using difference_type = std::ptrdiff_t;
    PullIterator() = default;
    explicit PullIterator(Owner* owner) : owner_(owner) { ++*this; }
    V& operator*() const { return *value_; }
    V* operator->() const { return value_; }
    PullIterator& operator++() {
        value_ = owner_->pull();
        if (value_ == nullptr) owner_ = nullptr;
        return *this;
    }
    void operator++(int) { ++*this; }
    friend bool operator==(const PullIterator& a, std::default_sentinel_t) noexcept { return a.owner_ == nullptr; }

private:
    Owner* owner_ = nullptr;
    V* value_ = nullptr;
};
}  // namespace detail

/// The producing side of a standalone mp::Future, for writing executors of one's own or adapting
/// another asynchronous source: Python's `Future()` with its set_* methods, the reading methods
/// (result, exception, cancel, done, running, add_done_callback) being those of future().
///
///     mp::Promise<int> p;
///     mp::Future<int> f = p.future();          // hand this out; mp::wait/as_completed accept it
///     if (p.set_running_or_notify_cancel()) {  // false: somebody cancelled f first
///         try { p.set_result(compute()); } catch (...) { p.set_exception(std::current_exception()); }
///     }
///
/// The value is kept as it is (a copy is returned by each result()), so T needs no codec, only
/// a copy constructor. A cheap copyable handle: copies share the future. Destructor policy: when
/// the last copy goes while the future is not yet done, the future fails with mp::BrokenPromise,
/// so nobody waits for ever on a result that cannot come. Callbacks run in the thread that sets
/// the result or cancels.
template <class T>
class Promise {
    static_assert(std::is_void_v<T> || std::is_copy_constructible_v<T>,
                  "mp::Promise<T>: T must be copy constructible (each result() returns a copy)");

public:
    /// A new pending future.
    Promise() : owner_(std::make_shared<Owner>()) {}

    /// The future this promise completes (always the same one).
    Future<T> future() const { return Future<T>(core_ptr()); }

    /// Python's set_running_or_notify_cancel: pending -> running and true (from then on cancel()
    /// fails); false when the future was cancelled. InvalidStateError when it is already running
    /// or finished.
    bool set_running_or_notify_cancel() const {
        auto& c = core();
        if (c.set_running()) return true;
        if (c.state() == detail::FutureCore::State::cancelled) return false;
        throw InvalidStateError(std::string("set_running_or_notify_cancel: the future is already ") +
                                state_name(c));
    }

    /// Finishes the future with `value` (from pending or running). InvalidStateError when it is
    /// already finished or cancelled; the first result stays.
    template <class U = T>
        requires(!std::is_void_v<U>)
    void set_result(U value) const {
        if (!core().set_value(std::make_shared<const T>(std::move(value)))) throw_done("set_result");
    }
    /// Finishes a Promise<void>'s future.
    template <class U = T>
        requires std::is_void_v<U>
    void set_result() const {
        if (!core().set_result({})) throw_done("set_result");
    }

    /// Finishes the future with `error` (result() rethrows it, exception() returns it).
    /// InvalidStateError when already finished or cancelled; a null `error` is
    /// std::invalid_argument.
    void set_exception(std::exception_ptr error) const {
        if (!error) throw std::invalid_argument("mp::Promise::set_exception: null exception_ptr");
        if (!core().set_exception(std::move(error))) throw_done("set_exception");
    }
    /// set_exception(std::make_exception_ptr(e)).
    template <class E>
        requires(!std::is_same_v<std::decay_t<E>, std::exception_ptr>)
    void set_exception(E&& e) const {
        set_exception(std::make_exception_ptr(std::forward<E>(e)));
    }

private:
    struct Owner {
        std::shared_ptr<detail::FutureCore> core = std::make_shared<detail::FutureCore>();
        Owner() = default;
        Owner(const Owner&) = delete;
        Owner& operator=(const Owner&) = delete;
        ~Owner() {
            if (core->done()) return;
            // make_exception_ptr may itself fail (out of memory): then the waiters would wait for
            // ever, which is what there is no way around without memory.
            try {
                core->set_exception(std::make_exception_ptr(BrokenPromise()));
            } catch (...) {
            }
        }
    };
    static const char* state_name(const detail::FutureCore& c) noexcept {
        switch (c.state()) {
            case detail::FutureCore::State::pending: return "pending";
            case detail::FutureCore::State::running: return "running";
            case detail::FutureCore::State::finished: return "finished";
            case detail::FutureCore::State::cancelled: return "cancelled";
        }
        return "?";
    }
    [[noreturn]] void throw_done(const char* what) const {
        throw InvalidStateError(std::string(what) + ": the future is already " +
                                state_name(core()));
    }
    const std::shared_ptr<detail::FutureCore>& core_ptr() const {
        return detail::deref_handle(owner_, "mp::Promise").core;
    }
    detail::FutureCore& core() const { return *core_ptr(); }
    std::shared_ptr<Owner> owner_;
};

/// When mp::wait returns (Python's FIRST_COMPLETED, FIRST_EXCEPTION, ALL_COMPLETED).
using ReturnWhen = detail::ReturnWhen;
inline constexpr ReturnWhen FIRST_COMPLETED = ReturnWhen::first_completed;
inline constexpr ReturnWhen FIRST_EXCEPTION = ReturnWhen::first_exception;
inline constexpr ReturnWhen ALL_COMPLETED = ReturnWhen::all_completed;

/// What mp::wait returns: the futures that are done and those that are not, each in input order.
template <class T>
struct WaitResult {
    std::vector<Future<T>> done{};
    std::vector<Future<T>> not_done{};
};

/// Waits until `when` holds for `futures` (FIRST_EXCEPTION: one finished with an exception, or
/// all done) or `timeout` passes; never throws TimeoutError (look at not_done). A future given
/// more than once is in the result once, as in Python's sets. FIRST_EXCEPTION looks at how the
/// work ended: a value that arrived but cannot be decoded here counts as a value (its exception()
/// and result() report the decoder's error).
template <class T>
WaitResult<T> wait(const std::vector<Future<T>>& given, detail::Timeout timeout = std::nullopt,
                   ReturnWhen when = ALL_COMPLETED) {
    const std::vector<Future<T>> futures = detail::unique_futures(given);
    auto cores = detail::raw_cores(futures);
    auto idx = detail::wait_cores(cores, timeout, when);
    WaitResult<T> r;
    std::vector<bool> is_done(futures.size(), false);
    for (auto i : idx) is_done[i] = true;
    for (std::size_t i = 0; i < futures.size(); ++i)
        (is_done[i] ? r.done : r.not_done).push_back(futures[i]);
    return r;
}
template <class T>
WaitResult<T> wait(const std::vector<Future<T>>& futures, ReturnWhen when) {
    return wait(futures, std::nullopt, when);
}

/// Options of mp::as_completed.
struct AsCompletedOptions {
    /// From the call; std::nullopt: no limit.
    detail::Timeout timeout{};
    /// Draw a progress bar on stderr as futures finish.
    bool progress = false;
};

/// The futures in the order they finish (those already done first, in input order). Iterating
/// past `timeout` (counted from the call) throws TimeoutError "N (of M) futures unfinished".
/// Duplicates are yielded once.
template <class T>
class AsCompleted {
public:
    AsCompleted(std::vector<Future<T>> futures, AsCompletedOptions options)
        : futures_(detail::unique_futures(std::move(futures))),
          queue_(std::make_unique<detail::CompletionQueue>(detail::raw_cores(futures_))) {
        deadline_ = detail::deadline_after(options.timeout);
        if (options.progress)
            bar_ = std::make_unique<detail::ProgressBar>("as_completed", futures_.size());
    }

    using iterator = detail::PullIterator<AsCompleted, const Future<T>>;

    iterator begin() { return iterator(this); }
    std::default_sentinel_t end() const noexcept { return {}; }

private:
    friend iterator;
    const Future<T>* pull() {
        auto next = queue_->next(deadline_);
        if (!next) return nullptr;
        if (bar_) bar_->advance();
        return &futures_[*next];
    }
    std::vector<Future<T>> futures_;
    std::unique_ptr<detail::CompletionQueue> queue_;
    detail::Deadline deadline_;
    std::unique_ptr<detail::ProgressBar> bar_;
};

template <class T>
AsCompleted<T> as_completed(std::vector<Future<T>> futures, AsCompletedOptions options = {}) {
    return AsCompleted<T>(std::move(futures), std::move(options));
}
template <class T, class Rep, class Period>
AsCompleted<T> as_completed(std::vector<Future<T>> futures, std::chrono::duration<Rep, Period> timeout) {
    return AsCompleted<T>(std::move(futures),
                          {detail::Timeout(timeout), false});
}

/// Options of a ProcessPoolExecutor; every member has a sensible default.
struct ExecutorOptions {
    /// Empty: cpu_count(). Zero or less is std::invalid_argument, as Python's ValueError.
    std::optional<int> max_workers{};
    /// Empty: forkserver (safe in a parent with threads). fork starts workers faster but copies
    /// the parent, threads' locks included; spawn execs the program afresh for every worker.
    std::optional<StartMethod> start_method{};
    /// A worker is replaced after this many tasks (chunks count as one); 0: never.
    std::size_t max_tasks_per_child = 0;
    /// A worker whose resident memory has grown by more than this many bytes since it became
    /// ready (after its initializer) is replaced once its task ends; 0: never. The growth, not
    /// the size, is what counts, so the pages a fork worker shares with a large parent, and the
    /// initializer's own state, do not make every worker retire after each task.
    std::size_t max_memory_per_child = 0;
    /// Default per-task time limit, counted from when the task is the next for a worker; empty:
    /// none. It bounds the time to the result: a worker that has not finished it by then, or
    /// not even started it (stopped, say), is killed; a task that had started fails with
    /// TimeoutError, one that had not goes to another worker (after the third worker killed
    /// for it so, it fails with TimeoutError). Zero or less: every task fails with TimeoutError
    /// at submit, and no worker runs it.
    ///
    /// The pool's initializer counts against it: a task that is the next for a worker still in
    /// its initializer when the limit passes fails with TimeoutError. That worker is not killed
    /// (a slow initializer is no fault), but gets no more tasks while another worker can take
    /// them. At shutdown, a worker still in its initializer after task_timeout since it started
    /// (or past a task's limit so) is killed rather than waited for: with no task_timeout,
    /// shutdown waits for every initializer, as Python's does.
    detail::Timeout task_timeout{};
    /// Python's behaviour: a worker that dies breaks the whole pool (BrokenProcessPool).
    bool break_on_worker_death = false;
};

/// Options of one submit.
struct TaskOptions {
    /// Overrides ExecutorOptions::task_timeout for this task. Zero or less: the future fails
    /// with TimeoutError at once, and no worker runs the task.
    detail::Timeout timeout{};
};

/// Options of map (ProcessPoolExecutor and Pool).
struct MapOptions {
    /// Calls per task sent to a worker; 0: the default (1 for the executor, Python's
    /// ceil(n / (4 * workers)) for Pool). A worker that dies fails its whole chunk.
    std::size_t chunksize = 0;
    /// The executor's map: iterating past this (counted from the call) throws TimeoutError.
    detail::Timeout timeout{};
    /// Time limit for each chunk (overrides the pool's task_timeout; counted as task_timeout is).
    detail::Timeout task_timeout{};
    /// Draw a progress bar on stderr (done/total, rate, ETA) as chunks finish.
    bool progress = false;
};

namespace detail {

template <class F, class... A>
using call_result_t = std::invoke_result_t<std::decay_t<F>&, std::decay_t<A>&...>;

/// The value type of a map over a callable whose result may be void (then std::monostate).
template <class R>
using item_t = std::conditional_t<std::is_void_v<R>, std::monostate, R>;

/// One map item's value: a void call wrote no bytes (std::monostate then), anything else its
/// encoding.
template <class R>
R decode_item(std::string_view bytes) {
    if constexpr (std::is_same_v<R, std::monostate>) {
        if (bytes.empty()) return {};
    }
    if constexpr (!Encodable<R>)
        throw Error("mp: the result type has no codec");  // reported by check_work already
    else
        return decode<R>(bytes);
}

/// Chunked calls of one callable: each chunk a task, its result the items' outcomes.
struct ChunkSet {
    std::vector<std::shared_ptr<FutureCore>> cores{};
    std::vector<std::size_t> sizes{};
    std::size_t items = 0;
};

/// Draws a progress bar on stderr that advances as each chunk of `set` finishes (in the pool's
/// thread) and draws its last line when the last chunk's callback lets it go.
inline void show_progress(const ChunkSet& set, const char* label) {
    auto bar = std::make_shared<ProgressBar>(label, set.items);
    for (std::size_t i = 0; i < set.cores.size(); ++i)
        set.cores[i]->add_done_callback([bar, n = set.sizes[i]](FutureCore&) { bar->advance(n); });
}

/// Builds and submits the chunks of fn over rows produced by `each(add)` to `engine` (a
/// PoolEngine, or mp::mpi's engine: anything with submit(Task, JobOptions) -> FutureCore).
template <class F, class... A, class Engine, class Rows>
ChunkSet submit_chunks(Engine& engine, const F& fn, std::size_t chunksize, Timeout task_timeout,
                       Rows&& rows) {
    ChunkBuilder<std::decay_t<F>, std::decay_t<A>...> builder(fn);
    ChunkSet set;
    if (chunksize == 0) chunksize = 1;
    auto flush = [&] {
        std::size_t n = builder.count();
        set.cores.push_back(engine.submit(builder.take(), JobOptions{task_timeout, n}));
        set.sizes.push_back(n);
    };
    rows([&](const auto&... args) {
        builder.add(args...);
        ++set.items;
        if (builder.full(chunksize)) flush();
    });
    if (builder.count() != 0) flush();
    return set;
}

/// Calls `add(a, b, ...)` for each row of the zipped ranges, up to the shortest.
template <class... Rs>
auto zip_rows(Rs&... ranges) {
    return [&ranges...](auto&& add) {
        auto its = std::make_tuple(std::ranges::begin(ranges)...);
        auto ends = std::make_tuple(std::ranges::end(ranges)...);
        auto any_end = [&]<std::size_t... I>(std::index_sequence<I...>) {
            return ((std::get<I>(its) == std::get<I>(ends)) || ...);
        };
        auto step = [&]<std::size_t... I>(std::index_sequence<I...>) {
            add(*std::get<I>(its)...);
            (++std::get<I>(its), ...);
        };
        while (!any_end(std::index_sequence_for<Rs...>{})) step(std::index_sequence_for<Rs...>{});
    };
}

/// Calls `add(get<0>(t), get<1>(t), ...)` for each tuple of `range`.
template <class R>
auto star_rows(R& range) {
    return [&range](auto&& add) {
        for (const auto& t : range) std::apply([&](const auto&... a) { add(a...); }, t);
    };
}

}  // namespace detail

/// The results of a map, in input order, produced lazily: iterating waits for each in turn.
/// An item whose call failed throws its exception when dereferenced; unlike Python's map, the
/// iteration may go on past it (catch around `*it`), so one bad input does not cost the rest.
/// A whole chunk whose worker died throws WorkerDied for each of its items. After a
/// TimeoutError the chunks not yet started are cancelled, as Python's map does.
///
/// Destroying the results once iteration has begun (leaving a loop early with break, return or
/// an exception) cancels the chunks not yet started, as closing Python's map generator does: a
/// chunk a worker has begun runs to its end. Results never iterated cancel nothing (as Python's
/// generator that was never started): `ex.map(f, xs);` still runs every call.
template <class R>
class MapResults {
public:
    using value_type = R;

    MapResults(detail::ChunkSet set, detail::Timeout timeout, bool progress, const char* label)
        : set_(std::make_shared<detail::ChunkSet>(std::move(set))) {
        deadline_ = detail::deadline_after(timeout);
        if (progress) detail::show_progress(*set_, label);
    }
    MapResults(const MapResults&) = default;
    MapResults& operator=(const MapResults& other) {
        if (this != &other) {
            MapResults copy(other);
            *this = std::move(copy);
        }
        return *this;
    }
    MapResults(MapResults&& other) noexcept
        : set_(std::move(other.set_)),
          deadline_(other.deadline_),
          parsed_chunk_(other.parsed_chunk_),
          items_(std::move(other.items_)),
          iterated_(std::exchange(other.iterated_, false)) {}
    MapResults& operator=(MapResults&& other) noexcept {
        if (this != &other) {
            drop();
            set_ = std::move(other.set_);
            deadline_ = other.deadline_;
            parsed_chunk_ = other.parsed_chunk_;
            items_ = std::move(other.items_);
            iterated_ = std::exchange(other.iterated_, false);
        }
        return *this;
    }
    ~MapResults() { drop(); }

    /// How many results there will be.
    std::size_t size() const { return set().items; }

    class iterator {
    public:
        using iterator_category = std::input_iterator_tag;
        using value_type = R;
        using difference_type = std::ptrdiff_t;
        iterator() = default;
        explicit iterator(MapResults* owner) : owner_(owner) {
            if (owner_->set().items == 0) owner_ = nullptr;
        }
        /// Waits for this item and decodes it (each dereference decodes anew).
        R operator*() const { return owner_->item(chunk_, pos_); }
        iterator& operator++() {
            if (++pos_ == owner_->set_->sizes[chunk_]) {
                pos_ = 0;
                if (++chunk_ == owner_->set_->sizes.size()) owner_ = nullptr;
            }
            return *this;
        }
        void operator++(int) { ++*this; }
        friend bool operator==(const iterator& a, std::default_sentinel_t) noexcept {
            return a.owner_ == nullptr;
        }

    private:
        MapResults* owner_ = nullptr;
        std::size_t chunk_ = 0;
        std::size_t pos_ = 0;
    };

    iterator begin() {
        iterated_ = true;
        return iterator(this);
    }
    std::default_sentinel_t end() const noexcept { return {}; }

    /// Every result, in order (throws as iteration would).
    std::vector<R> to_vector() {
        std::vector<R> out;
        out.reserve(size());
        for (auto&& v : *this) out.push_back(std::move(v));
        return out;
    }

    /// Cancels every chunk not yet started.
    void cancel() const {
        for (auto& c : set().cores) c->cancel();
    }

private:
    R item(std::size_t chunk, std::size_t pos) {
        auto& core = *set().cores[chunk];
        if (!core.wait(detail::remaining(deadline_))) {
            cancel();
            throw TimeoutError("map: the results did not arrive in time");
        }
        if (core.state() == detail::FutureCore::State::cancelled) throw CancelledError();
        if (auto e = core.error()) std::rethrow_exception(e);
        if (parsed_chunk_ != chunk) {
            items_ = detail::split_chunk(core.bytes(), set_->sizes[chunk]);
            parsed_chunk_ = chunk;
        }
        const auto& it = items_[pos];
        if (!it.ok) detail::throw_item_error(it);
        return detail::decode_item<R>(it.bytes);
    }

    detail::ChunkSet& set() const { return detail::deref_handle(set_, "mp::MapResults"); }

    // The last copy of results whose iteration began: what was not started will not be wanted.
    // (Copies share the chunks; one going while another still iterates cancels nothing.)
    void drop() noexcept {
        if (iterated_ && set_ && set_.use_count() == 1) {
            try {
                cancel();
            } catch (...) {
                // Cancelling cannot fail but for memory: the chunks then run, as if waited for.
            }
        }
        iterated_ = false;
    }

    std::shared_ptr<detail::ChunkSet> set_;
    detail::Deadline deadline_;
    std::size_t parsed_chunk_ = static_cast<std::size_t>(-1);
    std::vector<detail::ChunkItem> items_;
    bool iterated_ = false;
};

namespace detail {
/// map() of the executors (ProcessPoolExecutor, mpi::Executor) over their engine: fn over the
/// zipped ranges (up to the shortest) in chunks, every task submitted before it returns.
template <class F, class Engine, class... Rs>
auto map_over(Engine& engine, const MapOptions& options, const F& fn, Rs&&... ranges) {
    using R = call_result_t<F, std::ranges::range_value_t<Rs>...>;
    check_work<F, std::ranges::range_value_t<Rs>...>();
    auto set = submit_chunks<F, std::ranges::range_value_t<Rs>...>(
        engine, fn, options.chunksize == 0 ? 1 : options.chunksize, options.task_timeout, zip_rows(ranges...));
    return MapResults<item_t<R>>(std::move(set), options.timeout, options.progress, "map");
}

/// The map() of both executors (ProcessPoolExecutor, mpi::Executor), over the engine it holds
/// for them. An engine that cannot honour an option refuses it in check_map(), before anything
/// is submitted.
template <class Engine>
class MapFront {
public:
    /// fn over the zipped ranges (up to the shortest), results in input order. The ranges are
    /// consumed and every task submitted before this returns.
    template <class F, class... Rs>
        requires(sizeof...(Rs) > 0 && !std::is_same_v<std::decay_t<F>, MapOptions>)
    auto map(const F& fn, Rs&&... ranges) {
        return map(MapOptions{}, fn, std::forward<Rs>(ranges)...);
    }
    template <class F, class... Rs>
        requires(sizeof...(Rs) > 0)
    auto map(MapOptions options, const F& fn, Rs&&... ranges) {
        if constexpr (requires { engine_.check_map(options); }) engine_.check_map(options);
        return map_over(engine_, options, fn, std::forward<Rs>(ranges)...);
    }

protected:
    template <class... A>
    explicit MapFront(A&&... args) : engine_(std::forward<A>(args)...) {}
    ~MapFront() = default;
    Engine engine_;
};
}  // namespace detail

/// A pool of worker processes that runs transferable callables and hands back futures.
///
/// All max_workers workers start when the executor is constructed (each runs the initializer,
/// even if shutdown() follows at once), and a dead or retired one is replaced at once. CPython's
/// ProcessPoolExecutor starts workers on demand instead (except under fork) and reuses idle ones.
/// A worker that cannot start for a while (out of descriptors, processes or memory; a forkserver
/// that was killed) is retried with back-off; the pool breaks only when it has no live worker
/// and none can start for seconds.
///
/// Destructor policy: shuts down and waits, as `with ProcessPoolExecutor()` does: every
/// submitted task still runs to its end, then the workers exit and are reaped. Destroyed in a
/// done callback (its last owner a callback's capture, say), on the executor's own thread, which
/// cannot wait for itself, it shuts down as shutdown(wait=false): the thread runs the submitted
/// work, stops the workers and ends by itself, and the program's exit waits for it (as Python's
/// waits for its executors' threads).
class ProcessPoolExecutor : public detail::MapFront<detail::PoolEngine> {
public:
    explicit ProcessPoolExecutor(ExecutorOptions options = {}) : MapFront(make_config(options, {})) {}
    /// Each worker calls initializer(args...) before its first task. An initializer that throws
    /// or kills its worker breaks the pool: every future fails with BrokenProcessPool.
    template <class F, class... A>
    ProcessPoolExecutor(ExecutorOptions options, const F& initializer, const A&... args)
        : MapFront(make_config(options, detail::make_transferable_task(initializer, args...))) {}
    ~ProcessPoolExecutor() = default;
    ProcessPoolExecutor(const ProcessPoolExecutor&) = delete;
    ProcessPoolExecutor& operator=(const ProcessPoolExecutor&) = delete;

    /// Schedules fn(args...) (copies of the arguments, encoded now). Throws mp::Error after
    /// shutdown(), BrokenProcessPool when the pool is broken.
    template <class F, class... A>
        requires(!std::is_same_v<std::decay_t<F>, TaskOptions>)
    Future<detail::call_result_t<F, A...>> submit(const F& fn, const A&... args) {
        return submit(TaskOptions{}, fn, args...);
    }
    /// submit with options: submit({.timeout = 2s}, fn, args...).
    template <class F, class... A>
    Future<detail::call_result_t<F, A...>> submit(TaskOptions options, const F& fn, const A&... args) {
        detail::check_work<F, A...>();
        return Future<detail::call_result_t<F, A...>>(
            engine_.submit(*detail::make_task(fn, args...), detail::JobOptions{options.timeout, 0}));
    }

    // map(fn, ranges...) and map(options, fn, ranges...): inherited from detail::MapFront.

    /// No new work after this. wait: block until every running and pending task has finished
    /// and the workers have exited. cancel_futures: cancel the tasks no worker has started.
    /// Safe to call more than once.
    void shutdown(bool wait = true, bool cancel_futures = false) { engine_.shutdown(wait, cancel_futures); }
    /// Python 3.14: shutdown(false, true), then SIGTERM to every worker. The tasks they were
    /// running fail with BrokenProcessPool, the executor is broken (submit raises), and this
    /// returns once the signals are sent, without waiting. The destructor (or shutdown(true))
    /// still reaps the workers: one whose task catches or blocks SIGTERM is waited for.
    void terminate_workers() { engine_.stop_workers(SIGTERM); }
    /// As terminate_workers(), with SIGKILL.
    void kill_workers() { engine_.stop_workers(SIGKILL); }

    /// The number of worker processes.
    int max_workers() const noexcept { return engine_.size(); }
    /// Counts of submitted / pending / running / done / failed tasks, per worker too.
    PoolStats stats() const { return engine_.stats(); }

private:
    static detail::PoolConfig make_config(const ExecutorOptions& o, std::optional<detail::Task> init);
};

}  // namespace mp
