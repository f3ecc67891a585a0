#include "mp/context.hpp"

#include <stdexcept>
#include <string>

#include "launch.hpp"
#include "process_impl.hpp"

namespace mp {
namespace {

// The context's method into options that may already name one: the same is fine, another is a
// contradiction the caller should see.
template <class Options>
Options with_method(Options options, const std::optional<StartMethod>& method, const char* what) {
    if (!method) return options;
    if (options.start_method && *options.start_method != *method)
        throw std::invalid_argument(std::string("mp::Context::") + what + ": start_method " +
                                    to_string(*options.start_method) + " contradicts the context's " +
                                    to_string(*method));
    options.start_method = method;
    return options;
}

}  // namespace

Context get_context() {
    // As Python's get_context(None): taking the default context fixes the default start method,
    // so a later set_start_method without force is refused ("context has already been set").
    (void)mp::get_start_method();
    return Context(std::nullopt);
}

Context get_context(StartMethod method) {
    // Python refuses a context it cannot offer at get_context; so does mp, with the reason.
    if (method == StartMethod::spawn) detail::check_main_hooked();
    return Context(method);
}

Context get_context(std::string_view name) { return get_context(parse_start_method(name)); }

std::vector<StartMethod> get_all_start_methods() {
    if (detail::main_hooked()) return {StartMethod::fork, StartMethod::spawn, StartMethod::forkserver};
    return {StartMethod::fork, StartMethod::forkserver};
}

void set_forkserver_preload(std::vector<PreloadFunction> functions) {
    std::vector<std::string> tasks;
    tasks.reserve(functions.size());
    for (PreloadFunction f : functions) {
        if (f == nullptr) throw std::invalid_argument("mp::set_forkserver_preload: a null function");
        tasks.push_back(detail::make_transferable_task(f).bytes);
    }
    detail::forkserver::set_preload(std::move(tasks));
}

StartMethod Context::get_start_method() const { return method_ ? *method_ : mp::get_start_method(); }

void Context::set_start_method(StartMethod method, bool force) const {
    if (method_) throw std::invalid_argument("mp::Context: cannot set the start method of a concrete context");
    mp::set_start_method(method, force);
}

ProcessOptions Context::process_options(ProcessOptions options) const {
    return with_method(std::move(options), method_, "process_options");
}

PoolOptions Context::pool_options(PoolOptions options) const {
    return with_method(std::move(options), method_, "pool_options");
}

ExecutorOptions Context::executor_options(ExecutorOptions options) const {
    return with_method(std::move(options), method_, "executor_options");
}

}  // namespace mp
