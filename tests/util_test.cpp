// Tests of mp/util.hpp: mp::util::Finalize (ported from CPython's _test_multiprocessing
// _TestFinalize) and the logging hook (after _TestLogging), including that the library's own
// diagnostics reach the hook. Children report through pipes; every wait is bounded.

#include <fcntl.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdlib>
#include <fstream>
#include <functional>
#include <mutex>
#include <optional>
#include <stdexcept>
#include <string>
#include <thread>
#include <unistd.h>
#include <vector>

#include "helpers/start_methods.hpp"
#include "helpers/temp_dir.hpp"
#include "mp/connection.hpp"
#include "mp/futures.hpp"
#include "mp/managers.hpp"
#include "mp/pool.hpp"
#include "mp/process.hpp"
#include "mp/util.hpp"

using namespace std::chrono_literals;

namespace {

constexpr auto kLong = 20s;

/// Restores the logger's default (no sink, level notset) when a test ends.
struct LoggerReset {
    ~LoggerReset() {
        mp::get_logger().set_sink({});
        mp::get_logger().set_level(mp::LogLevel::notset);
    }
};

/// Every message sent before the peer closed, until "STOP" (Python's iter(conn.recv, 'STOP')).
std::vector<std::string> until_stop(mp::Connection& c) {
    std::vector<std::string> out;
    while (c.poll(kLong)) {
        std::string m = c.recv_bytes();
        if (m == "STOP") break;
        out.push_back(std::move(m));
    }
    return out;
}

}  // namespace

// _TestFinalize.test_finalize: run on destruction ('a'), when called, once ('b'), not at exit
// without an exit priority ('c'), and at exit by priority, equal ones newest first.
TEST(TestFinalize, Finalize) {
    auto [conn, child_conn] = mp::Pipe();
    mp::Process p([c = child_conn]() {
        auto send = [c](const char* m) { return [c, m]() mutable { c.send_bytes(m); }; };
        { mp::util::Finalize a(send("a")); }
        mp::util::Finalize close_b(send("b"));
        close_b();
        close_b();
        mp::util::Finalize c1(send("c"));
        mp::util::Finalize d10(send("d10"), 1);
        mp::util::Finalize d01(send("d01"), 0);
        mp::util::Finalize d02(send("d02"), 0);
        mp::util::Finalize d03(send("d03"), 0);
        mp::util::Finalize e(send("e"), -10);
        mp::util::Finalize stop(send("STOP"), -100);
        // As the Python test: run the exit-time finalizers, then leave without destroying locals.
        mp::util::run_finalizers();
        ::_exit(0);
    });
    p.start();
    child_conn.close();
    ASSERT_TRUE(p.join(kLong));
    EXPECT_EQ(p.exitcode(), 0);
    EXPECT_EQ(until_stop(conn),
              (std::vector<std::string>{"a", "b", "d10", "d03", "d02", "d01", "e"}));
}

// At a real exit() the handler runs this process's finalizers, and a forked child that exits
// does not run its parent's (Python checks the pid; the child clears the registry).
TEST(TestFinalize, AtExitOnlyInTheRegisteringProcess) {
    auto [conn, child_conn] = mp::Pipe();
    mp::util::Finalize parents([c = child_conn]() mutable { c.send_bytes("parent's"); }, 5);
    mp::Process p([c = child_conn]() {
        static std::optional<mp::util::Finalize> own;
        own.emplace([c]() mutable { c.send_bytes("child's"); }, 1);
        std::exit(0);  // atexit handlers run here, the parent's finalizer among the registered
    });
    p.start();
    ASSERT_TRUE(p.join(kLong));
    EXPECT_EQ(p.exitcode(), 0);
    // What the child sent, then nothing more: the parent's finalizer did not run there.
    child_conn.send_bytes("STOP");
    EXPECT_EQ(until_stop(conn), std::vector<std::string>{"child's"});
    EXPECT_TRUE(parents.still_active());
    parents.cancel();
    EXPECT_FALSE(parents.still_active());
}

