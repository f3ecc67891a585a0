// Must not compile: a capturing lambda cannot be sent to another process. The build's test
// checks that the compiler's message tells the user to pass the captured values as arguments.
#include <mp/detail/task.hpp>

int main() {
    int captured = 7;
    auto task = mp::detail::make_transferable_task([captured](int x) { return x * captured; }, 3);
    (void)task;
}
