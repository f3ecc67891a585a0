// Must not compile: a std::function may hold state, so it cannot be sent to a pool worker.
#include <mp/futures.hpp>

#include <functional>

int twice(int x) { return 2 * x; }

int main() {
    mp::ProcessPoolExecutor ex;
    std::function<int(int)> f = twice;
    auto r = ex.submit(f, 21);
    (void)r;
}
