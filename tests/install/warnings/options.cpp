// Every options struct a user fills with designated initializers, once naming only its first
// member and once only its last: -Wmissing-field-initializers (in -Wextra) then fires for any
// member without a default member initializer. A new options struct, or a new first or last
// member, belongs here.
#include <mp/mp.hpp>

#include <chrono>

using namespace std::chrono_literals;

int main() {
    [[maybe_unused]] mp::ProcessOptions process_first{.name = "x"};
    [[maybe_unused]] mp::ProcessOptions process_last{.start_method = mp::StartMethod::fork};

    [[maybe_unused]] mp::ExecutorOptions executor_first{.max_workers = 2};
    [[maybe_unused]] mp::ExecutorOptions executor_last{.break_on_worker_death = true};
    [[maybe_unused]] mp::TaskOptions task_first_and_last{.timeout = 1s};
    [[maybe_unused]] mp::MapOptions map_first{.chunksize = 10};
    [[maybe_unused]] mp::MapOptions map_last{.progress = true};
    [[maybe_unused]] mp::AsCompletedOptions as_completed_first{.timeout = 1s};
    [[maybe_unused]] mp::AsCompletedOptions as_completed_last{.progress = true};

    [[maybe_unused]] mp::PoolOptions pool_first{.processes = 2};
    [[maybe_unused]] mp::PoolOptions pool_last{.task_timeout = 1s};

    [[maybe_unused]] mp::ListenerOptions listener_first{.authkey = "k"};
    [[maybe_unused]] mp::ListenerOptions listener_last{.max_pending_handshakes = 4};
    [[maybe_unused]] mp::ClientOptions client_first{.authkey = "k"};
    [[maybe_unused]] mp::ClientOptions client_last{.handshake_timeout = 1s};

    [[maybe_unused]] mp::ServerOptions server_first{.bind_and_activate = false};
    [[maybe_unused]] mp::ServerOptions server_last{.shutdown_timeout = 1s};
}
