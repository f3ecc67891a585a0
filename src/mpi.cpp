// mp::mpi: worker ranks that serve tasks, and the root's thread that feeds them in batches.
// One file because both ends speak the wire below and the library builds it only with MPI
// (mp::mpi), so it stays one unit beside the rest.
//
// Wire: every exchange is a "message" on one tag between the root and one worker: an 8-byte
// little-endian length, then a kind byte and its body. A message larger than
// max_message_bytes() (MPI counts are int) is sent as several MPI messages ("pieces") in a row;
// MPI keeps messages between two ranks on one tag in order, so the receiver appends the pieces
// until the length is reached.
//   root -> worker: hello [u64 root program key][u8 isolate][u64 task timeout ns, 0: none]
//                   tasks [u64 ordinal][u64 n][n bytes]...
//                   stop
//   worker -> root: ident [u64 program key][u64 pid][string host]
//                   stop (the echo of the root's stop: a serving rank's last message)
//                   results [u64 ordinal][u8 outcome][u64 run ns][u64 n][n bytes]...
//                   (outcome 1: the value; 0: an ErrorInfo; 2: the local worker died:
//                   [u64 pid][u64 status as int64][u64 n][n bytes: the rank's name])

#include "mp/mpi.hpp"

#include <link.h>
#include <mpi.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <climits>
#include <condition_variable>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <list>
#include <utility>
#include <mutex>
#include <thread>
#include <vector>

#include "mp/detail/future_core.hpp"
#include "mp/detail/pool_engine.hpp"
#include "mp/detail/task.hpp"
#include "mp/errors.hpp"
#include "mp/process.hpp"
#include "sys/error.hpp"

