// The shared-memory transport behind mp::Queue (see include/mp/queue.hpp for the overview).
// One file because the ring's invariants (positions, reservations, the owner-died repair) hold
// across put, get and recovery together; split, no one file would show them whole.
//
// Layout of the memfd block: a Header (one page) followed by the ring (a power of two of bytes).
//
// Positions. `head` and `tail` count bytes written to / taken from the ring since creation; they
// never wrap (2^64 bytes), so `head - tail` is the bytes in use and a recorded position can never
// be confused with a later one. A byte at position p lives at ring[p & (capacity - 1)].
//
// Chunks. A message of n bytes is written as chunks, each a ChunkHeader {id, total = n, len,
// flags} followed by `len` payload bytes (wrapping around the ring end as needed). The first chunk
// has FIRST, the last LAST (a one-chunk message has both); an ABORT chunk (no payload) withdraws
// the partly written message with its id.
//
// Invariants
//  I1  Only the holder of the producer lock (plock) writes ring bytes at or after `head`, `head`,
//      `committed` and the p_* record; only the holder of the consumer lock (clock) writes `tail`,
//      `taken` and the c_* record. (A consumer may hold both: see I6.)
//  I2  Every byte in [tail, head) belongs to a complete chunk: the producer stores `head` (release)
//      only after writing a whole chunk, so a consumer never reads half a chunk.
//  I3  All chunks of one message are written while one producer holds plock without a break, so
//      in the ring a message's chunks are contiguous, in order, and followed (if at all) by the
//      message's ABORT or by the next message's FIRST chunk.
//  I4  After a non-last chunk the producer leaves at least kHdr bytes free (`tail` only grows, so
//      they stay free): an ABORT chunk always fits after a partly written message.
//  I5  The producer writes, in order: p_next_id, p_start = head, p_end = 0, p_committed_before,
//      p_inflight = id; then chunks; before the last chunk p_end = its end and committed += 1;
//      then head = p_end; then p_inflight = 0. So, for a producer that died with p_inflight != 0:
//        head == p_end       the message is complete in the ring (committed counts it);
//        head == p_start     nothing of it is visible: undo committed, nothing else;
//        otherwise           a part is visible: undo committed and append ABORT (fits by I4).
//      The repair itself follows the same record (it sets p_end before publishing the ABORT), so
//      a repairer killed half-way leaves a state the next repairer handles: repair is idempotent.
//  I6  A consumer assembling a message that sees no further chunk checks plock: if it can take it
//      (free, or EOWNERDEAD and repaired by I5) no producer is writing that message any more, so
//      once the chunks now in the ring are read and the message is still incomplete, it is
//      dropped. While plock is held by a live producer the rest is coming. Likewise a getter
//      waiting on an empty ring while `committed` counts a message it does not hold (a producer
//      copying its only chunk in, or dead doing so), and a joiner, try plock every kPeerCheck:
//      a dead producer's count is undone then, not at the next put.
//  I7  A consumer reads a chunk fully before it stores `tail` past it; a chunk whose FIRST it did
//      not see (its message's taker died after taking the FIRST) is dropped, and an orphan LAST
//      counts the message as taken (and done, for join()).
//  I8  Taking a message's last chunk: c_pending_taken = taken + 1, c_pending_end = new tail;
//      tail = new tail; taken = c_pending_taken; c_pending_end = 0. A consumer that finds the
//      clock owner dead and tail == c_pending_end knows the message left the ring but never
//      reached its caller: it sets taken and counts the message done.
//  I9  p_tail_seen <= tail and c_head_seen <= head always: each is written only by its side's
//      lock holder, with a value just read (acquire) from the real index, and the indices only
//      grow. So the room (chunks) a stale copy shows is really there, and the bytes it covers
//      are ordered by that acquire and the lock hand-off since; a side reads the other's index
//      only when its copy shows too little, not once per message (a cache miss each time).
//  I10 shutdown() raises the shutdown word, then wakes every waiter. A put looks at the word
//      under plock, and every put or get wait counts it as a reason to stop waiting, so once a
//      holder of plock has seen the word no message can start or complete after it: a put
//      blocked for a slot or room leaves (a partly streamed message is withdrawn, I5). A
//      consumer that finds the ring empty under a raised word takes plock (waiting out or
//      repairing the put under way) before it says ShutDown, so "shut down and empty" is
//      final. kImmediate: a clock holder that sees it takes plock too and drains the ring,
//      counting each message it ends as taken and done (the shutdown caller does; so does any
//      getter, in case that caller died half-way).
//  The record stores (I5, I8) need only their program order, which release stores keep (a
//  killed process's stores still land in that order); the stores a waiter on the other side
//  must see before the flag is read (head, tail, and taken when there is a maxsize) are ordered
//  before that read as Waiting says.
//
// Waiting. A waiter first spins and yields briefly (spin_for), then sleeps. Each side has a
// sequence word (futex) and a "waiting" flag; there is at most one
// waiter per side at a time (the lock holder), so a flag suffices, and a waiter killed while
// waiting leaves at most a stale flag, which costs the other side a futex_wake call per chunk
// until the next waiter on that side clears it. The waiter sets its flag,
// reads the sequence, re-checks its condition and sleeps on the sequence; the other side stores
// its index, then reads the flag, and if set bumps the sequence and wakes. The flag's store and
// every read in the waiter's condition are seq_cst, and so is the other side's read of the flag,
// with a seq_cst store or fence between its index and that read, so either the waiter sees the
// new index or the other side sees the flag (Dekker). The index store that completes a put or a
// get (a message's last chunk) is a release store: the lock's release that follows it (an
// atomic read-modify-write) and a seq_cst fence after that order it before the flag's read, and the
// wake-up comes after the unlock. On x86-64 the fence then finds nothing left to drain, so a put
// and a get each cost two atomic read-modify-writes (the lock, its release) instead of three
// (bench row W4). A waker killed between the unlock and the wake-up is a wake-up lost, as one
// killed between its index and the wake-up always was: the waiter's sleep is cut into 50 ms
// slices (sys::futex_wait_sliced). A producer that finds the ring full first waits up to
// kYieldTime for a 64th of the ring to be free, more than it needs (spin_for, reading tail every
// 16 pauses): taking room as each message frees it would keep both sides in lockstep.

