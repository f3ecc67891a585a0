#pragma once
/// Timeout values every test of a call that takes a timeout runs through (issue 12 item 5: a
/// "wait for ever" duration once overflowed duration_cast and failed at once). Each value keeps
/// its own type, so the call's own conversion is what is tested.
///
///     mp::test::for_each_forever([&](auto forever) { EXPECT_EQ(f.result(forever), 49); });
///     mp::test::for_each_no_wait([&](auto t) { EXPECT_THROW(pending.result(t), mp::TimeoutError); });

#include <chrono>
#include <cstdint>
#include <limits>
#include <string>
#include <typeinfo>

#include <gtest/gtest.h>

namespace mp::test {

/// "count x num/den s", for SCOPED_TRACE.
template <class Rep, class Period>
std::string describe(std::chrono::duration<Rep, Period> d) {
    return std::to_string(static_cast<long double>(d.count())) + " x " + std::to_string(Period::num) +
           "/" + std::to_string(Period::den) + " s (" + typeid(Rep).name() + ")";
}

/// check, called under a SCOPED_TRACE that names the duration it is given.
template <class F>
auto traced(F& check) {
    return [&check](auto d) {
        SCOPED_TRACE(describe(d));
        check(d);
    };
}

/// Calls check(d) for durations that mean "wait for ever": max() of several types, and one just
/// past the saturation point.
template <class F>
void for_each_forever(F&& check) {
    using namespace std::chrono;
    auto run = traced(check);
    run(hours::max());
    run(seconds::max());
    run(milliseconds::max());
    run(nanoseconds::max());
    run(duration<double>::max());
    run(duration<double>(std::numeric_limits<double>::infinity()));
    run(duration<std::uint64_t, std::milli>::max());
    run(hours(24 * 366 * 40));
}

/// Calls check(d) for durations that mean "do not wait": zero and negative ones of several
/// types, min() included (whose conversion once wrapped to a large positive count).
template <class F>
void for_each_no_wait(F&& check) {
    using namespace std::chrono;
    auto run = traced(check);
    run(seconds::zero());
    run(nanoseconds(-1));
    run(seconds(-1));
    run(hours::min());
    run(seconds::min());
    run(milliseconds::min());
    run(duration<double>(-1.5));
    run(-duration<double>::max());
}

}  // namespace mp::test
