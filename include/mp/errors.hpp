#pragma once
/// \file
/// mp's exception hierarchy. Every domain failure is an mp::Error; a failing
/// system call is a std::system_error whose what() names the call.

#include <exception>
#include <optional>
#include <stdexcept>
#include <string>
#include <sys/types.h>
#include <type_traits>
#include <typeinfo>

namespace mp {

/// Base of every exception mp throws for a domain failure.
class Error : public std::runtime_error {
public:
    using std::runtime_error::runtime_error;
};

/// Misuse of a Process (start twice, join before start, ...), or a child that could not start.
class ProcessError : public Error {
public:
    using Error::Error;
};

/// A bounded wait ran out.
class TimeoutError : public Error {
public:
    using Error::Error;
    TimeoutError() : Error("timed out") {}
};

/// A handle that holds nothing was used: one moved from, or a default-constructed mp::Future or
/// manager proxy (std::future calls this no_state; Python has no such objects). A Connection or
/// Listener moved from is a closed one (std::system_error EBADF, as Python's OSError); a
/// Process moved from throws ProcessError, as for its other misuses.
class EmptyHandle : public Error {
public:
    using Error::Error;
};

namespace detail {
/// Throws EmptyHandle naming `type` ("mp::Queue", ...).
[[noreturn]] inline void throw_empty_handle(const char* type) {
    throw EmptyHandle(std::string(type) + ": the handle is empty (moved from, or default-constructed)");
}
/// `*p`, or EmptyHandle when `p` is null.
template <class P>
decltype(auto) deref_handle(const P& p, const char* type) {
    if (!p) throw_empty_handle(type);
    return *p;
}
}  // namespace detail

/// get on an empty queue without blocking (or after the timeout).
class Empty : public Error {
public:
    using Error::Error;
    Empty() : Error("queue is empty") {}
};

/// put on a full queue without blocking (or after the timeout).
class Full : public Error {
public:
    using Error::Error;
    Full() : Error("queue is full") {}
};

/// put or get on a queue handle after close() (Python raises ValueError "Queue is closed").
class QueueClosed : public Error {
public:
    using Error::Error;
    /// what() is "Queue is closed", as Python's message.
    QueueClosed() : Error("Queue is closed") {}
};

/// put on a queue that was shut down, or get on one that was shut down and is empty (or shut
/// down with immediate = true): Python 3.13's queue.ShutDown.
class ShutDown : public Error {
public:
    using Error::Error;
    ShutDown() : Error("queue is shut down") {}
};

/// The other end is closed: nothing more will arrive.
class EOFError : public Error {
public:
    using Error::Error;
    EOFError() : Error("end of file: the peer has closed the connection") {}
};

/// Bytes could not be decoded into the requested type (truncated, oversized or malformed).
class DecodeError : public Error {
public:
    using Error::Error;
};

/// A received message did not fit the caller's buffer; the message is kept.
class BufferTooShort : public Error {
public:
    explicit BufferTooShort(std::string message)
        : Error("buffer too short for the received message"), message_(std::move(message)) {}
    /// The whole message that did not fit.
    const std::string& message() const noexcept { return message_; }

private:
    std::string message_;
};

/// The peer failed (or refused) the shared-key handshake.
class AuthenticationError : public Error {
public:
    using Error::Error;
};

/// The pool cannot take or finish work any more.
class BrokenProcessPool : public Error {
public:
    using Error::Error;
};

/// A worker process died while it ran a task.
class WorkerDied : public Error {
public:
    /// The status of a worker whose end is known but not how it ended: its exit status was
    /// collected by someone else (SIGCHLD ignored, or a waitpid(-1) elsewhere in the program)
    /// on a kernel older than Linux 6.15 (newer ones keep it for mp), or it was lost with a
    /// forkserver that was stopped or killed. exit_code() and signal() are then both nullopt.
    static constexpr int unknown_status = -0x7fffffff - 1;

