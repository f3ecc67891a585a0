// The pool's frames and a worker's life: read tasks, run them, answer, in batches.

#include <fcntl.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <condition_variable>
#include <cstring>
#include <mutex>
#include <thread>
#include <fstream>

#include "mp/detail/future_core.hpp"
#include "mp/detail/task.hpp"
#include "mp/errors.hpp"
#include "mp/util.hpp"
#include "pool_frames.hpp"
#include "sys/error.hpp"
#include "sys/helper_process.hpp"

namespace mp::detail::pool {

// ---- reading ------------------------------------------------------------------------------------

FrameReader::Status FrameReader::read_some(int fd) {
    // Keep room for a large batch of small frames; move the unread rest to the front first.
    constexpr std::size_t kChunk = 256 * 1024;
    if (start_ == end_) start_ = end_ = 0;
    if (buf_.size() - end_ < kChunk / 4) {
        if (start_ != 0) {
            std::memmove(buf_.data(), buf_.data() + start_, end_ - start_);
            end_ -= start_;
            start_ = 0;
        }
        if (buf_.size() - end_ < kChunk / 4) buf_.resize(end_ + kChunk);
    }
    sys::RecvMsg m(buf_.data() + end_, buf_.size() - end_);
    std::optional<std::size_t> got;
    try {
        got = sys::recv_msg(fd, m, false, "recvmsg (pool)");
    } catch (const std::system_error& e) {
        if (e.code().value() == ECONNRESET) return Status::eof;
        throw;
    }
    if (!got) return Status::again;
    const std::size_t n = *got;
    sys::for_each_right(m.msg, [&](int received) { fds_.emplace_back(received); });
    if (m.truncated()) {
        // The kernel dropped descriptors that did not fit: the frames they belong to are lost.
        throw DecodeError("mp pool: descriptors were cut off in transit (MSG_CTRUNC)");
    }
    if (n == 0) return Status::eof;
    end_ += n;
    return Status::data;
}

void FrameReader::reset(std::string_view bytes) {
    buf_.assign(bytes.data(), bytes.size());
    start_ = 0;
    end_ = bytes.size();
    fds_.clear();
}

std::optional<Frame> FrameReader::next() {
    const std::size_t have = end_ - start_;
    if (have < sizeof(FrameHeader)) return std::nullopt;
    FrameHeader h;
    std::memcpy(&h, buf_.data() + start_, sizeof h);
    if (h.length > kMaxFrame || h.zero != 0)
        throw DecodeError("mp pool: corrupt frame from the other side");
    if (have - sizeof h < h.length) {
        // Make room for the whole frame now, so the next read can complete it.
        if (buf_.size() - start_ < sizeof h + h.length) {
            std::memmove(buf_.data(), buf_.data() + start_, have);
            start_ = 0;
            end_ = have;
            buf_.resize(sizeof h + h.length + 64 * 1024);
        }
        return std::nullopt;
    }
    if (fds_.size() < h.nfds) {
        // Descriptors travel with the frame's first byte, so they are here by now.
        throw DecodeError("mp pool: a frame's descriptors did not arrive");
    }
    Frame f;
    f.type = static_cast<FrameType>(h.type);
    f.flags = h.flags;
    f.ordinal = h.ordinal;
    f.payload = std::string_view(buf_.data() + start_ + sizeof h, h.length);
    for (std::uint16_t i = 0; i < h.nfds; ++i) {
        f.fds.push_back(std::move(fds_.front()));
        fds_.pop_front();
    }
    start_ += sizeof h + h.length;
    return f;
}

// ---- writing ------------------------------------------------------------------------------------

void FrameWriter::add(FrameType type, std::uint8_t flags, std::uint64_t ordinal, std::string_view a,
                      std::string_view b, std::vector<int> fds) {
    if (off_ == buf_.size()) {
        buf_.clear();
        off_ = 0;
    }
    FrameHeader h{a.size() + b.size(), ordinal, static_cast<std::uint8_t>(type), flags,
                  static_cast<std::uint16_t>(fds.size()), 0};
    if (fds.size() > sys::kMaxFds) throw Error("mp pool: a task may carry at most 253 descriptors");
    if (!fds.empty()) rights_.push_back({buf_.size(), std::move(fds)});
    buf_.append(reinterpret_cast<const char*>(&h), sizeof h);
    buf_.append(a);
    buf_.append(b);
}

bool FrameWriter::flush(int fd) {
    while (off_ < buf_.size()) {
        // One sendmsg never crosses the start of a frame with descriptors: those go attached to
        // that frame's first byte, in a call of its own, so that each frame's descriptors leave
        // (and arrive) with it. A call may carry the one frame with descriptors it starts with,
        // and the frames without any behind it, up to the next frame that has some.
        const bool attach = !rights_.empty() && rights_.front().at == off_;
        std::size_t stop = buf_.size();
        const std::size_t next_rights = attach ? 1 : 0;
        if (rights_.size() > next_rights) stop = rights_[next_rights].at;
        iovec iov{buf_.data() + off_, stop - off_};
        msghdr msg{};
        msg.msg_iov = &iov;
        msg.msg_iovlen = 1;
        sys::FdControl control;
        if (attach) sys::attach_rights(msg, control, rights_.front().fds);
        ssize_t n;
        do {
            n = ::sendmsg(fd, &msg, MSG_NOSIGNAL);
        } while (n < 0 && errno == EINTR);
        if (n < 0) {
            if (errno == EAGAIN || errno == EWOULDBLOCK) return false;
            sys::throw_system_error(errno, "sendmsg (pool)");
        }
        if (attach) rights_.pop_front();
        off_ += static_cast<std::size_t>(n);
    }
    buf_.clear();
    off_ = 0;
    return true;
}

// ---- the worker ---------------------------------------------------------------------------------

namespace {

using Clock = std::chrono::steady_clock;

// The worker's resident size, read through a descriptor kept open (a pread of statm costs about
// a microsecond; opening the file each time costs eight, and smaps_rollup, which would give the
// private pages alone, walks every page table: milliseconds in a large process).
class ResidentSize {
public:
    void open() { fd_ = Fd(::open("/proc/self/statm", O_RDONLY | O_CLOEXEC)); }

