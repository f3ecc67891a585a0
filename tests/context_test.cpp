// Tests of mp/context.hpp: contexts and start methods (ported from CPython's
// _test_multiprocessing TestStartMethod: test_context, test_set_get, test_get_all,
// test_context_check_module_types, test_preload_resources), set_forkserver_preload, and the
// logger's settings passed to forkserver and spawn children (as Python's spawn passes
// log_to_stderr and the level). Scenarios that need a process with no forkserver yet run in a
// spawn child, whatever earlier tests of this binary started. Every wait is bounded.

#include <gtest/gtest.h>

#include <chrono>
#include <optional>
#include <ostream>
#include <stdexcept>
#include <string>
#include <sys/types.h>
#include <unistd.h>
#include <vector>

#include "mp/context.hpp"
#include "mp/mp.hpp"

using namespace std::chrono_literals;

namespace mp {
// Found by ADL: failures print "spawn", not the enum's bytes.
void PrintTo(StartMethod m, std::ostream* os) { *os << to_string(m); }
}  // namespace mp

namespace {

constexpr auto kLong = 30s;

// Set in the test process before a start: only a fork child, a copy, sees it.
int g_marker = 0;

// How the calling process was started, seen from inside it: a fork child has the marker; a
// spawn child is a fresh program whose parent is the starter; a forkserver child's parent is the
// server.
int observed_start(pid_t starter) {
    if (g_marker == 1) return static_cast<int>(mp::StartMethod::fork);
    if (::getppid() == starter) return static_cast<int>(mp::StartMethod::spawn);
    return static_cast<int>(mp::StartMethod::forkserver);
}

void report_start(mp::Connection w, pid_t starter) { w.send(observed_start(starter)); }

struct MarkerSet {
    MarkerSet() { g_marker = 1; }
    ~MarkerSet() { g_marker = 0; }
};

// CPython's check_context: a child made by ctx.Process says how it started.
void check_context(const mp::Context& ctx) {
    SCOPED_TRACE(mp::to_string(ctx.get_start_method()));
    MarkerSet marker;
    auto [r, w] = ctx.Pipe(false);
    mp::Process p = ctx.Process(report_start, w, ::getpid());
    p.start();
    w.close();
    ASSERT_TRUE(r.poll(kLong));
    EXPECT_EQ(static_cast<mp::StartMethod>(r.recv<int>()), ctx.get_start_method());
    ASSERT_TRUE(p.join(kLong));
    EXPECT_EQ(p.exitcode(), 0);
}

const std::vector<mp::StartMethod> kMethods = {mp::StartMethod::fork, mp::StartMethod::spawn,
                                               mp::StartMethod::forkserver};

/// Runs `scenario(w)` in a spawn child (a process that has started no forkserver) and returns
/// what it sent, one message per element, until it closed its end.
std::vector<std::string> in_fresh_process(void (*scenario)(mp::Connection)) {
    auto [r, w] = mp::Pipe(false);
    mp::Process p({.start_method = mp::StartMethod::spawn}, scenario, w);
    p.start();
    w.close();
    std::vector<std::string> out;
    while (r.poll(kLong)) {
        try {
            out.push_back(r.recv_bytes());
        } catch (const mp::EOFError&) {
            break;
        }
    }
    EXPECT_TRUE(p.join(kLong));
    EXPECT_EQ(p.exitcode(), 0);
    return out;
}

}  // namespace

// test_get_all: this binary is linked with the spawn hook, so all three, the default first.
TEST(TestStartMethod, GetAll) {
    EXPECT_EQ(mp::get_all_start_methods(), kMethods);
}

// test_context: a concrete context names its method, is its own get_context(), cannot change its
// method, and its Process starts that way.
TEST(TestStartMethod, Context) {
    for (mp::StartMethod method : kMethods) {
        const mp::Context ctx = mp::get_context(method);
        EXPECT_EQ(ctx.get_start_method(), method);
        EXPECT_FALSE(ctx.is_default());
        EXPECT_EQ(ctx.get_context(), ctx);
        EXPECT_EQ(ctx.get_context(mp::StartMethod::spawn), mp::get_context(mp::StartMethod::spawn));
        EXPECT_THROW(ctx.set_start_method(mp::StartMethod::spawn), std::invalid_argument);
        check_context(ctx);
    }
}

