// Managers across the language line, against the real python3 on this machine: Python's
// multiprocessing.managers clients using an mp manager (dict, list, Namespace, Queue, Lock,
// Event, Value; errors both ways; refusals; a wrong key; a client killed mid-call), and mp's
// PyManagerClient using a Python SyncManager server.

#include <gtest/gtest.h>

#include <mp/managers.hpp>

#include "helpers/python.hpp"
#include "helpers/temp_dir.hpp"

#include <cerrno>
#include <chrono>
#include <csignal>
#include <cstdint>
#include <string>
#include <system_error>
#include <thread>
#include <vector>

#include <fcntl.h>
#include <poll.h>
#include <sys/wait.h>
#include <unistd.h>

namespace py = mp::py;
using namespace std::chrono_literals;

namespace {

/// python3 -c code args..., its stdout read through a pipe; killed (SIGKILL) if still running
/// when the object goes.
class PythonProcess {
public:
    PythonProcess(const std::string& code, std::vector<std::string> args = {}) {
        int fds[2];
        if (::pipe2(fds, O_CLOEXEC) != 0) throw std::system_error(errno, std::generic_category(), "pipe2");
        pid_ = mp::test::start_python(code, args, fds[1], true);
        ::close(fds[1]);
        out_ = fds[0];
    }
    PythonProcess(const PythonProcess&) = delete;
    PythonProcess& operator=(const PythonProcess&) = delete;
    ~PythonProcess() {
        kill();
        if (out_ >= 0) ::close(out_);
    }

    /// Reads until a line starting with `prefix` arrives (returns it) or `timeout` (returns "").
    std::string read_line(const std::string& prefix, std::chrono::milliseconds timeout = 20s) {
        auto end = std::chrono::steady_clock::now() + timeout;
        for (;;) {
            std::size_t start = 0;
            for (std::size_t nl; (nl = text_.find('\n', start)) != std::string::npos; start = nl + 1) {
                if (start >= consumed_ && text_.compare(start, prefix.size(), prefix) == 0) {
                    consumed_ = nl + 1;
                    return text_.substr(start, nl - start);
                }
            }
            auto left = std::chrono::duration_cast<std::chrono::milliseconds>(end - std::chrono::steady_clock::now());
            if (left <= 0ms || !read_some(left)) return "";
        }
    }
    /// Waits (bounded) for the exit; returns the whole output and sets `ok` to a zero exit.
    std::string finish(bool& ok, std::chrono::milliseconds timeout = 30s) {
        auto end = std::chrono::steady_clock::now() + timeout;
        for (;;) {
            auto left = std::chrono::duration_cast<std::chrono::milliseconds>(end - std::chrono::steady_clock::now());
            if (left <= 0ms || !read_some(left)) break;
        }
        ok = false;
        if (pid_ > 0) {
            int status = 0;
            auto until = std::chrono::steady_clock::now() + 5s;
            pid_t r;
            while ((r = ::waitpid(pid_, &status, WNOHANG)) == 0 && std::chrono::steady_clock::now() < until)
                std::this_thread::sleep_for(10ms);
            if (r == pid_) {
                pid_ = -1;
                ok = WIFEXITED(status) && WEXITSTATUS(status) == 0;
            }
        }
        return text_;
    }
    void kill() {
        if (pid_ > 0) {
            ::kill(pid_, SIGKILL);
            ::waitpid(pid_, nullptr, 0);
            pid_ = -1;
        }
    }
    pid_t pid() const { return pid_; }

private:
    // false at end of output or timeout
    bool read_some(std::chrono::milliseconds timeout) {
        pollfd p{out_, POLLIN, 0};
        int n = ::poll(&p, 1, static_cast<int>(timeout.count()));
        if (n <= 0) return false;
        char buf[4096];
        ssize_t got = ::read(out_, buf, sizeof buf);
        if (got <= 0) return false;
        text_.append(buf, static_cast<std::size_t>(got));
        return true;
    }
    pid_t pid_ = -1;
    int out_ = -1;
    std::string text_;
    std::size_t consumed_ = 0;
};

/// Runs a Python client script against `address` with `key`; expects it to exit 0 and returns
/// its output.
std::string run_client(const char* code, const mp::Address& address, const std::string& key) {
    PythonProcess p(code, {address.host, std::to_string(address.port), key});
    bool ok = false;
    std::string out = p.finish(ok);
    EXPECT_TRUE(ok) << "python3 failed; output:\n" << out;
    return out;
}

// The preamble of every client: argv is host, port, authkey.
#define PY_CONNECT                                                                        \
    "import sys, queue\n"                                                                 \
    "from multiprocessing.managers import SyncManager, BaseManager, RemoteError\n"       \
    "address = (sys.argv[1], int(sys.argv[2])); key = sys.argv[3].encode()\n"             \
    "m = SyncManager(address=address, authkey=key)\n"                                     \
    "m.connect()\n"

constexpr const char* kDictListNamespace = PY_CONNECT R"PY(
d = m.dict({'a': 1}, b=2)
d['c'] = [1, 'x', None, (2.5, b'\x00')]
assert d['a'] == 1 and d['b'] == 2 and d['c'] == [1, 'x', None, (2.5, b'\x00')]
assert 'a' in d and 'zz' not in d and len(d) == 3
assert d.get('zz') is None and d.get('zz', 7) == 7
try:
    d['zz']
except KeyError as e:
    print('KEYERROR', e)
assert d.pop('b') == 2 and d.setdefault('n', 5) == 5 and d.setdefault('n', 6) == 5
d.update({'u': 1}, v=2)
del d['u']
assert sorted(d.keys()) == ['a', 'c', 'n', 'v'] and d.copy() == {'a': 1, 'c': [1, 'x', None, (2.5, b'\x00')], 'n': 5, 'v': 2}
d[(1, 'k')] = frozenset({3})
assert d[(1, 'k')] == frozenset({3})
print('DICT', repr(d.copy()))
print('STR', str(d))

l = m.list([3, 1, 2])
l.append(5); l.extend([0]); l.insert(0, 9)
assert l[0] == 9 and l[-1] == 0 and len(l) == 6 and 5 in l
l.sort(); assert l[:] if False else True
assert l._getvalue() == [0, 1, 2, 3, 5, 9]
l[1] = 'one'; del l[0]
assert l.pop() == 9 and l.index(2) == 1 and l.count(3) == 1
l.remove(3); l.reverse()
assert l._getvalue() == [5, 2, 'one']
try:
    l[10]
except IndexError as e:
    print('INDEXERROR', e)
try:
    l.sort()
except TypeError as e:
    print('TYPEERROR', e)
assert l + [1] == [5, 2, 'one', 1] and l * 2 == [5, 2, 'one'] * 2
l += [7]; l *= 1
print('LIST', l._getvalue())
# index(value, start, stop) searches the slice only (start and stop were ignored).
l2 = m.list([1, 2, 1, 2])
assert l2.index(1, 1) == 2 and l2.index(2, -1) == 3 and l2.index(1, 0, 1) == 0 and l2.index(2, 0, 2**63) == 1
for args in ((1, 1, 2), (2, 4), (1, 3, 1)):
    try:
        l2.index(*args)
        print('SLICE found', args)
    except ValueError as e:
        print('SLICE', e)
del l2

ns = m.Namespace(x=1)
ns.y = 'why'
assert ns.x == 1 and ns.y == 'why'
del ns.x
try:
    ns.x
except AttributeError as e:
    print('ATTRIBUTEERROR', e)
print('NS', ns)
del d, l, ns
import gc; gc.collect()  # an exception's traceback holds a proxy in a cycle (so with Python's server too)
print('OBJECTS', m._number_of_objects())
)PY";

