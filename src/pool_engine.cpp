// The pool's thread: starts workers, feeds them tasks, collects results, and deals with workers
// that die, overrun or retire.
//
// One thread per pool owns every worker and runs one poll() loop over
//   - an eventfd that submit(), shutdown() and terminate() ring (only when the loop sleeps),
//   - each worker's socket (results in, tasks out when a write was short),
//   - each worker's pidfd: readable once the worker has really ended (under forkserver too: a
//     helper's socket closing says nothing about the worker, which may still be writing to its
//     slot, so its slot is reused only after its pidfd says so),
// with a timeout at the nearest task deadline. Nothing but this thread touches a worker.
//
// Which task did a dead worker run? Each worker has a slot in a shared page where it stores the
// ordinal (its own count, 1, 2, ...) of the task it finishes, and a ticket per task it holds
// that says whether it started it (see WorkerSlot). Tasks are handed to a worker in order and
// run in order, so after its death, with its socket drained:
//   ordinal <= finished             ran to the end, but the answer was lost with the worker;
//   ticket started, > finished      was running: it fails (WorkerDied, or TimeoutError if the
//                                   pool killed it for overrunning);
//   ticket queued                   never started: handed to another worker.
// A task is running (Future::running) only once its ticket says started; until then cancel()
// withdraws it, from the pool's queue or from the worker that holds it.
// A worker's answers wait in a stage in the same shared page until sent (when it runs out of
// work, or, by a second thread of the worker, once one has waited a millisecond): the pool reads
// what a dead worker had not sent, so the first case loses nothing.
//
// How many tasks a worker holds: enough to cover about a millisecond of its measured task time
// (at least 2, at most 1024), so tiny tasks travel in batches and long ones are not stuck
// behind each other in one worker while another idles. A worker that does not start the task
// at the head of its queue (stopped, starved of CPU) within kStallLimit of it being due and of
// the last bytes sent to it gives its queued tasks back, and gets no more until it shows a sign
// of life.
//
// A task's time limit counts from when it is the next for a worker, so it bounds the time to its
// result even when the worker never starts it: a ready worker is then killed, and a task that had
// not started goes to another worker; a worker still in the pool's initializer is left to finish
// it, the task fails (pool_schedule.cpp, fail_overdue_in_initializer), and shutdown does not
// wait for that initializer.
//
// Starting a worker can fail for a while (out of descriptors, processes or memory; a forkserver
// that was killed and must be restarted): the pool retries with back-off, and breaks only when it
// has no live worker and the failures go on for kStartGrace.

#include <poll.h>
#include <sys/resource.h>
#include <fcntl.h>
#include <unistd.h>

#include <cerrno>
#include <climits>
#include <cstdio>
#include <cstdlib>
#include <mutex>
#include <system_error>

#include "mp/futures.hpp"
#include "mp/util.hpp"
#include "pool_engine_impl.hpp"
#include "process_impl.hpp"
#include "sys/error.hpp"
#include "sys/fd.hpp"
#include "sys/pidfd.hpp"