// test_set_get: the default context follows set_start_method.
TEST(TestStartMethod, SetGet) {
    const mp::StartMethod old_method = mp::get_start_method();
    int count = 0;
    for (mp::StartMethod method : kMethods) {
        mp::set_start_method(method, true);
        EXPECT_EQ(mp::get_start_method(), method);
        const mp::Context ctx = mp::get_context();
        EXPECT_TRUE(ctx.is_default());
        EXPECT_EQ(ctx.get_start_method(), method);
        EXPECT_EQ(ctx, mp::get_context());
        EXPECT_NE(ctx, mp::get_context(method));
        check_context(ctx);
        ++count;
    }
    mp::set_start_method(old_method, true);
    EXPECT_EQ(count, 3);
}

// set_start_method refuses a second setting without force, through the default context too.
TEST(TestStartMethod, SetTwiceNeedsForce) {
    const mp::StartMethod old_method = mp::get_start_method();  // fixes it
    EXPECT_THROW(mp::get_context().set_start_method(mp::StartMethod::fork), mp::ProcessError);
    mp::get_context().set_start_method(old_method, true);
    EXPECT_EQ(mp::get_start_method(), old_method);
}

namespace {
void allow_none_scenario(mp::Connection w) {
    auto name = [](std::optional<mp::StartMethod> m) { return m ? mp::to_string(*m) : std::string("none"); };
    w.send_bytes(name(mp::get_start_method(true)));
    w.send_bytes(name(mp::get_start_method(false)));
    w.send_bytes(name(mp::get_start_method(true)));
}
}  // namespace

// get_start_method(allow_none=True) is None until the default is fixed; get_start_method()
// fixes it (a spawn child starts with nothing fixed).
TEST(TestStartMethod, GetStartMethodAllowNone) {
    EXPECT_EQ(in_fresh_process(allow_none_scenario), (std::vector<std::string>{"none", "fork", "fork"}));
}

namespace {
void get_context_scenario(mp::Connection w) {
    auto name = [](std::optional<mp::StartMethod> m) { return m ? mp::to_string(*m) : std::string("none"); };
    w.send_bytes(name(mp::get_start_method(true)));
    const mp::Context ctx = mp::get_context();
    w.send_bytes(name(mp::get_start_method(true)));
    try {
        mp::set_start_method(mp::StartMethod::spawn);
        w.send_bytes("set");
    } catch (const mp::ProcessError&) {
        w.send_bytes("refused");
    }
    w.send_bytes(mp::to_string(ctx.get_start_method()));
}
}  // namespace

// Python's get_context() fixes the default start method: afterwards get_start_method(True) names
// it and set_start_method without force is refused ("context has already been set").
TEST(TestStartMethod, GetContextFixesTheDefault) {
    EXPECT_EQ(in_fresh_process(get_context_scenario),
              (std::vector<std::string>{"none", "fork", "refused", "fork"}));
}

namespace {
void set_by_name_scenario(mp::Connection w) {
    try {
        mp::set_start_method("spawnn");
        w.send_bytes("accepted");
    } catch (const std::invalid_argument& e) {
        w.send_bytes(e.what());
    }
    mp::set_start_method("spawn");
    w.send_bytes(mp::to_string(mp::get_start_method()));
    mp::set_start_method("forkserver", true);
    w.send_bytes(mp::to_string(mp::get_start_method()));
}
}  // namespace

