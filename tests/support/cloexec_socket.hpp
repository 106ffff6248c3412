#pragma once
// AF_UNIX listeners and accepted sockets for tests, close-on-exec from birth. Asio opens sockets
// with plain socket() and its io_uring accept passes no SOCK_CLOEXEC, so a python3 child spawned
// by a test would inherit them.

#include <steward/unique_fd.hpp>

#include <asio/as_tuple.hpp>
#include <asio/awaitable.hpp>
#include <asio/local/stream_protocol.hpp>
#include <asio/use_awaitable.hpp>
#include <boost/test/unit_test.hpp>

#include <sys/socket.h>
#include <sys/un.h>

#include <cerrno>
#include <cstring>
#include <string>
#include <tuple>

namespace steward::test {

/// A listening AF_UNIX stream acceptor bound to @p path, opened with SOCK_CLOEXEC.
inline asio::local::stream_protocol::acceptor cloexec_listener(asio::io_context& ctx,
                                                               const std::string& path) {
    steward::unique_fd fd(::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0));
    BOOST_REQUIRE(fd);
    sockaddr_un addr{};
    addr.sun_family = AF_UNIX;
    BOOST_REQUIRE(path.size() < sizeof addr.sun_path);
    std::memcpy(addr.sun_path, path.data(), path.size());
    BOOST_REQUIRE(::bind(fd.get(), reinterpret_cast<const sockaddr*>(&addr), sizeof addr) == 0);
    BOOST_REQUIRE(::listen(fd.get(), 16) == 0);
    asio::local::stream_protocol::acceptor acceptor(ctx);
    acceptor.assign(asio::local::stream_protocol(), fd.release());
    return acceptor;
}

/// Accepts one connection with accept4(SOCK_CLOEXEC) once the listener is readable.
inline asio::awaitable<std::tuple<std::error_code, asio::local::stream_protocol::socket>> accept_cloexec(
    asio::local::stream_protocol::acceptor& acceptor) {
    asio::local::stream_protocol::socket socket(acceptor.get_executor());
    for (;;) {
        auto [ec] =
            co_await acceptor.async_wait(asio::socket_base::wait_read, asio::as_tuple(asio::use_awaitable));
        if (ec) co_return std::tuple{ec, std::move(socket)};
        const int fd = ::accept4(acceptor.native_handle(), nullptr, nullptr, SOCK_CLOEXEC);
        if (fd < 0) {
            if (errno == EAGAIN || errno == EINTR) continue;
            co_return std::tuple{std::error_code(errno, std::system_category()), std::move(socket)};
        }
        socket.assign(asio::local::stream_protocol(), fd);
        co_return std::tuple{std::error_code{}, std::move(socket)};
    }
}

}  // namespace steward::test
