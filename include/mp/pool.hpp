#pragma once
/// \file
/// mp::Pool and mp::AsyncResult<T>: Python's multiprocessing.Pool, on the same workers as
/// mp::ProcessPoolExecutor (see futures.hpp for what work may be sent and how failures arrive).
///
///     int square(int x) { return x * x; }
///     mp::Pool pool(4);
///     pool.map(square, std::vector{1, 2, 3});          // {1, 4, 9}
///     auto r = pool.apply_async(square, 7);  r.get();   // 49
///     pool.close(); pool.join();
///
/// Where Python's Pool hangs for ever when a worker dies, mp's fails the task (or chunk) that
/// the worker ran with mp::WorkerDied and carries on with a replacement.
///
/// The workers are daemon processes, as Python's: a task cannot start an mp::Process
/// (ProcessError "daemonic processes are not allowed to have children"). A
/// ProcessPoolExecutor's workers can. Unlike Python's, a task may create a pool of its own (an
/// mp::Pool or ProcessPoolExecutor, any start method): its workers die with the worker that made
/// them (they are its daemons), so none outlives it.
///
/// Work whose arguments carry descriptors holds a duplicate of each while pending (see
/// futures.hpp, "Descriptors"): a submit that runs out throws std::system_error (EMFILE).
///
/// Callbacks (apply_async, map_async) run in the pool's result thread, never in a worker; they
/// must not block for long. error_callback is called only when the work failed; an exception
/// that escapes a callback is printed (through mp's logger) and changes nothing else: get()
/// still returns the values.
///
/// Destructor policy: as Python's `with Pool()` (and Pool.__del__), destroying a Pool that is
/// still running (neither closed nor terminated) terminates it: unfinished work fails with
/// BrokenProcessPool and the workers are killed. After close(), the destructor waits for the
/// submitted work to finish and the workers to exit, as join() does. Destroyed in a callback (its
/// last owner a callback's capture, say), on the pool's own thread, which cannot wait for
/// itself, it terminates the pool (after close(): lets the work finish) without waiting: the
/// pool's thread then ends by itself, and the program's exit waits for it.

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstddef>
#include <exception>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <ranges>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#include "mp/futures.hpp"

namespace mp {

/// Options of a Pool; every member has a sensible default.
struct PoolOptions {
    /// Empty: cpu_count(). Zero or less is std::invalid_argument ("Number of processes must be
    /// at least 1", as Python).
    std::optional<int> processes{};
    /// A worker is replaced after this many tasks (Python's maxtasksperchild); 0: never.
    std::size_t maxtasksperchild = 0;
    /// A worker whose resident memory has grown by more than this many bytes since it became
    /// ready (after its initializer) is replaced once its task ends; 0: never. The growth, not
    /// the size, is what counts, so the pages a fork worker shares with a large parent, and the
    /// initializer's own state, do not make every worker retire after each task.
    std::size_t max_memory_per_child = 0;
    /// Empty: forkserver. Also fork or spawn (see process.hpp, "Start methods").
    std::optional<StartMethod> start_method{};
    /// Per-task (per-chunk) time limit, counted from when the task is the next for a worker;
    /// the worker is killed, the task fails with TimeoutError (one it had not started goes to
    /// another worker, up to three workers killed for it). Zero or less: every task fails with
    /// TimeoutError at once, and no worker runs it. The initializer counts against it, and
    /// join() does not wait for an initializer past it: see ExecutorOptions::task_timeout.
    detail::Timeout task_timeout{};
};

/// The arguments of an apply_async with callbacks: pool.apply_async(f, mp::args(1, 2), on_ok).
template <class... A>
struct Args {
    std::tuple<A...> values{};
};
template <class... A>
Args<std::decay_t<A>...> args(A&&... a) {
    return {std::tuple<std::decay_t<A>...>(std::forward<A>(a)...)};
}

namespace detail {
template <class T>
inline constexpr bool is_args = false;
template <class... A>
inline constexpr bool is_args<mp::Args<A...>> = true;

template <class F, class Tup>
using star_result_t = decltype(std::apply(std::declval<std::decay_t<F>&>(), std::declval<Tup&>()));

}  // namespace detail

/// The result of an *_async call (Python's AsyncResult / MapResult).
template <class T>
class AsyncResult {
public:
    /// A single call's result, or a map's whole list. `items_ok` (a map's): whether every item
    /// succeeded, once `done` has finished without an error of its own.
    AsyncResult(std::shared_ptr<detail::FutureCore> done, std::function<T()> value,
                std::function<bool()> items_ok = nullptr)
        : done_(std::move(done)), value_(std::move(value)), items_ok_(std::move(items_ok)) {}

