// Tests of mp's socketserver (include/mp/socketserver.hpp).
//
// Ports the behaviours of CPython's test_socketserver: an echo round trip with a real client
// socket through every server type (TCP, UDP, Unix stream and datagram; plain, threading and
// forking), shutdown() from another thread, handle_error called while the server goes on,
// handler threads joined and children reaped by server_close (the shared main fails a test that
// leaves a child or an fd behind), handle_request's timeout calling handle_timeout, a
// verify_request that drops the request; plus ForkingTCPServer's max_children and
// PreforkTCPServer (a crashed worker replaced, graceful shutdown); beyond Python, a service
// stopped by SIGTERM (mp::stop_on_signals) or by shutdown(timeout) while an idle client keeps a
// connection open. Every client socket has a
// receive timeout and every wait is bounded, so a broken server fails a test instead of hanging.

#include <gtest/gtest.h>

#include <atomic>
#include <cerrno>
#include <chrono>
#include <csignal>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fcntl.h>
#include <functional>
#include <memory>
#include <mutex>
#include <netinet/in.h>
#include <poll.h>
#include <stdexcept>
#include <string>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <sys/un.h>
#include <thread>
#include <unistd.h>
#include <vector>

#include <arpa/inet.h>

#include "mp/errors.hpp"
#include "mp/process.hpp"
#include "mp/socketserver.hpp"

#include "helpers/gate_file.hpp"
#include "helpers/temp_dir.hpp"

using namespace std::chrono_literals;

