#pragma once
// Internals of util.cpp that the launcher needs.

#include <cstdint>

namespace mp::detail {

/// What a forkserver or spawn child takes over from its parent's logger, as Python's spawn
/// passes log_to_stderr and the level in its preparation data. A sink set with set_sink is a
/// closure of the parent's and cannot follow: the child gets the default sink.
struct LogSettings {
    std::int32_t level = 0;
    bool to_stderr = false;  // the sink is log_to_stderr's
};

/// This process's settings, now.
LogSettings log_settings() noexcept;
/// Makes this process's logger what `s` describes (in a new child, before its task).
void apply_log_settings(const LogSettings& s);

}  // namespace mp::detail
