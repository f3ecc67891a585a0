#pragma once
// The work of W1, W1b and W1b-small: start and join a child running an empty function, in
// sequence. One definition for mp_workloads and mp_start_min (the smallest mp program), so the
// rows measure the same thing whichever program runs them. A child that does not exit with 0
// throws: the program exits 1 and run.py reports a broken benchmark.

#include <chrono>
#include <stdexcept>

#include "mp/process.hpp"

namespace mp_bench {

inline void empty_child() {}

/// n starts + joins, in us each. `warm_up`: one start first, outside the timing (it starts the
/// forkserver; spawn's first exec loads the program's pages into the page cache).
inline double start_join_each(long long n, const mp::ProcessOptions& options, bool warm_up, const char* what) {
    auto once = [&] {
        mp::Process p(options, empty_child);
        p.start();
        p.join();
        if (p.exitcode() != 0) throw std::runtime_error(what);
    };
    if (warm_up) once();
    const auto t0 = std::chrono::steady_clock::now();
    for (long long i = 0; i < n; ++i) once();
    return std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - t0).count() /
           static_cast<double>(n);
}

}  // namespace mp_bench
