// Tests of mp::Connection, mp::Pipe and mp::connection::wait (include/mp/connection.hpp).
//
// Ports what CPython's _test_multiprocessing checks for Connection (_TestConnection), poll
// (_TestPoll) and wait (TestWait), plus the frame format against a real python3, the error
// cases (closed, read-only/write-only ends, truncated and oversized frames, SIGPIPE) and
// connections passed to Process targets under fork and forkserver. Children report through the
// connections themselves and their exit codes (a target that throws exits with 1). Every wait
// that should end is bounded; nothing asserts on speed, only that a timeout was waited out.

#include <gtest/gtest.h>

#include <fstream>

#include <algorithm>
#include <array>
#include <atomic>
#include <cerrno>
#include <chrono>
#include <csignal>
#include <cstdint>
#include <cstring>
#include <fcntl.h>
#include <limits>
#include <map>
#include <memory>
#include <netinet/in.h>
#include <poll.h>
#include <pthread.h>
#include <random>
#include <set>
#include <span>
#include <stdexcept>
#include <string>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <system_error>
#include <thread>
#include <tuple>
#include <unistd.h>
#include <utility>
#include <vector>

#include "helpers/python.hpp"
#include "helpers/start_methods.hpp"
#include "helpers/timeouts.hpp"
#include "mp/connection.hpp"
#include "mp/process.hpp"
#include "sys/fd.hpp"

using namespace std::chrono_literals;

// A lambda that captures a pipe's ends gets them from `mp::Connection a, b; std::tie(a, b) =
// mp::Pipe();`, not from a structured binding: clang 14 cannot capture a binding (C++20 can).
namespace {

using Clock = std::chrono::steady_clock;

/// The bound on a wait that is expected to succeed.
constexpr auto kLong = 20s;

/// Python's SENTINEL in _TestConnection: an empty message asks the echo child to stop.
const std::string kSentinel;

template <class F>
std::chrono::nanoseconds elapsed(F&& f) {
    auto t0 = Clock::now();
    f();
    return Clock::now() - t0;
}

/// Expects `f` to throw std::system_error(EBADF) whose what() contains `text`.
template <class F>
void expect_bad_fd(F&& f, const std::string& text) {
    try {
        f();
        ADD_FAILURE() << "expected std::system_error(EBADF) containing \"" << text << "\"";
    } catch (const std::system_error& e) {
        EXPECT_EQ(e.code(), std::errc::bad_file_descriptor) << e.what();
        EXPECT_NE(std::string(e.what()).find(text), std::string::npos) << e.what();
    }
}

/// Expects `f` to throw exactly mp::DecodeError naming a bad message length.
template <class F>
void expect_bad_length(F&& f) {
    try {
        f();
        ADD_FAILURE() << "expected mp::DecodeError (bad message length)";
    } catch (const mp::DecodeError& e) {
        EXPECT_NE(std::string(e.what()).find("bad message length"), std::string::npos) << e.what();
    }
}

/// A thread whose exception fails the test instead of terminating the program.
template <class F>
std::thread guarded_thread(F f) {
    return std::thread([f = std::move(f)]() mutable {
        try {
            f();
        } catch (const std::exception& e) {
            ADD_FAILURE() << "thread failed: " << e.what();
        }
    });
}

void join_ok(mp::Process& p) {
    ASSERT_TRUE(p.join(kLong)) << "child did not finish";
    EXPECT_EQ(p.exitcode(), 0);
}

/// A raw frame header as Python writes it (4-byte big-endian length).
std::string header32(std::int32_t n) {
    auto u = static_cast<std::uint32_t>(n);
    std::string h(4, '\0');
    for (int i = 3; i >= 0; --i, u >>= 8) h[static_cast<std::size_t>(i)] = static_cast<char>(u & 0xff);
    return h;
}
/// The long form: -1, then an 8-byte big-endian length.
std::string header64(std::uint64_t n) {
    std::string h = header32(-1) + std::string(8, '\0');
    for (int i = 11; i >= 4; --i, n >>= 8) h[static_cast<std::size_t>(i)] = static_cast<char>(n & 0xff);
    return h;
}

void raw_write(int fd, const std::string& bytes) { mp::sys::write_full(fd, bytes.data(), bytes.size()); }

// ---- children (plain functions, so that they also run under forkserver) ----------------------

/// _TestConnection._echo: echo every message until the empty one.
void echo(mp::Connection conn) {
    for (;;) {
        std::string msg = conn.recv_bytes();
        if (msg == kSentinel) break;
        conn.send_bytes(msg);
    }
    conn.close();
}

/// Echo until end of file.
void echo_until_eof(mp::Connection conn) {
    try {
        for (;;) conn.send_bytes(conn.recv_bytes());
    } catch (const mp::EOFError&) {
    }
}

/// Sends `strings`, one every 100 ms (_TestPoll._child_strings).
void child_strings(mp::Connection conn, std::vector<std::string> strings) {
    for (const auto& s : strings) {
        std::this_thread::sleep_for(100ms);
        conn.send_bytes(s);
    }
    conn.close();
}

/// Sends three messages back to back (_TestPoll._child_dont_merge).
void child_dont_merge(mp::Connection b) {
    b.send_bytes("a");
    b.send_bytes("b");
    b.send_bytes("cd");
}

/// Sends (i, pid) ten times, optionally with random pauses (TestWait._child_test_wait).
void child_test_wait(mp::Connection w, bool slow) {
    std::mt19937 rng(static_cast<unsigned>(::getpid()));
    for (int i = 0; i < 10; ++i) {
        if (slow) std::this_thread::sleep_for(std::chrono::milliseconds(rng() % 100));
        w.send(std::pair<int, int>(i, static_cast<int>(::getpid())));
    }
    w.close();
}

/// Connects to 127.0.0.1:port and writes "0\n".."9\n" (TestWait._child_test_wait_socket).
void child_test_wait_socket(int port, bool slow) {
    std::mt19937 rng(static_cast<unsigned>(::getpid()));
    int s = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (s < 0) throw std::system_error(errno, std::system_category(), "socket");
    sockaddr_in a{};
    a.sin_family = AF_INET;
    a.sin_port = htons(static_cast<std::uint16_t>(port));
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (::connect(s, reinterpret_cast<sockaddr*>(&a), sizeof a) != 0)
        throw std::system_error(errno, std::system_category(), "connect");
    for (int i = 0; i < 10; ++i) {
        if (slow) std::this_thread::sleep_for(std::chrono::milliseconds(rng() % 100));
        std::string line = std::to_string(i) + "\n";
        mp::sys::write_full(s, line.data(), line.size());
    }
    ::close(s);
}

/// Polls the read end for up to 2 s, which must not pull in part of a message
/// (_TestPoll._child_boundaries).
void child_boundaries(mp::Connection r) { (void)r.poll(2s); }

/// Receives one 1-byte message on `in` and answers "got <it>" on `out`.
void answer(mp::Connection in, mp::Connection out) {
    out.send_bytes("got " + in.recv_bytes());
}

/// Sends a std::map through `c` (objects under forkserver).
void send_map(mp::Connection c, int n) {
    std::map<std::string, int> m;
    for (int i = 0; i < n; ++i) m["k" + std::to_string(i)] = i;
    c.send(m);
}

void sleep_for_ms(int ms) { std::this_thread::sleep_for(std::chrono::milliseconds(ms)); }

}  // namespace

// =============================================================================================
// _TestConnection
// =============================================================================================

TEST(Connection, DuplexFalse) {
    mp::Connection reader, writer;
    std::tie(reader, writer) = mp::Pipe(false);
    writer.send(1);
    EXPECT_EQ(reader.recv<int>(), 1);
    EXPECT_TRUE(reader.readable());
    EXPECT_FALSE(reader.writable());
    EXPECT_FALSE(writer.readable());
    EXPECT_TRUE(writer.writable());
    expect_bad_fd([&] { reader.send(2); }, "connection is read-only");
    expect_bad_fd([&] { reader.send_bytes("x"); }, "connection is read-only");
    expect_bad_fd([&] { (void)writer.recv<int>(); }, "connection is write-only");
    expect_bad_fd([&] { (void)writer.recv_bytes(); }, "connection is write-only");
    std::array<char, 4> buf{};
    expect_bad_fd([&] { (void)writer.recv_bytes_into(buf); }, "connection is write-only");
    expect_bad_fd([&] { (void)writer.poll(); }, "connection is write-only");
}

TEST(Connection, SendBytesOffsetAndSize) {
    const std::string msg = "abcdefghijklmnopqrstuvwxyz";
    auto [a, b] = mp::Pipe();
    a.send_bytes(msg);
    EXPECT_EQ(b.recv_bytes(), msg);
    a.send_bytes(msg, 5);
    EXPECT_EQ(b.recv_bytes(), msg.substr(5));
    a.send_bytes(msg, 7, 8);
    EXPECT_EQ(b.recv_bytes(), msg.substr(7, 8));
    a.send_bytes(msg, 26);
    EXPECT_EQ(b.recv_bytes(), "");
    a.send_bytes(msg, 26, 0);
    EXPECT_EQ(b.recv_bytes(), "");
    EXPECT_THROW(a.send_bytes(msg, 27), std::invalid_argument);
    EXPECT_THROW(a.send_bytes(msg, 22, 5), std::invalid_argument);
    EXPECT_THROW(a.send_bytes(msg, 26, 1), std::invalid_argument);
    EXPECT_THROW(a.send_bytes(msg, static_cast<std::size_t>(-1)), std::invalid_argument);
    EXPECT_THROW(a.send_bytes(msg, 4, static_cast<std::size_t>(-1)), std::invalid_argument);
    // Offsets of a typed buffer count bytes, as Python's memoryview cast to 'B'.
    const std::vector<std::uint16_t> words{0x0102, 0x0304, 0x0506};
    a.send_bytes(words, 2, 2);
    std::uint16_t got = 0;
    EXPECT_EQ(b.recv_bytes_into(std::span<std::byte>(reinterpret_cast<std::byte*>(&got), 2)), 2u);
    EXPECT_EQ(got, 0x0304);
    // Nothing else is in flight: every refused call sent nothing.
    EXPECT_FALSE(b.poll());
}

