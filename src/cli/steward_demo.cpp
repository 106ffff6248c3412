// `steward demo`: a short narrated run of what steward does, chapter by chapter.
#include "cli/commands.hpp"

#include <steward/io_uring_check.hpp>

#include <asio/co_spawn.hpp>
#include <asio/detached.hpp>
#include <asio/io_context.hpp>
#include <asio/steady_timer.hpp>
#include <asio/use_awaitable.hpp>

#include <cstdio>
#include <exception>
#include <string>

namespace steward::cli {
namespace {

void say(const char* text) {
    std::printf("%s\n", text);
    std::fflush(stdout);
}

int chapter_executor() {
    say("== 1. the executor ==");
    std::error_code ec;
    std::string why;
    check_io_uring(ec, &why);
    if (ec) {
        std::printf("io_uring probe failed: %s\n", why.c_str());
        return 1;
    }
#if STEWARD_IO_URING_BACKEND
    say("io_uring probe: ok; asio::io_context runs on Asio's io_uring backend (no epoll).");
#else
    say("built with the epoll backend (STEWARD_IO_BACKEND=epoll).");
#endif
    asio::io_context ctx;
    bool resumed = false;
    asio::co_spawn(
        ctx,
        [&]() -> asio::awaitable<void> {
            asio::steady_timer timer(ctx, std::chrono::milliseconds(10));
            co_await timer.async_wait(asio::use_awaitable);
            resumed = true;
        },
        asio::detached);
    ctx.run();
    say(resumed ? "a coroutine awaited a 10 ms timer on it and resumed." : "coroutine did not resume!");
    return resumed ? 0 : 1;
}

}  // namespace

int run_demo(std::span<char*>) {
    if (int rc = chapter_executor()) return rc;
    if (int rc = run_demo_sharer_chapter(2)) return rc;
    if (int rc = demo_tracker_chapter()) return rc;
    say("demo finished.");
    return 0;
}

}  // namespace steward::cli
