// A shared library that uses mp, as a plugin or a language extension module does: built with
// mp::mp's usage requirements, it must load wherever it is dlopen'd (no `main` to wrap or
// resolve), and a program that links it with those requirements (PUBLIC) can use spawn.
#include <mp/mp.hpp>

#include <unistd.h>

static void work(int code) { ::_exit(code); }

extern "C" int mp_plugin_start(int spawn, int code) {
    mp::Process p({.start_method = spawn != 0 ? mp::StartMethod::spawn : mp::StartMethod::fork}, work, code);
    p.start();
    p.join();
    return p.exitcode().value_or(-1000);
}
