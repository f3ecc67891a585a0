// Must not compile: the result type of a pool task has no codec (and its result() is used, which
// must not report the same mistake a second time).
#include <mp/pool.hpp>

#include <string>

struct Report {
    std::string text;
};

Report make_report(int n) { return Report{std::to_string(n)}; }

int main() {
    mp::Pool pool(1);
    auto r = pool.apply(make_report, 3);
    (void)r;
}
