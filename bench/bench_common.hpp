#pragma once
// Shared plumbing of the bench/*_bench.cpp programs: argument parsing, one JSON result line per
// invocation, latency percentiles, child processes and their start signals.
//
// Every benchmark program measures ONE (scenario, variant) pair per invocation:
//     <program> --scenario S --variant V [--n N] [--key value ...]
// and prints exactly one JSON object on stdout. bench/run interleaves the invocations
// (A B A B ...) so that a slow phase of a shared machine hits every variant alike; measuring one
// pair per process also keeps one variant's heap and page cache out of the next one's numbers.
// A variant whose steward side does not exist yet prints status "not_measured" with the reason:
// no number is ever made up.

#include <fcntl.h>
#include <signal.h>
#include <spawn.h>
#include <sys/ioctl.h>
#include <sys/resource.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <functional>
#include <map>
#include <stdexcept>
#include <string>
#include <system_error>
#include <thread>
#include <vector>

extern char** environ;

namespace bench {

using clock = std::chrono::steady_clock;

inline double seconds_since(clock::time_point t0) {
    return std::chrono::duration<double>(clock::now() - t0).count();
}

struct args {
    std::string scenario;
    std::string variant;
    std::size_t n = 0;
    std::map<std::string, std::string> opts;

    [[nodiscard]] std::string get(const std::string& key, const std::string& fallback = {}) const {
        const auto it = opts.find(key);
        return it == opts.end() ? fallback : it->second;
    }
    [[nodiscard]] std::size_t get_size(const std::string& key, std::size_t fallback) const {
        const auto it = opts.find(key);
        return it == opts.end() ? fallback : std::strtoull(it->second.c_str(), nullptr, 10);
    }
};

inline args parse_args(int argc, char** argv, std::size_t default_n) {
    args a;
    a.n = default_n;
    for (int i = 1; i + 1 < argc; i += 2) {
        std::string key = argv[i];
        const std::string value = argv[i + 1];
        if (key.rfind("--", 0) == 0) key = key.substr(2);
        if (key == "scenario")
            a.scenario = value;
        else if (key == "variant")
            a.variant = value;
        else if (key == "n")
            a.n = std::strtoull(value.c_str(), nullptr, 10);
        else
            a.opts[key] = value;
    }
    return a;
}

inline std::string json_escape(const std::string& s) {
    std::string out;
    for (const char c : s) {
        switch (c) {
            case '"':
                out += "\\\"";
                break;
            case '\\':
                out += "\\\\";
                break;
            case '\n':
                out += "\\n";
                break;
            case '\t':
                out += "\\t";
                break;
            default:
                if (static_cast<unsigned char>(c) < 0x20) {
                    char buf[8];
                    std::snprintf(buf, sizeof buf, "\\u%04x", c);
                    out += buf;
                } else {
                    out += c;
                }
        }
    }
    return out;
}

// The one JSON object a run prints. `value` is in `unit`; `higher_is_better` tells the runner
// which way ratios point.
class result {
public:
    result(const args& a, std::string unit, bool higher_is_better)
        : scenario_(a.scenario), variant_(a.variant), unit_(std::move(unit)), higher_(higher_is_better) {}

    void value(double v) { value_ = v; }
    void count(std::size_t n) { count_ = n; }
    [[nodiscard]] std::size_t count_value() const { return count_; }
    void seconds(double s) { seconds_ = s; }
    void extra(const std::string& key, double v) { extras_.emplace_back(key, v); }
    void latencies_ns(std::vector<double> samples) { latencies_ = std::move(samples); }

    void print() const {
        std::string out = "{\"scenario\":\"" + json_escape(scenario_) + "\",\"variant\":\"" +
                          json_escape(variant_) + "\",\"status\":\"ok\",\"unit\":\"" + json_escape(unit_) +
                          "\",\"higher_is_better\":" + (higher_ ? "true" : "false") +
                          ",\"value\":" + num(value_) + ",\"count\":" + std::to_string(count_) +
                          ",\"seconds\":" + num(seconds_);
        if (!latencies_.empty()) {
            std::vector<double> s = latencies_;
            std::sort(s.begin(), s.end());
            out += ",\"latency_ns\":{\"p50\":" + num(percentile(s, 0.50)) +
                   ",\"p99\":" + num(percentile(s, 0.99)) + ",\"max\":" + num(s.back()) +
                   ",\"samples\":" + std::to_string(s.size()) + "}";
        }
        if (!extras_.empty()) {
            out += ",\"extra\":{";
            for (std::size_t i = 0; i < extras_.size(); ++i)
                out += (i ? ",\"" : "\"") + json_escape(extras_[i].first) + "\":" + num(extras_[i].second);
            out += "}";
        }
        out += "}\n";
        std::fputs(out.c_str(), stdout);
        std::fflush(stdout);
    }