    /// Waits for and returns the value; throws what the work threw, or TimeoutError when
    /// `timeout` passes first (the work goes on).
    T get(detail::Timeout timeout = std::nullopt) const {
        if (!core().wait(timeout)) throw TimeoutError("the result did not arrive in time");
        if (auto e = core().error()) std::rethrow_exception(e);
        if (core().state() == detail::FutureCore::State::cancelled) throw CancelledError();
        return value_();
    }
    /// Waits until ready; false when `timeout` passed first.
    bool wait(detail::Timeout timeout = std::nullopt) const { return core().wait(timeout); }
    bool ready() const { return core().done(); }
    /// Whether the call completed without raising (a map's: every item), so that get() returns:
    /// false also when the value arrived but cannot be decoded here (its codec throws; get()
    /// throws that). Throws mp::Error when not ready (Python: ValueError).
    bool successful() const {
        if (!ready()) throw Error("the result is not ready");
        if (core().state() != detail::FutureCore::State::finished || core().error() ||
            (items_ok_ && !items_ok_()))
            return false;
        try {
            (void)value_();
        } catch (...) {
            return false;
        }
        return true;
    }

private:
    // Every member but the constructor throws mp::EmptyHandle on a result moved from.
    detail::FutureCore& core() const { return detail::deref_handle(done_, "mp::AsyncResult"); }
    std::shared_ptr<detail::FutureCore> done_;
    std::function<T()> value_;
    std::function<bool()> items_ok_;
};

namespace detail {

/// What a Pool keeps of an imap's input side, so that close() can read the rest of it.
class IMapFeed {
public:
    virtual ~IMapFeed() = default;
    /// Reads and submits the rest of the input (an input that throws ends there).
    virtual void drain() = 0;
};

/// Where imaps submit their chunks: the Pool's engine while the Pool lives. An imap may outlive
/// its Pool; it then reads no more input.
struct IMapSink {
    std::mutex mu;
    PoolEngine* engine = nullptr;  // null once the Pool is gone
    std::vector<std::weak_ptr<IMapFeed>> feeds{};
};

/// Reads the next chunk of `range` (owned when given as an rvalue, else referenced) and submits
/// it to `sink`: the chunk's core and size, or std::nullopt at the end of the input. What the
/// input throws escapes, and the rows of the unfinished chunk are dropped, as Python's imap does.
template <class F, class V, class Rg>
auto chunk_reader(std::shared_ptr<IMapSink> sink, const F& fn, std::size_t chunksize,
                  Timeout task_timeout, Rg&& range) {
    using Stored = std::conditional_t<std::is_lvalue_reference_v<Rg>, Rg, std::remove_cvref_t<Rg>>;
    using Iter = std::ranges::iterator_t<std::remove_reference_t<Stored>>;
    struct State {
        Stored range;
        std::optional<Iter> it;  // begin() once the range has its final address
        ChunkBuilder<std::decay_t<F>, std::decay_t<V>> builder;
    };
    auto st = std::make_shared<State>(
        State{std::forward<Rg>(range), std::nullopt, ChunkBuilder<std::decay_t<F>, std::decay_t<V>>(fn)});
    return [st, sink = std::move(sink), chunksize, task_timeout]()
               -> std::optional<std::pair<std::shared_ptr<FutureCore>, std::size_t>> {
        if (!st->it) st->it.emplace(std::ranges::begin(st->range));
        Iter& it = *st->it;
        while (!st->builder.full(chunksize) && it != std::ranges::end(st->range)) {
            st->builder.add(*it);
            ++it;
        }
        const std::size_t n = st->builder.count();
        if (n == 0) return std::nullopt;
        std::lock_guard lk(sink->mu);
        if (sink->engine == nullptr) throw BrokenProcessPool("imap: the pool is gone");
        return std::pair(sink->engine->submit(st->builder.take(), JobOptions{task_timeout, n}), n);
    };
}

/// imap / imap_unordered results. The input is read lazily, in the thread that calls next()
/// (and in imap() itself): at most a few chunks per worker ahead of the results taken.
template <class R>
class IMapResults {
public:
    using Reader = std::function<std::optional<std::pair<std::shared_ptr<FutureCore>, std::size_t>>()>;

