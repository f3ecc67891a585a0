#pragma once
// Gated work for pool and executor tests: a task waits for a file (workers started by the
// forkserver inherit no pipe from the test), never longer than kGateLimit, so a broken test
// cannot hang a worker.

#include <unistd.h>

#include <chrono>
#include <string>
#include <thread>
#include <utility>

#include "helpers/temp_dir.hpp"

namespace mp::test {

/// The longest a gated task waits for its gate.
inline constexpr auto kGateLimit = std::chrono::seconds(20);

/// Waits (at most kGateLimit) for `path` to exist; 1 when it did, 0 when the wait ran out.
inline int wait_file(std::string path) {
    const auto deadline = std::chrono::steady_clock::now() + kGateLimit;
    while (std::chrono::steady_clock::now() < deadline) {
        if (::access(path.c_str(), F_OK) == 0) return 1;
        std::this_thread::sleep_for(std::chrono::milliseconds(2));
    }
    return 0;
}

/// A file gated tasks wait for; opens itself on destruction so no worker outlives the test for
/// long whatever happened.
class FileGate {
public:
    explicit FileGate(const TempDir& dir, std::string name = "gate") : dir_(dir), name_(std::move(name)) {}
    ~FileGate() { open(); }
    FileGate(const FileGate&) = delete;
    FileGate& operator=(const FileGate&) = delete;
    std::string path() const { return dir_.file(name_); }
    void open() { dir_.touch(name_); }

private:
    const TempDir& dir_;
    std::string name_;
};

}  // namespace mp::test
