// The client's side of a manager: one connection per server per thread (with its shared-memory
// channel over a Unix socket), requests and their replies, and a proxy's reference to its object.

#include "mp/managers.hpp"

#include <atomic>
#include <map>
#include <memory>
#include <string>
#include <string_view>

#include <pthread.h>
#include <unistd.h>

#include "manager_channel.hpp"
#include "manager_internal.hpp"
#include "mp/detail/future_core.hpp"
#include "sys/pidfd.hpp"

namespace mp::detail::managers {

namespace {

/// A connection to a server and, on a Unix socket, its shared-memory channel.
struct Link {
    Connection socket;
    Channel channel;
};

/// One connection per server (and key) per thread; a fork child starts afresh.
struct ClientConnections {
    pid_t pid = 0;
    std::map<std::string, Link> by_address;
    // The last one used, so that a run of calls to one server skips the map.
    Link* last = nullptr;
    Address last_address;
    std::string last_key;
};
thread_local ClientConnections t_connections;

std::string connection_key(const Address& address, const std::string& authkey) {
    return address.to_string() + '\n' + authkey;
}

/// Connects and authenticates; over a Unix socket, also asks for a channel.
Link open_link(const Address& address, const std::string& authkey) {
    Link l{Client(address, {.authkey = authkey}), Channel()};
    if (address.is_unix()) {
        Encoder e;
        begin_request(e, Op::channel, 0, {});
        l.socket.send_bytes(e.bytes());
        auto offer = l.socket.recv<ChannelOffer>();
        if (offer.fd) l.channel = Channel::attach(std::move(offer.fd));
    }
    return l;
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
    if (it == cc.by_address.end())
        it = cc.by_address.emplace(key, open_link(address, authkey)).first;
    cc.last = &it->second;
    cc.last_address = address;
    cc.last_key = authkey;
    return it->second;
}

}  // namespace

/// Drops this thread's connection to a server that went away (so no descriptor lingers).
void drop_connection(const Address& address, const std::string& authkey) {
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

std::string request(const Address& address, const std::string& authkey, std::string& message) {
    // The server would drop the connection on reading the header; say why instead.
    if (message.size() > kMaxMessage)
        throw Error("mp: a manager request of " + std::to_string(message.size()) +
                    " bytes is over the limit of " + std::to_string(kMaxMessage));
    std::string reply;
    {
        Link& link = connection_to(address, authkey);
        try {
            if (link.channel) {
                reply = link.channel.call(link.socket, message);
            } else {
                link.socket.send_bytes(message);
                reply = link.socket.recv_bytes();
            }
        } catch (...) {
            // The server is gone (or the stream is out of step): the next call reconnects.
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
