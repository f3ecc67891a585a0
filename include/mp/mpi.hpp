#pragma once
/// \file
/// mp::mpi: the executor interface of mp::ProcessPoolExecutor over MPI ranks, for work that
/// outgrows one machine. Modelled on mpi4py.futures (MPICommExecutor, `python -m mpi4py.futures`):
/// every rank runs the same program, started by `mpirun -n N`; rank 0 (the root) runs the
/// program and gets executors, the other N-1 ranks serve tasks until the root's Environment
/// ends, then every rank calls MPI_Finalize and leaves.
///
///     int square(int x) { return x * x; }
///     int main(int argc, char** argv) {
///         return mp::mpi::run(argc, argv, [] {          // workers serve inside run()
///             mp::mpi::Executor ex;                      // N-1 worker ranks
///             for (int y : ex.map({.chunksize = 100}, square, std::vector{1, 2, 3})) ...
///             return 0;
///         });
///     }
///
/// The same program without run():
///
///     mp::mpi::Environment env(argc, argv);
///     if (!env.is_root()) return env.serve();
///     ... executors, one after another ...
///
/// Work and values are what ProcessPoolExecutor takes: a transferable callable (function,
/// function pointer, captureless lambda, empty function object) and arguments and results with
/// an mp::Codec. Code is named by its offset in the program plus the program's build id: every
/// worker rank reports its build id when an executor starts, and a rank running a different
/// binary makes the Executor constructor throw mp::Error naming that rank (no task is ever sent
/// to it, so no wrong function is called). Values of any size cross (messages past MPI's int
/// count are sent in pieces). File descriptors cannot cross: such an argument is mp::Error.
///
/// Failures:
/// - an exception thrown by a task comes back through its future exactly as from the local
///   pool: standard and mp exception types as themselves, others as mp::RemoteError whose
///   origin names the rank ("MPIRank-2@host (pid N)");
/// - a rank that dies (segfault, abort, exit in a task, a lost machine): by default Open MPI's
///   mpirun then aborts the whole job, root included, with a message naming the rank and its
///   signal, and mpirun exits non-zero; nothing hangs. The futures cannot fail with
///   WorkerDied first, because the root process is killed with the job. Work whose crashes
///   should be survivable belongs in a local mp::ProcessPoolExecutor (inside a task, if need be).
///   Where the MPI library reports an error instead of aborting, every unfinished future fails
///   with mp::BrokenProcessPool naming the MPI error, and so does every later submit.
///   With ExecutorOptions::isolate_tasks each rank runs its tasks in a local worker process
///   instead, and a crash fails only that task (or chunk) with mp::WorkerDied, as in the
///   local pool; its pid is the rank machine's, and where() names the rank ("MPIRank-2@host"). Such a task runs outside the rank, so it cannot call MPI itself (the call ends
///   that worker: mp::WorkerDied).
/// - a per-task time limit needs isolate_tasks (a rank's own task cannot be killed without
///   killing the job): ExecutorOptions::task_timeout.
///
/// Scheduling: tasks travel to the ranks in batches, each rank holding about 2 ms of expected
/// work (from the time its earlier tasks took, and a few at a time after it ran dry or while
/// its oldest task runs long), the least loaded rank first, so a burst is spread over the ranks
/// and what has not been sent can still be cancelled. A worker sends a finished task's answer
/// within about a millisecond even while a later task runs.
///
/// Threads: the root's MPI calls are all made by one thread that each Executor owns (MPI is
/// initialised with MPI_THREAD_MULTIPLE when available, at least MPI_THREAD_SERIALIZED), so
/// futures complete while the caller waits. Only one Executor may be live at a time. A worker
/// rank sends answers from a second thread while a task runs, which needs MPI_THREAD_MULTIPLE
/// (a task may call MPI itself); under MPI_THREAD_SERIALIZED it sends them before each task
/// instead, one message per task.

#include <chrono>
#include <cstddef>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <type_traits>
#include <utility>

#include "mp/futures.hpp"

namespace mp::mpi {

/// MPI for this process: initialises it (unless the program already did) and finalises it.
///
/// Destructor policy: on the root, shuts down and waits for a live Executor (destroy executors
/// first), then tells every worker rank to stop serving and waits for each to echo the stop
/// (dropping answers nobody waits for any more); on a worker rank that never called serve()
/// (it returned from main without serving), serves until the root's stop, so that neither
/// side waits for the other for ever; on every rank, calls MPI_Finalize when this object
/// initialised MPI.
class Environment {
public:
    /// MPI_Init_thread; throws mp::Error when MPI cannot give MPI_THREAD_SERIALIZED, when a
    /// second Environment is made while one lives, or once MPI has been finalised (an earlier
    /// Environment ended, or the program called MPI_Finalize): MPI cannot start twice.
    Environment(int& argc, char**& argv);
    /// For programs that have no argc/argv at hand (MPI accepts null).
    Environment();
    ~Environment();
    Environment(const Environment&) = delete;
    Environment& operator=(const Environment&) = delete;

