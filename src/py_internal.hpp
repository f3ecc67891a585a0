#pragma once
// What the manager's Python protocol (src/manager_python.cpp) needs from the pickle reader
// (src/py_pickle.cpp) beyond the public mp/py.hpp.

#include <cstdint>
#include <string_view>

#include <mp/py.hpp>

namespace mp::py::detail {

/// True for the exception classes a manager reply may carry: Python's built-in exceptions that
/// pickle as the class called with its args, and queue.Empty / queue.Full.
bool is_exception_class(std::string_view module, std::string_view name);

/// Which globals loads_with_exceptions reads as exception classes.
enum class ExceptionClasses : std::uint8_t {
    none,   ///< none (py::loads)
    known,  ///< is_exception_class's
    any,    ///< every one, and a BUILD of plain state after its call (dropped): the exception of a
            ///< manager's '#ERROR' reply may be of a class of the server program's own
};

/// py::loads, except that exception classes (`classes`) called with a tuple of plain arguments
/// are read too, each as the tuple (class name, args) ("KeyError", "_queue.Empty",
/// "__main__.AppError"). Nothing is imported or called; every other global is refused as by loads.
Object loads_with_exceptions(std::string_view pickle, const Limits& limits = {},
                             ExceptionClasses classes = ExceptionClasses::known);

}  // namespace mp::py::detail
