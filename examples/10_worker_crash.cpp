// Lesson 10: a worker that crashes fails its own task, not the pool.
//
// In Python, a worker that segfaults breaks a ProcessPoolExecutor (every pending future fails
// with BrokenProcessPool) and makes a multiprocessing.Pool hang for ever:
//
//     def fragile(x):
//         if x == 13:
//             ctypes.string_at(0)          # segfault
//         return x * x
//
//     with Pool(2) as pool:
//         for r in pool.imap(fragile, range(20)):   # never gets past 13
//             print(r)
//
// mp fails only the task (here: the chunk of one item) the dead worker was running, with
// mp::WorkerDied naming its pid and signal; a replacement worker starts and the map goes on.
// imap's next() throws that item's error, and the following call returns the next item.

#include <mp/pool.hpp>

#include <csignal>
#include <cstdio>
#include <optional>
#include <sys/resource.h>
#include <vector>

namespace {

int fragile(int x) {
    if (x == 13) {
        const rlimit no_core{0, 0};
        ::setrlimit(RLIMIT_CORE, &no_core);  // a crash on purpose: leave no core file behind
        std::raise(SIGSEGV);
    }
    return x * x;
}

}  // namespace

int main() {
    std::setvbuf(stdout, nullptr, _IOLBF, 0);  // one line at a time, even into a pipe

    mp::Pool pool(2);
    std::vector<int> inputs;
    for (int i = 0; i < 20; ++i) inputs.push_back(i);

    int ok = 0, died = 0;
    auto results = pool.imap(fragile, inputs, /*chunksize=*/1);  // in input order
    for (int i = 0; i < 20; ++i) {
        try {
            std::optional<int> r = results.next();
            std::printf("fragile(%2d) = %d\n", i, r.value());
            ++ok;
        } catch (const mp::WorkerDied& e) {
            std::printf("fragile(%2d) failed: %s\n", i, e.what());
            ++died;
        }
    }

    // The pool lives on: a replacement worker took the dead one's place.
    int after = pool.apply(fragile, 7);
    std::printf("one more task after the crash: fragile(7) = %d\n", after);
    mp::PoolStats s = pool.stats();
    std::printf("%d results, %d worker death; workers started %zu, died %zu\n", ok, died,
                s.workers_started, s.worker_deaths);

    pool.close();
    pool.join();
    return (ok == 19 && died == 1 && after == 49) ? 0 : 1;
}