    /// This process's rank in MPI_COMM_WORLD and the number of ranks.
    int rank() const noexcept;
    int size() const noexcept;
    /// Rank 0: the one that runs the program and creates executors.
    bool is_root() const noexcept { return rank() == 0; }
    /// On a worker rank: runs the tasks the root's executors send until the root's Environment
    /// ends; returns 0 (an exit code), at once when this rank has served already. On the root
    /// it is mp::Error.
    int serve();
};

/// mpi4py's `python -m mpi4py.futures` in one call: sets up MPI, runs root_main() on rank 0
/// while the other ranks serve, then finalises everywhere. Returns the exit code for main():
/// root_main's on the root, 0 on the others. An exception escaping root_main is printed
/// ("mp::mpi: rank 0: ...") and gives 1, after the workers have been stopped cleanly.
int run(int& argc, char**& argv, const std::function<int()>& root_main);

/// Options of an mp::mpi::Executor.
struct ExecutorOptions {
    /// Each worker rank runs its tasks in a local worker process of its own (a one-worker
    /// mp::ProcessPoolExecutor on that machine) instead of in the rank itself: a task that
    /// crashes its process fails with mp::WorkerDied (pid and signal; a chunk fails whole) and
    /// the rank starts a new local worker, where without it Open MPI ends the whole job. Costs a
    /// local hop per task (batched) and a fork per crash.
    bool isolate_tasks = false;
    /// Only with isolate_tasks: a task running longer than this (counted from its start) has
    /// its local worker killed and fails with mp::TimeoutError. Empty: no limit.
    detail::Timeout task_timeout{};
};

namespace detail {

/// The root's side: the thread that hands batches of tasks to worker ranks and collects their
/// answers. Same contract as mp::detail::PoolEngine::submit.
class Engine {
public:
    explicit Engine(const ExecutorOptions& options);
    ~Engine();
    Engine(const Engine&) = delete;
    Engine& operator=(const Engine&) = delete;
    std::shared_ptr<mp::detail::FutureCore> submit(mp::detail::Task task,
                                                   mp::detail::JobOptions options = {});
    void shutdown(bool wait, bool cancel_pending);
    int size() const noexcept { return workers_; }
    /// Refuses what map() cannot do over MPI (a per-task time limit), before it submits.
    void check_map(const MapOptions& options) const {
        if (options.task_timeout) throw Error("mp::mpi: map's task_timeout is not supported over MPI");
    }
    struct Impl;

private:
    int workers_ = 0;
    std::unique_ptr<Impl> impl_;
};

/// The build id key of the running program (as in its CodeRefs), which the ranks compare.
std::uint64_t program_key();
/// Messages larger than this many bytes travel in pieces (default 1 GiB; at most INT_MAX).
/// Set from the environment variable MP_MPI_MAX_MESSAGE when the Environment starts.
std::size_t max_message_bytes() noexcept;

}  // namespace detail

/// mpi4py's MPIPoolExecutor / MPICommExecutor on the root: submit, map, shutdown, with futures
/// that work with mp::wait and mp::as_completed. Its workers are every rank but the root.
/// map (mp::detail::MapFront): chunksize calls travel (and fail) together; options.task_timeout
/// is not supported (mp::Error).
///
/// Destructor policy: shuts down and waits, as ProcessPoolExecutor does. The worker ranks keep
/// serving: a later Executor uses them again.
class Executor : public mp::detail::MapFront<detail::Engine> {
public:
    /// Needs a live Environment on rank 0 and at least 2 ranks (mp::Error otherwise). Checks
    /// that every worker rank runs this very binary: mp::Error naming the first that does not.
    explicit Executor(ExecutorOptions options = {}) : MapFront(options) {}
    ~Executor() = default;
    Executor(const Executor&) = delete;
    Executor& operator=(const Executor&) = delete;

    /// Schedules fn(args...) on some worker rank. mp::Error after shutdown().
    template <class F, class... A>
        requires(!std::is_same_v<std::decay_t<F>, MapOptions>)
    Future<mp::detail::call_result_t<F, A...>> submit(const F& fn, const A&... args) {
        mp::detail::check_work<F, A...>();
        return Future<mp::detail::call_result_t<F, A...>>(
            engine_.submit(*mp::detail::make_task(fn, args...), {}));
    }

    // map(fn, ranges...) and map(options, fn, ranges...): inherited from MapFront.

    /// No new work after this. wait: block until every submitted task has finished.
    /// cancel_futures: cancel the tasks not yet sent to a rank. Safe to call more than once and
    /// from several threads at once; shutdown with wait from a done callback (the executor's own
    /// thread, which cannot wait for itself) is mp::Error. The destructor there (the last owner a
    /// callback's capture, say) shuts down without waiting: the thread finishes the submitted work
    /// and ends by itself; the next Executor, and the Environment's end, wait for it.
    void shutdown(bool wait = true, bool cancel_futures = false) { engine_.shutdown(wait, cancel_futures); }

    /// The number of worker ranks.
    int max_workers() const noexcept { return engine_.size(); }
};

}  // namespace mp::mpi