namespace {

// ---- a small blocking client ----

class Client {
public:
    Client(const mp::ServerAddress& to, int type, const std::string& bind_path = {}) {
        const bool v6 = !to.is_unix() && to.host.find(':') != std::string::npos;
        const int family = to.is_unix() ? AF_UNIX : (v6 ? AF_INET6 : AF_INET);
        fd_ = ::socket(family, type | SOCK_CLOEXEC, 0);
        if (fd_ < 0) throw std::system_error(errno, std::system_category(), "socket");
        timeval tv{10, 0};  // no test waits forever on a broken server
        ::setsockopt(fd_, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
        ::setsockopt(fd_, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv);
        if (!bind_path.empty()) {
            sockaddr_un un{};
            un.sun_family = AF_UNIX;
            std::strncpy(un.sun_path, bind_path.c_str(), sizeof un.sun_path - 1);
            if (::bind(fd_, reinterpret_cast<sockaddr*>(&un), sizeof un) != 0) {
                throw std::system_error(errno, std::system_category(), "bind");
            }
        }
        sockaddr_storage ss{};
        socklen_t len = 0;
        if (to.is_unix()) {
            auto* un = reinterpret_cast<sockaddr_un*>(&ss);
            un->sun_family = AF_UNIX;
            std::strncpy(un->sun_path, to.path.c_str(), sizeof un->sun_path - 1);
            len = sizeof(sockaddr_un);
        } else if (v6) {
            auto* in6 = reinterpret_cast<sockaddr_in6*>(&ss);
            in6->sin6_family = AF_INET6;
            in6->sin6_port = htons(to.port);
            ::inet_pton(AF_INET6, to.host.c_str(), &in6->sin6_addr);
            len = sizeof(sockaddr_in6);
        } else {
            auto* in = reinterpret_cast<sockaddr_in*>(&ss);
            in->sin_family = AF_INET;
            in->sin_port = htons(to.port);
            ::inet_pton(AF_INET, to.host.c_str(), &in->sin_addr);
            len = sizeof(sockaddr_in);
        }
        int rc = ::connect(fd_, reinterpret_cast<sockaddr*>(&ss), len);
        if (rc != 0 && errno == EINTR) {
            // A child's SIGCHLD: the connection goes on in the background; wait for its outcome.
            pollfd p{fd_, POLLOUT, 0};
            while (::poll(&p, 1, 10000) < 0 && errno == EINTR) {
            }
            int err = 0;
            socklen_t elen = sizeof err;
            ::getsockopt(fd_, SOL_SOCKET, SO_ERROR, &err, &elen);
            errno = err;
            rc = err == 0 ? 0 : -1;
        }
        if (rc != 0) {
            int err = errno;
            ::close(fd_);
            throw std::system_error(err, std::system_category(), "connect");
        }
    }
    ~Client() {
        if (fd_ >= 0) ::close(fd_);
    }
    Client(const Client&) = delete;
    Client& operator=(const Client&) = delete;

    void send(const std::string& s) {
        std::size_t off = 0;
        while (off < s.size()) {
            ssize_t n = ::send(fd_, s.data() + off, s.size() - off, MSG_NOSIGNAL);
            if (n < 0 && errno == EINTR) continue;  // a child's SIGCHLD (a socket timeout is not restarted)
            if (n < 0) throw std::system_error(errno, std::system_category(), "send");
            off += static_cast<std::size_t>(n);
        }
    }
    void shut_wr() { ::shutdown(fd_, SHUT_WR); }
    int fd() const { return fd_; }
    /// One recv (a datagram, or what a stream has now); "" at EOF; throws on timeout.
    std::string recv_some() {
        char buf[65536];
        ssize_t n;
        do {
            n = ::recv(fd_, buf, sizeof buf, 0);
        } while (n < 0 && errno == EINTR);
        if (n < 0) throw std::system_error(errno, std::system_category(), "recv");
        return std::string(buf, static_cast<std::size_t>(n));
    }
    std::string recv_all() {
        std::string out;
        for (std::string s = recv_some(); !s.empty(); s = recv_some()) out += s;
        return out;
    }
    std::string recv_line() {
        std::string out;
        char c;
        while (true) {
            ssize_t n = ::recv(fd_, &c, 1, 0);
            if (n < 0 && errno == EINTR) continue;
            if (n < 0) throw std::system_error(errno, std::system_category(), "recv");
            if (n == 0) return out;
            out += c;
            if (c == '\n') return out;
        }
    }

private:
    int fd_ = -1;
};

/// Sends `line` to a stream server and expects it back (the echo handlers).
void expect_line_echoed(const mp::ServerAddress& to, const std::string& line) {
    Client c(to, SOCK_STREAM);
    c.send(line);
    EXPECT_EQ(c.recv_line(), line);
}

/// Runs serve_forever in a thread; shuts the server down and joins at the end of the scope.
class Serving {
public:
    explicit Serving(mp::BaseServer& s, std::chrono::nanoseconds poll = 50ms)
        : s_(s), t_([this, poll] { s_.serve_forever(poll); }) {}
    ~Serving() { stop(); }
    void stop() {
        if (t_.joinable()) {
            s_.shutdown();
            t_.join();
        }
    }

private:
    mp::BaseServer& s_;
    std::thread t_;
};

/// A fresh Unix socket path in a private directory, removed at the end of the scope.
class TempPath {
public:
    TempPath() {
        char tmpl[] = "/tmp/mp_socketserver_XXXXXX";
        if (::mkdtemp(tmpl) == nullptr) throw std::system_error(errno, std::system_category(), "mkdtemp");
        dir_ = tmpl;
    }
    ~TempPath() {
        for (auto& p : paths_) ::unlink(p.c_str());
        ::rmdir(dir_.c_str());
    }
    std::string make(const std::string& name) {
        paths_.push_back(dir_ + "/" + name);
        return paths_.back();
    }

private:
    std::string dir_;
    std::vector<std::string> paths_;
};

// ---- handlers ----

struct StreamEcho : mp::StreamRequestHandler {
    void handle() override {
        for (std::string line = rfile.readline(); !line.empty(); line = rfile.readline()) wfile.write(line);
    }
};

struct DatagramEcho : mp::DatagramRequestHandler {
    void handle() override { wfile.write(rfile.read()); }
};

const std::string kTestLines = "hello world\nsecond line\nno newline at end";

template <class Server>
void stream_round_trip(const mp::ServerAddress& addr) {
    Server srv(addr, mp::handler<StreamEcho>());
    ASSERT_EQ(srv.fileno() >= 0, true);
    {
        Serving serving(srv);
        for (int i = 0; i < 3; ++i) {
            Client c(srv.server_address(), SOCK_STREAM);
            c.send(kTestLines);
            c.shut_wr();
            EXPECT_EQ(c.recv_all(), kTestLines);
        }
    }
    srv.server_close();
}

template <class Server>
void datagram_round_trip(const mp::ServerAddress& addr, const std::string& client_path = {}) {
    Server srv(addr, mp::handler<DatagramEcho>());
    {
        Serving serving(srv);
        Client c(srv.server_address(), SOCK_DGRAM, client_path);
        for (int i = 0; i < 3; ++i) {
            const std::string msg = "datagram " + std::to_string(i);
            c.send(msg);
            EXPECT_EQ(c.recv_some(), msg);
        }
    }
    srv.server_close();
}

// ---- every server type: an echo round trip ----

TEST(Socketserver, TCPServer) { stream_round_trip<mp::TCPServer>({"127.0.0.1", 0}); }
TEST(Socketserver, ThreadingTCPServer) { stream_round_trip<mp::ThreadingTCPServer>({"127.0.0.1", 0}); }
TEST(Socketserver, ForkingTCPServer) { stream_round_trip<mp::ForkingTCPServer>({"127.0.0.1", 0}); }

TEST(Socketserver, TCPServerIPv6) {
    try {
        stream_round_trip<mp::ThreadingTCPServer>({"::1", 0});
    } catch (const std::system_error& e) {
        GTEST_SKIP() << "no IPv6 loopback here: " << e.what();
    }
}

TEST(Socketserver, UDPServer) { datagram_round_trip<mp::UDPServer>({"127.0.0.1", 0}); }
TEST(Socketserver, ThreadingUDPServer) { datagram_round_trip<mp::ThreadingUDPServer>({"127.0.0.1", 0}); }
TEST(Socketserver, ForkingUDPServer) { datagram_round_trip<mp::ForkingUDPServer>({"127.0.0.1", 0}); }

TEST(Socketserver, UnixStreamServer) {
    TempPath tmp;
    stream_round_trip<mp::UnixStreamServer>(tmp.make("s"));
}
TEST(Socketserver, ThreadingUnixStreamServer) {
    TempPath tmp;
    stream_round_trip<mp::ThreadingUnixStreamServer>(tmp.make("s"));
}
TEST(Socketserver, ForkingUnixStreamServer) {
    TempPath tmp;
    stream_round_trip<mp::ForkingUnixStreamServer>(tmp.make("s"));
}

TEST(Socketserver, UnixDatagramServer) {
    TempPath tmp;
    datagram_round_trip<mp::UnixDatagramServer>(tmp.make("s"), tmp.make("c"));
}
TEST(Socketserver, ThreadingUnixDatagramServer) {
    TempPath tmp;
    datagram_round_trip<mp::ThreadingUnixDatagramServer>(tmp.make("s"), tmp.make("c"));
}
TEST(Socketserver, ForkingUnixDatagramServer) {
    TempPath tmp;
    datagram_round_trip<mp::ForkingUnixDatagramServer>(tmp.make("s"), tmp.make("c"));
}

TEST(Socketserver, UnixAbstractName) {
    const std::string name = std::string(1, '\0') + "mp_socketserver_test_" + std::to_string(::getpid());
    mp::UnixStreamServer srv(name, mp::handler<StreamEcho>());
    EXPECT_EQ(srv.server_address().path, name);
    EXPECT_EQ(srv.server_address().to_string()[0], '@');
}

TEST(Socketserver, WrongAddressFamilyIsRefused) {
    EXPECT_THROW(mp::TCPServer("/tmp/x", mp::handler<StreamEcho>()), std::invalid_argument);
    EXPECT_THROW(mp::UnixStreamServer(mp::ServerAddress("127.0.0.1", 0), mp::handler<StreamEcho>()),
                 std::invalid_argument);
}

TEST(Socketserver, UseAfterServerCloseIsAnError) {
    mp::TCPServer srv({"127.0.0.1", 0}, mp::handler<StreamEcho>());
    srv.server_close();
    srv.server_close();  // idempotent
    EXPECT_EQ(srv.fileno(), -1);
    EXPECT_THROW(srv.handle_request(), std::logic_error);
    EXPECT_THROW(srv.serve_forever(), std::logic_error);
}

TEST(Socketserver, ServerAddressHasTheBoundPort) {
    mp::TCPServer srv({"127.0.0.1", 0}, mp::handler<StreamEcho>());
    EXPECT_NE(srv.server_address().port, 0);
    EXPECT_EQ(srv.server_address().host, "127.0.0.1");
}

TEST(Socketserver, AllowReuseAddressAndPort) {
    mp::TCPServer a({"127.0.0.1", 0}, mp::handler<StreamEcho>(), {.allow_reuse_port = true});
    // Another socket may bind the same port only when both ask for SO_REUSEPORT.
    mp::TCPServer b(a.server_address(), mp::handler<StreamEcho>(), {.allow_reuse_port = true});
    EXPECT_EQ(a.server_address().port, b.server_address().port);
    EXPECT_THROW(mp::TCPServer(a.server_address(), mp::handler<StreamEcho>()), std::system_error);
    mp::TCPServer c({"127.0.0.1", 0}, mp::handler<StreamEcho>(), {.allow_reuse_address = true});
}

TEST(Socketserver, BindAndActivateFalse) {
    mp::TCPServer srv({"127.0.0.1", 0}, mp::handler<StreamEcho>(), {.bind_and_activate = false});
    EXPECT_EQ(srv.server_address().port, 0);
    srv.server_bind();
    srv.server_activate();
    EXPECT_NE(srv.server_address().port, 0);
    Serving serving(srv);
    expect_line_echoed(srv.server_address(), "x\n");
}

// ---- StreamRequestHandler's rfile/wfile ----

struct ReadPieces : mp::StreamRequestHandler {
    void handle() override {
        std::string a = rfile.readline();    // "line one\n"
        std::string b = rfile.read(4);       // "abcd"
        std::string c = rfile.readline(3);   // "efg" (limit)
        std::string d = rfile.readline();    // "h\n"
        std::string rest = rfile.read();     // up to EOF
        std::string after = rfile.readline();  // "" at EOF
        wfile.write(a + "|" + b + "|" + c + "|" + d + "|" + rest + "|" + after + "|");
    }
};

TEST(Socketserver, StreamHandlerReadlineAndRead) {
    mp::TCPServer srv({"127.0.0.1", 0}, mp::handler<ReadPieces>());
    Serving serving(srv);
    Client c(srv.server_address(), SOCK_STREAM);
    c.send("line ");
    std::this_thread::sleep_for(20ms);  // a line that arrives in pieces
    c.send("one\nabcdefgh\nthe rest");
    c.shut_wr();
    EXPECT_EQ(c.recv_all(), "line one\n|abcd|efg|h\n|the rest||");
}

struct TimeoutReader : mp::StreamRequestHandler {
    TimeoutReader() { timeout = 100ms; }
    void handle() override {
        try {
            rfile.readline();
            wfile.write("no timeout");
        } catch (const mp::TimeoutError&) {
            wfile.write("timeout");
        }
    }
};

TEST(Socketserver, StreamHandlerTimeout) {
    mp::TCPServer srv({"127.0.0.1", 0}, mp::handler<TimeoutReader>());
    Serving serving(srv);
    Client c(srv.server_address(), SOCK_STREAM);
    EXPECT_EQ(c.recv_all(), "timeout");
}

// ---- setup / handle / finish and what a handler sees ----

struct Recorder : mp::BaseRequestHandler {
    static inline std::vector<std::string> calls;
    static inline mp::BaseServer* seen_server = nullptr;
    void setup() override { calls.push_back("setup"); }
    void handle() override {
        calls.push_back("handle");
        seen_server = &server();
        const std::string reply = client_address().host;
        EXPECT_EQ(::send(request().fd(), reply.data(), reply.size(), MSG_NOSIGNAL), static_cast<ssize_t>(reply.size()));
        if (calls.size() > 3) throw std::runtime_error("second time");
    }
    void finish() override { calls.push_back("finish"); }
};

TEST(Socketserver, HandlerSetupHandleFinish) {
    Recorder::calls.clear();
    mp::TCPServer srv({"127.0.0.1", 0}, mp::handler<Recorder>());
    {
        Client c(srv.server_address(), SOCK_STREAM);
        srv.handle_request();
        EXPECT_EQ(c.recv_all(), "127.0.0.1");
    }
    EXPECT_EQ(Recorder::calls, (std::vector<std::string>{"setup", "handle", "finish"}));
    EXPECT_EQ(Recorder::seen_server, &srv);
    {
        // finish() runs also when handle() throws.
        Client c(srv.server_address(), SOCK_STREAM);
        testing::internal::CaptureStderr();
        srv.handle_request();
        testing::internal::GetCapturedStderr();
    }
    EXPECT_EQ(Recorder::calls.size(), 6u);
    EXPECT_EQ(Recorder::calls.back(), "finish");
}

// ---- shutdown ----

TEST(Socketserver, ShutdownFromAnotherThread) {
    // CPython's test_shutdown: several servers, each served by a thread, shut down from here.
    for (int i = 0; i < 5; ++i) {
        mp::ThreadingTCPServer srv({"127.0.0.1", 0}, mp::handler<StreamEcho>());
        std::atomic<bool> returned{false};
        std::thread t([&] {
            srv.serve_forever(10s);  // shutdown() wakes it: no waiting out the poll interval
            returned = true;
        });
        {
            expect_line_echoed(srv.server_address(), "ping\n");
        }
        const auto t0 = std::chrono::steady_clock::now();
        srv.shutdown();  // blocks until serve_forever has left its loop
        EXPECT_LT(std::chrono::steady_clock::now() - t0, 5s);
        t.join();
        EXPECT_TRUE(returned.load());
        srv.server_close();
    }
}

TEST(Socketserver, ShutdownBeforeServeForever) {
    mp::TCPServer srv({"127.0.0.1", 0}, mp::handler<StreamEcho>());
    srv.shutdown();        // nothing serving: returns at once
    srv.serve_forever();   // ... and the pending request makes this return at once too
    std::thread t([&] { srv.serve_forever(20ms); });
    std::this_thread::sleep_for(50ms);
    srv.shutdown();
    t.join();
}

TEST(Socketserver, ServeAgainAfterShutdown) {
    mp::TCPServer srv({"127.0.0.1", 0}, mp::handler<StreamEcho>());
    for (int round = 0; round < 2; ++round) {
        Serving serving(srv);
        expect_line_echoed(srv.server_address(), "again\n");
    }
}

// ---- errors ----

struct Throwing : mp::StreamRequestHandler {
    void handle() override {
        std::string line = rfile.readline();
        if (line == "boom\n") throw std::runtime_error("handler failed on purpose");
        wfile.write(line);
    }
};

template <class Base>
class CountingErrors : public Base {
public:
    using Base::Base;
    ~CountingErrors() override { this->server_close(); }
    void handle_error(const mp::Request&, const mp::ServerAddress&) override {
        try {
            throw;
        } catch (const std::runtime_error& e) {
            std::lock_guard lock(mu);
            messages.push_back(e.what());
        }
    }
    std::mutex mu;
    std::vector<std::string> messages;
};

template <class Server>
void error_handler_keeps_serving() {
    CountingErrors<Server> srv({"127.0.0.1", 0}, mp::handler<Throwing>());
    {
        Serving serving(srv);
        for (int i = 0; i < 3; ++i) {
            {
                Client c(srv.server_address(), SOCK_STREAM);
                c.send("boom\n");
                EXPECT_EQ(c.recv_all(), "");  // closed after the error
            }
            Client ok(srv.server_address(), SOCK_STREAM);
            ok.send("fine\n");
            EXPECT_EQ(ok.recv_line(), "fine\n");
        }
    }
    srv.server_close();
    std::lock_guard lock(srv.mu);
    ASSERT_EQ(srv.messages.size(), 3u);
    EXPECT_EQ(srv.messages[0], "handler failed on purpose");
}

TEST(Socketserver, HandleErrorCalledAndServerContinues) { error_handler_keeps_serving<mp::TCPServer>(); }
TEST(Socketserver, HandleErrorCalledAndServerContinuesThreading) {
    error_handler_keeps_serving<mp::ThreadingTCPServer>();
}

TEST(Socketserver, DefaultHandleErrorPrintsToStderr) {
    mp::TCPServer srv({"127.0.0.1", 0}, mp::handler<Throwing>());
    Client c(srv.server_address(), SOCK_STREAM);
    c.send("boom\n");
    testing::internal::CaptureStderr();
    srv.handle_request();
    const std::string err = testing::internal::GetCapturedStderr();
    EXPECT_NE(err.find("----------------------------------------\n"), std::string::npos) << err;
    EXPECT_NE(err.find("Exception occurred during processing of request from 127.0.0.1:"), std::string::npos)
        << err;
    EXPECT_NE(err.find("std::runtime_error: handler failed on purpose"), std::string::npos) << err;
    // The server is still usable.
    Client c2(srv.server_address(), SOCK_STREAM);
    c2.send("after\n");
    srv.handle_request();
    EXPECT_EQ(c2.recv_line(), "after\n");
}

TEST(Socketserver, ForkingHandlerErrorGoesToTheChildsStderr) {
    // The child reports the error and exits; the parent serves on and reaps it.
    mp::ForkingTCPServer srv({"127.0.0.1", 0}, mp::handler<Throwing>());
    {
        Serving serving(srv);
        {
            Client c(srv.server_address(), SOCK_STREAM);
            c.send("boom\n");
            EXPECT_EQ(c.recv_all(), "");
        }
        Client ok(srv.server_address(), SOCK_STREAM);
        ok.send("fine\n");
        EXPECT_EQ(ok.recv_line(), "fine\n");
    }
    srv.server_close();
    EXPECT_EQ(srv.active_children(), 0u);
}

// ---- threads joined, children reaped ----

// Each handler holds on until the test releases it (at most 20 s), then takes 100 ms more: a
// close that does not wait for it returns before it finished.
struct SlowDone : mp::StreamRequestHandler {
    static inline std::atomic<int> finished{0};
    static inline std::atomic<bool> release{false};
    void handle() override {
        wfile.write("started\n");
        const auto until = std::chrono::steady_clock::now() + 20s;
        while (!release && std::chrono::steady_clock::now() < until) std::this_thread::sleep_for(1ms);
        std::this_thread::sleep_for(100ms);
        finished++;
    }
};

TEST(Socketserver, ThreadingServerCloseJoinsThreads) {
    SlowDone::finished = 0;
    SlowDone::release = false;
    mp::ThreadingTCPServer srv({"127.0.0.1", 0}, mp::handler<SlowDone>());
    {
        Serving serving(srv);
        std::vector<std::unique_ptr<Client>> clients;
        for (int i = 0; i < 3; ++i) {
            clients.push_back(std::make_unique<Client>(srv.server_address(), SOCK_STREAM));
        }
        for (auto& c : clients) EXPECT_EQ(c->recv_line(), "started\n");
    }
    EXPECT_EQ(SlowDone::finished.load(), 0);  // still held
    SlowDone::release = true;
    srv.server_close();  // block_on_close: waits for every handler
    EXPECT_EQ(SlowDone::finished.load(), 3);
}

TEST(Socketserver, DaemonThreadsAreNotWaitedForByServerClose) {
    SlowDone::finished = 0;
    SlowDone::release = false;
    {
        mp::ThreadingTCPServer srv({"127.0.0.1", 0}, mp::handler<SlowDone>(), {.daemon_threads = true});
        {
            Serving serving(srv);
            Client c(srv.server_address(), SOCK_STREAM);
            EXPECT_EQ(c.recv_line(), "started\n");
        }
        srv.server_close();  // returns with the handler still held
        EXPECT_EQ(SlowDone::finished.load(), 0);
        SlowDone::release = true;
    }  // the destructor joins it: no thread outlives the server
    EXPECT_EQ(SlowDone::finished.load(), 1);
}

struct SlowPid : mp::StreamRequestHandler {
    void handle() override {
        wfile.write(std::to_string(::getpid()) + "\n");
        std::this_thread::sleep_for(200ms);
    }
};

TEST(Socketserver, ForkingServerCloseReapsChildren) {
    mp::ForkingTCPServer srv({"127.0.0.1", 0}, mp::handler<SlowPid>());
    std::vector<pid_t> pids;
    {
        Serving serving(srv);
        for (int i = 0; i < 3; ++i) {
            Client c(srv.server_address(), SOCK_STREAM);
            pids.push_back(std::stoi(c.recv_line()));
            EXPECT_NE(pids.back(), ::getpid());
        }
    }
    srv.server_close();  // block_on_close: waits for all three
    EXPECT_EQ(srv.active_children(), 0u);
    for (pid_t p : pids) EXPECT_NE(::kill(p, 0), 0) << "child " << p << " not reaped";
}

// A forked handler that ends without a word (_exit, as a crash would): the server keeps a
// duplicate of each connection until it reaps the child (for a shutdown deadline), so it must
// reap it as it ends, not at its loop's next poll_interval (here an hour): the client then sees
// the end of the connection at once, as a Python client of a ForkingTCPServer does.
struct ExitsAtOnce : mp::StreamRequestHandler {
    void handle() override { ::_exit(3); }
};

TEST(Socketserver, ForkingHandlerThatEndsClosesItsConnectionAtOnce) {
    mp::ForkingTCPServer srv({"127.0.0.1", 0}, mp::handler<ExitsAtOnce>());
    Serving serving(srv, std::chrono::hours(1));
    for (int i = 0; i < 3; ++i) {
        // Nothing sent: closed with our bytes unread, the connection would end in a reset.
        Client c(srv.server_address(), SOCK_STREAM);
        // "" at the end of the connection; the client's receive timeout throws otherwise.
        EXPECT_EQ(c.recv_all(), "");
    }
}

TEST(Socketserver, ForkingChildrenCollectedWhileServing) {
    mp::ForkingTCPServer srv({"127.0.0.1", 0}, mp::handler<StreamEcho>());
    {
        Serving serving(srv, 20ms);
        for (int i = 0; i < 5; ++i) {
            Client c(srv.server_address(), SOCK_STREAM);
            c.send("x\n");
            c.shut_wr();
            EXPECT_EQ(c.recv_all(), "x\n");
        }
    }
    // service_actions reaps the ended children while serve_forever runs (no server_close here).
    const auto deadline = std::chrono::steady_clock::now() + 10s;
    while (srv.active_children() != 0 && std::chrono::steady_clock::now() < deadline) {
        Serving serving(srv, 20ms);
        std::this_thread::sleep_for(60ms);
    }
    EXPECT_EQ(srv.active_children(), 0u);
}

template <class Base>
class MaxChildrenProbe : public Base {
public:
    using Base::Base;
    void process_request(mp::Request& r, const mp::ServerAddress& a) override {
        Base::process_request(r, a);
        most = std::max(most, this->active_children());
    }
    std::size_t most = 0;
};

// A forked handler that reports its pid, then waits until the test opens a gate (a file: the
// handler is another process), kGateLimit at most.
struct GatedPid : mp::StreamRequestHandler {
    static inline std::string gate;
    void handle() override {
        wfile.write(std::to_string(::getpid()) + "\n");
        (void)mp::test::wait_file(gate);
    }
};

TEST(Socketserver, ForkingMaxChildren) {
    mp::test::TempDir dir;
    mp::test::FileGate gate(dir);
    GatedPid::gate = gate.path();
    MaxChildrenProbe<mp::ForkingTCPServer> srv({"127.0.0.1", 0}, mp::handler<GatedPid>(),
                                               {.request_queue_size = 8, .max_children = 2});
    std::vector<std::unique_ptr<Client>> clients;
    for (int i = 0; i < 5; ++i) clients.push_back(std::make_unique<Client>(srv.server_address(), SOCK_STREAM));
    // Each handle_request forks one child; at the limit it first waits for a child to end. The
    // first two children are held until both have answered: two run at once, whatever the load.
    srv.handle_request();
    srv.handle_request();  // below the limit: neither waits
    EXPECT_FALSE(clients[0]->recv_line().empty());
    EXPECT_FALSE(clients[1]->recv_line().empty());
    gate.open();
    for (int i = 2; i < 5; ++i) srv.handle_request();
    EXPECT_EQ(srv.most, 2u);  // two ran at once, and never a third while two ran
    for (std::size_t i = 2; i < clients.size(); ++i) EXPECT_FALSE(clients[i]->recv_line().empty());
    srv.server_close();
    EXPECT_EQ(srv.active_children(), 0u);
}

// ---- handle_request, timeout, verify_request ----

template <class Base>
class TimeoutCounter : public Base {
public:
    using Base::Base;
    void handle_timeout() override { ++timeouts; }
    int timeouts = 0;
};

TEST(Socketserver, HandleRequestTimeoutCallsHandleTimeout) {
    TimeoutCounter<mp::TCPServer> srv({"127.0.0.1", 0}, mp::handler<StreamEcho>(), {.timeout = 100ms});
    const auto t0 = std::chrono::steady_clock::now();
    srv.handle_request();
    EXPECT_GE(std::chrono::steady_clock::now() - t0, 100ms);
    EXPECT_EQ(srv.timeouts, 1);
    srv.handle_request();
    EXPECT_EQ(srv.timeouts, 2);

    Client c(srv.server_address(), SOCK_STREAM);
    c.send("in time\n");
    c.shut_wr();
    srv.handle_request();
    EXPECT_EQ(srv.timeouts, 2);
    EXPECT_EQ(c.recv_all(), "in time\n");
}

TEST(Socketserver, HandleRequestTimeoutUDP) {
    TimeoutCounter<mp::UDPServer> srv({"127.0.0.1", 0}, mp::handler<DatagramEcho>(), {.timeout = 50ms});
    srv.handle_request();
    EXPECT_EQ(srv.timeouts, 1);
}

struct MustNotRun : mp::StreamRequestHandler {
    static inline std::atomic<int> runs{0};
    void handle() override { runs++; wfile.write("handled"); }
};

template <class Base>
class Refusing : public Base {
public:
    using Base::Base;
    bool verify_request(const mp::Request& r, const mp::ServerAddress& a) override {
        ++verified;
        EXPECT_GE(r.fd(), 0);
        EXPECT_EQ(a.host, "127.0.0.1");
        return false;
    }
    int verified = 0;
};

TEST(Socketserver, VerifyRequestFalseDropsTheRequest) {
    MustNotRun::runs = 0;
    Refusing<mp::TCPServer> srv({"127.0.0.1", 0}, mp::handler<MustNotRun>());
    Client c(srv.server_address(), SOCK_STREAM);
    srv.handle_request();
    EXPECT_EQ(c.recv_all(), "");
    EXPECT_EQ(srv.verified, 1);
    EXPECT_EQ(MustNotRun::runs.load(), 0);
}

TEST(Socketserver, VerifyRequestFalseForkingStartsNoChild) {
    MustNotRun::runs = 0;
    Refusing<mp::ForkingTCPServer> srv({"127.0.0.1", 0}, mp::handler<MustNotRun>());
    Client c(srv.server_address(), SOCK_STREAM);
    srv.handle_request();
    EXPECT_EQ(c.recv_all(), "");
    EXPECT_EQ(srv.active_children(), 0u);
}

// ---- PreforkTCPServer ----

// A worker forked while this process holds a client socket keeps a copy of it, and the server
// side of that connection would never see EOF: connect only once every worker runs.
void wait_for_workers(const mp::PreforkTCPServer& srv, std::size_t n) {
    const auto deadline = std::chrono::steady_clock::now() + 10s;
    while (srv.worker_pids().size() < n && std::chrono::steady_clock::now() < deadline) {
        std::this_thread::sleep_for(5ms);
    }
    ASSERT_EQ(srv.worker_pids().size(), n);
}

struct PidOrCrash : mp::StreamRequestHandler {
    void handle() override {
        for (std::string line = rfile.readline(); !line.empty(); line = rfile.readline()) {
            if (line == "crash\n") {
                const rlimit no_core{0, 0};
                ::setrlimit(RLIMIT_CORE, &no_core);
                std::raise(SIGKILL);
            }
            if (line == "slow\n") std::this_thread::sleep_for(300ms);
            wfile.write(std::to_string(::getpid()) + "\n");
        }
    }
};

TEST(Socketserver, PreforkServesFromWorkers) {
    mp::PreforkTCPServer srv({"127.0.0.1", 0}, mp::handler<PidOrCrash>(), {.workers = 3});
    {
        Serving serving(srv, 20ms);
        wait_for_workers(srv, 3);
        for (int i = 0; i < 10; ++i) {
            Client c(srv.server_address(), SOCK_STREAM);
            c.send("pid\n");
            const pid_t p = std::stoi(c.recv_line());
            EXPECT_NE(p, ::getpid());
        }
        EXPECT_EQ(srv.worker_pids().size(), 3u);
        EXPECT_EQ(srv.workers_started(), 3u);
    }
    EXPECT_TRUE(srv.worker_pids().empty());  // all joined when serve_forever returned
    srv.server_close();
}

TEST(Socketserver, PreforkCrashedWorkerIsReplaced) {
    mp::PreforkTCPServer srv({"127.0.0.1", 0}, mp::handler<PidOrCrash>(), {.workers = 2});
    Serving serving(srv, 20ms);
    wait_for_workers(srv, 2);
    pid_t crashed = 0;
    {
        Client c(srv.server_address(), SOCK_STREAM);
        c.send("pid\n");
        crashed = std::stoi(c.recv_line());
        c.send("crash\n");
        EXPECT_EQ(c.recv_all(), "");  // the worker died with the connection
    }
    const auto deadline = std::chrono::steady_clock::now() + 10s;
    while (srv.workers_started() < 3 && std::chrono::steady_clock::now() < deadline) {
        std::this_thread::sleep_for(10ms);
    }
    EXPECT_EQ(srv.workers_started(), 3u);
    std::vector<pid_t> pids = srv.worker_pids();
    EXPECT_EQ(pids.size(), 2u);
    EXPECT_EQ(std::count(pids.begin(), pids.end(), crashed), 0);
    for (int i = 0; i < 6; ++i) {
        Client c(srv.server_address(), SOCK_STREAM);
        c.send("pid\n");
        EXPECT_NE(std::stoi(c.recv_line()), crashed);
    }
}

TEST(Socketserver, PreforkShutdownIsGraceful) {
    mp::PreforkTCPServer srv({"127.0.0.1", 0}, mp::handler<PidOrCrash>(), {.workers = 2});
    auto serving = std::make_unique<Serving>(srv, 20ms);
    wait_for_workers(srv, 2);
    Client c(srv.server_address(), SOCK_STREAM);
    c.send("pid\n");
    EXPECT_FALSE(c.recv_line().empty());  // a worker has the connection
    c.send("slow\n");
    c.shut_wr();
    std::this_thread::sleep_for(50ms);  // the worker is in the middle of the slow request
    serving.reset();                    // shutdown: waits for the workers to finish
    EXPECT_FALSE(c.recv_line().empty());  // the slow answer still came
    EXPECT_EQ(c.recv_all(), "");
    srv.server_close();
}

// A handler in a forked child that calls server().shutdown(): Python's deadlocks (the child
// waits for its own copy of the server to stop serving). mp's asks the serving process to stop
// and returns; serve_forever then returns by itself and the parent does not spin on the
// wake-up byte meanwhile.
struct StopsTheServer : mp::StreamRequestHandler {
    void handle() override {
        rfile.readline();
        wfile.write("stopping\n");
        server().shutdown();
        wfile.write("stopped\n");
    }
};

template <class Server>
void forked_handler_stops_the_server(mp::ServerOptions options) {
    Server srv({"127.0.0.1", 0}, mp::handler<StopsTheServer>(), options);
    std::atomic<bool> returned{false};
    std::thread t([&] {
        srv.serve_forever(20ms);
        returned = true;
    });
    Client c(srv.server_address(), SOCK_STREAM);
    c.send("stop\n");
    EXPECT_EQ(c.recv_line(), "stopping\n");
    const auto deadline = std::chrono::steady_clock::now() + 10s;
    while (!returned && std::chrono::steady_clock::now() < deadline) std::this_thread::sleep_for(10ms);
    EXPECT_TRUE(returned.load()) << "serve_forever did not return after a handler's shutdown()";
    if (!returned) srv.shutdown(0s);  // a child hung in shutdown() is killed: fail, not hang
    t.join();
    pollfd p{c.fd(), POLLIN, 0};
    ASSERT_EQ(::poll(&p, 1, 10000), 1);
    EXPECT_EQ(c.recv_line(), "stopped\n");  // the child's shutdown() returned
    srv.server_close();
}

TEST(Socketserver, ForkingHandlerShutdownStopsTheServer) {
    forked_handler_stops_the_server<mp::ForkingTCPServer>({});
}

TEST(Socketserver, PreforkHandlerShutdownStopsTheServer) {
    forked_handler_stops_the_server<mp::PreforkTCPServer>({.workers = 2});
}

// A threading handler that calls shutdown(timeout), or shutdown() then server_close(): each
// waits for the other handler threads, not for its own (joining itself ended the program).
// (server_close() while serve_forever runs would close the socket under it: shutdown() first.)
struct StopsWithDeadline : mp::StreamRequestHandler {
    void handle() override {
        const std::string line = rfile.readline();
        if (line == "shutdown\n") server().shutdown(100ms);
        if (line == "close\n") {
            server().shutdown();
            server().server_close();
        }
        wfile.write("done\n");
    }
};

TEST(Socketserver, ThreadingHandlerShutdownWithTimeoutOrServerClose) {
    for (const std::string what : {"shutdown\n", "close\n"}) {
        mp::ThreadingTCPServer srv({"127.0.0.1", 0}, mp::handler<StopsWithDeadline>());
        std::thread t([&] { srv.serve_forever(20ms); });
        {
            Client c(srv.server_address(), SOCK_STREAM);
            c.send(what);
            EXPECT_EQ(c.recv_line(), "done\n");
        }
        srv.shutdown();
        t.join();
        srv.server_close();
    }
}

// A server made in one process and served in a child that process forked (prefork by hand):
// shutdown() in that child stops the child's own loop; only a forked *handler* asks its parent.
TEST(Socketserver, AServerServedInAForkedChildIsStoppedThere) {
    mp::TCPServer srv({"127.0.0.1", 0}, mp::handler<StreamEcho>());
    const pid_t pid = ::fork();
    if (pid == 0) {
        std::thread stopper([&] {
            std::this_thread::sleep_for(100ms);
            srv.shutdown();
        });
        srv.serve_forever(20ms);
        stopper.join();
        ::_exit(0);
    }
    ASSERT_GT(pid, 0);
    int status = 0;
    pid_t r = 0;
    for (int i = 0; i < 1000 && (r = ::waitpid(pid, &status, WNOHANG)) == 0; ++i) std::this_thread::sleep_for(10ms);
    if (r == 0) {
        ::kill(pid, SIGKILL);
        ::waitpid(pid, &status, 0);
        FAIL() << "the child's serve_forever did not return after its own shutdown()";
    }
    EXPECT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 0);
    srv.server_close();
}

TEST(Socketserver, PreforkHandleErrorInWorker) {
    CountingErrors<mp::PreforkTCPServer> srv({"127.0.0.1", 0}, mp::handler<Throwing>(), {.workers = 1});
    Serving serving(srv, 20ms);
    wait_for_workers(srv, 1);
    for (int i = 0; i < 3; ++i) {
        {
            Client c(srv.server_address(), SOCK_STREAM);
            c.send("boom\n");
            EXPECT_EQ(c.recv_all(), "");
        }
        Client ok(srv.server_address(), SOCK_STREAM);
        ok.send("fine\n");
        EXPECT_EQ(ok.recv_line(), "fine\n");
    }
    EXPECT_EQ(srv.workers_started(), 1u);  // errors do not end the worker
}

// ---- stopping a service: signals and a shutdown deadline ----

/// Reads exactly n bytes from fd, waiting at most `timeout` in all; false on timeout or EOF.
bool read_within(int fd, void* out, std::size_t n, std::chrono::milliseconds timeout) {
    const auto deadline = std::chrono::steady_clock::now() + timeout;
    auto* p = static_cast<char*>(out);
    while (n > 0) {
        const auto left = std::chrono::duration_cast<std::chrono::milliseconds>(
            deadline - std::chrono::steady_clock::now());
        if (left.count() <= 0) return false;
        pollfd pfd{fd, POLLIN, 0};
        const int r = ::poll(&pfd, 1, static_cast<int>(left.count()));
        if (r < 0 && errno == EINTR) continue;
        if (r <= 0) return false;
        const ssize_t got = ::read(fd, p, n);
        if (got < 0 && errno == EINTR) continue;
        if (got <= 0) return false;
        p += got;
        n -= static_cast<std::size_t>(got);
    }
    return true;
}

/// Says that it runs (a byte on `started_fd`), then reads until its client is done: an idle
/// client never is, so only the shutdown deadline ends it.
struct WaitsForClient : mp::StreamRequestHandler {
    static inline int started_fd = -1;
    void handle() override {
        const char b = 's';
        (void)!::write(started_fd, &b, 1);
        while (!rfile.readline().empty()) {
        }
    }
};

/// A pipe closed at the end of the scope.
struct TestPipe {
    int r = -1, w = -1;
    TestPipe() {
        int fds[2];
        if (::pipe2(fds, O_CLOEXEC) != 0) throw std::system_error(errno, std::system_category(), "pipe2");
        r = fds[0];
        w = fds[1];
    }
    ~TestPipe() {
        ::close(r);
        ::close(w);
    }
    TestPipe(const TestPipe&) = delete;
    TestPipe& operator=(const TestPipe&) = delete;
};

/// A server in a child process stops on SIGTERM with one idle client connected: it exits with
/// code 0 within its shutdown deadline (the idle connection closed), printing nothing to stderr.
template <class Server>
void stops_on_sigterm_with_an_idle_client() {
    TestPipe port_pipe, started;
    FILE* err = std::tmpfile();
    ASSERT_NE(err, nullptr);
    const int err_fd = ::fileno(err);
    mp::Process server({.start_method = mp::StartMethod::fork}, [&] {
        ::dup2(err_fd, STDERR_FILENO);
        WaitsForClient::started_fd = started.w;
        auto stop = mp::stop_on_signals({SIGINT, SIGTERM});
        Server srv({"127.0.0.1", 0}, mp::handler<WaitsForClient>(), {.shutdown_timeout = 200ms});
        const std::uint16_t port = srv.server_address().port;
        (void)!::write(port_pipe.w, &port, sizeof port);
        srv.serve_forever(stop.token(), 50ms);
    });
    server.start();
    std::uint16_t port = 0;
    bool joined = false;
    if (read_within(port_pipe.r, &port, sizeof port, 10000ms)) {
        Client idle({"127.0.0.1", port}, SOCK_STREAM);
        char b = 0;
        EXPECT_TRUE(read_within(started.r, &b, 1, 10000ms)) << "the handler did not start";
        server.terminate();  // SIGTERM
        // Bounded: without the deadline the idle connection would keep the server alive.
        joined = server.join(10s);
        EXPECT_TRUE(joined) << "the server did not exit after SIGTERM";
        if (joined) {
            EXPECT_EQ(idle.recv_some(), "");  // its connection was closed
        }
    } else {
        ADD_FAILURE() << "the server did not report its port";
    }
    if (!joined) {
        server.kill();
        server.join();
    }
    if (joined) {
        EXPECT_EQ(server.exitcode(), std::optional<int>(0));
    }
    std::string text(4096, '\0');
    text.resize(static_cast<std::size_t>(std::max<ssize_t>(0, ::pread(err_fd, text.data(), text.size(), 0))));
    std::fclose(err);
    EXPECT_EQ(text, "") << "a normal shutdown prints nothing";
}

TEST(Socketserver, StopsOnSigtermWithAnIdleClient) { stops_on_sigterm_with_an_idle_client<mp::TCPServer>(); }
TEST(Socketserver, ThreadingStopsOnSigtermWithAnIdleClient) {
    stops_on_sigterm_with_an_idle_client<mp::ThreadingTCPServer>();
}
TEST(Socketserver, ForkingStopsOnSigtermWithAnIdleClient) {
    stops_on_sigterm_with_an_idle_client<mp::ForkingTCPServer>();
}

// Runs `body` in a forked child, so that a server call that never returns fails the test after
// a bounded wait instead of hanging it: the child reports when `body` has returned (one that
// throws ends it with a nonzero exit code, its message on stderr).
template <class Body>
void run_bounded_in_child(const char* what, Body body) {
    TestPipe done;
    mp::Process p({.start_method = mp::StartMethod::fork}, [&] {
        body();
        (void)!::write(done.w, "k", 1);
    });
    p.start();
    char b = 0;
    EXPECT_TRUE(read_within(done.r, &b, 1, 10000ms)) << what;
    if (!p.join(10s)) {
        p.kill();
        p.join();
    }
    EXPECT_EQ(p.exitcode(), std::optional<int>(0));
}

// shutdown(timeout) from another thread: serve_forever returns and every handler has ended
// (the idle client's connection closed at the deadline) when it returns. `Handler` waits on its
// client and has a static started_fd it writes to once it runs.
template <class Server, class Handler = WaitsForClient>
void shutdown_with_deadline_closes_idle_connections(mp::ServerOptions options = {}) {
    run_bounded_in_child("shutdown(100ms) did not return", [options] {
        TestPipe started;
        Handler::started_fd = started.w;
        Server srv({"127.0.0.1", 0}, mp::handler<Handler>(), options);
        std::thread serving([&] { srv.serve_forever(20ms); });
        Client idle(srv.server_address(), SOCK_STREAM);
        char b = 0;
        if (!read_within(started.r, &b, 1, 10000ms)) throw std::runtime_error("the handler did not start");
        srv.shutdown(100ms);
        serving.join();
        if (srv.active_children() != 0) throw std::runtime_error("a child is still running");
        if (!idle.recv_some().empty()) throw std::runtime_error("the connection is still open");
        srv.server_close();
    });
}

TEST(Socketserver, ShutdownWithDeadlineClosesIdleConnections) {
    shutdown_with_deadline_closes_idle_connections<mp::TCPServer>();
}
TEST(Socketserver, ThreadingShutdownWithDeadlineClosesIdleConnections) {
    shutdown_with_deadline_closes_idle_connections<mp::ThreadingTCPServer>();
}
TEST(Socketserver, ForkingShutdownWithDeadlineClosesIdleConnections) {
    shutdown_with_deadline_closes_idle_connections<mp::ForkingTCPServer>();
}

// A datagram handler still running after server_close() (daemon_threads: server_close does not
// wait for it) replies through the server socket's number (Request::fd), which must not be
// another socket's by then: the reply went out of an unrelated socket the program had just made.
// Now the number is kept until the handler is joined, and the reply fails (ENOTSOCK, reported by
// handle_error; Python's fails with EBADF).
struct SlowDatagramEcho : mp::DatagramRequestHandler {
    static inline int started_fd = -1;
    void handle() override {
        const char b = 's';
        (void)!::write(started_fd, &b, 1);
        std::this_thread::sleep_for(300ms);
        wfile.write(rfile.read());
    }
};

TEST(Socketserver, ADatagramHandlerAfterServerCloseRepliesThroughNoOtherSocket) {
    TestPipe started;
    SlowDatagramEcho::started_fd = started.w;
    const int client = ::socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0);
    ASSERT_GE(client, 0);
    int other = -1;
    {
        mp::ThreadingUDPServer srv({"127.0.0.1", 0}, mp::handler<SlowDatagramEcho>(), {.daemon_threads = true});
        const int server_fd = srv.fileno();
        sockaddr_in to{};
        to.sin_family = AF_INET;
        to.sin_port = htons(srv.server_address().port);
        to.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
        ASSERT_EQ(::sendto(client, "ping", 4, 0, reinterpret_cast<sockaddr*>(&to), sizeof to), 4);
        srv.handle_request();  // starts the handler's thread
        char b = 0;
        ASSERT_TRUE(read_within(started.r, &b, 1, 10000ms));
        srv.server_close();  // returns at once: daemon_threads
        other = ::socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0);  // the lowest free number
        ASSERT_GE(other, 0);
        EXPECT_NE(other, server_fd) << "the closed server socket's number went to another socket";
        pollfd p{client, POLLIN, 0};
        EXPECT_EQ(::poll(&p, 1, 1500), 0) << "a reply came, from some socket of the program's";
    }  // joins the handler
    ::close(other);
    ::close(client);
}

