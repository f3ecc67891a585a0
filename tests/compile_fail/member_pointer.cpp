// Must not compile: a pointer to member function cannot be sent to a pool worker; the error says
// to wrap the call in a free function or a captureless lambda that takes the object.
#include <mp/futures.hpp>

struct Widget {
    int scale(int x) const { return x * k; }
    int k = 3;
};

int main() {
    mp::ProcessPoolExecutor ex;
    auto r = ex.submit(&Widget::scale, Widget{}, 2);
    (void)r;
}
