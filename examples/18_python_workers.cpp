// Lesson 18: Python hands work to C++ workers through an mp manager's queues.
//
// The Python side (examples/18_python_workers.py, run by this program) is the remote-manager
// client from Python's documentation, unchanged:
//
//     QueueManager.register('get_tasks'); QueueManager.register('get_results')
//     m = QueueManager(address=(host, port), authkey=key); m.connect()
//     m.get_tasks().put({'n': 3, 'word': 'job3'}); m.get_results().get()
//
// The C++ side serves the two queues with an mp manager (register_shared: Python's
// register('get_tasks', callable=lambda: tasks)), and three C++ worker processes take the jobs
// with mp::PyManagerClient, as Python dicts, and put back (n, n*n, pid) tuples. An mp manager
// speaks Python's manager protocol to any client whose first request is a pickle; nothing else
// is set up for it.

#include <mp/managers.hpp>
#include <mp/process.hpp>

#include <cstdio>
#include <string>
#include <vector>

#include <spawn.h>
#include <sys/wait.h>
#include <unistd.h>

extern char** environ;

namespace {

const std::string kAuthkey = "abracadabra";

void worker(mp::Address address) {
    mp::PyManagerClient m(address, kAuthkey);
    mp::PyProxy tasks = m.create("get_tasks"), results = m.create("get_results");
    for (;;) {
        mp::py::Object job = tasks.call("get");
        if (job.is_none()) break;  // the stop sentinel
        auto n = job.dict().find("n")->as<long>();
        results.call("put", {mp::py::Object::tuple({n, n * n, static_cast<long>(::getpid())})});
    }
}

// Runs python3 with the script beside this example's source; returns its exit status.
int run_python(const mp::Address& address) {
#ifdef MP_EXAMPLES_DIR  // the project's build says where the sources are
    std::string script = std::string(MP_EXAMPLES_DIR) + "/18_python_workers.py";
#else  // built on its own: beside this file
    std::string script = __FILE__;
    script = script.substr(0, script.find_last_of('/') + 1) + "18_python_workers.py";
#endif
    std::string port = std::to_string(address.port);
    std::vector<char*> argv{const_cast<char*>("python3"), script.data(), const_cast<char*>(address.host.c_str()),
                            port.data(), const_cast<char*>(kAuthkey.c_str()), nullptr};
    pid_t pid = 0;
    if (::posix_spawnp(&pid, "python3", nullptr, nullptr, argv.data(), environ) != 0) {
        std::printf("cannot run python3\n");
        return -1;
    }
    int status = 0;
    ::waitpid(pid, &status, 0);
    return WIFEXITED(status) ? WEXITSTATUS(status) : -1;
}

}  // namespace

int main() {
    mp::BaseManager server(mp::Address("127.0.0.1", 0), kAuthkey);
    server.register_shared("get_tasks", "Queue");
    server.register_shared("get_results", "Queue");
    server.start();
    std::printf("c++: manager on %s, three C++ workers waiting for Python's jobs\n",
                server.address().to_string().c_str());

    std::vector<mp::Process> workers;
    for (int i = 0; i < 3; ++i) workers.emplace_back(worker, server.address());
    for (auto& w : workers) w.start();

    int rc = run_python(server.address());

    mp::PyManagerClient m(server.address(), kAuthkey);
    mp::PyProxy tasks = m.create("get_tasks");
    for (std::size_t i = 0; i < workers.size(); ++i) tasks.call("put", {mp::py::None{}});
    for (auto& w : workers) w.join();
    server.shutdown();
    std::printf("c++: python exited with %d; workers joined, manager shut down\n", rc);
    return rc;
}
