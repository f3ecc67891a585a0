// The README's code fragments, each made into a complete function (its complete programs, the
// ```cpp blocks with a main, are taken from README.md itself). Compiled by the user-warnings
// stage (tests/install/user_warnings.cmake) as a user would: installed headers on an ordinary -I
// path, -Wall -Wextra -Wpedantic -Wshadow -Wconversion -Werror, g++ and clang++. When a README
// snippet changes, change it here too.
#include <mp/mp.hpp>

#include <chrono>
#include <csignal>
#include <cstdio>
#include <mutex>
#include <string>
#include <thread>
#include <tuple>
#include <vector>

using namespace std::chrono_literals;

namespace {

// ## Process (the table)
void work(std::string, int) {}

void process_table() {
    mp::Process p(work, std::string("x"), 1);
    mp::Process q({.name = "x", .daemon = true}, work, std::string("y"), 2);
    (void)p.join(2s);
    mp::set_start_method(mp::StartMethod::forkserver);
}

// ## Between processes
void producer(mp::Queue<std::string> q) { q.put("hello"); }

void between_processes() {
    mp::Queue<std::string> q;
    mp::Process p(producer, q);
    p.start();
    std::string s = q.get(1s);

    auto [a, b] = mp::Pipe();
    a.send(std::vector<int>{1, 2, 3});
    auto v = b.recv<std::vector<int>>();

    mp::Value<long long> counter(0);
    {
        std::lock_guard g(counter.get_lock());
        ++counter.get_obj();
    }
    (void)s;
    (void)v;
}

// ## Pools: the issue quotes `mp::ProcessPoolExecutor ex({.max_workers = 4});` and
// `ex.map({.chunksize = 100}, ...)`.
int square(int x) { return x * x; }
int add(int a, int b) { return a + b; }

void pools(const std::vector<int>& xs, const std::vector<mp::Future<int>>& futures) {
    mp::ProcessPoolExecutor ex({.max_workers = 4});
    mp::Future<int> f = ex.submit(square, 7);
    f.add_done_callback([](const mp::Future<int>& g) { std::printf("%d\n", g.result()); });
    for (int y : ex.map({.chunksize = 100}, square, xs)) (void)y;
    auto [done, not_done] = mp::wait(futures, 5s, mp::FIRST_EXCEPTION);
    for (const auto& g : mp::as_completed(futures)) (void)g;
    ex.shutdown();

    mp::Pool pool(4);
    std::vector<int> v = pool.map(square, xs);
    auto r = pool.apply_async(add, mp::args(1, 2), [](const int& sum) { (void)sum; });
    pool.close();
    pool.join();
    (void)v;
    (void)r;
}

// ## Pools (the table and the text)
void init(int) {}

void pools_table(const std::vector<int>& xs, const std::vector<int>& ys) {
    mp::ProcessPoolExecutor ex({.max_workers = 4}, init, 1);
    for (int y : ex.map({.chunksize = 100, .timeout = 5s}, add, xs, ys)) (void)y;
    auto f = ex.submit({.timeout = 2s}, square, 3);
    (void)f;
    mp::ProcessPoolExecutor breaks({.break_on_worker_death = true});
    mp::Pool pool({.processes = 4, .maxtasksperchild = 10}, init, 1);
    auto it = pool.imap(square, xs, 1);
    (void)it;
    pool.close();
    pool.join();
    (void)mp::MapOptions{.progress = true};
    (void)mp::AsCompletedOptions{.progress = true};
}

// ## Managers
void managers() {
    mp::Manager m;
    auto d = m.dict<std::string, int>();
    auto lock = m.Lock();
    mp::Process p([=] {
        std::lock_guard g(lock);
        d.set("n", d.get("n", 0) + 1);
    });
    p.start();
    p.join();
}

// ## Socket servers
struct Echo : mp::StreamRequestHandler {
    void handle() override { wfile.write(rfile.readline()); }
};

void socket_server() {
    mp::ThreadingTCPServer srv({"127.0.0.1", 9000}, mp::handler<Echo>());
    std::thread t([&] { srv.serve_forever(); });
    srv.shutdown();
    t.join();
    srv.server_close();
}

void stopping_a_service() {
    auto stop = mp::stop_on_signals({SIGINT, SIGTERM});
    mp::ThreadingTCPServer srv({"0.0.0.0", 9000}, mp::handler<Echo>(),
                               {.shutdown_timeout = std::chrono::seconds(5)});
    srv.serve_forever(stop.token());
}

}  // namespace

int main() {
    // Compiled, not run: a reference to each keeps -Wunused-function quiet.
    std::ignore = std::make_tuple(&process_table, &between_processes, &pools, &pools_table,
                                  &managers, &socket_server, &stopping_a_service);
}