constexpr const char* kQueueLockEventValue = PY_CONNECT R"PY(
q = m.Queue(2)
q.put({'job': 1}); q.put_nowait([2])
assert q.qsize() == 2 and q.full() and not q.empty()
try:
    q.put(3, timeout=0.05)
except queue.Full:
    print('FULL')
assert q.get() == {'job': 1} and q.get(timeout=1) == [2]
try:
    q.get_nowait()
except queue.Empty:
    print('EMPTY')
try:
    q.get(True, 0.05)
except queue.Empty:
    print('EMPTY-TIMEOUT')
# As Python's own server: a negative timeout is a ValueError when put or get would block, and
# is not looked at when they would not.
for call in (lambda: q.get(timeout=-1), lambda: (q.put(1), q.put(2), q.put(3, True, -0.5))):
    try:
        call()
    except ValueError as e:
        print('NEGATIVE', e)
try:
    q.get(); q.get(); q.get(False, -1)
except queue.Empty:
    print('EMPTY-NOWAIT-NEGATIVE')
jq = m.JoinableQueue()
jq.put(1); jq.get(); jq.task_done(); jq.join()
try:
    jq.task_done()
except ValueError as e:
    print('VALUEERROR', e)

lk = m.Lock()
assert lk.acquire() and not lk.acquire(False) and not lk.acquire(True, 0.05)
lk.release()
try:
    lk.release()
except RuntimeError as e:
    print('RUNTIMEERROR', e)
with lk:
    pass
rl = m.RLock()
assert rl.acquire() and rl.acquire()
rl.release(); rl.release()

ev = m.Event()
assert not ev.is_set() and ev.wait(0.05) is False
ev.set()
assert ev.is_set() and ev.wait() is True and ev.wait(1) is True
ev.clear(); assert not ev.is_set()

v = m.Value('i', 5)
assert v.value == 5
v.value = 7
assert v.get() == 7
print('VALUE', v.value, v)
del q, jq, lk, rl, ev, v
import gc; gc.collect()
print('OBJECTS', m._number_of_objects())
)PY";

constexpr const char* kRefusals = PY_CONNECT R"PY(
import fractions
d = m.dict()
for bad in (fractions.Fraction(1, 3), 2**70):
    try:
        d['x'] = bad
    except RemoteError as e:
        print('REFUSED', str(e).replace('\n', ' '))
d['ok'] = 1          # the connection goes on after a refusal
assert d['ok'] == 1
try:
    iter(d)
except Exception as e:
    print('ITER', type(e).__name__, e)
class Counter: pass
class M(BaseManager): pass
M.register('Counter', Counter)
mm = M(address=address, authkey=key); mm.connect()
try:
    mm.Counter()
except RemoteError as e:
    print('NOTYPE', str(e).replace('\n', ' '))
    # As Python's own server's: the text ends with a newline before RemoteError's closing dashes.
    print('ENDS', str(e).endswith('\n' + '-' * 75))