// A copy of a Finalize in a forked child, destroyed or called there, is not the child's.
TEST(TestFinalize, ForkedChildDoesNotRunParents) {
    auto [conn, child_conn] = mp::Pipe();
    std::optional<mp::util::Finalize> f;
    f.emplace([c = child_conn]() mutable { c.send_bytes("ran"); });
    mp::Process p([&f] {
        if (f->still_active()) std::_Exit(3);  // not active here: it is the parent's
        (*f)();
        f.reset();
    });
    p.start();
    ASSERT_TRUE(p.join(kLong));
    EXPECT_EQ(p.exitcode(), 0);
    EXPECT_FALSE(conn.poll(0s));
    ASSERT_TRUE(f->still_active());
    f.reset();  // the parent's own: runs now
    ASSERT_TRUE(conn.poll(kLong));
    EXPECT_EQ(conn.recv_bytes(), "ran");
}

// A fork child starts with fresh locks for what it may take first: the finalizer registry (a
// Finalize with an exit priority) and the sink list (set_sink, log_to_stderr), which another
// thread of the parent may have held at the moment of fork. Seen from outside: 2-8 of 200
// children hung on the registry, 17-20 of 20 on the sink list, with a parent thread churning.
// Each round forks while a thread makes and drops finalizers, or replaces the sink; every child
// must end. (Skipped under ASan: GCC 12's allocator is not fork-safe in a threaded parent, the
// very fault this test would then meet in the allocator instead.)
// `max_churns`: a bound on the parent thread's rounds (each replaced sink is kept until exit).
void fork_children_while(const std::function<void()>& churn_once, const std::function<void()>& in_child,
                         long max_churns = -1) {
    std::atomic<bool> stop{false};
    std::atomic<bool> churning{true};
    std::thread churn([&] {
        for (long n = 0; !stop.load(std::memory_order_relaxed) && n != max_churns; ++n) churn_once();
        churning = false;
    });
    int hung = 0;
    int children = 0;
    constexpr int kChildren = 300;
    for (; children < kChildren && churning; ++children) {
        mp::Process p({.start_method = mp::StartMethod::fork}, [&in_child] { in_child(); });
        p.start();
        if (!p.join(3s)) {
            ++hung;
            p.kill();
            ASSERT_TRUE(p.join(kLong));
        } else {
            EXPECT_EQ(p.exitcode(), 0);
        }
    }
    stop = true;
    churn.join();
    EXPECT_GE(children, 20) << "children forked while the parent's thread ran";
    EXPECT_EQ(hung, 0) << "of " << children << " children forked while a parent thread held the lock at times";
}

TEST(TestFinalize, AForkChildMakesFinalizersWhileItsParentMakesAndDropsThem) {
#if defined(__SANITIZE_ADDRESS__)
    GTEST_SKIP() << "ASan's allocator is not fork-safe in a threaded parent (GCC 12's libasan)";
#endif
    fork_children_while([] { mp::util::Finalize f([] {}, 1); }, [] { mp::util::Finalize f([] {}, 5); });
}

TEST(TestLogging, AForkChildSetsItsSinkWhileItsParentReplacesItsOwn) {
#if defined(__SANITIZE_ADDRESS__)
    GTEST_SKIP() << "ASan's allocator is not fork-safe in a threaded parent (GCC 12's libasan)";
#endif
    fork_children_while([] { mp::get_logger().set_sink([](const mp::LogRecord&) {}); },
                        [] { mp::get_logger().set_sink([](const mp::LogRecord&) {}); }, 4'000'000);
    mp::get_logger().set_sink(nullptr);
}

TEST(TestFinalize, CancelMoveAndThrowingCallback) {
    LoggerReset reset;
    std::vector<std::string> logged;
    mp::get_logger().set_sink([&](const mp::LogRecord& r) { logged.emplace_back(r.message); });
    int runs = 0;
    {
        mp::util::Finalize f([&] { ++runs; }, 3);
        f.cancel();
        EXPECT_FALSE(f.still_active());
    }
    EXPECT_EQ(runs, 0);
    {
        mp::util::Finalize f([&] { ++runs; });
        mp::util::Finalize g = std::move(f);
        EXPECT_FALSE(f.still_active());  // NOLINT(bugprone-use-after-move)
        EXPECT_TRUE(g.still_active());
    }
    EXPECT_EQ(runs, 1);
    {
        mp::util::Finalize f([] { throw std::runtime_error("boom"); }, 0);
        mp::util::run_finalizers(1);  // below min_priority: not run
        EXPECT_TRUE(f.still_active());
        mp::util::run_finalizers(0);
        EXPECT_FALSE(f.still_active());
    }
    ASSERT_EQ(logged.size(), 1u);
    EXPECT_NE(logged[0].find("boom"), std::string::npos) << logged[0];
}