namespace mp::mpi {
namespace {

using Clock = std::chrono::steady_clock;
constexpr int kTag = 2917;
constexpr std::size_t kFirstWindow = 2;  // tasks a worker may hold before any answer (see limit)

enum class Kind : std::uint8_t { hello = 1, tasks = 2, stop = 3, ident = 4, results = 5 };

struct Globals {
    std::mutex mu;
    bool env_alive = false;
    bool we_initialized = false;
    bool executor_alive = false;
    bool workers_engaged = false;  // an Executor has talked to the worker ranks
    bool thread_multiple = false;  // MPI gave MPI_THREAD_MULTIPLE
    bool served = false;  // a worker rank has served (or is serving) the root
    mpi::detail::Engine* live_engine = nullptr;  // the root's live executor, if any
    // The thread of an executor destroyed on that thread (in a done callback), left to finish:
    // executor_alive stays true until it ends; the next Executor and the Environment's end join
    // it. A pointer: never destroyed joinable at exit.
    std::thread* orphan = nullptr;
    int rank = 0;
    int size = 1;
    std::size_t max_message = std::size_t{1} << 30;
};

Globals& globals();

// Joins the thread of an executor destroyed in its own done callback, if any.
void join_orphan() {
    auto& g = globals();
    std::thread* t = nullptr;
    {
        std::lock_guard lock(g.mu);
        t = std::exchange(g.orphan, nullptr);
    }
    if (t == nullptr) return;
    t->join();
    delete t;
}

Globals& globals() {
    static Globals g;
    return g;
}

std::string mpi_error_text(int rc) {
    char buf[MPI_MAX_ERROR_STRING];
    int n = 0;
    if (MPI_Error_string(rc, buf, &n) != MPI_SUCCESS) return "MPI error " + std::to_string(rc);
    return std::string(buf, static_cast<std::size_t>(n));
}

// MPI_COMM_WORLD returns errors (see Environment): a failing call names itself.
void check(int rc, const char* what) {
    if (rc != MPI_SUCCESS)
        throw BrokenProcessPool(std::string("mp::mpi: ") + what + " failed: " + mpi_error_text(rc));
}

void put_u64(std::string& s, std::uint64_t v) {
    v = mp::detail::little_endian(v);
    s.append(reinterpret_cast<const char*>(&v), sizeof v);
}

std::uint64_t get_u64(std::string_view& p) {
    std::uint64_t v;
    if (p.size() < sizeof v) throw DecodeError("mp::mpi: truncated message");
    std::memcpy(&v, p.data(), sizeof v);
    p.remove_prefix(sizeof v);
    return mp::detail::little_endian(v);
}

std::string_view get_bytes(std::string_view& p, std::uint64_t n) {
    if (p.size() < n) throw DecodeError("mp::mpi: truncated message");
    std::string_view v = p.substr(0, n);
    p.remove_prefix(n);
    return v;
}

// A byte string with its length first: [u64 n][n bytes].
void put_counted(std::string& s, std::string_view v) {
    put_u64(s, v.size());
    s += v;
}

std::string_view get_counted(std::string_view& p) { return get_bytes(p, get_u64(p)); }

// A message under construction: room for its length first, then the kind.
std::string start_message(Kind kind) {
    std::string s(8, '\0');
    s.push_back(static_cast<char>(kind));
    return s;
}

void seal(std::string& m) {
    const std::uint64_t n = mp::detail::little_endian(std::uint64_t{m.size() - 8});
    std::memcpy(m.data(), &n, sizeof n);
}

// The pieces of a sealed message: [offset, length) each at most max_message bytes.
template <class Fn>
void for_each_piece(const std::string& m, Fn&& fn) {
    const std::size_t max = globals().max_message;
    for (std::size_t off = 0; off < m.size(); off += max)
        fn(m.data() + off, static_cast<int>(std::min(max, m.size() - off)));
}

void send_blocking(std::string& m, int dest) {
    seal(m);
    for_each_piece(m, [&](const char* p, int n) {
        check(MPI_Send(p, n, MPI_BYTE, dest, kTag, MPI_COMM_WORLD), "MPI_Send");
    });
}

// Receives one piece that MPI_(I)probe found (`status`), appending it to `into`.
void recv_piece(std::string& into, const MPI_Status& status) {
    int count = 0;
    check(MPI_Get_count(&status, MPI_BYTE, &count), "MPI_Get_count");
    const std::size_t at = into.size();
    into.resize(at + static_cast<std::size_t>(count));
    check(MPI_Recv(into.data() + at, count, MPI_BYTE, status.MPI_SOURCE, kTag, MPI_COMM_WORLD,
                   MPI_STATUS_IGNORE),
          "MPI_Recv");
}

// Bytes still missing from a message whose first pieces are in `m`; throws on a bad length.
std::size_t missing(const std::string& m) {
    if (m.size() < 9) throw DecodeError("mp::mpi: a message shorter than its header");
    std::string_view p(m);
    const std::uint64_t n = get_u64(p);
    if (n + 8 < m.size()) throw DecodeError("mp::mpi: a message longer than its header says");
    return static_cast<std::size_t>(n + 8 - m.size());
}

// Waits politely: spins (yielding) briefly, then sleeps up to a millisecond, so an idle rank
// does not take a core from the ranks that work (Open MPI's blocking calls busy-poll).
class Backoff {
public:
    void reset() noexcept { idle_ = 0; }
    void pause() {
        if (++idle_ < 200) {
            std::this_thread::yield();
            return;
        }
        const long us = std::min<long>(1000, 10L * (idle_ - 199));
        std::this_thread::sleep_for(std::chrono::microseconds(us));
    }

private:
    long idle_ = 0;
};

// Waits for the next piece from `source` (MPI_ANY_SOURCE: any rank), probing with the backoff
// above; returns its status.
MPI_Status probe_blocking(int source) {
    Backoff backoff;
    while (true) {
        int flag = 0;
        MPI_Status st;
        check(MPI_Iprobe(source, kTag, MPI_COMM_WORLD, &flag, &st), "MPI_Iprobe");
        if (flag) return st;
        backoff.pause();
    }
}

// A whole message from `source` (blocking).
std::string recv_blocking(int source) {
    std::string m;
    while (true) {
        MPI_Status st = probe_blocking(source);
        recv_piece(m, st);
        if (missing(m) == 0) return m;
    }
}

std::string host_name() {
    char buf[256] = {};
    if (::gethostname(buf, sizeof buf - 1) != 0) return "?";
    return buf;
}

int first_exec_segment(dl_phdr_info* info, std::size_t, void* out) {
    for (int i = 0; i < info->dlpi_phnum; ++i) {
        const ElfW(Phdr)& ph = info->dlpi_phdr[i];
        if (ph.p_type == PT_LOAD && (ph.p_flags & PF_X) != 0) {
            *static_cast<std::uintptr_t*>(out) = info->dlpi_addr + ph.p_vaddr;
            return 1;  // the first module is the program itself
        }
    }
    return 1;
}

// ---- a worker rank --------------------------------------------------------------------------

// How long a finished task's answer may wait for others to share its message.
constexpr auto kResultDelay = std::chrono::milliseconds(1);

// A worker's answers on their way to the root: each is [ordinal][outcome][nanoseconds it took]
// [length][bytes]. They leave when 1 MiB has gathered, when the oldest has waited kResultDelay,
// and at the end of each batch of tasks. A task that runs long must not hold back the answers
// gathered before it (the root cannot know how long a task will take), so while a task runs a
// flusher thread sends them once they are due: the rank's only MPI calls then are that send
// and the task's own (MPI_THREAD_MULTIPLE). Where MPI gives only MPI_THREAD_SERIALIZED and the
// task runs in the rank itself, they leave before each task starts instead.
//
// The rank's thread calls MPI only while no task is marked running, and the flusher only while
// one is, both under mu_: their calls never overlap.
class ResultBatch {
public:
    ResultBatch() : thread_([this] { flusher(); }) {}
    ~ResultBatch() {
        {
            std::lock_guard lock(mu_);
            quit_ = true;
        }
        cv_.notify_one();
        thread_.join();
    }
    ResultBatch(const ResultBatch&) = delete;
    ResultBatch& operator=(const ResultBatch&) = delete;