#include "mp/queue.hpp"

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <cstddef>
#include <cstring>
#include <ctime>
#include <new>
#include <utility>
#include <sched.h>
#if defined(__SSE2__)
#include <emmintrin.h>
#endif
#include <stdexcept>
#include <system_error>

#include "sys/cpu_relax.hpp"
#include "sys/error.hpp"
#include "sys/futex.hpp"
#include "sys/futex_mutex.hpp"
#include "sys/pidfd.hpp"


namespace mp::detail {

namespace {

constexpr std::uint64_t kMagic = 0x6d702d7175657565ULL;  // "mp-queue"
constexpr std::uint32_t kVersion = 4;  // 3: the locks are sys::FutexMutex; 4: the shutdown word
constexpr std::size_t kHeaderBytes = 4096;
constexpr std::size_t kMinRing = 4096;
// How a waiter waits before it sleeps on the futex: first it spins briefly (the peer on another
// core usually answers within a microsecond or two), then it yields the CPU for a while (the peer
// may be waiting for *this* core: spinning would only delay it) and finally sleeps. Together they
// catch a peer that is busy putting or taking without paying for a futex sleep and wake-up on
// either side, which costs several microseconds and, with a full ring, would otherwise recur for
// every message the consumer frees; an idle queue still sleeps after kYieldTime.
constexpr auto kSpinTime = std::chrono::microseconds(2);
constexpr auto kYieldTime = std::chrono::microseconds(20);
// How often a consumer holding part of a message checks whether its producer died.
constexpr auto kPeerCheck = std::chrono::milliseconds(20);

enum : std::uint32_t { kFirst = 1, kLast = 2, kAbort = 4 };
// Header::shutdown; it only ever rises (kOpen -> kShut -> kImmediate).
enum : std::uint32_t { kOpen = 0, kShut = 1, kImmediate = 2 };

struct ChunkHeader {
    std::uint64_t id;
    std::uint64_t total;
    std::uint32_t len;
    std::uint32_t flags;
};
constexpr std::uint64_t kHdr = sizeof(ChunkHeader);
static_assert(kHdr == 24);

using U64 = std::atomic<std::uint64_t>;
using U32 = std::atomic<std::uint32_t>;
constexpr auto sc = std::memory_order_seq_cst;
constexpr auto rlx = std::memory_order_relaxed;
constexpr auto acq = std::memory_order_acquire;
constexpr auto rel = std::memory_order_release;

// The seq_cst fence after a lock's release (see Waiting). GCC's ThreadSanitizer does not support
// fences (-Wtsan) and does not model them: there a seq_cst read-modify-write stands in, which
// orders the same on x86-64. On x86-64 the release itself is a locked compare-exchange (always,
// FutexMutex::unlock and release), a full barrier there: what is left to stop is the compiler
// moving the loads that follow above it. A second barrier cost ~5 ns of a 64-byte put or get.
inline void fence_after_unlock() noexcept {
#if defined(__SANITIZE_THREAD__)
    std::atomic<std::uint32_t> stand_in{0};
    (void)stand_in.fetch_add(0, std::memory_order_seq_cst);
#elif defined(__x86_64__)
    std::atomic_signal_fence(std::memory_order_seq_cst);
#else
    std::atomic_thread_fence(std::memory_order_seq_cst);
#endif
}

// Holds a queue lock (sys::FutexMutex); when its previous holder died, runs the repair first. A
// repair that throws leaves the lock as a dead holder's, so the next locker repairs again (as a
// repairer killed half-way does: see I5, I8).
//
// A wake-up given to a waiter killed before it takes the lock is not lost: FutexMutex keeps
// FUTEX_WAITERS for the next holder's unlock.
class RobustGuard {
public:
    RobustGuard() = default;
    RobustGuard(const RobustGuard&) = delete;
    RobustGuard& operator=(const RobustGuard&) = delete;
    ~RobustGuard() { unlock(); }

