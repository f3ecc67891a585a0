// A pool's workers from start to end: the shared status page they write to, starting one (by
// the one launcher, under the pool's start method) and sending it its limits and initializer,
// closing its input, killing it, and settling its tasks when it has ended.

#include <fcntl.h>
#include <signal.h>
#include <sys/eventfd.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <system_error>

#include "mp/futures.hpp"
#include "mp/util.hpp"
#include "describe.hpp"
#include "pool_engine_impl.hpp"
#include "process_impl.hpp"
#include "sys/error.hpp"
#include "sys/pidfd.hpp"

namespace mp {
namespace detail {
namespace pool {

// Set in a fork-method worker: a child forked from the pool's thread of a threaded process,
// where LeakSanitizer cannot stop the world at exit and reports the parent's live objects.
volatile int g_forked_from_thread = 0;

namespace {

// A task that has not started by its time limit goes to another worker; after this many
// workers killed for it before it started, it fails with TimeoutError instead (a limit shorter
// than a worker takes to start it would otherwise cost a new worker each time, for ever).
constexpr int kUnstartedTimeouts = 3;

// A forkserver worker's entry: map the status page, then serve.
void forkserver_worker(PassedFd sock, PassedFd page, std::uint64_t page_bytes) {
    void* p = ::mmap(nullptr, page_bytes, PROT_READ | PROT_WRITE, MAP_SHARED, page.fd, 0);
    ::close(page.fd);
    if (p == MAP_FAILED) sys::throw_system_error(errno, "mmap (pool worker)");
    int code = worker_loop(sock.fd, static_cast<WorkerSlot*>(p));
    finish_child(code);
}

}  // namespace
}  // namespace pool

PoolEngine::Impl::Impl(PoolConfig c) : cfg(std::move(c)) {
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

PoolEngine::Impl::~Impl() {
    if (slots != nullptr) ::munmap(slots, page_bytes);
    job_arena->release();
}

// A failure to start a worker that may pass: the system short of descriptors, processes or
// memory, or a forkserver that died while starting it (the next start restarts it).
bool PoolEngine::Impl::transient(const std::exception& e) {
    if (dynamic_cast<const ProcessError*>(&e) != nullptr) return true;
    if (const auto* se = dynamic_cast<const std::system_error*>(&e)) {
        const int err = se->code().value();
        return err == EMFILE || err == ENFILE || err == EAGAIN || err == ENOMEM || err == ENOBUFS ||
               err == EPIPE || err == ECONNRESET || err == ECONNREFUSED;
    }
    return false;
}

void PoolEngine::Impl::start_workers() {
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

void PoolEngine::Impl::start_worker() {
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
    // Both ends are listed as they are made (parent_only_socketpair): no fork child mp makes
    // keeps ours, this worker's under fork and every later one's included, nor one that another
    // thread makes meanwhile, so the worker sees the end of file when the pool goes; and none
    // but this worker under fork keeps theirs (parent_only_kept), which no other process has
    // any use for.
    auto [ours, theirs] = parent_only_socketpair(SOCK_STREAM);
    std::vector<int> identity = current_process().identity;
    identity.push_back(static_cast<int>(number));

    // Under fork the pool's eventfd is not the worker's either.
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
    spec.daemon = cfg.daemon_workers;
    spec.dies_with_parent = true;
    spec.method = cfg.method;
    if (cfg.method == StartMethod::fork) {
        close_in_child.push_back(wake.get());
        spec.main = ChildMain(forked_main);
        spec.close_in_child = close_in_child;
        spec.parent_only_kept = worker_end;
    } else {
        task = make_transferable_task(&pool::forkserver_worker, PassedFd{worker_end},
                                      PassedFd{page.get()}, std::uint64_t{page_bytes});
        spec.task = &*task;
    }
    w->started_at = Clock::now();
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
    get_logger().debug("added worker");
    std::lock_guard lock(mu);
    workers.push_back(std::move(w));
}

// Shuts the socket for writing: the worker reads end of file once it has run what it holds.
void PoolEngine::Impl::close_input(pool::Worker& w) {
    if (w.closing || !w.sock) return;
    if (!w.out.empty()) return;  // the rest of its work is still on the way
    w.closing = true;
    ::shutdown(w.sock.get(), SHUT_WR);
}

// terminate_workers() / kill_workers(), after cancel_pending(): as Python 3.14's
// _force_shutdown, the pool is broken (no replacement starts, submit raises) and what the
// workers were running fails with BrokenProcessPool. Then each worker gets `sig`, and the loop
// reaps them as they end: SIGTERM lets a task's handler run, so nothing here escalates to
// SIGKILL behind the caller's back.
void PoolEngine::Impl::force_stop(int sig) {
    {
        std::lock_guard lock(mu);
        if (!broken) {
            broken = true;
            broken_reason = std::string("mp pool is broken: its workers were ") +
                            (sig == SIGKILL ? "killed (kill_workers())" : "terminated (terminate_workers())");
        }
    }
    fail_all(std::make_exception_ptr(BrokenProcessPool(broken_reason_copy())));
    for (auto& w : workers)
        if (w->pidfd) (void)sys::pidfd_send_signal(w->pidfd.get(), sig);
}

void PoolEngine::Impl::kill_all() {
    for (auto& w : workers)
        if (w->pidfd) sys::pidfd_send_signal(w->pidfd.get(), SIGKILL);
}

// Kills every worker and waits for each to end (the pool is going, or could not start).
void PoolEngine::Impl::kill_and_reap_all() {
    kill_all();
    while (!workers.empty()) wait_exit(*workers.front(), true);
}

// Waits for the end of a worker known to have ended (its pidfd polled readable) or to be
// ending (killed), and returns its status, if known.
std::optional<int> PoolEngine::Impl::exit_status(pool::Worker& w) {
    if (w.forked) {
        try {
            return sys::pidfd_wait(w.pidfd.get(), false);
        } catch (const std::system_error& e) {
            // ECHILD: reaped by someone else (SIGCHLD ignored, or a waitpid(-1) elsewhere in the
            // program; a blocking wait fails so only once the child has ended) on a kernel that
            // kept no status for its pidfd (before Linux 6.15). It has ended, how is unknown: the
            // pool goes on and replaces it, as after any other end.
            if (e.code().value() != ECHILD) throw;
            (void)sys::pidfd_wait_exit(w.pidfd.get(), std::nullopt);
            return std::nullopt;
        }
    }
    // Until its pidfd says so it may still run (a helper's socket closing proves nothing).
    (void)sys::pidfd_wait_exit(w.pidfd.get(), std::nullopt);
    // The forkserver reaps it and sends the status at once, unless the server is stopped or
    // gone: then the status is unknown, and the pool must not wait for it.
    if (!sys::wait_fd(w.status.get(), POLLIN, std::chrono::milliseconds(200))) return std::nullopt;
    return forkserver::read_status(w.status.get());
}

// The worker has ended (or is being made to): reap it, read what it sent, settle its tasks.
void PoolEngine::Impl::wait_exit(pool::Worker& w, bool terminating) {
    // Dead first: only then are its slot and stage final.
    const int status = exit_status(w).value_or(WorkerDied::unknown_status);
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
    const bool unasked = !w.retiring && !w.closing && w.timed_out == 0 && !w.stopped_in_initializer && !terminating;
    if (unasked) death_count.fetch_add(1, std::memory_order_relaxed);
    if (unasked && cfg.break_on_worker_death && !is_broken()) {
        // Python's behaviour: every unfinished future, the dead worker's own too, fails
        // with BrokenProcessPool.
        break_pool("a worker, " + w.name + " (pid " + std::to_string(w.pid) + "), " +
                   describe_status(status) + "; the pool is not usable any more");
    }
    std::deque<pool::JobPtr> again;
    for (auto& job : w.inflight) {
        std::exception_ptr e;
        if (terminating) {
            e = std::make_exception_ptr(BrokenProcessPool("the pool was terminated"));
        } else if (const auto r = job->take_back(); r == pool::Job::Back::taken &&
                                                   !(w.timed_out == job->ordinal &&
                                                     ++job->extra().unstarted_timeouts >= pool::kUnstartedTimeouts)) {
            again.push_back(std::move(job));  // never started
            continue;
        } else if (r == pool::Job::Back::cancelled) {
            running_count.fetch_sub(1, std::memory_order_relaxed);
            cancelled_count.fetch_add(1, std::memory_order_relaxed);
            continue;
        } else if (r == pool::Job::Back::taken) {
            // Never started, and killed for its time limit once too often (above).
            e = std::make_exception_ptr(TimeoutError(
                "the task's time limit passed before " + std::to_string(pool::kUnstartedTimeouts) +
                " workers in turn could start it; the last, " + w.name + " (pid " +
                std::to_string(w.pid) + "), was killed"));
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
    // runs (by the OOM killer, say) would be replaced for ever: a hundred break the pool. An
    // end no one can tell (unknown_status) counts as a kill: it is not known to be a crash.
    const bool start_failed =
        unasked && !was_ready &&
        (status == -SIGKILL || status == WorkerDied::unknown_status
             ? cfg.initializer && ++start_kills >= 100
             : ++start_crashes >= 3);
    if (start_failed) {
        break_pool("workers die as they start (the last, " + name + " (pid " + std::to_string(pid) +
                   "), " + describe_status(status) + ")");
    }
}

}  // namespace detail
}  // namespace mp

#if defined(__SANITIZE_ADDRESS__)
// LeakSanitizer asks this (weak, so a program's own definition wins) before its exit-time check.
extern "C" __attribute__((weak)) int __lsan_is_turned_off() {
    return mp::detail::pool::g_forked_from_thread;
}
#endif
