#pragma once
// What a child process is doing, read from /proc: for tests that must act while a child sleeps
// in a particular wait.

#include <cstdint>
#include <fstream>
#include <sstream>
#include <string>
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
