#pragma once
// What the manager's Python protocol (src/manager_python.cpp) needs from the pickle reader
// (src/py_pickle.cpp) beyond the public mp/py.hpp.

#include <string_view>

#include <mp/py.hpp>

namespace mp::py::detail {

/// True for the exception classes a manager reply may carry: Python's built-in exceptions that
/// pickle as the class called with its args, and queue.Empty / queue.Full.
bool is_exception_class(std::string_view module, std::string_view name);

/// py::loads, except that those exception classes called with a tuple of plain arguments are
/// read too, each as the tuple (class name, args) ("KeyError", "_queue.Empty"). Nothing is
/// imported or called; every other global is refused as by loads.
Object loads_with_exceptions(std::string_view pickle, const Limits& limits = {});

}  // namespace mp::py::detail
