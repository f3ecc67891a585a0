// The mp side of run.py's MPI workloads (W10a, W10b): mp::mpi::Executor over the worker ranks
// of `mpirun -n 3` (rank 0 hands out the work, ranks 1 and 2 run it: 2 workers, like W2's pool).
// Rank 0 prints one JSON line, as bench/mp_workloads.cpp does:
//     {"workload":"W10a","value":123456,"unit":"tasks/s","size":100000,"method":"..."}
//
//     mpirun -n 3 mp_mpi_workloads W10a [--size N] [--quick]
//
// The same work as W2a / W2b (x*x, results checked in order); MPI start-up and a warm-up map are
// outside the timing.

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <ranges>
#include <stdexcept>
#include <string>
#include <string_view>
#include <vector>

#include "workload_args.hpp"
#include "executor_work.hpp"
#include "mp/mpi.hpp"

namespace {

// W10a: submit every task, then the result of each, in order.
double w10a(long long n) {
    mp::mpi::Executor ex;
    return mp_bench::submit_then_results(ex, n, "W10a: wrong results");
}

// W10b: map in chunks of 1,000.
double w10b(long long n) {
    mp::mpi::Executor ex;
    return mp_bench::chunked_map(ex, n, "W10b: wrong results");
}

struct Workload {
    const char* id;
    long long full, quick;
    double (*run)(long long);
    const char* method;
};

const Workload kWorkloads[] = {
    {"W10a", 100000, 2000, w10a,
     "mp::mpi::Executor, mpirun -n 3 (2 worker ranks): submit every task, then result() of each"},
    {"W10b", 100000, 10000, w10b, "mp::mpi::Executor, mpirun -n 3 (2 worker ranks): map, chunksize 1000"},
};

int usage() {
    std::fprintf(stderr, "usage: mpirun -n 3 mp_mpi_workloads W10a|W10b [--size N] [--quick]\n");
    return 2;
}

}  // namespace

int main(int argc, char** argv) {
    return mp::mpi::run(argc, argv, [&]() -> int {
        if (argc < 2) return usage();
        const std::string_view id = argv[1];
        mp_bench::WorkloadArgs args;
        if (!mp_bench::parse_workload_args(argc, argv, args)) return usage();
        const bool quick = args.quick;
        long long size = args.size;
        for (const auto& w : kWorkloads) {
            if (id != w.id) continue;
            if (size <= 0) size = quick ? w.quick : w.full;
            const double value = w.run(size);
            std::printf("{\"workload\":\"%s\",\"value\":%.9g,\"unit\":\"tasks/s\",\"size\":%lld,"
                        "\"method\":\"%s\"}\n",
                        w.id, value, size, w.method);
            std::fflush(stdout);
            return 0;
        }
        return usage();
    });
}
