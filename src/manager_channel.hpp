#pragma once
// The shared-memory fast path of a manager connection (a "channel"), used by src/managers.cpp.
//
// Why. Over the socket, a proxy call costs a send and a receive on each side plus two kernel
// wake-ups, so a dict set/get can never beat a bare socket ping-pong (about 100k-140k round trips
// a second on a small VM). When the client reaches the server through a Unix socket (same host),
// it asks, once authenticated, for a channel: the server creates a memfd holding a request buffer,
// a reply buffer and two sequence words, maps it, and sends the descriptor over the socket
// (SCM_RIGHTS). From then on a call copies its request into the block and bumps the request
// sequence; the server thread for that connection, which spins briefly and then sleeps on that
// word (futex), runs it and answers the same way. Both sides close the memfd once mapped (a
// channel costs no descriptor beyond the socket), and it never has a name (no /dev/shm entry):
// the memory goes with the last mapping, whoever dies first.
//
// The socket stays open and keeps two jobs:
//   - a message longer than a buffer: the sender stores kOnSocket as the length, publishes the
//     sequence, and only then sends the frame over the socket (so a frame bigger than the socket
//     buffer cannot block a sender whose reader has not been told to read yet);
//   - noticing a dead peer: a futex cannot report that the other process died, so a sleeping
//     waiter wakes every kPeerCheck and polls the socket for a hang-up (the kernel closes a killed
//     process's socket). The server thus still ends the thread of a killed client (and releases
//     its locks), and a client gets mp::EOFError promptly when the server dies.
//
// Trust. Only a connection that passed the authkey handshake can ask for a channel. The server
// still treats the block as the client's to scribble on: it reads each length once, checks it
// against the capacity, and copies the request out before decoding it; and the memfd is sealed
// at its size, so a client cannot shrink it under the server's mapping (SIGBUS).
//
// Waiting (as src/queue.cpp): each side has a sequence word and a "waiting" flag. A waiter whose
// peer last ran on another CPU first spins for up to kSpinTime (the peer usually answers within a
// microsecond or two); one whose peer shares its CPU does not spin at all, since that would only
// keep the peer from running (under load the scheduler often puts both on one CPU: spinning there
// made calls several times slower than sleeping at once). Then it raises its flag, re-reads the
// sequence and sleeps on it (futex); the publisher stores the sequence, then reads the flag and
// wakes only when it is raised. All four accesses are seq_cst, so either the waiter sees the new
// sequence or the publisher sees the flag (Dekker). There is one waiter per side: the calls on a
// connection alternate strictly with their replies.

#include <atomic>
#include <cerrno>
#include <chrono>
#include <cstdint>
#include <cstring>
#include <new>
#include <optional>
#include <string>
#include <string_view>
#include <utility>

#include <fcntl.h>
#include <poll.h>
#include <sched.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include "mp/connection.hpp"
#include "sys/futex.hpp"
#include "mp/errors.hpp"
#include "mp/serialize.hpp"
#include "sys/cpu_relax.hpp"
#include "sys/error.hpp"
#include "sys/fd.hpp"


