#include "sys/block_arena.hpp"

#include <sys/mman.h>

#include <algorithm>
#include <cstdint>
#include <functional>

#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/asan_interface.h>
#define MP_POISON(p, n) ASAN_POISON_MEMORY_REGION((p), (n))
#define MP_UNPOISON(p, n) ASAN_UNPOISON_MEMORY_REGION((p), (n))
#else
#define MP_POISON(p, n) ((void)(p), (void)(n))
#define MP_UNPOISON(p, n) ((void)(p), (void)(n))
#endif

namespace mp::sys {

BlockArena::~BlockArena() {
    for (const Chunk& c : chunks_) {
        MP_UNPOISON(c.base, c.bytes);
        ::munmap(c.base, c.bytes);
    }
}

void BlockArena::release() noexcept {
    bool last;
    {
        std::lock_guard lock(mu_);
        owned_ = false;
        last = live_ == 0;
    }
    if (last) delete this;
}

std::size_t BlockArena::mapped_bytes() {
    std::lock_guard lock(mu_);
    std::size_t n = 0;
    for (const Chunk& c : chunks_) n += c.bytes;
    return n;
}

void* BlockArena::take(Chunk& c) noexcept {
    void* p;
    if (c.free != nullptr) {
        p = c.free;
        MP_UNPOISON(p, block_);
        c.free = *static_cast<void**>(p);
    } else {
        p = c.base + c.bumped;
        c.bumped += block_;
        MP_UNPOISON(p, block_);
    }
    if (c.live++ == 0) {
        --empty_;
        empty_bytes_ -= c.bytes;
    }
    ++live_;
    return p;
}

namespace {

#ifndef MADV_POPULATE_WRITE
#define MADV_POPULATE_WRITE 23  // Linux 5.14
#endif

void* map_plain(std::size_t bytes) {
    // MAP_POPULATE: every page present now, in one call, not a fault per page at first use.
    void* m = ::mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_POPULATE, -1, 0);
    return m == MAP_FAILED ? nullptr : m;
}

// `bytes` (a multiple of the huge page size) at an address aligned to it, asking for
// transparent huge pages: one fault (or none, populated) per 2 MiB instead of 512. Where the
// system gives no huge pages, the populate still makes the small ones present.
void* map_huge(std::size_t bytes, std::size_t huge) {
    void* m = ::mmap(nullptr, bytes + huge, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (m == MAP_FAILED) return nullptr;
    const auto raw = reinterpret_cast<std::uintptr_t>(m);
    const std::uintptr_t aligned = (raw + huge - 1) & ~(std::uintptr_t{huge} - 1);
    if (aligned > raw) ::munmap(m, aligned - raw);
    if (const std::uintptr_t end = raw + bytes + huge; end > aligned + bytes)
        ::munmap(reinterpret_cast<void*>(aligned + bytes), end - (aligned + bytes));
    void* p = reinterpret_cast<void*>(aligned);
    (void)::madvise(p, bytes, MADV_HUGEPAGE);        // EINVAL without THP: small pages then
    (void)::madvise(p, bytes, MADV_POPULATE_WRITE);  // EINVAL before Linux 5.14: faults then
    return p;
}

}  // namespace

std::size_t BlockArena::add_chunk() {
    // Small chunks first (a pool that runs a few tasks stays small), then huge-page ones.
    std::size_t bytes = std::max(next_bytes_, (block_ + 4095) & ~std::size_t{4095});
    void* m;
    if (bytes >= kHugePage) {
        bytes = (bytes + kHugePage - 1) & ~(kHugePage - 1);
        m = map_huge(bytes, kHugePage);
    } else {
        m = map_plain(bytes);
        next_bytes_ *= 4;
    }
    if (m == nullptr) throw std::bad_alloc();
    Chunk c;
    c.base = static_cast<char*>(m);
    c.bytes = bytes;
    MP_POISON(c.base, c.bytes);
    auto at = std::upper_bound(chunks_.begin(), chunks_.end(), c.base,
                               [](const char* p, const Chunk& k) { return std::less<>()(p, k.base); });
    try {
        at = chunks_.insert(at, c);
    } catch (...) {
        ::munmap(m, bytes);
        throw;
    }
    ++empty_;
    empty_bytes_ += bytes;
    return static_cast<std::size_t>(at - chunks_.begin());
}

std::size_t BlockArena::find(const void* p) const noexcept {
    const char* q = static_cast<const char*>(p);
    auto at = std::upper_bound(chunks_.begin(), chunks_.end(), q,
                               [](const char* x, const Chunk& k) { return std::less<>()(x, k.base); });
    if (at == chunks_.begin()) return chunks_.size();
    --at;
    return std::less<>()(q, at->base + at->bytes) ? static_cast<std::size_t>(at - chunks_.begin()) : chunks_.size();
}

void* BlockArena::allocate(std::size_t size, std::size_t align) {
    if (align > kAlign || size == 0) return ::operator new(size, std::align_val_t(align));
    std::lock_guard lock(mu_);
    if (request_ == 0) {
        request_ = size;
        block_ = (size + kAlign - 1) & ~(kAlign - 1);
    }
    if (size != request_) return ::operator new(size, std::align_val_t(align));
    if (current_ < chunks_.size() && has_room(chunks_[current_])) return take(chunks_[current_]);
    // The current chunk is full: the fullest other chunk with room (so that the emptier ones
    // can drain and go back), else a new one.
    std::size_t best = chunks_.size();
    for (std::size_t i = 0; i < chunks_.size(); ++i)
        if (has_room(chunks_[i]) && (best == chunks_.size() || chunks_[i].live > chunks_[best].live)) best = i;
    current_ = best < chunks_.size() ? best : add_chunk();
    return take(chunks_[current_]);
}

void BlockArena::deallocate(void* p, std::size_t size, std::size_t align) noexcept {
    if (p == nullptr) return;
    bool gone = false;
    {
        std::unique_lock lock(mu_);
        const std::size_t i = size == request_ && align <= kAlign && size != 0 ? find(p) : chunks_.size();
        if (i == chunks_.size()) {
            lock.unlock();
            ::operator delete(p, std::align_val_t(align));
            return;
        }
        Chunk& c = chunks_[i];
        *static_cast<void**>(p) = c.free;
        c.free = p;
        MP_POISON(p, block_);
        --live_;
        if (--c.live == 0) {
            ++empty_;
            empty_bytes_ += c.bytes;
            // Empty chunks are kept for the next batch, up to kKeepEmpty bytes of them; past
            // that they go back to the system, all but one.
            if (empty_bytes_ > kKeepEmpty && empty_ > 1) {
                --empty_;
                empty_bytes_ -= c.bytes;
                MP_UNPOISON(c.base, c.bytes);
                ::munmap(c.base, c.bytes);
                chunks_.erase(chunks_.begin() + static_cast<std::ptrdiff_t>(i));
                if (current_ == i) current_ = chunks_.size();  // none
                else if (current_ > i) --current_;              // the same chunk, or still none
            }
        }
        gone = !owned_ && live_ == 0;
    }
    if (gone) delete this;
}

}  // namespace mp::sys
