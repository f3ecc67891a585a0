// The chaos test (issue 12): maps and descriptor-carrying tasks (a task taking an mp::Queue or
// an mp::Lock) on executors and Pools, under fork and forkserver, while a killer thread
// SIGKILLs and SIGSTOPs (then SIGCONTs) random workers and the forkserver: a few hundred kills
// in all. Checked: no hang (every future or result resolves within kResolveLimit), no wrong
// result (each is the right value or WorkerDied; never BrokenProcessPool, as no pool here
// breaks on a worker's death), and, by the shared main, no leaked fd, process or /dev/shm entry.
//
// Its own ctest entry (label chaos, TIMEOUT 300), not one per TEST: the scenarios are bounded
// by a number of kills and a time budget each.

#include <fcntl.h>
#include <gtest/gtest.h>
#include <signal.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <fstream>
#include <mutex>
#include <optional>
#include <random>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include "helpers/leak_check.hpp"
#include "mp/futures.hpp"
#include "mp/pool.hpp"
#include "mp/queue.hpp"
#include "mp/synchronize.hpp"
#include "process_impl.hpp"
#include "sys/fd.hpp"
#include "sys/pidfd.hpp"

namespace {

using namespace std::chrono_literals;
using Clock = std::chrono::steady_clock;

/// A future (or AsyncResult) not resolved this long after its batch was submitted is a hang.
constexpr auto kResolveLimit = 60s;
/// Each scenario stops after this many kills or this long, whichever comes first.
constexpr int kKillsPerScenario = 80;
constexpr auto kScenarioBudget = 12s;

// ---- work ------------------------------------------------------------------------------------

int nap_square(int x) {
    ::usleep(200);
    return x * x;
}

/// A descriptor-carrying task: the lock travels with SCM_RIGHTS.
int locked_square(mp::Lock lock, int x) {
    std::lock_guard guard(lock);
    return x * x;
}

/// Another: the queue travels with SCM_RIGHTS; the value is put before the result is returned.
int put_square(mp::Queue<int> q, int x) {
    q.put(x * x, 5s);
    return x * x;
}

// ---- the killer -------------------------------------------------------------------------------

std::string proc_field(pid_t pid, const char* field) {
    std::ifstream status("/proc/" + std::to_string(pid) + "/status");
    std::string line;
    const std::string prefix = std::string(field) + ":";
    while (std::getline(status, line))
        if (line.rfind(prefix, 0) == 0) {
            auto v = line.substr(prefix.size());
            v.erase(0, v.find_first_not_of(" \t"));
            return v;
        }
    return {};
}

/// A pidfd for `pid` if it is still what we think it is: the forkserver, or a pool worker (a
/// child of this process or of the forkserver). Opened first, checked after: the pidfd then
/// names that very process, whatever happens to the pid.
std::optional<mp::sys::Fd> open_checked(pid_t pid, bool server) {
    if (pid <= 0) return std::nullopt;
    const int fd = static_cast<int>(::syscall(SYS_pidfd_open, pid, 0));
    if (fd < 0) return std::nullopt;
    mp::sys::Fd pidfd(fd);
    const std::string name = proc_field(pid, "Name");
    if (server) {
        if (name != "mp-forkserver" || pid != mp::detail::forkserver::server_pid()) return std::nullopt;
        return pidfd;
    }
    const pid_t ppid = static_cast<pid_t>(std::atoi(proc_field(pid, "PPid").c_str()));
    if (ppid != ::getpid() && (ppid <= 0 || ppid != mp::detail::forkserver::server_pid())) return std::nullopt;
    return pidfd;
}

/// SIGKILLs, or SIGSTOPs and then SIGCONTs, random workers (from `pids`) and, with
/// `hit_server`, the forkserver, until stopped or `max_kills` SIGKILLs were sent.
class Killer {
public:
    template <class Pids>
    Killer(Pids pids, bool hit_server, int max_kills, unsigned seed)
        : thread_([this, pids, hit_server, max_kills, seed] { run(pids, hit_server, max_kills, seed); }) {}
    ~Killer() { stop(); }
    Killer(const Killer&) = delete;
    Killer& operator=(const Killer&) = delete;

