#pragma once
// The first steps of every native client connection (pooled or dedicated): a socket connected
// without an io_uring round trip, and the server's uid.

#include <steward/error.hpp>
#include <steward/unique_fd.hpp>

#include "sharer/handshake_driver.hpp"
#include "sharer/sharer_wire.hpp"

#include <asio/as_tuple.hpp>
#include <asio/awaitable.hpp>
#include <asio/steady_timer.hpp>
#include <asio/use_awaitable.hpp>

#include <sys/socket.h>
#include <sys/un.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cstring>
#include <string>
#include <system_error>

namespace steward::detail::client {

/// Connects @p socket (closed, on the connection's executor) to the AF_UNIX @p path with a
/// non-blocking connect, which is all a connection costs when the listener's backlog has room. A
/// full backlog (EAGAIN: nothing is in progress, unlike TCP, and nothing on the socket signals
/// room) is retried after a pause that doubles from 1 ms up to 64 ms, waited on @p pause (the
/// caller may cancel it to end a pause early), until @p give_up_after has passed
/// (errc::timed_out) or @p stopped() says the caller gave up (operation_aborted). The
/// socket stays non-blocking: the clients only ever wait on it (async_wait) and read and write it
/// themselves with MSG_DONTWAIT.
template <typename StopPredicate>
asio::awaitable<std::error_code> connect(local_socket& socket, const std::string& path,
                                         std::chrono::steady_clock::duration give_up_after,
                                         asio::steady_timer& pause_timer, StopPredicate stopped) {
    sockaddr_un addr{};
    if (path.size() >= sizeof addr.sun_path) co_return std::make_error_code(std::errc::filename_too_long);
    addr.sun_family = AF_UNIX;
    std::memcpy(addr.sun_path, path.data(), path.size());
    unique_fd fd(::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0));
    if (!fd) co_return errno_code(errno);
    const auto give_up = std::chrono::steady_clock::now() + give_up_after;
    for (std::chrono::milliseconds pause(1);; pause = std::min(pause * 2, std::chrono::milliseconds(64))) {
        int rc = 0;
        do {
            rc = ::connect(fd.get(), reinterpret_cast<const sockaddr*>(&addr), sizeof addr);
        } while (rc != 0 && errno == EINTR);
        if (rc == 0) break;
        if (errno != EAGAIN) co_return errno_code(errno);
        const auto now = std::chrono::steady_clock::now();
        if (now >= give_up) co_return make_error_code(errc::timed_out);
        if (stopped()) co_return make_error_code(asio::error::operation_aborted);
        pause_timer.expires_after(std::min<std::chrono::steady_clock::duration>(pause, give_up - now));
        (void)co_await pause_timer.async_wait(asio::as_tuple(asio::use_awaitable));
        if (stopped()) co_return make_error_code(asio::error::operation_aborted);
    }
    std::error_code ec;
    socket.assign(asio::local::stream_protocol(), fd.get(), ec);
    if (ec) co_return wire::normalize(ec);
    (void)fd.release();
    co_return std::error_code{};
}

/// The uid the server's socket was created with (SO_PEERCRED), or an error.
inline std::error_code peer_uid(int fd, uid_t& uid) noexcept {
    ucred cred{};
    socklen_t len = sizeof cred;
    if (::getsockopt(fd, SOL_SOCKET, SO_PEERCRED, &cred, &len) != 0) return errno_code(errno);
    uid = cred.uid;
    return {};
}

}  // namespace steward::detail::client
