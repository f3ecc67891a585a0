// The manager's server: one thread per authenticated client connection (as Python's Server),
// the objects it holds with their reference counts, and BaseManager's server side (start() in a
// forked process, serve_forever() in this one).

#include "mp/managers.hpp"

#include <algorithm>
#include <atomic>
#include <chrono>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <stdexcept>
#include <string>
#include <system_error>
#include <thread>
#include <unordered_map>
#include <vector>

#include <poll.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <unistd.h>

#include "manager_channel.hpp"
#include "manager_internal.hpp"
#include "mp/detail/future_core.hpp"
#include "mp/process.hpp"
#include "mp/util.hpp"
#include "sys/fd.hpp"
#include "sys/pidfd.hpp"

namespace mp {
namespace detail::managers {

namespace {
// Of the connection a server thread serves: whether the client said that only its thread ends
// (Op::detach), and the last result that held proxies (keep_reply_value).
thread_local bool t_detached = false;
thread_local std::shared_ptr<void> t_kept;
}  // namespace

void keep_reply_value(std::shared_ptr<void> value) { t_kept = std::move(value); }

namespace {

/// What a server raises for a method the type does not expose or an object it does not hold
/// (Python raises AttributeError / KeyError there); the client sees mp::RemoteError.
struct AttributeError : std::runtime_error {
    using std::runtime_error::runtime_error;
};
struct NoSuchObject : std::runtime_error {
    using std::runtime_error::runtime_error;
};

/// The client processes on a Unix socket (SO_PEERCRED), by pid: when one ends, the server shuts
/// its own end of each of that process's connections, so their threads end and what the client
/// held is released (release_owned) even while another process keeps a copy of the client's end
/// open, as a fork child of the client does (the child never uses it, but its copy hides the
/// hang-up for as long as it lives). A thread polls a pidfd per process.
class PeerWatcher {
public:
    PeerWatcher() = default;
    PeerWatcher(const PeerWatcher&) = delete;
    PeerWatcher& operator=(const PeerWatcher&) = delete;
    ~PeerWatcher() {
        {
            std::lock_guard lk(mu_);
            stopping_ = true;
        }
        if (thread_.joinable()) {
            poke();
            thread_.join();
        }
    }

    /// Watches the process at the other end of `fd` (a connection of this process's, open until
    /// forget(fd)). Nothing is watched when the peer is unknown (TCP) or cannot be (no pidfd).
    void watch(int fd) {
        ucred cred{};
        socklen_t len = sizeof cred;
        if (::getsockopt(fd, SOL_SOCKET, SO_PEERCRED, &cred, &len) != 0 || cred.pid <= 0) return;
        std::lock_guard lk(mu_);
        if (stopping_) return;
        auto it = peers_.find(cred.pid);
        if (it == peers_.end()) {
            sys::Fd pidfd;
            try {
                pidfd = sys::pidfd_open(cred.pid);
                if (!wake_) wake_ = sys::Fd(::eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK));
                if (!wake_) return;
                it = peers_.emplace(cred.pid, Peer{std::move(pidfd), {}}).first;
                if (!thread_.joinable()) thread_ = std::thread([this] { run(); });
            } catch (...) {
                // Gone already, or no descriptor or thread to be had: its connections end as
                // they close, as before.
                if (it != peers_.end()) peers_.erase(it);
                return;
            }
            poke();
        }
        it->second.fds.push_back(fd);
        fds_[fd] = cred.pid;
    }

    /// Before `fd` closes: its number may be another connection's afterwards.
    void forget(int fd) {
        std::lock_guard lk(mu_);
        auto f = fds_.find(fd);
        if (f == fds_.end()) return;
        auto p = peers_.find(f->second);
        if (p != peers_.end()) std::erase(p->second.fds, fd);
        fds_.erase(f);
    }

private:
    struct Peer {
        sys::Fd pidfd;
        std::vector<int> fds;
    };

    void poke() {
        const std::uint64_t one = 1;
        (void)!::write(wake_.get(), &one, sizeof one);
    }

