#pragma once
// The pool's state, shared by the files that run it: pool_engine.cpp (the thread's loop, failing,
// the public PoolEngine), pool_lifecycle.cpp (starting workers, their ends, the status page) and
// pool_schedule.cpp (handing out tasks, answers, take-back, deadlines). See pool_engine.cpp for how
// the pool works.

#include <poll.h>
#include <sys/types.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <deque>
#include <exception>
#include <memory>
#include <mutex>
#include <new>
#include <optional>
#include <string>
#include <string_view>
#include <thread>
#include <vector>

#include "mp/detail/pool_engine.hpp"
#include "launch.hpp"
#include "pool_frames.hpp"
#include "sys/block_arena.hpp"
#include "sys/fd.hpp"
#include "sys/pidfd.hpp"

namespace mp::detail {
namespace pool {

using Clock = std::chrono::steady_clock;
using std::chrono::nanoseconds;

constexpr auto kStallLimit = std::chrono::milliseconds(10);
constexpr auto kStartGrace = std::chrono::seconds(5);
constexpr auto kMaxBackoff = std::chrono::milliseconds(500);

// A task's encoding. A call with a few scalar arguments takes about 40 bytes: kept in the job
// itself, a batch of small tasks costs one allocation each (the job) instead of two, and the
// batch's first run touches that much less fresh memory (a page fault per 4 KiB). Larger ones
// keep the std::string they came in, built in place in the same bytes. Not a std::variant, whose
// tag would take a word of its own: the length byte says which it holds.
class TaskBytes {
public:
    TaskBytes() = default;
    TaskBytes(const TaskBytes&) = delete;
    TaskBytes& operator=(const TaskBytes&) = delete;
    ~TaskBytes() { clear(); }

    void assign(std::string&& bytes) {
        clear();
        if (bytes.size() <= kInline) {
            std::memcpy(raw_, bytes.data(), bytes.size());
            size_ = static_cast<std::uint8_t>(bytes.size());
        } else {
            ::new (static_cast<void*>(raw_)) std::string(std::move(bytes));
            size_ = kOnHeap;
        }
    }
    std::string_view view() const noexcept {
        if (size_ == kOnHeap) return *std::launder(reinterpret_cast<const std::string*>(raw_));
        return {raw_, size_};
    }

private:
    void clear() noexcept {
        if (size_ == kOnHeap) std::launder(reinterpret_cast<std::string*>(raw_))->~basic_string();
        size_ = 0;
    }
    static constexpr std::size_t kInline = 55;  // with the length byte: 56
    static constexpr std::uint8_t kOnHeap = 0xff;
    static_assert(kInline >= sizeof(std::string) && kInline < kOnHeap);
    alignas(std::string) char raw_[kInline];
    std::uint8_t size_ = 0;  // <= kInline: held in raw_; kOnHeap: raw_ holds a std::string
};

// What few tasks carry, apart from the job so that a plain task's job stays small.
struct JobExtras {
    std::vector<sys::Fd> fds;
    std::optional<nanoseconds> timeout;  // the task's own, over PoolConfig::task_timeout
    int unstarted_timeouts = 0;          // workers killed for its time limit before it started
};

// A task and its future in one block of the pool's arena (job_arena): the queues hold pointers,
// the user the future. A batch of small tasks costs this per task, in fresh memory on a freshly
// started pool: kept to 168 bytes (192 with the shared_ptr's counts and the allocator's pointer).
struct Job : FutureCore {
    std::uint64_t ordinal = 0;  // in its current worker
    // Where a worker holds it, for cancel() in any thread: the pool's thread changes `ticket`
    // under the core's state_mutex(), which cancel() holds around withdraw().
    std::atomic<std::uint64_t>* ticket = nullptr;  // null: not in a worker
    std::unique_ptr<JobExtras> extras;             // null: no descriptors, the pool's timeout
    TaskBytes bytes;
    std::uint32_t items = 0;  // a chunk's calls (saturated: it only weighs the timing), 0: one call
    bool withdrawn = false;   // cancel() took it back: never to be sent

    JobExtras& extra() {
        if (!extras) extras = std::make_unique<JobExtras>();
        return *extras;
    }
    // Its time limit in a worker: its own, else the pool's.
    std::optional<nanoseconds> timeout(const PoolConfig& cfg) const {
        return extras && extras->timeout ? extras->timeout : cfg.task_timeout;
    }

