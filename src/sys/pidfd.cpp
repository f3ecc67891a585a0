#include "sys/pidfd.hpp"

#include <pthread.h>

#include <atomic>

#include <csignal>
#include <cstdint>
#include <poll.h>
#include <sys/ioctl.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#include "sys/atfork.hpp"
#include "sys/error.hpp"

#ifndef P_PIDFD
#define P_PIDFD 3
#endif

namespace mp::sys {

namespace {
std::atomic<pid_t> g_self_pid{0};
[[gnu::init_priority(101)]] const ChildAtFork g_self_pid_atfork{
    [] { g_self_pid.store(0, std::memory_order_relaxed); }};
}  // namespace

pid_t self_pid() noexcept {
    pid_t p = g_self_pid.load(std::memory_order_relaxed);
    if (p == 0) {
        p = ::getpid();
        g_self_pid.store(p, std::memory_order_relaxed);
    }
    return p;
}

void set_self_pid(pid_t pid) noexcept { g_self_pid.store(pid, std::memory_order_relaxed); }

bool on_main_thread() noexcept { return ::gettid() == self_pid(); }

Fd pidfd_open(pid_t pid) {
    return Fd(static_cast<int>(check(::syscall(SYS_pidfd_open, pid, 0), "pidfd_open")));
}

bool pidfd_send_signal(int pidfd, int sig) {
    if (::syscall(SYS_pidfd_send_signal, pidfd, sig, nullptr, 0) == 0) return true;
    if (errno == ESRCH) return false;
    throw_system_error(errno, "pidfd_send_signal");
}

int decode_wait_status(int code, int status) {
    switch (code) {
        case CLD_EXITED: return status;
        case CLD_KILLED:
        case CLD_DUMPED: return -status;
        default: return status;
    }
}

namespace {
// PIDFD_GET_INFO (Linux 6.13) and its exit status (PIDFD_INFO_EXIT, Linux 6.15), from
// <linux/pidfd.h>, which the C library's headers here predate. The first published layout
// (PIDFD_INFO_SIZE_VER0): the kernel fills what fits in the size the request number carries.
struct PidfdInfo {
    std::uint64_t mask;
    std::uint64_t cgroupid;
    std::uint32_t pid, tgid, ppid, ruid, rgid, euid, egid, suid, sgid, fsuid, fsgid;
    std::int32_t exit_code;  // a wait status, as waitpid() gives it
};
static_assert(sizeof(PidfdInfo) == 64);
constexpr unsigned long kPidfdGetInfo = _IOWR(0xFF, 11, PidfdInfo);
constexpr std::uint64_t kPidfdInfoExit = 1U << 3;
}  // namespace

std::optional<int> pidfd_exit_status(int pidfd) noexcept {
    PidfdInfo info{};
    info.mask = kPidfdInfoExit;
    // ENOTTY or EINVAL from an older kernel; until the process is reaped the mask lacks the bit.
    if (::ioctl(pidfd, kPidfdGetInfo, &info) != 0 || (info.mask & kPidfdInfoExit) == 0)
        return std::nullopt;
    const int status = info.exit_code;
    if (WIFEXITED(status)) return WEXITSTATUS(status);
    if (WIFSIGNALED(status)) return -WTERMSIG(status);
    return std::nullopt;
}

std::optional<int> pidfd_wait(int pidfd, bool nohang) {
    siginfo_t info{};
    for (;;) {
        int r = ::waitid(static_cast<idtype_t>(P_PIDFD), static_cast<id_t>(pidfd), &info,
                         WEXITED | (nohang ? WNOHANG : 0));
        if (r == 0) break;
        if (errno == EINTR) continue;
        const int err = errno;
        // Reaped by someone else (the kernel itself when SIGCHLD is ignored, or a waitpid(-1)
        // elsewhere in the program): the kernel may still know how it ended.
        if (err == ECHILD)
            if (const std::optional<int> status = pidfd_exit_status(pidfd)) return status;
        throw_system_error(err, "waitid(P_PIDFD)");
    }
    if (info.si_pid == 0) return std::nullopt;  // WNOHANG and still running
    return decode_wait_status(info.si_code, info.si_status);
}

bool pidfd_wait_exit(int pidfd, std::optional<std::chrono::nanoseconds> timeout) {
    return wait_fd(pidfd, POLLIN, timeout);
}

}  // namespace mp::sys
