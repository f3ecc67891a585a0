// mp::mpi under mpirun: rank 0 runs the GoogleTest suite (each test makes its own Executor,
// so executors follow one another as in `python -m mpi4py.futures`), the other ranks serve.
// Other modes (argv[1]) are single scenarios that ctest checks by exit status and output:
//   --expect-mismatch  rank 0 of an MPMD job whose workers run mpi_test_variant (this source
//                      built with MP_MPI_TEST_VARIANT=1, so a different build id): the Executor
//                      must be refused with an mp::Error naming rank 1; exits 0 when it is.
//   --crash-worker     a task kills its worker rank with SIGSEGV (no isolate_tasks): Open MPI
//                      must end the job (non-zero, a message naming the signal) instead of
//                      leaving rank 0 waiting.
//   --throw-in-root    mp::mpi::run with a root_main that throws: exit code 1, workers stopped.
//   --forged-answer    a task sends rank 0 an answer for itself that cannot be decoded: its
//                      future must fail with mp::BrokenProcessPool (not be lost), and the job
//                      must still end (its rank blocked sending the real, unread answer is
//                      drained before MPI_Finalize); exits 0 then.
//   --second-environment  an Environment, an executor, the Environment's end; then a second
//                      Environment on every rank must be mp::Error (MPI cannot start twice),
//                      not an Open MPI abort; exits 0 when it is.
//   --worker-returns-early  the worker ranks return from main without serve(): their
//                      Environment's end serves until the root's stop, so the root's executor
//                      still works and the job ends (instead of hanging); exits 0 then.
// Under -n 2 (one worker rank) the suite runs the MpiOneWorker tests (ctest mpi.one_worker),
// which need every task to go to the same rank; under -n 3 they are skipped.
#include <gtest/gtest.h>
#include <mpi.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <csignal>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <future>
#include <set>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include "helpers/gate_file.hpp"
#include "mp/mpi.hpp"

#ifndef MP_MPI_TEST_VARIANT
#define MP_MPI_TEST_VARIANT 0
#endif

using namespace std::chrono_literals;

