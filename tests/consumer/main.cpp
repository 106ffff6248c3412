// A program outside steward's tree: built against the installed package (find_package) or the
// source tree (add_subdirectory) by run_consumer.cmake, it proves the exported target carries
// everything a consumer needs: include paths, C++20, Asio's backend definitions, the libraries.
#include <steward/io/backend_probe.hpp>  // from the io_uring/ header set, installed beside include/
#include <steward/io_uring_check.hpp>
#include <steward/unique_fd.hpp>

#include <asio.hpp>

#include <fcntl.h>

#include <chrono>
#include <cstdio>

#if !defined(ASIO_STANDALONE) || !defined(ASIO_NO_DEPRECATED) || !defined(STEWARD_IO_URING_BACKEND)
#error "steward::steward must hand ASIO_STANDALONE, ASIO_NO_DEPRECATED and STEWARD_IO_URING_BACKEND on"
#endif
#if STEWARD_IO_URING_BACKEND != STEWARD_CONSUMER_EXPECTS_IO_URING
#error "the package's backend is not the one steward was built with"
#endif
#if STEWARD_IO_URING_BACKEND && !(defined(ASIO_HAS_IO_URING) && defined(ASIO_DISABLE_EPOLL))
#error "an io_uring build of steward must hand ASIO_HAS_IO_URING and ASIO_DISABLE_EPOLL to consumers"
#endif
#if !STEWARD_IO_URING_BACKEND && (defined(ASIO_HAS_IO_URING) || defined(ASIO_DISABLE_EPOLL))
#error "an epoll build of steward must not switch consumers to io_uring"
#endif

asio::awaitable<void> wait_a_little(int fd) {
    asio::steady_timer timer(co_await asio::this_coro::executor, std::chrono::milliseconds(1));
    co_await timer.async_wait(asio::use_awaitable);
    std::printf("steward consumer: ok (fd %d open, timer fired)\n", fd);
}

int main() {
    std::error_code ec;
    std::string why;
    steward::check_io_uring(ec, &why);
    if (ec) {  // the driver turns this line into a skipped test, never a passed one
        std::printf("STEWARD_CONSUMER_SKIPPED: %s\n", why.c_str());
        return 0;
    }
    if (steward::io::io_uring_status() != ec) return 1;
    steward::unique_fd fd{::open("/dev/null", O_RDONLY | O_CLOEXEC)};
    if (!fd) return 1;
    asio::io_context ctx;
    asio::co_spawn(ctx, wait_a_little(fd.get()), [](std::exception_ptr e) {
        if (e) std::rethrow_exception(e);
    });
    ctx.run();
}