print('DONE')
)PY";

class ManagerForPython : public ::testing::Test {
protected:
    void SetUp() override {
        manager.register_shared("get_tasks", "Queue");
        manager.start();
    }
    mp::SyncManager manager{mp::Address("127.0.0.1", 0), "pykey"};
};

}  // namespace

TEST_F(ManagerForPython, PythonClientUsesDictListAndNamespace) {
    std::string out = run_client(kDictListNamespace, manager.address(), "pykey");
    EXPECT_NE(out.find("KEYERROR 'zz'\n"), std::string::npos) << out;
    EXPECT_NE(out.find("DICT {'a': 1, 'c': [1, 'x', None, (2.5, b'\\x00')], 'n': 5, 'v': 2, (1, 'k'): frozenset({3})}\n"),
              std::string::npos)
        << out;
    EXPECT_NE(out.find("STR {'a': 1"), std::string::npos) << out;
    EXPECT_NE(out.find("INDEXERROR list index out of range\n"), std::string::npos) << out;
    EXPECT_NE(out.find("TYPEERROR '<' not supported between instances of 'str' and 'int'\n"), std::string::npos)
        << out;
    EXPECT_NE(out.find("LIST [5, 2, 'one', 7]\n"), std::string::npos) << out;
    EXPECT_NE(out.find("SLICE 1 is not in list\nSLICE 2 is not in list\nSLICE 1 is not in list\n"), std::string::npos)
        << out;
    EXPECT_NE(out.find("ATTRIBUTEERROR 'Namespace' object has no attribute 'x'\n"), std::string::npos) << out;
    EXPECT_NE(out.find("NS Namespace(y='why')\n"), std::string::npos) << out;
    // Every proxy dropped: Python's client sent the decrefs, and the objects are gone.
    EXPECT_NE(out.find("OBJECTS 0\n"), std::string::npos) << out;
}

TEST_F(ManagerForPython, PythonClientUsesQueueLockEventAndValue) {
    std::string out = run_client(kQueueLockEventValue, manager.address(), "pykey");
    for (const char* line : {"FULL\n", "EMPTY\n", "EMPTY-TIMEOUT\n", "EMPTY-NOWAIT-NEGATIVE\n",
                             "VALUEERROR task_done() called too many times\n",
                             "RUNTIMEERROR release unlocked lock\n", "VALUE 7 Value('i', 7)\n", "OBJECTS 0\n"})
        EXPECT_NE(out.find(line), std::string::npos) << "missing " << line << "in:\n" << out;
    // Twice: get(timeout=-1) on the empty queue, put(3, True, -0.5) on the full one.
    const std::string negative = "NEGATIVE 'timeout' must be a non-negative number\n";
    const std::size_t first = out.find(negative);
    EXPECT_TRUE(first != std::string::npos && out.find(negative, first + 1) != std::string::npos) << out;
}

TEST_F(ManagerForPython, NonPlainDataAndUnknownTypesAreRefusedWithAReadableRemoteError) {
    std::string out = run_client(kRefusals, manager.address(), "pykey");
    EXPECT_NE(out.find("REFUSED"), std::string::npos) << out;
    EXPECT_NE(out.find("fractions.Fraction refused"), std::string::npos) << out;
    EXPECT_NE(out.find("does not fit in 64 bits"), std::string::npos) << out;
    EXPECT_NE(out.find("ITER NotImplementedError"), std::string::npos) << out;
    EXPECT_NE(out.find("NOTYPE"), std::string::npos) << out;
    EXPECT_NE(out.find("no type 'Counter'"), std::string::npos) << out;
    EXPECT_NE(out.find("ENDS True\n"), std::string::npos) << out;
    EXPECT_NE(out.find("DONE\n"), std::string::npos) << out;
}

TEST_F(ManagerForPython, AWrongKeyIsAnAuthenticationErrorInPythonAndTheServerGoesOn) {
    constexpr const char* code = PY_CONNECT "print('CONNECTED')\n";
    {
        PythonProcess p(code, {manager.address().host, std::to_string(manager.address().port), "wrong"});
        bool ok = true;
        std::string out = p.finish(ok);
        EXPECT_FALSE(ok);
        EXPECT_NE(out.find("AuthenticationError"), std::string::npos) << out;
    }
    std::string out = run_client(code, manager.address(), "pykey");
    EXPECT_NE(out.find("CONNECTED"), std::string::npos) << out;
    EXPECT_THROW(mp::PyManagerClient(manager.address(), "wrong"), mp::AuthenticationError);
}

TEST_F(ManagerForPython, APythonClientKilledMidCallLeavesTheServerServingAndItsLockFree) {
    constexpr const char* code = PY_CONNECT R"PY(
class M(BaseManager): pass
M.register('get_tasks')
mm = M(address=address, authkey=key); mm.connect()
lk = m.Lock(); lk.acquire()
q = mm.get_tasks()
print('IDENT', lk._id, flush=True)
q.get()    # blocks until killed
)PY";
    PythonProcess p(code, {manager.address().host, std::to_string(manager.address().port), "pykey"});
    std::string line = p.read_line("IDENT ");
    ASSERT_FALSE(line.empty()) << "the Python client did not start";
    // Let it reach the blocking get, then kill it there.
    std::this_thread::sleep_for(200ms);
    p.kill();

    mp::PyManagerClient c(manager.address(), "pykey");
    mp::PyProxy tasks = c.create("get_tasks");
    tasks.call("put", {1});  // the queue the dead client waited on still works
    EXPECT_EQ(tasks.call("get", {true, 5.0}).as<int>(), 1);
    // The lock the dead client held is released when its connection goes. Reach it by ident
    // through a fresh Python client (mp's client cannot adopt a foreign ident).
    constexpr const char* check = PY_CONNECT R"PY(
