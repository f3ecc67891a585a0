#pragma once
// What the running kernel can do, from its release (uname), for tests whose expectation depends
// on it: told independently of the code under test, so that such a test can still fail.

#include <csignal>
#include <cstdio>
#include <fcntl.h>
#include <sys/utsname.h>
#include <unistd.h>

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

// While it lives, the kernel reaps this process's children itself as they end: SIGCHLD ignored,
// or (nocldwait) SA_NOCLDWAIT, as programs that want no zombies set. The old action comes back.
class ChildrenReapedByKernel {
public:
    explicit ChildrenReapedByKernel(bool nocldwait = false) {
        struct sigaction act {};
        act.sa_handler = nocldwait ? SIG_DFL : SIG_IGN;
        act.sa_flags = nocldwait ? SA_NOCLDWAIT : 0;
        ::sigaction(SIGCHLD, &act, &old_);
    }
    ~ChildrenReapedByKernel() { ::sigaction(SIGCHLD, &old_, nullptr); }
    ChildrenReapedByKernel(const ChildrenReapedByKernel&) = delete;
    ChildrenReapedByKernel& operator=(const ChildrenReapedByKernel&) = delete;

private:
    struct sigaction old_ {};
};

// A forked child that ends as `how` says (an exit code, or minus a signal) once released(), so
// that its pidfd can be opened before it can end. Not reaped here.
class HeldChild {
public:
    explicit HeldChild(int how) {
        int go[2];
        if (::pipe2(go, O_CLOEXEC) != 0) return;
        pid_ = ::fork();
        if (pid_ == 0) {
            ::close(go[1]);
            char c;
            (void)::read(go[0], &c, 1);  // end of file: released
            if (how < 0) ::raise(-how);
            ::_exit(how);
        }
        ::close(go[0]);
        release_ = go[1];
    }
    ~HeldChild() { release(); }
    HeldChild(const HeldChild&) = delete;
    HeldChild& operator=(const HeldChild&) = delete;
    pid_t pid() const { return pid_; }  // <= 0 when it could not be made
    void release() {
        if (release_ >= 0) ::close(release_);
        release_ = -1;
    }

private:
    pid_t pid_ = -1;
    int release_ = -1;
};

}  // namespace mp_test
