// socketserver: PreforkTCPServer (a fixed set of forked workers accepting on one socket) and
// SignalStop (a signal that stops serve_forever).

#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cerrno>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

#include "mp/socketserver.hpp"
#include "mp/process.hpp"
#include "sys/error.hpp"
#include "sys/fd.hpp"

namespace mp {

namespace {
using Clock = std::chrono::steady_clock;
}  // namespace

// ---- PreforkTCPServer ----

PreforkTCPServer::PreforkTCPServer(ServerAddress address, HandlerFactory factory, ServerOptions options)
    : BaseServer(std::move(address), std::move(factory),
                 Kind{SocketKind::stream, AddressFamily::inet, Concurrency::none}, std::move(options)) {
    if (BaseServer::options().workers == 0) throw std::invalid_argument("PreforkTCPServer: workers must be > 0");
}

PreforkTCPServer::~PreforkTCPServer() = default;

std::unique_ptr<Process> PreforkTCPServer::start_worker(int stop_fd) {
    auto w = std::make_unique<Process>(
        ProcessOptions{.name = "prefork-worker", .daemon = true, .start_method = StartMethod::fork},
        [this, stop_fd] {
            for (;;) {
                pollfd fds[2] = {{fileno(), POLLIN, 0}, {stop_fd, POLLIN, 0}};
                if (::poll(fds, 2, -1) < 0) {
                    if (errno == EINTR) continue;
                    return;
                }
                // Between requests only: a request under way is always finished first.
                if (fds[1].revents != 0) return;
                if (fds[0].revents != 0) handle_request_noblock();
            }
        });
    w->start();
    ++started_;
    return w;
}

void PreforkTCPServer::serve_forever(detail::Timeout poll_interval) {
    check_open();
    if (!begin_serving()) return;
    // Every worker polls the one socket: the ones that lose the race to accept see EAGAIN.
    const int flags = ::fcntl(fileno(), F_GETFL);
    if (flags >= 0) (void)::fcntl(fileno(), F_SETFL, flags | O_NONBLOCK);
    // Named references, not a structured binding: clang 14 cannot capture a binding in a lambda.
    auto stop_pipe = sys::make_pipe();
    sys::Fd& stop_r = stop_pipe.first;
    sys::Fd& stop_w = stop_pipe.second;
    auto stop_workers = [&, this] {
        const char b = 1;
        (void)!::write(stop_w.get(), &b, 1);  // stays unread: every worker sees it
        std::vector<std::unique_ptr<Process>> ws;
        {
            std::lock_guard lock(workers_mu_);
            ws.swap(workers_);
        }
        // Past a stop's deadline, a worker still busy with a request is terminated (SIGTERM: its
        // connection is in the worker, out of this process's reach), and killed (SIGKILL) if it
        // is still there a second later, as a forking server's child: a handler that ignores
        // SIGTERM must not keep the stop waiting for ever.
        const auto deadline = close_deadline();
        constexpr auto kill_grace = std::chrono::seconds(1);
        auto end = [](Process& w, void (Process::*how)()) {
            try {
                (w.*how)();
            } catch (const std::exception&) {
                // it ended meanwhile
            }
        };
        if (deadline) {
            for (auto& w : ws)
                if (!w->join(std::max(*deadline - Clock::now(), Clock::duration::zero()))) end(*w, &Process::terminate);
            for (auto& w : ws)
                if (!w->join(std::max(*deadline + kill_grace - Clock::now(), Clock::duration::zero())))
                    end(*w, &Process::kill);
        }
        for (auto& w : ws) w->join();
    };
    try {
        {
            std::lock_guard lock(workers_mu_);
            for (std::size_t i = 0; i < options().workers; ++i) workers_.push_back(start_worker(stop_r.get()));
        }
        while (!shutdown_requested()) {
            std::vector<pollfd> fds{{wakeup_fd(), POLLIN, 0}};
            {
                std::lock_guard lock(workers_mu_);
                for (auto& w : workers_) fds.push_back({w->sentinel(), POLLIN, 0});
            }
            int n = ::poll(fds.data(), fds.size(), sys::poll_timeout_ms(poll_interval));
            if (n < 0 && errno != EINTR) sys::throw_system_error(errno, "poll");
            if (n > 0 && fds[0].revents != 0) take_wakeup();
            if (shutdown_requested()) break;
            {
                std::lock_guard lock(workers_mu_);
                for (auto& w : workers_) {
                    if (w->is_alive()) continue;
                    w->join();
                    w = start_worker(stop_r.get());  // a crashed or killed worker is replaced
                }
            }
            service_actions();
        }
    } catch (...) {
        stop_workers();
        end_serving();
        throw;
    }
    stop_workers();
    end_serving();
}

std::vector<pid_t> PreforkTCPServer::worker_pids() const {
    std::lock_guard lock(workers_mu_);
    std::vector<pid_t> pids;
    for (auto& w : workers_) pids.push_back(w->pid());
    return pids;
}

std::size_t PreforkTCPServer::workers_started() const {
    std::lock_guard lock(workers_mu_);
    return started_;
}

// ---- SignalStop ----

namespace {

// What the signal handler may read: the self-pipe's write end and the process that owns it.
std::atomic<int> signal_pipe{-1};
std::atomic<pid_t> signal_owner{0};
std::atomic<bool> signal_stop_live{false};

extern "C" void on_stop_signal(int sig) {
    const int saved = errno;
    const int fd = signal_pipe.load(std::memory_order_relaxed);
    if (fd < 0 || ::getpid() != signal_owner.load(std::memory_order_relaxed)) {
        // A forked child (nobody reads the pipe there), or a signal that raced the destructor:
        // act as if the handler had never been installed.
        struct sigaction dfl {};
        dfl.sa_handler = SIG_DFL;
        sigemptyset(&dfl.sa_mask);
        (void)::sigaction(sig, &dfl, nullptr);
        (void)::raise(sig);  // delivered when this handler returns
    } else {
        const auto b = static_cast<unsigned char>(sig);
        (void)!::write(fd, &b, 1);  // non-blocking: a full pipe has a stop pending already
    }
    errno = saved;
}

}  // namespace

SignalStop::SignalStop(std::initializer_list<int> signals) : signals_(signals) {
    for (int sig : signals_) {
        if (sig <= 0 || sig >= NSIG || sig > 255)
            throw std::invalid_argument("mp::SignalStop: not a signal number: " + std::to_string(sig));
    }
    if (signal_stop_live.exchange(true))
        throw Error("mp::SignalStop: another SignalStop is live in this process");
    try {
        auto [r, w] = sys::make_pipe();
        const int flags = sys::check(::fcntl(w.get(), F_GETFL), "fcntl F_GETFL");
        sys::check(::fcntl(w.get(), F_SETFL, flags | O_NONBLOCK), "fcntl F_SETFL");
        pipe_r_ = r.release();
        pipe_w_ = w.release();
        watcher_ = sys::start_thread("mp: the prefork server could not start its signal watcher", [this] { watch(); });
        signal_owner.store(::getpid());
        signal_pipe.store(pipe_w_);
        for (int sig : signals_) {
            struct sigaction sa {};
            sa.sa_handler = on_stop_signal;
            sigemptyset(&sa.sa_mask);
            sa.sa_flags = SA_RESTART;
            struct sigaction old {};
            sys::check(::sigaction(sig, &sa, &old), "sigaction");
            previous_.push_back(old);
        }
    } catch (...) {
        restore();
        signal_pipe.store(-1);
        if (watcher_.joinable()) {
            const unsigned char quit = 0;
            (void)!::write(pipe_w_, &quit, 1);
            watcher_.join();
        }
        if (pipe_r_ >= 0) ::close(pipe_r_);
        if (pipe_w_ >= 0) ::close(pipe_w_);
        signal_stop_live.store(false);
        throw;
    }
}

SignalStop::~SignalStop() {
    restore();
    signal_pipe.store(-1);
    const unsigned char quit = 0;
    (void)!::write(pipe_w_, &quit, 1);
    watcher_.join();
    ::close(pipe_r_);
    ::close(pipe_w_);
    signal_stop_live.store(false);
}

void SignalStop::watch() noexcept {
    for (;;) {
        unsigned char b = 0;
        const ssize_t n = ::read(pipe_r_, &b, 1);
        if (n < 0 && errno == EINTR) continue;
        if (n <= 0 || b == 0) return;
        if (signal_.load() != 0) continue;
        signal_.store(b);
        restore();  // a second signal acts as it did before
        source_.request_stop();
    }
}

void SignalStop::restore() noexcept {
    std::lock_guard lock(restore_mu_);
    if (restored_) return;
    restored_ = true;
    for (std::size_t i = 0; i < previous_.size(); ++i) (void)::sigaction(signals_[i], &previous_[i], nullptr);
}

}  // namespace mp
