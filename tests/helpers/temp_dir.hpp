#pragma once
// A directory of its own for the files of one test, removed with its content.

#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <stdexcept>
#include <string>
#include <system_error>

namespace mp::test {

struct TempDir {
    std::string path;
    TempDir() {
        char tmpl[] = "/tmp/mp_test.XXXXXX";
        if (::mkdtemp(tmpl) == nullptr) throw std::runtime_error("mkdtemp failed");
        path = tmpl;
    }
    TempDir(const TempDir&) = delete;
    TempDir& operator=(const TempDir&) = delete;
    ~TempDir() {
        std::error_code ec;
        std::filesystem::remove_all(path, ec);
    }
    std::string file(const std::string& name) const { return path + "/" + name; }
    bool exists(const std::string& name) const { return ::access(file(name).c_str(), F_OK) == 0; }
    void touch(const std::string& name) const { std::ofstream(file(name)) << "x\n"; }
};

}  // namespace mp::test