    /// Bytes resident now; 0 when statm cannot be read (then no worker is retired for memory).
    std::size_t bytes() const {
        char buf[128];
        const ssize_t n = fd_ ? ::pread(fd_.get(), buf, sizeof buf - 1, 0) : -1;
        if (n <= 0) return 0;
        buf[n] = '\0';
        char* end = nullptr;
        (void)std::strtoull(buf, &end, 10);  // the first field is the virtual size
        return static_cast<std::size_t>(std::strtoull(end, nullptr, 10)) *
               static_cast<std::size_t>(::sysconf(_SC_PAGESIZE));
    }

private:
    Fd fd_;
};

void flush_stdio() {
    // Output a task printed should not wait for the worker's exit; flushing only what is
    // pending keeps the common case free of system calls.
    if (stdout->_IO_write_ptr > stdout->_IO_write_base) std::fflush(stdout);
    if (stderr->_IO_write_ptr > stderr->_IO_write_base) std::fflush(stderr);
}

template <class T>
T read_raw(std::string_view& p) {
    T v{};
    if (p.size() < sizeof v) throw DecodeError("mp pool: truncated init frame");
    std::memcpy(&v, p.data(), sizeof v);
    p.remove_prefix(sizeof v);
    return v;
}

// The worker's answers, staged in its shared slot's buffer (see kStageBytes), sent in batches:
// when the worker runs out of work, when the stage fills, and, from a second thread, when an
// answer has waited a millisecond (so a result never waits behind a long task that follows it).
class StageWriter {
public:
    ~StageWriter() {
        stop();
        active_ = nullptr;
    }