    static double percentile(const std::vector<double>& sorted, double q) {
        if (sorted.empty()) return 0;
        const std::size_t i =
            std::min(sorted.size() - 1, static_cast<std::size_t>(q * static_cast<double>(sorted.size())));
        return sorted[i];
    }

private:
    static std::string num(double v) {
        char buf[64];
        std::snprintf(buf, sizeof buf, "%.6g", v);
        return buf;
    }

    std::string scenario_, variant_, unit_;
    bool higher_;
    double value_ = 0;
    std::size_t count_ = 0;
    double seconds_ = 0;
    std::vector<std::pair<std::string, double>> extras_;
    std::vector<double> latencies_;
};

inline int not_measured(const args& a, const std::string& reason) {
    std::printf("{\"scenario\":\"%s\",\"variant\":\"%s\",\"status\":\"not_measured\",\"reason\":\"%s\"}\n",
                json_escape(a.scenario).c_str(), json_escape(a.variant).c_str(), json_escape(reason).c_str());
    return 0;
}

inline int failed(const args& a, const std::string& reason) {
    std::printf("{\"scenario\":\"%s\",\"variant\":\"%s\",\"status\":\"error\",\"reason\":\"%s\"}\n",
                json_escape(a.scenario).c_str(), json_escape(a.variant).c_str(), json_escape(reason).c_str());
    return 1;
}

[[noreturn]] inline void die(const char* what) {
    throw std::system_error(errno, std::system_category(), what);
}

inline void check(bool ok, const char* what) {
    if (!ok) die(what);
}

// Blocking full read/write on a descriptor (control pipes between a benchmark and its child).
inline void write_all(int fd, const void* data, std::size_t size) {
    const char* p = static_cast<const char*>(data);
    while (size > 0) {
        const ssize_t n = ::write(fd, p, size);
        if (n < 0 && errno == EINTR) continue;
        check(n > 0, "write");
        p += n;
        size -= static_cast<std::size_t>(n);
    }
}

inline bool read_all(int fd, void* data, std::size_t size) {
    char* p = static_cast<char*>(data);
    while (size > 0) {
        const ssize_t n = ::read(fd, p, size);
        if (n < 0 && errno == EINTR) continue;
        if (n <= 0) return false;
        p += n;
        size -= static_cast<std::size_t>(n);
    }
    return true;
}

// A pair of pipes between the benchmark (parent) and a forked child: `to_child` and `to_parent`.
struct channel {
    int parent_read = -1, parent_write = -1, child_read = -1, child_write = -1;

