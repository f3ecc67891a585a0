/// The main of every test binary: GoogleTest plus a per-test leak check.
///
/// After each test, the test fails when it left behind a child process, a file descriptor or a
/// /dev/shm entry that was not there when it started (see helpers/leak_check.hpp for what is
/// exempt: mp's forkserver and its connection, which live until the program exits). ctest runs
/// every TEST in a process of its own, so the check of one test is not disturbed by another.
///
/// Set MP_LEAK_CHECK=0 in the environment to turn the check off (e.g. while debugging).

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <gtest/gtest.h>
#include <string>
#include <unistd.h>

#include "helpers/leak_check.hpp"

namespace {

class LeakCheckListener : public ::testing::EmptyTestEventListener {
public:
    void OnTestStart(const ::testing::TestInfo&) override {
        pid_ = ::getpid();
        mp::test::rebaseline();
    }

    // Listeners get OnTestEnd in reverse order of registration, so this one runs before the
    // result printer, and a failure added here is reported as the test's failure.
    void OnTestEnd(const ::testing::TestInfo& info) override {
        if (::getpid() != pid_) {
            // A forked child came back into the test framework instead of leaving with _exit:
            // never let it run the rest of the suite.
            std::fprintf(stderr, "mp test: a child process (pid %d) returned into %s.%s\n",
                         static_cast<int>(::getpid()), info.test_suite_name(), info.name());
            std::fflush(stderr);
            ::_exit(111);
        }
        const std::string leaks = mp::test::describe_leaks(mp::test::current_baseline());
        if (!leaks.empty()) {
            ADD_FAILURE() << "the test left resources behind:\n" << leaks;
        }
    }

private:
    pid_t pid_ = 0;
};

bool leak_check_enabled() {
    const char* v = std::getenv("MP_LEAK_CHECK");
    return v == nullptr || std::strcmp(v, "0") != 0;
}

}  // namespace

int main(int argc, char** argv) {
    ::testing::InitGoogleTest(&argc, argv);
    if (leak_check_enabled()) {
        ::testing::UnitTest::GetInstance()->listeners().Append(new LeakCheckListener);
    }
    return RUN_ALL_TESTS();
}
