#pragma once
/// \file
/// mp::Queue<T>, mp::SimpleQueue<T>, mp::JoinableQueue<T>: Python's multiprocessing queues, as a
/// byte ring in shared memory that producers and consumers in any number of processes use
/// directly (no feeder thread, no pipe).
///
///     mp::Queue<std::string> q;                      // unbounded count, 1 MiB ring
///     mp::Process p([](mp::Queue<std::string> q) { q.put("hello"); }, q);
///     p.start();
///     std::string s = q.get();                        // "hello"
///     p.join();
///
/// Semantics (as Python's, with the differences marked):
/// - put(v) blocks while the queue holds `maxsize` items (maxsize > 0) or while the ring has no
///   room for v; put(v, timeout) raises mp::Full when that lasts longer than `timeout`, and
///   put_nowait(v) raises it at once. get() blocks while the queue is empty; get(timeout) and
///   get_nowait() raise mp::Empty. A message larger than the ring streams through it in pieces.
///   A put that finds the ring full waits up to 20 us longer than it must, for room for more
///   than its own message, so that a producer faster than its consumer writes in batches rather
///   than one message per message taken (each a cache-line hand-off on both sides).
/// - qsize() counts the messages put and not yet taken; like Python's, it is a snapshot that
///   may be stale by the time the caller looks at it. empty() is qsize() == 0; full() is
///   maxsize > 0 && qsize() >= maxsize.
/// - close() marks this process's handle closed (every copy of the handle in this process shares
///   the mark): a later put or get raises mp::QueueClosed (Python: ValueError "Queue is closed").
///   It does not affect other processes' handles, a fork child's started afterwards included,
///   nor wake a put or get under way.
/// - shutdown(immediate) (Python 3.13's queue.Queue.shutdown, here across processes): every
///   later put raises mp::ShutDown, and so does a put blocked in any process (a message larger
///   than the ring that was streaming is withdrawn). get returns what was put before and raises
///   ShutDown once the queue is empty, a blocked get in any process too. With immediate = true
///   the items still queued are dropped at once and count as task_done (JoinableQueue: join()
///   then waits only for the items taken before), and every get raises ShutDown. A waiter
///   learns it within the queue's 50 ms wait slice at worst (at once, normally).
/// - Difference from Python: there is no feeder thread. A put either completes into shared
///   memory before it returns or blocks (or raises Full), so a process that put items nobody has
///   consumed can exit, and be joined, at once: its items stay in the queue for the consumers.
///   join_thread()/cancel_join_thread() therefore do not exist.
/// - Difference from Python: a get(timeout) that has started to receive a message larger than the
///   ring waits for the rest of it while its producer is alive, beyond the timeout (the producer
///   finishes promptly, since the consumer drains the ring as it goes); a get never returns part
///   of a message.
/// - Values cross as bytes through mp::Codec<T>; a value that fails to decode raises
///   mp::DecodeError (that message is consumed). An item that holds a handle whose descriptor
///   would have to travel with it (a queue, lock, event, connection, shared memory, ...; Python
///   pickles those only when a process is started) is refused by put with mp::Error, nothing
///   put: pass handles to a process as arguments of its target or task instead. A std::string
///   (any basic_string of a character type) or a std::vector of byte-copied elements is copied
///   straight between the object and the ring, in its Codec's format: one copy on each side, no
///   encoded buffer in between.
///
/// Robustness: a producer or consumer killed (SIGKILL) at any instant loses at most the message
/// it was putting or taking; the others carry on. The design (src/queue.cpp states the
/// invariants in full):
/// - A producer lock and a consumer lock, both robust process-shared mutexes (futex words on the
///   kernel's robust list, as Lock's), serialise
///   producers and consumers each for a whole message. Between the two holders the ring is
///   single-producer/single-consumer: a byte `head` published by the producer (release) and a
///   `tail` published by the consumer, both counting bytes since creation (never wrapping).
/// - Every message goes into the ring as one or more chunks, each a header (message id, payload
///   length, total length, FIRST/LAST/ABORT flags) and payload. A chunk is visible only when the
///   head moves past all of it, so a reader never sees a half-written chunk. A message that must
///   stream goes in chunks of at most a quarter of the ring, so that its producer copies one in
///   while its consumer copies the one before out.
/// - The producer lock holder records what it is doing (the message id, where it started, where
///   its last chunk will end, the committed count before it) before doing it. Whoever takes the
///   lock next and learns (EOWNERDEAD) that the holder died repairs from that record: a message
///   whose last chunk was published stays; one partly published gets an ABORT chunk, for which a
///   producer always leaves room after every non-last chunk.
/// - A consumer that finds chunks of a message whose FIRST chunk it never saw (its taker died)
///   drops them; one that is assembling a message and sees no more chunks checks the producer
///   lock: free or owner dead means the rest will never come, so it repairs and moves on. A
///   getter waiting on an empty ring while a message is counted that the ring does not hold,
///   and a JoinableQueue::join(), check it every 20 ms too: a producer killed while copying a
///   message in leaves no count behind in qsize() or join().
/// - The message counts (committed by producers, taken by consumers) are changed by the lock
///   holders after recording the value they are about to write, so a death between two steps is
///   repaired exactly and qsize() stays exact. task_done() is a single atomic step.
/// - A put(v, timeout) that times out after streaming part of a large message withdraws it (an
///   ABORT chunk); consumers skip the part, which occupies the ring until they do.
/// - Waiting: a short spin (~2 us), a few sched_yield()s (to ~20 us: the peer may need this very
///   core), then a futex wait on a sequence word that the other side bumps (and wakes) only when a
///   waiter has said so. Waits for the locks and for the futex are cut into 50 ms slices, after
///   each of which the waiter looks again: a wake-up lost to a peer killed at the wrong instant
///   (robust mutexes can lose one: see RobustGuard in src/queue.cpp) costs at most that. A
///   blocked put or get, or an idle queue, costs next to no CPU.
///
/// Lifetime (destructor policy): a Queue is a cheap copyable handle; copies (in this process, or in a child made by
/// fork) refer to the same queue, and a forkserver child receives it as an argument through its
/// Codec, which sends the memfd. The queue's memory (and the items in it) goes when the last
/// handle in the last process goes. Nothing is ever created in /dev/shm.

