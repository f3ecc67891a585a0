#pragma once
// Sending an object through its Codec without another process: for tests of what a receiver
// gets.

#include <fcntl.h>
#include <unistd.h>

#include <stdexcept>
#include <string>
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

/// A value a worker encodes but no process can decode (its load() throws): a result that
/// arrives and fails to decode in the caller.
struct FailsToLoad {
    int x = 0;
    template <class A>
    void save(A& a) const {
        a(x);
    }
    template <class A>
    void load(A& a) {
        a(x);
        throw std::runtime_error("FailsToLoad: cannot load " + std::to_string(x));
    }
};

inline FailsToLoad make_fails_to_load(int x) { return {x}; }

}  // namespace mp::test