    /// A task is about to run (or, with isolate_tasks, the rank is about to wait for one).
    /// `concurrent_mpi`: the flusher may call MPI meanwhile; otherwise what is gathered leaves now.
    void task_starts(bool concurrent_mpi) {
        std::unique_lock lock(mu_);
        rethrow_locked();
        if (!concurrent_mpi) {
            flush_locked();
            return;
        }
        running_ = true;
        // Woken only from its untimed wait: one already waiting for a due time needs no news.
        if (!out_.empty() && idle_) {
            lock.unlock();
            cv_.notify_one();
        }
    }

    /// The answer of the task that ran (ends the running mark).
    void add(std::uint64_t ordinal, std::uint8_t outcome, Clock::duration took,
             const std::string& result, Clock::time_point now) {
        std::lock_guard lock(mu_);
        running_ = false;
        rethrow_locked();
        if (out_.empty()) {
            out_ = start_message(Kind::results);
            first_ = now;
        }
        put_u64(out_, ordinal);
        out_.push_back(static_cast<char>(outcome));
        put_u64(out_, static_cast<std::uint64_t>(
                          std::chrono::duration_cast<std::chrono::nanoseconds>(took).count()));
        put_counted(out_, result);
        if (out_.size() > (1u << 20) || now - first_ >= kResultDelay) flush_locked();
    }

    void flush() {
        std::lock_guard lock(mu_);
        running_ = false;
        rethrow_locked();
        flush_locked();
    }

private:
    void flush_locked() {
        if (out_.empty()) return;
        send_blocking(out_, 0);
        out_.clear();
    }
    void rethrow_locked() {
        if (error_) std::rethrow_exception(std::exchange(error_, nullptr));
    }
    void flusher() {
        std::unique_lock lock(mu_);
        while (!quit_) {
            if (!running_ || out_.empty()) {
                idle_ = true;
                cv_.wait(lock);
                idle_ = false;
                continue;
            }
            const Clock::time_point due = first_ + kResultDelay;
            if (Clock::now() < due) {
                cv_.wait_until(lock, due);
                continue;
            }
            try {
                flush_locked();
            } catch (...) {
                // MPI failed: the rank's thread reports it at its next add or flush.
                error_ = std::current_exception();
                out_.clear();
            }
        }
    }

    std::mutex mu_;
    std::condition_variable cv_;
    std::string out_;             // under mu_
    Clock::time_point first_;     // under mu_: when the oldest answer in out_ was added
    bool running_ = false;        // under mu_: a task runs; the flusher may send
    bool quit_ = false;           // under mu_
    bool idle_ = false;           // under mu_: the flusher waits for a task with answers out
    std::exception_ptr error_;    // under mu_: the flusher's failure
    std::thread thread_;          // last: starts once the rest is ready
};

class Server {
public:
    int run() {
        auto& g = globals();
        current_process().name = "MPIRank-" + std::to_string(g.rank) + "@" + host_name();
        while (true) {
            std::string m = recv_blocking(0);
            std::string_view p(m);
            p.remove_prefix(8);
            const auto kind = static_cast<Kind>(p.front());
            p.remove_prefix(1);
            switch (kind) {
                case Kind::hello: {
                    root_matches_ = get_u64(p) == mpi::detail::program_key();
                    const bool isolate = get_bytes(p, 1).front() != 0;
                    const std::uint64_t timeout_ns = get_u64(p);
                    // A new executor: its own local pool (or none); the last one's goes.
                    local_.reset();
                    if (isolate && root_matches_) {
                        mp::detail::PoolConfig c;
                        c.workers = 1;
                        c.worker_name = "MPIRank-" + std::to_string(g.rank) + "-Worker";
                        c.daemon_workers = false;  // an executor's: see ProcessPoolExecutor
                        if (timeout_ns != 0) c.task_timeout = std::chrono::nanoseconds(timeout_ns);
                        local_ = std::make_unique<mp::detail::PoolEngine>(std::move(c));
                    }
                    std::string r = start_message(Kind::ident);
                    put_u64(r, mpi::detail::program_key());
                    put_u64(r, static_cast<std::uint64_t>(::getpid()));
                    r += host_name();
                    send_blocking(r, 0);
                    break;
                }
                case Kind::tasks:
                    run_tasks(p);
                    break;
                case Kind::stop: {
                    std::string r = start_message(Kind::stop);  // the last message: see ~Environment
                    send_blocking(r, 0);
                    return 0;
                }
                default:
                    throw DecodeError("mp::mpi: an unknown message from the root");
            }
        }
    }

private:
    void run_tasks(std::string_view p) {
        if (local_) return run_isolated(p);
        const bool concurrent_mpi = globals().thread_multiple;
        while (!p.empty()) {
            const std::uint64_t ordinal = get_u64(p);
            const std::string_view task = get_counted(p);
            batch_.task_starts(concurrent_mpi);
            const auto begin = Clock::now();
            std::string result;
            std::uint8_t ok = 1;
            try {
                if (!root_matches_)
                    throw Error("mp::mpi: this rank runs a different binary from the root's");
                result = mp::detail::run_task(task, {}, mp::detail::TaskResult::sent);
            } catch (...) {
                ok = 0;
                Encoder e;
                mp::detail::encode_current_exception(e);
                result = e.take();
            }
            const auto end = Clock::now();
            batch_.add(ordinal, ok, end - begin, result, end);
        }
        batch_.flush();
        std::fflush(stdout);
        std::fflush(stderr);
    }

