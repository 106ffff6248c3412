#pragma once
// Runs the sans-IO handshake (handshake.hpp) over a connected AF_UNIX stream socket, framing
// each payload with the multiprocessing.connection codec, under one deadline for the whole
// exchange. Reads take exactly one frame at a time (header, then payload), so nothing that
// follows the handshake (a request, fds) is ever consumed here.

#include <steward/authkey.hpp>

#include "sharer/handshake.hpp"

#include <asio/awaitable.hpp>
#include <asio/local/stream_protocol.hpp>

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <span>
#include <system_error>
#include <vector>

namespace steward::detail {

using local_socket = asio::local::stream_protocol::socket;

inline constexpr std::chrono::steady_clock::duration default_handshake_timeout = std::chrono::seconds(5);

/// Sends all of @p data with MSG_NOSIGNAL (Asio's io_uring send path does not add it, and a peer
/// that went away must give EPIPE, not SIGPIPE).
asio::awaitable<std::error_code> send_all(local_socket& socket, std::span<const std::byte> data);

/// Sends one frame (header + payload in one buffer).
asio::awaitable<std::error_code> write_frame(local_socket& socket, std::span<const std::byte> payload);

/// Reads exactly one frame into @p payload. A length above @p max_payload ends with
/// errc::limit_exceeded before anything is allocated; a negative length with errc::malformed_message;
/// EOF with asio::error::eof.
asio::awaitable<std::error_code> read_frame(local_socket& socket, std::vector<std::byte>& payload,
                                            std::uint64_t max_payload);

/// Drives @p hs to its end. Errors: the handshake's own (errc::authentication_failed,
/// errc::malformed_message), errc::timed_out when @p timeout passes, errc::limit_exceeded for a
/// frame above 256 bytes, or the socket's error (asio::error::eof, ...). The socket is left open;
/// after any error the caller should close it.
asio::awaitable<std::error_code> run_handshake(local_socket& socket, auth::handshake& hs,
                                               std::chrono::steady_clock::duration timeout);

/// Listener side of the mutual handshake (deliver, then answer).
asio::awaitable<std::error_code> authenticate_as_server(
    local_socket& socket, const authkey& key,
    std::chrono::steady_clock::duration timeout = default_handshake_timeout);

/// Connecting side of the mutual handshake (answer, then deliver).
asio::awaitable<std::error_code> authenticate_as_client(
    local_socket& socket, const authkey& key,
    std::chrono::steady_clock::duration timeout = default_handshake_timeout);

}  // namespace steward::detail
