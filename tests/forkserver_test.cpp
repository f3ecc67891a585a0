// The forkserver start method: descriptors carried to the child, a server that was killed is
// replaced, starts from many threads at once, a forkserver child using forkserver itself, a
// daemon child that goes when its requester is SIGKILLed, and the server's spare child (forked
// ahead of the next request) killed, stopped, or left by a killed server.
#include <gtest/gtest.h>

#include <atomic>
#include <csignal>
#include <cstring>
#include <fcntl.h>
#include <poll.h>
#include <mutex>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <thread>
#include <unistd.h>

#include "helpers/leak_check.hpp"
#include "mp/process.hpp"
#include "process_impl.hpp"
#include "sys/fd.hpp"

using namespace std::chrono_literals;

namespace {

// A value that carries a descriptor, as Connection or a shared lock does.
struct WriteEnd {
    int fd = -1;
};

}  // namespace

template <>
struct mp::Codec<WriteEnd> {
    static void encode(Encoder& e, const WriteEnd& w) { e.put(e.attach_fd(w.fd)); }
    static WriteEnd decode(Decoder& d) { return WriteEnd{d.take_fd(d.get<std::uint32_t>())}; }
};

namespace {

const mp::ProcessOptions kForkserver{.start_method = mp::StartMethod::forkserver};

void write_message(WriteEnd w, std::string text) {
    mp::sys::write_full(w.fd, text.data(), text.size());
    ::close(w.fd);
}

std::string read_all(int fd) {
    std::string out;
    char buf[256];
    for (;;) {
        std::size_t n = mp::sys::read_full(fd, buf, sizeof buf);
        out.append(buf, n);
        if (n < sizeof buf) return out;
    }
}

void exit_with(int code) { ::_exit(code); }

void sleep_forever() {
    for (;;) ::pause();
}

}  // namespace

// What forkserver and spawn children share (both are given a transferable task and its
// descriptors, and nothing else of the parent) runs under both.
class ForkserverAndSpawn : public ::testing::TestWithParam<mp::StartMethod> {
protected:
    mp::ProcessOptions options() const { return {.start_method = GetParam()}; }
};

INSTANTIATE_TEST_SUITE_P(StartMethods, ForkserverAndSpawn,
                         ::testing::Values(mp::StartMethod::forkserver, mp::StartMethod::spawn),
                         [](const auto& p) { return mp::to_string(p.param); });

TEST_P(ForkserverAndSpawn, DescriptorsTravelWithTheArguments) {
    auto [r, w] = mp::sys::make_pipe();
    mp::Process p(options(), write_message, WriteEnd{w.get()}, std::string("through the server"));
    p.start();
    w.reset();  // the child has its own copy now; EOF comes when it closes it
    ASSERT_TRUE(p.join(10s));
    EXPECT_EQ(p.exitcode(), 0);
    EXPECT_EQ(read_all(r.get()), "through the server");
}

TEST_P(ForkserverAndSpawn, ChildHoldsNoDescriptorOfTheParent) {
    // A pipe the parent keeps open must not be held by the server or its children, or its
    // reader would never see EOF. Not close-on-exec here: spawn must close it itself.
    auto [r, low] = mp::sys::make_pipe();
    // Above the descriptors a spawn child's start reuses (3 and 4), and inheritable.
    mp::sys::Fd w(::fcntl(low.get(), F_DUPFD, 100));
    ASSERT_TRUE(w);
    low.reset();
    mp::Process p(options(), sleep_forever);
    p.start();
    w.reset();
    EXPECT_TRUE(mp::sys::wait_fd(r.get(), POLLIN, 5s));
    EXPECT_TRUE(p.is_alive()) << "end of file must come while the child still runs";
    char c;
    EXPECT_EQ(mp::sys::read_full(r.get(), &c, 1), 0u);
    p.terminate();
    p.join();
}

// As Python's children: stdin is /dev/null, not the parent's (the forkserver sets that up once
// for all its children, a spawn child for itself). The server is started while the parent's
// stdin is a pipe holding data.
void report_stdin(WriteEnd w) {
    char buf[64];
    const ssize_t n = ::read(0, buf, sizeof buf);
    const std::string text = n < 0 ? "error" : std::to_string(n) + " bytes";
    mp::sys::write_full(w.fd, text.data(), text.size());
    ::close(w.fd);
}