    /// `count`: the input's length when known without reading it (for the progress bar), else 0.
    IMapResults(Reader read, bool ordered, std::size_t window, bool progress, std::size_t count)
        : feed_(std::make_shared<Feed>()), ordered_(ordered), window_(std::max<std::size_t>(window, 1)) {
        feed_->read = std::move(read);
        if (!ordered_) feed_->queue = std::make_shared<CompletionQueue>(std::vector<FutureCore*>{});
        if (progress) {
            feed_->bar = std::make_shared<ProgressBar>(ordered ? "imap" : "imap_unordered", count);
            feed_->count_known = count != 0;
        }
        std::lock_guard lk(feed_->mu);
        top_up();
    }

    /// The next result: in input order (imap) or as chunks finish (imap_unordered). Throws the
    /// item's exception, or TimeoutError when `timeout` passes first (Python's next(timeout)).
    /// An exception thrown by the input comes once, after the results of the items read before
    /// it (the items of its unfinished chunk are dropped); then std::nullopt, as after the last.
    std::optional<R> next(Timeout timeout = std::nullopt) {
        if (!feed_) throw_empty_handle("mp::IMapResults");
        if (remaining_failed_ != 0) {
            // A chunk that failed as a whole (its worker died, say): each of its items raises.
            --remaining_failed_;
            std::rethrow_exception(failed_);
        }
        if (pos_ < items_.size()) {
            const ChunkItem& it = items_[pos_++];
            if (!it.ok) throw_item_error(it);
            return decode_item<R>(it.bytes);
        }
        std::shared_ptr<FutureCore> core;
        std::size_t size = 0;
        {
            std::lock_guard lk(feed_->mu);
            top_up();
            if (taken_ == feed_->cores.size()) {
                if (auto e = std::exchange(feed_->input_error, nullptr)) std::rethrow_exception(e);
                return std::nullopt;
            }
            if (ordered_) {
                core = feed_->cores[taken_];
                size = feed_->sizes[taken_];
            }
        }
        if (ordered_) {
            if (!core->wait(timeout)) throw TimeoutError("imap: no result in time");
        } else {
            // Chunks enter the queue in the order they enter cores: its indices are theirs.
            auto n = feed_->queue->next(deadline_after(timeout));
            if (!n) return std::nullopt;
            std::lock_guard lk(feed_->mu);
            core = feed_->cores[*n];
            size = feed_->sizes[*n];
        }
        ++taken_;
        pos_ = 0;
        items_.clear();
        std::exception_ptr e = core->error();
        if (!e && core->state() == FutureCore::State::cancelled)
            e = std::make_exception_ptr(CancelledError());
        if (e) {
            failed_ = e;
            remaining_failed_ = size - 1;
            std::rethrow_exception(e);
        }
        core_ = core;  // items_ views its bytes
        items_ = split_chunk(core->bytes(), size);
        return next(timeout);
    }

    using iterator = PullIterator<IMapResults, R>;
    iterator begin() { return iterator(this); }
    std::default_sentinel_t end() const noexcept { return {}; }

    /// For Pool::close(), which reads the rest of the input.
    std::shared_ptr<IMapFeed> feed() const { return feed_; }

private:
    friend iterator;
    R* pull() {
        current_ = next();
        return current_ ? &*current_ : nullptr;
    }
    struct Feed final : IMapFeed {
        std::mutex mu;  // one reader of the input at a time; guards what follows
        Reader read;
        std::vector<std::shared_ptr<FutureCore>> cores;  // the chunks submitted so far
        std::vector<std::size_t> sizes;
        bool ended = false;
        std::exception_ptr input_error;
        std::shared_ptr<CompletionQueue> queue;  // imap_unordered
        std::shared_ptr<ProgressBar> bar;
        bool count_known = false;

        // Submits one more chunk; false once the input has ended (or thrown: input_error).
        bool feed_one() {
            if (ended) return false;
            try {
                auto chunk = read();
                if (!chunk) {
                    ended = true;
                    return false;
                }
                auto& [core, n] = *chunk;
                cores.push_back(core);
                sizes.push_back(n);
                if (queue) queue->add(core.get());
                if (bar) {
                    if (!count_known) bar->add_total(n);
                    core->add_done_callback([bar = bar, n = n](FutureCore&) { bar->advance(n); });
                }
                return true;
            } catch (...) {
                ended = true;
                input_error = std::current_exception();
                read = nullptr;  // lets go of the input
                return false;
            }
        }
        void drain() override {
            std::lock_guard lk(mu);
            while (feed_one()) {
            }
        }
    };

