// Lesson 5: a daemon child ends with its parent; a non-daemon child is waited for.
//
// The Python original:
//
//     def foo():                       # the daemon: would run for a long time
//         while True:
//             print('daemon: tick'); time.sleep(0.2)
//
//     def bar():                       # an ordinary child: finishes its work
//         print(456); time.sleep(1.5); print('end456')
//
//     if __name__ == '__main__':
//         p1 = Process(target=foo, daemon=True)
//         p2 = Process(target=bar)
//         p1.start(); p2.start()
//         time.sleep(0.7)
//         print('main-------')
//
// When main is over, Python terminates the daemons first, then joins the other children: the
// ticks stop right after "main-------", and "end456" still comes, about a second later.
//
// In C++ the Process objects say the same at the end of their scope: destroying a running
// daemon terminates it, destroying a running non-daemon joins it. Objects are destroyed in the
// reverse order of their declaration, so `worker` (the non-daemon) is declared first and
// `ticker` (the daemon) second: the daemon is stopped at once, then the worker is waited for.
// (Declared the other way round, the daemon would tick on until the worker had finished.)

#include <mp/process.hpp>

#include <chrono>
#include <cstdio>
#include <thread>

namespace {

using namespace std::chrono_literals;

void tick() {
    for (int i = 1; i <= 300; ++i) {  // a minute of ticks if nobody stopped it
        std::printf("  daemon: tick %d\n", i);
        std::this_thread::sleep_for(200ms);
    }
    std::printf("  daemon: done (never printed: the daemon is stopped before)\n");
}

void work() {
    std::printf("  worker: 456, working for 1.5 s\n");
    std::this_thread::sleep_for(1500ms);
    std::printf("  worker: end456 (the non-daemon child finished its work)\n");
}

}  // namespace

int main() {
    std::setvbuf(stdout, nullptr, _IOLBF, 0);  // one line at a time, even into a pipe

    mp::Process worker({.name = "worker"}, work);                 // destroyed last: joined
    mp::Process ticker({.name = "ticker", .daemon = true}, tick);  // destroyed first: terminated
    ticker.start();
    worker.start();

    std::this_thread::sleep_for(700ms);
    std::printf("main-------: main is over; the daemon is stopped now, the worker is waited for\n");
}