TEST_P(ForkserverAndSpawn, ChildReadsEndOfFileFromStdin) {
    const pid_t old_server = mp::detail::forkserver::server_pid();
    if (GetParam() == mp::StartMethod::forkserver && old_server > 0) {
        ASSERT_EQ(::kill(old_server, SIGKILL), 0);
        ASSERT_TRUE(mp::test::wait_pid_stopped(old_server, 5000ms));
    }
    auto [in_r, in_w] = mp::sys::make_pipe();
    mp::sys::write_full(in_w.get(), "parent's input", 14);
    mp::sys::Fd saved(::fcntl(0, F_DUPFD_CLOEXEC, 10));
    ASSERT_TRUE(saved);
    ASSERT_EQ(::dup2(in_r.get(), 0), 0);
    auto [r, w] = mp::sys::make_pipe();
    mp::Process p(options(), report_stdin, WriteEnd{w.get()});
    p.start();
    ::dup2(saved.get(), 0);
    w.reset();
    ASSERT_TRUE(p.join(10s));
    EXPECT_EQ(p.exitcode(), 0);
    EXPECT_EQ(read_all(r.get()), "0 bytes");
}

TEST(Forkserver, KilledServerIsReplaced) {
    mp::detail::forkserver::ensure_running();
    pid_t server = mp::detail::forkserver::server_pid();
    ASSERT_GT(server, 0);
    ASSERT_EQ(::kill(server, SIGKILL), 0);
    ASSERT_TRUE(mp::test::wait_pid_stopped(server, 5000ms));
    mp::Process p(kForkserver, exit_with, 5);
    p.start();
    ASSERT_TRUE(p.join(10s));
    EXPECT_EQ(p.exitcode(), 5);
    EXPECT_NE(mp::detail::forkserver::server_pid(), server);
}

// The server's spare: the child it forked ahead of the next request ("mp-fs-spare"), found by
// its parent and name; 0 when none shows within 5 s.
pid_t find_spare(pid_t server) {
    const auto deadline = std::chrono::steady_clock::now() + 5s;
    do {
        for (const auto& c : mp::test::list_children(server))
            if (c.comm == "mp-fs-spare" && c.state != 'Z') return c.pid;
        std::this_thread::sleep_for(5ms);
    } while (std::chrono::steady_clock::now() < deadline);
    return 0;
}

TEST(ForkserverSpare, TheNextChildIsForkedAheadOfItsRequest) {
    mp::detail::forkserver::ensure_running();
    const pid_t server = mp::detail::forkserver::server_pid();
    const pid_t spare = find_spare(server);
    ASSERT_GT(spare, 0) << "the server keeps a spare child";
    mp::Process p(kForkserver, exit_with, 4);
    p.start();
    EXPECT_EQ(p.pid(), spare) << "the request is handed to the spare";
    ASSERT_TRUE(p.join(10s));
    EXPECT_EQ(p.exitcode(), 4);
    const pid_t next = find_spare(server);
    EXPECT_GT(next, 0) << "a new spare is forked after the hand-out";
    EXPECT_NE(next, spare);
}

TEST(ForkserverSpare, AKilledSpareIsReapedAndTheNextStartForks) {
    mp::detail::forkserver::ensure_running();
    const pid_t server = mp::detail::forkserver::server_pid();
    const pid_t spare = find_spare(server);
    ASSERT_GT(spare, 0);
    ASSERT_EQ(::kill(spare, SIGKILL), 0);
    // Reaped, not only dead: no zombie is left in the server's table until the next request.
    const auto deadline = std::chrono::steady_clock::now() + 5s;
    while (mp::test::proc_info(spare).pid != 0 && std::chrono::steady_clock::now() < deadline)
        std::this_thread::sleep_for(5ms);
    EXPECT_EQ(mp::test::proc_info(spare).pid, 0) << "the server reaps its dead spare at once";
    for (int i = 0; i < 3; ++i) {
        mp::Process p(kForkserver, exit_with, 7 + i);
        p.start();
        ASSERT_TRUE(p.join(10s));
        EXPECT_EQ(p.exitcode(), 7 + i);
    }
    EXPECT_EQ(mp::detail::forkserver::server_pid(), server) << "the same server served them";
}

