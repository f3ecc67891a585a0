#pragma once
// A block of shared memory backed by a memfd: a child inherits it across fork, an unrelated
// process (a forkserver child, a pool worker) receives its descriptor over a Unix socket. Nothing
// appears in /dev/shm, so nothing can leak there: the memory goes when the last mapping and
// descriptor go, whoever dies first.

#include <cstddef>
#include <utility>

namespace mp::sys {
class Fd;
}

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
          fd_(std::exchange(o.fd_, -1)) {}
    SharedBlock& operator=(SharedBlock&& o) noexcept {
        if (this != &o) {
            release();
            data_ = std::exchange(o.data_, nullptr);
            size_ = std::exchange(o.size_, 0);
            fd_ = std::exchange(o.fd_, -1);
        }
        return *this;
    }
    SharedBlock(const SharedBlock&) = delete;
    SharedBlock& operator=(const SharedBlock&) = delete;
    ~SharedBlock() { release(); }

    void* data() const noexcept { return data_; }
    std::size_t size() const noexcept { return size_; }
    /// The memfd (close-on-exec), to send to another process.
    int fd() const noexcept { return fd_; }
    explicit operator bool() const noexcept { return data_ != nullptr; }

private:
    static SharedBlock map(sys::Fd fd, std::size_t size);
    void release() noexcept;
    void* data_ = nullptr;
    std::size_t size_ = 0;
    int fd_ = -1;
};

}  // namespace mp::detail
