#pragma once
// Words for what mp reports in messages: type names and how a process ended. One definition
// each (errors.cpp), so every message says it the same way.

#include <string>

namespace mp::detail {

/// The readable (demangled) form of a std::type_info::name(); the name itself when it does not
/// demangle, "unknown" for null.
std::string demangle(const char* name);
/// The demangled type of the exception being handled; "unknown" outside a handler.
std::string current_exception_type_name();
/// "exited with code N", or "was killed by signal N (SIGNAME)" for a negative status -N.
std::string describe_status(int status);

}  // namespace mp::detail
