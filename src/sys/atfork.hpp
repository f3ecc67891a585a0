#pragma once
// Fork-child handlers registered as the library loads, ahead of the program's own objects.

#include <pthread.h>

namespace mp::sys {

/// Registers `child` with pthread_atfork when made. Define one at namespace scope with
/// [[gnu::init_priority(101)]]: a Pool or Manager at a program's namespace scope forks during
/// static initialisation (and a static libmp's own initialisers run after the program's), and
/// the children it forks then need the handler too.
struct ChildAtFork {
    explicit ChildAtFork(void (*child)()) noexcept { (void)::pthread_atfork(nullptr, nullptr, child); }
};

}  // namespace mp::sys