    void run() {
        std::vector<pollfd> polled;
        std::vector<pid_t> pids;
        for (;;) {
            {
                std::lock_guard lk(mu_);
                if (stopping_) return;
                polled.assign(1, pollfd{wake_.get(), POLLIN, 0});
                pids.assign(1, 0);
                for (auto& [pid, peer] : peers_) {
                    polled.push_back(pollfd{peer.pidfd.get(), POLLIN, 0});
                    pids.push_back(pid);
                }
            }
            if (::poll(polled.data(), polled.size(), -1) < 0) continue;  // EINTR
            if (polled[0].revents != 0) {
                std::uint64_t n;
                (void)!::read(wake_.get(), &n, sizeof n);
            }
            std::lock_guard lk(mu_);
            for (std::size_t i = 1; i < polled.size(); ++i) {
                if (polled[i].revents == 0) continue;
                auto p = peers_.find(pids[i]);
                if (p == peers_.end()) continue;
                // Under the lock: forget() comes before a connection closes, so every number
                // here is still that process's connection.
                for (int fd : p->second.fds) {
                    ::shutdown(fd, SHUT_RDWR);
                    fds_.erase(fd);
                }
                peers_.erase(p);
            }
        }
    }

    std::mutex mu_;
    std::map<pid_t, Peer> peers_;
    std::unordered_map<int, pid_t> fds_;
    sys::Fd wake_;  // an eventfd: the thread polls the pidfds again (a new one, or it stops)
    bool stopping_ = false;
    std::thread thread_;
};

constexpr auto kHandshakeTimeout = std::chrono::seconds(5);
constexpr unsigned char kPickleProto = 0x80;

struct Object {
    std::shared_ptr<void> value;
    const TypeEntry* type = nullptr;
    std::string type_id;
    std::mutex mu;
    std::int64_t refs = 1;
};

class Server : public std::enable_shared_from_this<Server> {
public:
    // The Listener runs the handshakes, all of them in the accept loop and at once (none holds
    // up another, and an unauthenticated peer costs no thread); a client gets its thread only
    // once it has authenticated.
    Server(const Address& address, std::string authkey, TypeTable types,
           std::vector<std::pair<std::string, std::string>> python_shared)
        : listener_(address,
                    {.authkey = std::move(authkey), .handshake_timeout = kHandshakeTimeout}),
          types_(std::move(types)),
          python_(std::make_unique<PythonSide>(std::move(python_shared))) {
        auto [r, w] = Pipe(false);
        wake_r_ = r;
        wake_w_ = w;
    }

    const Address& address() const { return listener_.address(); }

    /// Accepts until shutdown; then closes every client connection and returns.
    void serve() {
        if (Logger& log = get_logger(); log.enabled_for(LogLevel::info)) {
            // As Python's repr of the address: 'path' or ('host', port).
            const Address& a = listener_.address();
            log.info("manager serving at " + (a.is_tcp() ? "('" + a.host + "', " + std::to_string(a.port) + ")"
                                                         : "'" + a.to_string() + "'"));
        }
        while (!stopping_.load()) {
            std::optional<Connection> c;
            try {
                c = accept_or_stop(listener_, wake_r_.fileno());
            } catch (const std::exception&) {
                // A peer that failed its handshake or vanished, or no descriptor or memory for
                // a new one: the Listener then leaves its backlog alone for a while (no spinning
                // here), and the clients' threads carry on.
                continue;
            }
            if (!c || stopping_.load()) break;
            std::uint64_t caller = ++next_caller_;
            {
                std::lock_guard lk(mu_);
                clients_.emplace(caller, c->fileno());
            }
            const int fd = c->fileno();
            peers_.watch(fd);
            try {
                std::thread(&Server::serve_client, shared_from_this(), std::move(*c), caller)
                    .detach();
            } catch (const std::system_error&) {
                // No thread to be had (EAGAIN: RLIMIT_NPROC, memory): refuse this client (its
                // connection closes with the arguments std::thread had taken) and stay up.
                peers_.forget(fd);
                std::lock_guard lk(mu_);
                clients_.erase(caller);
            }
        }
        listener_.close();
        std::lock_guard lk(mu_);
        // Wake the client threads out of their reads; they close their own ends.
        for (auto& [id, fd] : clients_) ::shutdown(fd, SHUT_RDWR);
    }

private:
    const TypeEntry* find_type(const std::string& name) {
        if (auto it = types_.find(name); it != types_.end()) return &it->second;
        return find_builtin(name);
    }

    std::shared_ptr<Object> find_object(std::uint64_t id) {
        std::lock_guard lk(mu_);
        auto it = objects_.find(id);
        if (it == objects_.end())
            throw NoSuchObject("no object with id " + std::to_string(id) + " in the manager");
        return it->second;
    }

