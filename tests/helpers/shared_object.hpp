#pragma once
/// A T in anonymous shared memory, visible to forked children: test bookkeeping (counters,
/// flags) that must not itself depend on the mp primitive under test.

#include <cerrno>
#include <new>
#include <sys/mman.h>
#include <system_error>

namespace mp::test {

template <class T>
class Shared {
public:
    Shared() {
        void* p = ::mmap(nullptr, sizeof(T), PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS,
                         -1, 0);
        if (p == MAP_FAILED) throw std::system_error(errno, std::system_category(), "mmap");
        p_ = new (p) T{};
    }
    ~Shared() {
        p_->~T();
        ::munmap(p_, sizeof(T));
    }
    Shared(const Shared&) = delete;
    Shared& operator=(const Shared&) = delete;
    T* operator->() const { return p_; }
    T& operator*() const { return *p_; }

private:
    T* p_;
};

}  // namespace mp::test
