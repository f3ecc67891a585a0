// libFuzzer target: mp::py::loads, the pickle reader that takes pickles from Python peers.
// Whatever the input, loads returns an Object or throws mp::py::UnpicklingError: no crash, no
// hang, no leak (a refused recursive value must free its cycle), no sanitizer report. And what it
// accepts survives the way back: dumps(o) reads back to the same value (compared by repr, since
// a float NaN is not equal to itself).

#include <mp/py.hpp>

#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <string>
#include <string_view>

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
    mp::py::Limits limits;
    limits.max_size = 1 << 20;  // the fuzzer's inputs are small; keep expansions small too
    limits.max_depth = 200;
    mp::py::Object o;
    try {
        o = mp::py::loads(std::string_view(reinterpret_cast<const char*>(data), size), limits);
    } catch (const mp::py::UnpicklingError&) {
        return 0;
    }
    const std::string repr = o.repr();
    const std::string again = mp::py::dumps(o);
    mp::py::Limits roomy = limits;
    roomy.max_size = std::size_t{1} << 30;  // an accepted value's own pickle has no sharing: it is bigger
    if (mp::py::loads(again, roomy).repr() != repr) std::abort();
    return 0;
}
