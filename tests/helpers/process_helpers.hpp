#pragma once
// What the Process tests (process_test.cpp, process_forkserver_test.cpp, process_program_test.cpp)
// share: pipes and gates between the test and its children, files children report through,
// mp_test_child as a whole program, and the targets the children run.
//
// Included by one test file per binary; the functions are inline so a test that uses only some
// of them builds without warnings.

#include <algorithm>
#include <atomic>
#include <cctype>
#include <cerrno>
#include <chrono>
#include <condition_variable>
#include <csignal>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <dirent.h>
#include <fcntl.h>
#include <fstream>
#include <gtest/gtest.h>
#include <initializer_list>
#include <memory>
#include <mutex>
#include <optional>
#include <poll.h>
#include <sched.h>
#include <set>
#include <spawn.h>
#include <sstream>
#include <stdexcept>
#include <string>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <thread>
#include <unistd.h>
#include <utility>
#include <vector>
#include "helpers/leak_check.hpp"
#include "helpers/timeouts.hpp"
#include "mp/process.hpp"
#include "helpers/lines.hpp"
#include "helpers/program.hpp"
#include "helpers/temp_dir.hpp"

namespace {

using mp::test::count_of;
using mp::test::read_line;
using mp::test::write_str;

using namespace std::chrono_literals;
using Clock = std::chrono::steady_clock;

/// The bound on a wait that is expected to succeed.
constexpr auto kLong = 10s;

constexpr const char* kOneServer =
    "expected one process with comm 'mp-forkserver' connected to this one";

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

class UniqueFd {
public:
    UniqueFd() = default;
    explicit UniqueFd(int fd) : fd_(fd) {}
    UniqueFd(UniqueFd&& o) noexcept : fd_(std::exchange(o.fd_, -1)) {}
    UniqueFd& operator=(UniqueFd&& o) noexcept {
        reset(std::exchange(o.fd_, -1));
        return *this;
    }
    ~UniqueFd() { reset(); }
    int get() const { return fd_; }
    void reset(int fd = -1) {
        if (fd_ >= 0) ::close(fd_);
        fd_ = fd;
    }

private:
    int fd_ = -1;
};

struct TestPipe {
    UniqueFd r, w;
    TestPipe() {
        int fds[2];
        if (::pipe2(fds, O_CLOEXEC) != 0) throw std::runtime_error("pipe2 failed");
        r.reset(fds[0]);
        w.reset(fds[1]);
    }
};

/// A gate children wait on: each open() lets one waiting child through.
struct Gate {
    TestPipe pipe;
    int reader() const { return pipe.r.get(); }
    void open(int children = 1) {
        for (int i = 0; i < children; ++i) write_str(pipe.w.get(), "x");
    }
};

/// Child side of a Gate: waits (at most 10 s) for one byte.
inline void wait_gate(int fd) {
    pollfd pfd{fd, POLLIN, 0};
    if (::poll(&pfd, 1, 10000) == 1) {
        char c = 0;
        (void)!::read(fd, &c, 1);
    }
}

/// Sleeps in short steps for at most `limit`: a child that should be ended by a signal still
/// goes away by itself if the test is broken.
inline void block_for(std::chrono::seconds limit) {
    const auto deadline = Clock::now() + limit;
    while (Clock::now() < deadline) std::this_thread::sleep_for(10ms);
}

inline void no_core_dump() {
    rlimit no_core{0, 0};
    ::setrlimit(RLIMIT_CORE, &no_core);
}

inline std::string hex(const std::string& bytes) {
    static const char digits[] = "0123456789abcdef";
    std::string out;
    for (unsigned char c : bytes) {
        out += digits[c >> 4];
        out += digits[c & 15];
    }
    return out;
}

inline std::string lower(std::string s) {
    std::transform(s.begin(), s.end(), s.begin(),
                   [](unsigned char c) { return static_cast<char>(std::tolower(c)); });
    return s;
}

/// True when `text` mentions one of `words` (case-insensitive).
inline bool mentions_any(const std::string& text, std::initializer_list<const char*> words) {
    const std::string t = lower(text);
    return std::any_of(words.begin(), words.end(),
                       [&](const char* w) { return t.find(lower(w)) != std::string::npos; });
}

/// Runs `f`, which must throw mp::ProcessError; returns its what() (empty, and a failure, when
/// it threw something else or nothing).
template <class F>
std::string process_error_message(F&& f) {
    try {
        f();
    } catch (const mp::ProcessError& e) {
        return e.what();
    } catch (const std::exception& e) {
        ADD_FAILURE() << "expected mp::ProcessError, got another exception: " << e.what();
        return {};
    } catch (...) {
        ADD_FAILURE() << "expected mp::ProcessError, got a non-std exception";
        return {};
    }
    ADD_FAILURE() << "expected mp::ProcessError, nothing was thrown";
    return {};
}

#define EXPECT_PROCESS_ERROR(statement, ...)                                              \
    do {                                                                                  \
        const std::string mp_msg_ = process_error_message([&] { (void)(statement); });    \
        if (!mp_msg_.empty()) {                                                           \
            EXPECT_TRUE(mentions_any(mp_msg_, {__VA_ARGS__}))                             \
                << #statement << ": the ProcessError message does not say why: " << mp_msg_; \
        }                                                                                 \
    } while (0)

using mp::test::TempDir;

inline std::optional<std::string> slurp(const std::string& path) {
    std::ifstream in(path, std::ios::binary);
    if (!in) return std::nullopt;
    std::ostringstream s;
    s << in.rdbuf();
    return s.str();
}

/// Child side: writes `text` to `path` so that a reader never sees it half written.
inline void write_file_atomically(const std::string& path, const std::string& text) {
    const std::string tmp = path + ".tmp";
    int fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    if (fd < 0) return;
    write_str(fd, text);
    ::close(fd);
    ::rename(tmp.c_str(), path.c_str());
}

/// Waits (bounded) for a file to appear; returns its content.
inline std::optional<std::string> wait_for_file(const std::string& path,
                                         std::chrono::milliseconds timeout = kLong) {
    const auto deadline = Clock::now() + timeout;
    for (;;) {
        if (auto s = slurp(path)) return s;
        if (Clock::now() >= deadline) return std::nullopt;
        std::this_thread::sleep_for(2ms);
    }
}

inline std::vector<std::string> lines_of(const std::string& text) {
    std::vector<std::string> out;
    std::istringstream in(text);
    std::string line;
    while (std::getline(in, line)) out.push_back(line);
    return out;
}

/// The value after "key " on the first line that starts with it.
inline std::optional<std::string> field(const std::string& text, const std::string& key) {
    for (const auto& line : lines_of(text)) {
        if (line.rfind(key + " ", 0) == 0) return line.substr(key.size() + 1);
    }
    return std::nullopt;
}

/// The pid a pidfd refers to (the "Pid:" line of its fdinfo).
inline std::optional<pid_t> pidfd_target(int fd) {
    auto info = slurp("/proc/self/fdinfo/" + std::to_string(fd));
    if (!info) return std::nullopt;
    for (const auto& line : lines_of(*info)) {
        if (line.rfind("Pid:", 0) == 0) return static_cast<pid_t>(std::stol(line.substr(4)));
    }
    return std::nullopt;
}

inline bool poll_readable(int fd, std::chrono::milliseconds timeout) {
    pollfd pfd{fd, POLLIN, 0};
    int r = ::poll(&pfd, 1, static_cast<int>(timeout.count()));
    return r == 1 && (pfd.revents & POLLIN) != 0;
}

inline std::string describe_fds(const std::vector<mp::test::FdInfo>& fds) {
    std::string s;
    for (const auto& f : fds) s += "\n  fd " + std::to_string(f.fd) + " -> " + f.target;
    return s;
}

/// Fails the calling test when the process is still alive after `timeout`.
class Watchdog {
public:
    Watchdog(std::chrono::seconds limit, std::string what)
        : thread_([this, limit, what = std::move(what)] {
              std::unique_lock<std::mutex> lock(mutex_);
              if (!cv_.wait_for(lock, limit, [this] { return done_; })) {
                  std::fprintf(stderr, "watchdog: %s did not finish within %lld s\n", what.c_str(),
                               static_cast<long long>(limit.count()));
                  std::fflush(stderr);
                  std::_Exit(124);
              }
          }) {}
    ~Watchdog() {
        {
            std::lock_guard<std::mutex> lock(mutex_);
            done_ = true;
        }
        cv_.notify_all();
        thread_.join();
    }

private:
    std::mutex mutex_;
    std::condition_variable cv_;
    bool done_ = false;
    std::thread thread_;
};

/// Makes this process adopt the orphans of the programs it starts (PR_SET_CHILD_SUBREAPER), so a
/// test sees (and reaps) any process a program left behind.
class Subreaper {
public:
    Subreaper() {
        for (const auto& c : mp::test::list_children()) before_.insert(c.pid);
        ::prctl(PR_SET_CHILD_SUBREAPER, 1);
    }
    ~Subreaper() {
        (void)reap(0ms);
        ::prctl(PR_SET_CHILD_SUBREAPER, 0);
    }
    Subreaper(const Subreaper&) = delete;
    Subreaper& operator=(const Subreaper&) = delete;

