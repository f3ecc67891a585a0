// Lesson 7: the forkserver start method, exit codes, and an exception escaping a target.
//
// The Python original:
//
//     def square(name, x):
//         print('%s: %d * %d = %d (pid %d, ppid %d)' % (name, x, x, x * x, os.getpid(), os.getppid()))
//
//     def fail(what):
//         raise RuntimeError(what)
//
//     if __name__ == '__main__':
//         set_start_method('forkserver')
//         ps = [Process(target=square, args=('worker-%d' % i, i)) for i in range(1, 4)]
//         ps.append(Process(target=os._exit, args=(3,)))
//         ps.append(Process(target=fail, args=('boom',), name='failing'))
//         for p in ps: p.start()
//         for p in ps: p.join(); print(p.name, p.exitcode)   # 0 0 0 3 1
//
// Under forkserver every child is forked from a small single-threaded server process, started
// once at set_start_method(): a parent that runs threads can start children safely, and the
// children's getppid() is the server, not main. The child cannot be a copy of main's memory,
// so the target must be *transferable* (a function, a function pointer, a captureless lambda
// or an empty function object) and its arguments must have an mp::Codec (std::string, int ...
// do). A capturing lambda is a compile error that says to pass the values as arguments, and a
// Process subclass runs only under fork.
//
// An exception that escapes a target prints "Process <name>:" and the exception to stderr; the
// child's exit code is 1 and the parent carries on.

#include <mp/process.hpp>

#include <cstdio>
#include <deque>
#include <stdexcept>
#include <string>
#include <unistd.h>

namespace {

void square(const std::string& name, int x) {
    std::printf("  %s: %d * %d = %d (pid %d, getppid() %d)\n", name.c_str(), x, x, x * x,
                static_cast<int>(::getpid()), static_cast<int>(::getppid()));
}

// Python's os._exit(code): leave at once with that exit code.
void quit_with(int code) {
    std::fflush(stdout);  // _exit does not flush stdio
    ::_exit(code);
}

void fail(const std::string& what) { throw std::runtime_error(what); }

}  // namespace

int main() {
    std::setvbuf(stdout, nullptr, _IOLBF, 0);  // one line at a time, even into a pipe

    // First thing in main, before any thread exists: this starts the fork server.
    mp::set_start_method(mp::StartMethod::forkserver);
    std::printf("main: pid %d, start method %s\n", static_cast<int>(::getpid()),
                mp::to_string(mp::get_start_method()).c_str());

    std::deque<mp::Process> ps;
    for (int i = 1; i <= 3; ++i) ps.emplace_back(square, "worker-" + std::to_string(i), i);
    ps.emplace_back(mp::ProcessOptions{.name = "exit-3"}, quit_with, 3);
    ps.emplace_back(mp::ProcessOptions{.name = "failing"}, fail, std::string("boom"));

    for (auto& p : ps) p.start();
    for (auto& p : ps) {
        p.join();
        std::printf("main: %-10s exitcode %d\n", p.name().c_str(), p.exitcode().value_or(-999));
    }
    std::printf("main: the failing child did not disturb the others; main exits 0\n");
}
