// SharedBlock (a memfd and its mapping) and the registry that maps each memfd once per process.

#include "mp/detail/shared_block.hpp"

#include <map>
#include <mutex>
#include <new>
#include <pthread.h>
#include <string>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include "mp/errors.hpp"

#include "sys/atfork.hpp"
#include "sys/error.hpp"
#include "sys/fd.hpp"

namespace mp::detail {

SharedBlock SharedBlock::map(sys::Fd fd, std::size_t size) {
    void* p = ::mmap(nullptr, size, PROT_READ | PROT_WRITE, MAP_SHARED, fd.get(), 0);
    if (p == MAP_FAILED) sys::throw_system_error(errno, "mmap");
    SharedBlock b;
    b.data_ = p;
    b.size_ = size;
    b.fd_ = std::move(fd);
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
    fd_.reset();
    data_ = nullptr;
    size_ = 0;
}

namespace attached {
namespace {

struct Entry {
    std::weak_ptr<void> owner;
    std::uint32_t tag = 0;
};

struct Registry {
    std::mutex mu;
    std::map<std::pair<dev_t, ino_t>, Entry> live;
};

Registry& registry() {
    static auto* r = new Registry;  // never destroyed: handles may outlive static teardown
    return *r;
}

void on_fork_child() noexcept {
    // Another thread of the parent may have held the registry's mutex at the moment of fork.
    new (&registry().mu) std::mutex;
}

// The registry is made here, with the handler, so a fork child never allocates it.
[[gnu::init_priority(101)]] const sys::ChildAtFork atfork_registered{((void)registry(), &on_fork_child)};

std::pair<dev_t, ino_t> key_of(int fd, struct stat& st) {
    sys::check(::fstat(fd, &st), "fstat");
    return {st.st_dev, st.st_ino};
}

}  // namespace

std::shared_ptr<void> find_or_attach(int raw_fd, std::size_t min_size, const char* what,
                                     const std::function<void(std::uint32_t)>& check_tag,
                                     const Make& make) {
    sys::Fd fd(raw_fd);
    struct stat st {};
    const auto key = key_of(fd.get(), st);
    auto& reg = registry();
    // Declared before the guard, so destroyed after it: dropping the last reference runs the
    // owner's destructor, which takes the registry's mutex.
    std::shared_ptr<void> owner;
    std::lock_guard g(reg.mu);
    auto [it, fresh] = reg.live.try_emplace(key);
    if (!fresh && (owner = it->second.owner.lock())) {
        check_tag(it->second.tag);
        return owner;  // `fd` closes: the mapping has its own
    }
    try {
        if (!S_ISREG(st.st_mode) || st.st_size <= 0 ||
            static_cast<std::size_t>(st.st_size) < min_size)
            throw DecodeError(std::string(what) +
                              ": the received descriptor is not its shared memory");
        auto [made, tag] = make(SharedBlock::attach(fd.release()));
        owner = std::move(made);
        it->second = {owner, tag};
    } catch (...) {
        if (it->second.owner.expired()) reg.live.erase(it);
        throw;
    }
    return owner;
}

void record(const SharedBlock& block, std::uint32_t tag,
            const std::function<std::shared_ptr<void>()>& make) {
    struct stat st {};
    const auto key = key_of(block.fd(), st);
    auto& reg = registry();
    std::shared_ptr<void> owner;  // destroyed after the guard, as in find_or_attach
    std::lock_guard g(reg.mu);
    auto& entry = reg.live[key];
    owner = make();
    entry = {owner, tag};
}

void forget(const SharedBlock& block) noexcept {
    if (!block) return;
    struct stat st {};
    if (::fstat(block.fd(), &st) != 0) return;
    auto& reg = registry();
    std::lock_guard g(reg.mu);
    // Erase only a dead record: another thread may have attached the memory again meanwhile.
    auto it = reg.live.find({st.st_dev, st.st_ino});
    if (it != reg.live.end() && it->second.owner.expired()) reg.live.erase(it);
}

}  // namespace attached

}  // namespace mp::detail
