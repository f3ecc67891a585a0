// A pool's scheduling: which worker gets the next task and how many it may hold, tasks out and
// answers in, taking back what a busy or stalled worker has not started, and task deadlines.

#include <signal.h>

#include <algorithm>
#include <cstring>

#include "mp/futures.hpp"
#include "mp/util.hpp"
#include "pool_engine_impl.hpp"
#include "sys/pidfd.hpp"

namespace mp::detail {

// How long the worker has been inside its current task (zero when between tasks).
std::chrono::nanoseconds PoolEngine::Impl::busy_for(const pool::Worker& w, Clock::time_point now) const {
    const auto& slot = slots[w.slot];
    const std::uint64_t started = slot.started.load(std::memory_order_acquire);
    if (started <= slot.finished.load(std::memory_order_acquire)) return std::chrono::nanoseconds::zero();
    const Clock::time_point at{Clock::duration(slot.started_at.load(std::memory_order_relaxed))};
    return now > at ? std::chrono::duration_cast<std::chrono::nanoseconds>(now - at) : std::chrono::nanoseconds::zero();
}

bool PoolEngine::Impl::has_idle_worker() const {
    for (auto& w : workers)
        if (w->inflight.empty() && !w->retiring && !w->closing && w->timed_out == 0 && w->ready && !w->stalled)
            return true;
    return false;
}

// Takes back, from the end of its queue, every task `w` has not started; they go to the
// front of `pending` in their order. One that cancel() withdrew stays until `w` skips it.
bool PoolEngine::Impl::take_back_queued(pool::Worker& w) {
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
bool PoolEngine::Impl::take_back(Clock::time_point now) {
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
void PoolEngine::Impl::take_back_stalled(Clock::time_point now) {
    for (auto& w : workers) {
        if (w->stalled || !w->head_since || now < stall_due(*w)) continue;
        pool::Job& head = *w->inflight.front();
        if (head.started_in_worker()) {
            (void)head.set_running();  // its started frame may still be on the way
            continue;
        }
        w->stalled = true;
        take_back_queued(*w);
    }
}

void PoolEngine::Impl::dispatch() {
    const auto now = Clock::now();
    assign_pending(now);
    if (pending.empty() && take_back(now)) assign_pending(now);
}

void PoolEngine::Impl::assign_pending(Clock::time_point now) {
    // A worker whose initializer overran a task's time limit gets tasks only when every
    // worker is such a one: a task waiting for it would likely fail the same way.
    bool all_overran = false;
    if (cfg.initializer && !pending.empty())
        all_overran = std::all_of(workers.begin(), workers.end(), [](auto& w) { return w->init_overran && !w->ready; });
    while (!pending.empty()) {
        pool::Worker* best = nullptr;
        std::size_t best_room = 0;
        for (auto& w : workers) {
            if (w->retiring || w->closing || w->timed_out != 0 || w->stalled) continue;
            if (w->init_overran && !w->ready && !all_overran) continue;
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

void PoolEngine::Impl::assign(pool::Worker& w, pool::JobPtr job, Clock::time_point now) {
    const std::uint64_t ordinal = w.next_ordinal;
    if (!job->place(slots[w.slot], ordinal)) {
        job->release_descriptors();
        cancelled_count.fetch_add(1, std::memory_order_relaxed);  // cancelled while pending
        return;
    }
    ++w.next_ordinal;
    ++w.sent;
    std::vector<int> fds;
    if (job->extras)
        for (auto& fd : job->extras->fds) fds.push_back(fd.get());
    w.out.add(pool::FrameType::task, job->timeout(cfg) ? pool::kTimed : 0, ordinal,
              job->bytes.view(), {}, std::move(fds));
    // The job keeps its bytes and descriptors until it finishes: a worker that dies before
    // starting it hands it back to be sent again.
    w.inflight.push_back(std::move(job));
    w.assigned.store(w.inflight.size(), std::memory_order_relaxed);
    running_count.fetch_add(1, std::memory_order_relaxed);
    if (w.inflight.size() == 1) new_head(w, now);
}

// The head of w's queue has changed (or w became ready): it is due from now.
void PoolEngine::Impl::new_head(pool::Worker& w, Clock::time_point now) {
    // The head's time limit from now, if it has one; false if not.
    auto arm = [&](const pool::Job& head) {
        const auto timeout = head.timeout(cfg);
        if (!timeout) return false;
        w.deadline = now + *timeout;
        w.deadline_ordinal = head.ordinal;
        return true;
    };
    if (w.inflight.empty() || !w.ready) {
        w.head_since.reset();
        if (w.inflight.empty() && !w.stalled) w.deadline.reset();
        // A worker still in its initializer: the head's time limit counts from now all the
        // same (the initializer counts against it), so a task waiting for an initializer that
        // never returns still ends (fail_overdue_in_initializer). Armed once per task.
        if (!w.inflight.empty() && cfg.initializer && w.deadline_ordinal != w.inflight.front()->ordinal)
            (void)arm(*w.inflight.front());
        return;
    }
    const pool::Job& head = *w.inflight.front();
    if (w.head_since && w.head_ordinal == head.ordinal) return;
    w.head_since = now;
    w.head_ordinal = head.ordinal;
    if (w.deadline && w.deadline_ordinal == head.ordinal) return;  // armed while in the initializer
    if (!arm(head)) w.deadline.reset();
}

void PoolEngine::Impl::send(pool::Worker& w) {
    if (!w.sock || w.out.empty()) return;
    const std::size_t before = w.out.unsent();
    try {
        (void)w.out.flush(w.sock.get());
    } catch (const std::system_error&) {
        // The worker has gone; its end will be seen on its exit descriptor.
    }
    if (w.out.unsent() < before) w.last_sent = Clock::now();
}

void PoolEngine::Impl::receive(pool::Worker& w) {
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

void PoolEngine::Impl::handle(pool::Worker& w, pool::Frame& f) {
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
            job->release_descriptors();
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
            // The worker counts towards max_tasks_per_child only what it ran: counted here, the
            // worker would wait for a task the pool thinks it has no room for, never retiring.
            --w.sent;
            // Cancelled while queued in it; one taken back for another worker is gone already.
            if (!w.inflight.empty() && w.inflight.front()->ordinal == f.ordinal) {
                w.inflight.front()->release_descriptors();
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
void PoolEngine::Impl::next_head(pool::Worker& w) {
    new_head(w, Clock::now());
    if (!w.inflight.empty() && w.inflight.front()->started_in_worker()) (void)w.inflight.front()->set_running();
}

void PoolEngine::Impl::check_deadlines() {
    const auto now = Clock::now();
    for (auto& w : workers) {
        if (!w->deadline || *w->deadline > now) continue;
        if (!w->ready && fail_overdue_in_initializer(*w)) continue;
        w->timed_out = w->deadline_ordinal;
        w->deadline.reset();
        if (w->pidfd) sys::pidfd_send_signal(w->pidfd.get(), SIGKILL);
    }
}

// The task at the head of w's queue passed its time limit while w was still in its initializer:
// it fails with TimeoutError, and w gives back the rest of its queue for other workers. w is not
// killed: a slow initializer is no fault, and a replacement would run it again from the start;
// but it gets no more tasks while another worker can take them, and shutdown does not wait for
// its initializer (stop_stuck_initializers). False when the head has started after all (its
// ready frame still on the way): then it is an overrunning task like any other.
bool PoolEngine::Impl::fail_overdue_in_initializer(pool::Worker& w) {
    if (w.inflight.empty() || w.inflight.front()->ordinal != w.deadline_ordinal) return false;
    pool::JobPtr head = w.inflight.front();
    const auto r = head->take_back();
    if (r == pool::Job::Back::started) return false;
    w.inflight.pop_front();
    running_count.fetch_sub(1, std::memory_order_relaxed);
    if (r == pool::Job::Back::cancelled) {
        cancelled_count.fetch_add(1, std::memory_order_relaxed);
    } else {
        failed_count.fetch_add(1, std::memory_order_relaxed);
        head->release_descriptors();
        (void)head->set_exception(std::make_exception_ptr(TimeoutError(
            "the task's time limit passed while its worker, " + w.name + " (pid " + std::to_string(w.pid) +
            "), was still in the pool's initializer; the worker was left to finish it")));
    }
    // The rest: none can have started either. Taken back to the pool's queue, or, cancelled
    // while queued here, settled now: w may never read them (it skips them if it does).
    take_back_queued(w);
    for (const auto& job : w.inflight) {
        (void)job;
        running_count.fetch_sub(1, std::memory_order_relaxed);
        cancelled_count.fetch_add(1, std::memory_order_relaxed);
    }
    w.inflight.clear();
    w.assigned.store(0, std::memory_order_relaxed);
    w.head_since.reset();
    w.deadline.reset();
    w.init_overran = true;
    return true;
}

// When shutdown stops waiting for w's initializer: the pool's task_timeout after w was
// launched (the bound the user set on a task's wait, its initializer included); none without
// one (Python's pools wait for every initializer).
std::optional<PoolEngine::Impl::Clock::time_point> PoolEngine::Impl::initializer_limit(const pool::Worker& w) const {
    if (w.ready || !cfg.initializer || !cfg.task_timeout || cfg.task_timeout->count() <= 0) return std::nullopt;
    const auto left = Clock::time_point::max() - w.started_at;
    return w.started_at + std::min<Clock::duration>(left, std::chrono::duration_cast<Clock::duration>(*cfg.task_timeout));
}

// Shutting down with nothing left to run: a worker still in its initializer that has overrun a
// task's time limit, or the pool's task_timeout since it was launched, is killed rather than
// waited for (it would only read its end of input and exit). A killed initializer is cut short.
void PoolEngine::Impl::stop_stuck_initializers(Clock::time_point now) {
    for (auto& w : workers) {
        if (w->ready || w->stopped_in_initializer || !w->pidfd) continue;
        const auto limit = initializer_limit(*w);
        if (!w->init_overran && !(limit && *limit <= now)) continue;
        w->stopped_in_initializer = true;
        get_logger().debug("killing " + w->name + ", still in the initializer at shutdown");
        sys::pidfd_send_signal(w->pidfd.get(), SIGKILL);
    }
}

// shutdown(cancel_futures): every task no worker has started, queued in a worker too (the
// worker skips those and says so; they are counted then).
void PoolEngine::Impl::cancel_pending() {
    for (auto& job : pending) {
        job->release_descriptors();
        if (job->cancel()) cancelled_count.fetch_add(1, std::memory_order_relaxed);
        pending_count.fetch_sub(1, std::memory_order_relaxed);
    }
    pending.clear();
    for (auto& w : workers)
        for (auto& job : w->inflight) (void)job->cancel();
}

}  // namespace mp::detail
