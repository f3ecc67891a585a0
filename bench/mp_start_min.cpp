// The mp side of W1-c and W1b-small as a user's smallest program sees them: this program links
// mp::mp and does nothing but start and join empty children. mp_workloads links every workload
// (the pool, managers, Python interop, ...) and is several times bigger, and what a program
// maps makes each of its forks and exits dearer; W1-c's limit is the smallest C program
// (limits/fork_min.c), so its mp side is the smallest mp program.
//
//     mp_start_min W1 [--size N] [--quick]          mp::Process (fork), start + join, us each
//     mp_start_min W1b-small [--size N] [--quick]   the same with the forkserver (after one
//                                                   start that starts the server), us each
// Each prints one JSON line like mp_workloads.

#include <cstdio>
#include <exception>
#include <string_view>

#include "start_join.hpp"
#include "workload_args.hpp"

#ifdef MP_BENCH_STATIC_RUNTIME
constexpr const char* kRuntime = ", the C++ runtime linked in (-static-libstdc++ -static-libgcc)";
#else
constexpr const char* kRuntime = "";
#endif

int main(int argc, char** argv) {
    const std::string_view id = argc >= 2 ? argv[1] : "";
    mp_bench::WorkloadArgs args;
    if ((id != "W1" && id != "W1b-small") || !mp_bench::parse_workload_args(argc, argv, args) ||
        (args.size != -1 && args.size <= 0)) {
        std::fprintf(stderr, "usage: mp_start_min W1|W1b-small [--size N] [--quick]\n");
        return 2;
    }
    const long long n = args.size > 0 ? args.size : args.quick ? 20 : 200;
    const bool w1 = id == "W1";
    try {
        // W1 as mp_workloads measures it (no warm-up); W1b-small after the server's own start.
        const double us = w1 ? mp_bench::start_join_each(n, {.start_method = mp::StartMethod::fork}, false, "W1: bad exit")
                             : mp_bench::start_join_each(n, {.start_method = mp::StartMethod::forkserver}, true,
                                                         "W1b-small: bad exit");
        std::printf("{\"workload\":\"%s\",\"value\":%.6g,\"unit\":\"us\",\"size\":%lld,"
                    "\"method\":\"the smallest mp program%s: mp::Process (%s), start + join\"}\n",
                    argv[1], us, n, kRuntime, w1 ? "fork" : "forkserver");
    } catch (const std::exception& e) {
        std::fprintf(stderr, "mp_start_min: %s\n", e.what());
        return 1;
    }
    return 0;
}