    /// Waits up to `timeout` for the adopted orphans to end and reaps them. Those still running
    /// then are described in the result, killed and reaped.
    std::vector<std::string> reap(std::chrono::milliseconds timeout) {
        const auto deadline = Clock::now() + timeout;
        for (;;) {
            std::vector<mp::test::ProcInfo> running;
            for (const auto& c : mp::test::list_children()) {
                if (before_.count(c.pid) != 0) continue;
                if (c.state == 'Z') {
                    ::waitpid(c.pid, nullptr, 0);
                } else {
                    running.push_back(c);
                }
            }
            if (running.empty()) return {};
            if (Clock::now() >= deadline) {
                std::vector<std::string> out;
                for (const auto& c : running) {
                    out.push_back("pid " + std::to_string(c.pid) + " comm '" + c.comm +
                                  "' cmdline '" + c.cmdline + "'");
                    ::kill(c.pid, SIGKILL);
                    ::waitpid(c.pid, nullptr, 0);
                }
                return out;
            }
            std::this_thread::sleep_for(5ms);
        }
    }

private:
    std::set<pid_t> before_;
};

inline std::string joined(const std::vector<std::string>& v) {
    std::string s;
    for (const auto& x : v) s += "\n  " + x;
    return s;
}

/// mp_test_child, started with posix_spawn; stdout and stderr go to files (a pipe would stay
/// open as long as any process the program started holds it).
class Program {
public:
    Program(const TempDir& dir, std::vector<std::string> args, const std::string& stdin_path = "") {
        static int counter = 0;
        const std::string tag = "prog" + std::to_string(++counter);
        out_path_ = dir.file(tag + ".out");
        err_path_ = dir.file(tag + ".err");
        const char* in = stdin_path.empty() ? "/dev/null" : stdin_path.c_str();
        pid_ = mp::test::spawn_test_child(std::move(args), [&](posix_spawn_file_actions_t& fa) {
            posix_spawn_file_actions_addopen(&fa, 0, in, O_RDONLY, 0);
            posix_spawn_file_actions_addopen(&fa, 1, out_path_.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
            posix_spawn_file_actions_addopen(&fa, 2, err_path_.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
        });
    }
    ~Program() {
        if (!reaped_) {
            ::kill(pid_, SIGKILL);
            ::waitpid(pid_, &status_, 0);
        }
    }
    Program(const Program&) = delete;
    Program& operator=(const Program&) = delete;

    pid_t pid() const { return pid_; }
    /// Waits for the program to end; false (and the program killed) after `timeout`.
    bool wait(std::chrono::milliseconds timeout = kLong) {
        const auto deadline = Clock::now() + timeout;
        while (!reaped_) {
            pid_t r = ::waitpid(pid_, &status_, WNOHANG);
            if (r == pid_) {
                reaped_ = true;
                break;
            }
            if (Clock::now() >= deadline) {
                ::kill(pid_, SIGKILL);
                ::waitpid(pid_, &status_, 0);
                reaped_ = true;
                return false;
            }
            std::this_thread::sleep_for(2ms);
        }
        return true;
    }
    void signal(int sig) { ::kill(pid_, sig); }
    int status() const { return status_; }
    bool exited_with(int code) const { return WIFEXITED(status_) && WEXITSTATUS(status_) == code; }
    std::string out() const { return slurp(out_path_).value_or(""); }
    std::string err() const { return slurp(err_path_).value_or(""); }
    std::string describe() const {
        std::string s = "status ";
        if (WIFEXITED(status_)) s += "exit " + std::to_string(WEXITSTATUS(status_));
        if (WIFSIGNALED(status_)) s += "signal " + std::to_string(WTERMSIG(status_));
        return s + "\n--- stdout ---\n" + out() + "\n--- stderr ---\n" + err();
    }

private:
    pid_t pid_ = -1;
    int status_ = 0;
    bool reaped_ = false;
    std::string out_path_, err_path_;
};

/// Redirects this process's fd 2 to a file while it lives (a forked child inherits it).
class StderrToFile {
public:
    explicit StderrToFile(const std::string& path) {
        std::fflush(stderr);
        file_.reset(::open(path.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644));
        saved_.reset(::fcntl(2, F_DUPFD_CLOEXEC, 3));
        ::dup2(file_.get(), 2);
    }
    ~StderrToFile() {
        std::fflush(stderr);
        ::dup2(saved_.get(), 2);
    }

private:
    UniqueFd file_, saved_;
};

inline std::optional<int> process_number(const std::string& name) {
    if (name.rfind("Process-", 0) != 0) return std::nullopt;
    const std::string rest = name.substr(8);
    if (rest.empty() || rest.find_first_not_of("0123456789") != std::string::npos) {
        return std::nullopt;
    }
    return std::stoi(rest);
}

inline std::optional<mp::ChildProcess> find_child(const std::vector<mp::ChildProcess>& kids, pid_t pid) {
    for (const auto& k : kids) {
        if (k.pid() == pid) return k;
    }
    return std::nullopt;
}

inline bool contains_pid(const std::vector<mp::ChildProcess>& kids, pid_t pid) {
    return find_child(kids, pid).has_value();
}

/// True when this process runs only the current test (as under ctest): process-wide settings
/// such as the start method are then still untouched.
inline bool running_alone() { return ::testing::UnitTest::GetInstance()->test_to_run_count() == 1; }

inline mp::ProcessOptions forkserver_options() {
    mp::ProcessOptions o;
    o.start_method = mp::StartMethod::forkserver;
    return o;
}

// ---- targets ----

inline void report_args(int w, std::string s, int n, std::vector<int> v) {
    write_str(w, s + " " + std::to_string(n) + " " + std::to_string(v.size()) + "\n");
}

struct Greeter {
    std::string greeting;
    void greet(int w, const std::string& who) const { write_str(w, greeting + " " + who + "\n"); }
};

class Reporter : public mp::Process {
public:
    Reporter(int w, std::string msg) : w_(w), msg_(std::move(msg)) {}
    Reporter(mp::ProcessOptions options, int w, std::string msg)
        : mp::Process(std::move(options)), w_(w), msg_(std::move(msg)) {}

protected:
    void run() override { write_str(w_, msg_ + " " + mp::current_process().name + "\n"); }

private:
    int w_;
    std::string msg_;
};

class ThrowingProcess : public mp::Process {
protected:
    void run() override { throw std::runtime_error("thrown by run()"); }
};

class NoopProcess : public mp::Process {
public:
    using mp::Process::Process;

protected:
    void run() override {}
};

// Forkserver targets: plain functions whose arguments have codecs.
inline void fs_noop() {}
inline void fs_exit_sum(std::string s, int n) { ::_exit(static_cast<int>(s.size()) + n); }
inline void fs_throw(std::string msg) { throw std::runtime_error(msg); }
inline void fs_block() { block_for(60s); }
inline void fs_wait_for_file(std::string path) {
    // Long enough for 40 starts under ASan on a loaded machine before the gate opens.
    const auto deadline = Clock::now() + 30s;
    while (::access(path.c_str(), F_OK) != 0) {
        if (Clock::now() >= deadline) ::_exit(3);
        std::this_thread::sleep_for(2ms);
    }
}
inline void fs_report_identity(std::string path) {
    const auto& me = mp::current_process();
    std::string text = "name " + me.name + "\n";
    text += "pid " + std::to_string(me.pid) + "\n";
    text += "getpid " + std::to_string(::getpid()) + "\n";
    text += "getppid " + std::to_string(::getppid()) + "\n";
    text += "authkey " + hex(me.authkey) + "\n";
    text += std::string("daemon ") + (me.daemon ? "1" : "0") + "\n";
    std::string id;
    for (int i : me.identity) id += std::to_string(i) + ",";
    text += "identity " + id + "\n";
    auto parent = mp::parent_process();
    text += "parent " + (parent ? parent->name + " " + std::to_string(parent->pid) + " " +
                                      (parent->is_alive() ? "alive" : "dead")
                                : std::string("none")) + "\n";
    write_file_atomically(path, text);
}
/// A forkserver child that starts children of its own (fork method, the default there).
inline void fs_start_grandchildren(std::string path) {
    std::string text;
    try {
        mp::Process g1([] { ::_exit(5); });
        mp::Process g2([] {});
        g1.start();
        g2.start();
        g1.join();
        g2.join();
        text = "names " + g1.name() + " " + g2.name() + "\nexitcodes " +
               std::to_string(g1.exitcode().value_or(-999)) + " " +
               std::to_string(g2.exitcode().value_or(-999)) + "\nactive " +
               std::to_string(mp::active_children().size()) + "\n";
    } catch (const std::exception& e) {
        text = std::string("error ") + e.what() + "\n";
    }
    write_file_atomically(path, text);
}
inline void fs_check_size(std::string s, std::size_t n) {
    const bool ok =
        s.size() == n && std::all_of(s.begin(), s.end(), [](char c) { return c == 'x'; });
    ::_exit(ok ? 0 : 1);
}

struct EmptyFunctionObject {
    void operator()(int code) const { ::_exit(code); }
};

/// Has no mp::Codec: not trivially copyable, no serialize().
struct NoCodec {
    explicit NoCodec(std::string t) : text(std::move(t)) {}
    std::string text;
    virtual ~NoCodec() = default;
};

}  // namespace
