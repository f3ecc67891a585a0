#pragma once
// Running a target in a child process and getting its exit code, bounded: what the manager
// tests check from other processes with.

#include <chrono>
#include <utility>

#include "mp/process.hpp"

namespace mp::test {

/// Starts `fn(args...)` in a child by `method` and returns its exit code; -1000 when it had not
/// ended within `bound` (it is killed then).
template <class F, class... A>
int run_child(mp::StartMethod method, std::chrono::seconds bound, F fn, const A&... args) {
    mp::Process p({.start_method = method}, std::move(fn), args...);
    p.start();
    if (!p.join(bound)) {
        p.kill();
        p.join();
        return -1000;
    }
    return *p.exitcode();
}

}  // namespace mp::test
