#pragma once
/// \file
/// Shared memory between processes, as Python's multiprocessing.shared_memory and
/// multiprocessing.sharedctypes.
///
///     mp::Value<int> counter(0);                  // an int in shared memory, with an RLock
///     mp::Array<double> samples(1024);            // zero-filled
///     mp::Process p([](mp::Value<int> c, mp::Array<double> a) {
///         std::lock_guard g(c.get_lock());
///         c.get_obj() += 1;
///         a[0] = 3.5;
///     }, counter, samples);
///     p.start(); p.join();                        // counter.get() == 1, samples[0] == 3.5
///
///     mp::SharedMemory shm(std::nullopt, true, 4096);    // a new named segment "mp_<hex>"
///     mp::SharedMemory other(shm.name());                // another process attaches by name
///     other.close(); shm.close(); shm.unlink();
///
/// Two kinds of memory
/// - Value, Array, RawValue and RawArray live in anonymous shared memory (a memfd): a child
///   inherits it across fork, and a forkserver child receives its descriptor with the arguments.
///   Nothing appears in /dev/shm, so nothing can leak there: the memory goes when the last process
///   holding it unmaps it, whoever dies first and however. The memfd stays open while a handle
///   lives in the process (one descriptor each, and one more for a Value's or Array's lock: see
///   "Sharing" in synchronize.hpp on RLIMIT_NOFILE).
/// - SharedMemory is a named POSIX segment (/dev/shm/NAME), for processes that find each other by
///   name. Its creator registers it with a resource tracker, a small helper process of the
///   creating process (named "mp-shm-tracker", started at the first tracked create, ignoring
///   SIGINT and SIGTERM as Python's does); when that process ends (exit, crash, SIGKILL, or exec)
///   the tracker unlinks every segment it created and did not unlink, and prints to stderr
///   (the creator's stderr), as Python does:
///       mp resource_tracker: There appear to be N leaked shared_memory objects to clean up at
///       shutdown
///   followed by one "mp resource_tracker: unlinking 'NAME'" line per segment. The creator tells
///   the tracker the name before shm_open (and waits for its answer), so a creator killed at any
///   instant of a create leaks nothing.
///   Differences from Python: the tracker belongs to one process, not to a process tree (a fork
///   child that creates a segment has its own tracker, so a segment dies with the process that
///   created it, even when that process is a SIGKILLed child); attaching by name never registers
///   (Python 3.11 registers attachments too, so an attaching process could unlink a segment it did
///   not create); and before unlinking, the tracker checks that the name still refers to the
///   segment that was registered, so a name reused by someone else is left alone. To let a segment
///   outlive its creator, pass `track = false` (Python 3.13's `track` parameter) and unlink it
///   yourself.
///
/// Handles. Every type here is a cheap copyable handle with shared ownership: copies refer to the
/// same memory (as Python references do), so a handle can be passed by value as a Process argument
/// (copied into the child under fork; under forkserver, a Value or Array is sent with its memfd and
/// its lock's, and a SharedMemory by name). The memory is unmapped when the last handle in a
/// process goes. Handles are as thread-safe as the memory they refer to: copying and destroying
/// them from several threads is safe; the data is shared and needs the lock (or atomics).
///
/// Errors. Bad arguments (Python's ValueError) are std::invalid_argument; an index out of range
/// (IndexError) is std::out_of_range; a failing system call is std::system_error naming it, so
/// Python's FileExistsError is a std::system_error with EEXIST from "shm_open" and
/// FileNotFoundError one with ENOENT (from "shm_open" or "shm_unlink").

#include <atomic>
#include <concepts>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <initializer_list>
#include <iosfwd>
#include <memory>
#include <mutex>
#include <optional>
#include <span>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "mp/detail/shared_block.hpp"
#include "mp/errors.hpp"
#include "mp/serialize.hpp"
#include "mp/synchronize.hpp"

