#pragma once
// The machinery under ProcessPoolExecutor and Pool: worker processes, the pool's thread that
// feeds them and collects their results, and what happens when one dies or overruns.

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <sys/types.h>
#include <vector>

#include "mp/detail/future_core.hpp"
#include "mp/detail/task.hpp"
#include "mp/process.hpp"

namespace mp {

/// One worker, as PoolStats shows it.
struct WorkerStats {
    pid_t pid = 0;
    std::string name{};
    /// Tasks (or chunks) handed to this worker and not yet answered: running or queued in it.
    std::size_t assigned = 0;
    /// 1 while it runs a task, else 0.
    std::size_t running = 0;
    std::size_t done = 0;    // finished with a value
    std::size_t failed = 0;  // finished with an exception (raised, timed out, or the worker died)
};

/// A snapshot of a pool's work, counted in tasks (a chunk of a map counts as one task).
struct PoolStats {
    std::size_t submitted = 0;
    std::size_t pending = 0;    // submitted, not yet handed to a worker
    std::size_t running = 0;    // handed to a worker, not yet answered
    std::size_t done = 0;       // finished with a value
    std::size_t failed = 0;     // finished with an exception
    std::size_t cancelled = 0;
    std::size_t workers_started = 0;  // over the pool's life, replacements included
    std::size_t worker_deaths = 0;    // workers that died unasked (crash, kill, exit in a task)
    std::vector<WorkerStats> workers{};  // the live workers
};

namespace detail {

struct PoolConfig {
    int workers = 1;
    StartMethod method = StartMethod::forkserver;
    std::size_t max_tasks_per_child = 0;   // 0: no limit
    std::size_t max_memory_per_child = 0;  // bytes of resident growth after ready; 0: no limit
    std::optional<std::chrono::nanoseconds> task_timeout{};
    bool break_on_worker_death = false;
    std::optional<Task> initializer{};
    std::string worker_name{};  // "ForkServerPoolWorker" -> "ForkServerPoolWorker-3"
    /// Daemon workers (a task cannot start an mp::Process), as multiprocessing.Pool's; false for
    /// ProcessPoolExecutor's, as Python's since 3.9. Either kind is killed when the pool's
    /// process dies.
    bool daemon_workers = true;
};

struct JobOptions {
    std::optional<std::chrono::nanoseconds> timeout{};  // overrides PoolConfig::task_timeout
    std::size_t items = 0;                              // 0: a single call; N: a chunk of N calls
};

/// Joins the thread of every pool destroyed on that thread (in a done callback, and so left to
/// finish there), once it has stopped its workers. The program's exit does (an atexit handler).
void join_detached_pools();

class PoolEngine {
public:
    explicit PoolEngine(PoolConfig config);
    /// Shuts down and waits (as shutdown(true, false)). In a child of a fork() that copied the
    /// pool (the program's own fork, not mp's), it does nothing: the pool is the parent's.
    ~PoolEngine();
    PoolEngine(const PoolEngine&) = delete;
    PoolEngine& operator=(const PoolEngine&) = delete;

    /// Queues `task`; the returned core finishes with its encoded result (a chunk: the item
    /// outcomes). Throws mp::Error after shutdown, BrokenProcessPool once broken. The task's
    /// descriptors are duplicated here: the caller's may close when this returns.
    std::shared_ptr<FutureCore> submit(Task task, JobOptions options = {});
    /// No new work; cancel_pending cancels what no worker has started. wait: block until every
    /// started task has finished and every worker has exited.
    void shutdown(bool wait, bool cancel_pending);
    /// Kills the workers at once; unfinished work fails with BrokenProcessPool("terminated").
    void terminate();
    /// Python 3.14's _force_shutdown: shutdown(false, true), then `sig` to every worker; what
    /// they were running fails with BrokenProcessPool and the pool is broken. Returns once the
    /// signals are sent, without waiting for the workers to end.
    void stop_workers(int sig);
    /// Runs `fn` on the pool's thread, where results and their callbacks are handled; in the
    /// calling thread once that thread has ended. `fn` reports its own errors: what
    /// escapes it is dropped.
    void post(std::function<void()> fn);
    /// Blocks until the pool's thread has finished (after shutdown or terminate).
    void join();
    bool shut_down() const;
    bool broken() const;
    /// True in a child of a fork() (not mp's) that copied the pool: it is the parent's, and
    /// everything but the destructor and stats() throws mp::Error.
    bool inherited() const noexcept;
    int size() const noexcept { return config_workers_; }
    PoolStats stats() const;

    struct Impl;

private:
    // mp::Error in a child of a fork() (not mp's) that copied the pool: it is the parent's.
    void check_owner() const;
    int config_workers_;
    std::shared_ptr<Impl> impl_;
};

/// Splits a chunk's result bytes into its items: each a value (bytes for the codec) or an error.
struct ChunkItem {
    bool ok = false;
    std::string_view bytes{};  // the encoded value, or an ErrorInfo
};
std::vector<ChunkItem> split_chunk(const std::string& bytes, std::size_t expected);
/// Throws the exception an item carries.
[[noreturn]] void throw_item_error(const ChunkItem& item);

/// Python's default chunksize for Pool.map: ceil(n / (4 * workers)).
std::size_t default_chunksize(std::size_t n, int workers) noexcept;

}  // namespace detail
}  // namespace mp