    void attach(int sock, WorkerSlot* slot, char* stage, std::size_t cap) {
        sock_ = sock;
        slot_ = slot;
        stage_ = stage;
        cap_ = cap;
        flusher_ = sys::start_thread("mp: a pool worker could not start its output flusher", [this] { flusher(); });
        // A task may call exit(): stop the flusher first (atexit handlers run last-registered
        // first), so the process ends single-threaded, as exit-time checkers (LeakSanitizer)
        // and the C library's own teardown expect.
        active_ = this;
        static const bool registered = std::atexit([] {
            if (StageWriter* w = active_) w->stop();
        }) == 0;
        (void)registered;
    }

    void stop() {
        if (!flusher_.joinable() || flusher_.get_id() == std::this_thread::get_id()) return;
        {
            std::lock_guard lock(mu_);
            stop_ = true;
        }
        cv_.notify_one();
        flusher_.join();
    }

    void add(FrameType type, std::uint8_t flags, std::uint64_t ordinal, std::string_view a,
             std::string_view b = {}) {
        std::unique_lock lock(mu_);
        FrameHeader h{a.size() + b.size(), ordinal, static_cast<std::uint8_t>(type), flags, 0, 0};
        const std::size_t n = sizeof h + a.size() + b.size();
        if (committed_ + n > cap_) flush_locked();
        if (n > cap_) {
            // Too big to stage: straight to the socket. A death during this write loses only
            // this answer, and its task counts as running, not finished.
            send_all(&h, sizeof h);
            send_all(a.data(), a.size());
            send_all(b.data(), b.size());
            return;
        }
        char* p = stage_ + committed_;
        std::memcpy(p, &h, sizeof h);
        // An empty view may hold a null pointer, which memcpy must not be given even for 0 bytes.
        if (!a.empty()) std::memcpy(p + sizeof h, a.data(), a.size());
        if (!b.empty()) std::memcpy(p + sizeof h + a.size(), b.data(), b.size());
        committed_ += n;
        slot_->committed.store(committed_, std::memory_order_release);
        if (!armed_) {
            armed_ = true;
            first_unsent_ = Clock::now();
            lock.unlock();
            cv_.notify_one();
        }
    }

    /// Sends everything staged. Throws std::system_error when the pool has gone.
    void flush() {
        std::lock_guard lock(mu_);
        flush_locked();
    }

private:
    void flush_locked() {
        if (failed_) sys::throw_system_error(EPIPE, "send (pool worker)");
        armed_ = false;
        if (committed_ == 0) return;
        while (sent_ < committed_) {
            ssize_t n = ::send(sock_, stage_ + sent_, committed_ - sent_, MSG_NOSIGNAL);
            if (n < 0) {
                if (errno == EINTR) continue;
                failed_ = true;
                sys::throw_system_error(errno, "send (pool worker)");
            }
            sent_ += static_cast<std::size_t>(n);
            slot_->sent.store(sent_, std::memory_order_release);
        }
        // Empty again. committed first: a death between the two stores leaves sent >= committed,
        // which the pool reads as nothing unsent.
        committed_ = sent_ = 0;
        slot_->committed.store(0, std::memory_order_release);
        slot_->sent.store(0, std::memory_order_release);
    }

    void flusher() {
        std::unique_lock lock(mu_);
        while (!stop_) {
            if (!armed_) {
                cv_.wait(lock);
                continue;
            }
            const auto due = first_unsent_ + std::chrono::milliseconds(1);
            if (Clock::now() < due) {
                cv_.wait_until(lock, due);
                continue;
            }
            try {
                flush_locked();
            } catch (const std::system_error&) {
                // The pool has gone; the worker finds out at its next flush.
                armed_ = false;
            }
        }
    }

