/* W1's second limit, and W1b-small-fs's: the smallest programs that start and join a child, in
 * C, linked with nothing but libc. mp_limits is C++ and links libcrypto (W8a), and what a program
 * loads makes every fork dearer (its page tables and mappings are copied), so this is the floor a
 * user's own minimal program would see.
 *
 *   W1: fork + _exit + waitpid.
 *   W1b-small: the smallest forkserver. A server process, forked once before the timing, forks a
 *     child for each request; the client sends a one-byte request, reads the child's pid (what a
 *     start returns), then the child's status (what a join returns), which the server sends once
 *     it has reaped the child. The server waits on its control socket and on the child's pidfd at
 *     once, as a server with many children must (mp's does the same). What this costs beyond a
 *     bare fork is the price of any forkserver: a request to another process and two answers
 *     back, each a cross-process wake-up.
 *
 *     mp_limit_fork W1|W1b-small [--size N] [--quick]
 *
 * And the machine's state, which run.py records before and after a run (`mp_limit_fork probe`):
 * what a first write to a fresh anonymous page costs (a page fault), what a system call costs
 * (getpid, not cached), and what fork + _exit + waitpid costs here. On a virtual machine all three
 * vary with the host (seen on this project's VM: the bare fork cost 120-150 us one afternoon and
 * 750-1,300 us that evening, with page faults near 10 us), and the rows that fork (W1...) vary
 * with them, so a report says what it ran on.
 *
 * Built twice: mp_limit_fork (libc only) and mp_limit_fork_cxx (the same code with the C++
 * runtime a C++ program loads, libstdc++, libm and libgcc_s, linked in and unused: row W1-cxx,
 * which shows how much of W1-c's gap any C++ program pays, mp or not).
 * prints {"workload":"W1","value":<us per start+join>,"unit":"us",...} like the other sides. */
#define _GNU_SOURCE
#ifdef FORK_MIN_CXX_RUNTIME
#define W1_METHOD "the same C program with the C++ runtime loaded (libstdc++, libm, libgcc_s): fork + _exit + waitpid"
#else
#define W1_METHOD "minimal C program (libc only): fork + _exit + waitpid"
#endif
#include <poll.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

/* W1: us per fork + _exit + waitpid, or a negative value on failure. */
static double bare_fork(long n) {
    double t0 = now();
    for (long i = 0; i < n; ++i) {
        pid_t pid = fork();
        if (pid < 0) {
            perror("fork");
            return -1;
        }
        if (pid == 0) _exit(0);
        int status = 0;
        while (waitpid(pid, &status, 0) < 0) {}
        if (!WIFEXITED(status) || WEXITSTATUS(status) != 0) {
            fprintf(stderr, "mp_limit_fork: a child failed\n");
            return -1;
        }
    }
    return (now() - t0) * 1e6 / (double)n;
}

/* One child at a time is all the client asks for, but the server polls its control socket and
 * the child's pidfd together, so that it would also take the next request while a child runs. */
static void serve(int ctl) {
    pid_t child = 0;
    int pidfd = -1;
    for (;;) {
        struct pollfd p[2] = {{ctl, POLLIN, 0}, {pidfd, POLLIN, 0}};
        if (poll(p, 2, -1) < 0) continue;
        if (pidfd >= 0 && (p[1].revents & POLLIN)) {
            int status = 0;
            while (waitpid(child, &status, 0) < 0) {}
            int32_t code = WIFEXITED(status) ? WEXITSTATUS(status) : -WTERMSIG(status);
            if (send(ctl, &code, sizeof code, MSG_NOSIGNAL) != sizeof code) _exit(1);
            close(pidfd);
            pidfd = -1;
        }
        if (p[0].revents & (POLLIN | POLLHUP)) {
            char req;
            if (recv(ctl, &req, 1, 0) != 1) _exit(0); /* the client has gone */
            child = fork();
            if (child == 0) _exit(0);
            if (child < 0) _exit(1);
            pidfd = (int)syscall(SYS_pidfd_open, child, 0);
            if (pidfd < 0) _exit(1);
            int32_t pid = child;
            if (send(ctl, &pid, sizeof pid, MSG_NOSIGNAL) != sizeof pid) _exit(1);
        }
    }
}