from multiprocessing.managers import Token, AcquirerProxy
lk = AcquirerProxy(Token('Lock', address, sys.argv[4]), 'pickle', authkey=key)
print('ACQUIRED', lk.acquire(True, 5))
)PY";
    PythonProcess checker(check, {manager.address().host, std::to_string(manager.address().port), "pykey",
                                  line.substr(6)});
    bool ok = false;
    std::string out = checker.finish(ok);
    EXPECT_TRUE(ok) << out;
    EXPECT_NE(out.find("ACQUIRED True"), std::string::npos) << out;
}

// Python's == across types: 1, 1.0 and True are one dict key and equal list items, bytes equals
// bytearray, a set equals a frozenset, containers compare item by item. mp's manager compared
// with py::Object's strict ==: d[1.0] was a KeyError and l.index(2) of [1, 2.0] a ValueError.
TEST_F(ManagerForPython, KeysAndItemsCompareAsPythonsEqual) {
    constexpr const char* code = PY_CONNECT R"PY(
d = m.dict({1: 'one', 2**63: 'big', 0: 'zero', (1, 2): 'pair', 'x': 'str'})
print('DICT', d[1.0], d[True], 1.0 in d, d.get(1.0), d[2.0**63], d[-0.0], d[(1.0, True + 1)], 2.5 in d, '1' in d)
d[1.0] = 'uno'          # the key stays 1, as in Python's dict
print('KEYS', d.keys(), d[1])
l = m.list([1, 2.0, b'x', (1, 2), frozenset({3}), [1.0], float('nan')])
print('LIST', l.index(2), True in l, l.count(1.0), bytearray(b'x') in l, (1.0, 2) in l, {3} in l, [True] in l,
      float('nan') in l, 3 in l, 'x' in l)
l.remove(2)
print('REMOVED', l._getvalue()[:2])
)PY";
    std::string out = run_client(code, manager.address(), "pykey");
    EXPECT_NE(out.find("DICT one one True one big zero pair False False\n"), std::string::npos) << out;
    EXPECT_NE(out.find("KEYS [1, 9223372036854775808, 0, (1, 2), 'x'] uno\n"), std::string::npos) << out;
    EXPECT_NE(out.find("LIST 1 True 1 True True True True False False False\n"), std::string::npos) << out;
    EXPECT_NE(out.find("REMOVED [1, b'x']\n"), std::string::npos) << out;
}

// The preamble of a client that prints what each call gives: `show(name, f)` prints
// "name -> ascii(f())", or "name -> ExceptionType: message".
#define PY_SHOW                                                                            \
    "def show(name, f):\n"                                                                \
    "    try: r = ascii(f())\n"                                                           \
    "    except Exception as e: r = '%s: %s' % (type(e).__name__, e)\n"                   \
    "    print(name, '->', r)\n"

// list.sort() uses Python's <: an int against a float by exact value (it compared doubles, and
// 2**53 + 1 became 2.0**53), tuples and lists from their first items that differ by == (it
// compared every item with <, so (1, None) against (1, None) was a TypeError), bytes against
// bytearray by content and sets by inclusion (both were TypeErrors). The expected lines are
// python3's own list.sort().
TEST_F(ManagerForPython, ListSortOrdersAsPythonsLessThan) {
    constexpr const char* code = PY_CONNECT PY_SHOW R"PY(
cases = [[2**53 + 1, float(2**53)], [float(2**53), 2**53 + 1], [2**63 - 1, float(2**63 - 1)],
         [2**64 - 1, 2.0**64, 1.5, -2.0**63 - 2**11, -2**63, float('inf'), 0.5, True, 2**63 + 0.0],
         [(1, None), (1, None)], [[1, {}], [1, {}]], [(2, 'x'), (1, None), (1, None)], [(1, 2), (1,), (1, 2.5)],
         [b'b', bytearray(b'a'), b'ab'], [{1, 2}, {1}, frozenset()], [[1, {}], [1, {1: 2}]], [(1, None), (2, None)]]
for i, c in enumerate(cases):
    l = m.list(c)
    show('SORT%d' % i, lambda: (l.sort(), l._getvalue())[1])
l = m.list([1.5, 2**53 + 1, float(2**53)])
show('REVERSE', lambda: (l.sort(reverse=True), l._getvalue())[1])
)PY";
    std::string out = run_client(code, manager.address(), "pykey");
    for (const char* line :
         {"SORT0 -> [9007199254740992.0, 9007199254740993]\n", "SORT1 -> [9007199254740992.0, 9007199254740993]\n",
          "SORT2 -> [9223372036854775807, 9.223372036854776e+18]\n",
          "SORT3 -> [-9.223372036854778e+18, -9223372036854775808, 0.5, True, 1.5, 9.223372036854776e+18, "
          "18446744073709551615, 1.8446744073709552e+19, inf]\n",
          "SORT4 -> [(1, None), (1, None)]\n", "SORT5 -> [[1, {}], [1, {}]]\n",
          "SORT6 -> [(1, None), (1, None), (2, 'x')]\n", "SORT7 -> [(1,), (1, 2), (1, 2.5)]\n",
          "SORT8 -> [bytearray(b'a'), b'ab', b'b']\n", "SORT9 -> [frozenset(), {1}, {1, 2}]\n",
          "SORT10 -> TypeError: '<' not supported between instances of 'dict' and 'dict'\n",
          "SORT11 -> [(1, None), (2, None)]\n",
          "REVERSE -> [9007199254740993, 9007199254740992.0, 1.5]\n"})
        EXPECT_NE(out.find(line), std::string::npos) << "missing " << line << "in:\n" << out;
}