    /// `status` is the exit code (>= 0) or minus the signal number, as Process::exitcode(), or
    /// unknown_status.
    WorkerDied(pid_t pid, int status);
    /// The same for a worker that ran elsewhere: `where` names the process it served (an
    /// mp::mpi rank with isolate_tasks: "MPIRank-2@host"), and what() says so.
    WorkerDied(pid_t pid, int status, std::string where);
    pid_t pid() const noexcept { return pid_; }
    /// Whose worker it was when not this program's own: "MPIRank-2@host"; empty otherwise.
    const std::string& where() const noexcept { return where_; }
    /// The exit code when the worker exited, or std::nullopt when a signal ended it.
    std::optional<int> exit_code() const noexcept {
        return status_ >= 0 ? std::optional<int>(status_) : std::nullopt;
    }
    /// The signal that ended the worker, or std::nullopt when it exited.
    std::optional<int> signal() const noexcept {
        return status_ < 0 && status_ != unknown_status ? std::optional<int>(-status_) : std::nullopt;
    }

private:
    pid_t pid_;
    int status_;
    std::string where_;
};

/// The future was cancelled before it ran.
class CancelledError : public Error {
public:
    using Error::Error;
    CancelledError() : Error("the future was cancelled") {}
};

/// A standalone future (mp::Promise) was asked to change state where Python raises
/// concurrent.futures.InvalidStateError: a result or exception set on a future that is already
/// finished or cancelled, or set_running_or_notify_cancel on one that is running or finished.
class InvalidStateError : public Error {
public:
    using Error::Error;
};

/// The last mp::Promise of a future went away without setting a result or an exception: the
/// future fails with this rather than leaving its waiters blocked for ever
/// (std::future_errc::broken_promise).
class BrokenPromise : public Error {
public:
    using Error::Error;
    BrokenPromise() : Error("the promise was destroyed before it set a result") {}
};

/// A Barrier was aborted or reset while a party waited.
class BrokenBarrierError : public Error {
public:
    using Error::Error;
    BrokenBarrierError() : Error("the barrier is broken") {}
};

/// An exception raised in another process: its type, message and origin.
class RemoteError : public Error {
public:
    RemoteError(std::string type_name, std::string message, std::string origin);
    /// The (demangled) type name of the remote exception, e.g. "std::out_of_range".
    const std::string& type_name() const noexcept { return type_name_; }
    /// The remote exception's what().
    const std::string& message() const noexcept { return message_; }
    /// Which process raised it, e.g. "ForkServerProcess-3 (pid 1234)".
    const std::string& origin() const noexcept { return origin_; }

private:
    std::string type_name_;
    std::string message_;
    std::string origin_;
};

namespace detail {
/// register_exception's work: exceptions whose type is `type` are rebuilt by `make` from the
/// remote what().
void register_exception_type(const std::type_info& type, std::exception_ptr (*make)(const std::string& message));
}  // namespace detail

/// Makes exceptions of type E that a worker throws (a pool's or an executor's task, a managed
/// pool's, an mp::mpi task) come back as E, built from the remote what(), where an exception of
/// a type mp does not know comes back as mp::RemoteError (Python brings back any class it can
/// import; C++ can only rebuild the types it is told of). Call it in the process that reads
/// the results, before it reads them: at the start of main, say; the workers need nothing.
/// Registering a type again, or one mp already brings back as itself, changes nothing.
///
///     struct BadInput : std::invalid_argument { using std::invalid_argument::invalid_argument; };
///     mp::register_exception<BadInput>();
///     try { ex.submit(parse, "x").result(); } catch (const BadInput& e) { ... }
template <class E>
void register_exception() {
    static_assert(std::is_base_of_v<std::exception, E>, "mp::register_exception: E must derive from std::exception");
    static_assert(std::is_constructible_v<E, const std::string&>,
                  "mp::register_exception: E must be constructible from a std::string (the remote what())");
    detail::register_exception_type(typeid(E),
                                    [](const std::string& message) { return std::make_exception_ptr(E(message)); });
}

}  // namespace mp