// _TestLogging.test_enable_logging: off by default below warning; log_to_stderr shows records
// as "[LEVEL/process name] message" from its level up.
TEST(TestLogging, EnableLogging) {
    LoggerReset reset;
    mp::Logger& logger = mp::get_logger();
    EXPECT_EQ(logger.level(), mp::LogLevel::notset);
    testing::internal::CaptureStderr();
    logger.debug("this will not be printed");
    logger.info("nor will this");
    logger.warning("a warning, as Python's last resort shows it");
    std::string err = testing::internal::GetCapturedStderr();
    EXPECT_EQ(err, "a warning, as Python's last resort shows it\n");

    EXPECT_EQ(&mp::log_to_stderr(mp::LogLevel::subwarning), &logger);
    EXPECT_EQ(logger.level(), mp::LogLevel::subwarning);
    testing::internal::CaptureStderr();
    logger.info("nor will this");
    logger.subwarning("shown");
    logger.error("and this");
    err = testing::internal::GetCapturedStderr();
    EXPECT_EQ(err, "[SUBWARNING/MainProcess] shown\n[ERROR/MainProcess] and this\n");
}

// _TestLogging.test_level: the level set here holds in a child (fork: the child is a copy).
TEST(TestLogging, Level) {
    LoggerReset reset;
    constexpr auto kLevel1 = static_cast<mp::LogLevel>(32);
    mp::get_logger().set_level(kLevel1);
    EXPECT_EQ(mp::get_logger().level(), kLevel1);
    auto [r, w] = mp::Pipe(false);
    mp::Process p([w = w]() mutable { w.send(static_cast<int>(mp::get_logger().level())); });
    p.start();
    ASSERT_TRUE(r.poll(kLong));
    EXPECT_EQ(r.recv<int>(), 32);
    ASSERT_TRUE(p.join(kLong));
}

// The sink receives every record that passes the level, with the process name; one that throws
// loses its record and nothing else; an empty sink restores the default.
TEST(TestLogging, SinkReceivesRecords) {
    LoggerReset reset;
    std::vector<std::pair<mp::LogLevel, std::string>> got;
    mp::Logger& logger = mp::get_logger();
    logger.set_level(mp::LogLevel::debug);
    logger.set_sink([&](const mp::LogRecord& r) {
        EXPECT_EQ(r.process_name, "MainProcess");
        EXPECT_EQ(r.pid, ::getpid());
        got.emplace_back(r.level, std::string(r.message));
    });
    logger.subdebug("dropped");
    logger.debug("one");
    logger.critical("two");
    ASSERT_EQ(got.size(), 2u);
    EXPECT_EQ(got[0], std::pair(mp::LogLevel::debug, std::string("one")));
    EXPECT_EQ(got[1], std::pair(mp::LogLevel::critical, std::string("two")));

    logger.set_sink([](const mp::LogRecord&) { throw std::runtime_error("sink failed"); });
    EXPECT_NO_THROW(logger.error("lost"));
    logger.set_sink({});
    testing::internal::CaptureStderr();
    logger.debug("dropped: no sink");
    logger.error("back on stderr");
    EXPECT_EQ(testing::internal::GetCapturedStderr(), "back on stderr\n");
}

// The library's own diagnostics go through the hook: here a future's done callback that throws
// (concurrent.futures logs it with LOGGER.exception).
TEST(TestLogging, LibraryDiagnosticsReachTheSink) {
    LoggerReset reset;
    std::vector<std::pair<mp::LogLevel, std::string>> got;
    mp::get_logger().set_sink(
        [&](const mp::LogRecord& r) { got.emplace_back(r.level, std::string(r.message)); });
    testing::internal::CaptureStderr();
    mp::Promise<int> p;
    p.future().add_done_callback([](const mp::Future<int>&) { throw std::runtime_error("doh!"); });
    p.set_result(1);
    const std::string err = testing::internal::GetCapturedStderr();
    EXPECT_EQ(err, "") << "nothing bypasses the sink";
    ASSERT_EQ(got.size(), 1u);
    EXPECT_EQ(got[0].first, mp::LogLevel::error);
    EXPECT_NE(got[0].second.find("exception calling callback for future: doh!"), std::string::npos)
        << got[0].second;
}

