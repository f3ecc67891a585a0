#include "mp/util.hpp"

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <cstdlib>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <unistd.h>
#include <utility>
#include <vector>

#include "mp/process.hpp"
#include "process_impl.hpp"
#include "sys/atfork.hpp"
#include "sys/fd.hpp"
#include "sys/pidfd.hpp"
#include "util_internal.hpp"

namespace mp {

// ---------------------------------------------------------------- logging

namespace {

std::atomic<int> g_level{static_cast<int>(LogLevel::notset)};
// The sink in use; nullptr: the default. Never freed while the process runs: a thread may be
// inside it when another replaces it (the replaced ones are kept in g_retired, reachable, so
// leak checkers stay quiet).
std::atomic<const LogSink*> g_sink{nullptr};
// Whether g_sink is log_to_stderr's, which a forkserver or spawn child can make again.
std::atomic<bool> g_sink_is_stderr{false};

struct Retired {
    std::mutex mu;
    std::vector<std::unique_ptr<const LogSink>> sinks;
};
Retired& retired() {
    static Retired* r = new Retired;  // never destroyed: a sink may be called during exit
    return *r;
}

void on_fork_child_logging() noexcept {
    // Another thread of the parent may have been in set_sink at the moment of fork.
    new (&retired().mu) std::mutex;
}

// Made here, with the handler, so that a fork child never allocates it.
[[gnu::init_priority(101)]] const sys::ChildAtFork logging_atfork{((void)retired(), &on_fork_child_logging)};

using sys::write_stderr;

// Python's effective level of a NOTSET multiprocessing logger: the root's WARNING.
int threshold() noexcept {
    const int l = g_level.load(std::memory_order_relaxed);
    return l == static_cast<int>(LogLevel::notset) ? static_cast<int>(LogLevel::warning) : l;
}

}  // namespace

std::string_view level_name(LogLevel level) noexcept {
    switch (level) {
        case LogLevel::notset: return "NOTSET";
        case LogLevel::subdebug: return "SUBDEBUG";
        case LogLevel::debug: return "DEBUG";
        case LogLevel::info: return "INFO";
        case LogLevel::subwarning: return "SUBWARNING";
        case LogLevel::warning: return "WARNING";
        case LogLevel::error: return "ERROR";
        case LogLevel::critical: return "CRITICAL";
    }
    return "LEVEL";
}

void Logger::set_level(LogLevel level) noexcept {
    g_level.store(static_cast<int>(level), std::memory_order_relaxed);
}

LogLevel Logger::level() const noexcept {
    return static_cast<LogLevel>(g_level.load(std::memory_order_relaxed));
}

bool Logger::enabled_for(LogLevel level) const noexcept {
    const int l = static_cast<int>(level);
    if (l < threshold()) return false;
    // No sink: Python's "last resort" handler, which shows warnings and above only.
    return g_sink.load(std::memory_order_acquire) != nullptr ||
           l >= static_cast<int>(LogLevel::warning);
}

void Logger::set_sink(LogSink sink) {
    g_sink_is_stderr.store(false, std::memory_order_relaxed);
    std::unique_ptr<const LogSink> fresh;
    if (sink) fresh = std::make_unique<const LogSink>(std::move(sink));
    Retired& r = retired();
    std::lock_guard lk(r.mu);
    // So that the push below cannot fail after the swap; grown by doubling, as push_back would
    // (one more each time made n calls cost n^2 moves under the lock).
    if (r.sinks.size() == r.sinks.capacity()) r.sinks.reserve(std::max<std::size_t>(8, 2 * r.sinks.capacity()));
    const LogSink* old = g_sink.exchange(fresh.release(), std::memory_order_acq_rel);
    if (old != nullptr) r.sinks.emplace_back(old);
}

void Logger::log(LogLevel level, std::string_view message) noexcept {
    if (!enabled_for(level)) return;
    const LogSink* sink = g_sink.load(std::memory_order_acquire);
    try {
        if (sink == nullptr) {
            std::string line(message);
            line += '\n';
            write_stderr(line);
            return;
        }
        const ProcessIdentity& me = current_process();
        (*sink)(LogRecord{level, message, me.name, ::getpid()});
    } catch (...) {
        // A logger that throws would turn a diagnostic into a failure of its own.
    }
}

Logger& get_logger() noexcept {
    // An empty class (its state is the globals above): constant-initialized and trivially
    // destroyed, so static destructors and exit handlers may still log, and a fork child's
    // first use (log_child_start) allocates nothing. Allocated on first use, as it was, every
    // fork child paid ~5 page faults for it (malloc's code and arena, the guard), ~10 us each
    // on a VM that shadows page tables.
    static constinit Logger logger;
    return logger;
}

Logger& log_to_stderr(std::optional<LogLevel> level) {
    Logger& l = get_logger();
    l.set_sink([](const LogRecord& r) {
        // Python's DEFAULT_LOGGING_FORMAT: '[%(levelname)s/%(processName)s] %(message)s'.
        std::string line = "[";
        line += level_name(r.level);
        line += '/';
        line += r.process_name;
        line += "] ";
        line += r.message;
        line += '\n';
        write_stderr(line);
    });
    g_sink_is_stderr.store(true, std::memory_order_relaxed);
    if (level) l.set_level(*level);
    return l;
}

namespace detail {

LogSettings log_settings() noexcept {
    return LogSettings{g_level.load(std::memory_order_relaxed),
                       g_sink_is_stderr.load(std::memory_order_relaxed)};
}

void apply_log_settings(const LogSettings& s) {
    // A forkserver child starts with the server's logger, made for an earlier request: the
    // sink is set either way.
    if (s.to_stderr)
        log_to_stderr();
    else
        get_logger().set_sink({});
    get_logger().set_level(static_cast<LogLevel>(s.level));
}

}  // namespace detail

// ---------------------------------------------------------------- Finalize

namespace util {

struct Finalize::State {
    std::function<void()> callback;
    std::optional<int> exit_priority;
    pid_t pid = 0;
    std::uint64_t seq = 0;
    std::atomic<bool> active{true};
};

namespace {

// Finalizers with an exit priority, by (priority, creation order): run from the back.
struct Registry {
    std::mutex mu;
    std::map<std::pair<int, std::uint64_t>, std::shared_ptr<Finalize::State>> entries;
    std::uint64_t next_seq = 0;
    pid_t pid = 0;  // the process whose finalizers these are
};

Registry& registry() {
    static Registry* r = new Registry;  // never destroyed: read by the exit handler
    return *r;
}

void on_fork_child_finalizers() noexcept {
    // Another thread of the parent may have held the lock at the moment of fork (making or
    // ending a finalizer); the child's first Finalize with an exit priority takes it.
    new (&registry().mu) std::mutex;
}

[[gnu::init_priority(101)]] const sys::ChildAtFork finalizers_atfork{((void)registry(), &on_fork_child_finalizers)};

std::atomic<pid_t> g_registry_pid{0};

void run_state(Finalize::State& s) noexcept {
    // A forked child holds copies of its parent's finalizers: they are not its own. Checked
    // before any lock, which a thread of the parent may have held at fork.
    if (s.pid != ::getpid()) return;
    if (!s.active.exchange(false, std::memory_order_acq_rel)) return;
    if (s.exit_priority) {
        Registry& r = registry();
        std::lock_guard lk(r.mu);
        r.entries.erase({*s.exit_priority, s.seq});
    }
    get_logger().subdebug("finalizer calling its callback");
    try {
        s.callback();
    } catch (const std::exception& e) {
        try {
            get_logger().error(std::string("mp::util::Finalize: the callback threw: ") + e.what());
        } catch (...) {
        }
    } catch (...) {
        get_logger().error("mp::util::Finalize: the callback threw an unknown exception");
    }
    s.callback = nullptr;  // what it captured goes now, as Python drops its references
}

}  // namespace

Finalize::Finalize(std::function<void()> callback, std::optional<int> exit_priority)
    : state_(std::make_shared<State>()) {
    state_->callback = std::move(callback);
    state_->exit_priority = exit_priority;
    state_->pid = ::getpid();
    if (!exit_priority) return;
    Registry& r = registry();
    std::lock_guard lk(r.mu);
    if (r.pid != state_->pid) {
        // First in this process (a forked child starts afresh, as Python clears the registry).
        r.entries.clear();
        r.pid = state_->pid;
        g_registry_pid.store(r.pid, std::memory_order_release);
        detail::register_exit_function();  // runs the finalizers at exit, in Python's order
    }
    state_->seq = r.next_seq++;
    r.entries.emplace(std::pair(*exit_priority, state_->seq), state_);
}

Finalize::~Finalize() {
    if (state_) run_state(*state_);
}

Finalize::Finalize(Finalize&& other) noexcept : state_(std::move(other.state_)) {}

Finalize& Finalize::operator=(Finalize&& other) noexcept {
    if (this != &other) {
        if (state_) run_state(*state_);  // as if this one died
        state_ = std::move(other.state_);
    }
    return *this;
}

void Finalize::operator()() noexcept {
    if (state_) run_state(*state_);
}

void Finalize::cancel() noexcept {
    if (!state_ || state_->pid != ::getpid()) return;
    if (!state_->active.exchange(false, std::memory_order_acq_rel)) return;
    if (state_->exit_priority) {
        Registry& r = registry();
        std::lock_guard lk(r.mu);
        r.entries.erase({*state_->exit_priority, state_->seq});
    }
    state_->callback = nullptr;
}

bool Finalize::still_active() const noexcept {
    return state_ && state_->pid == ::getpid() && state_->active.load(std::memory_order_acquire);
}

void run_finalizers(std::optional<int> min_priority) noexcept {
    // Not this process's registry (a forked child that calls exit): nothing of it is ours, and
    // its lock may have been held by a thread of the parent at fork.
    // Every child's exit asks (finish_child, twice): a process tree that never made a finalizer
    // answers without a system call, and sys::self_pid() is cached.
    const pid_t owner = g_registry_pid.load(std::memory_order_acquire);
    if (owner == 0 || owner != sys::self_pid()) return;
    Registry& r = registry();
    // One at a time, from the top: a callback may create or finish other finalizers.
    for (;;) {
        std::shared_ptr<Finalize::State> next;
        {
            std::lock_guard lk(r.mu);
            if (r.entries.empty()) return;
            auto it = std::prev(r.entries.end());
            if (min_priority && it->first.first < *min_priority) return;
            next = it->second;
        }
        run_state(*next);
        // Normally run_state took it out; not when another thread was finishing it meanwhile.
        std::lock_guard lk(r.mu);
        r.entries.erase({*next->exit_priority, next->seq});
    }
}

}  // namespace util
}  // namespace mp
