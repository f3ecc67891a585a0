// The out-of-line parts of the pools' public classes, ProcessPoolExecutor and Pool: the pool
// configuration built from their options, and Pool's lifetime.

#include <stdexcept>

#include "mp/futures.hpp"
#include "mp/pool.hpp"
#include "mp/util.hpp"

namespace mp {

namespace {
int worker_count(const std::optional<int>& n, const char* message) {
    if (!n) return cpu_count();
    if (*n < 1) throw std::invalid_argument(message);
    return *n;
}


// The options ProcessPoolExecutor and Pool share (under the same names), for either.
template <class Options>
detail::PoolConfig shared_config(const Options& o, int workers, std::size_t max_tasks,
                                 std::optional<detail::Task> init) {
    detail::PoolConfig c;
    c.workers = workers;
    c.method = o.start_method.value_or(StartMethod::forkserver);
    c.max_tasks_per_child = max_tasks;
    c.max_memory_per_child = o.max_memory_per_child;
    c.task_timeout = o.task_timeout;
    c.initializer = std::move(init);
    return c;
}
}  // namespace

detail::PoolConfig ProcessPoolExecutor::make_config(const ExecutorOptions& o, std::optional<detail::Task> init) {
    detail::PoolConfig c = shared_config(o, worker_count(o.max_workers, "max_workers must be greater than 0"),
                                         o.max_tasks_per_child, std::move(init));
    c.break_on_worker_death = o.break_on_worker_death;
    c.daemon_workers = false;  // a task may start processes, as in Python 3.9+
    return c;
}

detail::PoolConfig Pool::make_config(const PoolOptions& o, std::optional<detail::Task> init) {
    return shared_config(o, worker_count(o.processes, "Number of processes must be at least 1"), o.maxtasksperchild,
                         std::move(init));
}

Pool::~Pool() {
    if (engine_.inherited()) return;  // a fork() child's copy: the parent's pool, left alone
    {
        // An imap that outlives the pool reads no more input.
        std::lock_guard lk(imaps_->mu);
        imaps_->engine = nullptr;
    }
    try {
        if (stage_ == Stage::running || !engine_.shut_down()) terminate();
        engine_.join();
    } catch (...) {
    }
}

void Pool::check_running() const {
    if (stage_ != Stage::running) throw Error("Pool not running");
}

void Pool::close() {
    get_logger().debug("closing pool");
    // The unread input of a live imap is work already asked for: submit it before closing.
    if (stage_ == Stage::running) detail::drain_imaps(*imaps_);
    Stage running = Stage::running;
    stage_.compare_exchange_strong(running, Stage::closed);
    engine_.shutdown(false, false);
}

void Pool::terminate() {
    get_logger().debug("terminating pool");
    stage_ = Stage::terminated;
    engine_.terminate();
}

void Pool::join() {
    if (stage_ == Stage::running) throw Error("Pool is still running");
    get_logger().debug("joining pool");
    engine_.join();
}

}  // namespace mp
