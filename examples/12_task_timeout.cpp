// Lesson 12: a per-task time limit.
//
// Python's future.result(timeout) only stops *waiting*: the task keeps its worker busy for as
// long as it likes, and nothing can stop it short of killing the whole pool. mp can give a task
// a time limit of its own, counted from when a worker starts it: past it, the worker is killed,
// the future fails with mp::TimeoutError, and a replacement worker takes its place.
//
//     mp::ProcessPoolExecutor pool({.max_workers = 2});
//     auto slow = pool.submit({.timeout = 300ms}, nap, 5000);  // would sleep 5 s
//     slow.result();                                           // throws mp::TimeoutError
//
// A default for every task is ExecutorOptions::task_timeout (Pool: PoolOptions::task_timeout,
// map: MapOptions::task_timeout).

#include <mp/futures.hpp>

#include <chrono>
#include <cstdio>
#include <thread>

using namespace std::chrono_literals;

namespace {

int nap(int ms) {
    std::this_thread::sleep_for(std::chrono::milliseconds(ms));
    return ms;
}

}  // namespace

int main() {
    std::setvbuf(stdout, nullptr, _IOLBF, 0);  // one line at a time, even into a pipe

    mp::ProcessPoolExecutor pool({.max_workers = 2});
    auto t0 = std::chrono::steady_clock::now();
    mp::Future<int> slow = pool.submit({.timeout = 300ms}, nap, 5000);  // too long
    mp::Future<int> quick = pool.submit({.timeout = 2s}, nap, 50);      // well within

    std::printf("quick task: slept %d ms\n", quick.result());
    bool timed_out = false;
    try {
        slow.result();
        std::printf("slow task: finished?!\n");
    } catch (const mp::TimeoutError& e) {
        timed_out = true;
        std::printf("slow task: mp::TimeoutError: %s\n", e.what());
    }
    double waited = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    std::printf("gave up after about %.1f s, not 5 s\n", waited);

    // The killed worker was replaced: the pool still works.
    std::printf("next task: slept %d ms\n", pool.submit(nap, 10).result());
    return timed_out && waited < 4.0 ? 0 : 1;
}