// At max_children, serve_forever waits for a child to end before it takes the next request; a
// stop meanwhile ends that wait, and the deadline then ends the children that hold the limit
// (it waited for them for ever: shutdown(timeout) returned only as they ended on their own).
// The child does not read its connection (closing the parent's copy at the deadline does not end
// it); alarm() bounds it if nothing else does.
struct IgnoresItsClient : mp::StreamRequestHandler {
    static inline int started_fd = -1;
    void handle() override {
        ::alarm(30);
        const char b = 's';
        (void)!::write(started_fd, &b, 1);
        for (;;) ::pause();
    }
};

TEST(Socketserver, ForkingShutdownWithDeadlineEndsAWaitAtMaxChildren) {
    run_bounded_in_child("shutdown(100ms) at max_children did not return", [] {
        TestPipe started;
        IgnoresItsClient::started_fd = started.w;
        mp::ForkingTCPServer srv({"127.0.0.1", 0}, mp::handler<IgnoresItsClient>(), {.max_children = 1});
        std::thread serving([&] { srv.serve_forever(20ms); });
        Client first(srv.server_address(), SOCK_STREAM);
        char b = 0;
        if (!read_within(started.r, &b, 1, 10000ms)) throw std::runtime_error("the handler did not start");
        Client second(srv.server_address(), SOCK_STREAM);  // waits in the backlog for a slot
        std::this_thread::sleep_for(200ms);
        srv.shutdown(100ms);
        serving.join();
        if (srv.active_children() != 0) throw std::runtime_error("a child is still running");
        if (!first.recv_some().empty()) throw std::runtime_error("the first connection is still open");
        srv.server_close();
    });
}