// list.extend() and list() take every iterable Python's do that mp's values hold: a str gives its
// characters, bytes and bytearray their ints, a dict its keys (a str or bytes was a TypeError).
TEST_F(ManagerForPython, ListExtendTakesEveryIterableAsPython) {
    constexpr const char* code = PY_CONNECT PY_SHOW R"PY(
l = m.list([1])
for x in ('ab', '\xe9\u20ac\U0001f600', b'\x00\xff', bytearray(b'A'), (2,), [3], {4}, frozenset({5}), {6: 'six'}, '', 7):
    show('EXTEND', lambda: (l.extend(x), l._getvalue())[1])
show('LIST', lambda: m.list('xy')._getvalue())
)PY";
    std::string out = run_client(code, manager.address(), "pykey");
    EXPECT_NE(out.find("EXTEND -> [1, 'a', 'b', '\\xe9', '\\u20ac', '\\U0001f600', 0, 255, 65, 2, 3, 4, 5, 6]\n"),
              std::string::npos)
        << out;
    EXPECT_NE(out.find("EXTEND -> TypeError: 'int' object is not iterable\n"), std::string::npos) << out;
    EXPECT_NE(out.find("LIST -> ['x', 'y']\n"), std::string::npos) << out;
}

// A list, dict, set or bytearray as a dict key is Python's TypeError "unhashable type", in a
// small dict too (libstdc++'s map looked one up with == alone: a KeyError, or None from get()).
// dict.pop of an empty dict does not hash the key, in Python either.
TEST_F(ManagerForPython, AnUnhashableDictKeyIsATypeError) {
    constexpr const char* code = PY_CONNECT PY_SHOW R"PY(
d = m.dict({1: 'one'})
for k in ([1], {}, {1}, bytearray(b'x'), (1, [2])):
    show('GET', lambda: d[k]); show('GETD', lambda: d.get(k, 0)); show('IN', lambda: k in d)
    show('SET', lambda: d.__setitem__(k, 2)); show('DEL', lambda: d.__delitem__(k))
    show('POP', lambda: d.pop(k, 0)); show('SETDEFAULT', lambda: d.setdefault(k, 3))
show('UPDATE', lambda: d.update([([1], 2)]))
e = m.dict()
show('EMPTYPOP', lambda: e.pop([1])); show('EMPTYPOPD', lambda: e.pop([1], 4)); show('EMPTYGET', lambda: e.get([1]))
show('AFTER', lambda: d.copy())
)PY";
    std::string out = run_client(code, manager.address(), "pykey");
    for (const char* call : {"GET", "GETD", "IN", "SET", "DEL", "POP", "SETDEFAULT"}) {
        std::size_t at = 0;
        for (const char* type : {"list", "dict", "set", "bytearray", "list"}) {
            const std::string line = std::string(call) + " -> TypeError: unhashable type: '" + type + "'\n";
            at = out.find(line, at);
            ASSERT_NE(at, std::string::npos) << "missing " << line << "in:\n" << out;
            ++at;
        }
    }
    for (const char* line : {"UPDATE -> TypeError: unhashable type: 'list'\n", "EMPTYPOP -> KeyError: [1]\n",
                             "EMPTYPOPD -> 4\n", "EMPTYGET -> TypeError: unhashable type: 'list'\n",
                             "AFTER -> {1: 'one'}\n"})
        EXPECT_NE(out.find(line), std::string::npos) << "missing " << line << "in:\n" << out;
}

// A negative Lock or RLock timeout other than -1 is threading's ValueError (it was taken as "no
// timeout" and waited for good); -1, and what rounds to it in nanoseconds, is no timeout.
TEST_F(ManagerForPython, ANegativeLockTimeoutIsAValueErrorAsInPython) {
    constexpr const char* code = PY_CONNECT PY_SHOW R"PY(
for name, lk in (('LOCK', m.Lock()), ('RLOCK', m.RLock())):
    show(name, lambda: lk.acquire(timeout=-5)); show(name, lambda: lk.acquire(True, -2))
    show(name, lambda: lk.acquire(True, -1e-10)); show(name, lambda: lk.acquire(False, -5))
    show(name, lambda: lk.acquire(True, -1)); show(name, lambda: lk.release())
    show(name, lambda: lk.acquire(True, -0.9999999999)); show(name, lambda: lk.release())
    show(name, lambda: lk.acquire(False, -1)); show(name, lambda: lk.release())
)PY";
    std::string out = run_client(code, manager.address(), "pykey");
    const std::string positive = " -> ValueError: timeout value must be positive\n";
    EXPECT_NE(out.find("LOCK" + positive + "LOCK" + positive + "LOCK" + positive +
                       "LOCK -> ValueError: can't specify a timeout for a non-blocking call\n"
                       "LOCK -> True\nLOCK -> None\nLOCK -> True\nLOCK -> None\nLOCK -> True\nLOCK -> None\n"),
              std::string::npos)
        << out;
    EXPECT_NE(out.find("RLOCK" + positive + "RLOCK" + positive + "RLOCK" + positive +
                       "RLOCK -> ValueError: can't specify a timeout for a non-blocking call\n"
                       "RLOCK -> True\nRLOCK -> None\nRLOCK -> True\nRLOCK -> None\nRLOCK -> True\nRLOCK -> None\n"),
              std::string::npos)
        << out;
}