    // block false: trylock; true: until `deadline` (or forever).
    template <class Repair>
    [[nodiscard]] bool lock(sys::FutexMutex* m, bool block, const Deadline& deadline, Repair repair) {
        switch (m->lock(sys::this_thread_id(), block, deadline)) {
            case sys::FutexMutex::Result::busy: return false;
            case sys::FutexMutex::Result::held_by_caller:
                // Only a signal handler re-entering put or get could get here.
                throw std::system_error(
                    std::make_error_code(std::errc::resource_deadlock_would_occur),
                    "mp::Queue: the calling thread already holds the queue's lock");
            case sys::FutexMutex::Result::acquired: break;
            case sys::FutexMutex::Result::owner_died:
                try {
                    repair();
                } catch (...) {
                    m->abandon();
                    throw;
                }
                break;
        }
        m_ = m;
        return true;
    }
    void unlock() noexcept {
        if (m_ != nullptr) std::exchange(m_, nullptr)->unlock();
    }
    bool owns() const noexcept { return m_ != nullptr; }

private:
    sys::FutexMutex* m_ = nullptr;
};

std::size_t ring_size_for(std::size_t requested) {
    std::size_t n = kMinRing;
    while (n < requested) {
        if (n >= (std::size_t{1} << 30))
            throw std::invalid_argument("mp::Queue: the buffer may be at most 1 GiB");
        n <<= 1;
    }
    return n;
}

}  // namespace

struct QueueCore::Header {
    std::uint64_t magic;
    std::uint32_t version;
    std::uint32_t reserved;
    std::uint64_t capacity;  // ring bytes, a power of two
    std::uint64_t maxsize;   // 0: no item limit

    alignas(64) sys::FutexMutex plock;
    // Producer side (I1: written by the plock holder).
    alignas(64) U64 head;
    U64 committed;  // messages made visible (or about to be: I5)
    // The producer's record (I5), on a line of its own: the consumer reads `head` for every
    // message and should not miss in cache because the producer wrote its record.
    alignas(64) U64 p_next_id;
    U64 p_inflight;
    U64 p_start;
    U64 p_end;
    U64 p_committed_before;
    U64 space_target;  // the tail the waiting producer needs (0: any progress)
    U64 p_tail_seen;   // a tail the producers last read: a lower bound, so room it shows is there

    alignas(64) sys::FutexMutex clock;
    // Consumer side (I1: written by the clock holder).
    alignas(64) U64 tail;
    U64 taken;
    alignas(64) U64 c_pending_end;  // the consumer's record (I8), on its own line
    U64 c_pending_taken;
    U64 c_head_seen;  // a head the consumers last read: a lower bound, so chunks it shows are there

    alignas(64) U32 data_seq;  // bumped by the producer for a waiting consumer
    U32 data_waiting;
    alignas(64) U32 space_seq;  // bumped by the consumer for a waiting producer
    U32 space_waiting;

    alignas(64) U64 tasks_done;  // JoinableQueue: task_done calls (and messages lost, I8)
    U32 join_seq;
    U32 joiners;

