#include "mp/detail/future_core.hpp"

#include <algorithm>
#include <any>
#include <cerrno>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <exception>
#include <filesystem>
#include <functional>
#include <future>
#include <ios>
#include <limits>
#include <memory>
#include <mutex>
#include <new>
#include <optional>
#include <regex>
#include <stdexcept>
#include <string_view>
#include <system_error>
#include <type_traits>
#include <typeinfo>
#include <unistd.h>
#include <utility>
#include <variant>
#include <vector>

#include "mp/process.hpp"
#include "mp/py.hpp"
#include "describe.hpp"
#include "mp/util.hpp"
#include "sys/fd.hpp"
#include "sys/futex.hpp"

namespace mp::detail {
namespace {

using Clock = std::chrono::steady_clock;

// now + timeout without overflow: a timeout too long to represent means "no limit".
std::optional<Clock::time_point> deadline_after(std::chrono::nanoseconds timeout) {
    const Clock::time_point now = Clock::now();
    if (timeout > Clock::time_point::max() - now) return std::nullopt;
    return now + std::chrono::duration_cast<Clock::duration>(timeout);
}

using sys::write_stderr;

// Every futex word here (WordMutex's, FutureCore's state) is touched by the threads of this
// process only.
constexpr auto kPrivate = sys::FutexScope::process_private;

// As concurrent.futures logs it (LOGGER.exception): through mp's logger, which prints errors to
// stderr until a program redirects it.
void run_callback(const std::function<void(FutureCore&)>& cb, FutureCore& core) noexcept {
    try {
        cb(core);
    } catch (const std::exception& e) {
        try {
            get_logger().error(std::string("mp: exception calling callback for future: ") +
                               e.what());
        } catch (...) {
        }
    } catch (...) {
        get_logger().error("mp: exception calling callback for future: unknown exception");
    }
}

// ---- exceptions across processes ----
//
// Every type that comes back as itself has one entry in known_types(): its name as the sending
// side reports it, the detail it needs beyond what() (written there), and how the receiving side
// rebuilds it. So a type is on both sides or on neither; any other comes back as a RemoteError.

// A standard exception whose constructor cannot take the remote what() (std::bad_cast's, or a
// std::system_error's that does not come out the same): the standard type, caught as such, with
// the remote message. encode_current_exception reports it under the standard type's name, so it
// stays itself across further hops.
class RemoteMessage {
public:
    virtual ~RemoteMessage() = default;
    virtual const std::type_info& standard_type() const noexcept = 0;
};

template <class E>
class WithMessage final : public E, public RemoteMessage {
public:
    template <class... A>
    explicit WithMessage(std::string message, A&&... args) : E(std::forward<A>(args)...), message_(std::move(message)) {}
    const char* what() const noexcept override { return message_.c_str(); }
    const std::type_info& standard_type() const noexcept override { return typeid(E); }

private:
    std::string message_;
};

// `e` when its what() is the remote one, else `e` with the remote message.
template <class E, class... A>
std::exception_ptr exactly(const std::string& message, A&&... args) {
    E plain(args...);
    if (message == plain.what()) return std::make_exception_ptr(std::move(plain));
    return std::make_exception_ptr(WithMessage<E>(message, std::forward<A>(args)...));
}

// A type with a message constructor is built from the remote what(); any other (std::bad_cast,
// std::exception ...) is the default one, with the remote what() when that differs.
template <class E>
std::exception_ptr make_plain(const ErrorInfo& info) {
    if constexpr (std::is_constructible_v<E, const std::string&>)
        return std::make_exception_ptr(E(info.message));
    else
        return exactly<E>(info.message);
}

// ErrorInfo::detail of a std::system_error (and a std::future_error): [u8 category][i32 value],
// then for a filesystem_error [string path1][string path2]. Only categories that are the same
// object in every process can be named; another category leaves the exception a RemoteError.
enum class Category : std::uint8_t { other = 0, generic = 1, system = 2, iostream = 3, future = 4 };

void put_code(Encoder& d, const std::error_code& code) {
    const std::error_category& c = code.category();
    const Category id = c == std::generic_category()    ? Category::generic
                        : c == std::system_category()   ? Category::system
                        : c == std::iostream_category() ? Category::iostream
                        : c == std::future_category()   ? Category::future
                                                        : Category::other;
    d.put(static_cast<std::uint8_t>(id));
    d.put(static_cast<std::int32_t>(code.value()));
}

std::optional<std::error_code> decode_code(Decoder& d) {
    const auto id = static_cast<Category>(d.get<std::uint8_t>());
    const int value = d.get<std::int32_t>();
    switch (id) {
        case Category::generic: return std::error_code(value, std::generic_category());
        case Category::system: return std::error_code(value, std::system_category());
        case Category::iostream: return std::error_code(value, std::iostream_category());
        case Category::future: return std::error_code(value, std::future_category());
        case Category::other: break;
    }
    return std::nullopt;
}

// The what_arg that gave `what` (system_error's what() is "what_arg: message", or the message
// alone): the exception is rebuilt with it, so that its what() is the remote one.
std::string strip_code_message(std::string what, const std::error_code& code) {
    const std::string tail = code.message();
    if (what == tail) return {};
    if (what.size() >= tail.size() + 2 && what.ends_with(tail) &&
        what.compare(what.size() - tail.size() - 2, 2, ": ") == 0)
        what.resize(what.size() - tail.size() - 2);
    return what;
}

// The detail writers below are called only with an exception of their entry's type. This one
// for a type with a code(): a std::system_error (and its subclasses) or a std::future_error.
template <class E>
std::string code_detail(const std::exception& x) {
    Encoder d;
    put_code(d, dynamic_cast<const E&>(x).code());
    return d.take();
}

std::exception_ptr make_system_error(const ErrorInfo& info) {
    Decoder d(info.detail);
    const std::optional<std::error_code> code = decode_code(d);
    if (!code) return nullptr;
    const std::string arg = strip_code_message(info.message, *code);
    if (arg.empty()) return exactly<std::system_error>(info.message, *code);
    return exactly<std::system_error>(info.message, *code, arg);
}

std::exception_ptr make_ios_failure(const ErrorInfo& info) {
    Decoder d(info.detail);
    const std::optional<std::error_code> code = decode_code(d);
    if (!code) return nullptr;
    return exactly<std::ios_base::failure>(info.message, strip_code_message(info.message, *code), *code);
}

std::string filesystem_detail(const std::exception& x) {
    const auto& e = dynamic_cast<const std::filesystem::filesystem_error&>(x);
    Encoder d;
    put_code(d, e.code());
    d.put(e.path1().string());
    d.put(e.path2().string());
    return d.take();
}

std::exception_ptr make_filesystem_error(const ErrorInfo& info) {
    namespace fs = std::filesystem;
    Decoder d(info.detail);
    const std::optional<std::error_code> code = decode_code(d);
    if (!code) return nullptr;
    const fs::path p1(d.get<std::string>());
    const fs::path p2(d.get<std::string>());
    // libstdc++'s what(): "filesystem error: " what_arg ": " message " [p1]" " [p2]".
    std::string arg = info.message;
    constexpr std::string_view head = "filesystem error: ";
    if (arg.starts_with(head)) arg.erase(0, head.size());
    for (const fs::path* p : {&p2, &p1}) {
        const std::string tail = " [" + p->string() + "]";
        if (!p->empty() && arg.ends_with(tail)) arg.resize(arg.size() - tail.size());
    }
    arg = strip_code_message(std::move(arg), *code);
    if (!p2.empty()) return exactly<fs::filesystem_error>(info.message, arg, p1, p2, *code);
    if (!p1.empty()) return exactly<fs::filesystem_error>(info.message, arg, p1, *code);
    return exactly<fs::filesystem_error>(info.message, arg, *code);
}

// A std::future_error: its code, as a system_error's (code_detail). Only the four
// std::future_errc values can be rebuilt (the standard constructor takes nothing else).
std::exception_ptr make_future_error(const ErrorInfo& info) {
    Decoder d(info.detail);
    const std::optional<std::error_code> code = decode_code(d);
    if (!code || code->category() != std::future_category()) return nullptr;
    for (const std::future_errc e : {std::future_errc::broken_promise, std::future_errc::future_already_retrieved,
                                     std::future_errc::promise_already_satisfied, std::future_errc::no_state})
        if (code->value() == static_cast<int>(e)) return exactly<std::future_error>(info.message, e);
    return nullptr;
}

// A std::regex_error: [i32 code] (std::regex_constants::error_type), one of the standard's
// thirteen (error_collate .. error_stack).
std::string regex_detail(const std::exception& x) {
    Encoder d;
    d.put(static_cast<std::int32_t>(dynamic_cast<const std::regex_error&>(x).code()));
    return d.take();
}

std::exception_ptr make_regex_error(const ErrorInfo& info) {
    namespace rc = std::regex_constants;
    Decoder d(info.detail);
    const std::int32_t value = d.get<std::int32_t>();
    for (const rc::error_type e : {rc::error_collate, rc::error_ctype, rc::error_escape, rc::error_backref,
                                   rc::error_brack, rc::error_paren, rc::error_brace, rc::error_badbrace,
                                   rc::error_range, rc::error_space, rc::error_badrepeat,
                                   rc::error_complexity, rc::error_stack})
        if (value == static_cast<std::int32_t>(e)) return exactly<std::regex_error>(info.message, e);
    return nullptr;
}

// [i32 pid][i32 status], the status as WorkerDied's constructor takes it, then [string where]
// when it names one.
std::string worker_died_detail(const std::exception& x) {
    const auto& died = dynamic_cast<const WorkerDied&>(x);
    Encoder d;
    d.put(static_cast<std::int32_t>(died.pid()));
    d.put(static_cast<std::int32_t>(died.exit_code() ? *died.exit_code() : -*died.signal()));
    if (!died.where().empty()) d.put(died.where());
    return d.take();
}

std::exception_ptr make_worker_died(const ErrorInfo& info) {
    Decoder d(info.detail);
    const auto pid = static_cast<pid_t>(d.get<std::int32_t>());
    const int status = d.get<std::int32_t>();
    // No WorkerDied sends this (-status is its signal, and -INT_MIN overflows): a forged detail.
    if (status == std::numeric_limits<int>::min()) return nullptr;
    std::string where = d.remaining() != 0 ? d.get<std::string>() : std::string();
    return exactly<WorkerDied>(info.message, pid, status, std::move(where));
}

// The whole message that did not fit, as it is.
std::string buffer_detail(const std::exception& x) {
    return dynamic_cast<const BufferTooShort&>(x).message();
}

std::exception_ptr make_buffer_too_short(const ErrorInfo& info) {
    return exactly<BufferTooShort>(info.message, info.detail);
}

struct KnownType {
    std::string name;                              // as demangle spells typeid's
    std::exception_ptr (*make)(const ErrorInfo&);  // nullptr result: it stays a RemoteError
    std::string (*detail)(const std::exception&);  // nullptr: what() is all it needs
};

template <class E>
KnownType known(std::exception_ptr (*make)(const ErrorInfo&) = make_plain<E>,
                std::string (*detail)(const std::exception&) = nullptr) {
    return {demangle(typeid(E).name()), make, detail};
}

// The standard exceptions and mp's own. Names are as current_exception_type_name spells them,
// e.g. "std::ios_base::failure[abi:cxx11]".
const std::vector<KnownType>& known_types() {
    namespace fs = std::filesystem;
    static const std::vector<KnownType> types = {
        known<std::runtime_error>(),
        known<std::logic_error>(),
        known<std::invalid_argument>(),
        known<std::out_of_range>(),
        known<std::length_error>(),
        known<std::domain_error>(),
        known<std::range_error>(),
        known<std::overflow_error>(),
        known<std::underflow_error>(),
        known<std::exception>(),
        known<std::bad_alloc>(),
        known<std::bad_array_new_length>(),
        known<std::bad_cast>(),
        known<std::bad_any_cast>(),
        known<std::bad_typeid>(),
        known<std::bad_variant_access>(),
        known<std::bad_optional_access>(),
        known<std::bad_function_call>(),
        known<std::bad_weak_ptr>(),
        known<std::bad_exception>(),
        known<std::system_error>(make_system_error, code_detail<std::system_error>),
        known<std::ios_base::failure>(make_ios_failure, code_detail<std::system_error>),
        known<fs::filesystem_error>(make_filesystem_error, filesystem_detail),
        known<std::future_error>(make_future_error, code_detail<std::future_error>),
        known<std::regex_error>(make_regex_error, regex_detail),
        known<Error>(),
        known<TimeoutError>(),
        known<ProcessError>(),
        known<DecodeError>(),
        known<AuthenticationError>(),
        known<BrokenProcessPool>(),
        known<CancelledError>(),
        known<EOFError>(),
        known<QueueClosed>(),
        known<ShutDown>(),
        known<Empty>(),
        known<Full>(),
        known<BrokenBarrierError>(),
        known<EmptyHandle>(),
        known<InvalidStateError>(),
        known<BrokenPromise>(),
        known<WorkerDied>(make_worker_died, worker_died_detail),
        known<BufferTooShort>(make_buffer_too_short, buffer_detail),
        known<py::UnpicklingError>(),
        known<py::PicklingError>(),
    };
    return types;
}

// Built as the library loads, before any thread starts or forks: a worker forked from a
// threaded parent (the fork start method) never inherits the table half-built, its guard held.
[[maybe_unused]] const std::vector<KnownType>& kKnownTypesAtLoad = known_types();

// register_exception's types: name (as demangle spells it) and maker. Never destroyed (results
// may be read as the program exits).
struct UserTypes {
    std::mutex mu;
    std::vector<std::pair<std::string, std::exception_ptr (*)(const std::string&)>> entries;
};
UserTypes& user_types() {
    static UserTypes* t = new UserTypes;
    return *t;
}

std::exception_ptr make_user_type(const ErrorInfo& info) {
    std::exception_ptr (*make)(const std::string&) = nullptr;
    {
        UserTypes& t = user_types();
        std::lock_guard lk(t.mu);
        for (const auto& [name, m] : t.entries)
            if (name == info.type_name) make = m;
    }
    return make != nullptr ? make(info.message) : nullptr;
}

const KnownType* find_known(std::string_view name) {
    for (const KnownType& k : known_types())
        if (k.name == name) return &k;
    return nullptr;
}

// The entry `x` is sent as (`name`: its dynamic type's); nullptr: it is to be a RemoteError.
const KnownType* known_type_of(const std::exception& x, std::string_view name) {
    // libstdc++'s streams throw std::__ios_failure, the library's own subclass of
    // ios_base::failure (in no header): sent as the ios_base::failure a user catches.
    if (name == "std::__ios_failure" && dynamic_cast<const std::ios_base::failure*>(&x))
        return find_known(demangle(typeid(std::ios_base::failure).name()));
    return find_known(name);
}

}  // namespace

void encode_current_exception(Encoder& e) {
    ErrorInfo info;
    if (!std::current_exception()) {
        // Called outside a handler: `throw;` would terminate the process.
        info.type_name = "unknown";
        info.message = "no exception is being handled";
    } else {
        try {
            throw;
        } catch (const RemoteError& r) {
            // Passed on from a process further down: keep the original type and origin rather
            // than wrapping it once per hop.
            info.type_name = r.type_name();
            info.message = r.message();
            info.origin = r.origin();
        } catch (const std::exception& x) {
            // A RemoteMessage was rebuilt here from another process's: sent on as its standard type.
            const auto* rebuilt = dynamic_cast<const RemoteMessage*>(&x);
            info.type_name = rebuilt ? demangle(rebuilt->standard_type().name()) : current_exception_type_name();
            info.message = x.what();
            if (const KnownType* k = known_type_of(x, info.type_name)) {
                info.type_name = k->name;
                if (k->detail) info.detail = k->detail(x);
            }
        } catch (...) {
            info.type_name = current_exception_type_name();
            info.message = "unknown exception";
        }
    }
    if (info.origin.empty())
        info.origin = current_process().name + " (pid " + std::to_string(::getpid()) + ")";
    e.put(info.type_name);
    e.put(info.message);
    e.put(info.origin);
    e.put(info.detail);
}

ErrorInfo decode_error_info(Decoder& d) {
    ErrorInfo info;
    info.type_name = d.get<std::string>();
    info.message = d.get<std::string>();
    info.origin = d.get<std::string>();
    info.detail = d.get<std::string>();
    return info;
}

std::exception_ptr make_remote_exception(const ErrorInfo& info) {
    if (const KnownType* k = find_known(info.type_name)) {
        try {
            if (std::exception_ptr e = k->make(info)) return e;
        } catch (const DecodeError&) {
            // Details that do not decode: the type and message still arrive, as a RemoteError.
        }
    } else {
        try {
            if (std::exception_ptr e = make_user_type(info)) return e;
        } catch (...) {
            // The registered type's constructor threw: the type and message still arrive.
        }
    }
    return std::make_exception_ptr(RemoteError(info.type_name, info.message, info.origin));
}

void register_exception_type(const std::type_info& type, std::exception_ptr (*make)(const std::string& message)) {
    std::string name = demangle(type.name());
    UserTypes& t = user_types();
    std::lock_guard lk(t.mu);
    for (auto& [n, m] : t.entries) {
        if (n == name) {
            m = make;
            return;
        }
    }
    t.entries.emplace_back(std::move(name), make);
}

// ---- WordMutex ----

void WordMutex::lock_contended(std::uint32_t c) noexcept {
    // Marks the word contended before sleeping, so that the holder's unlock wakes a sleeper.
    if (c != 2) c = word_.exchange(2, std::memory_order_acquire);
    while (c != 0) {
        (void)sys::futex_wait(word_, 2, std::nullopt, sys::futex_bitset_any, kPrivate);
        c = word_.exchange(2, std::memory_order_acquire);
    }
}

void WordMutex::wake_one() noexcept {
    (void)sys::futex_wake(word_, 1, sys::futex_bitset_any, kPrivate);
}

// ---- FutureCore ----

bool FutureCore::cancel() {
    std::unique_lock lk(mu_);
    if (state() == State::pending && !withdraw()) {
        // A worker has it already (the pool had not yet heard).
        set_running();
        return false;
    }
    // A CAS, not a store: set_running takes pending -> running without the lock, and wait()
    // sets kSleeping without it.
    std::uint32_t w = word_.load(std::memory_order_acquire);
    while (state_of(w) == State::pending) {
        if (word_.compare_exchange_weak(w, static_cast<std::uint32_t>(State::cancelled),
                                        std::memory_order_acq_rel, std::memory_order_acquire)) {
            complete(lk, w);
            return true;
        }
    }
    return state_of(w) == State::cancelled;  // as Python: cancelling twice succeeds
}

bool FutureCore::set_running() noexcept {
    std::uint32_t w = word_.load(std::memory_order_acquire);
    while (state_of(w) == State::pending) {
        // Keeps kSleeping: the sleepers wait for the end, which wakes them.
        const std::uint32_t running = (w & ~kStateMask) | static_cast<std::uint32_t>(State::running);
        if (word_.compare_exchange_weak(w, running, std::memory_order_acq_rel, std::memory_order_acquire))
            return true;
    }
    return false;
}

bool FutureCore::set_result(std::string bytes) { return finish(std::move(bytes), nullptr, nullptr); }

bool FutureCore::set_exception(std::exception_ptr error) { return finish({}, std::move(error), nullptr); }

bool FutureCore::set_value(std::shared_ptr<const void> value) { return finish({}, nullptr, std::move(value)); }

bool FutureCore::finish(std::string bytes, std::exception_ptr error, std::shared_ptr<const void> value) {
    std::unique_lock lk(mu_);
    if (done()) return false;
    // Stored before the release below: whoever sees `finished` sees the outcome.
    bytes_ = std::move(bytes);
    error_ = std::move(error);
    if (value) rare().value = std::move(value);
    // An exchange is enough: under mu_ nobody else finishes or cancels, and a concurrent
    // set_running (pending -> running) is simply superseded.
    const std::uint32_t before =
        word_.exchange(static_cast<std::uint32_t>(State::finished), std::memory_order_acq_rel);
    complete(lk, before);
    return true;
}

void FutureCore::complete(std::unique_lock<WordMutex>& lk, std::uint32_t before) {
    // Taken out: nothing registers once done, and the callbacks run outside the lock.
    std::vector<std::function<void(FutureCore&)>> callbacks;
    if (rare_) {
        const std::vector<FutureWaiter*> waiters = std::move(rare_->waiters);
        for (FutureWaiter* w : waiters) w->on_done(*this);
        callbacks = std::move(rare_->callbacks);
    }
    if (before & kSleeping) sys::futex_wake_all(word_, sys::futex_bitset_any, kPrivate);
    if (callbacks.empty()) return;  // `lk` unlocks
    // A callback may drop the last owner of this core (e.g. the pool's table entry): keep it
    // alive until every callback has run. Not every core is owned by a shared_ptr (tests).
    std::shared_ptr<FutureCore> self = weak_from_this().lock();
    lk.unlock();
    for (const auto& cb : callbacks) run_callback(cb, *this);
}

bool FutureCore::wait(std::optional<std::chrono::nanoseconds> timeout) const {
    if (done()) return true;
    if (timeout && *timeout <= std::chrono::nanoseconds::zero()) return false;
    const std::optional<Clock::time_point> deadline =
        timeout ? deadline_after(*timeout) : std::nullopt;
    std::uint32_t w = word_.load(std::memory_order_acquire);
    while (!is_done(w)) {
        // The completing thread wakes the word's sleepers only when it sees kSleeping, and the
        // kernel sleeps only while the word still holds `w`: no wake-up is lost.
        if (!(w & kSleeping)) {
            if (!word_.compare_exchange_weak(w, w | kSleeping, std::memory_order_acq_rel,
                                             std::memory_order_acquire))
                continue;
            w |= kSleeping;
        }
        if (sys::futex_wait(word_, w, deadline, sys::futex_bitset_any, kPrivate) ==
            sys::FutexResult::timed_out)
            return done();
        w = word_.load(std::memory_order_acquire);
    }
    return true;
}

bool FutureCore::store_callback(std::function<void(FutureCore&)>& cb) {
    std::lock_guard lk(mu_);
    if (done()) return false;
    rare().callbacks.push_back(std::move(cb));
    return true;
}

void FutureCore::add_done_callback(std::function<void(FutureCore&)> cb) {
    if (!store_callback(cb)) run_callback(cb, *this);
}

std::shared_ptr<FutureCore> FutureCore::after_callback(std::function<void(FutureCore&)> cb,
                                                       const Runner& elsewhere) {
    auto ready = std::make_shared<FutureCore>();
    std::function<void(FutureCore&)> then = [ready, cb = std::move(cb)](FutureCore& c) {
        run_callback(cb, c);
        if (c.state() == State::cancelled)
            ready->cancel();
        else if (auto e = c.error())
            ready->set_exception(e);
        else
            ready->set_result({});
    };
    if (store_callback(then)) return ready;
    if (elsewhere)
        elsewhere([self = shared_from_this(), then = std::move(then)] { then(*self); });
    else
        then(*this);
    return ready;
}

bool FutureCore::add_waiter(FutureWaiter* w) {
    std::lock_guard lk(mu_);
    if (done()) return false;
    rare().waiters.push_back(w);
    return true;
}

void FutureCore::remove_waiter(FutureWaiter* w) {
    // Every registration goes: after this returns, `w` is never called again, so it may be
    // destroyed (on_done runs under mu_, which this waits for).
    std::lock_guard lk(mu_);
    if (rare_) std::erase(rare_->waiters, w);
}

std::shared_ptr<FutureCore> FutureCore::when_all(
    std::span<const std::shared_ptr<FutureCore>> parts) {
    auto all = std::make_shared<FutureCore>();
    if (parts.empty()) {
        all->set_result({});
        return all;
    }
    // Callbacks run in whichever thread finishes a part (or here, for a part already done), so
    // the count is atomic; the last one to bring it to zero finishes `all`. A failure finishes it
    // at once, and later completions are ignored by set_result/set_exception. The parts hold
    // `all` only until their callbacks have run: no cycle.
    auto remaining = std::make_shared<std::atomic<std::size_t>>(parts.size());
    for (const auto& part : parts) {
        part->add_done_callback([all, remaining](FutureCore& c) {
            if (c.state() == State::cancelled)
                all->set_exception(std::make_exception_ptr(CancelledError()));
            else if (c.error())
                all->set_exception(c.error());
            else if (remaining->fetch_sub(1, std::memory_order_acq_rel) == 1)
                all->set_result({});
        });
    }
    return all;
}

// ---- wait ----

namespace {

class WaitAny final : public FutureWaiter {
public:
    void on_done(FutureCore& core) noexcept override {
        // Called under core's lock after its result was stored: error() is safe to read.
        std::lock_guard lk(mu);
        count(core);
        cv.notify_all();
    }
    // The caller holds mu.
    void count(const FutureCore& core) noexcept {
        ++done;
        if (core.state() == FutureCore::State::finished && core.error()) ++failed;
    }
    // As Python, every mode is met once all are done (so an empty input returns at once).
    bool satisfied(ReturnWhen mode, std::size_t total) const noexcept {
        if (done >= total) return true;
        switch (mode) {
            case ReturnWhen::first_completed: return done > 0;
            case ReturnWhen::first_exception: return failed > 0;
            case ReturnWhen::all_completed: return false;
        }
        return true;
    }

