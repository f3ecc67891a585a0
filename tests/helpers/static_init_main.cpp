// A program whose mp object is at namespace scope, made during static initialisation: before
// libmp's own initialisers (a static library's run after the program's) and, with g++, before
// the program's template instantiations register their invokers and servant types. Built once
// per scenario (tests/CMakeLists.txt), as an object at namespace scope cannot depend on a mode;
// tests/static_init_test.cpp runs each. Exits 0 after printing what it got.
//
//   MP_STATIC_INIT_MANAGER            a Manager: a Lock (a type of libmp), a dict<int, int> and
//                                     a Queue<int> (types this program's templates name);
//                                     prints "lock ok", "dict 2 4", "queue 5"
//   MP_STATIC_INIT_POOL=<method>      a Pool of 2 workers started with <method>: apply with a
//                                     function, map (chunks), apply with a lambda;
//                                     prints "apply 49", "map 0 1 4 9", "lambda 42"

#include <cstdio>
#include <vector>

#include "mp/managers.hpp"
#include "mp/pool.hpp"

namespace {

#if defined(MP_STATIC_INIT_MANAGER)

mp::Manager g_manager;

int run() {
    auto lock = g_manager.Lock();
    lock.acquire();
    lock.release();
    std::printf("lock ok\n");
    auto d = g_manager.dict<int, int>();
    d.set(1, 2);
    d.set(3, 4);
    std::printf("dict %d %d\n", d.get(1), d.get(3));
    auto q = g_manager.Queue<int>();
    q.put(5);
    std::printf("queue %d\n", q.get());
    return 0;
}

#elif defined(MP_STATIC_INIT_POOL)

int square(int x) { return x * x; }

mp::Pool g_pool(mp::PoolOptions{.processes = 2, .start_method = mp::StartMethod::MP_STATIC_INIT_POOL});

int run() {
    std::printf("apply %d\n", g_pool.apply(square, 7));
    std::printf("map");
    for (int v : g_pool.map(square, std::vector<int>{0, 1, 2, 3}, 2)) std::printf(" %d", v);
    std::printf("\n");
    std::printf("lambda %d\n", g_pool.apply([](int x) { return x + 1; }, 41));
    g_pool.close();
    g_pool.join();
    return 0;
}

#else
#error "define MP_STATIC_INIT_MANAGER or MP_STATIC_INIT_POOL=<start method>"
#endif

}  // namespace

int main() {
    const int rc = run();
    std::fflush(stdout);
    return rc;
}
