#pragma once
/// @file
/// steward::io::async_recv_fds — receive data and the file descriptors (SCM_RIGHTS) that came
/// with it from an AF_UNIX socket, on the socket's executor.

#include <steward/error.hpp>
#include <steward/io/detail/immediate.hpp>
#include <steward/io/detail/scm_rights.hpp>
#include <steward/unique_fd.hpp>

#include <asio/async_result.hpp>
#include <asio/cancellation_type.hpp>
#include <asio/compose.hpp>
#include <asio/error.hpp>

#include <cstddef>
#include <system_error>
#include <tuple>
#include <utility>
#include <vector>

namespace steward::io {
namespace detail {

// The operation behind async_recv_fds (shape: see detail/immediate.hpp). Nothing is consumed from
// the socket until the one recvmsg that succeeds, after which the operation completes, so every
// cancellation type can be honoured for its whole life.
template <typename Socket>
class recv_fds_op {
public:
    recv_fds_op(Socket& socket, asio::mutable_buffer data) : socket_(socket), data_(data) {}

    bool start() {
        // recvmsg into zero bytes cannot tell EOF from nothing, and descriptors need a byte.
        if (data_.size() == 0) {
            result_ = asio::error::invalid_argument;
            return true;
        }
        return attempt();
    }

    [[nodiscard]] std::tuple<std::error_code, std::size_t, std::vector<unique_fd>> result() {
        return {result_, received_, std::move(fds_)};
    }

    // Composed operation, entered after start() found nothing to receive.
    template <typename Self>
    void operator()(Self& self) {
        self.reset_cancellation_state(asio::enable_total_cancellation());
        socket_.async_wait(Socket::wait_read, std::move(self));
    }

    // Readability reported (or the wait failed / was cancelled).
    template <typename Self>
    void operator()(Self& self, std::error_code ec) {
        if (!ec && self.cancelled() != asio::cancellation_type::none) ec = asio::error::operation_aborted;
        if (ec) return self.complete(ec, std::size_t{0}, std::vector<unique_fd>{});
        if (!attempt()) {
            socket_.async_wait(Socket::wait_read, std::move(self));
            return;  // `this` now lives inside the moved handler: touch nothing
        }
        self.complete(result_, received_, std::move(fds_));
    }

private:
    // One recvmsg: true when it settled the operation (result_ set), false on EAGAIN.
    bool attempt() {
        // The control buffer is only touched inside the recvmsg and the parse that follows it, so
        // one per thread serves every operation (no allocation per receive).
        thread_local const scm_rights_control control = scm_rights_control::for_receive();
        const attempt_result r =
            recv_attempt(socket_.native_handle(), data_, control, socket_kind_of<Socket>::value, fds_);
        if (r.would_block) return false;
        result_ = r.ec;
        received_ = r.bytes;
        return true;
    }

    Socket& socket_;
    asio::mutable_buffer data_;
    std::vector<unique_fd> fds_;
    std::error_code result_;
    std::size_t received_ = 0;
};

}  // namespace detail

/// Receives data into @p data together with the descriptors (SCM_RIGHTS) that came with it,
/// asynchronously.
///
/// Each attempt is one `recvmsg(MSG_CMSG_CLOEXEC | MSG_DONTWAIT)` with a control buffer sized for
/// max_fds_per_message (253) descriptors; on `EAGAIN` the operation waits with
/// `socket.async_wait(wait_read)` (an io_uring poll on steward's executor) and retries. The
/// socket's file status flags are never changed (no `O_NONBLOCK`). Like `async_read_some`, one
/// successful receive completes the operation: on a stream socket it may return fewer bytes than
/// the sender sent, and it never returns bytes from two descriptor batches, so the descriptors
/// arrive with the read that returns the first byte their sender attached them to.
///
/// Every received descriptor is close-on-exec and owned by a steward::unique_fd from the moment
/// the control message is parsed; descriptors are never leaked, whatever the outcome.
///
/// @param socket An AF_UNIX stream, seq-packet or datagram socket. It must outlive the operation,
/// and the caller must not start another receive on it until this one completes.
///
/// @param data The buffer for the data; must not be empty (asio::error::invalid_argument). The
/// underlying memory must stay valid until the completion handler runs.
///
/// @param token The completion token (`asio::use_awaitable`, `asio::deferred`,
/// `asio::as_tuple(...)`, a callback, ...). See Immediate Completion for when the handler runs.
///
/// @par Immediate Completion
/// The first `recvmsg` is made inside this call (but see use_awaitable and deferred below). When
/// that settles the operation (data or end of stream was there, or an error, including an empty @p
/// data), it completes without waiting:
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
/// Otherwise (nothing to read yet) the operation waits for readability on the I/O executor and
/// completes from there, as any Asio operation.
///
/// @par Completion Signature
/// @code void(std::error_code ec, std::size_t bytes, std::vector<steward::unique_fd> fds) @endcode
/// `bytes` is the number of bytes placed in @p data, `fds` the descriptors received, in the
/// sender's order. With `asio::use_awaitable` the result is a `std::tuple<std::size_t,
/// std::vector<unique_fd>>` and errors throw (the descriptors that came with a failed receive are
/// then closed).
///
/// @par Errors
/// - steward::errc::control_truncated: MSG_CTRUNC, some descriptors were dropped in transit
///   because the receiver reached RLIMIT_NOFILE. The data (`bytes`) and the descriptors that did
///   arrive are still handed over in `fds`.
/// - steward::errc::unexpected_control: a control message other than SCM_RIGHTS arrived (for
///   example SCM_CREDENTIALS after SO_PASSCRED was set). Descriptors it carried (SCM_PIDFD) are
///   closed; the data and the SCM_RIGHTS descriptors are still handed over.
/// - asio::error::eof: the peer closed the connection (stream and seq-packet sockets); no data.
/// - asio::error::message_size: a seq-packet or datagram message was longer than @p data and was
///   truncated; the descriptors are handed over.
/// - asio::error::invalid_argument: @p data is empty; nothing was received.
/// - asio::error::operation_aborted: cancelled (see below).
/// - any other `recvmsg` errno, as `std::system_category()` codes.
///
/// @par Per-Operation Cancellation
/// Supports `terminal`, `partial` and `total` cancellation. Nothing is taken from the socket
/// until the single receive that completes the operation, so a cancelled operation completes with
/// asio::error::operation_aborted, 0 bytes and no descriptors, and the pending data and
/// descriptors stay queued for the next receive. `socket.cancel()` has the same effect.
template <fd_passing_socket Socket,
          typename CompletionToken = asio::default_completion_token_t<typename Socket::executor_type>>
auto async_recv_fds(
    Socket& socket, asio::mutable_buffer data,
    CompletionToken&& token = asio::default_completion_token_t<typename Socket::executor_type>()) {
    return detail::start_immediate_op<void(std::error_code, std::size_t, std::vector<unique_fd>)>(
        socket, detail::recv_fds_op<Socket>(socket, data), std::forward<CompletionToken>(token));
}

}  // namespace steward::io
