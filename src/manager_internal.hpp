#pragma once
// What the pieces of a manager share: the servants (src/manager_servants.cpp), the server
// (src/manager_server.cpp), the client's connections (src/manager_client.cpp) and the manager
// classes (src/managers.cpp).

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <stdexcept>
#include <functional>
#include <string>
#include <utility>
#include <vector>

#include "mp/managers.hpp"
#include "mp/process.hpp"

namespace mp::detail::managers {

inline constexpr std::size_t kMaxMessage = BaseManager::max_message;

/// The connection a server thread serves: lock ownership is per connection.
extern thread_local std::uint64_t t_caller;

/// The client connection a server thread serves (-1 outside one).
extern thread_local int t_client_fd;

/// Thrown out of a blocking wait when the client went away: the thread then ends, and what the
/// client held is released.
struct ClientGone : std::runtime_error {
    ClientGone() : std::runtime_error("the client disconnected") {}
};

/// request(address, authkey, op, 0, {}, {}) that gives up at `give_up`: mp::TimeoutError when
/// the server (stopped, say) has not answered by then; the connection is dropped.
std::string request_until(const Address& address, const std::string& authkey, Op op,
                          std::chrono::steady_clock::time_point give_up);

/// True when the peer of the connection this thread serves has hung up.
bool client_gone();

/// The built-in type registered under `name`, or nullptr. The entry lives as long as the program.
const TypeEntry* find_builtin(const std::string& name);

/// SyncManager::Pool's servant (src/manager_pool.cpp).
TypeEntry pool_entry();
/// SharedMemoryManager's tracker of segment names (src/manager_shm.cpp).
TypeEntry segment_tracker_entry();

/// Drops this thread's connection to a server that went away (so no descriptor lingers).
void drop_connection(const Address& address, const std::string& authkey);

/// Client(address, authkey) for a manager's client, mp's or Python's protocol: a server that
/// closes or resets the new connection during the handshake (a dying one whose socket still
/// takes connections) is mp::EOFError, as a server found gone is; a refused key stays
/// mp::AuthenticationError, a refused connection std::system_error ECONNREFUSED.
Connection connect_to_server(const Address& address, const std::string& authkey);

/// The objects a manager server keeps for clients that speak Python's protocol (a Python
/// BaseManager's proxies), in src/manager_python.cpp. The server tells the protocols apart by a
/// connection's first message: a pickle starts with PROTO (0x80), mp's requests with an Op.
class PythonSide {
public:
    /// `shared`: (type_id, Python type) pairs of BaseManager::register_shared.
    explicit PythonSide(std::vector<std::pair<std::string, std::string>> shared);
    ~PythonSide();
    /// Serves a connection whose first request is `first`; returns true when the client asked
    /// the server to shut down. Throws (EOFError, ClientGone ...) when the client goes away.
    bool serve(Connection& c, std::string first, const std::function<bool()>& stopping);
    /// Releases the locks that connection `caller` held.
    void release_owned(std::uint64_t caller);
    /// How many objects it holds (Python's number_of_objects()).
    std::size_t objects() const;

private:
    struct Impl;
    std::unique_ptr<Impl> impl_;
};

/// A server process this manager started.
struct ServerHandle {
    std::unique_ptr<Process> process;
};

}  // namespace mp::detail::managers
