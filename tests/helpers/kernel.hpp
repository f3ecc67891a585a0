#pragma once
// What the running kernel can do, from its release (uname), for tests whose expectation depends
// on it: told independently of the code under test, so that such a test can still fail.

#include <cstdio>
#include <sys/utsname.h>

namespace mp_test {

// Whether the running kernel's release is at least major.minor.
inline bool kernel_at_least(int major, int minor) {
    utsname u{};
    if (::uname(&u) != 0) return false;
    int ma = 0, mi = 0;
    if (std::sscanf(u.release, "%d.%d", &ma, &mi) != 2) return false;
    return ma > major || (ma == major && mi >= minor);
}

// Linux 6.15 keeps a process's exit status for its pidfds after anyone reaps it
// (PIDFD_INFO_EXIT): mp then still knows how a child ended that someone else reaped.
inline bool kernel_keeps_exit_status() { return kernel_at_least(6, 15); }

}  // namespace mp_test