// Methods by Python's names: get_context("spawn"), set_start_method("forkserver", force); an
// unknown name is std::invalid_argument with Python's message.
TEST(TestStartMethod, MethodsByName) {
    for (mp::StartMethod method : kMethods) {
        EXPECT_EQ(mp::parse_start_method(mp::to_string(method)), method);
        EXPECT_EQ(mp::get_context(mp::to_string(method)).get_start_method(), method);
    }
    try {
        (void)mp::get_context("threads");
        ADD_FAILURE() << "an unknown method was accepted";
    } catch (const std::invalid_argument& e) {
        EXPECT_STREQ(e.what(), "cannot find context for 'threads'");
    }
    EXPECT_EQ(in_fresh_process(set_by_name_scenario),
              (std::vector<std::string>{"cannot find context for 'spawnn'", "spawn", "forkserver"}));
}

// A concrete context binds pools and executors too; the default context leaves them to mp's
// defaults (forkserver), and options that contradict the context are refused.
TEST(TestStartMethod, ContextBindsPoolAndExecutor) {
    MarkerSet marker;
    for (mp::StartMethod method : kMethods) {
        SCOPED_TRACE(mp::to_string(method));
        const mp::Context ctx = mp::get_context(method);
        {
            mp::Pool pool = ctx.Pool(1);
            EXPECT_EQ(static_cast<mp::StartMethod>(pool.apply(observed_start, ::getpid())), method);
        }
        {
            mp::ProcessPoolExecutor ex = ctx.ProcessPoolExecutor({.max_workers = 1});
            EXPECT_EQ(static_cast<mp::StartMethod>(ex.submit(observed_start, ::getpid()).result(kLong)), method);
        }
        EXPECT_EQ(ctx.process_options().start_method, method);
        EXPECT_EQ(ctx.pool_options({.start_method = method}).start_method, method);
        const mp::StartMethod other =
            method == mp::StartMethod::fork ? mp::StartMethod::spawn : mp::StartMethod::fork;
        EXPECT_THROW((void)ctx.process_options({.start_method = other}), std::invalid_argument);
        EXPECT_THROW((void)ctx.pool_options({.start_method = other}), std::invalid_argument);
        EXPECT_THROW((void)ctx.executor_options({.start_method = other}), std::invalid_argument);
    }
    EXPECT_EQ(mp::get_context().process_options().start_method, std::nullopt);
    EXPECT_EQ(mp::get_context().pool_options().start_method, std::nullopt);
    mp::Pool pool = mp::get_context().Pool(1);
    EXPECT_EQ(static_cast<mp::StartMethod>(pool.apply(observed_start, ::getpid())),
              mp::StartMethod::forkserver);
}

// The other factories make working objects that children of any method share.
TEST(TestStartMethod, ContextFactories) {
    const mp::Context ctx = mp::get_context(mp::StartMethod::spawn);
    auto q = ctx.Queue<int>();
    auto lock = ctx.Lock();
    auto ev = ctx.Event();
    auto v = ctx.Value<int>(5);
    auto arr = ctx.Array<int>({1, 2, 3});
    mp::Process p = ctx.Process(
        [](mp::Queue<int> cq, mp::Lock clock, mp::Event cev, mp::Value<int> cv, mp::Array<int> carr) {
            std::lock_guard g(clock);
            cq.put(cv.get() + carr.get(2));
            cev.set();
        },
        q, lock, ev, v, arr);
    p.start();
    EXPECT_EQ(q.get(kLong), 8);
    EXPECT_TRUE(ev.wait(kLong));
    ASSERT_TRUE(p.join(kLong));
    EXPECT_EQ(p.exitcode(), 0);
    auto sq = ctx.SimpleQueue<std::string>();
    sq.put("x");
    EXPECT_EQ(sq.get(), "x");
    auto jq = ctx.JoinableQueue<int>(2);
    jq.put(1);
    EXPECT_EQ(jq.get(), 1);
    jq.task_done();
    auto cond = ctx.Condition(ctx.RLock());
    EXPECT_TRUE(cond.acquire());
    cond.release();
    EXPECT_TRUE(ctx.BoundedSemaphore(1).acquire());
    EXPECT_EQ(ctx.Barrier(1).wait(), 0);
    EXPECT_EQ(ctx.RawArray<int>(4).size(), 4u);
    EXPECT_EQ(ctx.RawValue<int>(7).get(), 7);
    EXPECT_GE(ctx.cpu_count(), 1);
    mp::SyncManager manager = ctx.Manager();
    auto d = manager.dict<std::string, int>();
    d.set("a", 1);
    EXPECT_EQ(d.get("a"), 1);
}

