#pragma once
/// @file
/// steward::async_fetch / steward::fetch — receive the descriptors of a share from a
/// steward::sharer over its native protocol (docs/protocol.md section 5).

#include <steward/authkey.hpp>
#include <steward/share_id.hpp>
#include <steward/unique_fd.hpp>

#include <asio/any_completion_handler.hpp>
#include <asio/any_io_executor.hpp>
#include <asio/async_result.hpp>

#include <chrono>
#include <optional>
#include <system_error>
#include <utility>
#include <vector>

namespace steward {

/// Options of a fetch.
struct fetch_options {
    /// The family key; empty: authkey::family().
    std::optional<authkey> key;
    /// Deadline of connecting plus the mutual HMAC handshake of a new connection. A listener whose
    /// backlog is full is tried again (after 1 ms, doubling up to 64 ms) until this has passed.
    std::chrono::steady_clock::duration handshake_timeout = std::chrono::seconds(5);
    /// From sending the request to receiving the whole reply.
    std::chrono::steady_clock::duration reply_timeout = std::chrono::seconds(30);
    /// true (default): share the pooled connection of this execution context to the server (the
    /// fastest way to make many fetches). false: a connection of its own, opened for this fetch
    /// and closed before it completes; nothing is kept on the execution context. Use it for a
    /// one-off fetch from a server this process will not talk to again. Either way a new
    /// connection costs one round trip after connect when the server runs as this uid or root
    /// (quick connect), otherwise the mutual HMAC handshake first (docs/protocol.md).
    bool pooled = true;
};

namespace detail {
using fetch_handler = asio::any_completion_handler<void(std::error_code, std::vector<unique_fd>)>;
void start_fetch(const asio::any_io_executor& executor, const share_id& id, const fetch_options& options,
                 fetch_handler handler);
}  // namespace detail

/// Fetches the descriptors shared under @p id from the steward::sharer at `id.address()`.
///
/// Unless fetch_options::pooled is false, connections are pooled per execution context (the
/// io_context behind @p executor), server address and authkey: the first fetch connects and
/// authenticates, later and concurrent fetches reuse that connection and pipeline their requests
/// on it. Receipts are confirmed to the server in batches. A connection with nothing in flight is
/// closed after a few seconds of idleness.
///
/// Authentication: the server checks SO_PEERCRED. When SO_PEERCRED on the client's side says the
/// server runs as this process's uid or as root, the client uses quick connect (one round trip:
/// its first frame carries an HMAC and the first request, and no descriptor is accepted before
/// the server's answering HMAC verified); otherwise the mutual HMAC handshake runs first.
///
/// The reply is assembled all-or-nothing: with more than 253 descriptors it arrives in several
/// messages, and if any of them is cut short (MSG_CTRUNC: this process reached RLIMIT_NOFILE) every
/// descriptor received for it is closed, the share is handed back to the server (still
/// fetchable) and the operation fails with errc::control_truncated.
///
/// @param executor An executor of an io_context with steward's io_uring backend.
/// @param id The share (address + key).
/// @param token The completion token (`asio::use_awaitable`, `asio::deferred`,
/// `asio::as_tuple(...)`, a callback, ...). The handler is never invoked from within this function.
/// @param options Key and deadlines.
///
/// @par Completion Signature
/// @code void(std::error_code ec, std::vector<steward::unique_fd> fds) @endcode
/// `fds` holds the descriptors (close-on-exec) in the order they were shared; empty on error.
///
/// @par Errors
/// - steward::errc::share_not_available: unknown, already fetched, revoked, expired, or reserved
///   for another pid (the server never says which).
/// - steward::errc::authentication_failed: the server refused this process (other uid, other key)
///   or failed the client's challenge.
/// - steward::errc::control_truncated: this process hit RLIMIT_NOFILE; the share was given back.
/// - steward::errc::timed_out: a deadline of @p options passed.
/// - steward::errc::malformed_message: the peer broke the protocol.
/// - steward::errc::limit_exceeded: the server refused the connection (connection limit).
/// - std::errc::filename_too_long / invalid_argument for a bad address; connect errors
///   (ENOENT, ECONNREFUSED: no server) as `std::system_category()` codes; a connection lost
///   mid-request as std::errc::connection_reset.
/// - asio::error::operation_aborted: cancelled.
///
/// @par Per-Operation Cancellation
/// Supports `terminal` cancellation: the operation completes at once with
/// asio::error::operation_aborted. If the reply arrives later its descriptors are closed and the
/// share is given back to the server (still fetchable); the shared connection stays usable.
template <typename CompletionToken = asio::default_completion_token_t<asio::any_io_executor>>
auto async_fetch(const asio::any_io_executor& executor, const share_id& id,
                 CompletionToken&& token = asio::default_completion_token_t<asio::any_io_executor>(),
                 const fetch_options& options = {}) {
    return asio::async_initiate<CompletionToken, void(std::error_code, std::vector<unique_fd>)>(
        [](auto handler, const asio::any_io_executor& ex, const share_id& i, const fetch_options& o) {
            detail::start_fetch(ex, i, o, std::move(handler));
        },
        token, executor, id, options);
}

/// Blocking fetch: a connection of its own each call (as fetch_options::pooled = false, whatever
/// @p options says), run on an io_context private to the calling thread
/// (kept for the thread's later blocking fetches: its io_uring is one descriptor that stays open
/// until the thread exits; a forked child makes its own).
/// @throws std::system_error with the errors listed for async_fetch().
[[nodiscard]] std::vector<unique_fd> fetch(const share_id& id, const fetch_options& options = {});
/// As fetch(id, options), reporting through @p ec (returns no descriptors on error).
[[nodiscard]] std::vector<unique_fd> fetch(const share_id& id, std::error_code& ec,
                                           const fetch_options& options = {}) noexcept;

}  // namespace steward
