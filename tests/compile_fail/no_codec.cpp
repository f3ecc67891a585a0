// Must NOT compile: a type with no mp::Codec (not trivially copyable, no cereal serialize(), no
// Codec specialisation) is a compile error whose message says "this type has no codec".
// Checked by ctest (compile_fail.no_codec) with g++ -std=c++20 -fsyntax-only -Iinclude.

#include <string>

#include "mp/serialize.hpp"

struct NoCodecType {
    std::string name;  // not trivially copyable, so not byte-copied either
};

int main() {
    const std::string bytes = mp::encode(NoCodecType{});
    return static_cast<int>(bytes.size());
}