TEST(ForkserverSpare, ASpareKilledJustBeforeARequestIsReplacedByAFreshFork) {
    // The SIGKILL lands while the request is on its way (the server has not seen the spare die):
    // the start must still run the target, in a fresh fork, not report the dead spare as a
    // child that died before it ran.
    mp::detail::forkserver::ensure_running();
    const pid_t server = mp::detail::forkserver::server_pid();
    for (int i = 0; i < 10; ++i) {
        const pid_t spare = find_spare(server);
        ASSERT_GT(spare, 0);
        ASSERT_EQ(::kill(spare, SIGKILL), 0);
        mp::Process p(kForkserver, exit_with, 20 + i);
        p.start();
        ASSERT_TRUE(p.join(10s));
        EXPECT_EQ(p.exitcode(), 20 + i);
    }
}

TEST(ForkserverSpare, AStoppedSpareIsUsedOnceItContinues) {
    // A spare stopped by someone does not acknowledge its hand-off; after a short wait the
    // server takes it all the same (the request is in its socket): the child runs as soon as it
    // is continued, as a stopped child would.
    mp::detail::forkserver::ensure_running();
    const pid_t spare = find_spare(mp::detail::forkserver::server_pid());
    ASSERT_GT(spare, 0);
    ASSERT_EQ(::kill(spare, SIGSTOP), 0);
    mp::Process p(kForkserver, exit_with, 9);
    p.start();
    EXPECT_FALSE(p.join(100ms));
    ASSERT_EQ(::kill(spare, SIGCONT), 0);
    ASSERT_TRUE(p.join(10s));
    EXPECT_EQ(p.exitcode(), 9);
}

TEST(ForkserverSpare, TheSpareGoesWithAKilledServer) {
    mp::detail::forkserver::ensure_running();
    const pid_t server = mp::detail::forkserver::server_pid();
    const pid_t spare = find_spare(server);
    ASSERT_GT(spare, 0);
    ASSERT_EQ(::kill(server, SIGKILL), 0);
    ASSERT_TRUE(mp::test::wait_pid_stopped(server, 5000ms));
    EXPECT_TRUE(mp::test::wait_pid_stopped(spare, 5000ms)) << "its socket closed: the spare ends";
    mp::Process p(kForkserver, exit_with, 3);
    p.start();
    ASSERT_TRUE(p.join(10s));
    EXPECT_EQ(p.exitcode(), 3);
}

// Takes a copy of the running server's end of its control socket (pidfd_getfd), as a child or
// spare it has just forked holds one for a moment, then kills the server: `control` is that
// copy, `server` the dead server's pid. Skips the test where pidfd_getfd is not permitted.
#define KILL_SERVER_HOLDING_ITS_SOCKET(server, control)                                          \
    mp::detail::forkserver::ensure_running();                                                    \
    const pid_t server = mp::detail::forkserver::server_pid();                                   \
    mp::sys::Fd control;                                                                         \
    {                                                                                            \
        mp::sys::Fd server_fd(static_cast<int>(::syscall(SYS_pidfd_open, server, 0)));           \
        ASSERT_TRUE(server_fd);                                                                  \
        control = mp::sys::Fd(static_cast<int>(::syscall(SYS_pidfd_getfd, server_fd.get(), 3, 0))); \
        if (!control && errno == EPERM) GTEST_SKIP() << "pidfd_getfd is not permitted here";    \
        ASSERT_TRUE(control) << std::strerror(errno);                                           \
        ASSERT_EQ(::kill(server, SIGKILL), 0);                                                   \
        ASSERT_TRUE(mp::test::wait_pid_stopped(server, 5000ms));                                 \
    }

TEST(Forkserver, ARequestLeftUnreadByAKilledServerGoesToANewServer) {
    // A process that holds the server's end of the control socket when the server is killed (a
    // child or spare it has just forked, before it closes its copy) makes the next request's
    // send succeed into a socket nobody will read. Here this test holds that copy (pidfd_getfd),
    // kills the server, and lets go of it 100 ms into the start: the request closes unread, and
    // the start must go to a new server rather than fail.
    KILL_SERVER_HOLDING_ITS_SOCKET(server, control);
    std::thread letting_go([&] {
        std::this_thread::sleep_for(100ms);
        control.reset();
    });
    mp::Process p(kForkserver, exit_with, 6);
    EXPECT_NO_THROW(p.start());
    letting_go.join();
    if (p.pid() != 0) {
        ASSERT_TRUE(p.join(10s));
        EXPECT_EQ(p.exitcode(), 6);
    }
    EXPECT_NE(mp::detail::forkserver::server_pid(), server);
}

