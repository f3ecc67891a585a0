// The mp side of W1-c and W1b-small as a user's smallest program sees them: this program links
// mp::mp and does nothing but start and join empty children. mp_workloads links every workload
// (the pool, managers, Python interop, ...) and is several times bigger, and what a program
// maps makes each of its forks and exits dearer; W1-c's limit is the smallest C program
// (limits/fork_min.c), so its mp side is the smallest mp program.
//
//     mp_start_min W1 [--size N]          mp::Process (fork), start + join, us each
//     mp_start_min W1b-small [--size N]   the same with the forkserver (after one start that
//                                         starts the server), us each
// Each prints one JSON line like mp_workloads.

#include <mp/process.hpp>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <exception>

namespace {

void empty() {}

double start_join_each(long long n, mp::StartMethod method, bool warm_up) {
    auto once = [method] {
        mp::Process p(mp::ProcessOptions{.start_method = method}, empty);
        p.start();
        p.join();
        if (p.exitcode() != 0) {
            std::fprintf(stderr, "mp_start_min: a child did not exit with 0\n");
            std::exit(1);
        }
    };
    if (warm_up) once();
    const auto t0 = std::chrono::steady_clock::now();
    for (long long i = 0; i < n; ++i) once();
    return std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - t0).count() /
           static_cast<double>(n);
}

}  // namespace

int main(int argc, char** argv) {
    long long n = 200;
    for (int i = 2; i < argc; ++i) {
        if (std::strcmp(argv[i], "--size") == 0 && i + 1 < argc)
            n = std::atoll(argv[++i]);
        else if (std::strcmp(argv[i], "--quick") == 0)
            n = 20;
    }
    const bool w1 = argc >= 2 && std::strcmp(argv[1], "W1") == 0;
    const bool small = argc >= 2 && std::strcmp(argv[1], "W1b-small") == 0;
    if ((!w1 && !small) || n <= 0) {
        std::fprintf(stderr, "usage: mp_start_min W1|W1b-small [--size N] [--quick]\n");
        return 2;
    }
    try {
        // W1 as mp_workloads measures it (no warm-up); W1b-small after the server's own start.
        const double us = w1 ? start_join_each(n, mp::StartMethod::fork, false)
                             : start_join_each(n, mp::StartMethod::forkserver, true);
        std::printf("{\"workload\":\"%s\",\"value\":%.6g,\"unit\":\"us\",\"size\":%lld,"
                    "\"method\":\"the smallest mp program: mp::Process (%s), start + join\"}\n",
                    argv[1], us, n, w1 ? "fork" : "forkserver");
    } catch (const std::exception& e) {
        std::fprintf(stderr, "mp_start_min: %s\n", e.what());
        return 1;
    }
    return 0;
}
