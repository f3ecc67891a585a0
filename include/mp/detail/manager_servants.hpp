#pragma once
// The server's side of the templated built-in manager types (dict, list, value, array, and the
// queue's typed face), included by include/mp/managers.hpp so that SyncManager::dict<K, V>() and
// the others can register them. The servants that synchronise themselves are in
// src/manager_servants.cpp.

#include <algorithm>
#include <concepts>
#include <cstddef>
#include <cstdint>
#include <iterator>
#include <list>
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

/// A dict keeps insertion order, as Python's (3.7+): keys(), items() and popitem() (LIFO) follow
/// it; setting an existing key keeps its place.
template <class K, class V>
struct DictServant {
    using Items = std::list<std::pair<K, V>>;
    Items items;
    std::unordered_map<K, typename Items::iterator> index;

    void set(const K& k, const V& v) {
        if (auto it = index.find(k); it != index.end()) {
            it->second->second = v;
            return;
        }
        items.emplace_back(k, v);
        index.emplace(k, std::prev(items.end()));
    }
    V* find(const K& k) {
        auto it = index.find(k);
        return it == index.end() ? nullptr : &it->second->second;
    }
    V& at(const K& k) {
        if (V* v = find(k)) return *v;
        throw std::out_of_range("KeyError: no such key in the dict");
    }
    V take(typename Items::iterator it) {
        V v = std::move(it->second);
        index.erase(it->first);
        items.erase(it);
        return v;
    }

    static TypeEntry entry() {
        using S = DictServant;
        using Pairs = std::vector<std::pair<K, V>>;
        TypeEntry t;
        t.make = [](Decoder& in) -> std::shared_ptr<void> {
            auto s = std::make_shared<S>();
            if (in.remaining() == 0) return s;
            for (auto& [k, v] : in.get<Pairs>()) s->set(k, v);
            in.finish();
            return s;
        };
        t.methods = {
            {"set", make_method<S>([](S& s, const K& k, const V& v) { s.set(k, v); })},
            {"get", make_method<S>([](S& s, const K& k) -> V { return s.at(k); })},
            {"get_or", make_method<S>([](S& s, const K& k, const V& f) -> V {
                 const V* v = s.find(k);
                 return v ? *v : f;
             })},
            {"contains", make_method<S>([](S& s, const K& k) { return s.index.contains(k); })},
            {"size", make_method<S>([](S& s) { return std::uint64_t(s.items.size()); })},
            {"keys", make_method<S>([](S& s) {
                 std::vector<K> r;
                 for (auto& kv : s.items) r.push_back(kv.first);
                 return r;
             })},
            {"values", make_method<S>([](S& s) {
                 std::vector<V> r;
                 for (auto& kv : s.items) r.push_back(kv.second);
                 return r;
             })},
            {"items", make_method<S>([](S& s) { return Pairs(s.items.begin(), s.items.end()); })},
            {"pop", make_method<S>([](S& s, const K& k) -> V {
                 auto it = s.index.find(k);
                 if (it == s.index.end()) throw std::out_of_range("KeyError: no such key in the dict");
                 return s.take(it->second);
             })},
            {"pop_or", make_method<S>([](S& s, const K& k, const V& f) -> V {
                 auto it = s.index.find(k);
                 return it == s.index.end() ? f : s.take(it->second);
             })},
            {"popitem", make_method<S>([](S& s) -> std::pair<K, V> {
                 if (s.items.empty()) throw std::out_of_range("KeyError: popitem(): dictionary is empty");
                 K k = s.items.back().first;
                 return {std::move(k), s.take(std::prev(s.items.end()))};
             })},
            {"erase", make_method<S>([](S& s, const K& k) {
                 auto it = s.index.find(k);
                 if (it == s.index.end()) return false;
                 s.take(it->second);
                 return true;
             })},
            {"setdefault", make_method<S>([](S& s, const K& k, const V& v) -> V {
                 if (const V* old = s.find(k)) return *old;
                 s.set(k, v);
                 return v;
             })},
            {"update", make_method<S>([](S& s, const Pairs& kvs) {
                 for (auto& [k, v] : kvs) s.set(k, v);
             })},
            {"clear", make_method<S>([](S& s) {
                 s.index.clear();
                 s.items.clear();
             })},
            {"copy", make_method<S>([](S& s) { return std::map<K, V>(s.items.begin(), s.items.end()); })},
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
    // A list may hold what has no operator== (proxies to other managed objects, as Python's
    // lists of proxies): then only remove, index and count refuse, as sort does without <.
    static bool equal(const T& a, const T& b) {
        if constexpr (std::equality_comparable<T>)
            return a == b;
        else
            throw std::invalid_argument("TypeError: the element type has no operator==");
    }
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
                 auto it = std::find_if(s.v.begin(), s.v.end(), [&](const T& y) { return equal(y, x); });
                 if (it == s.v.end()) throw std::invalid_argument("ValueError: list.remove(x): x not in list");
                 s.v.erase(it);
             })},
            {"index", make_method<S>([](S& s, const T& x) -> std::uint64_t {
                 for (std::size_t i = 0; i < s.v.size(); ++i)
                     if (equal(s.v[i], x)) return i;
                 throw std::invalid_argument("ValueError: x is not in list");
             })},
            {"count", make_method<S>([](S& s, const T& x) {
                 std::uint64_t n = 0;
                 for (auto& y : s.v) n += equal(y, x);
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
