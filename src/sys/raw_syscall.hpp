#pragma once
// What a child calls between fork and exec (or its work): raw syscall() only. The parent has
// bound syscall's PLT entry already, while any libc function the parent never called would be
// bound lazily by ld.so in every child, at the price of a symbol lookup and several page faults
// each time (and ld.so's lock, which a thread of a threaded parent may hold).

#include <fcntl.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <cerrno>
#include <type_traits>

namespace mp::sys {

inline long sys_call(long n, auto... args) noexcept { return ::syscall(n, args...); }

/// For a child that runs on its parent's memory (clone with CLONE_VM, until it execs): code that
/// no sanitizer instruments, since its shadow state and thread records are the parent's.
#define MP_SHARED_MEMORY_CHILD                                                                  \
    __attribute__((no_sanitize("address"))) __attribute__((no_sanitize("thread")))               \
    __attribute__((no_sanitize("undefined")))

namespace raw_detail {
template <class T>
inline long as_arg(T v) noexcept {
    if constexpr (std::is_null_pointer_v<T>)
        return 0;
    else if constexpr (std::is_pointer_v<T>)
        return reinterpret_cast<long>(v);
    else
        return static_cast<long>(v);
}
}  // namespace raw_detail

/// A system call made in a child that shares its parent's memory: returns minus the errno on
/// failure and never touches errno, which is the parent thread's (errno lives in the thread's
/// TLS, and such a child runs with the TLS of the thread that made it). Also binds nothing
/// lazily: it is the instruction itself.
template <class... A>
    requires(sizeof...(A) <= 6)
[[gnu::always_inline]] inline long raw_call(long n, A... args) noexcept {
    long a[6] = {raw_detail::as_arg(args)...};
#if defined(__x86_64__)
    long ret;
    register long r10 __asm__("r10") = a[3];
    register long r8 __asm__("r8") = a[4];
    register long r9 __asm__("r9") = a[5];
    __asm__ volatile("syscall"
                     : "=a"(ret)
                     : "a"(n), "D"(a[0]), "S"(a[1]), "d"(a[2]), "r"(r10), "r"(r8), "r"(r9)
                     : "rcx", "r11", "memory");
    return ret;
#elif defined(__aarch64__)
    register long x8 __asm__("x8") = n;
    register long x0 __asm__("x0") = a[0];
    register long x1 __asm__("x1") = a[1];
    register long x2 __asm__("x2") = a[2];
    register long x3 __asm__("x3") = a[3];
    register long x4 __asm__("x4") = a[4];
    register long x5 __asm__("x5") = a[5];
    __asm__ volatile("svc 0" : "+r"(x0) : "r"(x8), "r"(x1), "r"(x2), "r"(x3), "r"(x4), "r"(x5) : "memory");
    return x0;
#else
    // Elsewhere through libc, whose errno is then the (suspended) parent thread's: read at once.
    const long r = ::syscall(n, a[0], a[1], a[2], a[3], a[4], a[5]);
    return r < 0 ? -errno : r;
#endif
}

/// Opens /dev/null at each of the standard descriptors 0, 1 and 2 that is closed, and, with
/// `cloexec_too`, at each that would close at exec: a child must not have a descriptor it
/// receives or opens land at one of them, where it would be overwritten (stdin from /dev/null)
/// or taken for a standard stream (a socket written to as stdout). Raw calls only: for a child
/// after fork or on its parent's memory.
[[gnu::always_inline]] inline void standard_fds_open(bool cloexec_too) noexcept {
    char path[] = "/dev/null";  // on the stack: see stdin_from_null
    for (int fd = 0; fd <= 2; ++fd) {
        const long flags = raw_call(SYS_fcntl, fd, F_GETFD);
        if (flags >= 0 && (!cloexec_too || (flags & FD_CLOEXEC) == 0)) continue;
        // The lowest free number: `fd` itself when it is closed (those below it are open).
        const long null = raw_call(SYS_openat, AT_FDCWD, path, O_RDWR);
        if (null >= 0 && null != fd) {
            raw_call(SYS_dup3, null, fd, 0);
            raw_call(SYS_close, null);
        }
    }
}

/// The kernel's struct sigaction (rt_sigaction takes this layout, not libc's).
struct KernelSigaction {
    void (*handler)(int);
    unsigned long flags;
    void (*restorer)();
    unsigned long mask;
};

}  // namespace mp::sys
