// Names code across processes running the same binary: (build id of the module, offset in it).
#include <link.h>
#include <pthread.h>
#if __has_include(<sys/single_threaded.h>)
#include <sys/single_threaded.h>  // glibc 2.32+
#define MP_HAVE_SINGLE_THREADED 1
#else
#define MP_HAVE_SINGLE_THREADED 0
#endif

#include <cstring>
#include <array>
#include <atomic>
#include <mutex>
#include <string>
#include <unordered_set>
#include <vector>

#include "mp/detail/task.hpp"

namespace mp::detail {
namespace {

struct Segment {
    std::uintptr_t begin, end;
    bool exec;
};

struct Module {
    std::uintptr_t base;
    std::uint64_t key;
    std::vector<Segment> segments;
};

std::uint64_t fnv1a(const unsigned char* p, std::size_t n, std::uint64_t h = 1469598103934665603ull) {
    for (std::size_t i = 0; i < n; ++i) {
        h ^= p[i];
        h *= 1099511628211ull;
    }
    return h;
}

// The GNU build id from a module's PT_NOTE segments; 0 when it has none.
std::uint64_t build_id_key(const dl_phdr_info* info) {
    for (int i = 0; i < info->dlpi_phnum; ++i) {
        const ElfW(Phdr)& ph = info->dlpi_phdr[i];
        if (ph.p_type != PT_NOTE) continue;
        auto* p = reinterpret_cast<const unsigned char*>(info->dlpi_addr + ph.p_vaddr);
        const unsigned char* end = p + ph.p_memsz;
        while (p + sizeof(ElfW(Nhdr)) <= end) {
            ElfW(Nhdr) nh;
            std::memcpy(&nh, p, sizeof nh);
            const unsigned char* name = p + sizeof nh;
            const unsigned char* desc = name + ((nh.n_namesz + 3u) & ~3u);
            const unsigned char* next = desc + ((nh.n_descsz + 3u) & ~3u);
            if (next > end) break;
            if (nh.n_type == NT_GNU_BUILD_ID && nh.n_namesz == 4 && std::memcmp(name, "GNU", 4) == 0)
                return fnv1a(desc, nh.n_descsz);
            p = next;
        }
    }
    return 0;
}

// A module without a build id (linked with --build-id=none): a hash of what it loads read-only
// (its headers, code and constants; never a writable segment, which relocation and the program
// change), so that two different programs, or two builds of one, do not look alike across
// processes (its name would not tell them apart: the main program's is empty). Read a word at a
// time: several megabytes in a millisecond or two, once per scan, and only for such modules.
// Not instrumented: the sanitizers' redzones between a module's constants are part of what it
// loads, and reading them here is no bug.
__attribute__((no_sanitize("address", "hwaddress", "thread"))) std::uint64_t contents_key(
    const dl_phdr_info* info) {
    std::uint64_t h = 1469598103934665603ull;
    for (int i = 0; i < info->dlpi_phnum; ++i) {
        const ElfW(Phdr)& ph = info->dlpi_phdr[i];
        if (ph.p_type != PT_LOAD || (ph.p_flags & PF_W) != 0 || (ph.p_flags & PF_R) == 0) continue;
        const auto* p = reinterpret_cast<const unsigned char*>(info->dlpi_addr + ph.p_vaddr);
        const std::size_t n = ph.p_filesz;
        std::size_t at = 0;
        for (; at + 8 <= n; at += 8) {
            std::uint64_t w;
            __builtin_memcpy(&w, p + at, sizeof w);
            h = (h ^ w) * 1099511628211ull;
            h ^= h >> 29;
        }
        for (; at < n; ++at) h = (h ^ p[at]) * 1099511628211ull;
    }
    return h;
}

int collect(dl_phdr_info* info, std::size_t, void* out) {
    Module m;
    m.base = info->dlpi_addr;
    m.key = build_id_key(info);
    if (m.key == 0) m.key = contents_key(info) ^ 1u;
    for (int i = 0; i < info->dlpi_phnum; ++i) {
        const ElfW(Phdr)& ph = info->dlpi_phdr[i];
        if (ph.p_type != PT_LOAD) continue;
        std::uintptr_t b = info->dlpi_addr + ph.p_vaddr;
        m.segments.push_back({b, b + ph.p_memsz, (ph.p_flags & PF_X) != 0});
    }
    static_cast<std::vector<Module>*>(out)->push_back(std::move(m));
    return 0;
}

// The loaded modules, rescanned when an address is not found (a library may have been dlopened
// since the last scan).
class ModuleTable {
public:
    /// Bumped at every rescan: lookups cached by a thread are good while it stays the same.
    static inline std::atomic<std::uint64_t> generation{1};

