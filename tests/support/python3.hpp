#pragma once
// Running the system python3 from a test: availability as a Boost.Test precondition (absent ->
// the test is reported skipped, never passed), a helper to capture a snippet's stdout, and hex
// conversions for comparing bytes with what CPython prints.

#include "support/test_support.hpp"

#include <boost/test/unit_test.hpp>

#include <sys/wait.h>
#include <unistd.h>

#include <cstddef>
#include <cstdio>
#include <cstdlib>
#include <span>
#include <string>
#include <string_view>
#include <vector>

namespace steward::test {

/// Absolute path of python3 on PATH, or empty.
inline std::string find_python3() {
    const char* path = std::getenv("PATH");
    if (!path) return {};
    std::string_view rest(path);
    while (!rest.empty()) {
        const auto colon = rest.find(':');
        std::string dir(rest.substr(0, colon));
        rest = colon == std::string_view::npos ? std::string_view{} : rest.substr(colon + 1);
        if (dir.empty()) continue;
        std::string candidate = dir + "/python3";
        if (::access(candidate.c_str(), X_OK) == 0) return candidate;
    }
    return {};
}

/// True when `python3 -c 'import multiprocessing'` runs.
inline bool python3_usable() {
    static const bool usable = [] {
        const std::string py = find_python3();
        if (py.empty()) return false;
        const std::string cmd =
            "'" + py + "' -c 'import multiprocessing.connection, pickle, hmac' 2>/dev/null";
        return std::system(cmd.c_str()) == 0;
    }();
    return usable;
}

/// Boost.Test precondition: python3 usable (else the test is skipped with a message).
inline boost::test_tools::assertion_result python3_available(boost::unit_test::test_unit_id) {
    boost::test_tools::assertion_result result(python3_usable());
    if (!python3_usable()) result.message() << "python3 not found on PATH, CPython interop test skipped";
    return result;
}

/// Single-quotes @p s for /bin/sh.
inline std::string shell_quote(std::string_view s) {
    std::string out = "'";
    for (char c : s) {
        if (c == '\'')
            out += "'\\''";
        else
            out.push_back(c);
    }
    out.push_back('\'');
    return out;
}

/// Runs `python3 -c CODE` and returns its stdout (trailing newline removed); fails the test if
/// python exits non-zero.
inline std::string run_python(std::string_view code) {
    const std::string cmd = shell_quote(find_python3()) + " -c " + shell_quote(code);
    FILE* pipe = ::popen(cmd.c_str(), "re");
    BOOST_REQUIRE_MESSAGE(pipe, "popen python3 failed");
    std::string out;
    char buf[4096];
    while (std::size_t n = std::fread(buf, 1, sizeof buf, pipe)) out.append(buf, n);
    const int status = ::pclose(pipe);
    BOOST_REQUIRE_MESSAGE(WIFEXITED(status) && WEXITSTATUS(status) == 0, "python3 failed: " << code);
    while (!out.empty() && (out.back() == '\n' || out.back() == '\r')) out.pop_back();
    return out;
}

inline std::string to_hex(std::span<const std::byte> bytes) {
    static constexpr char digits[] = "0123456789abcdef";
    std::string out;
    for (std::byte b : bytes) {
        out.push_back(digits[std::to_integer<int>(b) >> 4]);
        out.push_back(digits[std::to_integer<int>(b) & 15]);
    }
    return out;
}

inline std::vector<std::byte> from_hex(std::string_view hex) {
    std::vector<std::byte> out;
    auto value = [](char c) {
        if (c >= '0' && c <= '9') return c - '0';
        if (c >= 'a' && c <= 'f') return c - 'a' + 10;
        return c - 'A' + 10;
    };
    std::size_t i = 0;
    while (i + 1 < hex.size()) {
        if (hex[i] == ' ') {
            ++i;
            continue;
        }
        out.push_back(static_cast<std::byte>(value(hex[i]) * 16 + value(hex[i + 1])));
        i += 2;
    }
    return out;
}

inline std::vector<std::byte> bytes_of(std::string_view s) {
    const auto b = std::as_bytes(std::span<const char>(s.data(), s.size()));
    return {b.begin(), b.end()};
}

}  // namespace steward::test

