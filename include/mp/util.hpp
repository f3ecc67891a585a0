#pragma once
/// \file
/// Python's multiprocessing.util: mp::util::Finalize (a callback run when an object dies or at
/// exit, by priority, only in the process that registered it) and the library's logging hook,
/// mp::get_logger() / mp::log_to_stderr().
///
///     mp::log_to_stderr(mp::LogLevel::info);            // "[INFO/MainProcess] ..." on stderr
///     mp::get_logger().set_sink([](const mp::LogRecord& r) { my_log(r.level, r.message); });
///
///     struct Db { mp::util::Finalize close{[h = handle] { ::close(h); }, 10}; ... };
///
/// Logging, as Python: off by default. Until a program sets a sink, records below
/// LogLevel::warning are dropped and warnings and errors (a pool's internal error, a worker that
/// failed, an exception thrown by a future's done callback) go to stderr as the bare message, as
/// Python's logging "last resort" prints them. The "Process <name>:" lines of a target that
/// threw, a socket server's handle_error and a progress bar are output, not log records: they
/// stay on stderr whatever the sink.
///
/// What mp logs, as Python's multiprocessing: a child's "child process calling self.run()" and
/// "process exiting with exitcode N" (info); a process's exit steps ("process shutting down",
/// "calling terminate() for daemon NAME", "calling join() for process NAME": info; the
/// finalizer steps: debug); a Pool's "added worker", "closing pool", "terminating pool",
/// "joining pool" and its workers' "worker exiting after N tasks" (debug); a manager's "manager
/// serving at ADDRESS" and "sending shutdown message to manager" (info), "requesting creation of
/// a shared 'TYPE' object" and "manager received shutdown message" (debug).
///
/// Where the hook runs: in the thread that logs. It is skipped, and the message written with
/// write(2) to stderr, where a user's sink cannot safely run: in the shared-memory tracker (a
/// process forked from a parent that may run threads). Nothing mp logs between fork and the
/// start of a child's work.
///
/// Children. A fork child is a copy: it has the parent's level and sink. A forkserver or spawn
/// child (a Process or a pool's worker) takes, when it starts, the parent's level and whether
/// log_to_stderr is on, as Python's spawn passes them; a sink set with set_sink is a closure of
/// the parent's and does not follow (the child has the default sink). Later changes in the parent
/// reach only children started after them.

#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <sys/types.h>

namespace mp {

/// Python's logging levels (multiprocessing adds SUBDEBUG and SUBWARNING).
enum class LogLevel : int {
    notset = 0,
    subdebug = 5,
    debug = 10,
    info = 20,
    subwarning = 25,
    warning = 30,
    error = 40,
    critical = 50,
};

/// "DEBUG", "INFO", "WARNING", ... as Python's logging.getLevelName.
std::string_view level_name(LogLevel level) noexcept;

/// One message of the library (or of a program that logs through get_logger()).
struct LogRecord {
    LogLevel level = LogLevel::notset;
    std::string_view message{};
    /// current_process().name at the time ("MainProcess", "ForkServerPoolWorker-2", ...).
    std::string_view process_name{};
    pid_t pid = 0;
};

/// Where records go; runs in the logging thread, so it must be thread-safe, and it must not log
/// through the same logger (that would recurse).
using LogSink = std::function<void(const LogRecord&)>;

/// The library's logger (Python's multiprocessing logger). Thread-safe; no lock is taken on the
/// logging path, so a forked child never finds it held.
class Logger {
public:
    /// Records below `level` are dropped. notset (the default): the "last resort" rule above.
    void set_level(LogLevel level) noexcept;
    LogLevel level() const noexcept;
    /// Whether a record at `level` would go anywhere (cheap: check before building a message).
    bool enabled_for(LogLevel level) const noexcept;

    /// Sends every record that passes the level to `sink`; an empty sink restores the default.
    /// A sink replaced while another thread runs it is kept alive (until exit) rather than freed
    /// under it.
    void set_sink(LogSink sink);

    /// Logs `message`; never throws (a sink that throws loses its record).
    void log(LogLevel level, std::string_view message) noexcept;
    void subdebug(std::string_view m) noexcept { log(LogLevel::subdebug, m); }
    void debug(std::string_view m) noexcept { log(LogLevel::debug, m); }
    void info(std::string_view m) noexcept { log(LogLevel::info, m); }
    void subwarning(std::string_view m) noexcept { log(LogLevel::subwarning, m); }
    void warning(std::string_view m) noexcept { log(LogLevel::warning, m); }
    void error(std::string_view m) noexcept { log(LogLevel::error, m); }
    void critical(std::string_view m) noexcept { log(LogLevel::critical, m); }
};

/// The library's logger (Python's multiprocessing.get_logger()).
Logger& get_logger() noexcept;

/// Python's multiprocessing.log_to_stderr(level): records go to stderr as
/// "[LEVEL/process name] message"; `level`, when given, is set too (else records from warning
/// up pass, as Python's default). Returns the logger.
Logger& log_to_stderr(std::optional<LogLevel> level = std::nullopt);

namespace util {

/// Python's multiprocessing.util.Finalize. The callback runs once, at the first of:
/// - the Finalize is destroyed (make it a member of the object whose death it marks: C++ has
///   no weak references to arbitrary objects, so this stands for Python's `obj` argument);
/// - it is called (operator());
/// - normal exit of this process (std::exit or return from main, or, in a child, the end of its
///   target, whether it returned or threw), when it has an exit_priority: higher priorities
///   first, equal ones in reverse order of creation. As Python's util._exit_function: those of
///   priority 0 and up run before the process's children are joined (its daemons terminated
///   first), the others after.
/// Only ever in the process that created it: a forked child that destroys, calls or exits
/// with a copy of its parent's Finalize does nothing (as Python's, which checks the pid).
/// Exceptions escaping the callback are logged (error) and dropped.
/// Move-only; a moved-from Finalize is inactive.
class Finalize {
public:
    explicit Finalize(std::function<void()> callback, std::optional<int> exit_priority = std::nullopt);
    ~Finalize();
    Finalize(Finalize&& other) noexcept;
    Finalize& operator=(Finalize&& other) noexcept;
    Finalize(const Finalize&) = delete;
    Finalize& operator=(const Finalize&) = delete;

    /// Runs the callback now, unless it already ran or was cancelled (or this is another
    /// process than the one that created it). Python's __call__.
    void operator()() noexcept;
    /// The callback will never run.
    void cancel() noexcept;
    /// True while the callback has neither run nor been cancelled.
    bool still_active() const noexcept;

    struct State;

private:
    std::shared_ptr<State> state_;
};

/// Runs, in priority order, every finalizer of this process that has an exit priority of at
/// least `min_priority` (all when std::nullopt). What normal exit does (Python's
/// _run_finalizers); for a program that leaves with _exit.
void run_finalizers(std::optional<int> min_priority = std::nullopt) noexcept;

}  // namespace util
}  // namespace mp
