// The manager classes: BaseManager's life cycle and its requests to a server, and SyncManager's
// built-in types. The server, the servants and the client's connections have files of their own
// (src/manager_server.cpp, src/manager_servants.cpp, src/manager_client.cpp).

#include "mp/managers.hpp"

#include <algorithm>
#include <atomic>
#include <chrono>
#include <stdexcept>
#include <string>

#include <unistd.h>

#include "manager_internal.hpp"
#include "mp/util.hpp"
#include "sys/crypto.hpp"

namespace mp {

namespace dm = detail::managers;

namespace {
Address fresh_unix_address() {
    static std::atomic<int> counter{0};
    return Address::abstract("mp-manager-" + std::to_string(::getpid()) + "-" +
                             std::to_string(++counter) + "-" +
                             std::to_string(std::chrono::steady_clock::now().time_since_epoch().count()));
}

std::string random_key() { return sys::crypto::random_string(32); }
}  // namespace

BaseManager::BaseManager() : address_(fresh_unix_address()), authkey_(random_key()) {}

BaseManager::BaseManager(Address address, std::string authkey)
    : address_(std::move(address)), authkey_(std::move(authkey)) {
    if (address_.is_tcp() && authkey_.empty())
        throw std::invalid_argument("mp::BaseManager: a TCP address needs an authkey");
}

BaseManager::~BaseManager() {
    if (server_) {
        try {
            shutdown();
        } catch (...) {
        }
    }
}

pid_t BaseManager::server_pid() const noexcept { return server_ ? server_->process->pid() : 0; }

void BaseManager::connect() {
    dm::request(address_, authkey_, dm::Op::ping, 0, {}, {});
    connected_ = true;
}

void BaseManager::shutdown() {
    if (!server_) {
        if (connected_) {
            connected_ = false;
            get_logger().info("sending shutdown message to manager");
            dm::request(address_, authkey_, dm::Op::shutdown, 0, {}, {});
            dm::drop_connection(address_, authkey_);
        }
        return;
    }
    auto handle = std::move(server_);
    if (handle->process->is_alive()) {
        // One bound for the request and the exit: a server that does not answer (stopped, say)
        // holds the caller up no longer than one that answers and then does not exit.
        const auto give_up = std::chrono::steady_clock::now() + std::chrono::seconds(5);
        try {
            get_logger().info("sending shutdown message to manager");
            dm::request_until(address_, authkey_, dm::Op::shutdown, give_up);
        } catch (...) {
            // Not answering: it is killed below.
        }
        if (!handle->process->join(std::max(give_up - std::chrono::steady_clock::now(),
                                            std::chrono::steady_clock::duration::zero()))) {
            handle->process->kill();
            handle->process->join();
        }
    } else {
        handle->process->join();
    }
    dm::drop_connection(address_, authkey_);
}

std::shared_ptr<dm::ProxyState> BaseManager::create_state(const std::string& type_id,
                                                          std::string args) {
    if (Logger& log = get_logger(); log.enabled_for(LogLevel::debug))
        log.debug("requesting creation of a shared '" + type_id + "' object");
    std::string reply = dm::request(address_, authkey_, dm::Op::create, 0, type_id, args);
    Decoder d(reply);
    auto id = d.get<std::uint64_t>();
    d.finish();
    return dm::adopt(address_, authkey_, type_id, id, false);
}

// ---- SyncManager -------------------------------------------------------------------------------

SyncManager::SyncManager() : BaseManager() { start(); }

NamespaceProxy SyncManager::Namespace() { return NamespaceProxy(create_state("Namespace", {})); }
LockProxy SyncManager::Lock() { return LockProxy(create_state("Lock", {})); }
RLockProxy SyncManager::RLock() { return RLockProxy(create_state("RLock", {})); }
SemaphoreProxy SyncManager::Semaphore(int value) {
    return SemaphoreProxy(create_state("Semaphore", encode_args(value)));
}
SemaphoreProxy SyncManager::BoundedSemaphore(int value) {
    return SemaphoreProxy(create_state("BoundedSemaphore", encode_args(value)));
}
EventProxy SyncManager::Event() { return EventProxy(create_state("Event", {})); }
ConditionProxy SyncManager::Condition() { return ConditionProxy(create_state("Condition", {})); }
PoolProxy SyncManager::pool_with(const PoolOptions& o, std::optional<std::string> initializer) {
    return PoolProxy(create_state(
        "Pool", encode_args(o.processes, std::uint64_t{o.maxtasksperchild}, std::uint64_t{o.max_memory_per_child},
                            o.start_method, OptTimeout(o.task_timeout), initializer)));
}

dm::PoolTicket::PoolTicket(BaseProxy p, std::uint64_t i, std::vector<std::size_t> s)
    : pool(std::move(p)), id(i), sizes(std::move(s)), owner(::getpid()) {}

dm::PoolTicket::~PoolTicket() {
    // A fork child's copy is the parent's: only the process that made the call lets it go.
    if (owner != ::getpid()) return;
    try {
        pool.call("forget", id);
    } catch (...) {
        // The manager is gone: so are the results.
    }
}

BarrierProxy SyncManager::Barrier(int parties) {
    return BarrierProxy(create_state("Barrier", encode_args(parties)));
}

}  // namespace mp