#include <steward/unique_fd.hpp>

#include <fcntl.h>
#include <signal.h>

#include <spawn.h>
#include <cerrno>

#include <initializer_list>

extern char** environ;

namespace steward::test {

/// A python3 child whose stdout is a pipe read by the test.
class python_process {
public:
    /// Starts `python3 ARGS...` (argument 0 is usually a script path). With @p pipe_stdin the
    /// child's stdin is a pipe that close_stdin() closes (else it inherits the test's stdin).
    explicit python_process(std::initializer_list<std::string> args, bool pipe_stdin = false) {
        int fds[2];
        BOOST_REQUIRE(::pipe2(fds, O_CLOEXEC) == 0);
        out_.reset(fds[0]);
        steward::unique_fd write_end(fds[1]);
        steward::unique_fd stdin_read;
        if (pipe_stdin) {
            BOOST_REQUIRE(::pipe2(fds, O_CLOEXEC) == 0);
            stdin_read.reset(fds[0]);
            in_.reset(fds[1]);
        }
        std::vector<std::string> argv_storage{find_python3()};
        argv_storage.insert(argv_storage.end(), args.begin(), args.end());
        std::vector<char*> argv;
        for (auto& a : argv_storage) argv.push_back(a.data());
        argv.push_back(nullptr);
        posix_spawn_file_actions_t actions;
        ::posix_spawn_file_actions_init(&actions);
        ::posix_spawn_file_actions_adddup2(&actions, write_end.get(), 1);
        if (stdin_read) ::posix_spawn_file_actions_adddup2(&actions, stdin_read.get(), 0);
        const int rc = ::posix_spawn(&pid_, argv[0], &actions, nullptr, argv.data(), environ);
        ::posix_spawn_file_actions_destroy(&actions);
        BOOST_REQUIRE_MESSAGE(rc == 0, "posix_spawn python3 failed: " << rc);
    }
    python_process(const python_process&) = delete;
    python_process& operator=(const python_process&) = delete;
    ~python_process() {
        if (pid_ > 0) {
            ::kill(pid_, SIGKILL);
            (void)wait();
        }
    }

    /// Closes the child's stdin pipe (EOF for the child).
    void close_stdin() { in_.reset(); }

    /// One line of the child's stdout without the newline; empty at EOF.
    std::string read_line() {
        std::string line;
        char c;
        while (::read(out_.get(), &c, 1) == 1) {
            if (c == '\n') return line;
            line.push_back(c);
        }
        return line;
    }

    /// Waits for the child; returns its exit status (or 128 + signal).
    int wait() {
        int status = 0;
        while (::waitpid(pid_, &status, 0) < 0 && errno == EINTR) {
        }
        pid_ = -1;
        return WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
    }

    [[nodiscard]] pid_t pid() const { return pid_; }

private:
    pid_t pid_ = -1;
    steward::unique_fd out_;
    steward::unique_fd in_;
};

/// Path of a script in tests/python/.
inline std::string python_script(std::string_view name) {
    return std::string(STEWARD_TESTS_SOURCE_DIR) + "/python/" + std::string(name);
}

}  // namespace steward::test

/// As STEWARD_CORO_TEST, and skipped (not passed) when python3 is absent as well.
#define STEWARD_CPYTHON_CORO_TEST(name)                                                                \
    static asio::awaitable<void> name##_body(asio::io_context& ctx);                                   \
    BOOST_AUTO_TEST_CASE(name, *boost::unit_test::precondition(steward::test::io_uring_available) *    \
                                   boost::unit_test::precondition(steward::test::python3_available)) { \
        steward::test::run_coroutine([](asio::io_context& c) { return name##_body(c); });              \
    }                                                                                                  \
    static asio::awaitable<void> name##_body([[maybe_unused]] asio::io_context& ctx)