// list.sort() and dict.update() refuse what Python 3.11's refuse, with its messages: an unknown
// keyword or a positional argument to sort (ignored), an update sequence whose items are not
// pairs (its messages differed), more than one argument to update (ignored).
TEST_F(ManagerForPython, SortAndUpdateRefuseWrongArgumentsAsPython) {
    constexpr const char* code = PY_CONNECT PY_SHOW R"PY(
l = m.list([2, 1])
show('SORT', lambda: l.sort(nope=1)); show('SORT', lambda: l.sort(None))
show('SORT', lambda: l.sort(key=None, reverse=True, nope=2))
show('SORTED', lambda: (l.sort(key=None, reverse=False), l._getvalue())[1])
d = m.dict()
show('UPDATE', lambda: d.update([1, 2])); show('UPDATE', lambda: d.update([(1, 2), (3, 4, 5)]))
show('UPDATE', lambda: d.update({}, {})); show('UPDATE', lambda: d.update(5))
show('UPDATED', lambda: (d.update(['ab', b'cd', {5: 0, 6: 0}, [7, 8]]), d.copy())[1])
show('DICT', lambda: m.dict([1]))
)PY";
    std::string out = run_client(code, manager.address(), "pykey");
    for (const char* line : {"SORT -> TypeError: 'nope' is an invalid keyword argument for sort()\n",
                             "SORT -> TypeError: sort() takes no positional arguments\n",
                             "SORT -> TypeError: sort() takes at most 2 keyword arguments (3 given)\n",
                             "SORTED -> [1, 2]\n",
                             "UPDATE -> TypeError: cannot convert dictionary update sequence element #0 to a sequence\n",
                             "UPDATE -> ValueError: dictionary update sequence element #1 has length 3; 2 is required\n",
                             "UPDATE -> TypeError: update expected at most 1 argument, got 2\n",
                             "UPDATE -> TypeError: 'int' object is not iterable\n",
                             "UPDATED -> {1: 2, 'a': 'b', 99: 100, 5: 6, 7: 8}\n"})
        EXPECT_NE(out.find(line), std::string::npos) << "missing " << line << "in:\n" << out;
    // dict() of the same: the server's create() fails, which Python's client raises as RemoteError.
    const std::size_t create = out.find("DICT -> RemoteError: ");
    ASSERT_NE(create, std::string::npos) << out;
    EXPECT_NE(out.find("TypeError: cannot convert dictionary update sequence element #0 to a sequence\n", create),
              std::string::npos)
        << out;
}

namespace {

// Runs `code`, a Python client of an mp manager at the Unix path argv[1], until it prints
// `objects`, kills it (SIGKILL), and expects the server to drop every object it held: at once
// the server has seen the process end (a bounded wait).
void expect_a_killed_client_leaves_no_object(const char* code, const std::string& objects) {
    mp::test::TempDir dir;
    mp::SyncManager manager(mp::Address(dir.path + "/m.sock"), "pykey");
    manager.start();
    PythonProcess p(code, {manager.address().path});
    ASSERT_EQ(p.read_line("OBJECTS "), objects);
    std::this_thread::sleep_for(200ms);  // let it reach the call it is killed in
    p.kill();
    mp::PyManagerClient c(manager.address(), "pykey");
    auto until = std::chrono::steady_clock::now() + 10s;
    while (c.number_of_objects() != 0 && std::chrono::steady_clock::now() < until)
        std::this_thread::sleep_for(20ms);
    EXPECT_EQ(c.number_of_objects(), 0);
}

}  // namespace

TEST(ManagerForPythonUnix, AKilledPythonClientsReferencesAreDropped) {
    expect_a_killed_client_leaves_no_object(R"PY(
import sys
from multiprocessing.managers import SyncManager
m = SyncManager(address=sys.argv[1], authkey=b'pykey'); m.connect()
d, l, q = m.dict({'a': 1}), m.list([1]), m.Queue()
print('OBJECTS', m._number_of_objects(), flush=True)
q.get()    # blocks until killed
)PY", "OBJECTS 3");
}

// A client that only made proxies (create and incref come on connections of their own, which
// close at once) and was killed before any method call: its references are dropped too. They were
// dropped only when a method-call connection closed, so these objects stayed for good.
TEST(ManagerForPythonUnix, AKilledClientThatNeverCalledAMethodHasItsReferencesDropped) {
    expect_a_killed_client_leaves_no_object(R"PY(
import sys, time
from multiprocessing.managers import SyncManager
m = SyncManager(address=sys.argv[1], authkey=b'pykey'); m.connect()
ds = [m.dict() for _ in range(5)]
print('OBJECTS', m._number_of_objects(), flush=True)
time.sleep(60)    # killed here
)PY", "OBJECTS 5");
}

