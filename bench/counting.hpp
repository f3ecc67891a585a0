// counting(first, last): the numbers first, first + 1, ... last - 1 as a lazy range, for map
// inputs. It stands in for std::views::iota, which clang 14 cannot compile against libstdc++ 12
// (it fails on every view_interface), so the benchmarks build with both compilers.
#pragma once

#include <cstddef>
#include <iterator>

namespace mp_bench {

template <class T>
class Counting {
public:
    Counting(T first, T last) : first_(first), last_(last) {}

    class iterator {
    public:
        using value_type = T;
        using difference_type = std::ptrdiff_t;
        iterator() = default;
        explicit iterator(T v) : v_(v) {}
        T operator*() const { return v_; }
        iterator& operator++() {
            ++v_;
            return *this;
        }
        iterator operator++(int) {
            iterator old = *this;
            ++v_;
            return old;
        }
        friend bool operator==(const iterator&, const iterator&) = default;

    private:
        T v_{};
    };

    iterator begin() const { return iterator(first_); }
    iterator end() const { return iterator(last_); }

private:
    T first_;
    T last_;
};

template <class T>
Counting<T> counting(T first, T last) {
    return Counting<T>(first, last);
}

}  // namespace mp_bench
