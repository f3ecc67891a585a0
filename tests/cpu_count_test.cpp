// cpu_count() honours a cgroup CPU quota: a child moved into a cgroup limited to one CPU counts
// one, even where its affinity mask allows more.
#include <gtest/gtest.h>

#include <cstring>
#include <fstream>
#include <sched.h>
#include <sstream>
#include <string>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include "mp/process.hpp"
#include "sys/fd.hpp"

namespace {

// The directory of this process's cgroup in the v1 hierarchy holding the cpu controller, or in
// the v2 hierarchy; empty when neither is mounted.
struct Hierarchy {
    std::string dir;
    bool v2 = false;
};

Hierarchy own_cpu_cgroup() {
    std::ifstream mi("/proc/self/mountinfo");
    std::string line, v1_point, v2_point;
    while (std::getline(mi, line)) {
        std::istringstream in(line);
        std::string id, parent, dev, root, point, opts, field, fstype, source, super;
        in >> id >> parent >> dev >> root >> point >> opts;
        while (in >> field && field != "-") {
        }
        in >> fstype >> source >> super;
        if (root != "/") continue;  // a bind of part of a hierarchy: paths would not line up
        if (fstype == "cgroup2" && v2_point.empty()) v2_point = point;
        if (fstype == "cgroup" && ("," + super + ",").find(",cpu,") != std::string::npos)
            v1_point = point;
    }
    std::ifstream cg("/proc/self/cgroup");
    while (std::getline(cg, line)) {
        auto a = line.find(':'), b = line.find(':', a + 1);
        std::string controllers = line.substr(a + 1, b - a - 1), path = line.substr(b + 1);
        if (path == "/") path.clear();
        if (!v1_point.empty() && ("," + controllers + ",").find(",cpu,") != std::string::npos)
            return {v1_point + path, false};
        if (controllers.empty() && !v2_point.empty() && v1_point.empty()) return {v2_point + path, true};
    }
    return {};
}

bool write_file(const std::string& path, const std::string& text) {
    std::ofstream f(path);
    f << text;
    f.flush();
    return static_cast<bool>(f);
}

}  // namespace

TEST(CpuCount, HonoursACgroupCpuQuota) {
    cpu_set_t set;
    ASSERT_EQ(::sched_getaffinity(0, sizeof set, &set), 0);
    if (CPU_COUNT(&set) < 2) GTEST_SKIP() << "needs at least 2 CPUs to tell a quota of 1 apart";
    Hierarchy h = own_cpu_cgroup();
    if (h.dir.empty()) GTEST_SKIP() << "no cgroup hierarchy with the cpu controller is mounted";
    const std::string cg = h.dir + "/mp_cpu_count_test_" + std::to_string(::getpid());
    if (::mkdir(cg.c_str(), 0755) != 0)
        GTEST_SKIP() << "cannot create a cgroup here (" << std::strerror(errno) << ")";
    const bool limited = h.v2 ? write_file(cg + "/cpu.max", "100000 100000")
                              : write_file(cg + "/cpu.cfs_period_us", "100000") &&
                                    write_file(cg + "/cpu.cfs_quota_us", "100000");
    if (!limited) {
        ::rmdir(cg.c_str());
        GTEST_SKIP() << "cannot set a CPU quota on " << cg;
    }

    auto [go_r, go_w] = mp::sys::make_pipe();
    auto [res_r, res_w] = mp::sys::make_pipe();
    pid_t pid = ::fork();
    if (pid == 0) {
        char c;
        if (mp::sys::read_full(go_r.get(), &c, 1) != 1) ::_exit(2);
        int n = mp::cpu_count();
        mp::sys::write_full(res_w.get(), &n, sizeof n);
        ::_exit(0);
    }
    const bool moved = write_file(cg + "/cgroup.procs", std::to_string(pid));
    mp::sys::write_full(go_w.get(), "g", 1);
    res_w.reset();
    int n = -1;
    const std::size_t got = mp::sys::read_full(res_r.get(), &n, sizeof n);
    ASSERT_EQ(::waitpid(pid, nullptr, 0), pid);
    ::rmdir(cg.c_str());
    ASSERT_TRUE(moved) << "could not move the child into " << cg;
    ASSERT_EQ(got, sizeof n);
    EXPECT_EQ(n, 1);
    EXPECT_EQ(mp::cpu_count(), CPU_COUNT(&set));  // the parent is not limited
}
