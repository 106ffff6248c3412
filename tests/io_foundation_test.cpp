#define BOOST_TEST_MODULE io_foundation
#include "support/test_support.hpp"

#include <steward/error.hpp>
#include <steward/io/process_generation.hpp>
#include <steward/unique_fd.hpp>

#include <asio/steady_timer.hpp>
#include <asio/use_awaitable.hpp>

#include <fcntl.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstdint>
#include <thread>

BOOST_AUTO_TEST_CASE(unique_fd_closes_on_destruction_and_reset) {
    const int before = steward::test::open_fd_count();
    int raw = -1;
    {
        steward::unique_fd fd{::open("/dev/null", O_RDONLY | O_CLOEXEC)};
        BOOST_REQUIRE(fd);
        raw = fd.get();
        BOOST_TEST(steward::test::open_fd_count() == before + 1);
        steward::unique_fd moved = std::move(fd);
        BOOST_TEST(!fd);
        BOOST_TEST(moved.get() == raw);
    }
    BOOST_TEST(::fcntl(raw, F_GETFD) == -1);
    BOOST_TEST(steward::test::open_fd_count() == before);
}

BOOST_AUTO_TEST_CASE(dup_cloexec_sets_cloexec_and_reports_bad_fd) {
    steward::unique_fd copy = steward::dup_cloexec(STDIN_FILENO);
    BOOST_TEST((::fcntl(copy.get(), F_GETFD) & FD_CLOEXEC) != 0);
    BOOST_CHECK_EXCEPTION((void)steward::dup_cloexec(-1), std::system_error,
                          [](const std::system_error& e) { return e.code() == std::errc::bad_file_descriptor; });
}

BOOST_AUTO_TEST_CASE(error_category_messages_name_the_problem) {
    std::error_code ec = steward::errc::message_too_long;
    BOOST_TEST(ec.category().name() == std::string("steward"));
    BOOST_TEST(ec.message().find("512") != std::string::npos);
    BOOST_TEST((ec == std::errc::message_size));
    BOOST_TEST((steward::errno_code(-EPIPE) == std::errc::broken_pipe));
    BOOST_TEST((steward::errno_code(EPIPE) == std::errc::broken_pipe));
}

STEWARD_CORO_TEST(coroutine_helper_runs_a_co_await_body) {
    asio::steady_timer timer(ctx, std::chrono::milliseconds(1));
    co_await timer.async_wait(asio::use_awaitable);
    BOOST_TEST(true == ctx.get_executor().running_in_this_thread());
}

namespace {

// Runs @p in_child in a forked child and returns what it wrote to a pipe (at most 8 bytes).
template <typename F>
std::uint64_t value_from_child(F in_child) {
    int p[2];
    BOOST_REQUIRE(::pipe2(p, O_CLOEXEC) == 0);
    steward::unique_fd r(p[0]), w(p[1]);
    const pid_t pid = ::fork();
    BOOST_REQUIRE(pid >= 0);
    if (pid == 0) {
        // Nothing may escape into the child's copy of the test runner.
        try {
            const std::uint64_t v = in_child();
            _exit(::write(w.get(), &v, sizeof v) == static_cast<ssize_t>(sizeof v) ? 0 : 1);
        } catch (...) {
            _exit(2);
        }
    }
    w.reset();
    std::uint64_t v = 0;
    BOOST_TEST(::read(r.get(), &v, sizeof v) == static_cast<ssize_t>(sizeof v));
    int status = 0;
    BOOST_REQUIRE(::waitpid(pid, &status, 0) == pid);
    BOOST_TEST((WIFEXITED(status) && WEXITSTATUS(status) == 0));
    return v;
}

}  // namespace

BOOST_AUTO_TEST_CASE(process_generation_is_stable_in_a_process_and_changes_in_every_forked_child) {
    const std::uint64_t here = steward::io::process_generation();
    BOOST_TEST(here != 0u);
    BOOST_TEST(steward::io::process_generation() == here);
    // Another thread of the same process sees the same generation.
    std::uint64_t in_thread = 0;
    std::thread([&] { in_thread = steward::io::process_generation(); }).join();
    BOOST_TEST(in_thread == here);

    const std::uint64_t child = value_from_child([] { return steward::io::process_generation(); });
    BOOST_TEST(child != here);
    BOOST_TEST(child != 0u);
    // A grandchild differs from its parent, and the parent itself is unchanged by the forks.
    const std::uint64_t grandchild_differs = value_from_child([] {
        const std::uint64_t mine = steward::io::process_generation();
        const std::uint64_t its = value_from_child([] { return steward::io::process_generation(); });
        return std::uint64_t{its != mine && its != 0};
    });
    BOOST_TEST(grandchild_differs == 1u);
    BOOST_TEST(steward::io::process_generation() == here);
}
