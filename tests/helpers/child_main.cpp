/// mp_test_child: the helper program of the test suite. Tests run it (path: MP_TEST_CHILD) with a
/// mode in argv[1]:
///
///   exit N                      exits with code N (std::exit)
///   crash                       dies of SIGSEGV
///   abort                       dies of SIGABRT
///   sleep SECONDS               sleeps (fractions allowed), then exits 0
///   echo                        copies stdin to stdout
///   authkey                     prints mp::current_process().authkey in hex
///
/// Scenario programs, for behaviour that needs a process of its own (program exit, a killed
/// parent, threads, atexit). Each prints what the test needs on stdout and exits 0 when its own
/// checks pass; a diagnostic goes to stderr.
///
///   daemon-orphan FILE [METHOD [thread]]
///                               starts a daemon child (fork unless METHOD says forkserver or
///                               spawn; with "thread", from a thread that has ended by then) that
///                               sleeps, writes its pid to FILE, then blocks (up to 60 s) so the
///                               test can SIGKILL this program
///   forkserver-stdio            printf("parent-buffered") without a newline, then forkserver
///                               children: one prints "fs-buffered" without a newline, one throws;
///                               prints "exitcodes A B" and "thrower NAME"
///   exit-joins FILE [std-exit]  starts a non-daemon child that sleeps briefly and then appends
///                               "child-finished" to FILE; prints "child-pid P"; returns from main
///                               (or calls std::exit) without joining it
///   exit-terminates-daemon FILE starts a daemon child whose SIGTERM handler appends "sigterm" to
///                               FILE; prints "daemon-pid P" once the handler is set; returns
///   exit-leaves-nothing         starts a non-daemon fork child, a daemon fork child and a
///                               non-daemon forkserver child; prints "pid P" for each; returns
///   threaded-forkserver         set_start_method(forkserver) first, then 3 threads (one holds a
///                               global std::mutex) while forkserver children lock that mutex
///   threaded-forkserver-late    threads that allocate run before the first forkserver use;
///                               forkserver children allocate and print "fs-child I allocated N"
///   children-run-no-linker      two fork and two forkserver children run an empty function,
///                               then two fork daemons started by a thread;
///                               prints "fork-pid P", "forkserver-pid P", "thread-daemon-pid P"
///   atexit-not-run FILE         an atexit handler and a static destructor append "atexit PID" and
///                               "static-dtor PID" to FILE; a fork child prints "child-buffered"
///                               without a newline and returns; prints "child-pid P"
///   parent-buffer               printf("parent-buffered") without a newline, then a fork child
///                               runs and is joined; prints "child-done"
///   cxx-unflushed METHOD KIND   std::ios::sync_with_stdio(false), "parent-line" written to
///                               std::cout without a flush, then under METHOD (fork, forkserver)
///                               a KIND (process, pool, executor) runs one task; prints
///                               "result R"
///   threaded-parent METHOD      ten threads: one holds a std::mutex, one allocates and frees in a
///                               loop, one holds stdout's lock (flockfile), the others spin; then,
///                               the forkserver not yet started, under METHOD (forkserver, spawn)
///                               a Pool, an executor and two Processes run tasks that take that
///                               mutex, allocate and print; prints "threaded-parent ok" after
///                               the threads let go
///   global-executor METHOD FILE an executor owned by a global std::unique_ptr, made in main under
///                               METHOD (fork, forkserver, spawn), is given four tasks that each
///                               append "task I" to FILE, and main returns at once: the global's
///                               destructor, at static destruction, waits for them (its workers
///                               may only start then); prints "submitted"
///   static-proxies              a static Manager and proxies with static storage duration
///                               (destroyed after main, after mp's per-thread connections); prints
///                               "static-proxies 2 4"
///   spawn-without-hook          (mp_test_nohook: linked without -Wl,--wrap=main) tries spawn and
///                               forkserver with Process::start and set_start_method; prints
///                               "started/set METHOD" or "refused [set] METHOD: WHAT" for each;
///                               then whether the forkserver (forked from it) ran the
///                               set_forkserver_preload function, the number of
///                               get_all_start_methods(), and whether get_context(spawn) is refused

