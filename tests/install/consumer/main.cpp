// A program built against an installed mp: starts a child and reports its exit code.
#include <mp/mp.hpp>

#include <cstdio>
#include <unistd.h>

static void work(int code) { ::_exit(code); }

int main() {
    mp::Process p(work, 42);
    p.start();
    p.join();
    std::printf("child exit code %d\n", p.exitcode().value_or(-1000));
    return p.exitcode() == 42 ? 0 : 1;
}
