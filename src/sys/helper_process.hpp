#pragma once

// Long-lived helper processes (the forkserver, the shared-memory tracker), started by
// detail::launch_helper (src/launch.hpp), clear here everything they inherited from a program
// that may run threads, hold descriptors and handle signals.

#include <cstddef>
#include <initializer_list>

namespace mp::sys {

/// In a new helper: no signal blocked, every disposition the default, then `ignored` ignored.
void reset_signals(std::initializer_list<int> ignored) noexcept;

/// In a new helper: `fd` moved to descriptor `target` (> 2), close-on-exec if asked, every
/// descriptor above `target` closed, stdio kept (an `fd` that was one of 0, 1, 2, because the
/// program had that stream closed, leaves /dev/null there: its children must not write their
/// output into it). A descriptor kept open by a helper would hide
/// end of file from its reader for as long as the helper lives. Raw syscall() only (bound in the
/// parent already: no lazy binding in a forkserver child).
void keep_only(int fd, int target, bool close_on_exec = false) noexcept;
/// As keep_only, but also keeps the descriptors `kept[0..n)` (sorted, all above `target`, `fd`
/// not among them): a fresh program's own, opened by its static initialisers. Raw calls only.
void keep_only(int fd, int target, bool close_on_exec, const int* kept, std::size_t n) noexcept;

/// Ends a forked child (or a helper) at once, as _exit does, without a call that the dynamic
/// linker binds on first use: _exit is called only in children, so through its PLT entry every
/// child would run ld.so's lazy binding (a symbol lookup, about ten page faults on pages the
/// parent owns, and ld.so's own code after fork).
[[noreturn]] void exit_child(int code) noexcept;

}  // namespace mp::sys
