// The machine's limit for each workload of bench/run.py: the same work as the mp and Python
// sides, done with raw system calls and shared memory only (no mp). One program, one mode per
// workload; every mode prints one JSON line:
//     {"workload":"W4","value":...,"unit":"msgs/s","size":...,"method":"..."}
//
//     mp_limits W4 [--size N] [--quick]
//     mp_limits info          (the compiler that built this program)
//
// A failed check (a wrong count, a wrong result) or a failed system call exits with status 1
// and a message on stderr: the runner treats that as a broken benchmark, not a slow one.
//
// Waiting on shared memory: a bounded spin (kSpin: 10 us of pause instructions), then
// FUTEX_WAIT. A notifier calls FUTEX_WAKE only when the waiter said it sleeps, so a busy pair of
// processes makes no system calls at all. That is the best a blocking design can do on this
// machine, which is what a "limit" is for.

#include <atomic>
#include <cerrno>
#include <chrono>
#include <climits>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <ctime>
#include <functional>
#include <linux/futex.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <pthread.h>
#include <string>
#include <string_view>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>
#include <unordered_map>
#include <vector>
#include <arpa/inet.h>
#include <fcntl.h>
#include <openssl/crypto.h>
#include <openssl/evp.h>
#include <openssl/hmac.h>
#include <openssl/rand.h>

#include "../big_heap.hpp"
#include "../pin_cpu.hpp"
#include "../workload_args.hpp"

namespace {

using Clock = std::chrono::steady_clock;

[[noreturn]] void die(const char* what) {
    std::fprintf(stderr, "mp_limits: %s: %s\n", what, std::strerror(errno));
    std::exit(1);
}

[[noreturn]] void fail(const std::string& what) {
    std::fprintf(stderr, "mp_limits: %s\n", what.c_str());
    std::exit(1);
}

double seconds_since(Clock::time_point t0) {
    return std::chrono::duration<double>(Clock::now() - t0).count();
}

void print_result(std::string_view workload, double value, std::string_view unit, long long size,
                  std::string_view method) {
    std::printf("{\"workload\":\"%.*s\",\"value\":%.6g,\"unit\":\"%.*s\",\"size\":%lld,"
                "\"method\":\"%.*s\"}\n",
                int(workload.size()), workload.data(), value, int(unit.size()), unit.data(), size,
                int(method.size()), method.data());
    std::fflush(stdout);
}

// ---- raw system call helpers -------------------------------------------------------------------

void write_full(int fd, const void* buf, size_t n) {
    auto* p = static_cast<const char*>(buf);
    while (n > 0) {
        ssize_t w = ::write(fd, p, n);
        if (w < 0) {
            if (errno == EINTR) continue;
            die("write");
        }
        p += w;
        n -= size_t(w);
    }
}

// Returns false on end of file before the first byte; a short read after that is an error.
bool read_full(int fd, void* buf, size_t n) {
    auto* p = static_cast<char*>(buf);
    size_t got = 0;
    while (got < n) {
        ssize_t r = ::read(fd, p + got, n - got);
        if (r < 0) {
            if (errno == EINTR) continue;
            die("read");
        }
        if (r == 0) {
            if (got == 0) return false;
            fail("read: unexpected end of file");
        }
        got += size_t(r);
    }
    return true;
}

pid_t fork_or_die() {
    pid_t pid = ::fork();
    if (pid < 0) die("fork");
    return pid;
}

// Runs fn in a child that leaves with _exit (status 0, or 1 when fn returns false).
pid_t fork_child(const std::function<bool()>& fn) {
    pid_t pid = fork_or_die();
    if (pid == 0) {
        bool ok = fn();
        std::fflush(stdout);
        ::_exit(ok ? 0 : 1);
    }
    return pid;
}

void wait_ok(pid_t pid) {
    int status = 0;
    while (::waitpid(pid, &status, 0) < 0) {
        if (errno != EINTR) die("waitpid");
    }
    if (!WIFEXITED(status) || WEXITSTATUS(status) != 0) fail("a child process failed");
}

void* shared_map(size_t bytes) {
    void* p = ::mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) die("mmap");
    return p;
}

template <class T>
T* shared_new() {
    return new (shared_map(sizeof(T))) T();
}

// ---- futex waiting with a bounded spin ---------------------------------------------------------

// How long a waiter spins before it sleeps: long enough to catch a partner that is running on
// another CPU, short enough not to steal much from one that needs this CPU. A time, not a count:
// a pause instruction takes anything from a few to ~100 cycles depending on the CPU.
constexpr auto kSpin = std::chrono::microseconds(10);

inline void cpu_relax() {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#elif defined(__aarch64__)
    asm volatile("yield");
#endif
}

void futex_wait(std::atomic<uint32_t>* word, uint32_t expected) {
    long r = ::syscall(SYS_futex, reinterpret_cast<uint32_t*>(word), FUTEX_WAIT, expected, nullptr,
                       nullptr, 0);
    if (r < 0 && errno != EAGAIN && errno != EINTR) die("futex_wait");
}