/* W1b-small: us per start + join through the server, or a negative value on failure. */
static double through_server(long n) {
    int s[2];
    if (socketpair(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0, s) < 0) {
        perror("socketpair");
        return -1;
    }
    fflush(stdout);
    pid_t server = fork();
    if (server < 0) {
        perror("fork");
        return -1;
    }
    if (server == 0) {
        close(s[0]);
        serve(s[1]);
    }
    close(s[1]);
    /* One start outside the timing, as the mp side's (it starts its server there). */
    double t0 = 0;
    for (long i = -1; i < n; ++i) {
        if (i == 0) t0 = now();
        int32_t pid = 0, code = -1;
        if (send(s[0], "r", 1, MSG_NOSIGNAL) != 1 || recv(s[0], &pid, sizeof pid, 0) != sizeof pid ||
            pid <= 0 || recv(s[0], &code, sizeof code, 0) != sizeof code) {
            fprintf(stderr, "mp_limit_fork: the server failed\n");
            return -1;
        }
        if (code != 0) {
            fprintf(stderr, "mp_limit_fork: a child failed\n");
            return -1;
        }
    }
    const double us = (now() - t0) * 1e6 / (double)n;
    close(s[0]);
    int status = 0;
    while (waitpid(server, &status, 0) < 0) {}
    return us;
}

/* `probe`: {"fault_us":...,"syscall_us":...,"fork_us":...}, medians of 5 short rounds each. */
static int cmp_double(const void* a, const void* b) {
    const double x = *(const double*)a, y = *(const double*)b;
    return (x > y) - (x < y);
}

static double median5(double* v) {
    qsort(v, 5, sizeof *v, cmp_double);
    return v[2];
}

static int probe(void) {
    enum { kPages = 2048, kCalls = 20000, kForks = 50 };
    const size_t page = (size_t)sysconf(_SC_PAGESIZE);
    double fault[5], call[5], forks[5];
    for (int r = 0; r < 5; ++r) {
        char* p = mmap(NULL, kPages * page, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        if (p == MAP_FAILED) {
            perror("mmap");
            return 1;
        }
        (void)madvise(p, kPages * page, MADV_NOHUGEPAGE); /* one fault per page */
        double t0 = now();
        for (size_t i = 0; i < kPages; ++i) p[i * page] = 1;
        fault[r] = (now() - t0) * 1e6 / kPages;
        munmap(p, kPages * page);
        t0 = now();
        for (int i = 0; i < kCalls; ++i) (void)syscall(SYS_getpid);
        call[r] = (now() - t0) * 1e6 / kCalls;
        forks[r] = bare_fork(kForks);
        if (forks[r] < 0) return 1;
    }
    printf("{\"fault_us\":%.3g,\"syscall_us\":%.3g,\"fork_us\":%.4g}\n", median5(fault), median5(call),
           median5(forks));
    return 0;
}

int main(int argc, char** argv) {
    long n = 200;
    if (argc == 2 && strcmp(argv[1], "probe") == 0) return probe();
    for (int i = 1; i < argc; ++i) {
        if (strcmp(argv[i], "--size") == 0 && i + 1 < argc) n = atol(argv[++i]);
        else if (strcmp(argv[i], "--quick") == 0) n = 20;
    }
    const int w1 = argc >= 2 && strcmp(argv[1], "W1") == 0;
    if (argc < 2 || (!w1 && strcmp(argv[1], "W1b-small") != 0) || n <= 0) {
        fprintf(stderr, "usage: mp_limit_fork W1|W1b-small [--size N] [--quick] | probe\n");
        return 2;
    }
    const double us = w1 ? bare_fork(n) : through_server(n);
    if (us < 0) return 1;
    printf("{\"workload\":\"%s\",\"value\":%.6g,\"unit\":\"us\",\"size\":%ld,\"method\":\"%s\"}\n",
           argv[1], us, n,
           w1 ? W1_METHOD
              : "minimal C forkserver (libc only): request, fork, pid back, pidfd poll, waitpid, "
                "status back");
    return 0;
}
