#pragma once
// W7 runs its two processes one per CPU, on every side (mp, the limit, Python): left to the
// scheduler, the two sometimes share a CPU, where each runs a whole time slice with the lock to
// itself and an increment costs a third of what it costs across CPUs. Which of the two a run gets
// decided the row more than the lock did (22 to 104 ns for the same program, session 11).

#include <sched.h>

namespace mp_bench {

/// Pins the calling process to the k-th CPU it may run on (modulo their number). Does nothing
/// when it may run on one CPU only, or when the affinity cannot be read or set.
inline void pin_to_cpu(int k) {
    cpu_set_t allowed;
    CPU_ZERO(&allowed);
    if (::sched_getaffinity(0, sizeof allowed, &allowed) != 0) return;
    const int count = CPU_COUNT(&allowed);
    if (count < 2) return;
    int wanted = k % count;
    for (int cpu = 0; cpu < CPU_SETSIZE; ++cpu) {
        if (!CPU_ISSET(cpu, &allowed)) continue;
        if (wanted-- == 0) {
            cpu_set_t one;
            CPU_ZERO(&one);
            CPU_SET(cpu, &one);
            (void)::sched_setaffinity(0, sizeof one, &one);
            return;
        }
    }
}

}  // namespace mp_bench
