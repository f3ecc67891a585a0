// What mp does when a child's exit status is lost, as on every kernel before Linux 6.15 (Debian
// 12's is 6.1): a child reaped by someone else (SIGCHLD ignored, SA_NOCLDWAIT, a waitpid(-1)
// elsewhere) leaves no status to read. Newer kernels keep it for the child's pidfd
// (PIDFD_INFO_EXIT), which this binary takes away: before main, a seccomp filter makes the
// PIDFD_GET_INFO ioctl fail with ENOTTY, as an older kernel does, in this process and every
// child it starts (the forkserver included: filters survive fork and exec). ctest runs each TEST
// in a process of its own, each with the filter.

#include <gtest/gtest.h>

#include <arpa/inet.h>
#include <fcntl.h>
#include <linux/audit.h>
#include <linux/filter.h>
#include <linux/seccomp.h>
#include <netinet/in.h>
#include <sys/ioctl.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <csignal>
#include <cstddef>
#include <cstdint>
#include <chrono>
#include <string>
#include <thread>

#include "helpers/kernel.hpp"
#include "mp/futures.hpp"
#include "mp/process.hpp"
#include "mp/socketserver.hpp"
#include "sys/fd.hpp"
#include "sys/pidfd.hpp"

namespace {

// PIDFD_GET_INFO: _IOWR(0xFF, 11, struct pidfd_info of 64 bytes), as in <linux/pidfd.h>.
constexpr std::uint32_t kPidfdGetInfo = 0xC040FF0BU;

#if defined(__x86_64__)
constexpr std::uint32_t kArch = AUDIT_ARCH_X86_64;
#elif defined(__aarch64__)
constexpr std::uint32_t kArch = AUDIT_ARCH_AARCH64;
#else
#error "old_kernel_status_test: name this architecture's AUDIT_ARCH_ value"
#endif

// Installed during static initialisation: before main, before mp starts anything.
const bool g_filtered = [] {
    sock_filter code[] = {
        BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(seccomp_data, arch)),
        BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, kArch, 1, 0),
        BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ALLOW),
        BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(seccomp_data, nr)),
        BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, SYS_ioctl, 0, 3),
        BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(seccomp_data, args[1])),  // its low half
        BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, kPidfdGetInfo, 0, 1),
        BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ERRNO | (ENOTTY & SECCOMP_RET_DATA)),
        BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ALLOW),
    };
    sock_fprog prog{static_cast<unsigned short>(sizeof code / sizeof code[0]), code};
    return ::prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) == 0 &&
           ::syscall(SYS_seccomp, SECCOMP_SET_MODE_FILTER, 0, &prog) == 0;
}();

using namespace std::chrono_literals;
constexpr auto kLong = 10s;  // every wait here is bounded

int square(int x) { return x * x; }
int exit_with(int code) { ::_exit(code); }

// The filter works: the status of a child reaped elsewhere is not to be had (on any kernel).
TEST(LostExitStatus, TheFilterHidesTheKernelsRecord) {
    ASSERT_TRUE(g_filtered);
    mp_test::HeldChild child(5);
    const pid_t pid = child.pid();
    ASSERT_GT(pid, 0);
    mp::sys::Fd fd = mp::sys::pidfd_open(pid);
    child.release();
    ASSERT_EQ(::waitpid(pid, nullptr, 0), pid);
    EXPECT_EQ(mp::sys::pidfd_exit_status(fd.get()), std::nullopt);
    EXPECT_THROW((void)mp::sys::pidfd_wait(fd.get(), false), std::system_error);
}

