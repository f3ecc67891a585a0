// mp::py: the pickle reader and writer (include/mp/py.hpp).
// One file because the Object model, the reader and the writer share the opcode names and the
// helpers below, and the reader's limits only make sense next to the Object they protect.
//
// The reader is the data subset of Python's unpickling machine (Lib/pickle.py's _Unpickler, whose
// opcodes pickletools.py documents): a stack, a stack of MARK positions, and a memo. It never
// imports or calls: the globals Python writes for plain data at protocols 2 and 3 are recognised
// by name and rebuilt, every other global is refused before anything else happens.
//
// Containers are shared nodes, so the memo can hand out the same list twice as Python does. Two
// consequences are handled here rather than left to the user of the Object: a pickle may build a
// list that contains itself (a cycle of shared_ptrs, which would leak and recurse for ever), and a
// pickle of lists referencing lists can describe a value exponentially larger than itself. While no
// container has been fetched twice (the memo GET or DUP of a container), the value is a tree whose
// depth is tracked as it is built; once one has, a pass over the result at the end checks for
// cycles, depth and expanded size. On every error, and for garbage left in the memo, the nodes are
// emptied one by one before they are released, so no cycle survives and no destructor recurses deeply.

#include <mp/py.hpp>

#include "py_internal.hpp"

#include <algorithm>
#include <bit>
#include <charconv>
#include <chrono>
#include <cmath>
#include <cstring>
#include <stdexcept>
#include <sys/random.h>

