// The client's side of a manager: one connection per server per thread (with its shared-memory
// channel over a Unix socket), requests and their replies, and a proxy's reference to its object.

#include "mp/managers.hpp"

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <chrono>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <system_error>
#include <vector>

#include <poll.h>
#include <pthread.h>
#include <unistd.h>

#include "handshake.hpp"
#include "manager_channel.hpp"
#include "manager_internal.hpp"
#include "mp/detail/future_core.hpp"
#include "sys/pidfd.hpp"

namespace mp::detail::managers {

Connection connect_to_server(const Address& address, const std::string& authkey) {
    try {
        return Client(address, {.authkey = authkey});
    } catch (const handshake::PeerGone& e) {
        throw EOFError(std::string("mp: the manager server went away (") + e.what() + ")");
    }
}

namespace {

/// A connection to a server and, on a Unix socket, its shared-memory channel.
struct Link {
    Connection socket;
    Channel channel;
};

/// One connection per server (and key) per thread; a fork child starts afresh.
struct ClientConnections {
    ClientConnections();
    ClientConnections(const ClientConnections&) = delete;
    ClientConnections& operator=(const ClientConnections&) = delete;
    ~ClientConnections();
    pid_t pid = 0;
    std::map<std::string, Link> by_address;
    // The last one used, so that a run of calls to one server skips the map.
    Link* last = nullptr;
    Address last_address;
    std::string last_key;
};
thread_local ClientConnections t_connections;

// Whether this thread's t_connections is still there. A proxy may be destroyed after it: a static
// one at exit (the main thread's thread_local objects go before the static ones), or one that a
// thread_local object of the user's holds. This flag is trivially destructible, so it can still
// be read then; such a late call opens a connection of its own for itself.
enum class CacheState : unsigned char { unused, live, gone };
thread_local CacheState t_cache_state = CacheState::unused;

ClientConnections::ClientConnections() { t_cache_state = CacheState::live; }

std::string connection_key(const Address& address, const std::string& authkey) {
    return address.to_string() + '\n' + authkey;
}

/// Connects and authenticates; over a Unix socket, also asks for a channel.
Link open_link(const Address& address, const std::string& authkey) {
    Link l{connect_to_server(address, authkey), Channel()};
    if (address.is_unix()) {
        Encoder e;
        begin_request(e, Op::channel, 0, {});
        l.socket.send_bytes(e.bytes());
        auto offer = l.socket.recv<ChannelOffer>();
        if (offer.fd) l.channel = Channel::attach(std::move(offer.fd));
    }
    return l;
}

using GiveUp = std::optional<std::chrono::steady_clock::time_point>;

/// One request and its reply over `l`; mp::TimeoutError when `give_up` passes first.
std::string round_trip(Link& l, std::string_view message, GiveUp give_up) {
    if (l.channel) return l.channel.call(l.socket, message, give_up);
    l.socket.send_bytes(message);
    if (give_up && !l.socket.poll(std::max(*give_up - std::chrono::steady_clock::now(),
                                           std::chrono::steady_clock::duration::zero())))
        throw TimeoutError("mp: the manager server did not answer in time");
    return l.socket.recv_bytes();
}

/// Drops the connections whose server has gone (shut down or died; its end is closed, so the
/// socket reads as ready, at end of file), so that a thread that talks to many managers in turn
/// keeps no descriptor, server thread or channel mapping for those that are gone. Called before
/// another connection is opened: the ones in use cost no check.
void drop_dead_links(ClientConnections& cc) {
    if (cc.by_address.empty()) return;
    std::vector<pollfd> fds;
    fds.reserve(cc.by_address.size());
    for (auto& [key, link] : cc.by_address) fds.push_back(pollfd{link.socket.fileno(), POLLIN, 0});
    if (::poll(fds.data(), fds.size(), 0) <= 0) return;
    std::size_t i = 0;
    for (auto it = cc.by_address.begin(); it != cc.by_address.end(); ++i) {
        // A request waits for its reply, so nothing is ever left to read from a live server.
        if (fds[i].revents != 0) {
            if (cc.last == &it->second) cc.last = nullptr;
            it = cc.by_address.erase(it);
        } else {
            ++it;
        }
    }
}


ClientConnections::~ClientConnections() {
    t_cache_state = CacheState::gone;
    // A thread that ends, in a process that goes on, says so to each server before its
    // connection closes: a plain Lock it acquired then stays held, for another thread to release,
    // as Python's. A connection that closes without this word is a process that died (or exits:
    // the main thread's objects go at exit), and the server releases the locks it held.
    // A server that does not answer within a bound (stopped, say) does not keep the thread.
    if (pid != sys::self_pid() || sys::on_main_thread()) return;
    constexpr auto kDetachWait = std::chrono::seconds(2);
    for (auto& [key, link] : by_address) {
        try {
            Encoder e;
            begin_request(e, Op::detach, 0, {});
            if (link.channel) {
                (void)link.channel.call(link.socket, e.bytes(), std::chrono::steady_clock::now() + kDetachWait);
            } else {
                link.socket.send_bytes(e.bytes());
                if (link.socket.poll(kDetachWait)) (void)link.socket.recv_bytes();
            }
        } catch (...) {
            // The server has gone (it holds nothing of ours), or does not answer.
        }
    }
}

Link& connection_to(const Address& address, const std::string& authkey) {
    ClientConnections& cc = t_connections;
    pid_t pid = sys::self_pid();
    if (cc.pid != pid) {
        // A fork child's copies of its parent's connections (and channels): never used, just
        // dropped (closing a socket copy and unmapping a channel touch nothing the parent uses).
        cc.by_address.clear();
        cc.last = nullptr;
        cc.pid = pid;
    }
    if (cc.last && cc.last_address == address && cc.last_key == authkey) return *cc.last;
    std::string key = connection_key(address, authkey);
    auto it = cc.by_address.find(key);
    if (it == cc.by_address.end()) {
        drop_dead_links(cc);
        it = cc.by_address.emplace(key, open_link(address, authkey)).first;
    }
    cc.last = &it->second;
    cc.last_address = address;
    cc.last_key = authkey;
    return it->second;
}

}  // namespace

/// Drops this thread's connection to a server that went away (so no descriptor lingers).
void drop_connection(const Address& address, const std::string& authkey) {
    if (t_cache_state != CacheState::live) return;
    ClientConnections& cc = t_connections;
    if (cc.pid != sys::self_pid()) return;
    cc.by_address.erase(connection_key(address, authkey));
    cc.last = nullptr;
}

void encode_address(Encoder& e, const Address& a) {
    e.put(static_cast<std::uint8_t>(a.family));
    e.put(a.host);
    e.put(a.port);
    e.put(a.path);
}

Address decode_address(Decoder& d) {
    auto family = d.get<std::uint8_t>();
    if (family > 2) throw DecodeError("mp: bad manager address family");
    Address a;
    a.family = static_cast<Address::Family>(family);
    a.host = d.get<std::string>();
    a.port = d.get<std::uint16_t>();
    a.path = d.get<std::string>();
    return a;
}

namespace {

std::string request(const Address& address, const std::string& authkey, std::string& message, GiveUp give_up) {
    // The server would drop the connection on reading the header; say why instead.
    if (message.size() > kMaxMessage)
        throw Error("mp: a manager request of " + std::to_string(message.size()) +
                    " bytes is over the limit of " + std::to_string(kMaxMessage));
    std::string reply;
    if (t_cache_state == CacheState::gone) {
        // This thread's connections are gone (a proxy destroyed at exit, after them): one for
        // this request alone.
        Link link = open_link(address, authkey);
        reply = round_trip(link, message, give_up);
    } else {
        Link& link = connection_to(address, authkey);
        try {
            reply = round_trip(link, message, give_up);
        } catch (const std::system_error& e) {
            // The server is gone (or the stream is out of step): the next call reconnects. A
            // connection that broke mid-request (a large one is written to the socket, where the
            // dead server's end refuses it) is the server's end of file, as everywhere else.
            drop_connection(address, authkey);
            const int err = e.code().value();
            if (e.code().category() == std::system_category() && (err == EPIPE || err == ECONNRESET))
                throw EOFError(std::string("mp: the manager's connection broke during a request (") +
                               e.what() + ")");
            throw;
        } catch (...) {
            drop_connection(address, authkey);
            throw;
        }
    }
    if (reply.empty()) throw DecodeError("mp: empty reply from the manager");
    if (reply[0] == 0) {
        reply.erase(0, 1);
        return reply;
    }
    Decoder d(std::string_view(reply).substr(1));
    ErrorInfo info = decode_error_info(d);
    std::rethrow_exception(make_remote_exception(info));
}

}  // namespace

std::string request(const Address& address, const std::string& authkey, std::string& message) {
    return request(address, authkey, message, std::nullopt);
}

std::string request_until(const Address& address, const std::string& authkey, Op op,
                          std::chrono::steady_clock::time_point give_up) {
    Encoder e;
    begin_request(e, op, 0, {});
    return request(address, authkey, e.bytes(), give_up);
}

std::string request(const Address& address, const std::string& authkey, Op op, std::uint64_t id,
                    std::string_view name, std::string_view args) {
    Encoder e;
    begin_request(e, op, id, name);
    e.write(args.data(), args.size());
    return request(address, authkey, e.bytes());
}

std::shared_ptr<ProxyState> adopt(Address address, std::string authkey, std::string type_id,
                                  std::uint64_t id, bool incref) {
    auto s = std::make_shared<ProxyState>();
    s->address = std::move(address);
    s->authkey = std::move(authkey);
    s->type_id = std::move(type_id);
    s->id = id;
    if (incref) request(s->address, s->authkey, Op::incref, id, {}, {});
    s->owner = ::getpid();
    return s;
}

ProxyState::~ProxyState() {
    if (owner != ::getpid()) return;
    try {
        request(address, authkey, Op::decref, id, {}, {});
    } catch (...) {
        // The server is gone: nothing left to release.
    }
}

}  // namespace mp::detail::managers