    void stop() {
        stop_ = true;
        if (thread_.joinable()) thread_.join();
    }
    bool done() const { return finished_.load(); }
    int kills() const { return kills_.load(); }
    int stops() const { return stops_.load(); }
    int server_hits() const { return server_hits_.load(); }

private:
    template <class Pids>
    void run(Pids pids, bool hit_server, int max_kills, unsigned seed) {
        std::mt19937 rng(seed);
        while (!stop_.load() && kills_.load() < max_kills) {
            std::this_thread::sleep_for(std::chrono::milliseconds(10 + rng() % 40));
            const auto dice = static_cast<unsigned>(rng() % 100);
            std::optional<mp::sys::Fd> victim;
            if (hit_server && dice < 12) {
                victim = open_checked(mp::detail::forkserver::server_pid(), true);
                if (victim) ++server_hits_;
            } else {
                const std::vector<pid_t> live = pids();
                if (!live.empty()) victim = open_checked(live[rng() % live.size()], false);
            }
            if (!victim) continue;
            if (dice % 4 == 0) {
                // Stopped for a while (longer than the pool's stall limit), then resumed.
                if (mp::sys::pidfd_send_signal(victim->get(), SIGSTOP)) {
                    ++stops_;
                    std::this_thread::sleep_for(std::chrono::milliseconds(5 + rng() % 60));
                    (void)mp::sys::pidfd_send_signal(victim->get(), SIGCONT);
                }
            } else if (mp::sys::pidfd_send_signal(victim->get(), SIGKILL)) {
                ++kills_;
                // The server's end must be closed before the scenario may end (it then restarts
                // a dead one, never keeps a connection to it).
                (void)mp::sys::pidfd_wait_exit(victim->get(), std::chrono::nanoseconds(5s));
            }
        }
        finished_ = true;
    }

    std::atomic<bool> stop_{false};
    std::atomic<bool> finished_{false};
    std::atomic<int> kills_{0}, stops_{0}, server_hits_{0};
    std::thread thread_;
};

// ---- checking outcomes ------------------------------------------------------------------------

struct Tally {
    std::size_t values = 0, died = 0;

