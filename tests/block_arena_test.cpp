// sys::BlockArena, the pool's memory for jobs: blocks of one size from chunks mapped with their
// pages present (sys/block_arena.hpp says why). Correctness only: what it saves is time, which
// belongs to the benchmarks (W2a, the first batch on a fresh pool).
#include <gtest/gtest.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <memory>
#include <set>
#include <thread>
#include <vector>

#include "mp/futures.hpp"
#include "sys/block_arena.hpp"

namespace sys = mp::sys;

namespace {

struct Block {
    std::uint64_t words[24];  // 192 bytes, as the pool's job with its shared_ptr counts
};

// Owns an arena for one test; release() frees it once no block is live.
struct Arena {
    sys::BlockArena* a = sys::BlockArena::create();
    ~Arena() { a->release(); }
    void* take() { return a->allocate(sizeof(Block), alignof(Block)); }
    void give(void* p) { a->deallocate(p, sizeof(Block), alignof(Block)); }
};

long long square(long long x) { return x * x; }

}  // namespace

TEST(SysBlockArena, BlocksAreDistinctAlignedWritableAndReused) {
    Arena arena;
    std::vector<void*> blocks;
    for (int i = 0; i < 1000; ++i) {
        void* p = arena.take();
        ASSERT_EQ(reinterpret_cast<std::uintptr_t>(p) % alignof(std::max_align_t), 0u);
        std::memset(p, i & 0xff, sizeof(Block));
        blocks.push_back(p);
    }
    for (int i = 0; i < 1000; ++i) {
        const auto* bytes = static_cast<const unsigned char*>(blocks[static_cast<std::size_t>(i)]);
        ASSERT_TRUE(std::all_of(bytes, bytes + sizeof(Block), [&](unsigned char b) { return b == (i & 0xff); }))
            << "block " << i << " overlaps another";
    }
    // A block given back is the next one handed out.
    void* last = blocks.back();
    blocks.pop_back();
    arena.give(last);
    EXPECT_EQ(arena.take(), last);
    blocks.push_back(last);
    for (void* p : blocks) arena.give(p);
}

TEST(SysBlockArena, OtherSizesAndAlignmentsGoToOperatorNew) {
    Arena arena;
    void* block = arena.take();  // the first request fixes the block size
    const std::size_t mapped = arena.a->mapped_bytes();
    void* big = arena.a->allocate(4096, 16);
    void* small = arena.a->allocate(8, 8);
    void* aligned = arena.a->allocate(sizeof(Block), 64);
    EXPECT_EQ(reinterpret_cast<std::uintptr_t>(aligned) % 64, 0u);
    std::memset(big, 1, 4096);
    std::memset(small, 2, 8);
    std::memset(aligned, 3, sizeof(Block));
    EXPECT_EQ(arena.a->mapped_bytes(), mapped) << "a block of another size came from the arena";
    arena.a->deallocate(big, 4096, 16);
    arena.a->deallocate(small, 8, 8);
    arena.a->deallocate(aligned, sizeof(Block), 64);
    arena.give(block);
}

// Chunks whose blocks are all given back return to the system, past the 32 MiB kept for the
// next batch.
TEST(SysBlockArena, EmptyChunksGoBackPastWhatIsKept) {
    Arena arena;
    constexpr std::size_t kBlocks = 600'000;  // about 115 MB
    std::vector<void*> blocks(kBlocks);
    for (auto& p : blocks) p = arena.take();
    const std::size_t full = arena.a->mapped_bytes();
    EXPECT_GE(full, kBlocks * sizeof(Block));
    for (void* p : blocks) arena.give(p);
    const std::size_t kept = arena.a->mapped_bytes();
    EXPECT_LE(kept, (std::size_t{32} << 20) + (std::size_t{4} << 20));
    EXPECT_GT(kept, 0u) << "nothing kept for the next batch";
    // The kept chunks serve the next batch of the same size without growing much.
    for (auto& p : blocks) p = arena.take();
    EXPECT_LE(arena.a->mapped_bytes(), full + (std::size_t{4} << 20));
    for (void* p : blocks) arena.give(p);
}

TEST(SysBlockArena, ThreadsTakeAndGiveBackConcurrently) {
    Arena arena;
    constexpr int kThreads = 4, kRounds = 200, kPerRound = 500;
    std::vector<std::thread> threads;
    std::vector<int> bad(kThreads, 0);
    for (int t = 0; t < kThreads; ++t)
        threads.emplace_back([&, t] {
            std::vector<void*> mine;
            for (int r = 0; r < kRounds; ++r) {
                for (int i = 0; i < kPerRound; ++i) {
                    void* p = arena.take();
                    std::memset(p, t + 1, sizeof(Block));
                    mine.push_back(p);
                }
                // Another thread writing into one of ours would show here.
                for (void* p : mine) {
                    const auto* b = static_cast<const unsigned char*>(p);
                    if (b[0] != t + 1 || b[sizeof(Block) - 1] != t + 1) ++bad[static_cast<std::size_t>(t)];
                }
                // Give back every other one, so that chunks hold a mix of live and free blocks.
                std::vector<void*> keep;
                for (std::size_t i = 0; i < mine.size(); ++i) (i % 2 ? keep.push_back(mine[i]) : arena.give(mine[i]));
                mine.swap(keep);
            }
            for (void* p : mine) arena.give(p);
        });
    for (auto& th : threads) th.join();
    for (int t = 0; t < kThreads; ++t) EXPECT_EQ(bad[static_cast<std::size_t>(t)], 0) << "thread " << t;
}

// The owner may let go while blocks live: the arena lasts until the last one is given back.
TEST(SysBlockArena, ReleasedArenaLastsUntilItsLastBlock) {
    auto* arena = sys::BlockArena::create();
    auto held = std::allocate_shared<Block>(sys::ArenaAllocator<Block>(arena));
    held->words[0] = 42;
    arena->release();
    held->words[23] = 7;  // still the arena's memory (AddressSanitizer checks)
    EXPECT_EQ(held->words[0], 42u);
    held.reset();  // frees the arena
}

// The pool's jobs live in its arena: futures read after their executor is gone, and batches
// after the first reuse the memory of the ones before.
TEST(SysBlockArena, FuturesOutliveTheirExecutor) {
    std::vector<mp::Future<long long>> futures;
    {
        mp::ProcessPoolExecutor ex({.max_workers = 2});
        for (int batch = 0; batch < 3; ++batch) {
            futures.clear();
            for (long long x = 0; x < 20'000; ++x) futures.push_back(ex.submit(square, x));
            for (long long x = 0; x < 20'000; ++x)
                ASSERT_EQ(futures[static_cast<std::size_t>(x)].result(std::chrono::seconds(60)), x * x);
        }
    }
    for (long long x = 0; x < 20'000; ++x) EXPECT_EQ(futures[static_cast<std::size_t>(x)].result(), x * x);
}