#include <atomic>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <memory>
#include <span>
#include <string>
#include <type_traits>
#include <vector>
#include <string_view>
#include <utility>

#include "mp/detail/deadline.hpp"
#include "mp/detail/shared_block.hpp"
#include "mp/errors.hpp"
#include "mp/serialize.hpp"

namespace mp {

/// The default size of a queue's ring buffer: 1 MiB.
inline constexpr std::size_t default_queue_buffer = std::size_t{1} << 20;

namespace detail {

/// Where QueueCore::get puts a message's bytes as they leave the ring.
class QueueSink {
public:
    /// A message of `total` bytes starts. May come again for a later message when the one begun
    /// was withdrawn (its producer died or timed out): forget the bytes appended so far.
    virtual void begin(std::uint64_t total) = 0;
    /// The message's next `n` bytes; all `total` of them come before get() returns true.
    virtual void append(const char* data, std::size_t n) = 0;

protected:
    ~QueueSink() = default;
};

/// The untyped queue: one shared block (header + ring) and this process's closed mark. Shared
/// by the copies of a handle in one process.
class QueueCore {
public:
    /// A new queue. `buffer_bytes` is rounded up to a power of two of at least 4 KiB.
    QueueCore(std::size_t maxsize, std::size_t buffer_bytes);
    /// Attaches the queue in `block` (received from another process); checks its header.
    explicit QueueCore(SharedBlock block);
    QueueCore(const QueueCore&) = delete;
    QueueCore& operator=(const QueueCore&) = delete;
    ~QueueCore();

