#pragma once
/// @file
/// steward::sharer — a one-shot cache of file descriptors served to authenticated processes over
/// AF_UNIX (CPython `multiprocessing.resource_sharer` semantics, wire-compatible, plus steward's
/// native protocol). docs/sharer.md is the guide; docs/protocol.md the wire format.

#include <steward/authkey.hpp>
#include <steward/share_id.hpp>

#include <asio/any_completion_handler.hpp>
#include <asio/any_io_executor.hpp>
#include <asio/async_result.hpp>

#include <sys/types.h>

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <system_error>
#include <utility>
#include <vector>

namespace steward {

/// Configuration of a sharer (fixed at construction).
struct sharer_options {
    /// The family key of the HMAC handshake; empty: authkey::family().
    std::optional<authkey> key;
    /// Peer uids accepted besides the server's own uid (checked with SO_PEERCRED).
    std::vector<uid_t> allowed_uids;
    /// Most shares pending at once (not yet delivered and confirmed); share() past it fails
    /// with errc::too_many_shares.
    std::size_t max_pending_shares = 65536;
    /// Most connections open at once. A new connection beyond it first evicts the connection that
    /// has been in its handshake longest, if that is over a tenth of handshake_timeout
    /// (stats().handshakes_evicted); else it is refused with an ERROR the fetch clients report as
    /// errc::limit_exceeded, and closed (stats().limit_violations).
    std::size_t max_connections = 1024;
    /// Native requests a client may have unanswered on one connection (announced in HELLO_ACK).
    std::uint32_t max_in_flight = 256;
    /// Largest frame payload accepted after the handshake (the handshake itself allows 256 bytes).
    /// A larger announced length closes the connection before anything is allocated.
    std::uint32_t max_frame_size = 64 * 1024;
    /// Deadline of the mutual HMAC handshake, from accept.
    std::chrono::steady_clock::duration handshake_timeout = std::chrono::seconds(5);
    /// A connection with no request and no unconfirmed transfer for this long is closed.
    std::chrono::steady_clock::duration idle_timeout = std::chrono::seconds(60);
    /// Base directory for the socket's private directory; empty: `$XDG_RUNTIME_DIR` when usable,
    /// else `$TMPDIR`, else `/tmp` (a base whose socket path would exceed 107 bytes is skipped
    /// in favour of the next, shorter one).
    std::string socket_base_dir;
};

/// Per-share options.
struct share_options {
    /// The share expires (its descriptors are closed) this long after share(); empty: never.
    std::optional<std::chrono::steady_clock::duration> ttl;
    /// Only a peer with this pid (SO_PEERCRED) may fetch it; empty: any authenticated peer.
    std::optional<pid_t> allowed_pid;
};

/// Counters since construction (each monotonic, except the `*_open`/`pending` gauges).
struct sharer_stats {
    std::uint64_t connections_accepted = 0;  ///< connections accepted (before authentication)
    std::uint64_t connections_open = 0;      ///< gauge: connections open now
    std::uint64_t refused_peer = 0;          ///< SO_PEERCRED uid not allowed
    std::uint64_t refused_auth = 0;          ///< HMAC handshake failed (wrong key, not the protocol)
    std::uint64_t handshake_timeouts = 0;    ///< handshake deadline passed
    std::uint64_t idle_timeouts = 0;         ///< idle connections closed
    std::uint64_t limit_violations = 0;      ///< frame too large, too many connections/in flight
    /// Connections still in their handshake after a tenth of handshake_timeout, shut down to make
    /// room for a new one at max_connections (the oldest first; authenticated ones never).
    std::uint64_t handshakes_evicted = 0;
    std::uint64_t protocol_errors = 0;       ///< malformed or out-of-place frames
    std::uint64_t requests = 0;              ///< fetch requests received (both protocols)
    std::uint64_t refused_requests = 0;      ///< answered "not available" (unknown/used/revoked/expired/pid)
    std::uint64_t delivered = 0;             ///< shares delivered and confirmed (or acknowledged)
    std::uint64_t returned = 0;              ///< transfers that failed and put the share back
    std::uint64_t expired = 0;               ///< shares closed because their ttl passed
    std::uint64_t revoked = 0;               ///< shares closed by revoke()
    std::uint64_t pending = 0;               ///< gauge: shares pending now (see sharer::pending())
};

class sharer;

namespace detail {
class sharer_impl;
using sharer_stop_handler = asio::any_completion_handler<void(std::error_code)>;
void start_sharer_stop(const std::shared_ptr<sharer_impl>& impl, std::chrono::steady_clock::duration timeout,
                       sharer_stop_handler handler);
void start_sharer_wait_empty(const std::shared_ptr<sharer_impl>& impl, sharer_stop_handler handler);
}  // namespace detail

/// A one-shot descriptor cache served over an authenticated AF_UNIX socket.
///
/// - share() duplicates descriptors (F_DUPFD_CLOEXEC; the caller keeps its own) and returns a
///   share_id naming them: the socket address plus a fresh 128-bit key from getrandom.
/// - Each share is delivered at most once, to one authenticated peer. The server keeps its copies
///   until the receiver confirms receipt; a transfer that fails (peer gone, receiver's
///   RLIMIT_NOFILE/MSG_CTRUNC) puts the share back, still fetchable. revoke(), expiry (ttl) and
///   stop() close the copies of shares nobody fetched.
/// - Every connection is authenticated first: SO_PEERCRED uid (the server's own, or in
///   sharer_options::allowed_uids), then CPython's mutual HMAC handshake with the family key.
///   Unknown, used, revoked, expired and pid-restricted keys all get the same answer.
/// - The listener starts lazily on the first share(): a socket `s` in a fresh 0700 directory,
///   both removed by stop() or the destructor.
/// - Fork: a child process forgets the parent's shares and listener (it closes its inherited
///   copies and never unlinks the parent's socket); its first share() starts its own listener.
///
/// Thread safety: share(), revoke(), pending(), stats() and address() may be called from any
/// thread concurrently. The server itself runs on the executor given to the constructor (which
/// must be run by someone) or, after start_background(), on a private io_context in a thread with
/// all signals blocked.
class sharer {
public:
    /// A sharer served on @p executor (an io_context with steward's io_uring backend). Destroy
    /// the sharer before that io_context. In a forked child the application must call
    /// `notify_fork(asio::execution_context::fork_child)` on its io_context before running it.
    /// @throws std::system_error if sharer_options::key is empty and authkey::family() fails.
    explicit sharer(asio::any_io_executor executor, sharer_options options = {});
    /// A sharer without an executor: call start_background() before the first share().
    explicit sharer(sharer_options options = {});
    sharer(const sharer&) = delete;
    sharer& operator=(const sharer&) = delete;
    sharer(sharer&&) noexcept;
    sharer& operator=(sharer&&) noexcept;
    /// As stop() with a zero timeout: unfetched descriptors are closed, the socket and its
    /// directory are removed (not in a forked child), the background thread (if any) is joined.
    ~sharer();

