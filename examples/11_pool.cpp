// Lesson 11: multiprocessing.Pool: map, imap_unordered, apply_async with a callback.
//
// The Python original:
//
//     def square(x):
//         return x * x
//
//     def add(a, b):
//         return a + b
//
//     if __name__ == '__main__':
//         pool = Pool(3)
//         print(pool.map(square, range(10)))
//         print(sorted(pool.imap_unordered(square, range(10))))
//         results = []
//         for i in range(5):
//             pool.apply_async(add, (i, 100), callback=results.append)
//         pool.close()
//         pool.join()
//         print(sorted(results))
//
// map blocks and keeps input order; imap_unordered yields results as they finish (sorted here
// so the output is the same every run); apply_async returns at once, and its callback runs in
// the pool's result thread when the result arrives. close() then join() waits for all of it.

#include <mp/pool.hpp>

#include <algorithm>
#include <cstdio>
#include <mutex>
#include <string>
#include <vector>

namespace {

int square(int x) { return x * x; }
int add(int a, int b) { return a + b; }

std::string show(const std::vector<int>& v) {
    std::string s = "[";
    for (std::size_t i = 0; i < v.size(); ++i) s += (i ? ", " : "") + std::to_string(v[i]);
    return s + "]";
}

}  // namespace

int main() {
    std::vector<int> xs;
    for (int i = 0; i < 10; ++i) xs.push_back(i);

    mp::Pool pool(3);

    std::vector<int> mapped = pool.map(square, xs);
    std::printf("map:            %s\n", show(mapped).c_str());

    std::vector<int> unordered;
    for (int r : pool.imap_unordered(square, xs)) unordered.push_back(r);
    std::sort(unordered.begin(), unordered.end());
    std::printf("imap_unordered: %s (sorted)\n", show(unordered).c_str());

    // The callbacks run in the pool's result thread: guard what they share with main.
    std::mutex m;
    std::vector<int> results;
    std::vector<mp::AsyncResult<int>> pending;
    for (int i = 0; i < 5; ++i)
        pending.push_back(pool.apply_async(add, mp::args(i, 100), [&](const int& r) {
            std::lock_guard lock(m);
            results.push_back(r);
        }));
    pool.close();  // no more work
    pool.join();   // every task done, every worker gone

    std::sort(results.begin(), results.end());
    std::printf("apply_async:    %s (from the callbacks, sorted)\n", show(results).c_str());
    std::printf("get() of the first: %d\n", pending.front().get());

    return (mapped == unordered && results == std::vector{100, 101, 102, 103, 104}) ? 0 : 1;
}