    /// Puts one message, the concatenation of `parts` (gathered straight into the ring); false
    /// when `block` is false or `deadline` passed before it could start (or, for a message that
    /// was streaming, before the rest fitted: then it is withdrawn).
    bool put(std::span<const std::string_view> parts, bool block, const Deadline& deadline);
    bool put(std::string_view bytes, bool block, const Deadline& deadline) {
        return put(std::span<const std::string_view>(&bytes, 1), block, deadline);
    }
    /// Takes one message, handing its bytes to `out` as they leave the ring; false when none
    /// came in time.
    bool get(QueueSink& out, bool block, const Deadline& deadline);
    /// Takes one message into `out`; false when none came in time.
    bool get(std::string& out, bool block, const Deadline& deadline);
    std::size_t qsize() const noexcept;
    std::size_t maxsize() const noexcept;
    /// The ring's size in bytes.
    std::size_t buffer_size() const noexcept;
    /// Throws mp::Error when every message put so far was already task_done.
    void task_done();
    /// False when `deadline` passed first.
    bool join(const Deadline& deadline);

    /// The shared layout; defined (and documented) in src/queue.cpp only.
    struct Header;

    /// The memfd, to send to another process.
    int fd() const noexcept { return block_.fd(); }
    /// For tests only: the producer lock (an mp::sys::FutexMutex), so that a
    /// test can hold it and stage what a killed waiter leaves behind.
    void* producer_lock_for_testing() const noexcept;
    /// Puts the queue (in every process) in its shut-down state; see Queue::shutdown.
    void shutdown(bool immediate);
    bool is_shutdown() const noexcept;
    /// Marks this process's handles closed (a fork child's copies are open: Python's _after_fork).
    void close() noexcept;
    /// Throws QueueClosed after close() in this process.
    void check_open() const {
        if (closed_by_.load(std::memory_order_relaxed) != 0) check_open_slow();
    }

private:
    friend std::shared_ptr<QueueCore> make_queue(std::size_t maxsize, std::size_t buffer_bytes);
    SharedBlock block_;
    Header* h_ = nullptr;
    char* ring_ = nullptr;
    void check_open_slow() const;
    /// The process that called close() (0: none): a fork child copies the handle, not the mark.
    std::atomic<int> closed_by_{0};
};

/// A new queue, recorded so that receiving it back in this process maps nothing new.
std::shared_ptr<QueueCore> make_queue(std::size_t maxsize, std::size_t buffer_bytes);
/// The queue in the memfd `fd` (taking the descriptor), mapped once per process.
std::shared_ptr<QueueCore> attach_queue(int fd);

/// Lends this thread's message buffer (empty) for one put or get, and takes it back after.
class QueueBuffer {
public:
    QueueBuffer() noexcept : bytes(std::move(spare())) { bytes.clear(); }
    ~QueueBuffer() {
        if (bytes.capacity() <= (std::size_t{1} << 20)) spare() = std::move(bytes);
    }
    QueueBuffer(const QueueBuffer&) = delete;
    QueueBuffer& operator=(const QueueBuffer&) = delete;
    /// The lent buffer: empty, with the capacity earlier messages left.
    std::string bytes;

private:
    static std::string& spare() noexcept {
        thread_local std::string s;
        return s;
    }
};

/// Types whose encoding is an 8-byte element count and then the elements' bytes (mp's codecs
/// for std::basic_string and for std::vector of byte-copied elements). A queue moves these
/// between the caller's object and the ring directly, with no encoded copy in between.
template <class T>
struct QueueFlat : std::false_type {};
template <class C, class Tr, class A>
    requires std::is_arithmetic_v<C>
struct QueueFlat<std::basic_string<C, Tr, A>> : std::true_type {
    using Element = C;
};
template <class E, class A>
    requires bytewise<E> && std::is_default_constructible_v<E> && (!std::is_same_v<E, bool>)
struct QueueFlat<std::vector<E, A>> : std::true_type {
    using Element = E;
};

/// Receives a QueueFlat T straight into its storage. A message of another shape (impossible
/// from mp's own put, but the ring is shared with every process) is collected whole and
/// decoded by the Codec, so it fails exactly as it would there.
template <class T>
class FlatSink final : public QueueSink {
    using E = typename QueueFlat<T>::Element;

public:
    void begin(std::uint64_t total) override {
        got_ = 0;
        flat_ = total >= kCount && (total - kCount) % sizeof(E) == 0;
        if (flat_) {
            value_.clear();
            value_.resize(static_cast<std::size_t>((total - kCount) / sizeof(E)));
        } else {
            other_.clear();
            other_.reserve(static_cast<std::size_t>(total));
        }
    }
    void append(const char* data, std::size_t n) override {
        if (!flat_) {
            other_.append(data, n);
            return;
        }
        if (got_ < kCount) {
            const std::size_t k = std::min<std::size_t>(n, kCount - got_);
            std::memcpy(count_ + got_, data, k);
            got_ += k;
            data += k;
            n -= k;
        }
        if (n != 0) {
            std::memcpy(reinterpret_cast<char*>(value_.data()) + (got_ - kCount), data, n);
            got_ += n;
        }
    }
    /// The value; throws DecodeError as Codec<T> would for bytes that do not encode a T.
    T take() {
        if (flat_) {
            std::uint64_t count;
            std::memcpy(&count, count_, kCount);
            if (little_endian(count) == value_.size()) return std::move(value_);
            other_.assign(count_, kCount);
            other_.append(reinterpret_cast<const char*>(value_.data()), value_.size() * sizeof(E));
        }
        Decoder d(other_);
        T v = d.template get<T>();
        d.finish();
        return v;
    }

private:
    static constexpr std::size_t kCount = sizeof(std::uint64_t);
    T value_;
    std::string other_;
    char count_[kCount] = {};
    std::size_t got_ = 0;
    bool flat_ = true;
};

}  // namespace detail

/// A process-shared FIFO queue of T (Python's multiprocessing.Queue).
template <class T>
class Queue {
    static_assert(Encodable<T>, "mp::Queue<T>: T needs an mp::Codec");

public:
    /// A new queue holding at most `maxsize` items (0: no limit but the ring's room), with a
    /// ring of `buffer_bytes` (rounded up to a power of two of at least 4 KiB). Messages larger
    /// than the ring still pass (they stream through it).
    explicit Queue(std::size_t maxsize = 0, std::size_t buffer_bytes = default_queue_buffer)
        : core_(detail::make_queue(maxsize, buffer_bytes)) {}

