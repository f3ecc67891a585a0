// The spawn start method: the child is a fresh exec of this program (/proc/self/exe) that runs
// its task instead of main. The hook is __wrap_main: programs are linked with -Wl,--wrap=main
// (mp::mp's INTERFACE_LINK_OPTIONS, and the pkg-config file), so the C runtime calls it, after
// every static initialiser and in place of main. In a spawn child it reads the request from the
// inherited descriptor named on the command line; elsewhere it calls the real main.
//
// Also here: the request a forkserver or spawn child reads (one format, written and read once).
// A forkserver child and a spawn child differ only in who forked them.

#include <dlfcn.h>
#include <fcntl.h>
#include <pthread.h>
#include <sched.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#include <array>
#include <atomic>
#include <cerrno>
#include <csignal>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "launch.hpp"
#include "mp/serialize.hpp"
#include "process_impl.hpp"
#include "sys/error.hpp"
#include "sys/pidfd.hpp"
#include "sys/raw_syscall.hpp"

// With -Wl,--wrap=main the linker points this at the program's main. Weak, so a program linked
// without the option (or against libmp.so, whose references the option does not rewrite) still
// links: it is then null and real_main() looks further.
extern "C" int __real_main(int, char**, char**) __attribute__((weak));  // NOLINT(bugprone-reserved-identifier)

#ifndef CLONE_PIDFD
#define CLONE_PIDFD 0x00001000
#endif

