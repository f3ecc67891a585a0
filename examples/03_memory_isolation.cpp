// Lesson 3: processes do not share memory. The child works on its own copy of every variable.
//
// The Python original:
//
//     n = 100
//     def work():
//         global n
//         n = 0
//         print('子进程内: ', n)
//
//     if __name__ == '__main__':
//         p = Process(target=work)
//         p.start()
//         p.join()
//         print('主进程内: ', n)
//
// The child prints 0; after join the parent still prints 100. (To share data on purpose, use a
// Queue, a Pipe, a Value or a Manager.)

#include <mp/process.hpp>

#include <cstdio>

namespace {

int n = 100;  // a global, as in the Python lesson

void work() {
    n = 0;  // changes the child's copy only
    std::printf("子进程内 (in the child): n = %d\n", n);
}

}  // namespace

int main() {
    std::setvbuf(stdout, nullptr, _IOLBF, 0);  // one line at a time, even into a pipe

    mp::Process p(work);
    p.start();
    p.join();
    std::printf("主进程内 (in the parent, after join): n = %d\n", n);
}
