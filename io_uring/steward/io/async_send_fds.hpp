#pragma once
/// @file
/// steward::io::async_send_fds — send file descriptors (SCM_RIGHTS) with a block of data over an
/// AF_UNIX socket, on the socket's executor.

#include <steward/error.hpp>
#include <steward/io/detail/immediate.hpp>
#include <steward/io/detail/scm_rights.hpp>

#include <asio/async_result.hpp>
#include <asio/cancellation_type.hpp>
#include <asio/compose.hpp>
#include <asio/error.hpp>

#include <cstddef>
#include <span>
#include <system_error>
#include <tuple>
#include <utility>

namespace steward::io {

namespace detail {

// The operation behind async_send_fds (shape: see detail/immediate.hpp). start() makes the first
// sendmsg attempts inside the initiating call; only when the socket buffer is full does the
// composed operation wait for writability and continue.
template <typename Socket>
class send_fds_op {
public:
    send_fds_op(Socket& socket, scm_rights_control control, asio::const_buffer data, std::error_code refused)
        : socket_(socket), control_(std::move(control)), data_(data), result_(refused) {}

    bool start() {
        if (result_) return true;
        return attempt();
    }

    [[nodiscard]] std::tuple<std::error_code, std::size_t> result() const noexcept {
        return {result_, sent_};
    }

    // Composed operation, entered after start() hit a full socket buffer.
    template <typename Self>
    void operator()(Self& self) {
        if (sent_ == 0) {
            // Until a byte is out, stopping is harmless: every cancellation type is honoured.
            self.reset_cancellation_state(asio::enable_total_cancellation());
        } else {
            // The descriptors and a prefix are out: abandoning the rest would leave the peer
            // mid-message, so only terminal cancellation (the stream is then unusable) remains.
            self.reset_cancellation_state(asio::enable_terminal_cancellation());
        }
        socket_.async_wait(Socket::wait_write, std::move(self));
    }

    // Writability reported (or the wait failed / was cancelled).
    template <typename Self>
    void operator()(Self& self, std::error_code ec) {
        // A cancellation requested after the wait had already completed still counts.
        if (!ec && self.cancelled() != asio::cancellation_type::none) ec = asio::error::operation_aborted;
        if (ec) return self.complete(ec, sent_);
        const std::size_t before = sent_;
        if (!attempt()) {
            if (before == 0 && sent_ != 0)
                self.reset_cancellation_state(asio::enable_terminal_cancellation());
            socket_.async_wait(Socket::wait_write, std::move(self));
            return;  // `this` now lives inside the moved handler: touch nothing
        }
        self.complete(result_, sent_);
    }

private:
    // sendmsg until all of data_ is out (true, result_ set) or the buffer is full (false).
    bool attempt() {
        while (sent_ < data_.size()) {
            // The descriptors ride only on the first sendmsg that moves bytes; the rest of a
            // partially sent block goes out without control data.
            const attempt_result r =
                send_attempt(socket_.native_handle(), sent_ == 0 ? &control_ : nullptr, data_ + sent_);
            if (r.would_block) return false;
            if (r.ec) {
                result_ = r.ec;
                return true;
            }
            sent_ += r.bytes;
        }
        return true;
    }

