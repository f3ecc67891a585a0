// libFuzzer target: mp::py::loads, the pickle reader that takes pickles from Python peers.
// Whatever the input, loads returns an Object or throws mp::py::UnpicklingError: no crash, no
// hang, no leak (a refused recursive value must free its cycle), no sanitizer report. And what it
// accepts survives the way back: dumps(o) reads back to the same value (compared by repr, since
// a float NaN is not equal to itself). And the typed reads agree with the full reader.

#include <mp/py.hpp>

#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <map>
#include <optional>
#include <set>
#include <string>
#include <string_view>
#include <tuple>
#include <utility>
#include <vector>

namespace {

// loads<T> (its fast reader, where the input is in its subset) must read exactly what the full
// reader reads: the same value, or an UnpicklingError from both.
template <class T>
void same_as_full_reader(std::string_view in, const mp::py::Limits& limits) {
    std::optional<T> full, fast;
    try {
        full = mp::py::detail::load<T>(mp::py::loads(in, limits));
    } catch (const mp::py::UnpicklingError&) {
    }
    try {
        fast = mp::py::loads<T>(in, limits);
    } catch (const mp::py::UnpicklingError&) {
    }
    if (full.has_value() != fast.has_value() || (full && !(*full == *fast))) std::abort();
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
    mp::py::Limits limits;
    limits.max_size = 1 << 20;  // the fuzzer's inputs are small; keep expansions small too
    limits.max_depth = 200;
    const std::string_view in(reinterpret_cast<const char*>(data), size);
    same_as_full_reader<std::map<std::string, std::int64_t>>(in, limits);
    same_as_full_reader<std::vector<std::tuple<int, std::string, std::optional<std::int64_t>>>>(in, limits);
    same_as_full_reader<std::map<std::pair<int, std::string>, std::set<std::string>>>(in, limits);
    same_as_full_reader<std::vector<std::vector<mp::py::Bytes>>>(in, limits);
    // A dict read as its pairs, with repeated keys merged as Python's dict merges them.
    same_as_full_reader<std::vector<std::pair<std::string, std::int64_t>>>(in, limits);
    same_as_full_reader<std::vector<std::pair<std::pair<int, std::string>, std::vector<std::pair<double, mp::py::Bytes>>>>>(in, limits);
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