namespace mp {

// ------------------------------------------------------------------------------ SharedMemory

/// A named POSIX shared memory segment (Python's multiprocessing.shared_memory.SharedMemory).
///
/// Destructor policy: the last handle closes the mapping (as close()); a segment is never unlinked
/// by a destructor, because other processes may still attach to it by name. A creator that never
/// calls unlink() leaves the job to its resource tracker, which unlinks the segment when the
/// creating process ends (and warns on stderr, as Python's tracker does).
class SharedMemory {
public:
    /// Python's SharedMemory(name=None, create=False, size=0), plus Python 3.13's `track`.
    /// - create = false: attaches to the existing segment `name` (a leading '/' is optional);
    ///   `size` is ignored and size() is the segment's size. ENOENT when there is none.
    /// - create = true: creates a zero-filled segment of `size` bytes, exclusively (EEXIST when
    ///   the name is taken); without a name, picks a fresh random one ("mp_" and 16 hex digits).
    ///   With `track`, registers it with this process's resource tracker (see above).
    /// Throws std::invalid_argument when create is true and size is 0, when size does not fit a
    /// signed size (a negative number converted, as Python's "'size' must be a positive
    /// integer"), when there is neither a name nor create, or when the name (after the optional
    /// leading '/') is empty, holds a NUL (Python's ValueError "embedded null character") or a
    /// '/', is "." or "..", or is longer than NAME_MAX (255); std::system_error naming the call
    /// (shm_open, ftruncate, mmap, ...) when the OS refuses.
    SharedMemory(std::optional<std::string> name, bool create = false, std::size_t size = 0,
                 bool track = true);

