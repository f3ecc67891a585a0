#pragma once
// The owner of a file descriptor, for the public classes that hold one (Listener, Request,
// SharedBlock) and for mp's OS layer, which knows it as sys::Fd (src/sys/fd.hpp): one type.

#include <utility>

namespace mp::detail {

/// Owns one file descriptor; closes it on destruction. Never retries close on EINTR (Linux
/// releases the descriptor even when close reports EINTR, so a retry could close a stranger's).
class Fd {
public:
    Fd() noexcept = default;
    explicit Fd(int fd) noexcept : fd_(fd) {}
    Fd(Fd&& o) noexcept : fd_(std::exchange(o.fd_, -1)) {}
    Fd& operator=(Fd&& o) noexcept {
        if (this != &o) reset(std::exchange(o.fd_, -1));
        return *this;
    }
    Fd(const Fd&) = delete;
    Fd& operator=(const Fd&) = delete;
    ~Fd() { reset(); }

    int get() const noexcept { return fd_; }
    explicit operator bool() const noexcept { return fd_ >= 0; }
    /// Gives up ownership without closing.
    [[nodiscard]] int release() noexcept { return std::exchange(fd_, -1); }
    /// Closes the current descriptor (if any) and takes `fd`.
    void reset(int fd = -1) noexcept;
    /// A new descriptor for the same file, close-on-exec.
    Fd dup() const;

private:
    int fd_ = -1;
};

}  // namespace mp::detail