    // The tasks of a batch go to the local worker process together; answers return in order.
    void run_isolated(std::string_view p) {
        struct Item {
            std::uint64_t ordinal;
            std::shared_ptr<mp::detail::FutureCore> core;
            Clock::time_point submitted;
        };
        std::vector<Item> items;
        while (!p.empty()) {
            const std::uint64_t ordinal = get_u64(p);
            const std::string_view task = get_counted(p);
            items.push_back({ordinal, local_->submit(mp::detail::Task{std::string(task), {}}, {}), Clock::now()});
        }
        for (Item& it : items) {
            // The rank only waits here, making no MPI call: the flusher may send meanwhile.
            batch_.task_starts(true);
            it.core->wait(std::nullopt);
            const auto end = Clock::now();
            std::string result;
            std::uint8_t outcome = 1;
            if (auto e = it.core->error()) {
                try {
                    std::rethrow_exception(e);
                } catch (const WorkerDied& d) {
                    outcome = 2;
                    put_u64(result, static_cast<std::uint64_t>(d.pid()));
                    const int status = d.signal() ? -*d.signal() : d.exit_code().value_or(WorkerDied::unknown_status);
                    put_u64(result, static_cast<std::uint64_t>(static_cast<std::int64_t>(status)));
                    // Whose worker it was ("MPIRank-2@host"): the root's pid means nothing there.
                    put_counted(result, current_process().name);
                } catch (...) {
                    outcome = 0;
                    Encoder enc;
                    mp::detail::encode_current_exception(enc);
                    result = enc.take();
                }
            } else {
                result = it.core->bytes();
            }
            batch_.add(it.ordinal, outcome, end - it.submitted, result, end);
        }
        batch_.flush();
    }

