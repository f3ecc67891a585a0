#pragma once
/// Leak checks shared by every test binary (see test_main.cpp) and usable from tests.
///
/// After each test, the shared main compares the process against a baseline taken when the test
/// started and fails the test when it left behind
///   - a child process (zombies included), other than an mp forkserver (comm "mp-forkserver"),
///   - a file descriptor opened during the test, other than one that belongs to the forkserver
///     connection (a pipe or socket shared with, or connected to, the forkserver process, or a
///     pidfd of it): the forkserver starts once per process and lives until exit,
///   - a child of the forkserver (one of this process's children started through it), still
///     there 2 s after the test (its spare, comm "mp-fs-spare", is the server's own),
///   - an entry in /dev/shm (one that stays, with the same inode, for 200 ms and that no other
///     process holds open or mapped: ctest -j runs other programs at the same time).
/// This process's forkserver is the process named "mp-forkserver" (prctl PR_SET_NAME) that is its
/// child or holds the other end of one of its sockets or pipes (mp double-forks the server, so it
/// is usually nobody's child); its fds are recognised automatically. A test that starts some
/// other long-lived per-process resource on purpose calls mp::test::rebaseline() once it exists:
/// everything open at that moment is then taken as the test's starting state.

#include <chrono>
#include <set>
#include <string>
#include <sys/types.h>
#include <vector>

namespace mp::test {

/// An open file descriptor of this process and what it refers to (readlink of /proc/self/fd/N).
struct FdInfo {
    int fd = -1;
    std::string target;
    /// The open file's identity (fstat): a file renamed while open (ctest renames its log)
    /// keeps it, though its readlink target changes.
    unsigned long long dev = 0, ino = 0;
};

/// A process and what identifies it.
struct ProcInfo {
    pid_t pid = 0;
    pid_t ppid = 0;
    char state = '?';     ///< from /proc/PID/stat: R, S, Z, ...
    std::string comm;     ///< /proc/PID/comm without the newline
    std::string cmdline;  ///< /proc/PID/cmdline, NULs turned into spaces
};

/// The open fds of this process, without the one used to read /proc/self/fd.
std::vector<FdInfo> list_fds();
/// Number of open fds of this process (as list_fds().size()).
std::size_t count_fds();
/// The children of process `parent` (all of its threads' children), zombies included.
std::vector<ProcInfo> list_children(pid_t parent);
/// The children of this process.
std::vector<ProcInfo> list_children();
/// What /proc says about one process; std::nullopt-like empty pid (0) when it does not exist.
ProcInfo proc_info(pid_t pid);
/// True when /proc/PID exists and one of its threads has not ended (not a zombie).
bool pid_running(pid_t pid);
/// True when /proc/PID exists (a zombie counts).
bool pid_exists(pid_t pid);
/// Polls until `pid` no longer runs (gone or zombie) or the timeout passes; true when it stopped.
bool wait_pid_stopped(pid_t pid, std::chrono::milliseconds timeout);
/// The names of the entries of /dev/shm.
std::set<std::string> list_shm();
/// Whether a process other than this one and its children holds /dev/shm/NAME open or mapped:
/// the entry belongs to another program running at the same time (ctest -j).
bool shm_held_elsewhere(const std::string& name);

/// True for mp's forkserver process (comm or cmdline "mp-forkserver").
bool is_forkserver(const ProcInfo& p);
/// Every live mp forkserver on the machine (other programs' too), without the children it
/// forked (which inherit its name).
std::vector<ProcInfo> all_forkservers();
/// This process's forkserver(s), normally zero or one: a forkserver that is its child or that
/// holds the other end of one of its sockets or pipes (the server may be nobody's child).
std::vector<ProcInfo> forkservers();

/// Retakes the baseline used by the per-test check (fds, children, /dev/shm) now.
void rebaseline();

/// What the per-test check compares against.
struct Snapshot {
    std::vector<FdInfo> fds;
    std::vector<ProcInfo> children;
    std::set<std::string> shm;
};
Snapshot snapshot();
/// A description of what leaked since `base` (empty when nothing did). Waits briefly for
/// asynchronous cleanup that is not this process's (a forkserver reaping its children, another
/// program's /dev/shm entry) before it reports.
std::string describe_leaks(const Snapshot& base);

/// Used by test_main.cpp: the baseline of the running test.
Snapshot& current_baseline();

}  // namespace mp::test