TEST(Connection, RecvBytesIntoOffsets) {
    auto [a, b] = mp::Pipe();
    std::array<char, 8> buf{};
    EXPECT_THROW((void)b.recv_bytes_into(buf, 9), std::invalid_argument);
    a.send_bytes("xyz");
    EXPECT_EQ(b.recv_bytes_into(buf, 5), 3u);
    EXPECT_EQ(std::string(buf.data() + 5, 3), "xyz");
    a.send_bytes("");
    EXPECT_EQ(b.recv_bytes_into(buf, 8), 0u) << "an empty message fits at the end";
    a.send_bytes("abcd");
    EXPECT_THROW((void)b.recv_bytes_into(buf, 5), mp::BufferTooShort);
    // The stream stays in step after BufferTooShort.
    a.send_bytes("next");
    EXPECT_EQ(b.recv_bytes(), "next");
}

TEST(Connection, ContextAndClose) {
    mp::Connection a, b;
    std::tie(a, b) = mp::Pipe();
    a.send(1729);
    EXPECT_EQ(b.recv<int>(), 1729);
    EXPECT_FALSE(a.closed());
    EXPECT_FALSE(b.closed());
    a.close();
    b.close();
    a.close();  // idempotent
    EXPECT_TRUE(a.closed());
    EXPECT_TRUE(b.closed());
    expect_bad_fd([&] { (void)a.recv<int>(); }, "handle is closed");
    expect_bad_fd([&] { (void)b.recv_bytes(); }, "handle is closed");
    expect_bad_fd([&] { a.send(1); }, "handle is closed");
    expect_bad_fd([&] { a.send_bytes("x"); }, "handle is closed");
    std::array<char, 4> buf{};
    expect_bad_fd([&] { (void)a.recv_bytes_into(buf); }, "handle is closed");
    expect_bad_fd([&] { (void)a.poll(); }, "handle is closed");
    expect_bad_fd([&] { (void)a.fileno(); }, "handle is closed");
    // readable/writable describe the end, closed or not (as Python's properties).
    EXPECT_TRUE(a.readable());
    EXPECT_TRUE(a.writable());
}

TEST(Connection, CopiesShareOneDescriptor) {
    auto [a, b] = mp::Pipe();
    mp::Connection a2 = a;
    EXPECT_EQ(a2, a);
    EXPECT_EQ(a2.fileno(), a.fileno());
    a2.send_bytes("via the copy");
    EXPECT_EQ(b.recv_bytes(), "via the copy");
    a2.close();  // closes it for every copy in this process
    EXPECT_TRUE(a.closed());
    EXPECT_THROW(b.recv_bytes(), mp::EOFError);
}

TEST(Connection, LastCopyClosesTheDescriptor) {
    const std::size_t before = [] {
        std::size_t n = 0;
        for (int fd = 0; fd < 1024; ++fd) n += ::fcntl(fd, F_GETFD) != -1;
        return n;
    }();
    int fd_a = -1;
    {
        auto [a, b] = mp::Pipe();
        fd_a = a.fileno();
        { mp::Connection copy = a; }
        EXPECT_NE(::fcntl(fd_a, F_GETFD), -1) << "a copy's destruction leaves the others open";
        b.send_bytes("x");
    }
    EXPECT_EQ(::fcntl(fd_a, F_GETFD), -1);
    std::size_t after = 0;
    for (int fd = 0; fd < 1024; ++fd) after += ::fcntl(fd, F_GETFD) != -1;
    EXPECT_EQ(after, before);
}

TEST(Connection, DefaultConstructedIsClosed) {
    mp::Connection c;
    EXPECT_TRUE(c.closed());
    EXPECT_FALSE(c.readable());
    EXPECT_FALSE(c.writable());
    expect_bad_fd([&] { c.send_bytes("x"); }, "handle is closed");
    expect_bad_fd([&] { (void)c.recv_bytes(); }, "handle is closed");
    c.close();
}

TEST(Connection, ConstructorChecksItsArguments) {
    EXPECT_THROW(mp::Connection(-1), std::invalid_argument);
    auto [r, w] = mp::sys::make_pipe();
    EXPECT_THROW(mp::Connection(r.get(), false, false), std::invalid_argument);
    EXPECT_NE(::fcntl(r.get(), F_GETFD), -1) << "a refused descriptor stays the caller's";
    // A Connection over a plain pipe made elsewhere.
    mp::Connection reader(r.release(), true, false);
    mp::Connection writer(w.release(), false, true);
    writer.send_bytes("pipe");
    EXPECT_EQ(reader.recv_bytes(), "pipe");
}

TEST(Connection, RecvOfTheWrongTypeIsDecodeError) {
    auto [a, b] = mp::Pipe();
    a.send(std::string("not an int"));
    EXPECT_THROW((void)b.recv<int>(), mp::DecodeError);
    a.send_bytes("\x01\x02");
    EXPECT_THROW((void)b.recv<std::vector<int>>(), mp::DecodeError);
    a.send(42);  // still in step
    EXPECT_EQ(b.recv<int>(), 42);
}

// =============================================================================================
// End of file, truncated and malformed frames
// =============================================================================================

TEST(Connection, EofOncePeerClosed) {
    auto [a, b] = mp::Pipe();
    a.send_bytes("last");
    a.close();
    EXPECT_EQ(b.recv_bytes(), "last") << "what was sent before the close still arrives";
    EXPECT_TRUE(b.poll()) << "end of file polls ready";
    EXPECT_THROW(b.recv_bytes(), mp::EOFError);
    EXPECT_THROW(b.recv_bytes(), mp::EOFError) << "and stays so";

    auto [r, w] = mp::Pipe(false);
    w.close();
    EXPECT_THROW((void)r.recv<int>(), mp::EOFError);
}

TEST(Connection, TruncatedFrameIsEof) {
    {  // in the header
        auto [a, b] = mp::Pipe();
        raw_write(a.fileno(), std::string("\0\0", 2));
        a.close();
        try {
            (void)b.recv_bytes();
            ADD_FAILURE() << "expected EOFError";
        } catch (const mp::EOFError& e) {
            EXPECT_NE(std::string(e.what()).find("during message"), std::string::npos) << e.what();
        }
    }
    {  // in the long header
        auto [a, b] = mp::Pipe();
        raw_write(a.fileno(), header32(-1) + std::string("\0\0\0", 3));
        a.close();
        EXPECT_THROW((void)b.recv_bytes(), mp::EOFError);
    }
    {  // in the body
        auto [a, b] = mp::Pipe();
        raw_write(a.fileno(), header32(10) + "short");
        a.close();
        try {
            (void)b.recv_bytes();
            ADD_FAILURE() << "expected EOFError";
        } catch (const mp::EOFError& e) {
            EXPECT_NE(std::string(e.what()).find("during message"), std::string::npos) << e.what();
        }
    }
    {  // a forged huge length followed by nothing: no huge allocation, just end of file
        auto [a, b] = mp::Pipe();
        raw_write(a.fileno(), header64(std::uint64_t{1} << 50) + "a little");
        a.close();
        EXPECT_THROW((void)b.recv_bytes(), mp::EOFError);
    }
}

TEST(Connection, MaxlengthRefusedBeforeTheBody) {
    mp::Connection a, b;
    std::tie(a, b) = mp::Pipe();
    a.send_bytes("0123456789");
    expect_bad_length([&] { (void)b.recv_bytes(9); });
    // (The body may sit in the receive buffer, which a socket fills ahead; nothing was
    // allocated for it: see HugeAnnouncedLengthWithMaxlengthAllocatesNothing.)
    // As in Python: a duplex end stops being readable but may still send.
    EXPECT_FALSE(b.readable());
    EXPECT_TRUE(b.writable());
    expect_bad_fd([&] { (void)b.recv_bytes(); }, "connection is write-only");
    b.send_bytes("still sends");
    EXPECT_EQ(a.recv_bytes(), "still sends");

    // A message of exactly maxlength is fine.
    b.send_bytes("12345");
    EXPECT_EQ(a.recv_bytes(5), "12345");
}

TEST(Connection, MaxlengthLeavesAPipeBodyUnread) {
    // A pipe never reads ahead: after a refused header the body is still in the pipe.
    mp::Connection r, w;
    std::tie(r, w) = mp::Pipe(false);
    const int raw = ::fcntl(r.fileno(), F_DUPFD_CLOEXEC, 0);
    ASSERT_GE(raw, 0);
    w.send_bytes("0123456789");
    expect_bad_length([&] { (void)r.recv_bytes(9); });
    char body[10];
    ASSERT_EQ(mp::sys::read_full(raw, body, 10), 10u);
    EXPECT_EQ(std::string(body, 10), "0123456789");
    ::close(raw);
}