    /// The segment's name, without the leading '/', as Python reports it.
    /// On a handle moved from, every member but closed() (true) and close() (nothing) throws
    /// mp::EmptyHandle.
    const std::string& name() const;
    /// The size in bytes (rounded up by nobody: what was asked for, or what an attacher found).
    std::size_t size() const;
    /// The mapped bytes; empty after close().
    std::span<std::byte> buf() const;
    /// True once close() was called through any handle.
    bool closed() const noexcept;
    /// Unmaps the segment for every handle of this object in this process; the segment itself
    /// stays (see unlink()). Calling it again does nothing.
    void close() noexcept;
    /// Removes the name, so that nobody can attach any more; the memory lives on while any
    /// process still maps it. Call it once across all processes: a second unlink throws
    /// std::system_error ENOENT ("shm_unlink"), as Python's FileNotFoundError. Unregisters the
    /// segment from the tracker when this process created it. Works after close().
    void unlink();

private:
    struct State;
    std::shared_ptr<State> state_;
};

/// Python's repr: "SharedMemory('name', size=N)".
std::string to_string(const SharedMemory& shm);
/// Writes to_string(shm).
std::ostream& operator<<(std::ostream& out, const SharedMemory& shm);

/// A SharedMemory travels by name (under forkserver, to a pool worker): the receiver attaches to
/// the segment, and throws std::system_error ENOENT when it was unlinked in the meantime.
template <>
struct Codec<SharedMemory> {
    static constexpr bool shares_state = true;  // a copy refers to the same object
    static void encode(Encoder& e, const SharedMemory& shm) {
        e.write_size(shm.name().size());
        e.write(shm.name().data(), shm.name().size());
    }
    static SharedMemory decode(Decoder& d) {
        auto n = d.read_size();
        return SharedMemory(std::string(d.read_view(n)), false);
    }
};

// ------------------------------------------------------------------------------ RawValue, RawArray

namespace detail {

/// Value/Array elements: copied as bytes into memory another process reads.
template <class T>
concept Shareable = std::is_trivially_copyable_v<T> && !std::is_pointer_v<T> &&
                    !std::is_const_v<T> && !std::is_volatile_v<T>;

/// Loads and stores of a T in shared memory. Where the hardware can, they are atomic (relaxed
/// order is not enough for a reader polling a flag another process sets: acquire/release), so a
/// loop waiting on get() is not optimised into an endless one; a larger T is copied byte for byte
/// and is only consistent under a lock.
template <class T>
inline constexpr bool atomic_access =
    std::atomic_ref<T>::is_always_lock_free && alignof(T) >= std::atomic_ref<T>::required_alignment;

template <class T>
T shared_load(const T& obj) noexcept {
    if constexpr (atomic_access<T>) {
        return std::atomic_ref<T>(const_cast<T&>(obj)).load(std::memory_order_acquire);
    } else {
        T out;
        std::memcpy(static_cast<void*>(&out), static_cast<const void*>(&obj), sizeof(T));
        return out;
    }
}

template <class T>
void shared_store(T& obj, const T& v) noexcept {
    if constexpr (atomic_access<T>)
        std::atomic_ref<T>(obj).store(v, std::memory_order_release);
    else
        std::memcpy(static_cast<void*>(&obj), static_cast<const void*>(&v), sizeof(T));
}

/// A memfd block shared by the handles of one Value/Array in this process.
using BlockPtr = std::shared_ptr<SharedBlock>;

/// A new block, recorded so that receiving it back in this process maps nothing new.
BlockPtr make_block(std::size_t bytes, const char* name);

/// Encodes a block as its descriptor (sent alongside the bytes).
inline void encode_block(Encoder& e, const SharedBlock& b) { e.put(e.attach_fd(b.fd())); }

/// Maps the descriptor sent by encode_block; DecodeError when it is smaller than `min_bytes`.
/// The block is mapped once per process, however often it arrives.
BlockPtr decode_block(Decoder& d, std::size_t min_bytes);

/// n elements of T in bytes; std::invalid_argument past PTRDIFF_MAX bytes (no file or mapping
/// can be that large; the size would overflow an offset).
template <class T>
std::size_t array_bytes(std::size_t n) {
    if (n > static_cast<std::size_t>(PTRDIFF_MAX) / sizeof(T)) throw std::invalid_argument("mp::Array: too many elements");
    return n * sizeof(T);
}

}  // namespace detail

/// A T in anonymous shared memory, without a lock (Python's RawValue, or Value(..., lock=False)).
/// T must be trivially copyable (numbers, enums, plain structs): its bytes are what other
/// processes see, so a pointer or a std::string inside would mean nothing to them.
template <class T>
class RawValue {
    static_assert(detail::Shareable<T>,
                  "mp::RawValue/Value: T must be trivially copyable and not a pointer: its bytes "
                  "are shared between processes");

public:
    /// A new shared T holding `init` (value-initialised, i.e. zero, by default).
    explicit RawValue(const T& init = T{}) : block_(detail::make_block(sizeof(T), "mp-value")) {
        std::memcpy(block_->data(), static_cast<const void*>(&init), sizeof(T));
    }

    /// A copy of the value (an atomic load where T fits in one).
    T get() const { return detail::shared_load(get_obj()); }
    /// Stores `v` (an atomic store where T fits in one). A read-modify-write such as
    /// set(get() + 1) is not atomic: use a Value and hold its lock.
    void set(const T& v) const { detail::shared_store(get_obj(), v); }
    /// The shared object itself, for in-place access; every process sees the same object.
    /// Every member throws mp::EmptyHandle on a value moved from.
    T& get_obj() const {
        return *static_cast<T*>(detail::deref_handle(block_, "mp::RawValue").data());
    }

private:
    template <class, class>
    friend struct Codec;
    explicit RawValue(detail::BlockPtr b) noexcept : block_(std::move(b)) {}
    detail::BlockPtr block_;
};

/// A fixed-size array of T in anonymous shared memory, without a lock (Python's RawArray, or
/// Array(..., lock=False)). Constructed like std::vector: `RawArray<int> a(10)` holds ten zeros,
/// `RawArray<int> a{1, 2, 3}` holds 1, 2, 3.
template <class T>
class RawArray {
    static_assert(detail::Shareable<T>,
                  "mp::RawArray/Array: T must be trivially copyable and not a pointer: its bytes "
                  "are shared between processes");

public:
    /// The element type.
    using value_type = T;
    /// Iterators are plain pointers into the shared memory.
    using iterator = T*;

