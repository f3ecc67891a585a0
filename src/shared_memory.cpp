// Named shared memory (SharedMemory) and its resource tracker.
// One file because the tracker exists only for SharedMemory's create and unlink, and its
// protocol is read most easily beside them.
//
// The tracker. The first named segment a process creates starts a helper process, double-forked
// so that it is nobody's child and never a zombie, holding one end of a SOCK_SEQPACKET socketpair.
// The creator keeps the other end (close-on-exec, and closed in fork children by an atfork
// handler, so that the end belongs to exactly one process). The creator never closes its end: the
// tracker reads end of file when the creator ends, however it ends (exit, crash, SIGKILL, exec),
// and then unlinks every segment still registered.
//
// Protocol: one message per step, sent under the client's mutex.
//   CREATING name    before shm_open; the tracker notes whether the name exists now (and which
//                    file it is) and answers with one byte, so it has looked before shm_open runs;
//   REGISTER name dev ino   after shm_open succeeded: the segment is ours;
//   CANCEL name      shm_open failed: forget the CREATING;
//   UNREGISTER name  unlink() was called.
// So a creator killed at any instant leaks nothing: killed after CREATING and before REGISTER, the
// tracker finds the name either absent or the same file as before (shm_open had not created it:
// nothing to do) or a new file (created by our shm_open: unlinked).
//
// A registration carries the segment's device and inode. At the end the tracker unlinks a name
// only when it is still the same file: another process may have unlinked the segment without
// telling this tracker (a fork child unlinking its parent's segment), and someone may have created
// a new segment under the same name since.
//
// The tracker may be forked from a parent that runs threads, so it never allocates, locks or
// throws: raw system calls, a table grown with mremap, hand-formatted messages written to stderr.

#include "mp/shared_memory.hpp"

#include <fcntl.h>
#include <pthread.h>
#include <signal.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/random.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <climits>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <mutex>
#include <new>
#include <ostream>
#include <stdexcept>
#include <string>

#include "launch.hpp"
#include "sys/error.hpp"
#include "sys/helper_process.hpp"
#include "sys/fd.hpp"