TEST(Connection, MaxlengthOnReadOnlyEndCloses) {
    mp::Connection r, w;
    std::tie(r, w) = mp::Pipe(false);
    w.send_bytes(std::string(100, 'x'));
    expect_bad_length([&] { (void)r.recv_bytes(99); });
    EXPECT_TRUE(r.closed()) << "Python closes a connection that cannot write either";
}

TEST(Connection, HugeAnnouncedLengthWithMaxlengthAllocatesNothing) {
    mp::Connection a, b;
    std::tie(a, b) = mp::Pipe();
    raw_write(a.fileno(), header64(std::uint64_t{1} << 40));  // 1 TiB announced
    expect_bad_length([&] { (void)b.recv_bytes(1 << 20); });
}

/// A "kB" field of /proc/self/status (VmRSS:, VmHWM:).
long self_status_kb(const std::string& field) {
    std::ifstream f("/proc/self/status");
    for (std::string line; std::getline(f, line);)
        if (line.starts_with(field)) return std::stol(line.substr(field.size()));
    return -1;
}

TEST(Connection, AnnouncedLengthAloneReservesLittleMemory) {
    // Issue 12 item 12: a body up to 64 MiB was allocated (and zeroed) as soon as its header
    // came, so a peer's 4-byte header alone cost that much. Memory must follow the bytes sent.
    auto [a, b] = mp::Pipe();
    raw_write(a.fileno(), header32(512 << 20) + std::string(16, 'x'));  // 512 MiB announced
    ASSERT_EQ(::shutdown(a.fileno(), SHUT_WR), 0);
    // "5" restarts VmHWM, the peak resident size, from the current one.
    { std::ofstream("/proc/self/clear_refs") << "5"; }
    const long before = self_status_kb("VmHWM:");
    ASSERT_GT(before, 0);
    EXPECT_THROW((void)b.recv_bytes(), mp::EOFError);
    const long grown = self_status_kb("VmHWM:") - before;
    EXPECT_LT(grown, 8 * 1024) << "kB of peak memory for 16 bytes received";
}

TEST(Connection, MalformedLengths) {
    {
        mp::Connection a, b;
        std::tie(a, b) = mp::Pipe();
        raw_write(a.fileno(), header32(-2) + "xx");
        expect_bad_length([&] { (void)b.recv_bytes(); });
    }
    {
        mp::Connection a, b;
        std::tie(a, b) = mp::Pipe();
        raw_write(a.fileno(), header32(std::numeric_limits<std::int32_t>::min()));
        std::array<char, 8> buf{};
        expect_bad_length([&] { (void)b.recv_bytes_into(buf); });
    }
    {
        mp::Connection a, b;
        std::tie(a, b) = mp::Pipe();
        raw_write(a.fileno(), header64(~std::uint64_t{0}));
        expect_bad_length([&] { (void)b.recv_bytes(); });
    }
}

TEST(Connection, LongHeaderIsAccepted) {
    // Python (and mp) use the long form only above 2^31 - 1 bytes, but a reader must take it
    // for any length.
    auto [a, b] = mp::Pipe();
    raw_write(a.fileno(), header64(5) + "hello" + header32(3) + "abc" + header64(0));
    EXPECT_EQ(b.recv_bytes(), "hello");
    EXPECT_EQ(b.recv_bytes(), "abc");
    EXPECT_EQ(b.recv_bytes(), "");
}

TEST(Connection, FrameLayoutOnTheWire) {
    auto [a, b] = mp::Pipe();
    a.send_bytes("hi");
    a.send_bytes("");
    a.close();
    char raw[16];
    ASSERT_EQ(mp::sys::read_full(b.fileno(), raw, sizeof raw), 10u);
    EXPECT_EQ(std::string(raw, 10), header32(2) + "hi" + header32(0));
}

