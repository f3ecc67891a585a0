#pragma once
// Fixed-size blocks from chunks whose memory is made present when the chunk is mapped.
//
// Why: a batch of small pool tasks allocates one job per task, and the caller keeps them all (in
// its futures) until it has read the results. On a freshly started pool that is fresh memory, and
// fresh memory costs a page fault per 4 KiB at first touch. On the virtual machines mp runs on, a
// fault is dear: 14 us each on the development VM (100,000 allocations of 200 bytes: 5,084 faults
// in 73 ms), so the 19 MB of jobs of a first batch of 100,000 tasks took about half of that
// batch's time. Populating pages in one call (MAP_POPULATE) halves it there, not more: the
// hypervisor still fills its own page tables at each page's first touch (20 MiB: 3-7 ms to
// populate, then 36-49 ms to touch; 66-82 ms to fault in page by page). Transparent huge pages
// remove both: 20 MiB in 2 MiB pages took 1.5 ms to touch. So the first chunks (64 KiB, 256 KiB,
// 1 MiB: a pool that runs a few tasks stays small) are populated small pages, and the rest are
// 4 MiB, aligned to 2 MiB, with MADV_HUGEPAGE (honoured when the system's THP setting is
// "madvise" or "always"; else small pages, still populated).
//
// The arena keeps its chunks while blocks live in them, and empty ones up to 32 MiB for the next
// batch: past that, memory goes back to the system when a batch's futures are dropped. Blocks of
// one size only (the first request's); any other size or alignment is passed to operator new.
// Thread-safe: blocks are taken and given back from any thread. Under AddressSanitizer a free
// block is poisoned, so a use after free is still reported.

#include <cstddef>
#include <memory>
#include <mutex>
#include <new>
#include <vector>

namespace mp::sys {

class BlockArena {
public:
    /// A new arena, owned by the caller until release().
    static BlockArena* create() { return new BlockArena(); }
    /// The owner is done with it: it is freed at once if no block is live, else when the last
    /// block is given back.
    void release() noexcept;

    [[nodiscard]] void* allocate(std::size_t size, std::size_t align);
    void deallocate(void* p, std::size_t size, std::size_t align) noexcept;
    /// Bytes of chunks mapped now (for tests and diagnostics).
    std::size_t mapped_bytes();

    BlockArena(const BlockArena&) = delete;
    BlockArena& operator=(const BlockArena&) = delete;

private:
    BlockArena() = default;
    ~BlockArena();

    struct Chunk {
        char* base = nullptr;
        std::size_t bytes = 0;
        std::size_t bumped = 0;  // bytes handed out at least once, from the front
        std::size_t live = 0;    // blocks handed out and not given back
        void* free = nullptr;    // given-back blocks, linked through their first word
    };
    bool has_room(const Chunk& c) const noexcept { return c.free != nullptr || c.bumped + block_ <= c.bytes; }
    void* take(Chunk& c) noexcept;
    std::size_t add_chunk();  // index of a new chunk, mapped and populated
    std::size_t find(const void* p) const noexcept;

    std::mutex mu_;
    std::size_t request_ = 0;  // the size blocks serve (the first request's); 0: none yet
    std::size_t block_ = 0;    // request_, rounded up to kAlign
    std::vector<Chunk> chunks_;  // sorted by base
    std::size_t current_ = 0;    // where blocks come from while it has room
    std::size_t empty_ = 0;      // chunks with no live block
    std::size_t empty_bytes_ = 0;  // their size
    std::size_t live_ = 0;
    std::size_t next_bytes_ = kFirstChunk;
    bool owned_ = true;

    static constexpr std::size_t kAlign = alignof(std::max_align_t);
    static constexpr std::size_t kFirstChunk = std::size_t{64} << 10;
    static constexpr std::size_t kHugePage = std::size_t{2} << 20;  // x86-64's and arm64's (4 KiB pages)
    static constexpr std::size_t kKeepEmpty = std::size_t{32} << 20;
};

/// An allocator over a BlockArena, for std::allocate_shared: every object of one type.
template <class T>
struct ArenaAllocator {
    using value_type = T;
    BlockArena* arena;

    explicit ArenaAllocator(BlockArena* a) noexcept : arena(a) {}
    template <class U>
    ArenaAllocator(const ArenaAllocator<U>& other) noexcept : arena(other.arena) {}

    [[nodiscard]] T* allocate(std::size_t n) { return static_cast<T*>(arena->allocate(n * sizeof(T), alignof(T))); }
    void deallocate(T* p, std::size_t n) noexcept { arena->deallocate(p, n * sizeof(T), alignof(T)); }

    template <class U>
    friend bool operator==(const ArenaAllocator& a, const ArenaAllocator<U>& b) noexcept {
        return a.arena == b.arena;
    }
};

}  // namespace mp::sys
