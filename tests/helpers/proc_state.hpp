#pragma once
// What a child process is doing, read from /proc: for tests that must act while a child sleeps
// in a particular wait.

#include <sched.h>

#include <chrono>
#include <cstdint>
#include <fstream>
#include <optional>
#include <sstream>
#include <string>
#include <thread>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/types.h>

namespace mp::test {

/// The state letter of process `pid` (/proc/PID/stat): 'R' runnable, 'S' asleep, ...
inline char proc_state(pid_t pid) {
    std::ifstream f("/proc/" + std::to_string(pid) + "/stat");
    std::string line;
    std::getline(f, line);
    const auto paren = line.rfind(')');
    return paren == std::string::npos || paren + 2 >= line.size() ? '?' : line[paren + 2];
}

/// True when `pid` is blocked in a futex call (/proc/PID/syscall: number, arguments), on `word`
/// when it is given.
inline bool in_futex_on(pid_t pid, const void* word = nullptr) {
    std::ifstream f("/proc/" + std::to_string(pid) + "/syscall");
    long nr = -1;
    std::string arg0;
    if (!(f >> nr >> arg0) || nr != SYS_futex) return false;
    return word == nullptr || std::stoull(arg0, nullptr, 16) == reinterpret_cast<std::uintptr_t>(word);
}

/// The futex call `pid` (or a thread id) is blocked in: the word's address and the operation
/// (its second argument, FUTEX_PRIVATE_FLAG included); nullopt when it is not in a futex call.
struct FutexCall {
    std::uintptr_t word = 0;
    unsigned long op = 0;
};
inline std::optional<FutexCall> futex_call_of(pid_t pid) {
    std::ifstream f("/proc/" + std::to_string(pid) + "/syscall");
    long nr = -1;
    std::string arg0, arg1;
    if (!(f >> nr >> arg0 >> arg1) || nr != SYS_futex) return std::nullopt;
    return FutexCall{static_cast<std::uintptr_t>(std::stoull(arg0, nullptr, 16)),
                     std::stoul(arg1, nullptr, 16)};
}

/// Waits, at most `limit`, until `pid` sleeps in a futex call (on `word` when it is given): a
/// child that said it is ready has then reached the wait under test. False when it did not.
inline bool wait_asleep_in_futex(pid_t pid, std::chrono::milliseconds limit, const void* word = nullptr) {
    const auto until = std::chrono::steady_clock::now() + limit;
    while (!(in_futex_on(pid, word) && proc_state(pid) == 'S')) {
        if (std::chrono::steady_clock::now() > until) return false;
        std::this_thread::sleep_for(std::chrono::milliseconds(1));
    }
    return true;
}

/// Pins the calling process to `cpu` at SCHED_IDLE, so that once woken it does not preempt a
/// thread of normal priority pinned to the same CPU (tests that stage a lost wake-up). False
/// when it cannot.
inline bool pin_at_idle(int cpu) {
    cpu_set_t one;
    CPU_ZERO(&one);
    CPU_SET(cpu, &one);
    sched_param none{};
    return sched_setaffinity(0, sizeof one, &one) == 0 && sched_setscheduler(0, SCHED_IDLE, &none) == 0;
}

/// Gives the calling thread back, when it goes, the CPU affinity it had when it was made.
class RestoreAffinity {
public:
    RestoreAffinity() { ok_ = sched_getaffinity(0, sizeof saved_, &saved_) == 0; }
    ~RestoreAffinity() { (void)restore(); }
    RestoreAffinity(const RestoreAffinity&) = delete;
    RestoreAffinity& operator=(const RestoreAffinity&) = delete;
    /// False when the affinity could not be read, or set back.
    bool restore() const { return ok_ && sched_setaffinity(0, sizeof saved_, &saved_) == 0; }

private:
    cpu_set_t saved_;
    bool ok_ = false;
};

/// How many mappings of this process (/proc/self/maps) map the memfd `fd`; -1 when `fd` cannot
/// be examined.
inline int memfd_mappings(int fd) {
    struct stat st {};
    if (::fstat(fd, &st) != 0) return -1;
    std::ifstream f("/proc/self/maps");
    int n = 0;
    for (std::string line; std::getline(f, line);) {
        std::istringstream in(line);
        std::string range, perms, offset, dev, path;
        unsigned long long inode = 0;
        if (!(in >> range >> perms >> offset >> dev >> inode)) continue;
        std::getline(in >> std::ws, path);
        if (inode == st.st_ino && path.rfind("/memfd:", 0) == 0) ++n;
    }
    return n;
}

}  // namespace mp::test
