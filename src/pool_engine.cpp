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
// A task's time limit counts from when it is the next for a ready worker, so it bounds the time
// to its result even when the worker never starts it: the worker is then killed, and a task that
// had not started goes to another worker.
//
// Starting a worker can fail for a while (out of descriptors, processes or memory; a forkserver
// that was killed and must be restarted): the pool retries with back-off, and breaks only when it
// has no live worker and the failures go on for kStartGrace.

#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <sys/eventfd.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <climits>
#include <cstdio>
#include <cstring>
#include <condition_variable>
#include <deque>
#include <iostream>
#include <mutex>
#include <thread>

#include "mp/detail/pool_engine.hpp"
#include "mp/futures.hpp"
#include "mp/pool.hpp"
#include "mp/util.hpp"
#include "launch.hpp"
#include "pool_frames.hpp"
#include "process_impl.hpp"
#include "sys/error.hpp"
#include "sys/pidfd.hpp"

namespace mp {
namespace detail::pool {
/// A descriptor handed to a forkserver worker as an argument of its entry function.
struct PassedFd {
    int fd = -1;
};
}  // namespace detail::pool

template <>
struct Codec<detail::pool::PassedFd> {
    static constexpr std::size_t min_encoded_size = 4;
    static void encode(Encoder& e, const detail::pool::PassedFd& p) { e.put(e.attach_fd(p.fd)); }
    static detail::pool::PassedFd decode(Decoder& d) { return {d.take_fd(d.get<std::uint32_t>())}; }
};

namespace detail {
namespace pool {

// Set in a fork-method worker: a child forked from the pool's thread of a threaded process,
// where LeakSanitizer cannot stop the world at exit and reports the parent's live objects.
volatile int g_forked_from_thread = 0;

namespace {

using Clock = std::chrono::steady_clock;
using std::chrono::nanoseconds;

// A forkserver worker's entry: map the status page, then serve.
void forkserver_worker(PassedFd sock, PassedFd page, std::uint64_t page_bytes) {
    void* p = ::mmap(nullptr, page_bytes, PROT_READ | PROT_WRITE, MAP_SHARED, page.fd, 0);
    ::close(page.fd);
    if (p == MAP_FAILED) sys::throw_system_error(errno, "mmap (pool worker)");
    int code = worker_loop(sock.fd, static_cast<WorkerSlot*>(p));
    finish_child(code);
}

constexpr auto kStallLimit = std::chrono::milliseconds(10);
constexpr auto kStartGrace = std::chrono::seconds(5);
constexpr auto kMaxBackoff = std::chrono::milliseconds(500);

// A task and its future in one allocation: the queues hold pointers, the user the future.
struct Job : FutureCore {
    std::uint64_t ordinal = 0;  // in its current worker
    std::string bytes;
    std::vector<sys::Fd> fds;
    std::size_t items = 0;
    std::optional<nanoseconds> timeout;

    // Where a worker holds it, for cancel() in any thread. The pool's thread changes `ticket`
    // under `where_mu` and never calls into the core while holding it.
    std::mutex where_mu;
    std::atomic<std::uint64_t>* ticket = nullptr;  // null: not in a worker
    bool withdrawn = false;                        // cancel() took it back: never to be sent

    // Takes the task back from its worker unless it has started there.
    bool withdraw() noexcept override {
        std::lock_guard lock(where_mu);
        if (ticket != nullptr) {
            std::uint64_t expected = pool::ticket(ordinal, pool::kQueued);
            if (!ticket->compare_exchange_strong(expected, pool::ticket(ordinal, pool::kWithdrawn),
                                                 std::memory_order_acq_rel))
                return false;
            ticket = nullptr;
        }
        withdrawn = true;
        return true;
    }
    // The pool's thread: puts it in worker slot `slot` as `ord`; false when cancelled first.
    bool place(pool::WorkerSlot& slot, std::uint64_t ord) {
        std::lock_guard lock(where_mu);
        if (withdrawn) return false;
        ordinal = ord;
        ticket = &slot.ticket_of(ord);
        ticket->store(pool::ticket(ord, pool::kQueued), std::memory_order_release);
        return true;
    }
    // The pool's thread: takes it back from its worker, unless it has started there or
    // cancel() has withdrawn it already.
    enum class Back { taken, started, cancelled };
    Back take_back() {
        std::lock_guard lock(where_mu);
        if (withdrawn) return Back::cancelled;
        if (ticket == nullptr) return Back::taken;  // not in a worker (cannot happen)
        std::uint64_t expected = pool::ticket(ordinal, pool::kQueued);
        if (!ticket->compare_exchange_strong(expected, pool::ticket(ordinal, pool::kWithdrawn),
                                             std::memory_order_acq_rel))
            return Back::started;
        ticket = nullptr;
        return Back::taken;
    }
    // The pool's thread: whether its worker has started it.
    bool started_in_worker() {
        std::lock_guard lock(where_mu);
        return ticket != nullptr &&
               ticket->load(std::memory_order_acquire) == pool::ticket(ordinal, pool::kStarted);
    }
    bool cancelled() const noexcept { return state() == State::cancelled; }
};
using JobPtr = std::shared_ptr<Job>;

struct Worker {
    std::size_t slot = 0;
    pid_t pid = 0;
    std::string name;
    sys::Fd sock;
    sys::Fd pidfd;
    sys::Fd status;  // forkserver: the exit status arrives here (kept open: closing it kills the worker)
    bool forked = false;
    std::deque<JobPtr> inflight;
    std::uint64_t next_ordinal = 1;
    std::uint64_t answered = 0;  // the last ordinal whose answer arrived
    std::uint64_t sent = 0;
    FrameReader in;
    FrameWriter out;
    bool ready = false;
    bool retiring = false;
    bool closing = false;  // socket shut for writing: the worker exits when idle
    std::uint64_t timed_out = 0;  // the ordinal the pool killed it for
    std::optional<Clock::time_point> deadline;
    std::uint64_t deadline_ordinal = 0;
    // Since when the task at the head of `inflight` has been the next for this (ready) worker.
    std::optional<Clock::time_point> head_since;
    std::uint64_t head_ordinal = 0;
    Clock::time_point last_sent{};  // when bytes last moved into its socket
    bool stalled = false;  // gave its queue back for not starting it; no more until it answers
    double avg_ns = 0;
    std::unique_ptr<ChildRecord> record;  // fork: the child's identity, alive while it runs
    // Counted for stats(); written by the pool's thread only, read under the pool's lock.
    std::atomic<std::size_t> assigned{0}, done{0}, failed{0};

