#include "sys/helper_process.hpp"

#include <csignal>
#include <sys/syscall.h>

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

void keep_only(int fd, int target) noexcept {
    if (fd != target) {
        ::dup2(fd, target);
        if (fd > target) ::close(fd);  // a lower one is stdio: the caller decides about those
    }
    ::syscall(SYS_close_range, target + 1, ~0U, 0);
}

}  // namespace mp::sys