    // With feed_->mu held: keeps window_ chunks submitted beyond those taken.
    void top_up() {
        while (feed_->cores.size() < taken_ + window_ && feed_->feed_one()) {
        }
    }

    std::shared_ptr<Feed> feed_;
    std::optional<R> current_;  // what the iterator points at
    bool ordered_;
    std::size_t window_;
    std::size_t taken_ = 0;
    std::size_t pos_ = 0;
    std::shared_ptr<FutureCore> core_;
    std::vector<ChunkItem> items_;
    std::exception_ptr failed_;
    std::size_t remaining_failed_ = 0;
};

/// Pool::close(): reads the rest of every live imap's input, so its work is submitted before
/// the pool takes no more.
inline void drain_imaps(IMapSink& sink) {
    std::vector<std::shared_ptr<IMapFeed>> live;
    {
        std::lock_guard lk(sink.mu);
        for (auto& w : sink.feeds)
            if (auto f = w.lock()) live.push_back(std::move(f));
        sink.feeds.clear();
    }
    // Not under sink.mu: reading submits, which takes it (the order is feed, then sink).
    for (auto& f : live) f->drain();
}

/// How many elements `range` has, when that can be known without consuming it; else 0.
template <class Rg>
std::size_t range_count(Rg& range) {
    if constexpr (std::ranges::sized_range<Rg>)
        return static_cast<std::size_t>(std::ranges::size(range));
    else if constexpr (std::ranges::forward_range<Rg>)
        return static_cast<std::size_t>(std::ranges::distance(range));
    else
        return 0;
}

/// Whether every chunk of `set` finished and every item in it succeeded (no item is decoded).
inline bool chunks_ok(const ChunkSet& set) {
    for (std::size_t c = 0; c < set.cores.size(); ++c) {
        const FutureCore& core = *set.cores[c];
        if (core.error() || core.state() != FutureCore::State::finished) return false;
        for (const ChunkItem& it : split_chunk(core.bytes(), set.sizes[c]))
            if (!it.ok) return false;
    }
    return true;
}

template <class R>
std::vector<R> collect_chunks(const ChunkSet& set) {
    std::vector<R> out;
    out.reserve(set.items);
    for (std::size_t c = 0; c < set.cores.size(); ++c) {
        const FutureCore& core = *set.cores[c];
        if (auto e = core.error()) std::rethrow_exception(e);
        if (core.state() == FutureCore::State::cancelled) throw CancelledError();
        for (const ChunkItem& it : split_chunk(core.bytes(), set.sizes[c])) {
            if (!it.ok) throw_item_error(it);
            out.push_back(decode_item<R>(it.bytes));
        }
    }
    return out;
}

}  // namespace detail

/// A pool of worker processes, as Python's multiprocessing.Pool.
class Pool {
public:
    /// cpu_count() workers.
    Pool() : Pool(PoolOptions{}) {}
    /// `processes` workers; less than 1 is std::invalid_argument.
    explicit Pool(int processes) : Pool(PoolOptions{.processes = processes}) {}
    explicit Pool(PoolOptions options) : engine_(make_config(options, {})) {}
    /// Each worker calls initializer(args...) first. One that throws or dies breaks the pool:
    /// its work fails with BrokenProcessPool (where Python's Pool would restart it for ever).
    template <class F, class... A>
    Pool(PoolOptions options, const F& initializer, const A&... args)
        : engine_(make_config(options, detail::make_transferable_task(initializer, args...))) {}
    /// See the destructor policy above.
    ~Pool();
    Pool(const Pool&) = delete;
    Pool& operator=(const Pool&) = delete;

    /// fn(args...) in a worker; waits for the result.
    template <class F, class... A>
    detail::call_result_t<F, A...> apply(const F& fn, const A&... args) {
        return apply_async(fn, args...).get();
    }