void futex_wake(std::atomic<uint32_t>* word) {
    if (::syscall(SYS_futex, reinterpret_cast<uint32_t*>(word), FUTEX_WAKE, INT_MAX, nullptr,
                  nullptr, 0) < 0)
        die("futex_wake");
}

// A 32-bit word that one side changes and the other side waits on.
struct alignas(64) Signal {
    std::atomic<uint32_t> word{0};
    std::atomic<uint32_t> sleepers{0};

    // Waits until ready() holds; ready() must depend on `word` only.
    template <class Pred>
    void await(Pred ready) {
        if (ready()) return;
        auto spin_until = Clock::now() + kSpin;
        do {
            for (int i = 0; i < 8; ++i) {
                if (ready()) return;
                cpu_relax();
            }
        } while (Clock::now() < spin_until);
        while (!ready()) {
            uint32_t seen = word.load();
            sleepers.fetch_add(1);
            // seq_cst on both sides: either we see the notifier's store here, or the notifier
            // sees our sleepers count and wakes us (store-buffering, Dekker style).
            if (!ready()) futex_wait(&word, seen);
            sleepers.fetch_sub(1);
        }
    }
    void store(uint32_t v) {
        word.store(v);
        if (sleepers.load() != 0) futex_wake(&word);
    }
};

// A start gate: children wait on it so that process creation is not part of the timing.
struct Gate {
    Signal go;
    void wait() {
        go.await([&] { return go.word.load() != 0; });
    }
    void open() { go.store(1); }
};

// ---- a single-producer single-consumer ring of fixed-size slots in shared memory ---------------

struct RingHeader {
    Signal head;  // slots produced (written by the producer)
    Signal tail;  // slots consumed (written by the consumer)
};

class Ring {
public:
    Ring(uint32_t slots, size_t slot_size)
        : slots_(slots), slot_size_(slot_size),
          hdr_(shared_new<RingHeader>()),
          data_(static_cast<char*>(shared_map(size_t(slots) * slot_size))) {
        if ((slots & (slots - 1)) != 0) fail("ring slots must be a power of two");
    }

    void push(const void* msg) {
        uint32_t head = hdr_->head.word.load(std::memory_order_relaxed);
        if (head - cached_tail_ == slots_) {
            hdr_->tail.await([&] { return head - hdr_->tail.word.load() != slots_; });
            cached_tail_ = hdr_->tail.word.load();
        }
        std::memcpy(data_ + size_t(head & (slots_ - 1)) * slot_size_, msg, slot_size_);
        hdr_->head.store(head + 1);
    }

    void pop(void* msg) {
        uint32_t tail = hdr_->tail.word.load(std::memory_order_relaxed);
        if (cached_head_ == tail) {
            hdr_->head.await([&] { return hdr_->head.word.load() != tail; });
            cached_head_ = hdr_->head.word.load();
        }
        std::memcpy(msg, data_ + size_t(tail & (slots_ - 1)) * slot_size_, slot_size_);
        hdr_->tail.store(tail + 1);
    }

private:
    uint32_t slots_;
    size_t slot_size_;
    RingHeader* hdr_;
    char* data_;
    uint32_t cached_tail_ = 0;  // the producer's last view of tail
    uint32_t cached_head_ = 0;  // the consumer's last view of head
};

// ---- W1: start and join a child running an empty function ---------------------------------------

void w1(long long n) {
    auto t0 = Clock::now();
    for (long long i = 0; i < n; ++i) {
        pid_t pid = fork_or_die();
        if (pid == 0) ::_exit(0);
        wait_ok(pid);
    }
    print_result("W1", seconds_since(t0) * 1e6 / double(n), "us", n, "fork + _exit + waitpid");
}

// ---- W1b: the same from a parent with a 2 GiB touched heap (W1b, W1b-spawn) or from this small
// process (W1b-small): the bare fork that mp's forkserver and spawn starts are compared with ------

bool g_quick = false;

void w1b(const char* id, long long n, bool big) {
    if (big) mp_bench::touch_big_heap(mp_bench::big_heap_bytes(g_quick));
    auto t0 = Clock::now();
    for (long long i = 0; i < n; ++i) {
        pid_t pid = fork_or_die();
        if (pid == 0) ::_exit(0);
        wait_ok(pid);
    }
    print_result(id, seconds_since(t0) * 1e6 / double(n), "us", n,
                 big ? "fork + _exit + waitpid from a parent with 2 GiB of touched heap"
                     : "fork + _exit + waitpid from a small parent");
}

// ---- W2: x*x on 2 workers, results in order ---------------------------------------------------
// Per worker a task pipe and a result pipe. A message is {start, count} then count int64 values
// (arguments one way, results the other). The parent keeps both pipes of both workers busy with
// non-blocking I/O and poll(); a worker reads and writes in large batches.

struct ChunkHeader {
    int64_t start;
    int64_t count;
};

