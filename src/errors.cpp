#include "mp/errors.hpp"

#include <csignal>
#include <cstring>

namespace mp {
namespace {

std::string describe_death(pid_t pid, int status) {
    std::string s = "worker process " + std::to_string(pid);
    if (status >= 0) {
        s += " exited with code " + std::to_string(status);
    } else {
        const char* name = sigabbrev_np(-status);
        s += " was killed by signal " + std::to_string(-status);
        if (name != nullptr) s += std::string(" (SIG") + name + ")";
    }
    return s;
}

}  // namespace

WorkerDied::WorkerDied(pid_t pid, int status)
    : Error(describe_death(pid, status)), pid_(pid), status_(status) {}

RemoteError::RemoteError(std::string type_name, std::string message, std::string origin)
    : Error(type_name + ": " + message + " (raised in " + origin + ")"),
      type_name_(std::move(type_name)),
      message_(std::move(message)),
      origin_(std::move(origin)) {}

}  // namespace mp