TEST(Connection, MessageAbove2GiBUsesTheLongHeader) {
    // 2^31 bytes of untouched anonymous memory: every page is the shared zero page, so the
    // message costs no RAM. A thread reads the raw stream and checks the header.
    const std::size_t n = std::size_t{1} << 31;
    void* mem = ::mmap(nullptr, n, PROT_READ, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    ASSERT_NE(mem, MAP_FAILED);
    auto [a, b] = mp::Pipe();
    std::string header;
    std::uint64_t body = 0;
    bool all_zero = true;
    std::thread reader = guarded_thread([&, fd = b.fileno()] {
        char h[12];
        if (mp::sys::read_full(fd, h, 12) != 12) return;
        header.assign(h, 12);
        std::vector<char> buf(1 << 20);
        for (;;) {
            std::size_t got = mp::sys::read_full(fd, buf.data(), buf.size());
            for (std::size_t i = 0; i < got; i += 4096) all_zero = all_zero && buf[i] == 0;
            body += got;
            if (got < buf.size()) return;
        }
    });
    a.send_bytes(std::span<const std::byte>(static_cast<const std::byte*>(mem), n));
    a.close();
    reader.join();
    ::munmap(mem, n);
    EXPECT_EQ(header, header64(n));
    EXPECT_EQ(body, n);
    EXPECT_TRUE(all_zero);
}

// =============================================================================================
// SIGPIPE never kills
// =============================================================================================

TEST(Connection, WriteToPipeWithoutReaderThrowsEpipe) {
    // The test process keeps SIGPIPE's default action (terminate): a raised SIGPIPE would end it.
    struct sigaction old {};
    struct sigaction dfl {};
    dfl.sa_handler = SIG_DFL;
    ::sigaction(SIGPIPE, &dfl, &old);
    sigset_t before;
    ::pthread_sigmask(SIG_SETMASK, nullptr, &before);

    auto [r, w] = mp::Pipe(false);
    r.close();
    try {
        w.send_bytes("nobody listens");
        ADD_FAILURE() << "expected EPIPE";
    } catch (const std::system_error& e) {
        EXPECT_EQ(e.code(), std::errc::broken_pipe) << e.what();
    }
    EXPECT_THROW(w.send(std::vector<int>(100000, 1)), std::system_error);

    sigset_t pending, after;
    ::sigpending(&pending);
    EXPECT_FALSE(sigismember(&pending, SIGPIPE)) << "the SIGPIPE was consumed";
    ::pthread_sigmask(SIG_SETMASK, nullptr, &after);
    EXPECT_EQ(sigismember(&after, SIGPIPE), sigismember(&before, SIGPIPE)) << "mask restored";
    ::sigaction(SIGPIPE, &old, nullptr);
}

TEST(Connection, WriteToSocketWithoutPeerThrows) {
    auto [a, b] = mp::Pipe();
    b.close();
    try {
        a.send_bytes(std::string(1 << 20, 'x'));
        ADD_FAILURE() << "expected EPIPE";
    } catch (const std::system_error& e) {
        EXPECT_TRUE(e.code() == std::errc::broken_pipe ||
                    e.code() == std::errc::connection_reset)
            << e.what();
    }
}

TEST(Connection, PendingSigpipeOfSomeoneElseIsKept) {
    // A SIGPIPE already pending (blocked) before the write is not ours to consume.
    sigset_t pipe_set, old;
    sigemptyset(&pipe_set);
    sigaddset(&pipe_set, SIGPIPE);
    ::pthread_sigmask(SIG_BLOCK, &pipe_set, &old);
    ::pthread_kill(::pthread_self(), SIGPIPE);
    auto [r, w] = mp::Pipe(false);
    r.close();
    EXPECT_THROW(w.send_bytes("x"), std::system_error);
    sigset_t pending;
    ::sigpending(&pending);
    EXPECT_TRUE(sigismember(&pending, SIGPIPE));
    const timespec zero{0, 0};
    EXPECT_EQ(::sigtimedwait(&pipe_set, nullptr, &zero), SIGPIPE);
    ::sigpending(&pending);
    EXPECT_FALSE(sigismember(&pending, SIGPIPE)) << "only one was pending";
    ::pthread_sigmask(SIG_SETMASK, &old, nullptr);
}

// =============================================================================================
// Robustness: interrupted and non-blocking I/O
// =============================================================================================

namespace {
void on_usr1(int) {}
}  // namespace

TEST(Connection, SignalsDoNotBreakBlockingCalls) {
    struct sigaction sa {};
    sa.sa_handler = on_usr1;  // no SA_RESTART: every blocking call sees EINTR
    struct sigaction old {};
    ::sigaction(SIGUSR1, &sa, &old);
    mp::Connection a, b;
    std::tie(a, b) = mp::Pipe();
    const pthread_t main_thread = ::pthread_self();
    std::atomic<bool> stop{false};
    std::thread pest([&] {
        while (!stop) {
            ::pthread_kill(main_thread, SIGUSR1);
            std::this_thread::sleep_for(2ms);
        }
    });
    std::atomic<bool> polled{false};
    std::thread sender = guarded_thread([conn = a, &polled]() mutable {
        while (!polled) std::this_thread::sleep_for(1ms);  // nothing to read while b polls
        std::this_thread::sleep_for(50ms);                  // recv_bytes blocks meanwhile
        conn.send_bytes(std::string(4 << 20, 'q'));
    });
    auto waited = elapsed([&] { EXPECT_FALSE(b.poll(100ms)); });
    polled = true;
    EXPECT_GE(waited, 100ms);
    EXPECT_EQ(b.recv_bytes(), std::string(4 << 20, 'q'));
    stop = true;
    pest.join();
    sender.join();
    ::sigaction(SIGUSR1, &old, nullptr);
}

TEST(Connection, NonBlockingDescriptorStillSendsWholeFrames) {
    auto [sa, sb] = mp::sys::make_socketpair(SOCK_STREAM | SOCK_NONBLOCK);
    mp::Connection a(sa.release());
    mp::Connection b(sb.release());
    const std::string big(3 << 20, 'n');
    std::thread sender = guarded_thread([conn = a, &big]() mutable {
        for (int i = 0; i < 3; ++i) conn.send_bytes(big);
    });
    for (int i = 0; i < 3; ++i) EXPECT_EQ(b.recv_bytes(), big);
    sender.join();
}

// =============================================================================================
// _TestPoll
// =============================================================================================

// =============================================================================================
// The receive buffer: a socket reads ahead
// =============================================================================================

TEST(Connection, ReadAheadQueuedFramesArriveInOrderAndPollSeesTheBuffer) {
    auto [a, b] = mp::Pipe();
    const std::vector<std::string> sent{"one", "", std::string(100000, 'x'), "two", "three"};
    std::thread t = guarded_thread([conn = a, sent]() mutable {
        for (const auto& m : sent) conn.send_bytes(m);
    });
    t.join();  // everything is queued in the socket before the first receive
    EXPECT_EQ(b.recv_bytes(), sent[0]);  // reads ahead: "", the big one's start
    for (std::size_t i = 1; i < sent.size(); ++i) {
        EXPECT_TRUE(b.poll()) << i;
        EXPECT_TRUE(b.poll(0s)) << i;
        // wait() must report it without blocking on the descriptor, with or without a timeout.
        mp::Connection* bp = &b;
        EXPECT_EQ(mp::connection::wait({bp}), std::vector<mp::Connection*>{bp}) << i;
        EXPECT_EQ(mp::connection::wait({mp::connection::Waitable(bp)}, 0s).size(), 1u) << i;
        EXPECT_EQ(b.recv_bytes(), sent[i]) << i;
    }
    EXPECT_FALSE(b.poll());
    mp::Connection* bp = &b;
    EXPECT_TRUE(mp::connection::wait({bp}, 0s).empty());
    a.close();
    EXPECT_THROW((void)b.recv_bytes(), mp::EOFError);
}

TEST(Connection, ReadAheadWaitReportsBufferedAndReadyDescriptorsTogether) {
    auto [a, b] = mp::Pipe();
    auto [c, d] = mp::Pipe();
    a.send_bytes("1");
    a.send_bytes("2");
    EXPECT_EQ(b.recv_bytes(), "1");  // "2" now waits in b's buffer, not in its socket
    c.send_bytes("x");
    mp::Connection* bp = &b;
    mp::Connection* dp = &d;
    EXPECT_EQ(mp::connection::wait({bp, dp}, kLong), (std::vector<mp::Connection*>{bp, dp}));
    EXPECT_EQ(b.recv_bytes(), "2");
    EXPECT_EQ(d.recv_bytes(), "x");
}

TEST(Connection, ReadAheadRecvBytesIntoAndBufferTooShortFromTheBuffer) {
    auto [a, b] = mp::Pipe();
    a.send_bytes("small");
    a.send_bytes("too long for it");
    a.send_bytes("after");
    std::array<char, 8> buf{};
    EXPECT_EQ(b.recv_bytes_into(buf), 5u);
    EXPECT_EQ(std::string(buf.data(), 5), "small");
    try {
        (void)b.recv_bytes_into(buf);
        ADD_FAILURE() << "expected BufferTooShort";
    } catch (const mp::BufferTooShort& e) {
        EXPECT_EQ(e.message(), "too long for it");
    }
    EXPECT_EQ(b.recv_bytes(), "after") << "the stream stayed in step";
}

TEST(Connection, ReadAheadMaxlengthRefusesABufferedFrame) {
    mp::Connection a, b;
    std::tie(a, b) = mp::Pipe();
    a.send_bytes("ok");
    raw_write(a.fileno(), header64(std::uint64_t{1} << 40));  // 1 TiB announced, queued behind
    EXPECT_EQ(b.recv_bytes(1 << 20), "ok");
    EXPECT_TRUE(b.poll());
    expect_bad_length([&] { (void)b.recv_bytes(1 << 20); });
    EXPECT_FALSE(b.readable());
}

TEST(Connection, ReadAheadTruncatedBufferedFrameIsEof) {
    auto [a, b] = mp::Pipe();
    raw_write(a.fileno(), header32(2) + "ok" + header32(10) + "short");
    a.close();
    EXPECT_EQ(b.recv_bytes(), "ok");
    try {
        (void)b.recv_bytes();
        ADD_FAILURE() << "expected EOFError";
    } catch (const mp::EOFError& e) {
        EXPECT_NE(std::string(e.what()).find("during message"), std::string::npos) << e.what();
    }
}

TEST(Connection, ReadAheadDescriptorsStayWithTheirFrames) {
    // Frames with and without descriptors queued back to back: each descriptor reaches the
    // recv<T> of the frame it was sent with, even when an earlier receive read its bytes ahead;
    // the ones recv_bytes skips are closed (the leak check would see them).
    auto [a, b] = mp::Pipe();
    auto [x1, y1] = mp::Pipe();
    auto [x2, y2] = mp::Pipe();
    auto [x3, y3] = mp::Pipe();
    a.send_bytes("plain");
    a.send(y1);
    a.send_bytes("between");
    a.send(y2);
    a.send(y3);  // skipped with recv_bytes below
    a.send(std::string("last"));
    y1.close();
    y2.close();
    y3.close();
    EXPECT_EQ(b.recv_bytes(), "plain");
    mp::Connection z1 = b.recv<mp::Connection>();
    EXPECT_EQ(b.recv_bytes(), "between");
    mp::Connection z2 = b.recv<mp::Connection>();
    EXPECT_EQ(b.recv_bytes().size(), 5u) << "y3 as raw bytes; its descriptor is closed";
    EXPECT_EQ(b.recv<std::string>(), "last");
    z1.send_bytes("via 1");
    z2.send_bytes("via 2");
    EXPECT_EQ(x1.recv_bytes(), "via 1");
    EXPECT_EQ(x2.recv_bytes(), "via 2");
    z1.close();
    z2.close();
    EXPECT_THROW((void)x3.recv_bytes(), mp::EOFError) << "nobody holds y3 any more";
}

TEST(Connection, ReadAheadBufferedBytesTravelWithTheConnection) {
    auto [a, b] = mp::Pipe();
    auto [c, d] = mp::Pipe();
    a.send_bytes("1");
    a.send_bytes("2");
    a.send_bytes("3");
    EXPECT_EQ(b.recv_bytes(), "1");  // "2" and "3" wait in b's buffer
    c.send(b);
    mp::Connection b2 = d.recv<mp::Connection>();
    b.close();
    EXPECT_TRUE(b2.poll());
    EXPECT_EQ(b2.recv_bytes(), "2");
    a.send_bytes("4");
    EXPECT_EQ(b2.recv_bytes(), "3");
    EXPECT_EQ(b2.recv_bytes(), "4");

    // To a child of each start method: ConnectionPassed.ReadAheadChildTakesOverTheBufferedFrames.

    // Descriptors waiting for frames read ahead cannot follow: an error, not a silent loss.
    auto [s1, r1] = mp::Pipe();
    auto [x, y] = mp::Pipe();
    s1.send_bytes("7");
    s1.send(y);
    y.close();
    EXPECT_EQ(r1.recv_bytes(), "7");  // y's frame and its descriptor came along
    try {
        c.send(r1);
        ADD_FAILURE() << "expected mp::Error";
    } catch (const mp::Error& err) {
        EXPECT_NE(std::string(err.what()).find("descriptors"), std::string::npos) << err.what();
    }
    EXPECT_FALSE(d.poll()) << "nothing was sent";
    mp::Connection y2 = r1.recv<mp::Connection>();
    y2.send_bytes("via y");
    EXPECT_EQ(x.recv_bytes(), "via y");
}

// The tests of PollAcross and WaitAcross read what children of each start method write.
class PollAcross : public mp::test::StartMethodTest {};
MP_INSTANTIATE_START_METHODS(PollAcross);
class WaitAcross : public mp::test::StartMethodTest {};
MP_INSTANTIATE_START_METHODS(WaitAcross);

TEST(Poll, EmptyString) {
    auto [a, b] = mp::Pipe();
    EXPECT_FALSE(a.poll());
    b.send_bytes("");
    EXPECT_TRUE(a.poll());
    EXPECT_TRUE(a.poll());
    EXPECT_EQ(a.recv_bytes(), "");
    EXPECT_FALSE(a.poll());
}

TEST_P(PollAcross, Strings) {
    const std::vector<std::string> strings{"hello", "", "a", "b", "", "bye", "", "lop"};
    auto [a, b] = mp::Pipe();
    mp::Process p(options(), child_strings, b, strings);
    p.start();
    b.close();
    for (const auto& s : strings) {
        for (int i = 0; i < 2000; ++i)
            if (a.poll(10ms)) break;
        EXPECT_EQ(a.recv_bytes(), s);
    }
    join_ok(p);
}

TEST_P(PollAcross, Boundaries) {
    // A poll in another process must not pull in part of a message.
    auto [r, w] = mp::Pipe(false);
    mp::Process p(options(), child_boundaries, r);
    p.start();
    std::this_thread::sleep_for(500ms);
    const std::set<std::string> sent{"first", "second"};
    for (const auto& m : sent) w.send_bytes(m);
    w.close();
    join_ok(p);
    EXPECT_TRUE(sent.count(r.recv_bytes()));
}

TEST_P(PollAcross, DontMerge) {
    auto [a, b] = mp::Pipe();
    EXPECT_FALSE(a.poll(0s));
    EXPECT_FALSE(a.poll(100ms));
    mp::Process p(options(), child_dont_merge, b);
    p.start();
    EXPECT_EQ(a.recv_bytes(), "a");
    EXPECT_TRUE(a.poll(kLong));
    EXPECT_TRUE(a.poll(kLong));
    EXPECT_EQ(a.recv_bytes(), "b");
    EXPECT_TRUE(a.poll(kLong));
    EXPECT_TRUE(a.poll(kLong));
    EXPECT_TRUE(a.poll(0s));
    EXPECT_EQ(a.recv_bytes(), "cd");
    join_ok(p);
}

TEST(Poll, ForeverWaitsForTheMessage) {
    auto [a, b] = mp::Pipe();
    std::thread t = guarded_thread([conn = b]() mutable {
        std::this_thread::sleep_for(100ms);
        conn.send_bytes("late");
    });
    EXPECT_TRUE(a.poll(std::nullopt));
    EXPECT_EQ(a.recv_bytes(), "late");
    t.join();
}

// =============================================================================================
// TestWait
// =============================================================================================

namespace {

void check_wait(mp::StartMethod method, bool slow) {
    std::vector<mp::Connection> readers;
    std::vector<std::unique_ptr<mp::Process>> procs;
    for (int i = 0; i < 4; ++i) {
        auto [r, w] = mp::Pipe(false);
        procs.push_back(std::make_unique<mp::Process>(
            mp::ProcessOptions{.daemon = true, .start_method = method}, child_test_wait, w, slow));
        procs.back()->start();
        w.close();
        readers.push_back(r);
    }
    std::vector<mp::Connection*> live;
    for (auto& r : readers) live.push_back(&r);
    std::vector<std::pair<int, int>> messages;
    while (!live.empty()) {
        for (mp::Connection* r : mp::connection::wait(live, kLong)) {
            try {
                messages.push_back(r->recv<std::pair<int, int>>());
            } catch (const mp::EOFError&) {
                std::erase(live, r);
                r->close();
            }
        }
    }
    std::vector<std::pair<int, int>> expected;
    for (auto& p : procs)
        for (int i = 0; i < 10; ++i) expected.emplace_back(i, static_cast<int>(p->pid()));
    std::sort(messages.begin(), messages.end());
    std::sort(expected.begin(), expected.end());
    EXPECT_EQ(messages, expected);
    for (auto& p : procs) join_ok(*p);
}

void check_wait_socket(mp::StartMethod method, bool slow) {
    int l = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    ASSERT_GE(l, 0);
    mp::sys::Fd listener(l);
    sockaddr_in addr{};
    addr.sin_family = AF_INET;
    addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    ASSERT_EQ(::bind(l, reinterpret_cast<sockaddr*>(&addr), sizeof addr), 0);
    ASSERT_EQ(::listen(l, 8), 0);
    socklen_t len = sizeof addr;
    ASSERT_EQ(::getsockname(l, reinterpret_cast<sockaddr*>(&addr), &len), 0);
    const int port = ntohs(addr.sin_port);

    std::vector<std::unique_ptr<mp::Process>> procs;
    for (int i = 0; i < 4; ++i) {
        procs.push_back(std::make_unique<mp::Process>(
            mp::ProcessOptions{.daemon = true, .start_method = method}, child_test_wait_socket,
            port, slow));
        procs.back()->start();
    }
    std::vector<mp::sys::Fd> socks;
    std::vector<int> readers;
    for (int i = 0; i < 4; ++i) {
        ASSERT_TRUE(mp::sys::wait_fd(l, POLLIN, kLong));
        socks.emplace_back(::accept4(l, nullptr, nullptr, SOCK_CLOEXEC));
        ASSERT_TRUE(socks.back());
        readers.push_back(socks.back().get());
    }
    listener.reset();
    std::map<int, std::string> got;
    while (!readers.empty()) {
        for (int r : mp::connection::wait(readers, kLong)) {
            char buf[32];
            ssize_t n = ::read(r, buf, sizeof buf);
            ASSERT_GE(n, 0);
            if (n == 0)
                std::erase(readers, r);
            else
                got[r].append(buf, static_cast<std::size_t>(n));
        }
    }
    std::string expected;
    for (int i = 0; i < 10; ++i) expected += std::to_string(i) + "\n";
    ASSERT_EQ(got.size(), 4u);
    for (auto& [fd, text] : got) EXPECT_EQ(text, expected);
    for (auto& p : procs) join_ok(*p);
}

}  // namespace

TEST_P(WaitAcross, Connections) { check_wait(method(), false); }
TEST_P(WaitAcross, ConnectionsSlow) { check_wait(method(), true); }
TEST_P(WaitAcross, Sockets) { check_wait_socket(method(), false); }
TEST_P(WaitAcross, SocketsSlow) { check_wait_socket(method(), true); }

TEST(Wait, Timeout) {
    mp::Connection a, b;
    std::tie(a, b) = mp::Pipe();
    std::vector<mp::Connection*> res;
    auto waited = elapsed([&] { res = mp::connection::wait({&a, &b}, 500ms); });
    EXPECT_TRUE(res.empty());
    EXPECT_GE(waited, 500ms);
    b.send(0);
    res = mp::connection::wait({&a, &b}, kLong);
    ASSERT_EQ(res.size(), 1u);
    EXPECT_EQ(res[0], &a);
}

TEST_P(WaitAcross, ProcessSentinelAmongConnections) {
    auto [a, b] = mp::Pipe();
    mp::Process p(options(), sleep_for_ms, 300);
    p.start();
    using W = mp::connection::Waitable;
    auto res = mp::connection::wait({&a, p.sentinel(), &b}, kLong);
    ASSERT_EQ(res.size(), 1u);
    EXPECT_EQ(res[0], W(p.sentinel()));

    a.send(0);
    res = mp::connection::wait({&a, p.sentinel(), &b}, kLong);
    EXPECT_EQ(res, (std::vector<W>{p.sentinel(), &b}));
    b.send(0);
    res = mp::connection::wait({&a, p.sentinel(), &b}, kLong);
    EXPECT_EQ(res, (std::vector<W>{&a, p.sentinel(), &b}));
    join_ok(p);
}

TEST(Wait, RawDescriptors) {
    auto [r, w] = mp::sys::make_pipe();
    EXPECT_TRUE(mp::connection::wait({r.get()}, 0s).empty());
    ASSERT_EQ(::write(w.get(), "x", 1), 1);
    EXPECT_EQ(mp::connection::wait({r.get()}, kLong), std::vector<int>{r.get()});
}

TEST(Wait, NegativeTimeout) {
    mp::Connection a, b;
    std::tie(a, b) = mp::Pipe();
    std::vector<mp::Connection*> res;
    auto waited = elapsed([&] { res = mp::connection::wait({&a}, -1s); });
    EXPECT_TRUE(res.empty());
    EXPECT_LT(waited, 5s);
}

TEST(Wait, EmptyListAndHugeTimeouts) {
    EXPECT_THROW((void)mp::connection::wait(std::vector<mp::Connection*>{}), std::invalid_argument);
    auto waited = elapsed([] {
        EXPECT_TRUE(mp::connection::wait(std::vector<int>{}, 100ms).empty());
    });
    EXPECT_GE(waited, 100ms);
    // A timeout too long for the clock means no limit, not an overflow into the past.
    auto [a, b] = mp::Pipe();
    b.send_bytes("x");
    EXPECT_TRUE(a.poll(std::chrono::nanoseconds::max()));
    EXPECT_EQ(mp::connection::wait({&a}, std::chrono::nanoseconds::max()),
              std::vector<mp::Connection*>{&a});
}

TEST(Wait, HangupCountsAsReady) {
    auto [a, b] = mp::Pipe();
    b.close();
    EXPECT_EQ(mp::connection::wait({&a}, kLong), std::vector<mp::Connection*>{&a});
    EXPECT_THROW(a.recv_bytes(), mp::EOFError);
}

TEST(Wait, ClosedConnectionOrBadDescriptorThrows) {
    mp::Connection a, b;
    std::tie(a, b) = mp::Pipe();
    a.close();
    expect_bad_fd([&] { (void)mp::connection::wait({&a, &b}, 0s); }, "handle is closed");
    int dead;
    {
        auto [r, w] = mp::sys::make_pipe();
        dead = r.get();
    }
    expect_bad_fd([&] { (void)mp::connection::wait({dead}, 0s); }, "not open");
}

// ppoll skips a negative descriptor: without a check, wait({-1}) would sleep for ever and
// wait({-1}, 0s) report nothing ready, where the header promises EBADF.
TEST(Wait, NegativeDescriptorThrowsBeforeWaiting) {
    mp::Connection a, b;  // not a structured binding: the lambdas below capture `a` (clang 14)
    std::tie(a, b) = mp::Pipe();
    b.send_bytes("ready");
    expect_bad_fd([&] { (void)mp::connection::wait({-1}, 0s); }, "not open");
    expect_bad_fd([&] { (void)mp::connection::wait({a.fileno(), -1}, 0s); }, "not open");
    expect_bad_fd([&] { (void)mp::connection::wait({mp::connection::Waitable(&a), -5}, 1s); },
                  "not open");
    // No timeout: in a child, so that a wait that never returns is bounded by the join.
    mp::Process p({.start_method = mp::StartMethod::fork}, [] {
        try {
            (void)mp::connection::wait({-1});
        } catch (const std::system_error& e) {
            std::_Exit(e.code() == std::errc::bad_file_descriptor ? 0 : 3);
        }
        std::_Exit(2);
    });
    p.start();
    if (!p.join(kLong)) {
        p.kill();
        p.join();
        ADD_FAILURE() << "wait({-1}) without a timeout did not return";
    }
    EXPECT_EQ(p.exitcode(), 0);
}

// =============================================================================================
// Passing connections to a Process, under every start method
// =============================================================================================

// A fork child inherits the ends; forkserver and spawn children get them as descriptors with
// the task.
class ConnectionPassed : public mp::test::StartMethodTest {};
MP_INSTANTIATE_START_METHODS(ConnectionPassed);

TEST_P(ConnectionPassed, OneGiBRoundTripThroughChild) {
    const std::size_t n = std::size_t{1} << 30;
    std::string big(n, '\0');
    for (std::size_t i = 0; i < n / 8; ++i) {
        const std::uint64_t v = i * 0x9e3779b97f4a7c15ull;
        std::memcpy(big.data() + i * 8, &v, 8);
    }
    auto [a, b] = mp::Pipe();
    mp::Process p(options(), echo, b);
    p.start();
    b.close();
    std::string back;
    // The child echoes while we are still sending, so send from a thread.
    std::thread sender = guarded_thread([&, conn = a]() mutable { conn.send_bytes(big); });
    back = a.recv_bytes();
    sender.join();
    a.send_bytes(kSentinel);
    join_ok(p);
    ASSERT_EQ(back.size(), n);
    EXPECT_TRUE(back == big);
}

TEST_P(ConnectionPassed, EchoThroughChild) {
    mp::Connection conn, child_conn;
    std::tie(conn, child_conn) = mp::Pipe();
    mp::Process p(options(), echo, child_conn);
    p.start();

    EXPECT_GE(conn.fileno(), 0);

    // send / recv of objects
    const std::vector<double> seq{1, 2.25, -0.5};
    conn.send(seq);
    EXPECT_EQ(conn.recv<std::vector<double>>(), seq);
    conn.send(std::tuple<int, std::string, std::optional<int>>(1, "two", std::nullopt));
    EXPECT_EQ((conn.recv<std::tuple<int, std::string, std::optional<int>>>()),
              (std::tuple<int, std::string, std::optional<int>>(1, "two", std::nullopt)));

    const std::string msg = "hello world";
    const std::string longmsg = [&] {
        std::string s;
        for (int i = 0; i < 10; ++i) s += msg;
        return s;
    }();
    conn.send_bytes(msg);
    EXPECT_EQ(conn.recv_bytes(), msg);

    // recv_bytes_into an array of ints, at offset 0 and at a byte offset
    const std::array<int, 4> arr{0, 1, 2, 3};
    {
        std::array<int, 10> buffer{};
        conn.send_bytes(arr);
        EXPECT_EQ(conn.recv_bytes_into(buffer), arr.size() * sizeof(int));
        EXPECT_EQ(buffer, (std::array<int, 10>{0, 1, 2, 3, 0, 0, 0, 0, 0, 0}));
    }
    {
        std::vector<int> buffer(10, 0);
        conn.send_bytes(arr);
        EXPECT_EQ(conn.recv_bytes_into(buffer, 3 * sizeof(int)), arr.size() * sizeof(int));
        EXPECT_EQ(buffer, (std::vector<int>{0, 0, 0, 0, 1, 2, 3, 0, 0, 0}));
    }
    {
        std::string buffer(40, ' ');
        conn.send_bytes(longmsg);
        try {
            (void)conn.recv_bytes_into(buffer);
            ADD_FAILURE() << "expected BufferTooShort";
        } catch (const mp::BufferTooShort& e) {
            EXPECT_EQ(e.message(), longmsg);
        }
        EXPECT_EQ(buffer, std::string(40, ' ')) << "nothing is written when it does not fit";
    }

    // poll: nothing there yet
    EXPECT_FALSE(conn.poll());
    EXPECT_FALSE(conn.poll(-1s));
    auto waited = elapsed([&] { EXPECT_FALSE(conn.poll(200ms)); });
    EXPECT_GE(waited, 200ms);

    conn.send(0);
    EXPECT_TRUE(conn.poll(kLong));  // the child's echo
    EXPECT_EQ(conn.recv<int>(), 0);

    const std::string really_big_msg(16 << 20, 'X');  // 16 MiB
    conn.send_bytes(really_big_msg);
    EXPECT_EQ(conn.recv_bytes(), really_big_msg);

    conn.send_bytes(kSentinel);  // tell the child to quit
    child_conn.close();

    EXPECT_TRUE(conn.readable());
    EXPECT_TRUE(conn.writable());
    EXPECT_THROW(conn.recv<int>(), mp::EOFError);
    EXPECT_THROW(conn.recv_bytes(), mp::EOFError);
    join_ok(p);
}



TEST_P(ConnectionPassed, ManySizesBothDirections) {
    mp::Connection a, b;
    std::tie(a, b) = mp::Pipe();
    // A fork child inherits the parent's end too (and the others are given it here): it closes
    // that copy, or it would never see end of file.
    mp::Process p(
        options(),
        [](mp::Connection parents_end, mp::Connection end) {
            parents_end.close();
            echo_until_eof(end);
        },
        a, b);
    p.start();
    b.close();
    for (std::size_t n : {0ul, 1ul, 3ul, 16383ul, 16384ul, 16385ul, 65536ul, 200000ul,
                          (1ul << 20) + 7}) {
        std::string m(n, '\0');
        for (std::size_t i = 0; i < n; ++i) m[i] = static_cast<char>(i * 31 + n);
        a.send_bytes(m);
        EXPECT_EQ(a.recv_bytes(), m) << "size " << n;
    }
    a.close();
    join_ok(p);
}

TEST_P(ConnectionPassed, ReadAheadChildTakesOverTheBufferedFrames) {
    auto [a, b] = mp::Pipe();
    a.send_bytes("first");
    a.send_bytes("second");
    a.send_bytes("third");
    EXPECT_EQ(b.recv_bytes(), "first");  // the rest is read ahead into b's buffer
    mp::Process p(options(), +[](mp::Connection c) {
        if (c.recv_bytes() != "second" || c.recv_bytes() != "third")
            throw std::runtime_error("lost");
        c.send_bytes("done");
    }, b);
    p.start();
    b.close();
    EXPECT_EQ(a.recv_bytes(), "done");
    join_ok(p);
}

TEST_P(ConnectionPassed, ConnectionsTravelOverADuplexConnection) {
    // A child that already runs receives a Connection made after it started, as Python's
    // _TestPicklingConnections does with its reduction machinery.
    auto [ctl, ctl_child] = mp::Pipe();
    mp::Process p(options(), +[](mp::Connection c) {
        auto [reply, count] = c.recv<std::pair<mp::Connection, int>>();
        for (int i = 0; i < count; ++i) reply.send(i);
        reply.close();  // the parent reads until end of file
        auto many = c.recv<std::vector<mp::Connection>>();
        for (auto& m : many) m.send_bytes("to each");
    }, ctl_child);
    p.start();
    ctl_child.close();

    {
        auto [r, w] = mp::Pipe(false);  // a pipe end may travel; it is the carrier that must be a socket
        ctl.send(std::pair<mp::Connection, int>(w, 3));
        w.close();
        for (int i = 0; i < 3; ++i) EXPECT_EQ(r.recv<int>(), i);
        EXPECT_THROW(r.recv<int>(), mp::EOFError) << "the child's copy closed when it was done";
    }
    std::vector<mp::Connection> ours, theirs;
    for (int i = 0; i < 5; ++i) {
        auto [a, b] = mp::Pipe();
        ours.push_back(a);
        theirs.push_back(b);
    }
    ctl.send(theirs);
    for (auto& t : theirs) t.close();
    for (auto& o : ours) EXPECT_EQ(o.recv_bytes(), "to each");
    join_ok(p);
}

TEST_P(ConnectionPassed, EchoesBytesAndObjects) {
    // The parent may close its copy at once after start: the child has its own (Python's
    // test_spawn_close).
    auto [conn, child_conn] = mp::Pipe();
    mp::Process p(options(), echo, child_conn);
    p.start();
    child_conn.close();
    conn.send_bytes("through the forkserver");
    EXPECT_EQ(conn.recv_bytes(), "through the forkserver");
    conn.send(std::vector<int>{1, 2, 3});
    EXPECT_EQ(conn.recv<std::vector<int>>(), (std::vector<int>{1, 2, 3}));
    conn.send_bytes(kSentinel);
    join_ok(p);
}

TEST_P(ConnectionPassed, OneWayEndsKeepTheirSides) {
    auto [in_r, in_w] = mp::Pipe(false);
    auto [out_r, out_w] = mp::Pipe(false);
    mp::Process p(options(), answer, in_r, out_w);
    p.start();
    in_r.close();
    out_w.close();
    in_w.send_bytes("x");
    EXPECT_EQ(out_r.recv_bytes(), "got x");
    join_ok(p);
    EXPECT_THROW(out_r.recv_bytes(), mp::EOFError) << "the child's copy is gone with it";
}

TEST_P(ConnectionPassed, ObjectsFromTheChild) {
    auto [r, w] = mp::Pipe(false);
    mp::Process p(options(), send_map, w, 1000);
    p.start();
    w.close();
    auto m = r.recv<std::map<std::string, int>>();
    EXPECT_EQ(m.size(), 1000u);
    EXPECT_EQ(m["k999"], 999);
    join_ok(p);
}

// Fork only by nature: a capturing lambda runs only in a copy of the parent.
TEST(Connection, ForkChildWithCapturingLambda) {
    mp::Connection a, b;
    std::tie(a, b) = mp::Pipe();
    mp::Process p([b]() mutable { b.send_bytes("captured " + b.recv_bytes()); });
    p.start();
    b.close();
    a.send_bytes("hi");
    EXPECT_EQ(a.recv_bytes(), "captured hi");
    join_ok(p);
}

TEST(Connection, CodecCarriesTheDescriptor) {
    auto [a, b] = mp::Pipe(false);
    mp::Encoder e;
    e.put(b);
    ASSERT_EQ(e.fds().size(), 1u);
    EXPECT_EQ(e.fds()[0], b.fileno()) << "borrowed, not duplicated";
    std::string bytes = e.take();
    std::vector<int> fds{::fcntl(b.fileno(), F_DUPFD_CLOEXEC, 0)};  // what SCM_RIGHTS would give
    mp::Decoder d(bytes, fds);
    mp::Connection c = d.get<mp::Connection>();
    d.finish();
    EXPECT_EQ(fds[0], -1) << "taken";
    EXPECT_FALSE(c.readable());
    EXPECT_TRUE(c.writable());
    EXPECT_NE(c.fileno(), b.fileno());
    c.send_bytes("via the decoded copy");
    EXPECT_EQ(a.recv_bytes(), "via the decoded copy");

    // A closed connection arrives closed and attaches nothing.
    mp::Encoder e2;
    e2.put(mp::Connection());
    EXPECT_TRUE(e2.fds().empty());
    EXPECT_TRUE(mp::decode<mp::Connection>(e2.take()).closed());

    // No descriptor arrived with the bytes: DecodeError, not a crash.
    mp::Encoder e3;
    e3.put(a);
    EXPECT_THROW((void)mp::decode<mp::Connection>(e3.take()), mp::DecodeError);
    // A forged flags byte.
    EXPECT_THROW((void)mp::decode<mp::Connection>(std::string("\x07\0\0\0\0", 5)), mp::DecodeError);
}

TEST(Connection, DescriptorsNeedASocketCarrier) {
    auto [r, w] = mp::Pipe(false);
    auto [a, b] = mp::Pipe();
    try {
        w.send(a);
        ADD_FAILURE() << "expected mp::Error";
    } catch (const mp::Error& e) {
        EXPECT_NE(std::string(e.what()).find("duplex"), std::string::npos) << e.what();
    }
    EXPECT_FALSE(r.poll()) << "nothing was sent";
}

// A TCP socket takes SCM_RIGHTS without complaint and drops the descriptors: the receiver
// would get "file descriptor #0 did not arrive". The send is refused with nothing sent, also on a
// Connection made from the bare TCP descriptor (whose family is not known in advance).
TEST(Connection, DescriptorsDoNotTravelOverTcp) {
    mp::Listener l(mp::Address("127.0.0.1", 0));
    mp::Connection c = mp::Client(l.address());
    mp::Connection s = l.accept();
    mp::Connection bare(::fcntl(c.fileno(), F_DUPFD_CLOEXEC, 0));
    auto [a, b] = mp::Pipe();
    for (mp::Connection* sender : {&c, &bare}) {
        try {
            sender->send(a);
            ADD_FAILURE() << "a Connection sent over TCP did not throw";
        } catch (const mp::Error& e) {
            EXPECT_NE(std::string(e.what()).find("not TCP"), std::string::npos) << e.what();
        }
        EXPECT_FALSE(s.poll(0s)) << "nothing was sent";
        sender->send(std::string("next"));
        EXPECT_EQ(s.recv<std::string>(), "next") << "the next message arrives intact";
    }
}

TEST(Connection, DescriptorsAreDroppedByARawReader) {
    // recv_bytes (and Python) read the frame's bytes; the kernel closes the descriptors that
    // came with them, so nothing leaks (the leak check would see it).
    auto [a, b] = mp::Pipe();
    auto [x, y] = mp::Pipe();
    a.send(x);
    a.send(std::string("after"));
    std::string raw = b.recv_bytes();
    EXPECT_EQ(raw.size(), 5u) << "flags byte and descriptor index";
    EXPECT_EQ(b.recv<std::string>(), "after");
    // A Connection sent without its descriptor cannot be decoded.
    EXPECT_THROW((void)mp::decode<mp::Connection>(raw), mp::DecodeError);
    // And recv<T> of a frame that carried descriptors nobody asked for closes them.
    a.send(std::pair<int, mp::Connection>(7, x));
    b.send_bytes("unused");  // unrelated traffic the other way
    EXPECT_THROW((void)b.recv<int>(), mp::DecodeError) << "trailing bytes: not an int";
    EXPECT_EQ(a.recv_bytes(), "unused");
}

// =============================================================================================
// Wire compatibility with CPython's multiprocessing.connection
// =============================================================================================

namespace {

// The Python side: first sends three messages of its own (one above 16 KiB, which Python writes
// as header and body separately, and an empty one), then echoes every message reversed until
// end of file, then says how many it echoed and exits.
constexpr const char* kPythonPeer = R"PY(
import sys
from multiprocessing.connection import Connection
c = Connection(int(sys.argv[1]))
c.send_bytes(b"from python")
c.send_bytes(bytes(range(256)) * 100)
c.send_bytes(b"")
n = 0
while True:
    try:
        m = c.recv_bytes()
    except EOFError:
        break
    c.send_bytes(m[::-1])
    n += 1
sys.stderr.write("echoed %d\n" % n)
)PY";

}  // namespace