namespace {

// Appends `line` to the file at `path`, from whichever process logs.
void append_line(const std::string& path, const std::string& line) {
    const int fd = ::open(path.c_str(), O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0600);
    if (fd < 0) return;
    const std::string l = line + "\n";
    (void)!::write(fd, l.data(), l.size());
    ::close(fd);
}

std::vector<std::string> lines_of(const std::string& path) {
    std::ifstream in(path);
    std::vector<std::string> out;
    for (std::string l; std::getline(in, l);) out.push_back(l);
    return out;
}

// Records as "LEVEL/process message" lines in `path`; a fork child (a copy) writes there too.
void log_to_file(const std::string& path) {
    mp::get_logger().set_level(mp::LogLevel::debug);
    mp::get_logger().set_sink([path](const mp::LogRecord& r) {
        append_line(path, std::string(mp::level_name(r.level)) + "/" + std::string(r.process_name) + " " +
                              std::string(r.message));
    });
}

// The lines of `lines` that start with `prefix`, in their order.
std::vector<std::string> starting_with(const std::vector<std::string>& lines, const std::string& prefix) {
    std::vector<std::string> out;
    for (const auto& l : lines)
        if (l.rfind(prefix, 0) == 0) out.push_back(l);
    return out;
}

// A child's exit, as Python's util._exit_function: its finalizers of priority 0 and up run
// before its children are joined (here one opens the gate its child waits for), the others
// after (by then the child has finished).
void finalizers_around_join(std::string dir) {
    static mp::util::Finalize open_gate([dir] { append_line(dir + "/gate", "open"); }, 0);
    static mp::util::Finalize after([dir] {
        append_line(dir + "/after", ::access((dir + "/grandchild").c_str(), F_OK) == 0 ? "grandchild done"
                                                                                       : "grandchild running");
    }, -1);
    static std::optional<mp::Process> grandchild;  // still running as this child ends
    grandchild.emplace(mp::ProcessOptions{.start_method = mp::StartMethod::fork}, [dir] {
        const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(10);
        bool open = false;
        while (!(open = ::access((dir + "/gate").c_str(), F_OK) == 0) && std::chrono::steady_clock::now() < deadline)
            std::this_thread::sleep_for(std::chrono::milliseconds(2));
        append_line(dir + "/grandchild", open ? "saw the gate" : "timed out");
    });
    grandchild->start();
}

class FinalizeInChild : public mp::test::StartMethodTest {};

}  // namespace

// Finalizers with an exit priority made in a child run when the child ends (they never ran:
// a child left with _exit after joining its children), in Python's order around the join.
TEST_P(FinalizeInChild, RunAsTheChildEndsAroundJoiningItsChildren) {
    mp::test::TempDir dir;
    mp::Process p(options(), finalizers_around_join, dir.path);
    p.start();
    ASSERT_TRUE(p.join(kLong));
    EXPECT_EQ(p.exitcode(), 0);
    EXPECT_EQ(lines_of(dir.file("gate")), std::vector<std::string>{"open"});
    EXPECT_EQ(lines_of(dir.file("grandchild")), std::vector<std::string>{"saw the gate"});
    EXPECT_EQ(lines_of(dir.file("after")), std::vector<std::string>{"grandchild done"});
}

MP_INSTANTIATE_START_METHODS(FinalizeInChild);