namespace mp {
namespace {

// ------------------------------------------------------------------------------ tracker protocol

constexpr std::uint32_t kMagic = 0x6d70'7274;  // "mprt"
enum Op : std::uint32_t { kCreating = 1, kRegister = 2, kCancel = 3, kUnregister = 4 };
constexpr std::size_t kMaxName = NAME_MAX;  // glibc's shm_open refuses longer names
constexpr int kTrackerFd = 3;

struct Message {
    std::uint32_t magic;
    std::uint32_t op;
    std::uint64_t dev;
    std::uint64_t ino;
    std::uint32_t len;
    char name[kMaxName + 1];
};

// ------------------------------------------------------------------------------ tracker process

struct FileId {
    bool exists;
    std::uint64_t dev;
    std::uint64_t ino;
    bool operator==(const FileId&) const = default;
};

struct Entry {
    bool registered;  // else pending: CREATING seen, REGISTER or CANCEL not yet
    FileId file;      // registered: the segment; pending: what the name was before shm_open
    bool leaked;      // set by clean_up
    std::uint32_t len;
    char name[kMaxName + 1];
};

Entry* g_entries = nullptr;
std::size_t g_count = 0;
std::size_t g_capacity = 0;

// One line of the tracker's output, built on the stack (no allocation in this forked helper) and
// written with one write(2) when it goes, so that the lines of trackers ending at the same time
// do not interleave mid-line on a shared stderr.
class Line {
public:
    Line& operator<<(const char* s) noexcept {
        while (*s != '\0' && n_ < sizeof buf_) buf_[n_++] = *s++;
        return *this;
    }
    Line& operator<<(std::size_t v) noexcept {
        char digits[24];
        char* p = digits + sizeof digits;
        *--p = '\0';
        do {
            *--p = static_cast<char>('0' + v % 10);
            v /= 10;
        } while (v != 0);
        return *this << p;
    }
    Line() noexcept = default;
    Line(const Line&) = delete;
    Line& operator=(const Line&) = delete;
    ~Line() {
        const char* p = buf_;
        std::size_t n = n_;
        while (n > 0) {
            const ssize_t r = ::write(STDERR_FILENO, p, n);
            if (r < 0 && errno == EINTR) continue;
            if (r <= 0) return;
            p += r;
            n -= static_cast<std::size_t>(r);
        }
    }

private:
    char buf_[2 * kMaxName + 128];
    std::size_t n_ = 0;
};

// glibc's shm_open names /dev/shm/NAME; the path is built here without allocating.
constexpr char kDir[] = "/dev/shm/";
using Path = char[sizeof kDir + kMaxName + 1];

void make_path(Path& path, const char* name, std::size_t len) noexcept {
    std::memcpy(path, kDir, sizeof kDir - 1);
    std::memcpy(path + sizeof kDir - 1, name, len);
    path[sizeof kDir - 1 + len] = '\0';
}

FileId file_id(const char* path) noexcept {
    struct stat st {};
    if (::lstat(path, &st) != 0) return FileId{false, 0, 0};
    return FileId{true, static_cast<std::uint64_t>(st.st_dev),
                  static_cast<std::uint64_t>(st.st_ino)};
}

bool grow() noexcept {
    std::size_t cap = g_capacity == 0 ? 64 : g_capacity * 2;
    void* p = g_entries == nullptr
                  ? ::mmap(nullptr, cap * sizeof(Entry), PROT_READ | PROT_WRITE,
                           MAP_PRIVATE | MAP_ANONYMOUS, -1, 0)
                  : ::mremap(g_entries, g_capacity * sizeof(Entry), cap * sizeof(Entry),
                             MREMAP_MAYMOVE);
    if (p == MAP_FAILED) return false;
    g_entries = static_cast<Entry*>(p);
    g_capacity = cap;
    return true;
}

Entry* find(const Message& m, bool registered) noexcept {
    for (std::size_t i = 0; i < g_count; ++i) {
        Entry& e = g_entries[i];
        if (e.registered == registered && e.len == m.len && std::memcmp(e.name, m.name, m.len) == 0)
            return &e;
    }
    return nullptr;
}

void remove(Entry* e) noexcept {
    if (e != nullptr) *e = g_entries[--g_count];
}

void add(const Message& m, bool registered, const FileId& file) noexcept {
    if (g_count == g_capacity && !grow()) {
        Line() << "mp resource_tracker: out of memory; cannot track '" << m.name << "'\n";
        return;
    }
    Entry& e = g_entries[g_count++];
    e.registered = registered;
    e.file = file;
    e.leaked = false;
    e.len = m.len;
    std::memcpy(e.name, m.name, m.len);
    e.name[m.len] = '\0';
}

void handle(const Message& m) noexcept {
    if (m.magic != kMagic || m.len == 0 || m.len > kMaxName) return;
    switch (m.op) {
        case kCreating: {
            Path path;
            make_path(path, m.name, m.len);
            remove(find(m, false));
            add(m, false, file_id(path));
            const char ack = 1;
            while (::send(kTrackerFd, &ack, 1, MSG_NOSIGNAL) < 0 && errno == EINTR) {
            }
            break;
        }
        case kRegister:
            remove(find(m, false));
            // A registered segment of the same name is gone: shm_open(O_EXCL) just succeeded.
            remove(find(m, true));
            add(m, true, FileId{true, m.dev, m.ino});
            break;
        case kCancel:
            remove(find(m, false));
            break;
        case kUnregister:
            remove(find(m, true));
            break;
        default:
            break;
    }
}

void clean_up() noexcept {
    Path path;
    std::size_t leaked = 0;
    for (std::size_t i = 0; i < g_count; ++i) {
        Entry& e = g_entries[i];
        make_path(path, e.name, e.len);
        const FileId now = file_id(path);
        // Registered: still the same file. Pending: a file our shm_open created (the name was
        // free, or held by another file, when the creator announced it).
        e.leaked = now.exists && (e.registered ? now == e.file : !(now == e.file));
        if (e.leaked) ++leaked;
    }
    if (leaked == 0) return;
    Line() << "mp resource_tracker: There appear to be " << leaked
           << " leaked shared_memory objects to clean up at shutdown\n";
    for (std::size_t i = 0; i < g_count; ++i) {
        Entry& e = g_entries[i];
        if (!e.leaked) continue;
        make_path(path, e.name, e.len);
        Line line;
        line << "mp resource_tracker: unlinking '" << e.name;
        if (::unlink(path) == 0)
            line << "'\n";
        else  // errno as a number: strerror may allocate (translations)
            line << "': failed, errno " << static_cast<std::size_t>(errno) << "\n";
    }
}

[[noreturn]] void tracker_main(int sock, int creator_end) noexcept {
    // The creator's end must be the creator's alone, or end of file would never come.
    ::close(creator_end);
    ::prctl(PR_SET_NAME, "mp-shm-tracker");
    // Like Python's tracker, survive the Ctrl-C and SIGTERM meant for the program, so that the
    // program's segments are still cleaned up when it goes.
    sys::reset_signals({SIGINT, SIGTERM, SIGPIPE});
    sys::keep_only(sock, kTrackerFd);
    // Hold nothing of the creator's but stderr (for the warning).
    int null = ::open("/dev/null", O_RDWR | O_CLOEXEC);
    if (null >= 0) {
        ::dup2(null, STDIN_FILENO);
        ::dup2(null, STDOUT_FILENO);
        if (null > kTrackerFd) ::close(null);
    }
    if (::chdir("/") != 0) {
        // Only to avoid pinning the creator's working directory (a mount point, say).
    }

    Message m;
    for (;;) {
        std::memset(&m, 0, sizeof m);
        ssize_t r = ::recv(kTrackerFd, &m, sizeof m, 0);
        if (r < 0 && errno == EINTR) continue;
        if (r <= 0) break;  // end of file: the creator has gone
        if (static_cast<std::size_t>(r) >= offsetof(Message, name) + 1) handle(m);
    }
    clean_up();
    sys::exit_child(0);
}

// ------------------------------------------------------------------------------ tracker client

struct TrackerClient {
    std::mutex mu;
    int fd = -1;      // our end of the tracker's socket
    pid_t owner = 0;  // the process whose tracker it is
};

std::atomic<TrackerClient*> g_client{nullptr};  // set once; read by the atfork handler

// In a fork child: the parent's tracker connection is the parent's. Closing the inherited copy
// lets the tracker see end of file as soon as the parent ends, whatever the child does; the child
// starts a tracker of its own if it creates a segment. Another thread may have held the mutex at
// the moment of fork, so make a fresh one in place. (Only close and placement new: fork children
// may not allocate or lock here.)
void after_fork_in_child() noexcept {
    TrackerClient* c = g_client.load(std::memory_order_acquire);
    if (c == nullptr) return;
    if (c->fd >= 0) ::close(c->fd);
    c->fd = -1;
    c->owner = 0;
    new (&c->mu) std::mutex;
}

TrackerClient& client() {
    static TrackerClient* c = [] {
        auto* p = new TrackerClient;  // never destroyed: segments may be registered at exit
        g_client.store(p, std::memory_order_release);
        sys::check_ret(::pthread_atfork(nullptr, nullptr, after_fork_in_child), "pthread_atfork");
        return p;
    }();
    return *c;
}

void start_tracker_locked(TrackerClient& c) {
    if (c.fd >= 0) ::close(c.fd);
    c.fd = -1;
    auto pair = sys::make_socketpair(SOCK_SEQPACKET);
    sys::Fd& ours = pair.first;
    const int theirs = pair.second.get();
    const int ours_fd = ours.get();
    auto tracker = [theirs, ours_fd]() noexcept -> int { tracker_main(theirs, ours_fd); };
    detail::launch_helper("fork (resource tracker)", detail::ChildMain(tracker));
    c.fd = ours.release();
    c.owner = ::getpid();
}

bool send_message(int fd, const Message& m) noexcept {
    const std::size_t n = offsetof(Message, name) + m.len + 1;
    for (;;) {
        if (::send(fd, &m, n, MSG_NOSIGNAL) == static_cast<ssize_t>(n)) return true;
        if (errno != EINTR) return false;
    }
}

bool receive_ack(int fd) noexcept {
    char ack = 0;
    for (;;) {
        ssize_t r = ::recv(fd, &ack, 1, 0);
        if (r == 1) return ack == 1;
        if (r == 0 || errno != EINTR) return false;
    }
}

Message make_message(Op op, const std::string& name, const struct stat* st = nullptr) {
    Message m{};
    m.magic = kMagic;
    m.op = op;
    const std::size_t len = std::min(name.size(), kMaxName);  // callers check; be sure
    m.len = static_cast<std::uint32_t>(len);
    std::memcpy(m.name, name.data(), len);
    if (st != nullptr) {
        m.dev = static_cast<std::uint64_t>(st->st_dev);
        m.ino = static_cast<std::uint64_t>(st->st_ino);
    }
    return m;
}

// Sends m to this process's tracker (starting it when needed); with `ack`, waits for its answer.
// A tracker that has gone (killed by someone) is replaced once: the names the old one knew are
// lost to it, this one is not.
void send_to_tracker(const Message& m, bool ack) {
    TrackerClient& c = client();
    std::lock_guard lock(c.mu);
    if (c.fd < 0 || c.owner != ::getpid()) start_tracker_locked(c);
    for (int attempt = 0;; ++attempt) {
        if (send_message(c.fd, m) && (!ack || receive_ack(c.fd))) return;
        if (attempt == 1) sys::throw_system_error(errno != 0 ? errno : EPIPE, "send (resource tracker)");
        start_tracker_locked(c);
    }
}

// Best effort, for steps whose failure leaves nothing behind to protect.
void send_if_tracking(const Message& m) noexcept {
    TrackerClient* c = g_client.load(std::memory_order_acquire);
    if (c == nullptr) return;
    std::lock_guard lock(c->mu);
    if (c->fd >= 0 && c->owner == ::getpid()) (void)send_message(c->fd, m);
}

// The steps of a tracked create (names without the leading '/').
void announce(const std::string& name) { send_to_tracker(make_message(kCreating, name), true); }
void confirm(const std::string& name, const struct stat& st) {
    send_to_tracker(make_message(kRegister, name, &st), false);
}
void cancel(const std::string& name) noexcept {
    try {
        send_if_tracking(make_message(kCancel, name));
    } catch (...) {  // a mutex that cannot be locked: nothing better to do
    }
}
void untrack(const std::string& name) noexcept {
    try {
        send_if_tracking(make_message(kUnregister, name));
    } catch (...) {
    }
}

// ------------------------------------------------------------------------------ helpers

std::string random_name() {
    unsigned char bytes[8];
    std::size_t got = 0;
    while (got < sizeof bytes) {
        ssize_t r = ::getrandom(bytes + got, sizeof bytes - got, 0);
        if (r < 0) {
            if (errno == EINTR) continue;
            sys::throw_system_error(errno, "getrandom");
        }
        got += static_cast<std::size_t>(r);
    }
    static const char kHex[] = "0123456789abcdef";
    std::string name = "mp_";
    for (unsigned char b : bytes) {
        name += kHex[b >> 4];
        name += kHex[b & 15];
    }
    return name;
}

// Refuses what shm_open would misread rather than refuse: an embedded NUL ends the C string, so
// the call (and a later unlink) would act on someone else's segment; glibc strips any number of
// leading '/', so "//x" would be the segment "x" under another name; "." and ".." name /dev/shm
// itself and /dev. The rest (empty, '/' inside, too long) glibc refuses too, but only after the
// tracker has been told of the name: refused here, nothing is announced.
void check_name(const std::string& name) {
    auto refuse = [&](const char* why) {
        std::string shown;  // printable: a NUL shown as \0, a long name cut
        for (char c : name.substr(0, 64)) shown += c == '\0' ? std::string("\\0") : std::string(1, c);
        if (name.size() > 64) shown += "...";
        throw std::invalid_argument("mp::SharedMemory: invalid name '" + shown + "': " + why);
    };
    if (name.empty()) refuse("it is empty");
    if (name.find('\0') != std::string::npos) refuse("embedded null character");
    if (name.find('/') != std::string::npos) refuse("'/' is allowed only as the first character");
    if (name == "." || name == "..") refuse("'.' and '..' are not segment names");
    if (name.size() > kMaxName) refuse("longer than NAME_MAX (255) characters");
}

}  // namespace

// ------------------------------------------------------------------------------ SharedMemory

struct SharedMemory::State {
    std::string name;  // without the leading '/'
    std::size_t size = 0;
    std::atomic<std::byte*> data{nullptr};
    pid_t tracked_by = 0;  // the process whose tracker knows the segment, or 0
    std::mutex mu;         // serialises unlink's bookkeeping between threads