    std::size_t capacity(std::size_t max_tasks) const {
        std::size_t cap = 2;
        if (avg_ns > 0) cap = static_cast<std::size_t>(std::clamp(1e6 / avg_ns, 2.0, 1024.0));
        if (max_tasks != 0) cap = std::min<std::size_t>(cap, max_tasks - std::min<std::size_t>(sent, max_tasks));
        return cap;
    }
};

std::string describe_status(int status) {
    if (status < 0) {
        const char* name = ::sigabbrev_np(-status);
        return "was killed by signal " + std::to_string(-status) +
               (name != nullptr ? std::string(" (SIG") + name + ")" : std::string());
    }
    return "exited with code " + std::to_string(status);
}

}  // namespace
}  // namespace pool

struct PoolEngine::Impl {
    using Clock = std::chrono::steady_clock;
    PoolConfig cfg;

    // Shared with submitters: under mu.
    mutable std::mutex mu;
    std::deque<pool::JobPtr> incoming;
    bool shutting_down = false;
    bool cancel_requested = false;
    bool terminate_requested = false;
    bool broken = false;
    bool finished = false;
    bool loop_sleeping = false;
    std::uint64_t cancels_done = 0;  // cancel_pending passes the loop made
    std::condition_variable cancel_cv;
    std::string broken_reason;
    std::vector<std::unique_ptr<pool::Worker>> workers;  // structure changes under mu
    std::atomic<std::size_t> submitted{0}, pending_count{0}, running_count{0}, done_count{0},
        failed_count{0}, cancelled_count{0}, started_count{0}, death_count{0};

    sys::Fd wake;
    pool::WorkerSlot* slots = nullptr;
    std::size_t page_bytes = 0;
    std::size_t stage_offset = 0;  // the workers' stages follow their slots in the page
    sys::Fd page;
    std::vector<bool> slot_used;
    std::vector<sys::Fd> init_fds;  // owned copies of the initializer's descriptors
    std::thread thread;
    std::mutex join_mu;

    // The pool's thread only.
    std::deque<pool::JobPtr> pending;
    std::size_t worker_counter = 0;
    // Consecutive workers that died before they were ready: crashed in the initializer (or at
    // start), or killed from outside (SIGKILL: the OOM killer, an operator) while starting.
    int start_crashes = 0;
    int start_kills = 0;
    // Starting workers failed (see kStartGrace): when to try again, since when it fails.
    std::optional<Clock::time_point> retry_at;
    std::optional<Clock::time_point> failing_since;
    Clock::duration backoff{};
    bool first_start_done = false;  // every worker was started once (even if shut down at once)

    explicit Impl(PoolConfig c) : cfg(std::move(c)) {
        wake = sys::Fd(::eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK));
        if (!wake) sys::throw_system_error(errno, "eventfd");
        stage_offset = (sizeof(pool::WorkerSlot) * static_cast<std::size_t>(cfg.workers) + 4095) & ~std::size_t{4095};
        page_bytes = stage_offset + pool::kStageBytes * static_cast<std::size_t>(cfg.workers);
        page = sys::Fd(::memfd_create("mp-pool", MFD_CLOEXEC));
        if (!page) sys::throw_system_error(errno, "memfd_create");
        if (::ftruncate(page.get(), static_cast<off_t>(page_bytes)) != 0)
            sys::throw_system_error(errno, "ftruncate");
        void* p = ::mmap(nullptr, page_bytes, PROT_READ | PROT_WRITE, MAP_SHARED, page.get(), 0);
        if (p == MAP_FAILED) sys::throw_system_error(errno, "mmap");
        slots = static_cast<pool::WorkerSlot*>(p);
        slot_used.assign(static_cast<std::size_t>(cfg.workers), false);
    }
    ~Impl() {
        if (slots != nullptr) ::munmap(slots, page_bytes);
    }