namespace mp::py {

namespace {

enum : unsigned char {
    MARK = '(', STOP = '.', POP = '0', POP_MARK = '1', DUP = '2', FLOAT = 'F', INT = 'I', BININT = 'J',
    BININT1 = 'K', LONG = 'L', BININT2 = 'M', NONE = 'N', PERSID = 'P', BINPERSID = 'Q', REDUCE = 'R',
    STRING = 'S', BINSTRING = 'T', SHORT_BINSTRING = 'U', UNICODE = 'V', BINUNICODE = 'X', APPEND = 'a',
    BUILD = 'b', GLOBAL = 'c', DICT = 'd', EMPTY_DICT = '}', APPENDS = 'e', GET = 'g', BINGET = 'h',
    INST = 'i', LONG_BINGET = 'j', LIST = 'l', EMPTY_LIST = ']', OBJ = 'o', PUT = 'p', BINPUT = 'q',
    LONG_BINPUT = 'r', SETITEM = 's', TUPLE = 't', EMPTY_TUPLE = ')', SETITEMS = 'u', BINFLOAT = 'G',
    PROTO = 0x80, NEWOBJ = 0x81, EXT1 = 0x82, EXT2 = 0x83, EXT4 = 0x84, TUPLE1 = 0x85, TUPLE2 = 0x86,
    TUPLE3 = 0x87, NEWTRUE = 0x88, NEWFALSE = 0x89, LONG1 = 0x8a, LONG4 = 0x8b, BINBYTES = 'B',
    SHORT_BINBYTES = 'C', SHORT_BINUNICODE = 0x8c, BINUNICODE8 = 0x8d, BINBYTES8 = 0x8e, EMPTY_SET = 0x8f,
    ADDITEMS = 0x90, FROZENSET = 0x91, NEWOBJ_EX = 0x92, STACK_GLOBAL = 0x93, MEMOIZE = 0x94, FRAME = 0x95,
    BYTEARRAY8 = 0x96, NEXT_BUFFER = 0x97, READONLY_BUFFER = 0x98,
};

const char* op_name(unsigned char c) {
    switch (c) {
        case PERSID: return "PERSID";
        case BINPERSID: return "BINPERSID";
        case REDUCE: return "REDUCE";
        case BUILD: return "BUILD";
        case GLOBAL: return "GLOBAL";
        case STACK_GLOBAL: return "STACK_GLOBAL";
        case INST: return "INST";
        case OBJ: return "OBJ";
        case NEWOBJ: return "NEWOBJ";
        case NEWOBJ_EX: return "NEWOBJ_EX";
        case EXT1: return "EXT1";
        case EXT2: return "EXT2";
        case EXT4: return "EXT4";
        case NEXT_BUFFER: return "NEXT_BUFFER";
        case READONLY_BUFFER: return "READONLY_BUFFER";
        case INT: return "INT";
        case LONG: return "LONG";
        case FLOAT: return "FLOAT";
        case STRING: return "STRING";
        case BINSTRING: return "BINSTRING";
        case SHORT_BINSTRING: return "SHORT_BINSTRING";
        case UNICODE: return "UNICODE";
        case GET: return "GET";
        case PUT: return "PUT";
        default: return "?";
    }
}

}  // namespace

// UTF-8 as CPython writes str: surrogates (U+D800..DFFF) are allowed, since Python encodes and
// decodes pickled str with "surrogatepass"; overlong forms and values past U+10FFFF are not.
bool detail::valid_utf8(std::string_view s) noexcept {
    const auto* p = reinterpret_cast<const unsigned char*>(s.data());
    const auto* end = p + s.size();
    while (p < end) {
        unsigned char c = *p;
        if (c < 0x80) {
            ++p;
            continue;
        }
        int n;
        unsigned char lo = 0x80, hi = 0xbf;
        if (c >= 0xc2 && c <= 0xdf) {
            n = 1;
        } else if (c >= 0xe0 && c <= 0xef) {
            n = 2;
            if (c == 0xe0) lo = 0xa0;
        } else if (c >= 0xf0 && c <= 0xf4) {
            n = 3;
            if (c == 0xf0) lo = 0x90;
            if (c == 0xf4) hi = 0x8f;
        } else {
            return false;
        }
        if (end - p <= n) return false;
        if (p[1] < lo || p[1] > hi) return false;
        for (int i = 2; i <= n; ++i)
            if ((p[i] & 0xc0) != 0x80) return false;
        p += n + 1;
    }
    return true;
}

namespace {
using detail::valid_utf8;
using detail::ExceptionClasses;

// Room for `more` items after those in `v`, growing geometrically: CPython writes a list, dict
// or set in batches of 1000 (MARK items APPENDS), and a reserve of exactly size() + batch would
// move the whole container once per batch (quadratic: a list of 800,000 ints took seconds).
template <class Vector>
void reserve_more(Vector& v, std::size_t more) {
    if (more > v.capacity() - v.size()) v.reserve(std::max(v.size() + more, 2 * v.capacity()));
}

// The latin-1 bytes of a str whose code points are all below 256 (Python's protocol 2 writes bytes
// as _codecs.encode(str, 'latin1')).
bool latin1_of(std::string_view s, std::string& out) {
    out.clear();
    out.reserve(s.size());
    for (std::size_t i = 0; i < s.size(); ++i) {
        auto c = static_cast<unsigned char>(s[i]);
        if (c < 0x80) {
            out.push_back(static_cast<char>(c));
        } else if ((c == 0xc2 || c == 0xc3) && i + 1 < s.size()) {
            out.push_back(static_cast<char>(((c & 0x1f) << 6) | (static_cast<unsigned char>(s[i + 1]) & 0x3f)));
            ++i;
        } else {
            return false;
        }
    }
    return true;
}

void append_repr(const Object& o, std::string& out, std::size_t limit);

void append_quoted(std::string_view s, std::string& out, bool bytes) {
    static constexpr char hex[] = "0123456789abcdef";
    const char quote = (s.find('\'') != std::string_view::npos && s.find('"') == std::string_view::npos) ? '"' : '\'';
    out.push_back(quote);
    for (char ch : s) {
        auto c = static_cast<unsigned char>(ch);
        if (c == '\\' || c == static_cast<unsigned char>(quote)) {
            out.push_back('\\');
            out.push_back(ch);
        } else if (c == '\n') {
            out += "\\n";
        } else if (c == '\r') {
            out += "\\r";
        } else if (c == '\t') {
            out += "\\t";
        } else if (c < 0x20 || c == 0x7f || (bytes && c >= 0x80)) {
            out += "\\x";
            out.push_back(hex[c >> 4]);
            out.push_back(hex[c & 15]);
        } else {
            out.push_back(ch);
        }
    }
    out.push_back(quote);
}

void append_items(const Items& items, std::string& out, std::size_t limit) {
    bool first = true;
    for (const Object& e : items) {
        if (out.size() > limit) return;
        if (!first) out += ", ";
        first = false;
        append_repr(e, out, limit);
    }
}

void append_repr(const Object& o, std::string& out, std::size_t limit) {
    if (out.size() > limit) return;
    o.visit([&](const auto& v) {
        using V = std::decay_t<decltype(v)>;
        if constexpr (std::is_same_v<V, None>) {
            out += "None";
        } else if constexpr (std::is_same_v<V, bool>) {
            out += v ? "True" : "False";
        } else if constexpr (std::is_same_v<V, std::int64_t> || std::is_same_v<V, std::uint64_t>) {
            out += std::to_string(v);
        } else if constexpr (std::is_same_v<V, double>) {
            if (std::isnan(v)) {
                out += "nan";
            } else if (std::isinf(v)) {
                out += v > 0 ? "inf" : "-inf";
            } else {
                char buf[64];
                auto r = std::to_chars(buf, buf + sizeof buf, v);
                std::string_view s(buf, static_cast<std::size_t>(r.ptr - buf));
                out += s;
                if (s.find_first_of(".e") == std::string_view::npos) out += ".0";
            }
        } else if constexpr (std::is_same_v<V, std::string>) {
            append_quoted(v, out, false);
        } else if constexpr (std::is_same_v<V, Bytes>) {
            out.push_back('b');
            append_quoted(v.data, out, true);
        } else if constexpr (std::is_same_v<V, ByteArray>) {
            out += "bytearray(b";
            append_quoted(v.data, out, true);
            out.push_back(')');
        } else if constexpr (std::is_same_v<V, Tuple>) {
            out.push_back('(');
            append_items(v, out, limit);
            if (v.size() == 1) out.push_back(',');
            out.push_back(')');
        } else if constexpr (std::is_same_v<V, List>) {
            out.push_back('[');
            append_items(v, out, limit);
            out.push_back(']');
        } else if constexpr (std::is_same_v<V, Set> || std::is_same_v<V, FrozenSet>) {
            const bool frozen = std::is_same_v<V, FrozenSet>;
            if (v.empty()) {
                out += frozen ? "frozenset()" : "set()";
                return;
            }
            if (frozen) out += "frozenset(";
            out.push_back('{');
            append_items(v, out, limit);
            out.push_back('}');
            if (frozen) out.push_back(')');
        } else {
            out.push_back('{');
            bool first = true;
            for (const auto& [key, value] : v) {
                if (out.size() > limit) break;
                if (!first) out += ", ";
                first = false;
                append_repr(key, out, limit);
                out += ": ";
                append_repr(value, out, limit);
            }
            out.push_back('}');
        }
    });
}

std::string short_repr(const Object& o) {
    std::string out;
    append_repr(o, out, 80);
    if (out.size() > 80) {
        out.resize(77);
        out += "...";
    }
    return out;
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// Object
// ---------------------------------------------------------------------------------------------

namespace {
Object make_container(Kind kind, std::vector<Object> items, std::vector<std::pair<Object, Object>> pairs);
}

Object Object::tuple(std::vector<Object> items) { return make_container(Kind::tuple, std::move(items), {}); }
Object Object::list(std::vector<Object> items) { return make_container(Kind::list, std::move(items), {}); }
Object Object::set(std::vector<Object> items) { return make_container(Kind::set, std::move(items), {}); }
Object Object::frozenset(std::vector<Object> items) {
    return make_container(Kind::frozenset, std::move(items), {});
}
Object Object::dict(std::vector<std::pair<Object, Object>> pairs) {
    return make_container(Kind::dict, {}, std::move(pairs));
}

Object::Kind Object::kind() const noexcept {
    switch (v_.index()) {
        case 0: return Kind::none;
        case 1: return Kind::boolean;
        case 2:
        case 3: return Kind::integer;
        case 4: return Kind::floating;
        case 5: return Kind::str;
        case 6: return Kind::bytes;
        case 7: return Kind::bytearray;
        default: return std::get<Container>(v_).kind;
    }
}

const char* Object::type_name() const noexcept {
    switch (kind()) {
        case Kind::none: return "NoneType";
        case Kind::boolean: return "bool";
        case Kind::integer: return "int";
        case Kind::floating: return "float";
        case Kind::str: return "str";
        case Kind::bytes: return "bytes";
        case Kind::bytearray: return "bytearray";
        case Kind::tuple: return "tuple";
        case Kind::list: return "list";
        case Kind::dict: return "dict";
        case Kind::set: return "set";
        case Kind::frozenset: return "frozenset";
    }
    return "?";
}

Items Object::items() const {
    const auto* c = std::get_if<Container>(&v_);
    if (c == nullptr || c->kind == Kind::dict) detail::wrong_kind(*this, "tuple, list, set or frozenset");
    return Items(c->node);
}

DictItems Object::dict() const {
    const auto* c = std::get_if<Container>(&v_);
    if (c == nullptr || c->kind != Kind::dict) detail::wrong_kind(*this, "dict");
    return DictItems(c->node);
}

bool operator==(const Object& a, const Object& b) {
    if (a.v_.index() != b.v_.index()) return false;
    return std::visit(
        [&](const auto& x) {
            using X = std::decay_t<decltype(x)>;
            const X& y = std::get<X>(b.v_);
            if constexpr (std::is_same_v<X, Object::Container>) {
                if (x.kind != y.kind) return false;
                if (x.node == y.node) return true;
                return x.node->items == y.node->items && x.node->pairs == y.node->pairs;
            } else {
                return x == y;
            }
        },
        a.v_);
}

std::string Object::repr() const {
    std::string out;
    append_repr(*this, out, std::numeric_limits<std::size_t>::max());
    return out;
}

const Object& Items::operator[](std::size_t i) const {
    if (i >= size()) throw std::out_of_range("mp::py::Items: index " + std::to_string(i) + " of " + std::to_string(size()));
    return node_->items[i];
}

const Object* DictItems::find(std::string_view key) const noexcept {
    if (!node_) return nullptr;
    for (auto it = node_->pairs.rbegin(); it != node_->pairs.rend(); ++it) {
        const Object& k = it->first;
        bool match = false;
        k.visit([&](const auto& v) {
            if constexpr (std::is_same_v<std::decay_t<decltype(v)>, std::string>) match = (v == key);
        });
        if (match) return &it->second;
    }
    return nullptr;
}

const Object* DictItems::find(const Object& key) const noexcept {
    if (!node_) return nullptr;
    for (auto it = node_->pairs.rbegin(); it != node_->pairs.rend(); ++it)
        if (it->first == key) return &it->second;
    return nullptr;
}

namespace detail {

void wrong_kind(const Object& o, const char* wanted) {
    throw UnpicklingError(std::string("mp::py: expected a Python ") + wanted + ", got " + o.type_name() + " " +
                          short_repr(o));
}

void wrong_length(const Object& o, std::size_t wanted) {
    throw UnpicklingError("mp::py: expected a " + std::to_string(wanted) + "-item tuple, got " + o.type_name() +
                          " of " + std::to_string(o.items().size()) + " items " + short_repr(o));
}

void out_of_range(const Object& o, const char* type) {
    throw UnpicklingError(std::string("mp::py: the ") + o.type_name() + " " + short_repr(o) + " does not fit " + type);
}

}  // namespace detail


// The reader and the factories share the rules for a new container's depth and hashability.
class Reader {
public:
    static std::shared_ptr<detail::Node> node_of(const Object& o) {
        const auto* c = std::get_if<Object::Container>(&o.v_);
        // Every node is created non-const (make_container, Reader::make), so dropping the
        // const the public Object adds is defined.
        return c ? std::const_pointer_cast<detail::Node>(c->node) : nullptr;
    }
    static Object wrap(Kind kind, std::shared_ptr<detail::Node> node) {
        return Object(Object::Container{kind, std::move(node)});
    }
    // The depth a container reaches when o goes into it.
    static std::uint32_t depth_with(const detail::Node& parent, const Object& o) {
        const auto* c = std::get_if<Object::Container>(&o.v_);
        return c ? std::max(parent.depth, c->node->depth + 1) : parent.depth;
    }
    static bool hashable(const Object& o) {
        const auto* c = std::get_if<Object::Container>(&o.v_);
        if (c == nullptr) return o.kind() != Kind::bytearray;
        return (c->kind == Kind::tuple || c->kind == Kind::frozenset) && c->node->hashable;
    }

    // exceptions: also read the built-in exception classes (exception_classes) called with their
    // arguments, as Python pickles KeyError('x'); each reads as the tuple (class name, args).
    // Only a manager client's reader of '#ERROR' replies asks for this.
    Reader(std::string_view in, const Limits& limits, ExceptionClasses exceptions = ExceptionClasses::none);
    ~Reader();
    Reader(const Reader&) = delete;
    Reader& operator=(const Reader&) = delete;
    Object run();

private:
    struct Slot {
        Object value;
        std::uint8_t global = 0;  // one of the Global values below when this is a recognised global
    };
    // g_exception: an exception class (its name in the slot); g_raised: the (class name, args) an
    // exception class was called with, which BUILD may follow (ExceptionClasses::any).
    enum Global : std::uint8_t { no_global, g_set, g_frozenset, g_bytearray, g_bytes, g_encode, g_list, g_exception, g_raised };

    // The machine's vectors. A thread keeps one set whose capacity (not contents) the next
    // loads() on that thread reuses: allocating them afresh was a third of a small message's cost.
    struct Buffers {
        std::vector<Slot> stack;
        std::vector<std::size_t> marks;
        std::vector<Slot> memo;
        std::vector<std::shared_ptr<detail::Node>> nodes;  // every container made here
        bool busy = false;
    };
    static Buffers& thread_buffers() {
        thread_local Buffers b;
        return b;
    }
    Buffers& pick_buffers() {
        Buffers& b = thread_buffers();
        if (b.busy) return own_;  // cannot happen today (nothing runs user code inside run()), but cheap
        b.busy = true;
        return b;
    }

    [[noreturn, gnu::cold, gnu::noinline]] void fail(const std::string& what) const {
        throw UnpicklingError("mp::py: bad pickle at offset " + std::to_string(op_at_) + ": " + what);
    }
    [[noreturn]] void refuse(unsigned char op) const {
        std::string name = op_name(op);
        if (op == NEXT_BUFFER || op == READONLY_BUFFER)
            fail("opcode " + name + " refused: out-of-band buffers (pickle protocol 5 buffer_callback) are not plain data");
        if (op == INT || op == LONG || op == FLOAT || op == STRING || op == BINSTRING || op == SHORT_BINSTRING ||
            op == UNICODE || op == GET || op == PUT)
            fail("opcode " + name + " (protocol 0 or 1, text form) is not supported: mp reads protocols 2 to 5");
        fail("opcode " + name + " refused: it would import, call or build an object, and mp reads plain data only");
    }

    [[noreturn, gnu::cold, gnu::noinline]] void truncated(std::size_t n) const {
        fail("truncated: " + std::to_string(n) + " bytes wanted, " + std::to_string(in_.size() - pos_) + " left");
    }
    [[noreturn, gnu::cold, gnu::noinline]] void past_end(std::uint64_t n) const {
        fail("a length of " + std::to_string(n) + " runs past the end of the pickle");
    }
    const unsigned char* take(std::size_t n) {
        if (in_.size() - pos_ < n) [[unlikely]] truncated(n);
        const auto* p = reinterpret_cast<const unsigned char*>(in_.data()) + pos_;
        pos_ += n;
        return p;
    }
    std::uint64_t le(std::size_t n) {
        const unsigned char* p = take(n);
        std::uint64_t v = 0;
        for (std::size_t i = n; i-- > 0;) v = (v << 8) | p[i];
        return v;
    }
    std::size_t length(std::size_t width) {
        std::uint64_t n = le(width);
        if (n > in_.size() - pos_) [[unlikely]] past_end(n);
        return static_cast<std::size_t>(n);
    }
    std::string_view bytes_of(std::size_t n) { return {reinterpret_cast<const char*>(take(n)), n}; }

    std::size_t base() const { return marks_.empty() ? 0 : marks_.back(); }
    void push(Object o) { stack_.push_back(Slot{std::move(o), no_global}); }
    Slot pop_slot() {
        if (stack_.size() <= base()) fail("stack underflow");
        Slot s = std::move(stack_.back());
        stack_.pop_back();
        return s;
    }
    // A slot that holds a value: not a global (an exception's call is a value, a tuple).
    static bool is_value(const Slot& s) noexcept { return s.global == no_global || s.global == g_raised; }
    Object pop() {
        Slot s = pop_slot();
        if (!is_value(s)) fail("a global used as a value");
        return std::move(s.value);
    }
    Slot& top() {
        if (stack_.size() <= base()) fail("stack underflow");
        return stack_.back();
    }
    std::size_t pop_mark() {
        if (marks_.empty()) fail("no MARK on the stack");
        std::size_t k = marks_.back();
        marks_.pop_back();
        return k;
    }
    std::vector<Object> take_marked() {
        std::size_t k = pop_mark();
        std::vector<Object> items;
        items.reserve(stack_.size() - k);
        for (std::size_t i = k; i < stack_.size(); ++i) {
            if (!is_value(stack_[i])) fail("a global used as a value");
            items.push_back(std::move(stack_[i].value));
        }
        stack_.resize(k);
        return items;
    }

    // Pops the MARK and returns where its items start; they stay on the stack (moved from in
    // place into their container) until the caller truncates it to that index.
    std::size_t marked() {
        std::size_t k = pop_mark();
        for (std::size_t i = k; i < stack_.size(); ++i)
            if (!is_value(stack_[i])) fail("a global used as a value");
        return k;
    }
    Slot& below(std::size_t k) {
        if (k <= base()) fail("stack underflow");
        return stack_[k - 1];
    }

    std::shared_ptr<detail::Node> make() {
        auto n = std::make_shared<detail::Node>();
        nodes_.push_back(n);
        return n;
    }
    Object container(Kind kind, std::vector<Object> items) {
        auto n = make();
        for (const Object& e : items) grow(*n, e);
        if (kind == Kind::tuple || kind == Kind::frozenset)
            n->hashable = std::all_of(items.begin(), items.end(), [](const Object& e) { return hashable(e); });
        if (kind == Kind::set || kind == Kind::frozenset)
            for (const Object& e : items) require_hashable(e);
        n->items = std::move(items);
        return wrap(kind, std::move(n));
    }
    void grow(detail::Node& parent, const Object& child) {
        parent.depth = depth_with(parent, child);
        if (parent.depth > limits_.max_depth) fail("nested deeper than " + std::to_string(limits_.max_depth) + " containers (py::Limits::max_depth)");
    }
    void require_hashable(const Object& o) {
        if (!hashable(o)) fail("unhashable type: '" + std::string(o.type_name()) + "' used as a dict key or set item");
    }
    detail::Node& target(Slot& s, Kind want, const char* op) {
        if (s.global == no_global && s.value.kind() == want) return *node_of(s.value);
        fail(std::string(op) + " on a " + (s.global != no_global ? "global" : s.value.type_name()));
    }

    void memo_put(std::uint64_t index) {
        Slot& s = top();
        copied(s.value, false);
        if (index < memo_.size())
            memo_[index] = s;
        else if (index == memo_.size())
            memo_.push_back(s);
        else
            sparse_[index] = s;
    }
    void memo_get(std::uint64_t index) {
        const Slot* s = nullptr;
        if (index < memo_.size()) {
            s = &memo_[index];
        } else if (auto it = sparse_.find(index); it != sparse_.end()) {
            s = &it->second;
        } else {
            fail("memo key " + std::to_string(index) + " not found");
        }
        copied(s->value, true);
        stack_.push_back(*s);
    }
    // A str or bytes is copied where a container is shared: count the copies, so a pickle cannot
    // turn a few bytes of GET or PUT into gigabytes of one string. A container fetched (GET,
    // DUP; not PUT, which only files it) is shared from then on.
    void copied(const Object& o, bool fetched) {
        if (std::holds_alternative<Object::Container>(o.v_)) {
            if (fetched) shared_ = true;
            return;
        }
        std::size_t n = 0;
        if (const auto* s = std::get_if<std::string>(&o.v_)) n = s->size();
        else if (const auto* b = std::get_if<Bytes>(&o.v_)) n = b->data.size();
        else if (const auto* a = std::get_if<ByteArray>(&o.v_)) n = a->data.size();
        copied_ += n;
        if (copied_ > limits_.max_size)
            fail("its repeated strings expand to more than " + std::to_string(limits_.max_size) + " bytes (py::Limits::max_size)");
    }

    Object integer(std::size_t n) {
        const unsigned char* p = take(n);
        if (n == 0) return Object(std::int64_t{0});
        const bool negative = (p[n - 1] & 0x80) != 0;
        // Bytes past the eighth must only extend the sign (or, for a positive value, be zero
        // above an unsigned 64-bit value).
        for (std::size_t i = 8; i < n; ++i)
            if (p[i] != (negative ? 0xff : 0x00))
                fail("an int of " + std::to_string(n) + " bytes does not fit in 64 bits");
        std::uint64_t v = 0;
        for (std::size_t i = std::min<std::size_t>(n, 8); i-- > 0;) v = (v << 8) | p[i];
        if (n < 8 && negative) v |= ~std::uint64_t{0} << (8 * n);  // sign-extend
        if (negative) {
            if (n > 8 && (v >> 63) == 0) fail("an int below -2**63 does not fit in 64 bits");
            return Object(static_cast<std::int64_t>(v));
        }
        if ((v >> 63) != 0) return Object(v);  // 2**63 .. 2**64-1 (nine bytes, the last zero)
        return Object(static_cast<std::int64_t>(v));
    }

    void global(std::string_view module, std::string_view name) {
        Global g = no_global;
        if (module == "builtins" || module == "__builtin__") {
            if (name == "set") g = g_set;
            else if (name == "frozenset") g = g_frozenset;
            else if (name == "bytearray") g = g_bytearray;
            else if (name == "bytes") g = g_bytes;
            else if (name == "list") g = g_list;  // a dict view, as multiprocessing.managers pickles it
        } else if (module == "_codecs" && name == "encode") {
            g = g_encode;
        }
        if (g == no_global && (exceptions_ == ExceptionClasses::any ||
                               (exceptions_ == ExceptionClasses::known && detail::is_exception_class(module, name)))) {
            stack_.push_back(Slot{Object(std::string(module) + "." + std::string(name)), g_exception});
            return;
        }
        if (g == no_global)
            fail("global " + std::string(module) + "." + std::string(name) +
                 " refused: mp reads plain data only and never imports or calls anything");
        stack_.push_back(Slot{Object(), g});
    }
    void reduce();
    void check_shared(const Object& root);
    void release_all() noexcept;

    std::string_view in_;
    Limits limits_;
    std::size_t pos_ = 0;
    std::size_t op_at_ = 0;
    Buffers own_;
    Buffers& buffers_;
    std::vector<Slot>& stack_;
    std::vector<std::size_t>& marks_;
    std::vector<Slot>& memo_;
    std::vector<std::shared_ptr<detail::Node>>& nodes_;
    std::unordered_map<std::uint64_t, Slot> sparse_;  // memo keys past the end (Python's pickler never writes them)
    std::size_t copied_ = 0;  // bytes of str and bytes copied by PUT, GET and DUP
    bool shared_ = false;      // a container was fetched twice: check_shared() at the end
    ExceptionClasses exceptions_ = ExceptionClasses::none;
};

Reader::Reader(std::string_view in, const Limits& limits, ExceptionClasses exceptions)
    : in_(in), limits_(limits), buffers_(pick_buffers()), stack_(buffers_.stack), marks_(buffers_.marks),
      memo_(buffers_.memo), nodes_(buffers_.nodes), exceptions_(exceptions) {}

Reader::~Reader() {
    // Contents go now (after release_all() on an error, so no cycle survives); capacity stays
    // for the next message unless a big pickle left it large.
    constexpr std::size_t keep = 4096;
    auto reset = [](auto& v) {
        v.clear();
        if (v.capacity() > keep) std::decay_t<decltype(v)>().swap(v);
    };
    reset(stack_);
    reset(marks_);
    reset(memo_);
    reset(nodes_);
    buffers_.busy = false;
}

namespace {
Object make_container(Kind kind, std::vector<Object> items, std::vector<std::pair<Object, Object>> pairs) {
    auto n = std::make_shared<detail::Node>();
    for (const Object& e : items) n->depth = Reader::depth_with(*n, e);
    for (const auto& pair : pairs) {
        n->depth = Reader::depth_with(*n, pair.first);
        n->depth = Reader::depth_with(*n, pair.second);
    }
    auto unhashable = [](const Object& e) { return !Reader::hashable(e); };
    if ((kind == Kind::set || kind == Kind::frozenset) && std::any_of(items.begin(), items.end(), unhashable))
        throw PicklingError("mp::py: a set item must be hashable (not a list, dict, set or bytearray)");
    if (std::any_of(pairs.begin(), pairs.end(), [&](const auto& p) { return unhashable(p.first); }))
        throw PicklingError("mp::py: a dict key must be hashable (not a list, dict, set or bytearray)");
    if (kind == Kind::tuple || kind == Kind::frozenset)
        n->hashable = std::all_of(items.begin(), items.end(), [](const Object& e) { return Reader::hashable(e); });
    n->items = std::move(items);
    n->pairs = std::move(pairs);
    return Reader::wrap(kind, std::move(n));
}
}  // namespace

void Reader::reduce() {
    Object args = pop();
    Slot callee = pop_slot();
    if (callee.global == no_global) fail("opcode REDUCE refused: it calls an object, and mp reads plain data only");
    if (args.kind() != Kind::tuple) fail("REDUCE with arguments that are not a tuple");
    Items a = args.items();
    auto items_of = [&](const Object& o) -> std::vector<Object> {
        if (o.kind() == Kind::list || o.kind() == Kind::tuple || o.kind() == Kind::set || o.kind() == Kind::frozenset) {
            Items it = o.items();
            return std::vector<Object>(it.begin(), it.end());
        }
        fail(std::string("set() or frozenset() of a ") + o.type_name());
    };
    switch (callee.global) {
        case g_set:
        case g_frozenset: {
            const Kind k = callee.global == g_set ? Kind::set : Kind::frozenset;
            if (a.size() == 0) return push(container(k, {}));
            if (a.size() == 1) return push(container(k, items_of(a[0])));
            break;
        }
        case g_bytes:
            if (a.size() == 0) return push(Object(Bytes{}));
            if (a.size() == 1 && a[0].kind() == Kind::bytes) return push(a[0]);
            break;
        case g_bytearray:
            if (a.size() == 0) return push(Object(ByteArray{}));
            if (a.size() == 1 && (a[0].kind() == Kind::bytes || a[0].kind() == Kind::bytearray))
                return push(Object(ByteArray{a[0].as<Bytes>().data}));
            break;
        case g_exception: {
            std::string type = callee.value.as<std::string>();
            if (type.starts_with("builtins.")) type.erase(0, 9);
            stack_.push_back(Slot{container(Kind::tuple, {Object(std::move(type)), args}), g_raised});
            return;
        }
        case g_list:
            // list(list(view)): what multiprocessing's pickler writes for dict.keys(), values()
            // and items() (managers.py registers the reducer), so a Python manager's dict can be
            // listed. Only that form: the argument is already the list.
            if (a.size() == 1 && a[0].kind() == Kind::list) return push(container(Kind::list, items_of(a[0])));
            break;
        case g_encode:
            if (a.size() == 2 && a[0].kind() == Kind::str && a[1].kind() == Kind::str) {
                auto encoding = a[1].as<std::string>();
                std::string out;
                if ((encoding == "latin1" || encoding == "latin-1") && latin1_of(a[0].as<std::string>(), out))
                    return push(Object(Bytes{std::move(out)}));
            }
            break;
        default: break;
    }
    static constexpr const char* names[] = {"", "builtins.set", "builtins.frozenset", "builtins.bytearray",
                                            "builtins.bytes", "_codecs.encode", "builtins.list", "", ""};
    fail(std::string("REDUCE of ") + names[callee.global] + " with arguments " + short_repr(args) +
         " is not one of the plain-data forms Python's pickler writes");
}

// The value may share containers: no cycle, depth and expanded size within the limits. Nodes the
// result does not reach (garbage left in the memo, possibly cyclic) are emptied.
void Reader::check_shared(const Object& root) {
    struct Scratch {
        std::uint8_t state = 0;  // 1: on the current path, 2: done
        std::uint32_t depth = 0;
        std::uint64_t size = 0;
    };
    std::unordered_map<const detail::Node*, Scratch> seen;
    auto leaf_size = [](const Object& o) -> std::uint64_t {
        std::uint64_t s = 1;
        o.visit([&](const auto& v) {
            using V = std::decay_t<decltype(v)>;
            if constexpr (std::is_same_v<V, std::string>) s += v.size();
            else if constexpr (std::is_same_v<V, Bytes> || std::is_same_v<V, ByteArray>) s += v.data.size();
        });
        return s;
    };
    struct Frame {
        const detail::Node* node;
        std::size_t next;
        Scratch* scratch;
    };
    std::vector<Frame> path;
    auto enter = [&](const Object& o) -> std::pair<bool, const Scratch*> {
        auto n = node_of(o);
        if (!n) return {false, nullptr};
        auto [it, fresh] = seen.try_emplace(n.get());
        if (!fresh) {
            if (it->second.state == 1) fail("a value that contains itself (a recursive list, dict or set) has no C++ form");
            return {false, &it->second};
        }
        it->second.state = 1;
        it->second.depth = 1;
        it->second.size = 1;
        path.push_back(Frame{n.get(), 0, &it->second});
        return {true, nullptr};
    };
    const std::uint64_t max_size = limits_.max_size;
    auto add = [&](Scratch& parent, const Object& child, const Scratch* done) {
        if (done != nullptr) {
            parent.depth = std::max(parent.depth, done->depth + 1);
            parent.size = std::min<std::uint64_t>(parent.size + done->size, max_size + 1);
        } else {
            parent.size = std::min<std::uint64_t>(parent.size + leaf_size(child), max_size + 1);
        }
    };
    enter(root);
    while (!path.empty()) {
        Frame& f = path.back();
        const std::size_t n_items = f.node->items.size();
        const std::size_t total = n_items + 2 * f.node->pairs.size();
        if (f.next == total) {
            Scratch& s = *f.scratch;
            s.state = 2;
            if (s.depth > limits_.max_depth) fail("nested deeper than " + std::to_string(limits_.max_depth) + " containers (py::Limits::max_depth)");
            if (s.size > max_size)
                fail("its shared references expand to more than " + std::to_string(max_size) + " (py::Limits::max_size)");
            path.pop_back();
            if (!path.empty()) add(*path.back().scratch, Object(), &s);
            continue;
        }
        const std::size_t i = f.next++;
        const Object& child = i < n_items ? f.node->items[i]
                                          : ((i - n_items) % 2 == 0 ? f.node->pairs[(i - n_items) / 2].first
                                                                    : f.node->pairs[(i - n_items) / 2].second);
        Scratch* parent = f.scratch;  // f may move when enter() pushes
        auto [pushed, done] = enter(child);
        if (!pushed) add(*parent, child, done);
    }
    for (auto& n : nodes_)
        if (!seen.contains(n.get())) {
            n->items.clear();
            n->pairs.clear();
        }
}

void Reader::release_all() noexcept {
    // Every node stays alive in nodes_ while each is emptied, so no clear() starts a chain of
    // destructors and no cycle survives.
    for (auto& n : nodes_) {
        n->items.clear();
        n->pairs.clear();
    }
}

Object Reader::run() {
    if (in_.size() > limits_.max_size)
        throw UnpicklingError("mp::py: a pickle of " + std::to_string(in_.size()) + " bytes is over py::Limits::max_size (" +
                              std::to_string(limits_.max_size) + ")");
    try {
        for (;;) {
            op_at_ = pos_;
            const unsigned char op = *take(1);
            switch (op) {
                case PROTO: {
                    unsigned v = *take(1);
                    if (v > 5) fail("unsupported pickle protocol " + std::to_string(v));
                    break;
                }
                case FRAME: length(8); break;  // a frame only groups opcodes, and the input is all here
                case STOP: {
                    if (!marks_.empty() || stack_.size() != 1) fail("STOP with " + std::to_string(stack_.size()) + " values and " + std::to_string(marks_.size()) + " marks on the stack");
                    if (pos_ != in_.size()) fail(std::to_string(in_.size() - pos_) + " bytes after STOP");
                    Object result = pop();
                    if (shared_) check_shared(result);
                    return result;
                }
                case MARK: marks_.push_back(stack_.size()); break;
                case POP:
                    if (stack_.size() > base()) stack_.pop_back();
                    else pop_mark();
                    break;
                case POP_MARK: stack_.resize(pop_mark()); break;
                case DUP: {
                    Slot s = top();
                    copied(s.value, true);
                    stack_.push_back(std::move(s));
                    break;
                }
                case NONE: push(Object()); break;
                case NEWTRUE: push(Object(true)); break;
                case NEWFALSE: push(Object(false)); break;
                case BININT1: push(Object(static_cast<std::int64_t>(le(1)))); break;
                case BININT2: push(Object(static_cast<std::int64_t>(le(2)))); break;
                case BININT: push(Object(static_cast<std::int64_t>(static_cast<std::int32_t>(le(4))))); break;
                case LONG1: push(integer(static_cast<std::size_t>(le(1)))); break;
                case LONG4: {
                    std::uint64_t n = le(4);
                    if (n & 0x80000000u) fail("LONG4 with a negative length");
                    if (n > in_.size() - pos_) fail("a length of " + std::to_string(n) + " runs past the end of the pickle");
                    push(integer(static_cast<std::size_t>(n)));
                    break;
                }
                case BINFLOAT: {
                    const unsigned char* p = take(8);
                    std::uint64_t bits = 0;
                    for (int i = 0; i < 8; ++i) bits = (bits << 8) | p[i];
                    push(Object(std::bit_cast<double>(bits)));
                    break;
                }
                case SHORT_BINUNICODE:
                case BINUNICODE:
                case BINUNICODE8: {
                    std::string_view s = bytes_of(length(op == SHORT_BINUNICODE ? 1 : op == BINUNICODE ? 4 : 8));
                    if (!valid_utf8(s)) fail("a str that is not UTF-8");
                    push(Object(std::string(s)));
                    break;
                }
                case SHORT_BINBYTES:
                case BINBYTES:
                case BINBYTES8:
                    push(Object(Bytes{std::string(bytes_of(length(op == SHORT_BINBYTES ? 1 : op == BINBYTES ? 4 : 8)))}));
                    break;
                case BYTEARRAY8: push(Object(ByteArray{std::string(bytes_of(length(8)))})); break;
                case EMPTY_TUPLE: push(container(Kind::tuple, {})); break;
                case TUPLE1:
                case TUPLE2:
                case TUPLE3: {
                    const std::size_t n = op - TUPLE1 + 1;
                    if (stack_.size() < base() + n) fail("stack underflow");
                    std::vector<Object> items;
                    for (std::size_t i = stack_.size() - n; i < stack_.size(); ++i) {
                        if (!is_value(stack_[i])) fail("a global used as a value");
                        items.push_back(std::move(stack_[i].value));
                    }
                    stack_.resize(stack_.size() - n);
                    push(container(Kind::tuple, std::move(items)));
                    break;
                }
                case TUPLE: push(container(Kind::tuple, take_marked())); break;
                case EMPTY_LIST: push(container(Kind::list, {})); break;
                case LIST: push(container(Kind::list, take_marked())); break;
                case APPEND: {
                    Object item = pop();
                    detail::Node& list = target(top(), Kind::list, "APPEND");
                    grow(list, item);
                    list.items.push_back(std::move(item));
                    break;
                }
                case APPENDS: {
                    const std::size_t k = marked();
                    detail::Node& list = target(below(k), Kind::list, "APPENDS");
                    reserve_more(list.items, stack_.size() - k);
                    for (std::size_t i = k; i < stack_.size(); ++i) {
                        grow(list, stack_[i].value);
                        list.items.push_back(std::move(stack_[i].value));
                    }
                    stack_.resize(k);
                    break;
                }
                case EMPTY_DICT: push(container(Kind::dict, {})); break;
                case DICT:
                case SETITEMS: {
                    const std::size_t k = marked();
                    if ((stack_.size() - k) % 2 != 0) fail(std::string(op == DICT ? "DICT" : "SETITEMS") + " with an odd number of items");
                    Object made;
                    if (op == DICT) made = container(Kind::dict, {});
                    detail::Node& dict = op == DICT ? *node_of(made) : target(below(k), Kind::dict, "SETITEMS");
                    reserve_more(dict.pairs, (stack_.size() - k) / 2);
                    for (std::size_t i = k; i < stack_.size(); i += 2) {
                        Object& key = stack_[i].value;
                        Object& value = stack_[i + 1].value;
                        require_hashable(key);
                        grow(dict, key);
                        grow(dict, value);
                        dict.pairs.emplace_back(std::move(key), std::move(value));
                    }
                    stack_.resize(k);
                    if (op == DICT) push(std::move(made));
                    break;
                }
                case SETITEM: {
                    Object value = pop();
                    Object key = pop();
                    detail::Node& dict = target(top(), Kind::dict, "SETITEM");
                    require_hashable(key);
                    grow(dict, key);
                    grow(dict, value);
                    dict.pairs.emplace_back(std::move(key), std::move(value));
                    break;
                }
                case EMPTY_SET: push(container(Kind::set, {})); break;
                case ADDITEMS: {
                    const std::size_t k = marked();
                    detail::Node& set = target(below(k), Kind::set, "ADDITEMS");
                    reserve_more(set.items, stack_.size() - k);
                    for (std::size_t i = k; i < stack_.size(); ++i) {
                        require_hashable(stack_[i].value);
                        grow(set, stack_[i].value);
                        set.items.push_back(std::move(stack_[i].value));
                    }
                    stack_.resize(k);
                    break;
                }
                case FROZENSET: push(container(Kind::frozenset, take_marked())); break;
                case MEMOIZE: memo_put(memo_.size()); break;
                case BINPUT: memo_put(le(1)); break;
                case LONG_BINPUT: memo_put(le(4)); break;
                case BINGET: memo_get(le(1)); break;
                case LONG_BINGET: memo_get(le(4)); break;
                case GLOBAL: {
                    auto line = [&]() {
                        std::string_view rest = in_.substr(pos_);
                        std::size_t nl = rest.find('\n');
                        if (nl == std::string_view::npos) fail("truncated GLOBAL");
                        pos_ += nl + 1;
                        return rest.substr(0, nl);
                    };
                    std::string_view module = line();
                    std::string_view name = line();
                    global(module, name);
                    break;
                }
                case STACK_GLOBAL: {
                    Object name = pop();
                    Object module = pop();
                    if (name.kind() != Kind::str || module.kind() != Kind::str) fail("STACK_GLOBAL of a name that is not a str");
                    global(module.as<std::string>(), name.as<std::string>());
                    break;
                }
                case REDUCE: reduce(); break;
                case BUILD: {
                    // Only after an exception class's call, when any class is read as one: the
                    // instance's attributes (plain data, already read) are not kept.
                    if (exceptions_ != ExceptionClasses::any) refuse(op);
                    (void)pop();
                    if (stack_.empty() || stack_.back().global != g_raised) fail("BUILD of something other than an exception");
                    break;
                }
                case PERSID: case BINPERSID: case INST: case OBJ: case NEWOBJ: case NEWOBJ_EX:
                case EXT1: case EXT2: case EXT4: case NEXT_BUFFER: case READONLY_BUFFER: case INT: case LONG:
                case FLOAT: case STRING: case BINSTRING: case SHORT_BINSTRING: case UNICODE: case GET: case PUT:
                    refuse(op);
                default: {
                    static constexpr char hex[] = "0123456789abcdef";
                    fail(std::string("unknown opcode 0x") + hex[op >> 4] + hex[op & 15]);
                }
            }
        }
    } catch (...) {
        release_all();
        throw;
    }
}

Object loads(std::string_view pickle, const Limits& limits) {
    Reader r(pickle, limits);
    return r.run();
}

namespace detail {

// Python's built-in exception classes that carry only their args (no state a pickle would BUILD),
// and the queue module's Empty and Full: what a manager's '#ERROR' reply holds for plain calls.
bool is_exception_class(std::string_view module, std::string_view name) {
    static constexpr std::string_view builtin[] = {
        "ArithmeticError", "AssertionError", "AttributeError", "BaseException", "BlockingIOError",
        "BrokenPipeError", "BufferError", "ChildProcessError", "ConnectionAbortedError", "ConnectionError",
        "ConnectionRefusedError", "ConnectionResetError", "EOFError", "Exception", "FileExistsError",
        "FileNotFoundError", "FloatingPointError", "IndexError", "InterruptedError", "IsADirectoryError",
        "KeyError", "LookupError", "MemoryError", "NotADirectoryError", "NotImplementedError", "OSError",
        "OverflowError", "PermissionError", "ProcessLookupError", "RecursionError", "ReferenceError",
        "RuntimeError", "StopIteration", "SystemError", "TimeoutError", "TypeError", "UnicodeError",
        "ValueError", "ZeroDivisionError"};
    if (module == "builtins")
        return std::find(std::begin(builtin), std::end(builtin), name) != std::end(builtin);
    return (module == "_queue" && name == "Empty") || (module == "queue" && (name == "Empty" || name == "Full"));
}

std::uint64_t key_hash_seed() noexcept {
    static const std::uint64_t seed = [] {
        std::uint64_t s = 0;
        if (::getrandom(&s, sizeof s, GRND_NONBLOCK) != static_cast<ssize_t>(sizeof s)) {
            // No entropy yet (early boot): the clock and where this process was loaded.
            s = static_cast<std::uint64_t>(std::chrono::steady_clock::now().time_since_epoch().count()) ^
                reinterpret_cast<std::uintptr_t>(&s);
        }
        return hash_fmix(s);
    }();
    return seed;
}

Object loads_with_exceptions(std::string_view pickle, const Limits& limits, ExceptionClasses classes) {
    Reader r(pickle, limits, classes);
    return r.run();
}

}  // namespace detail

// ---------------------------------------------------------------------------------------------
// Writer
// ---------------------------------------------------------------------------------------------

namespace {
constexpr std::size_t kHeader = 2 + 9;  // PROTO 4, then FRAME and its 8-byte length, patched by finish()
}

Writer::Writer() { out_.assign("\x80\x04\x95\0\0\0\0\0\0\0\0", kHeader); }

void Writer::none() { op(static_cast<char>(NONE)); }
void Writer::boolean(bool b) { op(static_cast<char>(b ? NEWTRUE : NEWFALSE)); }

void Writer::integer(std::int64_t i) {
    if (i >= 0 && i < 256) {
        op(static_cast<char>(BININT1));
        out_.push_back(static_cast<char>(i));
    } else if (i >= 0 && i < 65536) {
        op(static_cast<char>(BININT2));
        out_.push_back(static_cast<char>(i & 0xff));
        out_.push_back(static_cast<char>(i >> 8));
    } else if (i >= std::numeric_limits<std::int32_t>::min() && i <= std::numeric_limits<std::int32_t>::max()) {
        op(static_cast<char>(BININT));
        auto u = static_cast<std::uint32_t>(static_cast<std::int32_t>(i));
        for (int k = 0; k < 4; ++k) out_.push_back(static_cast<char>((u >> (8 * k)) & 0xff));
    } else {
        // LONG1: the fewest little-endian two's-complement bytes that keep the sign.
        auto u = static_cast<std::uint64_t>(i);
        unsigned n = 8;
        while (n > 1) {
            const std::int64_t fits = i >> (8 * (n - 1) - 1);  // what the top n-1 bytes' sign bit sees
            if (fits != 0 && fits != -1) break;
            --n;
        }
        op(static_cast<char>(LONG1));
        out_.push_back(static_cast<char>(n));
        for (unsigned k = 0; k < n; ++k) out_.push_back(static_cast<char>((u >> (8 * k)) & 0xff));
    }
}

void Writer::integer(std::uint64_t i) {
    if (i <= static_cast<std::uint64_t>(std::numeric_limits<std::int64_t>::max())) return integer(static_cast<std::int64_t>(i));
    op(static_cast<char>(LONG1));
    out_.push_back(9);
    for (int k = 0; k < 8; ++k) out_.push_back(static_cast<char>((i >> (8 * k)) & 0xff));
    out_.push_back(0);  // the sign byte: positive
}

void Writer::floating(double d) {
    op(static_cast<char>(BINFLOAT));
    auto bits = std::bit_cast<std::uint64_t>(d);
    for (int k = 7; k >= 0; --k) out_.push_back(static_cast<char>((bits >> (8 * k)) & 0xff));
}

namespace {
void put_length(std::string& out, std::uint64_t n, int width) {
    for (int k = 0; k < width; ++k) out.push_back(static_cast<char>((n >> (8 * k)) & 0xff));
}
}  // namespace

// A str or bytes opcode: the one-byte-length form below 256 bytes, then the 4-byte, then the 8-byte.
void Writer::counted(unsigned char op1, unsigned char op4, unsigned char op8, std::string_view data) {
    if (data.size() < 256) {
        op(static_cast<char>(op1));
        put_length(out_, data.size(), 1);
    } else if (data.size() <= 0xffffffffu) {
        op(static_cast<char>(op4));
        put_length(out_, data.size(), 4);
    } else {
        op(static_cast<char>(op8));
        put_length(out_, data.size(), 8);
    }
    out_.append(data);
}

void Writer::str(std::string_view s) {
    if (!valid_utf8(s))
        throw PicklingError("mp::py: a std::string that is not UTF-8 has no Python str form; send it as mp::py::Bytes");
    counted(SHORT_BINUNICODE, BINUNICODE, BINUNICODE8, s);
}

void Writer::bytes(std::string_view b) { counted(SHORT_BINBYTES, BINBYTES, BINBYTES8, b); }

void Writer::bytearray(std::string_view b) {
    // Protocol 4 has no bytearray opcode: Python writes builtins.bytearray(bytes), which mp's
    // reader (and Python's) rebuilds.
    static constexpr char call[] = "\x8c\x08" "builtins" "\x8c\x09" "bytearray" "\x93";
    out_.append(call, sizeof call - 1);
    bytes(b);
    op(static_cast<char>(TUPLE1));
    op(static_cast<char>(REDUCE));
}

void Writer::exception(std::string_view type, const Object& arg) {
    std::string_view module = "builtins";
    if (type == "queue.Empty" || type == "Empty") {
        module = "_queue";
        type = "Empty";
    } else if (type == "queue.Full" || type == "Full") {
        module = "queue";
        type = "Full";
    }
    if (!detail::is_exception_class(module, type))
        throw PicklingError("mp::py: " + std::string(type) + " is not one of Python's built-in exception classes");
    str(module);
    str(type);
    op(static_cast<char>(STACK_GLOBAL));
    if (arg.is_none()) {
        op(static_cast<char>(EMPTY_TUPLE));
    } else {
        object(arg);
        op(static_cast<char>(TUPLE1));
    }
    op(static_cast<char>(REDUCE));
}

void Writer::object(const Object& o) {
    o.visit([&](const auto& v) {
        using V = std::decay_t<decltype(v)>;
        if constexpr (std::is_same_v<V, None>) none();
        else if constexpr (std::is_same_v<V, bool>) boolean(v);
        else if constexpr (std::is_same_v<V, std::int64_t> || std::is_same_v<V, std::uint64_t>) integer(v);
        else if constexpr (std::is_same_v<V, double>) floating(v);
        else if constexpr (std::is_same_v<V, std::string>) str(v);
        else if constexpr (std::is_same_v<V, Bytes>) bytes(v.data);
        else if constexpr (std::is_same_v<V, ByteArray>) bytearray(v.data);
        else if constexpr (std::is_same_v<V, Tuple>) {
            begin_tuple(v.size());
            for (const Object& e : v) object(e);
            end_tuple(v.size());
        } else if constexpr (std::is_same_v<V, List>) {
            begin_list();
            for (const Object& e : v) object(e);
            end_list();
        } else if constexpr (std::is_same_v<V, Set>) {
            begin_set();
            for (const Object& e : v) object(e);
            end_set();
        } else if constexpr (std::is_same_v<V, FrozenSet>) {
            begin_frozenset();
            for (const Object& e : v) object(e);
            end_frozenset();
        } else {
            begin_dict();
            for (const auto& [key, value] : v) {
                object(key);
                object(value);
            }
            end_dict();
        }
    });
}

void Writer::begin_tuple(std::size_t n) {
    if (n > 3) op(static_cast<char>(MARK));
}
void Writer::end_tuple(std::size_t n) {
    if (n == 0) op(static_cast<char>(EMPTY_TUPLE));
    else if (n <= 3) op(static_cast<char>(TUPLE1 + n - 1));
    else op(static_cast<char>(TUPLE));
}
void Writer::begin_list() {
    op(static_cast<char>(EMPTY_LIST));
    op(static_cast<char>(MARK));
}
void Writer::end_list() { op(static_cast<char>(APPENDS)); }
void Writer::begin_set() {
    op(static_cast<char>(EMPTY_SET));
    op(static_cast<char>(MARK));
}
void Writer::end_set() { op(static_cast<char>(ADDITEMS)); }
void Writer::begin_frozenset() { op(static_cast<char>(MARK)); }
void Writer::end_frozenset() { op(static_cast<char>(FROZENSET)); }
void Writer::begin_dict() {
    op(static_cast<char>(EMPTY_DICT));
    op(static_cast<char>(MARK));
}
void Writer::end_dict() { op(static_cast<char>(SETITEMS)); }

std::string Writer::finish() {
    op(static_cast<char>(STOP));
    const std::size_t body = out_.size() - kHeader;
    if (body < 4) {
        out_.erase(2, 9);  // Python frames only bodies of 4 bytes or more
    } else {
        for (int k = 0; k < 8; ++k) out_[static_cast<std::size_t>(3 + k)] = static_cast<char>((static_cast<std::uint64_t>(body) >> (8 * k)) & 0xff);
    }
    std::string result = std::move(out_);
    out_.assign("\x80\x04\x95\0\0\0\0\0\0\0\0", kHeader);
    return result;
}

}  // namespace mp::py
