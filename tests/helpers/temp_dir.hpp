#pragma once
// A directory of its own for the files of one test, removed with its content.

#include <dirent.h>
#include <fstream>
#include <stdexcept>
#include <string>
#include <unistd.h>

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
        if (DIR* d = ::opendir(path.c_str())) {
            while (dirent* e = ::readdir(d)) {
                std::string n = e->d_name;
                if (n != "." && n != "..") ::unlink((path + "/" + n).c_str());
            }
            ::closedir(d);
        }
        ::rmdir(path.c_str());
    }
    std::string file(const std::string& name) const { return path + "/" + name; }
    void touch(const std::string& name) const { std::ofstream(file(name)) << "x"; }
};

}  // namespace mp::test
