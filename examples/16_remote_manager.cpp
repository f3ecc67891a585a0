// Lesson 16: a manager served over TCP with an authkey; a client process connects to it.
//
// The Python original (two programs, or two processes of one):
//
//     class QueueManager(BaseManager): pass
//
//     # server
//     queue = queue.Queue()
//     QueueManager.register('get_queue', callable=lambda: queue)
//     m = QueueManager(address=('127.0.0.1', 50000), authkey=b'abracadabra')
//     m.get_server().serve_forever()
//
//     # client
//     QueueManager.register('get_queue')
//     m = QueueManager(address=('127.0.0.1', 50000), authkey=b'abracadabra')
//     m.connect()
//     m.get_queue().put('hello')
//
// Here the server runs a registered C++ type, a Tally, with the methods it exposes. The server
// process listens on 127.0.0.1 with a port the system picks; the client process connects with
// the same authkey, creates its own Tally and adds to the shared one, whose id it is given. A
// client with the wrong key is refused (mp::AuthenticationError), and calling a method the type
// does not expose is an mp::RemoteError. On other hosts the client would use the server's
// address and the same program.

#include <mp/connection.hpp>
#include <mp/managers.hpp>
#include <mp/process.hpp>

#include <cstdio>
#include <map>
#include <string>

namespace {

/// A tally of words, kept in the server.
class Tally {
public:
    int add(std::string word, int n) { return counts_[word] += n; }
    std::map<std::string, int> counts() const { return counts_; }
    void reset() { counts_.clear(); }  // not exposed

private:
    std::map<std::string, int> counts_;
};

void register_types(mp::BaseManager& m) {
    m.register_type<Tally>("Tally", {{"add", &Tally::add}, {"counts", &Tally::counts}});
}

const std::string kAuthkey = "abracadabra";

void client(mp::Address address, mp::BaseProxy shared) {
    mp::BaseManager m(address, kAuthkey);
    register_types(m);
    m.connect();
    std::printf("client: connected with the right key\n");
    shared.call<int>("add", std::string("hello"), 2);
    shared.call<int>("add", std::string("world"), 1);
    try {
        shared.call("reset");
    } catch (const mp::RemoteError& e) {
        std::printf("client: reset() -> mp::RemoteError: %s\n", e.message().c_str());
    }
    mp::BaseManager intruder(address, "open sesame");
    try {
        intruder.connect();
    } catch (const mp::AuthenticationError& e) {
        std::printf("client: the wrong key -> mp::AuthenticationError: %s\n", e.what());
    }
}

}  // namespace

int main() {
    mp::BaseManager server(mp::Address("127.0.0.1", 0), kAuthkey);
    register_types(server);
    server.start();
    std::printf("server: listening on 127.0.0.1 (port chosen by the system)\n");

    auto tally = server.create("Tally");
    tally.call<int>("add", std::string("hello"), 1);

    mp::Process p(client, server.address(), tally);
    p.start();
    p.join();

    for (auto& [word, n] : tally.call<std::map<std::string, int>>("counts"))
        std::printf("server: %s = %d\n", word.c_str(), n);
    server.shutdown();
    std::printf("server: shut down\n");
}