    void handle(Decoder& in, Encoder& out) {
        auto op = static_cast<Op>(in.get<std::uint8_t>());
        auto id = in.get<std::uint64_t>();
        std::string name(in.read_view(in.read_size(1)));
        Decoder& a = in;  // the arguments are the rest of the message
        switch (op) {
            case Op::call: {
                auto obj = find_object(id);
                auto m = obj->type->methods.find(name);
                if (m == obj->type->methods.end())
                    throw AttributeError("method '" + name + "' of '" + obj->type_id +
                                         "' object is not exposed");
                if (obj->type->serialised) {
                    std::lock_guard lk(obj->mu);
                    m->second(obj->value.get(), a, out);
                } else {
                    m->second(obj->value.get(), a, out);
                }
                return;
            }
            case Op::create: {
                const TypeEntry* t = find_type(name);
                if (!t) throw AttributeError("type '" + name + "' is not registered with the manager");
                auto obj = std::make_shared<Object>();
                obj->value = t->make(a);
                obj->type = t;
                obj->type_id = name;
                std::lock_guard lk(mu_);
                std::uint64_t nid = ++next_object_;
                objects_.emplace(nid, std::move(obj));
                out.put(nid);
                return;
            }
            case Op::incref: {
                std::lock_guard lk(mu_);
                auto it = objects_.find(id);
                if (it == objects_.end())
                    throw NoSuchObject("no object with id " + std::to_string(id) + " in the manager");
                ++it->second->refs;
                return;
            }
            case Op::decref: {
                std::shared_ptr<Object> dead;  // destroyed outside the lock
                std::lock_guard lk(mu_);
                auto it = objects_.find(id);
                if (it != objects_.end() && --it->second->refs <= 0) {
                    dead = std::move(it->second);
                    objects_.erase(it);
                }
                return;
            }
            case Op::shutdown:
                get_logger().debug("manager received shutdown message");
                stopping_.store(true);
                return;
            case Op::ping:
                return;
            case Op::detach:
                t_detached = true;
                return;
            case Op::channel:
                break;  // asked for once, before any call (serve_client): not here
        }
        throw DecodeError("mp: unknown manager request");
    }

    void serve_client(Connection c, std::uint64_t caller) {
        t_caller = caller;
        t_client_fd = c.fileno();
        t_detached = false;
        // The last result that held proxies (keep_reply_value), kept until the client's next
        // request other than an incref has been served.
        std::shared_ptr<void> kept;
        try {
            Channel channel;
            std::string msg;
            bool first = true;
            for (;;) {
                if (channel) {
                    channel.receive(c, msg, kMaxMessage, [this] {
                        if (stopping_.load() || client_gone()) throw ClientGone();
                    });
                } else {
                    msg = c.recv_bytes(kMaxMessage);
                    if (!msg.empty() && msg[0] == static_cast<char>(Op::channel)) {
                        channel = offer_channel(c);
                        continue;
                    }
                    if (first && !msg.empty() && static_cast<unsigned char>(msg[0]) == kPickleProto) {
                        // A Python client (a pickle starts with PROTO; mp's requests with an Op).
                        if (python_->serve(c, std::move(msg), [this] { return stopping_.load(); })) {
                            stopping_.store(true);
                            char b = 1;
                            (void)!::write(wake_w_.fileno(), &b, 1);
                        }
                        break;
                    }
                }
                first = false;
                Encoder out;
                out.put(std::uint8_t{0});
                bool stop = false;
                const bool incref = !msg.empty() && msg[0] == static_cast<char>(Op::incref);
                try {
                    Decoder in(msg);
                    handle(in, out);
                    if (out.bytes().size() > kMaxMessage)
                        throw Error("mp: a reply of " + std::to_string(out.bytes().size()) +
                                    " bytes is over the manager's limit of " +
                                    std::to_string(kMaxMessage));
                    stop = stopping_.load();
                } catch (...) {
                    out = Encoder();
                    out.put(std::uint8_t{1});
                    encode_current_exception(out);
                }
                if (!incref) kept = std::exchange(t_kept, nullptr);  // the one before goes now
                if (channel)
                    channel.reply(c, out.bytes());
                else
                    c.send_bytes(out.bytes());
                if (stop) {
                    char b = 1;
                    (void)!::write(wake_w_.fileno(), &b, 1);
                }
            }
        } catch (...) {
            // End of file (the client left or was killed), a failed handshake, or shutdown.
        }
        kept.reset();
        t_kept.reset();
        {
            std::lock_guard lk(mu_);
            clients_.erase(caller);
        }
        peers_.forget(c.fileno());
        release_owned(caller, t_detached);
        c.close();
    }