// A child's life as Python's multiprocessing logs it: its start (info), its exit steps (info and
// debug) and its exit code.
TEST(TestLogging, AChildsLifeIsLogged) {
    LoggerReset reset;
    mp::test::TempDir dir;
    const std::string log = dir.file("log");
    log_to_file(log);
    mp::Process ok(mp::ProcessOptions{.name = "Fine"}, [] {});
    ok.start();
    ASSERT_TRUE(ok.join(kLong));
    mp::Process failing(mp::ProcessOptions{.name = "Failing"}, [] { throw std::runtime_error("no"); });
    testing::internal::CaptureStderr();  // its "Process Failing:" report
    failing.start();
    ASSERT_TRUE(failing.join(kLong));
    (void)testing::internal::GetCapturedStderr();
    const auto lines = lines_of(log);
    ASSERT_EQ(starting_with(lines, "INFO/Fine ").size() + starting_with(lines, "DEBUG/Fine ").size(), 5u);
    EXPECT_EQ(starting_with(lines, "INFO/Fine ").front(), "INFO/Fine child process calling self.run()");
    const std::vector<std::string> exit_steps{
        "INFO/Fine process shutting down",
        "DEBUG/Fine running all \"atexit\" finalizers with priority >= 0",
        "DEBUG/Fine running the remaining \"atexit\" finalizers",
        "INFO/Fine process exiting with exitcode 0",
    };
    auto fine_all = lines;
    std::erase_if(fine_all, [](const std::string& l) { return l.find("/Fine ") == std::string::npos; });
    EXPECT_EQ(std::vector<std::string>(fine_all.begin() + 1, fine_all.end()), exit_steps);
    EXPECT_EQ(starting_with(lines, "INFO/Failing process exiting with exitcode"),
              std::vector<std::string>{"INFO/Failing process exiting with exitcode 1"});
}

// Under spawn the child follows log_to_stderr and the level, and logs its start and exit code.
TEST(TestLogging, ASpawnChildLogsItsLifeToStderr) {
    LoggerReset reset;
    mp::test::TempDir dir;
    mp::log_to_stderr(mp::LogLevel::info);
    {
        // The child's stderr is this process's when it starts.
        std::fflush(stderr);
        const int saved = ::fcntl(2, F_DUPFD_CLOEXEC, 3);
        const int file = ::open(dir.file("err").c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
        ASSERT_GE(file, 0);
        ::dup2(file, 2);
        mp::Process p(mp::ProcessOptions{.name = "Spawned", .start_method = mp::StartMethod::spawn}, [] {});
        p.start();
        const bool joined = p.join(kLong);
        ::dup2(saved, 2);
        ::close(saved);
        ::close(file);
        ASSERT_TRUE(joined);
    }
    const auto lines = lines_of(dir.file("err"));
    EXPECT_EQ(starting_with(lines, "[INFO/Spawned] child process calling self.run()").size(), 1u);
    EXPECT_EQ(starting_with(lines, "[INFO/Spawned] process exiting with exitcode 0").size(), 1u);
    EXPECT_TRUE(starting_with(lines, "[DEBUG/Spawned]").empty()) << "the level is info";
}

// A Pool's and a manager's lifecycle lines, in the parent and (fork) in the worker and server.
TEST(TestLogging, PoolAndManagerLifecyclesAreLogged) {
    LoggerReset reset;
    mp::test::TempDir dir;
    const std::string log = dir.file("log");
    log_to_file(log);
    {
        mp::Pool pool(mp::PoolOptions{.processes = 1, .start_method = mp::StartMethod::fork});
        pool.close();
        pool.join();
    }
    {
        mp::SyncManager manager;
        auto d = manager.dict<int, int>();
        d.set(1, 2);
        manager.shutdown();
    }
    const auto lines = lines_of(log);
    auto has = [&](const std::string& prefix) { return !starting_with(lines, prefix).empty(); };
    EXPECT_TRUE(has("DEBUG/MainProcess added worker"));
    EXPECT_TRUE(has("DEBUG/MainProcess closing pool"));
    EXPECT_TRUE(has("DEBUG/MainProcess joining pool"));
    EXPECT_EQ(std::count_if(lines.begin(), lines.end(),
                            [](const std::string& l) { return l.ends_with(" worker exiting after 0 tasks"); }),
              1);
    EXPECT_TRUE(has("DEBUG/MainProcess requesting creation of a shared '"));
    EXPECT_TRUE(has("INFO/MainProcess sending shutdown message to manager"));
    EXPECT_TRUE(has("INFO/ManagerServer manager serving at '"));
    EXPECT_TRUE(has("DEBUG/ManagerServer manager received shutdown message"));
}
