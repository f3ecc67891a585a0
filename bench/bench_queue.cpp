// Microbenchmarks for mp::Queue (the W4, W5 and W6-queue workloads of bench/run.py, as Google
// Benchmarks). Each benchmark iteration is one message (W4, W5) or one round trip (W6), so the
// reported time is per message / per round trip and items_per_second (W4) or bytes_per_second
// (W5) is the throughput. The other process is a fork child started before the timed loop.
//
//   W4  one producer process -> one consumer process, 64-byte messages       (msgs/s)
//   W5  the same with 1 MiB messages (the default ring is 1 MiB, so every message streams
//       through it in chunks of a quarter of the ring)                      (MB/s)
//   W6  8-byte round trips between two processes over two Queues             (us per round trip)

#include <benchmark/benchmark.h>

#include <cstdint>
#include <exception>
#include <string>

#include "mp/process.hpp"
#include "mp/queue.hpp"

namespace {

// The producer child puts `n` messages of `size` bytes; the benchmark loop takes them.
void transfer(benchmark::State& state, std::size_t size) {
    try {
        const auto n = static_cast<std::int64_t>(state.max_iterations);
        mp::Queue<std::string> q;
        mp::Process producer([q, n, size]() mutable {
            const std::string msg(size, '\x01');
            for (std::int64_t i = 0; i < n; ++i) q.put(msg);
        });
        producer.start();
        std::size_t bytes = 0;
        for (auto _ : state) {
            std::string m = q.get();
            bytes += m.size();
            benchmark::DoNotOptimize(m.data());
        }
        producer.join();
        if (bytes != static_cast<std::size_t>(n) * size || producer.exitcode() != 0)
            state.SkipWithError("wrong byte count or producer failed");
        state.SetItemsProcessed(state.iterations());
        state.SetBytesProcessed(static_cast<std::int64_t>(bytes));
    } catch (const std::exception& e) {
        state.SkipWithError(e.what());
    }
}

// W4: 1,000,000 messages of 64 bytes.
void BM_QueueTransfer64B(benchmark::State& state) { transfer(state, 64); }
BENCHMARK(BM_QueueTransfer64B)->Iterations(1'000'000)->UseRealTime()->Unit(benchmark::kNanosecond);

// W5: 1 GiB in 1 MiB messages.
void BM_QueueTransfer1MiB(benchmark::State& state) { transfer(state, 1 << 20); }
BENCHMARK(BM_QueueTransfer1MiB)->Iterations(1024)->UseRealTime()->Unit(benchmark::kMicrosecond);

// W6: 100,000 round trips of an 8-byte message over two Queues.
void BM_QueueRoundTrip8B(benchmark::State& state) {
    try {
        mp::Queue<std::string> ping, pong;
        mp::Process echo([ping, pong]() mutable {
            for (;;) {
                std::string m = ping.get();
                if (m.empty()) return;
                pong.put(m);
            }
        });
        echo.start();
        const std::string msg(8, '\x01');
        ping.put(msg);  // warm up both directions outside the timing
        (void)pong.get();
        for (auto _ : state) {
            ping.put(msg);
            std::string r = pong.get();
            benchmark::DoNotOptimize(r.data());
        }
        ping.put(std::string());
        echo.join();
    } catch (const std::exception& e) {
        state.SkipWithError(e.what());
    }
}
BENCHMARK(BM_QueueRoundTrip8B)->Iterations(100'000)->UseRealTime()->Unit(benchmark::kMicrosecond);

}  // namespace
