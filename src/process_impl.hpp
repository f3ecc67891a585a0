#pragma once
// Internals shared by process.cpp and forkserver.cpp.

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <string_view>
#include <sys/types.h>
#include <vector>

#include "launch.hpp"
#include "mp/process.hpp"
#include "sys/fd.hpp"
#include "util_internal.hpp"

namespace mp::detail {

struct ProcessState {
    enum class Stage { created, started, closed };

    // What start() writes after fork, while a fork child shares the parent's pages: together in
    // the first 64 bytes, so that they seldom straddle two pages (each page is a copy-on-write
    // fault). Not over-aligned: glibc serves aligned allocations outside its per-thread cache,
    // which writes more of the allocator's pages per start than a straddle costs.
    std::mutex mu;  // serialises reaping between threads that join the same child
    pid_t pid = 0;
    pid_t owner = 0;  // the process that started the child: only it may wait for or signal it
    sys::Fd pidfd;
    std::unique_ptr<ChildRecord> child_record;  // fork: kept until the state goes
    // Past the first 64 bytes: written by forkserver starts only, which copy no page.
    ParentOnlyFd status;  // forkserver: the server writes the exit status here, then closes it

    std::string name;
    bool daemon = false;
    StartMethod method = StartMethod::fork;
    std::string authkey;
    std::vector<int> identity;

    Stage stage = Stage::created;
    bool status_gone = false;  // the server closed `status` without writing a status
    // Someone else reaped the child (SIGCHLD ignored, waitpid(-1)): it has ended, how is lost.
    bool status_lost = false;
    std::optional<int> exitcode;
    bool listed = false;  // in the registry of running children (guarded by mu once started)

