#pragma once
/// \file
/// mp::Process: run a function in a child process, as Python's multiprocessing.Process.
///
///     void work(std::string who) { std::printf("%s\n", who.c_str()); }
///     mp::Process p(work, std::string("egon"));
///     p.start();
///     p.join();                     // p.exitcode() == 0
///
/// Start methods
/// - fork (the default for Process): the child is a copy of the parent, so the target may be any
///   callable, captures included. Fork copies only the calling thread: a lock another thread held
///   at that moment (a std::mutex, the allocator's lock while it was inside malloc, a stdio lock
///   taken by flockfile or printf) stays locked in the child for ever, and the child hangs at its
///   first use of it. mp's own child code takes no such lock before the target runs, but the
///   target itself may; in a parent that runs threads, prefer forkserver or spawn.
/// - spawn: the child is a fresh exec of this program (/proc/self/exe) that runs the target
///   instead of main: nothing of the parent's threads, locks or heap comes with it. Before the
///   target, the new process runs what every start of the program runs before main: the dynamic
///   loader and the static initialisers of the program and of its libraries (globals with
///   constructors, function-registering statics); main itself does not run. The hook that takes
///   the place of main needs the program linked with `-Wl,--wrap=main`: linking with mp::mp in
///   CMake (target_link_libraries) or with `pkg-config --libs mp` adds it; without it, starting a
///   spawn child throws ProcessError (and the forkserver is forked from the parent instead, see
///   below). The child checks that its program file is
///   the parent's (build id). The slowest start of the three (an exec and the program's
///   initialisation per child); it suits few, long-lived children.
/// - forkserver (the default for pools): the child is forked from a single-threaded server
///   process, started once by spawn at the first forkserver use or at
///   set_start_method(StartMethod::forkserver), so a parent that already runs threads is safe
///   whenever it starts it. Starts are nearly as fast as fork: the server keeps one child forked
///   ahead of the next request (a spare, named "mp-fs-spare" while it waits), so a start costs a
///   message to it rather than a fork, and the next fork overlaps the child's run. In a program
///   without the spawn
///   hook (mp used from a plugin, or linked without mp's link options) the server is forked from
///   the parent instead: then start it before other threads run (set_start_method at the top of
///   main), as its children are copies of the parent made at that moment.
///   mp::set_forkserver_preload (context.hpp) names functions the server runs once before its
///   first child, so their children inherit what they set up.
/// - Under spawn and forkserver the target must be transferable (a function, a function pointer,
///   a captureless lambda or an empty function object) and its arguments must have an mp::Codec;
///   a Process subclass or a capturing lambda runs only under fork (a compile error where the
///   call must be sent, a ProcessError at start() otherwise). Descriptors its arguments carry
///   (queues, locks, connections, shared memory) go with SCM_RIGHTS; every other descriptor of
///   the parent stays behind. A plain Process with no target runs nothing and exits with 0 under
///   every method, as in Python.

