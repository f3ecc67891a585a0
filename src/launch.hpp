#pragma once
// The one way mp starts a process. Process::start, the pool's workers and the long-lived helpers
// (forkserver, shared-memory tracker) all come here, so the rules of a start are written once:
//   - flush before fork what the child would flush again at its end (C stdio, and the C++
//     standard streams when they keep buffers of their own), and discard in a fork child what
//     another thread wrote to them between that flush and the fork (the parent's to write);
//   - every signal but SIGCHLD blocked in the forking thread across fork (become_child
//     unblocks), so a signal sent to the new child before it has reset its dispositions stays
//     pending (StartSignalBlock);
//   - the start method: fork here, exec the program afresh (spawn), or ask the forkserver
//     (spawn and forkserver children read one request, src/spawn.cpp);
//   - a pidfd for every child, and a child that cannot get one killed and reaped at once, so
//     a failed start never leaves a process behind.

#include <csignal>
#include <memory>
#include <span>
#include <string>
#include <string_view>
#include <pthread.h>
#include <sys/types.h>
#include <type_traits>
#include <utility>
#include <vector>

#include "mp/detail/task.hpp"
#include "mp/process.hpp"
#include "sys/fd.hpp"

namespace mp::detail {

/// Blocks every signal but SIGCHLD in the calling thread for its lifetime: held by a thread
/// across the fork or clone of a start, so a signal sent to the new child before it has set its
/// dispositions stays pending (Linux never discards a blocked signal) rather than running a
/// handler of the parent or being lost.
///
/// Not SIGCHLD: the forking thread is its children's parent, and while it blocks SIGCHLD the
/// kernel does not discard, as it does for a signal ignored by default, the SIGCHLD of a child
/// of it that ends meanwhile (an earlier start's, or spawn's middle child): it goes to another
/// thread of the program, whose blocking call with a timeout (SO_RCVTIMEO, a timed futex ...)
/// then fails with EINTR although no handler runs. A new child has no children of its own, so
/// no SIGCHLD comes its way before it has set up.
class StartSignalBlock {
public:
    StartSignalBlock() noexcept {
        sigset_t mask;
        ::sigfillset(&mask);
        ::sigdelset(&mask, SIGCHLD);
        ::pthread_sigmask(SIG_SETMASK, &mask, &old_);
    }
    ~StartSignalBlock() { ::pthread_sigmask(SIG_SETMASK, &old_, nullptr); }
    StartSignalBlock(const StartSignalBlock&) = delete;
    StartSignalBlock& operator=(const StartSignalBlock&) = delete;

private:
    sigset_t old_;
};

/// A function for a new child to call, held as a plain pointer and a context: after fork there
/// is nothing to copy or allocate. Returns the child's exit code. The callable must outlive the
/// launch() call (the child runs on a copy of the parent's memory, so a local will do).
class ChildMain {
public:
    ChildMain() noexcept = default;
    template <class F>
        requires(std::is_invocable_r_v<int, F&> && !std::is_same_v<std::remove_cv_t<F>, ChildMain>)
    explicit ChildMain(F& f) noexcept
        : context_(static_cast<void*>(&f)),
          call_([](void* c) noexcept -> int { return (*static_cast<F*>(c))(); }) {}

    explicit operator bool() const noexcept { return call_ != nullptr; }
    int operator()() const noexcept { return call_(context_); }

private:
    void* context_ = nullptr;
    int (*call_)(void*) noexcept = nullptr;
};

/// A fork child's identity and parent, made in the parent before fork (the child must not
/// allocate) and kept there until the child has ended: freeing them right after fork would
/// write heap pages the child still shares.
struct ChildRecord {
    ProcessIdentity identity;
    ParentProcess parent;
};

/// What to start, whatever the start method. It refers to the caller's data, which must stay
/// put during launch() only.
struct ChildSpec {
    std::string_view name;
    /// Its place in the process tree ({1, 2} is Process-1:2).
    std::span<const int> identity;
    std::string_view authkey;
    bool daemon = false;
    /// Killed when its parent dies, even by SIGKILL (the parent-death signal; under forkserver,
    /// the server kills it when the parent's connection closes), without being a daemon: a
    /// ProcessPoolExecutor's worker, which may start children of its own. A daemon always is.
    bool dies_with_parent = false;
    StartMethod method = StartMethod::fork;
    /// fork: what the child runs once it knows who it is; its result is the exit code. It may
    /// use the parent's objects: the child has a copy of them. An exception must not escape it.
    ChildMain main;
    /// forkserver, spawn: the transferable call the child runs (its descriptors go with SCM_RIGHTS).
    const Task* task = nullptr;
    /// fork: descriptors of the parent the child closes first (another worker's socket kept
    /// open in this one would hide that worker's end of file).
    std::span<const int> close_in_child;
    /// fork: a ParentOnlyFd descriptor this child keeps (a fork pool worker's end of its socket),
    /// closed in every other fork child as the rest of the list; -1 for none.
    int parent_only_kept = -1;
    /// Logs Python's "child process calling self.run()" as it starts (false for a helper of
    /// mp's own, the forkserver, which Python does not log either).
    bool logs_start = true;
};

/// A descriptor as an argument of a ChildSpec task (the pool's worker socket and page, the
/// forkserver's control socket): it travels with SCM_RIGHTS, and the child owns what it gets.
struct PassedFd {
    int fd = -1;
};

/// A descriptor whose closing tells another process that this one has gone: a pool's end of a
/// worker's socket (the worker ends at its end of file), the status socket of a forkserver child
/// (the server kills a daemon child or pool worker when it hangs up). A fork child that kept a
/// copy would hide this process's death for as long as it lived: every fork mp makes
/// (fork_blocked) closes, in the child, each one open at that moment. Held by the process that
/// made it: in a fork child a copy is already closed, and is let go of without a close. Made by
/// parent_only_socketpair, listed from the moment it exists.
class ParentOnlyFd {
public:
    ParentOnlyFd() noexcept = default;
    ParentOnlyFd(ParentOnlyFd&& o) noexcept
        : fd_(std::move(o.fd_)), owner_(std::exchange(o.owner_, 0)) {}
    ParentOnlyFd& operator=(ParentOnlyFd&& o) noexcept {
        if (this != &o) {
            reset();
            fd_ = std::move(o.fd_);
            owner_ = std::exchange(o.owner_, 0);
        }
        return *this;
    }
    ~ParentOnlyFd() { reset(); }

