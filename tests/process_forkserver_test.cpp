// Tests of mp::Process under the forkserver start method (include/mp/process.hpp): targets that
// are plain functions with codec'd arguments, children forked by one server, restarting it.
// Helpers, targets and the rules every Process test follows: helpers/process_helpers.hpp and
// process_test.cpp.

#include "helpers/process_helpers.hpp"

namespace {

// ---------------------------------------------------------------------------------------------
// forkserver
// ---------------------------------------------------------------------------------------------

TEST(ProcessForkserver, SetStartMethodStartsTheServer) {
    mp::set_start_method(mp::StartMethod::forkserver, !running_alone());
    auto servers = mp::test::forkservers();
    ASSERT_EQ(servers.size(), 1u) << kOneServer;
    EXPECT_EQ(servers[0].comm, "mp-forkserver");
    EXPECT_NE(servers[0].state, 'Z');
    mp::Process p(fs_exit_sum, std::string("ab"), 1);
    EXPECT_EQ(p.start_method(), mp::StartMethod::forkserver);
    p.start();
    ASSERT_TRUE(p.join(kLong));
    EXPECT_EQ(p.exitcode(), 3);
    EXPECT_EQ(mp::test::forkservers().size(), 1u) << "the server is started once";
    mp::set_start_method(mp::StartMethod::fork, true);
}

TEST(ProcessForkserver, NonTransferableTargetThrowsAtStart) {
    int captured = 5;
    mp::Process a(forkserver_options(), [captured] { ::_exit(captured); });
    EXPECT_PROCESS_ERROR(a.start(), "transferable", "capture", "forkserver");
    mp::Process b(forkserver_options(), [](const NoCodec&) {}, NoCodec{"no codec"});
    EXPECT_PROCESS_ERROR(b.start(), "codec", "transferable", "forkserver");
    EXPECT_TRUE(mp::active_children().empty());
}

TEST(ProcessForkserver, SubclassThrowsAtStart) {
    NoopProcess p(forkserver_options());
    EXPECT_PROCESS_ERROR(p.start(), "subclass", "run", "fork");
    EXPECT_TRUE(mp::active_children().empty());
}

TEST(ProcessForkserver, ChildrenComeFromOneServerAndKnowWhoTheyAre) {
    TempDir dir;
    mp::Process a(forkserver_options(), fs_report_identity, dir.file("a"));
    mp::Process b(forkserver_options(), fs_report_identity, dir.file("b"));
    a.start();
    b.start();
    ASSERT_TRUE(a.join(kLong));
    ASSERT_TRUE(b.join(kLong));
    EXPECT_EQ(a.exitcode(), 0);
    EXPECT_EQ(b.exitcode(), 0);
    auto ta = slurp(dir.file("a"));
    auto tb = slurp(dir.file("b"));
    ASSERT_TRUE(ta && tb);
    EXPECT_EQ(field(*ta, "name"), a.name());
    EXPECT_EQ(field(*ta, "pid"), std::to_string(a.pid()));
    EXPECT_EQ(field(*ta, "getpid"), std::to_string(a.pid()));
    EXPECT_EQ(field(*ta, "authkey"), hex(mp::current_process().authkey));
    EXPECT_EQ(field(*ta, "daemon"), "0");
    EXPECT_EQ(field(*ta, "identity"), std::to_string(process_number(a.name()).value_or(-1)) + ",");
    EXPECT_EQ(field(*ta, "parent"), "MainProcess " + std::to_string(::getpid()) + " alive")
        << "a forkserver child's parent is the process that started it, as in Python";
    EXPECT_EQ(field(*tb, "name"), b.name());
    EXPECT_EQ(field(*tb, "getpid"), std::to_string(b.pid()));
    EXPECT_NE(field(*ta, "getppid"), std::to_string(::getpid()));
    EXPECT_EQ(field(*ta, "getppid"), field(*tb, "getppid")) << "one server forks every child";
}

TEST(ProcessForkserver, ChildCanStartChildrenOfItsOwn) {
    TempDir dir;
    mp::Process p(forkserver_options(), fs_start_grandchildren, dir.file("g"));
    p.start();
    ASSERT_TRUE(p.join(kLong));
    EXPECT_EQ(p.exitcode(), 0);
    auto text = slurp(dir.file("g"));
    ASSERT_TRUE(text);
    EXPECT_EQ(field(*text, "names"), p.name() + ":1 " + p.name() + ":2") << *text;
    EXPECT_EQ(field(*text, "exitcodes"), "5 0") << *text;
    EXPECT_EQ(field(*text, "active"), "0") << *text;
}

TEST(ProcessForkserver, ForkChildCanUseTheForkserver) {
    TestPipe out;
    mp::Process p([w = out.w.get()] {
        std::string r;
        try {
            mp::Process g(forkserver_options(), fs_exit_sum, std::string("abc"), 4);
            g.start();
            r = g.join(10s) ? std::to_string(g.exitcode().value_or(-999)) : "timeout";
        } catch (const std::exception& e) {
            r = std::string("error ") + e.what();
        }
        write_str(w, r + "\n");
    });
    // Start the server first, so that the fork child inherits the connection to it.
    {
        mp::Process warm(forkserver_options(), fs_noop);
        warm.start();
        ASSERT_TRUE(warm.join(kLong));
    }
    p.start();
    EXPECT_EQ(read_line(out.r.get()), "7");
    ASSERT_TRUE(p.join(kLong));
    EXPECT_EQ(p.exitcode(), 0);
}

TEST(ProcessForkserver, IsRestartedAfterItWasKilled) {
    mp::Process first(forkserver_options(), fs_exit_sum, std::string("a"), 1);
    first.start();
    ASSERT_TRUE(first.join(kLong));
    EXPECT_EQ(first.exitcode(), 2);
    auto servers = mp::test::forkservers();
    ASSERT_EQ(servers.size(), 1u);
    ::kill(servers[0].pid, SIGKILL);
    ASSERT_TRUE(mp::test::wait_pid_stopped(servers[0].pid, kLong));

    mp::Process second(forkserver_options(), fs_exit_sum, std::string("ab"), 1);
    EXPECT_NO_THROW(second.start()) << "a killed forkserver is replaced";
    if (second.pid() != 0) {
        ASSERT_TRUE(second.join(kLong));
        EXPECT_EQ(second.exitcode(), 3);
    }
    auto now = mp::test::forkservers();
    ASSERT_EQ(now.size(), 1u);
    EXPECT_NE(now[0].pid, servers[0].pid);
}

}  // namespace