// test_context_check_module_types: what is not a function is refused when it is set.
TEST(TestStartMethod, ContextCheckModuleTypes) {
    EXPECT_THROW(mp::get_context(mp::StartMethod::forkserver).set_forkserver_preload({nullptr}),
                 std::invalid_argument);
}

// ---------------------------------------------------------------- set_forkserver_preload

namespace {

pid_t g_preloaded_by = 0;
int g_preload_runs = 0;

void preload_record() {
    g_preloaded_by = ::getpid();
    ++g_preload_runs;
}

void report_preload(mp::Connection w) {
    w.send_bytes(std::to_string(g_preloaded_by) + " " + std::to_string(g_preload_runs) + " " +
                 std::to_string(::getppid()));
}

// In a process with no forkserver yet: two forkserver children see the state the preload set
// in the server (run once, by the server: their parent); fork and spawn children do not, nor
// does this process; a preload set while the server runs is refused.
void preload_scenario(mp::Connection out) {
    mp::get_context(mp::StartMethod::forkserver).set_forkserver_preload({&preload_record});
    for (mp::StartMethod method : {mp::StartMethod::forkserver, mp::StartMethod::forkserver,
                                   mp::StartMethod::fork, mp::StartMethod::spawn}) {
        auto [r, w] = mp::Pipe(false);
        mp::Process p = mp::get_context(method).Process(report_preload, w);
        p.start();
        w.close();
        out.send_bytes(mp::to_string(method) + " " + (r.poll(kLong) ? r.recv_bytes() : "nothing"));
        if (!p.join(kLong)) p.kill();
    }
    out.send_bytes("here " + std::to_string(g_preloaded_by));
    try {
        mp::set_forkserver_preload({&preload_record});
        out.send_bytes("set while running: accepted");
    } catch (const mp::ProcessError&) {
        out.send_bytes("set while running: ProcessError");
    }
}

std::vector<std::string> split(const std::string& s) {
    std::vector<std::string> out(1);
    for (char c : s) {
        if (c == ' ')
            out.emplace_back();
        else
            out.back() += c;
    }
    return out;
}

}  // namespace

// test_preload_resources, in C++ terms.
TEST(TestStartMethod, PreloadResources) {
    const std::vector<std::string> got = in_fresh_process(preload_scenario);
    ASSERT_EQ(got.size(), 6u) << testing::PrintToString(got);
    const auto a = split(got[0]);
    const auto b = split(got[1]);
    ASSERT_EQ(a.size(), 4u) << got[0];
    ASSERT_EQ(b.size(), 4u) << got[1];
    EXPECT_EQ(a[0], "forkserver");
    EXPECT_NE(a[1], "0") << "the preload ran in the forkserver";
    EXPECT_EQ(a[1], a[3]) << "it ran in the forkserver, this child's parent";
    EXPECT_EQ(a[2], "1") << "once";
    EXPECT_EQ(b[1], a[1]) << "the second child inherits the same preloaded state";
    EXPECT_EQ(b[2], "1") << "the server did not run it again";
    EXPECT_EQ(split(got[2])[0], "fork");
    EXPECT_EQ(split(got[2])[1], "0") << "a fork child does not run it";
    EXPECT_EQ(split(got[3])[0], "spawn");
    EXPECT_EQ(split(got[3])[1], "0") << "a spawn child does not run it";
    EXPECT_EQ(got[4], "here 0") << "the process that set it does not run it";
    EXPECT_EQ(got[5], "set while running: ProcessError");
}

namespace {

void preload_throws() { throw std::runtime_error("preload failed on purpose"); }

void failing_preload_scenario(mp::Connection out) {
    mp::set_forkserver_preload({&preload_throws});
    auto [r, w] = mp::Pipe(false);
    mp::Process p = mp::get_context(mp::StartMethod::forkserver).Process(report_preload, w);
    try {
        p.start();
        out.send_bytes("started");
        (void)p.join(kLong);
    } catch (const mp::ProcessError& e) {
        out.send_bytes(e.what());
    }
}

}  // namespace

