#pragma once
// The mutual HMAC handshake (handshake.hpp's state machine) on the connection-setup hot path:
// each frame is read with plain recv(MSG_DONTWAIT) calls (header, then exactly the payload, so
// nothing after the handshake is consumed) and written with send(MSG_NOSIGNAL | MSG_DONTWAIT);
// only when the socket is not ready does it wait (async_wait, an io_uring poll). The deadline is
// one timer that cancels the socket. handshake_driver.hpp is the reference driver; this one avoids
// an io_uring round trip per read and per write, which dominates a connect-per-fetch.

#include <steward/error.hpp>

#include "sharer/framing.hpp"
#include "sharer/handshake.hpp"
#include "sharer/handshake_driver.hpp"

#include <asio/as_tuple.hpp>
#include <asio/awaitable.hpp>
#include <asio/steady_timer.hpp>
#include <asio/use_awaitable.hpp>

#include <sys/socket.h>

#include <array>
#include <cerrno>
#include <chrono>
#include <memory>
#include <span>
#include <vector>

namespace steward::detail::fast_handshake {

inline asio::awaitable<std::error_code> recv_exactly(local_socket& socket, std::span<std::byte> out) {
    std::size_t have = 0;
    while (have < out.size()) {
        const ssize_t n = ::recv(socket.native_handle(), out.data() + have, out.size() - have, MSG_DONTWAIT);
        if (n > 0) {
            have += static_cast<std::size_t>(n);
            continue;
        }
        if (n == 0) co_return make_error_code(asio::error::eof);
        if (errno == EINTR) continue;
        if (errno != EAGAIN && errno != EWOULDBLOCK) co_return errno_code(errno);
        auto [ec] =
            co_await socket.async_wait(asio::socket_base::wait_read, asio::as_tuple(asio::use_awaitable));
        if (ec) co_return ec;
    }
    co_return std::error_code{};
}

inline asio::awaitable<std::error_code> send_exactly(local_socket& socket, std::span<const std::byte> data) {
    std::size_t sent = 0;
    while (sent < data.size()) {
        const ssize_t n = ::send(socket.native_handle(), data.data() + sent, data.size() - sent,
                                 MSG_NOSIGNAL | MSG_DONTWAIT);
        if (n >= 0) {
            sent += static_cast<std::size_t>(n);
            continue;
        }
        if (errno == EINTR) continue;
        if (errno != EAGAIN && errno != EWOULDBLOCK) co_return errno_code(errno);
        auto [ec] =
            co_await socket.async_wait(asio::socket_base::wait_write, asio::as_tuple(asio::use_awaitable));
        if (ec) co_return ec;
    }
    co_return std::error_code{};
}

inline asio::awaitable<std::error_code> write_frame(local_socket& socket,
                                                    std::span<const std::byte> payload) {
    std::vector<std::byte> frame;
    frame.reserve(payload.size() + framing::max_header_size);
    framing::append_frame(frame, payload);
    co_return co_await send_exactly(socket, frame);
}

inline asio::awaitable<std::error_code> read_frame(local_socket& socket, std::vector<std::byte>& payload) {
    std::array<std::byte, framing::max_header_size> header{};
    if (auto ec = co_await recv_exactly(socket, std::span(header).first(4))) co_return ec;
    framing::frame_probe probe =
        framing::probe_frame(std::span(header).first(4), framing::handshake_max_payload);
    if (probe.status == framing::frame_status::need_more && probe.header_size == 0) {
        if (auto ec = co_await recv_exactly(socket, std::span(header).subspan(4, 8))) co_return ec;
        probe = framing::probe_frame(std::span(header).first(12), framing::handshake_max_payload);
    }
    if (probe.status == framing::frame_status::too_large) co_return make_error_code(errc::limit_exceeded);
    if (probe.status == framing::frame_status::malformed) co_return make_error_code(errc::malformed_message);
    payload.resize(static_cast<std::size_t>(probe.payload_size));
    if (!payload.empty()) {
        if (auto ec = co_await recv_exactly(socket, payload)) co_return ec;
    }
    co_return std::error_code{};
}

/// Runs @p role of the handshake on @p socket under @p timeout. @p keepalive owns the socket (the
/// timer's handler may run after the handshake finished). Errors as run_handshake().
template <typename Owner>
asio::awaitable<std::error_code> run(local_socket& socket, auth::handshake::role role, const authkey& key,
                                     std::chrono::steady_clock::duration timeout,
                                     const std::shared_ptr<Owner>& keepalive) {
    auth::handshake hs(role, key);
    struct flags {
        bool expired = false;
        bool done = false;  // a timer handler already queued when the handshake ended does nothing
    };
    auto state = std::make_shared<flags>();
    asio::steady_timer timer(socket.get_executor(), timeout);
    timer.async_wait([state, keepalive, &socket](std::error_code ec) {
        if (ec || state->done) return;
        state->expired = true;
        std::error_code ignored;
        socket.cancel(ignored);
    });
    std::error_code result;
    if (auto first = hs.start()) result = co_await write_frame(socket, *first);
    std::vector<std::byte> payload;
    while (!result && !hs.done()) {
        result = co_await read_frame(socket, payload);
        if (result) break;
        if (auto reply = hs.on_frame(payload)) {
            const std::error_code ec = co_await write_frame(socket, *reply);
            if (ec && !hs.error()) result = ec;
        }
        if (hs.done()) result = hs.error();
    }
    state->done = true;
    timer.cancel();
    if (state->expired) co_return make_error_code(errc::timed_out);
    co_return result;
}

}  // namespace steward::detail::fast_handshake