    ~State() { unmap(); }
    void unmap() noexcept {
        std::byte* p = data.exchange(nullptr);
        if (p != nullptr) ::munmap(p, size);
    }
};

SharedMemory::SharedMemory(std::optional<std::string> name, bool create, std::size_t size,
                           bool track_it)
    : state_(std::make_shared<State>()) {
    if (size > static_cast<std::size_t>(PTRDIFF_MAX))
        throw std::invalid_argument("mp::SharedMemory: 'size' must be a positive integer");
    if (create && size == 0)
        throw std::invalid_argument(
            "mp::SharedMemory: 'size' must be a positive number different from zero");
    if (!name && !create)
        throw std::invalid_argument("mp::SharedMemory: 'name' can only be empty if create=true");
    if (name && !name->empty() && name->front() == '/') name->erase(0, 1);
    if (name) check_name(*name);

    State& s = *state_;
    const int flags = create ? O_CREAT | O_EXCL | O_RDWR : O_RDWR;
    const bool tracked = create && track_it;
    // Announced to the tracker before shm_open, so that no instant is left in which a SIGKILL
    // could leak the segment (see the protocol at the top of this file).
    auto open_segment = [&](const std::string& n) -> int {
        if (tracked) announce(n);
        int f = ::shm_open(("/" + n).c_str(), flags, 0600);
        if (f < 0) {
            int err = errno;
            if (tracked) cancel(n);
            errno = err;
        }
        return f;
    };
    sys::Fd fd;
    if (!name) {
        for (;;) {
            std::string candidate = random_name();
            int f = open_segment(candidate);
            if (f >= 0) {
                fd.reset(f);
                s.name = std::move(candidate);
                break;
            }
            if (errno != EEXIST) sys::throw_system_error(errno, "shm_open");
        }
    } else {
        s.name = std::move(*name);
        const int f = open_segment(s.name);
        // Named as Python's FileNotFoundError / FileExistsError name it.
        if (f < 0) {
            const int err = errno;
            sys::throw_system_error(err, ("shm_open '/" + s.name + "'").c_str());
        }
        fd.reset(f);
    }

    struct stat st {};
    try {
        sys::check(::fstat(fd.get(), &st), "fstat");
        if (tracked) {
            confirm(s.name, st);
            s.tracked_by = ::getpid();
        }
        if (create) {
            sys::check(::ftruncate(fd.get(), static_cast<off_t>(size)), "ftruncate");
        } else {
            if (st.st_size <= 0)
                throw std::system_error(EINVAL, std::system_category(),
                                        "mmap (the segment '" + s.name + "' is empty)");
            size = static_cast<std::size_t>(st.st_size);
        }
        void* p = ::mmap(nullptr, size, PROT_READ | PROT_WRITE, MAP_SHARED, fd.get(), 0);
        if (p == MAP_FAILED) sys::throw_system_error(errno, "mmap");
        s.size = size;
        s.data.store(static_cast<std::byte*>(p));
    } catch (...) {
        // As Python: a segment this call created does not outlive the failure.
        if (create) {
            ::shm_unlink(("/" + s.name).c_str());
            if (tracked) {
                cancel(s.name);  // announced but not confirmed
                untrack(s.name);
            }
        }
        throw;
    }
    // The mapping keeps the segment; the descriptor is not needed any more.
}

const std::string& SharedMemory::name() const {
    return detail::deref_handle(state_, "mp::SharedMemory").name;
}

std::size_t SharedMemory::size() const { return detail::deref_handle(state_, "mp::SharedMemory").size; }

std::span<std::byte> SharedMemory::buf() const {
    const State& s = detail::deref_handle(state_, "mp::SharedMemory");
    std::byte* p = s.data.load();
    return p == nullptr ? std::span<std::byte>() : std::span<std::byte>(p, s.size);
}

// A handle moved from maps nothing: closed, and nothing to close.
bool SharedMemory::closed() const noexcept { return !state_ || state_->data.load() == nullptr; }

void SharedMemory::close() noexcept {
    if (state_) state_->unmap();
}

void SharedMemory::unlink() {
    State& s = detail::deref_handle(state_, "mp::SharedMemory");
    int rc = ::shm_unlink(("/" + s.name).c_str());
    int err = errno;
    {
        std::lock_guard lock(s.mu);
        // ENOENT: unlinked elsewhere already; either way the tracker has nothing left to do.
        if ((rc == 0 || err == ENOENT) && s.tracked_by == ::getpid()) {
            untrack(s.name);
            s.tracked_by = 0;
        }
    }
    if (rc != 0) sys::throw_system_error(err, "shm_unlink");
}

std::string to_string(const SharedMemory& shm) {
    return "SharedMemory('" + shm.name() + "', size=" + std::to_string(shm.size()) + ")";
}

std::ostream& operator<<(std::ostream& out, const SharedMemory& shm) {
    return out << to_string(shm);
}

namespace detail {

namespace {

// The block's owner: forgets its record when the last handle of this process goes.
BlockPtr share_block(SharedBlock b) {
    return BlockPtr(new SharedBlock(std::move(b)), [](SharedBlock* p) {
        attached::forget(*p);
        delete p;
    });
}

}  // namespace

BlockPtr make_block(std::size_t bytes, const char* name) {
    BlockPtr b = share_block(SharedBlock::create(bytes, name));
    attached::record(*b, attached::raw_tag, [&] { return b; });
    return b;
}

BlockPtr decode_block(Decoder& d, std::size_t min_bytes) {
    auto index = d.get<std::uint32_t>();
    auto b = std::static_pointer_cast<SharedBlock>(attached::find_or_attach(
        d.take_fd(index), 1, "mp::Codec",
        [](std::uint32_t tag) {
            if (tag != attached::raw_tag)
                throw DecodeError("mp::Codec: the received shared block holds another kind of "
                                  "object (malformed input)");
        },
        [](SharedBlock block) -> std::pair<std::shared_ptr<void>, std::uint32_t> {
            return {share_block(std::move(block)), attached::raw_tag};
        }));
    if (b->size() < min_bytes)
        throw DecodeError("mp::Codec: a shared block of " + std::to_string(b->size()) +
                          " bytes arrived where " + std::to_string(min_bytes) +
                          " were needed (malformed input)");
    return b;
}

}  // namespace detail

}  // namespace mp