    // shutdown(): kOpen, kShut or kImmediate. On a line of its own that is written once, so
    // the load every put makes stays a cache hit.
    alignas(64) U32 shutdown;
};

static_assert(sizeof(QueueCore::Header) <= kHeaderBytes);

QueueCore::QueueCore(std::size_t maxsize, std::size_t buffer_bytes) {
    const std::size_t cap = ring_size_for(buffer_bytes);
    block_ = SharedBlock::create(kHeaderBytes + cap, "mp-queue");
    h_ = new (block_.data()) Header{};  // zero bytes: unlocked locks
    h_->magic = kMagic;
    h_->version = kVersion;
    h_->capacity = cap;
    h_->maxsize = maxsize;
    ring_ = static_cast<char*>(block_.data()) + kHeaderBytes;
}

QueueCore::QueueCore(SharedBlock block) : block_(std::move(block)) {
    if (block_.size() < kHeaderBytes + kMinRing)
        throw DecodeError("mp::Queue: the shared block is too small to hold a queue");
    h_ = static_cast<Header*>(block_.data());
    const std::uint64_t cap = h_->capacity;
    if (h_->magic != kMagic || h_->version != kVersion || cap < kMinRing ||
        (cap & (cap - 1)) != 0 || block_.size() < kHeaderBytes + cap)
        throw DecodeError("mp::Queue: the shared block does not hold a queue");
    ring_ = static_cast<char*>(block_.data()) + kHeaderBytes;
}

QueueCore::~QueueCore() { attached::forget(block_); }

void QueueCore::close() noexcept { closed_by_.store(sys::self_pid(), std::memory_order_relaxed); }

void QueueCore::check_open_slow() const {
    if (closed_by_.load(std::memory_order_relaxed) == sys::self_pid()) throw QueueClosed();
}

std::shared_ptr<QueueCore> make_queue(std::size_t maxsize, std::size_t buffer_bytes) {
    auto core = std::make_shared<QueueCore>(maxsize, buffer_bytes);
    attached::record(core->block_, attached::queue_tag, [&] { return core; });
    return core;
}

// Two mappings of one queue in one process would put its robust mutexes at two addresses (see
// detail::attached).
std::shared_ptr<QueueCore> attach_queue(int fd) {
    return std::static_pointer_cast<QueueCore>(attached::find_or_attach(
        fd, 1, "mp::Queue",
        [](std::uint32_t tag) {
            if (tag != attached::queue_tag)
                throw DecodeError("mp::Queue: the received memory holds another kind of object");
        },
        [](SharedBlock b) -> std::pair<std::shared_ptr<void>, std::uint32_t> {
            return {std::make_shared<QueueCore>(std::move(b)), attached::queue_tag};
        }));
}

void* QueueCore::producer_lock_for_testing() const noexcept { return &h_->plock; }

std::size_t QueueCore::maxsize() const noexcept { return h_->maxsize; }
std::size_t QueueCore::buffer_size() const noexcept { return h_->capacity; }

std::size_t QueueCore::qsize() const noexcept {
    // taken first: taken <= committed at any instant, and committed only grows after that read
    // (except an undo of a message that was never visible, hence never taken).
    const std::uint64_t t = h_->taken.load(acq);
    const std::uint64_t c = h_->committed.load(acq);
    return c > t ? static_cast<std::size_t>(c - t) : 0;
}

namespace {

// Ring access with wrap-around.
struct Ring {
    char* base;
    std::uint64_t cap;
    void write(std::uint64_t pos, const void* src, std::size_t n) const noexcept {
        const std::size_t off = static_cast<std::size_t>(pos & (cap - 1));
        const std::size_t first = std::min<std::size_t>(n, cap - off);
        std::memcpy(base + off, src, first);
        if (n > first) std::memcpy(base, static_cast<const char*>(src) + first, n - first);
    }
    // A chunk header, field by field where it does not wrap. Copied as one block from a header
    // the caller has just built, it is a 16-byte load of two 8-byte stores still in the store
    // buffer, which cannot be forwarded and stalls the put (a fifth of its time at 64 bytes).
    void write_header(std::uint64_t pos, const ChunkHeader& c) const noexcept {
        const std::size_t off = static_cast<std::size_t>(pos & (cap - 1));
        if (off + kHdr > cap) return write(pos, &c, kHdr);
        char* p = base + off;
#if defined(__SSE2__)
        // Two stores, as the block copy makes them, from registers.
        static_assert(offsetof(ChunkHeader, total) == 8 && offsetof(ChunkHeader, flags) == 20);
        _mm_storeu_si128(reinterpret_cast<__m128i*>(p),
                         _mm_set_epi64x(static_cast<long long>(c.total), static_cast<long long>(c.id)));
        const std::uint64_t len_flags = c.len | std::uint64_t{c.flags} << 32;  // little-endian
        std::memcpy(p + offsetof(ChunkHeader, len), &len_flags, sizeof len_flags);
#else
        std::memcpy(p + offsetof(ChunkHeader, id), &c.id, sizeof c.id);
        std::memcpy(p + offsetof(ChunkHeader, total), &c.total, sizeof c.total);
        std::memcpy(p + offsetof(ChunkHeader, len), &c.len, sizeof c.len);
        std::memcpy(p + offsetof(ChunkHeader, flags), &c.flags, sizeof c.flags);
#endif
    }
    void read(std::uint64_t pos, void* dst, std::size_t n) const noexcept {
        const std::size_t off = static_cast<std::size_t>(pos & (cap - 1));
        const std::size_t first = std::min<std::size_t>(n, cap - off);
        std::memcpy(dst, base + off, first);
        if (n > first) std::memcpy(static_cast<char*>(dst) + first, base, n - first);
    }
    void append_to(QueueSink& out, std::uint64_t pos, std::size_t n) const {
        const std::size_t off = static_cast<std::size_t>(pos & (cap - 1));
        const std::size_t first = std::min<std::size_t>(n, cap - off);
        out.append(base + off, first);
        if (n > first) out.append(base, n - first);
    }
};

// The bytes of a message given as parts, read front to back as its chunks are written.
class Gather {
public:
    explicit Gather(std::span<const std::string_view> parts) noexcept : parts_(parts) {}
    // Copies the next n bytes (n <= those left) into the ring at pos.
    void copy_to(const Ring& ring, std::uint64_t pos, std::uint64_t n) noexcept {
        while (n != 0) {
            while (off_ == parts_[i_].size()) {
                ++i_;
                off_ = 0;
            }
            const std::size_t k = static_cast<std::size_t>(
                std::min<std::uint64_t>(n, parts_[i_].size() - off_));
            ring.write(pos, parts_[i_].data() + off_, k);
            off_ += k;
            pos += k;
            n -= k;
        }
    }

private:
    std::span<const std::string_view> parts_;
    std::size_t i_ = 0;
    std::size_t off_ = 0;
};

// Collects a message into a std::string (the Codec path).
class StringSink final : public QueueSink {
public:
    explicit StringSink(std::string& out) noexcept : out_(out) {}
    void begin(std::uint64_t total) override {
        out_.clear();
        out_.reserve(static_cast<std::size_t>(total));
    }
    void append(const char* data, std::size_t n) override { out_.append(data, n); }

private:
    std::string& out_;
};

// Spins, then yields, until ready(), for at most kYieldTime (less by `deadline`); returns
// whether ready() came true. It reads ready() every `gap` pauses: 1 for a waiter that must
// answer at once, more for one waiting for a condition better than the one it needs (each read
// takes the line from its writer).
template <class Ready>
bool spin_for(Ready ready, int gap = 1, const Deadline& deadline = std::nullopt) {
    if (ready()) return true;
    const auto start = std::chrono::steady_clock::now();
    const auto end = deadline && *deadline < start + kYieldTime ? *deadline : start + kYieldTime;
    for (auto now = start; now < end; now = std::chrono::steady_clock::now()) {
        if (now - start < kSpinTime) {
            for (int i = 1; i <= 16; ++i) {
                sys::cpu_relax();
                if (i % gap == 0 && ready()) return true;
            }
        } else {
            ::sched_yield();
            if (ready()) return true;
        }
    }
    return false;
}

template <class Ready>
bool wait_for(U32& seq, U32& flag, const Deadline& deadline, Ready ready) {
    if (spin_for(ready)) return true;
    for (;;) {
        flag.store(1, sc);
        const std::uint32_t seen = seq.load(sc);
        if (ready()) break;
        // Sliced: a peer killed between making progress and waking us, or another waiter
        // clearing the shared flag as it leaves, would otherwise leave us asleep although the
        // condition holds.
        if (sys::futex_wait_sliced(seq, seen, deadline) == sys::FutexResult::timed_out) break;
    }
    flag.store(0, rlx);
    return ready();
}

void wake_if_waiting(U32& seq, U32& flag) {
    if (flag.load(sc) != 0) {
        seq.fetch_add(1, sc);
        sys::futex_wake_all(seq);
    }
}

}  // namespace

// ---- the producer side (caller holds plock) --------------------------------------------------

namespace {

struct Producer {
    QueueCore::Header* h;
    Ring ring;