namespace {

// Part of the binary, so mpi_test and mpi_test_variant differ (and so do their build ids).
volatile int variant = MP_MPI_TEST_VARIANT;

int square(int x) { return x * x; }

int my_rank() {
    int r = -1;
    MPI_Comm_rank(MPI_COMM_WORLD, &r);
    return r;
}

int rank_after(int ms) {
    std::this_thread::sleep_for(std::chrono::milliseconds(ms));
    return my_rank();
}

int sleep_then(int ms) {
    std::this_thread::sleep_for(std::chrono::milliseconds(ms));
    return ms;
}

using mp::test::FileGate;
using mp::test::TempDir;
using mp::test::wait_file;

// Waits for the gate (see wait_file), then says which rank ran it.
int rank_at_gate(const std::string& path) {
    (void)wait_file(path);
    return my_rank();
}

int checked_inverse(int x) {
    if (x == 0) throw std::invalid_argument("zero has no inverse");
    return 1000 / x;
}

struct CustomError : std::exception {
    const char* what() const noexcept override { return "a custom failure"; }
};
int throws_custom(int) { throw CustomError(); }

int at(std::vector<int> v, int i) { return v.at(static_cast<std::size_t>(i)); }

// A large value both ways: the argument's checksum, and a result of the same size.
std::string echo_big(const std::string& s) {
    std::string out(s.size(), '\0');
    for (std::size_t i = 0; i < s.size(); ++i) out[i] = static_cast<char>(s[i] + 1);
    return out;
}

std::atomic<int> void_calls{0};
void nothing(int) { void_calls.fetch_add(1); }

// The default disposition first, so a sanitizer's SIGSEGV handler does not turn the crash into
// an abort (mpi.rank_dies expects Open MPI to name signal 11).
void crash(int) {
    std::signal(SIGSEGV, SIG_DFL);
    std::raise(SIGSEGV);
}

TEST(MpiExecutor, SubmitReturnsTheResult) {
    mp::mpi::Executor ex;
    EXPECT_EQ(ex.max_workers(), 2);
    auto f = ex.submit(square, 7);
    EXPECT_EQ(f.result(60s), 49);
    auto g = ex.submit([](int a, int b) { return a + b; }, 2, 3);
    EXPECT_EQ(g.result(60s), 5);
}

TEST(MpiExecutor, VoidTask) {
    mp::mpi::Executor ex;
    auto f = ex.submit(nothing, 1);
    f.result(60s);
    EXPECT_TRUE(f.done());
    EXPECT_EQ(void_calls.load(), 0);  // ran on a worker rank, not here
}

TEST(MpiExecutor, MapKeepsInputOrderWithAnyChunksize) {
    mp::mpi::Executor ex;
    std::vector<int> xs(10000);
    for (int i = 0; i < 10000; ++i) xs[static_cast<std::size_t>(i)] = i;
    for (std::size_t chunk : {std::size_t{1}, std::size_t{7}, std::size_t{1000}, std::size_t{20000}}) {
        auto out = ex.map({.chunksize = chunk, .timeout = 60s}, square, xs).to_vector();
        ASSERT_EQ(out.size(), xs.size()) << chunk;
        for (int i = 0; i < 10000; ++i) ASSERT_EQ(out[static_cast<std::size_t>(i)], i * i) << chunk;
    }
    std::vector<int> none;
    EXPECT_TRUE(ex.map(square, none).to_vector().empty());
    // A per-task time limit cannot be kept over MPI: refused before anything is submitted.
    EXPECT_THROW(ex.map({.task_timeout = 1s}, square, xs), mp::Error);
    // Zipped ranges, up to the shortest.
    std::vector<int> a{1, 2, 3}, b{10, 20};
    auto sums = ex.map({.timeout = 60s}, [](int x, int y) { return x + y; }, a, b).to_vector();
    EXPECT_EQ(sums, (std::vector<int>{11, 22}));
}

TEST(MpiExecutor, WorkIsSpreadOverEveryWorkerRank) {
    mp::mpi::Executor ex;
    std::vector<int> ms(40, 5);
    auto ranks = ex.map({.timeout = 60s}, rank_after, ms).to_vector();
    std::set<int> seen(ranks.begin(), ranks.end());
    EXPECT_EQ(seen, (std::set<int>{1, 2}));
}

TEST(MpiExecutor, ExceptionsComeBackAsFromTheLocalPool) {
    mp::mpi::Executor ex;
    EXPECT_THROW(ex.submit(checked_inverse, 0).result(60s), std::invalid_argument);
    EXPECT_THROW(ex.submit(at, std::vector<int>{1}, 5).result(60s), std::out_of_range);
    try {
        ex.submit(throws_custom, 1).result(60s);
        FAIL() << "no exception";
    } catch (const mp::RemoteError& e) {
        EXPECT_NE(std::string(e.type_name()).find("CustomError"), std::string::npos) << e.type_name();
        EXPECT_EQ(e.message(), "a custom failure");
        EXPECT_NE(e.origin().find("MPIRank-"), std::string::npos) << e.origin();
    }
    // In a map, a failing item fails only itself.
    std::vector<int> xs{5, 0, 10};
    auto res = ex.map({.chunksize = 3, .timeout = 60s}, checked_inverse, xs);
    auto it = res.begin();
    EXPECT_EQ(*it, 200);
    ++it;
    EXPECT_THROW(*it, std::invalid_argument);
    ++it;
    EXPECT_EQ(*it, 100);
}

TEST(MpiExecutor, WaitAndAsCompleted) {
    mp::mpi::Executor ex;
    std::vector<mp::Future<int>> fs;
    for (int ms : {400, 10, 200, 20}) fs.push_back(ex.submit(sleep_then, ms));
    auto first = mp::wait(fs, 60s, mp::FIRST_COMPLETED);
    EXPECT_FALSE(first.done.empty());
    std::vector<int> order;
    for (auto& f : mp::as_completed(fs, 60s)) order.push_back(f.result());
    std::sort(order.begin(), order.end());
    EXPECT_EQ(order, (std::vector<int>{10, 20, 200, 400}));
    auto all = mp::wait(fs, 60s);
    EXPECT_EQ(all.done.size(), 4u);
    EXPECT_TRUE(all.not_done.empty());
}

TEST(MpiExecutor, HundredMegabyteArgumentAndResult) {
    mp::mpi::Executor ex;
    std::string big(100u << 20, '\0');
    for (std::size_t i = 0; i < big.size(); ++i) big[i] = static_cast<char>(i * 131 % 251);
    auto f = ex.submit(echo_big, big);
    const std::string out = f.result(120s);
    ASSERT_EQ(out.size(), big.size());
    for (std::size_t i = 0; i < big.size(); i += 4093)
        ASSERT_EQ(out[i], static_cast<char>(big[i] + 1)) << i;
    ASSERT_EQ(out.back(), static_cast<char>(big.back() + 1));
}

TEST(MpiExecutor, ShutdownRefusesNewWorkAndCancelsPending) {
    // The tasks wait for a gate that opens only once shutdown has cancelled the pending ones
    // (every future is then cancelled or handed to a rank; or after 60 s, and the checks fail),
    // so none can finish and make room for the rest before shutdown, however late it comes.
    TempDir gate_dir;  // every rank runs on this machine
    FileGate gate(gate_dir);
    mp::mpi::Executor ex;
    std::vector<mp::Future<int>> fs;
    for (int i = 0; i < 50; ++i) fs.push_back(ex.submit(wait_file, gate.path()));
    std::thread opener([&] {
        const auto deadline = std::chrono::steady_clock::now() + 60s;
        while (std::chrono::steady_clock::now() < deadline &&
               !std::all_of(fs.begin(), fs.end(), [](const auto& f) { return f.cancelled() || f.running(); }))
            std::this_thread::sleep_for(5ms);
        gate.open();
    });
    ex.shutdown(true, true);
    opener.join();
    int cancelled = 0, ran = 0;
    for (auto& f : fs) {
        ASSERT_TRUE(f.done());
        if (f.cancelled()) {
            ++cancelled;
        } else {
            EXPECT_EQ(f.result(), 1);
            ++ran;
        }
    }
    EXPECT_EQ(cancelled + ran, 50);
    EXPECT_GT(cancelled, 0);  // 2 ranks cannot have started 50 tasks that wait for the gate
    EXPECT_THROW(ex.submit(square, 1), mp::Error);
    ex.shutdown();  // again: nothing happens
}

TEST(MpiExecutor, TwoThreadsShutDownAtOnce) {
    mp::mpi::Executor ex;
    auto f = ex.submit(sleep_then, 300);
    // Both wait for the running task; neither may fail (std::thread::join is not thread-safe:
    // a second concurrent join was EINVAL, std::system_error, or worse).
    std::atomic<int> failures{0};
    auto stop = [&] {
        try {
            ex.shutdown();
        } catch (const std::exception& e) {
            std::fprintf(stderr, "shutdown failed: %s\n", e.what());
            failures.fetch_add(1);
        }
    };
    std::thread a(stop), b(stop);
    a.join();
    b.join();
    EXPECT_EQ(failures.load(), 0);
    ASSERT_TRUE(f.done());
    EXPECT_EQ(f.result(), 300);
}

TEST(MpiExecutor, ShutdownWithWaitFromADoneCallbackIsAnError) {
    TempDir gate_dir;  // every rank runs on this machine
    FileGate gate(gate_dir);
    mp::mpi::Executor ex;
    std::atomic<int> outcome{0};  // 1: mp::Error, 2: another exception, 3: returned
    // Still running when the callback is added: it waits for the gate, opened after that (a
    // callback added to a done future runs at once in the caller, where shutdown may wait).
    auto f = ex.submit(wait_file, gate.path());
    f.add_done_callback([&](const mp::Future<int>&) {
        try {
            ex.shutdown(true, false);  // in the executor's own thread: it cannot wait for itself
            outcome = 3;
        } catch (const mp::Error&) {
            outcome = 1;
        } catch (...) {
            outcome = 2;
        }
    });
    gate.open();
    EXPECT_EQ(f.result(60s), 1);
    ex.shutdown();
    EXPECT_EQ(outcome.load(), 1);
}

// The last handle dropped in a done callback, on the executor's own thread: it finishes its work
// detached (was: mp::Error out of the destructor, std::terminate), and the next Executor waits for
// it to end rather than being refused.
TEST(MpiExecutor, DestroyedInItsOwnDoneCallbackFinishesItsWork) {
    TempDir gate_dir;
    FileGate gate(gate_dir);
    auto ex = std::make_unique<mp::mpi::Executor>();
    auto first = ex->submit(wait_file, gate.path());
    auto queued = ex->submit(square, 7);
    std::atomic<bool> destroyed{false};
    first.add_done_callback([&](const mp::Future<int>&) {
        ex.reset();
        destroyed = true;
    });
    gate.open();
    EXPECT_EQ(first.result(60s), 1);
    EXPECT_EQ(queued.result(60s), 49);
    const auto end = std::chrono::steady_clock::now() + 60s;
    while (!destroyed && std::chrono::steady_clock::now() < end) std::this_thread::sleep_for(1ms);
    ASSERT_TRUE(destroyed.load());
    mp::mpi::Executor next;
    EXPECT_EQ(next.submit(square, 4).result(60s), 16);
}

TEST(MpiExecutor, OneLiveExecutorAtATimeThenTheNext) {
    {
        mp::mpi::Executor ex;
        try {
            mp::mpi::Executor second;
            FAIL() << "a second live executor was allowed";
        } catch (const mp::Error& e) {
            EXPECT_NE(std::string(e.what()).find("only one Executor"), std::string::npos) << e.what();
        }
        EXPECT_EQ(ex.submit(square, 3).result(60s), 9);
    }
    mp::mpi::Executor next;
    EXPECT_EQ(next.submit(square, 4).result(60s), 16);
}

// After many tiny tasks (an estimate that says tasks are short), a burst of tasks that wait for
// a gate: what each rank is sent is bounded by the work it is expected to hold, not by the
// tiny tasks' average, so the burst is spread over both ranks and what was not sent stays
// cancellable (Python's executor cancels all but the few handed to workers).
TEST(MpiExecutor, ABurstAfterTinyTasksIsSpreadAndStaysCancellable) {
    TempDir gate_dir;  // every rank runs on this machine
    FileGate gate(gate_dir);
    mp::mpi::Executor ex;
    std::vector<int> tiny(3000, 2);
    ASSERT_EQ(ex.map({.timeout = 60s}, square, tiny).to_vector(), std::vector<int>(3000, 4));
    std::vector<mp::Future<int>> fs;
    for (int i = 0; i < 40; ++i) fs.push_back(ex.submit(rank_at_gate, gate.path()));
    // Both ranks have their first task (the least loaded rank is offered work first).
    const auto deadline = std::chrono::steady_clock::now() + 60s;
    while (std::chrono::steady_clock::now() < deadline &&
           std::count_if(fs.begin(), fs.end(), [](const auto& f) { return f.running(); }) < 2)
        std::this_thread::sleep_for(2ms);
    int cancelled = 0;
    for (auto& f : fs) cancelled += f.cancel() ? 1 : 0;
    gate.open();
    std::set<int> ranks;
    for (auto& f : fs)
        if (!f.cancelled()) ranks.insert(f.result(60s));
    // At most two tasks per rank were sent while the others waited for the gate.
    EXPECT_GE(cancelled, 36);
    EXPECT_EQ(ranks, (std::set<int>{1, 2}));
}

// MpiOneWorker: only under -n 2 (ctest mpi.one_worker), where every task goes to rank 1.
bool one_worker() {
    int n = 0;
    MPI_Comm_size(MPI_COMM_WORLD, &n);
    return n == 2;
}

// A finished task's answer reaches the root while a later task of the same batch still runs:
// the quick task and the gated one are submitted together (from a done callback, which runs in
// the executor's thread, so both are pending when it next sends), and the quick one's result
// must come while the gated one waits for the gate, which opens only after that.
void quick_answer_does_not_wait(bool isolate) {
    TempDir gate_dir;
    mp::mpi::Executor ex({.isolate_tasks = isolate});
    // After the executor: a failing check opens them before the executor waits for its tasks.
    FileGate first_gate(gate_dir, "first");
    FileGate gate(gate_dir);
    EXPECT_EQ(ex.submit(square, 2).result(60s), 4);  // isolate: the local worker has started
    mp::Future<int> quick, gated;
    std::promise<void> submitted;
    auto first = ex.submit(wait_file, first_gate.path());  // still running when the callback is added
    first.add_done_callback([&](const mp::Future<int>&) {
        quick = ex.submit(square, 5);
        gated = ex.submit(wait_file, gate.path());
        submitted.set_value();
    });
    first_gate.open();
    ASSERT_EQ(submitted.get_future().wait_for(60s), std::future_status::ready);
    // Well before the gate's own limit (20 s) would end the gated task.
    EXPECT_EQ(quick.result(10s), 25);
    EXPECT_FALSE(gated.done());
    gate.open();
    EXPECT_EQ(gated.result(60s), 1);
}

TEST(MpiOneWorker, AQuickAnswerDoesNotWaitForTheTaskAfterIt) {
    if (!one_worker()) GTEST_SKIP() << "needs -n 2 (ctest mpi.one_worker)";
    quick_answer_does_not_wait(false);
}

TEST(MpiOneWorker, AQuickAnswerDoesNotWaitForTheTaskAfterItIsolated) {
    if (!one_worker()) GTEST_SKIP() << "needs -n 2 (ctest mpi.one_worker)";
    quick_answer_does_not_wait(true);
}

TEST(MpiIsolated, ACrashingTaskFailsAloneWithWorkerDied) {
    mp::mpi::Executor ex({.isolate_tasks = true});
    try {
        ex.submit(crash, 1).result(60s);
        FAIL() << "no exception";
    } catch (const mp::WorkerDied& e) {
        EXPECT_EQ(e.signal(), SIGSEGV) << e.what();
        // The pid is a process on the rank's machine: the error says whose worker it was.
        EXPECT_TRUE(e.where().starts_with("MPIRank-") && e.where().find('@') != std::string::npos) << e.where();
        EXPECT_NE(std::string(e.what()).find(" of " + e.where() + " "), std::string::npos) << e.what();
    }
    // The rank carries on with a new local worker; values and exceptions travel as before.
    EXPECT_EQ(ex.submit(square, 9).result(60s), 81);
    EXPECT_THROW(ex.submit(checked_inverse, 0).result(60s), std::invalid_argument);
    // A chunk whose worker died fails whole; the other chunks are fine.
    std::vector<int> xs{1, 2, 3, 4};
    auto res = ex.map({.chunksize = 2, .timeout = 60s}, [](int x) {
        if (x == 3) std::raise(SIGSEGV);
        return x * 10;
    }, xs);
    auto it = res.begin();
    EXPECT_EQ(*it, 10);
    ++it;
    EXPECT_EQ(*it, 20);
    ++it;
    EXPECT_THROW(*it, mp::WorkerDied);
    ++it;
    EXPECT_THROW(*it, mp::WorkerDied);
    auto many = ex.map({.chunksize = 100, .timeout = 60s}, square, std::vector<int>(1000, 3)).to_vector();
    EXPECT_EQ(many, std::vector<int>(1000, 9));
}

TEST(MpiIsolated, TaskTimeoutKillsTheLocalWorker) {
    EXPECT_THROW(mp::mpi::Executor({.task_timeout = 1s}), mp::Error);  // needs isolate_tasks
    // The limit is far above the quick task's 1 ms, so a loaded machine cannot make that one
    // overrun it; the slow one sleeps for far longer still.
    mp::mpi::Executor ex({.isolate_tasks = true, .task_timeout = 2s});
    auto slow = ex.submit(sleep_then, 30000);
    auto quick = ex.submit(sleep_then, 1);
    EXPECT_THROW(slow.result(60s), mp::TimeoutError);
    EXPECT_EQ(quick.result(60s), 1);
    EXPECT_EQ(ex.submit(square, 2).result(60s), 4);
}

mp::mpi::Environment* suite_env = nullptr;

TEST(MpiEnvironment, RankZeroDoesNotServeAndASecondEnvironmentIsRefused) {
    ASSERT_NE(suite_env, nullptr);
    EXPECT_TRUE(suite_env->is_root());
    if (suite_env->size() != 3) GTEST_SKIP() << "the suite proper runs under -n 3";
    EXPECT_THROW(suite_env->serve(), mp::Error);
    // The suite's Environment lives in main(); a second one is an error, not a second MPI_Init.
    int argc = 0;
    char** argv = nullptr;
    EXPECT_THROW(mp::mpi::Environment(argc, argv), mp::Error);
}

int expect_mismatch() {
    try {
        mp::mpi::Executor ex;
        std::fprintf(stderr, "FAIL: an executor was made over ranks running another binary\n");
        return 1;
    } catch (const mp::Error& e) {
        const std::string what = e.what();
        std::printf("refused: %s\n", what.c_str());
        if (what.find("rank 1") == std::string::npos || what.find("different binary") == std::string::npos)
            return 1;
    }
    return 0;
}

int crash_worker() {
    mp::mpi::Executor ex;
    auto f = ex.submit(crash, 1);
    try {
        f.result(60s);
    } catch (const std::exception& e) {
        std::fprintf(stderr, "rank 0 still running after the crash: %s\n", e.what());
    }
    // Open MPI should have ended the job long before this.
    std::fprintf(stderr, "FAIL: the job was not ended by the crash\n");
    std::fflush(stderr);
    MPI_Abort(MPI_COMM_WORLD, 99);
    return 99;
}

// Sends rank 0, as this worker rank's answer to task 1 (the first task of an executor), a
// "worker died" outcome whose body is missing: mp::mpi's wire format (src/mpi.cpp), tag 2917.
// Its real answer, which rank 0 no longer reads, is 4 MB: too large for MPI to buffer, so the
// rank stays in MPI_Send until rank 0 takes it (at the end, before MPI_Finalize).
std::string forge_answer(int) {
    std::string m(8, '\0');
    auto put = [&m](std::uint64_t v) { m.append(reinterpret_cast<const char*>(&v), sizeof v); };
    m.push_back(5);  // results
    put(1);          // ordinal
    m.push_back(2);  // outcome: the local worker died, [pid][status] should follow
    put(0);          // run ns
    put(0);          // body length: nothing
    const std::uint64_t n = m.size() - 8;
    std::memcpy(m.data(), &n, sizeof n);  // little-endian hosts only, as this test runs on
    MPI_Send(m.data(), static_cast<int>(m.size()), MPI_BYTE, 0, 2917, MPI_COMM_WORLD);
    return std::string(4u << 20, 'x');
}

int forged_answer() {
    mp::mpi::Executor ex;
    auto f = ex.submit(forge_answer, 0);
    try {
        f.result(30s);
        std::fprintf(stderr, "FAIL: the forged answer was accepted\n");
    } catch (const mp::BrokenProcessPool& e) {
        std::printf("broken as expected: %s\n", e.what());
        return 0;
    } catch (const mp::TimeoutError&) {
        std::fprintf(stderr, "FAIL: the future was lost (never completed)\n");
    } catch (const std::exception& e) {
        std::fprintf(stderr, "FAIL: another exception: %s\n", e.what());
    }
    return 1;
}

// Every rank: a first Environment (the workers serve, the root runs a task), then a second one,
// which must be refused with mp::Error since MPI has been finalised.
int second_environment(int& argc, char**& argv) {
    int rank = -1;
    {
        mp::mpi::Environment env(argc, argv);
        rank = env.rank();
        if (!env.is_root()) {
            env.serve();
        } else {
            mp::mpi::Executor ex;
            if (ex.submit(square, 6).result(60s) != 36) return 2;
        }
    }
    try {
        mp::mpi::Environment again(argc, argv);
        std::fprintf(stderr, "FAIL: rank %d: a second Environment after MPI_Finalize was made\n", rank);
        return 1;
    } catch (const mp::Error& e) {
        std::printf("rank %d refused: %s\n", rank, e.what());
        return std::string(e.what()).find("finalised") == std::string::npos ? 1 : 0;
    }
}

// The worker ranks return without serving; the root's executor must still get its answer.
int worker_returns_early(int& argc, char**& argv) {
    mp::mpi::Environment env(argc, argv);
    if (!env.is_root()) return 0;  // no serve(): ~Environment serves until the root's stop
    mp::mpi::Executor ex;
    const int got = ex.submit(square, 7).result(60s);
    std::printf("answered: %d\n", got);
    return got == 49 ? 0 : 1;
}

}  // namespace

int main(int argc, char** argv) {
    const std::string mode = argc > 1 ? argv[1] : "";
    if (mode == "--second-environment") return second_environment(argc, argv);
    if (mode == "--worker-returns-early") return worker_returns_early(argc, argv);
    if (mode == "--throw-in-root") {
        return mp::mpi::run(argc, argv, [] () -> int {
            mp::mpi::Executor ex;
            if (ex.submit(square, 5).result(60s) != 25) return 2;
            throw std::runtime_error("the root program failed on purpose");
        });
    }
    mp::mpi::Environment env(argc, argv);
    if (!env.is_root()) return env.serve();
    if (variant != 0) {
        std::fprintf(stderr, "mpi_test_variant only serves\n");
        return 1;
    }
    suite_env = &env;
    if (mode == "--expect-mismatch") return expect_mismatch();
    if (mode == "--crash-worker") return crash_worker();
    if (mode == "--forged-answer") return forged_answer();
    ::testing::InitGoogleTest(&argc, argv);
    return RUN_ALL_TESTS();
}
