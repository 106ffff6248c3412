#pragma once
// Cross-process test helpers: fork a child that runs a function and reports through its exit
// status (Boost.Test assertions in a child would be invisible to the parent), plus small fd
// utilities. A child never returns into the test runner and never touches the parent's
// io_context: it builds its own and leaves with _exit.

#include <steward/unique_fd.hpp>

#include <boost/test/unit_test.hpp>

#include <fcntl.h>
#include <signal.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <exception>
#include <string>
#include <string_view>
#include <utility>

namespace steward::test {

/// Failure counter for code running in a child; every failed expectation is printed to stderr
/// and makes the child's exit status non-zero.
struct child_checks {
    int failures = 0;
    bool expect(bool ok, const char* what) {
        if (!ok) {
            ++failures;
            std::fprintf(stderr, "[child %d] check failed: %s\n", static_cast<int>(::getpid()), what);
        }
        return ok;
    }
    [[nodiscard]] int exit_code() const { return failures > 100 ? 100 : failures; }
};

/// A forked child; killed and reaped by the destructor if the test did not wait for it.
class child_process {
public:
    explicit child_process(pid_t pid) noexcept : pid_(pid) {}
    child_process(child_process&& other) noexcept : pid_(std::exchange(other.pid_, -1)) {}
    child_process& operator=(child_process&&) = delete;
    ~child_process() {
        if (pid_ <= 0) return;
        ::kill(pid_, SIGKILL);
        int status = 0;
        while (::waitpid(pid_, &status, 0) < 0 && errno == EINTR) {
        }
    }

    [[nodiscard]] pid_t pid() const noexcept { return pid_; }

    /// Exit code, or 128 + signal number when it died by a signal.
    int wait() {
        int status = 0;
        while (::waitpid(pid_, &status, 0) < 0 && errno == EINTR) {
        }
        pid_ = -1;
        return WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
    }

private:
    pid_t pid_;
};

/// Forks; the child runs @p body (returning its exit code) and _exits.
template <typename Body>
child_process fork_child(Body&& body) {
    std::fflush(nullptr);
    const pid_t pid = ::fork();
    if (pid == 0) {
        ::alarm(60);  // a child that hangs dies (SIGALRM) and fails the test instead of stalling it
        int rc = 99;
        try {
            rc = body();
        } catch (const std::exception& e) {
            std::fprintf(stderr, "[child %d] exception: %s\n", static_cast<int>(::getpid()), e.what());
            rc = 98;
        } catch (...) {
            rc = 97;
        }
        std::fflush(nullptr);
        ::_exit(rc);
    }
    BOOST_REQUIRE_MESSAGE(pid > 0, "fork failed");
    return child_process(pid);
}

/// A CLOEXEC socketpair of @p type.
inline std::pair<unique_fd, unique_fd> socket_pair(int type = SOCK_STREAM) {
    int sv[2] = {-1, -1};
    BOOST_REQUIRE(::socketpair(AF_UNIX, type | SOCK_CLOEXEC, 0, sv) == 0);
    return {unique_fd{sv[0]}, unique_fd{sv[1]}};
}

/// A CLOEXEC pipe: {read end, write end}.
inline std::pair<unique_fd, unique_fd> make_pipe() {
    int p[2] = {-1, -1};
    BOOST_REQUIRE(::pipe2(p, O_CLOEXEC) == 0);
    return {unique_fd{p[0]}, unique_fd{p[1]}};
}

/// A CLOEXEC memfd holding @p content (returns an empty unique_fd on failure).
inline unique_fd make_memfd(std::string_view content) {
    unique_fd fd{::memfd_create("steward-test", MFD_CLOEXEC)};
    if (!fd) return fd;
    if (::write(fd.get(), content.data(), content.size()) != static_cast<ssize_t>(content.size())) return {};
    return fd;
}

/// The whole content of a regular file or memfd, read with pread from offset 0.
inline std::string read_contents(int fd) {
    std::string out;
    char buf[4096];
    off_t off = 0;
    for (;;) {
        const ssize_t n = ::pread(fd, buf, sizeof buf, off);
        if (n <= 0) break;
        out.append(buf, static_cast<std::size_t>(n));
        off += n;
    }
    return out;
}

inline bool is_cloexec(int fd) {
    const int flags = ::fcntl(fd, F_GETFD);
    return flags >= 0 && (flags & FD_CLOEXEC) != 0;
}

/// Blocks until one byte arrives on @p fd (a "go" signal between processes); false on EOF/error.
inline bool wait_byte(int fd) {
    char c = 0;
    ssize_t n = 0;
    do n = ::read(fd, &c, 1);
    while (n < 0 && errno == EINTR);
    return n == 1;
}

inline bool send_byte(int fd, char c = 'g') {
    return ::write(fd, &c, 1) == 1;
}

}  // namespace steward::test
