// As options.cpp, for mp::mpi (built when the installed mp has the mpi component).
#include <mp/mpi.hpp>

#include <chrono>

using namespace std::chrono_literals;

int main() {
    [[maybe_unused]] mp::mpi::ExecutorOptions first{.isolate_tasks = true};
    [[maybe_unused]] mp::mpi::ExecutorOptions last{.task_timeout = 1s};
}