    /// Puts `v`, waiting as long as the queue is full. Throws QueueClosed after close(),
    /// ShutDown after shutdown() (also when that comes while it waits).
    void put(const T& v) { put_impl(v, true, std::nullopt); }
    /// Puts `v`, waiting at most `timeout`; throws mp::Full after that.
    template <class Rep, class Period>
    void put(const T& v, std::chrono::duration<Rep, Period> timeout) {
        put_impl(v, true, detail::deadline_after(timeout));
    }
    /// Puts `v` only if there is room now, for the item and for all of its bytes in the ring
    /// (so a message larger than the free room always raises); throws mp::Full otherwise.
    void put_nowait(const T& v) { put_impl(v, false, std::nullopt); }

    /// Takes the next item, waiting as long as the queue is empty. Throws QueueClosed after
    /// close(); ShutDown when the queue is shut down and empty (or shut down immediately), also
    /// when that comes while it waits.
    T get() { return get_impl(true, std::nullopt); }
    /// Takes the next item, waiting at most `timeout`; throws mp::Empty after that.
    template <class Rep, class Period>
    T get(std::chrono::duration<Rep, Period> timeout) {
        return get_impl(true, detail::deadline_after(timeout));
    }
    /// Takes the next item if one is there now; throws mp::Empty otherwise.
    T get_nowait() { return get_impl(false, std::nullopt); }

