// SyncManager::Pool's server side: an mp::Pool that lives in the manager's process. Clients
// encode their calls as a local Pool does (the same binary runs on both sides), so the server
// queues them as they are; a call's results wait in the server under a ticket until the client
// fetches them or lets its result handle go. Callbacks run here, as Python's manager runs the
// callbacks pickled to it.

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <exception>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <unordered_map>
#include <utility>
#include <vector>

#include "manager_internal.hpp"
#include "mp/managers.hpp"
#include "mp/pool.hpp"

namespace mp::detail::managers {

namespace {

using Clock = std::chrono::steady_clock;
using Cores = std::vector<std::shared_ptr<FutureCore>>;

// The error of a finished job: its own, or the first of its items' (their ErrorInfo bytes).
struct JobError {
    std::exception_ptr error;
    std::string item;
    explicit operator bool() const { return error || !item.empty(); }
};

JobError job_error(const FutureCore& c, std::uint64_t items) {
    if (auto e = c.error()) return {e, {}};
    if (c.state() == FutureCore::State::cancelled) return {std::make_exception_ptr(CancelledError()), {}};
    if (items != 0)
        for (const ChunkItem& it : split_chunk(c.bytes(), items))
            if (!it.ok) return {nullptr, std::string(it.bytes)};
    return {};
}

void encode_error(Encoder& e, const std::exception_ptr& error) {
    try {
        std::rethrow_exception(error);
    } catch (...) {
        encode_current_exception(e);
    }
}

// A worker's death, for the client to raise as mp::WorkerDied. ErrorInfo now carries
// WorkerDied as itself too; this older channel stays (the client reads it first), and the two
// agree.
Died died_of(const std::exception_ptr& error) {
    try {
        std::rethrow_exception(error);
    } catch (const WorkerDied& d) {
        return std::pair(std::int32_t(d.pid()), d.exit_code() ? *d.exit_code() : -*d.signal());
    } catch (...) {
        return std::nullopt;
    }
}

struct Ticket {
    Cores cores;
    std::vector<std::uint64_t> items;  // per job; 0: a single call
    // Ends when the call has (the first failure, or every job) and its callbacks have run.
    std::shared_ptr<FutureCore> done;
    // An imap's: one reader at a time takes the next chunk.
    std::mutex mu;
    std::size_t next = 0;                      // imap: the next chunk in order
    std::unique_ptr<CompletionQueue> finished;  // imap_unordered (after cores: it points into them)
};

// Runs the client's encoded callbacks with the call's outcome, in the pool's result thread (as
// Python's manager pool runs them in its result handler).
void run_callbacks(const Ticket& t, const std::string& callback, const std::string& error_callback) {
    JobError failed;
    for (std::size_t i = 0; i < t.cores.size() && !failed; ++i)
        if (t.cores[i]->done()) failed = job_error(*t.cores[i], t.items[i]);
    if (failed) {
        if (error_callback.empty()) return;
        Encoder e(error_callback);
        if (failed.error)
            encode_error(e, failed.error);
        else
            e.bytes() += failed.item;
        (void)run_task(e.bytes());
        return;
    }
    if (callback.empty()) return;
    std::vector<std::string> parts;
    for (const auto& c : t.cores) parts.push_back(c->bytes());
    Encoder e(callback);
    e.put(parts);
    e.put(t.items);
    (void)run_task(e.bytes());
}

class PoolServant {
public:
    PoolServant(PoolOptions options, std::optional<std::string> initializer)
        : pool_(Pool::Encoded{}, options,
                initializer ? std::optional<Task>(Task{std::move(*initializer), {}}) : std::nullopt) {}

