// Tests of mp::Process and the functions of include/mp/process.hpp.
//
// ctest runs every TEST in a process of its own (gtest_discover_tests), and the shared main
// (helpers/test_main.cpp) fails a test that leaves a child, an fd or a /dev/shm entry behind.
// Children report to the test through pipes (fork) or files (forkserver: the child does not
// inherit this process's fds). Every wait that should end is bounded (kLong); nothing asserts on
// speed. Behaviour that needs a process of its own (program exit, a killed parent, threads,
// atexit) runs in the helper program mp_test_child (helpers/child_main.cpp).

#include "helpers/process_helpers.hpp"

namespace {

// ---------------------------------------------------------------------------------------------
// Start methods. DefaultIsFork must see a process where nothing has set the method yet: ctest
// runs each test in its own process (and it comes first for a whole-binary run).
// ---------------------------------------------------------------------------------------------

TEST(ProcessStartMethod, DefaultIsFork) {
    EXPECT_EQ(mp::get_start_method(), mp::StartMethod::fork);
    mp::Process p([] {});
    EXPECT_EQ(p.start_method(), mp::StartMethod::fork);
}

TEST(ProcessStartMethod, ToString) {
    EXPECT_EQ(mp::to_string(mp::StartMethod::fork), "fork");
    EXPECT_EQ(mp::to_string(mp::StartMethod::forkserver), "forkserver");
    EXPECT_EQ(mp::to_string(mp::StartMethod::spawn), "spawn");
}

TEST(ProcessStartMethod, SecondSetThrowsUnlessForced) {
    if (running_alone()) {
        EXPECT_NO_THROW(mp::set_start_method(mp::StartMethod::fork)) << "the first set succeeds";
    } else {
        mp::set_start_method(mp::StartMethod::fork, true);  // an earlier test may have set it
    }
    EXPECT_PROCESS_ERROR(mp::set_start_method(mp::StartMethod::fork), "already", "set");
    EXPECT_PROCESS_ERROR(mp::set_start_method(mp::StartMethod::forkserver), "already", "set");
    EXPECT_EQ(mp::get_start_method(), mp::StartMethod::fork);

    EXPECT_NO_THROW(mp::set_start_method(mp::StartMethod::forkserver, true));
    EXPECT_EQ(mp::get_start_method(), mp::StartMethod::forkserver);
    mp::Process p(fs_noop);
    EXPECT_EQ(p.start_method(), mp::StartMethod::forkserver);

    EXPECT_NO_THROW(mp::set_start_method(mp::StartMethod::fork, true));
    EXPECT_EQ(mp::get_start_method(), mp::StartMethod::fork);
    mp::Process q(fs_noop);
    EXPECT_EQ(q.start_method(), mp::StartMethod::fork);
    EXPECT_EQ(p.start_method(), mp::StartMethod::forkserver) << "chosen when p was created";
}

TEST(ProcessStartMethod, PerProcessOptionOverridesTheDefault) {
    TempDir dir;
    mp::Process fs(forkserver_options(), fs_report_identity, dir.file("fs"));
    mp::Process fk(fs_report_identity, dir.file("fork"));
    EXPECT_EQ(fs.start_method(), mp::StartMethod::forkserver);
    EXPECT_EQ(fk.start_method(), mp::StartMethod::fork);
    EXPECT_EQ(mp::get_start_method(), mp::StartMethod::fork);
    fs.start();
    fk.start();
    ASSERT_TRUE(fs.join(kLong));
    ASSERT_TRUE(fk.join(kLong));
    EXPECT_EQ(fs.exitcode(), 0);
    EXPECT_EQ(fk.exitcode(), 0);

    auto fs_text = slurp(dir.file("fs"));
    auto fk_text = slurp(dir.file("fork"));
    ASSERT_TRUE(fs_text && fk_text);
    EXPECT_EQ(field(*fk_text, "getppid"), std::to_string(::getpid()));
    const std::string server = field(*fs_text, "getppid").value_or("?");
    EXPECT_NE(server, std::to_string(::getpid())) << "a forkserver child is forked by the server";
    auto servers = mp::test::forkservers();
    ASSERT_EQ(servers.size(), 1u) << kOneServer;
    EXPECT_EQ(server, std::to_string(servers[0].pid));
}

// ---------------------------------------------------------------------------------------------
// Creating and running a Process
// ---------------------------------------------------------------------------------------------

TEST(Process, TargetWithArgumentsRunsInTheChild) {
    TestPipe out;
    mp::Process p(report_args, out.w.get(), std::string("egon"), 42, std::vector<int>{1, 2, 3});
    p.start();
    EXPECT_EQ(read_line(out.r.get()), "egon 42 3");
    ASSERT_TRUE(p.join(kLong));
    EXPECT_EQ(p.exitcode(), 0);
}

TEST(Process, CapturingLambdaRunsUnderFork) {
    TestPipe out;
    const std::string greeting = "captured";
    mp::Process p([w = out.w.get(), greeting](int n) {
        write_str(w, greeting + " " + std::to_string(n) + " " + std::to_string(::getpid()) + "\n");
    }, 5);
    p.start();
    EXPECT_EQ(read_line(out.r.get()), "captured 5 " + std::to_string(p.pid()));
    ASSERT_TRUE(p.join(kLong));
    EXPECT_EQ(p.exitcode(), 0);
}

TEST(Process, ArgumentsAreCopiedAtConstruction) {
    TestPipe out;
    std::string s = "before";
    mp::Process p([w = out.w.get()](const std::string& x) { write_str(w, x + "\n"); }, s);
    s = "after";
    p.start();
    EXPECT_EQ(read_line(out.r.get()), "before");
    ASSERT_TRUE(p.join(kLong));
}

TEST(Process, MemberFunctionTarget) {
    TestPipe out;
    mp::Process p(&Greeter::greet, Greeter{"hello"}, out.w.get(), std::string("world"));
    p.start();
    EXPECT_EQ(read_line(out.r.get()), "hello world");
    ASSERT_TRUE(p.join(kLong));
    EXPECT_EQ(p.exitcode(), 0);
}

TEST(Process, SubclassOverridingRun) {
    TestPipe out;
    Reporter r(out.w.get(), "from run()");
    r.start();
    EXPECT_EQ(read_line(out.r.get()), "from run() " + r.name());
    ASSERT_TRUE(r.join(kLong));
    EXPECT_EQ(r.exitcode(), 0);
}

TEST(Process, SubclassWithOptions) {
    TestPipe out;
    mp::ProcessOptions o;
    o.name = "reporter";
    Reporter r(o, out.w.get(), "hi");
    EXPECT_EQ(r.name(), "reporter");
    r.start();
    EXPECT_EQ(read_line(out.r.get()), "hi reporter");
    ASSERT_TRUE(r.join(kLong));
    EXPECT_EQ(r.exitcode(), 0);
}

TEST(Process, ExceptionFromSubclassRunGivesExitCodeOne) {
    TempDir dir;
    ThrowingProcess p;
    {
        StderrToFile redirect(dir.file("stderr"));
        p.start();
    }
    ASSERT_TRUE(p.join(kLong));
    EXPECT_EQ(p.exitcode(), 1);
    const std::string err = slurp(dir.file("stderr")).value_or("");
    EXPECT_NE(err.find("Process " + p.name() + ":"), std::string::npos) << err;
    EXPECT_NE(err.find("thrown by run()"), std::string::npos) << err;
}

TEST(Process, DefaultConstructedProcessRunsNothing) {
    mp::Process p;
    p.start();
    ASSERT_TRUE(p.join(kLong));
    EXPECT_EQ(p.exitcode(), 0);
}

TEST(Process, PidIsZeroBeforeStartAndTheChildsPidAfter) {
    TestPipe out;
    mp::Process p([w = out.w.get()] { write_str(w, std::to_string(::getpid()) + "\n"); });
    EXPECT_EQ(p.pid(), 0);
    p.start();
    EXPECT_GT(p.pid(), 0);
    EXPECT_NE(p.pid(), ::getpid());
    EXPECT_EQ(read_line(out.r.get()), std::to_string(p.pid()));
    const pid_t pid = p.pid();
    ASSERT_TRUE(p.join(kLong));
    EXPECT_EQ(p.pid(), pid) << "pid() stays the child's pid after join";
}

TEST(Process, StateBeforeStart) {
    mp::Process p([] {});
    EXPECT_FALSE(p.is_alive());
    EXPECT_FALSE(p.exitcode().has_value());
    EXPECT_EQ(p.pid(), 0);
}

TEST(Process, JoinWithTimeoutReturnsFalseWhileTheChildRuns) {
    Gate gate;
    mp::Process p([r = gate.reader()] { wait_gate(r); });
    p.start();
    EXPECT_TRUE(p.is_alive());
    EXPECT_FALSE(p.join(20ms));
    EXPECT_FALSE(p.join(0ms));
    EXPECT_FALSE(p.join(std::chrono::duration<double>(0.01)));
    EXPECT_TRUE(p.is_alive());
    EXPECT_FALSE(p.exitcode().has_value());
    gate.open();
    EXPECT_TRUE(p.join(kLong));
    EXPECT_FALSE(p.is_alive());
    EXPECT_EQ(p.exitcode(), 0);
    EXPECT_TRUE(p.join(0ms)) << "joining an ended child again returns at once";
    p.join();
}

TEST(Process, JoinWaitsForTheChild) {
    TempDir dir;
    const std::string marker = dir.file("done");
    mp::Process p([marker] {
        std::this_thread::sleep_for(50ms);
        write_file_atomically(marker, "done");
    });
    p.start();
    p.join();
    EXPECT_EQ(slurp(marker), "done");
    EXPECT_FALSE(p.is_alive());
    EXPECT_EQ(p.exitcode(), 0);
}

TEST(Process, JoinWithANegativeTimeoutDoesNotBlock) {
    Gate gate;
    mp::Process p([r = gate.reader()] { wait_gate(r); });
    p.start();
    EXPECT_FALSE(p.join(-1s));
    EXPECT_FALSE(p.join(std::chrono::nanoseconds::min()));
    EXPECT_TRUE(p.is_alive());
    gate.open();
    EXPECT_TRUE(p.join(kLong));
}

TEST(Process, JoinWithTheLargestTimeoutWaits) {
    // duration::max() is the usual way to say "no limit"; it must not wrap to a negative wait.
    Gate gate;
    mp::Process p([r = gate.reader()] { wait_gate(r); });
    p.start();
    std::thread opener([&] {
        std::this_thread::sleep_for(50ms);
        gate.open();
    });
    const bool ended = p.join(std::chrono::seconds::max());
    opener.join();
    EXPECT_TRUE(ended) << "join(seconds::max()) returned before the child ended";
    EXPECT_TRUE(p.join(kLong));
    EXPECT_EQ(p.exitcode(), 0);
}

TEST(Process, JoinTimeoutValues) {
    // issue 12 item 5: "for ever" durations of every type wait, zero and negative ones only look;
    // Process::join and ChildProcess::join alike.
    mp::test::for_each_forever([&](auto forever) {
        for (bool child_view : {false, true}) {
            Gate gate;
            mp::Process p([r = gate.reader()] { wait_gate(r); });
            p.start();
            std::thread opener([&] {
                std::this_thread::sleep_for(30ms);
                gate.open();
            });
            bool ended;
            if (child_view) {
                auto children = mp::active_children();
                ASSERT_EQ(children.size(), 1u);
                ended = children[0].join(forever);
            } else {
                ended = p.join(forever);
            }
            opener.join();
            EXPECT_TRUE(ended) << "returned before the child ended";
            EXPECT_TRUE(p.join(kLong));
        }
    });
    Gate gate;
    mp::Process p([r = gate.reader()] { wait_gate(r); });
    p.start();
    auto children = mp::active_children();
    ASSERT_EQ(children.size(), 1u);
    mp::test::for_each_no_wait([&](auto t) {
        EXPECT_FALSE(p.join(t));
        EXPECT_FALSE(children[0].join(t));
    });
    gate.open();
    ASSERT_TRUE(p.join(kLong));
    mp::test::for_each_no_wait([&](auto t) { EXPECT_TRUE(p.join(t)); });
}

TEST(Process, NonDaemonChildOutlivesTheThreadThatStartedIt) {
    Gate gate;
    mp::Process p([r = gate.reader()] { wait_gate(r); });
    std::thread starter([&] { p.start(); });
    starter.join();
    std::this_thread::sleep_for(20ms);
    EXPECT_TRUE(p.is_alive()) << "the child died with the thread that started it";
    gate.open();
    ASSERT_TRUE(p.join(kLong));
    EXPECT_EQ(p.exitcode(), 0);
}

TEST(Process, ManyChildrenAtOnceKeepTheirOwnExitCodes) {
    Gate gate;
    std::vector<std::unique_ptr<mp::Process>> ps;
    for (int i = 0; i < 40; ++i) {
        ps.push_back(std::make_unique<mp::Process>([r = gate.reader(), i] {
            wait_gate(r);
            ::_exit(i + 1);
        }));
        ps.back()->start();
    }
    EXPECT_EQ(mp::active_children().size(), ps.size());
    gate.open(static_cast<int>(ps.size()));
    // Join in reverse order: the statuses arrive in any order.
    for (int i = static_cast<int>(ps.size()) - 1; i >= 0; --i) {
        ASSERT_TRUE(ps[i]->join(kLong)) << i;
        EXPECT_EQ(ps[i]->exitcode(), i + 1);
    }
}

TEST(Process, StartAndJoinFromManyThreads) {
    constexpr int kThreads = 4;
    constexpr int kPerThread = 25;
    std::mutex mu;
    std::set<std::string> names;
    std::atomic<int> failures{0};
    std::vector<std::thread> threads;
    for (int t = 0; t < kThreads; ++t) {
        threads.emplace_back([&, t] {
            for (int i = 0; i < kPerThread; ++i) {
                mp::Process p([code = (t * kPerThread + i) % 200] { ::_exit(code); });
                p.start();
                if (!p.join(kLong) || p.exitcode() != (t * kPerThread + i) % 200) ++failures;
                std::lock_guard<std::mutex> lock(mu);
                names.insert(p.name());
            }
        });
    }
    for (auto& th : threads) th.join();
    EXPECT_EQ(failures.load(), 0);
    EXPECT_EQ(names.size(), static_cast<std::size_t>(kThreads * kPerThread))
        << "default names must be unique";
}

TEST(Process, IsAliveAndExitcodeNoticeTheEndWithoutJoin) {
    mp::Process p([] {});
    p.start();
    const auto deadline = Clock::now() + kLong;
    while (p.is_alive() && Clock::now() < deadline) std::this_thread::sleep_for(1ms);
    EXPECT_FALSE(p.is_alive());
    EXPECT_EQ(p.exitcode(), 0);
    EXPECT_FALSE(mp::test::pid_exists(p.pid())) << "is_alive() reaps an ended child";
    EXPECT_TRUE(p.join(kLong));
}

// ---------------------------------------------------------------------------------------------
// Exit codes
// ---------------------------------------------------------------------------------------------

TEST(ProcessExit, ReturningFromTheTargetGivesZero) {
    mp::Process p([] {});
    p.start();
    ASSERT_TRUE(p.join(kLong));
    EXPECT_EQ(p.exitcode(), 0);
}

TEST(ProcessExit, UnderscoreExitGivesItsCode) {
    mp::Process p([] { ::_exit(7); });
    p.start();
    ASSERT_TRUE(p.join(kLong));
    EXPECT_EQ(p.exitcode(), 7);
}

TEST(ProcessExit, SignalGivesMinusTheSignal) {
    mp::Process p([] {
        no_core_dump();
        std::signal(SIGSEGV, SIG_DFL);
        std::raise(SIGSEGV);
    });
    p.start();
    ASSERT_TRUE(p.join(kLong));
    EXPECT_EQ(p.exitcode(), -SIGSEGV);
}

TEST(ProcessExit, AbortGivesMinusSigabrt) {
    mp::Process p([] {
        no_core_dump();
        std::abort();
    });
    p.start();
    ASSERT_TRUE(p.join(kLong));
    EXPECT_EQ(p.exitcode(), -SIGABRT);
}

TEST(ProcessExit, ExceptionGivesOneAndIsReportedOnStderr) {
    TempDir dir;
    mp::Process p([] { throw std::runtime_error("boom from the child"); });
    {
        StderrToFile redirect(dir.file("stderr"));
        p.start();
    }
    ASSERT_TRUE(p.join(kLong));
    EXPECT_EQ(p.exitcode(), 1);
    const std::string err = slurp(dir.file("stderr")).value_or("");
    EXPECT_NE(err.find("Process " + p.name() + ":"), std::string::npos) << err;
    EXPECT_NE(err.find("boom from the child"), std::string::npos) << err;
}

TEST(ProcessExit, NonStdExceptionGivesOne) {
    TempDir dir;
    mp::Process p([] { throw 42; });
    {
        StderrToFile redirect(dir.file("stderr"));
        p.start();
    }
    ASSERT_TRUE(p.join(kLong));
    EXPECT_EQ(p.exitcode(), 1);
    const std::string err = slurp(dir.file("stderr")).value_or("");
    EXPECT_NE(err.find("Process " + p.name() + ":"), std::string::npos) << err;
}

TEST(ProcessExit, TerminateGivesMinusSigterm) {
    mp::Process p([] { block_for(60s); });
    p.start();
    p.terminate();
    ASSERT_TRUE(p.join(kLong));
    EXPECT_EQ(p.exitcode(), -SIGTERM);
    EXPECT_FALSE(p.is_alive());
}

TEST(ProcessExit, KillGivesMinusSigkill) {
    mp::Process p([] { block_for(60s); });
    p.start();
    p.kill();
    ASSERT_TRUE(p.join(kLong));
    EXPECT_EQ(p.exitcode(), -SIGKILL);
}

// ---- interrupt() (Python 3.14): SIGINT, and what a target makes of it ---------------------------

volatile std::sig_atomic_t g_interrupted = 0;

/// _sleep_some_event with Python's default behaviour spelled out: SIGINT sets a flag, which the
/// target turns into an exception that escapes it (Python: an uncaught KeyboardInterrupt).
void interrupted_throws(std::string ready) {
    struct sigaction sa {};
    sa.sa_handler = +[](int) { g_interrupted = 1; };
    sigemptyset(&sa.sa_mask);
    ::sigaction(SIGINT, &sa, nullptr);
    write_file_atomically(ready, "ready");
    const auto deadline = Clock::now() + 60s;
    while (!g_interrupted && Clock::now() < deadline) std::this_thread::sleep_for(10ms);
    if (g_interrupted) throw std::runtime_error("KeyboardInterrupt");
}

/// _sleep_no_int_handler: SIGINT keeps its default action.
void interrupted_no_handler(std::string ready) {
    write_file_atomically(ready, "ready");
    block_for(60s);
}

void interrupt_case(const mp::ProcessOptions& options, void (*target)(std::string), int expected) {
    TempDir dir;
    mp::Process p(options, target, dir.file("ready"));
    p.start();
    ASSERT_TRUE(wait_for_file(dir.file("ready"))) << "the child never got ready";
    p.interrupt();
    ASSERT_TRUE(p.join(kLong));
    EXPECT_EQ(p.exitcode(), expected);
    EXPECT_NO_THROW(p.interrupt()) << "signalling an ended child changes nothing";
}

TEST(ProcessExit, Interrupt) { interrupt_case({}, interrupted_throws, 1); }
TEST(ProcessExit, InterruptNoHandler) { interrupt_case({}, interrupted_no_handler, -SIGINT); }
TEST(ProcessForkserver, Interrupt) { interrupt_case(forkserver_options(), interrupted_throws, 1); }
TEST(ProcessForkserver, InterruptNoHandler) {
    interrupt_case(forkserver_options(), interrupted_no_handler, -SIGINT);
}
TEST(ProcessExit, InterruptBeforeStartIsProcessError) {
    mp::Process p([] {});
    EXPECT_THROW(p.interrupt(), mp::ProcessError);
}

/// Terminates `p`; kills it when SIGTERM did not end it within 5 s. True when SIGTERM did.
bool terminate_or_kill(mp::Process& p) {
    p.terminate();
    const bool ended = p.join(5s);
    if (!ended) {
        p.kill();
        p.join();
    }
    return ended;
}

TEST(ProcessExit, TerminateWorksWhenTheStartingThreadBlocksSigterm) {
    // A thread that takes SIGTERM through sigwait/signalfd blocks it; a child it starts must
    // still be terminable (STYLE.md: the child resets the masks the parent changed).
    sigset_t block, old_mask;
    sigemptyset(&block);
    sigaddset(&block, SIGTERM);
    ASSERT_EQ(::pthread_sigmask(SIG_BLOCK, &block, &old_mask), 0);
    mp::Process p([] { block_for(60s); });
    p.start();
    ::pthread_sigmask(SIG_SETMASK, &old_mask, nullptr);
    EXPECT_TRUE(terminate_or_kill(p)) << "SIGTERM did not end the child: it kept the blocked mask";
    EXPECT_EQ(p.exitcode(), -SIGTERM);
}

TEST(ProcessExit, TerminateWorksWhenTheParentIgnoresSigterm) {
    // STYLE.md: the child resets the signal dispositions the parent changed.
    struct sigaction ignore {}, old_action {};
    ignore.sa_handler = SIG_IGN;
    sigemptyset(&ignore.sa_mask);
    ASSERT_EQ(::sigaction(SIGTERM, &ignore, &old_action), 0);
    mp::Process p([] { block_for(60s); });
    p.start();
    ::sigaction(SIGTERM, &old_action, nullptr);
    EXPECT_TRUE(terminate_or_kill(p)) << "SIGTERM did not end the child: it kept SIG_IGN";
    EXPECT_EQ(p.exitcode(), -SIGTERM);
}

TEST(ProcessForkserver, TerminateWorksWhenTheParentBlocksOrIgnoresSigterm) {
    sigset_t block, old_mask;
    sigemptyset(&block);
    sigaddset(&block, SIGTERM);
    struct sigaction ignore {}, old_action {};
    ignore.sa_handler = SIG_IGN;
    sigemptyset(&ignore.sa_mask);
    ASSERT_EQ(::sigaction(SIGTERM, &ignore, &old_action), 0);
    ASSERT_EQ(::pthread_sigmask(SIG_BLOCK, &block, &old_mask), 0);
    mp::Process p(forkserver_options(), fs_block);
    p.start();
    ::pthread_sigmask(SIG_SETMASK, &old_mask, nullptr);
    ::sigaction(SIGTERM, &old_action, nullptr);
    EXPECT_TRUE(terminate_or_kill(p));
    EXPECT_EQ(p.exitcode(), -SIGTERM);
}

TEST(ProcessExit, TerminateAndKillAfterTheEndChangeNothing) {
    mp::Process p([] {});
    p.start();
    ASSERT_TRUE(p.join(kLong));
    EXPECT_NO_THROW(p.terminate());
    EXPECT_NO_THROW(p.kill());
    EXPECT_EQ(p.exitcode(), 0);
}

// ---------------------------------------------------------------------------------------------
// Misuse
// ---------------------------------------------------------------------------------------------

TEST(ProcessMisuse, StartingTwiceThrows) {
    Gate gate;
    mp::Process p([r = gate.reader()] { wait_gate(r); });
    p.start();
    const pid_t pid = p.pid();
    EXPECT_PROCESS_ERROR(p.start(), "twice", "already", "once");
    EXPECT_EQ(p.pid(), pid);
    gate.open();
    ASSERT_TRUE(p.join(kLong));
    EXPECT_PROCESS_ERROR(p.start(), "twice", "already", "once");
    EXPECT_EQ(p.exitcode(), 0);
}

TEST(ProcessMisuse, JoinBeforeStartThrows) {
    mp::Process p([] {});
    EXPECT_PROCESS_ERROR(p.join(), "start");
    EXPECT_PROCESS_ERROR(p.join(10ms), "start");
}

TEST(ProcessMisuse, SignalsBeforeStartThrow) {
    mp::Process p([] {});
    EXPECT_PROCESS_ERROR(p.terminate(), "start");
    EXPECT_PROCESS_ERROR(p.kill(), "start");
}

TEST(ProcessMisuse, JoinInTheChildThrows) {
    TestPipe out;
    mp::Process* self = nullptr;
    mp::Process p([&self, w = out.w.get()] {
        std::string r;
        try {
            self->join();
            r = "no exception";
        } catch (const mp::ProcessError& e) {
            r = std::string("ProcessError ") + e.what();
        } catch (...) {
            r = "other exception";
        }
        std::replace(r.begin(), r.end(), '\n', ' ');
        write_str(w, r + "\n");
    });
    self = &p;
    p.start();
    auto line = read_line(out.r.get());
    ASSERT_TRUE(line);
    EXPECT_EQ(line->rfind("ProcessError ", 0), 0u) << *line;
    ASSERT_TRUE(p.join(kLong));
    EXPECT_EQ(p.exitcode(), 0);
}

TEST(ProcessMisuse, DaemonCannotStartChildren) {
    TestPipe out;
    mp::ProcessOptions o;
    o.daemon = true;
    mp::Process p(o, [w = out.w.get()] {
        mp::Process q([] {});
        std::string r = q.daemon() ? "inherited-daemon" : "not-daemon";
        try {
            q.start();
            q.join();
            r += " started";
        } catch (const mp::ProcessError& e) {
            r += std::string(" ProcessError ") + e.what();
        } catch (...) {
            r += " other-exception";
        }
        std::replace(r.begin(), r.end(), '\n', ' ');
        write_str(w, r + "\n");
    });
    p.start();
    auto line = read_line(out.r.get());
    ASSERT_TRUE(line);
    EXPECT_EQ(line->rfind("inherited-daemon ", 0), 0u)
        << "a Process made in a daemon is a daemon by default: " << *line;
    EXPECT_NE(line->find(" ProcessError "), std::string::npos) << *line;
    EXPECT_TRUE(mentions_any(*line, {"daemon"})) << *line;
    ASSERT_TRUE(p.join(kLong));
    EXPECT_EQ(p.exitcode(), 0);
}

// ---------------------------------------------------------------------------------------------
// close()
// ---------------------------------------------------------------------------------------------

TEST(ProcessClose, ThrowsWhileTheChildRuns) {
    Gate gate;
    mp::Process p([r = gate.reader()] { wait_gate(r); });
    p.start();
    EXPECT_PROCESS_ERROR(p.close(), "running", "alive");
    EXPECT_TRUE(p.is_alive()) << "a refused close() leaves the Process usable";
    gate.open();
    ASSERT_TRUE(p.join(kLong));
    EXPECT_NO_THROW(p.close());
}

TEST(ProcessClose, AfterCloseEveryMethodButNameThrows) {
    mp::Process p([] {});
    p.start();
    ASSERT_TRUE(p.join(kLong));
    const std::string name = p.name();
    p.close();
    EXPECT_EQ(p.name(), name);
    EXPECT_PROCESS_ERROR(p.start(), "closed");
    EXPECT_PROCESS_ERROR(p.join(), "closed");
    EXPECT_PROCESS_ERROR(p.join(10ms), "closed");
    EXPECT_PROCESS_ERROR(p.is_alive(), "closed");
    EXPECT_PROCESS_ERROR(p.terminate(), "closed");
    EXPECT_PROCESS_ERROR(p.kill(), "closed");
    EXPECT_PROCESS_ERROR(p.pid(), "closed");
    EXPECT_PROCESS_ERROR(p.exitcode(), "closed");
    EXPECT_PROCESS_ERROR(p.sentinel(), "closed");
}

TEST(ProcessClose, AfterCloseAttributesThrowToo) {
    mp::Process p([] {});
    p.start();
    ASSERT_TRUE(p.join(kLong));
    p.close();
    EXPECT_PROCESS_ERROR(p.daemon(), "closed");
    EXPECT_PROCESS_ERROR(p.daemon(true), "closed");
    EXPECT_PROCESS_ERROR(p.authkey(), "closed");
    EXPECT_PROCESS_ERROR(p.authkey(std::string(32, 'k')), "closed");
    EXPECT_PROCESS_ERROR(p.start_method(), "closed");
    EXPECT_NO_THROW(p.name("renamed"));
    EXPECT_EQ(p.name(), "renamed");
}

TEST(ProcessClose, CloseBeforeStartThenStartThrows) {
    mp::Process p([] {});
    EXPECT_NO_THROW(p.close());
    EXPECT_PROCESS_ERROR(p.start(), "closed");
}

TEST(ProcessClose, ReleasesTheSentinel) {
    const std::size_t before = mp::test::count_fds();
    mp::Process p([] {});
    p.start();
    const int s = p.sentinel();
    ASSERT_TRUE(p.join(kLong));
    p.close();
    EXPECT_EQ(mp::test::count_fds(), before) << describe_fds(mp::test::list_fds());
    errno = 0;
    EXPECT_TRUE(::fcntl(s, F_GETFD) == -1 && errno == EBADF) << "the sentinel fd is still open";
}

// ---------------------------------------------------------------------------------------------
// Names and identity
// ---------------------------------------------------------------------------------------------

TEST(ProcessIdentity, DefaultNamesAreProcessNCountingUp) {
    mp::Process a([] {});
    mp::Process b([] {});
    auto na = process_number(a.name());
    auto nb = process_number(b.name());
    ASSERT_TRUE(na) << a.name();
    ASSERT_TRUE(nb) << b.name();
    EXPECT_GE(*na, 1);
    EXPECT_EQ(*nb, *na + 1);

    TestPipe out;
    mp::Process c([w = out.w.get()] { write_str(w, mp::current_process().name + "\n"); });
    EXPECT_EQ(process_number(c.name()), *nb + 1);
    c.start();
    EXPECT_EQ(read_line(out.r.get()), c.name());
    ASSERT_TRUE(c.join(kLong));
    EXPECT_EQ(c.name(), "Process-" + std::to_string(*nb + 1));
}

TEST(ProcessIdentity, NameFromOptionsAndSetter) {
    TestPipe out;
    mp::ProcessOptions o;
    o.name = "clock";
    mp::Process a(o, [w = out.w.get()] { write_str(w, mp::current_process().name + "\n"); });
    EXPECT_EQ(a.name(), "clock");
    mp::Process b([w = out.w.get()] { write_str(w, mp::current_process().name + "\n"); });
    b.name("worker");
    EXPECT_EQ(b.name(), "worker");
    a.start();
    EXPECT_EQ(read_line(out.r.get()), "clock");
    b.start();
    EXPECT_EQ(read_line(out.r.get()), "worker");
    ASSERT_TRUE(a.join(kLong));
    ASSERT_TRUE(b.join(kLong));
}

TEST(ProcessIdentity, GrandchildDefaultNameIsProcessNColonM) {
    TestPipe out;
    mp::Process p([w = out.w.get()] {
        mp::Process g1([w] {
            auto parent = mp::parent_process();
            std::string id;
            for (int i : mp::current_process().identity) id += std::to_string(i) + ",";
            write_str(w, "grandchild " + mp::current_process().name + " identity " + id +
                             " parent " + (parent ? parent->name : "none") + " " +
                             (parent ? std::to_string(parent->pid) : "0") + "\n");
        });
        mp::Process g2([] {});
        g1.start();
        g1.join();
        g2.start();
        g2.join();
        write_str(w, "child " + mp::current_process().name + " " + g1.name() + " " + g2.name() +
                         " " + std::to_string(::getpid()) + "\n");
    });
    const std::string n = p.name();
    auto number = process_number(n);
    ASSERT_TRUE(number) << n;
    p.start();
    auto g = read_line(out.r.get());
    auto c = read_line(out.r.get());
    ASSERT_TRUE(g && c);
    EXPECT_EQ(*c, "child " + n + " " + n + ":1 " + n + ":2 " + std::to_string(p.pid()));
    EXPECT_EQ(*g, "grandchild " + n + ":1 identity " + std::to_string(*number) + ",1, parent " +
                      n + " " + std::to_string(p.pid()));
    ASSERT_TRUE(p.join(kLong));
    EXPECT_EQ(p.exitcode(), 0);
}

TEST(ProcessIdentity, CurrentProcessInTheMainProcess) {
    const auto& me = mp::current_process();
    EXPECT_EQ(me.name, "MainProcess");
    EXPECT_EQ(me.pid, ::getpid());
    EXPECT_FALSE(me.daemon);
    EXPECT_TRUE(me.identity.empty());
    EXPECT_EQ(me.authkey.size(), 32u);
    EXPECT_FALSE(mp::parent_process().has_value());
}

TEST(ProcessIdentity, CurrentProcessInTheChild) {
    TestPipe out;
    auto report = [w = out.w.get()] {
        const auto& me = mp::current_process();
        std::string id;
        for (int i : me.identity) id += std::to_string(i) + ",";
        write_str(w, me.name + " " + std::to_string(me.pid) + " " + std::to_string(::getpid()) +
                         " " + (me.daemon ? "daemon" : "non-daemon") + " " + id + "\n");
    };
    mp::Process p(report);
    mp::ProcessOptions o;
    o.daemon = true;
    mp::Process d(o, report);
    p.start();
    auto line = read_line(out.r.get());
    const std::string pid = std::to_string(p.pid());
    EXPECT_EQ(line, p.name() + " " + pid + " " + pid + " non-daemon " +
                        std::to_string(process_number(p.name()).value_or(-1)) + ",");
    d.start();
    line = read_line(out.r.get());
    const std::string dpid = std::to_string(d.pid());
    EXPECT_EQ(line, d.name() + " " + dpid + " " + dpid + " daemon " +
                        std::to_string(process_number(d.name()).value_or(-1)) + ",");
    ASSERT_TRUE(p.join(kLong));
    ASSERT_TRUE(d.join(kLong));
    EXPECT_EQ(mp::current_process().name, "MainProcess") << "the parent's identity is unchanged";
}

TEST(ProcessIdentity, ChildStartsWithNoActiveChildren) {
    Gate gate;
    TestPipe out;
    mp::Process a([r = gate.reader()] { wait_gate(r); });
    a.start();
    mp::Process b([w = out.w.get()] {
        write_str(w, std::to_string(mp::active_children().size()) + "\n");
    });
    b.start();
    EXPECT_EQ(read_line(out.r.get()), "0") << "a child does not inherit its parent's children";
    ASSERT_TRUE(b.join(kLong));
    gate.open();
    ASSERT_TRUE(a.join(kLong));
}

TEST(ProcessLifetime, ChildJoinsItsNonDaemonChildrenAndTerminatesItsDaemonsWhenItsTargetReturns) {
    // Python runs the exit-time cleanup in a child too, when its run() returns.
    Subreaper reaper;  // grandchildren left behind come here, to be reaped
    TempDir dir;
    const std::string g1_marker = dir.file("g1");
    const std::string g2_marker = dir.file("g2");
    TestPipe out;
    mp::Process p([&, w = out.w.get()] {
        // Leaked on purpose: no destructor may join or terminate them, only the exit path.
        auto* g1 = new mp::Process([g1_marker] {
            std::this_thread::sleep_for(100ms);
            write_file_atomically(g1_marker, "finished");
        });
        mp::ProcessOptions o;
        o.daemon = true;
        TestPipe ready;
        auto* g2 = new mp::Process(o, [g2_marker, rw = ready.w.get()] {
            // The handler uses only async-signal-safe calls: open, write, close, rename.
            static char tmp[512], path[512];
            std::snprintf(tmp, sizeof tmp, "%s.tmp", g2_marker.c_str());
            std::snprintf(path, sizeof path, "%s", g2_marker.c_str());
            struct sigaction sa {};
            sa.sa_handler = [](int) {
                int fd = ::open(tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
                if (fd >= 0) {
                    (void)!::write(fd, "sigterm", 7);
                    ::close(fd);
                    ::rename(tmp, path);
                }
                ::_exit(0);
            };
            sigemptyset(&sa.sa_mask);
            ::sigaction(SIGTERM, &sa, nullptr);
            write_str(rw, "r");
            block_for(60s);
        });
        g1->start();
        g2->start();
        pollfd pfd{ready.r.get(), POLLIN, 0};
        ::poll(&pfd, 1, 10000);
        write_str(w, std::to_string(g1->pid()) + " " + std::to_string(g2->pid()) + "\n");
    });
    p.start();
    auto line = read_line(out.r.get());
    ASSERT_TRUE(line);
    ASSERT_TRUE(p.join(kLong));
    EXPECT_EQ(p.exitcode(), 0);
    const auto g1_at_join = slurp(g1_marker);
    EXPECT_EQ(g1_at_join, "finished") << "the child ended before its non-daemon child finished"
                                      << (g1_at_join ? ""
                                          : wait_for_file(g1_marker, 5s)
                                              ? " (that child finished later: orphaned, not joined)"
                                              : " (and that child never finished)");
    std::istringstream in(*line);
    pid_t g1 = 0, g2 = 0;
    in >> g1 >> g2;
    EXPECT_TRUE(mp::test::wait_pid_stopped(g2, 5s));
    EXPECT_EQ(wait_for_file(g2_marker, 5s), "sigterm")
        << "the child's daemon was not terminated when the child's target returned";
    EXPECT_TRUE(reaper.reap(5s).empty());
}

TEST(ProcessIdentity, ParentProcessInTheChild) {
    TestPipe out;
    mp::Process p([w = out.w.get()] {
        auto parent = mp::parent_process();
        if (!parent) {
            write_str(w, "none\n");
            return;
        }
        write_str(w, parent->name + " " + std::to_string(parent->pid) + " " +
                         (parent->is_alive() ? "alive" : "dead") + "\n");
    });
    p.start();
    EXPECT_EQ(read_line(out.r.get()), "MainProcess " + std::to_string(::getpid()) + " alive");
    ASSERT_TRUE(p.join(kLong));
    EXPECT_FALSE(mp::parent_process().has_value());
}

TEST(ProcessIdentity, ParentProcessIsAliveTurnsFalseWhenTheParentDies) {
    Subreaper reaper;  // the orphaned grandchild comes to this process, which reaps it
    TestPipe out;
    mp::Process p([w = out.w.get()] {
        mp::Process g([w] {
            auto parent = mp::parent_process();
            if (!parent) {
                write_str(w, "no-parent\n");
                return;
            }
            const auto deadline = Clock::now() + 10s;
            while (parent->is_alive() && Clock::now() < deadline) std::this_thread::sleep_for(2ms);
            write_str(w, parent->is_alive() ? "still-alive\n" : "dead\n");
        });
        g.start();
        write_str(w, "grandchild " + std::to_string(g.pid()) + "\n");
        ::_exit(0);  // leave without joining g
    });
    p.start();
    auto first = read_line(out.r.get());
    ASSERT_TRUE(first);
    ASSERT_TRUE(p.join(kLong));
    EXPECT_EQ(read_line(out.r.get()), "dead");
    EXPECT_TRUE(reaper.reap(kLong).empty());
}

// ---------------------------------------------------------------------------------------------
// daemon
// ---------------------------------------------------------------------------------------------

TEST(ProcessDaemon, DefaultsToTheCurrentProcesssFlag) {
    mp::Process a([] {});
    EXPECT_FALSE(a.daemon());
    mp::ProcessOptions yes;
    yes.daemon = true;
    mp::Process b(yes, [] {});
    EXPECT_TRUE(b.daemon());
    mp::ProcessOptions no;
    no.daemon = false;
    mp::Process c(no, [] {});
    EXPECT_FALSE(c.daemon());
    a.daemon(true);
    EXPECT_TRUE(a.daemon());
    a.daemon(false);
    EXPECT_FALSE(a.daemon());
}

TEST(ProcessDaemon, SettingTheFlagAfterStartThrows) {
    mp::Process p([] {});
    p.start();
    EXPECT_PROCESS_ERROR(p.daemon(true), "start");
    EXPECT_FALSE(p.daemon());
    ASSERT_TRUE(p.join(kLong));
    EXPECT_PROCESS_ERROR(p.daemon(true), "start");
}

TEST(ProcessDaemon, DaemonChildRunsAndIsJoined) {
    TestPipe out;
    mp::ProcessOptions o;
    o.daemon = true;
    mp::Process p(o, [w = out.w.get()] { write_str(w, "daemon ran\n"); });
    p.start();
    EXPECT_EQ(read_line(out.r.get()), "daemon ran");
    ASSERT_TRUE(p.join(kLong));
    EXPECT_EQ(p.exitcode(), 0);
}

// ---------------------------------------------------------------------------------------------
// sentinel
// ---------------------------------------------------------------------------------------------

TEST(ProcessSentinel, ThrowsBeforeStart) {
    mp::Process p([] {});
    EXPECT_PROCESS_ERROR(p.sentinel(), "start");
}

TEST(ProcessSentinel, IsAPidfdThatBecomesReadableWhenTheChildEnds) {
    Gate gate;
    mp::Process p([r = gate.reader()] { wait_gate(r); });
    p.start();
    const int s = p.sentinel();
    ASSERT_GE(s, 0);
    EXPECT_EQ(pidfd_target(s), p.pid()) << "the sentinel is a pidfd of the child";
    EXPECT_FALSE(poll_readable(s, 0ms)) << "readable while the child runs";
    EXPECT_FALSE(poll_readable(s, 20ms));
    gate.open();
    EXPECT_TRUE(poll_readable(s, kLong));
    ASSERT_TRUE(p.join(kLong));
    EXPECT_EQ(p.exitcode(), 0);
    EXPECT_EQ(p.sentinel(), s) << "the sentinel stays the same fd until close()";
    EXPECT_TRUE(poll_readable(s, 0ms));
}

// ---------------------------------------------------------------------------------------------
// authkey
// ---------------------------------------------------------------------------------------------

TEST(ProcessAuthkey, ChildInheritsTheParentsKey) {
    const std::string key = mp::current_process().authkey;
    ASSERT_EQ(key.size(), 32u);
    TestPipe out;
    mp::Process p([w = out.w.get()] { write_str(w, hex(mp::current_process().authkey) + "\n"); });
    EXPECT_EQ(p.authkey(), key);
    p.start();
    EXPECT_EQ(read_line(out.r.get()), hex(key));
    ASSERT_TRUE(p.join(kLong));
}

TEST(ProcessAuthkey, KeySetOnAProcessIsTheChildsKey) {
    const std::string main_key = mp::current_process().authkey;
    const std::string key = "a key set for this child only...";
    TestPipe out;
    mp::Process p([w = out.w.get()] { write_str(w, hex(mp::current_process().authkey) + "\n"); });
    p.authkey(key);
    EXPECT_EQ(p.authkey(), key);
    p.start();
    EXPECT_EQ(read_line(out.r.get()), hex(key));
    ASSERT_TRUE(p.join(kLong));
    EXPECT_EQ(mp::current_process().authkey, main_key);
}

TEST(ProcessAuthkey, ChangedCurrentKeyIsInheritedByNewProcesses) {
    const std::string saved = mp::current_process().authkey;
    mp::current_process().authkey = std::string(32, 'z');
    mp::Process p([] {});
    EXPECT_EQ(p.authkey(), std::string(32, 'z'));
    mp::current_process().authkey = saved;
}

// ---------------------------------------------------------------------------------------------
// active_children
// ---------------------------------------------------------------------------------------------

TEST(ProcessActiveChildren, ListsRunningChildren) {
    EXPECT_TRUE(mp::active_children().empty());
    Gate gate;
    mp::ProcessOptions ao;
    ao.name = "alpha";
    mp::ProcessOptions bo;
    bo.name = "beta";
    bo.daemon = true;
    mp::Process a(ao, [r = gate.reader()] { wait_gate(r); });
    mp::Process b(bo, [r = gate.reader()] { wait_gate(r); });
    a.start();
    b.start();
    auto kids = mp::active_children();
    EXPECT_EQ(kids.size(), 2u);
    auto ka = find_child(kids, a.pid());
    auto kb = find_child(kids, b.pid());
    ASSERT_TRUE(ka && kb);
    EXPECT_EQ(ka->name(), "alpha");
    EXPECT_FALSE(ka->daemon());
    EXPECT_TRUE(ka->is_alive());
    EXPECT_FALSE(ka->exitcode().has_value());
    EXPECT_EQ(kb->name(), "beta");
    EXPECT_TRUE(kb->daemon());
    EXPECT_GE(kb->sentinel(), 0);
    gate.open(2);
    ASSERT_TRUE(a.join(kLong));
    ASSERT_TRUE(b.join(kLong));
    EXPECT_TRUE(mp::active_children().empty());
    EXPECT_EQ(ka->exitcode(), 0);
    EXPECT_FALSE(ka->is_alive());
}

TEST(ProcessActiveChildren, FinishedChildrenAreReapedAndDisappear) {
    mp::Process p([] {});
    p.start();
    const pid_t pid = p.pid();
    const auto deadline = Clock::now() + kLong;
    while (contains_pid(mp::active_children(), pid) && Clock::now() < deadline) {
        std::this_thread::sleep_for(1ms);
    }
    EXPECT_FALSE(contains_pid(mp::active_children(), pid));
    EXPECT_FALSE(mp::test::pid_exists(pid)) << "active_children() reaps what ended (no zombie)";
    EXPECT_EQ(p.exitcode(), 0) << "the Process still knows how its child ended";
    EXPECT_FALSE(p.is_alive());
    EXPECT_TRUE(p.join(kLong));
}

TEST(ProcessActiveChildren, ViewsSignalAndJoinTheChild) {
    mp::Process a([] { block_for(60s); });
    mp::Process b([] { block_for(60s); });
    a.start();
    b.start();
    auto kids = mp::active_children();
    auto va = find_child(kids, a.pid());
    auto vb = find_child(kids, b.pid());
    ASSERT_TRUE(va && vb);
    EXPECT_FALSE(va->join(10ms));
    va->terminate();
    EXPECT_TRUE(va->join(kLong));
    EXPECT_EQ(va->exitcode(), -SIGTERM);
    EXPECT_EQ(a.exitcode(), -SIGTERM);
    EXPECT_FALSE(a.is_alive());
    vb->kill();
    vb->join();
    EXPECT_EQ(vb->exitcode(), -SIGKILL);
    EXPECT_TRUE(b.join(kLong));
    EXPECT_EQ(b.exitcode(), -SIGKILL);
}

// ---------------------------------------------------------------------------------------------
// cpu_count
// ---------------------------------------------------------------------------------------------

TEST(ProcessCpuCount, IsBetweenOneAndTheHardwareThreads) {
    const int n = mp::cpu_count();
    EXPECT_GE(n, 1);
    const long configured = std::max<long>(::sysconf(_SC_NPROCESSORS_CONF),
                                           static_cast<long>(std::thread::hardware_concurrency()));
    EXPECT_LE(n, configured);
    cpu_set_t set;
    CPU_ZERO(&set);
    ASSERT_EQ(::sched_getaffinity(0, sizeof set, &set), 0);
    EXPECT_LE(n, CPU_COUNT(&set));
}

TEST(ProcessCpuCount, FollowsTheAffinityMaskInAChild) {
    cpu_set_t mine;
    CPU_ZERO(&mine);
    ASSERT_EQ(::sched_getaffinity(0, sizeof mine, &mine), 0);
    std::vector<int> cpus;
    for (int c = 0; c < CPU_SETSIZE; ++c) {
        if (CPU_ISSET(c, &mine)) cpus.push_back(c);
    }
    ASSERT_FALSE(cpus.empty());
    const int parent_count = mp::cpu_count();
    // Without a CPU quota below the mask, cpu_count() is the mask size exactly.
    const bool exact = parent_count == CPU_COUNT(&mine);

    TestPipe out;
    mp::Process p([w = out.w.get(), cpus] {
        cpu_set_t one;
        CPU_ZERO(&one);
        CPU_SET(cpus[0], &one);
        std::string r = ::sched_setaffinity(0, sizeof one, &one) == 0
                            ? std::to_string(mp::cpu_count())
                            : std::string("setaffinity-failed");
        if (cpus.size() >= 2) {
            cpu_set_t two;
            CPU_ZERO(&two);
            CPU_SET(cpus[0], &two);
            CPU_SET(cpus[1], &two);
            r += ::sched_setaffinity(0, sizeof two, &two) == 0
                     ? " " + std::to_string(mp::cpu_count())
                     : std::string(" setaffinity-failed");
        }
        write_str(w, r + "\n");
    });
    p.start();
    auto line = read_line(out.r.get());
    ASSERT_TRUE(line);
    std::istringstream in(*line);
    std::string one, two;
    in >> one >> two;
    EXPECT_EQ(one, "1") << *line;
    if (cpus.size() >= 2) {
        if (exact) {
            EXPECT_EQ(two, "2") << *line;
        } else {
            EXPECT_TRUE(two == "1" || two == "2") << *line;
        }
    }
    ASSERT_TRUE(p.join(kLong));
    EXPECT_EQ(mp::cpu_count(), parent_count) << "the child's mask does not change the parent's";
}

// ---------------------------------------------------------------------------------------------
// Lifetime: reaping, the destructor policy, fd hygiene
// ---------------------------------------------------------------------------------------------

TEST(ProcessLifetime, NoZombieAfterJoin) {
    mp::Process p([] {});
    p.start();
    const pid_t pid = p.pid();
    ASSERT_TRUE(p.join(kLong));
    EXPECT_FALSE(mp::test::pid_exists(pid)) << "state " << mp::test::proc_info(pid).state;
}

TEST(ProcessLifetime, DestructorReapsAnEndedChild) {
    pid_t pid = 0;
    {
        mp::Process p([] {});
        p.start();
        pid = p.pid();
        // Let it end unjoined (a zombie, unless something reaps it already).
        const auto deadline = Clock::now() + kLong;
        while (mp::test::pid_running(pid) && Clock::now() < deadline) {
            std::this_thread::sleep_for(1ms);
        }
    }
    EXPECT_FALSE(mp::test::pid_exists(pid)) << "the destructor leaves a zombie";
}

TEST(ProcessLifetime, UnstartedProcessIsDestroyedQuietly) {
    { mp::Process p([] { ::_exit(3); }); }
    mp::ProcessOptions o;
    o.daemon = true;
    { mp::Process p(o, [] { ::_exit(3); }); }
    EXPECT_TRUE(mp::test::list_children().empty());
}

TEST(ProcessLifetime, DestructorJoinsALiveNonDaemonChild) {
    Watchdog watchdog(30s, "DestructorJoinsALiveNonDaemonChild");
    TempDir dir;
    const std::string marker = dir.file("finished");
    std::optional<mp::ChildProcess> view;
    pid_t pid = 0;
    const auto t0 = Clock::now();
    {
        mp::Process p([marker] {
            std::this_thread::sleep_for(200ms);
            write_file_atomically(marker, "finished");
        });
        p.start();
        pid = p.pid();
        view = find_child(mp::active_children(), pid);
    }
    const auto elapsed = Clock::now() - t0;
    EXPECT_EQ(slurp(marker), "finished") << "the destructor returned before the child ended";
    EXPECT_GE(elapsed, 200ms) << "the destructor takes at least the child's time";
    EXPECT_FALSE(mp::test::pid_exists(pid));
    ASSERT_TRUE(view);
    EXPECT_FALSE(view->is_alive());
    EXPECT_EQ(view->exitcode(), 0);
}

TEST(ProcessLifetime, DestructorTerminatesALiveDaemonChild) {
    Watchdog watchdog(30s, "DestructorTerminatesALiveDaemonChild");
    std::optional<mp::ChildProcess> view;
    pid_t pid = 0;
    {
        mp::ProcessOptions o;
        o.daemon = true;
        mp::Process p(o, [] { block_for(60s); });
        p.start();
        pid = p.pid();
        view = find_child(mp::active_children(), pid);
    }
    EXPECT_FALSE(mp::test::pid_exists(pid))
        << "the destructor leaves the daemon running or a zombie";
    ASSERT_TRUE(view);
    EXPECT_FALSE(view->is_alive());
    EXPECT_EQ(view->exitcode(), -SIGTERM);
}

TEST(ProcessLifetime, NoFdLeakAfter1000StartJoinCycles) {
    const auto before = mp::test::list_fds();
    for (int i = 0; i < 1000; ++i) {
        mp::Process p([] {});
        p.start();
        ASSERT_TRUE(p.join(kLong)) << "cycle " << i;
        ASSERT_EQ(p.exitcode(), 0) << "cycle " << i;
    }
    const auto after = mp::test::list_fds();
    EXPECT_EQ(after.size(), before.size()) << "before:" << describe_fds(before)
                                           << "\nafter:" << describe_fds(after);
    EXPECT_TRUE(mp::test::list_children().empty());
}

TEST(ProcessLifetime, ChildDoesNotInheritTheParentsOtherChildren) {
    // Two children at once: each is the parent's, neither is the other's, and both end cleanly.
    Gate gate;
    mp::Process a([r = gate.reader()] { wait_gate(r); });
    mp::Process b([r = gate.reader()] { wait_gate(r); });
    a.start();
    b.start();
    EXPECT_EQ(mp::test::proc_info(a.pid()).ppid, ::getpid());
    EXPECT_EQ(mp::test::proc_info(b.pid()).ppid, ::getpid());
    gate.open(2);
    ASSERT_TRUE(a.join(kLong));
    ASSERT_TRUE(b.join(kLong));
    EXPECT_EQ(a.exitcode(), 0);
    EXPECT_EQ(b.exitcode(), 0);
}

}  // namespace
