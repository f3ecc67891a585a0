// Microbenchmarks for mp::py (issue 15, W12a's decode half): reading the pickle Python's
// multiprocessing sends for a dict of 10 str -> int entries (protocol 4, as conn.send writes it),
// as a dynamic py::Object, as a std::map and as a vector of pairs; and writing the list the C++
// side answers with.
// Python's own figure for the same bytes: python3 -m timeit -s "import pickle;
// p = pickle.dumps({'key%d' % i: i for i in range(10)})" "pickle.loads(p)".

#include <benchmark/benchmark.h>

#include <map>
#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "mp/py.hpp"

namespace {

// pickle.dumps({'key%d' % i: i for i in range(10)}) from CPython 3.11 (protocol 4), byte for byte.
std::string python_dict_pickle() {
    std::string p = "\x80\x04\x95";
    std::string body = "}\x94(";
    for (int i = 0; i < 10; ++i) {
        const std::string key = "key" + std::to_string(i);
        body += "\x8c";
        body.push_back(static_cast<char>(key.size()));
        body += key;
        body += "\x94K";
        body.push_back(static_cast<char>(i));
    }
    body += "u.";
    for (int k = 0; k < 8; ++k) p.push_back(static_cast<char>((body.size() >> (8 * k)) & 0xff));
    return p + body;
}

void BM_PyLoadsDict10Object(benchmark::State& state) {
    const std::string p = python_dict_pickle();
    for (auto _ : state) benchmark::DoNotOptimize(mp::py::loads(p));
}
BENCHMARK(BM_PyLoadsDict10Object);

void BM_PyLoadsDict10Map(benchmark::State& state) {
    const std::string p = python_dict_pickle();
    for (auto _ : state) benchmark::DoNotOptimize(mp::py::loads<std::map<std::string, int>>(p));
}
BENCHMARK(BM_PyLoadsDict10Map);

void BM_PyLoadsDict10Pairs(benchmark::State& state) {
    const std::string p = python_dict_pickle();
    for (auto _ : state)
        benchmark::DoNotOptimize(mp::py::loads<std::vector<std::pair<std::string, std::int64_t>>>(p));
}
BENCHMARK(BM_PyLoadsDict10Pairs);

void BM_PyDumpsList10(benchmark::State& state) {
    const std::vector<int> v{0, 1, 2, 3, 4, 5, 6, 7, 8, 9};
    for (auto _ : state) benchmark::DoNotOptimize(mp::py::dumps(v));
}
BENCHMARK(BM_PyDumpsList10);

}  // namespace
