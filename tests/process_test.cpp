// Tests of mp::Process and the functions of include/mp/process.hpp.
//
// ctest runs every TEST in a process of its own (gtest_discover_tests), and the shared main
// (helpers/test_main.cpp) fails a test that leaves a child, an fd or a /dev/shm entry behind.
// Children report to the test through pipes (fork) or files (forkserver: the child does not
// inherit this process's fds). Every wait that should end is bounded (kLong); nothing asserts on
// speed. Behaviour that needs a process of its own (program exit, a killed parent, threads,
// atexit) runs in the helper program mp_test_child (helpers/child_main.cpp).

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

#include "helpers/temp_dir.hpp"
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

extern char** environ;

namespace {

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

/// Writes all of `s`; used in children, so it reports nothing.
void write_str(int fd, const std::string& s) {
    const char* p = s.data();
    std::size_t left = s.size();
    while (left > 0) {
        ssize_t n = ::write(fd, p, left);
        if (n < 0 && errno == EINTR) continue;
        if (n <= 0) return;
        p += n;
        left -= static_cast<std::size_t>(n);
    }
}

/// One line (without its '\n') from `fd`, or std::nullopt on timeout or end of file.
std::optional<std::string> read_line(int fd, std::chrono::milliseconds timeout = kLong) {
    const auto deadline = Clock::now() + timeout;
    std::string line;
    for (;;) {
        auto left = std::chrono::duration_cast<std::chrono::milliseconds>(deadline - Clock::now());
        if (left.count() < 0) return std::nullopt;
        pollfd pfd{fd, POLLIN, 0};
        int r = ::poll(&pfd, 1, static_cast<int>(left.count()));
        if (r < 0 && errno == EINTR) continue;
        if (r <= 0) return std::nullopt;
        char c = 0;
        ssize_t n = ::read(fd, &c, 1);
        if (n < 0 && errno == EINTR) continue;
        if (n <= 0) return std::nullopt;
        if (c == '\n') return line;
        line += c;
    }
}

/// A gate children wait on: each open() lets one waiting child through.
struct Gate {
    TestPipe pipe;
    int reader() const { return pipe.r.get(); }
    void open(int children = 1) {
        for (int i = 0; i < children; ++i) write_str(pipe.w.get(), "x");
    }
};

/// Child side of a Gate: waits (at most 10 s) for one byte.
void wait_gate(int fd) {
    pollfd pfd{fd, POLLIN, 0};
    if (::poll(&pfd, 1, 10000) == 1) {
        char c = 0;
        (void)!::read(fd, &c, 1);
    }
}

/// Sleeps in short steps for at most `limit`: a child that should be ended by a signal still
/// goes away by itself if the test is broken.
void block_for(std::chrono::seconds limit) {
    const auto deadline = Clock::now() + limit;
    while (Clock::now() < deadline) std::this_thread::sleep_for(10ms);
}

void no_core_dump() {
    rlimit no_core{0, 0};
    ::setrlimit(RLIMIT_CORE, &no_core);
}

std::string hex(const std::string& bytes) {
    static const char digits[] = "0123456789abcdef";
    std::string out;
    for (unsigned char c : bytes) {
        out += digits[c >> 4];
        out += digits[c & 15];
    }
    return out;
}

std::string lower(std::string s) {
    std::transform(s.begin(), s.end(), s.begin(),
                   [](unsigned char c) { return static_cast<char>(std::tolower(c)); });
    return s;
}

/// True when `text` mentions one of `words` (case-insensitive).
bool mentions_any(const std::string& text, std::initializer_list<const char*> words) {
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

std::optional<std::string> slurp(const std::string& path) {
    std::ifstream in(path, std::ios::binary);
    if (!in) return std::nullopt;
    std::ostringstream s;
    s << in.rdbuf();
    return s.str();
}

/// Child side: writes `text` to `path` so that a reader never sees it half written.
void write_file_atomically(const std::string& path, const std::string& text) {
    const std::string tmp = path + ".tmp";
    int fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    if (fd < 0) return;
    write_str(fd, text);
    ::close(fd);
    ::rename(tmp.c_str(), path.c_str());
}

/// Waits (bounded) for a file to appear; returns its content.
std::optional<std::string> wait_for_file(const std::string& path,
                                         std::chrono::milliseconds timeout = kLong) {
    const auto deadline = Clock::now() + timeout;
    for (;;) {
        if (auto s = slurp(path)) return s;
        if (Clock::now() >= deadline) return std::nullopt;
        std::this_thread::sleep_for(2ms);
    }
}

std::vector<std::string> lines_of(const std::string& text) {
    std::vector<std::string> out;
    std::istringstream in(text);
    std::string line;
    while (std::getline(in, line)) out.push_back(line);
    return out;
}

/// The value after "key " on the first line that starts with it.
std::optional<std::string> field(const std::string& text, const std::string& key) {
    for (const auto& line : lines_of(text)) {
        if (line.rfind(key + " ", 0) == 0) return line.substr(key.size() + 1);
    }
    return std::nullopt;
}

std::size_t count_of(const std::string& text, const std::string& what) {
    std::size_t n = 0;
    for (auto pos = text.find(what); pos != std::string::npos; pos = text.find(what, pos + 1)) ++n;
    return n;
}

/// The pid a pidfd refers to (the "Pid:" line of its fdinfo).
std::optional<pid_t> pidfd_target(int fd) {
    auto info = slurp("/proc/self/fdinfo/" + std::to_string(fd));
    if (!info) return std::nullopt;
    for (const auto& line : lines_of(*info)) {
        if (line.rfind("Pid:", 0) == 0) return static_cast<pid_t>(std::stol(line.substr(4)));
    }
    return std::nullopt;
}

bool poll_readable(int fd, std::chrono::milliseconds timeout) {
    pollfd pfd{fd, POLLIN, 0};
    int r = ::poll(&pfd, 1, static_cast<int>(timeout.count()));
    return r == 1 && (pfd.revents & POLLIN) != 0;
}

std::string describe_fds(const std::vector<mp::test::FdInfo>& fds) {
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

std::string joined(const std::vector<std::string>& v) {
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
        args.insert(args.begin(), MP_TEST_CHILD);
        std::vector<char*> argv;
        for (auto& a : args) argv.push_back(a.data());
        argv.push_back(nullptr);
        posix_spawn_file_actions_t fa;
        posix_spawn_file_actions_init(&fa);
        const char* in = stdin_path.empty() ? "/dev/null" : stdin_path.c_str();
        posix_spawn_file_actions_addopen(&fa, 0, in, O_RDONLY, 0);
        posix_spawn_file_actions_addopen(&fa, 1, out_path_.c_str(), O_WRONLY | O_CREAT | O_TRUNC,
                                         0644);
        posix_spawn_file_actions_addopen(&fa, 2, err_path_.c_str(), O_WRONLY | O_CREAT | O_TRUNC,
                                         0644);
        int rc = ::posix_spawn(&pid_, MP_TEST_CHILD, &fa, nullptr, argv.data(), environ);
        posix_spawn_file_actions_destroy(&fa);
        if (rc != 0) throw std::runtime_error("posix_spawn " MP_TEST_CHILD " failed");
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

std::optional<int> process_number(const std::string& name) {
    if (name.rfind("Process-", 0) != 0) return std::nullopt;
    const std::string rest = name.substr(8);
    if (rest.empty() || rest.find_first_not_of("0123456789") != std::string::npos) {
        return std::nullopt;
    }
    return std::stoi(rest);
}

std::optional<mp::ChildProcess> find_child(const std::vector<mp::ChildProcess>& kids, pid_t pid) {
    for (const auto& k : kids) {
        if (k.pid() == pid) return k;
    }
    return std::nullopt;
}

bool contains_pid(const std::vector<mp::ChildProcess>& kids, pid_t pid) {
    return find_child(kids, pid).has_value();
}

/// True when this process runs only the current test (as under ctest): process-wide settings
/// such as the start method are then still untouched.
bool running_alone() { return ::testing::UnitTest::GetInstance()->test_to_run_count() == 1; }

mp::ProcessOptions forkserver_options() {
    mp::ProcessOptions o;
    o.start_method = mp::StartMethod::forkserver;
    return o;
}

// ---- targets ----

void report_args(int w, std::string s, int n, std::vector<int> v) {
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
void fs_noop() {}
void fs_exit_sum(std::string s, int n) { ::_exit(static_cast<int>(s.size()) + n); }
void fs_throw(std::string msg) { throw std::runtime_error(msg); }
void fs_block() { block_for(60s); }
void fs_wait_for_file(std::string path) {
    const auto deadline = Clock::now() + 10s;
    while (::access(path.c_str(), F_OK) != 0) {
        if (Clock::now() >= deadline) ::_exit(3);
        std::this_thread::sleep_for(2ms);
    }
}
void fs_report_identity(std::string path) {
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
void fs_start_grandchildren(std::string path) {
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
void fs_check_size(std::string s, std::size_t n) {
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

// ---------------------------------------------------------------------------------------------
// Start methods. DefaultIsFork must see a process where nothing has set the method yet: ctest
// runs each test in its own process (and it comes first for a whole-binary run).
// ---------------------------------------------------------------------------------------------

TEST(ProcessStartMethod, DefaultIsFork) {
    EXPECT_EQ(mp::get_start_method(), mp::StartMethod::fork);
    mp::Process p([] {});
    EXPECT_EQ(p.start_method(), mp::StartMethod::fork);
}

TEST(ProcessStartMethod, ToString) {
    EXPECT_EQ(mp::to_string(mp::StartMethod::fork), "fork");
    EXPECT_EQ(mp::to_string(mp::StartMethod::forkserver), "forkserver");
}

TEST(ProcessStartMethod, SecondSetThrowsUnlessForced) {
    if (running_alone()) {
        EXPECT_NO_THROW(mp::set_start_method(mp::StartMethod::fork)) << "the first set succeeds";
    } else {
        mp::set_start_method(mp::StartMethod::fork, true);  // an earlier test may have set it
    }
    EXPECT_PROCESS_ERROR(mp::set_start_method(mp::StartMethod::fork), "already", "set");
    EXPECT_PROCESS_ERROR(mp::set_start_method(mp::StartMethod::forkserver), "already", "set");
    EXPECT_EQ(mp::get_start_method(), mp::StartMethod::fork);

    EXPECT_NO_THROW(mp::set_start_method(mp::StartMethod::forkserver, true));
    EXPECT_EQ(mp::get_start_method(), mp::StartMethod::forkserver);
    mp::Process p(fs_noop);
    EXPECT_EQ(p.start_method(), mp::StartMethod::forkserver);

    EXPECT_NO_THROW(mp::set_start_method(mp::StartMethod::fork, true));
    EXPECT_EQ(mp::get_start_method(), mp::StartMethod::fork);
    mp::Process q(fs_noop);
    EXPECT_EQ(q.start_method(), mp::StartMethod::fork);
    EXPECT_EQ(p.start_method(), mp::StartMethod::forkserver) << "chosen when p was created";
}

TEST(ProcessStartMethod, PerProcessOptionOverridesTheDefault) {
    TempDir dir;
    mp::Process fs(forkserver_options(), fs_report_identity, dir.file("fs"));
    mp::Process fk(fs_report_identity, dir.file("fork"));
    EXPECT_EQ(fs.start_method(), mp::StartMethod::forkserver);
    EXPECT_EQ(fk.start_method(), mp::StartMethod::fork);
    EXPECT_EQ(mp::get_start_method(), mp::StartMethod::fork);
    fs.start();
    fk.start();
    ASSERT_TRUE(fs.join(kLong));
    ASSERT_TRUE(fk.join(kLong));
    EXPECT_EQ(fs.exitcode(), 0);
    EXPECT_EQ(fk.exitcode(), 0);

    auto fs_text = slurp(dir.file("fs"));
    auto fk_text = slurp(dir.file("fork"));
    ASSERT_TRUE(fs_text && fk_text);
    EXPECT_EQ(field(*fk_text, "getppid"), std::to_string(::getpid()));
    const std::string server = field(*fs_text, "getppid").value_or("?");
    EXPECT_NE(server, std::to_string(::getpid())) << "a forkserver child is forked by the server";
    auto servers = mp::test::forkservers();
    ASSERT_EQ(servers.size(), 1u) << kOneServer;
    EXPECT_EQ(server, std::to_string(servers[0].pid));
}

// ---------------------------------------------------------------------------------------------
// Creating and running a Process
// ---------------------------------------------------------------------------------------------

TEST(Process, TargetWithArgumentsRunsInTheChild) {
    TestPipe out;
    mp::Process p(report_args, out.w.get(), std::string("egon"), 42, std::vector<int>{1, 2, 3});
    p.start();
    EXPECT_EQ(read_line(out.r.get()), "egon 42 3");
    ASSERT_TRUE(p.join(kLong));
    EXPECT_EQ(p.exitcode(), 0);
}

TEST(Process, CapturingLambdaRunsUnderFork) {
    TestPipe out;
    const std::string greeting = "captured";
    mp::Process p([w = out.w.get(), greeting](int n) {
        write_str(w, greeting + " " + std::to_string(n) + " " + std::to_string(::getpid()) + "\n");
    }, 5);
    p.start();
    EXPECT_EQ(read_line(out.r.get()), "captured 5 " + std::to_string(p.pid()));
    ASSERT_TRUE(p.join(kLong));
    EXPECT_EQ(p.exitcode(), 0);
}

TEST(Process, ArgumentsAreCopiedAtConstruction) {
    TestPipe out;
    std::string s = "before";
    mp::Process p([w = out.w.get()](const std::string& x) { write_str(w, x + "\n"); }, s);
    s = "after";
    p.start();
    EXPECT_EQ(read_line(out.r.get()), "before");
    ASSERT_TRUE(p.join(kLong));
}

TEST(Process, MemberFunctionTarget) {
    TestPipe out;
    mp::Process p(&Greeter::greet, Greeter{"hello"}, out.w.get(), std::string("world"));
    p.start();
    EXPECT_EQ(read_line(out.r.get()), "hello world");
    ASSERT_TRUE(p.join(kLong));
    EXPECT_EQ(p.exitcode(), 0);
}

TEST(Process, SubclassOverridingRun) {
    TestPipe out;
    Reporter r(out.w.get(), "from run()");
    r.start();
    EXPECT_EQ(read_line(out.r.get()), "from run() " + r.name());
    ASSERT_TRUE(r.join(kLong));
    EXPECT_EQ(r.exitcode(), 0);
}

TEST(Process, SubclassWithOptions) {
    TestPipe out;
    mp::ProcessOptions o;
    o.name = "reporter";
    Reporter r(o, out.w.get(), "hi");
    EXPECT_EQ(r.name(), "reporter");
    r.start();
    EXPECT_EQ(read_line(out.r.get()), "hi reporter");
    ASSERT_TRUE(r.join(kLong));
    EXPECT_EQ(r.exitcode(), 0);
}

TEST(Process, ExceptionFromSubclassRunGivesExitCodeOne) {
    TempDir dir;
    ThrowingProcess p;
    {
        StderrToFile redirect(dir.file("stderr"));
        p.start();
    }
    ASSERT_TRUE(p.join(kLong));
    EXPECT_EQ(p.exitcode(), 1);
    const std::string err = slurp(dir.file("stderr")).value_or("");
    EXPECT_NE(err.find("Process " + p.name() + ":"), std::string::npos) << err;
    EXPECT_NE(err.find("thrown by run()"), std::string::npos) << err;
}

TEST(Process, DefaultConstructedProcessRunsNothing) {
    mp::Process p;
    p.start();
    ASSERT_TRUE(p.join(kLong));
    EXPECT_EQ(p.exitcode(), 0);
}

TEST(Process, PidIsZeroBeforeStartAndTheChildsPidAfter) {
    TestPipe out;
    mp::Process p([w = out.w.get()] { write_str(w, std::to_string(::getpid()) + "\n"); });
    EXPECT_EQ(p.pid(), 0);
    p.start();
    EXPECT_GT(p.pid(), 0);
    EXPECT_NE(p.pid(), ::getpid());
    EXPECT_EQ(read_line(out.r.get()), std::to_string(p.pid()));
    const pid_t pid = p.pid();
    ASSERT_TRUE(p.join(kLong));
    EXPECT_EQ(p.pid(), pid) << "pid() stays the child's pid after join";
}

TEST(Process, StateBeforeStart) {
    mp::Process p([] {});
    EXPECT_FALSE(p.is_alive());
    EXPECT_FALSE(p.exitcode().has_value());
    EXPECT_EQ(p.pid(), 0);
}

TEST(Process, JoinWithTimeoutReturnsFalseWhileTheChildRuns) {
    Gate gate;
    mp::Process p([r = gate.reader()] { wait_gate(r); });
    p.start();
    EXPECT_TRUE(p.is_alive());
    EXPECT_FALSE(p.join(20ms));
    EXPECT_FALSE(p.join(0ms));
    EXPECT_FALSE(p.join(std::chrono::duration<double>(0.01)));
    EXPECT_TRUE(p.is_alive());
    EXPECT_FALSE(p.exitcode().has_value());
    gate.open();
    EXPECT_TRUE(p.join(kLong));
    EXPECT_FALSE(p.is_alive());
    EXPECT_EQ(p.exitcode(), 0);
    EXPECT_TRUE(p.join(0ms)) << "joining an ended child again returns at once";
    p.join();
}

TEST(Process, JoinWaitsForTheChild) {
    TempDir dir;
    const std::string marker = dir.file("done");
    mp::Process p([marker] {
        std::this_thread::sleep_for(50ms);
        write_file_atomically(marker, "done");
    });
    p.start();
    p.join();
    EXPECT_EQ(slurp(marker), "done");
    EXPECT_FALSE(p.is_alive());
    EXPECT_EQ(p.exitcode(), 0);
}

TEST(Process, JoinWithANegativeTimeoutDoesNotBlock) {
    Gate gate;
    mp::Process p([r = gate.reader()] { wait_gate(r); });
    p.start();
    EXPECT_FALSE(p.join(-1s));
    EXPECT_FALSE(p.join(std::chrono::nanoseconds::min()));
    EXPECT_TRUE(p.is_alive());
    gate.open();
    EXPECT_TRUE(p.join(kLong));
}

TEST(Process, JoinWithTheLargestTimeoutWaits) {
    // duration::max() is the usual way to say "no limit"; it must not wrap to a negative wait.
    Gate gate;
    mp::Process p([r = gate.reader()] { wait_gate(r); });
    p.start();
    std::thread opener([&] {
        std::this_thread::sleep_for(50ms);
        gate.open();
    });
    const bool ended = p.join(std::chrono::seconds::max());
    opener.join();
    EXPECT_TRUE(ended) << "join(seconds::max()) returned before the child ended";
    EXPECT_TRUE(p.join(kLong));
    EXPECT_EQ(p.exitcode(), 0);
}

TEST(Process, JoinTimeoutValues) {
    // issue 12 item 5: "for ever" durations of every type wait, zero and negative ones only look;
    // Process::join and ChildProcess::join alike.
    mp::test::for_each_forever([&](auto forever) {
        for (bool child_view : {false, true}) {
            Gate gate;
            mp::Process p([r = gate.reader()] { wait_gate(r); });
            p.start();
            std::thread opener([&] {
                std::this_thread::sleep_for(30ms);
                gate.open();
            });
            bool ended;
            if (child_view) {
                auto children = mp::active_children();
                ASSERT_EQ(children.size(), 1u);
                ended = children[0].join(forever);
            } else {
                ended = p.join(forever);
            }
            opener.join();
            EXPECT_TRUE(ended) << "returned before the child ended";
            EXPECT_TRUE(p.join(kLong));
        }
    });
    Gate gate;
    mp::Process p([r = gate.reader()] { wait_gate(r); });
    p.start();
    auto children = mp::active_children();
    ASSERT_EQ(children.size(), 1u);
    mp::test::for_each_no_wait([&](auto t) {
        EXPECT_FALSE(p.join(t));
        EXPECT_FALSE(children[0].join(t));
    });
    gate.open();
    ASSERT_TRUE(p.join(kLong));
    mp::test::for_each_no_wait([&](auto t) { EXPECT_TRUE(p.join(t)); });
}

TEST(Process, NonDaemonChildOutlivesTheThreadThatStartedIt) {
    Gate gate;
    mp::Process p([r = gate.reader()] { wait_gate(r); });
    std::thread starter([&] { p.start(); });
    starter.join();
    std::this_thread::sleep_for(20ms);
    EXPECT_TRUE(p.is_alive()) << "the child died with the thread that started it";
    gate.open();
    ASSERT_TRUE(p.join(kLong));
    EXPECT_EQ(p.exitcode(), 0);
}

TEST(Process, ManyChildrenAtOnceKeepTheirOwnExitCodes) {
    Gate gate;
    std::vector<std::unique_ptr<mp::Process>> ps;
    for (int i = 0; i < 40; ++i) {
        ps.push_back(std::make_unique<mp::Process>([r = gate.reader(), i] {
            wait_gate(r);
            ::_exit(i + 1);
        }));
        ps.back()->start();
    }
    EXPECT_EQ(mp::active_children().size(), ps.size());
    gate.open(static_cast<int>(ps.size()));
    // Join in reverse order: the statuses arrive in any order.
    for (int i = static_cast<int>(ps.size()) - 1; i >= 0; --i) {
        ASSERT_TRUE(ps[i]->join(kLong)) << i;
        EXPECT_EQ(ps[i]->exitcode(), i + 1);
    }
}

TEST(Process, StartAndJoinFromManyThreads) {
    constexpr int kThreads = 4;
    constexpr int kPerThread = 25;
    std::mutex mu;
    std::set<std::string> names;
    std::atomic<int> failures{0};
    std::vector<std::thread> threads;
    for (int t = 0; t < kThreads; ++t) {
        threads.emplace_back([&, t] {
            for (int i = 0; i < kPerThread; ++i) {
                mp::Process p([code = (t * kPerThread + i) % 200] { ::_exit(code); });
                p.start();
                if (!p.join(kLong) || p.exitcode() != (t * kPerThread + i) % 200) ++failures;
                std::lock_guard<std::mutex> lock(mu);
                names.insert(p.name());
            }
        });
    }
    for (auto& th : threads) th.join();
    EXPECT_EQ(failures.load(), 0);
    EXPECT_EQ(names.size(), static_cast<std::size_t>(kThreads * kPerThread))
        << "default names must be unique";
}

TEST(Process, IsAliveAndExitcodeNoticeTheEndWithoutJoin) {
    mp::Process p([] {});
    p.start();
    const auto deadline = Clock::now() + kLong;
    while (p.is_alive() && Clock::now() < deadline) std::this_thread::sleep_for(1ms);
    EXPECT_FALSE(p.is_alive());
    EXPECT_EQ(p.exitcode(), 0);
    EXPECT_FALSE(mp::test::pid_exists(p.pid())) << "is_alive() reaps an ended child";
    EXPECT_TRUE(p.join(kLong));
}

// ---------------------------------------------------------------------------------------------
// Exit codes
// ---------------------------------------------------------------------------------------------

TEST(ProcessExit, ReturningFromTheTargetGivesZero) {
    mp::Process p([] {});
    p.start();
    ASSERT_TRUE(p.join(kLong));
    EXPECT_EQ(p.exitcode(), 0);
}

TEST(ProcessExit, UnderscoreExitGivesItsCode) {
    mp::Process p([] { ::_exit(7); });
    p.start();
    ASSERT_TRUE(p.join(kLong));
    EXPECT_EQ(p.exitcode(), 7);
}

TEST(ProcessExit, SignalGivesMinusTheSignal) {
    mp::Process p([] {
        no_core_dump();
        std::signal(SIGSEGV, SIG_DFL);
        std::raise(SIGSEGV);
    });
    p.start();
    ASSERT_TRUE(p.join(kLong));
    EXPECT_EQ(p.exitcode(), -SIGSEGV);
}

TEST(ProcessExit, AbortGivesMinusSigabrt) {
    mp::Process p([] {
        no_core_dump();
        std::abort();
    });
    p.start();
    ASSERT_TRUE(p.join(kLong));
    EXPECT_EQ(p.exitcode(), -SIGABRT);
}

TEST(ProcessExit, ExceptionGivesOneAndIsReportedOnStderr) {
    TempDir dir;
    mp::Process p([] { throw std::runtime_error("boom from the child"); });
    {
        StderrToFile redirect(dir.file("stderr"));
        p.start();
    }
    ASSERT_TRUE(p.join(kLong));
    EXPECT_EQ(p.exitcode(), 1);
    const std::string err = slurp(dir.file("stderr")).value_or("");
    EXPECT_NE(err.find("Process " + p.name() + ":"), std::string::npos) << err;
    EXPECT_NE(err.find("boom from the child"), std::string::npos) << err;
}

TEST(ProcessExit, NonStdExceptionGivesOne) {
    TempDir dir;
    mp::Process p([] { throw 42; });
    {
        StderrToFile redirect(dir.file("stderr"));
        p.start();
    }
    ASSERT_TRUE(p.join(kLong));
    EXPECT_EQ(p.exitcode(), 1);
    const std::string err = slurp(dir.file("stderr")).value_or("");
    EXPECT_NE(err.find("Process " + p.name() + ":"), std::string::npos) << err;
}

TEST(ProcessExit, TerminateGivesMinusSigterm) {
    mp::Process p([] { block_for(60s); });
    p.start();
    p.terminate();
    ASSERT_TRUE(p.join(kLong));
    EXPECT_EQ(p.exitcode(), -SIGTERM);
    EXPECT_FALSE(p.is_alive());
}

TEST(ProcessExit, KillGivesMinusSigkill) {
    mp::Process p([] { block_for(60s); });
    p.start();
    p.kill();
    ASSERT_TRUE(p.join(kLong));
    EXPECT_EQ(p.exitcode(), -SIGKILL);
}

// ---- interrupt() (Python 3.14): SIGINT, and what a target makes of it ---------------------------

volatile std::sig_atomic_t g_interrupted = 0;

/// _sleep_some_event with Python's default behaviour spelled out: SIGINT sets a flag, which the
/// target turns into an exception that escapes it (Python: an uncaught KeyboardInterrupt).
void interrupted_throws(std::string ready) {
    struct sigaction sa {};
    sa.sa_handler = +[](int) { g_interrupted = 1; };
    sigemptyset(&sa.sa_mask);
    ::sigaction(SIGINT, &sa, nullptr);
    write_file_atomically(ready, "ready");
    const auto deadline = Clock::now() + 60s;
    while (!g_interrupted && Clock::now() < deadline) std::this_thread::sleep_for(10ms);
    if (g_interrupted) throw std::runtime_error("KeyboardInterrupt");
}

/// _sleep_no_int_handler: SIGINT keeps its default action.
void interrupted_no_handler(std::string ready) {
    write_file_atomically(ready, "ready");
    block_for(60s);
}

void interrupt_case(const mp::ProcessOptions& options, void (*target)(std::string), int expected) {
    TempDir dir;
    mp::Process p(options, target, dir.file("ready"));
    p.start();
    ASSERT_TRUE(wait_for_file(dir.file("ready"))) << "the child never got ready";
    p.interrupt();
    ASSERT_TRUE(p.join(kLong));
    EXPECT_EQ(p.exitcode(), expected);
    EXPECT_NO_THROW(p.interrupt()) << "signalling an ended child changes nothing";
}

TEST(ProcessExit, Interrupt) { interrupt_case({}, interrupted_throws, 1); }
TEST(ProcessExit, InterruptNoHandler) { interrupt_case({}, interrupted_no_handler, -SIGINT); }
TEST(ProcessForkserver, Interrupt) { interrupt_case(forkserver_options(), interrupted_throws, 1); }
TEST(ProcessForkserver, InterruptNoHandler) {
    interrupt_case(forkserver_options(), interrupted_no_handler, -SIGINT);
}
TEST(ProcessExit, InterruptBeforeStartIsProcessError) {
    mp::Process p([] {});
    EXPECT_THROW(p.interrupt(), mp::ProcessError);
}

/// Terminates `p`; kills it when SIGTERM did not end it within 5 s. True when SIGTERM did.
bool terminate_or_kill(mp::Process& p) {
    p.terminate();
    const bool ended = p.join(5s);
    if (!ended) {
        p.kill();
        p.join();
    }
    return ended;
}

TEST(ProcessExit, TerminateWorksWhenTheStartingThreadBlocksSigterm) {
    // A thread that takes SIGTERM through sigwait/signalfd blocks it; a child it starts must
    // still be terminable (STYLE.md: the child resets the masks the parent changed).
    sigset_t block, old_mask;
    sigemptyset(&block);
    sigaddset(&block, SIGTERM);
    ASSERT_EQ(::pthread_sigmask(SIG_BLOCK, &block, &old_mask), 0);
    mp::Process p([] { block_for(60s); });
    p.start();
    ::pthread_sigmask(SIG_SETMASK, &old_mask, nullptr);
    EXPECT_TRUE(terminate_or_kill(p)) << "SIGTERM did not end the child: it kept the blocked mask";
    EXPECT_EQ(p.exitcode(), -SIGTERM);
}

TEST(ProcessExit, TerminateWorksWhenTheParentIgnoresSigterm) {
    // STYLE.md: the child resets the signal dispositions the parent changed.
    struct sigaction ignore {}, old_action {};
    ignore.sa_handler = SIG_IGN;
    sigemptyset(&ignore.sa_mask);
    ASSERT_EQ(::sigaction(SIGTERM, &ignore, &old_action), 0);
    mp::Process p([] { block_for(60s); });
    p.start();
    ::sigaction(SIGTERM, &old_action, nullptr);
    EXPECT_TRUE(terminate_or_kill(p)) << "SIGTERM did not end the child: it kept SIG_IGN";
    EXPECT_EQ(p.exitcode(), -SIGTERM);
}

TEST(ProcessForkserver, TerminateWorksWhenTheParentBlocksOrIgnoresSigterm) {
    sigset_t block, old_mask;
    sigemptyset(&block);
    sigaddset(&block, SIGTERM);
    struct sigaction ignore {}, old_action {};
    ignore.sa_handler = SIG_IGN;
    sigemptyset(&ignore.sa_mask);
    ASSERT_EQ(::sigaction(SIGTERM, &ignore, &old_action), 0);
    ASSERT_EQ(::pthread_sigmask(SIG_BLOCK, &block, &old_mask), 0);
    mp::Process p(forkserver_options(), fs_block);
    p.start();
    ::pthread_sigmask(SIG_SETMASK, &old_mask, nullptr);
    ::sigaction(SIGTERM, &old_action, nullptr);
    EXPECT_TRUE(terminate_or_kill(p));
    EXPECT_EQ(p.exitcode(), -SIGTERM);
}

TEST(ProcessExit, TerminateAndKillAfterTheEndChangeNothing) {
    mp::Process p([] {});
    p.start();
    ASSERT_TRUE(p.join(kLong));
    EXPECT_NO_THROW(p.terminate());
    EXPECT_NO_THROW(p.kill());
    EXPECT_EQ(p.exitcode(), 0);
}

// ---------------------------------------------------------------------------------------------
// Misuse
// ---------------------------------------------------------------------------------------------

TEST(ProcessMisuse, StartingTwiceThrows) {
    Gate gate;
    mp::Process p([r = gate.reader()] { wait_gate(r); });
    p.start();
    const pid_t pid = p.pid();
    EXPECT_PROCESS_ERROR(p.start(), "twice", "already", "once");
    EXPECT_EQ(p.pid(), pid);
    gate.open();
    ASSERT_TRUE(p.join(kLong));
    EXPECT_PROCESS_ERROR(p.start(), "twice", "already", "once");
    EXPECT_EQ(p.exitcode(), 0);
}

TEST(ProcessMisuse, JoinBeforeStartThrows) {
    mp::Process p([] {});
    EXPECT_PROCESS_ERROR(p.join(), "start");
    EXPECT_PROCESS_ERROR(p.join(10ms), "start");
}

TEST(ProcessMisuse, SignalsBeforeStartThrow) {
    mp::Process p([] {});
    EXPECT_PROCESS_ERROR(p.terminate(), "start");
    EXPECT_PROCESS_ERROR(p.kill(), "start");
}

TEST(ProcessMisuse, JoinInTheChildThrows) {
    TestPipe out;
    mp::Process* self = nullptr;
    mp::Process p([&self, w = out.w.get()] {
        std::string r;
        try {
            self->join();
            r = "no exception";
        } catch (const mp::ProcessError& e) {
            r = std::string("ProcessError ") + e.what();
        } catch (...) {
            r = "other exception";
        }
        std::replace(r.begin(), r.end(), '\n', ' ');
        write_str(w, r + "\n");
    });
    self = &p;
    p.start();
    auto line = read_line(out.r.get());
    ASSERT_TRUE(line);
    EXPECT_EQ(line->rfind("ProcessError ", 0), 0u) << *line;
    ASSERT_TRUE(p.join(kLong));
    EXPECT_EQ(p.exitcode(), 0);
}

TEST(ProcessMisuse, DaemonCannotStartChildren) {
    TestPipe out;
    mp::ProcessOptions o;
    o.daemon = true;
    mp::Process p(o, [w = out.w.get()] {
        mp::Process q([] {});
        std::string r = q.daemon() ? "inherited-daemon" : "not-daemon";
        try {
            q.start();
            q.join();
            r += " started";
        } catch (const mp::ProcessError& e) {
            r += std::string(" ProcessError ") + e.what();
        } catch (...) {
            r += " other-exception";
        }
        std::replace(r.begin(), r.end(), '\n', ' ');
        write_str(w, r + "\n");
    });
    p.start();
    auto line = read_line(out.r.get());
    ASSERT_TRUE(line);
    EXPECT_EQ(line->rfind("inherited-daemon ", 0), 0u)
        << "a Process made in a daemon is a daemon by default: " << *line;
    EXPECT_NE(line->find(" ProcessError "), std::string::npos) << *line;
    EXPECT_TRUE(mentions_any(*line, {"daemon"})) << *line;
    ASSERT_TRUE(p.join(kLong));
    EXPECT_EQ(p.exitcode(), 0);
}

// ---------------------------------------------------------------------------------------------
// close()
// ---------------------------------------------------------------------------------------------

TEST(ProcessClose, ThrowsWhileTheChildRuns) {
    Gate gate;
    mp::Process p([r = gate.reader()] { wait_gate(r); });
    p.start();
    EXPECT_PROCESS_ERROR(p.close(), "running", "alive");
    EXPECT_TRUE(p.is_alive()) << "a refused close() leaves the Process usable";
    gate.open();
    ASSERT_TRUE(p.join(kLong));
    EXPECT_NO_THROW(p.close());
}

TEST(ProcessClose, AfterCloseEveryMethodButNameThrows) {
    mp::Process p([] {});
    p.start();
    ASSERT_TRUE(p.join(kLong));
    const std::string name = p.name();
    p.close();
    EXPECT_EQ(p.name(), name);
    EXPECT_PROCESS_ERROR(p.start(), "closed");
    EXPECT_PROCESS_ERROR(p.join(), "closed");
    EXPECT_PROCESS_ERROR(p.join(10ms), "closed");
    EXPECT_PROCESS_ERROR(p.is_alive(), "closed");
    EXPECT_PROCESS_ERROR(p.terminate(), "closed");
    EXPECT_PROCESS_ERROR(p.kill(), "closed");
    EXPECT_PROCESS_ERROR(p.pid(), "closed");
    EXPECT_PROCESS_ERROR(p.exitcode(), "closed");
    EXPECT_PROCESS_ERROR(p.sentinel(), "closed");
}

TEST(ProcessClose, AfterCloseAttributesThrowToo) {
    mp::Process p([] {});
    p.start();
    ASSERT_TRUE(p.join(kLong));
    p.close();
    EXPECT_PROCESS_ERROR(p.daemon(), "closed");
    EXPECT_PROCESS_ERROR(p.daemon(true), "closed");
    EXPECT_PROCESS_ERROR(p.authkey(), "closed");
    EXPECT_PROCESS_ERROR(p.authkey(std::string(32, 'k')), "closed");
    EXPECT_PROCESS_ERROR(p.start_method(), "closed");
    EXPECT_NO_THROW(p.name("renamed"));
    EXPECT_EQ(p.name(), "renamed");
}

TEST(ProcessClose, CloseBeforeStartThenStartThrows) {
    mp::Process p([] {});
    EXPECT_NO_THROW(p.close());
    EXPECT_PROCESS_ERROR(p.start(), "closed");
}

TEST(ProcessClose, ReleasesTheSentinel) {
    const std::size_t before = mp::test::count_fds();
    mp::Process p([] {});
    p.start();
    const int s = p.sentinel();
    ASSERT_TRUE(p.join(kLong));
    p.close();
    EXPECT_EQ(mp::test::count_fds(), before) << describe_fds(mp::test::list_fds());
    errno = 0;
    EXPECT_TRUE(::fcntl(s, F_GETFD) == -1 && errno == EBADF) << "the sentinel fd is still open";
}

// ---------------------------------------------------------------------------------------------
// Names and identity
// ---------------------------------------------------------------------------------------------

TEST(ProcessIdentity, DefaultNamesAreProcessNCountingUp) {
    mp::Process a([] {});
    mp::Process b([] {});
    auto na = process_number(a.name());
    auto nb = process_number(b.name());
    ASSERT_TRUE(na) << a.name();
    ASSERT_TRUE(nb) << b.name();
    EXPECT_GE(*na, 1);
    EXPECT_EQ(*nb, *na + 1);

    TestPipe out;
    mp::Process c([w = out.w.get()] { write_str(w, mp::current_process().name + "\n"); });
    EXPECT_EQ(process_number(c.name()), *nb + 1);
    c.start();
    EXPECT_EQ(read_line(out.r.get()), c.name());
    ASSERT_TRUE(c.join(kLong));
    EXPECT_EQ(c.name(), "Process-" + std::to_string(*nb + 1));
}

TEST(ProcessIdentity, NameFromOptionsAndSetter) {
    TestPipe out;
    mp::ProcessOptions o;
    o.name = "clock";
    mp::Process a(o, [w = out.w.get()] { write_str(w, mp::current_process().name + "\n"); });
    EXPECT_EQ(a.name(), "clock");
    mp::Process b([w = out.w.get()] { write_str(w, mp::current_process().name + "\n"); });
    b.name("worker");
    EXPECT_EQ(b.name(), "worker");
    a.start();
    EXPECT_EQ(read_line(out.r.get()), "clock");
    b.start();
    EXPECT_EQ(read_line(out.r.get()), "worker");
    ASSERT_TRUE(a.join(kLong));
    ASSERT_TRUE(b.join(kLong));
}

TEST(ProcessIdentity, GrandchildDefaultNameIsProcessNColonM) {
    TestPipe out;
    mp::Process p([w = out.w.get()] {
        mp::Process g1([w] {
            auto parent = mp::parent_process();
            std::string id;
            for (int i : mp::current_process().identity) id += std::to_string(i) + ",";
            write_str(w, "grandchild " + mp::current_process().name + " identity " + id +
                             " parent " + (parent ? parent->name : "none") + " " +
                             (parent ? std::to_string(parent->pid) : "0") + "\n");
        });
        mp::Process g2([] {});
        g1.start();
        g1.join();
        g2.start();
        g2.join();
        write_str(w, "child " + mp::current_process().name + " " + g1.name() + " " + g2.name() +
                         " " + std::to_string(::getpid()) + "\n");
    });
    const std::string n = p.name();
    auto number = process_number(n);
    ASSERT_TRUE(number) << n;
    p.start();
    auto g = read_line(out.r.get());
    auto c = read_line(out.r.get());
    ASSERT_TRUE(g && c);
    EXPECT_EQ(*c, "child " + n + " " + n + ":1 " + n + ":2 " + std::to_string(p.pid()));
    EXPECT_EQ(*g, "grandchild " + n + ":1 identity " + std::to_string(*number) + ",1, parent " +
                      n + " " + std::to_string(p.pid()));
    ASSERT_TRUE(p.join(kLong));
    EXPECT_EQ(p.exitcode(), 0);
}

TEST(ProcessIdentity, CurrentProcessInTheMainProcess) {
    const auto& me = mp::current_process();
    EXPECT_EQ(me.name, "MainProcess");
    EXPECT_EQ(me.pid, ::getpid());
    EXPECT_FALSE(me.daemon);
    EXPECT_TRUE(me.identity.empty());
    EXPECT_EQ(me.authkey.size(), 32u);
    EXPECT_FALSE(mp::parent_process().has_value());
}

TEST(ProcessIdentity, CurrentProcessInTheChild) {
    TestPipe out;
    auto report = [w = out.w.get()] {
        const auto& me = mp::current_process();
        std::string id;
        for (int i : me.identity) id += std::to_string(i) + ",";
        write_str(w, me.name + " " + std::to_string(me.pid) + " " + std::to_string(::getpid()) +
                         " " + (me.daemon ? "daemon" : "non-daemon") + " " + id + "\n");
    };
    mp::Process p(report);
    mp::ProcessOptions o;
    o.daemon = true;
    mp::Process d(o, report);
    p.start();
    auto line = read_line(out.r.get());
    const std::string pid = std::to_string(p.pid());
    EXPECT_EQ(line, p.name() + " " + pid + " " + pid + " non-daemon " +
                        std::to_string(process_number(p.name()).value_or(-1)) + ",");
    d.start();
    line = read_line(out.r.get());
    const std::string dpid = std::to_string(d.pid());
    EXPECT_EQ(line, d.name() + " " + dpid + " " + dpid + " daemon " +
                        std::to_string(process_number(d.name()).value_or(-1)) + ",");
    ASSERT_TRUE(p.join(kLong));
    ASSERT_TRUE(d.join(kLong));
    EXPECT_EQ(mp::current_process().name, "MainProcess") << "the parent's identity is unchanged";
}

TEST(ProcessIdentity, ChildStartsWithNoActiveChildren) {
    Gate gate;
    TestPipe out;
    mp::Process a([r = gate.reader()] { wait_gate(r); });
    a.start();
    mp::Process b([w = out.w.get()] {
        write_str(w, std::to_string(mp::active_children().size()) + "\n");
    });
    b.start();
    EXPECT_EQ(read_line(out.r.get()), "0") << "a child does not inherit its parent's children";
    ASSERT_TRUE(b.join(kLong));
    gate.open();
    ASSERT_TRUE(a.join(kLong));
}

TEST(ProcessLifetime, ChildJoinsItsNonDaemonChildrenAndTerminatesItsDaemonsWhenItsTargetReturns) {
    // Python runs the exit-time cleanup in a child too, when its run() returns.
    Subreaper reaper;  // grandchildren left behind come here, to be reaped
    TempDir dir;
    const std::string g1_marker = dir.file("g1");
    const std::string g2_marker = dir.file("g2");
    TestPipe out;
    mp::Process p([&, w = out.w.get()] {
        // Leaked on purpose: no destructor may join or terminate them, only the exit path.
        auto* g1 = new mp::Process([g1_marker] {
            std::this_thread::sleep_for(100ms);
            write_file_atomically(g1_marker, "finished");
        });
        mp::ProcessOptions o;
        o.daemon = true;
        TestPipe ready;
        auto* g2 = new mp::Process(o, [g2_marker, rw = ready.w.get()] {
            // The handler uses only async-signal-safe calls: open, write, close, rename.
            static char tmp[512], path[512];
            std::snprintf(tmp, sizeof tmp, "%s.tmp", g2_marker.c_str());
            std::snprintf(path, sizeof path, "%s", g2_marker.c_str());
            struct sigaction sa {};
            sa.sa_handler = [](int) {
                int fd = ::open(tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
                if (fd >= 0) {
                    (void)!::write(fd, "sigterm", 7);
                    ::close(fd);
                    ::rename(tmp, path);
                }
                ::_exit(0);
            };
            sigemptyset(&sa.sa_mask);
            ::sigaction(SIGTERM, &sa, nullptr);
            write_str(rw, "r");
            block_for(60s);
        });
        g1->start();
        g2->start();
        pollfd pfd{ready.r.get(), POLLIN, 0};
        ::poll(&pfd, 1, 10000);
        write_str(w, std::to_string(g1->pid()) + " " + std::to_string(g2->pid()) + "\n");
    });
    p.start();
    auto line = read_line(out.r.get());
    ASSERT_TRUE(line);
    ASSERT_TRUE(p.join(kLong));
    EXPECT_EQ(p.exitcode(), 0);
    const auto g1_at_join = slurp(g1_marker);
    EXPECT_EQ(g1_at_join, "finished") << "the child ended before its non-daemon child finished"
                                      << (g1_at_join ? ""
                                          : wait_for_file(g1_marker, 5s)
                                              ? " (that child finished later: orphaned, not joined)"
                                              : " (and that child never finished)");
    std::istringstream in(*line);
    pid_t g1 = 0, g2 = 0;
    in >> g1 >> g2;
    EXPECT_TRUE(mp::test::wait_pid_stopped(g2, 5s));
    EXPECT_EQ(wait_for_file(g2_marker, 5s), "sigterm")
        << "the child's daemon was not terminated when the child's target returned";
    EXPECT_TRUE(reaper.reap(5s).empty());
}

TEST(ProcessIdentity, ParentProcessInTheChild) {
    TestPipe out;
    mp::Process p([w = out.w.get()] {
        auto parent = mp::parent_process();
        if (!parent) {
            write_str(w, "none\n");
            return;
        }
        write_str(w, parent->name + " " + std::to_string(parent->pid) + " " +
                         (parent->is_alive() ? "alive" : "dead") + "\n");
    });
    p.start();
    EXPECT_EQ(read_line(out.r.get()), "MainProcess " + std::to_string(::getpid()) + " alive");
    ASSERT_TRUE(p.join(kLong));
    EXPECT_FALSE(mp::parent_process().has_value());
}

TEST(ProcessIdentity, ParentProcessIsAliveTurnsFalseWhenTheParentDies) {
    Subreaper reaper;  // the orphaned grandchild comes to this process, which reaps it
    TestPipe out;
    mp::Process p([w = out.w.get()] {
        mp::Process g([w] {
            auto parent = mp::parent_process();
            if (!parent) {
                write_str(w, "no-parent\n");
                return;
            }
            const auto deadline = Clock::now() + 10s;
            while (parent->is_alive() && Clock::now() < deadline) std::this_thread::sleep_for(2ms);
            write_str(w, parent->is_alive() ? "still-alive\n" : "dead\n");
        });
        g.start();
        write_str(w, "grandchild " + std::to_string(g.pid()) + "\n");
        ::_exit(0);  // leave without joining g
    });
    p.start();
    auto first = read_line(out.r.get());
    ASSERT_TRUE(first);
    ASSERT_TRUE(p.join(kLong));
    EXPECT_EQ(read_line(out.r.get()), "dead");
    EXPECT_TRUE(reaper.reap(kLong).empty());
}

// ---------------------------------------------------------------------------------------------
// daemon
// ---------------------------------------------------------------------------------------------

TEST(ProcessDaemon, DefaultsToTheCurrentProcesssFlag) {
    mp::Process a([] {});
    EXPECT_FALSE(a.daemon());
    mp::ProcessOptions yes;
    yes.daemon = true;
    mp::Process b(yes, [] {});
    EXPECT_TRUE(b.daemon());
    mp::ProcessOptions no;
    no.daemon = false;
    mp::Process c(no, [] {});
    EXPECT_FALSE(c.daemon());
    a.daemon(true);
    EXPECT_TRUE(a.daemon());
    a.daemon(false);
    EXPECT_FALSE(a.daemon());
}

TEST(ProcessDaemon, SettingTheFlagAfterStartThrows) {
    mp::Process p([] {});
    p.start();
    EXPECT_PROCESS_ERROR(p.daemon(true), "start");
    EXPECT_FALSE(p.daemon());
    ASSERT_TRUE(p.join(kLong));
    EXPECT_PROCESS_ERROR(p.daemon(true), "start");
}

TEST(ProcessDaemon, DaemonChildRunsAndIsJoined) {
    TestPipe out;
    mp::ProcessOptions o;
    o.daemon = true;
    mp::Process p(o, [w = out.w.get()] { write_str(w, "daemon ran\n"); });
    p.start();
    EXPECT_EQ(read_line(out.r.get()), "daemon ran");
    ASSERT_TRUE(p.join(kLong));
    EXPECT_EQ(p.exitcode(), 0);
}

// ---------------------------------------------------------------------------------------------
// sentinel
// ---------------------------------------------------------------------------------------------

TEST(ProcessSentinel, ThrowsBeforeStart) {
    mp::Process p([] {});
    EXPECT_PROCESS_ERROR(p.sentinel(), "start");
}

TEST(ProcessSentinel, IsAPidfdThatBecomesReadableWhenTheChildEnds) {
    Gate gate;
    mp::Process p([r = gate.reader()] { wait_gate(r); });
    p.start();
    const int s = p.sentinel();
    ASSERT_GE(s, 0);
    EXPECT_EQ(pidfd_target(s), p.pid()) << "the sentinel is a pidfd of the child";
    EXPECT_FALSE(poll_readable(s, 0ms)) << "readable while the child runs";
    EXPECT_FALSE(poll_readable(s, 20ms));
    gate.open();
    EXPECT_TRUE(poll_readable(s, kLong));
    ASSERT_TRUE(p.join(kLong));
    EXPECT_EQ(p.exitcode(), 0);
    EXPECT_EQ(p.sentinel(), s) << "the sentinel stays the same fd until close()";
    EXPECT_TRUE(poll_readable(s, 0ms));
}

// ---------------------------------------------------------------------------------------------
// authkey
// ---------------------------------------------------------------------------------------------

TEST(ProcessAuthkey, ChildInheritsTheParentsKey) {
    const std::string key = mp::current_process().authkey;
    ASSERT_EQ(key.size(), 32u);
    TestPipe out;
    mp::Process p([w = out.w.get()] { write_str(w, hex(mp::current_process().authkey) + "\n"); });
    EXPECT_EQ(p.authkey(), key);
    p.start();
    EXPECT_EQ(read_line(out.r.get()), hex(key));
    ASSERT_TRUE(p.join(kLong));
}

TEST(ProcessAuthkey, KeySetOnAProcessIsTheChildsKey) {
    const std::string main_key = mp::current_process().authkey;
    const std::string key = "a key set for this child only...";
    TestPipe out;
    mp::Process p([w = out.w.get()] { write_str(w, hex(mp::current_process().authkey) + "\n"); });
    p.authkey(key);
    EXPECT_EQ(p.authkey(), key);
    p.start();
    EXPECT_EQ(read_line(out.r.get()), hex(key));
    ASSERT_TRUE(p.join(kLong));
    EXPECT_EQ(mp::current_process().authkey, main_key);
}

TEST(ProcessAuthkey, ChangedCurrentKeyIsInheritedByNewProcesses) {
    const std::string saved = mp::current_process().authkey;
    mp::current_process().authkey = std::string(32, 'z');
    mp::Process p([] {});
    EXPECT_EQ(p.authkey(), std::string(32, 'z'));
    mp::current_process().authkey = saved;
}

// ---------------------------------------------------------------------------------------------
// active_children
// ---------------------------------------------------------------------------------------------

TEST(ProcessActiveChildren, ListsRunningChildren) {
    EXPECT_TRUE(mp::active_children().empty());
    Gate gate;
    mp::ProcessOptions ao;
    ao.name = "alpha";
    mp::ProcessOptions bo;
    bo.name = "beta";
    bo.daemon = true;
    mp::Process a(ao, [r = gate.reader()] { wait_gate(r); });
    mp::Process b(bo, [r = gate.reader()] { wait_gate(r); });
    a.start();
    b.start();
    auto kids = mp::active_children();
    EXPECT_EQ(kids.size(), 2u);
    auto ka = find_child(kids, a.pid());
    auto kb = find_child(kids, b.pid());
    ASSERT_TRUE(ka && kb);
    EXPECT_EQ(ka->name(), "alpha");
    EXPECT_FALSE(ka->daemon());
    EXPECT_TRUE(ka->is_alive());
    EXPECT_FALSE(ka->exitcode().has_value());
    EXPECT_EQ(kb->name(), "beta");
    EXPECT_TRUE(kb->daemon());
    EXPECT_GE(kb->sentinel(), 0);
    gate.open(2);
    ASSERT_TRUE(a.join(kLong));
    ASSERT_TRUE(b.join(kLong));
    EXPECT_TRUE(mp::active_children().empty());
    EXPECT_EQ(ka->exitcode(), 0);
    EXPECT_FALSE(ka->is_alive());
}

TEST(ProcessActiveChildren, FinishedChildrenAreReapedAndDisappear) {
    mp::Process p([] {});
    p.start();
    const pid_t pid = p.pid();
    const auto deadline = Clock::now() + kLong;
    while (contains_pid(mp::active_children(), pid) && Clock::now() < deadline) {
        std::this_thread::sleep_for(1ms);
    }
    EXPECT_FALSE(contains_pid(mp::active_children(), pid));
    EXPECT_FALSE(mp::test::pid_exists(pid)) << "active_children() reaps what ended (no zombie)";
    EXPECT_EQ(p.exitcode(), 0) << "the Process still knows how its child ended";
    EXPECT_FALSE(p.is_alive());
    EXPECT_TRUE(p.join(kLong));
}

TEST(ProcessActiveChildren, ViewsSignalAndJoinTheChild) {
    mp::Process a([] { block_for(60s); });
    mp::Process b([] { block_for(60s); });
    a.start();
    b.start();
    auto kids = mp::active_children();
    auto va = find_child(kids, a.pid());
    auto vb = find_child(kids, b.pid());
    ASSERT_TRUE(va && vb);
    EXPECT_FALSE(va->join(10ms));
    va->terminate();
    EXPECT_TRUE(va->join(kLong));
    EXPECT_EQ(va->exitcode(), -SIGTERM);
    EXPECT_EQ(a.exitcode(), -SIGTERM);
    EXPECT_FALSE(a.is_alive());
    vb->kill();
    vb->join();
    EXPECT_EQ(vb->exitcode(), -SIGKILL);
    EXPECT_TRUE(b.join(kLong));
    EXPECT_EQ(b.exitcode(), -SIGKILL);
}

// ---------------------------------------------------------------------------------------------
// cpu_count
// ---------------------------------------------------------------------------------------------

TEST(ProcessCpuCount, IsBetweenOneAndTheHardwareThreads) {
    const int n = mp::cpu_count();
    EXPECT_GE(n, 1);
    const long configured = std::max<long>(::sysconf(_SC_NPROCESSORS_CONF),
                                           static_cast<long>(std::thread::hardware_concurrency()));
    EXPECT_LE(n, configured);
    cpu_set_t set;
    CPU_ZERO(&set);
    ASSERT_EQ(::sched_getaffinity(0, sizeof set, &set), 0);
    EXPECT_LE(n, CPU_COUNT(&set));
}

TEST(ProcessCpuCount, FollowsTheAffinityMaskInAChild) {
    cpu_set_t mine;
    CPU_ZERO(&mine);
    ASSERT_EQ(::sched_getaffinity(0, sizeof mine, &mine), 0);
    std::vector<int> cpus;
    for (int c = 0; c < CPU_SETSIZE; ++c) {
        if (CPU_ISSET(c, &mine)) cpus.push_back(c);
    }
    ASSERT_FALSE(cpus.empty());
    const int parent_count = mp::cpu_count();
    // Without a CPU quota below the mask, cpu_count() is the mask size exactly.
    const bool exact = parent_count == CPU_COUNT(&mine);

    TestPipe out;
    mp::Process p([w = out.w.get(), cpus] {
        cpu_set_t one;
        CPU_ZERO(&one);
        CPU_SET(cpus[0], &one);
        std::string r = ::sched_setaffinity(0, sizeof one, &one) == 0
                            ? std::to_string(mp::cpu_count())
                            : std::string("setaffinity-failed");
        if (cpus.size() >= 2) {
            cpu_set_t two;
            CPU_ZERO(&two);
            CPU_SET(cpus[0], &two);
            CPU_SET(cpus[1], &two);
            r += ::sched_setaffinity(0, sizeof two, &two) == 0
                     ? " " + std::to_string(mp::cpu_count())
                     : std::string(" setaffinity-failed");
        }
        write_str(w, r + "\n");
    });
    p.start();
    auto line = read_line(out.r.get());
    ASSERT_TRUE(line);
    std::istringstream in(*line);
    std::string one, two;
    in >> one >> two;
    EXPECT_EQ(one, "1") << *line;
    if (cpus.size() >= 2) {
        if (exact) {
            EXPECT_EQ(two, "2") << *line;
        } else {
            EXPECT_TRUE(two == "1" || two == "2") << *line;
        }
    }
    ASSERT_TRUE(p.join(kLong));
    EXPECT_EQ(mp::cpu_count(), parent_count) << "the child's mask does not change the parent's";
}

// ---------------------------------------------------------------------------------------------
// Lifetime: reaping, the destructor policy, fd hygiene
// ---------------------------------------------------------------------------------------------

TEST(ProcessLifetime, NoZombieAfterJoin) {
    mp::Process p([] {});
    p.start();
    const pid_t pid = p.pid();
    ASSERT_TRUE(p.join(kLong));
    EXPECT_FALSE(mp::test::pid_exists(pid)) << "state " << mp::test::proc_info(pid).state;
}

TEST(ProcessLifetime, DestructorReapsAnEndedChild) {
    pid_t pid = 0;
    {
        mp::Process p([] {});
        p.start();
        pid = p.pid();
        // Let it end unjoined (a zombie, unless something reaps it already).
        const auto deadline = Clock::now() + kLong;
        while (mp::test::pid_running(pid) && Clock::now() < deadline) {
            std::this_thread::sleep_for(1ms);
        }
    }
    EXPECT_FALSE(mp::test::pid_exists(pid)) << "the destructor leaves a zombie";
}

TEST(ProcessLifetime, UnstartedProcessIsDestroyedQuietly) {
    { mp::Process p([] { ::_exit(3); }); }
    mp::ProcessOptions o;
    o.daemon = true;
    { mp::Process p(o, [] { ::_exit(3); }); }
    EXPECT_TRUE(mp::test::list_children().empty());
}

TEST(ProcessLifetime, DestructorJoinsALiveNonDaemonChild) {
    Watchdog watchdog(30s, "DestructorJoinsALiveNonDaemonChild");
    TempDir dir;
    const std::string marker = dir.file("finished");
    std::optional<mp::ChildProcess> view;
    pid_t pid = 0;
    const auto t0 = Clock::now();
    {
        mp::Process p([marker] {
            std::this_thread::sleep_for(200ms);
            write_file_atomically(marker, "finished");
        });
        p.start();
        pid = p.pid();
        view = find_child(mp::active_children(), pid);
    }
    const auto elapsed = Clock::now() - t0;
    EXPECT_EQ(slurp(marker), "finished") << "the destructor returned before the child ended";
    EXPECT_GE(elapsed, 200ms) << "the destructor takes at least the child's time";
    EXPECT_FALSE(mp::test::pid_exists(pid));
    ASSERT_TRUE(view);
    EXPECT_FALSE(view->is_alive());
    EXPECT_EQ(view->exitcode(), 0);
}

TEST(ProcessLifetime, DestructorTerminatesALiveDaemonChild) {
    Watchdog watchdog(30s, "DestructorTerminatesALiveDaemonChild");
    std::optional<mp::ChildProcess> view;
    pid_t pid = 0;
    {
        mp::ProcessOptions o;
        o.daemon = true;
        mp::Process p(o, [] { block_for(60s); });
        p.start();
        pid = p.pid();
        view = find_child(mp::active_children(), pid);
    }
    EXPECT_FALSE(mp::test::pid_exists(pid))
        << "the destructor leaves the daemon running or a zombie";
    ASSERT_TRUE(view);
    EXPECT_FALSE(view->is_alive());
    EXPECT_EQ(view->exitcode(), -SIGTERM);
}

TEST(ProcessLifetime, NoFdLeakAfter1000StartJoinCycles) {
    const auto before = mp::test::list_fds();
    for (int i = 0; i < 1000; ++i) {
        mp::Process p([] {});
        p.start();
        ASSERT_TRUE(p.join(kLong)) << "cycle " << i;
        ASSERT_EQ(p.exitcode(), 0) << "cycle " << i;
    }
    const auto after = mp::test::list_fds();
    EXPECT_EQ(after.size(), before.size()) << "before:" << describe_fds(before)
                                           << "\nafter:" << describe_fds(after);
    EXPECT_TRUE(mp::test::list_children().empty());
}

TEST(ProcessLifetime, ChildDoesNotInheritTheParentsOtherChildren) {
    // Two children at once: each is the parent's, neither is the other's, and both end cleanly.
    Gate gate;
    mp::Process a([r = gate.reader()] { wait_gate(r); });
    mp::Process b([r = gate.reader()] { wait_gate(r); });
    a.start();
    b.start();
    EXPECT_EQ(mp::test::proc_info(a.pid()).ppid, ::getpid());
    EXPECT_EQ(mp::test::proc_info(b.pid()).ppid, ::getpid());
    gate.open(2);
    ASSERT_TRUE(a.join(kLong));
    ASSERT_TRUE(b.join(kLong));
    EXPECT_EQ(a.exitcode(), 0);
    EXPECT_EQ(b.exitcode(), 0);
}

// ---------------------------------------------------------------------------------------------
// forkserver
// ---------------------------------------------------------------------------------------------

TEST(ProcessForkserver, SetStartMethodStartsTheServer) {
    mp::set_start_method(mp::StartMethod::forkserver, !running_alone());
    auto servers = mp::test::forkservers();
    ASSERT_EQ(servers.size(), 1u) << kOneServer;
    EXPECT_EQ(servers[0].comm, "mp-forkserver");
    EXPECT_NE(servers[0].state, 'Z');
    mp::Process p(fs_exit_sum, std::string("ab"), 1);
    EXPECT_EQ(p.start_method(), mp::StartMethod::forkserver);
    p.start();
    ASSERT_TRUE(p.join(kLong));
    EXPECT_EQ(p.exitcode(), 3);
    EXPECT_EQ(mp::test::forkservers().size(), 1u) << "the server is started once";
    mp::set_start_method(mp::StartMethod::fork, true);
}

TEST(ProcessForkserver, PlainFunctionWithArgumentsRunsAndItsExitCodeIsSeen) {
    mp::Process a(forkserver_options(), fs_exit_sum, std::string("hello"), 2);
    mp::Process b(forkserver_options(), fs_noop);
    EXPECT_EQ(a.start_method(), mp::StartMethod::forkserver);
    a.start();
    b.start();
    ASSERT_TRUE(a.join(kLong));
    ASSERT_TRUE(b.join(kLong));
    EXPECT_EQ(a.exitcode(), 7);
    EXPECT_EQ(b.exitcode(), 0);
}

TEST(ProcessForkserver, CaptureLessLambdaFunctionPointerAndEmptyFunctionObject) {
    void (*fp)(std::string, int) = fs_exit_sum;
    mp::Process a(forkserver_options(), [](int code) { ::_exit(code); }, 9);
    mp::Process b(forkserver_options(), fp, std::string("x"), 10);
    mp::Process c(forkserver_options(), EmptyFunctionObject{}, 12);
    a.start();
    b.start();
    c.start();
    ASSERT_TRUE(a.join(kLong));
    ASSERT_TRUE(b.join(kLong));
    ASSERT_TRUE(c.join(kLong));
    EXPECT_EQ(a.exitcode(), 9);
    EXPECT_EQ(b.exitcode(), 11);
    EXPECT_EQ(c.exitcode(), 12);
}

TEST(ProcessForkserver, NonTransferableTargetThrowsAtStart) {
    int captured = 5;
    mp::Process a(forkserver_options(), [captured] { ::_exit(captured); });
    EXPECT_PROCESS_ERROR(a.start(), "transferable", "capture", "forkserver");
    mp::Process b(forkserver_options(), [](const NoCodec&) {}, NoCodec{"no codec"});
    EXPECT_PROCESS_ERROR(b.start(), "codec", "transferable", "forkserver");
    EXPECT_TRUE(mp::active_children().empty());
}

TEST(ProcessForkserver, SubclassThrowsAtStart) {
    NoopProcess p(forkserver_options());
    EXPECT_PROCESS_ERROR(p.start(), "subclass", "run", "fork");
    EXPECT_TRUE(mp::active_children().empty());
}

TEST(ProcessForkserver, ChildrenComeFromOneServerAndKnowWhoTheyAre) {
    TempDir dir;
    mp::Process a(forkserver_options(), fs_report_identity, dir.file("a"));
    mp::Process b(forkserver_options(), fs_report_identity, dir.file("b"));
    a.start();
    b.start();
    ASSERT_TRUE(a.join(kLong));
    ASSERT_TRUE(b.join(kLong));
    EXPECT_EQ(a.exitcode(), 0);
    EXPECT_EQ(b.exitcode(), 0);
    auto ta = slurp(dir.file("a"));
    auto tb = slurp(dir.file("b"));
    ASSERT_TRUE(ta && tb);
    EXPECT_EQ(field(*ta, "name"), a.name());
    EXPECT_EQ(field(*ta, "pid"), std::to_string(a.pid()));
    EXPECT_EQ(field(*ta, "getpid"), std::to_string(a.pid()));
    EXPECT_EQ(field(*ta, "authkey"), hex(mp::current_process().authkey));
    EXPECT_EQ(field(*ta, "daemon"), "0");
    EXPECT_EQ(field(*ta, "identity"), std::to_string(process_number(a.name()).value_or(-1)) + ",");
    EXPECT_EQ(field(*ta, "parent"), "MainProcess " + std::to_string(::getpid()) + " alive")
        << "a forkserver child's parent is the process that started it, as in Python";
    EXPECT_EQ(field(*tb, "name"), b.name());
    EXPECT_EQ(field(*tb, "getpid"), std::to_string(b.pid()));
    EXPECT_NE(field(*ta, "getppid"), std::to_string(::getpid()));
    EXPECT_EQ(field(*ta, "getppid"), field(*tb, "getppid")) << "one server forks every child";
}

TEST(ProcessForkserver, DaemonChildKnowsItIsADaemon) {
    TempDir dir;
    mp::ProcessOptions o = forkserver_options();
    o.daemon = true;
    mp::Process p(o, fs_report_identity, dir.file("d"));
    p.start();
    ASSERT_TRUE(p.join(kLong));
    EXPECT_EQ(p.exitcode(), 0);
    auto text = slurp(dir.file("d"));
    ASSERT_TRUE(text);
    EXPECT_EQ(field(*text, "daemon"), "1");
}

TEST(ProcessForkserver, ChildCanStartChildrenOfItsOwn) {
    TempDir dir;
    mp::Process p(forkserver_options(), fs_start_grandchildren, dir.file("g"));
    p.start();
    ASSERT_TRUE(p.join(kLong));
    EXPECT_EQ(p.exitcode(), 0);
    auto text = slurp(dir.file("g"));
    ASSERT_TRUE(text);
    EXPECT_EQ(field(*text, "names"), p.name() + ":1 " + p.name() + ":2") << *text;
    EXPECT_EQ(field(*text, "exitcodes"), "5 0") << *text;
    EXPECT_EQ(field(*text, "active"), "0") << *text;
}

TEST(ProcessForkserver, LargeArgumentArrives) {
    const std::size_t n = 8u << 20;
    mp::Process p(forkserver_options(), fs_check_size, std::string(n, 'x'), n);
    p.start();
    ASSERT_TRUE(p.join(kLong));
    EXPECT_EQ(p.exitcode(), 0) << "the child did not receive the 8 MiB argument intact";
}

TEST(ProcessForkserver, ManyChildrenAtOnceKeepTheirOwnExitCodes) {
    TempDir dir;
    const std::string go = dir.file("go");
    std::vector<std::unique_ptr<mp::Process>> ps;
    for (int i = 0; i < 40; ++i) {
        ps.push_back(std::make_unique<mp::Process>(forkserver_options(), fs_exit_sum, go + "\n",
                                                   i));
    }
    // fs_exit_sum exits at once with size + i; the statuses come back in any order.
    for (auto& p : ps) p->start();
    for (int i = static_cast<int>(ps.size()) - 1; i >= 0; --i) {
        ASSERT_TRUE(ps[i]->join(kLong)) << i;
        EXPECT_EQ(ps[i]->exitcode(), static_cast<int>(go.size() + 1) + i);
    }
}

TEST(ProcessForkserver, StartAndJoinFromManyThreads) {
    std::atomic<int> failures{0};
    std::vector<std::thread> threads;
    for (int t = 0; t < 4; ++t) {
        threads.emplace_back([&, t] {
            for (int i = 0; i < 10; ++i) {
                mp::Process p(forkserver_options(), fs_exit_sum, std::string(), t * 10 + i);
                p.start();
                if (!p.join(kLong) || p.exitcode() != t * 10 + i) ++failures;
            }
        });
    }
    for (auto& th : threads) th.join();
    EXPECT_EQ(failures.load(), 0);
}

TEST(ProcessForkserver, ForkChildCanUseTheForkserver) {
    TestPipe out;
    mp::Process p([w = out.w.get()] {
        std::string r;
        try {
            mp::Process g(forkserver_options(), fs_exit_sum, std::string("abc"), 4);
            g.start();
            r = g.join(10s) ? std::to_string(g.exitcode().value_or(-999)) : "timeout";
        } catch (const std::exception& e) {
            r = std::string("error ") + e.what();
        }
        write_str(w, r + "\n");
    });
    // Start the server first, so that the fork child inherits the connection to it.
    {
        mp::Process warm(forkserver_options(), fs_noop);
        warm.start();
        ASSERT_TRUE(warm.join(kLong));
    }
    p.start();
    EXPECT_EQ(read_line(out.r.get()), "7");
    ASSERT_TRUE(p.join(kLong));
    EXPECT_EQ(p.exitcode(), 0);
}

TEST(ProcessForkserver, JoinTimeoutIsAliveSentinelAndActiveChildren) {
    TempDir dir;
    const std::string go = dir.file("go");
    mp::Process p(forkserver_options(), fs_wait_for_file, go);
    p.start();
    EXPECT_GT(p.pid(), 0);
    EXPECT_TRUE(p.is_alive());
    EXPECT_FALSE(p.join(20ms));
    EXPECT_FALSE(p.exitcode().has_value());
    EXPECT_TRUE(contains_pid(mp::active_children(), p.pid()));
    const int s = p.sentinel();
    EXPECT_FALSE(poll_readable(s, 0ms));
    write_file_atomically(go, "go");
    EXPECT_TRUE(poll_readable(s, kLong));
    ASSERT_TRUE(p.join(kLong));
    EXPECT_EQ(p.exitcode(), 0);
    EXPECT_FALSE(p.is_alive());
    EXPECT_FALSE(contains_pid(mp::active_children(), p.pid()));
}

TEST(ProcessForkserver, TerminateAndKill) {
    mp::Process a(forkserver_options(), fs_block);
    mp::Process b(forkserver_options(), fs_block);
    a.start();
    b.start();
    a.terminate();
    b.kill();
    ASSERT_TRUE(a.join(kLong));
    ASSERT_TRUE(b.join(kLong));
    EXPECT_EQ(a.exitcode(), -SIGTERM);
    EXPECT_EQ(b.exitcode(), -SIGKILL);
    EXPECT_NO_THROW(a.terminate()) << "signalling an ended child changes nothing";
    EXPECT_NO_THROW(b.kill());
    EXPECT_EQ(a.exitcode(), -SIGTERM);
}

TEST(ProcessForkserver, IsRestartedAfterItWasKilled) {
    mp::Process first(forkserver_options(), fs_exit_sum, std::string("a"), 1);
    first.start();
    ASSERT_TRUE(first.join(kLong));
    EXPECT_EQ(first.exitcode(), 2);
    auto servers = mp::test::forkservers();
    ASSERT_EQ(servers.size(), 1u);
    ::kill(servers[0].pid, SIGKILL);
    ASSERT_TRUE(mp::test::wait_pid_stopped(servers[0].pid, kLong));

    mp::Process second(forkserver_options(), fs_exit_sum, std::string("ab"), 1);
    EXPECT_NO_THROW(second.start()) << "a killed forkserver is replaced";
    if (second.pid() != 0) {
        ASSERT_TRUE(second.join(kLong));
        EXPECT_EQ(second.exitcode(), 3);
    }
    auto now = mp::test::forkservers();
    ASSERT_EQ(now.size(), 1u);
    EXPECT_NE(now[0].pid, servers[0].pid);
}

TEST(ProcessForkserver, ExceptionGivesExitCodeOne) {
    mp::Process p(forkserver_options(), fs_throw, std::string("thrown in a forkserver child"));
    p.start();
    ASSERT_TRUE(p.join(kLong));
    EXPECT_EQ(p.exitcode(), 1);
}

TEST(ProcessForkserver, DestructorJoinsALiveChild) {
    Watchdog watchdog(30s, "ProcessForkserver.DestructorJoinsALiveChild");
    TempDir dir;
    const std::string go = dir.file("go");
    std::optional<mp::ChildProcess> view;
    std::thread opener([go] {
        std::this_thread::sleep_for(100ms);
        write_file_atomically(go, "go");
    });
    {
        mp::Process p(forkserver_options(), fs_wait_for_file, go);
        p.start();
        view = find_child(mp::active_children(), p.pid());
    }
    opener.join();
    ASSERT_TRUE(view);
    EXPECT_FALSE(view->is_alive());
    EXPECT_EQ(view->exitcode(), 0);
}

TEST(ProcessForkserver, NoFdLeakOver50Cycles) {
    {
        mp::Process warm(forkserver_options(), fs_noop);  // starts the server
        warm.start();
        ASSERT_TRUE(warm.join(kLong));
    }
    const auto before = mp::test::list_fds();
    for (int i = 0; i < 50; ++i) {
        mp::Process p(forkserver_options(), fs_noop);
        p.start();
        ASSERT_TRUE(p.join(kLong)) << "cycle " << i;
        ASSERT_EQ(p.exitcode(), 0) << "cycle " << i;
    }
    const auto after = mp::test::list_fds();
    EXPECT_EQ(after.size(), before.size()) << "before:" << describe_fds(before)
                                           << "\nafter:" << describe_fds(after);
}

// ---------------------------------------------------------------------------------------------
// Whole programs (mp_test_child)
// ---------------------------------------------------------------------------------------------

TEST(ProcessProgram, HelperModes) {
    TempDir dir;
    {
        Program p(dir, {"exit", "3"});
        ASSERT_TRUE(p.wait());
        EXPECT_TRUE(p.exited_with(3)) << p.describe();
    }
    {
        Program p(dir, {"crash"});
        ASSERT_TRUE(p.wait());
        EXPECT_TRUE(WIFSIGNALED(p.status()) && WTERMSIG(p.status()) == SIGSEGV) << p.describe();
    }
    {
        Program p(dir, {"abort"});
        ASSERT_TRUE(p.wait());
        EXPECT_TRUE(WIFSIGNALED(p.status()) && WTERMSIG(p.status()) == SIGABRT) << p.describe();
    }
    {
        Program p(dir, {"sleep", "0.01"});
        ASSERT_TRUE(p.wait());
        EXPECT_TRUE(p.exited_with(0)) << p.describe();
    }
    {
        write_file_atomically(dir.file("in"), "hello\nworld\n");
        Program p(dir, {"echo"}, dir.file("in"));
        ASSERT_TRUE(p.wait());
        EXPECT_TRUE(p.exited_with(0)) << p.describe();
        EXPECT_EQ(p.out(), "hello\nworld\n");
    }
}

TEST(ProcessProgram, MainProcessAuthkeyIsRandom) {
    TempDir dir;
    Program a(dir, {"authkey"});
    Program b(dir, {"authkey"});
    ASSERT_TRUE(a.wait());
    ASSERT_TRUE(b.wait());
    ASSERT_TRUE(a.exited_with(0)) << a.describe();
    ASSERT_TRUE(b.exited_with(0)) << b.describe();
    EXPECT_EQ(a.out().size(), 65u) << a.out();  // 32 bytes in hex and a newline
    EXPECT_NE(a.out(), b.out());
}

TEST(ProcessProgram, DaemonDiesWhenItsParentIsKilled) {
    Subreaper reaper;
    TempDir dir;
    Program prog(dir, {"daemon-orphan", dir.file("pid")});
    auto text = wait_for_file(dir.file("pid"));
    ASSERT_TRUE(text) << "no pid file; " << prog.err();
    const pid_t daemon = static_cast<pid_t>(std::stol(*text));
    EXPECT_TRUE(mp::test::pid_running(daemon));
    prog.signal(SIGKILL);
    ASSERT_TRUE(prog.wait());
    EXPECT_TRUE(mp::test::wait_pid_stopped(daemon, 5s)) << "the daemon outlived its killed parent";
    EXPECT_TRUE(reaper.reap(5s).empty());
}

TEST(ProcessProgram, ForkserverDaemonDiesWhenItsParentIsKilled) {
    Subreaper reaper;
    TempDir dir;
    Program prog(dir, {"daemon-orphan", dir.file("pid"), "forkserver"});
    auto text = wait_for_file(dir.file("pid"));
    ASSERT_TRUE(text) << "no pid file; " << prog.err();
    const pid_t daemon = static_cast<pid_t>(std::stol(*text));
    EXPECT_TRUE(mp::test::pid_running(daemon));
    prog.signal(SIGKILL);
    ASSERT_TRUE(prog.wait());
    EXPECT_TRUE(mp::test::wait_pid_stopped(daemon, 5s)) << "the daemon outlived its killed parent";
    auto left = reaper.reap(5s);
    EXPECT_TRUE(left.empty()) << "left behind:" << joined(left);
}

TEST(ProcessProgram, ForkserverChildFlushesStdioAndReportsItsException) {
    Subreaper reaper;
    TempDir dir;
    Program prog(dir, {"forkserver-stdio"});
    ASSERT_TRUE(prog.wait());
    EXPECT_TRUE(prog.exited_with(0)) << prog.describe();
    const std::string out = prog.out();
    const std::string err = prog.err();
    EXPECT_EQ(field(out, "exitcodes"), "0 1") << prog.describe();
    EXPECT_EQ(count_of(out, "parent-buffered"), 1u) << prog.describe();
    EXPECT_EQ(count_of(out, "fs-buffered"), 1u) << prog.describe();
    auto thrower = field(out, "thrower");
    ASSERT_TRUE(thrower) << prog.describe();
    EXPECT_NE(err.find("Process " + *thrower + ":"), std::string::npos) << prog.describe();
    EXPECT_NE(err.find("thrown in a forkserver child"), std::string::npos) << prog.describe();
    auto left = reaper.reap(5s);
    EXPECT_TRUE(left.empty()) << "left behind:" << joined(left);
}

TEST(ProcessProgram, NonDaemonChildrenAreJoinedWhenMainReturns) {
    Subreaper reaper;
    TempDir dir;
    Program prog(dir, {"exit-joins", dir.file("marker")});
    ASSERT_TRUE(prog.wait());
    EXPECT_TRUE(prog.exited_with(0)) << prog.describe();
    EXPECT_EQ(slurp(dir.file("marker")), "child-finished\n")
        << "the program exited before its non-daemon child finished";
    auto pid = field(prog.out(), "child-pid");
    ASSERT_TRUE(pid) << prog.describe();
    EXPECT_FALSE(mp::test::pid_running(static_cast<pid_t>(std::stol(*pid))));
    EXPECT_TRUE(reaper.reap(5s).empty()) << "the program left a process behind";
}

TEST(ProcessProgram, NonDaemonChildrenAreJoinedAtStdExit) {
    Subreaper reaper;
    TempDir dir;
    Program prog(dir, {"exit-joins", dir.file("marker"), "std-exit"});
    ASSERT_TRUE(prog.wait());
    EXPECT_TRUE(prog.exited_with(0)) << prog.describe();
    EXPECT_EQ(slurp(dir.file("marker")), "child-finished\n")
        << "the program exited before its non-daemon child finished";
    EXPECT_TRUE(reaper.reap(5s).empty()) << "the program left a process behind";
}

TEST(ProcessProgram, DaemonChildrenAreTerminatedAtNormalExit) {
    Subreaper reaper;
    TempDir dir;
    const std::string marker = dir.file("marker");
    Program prog(dir, {"exit-terminates-daemon", marker});
    ASSERT_TRUE(prog.wait());
    EXPECT_TRUE(prog.exited_with(0)) << prog.describe();
    auto pid = field(prog.out(), "daemon-pid");
    ASSERT_TRUE(pid) << prog.describe();
    EXPECT_TRUE(mp::test::wait_pid_stopped(static_cast<pid_t>(std::stol(*pid)), 5s));
    auto text = wait_for_file(marker, 5s);
    EXPECT_TRUE(text && text->find("sigterm") != std::string::npos)
        << "the daemon was not sent SIGTERM at its parent's normal exit";
    EXPECT_TRUE(reaper.reap(5s).empty()) << "the program left a process behind";
}

TEST(ProcessProgram, NoChildIsLeftAfterTheProgramExits) {
    Subreaper reaper;
    TempDir dir;
    Program prog(dir, {"exit-leaves-nothing"});
    ASSERT_TRUE(prog.wait());
    EXPECT_TRUE(prog.exited_with(0)) << prog.describe();
    const auto lines = lines_of(prog.out());
    EXPECT_EQ(lines.size(), 3u) << prog.describe();
    for (const auto& line : lines) {
        const pid_t pid = static_cast<pid_t>(std::stol(line.substr(4)));
        EXPECT_TRUE(mp::test::wait_pid_stopped(pid, 5s)) << line << " still runs";
    }
    auto left = reaper.reap(5s);
    EXPECT_TRUE(left.empty()) << "left behind:" << joined(left);
}

TEST(ProcessProgram, ForkserverChildrenFromAThreadedParentDoNotDeadlock) {
    Subreaper reaper;
    TempDir dir;
    Program prog(dir, {"threaded-forkserver"});
    ASSERT_TRUE(prog.wait(40s)) << "the program hung: " << prog.describe();
    EXPECT_TRUE(prog.exited_with(0)) << prog.describe();
    const std::string out = prog.out();
    EXPECT_NE(out.find("all ok"), std::string::npos) << prog.describe();
    for (int i = 0; i < 3; ++i) {
        EXPECT_NE(out.find("fs-child " + std::to_string(i) + " locked"), std::string::npos)
            << prog.describe();
    }
    auto left = reaper.reap(5s);
    EXPECT_TRUE(left.empty()) << "left behind:" << joined(left);
}

// The forkserver is a fresh exec of the program (spawn), so threads that allocate while it
// starts hand it nothing (it used to be forked from here, and under ASan its children hung in
// ASan's allocator, whose locks are not made safe across fork, in 30-45% of runs).
TEST(ProcessProgram, ForkserverFirstUsedAfterThreadsStarted) {
    Subreaper reaper;
    TempDir dir;
    Program prog(dir, {"threaded-forkserver-late"});
    ASSERT_TRUE(prog.wait(40s)) << "the program hung: " << prog.describe();
    EXPECT_TRUE(prog.exited_with(0)) << prog.describe();
    const std::string out = prog.out();
    EXPECT_NE(out.find("all ok"), std::string::npos) << prog.describe();
    for (int i = 0; i < 3; ++i) {
        EXPECT_NE(out.find("fs-child " + std::to_string(i) + " allocated"), std::string::npos)
            << prog.describe();
    }
    auto left = reaper.reap(5s);
    EXPECT_TRUE(left.empty()) << "left behind:" << joined(left);
}

TEST(ProcessProgram, ChildSkipsAtexitAndStaticDestructorsButFlushesStdio) {
    TempDir dir;
    const std::string marker = dir.file("marker");
    Program prog(dir, {"atexit-not-run", marker});
    ASSERT_TRUE(prog.wait());
    EXPECT_TRUE(prog.exited_with(0)) << prog.describe();
    const std::string out = prog.out();
    EXPECT_EQ(field(out, "child-exitcode"), "0") << prog.describe();
    EXPECT_EQ(count_of(out, "child-buffered"), 1u)
        << "the child's unflushed stdout buffer was lost (or doubled): " << prog.describe();
    auto child = field(out, "child-pid");
    ASSERT_TRUE(child) << prog.describe();
    const std::string parent = std::to_string(prog.pid());
    auto lines = lines_of(slurp(marker).value_or(""));
    std::sort(lines.begin(), lines.end());
    EXPECT_EQ(lines, (std::vector<std::string>{"atexit " + parent, "static-dtor " + parent}))
        << "child pid " << *child << ", parent pid " << parent;
}

TEST(ProcessProgram, ParentStdioBufferIsNotDuplicatedByTheChild) {
    TempDir dir;
    Program prog(dir, {"parent-buffer"});
    ASSERT_TRUE(prog.wait());
    EXPECT_TRUE(prog.exited_with(0)) << prog.describe();
    const std::string out = prog.out();
    EXPECT_EQ(count_of(out, "parent-buffered"), 1u) << out;
    EXPECT_EQ(count_of(out, "child-ran"), 1u) << out;
    EXPECT_NE(out.find("child-done 0"), std::string::npos) << out;
}

// ---------------------------------------------------------------------------------------------
// The leak check itself
// ---------------------------------------------------------------------------------------------

TEST(ProcessLeakCheck, ReportsLeakedFdsChildrenAndShmEntries) {
    const auto base = mp::test::snapshot();
    EXPECT_EQ(mp::test::describe_leaks(base), "");

    const int fd = ::open("/dev/null", O_RDONLY | O_CLOEXEC);
    ASSERT_GE(fd, 0);
    const pid_t child = ::fork();
    ASSERT_GE(child, 0);
    if (child == 0) {
        for (;;) ::pause();
    }
    const std::string shm_name = "mp_leak_check_selftest_" + std::to_string(::getpid());
    const int shm = ::shm_open(shm_name.c_str(), O_CREAT | O_RDWR | O_CLOEXEC, 0600);
    EXPECT_GE(shm, 0);

    const std::string report = mp::test::describe_leaks(base);
    EXPECT_NE(report.find("fd " + std::to_string(fd) + " -> /dev/null"), std::string::npos)
        << report;
    EXPECT_NE(report.find("pid " + std::to_string(child)), std::string::npos) << report;
    EXPECT_NE(report.find("/dev/shm/" + shm_name), std::string::npos) << report;

    ::kill(child, SIGKILL);
    ::waitpid(child, nullptr, 0);
    ::close(fd);
    ::shm_unlink(shm_name.c_str());
    if (shm >= 0) ::close(shm);
    EXPECT_EQ(mp::test::describe_leaks(base), "");
}

TEST(ProcessLeakCheck, ForkserverAndItsConnectionAreExempt) {
    mp::Process p(forkserver_options(), fs_noop);
    p.start();
    ASSERT_TRUE(p.join(kLong));
    p.close();
    EXPECT_EQ(mp::test::forkservers().size(), 1u);
    EXPECT_EQ(mp::test::describe_leaks(mp::test::current_baseline()), "")
        << "the check would blame the forkserver's own fds on the test";
}

}  // namespace
