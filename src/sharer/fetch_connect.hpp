#pragma once
// The first steps of every native client connection (pooled or dedicated): a socket connected
// without an io_uring round trip when the listener's backlog has room, and the server's uid.

#include <steward/error.hpp>
#include <steward/unique_fd.hpp>

#include "sharer/handshake_driver.hpp"
#include "sharer/sharer_wire.hpp"

#include <asio/as_tuple.hpp>
#include <asio/awaitable.hpp>
#include <asio/use_awaitable.hpp>

#include <fcntl.h>
#include <sys/socket.h>
#include <sys/un.h>

#include <cerrno>
#include <cstring>
#include <string>
#include <system_error>

namespace steward::detail::client {

/// Connects @p socket (closed, on the connection's executor) to the AF_UNIX @p path. The connect
/// is tried at once on a non-blocking socket, whose O_NONBLOCK is cleared before io_uring ever
/// serves it; only a full backlog (EAGAIN) falls back to an asynchronous connect.
inline asio::awaitable<std::error_code> connect(local_socket& socket, const std::string& path) {
    sockaddr_un addr{};
    if (path.size() >= sizeof addr.sun_path) co_return std::make_error_code(std::errc::filename_too_long);
    addr.sun_family = AF_UNIX;
    std::memcpy(addr.sun_path, path.data(), path.size());
    unique_fd fd(::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0));
    if (!fd) co_return errno_code(errno);
    int rc = 0;
    do {
        rc = ::connect(fd.get(), reinterpret_cast<const sockaddr*>(&addr), sizeof addr);
    } while (rc != 0 && errno == EINTR);
    const int connect_errno = rc == 0 ? 0 : errno;
    if (connect_errno != 0 && connect_errno != EAGAIN) co_return errno_code(connect_errno);
    if (::fcntl(fd.get(), F_SETFL, O_RDWR) != 0) co_return errno_code(errno);
    std::error_code ec;
    socket.assign(asio::local::stream_protocol(), fd.get(), ec);
    if (ec) co_return wire::normalize(ec);
    (void)fd.release();
    if (connect_errno == EAGAIN) {
        auto [cec] = co_await socket.async_connect(asio::local::stream_protocol::endpoint(path),
                                                   asio::as_tuple(asio::use_awaitable));
        if (cec) co_return wire::normalize(cec);
    }
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