    /// Answers a client's request for a shared-memory channel (a Unix socket only: the peer is on
    /// this host, and has passed the handshake). Without one (no memfd to be had, or TCP) the
    /// client goes on over the socket.
    Channel offer_channel(Connection& c) {
        Channel channel;
        ChannelOffer offer;
        if (listener_.address().is_unix()) {
            try {
                channel = Channel::create(offer.fd);
            } catch (const std::system_error&) {
                channel = Channel();
                offer.fd.reset();
            }
        }
        c.send(offer);
        return channel;  // the memfd closes here: the client has its own copy
    }

    /// Releases what a departed connection held (locks), so a killed client cannot wedge others;
    /// `thread_ended`: only the client's thread ended (it said so), and a plain Lock stays held.
    void release_owned(std::uint64_t caller, bool thread_ended) {
        std::vector<std::shared_ptr<Object>> held;
        {
            std::lock_guard lk(mu_);
            for (auto& [id, obj] : objects_)
                if (obj->type->on_disconnect) held.push_back(obj);
        }
        for (auto& obj : held) obj->type->on_disconnect(obj->value.get(), caller, thread_ended);
        python_->release_owned(caller);
    }

    Listener listener_;
    PeerWatcher peers_;
    TypeTable types_;
    std::unique_ptr<PythonSide> python_;
    Connection wake_r_, wake_w_;
    std::atomic<bool> stopping_{false};
    std::mutex mu_;
    std::unordered_map<std::uint64_t, std::shared_ptr<Object>> objects_;
    std::unordered_map<std::uint64_t, int> clients_;
    std::uint64_t next_object_ = 0;
    std::atomic<std::uint64_t> next_caller_{0};
};

}  // namespace
}  // namespace detail::managers

namespace dm = detail::managers;

void BaseManager::start_with(std::optional<detail::Task> initializer) {
    if (server_ || connected_) throw ProcessError("mp::BaseManager: already started or connected");
    auto [reader, writer] = Pipe(false);
    auto handle = std::make_unique<dm::ServerHandle>();
    handle->process = std::make_unique<Process>(
        ProcessOptions{.name = "ManagerServer", .daemon = true, .start_method = StartMethod::fork},
        [address = address_, key = authkey_, types = types_, shared = python_shared_,
         init = std::move(initializer)](Connection ready) mutable {
            std::shared_ptr<dm::Server> s;
            try {
                if (init) {
                    // Its descriptors are this process's copies of the parent's; the arguments
                    // take those they decode.
                    try {
                        (void)detail::run_task(init->bytes, init->fds);
                    } catch (const std::exception& e) {
                        throw Error(std::string("the initializer raised: ") + e.what());
                    } catch (...) {
                        throw Error("the initializer raised a non-standard exception");
                    }
                }
                s = std::make_shared<dm::Server>(address, key, types, shared);
            } catch (const std::exception& e) {
                ready.send_bytes(std::string("E") + e.what());
                return;
            }
            Encoder e;
            e.put(std::uint8_t{'A'});
            dm::encode_address(e, s->address());
            ready.send_bytes(e.bytes());
            ready.close();
            s->serve();
        },
        writer);
    handle->process->start();
    writer.close();
    // The server binds in the child and reports its address (the real port for port 0).
    std::string msg;
    try {
        if (!reader.poll(std::chrono::seconds(30)))
            throw ProcessError("mp::BaseManager: the server did not start within 30 s");
        msg = reader.recv_bytes();
    } catch (const EOFError&) {
        handle->process->join();
        throw ProcessError("mp::BaseManager: the server process died while starting");
    } catch (...) {
        handle->process->kill();
        handle->process->join();
        throw;
    }
    if (msg.empty() || msg[0] != 'A') {
        handle->process->join();
        throw ProcessError("mp::BaseManager: the server could not start: " +
                           (msg.empty() ? std::string() : msg.substr(1)));
    }
    Decoder d(std::string_view(msg).substr(1));
    address_ = dm::decode_address(d);
    server_ = std::move(handle);
}

void BaseManager::serve_forever(std::function<void(const Address&)> on_ready) {
    auto s = std::make_shared<dm::Server>(address_, authkey_, types_, python_shared_);
    address_ = s->address();
    if (on_ready) on_ready(address_);
    s->serve();
}

}  // namespace mp