    int get() const noexcept { return fd_.get(); }
    explicit operator bool() const noexcept { return static_cast<bool>(fd_); }
    /// Unlists and closes it (in the process that made it; elsewhere only forgets it).
    void reset() noexcept;

private:
    friend std::pair<ParentOnlyFd, ParentOnlyFd> parent_only_socketpair(int type);
    struct Listed {};
    ParentOnlyFd(sys::Fd fd, Listed) noexcept;

    sys::Fd fd_;
    pid_t owner_ = 0;
};

/// sys::make_socketpair(type) with both ends ParentOnlyFd, made holding the list's lock: a fork
/// another thread makes meanwhile (fork_blocked) has no copy of either end, not even for the
/// moment between socketpair and the listing. Throws as make_socketpair, or std::bad_alloc.
std::pair<ParentOnlyFd, ParentOnlyFd> parent_only_socketpair(int type);

/// A started child.
struct Launched {
    pid_t pid = 0;
    /// This process (getpid() once, for the caller too): only it may wait for the child.
    pid_t parent = 0;
    sys::Fd pidfd;
    /// forkserver: the server sends the exit status here, then closes it. Empty when the child is
    /// this process's own (fork, spawn): its pidfd gives the status.
    ParentOnlyFd status;
    /// fork: keep until the child has ended (see ChildRecord).
    std::unique_ptr<ChildRecord> record;
};

/// Starts the child `spec` describes. Throws std::system_error naming the call that failed
/// ("fork", "pidfd_open", ...) or ProcessError (the forkserver could not start it); when it
/// throws, no child of this start is left running.
Launched launch(const ChildSpec& spec);

/// Starts a long-lived helper: `body` (which must not return) runs in a grandchild of this
/// process, and the child in between exits at once, so the helper is reparented and never
/// becomes our zombie. `body` runs in a fork of a possibly threaded process with every signal
/// blocked: async-signal-safe calls only (sys::reset_signals unblocks). Throws std::system_error
/// naming `what` when either fork fails. When SIGCHLD is ignored the middle child is reaped for
/// us; the caller's handshake with the helper then tells whether it runs.
void launch_helper(const char* what, ChildMain body);

/// Starts a spawn child of `spec` as launch_helper starts a helper (reparented, never our
/// zombie). The forkserver starts this way: a fresh program, whatever threads this one runs.
/// Throws as launch() does; a child that cannot exec is reported as std::system_error "execve
/// (spawn)". Neither child copies this process's page tables (spawn_program).
void launch_detached(const char* what, const ChildSpec& spec);

/// A fresh copy of this program started by spawn_program.
struct SpawnedProgram {
    /// 0 when detached: it is nobody's child to wait for.
    pid_t pid = 0;
    sys::Fd pidfd;
};

/// spawn: starts /proc/self/exe afresh as a spawn child (`--mp-spawn-child 3`) whose descriptor 3
/// is `request_fd`, with no other descriptor above stdio, signal handlers back to their defaults
/// (and SIGTERM too when ignored) and none blocked. Without copying this process's page tables:
/// see src/spawn.cpp. `detached`: started as launch_helper starts a helper (reparented, never our
/// zombie). Throws std::system_error naming `what` when no child could be made, or "execve
/// (spawn)" with the child's errno when it could not execute the program.
SpawnedProgram spawn_program(int request_fd, bool detached, const char* what);

/// True once __wrap_main has run in this program (it was linked with -Wl,--wrap=main).
bool main_hooked() noexcept;
/// Throws ProcessError naming the missing link option unless main_hooked().
void check_main_hooked();

/// In a parent about to fork: flushes what the child would flush at its end (or it would be
/// written twice), and notes for the children whether the C++ standard streams keep buffers of
/// their own (by default they forward to C stdio, and a child then flushes only a stdio stream
/// that holds output: a flush takes the stream's lock, a write to a page shared with the parent).
void flush_before_fork() noexcept;

/// In a child on its way out: flushes the standard streams that hold output, by the rule the
/// parent applied before the fork (so the child writes only what it wrote itself).
void flush_standard_streams_at_exit() noexcept;

}  // namespace mp::detail

template <>
struct mp::Codec<mp::detail::PassedFd> {
    static constexpr std::size_t min_encoded_size = 4;
    static void encode(Encoder& e, const detail::PassedFd& p) { e.put(e.attach_fd(p.fd)); }
    static detail::PassedFd decode(Decoder& d) { return {d.take_fd(d.get<std::uint32_t>())}; }
};