    /// `n` zero-filled elements (a fresh memfd is zero, so every byte is 0, padding included).
    explicit RawArray(std::size_t n)
        : block_(detail::make_block(detail::array_bytes<T>(n), "mp-array")), size_(n) {}
    /// A copy of `values`.
    RawArray(std::initializer_list<T> values) : RawArray(std::span<const T>(values)) {}
    /// A copy of `values` (a std::vector, std::array or other contiguous range of T).
    explicit RawArray(std::span<const T> values) : RawArray(values.size()) {
        if (!values.empty()) std::memcpy(data(), values.data(), values.size_bytes());
    }
    /// Copies share the memory (as copies of a Python RawArray's handle do).
    RawArray(const RawArray&) = default;
    RawArray& operator=(const RawArray&) = default;
    /// Takes over `other`'s memory; `other` is left empty (size() 0), as a moved-from vector.
    RawArray(RawArray&& other) noexcept : block_(std::move(other.block_)), size_(std::exchange(other.size_, 0)) {}
    RawArray& operator=(RawArray&& other) noexcept {
        if (this != &other) {
            block_ = std::move(other.block_);
            size_ = std::exchange(other.size_, 0);
        }
        return *this;
    }

    /// Number of elements (Python's len()).
    std::size_t size() const noexcept { return size_; }
    /// True for an array of no elements.
    bool empty() const noexcept { return size_ == 0; }
    /// Element i, unchecked.
    T& operator[](std::size_t i) const { return data()[i]; }
    /// Element i; std::out_of_range past the end (Python's IndexError).
    T& at(std::size_t i) const {
        if (i >= size_)
            throw std::out_of_range("mp::Array index " + std::to_string(i) +
                                    " out of range (size " + std::to_string(size_) + ")");
        return data()[i];
    }
    /// Element i loaded as RawValue::get loads (checked).
    T get(std::size_t i) const { return detail::shared_load(at(i)); }
    /// Stores element i as RawValue::set stores (checked).
    void set(std::size_t i, const T& v) const { detail::shared_store(at(i), v); }
    /// The elements, for bulk access (Python's arr[:] and slices).
    std::span<T> span() const { return {data(), size_}; }
    /// The elements themselves (Python's get_obj()).
    std::span<T> get_obj() const { return span(); }
    /// A copy of the elements (Python's list(arr)).
    std::vector<T> to_vector() const { return std::vector<T>(begin(), end()); }
    /// The first element (shared memory, the same in every process that holds the array).
    /// Every member but size() and empty() (0 and true) throws mp::EmptyHandle on an array moved
    /// from.
    T* data() const { return static_cast<T*>(detail::deref_handle(block_, "mp::RawArray").data()); }
    /// Iteration over the elements themselves (range-for, standard algorithms).
    iterator begin() const { return data(); }
    /// The end of the elements.
    iterator end() const { return data() + size_; }

private:
    template <class, class>
    friend struct Codec;
    RawArray(detail::BlockPtr b, std::size_t n) noexcept : block_(std::move(b)), size_(n) {}
    detail::BlockPtr block_;
    std::size_t size_ = 0;
};

/// Sent with its memfd (forkserver, pool workers): the receiver maps the same memory.
template <class T>
struct Codec<RawValue<T>> {
    static constexpr bool shares_state = true;  // a copy refers to the same object
    static void encode(Encoder& e, const RawValue<T>& v) {
        detail::encode_block(e, detail::deref_handle(v.block_, "mp::RawValue"));
    }
    static RawValue<T> decode(Decoder& d) { return RawValue<T>(detail::decode_block(d, sizeof(T))); }
};

/// Sent with its memfd and its length: the receiver maps the same memory.
template <class T>
struct Codec<RawArray<T>> {
    static constexpr bool shares_state = true;  // a copy refers to the same object
    static void encode(Encoder& e, const RawArray<T>& a) {
        e.write_size(a.size_);
        detail::encode_block(e, detail::deref_handle(a.block_, "mp::RawArray"));
    }
    static RawArray<T> decode(Decoder& d) {
        std::uint64_t n = d.read_size(0);
        if (n > SIZE_MAX / sizeof(T)) throw DecodeError("mp::Codec: array length overflows");
        auto count = static_cast<std::size_t>(n);
        return RawArray<T>(detail::decode_block(d, count * sizeof(T)), count);
    }
};

// ------------------------------------------------------------------------------ Value, Array

/// A lock a Value or Array can use: Lockable (lock/unlock) and a copyable handle, so that copies
/// of the Value share it. mp::RLock (the default), mp::Lock and mp::Semaphore qualify.
template <class L>
concept ValueLock = std::copy_constructible<L> && requires(L& l) {
    l.lock();
    l.unlock();
};

namespace detail {
// The codec of a shared object W made of its memory (Raw) and its lock (L): Value, Array.
template <class W, class Raw, class L>
struct LockedCodec {
    static constexpr bool shares_state = true;  // a copy refers to the same object
    static void encode(Encoder& e, const W& w) {
        e.put(w.obj_);
        e.put(w.lock_);
    }
    static W decode(Decoder& d) {
        auto obj = d.get<Raw>();
        return W(std::move(obj), d.get<L>());
    }
};
}  // namespace detail

/// A T in anonymous shared memory with a lock (Python's multiprocessing.Value).
///
///     mp::Value<int> hits(0);                   // with a new RLock, as Python
///     { std::lock_guard g(hits.get_lock()); hits.set(hits.get() + 1); }  // atomic increment
///
/// get() and set() each take the lock, so one of them is atomic; a read-modify-write is atomic
/// only under get_lock(), exactly as `v.value += 1` needs `with v.get_lock():` in Python. With the
/// default RLock, get() and set() may be called while holding get_lock() (it is recursive); with a
/// Lock they may not (a second acquire by the holder throws std::system_error
/// resource_deadlock_would_occur). Python's Value(..., lock=False) is mp::RawValue<T>. If a
/// process dies holding the lock, the next acquirer gets it and get_lock().owner_died() says so
/// (see synchronize.hpp).
template <class T, class L = RLock>
    requires ValueLock<L>
class Value {
public:
    /// The type of get_lock().
    using lock_type = L;

