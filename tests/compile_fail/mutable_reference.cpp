// Must not compile: the task takes a non-const lvalue reference to a value, so the worker would
// fill its own copy and the caller would never see it. (A reference to an mp handle, such as
// mp::Queue<int>&, stays allowed: see callable_test.)
#include <mp/futures.hpp>

#include <vector>

void fill(std::vector<int>& v) { v.assign(10, 1); }

int main() {
    mp::ProcessPoolExecutor ex;
    std::vector<int> data;
    ex.submit(fill, data).result();
}