// A preload that throws stops the server's start: the start that needed it fails, saying why.
TEST(TestStartMethod, PreloadThatThrowsFailsTheStart) {
    testing::internal::CaptureStderr();
    const std::vector<std::string> got = in_fresh_process(failing_preload_scenario);
    const std::string err = testing::internal::GetCapturedStderr();
    ASSERT_EQ(got.size(), 1u) << testing::PrintToString(got);
    EXPECT_NE(got[0].find("set_forkserver_preload"), std::string::npos) << got[0];
    EXPECT_NE(err.find("preload failed on purpose"), std::string::npos) << err;
}

// ---------------------------------------------------------------- the logger in children

namespace {

// In the child: what its logger writes to stderr for a library record (a Finalize's subdebug
// line) and a warning, and its level.
void log_in_child(mp::Connection w) {
    testing::internal::CaptureStderr();
    {
        mp::util::Finalize f([] {});
        f();
    }
    mp::get_logger().warning("a warning");
    w.send_bytes(testing::internal::GetCapturedStderr());
    w.send(static_cast<int>(mp::get_logger().level()));
}

struct LoggerReset {
    ~LoggerReset() {
        mp::get_logger().set_sink({});
        mp::get_logger().set_level(mp::LogLevel::notset);
    }
};

std::pair<std::string, int> child_log(mp::StartMethod method) {
    auto [r, w] = mp::Pipe(false);
    mp::Process p({.name = "Logger", .start_method = method}, log_in_child, w);
    p.start();
    w.close();
    std::pair<std::string, int> out{"nothing", -1};
    if (r.poll(kLong)) out.first = r.recv_bytes();
    if (r.poll(kLong)) out.second = r.recv<int>();
    EXPECT_TRUE(p.join(kLong));
    EXPECT_EQ(p.exitcode(), 0);
    return out;
}

class LoggingInChild : public testing::TestWithParam<mp::StartMethod> {};

}  // namespace

// _TestLogging.test_level under spawn and forkserver: the child's logger follows the parent's
// level and log_to_stderr (Python's spawn preparation data); with logging off, the child's
// subdebug record does not appear (a warning does, as Python's last resort shows it). The
// forkserver child is told each time, not only when the server started.
TEST_P(LoggingInChild, FollowsTheParentsSetting) {
    LoggerReset reset;
    mp::log_to_stderr(mp::LogLevel::subdebug);
    auto [on, on_level] = child_log(GetParam());
    EXPECT_EQ(on, "[SUBDEBUG/Logger] finalizer calling its callback\n[WARNING/Logger] a warning\n");
    EXPECT_EQ(on_level, static_cast<int>(mp::LogLevel::subdebug));

    mp::get_logger().set_sink({});
    mp::get_logger().set_level(mp::LogLevel::notset);
    auto [off, off_level] = child_log(GetParam());
    EXPECT_EQ(off, "a warning\n");
    EXPECT_EQ(off_level, static_cast<int>(mp::LogLevel::notset));

    // A sink of the parent's own cannot follow: the child gets the level and the default sink.
    // (A fork child, a copy, has the parent's sink.)
    mp::get_logger().set_sink([](const mp::LogRecord&) {});
    mp::get_logger().set_level(mp::LogLevel::warning);
    auto [own, own_level] = child_log(GetParam());
    EXPECT_EQ(own, GetParam() == mp::StartMethod::fork ? "" : "a warning\n");
    EXPECT_EQ(own_level, static_cast<int>(mp::LogLevel::warning));
}

INSTANTIATE_TEST_SUITE_P(Context, LoggingInChild,
                         testing::Values(mp::StartMethod::fork, mp::StartMethod::forkserver,
                                         mp::StartMethod::spawn),
                         [](const auto& p) { return mp::to_string(p.param); });
