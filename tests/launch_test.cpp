// Tests of the one launcher (src/launch.hpp) through the public API: what every way of starting
// a child (Process, Pool, ProcessPoolExecutor; fork, forkserver and spawn) must do alike.
//
// The scenarios run in mp_test_child (a program of their own: they change the program's
// standard streams), whose stdout the test reads through a pipe. Every wait is bounded.

#include <dirent.h>
#include <fcntl.h>
#include <gtest/gtest.h>
#include <poll.h>
#include <signal.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <chrono>
#include <string>
#include <string_view>
#include <system_error>
#include <thread>
#include <vector>

#include "helpers/leak_check.hpp"
#include "helpers/lines.hpp"
#include "helpers/program.hpp"
#include "mp/futures.hpp"
#include "mp/process.hpp"
#include "process_impl.hpp"

namespace {

using namespace std::chrono_literals;
using Clock = std::chrono::steady_clock;

constexpr auto kProgramLimit = 60s;

struct ProgramRun {
    bool finished = false;  // false: killed at the time limit
    int status = 0;
    std::string out;
};

/// Runs mp_test_child with `args`, its stdout a pipe read here until the program has ended,
/// stderr inherited. The program's own children may outlive it holding the pipe (the forkserver
/// does, briefly), so the end of the program, not end of file, ends the read.
ProgramRun run_program(std::vector<std::string> args, const char* program = MP_TEST_CHILD) {
    int p[2];
    if (::pipe2(p, O_CLOEXEC) != 0) throw std::runtime_error("pipe2 failed");
    pid_t pid = -1;
    try {
        pid = mp::test::spawn_test_child(std::move(args), [&](posix_spawn_file_actions_t& fa) {
            posix_spawn_file_actions_addopen(&fa, 0, "/dev/null", O_RDONLY, 0);
            posix_spawn_file_actions_adddup2(&fa, p[1], 1);
        }, program);
    } catch (...) {
        ::close(p[0]);
        ::close(p[1]);
        throw;
    }
    ::close(p[1]);
    ::fcntl(p[0], F_SETFL, O_NONBLOCK);
    ProgramRun run;
    auto drain = [&] {
        char buf[4096];
        ssize_t n;
        while ((n = ::read(p[0], buf, sizeof buf)) > 0) run.out.append(buf, static_cast<std::size_t>(n));
    };
    const auto deadline = Clock::now() + kProgramLimit;
    for (;;) {
        pollfd pfd{p[0], POLLIN, 0};
        (void)::poll(&pfd, 1, 20);
        drain();
        if (::waitpid(pid, &run.status, WNOHANG) == pid) {
            run.finished = true;
            break;
        }
        if (Clock::now() >= deadline) {
            ::kill(pid, SIGKILL);
            ::waitpid(pid, &run.status, 0);
            break;
        }
    }
    drain();  // what the program wrote just before it ended
    ::close(p[0]);
    return run;
}

using mp::test::count_of;

class UnflushedCout : public testing::TestWithParam<std::tuple<const char*, const char*>> {};

// A C++ stream not synced with stdio keeps its own buffer; a child that flushes it on the way
// out must not find the parent's unflushed line there (the pool used to flush C stdio only).
TEST_P(UnflushedCout, ParentLineAppearsOnce) {
    const auto [method, kind] = GetParam();
    const ProgramRun run = run_program({"cxx-unflushed", method, kind});
    ASSERT_TRUE(run.finished) << "the program did not end within the limit; output:\n" << run.out;
    EXPECT_TRUE(WIFEXITED(run.status) && WEXITSTATUS(run.status) == 0) << run.out;
    const std::string expected_result = std::string(kind) == "process" ? "result 0" : "result 21";
    EXPECT_EQ(count_of(run.out, expected_result), 1u) << run.out;
    EXPECT_EQ(count_of(run.out, "parent-line"), 1u) << run.out;
}

INSTANTIATE_TEST_SUITE_P(Launch, UnflushedCout,
                         testing::Combine(testing::Values("fork", "forkserver", "spawn"),
                                          testing::Values("process", "pool", "executor")),
                         [](const auto& p) {
                             return std::string(std::get<0>(p.param)) + "_" + std::get<1>(p.param);
                         });

class ThreadedParent : public testing::TestWithParam<const char*> {};

// A parent whose threads hold a std::mutex, the allocator and stdout's lock starts a pool, an
// executor and processes whose work takes all three. A child forked from a copy of that parent
// would wait for ever; the forkserver (first used here, after the threads started) and spawn
// children are fresh programs. fork is left out on purpose: it deadlocks (see process.hpp).
TEST_P(ThreadedParent, ChildrenTakeTheLocksItsThreadsHold) {
    const ProgramRun run = run_program({"threaded-parent", GetParam()});
    ASSERT_TRUE(run.finished) << "the program hung (killed at the limit); output:\n" << run.out;
    EXPECT_TRUE(WIFEXITED(run.status) && WEXITSTATUS(run.status) == 0) << run.out;
    EXPECT_EQ(count_of(run.out, "threaded-parent ok"), 1u) << run.out;
    for (int task : {1, 2, 3, 4, 5, 10, 11})
        EXPECT_EQ(count_of(run.out, "task " + std::to_string(task) + "\n"), 1u) << run.out;
}

INSTANTIATE_TEST_SUITE_P(Launch, ThreadedParent, testing::Values("forkserver", "spawn"),
                         [](const auto& p) { return std::string(p.param); });

// ---- spawn makes its child without copying this process's memory map (clone with CLONE_VM,
// then exec). A fork would have write-protected every private page of ours for copy-on-write,
// so that our next write to each one faults, and copied the page tables that map them (the
// cost that grows with the parent). Counted as this thread's minor faults, not timed.

constexpr std::size_t kPages = 4096;

void exit_zero() { ::_exit(0); }

// Our page faults while writing once more to `pages` written before, after `start` ran.
template <class Start>
long faults_rewriting_after(Start start) {
    const auto page = static_cast<std::size_t>(::sysconf(_SC_PAGESIZE));
    void* map = ::mmap(nullptr, kPages * page, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (map == MAP_FAILED) return -1;
    // One fault per page, not per huge page.
    (void)::madvise(map, kPages * page, MADV_NOHUGEPAGE);
    auto* bytes = static_cast<volatile char*>(map);
    for (std::size_t i = 0; i < kPages; ++i) bytes[i * page] = 1;
    start();
    rusage before{}, after{};
    ::getrusage(RUSAGE_THREAD, &before);
    for (std::size_t i = 0; i < kPages; ++i) bytes[i * page] = 2;
    ::getrusage(RUSAGE_THREAD, &after);
    ::munmap(map, kPages * page);
    return after.ru_minflt - before.ru_minflt;
}

long faults_after_a_start(mp::StartMethod method) {
    return faults_rewriting_after([method] {
        mp::Process child({.start_method = method}, exit_zero);
        child.start();
        ASSERT_TRUE(child.join(30s));
        EXPECT_EQ(child.exitcode(), 0);
    });
}

// The witness: a fork start leaves every page written before it to fault again.
TEST(LaunchMemory, AForkStartWriteProtectsTheParentsPages) {
    EXPECT_GE(faults_after_a_start(mp::StartMethod::fork), static_cast<long>(kPages));
}

TEST(LaunchMemory, ASpawnStartLeavesTheParentsPagesAlone) {
    EXPECT_LT(faults_after_a_start(mp::StartMethod::spawn), static_cast<long>(kPages / 8));
}

// The forkserver is started by spawn, detached (a middle child that exits at once).
TEST(LaunchMemory, StartingTheForkserverLeavesTheParentsPagesAlone) {
    const pid_t old = mp::detail::forkserver::server_pid();
    if (old > 0) {
        ASSERT_EQ(::kill(old, SIGKILL), 0);
        ASSERT_TRUE(mp::test::wait_pid_stopped(old, 5000ms));
    }
    const long faults = faults_rewriting_after([] { mp::detail::forkserver::ensure_running(); });
    const pid_t server = mp::detail::forkserver::server_pid();
    EXPECT_GT(server, 0);
    EXPECT_NE(server, old);
    EXPECT_LT(faults, static_cast<long>(kPages / 8));
}

// A spawn child that cannot execute the program leaves the kernel's errno in our memory (the
// clone child shares it): start() throws std::system_error "execve (spawn)" with that errno and
// leaves no child behind. execve refuses one environment string over 32 pages with E2BIG.
TEST(Launch, SpawnThatCannotExecThrowsItsErrno) {
    const std::string big(200 * 1024, 'x');
    {
        ASSERT_EQ(::setenv("MP_TEST_TOO_LONG", big.c_str(), 1), 0);
        // Gone again however this block ends (another exception would otherwise leave every
        // later spawn in this binary unable to exec).
        struct Unset {
            ~Unset() { ::unsetenv("MP_TEST_TOO_LONG"); }
        } unset;
        mp::Process child({.start_method = mp::StartMethod::spawn}, exit_zero);
        try {
            child.start();
            ADD_FAILURE() << "a spawn start with an environment execve refuses did not throw";
        } catch (const std::system_error& e) {
            EXPECT_EQ(e.code().value(), E2BIG) << e.what();
            EXPECT_NE(std::string(e.what()).find("execve (spawn)"), std::string::npos) << e.what();
        }
    }
    ASSERT_EQ(::getenv("MP_TEST_TOO_LONG"), nullptr);
    // The same Process could not start; a new one does, now that execve can run.
    mp::Process next({.start_method = mp::StartMethod::spawn}, exit_zero);
    next.start();
    ASSERT_TRUE(next.join(30s));
    EXPECT_EQ(next.exitcode(), 0);
}

// A program linked without -Wl,--wrap=main would have a spawn child run its main: a second copy
// of the program. Starting one is refused instead, with the option named; the forkserver, which
// spawn would start, is forked from the program instead.
TEST(Launch, SpawnNeedsTheLinkHook) {
    const ProgramRun run = run_program({"spawn-without-hook"}, MP_TEST_NOHOOK);
    ASSERT_TRUE(run.finished) << run.out;
    EXPECT_TRUE(WIFEXITED(run.status) && WEXITSTATUS(run.status) == 0) << run.out;
    // spawn is refused, naming the link option, before anything starts.
    EXPECT_EQ(count_of(run.out, "refused spawn: mp: the spawn start method"), 1u) << run.out;
    EXPECT_EQ(count_of(run.out, "refused set spawn: mp: the spawn start method"), 1u) << run.out;
    EXPECT_EQ(count_of(run.out, "-Wl,--wrap=main"), 2u) << run.out;
    EXPECT_EQ(count_of(run.out, "started spawn"), 0u) << run.out;
    // The forkserver cannot be exec'd there, so it is forked from the program instead: it works.
    EXPECT_EQ(count_of(run.out, "started forkserver, exit code 0\n"), 1u) << run.out;
    EXPECT_EQ(count_of(run.out, "set forkserver\n"), 1u) << run.out;
    // The forked server runs set_forkserver_preload's functions too; contexts offer no spawn.
    EXPECT_EQ(count_of(run.out, "preloaded forkserver child, exit code 0\n"), 1u) << run.out;
    EXPECT_EQ(count_of(run.out, "2 start methods\n"), 1u) << run.out;
    EXPECT_EQ(count_of(run.out, "refused context spawn\n"), 1u) << run.out;
}

// ---- ParentOnlyFd: the ends of a socketpair that one thread makes and closes while another
// starts fork children are in no child, not even for the moment between the socketpair and its
// listing, or between the unlisting and the close (the window a forkserver start's status
// socket and a pool's worker socket had).

// The sockets this process has open (readlink of /proc/self/fd/N starts with "socket:").
int sockets_open() {
    DIR* dir = ::opendir("/proc/self/fd");
    if (dir == nullptr) return -1;
    int n = 0;
    char target[64];
    while (const dirent* e = ::readdir(dir)) {
        const std::string link = std::string("/proc/self/fd/") + e->d_name;
        const ssize_t len = ::readlink(link.c_str(), target, sizeof target - 1);
        if (len > 0 && std::string_view(target, static_cast<std::size_t>(len)).starts_with("socket:")) ++n;
    }
    ::closedir(dir);
    return n;
}

void exit_with_sockets_open() { ::_exit(std::min(sockets_open(), 100)); }

int sockets_in_a_fork_child() {
    mp::Process child({.start_method = mp::StartMethod::fork}, exit_with_sockets_open);
    child.start();
    if (!child.join(30s)) return -1;
    return child.exitcode().value_or(-1);
}

// Starts `children` fork children one by one while `meanwhile(stop)` runs in another thread
// until `stop` is set: how many of them had a socket more (or fewer) than one started before.
template <class Meanwhile>
int children_with_other_sockets(int children, Meanwhile meanwhile) {
    const int before = sockets_in_a_fork_child();
    if (before < 0) return -1;
    std::atomic<bool> stop{false};
    std::thread other([&] { meanwhile(stop); });
    int differ = 0;
    for (int i = 0; i < children; ++i)
        if (sockets_in_a_fork_child() != before) ++differ;
    stop = true;
    other.join();
    return differ;
}

TEST(ParentOnlyFd, NoForkChildKeepsASocketpairMadeOrClosedMeanwhile) {
    std::atomic<long> pairs{0};
    constexpr int kChildren = 300;
    const int kept = children_with_other_sockets(kChildren, [&](const std::atomic<bool>& stop) {
        while (!stop.load()) {
            auto both = mp::detail::parent_only_socketpair(SOCK_STREAM);
            pairs.fetch_add(1);
        }
    });
    EXPECT_GT(pairs.load(), kChildren);  // the maker ran all along
    EXPECT_EQ(kept, 0) << "of " << kChildren << " fork children";
}

int square(int x) { return x * x; }

TEST(ParentOnlyFd, NoForkChildKeepsASocketOfAPoolStartedMeanwhile) {
    // Another thread starts fork pools (each worker's socketpair: the pool's end, and the
    // worker's end that only that worker keeps) while this one starts fork children.
    std::atomic<int> pools{0};
    constexpr int kChildren = 200;
    const int kept = children_with_other_sockets(kChildren, [&](const std::atomic<bool>& stop) {
        try {
            while (!stop.load()) {
                mp::ProcessPoolExecutor ex({.max_workers = 2, .start_method = mp::StartMethod::fork});
                if (ex.submit(square, 3).result(30s) != 9) break;
                pools.fetch_add(1);
            }
        } catch (const std::exception&) {
            // pools stays short: the EXPECT below says so (under TSan a fork worker of a
            // threaded parent cannot start its threads)
        }
    });
    EXPECT_GT(pools.load(), 0);
    EXPECT_EQ(kept, 0) << "of " << kChildren << " fork children (" << pools.load() << " pools started meanwhile)";
}

}  // namespace