TEST(Connection, WireCompatibleWithPython) {
    auto [ours, theirs] = mp::Pipe();
    const pid_t pid = mp::test::start_python(kPythonPeer, {std::to_string(theirs.fileno())}, -1, false, theirs.fileno());
    ASSERT_GE(pid, 0);
    theirs.close();
    mp::test::KilledOnExit child(pid);

    EXPECT_EQ(ours.recv_bytes(), "from python");
    std::string expected;
    for (int r = 0; r < 100; ++r)
        for (int i = 0; i < 256; ++i) expected += static_cast<char>(i);
    EXPECT_EQ(ours.recv_bytes(), expected);
    EXPECT_EQ(ours.recv_bytes(), "");

    int echoed = 0;
    for (std::size_t n : {0ul, 1ul, 16384ul, 16385ul, 100000ul, 3ul << 20}) {
        std::string m(n, '\0');
        for (std::size_t i = 0; i < n; ++i) m[i] = static_cast<char>((i * 7) ^ (i >> 8));
        ours.send_bytes(m);
        EXPECT_EQ(ours.recv_bytes(), std::string(m.rbegin(), m.rend())) << "size " << n;
        ++echoed;
    }
    // The long header form, as mp writes it above 2^31 - 1 bytes, is read by Python too.
    raw_write(ours.fileno(), header64(6) + "python");
    EXPECT_EQ(ours.recv_bytes(), "nohtyp");
    ++echoed;
    ours.close();

    const int status = child.wait();
    ASSERT_TRUE(WIFEXITED(status));
    EXPECT_EQ(WEXITSTATUS(status), 0) << "python3 failed (127: not found)";
}

