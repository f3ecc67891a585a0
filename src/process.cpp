// mp::Process and the process-wide state of include/mp/process.hpp (current_process, the start
// method, active children); starting a child is launch.cpp's.
// One file because Process's lifetime (start, join, the destructor policy, close) and the
// registry of this process's children change together.

#include "mp/process.hpp"

#include <cxxabi.h>
#include <fcntl.h>
#include <poll.h>
#include <pthread.h>
#include <sched.h>
#include <sys/prctl.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <cmath>
#include <csignal>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <new>
#include <sstream>
#include <stdexcept>
#include <typeinfo>

#include "describe.hpp"
#include "launch.hpp"
#include "mp/util.hpp"
#include "process_impl.hpp"
#include "sys/crypto.hpp"
#include "sys/error.hpp"
#include "sys/helper_process.hpp"
#include "sys/pidfd.hpp"
#include "sys/raw_syscall.hpp"

namespace mp {
namespace {

using detail::ProcessState;
using Clock = std::chrono::steady_clock;

std::string random_authkey() { return sys::crypto::random_string(32); }

// Per-process globals. A forked child resets them in become_child without allocating or locking:
// another thread of the parent may have been inside any of them at the moment of fork.
struct Globals {
    ProcessIdentity main_identity;
    ProcessIdentity* current = nullptr;
    ParentProcess* parent = nullptr;
    int parent_pidfd = -1;
    std::atomic<int> counter{0};

    std::mutex registry_mu;
    std::vector<std::shared_ptr<ProcessState>> registry;  // started, not yet reaped
    pid_t registry_owner = 0;

    std::mutex method_mu;
    StartMethod method = StartMethod::fork;
    bool method_fixed = false;

