#pragma once
// pidfd wrappers: a descriptor that names one process for good, so a signal or a wait can never
// hit a stranger that reused the pid.

#include <chrono>
#include <optional>
#include <sys/types.h>

#include "sys/fd.hpp"

namespace mp::sys {

/// pidfd_open(pid): close-on-exec (pidfds always are).
Fd pidfd_open(pid_t pid);
/// Sends `sig`; returns false when the process has already exited (ESRCH).
bool pidfd_send_signal(int pidfd, int sig);
/// Reaps the child behind `pidfd` (waitid P_PIDFD). Returns its status as Process::exitcode()
/// reports it (N for exit(N), -N for signal N), or std::nullopt when `nohang` and it still runs.
/// A child reaped by someone else (SIGCHLD ignored, a waitpid(-1) elsewhere) gives the status
/// the kernel kept for the pidfd (pidfd_exit_status); without one, std::system_error ECHILD.
std::optional<int> pidfd_wait(int pidfd, bool nohang);
/// How the process behind `pidfd` ended, once it has been reaped by anyone, from the record the
/// kernel keeps for a pidfd that was open when it ended (PIDFD_INFO_EXIT, Linux 6.15); as
/// pidfd_wait's status. std::nullopt while it is not reaped, or when the kernel keeps none.
std::optional<int> pidfd_exit_status(int pidfd) noexcept;
/// Waits until the process ends (the pidfd polls readable); false on timeout.
bool pidfd_wait_exit(int pidfd, std::optional<std::chrono::nanoseconds> timeout);
/// getpid(), cached: a system call, which starting and waiting for a child asked several times
/// each. The cache is cleared in a fork child (pthread_atfork), so a child made by fork(), mp's
/// own or the program's, finds its own id; a child made by a raw clone system call would not.
pid_t self_pid() noexcept;
/// In a new child that knows its id already (mp's fork children): the cache without a call.
void set_self_pid(pid_t pid) noexcept;
/// Whether the calling thread is the process's main thread (its id is the process's), the one
/// whose end is the process's: a child it forks gets its parent-death signal with the process.
bool on_main_thread() noexcept;
/// Turns a waitpid/waitid status into the exitcode convention.
int decode_wait_status(int code, int status);

}  // namespace mp::sys
