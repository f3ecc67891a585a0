// The forkserver: a single-threaded process, started once (double-forked, so it is nobody's
// child and leaves no zombie), that forks every forkserver child. A parent that runs threads
// asks it for a child instead of forking itself, so the child never inherits a lock that some
// other thread held at that moment.
//
// Protocol. The client holds one end of a SOCK_SEQPACKET control socket; sends on it are atomic
// messages, so any thread (or forked copy of the client) may send without a lock. A request is
// one message: a small header plus two descriptors of fresh socketpairs:
//   - the status socket: the server answers with the child's pid and a pidfd (SCM_RIGHTS), and
//     later with the exit status. The client never writes to it, so when it polls readable at the
//     server the client has gone: a daemon child is then killed, as its parent is dead.
//   - the request socket: handed to the child, which reads its identity and task from it.
// The server allocates nothing and takes no lock after fork: fixed tables, raw system calls.

#include <fcntl.h>
#include <stdio_ext.h>
#include <poll.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#include <array>
#include <atomic>
#include <iostream>
#include <csignal>
#include <cstring>
#include <mutex>
#include <new>
#include <vector>

#include "mp/serialize.hpp"
#include "process_impl.hpp"
#include "sys/error.hpp"
#include "sys/helper_process.hpp"
#include "sys/pidfd.hpp"

#ifndef P_PIDFD
#define P_PIDFD 3
#endif