    /// fn(args...) in a worker, without waiting.
    template <class F, class... A>
        requires(!(sizeof...(A) == 1 && (detail::is_args<A> && ...)))
    AsyncResult<detail::call_result_t<F, A...>> apply_async(const F& fn, const A&... args) {
        return apply_async(fn, mp::Args<A...>{std::tuple<A...>(args...)}, nullptr, nullptr);
    }
    /// With callbacks: callback(result) on success, error_callback(exception) on failure, both
    /// in the pool's result thread. apply_async(f, mp::args(1, 2), on_ok, on_err).
    template <class F, class... A, class R = detail::call_result_t<F, A...>>
    AsyncResult<R> apply_async(const F& fn, const mp::Args<A...>& a,
                               std::function<void(const detail::item_t<R>&)> callback,
                               std::function<void(std::exception_ptr)> error_callback = nullptr) {
        detail::check_work<F, A...>();
        check_running();
        auto task = std::apply([&](const A&... v) { return *detail::make_task(fn, v...); }, a.values);
        auto core = engine_.submit(std::move(task));
        auto ready = with_callbacks<R>(core, std::move(callback), std::move(error_callback));
        return AsyncResult<R>(ready, [core] { return detail::decode_value<R>(core->bytes()); });
    }

    /// fn over `range`, results in order; blocks. chunksize 0: Python's default.
    template <class F, class Rg>
    auto map(const F& fn, Rg&& range, std::size_t chunksize = 0) {
        return map_async(fn, std::forward<Rg>(range), MapOptions{.chunksize = chunksize}).get();
    }
    template <class F, class Rg>
    auto map(const F& fn, Rg&& range, MapOptions options) {
        return map_async(fn, std::forward<Rg>(range), options).get();
    }
    template <class F, class Rg, class V = std::ranges::range_value_t<Rg>,
              class R = detail::item_t<detail::call_result_t<F, V>>>
    AsyncResult<std::vector<R>> map_async(const F& fn, Rg&& range, MapOptions options = {},
                                          std::type_identity_t<std::function<void(const std::vector<R>&)>> callback = nullptr,
                                          std::function<void(std::exception_ptr)> error_callback = nullptr) {
        detail::check_work<F, V>();
        return async_chunks<R>(
            submit<F, V>(fn, options, detail::range_count(range), detail::zip_rows(range)),
            std::move(callback), std::move(error_callback), options.progress, "map");
    }
    /// Python's positional form: map_async(f, xs, chunksize, callback, error_callback).
    template <class F, class Rg, class V = std::ranges::range_value_t<Rg>,
              class R = detail::item_t<detail::call_result_t<F, V>>>
    AsyncResult<std::vector<R>> map_async(const F& fn, Rg&& range, std::size_t chunksize,
                                          std::type_identity_t<std::function<void(const std::vector<R>&)>> callback = nullptr,
                                          std::function<void(std::exception_ptr)> error_callback = nullptr) {
        return map_async(fn, std::forward<Rg>(range), MapOptions{.chunksize = chunksize}, std::move(callback),
                         std::move(error_callback));
    }

    /// fn(a, b, ...) for each tuple (or pair) of `range`, results in order; blocks.
    template <class F, class Rg>
    auto starmap(const F& fn, Rg&& range, std::size_t chunksize = 0) {
        return starmap_async(fn, std::forward<Rg>(range), MapOptions{.chunksize = chunksize}).get();
    }
    template <class F, class Rg, class Tup = std::ranges::range_value_t<Rg>>
    auto starmap_async(const F& fn, Rg&& range, MapOptions options = {},
                       std::type_identity_t<std::function<void(
                           const std::vector<detail::item_t<detail::star_result_t<F, Tup>>>&)>>
                           callback = nullptr,
                       std::function<void(std::exception_ptr)> error_callback = nullptr) {
        return star<F, Tup>(fn, range, options, std::move(callback), std::move(error_callback),
                            std::make_index_sequence<std::tuple_size_v<Tup>>{});
    }
    /// Python's positional form: starmap_async(f, xs, chunksize, callback, error_callback).
    template <class F, class Rg, class Tup = std::ranges::range_value_t<Rg>>
    auto starmap_async(const F& fn, Rg&& range, std::size_t chunksize,
                       std::type_identity_t<std::function<void(
                           const std::vector<detail::item_t<detail::star_result_t<F, Tup>>>&)>>
                           callback = nullptr,
                       std::function<void(std::exception_ptr)> error_callback = nullptr) {
        return starmap_async(fn, std::forward<Rg>(range), MapOptions{.chunksize = chunksize}, std::move(callback),
                             std::move(error_callback));
    }