// =============================================================================================
// Timeout values (issue 12 item 5): "for ever" durations of every type wait for the message,
// zero and negative ones only look.
// =============================================================================================

TEST(TimeoutValues, ConnectionPollAndWait) {
    mp::test::for_each_forever([&](auto forever) {
        auto [a, b] = mp::Pipe();
        std::thread t = guarded_thread([conn = b]() mutable {
            std::this_thread::sleep_for(30ms);
            conn.send_bytes("late");
            std::this_thread::sleep_for(30ms);
            conn.send_bytes("later");
        });
        EXPECT_TRUE(a.poll(forever));
        EXPECT_EQ(a.recv_bytes(), "late");
        EXPECT_EQ(mp::connection::wait({&a}, forever), std::vector<mp::Connection*>{&a});
        EXPECT_EQ(a.recv_bytes(), "later");
        t.join();

        auto [r, w] = mp::sys::make_pipe();
        std::thread u = guarded_thread([fd = w.get()] {
            std::this_thread::sleep_for(30ms);
            EXPECT_EQ(::write(fd, "x", 1), 1);
        });
        EXPECT_EQ(mp::connection::wait({r.get()}, forever), std::vector<int>{r.get()});
        u.join();
    });
    mp::test::for_each_no_wait([&](auto t) {
        auto [a, b] = mp::Pipe();
        EXPECT_FALSE(a.poll(t));
        EXPECT_TRUE(mp::connection::wait({&a}, t).empty());
        auto [r, w] = mp::sys::make_pipe();
        EXPECT_TRUE(mp::connection::wait({r.get()}, t).empty());
        EXPECT_TRUE(mp::connection::wait(std::vector<int>{}, t).empty());
        b.send_bytes("now");
        EXPECT_TRUE(a.poll(t));
        EXPECT_EQ(mp::connection::wait({&a}, t), std::vector<mp::Connection*>{&a});
    });
}