namespace mp::detail::managers {

namespace channel {

inline constexpr std::uint64_t kMagic = 0x312d72676d2d706dULL;  // "mp-mgr-1" (little endian)
/// A length meaning "the message comes over the socket".
inline constexpr std::uint32_t kOnSocket = 0xffffffffu;
inline constexpr std::size_t kHeaderBytes = 4096;
/// Bytes of each buffer: a message up to this size goes through shared memory.
inline constexpr std::uint32_t kCapacity = 64 * 1024;
/// How long a waiter spins before it sleeps (when the peer runs on another CPU).
inline constexpr auto kSpinTime = std::chrono::microseconds(20);
/// How often a sleeping waiter looks whether its peer hung up.
inline constexpr auto kPeerCheck = std::chrono::milliseconds(50);
/// A block is sealed at its size (neither side can shrink or grow it) and is never larger.
inline constexpr int kSeals = F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_SEAL;
inline constexpr std::size_t kMaxBlock = std::size_t{64} << 20;
/// The name the memfd shows in /proc/PID/maps (tests look for it).
inline constexpr const char* kName = "mp-manager-channel";

using U32 = std::atomic<std::uint32_t>;

struct Header {
    std::uint64_t magic;
    std::uint32_t capacity;
    // The client's side: it writes req_len and the request buffer, then req_seq.
    alignas(64) U32 req_seq;
    U32 req_len;
    U32 server_waiting;
    std::atomic<std::int32_t> client_cpu;
    // The server's side: rep_len and the reply buffer, then rep_seq (= the request's req_seq).
    alignas(64) U32 rep_seq;
    U32 rep_len;
    U32 client_waiting;
    std::atomic<std::int32_t> server_cpu;
};
static_assert(sizeof(Header) <= kHeaderBytes);

/// Waits until ready(value of `word`) and returns that value; calls check() (which throws to
/// give up) whenever a sleep of kPeerCheck ends without progress. `peer_cpu`: the CPU the peer
/// last ran on (-1: unknown).
template <class Ready, class Check>
std::uint32_t wait(const U32& word, U32& flag, int peer_cpu, Ready ready, Check check) {
    using Clock = std::chrono::steady_clock;
    constexpr auto sc = std::memory_order_seq_cst;
    std::uint32_t v = word.load(std::memory_order_acquire);
    if (ready(v)) return v;
    // Spin only when the peer last ran on another CPU: on this one, spinning would only keep it
    // off the CPU it needs to answer (measured: a few times slower than sleeping at once).
    if (peer_cpu < 0 || peer_cpu != ::sched_getcpu()) {
        const auto start = Clock::now();
        for (;;) {
            for (int i = 0; i < 8; ++i) {
                sys::cpu_relax();
                if (ready(v = word.load(std::memory_order_acquire))) return v;
            }
            if (Clock::now() - start >= kSpinTime) break;
        }
    }
    for (;;) {
        flag.store(1, sc);
        v = word.load(sc);
        if (ready(v)) break;
        sys::futex_wait(word, v, Clock::now() + kPeerCheck);
        if (ready(v = word.load(sc))) break;
        check();  // a throw leaves the flag raised: it costs the peer a futex_wake, nothing more
    }
    flag.store(0, std::memory_order_relaxed);
    return v;
}

/// Stores `value` into `word` and wakes the peer when it sleeps there.
inline void publish(U32& word, const U32& flag, std::uint32_t value) {
    word.store(value, std::memory_order_seq_cst);
    if (flag.load(std::memory_order_seq_cst) != 0) sys::futex_wake(word, 1);
}

/// True when the peer of socket `fd` has hung up (or the socket failed or was shut down).
inline bool hung_up(int fd) {
    pollfd p{fd, POLLRDHUP, 0};
    return ::poll(&p, 1, 0) > 0 && (p.revents & (POLLRDHUP | POLLHUP | POLLERR | POLLNVAL)) != 0;
}

}  // namespace channel

/// One side's mapping of a channel block. Move-only; the destructor unmaps (and does nothing
/// else, so a fork child may drop an inherited copy without disturbing its parent's calls).
class Channel {
public:
    Channel() noexcept = default;
    Channel(Channel&& o) noexcept
        : base_(std::exchange(o.base_, nullptr)), size_(std::exchange(o.size_, 0)),
          cap_(o.cap_), seq_(o.seq_) {}
    Channel& operator=(Channel&& o) noexcept {
        if (this != &o) {
            unmap();
            base_ = std::exchange(o.base_, nullptr);
            size_ = std::exchange(o.size_, 0);
            cap_ = o.cap_;
            seq_ = o.seq_;
        }
        return *this;
    }
    Channel(const Channel&) = delete;
    Channel& operator=(const Channel&) = delete;
    ~Channel() { unmap(); }
    explicit operator bool() const noexcept { return base_ != nullptr; }

