// Lesson 1: start a process with a target function and its arguments.
//
// The Python original:
//
//     def piao(name):
//         print('%s piaoing' % name)
//         time.sleep(random.randrange(1, 4))
//         print('%s piao end' % name)
//
//     if __name__ == '__main__':
//         for name in ('egon', 'alex', 'wupeiqi', 'yuanhao'):
//             Process(target=piao, args=(name,)).start()
//         print('主')
//
// start() returns at once: the parent prints 主 before any child has finished, and each child
// ends 1-3 s later, in an order nobody chose. Then the parent joins them.

#include <mp/process.hpp>

#include <chrono>
#include <cstdio>
#include <deque>
#include <random>
#include <string>
#include <thread>

namespace {

// Seeded in the child, from the OS: a generator made before fork would hand every child the
// same "random" numbers (Python's random module reseeds after fork for the same reason).
std::chrono::milliseconds random_nap(int min_ms, int max_ms) {
    std::mt19937 gen(std::random_device{}());
    return std::chrono::milliseconds(std::uniform_int_distribution<int>(min_ms, max_ms)(gen));
}

// The target: any callable; its arguments are copied into the child.
void piao(const std::string& name) {
    std::printf("%s piaoing\n", name.c_str());
    std::this_thread::sleep_for(random_nap(1000, 3000));
    std::printf("%s piao end\n", name.c_str());
}

}  // namespace

int main() {
    // One line at a time even into a pipe, so the children's lines do not come out in a lump.
    std::setvbuf(stdout, nullptr, _IOLBF, 0);

    // Process is neither copyable nor movable (it owns a child): a deque keeps each in place.
    std::deque<mp::Process> ps;
    for (const char* name : {"egon", "alex", "wupeiqi", "yuanhao"}) {
        ps.emplace_back(piao, std::string(name));  // Process(target=piao, args=(name,))
        ps.back().start();
    }
    std::printf("主\n");  // printed at once: start() does not wait for the child

    for (auto& p : ps) p.join();
    std::printf("主: all %zu children joined\n", ps.size());
}
