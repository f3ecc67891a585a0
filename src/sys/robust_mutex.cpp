#include "sys/robust_mutex.hpp"

#include "sys/error.hpp"

namespace mp::sys {

void init_robust_mutex(pthread_mutex_t& m, bool error_check) {
    pthread_mutexattr_t attr;
    check_ret(::pthread_mutexattr_init(&attr), "pthread_mutexattr_init");
    struct AttrGuard {
        pthread_mutexattr_t* a;
        ~AttrGuard() { ::pthread_mutexattr_destroy(a); }
    } guard{&attr};
    check_ret(::pthread_mutexattr_setpshared(&attr, PTHREAD_PROCESS_SHARED), "pthread_mutexattr_setpshared");
    check_ret(::pthread_mutexattr_setrobust(&attr, PTHREAD_MUTEX_ROBUST), "pthread_mutexattr_setrobust");
    if (error_check)
        check_ret(::pthread_mutexattr_settype(&attr, PTHREAD_MUTEX_ERRORCHECK), "pthread_mutexattr_settype");
    check_ret(::pthread_mutex_init(&m, &attr), "pthread_mutex_init");
}

}  // namespace mp::sys
