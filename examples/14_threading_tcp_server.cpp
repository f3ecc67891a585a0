// Lesson 14: a ThreadingTCPServer and its client.
//
// The classic Python lesson:
//
//     class MyHandler(socketserver.BaseRequestHandler):
//         def handle(self):
//             self.request.sendall(b"hello\n")
//             time.sleep(0.2)
//             self.request.sendall(b"hello2\n")
//
//     with socketserver.ThreadingTCPServer(("127.0.0.1", 0), MyHandler) as srv:
//         threading.Thread(target=srv.serve_forever).start()
//         ... a client connects and prints what it receives ...
//         srv.shutdown()
//
// Each connection gets a thread of its own, so two clients are served side by side: both
// receive "hello" at once, and "hello2" 0.2 s later (not 0.4 s: the waits overlap). The client
// prints its lines once the server has closed the connection, so the output has a fixed order.
//
// Then the same server as a service that stops on SIGTERM (as from systemd or `kill`), without
// signal code of its own: mp::stop_on_signals turns the signal into a stop request, and
// ServerOptions::shutdown_timeout closes a connection that is still idle 0.3 s later instead of
// letting it keep the process alive. The service exits with code 0 and prints nothing.

#include <mp/process.hpp>
#include <mp/socketserver.hpp>

#include <arpa/inet.h>
#include <chrono>
#include <csignal>
#include <cstdint>
#include <cstdio>
#include <fcntl.h>
#include <netinet/in.h>
#include <string>
#include <sys/socket.h>
#include <thread>
#include <unistd.h>
#include <vector>

using namespace std::chrono_literals;

namespace {

struct Hello : mp::StreamRequestHandler {
    void handle() override {
        wfile.write("hello\n");
        std::this_thread::sleep_for(200ms);
        wfile.write("hello2\n");
    }
};

// Reads lines until its client hangs up.
struct Chat : mp::StreamRequestHandler {
    void handle() override {
        for (std::string line = rfile.readline(); !line.empty(); line = rfile.readline()) wfile.write(line);
    }
};

int connect_to(const mp::ServerAddress& addr) {
    int fd = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    sockaddr_in in{};
    in.sin_family = AF_INET;
    in.sin_port = htons(addr.port);
    ::inet_pton(AF_INET, addr.host.c_str(), &in.sin_addr);
    if (::connect(fd, reinterpret_cast<sockaddr*>(&in), sizeof in) != 0) {
        ::close(fd);
        return -1;
    }
    return fd;
}

// A plain client socket: connect, read until the server closes, return the lines.
std::vector<std::string> fetch(const mp::ServerAddress& addr) {
    int fd = connect_to(addr);
    std::vector<std::string> lines;
    if (fd >= 0) {
        std::string line;
        char c;
        while (::recv(fd, &c, 1, 0) == 1) {
            if (c != '\n') {
                line += c;
                continue;
            }
            lines.push_back(line);
            line.clear();
        }
    }
    if (fd >= 0) ::close(fd);
    return lines;
}

// The service: serves until SIGINT or SIGTERM, then gives open connections 0.3 s.
void service(int port_fd) {
    auto stop = mp::stop_on_signals({SIGINT, SIGTERM});
    mp::ThreadingTCPServer srv({"127.0.0.1", 0}, mp::handler<Chat>(), {.shutdown_timeout = 300ms});
    const std::uint16_t port = srv.server_address().port;
    (void)!::write(port_fd, &port, sizeof port);
    srv.serve_forever(stop.token());  // returns once stopped and the handlers have ended
}

}  // namespace

int main() {
    std::setvbuf(stdout, nullptr, _IOLBF, 0);

    mp::ThreadingTCPServer srv({"127.0.0.1", 0}, mp::handler<Hello>());
    std::thread serving([&] { srv.serve_forever(); });
    std::printf("server listening on %s (a free port)\n", srv.server_address().host.c_str());

    // Two clients at once, each in a thread of its own.
    std::vector<std::string> got[2];
    std::thread a([&] { got[0] = fetch(srv.server_address()); });
    std::thread b([&] { got[1] = fetch(srv.server_address()); });
    a.join();
    b.join();

    bool ok = true;
    for (int i = 0; i < 2; ++i) {
        for (const std::string& line : got[i]) std::printf("client %d received: %s\n", i + 1, line.c_str());
        ok = ok && got[i] == std::vector<std::string>{"hello", "hello2"};
    }

    srv.shutdown();  // from this thread: serve_forever returns in the other
    serving.join();
    srv.server_close();  // joins the handler threads
    std::printf("server closed\n");

    // Part 2: the service in a process of its own, an idle client, then SIGTERM.
    int ports[2];
    if (::pipe2(ports, O_CLOEXEC) != 0) return 1;
    mp::Process svc(service, ports[1]);
    svc.start();
    std::uint16_t port = 0;
    if (::read(ports[0], &port, sizeof port) != sizeof port) return 1;
    ::close(ports[0]);
    ::close(ports[1]);
    const int idle = connect_to({"127.0.0.1", port});
    std::printf("the service has an idle client; sending SIGTERM\n");
    std::this_thread::sleep_for(100ms);  // let the service take the connection first
    const auto t0 = std::chrono::steady_clock::now();
    svc.terminate();
    svc.join();
    const auto ms = std::chrono::duration_cast<std::chrono::milliseconds>(std::chrono::steady_clock::now() - t0);
    std::printf("service exited with code %d after about %lld ms (its deadline: 300 ms)\n",
                svc.exitcode().value_or(-1), static_cast<long long>(ms.count() / 100 * 100));
    char c;
    std::printf("the idle client %s\n", ::recv(idle, &c, 1, 0) == 0 ? "was disconnected" : "is still connected?");
    ::close(idle);
    ok = ok && svc.exitcode() == 0;
    return ok ? 0 : 1;
}
