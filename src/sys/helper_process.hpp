#pragma once
// Long-lived helper processes (the forkserver, the shared-memory tracker): started by a double
// fork so that they are nobody's child and never a zombie, and cleared of everything they
// inherited from a program that may run threads, hold descriptors and handle signals.

#include <cerrno>
#include <initializer_list>
#include <sys/types.h>
#include <sys/wait.h>
#include <unistd.h>

#include "sys/error.hpp"

namespace mp::sys {

/// Runs `body` (which must not return) in a grandchild of this process and waits for the child
/// in between, which exits at once: the helper is reparented and never becomes our zombie.
/// `body` runs in a fork of a possibly threaded process: async-signal-safe calls only. Throws
/// std::system_error naming `what` when either fork fails. When SIGCHLD is ignored the middle
/// child is reaped for us; the caller's handshake with the helper then tells whether it runs.
template <class Body>
void start_detached(const char* what, Body&& body) {
    const pid_t mid = ::fork();
    if (mid < 0) throw_system_error(errno, what);
    if (mid == 0) {
        const pid_t helper = ::fork();
        if (helper == 0) body();
        ::_exit(helper < 0 ? 1 : 0);
    }
    int status = 0;
    pid_t r;
    while ((r = ::waitpid(mid, &status, 0)) < 0 && errno == EINTR) {
    }
    if (r == mid && (!WIFEXITED(status) || WEXITSTATUS(status) != 0))
        throw_system_error(EAGAIN, what);
}

/// In a new helper: no signal blocked, every disposition the default, then `ignored` ignored.
void reset_signals(std::initializer_list<int> ignored) noexcept;

/// In a new helper: `fd` moved to descriptor `target` (> 2), every descriptor above `target`
/// closed, stdio kept. A descriptor kept open by a helper would hide end of file from its reader
/// for as long as the helper lives.
void keep_only(int fd, int target) noexcept;

}  // namespace mp::sys
