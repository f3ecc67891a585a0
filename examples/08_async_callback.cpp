// Lesson 8: asynchronous results with a process pool and done callbacks.
//
// The Python original:
//
//     def task(n):
//         print('%s is running' % os.getpid())
//         time.sleep(random.randint(1, 3))
//         return n ** 2
//
//     def handle(future):
//         print('handle res %s' % future.result())
//
//     if __name__ == '__main__':
//         pool = ProcessPoolExecutor(4)
//         for i in range(10):
//             pool.submit(task, i).add_done_callback(handle)
//         pool.shutdown(wait=True)
//         print('主')
//
// submit() returns a future at once; the main thread never waits for a single result. Each
// result is handled by its callback as soon as it arrives, in whatever order the workers
// finish. shutdown(wait=true) waits for every task; only then does main print 主.
//
// Callbacks run in the pool's own result thread (never in a worker), so they must be short.

#include <mp/futures.hpp>

#include <atomic>
#include <chrono>
#include <cstdio>
#include <random>
#include <thread>
#include <unistd.h>

namespace {

// Seeded in the worker, from the OS, so the workers do not all draw the same naps.
std::chrono::milliseconds random_nap(int min_ms, int max_ms) {
    thread_local std::mt19937 gen(std::random_device{}());
    return std::chrono::milliseconds(std::uniform_int_distribution<int>(min_ms, max_ms)(gen));
}

// Runs in a worker process: a function (not a capturing lambda), so it can be sent there.
int task(int n) {
    std::printf("%d is running\n", static_cast<int>(::getpid()));
    std::fflush(stdout);  // a worker is long-lived: do not leave the line in its buffer
    std::this_thread::sleep_for(random_nap(100, 500));
    return n * n;
}

}  // namespace

int main() {
    std::setvbuf(stdout, nullptr, _IOLBF, 0);  // one line at a time, even into a pipe

    constexpr int kTasks = 10;
    std::atomic<int> handled{0};  // the callbacks run in another thread of this process

    mp::ProcessPoolExecutor pool({.max_workers = 4});
    for (int i = 0; i < kTasks; ++i) {
        pool.submit(task, i).add_done_callback([&handled](const mp::Future<int>& f) {
            std::printf("handle res %d\n", f.result());  // done: result() does not block
            ++handled;
        });
    }
    pool.shutdown(/*wait=*/true);
    std::printf("主\n");

    // Python's shutdown(wait=True) returns only after every callback has run; so does mp's.
    if (handled != kTasks) {
        std::fprintf(stderr, "only %d of %d callbacks ran before shutdown returned\n",
                     handled.load(), kTasks);
        return 1;
    }
}
