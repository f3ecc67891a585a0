// A host that knows nothing of mp, as Python's ctypes or any plugin loader: dlopen's the plugin
// (linked with mp::mp PRIVATE) with RTLD_NOW and starts a fork child through it.
#include <dlfcn.h>

#include <cstdio>

int main(int argc, char** argv) {
    if (argc < 2) return 2;
    void* h = ::dlopen(argv[1], RTLD_NOW | RTLD_LOCAL);
    if (h == nullptr) {
        std::printf("dlopen: %s\n", ::dlerror());
        return 1;
    }
    using Start = int (*)(int, int);
    auto start = reinterpret_cast<Start>(::dlsym(h, "mp_plugin_start"));
    if (start == nullptr) return 1;
    const int forked = start(0, 46);
    std::printf("host fork %d\n", forked);
    return forked == 46 ? 0 : 1;
}