namespace mp {

// The request, written with the encoder's primitives only (strings as length + bytes).
template <>
struct Codec<detail::forkserver::Request> {
    static void put_string(Encoder& e, const std::string& s) {
        e.write_size(s.size());
        e.write(s.data(), s.size());
    }
    static std::string get_string(Decoder& d) {
        auto n = d.read_size();
        return std::string(d.read_view(n));
    }
    static void encode(Encoder& e, const detail::forkserver::Request& r) {
        put_string(e, r.name);
        e.put(r.daemon);
        put_string(e, r.authkey);
        e.write_size(r.identity.size());
        for (int i : r.identity) e.put(i);
        put_string(e, r.parent_name);
        e.put(static_cast<std::int32_t>(r.parent_pid));
        put_string(e, r.task);
    }
    static detail::forkserver::Request decode(Decoder& d) {
        detail::forkserver::Request r;
        r.name = get_string(d);
        r.daemon = d.get<bool>();
        r.authkey = get_string(d);
        auto n = d.read_size(sizeof(int));
        for (std::uint64_t i = 0; i < n; ++i) r.identity.push_back(d.get<int>());
        r.parent_name = get_string(d);
        r.parent_pid = d.get<std::int32_t>();
        r.task = get_string(d);
        return r;
    }
};

namespace detail::forkserver {
namespace {

constexpr std::uint32_t kMagic = 0x6d70'6673;  // "mpfs"
constexpr std::uint32_t kDaemon = 1;
constexpr int kControlFd = 3;
constexpr int kMaxChildren = 4096;

struct Header {
    std::uint32_t magic;
    std::uint32_t flags;
};

struct Reply {
    std::int32_t pid;  // > 0, or minus an errno when the server could not fork
};

// ------------------------------------------------------------------ server side

struct Slot {
    pid_t pid;
    int pidfd;
    int status;      // -1 once the client has gone
    bool daemon;
};

// Fixed tables: the server must not allocate (it may have been forked from a threaded parent).
Slot g_slots[kMaxChildren];
int g_nslots = 0;
pollfd g_poll[1 + 2 * kMaxChildren];

void send_all_nosignal(int fd, const void* p, std::size_t n) noexcept {
    const char* c = static_cast<const char*>(p);
    while (n > 0) {
        ssize_t r = ::send(fd, c, n, MSG_NOSIGNAL | MSG_DONTWAIT);
        if (r > 0) {
            c += r;
            n -= static_cast<std::size_t>(r);
        } else if (r < 0 && errno == EINTR) {
            continue;
        } else {
            return;  // the client has gone or its buffer is full: it will learn from the pidfd
        }
    }
}

void send_reply(int status_fd, std::int32_t pid, int pidfd) noexcept {
    Reply reply{pid};
    iovec iov{&reply, sizeof reply};
    msghdr msg{};
    msg.msg_iov = &iov;
    msg.msg_iovlen = 1;
    alignas(cmsghdr) char control[CMSG_SPACE(sizeof(int))] = {};
    if (pidfd >= 0) {
        msg.msg_control = control;
        msg.msg_controllen = sizeof control;
        cmsghdr* c = CMSG_FIRSTHDR(&msg);
        c->cmsg_level = SOL_SOCKET;
        c->cmsg_type = SCM_RIGHTS;
        c->cmsg_len = CMSG_LEN(sizeof(int));
        std::memcpy(CMSG_DATA(c), &pidfd, sizeof(int));
    }
    while (::sendmsg(status_fd, &msg, MSG_NOSIGNAL | MSG_DONTWAIT) < 0 && errno == EINTR) {
    }
}

// Accepts one request from the control socket. Returns false when every client has gone.
bool accept_request(pid_t server_pid) noexcept {
    Header h{};
    iovec iov{&h, sizeof h};
    msghdr msg{};
    msg.msg_iov = &iov;
    msg.msg_iovlen = 1;
    alignas(cmsghdr) char control[CMSG_SPACE(sizeof(int) * 4)];
    msg.msg_control = control;
    msg.msg_controllen = sizeof control;
    ssize_t r = ::recvmsg(kControlFd, &msg, MSG_CMSG_CLOEXEC);
    if (r == 0) return false;
    if (r < 0) return errno == EINTR || errno == EAGAIN;

    int fds[4];
    int nfds = 0;
    for (cmsghdr* c = CMSG_FIRSTHDR(&msg); c != nullptr; c = CMSG_NXTHDR(&msg, c)) {
        if (c->cmsg_level != SOL_SOCKET || c->cmsg_type != SCM_RIGHTS) continue;
        int count = static_cast<int>((c->cmsg_len - CMSG_LEN(0)) / sizeof(int));
        for (int i = 0; i < count && nfds < 4; ++i)
            std::memcpy(&fds[nfds++], CMSG_DATA(c) + static_cast<std::size_t>(i) * sizeof(int),
                        sizeof(int));
    }
    auto close_all = [&] {
        for (int i = 0; i < nfds; ++i) ::close(fds[i]);
    };
    if (r != sizeof h || h.magic != kMagic || nfds != 2) {
        close_all();
        return true;
    }
    const int status_fd = fds[0];
    const int request_fd = fds[1];
    const bool daemon = (h.flags & kDaemon) != 0;
    if (g_nslots == kMaxChildren) {
        send_reply(status_fd, -EAGAIN, -1);
        close_all();
        return true;
    }

    pid_t pid = ::fork();
    if (pid == 0) child_main(request_fd, server_pid, daemon);
    ::close(request_fd);
    if (pid < 0) {
        send_reply(status_fd, -errno, -1);
        ::close(status_fd);
        return true;
    }
    // Safe from pid reuse: the child is ours and cannot be reaped before we wait for it.
    int pidfd = static_cast<int>(::syscall(SYS_pidfd_open, pid, 0));
    if (pidfd < 0) {
        int err = errno;
        ::kill(pid, SIGKILL);
        siginfo_t info;
        ::waitid(P_PID, static_cast<id_t>(pid), &info, WEXITED);
        send_reply(status_fd, -err, -1);
        ::close(status_fd);
        return true;
    }
    send_reply(status_fd, pid, pidfd);
    g_slots[g_nslots++] = Slot{pid, pidfd, status_fd, daemon};
    return true;
}

[[noreturn]] void server_main(int control) noexcept {
    ::prctl(PR_SET_NAME, "mp-forkserver");
    // Output another thread buffered after the client flushed must not be printed again by
    // every child: drop it.
    ::__fpurge(stdout);
    ::__fpurge(stderr);
    // Ctrl-C is meant for the program and its children, not for the server (as Python's).
    sys::reset_signals({SIGINT});
    sys::keep_only(control, kControlFd);
    const pid_t self = ::getpid();
    // Tell the client who we are: it learns that the server is up, and which process it is.
    const std::int32_t hello = self;
    if (::send(kControlFd, &hello, sizeof hello, MSG_NOSIGNAL) != sizeof hello) ::_exit(1);

    bool clients = true;
    while (clients || g_nslots > 0) {
        int n = 0;
        if (clients) g_poll[n++] = pollfd{kControlFd, POLLIN, 0};
        const int first = n;
        for (int i = 0; i < g_nslots; ++i) {
            g_poll[n++] = pollfd{g_slots[i].pidfd, POLLIN, 0};
            g_poll[n++] = pollfd{g_slots[i].status, POLLIN, 0};  // fd -1 is ignored by poll
        }
        if (::poll(g_poll, static_cast<nfds_t>(n), -1) < 0) continue;

        // Children first: compacting the table below invalidates the poll indices.
        for (int i = g_nslots - 1; i >= 0; --i) {
            Slot& s = g_slots[i];
            const pollfd& pp = g_poll[first + 2 * i];
            const pollfd& ps = g_poll[first + 2 * i + 1];
            if (s.status >= 0 && ps.revents != 0) {
                // The client has gone (it never writes): its daemon child goes with it.
                if (s.daemon) ::syscall(SYS_pidfd_send_signal, s.pidfd, SIGKILL, nullptr, 0);
                ::close(s.status);
                s.status = -1;
            }
            if (pp.revents != 0) {
                siginfo_t info{};
                if (::waitid(static_cast<idtype_t>(P_PIDFD), static_cast<id_t>(s.pidfd), &info,
                             WEXITED | WNOHANG) == 0 &&
                    info.si_pid != 0) {
                    std::int32_t code = sys::decode_wait_status(info.si_code, info.si_status);
                    if (s.status >= 0) {
                        send_all_nosignal(s.status, &code, sizeof code);
                        ::close(s.status);
                    }
                    ::close(s.pidfd);
                    g_slots[i] = g_slots[--g_nslots];
                }
            }
        }
        if (clients && (g_poll[0].revents & (POLLIN | POLLHUP | POLLERR)) != 0)
            clients = accept_request(self);
        // Without clients, non-daemon children finish on their own; daemons were killed above
        // as their status sockets closed. Stay only to reap what remains.
        if (!clients) {
            for (int i = 0; i < g_nslots; ++i)
                if (g_slots[i].daemon)
                    ::syscall(SYS_pidfd_send_signal, g_slots[i].pidfd, SIGKILL, nullptr, 0);
        }
    }
    ::_exit(0);
}

// ------------------------------------------------------------------ client side

struct Client {
    std::mutex mu;
    sys::Fd control;
    pid_t server = 0;
};

// Set once the client exists, so a fork child that never used the forkserver need not create
// one (a function-local static would allocate in every such child).
std::atomic<Client*> g_client{nullptr};

Client& client() {
    // Never destroyed: children may still be starting at exit.
    static Client* c = (g_client = new Client, g_client.load());
    return *c;
}

void start_server_locked(Client& c) {
    auto [ours, theirs] = sys::make_socketpair(SOCK_SEQPACKET);
    // Flush first, or every child of the server would print what the client had buffered.
    std::cout.flush();
    std::cerr.flush();
    std::fflush(nullptr);
    // A plain variable, not the structured binding: clang 14 cannot capture those (C++20 can).
    const int server_end = theirs.get();
    sys::start_detached("fork (forkserver)", [server_end] { server_main(server_end); });
    theirs.reset();
    std::int32_t hello = 0;
    ssize_t n;
    do {
        n = ::recv(ours.get(), &hello, sizeof hello, 0);
    } while (n < 0 && errno == EINTR);
    if (n != sizeof hello || hello <= 0) throw ProcessError("mp: the forkserver did not start");
    c.control = std::move(ours);
    c.server = hello;
}

// True when the server has gone (killed): its end of the control socket is closed.
bool server_gone(int control) {
    pollfd p{control, 0, 0};
    return ::poll(&p, 1, 0) == 1 && (p.revents & (POLLHUP | POLLERR)) != 0;
}

Client& ready_client() {
    Client& c = client();
    std::lock_guard lock(c.mu);
    // A server that was killed is replaced now, not only when a request meets EPIPE: a pool
    // then starts with a live one, and no connection to a dead server is kept.
    if (c.control && server_gone(c.control.get())) c.control.reset();
    if (!c.control) start_server_locked(c);
    return c;
}

}  // namespace

void ensure_running() { ready_client(); }

pid_t server_pid() {
    Client& c = client();
    std::lock_guard lock(c.mu);
    return c.control ? c.server : 0;
}

void after_fork_in_child() noexcept {
    // The control socket stays usable (sends are atomic messages); only the lock is suspect.
    if (Client* c = g_client.load(std::memory_order_relaxed)) new (&c->mu) std::mutex;
}

Started start_child(const Request& req) {
    Client& c = ready_client();
    auto [status_ours, status_theirs] = sys::make_socketpair(SOCK_STREAM);
    auto [request_ours, request_theirs] = sys::make_socketpair(SOCK_STREAM);
    Header h{kMagic, req.daemon ? kDaemon : 0};
    const int fds[2] = {status_theirs.get(), request_theirs.get()};
    try {
        sys::send_fds(c.control.get(), &h, sizeof h, fds);
    } catch (const std::system_error& e) {
        // The server has died (killed, perhaps): start a new one and ask once more.
        if (e.code().value() != EPIPE && e.code().value() != ECONNREFUSED &&
            e.code().value() != ENOTCONN && e.code().value() != ECONNRESET)
            throw;
        {
            std::lock_guard lock(c.mu);
            c.control.reset();
            start_server_locked(c);
        }
        sys::send_fds(c.control.get(), &h, sizeof h, fds);
    }
    status_theirs.reset();
    request_theirs.reset();

    std::string payload = encode(req);
    if (req.task_fds.size() > sys::kMaxFds)
        throw ProcessError("mp: a forkserver child can receive at most " +
                           std::to_string(sys::kMaxFds) + " descriptors");
    // The header carries the task's descriptors; the payload follows on the same stream.
    const std::uint64_t header[2] = {payload.size(), req.task_fds.size()};
    try {
        sys::send_fds(request_ours.get(), header, sizeof header, req.task_fds);
        sys::write_full(request_ours.get(), payload.data(), payload.size());
    } catch (const std::system_error&) {
        // The child died before reading its request; the reply and status below tell how.
    }
    request_ours.reset();

    Reply reply{};
    std::array<sys::Fd, 1> got;
    std::size_t n = sys::recv_fds(status_ours.get(), &reply, sizeof reply, got);
    if (n != sizeof reply) throw ProcessError("mp: the forkserver went away while starting a child");
    if (reply.pid <= 0)
        sys::throw_system_error(-reply.pid, "fork (in the forkserver)");
    if (!got[0]) throw ProcessError("mp: the forkserver sent no pidfd");
    return Started{reply.pid, std::move(got[0]), std::move(status_ours)};
}

std::optional<int> read_status(int status_fd) {
    std::int32_t code = 0;
    std::size_t n = sys::read_full(status_fd, &code, sizeof code);
    if (n != sizeof code) return std::nullopt;
    return code;
}

void child_main(int request_fd, pid_t server_pid, bool daemon) noexcept {
    // Keep only stdio and our request socket: the control socket and the other children's
    // sockets and pidfds belong to the server.
    sys::keep_only(request_fd, kControlFd);  // replaces the control socket's descriptor
    ::fcntl(kControlFd, F_SETFD, FD_CLOEXEC);
    ::signal(SIGINT, SIG_DFL);
    if (daemon) {
        ::prctl(PR_SET_PDEATHSIG, SIGKILL);
        if (::getppid() != server_pid) ::_exit(1);
    }
    // From here the process is single-threaded with a consistent heap: ordinary code is safe.
    int code = run_guarded([&] {
        std::uint64_t header[2] = {0, 0};
        std::vector<sys::Fd> received(sys::kMaxFds);
        std::size_t got = sys::recv_fds(kControlFd, header, sizeof header, received);
        if (got < sizeof header)
            got += sys::read_full(kControlFd, reinterpret_cast<char*>(header) + got, sizeof header - got);
        if (got != sizeof header) throw ProcessError("forkserver child: the parent sent no request");
        const std::uint64_t len = header[0];
        if (len > (std::uint64_t{1} << 40)) throw ProcessError("forkserver child: oversized request");
        if (header[1] > sys::kMaxFds) throw ProcessError("forkserver child: too many descriptors");
        for (std::size_t i = 0; i < header[1]; ++i)
            if (!received[i]) throw ProcessError("forkserver child: descriptors missing from the request");
        std::string payload(len, '\0');
        if (sys::read_full(kControlFd, payload.data(), len) != len)
            throw ProcessError("forkserver child: truncated request");
        ::close(kControlFd);
        Request req = decode<Request>(payload);

        auto* identity = new ProcessIdentity{req.name, 0, req.daemon, req.authkey, req.identity};
        auto* parent = new ParentProcess{req.parent_name, req.parent_pid};
        // The control descriptor number this process inherited was closed above: forget it
        // (without closing a stranger), so this child starts its own server if it needs one.
        (void)client().control.release();
        // The forkserver is the OS parent; the logical parent is the requester.
        ChildSetup setup{identity, parent, false, req.parent_pid};
        become_child(setup);
        identity->daemon = req.daemon;
        // The arguments take the descriptors they own; the rest close with `received`.
        std::vector<int> fds;
        for (std::size_t i = 0; i < header[1]; ++i) fds.push_back(received[i].get());
        run_task(req.task, fds);
        for (std::size_t i = 0; i < fds.size(); ++i)
            if (fds[i] < 0) (void)received[i].release();
    });
    finish_child(code);
}

}  // namespace detail::forkserver
}  // namespace mp
