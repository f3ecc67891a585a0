// Lesson 6: who am I, who is my parent, and what a Process object tells about its child.
//
// The Python original:
//
//     def task():
//         print('child : pid %s, ppid %s' % (os.getpid(), os.getppid()))
//         print(current_process().name, parent_process().name)
//
//     if __name__ == '__main__':
//         p = Process(target=task)
//         print(p.name, p.pid, p.exitcode, p.is_alive())   # Process-1 None None False
//         p.start(); p.join()
//         print(p.pid, p.exitcode, p.is_alive())           # 12345 0 False
//
//         q = Process(target=time.sleep, args=(60,)); q.start()
//         q.terminate()
//         print(q.is_alive())                              # usually still True
//         q.join()
//         print(q.exitcode)                                # -15: ended by SIGTERM
//
// Python says None where C++ has an empty std::optional (exitcode) or 0 (pid before start).

#include <mp/process.hpp>

#include <chrono>
#include <cstdio>
#include <optional>
#include <string>
#include <thread>
#include <unistd.h>

namespace {

using namespace std::chrono_literals;

// Python's spelling of an empty optional.
std::string show(const std::optional<int>& v) { return v ? std::to_string(*v) : "None"; }

const char* yes_no(bool b) { return b ? "True" : "False"; }

void who_am_i(const char* where) {
    const auto& me = mp::current_process();
    const auto parent = mp::parent_process();
    std::printf("%-6s: getpid() %d, getppid() %d | current_process(): name %s, pid %d | "
                "parent_process(): %s\n",
                where, static_cast<int>(::getpid()), static_cast<int>(::getppid()),
                me.name.c_str(), static_cast<int>(me.pid),
                parent ? (parent->name + ", pid " + std::to_string(parent->pid)).c_str()
                       : "None (not started by mp)");
}

void task() { who_am_i("child"); }

void sleeper() { std::this_thread::sleep_for(60s); }

}  // namespace

int main() {
    std::setvbuf(stdout, nullptr, _IOLBF, 0);  // one line at a time, even into a pipe

    who_am_i("parent");

    mp::Process p(task);
    std::printf("before start: name %s, pid %d, exitcode %s, is_alive %s\n", p.name().c_str(),
                static_cast<int>(p.pid()), show(p.exitcode()).c_str(), yes_no(p.is_alive()));
    p.start();
    std::printf("after start : pid %d, is_alive %s\n", static_cast<int>(p.pid()),
                yes_no(p.is_alive()));
    p.join();
    std::printf("after join  : pid %d, exitcode %s, is_alive %s\n", static_cast<int>(p.pid()),
                show(p.exitcode()).c_str(), yes_no(p.is_alive()));

    // terminate() sends SIGTERM and returns at once; the child is gone only after join().
    mp::Process q({.name = "sleeper"}, sleeper);
    q.start();
    std::this_thread::sleep_for(100ms);
    std::printf("%s sleeps for 60 s: pid %d, is_alive %s, exitcode %s\n", q.name().c_str(),
                static_cast<int>(q.pid()), yes_no(q.is_alive()), show(q.exitcode()).c_str());
    q.terminate();
    std::printf("right after terminate(): is_alive %s (usually True: the signal takes a moment)\n",
                yes_no(q.is_alive()));
    q.join();
    std::printf("after terminate() and join(): is_alive %s, exitcode %s (-15: ended by SIGTERM)\n",
                yes_no(q.is_alive()), show(q.exitcode()).c_str());
}
