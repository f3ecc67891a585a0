// Must not compile: a capturing lambda cannot be sent to a pool worker. The build's test checks
// that the one error tells the user to pass the captured values as arguments and names the lambda.
#include <mp/pool.hpp>

#include <vector>

int main() {
    mp::Pool pool(2);
    int factor = 7;
    std::vector<int> xs{1, 2, 3};
    auto ys = pool.map([factor](int x) { return x * factor; }, xs);
    (void)ys;
}
