// The OS layer: the fd owner, EINTR-safe I/O, the error helpers, pidfds, the robust mutex.
#include <gtest/gtest.h>

#include <csignal>
#include <fcntl.h>
#include <poll.h>
#include <string>
#include <sys/socket.h>
#include <sys/wait.h>
#include <thread>
#include <unistd.h>

#include "helpers/kernel.hpp"
#include "helpers/leak_check.hpp"
#include "sys/error.hpp"
#include "sys/fd.hpp"
#include "sys/pidfd.hpp"
#include "sys/robust_mutex.hpp"

using namespace std::chrono_literals;
namespace sys = mp::sys;

namespace {

bool is_open(int fd) { return ::fcntl(fd, F_GETFD) != -1; }

std::string what_of(auto&& f) {
    try {
        f();
    } catch (const std::system_error& e) {
        return e.what();
    }
    return "(no exception)";
}

}  // namespace

TEST(SysFd, ClosesOnDestructionAndMoves) {
    int raw;
    {
        auto [r, w] = sys::make_pipe();
        raw = r.get();
        ASSERT_TRUE(is_open(raw));
        sys::Fd moved = std::move(r);
        EXPECT_FALSE(r);
        EXPECT_EQ(moved.get(), raw);
        sys::Fd other;
        other = std::move(moved);
        EXPECT_EQ(other.get(), raw);
    }
    EXPECT_FALSE(is_open(raw));
}

TEST(SysFd, ReleaseDoesNotClose) {
    auto [r, w] = sys::make_pipe();
    int raw = r.release();
    EXPECT_FALSE(r);
    EXPECT_TRUE(is_open(raw));
    ::close(raw);
}

TEST(SysFd, CloseOnExecByDefault) {
    auto [r, w] = sys::make_pipe();
    EXPECT_TRUE(::fcntl(r.get(), F_GETFD) & FD_CLOEXEC);
    EXPECT_TRUE(::fcntl(w.get(), F_GETFD) & FD_CLOEXEC);
    auto [a, b] = sys::make_socketpair(SOCK_STREAM);
    EXPECT_TRUE(::fcntl(a.get(), F_GETFD) & FD_CLOEXEC);
    sys::Fd d = a.dup();
    EXPECT_NE(d.get(), a.get());
    EXPECT_TRUE(::fcntl(d.get(), F_GETFD) & FD_CLOEXEC);
}

TEST(SysIo, FullReadAndWriteAcrossShortTransfers) {
    auto [a, b] = sys::make_socketpair(SOCK_STREAM);
    std::string big(4 << 20, 'x');
    for (std::size_t i = 0; i < big.size(); ++i) big[i] = static_cast<char>(i * 31);
    std::thread writer([&, fd = a.get()] { sys::write_full(fd, big.data(), big.size()); });
    std::string got(big.size(), '\0');
    EXPECT_EQ(sys::read_full(b.get(), got.data(), got.size()), big.size());
    writer.join();
    EXPECT_EQ(got, big);
}

TEST(SysIo, ReadFullStopsShortAtEof) {
    auto [r, w] = sys::make_pipe();
    sys::write_full(w.get(), "abc", 3);
    w.reset();
    char buf[8];
    EXPECT_EQ(sys::read_full(r.get(), buf, sizeof buf), 3u);
    EXPECT_EQ(sys::read_full(r.get(), buf, sizeof buf), 0u);
}

TEST(SysIo, RetriesAfterEintr) {
    // A handler without SA_RESTART makes the blocking read fail with EINTR; read_full must retry.
    struct sigaction sa {};
    sa.sa_handler = [](int) {};
    struct sigaction old {};
    ASSERT_EQ(::sigaction(SIGUSR1, &sa, &old), 0);
    auto [r, w] = sys::make_pipe();
    pthread_t reader_thread = ::pthread_self();
    std::thread poker([&, fd = w.get()] {
        for (int i = 0; i < 5; ++i) {
            std::this_thread::sleep_for(10ms);
            ::pthread_kill(reader_thread, SIGUSR1);
        }
        sys::write_full(fd, "done", 4);
    });
    char buf[4];
    EXPECT_EQ(sys::read_full(r.get(), buf, 4), 4u);
    poker.join();
    EXPECT_EQ(std::string(buf, 4), "done");
    ::sigaction(SIGUSR1, &old, nullptr);
}

TEST(SysIo, WriteToClosedSocketThrowsInsteadOfSigpipe) {
    auto [a, b] = sys::make_socketpair(SOCK_STREAM);
    b.reset();
    std::string w = what_of([&, fd = a.get()] { sys::write_full(fd, "x", 1); });
    EXPECT_NE(w.find("send"), std::string::npos) << w;
}

TEST(SysIo, WriteToClosedPipeThrowsWhenSigpipeIgnored) {
    auto old = ::signal(SIGPIPE, SIG_IGN);
    auto [r, w] = sys::make_pipe();
    r.reset();
    std::string msg = what_of([&, fd = w.get()] { sys::write_full(fd, "x", 1); });
    EXPECT_NE(msg.find("write"), std::string::npos) << msg;
    ::signal(SIGPIPE, old);
}

