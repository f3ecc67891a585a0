#pragma once
// The manager protocol under include/mp/managers.hpp: how the server runs a method (TypeEntry,
// make_method), the requests a proxy sends and the client state behind a proxy. The code is in
// src/manager_client.cpp and src/manager_servants.cpp.

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <string_view>
#include <tuple>
#include <type_traits>
#include <typeinfo>
#include <unordered_map>
#include <utility>

#include <sys/types.h>

#include "mp/connection.hpp"
#include "mp/serialize.hpp"

namespace mp {

namespace detail::managers {

/// A method as the server runs it: decodes its arguments from `in`, writes its result to `out`.
using Method = std::function<void(void* object, Decoder& in, Encoder& out)>;

/// What the server knows about a type it can create.
struct TypeEntry {
    std::function<std::shared_ptr<void>(Decoder& args)> make;
    std::unordered_map<std::string, Method> methods{};
    /// true: each call holds the object's mutex (atomic calls). false: the type synchronises
    /// itself (blocking primitives).
    bool serialised = true;
    /// Called when a client connection ends (a lock it held is released). `thread_ended`: the
    /// client said first that only its thread ends (Op::detach), not its process.
    std::function<void(void* object, std::uint64_t caller, bool thread_ended)> on_disconnect;
};
using TypeTable = std::unordered_map<std::string, TypeEntry>;

void encode_address(Encoder& e, const Address& a);
Address decode_address(Decoder& d);

/// The built-in types, registered at static initialisation by every program that names them
/// (so a server running the same binary knows them).
bool register_builtin(const std::string& name, TypeEntry (*make_entry)());

/// Registers a built-in type when it is made; see Builtin::registered.
struct BuiltinRegistration {
    BuiltinRegistration(const char* name, TypeEntry (*make_entry)())
        : registered(register_builtin(name, make_entry)) {}
    bool registered;
};

/// Set by a proxy's Codec each time it writes one (this thread).
inline thread_local bool t_proxy_encoded = false;

/// In a server thread: keeps `value`, a result that held proxies, until the client has taken its
/// own references to them (its increfs come next on the same connection, while it decodes the
/// reply). A proxy popped from a container is its only reference: destroyed with the reply sent,
/// it would free the object before the client's incref.
void keep_reply_value(std::shared_ptr<void> value);

template <class T>
void put_result(Encoder& out, T&& v) {
    if constexpr (!std::is_void_v<std::remove_cvref_t<T>>) out.put(v);
}

template <class T, class R, class... A, class Call>
Method method_from(Call call) {
    return [call](void* o, Decoder& in, Encoder& out) {
        std::tuple<std::decay_t<A>...> args{in.get<std::decay_t<A>>()...};
        in.finish();
        T& self = *static_cast<T*>(o);
        if constexpr (std::is_void_v<R>) {
            std::apply([&](auto&... a) { call(self, a...); }, args);
        } else {
            R r = std::apply([&](auto&... a) -> R { return call(self, a...); }, args);
            const bool outer = std::exchange(t_proxy_encoded, false);
            out.put(r);
            if constexpr (std::is_object_v<R> && std::is_move_constructible_v<R>)
                if (t_proxy_encoded) keep_reply_value(std::make_shared<R>(std::move(r)));
            t_proxy_encoded = outer;
        }
    };
}

template <class T, class R, class... A>
Method make_method(R (T::*pm)(A...)) {
    return method_from<T, R, A...>([pm](T& s, auto&... a) -> R { return (s.*pm)(a...); });
}
template <class T, class R, class... A>
Method make_method(R (T::*pm)(A...) const) {
    return method_from<T, R, A...>([pm](T& s, auto&... a) -> R { return (s.*pm)(a...); });
}
template <class T, class R, class... A>
Method make_method(R (T::*pm)(A...) noexcept) {
    return method_from<T, R, A...>([pm](T& s, auto&... a) -> R { return (s.*pm)(a...); });
}
template <class T, class R, class... A>
Method make_method(R (T::*pm)(A...) const noexcept) {
    return method_from<T, R, A...>([pm](T& s, auto&... a) -> R { return (s.*pm)(a...); });
}

template <class F>
struct callable_traits : callable_traits<decltype(std::function{std::declval<F>()})> {};
template <class R, class Self, class... A>
struct callable_traits<std::function<R(Self, A...)>> {
    template <class T, class F>
    static Method make(F f) {
        return method_from<T, R, A...>([f](T& s, auto&... a) -> R { return f(s, a...); });
    }
};
/// A free callable taking the object first: [](Counter& c, int n) { ... }.
template <class T, class F>
    requires(!std::is_member_function_pointer_v<F>)
Method make_method(F f) {
    return callable_traits<F>::template make<T>(std::move(f));
}

/// The client side of one object: where it lives and its id there.
struct ProxyState {
    Address address;
    std::string authkey;
    std::string type_id;
    std::uint64_t id = 0;
    pid_t owner = 0;  ///< the process holding the server reference (0: none)
    ProxyState() = default;
    ProxyState(const ProxyState&) = delete;
    ProxyState& operator=(const ProxyState&) = delete;
    ~ProxyState();  ///< drops the reference when this process holds it
};

/// channel: asks for the shared-memory fast path (src/manager_channel.hpp), sent once after the
/// handshake over a Unix socket; the reply carries a memfd or nothing.
/// detach: a client thread that ends (in a process that goes on) says so before its connection
/// closes; the server then leaves a plain Lock it holds held (Python's rule), where a connection
/// closed without it (a dead process) has its locks released.
enum class Op : std::uint8_t {
    create = 1, call = 2, incref = 3, decref = 4, shutdown = 5, ping = 6, channel = 7, detach = 8
};
/// Starts a request in `e`: op, object id, name; the arguments follow (the rest of the message).
inline void begin_request(Encoder& e, Op op, std::uint64_t id, std::string_view name) {
    e.put(static_cast<std::uint8_t>(op));
    e.put(id);
    e.write_size(name.size());
    e.write(name.data(), name.size());
}
/// Sends the request in `message` over this thread's connection to the server and returns the
/// reply's result bytes, or throws the server's exception.
std::string request(const Address& address, const std::string& authkey, std::string& message);
/// The same, for a request without arguments.
std::string request(const Address& address, const std::string& authkey, Op op,
                    std::uint64_t id, std::string_view name, std::string_view args);
std::shared_ptr<ProxyState> adopt(Address address, std::string authkey,
                                  std::string type_id, std::uint64_t id, bool incref);

template <class S>
struct Builtin {
    static TypeEntry entry() { return S::entry(); }
    /// Initialised at priority 101, ahead of every namespace-scope object of the default
    /// priority: a Manager at namespace scope forks its server during static initialisation,
    /// and the server knows the types registered by then (its copy of the table), which
    /// without the priority would not yet include the ones its program's templates name.
    [[gnu::init_priority(101)]] static inline const BuiltinRegistration registered{
        typeid(S).name(), &entry};
    static std::string name() {
        (void)registered;
        return typeid(S).name();
    }
};

}  // namespace detail::managers

}  // namespace mp