    bool root_matches_ = false;
    std::unique_ptr<mp::detail::PoolEngine> local_;  // with isolate_tasks
    ResultBatch batch_;
};

}  // namespace

// ---- Environment ----------------------------------------------------------------------------

namespace {
void init_mpi(int* argc, char*** argv) {
    auto& g = globals();
    std::lock_guard lock(g.mu);
    if (g.env_alive) throw Error("mp::mpi: only one Environment may exist");
    // MPI cannot start again once finalised (an earlier Environment ended, or the program called
    // MPI_Finalize): any MPI call but a few would make the library abort the job.
    int finalized = 0;
    MPI_Finalized(&finalized);
    if (finalized)
        throw Error("mp::mpi: MPI was already finalised (by an earlier Environment or MPI_Finalize); "
                    "it cannot be initialised again in this process");
    int inited = 0;
    MPI_Initialized(&inited);
    int provided = MPI_THREAD_SINGLE;
    if (!inited) {
        if (MPI_Init_thread(argc, argv, MPI_THREAD_MULTIPLE, &provided) != MPI_SUCCESS)
            throw Error("mp::mpi: MPI_Init_thread failed");
        g.we_initialized = true;
    } else {
        MPI_Query_thread(&provided);
    }
    if (provided < MPI_THREAD_SERIALIZED) {
        if (g.we_initialized) MPI_Finalize();
        g.we_initialized = false;
        throw Error("mp::mpi: the MPI library does not give MPI_THREAD_SERIALIZED");
    }
    // Errors come back as codes (then exceptions) instead of the default abort, where the MPI
    // library can go on at all.
    MPI_Comm_set_errhandler(MPI_COMM_WORLD, MPI_ERRORS_RETURN);
    g.thread_multiple = provided >= MPI_THREAD_MULTIPLE;
    g.served = false;
    MPI_Comm_rank(MPI_COMM_WORLD, &g.rank);
    MPI_Comm_size(MPI_COMM_WORLD, &g.size);
    if (const char* s = std::getenv("MP_MPI_MAX_MESSAGE")) {
        char* end = nullptr;
        const unsigned long long v = std::strtoull(s, &end, 10);
        if (end != s && *end == '\0' && v >= 64 && v <= static_cast<unsigned long long>(INT_MAX))
            g.max_message = static_cast<std::size_t>(v);
    }
    g.env_alive = true;
}

// On the root, after the stops: reads and drops what the worker ranks still send until each
// has echoed its stop. Answers nobody waits for any more (an executor that broke, or whose
// constructor failed) would otherwise leave a rank blocked in MPI_Send of a large one, never
// reading its stop, and every rank waiting in MPI_Finalize. Only once an Executor has talked to
// the ranks (a program whose other ranks never serve must not wait here for an echo).
void drain_until_stopped(int expected) {
    auto& g = globals();
    std::vector<std::string> partial(static_cast<std::size_t>(g.size));
    while (expected > 0) {
        MPI_Status st = probe_blocking(MPI_ANY_SOURCE);
        if (st.MPI_SOURCE < 1 || st.MPI_SOURCE >= g.size)
            throw DecodeError("mp::mpi: a message from an unknown rank");
        std::string& m = partial[static_cast<std::size_t>(st.MPI_SOURCE)];
        recv_piece(m, st);
        if (missing(m) != 0) continue;
        if (static_cast<Kind>(m[8]) == Kind::stop) --expected;
        m.clear();
    }
}

// A worker rank's service until the root's stop; a failure ends the job (MPI_Abort).
int serve_until_stopped(int rank) noexcept {
    globals().served = true;
    try {
        return Server().run();
    } catch (const std::exception& e) {
        // The protocol is broken (or MPI failed): nothing sensible is left to do but end the job.
        std::fprintf(stderr, "mp::mpi: rank %d: %s\n", rank, e.what());
    } catch (...) {
        std::fprintf(stderr, "mp::mpi: rank %d: an unknown exception\n", rank);
    }
    std::fflush(stderr);
    MPI_Abort(MPI_COMM_WORLD, 3);
    return 3;
}
}  // namespace

Environment::Environment(int& argc, char**& argv) { init_mpi(&argc, &argv); }
Environment::Environment() { init_mpi(nullptr, nullptr); }

Environment::~Environment() {
    auto& g = globals();
    mpi::detail::Engine* live = nullptr;
    {
        std::lock_guard lock(g.mu);
        live = g.live_engine;
    }
    // An executor that outlives its Environment (destroy executors first): its thread must be
    // done with MPI before the workers stop and MPI ends; so must one left to finish detached.
    if (live != nullptr) live->shutdown(true, false);
    join_orphan();
    // A worker rank that returned from main without serving: the root may be waiting for its
    // answer to an executor's hello, and it always sends a stop at its end. Serve until that
    // stop, so neither rank waits for the other for ever (the one in MPI_Finalize, the other
    // for an answer).
    if (g.rank != 0 && !g.served) serve_until_stopped(g.rank);
    if (g.rank == 0) {
        int stopped = 0;
        for (int r = 1; r < g.size; ++r) {
            std::string m = start_message(Kind::stop);
            try {
                send_blocking(m, r);
                ++stopped;
            } catch (const std::exception& e) {
                std::fprintf(stderr, "mp::mpi: could not stop rank %d: %s\n", r, e.what());
            }
        }
        if (g.workers_engaged) {
            try {
                drain_until_stopped(stopped);
            } catch (const std::exception& e) {
                std::fprintf(stderr, "mp::mpi: while stopping the worker ranks: %s\n", e.what());
            }
        }
    }
    std::lock_guard lock(g.mu);
    g.env_alive = false;
    if (g.we_initialized) MPI_Finalize();
    g.we_initialized = false;
}

int Environment::rank() const noexcept { return globals().rank; }
int Environment::size() const noexcept { return globals().size; }

int Environment::serve() {
    if (is_root()) throw Error("mp::mpi: rank 0 runs the program; only the other ranks serve");
    // The root stops each rank once: a second serve() would wait for ever.
    if (globals().served) return 0;
    return serve_until_stopped(rank());
}

int run(int& argc, char**& argv, const std::function<int()>& root_main) {
    Environment env(argc, argv);
    if (!env.is_root()) return env.serve();
    try {
        return root_main();
    } catch (const std::exception& e) {
        std::fprintf(stderr, "mp::mpi: rank 0: %s\n", e.what());
    } catch (...) {
        std::fprintf(stderr, "mp::mpi: rank 0: an unknown exception\n");
    }
    return 1;
}

// ---- the root's engine ----------------------------------------------------------------------

namespace detail {

std::uint64_t program_key() {
    static const std::uint64_t key = [] {
        std::uintptr_t addr = 0;
        dl_iterate_phdr(first_exec_segment, &addr);
        if (addr == 0) throw Error("mp::mpi: cannot find the program's code");
        return mp::detail::code_ref(addr).module;
    }();
    return key;
}

std::size_t max_message_bytes() noexcept { return globals().max_message; }

struct Engine::Impl {
    struct Job {
        std::shared_ptr<mp::detail::FutureCore> core;
        std::string bytes;
        std::uint64_t ordinal = 0;
        std::size_t size = 0;  // of bytes, which are dropped once sent
        Clock::time_point sent_at{};  // when it left for its worker
    };
    struct Worker {
        int rank = 0;
        std::deque<Job> inflight;
        std::size_t inflight_bytes = 0;
        double avg_ns = 0;  // per task, as the worker measured it
        std::size_t window = kFirstWindow;  // tasks it may hold whatever the estimate says
        std::string partial;  // a message whose later pieces have not arrived
    };
    struct Send {
        MPI_Request request;
        std::shared_ptr<std::string> keep;
    };

    std::mutex mu;
    std::condition_variable cv;
    std::deque<Job> pending;  // under mu
    bool stopping = false;    // under mu
    bool broken = false;      // under mu
    std::string broken_why;   // under mu
    std::uint64_t next_ordinal = 1;
    std::vector<Worker> workers;
    std::size_t turn = 0;  // the worker offered work first when loads tie
    std::list<Send> sends;
    std::thread thread;
    std::mutex join_mu;  // shutdown(wait) may come from several threads at once
    // Set when the Engine is destroyed on its own thread: the detached thread owns the state.
    std::shared_ptr<Impl> keep_alive;

