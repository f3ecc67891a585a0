// Lesson 9: the synchronous way, for contrast with lesson 8: submit, then wait for the result.
//
// The Python original:
//
//     def task(n):
//         print('%s is running' % os.getpid())
//         time.sleep(0.2)
//         return n ** 2
//
//     if __name__ == '__main__':
//         pool = ProcessPoolExecutor(4)
//         for i in range(5):
//             res = pool.submit(task, i).result()
//             print(res)
//         pool.shutdown(wait=True)
//         print('主')
//
// result() blocks until that task is done, so the tasks run one after another even though the
// pool has four workers: the output alternates "is running" / result, in input order, and the
// whole run takes about 5 x 0.2 s. Lesson 8 is the asynchronous way to do the same work.

#include <mp/futures.hpp>

#include <chrono>
#include <cstdio>
#include <thread>
#include <unistd.h>

namespace {

int task(int n) {
    std::printf("%d is running\n", static_cast<int>(::getpid()));
    std::fflush(stdout);  // a worker is long-lived: do not leave the line in its buffer
    std::this_thread::sleep_for(std::chrono::milliseconds(200));
    return n * n;
}

}  // namespace

int main() {
    std::setvbuf(stdout, nullptr, _IOLBF, 0);  // one line at a time, even into a pipe

    auto t0 = std::chrono::steady_clock::now();
    mp::ProcessPoolExecutor pool({.max_workers = 4});
    for (int i = 0; i < 5; ++i) {
        int res = pool.submit(task, i).result();  // waits: the next submit comes after
        std::printf("%d\n", res);
        if (res != i * i) return 1;
    }
    pool.shutdown(/*wait=*/true);
    std::printf("主\n");
    std::printf("elapsed %.1f s: one task at a time\n",
                std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
}
