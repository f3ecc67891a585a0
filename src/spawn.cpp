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
#include <sys/prctl.h>
#include <sys/syscall.h>
#include <unistd.h>

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

// With -Wl,--wrap=main the linker points this at the program's main. Weak, so a program linked
// without the option (or against libmp.so, whose references the option does not rewrite) still
// links: it is then null and real_main() looks further.
extern "C" int __real_main(int, char**, char**) __attribute__((weak));  // NOLINT(bugprone-reserved-identifier)

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
        put_string(e, r.authkey);
        e.write_size(r.identity.size());
        for (int i : r.identity) e.put(i);
        put_string(e, r.parent_name);
        e.put(static_cast<std::int32_t>(r.parent_pid));
        put_string(e, r.task);
    }
    static detail::ChildRequest decode(Decoder& d) {
        detail::ChildRequest r;
        r.build_id = d.get<std::uint64_t>();
        r.name = get_string(d);
        r.daemon = d.get<bool>();
        r.authkey = get_string(d);
        auto n = d.read_size(sizeof(int));
        for (std::uint64_t i = 0; i < n; ++i) r.identity.push_back(d.get<int>());
        r.parent_name = get_string(d);
        r.parent_pid = d.get<std::int32_t>();
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
// The descriptor numbers a spawn child finds its request socket and exec-error pipe at.
constexpr int kRequestFd = 3;
constexpr int kExecErrorFd = 4;

using MainFn = int (*)(int, char**, char**);

MainFn real_main() noexcept {
    if (&__real_main != nullptr) return &__real_main;
    // libmp.so: the program exports main (--export-dynamic-symbol=main, added with the wrap).
    return reinterpret_cast<MainFn>(::dlsym(RTLD_DEFAULT, "main"));
}

// Raw syscall() between fork and exec, as in become_child: nothing a threaded parent's child
// must not do, and no lazy binding of a libc function the parent never called.
long sys_call(long n, auto... args) noexcept { return ::syscall(n, args...); }

struct KernelSigaction {
    void (*handler)(int);
    unsigned long flags;
    void (*restorer)();
    unsigned long mask;
};

[[noreturn]] void exec_failed(int error_fd) noexcept {
    const int err = errno;
    sys_call(SYS_write, error_fd, &err, sizeof err);
    sys_call(SYS_exit_group, 127);
    __builtin_unreachable();
}

}  // namespace

ExecPlan::ExecPlan() : argv0_(program_invocation_name != nullptr ? program_invocation_name : "mp") {
    argv_[0] = argv0_.data();
    argv_[1] = const_cast<char*>(kSpawnFlag);
    argv_[2] = const_cast<char*>("3");
    argv_[3] = nullptr;
    envp_ = environ;
}

void ExecPlan::exec(int request_fd, int error_fd) const noexcept {
    // Above the two numbers the child expects first, so that neither move overwrites the other.
    const int req = static_cast<int>(sys_call(SYS_fcntl, request_fd, F_DUPFD_CLOEXEC, 5));
    if (req < 0) exec_failed(error_fd);
    const int err = static_cast<int>(sys_call(SYS_fcntl, error_fd, F_DUPFD_CLOEXEC, 5));
    if (err < 0) exec_failed(error_fd);
    if (sys_call(SYS_dup3, req, kRequestFd, 0) < 0) exec_failed(err);
    if (sys_call(SYS_dup3, err, kExecErrorFd, O_CLOEXEC) < 0) exec_failed(err);
    // Every other descriptor of the parent stays behind: the child gets what its task carries.
    if (sys_call(SYS_close_range, kExecErrorFd + 1, ~0U, 0) < 0) {
        for (int fd = kExecErrorFd + 1; fd < 65536; ++fd) sys_call(SYS_close, fd);
    }
    // Signals are all blocked (fork_blocked). A handler of the parent must not run here, and exec
    // keeps an ignored SIGTERM ignored (terminate() would do nothing): default both, then unblock.
    for (int sig = 1; sig < 65; ++sig) {
        if (sig == SIGKILL || sig == SIGSTOP) continue;
        KernelSigaction act{};
        if (sys_call(SYS_rt_sigaction, sig, nullptr, &act, sizeof(unsigned long)) != 0) continue;
        const bool caught = act.handler != SIG_DFL && act.handler != SIG_IGN;
        if (caught || (sig == SIGTERM && act.handler == SIG_IGN)) {
            KernelSigaction dfl{};
            dfl.handler = SIG_DFL;
            sys_call(SYS_rt_sigaction, sig, &dfl, nullptr, sizeof(unsigned long));
        }
    }
    const unsigned long none = 0;
    sys_call(SYS_rt_sigprocmask, SIG_SETMASK, &none, nullptr, sizeof none);
    sys_call(SYS_execve, "/proc/self/exe", argv_.data(), envp_);
    exec_failed(kExecErrorFd);
}

bool main_hooked() noexcept { return g_main_hooked.load(std::memory_order_relaxed); }

void check_main_hooked() {
    if (!main_hooked())
        throw ProcessError(
            "mp: the spawn start method (and the forkserver, which is started by spawn) needs the "
            "program linked with -Wl,--wrap=main, so that a fresh copy of it runs its task instead "
            "of main: link with mp::mp in CMake (target_link_libraries adds the option) or with "
            "`pkg-config --libs mp`");
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
    req.authkey = spec.authkey;
    req.identity.assign(spec.identity.begin(), spec.identity.end());
    req.parent_name = current_process().name;
    req.parent_pid = ::getpid();
    req.build_id = program_build_id();
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
        // A spawn child's OS parent is the requester: it arms the daemon's parent-death signal.
        // A forkserver child's is the server, which has done that already (child_main).
        ChildSetup setup{identity, parent, direct && req.daemon, req.parent_pid};
        become_child(setup);
        identity->daemon = req.daemon;
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