    /// The server's side: a new block; `fd` receives its memfd, to send to the client and close.
    static Channel create(sys::Fd& fd) {
        const std::size_t size = channel::kHeaderBytes + 2 * std::size_t{channel::kCapacity};
        sys::Fd f(sys::check(::memfd_create(channel::kName, MFD_CLOEXEC | MFD_ALLOW_SEALING),
                             "memfd_create"));
        sys::check(::ftruncate(f.get(), static_cast<off_t>(size)), "ftruncate");
        // Sealed at its size: a client could otherwise shrink the file under the server's
        // mapping, and the server would die of SIGBUS at its next access.
        sys::check(::fcntl(f.get(), F_ADD_SEALS, channel::kSeals), "fcntl(F_ADD_SEALS)");
        Channel c = map(f.get(), size);
        // The memfd is zero-filled: every atomic starts at 0.
        auto* h = new (c.base_) channel::Header{};
        h->magic = channel::kMagic;
        h->capacity = channel::kCapacity;
        h->client_cpu.store(-1, std::memory_order_relaxed);
        h->server_cpu.store(-1, std::memory_order_relaxed);
        c.cap_ = channel::kCapacity;
        fd = std::move(f);
        return c;
    }

    /// The client's side: maps the memfd the server sent (and closes it). mp::Error when it is
    /// not a channel block.
    static Channel attach(sys::Fd fd) {
        struct stat st {};
        sys::check(::fstat(fd.get(), &st), "fstat");
        const auto size = static_cast<std::size_t>(st.st_size);
        // The same checks protect the client from a bad server: a block that could shrink
        // under the mapping (SIGBUS), or too big to be one of ours.
        const int seals = ::fcntl(fd.get(), F_GET_SEALS);
        if (st.st_size <= 0 || size < channel::kHeaderBytes || size > channel::kMaxBlock ||
            seals < 0 || (seals & channel::kSeals) != channel::kSeals)
            throw Error("mp: the manager sent a bad shared-memory channel");
        Channel c = map(fd.get(), size);
        const channel::Header* h = c.header();
        if (h->magic != channel::kMagic || h->capacity == 0 ||
            h->capacity > (size - channel::kHeaderBytes) / 2)
            throw Error("mp: the manager sent a bad shared-memory channel");
        c.cap_ = h->capacity;
        c.seq_ = h->req_seq.load(std::memory_order_acquire);
        return c;
    }

    // ---- the client's side --------------------------------------------------------------------

    /// One request and its reply. `sock` is the connection the channel belongs to. Throws
    /// mp::EOFError when the server hangs up while the call is pending, mp::TimeoutError when
    /// `give_up` (if any) passes first; the channel is then out of step and must be dropped (as
    /// after any exception).
    std::string call(Connection& sock, std::string_view request,
                     std::optional<std::chrono::steady_clock::time_point> give_up = std::nullopt) {
        channel::Header* h = header();
        const std::uint32_t n = seq_ + 1;
        const bool big = !stage(h->req_len, request_buffer(), request);
        h->client_cpu.store(::sched_getcpu(), std::memory_order_relaxed);
        channel::publish(h->req_seq, h->server_waiting, n);
        seq_ = n;
        if (big) sock.send_bytes(request);
        const int fd = sock.fileno();
        channel::wait(
            h->rep_seq, h->client_waiting, h->server_cpu.load(std::memory_order_relaxed),
            [n](std::uint32_t v) { return v == n; },
            [fd, give_up] {
                if (channel::hung_up(fd))
                    throw EOFError("mp: the manager server went away (its connection hung up)");
                if (give_up && std::chrono::steady_clock::now() >= *give_up)
                    throw TimeoutError("mp: the manager server did not answer in time");
            });
        const std::uint32_t len = h->rep_len.load(std::memory_order_relaxed);
        if (len == channel::kOnSocket) return sock.recv_bytes();
        if (len > cap_) throw DecodeError("mp: bad reply length in the manager's channel");
        return std::string(reply_buffer(), len);
    }

