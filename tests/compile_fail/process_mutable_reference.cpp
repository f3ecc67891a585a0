// Must not compile: a Process target that takes a non-const lvalue reference to a value: the
// child (forked or started by the forkserver) changes only its own copy.
#include <mp/process.hpp>

#include <string>

void append(std::string& s) { s += "!"; }

int main() {
    std::string text = "hello";
    mp::Process p(append, text);
    p.start();
    p.join();
}
