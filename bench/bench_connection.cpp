// Microbenchmarks for mp::Connection over mp::Pipe, each beside its bare-OS baseline in the same
// binary so that their ratio comes from one run.
//   - W6 over Pipe: 8-byte send_bytes/recv_bytes round trips with an echo child (us per round
//     trip; bench/run.py's W6-pipe does 100,000), against read/write on a bare socketpair.
//   - W6 against that floor, interleaved: blocks of round trips alternate between the two, and
//     the ratio reported is the median of the per-block ratios (the number to read on a shared,
//     noisy machine, where load from elsewhere would skew two separate runs differently).
//   - W5-like throughput: 1 MiB messages from a child to the parent (bytes per second), against
//     bare read/write of the same frames on a socketpair.

#include <benchmark/benchmark.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstring>
#include <exception>
#include <span>
#include <string>
#include <vector>
#include <tuple>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include "mp/connection.hpp"
#include "mp/process.hpp"

// A lambda that captures a pipe's ends gets them from `mp::Connection a, b; std::tie(a, b) =
// mp::Pipe();`, not from a structured binding: clang 14 cannot capture a binding (C++20 can).
namespace {

// Echoes every message until the empty one (Python's W6 pipe_echo).
void echo(mp::Connection conn) {
    for (;;) {
        std::string m = conn.recv_bytes();
        if (m.empty()) return;
        conn.send_bytes(m);
    }
}

// W6 over Pipe: one round trip of an 8-byte message per iteration.
void BM_PipeRoundTrip8B(benchmark::State& state) {
    try {
        auto [a, b] = mp::Pipe();
        mp::Process p(echo, b);
        p.start();
        b.close();
        const std::uint64_t ping = 0x0123456789abcdefULL;
        const std::string_view msg(reinterpret_cast<const char*>(&ping), sizeof ping);
        std::uint64_t pong = 0;
        a.send_bytes(msg);  // warm: the child is running and its pages are touched
        (void)a.recv_bytes();
        for (auto _ : state) {
            a.send_bytes(msg);
            if (a.recv_bytes_into(std::span<std::byte>(reinterpret_cast<std::byte*>(&pong), 8)) !=
                    8 ||
                pong != ping) {
                state.SkipWithError("wrong echo");
                break;
            }
        }
        a.send_bytes("");
        p.join();
    } catch (const std::exception& e) {
        state.SkipWithError(e.what());
    }
}
BENCHMARK(BM_PipeRoundTrip8B)->Unit(benchmark::kMicrosecond)->UseRealTime()->Iterations(100000);

// The same with send<T>/recv<T> of a std::uint64_t through the codec.
void BM_PipeRoundTripObject(benchmark::State& state) {
    try {
        auto [a, b] = mp::Pipe();
        mp::Process p(echo, b);
        p.start();
        b.close();
        std::uint64_t v = 1;
        for (auto _ : state) {
            a.send(v);
            if (a.recv<std::uint64_t>() != v) {
                state.SkipWithError("wrong echo");
                break;
            }
            ++v;
        }
        a.send_bytes("");
        p.join();
    } catch (const std::exception& e) {
        state.SkipWithError(e.what());
    }
}
BENCHMARK(BM_PipeRoundTripObject)->Unit(benchmark::kMicrosecond)->UseRealTime()->Iterations(100000);

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

// The floor for W6: a forked child echoing 8 bytes with read/write on a bare socketpair.
void BM_BareSocketpairRoundTrip8B(benchmark::State& state) {
    int sv[2];
    if (::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv) != 0) {
        state.SkipWithError("socketpair failed");
        return;
    }
    pid_t pid = ::fork();
    if (pid == 0) {
        ::close(sv[0]);
        std::uint64_t v;
        while (read_all(sv[1], &v, 8) && write_all(sv[1], &v, 8)) {
        }
        ::_exit(0);
    }
    ::close(sv[1]);
    std::uint64_t ping = 42, pong = 0;
    for (auto _ : state) {
        if (!write_all(sv[0], &ping, 8) || !read_all(sv[0], &pong, 8) || pong != ping) {
            state.SkipWithError("wrong echo");
            break;
        }
    }
    ::close(sv[0]);
    int status;
    ::waitpid(pid, &status, 0);
}
BENCHMARK(BM_BareSocketpairRoundTrip8B)
    ->Unit(benchmark::kMicrosecond)
    ->UseRealTime()
    ->Iterations(100000);

