// What a task costs the submitting program in heap: a pool holds the state of every task it has
// not answered (and every Future the caller keeps), so a batch of 100,000 small tasks costs
// 100,000 times this, all of it fresh memory (page faults) on a freshly started pool. Counted
// with a replacement operator new in this binary only, for the thread that submits.

#include <gtest/gtest.h>

#include <malloc.h>

#include <cstddef>
#include <cstdlib>
#include <new>
#include <vector>

#include "mp/futures.hpp"

namespace {

// Counted only while `counting` is set, and only in the thread that set it.
thread_local bool counting = false;
thread_local long allocations = 0;
thread_local long live_bytes = 0;  // allocated minus freed, as malloc_usable_size sees them

void* counted_new(std::size_t n) {
    void* p = std::malloc(n == 0 ? 1 : n);
    if (p == nullptr) throw std::bad_alloc();
    if (counting) {
        ++allocations;
        live_bytes += static_cast<long>(::malloc_usable_size(p));
    }
    return p;
}

void counted_delete(void* p) noexcept {
    if (p != nullptr && counting) live_bytes -= static_cast<long>(::malloc_usable_size(p));
    std::free(p);
}

long long square(long long x) { return x * x; }

}  // namespace

void* operator new(std::size_t n) { return counted_new(n); }
void* operator new[](std::size_t n) { return counted_new(n); }
void operator delete(void* p) noexcept { counted_delete(p); }
void operator delete[](void* p) noexcept { counted_delete(p); }
void operator delete(void* p, std::size_t) noexcept { counted_delete(p); }
void operator delete[](void* p, std::size_t) noexcept { counted_delete(p); }

// The task's encoding (about 40 bytes) lives in the job, and the job with its future is one
// block of the pool's own arena (sys/block_arena.hpp), not of the heap: before, a task cost three
// heap allocations (the job, and the encoding grown twice) and kept about 480 bytes alive (the
// job with a std::mutex, a condition variable, a second mutex and two vectors: 392 bytes, plus
// the encoding's own block); then one allocation of 184 bytes kept per task.
TEST(PoolMemory, ASmallTaskCostsNoLastingHeapAllocation) {
    mp::ProcessPoolExecutor ex({.max_workers = 2});
    ASSERT_EQ(ex.submit(square, 3LL).result(std::chrono::seconds(60)), 9);
    constexpr int kTasks = 2000;
    std::vector<mp::Future<long long>> futures;
    futures.reserve(kTasks);

    counting = true;
    allocations = 0;
    live_bytes = 0;
    for (long long x = 0; x < kTasks; ++x) futures.push_back(ex.submit(square, x));
    counting = false;
    const double per_task_allocations = double(allocations) / kTasks;
    const double per_task_live = double(live_bytes) / kTasks;

    for (long long x = 0; x < kTasks; ++x)
        ASSERT_EQ(futures[static_cast<std::size_t>(x)].result(std::chrono::seconds(60)), x * x);
    // The encoding, copied into the job and freed at once (plus, now and then, a block of the
    // pool's queue).
    EXPECT_LE(per_task_allocations, 1.1);
    // What stays on the heap per task while the caller holds its future: its share of the
    // queue's blocks (a pointer each).
    EXPECT_LE(per_task_live, 40.0);
    RecordProperty("allocations_per_task", std::to_string(per_task_allocations));
    RecordProperty("live_bytes_per_task", std::to_string(per_task_live));
}