// A prefork worker still busy with the idle client at the deadline is terminated.
TEST(Socketserver, PreforkShutdownWithDeadlineEndsABusyWorker) {
    shutdown_with_deadline_closes_idle_connections<mp::PreforkTCPServer>();
}

// seconds::max() (and any duration of `forever` or more) is no limit, as for every mp timeout:
// shutdown(seconds::max()) and {.shutdown_timeout = seconds::max()} let the request under way
// finish, and serve_forever(seconds::max()) sleeps until a request or shutdown() (the durations
// were taken as nanoseconds, which seconds::max() overflows to a negative count: the connection
// was cut at once, and serve_forever polled without sleeping).
template <class Server>
void max_durations_are_no_limit(bool by_option) {
    run_bounded_in_child("the server did not behave (see stderr)", [by_option] {
        TestPipe started;
        WaitsForClient::started_fd = started.w;
        mp::ServerOptions options;
        if (by_option) options.shutdown_timeout = std::chrono::seconds::max();
        Server srv({"127.0.0.1", 0}, mp::handler<WaitsForClient>(), options);
        std::thread serving([&] { srv.serve_forever(std::chrono::seconds::max()); });
        // Idle for a while: the serving thread sleeps in poll, it does not spin.
        rusage before{}, after{};
        ::getrusage(RUSAGE_SELF, &before);
        std::this_thread::sleep_for(300ms);
        ::getrusage(RUSAGE_SELF, &after);
        auto cpu_us = [](const rusage& r) {
            return (r.ru_utime.tv_sec + r.ru_stime.tv_sec) * 1'000'000L + r.ru_utime.tv_usec + r.ru_stime.tv_usec;
        };
        if (cpu_us(after) - cpu_us(before) > 150'000) throw std::runtime_error("serve_forever spins while idle");
        Client busy(srv.server_address(), SOCK_STREAM);
        char b = 0;
        if (!read_within(started.r, &b, 1, 10000ms)) throw std::runtime_error("the handler did not start");
        std::thread stopping([&] {
            if (by_option)
                srv.shutdown();
            else
                srv.shutdown(std::chrono::seconds::max());
        });
        std::this_thread::sleep_for(200ms);
        // Still open: poll sees neither data nor a hang-up.
        pollfd pf{busy.fd(), POLLIN, 0};
        if (::poll(&pf, 1, 0) != 0) throw std::runtime_error("the connection was cut at the stop");
        busy.shut_wr();  // the handler reads end of file and ends; shutdown() returns
        stopping.join();
        serving.join();
        srv.server_close();
    });
}

TEST(Socketserver, MaxDurationsAreNoLimit) {
    for (const bool by_option : {false, true}) {
        SCOPED_TRACE(by_option ? "ServerOptions::shutdown_timeout" : "shutdown(timeout)");
        max_durations_are_no_limit<mp::ThreadingTCPServer>(by_option);
        max_durations_are_no_limit<mp::ForkingTCPServer>(by_option);
    }
}

// A prefork worker whose handler ignores SIGTERM and waits on an idle client: past the deadline
// it is terminated, and killed a second later, so shutdown(timeout) returns (it waited for ever).
struct IgnoresSigterm : mp::StreamRequestHandler {
    static inline int started_fd = -1;
    void handle() override {
        ::signal(SIGTERM, SIG_IGN);
        const char b = 's';
        (void)!::write(started_fd, &b, 1);
        while (!rfile.readline().empty()) {
        }
    }
};

TEST(Socketserver, PreforkShutdownKillsAWorkerThatIgnoresSigterm) {
    shutdown_with_deadline_closes_idle_connections<mp::PreforkTCPServer, IgnoresSigterm>({.workers = 1});
}

TEST(Socketserver, StopTokenStopsServeForever) {
    mp::ThreadingTCPServer srv({"127.0.0.1", 0}, mp::handler<StreamEcho>());
    std::stop_source source;
    std::thread serving([&] { srv.serve_forever(source.get_token(), 20ms); });
    expect_line_echoed(srv.server_address(), "before the stop\n");
    source.request_stop();
    serving.join();  // bounded by ctest's TIMEOUT
    // A token stopped already: serve_forever returns at once.
    srv.serve_forever(source.get_token(), 20ms);
    srv.server_close();
}

// PreforkTCPServer overrides serve_forever(poll_interval); the stop-token overload is still there
// (it was hidden: serve_forever(token) did not compile).
TEST(Socketserver, StopTokenStopsAPreforkServer) {
    mp::PreforkTCPServer srv({"127.0.0.1", 0}, mp::handler<StreamEcho>(), {.workers = 1});
    std::stop_source source;
    std::thread serving([&] { srv.serve_forever(source.get_token(), 20ms); });
    wait_for_workers(srv, 1);  // a client made before the fork would be the worker's too
    expect_line_echoed(srv.server_address(), "before the stop\n");
    source.request_stop();
    serving.join();  // bounded by ctest's TIMEOUT
    EXPECT_TRUE(srv.worker_pids().empty());
    srv.server_close();
}

TEST(Socketserver, SignalStopTurnsASignalIntoAStopRequest) {
    struct sigaction before {};
    ASSERT_EQ(::sigaction(SIGUSR1, nullptr, &before), 0);
    {
        auto stop = mp::stop_on_signals({SIGUSR1});
        EXPECT_FALSE(stop.token().stop_requested());
        EXPECT_THROW(mp::SignalStop second({SIGUSR2}), mp::Error);  // one at a time
        ASSERT_EQ(::raise(SIGUSR1), 0);
        for (int i = 0; i < 1000 && !stop.token().stop_requested(); ++i) std::this_thread::sleep_for(10ms);
        EXPECT_TRUE(stop.token().stop_requested());
        EXPECT_EQ(stop.signal(), SIGUSR1);
        // The first signal put the previous disposition back.
        struct sigaction now {};
        ASSERT_EQ(::sigaction(SIGUSR1, nullptr, &now), 0);
        EXPECT_EQ(now.sa_handler, before.sa_handler);
    }
    EXPECT_THROW(mp::SignalStop({SIGKILL}), std::system_error);
    EXPECT_THROW(mp::SignalStop({0}), std::invalid_argument);
    auto again = mp::stop_on_signals({SIGUSR1});  // the earlier one is gone
    EXPECT_FALSE(again.token().stop_requested());
}

TEST(Socketserver, SignalStopLeavesForkedChildrenToTheDefaultAction) {
    auto stop = mp::stop_on_signals({SIGTERM});
    mp::Process child({.start_method = mp::StartMethod::fork}, [] { ::pause(); });
    child.start();
    std::this_thread::sleep_for(50ms);  // not needed for correctness: SIGTERM before pause also ends it
    child.terminate();
    ASSERT_TRUE(child.join(10s));
    EXPECT_EQ(child.exitcode(), -SIGTERM);
    EXPECT_FALSE(stop.token().stop_requested());  // the child's signal is not the parent's
}

}  // namespace
