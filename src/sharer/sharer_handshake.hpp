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
#include <optional>
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

/// A deadline on one socket: when it passes, the socket's pending waits are cancelled and
/// expired() says why. Armed lazily (arm()), so a path that never waits costs no timer.
class socket_deadline {
public:
    /// @p keepalive owns @p socket (the timer's handler may run after this object is gone).
    socket_deadline(local_socket& socket, std::chrono::steady_clock::duration timeout,
                    std::shared_ptr<void> keepalive)
        : socket_(socket), timeout_(timeout), keepalive_(std::move(keepalive)) {}
    socket_deadline(const socket_deadline&) = delete;
    socket_deadline& operator=(const socket_deadline&) = delete;
    ~socket_deadline() { disarm(); }

    void arm() {
        if (timer_) return;
        state_ = std::make_shared<flags>();
        timer_.emplace(socket_.get_executor(), timeout_);
        timer_->async_wait([state = state_, keepalive = keepalive_, &socket = socket_](std::error_code ec) {
            if (ec || state->done) return;
            state->expired = true;
            std::error_code ignored;
            socket.cancel(ignored);
        });
    }
    void disarm() noexcept {
        if (!timer_) return;
        state_->done = true;
        timer_->cancel();
        timer_.reset();
    }
    [[nodiscard]] bool expired() const noexcept { return state_ && state_->expired; }
    /// @p ec, or errc::timed_out when the deadline is what ended the wait.
    [[nodiscard]] std::error_code translate(std::error_code ec) const {
        return expired() ? make_error_code(errc::timed_out) : ec;
    }

private:
    struct flags {
        bool expired = false;
        bool done = false;  // a timer handler already queued when the wait ended does nothing
    };
    local_socket& socket_;
    std::chrono::steady_clock::duration timeout_;
    std::shared_ptr<void> keepalive_;
    std::shared_ptr<flags> state_;
    std::optional<asio::steady_timer> timer_;
};

/// Drives @p hs to its end; @p received, if given, is a frame that already arrived (the server
/// read it to see whether it was a QUICK; its own challenge went out before). No deadline here.
inline asio::awaitable<std::error_code> drive(local_socket& socket, auth::handshake& hs,
                                              std::optional<std::span<const std::byte>> received) {
    std::vector<std::byte> payload;
    if (received) {
        if (auto reply = hs.on_frame(*received)) {
            const std::error_code ec = co_await write_frame(socket, *reply);
            if (ec && !hs.error()) co_return ec;
        }
    }
    while (!hs.done()) {
        if (auto ec = co_await read_frame(socket, payload)) co_return ec;
        if (auto reply = hs.on_frame(payload)) {
            const std::error_code ec = co_await write_frame(socket, *reply);
            if (ec && !hs.error()) co_return ec;
        }
    }
    co_return hs.error();
}

/// Runs @p role of the handshake on @p socket under @p timeout. @p keepalive owns the socket (the
/// timer's handler may run after the handshake finished). Errors as run_handshake().
template <typename Owner>
asio::awaitable<std::error_code> run(local_socket& socket, auth::handshake::role role, const authkey& key,
                                     std::chrono::steady_clock::duration timeout,
                                     const std::shared_ptr<Owner>& keepalive) {
    auth::handshake hs(role, key);
    socket_deadline deadline(socket, timeout, keepalive);
    deadline.arm();
    std::error_code result;
    if (auto first = hs.start()) result = co_await write_frame(socket, *first);
    if (!result) result = co_await drive(socket, hs, std::nullopt);
    co_return deadline.translate(result);
}

}  // namespace steward::detail::fast_handshake
