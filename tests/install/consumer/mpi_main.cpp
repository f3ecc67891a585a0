// Built (not run: that needs mpirun) against mp::mpi from find_package(mp COMPONENTS mpi).
#include <mp/mpi.hpp>

static int square(int x) { return x * x; }

int main(int argc, char** argv) {
    return mp::mpi::run(argc, argv, [] {
        mp::mpi::Executor ex;
        return ex.submit(square, 7).result() == 49 ? 0 : 1;
    });
}
