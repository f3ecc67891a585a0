#include "mp/detail/shared_block.hpp"

#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include "sys/error.hpp"
#include "sys/fd.hpp"

namespace mp::detail {

SharedBlock SharedBlock::map(sys::Fd fd, std::size_t size) {
    void* p = ::mmap(nullptr, size, PROT_READ | PROT_WRITE, MAP_SHARED, fd.get(), 0);
    if (p == MAP_FAILED) sys::throw_system_error(errno, "mmap");
    SharedBlock b;
    b.data_ = p;
    b.size_ = size;
    b.fd_ = fd.release();
    return b;
}

SharedBlock SharedBlock::create(std::size_t size, const char* name) {
    if (size == 0) size = 1;
    sys::Fd fd(sys::check(::memfd_create(name, MFD_CLOEXEC), "memfd_create"));
    sys::check(::ftruncate(fd.get(), static_cast<off_t>(size)), "ftruncate");
    return map(std::move(fd), size);
}

SharedBlock SharedBlock::attach(int raw) {
    sys::Fd fd(raw);
    struct stat st {};
    sys::check(::fstat(fd.get(), &st), "fstat");
    if (st.st_size <= 0) throw std::system_error(EINVAL, std::system_category(), "mmap (empty block)");
    return map(std::move(fd), static_cast<std::size_t>(st.st_size));
}

void SharedBlock::release() noexcept {
    if (data_ != nullptr) ::munmap(data_, size_);
    if (fd_ >= 0) ::close(fd_);
    data_ = nullptr;
    size_ = 0;
    fd_ = -1;
}

}  // namespace mp::detail