// The Pipe and the bare socketpair of the two benchmarks above, interleaved in blocks of kBlock
// round trips (which goes first alternates), with counters: pipe_us and bare_us (median per
// round trip over the blocks) and ratio (median of pipe/bare per block pair).
void BM_PipeVsBareRoundTrip8B(benchmark::State& state) {
    constexpr int kBlock = 2000;
    using Clock = std::chrono::steady_clock;
    int sv[2];
    if (::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv) != 0) {
        state.SkipWithError("socketpair failed");
        return;
    }
    pid_t pid = ::fork();
    if (pid == 0) {
        ::close(sv[0]);
        std::uint64_t v;
        while (read_all(sv[1], &v, 8) && write_all(sv[1], &v, 8)) {
        }
        ::_exit(0);
    }
    ::close(sv[1]);
    try {
        mp::Connection a, b;
        std::tie(a, b) = mp::Pipe();
        mp::Process p(echo, b);
        p.start();
        b.close();
        const std::uint64_t ping = 0x0123456789abcdefULL;
        const std::string_view msg(reinterpret_cast<const char*>(&ping), sizeof ping);
        std::uint64_t pong = 0;
        auto pipe_block = [&] {
            const auto t0 = Clock::now();
            for (int i = 0; i < kBlock; ++i) {
                a.send_bytes(msg);
                if (a.recv_bytes_into(std::span<std::byte>(reinterpret_cast<std::byte*>(&pong),
                                                           8)) != 8 ||
                    pong != ping)
                    return -1.0;
            }
            return std::chrono::duration<double, std::micro>(Clock::now() - t0).count() / kBlock;
        };
        auto bare_block = [&] {
            const auto t0 = Clock::now();
            for (int i = 0; i < kBlock; ++i)
                if (!write_all(sv[0], &ping, 8) || !read_all(sv[0], &pong, 8) || pong != ping)
                    return -1.0;
            return std::chrono::duration<double, std::micro>(Clock::now() - t0).count() / kBlock;
        };
        (void)pipe_block();  // warm both
        (void)bare_block();
        std::vector<double> pipe_us, bare_us, ratio;
        bool pipe_first = true;
        for (auto _ : state) {
            double tp, tb;
            if (pipe_first) {
                tp = pipe_block();
                tb = bare_block();
            } else {
                tb = bare_block();
                tp = pipe_block();
            }
            pipe_first = !pipe_first;
            if (tp < 0 || tb < 0) {
                state.SkipWithError("wrong echo");
                break;
            }
            pipe_us.push_back(tp);
            bare_us.push_back(tb);
            ratio.push_back(tp / tb);
        }
        auto median = [](std::vector<double>& v) {
            if (v.empty()) return 0.0;
            std::nth_element(v.begin(), v.begin() + static_cast<std::ptrdiff_t>(v.size() / 2),
                             v.end());
            return v[v.size() / 2];
        };
        state.counters["pipe_us"] = median(pipe_us);
        state.counters["bare_us"] = median(bare_us);
        state.counters["ratio"] = median(ratio);
        a.send_bytes("");
        p.join();
    } catch (const std::exception& e) {
        state.SkipWithError(e.what());
    }
    ::close(sv[0]);
    int status;
    ::waitpid(pid, &status, 0);
}
BENCHMARK(BM_PipeVsBareRoundTrip8B)->Unit(benchmark::kMillisecond)->UseRealTime()->Iterations(50);

constexpr std::size_t kMiB = 1 << 20;

// Sends `count` messages of 1 MiB, then waits for the parent's one-byte "done".
void produce(mp::Connection c, std::int64_t count) {
    const std::string payload(kMiB, 'p');
    for (std::int64_t i = 0; i < count; ++i) c.send_bytes(payload);
    (void)c.recv_bytes();
}

// W5-like: a child streams 1 MiB messages; the parent receives them with recv_bytes (one fresh
// string each, as Python's recv_bytes returns fresh bytes) or, in the _Into variant, into one
// reused buffer.
void pipe_throughput(benchmark::State& state, bool into) {
    try {
        const auto count = static_cast<std::int64_t>(state.max_iterations);
        auto [a, b] = mp::Pipe();
        mp::Process p(produce, b, count);
        p.start();
        b.close();
        std::string buf(kMiB, '\0');
        for (auto _ : state) {
            std::size_t n = into ? a.recv_bytes_into(buf) : a.recv_bytes().size();
            if (n != kMiB) {
                state.SkipWithError("short message");
                break;
            }
        }
        a.send_bytes("x");
        p.join();
        state.SetBytesProcessed(state.iterations() * static_cast<std::int64_t>(kMiB));
    } catch (const std::exception& e) {
        state.SkipWithError(e.what());
    }
}
void BM_PipeThroughput1MiB(benchmark::State& state) { pipe_throughput(state, false); }
void BM_PipeThroughput1MiB_Into(benchmark::State& state) { pipe_throughput(state, true); }
BENCHMARK(BM_PipeThroughput1MiB)->Unit(benchmark::kMillisecond)->UseRealTime()->Iterations(2000);
BENCHMARK(BM_PipeThroughput1MiB_Into)
    ->Unit(benchmark::kMillisecond)
    ->UseRealTime()
    ->Iterations(2000);

// The floor for the above: the same frames written and read with bare write/read.
void BM_BareSocketpairThroughput1MiB(benchmark::State& state) {
    const auto count = static_cast<std::int64_t>(state.max_iterations);
    int sv[2];
    if (::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv) != 0) {
        state.SkipWithError("socketpair failed");
        return;
    }
    pid_t pid = ::fork();
    if (pid == 0) {
        ::close(sv[0]);
        std::string frame(4 + kMiB, 'p');
        std::memcpy(frame.data(), "\x00\x10\x00\x00", 4);
        for (std::int64_t i = 0; i < count; ++i)
            if (!write_all(sv[1], frame.data(), frame.size())) ::_exit(1);
        char done;
        (void)read_all(sv[1], &done, 1);
        ::_exit(0);
    }
    ::close(sv[1]);
    std::string buf(kMiB, '\0');
    for (auto _ : state) {
        char h[4];
        if (!read_all(sv[0], h, 4) || !read_all(sv[0], buf.data(), kMiB)) {
            state.SkipWithError("short read");
            break;
        }
    }
    (void)write_all(sv[0], "x", 1);
    ::close(sv[0]);
    int status;
    ::waitpid(pid, &status, 0);
    state.SetBytesProcessed(state.iterations() * static_cast<std::int64_t>(kMiB));
}
BENCHMARK(BM_BareSocketpairThroughput1MiB)
    ->Unit(benchmark::kMillisecond)
    ->UseRealTime()
    ->Iterations(2000);

}  // namespace
