#include "sys/helper_process.hpp"

#include <fcntl.h>
#include <unistd.h>

#include <csignal>
#include <sys/syscall.h>

#include "sys/raw_syscall.hpp"

namespace mp::sys {

void reset_signals(std::initializer_list<int> ignored) noexcept {
    sigset_t none;
    sigemptyset(&none);
    ::sigprocmask(SIG_SETMASK, &none, nullptr);
    struct sigaction action {};
    action.sa_handler = SIG_DFL;
    for (int sig = 1; sig < NSIG; ++sig)
        if (sig != SIGKILL && sig != SIGSTOP) ::sigaction(sig, &action, nullptr);
    action.sa_handler = SIG_IGN;
    for (int sig : ignored) ::sigaction(sig, &action, nullptr);
}

void keep_only(int fd, int target, bool close_on_exec) noexcept { keep_only(fd, target, close_on_exec, nullptr, 0); }

void keep_only(int fd, int target, bool close_on_exec, const int* kept, std::size_t n) noexcept {
    if (fd != target)
        ::syscall(SYS_dup3, fd, target, close_on_exec ? O_CLOEXEC : 0);
    else if (close_on_exec)
        ::syscall(SYS_fcntl, fd, F_SETFD, FD_CLOEXEC);
    // `fd` itself, when above `target`, closes with the rest: every gap between the kept ones.
    unsigned from = static_cast<unsigned>(target) + 1;
    for (std::size_t i = 0; i < n; ++i) {
        const auto k = static_cast<unsigned>(kept[i]);
        if (k < from) continue;
        if (k > from) ::syscall(SYS_close_range, from, k - 1, 0);
        from = k + 1;
    }
    ::syscall(SYS_close_range, from, ~0U, 0);
    if (fd >= 0 && fd <= 2) {
        ::syscall(SYS_close, fd);
        standard_fds_open(false);
    }
}

namespace {
// The address of _exit, taken when the program is loaded (a data relocation is never lazy). The
// volatile read keeps the compiler from turning the call back into one through the PLT.
void (*volatile const g_exit)(int) = ::_exit;
}  // namespace

void exit_child(int code) noexcept {
    g_exit(code);
    __builtin_unreachable();
}

}  // namespace mp::sys
