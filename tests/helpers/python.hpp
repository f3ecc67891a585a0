#pragma once
// python3 as the other end of a test: Python's own multiprocessing is the reference for the wire
// formats (connection frames, handles, pickles, the manager protocol).

#include <fcntl.h>
#include <signal.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <unistd.h>

#include <string>
#include <utility>
#include <vector>

namespace mp::test {

/// Starts `python3 -c code args...` and returns its pid (-1 when fork fails). `out` (>= 0)
/// becomes its standard output, and its standard error too with `err_too`; `inherit` (>= 0)
/// stays open in it across exec, for a script that takes a descriptor number as an argument.
inline pid_t start_python(const std::string& code, const std::vector<std::string>& args = {},
                          int out = -1, bool err_too = false, int inherit = -1) {
    // Everything is built before fork: the child makes only async-signal-safe calls.
    std::vector<std::string> argv_s{"python3", "-c", code};
    argv_s.insert(argv_s.end(), args.begin(), args.end());
    std::vector<char*> argv;
    for (auto& a : argv_s) argv.push_back(a.data());
    argv.push_back(nullptr);
    const pid_t pid = ::fork();
    if (pid == 0) {
        if (out >= 0) {
            ::dup2(out, 1);
            if (err_too) ::dup2(out, 2);
        }
        if (inherit >= 0) ::fcntl(inherit, F_SETFD, ::fcntl(inherit, F_GETFD) & ~FD_CLOEXEC);
        ::execvp("python3", argv.data());
        ::_exit(127);
    }
    return pid;
}

/// A child that is killed (SIGKILL) and reaped when the test leaves early, so a failure does
/// not leak it.
class KilledOnExit {
public:
    explicit KilledOnExit(pid_t pid) noexcept : pid_(pid) {}
    KilledOnExit(const KilledOnExit&) = delete;
    KilledOnExit& operator=(const KilledOnExit&) = delete;
    ~KilledOnExit() {
        if (pid_ > 0) {
            ::kill(pid_, SIGKILL);
            (void)wait();
        }
    }
    /// Waits for its end; its wait status, or -1 (reaped already, or waitpid failed).
    int wait() {
        int status = -1;
        if (pid_ > 0 && ::waitpid(std::exchange(pid_, 0), &status, 0) < 0) status = -1;
        return status;
    }

private:
    pid_t pid_;
};

}  // namespace mp::test
