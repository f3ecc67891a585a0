// Microbenchmarks for include/mp/shared_memory.hpp, each beside its bare-OS baseline in the same
// binary so that their ratio comes from one run:
//   - BM_SharedMemoryCreateUnlink against BM_BareShmCreateUnlink (shm_open, ftruncate, mmap,
//     munmap, close, shm_unlink): the difference is the resource tracker's messages, one of them
//     a round trip (the name is announced, and acknowledged, before shm_open, so that a creator
//     killed at any instant leaks nothing); about 2x on this machine, on a call made rarely;
//   - BM_ValueLockedIncrement (get_lock + set(get() + 1), the RLock taken three times) against
//     BM_RawValueIncrement (the same memory without a lock), uncontended;
//   - BM_ArrayCreate: a zero-filled Array<double> of N elements (memfd + mmap + first touch).

#include <benchmark/benchmark.h>

#include <fcntl.h>
#include <sys/mman.h>
#include <unistd.h>

#include <cstring>
#include <exception>
#include <mutex>
#include <string>

#include "mp/shared_memory.hpp"

namespace {

void BM_BareShmCreateUnlink(benchmark::State& state) {
    const std::string name = "/mp_bench_bare_" + std::to_string(::getpid());
    const auto size = static_cast<std::size_t>(state.range(0));
    for (auto _ : state) {
        int fd = ::shm_open(name.c_str(), O_CREAT | O_EXCL | O_RDWR, 0600);
        if (fd < 0 || ::ftruncate(fd, static_cast<off_t>(size)) != 0) {
            state.SkipWithError("shm_open/ftruncate failed");
            if (fd >= 0) ::close(fd);
            ::shm_unlink(name.c_str());
            break;
        }
        void* p = ::mmap(nullptr, size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
        ::close(fd);
        if (p == MAP_FAILED) {
            state.SkipWithError("mmap failed");
            ::shm_unlink(name.c_str());
            break;
        }
        benchmark::DoNotOptimize(p);
        ::munmap(p, size);
        ::shm_unlink(name.c_str());
    }
}
BENCHMARK(BM_BareShmCreateUnlink)->Arg(4096)->Unit(benchmark::kMicrosecond);

void BM_SharedMemoryCreateUnlink(benchmark::State& state) {
    const std::string name = "mp_bench_shm_" + std::to_string(::getpid());
    const auto size = static_cast<std::size_t>(state.range(0));
    try {
        {  // outside the timing: the resource tracker starts at the first create
            mp::SharedMemory warm(name, true, size);
            warm.unlink();
        }
        for (auto _ : state) {
            mp::SharedMemory shm(name, true, size);
            benchmark::DoNotOptimize(shm.buf().data());
            shm.close();
            shm.unlink();
        }
    } catch (const std::exception& e) {
        state.SkipWithError(e.what());
    }
}
BENCHMARK(BM_SharedMemoryCreateUnlink)->Arg(4096)->Unit(benchmark::kMicrosecond);

void BM_RawValueIncrement(benchmark::State& state) {
    mp::RawValue<long> v(0);
    for (auto _ : state) v.set(v.get() + 1);
    benchmark::DoNotOptimize(v.get());
}
BENCHMARK(BM_RawValueIncrement);

void BM_ValueLockedIncrement(benchmark::State& state) {
    mp::Value<long> v(0);
    for (auto _ : state) {
        std::lock_guard g(v.get_lock());
        v.set(v.get() + 1);
    }
    benchmark::DoNotOptimize(v.get());
}
BENCHMARK(BM_ValueLockedIncrement);

void BM_ArrayCreate(benchmark::State& state) {
    const auto n = static_cast<std::size_t>(state.range(0));
    for (auto _ : state) {
        mp::Array<double> a(n);
        a[n - 1] = 1.0;  // touch it
        benchmark::DoNotOptimize(a.data());
    }
}
BENCHMARK(BM_ArrayCreate)->Arg(1024)->Arg(1 << 20)->Unit(benchmark::kMicrosecond);

}  // namespace
