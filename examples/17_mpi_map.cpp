// Lesson 17: more than one machine: the executor over MPI ranks (mp::mpi, built when CMake
// finds MPI).
//
// The Python original (mpi4py.futures):
//
//     from mpi4py.futures import MPIPoolExecutor
//
//     def count_primes(lo, hi):
//         return sum(is_prime(n) for n in range(lo, hi))
//
//     if __name__ == '__main__':
//         with MPIPoolExecutor() as ex:
//             blocks = range(0, 2_000_000, 50_000)
//             print(sum(ex.map(count_primes, blocks, [b + 50_000 for b in blocks], chunksize=4)))
//
//     $ mpiexec -n 3 python -m mpi4py.futures primes.py
//
// Here every rank runs this program: rank 0 runs the lambda given to mp::mpi::run, the other
// ranks serve its tasks, then all of them leave. On one machine:
//
//     mpirun -n 3 ./17_mpi_map                       # add --oversubscribe past the core count
//
// On several, with the same binary at the same path on each (a shared directory, or copied):
//
//     mpirun --hostfile hosts -n 16 ./17_mpi_map     # hosts: "node1 slots=8" per line
//
// Each block's answer says which rank and host counted it, so the output shows the work spread
// over the worker ranks (rank 0 only hands out work and collects results).

#include <mp/mpi.hpp>

#include <cstdio>
#include <map>
#include <string>
#include <tuple>
#include <unistd.h>
#include <vector>

#include <mpi.h>

namespace {

bool is_prime(long n) {
    if (n < 2) return false;
    for (long d = 2; d * d <= n; ++d)
        if (n % d == 0) return false;
    return true;
}

// The primes in [lo, hi), and who counted them.
std::tuple<long, int, std::string> count_primes(long lo, long hi) {
    long count = 0;
    for (long n = lo; n < hi; ++n) count += is_prime(n);
    int rank = 0;
    MPI_Comm_rank(MPI_COMM_WORLD, &rank);
    char host[256] = {};
    ::gethostname(host, sizeof host - 1);
    return {count, rank, host};
}

}  // namespace

int main(int argc, char** argv) {
    return mp::mpi::run(argc, argv, [] {
        mp::mpi::Executor ex;
        std::printf("rank 0 hands out work to %d worker ranks\n", ex.max_workers());
        std::vector<long> los, his;
        for (long lo = 0; lo < 2'000'000; lo += 50'000) {
            los.push_back(lo);
            his.push_back(lo + 50'000);
        }
        long total = 0;
        std::map<std::string, int> blocks_by_worker;
        for (const auto& [count, rank, host] : ex.map({.chunksize = 4}, count_primes, los, his)) {
            total += count;
            ++blocks_by_worker["rank " + std::to_string(rank) + " on " + host];
        }
        std::printf("primes below 2,000,000: %ld (expected 148933)\n", total);
        for (const auto& [who, n] : blocks_by_worker) std::printf("  %s counted %d blocks\n", who.c_str(), n);
        return total == 148933 ? 0 : 1;
    });
}
