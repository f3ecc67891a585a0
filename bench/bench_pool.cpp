// Microbenchmarks for mp::ProcessPoolExecutor (2 workers), each beside a bare-OS baseline in the
// same binary so that their ratio comes from one run:
//   - one submit + result() round trip at a time (latency of a task through the pool), against
//     a forked child computing x*x over a bare socketpair, one 8-byte request at a time;
//   - a batch of 1,000 submits, then result() of each in order (bench/run.py's W2a), against the
//     bare child answering 1,000 requests written in one go (it reads and answers in bulk);
//   - map over 10,000 items with chunksize 1,000 (bench/run.py's W2b).
// Pools are started and warmed up outside the timing; items/s is the number to compare.

#include <benchmark/benchmark.h>

#include <cstdint>
#include <exception>
#include <ranges>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>
#include <vector>

#include "counting.hpp"
#include "mp/futures.hpp"

namespace {

long long square(long long x) { return x * x; }

void warm(mp::ProcessPoolExecutor& ex) {
    for (long long r : ex.map(square, mp_bench::counting(0LL, 16LL))) benchmark::DoNotOptimize(r);
}

// One task at a time: submit, then wait for its result.
void BM_PoolSubmitResult(benchmark::State& state) {
    try {
        mp::ProcessPoolExecutor ex({.max_workers = 2});
        warm(ex);
        long long x = 0;
        for (auto _ : state) {
            if (ex.submit(square, x).result() != x * x) {
                state.SkipWithError("wrong result");
                break;
            }
            ++x;
        }
        state.SetItemsProcessed(state.iterations());
    } catch (const std::exception& e) {
        state.SkipWithError(e.what());
    }
}
BENCHMARK(BM_PoolSubmitResult)->Unit(benchmark::kMicrosecond)->UseRealTime();

// 1,000 submits, then the result of each in order (one iteration = 1,000 tasks).
void BM_PoolSubmitBatch1000(benchmark::State& state) {
    constexpr long long kBatch = 1000;
    try {
        mp::ProcessPoolExecutor ex({.max_workers = 2});
        warm(ex);
        std::vector<mp::Future<long long>> futures;
        futures.reserve(kBatch);
        for (auto _ : state) {
            futures.clear();
            for (long long x = 0; x < kBatch; ++x) futures.push_back(ex.submit(square, x));
            long long x = 0;
            for (const auto& f : futures) {
                if (f.result() != x * x) {
                    state.SkipWithError("wrong result");
                    return;
                }
                ++x;
            }
        }
        state.SetItemsProcessed(state.iterations() * kBatch);
    } catch (const std::exception& e) {
        state.SkipWithError(e.what());
    }
}
BENCHMARK(BM_PoolSubmitBatch1000)->Unit(benchmark::kMicrosecond)->UseRealTime();

// map over 10,000 items in chunks of 1,000 (one iteration = 10,000 tasks).
void BM_PoolMapChunk1000(benchmark::State& state) {
    constexpr long long kItems = 10000;
    try {
        mp::ProcessPoolExecutor ex({.max_workers = 2});
        warm(ex);
        for (auto _ : state) {
            long long x = 0;
            for (long long r :
                 ex.map({.chunksize = 1000}, square, mp_bench::counting(0LL, kItems))) {
                if (r != x * x) {
                    state.SkipWithError("wrong result");
                    return;
                }
                ++x;
            }
        }
        state.SetItemsProcessed(state.iterations() * kItems);
    } catch (const std::exception& e) {
        state.SkipWithError(e.what());
    }
}
BENCHMARK(BM_PoolMapChunk1000)->Unit(benchmark::kMicrosecond)->UseRealTime();

// ---- bare-OS baselines: a forked child squaring int64s read from a socketpair -----------------

bool read_all(int fd, void* buf, std::size_t n) {
    auto* p = static_cast<char*>(buf);
    while (n > 0) {
        ssize_t r = ::read(fd, p, n);
        if (r <= 0) return false;
        p += r;
        n -= static_cast<std::size_t>(r);
    }
    return true;
}
bool write_all(int fd, const void* buf, std::size_t n) {
    const auto* p = static_cast<const char*>(buf);
    while (n > 0) {
        ssize_t r = ::write(fd, p, n);
        if (r <= 0) return false;
        p += r;
        n -= static_cast<std::size_t>(r);
    }
    return true;
}

// A forked child that answers each int64 with its square until EOF. Returns the parent's end of
// the socketpair, or -1.
int start_square_child(pid_t* pid) {
    int sv[2];
    if (::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv) != 0) return -1;
    *pid = ::fork();
    if (*pid < 0) return -1;
    if (*pid == 0) {
        // Reads whatever has arrived (up to 1,024 requests), answers it all in one write.
        ::close(sv[0]);
        static std::int64_t buf[1024];
        for (;;) {
            ssize_t r = ::read(sv[1], buf, sizeof buf);
            if (r <= 0) break;
            std::size_t got = static_cast<std::size_t>(r);
            if (got % 8 != 0 && !read_all(sv[1], reinterpret_cast<char*>(buf) + got, 8 - got % 8))
                break;
            const std::size_t n = (got + 7) / 8;
            for (std::size_t i = 0; i < n; ++i) buf[i] *= buf[i];
            if (!write_all(sv[1], buf, n * 8)) break;
        }
        ::_exit(0);
    }
    ::close(sv[1]);
    return sv[0];
}

void stop_square_child(int fd, pid_t pid) {
    ::close(fd);
    int status;
    ::waitpid(pid, &status, 0);
}

// The floor for BM_PoolSubmitResult: one 8-byte request and answer at a time.
void BM_BareSquareRoundTrip(benchmark::State& state) {
    pid_t pid;
    int fd = start_square_child(&pid);
    if (fd < 0) {
        state.SkipWithError("socketpair/fork failed");
        return;
    }
    std::int64_t x = 0, r = 0;
    for (auto _ : state) {
        if (!write_all(fd, &x, 8) || !read_all(fd, &r, 8) || r != x * x) {
            state.SkipWithError("wrong answer");
            break;
        }
        ++x;
    }
    state.SetItemsProcessed(state.iterations());
    stop_square_child(fd, pid);
}
BENCHMARK(BM_BareSquareRoundTrip)->Unit(benchmark::kMicrosecond)->UseRealTime();

// The floor for BM_PoolSubmitBatch1000: 1,000 requests written in one go, then the answers.
void BM_BareSquareBatch1000(benchmark::State& state) {
    constexpr int kBatch = 1000;
    pid_t pid;
    int fd = start_square_child(&pid);
    if (fd < 0) {
        state.SkipWithError("socketpair/fork failed");
        return;
    }
    std::vector<std::int64_t> xs(kBatch), rs(kBatch);
    for (int i = 0; i < kBatch; ++i) xs[static_cast<std::size_t>(i)] = i;
    for (auto _ : state) {
        // 8,000 bytes each way fit the socket buffers: no deadlock writing all before reading.
        if (!write_all(fd, xs.data(), kBatch * 8) || !read_all(fd, rs.data(), kBatch * 8) ||
            rs.back() != xs.back() * xs.back()) {
            state.SkipWithError("wrong answer");
            break;
        }
    }
    state.SetItemsProcessed(state.iterations() * kBatch);
    stop_square_child(fd, pid);
}
BENCHMARK(BM_BareSquareBatch1000)->Unit(benchmark::kMicrosecond)->UseRealTime();

}  // namespace