    /// Items put and not yet taken (a snapshot).
    std::size_t qsize() const { return core().qsize(); }
    /// qsize() == 0 (a snapshot).
    bool empty() const { return qsize() == 0; }
    /// maxsize() > 0 && qsize() >= maxsize() (a snapshot).
    bool full() const { return core().maxsize() != 0 && core().qsize() >= core().maxsize(); }
    /// The item limit given at construction; 0 for none.
    std::size_t maxsize() const { return core().maxsize(); }
    /// The ring's size in bytes.
    std::size_t buffer_size() const { return core().buffer_size(); }
    /// Shuts the queue down for every process (Python 3.13): put raises ShutDown from now on,
    /// and get once the queue is empty; puts and gets blocked anywhere wake with ShutDown.
    /// immediate: drop the queued items now (each counts as task_done, so a JoinableQueue's
    /// join() returns once the items taken before are done) and make every get raise ShutDown.
    /// Calling it again is harmless; shutdown(true) after shutdown() still drops the items.
    void shutdown(bool immediate = false) { core().shutdown(immediate); }
    /// True once any process called shutdown() (Python's is_shutdown attribute).
    bool is_shutdown() const { return core().is_shutdown(); }
    /// No more put or get through this process's handles (see the header comment). Nothing on
    /// a handle moved from, which has nothing to close.
    void close() noexcept {
        if (core_) core_->close();
    }

protected:
    explicit Queue(std::shared_ptr<detail::QueueCore> core) : core_(std::move(core)) {}
    // Every member but close() throws mp::EmptyHandle on a queue moved from.
    detail::QueueCore& core() const { return detail::deref_handle(core_, "mp::Queue"); }
    std::shared_ptr<detail::QueueCore> core_;

private:
    template <class, class>
    friend struct mp::Codec;

    // Both reuse a per-thread buffer, so a stream of small messages costs no allocation for
    // the bytes; a buffer that grew past the ring's size is given back after use.
    void put_impl(const T& v, bool block, const detail::Deadline& deadline) {
        core().check_open();
        if constexpr (detail::QueueFlat<T>::value) {
            using E = typename detail::QueueFlat<T>::Element;
            const std::uint64_t count = detail::little_endian(v.size());
            char prefix[sizeof count];
            std::memcpy(prefix, &count, sizeof count);
            const std::string_view parts[2] = {
                {prefix, sizeof prefix},
                {reinterpret_cast<const char*>(v.data()), v.size() * sizeof(E)}};
            if (!core_->put(parts, block, deadline)) throw Full();
            return;
        }
        detail::QueueBuffer buf;
        Encoder e(std::move(buf.bytes));
        e.refuse_fds(
            "mp::Queue::put: the item holds a handle (a queue, lock, event, connection, shared "
            "memory, ...) whose descriptor a Queue cannot carry (its items are bytes in shared "
            "memory): pass the handle to the process as an argument of its target or task, or "
            "over a duplex Connection");
        e.put(v);
        buf.bytes = e.take();
        if (!core_->put(buf.bytes, block, deadline)) throw Full();
    }
    T get_impl(bool block, const detail::Deadline& deadline) {
        core().check_open();
        if constexpr (detail::QueueFlat<T>::value) {
            detail::FlatSink<T> sink;
            if (!core_->get(sink, block, deadline)) throw Empty();
            return sink.take();
        }
        detail::QueueBuffer buf;
        if (!core_->get(buf.bytes, block, deadline)) throw Empty();
        Decoder d(buf.bytes);
        T v = d.template get<T>();
        d.finish();
        return v;
    }
};

/// A Queue whose consumers report each item done, so that join() can wait for all of them
/// (Python's multiprocessing.JoinableQueue).
template <class T>
class JoinableQueue : public Queue<T> {
public:
    /// As Queue(maxsize, buffer_bytes).
    explicit JoinableQueue(std::size_t maxsize = 0,
                           std::size_t buffer_bytes = default_queue_buffer)
        : Queue<T>(maxsize, buffer_bytes) {}