    static channel make() {
        int a[2], b[2];
        check(::pipe2(a, O_CLOEXEC) == 0 && ::pipe2(b, O_CLOEXEC) == 0, "pipe2");
        return channel{b[0], a[1], a[0], b[1]};
    }
    void in_child() {
        ::close(parent_read);
        ::close(parent_write);
        parent_read = parent_write = -1;
    }
    void in_parent() {
        ::close(child_read);
        ::close(child_write);
        child_read = child_write = -1;
    }
    template <typename T>
    void send_to_child(const T& v) const {
        write_all(parent_write, &v, sizeof v);
    }
    template <typename T>
    T receive_from_child() const {
        T v{};
        if (!read_all(parent_read, &v, sizeof v)) throw std::runtime_error("child went away");
        return v;
    }
    template <typename T>
    void send_to_parent(const T& v) const {
        write_all(child_write, &v, sizeof v);
    }
    template <typename T>
    bool receive_from_parent(T& v) const {
        return read_all(child_read, &v, sizeof v);
    }
};

// fork() running `body` in the child, which exits 0 on return and 1 on an exception (the reason
// goes to stderr).
inline pid_t fork_child(const std::function<void()>& body) {
    std::fflush(stdout);
    const pid_t pid = ::fork();
    check(pid >= 0, "fork");
    if (pid == 0) {
        int status = 0;
        try {
            body();
        } catch (const std::exception& e) {
            std::fprintf(stderr, "bench child: %s\n", e.what());
            status = 1;
        }
        std::fflush(stdout);
        ::_exit(status);
    }
    return pid;
}

// Waits for @p pid; returns its exit status (128 + signal when killed).
inline int wait_child(pid_t pid) {
    int status = 0;
    while (::waitpid(pid, &status, 0) < 0) {
        if (errno != EINTR) die("waitpid");
    }
    if (WIFEXITED(status)) return WEXITSTATUS(status);
    return 128 + WTERMSIG(status);
}

// posix_spawn of @p argv with @p fd_in_child placed as descriptor 3 (if >= 0) and stderr sent to
// /dev/null when @p quiet. Returns the pid.
inline pid_t spawn_with_fd3(const std::vector<std::string>& argv, int fd_in_child, bool quiet) {
    posix_spawn_file_actions_t fa;
    posix_spawn_file_actions_init(&fa);
    if (fd_in_child >= 0) posix_spawn_file_actions_adddup2(&fa, fd_in_child, 3);
    if (quiet) posix_spawn_file_actions_addopen(&fa, 2, "/dev/null", O_WRONLY, 0);
    posix_spawn_file_actions_addopen(&fa, 1, "/dev/null", O_WRONLY, 0);
    std::vector<char*> cargv;
    for (const auto& s : argv) cargv.push_back(const_cast<char*>(s.c_str()));
    cargv.push_back(nullptr);
    pid_t pid = -1;
    const int rc = ::posix_spawn(&pid, cargv[0], &fa, nullptr, cargv.data(), environ);
    posix_spawn_file_actions_destroy(&fa);
    if (rc != 0) {
        errno = rc;
        die("posix_spawn");
    }
    return pid;
}

// "/proc/<pid>/status" field in KiB (VmHWM, VmRSS), -1 if absent.
inline long proc_status_kib(pid_t pid, const char* field) {
    std::ifstream status("/proc/" + std::to_string(pid) + "/status");
    const std::string prefix = std::string(field) + ":";
    for (std::string line; std::getline(status, line);)
        if (line.rfind(prefix, 0) == 0) return std::strtol(line.c_str() + prefix.size(), nullptr, 10);
    return -1;
}

// The scheduler state letter of @p pid ('R', 'S', ...), '?' if unknown.
inline char proc_state(pid_t pid) {
    std::ifstream stat("/proc/" + std::to_string(pid) + "/stat");
    std::string all((std::istreambuf_iterator<char>(stat)), std::istreambuf_iterator<char>());
    const auto close_paren = all.rfind(')');
    if (close_paren == std::string::npos || close_paren + 2 >= all.size()) return '?';
    return all[close_paren + 2];
}

inline int pipe_bytes_queued(int fd) {
    int n = 0;
    if (::ioctl(fd, FIONREAD, &n) != 0) return -1;
    return n;
}

// Waits until the reader of the pipe whose write end is @p write_fd has taken every byte and
// process @p reader sleeps (blocked reading the empty pipe) on three checks in a row: the reader
// has then processed everything written so far. Gives up after @p limit.
inline bool wait_reader_idle(int write_fd, pid_t reader,
                             std::chrono::milliseconds limit = std::chrono::seconds(60)) {
    const auto deadline = clock::now() + limit;
    int idle = 0;
    while (clock::now() < deadline) {
        const char state = proc_state(reader);
        if (state == 'Z' || state == '?') return false;
        if (pipe_bytes_queued(write_fd) == 0 && state == 'S')
            ++idle;
        else
            idle = 0;
        if (idle >= 3) return true;
        std::this_thread::sleep_for(std::chrono::milliseconds(2));
    }
    return false;
}

// CPU time (user, system) of this process (all threads) over the windows between begin() and
// end(), in seconds.
struct cpu_meter {
    double user = 0, sys = 0;
    rusage start{};
    bool running = false;

    static double secs(const timeval& t) {
        return static_cast<double>(t.tv_sec) + static_cast<double>(t.tv_usec) * 1e-6;
    }
    void begin() {
        ::getrusage(RUSAGE_SELF, &start);
        running = true;
    }
    void end() {
        if (!running) return;
        rusage now{};
        ::getrusage(RUSAGE_SELF, &now);
        user += secs(now.ru_utime) - secs(start.ru_utime);
        sys += secs(now.ru_stime) - secs(start.ru_stime);
        running = false;
    }
};

inline void raise_nofile_limit() {
    rlimit r{};
    if (::getrlimit(RLIMIT_NOFILE, &r) == 0 && r.rlim_cur < r.rlim_max) {
        r.rlim_cur = r.rlim_max;
        ::setrlimit(RLIMIT_NOFILE, &r);
    }
}

inline std::string env_or(const char* name, const std::string& fallback) {
    const char* v = std::getenv(name);
    return v && *v ? std::string(v) : fallback;
}

}  // namespace bench