    Socket& socket_;
    scm_rights_control control_;
    asio::const_buffer data_;
    std::error_code result_;
    std::size_t sent_ = 0;
};

}  // namespace detail

/// Sends @p data with the descriptors @p fds attached (SCM_RIGHTS), asynchronously.
///
/// The descriptors travel with the first byte of @p data: the receiver gets them with the read
/// that returns that byte (on a stream socket a receive never spans two descriptor batches). If
/// the socket buffer takes only part of @p data, the rest is sent without control data, waiting
/// for writability as often as needed, so the descriptors are delivered exactly once.
///
/// Each attempt is a `sendmsg(MSG_NOSIGNAL | MSG_DONTWAIT)`; on `EAGAIN` the operation waits with
/// `socket.async_wait(wait_write)` (an io_uring poll on steward's executor) and retries. The
/// socket's file status flags are never changed (no `O_NONBLOCK`).
///
/// @param socket An AF_UNIX stream, seq-packet or datagram socket (connected). It must outlive
/// the operation, and the caller must not start another send on it until this one completes.
///
/// @param fds The descriptors to pass, at most max_fds_per_message (253). Their numbers are
/// copied before this function returns, so the span itself may go away; the descriptors stay
/// owned by the caller and **must stay open until the completion handler runs** (the kernel
/// takes its own references at the `sendmsg` that carries them, which may happen after a wait).
/// The caller closes them whenever it likes after completion; the receiver holds its own copies.
/// An empty span sends @p data alone.
///
/// @param data The bytes to send. At least one byte is required when @p fds is not empty. The
/// underlying memory must stay valid until the completion handler runs.
///
/// @param token The completion token (`asio::use_awaitable`, `asio::deferred`,
/// `asio::as_tuple(...)`, a callback, ...). See Immediate Completion for when the handler runs.
///
/// @par Immediate Completion
/// The first `sendmsg` is made inside this call (but see use_awaitable and deferred below). When
/// that settles the operation (all of @p data went out, or an error, including the argument checks
/// above), it completes without waiting:
/// - `asio::use_awaitable` and `asio::as_tuple(asio::use_awaitable)`: the coroutine resumes at
///   once, without a handler and without a trip through the executor (other handlers ready on it
///   do not run in between; `co_await asio::post(...)` yields explicitly). A loop of such
///   completions does not grow the stack. The attempt is made when the awaitable is co_awaited.
/// - any other token (callbacks, `asio::deferred`, `asio::as_tuple(callback)`, ...): the handler is
///   submitted with `asio::dispatch` on its associated immediate executor, which by default is the
///   I/O executor with `blocking.never` (a post): the handler is never invoked from within the
///   initiating function. `asio::bind_immediate_executor(ex, token)` chooses another executor; one
///   that runs handlers inline (e.g. `asio::system_executor`) makes the handler run inside the call,
///   and a handler that starts the next operation then recurses (so does a coroutine that loops
///   over `co_await` with `asio::bind_immediate_executor(inline_ex, asio::use_awaitable)`: plain
///   `asio::use_awaitable` is the token that avoids both the post and the recursion). With
///   `asio::deferred` the attempt is made when the operation is launched.
///
/// Otherwise (the socket buffer is full) the operation waits for writability on the I/O executor
/// and completes from there, as any Asio operation.
///
/// @par Completion Signature
/// @code void(std::error_code ec, std::size_t bytes_sent) @endcode
/// `bytes_sent` is all of @p data on success; on an error it is what went out before the error.
///
/// @par Errors
/// - steward::errc::too_many_fds: more than 253 descriptors; nothing was sent.
/// - steward::errc::empty_payload: descriptors but no data byte to carry them; nothing was sent.
/// - `std::errc::bad_file_descriptor` (EBADF): one of @p fds is not open; nothing was sent.
/// - ETOOMANYREFS (`std::system_category()`): the sender's descriptors in flight exceed its
///   RLIMIT_NOFILE; nothing was sent.
/// - `std::errc::broken_pipe` (EPIPE, never a SIGPIPE), `std::errc::connection_reset`: the peer
///   is gone.
/// - asio::error::operation_aborted: cancelled (see below).
/// - any other `sendmsg` errno, as `std::system_category()` codes.
///
/// @par Per-Operation Cancellation
/// While nothing has been sent yet (waiting for writability before the first byte), the
/// operation supports `terminal`, `partial` and `total` cancellation: it completes with
/// asio::error::operation_aborted and 0 bytes, no data and no descriptor reached the peer, and the
/// socket can be used again. Once the descriptors and part of the data are out, only `terminal`
/// cancellation is honoured (`partial` and `total` are ignored and the operation keeps sending):
/// it completes with asio::error::operation_aborted and the number of bytes sent; the descriptors
/// and a prefix of the data are already queued at the peer, so the connection is mid-message and
/// should be closed. `socket.cancel()` and `socket.close()` abort a pending wait at any stage, like
/// terminal cancellation.
template <fd_passing_socket Socket,
          typename CompletionToken = asio::default_completion_token_t<typename Socket::executor_type>>
auto async_send_fds(
    Socket& socket, std::span<const int> fds, asio::const_buffer data,
    CompletionToken&& token = asio::default_completion_token_t<typename Socket::executor_type>()) {
    // Validated here, reported through the handler: the bad request sends nothing at all.
    std::error_code refused;
    if (fds.size() > max_fds_per_message)
        refused = errc::too_many_fds;
    else if (!fds.empty() && data.size() == 0)
        refused = errc::empty_payload;
    detail::scm_rights_control control =
        refused ? detail::scm_rights_control{} : detail::scm_rights_control{fds};
    return detail::start_immediate_op<void(std::error_code, std::size_t)>(
        socket, detail::send_fds_op<Socket>(socket, std::move(control), data, refused),
        std::forward<CompletionToken>(token));
}

}  // namespace steward::io