/// Lifetime
/// - exitcode() is std::nullopt while the child runs, N after it exited with N, -N after signal N.
///   A forkserver child whose server was killed before it reported how the child ended has 255,
///   whatever its end (as Python's: the server, its OS parent, is the one that learns it).
/// - An exception escaping the target prints "Process <name>:" and the exception to stderr; the
///   exit code is 1. A child never runs the parent's atexit handlers or static destructors: it
///   flushes stdio and leaves with _exit, also when the target calls std::exit(n) (its exit
///   code is then n, and its own util::Finalize callbacks and children are seen to first).
/// - Daemon children are terminated when the parent exits normally and receive SIGKILL when the
///   parent dies any other way (PR_SET_PDEATHSIG; a forkserver daemon's parent is the server,
///   and it goes when its requesting process does, and also when the server is killed: unlike
///   Python's, where it would live on unwatched). The kernel sends the parent-death signal
///   when the *thread* that forked the child ends, so under fork and spawn a daemon started by
///   a thread other than the main one gets SIGRTMAX instead, with a handler that kills it only
///   once the parent process is gone: it outlives the thread that started it. Such a daemon
///   must leave SIGRTMAX alone, and a blocking call of its own may fail with EINTR (as with any
///   handled signal) when that thread ends. A daemon may not
///   start children. Non-daemon children are joined when the parent returns from main or calls
///   std::exit.
/// - A fork child starts with no signal blocked and, when the parent ignored SIGTERM, with SIGTERM's
///   default action, so terminate() always works; other handlers and dispositions are inherited.
/// - When a child's target returns, the child terminates its own daemon children and joins the
///   others before it exits, as Python's children do.
/// - Destructor policy: destroying a started Process whose child still runs joins a non-daemon
///   child (like std::jthread) and terminates (SIGTERM, then waits) a daemon child. Destroying a
///   Process always reaps its child: it never leaves a zombie.
///
/// Moving
/// - A Process is movable, so std::vector<mp::Process> works (emplace_back, start, reallocate,
///   join). The child does not notice: the new object owns it, with its pid, sentinel, exit code
///   and place in active_children(). A move may happen at any time, also while the child runs.
/// - A moved-from Process owns nothing. Every member function of it, name() included, throws
///   ProcessError; it may only be destroyed (which does nothing) or assigned a new Process.
/// - Move assignment onto a Process whose child still runs throws ProcessError and changes
///   neither object, as close() does. std::jthread joins instead, but a join hidden in an
///   assignment can block for ever (a child waiting for input), and the destructor's other case,
///   terminating a daemon, would kill work without a word; join() or terminate() the child
///   first. A child that has already ended is reaped by the assignment.
/// - Moving a subclass object into a plain Process (or into another base) slices away its run();
///   start() on the sliced object throws ProcessError rather than run the wrong function.

#include <chrono>
#include <cstddef>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <sys/types.h>
#include <type_traits>
#include <typeinfo>
#include <utility>
#include <vector>

#include "mp/detail/deadline.hpp"
#include "mp/detail/task.hpp"
#include "mp/errors.hpp"

namespace mp {

/// How a child process is created (see "Start methods" above).
enum class StartMethod { fork, forkserver, spawn };

/// Options for a Process; every member has a sensible default.
struct ProcessOptions {
    /// Empty: "Process-N" (N counts this process's children; a grandchild is "Process-1:2").
    std::string name{};
    /// Empty: inherit the daemon flag of the current process.
    std::optional<bool> daemon{};
    /// Empty: the default set with set_start_method (fork unless changed).
    std::optional<StartMethod> start_method{};
};

namespace detail {
struct ProcessState;
}

/// A lightweight, copyable view of a running child, as returned by active_children().
class ChildProcess {
public:
    pid_t pid() const;
    const std::string& name() const;
    bool daemon() const;
    bool is_alive() const;
    std::optional<int> exitcode() const;
    void join() const;
    /// Returns true when the child has ended within the timeout (see Process::join).
    [[nodiscard]] bool join(detail::Timeout timeout) const;
    void terminate() const;
    void kill() const;
    /// Sends SIGINT (see Process::interrupt).
    void interrupt() const;
    int sentinel() const;

private:
    friend std::vector<ChildProcess> active_children();
    explicit ChildProcess(std::shared_ptr<detail::ProcessState> s) : state_(std::move(s)) {}
    std::shared_ptr<detail::ProcessState> state_;
};

/// A child process: created with a target and arguments, or by subclassing and overriding run().
class Process {
public:
    /// Subclass style: override run().
    Process();
    explicit Process(ProcessOptions options);

