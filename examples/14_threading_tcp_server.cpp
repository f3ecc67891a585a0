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

#include <mp/socketserver.hpp>

#include <arpa/inet.h>
#include <chrono>
#include <cstdio>
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

// A plain client socket: connect, read until the server closes, return the lines.
std::vector<std::string> fetch(const mp::ServerAddress& addr) {
    int fd = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    sockaddr_in in{};
    in.sin_family = AF_INET;
    in.sin_port = htons(addr.port);
    ::inet_pton(AF_INET, addr.host.c_str(), &in.sin_addr);
    std::vector<std::string> lines;
    if (::connect(fd, reinterpret_cast<sockaddr*>(&in), sizeof in) == 0) {
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
    ::close(fd);
    return lines;
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
    return ok ? 0 : 1;
}