    void publish(std::uint64_t new_head) {
        h->head.store(new_head, sc);
        wake_if_waiting(h->data_seq, h->data_waiting);
    }
    // publish() of a message's last chunk, which ends the put: `guard` (plock) is released
    // before the consumer is woken, and its exchange with the fence orders the head before the
    // flag's read (Waiting). The caller has disarmed its Settle: the message is complete.
    void publish_last_and_unlock(std::uint64_t new_head, RobustGuard& guard) {
        h->head.store(new_head, rel);
        h->p_inflight.store(0, rel);
        guard.unlock();
        fence_after_unlock();
        wake_if_waiting(h->data_seq, h->data_waiting);
    }
    void write_chunk(std::uint64_t pos, const ChunkHeader& c, Gather& payload) {
        ring.write_header(pos, c);
        payload.copy_to(ring, pos + kHdr, c.len);
    }
    void wake_joiners() {
        h->join_seq.fetch_add(1, sc);
        if (h->joiners.load(sc) != 0) sys::futex_wake_all(h->join_seq);
    }

    // I5: finishes (keeps) or withdraws the message recorded in p_inflight. Used for the repair
    // after a producer died and by a live producer whose put timed out half-way.
    void settle_inflight() {
        const std::uint64_t id = h->p_inflight.load(acq);
        if (id == 0) return;
        const std::uint64_t hd = h->head.load(acq);
        const std::uint64_t end = h->p_end.load(acq);
        if (!(end != 0 && hd == end)) {
            h->committed.store(h->p_committed_before.load(acq), sc);
            wake_joiners();  // the undo may make tasks_done == committed
            if (hd != h->p_start.load(acq)) {
                const std::uint64_t ne = hd + kHdr;
                h->p_end.store(ne, rel);
                const ChunkHeader abort{id, 0, 0, kAbort};
                ring.write_header(hd, abort);  // fits: I4
                publish(ne);
            }
        }
        h->p_inflight.store(0, rel);
    }
};

}  // namespace

bool QueueCore::put(std::span<const std::string_view> parts, bool block,
                    const Deadline& deadline) {
    Header* const h = h_;
    Producer p{h, Ring{ring_, h->capacity}};
    auto shut = [&] { return h->shutdown.load(sc) != kOpen; };
    // Before the lock too, so that put_nowait says ShutDown rather than Full while a put holds it.
    if (shut()) throw ShutDown();
    RobustGuard guard;
    if (!guard.lock(&h->plock, block, deadline, [&] { p.settle_inflight(); })) return false;
    if (shut()) throw ShutDown();  // I10: under plock

    const std::uint64_t cap = h->capacity;
    if (h->maxsize != 0) {
        auto has_slot = [&] {
            const std::uint64_t t = h->taken.load(sc);
            return h->committed.load(rlx) - t < h->maxsize;
        };
        if (!has_slot()) {
            if (!block) return false;
            h->space_target.store(0, sc);
            const bool got = wait_for(h->space_seq, h->space_waiting, deadline,
                                      [&] { return has_slot() || shut(); });
            if (shut()) throw ShutDown();
            if (!got) return false;
        }
    }

    std::uint64_t n = 0;
    for (const std::string_view part : parts) n += part.size();
    Gather bytes(parts);
    // put_nowait: all or nothing, so it never leaves a withdrawn part taking up the ring.
    if (!block && kHdr + n > cap - (h->head.load(rlx) - h->tail.load(acq))) return false;
    const std::uint64_t id = h->p_next_id.load(rlx) + 1;
    h->p_next_id.store(id, rel);
    h->p_start.store(h->head.load(rlx), rel);
    h->p_end.store(0, rel);
    h->p_committed_before.store(h->committed.load(rlx), rel);
    // Release, not seq_cst: only a later plock holder reads the record, and it needs only the
    // order of these stores (a killed process's stores still land in program order).
    h->p_inflight.store(id, rel);

    // Whatever escapes below (only a futex misuse could), the message is settled, not left
    // half-written under a lock that is then released.
    struct Settle {
        Producer& p;
        bool armed = true;
        ~Settle() {
            if (armed) p.settle_inflight();
        }
    } settle{p};

    std::uint64_t off = 0;
    std::uint32_t first = kFirst;
    for (;;) {
        const std::uint64_t hd = h->head.load(rlx);
        const std::uint64_t rem = n - off;
        // Read the consumers' tail only when the last one seen leaves too little room: the line
        // it lives on changes with every message taken, and reading it each time costs a cache
        // miss per message.
        std::uint64_t tl = h->p_tail_seen.load(rlx);
        if (cap - (hd - tl) < kHdr + rem) {
            tl = h->tail.load(acq);
            h->p_tail_seen.store(tl, rlx);
        }
        const std::uint64_t free = cap - (hd - tl);
        if (kHdr + rem <= free) {
            // The last chunk (I5: record its end and commit before making it visible).
            const std::uint64_t nh = hd + kHdr + rem;
            h->p_end.store(nh, rel);
            h->committed.store(h->committed.load(rlx) + 1, rel);
            p.write_chunk(hd,
                          ChunkHeader{id, n, static_cast<std::uint32_t>(rem), first | kLast},
                          bytes);
            settle.armed = false;
            p.publish_last_and_unlock(nh, guard);
            return true;
        }
        const std::uint64_t min_piece = std::min<std::uint64_t>(rem, cap / 4);
        if (free >= 2 * kHdr + min_piece) {
            // A non-last chunk, leaving kHdr bytes free for a possible ABORT (I4). At most a
            // quarter of the ring, so that the consumer copies one chunk out while we copy the
            // next in, rather than each waiting for the other's whole ring.
            const std::uint64_t len = std::min(free - 2 * kHdr, cap / 4);
            p.write_chunk(hd, ChunkHeader{id, n, static_cast<std::uint32_t>(len), first}, bytes);
            p.publish(hd + kHdr + len);
            off += len;
            first = 0;
            continue;
        }
        if (!block) return false;  // Settle withdraws what was written
        // Wait for exactly the room the next chunk needs: a consumer wakes us only when its tail
        // reaches that (space_target), so a slow consumer does not pay a wake-up per chunk while
        // we are still short of room.
        const std::uint64_t need = std::min(kHdr + rem, 2 * kHdr + min_piece);
        // A full ring: first wait a little for a batch of room (1/64 of the ring, 16 KiB by
        // default), not only for this chunk's. Taking room as each message frees it keeps both
        // sides at the full mark in lockstep, each message a hand-off of the tail's line and of
        // the slot just read (W4, 64-byte messages: 14.9M -> 24.3M/s, medians of 6). Bounded
        // (kYieldTime) and cut short by the deadline: when a consumer stops after one message,
        // this put still goes into the room it freed.
        if (const std::uint64_t batch = cap / 64; batch > need)
            (void)spin_for([&] { return cap - (hd - h->tail.load(acq)) >= batch || shut(); }, 16, deadline);
        auto room = [&] { return cap - (hd - h->tail.load(sc)) >= need; };
        h->space_target.store(hd + need - cap, sc);  // no wrap: hd - tail > cap - need here
        const bool got = wait_for(h->space_seq, h->space_waiting, deadline,
                                  [&] { return room() || shut(); });
        if (shut()) throw ShutDown();  // Settle withdraws the part written (I10)
        if (!got) return false;        // timed out: likewise
    }
}

// ---- the consumer side (caller holds clock) ---------------------------------------------------

namespace {

struct Consumer {
    QueueCore::Header* h;
    Ring ring;