    /// A new shared T holding `init` (zero by default), with a new lock.
    explicit Value(const T& init = T{}) : obj_(init) {}
    /// A new shared T holding `init`, guarded by `lock` (shared with the caller: the same lock,
    /// as Python's Value(..., lock=lock)).
    Value(const T& init, L lock) : obj_(init), lock_(std::move(lock)) {}

    /// A copy of the value, read under the lock.
    T get() const {
        std::lock_guard<L> g(lock_);
        return obj_.get();
    }
    /// Stores `v` under the lock.
    void set(const T& v) const {
        std::lock_guard<L> g(lock_);
        obj_.set(v);
    }
    /// The lock guarding the value (Python's get_lock()); copies of this Value share it.
    L& get_lock() const noexcept { return lock_; }
    /// The shared object itself, without locking (Python's get_obj()): hold get_lock() around
    /// anything another process may change at the same time.
    T& get_obj() const { return obj_.get_obj(); }
    /// The unlocked view of the same memory (Python's get_obj() object).
    const RawValue<T>& raw() const noexcept { return obj_; }

private:
    template <class, class, class>
    friend struct detail::LockedCodec;
    Value(RawValue<T> obj, L lock) noexcept : obj_(std::move(obj)), lock_(std::move(lock)) {}
    RawValue<T> obj_;
    mutable L lock_;
};

template <class T>
Value(T) -> Value<T>;
template <class T, class L>
Value(T, L) -> Value<T, L>;

/// A fixed-size array of T in anonymous shared memory with a lock (Python's
/// multiprocessing.Array). Constructed like std::vector: `Array<int> a(10)` holds ten zeros,
/// `Array<int> a{1, 2, 3}` holds 1, 2, 3.
///
/// get(i), set(i, v) and to_vector() take the lock, as Python's synchronized array does per item
/// and per slice; operator[], at(), span() and the iterators do not (hold get_lock() around a
/// sequence of accesses another process may interleave with). Python's Array(..., lock=False) is
/// mp::RawArray<T>.
template <class T, class L = RLock>
    requires ValueLock<L>
class Array {
public:
    /// The element type.
    using value_type = T;
    /// The type of get_lock().
    using lock_type = L;
    /// Iterators are plain pointers into the shared memory.
    using iterator = T*;

