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
std::optional<int> pidfd_wait(int pidfd, bool nohang);
/// Waits until the process ends (the pidfd polls readable); false on timeout.
bool pidfd_wait_exit(int pidfd, std::optional<std::chrono::nanoseconds> timeout);
/// Turns a waitpid/waitid status into the exitcode convention.
int decode_wait_status(int code, int status);

}  // namespace mp::sys