bool w2_worker(int task_fd, int result_fd) {
    std::vector<char> in(1 << 16), out;
    size_t have = 0;
    for (;;) {
        ssize_t r = ::read(task_fd, in.data() + have, in.size() - have);
        if (r < 0) {
            if (errno == EINTR) continue;
            die("read");
        }
        if (r == 0) return have == 0;
        have += size_t(r);
        size_t pos = 0;
        out.clear();
        while (have - pos >= sizeof(ChunkHeader)) {
            ChunkHeader h;
            std::memcpy(&h, in.data() + pos, sizeof h);
            size_t need = sizeof h + size_t(h.count) * sizeof(int64_t);
            if (need > in.size()) in.resize(need);
            if (have - pos < need) break;
            size_t o = out.size();
            out.resize(o + need);
            std::memcpy(out.data() + o, &h, sizeof h);
            for (int64_t k = 0; k < h.count; ++k) {
                int64_t x;
                std::memcpy(&x, in.data() + pos + sizeof h + size_t(k) * 8, 8);
                int64_t y = x * x;
                std::memcpy(out.data() + o + sizeof h + size_t(k) * 8, &y, 8);
            }
            pos += need;
        }
        std::memmove(in.data(), in.data() + pos, have - pos);
        have -= pos;
        if (!out.empty()) write_full(result_fd, out.data(), out.size());
    }
}

void set_nonblock(int fd) {
    int fl = ::fcntl(fd, F_GETFL);
    if (fl < 0 || ::fcntl(fd, F_SETFL, fl | O_NONBLOCK) < 0) die("fcntl");
}

void w2(const char* id, long long n, long long chunk) {
    constexpr int W = 2;
    int task_fd[W], result_fd[W];
    pid_t pids[W];
    for (int w = 0; w < W; ++w) {
        int tp[2], rp[2];
        if (::pipe2(tp, O_CLOEXEC) < 0 || ::pipe2(rp, O_CLOEXEC) < 0) die("pipe2");
        pids[w] = fork_or_die();
        if (pids[w] == 0) {
            ::close(tp[1]);
            ::close(rp[0]);
            for (int k = 0; k < w; ++k) {
                ::close(task_fd[k]);
                ::close(result_fd[k]);
            }
            ::_exit(w2_worker(tp[0], rp[1]) ? 0 : 1);
        }
        ::close(tp[0]);
        ::close(rp[1]);
        task_fd[w] = tp[1];
        result_fd[w] = rp[0];
        set_nonblock(task_fd[w]);
        set_nonblock(result_fd[w]);
    }

    std::vector<int64_t> args(static_cast<size_t>(n)), results(static_cast<size_t>(n), -1);
    for (long long i = 0; i < n; ++i) args[size_t(i)] = i;

    auto t0 = Clock::now();
    std::vector<char> outbuf[W], inbuf[W];
    size_t out_pos[W] = {};
    long long next = 0, received = 0;
    int turn = 0;
    while (received < n) {
        // Queue up to 64 KiB of new chunks per worker, round robin.
        while (next < n) {
            int w = turn;
            if (outbuf[w].size() - out_pos[w] >= (1 << 16)) break;
            long long c = std::min(chunk, n - next);
            ChunkHeader h{next, c};
            size_t o = outbuf[w].size();
            outbuf[w].resize(o + sizeof h + size_t(c) * 8);
            std::memcpy(outbuf[w].data() + o, &h, sizeof h);
            std::memcpy(outbuf[w].data() + o + sizeof h, &args[size_t(next)], size_t(c) * 8);
            next += c;
            turn = (turn + 1) % W;
        }
        pollfd fds[2 * W];
        for (int w = 0; w < W; ++w) {
            fds[2 * w] = {task_fd[w], short(out_pos[w] < outbuf[w].size() ? POLLOUT : 0), 0};
            fds[2 * w + 1] = {result_fd[w], POLLIN, 0};
        }
        if (::poll(fds, 2 * W, -1) < 0) {
            if (errno == EINTR) continue;
            die("poll");
        }
        for (int w = 0; w < W; ++w) {
            if (fds[2 * w].revents & (POLLOUT | POLLERR)) {
                ssize_t k = ::write(task_fd[w], outbuf[w].data() + out_pos[w],
                                    outbuf[w].size() - out_pos[w]);
                if (k < 0 && errno != EAGAIN && errno != EINTR) die("write");
                if (k > 0) out_pos[w] += size_t(k);
                if (out_pos[w] == outbuf[w].size()) {
                    outbuf[w].clear();
                    out_pos[w] = 0;
                }
            }
            if (fds[2 * w + 1].revents & (POLLIN | POLLHUP | POLLERR)) {
                char buf[1 << 16];
                ssize_t k = ::read(result_fd[w], buf, sizeof buf);
                if (k < 0 && errno != EAGAIN && errno != EINTR) die("read");
                if (k == 0) fail("W2: a worker closed its result pipe");
                if (k > 0) inbuf[w].insert(inbuf[w].end(), buf, buf + k);
                size_t pos = 0;
                while (inbuf[w].size() - pos >= sizeof(ChunkHeader)) {
                    ChunkHeader h;
                    std::memcpy(&h, inbuf[w].data() + pos, sizeof h);
                    size_t need = sizeof h + size_t(h.count) * 8;
                    if (inbuf[w].size() - pos < need) break;
                    std::memcpy(&results[size_t(h.start)], inbuf[w].data() + pos + sizeof h,
                                size_t(h.count) * 8);
                    received += h.count;
                    pos += need;
                }
                inbuf[w].erase(inbuf[w].begin(), inbuf[w].begin() + long(pos));
            }
        }
    }
    double dt = seconds_since(t0);
    for (int w = 0; w < W; ++w) ::close(task_fd[w]);
    for (int w = 0; w < W; ++w) {
        wait_ok(pids[w]);
        ::close(result_fd[w]);
    }
    for (long long i = 0; i < n; ++i)
        if (results[size_t(i)] != i * i) fail("W2: wrong result");
    print_result(id, double(n) / dt, "tasks/s", n,
                 chunk == 1 ? "pipes, one message per task, batched I/O, poll"
                            : "pipes, one message per 1000-task chunk, poll");
}

