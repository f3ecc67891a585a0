// Lesson 15: a dict kept by a Manager and updated by several processes.
//
// The Python original:
//
//     def work(d, lock, name, n):
//         for _ in range(n):
//             with lock:
//                 d['total'] = d['total'] + 1
//         d[name] = n
//
//     if __name__ == '__main__':
//         with Manager() as manager:
//             d = manager.dict({'total': 0})
//             lock = manager.Lock()
//             ps = [Process(target=work, args=(d, lock, f'worker-{i}', 100 * (i + 1)))
//                   for i in range(4)]
//             for p in ps: p.start()
//             for p in ps: p.join()
//             print(sorted(d.items()))
//
// The dict lives in the manager's server process; each d.get/d.set is one request to it and is
// atomic there. A read followed by a write is two requests, so the increment takes the
// manager's Lock: without it two workers could read the same total and one update would be
// lost. The proxies d and lock pass to the children like any other argument.

#include <mp/managers.hpp>
#include <mp/process.hpp>

#include <algorithm>
#include <cstdio>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

namespace {

void work(mp::DictProxy<std::string, int> d, mp::LockProxy lock, std::string name, int n) {
    for (int i = 0; i < n; ++i) {
        std::lock_guard guard(lock);
        d.set("total", d.get("total") + 1);
    }
    d.set(name, n);
}

}  // namespace

int main() {
    mp::Manager manager;
    auto d = manager.dict<std::string, int>({{"total", 0}});
    auto lock = manager.Lock();

    std::vector<std::unique_ptr<mp::Process>> ps;
    for (int i = 0; i < 4; ++i)
        ps.push_back(std::make_unique<mp::Process>(work, d, lock, "worker-" + std::to_string(i),
                                                   100 * (i + 1)));
    for (auto& p : ps) p->start();
    for (auto& p : ps) p->join();

    auto items = d.items();
    std::sort(items.begin(), items.end());
    std::printf("[");
    for (std::size_t i = 0; i < items.size(); ++i)
        std::printf("%s('%s', %d)", i ? ", " : "", items[i].first.c_str(), items[i].second);
    std::printf("]\n");
    std::printf("total = %d (100 + 200 + 300 + 400: no update lost)\n", d.get("total"));
}