    void ring() {
        const std::uint64_t one = 1;
        ssize_t n = ::write(wake.get(), &one, sizeof one);
        (void)n;  // EAGAIN: the counter is already non-zero, the loop will wake
    }
    // Under mu.
    void ring_if_sleeping() {
        if (loop_sleeping) {
            loop_sleeping = false;
            ring();
        }
    }

    // ---- the loop ------------------------------------------------------------------------------

    void run() noexcept {
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
                kill_all();
                while (!workers.empty()) wait_exit(*workers.front(), true);
            } catch (...) {
            }
        }
        std::lock_guard lock(mu);
        finished = true;
        cancel_cv.notify_all();
    }

    void loop() {
        std::vector<pollfd> fds;
        while (true) {
            bool terminate = false, cancel = false;
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
            }
            if (terminate) {
                fail_all(std::make_exception_ptr(BrokenProcessPool("the pool was terminated")));
                kill_all();
                while (!workers.empty()) wait_exit(*workers.front(), true);
                return;
            }
            if (cancel) {
                cancel_pending();
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
            dispatch();
            for (auto& w : workers) send(*w);
            if (draining && pending.empty() && in_flight() == 0 && (first_start_done || is_broken())) {
                for (auto& w : workers) close_input(*w);
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
                    wake_at(waiting_since(*w) + pool::kStallLimit);
            }
            if (retry_at && !is_broken()) wake_at(*retry_at);
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
                if (!incoming.empty() || terminate_requested || cancel_requested) continue;
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
    static int poll_in_slices(std::vector<pollfd>& fds, int timeout_ms) {
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

    bool is_broken() const {
        std::lock_guard lock(mu);
        return broken;
    }
    bool shutting_down_now() const {
        std::lock_guard lock(mu);
        return shutting_down;
    }
    std::size_t in_flight() const {
        std::size_t n = 0;
        for (auto& w : workers) n += w->inflight.size();
        return n;
    }

    // ---- workers -------------------------------------------------------------------------------

    // A failure to start a worker that may pass: the system short of descriptors, processes or
    // memory, or a forkserver that died while starting it (the next start restarts it).
    static bool transient(const std::exception& e) {
        if (dynamic_cast<const ProcessError*>(&e) != nullptr) return true;
        if (const auto* se = dynamic_cast<const std::system_error*>(&e)) {
            const int err = se->code().value();
            return err == EMFILE || err == ENFILE || err == EAGAIN || err == ENOMEM || err == ENOBUFS ||
                   err == EPIPE || err == ECONNRESET || err == ECONNREFUSED;
        }
        return false;
    }

    void start_workers() {
        const auto now = Clock::now();
        if (retry_at && now < *retry_at) return;
        while (static_cast<int>(workers.size()) < cfg.workers) {
            try {
                start_worker();
            } catch (const std::exception& e) {
                first_start_done = true;
                if (!failing_since) failing_since = now;
                backoff = std::min<Clock::duration>(backoff == Clock::duration{} ? std::chrono::milliseconds(5) : 2 * backoff,
                                                    pool::kMaxBackoff);
                retry_at = now + backoff;
                // With a live worker the pool goes on, short of one, and tries again later.
                if (workers.empty() && (!transient(e) || now - *failing_since >= pool::kStartGrace))
                    break_pool(std::string("a worker could not start: ") + e.what());
                return;
            }
            failing_since.reset();
            retry_at.reset();
            backoff = {};
        }
        first_start_done = true;
    }

    void start_worker() {
        auto w = std::make_unique<pool::Worker>();
        w->slot = static_cast<std::size_t>(std::find(slot_used.begin(), slot_used.end(), false) - slot_used.begin());
        slot_used[w->slot] = true;
        struct SlotGuard {
            Impl* self;
            std::size_t slot;
            bool keep = false;
            ~SlotGuard() {
                if (!keep) self->slot_used[slot] = false;
            }
        } guard{this, w->slot};
        new (&slots[w->slot]) pool::WorkerSlot;
        const std::size_t number = ++worker_counter;
        w->name = cfg.worker_name + "-" + std::to_string(number);
        auto [ours, theirs] = sys::make_socketpair(SOCK_STREAM);
        std::vector<int> identity = current_process().identity;
        identity.push_back(static_cast<int>(number));

        // Under fork the other workers' sockets must not stay open in this one: a dead worker's
        // end of file would never show.
        std::vector<int> close_in_child;
        std::optional<Task> task;
        const int worker_end = theirs.get();
        pool::WorkerSlot* const all_slots = slots;
        auto forked_main = [worker_end, all_slots]() noexcept {
            pool::g_forked_from_thread = 1;
            return pool::worker_loop(worker_end, all_slots);
        };
        ChildSpec spec;
        spec.name = w->name;
        spec.identity = identity;
        spec.authkey = current_process().authkey;
        spec.daemon = true;
        spec.method = cfg.method;
        if (cfg.method == StartMethod::fork) {
            for (auto& o : workers) close_in_child.push_back(o->sock.get());
            close_in_child.push_back(ours.get());
            close_in_child.push_back(wake.get());
            spec.main = ChildMain(forked_main);
            spec.close_in_child = close_in_child;
        } else {
            task = make_transferable_task(&pool::forkserver_worker, pool::PassedFd{worker_end},
                                          pool::PassedFd{page.get()}, std::uint64_t{page_bytes});
            spec.task = &*task;
        }
        Launched started = launch(spec);
        w->forked = !started.status;  // our own child (fork, spawn): its pidfd gives the status
        w->pid = started.pid;
        w->pidfd = std::move(started.pidfd);
        w->status = std::move(started.status);
        w->record = std::move(started.record);
        theirs.reset();
        ::fcntl(ours.get(), F_SETFL, ::fcntl(ours.get(), F_GETFL) | O_NONBLOCK);
        w->sock = std::move(ours);

        // The first frame: which slot, the limits, the initializer.
        std::string init;
        auto put = [&](const auto& v) { init.append(reinterpret_cast<const char*>(&v), sizeof v); };
        put(static_cast<std::uint32_t>(w->slot));
        put(static_cast<std::uint64_t>(stage_offset + w->slot * pool::kStageBytes));
        put(static_cast<std::uint64_t>(pool::kStageBytes));
        put(static_cast<std::uint64_t>(cfg.max_tasks_per_child));
        put(static_cast<std::uint64_t>(cfg.max_memory_per_child));
        put(static_cast<std::uint8_t>(cfg.initializer ? 1 : 0));
        std::vector<int> frame_fds;
        if (cfg.initializer) {
            init += cfg.initializer->bytes;
            frame_fds = cfg.initializer->fds;
        }
        w->out.add(pool::FrameType::init, 0, 0, init, {}, std::move(frame_fds));
        guard.keep = true;
        started_count.fetch_add(1, std::memory_order_relaxed);
        std::lock_guard lock(mu);
        workers.push_back(std::move(w));
    }

    // Shuts the socket for writing: the worker reads end of file once it has run what it holds.
    void close_input(pool::Worker& w) {
        if (w.closing || !w.sock) return;
        if (!w.out.empty()) return;  // the rest of its work is still on the way
        w.closing = true;
        ::shutdown(w.sock.get(), SHUT_WR);
    }

    void kill_all() {
        for (auto& w : workers)
            if (w->pidfd) sys::pidfd_send_signal(w->pidfd.get(), SIGKILL);
    }

    // ---- tasks out ------------------------------------------------------------------------------

    // How long the worker has been inside its current task (zero when between tasks).
    std::chrono::nanoseconds busy_for(const pool::Worker& w, Clock::time_point now) const {
        const auto& slot = slots[w.slot];
        const std::uint64_t started = slot.started.load(std::memory_order_acquire);
        if (started <= slot.finished.load(std::memory_order_acquire)) return std::chrono::nanoseconds::zero();
        const Clock::time_point at{Clock::duration(slot.started_at.load(std::memory_order_relaxed))};
        return now > at ? std::chrono::duration_cast<std::chrono::nanoseconds>(now - at) : std::chrono::nanoseconds::zero();
    }

    bool has_idle_worker() const {
        for (auto& w : workers)
            if (w->inflight.empty() && !w->retiring && !w->closing && w->timed_out == 0 && w->ready && !w->stalled)
                return true;
        return false;
    }

    // Takes back, from the end of its queue, every task `w` has not started; they go to the
    // front of `pending` in their order. One that cancel() withdrew stays until `w` skips it.
    bool take_back_queued(pool::Worker& w) {
        std::deque<pool::JobPtr> back, keep;
        while (!w.inflight.empty()) {
            pool::JobPtr& job = w.inflight.back();
            const auto r = job->take_back();
            if (r == pool::Job::Back::taken) {
                back.push_front(std::move(job));
            } else if (r == pool::Job::Back::cancelled) {
                keep.push_front(std::move(job));
            } else {
                break;  // started: every task before it has too
            }
            w.inflight.pop_back();
        }
        for (auto& job : keep) w.inflight.push_back(std::move(job));
        if (back.empty()) return false;
        w.assigned.store(w.inflight.size(), std::memory_order_relaxed);
        if (w.inflight.empty()) w.head_since.reset();
        for (auto it = back.rbegin(); it != back.rend(); ++it) {
            running_count.fetch_sub(1, std::memory_order_relaxed);
            pending_count.fetch_add(1, std::memory_order_relaxed);
            pending.push_front(std::move(*it));
        }
        return true;
    }

    // When a worker idles while another sits in a long task with more queued behind it, take
    // those back so the idle one can have them.
    bool take_back(Clock::time_point now) {
        if (!has_idle_worker()) return false;
        bool took = false;
        for (auto& w : workers) {
            if (w->inflight.size() < 2 || busy_for(*w, now) <= std::chrono::milliseconds(1)) continue;
            took |= take_back_queued(*w);
        }
        return took;
    }

    // A ready worker that has not started the head of its queue within kStallLimit (stopped,
    // or starved of CPU) gives its queue back: other workers run it. Its deadline stays, so a
    // worker stopped for good while holding a task with a time limit is killed and replaced.
    void take_back_stalled(Clock::time_point now) {
        for (auto& w : workers) {
            if (w->stalled || !w->head_since || now - waiting_since(*w) < pool::kStallLimit) continue;
            pool::Job& head = *w->inflight.front();
            if (head.started_in_worker()) {
                (void)head.set_running();  // its started frame may still be on the way
                continue;
            }
            w->stalled = true;
            take_back_queued(*w);
        }
    }

    void dispatch() {
        const auto now = Clock::now();
        assign_pending(now);
        if (pending.empty() && take_back(now)) assign_pending(now);
    }

    void assign_pending(Clock::time_point now) {
        while (!pending.empty()) {
            pool::Worker* best = nullptr;
            std::size_t best_room = 0;
            for (auto& w : workers) {
                if (w->retiring || w->closing || w->timed_out != 0 || w->stalled) continue;
                // A worker inside a task for over a millisecond gets no more for now: what it
                // holds already waits behind that task, and more would wait too while another
                // worker may be free (its depth was sized by the tiny tasks before).
                if (!w->inflight.empty() && busy_for(*w, now) > std::chrono::milliseconds(1)) continue;
                // Its tickets must not wrap onto a task it still holds.
                if (!w->inflight.empty() && w->next_ordinal - w->inflight.front()->ordinal >= pool::kTickets) continue;
                const std::size_t cap = w->capacity(cfg.max_tasks_per_child);
                const std::size_t held = w->inflight.size();
                if (held >= cap) continue;
                // Prefer the emptiest worker, so work spreads before it piles up.
                const std::size_t room = cap - held;
                if (best == nullptr || held < best->inflight.size() ||
                    (held == best->inflight.size() && room > best_room)) {
                    best = w.get();
                    best_room = room;
                }
            }
            if (best == nullptr) return;
            pool::JobPtr job = std::move(pending.front());
            pending.pop_front();
            pending_count.fetch_sub(1, std::memory_order_relaxed);
            assign(*best, std::move(job), now);
        }
    }

    void assign(pool::Worker& w, pool::JobPtr job, Clock::time_point now) {
        const std::uint64_t ordinal = w.next_ordinal;
        if (!job->place(slots[w.slot], ordinal)) {
            cancelled_count.fetch_add(1, std::memory_order_relaxed);  // cancelled while pending
            return;
        }
        ++w.next_ordinal;
        ++w.sent;
        const auto timeout = job->timeout ? job->timeout : cfg.task_timeout;
        std::vector<int> fds;
        for (auto& fd : job->fds) fds.push_back(fd.get());
        w.out.add(pool::FrameType::task, timeout ? pool::kTimed : 0, ordinal, job->bytes, {},
                  std::move(fds));
        job->timeout = timeout;
        // The job keeps its bytes and descriptors until it finishes: a worker that dies before
        // starting it hands it back to be sent again.
        w.inflight.push_back(std::move(job));
        w.assigned.store(w.inflight.size(), std::memory_order_relaxed);
        running_count.fetch_add(1, std::memory_order_relaxed);
        if (w.inflight.size() == 1) new_head(w, now);
    }

    // The head of w's queue has changed (or w became ready): it is due from now.
    void new_head(pool::Worker& w, Clock::time_point now) {
        if (w.inflight.empty() || !w.ready) {
            w.head_since.reset();
            if (w.inflight.empty() && !w.stalled) w.deadline.reset();
            return;
        }
        const pool::Job& head = *w.inflight.front();
        if (w.head_since && w.head_ordinal == head.ordinal) return;
        w.head_since = now;
        w.head_ordinal = head.ordinal;
        if (head.timeout) {
            w.deadline = now + *head.timeout;
            w.deadline_ordinal = head.ordinal;
        } else {
            w.deadline.reset();
        }
    }

    void send(pool::Worker& w) {
        if (!w.sock || w.out.empty()) return;
        const std::size_t before = w.out.unsent();
        try {
            (void)w.out.flush(w.sock.get());
        } catch (const std::system_error&) {
            // The worker has gone; its end will be seen on its exit descriptor.
        }
        if (w.out.unsent() < before) w.last_sent = Clock::now();
    }

    // Since when the head of w's queue has waited for w to start it: a worker still reading a
    // large task off its socket is not stalled.
    static Clock::time_point waiting_since(const pool::Worker& w) { return std::max(*w.head_since, w.last_sent); }

    // ---- answers in -----------------------------------------------------------------------------

    void receive(pool::Worker& w) {
        while (w.sock) {
            auto st = w.in.read_some(w.sock.get());
            while (auto f = w.in.next()) handle(w, *f);
            if (st != pool::FrameReader::Status::data) {
                if (st == pool::FrameReader::Status::eof) {
                    // Nothing more will come; its exit descriptor says when it has ended.
                    w.sock.reset();
                }
                return;
            }
        }
    }

    void handle(pool::Worker& w, pool::Frame& f) {
        using pool::FrameType;
        if (w.stalled) {
            // A sign of life: it may have work again.
            w.stalled = false;
            if (w.inflight.empty()) w.deadline.reset();
        }
        switch (f.type) {
            case FrameType::ready:
                w.ready = true;
                start_crashes = start_kills = 0;
                new_head(w, Clock::now());
                return;
            case FrameType::init_failed: {
                Decoder d(f.payload);
                ErrorInfo info = decode_error_info(d);
                break_pool("the pool's initializer raised " + info.type_name + ": " + info.message +
                           " (in " + info.origin + ")");
                return;
            }
            case FrameType::started:
                if (!w.inflight.empty() && w.inflight.front()->ordinal == f.ordinal)
                    (void)w.inflight.front()->set_running();
                return;
            case FrameType::result: {
                if (f.ordinal <= w.answered) return;  // seen already (resent from its stage)
                if (w.inflight.empty() || w.inflight.front()->ordinal != f.ordinal)
                    throw DecodeError("mp pool: a worker answered a task it was not given");
                w.answered = f.ordinal;
                pool::JobPtr job = std::move(w.inflight.front());
                w.inflight.pop_front();
                w.assigned.store(w.inflight.size(), std::memory_order_relaxed);
                if (w.deadline_ordinal == f.ordinal) w.deadline.reset();
                next_head(w);
                std::uint64_t run_ns = 0;
                if (f.payload.size() < sizeof run_ns) throw DecodeError("mp pool: truncated result");
                std::memcpy(&run_ns, f.payload.data(), sizeof run_ns);
                const std::string_view body = f.payload.substr(sizeof run_ns);
                const double per = static_cast<double>(run_ns) / static_cast<double>(std::max<std::size_t>(job->items, 1));
                w.avg_ns = w.avg_ns == 0 ? per : 0.8 * w.avg_ns + 0.2 * per;
                running_count.fetch_sub(1, std::memory_order_relaxed);
                if (f.flags & pool::kOk) {
                    w.done.fetch_add(1, std::memory_order_relaxed);
                    done_count.fetch_add(1, std::memory_order_relaxed);
                    job->set_result(std::string(body));
                } else {
                    w.failed.fetch_add(1, std::memory_order_relaxed);
                    failed_count.fetch_add(1, std::memory_order_relaxed);
                    Decoder d(body);
                    job->set_exception(make_remote_exception(decode_error_info(d)));
                }
                return;
            }
            case FrameType::retire:
                w.retiring = true;
                return;
            case FrameType::skipped:
                if (f.ordinal <= w.answered) return;
                w.answered = f.ordinal;
                // Cancelled while queued in it; one taken back for another worker is gone already.
                if (!w.inflight.empty() && w.inflight.front()->ordinal == f.ordinal) {
                    w.inflight.pop_front();
                    w.assigned.store(w.inflight.size(), std::memory_order_relaxed);
                    running_count.fetch_sub(1, std::memory_order_relaxed);
                    cancelled_count.fetch_add(1, std::memory_order_relaxed);
                    if (w.deadline_ordinal == f.ordinal) w.deadline.reset();
                    next_head(w);
                }
                return;
            default:
                throw DecodeError("mp pool: unexpected frame from a worker");
        }
    }

    // After the head of w's queue answered: the next is due now, and may have started already.
    void next_head(pool::Worker& w) {
        new_head(w, Clock::now());
        if (!w.inflight.empty() && w.inflight.front()->started_in_worker()) (void)w.inflight.front()->set_running();
    }

    // ---- ends -----------------------------------------------------------------------------------

    void check_deadlines() {
        const auto now = Clock::now();
        for (auto& w : workers) {
            if (!w->deadline || *w->deadline > now) continue;
            w->timed_out = w->deadline_ordinal;
            w->deadline.reset();
            if (w->pidfd) sys::pidfd_send_signal(w->pidfd.get(), SIGKILL);
        }
    }

    // Waits for the end of a worker known to have ended (its pidfd polled readable) or to be
    // ending (killed), and returns its status, if known.
    static std::optional<int> exit_status(pool::Worker& w) {
        if (w.forked) return sys::pidfd_wait(w.pidfd.get(), false);
        // Until its pidfd says so it may still run (a helper's socket closing proves nothing).
        (void)sys::pidfd_wait_exit(w.pidfd.get(), std::nullopt);
        // The forkserver reaps it and sends the status at once, unless the server is stopped or
        // gone: then the status is unknown, and the pool must not wait for it.
        if (!sys::wait_fd(w.status.get(), POLLIN, std::chrono::milliseconds(200))) return std::nullopt;
        return forkserver::read_status(w.status.get());
    }

    // The worker has ended (or is being made to): reap it, read what it sent, settle its tasks.
    void wait_exit(pool::Worker& w, bool terminating) {
        // Dead first: only then are its slot and stage final.
        const int status = exit_status(w).value_or(-SIGKILL);
        if (w.sock) receive(w);
        // Answers it had finished but not sent wait in its stage (some may have been sent too:
        // handle() ignores an answer twice). A frame cut short on the socket is in the stage whole.
        const pool::WorkerSlot& slot = slots[w.slot];
        const std::uint64_t committed = slot.committed.load(std::memory_order_acquire);
        const std::uint64_t sent = slot.sent.load(std::memory_order_acquire);
        if (!terminating && sent < committed && committed <= pool::kStageBytes) {
            const char* stage = reinterpret_cast<const char*>(slots) + stage_offset + w.slot * pool::kStageBytes;
            w.in.reset(std::string_view(stage + sent, committed - sent));
            try {
                while (auto f = w.in.next()) handle(w, *f);
            } catch (const DecodeError&) {
                // A stage cut mid-frame cannot happen (frames are committed whole); if it is
                // garbage anyway, the tasks below settle as if nothing was there.
            }
        }
        const std::uint64_t finished_ord = slots[w.slot].finished.load(std::memory_order_acquire);
        const bool unasked = !w.retiring && !w.closing && w.timed_out == 0 && !terminating;
        if (unasked) death_count.fetch_add(1, std::memory_order_relaxed);
        if (unasked && cfg.break_on_worker_death && !is_broken()) {
            // Python's behaviour: every unfinished future, the dead worker's own too, fails
            // with BrokenProcessPool.
            break_pool("a worker, " + w.name + " (pid " + std::to_string(w.pid) + "), " +
                       pool::describe_status(status) + "; the pool is not usable any more");
        }
        std::deque<pool::JobPtr> again;
        for (auto& job : w.inflight) {
            std::exception_ptr e;
            if (terminating) {
                e = std::make_exception_ptr(BrokenProcessPool("the pool was terminated"));
            } else if (const auto r = job->take_back(); r == pool::Job::Back::taken) {
                again.push_back(std::move(job));  // never started
                continue;
            } else if (r == pool::Job::Back::cancelled) {
                running_count.fetch_sub(1, std::memory_order_relaxed);
                cancelled_count.fetch_add(1, std::memory_order_relaxed);
                continue;
            } else if (job->ordinal <= finished_ord) {
                e = std::make_exception_ptr(WorkerDied(w.pid, status));  // its answer was lost
            } else {
                if (w.timed_out == job->ordinal) {
                    e = std::make_exception_ptr(TimeoutError(
                        "the task ran longer than its time limit; its worker " + w.name + " (pid " +
                        std::to_string(w.pid) + ") was killed"));
                } else {
                    e = std::make_exception_ptr(WorkerDied(w.pid, status));
                }
            }
            running_count.fetch_sub(1, std::memory_order_relaxed);
            failed_count.fetch_add(1, std::memory_order_relaxed);
            job->set_exception(e);
        }
        w.inflight.clear();
        // Tasks it never started go first, in their order, to the next free worker.
        for (auto it = again.rbegin(); it != again.rend(); ++it) {
            running_count.fetch_sub(1, std::memory_order_relaxed);
            pending_count.fetch_add(1, std::memory_order_relaxed);
            pending.push_front(std::move(*it));
        }
        const bool was_ready = w.ready;
        const std::string name = w.name;
        const pid_t pid = w.pid;
        slot_used[w.slot] = false;
        {
            std::lock_guard lock(mu);
            workers.erase(std::find_if(workers.begin(), workers.end(),
                                       [&](auto& p) { return p.get() == &w; }));
        }
        if (terminating) return;
        // A crash at start repeats for every replacement: three in a row break the pool. Kills
        // from outside are the killer's doing, but a worker killed every time its initializer
        // runs (by the OOM killer, say) would be replaced for ever: a hundred break the pool.
        const bool start_failed =
            unasked && !was_ready &&
            (status == -SIGKILL ? cfg.initializer && ++start_kills >= 100 : ++start_crashes >= 3);
        if (start_failed) {
            break_pool("workers die as they start (the last, " + name + " (pid " + std::to_string(pid) +
                       "), " + pool::describe_status(status) + ")");
        }
    }

    // ---- failing -------------------------------------------------------------------------------

    void break_pool(const std::string& reason) {
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
    std::string broken_reason_copy() const {
        std::lock_guard lock(mu);
        return broken_reason;
    }

    void fail_pending() {
        if (pending.empty()) return;
        auto e = std::make_exception_ptr(BrokenProcessPool(broken_reason_copy()));
        while (!pending.empty()) {
            pending_count.fetch_sub(1, std::memory_order_relaxed);
            failed_count.fetch_add(1, std::memory_order_relaxed);
            pending.front()->set_exception(e);
            pending.pop_front();
        }
    }

    void fail_all(const std::exception_ptr& e) {
        {
            std::lock_guard lock(mu);
            while (!incoming.empty()) {
                pending.push_back(std::move(incoming.front()));
                incoming.pop_front();
            }
        }
        while (!pending.empty()) {
            pending_count.fetch_sub(1, std::memory_order_relaxed);
            failed_count.fetch_add(1, std::memory_order_relaxed);
            pending.front()->set_exception(e);
            pending.pop_front();
        }
        for (auto& w : workers) {
            for (auto& job : w->inflight) {
                running_count.fetch_sub(1, std::memory_order_relaxed);
                failed_count.fetch_add(1, std::memory_order_relaxed);
                job->set_exception(e);
            }
            w->inflight.clear();
            w->head_since.reset();
            w->deadline.reset();
        }
    }

    // shutdown(cancel_futures): every task no worker has started, queued in a worker too (the
    // worker skips those and says so; they are counted then).
    void cancel_pending() {
        for (auto& job : pending) {
            if (job->cancel()) cancelled_count.fetch_add(1, std::memory_order_relaxed);
            pending_count.fetch_sub(1, std::memory_order_relaxed);
        }
        pending.clear();
        for (auto& w : workers)
            for (auto& job : w->inflight) (void)job->cancel();
    }
};

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
    Impl* impl = impl_.get();
    impl_->thread = std::thread([impl] { impl->run(); });
}

PoolEngine::~PoolEngine() {
    try {
        shutdown(true, false);
    } catch (...) {
    }
    if (impl_->thread.joinable()) impl_->thread.join();
}

std::shared_ptr<FutureCore> PoolEngine::submit(Task task, JobOptions options) {
    auto job = std::make_shared<pool::Job>();
    job->bytes = std::move(task.bytes);
    for (int fd : task.fds) {
        int d = ::fcntl(fd, F_DUPFD_CLOEXEC, 3);
        if (d < 0) sys::throw_system_error(errno, "fcntl(F_DUPFD_CLOEXEC)");
        job->fds.emplace_back(d);
    }
    job->items = options.items;
    job->timeout = options.timeout;
    std::shared_ptr<FutureCore> core = job;
    std::lock_guard lock(impl_->mu);
    if (impl_->broken) throw BrokenProcessPool(impl_->broken_reason);
    if (impl_->shutting_down || impl_->terminate_requested)
        throw Error("cannot schedule new futures after shutdown");
    impl_->incoming.push_back(std::move(job));
    impl_->submitted.fetch_add(1, std::memory_order_relaxed);
    impl_->pending_count.fetch_add(1, std::memory_order_relaxed);
    impl_->ring_if_sleeping();
    return core;
}

void PoolEngine::shutdown(bool wait, bool cancel_pending) {
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

void PoolEngine::terminate() {
    {
        std::lock_guard lock(impl_->mu);
        impl_->shutting_down = true;
        impl_->terminate_requested = true;
        impl_->ring();
    }
    join();
}

void PoolEngine::join() {
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

}  // namespace detail

// ---- the public classes' out-of-line parts ---------------------------------------------------

namespace {
int worker_count(const std::optional<int>& n, const char* message) {
    if (!n) return cpu_count();
    if (*n < 1) throw std::invalid_argument(message);
    return *n;
}
}  // namespace

detail::PoolConfig ProcessPoolExecutor::make_config(const ExecutorOptions& o, std::optional<detail::Task> init) {
    detail::PoolConfig c;
    c.workers = worker_count(o.max_workers, "max_workers must be greater than 0");
    c.method = o.start_method.value_or(StartMethod::forkserver);
    c.max_tasks_per_child = o.max_tasks_per_child;
    c.max_memory_per_child = o.max_memory_per_child;
    c.task_timeout = o.task_timeout;
    c.break_on_worker_death = o.break_on_worker_death;
    c.initializer = std::move(init);
    return c;
}

detail::PoolConfig Pool::make_config(const PoolOptions& o, std::optional<detail::Task> init) {
    detail::PoolConfig c;
    c.workers = worker_count(o.processes, "Number of processes must be at least 1");
    c.method = o.start_method.value_or(StartMethod::forkserver);
    c.max_tasks_per_child = o.maxtasksperchild;
    c.max_memory_per_child = o.max_memory_per_child;
    c.task_timeout = o.task_timeout;
    c.initializer = std::move(init);
    return c;
}

Pool::~Pool() {
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
    // The unread input of a live imap is work already asked for: submit it before closing.
    if (stage_ == Stage::running) detail::drain_imaps(*imaps_);
    if (stage_ == Stage::running) stage_ = Stage::closed;
    engine_.shutdown(false, false);
}

void Pool::terminate() {
    stage_ = Stage::terminated;
    engine_.terminate();
}

void Pool::join() {
    if (stage_ == Stage::running) throw Error("Pool is still running");
    engine_.join();
}

}  // namespace mp

#if defined(__SANITIZE_ADDRESS__)
// LeakSanitizer asks this (weak, so a program's own definition wins) before its exit-time check.
extern "C" __attribute__((weak)) int __lsan_is_turned_off() {
    return mp::detail::pool::g_forked_from_thread;
}
#endif