#include <atomic>
#include <cerrno>
#include <chrono>
#include <csignal>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fcntl.h>
#include <iostream>
#include <mutex>
#include <poll.h>
#include <string>
#include <stdexcept>
#include <sys/resource.h>
#include <thread>
#include <unistd.h>
#include <utility>
#include <vector>

#include "mp/connection.hpp"
#include "mp/context.hpp"
#include "mp/futures.hpp"
#include "mp/managers.hpp"
#include "mp/pool.hpp"
#include "mp/process.hpp"

namespace {

using namespace std::chrono_literals;

/// A path kept in static storage: signal handlers, atexit handlers and static destructors use it.
char g_marker_path[4096];

void set_marker_path(const char* path) {
    std::snprintf(g_marker_path, sizeof g_marker_path, "%s", path);
}

/// Appends `text` to the marker file; async-signal-safe.
void append_marker(const char* text) {
    if (g_marker_path[0] == '\0') return;
    int fd = ::open(g_marker_path, O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0644);
    if (fd < 0) return;
    std::size_t len = std::strlen(text);
    while (len > 0) {
        ssize_t n = ::write(fd, text, len);
        if (n < 0 && errno == EINTR) continue;
        if (n <= 0) break;
        text += n;
        len -= static_cast<std::size_t>(n);
    }
    ::close(fd);
}

void append_marker_with_pid(const char* what) {
    char line[128];
    std::snprintf(line, sizeof line, "%s %d\n", what, static_cast<int>(::getpid()));
    append_marker(line);
}

bool write_all(int fd, const std::string& s) {
    const char* p = s.data();
    std::size_t left = s.size();
    while (left > 0) {
        ssize_t n = ::write(fd, p, left);
        if (n < 0 && errno == EINTR) continue;
        if (n <= 0) return false;
        p += n;
        left -= static_cast<std::size_t>(n);
    }
    return true;
}

/// Writes `text` to `path` atomically (a reader never sees it half written).
void write_file_atomically(const std::string& path, const std::string& text) {
    const std::string tmp = path + ".tmp";
    int fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    if (fd < 0) {
        std::perror("open");
        std::exit(90);
    }
    if (!write_all(fd, text)) std::exit(91);
    ::close(fd);
    if (::rename(tmp.c_str(), path.c_str()) != 0) std::exit(92);
}

void sleep_seconds(double s) {
    std::this_thread::sleep_for(std::chrono::duration<double>(s));
}

/// Sleeps in short steps for at most `limit`, forever-ish but bounded (no stray program may
/// outlive a broken test by much).
[[noreturn]] void block_for(std::chrono::seconds limit) {
    auto deadline = std::chrono::steady_clock::now() + limit;
    while (std::chrono::steady_clock::now() < deadline) std::this_thread::sleep_for(50ms);
    std::_Exit(3);
}

/// Static object whose destructor leaves a marker (in atexit-not-run): only the program's own
/// exit may run it, never a child's.
bool g_static_marker_enabled = false;
struct StaticMarker {
    ~StaticMarker() {
        if (g_static_marker_enabled) append_marker_with_pid("static-dtor");
    }
};
StaticMarker g_static_marker;

/// Processes that only the program's exit may join or terminate (no destructor runs for them).
/// Kept in a plain global array so that LeakSanitizer still sees them as reachable.
mp::Process* g_kept[8];
int g_nkept = 0;

template <class... A>
mp::Process* keep(A&&... args) {
    auto* p = new mp::Process(std::forward<A>(args)...);
    g_kept[g_nkept++] = p;
    return p;
}

// ---- simple modes ----

int mode_echo() {
    char buf[4096];
    for (;;) {
        ssize_t n = ::read(0, buf, sizeof buf);
        if (n < 0 && errno == EINTR) continue;
        if (n <= 0) return 0;
        if (!write_all(1, std::string(buf, static_cast<std::size_t>(n)))) return 1;
    }
}

int mode_authkey() {
    static const char hex[] = "0123456789abcdef";
    std::string out;
    for (unsigned char c : mp::current_process().authkey) {
        out += hex[c >> 4];
        out += hex[c & 15];
    }
    std::printf("%s\n", out.c_str());
    return 0;
}

// ---- scenarios ----

void block_a_minute() { block_for(60s); }

int mode_daemon_orphan(const std::string& file, const std::string& method, bool from_thread) {
    mp::ProcessOptions options{.name = "orphan", .daemon = true};
    if (method == "forkserver") options.start_method = mp::StartMethod::forkserver;
    if (method == "spawn") options.start_method = mp::StartMethod::spawn;
    // Leaked on purpose: the program is killed, nothing is destroyed.
    auto* p = keep(options, block_a_minute);
    if (from_thread)
        std::thread([p] {
            p->start();
            sleep_seconds(0.2);  // the child has armed its parent-death signal by then
        }).join();
    else
        p->start();
    write_file_atomically(file, std::to_string(p->pid()) + "\n");
    block_for(60s);
}

void exit_joins_child(std::string file) {
    sleep_seconds(0.15);
    set_marker_path(file.c_str());
    append_marker("child-finished\n");
}

int mode_exit_joins(const std::string& file, bool use_std_exit) {
    // Leaked on purpose: only the exit-time join may wait for this child, not a destructor.
    auto* p = keep(exit_joins_child, file);
    p->start();
    std::printf("child-pid %d\n", static_cast<int>(p->pid()));
    std::fflush(stdout);
    if (use_std_exit) std::exit(0);
    return 0;
}

void on_sigterm(int) {
    append_marker("sigterm\n");
    ::_exit(0);
}

int mode_exit_terminates_daemon(const std::string& file) {
    set_marker_path(file.c_str());
    int ready[2];
    if (::pipe2(ready, O_CLOEXEC) != 0) return 90;
    const int ready_w = ready[1];
    auto* p = keep(mp::ProcessOptions{.daemon = true}, [ready_w] {
        struct sigaction sa {};
        sa.sa_handler = on_sigterm;
        sigemptyset(&sa.sa_mask);
        ::sigaction(SIGTERM, &sa, nullptr);
        sigset_t unblock;
        sigemptyset(&unblock);
        sigaddset(&unblock, SIGTERM);
        ::sigprocmask(SIG_UNBLOCK, &unblock, nullptr);
        (void)write_all(ready_w, "r");
        block_for(60s);
    });
    p->start();
    ::close(ready[1]);
    pollfd pfd{ready[0], POLLIN, 0};
    char c = 0;
    if (::poll(&pfd, 1, 10000) != 1 || ::read(ready[0], &c, 1) != 1) {
        std::fprintf(stderr, "the daemon child did not get ready\n");
        return 2;
    }
    ::close(ready[0]);
    std::printf("daemon-pid %d\n", static_cast<int>(p->pid()));
    std::fflush(stdout);
    return 0;
}

void short_nap() { sleep_seconds(0.05); }

int mode_exit_leaves_nothing() {
    auto* a = keep([] { sleep_seconds(0.05); });
    auto* b = keep(mp::ProcessOptions{.daemon = true}, [] { block_for(60s); });
    auto* c = keep(mp::ProcessOptions{.start_method = mp::StartMethod::forkserver},
                              short_nap);
    a->start();
    b->start();
    c->start();
    std::printf("pid %d\npid %d\npid %d\n", static_cast<int>(a->pid()), static_cast<int>(b->pid()),
                static_cast<int>(c->pid()));
    std::fflush(stdout);
    return 0;
}

std::mutex g_mutex;

void lock_global_mutex(int i) {
    std::lock_guard<std::mutex> lock(g_mutex);
    std::printf("fs-child %d locked\n", i);
}

int run_forkserver_children(void (*fn)(int), int count, const mp::ProcessOptions& options) {
    int failures = 0;
    for (int i = 0; i < count; ++i) {
        mp::Process p(options, fn, i);
        p.start();
        if (!p.join(10s)) {
            std::fprintf(stderr, "forkserver child %d did not finish within 10 s (deadlock?)\n", i);
            p.kill();
            p.join();
            ++failures;
            continue;
        }
        if (p.exitcode() != 0) {
            std::fprintf(stderr, "forkserver child %d: exit code %d\n", i,
                         p.exitcode().value_or(-999));
            ++failures;
        }
    }
    return failures;
}

int mode_threaded_forkserver() {
    mp::set_start_method(mp::StartMethod::forkserver);
    std::atomic<bool> stop{false};
    std::atomic<bool> held{false};
    std::vector<std::thread> threads;
    threads.emplace_back([&] {
        std::lock_guard<std::mutex> lock(g_mutex);
        held = true;
        while (!stop) std::this_thread::sleep_for(1ms);
    });
    for (int t = 0; t < 2; ++t) {
        threads.emplace_back([&] {
            while (!stop) {
                std::vector<std::string> v(64, std::string(100, 'x'));
                std::this_thread::sleep_for(100us);
            }
        });
    }
    while (!held) std::this_thread::sleep_for(1ms);
    const int failures = run_forkserver_children(lock_global_mutex, 3, {});
    stop = true;
    for (auto& t : threads) t.join();
    if (failures != 0) return 1;
    std::printf("all ok\n");
    return 0;
}

void allocate_and_print(int i) {
    std::vector<std::string> v;
    for (int k = 0; k < 1000; ++k) v.emplace_back(static_cast<std::size_t>(100 + k), 'a');
    std::size_t total = 0;
    for (const auto& s : v) total += s.size();
    std::printf("fs-child %d allocated %zu\n", i, total);
}

int mode_threaded_forkserver_late() {
    std::atomic<bool> stop{false};
    std::vector<std::thread> threads;
    for (int t = 0; t < 3; ++t) {
        threads.emplace_back([&] {
            while (!stop) {
                std::vector<std::string> v(64, std::string(100, 'x'));
                auto* p = new char[4096];
                delete[] p;
            }
        });
    }
    std::this_thread::sleep_for(10ms);
    const int failures = run_forkserver_children(
        allocate_and_print, 3, mp::ProcessOptions{.start_method = mp::StartMethod::forkserver});
    stop = true;
    for (auto& t : threads) t.join();
    if (failures != 0) return 1;
    std::printf("all ok\n");
    return 0;
}

void at_exit_handler() { append_marker_with_pid("atexit"); }

int mode_atexit_not_run(const std::string& file) {
    set_marker_path(file.c_str());
    g_static_marker_enabled = true;
    std::atexit(at_exit_handler);
    mp::Process p([] { std::printf("child-buffered"); });
    p.start();
    p.join();
    std::printf("\nchild-pid %d\nchild-exitcode %d\n", static_cast<int>(p.pid()),
                p.exitcode().value_or(-999));
    return 0;
}

int mode_parent_buffer() {
    std::printf("parent-buffered");
    mp::Process p([] { std::printf("child-ran\n"); });
    p.start();
    p.join();
    std::printf("\nchild-done %d\n", p.exitcode().value_or(-999));
    return 0;
}

void print_without_newline() { std::printf("fs-buffered"); }
void throw_runtime_error(std::string what) { throw std::runtime_error(what); }

int mode_forkserver_stdio() {
    std::printf("parent-buffered");  // must not be printed again by the server or its children
    mp::set_start_method(mp::StartMethod::forkserver);
    mp::Process a(print_without_newline);
    a.start();
    a.join();
    mp::Process b(throw_runtime_error, std::string("thrown in a forkserver child"));
    b.start();
    b.join();
    std::printf("\nexitcodes %d %d\nthrower %s\n", a.exitcode().value_or(-999),
                b.exitcode().value_or(-999), b.name().c_str());
    return 0;
}

int usage();
mp::StartMethod method_named(const std::string& name);

// Destroyed with the program's other statics, after main: libmp's own function-local statics,
// made later than this one, are destroyed before it, so the executor's shutdown must not need them.
std::unique_ptr<mp::ProcessPoolExecutor> g_executor;

void global_executor_task(std::string file, int i) {
    sleep_seconds(0.05);
    set_marker_path(file.c_str());
    append_marker(("task " + std::to_string(i) + "\n").c_str());
}

int mode_global_executor(const std::string& method_name, const std::string& file) {
    g_executor = std::make_unique<mp::ProcessPoolExecutor>(
        mp::ExecutorOptions{.max_workers = 2, .start_method = method_named(method_name)});
    for (int i = 0; i < 4; ++i) (void)g_executor->submit(global_executor_task, file, i);
    std::printf("submitted\n");
    std::fflush(stdout);
    return 0;
}
int triple(int x) { return 3 * x; }
void do_nothing() {}

// Proxies that outlive main: one global (made empty before main, given an object in main, so it
// goes after the manager's server has), and a static manager with a static proxy made after it.
// A static object is destroyed after this thread's thread_local ones, mp's per-thread connections
// among them; the first handshake loaded OpenSSL, whose own clean-up at exit came before the
// manager's shutdown.
mp::DictProxy<int, int> g_outliving_proxy;

int mode_static_proxies() {
    static mp::Manager manager;
    static mp::DictProxy<int, int> d = manager.dict<int, int>();
    d.set(1, 2);
    g_outliving_proxy = manager.dict<int, int>();
    g_outliving_proxy.set(3, 4);
    std::printf("static-proxies %d %d\n", d.get(1), g_outliving_proxy.get(3));
    std::fflush(stdout);
    return 0;
}

int mode_cxx_unflushed(const std::string& method_name, const std::string& kind) {
    const mp::StartMethod method = method_named(method_name);
    // cout now keeps a buffer of its own, which a child must not write a second time.
    std::ios::sync_with_stdio(false);
    std::cout << "parent-line\n";
    int result = -1;
    if (kind == "process") {
        mp::Process p(mp::ProcessOptions{.start_method = method}, do_nothing);
        p.start();
        p.join();
        result = p.exitcode().value_or(-1);
    } else if (kind == "pool") {
        mp::Pool pool(mp::PoolOptions{.processes = 1, .start_method = method});
        result = pool.apply(triple, 7);
        // Workers that leave on their own flush their streams (terminate() would kill them).
        pool.close();
        pool.join();
    } else if (kind == "executor") {
        mp::ProcessPoolExecutor ex(mp::ExecutorOptions{.max_workers = 1, .start_method = method});
        result = ex.submit(triple, 7).result();
    } else {
        return usage();
    }
    std::cout << "result " << result << '\n';
    return 0;
}

// The lock the parent's thread holds across the children's starts: a child forked from a copy of
// this process would wait for it for ever.
std::mutex g_held;

int locked_work(int x) {
    std::lock_guard lock(g_held);
    std::vector<std::string> v(16, std::string(200, 'y'));
    std::printf("task %d\n", x);
    std::fflush(stdout);
    return x * 2 + static_cast<int>(v.size() - 16);
}

void locked_process(int x) { (void)locked_work(x); }

mp::StartMethod method_named(const std::string& name) {
    if (name == "fork") return mp::StartMethod::fork;
    if (name == "forkserver") return mp::StartMethod::forkserver;
    if (name == "spawn") return mp::StartMethod::spawn;
    throw std::invalid_argument("no start method named " + name);
}

int mode_threaded_parent(const std::string& method_name) {
    const mp::StartMethod method = method_named(method_name);
    std::fflush(stdout);  // nothing pending: the parent's own flush before fork must not block
    std::atomic<bool> stop{false};
    std::atomic<int> ready{0};
    std::vector<std::thread> threads;
    threads.emplace_back([&] {
        std::lock_guard lock(g_held);
        ++ready;
        while (!stop) std::this_thread::sleep_for(1ms);
    });
    threads.emplace_back([&] {
        ++ready;
        while (!stop) {
            void* p = std::malloc(1000);
            std::free(p);
        }
    });
    threads.emplace_back([&] {
        ::flockfile(stdout);
        ++ready;
        while (!stop) std::this_thread::sleep_for(1ms);
        ::funlockfile(stdout);
    });
    for (int t = 3; t < 10; ++t) {
        threads.emplace_back([&] {
            ++ready;
            while (!stop) std::this_thread::yield();
        });
    }
    while (ready < 10) std::this_thread::sleep_for(1ms);

    std::string report;
    int failures = 0;
    {
        mp::Pool pool(mp::PoolOptions{.processes = 2, .start_method = method});
        const std::vector<int> got = pool.map(locked_work, std::vector<int>{1, 2, 3, 4});
        if (got != std::vector<int>{2, 4, 6, 8}) ++failures;
        pool.close();
        pool.join();
    }
    {
        mp::ProcessPoolExecutor ex(mp::ExecutorOptions{.max_workers = 1, .start_method = method});
        if (ex.submit(locked_work, 5).result() != 10) ++failures;
    }
    std::vector<mp::Process> procs;
    for (int i = 0; i < 2; ++i) procs.emplace_back(mp::ProcessOptions{.start_method = method}, locked_process, 10 + i);
    for (auto& p : procs) p.start();
    for (auto& p : procs) {
        p.join();
        if (p.exitcode() != 0) ++failures;
    }
    report = "pool, executor and processes done, failures " + std::to_string(failures);

    stop = true;
    for (auto& t : threads) t.join();
    std::printf("%s\n", report.c_str());
    if (failures != 0) return 1;
    std::printf("threaded-parent ok\n");
    return 0;
}

int g_preloaded = 0;
void preload() { g_preloaded = 1; }
void check_preloaded() {
    if (g_preloaded != 1) throw std::runtime_error("the forkserver did not run the preload");
}

int mode_spawn_without_hook() {
    mp::set_forkserver_preload({&preload});
    for (const auto method : {mp::StartMethod::spawn, mp::StartMethod::forkserver}) {
        try {
            mp::Process p(mp::ProcessOptions{.start_method = method}, do_nothing);
            p.start();
            p.join();
            std::printf("started %s, exit code %d\n", mp::to_string(method).c_str(), p.exitcode().value_or(-1000));
        } catch (const mp::ProcessError& e) {
            std::printf("refused %s: %s\n", mp::to_string(method).c_str(), e.what());
        }
        try {
            mp::set_start_method(method, true);
            std::printf("set %s\n", mp::to_string(method).c_str());
        } catch (const mp::ProcessError& e) {
            std::printf("refused set %s: %s\n", mp::to_string(method).c_str(), e.what());
        }
    }
    mp::Process p(mp::ProcessOptions{.start_method = mp::StartMethod::forkserver}, check_preloaded);
    p.start();
    p.join();
    std::printf("preloaded forkserver child, exit code %d\n", p.exitcode().value_or(-1000));
    std::printf("%zu start methods\n", mp::get_all_start_methods().size());
    try {
        (void)mp::get_context(mp::StartMethod::spawn);
        std::printf("context spawn\n");
    } catch (const mp::ProcessError&) {
        std::printf("refused context spawn\n");
    }
    return 0;
}

// Two fork and two forkserver children running an empty function; prints "<method>-pid P" each.
int mode_children_run_no_linker() {
    for (const auto method : {mp::StartMethod::fork, mp::StartMethod::forkserver}) {
        for (int i = 0; i < 2; ++i) {
            mp::Process p(mp::ProcessOptions{.start_method = method}, do_nothing);
            p.start();
            p.join();
            if (p.exitcode() != 0) return 1;
            std::printf("%s-pid %d\n", mp::to_string(method).c_str(), static_cast<int>(p.pid()));
        }
    }
    // Daemons started by a thread that then ends: their child installs the checked
    // parent-death signal's handler (sigaction), bound by the parent before the fork.
    for (int i = 0; i < 2; ++i) {
        mp::Process p(mp::ProcessOptions{.daemon = true, .start_method = mp::StartMethod::fork}, do_nothing);
        std::thread([&p] { p.start(); }).join();
        p.join();
        if (p.exitcode() != 0) return 1;
        std::printf("thread-daemon-pid %d\n", static_cast<int>(p.pid()));
    }
    return 0;
}

// The first start of a program that has its children reaped by the kernel (SIGCHLD ignored,
// or SA_NOCLDWAIT with `nocldwait`): a fork child that ends at once. Prints its exit code, or
// "lost" when the kernel keeps no status; start() must not fail.
int mode_reaped_by_kernel_first_start(const std::string& how) {
    struct sigaction act {};
    act.sa_handler = how == "nocldwait" ? SIG_DFL : SIG_IGN;
    act.sa_flags = how == "nocldwait" ? SA_NOCLDWAIT : 0;
    ::sigaction(SIGCHLD, &act, nullptr);
    mp::Process p([] { ::_exit(7); });
    p.start();
    try {
        p.join();
        std::printf("exitcode %d\n", p.exitcode().value_or(-999));
    } catch (const mp::ProcessError&) {
        std::printf("lost\n");
    }
    return 0;
}

// A program started with standard stream `fd` closed (`prog <&-`): children of every start
// method, and a pool's worker, start, write more than a socket buffer holds to that stream (the
// forkserver's children had its control socket there and blocked), and answer through a Pipe
// end they were passed (spawn and forkserver children received it at the closed number, where
// their stdin from /dev/null then replaced it; the forkserver never started for the same
// reason). Exit status 0 when all answered; what failed on the other stream.
void write_then_answer(mp::Connection answer, int fd) {
    const std::string junk(512 * 1024, 'x');
    for (std::size_t done = 0; fd != 0 && done < junk.size();) {
        const ssize_t n = ::write(fd, junk.data() + done, junk.size() - done);
        if (n < 0 && errno != EINTR) break;  // a closed stream may say so; it must not block
        if (n > 0) done += static_cast<std::size_t>(n);
    }
    answer.send_bytes("answered");
}

int mode_closed_standard_stream(int fd) {
    constexpr mp::StartMethod kMethods[] = {mp::StartMethod::fork, mp::StartMethod::forkserver,
                                            mp::StartMethod::spawn};
    // Made first: what the program opens once the stream is closed may take its number, and a
    // fork child has its parent's descriptors as they are.
    std::vector<std::pair<mp::Connection, mp::Connection>> pipes;
    for (std::size_t i = 0; i < std::size(kMethods); ++i) pipes.push_back(mp::Pipe());
    ::close(fd);
    const int report = fd == 2 ? 1 : 2;
    int failures = 0;
    for (std::size_t i = 0; i < std::size(kMethods); ++i) {
        const std::string method = mp::to_string(kMethods[i]);
        try {
            mp::Process p({.start_method = kMethods[i]}, &write_then_answer, std::move(pipes[i].second), fd);
            p.start();
            std::string answer;
            if (pipes[i].first.poll(std::chrono::seconds(5))) answer = pipes[i].first.recv_bytes();
            if (!p.join(std::chrono::seconds(5))) {
                p.kill();
                (void)p.join(std::chrono::seconds(5));
            }
            if (answer != "answered" || p.exitcode() != 0) {
                ++failures;
                ::dprintf(report, "%s: answer '%s', exitcode %d\n", method.c_str(), answer.c_str(),
                          p.exitcode().value_or(-999));
            }
        } catch (const std::exception& e) {
            ++failures;
            ::dprintf(report, "%s: %s\n", method.c_str(), e.what());
        }
    }
    try {
        mp::ProcessPoolExecutor ex({.max_workers = 1});  // forkserver, the pools' default
        if (const int r = ex.submit(&triple, 5).result(std::chrono::seconds(10)); r != 15) {
            ++failures;
            ::dprintf(report, "executor: %d\n", r);
        }
    } catch (const std::exception& e) {
        ++failures;
        ::dprintf(report, "executor: %s\n", e.what());
    }
    return failures == 0 ? 0 : 1;
}

int usage() {
    std::fprintf(stderr, "mp_test_child: unknown or incomplete mode\n");
    return 64;
}

}  // namespace

