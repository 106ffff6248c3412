#pragma once
/// @file
/// steward::io::async_send_fds — send file descriptors (SCM_RIGHTS) with a block of data over an
/// AF_UNIX socket, on the socket's executor.

#include <steward/error.hpp>
#include <steward/io/detail/scm_rights.hpp>

#include <asio/async_result.hpp>
#include <asio/cancellation_type.hpp>
#include <asio/compose.hpp>
#include <asio/error.hpp>
#include <asio/post.hpp>

#include <cstddef>
#include <span>
#include <system_error>
#include <utility>

namespace steward::io {

namespace detail {

// The composed operation behind async_send_fds. Phases: `starting` (first invocation, inside the
// initiating call), `waiting` (resumed by async_wait), `completing` (a result found during
// initiation, delivered through a post so the handler never runs inside the initiating call).
template <typename Socket>
class send_fds_op {
public:
    send_fds_op(Socket& socket, scm_rights_control control, asio::const_buffer data, std::error_code refused)
        : socket_(socket), control_(std::move(control)), data_(data), result_(refused) {}

    template <typename Self>
    void operator()(Self& self, std::error_code ec = {}) {
        switch (phase_) {
            case phase::starting:
                // Until a byte is out, stopping is harmless: every cancellation type is honoured.
                self.reset_cancellation_state(asio::enable_total_cancellation());
                phase_ = phase::waiting;
                if (result_) return finish(self, result_, true);
                return attempt(self, true);
            case phase::waiting:
                // A cancellation requested after the wait had already completed still counts.
                if (!ec && self.cancelled() != asio::cancellation_type::none)
                    ec = asio::error::operation_aborted;
                if (ec) return finish(self, ec, false);
                return attempt(self, false);
            case phase::completing:
                return self.complete(result_, sent_);
        }
    }

private:
    enum class phase { starting, waiting, completing };

    template <typename Self>
    void attempt(Self& self, bool initiating) {
        while (sent_ < data_.size()) {
            // The descriptors ride only on the first sendmsg that moves bytes; the rest of a
            // partially sent block goes out without control data.
            const attempt_result r =
                send_attempt(socket_.native_handle(), sent_ == 0 ? &control_ : nullptr, data_ + sent_);
            if (r.would_block) {
                socket_.async_wait(Socket::wait_write, std::move(self));
                return;  // `this` now lives inside the moved handler: touch nothing
            }
            if (r.ec) return finish(self, r.ec, initiating);
            if (sent_ == 0 && r.bytes < data_.size()) {
                // The descriptors and a prefix are out: abandoning the rest would leave the peer
                // mid-message, so only terminal cancellation (the stream is then unusable) remains.
                self.reset_cancellation_state(asio::enable_terminal_cancellation());
            }
            sent_ += r.bytes;
        }
        finish(self, {}, initiating);
    }

    template <typename Self>
    void finish(Self& self, std::error_code ec, bool initiating) {
        if (!initiating) return self.complete(ec, sent_);
        result_ = ec;
        phase_ = phase::completing;
        auto io_executor = self.get_io_executor();
        asio::post(io_executor, std::move(self));
    }

    Socket& socket_;
    scm_rights_control control_;
    asio::const_buffer data_;
    std::error_code result_;
    std::size_t sent_ = 0;
    phase phase_ = phase::starting;
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
/// `asio::as_tuple(...)`, a callback, ...). The completion handler is never invoked from within
/// this function.
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
    return asio::async_compose<CompletionToken, void(std::error_code, std::size_t)>(
        detail::send_fds_op<Socket>(socket, std::move(control), data, refused), token, socket);
}

}  // namespace steward::io
