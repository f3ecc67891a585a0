#pragma once
// The command line every workload program of bench/run.py takes after the workload's id:
//     <program> <workload> [--size N] [--quick]

#include <cstdlib>
#include <string_view>

namespace mp_bench {

struct WorkloadArgs {
    bool quick = false;
    long long size = -1;  // -1: the workload's own size (full or quick)
};

/// Parses argv[2..]; false on anything it does not know (the caller prints its usage).
inline bool parse_workload_args(int argc, char** argv, WorkloadArgs& out) {
    for (int i = 2; i < argc; ++i) {
        const std::string_view a = argv[i];
        if (a == "--quick")
            out.quick = true;
        else if (a == "--size" && i + 1 < argc)
            out.size = std::atoll(argv[++i]);
        else
            return false;
    }
    return true;
}

}  // namespace mp_bench