// ---- W3: CPU-bound tasks of 20 ms, parallel efficiency on 2 workers ---------------------------

double thread_cpu_seconds() {
    timespec ts;
    ::clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
    return double(ts.tv_sec) + double(ts.tv_nsec) * 1e-9;
}

// Burns `ms` milliseconds of this thread's CPU time in an arithmetic loop; returns a checksum.
uint32_t burn(uint32_t seed, double ms) {
    double end = thread_cpu_seconds() + ms * 1e-3;
    uint32_t x = seed;
    do {
        for (int i = 0; i < 10000; ++i) x = x * 1103515245u + 12345u;
        asm volatile("" : "+r"(x));
    } while (thread_cpu_seconds() < end);
    return x;
}

struct W3Shared {
    Gate gate;
    std::atomic<uint32_t> next{0};
    std::atomic<uint32_t> done{0};
};

void w3(long long tasks, double task_ms) {
    auto t0 = Clock::now();
    for (long long i = 0; i < tasks; ++i) burn(uint32_t(i), task_ms);
    double serial = seconds_since(t0);

    auto* sh = shared_new<W3Shared>();
    pid_t pids[2];
    for (auto& pid : pids) {
        pid = fork_child([&] {
            sh->gate.wait();
            for (;;) {
                uint32_t i = sh->next.fetch_add(1);
                if (i >= tasks) return true;
                burn(i, task_ms);
                sh->done.fetch_add(1);
            }
        });
    }
    t0 = Clock::now();
    sh->gate.open();
    for (pid_t pid : pids) wait_ok(pid);
    double parallel = seconds_since(t0);
    if (sh->done.load() != tasks) fail("W3: wrong task count");
    print_result("W3", serial / (2 * parallel), "efficiency", tasks,
                 "2 forked children take task indices from a shared atomic counter");
}

// ---- W4/W5: producer to consumer through a shared-memory ring -----------------------------------

void ring_transfer(const char* id, long long n, size_t msg_size, uint32_t slots, bool bandwidth) {
    Ring ring(slots, msg_size);
    auto* gate = shared_new<Gate>();
    pid_t producer = fork_child([&] {
        std::vector<char> msg(msg_size);
        for (size_t i = 0; i < msg_size; ++i) msg[i] = char(i);
        gate->wait();
        for (long long i = 0; i < n; ++i) {
            std::memcpy(msg.data(), &i, sizeof i);
            ring.push(msg.data());
        }
        return true;
    });
    std::vector<char> msg(msg_size);
    auto t0 = Clock::now();
    gate->open();
    for (long long i = 0; i < n; ++i) {
        ring.pop(msg.data());
        long long seq;
        std::memcpy(&seq, msg.data(), sizeof seq);
        if (seq != i) fail(std::string(id) + ": message out of order");
    }
    double dt = seconds_since(t0);
    wait_ok(producer);
    if (bandwidth)
        print_result(id, double(n) * double(msg_size) / dt / 1e6, "MB/s", n,
                     "shared-memory SPSC ring of 4 x 1 MiB slots, memcpy in and out, spin+futex");
    else
        print_result(id, double(n) / dt, "msgs/s", n,
                     "shared-memory SPSC ring of 4096 x 64 B slots, spin+futex");
}

// A reference for W5: one process copying 1 MiB blocks (what memcpy alone costs).
void memcpy_bandwidth(long long bytes) {
    constexpr size_t block = 1 << 20;
    std::vector<char> src(block, 1), dst(block);
    long long n = bytes / (long long)block;
    auto t0 = Clock::now();
    for (long long i = 0; i < n; ++i) {
        src[0] = char(i);
        std::memcpy(dst.data(), src.data(), block);
        asm volatile("" : : "r"(dst.data()) : "memory");
    }
    double dt = seconds_since(t0);
    print_result("memcpy", double(n) * double(block) / dt / 1e6, "MB/s", n,
                 "memcpy of 1 MiB blocks in one process");
}

// ---- W6: 8-byte round trips ------------------------------------------------------------------

