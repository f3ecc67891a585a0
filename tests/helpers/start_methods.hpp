#pragma once
// Suites written once and run under each start method (issue 14): a TEST_P of a fixture derived
// from StartMethodTest, instantiated with MP_INSTANTIATE_START_METHODS, runs as
// StartMethods/<Suite>.<Test>/fork, /forkserver and /spawn.
//
// Under forkserver and spawn the child inherits none of the test's descriptors and none of its
// memory, so a target is transferable (a function or a captureless lambda) and reports through
// files (TempDir) or the mp handles among its arguments; it waits on a FileGate, not a pipe.

#include <gtest/gtest.h>

#include <optional>
#include <string>
#include <utility>

#include "mp/process.hpp"

namespace mp::test {

/// The fixture of a suite run once per start method (GetParam()).
class StartMethodTest : public ::testing::TestWithParam<mp::StartMethod> {
protected:
    mp::StartMethod method() const { return GetParam(); }

    /// Options that start a Process with this run's method.
    mp::ProcessOptions options(std::string name = {}, std::optional<bool> daemon = {}) const {
        mp::ProcessOptions o;
        o.name = std::move(name);
        o.daemon = daemon;
        o.start_method = method();
        return o;
    }
};

/// "fork", "forkserver", "spawn": the last part of the test's name.
inline std::string start_method_name(const ::testing::TestParamInfo<mp::StartMethod>& p) {
    return mp::to_string(p.param);
}

}  // namespace mp::test

#define MP_INSTANTIATE_START_METHODS(suite)                                                      \
    INSTANTIATE_TEST_SUITE_P(StartMethods, suite,                                                \
                             ::testing::Values(mp::StartMethod::fork, mp::StartMethod::forkserver, \
                                               mp::StartMethod::spawn),                          \
                             ::mp::test::start_method_name)