    /// Reports one taken item processed. Throws mp::Error("task_done() called too many times")
    /// when there are more task_done calls than items put. An item lost with a consumer killed
    /// while taking it out of the shared ring counts as done, so join() does not wait for it
    /// forever. Once the item has left the ring it is the consumer's, as if get() had returned
    /// (its last step, the consumer lock's release, is after that): a consumer killed from then
    /// on, as one killed before it calls task_done(), leaves the item unfinished, and join()
    /// waits for it as Python's does (join(timeout) bounds that wait).
    void task_done() { this->core().task_done(); }
    /// Waits until every item put was reported done (items dropped by shutdown(true) count as
    /// done).
    void join() { this->core().join(std::nullopt); }
    /// Waits at most `timeout`; returns true when every item put was reported done.
    template <class Rep, class Period>
    [[nodiscard]] bool join(std::chrono::duration<Rep, Period> timeout) {
        return this->core().join(detail::deadline_after(timeout));
    }

private:
    template <class, class>
    friend struct mp::Codec;
    explicit JoinableQueue(std::shared_ptr<detail::QueueCore> core)
        : Queue<T>(std::move(core)) {}
};

/// The simplest queue: put, get, empty, close (Python's multiprocessing.SimpleQueue). Unbounded
/// in count; put blocks only while the ring has no room.
template <class T>
class SimpleQueue {
    static_assert(Encodable<T>, "mp::SimpleQueue<T>: T needs an mp::Codec");

public:
    /// A new queue with a ring of `buffer_bytes`.
    explicit SimpleQueue(std::size_t buffer_bytes = default_queue_buffer)
        : q_(0, buffer_bytes) {}
    /// Puts `v`, waiting for room in the ring. Throws QueueClosed after close(), ShutDown after
    /// shutdown().
    void put(const T& v) { q_.put(v); }
    /// Takes the next item, waiting for one. Throws QueueClosed after close(), ShutDown when
    /// shut down and empty.
    T get() { return q_.get(); }
    /// As Queue::shutdown (Python's SimpleQueue has none; queue.Queue's semantics).
    void shutdown(bool immediate = false) { q_.shutdown(immediate); }
    /// As Queue::is_shutdown.
    bool is_shutdown() const { return q_.is_shutdown(); }
    /// True when no item is waiting (a snapshot).
    bool empty() const { return q_.empty(); }
    /// No more put or get through this process's handles.
    void close() noexcept { q_.close(); }

private:
    template <class, class>
    friend struct mp::Codec;
    explicit SimpleQueue(Queue<T> q) : q_(std::move(q)) {}
    Queue<T> q_;
};

namespace detail {
/// Sends a queue as its memfd; the receiver maps it.
inline void encode_queue(Encoder& e, const QueueCore& core) { e.put(e.attach_fd(core.fd())); }
inline std::shared_ptr<QueueCore> decode_queue(Decoder& d) {
    const auto index = d.get<std::uint32_t>();
    return attach_queue(d.take_fd(index));
}
}  // namespace detail

/// A Queue crosses to another process (a forkserver child, a pool worker) as its memfd.
template <class T>
struct Codec<Queue<T>> {
    static constexpr bool shares_state = true;  // a copy refers to the same object
    static void encode(Encoder& e, const Queue<T>& q) { detail::encode_queue(e, q.core()); }
    static Queue<T> decode(Decoder& d) { return Queue<T>(detail::decode_queue(d)); }
};

/// As Codec<Queue<T>>.
template <class T>
struct Codec<JoinableQueue<T>> {
    static constexpr bool shares_state = true;  // a copy refers to the same object
    static void encode(Encoder& e, const JoinableQueue<T>& q) {
        detail::encode_queue(e, q.core());
    }
    static JoinableQueue<T> decode(Decoder& d) {
        return JoinableQueue<T>(detail::decode_queue(d));
    }
};

/// As Codec<Queue<T>>.
template <class T>
struct Codec<SimpleQueue<T>> {
    static constexpr bool shares_state = true;  // a copy refers to the same object
    static void encode(Encoder& e, const SimpleQueue<T>& q) { Codec<Queue<T>>::encode(e, q.q_); }
    static SimpleQueue<T> decode(Decoder& d) {
        return SimpleQueue<T>(Codec<Queue<T>>::decode(d));
    }
};

}  // namespace mp