    template <class Pred>
    const Module* find(Pred pred) {
        std::lock_guard lock(mu_);
        for (int attempt = 0; attempt < 2; ++attempt) {
            if (attempt == 1 || modules_.empty()) rescan();
            for (const Module& m : modules_)
                if (pred(m)) return &m;
        }
        return nullptr;
    }

private:
    void rescan() {
        generation.fetch_add(1, std::memory_order_release);
        modules_.clear();
        dl_iterate_phdr(collect, &modules_);
    }
public:
    std::mutex mu_;  // also held across fork (see fork_guard)

private:
    std::vector<Module> modules_;
};

struct InvokerRegistry {
    std::mutex mu;
    std::unordered_set<std::uintptr_t> set;
};

struct Tables {
    ModuleTable modules;
    InvokerRegistry invokers;
};

void install_fork_guard();

// Never destroyed: a pool or process may still look callables up from a static destructor or an
// exit handler (an executor owned by a global, shut down at exit, starts its workers then), after
// a function-local static made later in the program's run would be gone. Made, with its fork
// guard, at first use and not by an initialiser of this file: invokers register, and a Pool at
// namespace scope forks, before a static libmp's initialisers run (they come after the program's).
Tables& tables() {
    static Tables* t = [] {
        auto* made = new Tables;
        install_fork_guard();
        return made;
    }();
    return *t;
}

ModuleTable& modules() { return tables().modules; }
InvokerRegistry& invokers() { return tables().invokers; }

// A fork from one thread while another holds one of these locks (looking up a callable) would
// leave the child a lock nobody releases, and the child's first task would wait for ever: hold
// both across every fork, as glibc does with its allocator's, and as glibc only while the
// program has ever had a second thread. A single-threaded program's fork then writes nothing
// here: the parent's unlock after fork would write a page the child shares, a copy-on-write
// fault (with a TLB shootdown) on every start (issue 16, W1).
// Written before fork only (both sides read their copy), and only when it changes. Atomic, as
// threads that fork at once run the prepare handler at once (relaxed: it changes only from false
// to true, when a second thread exists, and each fork's handlers read it in its own thread).
std::atomic<bool> g_locked_for_fork{false};

bool may_have_other_threads() noexcept {
#if MP_HAVE_SINGLE_THREADED
    return __libc_single_threaded == 0;
#else
    return true;
#endif
}

void unlock_after_fork() noexcept {
    if (!g_locked_for_fork.load(std::memory_order_relaxed)) return;
    invokers().mu.unlock();
    modules().mu_.unlock();
}

void lock_for_fork() noexcept {
    const bool lock = may_have_other_threads();
    if (g_locked_for_fork.load(std::memory_order_relaxed) != lock)
        g_locked_for_fork.store(lock, std::memory_order_relaxed);
    if (!lock) return;
    modules().mu_.lock();
    invokers().mu.lock();
}

// Called once, by tables() as it makes them (the handlers then find them made).
void install_fork_guard() {
    ::pthread_atfork(lock_for_fork, unlock_after_fork, unlock_after_fork);
}

}  // namespace

CodeRef code_ref_uncached(std::uintptr_t address);
std::uintptr_t resolve_code_uncached(const CodeRef& ref);

// A pool sends the same few callables again and again: each thread remembers its last lookups,
// so a task costs no lock and no search of the module table.
template <class Key, class Value>
struct LookupCache {
    struct Entry {
        std::uint64_t generation = 0;
        Key key{};
        Value value{};
    };
    std::array<Entry, 4> entries{};
    std::size_t next = 0;
    const Value* find(const Key& k) const {
        const auto g = ModuleTable::generation.load(std::memory_order_acquire);
        for (const Entry& e : entries)
            if (e.generation == g && e.key == k) return &e.value;
        return nullptr;
    }
    void put(const Key& k, const Value& v, std::uint64_t g) {
        entries[next] = {g, k, v};
        next = (next + 1) % entries.size();
    }
};

struct RefKey {
    std::uint64_t module, offset;
    bool operator==(const RefKey&) const = default;
};

CodeRef code_ref(std::uintptr_t address) {
    thread_local LookupCache<std::uintptr_t, CodeRef> cache;
    if (const CodeRef* hit = cache.find(address)) return *hit;
    const auto g = ModuleTable::generation.load(std::memory_order_acquire);
    CodeRef r = code_ref_uncached(address);
    cache.put(address, r, g);
    return r;
}

std::uintptr_t resolve_code(const CodeRef& ref) {
    thread_local LookupCache<RefKey, std::uintptr_t> cache;
    const RefKey key{ref.module, ref.offset};
    if (const std::uintptr_t* hit = cache.find(key)) return *hit;
    const auto g = ModuleTable::generation.load(std::memory_order_acquire);
    std::uintptr_t a = resolve_code_uncached(ref);
    cache.put(key, a, g);
    return a;
}

CodeRef code_ref_uncached(std::uintptr_t address) {
    const Module* m = modules().find([&](const Module& mod) {
        for (const Segment& s : mod.segments)
            if (s.exec && address >= s.begin && address < s.end) return true;
        return false;
    });
    if (m == nullptr) throw Error("mp: the callable's code is in no loaded module");
    return {m->key, address - m->base};
}

std::uintptr_t resolve_code_uncached(const CodeRef& ref) {
    std::uintptr_t address = 0;
    const Module* m = modules().find([&](const Module& mod) {
        if (mod.key != ref.module) return false;
        address = mod.base + ref.offset;
        for (const Segment& s : mod.segments)
            if (s.exec && address >= s.begin && address < s.end) return true;
        return false;
    });
    if (m == nullptr)
        throw DecodeError("mp: the received callable names code that this process does not have "
                          "(a different binary or library version?)");
    return address;
}

bool register_invoker(Invoker fn) noexcept {
    try {
        auto& r = invokers();
        std::lock_guard lock(r.mu);
        r.set.insert(reinterpret_cast<std::uintptr_t>(fn));
        return true;
    } catch (...) {
        return false;
    }
}

bool is_registered_invoker(Invoker fn) noexcept {
    // Invokers register at static initialisation and never leave: a hit stays true.
    thread_local std::array<Invoker, 4> seen{};
    thread_local std::size_t next = 0;
    for (Invoker s : seen)
        if (s == fn) return true;
    auto& r = invokers();
    bool known;
    {
        std::lock_guard lock(r.mu);
        known = r.set.count(reinterpret_cast<std::uintptr_t>(fn)) != 0;
    }
    if (known) {
        seen[next] = fn;
        next = (next + 1) % seen.size();
    }
    return known;
}

std::string run_task(std::string_view bytes, std::span<int> fds, TaskResult result) {
    Decoder in(bytes, fds);
    CodeRef r;
    r.module = in.get<std::uint64_t>();
    r.offset = in.get<std::uint64_t>();
    auto inv = reinterpret_cast<Invoker>(resolve_code(r));
    if (!is_registered_invoker(inv))
        throw DecodeError("mp: the received task does not name an mp invoker in this binary");
    Encoder out;
    if (result == TaskResult::sent)
        out.refuse_fds(
            "mp: a task's result holds a handle (a queue, lock, event, connection, shared memory, "
            "...) whose descriptor cannot travel back with it (results come back as bytes): pass "
            "the handle to the task as an argument instead, or create it in the caller");
    inv(in, out);
    return out.take();
}

}  // namespace mp::detail
