// Microbenchmarks for mp::Process, each beside its bare-OS baseline in the same binary so that
// their ratio comes from one run. The foundation's target: BM_ProcessStartJoin (fork) costs at
// most 1.2x BM_BareForkWaitpid. bench/run.py prints that ratio in bench/results/latest.md.

#include <benchmark/benchmark.h>

#include <cstdlib>
#include <exception>
#include <sys/wait.h>
#include <unistd.h>

#include "mp/process.hpp"

namespace {

void empty() {}

// The floor: fork, the child leaves at once with _exit(0), the parent reaps it.
void BM_BareForkWaitpid(benchmark::State& state) {
    for (auto _ : state) {
        pid_t pid = ::fork();
        if (pid < 0) {
            state.SkipWithError("fork failed");
            break;
        }
        if (pid == 0) ::_exit(0);
        int status = 0;
        if (::waitpid(pid, &status, 0) != pid || !WIFEXITED(status) || WEXITSTATUS(status) != 0) {
            state.SkipWithError("waitpid failed");
            break;
        }
    }
}
BENCHMARK(BM_BareForkWaitpid)->Unit(benchmark::kMicrosecond)->UseRealTime();

void start_join(benchmark::State& state, const mp::ProcessOptions& options) {
    try {
        {  // outside the timing: whatever mp sets up on first use (e.g. the forkserver)
            mp::Process warm(options, empty);
            warm.start();
            warm.join();
        }
        for (auto _ : state) {
            mp::Process p(options, empty);
            p.start();
            p.join();
            if (p.exitcode() != 0) {
                state.SkipWithError("the child did not exit with 0");
                break;
            }
        }
    } catch (const std::exception& e) {
        state.SkipWithError(e.what());
    }
}

// mp::Process with an empty function under fork (the default): construct, start, join.
void BM_ProcessStartJoin(benchmark::State& state) { start_join(state, {}); }
BENCHMARK(BM_ProcessStartJoin)->Unit(benchmark::kMicrosecond)->UseRealTime();

// The same under forkserver: the child is forked by the server process, not by us.
void BM_ProcessStartJoinForkserver(benchmark::State& state) {
    mp::ProcessOptions options;
    options.start_method = mp::StartMethod::forkserver;
    start_join(state, options);
}
BENCHMARK(BM_ProcessStartJoinForkserver)->Unit(benchmark::kMicrosecond)->UseRealTime();

// The same under spawn: a fresh exec of this program, which runs its static initialisers.
void BM_ProcessStartJoinSpawn(benchmark::State& state) {
    mp::ProcessOptions options;
    options.start_method = mp::StartMethod::spawn;
    start_join(state, options);
}
BENCHMARK(BM_ProcessStartJoinSpawn)->Unit(benchmark::kMicrosecond)->UseRealTime();

}  // namespace

BENCHMARK_MAIN();