    /// `n` zero-filled elements, with a new lock.
    explicit Array(std::size_t n) : obj_(n) {}
    /// `n` zero-filled elements guarded by `lock` (shared with the caller).
    Array(std::size_t n, L lock) : obj_(n), lock_(std::move(lock)) {}
    /// A copy of `values`, with a new lock.
    Array(std::initializer_list<T> values) : obj_(values) {}
    /// A copy of `values` guarded by `lock`.
    Array(std::initializer_list<T> values, L lock) : obj_(values), lock_(std::move(lock)) {}
    /// A copy of `values` (a std::vector, std::array or other contiguous range of T).
    explicit Array(std::span<const T> values) : obj_(values) {}
    /// A copy of `values` guarded by `lock`.
    Array(std::span<const T> values, L lock) : obj_(values), lock_(std::move(lock)) {}

    /// Number of elements (Python's len()).
    std::size_t size() const noexcept { return obj_.size(); }
    /// True for an array of no elements.
    bool empty() const noexcept { return obj_.empty(); }
    /// Element i under the lock; std::out_of_range past the end (Python's IndexError).
    T get(std::size_t i) const {
        std::lock_guard<L> g(lock_);
        return obj_.get(i);
    }
    /// Stores element i under the lock; std::out_of_range past the end.
    void set(std::size_t i, const T& v) const {
        std::lock_guard<L> g(lock_);
        obj_.set(i, v);
    }
    /// A copy of all elements, taken under the lock (Python's arr[:]).
    std::vector<T> to_vector() const {
        std::lock_guard<L> g(lock_);
        return obj_.to_vector();
    }
    /// Element i, unchecked and unlocked.
    T& operator[](std::size_t i) const { return obj_[i]; }
    /// Element i, unlocked; std::out_of_range past the end.
    T& at(std::size_t i) const { return obj_.at(i); }
    /// The elements, unlocked, for bulk access.
    std::span<T> span() const { return obj_.span(); }
    /// The elements themselves, unlocked (Python's get_obj()).
    std::span<T> get_obj() const { return obj_.span(); }
    /// The unlocked view of the same memory.
    const RawArray<T>& raw() const noexcept { return obj_; }
    /// The first element, unlocked.
    T* data() const { return obj_.data(); }
    /// Iteration over the elements themselves, unlocked.
    iterator begin() const { return obj_.begin(); }
    /// The end of the elements.
    iterator end() const { return obj_.end(); }
    /// The lock guarding the elements (Python's get_lock()); copies of this Array share it.
    L& get_lock() const noexcept { return lock_; }

private:
    template <class, class, class>
    friend struct detail::LockedCodec;
    Array(RawArray<T> obj, L lock) noexcept : obj_(std::move(obj)), lock_(std::move(lock)) {}
    RawArray<T> obj_;
    mutable L lock_;
};

/// Value and Array are sent as their memory (an Array's with its length) and their lock, with
/// their descriptors: the receiver shares both.
template <class T, class L>
struct Codec<Value<T, L>> : detail::LockedCodec<Value<T, L>, RawValue<T>, L> {};
template <class T, class L>
struct Codec<Array<T, L>> : detail::LockedCodec<Array<T, L>, RawArray<T>, L> {};

}  // namespace mp