// W6-pipe: a duplex Pipe is a stream socketpair on every side (mp's and Python's alike), so its
// limit is the same kernel object driven by bare write/read. W6-pipe-oneway: two one-way Pipes are
// two pipe(2)s, and so is its limit.
void ping_pong(const char* name, int ping_w, int ping_r, int pong_w, int pong_r, long long n,
               const char* method) {
    pid_t child = fork_child([&] {
        ::close(ping_w);
        if (pong_r != ping_w) ::close(pong_r);
        uint64_t v;
        while (read_full(ping_r, &v, sizeof v)) write_full(pong_w, &v, sizeof v);
        return true;
    });
    if (ping_r != pong_w) ::close(ping_r);
    ::close(pong_w);
    auto t0 = Clock::now();
    for (long long i = 0; i < n; ++i) {
        uint64_t v = uint64_t(i), r = 0;
        write_full(ping_w, &v, sizeof v);
        if (!read_full(pong_r, &r, sizeof r) || r != v) fail(std::string(name) + ": wrong echo");
    }
    double dt = seconds_since(t0);
    if (ping_w != pong_r) ::close(ping_w);
    else ::shutdown(ping_w, SHUT_WR);
    wait_ok(child);
    ::close(pong_r);
    print_result(name, dt * 1e6 / double(n), "us", n, method);
}

void w6_pipe(long long n) {
    int s[2];
    if (::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, s) < 0) die("socketpair");
    ping_pong("W6-pipe", s[0], s[1], s[1], s[0], n,
              "AF_UNIX stream socketpair ping-pong, 8-byte write/read");
}

void w6_pipe_oneway(long long n) {
    int ping[2], pong[2];
    if (::pipe2(ping, O_CLOEXEC) < 0 || ::pipe2(pong, O_CLOEXEC) < 0) die("pipe2");
    ping_pong("W6-pipe-oneway", ping[1], ping[0], pong[1], pong[0], n,
              "two pipes, ping-pong, 8-byte write/read");
}

struct PingPong {
    Signal ping;  // sequence number of the last ping
    Signal pong;  // sequence number of the last pong
    alignas(64) uint64_t payload[2];
};

void w6_futex(long long n) {
    auto* pp = shared_new<PingPong>();
    pid_t child = fork_child([&] {
        for (uint32_t i = 1; i <= uint32_t(n); ++i) {
            pp->ping.await([&] { return pp->ping.word.load() == i; });
            pp->payload[1] = pp->payload[0];
            pp->pong.store(i);
        }
        return true;
    });
    auto t0 = Clock::now();
    for (uint32_t i = 1; i <= uint32_t(n); ++i) {
        pp->payload[0] = i;
        pp->ping.store(i);
        pp->pong.await([&] { return pp->pong.word.load() == i; });
        if (pp->payload[1] != i) fail("W6-queue: wrong echo");
    }
    double dt = seconds_since(t0);
    wait_ok(child);
    print_result("W6-queue", dt * 1e6 / double(n), "us", n,
                 "shared-memory ping-pong, 8-byte payload, spin+futex");
}

// ---- W7: a process-shared mutex around a shared counter ---------------------------------------

// Drepper's three-state futex mutex ("Futexes Are Tricky", mutex3): 0 free, 1 locked, 2 locked
// and maybe waited for. One CAS to lock, one atomic decrement to unlock, FUTEX_WAKE only in
// state 2. Not robust: the least a process-shared lock costs, which mp's robust lock is held to.
struct FutexMutex {
    std::atomic<uint32_t> word{0};

    void lock() {
        uint32_t c = 0;
        if (word.compare_exchange_strong(c, 1, std::memory_order_acquire)) return;
        if (c != 2) c = word.exchange(2, std::memory_order_acquire);
        while (c != 0) {
            futex_wait(&word, 2);
            c = word.exchange(2, std::memory_order_acquire);
        }
    }
    void unlock() {
        if (word.fetch_sub(1, std::memory_order_release) != 1) {
            word.store(0, std::memory_order_release);
            if (::syscall(SYS_futex, reinterpret_cast<uint32_t*>(&word), FUTEX_WAKE, 1, nullptr,
                          nullptr, 0) < 0)
                die("futex_wake");
        }
    }
};

// The same mutex with a waiter that spins before it sleeps, as mp's lock does: it reads the word
// at growing intervals (8 rounds of 8 << round pauses, the shift capped at 5: ~1,000 pauses) and
// tries the lock whenever it reads it free; only then does it take the sleeping path, and it
// spins again after each wake-up. W7-spin's limit: W7's row compares mp's lock with a mutex
// whose waiters sleep at once, this one with a mutex that spends its waiting the same way.
struct SpinFutexMutex : FutexMutex {
    void lock() {
        uint32_t c = 0;
        if (word.compare_exchange_strong(c, 1, std::memory_order_acquire)) return;
        for (;;) {
            for (int round = 0; round < 8; ++round) {
                for (int i = 8 << (round < 5 ? round : 5); i > 0; --i) cpu_relax();
                c = word.load(std::memory_order_relaxed);
                if (c == 0 && word.compare_exchange_strong(c, 1, std::memory_order_acquire))
                    return;
            }
            if (word.exchange(2, std::memory_order_acquire) == 0) return;
            futex_wait(&word, 2);
        }
    }
    // unlock: FutexMutex's (one decrement, FUTEX_WAKE only from state 2).
};

