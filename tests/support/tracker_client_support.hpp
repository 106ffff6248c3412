#pragma once
// Helpers for the tracker client suites: unique names, a recorder standing in for the daemon,
// capturing the daemon's stderr, and process inspection through /proc.

#include <steward/tracker.hpp>
#include <steward/unique_fd.hpp>

#include <boost/test/unit_test.hpp>

#include <dirent.h>
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <set>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

namespace steward::test {

/// "<stem>_<pid>_<n>": unique across the processes of a test run.
inline std::string unique_stem(std::string_view stem) {
    static std::atomic<int> counter{0};
    return "stw_cl_" + std::string(stem) + "_" + std::to_string(::getpid()) + "_" + std::to_string(counter++);
}

inline bool shm_exists(const std::string& canonical) {
    return ::access(("/dev/shm" + canonical).c_str(), F_OK) == 0;
}
inline bool sem_exists(const std::string& canonical) {
    return ::access(("/dev/shm/sem." + canonical.substr(1)).c_str(), F_OK) == 0;
}

/// Entries of /dev/shm whose name contains @p needle.
inline std::vector<std::string> dev_shm_matching(std::string_view needle) {
    std::vector<std::string> out;
    if (DIR* d = ::opendir("/dev/shm")) {
        while (auto* e = ::readdir(d))
            if (std::string_view(e->d_name).find(needle) != std::string_view::npos)
                out.emplace_back(e->d_name);
        ::closedir(d);
    }
    return out;
}

/// Removes every /dev/shm entry containing @p needle (test cleanup, whatever happened).
inline void scrub_dev_shm(std::string_view needle) {
    for (const auto& n : dev_shm_matching(needle)) ::unlink(("/dev/shm/" + n).c_str());
}

/// A temporary directory removed with its contents at scope exit.
struct temp_dir {
    std::filesystem::path path;
    explicit temp_dir(std::string_view stem)
        : path(std::filesystem::temp_directory_path() / unique_stem(stem)) {
        std::filesystem::create_directories(path);
    }
    ~temp_dir() {
        std::error_code ec;
        std::filesystem::remove_all(path, ec);
    }
};

inline std::string read_file(const std::filesystem::path& p) {
    std::ifstream in(p, std::ios::binary);
    std::stringstream ss;
    ss << in.rdbuf();
    return ss.str();
}

/// A shell script that stands in for steward-tracker and copies its fd 3 to @p out until EOF.
inline std::string make_recorder(const std::filesystem::path& dir, const std::filesystem::path& out) {
    const auto script = dir / "recorder.sh";
    {
        std::ofstream f(script);
        f << "#!/bin/sh\nexec cat <&3 >'" << out.string() << "'\n";
    }
    ::chmod(script.c_str(), 0700);
    return script.string();
}

/// While alive, this process's stderr goes to a file (so a daemon spawned meanwhile inherits it).
struct stderr_capture {
    std::filesystem::path file;
    int saved = -1;
    explicit stderr_capture(const std::filesystem::path& f) : file(f) {
        std::fflush(stderr);
        saved = ::fcntl(2, F_DUPFD_CLOEXEC, 3);
        const int fd = ::open(f.c_str(), O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0600);
        ::dup2(fd, 2);
        ::close(fd);
    }
    void restore() {
        if (saved < 0) return;
        std::fflush(stderr);
        ::dup2(saved, 2);
        ::close(saved);
        saved = -1;
    }
    ~stderr_capture() { restore(); }
    std::string text() const { return read_file(file); }
};

/// pids whose parent is this process.
inline std::vector<int> child_pids() {
    std::vector<int> out;
    const int me = ::getpid();
    if (DIR* d = ::opendir("/proc")) {
        while (auto* e = ::readdir(d)) {
            const int pid = std::atoi(e->d_name);
            if (pid <= 0) continue;
            std::ifstream f("/proc/" + std::to_string(pid) + "/stat");
            std::string s;
            std::getline(f, s);
            const auto close = s.rfind(')');
            if (close == std::string::npos) continue;
            std::istringstream rest(s.substr(close + 2));
            char state;
            int ppid = 0;
            rest >> state >> ppid;
            if (ppid == me && state != 'Z') out.push_back(pid);
        }
        ::closedir(d);
    }
    return out;
}

/// One "Key:\tvalue" line of /proc/PID/status.
inline std::string proc_status_field(int pid, const std::string& key) {
    std::ifstream f("/proc/" + std::to_string(pid) + "/status");
    std::string line;
    while (std::getline(f, line))
        if (line.rfind(key + ":", 0) == 0) {
            auto v = line.substr(key.size() + 1);
            v.erase(0, v.find_first_not_of(" \t"));
            return v;
        }
    return {};
}

/// Blocks until process @p pid (not necessarily a child) has exited, up to @p limit. Without reaping.
inline bool wait_gone(int pid, std::chrono::milliseconds limit = std::chrono::milliseconds(10000)) {
    const int fd = static_cast<int>(::syscall(SYS_pidfd_open, pid, 0));
    if (fd < 0) return errno == ESRCH;
    unique_fd guard(fd);
    pollfd p{fd, POLLIN, 0};
    return ::poll(&p, 1, static_cast<int>(limit.count())) == 1;
}

}  // namespace steward::test
