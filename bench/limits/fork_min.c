/* W1's second limit: the smallest program that starts and joins a child, in C, linked with
 * nothing but libc. mp_limits is C++ and links libcrypto (W8a), and what a program loads makes
 * every fork dearer (its page tables and mappings are copied), so this is the floor a user's own
 * minimal program would see.
 *
 *     mp_limit_fork W1 [--size N] [--quick]
 * prints {"workload":"W1","value":<us per start+join>,"unit":"us",...} like the other sides. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

int main(int argc, char** argv) {
    long n = 200;
    for (int i = 1; i < argc; ++i) {
        if (strcmp(argv[i], "--size") == 0 && i + 1 < argc) n = atol(argv[++i]);
        else if (strcmp(argv[i], "--quick") == 0) n = 20;
    }
    if (argc < 2 || strcmp(argv[1], "W1") != 0 || n <= 0) {
        fprintf(stderr, "usage: mp_limit_fork W1 [--size N] [--quick]\n");
        return 2;
    }
    double t0 = now();
    for (long i = 0; i < n; ++i) {
        pid_t pid = fork();
        if (pid < 0) {
            perror("fork");
            return 1;
        }
        if (pid == 0) _exit(0);
        int status = 0;
        while (waitpid(pid, &status, 0) < 0) {}
        if (!WIFEXITED(status) || WEXITSTATUS(status) != 0) {
            fprintf(stderr, "mp_limit_fork: a child failed\n");
            return 1;
        }
    }
    printf("{\"workload\":\"W1\",\"value\":%.6g,\"unit\":\"us\",\"size\":%ld,"
           "\"method\":\"minimal C program (libc only): fork + _exit + waitpid\"}\n",
           (now() - t0) * 1e6 / (double)n, n);
    return 0;
}
