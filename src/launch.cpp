#include "launch.hpp"

#include <pthread.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <csignal>
#include <cstdio>
#include <algorithm>
#include <array>
#include <iostream>
#include <mutex>
#include <new>
#include <stdio_ext.h>
#include <streambuf>

#if defined(__GLIBCXX__)
#include <ext/stdio_sync_filebuf.h>
#endif

#include "process_impl.hpp"
#include "sys/error.hpp"
#include "sys/helper_process.hpp"
#include "sys/pidfd.hpp"

namespace mp::detail {
namespace {

// Whether a C++ standard stream keeps a buffer of its own, decided in the parent before each
// fork so that the child need not look.
std::atomic<bool> g_cxx_streams_buffer{true};

// True unless cout, cerr and clog all just forward to stdio (libstdc++'s default), in which case
// flushing stdout and stderr flushes them too. Not so after std::ios::sync_with_stdio(false) or
// rdbuf() given another buffer.
bool cxx_streams_buffer() {
#if defined(__GLIBCXX__)
    for (std::ostream* os : {&std::cout, &std::cerr, &std::clog})
        if (dynamic_cast<__gnu_cxx::stdio_sync_filebuf<char>*>(os->rdbuf()) == nullptr) return true;
    return false;
#else
    return true;
#endif
}

// As Python flushes sys.stdout and sys.stderr: the standard streams only, and C stdio only when
// it holds something (in a child a flush takes the stream's lock, i.e. writes a page shared
// with the parent). Other files a program writes in a child are its own to close.
void flush_standard_streams(bool cxx) noexcept {
    if (cxx) {
        try {
            std::cout.flush();
            std::cerr.flush();
            std::clog.flush();
        } catch (...) {
            // A stream with exceptions() set that failed to write: as much as could be is out.
        }
    }
    // glibc's FILE: pending output lies between write_base and write_ptr (what __fpending
    // computes, without binding another libc symbol in a child).
    if (stdout->_IO_write_ptr > stdout->_IO_write_base) std::fflush(stdout);
    if (stderr->_IO_write_ptr > stderr->_IO_write_base) std::fflush(stderr);
}

// __fpurge through a pointer set at load time (a GOT entry, bound before main): a call through
// the PLT from a child would bind it lazily there, running ld.so after fork.
void (*const g_fpurge)(FILE*) = &::__fpurge;

// The put area of a C++ stream buffer, reset through streambuf's protected members.
struct PutArea : std::streambuf {
    static void discard(std::streambuf* b) noexcept {
        char* (std::streambuf::*pbase_of)() const = &PutArea::pbase;
        char* (std::streambuf::*pptr_of)() const = &PutArea::pptr;
        char* (std::streambuf::*epptr_of)() const = &PutArea::epptr;
        void (std::streambuf::*set)(char*, char*) = &PutArea::setp;
        if (b != nullptr && (b->*pptr_of)() > (b->*pbase_of)()) (b->*set)((b->*pbase_of)(), (b->*epptr_of)());
    }
};

// In a fork child, before it writes anything of its own: the parent flushed just before fork,
// so what the standard streams hold now was written by another of the parent's threads in
// between. It is the parent's to write; the child would write it a second time at its end.
// No lock and no allocation: __fpurge only moves the stream's pointers (and another thread's
// write cut short by the fork leaves them where a purge puts them anyway).
void discard_inherited_output() noexcept {
    for (FILE* f : {stdout, stderr})
        if (f->_IO_write_ptr > f->_IO_write_base || f->_mode > 0) g_fpurge(f);
    // Buffers of the C++ streams' own, when they are not stdio's (see cxx_streams_buffer).
    if (g_cxx_streams_buffer.load(std::memory_order_relaxed))
        for (std::ostream* os : {&std::cout, &std::cerr, &std::clog}) PutArea::discard(os->rdbuf());
}

// The ParentOnlyFd descriptors open in this process. Made at the first, never destroyed (a
// fork child may look at it as the program exits).
struct ParentOnlyList {
    std::mutex mu;
    std::vector<int> fds;
};
std::atomic<ParentOnlyList*> g_parent_only{nullptr};

ParentOnlyList& parent_only_list() {
    static ParentOnlyList* list = (g_parent_only = new ParentOnlyList, g_parent_only.load());
    return *list;
}

// Takes `fd` off `list`; the caller holds its lock.
void drop_listed(ParentOnlyList& list, int fd) noexcept {
    auto& fds = list.fds;
    if (auto it = std::find(fds.begin(), fds.end(), fd); it != fds.end()) {
        *it = fds.back();
        fds.pop_back();
    }
}

// The one fork of a parent: `child` runs in the child with every signal but SIGCHLD blocked
// (StartSignalBlock) and never returns; it starts with nothing of the parent's pending on the
// standard streams and without the parent's ParentOnlyFd descriptors but those in `kept`.
// Returns the child's pid; throws std::system_error naming `what`.
pid_t fork_blocked(const char* what, ChildMain child, std::array<int, 2> kept = {-1, -1}) {
    flush_before_fork();
    // Held across the fork: no descriptor is listed or unlisted half-way, and none made by
    // another thread meanwhile escapes the child's closing.
    ParentOnlyList* const listed = g_parent_only.load();
    std::unique_lock<std::mutex> hold;
    if (listed != nullptr) hold = std::unique_lock(listed->mu);
    // A SIGTERM sent before the child has restored SIGTERM's default action then stays pending
    // instead of being lost.
    pid_t pid;
    int err;
    {
        const StartSignalBlock blocked;
        pid = ::fork();
        if (pid == 0) {
            discard_inherited_output();
            if (listed != nullptr) {
                // Raw close: nothing here may be bound lazily or take a lock. The list and its
                // lock are this child's from here on: emptied, and a fresh lock (the parent's
                // copy is held), without freeing what the parent's copy holds.
                for (int fd : listed->fds)
                    if (fd != kept[0] && fd != kept[1]) ::syscall(SYS_close, fd);
                new (&listed->fds) std::vector<int>;
                new (&listed->mu) std::mutex;
                (void)hold.release();
            }
            sys::exit_child(child());
        }
        err = errno;
    }
    if (pid < 0) sys::throw_system_error(err, what);
    return pid;
}

}  // namespace

ParentOnlyFd::ParentOnlyFd(sys::Fd fd, Listed) noexcept : fd_(std::move(fd)), owner_(sys::self_pid()) {}

std::pair<ParentOnlyFd, ParentOnlyFd> parent_only_socketpair(int type) {
    ParentOnlyList& list = parent_only_list();
    std::lock_guard lock(list.mu);
    list.fds.reserve(list.fds.size() + 2);  // before anything is open: the push_backs cannot throw
    auto [a, b] = sys::make_socketpair(type);
    list.fds.push_back(a.get());
    list.fds.push_back(b.get());
    return {ParentOnlyFd(std::move(a), ParentOnlyFd::Listed{}), ParentOnlyFd(std::move(b), ParentOnlyFd::Listed{})};
}

void ParentOnlyFd::reset() noexcept {
    if (!fd_) return;
    if (std::exchange(owner_, 0) != sys::self_pid()) {
        // A copy inherited by a fork child: closed at the fork, its number maybe reused since.
        (void)fd_.release();
        return;
    }
    // Closed holding the lock too: a fork meanwhile would keep an unlisted, still open copy.
    ParentOnlyList& list = parent_only_list();
    std::lock_guard lock(list.mu);
    drop_listed(list, fd_.get());
    fd_.reset();
}

namespace {

void kill_and_reap(pid_t pid) noexcept {
    ::kill(pid, SIGKILL);
    siginfo_t info;
    while (::waitid(P_PID, static_cast<id_t>(pid), &info, WEXITED) < 0 && errno == EINTR) {
    }
}

// Whether a child may be reaped before its pidfd is open: the kernel reaps the children itself
// (SIGCHLD ignored, or SA_NOCLDWAIT: a program that wants no zombies), or the program has a
// SIGCHLD handler, which may well call waitpid(-1) (a reaper, as many servers have). Asked at
// each fork start: the program may change it at any time. (A waitpid(-1) in another thread with
// no handler cannot be seen: the child's pidfd may then be missing, see pidfd_or_kill.)
bool children_may_be_reaped_early() noexcept {
    struct sigaction action {};
    if (::sigaction(SIGCHLD, nullptr, &action) != 0) return false;
    return (action.sa_flags & (SA_NOCLDWAIT | SA_SIGINFO)) != 0 || action.sa_handler != SIG_DFL;
}

// Without a pidfd the child cannot be waited for or signalled safely: it is ended at once. One
// already reaped by someone else (ESRCH) is not killed: its pid may be another process's now.
sys::Fd pidfd_or_kill(pid_t pid) {
    try {
        return sys::pidfd_open(pid);
    } catch (const std::system_error& e) {
        if (e.code().value() == ESRCH)
            throw ProcessError("mp: the child (pid " + std::to_string(pid) +
                               ") was reaped by a waitpid() elsewhere in the program before mp "
                               "could open its pidfd: its end is not known");
        kill_and_reap(pid);
        throw;
    }
}

Launched launch_fork(const ChildSpec& spec) {
    if (!spec.main) throw ProcessError("mp: a fork child needs a function to run");
    // Everything the child needs is made here, in the parent, and everything the parent
    // records is written before fork too: each page either side writes while both live is a
    // copy-on-write fault, the bulk of what a start costs beyond the bare fork.
    // Through syscall(), which binds it here if this is the program's first use: become_child
    // makes only raw syscall() calls, which must not be bound lazily in the child.
    const auto self = static_cast<pid_t>(::syscall(SYS_getpid));
    Launched out;
    out.parent = self;
    out.record = std::make_unique<ChildRecord>(
        ChildRecord{ProcessIdentity{std::string(spec.name), 0, spec.daemon, std::string(spec.authkey),
                                    std::vector<int>(spec.identity.begin(), spec.identity.end())},
                    ParentProcess{current_process().name, self}});
    ChildSetup setup{&out.record->identity, &out.record->parent, spec.daemon || spec.dies_with_parent, self};
    setup.checked_death_signal = checked_death_signal(spec.daemon, spec.dies_with_parent);
    if (setup.checked_death_signal != 0) {
        struct sigaction bind {};  // binds sigaction() here: the child calls it (become_child)
        ::sigaction(setup.checked_death_signal, nullptr, &bind);
    }
    // When the kernel or a SIGCHLD handler may reap our children, a child that ended before its
    // pidfd below is open would be gone, and its pid with it (pidfd_open: ESRCH), and with the
    // pidfd open when it ends the kernel keeps its status for us (sys::pidfd_exit_status): such
    // a child waits for our word first. Listed, so that no other fork child keeps a copy: the
    // word's end closing at our death releases it too.
    std::pair<ParentOnlyFd, ParentOnlyFd> hold;
    if (children_may_be_reaped_early()) hold = parent_only_socketpair(SOCK_STREAM);
    const int wait_word = hold.second.get();
    auto child = [&]() noexcept -> int {
        if (wait_word >= 0) {
            // Raw syscall(): see become_child. Every signal is blocked: no EINTR.
            char word;
            (void)::syscall(SYS_read, wait_word, &word, 1);
            ::syscall(SYS_close, wait_word);
        }
        become_child(setup);
        // Raw syscall(): see become_child.
        for (int fd : spec.close_in_child)
            if (fd >= 0) ::syscall(SYS_close, fd);
        guard_child_exit();
        if (spec.logs_start) log_child_start();
        finish_child(spec.main());
    };
    out.pid = fork_blocked("fork", ChildMain(child), {spec.parent_only_kept, wait_word});
    out.pidfd = pidfd_or_kill(out.pid);
    if (hold.first) {
        const char word = 1;
        (void)::send(hold.first.get(), &word, 1, MSG_NOSIGNAL);
    }
    return out;
}

Launched launch_forkserver(const ChildSpec& spec) {
    if (spec.task == nullptr) throw ProcessError("mp: a forkserver child needs a transferable task");
    auto started = forkserver::start_child(make_request(spec));
    Launched out;
    out.pid = started.pid;
    out.parent = sys::self_pid();
    out.pidfd = std::move(started.pidfd);
    out.status = std::move(started.status);
    return out;
}

// A spawn start: a child of ours, or a detached helper (pid 0: it is nobody's child to wait for).
Launched launch_spawn(const ChildSpec& spec, bool detached, const char* what) {
    if (spec.task == nullptr) throw ProcessError("mp: a spawn child needs a transferable task");
    check_main_hooked();
    const ChildRequest req = make_request(spec);
    // Not listed (parent_only_socketpair): the forkserver's client starts its server from here
    // holding its own lock, and the list's lock must never be taken under it (fork_blocked holds
    // the list's across a fork whose child may start a forkserver: TSan's lock-order check).
    auto [request, request_child] = sys::make_socketpair(SOCK_STREAM);
    // Nothing of ours is flushed by a fresh program, but what we printed before the start comes
    // before what it prints, as with fork (and Python, which flushes before any start).
    flush_before_fork();
    Launched out;
    out.parent = sys::self_pid();
    SpawnedProgram child = spawn_program(request_child.get(), detached, what);
    request_child.reset();
    out.pid = child.pid;
    out.pidfd = std::move(child.pidfd);
    try {
        send_request(request.get(), req);
    } catch (const std::system_error&) {
        // Our child died before reading its request (killed, perhaps): its pidfd says how.
        // A helper's caller has no pidfd: it must learn now.
        if (detached) throw;
    }
    return out;
}

}  // namespace

Launched launch(const ChildSpec& spec) {
    switch (spec.method) {
        case StartMethod::fork: return launch_fork(spec);
        case StartMethod::forkserver: return launch_forkserver(spec);
        case StartMethod::spawn: return launch_spawn(spec, false, "clone (spawn)");
    }
    throw ProcessError("mp: unknown start method");
}

void launch_helper(const char* what, ChildMain body) {
    auto middle = [&]() noexcept -> int {
        const pid_t helper = ::fork();
        if (helper == 0) sys::exit_child(body());
        return helper < 0 ? 1 : 0;
    };
    const pid_t mid = fork_blocked(what, ChildMain(middle));
    int status = 0;
    pid_t r;
    while ((r = ::waitpid(mid, &status, 0)) < 0 && errno == EINTR) {
    }
    if (r == mid && (!WIFEXITED(status) || WEXITSTATUS(status) != 0))
        sys::throw_system_error(EAGAIN, what);
}

void launch_detached(const char* what, const ChildSpec& spec) { (void)launch_spawn(spec, true, what); }

void flush_before_fork() noexcept {
    const bool cxx = cxx_streams_buffer();
    // Stored only when it changes: after the last fork this page is the child's too.
    if (g_cxx_streams_buffer.load(std::memory_order_relaxed) != cxx)
        g_cxx_streams_buffer.store(cxx, std::memory_order_relaxed);
    flush_standard_streams(cxx);
}

void flush_standard_streams_at_exit() noexcept {
    flush_standard_streams(g_cxx_streams_buffer.load(std::memory_order_relaxed));
}

}  // namespace mp::detail
