#pragma once
// Robust, process-shared pthread mutexes: the Barrier's per-party slots (a party's death frees
// its slot). mp::Lock and the queues' locks are sys::FutexMutex (futex_mutex.hpp) instead.

#include <pthread.h>

namespace mp::sys {

/// Makes `m` a process-shared robust mutex. error_check: an unlock by a thread that does not
/// hold it fails (EPERM), and a lock by its holder fails (EDEADLK), instead of corrupting it.
/// Throws std::system_error naming the call.
void init_robust_mutex(pthread_mutex_t& m, bool error_check = false);

}  // namespace mp::sys
