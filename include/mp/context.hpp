#pragma once
/// \file
/// Contexts, as Python's multiprocessing.get_context(): an object whose factories make processes,
/// pools, queues, locks ... bound to one start method, so that a library can use spawn (say)
/// without changing the program's default with set_start_method.
///
///     auto ctx = mp::get_context(mp::StartMethod::spawn);
///     auto q = ctx.Queue<int>();
///     mp::Process p = ctx.Process(worker, q);      // started by spawn, whatever the default
///     mp::Pool pool = ctx.Pool(4);                  // spawn workers
///
/// What the start method binds. Process, Pool and ProcessPoolExecutor (and process_options,
/// pool_options, executor_options, for a Process subclass or a pool with an initializer) take the
/// context's method. Queues, pipes, locks, events, barriers, values and arrays are the same
/// objects whatever the context: unlike Python's, whose semaphores made for a fork context cannot
/// go to a spawn child, mp's pass their descriptors along with every start method, so any of them
/// may be handed to a child of any method. Manager() starts its server process by fork under
/// every context (its registered types are C++ closures, which only a copy of this process has).
///
/// The default context, get_context(): its factories are the module-level ones (mp::Process,
/// mp::Pool ...), as Python's. Its Process takes the default start method (set_start_method,
/// fork unless changed); its Pool and ProcessPoolExecutor, as mp::Pool and
/// mp::ProcessPoolExecutor, use forkserver unless told otherwise: set_start_method does not
/// change the pools' default (Python's does), since a forked pool in a threaded parent is the
/// hang mp's default avoids. A concrete context, get_context(method), binds all of them.
///
/// Children and the default. A child's default start method is fork (or, under fork, a copy of
/// its parent's), whatever method started it: Python makes a child's default the method that
/// started it, mp keeps fork so that a nested Process may take any callable.

#include <cstddef>
#include <initializer_list>
#include <optional>
#include <span>
#include <string_view>
#include <utility>
#include <vector>

#include "mp/connection.hpp"
#include "mp/futures.hpp"
#include "mp/managers.hpp"
#include "mp/pool.hpp"
#include "mp/process.hpp"
#include "mp/queue.hpp"
#include "mp/shared_memory.hpp"
#include "mp/synchronize.hpp"
#include "mp/util.hpp"

namespace mp {

class Context;

/// Python's multiprocessing.get_context(): the default context (see above). Fixes the default
/// start method, as Python's does.
Context get_context();
/// Python's multiprocessing.get_context(method): the context of `method`. ProcessError for spawn
/// in a program not linked with -Wl,--wrap=main (where Python raises ValueError for a method it
/// cannot offer).
Context get_context(StartMethod method);
/// Python's multiprocessing.get_context("spawn"): get_context(parse_start_method(name)).
Context get_context(std::string_view name);

/// Python's multiprocessing.get_all_start_methods(): the methods this program can use, the
/// default for Process first: {fork, spawn, forkserver}, without spawn in a program not linked
/// with -Wl,--wrap=main (its forkserver is then forked from it, see process.hpp).
std::vector<StartMethod> get_all_start_methods();

/// A function the forkserver runs before it forks children (see set_forkserver_preload).
using PreloadFunction = void (*)();

/// Python's set_forkserver_preload(module_names). C++ has no modules to import: the forkserver
/// calls these functions, in order, once when it starts and before it forks its first child, so
/// what they set up (a library initialised, a table loaded, a global set) is inherited by every
/// forkserver child, and costs nothing per child. They run only in the forkserver: neither in
/// this process nor in fork or spawn children. A function is named by its code address, as a
/// pool's work is (a function or a captureless lambda: `+[] { ... }` or plain `[] { ... }`).
///
/// The list is kept for every later start of this process's forkserver (one that was killed is
/// restarted with it). Throws ProcessError when the forkserver already runs: Python keeps the
/// list quietly until a restart, so a preload set too late silently does nothing; mp says so.
/// Set it before the first forkserver start (a forkserver Process or pool, or
/// set_start_method(StartMethod::forkserver), which starts the server at once).
/// std::invalid_argument for a null function. A function that throws stops the server's start:
/// the server prints the exception ("Process ForkServer:" ...) on stderr and the start that
/// needed it throws ProcessError. A function that never returns blocks every forkserver start.
/// In a program without the spawn hook the server is forked from this process (see process.hpp)
/// and runs them there, with fork's rules.
void set_forkserver_preload(std::vector<PreloadFunction> functions);

/// A start method and factories bound to it (see the file's overview). Cheap to copy; two
/// contexts are equal when they are both the default or both of the same method.
class Context {
public:
    /// Python's ctx.get_start_method(): the context's method; for the default context,
    /// mp::get_start_method().
    StartMethod get_start_method() const;
    /// Python's ctx.get_context(): this context.
    Context get_context() const noexcept { return *this; }
    /// Python's ctx.get_context(method): mp::get_context(method).
    Context get_context(StartMethod method) const { return mp::get_context(method); }
    /// The default context: mp::set_start_method. A concrete context cannot change its method:
    /// std::invalid_argument, as Python's ValueError.
    void set_start_method(StartMethod method, bool force = false) const;
    /// True for get_context() (no method of its own).
    bool is_default() const noexcept { return !method_.has_value(); }
    bool operator==(const Context&) const = default;

