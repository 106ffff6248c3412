#pragma once
/// @file
/// steward::io::async_recv_fds — receive data and the file descriptors (SCM_RIGHTS) that came
/// with it from an AF_UNIX socket, on the socket's executor.

#include <steward/error.hpp>
#include <steward/io/detail/scm_rights.hpp>
#include <steward/unique_fd.hpp>

#include <asio/async_result.hpp>
#include <asio/cancellation_type.hpp>
#include <asio/compose.hpp>
#include <asio/error.hpp>
#include <asio/post.hpp>

#include <cstddef>
#include <system_error>
#include <utility>
#include <vector>

namespace steward::io {
namespace detail {

// The composed operation behind async_recv_fds; same phases as send_fds_op. Nothing is consumed
// from the socket until the one recvmsg that succeeds, after which the operation completes, so
// every cancellation type can be honoured for its whole life.
template <typename Socket>
class recv_fds_op {
public:
    recv_fds_op(Socket& socket, asio::mutable_buffer data, scm_rights_control control)
        : socket_(socket), data_(data), control_(std::move(control)) {}

    template <typename Self>
    void operator()(Self& self, std::error_code ec = {}) {
        switch (phase_) {
            case phase::starting:
                self.reset_cancellation_state(asio::enable_total_cancellation());
                phase_ = phase::waiting;
                // recvmsg into zero bytes cannot tell EOF from nothing, and descriptors need a byte.
                if (data_.size() == 0) return finish(self, asio::error::invalid_argument, 0, true);
                return attempt(self, true);
            case phase::waiting:
                if (!ec && self.cancelled() != asio::cancellation_type::none)
                    ec = asio::error::operation_aborted;
                if (ec) return finish(self, ec, 0, false);
                return attempt(self, false);
            case phase::completing:
                return self.complete(result_, received_, std::move(fds_));
        }
    }

private:
    enum class phase { starting, waiting, completing };

    template <typename Self>
    void attempt(Self& self, bool initiating) {
        const attempt_result r =
            recv_attempt(socket_.native_handle(), data_, control_, socket_kind_of<Socket>::value, fds_);
        if (r.would_block) {
            socket_.async_wait(Socket::wait_read, std::move(self));
            return;  // `this` now lives inside the moved handler: touch nothing
        }
        finish(self, r.ec, r.bytes, initiating);
    }

    template <typename Self>
    void finish(Self& self, std::error_code ec, std::size_t bytes, bool initiating) {
        if (!initiating) return self.complete(ec, bytes, std::move(fds_));
        result_ = ec;
        received_ = bytes;
        phase_ = phase::completing;
        auto io_executor = self.get_io_executor();
        asio::post(io_executor, std::move(self));
    }

    Socket& socket_;
    asio::mutable_buffer data_;
    scm_rights_control control_;
    std::vector<unique_fd> fds_;
    std::error_code result_;
    std::size_t received_ = 0;
    phase phase_ = phase::starting;
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
/// `asio::as_tuple(...)`, a callback, ...). The completion handler is never invoked from within
/// this function.
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
    return asio::async_compose<CompletionToken, void(std::error_code, std::size_t, std::vector<unique_fd>)>(
        detail::recv_fds_op<Socket>(socket, data, detail::scm_rights_control::for_receive()), token, socket);
}

}  // namespace steward::io