    /// Lazy results in input order; chunksize 0 means 1, as Python's imap. The input is lazy
    /// too: it is read in the thread that takes the results, a few chunks per worker ahead of
    /// them, so an endless input works and what the input throws comes from next() after the
    /// results before it. An rvalue range is kept by the results; an lvalue range must outlive
    /// them. close() reads the rest of the input of every imap still alive.
    template <class F, class Rg, class V = std::ranges::range_value_t<Rg>,
              class R = detail::item_t<detail::call_result_t<F, V>>>
    detail::IMapResults<R> imap(const F& fn, Rg&& range, MapOptions options = {}) {
        return lazy_imap<F, V, R>(fn, std::forward<Rg>(range), options, true);
    }
    template <class F, class Rg>
    auto imap(const F& fn, Rg&& range, std::size_t chunksize) {
        return imap(fn, std::forward<Rg>(range), MapOptions{.chunksize = chunksize});
    }
    /// Lazy results as they finish (whole chunks keep their inner order); the input as imap's.
    template <class F, class Rg, class V = std::ranges::range_value_t<Rg>,
              class R = detail::item_t<detail::call_result_t<F, V>>>
    detail::IMapResults<R> imap_unordered(const F& fn, Rg&& range, MapOptions options = {}) {
        return lazy_imap<F, V, R>(fn, std::forward<Rg>(range), options, false);
    }
    template <class F, class Rg>
    auto imap_unordered(const F& fn, Rg&& range, std::size_t chunksize) {
        return imap_unordered(fn, std::forward<Rg>(range), MapOptions{.chunksize = chunksize});
    }

    /// No more work may be submitted; the workers exit once the submitted work is done.
    void close();
    /// Kills the workers now; unfinished work fails with BrokenProcessPool. Called from a
    /// callback (on the pool's own thread) it returns at once, and the workers are killed as
    /// soon as the callback returns.
    void terminate();
    /// Waits for the workers to exit. Throws mp::Error unless close() or terminate() came first
    /// (Python: ValueError "Pool is still running").
    void join();

    /// The number of worker processes.
    int processes() const noexcept { return engine_.size(); }

    /// Internal, for SyncManager::Pool's server: a pool whose initializer, and work whose
    /// calls, arrive already encoded (by apply_async's and map's builders in another process).
    struct Encoded {};
    Pool(Encoded, PoolOptions options, std::optional<detail::Task> initializer)
        : engine_(make_config(options, std::move(initializer))) {}
    std::shared_ptr<detail::FutureCore> submit_encoded(detail::Task task, detail::JobOptions options) {
        check_running();
        return engine_.submit(std::move(task), options);
    }

    /// Counts of submitted / pending / running / done / failed tasks, per worker too.
    PoolStats stats() const { return engine_.stats(); }

private:
    static detail::PoolConfig make_config(const PoolOptions& o, std::optional<detail::Task> init);
    void check_running() const;

    // The core an AsyncResult waits on: `core` itself, or with callbacks one that ends only after
    // they ran (as Python's, whose result is ready only once the callback returned).
    template <class R>
    std::shared_ptr<detail::FutureCore> with_callbacks(
        const std::shared_ptr<detail::FutureCore>& core,
        std::function<void(const detail::item_t<R>&)> callback,
        std::function<void(std::exception_ptr)> error_callback) {
        if (!callback && !error_callback) return core;
        return core->after_callback([callback = std::move(callback),
                                     error_callback = std::move(error_callback)](detail::FutureCore& c) {
            if (auto e = c.error()) {
                if (error_callback) error_callback(e);
            } else if (c.state() == detail::FutureCore::State::cancelled) {
                if (error_callback) error_callback(std::make_exception_ptr(CancelledError()));
            } else if (callback || error_callback) {
                if constexpr (std::is_void_v<R>) {
                    if (callback) callback(std::monostate{});
                } else {
                    // A value that cannot be decoded here is the call's failure, as get() reports
                    // it: error_callback, not an exception blamed on a callback that never ran.
                    std::optional<R> v;
                    try {
                        v.emplace(detail::decode_value<R>(c.bytes()));
                    } catch (...) {
                        if (error_callback) error_callback(std::current_exception());
                        else throw;
                    }
                    if (v && callback) callback(*v);
                }
            }
        }, on_pool_thread());
    }