    /// Runs `get`, which returns the value or throws; the value must be `want`, an exception
    /// must be WorkerDied.
    template <class Get>
    void check(Get get, long long want, const char* what) {
        try {
            const long long got = get();
            EXPECT_EQ(got, want) << what;
            ++values;
        } catch (const mp::WorkerDied&) {
            ++died;
        } catch (const std::exception& e) {
            ADD_FAILURE() << what << ": unexpected " << e.what();
        }
    }
};

/// What a pool and its workers are doing, for the message of a hang.
template <class P>
std::string describe(const P& pool) {
    const auto st = pool.stats();
    std::string out = "pending " + std::to_string(st.pending) + ", running " + std::to_string(st.running) +
                      ", workers started " + std::to_string(st.workers_started) + "; workers:";
    for (const auto& w : st.workers) {
        std::ifstream wchan("/proc/" + std::to_string(w.pid) + "/wchan");
        std::string where;
        std::getline(wchan, where);
        out += " [" + w.name + " pid " + std::to_string(w.pid) + " state " + proc_field(w.pid, "State") +
               " in " + where + ", assigned " + std::to_string(w.assigned) + ", running " +
               std::to_string(w.running) + "]";
    }
    return out;
}

/// The pids of a pool's live workers.
template <class P>
auto worker_pids(const P& pool) {
    return [&pool] {
        std::vector<pid_t> out;
        for (const auto& w : pool.stats().workers) out.push_back(w.pid);
        return out;
    };
}

void run_executor(mp::StartMethod method, unsigned seed) {
    mp::ProcessPoolExecutor ex({.max_workers = 3, .start_method = method});
    mp::Lock lock;
    mp::Queue<int> q;
    std::multiset<int> returned;  // what put_square returned: each was put first
    Tally t;
    {
        Killer killer(worker_pids(ex), method == mp::StartMethod::forkserver, kKillsPerScenario, seed);
        const auto end = Clock::now() + kScenarioBudget;
        int round = 0;
        while (!killer.done() && Clock::now() < end) {
            const auto deadline = Clock::now() + kResolveLimit;
            std::vector<int> in(300);
            for (int i = 0; i < 300; ++i) in[static_cast<std::size_t>(i)] = (i + round) % 1000;
            // Bounded: iterating past the timeout throws TimeoutError, which fails the check.
            auto results = ex.map(mp::MapOptions{.chunksize = 7, .timeout = kResolveLimit}, nap_square, in);
            std::vector<mp::Future<int>> locked, queued;
            for (int i = 0; i < 20; ++i) {
                locked.push_back(ex.submit(locked_square, lock, i));
                queued.push_back(ex.submit(put_square, q, i));
            }
            std::size_t k = 0;
            for (auto it = results.begin(); it != results.end(); ++it, ++k) {
                t.check([&] { return static_cast<long long>(*it); }, static_cast<long long>(in[k]) * in[k], "map");
            }
            for (int i = 0; i < 20; ++i) {
                auto& a = locked[static_cast<std::size_t>(i)];
                auto& b = queued[static_cast<std::size_t>(i)];
                const auto left = std::max<Clock::duration>(deadline - Clock::now(), Clock::duration::zero());
                ASSERT_TRUE(a.wait(left)) << "a descriptor task (Lock) did not resolve: a hang; " << describe(ex);
                ASSERT_TRUE(b.wait(std::max<Clock::duration>(deadline - Clock::now(), Clock::duration::zero())))
                    << "a descriptor task (Queue) did not resolve: a hang; " << describe(ex);
                t.check([&] { return static_cast<long long>(a.result(0s)); }, i * i, "locked_square");
                t.check([&] { return static_cast<long long>(b.result(0s)); }, i * i, "put_square");
                if (b.exception(0s) == nullptr) returned.insert(i * i);
            }
            ++round;
        }
        killer.stop();
        if (method == mp::StartMethod::forkserver) mp::detail::forkserver::ensure_running();
        std::printf("executor/%s: %d rounds, %d kills, %d stops, %d forkserver hits, %zu values, %zu WorkerDied\n",
                    method == mp::StartMethod::fork ? "fork" : "forkserver", round, killer.kills(),
                    killer.stops(), killer.server_hits(), t.values, t.died);
    }
    // Every value put_square returned was put (a task that died after putting adds one more).
    std::multiset<int> got;
    while (true) {
        try {
            got.insert(q.get(0ms));
        } catch (const mp::Empty&) {
            break;
        }
    }
    for (int v : returned) {
        auto it = got.find(v);
        if (it == got.end()) {
            ADD_FAILURE() << "put_square returned " << v << " but the queue does not hold it";
            break;
        }
        got.erase(it);
    }
    EXPECT_GT(t.values, 0u);
    EXPECT_EQ(ex.submit(nap_square, 9).result(kResolveLimit), 81);
}

void run_pool(mp::StartMethod method, unsigned seed) {
    mp::Pool pool(mp::PoolOptions{.processes = 3, .start_method = method});
    mp::Lock lock;
    Tally t;
    {
        Killer killer(worker_pids(pool), method == mp::StartMethod::forkserver, kKillsPerScenario, seed);
        const auto end = Clock::now() + kScenarioBudget;
        int round = 0;
        while (!killer.done() && Clock::now() < end) {
            std::vector<int> in(200);
            for (int i = 0; i < 200; ++i) in[static_cast<std::size_t>(i)] = i + round;
            auto mapped = pool.map_async(nap_square, in, 5);
            std::vector<mp::AsyncResult<int>> locked;
            for (int i = 0; i < 20; ++i) locked.push_back(pool.apply_async(locked_square, lock, i));
            ASSERT_TRUE(mapped.wait(kResolveLimit)) << "a map_async did not resolve: a hang; " << describe(pool);
            try {
                const auto v = mapped.get(0s);
                ASSERT_EQ(v.size(), in.size());
                for (std::size_t k = 0; k < in.size(); ++k)
                    EXPECT_EQ(v[k], static_cast<int>(in[k]) * in[k]) << "map item " << k;
                t.values += v.size();
            } catch (const mp::WorkerDied&) {
                ++t.died;
            } catch (const std::exception& e) {
                ADD_FAILURE() << "map_async: unexpected " << e.what();
            }
            for (int i = 0; i < 20; ++i) {
                auto& r = locked[static_cast<std::size_t>(i)];
                ASSERT_TRUE(r.wait(kResolveLimit)) << "a descriptor task (Lock) did not resolve: a hang; " << describe(pool);
                t.check([&] { return static_cast<long long>(r.get(0s)); }, i * i, "locked_square");
            }
            ++round;
        }
        killer.stop();
        if (method == mp::StartMethod::forkserver) mp::detail::forkserver::ensure_running();
        std::printf("pool/%s: %d rounds, %d kills, %d stops, %d forkserver hits, %zu values, %zu WorkerDied\n",
                    method == mp::StartMethod::fork ? "fork" : "forkserver", round, killer.kills(),
                    killer.stops(), killer.server_hits(), t.values, t.died);
    }
    EXPECT_GT(t.values, 0u);
    EXPECT_EQ(pool.apply(nap_square, 9), 81);
    pool.close();
    pool.join();
}

TEST(Chaos, ExecutorUnderForkserver) { run_executor(mp::StartMethod::forkserver, 1); }
TEST(Chaos, ExecutorUnderFork) {
#if defined(__SANITIZE_ADDRESS__)
    GTEST_SKIP() << "ASan's allocator is not fork-safe in a threaded parent (GCC 12's libasan): see PoolUnderFork";
#endif
    run_executor(mp::StartMethod::fork, 2);
}
TEST(Chaos, PoolUnderForkserver) { run_pool(mp::StartMethod::forkserver, 3); }
TEST(Chaos, PoolUnderFork) {
#if defined(__SANITIZE_ADDRESS__)
    // As PoolForkStdout (pool_test.cpp): ASan's allocator (GCC 12's libasan) is not fork-safe, and
    // the 80 replacements here are forked by the pool's thread while the main thread allocates.
    // Seen in CI (2026-12-06) and again by hand (1 of 3 runs): a replacement's flusher thread
    // waits for ever in ASan's realloc on a lock inherited held, its worker joins it at exit,
    // and close()/join() wait for that worker. The ci and clang builds run it.
    GTEST_SKIP() << "ASan's allocator is not fork-safe in a threaded parent (GCC 12's libasan)";
#endif
    run_pool(mp::StartMethod::fork, 4);
}

}  // namespace