// ---- mp's client, Python's server ----------------------------------------------------------------

namespace {

constexpr const char* kPythonServer = R"PY(
import sys, datetime
from multiprocessing.managers import SyncManager, DictProxy
odd = {'when': datetime.date(2020, 1, 2)}
class AppError(Exception): pass
class Raiser:
    def missing(self): raise FileNotFoundError(2, 'no such thing')
    def missing_file(self): raise FileNotFoundError(2, 'no such thing', 'f.txt')
    def app(self): raise AppError('the job failed', 3)
    def app_with_state(self):
        e = AppError('with state')
        e.code = 5
        raise e
    def bare(self): raise AppError()
    def odd(self): return datetime.date(2020, 1, 2)
class M(SyncManager): pass
M.register('get_odd', callable=lambda: odd, proxytype=DictProxy)
M.register('Raiser', callable=Raiser, exposed=['missing', 'missing_file', 'app', 'app_with_state', 'bare', 'odd'])
m = M(address=('127.0.0.1', 0), authkey=b'pykey')
s = m.get_server()
print('PORT', s.address[1], flush=True)
s.serve_forever()
)PY";

class PythonServer : public ::testing::Test {
protected:
    void SetUp() override {
        std::string line = server.read_line("PORT ");
        ASSERT_FALSE(line.empty()) << "the Python server did not start";
        address = mp::Address("127.0.0.1", static_cast<std::uint16_t>(std::stoi(line.substr(5))));
    }
    void TearDown() override {
        try {
            mp::PyManagerClient(address, "pykey").shutdown();
        } catch (...) {
        }
        bool ok = false;
        std::string out = server.finish(ok, 10s);
        EXPECT_TRUE(ok) << "the Python server did not exit cleanly:\n" << out;
    }
    PythonProcess server{kPythonServer};
    mp::Address address;
};

template <class F>
mp::RemoteError remote_error(F f) {
    try {
        f();
    } catch (const mp::RemoteError& e) {
        return e;
    }
    ADD_FAILURE() << "no RemoteError";
    return mp::RemoteError("", "", "");
}

}  // namespace

// What a Python method raises reaches C++ as RemoteError with Python's class name and str(): an
// OSError's "[Errno N] strerror: 'filename'", and an exception of the server program's own class
// (pickled as its global, which mp reads as a name only, imports nothing, and drops its
// attributes). Such a class was refused as an unreadable reply (py::UnpicklingError, message
// lost), and an OSError's message was the repr of its args. A *result* of a non-plain type stays
// refused.
TEST_F(PythonServer, ExceptionsOfAnyClassArriveAsRemoteErrorWithPythonsStr) {
    mp::PyManagerClient m(address, "pykey");
    mp::PyProxy r = m.create("Raiser");
    const std::vector<std::tuple<const char*, std::string, std::string>> cases = {
        {"missing", "FileNotFoundError", "[Errno 2] no such thing"},
        {"missing_file", "FileNotFoundError", "[Errno 2] no such thing: 'f.txt'"},
        {"app", "__main__.AppError", "('the job failed', 3)"},
        {"app_with_state", "__main__.AppError", "with state"},
        {"bare", "__main__.AppError", ""},
    };
    for (const auto& c : cases) {
        const char* method = std::get<0>(c);  // not a structured binding: clang 14 cannot capture one
        SCOPED_TRACE(method);
        mp::RemoteError e = remote_error([&] { r.call(method); });
        EXPECT_EQ(e.type_name(), std::get<1>(c));
        EXPECT_EQ(e.message(), std::get<2>(c));
    }
    try {
        r.call("odd");
        ADD_FAILURE() << "a datetime result was accepted";
    } catch (const py::UnpicklingError& e) {
        EXPECT_NE(std::string(e.what()).find("datetime"), std::string::npos) << e.what();
    }
    EXPECT_EQ(remote_error([&] { r.call("missing"); }).type_name(), "FileNotFoundError");  // still serving
}

