#pragma once
// Long-lived helper processes (the forkserver, the shared-memory tracker), started by
// detail::launch_helper (src/launch.hpp), clear here everything they inherited from a program
// that may run threads, hold descriptors and handle signals.

#include <initializer_list>

namespace mp::sys {

/// In a new helper: no signal blocked, every disposition the default, then `ignored` ignored.
void reset_signals(std::initializer_list<int> ignored) noexcept;

/// In a new helper: `fd` moved to descriptor `target` (> 2), every descriptor above `target`
/// closed, stdio kept. A descriptor kept open by a helper would hide end of file from its reader
/// for as long as the helper lives.
void keep_only(int fd, int target) noexcept;

}  // namespace mp::sys
