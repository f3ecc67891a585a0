#pragma once
// Transferable callables: work sent to a process that already exists (a forkserver child, a pool
// worker, an MPI rank) travels as bytes. The same binary runs on both sides, so code is named by
// its address relative to the loaded module that holds it, and the module by its build id.
// Nothing needs registering by hand; the invoker trampolines register themselves at static
// initialisation, and a receiver runs only a registered trampoline (a forged address is refused).

#include <cstdint>
#include <cstring>
#include <functional>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#include "mp/serialize.hpp"

namespace mp::detail {

/// Code named independently of where the module was loaded.
struct CodeRef {
    std::uint64_t module = 0;  // hash of the module's build id (or of its read-only contents without one)
    std::uint64_t offset = 0;  // address minus the module's load address
};

/// Names the code at `address`; throws mp::Error when no loaded module holds it.
CodeRef code_ref(std::uintptr_t address);
/// The address of `ref` in this process; throws DecodeError when no loaded module matches or the
/// address is not in an executable segment.
std::uintptr_t resolve_code(const CodeRef& ref);

/// A trampoline: decodes the arguments (and a function pointer, for that kind), calls, and
/// encodes the result into `out` (nothing for void or a result without a codec).
using Invoker = void (*)(Decoder& in, Encoder& out);
bool register_invoker(Invoker fn) noexcept;
bool is_registered_invoker(Invoker fn) noexcept;

template <class F>
concept FunctionPointer = std::is_pointer_v<F> && std::is_function_v<std::remove_pointer_t<F>>;

/// An object with no state that can be made afresh on the other side: a captureless lambda or
/// an empty function object.
template <class F>
concept StatelessCallable =
    std::is_class_v<F> && std::is_empty_v<F> && std::is_default_constructible_v<F>;

/// What may be sent to another process: a function (pointer) or a stateless callable.
template <class F>
concept Transferable = FunctionPointer<std::decay_t<F>> || StatelessCallable<std::decay_t<F>>;

// ---- compile-time diagnosis ---------------------------------------------------------------
//
// One mistake gives one error: check_transferable tests the mistakes in a fixed order and asserts
// only the first that applies, and what would fail after it (the chunk builder, the invokers,
// result decoding) is guarded by the same traits, so it stays quiet. Each assertion's condition
// is a variable template named after the rule, with the offending type as its argument, so both
// compilers print that type: clang on the error line ("requirement 'captures_nothing<...>'"),
// g++ in the note under it ("'mp::detail::has_codec<NoCodec>' evaluates to false").

template <class F>
inline constexpr bool not_std_function = true;
template <class S>
inline constexpr bool not_std_function<std::function<S>> = false;
template <class F>
inline constexpr bool not_member_pointer = !std::is_member_pointer_v<F>;
template <class F>
inline constexpr bool captures_nothing = !(std::is_class_v<F> && !std::is_empty_v<F>);
template <class F>
inline constexpr bool is_transferable = Transferable<F>;
template <class F, class... A>
inline constexpr bool callable_with = std::is_invocable_v<F&, A&...>;
template <class T>
inline constexpr bool not_changed_through_reference = false;

/// True when the call binds decoded argument I to a non-const lvalue reference (it compiles with
/// that argument as an lvalue but not as an rvalue): the callee would change the worker's copy,
/// which the caller never sees. A shared handle (Codec<T>::shares_state: a queue, lock,
/// connection, shared memory, proxy ...) is exempt: its copy refers to the same object.
template <class Fn, std::size_t I, class... A>
consteval bool binds_mutable_reference() {
    using T = std::tuple_element_t<I, std::tuple<A...>>;
    if constexpr (shared_handle<T>) {
        return false;
    } else {
        return []<std::size_t... J>(std::index_sequence<J...>) {
            return !std::is_invocable_v<
                Fn&, std::conditional_t<J == I, std::tuple_element_t<J, std::tuple<A...>>&&,
                                        std::tuple_element_t<J, std::tuple<A...>>&>...>;
        }(std::index_sequence_for<A...>{});
    }
}

/// The first argument type that binds a non-const lvalue reference (see above), or void.
template <class Fn, std::size_t I, class... A>
struct first_mutable_reference {
    using type = void;
};
template <class Fn, std::size_t I, class... A>
    requires(I < sizeof...(A))
struct first_mutable_reference<Fn, I, A...> {
    using type = std::conditional_t<binds_mutable_reference<Fn, I, A...>(),
                                    std::tuple_element_t<I, std::tuple<A...>>,
                                    typename first_mutable_reference<Fn, I + 1, A...>::type>;
};

/// The first mistake that makes fn(args...) unsendable, as a number; 0 when there is none.
/// Argument types are decayed already.
template <class Fn, class... A>
consteval int first_mistake() {
    if constexpr (!not_std_function<Fn>) return 1;
    else if constexpr (!not_member_pointer<Fn>) return 2;
    else if constexpr (!captures_nothing<Fn>) return 3;
    else if constexpr (!is_transferable<Fn>) return 4;
    else if constexpr (!(Encodable<A> && ...)) return 5;
    else if constexpr (!callable_with<Fn, A...>) return 6;
    else if constexpr (!std::is_void_v<typename first_mutable_reference<Fn, 0, A...>::type>) return 7;
    else return 0;
}

/// A call that would change an argument through a non-const lvalue reference is an error: the
/// callee runs in another process, on that process's copy. Also checked for every Process
/// target, whatever the start method (a forked child has a copy too).
template <class Fn, class... A>
constexpr void check_no_mutable_reference() {
    using T = typename first_mutable_reference<Fn, 0, A...>::type;
    if constexpr (!std::is_void_v<T>)
        static_assert(
            not_changed_through_reference<T>,
            "mp: a parameter of work run in another process is a non-const lvalue reference "
            "(T&): the process running it would change its own copy of the argument and the "
            "caller would never see the change. Take it by value or by const T& and return the "
            "new value; mp's handles (queues, locks, connections, shared memory, Value/Array, "
            "Event, Barrier, proxies) may be taken by reference");
}

/// True when fn(args...) can be sent to another process and called there.
template <class F, class... Args>
inline constexpr bool sendable = first_mistake<std::decay_t<F>, std::decay_t<Args>...>() == 0;

/// Compile-time checks that f(args...) can be sent to another process: at most one error, which
/// names the offending type and says what to do.
template <class F, class... Args>
constexpr void check_transferable() {
    using Fn = std::decay_t<F>;
    constexpr int mistake = first_mistake<Fn, std::decay_t<Args>...>();
    if constexpr (mistake == 1) {
        static_assert(not_std_function<Fn>,
                      "mp: a std::function cannot be sent to another process, because it may hold "
                      "state (captures) that cannot be copied there: pass a function, a function "
                      "pointer or a captureless lambda, and the values it needs as arguments");
    } else if constexpr (mistake == 2) {
        static_assert(not_member_pointer<Fn>,
                      "mp: a pointer to member cannot be sent to another process: wrap the call in "
                      "a free function or a captureless lambda that takes the object as an "
                      "argument, e.g. [](Obj o, int x) { return o.f(x); }");
    } else if constexpr (mistake == 3) {
        static_assert(captures_nothing<Fn>,
                      "mp: work sent to another process cannot capture state: pass the captured "
                      "values as arguments instead (a captureless lambda, a function or an empty "
                      "function object is transferable)");
    } else if constexpr (mistake == 4) {
        static_assert(is_transferable<Fn>,
                      "mp: work sent to another process must be a function, a function pointer, a "
                      "captureless lambda or an empty, default-constructible function object");
    } else if constexpr (mistake == 5) {
        static_assert(has_codec<missing_codec_t<typename first_without_codec<std::decay_t<Args>...>::type>>,
                      "mp: an argument sent to another process has no codec (the type is named "
                      "in has_codec<...>). Make it one of: a plain struct of numbers (trivially "
                      "copyable, standard layout), a type with a cereal serialize() function "
                      "(member or free), or a type with an mp::Codec<T> specialisation");
    } else if constexpr (mistake == 6) {
        static_assert(callable_with<Fn, std::decay_t<Args>...>,
                      "mp: the callable cannot be called with these arguments");
    } else if constexpr (mistake == 7) {
        check_no_mutable_reference<Fn, std::decay_t<Args>...>();
    }
}

/// check_transferable, plus: the call's result must have a codec (or be void).
template <class F, class... Args>
constexpr void check_work() {
    check_transferable<F, Args...>();
    if constexpr (sendable<F, Args...>) {
        using R = std::invoke_result_t<std::decay_t<F>&, std::decay_t<Args>&...>;
        if constexpr (!std::is_void_v<R> && !Encodable<R>)
            static_assert(has_codec<missing_codec_t<R>>,
                          "mp: the result of work run in another process has no codec (the type "
                          "is named in has_codec<...>). Make it one of: a plain struct of numbers "
                          "(trivially copyable, standard layout), a type with a cereal serialize() "
                          "function (member or free), or a type with an mp::Codec<T> "
                          "specialisation");
    }
}

template <class F, class... A>
decltype(auto) call_with(F& f, std::tuple<A...>& args) {
    // Prefer moving the decoded arguments in; fall back to lvalues for `T&` parameters.
    if constexpr (std::is_invocable_v<F&, A&&...>)
        return std::apply(f, std::move(args));
    else
        return std::apply(f, args);
}

/// The callable a task names: a function pointer read from `in`, or a stateless object made afresh.
template <class F>
F read_callable(Decoder& in) {
    if constexpr (FunctionPointer<F>) {
        CodeRef r;
        r.module = in.get<std::uint64_t>();
        r.offset = in.get<std::uint64_t>();
        return reinterpret_cast<F>(resolve_code(r));
    } else {
        return F{};
    }
}

template <class F, class... A>
void invoke_from(Decoder& in, Encoder& out) {
    F f = read_callable<F>(in);
    // Braced initialisation evaluates left to right: arguments decode in order.
    std::tuple<A...> args{in.get<A>()...};
    in.finish();
    using R = decltype(call_with(f, args));
    if constexpr (std::is_void_v<R>) {
        call_with(f, args);
    } else if constexpr (Encodable<R>) {
        out.put(call_with(f, args));
    } else {
        (void)call_with(f, args);
    }
}

/// Inside a catch block: appends the exception being handled (defined with the futures).
void encode_current_exception(Encoder& e);

/// Writes one chunk item's outcome: [u8 ok][u64 length][result bytes, or the error's ErrorInfo].
class ItemOutcome {
public:
    explicit ItemOutcome(Encoder& out) : out_(out), at_(out.bytes().size()) {
        out_.put(std::uint8_t{1});
        out_.write_size(0);
    }
    /// Replaces whatever the item wrote with the exception being handled.
    void fail() {
        out_.bytes().resize(at_);
        out_.put(std::uint8_t{0});
        out_.write_size(0);
        encode_current_exception(out_);
    }
    ~ItemOutcome() {
        const std::uint64_t n = little_endian(std::uint64_t{out_.bytes().size() - at_ - 9});
        std::memcpy(out_.bytes().data() + at_ + 1, &n, sizeof n);
    }
    ItemOutcome(const ItemOutcome&) = delete;
    ItemOutcome& operator=(const ItemOutcome&) = delete;

private:
    Encoder& out_;
    std::size_t at_;
};

/// A chunk: [callable][u64 count][arguments of each call...]. Every call runs, each outcome
/// (result or exception) is written separately, so one failing item fails only itself. Arguments
/// that cannot be decoded fail that item and every later one (their bytes are out of step).
template <class F, class... A>
void invoke_chunk_from(Decoder& in, Encoder& out) {
    F f = read_callable<F>(in);
    const std::uint64_t n = in.read_size(0);
    for (std::uint64_t i = 0; i < n; ++i) {
        std::optional<std::tuple<A...>> args;
        {
            ItemOutcome item(out);
            try {
                args.emplace(std::tuple<A...>{in.get<A>()...});
            } catch (...) {
                item.fail();
            }
            if (args) {
                try {
                    using R = decltype(call_with(f, *args));
                    if constexpr (std::is_void_v<R>) {
                        call_with(f, *args);
                    } else if constexpr (Encodable<R>) {
                        out.put(call_with(f, *args));
                    } else {
                        (void)call_with(f, *args);
                    }
                } catch (...) {
                    item.fail();
                }
                continue;
            }
        }
        // Out of step: every later item fails with the same error.
        for (++i; i < n; ++i) {
            ItemOutcome rest(out);
            try {
                throw DecodeError("mp: an earlier item of this chunk could not be decoded");
            } catch (...) {
                rest.fail();
            }
        }
        return;
    }
    in.finish();
}

/// Registers an invoker when it is made. The variables below are initialised at priority 101,
/// before every namespace-scope object of the default priority in the program, ahead of the rest
/// of static initialisation (an instantiated template's own dynamic initialisation is unordered,
/// and a static library's objects start after the program's): a Pool or Process at namespace
/// scope forks children that copy the registry as it is at that moment, and the first task sent
/// to one must find its invoker there.
struct InvokerRegistration {
    explicit InvokerRegistration(Invoker fn) noexcept : registered(register_invoker(fn)) {}
    bool registered;
};

template <class F, class... A>
[[gnu::init_priority(101)]] inline const InvokerRegistration chunk_invoker_registered{
    &invoke_chunk_from<F, A...>};

template <class F, class... A>
[[gnu::init_priority(101)]] inline const InvokerRegistration invoker_registered{
    &invoke_from<F, A...>};

/// An encoded call: [invoker][function, for a pointer][arguments...], plus the descriptors its
/// arguments attached (borrowed from the arguments, which must outlive the sending).
struct Task {
    std::string bytes{};
    std::vector<int> fds{};
};

/// Encodes `f(args...)` when it can cross a process boundary; std::nullopt otherwise (the caller
/// decides whether that is an error: a fork-started Process does not need it). Not sendable
/// includes a call that would change an argument through a non-const lvalue reference.
template <class F, class... Args>
std::optional<Task> make_task(const F& f, const Args&... args) {
    using Fn = std::decay_t<F>;
    if constexpr (sendable<F, Args...>) {
        (void)invoker_registered<Fn, std::decay_t<Args>...>;
        Encoder e;
        // One allocation for a call with a few scalar arguments (about 40 bytes), which would
        // otherwise grow the string twice: a pool pays this per submit.
        e.bytes().reserve(64);
        Invoker inv = &invoke_from<Fn, std::decay_t<Args>...>;
        CodeRef r = code_ref(reinterpret_cast<std::uintptr_t>(inv));
        e.put(r.module);
        e.put(r.offset);
        if constexpr (FunctionPointer<Fn>) {
            Fn fp = f;
            if (fp == nullptr) throw Error("mp: cannot send a null function pointer");
            CodeRef fr = code_ref(reinterpret_cast<std::uintptr_t>(fp));
            e.put(fr.module);
            e.put(fr.offset);
        }
        (e.put(static_cast<const std::decay_t<Args>&>(args)), ...);
        std::vector<int> fds = e.take_fds();
        return Task{e.take(), std::move(fds)};
    } else {
        return std::nullopt;
    }
}

/// Like make_task, but a callable or argument that cannot be sent is a compile error that says
/// what to do.
template <class F, class... Args>
Task make_transferable_task(const F& f, const Args&... args) {
    check_transferable<F, Args...>();
    if constexpr (sendable<F, Args...>)
        return *make_task(f, args...);
    else
        return {};  // not reached: the check above failed to compile
}

/// The most descriptors one task (or chunk of a map) carries: what one message carries (the
/// kernel's SCM_MAX_FD). Each handle among the arguments counts, copies of one handle each.
inline constexpr std::size_t kMaxTaskFds = 253;

/// Builds chunk tasks for calls of one callable: the callable is named once per chunk, then
/// each call's arguments follow.
template <class F, class... A>
class ChunkBuilder {
public:
    explicit ChunkBuilder(const F& f) {
        // Unsendable work has failed check_work already; compiling on would only repeat it.
        if constexpr (sendable<F, A...>) build_prefix(f);
    }
    /// Appends one call's arguments.
    template <class... B>
    void add(const B&... args) {
        const std::size_t fds = e_.fds().size();
        if constexpr (sendable<F, A...>) (e_.put(static_cast<const A&>(args)), ...);
        last_fds_ = e_.fds().size() - fds;
        ++count_;
    }
    std::size_t count() const noexcept { return count_; }
    /// Whether the chunk goes before another call is added: it has `chunksize` calls, or a call
    /// with as many descriptors as the last would take it past kMaxTaskFds (a map of calls that
    /// each take a handle: a chunk the pool would refuse).
    bool full(std::size_t chunksize) const noexcept {
        return count_ >= chunksize || (count_ != 0 && e_.fds().size() + last_fds_ > kMaxTaskFds);
    }
    /// The chunk so far, as a task; starts a new one.
    Task take() {
        const std::uint64_t n = little_endian(std::uint64_t{count_});
        std::memcpy(e_.bytes().data() + prefix_.size(), &n, sizeof n);
        Task t{e_.take(), e_.take_fds()};
        reset();
        return t;
    }

private:
    void build_prefix(const F& f) {
        (void)chunk_invoker_registered<F, A...>;
        Encoder e;
        Invoker inv = &invoke_chunk_from<F, A...>;
        CodeRef r = code_ref(reinterpret_cast<std::uintptr_t>(inv));
        e.put(r.module);
        e.put(r.offset);
        if constexpr (FunctionPointer<F>) {
            if (f == nullptr) throw Error("mp: cannot send a null function pointer");
            CodeRef fr = code_ref(reinterpret_cast<std::uintptr_t>(f));
            e.put(fr.module);
            e.put(fr.offset);
        }
        prefix_ = e.take();
        reset();
    }
    void reset() {
        e_ = Encoder(prefix_);
        e_.write_size(0);
        count_ = 0;
    }
    std::string prefix_;
    Encoder e_;
    std::size_t count_ = 0;
    std::size_t last_fds_ = 0;  // the last call's descriptors
};

/// Whether run_task's result goes back to another process (a pool's task) or is dropped (a
/// Process target, an initializer).
enum class TaskResult : bool { dropped, sent };

/// Decodes and runs a task; returns the encoded result. `fds` are the descriptors that arrived
/// with it: the arguments take theirs and leave -1; the caller closes the rest. Throws
/// DecodeError for bytes that do not name a registered invoker in this binary; whatever the
/// callable throws propagates. A result that is `sent` cannot hold a handle (its descriptor
/// would not travel): mp::Error then, as if the callable had thrown it (for each item of a chunk).
std::string run_task(std::string_view bytes, std::span<int> fds = {}, TaskResult result = TaskResult::dropped);

}  // namespace mp::detail