    // ---- the server's side --------------------------------------------------------------------

    /// Waits for the next request and stores it in `msg` (one sent over the socket may be at
    /// most `maxlength` bytes: DecodeError beyond). check() runs whenever a sleep ends
    /// without one, and throws to give up (the client hung up, the server stops).
    template <class Check>
    void receive(Connection& sock, std::string& msg, std::size_t maxlength, Check check) {
        channel::Header* h = header();
        const std::uint32_t last = seq_;
        seq_ = channel::wait(h->req_seq, h->server_waiting,
                             h->client_cpu.load(std::memory_order_relaxed),
                             [last](std::uint32_t v) { return v != last; }, check);
        const std::uint32_t len = h->req_len.load(std::memory_order_relaxed);
        if (len == channel::kOnSocket) {
            msg = sock.recv_bytes(maxlength);
            return;
        }
        if (len > cap_) throw DecodeError("mp: bad request length in the manager's channel");
        msg.assign(request_buffer(), len);
    }

    /// Answers the request receive() returned.
    void reply(Connection& sock, std::string_view out) {
        channel::Header* h = header();
        const bool big = !stage(h->rep_len, reply_buffer(), out);
        h->server_cpu.store(::sched_getcpu(), std::memory_order_relaxed);
        channel::publish(h->rep_seq, h->client_waiting, seq_);
        if (big) sock.send_bytes(out);
    }

private:
    static Channel map(int fd, std::size_t size) {
        void* p = ::mmap(nullptr, size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
        if (p == MAP_FAILED) sys::throw_system_error(errno, "mmap");
        Channel c;
        c.base_ = static_cast<char*>(p);
        c.size_ = size;
        return c;
    }
    void unmap() noexcept {
        if (base_ != nullptr) ::munmap(base_, size_);
        base_ = nullptr;
    }
    channel::Header* header() const noexcept {
        return std::launder(reinterpret_cast<channel::Header*>(base_));
    }
    char* request_buffer() const noexcept { return base_ + channel::kHeaderBytes; }
    // Puts a message in its buffer with its length, when it fits; else marks it as sent over
    // the socket. Returns whether it fitted.
    bool stage(channel::U32& len, char* buffer, std::string_view message) const noexcept {
        if (message.size() > cap_) {
            len.store(channel::kOnSocket, std::memory_order_relaxed);
            return false;
        }
        std::memcpy(buffer, message.data(), message.size());
        len.store(static_cast<std::uint32_t>(message.size()), std::memory_order_relaxed);
        return true;
    }
    char* reply_buffer() const noexcept { return base_ + channel::kHeaderBytes + cap_; }

    char* base_ = nullptr;
    std::size_t size_ = 0;
    std::uint32_t cap_ = 0;
    /// The last request sequence sent (client) or received (server).
    std::uint32_t seq_ = 0;
};

/// What the server answers a channel request with: a memfd, or nothing (no channel: the client
/// goes on over the socket).
struct ChannelOffer {
    sys::Fd fd;
};

}  // namespace mp::detail::managers

template <>
struct mp::Codec<mp::detail::managers::ChannelOffer> {
    static void encode(Encoder& e, const mp::detail::managers::ChannelOffer& o) {
        e.put(std::uint8_t{0});  // a successful reply, as every other
        e.put(static_cast<std::uint8_t>(o.fd ? 1 : 0));
        if (o.fd) e.put(e.attach_fd(o.fd.get()));
    }
    static mp::detail::managers::ChannelOffer decode(Decoder& d) {
        mp::detail::managers::ChannelOffer o;
        if (d.get<std::uint8_t>() != 0) {
            (void)d.read_view(d.remaining());  // an error reply: no channel
            return o;
        }
        if (d.get<std::uint8_t>() != 0) o.fd.reset(d.take_fd(d.get<std::uint32_t>()));
        return o;
    }
};
