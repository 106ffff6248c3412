#pragma once
// Helpers shared by the test suites: a coroutine test case runner, io_uring availability as a
// Boost.Test precondition (a blocked io_uring reports the test skipped, never passed), fd
// accounting through /proc/self/fd, running a function in a forked child, and what runs under
// valgrind needs (scaled deadlines, a precondition for what valgrind emulates, recognising a
// process that runs under it).

#include <steward/io_uring_check.hpp>

#include <asio/co_spawn.hpp>
#include <asio/detached.hpp>
#include <asio/io_context.hpp>
#include <asio/awaitable.hpp>
#include <boost/test/unit_test.hpp>

#include <dirent.h>
#include <fcntl.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <cstdlib>
#include <exception>
#include <filesystem>
#include <map>
#include <string>

#if __has_include(<valgrind/valgrind.h>)
#include <valgrind/valgrind.h>
#define STEWARD_TEST_RUNNING_ON_VALGRIND() (RUNNING_ON_VALGRIND != 0)
#else
#define STEWARD_TEST_RUNNING_ON_VALGRIND() false
#endif

namespace steward::test {

/// Boost.Test precondition: io_uring usable in this process (always true in an epoll build).
inline boost::test_tools::assertion_result io_uring_available(boost::unit_test::test_unit_id) {
    std::error_code ec;
    std::string why;
    steward::check_io_uring(ec, &why);
    boost::test_tools::assertion_result result(!ec);
    if (ec) result.message() << "io_uring unavailable, test skipped: " << why;
    return result;
}

/// How much slower than natively this run is expected to be: STEWARD_TEST_SLOWDOWN (a positive
/// integer; 1 when unset). scripts/run valgrind sets it, since memcheck runs a program 20-50 times
/// slower. Tests whose short deadlines are part of what they check scale them with slowed().
inline int slowdown() {
    const char* v = std::getenv("STEWARD_TEST_SLOWDOWN");
    const int n = v ? std::atoi(v) : 1;
    return n > 0 ? n : 1;
}

template <typename Rep, typename Period>
std::chrono::duration<Rep, Period> slowed(std::chrono::duration<Rep, Period> d) {
    return d * slowdown();
}

/// Boost.Test precondition for a test that valgrind cannot run faithfully (it emulates
/// RLIMIT_NOFILE instead of passing it to the kernel): reported skipped under valgrind.
inline boost::test_tools::assertion_result not_under_valgrind(boost::unit_test::test_unit_id) {
    boost::test_tools::assertion_result result(!STEWARD_TEST_RUNNING_ON_VALGRIND());
    if (!result) result.message() << "valgrind emulates RLIMIT_NOFILE; test skipped";
    return result;
}

/// True when another process @p pid runs under valgrind (its executable is a valgrind tool):
/// scripts/run valgrind starts daemons that way. Such a process's kernel-side signal mask is
/// valgrind's. (For this process use not_under_valgrind: valgrind shows a program under it its
/// own executable at /proc/self/exe.)
inline bool runs_under_valgrind(int pid) {
    std::error_code ec;
    const auto exe = std::filesystem::read_symlink("/proc/" + std::to_string(pid) + "/exe", ec);
    return !ec && exe.string().find("/valgrind/") != std::string::npos;
}

/// The open descriptors of process @p pid and what each names (the targets in /proc/<pid>/fd).
/// Left out: a descriptor closed while the listing is read, and, for a process under valgrind,
/// valgrind's own descriptors, which it keeps at the top of the table (1024 and up: its log,
/// /tmp/valgrind_proc_* files, a pipe).
inline std::map<int, std::string> process_fd_targets(int pid) {
    namespace fs = std::filesystem;
    const bool valgrind = runs_under_valgrind(pid);
    std::map<int, std::string> targets;
    std::error_code ec;
    for (fs::directory_iterator it("/proc/" + std::to_string(pid) + "/fd", ec), end; !ec && it != end;
         it.increment(ec)) {
        const int fd = std::stoi(it->path().filename().string());
        if (valgrind && fd >= 1024) continue;
        std::error_code link_ec;
        const auto target = fs::read_symlink(it->path(), link_ec);
        if (!link_ec) targets.emplace(fd, target.string());
    }
    return targets;
}

/// Number of open descriptors of this process (entries of /proc/self/fd, minus the one the
/// listing itself uses).
inline int open_fd_count() {
    DIR* dir = ::opendir("/proc/self/fd");
    if (!dir) return -1;
    int n = 0;
    while (auto* entry = ::readdir(dir))
        if (entry->d_name[0] != '.') ++n;
    ::closedir(dir);
    return n - 1;
}

/// Runs @p in_child (returning a std::string) in a forked child and returns that string, after
/// checking that the child exited with status 0. Nothing escapes into the child's copy of the test
/// runner: an exception there (a failed BOOST_REQUIRE too) makes the child exit with status 2.
template <typename F>
std::string output_of_child(F in_child) {
    int p[2];
    BOOST_REQUIRE(::pipe2(p, O_CLOEXEC) == 0);
    const pid_t pid = ::fork();
    if (pid < 0) {
        ::close(p[0]);
        ::close(p[1]);
        BOOST_FAIL("fork failed");
    }
    if (pid == 0) {
        ::close(p[0]);
        int status = 2;
        try {
            const std::string out = in_child();
            std::size_t sent = 0;
            while (sent < out.size()) {
                const ssize_t n = ::write(p[1], out.data() + sent, out.size() - sent);
                if (n <= 0) break;
                sent += static_cast<std::size_t>(n);
            }
            status = sent == out.size() ? 0 : 1;
        } catch (...) {
        }
        ::_exit(status);
    }
    ::close(p[1]);
    std::string out;
    char buf[256];
    for (ssize_t n; (n = ::read(p[0], buf, sizeof buf)) != 0;) {
        if (n < 0 && errno == EINTR) continue;
        if (n < 0) break;
        out.append(buf, static_cast<std::size_t>(n));
    }
    ::close(p[0]);
    int status = 0;
    BOOST_REQUIRE(::waitpid(pid, &status, 0) == pid);
    BOOST_TEST((WIFEXITED(status) && WEXITSTATUS(status) == 0), "the child's status: " << status);
    return out;
}

/// Runs @p body to completion on a fresh io_context; rethrows what it threw. Fails the test if it
/// does not finish within @p limit (a hang is a failure, not a CI timeout).
template <typename Factory>
void run_coroutine(Factory&& body, std::chrono::seconds limit = std::chrono::seconds(60)) {
    asio::io_context ctx;
    std::exception_ptr failure;
    bool finished = false;
    asio::co_spawn(ctx, body(ctx), [&](std::exception_ptr e) {
        failure = e;
        finished = true;
    });
    ctx.run_for(limit);
    BOOST_REQUIRE_MESSAGE(finished, "coroutine test did not finish within its time limit");
    if (failure) std::rethrow_exception(failure);
}

}  // namespace steward::test

/// Defines a Boost.Test case whose body is a coroutine: `co_await` works inside and `ctx` names the
/// io_context it runs on. Skipped (not passed) when io_uring is blocked.
#define STEWARD_CORO_TEST(name)                                                                    \
    static asio::awaitable<void> name##_body(asio::io_context& ctx);                                \
    BOOST_AUTO_TEST_CASE(name, *boost::unit_test::precondition(steward::test::io_uring_available)) { \
        steward::test::run_coroutine([](asio::io_context& c) { return name##_body(c); });           \
    }                                                                                              \
    static asio::awaitable<void> name##_body([[maybe_unused]] asio::io_context& ctx)
