#pragma once
// Sending an object through its Codec without another process: for tests of what a receiver
// gets.

#include <fcntl.h>
#include <unistd.h>

#include <vector>

#include "mp/serialize.hpp"

namespace mp::test {

/// `v` sent as a Codec would send it to another process (its descriptors duplicated, as
/// SCM_RIGHTS does) and decoded in this one.
template <class V>
V receive_here(const V& v) {
    mp::Encoder e;
    e.put(v);
    std::vector<int> fds;
    for (int fd : e.fds()) fds.push_back(::fcntl(fd, F_DUPFD_CLOEXEC, 0));
    mp::Decoder d(e.bytes(), fds);
    V out = d.get<V>();
    d.finish();
    for (int fd : fds)
        if (fd >= 0) ::close(fd);
    return out;
}

}  // namespace mp::test
