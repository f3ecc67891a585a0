#pragma once
// A block of shared memory backed by a memfd: a child inherits it across fork, an unrelated
// process (a forkserver child, a pool worker) receives its descriptor over a Unix socket. Nothing
// appears in /dev/shm, so nothing can leak there: the memory goes when the last mapping and
// descriptor go, whoever dies first.

#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <utility>

#include "mp/detail/fd.hpp"

namespace mp::detail {

class SharedBlock {
public:
    SharedBlock() noexcept = default;
    /// A new zero-filled block of `size` bytes; `name` shows in /proc/PID/maps (for debugging).
    static SharedBlock create(std::size_t size, const char* name);
    /// Maps the memfd `fd` (taking ownership of the descriptor); the size is the file's size.
    static SharedBlock attach(int fd);

    SharedBlock(SharedBlock&& o) noexcept
        : data_(std::exchange(o.data_, nullptr)),
          size_(std::exchange(o.size_, 0)),
          fd_(std::move(o.fd_)) {}
    SharedBlock& operator=(SharedBlock&& o) noexcept {
        if (this != &o) {
            release();
            data_ = std::exchange(o.data_, nullptr);
            size_ = std::exchange(o.size_, 0);
            fd_ = std::move(o.fd_);
        }
        return *this;
    }
    SharedBlock(const SharedBlock&) = delete;
    SharedBlock& operator=(const SharedBlock&) = delete;
    ~SharedBlock() { release(); }

    void* data() const noexcept { return data_; }
    std::size_t size() const noexcept { return size_; }
    /// The memfd (close-on-exec), to send to another process.
    int fd() const noexcept { return fd_.get(); }
    explicit operator bool() const noexcept { return data_ != nullptr; }

private:
    static SharedBlock map(Fd fd, std::size_t size);
    void release() noexcept;
    void* data_ = nullptr;
    std::size_t size_ = 0;
    Fd fd_;
};

/// One mapping per memfd per process. The handles of one shared object received more than once
/// in a process (or received back by the process that created it) share the first mapping: a
/// robust mutex in the block locked through one mapping and unlocked through another corrupts
/// glibc's per-thread robust list, which links held mutexes by address. The registry holds each
/// mapping's owner (the object that holds the SharedBlock) by weak reference, keyed by the memfd's
/// inode, with a tag saying what the owner is, so that memory decoded as another kind of object
/// is refused, never cast.
namespace attached {

/// Tags of the owners outside synchronize.cpp (whose tags are its block kinds, 1 to 7).
inline constexpr std::uint32_t queue_tag = 0x6d705155;  // "mpQU"
inline constexpr std::uint32_t raw_tag = 0x6d705257;    // "mpRW": a Value's or Array's memory

/// Builds the owner of a newly mapped block, with its tag (which may come from the block).
using Make = std::function<std::pair<std::shared_ptr<void>, std::uint32_t>(SharedBlock)>;

/// The owner of this process's mapping of the memfd `fd` (taking ownership of the descriptor):
/// the live one when there is one (`fd` is closed; `check_tag`, which throws to refuse, sees its
/// tag), else make() of a new mapping, recorded. DecodeError naming `what` when `fd` is not a
/// regular file of at least `min_size` bytes.
std::shared_ptr<void> find_or_attach(int fd, std::size_t min_size, const char* what,
                                     const std::function<void(std::uint32_t)>& check_tag,
                                     const Make& make);

/// Records make()'s owner of `block` (one this process created, or a new owner of a mapping),
/// replacing any record. make() runs under the registry's lock, after everything here that may
/// throw, so a block it moves is never lost to an exception.
void record(const SharedBlock& block, std::uint32_t tag,
            const std::function<std::shared_ptr<void>()>& make);

/// Drops the record of `block` when its owner is gone; for the owner's destructor.
void forget(const SharedBlock& block) noexcept;

}  // namespace attached

}  // namespace mp::detail
