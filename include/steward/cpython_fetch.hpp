#pragma once
/// @file
/// steward::async_fetch_cpython — fetch a descriptor from an unmodified CPython
/// `multiprocessing.resource_sharer` server.

#include <steward/authkey.hpp>
#include <steward/share_id.hpp>
#include <steward/unique_fd.hpp>

#include <asio/any_completion_handler.hpp>
#include <asio/any_io_executor.hpp>
#include <asio/async_result.hpp>

#include <chrono>
#include <system_error>
#include <utility>
#include <vector>

namespace steward {

/// Deadlines of a CPython fetch.
struct cpython_fetch_options {
    /// For the mutual HMAC handshake (CPython itself has none; 5 s bounds a stuck peer).
    std::chrono::steady_clock::duration handshake_timeout = std::chrono::seconds(5);
    /// From sending the request to receiving the descriptor (CPython's server answers at once).
    std::chrono::steady_clock::duration reply_timeout = std::chrono::seconds(30);
};

namespace detail {
using cpython_fetch_handler = asio::any_completion_handler<void(std::error_code, std::vector<unique_fd>)>;
void start_fetch_cpython(asio::any_io_executor executor, cpython_ident ident, authkey key,
                         cpython_fetch_options options, cpython_fetch_handler handler);
}  // namespace detail

/// Fetches the descriptor(s) a CPython process shared with
/// `multiprocessing.resource_sharer.DupFd(fd)` (whose `_id` is @p ident), speaking CPython's wire
/// protocol exactly: connect to the AF_UNIX address, mutual HMAC handshake as the client with
/// @p key (the sharing process's `multiprocessing.current_process().authkey`), send the framed
/// pickle `(key, os.getpid())`, receive one data byte and the descriptors through SCM_RIGHTS,
/// check that the byte equals `count % 256`, then send the raw acknowledgement `A` that CPython
/// 3.14+ servers wait for (older servers have closed already; that is not an error).
///
/// To give a CPython process steward's family key, run in it
/// `multiprocessing.current_process().authkey = bytes.fromhex(os.environ["STEWARD_AUTHKEY"])`
/// before it shares, and pass `steward::authkey::family()` here.
///
/// @param executor The executor the operation runs on (an io_context with steward's backend).
/// @param ident `(address, key)`: the listener's path (1..107 bytes) and the decimal key.
/// @param key The authkey of the sharing CPython process.
/// @param token The completion token (`asio::use_awaitable`, `asio::deferred`, `asio::as_tuple(...)`,
/// a callback, ...). The handler is never invoked from within this function.
/// @param options Deadlines.
///
/// @par Completion Signature
/// @code void(std::error_code ec, std::vector<steward::unique_fd> fds) @endcode
/// `fds` holds the received descriptors (close-on-exec), in the sender's order; it is empty on
/// error, and every descriptor that did arrive with a failed exchange is closed.
///
/// @par Errors
/// - steward::errc::share_not_available: the server closed the connection instead of answering
///   (unknown or already fetched key: CPython's server raises KeyError and closes).
/// - steward::errc::authentication_failed: wrong authkey (either side refused the other).
/// - steward::errc::malformed_message: @p ident's key is not a decimal number below 2^128, or the
///   server broke the protocol (wrong data byte, no descriptors, a handshake it does not speak).
/// - steward::errc::control_truncated: this process reached RLIMIT_NOFILE while receiving.
/// - steward::errc::timed_out: a deadline of @p options passed.
/// - std::errc::filename_too_long / std::errc::invalid_argument: a bad address.
/// - connect and socket errors as `std::system_category()` codes (e.g. ENOENT, ECONNREFUSED), so
///   they compare equal to `std::errc` values.
/// - asio::error::operation_aborted: cancelled.
///
/// @par Per-Operation Cancellation
/// Supports `terminal` cancellation: the connection is closed, any received descriptor is closed,
/// and the operation completes with asio::error::operation_aborted. A share whose descriptor was
/// already sent by the server is consumed on the server side (CPython's server forgets a share as
/// soon as it starts sending it).
template <typename CompletionToken = asio::default_completion_token_t<asio::any_io_executor>>
auto async_fetch_cpython(const asio::any_io_executor& executor, cpython_ident ident, const authkey& key,
                         CompletionToken&& token = asio::default_completion_token_t<asio::any_io_executor>(),
                         cpython_fetch_options options = {}) {
    return asio::async_initiate<CompletionToken, void(std::error_code, std::vector<unique_fd>)>(
        [](auto handler, const asio::any_io_executor& ex, cpython_ident id, const authkey& k,
           cpython_fetch_options opts) {
            detail::start_fetch_cpython(ex, std::move(id), k, opts, std::move(handler));
        },
        token, executor, std::move(ident), key, options);
}

/// Blocking form of async_fetch_cpython(), run on a private io_context.
/// @throws std::system_error with the errors listed for async_fetch_cpython().
[[nodiscard]] std::vector<unique_fd> fetch_cpython(const cpython_ident& ident, const authkey& key,
                                                   cpython_fetch_options options = {});
/// As fetch_cpython(ident, key, options), reporting through @p ec (returns no descriptors on error).
[[nodiscard]] std::vector<unique_fd> fetch_cpython(const cpython_ident& ident, const authkey& key,
                                                   std::error_code& ec,
                                                   cpython_fetch_options options = {}) noexcept;

}  // namespace steward
