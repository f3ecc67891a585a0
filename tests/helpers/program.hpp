#pragma once
// Starting the helper program mp_test_child (helpers/child_main.cpp, located by the
// MP_TEST_CHILD compile definition) with modes given as arguments.

#include <spawn.h>
#include <sys/types.h>

#include <functional>
#include <stdexcept>
#include <string>
#include <vector>

extern char** environ;

namespace mp::test {

/// Starts `program` (mp_test_child unless told) with `args`; `redirect` adds the file actions that
/// give it its standard streams. Returns its pid; the caller reaps it.
inline pid_t spawn_test_child(std::vector<std::string> args,
                              const std::function<void(posix_spawn_file_actions_t&)>& redirect,
                              const char* program = MP_TEST_CHILD) {
    args.insert(args.begin(), program);
    std::vector<char*> argv;
    for (auto& a : args) argv.push_back(a.data());
    argv.push_back(nullptr);
    posix_spawn_file_actions_t fa;
    posix_spawn_file_actions_init(&fa);
    redirect(fa);
    pid_t pid = -1;
    const int rc = ::posix_spawn(&pid, program, &fa, nullptr, argv.data(), environ);
    posix_spawn_file_actions_destroy(&fa);
    if (rc != 0) throw std::runtime_error(std::string("posix_spawn ") + program + " failed");
    return pid;
}

}  // namespace mp::test