    /// Target style: the child calls target(args...) with copies of the arguments: under fork
    /// the child's copies, as of a lambda's captures (nothing is encoded, so any argument works,
    /// a Barrier with a capturing action included); under forkserver and spawn copies sent with
    /// mp::Codec. A target parameter that is a non-const lvalue reference is a compile error
    /// (the child would change only its own copy), except to an mp handle (a queue, lock,
    /// connection, shared memory ...). A null function pointer throws mp::Error.
    template <class F, class... Args>
        requires std::invocable<std::decay_t<F>&, std::decay_t<Args>&...>
    explicit Process(F&& target, Args&&... args)
        : Process(ProcessOptions{}, std::forward<F>(target), std::forward<Args>(args)...) {}

    template <class F, class... Args>
        requires std::invocable<std::decay_t<F>&, std::decay_t<Args>&...>
    Process(ProcessOptions options, F&& target, Args&&... args) : Process(std::move(options)) {
        detail::check_no_mutable_reference<std::decay_t<F>, std::decay_t<Args>...>();
        if constexpr (std::is_pointer_v<std::decay_t<F>>) {
            const std::decay_t<F> fp = target;
            if (fp == nullptr) throw Error("mp::Process: the target is a null function pointer");
        }
        // Encode before the lambda below moves the arguments away (two arguments of one call
        // would be evaluated in an unspecified order). A fork child runs the copy below, as it
        // would a capturing lambda, so nothing is encoded: an argument whose codec refuses to
        // send it (a Barrier with a capturing action) works there as it does captured.
        std::optional<detail::Task> task;
        if (start_method() != StartMethod::fork) task = detail::make_task(target, args...);
        set_target(std::move(task),
                   [f = std::decay_t<F>(std::forward<F>(target)),
                    ... a = std::decay_t<Args>(std::forward<Args>(args))]() mutable {
                       std::invoke(f, a...);
                   });
    }

    Process(const Process&) = delete;
    Process& operator=(const Process&) = delete;
    /// Takes over `other`'s child (or its target, before start); `other` is left moved-from.
    Process(Process&& other) noexcept;
    /// Throws ProcessError while this Process's child still runs (see "Moving" in the overview
    /// of process.hpp).
    Process& operator=(Process&& other);
    /// See the destructor policy above.
    virtual ~Process();

    /// Starts the child. Throws ProcessError when already started, closed, or when the current
    /// process is a daemon; std::system_error when the OS refuses.
    void start();
    /// Waits for the child to end. Throws ProcessError before start, after close, or in the child.
    /// A child reaped by someone else (SIGCHLD ignored or SA_NOCLDWAIT, or a waitpid(-1)
    /// elsewhere in the program) still gives its exit code on Linux 6.15 and later, which keeps
    /// it for the child's pidfd (every start method; under fork, when SIGCHLD is ignored or has
    /// a handler, the child waits for the parent to open its pidfd before it runs; a waitpid(-1)
    /// in another thread with no handler may reap a child that ends at once before then: start()
    /// then throws ProcessError). On older kernels its status is lost: join()
    /// throws ProcessError (Python's exitcode stays None), and the child, ended all the same,
    /// leaves active_children() and close() accepts it.
    void join();
    /// Waits at most `timeout` (any duration; seconds::max() waits for ever, zero or negative
    /// just looks); returns true when the child has ended.
    [[nodiscard]] bool join(detail::Timeout timeout);
    /// True between start() and the child's end (false, without an exception, for a child whose
    /// exit status someone else collected: see join()).
    bool is_alive();
    /// Sends SIGTERM. Throws ProcessError before start or after close.
    void terminate();
    /// Sends SIGKILL. Throws ProcessError before start or after close.
    void kill();
    /// Sends SIGINT, as Python 3.14's interrupt(). Throws ProcessError before start or after
    /// close. Python raises KeyboardInterrupt in the child's target, so an uncaught one ends it
    /// with exit code 1; C++ cannot raise an exception into running code, so the child's SIGINT
    /// disposition decides: by default (fork children get the parent's, forkserver children the
    /// default action) the child ends by the signal and exitcode() is -SIGINT, as a Python child
    /// whose SIGINT handler is SIG_DFL. A target that wants Python's behaviour installs a SIGINT
    /// handler that sets a flag, and at its next check throws (exit code 1, "Process <name>:"
    /// printed, as an uncaught KeyboardInterrupt) or returns (exit code 0). A child that
    /// inherited SIGINT ignored (the parent ignores it) ignores interrupt() too.
    void interrupt();
    /// Releases the sentinel and other resources; throws ProcessError while the child runs.
    /// Afterwards every method but name() throws ProcessError.
    void close();

