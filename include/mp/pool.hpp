#pragma once
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
/// Callbacks (apply_async, map_async) run in the pool's result thread, never in a worker; they
/// must not block for long.
///
/// Destructor policy: as Python's `with Pool()` (and Pool.__del__), destroying a Pool that is
/// still running (neither closed nor terminated) terminates it: unfinished work fails with
/// BrokenProcessPool and the workers are killed. After close(), the destructor waits for the
/// submitted work to finish and the workers to exit, as join() does.

#include <chrono>
#include <cstddef>
#include <exception>
#include <functional>
#include <memory>
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
    std::optional<int> processes;
    /// A worker is replaced after this many tasks (Python's maxtasksperchild); 0: never.
    std::size_t maxtasksperchild = 0;
    /// A worker whose resident memory passes this many bytes after a task is replaced; 0: never.
    std::size_t max_memory_per_child = 0;
    /// Empty: forkserver.
    std::optional<StartMethod> start_method;
    /// Per-task (per-chunk) time limit, counted from when the task is the next for a worker;
    /// the worker is killed, the task fails with TimeoutError (one it had not started goes to
    /// another worker).
    std::optional<std::chrono::nanoseconds> task_timeout;
};

/// The arguments of an apply_async with callbacks: pool.apply_async(f, mp::args(1, 2), on_ok).
template <class... A>
struct Args {
    std::tuple<A...> values;
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
    /// A single call's result, or a map's whole list.
    AsyncResult(std::shared_ptr<detail::FutureCore> done, std::function<T()> value)
        : done_(std::move(done)), value_(std::move(value)) {}

    /// Waits for and returns the value; throws what the work threw, or TimeoutError when
    /// `timeout` passes first (the work goes on).
    T get(detail::Timeout timeout = std::nullopt) const {
        if (!done_->wait(timeout)) throw TimeoutError("the result did not arrive in time");
        if (auto e = done_->error()) std::rethrow_exception(e);
        if (done_->state() == detail::FutureCore::State::cancelled) throw CancelledError();
        return value_();
    }
    template <class Rep, class Period>
    T get(std::chrono::duration<Rep, Period> timeout) const {
        return get(detail::Timeout(std::chrono::duration_cast<std::chrono::nanoseconds>(timeout)));
    }
    /// Waits until ready; false when `timeout` passed first.
    bool wait(detail::Timeout timeout = std::nullopt) const { return done_->wait(timeout); }
    template <class Rep, class Period>
    bool wait(std::chrono::duration<Rep, Period> timeout) const {
        return wait(detail::Timeout(std::chrono::duration_cast<std::chrono::nanoseconds>(timeout)));
    }
    bool ready() const noexcept { return done_->done(); }
    /// Whether the call completed without raising. Throws mp::Error when not ready (Python:
    /// ValueError).
    bool successful() const {
        if (!ready()) throw Error("the result is not ready");
        return done_->state() == detail::FutureCore::State::finished && !done_->error();
    }

private:
    std::shared_ptr<detail::FutureCore> done_;
    std::function<T()> value_;
};

namespace detail {

/// imap / imap_unordered results.
template <class R>
class IMapResults {
public:
    IMapResults(ChunkSet set, bool ordered, bool progress)
        : set_(std::make_shared<ChunkSet>(std::move(set))), ordered_(ordered) {
        if (!ordered_) {
            std::vector<FutureCore*> raw;
            for (auto& c : set_->cores) raw.push_back(c.get());
            queue_ = std::make_shared<CompletionQueue>(std::move(raw));
        }
        if (progress) show_progress(*set_, ordered ? "imap" : "imap_unordered");
    }

    std::size_t size() const noexcept { return set_->items; }

    /// The next result: in input order (imap) or as chunks finish (imap_unordered). Throws the
    /// item's exception, or TimeoutError when `timeout` passes first (Python's next(timeout)).
    /// std::nullopt after the last.
    std::optional<R> next(Timeout timeout = std::nullopt) {
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
        if (taken_ == set_->cores.size()) return std::nullopt;
        std::size_t chunk;
        if (ordered_) {
            chunk = taken_;
            if (!set_->cores[chunk]->wait(timeout)) throw TimeoutError("imap: no result in time");
        } else {
            std::optional<std::chrono::steady_clock::time_point> deadline;
            if (timeout) deadline = std::chrono::steady_clock::now() + *timeout;
            auto n = queue_->next(deadline);
            if (!n) return std::nullopt;
            chunk = *n;
        }
        ++taken_;
        FutureCore& core = *set_->cores[chunk];
        pos_ = 0;
        items_.clear();
        std::exception_ptr e = core.error();
        if (!e && core.state() == FutureCore::State::cancelled)
            e = std::make_exception_ptr(CancelledError());
        if (e) {
            failed_ = e;
            remaining_failed_ = set_->sizes[chunk] - 1;
            std::rethrow_exception(e);
        }
        items_ = split_chunk(core.bytes(), set_->sizes[chunk]);
        return next(timeout);
    }

