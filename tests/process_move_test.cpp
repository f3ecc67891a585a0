// Tests of moving mp::Process (issue 13 item 4): a moved Process keeps its child, its place in
// active_children() and the exit-time join; std::vector<mp::Process> works through reallocation;
// a moved-from Process throws ProcessError from every member; move assignment refuses to drop a
// running child; a move that slices a subclass refuses to start.
//
// ctest runs every TEST in a process of its own, and the shared main (helpers/test_main.cpp) fails
// a test that leaves a child, an fd or a /dev/shm entry behind. Every wait is bounded (kLong).
// Fork children report through pipes; forkserver children (which inherit no fds) wait for files.

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <csignal>
#include <cstdio>
#include <cstdlib>
#include <dirent.h>
#include <fcntl.h>
#include <fstream>
#include <gtest/gtest.h>

#include "helpers/temp_dir.hpp"
#include <optional>
#include <poll.h>
#include <set>
#include <sstream>
#include <stdexcept>
#include <string>
#include <thread>
#include <unistd.h>
#include <utility>
#include <vector>

#include "helpers/process_helpers.hpp"
#include "mp/process.hpp"

namespace {

// ---------------------------------------------------------------------------------------------
// Helpers (the rest are in helpers/process_helpers.hpp)
// ---------------------------------------------------------------------------------------------

/// Child side of a Gate: waits (at most 10 s) for one byte; exits with `code` once through, 99
/// when the gate never opened.
[[noreturn]] void pass_gate_and_exit(int fd, int code) {
    if (poll_readable(fd, 10s)) {
        char c = 0;
        if (::read(fd, &c, 1) == 1) ::_exit(code);
    }
    ::_exit(99);
}

std::set<pid_t> active_pids() {
    std::set<pid_t> pids;
    for (const auto& c : mp::active_children()) pids.insert(c.pid());
    return pids;
}

// Forkserver target: waits (at most 10 s) for the file `path`, then exits with `code` (99 when
// the file never came).
void fs_wait_for_file_then_exit(std::string path, int code) {
    const auto deadline = Clock::now() + 10s;
    while (::access(path.c_str(), F_OK) != 0) {
        if (Clock::now() >= deadline) ::_exit(99);
        std::this_thread::sleep_for(2ms);
    }
    ::_exit(code);
}

void fs_exit_with(int code) { ::_exit(code); }

class MessageProcess : public mp::Process {
public:
    MessageProcess(int w, std::string msg) : w_(w), msg_(std::move(msg)) {}

protected:
    void run() override { write_str(w_, msg_ + "\n"); }

private:
    int w_;
    std::string msg_;
};

// ---------------------------------------------------------------------------------------------
// std::vector<mp::Process>
// ---------------------------------------------------------------------------------------------

TEST(ProcessMove, VectorOfRunningProcessesSurvivesReallocation) {
    Gate gate;
    std::vector<mp::Process> procs;
    std::vector<pid_t> pids;
    int reallocations = 0;
    constexpr int kChildren = 12;
    for (int i = 0; i < kChildren; ++i) {
        const mp::Process* before = procs.data();
        procs.emplace_back([r = gate.reader(), i] { pass_gate_and_exit(r, 10 + i); });
        if (i > 0 && procs.data() != before) ++reallocations;
        // Started at once, so the later emplace_backs move running children.
        procs.back().start();
        pids.push_back(procs.back().pid());
    }
    ASSERT_GT(reallocations, 0) << "the test must move running Processes";
    EXPECT_EQ(active_pids(), std::set<pid_t>(pids.begin(), pids.end()));
    for (int i = 0; i < kChildren; ++i) {
        const auto& p = procs[static_cast<std::size_t>(i)];
        EXPECT_EQ(p.pid(), pids[static_cast<std::size_t>(i)]);
        EXPECT_EQ(p.name().rfind("Process-", 0), 0u) << p.name();
    }
    gate.open(kChildren);
    for (int i = 0; i < kChildren; ++i) {
        auto& p = procs[static_cast<std::size_t>(i)];
        ASSERT_TRUE(p.join(kLong));
        EXPECT_EQ(p.exitcode(), 10 + i) << "each moved Process still sees its own child's end";
    }
    EXPECT_TRUE(mp::active_children().empty());
}

TEST(ProcessMove, VectorOfUnstartedProcessesStartsAfterReallocation) {
    TestPipe out;
    std::vector<mp::Process> procs;
    for (int i = 0; i < 9; ++i)
        procs.emplace_back([w = out.w.get(), i] { write_str(w, std::to_string(i) + "\n"); });
    for (auto& p : procs) p.start();
    for (auto& p : procs) {
        ASSERT_TRUE(p.join(kLong));
        EXPECT_EQ(p.exitcode(), 0);
    }
    std::string text;
    char buf[256];
    while (poll_readable(out.r.get(), 0ms)) {
        ssize_t n = ::read(out.r.get(), buf, sizeof buf);
        if (n <= 0) break;
        text.append(buf, static_cast<std::size_t>(n));
    }
    std::multiset<std::string> lines;
    std::istringstream in(text);
    for (std::string l; std::getline(in, l);) lines.insert(l);
    EXPECT_EQ(lines, (std::multiset<std::string>{"0", "1", "2", "3", "4", "5", "6", "7", "8"}))
        << "each moved Process runs its own target once";
}

TEST(ProcessMove, VectorOfSubclassObjectsRunsTheirOwnRun) {
    TestPipe out;
    std::vector<MessageProcess> procs;
    for (int i = 0; i < 5; ++i) procs.emplace_back(out.w.get(), "reporter " + std::to_string(i));
    for (auto& p : procs) p.start();
    std::multiset<std::string> lines;
    for (auto& p : procs) {
        ASSERT_TRUE(p.join(kLong));
        EXPECT_EQ(p.exitcode(), 0);
    }
    std::string text;
    char buf[256];
    while (poll_readable(out.r.get(), 0ms)) {
        ssize_t n = ::read(out.r.get(), buf, sizeof buf);
        if (n <= 0) break;
        text.append(buf, static_cast<std::size_t>(n));
    }
    std::istringstream in(text);
    for (std::string l; std::getline(in, l);) lines.insert(l);
    EXPECT_EQ(lines.size(), 5u) << text;
    EXPECT_EQ(lines.count("reporter 4"), 1u) << text;
}

// ---------------------------------------------------------------------------------------------
// Moving a running Process
// ---------------------------------------------------------------------------------------------

TEST(ProcessMove, MoveConstructionWhileRunningHandsOverTheChild) {
    Gate gate;
    std::optional<mp::Process> to;
    pid_t pid = 0;
    int sentinel = -1;
    std::string name;
    {
        mp::Process from([r = gate.reader()] { pass_gate_and_exit(r, 7); });
        from.start();
        pid = from.pid();
        sentinel = from.sentinel();
        name = from.name();
        to.emplace(std::move(from));
        // `from` is destroyed here: a moved-from Process neither joins nor signals the child.
    }
    ASSERT_TRUE(to->is_alive()) << "destroying the moved-from Process ended the child";
    EXPECT_EQ(to->pid(), pid);
    EXPECT_EQ(to->sentinel(), sentinel);
    EXPECT_EQ(to->name(), name);
    EXPECT_EQ(active_pids(), std::set<pid_t>{pid});
    EXPECT_FALSE(to->join(10ms));
    gate.open();
    ASSERT_TRUE(to->join(kLong));
    EXPECT_EQ(to->exitcode(), 7);
    EXPECT_TRUE(mp::active_children().empty());
}

TEST(ProcessMove, MovedToProcessSignalsAndItsDestructorJoins) {
    Gate gate;
    std::optional<mp::Process> to;
    {
        mp::Process from([] {
            const auto deadline = Clock::now() + 60s;
            while (Clock::now() < deadline) std::this_thread::sleep_for(10ms);
        });
        from.start();
        to.emplace(std::move(from));
    }
    to->terminate();
    ASSERT_TRUE(to->join(kLong));
    EXPECT_EQ(to->exitcode(), -SIGTERM);

    // The destructor policy moves with the child: the Process that owns it now joins it.
    auto second = std::make_unique<mp::Process>([r = gate.reader()] { pass_gate_and_exit(r, 0); });
    second->start();
    const pid_t pid = second->pid();
    mp::Process owner(std::move(*second));
    second.reset();
    EXPECT_TRUE(mp::test::pid_running(pid)) << "the moved-from destructor ended the child";
    gate.open();
    {
        mp::Process last(std::move(owner));
    }  // joins
    EXPECT_FALSE(mp::test::pid_exists(pid)) << "the destructor of the owning Process did not reap";
}

TEST(ProcessMove, SwapOfTwoRunningProcesses) {
    Gate gate;
    mp::Process a([r = gate.reader()] { pass_gate_and_exit(r, 1); });
    mp::Process b([r = gate.reader()] { pass_gate_and_exit(r, 2); });
    a.start();
    b.start();
    const pid_t pa = a.pid(), pb = b.pid();
    std::swap(a, b);
    EXPECT_EQ(a.pid(), pb);
    EXPECT_EQ(b.pid(), pa);
    EXPECT_EQ(active_pids(), (std::set<pid_t>{pa, pb}));
    gate.open(2);
    ASSERT_TRUE(a.join(kLong));
    ASSERT_TRUE(b.join(kLong));
    EXPECT_EQ(a.exitcode(), 2);
    EXPECT_EQ(b.exitcode(), 1);
}

TEST(ProcessMove, ActiveChildrenViewsSeeTheSameChildAsTheMovedProcess) {
    mp::Process from([] {
        const auto deadline = Clock::now() + 60s;
        while (Clock::now() < deadline) std::this_thread::sleep_for(10ms);
    });
    from.start();
    auto kids = mp::active_children();
    ASSERT_EQ(kids.size(), 1u);
    std::vector<mp::Process> holder;
    holder.push_back(std::move(from));
    holder.emplace_back([] {});  // reallocates: the Process moves again
    kids[0].kill();
    ASSERT_TRUE(kids[0].join(kLong));
    EXPECT_EQ(holder[0].exitcode(), -SIGKILL) << "the view and the moved Process share one state";
    EXPECT_FALSE(holder[0].is_alive());
    EXPECT_TRUE(mp::active_children().empty());
}

TEST(ProcessMove, ExitOfTheParentJoinsAMovedChild) {
    // The exit-time join of non-daemon children (here the one a child runs when its target
    // returns) finds a child whose Process was moved: the moved-from local cannot hold it.
    TempDir dir;
    const std::string marker = dir.file("grandchild");
    mp::Process p([marker] {
        mp::Process local([marker] {
            std::this_thread::sleep_for(100ms);
            std::ofstream(marker + ".tmp") << "finished";
            ::rename((marker + ".tmp").c_str(), marker.c_str());
        });
        local.start();
        // Leaked on purpose: no destructor may join it, only the exit path.
        new mp::Process(std::move(local));
    });
    p.start();
    ASSERT_TRUE(p.join(kLong));
    EXPECT_EQ(p.exitcode(), 0);
    EXPECT_EQ(slurp(marker), "finished") << "the child ended before its moved child finished";
}

// ---------------------------------------------------------------------------------------------
// Move assignment
// ---------------------------------------------------------------------------------------------

TEST(ProcessMove, AssignOverARunningChildThrowsAndChangesNothing) {
    Gate gate;
    TestPipe out;
    mp::ProcessOptions o;
    o.name = "replacement";
    mp::Process running([r = gate.reader()] { pass_gate_and_exit(r, 5); });
    mp::Process next(o, [w = out.w.get()] { write_str(w, "next\n"); });
    running.start();
    const pid_t pid = running.pid();
    EXPECT_PROCESS_ERROR(running = std::move(next), "running");
    EXPECT_TRUE(running.is_alive());
    EXPECT_EQ(running.pid(), pid);
    EXPECT_EQ(next.name(), "replacement") << "a refused assignment leaves the source untouched";

    gate.open();
    ASSERT_TRUE(running.join(kLong));
    EXPECT_EQ(running.exitcode(), 5);
    running = std::move(next);  // the old child is joined: allowed now
    EXPECT_EQ(running.name(), "replacement");
    EXPECT_EQ(running.pid(), 0);
    running.start();
    ASSERT_TRUE(running.join(kLong));
    EXPECT_EQ(running.exitcode(), 0);
    ASSERT_TRUE(poll_readable(out.r.get(), kLong));
    char buf[16] = {};
    EXPECT_EQ(::read(out.r.get(), buf, sizeof buf - 1), 5);
    EXPECT_STREQ(buf, "next\n");
}

TEST(ProcessMove, AssignOverARunningDaemonThrowsToo) {
    Gate gate;
    mp::ProcessOptions o;
    o.daemon = true;
    mp::Process daemon(o, [r = gate.reader()] { pass_gate_and_exit(r, 0); });
    daemon.start();
    EXPECT_PROCESS_ERROR(daemon = mp::Process([] {}), "running");
    EXPECT_TRUE(daemon.is_alive()) << "a refused assignment must not terminate the daemon";
    gate.open();
    ASSERT_TRUE(daemon.join(kLong));
}

TEST(ProcessMove, AssignOverAnEndedUnjoinedChildReapsIt) {
    mp::Process p([] {});
    p.start();
    const pid_t pid = p.pid();
    ASSERT_TRUE(poll_readable(p.sentinel(), kLong));  // ended, not joined: a zombie until reaped
    p = mp::Process([] {});
    EXPECT_FALSE(mp::test::pid_exists(pid)) << "the assignment left a zombie";
    EXPECT_TRUE(mp::active_children().empty());
    EXPECT_EQ(p.pid(), 0);
}

TEST(ProcessMove, AssignOverAClosedOrUnstartedProcess) {
    mp::Process a([] {});
    a.start();
    ASSERT_TRUE(a.join(kLong));
    a.close();
    a = mp::Process([] { ::_exit(4); });
    a.start();
    ASSERT_TRUE(a.join(kLong));
    EXPECT_EQ(a.exitcode(), 4);

    mp::Process b([] {});
    b = mp::Process([] { ::_exit(6); });
    b.start();
    ASSERT_TRUE(b.join(kLong));
    EXPECT_EQ(b.exitcode(), 6);
}

TEST(ProcessMove, SelfMoveAssignmentKeepsTheChild) {
    Gate gate;
    mp::Process p([r = gate.reader()] { pass_gate_and_exit(r, 3); });
    p.start();
    mp::Process& alias = p;  // spelled through a reference: compilers warn on `p = std::move(p)`
    EXPECT_NO_THROW(p = std::move(alias));
    EXPECT_TRUE(p.is_alive());
    gate.open();
    ASSERT_TRUE(p.join(kLong));
    EXPECT_EQ(p.exitcode(), 3);
}

// ---------------------------------------------------------------------------------------------
// A moved-from Process
// ---------------------------------------------------------------------------------------------

void expect_every_member_throws(mp::Process& p) {
    EXPECT_PROCESS_ERROR(p.start(), "moved-from");
    EXPECT_PROCESS_ERROR(p.join(), "moved-from");
    EXPECT_PROCESS_ERROR(p.join(10ms), "moved-from");
    EXPECT_PROCESS_ERROR(p.is_alive(), "moved-from");
    EXPECT_PROCESS_ERROR(p.terminate(), "moved-from");
    EXPECT_PROCESS_ERROR(p.kill(), "moved-from");
    EXPECT_PROCESS_ERROR(p.close(), "moved-from");
    EXPECT_PROCESS_ERROR(p.pid(), "moved-from");
    EXPECT_PROCESS_ERROR(p.name(), "moved-from");
    EXPECT_PROCESS_ERROR(p.name("renamed"), "moved-from");
    EXPECT_PROCESS_ERROR(p.exitcode(), "moved-from");
    EXPECT_PROCESS_ERROR(p.daemon(), "moved-from");
    EXPECT_PROCESS_ERROR(p.daemon(true), "moved-from");
    EXPECT_PROCESS_ERROR(p.sentinel(), "moved-from");
    EXPECT_PROCESS_ERROR(p.authkey(), "moved-from");
    EXPECT_PROCESS_ERROR(p.authkey(std::string(32, 'k')), "moved-from");
    EXPECT_PROCESS_ERROR(p.start_method(), "moved-from");
    const mp::Process& c = p;
    EXPECT_PROCESS_ERROR(c.pid(), "moved-from");
    EXPECT_PROCESS_ERROR(c.name(), "moved-from");
    EXPECT_PROCESS_ERROR(c.sentinel(), "moved-from");
}

TEST(ProcessMove, EveryMemberOfAMovedFromUnstartedProcessThrows) {
    mp::Process from([] {});
    mp::Process to(std::move(from));
    expect_every_member_throws(from);  // NOLINT(bugprone-use-after-move): that is the test
    EXPECT_TRUE(mp::active_children().empty()) << "a misused moved-from Process started nothing";
    to.start();
    ASSERT_TRUE(to.join(kLong));
    EXPECT_EQ(to.exitcode(), 0);
}

TEST(ProcessMove, EveryMemberOfAMovedFromRunningProcessThrows) {
    Gate gate;
    mp::Process from([r = gate.reader()] { pass_gate_and_exit(r, 8); });
    from.start();
    mp::Process to(std::move(from));
    expect_every_member_throws(from);  // NOLINT(bugprone-use-after-move): that is the test
    EXPECT_TRUE(to.is_alive()) << "a misused moved-from Process signalled the child";
    gate.open();
    ASSERT_TRUE(to.join(kLong));
    EXPECT_EQ(to.exitcode(), 8);
}

TEST(ProcessMove, MovedFromProcessTakesANewOne) {
    mp::Process from([] { ::_exit(2); });
    mp::Process to(std::move(from));
    from = mp::Process([] { ::_exit(3); });  // NOLINT(bugprone-use-after-move)
    from.start();
    to.start();
    ASSERT_TRUE(from.join(kLong));
    ASSERT_TRUE(to.join(kLong));
    EXPECT_EQ(from.exitcode(), 3);
    EXPECT_EQ(to.exitcode(), 2);
}

// ---------------------------------------------------------------------------------------------
// Subclasses
// ---------------------------------------------------------------------------------------------

TEST(ProcessMove, MovedSubclassRunsItsOwnRun) {
    TestPipe out;
    MessageProcess a(out.w.get(), "from a subclass");
    MessageProcess b(std::move(a));
    b.start();
    ASSERT_TRUE(b.join(kLong));
    EXPECT_EQ(b.exitcode(), 0);
    ASSERT_TRUE(poll_readable(out.r.get(), kLong));
    char buf[64] = {};
    EXPECT_GT(::read(out.r.get(), buf, sizeof buf - 1), 0);
    EXPECT_STREQ(buf, "from a subclass\n");
}

TEST(ProcessMove, SlicedSubclassRefusesToStart) {
    TestPipe out;
    MessageProcess r(out.w.get(), "sliced");
    mp::Process sliced(std::move(r));
    EXPECT_PROCESS_ERROR(sliced.start(), "sliced");
    mp::Process assigned([] {});
    MessageProcess r2(out.w.get(), "sliced too");
    assigned = std::move(r2);
    EXPECT_PROCESS_ERROR(assigned.start(), "sliced");
    EXPECT_TRUE(mp::active_children().empty());
    EXPECT_FALSE(poll_readable(out.r.get(), 0ms));
}

// ---------------------------------------------------------------------------------------------
// forkserver
// ---------------------------------------------------------------------------------------------

TEST(ProcessMoveForkserver, VectorOfRunningProcessesSurvivesReallocation) {
    TempDir dir;
    const std::string go = dir.file("go");
    std::vector<mp::Process> procs;
    std::vector<pid_t> pids;
    int reallocations = 0;
    constexpr int kChildren = 6;
    for (int i = 0; i < kChildren; ++i) {
        const mp::Process* before = procs.data();
        procs.emplace_back(forkserver_options(), fs_wait_for_file_then_exit, go, 20 + i);
        if (i > 0 && procs.data() != before) ++reallocations;
        procs.back().start();
        pids.push_back(procs.back().pid());
    }
    ASSERT_GT(reallocations, 0) << "the test must move running Processes";
    EXPECT_EQ(active_pids(), std::set<pid_t>(pids.begin(), pids.end()));
    dir.touch("go");
    for (int i = 0; i < kChildren; ++i) {
        auto& p = procs[static_cast<std::size_t>(i)];
        ASSERT_TRUE(p.join(kLong));
        EXPECT_EQ(p.exitcode(), 20 + i) << "the exit status the server sends reaches the moved Process";
    }
    EXPECT_TRUE(mp::active_children().empty());
}

TEST(ProcessMoveForkserver, MoveWhileRunningAndAssignAfterTheEnd) {
    TempDir dir;
    std::optional<mp::Process> to;
    pid_t pid = 0;
    {
        mp::Process from(forkserver_options(), fs_wait_for_file_then_exit, dir.file("go"), 9);
        from.start();
        pid = from.pid();
        to.emplace(std::move(from));
        EXPECT_PROCESS_ERROR(from.is_alive(), "moved-from");  // NOLINT(bugprone-use-after-move)
    }
    EXPECT_TRUE(to->is_alive());
    EXPECT_EQ(to->pid(), pid);
    EXPECT_EQ(to->start_method(), mp::StartMethod::forkserver);
    EXPECT_PROCESS_ERROR(*to = mp::Process(forkserver_options(), fs_exit_with, 1), "running");
    dir.touch("go");
    ASSERT_TRUE(to->join(kLong));
    EXPECT_EQ(to->exitcode(), 9);
    *to = mp::Process(forkserver_options(), fs_exit_with, 12);
    to->start();
    ASSERT_TRUE(to->join(kLong));
    EXPECT_EQ(to->exitcode(), 12);
    EXPECT_TRUE(mp::active_children().empty());
}

}  // namespace
