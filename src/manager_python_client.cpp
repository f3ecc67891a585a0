// The client's side of Python's manager protocol: mp::PyManagerClient and mp::PyProxy, which
// call a Python manager server (or an mp one) the way Python's proxies do. The protocol and the
// server's side: manager_python.cpp.

#include <algorithm>
#include <exception>
#include <iterator>
#include <optional>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include <unistd.h>

#include "manager_internal.hpp"
#include "mp/managers.hpp"
#include "py_internal.hpp"

namespace mp {

namespace detail::managers {

using py::Kind;
using py::Object;

struct PyProxyState {
    Address address;
    std::string authkey;
    std::string ident;
    std::string type_id;
    std::vector<std::string> exposed;
    pid_t owner = 0;
    PyProxyState() = default;
    PyProxyState(const PyProxyState&) = delete;
    PyProxyState& operator=(const PyProxyState&) = delete;
    ~PyProxyState();
};

namespace {

std::string origin_of(const Address& a) { return "Python manager at " + a.to_string(); }

std::string request_pickle(const Object& ident, std::string_view method, std::vector<Object> args,
                           const PyKwargs& kwargs) {
    py::Writer w;
    w.begin_tuple(4);
    w.object(ident);
    w.str(method);
    w.object(Object::tuple(std::move(args)));
    w.begin_dict();
    for (const auto& [k, v] : kwargs) {
        w.str(k);
        w.object(v);
    }
    w.end_dict();
    w.end_tuple(4);
    return w.finish();
}

/// Python's str() of an exception of class `type` (without "builtins.") made with `args`: what
/// RemoteError::message() holds.
std::string exception_str(const std::string& type, const Object& args_tuple) {
    static constexpr std::string_view os_errors[] = {
        "OSError", "BlockingIOError", "ChildProcessError", "ConnectionError", "BrokenPipeError",
        "ConnectionAbortedError", "ConnectionRefusedError", "ConnectionResetError", "FileExistsError",
        "FileNotFoundError", "InterruptedError", "IsADirectoryError", "NotADirectoryError", "PermissionError",
        "ProcessLookupError", "TimeoutError"};
    py::Items args = args_tuple.items();
    auto str = [](const Object& o) { return o.kind() == Kind::str ? o.as<std::string>() : o.repr(); };
    // OSError's: errno and strerror (then filename, winerror, filename2) as its __reduce__ writes them.
    if (std::find(std::begin(os_errors), std::end(os_errors), type) != std::end(os_errors) && args.size() >= 2 &&
        args.size() <= 5 && !args[0].is_none() && !args[1].is_none()) {
        std::string s = "[Errno " + str(args[0]) + "] " + str(args[1]);
        const bool filename = args.size() >= 3 && !args[2].is_none();
        if (filename) s += ": " + args[2].repr();
        if (filename && args.size() == 5 && !args[4].is_none()) s += " -> " + args[4].repr();
        return s;
    }
    if (args.size() == 1) return type == "KeyError" ? args[0].repr() : str(args[0]);
    return args.size() == 0 ? std::string() : args_tuple.repr();
}

/// Python's convert_to_error, for a reply other than '#RETURN'.
[[noreturn]] void throw_reply(const std::string& kind, const Object& result, const Address& address) {
    if (kind == "#ERROR" && result.kind() == Kind::tuple && result.items().size() == 2 &&
        result.items()[0].kind() == Kind::str && result.items()[1].kind() == Kind::tuple) {
        // An exception, as loads_with_exceptions reads one: (class name, args).
        std::string type = result.items()[0].as<std::string>();
        if (type == "_queue.Empty") type = "queue.Empty";
        std::string message = exception_str(type, result.items()[1]);
        throw RemoteError(std::move(type), std::move(message), origin_of(address));
    }
    if (kind == "#TRACEBACK" || kind == "#UNSERIALIZABLE" || kind == "#ERROR") {
        std::string text = result.kind() == Kind::str ? result.as<std::string>() : result.repr();
        throw RemoteError(kind == "#UNSERIALIZABLE" ? "Unserializable" : "Traceback", std::move(text),
                          origin_of(address));
    }
    if (kind == "#PROXY")
        throw Error("mp: the manager answered with a proxy (#PROXY: a method registered to return one), "
                    "which mp's Python-protocol client does not take");
    throw DecodeError("mp: a manager reply of unknown kind '" + kind + "'");
}

/// Sends one request and reads its reply (the result of a '#RETURN').
Object exchange(Connection& c, const std::string& request, const Address& address) {
    c.send_bytes(request);
    const std::string bytes = c.recv_bytes(kMaxMessage);
    Object reply;
    try {
        reply = py::detail::loads_with_exceptions(bytes);
    } catch (const py::UnpicklingError&) {
        // An '#ERROR' may carry an exception of a class outside Python's built-in ones (the
        // server program's own, with attributes perhaps): read as (class name, args) too, nothing
        // imported. Any other reply with such a global stays refused.
        const std::exception_ptr refused = std::current_exception();
        std::optional<Object> any;
        try {
            any = py::detail::loads_with_exceptions(bytes, {}, py::detail::ExceptionClasses::any);
        } catch (const py::UnpicklingError&) {
        }
        if (!any || any->kind() != Kind::tuple || any->items().size() != 2 || any->items()[0].kind() != Kind::str ||
            any->items()[0].as<std::string>() != "#ERROR")
            std::rethrow_exception(refused);
        reply = std::move(*any);
    }
    if (reply.kind() != Kind::tuple || reply.items().size() != 2 || reply.items()[0].kind() != Kind::str)
        throw DecodeError("mp: a manager reply is the tuple (kind, result), not " + reply.repr().substr(0, 200));
    std::string kind = reply.items()[0].as<std::string>();
    if (kind == "#RETURN") return reply.items()[1];
    throw_reply(kind, reply.items()[1], address);
}

/// One of the server's functions over a connection of its own (as Python's dispatch()).
Object dispatch(const Address& address, const std::string& authkey, std::string_view fn,
                std::vector<Object> args = {}, const PyKwargs& kwargs = {}) {
    Connection c = connect_to_server(address, authkey);
    return exchange(c, request_pickle(Object(), fn, std::move(args), kwargs), address);
}

/// This thread's connections that serve method calls (accept_connection), per server and key.
struct PyConnections {
    pid_t pid = 0;
    std::map<std::string, Connection> by_server;
};
thread_local PyConnections t_py_connections;

Connection& py_connection(const Address& address, const std::string& authkey, std::string& key) {
    PyConnections& pc = t_py_connections;
    if (pc.pid != ::getpid()) {
        // A fork child's copies of its parent's connections: dropped, never used.
        pc.by_server.clear();
        pc.pid = ::getpid();
    }
    key = address.to_string() + '\n' + authkey;
    auto it = pc.by_server.find(key);
    if (it != pc.by_server.end()) return it->second;
    Connection c = connect_to_server(address, authkey);
    exchange(c, request_pickle(Object(), "accept_connection", {Object("mp-" + std::to_string(::getpid()))}, {}),
             address);
    return pc.by_server.emplace(key, std::move(c)).first->second;
}

}  // namespace

namespace {

/// Proxies alive in this process per server and key: when the last one goes, the calling
/// thread's connection to that server closes with it (other threads' close when they exit).
/// Made on first use and never destroyed: a proxy at namespace scope may be made before this
/// file's initialisers run and destroyed after its destructors would have.
struct LiveProxies {
    std::mutex mu;
    std::map<std::string, std::size_t> count;
};
LiveProxies& live_proxies() {
    static LiveProxies* l = new LiveProxies;
    return *l;
}

void proxy_made(const std::string& key) {
    LiveProxies& l = live_proxies();
    std::lock_guard lk(l.mu);
    ++l.count[key];
}

void proxy_gone(const std::string& key) {
    {
        LiveProxies& l = live_proxies();
        std::lock_guard lk(l.mu);
        auto it = l.count.find(key);
        if (it == l.count.end() || --it->second > 0) return;
        l.count.erase(it);
    }
    if (t_py_connections.pid == ::getpid()) t_py_connections.by_server.erase(key);
}

}  // namespace

PyProxyState::~PyProxyState() {
    if (owner != ::getpid()) return;
    proxy_gone(address.to_string() + '\n' + authkey);
    try {
        dispatch(address, authkey, "decref", {Object(ident)});
    } catch (...) {
        // The server is gone: nothing left to release.
    }
}

}  // namespace detail::managers

namespace dm = detail::managers;

py::Object PyProxy::call(std::string_view method, std::vector<py::Object> args, PyKwargs kwargs) const {
    const dm::PyProxyState& s = detail::deref_handle(state_, "mp::PyProxy");
    std::string request = dm::request_pickle(py::Object(s.ident), method, std::move(args), kwargs);
    std::string key;
    Connection& c = dm::py_connection(s.address, s.authkey, key);
    try {
        return dm::exchange(c, request, s.address);
    } catch (const RemoteError&) {
        throw;
    } catch (const py::UnpicklingError&) {
        throw;  // the reply was read whole: the connection is still in step
    } catch (...) {
        dm::t_py_connections.by_server.erase(key);  // the next call reconnects
        throw;
    }
}

const std::string& PyProxy::id() const { return detail::deref_handle(state_, "mp::PyProxy").ident; }
const std::string& PyProxy::type_id() const { return detail::deref_handle(state_, "mp::PyProxy").type_id; }
const std::vector<std::string>& PyProxy::exposed() const {
    return detail::deref_handle(state_, "mp::PyProxy").exposed;
}

PyManagerClient::PyManagerClient(Address address, std::string authkey)
    : address_(std::move(address)), authkey_(std::move(authkey)) {
    dm::dispatch(address_, authkey_, "dummy");
}

PyProxy PyManagerClient::create(const std::string& type_id, std::vector<py::Object> args, PyKwargs kwargs) {
    args.insert(args.begin(), py::Object(type_id));
    py::Object r = dm::dispatch(address_, authkey_, "create", std::move(args), kwargs);
    if (r.kind() != py::Kind::tuple || r.items().size() != 2 || r.items()[0].kind() != py::Kind::str)
        throw DecodeError("mp: a create reply is (ident, exposed), not " + r.repr().substr(0, 200));
    auto s = std::make_shared<dm::PyProxyState>();
    s->address = address_;
    s->authkey = authkey_;
    s->ident = r.items()[0].as<std::string>();
    s->type_id = type_id;
    if (r.items()[1].kind() == py::Kind::tuple || r.items()[1].kind() == py::Kind::list)
        for (const py::Object& m : r.items()[1].items())
            if (m.kind() == py::Kind::str) s->exposed.push_back(m.as<std::string>());
    s->owner = ::getpid();
    dm::proxy_made(address_.to_string() + '\n' + authkey_);
    return PyProxy(std::move(s));
}

std::int64_t PyManagerClient::number_of_objects() {
    return dm::dispatch(address_, authkey_, "number_of_objects").as<std::int64_t>();
}

void PyManagerClient::shutdown() { dm::dispatch(address_, authkey_, "shutdown"); }

}  // namespace mp
