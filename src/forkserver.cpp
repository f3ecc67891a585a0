// The forkserver: a single-threaded process, started once by spawn (a fresh exec of the program,
// made by a middle child that exits at once, so it is nobody's child and leaves no zombie), that
// forks every forkserver child. A parent that runs threads asks it for a child instead of forking
// itself, so the child never inherits a lock that some other thread held at that moment.
//
// Protocol. The client holds one end of a SOCK_SEQPACKET control socket; sends on it are atomic
// messages, so any thread (or forked copy of the client) may send without a lock. A request is
// one message: a small header plus one end of a fresh stream socketpair, the child's socket:
//   - the client writes the child's identity and task into it; the child, which inherits the
//     server's descriptor of it, reads them. The server never reads it.
//   - the server answers through it with the child's pid and a pidfd (SCM_RIGHTS), and later with
//     the exit status. It polls it for hang-up only (data in it is the child's): a hang-up means
//     the client has gone, and a daemon child (or a pool worker) is then killed, as its parent
//     is dead.
// The server allocates nothing and takes no lock after fork: fixed tables, raw system calls.
//
// A spare child. The server forks the next child ahead of its request, as soon as it has handed
// out the last one, and the spare waits on a socket of its own (its name "mp-fs-spare" meanwhile).
// A request then costs the server a message to the spare instead of a fork (its page tables and
// VMAs copied: 50-60 us here, most of a small program's start) and the fork runs while the
// requester's child runs, not before it starts. The spare acknowledges the hand-off before its
// pid goes to the requester, so one that was killed meanwhile is replaced by a fresh fork
// (take_spare). The spare is the server's as it is at every
// fork (the server changes nothing between requests but its WIPEONFORK tables), so a child is the
// same whether it was forked before its request or after. The spare goes when its socket closes:
// the server closes it as it ends, and the kernel does when the server is killed.

#include <fcntl.h>
#include <poll.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#include <dirent.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <csignal>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <mutex>
#include <new>
#include <vector>

#include "launch.hpp"
#include "mp/serialize.hpp"
#include "process_impl.hpp"
#include "sys/error.hpp"
#include "sys/helper_process.hpp"
#include "sys/pidfd.hpp"

#ifndef P_PIDFD
#define P_PIDFD 3
#endif

