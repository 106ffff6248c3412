#define BOOST_TEST_MODULE io_foundation
#include "support/test_support.hpp"

#include <steward/error.hpp>
#include <steward/io/process_generation.hpp>
#include <steward/unique_fd.hpp>

#include <asio/steady_timer.hpp>
#include <asio/use_awaitable.hpp>

#include <fcntl.h>
#include <unistd.h>

#include <cstdint>
#include <string>
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

// The process generation as seen in a forked child.
std::uint64_t generation_in_child() {
    return std::stoull(
        steward::test::output_of_child([] { return std::to_string(steward::io::process_generation()); }));
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

    const std::uint64_t child = generation_in_child();
    BOOST_TEST(child != here);
    BOOST_TEST(child != 0u);
    // A grandchild differs from its parent, and the parent itself is unchanged by the forks.
    const std::string grandchild_differs = steward::test::output_of_child([] {
        const std::uint64_t mine = steward::io::process_generation();
        const std::uint64_t its = generation_in_child();
        return std::string(its != mine && its != 0 ? "yes" : "no");
    });
    BOOST_TEST(grandchild_differs == "yes");
    BOOST_TEST(steward::io::process_generation() == here);
}