    /// Runs the server on a private io_context in a new thread (all signals blocked there).
    /// Does nothing if already started. @throws std::system_error (io_uring unavailable,
    /// thread creation) or std::logic_error if the sharer was built with an executor.
    void start_background();

    /// The executor the server runs on (the background io_context's after start_background()).
    [[nodiscard]] asio::any_io_executor get_executor() const;

    /// Shares one descriptor. @throws std::system_error: errc::too_many_shares (cap reached),
    /// std::errc::bad_file_descriptor, EMFILE (dup), errors creating the listener
    /// (std::errc::filename_too_long when no base directory gives a short enough path),
    /// std::errc::operation_not_permitted after stop() or when there is no executor (neither
    /// given to the constructor nor started with start_background()).
    share_id share(int fd, share_options options = {});
    /// As share(fd, options), reporting through @p ec (returns an empty id on error).
    share_id share(int fd, std::error_code& ec, share_options options = {}) noexcept;
    /// Shares several descriptors under one id; they are delivered together, in this order, or
    /// not at all. At least one descriptor (std::errc::invalid_argument otherwise).
    share_id share(std::span<const int> fds, share_options options = {});
    /// As share(fds, options), reporting through @p ec.
    share_id share(std::span<const int> fds, std::error_code& ec, share_options options = {}) noexcept;

    /// Withdraws a share that has not been delivered: its copies are closed. Returns false if
    /// the id is not pending here (unknown, already delivered, expired, or in transfer right now:
    /// a share being sent cannot be revoked, and is closed if the transfer fails afterwards).
    bool revoke(const share_id& id) noexcept;

    /// Shares not yet delivered and confirmed (including those in transfer); expired shares are
    /// closed and not counted.
    [[nodiscard]] std::size_t pending() const noexcept;

    /// Counters (see sharer_stats).
    [[nodiscard]] sharer_stats stats() const noexcept;

    /// The socket path, empty until the first share() started the listener.
    [[nodiscard]] std::string address() const;

    /// Stops the server: stop accepting, let transfers in flight finish (their confirmations
    /// arrive) until @p timeout passes, then close every connection and every unfetched
    /// descriptor, and remove the socket and its directory. share() fails afterwards.
    ///
    /// @par Completion Signature
    /// @code void(std::error_code ec) @endcode
    /// Always success; the handler runs once everything is closed.
    ///
    /// @par Per-Operation Cancellation
    /// Not supported (stopping always completes within @p timeout).
    template <typename CompletionToken = asio::default_completion_token_t<asio::any_io_executor>>
    auto async_stop(std::chrono::steady_clock::duration timeout,
                    CompletionToken&& token = asio::default_completion_token_t<asio::any_io_executor>()) {
        return asio::async_initiate<CompletionToken, void(std::error_code)>(
            [](auto handler, const std::shared_ptr<detail::sharer_impl>& impl,
               std::chrono::steady_clock::duration t) {
                detail::start_sharer_stop(impl, t, std::move(handler));
            },
            token, impl_, timeout);
    }

    /// Stop (see async_stop()). With a background thread: waits up to @p timeout for transfers in
    /// flight, then joins the thread. With the application's executor it never waits for that
    /// executor: unfetched descriptors and the socket file are closed/removed at once and the
    /// executor closes the connections when it next runs.
    void stop(std::chrono::steady_clock::duration timeout = std::chrono::seconds(5)) noexcept;

    /// Completes when no share is pending any more (every share delivered and confirmed,
    /// revoked, expired) — at once if none is. Useful to serve "until everything was fetched".
    ///
    /// @par Completion Signature
    /// @code void(std::error_code ec) @endcode
    /// asio::error::operation_aborted if the sharer is stopped or destroyed first.
    template <typename CompletionToken = asio::default_completion_token_t<asio::any_io_executor>>
    auto async_wait_empty(
        CompletionToken&& token = asio::default_completion_token_t<asio::any_io_executor>()) {
        return asio::async_initiate<CompletionToken, void(std::error_code)>(
            [](auto handler, const std::shared_ptr<detail::sharer_impl>& impl) {
                detail::start_sharer_wait_empty(impl, std::move(handler));
            },
            token, impl_);
    }

private:
    std::shared_ptr<detail::sharer_impl> impl_;
};

}  // namespace steward