    /// Waits (at most `timeout`; std::nullopt forever) for the child to end and reaps it.
    /// Throws ProcessError when its exit status was collected by someone else; the child has
    /// then ended and leaves the registry of running children.
    bool wait(detail::Timeout timeout);
    /// wait(0), except that a child whose status was lost counts as ended instead of throwing:
    /// for callers that look at many children (start(), active_children(), exit) or only need
    /// to know that it ended (close()).
    bool ended();
    /// Sends `sig` unless the child has already been reaped.
    void signal(int sig);
    void check_owner(const char* what) const;

private:
    bool wait_impl(detail::Timeout timeout);
    bool reap_locked();
};
static_assert(offsetof(ProcessState, child_record) + sizeof(std::unique_ptr<ChildRecord>) <= 64,
              "ProcessState: what a fork start() writes after fork should fit in 64 bytes");

/// What a new child needs to know about itself, prepared in the parent before fork so the child
/// has nothing to allocate before it is known safe.
struct ChildSetup {
    ProcessIdentity* identity = nullptr;
    ParentProcess* parent = nullptr;
    /// Arms the parent-death signal (SIGKILL): a daemon's, or a pool worker's (daemon or not).
    bool dies_with_parent = false;
    pid_t parent_pid = 0;  // for the "parent already gone" check that goes with it
    /// A forkserver child: the server gave it SIGTERM's default action, no blocked signal and
    /// /dev/null as stdin already (reset_child_signals and stdin_from_null ran there once).
    bool from_server = false;
    /// Non-zero: the parent-death signal is this one, with a handler that kills the child only
    /// when the parent *process* is gone (see checked_death_signal()).
    int checked_death_signal = 0;
};

/// The checked parent-death signal a daemon started by the calling thread needs (SIGRTMAX), or 0
/// for plain SIGKILL: the kernel sends the parent-death signal when the thread that forked the
/// child ends, not the process, so a daemon started by any thread but the main one (which
/// lasts as long as the process) would die with that thread. With this signal its handler
/// kills it only once it was reparented out of the process. Pool workers are forked by a
/// thread that outlives them and keep plain SIGKILL.
int checked_death_signal(bool daemon, bool pool_worker) noexcept;

/// In a new child, before any user code: installs the identity, forgets the parent's children and
/// locks, points stdin at /dev/null, arms the parent-death signal (dies_with_parent).
/// Async-signal-safe.
void become_child(const ChildSetup& setup) noexcept;
/// SIGTERM back to its default action if ignored, then every signal unblocked: the thread that
/// called start() may block signals (a sigwait/signalfd design) or the parent may ignore SIGTERM,
/// and either would make terminate() a no-op on the child. Async-signal-safe.
void reset_child_signals() noexcept;
/// As Python does: a child does not read its parent's stdin. Async-signal-safe.
void stdin_from_null() noexcept;
/// Runs `body`, printing an escaping exception as "Process <name>:" and the error; returns the exit
/// code (0, or 1 after an exception).
template <class F>
int run_guarded(F&& body) noexcept;
/// Python's util._exit_function, for a process that ends: the finalizers of priority 0 and up,
/// then its daemon children terminated and every child joined, then the other finalizers, each
/// step logged as Python logs it. Registered with std::atexit by the first child started or
/// util::Finalize with an exit priority made in this process; finish_child calls it too.
void exit_function() noexcept;
/// Registers exit_function with std::atexit, once per program (a fork child has its parent's).
void register_exit_function() noexcept;
/// In a new child, once it is set up and before its work: Python's "child process calling
/// self.run()" (info).
void log_child_start() noexcept;
/// In a new child, once it is set up and before its work: std::exit (or a return from a thread
/// the work started ... anything that calls exit) in the child then ends it as finish_child does,
/// with exit's status, and runs none of the handlers and static destructors registered before
/// (the parent's, under fork; the program's own, under forkserver and spawn), as Python's child
/// leaves with os._exit whatever the target did.
void guard_child_exit() noexcept;
/// Runs exit_function (this process's finalizers and children, as Python's), flushes the
/// standard streams (see flush_standard_streams_at_exit), then _exit(code). A child never
/// returns through main.
[[noreturn]] void finish_child(int code) noexcept;
/// Prints the current exception as Python prints an exception escaping Process.run.
void report_child_exception() noexcept;

template <class F>
int run_guarded(F&& body) noexcept {
    try {
        body();
        return 0;
    } catch (...) {
        report_child_exception();
        return 1;
    }
}

/// Everything a forkserver or spawn child needs to learn, sent to it over its own socket.
struct ChildRequest {
    std::string name;
    bool daemon = false;  // current_process().daemon in the child
    /// Killed with its parent: a daemon, or a pool worker (ChildSpec::dies_with_parent).
    bool dies_with_parent = false;
    /// ChildSetup::checked_death_signal, from the thread that starts it (checked_death_signal()).
    int checked_death_signal = 0;
    std::string authkey;
    std::vector<int> identity;
    std::string parent_name;
    pid_t parent_pid = 0;
    /// The requester's program_build_id(): a child running other code refuses the request.
    std::uint64_t build_id = 0;
    /// The requester's logger, which the child's follows.
    LogSettings log{};
    bool logs_start = true;  // ChildSpec::logs_start
    std::string task;
    std::vector<int> task_fds;  // borrowed; sent with SCM_RIGHTS, not encoded
};

/// The request for a forkserver or spawn child of `spec` (which must carry a task). Throws
/// ProcessError when the task carries more descriptors than one message can.
ChildRequest make_request(const ChildSpec& spec);
/// Sends `req` on a new child's request socket: a header with the task's descriptors, then the
/// payload. Throws std::system_error when the child has gone (the caller learns how from its pidfd).
void send_request(int fd, const ChildRequest& req);
/// In a new forkserver or spawn child: reads its request from `fd` (then closed), becomes the
/// child it describes (arming its parent-death signal when `direct`, i.e. the requester
/// is the OS parent), runs the task and leaves with its exit code.
[[noreturn]] void run_request(int fd, bool direct) noexcept;
/// The key of the running program's build id (as CodeRef::module names it); 0 when unknown.
std::uint64_t program_build_id() noexcept;

namespace forkserver {

using Request = ChildRequest;

struct Started {
    pid_t pid;
    sys::Fd pidfd;
    ParentOnlyFd status;
};

/// Starts the server now if it is not running.
void ensure_running();
/// The server's pid, or 0 when this process has not started one.
pid_t server_pid();
/// Has the server fork a child that runs `req`.
Started start_child(const Request& req);
/// Reads the exit status the server sent. std::nullopt: the server went away without sending one.
std::optional<int> read_status(int status_fd);
/// read_status without waiting: false while the child runs (nothing sent yet), true once the
/// status has come (`code` set) or the server has gone without it (`code` empty).
bool try_read_status(int status_fd, std::optional<int>& code);
/// In a new fork child: forget the parent's client lock (another thread may have held it).
void after_fork_in_child() noexcept;
/// In a child the server has just forked: its request socket, then run_request. Never returns.
[[noreturn]] void child_main(int request_fd, pid_t server_pid, bool dies_with_parent) noexcept;
/// The server's entry in the spawned server process: runs the `preload` tasks, then serves on
/// `control` until every client has gone. Never returns.
[[noreturn]] void serve(int control, const std::vector<std::string>& preload) noexcept;
/// The tasks every later start of the server runs first (set_forkserver_preload). Throws
/// ProcessError while this process's server runs.
void set_preload(std::vector<std::string> tasks);

}  // namespace forkserver
}  // namespace mp::detail
