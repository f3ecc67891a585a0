// A program built against an installed mp: starts a child under fork and one under spawn (which
// needs the link options the package hands on: -Wl,--wrap=main) and reports their exit codes, and
// whether libcrypto is mapped (it must not be: only Listener/Client/managers load it, at first use).
#include <mp/mp.hpp>

#include <cstdio>
#include <cstring>
#include <unistd.h>

static void work(int code) { ::_exit(code); }

static bool libcrypto_mapped() {
    std::FILE* f = std::fopen("/proc/self/maps", "r");
    if (f == nullptr) return true;  // cannot tell: fail the check rather than pass it
    char line[4096];
    bool found = false;
    while (std::fgets(line, sizeof line, f) != nullptr)
        if (std::strstr(line, "libcrypto") != nullptr) found = true;
    std::fclose(f);
    return found;
}

int main() {
    mp::Process p(work, 42);
    p.start();
    p.join();
    std::printf("child exit code %d\n", p.exitcode().value_or(-1000));
    mp::Process s({.start_method = mp::StartMethod::spawn}, work, 43);
    s.start();
    s.join();
    std::printf("spawn child exit code %d\n", s.exitcode().value_or(-1000));
    std::printf("libcrypto %s\n", libcrypto_mapped() ? "mapped" : "not mapped");
    return p.exitcode() == 42 && s.exitcode() == 43 ? 0 : 1;
}
