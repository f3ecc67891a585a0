// mp::ShareableList in CPython's layout (Lib/multiprocessing/shared_memory.py, 3.9+): see the
// header for the areas. Every read checks the header against the segment's size first, since
// the segment may come from another program.

#include "mp/shareable_list.hpp"

#include <algorithm>
#include <charconv>
#include <cmath>
#include <cstdint>
#include <optional>
#include <cstring>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <utility>
#include <variant>

namespace mp {

namespace {

constexpr std::size_t kAlign = 8;
constexpr std::uint8_t kPlain = 0, kStr = 1, kBytes = 2, kNone = 3;  // Python's back transforms

struct Encoded {
    std::string format;  // struct format, at most 8 bytes
    std::uint8_t code = kPlain;
    std::string bytes;   // what goes in the slot (padded to its size by the caller)
};

std::int64_t load64(const std::byte* p) {
    std::int64_t v;
    std::memcpy(&v, p, sizeof v);
    return v;
}
void store64(std::byte* p, std::int64_t v) { std::memcpy(p, &v, sizeof v); }

const std::string& text_of(const ShareableList::Item& v) {
    if (auto* s = std::get_if<std::string>(&v)) return *s;
    return std::get<py::Bytes>(v).data;
}
bool is_text(const ShareableList::Item& v) {
    return std::holds_alternative<std::string>(v) || std::holds_alternative<py::Bytes>(v);
}

// The slot an item is made with: 8 bytes, or for str/bytes its length rounded up past it.
std::size_t slot_for(const ShareableList::Item& v) {
    return is_text(v) ? kAlign * (text_of(v).size() / kAlign + 1) : kAlign;
}

// `slot`: the slot's size, the length a str/bytes format names.
Encoded encode_item(const ShareableList::Item& v, std::size_t slot) {
    Encoded e;
    e.bytes.assign(kAlign, '\0');
    if (auto* i = std::get_if<std::int64_t>(&v)) {
        e.format = "q";
        std::memcpy(e.bytes.data(), i, 8);
    } else if (auto* d = std::get_if<double>(&v)) {
        e.format = "d";
        std::memcpy(e.bytes.data(), d, 8);
    } else if (auto* b = std::get_if<bool>(&v)) {
        e.format = "xxxxxxx?";
        e.bytes[7] = *b ? '\1' : '\0';
    } else if (std::holds_alternative<py::None>(v)) {
        e.format = "xxxxxx?x";
        e.code = kNone;
    } else {
        e.format = std::to_string(slot) + "s";
        e.code = std::holds_alternative<std::string>(v) ? kStr : kBytes;
        e.bytes = text_of(v);
    }
    return e;
}

}  // namespace

ShareableList::ShareableList(const std::vector<Item>& items, std::optional<std::string> name, bool track)
    : shm_([&] {
          std::size_t data = 0;
          for (const Item& v : items) {
              // The struct format of a str/bytes item ("<slot>s") must fit the 8 bytes the layout
              // keeps for it: a slot of 10,000,000 bytes or more would be cut to a format Python
              // cannot read. CPython refuses such a list (AssertionError) before making anything.
              if (is_text(v) && std::to_string(slot_for(v)).size() + 1 > 8)
                  throw std::invalid_argument(
                      "ValueError: mp::ShareableList: a str/bytes item of " + std::to_string(text_of(v).size()) +
                      " bytes needs a slot whose struct format does not fit the 8 bytes Python's "
                      "ShareableList keeps for it (at most 9,999,991 bytes an item)");
              data += slot_for(v);
          }
          const std::size_t n = items.size();
          // Python's struct.calcsize of the whole: nothing is padded, every area is 8-aligned.
          const std::size_t total = 8 + 8 * (n + 1) + data + 8 * n + n;
          return SharedMemory(std::move(name), true, total, track);
      }()) {
    const std::size_t n = items.size();
    offsets_.assign(1, 0);
    for (const Item& v : items) offsets_.push_back(offsets_.back() + std::int64_t(slot_for(v)));
    std::byte* p = base();
    store64(p, std::int64_t(n));
    for (std::size_t i = 0; i <= n; ++i) store64(p + 8 * (i + 1), offsets_[i]);
    for (std::size_t i = 0; i < n; ++i) set(std::int64_t(i), items[i]);
}

ShareableList::ShareableList(Attached, SharedMemory shm) : shm_(std::move(shm)) {
    const auto buf = shm_.buf();
    auto bad = [] { return DecodeError("mp::ShareableList: the segment does not hold a ShareableList"); };
    if (buf.size() < 16) throw bad();
    const std::int64_t n = load64(buf.data());
    if (n < 0 || std::uint64_t(n) > (buf.size() - 16) / 17) throw bad();
    offsets_.resize(std::size_t(n) + 1);
    for (std::size_t i = 0; i <= std::size_t(n); ++i) {
        offsets_[i] = load64(buf.data() + 8 * (i + 1));
        if (offsets_[i] < 0 || (i > 0 && offsets_[i] < offsets_[i - 1] + std::int64_t(kAlign))) throw bad();
    }
    const std::size_t need = 8 * (std::size_t(n) + 2) + std::size_t(offsets_.back()) + 9 * std::size_t(n);
    if (offsets_.back() < 0 || need > buf.size()) throw bad();
}

ShareableList ShareableList::attach(const std::string& name) { return ShareableList(Attached{}, SharedMemory(name, false)); }

std::byte* ShareableList::base() const {
    auto b = shm_.buf();
    if (b.empty()) throw Error("mp::ShareableList: the segment is closed");
    return b.data();
}

void ShareableList::check_handle() const {
    if (offsets_.empty()) detail::throw_empty_handle("mp::ShareableList");
}

std::size_t ShareableList::position(std::int64_t i) const {
    check_handle();
    const auto n = std::int64_t(size());
    if (i < 0) i += n;
    if (i < 0 || i >= n) throw std::out_of_range("IndexError: ShareableList index out of range");
    return std::size_t(i);
}

ShareableList::Item ShareableList::get(std::int64_t i) const {
    const std::size_t k = position(i);
    const std::size_t n = size();
    const std::byte* p = base();
    const std::byte* data = p + 8 * (n + 2);
    const std::byte* formats = data + offsets_.back();
    const auto code = static_cast<std::uint8_t>(formats[8 * n + k]);
    std::string fmt(reinterpret_cast<const char*>(formats + 8 * k), 8);
    fmt.resize(std::strlen(fmt.c_str()));
    const std::byte* at = data + offsets_[k];
    const std::size_t slot = std::size_t(offsets_[k + 1] - offsets_[k]);
    if (code == kNone) return py::None{};
    if (code == kStr || code == kBytes) {
        std::size_t len = slot;
        if (!fmt.empty() && fmt.back() == 's') {
            auto [end, ec] = std::from_chars(fmt.data(), fmt.data() + fmt.size() - 1, len);
            if (ec != std::errc() || end != fmt.data() + fmt.size() - 1 || len > slot)
                throw DecodeError("mp::ShareableList: a str/bytes item's format '" + fmt + "' does not fit its slot");
        }
        std::string s(reinterpret_cast<const char*>(at), len);
        s.erase(s.find_last_not_of('\0') + 1);  // Python's rstrip(b'\x00')
        if (code == kStr) return s;
        return py::Bytes{std::move(s)};
    }
    if (fmt == "q") return load64(at);
    if (fmt == "d") {
        double d;
        std::memcpy(&d, at, sizeof d);
        return d;
    }
    if (fmt == "xxxxxxx?") return at[7] != std::byte{0};
    throw DecodeError("mp::ShareableList: unknown item format '" + fmt + "'");
}

void ShareableList::set(std::int64_t i, const Item& v) {
    const std::size_t k = position(i);
    const std::size_t n = size();
    const std::size_t slot = std::size_t(offsets_[k + 1] - offsets_[k]);
    if (is_text(v) && text_of(v).size() > slot)
        throw std::invalid_argument("ValueError: bytes/str item exceeds available storage");
    Encoded e = encode_item(v, slot);
    std::byte* p = base();
    std::byte* data = p + 8 * (n + 2);
    std::byte* formats = data + offsets_.back();
    std::memset(formats + 8 * k, 0, 8);
    std::memcpy(formats + 8 * k, e.format.data(), std::min<std::size_t>(e.format.size(), 8));
    formats[8 * n + k] = std::byte{e.code};
    // A str/bytes fills its whole slot (zero padded, as struct's "<n>s"); a scalar its 8 bytes.
    const std::size_t width = is_text(v) ? slot : kAlign;
    std::memset(data + offsets_[k], 0, width);
    std::memcpy(data + offsets_[k], e.bytes.data(), std::min(e.bytes.size(), width));
}

std::vector<ShareableList::Item> ShareableList::to_vector() const {
    check_handle();
    std::vector<Item> out;
    for (std::size_t i = 0; i < size(); ++i) out.push_back(get(std::int64_t(i)));
    return out;
}

std::string ShareableList::format() const {
    check_handle();
    const std::size_t n = size();
    const std::byte* formats = base() + 8 * (n + 2) + offsets_.back();
    std::string out;
    for (std::size_t k = 0; k < n; ++k) {
        std::string f(reinterpret_cast<const char*>(formats + 8 * k), 8);
        out += f.c_str();
    }
    return out;
}

namespace {

// Python's == between two items: int, float and bool compare by value (1 == True == 1.0), an int
// and a float exactly (not through a rounding of the int); str and bytes never equal each other.
bool python_equal(const ShareableList::Item& a, const ShareableList::Item& b) {
    auto number = [](const ShareableList::Item& v) -> std::optional<std::variant<std::int64_t, double>> {
        if (auto* i = std::get_if<std::int64_t>(&v)) return *i;
        if (auto* t = std::get_if<bool>(&v)) return std::int64_t{*t};
        if (auto* d = std::get_if<double>(&v)) return *d;
        return std::nullopt;
    };
    const auto x = number(a), y = number(b);
    if (!x || !y) return a == b;
    auto int_equals = [](std::int64_t i, double d) {
        // 2**63 as a double is past every int64: d below it and integral converts exactly.
        return d >= -9223372036854775808.0 && d < 9223372036854775808.0 && std::trunc(d) == d &&
               static_cast<std::int64_t>(d) == i;
    };
    return std::visit(
        [&](auto p, auto q) {
            if constexpr (std::is_same_v<decltype(p), decltype(q)>)
                return p == q;
            else if constexpr (std::is_same_v<decltype(p), std::int64_t>)
                return int_equals(p, q);
            else
                return int_equals(q, p);
        },
        *x, *y);
}

}  // namespace

std::size_t ShareableList::count(const Item& v) const {
    check_handle();
    std::size_t c = 0;
    for (std::size_t i = 0; i < size(); ++i) c += python_equal(get(std::int64_t(i)), v);
    return c;
}

std::size_t ShareableList::index(const Item& v) const {
    check_handle();
    for (std::size_t i = 0; i < size(); ++i)
        if (python_equal(get(std::int64_t(i)), v)) return i;
    throw std::invalid_argument("ValueError: the value is not in this ShareableList");
}

}  // namespace mp
