// Lesson 2: the same work, written as a subclass of Process that overrides run().
//
// The Python original:
//
//     class Piao(Process):
//         def __init__(self, name):
//             super().__init__()
//             self.name = name
//         def run(self):
//             print('%s piaoing' % self.name)
//             time.sleep(random.randrange(1, 4))
//             print('%s piao end' % self.name)
//
//     if __name__ == '__main__':
//         p = Piao('egon'); p.start()     # start() calls run() in the child
//         print('主')
//
// start() forks, and the child calls the virtual run(); the parent never calls run() itself.
// (A subclass runs under the fork start method: the child is a copy of this object.)

#include <mp/process.hpp>

#include <chrono>
#include <cstdio>
#include <memory>
#include <random>
#include <string>
#include <thread>
#include <vector>

namespace {

class Piao : public mp::Process {
public:
    // The name goes to Process, as `self.name = name` does in Python.
    explicit Piao(std::string name) : mp::Process({.name = std::move(name)}) {}

protected:
    // Runs in the child only.
    void run() override {
        std::printf("%s piaoing\n", name().c_str());
        std::mt19937 gen(std::random_device{}());  // seeded in the child: see lesson 1
        std::this_thread::sleep_for(
            std::chrono::milliseconds(std::uniform_int_distribution<int>(1000, 3000)(gen)));
        std::printf("%s piao end\n", name().c_str());
    }
};

}  // namespace

int main() {
    std::setvbuf(stdout, nullptr, _IOLBF, 0);  // one line at a time, even into a pipe

    std::vector<std::unique_ptr<Piao>> ps;
    for (const char* name : {"egon", "alex", "wupeiqi", "yuanhao"}) {
        ps.push_back(std::make_unique<Piao>(name));
        ps.back()->start();
    }
    std::printf("主\n");

    for (auto& p : ps) p->join();
    std::printf("主: all %zu children joined\n", ps.size());
}