// =============================================================================================
// Misuse (issue 12 item 6): a Connection or Listener that is default-constructed or moved from
// is a closed handle: std::system_error EBADF ("handle is closed", Python's OSError), never a
// crash.
// =============================================================================================

TEST(Misuse, EmptyConnectionAndListenerThrowBadFileDescriptor) {
    auto expect_ebadf = [](auto&& use) {
        try {
            use();
            ADD_FAILURE() << "no exception";
        } catch (const std::system_error& e) {
            EXPECT_EQ(e.code(), std::errc::bad_file_descriptor) << e.what();
        }
    };
    auto [a, b] = mp::Pipe();
    mp::Connection moved = std::move(a);
    for (mp::Connection* c : {&a, static_cast<mp::Connection*>(nullptr)}) {
        mp::Connection empty;
        mp::Connection& x = c != nullptr ? *c : empty;
        EXPECT_TRUE(x.closed());
        expect_ebadf([&] { x.send_bytes("x"); });
        expect_ebadf([&] { (void)x.recv_bytes(); });
        expect_ebadf([&] { x.send(1); });
        expect_ebadf([&] { (void)x.recv<int>(); });
        expect_ebadf([&] { (void)x.poll(); });
        expect_ebadf([&] { (void)x.fileno(); });
        expect_ebadf([&] { (void)mp::connection::wait({&x}, 0s); });
        EXPECT_NO_THROW(x.close());
    }
    moved.send_bytes("still works");
    EXPECT_EQ(b.recv_bytes(), "still works");

    mp::Listener l;
    mp::Listener l2 = std::move(l);
    EXPECT_TRUE(l.closed());  // NOLINT(bugprone-use-after-move)
    expect_ebadf([&] { (void)l.accept(); });
    expect_ebadf([&] { (void)l.fileno(); });
    EXPECT_NO_THROW(l.close());
    EXPECT_FALSE(l2.closed());
}

