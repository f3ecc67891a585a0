#include "mp/errors.hpp"

#include <cxxabi.h>

#include <csignal>
#include <cstdlib>
#include <cstring>
#include <typeinfo>

#include "describe.hpp"

namespace mp {
namespace {

std::string describe_death(pid_t pid, int status, const std::string& where) {
    return "worker process " + std::to_string(pid) + (where.empty() ? "" : " of " + where) + " " +
           detail::describe_status(status);
}

}  // namespace

namespace detail {

std::string demangle(const char* name) {
    if (name == nullptr) return "unknown";
    int status = 0;
    char* out = abi::__cxa_demangle(name, nullptr, nullptr, &status);
    std::string s = (status == 0 && out != nullptr) ? out : name;
    std::free(out);
    return s;
}

std::string current_exception_type_name() {
    const std::type_info* t = abi::__cxa_current_exception_type();
    return demangle(t != nullptr ? t->name() : nullptr);
}

std::string describe_status(int status) {
    if (status >= 0) return "exited with code " + std::to_string(status);
    if (status == WorkerDied::unknown_status)
        return "ended, how is unknown (its exit status was collected by someone else, or lost "
               "with its forkserver)";
    const char* name = ::sigabbrev_np(-status);
    return "was killed by signal " + std::to_string(-status) +
           (name != nullptr ? std::string(" (SIG") + name + ")" : std::string());
}

}  // namespace detail

WorkerDied::WorkerDied(pid_t pid, int status) : WorkerDied(pid, status, std::string()) {}

WorkerDied::WorkerDied(pid_t pid, int status, std::string where)
    : Error(describe_death(pid, status, where)), pid_(pid), status_(status), where_(std::move(where)) {}

RemoteError::RemoteError(std::string type_name, std::string message, std::string origin)
    : Error(type_name + ": " + message + " (raised in " + origin + ")"),
      type_name_(std::move(type_name)),
      message_(std::move(message)),
      origin_(std::move(origin)) {}

}  // namespace mp