    void main() {
        try {
            loop();
        } catch (const std::exception& e) {
            fail_all(e.what());
        }
    }

    // How many tasks a worker may hold (queued or running). Two bounds, the smaller wins:
    // - the expected work in flight, about kBudget: enough that the worker never waits for its
    //   next batch, not so much that it hoards what an idle rank could run, or what the caller
    //   may still cancel. The expected time of a task is the worker's running average, or longer
    //   when its oldest task has been out for longer than a healthy round trip: the work has got
    //   slower, so no more goes there until answers come back.
    // - a window that grows by one per answer (doubling per round trip, as TCP's slow start) and
    //   starts again from kFirstWindow when the worker ran dry with nothing pending: the average
    //   of earlier tasks says nothing about the next burst, so a burst of slow tasks after many
    //   tiny ones goes out a few at a time instead of all to the first rank.
    // Never below kFirstWindow: one task queued behind the running one saves a round trip.
    static constexpr double kBudgetNs = 2e6;
    static constexpr double kSlowHeadNs = 2 * kBudgetNs + 1e6;  // past the answers' 1 ms delay
    static constexpr std::size_t kMaxInflight = 1024;

    static double expected_ns(const Worker& w, Clock::time_point now) {
        double est = w.avg_ns;
        if (!w.inflight.empty()) {
            const double head = static_cast<double>(
                std::chrono::duration_cast<std::chrono::nanoseconds>(now - w.inflight.front().sent_at).count());
            if (head > kSlowHeadNs) est = std::max(est, head);
        }
        return est;
    }

    static std::size_t limit(const Worker& w, Clock::time_point now) {
        const double est = expected_ns(w, now);
        const double by_time = est > 0 ? kBudgetNs / est : static_cast<double>(kMaxInflight);
        const double n = std::min(by_time, static_cast<double>(w.window));
        return static_cast<std::size_t>(
            std::clamp(n, static_cast<double>(kFirstWindow), static_cast<double>(kMaxInflight)));
    }

    // A worker that ran dry with nothing pending starts its window again (see limit). Called
    // with mu held.
    void restart_dry_windows() {
        if (!pending.empty()) return;
        for (Worker& w : workers)
            if (w.inflight.empty()) w.window = kFirstWindow;
    }

    void loop() {
        Backoff backoff;
        while (true) {
            bool progress = false;
            {
                std::unique_lock lock(mu);
                restart_dry_windows();
                const bool busy = !sends.empty() || std::any_of(workers.begin(), workers.end(), [](const Worker& w) {
                    return !w.inflight.empty() || !w.partial.empty();
                });
                if (!busy && pending.empty()) {
                    if (stopping) return;
                    cv.wait_for(lock, std::chrono::milliseconds(100));
                    continue;
                }
                progress |= dispatch(lock);
            }
            progress |= reap_sends();
            progress |= receive();
            if (progress)
                backoff.reset();
            else
                backoff.pause();
        }
    }

    // Hands pending jobs to workers with room, one batch message each: the least loaded first
    // (expected work in flight; ties in turn), each at most its share of what is pending, so a
    // burst is spread over the ranks. Called with mu held; what is not sent stays pending, and
    // cancellable.
    bool dispatch(std::unique_lock<std::mutex>& lock) {
        if (pending.empty()) return false;
        const Clock::time_point now = Clock::now();
        const std::size_t n = workers.size();
        std::vector<std::size_t> room(n, 0);
        std::vector<double> load(n, 0);
        std::vector<std::size_t> order;
        order.reserve(n);
        for (std::size_t k = 0; k < n; ++k) {
            const std::size_t i = (turn + k) % n;
            const Worker& w = workers[i];
            const std::size_t lim = limit(w, now);
            if (lim <= w.inflight.size() || w.inflight_bytes >= (8u << 20)) continue;
            room[i] = lim - w.inflight.size();
            load[i] = static_cast<double>(w.inflight.size()) * std::max(expected_ns(w, now), 1.0);
            order.push_back(i);
        }
        if (order.empty()) return false;
        turn = (turn + 1) % n;
        std::stable_sort(order.begin(), order.end(), [&](std::size_t a, std::size_t b) { return load[a] < load[b]; });
        bool any = false;
        std::size_t left = order.size();  // workers not yet offered a batch
        for (const std::size_t i : order) {
            if (pending.empty()) break;
            Worker& w = workers[i];
            const std::size_t share = (pending.size() + left - 1) / left;
            --left;
            const std::size_t take_max = std::min(room[i], share);
            auto msg = std::make_shared<std::string>(start_message(Kind::tasks));
            std::size_t taken = 0;
            while (!pending.empty() && taken < take_max &&
                   (taken == 0 || msg->size() + pending.front().bytes.size() < (4u << 20))) {
                Job job = std::move(pending.front());
                pending.pop_front();
                if (!job.core->set_running()) continue;  // cancelled meanwhile
                put_u64(*msg, job.ordinal);
                put_counted(*msg, job.bytes);
                w.inflight_bytes += job.size;
                job.bytes = std::string();
                job.sent_at = now;
                w.inflight.push_back(std::move(job));
                ++taken;
            }
            if (taken == 0) continue;
            lock.unlock();
            seal(*msg);
            for_each_piece(*msg, [&](const char* p, int len) {
                Send snd{MPI_REQUEST_NULL, msg};
                check(MPI_Isend(p, len, MPI_BYTE, w.rank, kTag, MPI_COMM_WORLD, &snd.request), "MPI_Isend");
                sends.push_back(std::move(snd));
            });
            lock.lock();
            any = true;
        }
        return any;
    }

