// Links the plugin (which links mp::mp PUBLIC): a fork and a spawn child through it.
#include <cstdio>

extern "C" int mp_plugin_start(int spawn, int code);

int main() {
    const int forked = mp_plugin_start(0, 44);
    const int spawned = mp_plugin_start(1, 45);
    std::printf("plugin fork %d spawn %d\n", forked, spawned);
    return forked == 44 && spawned == 45 ? 0 : 1;
}