template <class Mutex>
struct W7Shared {
    Gate gate;
    alignas(64) Mutex mutex;
    alignas(64) long long counter = 0;
};

template <class Mutex>
void w7(const char* id, const char* method, long long n) {
    auto* sh = shared_new<W7Shared<Mutex>>();
    pid_t pids[2];
    for (int k = 0; k < 2; ++k) {
        pids[k] = fork_child([&] {
            mp_bench::pin_to_cpu(k);  // one per CPU, as on every side (pin_cpu.hpp)
            sh->gate.wait();
            for (long long i = 0; i < n; ++i) {
                sh->mutex.lock();
                ++sh->counter;
                sh->mutex.unlock();
            }
            return true;
        });
    }
    auto t0 = Clock::now();
    sh->gate.open();
    for (pid_t pid : pids) wait_ok(pid);
    double dt = seconds_since(t0);
    if (sh->counter != 2 * n) fail("W7: wrong final count");
    print_result(id, dt * 1e9 / double(2 * n), "ns", n, method);
}

// ---- W8: TCP on 127.0.0.1 ---------------------------------------------------------------------

int tcp_listener(uint16_t* port) {
    int fd = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0) die("socket");
    int one = 1;
    ::setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    sockaddr_in a{};
    a.sin_family = AF_INET;
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (::bind(fd, reinterpret_cast<sockaddr*>(&a), sizeof a) < 0) die("bind");
    if (::listen(fd, 512) < 0) die("listen");
    socklen_t len = sizeof a;
    if (::getsockname(fd, reinterpret_cast<sockaddr*>(&a), &len) < 0) die("getsockname");
    *port = ntohs(a.sin_port);
    return fd;
}

int tcp_connect(uint16_t port) {
    int fd = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0) die("socket");
    sockaddr_in a{};
    a.sin_family = AF_INET;
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    a.sin_port = htons(port);
    while (::connect(fd, reinterpret_cast<sockaddr*>(&a), sizeof a) < 0) {
        if (errno != EINTR) die("connect");
    }
    int one = 1;
    ::setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    return fd;
}

// The server answers each 8-byte request with the same 8 bytes, until the client closes;
// one connection at a time, as a single-threaded multiprocessing.connection.Listener would.
void echo_requests(int c, bool* any) {
    uint64_t v;
    while (read_full(c, &v, sizeof v)) {
        *any = true;
        write_full(c, &v, sizeof v);
    }
}