    bool reap_sends() {
        bool any = false;
        for (auto it = sends.begin(); it != sends.end();) {
            int done = 0;
            check(MPI_Test(&it->request, &done, MPI_STATUS_IGNORE), "MPI_Test");
            if (done) {
                it = sends.erase(it);
                any = true;
            } else {
                ++it;
            }
        }
        return any;
    }

    bool receive() {
        bool any = false;
        while (true) {
            int flag = 0;
            MPI_Status st;
            check(MPI_Iprobe(MPI_ANY_SOURCE, kTag, MPI_COMM_WORLD, &flag, &st), "MPI_Iprobe");
            if (!flag) return any;
            any = true;
            if (st.MPI_SOURCE < 1 || st.MPI_SOURCE > static_cast<int>(workers.size()))
                throw DecodeError("mp::mpi: a message from an unknown rank");
            Worker& w = workers[static_cast<std::size_t>(st.MPI_SOURCE - 1)];
            recv_piece(w.partial, st);
            if (missing(w.partial) != 0) continue;
            std::string m = std::move(w.partial);
            w.partial.clear();
            handle(w, m);
        }
    }

    void handle(Worker& w, const std::string& m) {
        std::string_view p(m);
        p.remove_prefix(8);
        if (static_cast<Kind>(p.front()) != Kind::results)
            throw DecodeError("mp::mpi: unexpected message from rank " + std::to_string(w.rank));
        p.remove_prefix(1);
        while (!p.empty()) {
            const std::uint64_t ordinal = get_u64(p);
            const auto ok = static_cast<std::uint8_t>(get_bytes(p, 1).front());  // the outcome
            const std::uint64_t run_ns = get_u64(p);
            const std::string_view body = get_counted(p);
            if (w.inflight.empty() || w.inflight.front().ordinal != ordinal)
                throw DecodeError("mp::mpi: rank " + std::to_string(w.rank) +
                                  " answered a task it was not given");
            // Decoded while the job is still in flight: if the answer cannot be decoded, the
            // job is there for fail_all to fail (taken out first, its future was never completed).
            std::string value;
            std::exception_ptr error;
            if (ok == 1) {
                value = std::string(body);
            } else if (ok == 2) {
                std::string_view b = body;
                const auto pid = static_cast<pid_t>(get_u64(b));
                const auto status = static_cast<int>(static_cast<std::int64_t>(get_u64(b)));
                std::string where(get_counted(b));
                error = std::make_exception_ptr(WorkerDied(pid, status, std::move(where)));
            } else {
                Decoder d(body);
                error = mp::detail::make_remote_exception(mp::detail::decode_error_info(d));
            }
            Job job = std::move(w.inflight.front());
            w.inflight.pop_front();
            w.inflight_bytes -= job.size;
            const double ns = static_cast<double>(run_ns);
            w.avg_ns = w.avg_ns == 0 ? ns : 0.8 * w.avg_ns + 0.2 * ns;
            w.window = std::min(w.window + 1, kMaxInflight);
            // Before the future completes, so that work submitted in answer to it finds every
            // dry worker's window started again.
            if (w.inflight.empty()) {
                std::lock_guard lock(mu);
                restart_dry_windows();
            }
            if (error)
                job.core->set_exception(std::move(error));
            else
                job.core->set_result(std::move(value));
        }
    }

