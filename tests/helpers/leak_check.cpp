#include "helpers/leak_check.hpp"

#include <algorithm>
#include <cerrno>
#include <climits>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <dirent.h>
#include <fcntl.h>
#include <fstream>
#include <linux/inet_diag.h>
#include <linux/netlink.h>
#include <linux/rtnetlink.h>
#include <linux/sock_diag.h>
#include <linux/unix_diag.h>
#include <map>
#include <optional>
#include <poll.h>
#include <sstream>
#include <sys/socket.h>
#include <sys/stat.h>
#include <thread>
#include <unistd.h>

namespace mp::test {
namespace {

std::string read_text(const std::string& path) {
    std::ifstream in(path, std::ios::binary);
    if (!in) return {};
    std::ostringstream s;
    s << in.rdbuf();
    return s.str();
}

std::string read_link(const std::string& path) {
    char buf[PATH_MAX];
    ssize_t n = ::readlink(path.c_str(), buf, sizeof buf - 1);
    if (n < 0) return "?";
    return std::string(buf, static_cast<std::size_t>(n));
}

std::optional<long> to_number(const char* s) {
    if (s == nullptr || *s == '\0') return std::nullopt;
    char* end = nullptr;
    errno = 0;
    long v = std::strtol(s, &end, 10);
    if (errno != 0 || *end != '\0') return std::nullopt;
    return v;
}

/// Names of a directory's entries that are numbers (pids, fds, tids).
std::vector<long> numeric_entries(const std::string& dir) {
    std::vector<long> out;
    DIR* d = ::opendir(dir.c_str());
    if (d == nullptr) return out;
    while (dirent* e = ::readdir(d)) {
        if (auto v = to_number(e->d_name)) out.push_back(*v);
    }
    ::closedir(d);
    return out;
}

/// "/proc/PID/stat" gives the state and the parent; the comm field may hold spaces and
/// parentheses, so parse after the last ')'.
bool parse_stat(pid_t pid, char& state, pid_t& ppid) {
    std::string s = read_text("/proc/" + std::to_string(pid) + "/stat");
    auto close = s.rfind(')');
    if (close == std::string::npos || close + 2 >= s.size()) return false;
    std::istringstream in(s.substr(close + 2));
    long parent = 0;
    if (!(in >> state >> parent)) return false;
    ppid = static_cast<pid_t>(parent);
    return true;
}

bool have_children_files() {
    static const bool have = [] {
        std::string path = "/proc/self/task/" + std::to_string(::gettid()) + "/children";
        return ::access(path.c_str(), R_OK) == 0;
    }();
    return have;
}

/// The fd targets (readlink) of another process, e.g. "socket:[123]".
std::set<std::string> fd_targets_of(pid_t pid) {
    std::set<std::string> out;
    std::string dir = "/proc/" + std::to_string(pid) + "/fd";
    for (long fd : numeric_entries(dir)) out.insert(read_link(dir + "/" + std::to_string(fd)));
    return out;
}

/// The inode in a "socket:[123]" / "pipe:[123]" target.
std::optional<unsigned> inode_of(const std::string& target, const char* kind) {
    std::string prefix = std::string(kind) + ":[";
    if (target.rfind(prefix, 0) != 0 || target.back() != ']') return std::nullopt;
    auto v = to_number(target.substr(prefix.size(), target.size() - prefix.size() - 1).c_str());
    if (!v || *v < 0) return std::nullopt;
    return static_cast<unsigned>(*v);
}

/// The inode of the peer of a Unix socket, asked from the kernel through sock_diag.
std::optional<unsigned> unix_peer_inode(unsigned ino) {
    int s = ::socket(AF_NETLINK, SOCK_DGRAM | SOCK_CLOEXEC, NETLINK_SOCK_DIAG);
    if (s < 0) return std::nullopt;
    struct {
        nlmsghdr nlh;
        unix_diag_req req;
    } msg{};
    msg.nlh.nlmsg_len = sizeof msg;
    msg.nlh.nlmsg_type = SOCK_DIAG_BY_FAMILY;
    msg.nlh.nlmsg_flags = NLM_F_REQUEST;
    msg.req.sdiag_family = AF_UNIX;
    msg.req.udiag_states = ~0U;
    msg.req.udiag_ino = ino;
    msg.req.udiag_show = UDIAG_SHOW_PEER;
    msg.req.udiag_cookie[0] = INET_DIAG_NOCOOKIE;
    msg.req.udiag_cookie[1] = INET_DIAG_NOCOOKIE;
    sockaddr_nl nl{};
    nl.nl_family = AF_NETLINK;
    std::optional<unsigned> peer;
    if (::sendto(s, &msg, sizeof msg, 0, reinterpret_cast<sockaddr*>(&nl), sizeof nl) ==
        static_cast<ssize_t>(sizeof msg)) {
        pollfd pfd{s, POLLIN, 0};
        alignas(nlmsghdr) char buf[8192];
        if (::poll(&pfd, 1, 1000) == 1) {
            ssize_t n = ::recv(s, buf, sizeof buf, 0);
            auto* h = reinterpret_cast<nlmsghdr*>(buf);
            if (n >= static_cast<ssize_t>(sizeof(nlmsghdr)) &&
                NLMSG_OK(h, static_cast<unsigned>(n)) && h->nlmsg_type == SOCK_DIAG_BY_FAMILY) {
                auto* m = static_cast<unix_diag_msg*>(NLMSG_DATA(h));
                auto* a = reinterpret_cast<rtattr*>(m + 1);
                auto len = static_cast<int>(h->nlmsg_len - NLMSG_LENGTH(sizeof *m));
                for (; RTA_OK(a, len); a = RTA_NEXT(a, len)) {
                    if (a->rta_type == UNIX_DIAG_PEER) {
                        unsigned v = 0;
                        std::memcpy(&v, RTA_DATA(a), sizeof v);
                        peer = v;
                    }
                }
            }
        }
    }
    ::close(s);
    return peer;
}

/// The "Pid:" line of /proc/self/fdinfo/N: set for a pidfd.
std::optional<pid_t> pidfd_pid(int fd) {
    std::istringstream in(read_text("/proc/self/fdinfo/" + std::to_string(fd)));
    std::string line;
    while (std::getline(in, line)) {
        if (line.rfind("Pid:", 0) == 0) {
            auto start = line.find_first_not_of(" \t", 4);
            if (start == std::string::npos) return std::nullopt;
            if (auto v = to_number(line.substr(start).c_str())) {
                return static_cast<pid_t>(*v);
            }
        }
    }
    return std::nullopt;
}

/// True when our fd is part of the connection to a forkserver: a pidfd of it, a pipe it holds the
/// other end of, or a socket that it holds or is connected to.
bool belongs_to_forkserver(const FdInfo& f, const std::vector<ProcInfo>& servers,
                           const std::map<pid_t, std::set<std::string>>& server_fds) {
    if (servers.empty()) return false;
    if (auto pid = pidfd_pid(f.fd)) {
        return std::any_of(servers.begin(), servers.end(),
                           [&](const ProcInfo& s) { return s.pid == *pid; });
    }
    auto held_by_server = [&](const std::string& target) {
        for (const auto& [pid, targets] : server_fds) {
            if (targets.count(target) != 0) return true;
        }
        return false;
    };
    if (inode_of(f.target, "pipe")) return held_by_server(f.target);
    if (auto ino = inode_of(f.target, "socket")) {
        if (held_by_server(f.target)) return true;
        if (auto peer = unix_peer_inode(*ino)) {
            return held_by_server("socket:[" + std::to_string(*peer) + "]");
        }
    }
    return false;
}


std::string describe(const ProcInfo& p) {
    std::string s = "pid " + std::to_string(p.pid) + " (state " + p.state + ", comm '" + p.comm +
                    "', cmdline '" + p.cmdline + "')";
    return s;
}

Snapshot g_baseline;

}  // namespace

bool shm_held_elsewhere(const std::string& name) {
    const std::string path = "/dev/shm/" + name;
    const pid_t self = ::getpid();
    for (long p : numeric_entries("/proc")) {
        auto pid = static_cast<pid_t>(p);
        if (pid == self) continue;
        char state = '?';
        pid_t ppid = 0;
        if (!parse_stat(pid, state, ppid) || ppid == self) continue;
        std::string dir = "/proc/" + std::to_string(pid) + "/fd";
        for (long fd : numeric_entries(dir)) {
            if (read_link(dir + "/" + std::to_string(fd)).rfind(path, 0) == 0) return true;
        }
        if (read_text("/proc/" + std::to_string(pid) + "/maps").find(path) != std::string::npos) {
            return true;
        }
    }
    return false;
}

std::vector<FdInfo> list_fds() {
    std::vector<FdInfo> out;
    DIR* d = ::opendir("/proc/self/fd");
    if (d == nullptr) return out;
    const int own = ::dirfd(d);
    while (dirent* e = ::readdir(d)) {
        auto v = to_number(e->d_name);
        if (!v || *v == own) continue;
        FdInfo f;
        f.fd = static_cast<int>(*v);
        f.target = read_link(std::string("/proc/self/fd/") + e->d_name);
        struct stat st {};
        if (::fstat(f.fd, &st) == 0) {
            f.dev = st.st_dev;
            f.ino = st.st_ino;
        }
        out.push_back(std::move(f));
    }
    ::closedir(d);
    std::sort(out.begin(), out.end(), [](const FdInfo& a, const FdInfo& b) { return a.fd < b.fd; });
    return out;
}

std::size_t count_fds() { return list_fds().size(); }

ProcInfo proc_info(pid_t pid) {
    ProcInfo p;
    char state = '?';
    pid_t ppid = 0;
    if (!parse_stat(pid, state, ppid)) return p;
    p.pid = pid;
    p.ppid = ppid;
    p.state = state;
    const std::string dir = "/proc/" + std::to_string(pid);
    p.comm = read_text(dir + "/comm");
    if (!p.comm.empty() && p.comm.back() == '\n') p.comm.pop_back();
    p.cmdline = read_text(dir + "/cmdline");
    while (!p.cmdline.empty() && p.cmdline.back() == '\0') p.cmdline.pop_back();
    std::replace(p.cmdline.begin(), p.cmdline.end(), '\0', ' ');
    return p;
}

std::vector<ProcInfo> list_children(pid_t parent) {
    std::set<pid_t> pids;
    if (have_children_files()) {
        const std::string tasks = "/proc/" + std::to_string(parent) + "/task";
        for (long tid : numeric_entries(tasks)) {
            std::istringstream in(read_text(tasks + "/" + std::to_string(tid) + "/children"));
            long pid = 0;
            while (in >> pid) pids.insert(static_cast<pid_t>(pid));
        }
    } else {
        // Without CONFIG_PROC_CHILDREN: every process whose parent is `parent`.
        for (long p : numeric_entries("/proc")) {
            char state = '?';
            pid_t ppid = 0;
            if (parse_stat(static_cast<pid_t>(p), state, ppid) && ppid == parent) {
                pids.insert(static_cast<pid_t>(p));
            }
        }
    }
    std::vector<ProcInfo> out;
    for (pid_t pid : pids) {
        ProcInfo p = proc_info(pid);
        if (p.pid != 0 && p.ppid == parent) out.push_back(std::move(p));
    }
    return out;
}

std::vector<ProcInfo> list_children() { return list_children(::getpid()); }

bool pid_exists(pid_t pid) { return proc_info(pid).pid != 0; }

bool pid_running(pid_t pid) {
    ProcInfo p = proc_info(pid);
    if (p.pid == 0) return false;
    if (p.state != 'Z' && p.state != 'X') return true;
    // A thread-group leader that ended before its other threads shows 'Z' while they still run
    // (and still hold the process's fds): the process has stopped only when every thread has.
    const std::string tasks = "/proc/" + std::to_string(pid) + "/task";
    for (long tid : numeric_entries(tasks)) {
        std::string st = read_text(tasks + "/" + std::to_string(tid) + "/stat");
        auto close = st.rfind(')');
        if (close != std::string::npos && close + 2 < st.size()) {
            const char state = st[close + 2];
            if (state != 'Z' && state != 'X') return true;
        }
    }
    return false;
}

bool wait_pid_stopped(pid_t pid, std::chrono::milliseconds timeout) {
    auto deadline = std::chrono::steady_clock::now() + timeout;
    while (pid_running(pid)) {
        if (std::chrono::steady_clock::now() >= deadline) return false;
        std::this_thread::sleep_for(std::chrono::milliseconds(5));
    }
    return true;
}

std::set<std::string> list_shm() {
    std::set<std::string> out;
    DIR* d = ::opendir("/dev/shm");
    if (d == nullptr) return out;
    while (dirent* e = ::readdir(d)) {
        std::string n = e->d_name;
        if (n != "." && n != "..") out.insert(std::move(n));
    }
    ::closedir(d);
    return out;
}

bool is_forkserver(const ProcInfo& p) {
    return p.comm == "mp-forkserver" || p.cmdline.find("mp-forkserver") != std::string::npos;
}

std::vector<ProcInfo> all_forkservers() {
    std::vector<ProcInfo> out;
    for (long p : numeric_entries("/proc")) {
        const std::string comm = read_text("/proc/" + std::to_string(p) + "/comm");
        if (comm.rfind("mp-forkserver", 0) != 0) continue;
        ProcInfo info = proc_info(static_cast<pid_t>(p));
        if (info.pid == 0 || info.state == 'Z' || !is_forkserver(info)) continue;
        // The server's children inherit its name: they are not servers.
        if (is_forkserver(proc_info(info.ppid))) continue;
        out.push_back(std::move(info));
    }
    return out;
}

std::vector<ProcInfo> forkservers() {
    // The server may be double-forked (nobody's child), so it is found by its connection to
    // this process: it holds the other end of one of our sockets or pipes.
    std::vector<ProcInfo> out;
    const std::vector<FdInfo> fds = list_fds();
    for (auto& s : all_forkservers()) {
        bool ours = s.ppid == ::getpid();
        if (!ours) {
            const std::vector<ProcInfo> one{s};
            const std::map<pid_t, std::set<std::string>> targets{{s.pid, fd_targets_of(s.pid)}};
            ours = std::any_of(fds.begin(), fds.end(), [&](const FdInfo& f) {
                return belongs_to_forkserver(f, one, targets);
            });
        }
        if (ours) out.push_back(std::move(s));
    }
    return out;
}

Snapshot snapshot() {
    Snapshot s;
    s.fds = list_fds();
    s.children = list_children();
    s.shm = list_shm();
    return s;
}

Snapshot& current_baseline() { return g_baseline; }

void rebaseline() { g_baseline = snapshot(); }

std::string describe_leaks(const Snapshot& base) {
    using namespace std::chrono_literals;
    std::ostringstream report;

    // File descriptors: list them first, before this check opens anything of its own.
    const std::vector<FdInfo> fds = list_fds();
    const std::vector<ProcInfo> servers = forkservers();
    std::map<pid_t, std::set<std::string>> server_fds;
    for (const auto& s : servers) server_fds[s.pid] = fd_targets_of(s.pid);
    std::vector<FdInfo> leaked_fds;
    for (const auto& f : fds) {
        bool known = std::any_of(base.fds.begin(), base.fds.end(), [&](const FdInfo& b) {
            return b.fd == f.fd && (b.target == f.target || (b.ino != 0 && b.dev == f.dev && b.ino == f.ino));
        });
        if (!known && !belongs_to_forkserver(f, servers, server_fds)) leaked_fds.push_back(f);
    }
    if (!leaked_fds.empty()) {
        report << "leaked file descriptors:";
        for (const auto& f : leaked_fds) report << "\n  fd " << f.fd << " -> " << f.target;
        report << "\n";
    }

    // Children: this process reaps its own children, so nothing new may remain, not even a zombie.
    std::vector<ProcInfo> leaked_children;
    for (auto& c : list_children()) {
        if (is_forkserver(c)) continue;
        bool known = std::any_of(base.children.begin(), base.children.end(),
                                 [&](const ProcInfo& b) { return b.pid == c.pid; });
        if (!known) leaked_children.push_back(std::move(c));
    }
    if (!leaked_children.empty()) {
        report << "leaked child processes:";
        for (const auto& c : leaked_children) report << "\n  " << describe(c);
        report << "\n";
    }

    // Children of the forkserver (our Processes started through it): the server reaps them
    // asynchronously, so give it a moment. Its spare (comm "mp-fs-spare", forked ahead of the
    // next request) lives as long as the server and is nobody's Process.
    for (const auto& s : servers) {
        auto deadline = std::chrono::steady_clock::now() + 2s;
        auto started_children = [&] {
            std::vector<ProcInfo> kids = list_children(s.pid);
            std::erase_if(kids, [](const ProcInfo& c) { return c.comm == "mp-fs-spare"; });
            return kids;
        };
        std::vector<ProcInfo> kids = started_children();
        while (!kids.empty() && std::chrono::steady_clock::now() < deadline) {
            std::this_thread::sleep_for(10ms);
            kids = started_children();
        }
        if (!kids.empty()) {
            report << "leaked children of the forkserver (pid " << s.pid << "):";
            for (const auto& c : kids) report << "\n  " << describe(c);
            report << "\n";
        }
    }

    // /dev/shm: other programs may run at the same time (ctest -j, benchmarks), so only an entry
    // that stays (the same inode, not one made again under the same name) and that no other
    // process holds open or mapped counts.
    auto inode_of_entry = [](const std::string& n) -> std::optional<ino_t> {
        struct stat st {};
        if (::stat(("/dev/shm/" + n).c_str(), &st) != 0) return std::nullopt;
        return st.st_ino;
    };
    std::map<std::string, ino_t> fresh;
    for (const auto& n : list_shm()) {
        if (base.shm.count(n) != 0) continue;
        // Open MPI's shared-memory transport (the mpi tests' ranks, which ctest may run beside
        // this test): a rank killed on purpose leaves its segment to mpirun, which removes it
        // later, held by nobody meanwhile. No mp object is named so.
        if (n.rfind("vader_segment.", 0) == 0) continue;
        if (auto ino = inode_of_entry(n)) fresh[n] = *ino;
    }
    if (!fresh.empty()) {
        std::this_thread::sleep_for(200ms);
        std::vector<std::string> leaked_shm;
        for (const auto& [n, ino] : fresh) {
            if (inode_of_entry(n) != ino || shm_held_elsewhere(n)) continue;
            // Checked again after the scan: another program closes its entry only after
            // unlinking it, so one unheld during the scan but gone now was that program's.
            if (inode_of_entry(n) == ino) leaked_shm.push_back(n);
        }
        if (!leaked_shm.empty()) {
            report << "leaked /dev/shm entries:";
            for (const auto& n : leaked_shm) report << "\n  /dev/shm/" << n;
            report << "\n";
        }
    }
    return report.str();
}

}  // namespace mp::test