    void wake_producer() {
        if (h->space_waiting.load(sc) != 0 && h->tail.load(rlx) >= h->space_target.load(sc)) {
            h->space_seq.fetch_add(1, sc);
            sys::futex_wake_all(h->space_seq);
        }
    }
    void advance(std::uint64_t new_tail) {
        h->tail.store(new_tail, sc);
        wake_producer();
    }
    // I8: the tail past a message's last chunk, and the count, as a unit a repairer can finish.
    // `order`: seq_cst when wake_producer follows at once, release when an unlock and a fence
    // come first (take_and_unlock); either way ordered before the producer's flag is read.
    void record_take(std::uint64_t new_tail, std::memory_order order) {
        const std::uint64_t t = h->taken.load(rlx) + 1;
        h->c_pending_taken.store(t, rel);
        h->c_pending_end.store(new_tail, rel);  // ordered before tail: I8 needs only the order
        h->tail.store(new_tail, order);
        // Only a producer waiting for an item slot (maxsize) must see `taken` before we look at
        // its flag; without a maxsize, release keeps I8's order at less cost.
        h->taken.store(t, h->maxsize != 0 ? order : rel);
        h->c_pending_end.store(0, rel);
    }
    void take(std::uint64_t new_tail) {
        record_take(new_tail, sc);
        wake_producer();
    }
    // take() of the message get() returns: `guard` (clock) is released before the producer is
    // woken, and its exchange with the fence orders the tail before the flag's read (Waiting).
    void take_and_unlock(std::uint64_t new_tail, RobustGuard& guard) {
        record_take(new_tail, rel);
        guard.unlock();
        fence_after_unlock();
        wake_producer();
    }
    void count_lost() {
        h->tasks_done.fetch_add(1, sc);
        h->join_seq.fetch_add(1, sc);
        if (h->joiners.load(sc) != 0) sys::futex_wake_all(h->join_seq);
    }
    // I10, kImmediate (caller holds clock): with plock too, no put is under way, so the ring
    // holds all there will ever be; every message ended here counts as taken and done.
    void drain() {
        Producer p{h, ring};
        RobustGuard producer_guard;
        (void)producer_guard.lock(&h->plock, true, std::nullopt, [&] { p.settle_inflight(); });
        for (;;) {
            const std::uint64_t t = h->tail.load(rlx);
            const std::uint64_t hd = h->head.load(acq);
            if (hd - t < kHdr) return;
            ChunkHeader ch;
            ring.read(t, &ch, kHdr);
            if (ch.len > hd - t - kHdr) throw Error("mp::Queue: the shared ring is corrupt");
            const std::uint64_t nt = t + kHdr + ch.len;
            if ((ch.flags & (kLast | kAbort)) == kLast) {
                take(nt);
                count_lost();
            } else {
                advance(nt);
            }
        }
    }
    // I8 repair after a consumer died holding clock.
    void repair() {
        const std::uint64_t end = h->c_pending_end.load(acq);
        if (end == 0) return;
        if (h->tail.load(acq) == end) {
            h->taken.store(h->c_pending_taken.load(acq), sc);
            count_lost();
        }
        h->c_pending_end.store(0, rel);
        wake_producer();
    }
};

}  // namespace

namespace {

// Takes plock for a moment if it is free, repairing after a producer that died holding it (I5).
void probe_producer(QueueCore::Header* h, const Ring& ring) {
    RobustGuard probe;
    Producer p{h, ring};
    (void)probe.lock(&h->plock, false, std::nullopt, [&] { p.settle_inflight(); });
}

}  // namespace

bool QueueCore::get(std::string& out, bool block, const Deadline& deadline) {
    StringSink sink(out);
    return get(sink, block, deadline);
}

bool QueueCore::get(QueueSink& out, bool block, const Deadline& deadline) {
    Header* const h = h_;
    Consumer c{h, Ring{ring_, h->capacity}};
    auto shut = [&] { return h->shutdown.load(sc); };
    RobustGuard guard;
    if (!guard.lock(&h->clock, block, deadline, [&] { c.repair(); })) {
        if (shut() == kImmediate) throw ShutDown();  // the ring is being drained
        return false;
    }
    auto drain_and_stop = [&] {
        c.drain();
        throw ShutDown();
    };
    if (shut() == kImmediate) drain_and_stop();

    RobustGuard producer_guard;  // taken only to prove a partial message dead (I6)
    bool have = false;           // assembling message `id`
    std::uint64_t id = 0;
    std::uint64_t total = 0;
    std::uint64_t got = 0;  // bytes of message `id` handed to `out`
    for (;;) {
        const std::uint64_t t = h->tail.load(rlx);
        // As the producer with the tail: the head last seen, while it shows a chunk.
        std::uint64_t hd = h->c_head_seen.load(rlx);
        if (hd < t || hd - t < kHdr) {
            hd = h->head.load(acq);
            h->c_head_seen.store(hd, rlx);
        }
        if (hd - t >= kHdr) {
            ChunkHeader ch;
            c.ring.read(t, &ch, kHdr);
            if (ch.len > hd - t - kHdr || (ch.flags & ~(kFirst | kLast | kAbort)) != 0)
                throw Error("mp::Queue: the shared ring is corrupt");  // never: I2
            const std::uint64_t nt = t + kHdr + ch.len;
            if ((ch.flags & kAbort) != 0) {
                if (have && ch.id == id) have = false;
                c.advance(nt);
                continue;
            }
            if ((ch.flags & kFirst) != 0) {
                // A FIRST while assembling would mean the old message was withdrawn without an
                // ABORT; I5 rules that out, but dropping the old one is the only sane reading.
                have = true;
                id = ch.id;
                total = ch.total;
                got = 0;
                out.begin(total);
            }
            if (have && ch.id == id) {
                if (ch.len > total - got) throw Error("mp::Queue: the shared ring is corrupt");
                c.ring.append_to(out, t + kHdr, ch.len);
                got += ch.len;
                if ((ch.flags & kLast) != 0) {
                    if (got != total) throw Error("mp::Queue: the shared ring is corrupt");
                    c.take_and_unlock(nt, guard);
                    return true;
                }
                c.advance(nt);
            } else if ((ch.flags & kLast) != 0) {
                c.take(nt);  // I7: the rest of a message whose taker died
                c.count_lost();
            } else {
                c.advance(nt);
            }
            continue;
        }

        // No chunk to read.
        if (producer_guard.owns()) {
            // I6: nobody is writing, so the partial message will never be completed.
            have = false;
            producer_guard.unlock();
            continue;
        }
        auto data = [&] { return h->head.load(sc) - h->tail.load(rlx) >= kHdr; };
        if (!have) {
            if (const std::uint32_t mode = shut(); mode != kOpen) {
                if (mode == kImmediate) drain_and_stop();
                // I10: empty for good once the put under way (if any) is over.
                RobustGuard quiet;
                Producer p{h, c.ring};
                (void)quiet.lock(&h->plock, true, std::nullopt, [&] { p.settle_inflight(); });
                if (!data()) throw ShutDown();
                continue;
            }
            if (!block) return false;
            if (h->committed.load(sc) != h->taken.load(sc)) {
                // A message counted (committed) but not in the ring: its producer is copying it
                // in, or died doing so (I5), and only the next plock holder undoes its count,
                // which until the next put would stand in qsize() and join(). While the count
                // says so, look at plock every kPeerCheck: the repair settles a dead producer's.
                Deadline slice = deadline_after(kPeerCheck);
                if (deadline && *deadline < *slice) slice = deadline;
                if (wait_for(h->data_seq, h->data_waiting, slice, [&] { return data() || shut() != kOpen; }))
                    continue;
                if (expired(deadline)) return false;
                probe_producer(h, c.ring);
                continue;
            }
            if (!wait_for(h->data_seq, h->data_waiting, deadline,
                          [&] { return data() || shut() != kOpen; }))
                return false;
            continue;
        }
        // Mid-message: the producer is streaming the rest. Wait a little, then make sure it is
        // alive (holding plock); the caller's deadline does not cut a message in half.
        if (wait_for(h->data_seq, h->data_waiting, deadline_after(kPeerCheck),
                     [&] { return data() || shut() == kImmediate; })) {
            if (shut() == kImmediate) drain_and_stop();
            continue;
        }
        Producer p{h, c.ring};
        // Busy: the producer lives and streams on. Taken: it had died and the repair settled its
        // message (or it had just finished); either way the loop looks again.
        (void)producer_guard.lock(&h->plock, false, std::nullopt, [&] { p.settle_inflight(); });
    }
}

// ---- shutdown (I10) ------------------------------------------------------------------------------

void QueueCore::shutdown(bool immediate) {
    Header* const h = h_;
    if (immediate) {
        h->shutdown.store(kImmediate, sc);
    } else {
        std::uint32_t open = kOpen;
        (void)h->shutdown.compare_exchange_strong(open, kShut, sc);  // never lowers kImmediate
    }
    // Unconditionally, whatever the waiting flags say: a waiter raises its flag, reads the
    // sequence and then the word, so it either sees the word or sleeps on a stale sequence.
    for (U32* seq : {&h->data_seq, &h->space_seq}) {
        seq->fetch_add(1, sc);
        sys::futex_wake_all(*seq);
    }
    if (h->shutdown.load(sc) != kImmediate) return;
    Consumer c{h, Ring{ring_, h->capacity}};
    RobustGuard guard;
    // A getter holding clock leaves promptly (its waits stop on the word) or drains itself.
    (void)guard.lock(&h->clock, true, std::nullopt, [&] { c.repair(); });
    c.drain();
}

bool QueueCore::is_shutdown() const noexcept { return h_->shutdown.load(acq) != kOpen; }

// ---- JoinableQueue ----------------------------------------------------------------------------

void QueueCore::task_done() {
    Header* const h = h_;
    std::uint64_t done = h->tasks_done.load(sc);
    for (;;) {
        if (done >= h->committed.load(sc)) throw Error("task_done() called too many times");
        if (h->tasks_done.compare_exchange_weak(done, done + 1, sc)) break;
    }
    h->join_seq.fetch_add(1, sc);
    if (h->joiners.load(sc) != 0) sys::futex_wake_all(h->join_seq);
}

bool QueueCore::join(const Deadline& deadline) {
    Header* const h = h_;
    auto finished = [&] { return h->tasks_done.load(sc) >= h->committed.load(sc); };
    if (finished()) return true;
    h->joiners.fetch_add(1, sc);
    bool ok = false;
    for (;;) {
        const std::uint32_t seen = h->join_seq.load(sc);
        if (finished()) {
            ok = true;
            break;
        }
        // Woken at least every kPeerCheck while a message is counted that the ring does not
        // hold: its producer may have died copying it in (see get), with no getter to notice.
        const bool unseen = h->committed.load(sc) != h->taken.load(sc) && h->head.load(sc) == h->tail.load(sc);
        Deadline slice = deadline;
        if (unseen) {
            slice = deadline_after(kPeerCheck);
            if (deadline && *deadline < *slice) slice = deadline;
        }
        if (sys::futex_wait(h->join_seq, seen, slice) == sys::FutexResult::timed_out) {
            if (unseen && !expired(deadline)) {
                probe_producer(h, Ring{ring_, h->capacity});
                continue;
            }
            ok = finished();
            break;
        }
    }
    h->joiners.fetch_sub(1, sc);
    return ok;
}

}  // namespace mp::detail