    class iterator {
    public:
        using iterator_category = std::input_iterator_tag;
        using value_type = R;
        using difference_type = std::ptrdiff_t;
        iterator() = default;
        explicit iterator(IMapResults* owner) : owner_(owner) { advance(); }
        R& operator*() { return *value_; }
        iterator& operator++() {
            advance();
            return *this;
        }
        void operator++(int) { advance(); }
        friend bool operator==(const iterator& a, std::default_sentinel_t) noexcept {
            return a.owner_ == nullptr;
        }

    private:
        void advance() {
            value_ = owner_->next();
            if (!value_) owner_ = nullptr;
        }
        IMapResults* owner_ = nullptr;
        std::optional<R> value_;
    };
    iterator begin() { return iterator(this); }
    std::default_sentinel_t end() const noexcept { return {}; }

private:
    std::shared_ptr<ChunkSet> set_;
    bool ordered_;
    std::shared_ptr<CompletionQueue> queue_;
    std::size_t taken_ = 0;
    std::size_t pos_ = 0;
    std::vector<ChunkItem> items_;
    std::exception_ptr failed_;
    std::size_t remaining_failed_ = 0;
};

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
        add_callbacks<R>(core, std::move(callback), std::move(error_callback));
        return AsyncResult<R>(core, [core] { return detail::decode_value<R>(core->bytes()); });
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
    template <class F, class Rg>
    auto map_async(const F& fn, Rg&& range, std::size_t chunksize) {
        return map_async(fn, std::forward<Rg>(range), MapOptions{.chunksize = chunksize});
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

    /// Lazy results in input order; chunksize 0 means 1, as Python's imap.
    template <class F, class Rg, class V = std::ranges::range_value_t<Rg>,
              class R = detail::item_t<detail::call_result_t<F, V>>>
    detail::IMapResults<R> imap(const F& fn, Rg&& range, MapOptions options = {}) {
        detail::check_work<F, V>();
        if (options.chunksize == 0) options.chunksize = 1;
        return detail::IMapResults<R>(submit<F, V>(fn, options, 0, detail::zip_rows(range)), true,
                                      options.progress);
    }
    template <class F, class Rg>
    auto imap(const F& fn, Rg&& range, std::size_t chunksize) {
        return imap(fn, std::forward<Rg>(range), MapOptions{.chunksize = chunksize});
    }
    /// Lazy results as they finish (whole chunks keep their inner order).
    template <class F, class Rg, class V = std::ranges::range_value_t<Rg>,
              class R = detail::item_t<detail::call_result_t<F, V>>>
    detail::IMapResults<R> imap_unordered(const F& fn, Rg&& range, MapOptions options = {}) {
        detail::check_work<F, V>();
        if (options.chunksize == 0) options.chunksize = 1;
        return detail::IMapResults<R>(submit<F, V>(fn, options, 0, detail::zip_rows(range)), false,
                                      options.progress);
    }
    template <class F, class Rg>
    auto imap_unordered(const F& fn, Rg&& range, std::size_t chunksize) {
        return imap_unordered(fn, std::forward<Rg>(range), MapOptions{.chunksize = chunksize});
    }

    /// No more work may be submitted; the workers exit once the submitted work is done.
    void close();
    /// Kills the workers now; unfinished work fails with BrokenProcessPool.
    void terminate();
    /// Waits for the workers to exit. Throws mp::Error unless close() or terminate() came first
    /// (Python: ValueError "Pool is still running").
    void join();

    /// The number of worker processes.
    int processes() const noexcept { return engine_.size(); }
    /// Counts of submitted / pending / running / done / failed tasks, per worker too.
    PoolStats stats() const { return engine_.stats(); }

private:
    static detail::PoolConfig make_config(const PoolOptions& o, std::optional<detail::Task> init);
    void check_running() const;

    template <class R>
    void add_callbacks(const std::shared_ptr<detail::FutureCore>& core,
                       std::function<void(const detail::item_t<R>&)> callback,
                       std::function<void(std::exception_ptr)> error_callback) {
        if (!callback && !error_callback) return;
        core->add_done_callback([callback = std::move(callback),
                                 error_callback = std::move(error_callback)](detail::FutureCore& c) {
            if (auto e = c.error()) {
                if (error_callback) error_callback(e);
            } else if (c.state() == detail::FutureCore::State::cancelled) {
                if (error_callback) error_callback(std::make_exception_ptr(CancelledError()));
            } else if (callback) {
                if constexpr (std::is_void_v<R>)
                    callback(std::monostate{});
                else
                    callback(detail::decode_value<R>(c.bytes()));
            }
        });
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
            all->add_done_callback([shared, callback = std::move(callback),
                                    error_callback = std::move(error_callback)](detail::FutureCore& c) {
                std::exception_ptr e = c.error();
                if (!e) {
                    try {
                        auto v = detail::collect_chunks<R>(*shared);
                        if (callback) callback(v);
                        return;
                    } catch (...) {
                        e = std::current_exception();
                    }
                }
                if (error_callback) error_callback(e);
            });
        }
        return AsyncResult<std::vector<R>>(all, [shared] { return detail::collect_chunks<R>(*shared); });
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

    enum class Stage { running, closed, terminated };
    Stage stage_ = Stage::running;
    detail::PoolEngine engine_;
};

}  // namespace mp
