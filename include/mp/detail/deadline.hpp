#pragma once
// Timeouts and deadlines: the one conversion every mp call that takes a timeout goes through.
//
// A std::chrono::duration of any rep and period becomes nanoseconds by saturating, never by
// duration_cast: duration_cast<nanoseconds>(seconds::max()) overflows to a negative count, and a
// "wait for ever" timeout then fails at once. The rules, for every call:
// - zero, negative (and NaN): poll once, as Python's multiprocessing treats a negative timeout;
// - `forever` or longer (~31.7 years, seconds::max(), hours::max(), ...): no limit;
// - anything else: rounded up to whole nanoseconds (a wait never ends early).
// A timeout that is not "no limit" is therefore far below nanoseconds::max(), so no caller's
// `now + timeout` can overflow.

#include <chrono>
#include <optional>
#include <type_traits>

namespace mp::detail {

/// Timeouts at least this long wait for ever.
inline constexpr std::chrono::seconds forever{1'000'000'000};

/// `timeout` as nanoseconds by the rules above; std::nullopt means no limit.
template <class Rep, class Period>
constexpr std::optional<std::chrono::nanoseconds> saturate_timeout(
    std::chrono::duration<Rep, Period> timeout) noexcept {
    using namespace std::chrono;
    // `!(x > 0)` is also true for NaN.
    if (!(timeout > duration<Rep, Period>::zero())) return nanoseconds::zero();
    // Compared in long double seconds, where neither the conversion nor the comparison overflows.
    if (duration<long double>(timeout) >= duration<long double>(forever)) return std::nullopt;
    return ceil<nanoseconds>(timeout);
}

/// A timeout as mp's calls take it. Empty (the default, or std::nullopt): wait for ever. Any
/// std::chrono::duration converts implicitly by the rules above, so f.result(hours::max()) and
/// {.timeout = seconds::max()} wait for ever and a negative timeout polls once.
class Timeout {
public:
    constexpr Timeout() noexcept = default;
    constexpr Timeout(std::nullopt_t) noexcept {}
    template <class Rep, class Period>
    constexpr Timeout(std::chrono::duration<Rep, Period> timeout) noexcept
        : ns_(saturate_timeout(timeout)) {}
    template <class Rep, class Period>
    constexpr Timeout(const std::optional<std::chrono::duration<Rep, Period>>& timeout) noexcept {
        if (timeout) ns_ = saturate_timeout(*timeout);
    }

    /// False: no limit.
    constexpr bool has_value() const noexcept { return ns_.has_value(); }
    constexpr explicit operator bool() const noexcept { return ns_.has_value(); }
    /// The limit, never negative; only when has_value().
    constexpr const std::chrono::nanoseconds& operator*() const noexcept { return *ns_; }
    constexpr const std::chrono::nanoseconds* operator->() const noexcept { return &*ns_; }
    constexpr operator std::optional<std::chrono::nanoseconds>() const noexcept { return ns_; }

    friend constexpr bool operator==(const Timeout&, const Timeout&) = default;

private:
    std::optional<std::chrono::nanoseconds> ns_;
};

/// An absolute deadline on the steady clock; std::nullopt waits forever.
using Deadline = std::optional<std::chrono::steady_clock::time_point>;

/// The deadline `timeout` from now (now itself for zero or negative, none for "for ever").
inline Deadline deadline_after(Timeout timeout) {
    if (!timeout) return std::nullopt;
    return std::chrono::steady_clock::now() +
           std::chrono::ceil<std::chrono::steady_clock::duration>(*timeout);
}
template <class Rep, class Period>
Deadline deadline_after(std::chrono::duration<Rep, Period> timeout) {
    return deadline_after(Timeout(timeout));
}

/// The steady-clock deadline of a time point of any clock, by the timeout rules above applied to
/// its distance from that clock's now(): one passed (Clock::time_point::min() too) polls once,
/// one `forever` or more ahead (a coarse Duration's max() too) has no limit; a steady_clock time
/// point in between is kept as it is (rounded up to the clock's tick). The distance is taken in
/// long double seconds: `when - Clock::now()` in the common duration, or a cast of hours::max() to
/// the steady clock's nanoseconds, would overflow.
template <class Clock, class Duration>
Deadline deadline_at(std::chrono::time_point<Clock, Duration> when) {
    using namespace std::chrono;
    const auto now = Clock::now();
    const duration<long double> left =
        duration<long double>(when.time_since_epoch()) - duration<long double>(now.time_since_epoch());
    // `!(x > 0)` is also true for NaN.
    if (!(left > duration<long double>::zero())) return steady_clock::now();
    if (left >= duration<long double>(forever)) return std::nullopt;
    if constexpr (std::is_same_v<Clock, steady_clock>) {
        // Less than `forever` after now: within the clock's range.
        return ceil<steady_clock::duration>(when);
    } else {
        return deadline_after(left);
    }
}

/// What is left of `deadline`: zero once it has passed, empty when there is none.
inline Timeout remaining(const Deadline& deadline) {
    if (!deadline) return std::nullopt;
    const auto now = std::chrono::steady_clock::now();
    return now < *deadline ? Timeout(*deadline - now) : Timeout(std::chrono::nanoseconds::zero());
}

/// True when `deadline` is set and has passed.
inline bool expired(const Deadline& deadline) noexcept {
    return deadline && std::chrono::steady_clock::now() >= *deadline;
}

}  // namespace mp::detail