TEST(Forkserver, EnsureRunningReplacesAKilledServerWhoseSocketAnotherProcessStillHolds) {
    // ensure_running() (a pool's constructor) looked only for a hang-up on the control socket,
    // which a child or spare the server had just forked still held for a moment: the dead server
    // was kept, and the leak check of the test below once found the client's socket to it open
    // (a server no longer running is no forkserver to the check). The pidfd says it has ended.
    KILL_SERVER_HOLDING_ITS_SOCKET(server, control);
    mp::detail::forkserver::ensure_running();  // while this test still holds the server's end
    EXPECT_NE(mp::detail::forkserver::server_pid(), server);
    control.reset();
    mp::Process p(kForkserver, exit_with, 4);
    p.start();
    ASSERT_TRUE(p.join(10s));
    EXPECT_EQ(p.exitcode(), 4);
}

TEST(Forkserver, StartsFromThreadsSurviveTheServerBeingReplacedUnderThem) {
    // Two threads start children while a third kills the server and starts a new one
    // (ensure_running), again and again. Each start holds on to the server it asked: one whose
    // server was replaced under it goes to the new one, or says the server went away
    // (ProcessError); it never sends on a descriptor that was closed (EBADF) or reused meanwhile
    // by another socket. Under TSan, reading the client's descriptor while another thread
    // replaces it is also a reported race.
    mp::detail::forkserver::ensure_running();
    std::atomic<bool> done{false};
    std::atomic<int> started{0}, went_away{0}, hung{0};
    std::mutex mu;
    std::vector<std::string> other_errors;
    auto starter = [&] {
        while (!done.load()) {
            try {
                mp::Process p(kForkserver, exit_with, 7);
                p.start();
                ++started;
                if (!p.join(10s)) ++hung;
            } catch (const mp::ProcessError&) {
                ++went_away;
            } catch (const std::exception& e) {
                std::lock_guard lock(mu);
                other_errors.emplace_back(e.what());
            }
        }
    };
    std::thread a(starter), b(starter);
    for (int round = 0; round < 12; ++round) {
        std::this_thread::sleep_for(15ms);
        const pid_t server = mp::detail::forkserver::server_pid();
        if (server > 0 && ::kill(server, SIGKILL) == 0) {
            EXPECT_TRUE(mp::test::wait_pid_stopped(server, 5000ms));
        }
        mp::detail::forkserver::ensure_running();
    }
    done = true;
    a.join();
    b.join();
    EXPECT_GT(started.load(), 0);
    EXPECT_EQ(hung.load(), 0);
    EXPECT_TRUE(other_errors.empty()) << other_errors.size() << " starts failed, the first with: " << other_errors.front();
    // A started child is joined above; the last server is still ours and running.
    EXPECT_GT(mp::detail::forkserver::server_pid(), 0);
}

TEST_P(ForkserverAndSpawn, ManyThreadsStartAtOnce) {
    std::vector<std::thread> threads;
    std::mutex mu;
    std::vector<int> codes;
    for (int t = 0; t < 4; ++t) {
        threads.emplace_back([&, t] {
            for (int i = 0; i < 10; ++i) {
                mp::Process p(options(), exit_with, t * 10 + i);
                p.start();
                p.join();
                std::lock_guard lock(mu);
                codes.push_back(*p.exitcode());
            }
        });
    }
    for (auto& th : threads) th.join();
    std::sort(codes.begin(), codes.end());
    ASSERT_EQ(codes.size(), 40u);
    for (int i = 0; i < 40; ++i) EXPECT_EQ(codes[i], i);
}

TEST_P(ForkserverAndSpawn, ChildOfAChildUsesTheSameMethod) {
    auto nested = +[](WriteEnd w, mp::StartMethod method) {
        mp::Process inner({.start_method = method}, write_message, w, std::string("grandchild ran"));
        inner.start();
        ::close(w.fd);
        inner.join();
        ::_exit(inner.exitcode() == 0 ? 0 : 1);
    };
    auto [r, w] = mp::sys::make_pipe();
    mp::Process p(options(), nested, WriteEnd{w.get()}, GetParam());
    p.start();
    w.reset();
    ASSERT_TRUE(p.join(10s));
    EXPECT_EQ(p.exitcode(), 0);
    EXPECT_EQ(read_all(r.get()), "grandchild ran");
}

