#pragma once
// The work of W2 (local pool) and W10 (mp::mpi): x*x on an executor's workers, results checked
// in input order. One definition for both executors, so their figures measure the same thing.
// A failed check throws: the program exits 1 and run.py reports a broken benchmark.

#include <chrono>
#include <ranges>
#include <stdexcept>
#include <vector>

#include "counting.hpp"
#include "mp/futures.hpp"

namespace mp_bench {

inline double seconds_since(std::chrono::steady_clock::time_point t0) {
    return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

inline long long square(long long x) { return x * x; }

inline void check_squares(const std::vector<long long>& out, long long n, const char* what) {
    bool ok = out.size() == static_cast<std::size_t>(n);
    for (long long i = 0; ok && i < n; ++i) ok = out[static_cast<std::size_t>(i)] == i * i;
    if (!ok) throw std::runtime_error(what);
}

/// Outside the timing, as the Python side: every worker started and has run something.
template <class Executor>
void warm(Executor& ex) {
    check_squares(ex.map(square, mp_bench::counting(0LL, 16LL)).to_vector(), 16,
                  "warm-up: wrong results");
}

/// Submits every task, then takes the result of each, in order: tasks per second.
template <class Executor>
double submit_then_results(Executor& ex, long long n, const char* what) {
    warm(ex);
    std::vector<mp::Future<long long>> futures;
    futures.reserve(static_cast<std::size_t>(n));
    std::vector<long long> out;
    out.reserve(static_cast<std::size_t>(n));
    const auto t0 = std::chrono::steady_clock::now();
    for (long long x = 0; x < n; ++x) futures.push_back(ex.submit(square, x));
    for (const auto& f : futures) out.push_back(f.result());
    const double dt = seconds_since(t0);
    check_squares(out, n, what);
    return double(n) / dt;
}

/// map in chunks of 1,000, in order: tasks per second.
template <class Executor>
double chunked_map(Executor& ex, long long n, const char* what) {
    warm(ex);
    const auto t0 = std::chrono::steady_clock::now();
    auto out = ex.map({.chunksize = 1000}, square, mp_bench::counting(0LL, n)).to_vector();
    const double dt = seconds_since(t0);
    check_squares(out, n, what);
    return double(n) / dt;
}

}  // namespace mp_bench
