// Microbenchmarks for mp/synchronize.hpp, each beside its bare-OS baseline in the same binary.
//
// W7 (bench/run.py's workload): two processes each do N lock / increment / unlock on a counter in
// shared memory; reported as ns per increment (counter "ns_per_increment"). Process start-up is
// outside the timing: the child waits at a gate, the clock runs from opening the gate until both
// processes have finished their N increments.
// BM_BareRobustMutexTwoProcesses is the same work on a bare robust, process-shared pthread mutex
// (what mp::Lock is built on); BM_*Uncontended measure one lock + unlock in a single thread.

#include <benchmark/benchmark.h>

#include <atomic>
#include <chrono>
#include <exception>
#include <mutex>
#include <new>
#include <pthread.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <unistd.h>

#include "helpers/shared_object.hpp"
#include "mp/process.hpp"
#include "mp/synchronize.hpp"

namespace {

using Clock = std::chrono::steady_clock;

using mp::test::Shared;  // the tests' helper: bookkeeping that is not the lock under test

// The increment the lock protects: a plain (non-atomic) read-modify-write.
inline void bump(long long* counter) {
    auto* c = static_cast<volatile long long*>(counter);
    *c = *c + 1;
}

void report(benchmark::State& state, double seconds, long long n) {
    state.counters["ns_per_increment"] =
        seconds * 1e9 / (2.0 * static_cast<double>(n) * static_cast<double>(state.iterations()));
}

// ---- W7 with mp::Lock --------------------------------------------------------------------------

void BM_W7_LockTwoProcesses(benchmark::State& state) {
    const long long n = state.range(0);
    try {
        mp::Lock lock;
        mp::Event go;
        mp::Semaphore done(0);
        Shared<long long> counter;
        double total = 0;
        for (auto _ : state) {
            go.clear();
            *counter = 0;
            mp::Process child([&] {
                go.wait();
                for (long long i = 0; i < n; ++i) {
                    std::lock_guard g(lock);
                    bump(&*counter);
                }
                done.release();
            });
            child.start();
            auto t0 = Clock::now();
            go.set();
            for (long long i = 0; i < n; ++i) {
                std::lock_guard g(lock);
                bump(&*counter);
            }
            done.acquire();
            double dt = std::chrono::duration<double>(Clock::now() - t0).count();
            state.SetIterationTime(dt);
            total += dt;
            child.join();
            if (*counter != 2 * n) {
                state.SkipWithError("lost increments: the lock did not exclude");
                break;
            }
        }
        report(state, total, n);
    } catch (const std::exception& e) {
        state.SkipWithError(e.what());
    }
}
BENCHMARK(BM_W7_LockTwoProcesses)
    ->Arg(1'000'000)
    ->Iterations(3)
    ->UseManualTime()
    ->Unit(benchmark::kMillisecond);

// ---- W7 baseline: a bare robust, process-shared pthread mutex, raw fork --------------------------

struct BareState {
    pthread_mutex_t mutex;
    long long counter;
    std::atomic<int> go;
};

void BM_BareRobustMutexTwoProcesses(benchmark::State& state) {
    const long long n = state.range(0);
    Shared<BareState> s;
    pthread_mutexattr_t attr;
    pthread_mutexattr_init(&attr);
    pthread_mutexattr_setpshared(&attr, PTHREAD_PROCESS_SHARED);
    pthread_mutexattr_setrobust(&attr, PTHREAD_MUTEX_ROBUST);
    pthread_mutex_init(&s->mutex, &attr);
    pthread_mutexattr_destroy(&attr);
    auto work = [&] {
        for (long long i = 0; i < n; ++i) {
            pthread_mutex_lock(&s->mutex);
            bump(&s->counter);
            pthread_mutex_unlock(&s->mutex);
        }
    };
    double total = 0;
    for (auto _ : state) {
        s->go.store(0);
        s->counter = 0;
        pid_t pid = ::fork();
        if (pid < 0) {
            state.SkipWithError("fork failed");
            break;
        }
        if (pid == 0) {
            while (s->go.load() == 0) {
            }
            work();
            ::_exit(0);
        }
        auto t0 = Clock::now();
        s->go.store(1);
        work();
        int status = 0;
        ::waitpid(pid, &status, 0);  // the child's exit is inside the timing here (tens of us)
        double dt = std::chrono::duration<double>(Clock::now() - t0).count();
        state.SetIterationTime(dt);
        total += dt;
        if (s->counter != 2 * n) {
            state.SkipWithError("lost increments");
            break;
        }
    }
    report(state, total, n);
}
BENCHMARK(BM_BareRobustMutexTwoProcesses)
    ->Arg(1'000'000)
    ->Iterations(3)
    ->UseManualTime()
    ->Unit(benchmark::kMillisecond);

// ---- uncontended lock + unlock ---------------------------------------------------------------

void BM_LockUncontended(benchmark::State& state) {
    mp::Lock lock;
    for (auto _ : state) {
        lock.lock();
        lock.unlock();
    }
}
BENCHMARK(BM_LockUncontended);

void BM_RLockUncontended(benchmark::State& state) {
    mp::RLock lock;
    for (auto _ : state) {
        lock.lock();
        lock.unlock();
    }
}
BENCHMARK(BM_RLockUncontended);

void BM_SemaphoreUncontended(benchmark::State& state) {
    mp::Semaphore sem(1);
    for (auto _ : state) {
        sem.acquire();
        sem.release();
    }
}
BENCHMARK(BM_SemaphoreUncontended);

void BM_BareRobustMutexUncontended(benchmark::State& state) {
    Shared<pthread_mutex_t> m;
    pthread_mutexattr_t attr;
    pthread_mutexattr_init(&attr);
    pthread_mutexattr_setpshared(&attr, PTHREAD_PROCESS_SHARED);
    pthread_mutexattr_setrobust(&attr, PTHREAD_MUTEX_ROBUST);
    pthread_mutex_init(&*m, &attr);
    pthread_mutexattr_destroy(&attr);
    for (auto _ : state) {
        pthread_mutex_lock(&*m);
        pthread_mutex_unlock(&*m);
    }
}
BENCHMARK(BM_BareRobustMutexUncontended);

void BM_StdMutexUncontended(benchmark::State& state) {
    std::mutex m;
    for (auto _ : state) {
        m.lock();
        m.unlock();
    }
}
BENCHMARK(BM_StdMutexUncontended);

}  // namespace