// The next connection on `lfd`, with TCP_NODELAY.
int accept_nodelay(int lfd) {
    for (;;) {
        const int c = ::accept4(lfd, nullptr, nullptr, SOCK_CLOEXEC);
        if (c < 0) {
            if (errno == EINTR) continue;
            die("accept4");
        }
        int one = 1;
        ::setsockopt(c, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
        return c;
    }
}

pid_t tcp_echo_server(int lfd) {
    return fork_child([&] {
        for (;;) {
            const int c = accept_nodelay(lfd);
            bool any = false;
            echo_requests(c, &any);
            ::close(c);
            if (!any) return true;  // an empty connection is the stop signal
        }
    });
}

// W8a's handshake: the least a mutual HMAC-SHA256 challenge-response over TCP costs, with the
// messages in mp's order and pipelined as mp pipelines them (src/listener.cpp):
//     server -> client   32-byte random challenge Cs
//     client -> server   HMAC-SHA256(key, Cs) + 32-byte random challenge Cc   (one write)
//     server -> client   1-byte OK + HMAC-SHA256(key, Cc)                     (one write)
//     client -> server   1-byte OK + the 8-byte request                       (one write)
//     server -> client   the 8-byte reply
// MACs are checked with CRYPTO_memcmp; challenges come from RAND_bytes.
constexpr std::string_view kW8Key = "mp-bench-secret-key";  // bench/python/workloads.py's AUTHKEY
constexpr size_t kNonce = 32;
constexpr size_t kMac = 32;  // SHA-256
constexpr unsigned char kOk = 1;

void random_challenge(unsigned char* out) {
    if (RAND_bytes(out, int(kNonce)) != 1) fail("RAND_bytes failed");
}

void hmac_sha256(const unsigned char* challenge, unsigned char* out) {
    unsigned int len = 0;
    if (HMAC(EVP_sha256(), kW8Key.data(), int(kW8Key.size()), challenge, kNonce, out, &len) ==
            nullptr ||
        len != kMac)
        fail("HMAC failed");
}

bool mac_ok(const unsigned char* challenge, const unsigned char* mac) {
    unsigned char expected[kMac];
    hmac_sha256(challenge, expected);
    return CRYPTO_memcmp(expected, mac, kMac) == 0;
}

// The server's side of W8a: handshake, then echo. A client that reads the challenge and closes
// is the stop signal.
pid_t tcp_auth_echo_server(int lfd) {
    return fork_child([&] {
        for (;;) {
            const int c = accept_nodelay(lfd);
            unsigned char cs[kNonce];
            random_challenge(cs);
            write_full(c, cs, sizeof cs);
            unsigned char in[kMac + kNonce];  // their MAC of cs, their challenge
            if (!read_full(c, in, sizeof in)) {
                ::close(c);
                return true;
            }
            if (!mac_ok(cs, in)) fail("W8a: the client's MAC is wrong");
            unsigned char out[1 + kMac];
            out[0] = kOk;
            hmac_sha256(in + kMac, out + 1);
            write_full(c, out, sizeof out);
            unsigned char request[1 + 8];  // OK, then the first request (one write)
            if (!read_full(c, request, sizeof request) || request[0] != kOk)
                fail("W8a: the client refused our MAC");
            write_full(c, request + 1, 8);
            bool any = false;
            echo_requests(c, &any);
            ::close(c);
        }
    });
}

void w8a(long long ms) {
    uint16_t port = 0;
    int lfd = tcp_listener(&port);
    pid_t server = tcp_auth_echo_server(lfd);
    ::close(lfd);
    long long count = 0;
    auto t0 = Clock::now();
    auto end = t0 + std::chrono::milliseconds(ms);
    while (Clock::now() < end) {
        int fd = tcp_connect(port);
        unsigned char cs[kNonce];
        if (!read_full(fd, cs, sizeof cs)) fail("W8a: no challenge");
        unsigned char out[kMac + kNonce];  // our MAC of cs, our challenge
        hmac_sha256(cs, out);
        random_challenge(out + kMac);
        write_full(fd, out, sizeof out);
        unsigned char in[1 + kMac];  // OK, their MAC of our challenge
        if (!read_full(fd, in, sizeof in) || in[0] != kOk) fail("W8a: the server refused our MAC");
        if (!mac_ok(out + kMac, in + 1)) fail("W8a: the server's MAC is wrong");
        unsigned char request[1 + 8];  // OK, then the request
        request[0] = kOk;
        uint64_t v = uint64_t(count), r = 0;
        std::memcpy(request + 1, &v, sizeof v);
        write_full(fd, request, sizeof request);
        if (!read_full(fd, &r, sizeof r) || r != v) fail("W8a: wrong echo");
        ::close(fd);
        ++count;
    }
    double dt = seconds_since(t0);
    int stop = tcp_connect(port);  // read the challenge, then close: the stop signal
    unsigned char cs[kNonce];
    if (!read_full(stop, cs, sizeof cs)) fail("W8a: no challenge");
    ::close(stop);
    wait_ok(server);
    print_result("W8a", double(count) / dt, "requests/s", ms,
                 "TCP connect/accept, TCP_NODELAY, mutual HMAC-SHA256 challenge-response "
                 "(libcrypto; 32-byte challenges, answer and counter-challenge in one write), "
                 "one 8-byte request and reply, close");
}

void w8b(long long n) {
    uint16_t port = 0;
    int lfd = tcp_listener(&port);
    pid_t server = tcp_echo_server(lfd);
    ::close(lfd);
    int fd = tcp_connect(port);
    auto t0 = Clock::now();
    for (long long i = 0; i < n; ++i) {
        uint64_t v = uint64_t(i), r = 0;
        write_full(fd, &v, sizeof v);
        if (!read_full(fd, &r, sizeof r) || r != v) fail("W8b: wrong echo");
    }
    double dt = seconds_since(t0);
    ::close(fd);
    ::close(tcp_connect(port));
    wait_ok(server);
    print_result("W8b", dt * 1e6 / double(n), "us", n,
                 "TCP ping-pong on one connection, 8 bytes, TCP_NODELAY (no auth)");
}

// ---- W9: a server process holding a hash map, over a unix socket --------------------------------

struct MapRequest {
    int64_t op;  // 1 = set, 2 = get
    int64_t key;
    int64_t value;
};

void w9(long long n) {
    int sv[2];
    if (::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv) < 0) die("socketpair");
    int report[2];
    if (::pipe2(report, O_CLOEXEC) < 0) die("pipe2");
    pid_t server = fork_child([&] {
        ::close(sv[1]);
        std::unordered_map<int64_t, int64_t> map;
        MapRequest rq;
        while (read_full(sv[0], &rq, sizeof rq)) {
            int64_t reply = 0;
            if (rq.op == 1)
                map[rq.key] = rq.value;
            else
                reply = map.at(rq.key);
            write_full(sv[0], &reply, sizeof reply);
        }
        return true;
    });
    pid_t client = fork_child([&] {
        ::close(sv[0]);
        auto t0 = Clock::now();
        for (long long i = 0; i < n; ++i) {
            int64_t reply;
            MapRequest set{1, i, i};
            write_full(sv[1], &set, sizeof set);
            if (!read_full(sv[1], &reply, sizeof reply)) return false;
            MapRequest get{2, i, 0};
            write_full(sv[1], &get, sizeof get);
            if (!read_full(sv[1], &reply, sizeof reply) || reply != i) return false;
        }
        double dt = seconds_since(t0);
        write_full(report[1], &dt, sizeof dt);
        return true;
    });
    ::close(sv[0]);
    ::close(sv[1]);
    ::close(report[1]);
    double dt = 0;
    bool got = read_full(report[0], &dt, sizeof dt);
    wait_ok(client);
    wait_ok(server);
    if (!got) fail("W9: the client reported nothing");
    print_result("W9", double(2 * n) / dt, "ops/s", n,
                 "unix socketpair request/reply to a server process holding an unordered_map");
}

