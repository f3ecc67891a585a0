#pragma once
// The pool's wire between its thread and one worker: a Unix stream socket carrying frames
//   [u64 payload length][u64 ordinal][u8 type][u8 flags][u16 descriptor count][u32 zero][payload]
// with descriptors passed by SCM_RIGHTS on the first byte of their frame. Both sides batch:
// a writer appends frames to a buffer and sends it in as few calls as the socket allows; a
// reader takes whatever has arrived and hands out the complete frames. Tiny tasks therefore
// cost a system call per batch, not per task.

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <deque>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "sys/fd.hpp"

namespace mp::detail::pool {

enum class FrameType : std::uint8_t {
    eof_marker = 0,  // not on the wire: the reader's end of file
    // parent -> worker
    init = 1,  // [u32 slot][u64 stage offset][u64 stage bytes][u64 max tasks][u64 max rss]
               // [u8 has initializer][initializer task]
    task = 2,  // payload: the task (a chunk too); ordinal: the worker's count of tasks sent to it
    // worker -> parent
    ready = 10,        // the initializer ran (or there was none)
    init_failed = 11,  // payload: ErrorInfo
    started = 12,      // sent as a task with a time limit, or the first after a wait, starts
    result = 13,       // payload: [u64 run time ns][result bytes, or ErrorInfo when not ok]
    retire = 14,       // the worker leaves after this (task or memory limit reached)
    skipped = 15,      // a task withdrawn before it started (taken back, or cancelled) was not run
};

inline constexpr std::uint8_t kTimed = 1;   // task: tell the parent when it starts
inline constexpr std::uint8_t kOk = 1;      // result: a value, not an exception

struct FrameHeader {
    std::uint64_t length;
    std::uint64_t ordinal;
    std::uint8_t type;
    std::uint8_t flags;
    std::uint16_t nfds;
    std::uint32_t zero;
};
static_assert(sizeof(FrameHeader) == 24);

/// A frame far beyond any task is a corrupt stream, not a message.
inline constexpr std::uint64_t kMaxFrame = std::uint64_t{1} << 40;

struct Frame {
    FrameType type = FrameType::eof_marker;
    std::uint8_t flags = 0;
    std::uint64_t ordinal = 0;
    std::string_view payload;  // valid until the reader's next read
    std::vector<sys::Fd> fds;
};

class FrameReader {
public:
    enum class Status { data, again, eof };
    /// Reads what has arrived (one recvmsg); blocks only when the socket is blocking.
    Status read_some(int fd);
    /// The next complete frame, if one has arrived. Throws DecodeError for a corrupt stream.
    std::optional<Frame> next();
    /// Forgets what was read and reads `bytes` instead (a dead worker's unsent answers).
    void reset(std::string_view bytes);

private:
    std::string buf_;
    std::size_t start_ = 0;
    std::size_t end_ = 0;
    std::deque<sys::Fd> fds_;
};

class FrameWriter {
public:
    /// Appends a frame; `fds` are borrowed until flushed (the caller keeps them open).
    void add(FrameType type, std::uint8_t flags, std::uint64_t ordinal, std::string_view a,
             std::string_view b = {}, std::vector<int> fds = {});
    bool empty() const noexcept { return off_ == buf_.size(); }
    std::size_t unsent() const noexcept { return buf_.size() - off_; }
    /// Sends as much as the socket takes: all of it when blocking. True when all was sent.
    /// Throws std::system_error (EPIPE when the peer has gone).
    bool flush(int fd);

private:
    std::string buf_;
    std::size_t off_ = 0;
    struct Rights {
        std::size_t at;
        std::vector<int> fds;
    };
    std::deque<Rights> rights_;
};

/// Each task a worker holds has a ticket, one word in the worker's slot: (ordinal << 2) | state.
/// The pool writes it queued before it sends the task; then exactly one compare-and-swap from
/// queued wins: the worker's (started, it runs the task) or the pool's or a canceller's
/// (withdrawn, the worker skips it). So a queued task is never both run and taken back or
/// cancelled, and it counts as running only once a worker has really started it.
enum TicketState : std::uint64_t { kQueued = 0, kStarted = 1, kWithdrawn = 2 };
/// Tickets are indexed by ordinal modulo this; the pool never lets the tasks a worker holds
/// span more ordinals (a worker holds at most 1024), so a live ticket is never overwritten.
/// A ticket overwritten by a later task reads as withdrawn to whoever held the earlier one.
inline constexpr std::size_t kTickets = 4096;
constexpr std::uint64_t ticket(std::uint64_t ordinal, TicketState s) noexcept { return ordinal << 2 | s; }

/// One worker's entry in the shared status page, written by the worker, read by the pool after
/// the worker has died: which task it had started, which it had finished, and how much of its
/// stage (the shared buffer its answers wait in until sent) is written and sent.
struct alignas(64) WorkerSlot {
    /// The ordinal of the last task the worker started (or skipped), stored once its ticket is
    /// settled.
    std::atomic<std::uint64_t> started{0};
    std::atomic<std::uint64_t> finished{0};
    std::atomic<std::int64_t> started_at{0};  // steady_clock nanoseconds at the last start
    std::atomic<std::uint64_t> committed{0};
    std::atomic<std::uint64_t> sent{0};
    std::atomic<std::uint64_t> tickets[kTickets] = {};

    std::atomic<std::uint64_t>& ticket_of(std::uint64_t ordinal) noexcept { return tickets[ordinal % kTickets]; }
};

/// Each worker's stage: answers are written here, in shared memory, and sent in batches, so
/// those a worker finished but had not sent when it died are not lost: the pool reads them.
inline constexpr std::size_t kStageBytes = 256 * 1024;

/// The worker's life: the loop over frames on `sock`. Returns its exit code.
int worker_loop(int sock, WorkerSlot* slots);

}  // namespace mp::detail::pool