TEST_F(PythonServer, CppClientUsesDictListAndNamespace) {
    mp::PyManagerClient m(address, "pykey");
    {
        mp::PyProxy d = m.create("dict", {}, {{"a", 1}});
        d.call("__setitem__", {"b", py::Object::list({1, "x"})});
        EXPECT_EQ(d.call("__getitem__", {"a"}).as<int>(), 1);
        EXPECT_EQ((d.call("__getitem__", {"b"}).as<std::tuple<int, std::string>>()), std::make_tuple(1, "x"));
        EXPECT_EQ(d.call("__len__").as<int>(), 2);
        EXPECT_TRUE(d.call("__contains__", {"a"}).as<bool>());
        EXPECT_EQ(d.call("get", {"zz", 7}).as<int>(), 7);
        mp::RemoteError e = remote_error([&] { d.call("__getitem__", {"zz"}); });
        EXPECT_EQ(e.type_name(), "KeyError");
        EXPECT_EQ(e.message(), "'zz'");
        EXPECT_NE(e.origin().find("Python manager at 127.0.0.1:"), std::string::npos);
        EXPECT_EQ(d.call("copy").repr(), "{'a': 1, 'b': [1, 'x']}");
        // Python's server sends the views as builtins.list(...) (multiprocessing's reducer).
        EXPECT_EQ(d.call("keys").as<std::vector<std::string>>(), (std::vector<std::string>{"a", "b"}));
        EXPECT_EQ(d.call("values").repr(), "[1, [1, 'x']]");
        EXPECT_EQ(d.call("items").repr(), "[('a', 1), ('b', [1, 'x'])]");

        mp::PyProxy l = m.create("list", {py::Object::list({3, 1})});
        l.call("append", {2});
        l.call("sort");
        EXPECT_EQ(l.call("__getitem__", {-1}).as<int>(), 3);
        EXPECT_EQ(l.call("pop", {0}).as<int>(), 1);
        EXPECT_EQ(remote_error([&] { l.call("__getitem__", {10}); }).type_name(), "IndexError");

        mp::PyProxy ns = m.create("Namespace", {}, {{"x", 1}});
        ns.call("__setattr__", {"y", "why"});
        EXPECT_EQ(ns.call("__getattribute__", {"y"}).as<std::string>(), "why");
        EXPECT_EQ(remote_error([&] { ns.call("__getattribute__", {"nope"}); }).type_name(), "AttributeError");
        EXPECT_EQ(m.number_of_objects(), 3);
    }
    // Each proxy's decref went out with it.
    EXPECT_EQ(m.number_of_objects(), 0);
}

TEST_F(PythonServer, CppClientUsesQueueLockEventAndValue) {
    mp::PyManagerClient m(address, "pykey");
    {
        mp::PyProxy q = m.create("Queue");
        q.call("put", {py::Object::dict({{"job", 3}})});
        EXPECT_EQ(q.call("qsize").as<int>(), 1);
        EXPECT_EQ((q.call("get", {true}, {{"timeout", 5.0}}).as<std::map<std::string, int>>()),
                  (std::map<std::string, int>{{"job", 3}}));
        EXPECT_EQ(remote_error([&] { q.call("get_nowait"); }).type_name(), "queue.Empty");

        mp::PyProxy lk = m.create("Lock");
        EXPECT_TRUE(lk.call("acquire").as<bool>());
        EXPECT_FALSE(lk.call("acquire", {false}).as<bool>());
        lk.call("release");
        mp::RemoteError e = remote_error([&] { lk.call("release"); });
        EXPECT_EQ(e.type_name(), "RuntimeError");
        EXPECT_EQ(e.message(), "release unlocked lock");

        mp::PyProxy ev = m.create("Event");
        EXPECT_FALSE(ev.call("wait", {0.01}).as<bool>());
        ev.call("set");
        EXPECT_TRUE(ev.call("is_set").as<bool>());

        mp::PyProxy v = m.create("Value", {"i", 5});
        v.call("set", {7});
        EXPECT_EQ(v.call("get").as<int>(), 7);
    }
    EXPECT_EQ(m.number_of_objects(), 0);
}

TEST_F(PythonServer, CppClientRefusesNonPlainRepliesAndSeesPythonsErrors) {
    mp::PyManagerClient m(address, "pykey");
    mp::PyProxy odd = m.create("get_odd");
    try {
        odd.call("__getitem__", {"when"});
        ADD_FAILURE() << "a datetime.date was read";
    } catch (const py::UnpicklingError& e) {
        EXPECT_NE(std::string(e.what()).find("datetime.date refused"), std::string::npos) << e.what();
    }
    // The connection is still in step after the refusal.
    EXPECT_EQ(odd.call("__len__").as<int>(), 1);
    // A method the proxy type does not expose, an unknown typeid.
    EXPECT_EQ(remote_error([&] { odd.call("nonesuch"); }).type_name(), "Traceback");
    mp::RemoteError e = remote_error([&] { m.create("NoSuchType"); });
    EXPECT_EQ(e.type_name(), "Traceback");
    EXPECT_NE(e.message().find("NoSuchType"), std::string::npos) << e.message();
    EXPECT_THROW(mp::PyManagerClient(address, "wrong"), mp::AuthenticationError);
}

TEST(ManagerBothWays, CppAndPythonShareAQueueOfAnMpManager) {
    mp::BaseManager srv(mp::Address("127.0.0.1", 0), "k");
    srv.register_shared("get_tasks", "Queue");
    srv.register_shared("get_results", "Queue");
    srv.start();
    constexpr const char* code = PY_CONNECT R"PY(
class M(BaseManager): pass
M.register('get_tasks'); M.register('get_results')
mm = M(address=address, authkey=key); mm.connect()
tasks, results = mm.get_tasks(), mm.get_results()
for i in range(3):
    tasks.put({'n': i})
print('SUM', sum(results.get(timeout=10) for _ in range(3)))
)PY";
    PythonProcess p(code, {srv.address().host, std::to_string(srv.address().port), "k"});
    mp::PyManagerClient c(srv.address(), "k");
    mp::PyProxy tasks = c.create("get_tasks"), results = c.create("get_results");
    for (int i = 0; i < 3; ++i) {
        auto job = tasks.call("get", {true, 10.0}).as<std::map<std::string, int>>();
        results.call("put", {job.at("n") * 10});
    }
    bool ok = false;
    std::string out = p.finish(ok);
    EXPECT_TRUE(ok) << out;
    EXPECT_NE(out.find("SUM 30\n"), std::string::npos) << out;
}