    /// `options` with the context's start method (none for the default context). An option that
    /// names another method is std::invalid_argument: the context would otherwise be ignored.
    ProcessOptions process_options(ProcessOptions options = {}) const;
    /// As process_options, for Pool.
    PoolOptions pool_options(PoolOptions options = {}) const;
    /// As process_options, for ProcessPoolExecutor.
    ExecutorOptions executor_options(ExecutorOptions options = {}) const;

    /// Python's ctx.Process(target=f, args=(...)): a Process of this context's method.
    template <class F, class... Args>
        requires std::invocable<std::decay_t<F>&, std::decay_t<Args>&...>
    mp::Process Process(F&& target, Args&&... args) const {
        return mp::Process(process_options(), std::forward<F>(target), std::forward<Args>(args)...);
    }
    template <class F, class... Args>
        requires std::invocable<std::decay_t<F>&, std::decay_t<Args>&...>
    mp::Process Process(ProcessOptions options, F&& target, Args&&... args) const {
        return mp::Process(process_options(std::move(options)), std::forward<F>(target),
                           std::forward<Args>(args)...);
    }

    /// Python's ctx.Pool(processes): a pool whose workers start by this context's method.
    mp::Pool Pool(PoolOptions options = {}) const { return mp::Pool(pool_options(std::move(options))); }
    mp::Pool Pool(int processes) const { return Pool(PoolOptions{.processes = processes}); }
    template <class F, class... A>
    mp::Pool Pool(PoolOptions options, const F& initializer, const A&... args) const {
        return mp::Pool(pool_options(std::move(options)), initializer, args...);
    }
    /// concurrent.futures' ProcessPoolExecutor(mp_context=ctx).
    mp::ProcessPoolExecutor ProcessPoolExecutor(ExecutorOptions options = {}) const {
        return mp::ProcessPoolExecutor(executor_options(std::move(options)));
    }
    template <class F, class... A>
    mp::ProcessPoolExecutor ProcessPoolExecutor(ExecutorOptions options, const F& initializer,
                                                const A&... args) const {
        return mp::ProcessPoolExecutor(executor_options(std::move(options)), initializer, args...);
    }
    /// A started SyncManager (its server is forked under every context, see above).
    SyncManager Manager() const { return SyncManager(); }

    template <class T>
    mp::Queue<T> Queue(std::size_t maxsize = 0) const {
        return mp::Queue<T>(maxsize);
    }
    template <class T>
    mp::JoinableQueue<T> JoinableQueue(std::size_t maxsize = 0) const {
        return mp::JoinableQueue<T>(maxsize);
    }
    template <class T>
    mp::SimpleQueue<T> SimpleQueue() const {
        return mp::SimpleQueue<T>();
    }
    std::pair<Connection, Connection> Pipe(bool duplex = true) const { return mp::Pipe(duplex); }

    mp::Lock Lock() const { return mp::Lock(); }
    mp::RLock RLock() const { return mp::RLock(); }
    mp::Condition Condition() const { return mp::Condition(); }
    mp::Condition Condition(mp::Lock lock) const { return mp::Condition(std::move(lock)); }
    mp::Condition Condition(mp::RLock lock) const { return mp::Condition(std::move(lock)); }
    mp::Semaphore Semaphore(int value = 1) const { return mp::Semaphore(value); }
    mp::BoundedSemaphore BoundedSemaphore(int value = 1) const { return mp::BoundedSemaphore(value); }
    mp::Event Event() const { return mp::Event(); }
    mp::Barrier Barrier(int parties, detail::Timeout timeout = std::nullopt) const {
        return mp::Barrier(parties, timeout);
    }
    template <class F>
        requires std::invocable<std::decay_t<F>&>
    mp::Barrier Barrier(int parties, F&& action, detail::Timeout timeout = std::nullopt) const {
        return mp::Barrier(parties, std::forward<F>(action), timeout);
    }

    template <class T>
    mp::Value<T> Value(const T& init = T{}) const {
        return mp::Value<T>(init);
    }
    template <class T>
    mp::RawValue<T> RawValue(const T& init = T{}) const {
        return mp::RawValue<T>(init);
    }
    template <class T>
    mp::Array<T> Array(std::size_t n) const {
        return mp::Array<T>(n);
    }
    template <class T>
    mp::Array<T> Array(std::initializer_list<T> values) const {
        return mp::Array<T>(values);
    }
    template <class T>
    mp::Array<T> Array(std::span<const T> values) const {
        return mp::Array<T>(values);
    }
    template <class T>
    mp::RawArray<T> RawArray(std::size_t n) const {
        return mp::RawArray<T>(n);
    }
    template <class T>
    mp::RawArray<T> RawArray(std::span<const T> values) const {
        return mp::RawArray<T>(values);
    }

    /// The module-level functions Python's contexts also carry.
    int cpu_count() const { return mp::cpu_count(); }
    ProcessIdentity& current_process() const { return mp::current_process(); }
    std::optional<ParentProcess> parent_process() const { return mp::parent_process(); }
    std::vector<ChildProcess> active_children() const { return mp::active_children(); }
    Logger& get_logger() const noexcept { return mp::get_logger(); }
    Logger& log_to_stderr(std::optional<LogLevel> level = std::nullopt) const {
        return mp::log_to_stderr(level);
    }
    void set_forkserver_preload(std::vector<PreloadFunction> functions) const {
        mp::set_forkserver_preload(std::move(functions));
    }

private:
    friend Context get_context();
    friend Context get_context(StartMethod method);
    explicit Context(std::optional<StartMethod> method) noexcept : method_(method) {}
    std::optional<StartMethod> method_;
};

}  // namespace mp
