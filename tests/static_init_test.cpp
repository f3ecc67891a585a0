// mp objects at namespace scope, made during static initialisation (helpers/static_init_main.cpp,
// one program per scenario): a Manager's server and a Pool's workers are forked before libmp's
// initialisers and the program's template registrations would otherwise have run, and must know
// the servant types and task invokers all the same (as Python's module-level Manager() and Pool()
// work under fork).

#include "helpers/process_helpers.hpp"

namespace {

/// Runs `program` to its end (killed after kLong) and checks that it exits 0 with `expected` on
/// stdout, nothing on stderr, and leaves no process behind. (/dev/shm is checked by the suite's
/// leak check: tests run in parallel, so a whole-listing compare here would see others' entries.)
void expect_program_prints(const char* program, const std::string& expected) {
    Subreaper reaper;
    TempDir dir;
    const std::string out = dir.file("out"), err = dir.file("err");
    const pid_t pid = mp::test::spawn_test_child(
        {},
        [&](posix_spawn_file_actions_t& fa) {
            posix_spawn_file_actions_addopen(&fa, 0, "/dev/null", O_RDONLY, 0);
            posix_spawn_file_actions_addopen(&fa, 1, out.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
            posix_spawn_file_actions_addopen(&fa, 2, err.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
        },
        program);
    int status = 0;
    const auto deadline = Clock::now() + kLong;
    while (::waitpid(pid, &status, WNOHANG) == 0) {
        if (Clock::now() >= deadline) {
            ::kill(pid, SIGKILL);
            ::waitpid(pid, &status, 0);
            ADD_FAILURE() << program << " did not end within " << kLong.count() << " s";
            break;
        }
        std::this_thread::sleep_for(5ms);
    }
    const std::string described = std::string(program) + ": status " + std::to_string(status) +
                                  "\n--- stderr ---\n" + slurp(err).value_or("");
    EXPECT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 0) << described;
    EXPECT_EQ(slurp(out).value_or(""), expected) << described;
    EXPECT_EQ(slurp(err).value_or(""), "");
    const auto left = reaper.reap(5s);
    EXPECT_TRUE(left.empty()) << "the program left processes behind:" << joined(left);
}

// The server was forked before static_init_main.cpp's dict/Queue servants registered (their
// registration, a template's static member, ran after the Manager) and before libmp's own
// table of types (Lock ...) was filled: "AttributeError: type 'Lock' is not registered".
TEST(StaticInit, ManagerAtNamespaceScopeKnowsEveryType) {
    expect_program_prints(MP_TEST_STATIC_MANAGER, "lock ok\ndict 2 4\nqueue 5\n");
}

// Fork workers copied an invoker registry without the program's invokers (registered by
// templates, after the Pool): "the received task does not name an mp invoker in this binary".
TEST(StaticInit, PoolAtNamespaceScopeRunsTasksUnderFork) {
    expect_program_prints(MP_TEST_STATIC_POOL_FORK, "apply 49\nmap 0 1 4 9\nlambda 42\n");
}

// The same for the forkserver, forked then, which also lacked the invoker of the pool's own
// worker entry (registered by an initialiser of libmp): every worker died as it started.
TEST(StaticInit, PoolAtNamespaceScopeRunsTasksUnderForkserver) {
    expect_program_prints(MP_TEST_STATIC_POOL_FORKSERVER, "apply 49\nmap 0 1 4 9\nlambda 42\n");
}

}  // namespace