    /// The child's pid; 0 before start.
    pid_t pid() const;
    const std::string& name() const;
    void name(std::string n);
    /// std::nullopt until the child has ended (and before start); stays std::nullopt, without an
    /// exception, when its exit status was collected by someone else (see join()).
    std::optional<int> exitcode();
    bool daemon() const;
    /// Throws ProcessError after start.
    void daemon(bool d);
    /// A pidfd that polls readable once the child has ended. Throws ProcessError before start.
    int sentinel() const;
    /// The key the child will use for Listener/Client authentication (bytes, 32 by default).
    const std::string& authkey() const;
    void authkey(std::string key);
    StartMethod start_method() const;

protected:
    /// The child's work. The default calls the target given to the constructor.
    virtual void run();

private:
    void set_target(std::optional<detail::Task> task, std::function<void()> fn);
    /// The state, or ProcessError naming `what` when this Process was moved from.
    detail::ProcessState& state(const char* what) const;
    /// Throws ProcessError when this object was moved from, or is a slice of a subclass object.
    void check_startable() const;

    std::shared_ptr<detail::ProcessState> state_;  // null once moved from
    std::function<void()> target_;
    std::optional<detail::Task> task_;
    // The dynamic type of the object this one was moved from (null when it was constructed):
    // a move into a base type drops the subclass's run().
    const std::type_info* moved_from_type_ = nullptr;
};

/// What the current process knows about itself (Python's current_process()).
struct ProcessIdentity {
    std::string name = "MainProcess";
    pid_t pid = 0;
    bool daemon = false;
    /// Inherited by children; 32 random bytes in the main process.
    std::string authkey{};
    /// Position in the process tree: {} for the main process, {1} for Process-1, {1, 2} ...
    std::vector<int> identity{};
};

/// The parent of the current process, if it was started by mp.
struct ParentProcess {
    std::string name{};
    pid_t pid = 0;
    /// True while the parent runs.
    bool is_alive() const;
};

/// This process's identity; its name and authkey may be changed.
ProcessIdentity& current_process();
/// std::nullopt in a process that mp did not start.
std::optional<ParentProcess> parent_process();
/// The children started by this process that still run; finished ones are reaped.
std::vector<ChildProcess> active_children();
/// CPUs this process may use: its affinity mask, capped by a cgroup v2/v1 CPU quota (at least 1).
int cpu_count();
/// Sets the default start method. Throws ProcessError when one was already set, unless `force`,
/// and for spawn in a program not linked with -Wl,--wrap=main. Choosing forkserver
/// starts the server now.
void set_start_method(StartMethod method, bool force = false);
/// The default start method (Python's get_start_method()); fixes it: a later set_start_method
/// needs `force`.
StartMethod get_start_method();
/// Python's get_start_method(allow_none): with `allow_none`, std::nullopt while the default is
/// not yet fixed (neither set with set_start_method nor taken by a Process) and nothing is fixed;
/// otherwise get_start_method().
std::optional<StartMethod> get_start_method(bool allow_none);

/// "fork", "forkserver" or "spawn", as Python names the method.
std::string to_string(StartMethod m);
/// The method Python calls `name`: "fork", "forkserver" or "spawn". Any other name is
/// std::invalid_argument (Python's ValueError "cannot find context for 'name'").
StartMethod parse_start_method(std::string_view name);
/// Python's set_start_method("spawn"): set_start_method(parse_start_method(name), force).
void set_start_method(std::string_view name, bool force = false);

}  // namespace mp