    void fail_all(const std::string& why) {
        std::deque<Job> jobs;
        {
            std::lock_guard lock(mu);
            broken = true;
            broken_why = why;
            jobs.swap(pending);
        }
        for (Worker& w : workers)
            for (Job& j : w.inflight) jobs.push_back(std::move(j));
        for (Job& j : jobs) {
            j.core->set_running();
            j.core->set_exception(std::make_exception_ptr(BrokenProcessPool(why)));
        }
    }
};

Engine::Engine(const ExecutorOptions& options) : impl_(std::make_unique<Impl>()) {
    if (options.task_timeout && !options.isolate_tasks)
        throw Error("mp::mpi: task_timeout needs isolate_tasks (a rank's own task cannot be killed)");
    if (options.task_timeout && options.task_timeout->count() <= 0)
        throw std::invalid_argument("mp::mpi: task_timeout must be positive");
    auto& g = globals();
    join_orphan();  // one destroyed in its own done callback is ending: its successor waits
    {
        std::unique_lock lock(g.mu);
        if (!g.env_alive) throw Error("mp::mpi: an Executor needs an mp::mpi::Environment");
        if (g.rank != 0) throw Error("mp::mpi: an Executor is made on rank 0; the other ranks serve");
        if (g.size < 2)
            throw Error("mp::mpi: an Executor needs at least 2 ranks (mpirun -n 2 or more)");
        if (g.executor_alive) throw Error("mp::mpi: only one Executor may be live at a time");
        g.executor_alive = true;
        g.workers_engaged = true;
    }
    try {
        // Every worker rank must run this very program: code travels as offsets into it.
        const std::uint64_t mine = program_key();
        for (int r = 1; r < g.size; ++r) {
            std::string m = start_message(Kind::hello);
            put_u64(m, mine);
            m.push_back(static_cast<char>(options.isolate_tasks ? 1 : 0));
            put_u64(m, options.task_timeout ? static_cast<std::uint64_t>(options.task_timeout->count()) : 0);
            send_blocking(m, r);
        }
        std::string refused;
        for (int r = 1; r < g.size; ++r) {
            std::string m = recv_blocking(r);
            std::string_view p(m);
            p.remove_prefix(8);
            if (static_cast<Kind>(p.front()) != Kind::ident)
                throw DecodeError("mp::mpi: rank " + std::to_string(r) + " did not answer hello");
            p.remove_prefix(1);
            const std::uint64_t key = get_u64(p);
            const std::uint64_t pid = get_u64(p);
            if (key != mine && refused.empty()) {
                char buf[64];
                std::snprintf(buf, sizeof buf, "%016llx, rank 0 has %016llx",
                              static_cast<unsigned long long>(key), static_cast<unsigned long long>(mine));
                refused = "mp::mpi: rank " + std::to_string(r) + " (" + std::string(p) + ", pid " +
                          std::to_string(pid) + ") runs a different binary from rank 0 (build id key " +
                          buf + "): every rank must run the same program";
            }
            Impl::Worker w;
            w.rank = r;
            impl_->workers.push_back(std::move(w));
        }
        if (!refused.empty()) throw Error(refused);
    } catch (...) {
        std::lock_guard lock(g.mu);
        g.executor_alive = false;
        throw;
    }
    workers_ = g.size - 1;
    try {
        impl_->thread = sys::start_thread("mp::mpi::Executor: could not start its thread", [impl = impl_.get()] {
            impl->main();
            // Destroyed on this thread, the Engine left the state to it: freed here, and the next
            // Executor may start once this thread is joined.
            if (std::shared_ptr<Impl> owned = std::move(impl->keep_alive)) {
                owned.reset();
                auto& gl = globals();
                std::lock_guard lock(gl.mu);
                gl.executor_alive = false;
            }
        });
    } catch (...) {
        std::lock_guard lock(g.mu);
        g.executor_alive = false;
        throw;
    }
    std::lock_guard lock(g.mu);
    g.live_engine = this;
}

Engine::~Engine() {
    auto& g = globals();
    if (impl_->thread.get_id() == std::this_thread::get_id()) {
        // The last handle went in a done callback, on the executor's own thread, which cannot
        // wait for itself: as shutdown(wait=false), the thread finishes the work and ends,
        // holding the state until then; no other Executor may start before it has.
        shutdown(false, false);
        std::lock_guard lock(g.mu);
        g.live_engine = nullptr;
        Impl* impl = impl_.get();
        g.orphan = new std::thread(std::move(impl->thread));
        impl->keep_alive = std::shared_ptr<Impl>(impl_.release());
        return;
    }
    shutdown(true, false);
    std::lock_guard lock(g.mu);
    g.executor_alive = false;
    g.live_engine = nullptr;
}

std::shared_ptr<mp::detail::FutureCore> Engine::submit(mp::detail::Task task, mp::detail::JobOptions options) {
    if (!task.fds.empty()) throw Error("mp::mpi: file descriptors cannot be sent to another rank");
    if (options.timeout) throw Error("mp::mpi: task timeouts are not supported over MPI");
    auto core = std::make_shared<mp::detail::FutureCore>();
    {
        std::lock_guard lock(impl_->mu);
        if (impl_->broken) throw BrokenProcessPool(impl_->broken_why);
        if (impl_->stopping) throw Error("mp::mpi: cannot submit after shutdown");
        const std::size_t n = task.bytes.size();
        impl_->pending.push_back(Impl::Job{core, std::move(task.bytes), impl_->next_ordinal++, n});
    }
    impl_->cv.notify_one();
    return core;
}

void Engine::shutdown(bool wait, bool cancel_pending) {
    std::deque<Impl::Job> cancelled;
    {
        std::lock_guard lock(impl_->mu);
        impl_->stopping = true;
        if (cancel_pending) cancelled.swap(impl_->pending);
    }
    impl_->cv.notify_one();
    for (auto& j : cancelled) j.core->cancel();
    if (!wait) return;
    // A done callback runs in the engine's thread, which cannot wait for itself.
    if (impl_->thread.get_id() == std::this_thread::get_id())
        throw Error("mp::mpi: shutdown(wait) from the executor's own thread (a done callback)");
    // Two threads may shut down (and so join) at once: std::thread::join is not thread-safe.
    std::lock_guard lock(impl_->join_mu);
    if (impl_->thread.joinable()) impl_->thread.join();
}

}  // namespace detail
}  // namespace mp::mpi