int main(int argc, char** argv) {
    if (argc < 2) return usage();
    const std::string mode = argv[1];
    const std::string arg = argc > 2 ? argv[2] : "";
    try {
        if (mode == "exit" && argc > 2) std::exit(std::atoi(argv[2]));
        if (mode == "crash" || mode == "abort") {
            // No core file for an intended crash.
            rlimit no_core{0, 0};
            ::setrlimit(RLIMIT_CORE, &no_core);
        }
        if (mode == "crash") {
            std::signal(SIGSEGV, SIG_DFL);
            std::raise(SIGSEGV);
            return 99;
        }
        if (mode == "abort") std::abort();
        if (mode == "sleep" && argc > 2) {
            sleep_seconds(std::atof(argv[2]));
            return 0;
        }
        if (mode == "echo") return mode_echo();
        if (mode == "authkey") return mode_authkey();
        if (mode == "daemon-orphan" && argc > 2) {
            return mode_daemon_orphan(arg, argc > 3 ? argv[3] : "fork", argc > 4 && std::strcmp(argv[4], "thread") == 0);
        }
        if (mode == "forkserver-stdio") return mode_forkserver_stdio();
        if (mode == "exit-joins" && argc > 2) {
            return mode_exit_joins(arg, argc > 3 && std::strcmp(argv[3], "std-exit") == 0);
        }
        if (mode == "exit-terminates-daemon" && argc > 2) return mode_exit_terminates_daemon(arg);
        if (mode == "exit-leaves-nothing") return mode_exit_leaves_nothing();
        if (mode == "threaded-forkserver") return mode_threaded_forkserver();
        if (mode == "threaded-forkserver-late") return mode_threaded_forkserver_late();
        if (mode == "atexit-not-run" && argc > 2) return mode_atexit_not_run(arg);
        if (mode == "parent-buffer") return mode_parent_buffer();
        if (mode == "cxx-unflushed" && argc > 3) return mode_cxx_unflushed(arg, argv[3]);
        if (mode == "threaded-parent" && argc > 2) return mode_threaded_parent(arg);
        if (mode == "spawn-without-hook") return mode_spawn_without_hook();
        if (mode == "global-executor" && argc > 3) return mode_global_executor(arg, argv[3]);
        if (mode == "static-proxies") return mode_static_proxies();
        if (mode == "children-run-no-linker") return mode_children_run_no_linker();
        if (mode == "reaped-by-kernel-first-start" && argc > 2) return mode_reaped_by_kernel_first_start(arg);
        if (mode == "closed-standard-stream" && argc > 2) return mode_closed_standard_stream(std::atoi(argv[2]));
    } catch (const std::exception& e) {
        std::fprintf(stderr, "mp_test_child %s: %s\n", mode.c_str(), e.what());
        return 70;
    }
    return usage();
}
