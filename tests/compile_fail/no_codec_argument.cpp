// Must not compile: an argument type with no codec, inside a container. The error names the
// element type (Reading), not only the vector, and lists the three ways to give it a codec.
#include <mp/futures.hpp>

#include <string>
#include <vector>

struct Reading {
    std::string sensor;  // not trivially copyable, no cereal serialize(), no Codec
    double celsius = 0;
};

double mean(const std::vector<Reading>& rs) { return rs.empty() ? 0.0 : rs.front().celsius; }

int main() {
    mp::ProcessPoolExecutor ex;
    auto r = ex.submit(mean, std::vector<Reading>{});
    (void)r;
}
