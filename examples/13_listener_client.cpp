// Lesson 13: a download master and its workers, talking through Listener and Client with an
// authkey (multiprocessing.connection over TCP).
//
// The Python original:
//
//     def worker(address, authkey):
//         with Client(address, authkey=authkey) as c:
//             c.send_bytes(b'ready')
//             while url := c.recv_bytes().decode():
//                 c.send_bytes(f'{url} {len(download(url))} bytes'.encode())
//
//     if __name__ == '__main__':
//         with Listener(('127.0.0.1', 0), authkey=b'secret') as listener:
//             for _ in range(3):
//                 Process(target=worker, args=(listener.address, b'secret')).start()
//             conns = [listener.accept() for _ in range(3)]
//             ...  # hand out URLs to whichever worker is ready: wait(conns)
//
// The master listens on 127.0.0.1 (a port the system picks) and every connection must prove it
// knows the key before accept() returns it (a mutual HMAC challenge, the same bytes Python
// sends, so a Python worker could join). A process with a wrong key is refused on both sides
// with mp::AuthenticationError. The master hands each URL to whichever worker asks first
// (connection::wait), and an empty message tells a worker to stop. "Downloading" is simulated:
// the page is made up from the URL, so the example needs no network.

#include <mp/connection.hpp>
#include <mp/process.hpp>

#include <chrono>
#include <cstdio>
#include <deque>
#include <memory>
#include <string>
#include <thread>
#include <vector>

namespace {

const std::string kAuthkey = "download-secret";

// A stand-in for an HTTP GET: a page whose size depends on the URL, fetched in 50-150 ms.
std::string download(const std::string& url) {
    std::this_thread::sleep_for(std::chrono::milliseconds(50 + url.size() * 3 % 100));
    return std::string(1000 + std::size_t(url.back() - '0') * 1371, 'x');
}

void worker(std::string host, int port, std::string authkey, int id) {
    mp::Connection c = mp::Client(mp::Address(host, static_cast<std::uint16_t>(port)),
                                  {.authkey = authkey});
    c.send_bytes("ready");
    for (std::string url; !(url = c.recv_bytes()).empty();) {
        const std::string page = download(url);
        c.send_bytes("worker " + std::to_string(id) + ": " + url + " " +
                     std::to_string(page.size()) + " bytes");
    }
}

void intruder(std::string host, int port) {
    try {
        mp::Client(mp::Address(host, static_cast<std::uint16_t>(port)), {.authkey = "guess"});
        std::printf("intruder: got in?!\n");
    } catch (const mp::AuthenticationError& e) {
        std::printf("intruder: refused (%s)\n", e.what());
    }
}

}  // namespace

int main() {
    mp::Listener listener(mp::Address("127.0.0.1", 0), {.authkey = kAuthkey});
    const mp::Address& a = listener.address();
    std::printf("master: listening on %s\n", a.to_string().c_str());

    // The intruder comes first: accept() refuses it and the master goes on.
    mp::Process spy(intruder, a.host, int(a.port));
    spy.start();
    try {
        listener.accept();
    } catch (const mp::AuthenticationError& e) {
        std::printf("master: refused a connection (%s)\n", e.what());
    }
    spy.join();

    constexpr int kWorkers = 3;
    std::vector<std::unique_ptr<mp::Process>> workers;
    for (int i = 0; i < kWorkers; ++i) {
        workers.push_back(
            std::make_unique<mp::Process>(worker, a.host, int(a.port), kAuthkey, i));
        workers.back()->start();
    }
    std::vector<mp::Connection> conns;
    for (int i = 0; i < kWorkers; ++i) {
        conns.push_back(listener.accept());
        std::printf("master: worker connected from %s\n",
                    listener.last_accepted()->to_string().c_str());
    }

    std::deque<std::string> urls;
    for (int i = 0; i < 9; ++i) urls.push_back("https://example.org/page/" + std::to_string(i));
    int pending = 0;  // URLs handed out whose report has not come back
    int stopped = 0;
    std::vector<mp::Connection*> watch;
    for (auto& c : conns) watch.push_back(&c);
    while (stopped < kWorkers) {
        for (mp::Connection* c : mp::connection::wait(watch)) {
            std::string m = c->recv_bytes();
            if (m != "ready") {
                std::printf("%s\n", m.c_str());
                --pending;
            }
            if (!urls.empty()) {
                c->send_bytes(urls.front());
                urls.pop_front();
                ++pending;
            } else {
                c->send_bytes("");  // no more work: stop
                std::erase(watch, c);
                ++stopped;
            }
        }
    }
    for (auto& w : workers) w->join();
    listener.close();
    std::printf("master: all %d pages downloaded, %d workers stopped\n", 9, kWorkers);
    return pending == 0 ? 0 : 1;
}