// join() says the status is lost; the child has ended all the same. The forkserver reaps its
// children itself (its SIGCHLD is the default), so its children's statuses are known.
TEST(LostExitStatus, JoinOfAChildTheKernelReapedSaysSo) {
    ASSERT_TRUE(g_filtered);
    mp_test::ChildrenReapedByKernel reaped;
    for (mp::StartMethod m : {mp::StartMethod::fork, mp::StartMethod::spawn, mp::StartMethod::forkserver}) {
        SCOPED_TRACE(mp::to_string(m));
        for (int i = 0; i < 5; ++i) {
            mp::Process p(mp::ProcessOptions{.start_method = m}, exit_with, 7);
            ASSERT_NO_THROW(p.start());
            if (m == mp::StartMethod::forkserver) {
                ASSERT_TRUE(p.join(kLong));
                EXPECT_EQ(p.exitcode(), 7);
            } else {
                EXPECT_THROW((void)p.join(kLong), mp::ProcessError);
                EXPECT_FALSE(p.is_alive());
                EXPECT_EQ(p.exitcode(), std::nullopt);
                EXPECT_NO_THROW(p.close());
            }
        }
        EXPECT_TRUE(mp::active_children().empty());
    }
}

// A pool worker whose end no one can tell: WorkerDied says so, with neither an exit code nor a
// signal (it said SIGKILL), and the pool goes on.
TEST(LostExitStatus, APoolWorkerThatEndedUnseenIsUnknownNotKilled) {
    ASSERT_TRUE(g_filtered);
    mp_test::ChildrenReapedByKernel reaped;
    for (mp::StartMethod m : {mp::StartMethod::fork, mp::StartMethod::spawn}) {
        SCOPED_TRACE(mp::to_string(m));
        mp::ProcessPoolExecutor ex({.max_workers = 1, .start_method = m});
        EXPECT_EQ(ex.submit(square, 3).result(kLong), 9);
        try {
            (void)ex.submit(exit_with, 3).result(kLong);
            ADD_FAILURE() << "the task did not fail";
        } catch (const mp::WorkerDied& e) {
            EXPECT_EQ(e.exit_code(), std::nullopt) << e.what();
            EXPECT_EQ(e.signal(), std::nullopt) << e.what();
            EXPECT_NE(std::string(e.what()).find("unknown"), std::string::npos) << e.what();
        }
        EXPECT_EQ(ex.submit(square, 4).result(kLong), 16);
    }
}

struct Echo : mp::StreamRequestHandler {
    void handle() override {
        for (std::string line = rfile.readline(); !line.empty(); line = rfile.readline()) wfile.write(line);
    }
};

// One connection to 127.0.0.1:port: sends `text`, shuts down its side, reads to the end.
std::string round_trip(std::uint16_t port, const std::string& text) {
    mp::sys::Fd s(::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0));
    sockaddr_in a{};
    a.sin_family = AF_INET;
    a.sin_port = htons(port);
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    timeval tv{10, 0};  // bounded: a server that stopped answering fails the test
    ::setsockopt(s.get(), SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    if (::connect(s.get(), reinterpret_cast<sockaddr*>(&a), sizeof a) != 0) return "(connect failed)";
    (void)::send(s.get(), text.data(), text.size(), MSG_NOSIGNAL);
    ::shutdown(s.get(), SHUT_WR);
    std::string got;
    char buf[256];
    ssize_t n;
    while ((n = ::recv(s.get(), buf, sizeof buf, 0)) > 0) got.append(buf, static_cast<std::size_t>(n));
    return got;
}

// A forking server in a program that ignores SIGCHLD (a common way to have no zombies): each
// handler child ends unseen, and the server, which joins them, must go on serving (Python's
// ForkingMixIn takes the ChildProcessError), not throw out of serve_forever.
TEST(LostExitStatus, AForkingServerGoesOnWhenItsChildrenEndUnseen) {
    ASSERT_TRUE(g_filtered);
    mp_test::ChildrenReapedByKernel reaped;
    mp::ForkingTCPServer srv({"127.0.0.1", 0}, mp::handler<Echo>());
    std::string failure;
    std::thread serving([&] {
        try {
            srv.serve_forever(std::chrono::milliseconds(50));
        } catch (const std::exception& e) {
            failure = e.what();
        }
    });
    for (int i = 0; i < 4; ++i) {
        const std::string text = "line " + std::to_string(i) + "\n";
        EXPECT_EQ(round_trip(srv.server_address().port, text), text);
        std::this_thread::sleep_for(std::chrono::milliseconds(100));  // the child ends meanwhile
    }
    srv.shutdown();
    serving.join();
    EXPECT_EQ(failure, "");
    EXPECT_NO_THROW(srv.server_close());
}

}  // namespace