TEST_P(ForkserverAndSpawn, DaemonGoesWhenItsRequesterIsKilled) {
    // A fork child asks for a daemon, reports the daemon's pid, and is SIGKILLed. forkserver: the
    // server sees the requester's status socket close and kills the daemon; spawn: the daemon's
    // parent-death signal fires.
    if (GetParam() == mp::StartMethod::forkserver) mp::detail::forkserver::ensure_running();
    const mp::StartMethod method = GetParam();
    auto [r, w] = mp::sys::make_pipe();
    pid_t requester = ::fork();
    if (requester == 0) {
        mp::Process d({.daemon = true, .start_method = method}, sleep_forever);
        d.start();
        pid_t pid = d.pid();
        mp::sys::write_full(w.get(), &pid, sizeof pid);
        for (;;) ::pause();
    }
    w.reset();
    pid_t daemon_pid = 0;
    ASSERT_TRUE(mp::sys::wait_fd(r.get(), POLLIN, 10s));
    ASSERT_EQ(mp::sys::read_full(r.get(), &daemon_pid, sizeof daemon_pid), sizeof daemon_pid);
    ASSERT_TRUE(mp::test::pid_running(daemon_pid));
    ::kill(requester, SIGKILL);
    ::waitpid(requester, nullptr, 0);
    EXPECT_TRUE(mp::test::wait_pid_stopped(daemon_pid, 5000ms));
}

void sleep_10s() { std::this_thread::sleep_for(10s); }

TEST(Forkserver, DaemonGoesWhenItsRequesterIsKilledWhileAForkChildOfItLives) {
    // As above, and the requester then starts a fork child that outlives it: the child must
    // not keep the requester's end of the daemon's status socket (ParentOnlyFd), or the server
    // would see no hang-up until the child ends.
    mp::detail::forkserver::ensure_running();
    auto [r, w] = mp::sys::make_pipe();
    pid_t requester = ::fork();
    if (requester == 0) {
        mp::Process d({.daemon = true, .start_method = mp::StartMethod::forkserver}, sleep_forever);
        d.start();
        mp::Process keeper({.start_method = mp::StartMethod::fork}, sleep_10s);
        keeper.start();
        const pid_t pids[2] = {d.pid(), keeper.pid()};
        mp::sys::write_full(w.get(), pids, sizeof pids);
        for (;;) ::pause();
    }
    w.reset();
    pid_t pids[2] = {0, 0};
    ASSERT_TRUE(mp::sys::wait_fd(r.get(), POLLIN, 10s));
    ASSERT_EQ(mp::sys::read_full(r.get(), pids, sizeof pids), sizeof pids);
    struct EndKeeper {
        pid_t pid;
        ~EndKeeper() { ::kill(pid, SIGKILL); }
    } end_keeper{pids[1]};
    ASSERT_TRUE(mp::test::pid_running(pids[0]));
    ASSERT_TRUE(mp::test::pid_running(pids[1]));
    ::kill(requester, SIGKILL);
    ::waitpid(requester, nullptr, 0);
    EXPECT_TRUE(mp::test::wait_pid_stopped(pids[0], 5000ms)) << "the daemon outlived its requester";
    EXPECT_TRUE(mp::test::pid_running(pids[1]));  // the fork child still runs: it was the test
}

int forkserver_child_exit_code(int code) {
    mp::Process p(kForkserver, exit_with, code);
    p.start();
    return p.join(10s) ? p.exitcode().value_or(-1) : -2;
}

TEST(Forkserver, AForkChildStartsForkserverChildrenOfItsOwn) {
    // The fork is made holding the list of ParentOnlyFd descriptors (a forkserver child of this
    // process keeps its status socket there); the fork child then lists its own children's.
    mp::Process mine(kForkserver, sleep_forever);
    mine.start();
    mp::Process child({.start_method = mp::StartMethod::fork},
                      [] { std::_Exit(forkserver_child_exit_code(5) == 5 && forkserver_child_exit_code(6) == 6 ? 0 : 1); });
    child.start();
    ASSERT_TRUE(child.join(20s));
    EXPECT_EQ(child.exitcode(), 0);
    mine.kill();
    ASSERT_TRUE(mine.join(10s));
}

TEST_P(ForkserverAndSpawn, NonTransferableTargetIsRefusedAtStart) {
    int captured = 3;
    mp::Process p(options(), [captured] { ::_exit(captured); });
    try {
        p.start();
        FAIL() << "start() should throw";
    } catch (const mp::ProcessError& e) {
        EXPECT_NE(std::string(e.what()).find("transferable"), std::string::npos) << e.what();
    }
}
