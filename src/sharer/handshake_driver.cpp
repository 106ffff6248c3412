#include "sharer/handshake_driver.hpp"

#include <steward/error.hpp>

#include "sharer/framing.hpp"

#include <asio/as_tuple.hpp>
#include <asio/buffer.hpp>
#include <asio/experimental/awaitable_operators.hpp>
#include <asio/read.hpp>
#include <asio/steady_timer.hpp>
#include <asio/this_coro.hpp>
#include <asio/use_awaitable.hpp>

#include <sys/socket.h>

#include <array>
#include <variant>

namespace steward::detail {
namespace {

constexpr auto use_tuple = asio::as_tuple(asio::use_awaitable);

asio::awaitable<std::error_code> read_exactly(local_socket& socket, std::span<std::byte> out) {
    auto [ec, n] = co_await asio::async_read(socket, asio::buffer(out.data(), out.size()), use_tuple);
    (void)n;
    co_return ec;
}

asio::awaitable<std::error_code> handshake_body(local_socket& socket, auth::handshake& hs) {
    if (auto first = hs.start()) {
        if (auto ec = co_await write_frame(socket, *first)) co_return ec;
    }
    std::vector<std::byte> payload;
    while (!hs.done()) {
        if (auto ec = co_await read_frame(socket, payload, framing::handshake_max_payload)) co_return ec;
        if (auto reply = hs.on_frame(payload)) {
            const std::error_code ec = co_await write_frame(socket, *reply);
            // A #FAILURE# that cannot be delivered changes nothing: the handshake failed already.
            if (ec && !hs.error()) co_return ec;
        }
    }
    co_return hs.error();
}

}  // namespace

asio::awaitable<std::error_code> send_all(local_socket& socket, std::span<const std::byte> data) {
    while (!data.empty()) {
        auto [ec, n] =
            co_await socket.async_send(asio::buffer(data.data(), data.size()), MSG_NOSIGNAL, use_tuple);
        if (ec) co_return ec;
        data = data.subspan(n);
    }
    co_return std::error_code{};
}

asio::awaitable<std::error_code> write_frame(local_socket& socket, std::span<const std::byte> payload) {
    const std::vector<std::byte> frame = framing::make_frame(payload);
    co_return co_await send_all(socket, frame);
}

asio::awaitable<std::error_code> read_frame(local_socket& socket, std::vector<std::byte>& payload,
                                            std::uint64_t max_payload) {
    std::array<std::byte, framing::max_header_size> header{};
    std::size_t have = 4;
    if (auto ec = co_await read_exactly(socket, std::span(header).first(4))) co_return ec;
    framing::frame_probe probe = framing::probe_frame(std::span(header).first(have), max_payload);
    if (probe.status == framing::frame_status::need_more && probe.header_size == 0) {
        // The -1 marker: the 8-byte length follows.
        if (auto ec = co_await read_exactly(socket, std::span(header).subspan(4, 8))) co_return ec;
        have = 12;
        probe = framing::probe_frame(std::span(header).first(have), max_payload);
    }
    if (probe.status == framing::frame_status::too_large) co_return make_error_code(errc::limit_exceeded);
    if (probe.status == framing::frame_status::malformed) co_return make_error_code(errc::malformed_message);
    payload.resize(static_cast<std::size_t>(probe.payload_size));
    if (!payload.empty()) {
        if (auto ec = co_await read_exactly(socket, payload)) co_return ec;
    }
    co_return std::error_code{};
}

asio::awaitable<std::error_code> run_handshake(local_socket& socket, auth::handshake& hs,
                                               std::chrono::steady_clock::duration timeout) {
    using namespace asio::experimental::awaitable_operators;
    asio::steady_timer timer(socket.get_executor(), timeout);
    // Whichever finishes first cancels the other (per-operation cancellation of the pending read
    // or write); a handshake that outlives the timer is reported as timed out.
    auto result = co_await (handshake_body(socket, hs) || timer.async_wait(use_tuple));
    if (result.index() == 0) co_return std::get<0>(result);
    // The timer finished first: it expired (success), or the caller cancelled the whole operation
    // and the timer happened to report before the handshake did.
    const auto [timer_ec] = std::get<1>(result);
    co_return timer_ec ? std::error_code(asio::error::operation_aborted) : make_error_code(errc::timed_out);
}

asio::awaitable<std::error_code> authenticate_as_server(local_socket& socket, const authkey& key,
                                                        std::chrono::steady_clock::duration timeout) {
    auth::handshake hs(auth::handshake::role::server, key);
    co_return co_await run_handshake(socket, hs, timeout);
}

asio::awaitable<std::error_code> authenticate_as_client(local_socket& socket, const authkey& key,
                                                        std::chrono::steady_clock::duration timeout) {
    auth::handshake hs(auth::handshake::role::client, key);
    co_return co_await run_handshake(socket, hs, timeout);
}

}  // namespace steward::detail