// ---- main -------------------------------------------------------------------------------------

// A workload with no limit side: the table shows n/a.
void no_limit(const char* id, const char* unit, long long n) {
    std::printf("{\"workload\":\"%s\",\"value\":null,\"unit\":\"%s\",\"size\":%lld,"
                "\"method\":\"none: no raw-syscall version (see bench/README.md)\"}\n",
                id, unit, n);
    std::fflush(stdout);
}

struct Mode {
    const char* id;
    long long full;
    long long quick;
    void (*run)(long long size);
};

const Mode kModes[] = {
    {"W1", 200, 20, w1},
    {"W1b", 5, 2, [](long long n) { w1b("W1b", n, true); }},
    {"W1b-spawn", 5, 2, [](long long n) { w1b("W1b-spawn", n, true); }},
    {"W1b-small", 200, 20, [](long long n) { w1b("W1b-small", n, false); }},
    {"W2a", 100000, 2000, [](long long n) { w2("W2a", n, 1); }},
    // The bare pipes keep no state between batches: W2a-steady's limit is W2a's.
    {"W2a-steady", 100000, 2000, [](long long n) { w2("W2a-steady", n, 1); }},
    {"W2b", 100000, 10000, [](long long n) { w2("W2b", n, 1000); }},
    {"W3", 64, 8, [](long long n) { w3(n, 20.0); }},
    {"W4", 1000000, 20000, [](long long n) { ring_transfer("W4", n, 64, 4096, false); }},
    {"W5", 1024, 16,
     [](long long n) { ring_transfer("W5", n, size_t(1) << 20, 4, true); }},  // size in MiB
    {"W6-pipe", 100000, 2000, w6_pipe},
    {"W6-pipe-oneway", 100000, 2000, w6_pipe_oneway},
    {"W6-queue", 100000, 2000, w6_futex},
    {"W7", 1000000, 20000,
     [](long long n) {
         w7<FutexMutex>("W7", "Drepper three-state futex mutex in MAP_SHARED memory, 2 processes, "
                              "one per CPU", n);
     }},
    {"W7-spin", 1000000, 20000,
     [](long long n) {
         w7<SpinFutexMutex>("W7-spin", "the same mutex, its waiter spinning at growing intervals "
                                       "(~1,000 pauses) before it sleeps, 2 processes, one per CPU",
                            n);
     }},
    {"W8a", 3000, 200, w8a},  // size in milliseconds
    {"W8b", 20000, 1000, w8b},
    {"W9", 20000, 1000, w9},
    // W12a and W12b time Python's client code against two peers or servers, and W12a-decode(-flat)
    // compare two decoders: none has a raw-syscall version (W9's limit is the floor for a
    // manager round trip, W6-pipe's for a round trip).
    {"W12a", 20000, 1000, [](long long n) { no_limit("W12a", "round trips/s", n); }},
    {"W12a-decode", 200000, 10000, [](long long n) { no_limit("W12a-decode", "ns", n); }},
    {"W12a-decode-flat", 200000, 10000, [](long long n) { no_limit("W12a-decode-flat", "ns", n); }},
    {"W12b", 20000, 1000, [](long long n) { no_limit("W12b", "ops/s", n); }},
    {"memcpy", 1024, 16, [](long long mib) { memcpy_bandwidth(mib << 20); }},
};

int usage() {
    std::fprintf(stderr, "usage: mp_limits <workload> [--size N] [--quick] | info\nworkloads:");
    for (const auto& m : kModes) std::fprintf(stderr, " %s", m.id);
    std::fprintf(stderr, "\n");
    return 2;
}

}  // namespace

int main(int argc, char** argv) {
    if (argc < 2) return usage();
    std::string_view id = argv[1];
    if (id == "info") {
        std::printf("{\"compiler\":\"%s %s\"}\n",
#if defined(__clang__)
                    "clang",
#else
                    "gcc",
#endif
                    __VERSION__);
        return 0;
    }
    mp_bench::WorkloadArgs args;
    if (!mp_bench::parse_workload_args(argc, argv, args)) return usage();
    const bool quick = args.quick;
    g_quick = quick;
    long long size = args.size;
    for (const auto& m : kModes) {
        if (id == m.id) {
            m.run(size > 0 ? size : quick ? m.quick : m.full);
            return 0;
        }
    }
    return usage();
}
