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

TEST(ProcessForkserver, PlainFunctionWithArgumentsRunsAndItsExitCodeIsSeen) {
    mp::Process a(forkserver_options(), fs_exit_sum, std::string("hello"), 2);
    mp::Process b(forkserver_options(), fs_noop);
    EXPECT_EQ(a.start_method(), mp::StartMethod::forkserver);
    a.start();
    b.start();
    ASSERT_TRUE(a.join(kLong));
    ASSERT_TRUE(b.join(kLong));
    EXPECT_EQ(a.exitcode(), 7);
    EXPECT_EQ(b.exitcode(), 0);
}

TEST(ProcessForkserver, CaptureLessLambdaFunctionPointerAndEmptyFunctionObject) {
    void (*fp)(std::string, int) = fs_exit_sum;
    mp::Process a(forkserver_options(), [](int code) { ::_exit(code); }, 9);
    mp::Process b(forkserver_options(), fp, std::string("x"), 10);
    mp::Process c(forkserver_options(), EmptyFunctionObject{}, 12);
    a.start();
    b.start();
    c.start();
    ASSERT_TRUE(a.join(kLong));
    ASSERT_TRUE(b.join(kLong));
    ASSERT_TRUE(c.join(kLong));
    EXPECT_EQ(a.exitcode(), 9);
    EXPECT_EQ(b.exitcode(), 11);
    EXPECT_EQ(c.exitcode(), 12);
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

TEST(ProcessForkserver, DaemonChildKnowsItIsADaemon) {
    TempDir dir;
    mp::ProcessOptions o = forkserver_options();
    o.daemon = true;
    mp::Process p(o, fs_report_identity, dir.file("d"));
    p.start();
    ASSERT_TRUE(p.join(kLong));
    EXPECT_EQ(p.exitcode(), 0);
    auto text = slurp(dir.file("d"));
    ASSERT_TRUE(text);
    EXPECT_EQ(field(*text, "daemon"), "1");
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

TEST(ProcessForkserver, LargeArgumentArrives) {
    const std::size_t n = 8u << 20;
    mp::Process p(forkserver_options(), fs_check_size, std::string(n, 'x'), n);
    p.start();
    ASSERT_TRUE(p.join(kLong));
    EXPECT_EQ(p.exitcode(), 0) << "the child did not receive the 8 MiB argument intact";
}

TEST(ProcessForkserver, ManyChildrenAtOnceKeepTheirOwnExitCodes) {
    TempDir dir;
    const std::string go = dir.file("go");
    std::vector<std::unique_ptr<mp::Process>> ps;
    for (int i = 0; i < 40; ++i) {
        ps.push_back(std::make_unique<mp::Process>(forkserver_options(), fs_exit_sum, go + "\n",
                                                   i));
    }
    // fs_exit_sum exits at once with size + i; the statuses come back in any order.
    for (auto& p : ps) p->start();
    for (int i = static_cast<int>(ps.size()) - 1; i >= 0; --i) {
        ASSERT_TRUE(ps[i]->join(kLong)) << i;
        EXPECT_EQ(ps[i]->exitcode(), static_cast<int>(go.size() + 1) + i);
    }
}

TEST(ProcessForkserver, StartAndJoinFromManyThreads) {
    std::atomic<int> failures{0};
    std::vector<std::thread> threads;
    for (int t = 0; t < 4; ++t) {
        threads.emplace_back([&, t] {
            for (int i = 0; i < 10; ++i) {
                mp::Process p(forkserver_options(), fs_exit_sum, std::string(), t * 10 + i);
                p.start();
                if (!p.join(kLong) || p.exitcode() != t * 10 + i) ++failures;
            }
        });
    }
    for (auto& th : threads) th.join();
    EXPECT_EQ(failures.load(), 0);
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

TEST(ProcessForkserver, JoinTimeoutIsAliveSentinelAndActiveChildren) {
    TempDir dir;
    const std::string go = dir.file("go");
    mp::Process p(forkserver_options(), fs_wait_for_file, go);
    p.start();
    EXPECT_GT(p.pid(), 0);
    EXPECT_TRUE(p.is_alive());
    EXPECT_FALSE(p.join(20ms));
    EXPECT_FALSE(p.exitcode().has_value());
    EXPECT_TRUE(contains_pid(mp::active_children(), p.pid()));
    const int s = p.sentinel();
    EXPECT_FALSE(poll_readable(s, 0ms));
    write_file_atomically(go, "go");
    EXPECT_TRUE(poll_readable(s, kLong));
    ASSERT_TRUE(p.join(kLong));
    EXPECT_EQ(p.exitcode(), 0);
    EXPECT_FALSE(p.is_alive());
    EXPECT_FALSE(contains_pid(mp::active_children(), p.pid()));
}

TEST(ProcessForkserver, TerminateAndKill) {
    mp::Process a(forkserver_options(), fs_block);
    mp::Process b(forkserver_options(), fs_block);
    a.start();
    b.start();
    a.terminate();
    b.kill();
    ASSERT_TRUE(a.join(kLong));
    ASSERT_TRUE(b.join(kLong));
    EXPECT_EQ(a.exitcode(), -SIGTERM);
    EXPECT_EQ(b.exitcode(), -SIGKILL);
    EXPECT_NO_THROW(a.terminate()) << "signalling an ended child changes nothing";
    EXPECT_NO_THROW(b.kill());
    EXPECT_EQ(a.exitcode(), -SIGTERM);
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

TEST(ProcessForkserver, ExceptionGivesExitCodeOne) {
    mp::Process p(forkserver_options(), fs_throw, std::string("thrown in a forkserver child"));
    p.start();
    ASSERT_TRUE(p.join(kLong));
    EXPECT_EQ(p.exitcode(), 1);
}

TEST(ProcessForkserver, DestructorJoinsALiveChild) {
    Watchdog watchdog(30s, "ProcessForkserver.DestructorJoinsALiveChild");
    TempDir dir;
    const std::string go = dir.file("go");
    std::optional<mp::ChildProcess> view;
    std::thread opener([go] {
        std::this_thread::sleep_for(100ms);
        write_file_atomically(go, "go");
    });
    {
        mp::Process p(forkserver_options(), fs_wait_for_file, go);
        p.start();
        view = find_child(mp::active_children(), p.pid());
    }
    opener.join();
    ASSERT_TRUE(view);
    EXPECT_FALSE(view->is_alive());
    EXPECT_EQ(view->exitcode(), 0);
}

TEST(ProcessForkserver, NoFdLeakOver50Cycles) {
    {
        mp::Process warm(forkserver_options(), fs_noop);  // starts the server
        warm.start();
        ASSERT_TRUE(warm.join(kLong));
    }
    const auto before = mp::test::list_fds();
    for (int i = 0; i < 50; ++i) {
        mp::Process p(forkserver_options(), fs_noop);
        p.start();
        ASSERT_TRUE(p.join(kLong)) << "cycle " << i;
        ASSERT_EQ(p.exitcode(), 0) << "cycle " << i;
    }
    const auto after = mp::test::list_fds();
    EXPECT_EQ(after.size(), before.size()) << "before:" << describe_fds(before)
                                           << "\nafter:" << describe_fds(after);
}

}  // namespace
