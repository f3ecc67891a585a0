// Tests of the one launcher (src/launch.hpp) through the public API: what every way of starting
// a child (Process, Pool, ProcessPoolExecutor; fork, forkserver and spawn) must do alike.
//
// The scenarios run in mp_test_child (a program of their own: they change the program's
// standard streams), whose stdout the test reads through a pipe. Every wait is bounded.

#include <fcntl.h>
#include <gtest/gtest.h>
#include <poll.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <string>
#include <vector>

#include "helpers/lines.hpp"
#include "helpers/program.hpp"

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
}

}  // namespace