    // Where a callback goes when its result is in before it was attached: the pool's thread,
    // like every other (never the caller's, which may hold what the callback takes).
    detail::FutureCore::Runner on_pool_thread() {
        return [this](std::function<void()> fn) { engine_.post(std::move(fn)); };
    }

    template <class F, class... V, class Rows>
    detail::ChunkSet submit(const F& fn, const MapOptions& options, std::size_t n, Rows&& rows) {
        check_running();
        std::size_t chunksize = options.chunksize;
        if (chunksize == 0) chunksize = detail::default_chunksize(n, engine_.size());
        return detail::submit_chunks<F, V...>(engine_, fn, chunksize, options.task_timeout,
                                              std::forward<Rows>(rows));
    }

    template <class R>
    AsyncResult<std::vector<R>> async_chunks(detail::ChunkSet set,
                                             std::function<void(const std::vector<R>&)> callback,
                                             std::function<void(std::exception_ptr)> error_callback,
                                             bool progress, const char* label) {
        auto shared = std::make_shared<detail::ChunkSet>(std::move(set));
        if (progress) detail::show_progress(*shared, label);
        auto all = detail::FutureCore::when_all(shared->cores);
        if (callback || error_callback) {
            all = all->after_callback([shared, callback = std::move(callback),
                                       error_callback = std::move(error_callback)](detail::FutureCore& c) {
                // error_callback only for the work's failure (a task's exception, or an item's
                // that collecting the results rethrows); what escapes `callback` is printed, as
                // for apply_async (run_callback), and get() still returns the values.
                std::exception_ptr e = c.error();
                std::optional<std::vector<R>> v;
                if (!e) {
                    try {
                        v = detail::collect_chunks<R>(*shared);
                    } catch (...) {
                        e = std::current_exception();
                    }
                }
                if (v) {
                    if (callback) callback(*v);
                } else if (error_callback) {
                    error_callback(e);
                }
            }, on_pool_thread());
        }
        return AsyncResult<std::vector<R>>(all, [shared] { return detail::collect_chunks<R>(*shared); },
                                           [shared] { return detail::chunks_ok(*shared); });
    }

    template <class F, class Tup, class Rg, class CB, std::size_t... I>
    auto star(const F& fn, Rg& range, const MapOptions& options, CB callback,
              std::function<void(std::exception_ptr)> error_callback, std::index_sequence<I...>) {
        using R = detail::item_t<detail::star_result_t<F, Tup>>;
        detail::check_work<F, std::tuple_element_t<I, Tup>...>();
        return async_chunks<R>(submit<F, std::tuple_element_t<I, Tup>...>(fn, options,
                                                                          detail::range_count(range),
                                                                          detail::star_rows(range)),
                               std::move(callback), std::move(error_callback), options.progress,
                               "starmap");
    }

    // How many chunks an imap reads ahead of the results taken, per worker.
    static constexpr std::size_t kIMapChunksPerWorker = 2;

    template <class F, class V, class R, class Rg>
    detail::IMapResults<R> lazy_imap(const F& fn, Rg&& range, MapOptions options, bool ordered) {
        detail::check_work<F, V>();
        check_running();
        if (options.chunksize == 0) options.chunksize = 1;
        // Only a sized range: counting a forward one would read it (and an endless one for ever).
        std::size_t count = 0;
        if constexpr (std::ranges::sized_range<Rg>) count = static_cast<std::size_t>(std::ranges::size(range));
        detail::IMapResults<R> results(
            detail::chunk_reader<F, V>(imaps_, fn, options.chunksize, options.task_timeout,
                                       std::forward<Rg>(range)),
            ordered, kIMapChunksPerWorker * static_cast<std::size_t>(engine_.size()),
            options.progress, count);
        std::lock_guard lk(imaps_->mu);
        std::erase_if(imaps_->feeds, [](const auto& w) { return w.expired(); });
        imaps_->feeds.push_back(results.feed());
        return results;
    }

    enum class Stage { running, closed, terminated };
    // Atomic: close() or terminate() may come from a callback, on the pool's own thread.
    std::atomic<Stage> stage_{Stage::running};
    detail::PoolEngine engine_;
    std::shared_ptr<detail::IMapSink> imaps_ = make_imap_sink(engine_);

    static std::shared_ptr<detail::IMapSink> make_imap_sink(detail::PoolEngine& engine) {
        auto sink = std::make_shared<detail::IMapSink>();
        sink->engine = &engine;
        return sink;
    }
};

}  // namespace mp
