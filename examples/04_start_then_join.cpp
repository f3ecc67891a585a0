// Lesson 4: start every child first, then join them all: the children run at the same time.
//
// The Python original:
//
//     def task(name, n):
//         print('%s is running' % name)
//         time.sleep(n)
//         print('%s is done' % name)
//
//     if __name__ == '__main__':
//         start = time.time()
//         p_l = []
//         for i in range(1, 11):
//             p = Process(target=task, args=('子进程%s' % i, i))
//             p_l.append(p)
//             p.start()
//         for p in p_l:
//             p.join()
//         print('主', time.time() - start)
//
// The elapsed time is about the longest child, not the sum. (Calling join() right after each
// start() would make the program serial again: it would take the sum.)

#include <mp/process.hpp>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <deque>
#include <string>
#include <thread>

namespace {

void task(const std::string& name, std::chrono::milliseconds nap) {
    std::printf("%s is running (%lld ms)\n", name.c_str(), static_cast<long long>(nap.count()));
    std::this_thread::sleep_for(nap);
    std::printf("%s is done\n", name.c_str());
}

}  // namespace

int main() {
    std::setvbuf(stdout, nullptr, _IOLBF, 0);  // one line at a time, even into a pipe
    using namespace std::chrono_literals;

    const auto start = std::chrono::steady_clock::now();
    std::chrono::milliseconds longest{0}, sum{0};

    std::deque<mp::Process> ps;
    for (int i = 1; i <= 10; ++i) {
        const auto nap = i * 150ms;  // child i sleeps 0.15 s * i
        longest = std::max(longest, nap);
        sum += nap;
        ps.emplace_back(task, "子进程" + std::to_string(i), nap);
        ps.back().start();
    }
    for (auto& p : ps) p.join();

    const std::chrono::duration<double> elapsed = std::chrono::steady_clock::now() - start;
    std::printf("主: elapsed %.2f s; the longest child slept %.2f s, all of them %.2f s in sum\n",
                elapsed.count(), std::chrono::duration<double>(longest).count(),
                std::chrono::duration<double>(sum).count());
}
