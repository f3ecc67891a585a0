#pragma once
// W1b's parent: a process with a large heap, every page touched, as a program that has loaded
// its data would be. Shared by the mp side and the limit so that both parents are the same
// (this uses no mp). A fork copies the page tables of all of it; a forkserver or spawn start
// does not need to.

#include <sys/mman.h>
#include <unistd.h>

#include <cstddef>
#include <stdexcept>

namespace mp_bench {

/// W1b's heap: 2 GiB, or 64 MiB for --quick (CI only checks that the row runs).
inline std::size_t big_heap_bytes(bool quick) { return (quick ? std::size_t{64} : std::size_t{2048}) << 20; }

/// Maps `bytes` of private anonymous memory and writes to every page. Kept for the process's
/// life: the heap is the point.
inline void touch_big_heap(std::size_t bytes) {
    // MAP_POPULATE: the kernel allocates every page in this one call, far faster than a fault
    // per page, so the row stays short. Ordinary 4 KiB pages, as a heap grown by malloc has
    // here (THP is madvise-only by default); written, so that they are the process's own.
    void* p = ::mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_POPULATE,
                     -1, 0);
    if (p == MAP_FAILED) throw std::runtime_error("W1b: cannot map the parent's heap");
    (void)::madvise(p, bytes, MADV_NOHUGEPAGE);
    const auto page = static_cast<std::size_t>(::sysconf(_SC_PAGESIZE));
    auto* c = static_cast<volatile char*>(p);
    for (std::size_t i = 0; i < bytes; i += page) c[i] = 1;
}

}  // namespace mp_bench