    std::uint64_t submit(const std::vector<PoolJob>& jobs, OptTimeout task_timeout, std::string callback,
                         std::string error_callback) {
        auto t = start(jobs, task_timeout);
        t->done = FutureCore::when_all(t->cores);
        if (!callback.empty() || !error_callback.empty()) {
            // Holds the ticket only until the callbacks ran: no cycle once the call is over.
            t->done = t->done->after_callback(
                [t, callback = std::move(callback), error_callback = std::move(error_callback)](FutureCore&) {
                    run_callbacks(*t, callback, error_callback);
                });
        }
        return add(std::move(t));
    }
    /// imap (`ordered`) or imap_unordered: the chunks' results are taken one at a time by imap_next.
    std::uint64_t imap(const std::vector<PoolJob>& jobs, bool ordered) {
        auto t = start(jobs, std::nullopt);
        if (!ordered) {
            std::vector<FutureCore*> raw;
            for (const auto& c : t->cores) raw.push_back(c.get());
            t->finished = std::make_unique<CompletionQueue>(std::move(raw));
        }
        return add(std::move(t));
    }
    /// The next chunk of an imap (in order, or the next to finish); std::nullopt when `timeout`
    /// passed first. A chunk that failed as a whole comes back with its error.
    std::optional<IMapChunk> imap_next(std::uint64_t ticket, OptTimeout timeout) {
        auto t = find(ticket);
        std::lock_guard lk(t->mu);
        std::size_t index = 0;
        if (!t->finished) {
            if (t->next >= t->cores.size()) throw Error("imap: no more results");
            if (!wait_all({t->cores[t->next]}, timeout)) return std::nullopt;
            index = t->next++;
        } else {
            const Deadline deadline = deadline_after(Timeout(timeout));
            for (;;) {
                // In slices, as wait_all, so that a client killed while it waits frees this thread.
                Deadline slice = Clock::now() + std::chrono::milliseconds(100);
                if (deadline) slice = std::min(*slice, *deadline);
                try {
                    auto n = t->finished->next(slice);
                    if (!n) throw Error("imap: no more results");
                    index = *n;
                    break;
                } catch (const TimeoutError&) {
                    if (client_gone()) throw ClientGone();
                    if (expired(deadline)) return std::nullopt;
                }
            }
        }
        const FutureCore& c = *t->cores[index];
        if (c.error() || c.state() == FutureCore::State::cancelled) {
            const std::exception_ptr error = job_error(c, 0).error;
            Encoder e;
            encode_error(e, error);
            return IMapChunk{index, false, e.take(), died_of(error)};
        }
        return IMapChunk{index, true, c.bytes(), std::nullopt};
    }
    /// Each job's result bytes, or the worker's death that failed one; throws the first failed
    /// job's other exception, or TimeoutError.
    PoolResults get(std::uint64_t ticket, OptTimeout timeout) {
        auto t = find(ticket);
        auto all = done(*t);
        if (!wait_all({all}, timeout)) throw TimeoutError("the result did not arrive in time");
        // The first job to fail ends the wait, as Python's MapResult; else every job is done.
        if (auto e = all->error()) {
            if (Died died = died_of(e)) return {{}, died};
            std::rethrow_exception(e);
        }
        if (all->state() == FutureCore::State::cancelled) throw CancelledError();
        std::vector<std::string> out;
        for (const auto& c : t->cores) out.push_back(c->bytes());
        return {std::move(out), std::nullopt};
    }
    bool wait(std::uint64_t ticket, OptTimeout timeout) { return wait_all({done(*find(ticket))}, timeout); }
    bool ready(std::uint64_t ticket) { return done(*find(ticket))->done(); }
    /// False also when an item of a map raised (as Python's MapResult).
    bool successful(std::uint64_t ticket) {
        auto t = find(ticket);
        if (!done(*t)->done()) throw Error("the result is not ready");
        for (std::size_t i = 0; i < t->cores.size(); ++i)
            if (!t->cores[i]->done() || job_error(*t->cores[i], t->items[i])) return false;
        return true;
    }
    void forget(std::uint64_t ticket) {
        std::lock_guard lk(mu_);
        tickets_.erase(ticket);
    }
    void close() {
        std::lock_guard lk(mu_);
        pool_.close();
    }
    void terminate() {
        std::lock_guard lk(mu_);
        pool_.terminate();
    }
    // Holds the mutex while the workers finish: after close() no call needs it but get(), whose
    // results are all in by the time join() returns.
    void join() {
        std::lock_guard lk(mu_);
        pool_.join();
    }
    int processes() { return pool_.processes(); }

private:
    std::shared_ptr<Ticket> start(const std::vector<PoolJob>& jobs, OptTimeout task_timeout) {
        auto t = std::make_shared<Ticket>();
        std::lock_guard lk(mu_);
        for (const auto& [bytes, items] : jobs) {
            t->cores.push_back(pool_.submit_encoded(Task{bytes, {}}, JobOptions{task_timeout, items}));
            t->items.push_back(items);
        }
        return t;
    }
    std::uint64_t add(std::shared_ptr<Ticket> t) {
        std::lock_guard lk(mu_);
        tickets_.emplace(++next_, std::move(t));
        return next_;
    }
    std::shared_ptr<Ticket> find(std::uint64_t ticket) {
        std::lock_guard lk(mu_);
        auto it = tickets_.find(ticket);
        if (it == tickets_.end())
            throw std::out_of_range("no result " + std::to_string(ticket) + " in the managed Pool");
        return it->second;
    }
    // An imap's ticket has no `done`: its chunks are waited for one by one.
    static std::shared_ptr<FutureCore> done(const Ticket& t) {
        if (!t.done) throw Error("not the result of an apply_async or map_async");
        return t.done;
    }
    // In slices, so that a client killed while it waits does not keep its thread here.
    static bool wait_all(const Cores& cores, const OptTimeout& timeout) {
        const Deadline deadline = deadline_after(Timeout(timeout));
        for (const auto& c : cores) {
            for (;;) {
                auto slice = std::chrono::nanoseconds(std::chrono::milliseconds(100));
                if (deadline) slice = std::min(slice, std::max(std::chrono::nanoseconds(0), *deadline - Clock::now()));
                if (c->wait(slice)) break;
                if (client_gone()) throw ClientGone();
                if (deadline && Clock::now() >= *deadline) return false;
            }
        }
        return true;
    }

    std::mutex mu_;
    Pool pool_;
    std::unordered_map<std::uint64_t, std::shared_ptr<Ticket>> tickets_;
    std::uint64_t next_ = 0;
};

}  // namespace

TypeEntry pool_entry() {
    using S = PoolServant;
    TypeEntry t;
    t.serialised = false;
    t.make = [](Decoder& in) -> std::shared_ptr<void> {
        PoolOptions o;
        o.processes = in.get<std::optional<int>>();
        o.maxtasksperchild = in.get<std::uint64_t>();
        o.max_memory_per_child = in.get<std::uint64_t>();
        o.start_method = in.get<std::optional<StartMethod>>();
        o.task_timeout = in.get<OptTimeout>();
        auto init = in.get<std::optional<std::string>>();
        in.finish();
        return std::make_shared<S>(o, std::move(init));
    };
    t.methods = {{"submit", make_method(&S::submit)},       {"imap", make_method(&S::imap)},
                 {"imap_next", make_method(&S::imap_next)}, {"get", make_method(&S::get)},
                 {"wait", make_method(&S::wait)},           {"ready", make_method(&S::ready)},
                 {"successful", make_method(&S::successful)}, {"forget", make_method(&S::forget)},
                 {"close", make_method(&S::close)},         {"terminate", make_method(&S::terminate)},
                 {"join", make_method(&S::join)},           {"processes", make_method(&S::processes)}};
    return t;
}

}  // namespace mp::detail::managers
