#pragma once
/// \file
/// mp::ShareableList: Python's multiprocessing.shared_memory.ShareableList, a fixed-length list
/// of scalars and strings in a named SharedMemory segment, with Python's layout, so a Python
/// program attaches to one mp made (`ShareableList(name=...)`) and the other way round.
///
///     mp::ShareableList sl({std::int64_t{1}, 2.5, true, mp::py::None{}, std::string("howdy")});
///     sl.get(4);                     // Item holding std::string("howdy")
///     sl.set(0, std::string("hi"));  // any item may take any type that fits its slot
///     mp::ShareableList other = mp::ShareableList::attach(sl.shm().name());
///
/// Layout (CPython 3.9 to 3.13, native byte order): the item count (int64), N+1 offsets of the
/// items from the data area (int64), the data area (8 bytes per scalar; a str or bytes gets its
/// UTF-8 length rounded up to the next multiple of 8, at least one more byte), N struct formats
/// of 8 bytes ("q", "d", "xxxxxxx?", "xxxxxx?x", "<n>s"), and N one-byte codes telling str,
/// bytes and None apart. A str or bytes item reads back without trailing NUL bytes, as Python's.
///
/// Destructor policy: as SharedMemory's (the mapping closes; the segment stays until unlink()).
/// Not synchronised: guard concurrent writers with a Lock, as in Python.

#include <cstddef>
#include <cstdint>
#include <optional>
#include <string>
#include <variant>
#include <vector>

#include "mp/py.hpp"
#include "mp/shared_memory.hpp"

namespace mp {

class ShareableList {
public:
    /// What an item holds: Python's None, int, float, bool, str (UTF-8) or bytes.
    using Item = std::variant<py::None, std::int64_t, double, bool, std::string, py::Bytes>;

    /// Creates a segment (named `name`, else a fresh name) holding `items` (Python's
    /// ShareableList(sequence, name=name)). std::system_error EEXIST when the name is taken.
    /// `track`: as SharedMemory's (this process's resource tracker unlinks it if nobody does).
    /// A str or bytes item holds at most 9,999,991 bytes (its struct format must fit 8 bytes):
    /// std::invalid_argument for a longer one, before any segment is made (CPython: AssertionError).
    explicit ShareableList(const std::vector<Item>& items, std::optional<std::string> name = std::nullopt,
                           bool track = true);
    /// Attaches to the list in segment `name` (Python's ShareableList(name=name)). Throws
    /// std::system_error ENOENT when there is none, mp::DecodeError when the segment does not
    /// hold a well-formed list.
    static ShareableList attach(const std::string& name);

    /// The item at `i` (negative counts from the end); std::out_of_range (IndexError) outside.
    Item get(std::int64_t i) const;
    /// Stores `v` at `i`. A str or bytes longer than the slot was made for is
    /// std::invalid_argument ("ValueError: bytes/str item exceeds available storage").
    void set(std::int64_t i, const Item& v);
    /// The number of items; 0 for a list moved from (whose every other member but shm() throws
    /// mp::EmptyHandle, as a moved-from SharedMemory's).
    std::size_t size() const noexcept { return offsets_.empty() ? 0 : offsets_.size() - 1; }
    /// Every item, in order.
    std::vector<Item> to_vector() const;
    /// Python's format: the items' struct formats, joined.
    std::string format() const;
    /// How many items equal `v`; the first index of one (std::invalid_argument when none). Equal
    /// as in Python: numbers by value whatever their type (1, true and 1.0 are equal).
    std::size_t count(const Item& v) const;
    std::size_t index(const Item& v) const;
    /// The segment (name(), unlink(), close()).
    SharedMemory& shm() noexcept { return shm_; }
    const SharedMemory& shm() const noexcept { return shm_; }

private:
    // Tagged: a braced list of one string must not read as a SharedMemory's name.
    struct Attached {};
    ShareableList(Attached, SharedMemory shm);
    std::size_t position(std::int64_t i) const;
    // EmptyHandle on a list moved from: a made or attached list always has N+1 offsets.
    void check_handle() const;
    std::byte* base() const;
    SharedMemory shm_;
    std::vector<std::int64_t> offsets_;  // N+1, from the data area
};

/// A ShareableList travels by its segment's name, as a SharedMemory does.
template <>
struct Codec<ShareableList> {
    static constexpr bool shares_state = true;
    static void encode(Encoder& e, const ShareableList& l) { Codec<SharedMemory>::encode(e, l.shm()); }
    static ShareableList decode(Decoder& d) {
        return ShareableList::attach(Codec<SharedMemory>::decode(d).name());
    }
};

}  // namespace mp