    void send_all(const void* p, std::size_t n) {
        const char* c = static_cast<const char*>(p);
        while (n != 0) {
            ssize_t k = ::send(sock_, c, n, MSG_NOSIGNAL);
            if (k < 0) {
                if (errno == EINTR) continue;
                failed_ = true;
                sys::throw_system_error(errno, "send (pool worker)");
            }
            c += k;
            n -= static_cast<std::size_t>(k);
        }
    }

    int sock_ = -1;
    WorkerSlot* slot_ = nullptr;
    char* stage_ = nullptr;
    std::size_t cap_ = 0;
    std::size_t committed_ = 0;
    std::size_t sent_ = 0;
    std::mutex mu_;
    std::condition_variable cv_;
    bool armed_ = false;  // answers wait unsent; first_unsent_ says since when
    bool stop_ = false;
    bool failed_ = false;
    Clock::time_point first_unsent_{};
    std::thread flusher_;
    static inline StageWriter* active_ = nullptr;  // the worker's one writer, for atexit
};

class Worker {
public:
    Worker(int sock, WorkerSlot* slots) : sock_(sock), slots_(slots) {}

    int run() {
        Frame init = next_frame();
        if (init.type == FrameType::eof_marker) return 0;
        if (init.type != FrameType::init) return 3;
        std::string_view p = init.payload;
        slot_ = &slots_[read_raw<std::uint32_t>(p)];
        const auto stage_offset = read_raw<std::uint64_t>(p);
        const auto stage_bytes = read_raw<std::uint64_t>(p);
        out_.attach(sock_, slot_, reinterpret_cast<char*>(slots_) + stage_offset, stage_bytes);
        max_tasks_ = read_raw<std::uint64_t>(p);
        max_rss_ = read_raw<std::uint64_t>(p);
        const bool has_init = read_raw<std::uint8_t>(p) != 0;
        if (has_init) {
            std::vector<int> fds = raw(init.fds);
            try {
                (void)run_task(p, fds);
            } catch (...) {
                Encoder e;
                encode_current_exception(e);
                out_.add(FrameType::init_failed, 0, 0, e.bytes());
                flush();
                return 1;
            }
            flush_stdio();
        }
        if (max_rss_ != 0) {
            // The limit is on what the worker gains from here on. Its resident size at this
            // point is not its own doing: under fork it holds every page it shares with the
            // parent (a big parent would otherwise have every worker retired after each task),
            // under spawn the program's start-up, and in every case the initializer's state.
            rss_.open();
            rss_base_ = rss_.bytes();
        }
        out_.add(FrameType::ready, 0, 0, {});
        while (true) {
            Frame f = next_frame();
            if (f.type == FrameType::eof_marker) {
                get_logger().debug("worker got sentinel -- exiting");
                return exiting(0);
            }
            if (f.type != FrameType::task) return 3;
            if (!run_one(f)) return exiting(0);
        }
    }