    Globals() {
        main_identity.pid = sys::self_pid();
        main_identity.authkey = random_authkey();
        current = &main_identity;
        registry_owner = sys::self_pid();
    }
};

Globals& globals() {
    static Globals* g = new Globals;  // never destroyed: the exit handler runs after statics die
    return *g;
}

void register_child(const std::shared_ptr<ProcessState>& s) {
    s->listed = true;
    detail::register_exit_function();
    Globals& g = globals();
    std::lock_guard lock(g.registry_mu);
    g.registry.push_back(s);
}

void unregister_child(const ProcessState* s) {
    Globals& g = globals();
    std::lock_guard lock(g.registry_mu);
    if (g.registry_owner != sys::self_pid()) return;
    std::erase_if(g.registry, [&](const auto& p) { return p.get() == s; });
}

std::vector<std::shared_ptr<ProcessState>> registry_snapshot() {
    Globals& g = globals();
    std::lock_guard lock(g.registry_mu);
    if (g.registry_owner != sys::self_pid()) return {};
    return g.registry;
}

// Logs "<what><name>" at info, building the line only when it goes somewhere.
void log_info_named(const char* what, const std::string& name) noexcept {
    Logger& log = get_logger();
    if (!log.enabled_for(LogLevel::info)) return;
    try {
        log.info(what + name);
    } catch (...) {
        // Out of memory: the line is lost, not the exit.
    }
}

// Terminates the daemonic children, then joins every child still running.
void end_children() noexcept {
    try {
        auto children = registry_snapshot();
        // One child's failure (its status collected elsewhere) must not spare the others.
        for (auto& c : children) {
            try {
                if (c->daemon && !c->ended()) {
                    log_info_named("calling terminate() for daemon ", c->name);
                    c->signal(SIGTERM);
                }
            } catch (...) {
            }
        }
        const bool logging = get_logger().enabled_for(LogLevel::info);
        for (auto& c : children) {
            try {
                // Python logs the join of a child still running (active_children() reaps the
                // rest).
                if (c->ended()) continue;
                if (logging) log_info_named("calling join() for process ", c->name);
                c->wait(std::nullopt);
            } catch (...) {
            }
        }
    } catch (...) {
        // Exiting anyway: nothing sensible to do with an error here.
    }
}

std::string identity_name(const std::vector<int>& identity) {
    std::string s = "Process-";
    for (std::size_t i = 0; i < identity.size(); ++i) {
        if (i != 0) s += ':';
        s += std::to_string(identity[i]);
    }
    return s;
}

StartMethod fix_start_method() {
    Globals& g = globals();
    std::lock_guard lock(g.method_mu);
    g.method_fixed = true;
    return g.method;
}

using detail::demangle;

}  // namespace

// ---------------------------------------------------------------- ProcessState

namespace detail {

void ProcessState::check_owner(const char* what) const {
    if (owner != sys::self_pid())
        throw ProcessError(std::string("can only ") + what + " a child process");
}

namespace {
ProcessError status_lost_error(pid_t pid) {
    return ProcessError("the exit status of pid " + std::to_string(pid) +
                        " was collected by someone else (SIGCHLD ignored, or waitpid(-1) "
                        "elsewhere in the program)");
}
}  // namespace

bool ProcessState::reap_locked() {
    if (exitcode) return true;
    if (status_lost) throw status_lost_error(pid);
    // Registered just before fork, the state has no pidfd for a moment: another thread reaping
    // the registry then simply finds it still running.
    if (!pidfd) return false;
    // Descriptors are never closed here: another thread may be blocked in poll() on them, and
    // closing an fd does not wake its poller. They close with close() or the state itself.
    if (method == StartMethod::forkserver && !status_gone) {
        std::optional<int> code;
        if (!forkserver::try_read_status(status.get(), code)) return false;
        if (code) {
            exitcode = *code;
            return true;
        }
        // The server went away without a status: fall back to the pidfd, which still tells
        // whether the child has ended, though not how.
        status_gone = true;
    }
    if (method == StartMethod::forkserver) {
        if (!sys::wait_fd(pidfd.get(), POLLIN, std::chrono::nanoseconds::zero())) return false;
        exitcode = 255;  // as Python's forkserver when the status cannot be read
        return true;
    }
    try {
        exitcode = sys::pidfd_wait(pidfd.get(), true);
    } catch (const std::system_error& e) {
        if (e.code().value() != ECHILD) throw;
        // ECHILD for our own child: it has ended and been reaped by someone else (a running
        // child, even with SIGCHLD ignored, is still found by a WNOHANG wait), on a kernel that
        // kept no status for its pidfd (pidfd_wait asks; before Linux 6.15).
        status_lost = true;
        throw status_lost_error(pid);
    }
    return exitcode.has_value();
}

bool ProcessState::wait(detail::Timeout timeout) {
    try {
        return wait_impl(timeout);
    } catch (const ProcessError&) {
        // The status is lost: the child has ended, so it must not stay listed, where every
        // start() and active_children() would try to reap it again (and its pidfd stay open).
        bool unlist = false;
        {
            std::lock_guard lock(mu);
            if (status_lost) unlist = std::exchange(listed, false);
        }
        if (unlist) unregister_child(this);
        throw;
    }
}

bool ProcessState::ended() {
    try {
        return wait(std::chrono::nanoseconds::zero());
    } catch (const ProcessError&) {
        std::lock_guard lock(mu);
        if (!status_lost) throw;
        return true;
    }
}

bool ProcessState::wait_impl(detail::Timeout timeout) {
    const detail::Deadline deadline = detail::deadline_after(timeout);
    bool unlist = false;  // only the call that sees the end first leaves the registry
    for (;;) {
        {
            std::lock_guard lock(mu);
            if (reap_locked()) {
                unlist = std::exchange(listed, false);
                break;
            }
        }
        const detail::Timeout left = detail::remaining(deadline);
        // Under forkserver the status message arrives just after the pidfd turns readable,
        // so wait on the status socket while the server is there. Whoever reaps first, every
        // waiter wakes: the server closes the socket after the status, and a pidfd stays
        // readable once its process has ended.
        int fd;
        {
            std::lock_guard lock(mu);
            fd = (method == StartMethod::forkserver && !status_gone) ? status.get() : pidfd.get();
        }
        if (!sys::wait_fd(fd, POLLIN, left)) {
            std::lock_guard lock(mu);
            if (!reap_locked()) return false;
            unlist = std::exchange(listed, false);
            break;
        }
    }
    if (unlist) unregister_child(this);
    return true;
}

void ProcessState::signal(int sig) {
    std::lock_guard lock(mu);
    if (exitcode) return;
    sys::pidfd_send_signal(pidfd.get(), sig);
}

void report_child_exception() noexcept {
    try {
        const std::string& name = globals().current->name;
        std::fprintf(stderr, "Process %s:\n", name.c_str());
        try {
            throw;
        } catch (const std::exception& e) {
            std::fprintf(stderr, "Traceback: %s: %s\n", demangle(typeid(e).name()).c_str(), e.what());
        } catch (...) {
            std::type_info* t = abi::__cxa_current_exception_type();
            std::fprintf(stderr, "Traceback: exception of type %s\n",
                         t != nullptr ? demangle(t->name()).c_str() : "unknown");
        }
    } catch (...) {
        std::fputs("Process: an exception escaped the target\n", stderr);
    }
    std::fflush(stderr);
}

void exit_function() noexcept {
    Logger& log = get_logger();
    log.info("process shutting down");
    log.debug("running all \"atexit\" finalizers with priority >= 0");
    util::run_finalizers(0);
    end_children();
    log.debug("running the remaining \"atexit\" finalizers");
    util::run_finalizers();
}

void register_exit_function() noexcept {
    static std::once_flag once;  // a fork child has its parent's registration, and this flag
    std::call_once(once, [] { std::atexit(exit_function); });
}

void log_child_start() noexcept { get_logger().info("child process calling self.run()"); }

void finish_child(int code) noexcept {
    // A child is a parent too: its finalizers run, its daemons go, its other children are
    // waited for (Python's _bootstrap runs util._exit_function the same way).
    exit_function();
    Logger& log = get_logger();
    if (log.enabled_for(LogLevel::info)) {
        char line[48];
        std::snprintf(line, sizeof line, "process exiting with exitcode %d", code);
        log.info(line);
    }
    flush_standard_streams_at_exit();
    sys::exit_child(code);
}

namespace {
extern "C" void exit_in_child(int status, void*) { finish_child(status); }
// on_exit's address, taken when the program is loaded (a data relocation is never lazy): called
// through the PLT for the first time in a child, it was bound there by ld.so, at about a dozen
// page faults per fork child.
int (*volatile const g_on_exit)(void (*)(int, void*), void*) = ::on_exit;
}  // namespace

// on_exit, not atexit: the handler learns exit's status. Registered last, it runs first.
void guard_child_exit() noexcept { (void)g_on_exit(&exit_in_child, nullptr); }

// Only raw syscall() from here (see sys/raw_syscall.hpp).
using sys::KernelSigaction;
using sys::sys_call;

void reset_child_signals() noexcept {
    // SIGTERM first, then unblock: a SIGTERM already pending is delivered now.
    KernelSigaction term{};
    if (sys_call(SYS_rt_sigaction, SIGTERM, nullptr, &term, sizeof(unsigned long)) == 0 &&
        term.handler == SIG_IGN) {
        term.handler = SIG_DFL;
        sys_call(SYS_rt_sigaction, SIGTERM, &term, nullptr, sizeof(unsigned long));
    }
    const unsigned long none = 0;
    sys_call(SYS_rt_sigprocmask, SIG_SETMASK, &none, nullptr, sizeof none);
}

void stdin_from_null() noexcept {
    // The path is made on the stack (immediate stores): read from the program's read-only data
    // it costs a fork child a page fault (fork copies no page table entry of a file mapping).
    char path[] = "/dev/null";
    const int null = static_cast<int>(sys_call(SYS_openat, AT_FDCWD, path, O_RDONLY | O_CLOEXEC));
    if (null > 0) {
        sys_call(SYS_dup3, null, 0, 0);
        sys_call(SYS_close, null);
    }
}

namespace {

// The checked parent-death signal's handler (ChildSetup::checked_death_signal): it comes when the
// thread that forked this child ends. A thread's children pass to another thread of its process
// while one lives, and only then out of it, and the signal comes after that move: so the
// parent is gone exactly when getppid() no longer names it.
volatile std::sig_atomic_t g_death_checked_parent = 0;

extern "C" void on_parent_thread_end(int) {
    const int saved = errno;
    if (sys_call(SYS_getppid) != g_death_checked_parent) sys_call(SYS_kill, sys_call(SYS_getpid), SIGKILL);
    errno = saved;
}

}  // namespace

int checked_death_signal(bool daemon, bool pool_worker) noexcept {
    return daemon && !pool_worker && !sys::on_main_thread() ? SIGRTMAX : 0;
}

void become_child(const ChildSetup& setup) noexcept {
    Globals& g = globals();
    const auto self = static_cast<pid_t>(sys_call(SYS_getpid));
    sys::set_self_pid(self);
    g.current = setup.identity;
    g.current->pid = self;
    g.parent = setup.parent;
    g.parent_pidfd = static_cast<int>(sys_call(SYS_pidfd_open, setup.parent_pid, 0));
    // The first descriptor this child opens takes the lowest free number: one of 0-2 only when
    // the parent has a standard stream closed. Then the pidfd moves up and the stream gets
    // /dev/null, so that nothing the child opens is taken for it (no system call otherwise).
    if (!setup.from_server && g.parent_pidfd >= 0 && g.parent_pidfd <= 2) {
        const int low = g.parent_pidfd;
        g.parent_pidfd = static_cast<int>(sys_call(SYS_fcntl, low, F_DUPFD_CLOEXEC, 3));
        sys_call(SYS_close, low);
        sys::standard_fds_open(false);
    }
    g.counter.store(0);
    // Another thread may have held these at the moment of fork: make fresh ones in place and let
    // the parent's copies leak rather than run destructors over a half-changed state.
    new (&g.registry_mu) std::mutex;
    new (&g.registry) std::vector<std::shared_ptr<ProcessState>>;
    g.registry_owner = self;
    new (&g.method_mu) std::mutex;
    forkserver::after_fork_in_child();

    if (!setup.from_server) {
        reset_child_signals();
        stdin_from_null();
    }
    if (setup.dies_with_parent) {
        int signal = SIGKILL;
        if (setup.checked_death_signal != 0) {
            // sigaction() is bound by now: the parent looked this signal up before the fork.
            g_death_checked_parent = setup.parent_pid;
            struct sigaction sa {};
            sa.sa_handler = on_parent_thread_end;
            sa.sa_flags = SA_RESTART;
            if (::sigaction(setup.checked_death_signal, &sa, nullptr) == 0) signal = setup.checked_death_signal;
        }
        sys_call(SYS_prctl, PR_SET_PDEATHSIG, signal, 0, 0, 0);
        // The parent may have died before the line above: then no signal will come.
        if (sys_call(SYS_getppid) != setup.parent_pid) sys_call(SYS_kill, self, SIGKILL);
    }
}

}  // namespace detail

// ---------------------------------------------------------------- Process

Process::Process() : Process(ProcessOptions{}) {}

Process::Process(ProcessOptions options) : state_(std::make_shared<ProcessState>()) {
    ProcessIdentity& me = current_process();
    state_->identity = me.identity;
    state_->identity.push_back(++globals().counter);
    state_->name = options.name.empty() ? identity_name(state_->identity) : std::move(options.name);
    state_->daemon = options.daemon.value_or(me.daemon);
    state_->method = options.start_method ? *options.start_method : fix_start_method();
    state_->authkey = me.authkey;
}

Process::Process(Process&& other) noexcept
    : state_(std::move(other.state_)),
      target_(std::move(other.target_)),
      task_(std::exchange(other.task_, std::nullopt)),
      moved_from_type_(other.moved_from_type_ != nullptr ? other.moved_from_type_ : &typeid(other)) {}

Process& Process::operator=(Process&& other) {
    if (this == &other) return *this;
    if (state_) {
        // The rule of close(): this Process's child may not be let go while it runs. wait()
        // reaps a child that has ended, so nothing is left for the registry to hold.
        auto& s = *state_;
        if (s.stage == ProcessState::Stage::started && s.owner == sys::self_pid() &&
            !s.wait(std::chrono::nanoseconds::zero()))
            throw ProcessError("cannot assign over a process whose child is still running; join "
                               "or terminate it first");
    }
    state_ = std::move(other.state_);
    target_ = std::move(other.target_);
    task_ = std::exchange(other.task_, std::nullopt);
    moved_from_type_ = other.moved_from_type_ != nullptr ? other.moved_from_type_ : &typeid(other);
    return *this;
}

detail::ProcessState& Process::state(const char* what) const {
    if (!state_)
        throw ProcessError(std::string(what) +
                           "() called on a moved-from mp::Process (the Process it was moved to "
                           "owns the child, if any)");
    return *state_;
}

void Process::check_startable() const {
    auto& s = state("start");
    if (s.stage == ProcessState::Stage::created && moved_from_type_ != nullptr &&
        *moved_from_type_ != typeid(*this))
        throw ProcessError("cannot start a " + demangle(typeid(*this).name()) +
                           " that was moved from a " + demangle(moved_from_type_->name()) +
                           ": the move sliced off its run()");
}

Process::~Process() {
    if (!state_) return;  // moved from: the child, if any, belongs to another Process
    try {
        auto& s = *state_;
        if (s.stage != ProcessState::Stage::started || s.owner != sys::self_pid()) return;
        if (s.daemon && !s.wait(std::chrono::nanoseconds::zero())) s.signal(SIGTERM);
        s.wait(std::nullopt);
    } catch (...) {
        // A destructor does not throw; the child has been signalled or waited for as far as the
        // OS allowed.
    }
}

namespace {
void run_nothing() {}
}  // namespace

void Process::set_target(std::optional<detail::Task> task, std::function<void()> fn) {
    task_ = std::move(task);
    target_ = std::move(fn);
}

void Process::run() {
    if (target_) target_();
}

void Process::start() {
    check_startable();
    auto& s = *state_;
    if (s.stage == ProcessState::Stage::closed) throw ProcessError("process object is closed");
    if (s.stage == ProcessState::Stage::started) throw ProcessError("cannot start a process twice");
    if (current_process().daemon)
        throw ProcessError("daemonic processes are not allowed to have children");

    // Reap children that have ended, as Python's start() does, so zombies do not pile up.
    for (auto& c : registry_snapshot()) (void)c->ended();

    // A plain Process given no target runs nothing, as Python's does, under every method: a
    // task that does nothing stands in for the target. Only a subclass's run() cannot travel.
    std::optional<detail::Task> nothing;
    if (s.method != StartMethod::fork && !task_ && !target_ && typeid(*this) == typeid(Process))
        nothing = detail::make_task(run_nothing);
    const detail::Task* task = task_ ? &*task_ : nothing ? &*nothing : nullptr;
    if (s.method != StartMethod::fork && task == nullptr)
        throw ProcessError(
            "the " + to_string(s.method) +
            " start method needs a transferable target (a function, a function "
            "pointer, a captureless lambda or an empty function object) whose arguments have "
            "an mp::Codec; a Process subclass or a capturing lambda runs only under fork");

    auto child = [this]() noexcept { return detail::run_guarded([this] { run(); }); };
    detail::ChildSpec spec;
    spec.name = s.name;
    spec.identity = s.identity;
    spec.authkey = s.authkey;
    spec.daemon = s.daemon;
    spec.method = s.method;
    spec.main = detail::ChildMain(child);
    spec.task = task;

    // A fork child is listed before fork, so the registry is not written while the child shares
    // its pages (see launch_fork); until it has a pidfd it counts as running.
    const bool list_first = s.method == StartMethod::fork;
    s.stage = ProcessState::Stage::started;
    if (list_first) register_child(state_);
    detail::Launched started;
    try {
        started = detail::launch(spec);
    } catch (...) {
        if (list_first) unregister_child(&s);
        s.stage = ProcessState::Stage::created;
        throw;
    }
    {
        std::lock_guard lock(s.mu);
        s.pid = started.pid;
        s.owner = started.parent;
        s.pidfd = std::move(started.pidfd);
        s.status = std::move(started.status);
        s.child_record = std::move(started.record);
    }
    if (!list_first) register_child(state_);
}

namespace {
void check_open(const ProcessState& s) {
    if (s.stage == ProcessState::Stage::closed) throw ProcessError("process object is closed");
}
void check_started(const ProcessState& s, const char* what) {
    check_open(s);
    if (s.stage != ProcessState::Stage::started)
        throw ProcessError(std::string("can only ") + what + " a started process");
}
}  // namespace

void Process::join() {
    auto& s = state("join");
    check_started(s, "join");
    s.check_owner("join");
    s.wait(std::nullopt);
}

bool Process::join(detail::Timeout timeout) {
    auto& s = state("join");
    check_started(s, "join");
    s.check_owner("join");
    return s.wait(timeout);
}

bool Process::is_alive() {
    auto& s = state("is_alive");
    check_open(s);
    if (s.stage != ProcessState::Stage::started) return false;
    s.check_owner("test");
    // ended(): a child whose status someone else collected has ended all the same.
    return !s.ended();
}

void Process::terminate() {
    auto& s = state("terminate");
    check_started(s, "terminate");
    s.signal(SIGTERM);
}

void Process::kill() {
    auto& s = state("kill");
    check_started(s, "kill");
    s.signal(SIGKILL);
}

void Process::interrupt() {
    auto& s = state("interrupt");
    check_started(s, "interrupt");
    s.signal(SIGINT);
}

void Process::close() {
    auto& s = state("close");
    if (s.stage == ProcessState::Stage::closed) return;
    if (s.stage == ProcessState::Stage::started) {
        if (s.owner == sys::self_pid() && !s.ended())
            throw ProcessError("cannot close a process while it is still running; join or "
                               "terminate it first");
        std::lock_guard lock(s.mu);
        s.pidfd.reset();
        s.status.reset();
    }
    unregister_child(&s);
    s.stage = ProcessState::Stage::closed;
}

pid_t Process::pid() const {
    auto& s = state("pid");
    check_open(s);
    return s.pid;
}

const std::string& Process::name() const { return state("name").name; }

void Process::name(std::string n) { state("name").name = std::move(n); }

std::optional<int> Process::exitcode() {
    auto& s = state("exitcode");
    check_open(s);
    if (s.stage != ProcessState::Stage::started) return std::nullopt;
    // ended(), not wait(): a lost status leaves it std::nullopt (Python's None), no exception.
    if (s.owner == sys::self_pid()) (void)s.ended();
    std::lock_guard lock(s.mu);
    return s.exitcode;
}

bool Process::daemon() const {
    auto& s = state("daemon");
    check_open(s);
    return s.daemon;
}

void Process::daemon(bool d) {
    auto& s = state("daemon");
    check_open(s);
    if (s.stage != ProcessState::Stage::created)
        throw ProcessError("process has already started: daemon can only be set before start()");
    s.daemon = d;
}

int Process::sentinel() const {
    auto& s = state("sentinel");
    check_started(s, "give the sentinel of");
    return s.pidfd.get();
}

const std::string& Process::authkey() const {
    auto& s = state("authkey");
    check_open(s);
    return s.authkey;
}

void Process::authkey(std::string key) {
    auto& s = state("authkey");
    check_open(s);
    s.authkey = std::move(key);
}

StartMethod Process::start_method() const {
    auto& s = state("start_method");
    check_open(s);
    return s.method;
}

// ---------------------------------------------------------------- ChildProcess

pid_t ChildProcess::pid() const { return state_->pid; }
const std::string& ChildProcess::name() const { return state_->name; }
bool ChildProcess::daemon() const { return state_->daemon; }
bool ChildProcess::is_alive() const { return !state_->ended(); }
std::optional<int> ChildProcess::exitcode() const {
    (void)state_->ended();
    std::lock_guard lock(state_->mu);
    return state_->exitcode;
}
void ChildProcess::join() const { state_->wait(std::nullopt); }
bool ChildProcess::join(detail::Timeout timeout) const {
    return state_->wait(timeout);
}
void ChildProcess::terminate() const { state_->signal(SIGTERM); }
void ChildProcess::interrupt() const { state_->signal(SIGINT); }
void ChildProcess::kill() const { state_->signal(SIGKILL); }
int ChildProcess::sentinel() const { return state_->pidfd.get(); }

// ---------------------------------------------------------------- free functions

ProcessIdentity& current_process() { return *globals().current; }

bool ParentProcess::is_alive() const {
    Globals& g = globals();
    if (g.parent != nullptr && g.parent->pid == pid && g.parent_pidfd >= 0)
        return !sys::wait_fd(g.parent_pidfd, POLLIN, std::chrono::nanoseconds::zero());
    return pid > 0 && (::kill(pid, 0) == 0 || errno == EPERM);
}

std::optional<ParentProcess> parent_process() {
    Globals& g = globals();
    if (g.parent == nullptr) return std::nullopt;
    return *g.parent;
}

std::vector<ChildProcess> active_children() {
    std::vector<ChildProcess> alive;
    for (auto& s : registry_snapshot())
        if (!s->ended()) alive.push_back(ChildProcess(s));
    return alive;
}

namespace {

// The CPU quota of this process's cgroups, in CPUs, or std::nullopt without one. Finds the
// cgroup v2 mount and any v1 hierarchy holding the cpu controller in /proc/self/mountinfo, this
// process's place in each from /proc/self/cgroup, and walks up to the mount's root, since a
// parent's limit binds its children too. The smallest quota wins.
std::optional<double> cgroup_cpu_limit() {
    struct Mount {
        std::string root, point;
    };
    std::optional<Mount> v2, v1cpu;
    {
        std::ifstream mi("/proc/self/mountinfo");
        std::string line;
        while (std::getline(mi, line)) {
            // id parent major:minor root mountpoint options [optional...] - fstype source superopts
            std::istringstream in(line);
            std::string id, parent, dev, root, point, opts, field;
            in >> id >> parent >> dev >> root >> point >> opts;
            while (in >> field && field != "-") {
            }
            std::string fstype, source, super;
            in >> fstype >> source >> super;
            if (fstype == "cgroup2" && !v2) v2 = Mount{root, point};
            if (fstype == "cgroup" && !v1cpu) {
                std::istringstream so(super);
                std::string o;
                while (std::getline(so, o, ','))
                    if (o == "cpu") v1cpu = Mount{root, point};
            }
        }
    }
    std::optional<double> limit;
    auto consider = [&](double quota, double period) {
        if (quota > 0 && period > 0 && (!limit || quota / period < *limit)) limit = quota / period;
    };
    // Visits the directory of `path` (relative to the hierarchy's root) and each of its parents
    // that the mount shows.
    auto walk = [](const Mount& m, std::string path, auto&& visit) {
        if (m.root != "/" && path.rfind(m.root, 0) == 0) path = path.substr(m.root.size());
        for (;;) {
            visit(m.point + (path == "/" ? "" : path));
            if (path.empty() || path == "/") break;
            path = path.substr(0, path.find_last_of('/'));
        }
    };
    std::ifstream cg("/proc/self/cgroup");
    std::string line;
    while (std::getline(cg, line)) {
        // hierarchy-id:controllers:path
        auto a = line.find(':'), b = line.find(':', a + 1);
        if (a == std::string::npos || b == std::string::npos) continue;
        std::string controllers = line.substr(a + 1, b - a - 1), path = line.substr(b + 1);
        if (controllers.empty() && v2) {
            walk(*v2, path, [&](const std::string& dir) {
                std::ifstream f(dir + "/cpu.max");
                std::string quota;
                double period = 0;
                if (f >> quota >> period && quota != "max") consider(std::stod(quota), period);
            });
        }
        std::istringstream cs(controllers);
        std::string c;
        bool has_cpu = false;
        while (std::getline(cs, c, ',')) has_cpu |= (c == "cpu");
        if (has_cpu && v1cpu) {
            walk(*v1cpu, path, [&](const std::string& dir) {
                std::ifstream q(dir + "/cpu.cfs_quota_us"), p(dir + "/cpu.cfs_period_us");
                double quota = 0, period = 0;
                if (q >> quota && p >> period) consider(quota, period);
            });
        }
    }
    return limit;
}

}  // namespace

int cpu_count() {
    int n = 0;
    cpu_set_t set;
    if (::sched_getaffinity(0, sizeof set, &set) == 0) n = CPU_COUNT(&set);
    if (n <= 0) n = static_cast<int>(::sysconf(_SC_NPROCESSORS_ONLN));
    try {
        if (auto limit = cgroup_cpu_limit()) n = std::min(n, static_cast<int>(std::ceil(*limit)));
    } catch (...) {
        // An unreadable or odd cgroup file leaves the affinity count as it is.
    }
    return std::max(n, 1);
}

void set_start_method(StartMethod method, bool force) {
    // A program without the hook learns it here, before anything changes, not at its first start.
    if (method == StartMethod::spawn) detail::check_main_hooked();
    Globals& g = globals();
    {
        std::lock_guard lock(g.method_mu);
        if (g.method_fixed && !force)
            throw ProcessError("the start method has already been set (or used); pass force=true "
                               "to change it");
        g.method = method;
        g.method_fixed = true;
    }
    if (method == StartMethod::forkserver) detail::forkserver::ensure_running();
}

StartMethod get_start_method() { return fix_start_method(); }

std::optional<StartMethod> get_start_method(bool allow_none) {
    if (allow_none) {
        Globals& g = globals();
        std::lock_guard lock(g.method_mu);
        if (!g.method_fixed) return std::nullopt;
        return g.method;
    }
    return fix_start_method();
}

std::string to_string(StartMethod m) {
    switch (m) {
        case StartMethod::fork: return "fork";
        case StartMethod::forkserver: return "forkserver";
        case StartMethod::spawn: return "spawn";
    }
    return "unknown";
}

StartMethod parse_start_method(std::string_view name) {
    for (StartMethod m : {StartMethod::fork, StartMethod::forkserver, StartMethod::spawn})
        if (name == to_string(m)) return m;
    throw std::invalid_argument("cannot find context for '" + std::string(name) + "'");
}

void set_start_method(std::string_view name, bool force) { set_start_method(parse_start_method(name), force); }

}  // namespace mp