namespace mp::detail {

namespace {

// post()'s functions report their own errors (after_callback logs what a callback throws).
void run_dropping_errors(const std::function<void()>& fn) noexcept {
    try {
        fn();
    } catch (...) {
    }
}

// The threads of pools left to finish on their own (destroyed on that thread, in a done
// callback). The program's exit joins them, as Python's joins its executors' threads: their
// workers are stopped and reaped, and no thread runs pool code, or is still exiting, while the
// program's statics are destroyed. Never destroyed (used at exit); a fork child inherits the
// list but not the threads, and leaves it alone.
struct OrphanedPools {
    std::mutex mu;
    std::vector<std::thread>* threads = nullptr;
    pid_t owner = 0;
};

OrphanedPools& orphaned_pools() {
    static auto* d = new OrphanedPools;
    return *d;
}

}  // namespace

void join_detached_pools() {
    OrphanedPools& d = orphaned_pools();
    for (;;) {
        std::vector<std::thread> now;
        {
            std::lock_guard lock(d.mu);
            if (d.owner != sys::self_pid() || d.threads == nullptr || d.threads->empty()) return;
            now.swap(*d.threads);
        }
        for (auto& t : now) t.join();
    }
}

void PoolEngine::Impl::run() noexcept {
    try {
        loop();
    } catch (const std::exception& e) {
        try {
            get_logger().error(std::string("mp pool: internal error, the pool is broken: ") +
                               e.what());
        } catch (...) {
        }
        try {
            break_pool(std::string("internal error: ") + e.what());
            kill_and_reap_all();
        } catch (...) {
        }
    }
    // What was posted runs before the thread is known to be gone; after, post() runs it itself.
    while (true) {
        if (run_posted()) continue;
        std::lock_guard lock(mu);
        if (!posted.empty()) continue;
        finished = true;
        cancel_cv.notify_all();
        return;
    }
}

bool PoolEngine::Impl::run_posted() {
    std::vector<std::function<void()>> now;
    {
        std::lock_guard lock(mu);
        now.swap(posted);
    }
    for (auto& fn : now) run_dropping_errors(fn);
    return !now.empty();
}

void PoolEngine::Impl::loop() {
    std::vector<pollfd> fds;
    while (true) {
        bool terminate = false, cancel = false;
        int stop = 0;
        {
            std::lock_guard lock(mu);
            if (pending.empty()) {
                pending.swap(incoming);
            } else {
                while (!incoming.empty()) {
                    pending.push_back(std::move(incoming.front()));
                    incoming.pop_front();
                }
            }
            terminate = terminate_requested;
            cancel = std::exchange(cancel_requested, false);
            stop = std::exchange(stop_signal, 0);
        }
        run_posted();
        if (terminate) {
            fail_all(std::make_exception_ptr(BrokenProcessPool("the pool was terminated")));
            kill_and_reap_all();
            return;
        }
        if (cancel) {
            cancel_pending();
            if (stop != 0) force_stop(stop);  // before stop_workers() returns, as the cancel
            std::lock_guard lock(mu);
            ++cancels_done;
            cancel_cv.notify_all();
        }
        if (is_broken()) fail_pending();

        const bool draining = shutting_down_now();
        if (!is_broken()) {
            // The first workers start even when the pool is shut down at once: as Python's
            // Pool, each runs its initializer.
            const std::size_t busy = in_flight();
            if (!draining || !pending.empty() || busy != 0 || !first_start_done) start_workers();
        }
        if (first_start_done && !first_workers_told) {
            first_workers_told = true;
            std::lock_guard lock(mu);
            first_workers_forked = true;
            cancel_cv.notify_all();
        }
        dispatch();
        for (auto& w : workers) send(*w);
        const bool drained = draining && pending.empty() && in_flight() == 0 && (first_start_done || is_broken());
        if (drained) {
            for (auto& w : workers) close_input(*w);
            stop_stuck_initializers(Clock::now());
            if (workers.empty()) return;
        }

        // Sleep until something happens.
        fds.clear();
        fds.push_back({wake.get(), POLLIN, 0});
        for (auto& w : workers) {
            short ev = w->sock ? POLLIN : 0;
            if (w->sock && !w->out.empty()) ev |= POLLOUT;
            fds.push_back({w->sock ? w->sock.get() : -1, ev, 0});
            fds.push_back({w->pidfd.get(), POLLIN, 0});
        }
        int timeout_ms = -1;
        const auto now = Clock::now();
        auto wake_at = [&](Clock::time_point t) {
            auto left = std::chrono::ceil<std::chrono::milliseconds>(t - now).count();
            // Capped so a deadline weeks away does not wrap int: poll just wakes early.
            left = std::clamp<decltype(left)>(left, 0, INT_MAX);
            if (timeout_ms < 0 || left < timeout_ms) timeout_ms = static_cast<int>(left);
        };
        for (auto& w : workers) {
            if (w->deadline) wake_at(*w->deadline);
            // Look again when the head of its queue would count as not started in time.
            if (w->head_since && !w->stalled && !w->inflight.front()->started_in_worker())
                wake_at(stall_due(*w));
        }
        if (retry_at && !is_broken()) wake_at(*retry_at);
        if (drained)
            for (auto& w : workers)
                if (const auto limit = initializer_limit(*w); limit && !w->stopped_in_initializer) wake_at(*limit);
        // Wake when a worker with tasks queued behind its current one has been in it for
        // a millisecond while another idles: take_back may then move them.
        if (has_idle_worker())
            for (auto& w : workers) {
                if (w->inflight.size() < 2) continue;
                // Between tasks (or not yet in the first): look again in a millisecond.
                const auto busy = busy_for(*w, now);
                auto left = std::chrono::ceil<std::chrono::milliseconds>(std::chrono::milliseconds(1) - busy).count();
                left = std::max<decltype(left)>(left, 1);
                if (timeout_ms < 0 || left < timeout_ms) timeout_ms = static_cast<int>(left);
            }
        {
            std::lock_guard lock(mu);
            if (!incoming.empty() || !posted.empty() || terminate_requested || cancel_requested)
                continue;
            loop_sleeping = true;
        }
        int n = ::poll(fds.data(), fds.size(), timeout_ms);
        if (n < 0 && errno == EINVAL) n = poll_in_slices(fds, timeout_ms);
        {
            std::lock_guard lock(mu);
            loop_sleeping = false;
        }
        if (n < 0) {
            if (errno == EINTR) continue;
            sys::throw_system_error(errno, "poll (pool)");
        }
        if (fds[0].revents != 0) {
            std::uint64_t v;
            ssize_t r = ::read(wake.get(), &v, sizeof v);
            (void)r;
        }
        // Index by position: a worker may go while we look at the others.
        std::vector<pool::Worker*> dead;
        for (std::size_t i = 0; i < workers.size(); ++i) {
            auto& w = *workers[i];
            const short sock_ev = fds[1 + 2 * i].revents;
            const short exit_ev = fds[2 + 2 * i].revents;
            if (sock_ev & (POLLIN | POLLHUP | POLLERR)) receive(w);
            if (sock_ev & POLLOUT) send(w);
            if (exit_ev != 0) dead.push_back(&w);
        }
        for (pool::Worker* w : dead) wait_exit(*w, false);
        check_deadlines();
        take_back_stalled(Clock::now());
    }
}

// poll() refuses more descriptors than RLIMIT_NOFILE allows open (EINVAL), as when the limit
// was lowered below what the process holds: look at them a slice at a time, every few
// milliseconds, rather than fail.
int PoolEngine::Impl::poll_in_slices(std::vector<pollfd>& fds, int timeout_ms) {
    rlimit lim{};
    std::size_t slice = 1;
    if (::getrlimit(RLIMIT_NOFILE, &lim) == 0 && lim.rlim_cur > 1 && lim.rlim_cur != RLIM_INFINITY)
        slice = static_cast<std::size_t>(lim.rlim_cur);
    const auto deadline = Clock::now() + std::chrono::milliseconds(timeout_ms < 0 ? 3'600'000 : timeout_ms);
    while (true) {
        int ready = 0;
        for (std::size_t at = 0; at < fds.size(); at += slice) {
            const std::size_t k = std::min(slice, fds.size() - at);
            const int r = ::poll(fds.data() + at, k, 0);
            if (r < 0 && errno != EINTR) sys::throw_system_error(errno, "poll (pool)");
            if (r > 0) ready += r;
        }
        if (ready > 0) return ready;
        const auto now = Clock::now();
        if (now >= deadline) return 0;
        std::this_thread::sleep_for(std::min<Clock::duration>(deadline - now, std::chrono::milliseconds(5)));
    }
}

void PoolEngine::Impl::break_pool(const std::string& reason) {
    {
        std::lock_guard lock(mu);
        if (broken) return;
        broken = true;
        broken_reason = "mp pool is broken: " + reason;
    }
    auto e = std::make_exception_ptr(BrokenProcessPool(broken_reason_copy()));
    fail_all(e);
    kill_all();
}

void PoolEngine::Impl::fail_pending() {
    if (!pending.empty()) fail_pending(std::make_exception_ptr(BrokenProcessPool(broken_reason_copy())));
}

void PoolEngine::Impl::fail_pending(const std::exception_ptr& e) {
    while (!pending.empty()) {
        pending_count.fetch_sub(1, std::memory_order_relaxed);
        failed_count.fetch_add(1, std::memory_order_relaxed);
        pending.front()->release_descriptors();
        pending.front()->set_exception(e);
        pending.pop_front();
    }
}

void PoolEngine::Impl::fail_all(const std::exception_ptr& e) {
    {
        std::lock_guard lock(mu);
        while (!incoming.empty()) {
            pending.push_back(std::move(incoming.front()));
            incoming.pop_front();
        }
    }
    fail_pending(e);
    for (auto& w : workers) {
        for (auto& job : w->inflight) {
            running_count.fetch_sub(1, std::memory_order_relaxed);
            // One that cancel_pending() just cancelled in its worker stays cancelled.
            if (job->set_exception(e))
                failed_count.fetch_add(1, std::memory_order_relaxed);
            else if (job->cancelled())
                cancelled_count.fetch_add(1, std::memory_order_relaxed);
        }
        w->inflight.clear();
        // Every task it was given is settled now: an answer still on its way (a worker that
        // outlives SIGTERM, or one that finished as the pool broke) reads as one seen already,
        // not as an answer to a task it was never given.
        w->answered = w->next_ordinal - 1;
        w->head_since.reset();
        w->deadline.reset();
    }
}

// ---- PoolEngine ---------------------------------------------------------------------------------

PoolEngine::PoolEngine(PoolConfig config) : config_workers_(config.workers) {
    if (config.workers < 1) throw std::invalid_argument("mp pool: the number of workers must be at least 1");
    if (config.worker_name.empty())
        config.worker_name = config.method == StartMethod::forkserver ? "ForkServerPoolWorker"
                             : config.method == StartMethod::spawn    ? "SpawnPoolWorker"
                                                                      : "ForkPoolWorker";
    if (config.method == StartMethod::forkserver) forkserver::ensure_running();
    // The initializer's descriptors are borrowed from its arguments, which are gone when the
    // constructor returns; every worker, replacements too, needs them: keep copies.
    std::vector<sys::Fd> init_fds;
    if (config.initializer)
        for (int& fd : config.initializer->fds) {
            int d = ::fcntl(fd, F_DUPFD_CLOEXEC, 3);
            if (d < 0) sys::throw_system_error(errno, "fcntl(F_DUPFD_CLOEXEC)");
            init_fds.emplace_back(d);
            fd = d;
        }
    impl_ = std::make_shared<Impl>(std::move(config));
    impl_->init_fds = std::move(init_fds);
    // Under fork the first workers are copies of the program as the caller left it (as Python's
    // Pool, whose caller forks them), and no thread of the caller's runs beside the fork: forked
    // while the caller went on, a worker could inherit a lock the caller held at that instant in
    // an allocator that is not fork-safe (ASan's is not; glibc's is), and wait on it for ever.
    // PR_SET_PDEATHSIG fires when the thread that forked a child ends, not the process, so the
    // main thread forks them itself (it lasts as long as the process, and the fork is then of a
    // process the pool adds no thread to), and any other caller waits while the pool's thread,
    // which outlives every worker, forks them: a pool made in a short-lived thread keeps them.
    // Replacements are forked by the pool's thread.
    const bool fork = impl_->cfg.method == StartMethod::fork;
    const bool caller_forks = fork && sys::on_main_thread();
    if (caller_forks) impl_->start_workers();
    Impl* impl = impl_.get();
    try {
        impl_->thread = sys::start_thread("mp: the pool could not start its thread", [impl] {
            impl->run();
            // Destroyed on this thread, the engine left the state to it: freed here, last.
            const std::shared_ptr<Impl> owned = std::move(impl->keep_alive);
        });
    } catch (...) {
        impl->kill_and_reap_all();
        throw;
    }
    if (fork && !caller_forks) {
        std::unique_lock lock(impl_->mu);
        impl_->cancel_cv.wait(lock, [impl] { return impl->first_workers_forked || impl->finished; });
    }
}

// Pools copied into a child of a fork() that is not mp's (the program's own, a daemonizing double
// fork): their thread and workers are the parent's. Kept, never destroyed: destroying the state
// would join a thread handle that means nothing here (std::terminate, or a wait for ever on
// whichever thread of the child reuses its address), and its lock may have been held at the fork.
// Reachable from here, so LeakSanitizer does not report them.
std::vector<std::shared_ptr<PoolEngine::Impl>>* g_inherited_pools = nullptr;

PoolEngine::~PoolEngine() {
    if (inherited()) {
        if (g_inherited_pools == nullptr) g_inherited_pools = new std::vector<std::shared_ptr<Impl>>;
        g_inherited_pools->push_back(std::move(impl_));
        return;
    }
    if (impl_->thread.get_id() == std::this_thread::get_id()) {
        // The last handle went in a done callback, on the pool's own thread, which cannot wait
        // for itself: as shutdown(wait=false), the thread finishes the work, stops the workers
        // and ends, holding the state until then.
        {
            std::lock_guard lock(impl_->mu);
            impl_->shutting_down = true;
            impl_->ring();
        }
        impl_->keep_alive = impl_;
        OrphanedPools& d = orphaned_pools();
        std::lock_guard lock(d.mu);
        if (d.owner != sys::self_pid()) {
            d.owner = sys::self_pid();
            d.threads = new std::vector<std::thread>;  // a parent's list (of its threads) is left
            static const bool registered = std::atexit(join_detached_pools) == 0;
            (void)registered;
        }
        d.threads->push_back(std::move(impl_->thread));  // joined by join_detached_pools
        return;
    }
    try {
        shutdown(true, false);
    } catch (...) {
    }
    if (impl_->thread.joinable()) impl_->thread.join();
}

static_assert(kMaxTaskFds == sys::kMaxFds);

bool PoolEngine::inherited() const noexcept { return impl_->owner != sys::self_pid(); }

void PoolEngine::check_owner() const {
    if (inherited())
        throw Error("mp pool: this pool belongs to process " + std::to_string(impl_->owner) +
                    " and was copied into this one by fork(): it cannot be used here (make a new one)");
}

std::shared_ptr<FutureCore> PoolEngine::submit(Task task, JobOptions options) {
    check_owner();
    // One frame's descriptors go in one message: refused here, this submit fails alone. (Found
    // later, as the pool's thread sends the task, it would break the pool, and the task, by then
    // in no queue, would never finish.)
    if (task.fds.size() > sys::kMaxFds)
        throw Error("mp pool: a task may carry at most " + std::to_string(sys::kMaxFds) +
                    " descriptors (its arguments hold " + std::to_string(task.fds.size()) +
                    " handles' descriptors: queues, locks, values, connections ...)");
    auto job = std::allocate_shared<pool::Job>(sys::ArenaAllocator<pool::Job>(impl_->job_arena));
    job->bytes.assign(std::move(task.bytes));
    for (int fd : task.fds) {
        int d = ::fcntl(fd, F_DUPFD_CLOEXEC, 3);
        if (d < 0 && (errno == EMFILE || errno == ENFILE)) {
            // Only this submit fails: the duplicates taken so far close with `job`.
            throw std::system_error(errno, std::system_category(),
                                    "fcntl(F_DUPFD_CLOEXEC): out of file descriptors for a task's "
                                    "handle (each pending task holds a duplicate of every descriptor "
                                    "it passes; wait for submitted work or raise RLIMIT_NOFILE)");
        }
        if (d < 0) sys::throw_system_error(errno, "fcntl(F_DUPFD_CLOEXEC)");
        sys::Fd owned(d);
        job->extra().fds.push_back(std::move(owned));
    }
    job->items = static_cast<std::uint32_t>(std::min<std::size_t>(options.items, UINT32_MAX));
    if (options.timeout) job->extra().timeout = options.timeout;
    std::shared_ptr<FutureCore> core = job;
    std::lock_guard lock(impl_->mu);
    if (impl_->broken) throw BrokenProcessPool(impl_->broken_reason);
    if (impl_->shutting_down || impl_->terminate_requested)
        throw Error("cannot schedule new futures after shutdown");
    impl_->submitted.fetch_add(1, std::memory_order_relaxed);
    if (const auto limit = job->timeout(impl_->cfg); limit && *limit <= std::chrono::nanoseconds::zero()) {
        // Its time limit has passed before any worker could start it: it fails now. Sent, it
        // would cost a worker killed before starting it, then the next, and so on.
        job->release_descriptors();
        impl_->failed_count.fetch_add(1, std::memory_order_relaxed);
        job->set_exception(std::make_exception_ptr(
            TimeoutError("the task's time limit (" + std::to_string(limit->count()) +
                         " ns) had passed before it could start; no worker ran it")));
        return core;
    }
    impl_->incoming.push_back(std::move(job));
    impl_->pending_count.fetch_add(1, std::memory_order_relaxed);
    impl_->ring_if_sleeping();
    return core;
}

void PoolEngine::post(std::function<void()> fn) {
    {
        std::lock_guard lock(impl_->mu);
        if (!impl_->finished) {
            impl_->posted.push_back(std::move(fn));
            impl_->ring_if_sleeping();
            return;
        }
    }
    run_dropping_errors(fn);
}

void PoolEngine::shutdown(bool wait, bool cancel_pending) {
    check_owner();
    {
        std::unique_lock lock(impl_->mu);
        impl_->shutting_down = true;
        if (cancel_pending) impl_->cancel_requested = true;
        impl_->ring();
        // As Python's: the pending futures are cancelled by the time shutdown returns (unless
        // called from the pool's own thread, a done callback, which cannot wait for itself).
        if (cancel_pending && impl_->thread.get_id() != std::this_thread::get_id()) {
            const std::uint64_t before = impl_->cancels_done;
            impl_->cancel_cv.wait(lock, [&] { return impl_->cancels_done != before || impl_->finished; });
        }
    }
    if (wait) join();
}

void PoolEngine::stop_workers(int sig) {
    check_owner();
    std::unique_lock lock(impl_->mu);
    impl_->shutting_down = true;
    impl_->cancel_requested = true;
    impl_->stop_signal = sig;
    impl_->ring();
    // As shutdown(cancel_futures): the loop has sent the signals by the time this returns
    // (unless called from a done callback, on the loop's own thread).
    if (impl_->thread.get_id() != std::this_thread::get_id()) {
        const std::uint64_t before = impl_->cancels_done;
        impl_->cancel_cv.wait(lock, [&] { return impl_->cancels_done != before || impl_->finished; });
    }
}

void PoolEngine::terminate() {
    check_owner();
    {
        std::lock_guard lock(impl_->mu);
        impl_->shutting_down = true;
        impl_->terminate_requested = true;
        impl_->ring();
    }
    // From a callback, on the pool's own thread: the loop kills the workers once the callback
    // returns (as Python's terminate() in a callback, which does not join its result thread).
    if (impl_->thread.get_id() == std::this_thread::get_id()) return;
    join();
}

void PoolEngine::join() {
    check_owner();
    if (impl_->thread.get_id() == std::this_thread::get_id())
        throw Error("mp pool: cannot join the pool from its own thread (a done callback)");
    std::lock_guard lock(impl_->join_mu);  // two threads may join one pool
    if (impl_->thread.joinable()) impl_->thread.join();
}

bool PoolEngine::shut_down() const {
    std::lock_guard lock(impl_->mu);
    return impl_->shutting_down;
}

bool PoolEngine::broken() const {
    std::lock_guard lock(impl_->mu);
    return impl_->broken;
}

PoolStats PoolEngine::stats() const {
    PoolStats s;
    auto& i = *impl_;
    s.submitted = i.submitted.load();
    s.pending = i.pending_count.load();
    s.running = i.running_count.load();
    s.done = i.done_count.load();
    s.failed = i.failed_count.load();
    s.cancelled = i.cancelled_count.load();
    s.workers_started = i.started_count.load();
    s.worker_deaths = i.death_count.load();
    std::lock_guard lock(i.mu);
    for (auto& w : i.workers) {
        // The worker's own slot says whether it is inside a task now.
        const auto& slot = i.slots[w->slot];
        const std::size_t running =
            slot.started.load(std::memory_order_acquire) > slot.finished.load(std::memory_order_acquire)
                ? 1
                : 0;
        s.workers.push_back({w->pid, w->name, w->assigned.load(), running, w->done.load(), w->failed.load()});
    }
    return s;
}

// ---- chunks ---------------------------------------------------------------------------------

std::vector<ChunkItem> split_chunk(const std::string& bytes, std::size_t expected) {
    std::vector<ChunkItem> items;
    items.reserve(expected);
    Decoder d(bytes);
    for (std::size_t i = 0; i < expected; ++i) {
        const bool ok = d.get<std::uint8_t>() != 0;
        const std::uint64_t n = d.read_size(1);
        items.push_back({ok, d.read_view(static_cast<std::size_t>(n))});
    }
    d.finish();
    return items;
}

void throw_item_error(const ChunkItem& item) {
    Decoder d(item.bytes);
    std::rethrow_exception(make_remote_exception(decode_error_info(d)));
}

std::size_t default_chunksize(std::size_t n, int workers) noexcept {
    const std::size_t div = 4 * static_cast<std::size_t>(std::max(workers, 1));
    std::size_t c = n / div;
    if (n % div != 0) ++c;
    return std::max<std::size_t>(c, 1);
}

}  // namespace mp::detail