namespace mp {

// The request, written with the encoder's primitives only (strings as length + bytes).
template <>
struct Codec<detail::ChildRequest> {
    static void put_string(Encoder& e, const std::string& s) {
        e.write_size(s.size());
        e.write(s.data(), s.size());
    }
    static std::string get_string(Decoder& d) {
        auto n = d.read_size();
        return std::string(d.read_view(n));
    }
    static void encode(Encoder& e, const detail::ChildRequest& r) {
        e.put(r.build_id);
        put_string(e, r.name);
        e.put(r.daemon);
        e.put(r.dies_with_parent);
        e.put(static_cast<std::int32_t>(r.checked_death_signal));
        put_string(e, r.authkey);
        e.write_size(r.identity.size());
        for (int i : r.identity) e.put(i);
        put_string(e, r.parent_name);
        e.put(static_cast<std::int32_t>(r.parent_pid));
        e.put(r.log.level);
        e.put(r.log.to_stderr);
        e.put(r.logs_start);
        put_string(e, r.task);
    }
    static detail::ChildRequest decode(Decoder& d) {
        detail::ChildRequest r;
        r.build_id = d.get<std::uint64_t>();
        r.name = get_string(d);
        r.daemon = d.get<bool>();
        r.dies_with_parent = d.get<bool>();
        r.checked_death_signal = d.get<std::int32_t>();
        r.authkey = get_string(d);
        auto n = d.read_size(sizeof(int));
        for (std::uint64_t i = 0; i < n; ++i) r.identity.push_back(d.get<int>());
        r.parent_name = get_string(d);
        r.parent_pid = d.get<std::int32_t>();
        r.log.level = d.get<std::int32_t>();
        r.log.to_stderr = d.get<bool>();
        r.logs_start = d.get<bool>();
        r.task = get_string(d);
        return r;
    }
};

namespace detail {
namespace {

// Set by __wrap_main: this program was linked with the hook, so a spawn child runs its task
// (without the hook it would run main, as a second copy of the program).
std::atomic<bool> g_main_hooked{false};

constexpr char kSpawnFlag[] = "--mp-spawn-child";
// The descriptor a spawn child finds its request socket at.
constexpr int kRequestFd = 3;

using MainFn = int (*)(int, char**, char**);

MainFn real_main() noexcept {
    if (&__real_main != nullptr) return &__real_main;
    // libmp.so: the program exports main (--export-dynamic-symbol=main, added with the wrap).
    return reinterpret_cast<MainFn>(::dlsym(RTLD_DEFAULT, "main"));
}

// The spawn child is made with clone(CLONE_VM | CLONE_VFORK), as glibc's posix_spawn and musl's
// make theirs: it runs on this process's memory, on a stack of its own, while the thread that
// made it waits until it has executed the program or exited. So no page table is copied (a
// fork's cost grows with the parent: tens of milliseconds from one with 2 GiB touched), and the
// exec error is left in our memory instead of going through a pipe. Until exec the child may only
// make raw system calls (sys::raw_call: no errno, which is the waiting thread's) on what the
// parent prepared here, and writes nothing of ours but `error`.
struct ExecChild {
    std::array<char*, 4> argv;
    char** envp;
    int request_fd;
    // The child's: minus the errno of the call that failed. Read once the parent thread resumes.
    long error;
    // Detached: the stack of the program's child, below the middle child's.
    char* inner_stack;
};

// Each child's stack, mapped for the start (spawn_program). Its code needs a few hundred bytes;
// the rest is margin (there is no guard page below it).
constexpr std::size_t kChildStack = 32 * 1024;

using sys::KernelSigaction;
using sys::raw_call;

MP_SHARED_MEMORY_CHILD int exec_program(void* arg) noexcept {
    auto* c = static_cast<ExecChild*>(arg);
    // Inheritable at the number the program expects (dup3 refuses to copy a descriptor onto itself).
    long r = c->request_fd == kRequestFd ? raw_call(SYS_fcntl, kRequestFd, F_SETFD, 0)
                                         : raw_call(SYS_dup3, c->request_fd, kRequestFd, 0);
    if (r >= 0) {
        // Every other descriptor of the parent stays behind: the child gets what its task carries.
        if (raw_call(SYS_close_range, kRequestFd + 1, ~0U, 0) < 0)
            for (int fd = kRequestFd + 1; fd < 65536; ++fd) raw_call(SYS_close, fd);
        // A parent without stdin (say) would otherwise have the program receive its task's
        // descriptors, or the forkserver its control socket, at 0, 1 or 2.
        sys::standard_fds_open(true);
        // Signals are blocked (spawn_program, detach_program). A handler of the parent must not
        // run here, on the parent's memory, and exec keeps an ignored SIGTERM ignored
        // (terminate() would do nothing): default both, then unblock.
        for (int sig = 1; sig < 65; ++sig) {
            if (sig == SIGKILL || sig == SIGSTOP) continue;
            KernelSigaction act{};
            if (raw_call(SYS_rt_sigaction, sig, nullptr, &act, sizeof(unsigned long)) != 0) continue;
            const bool caught = act.handler != SIG_DFL && act.handler != SIG_IGN;
            if (caught || (sig == SIGTERM && act.handler == SIG_IGN)) {
                KernelSigaction dfl{};
                dfl.handler = SIG_DFL;
                raw_call(SYS_rt_sigaction, sig, &dfl, nullptr, sizeof(unsigned long));
            }
        }
        const unsigned long none = 0;
        raw_call(SYS_rt_sigprocmask, SIG_SETMASK, &none, nullptr, sizeof none);
        r = raw_call(SYS_execve, "/proc/self/exe", c->argv.data(), c->envp);
    }
    c->error = r;
    return 127;
}

// glibc's clone. TSan's interceptor of `clone` takes the child for a fork and rebuilds its own
// records there, which under CLONE_VM are the parent's: its other name is not intercepted.
#if defined(__SANITIZE_THREAD__)
#define MP_TSAN_CLONE 1
#elif defined(__has_feature)
#if __has_feature(thread_sanitizer)
#define MP_TSAN_CLONE 1
#endif
#endif
#if defined(MP_TSAN_CLONE)
extern "C" int __clone(int (*)(void*), void*, int, void*, ...);  // NOLINT(bugprone-reserved-identifier)
MP_SHARED_MEMORY_CHILD int clone_vm(int (*fn)(void*), char* stack, int flags, void* arg, int* pidfd) noexcept {
    return __clone(fn, stack, flags, arg, pidfd);
}
#else
MP_SHARED_MEMORY_CHILD int clone_vm(int (*fn)(void*), char* stack, int flags, void* arg, int* pidfd) noexcept {
    return ::clone(fn, stack, flags, arg, pidfd);
}
#endif

// Detached: the middle child makes the program's child and exits once that has executed (or
// failed to), so the program is reparented and never becomes the caller's zombie. It makes no
// system call of its own but clone, whose errno it must not read (the parent thread's): a
// failure is reported as the exit status.
MP_SHARED_MEMORY_CHILD int detach_program(void* arg) noexcept {
    auto* c = static_cast<ExecChild*>(arg);
    // The program's child may end (a failed exec) before we do: its SIGCHLD must not run a
    // handler of the parent here, on the parent's memory. Inherited blocked, and unblocked by
    // exec_program once the handlers are reset.
    const unsigned long chld = 1UL << (SIGCHLD - 1);
    (void)raw_call(SYS_rt_sigprocmask, SIG_BLOCK, &chld, nullptr, sizeof chld);
    return clone_vm(exec_program, c->inner_stack, CLONE_VM | CLONE_VFORK | SIGCHLD, c, nullptr) > 0 ? 0 : 1;
}

void reap(pid_t pid) noexcept {
    int status = 0;
    while (::waitpid(pid, &status, 0) < 0 && errno == EINTR) {
    }
}

}  // namespace

SpawnedProgram spawn_program(int request_fd, bool detached, const char* what) {
    // The command line and environment, made here: the child must not allocate.
    std::string argv0(program_invocation_name != nullptr ? program_invocation_name : "mp");
    ExecChild c{{argv0.data(), const_cast<char*>(kSpawnFlag), const_cast<char*>("3"), nullptr},
                environ, request_fd, 0, nullptr};
    // The children's stacks, mapped for this start: in this thread's frame they made a start
    // from a thread with a small stack (64 KiB, as some programs give their threads) overflow it.
    void* const mapped = ::mmap(nullptr, 2 * kChildStack, PROT_READ | PROT_WRITE,
                                MAP_PRIVATE | MAP_ANONYMOUS | MAP_STACK, -1, 0);
    if (mapped == MAP_FAILED) sys::throw_system_error(errno, what);
    struct Unmap {
        void* p;
        ~Unmap() { ::munmap(p, 2 * kChildStack); }
    } unmap{mapped};
    char* const stacks[2] = {static_cast<char*>(mapped), static_cast<char*>(mapped) + kChildStack};
    c.inner_stack = stacks[1] + kChildStack;
    // A signal handler of ours must not run in the child, on our memory: it runs with every
    // signal blocked (but SIGCHLD, which only its own children would send it: StartSignalBlock)
    // until it has set the handlers back to their defaults. A signal sent to it meanwhile stays
    // pending.
    int pidfd = -1;
    int pid;
    int err;
    {
        const StartSignalBlock blocked;
        pid = detached ? clone_vm(detach_program, stacks[0] + kChildStack, CLONE_VM | CLONE_VFORK | SIGCHLD, &c, nullptr)
                       : clone_vm(exec_program, stacks[0] + kChildStack,
                                  CLONE_VM | CLONE_VFORK | CLONE_PIDFD | SIGCHLD, &c, &pidfd);
        err = errno;
    }
    if (pid < 0) sys::throw_system_error(err, what);

    SpawnedProgram out;
    if (detached) {
        // The middle child has exited (CLONE_VFORK); reaped here unless SIGCHLD is ignored, when
        // the kernel has done it and `error` alone tells.
        int status = 0;
        pid_t r;
        while ((r = ::waitpid(pid, &status, 0)) < 0 && errno == EINTR) {
        }
        if (r == pid && (!WIFEXITED(status) || WEXITSTATUS(status) != 0) && c.error == 0)
            sys::throw_system_error(EAGAIN, what);
    } else {
        out.pid = pid;
        out.pidfd = sys::Fd(pidfd);
    }
    if (c.error < 0) {
        // The child has exited already: CLONE_VFORK let us go on only then.
        if (!detached) reap(pid);
        sys::throw_system_error(static_cast<int>(-c.error), "execve (spawn)");
    }
    return out;
}

bool main_hooked() noexcept { return g_main_hooked.load(std::memory_order_relaxed); }

void check_main_hooked() {
    if (!main_hooked())
        throw ProcessError(
            "mp: the spawn start method needs the program linked with -Wl,--wrap=main, so that a "
            "fresh copy of it runs its task instead of main: link with mp::mp in CMake "
            "(target_link_libraries adds the option) or with `pkg-config --libs mp` (fork and "
            "the forkserver work without it)");
}

std::uint64_t program_build_id() noexcept {
    try {
        if (MainFn m = real_main()) return code_ref(reinterpret_cast<std::uintptr_t>(m)).module;
    } catch (...) {
        // Not in a loaded module: nothing to compare.
    }
    return 0;
}

ChildRequest make_request(const ChildSpec& spec) {
    // Checked before any child exists: one message carries them all.
    if (spec.task->fds.size() > sys::kMaxFds)
        throw ProcessError("mp: a forkserver or spawn child can receive at most " +
                           std::to_string(sys::kMaxFds) + " descriptors");
    ChildRequest req;
    req.name = spec.name;
    req.daemon = spec.daemon;
    req.dies_with_parent = spec.daemon || spec.dies_with_parent;
    req.checked_death_signal = checked_death_signal(spec.daemon, spec.dies_with_parent);
    req.authkey = spec.authkey;
    req.identity.assign(spec.identity.begin(), spec.identity.end());
    req.parent_name = current_process().name;
    req.parent_pid = sys::self_pid();
    req.build_id = program_build_id();
    req.log = log_settings();
    req.logs_start = spec.logs_start;
    req.task = spec.task->bytes;
    req.task_fds = spec.task->fds;
    return req;
}

void send_request(int fd, const ChildRequest& req) {
    const std::string payload = encode(req);
    // The header carries the task's descriptors; the payload follows on the same stream.
    const std::uint64_t header[2] = {payload.size(), req.task_fds.size()};
    sys::send_fds(fd, header, sizeof header, req.task_fds);
    sys::write_full(fd, payload.data(), payload.size());
}

void run_request(int fd, bool direct) noexcept {
    // From here the process is single-threaded with a consistent heap: ordinary code is safe.
    int code = run_guarded([&] {
        std::uint64_t header[2] = {0, 0};
        std::vector<sys::Fd> received(sys::kMaxFds);
        std::size_t got = sys::recv_fds(fd, header, sizeof header, received);
        if (got < sizeof header)
            got += sys::read_full(fd, reinterpret_cast<char*>(header) + got, sizeof header - got);
        if (got != sizeof header) throw ProcessError("mp child: the parent sent no request");
        const std::uint64_t len = header[0];
        if (len > (std::uint64_t{1} << 40)) throw ProcessError("mp child: oversized request");
        if (header[1] > sys::kMaxFds) throw ProcessError("mp child: too many descriptors");
        for (std::size_t i = 0; i < header[1]; ++i)
            if (!received[i]) throw ProcessError("mp child: descriptors missing from the request");
        std::string payload(len, '\0');
        if (sys::read_full(fd, payload.data(), len) != len) throw ProcessError("mp child: truncated request");
        ::close(fd);
        ChildRequest req = decode<ChildRequest>(payload);
        if (req.build_id != program_build_id())
            throw ProcessError("mp child: the program file is not the one the parent runs (build id " +
                               std::to_string(program_build_id()) + ", the parent's " +
                               std::to_string(req.build_id) +
                               "): was it rebuilt or replaced while the parent ran?");

        auto* identity = new ProcessIdentity{req.name, 0, req.daemon, req.authkey, req.identity};
        auto* parent = new ParentProcess{req.parent_name, req.parent_pid};
        // A spawn child's OS parent is the requester: it arms the parent-death signal. A
        // forkserver child's is the server, which has done that already (child_main).
        ChildSetup setup{identity, parent, direct && req.dies_with_parent, req.parent_pid, !direct};
        if (direct) setup.checked_death_signal = req.checked_death_signal;
        become_child(setup);
        identity->daemon = req.daemon;
        apply_log_settings(req.log);
        guard_child_exit();
        if (req.logs_start) log_child_start();
        // The arguments take the descriptors they own; the rest close with `received`.
        std::vector<int> fds;
        for (std::size_t i = 0; i < header[1]; ++i) fds.push_back(received[i].get());
        run_task(req.task, fds);
        for (std::size_t i = 0; i < fds.size(); ++i)
            if (fds[i] < 0) (void)received[i].release();
    });
    finish_child(code);
}

}  // namespace detail
}  // namespace mp

// The program's entry when linked with -Wl,--wrap=main: the C runtime calls this after the static
// initialisers, in place of main.
extern "C" int __wrap_main(int argc, char** argv, char** envp) {  // NOLINT(bugprone-reserved-identifier)
    using namespace mp::detail;
    g_main_hooked.store(true, std::memory_order_relaxed);
    if (argc == 3 && std::strcmp(argv[1], kSpawnFlag) == 0) {
        // What the process table shows: the program's name (comm would be "exe").
        const char* base = std::strrchr(argv[0], '/');
        ::prctl(PR_SET_NAME, base != nullptr ? base + 1 : argv[0]);
        run_request(std::atoi(argv[2]), true);
    }
    MainFn m = real_main();
    if (m == nullptr) {
        std::fputs("mp: __wrap_main cannot find the program's main (link the program with "
                   "-Wl,--wrap=main, and with -Wl,--export-dynamic-symbol=main against libmp.so)\n",
                   stderr);
        return 127;
    }
    return m(argc, argv, envp);
}
