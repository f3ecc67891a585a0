// The mp side of each bench/run.py workload. One program, one mode per workload; every mode
// prints one JSON line:
//     {"workload":"W1","value":412.3,"unit":"us","size":200,"method":"..."}
// and a workload whose mp primitive has not landed yet prints "value":null (shown as n/a).
//
//     mp_workloads W1 [--size N] [--quick]
//     mp_workloads info       (the compiler that built this program)
//     mp_workloads list       (the workloads and whether each is implemented)
//
// Adding a workload's mp side (a later issue): write one function
//     double wN(long long size)     // does the work `size` times, returns the value in `unit`
// next to the others, and put its name in the kWorkloads row instead of nullptr. Definitions are
// in bench/README.md and must match bench/python/workloads.py and bench/limits/limits.cpp.
// A failed check throws: the program exits 1 and the runner reports a broken benchmark.

#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <ctime>
#include <exception>
#include <map>
#include <mutex>
#include <optional>
#include <ranges>
#include <stdexcept>
#include <string>
#include <string_view>
#include <vector>

#include "workload_args.hpp"
#include "big_heap.hpp"
#include "pin_cpu.hpp"
#include "start_join.hpp"
#include "executor_work.hpp"
#include "mp/mp.hpp"

#include <unistd.h>

namespace {

using Clock = std::chrono::steady_clock;

double seconds_since(Clock::time_point t0) {
    return std::chrono::duration<double>(Clock::now() - t0).count();
}

void check(bool ok, const char* what) {
    if (!ok) throw std::runtime_error(what);
}

// ---- W1: start and join a child running an empty function, in sequence (us each) -------------

double w1(long long n) {
    return mp_bench::start_join_each(n, {}, false, "W1: the child did not exit with 0");
}

// ---- W1b: start + join of an empty child from a parent with a 2 GiB touched heap (us each) ------
// After one start outside the timing. W1b-small: the forkserver from this process (run.py takes
// that row from mp_start_min, the smallest mp program; this mode stays for runs by hand).

bool g_quick = false;

double w1b(long long n, mp::StartMethod method) {
    mp_bench::touch_big_heap(mp_bench::big_heap_bytes(g_quick));
    return mp_bench::start_join_each(n, {.start_method = method}, true, "W1b: the child did not exit with 0");
}

// ---- W2: x*x on 2 workers, results in order (tasks/s) --------------------------------------------

using mp_bench::square;
using mp_bench::warm;

// W2a: submit every task, then the result of each, in order.
double w2a(long long n) {
    mp::ProcessPoolExecutor ex({.max_workers = 2});
    return mp_bench::submit_then_results(ex, n, "W2a: wrong results");
}

// W2a-steady: the same on a pool that has already run three such batches (W2a measures the
// first batch on a freshly started pool: what a short program sees).
double w2a_steady(long long n) {
    mp::ProcessPoolExecutor ex({.max_workers = 2});
    for (int batch = 0; batch < 3; ++batch)
        (void)mp_bench::submit_then_results(ex, n, "W2a-steady: wrong results");
    return mp_bench::submit_then_results(ex, n, "W2a-steady: wrong results");
}

// W2b: the same with map in chunks of 1,000.
double w2b(long long n) {
    mp::ProcessPoolExecutor ex({.max_workers = 2});
    return mp_bench::chunked_map(ex, n, "W2b: wrong results");
}

// ---- W3: CPU-bound tasks of 20 ms on 2 workers: serial / (2 x parallel) (efficiency) -----------

constexpr double kTaskMs = 20.0;

double thread_cpu_seconds() {
    timespec ts;
    ::clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
    return double(ts.tv_sec) + double(ts.tv_nsec) * 1e-9;
}

// Burns kTaskMs of this thread's CPU time in an arithmetic loop; returns a checksum (Python's
// `burn`, and the limit's).
std::uint32_t burn(std::uint32_t seed) {
    const double end = thread_cpu_seconds() + kTaskMs * 1e-3;
    std::uint32_t x = seed;
    do {
        for (int i = 0; i < 10000; ++i) x = x * 1103515245u + 12345u;
        asm volatile("" : "+r"(x));
    } while (thread_cpu_seconds() < end);
    return x;
}

double w3(long long n) {
    const auto tasks = static_cast<std::uint32_t>(n);
    auto t0 = Clock::now();
    for (std::uint32_t i = 0; i < tasks; ++i) burn(i);
    const double serial = seconds_since(t0);

    mp::ProcessPoolExecutor ex({.max_workers = 2});
    warm(ex);
    t0 = Clock::now();
    auto out = ex.map(burn, mp_bench::counting(0u, tasks)).to_vector();  // chunksize 1
    const double parallel = seconds_since(t0);
    check(out.size() == tasks, "W3: wrong task count");
    return serial / (2 * parallel);
}

// ---- W4 / W5: one producer process -> one consumer process (msgs/s, MB/s) ------------------------
double queue_transfer(long long n, std::size_t size) {
    mp::Queue<std::string> q;
    mp::Process producer([q, n, size]() mutable {
        const std::string msg(size, '\x01');
        for (long long i = 0; i < n; ++i) q.put(msg);
    });
    auto t0 = Clock::now();
    producer.start();
    std::size_t bytes = 0;
    for (long long i = 0; i < n; ++i) bytes += q.get().size();
    const double dt = seconds_since(t0);
    producer.join();
    check(producer.exitcode() == 0, "queue transfer: the producer failed");
    check(bytes == static_cast<std::size_t>(n) * size, "queue transfer: wrong byte count");
    return dt;
}
double w4(long long n) { return double(n) / queue_transfer(n, 64); }
double w5(long long n) { return double(n) * double(1 << 20) / queue_transfer(n, 1 << 20) / 1e6; }

// ---- W6-queue: 8-byte round trips over two Queues (us each) -------------------------------------
double w6_queue(long long n) {
    mp::Queue<std::string> ping, pong;
    mp::Process echo([ping, pong]() mutable {
        for (;;) {
            std::string m = ping.get();
            if (m.empty()) return;
            pong.put(m);
        }
    });
    echo.start();
    const std::string msg(8, '\x01');
    ping.put(msg);
    check(pong.get() == msg, "W6-queue: wrong echo");
    auto t0 = Clock::now();
    for (long long i = 0; i < n; ++i) {
        ping.put(msg);
        check(pong.get() == msg, "W6-queue: wrong echo");
    }
    const double dt = seconds_since(t0);
    ping.put(std::string());
    echo.join();
    return dt * 1e6 / double(n);
}

// ---- W6-pipe: 8-byte round trips over a duplex Pipe; W6-pipe-oneway: over two one-way Pipes ----
// (us each). The echo child gets the ends it uses and closes its copies of the parent's.
double ping_pong(mp::Connection ping_w, mp::Connection ping_r, mp::Connection pong_w,
                 mp::Connection pong_r, long long n) {
    mp::Process echo([ping_r, pong_w, ping_w, pong_r]() mutable {
        ping_w.close();
        pong_r.close();
        for (;;) {
            std::string m = ping_r.recv_bytes();
            if (m.empty()) return;
            pong_w.send_bytes(m);
        }
    });
    echo.start();
    ping_r.close();
    pong_w.close();
    const std::string msg(8, '\x01');
    ping_w.send_bytes(msg);
    check(pong_r.recv_bytes() == msg, "W6-pipe: wrong echo");
    auto t0 = Clock::now();
    for (long long i = 0; i < n; ++i) {
        ping_w.send_bytes(msg);
        check(pong_r.recv_bytes() == msg, "W6-pipe: wrong echo");
    }
    const double dt = seconds_since(t0);
    ping_w.send_bytes(std::string());
    echo.join();
    return dt * 1e6 / double(n);
}
double w6_pipe(long long n) {
    auto [here, there] = mp::Pipe();
    return ping_pong(here, there, there, here, n);
}
double w6_pipe_oneway(long long n) {
    auto [ping_r, ping_w] = mp::Pipe(false);
    auto [pong_r, pong_w] = mp::Pipe(false);
    return ping_pong(ping_w, ping_r, pong_w, pong_r, n);
}

// ---- W7: 2 processes each doing n lock / increment / unlock on a shared counter (ns each) -------

void incrementer(mp::Value<long long> counter, mp::Event start, long long n, int cpu) {
    mp_bench::pin_to_cpu(cpu);
    start.wait();
    for (long long i = 0; i < n; ++i) {
        std::lock_guard guard(counter.get_lock());
        ++counter.get_obj();
    }
}

double w7(long long n) {
    mp::Value<long long> counter(0);  // with its lock (an RLock by default, as Python's Value)
    mp::Event start;
    mp::Process a(incrementer, counter, start, n, 0);  // one per CPU (pin_cpu.hpp)
    mp::Process b(incrementer, counter, start, n, 1);
    a.start();
    b.start();
    auto t0 = Clock::now();
    start.set();
    a.join();
    b.join();
    double dt = seconds_since(t0);
    check(a.exitcode() == 0 && b.exitcode() == 0, "W7: an incrementer failed");
    check(counter.get() == 2 * n, "W7: wrong final count");
    return dt * 1e9 / double(2 * n);
}

// ---- W8: Listener/Client with an authkey on 127.0.0.1 ------------------------------------------

const char kW8Authkey[] = "mp-bench-secret-key";

// One connection at a time, echoing; an empty request is the stop signal. The listener lives in
// this child and reports its port (port 0 asked for) through `report`.
void w8_echo_server(mp::Connection report) {
    mp::Listener listener(mp::Address("127.0.0.1", 0), {.authkey = std::string(kW8Authkey)});
    report.send(static_cast<int>(listener.address().port));
    for (;;) {
        mp::Connection c = listener.accept();
        try {
            for (;;) {
                std::string m = c.recv_bytes();
                if (m.empty()) return;
                c.send_bytes(m);
            }
        } catch (const mp::EOFError&) {
        }
    }
}

// Starts `p` (running w8_echo_server(w)) and returns the address it listens on.
mp::Address w8_start_server(mp::Process& p, mp::Connection& r, mp::Connection& w) {
    p.start();
    w.close();
    return mp::Address("127.0.0.1", static_cast<std::uint16_t>(r.recv<int>()));
}

void w8_stop_server(mp::Process& p, const mp::Address& address) {
    mp::Client(address, {.authkey = std::string(kW8Authkey)}).send_bytes("");
    p.join();
    check(p.exitcode() == 0, "W8: the server failed");
}

double w8a(long long ms) {
    auto [r, w] = mp::Pipe(false);
    mp::Process server(w8_echo_server, w);
    const mp::Address address = w8_start_server(server, r, w);
    const std::string msg(8, '\x01');
    long long count = 0;
    auto t0 = Clock::now();
    const auto end = t0 + std::chrono::milliseconds(ms);
    while (Clock::now() < end) {
        mp::Connection c = mp::Client(address, {.authkey = std::string(kW8Authkey)});
        c.send_bytes(msg);
        check(c.recv_bytes() == msg, "W8a: wrong echo");
        ++count;
    }
    const double dt = seconds_since(t0);
    w8_stop_server(server, address);
    return double(count) / dt;
}

double w8b(long long n) {
    auto [r, w] = mp::Pipe(false);
    mp::Process server(w8_echo_server, w);
    const mp::Address address = w8_start_server(server, r, w);
    const std::string msg(8, '\x01');
    double dt = 0;
    {
        mp::Connection c = mp::Client(address, {.authkey = std::string(kW8Authkey)});
        auto t0 = Clock::now();
        for (long long i = 0; i < n; ++i) {
            c.send_bytes(msg);
            check(c.recv_bytes() == msg, "W8b: wrong echo");
        }
        dt = seconds_since(t0);
    }
    w8_stop_server(server, address);
    return dt * 1e6 / double(n);
}

// W9: a Manager's dict, used from a child process: d[i] = i, then d[i]; 1 op = one set or get.
void dict_user(mp::DictProxy<long long, long long> d, long long n, mp::Connection report) {
    auto t0 = Clock::now();
    for (long long i = 0; i < n; ++i) {
        d.set(i, i);
        check(d.get(i) == i, "W9: wrong value");
    }
    report.send(seconds_since(t0));
}

double w9(long long n) {
    mp::Manager manager;
    auto d = manager.dict<long long, long long>();
    auto [r, w] = mp::Pipe(false);
    mp::Process p(dict_user, d, n, w);
    p.start();
    w.close();
    double dt = r.recv<double>();
    p.join();
    check(p.exitcode() == 0 && d.size() == std::size_t(n), "W9: the child failed");
    return 2.0 * double(n) / dt;
}

// ---- W12a: Python sends dicts with conn.send, a C++ process answers with conn.send of a list ------
// The client is Python's (bench/python/workloads.py W12a-client, the same code its W12a side times
// against a Python peer); only the peer is mp's: recv_py straight into a std::map, send_py of a
// std::vector. Unix socket, authkey.

// W12a and W12b run a Python client (workloads.py W12?-client) while this process serves it; it
// prints "RATE <value>" when done.
FILE* start_python_client(const std::string& workload, long long n, const std::string& path, const char* key) {
    const std::string cmd = "python3 " MP_BENCH_DIR "/python/workloads.py " + workload + "-client --size " +
                            std::to_string(n) + " --address " + path + " --authkey " + key;
    FILE* f = ::popen(cmd.c_str(), "r");
    check(f != nullptr, "cannot run python3");
    return f;
}

double python_client_rate(FILE* f) {
    double rate = 0;
    char line[256];
    while (std::fgets(line, sizeof line, f))
        if (std::string_view(line).starts_with("RATE ")) rate = std::strtod(line + 5, nullptr);
    const int status = ::pclose(f);
    check(status == 0 && rate > 0, "the Python client failed");
    return rate;
}

double w12a(long long n) {
    char dir[] = "/tmp/mp_w12a.XXXXXX";
    check(::mkdtemp(dir) != nullptr, "W12a: mkdtemp failed");
    const std::string path = std::string(dir) + "/peer.sock";
    double rate = 0;
    {
        mp::Listener listener(mp::Address(path), {.authkey = "w12a-key"});
        FILE* f = start_python_client("W12a", n, path, "w12a-key");
        {
            mp::Connection c = listener.accept();
            std::vector<std::int64_t> reply;
            // None ends the run.
            while (auto d = c.recv_py<std::optional<std::map<std::string, std::int64_t>>>()) {
                reply.clear();
                for (const auto& kv : *d) reply.push_back(kv.second);
                c.send_py(reply);
            }
        }
        rate = python_client_rate(f);
    }
    ::unlink(path.c_str());
    ::rmdir(dir);
    return rate;
}

// ---- W12a-decode(-flat): py::loads of the W12a message (ns per decode) --------------------------
// The bytes are Python's own (pickle.dumps, as conn.send writes them), fetched from python3.
// W12a-decode reads them into a std::map, W12a-decode-flat into a vector of (key, value) pairs.

template <class Dict>
double w12a_decode(long long n) {
    FILE* f = ::popen("python3 -c \"import pickle; print(pickle.dumps({'key%d' % i: i for i in range(10)}).hex())\"",
                      "r");
    check(f != nullptr, "W12a-decode: cannot run python3");
    char line[1024] = {};
    const bool got = std::fgets(line, sizeof line, f) != nullptr;
    check(::pclose(f) == 0 && got, "W12a-decode: python3 failed");
    std::string pickle;
    for (const char* h = line; h[0] && h[1] && h[0] != '\n'; h += 2)
        pickle.push_back(static_cast<char>(std::stoi(std::string(h, 2), nullptr, 16)));
    std::int64_t sum = 0;
    auto decode = [&] {
        auto d = mp::py::loads<Dict>(pickle);
        sum += d.rbegin()->second;
    };
    decode();
    const auto t0 = std::chrono::steady_clock::now();
    for (long long i = 0; i < n; ++i) decode();
    const double dt = seconds_since(t0);
    check(sum == 9 * (n + 1), "W12a-decode: wrong value");
    return dt * 1e9 / double(n);
}

// ---- W12b: a Python client's dict proxy against an mp manager (ops/s) ----------------------------
// The client is Python's (bench/python/workloads.py W12b-client, the same code its W12b side times
// against Python's own SyncManager); only the server is mp's. Both over a Unix socket path.

double w12b(long long n) {
    char dir[] = "/tmp/mp_w12b.XXXXXX";
    check(::mkdtemp(dir) != nullptr, "W12b: mkdtemp failed");
    const std::string path = std::string(dir) + "/manager.sock";
    double rate = 0;
    {
        mp::SyncManager manager(mp::Address(path), "w12b-key");
        manager.start();
        rate = python_client_rate(start_python_client("W12b", n, path, "w12b-key"));
    }
    ::unlink(path.c_str());
    ::rmdir(dir);
    return rate;
}

// ---- the table ---------------------------------------------------------------------------------

struct Workload {
    const char* id;
    const char* unit;
    long long full;   // the size run.py uses (it always passes --size; these are for hand runs)
    long long quick;  // --quick
    double (*run)(long long size);  // nullptr: mp has no such primitive yet (prints n/a)
    const char* method;             // what the mp side uses, shown in the report
};

const Workload kWorkloads[] = {
    {"W1", "us", 200, 20, w1, "mp::Process (fork), start + join"},
    {"W1b", "us", 5, 2, [](long long n) { return w1b(n, mp::StartMethod::forkserver); },
     "mp::Process (forkserver), start + join, from a parent with 2 GiB of touched heap"},
    {"W1b-spawn", "us", 5, 2, [](long long n) { return w1b(n, mp::StartMethod::spawn); },
     "mp::Process (spawn), start + join, from a parent with 2 GiB of touched heap"},
    {"W1b-small", "us", 200, 20,
     [](long long n) { return mp_bench::start_join_each(n, {.start_method = mp::StartMethod::forkserver}, true, "W1b-small: bad exit"); },
     "mp::Process (forkserver), start + join, from a small parent"},
    {"W2a", "tasks/s", 100000, 2000, w2a,
     "ProcessPoolExecutor(2): submit every task, then result() of each in order"},
    {"W2a-steady", "tasks/s", 100000, 2000, w2a_steady,
     "ProcessPoolExecutor(2): W2a's fourth batch on the same executor"},
    {"W2b", "tasks/s", 100000, 10000, w2b, "ProcessPoolExecutor(2).map, chunksize 1000"},
    {"W3", "efficiency", 64, 8, w3,
     "ProcessPoolExecutor(2).map, 20 ms CPU-time tasks, chunksize 1"},
    {"W4", "msgs/s", 1000000, 20000, w4, "Queue, 64-byte messages"},
    {"W5", "MB/s", 1024, 16, w5, "Queue, 1 MiB messages"},
    {"W6-pipe", "us", 100000, 2000, w6_pipe, "Pipe, 8-byte send_bytes/recv_bytes round trips"},
    {"W6-pipe-oneway", "us", 100000, 2000, w6_pipe_oneway,
     "two Pipe(false), 8-byte send_bytes/recv_bytes round trips"},
    {"W6-queue", "us", 100000, 2000, w6_queue, "two Queues, 8-byte round trips"},
    {"W7", "ns", 1000000, 20000, w7, "mp::Value<long long> and its lock (an RLock), 2 processes, one per CPU"},
    {"W8a", "requests/s", 3000, 200, w8a,
     "Client(authkey) per request: handshake, 8-byte send_bytes/recv_bytes, close"},
    {"W8b", "us", 20000, 1000, w8b, "one Client(authkey) connection, 8-byte round trips"},
    {"W9", "ops/s", 20000, 1000, w9,
     "Manager().dict<long long, long long>() proxy from a child process (fork)"},
    {"W12a", "round trips/s", 20000, 1000, w12a,
     "the same Python client's conn.send(dict) to a C++ peer: recv_py<std::map<std::string, int64_t>>, "
     "send_py(std::vector<int64_t>) (Unix socket, authkey)"},
    {"W12a-decode", "ns", 200000, 10000, w12a_decode<std::map<std::string, std::int64_t>>,
     "py::loads<std::map<std::string, int64_t>> of Python's pickle of the W12a message"},
    {"W12a-decode-flat", "ns", 200000, 10000, w12a_decode<std::vector<std::pair<std::string, std::int64_t>>>,
     "py::loads<std::vector<std::pair<std::string, int64_t>>> of Python's pickle of the W12a message"},
    {"W12b", "ops/s", 20000, 1000, w12b,
     "the same Python client's dict proxy against an mp SyncManager (Python's protocol, Unix socket)"},
};

void print_json(const Workload& w, const double* value, long long size) {
    char v[32] = "null";
    if (value) std::snprintf(v, sizeof v, "%.9g", *value);
    std::printf("{\"workload\":\"%s\",\"value\":%s,\"unit\":\"%s\",\"size\":%lld,"
                "\"method\":\"%s\"}\n",
                w.id, v, w.unit, size, w.method);
    std::fflush(stdout);
}

int usage() {
    std::fprintf(stderr, "usage: mp_workloads <workload> [--size N] [--quick] | info | list\n");
    return 2;
}

}  // namespace

int main(int argc, char** argv) {
    if (argc < 2) return usage();
    std::string_view id = argv[1];
    if (id == "info") {
#if defined(__clang__)
        std::printf("{\"compiler\":\"clang %s\"}\n", __VERSION__);
#else
        std::printf("{\"compiler\":\"gcc %s\"}\n", __VERSION__);
#endif
        return 0;
    }
    if (id == "list") {
        for (const auto& w : kWorkloads)
            std::printf("%-9s %s\n", w.id, w.run ? "implemented" : "n/a");
        return 0;
    }
    mp_bench::WorkloadArgs args;
    if (!mp_bench::parse_workload_args(argc, argv, args)) return usage();
    const bool quick = args.quick;
    g_quick = quick;
    long long size = args.size;
    for (const auto& w : kWorkloads) {
        if (id != w.id) continue;
        if (size <= 0) size = quick ? w.quick : w.full;
        if (!w.run) {
            print_json(w, nullptr, size);
            return 0;
        }
        try {
            double value = w.run(size);
            print_json(w, &value, size);
            return 0;
        } catch (const std::exception& e) {
            std::fprintf(stderr, "mp_workloads %s: %s\n", w.id, e.what());
            return 1;
        }
    }
    return usage();
}