// ---- send_handle / recv_handle (Python's multiprocessing.reduction) ---------------------------

namespace {

/// _TestConnection._writefd: receive a descriptor and write `data` into it. With
/// `create_dummy_fds`, every descriptor below 256 is taken first, so the one received is large.
void writefd(mp::Connection conn, std::string data, bool create_dummy_fds) {
    if (create_dummy_fds)
        for (int i = 0; i < 256; ++i)
            if (::fcntl(i, F_GETFD) == -1) ::dup2(conn.fileno(), i);
    const int fd = mp::recv_handle(conn);
    mp::sys::write_full(fd, data.data(), data.size());
    ::close(fd);
}

/// A file with no name (a memfd), and what was written into it.
struct MemFile {
    mp::sys::Fd fd{::memfd_create("mp-send-handle-test", MFD_CLOEXEC)};
    std::string contents() const {
        char buf[64];
        const ssize_t n = ::pread(fd.get(), buf, sizeof buf, 0);
        return n < 0 ? std::string("<pread failed>") : std::string(buf, static_cast<std::size_t>(n));
    }
};

void fd_transfer(const mp::ProcessOptions& options, bool large) {
    auto [conn, child_conn] = mp::Pipe(true);
    mp::Process p(options, writefd, child_conn, std::string(large ? "bar" : "foo"), large);
    p.start();
    child_conn.close();
    MemFile f;
    ASSERT_TRUE(f.fd) << "memfd_create";
    if (large) {
        // test_large_fd_transfer: a descriptor above 256 (issue #11657 in CPython).
        int newfd = 256;
        while (::fcntl(newfd, F_GETFD) != -1) ++newfd;
        ASSERT_EQ(::dup2(f.fd.get(), newfd), newfd);
        mp::send_handle(conn, newfd, p.pid());
        ::close(newfd);
    } else {
        mp::send_handle(conn, f.fd.get(), p.pid());
    }
    join_ok(p);
    EXPECT_EQ(f.contents(), large ? "bar" : "foo");
}

/// _TestConnection._send_data_without_fd: one byte, and no descriptor with it.
void send_data_without_fd(mp::Connection conn) {
    raw_write(conn.fileno(), std::string(1, '\0'));
}

}  // namespace

class ReductionHandlesAcross : public mp::test::StartMethodTest {};
MP_INSTANTIATE_START_METHODS(ReductionHandlesAcross);

TEST_P(ReductionHandlesAcross, FdTransfer) { fd_transfer(options(), false); }
TEST_P(ReductionHandlesAcross, LargeFdTransfer) { fd_transfer(options(), true); }

// test_missing_fd_transfer: data without a descriptor is an error (Python: RuntimeError), and
// the stream, now out of step, is not read any further.
TEST_P(ReductionHandlesAcross, MissingFdTransfer) {
    auto [conn, child_conn] = mp::Pipe(true);
    mp::Process p(options(), send_data_without_fd, child_conn);
    p.start();
    child_conn.close();
    join_ok(p);
    EXPECT_THROW(mp::recv_handle(conn), mp::DecodeError);
    EXPECT_FALSE(conn.readable());
}

// The handle may follow and precede frames, and the frame before it may have read it (and its
// descriptor) ahead into the connection's buffer.
TEST(ReductionHandles, BetweenFramesReadAhead) {
    auto [a, b] = mp::Pipe(true);
    int p[2];
    ASSERT_EQ(::pipe2(p, O_CLOEXEC), 0);
    mp::sys::Fd r(p[0]), w(p[1]);
    a.send_bytes("before");
    mp::send_handle(a, w.get());
    w.reset();
    a.send_bytes("after");
    EXPECT_EQ(b.recv_bytes(), "before");
    mp::sys::Fd got(mp::recv_handle(b));
    ASSERT_TRUE(got);
    EXPECT_EQ(::fcntl(got.get(), F_GETFD) & FD_CLOEXEC, FD_CLOEXEC);
    EXPECT_EQ(b.recv_bytes(), "after");
    mp::sys::write_full(got.get(), "x", 1);
    got.reset();
    char c = 0;
    EXPECT_EQ(::read(r.get(), &c, 1), 1);
    EXPECT_EQ(c, 'x');
}

TEST(ReductionHandles, OverUnixListenerClient) {
    mp::Listener l(mp::Address("/tmp/mp-send-handle-" + std::to_string(::getpid())));
    mp::Connection c = mp::Client(l.address());
    mp::Connection s = l.accept();
    MemFile f;
    mp::send_handle(c, f.fd.get());
    mp::sys::Fd got(mp::recv_handle(s));
    mp::sys::write_full(got.get(), "unix", 4);
    EXPECT_EQ(f.contents(), "unix");
}

// Descriptors cannot cross TCP or a pipe: a clear mp::Error, nothing sent, the connection fine.
TEST(ReductionHandles, NotUnixSocketIsError) {
    mp::Listener l(mp::Address("127.0.0.1", 0));
    mp::Connection c = mp::Client(l.address());
    mp::Connection s = l.accept();
    MemFile f;
    try {
        mp::send_handle(c, f.fd.get());
        ADD_FAILURE() << "send_handle over TCP did not throw";
    } catch (const mp::Error& e) {
        EXPECT_NE(std::string(e.what()).find("Unix socket"), std::string::npos) << e.what();
    }
    EXPECT_THROW(mp::recv_handle(s), mp::Error);
    c.send_bytes("still fine");
    EXPECT_EQ(s.recv_bytes(), "still fine");

    // Not a structured binding: clang 14 cannot capture one in a lambda.
    auto pipe = mp::Pipe(false);
    mp::Connection& r = pipe.first;
    EXPECT_THROW(mp::send_handle(pipe.second, f.fd.get()), mp::Error);
    expect_bad_fd([&] { mp::send_handle(r, f.fd.get()); }, "read-only");
}

TEST(ReductionHandles, BadDescriptorAndEof) {
    auto [a, b] = mp::Pipe(true);
    int closed[2];
    ASSERT_EQ(::pipe2(closed, O_CLOEXEC), 0);
    ::close(closed[0]);
    ::close(closed[1]);
    try {
        mp::send_handle(a, closed[0]);
        ADD_FAILURE() << "no error for a closed descriptor";
    } catch (const std::system_error& e) {
        EXPECT_EQ(e.code(), std::errc::bad_file_descriptor) << e.what();
    }
    EXPECT_FALSE(b.poll()) << "nothing was sent";
    a.close();
    EXPECT_THROW(mp::recv_handle(b), mp::EOFError);
}

namespace {

// Python's own multiprocessing.reduction on the other end: receives a descriptor, writes into
// it, then sends it back after a frame (so that mp reads the handle ahead with that frame).
constexpr const char* kPythonHandles = R"PY(
import os, sys
from multiprocessing import reduction
from multiprocessing.connection import Connection
c = Connection(int(sys.argv[1]))
fd = reduction.recv_handle(c)
os.write(fd, b"from python")
c.send_bytes(b"frame")
reduction.send_handle(c, fd, os.getppid())
os.close(fd)
c.send_bytes(b"done")
)PY";

}  // namespace

TEST(ReductionHandles, WireCompatibleWithPython) {
    auto [ours, theirs] = mp::Pipe();
    const pid_t pid = mp::test::start_python(kPythonHandles, {std::to_string(theirs.fileno())}, -1, false, theirs.fileno());
    ASSERT_GE(pid, 0);
    theirs.close();
    mp::test::KilledOnExit child(pid);

    MemFile f;
    mp::send_handle(ours, f.fd.get(), pid);
    ASSERT_TRUE(ours.poll(kLong)) << "python3 sent nothing";
    EXPECT_EQ(ours.recv_bytes(), "frame");
    mp::sys::Fd back(mp::recv_handle(ours));
    mp::sys::write_full(back.get(), "+cpp", 4);  // the same open file: its offset is shared
    EXPECT_EQ(ours.recv_bytes(), "done");
    EXPECT_EQ(f.contents(), "from python+cpp");

    const int status = child.wait();
    ASSERT_TRUE(WIFEXITED(status));
    EXPECT_EQ(WEXITSTATUS(status), 0) << "python3 failed (127: not found)";
}