namespace mp {
namespace detail::forkserver {
namespace {

constexpr std::uint32_t kMagic = 0x6d70'6673;  // "mpfs"
constexpr std::uint32_t kDiesWithParent = 1;  // a daemon, or a pool worker
constexpr int kControlFd = 3;
constexpr int kMaxChildren = 4096;

struct Header {
    std::uint32_t magic;
    std::uint32_t flags;
};

// The descriptors a fresh server's program opened itself (its static initialisers: a global
// log file, a library's socket), sorted: the server's children keep them, as the program's
// spawn children have theirs and Python's forkserver children their modules' files. Everything
// else above the control socket in a child is the server's (its children's sockets and pidfds).
// Listed once, before any child; never freed (the children read it).
std::vector<int>* g_program_fds = nullptr;

void list_program_fds(int control) {
    auto* fds = new std::vector<int>;
    if (DIR* d = ::opendir("/proc/self/fd")) {
        while (dirent* e = ::readdir(d)) {
            char* end = nullptr;
            const long fd = std::strtol(e->d_name, &end, 10);
            if (end == e->d_name || *end != '\0' || fd <= kControlFd || fd == control || fd == ::dirfd(d)) continue;
            fds->push_back(static_cast<int>(fd));
        }
        ::closedir(d);
    }
    std::sort(fds->begin(), fds->end());
    g_program_fds = fds;
}

// Closes every descriptor above kControlFd but the program's own (g_program_fds), after moving
// `fd` to kControlFd. Raw calls only (a forkserver child, just forked).
void keep_only_control(int fd, bool close_on_exec) noexcept {
    if (g_program_fds != nullptr)
        sys::keep_only(fd, kControlFd, close_on_exec, g_program_fds->data(), g_program_fds->size());
    else
        sys::keep_only(fd, kControlFd, close_on_exec);
}

struct Reply {
    std::int32_t pid;  // > 0, or minus an errno when the server could not fork
};

// ------------------------------------------------------------------ server side

struct Slot {
    pid_t pid;
    int pidfd;
    int status;      // the child's socket; -1 once the client has gone
    bool dies_with_parent;  // a daemon, or a pool worker
};

// Fixed tables: the server allocates nothing between its children's forks, so a child never
// starts inside the allocator. Mapped once with MADV_WIPEONFORK: a child gets zeros there, not
// the server's pages, so the server's writes after each fork (the new slot, the poll set) copy
// no page (a copy-on-write fault, with a TLB flush, per start otherwise).
struct Spare {
    pid_t pid;    // 0: none
    int pidfd;
    int handoff;  // the server's end of the spare's socket
};

struct Tables {
    Slot slots[kMaxChildren];
    int nslots;
    Spare spare;
    pollfd poll[2 + 2 * kMaxChildren];
};
Tables* g_tables = nullptr;  // set before the first fork, then only read

void map_tables() noexcept {
    void* m = ::mmap(nullptr, sizeof(Tables), PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (m == MAP_FAILED) sys::exit_child(1);
    (void)::madvise(m, sizeof(Tables), MADV_WIPEONFORK);  // EINVAL before Linux 4.14: shared then
    g_tables = static_cast<Tables*>(m);
}

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

// One message of `n` bytes with `fd` (when >= 0) attached. False when it could not be sent.
bool send_with_fd(int sock, const void* data, std::size_t n, int fd) noexcept {
    iovec iov{const_cast<void*>(data), n};
    msghdr msg{};
    msg.msg_iov = &iov;
    msg.msg_iovlen = 1;
    alignas(cmsghdr) char control[CMSG_SPACE(sizeof(int))] = {};
    if (fd >= 0) {
        msg.msg_control = control;
        msg.msg_controllen = sizeof control;
        cmsghdr* c = CMSG_FIRSTHDR(&msg);
        c->cmsg_level = SOL_SOCKET;
        c->cmsg_type = SCM_RIGHTS;
        c->cmsg_len = CMSG_LEN(sizeof(int));
        std::memcpy(CMSG_DATA(c), &fd, sizeof(int));
    }
    ssize_t r;
    while ((r = ::sendmsg(sock, &msg, MSG_NOSIGNAL | MSG_DONTWAIT)) < 0 && errno == EINTR) {
    }
    return r == static_cast<ssize_t>(n);
}

void send_reply(int status_fd, std::int32_t pid, int pidfd) noexcept {
    const Reply reply{pid};
    (void)send_with_fd(status_fd, &reply, sizeof reply, pidfd);
}

// Receives one header with its descriptors (at most 4, close-on-exec) from `sock`: the byte
// count recvmsg returned, and the descriptors in `fds`, `nfds` of them.
ssize_t recv_header(int sock, Header& h, int (&fds)[4], int& nfds) noexcept {
    iovec iov{&h, sizeof h};
    msghdr msg{};
    msg.msg_iov = &iov;
    msg.msg_iovlen = 1;
    alignas(cmsghdr) char control[CMSG_SPACE(sizeof(int) * 4)];
    msg.msg_control = control;
    msg.msg_controllen = sizeof control;
    nfds = 0;
    const ssize_t r = ::recvmsg(sock, &msg, MSG_CMSG_CLOEXEC);
    if (r < 0) return r;
    for (cmsghdr* c = CMSG_FIRSTHDR(&msg); c != nullptr; c = CMSG_NXTHDR(&msg, c)) {
        if (c->cmsg_level != SOL_SOCKET || c->cmsg_type != SCM_RIGHTS) continue;
        int count = static_cast<int>((c->cmsg_len - CMSG_LEN(0)) / sizeof(int));
        for (int i = 0; i < count && nfds < 4; ++i)
            std::memcpy(&fds[nfds++], CMSG_DATA(c) + static_cast<std::size_t>(i) * sizeof(int),
                        sizeof(int));
    }
    return r;
}

// Forks a child and opens its pidfd: the pid (> 0) or minus an errno. A child whose pidfd could
// not be opened is killed and reaped. In the child, `in_child` runs and does not return.
template <class F>
pid_t fork_with_pidfd(int& pidfd, F in_child) noexcept {
    pid_t pid = ::fork();
    if (pid == 0) in_child();
    if (pid < 0) return -errno;
    // Safe from pid reuse: the child is ours and cannot be reaped before we wait for it.
    pidfd = static_cast<int>(::syscall(SYS_pidfd_open, pid, 0));
    if (pidfd < 0) {
        int err = errno;
        ::kill(pid, SIGKILL);
        siginfo_t info;
        ::waitid(P_PID, static_cast<id_t>(pid), &info, WEXITED);
        return -err;
    }
    return pid;
}

// The spare's life: it waits for its request socket, then is a child like any other.
[[noreturn]] void spare_main(int handoff, pid_t server_pid) noexcept {
    ::prctl(PR_SET_NAME, "mp-fs-spare");
    keep_only_control(handoff, false);  // the server's descriptors are not the spare's
    Header h{};
    int fds[4];
    int nfds = 0;
    ssize_t r;
    while ((r = recv_header(kControlFd, h, fds, nfds)) < 0 && errno == EINTR) {
    }
    // End of file (the server has ended or dropped us) or anything unexpected: go quietly.
    if (r != sizeof h || h.magic != kMagic || nfds != 1) sys::exit_child(0);
    // This process is the requester's child now. The server may have stopped waiting for the
    // acknowledgement (and closed its end): it has taken us all the same (take_spare).
    const char ack = 1;
    (void)::send(kControlFd, &ack, 1, MSG_NOSIGNAL);
    ::prctl(PR_SET_NAME, "mp-forkserver");  // what a child forked on request is called
    child_main(fds[0], server_pid, (h.flags & kDiesWithParent) != 0);
}

// Forks the spare, when there is none. Failing is not an error: the next request forks.
void fork_spare(pid_t server_pid) noexcept {
    Tables& t = *g_tables;
    if (t.spare.pid != 0) return;
    int sv[2];
    if (::socketpair(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0, sv) != 0) return;
    int pidfd = -1;
    const pid_t pid = fork_with_pidfd(pidfd, [&]() noexcept { spare_main(sv[1], server_pid); });
    ::close(sv[1]);
    if (pid < 0) {
        ::close(sv[0]);
        return;
    }
    t.spare = Spare{pid, pidfd, sv[0]};
}

// Ends the spare (SIGKILL: it may be stopped) and reaps it.
void drop_spare() noexcept {
    Spare& s = g_tables->spare;
    if (s.pid == 0) return;
    ::syscall(SYS_pidfd_send_signal, s.pidfd, SIGKILL, nullptr, 0);
    siginfo_t info{};
    ::waitid(static_cast<idtype_t>(P_PIDFD), static_cast<id_t>(s.pidfd), &info, WEXITED);
    ::close(s.pidfd);
    ::close(s.handoff);
    s = Spare{0, -1, -1};
}

// Hands the request socket to the spare: its pid and pidfd, or false when there is none or it
// has died (then reaped: the request forks). The spare acknowledges before the pid goes to the
// requester: one killed just before (a SIGKILL not yet acted on when the message was sent) is
// then replaced by a fresh fork, not reported as a child that died before it ran. A spare that
// does not answer within kAckWaitMs (stopped, or not scheduled) is taken all the same: it runs the
// child when it runs again, as a child stopped after its fork would.
constexpr int kAckWaitMs = 20;
bool take_spare(int status_fd, std::uint32_t flags, pid_t& pid, int& pidfd) noexcept {
    Spare& s = g_tables->spare;
    if (s.pid == 0) return false;
    const Header h{kMagic, flags};
    bool alive = send_with_fd(s.handoff, &h, sizeof h, status_fd);
    if (alive) {
        pollfd p{s.handoff, POLLIN, 0};
        int n;
        while ((n = ::poll(&p, 1, kAckWaitMs)) < 0 && errno == EINTR) {
        }
        char ack = 0;
        // n == 0: no answer yet, alive as far as we know. Otherwise its ack or its end.
        if (n > 0) alive = ::recv(s.handoff, &ack, 1, MSG_DONTWAIT) == 1;
    }
    if (!alive) {
        drop_spare();
        return false;
    }
    pid = s.pid;
    pidfd = s.pidfd;
    ::close(s.handoff);
    s = Spare{0, -1, -1};
    return true;
}

// Accepts one request from the control socket. Returns false when every client has gone.
bool accept_request(pid_t server_pid) noexcept {
    Tables& t = *g_tables;
    Header h{};
    int fds[4];
    int nfds = 0;
    const ssize_t r = recv_header(kControlFd, h, fds, nfds);
    if (r == 0) return false;
    if (r < 0) return errno == EINTR || errno == EAGAIN;
    auto close_all = [&] {
        for (int i = 0; i < nfds; ++i) ::close(fds[i]);
    };
    if (r != sizeof h || h.magic != kMagic || nfds != 1) {
        close_all();
        return true;
    }
    const int status_fd = fds[0];
    const bool dies_with_parent = (h.flags & kDiesWithParent) != 0;
    if (t.nslots == kMaxChildren) {
        send_reply(status_fd, -EAGAIN, -1);
        close_all();
        return true;
    }

    int pidfd = -1;
    pid_t pid = 0;
    if (!take_spare(status_fd, h.flags, pid, pidfd))
        pid = fork_with_pidfd(pidfd, [&]() noexcept { child_main(status_fd, server_pid, dies_with_parent); });
    if (pid < 0) {
        send_reply(status_fd, pid, -1);
        ::close(status_fd);
        return true;
    }
    send_reply(status_fd, pid, pidfd);
    t.slots[t.nslots++] = Slot{pid, pidfd, status_fd, dies_with_parent};
    return true;
}

// set_forkserver_preload's functions, before the first child: what they set up is in every
// child's copy of the server. One that throws ends the server before its hello, so the start
// that needed it fails (with the exception on stderr, as a child's).
void run_preload(const std::vector<std::string>& preload) noexcept {
    try {
        for (const std::string& task : preload) (void)run_task(task);
    } catch (...) {
        report_child_exception();
        ::_exit(1);
    }
}

// `fresh`: a fresh exec of the program (serve()), whose descriptors above the control socket are
// its own; else forked from the client, whose descriptors are not the server's to keep.
[[noreturn]] void server_main(int control, const std::vector<std::string>& preload, bool fresh) noexcept {
    ::prctl(PR_SET_NAME, "mp-forkserver");
    // Ctrl-C is meant for the program and its children, not for the server (as Python's).
    sys::reset_signals({SIGINT});
    if (fresh) {
        try {
            list_program_fds(control);
        } catch (...) {
            // Out of memory at the server's start: its children close them, as before.
        }
    }
    keep_only_control(control, false);
    // Call once here what only the children call otherwise (child_main, and the flush on their
    // way out, with nothing pending): each binds its PLT entry now, in the server, and not again
    // in every child, where a lazy binding runs ld.so after fork and faults in about ten pages.
    (void)::signal(SIGINT, SIG_IGN);
    (void)::getppid();
    flush_standard_streams_at_exit();
    run_preload(preload);
    // The rule the children flush by at their end, as a forking parent sets it (the preload
    // functions may have changed the streams): the C++ streams only if they buffer on their own.
    // Left at its default, every child flushed cout, cerr and clog, locking stdout and stderr:
    // five pages written, each a copy of the server's, per child.
    flush_before_fork();
    // What every child would do first (become_child), done once here for all of them, after the
    // preload functions, which may have changed it (a spawned server has done it already for
    // itself; one forked from a program without the main hook has not).
    reset_child_signals();
    stdin_from_null();
    const pid_t self = ::getpid();
    // Tell the client who we are: it learns that the server is up, and which process it is.
    const std::int32_t hello = self;
    if (::send(kControlFd, &hello, sizeof hello, MSG_NOSIGNAL) != sizeof hello) sys::exit_child(1);

    map_tables();
    Tables& t = *g_tables;
    t.spare = Spare{0, -1, -1};
    fork_spare(self);
    bool clients = true;
    while (clients || t.nslots > 0) {
        int n = 0;
        if (clients) t.poll[n++] = pollfd{kControlFd, POLLIN, 0};
        // A spare that died (killed by someone) is reaped at once; the next request forks one.
        const int spare_at = t.spare.pid != 0 ? n : -1;
        if (spare_at >= 0) t.poll[n++] = pollfd{t.spare.pidfd, POLLIN, 0};
        const int first = n;
        for (int i = 0; i < t.nslots; ++i) {
            t.poll[n++] = pollfd{t.slots[i].pidfd, POLLIN, 0};
            // Hang-up only (POLLHUP is reported unasked); fd -1 is ignored by poll.
            t.poll[n++] = pollfd{t.slots[i].status, 0, 0};
        }
        if (::poll(t.poll, static_cast<nfds_t>(n), -1) < 0) continue;

        // Children first: compacting the table below invalidates the poll indices.
        for (int i = t.nslots - 1; i >= 0; --i) {
            Slot& s = t.slots[i];
            const pollfd& pp = t.poll[first + 2 * i];
            const pollfd& ps = t.poll[first + 2 * i + 1];
            if (s.status >= 0 && ps.revents != 0) {
                // The client has gone: its daemon child (or pool worker) goes with it.
                if (s.dies_with_parent) ::syscall(SYS_pidfd_send_signal, s.pidfd, SIGKILL, nullptr, 0);
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
                    t.slots[i] = t.slots[--t.nslots];
                }
            }
        }
        if (spare_at >= 0 && t.poll[spare_at].revents != 0) drop_spare();
        if (clients && (t.poll[0].revents & (POLLIN | POLLHUP | POLLERR)) != 0) {
            clients = accept_request(self);
            // The next child, forked now: while the one just handed out runs, not when the next
            // request waits for it.
            if (clients) fork_spare(self);
        }
        // Without clients, other children finish on their own; daemons were killed above
        // as their status sockets closed. Stay only to reap what remains.
        if (!clients) {
            drop_spare();
            for (int i = 0; i < t.nslots; ++i)
                if (t.slots[i].dies_with_parent)
                    ::syscall(SYS_pidfd_send_signal, t.slots[i].pidfd, SIGKILL, nullptr, 0);
        }
    }
    sys::exit_child(0);
}

// ------------------------------------------------------------------ client side

/// One started server: the client's end of its control socket, its pid, and a pidfd of it.
struct Server {
    sys::Fd control;
    pid_t pid = 0;
    /// Readable once the server has ended, even while another process still holds the server's
    /// end of the control socket (a child or spare it had just forked, before it closes its
    /// copy), when the socket shows no hang-up yet. Empty if the server was gone by the time it
    /// could be opened.
    sys::Fd pidfd;
};

struct Client {
    std::mutex mu;
    /// The running server, replaced under `mu`. A start takes a copy under `mu` and uses it
    /// without: another thread replacing the server meanwhile cannot close (and the process
    /// reuse) the descriptor the start is sending on.
    std::shared_ptr<const Server> server;
    /// set_forkserver_preload's functions, as encoded tasks: every start of the server runs them.
    std::vector<std::string> preload;
};

// Set once the client exists, so a fork child that never used the forkserver need not create
// one (a function-local static would allocate in every such child).
std::atomic<Client*> g_client{nullptr};

Client& client() {
    // Never destroyed: children may still be starting at exit.
    static Client* c = (g_client = new Client, g_client.load());
    return *c;
}

// The spawned server's task: its arguments are the server's end of the control socket and the
// functions to preload.
void serve_control(PassedFd control, std::vector<std::string> preload) { serve(control.fd, preload); }

void start_server_locked(Client& c) {
    c.server.reset();
    auto [ours, theirs] = sys::make_socketpair(SOCK_SEQPACKET);
    // A fresh exec of the program, not a fork of this one: whatever threads this process runs
    // and whatever locks they hold, the server (and so every child it forks) starts clean.
    if (main_hooked()) {
        const Task task = make_transferable_task(&serve_control, PassedFd{theirs.get()}, c.preload);
        ChildSpec spec;
        spec.name = "ForkServer";
        spec.identity = current_process().identity;
        spec.authkey = current_process().authkey;
        spec.method = StartMethod::spawn;
        spec.task = &task;
        spec.logs_start = false;
        launch_detached("fork (forkserver)", spec);
    } else {
        // A program without the main hook (mp used from a plugin, or linked by hand without mp's
        // link options) cannot exec a fresh copy of itself: the server is forked from here, as
        // before spawn existed. It allocates and locks nothing, but its children run the target
        // on a copy of this process made now: safe when no other thread holds a lock at this
        // moment (start it early: set_start_method(StartMethod::forkserver) at the top of main).
        const int fd = theirs.get();
        const std::vector<std::string>& preload = c.preload;
        auto body = [fd, &preload]() noexcept -> int { server_main(fd, preload, false); };
        launch_helper("fork (forkserver)", ChildMain(body));
    }
    theirs.reset();
    std::int32_t hello = 0;
    ssize_t n;
    do {
        n = ::recv(ours.get(), &hello, sizeof hello, 0);
    } while (n < 0 && errno == EINTR);
    if (n != sizeof hello || hello <= 0)
        throw ProcessError(c.preload.empty() ? "mp: the forkserver did not start"
                                             : "mp: the forkserver did not start (did a "
                                               "set_forkserver_preload function throw? see stderr)");
    // Opened after the hello, from a live server that is nobody's child: its pid cannot have
    // been reused unless it died and was reaped meanwhile, and then the socket says so.
    sys::Fd pidfd(static_cast<int>(::syscall(SYS_pidfd_open, hello, 0)));
    c.server = std::make_shared<const Server>(Server{std::move(ours), hello, std::move(pidfd)});
}

// True when the server has gone (killed): it has ended, or its end of the control socket is
// closed.
bool server_gone(const Server& s) {
    pollfd p[2] = {{s.control.get(), 0, 0}, {s.pidfd ? s.pidfd.get() : -1, POLLIN, 0}};
    if (::poll(p, 2, 0) <= 0) return false;
    return (p[0].revents & (POLLHUP | POLLERR)) != 0 || (p[1].revents & POLLIN) != 0;
}

// `check`: a server that was killed is replaced now, not only when a request meets EPIPE: a pool
// then starts with a live one, and no connection to a dead server is kept. A start need not
// look (a poll each time): its request meets EPIPE, and start_child replaces the server then.
std::shared_ptr<const Server> ready_server(bool check) {
    Client& c = client();
    std::lock_guard lock(c.mu);
    if (check && c.server && server_gone(*c.server)) c.server.reset();
    if (!c.server) start_server_locked(c);
    return c.server;
}

}  // namespace

void ensure_running() { ready_server(true); }

void set_preload(std::vector<std::string> tasks) {
    Client& c = client();
    std::lock_guard lock(c.mu);
    if (c.server && !server_gone(*c.server))
        throw ProcessError(
            "mp::set_forkserver_preload: the forkserver already runs, so the functions would not "
            "run until it is restarted; set them before the first forkserver start");
    c.preload = std::move(tasks);
}

pid_t server_pid() {
    Client& c = client();
    std::lock_guard lock(c.mu);
    return c.server ? c.server->pid : 0;
}

void after_fork_in_child() noexcept {
    // The control socket stays usable (sends are atomic messages); only the lock is suspect.
    if (Client* c = g_client.load(std::memory_order_relaxed)) new (&c->mu) std::mutex;
}

namespace {

// The server to ask instead of `asked` (killed): the one another thread has started meanwhile,
// unless that one has gone too, else a new one.
std::shared_ptr<const Server> replace_server(const std::shared_ptr<const Server>& asked) {
    Client& c = client();
    std::lock_guard lock(c.mu);
    if (c.server && c.server != asked && !server_gone(*c.server)) return c.server;
    start_server_locked(c);
    return c.server;
}

bool server_went_away(const std::system_error& e) {
    const int code = e.code().value();
    return code == EPIPE || code == ECONNREFUSED || code == ENOTCONN || code == ECONNRESET;
}

}  // namespace

Started start_child(const Request& req) {
    std::shared_ptr<const Server> server = ready_server(false);
    const Header h{kMagic, req.dies_with_parent ? kDiesWithParent : 0};
    // A second attempt, with a new server, when the first shows that the server died before any
    // child had our request: the send fails, or the reply never comes and our request was never
    // read (ECONNRESET: its socket closed with the request in it). The latter happens when the
    // server is killed while a child or spare it has just forked still holds its end of the
    // control socket (each closes it first thing): our send then succeeds into a socket that
    // closes unread a moment later.
    for (int attempt = 0;; ++attempt) {
        // One socketpair serves the request (to the child) and the replies (from the server).
        // Listed as it is made (parent_only_socketpair): a fork that another thread makes
        // meanwhile keeps no copy of our end, which would hide our death from the server (it
        // kills a daemon child or pool worker when we hang up), nor of theirs, which would
        // hide the server's death from us.
        auto [ours, theirs] = parent_only_socketpair(SOCK_STREAM);
        const int fds[1] = {theirs.get()};
        try {
            sys::send_fds(server->control.get(), &h, sizeof h, fds);
        } catch (const std::system_error& e) {
            if (!server_went_away(e)) throw;
            if (attempt > 0) throw ProcessError("mp: the forkserver went away while starting a child");
            server = replace_server(server);
            continue;
        }
        theirs.reset();

        try {
            send_request(ours.get(), req);
        } catch (const std::system_error&) {
            // The child died before reading its request; the reply and status below tell how.
        }

        Reply reply{};
        std::array<sys::Fd, 1> got;
        std::size_t n = 0;
        try {
            n = sys::recv_fds(ours.get(), &reply, sizeof reply, got);
        } catch (const std::system_error& e) {
            // ECONNRESET: the server went away with our request unread (see read_from_server).
            if (e.code().value() != ECONNRESET) throw;
            if (attempt == 0) {
                server = replace_server(server);
                continue;
            }
        }
        if (n != sizeof reply) throw ProcessError("mp: the forkserver went away while starting a child");
        if (reply.pid <= 0)
            sys::throw_system_error(-reply.pid, "fork (in the forkserver)");
        if (!got[0]) throw ProcessError("mp: the forkserver sent no pidfd");
        return Started{reply.pid, std::move(got[0]), std::move(ours)};
    }
}

namespace {

// Reads what the server sent into [p, p + n): the bytes read, fewer once it has gone; without
// `wait`, std::nullopt when nothing has come yet. Its going may show as ECONNRESET instead of end
// of file: the child's socket is the server's too, and a request that no child read (it was
// killed, or never forked) is still in it as it closes.
std::optional<std::size_t> read_from_server(int fd, char* p, std::size_t n, bool wait) {
    std::size_t got = 0;
    while (got < n) {
        const ssize_t r = ::recv(fd, p + got, n - got, got == 0 && !wait ? MSG_DONTWAIT : 0);
        if (r > 0) {
            got += static_cast<std::size_t>(r);
        } else if (r == 0 || errno == ECONNRESET) {
            break;
        } else if (errno == EAGAIN || errno == EWOULDBLOCK) {
            return std::nullopt;
        } else if (errno != EINTR) {
            sys::throw_system_error(errno, "recv (forkserver status)");
        }
    }
    return got;
}

}  // namespace

std::optional<int> read_status(int status_fd) {
    std::int32_t code = 0;
    if (read_from_server(status_fd, reinterpret_cast<char*>(&code), sizeof code, true) != sizeof code)
        return std::nullopt;
    return code;
}

bool try_read_status(int status_fd, std::optional<int>& code) {
    // One call where a poll and then a read would be two: a join asks at least twice. The server
    // sends the four bytes at once; the rest of a split one is waited for.
    std::int32_t value = 0;
    const auto n = read_from_server(status_fd, reinterpret_cast<char*>(&value), sizeof value, false);
    if (!n) return false;
    code = *n == sizeof value ? std::optional<int>(value) : std::nullopt;
    return true;
}

void child_main(int request_fd, pid_t server_pid, bool dies_with_parent) noexcept {
    // Keep only stdio and our request socket: the control socket and the other children's
    // sockets and pidfds belong to the server.
    keep_only_control(request_fd, true);  // replaces the control socket's descriptor
    ::signal(SIGINT, SIG_DFL);
    if (dies_with_parent) {
        ::prctl(PR_SET_PDEATHSIG, SIGKILL);
        if (::getppid() != server_pid) sys::exit_child(1);
    }
    run_request(kControlFd, false);
}

void serve(int control, const std::vector<std::string>& preload) noexcept { server_main(control, preload, true); }

}  // namespace detail::forkserver
}  // namespace mp