    std::mutex mu;
    std::condition_variable cv;
    std::size_t done = 0;
    std::size_t failed = 0;  // finished with an exception; cancelled does not count, as Python
};

std::vector<std::size_t> done_indices(std::span<FutureCore* const> cores) {
    std::vector<std::size_t> out;
    for (std::size_t i = 0; i < cores.size(); ++i)
        if (cores[i]->done()) out.push_back(i);
    return out;
}

}  // namespace

std::vector<std::size_t> wait_cores(std::span<FutureCore* const> cores,
                                    std::optional<std::chrono::nanoseconds> timeout,
                                    ReturnWhen mode) {
    WaitAny w;
    for (FutureCore* c : cores)
        if (c->done()) w.count(*c);
    if (w.satisfied(mode, cores.size()) ||
        (timeout && *timeout <= std::chrono::nanoseconds::zero()))
        return done_indices(cores);
    const std::optional<Clock::time_point> deadline =
        timeout ? deadline_after(*timeout) : std::nullopt;

    // `w` lives on this stack: it must leave every core before this returns, whatever happens.
    std::size_t registered = 0;
    struct Unregister {
        std::span<FutureCore* const> cores;
        std::size_t& n;
        WaitAny* w;
        ~Unregister() {
            for (std::size_t i = 0; i < n; ++i) cores[i]->remove_waiter(w);
        }
    } unregister{cores, registered, &w};

    {
        std::lock_guard lk(w.mu);
        w.done = 0;
        w.failed = 0;
    }
    for (FutureCore* c : cores) {
        // Never under w.mu: the lock order is core, then waiter (on_done).
        const bool added = c->add_waiter(&w);
        ++registered;
        if (!added) {
            std::lock_guard lk(w.mu);
            w.count(*c);
        }
    }
    {
        std::unique_lock lk(w.mu);
        auto ready = [&] { return w.satisfied(mode, cores.size()); };
        if (deadline)
            w.cv.wait_until(lk, *deadline, ready);
        else
            w.cv.wait(lk, ready);
    }
    return done_indices(cores);
}

// ---- CompletionQueue ----

CompletionQueue::CompletionQueue(std::vector<FutureCore*> cores)
    : cores_(std::move(cores)), seen_(cores_.size(), false) {
    // Reserved so on_done (noexcept, under a core's lock) never allocates.
    ready_.reserve(cores_.size());
    by_core_.reserve(cores_.size());
    for (std::size_t i = 0; i < cores_.size(); ++i) by_core_.emplace_back(cores_[i], i);
    std::sort(by_core_.begin(), by_core_.end());

    std::size_t registered = 0;
    try {
        for (std::size_t i = 0; i < cores_.size(); ++i) {
            // Not under mu_: the lock order is core, then queue (on_done).
            const bool added = cores_[i]->add_waiter(this);
            ++registered;
            if (!added) {
                std::lock_guard lk(mu_);
                if (!seen_[i]) {
                    seen_[i] = true;
                    ready_.push_back(i);
                }
            }
        }
    } catch (...) {
        for (std::size_t i = 0; i < registered; ++i) cores_[i]->remove_waiter(this);
        throw;
    }
}

CompletionQueue::~CompletionQueue() {
    for (FutureCore* c : cores_) c->remove_waiter(this);
}

void CompletionQueue::add(FutureCore* core) {
    std::size_t i;
    {
        std::lock_guard lk(mu_);
        i = cores_.size();
        cores_.push_back(core);
        seen_.push_back(false);
        ready_.reserve(cores_.size());  // on_done must not allocate
        const std::pair<FutureCore*, std::size_t> entry(core, i);
        by_core_.insert(std::upper_bound(by_core_.begin(), by_core_.end(), entry), entry);
    }
    // Not under mu_: the lock order is core, then queue (on_done).
    if (!core->add_waiter(this)) {
        std::lock_guard lk(mu_);
        if (!seen_[i]) {
            seen_[i] = true;
            ready_.push_back(i);
        }
        cv_.notify_all();
    }
}

void CompletionQueue::on_done(FutureCore& core) noexcept {
    std::lock_guard lk(mu_);
    // A core listed twice is registered twice: the first call hands out all its indices, the
    // second finds them seen.
    auto [first, last] = std::equal_range(
        by_core_.begin(), by_core_.end(), std::pair<FutureCore*, std::size_t>(&core, 0),
        [](const auto& a, const auto& b) { return a.first < b.first; });
    for (auto it = first; it != last; ++it) {
        if (seen_[it->second]) continue;
        seen_[it->second] = true;
        ready_.push_back(it->second);
    }
    cv_.notify_all();
}

std::optional<std::size_t> CompletionQueue::next(
    std::optional<std::chrono::steady_clock::time_point> deadline) {
    std::unique_lock lk(mu_);
    if (handed_ == cores_.size()) return std::nullopt;
    // ready_ only grows and each index enters it once, so handed_ is its read position.
    auto ready = [this] { return handed_ < ready_.size(); };
    if (deadline) {
        if (!cv_.wait_until(lk, *deadline, ready))
            // As Python: the futures not yet handed out, all of which were unfinished when the
            // wait ran out.
            throw TimeoutError(std::to_string(cores_.size() - handed_) + " (of " +
                               std::to_string(cores_.size()) + ") futures unfinished");
    } else {
        cv_.wait(lk, ready);
    }
    return ready_[handed_++];
}

// ---- ProgressBar ----

namespace {

constexpr auto kTtyInterval = std::chrono::milliseconds(100);
constexpr auto kLineInterval = std::chrono::seconds(2);
constexpr std::size_t kBarWidth = 20;

std::string format_duration(double seconds) {
    if (!(seconds >= 0) || seconds > 99.0 * 3600) return "?";
    const auto total = static_cast<unsigned long long>(seconds + 0.5);
    const unsigned long long h = total / 3600, m = (total / 60) % 60, s = total % 60;
    char buf[32];
    if (h > 0)
        std::snprintf(buf, sizeof buf, "%llu:%02llu:%02llu", h, m, s);
    else
        std::snprintf(buf, sizeof buf, "%llu:%02llu", m, s);
    return buf;
}

}  // namespace

ProgressBar::ProgressBar(std::string label, std::size_t total)
    : label_(std::move(label)),
      total_(total),
      start_(Clock::now()),
      // Off a terminal, the first line waits one interval so short runs print only the final one.
      last_draw_(start_),
      tty_(::isatty(STDERR_FILENO) == 1) {
    if (tty_) draw(false);
}

ProgressBar::~ProgressBar() {
    try {
        draw(true);
    } catch (...) {
    }
}

void ProgressBar::advance(std::size_t n) {
    done_.fetch_add(n, std::memory_order_relaxed);
    draw(false);
}

void ProgressBar::add_total(std::size_t n) { total_.fetch_add(n, std::memory_order_relaxed); }

std::string ProgressBar::render() const {
    const std::size_t done = done_.load(std::memory_order_relaxed);
    const std::size_t total = total_.load(std::memory_order_relaxed);
    const double elapsed = std::chrono::duration<double>(Clock::now() - start_).count();
    // Integer arithmetic, so 30 of 100 is exactly 30% and six cells of twenty.
    const std::size_t shown = std::min(done, total);
    const std::size_t filled = total == 0 ? kBarWidth : shown * kBarWidth / total;
    const std::size_t percent = total == 0 ? 100 : shown * 100 / total;

    std::string bar(kBarWidth, ' ');
    std::fill_n(bar.begin(), filled, '=');
    if (filled < kBarWidth && filled > 0) bar[filled - 1] = '>';

    std::string rate = "?";
    std::string eta = "?";
    if (done > 0 && elapsed > 0) {
        const double per_second = static_cast<double>(done) / elapsed;
        char buf[48];
        std::snprintf(buf, sizeof buf, "%.1f", per_second);
        rate = buf;
        eta = format_duration(done >= total ? 0.0
                                            : static_cast<double>(total - done) / per_second);
    }
    char pct[8];
    std::snprintf(pct, sizeof pct, "%3zu%%", percent);

    std::string line = label_;
    line += ' ';
    line += std::to_string(done) + "/" + std::to_string(total);
    line += " [" + bar + "] " + pct + " " + rate + "/s ETA " + eta;
    return line;
}

void ProgressBar::draw(bool final) {
    std::unique_lock lk(mu_, std::defer_lock);
    if (final) {
        lk.lock();
    } else if (!lk.try_lock()) {
        return;  // another thread is drawing: its line is as good as ours
    }
    const Clock::time_point now = Clock::now();
    const bool due = tty_ ? !drawn_ || now - last_draw_ >= kTtyInterval
                          : now - last_draw_ >= kLineInterval;
    if (!final && !due) return;
    last_draw_ = now;
    drawn_ = true;
    // "\x1b[K" clears what a longer previous line left behind.
    if (tty_)
        write_stderr("\r" + render() + "\x1b[K" + (final ? "\n" : ""));
    else
        write_stderr(render() + "\n");
}

}  // namespace mp::detail