    // Takes the task back from its worker unless it has started there (state_mutex() held).
    bool withdraw() noexcept override {
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
        std::lock_guard lock(state_mutex());
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
        std::lock_guard lock(state_mutex());
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
        std::lock_guard lock(state_mutex());
        return ticket != nullptr &&
               ticket->load(std::memory_order_acquire) == pool::ticket(ordinal, pool::kStarted);
    }
    bool cancelled() const noexcept { return state() == State::cancelled; }
    // The pool's thread, once it is done with the task (answered, or failed or cancelled before
    // it was handed to a worker): it is never sent again, so its descriptors close now rather
    // than when the user drops the last Future (a batch of futures kept to the end would hold
    // them all). The bytes stay: freed here, in another thread than the one that allocated
    // them, they cost more (the allocator's arena lock, shared with submit) than they save.
    void release_descriptors() noexcept {
        if (extras) extras->fds.clear();
    }
};
// With the shared_ptr's counts and its allocator's pointer, one 192-byte block of the arena.
static_assert(sizeof(Job) <= 168, "a job grew: every task of a batch pays for it in fresh memory");
using JobPtr = std::shared_ptr<Job>;

struct Worker {
    std::size_t slot = 0;
    pid_t pid = 0;
    std::string name;
    // Both closed in every fork child mp makes (ParentOnlyFd): the worker learns that the pool's
    // process has died from `sock`'s end of file, the forkserver from `status`'s hang-up.
    ParentOnlyFd sock;
    sys::Fd pidfd;
    ParentOnlyFd status;  // forkserver: the exit status arrives here (kept open: closing it kills the worker)
    bool forked = false;
    std::deque<JobPtr> inflight;
    std::uint64_t next_ordinal = 1;
    std::uint64_t answered = 0;  // the last ordinal whose answer arrived
    std::uint64_t sent = 0;  // tasks handed to it, less those it skipped (its max_tasks count)
    FrameReader in;
    FrameWriter out;
    bool ready = false;
    Clock::time_point started_at{};  // when it was launched: its initializer runs from about then
    // A task's time limit passed while it waited for this worker's initializer (see
    // fail_overdue_in_initializer): no more tasks while another worker can take them, and
    // killed at shutdown if still in its initializer.
    bool init_overran = false;
    bool stopped_in_initializer = false;  // killed so at shutdown: an end the pool asked for
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

}  // namespace pool

struct PoolEngine::Impl {
    using Clock = std::chrono::steady_clock;
    PoolConfig cfg;
    pid_t owner = sys::self_pid();  // the process whose pool it is (a fork() child's copy is not)

    // Shared with submitters: under mu.
    mutable std::mutex mu;
    std::deque<pool::JobPtr> incoming;
    std::vector<std::function<void()>> posted;  // post(): for the loop to run
    bool shutting_down = false;
    bool cancel_requested = false;
    bool terminate_requested = false;
    int stop_signal = 0;  // terminate_workers / kill_workers: the signal, for the loop to send
    bool broken = false;
    bool finished = false;
    bool first_workers_forked = false;  // the constructor of a fork pool waits for it
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
    // The jobs' memory (see sys/block_arena.hpp: a first batch's jobs would otherwise fault in
    // page by page). Released by ~Impl; freed with the last job.
    sys::BlockArena* job_arena = sys::BlockArena::create();
    std::thread thread;
    std::mutex join_mu;
    // Set when the engine is destroyed on its own thread (the last handle dropped in a done
    // callback): the detached thread owns the state until it ends.
    std::shared_ptr<Impl> keep_alive;

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
    bool first_workers_told = false;  // first_workers_forked was set

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


    // ---- the loop and failing (pool_engine.cpp) ------------------------------------------------
    void run() noexcept;
    void loop();
    // Runs what post() left; false when there was nothing.
    bool run_posted();
    static int poll_in_slices(std::vector<pollfd>& fds, int timeout_ms);
    void break_pool(const std::string& reason);
    void fail_pending();  // with BrokenProcessPool, the pool's reason
    void fail_pending(const std::exception_ptr& e);
    void fail_all(const std::exception_ptr& e);
    void force_stop(int sig);
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
    std::string broken_reason_copy() const {
        std::lock_guard lock(mu);
        return broken_reason;
    }


    // ---- workers: start, end, the status page (pool_lifecycle.cpp) -----------------------------
    explicit Impl(PoolConfig c);
    ~Impl();
    static bool transient(const std::exception& e);
    void start_workers();
    void start_worker();
    void close_input(pool::Worker& w);
    void kill_all();
    void kill_and_reap_all();
    static std::optional<int> exit_status(pool::Worker& w);
    void wait_exit(pool::Worker& w, bool terminating);


    // ---- scheduling: tasks out, answers in, take-back, deadlines (pool_schedule.cpp) ----------
    std::chrono::nanoseconds busy_for(const pool::Worker& w, Clock::time_point now) const;
    bool has_idle_worker() const;
    bool take_back_queued(pool::Worker& w);
    bool take_back(Clock::time_point now);
    void take_back_stalled(Clock::time_point now);
    void dispatch();
    void assign_pending(Clock::time_point now);
    void assign(pool::Worker& w, pool::JobPtr job, Clock::time_point now);
    void new_head(pool::Worker& w, Clock::time_point now);
    void send(pool::Worker& w);
    void receive(pool::Worker& w);
    void handle(pool::Worker& w, pool::Frame& f);
    void next_head(pool::Worker& w);
    void check_deadlines();
    bool fail_overdue_in_initializer(pool::Worker& w);
    void stop_stuck_initializers(Clock::time_point now);
    std::optional<Clock::time_point> initializer_limit(const pool::Worker& w) const;
    void cancel_pending();
    // When the head of w's queue counts as not started in time: kStallLimit after the last
    // bytes went into w's socket (a worker still reading a large task off it is not stalled),
    // or, when sending took longer, that long after: taking a task back costs sending it again,
    // so a task that took a second to send is not moved for a worker that has not started it
    // within 10 ms (on a loaded machine, that bounced a 96 MiB task between two workers for
    // over a minute).
    static Clock::time_point stall_due(const pool::Worker& w) {
        const Clock::duration sending = std::max(w.last_sent - *w.head_since, Clock::duration::zero());
        return std::max(*w.head_since, w.last_sent) + std::max<Clock::duration>(pool::kStallLimit, sending);
    }
};

}  // namespace mp::detail
