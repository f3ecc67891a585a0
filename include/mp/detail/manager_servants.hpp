#pragma once
// The server's side of the templated built-in manager types (dict, list, value, array, and the
// queue's typed face), included by include/mp/managers.hpp so that SyncManager::dict<K, V>() and
// the others can register them. The servants that synchronise themselves are in
// src/manager_servants.cpp.

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <map>
#include <memory>
#include <stdexcept>
#include <type_traits>
#include <unordered_map>
#include <utility>
#include <vector>

#include "mp/detail/manager_protocol.hpp"
#include "mp/serialize.hpp"

namespace mp {

namespace detail::managers {

/// Python's index rule: negative counts from the end; out of range throws std::out_of_range.
std::size_t normalise_index(std::int64_t i, std::size_t size, bool allow_end = false);

/// TypeEntry::make for a servant made with no arguments.
template <class S>
std::shared_ptr<void> make_servant(Decoder& in) {
    in.finish();
    return std::make_shared<S>();
}

/// TypeEntry::make for a servant holding one value (its field `v`), sent as the argument.
template <class S>
std::shared_ptr<void> make_servant_holding(Decoder& in) {
    auto s = std::make_shared<S>();
    s->v = in.get<decltype(S::v)>();
    in.finish();
    return s;
}

/// The entry of a servant type S holding one value: made with it, answering `methods`.
template <class S>
TypeEntry holding_entry(decltype(TypeEntry::methods) methods) {
    TypeEntry t;
    t.make = make_servant_holding<S>;
    t.methods = std::move(methods);
    return t;
}

template <class K, class V>
struct DictServant {
    explicit DictServant(std::map<K, V> m = {}) : d(m.begin(), m.end()) {}
    std::unordered_map<K, V> d;
    static TypeEntry entry() {
        using S = DictServant;
        TypeEntry t;
        t.make = [](Decoder& in) -> std::shared_ptr<void> {
            if (in.remaining() == 0) return std::make_shared<S>();
            auto m = in.get<std::map<K, V>>();
            in.finish();
            return std::make_shared<S>(std::move(m));
        };
        t.methods = {
            {"set", make_method<S>([](S& s, const K& k, const V& v) { s.d.insert_or_assign(k, v); })},
            {"get", make_method<S>([](S& s, const K& k) -> V {
                 auto it = s.d.find(k);
                 if (it == s.d.end()) throw std::out_of_range("KeyError: no such key in the dict");
                 return it->second;
             })},
            {"get_or", make_method<S>([](S& s, const K& k, const V& f) -> V {
                 auto it = s.d.find(k);
                 return it == s.d.end() ? f : it->second;
             })},
            {"contains", make_method<S>([](S& s, const K& k) { return s.d.contains(k); })},
            {"size", make_method<S>([](S& s) { return std::uint64_t(s.d.size()); })},
            {"keys", make_method<S>([](S& s) {
                 std::vector<K> r;
                 for (auto& kv : s.d) r.push_back(kv.first);
                 return r;
             })},
            {"values", make_method<S>([](S& s) {
                 std::vector<V> r;
                 for (auto& kv : s.d) r.push_back(kv.second);
                 return r;
             })},
            {"items", make_method<S>([](S& s) {
                 return std::vector<std::pair<K, V>>(s.d.begin(), s.d.end());
             })},
            {"pop", make_method<S>([](S& s, const K& k) -> V {
                 auto it = s.d.find(k);
                 if (it == s.d.end()) throw std::out_of_range("KeyError: no such key in the dict");
                 V v = std::move(it->second);
                 s.d.erase(it);
                 return v;
             })},
            {"erase", make_method<S>([](S& s, const K& k) { return s.d.erase(k) != 0; })},
            {"setdefault", make_method<S>([](S& s, const K& k, const V& v) -> V {
                 return s.d.try_emplace(k, v).first->second;
             })},
            {"update", make_method<S>([](S& s, const std::map<K, V>& m) {
                 for (auto& kv : m) s.d.insert_or_assign(kv.first, kv.second);
             })},
            {"clear", make_method<S>([](S& s) { s.d.clear(); })},
            {"copy", make_method<S>([](S& s) { return std::map<K, V>(s.d.begin(), s.d.end()); })},
        };
        return t;
    }
};

/// The methods of a sequence of fixed length held in S::v (an Array's, and part of a list's).
template <class S, class T>
decltype(TypeEntry::methods) sequence_methods() {
    return {
        {"get", make_method<S>([](S& s, std::int64_t i) -> T {
             return s.v[normalise_index(i, s.v.size())];
         })},
        {"set", make_method<S>([](S& s, std::int64_t i, const T& x) {
             s.v[normalise_index(i, s.v.size())] = x;
         })},
        {"size", make_method<S>([](S& s) { return std::uint64_t(s.v.size()); })},
        {"copy", make_method<S>([](S& s) { return s.v; })},
    };
}

template <class T>
struct ListServant {
    std::vector<T> v;
    static TypeEntry entry() {
        using S = ListServant;
        TypeEntry t = holding_entry<S>({
            {"append", make_method<S>([](S& s, const T& x) { s.v.push_back(x); })},
            {"extend", make_method<S>([](S& s, const std::vector<T>& x) {
                 s.v.insert(s.v.end(), x.begin(), x.end());
             })},
            {"insert", make_method<S>([](S& s, std::int64_t i, const T& x) {
                 // Python clamps insert positions instead of raising.
                 auto n = static_cast<std::int64_t>(s.v.size());
                 if (i < 0) i = std::max<std::int64_t>(0, i + n);
                 if (i > n) i = n;
                 s.v.insert(s.v.begin() + i, x);
             })},
            {"pop", make_method<S>([](S& s, std::int64_t i) -> T {
                 if (s.v.empty()) throw std::out_of_range("IndexError: pop from empty list");
                 std::size_t k = normalise_index(i, s.v.size());
                 T x = std::move(s.v[k]);
                 s.v.erase(s.v.begin() + static_cast<std::ptrdiff_t>(k));
                 return x;
             })},
            {"remove", make_method<S>([](S& s, const T& x) {
                 for (auto it = s.v.begin(); it != s.v.end(); ++it)
                     if (*it == x) {
                         s.v.erase(it);
                         return;
                     }
                 throw std::invalid_argument("ValueError: list.remove(x): x not in list");
             })},
            {"index", make_method<S>([](S& s, const T& x) -> std::uint64_t {
                 for (std::size_t i = 0; i < s.v.size(); ++i)
                     if (s.v[i] == x) return i;
                 throw std::invalid_argument("ValueError: x is not in list");
             })},
            {"count", make_method<S>([](S& s, const T& x) {
                 std::uint64_t n = 0;
                 for (auto& y : s.v) n += (y == x);
                 return n;
             })},
            {"clear", make_method<S>([](S& s) { s.v.clear(); })},
            {"reverse", make_method<S>([](S& s) { std::reverse(s.v.begin(), s.v.end()); })},
            {"sort", make_method<S>([](S& s) {
                 if constexpr (requires(T a, T b) { a < b; }) {
                     std::sort(s.v.begin(), s.v.end());
                 } else {
                     throw std::invalid_argument("TypeError: the element type has no operator<");
                 }
             })},
        });
        t.methods.merge(sequence_methods<S, T>());  // a list is an array that can change its length
        return t;
    }
};

template <class T>
struct ValueServant {
    T v{};
    static TypeEntry entry() {
        using S = ValueServant;
        TypeEntry t = holding_entry<S>({
            {"get", make_method<S>([](S& s) -> T { return s.v; })},
            {"set", make_method<S>([](S& s, const T& x) { s.v = x; })},
        });
        if constexpr (std::is_arithmetic_v<T>)
            t.methods["fetch_add"] = make_method<S>([](S& s, const T& x) -> T {
                T old = s.v;
                s.v = static_cast<T>(s.v + x);
                return old;
            });
        return t;
    }
};

template <class T>
struct ArrayServant {
    std::vector<T> v;
    static TypeEntry entry() { return holding_entry<ArrayServant>(sequence_methods<ArrayServant, T>()); }
};

/// The untyped core of the server's queue (items as encoded bytes).
struct QueueCore;
TypeEntry queue_entry();

template <class T>
struct QueueServant {
    static TypeEntry entry() { return queue_entry(); }
};

}  // namespace detail::managers

}  // namespace mp