TEST(SysError, EachConventionNamesTheCall) {
    EXPECT_NE(what_of([] { sys::check(::close(-1), "close"); }).find("close"), std::string::npos);
    EXPECT_NE(what_of([] { sys::check_ret(EINVAL, "pthread_mutex_lock"); }).find("pthread_mutex_lock"),
              std::string::npos);
    EXPECT_NE(what_of([] { sys::check_neg(-ENOMEM, "futex"); }).find("futex"), std::string::npos);
    try {
        sys::check(::close(-1), "close");
        FAIL();
    } catch (const std::system_error& e) {
        EXPECT_EQ(e.code().value(), EBADF);
    }
}

TEST(SysWait, WaitFdTimesOutAndWakes) {
    auto [r, w] = sys::make_pipe();
    EXPECT_FALSE(sys::wait_fd(r.get(), POLLIN, 20ms));
    sys::write_full(w.get(), "x", 1);
    EXPECT_TRUE(sys::wait_fd(r.get(), POLLIN, 1s));
}

TEST(SysFds, PassDescriptorsOverSocket) {
    auto [a, b] = sys::make_socketpair(SOCK_SEQPACKET);
    auto [r, w] = sys::make_pipe();
    const int fds[1] = {w.get()};
    sys::send_fds(a.get(), "hi", 2, fds);
    w.reset();
    char buf[8];
    std::array<sys::Fd, 1> got;
    EXPECT_EQ(sys::recv_fds(b.get(), buf, sizeof buf, got), 2u);
    ASSERT_TRUE(got[0]);
    EXPECT_TRUE(::fcntl(got[0].get(), F_GETFD) & FD_CLOEXEC);
    sys::write_full(got[0].get(), "z", 1);
    char c;
    EXPECT_EQ(sys::read_full(r.get(), &c, 1), 1u);
    EXPECT_EQ(c, 'z');
}

TEST(SysPidfd, WaitReportsExitCodeAndSignal) {
    pid_t pid = ::fork();
    if (pid == 0) ::_exit(3);
    sys::Fd fd = sys::pidfd_open(pid);
    EXPECT_TRUE(sys::pidfd_wait_exit(fd.get(), 10s));
    EXPECT_EQ(sys::pidfd_wait(fd.get(), false), 3);

    pid = ::fork();
    if (pid == 0) {
        ::pause();
        ::_exit(0);
    }
    sys::Fd fd2 = sys::pidfd_open(pid);
    EXPECT_EQ(sys::pidfd_wait(fd2.get(), true), std::nullopt);
    EXPECT_FALSE(sys::pidfd_wait_exit(fd2.get(), 20ms));
    EXPECT_TRUE(sys::pidfd_send_signal(fd2.get(), SIGKILL));
    EXPECT_EQ(sys::pidfd_wait(fd2.get(), false), -SIGKILL);
    // The process is gone: signalling it again is reported, not thrown.
    EXPECT_FALSE(sys::pidfd_send_signal(fd2.get(), SIGTERM));
}

// A child reaped by someone else (here waitpid(); SIGCHLD ignored is the same to the kernel):
// from Linux 6.15 the kernel keeps its status for the pidfd that was open as it ended, and
// pidfd_wait's ECHILD turns into that status; before, there is none and ECHILD stays.
TEST(SysPidfd, AChildReapedElsewhereStillTellsHowItEnded) {
    const bool kept = mp_test::kernel_keeps_exit_status();
    for (int how : {5, -SIGTERM, -SIGKILL}) {
        SCOPED_TRACE(how);
        mp_test::HeldChild child(how);
        const pid_t pid = child.pid();
        ASSERT_GT(pid, 0);
        sys::Fd fd = sys::pidfd_open(pid);  // open before the child can end
        EXPECT_EQ(sys::pidfd_exit_status(fd.get()), std::nullopt);  // running: nothing yet
        child.release();
        int status = 0;
        ASSERT_EQ(::waitpid(pid, &status, 0), pid);
        if (kept) {
            EXPECT_EQ(sys::pidfd_exit_status(fd.get()), how);
            EXPECT_EQ(sys::pidfd_wait(fd.get(), false), how);
            EXPECT_EQ(sys::pidfd_wait(fd.get(), true), how);
        } else {
            EXPECT_EQ(sys::pidfd_exit_status(fd.get()), std::nullopt);
            EXPECT_THROW((void)sys::pidfd_wait(fd.get(), false), std::system_error);
        }
    }
}

TEST(SysPidfd, OpenOfMissingProcessNamesTheCall) {
    std::string w = what_of([] { sys::pidfd_open(0x3fffffff); });
    EXPECT_NE(w.find("pidfd_open"), std::string::npos) << w;
}

namespace {

// A robust mutex whose owner, a thread, ended holding it: the next locker gets EOWNERDEAD.
struct AbandonedMutex {
    pthread_mutex_t m;
    AbandonedMutex() {
        sys::init_robust_mutex(m);
        std::thread([this] { ::pthread_mutex_lock(&m); }).join();
    }
    ~AbandonedMutex() { ::pthread_mutex_destroy(&m); }
};

}  // namespace

TEST(SysRobustMutex, AThreadEndingHoldingItMakesTheNextLockerTheRepairer) {
    AbandonedMutex a;
    ASSERT_EQ(::pthread_mutex_lock(&a.m), EOWNERDEAD);
    ASSERT_EQ(::pthread_mutex_consistent(&a.m), 0);
    ASSERT_EQ(::pthread_mutex_unlock(&a.m), 0);
    EXPECT_EQ(::pthread_mutex_trylock(&a.m), 0);
    EXPECT_EQ(::pthread_mutex_unlock(&a.m), 0);
}
