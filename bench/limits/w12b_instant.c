// W12b's bound: a "manager" that answers every request at once with a canned pickle of
// ('#RETURN', None), after Python 3.11's authkey handshake (the legacy HMAC-MD5 form), one
// forked child per connection. No server can answer a Python client for less; see
// bench/limits/w12b_bound.py, which points a dict proxy at it.
//     cc -O2 bench/limits/w12b_instant.c -o /tmp/w12b_instant -lcrypto
//     python3 bench/limits/w12b_bound.py 10000 /tmp/w12b_instant
#include <openssl/hmac.h>
#include <openssl/rand.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>
static int rd(int fd, void* b, size_t n) { char* p = b; while (n) { ssize_t r = read(fd, p, n); if (r <= 0) return -1; p += r; n -= (size_t)r; } return 0; }
static int wr(int fd, const void* b, size_t n) { const char* p = b; while (n) { ssize_t r = write(fd, p, n); if (r <= 0) return -1; p += r; n -= (size_t)r; } return 0; }
static int recv_frame(int fd, char* buf, size_t cap) { unsigned char h[4]; if (rd(fd, h, 4)) return -1; uint32_t n = (uint32_t)h[0] << 24 | h[1] << 16 | h[2] << 8 | h[3]; if (n > cap) return -1; if (rd(fd, buf, n)) return -1; return (int)n; }
static int send_frame(int fd, const void* b, uint32_t n) { char f[512]; f[0] = (char)(n >> 24); f[1] = (char)(n >> 16); f[2] = (char)(n >> 8); f[3] = (char)n; memcpy(f + 4, b, n); return wr(fd, f, n + 4); }
int main(int argc, char** argv) {
    if (argc != 3) return 2;
    unsigned char key[256]; size_t kl = 0;  // argv[2]: the authkey in hex
    for (const char* h = argv[2]; h[0] && h[1] && kl < sizeof key; h += 2) { char t[3] = {h[0], h[1], 0}; key[kl++] = (unsigned char)strtol(t, NULL, 16); }
    signal(SIGCHLD, SIG_IGN);
    int ls = socket(AF_UNIX, SOCK_STREAM, 0);
    struct sockaddr_un a = {.sun_family = AF_UNIX};
    strncpy(a.sun_path, argv[1], sizeof a.sun_path - 1);
    if (bind(ls, (struct sockaddr*)&a, sizeof a) || listen(ls, 64)) { perror("bind"); return 1; }
    // ('#RETURN', None), protocol 4, as Python's server pickles it.
    static const char reply[] = "\x80\x04\x95\x0e\0\0\0\0\0\0\0\x8c\x07#RETURN\x94N\x86\x94.";
    for (;;) {
        int c = accept(ls, NULL, NULL);
        if (c < 0) continue;
        if (fork() == 0) {
            char buf[4096], msg[64];
            memcpy(msg, "#CHALLENGE#", 11);
            RAND_bytes((unsigned char*)msg + 11, 20);
            if (send_frame(c, msg, 31) || recv_frame(c, buf, sizeof buf) < 0 || send_frame(c, "#WELCOME#", 9)) _exit(0);
            int n = recv_frame(c, buf, sizeof buf);
            if (n < 11) _exit(0);
            unsigned char d[EVP_MAX_MD_SIZE]; unsigned dl = 0;
            HMAC(EVP_md5(), key, (int)kl, (unsigned char*)buf + 11, (size_t)n - 11, d, &dl);
            if (send_frame(c, d, dl) || recv_frame(c, buf, sizeof buf) < 0) _exit(0);
            while (recv_frame(c, buf, sizeof buf) >= 0)
                if (send_frame(c, reply, sizeof reply - 1)) break;
            _exit(0);
        }
        close(c);
    }
}