    // Python's worker's last words (debug), then `code`.
    int exiting(int code) const noexcept {
        Logger& log = get_logger();
        if (log.enabled_for(LogLevel::debug)) {
            char line[64];
            std::snprintf(line, sizeof line, "worker exiting after %llu tasks", static_cast<unsigned long long>(done_));
            log.debug(line);
        }
        return code;
    }

private:
    // Returns false when the worker should retire.
    bool run_one(Frame& f) {
        // Back-to-back tasks share a clock reading: this one began when the last one ended.
        const bool after_wait = !last_end_;
        const auto begin = last_end_ ? *last_end_ : Clock::now();
        slot_->started_at.store(begin.time_since_epoch().count(), std::memory_order_relaxed);
        if (!claim(f.ordinal)) {
            // Withdrawn (taken back for another worker, or cancelled): say so, run nothing.
            slot_->finished.store(f.ordinal, std::memory_order_release);
            out_.add(FrameType::skipped, 0, f.ordinal, {});
            return true;
        }
        if (f.flags & kTimed) {
            out_.add(FrameType::started, 0, f.ordinal, {});
            flush();
        } else if (after_wait) {
            // The pool may be asleep: tell it (within the flusher's millisecond) that this task
            // now runs. Later tasks of a batch start as the answer before them arrives.
            out_.add(FrameType::started, 0, f.ordinal, {});
        }
        std::vector<int> fds = raw(f.fds);
        std::string result;
        std::uint8_t flags = kOk;
        try {
            result = run_task(f.payload, fds, TaskResult::sent);
        } catch (...) {
            flags = 0;
            Encoder e;
            encode_current_exception(e);
            result = e.take();
        }
        // Descriptors the arguments did not take close with f.fds; those taken are theirs.
        for (std::size_t i = 0; i < fds.size(); ++i)
            if (fds[i] < 0) (void)f.fds[i].release();
        flush_stdio();
        const auto end = Clock::now();
        last_end_ = end;
        const std::uint64_t run_ns = static_cast<std::uint64_t>(
            std::chrono::duration_cast<std::chrono::nanoseconds>(end - begin).count());
        out_.add(FrameType::result, flags, f.ordinal,
                 std::string_view(reinterpret_cast<const char*>(&run_ns), sizeof run_ns), result);
        slot_->finished.store(f.ordinal, std::memory_order_release);
        ++done_;
        if ((max_tasks_ != 0 && done_ >= max_tasks_) || (max_rss_ != 0 && grown() > max_rss_)) {
            out_.add(FrameType::retire, 0, f.ordinal, {});
            flush();
            return false;
        }
        return true;
    }

    // Resident bytes gained since the worker became ready (a shrink counts as none).
    std::size_t grown() const {
        const std::size_t now = rss_.bytes();
        return now > rss_base_ ? now - rss_base_ : 0;
    }

    // Settles the task's ticket (see WorkerSlot): true when this worker is to run it.
    bool claim(std::uint64_t ordinal) {
        std::uint64_t expected = ticket(ordinal, kQueued);
        const bool mine = slot_->ticket_of(ordinal).compare_exchange_strong(
            expected, ticket(ordinal, kStarted), std::memory_order_acq_rel, std::memory_order_acquire);
        slot_->started.store(ordinal, std::memory_order_release);
        return mine;
    }

    static std::vector<int> raw(const std::vector<sys::Fd>& fds) {
        std::vector<int> out;
        for (const auto& fd : fds) out.push_back(fd.get());
        return out;
    }

    void flush() {
        try {
            out_.flush();
        } catch (const std::system_error&) {
            // The pool has gone: nobody wants the results.
            flush_stdio();
            sys::exit_child(0);
        }
    }

    // The next frame, flushing the answers before blocking for more work. An end of file (the
    // pool closed the socket, or the parent died) comes back as eof_marker.
    Frame next_frame() {
        while (true) {
            if (auto f = in_.next()) return std::move(*f);
            flush();
            last_end_.reset();  // waiting for work is not part of the next task's time
            if (in_.read_some(sock_) == FrameReader::Status::eof) {
                Frame f;
                f.type = FrameType::eof_marker;
                return f;
            }
        }
    }

    int sock_;
    WorkerSlot* slots_;
    WorkerSlot* slot_ = nullptr;
    std::uint64_t max_tasks_ = 0;
    std::uint64_t max_rss_ = 0;
    ResidentSize rss_;
    std::size_t rss_base_ = 0;
    std::uint64_t done_ = 0;
    FrameReader in_;
    StageWriter out_;
    std::optional<Clock::time_point> last_end_;
};

}  // namespace

int worker_loop(int sock, WorkerSlot* slots) {
    try {
        return Worker(sock, slots).run();
    } catch (const std::exception& e) {
        try {
            get_logger().error("mp pool worker " + std::to_string(::getpid()) + ": " + e.what());
        } catch (...) {
        }
        return 3;
    }
}

}  // namespace mp::detail::pool
