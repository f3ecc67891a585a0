// SharedMemoryManager: the segments are made in the client (as Python's), and their names kept
// by a tracker object in the server, which unlinks them when asked at shutdown or when it goes.

#include <string>
#include <system_error>
#include <utility>
#include <vector>

#include "manager_internal.hpp"
#include "mp/managers.hpp"

namespace mp {
namespace detail::managers {

namespace {

struct SegmentTracker {
    std::vector<std::string> names;
    SegmentTracker() = default;
    SegmentTracker(const SegmentTracker&) = delete;
    SegmentTracker& operator=(const SegmentTracker&) = delete;
    ~SegmentTracker() { unlink_all(); }

    void track(const std::string& name) { names.push_back(name); }
    std::vector<std::string> list() const { return names; }
    // A segment someone unlinked already (ENOENT) is not an error: it is gone either way.
    void unlink_all() noexcept {
        for (const std::string& n : std::exchange(names, {})) {
            try {
                SharedMemory(n, false, 0, false).unlink();
            } catch (...) {
            }
        }
    }
};

}  // namespace

TypeEntry segment_tracker_entry() {
    using S = SegmentTracker;
    TypeEntry t;
    t.make = make_servant<S>;
    t.methods = {{"track", make_method(&S::track)},
                 {"list", make_method(&S::list)},
                 {"unlink_all", make_method(&S::unlink_all)}};
    return t;
}

}  // namespace detail::managers

SharedMemoryManager::SharedMemoryManager() : BaseManager() { start(); }

SharedMemoryManager::~SharedMemoryManager() {
    try {
        shutdown();
    } catch (...) {
    }
}

BaseProxy SharedMemoryManager::tracker() {
    if (!tracker_) tracker_ = create("SegmentTracker");
    return tracker_;
}

mp::SharedMemory SharedMemoryManager::SharedMemory(std::size_t size) {
    BaseProxy t = tracker();
    mp::SharedMemory shm(std::nullopt, true, size, false);
    try {
        t.call("track", shm.name());
    } catch (...) {
        shm.unlink();
        throw;
    }
    return shm;
}

mp::ShareableList SharedMemoryManager::ShareableList(const std::vector<mp::ShareableList::Item>& items) {
    BaseProxy t = tracker();
    mp::ShareableList l(items, std::nullopt, false);
    try {
        t.call("track", l.shm().name());
    } catch (...) {
        l.shm().unlink();
        throw;
    }
    return l;
}

std::vector<std::string> SharedMemoryManager::segments() {
    return tracker().call<std::vector<std::string>>("list");
}

void SharedMemoryManager::shutdown() {
    if (tracker_) {
        try {
            tracker_.call("unlink_all");
        } catch (...) {
            // The server is gone (killed): its segments are left, as documented.
        }
        tracker_ = BaseProxy();  // its decref goes before the server stops
    }
    BaseManager::shutdown();
}

}  // namespace mp
