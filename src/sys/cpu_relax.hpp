#pragma once
// The pause of a spin-wait: tells the CPU this is a busy loop (x86 PAUSE, ARM YIELD), so the
// loop wastes less power and leaves a sibling hyperthread more room.

namespace mp::sys {

inline void cpu_relax() noexcept {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#elif defined(__aarch64__)
    asm volatile("yield");
#endif
}

}  // namespace mp::sys
