#pragma once
// Atomic message writes to a pipe shared with other processes (the tracker's wire).
//
// The guarantee rests on one kernel fact: a write() of at most PIPE_BUF (4096) bytes to a pipe is
// never split and never interleaved with other writers' data. So a message (<= 512 bytes), or a
// batch of whole messages (<= 4096 bytes), goes out in exactly one write that either lands whole or
// not at all.
//
// How the write avoids blocking without O_NONBLOCK. The write end is a blocking descriptor shared by
// inheritance with every process of the family, and O_NONBLOCK lives in the open file description,
// i.e. it would change the behaviour of all of them. Alternatives considered:
//  - poll for POLLOUT, then a plain write(): another writer can fill the pipe in between and the
//    write then blocks the executor thread. Rejected.
//  - FIONREAD / F_GETPIPE_SZ to compute free space: Linux pipes are accounted in page slots, not
//    bytes (sixteen 1-byte writes can fill a 64 KiB pipe), and the check races with other writers.
//    Rejected.
//  - writing through Asio/io_uring (IORING_OP_WRITE): atomic and non-blocking, but a write to a pipe
//    without readers raises SIGPIPE in whichever thread happens to submit or complete the SQE, where
//    it cannot be masked reliably. Rejected.
//  - pwritev2(RWF_NOWAIT): a per-call "do not wait" flag, so the shared description is untouched. The
//    pipe code treats it exactly like O_NONBLOCK: a write <= PIPE_BUF lands whole or fails with
//    EAGAIN having written nothing. Chosen. Pipes accept RWF_NOWAIT since Linux 6.4 (FMODE_NOWAIT
//    on pipes, plus the IOCB_NOWAIT check in pipe_write that came with it); older kernels, e.g.
//    Debian 12's 6.1, answer EOPNOTSUPP. Then (once per process, remembered) every write goes
//    through a private open file description of the same pipe, opened through /proc/self/fd/N with
//    O_NONBLOCK for that one write: opening a pipe through /proc creates a NEW description, so its
//    O_NONBLOCK affects nobody else. Costs an open/close per write and needs /proc mounted.
// On EAGAIN the operation waits for writability through the executor (io_uring POLL_ADD) and tries
// again. POLLOUT on a pipe means "a slot is free", and a write <= PIPE_BUF always fits one slot, so
// every retry follows a real state change: no busy loop.
//
// SIGPIPE: a pipe write without readers raises SIGPIPE (there is no MSG_NOSIGNAL for pipes). Around
// the write the calling thread blocks SIGPIPE; if the write failed with EPIPE and no SIGPIPE was
// pending before, the one it raised (thread-directed, so it is dequeued first) is consumed with a
// zero-timeout sigtimedwait; then the thread's mask is restored. The process disposition is never
// changed and no signal aimed at the process is lost. ("Pending before" can only be true when the
// caller already blocked SIGPIPE, so sigpending() is asked only then.)
//
// System calls per message: write_whole() makes rt_sigprocmask (block), pwritev2, rt_sigprocmask
// (restore); async_write_message() adds one fstat for its not-a-pipe check. That check is not
// cached: no descriptor-level state survives a close() + assign() of another file with the same
// number, and a stale "is a pipe" would let a message land in a file or socket. Code that owns
// its pipe checks once and calls write_whole() directly (the tracker client does).

#include <steward/error.hpp>
#include <steward/io/detail/immediate.hpp>
#include <steward/unique_fd.hpp>

#include <asio/append.hpp>
#include <asio/async_result.hpp>
#include <asio/buffer.hpp>
#include <asio/cancellation_type.hpp>
#include <asio/compose.hpp>
#include <asio/error.hpp>
#include <asio/posix/descriptor_base.hpp>
#include <asio/posix/stream_descriptor.hpp>
#include <asio/post.hpp>

#include <cstddef>
#include <cstring>
#include <memory>
#include <span>
#include <system_error>
#include <tuple>
#include <utility>
#include <vector>

namespace steward::io {

/// Largest single message: the tracker protocol's limit (and POSIX's minimum PIPE_BUF).
inline constexpr std::size_t max_message_size = 512;
/// Largest write that a pipe never splits or interleaves (PIPE_BUF on Linux).
inline constexpr std::size_t max_atomic_write = 4096;

namespace detail {

/// errc::not_a_pipe unless @p fd is a pipe or FIFO; the fstat() error if it is not open.
[[nodiscard]] std::error_code check_pipe(int fd) noexcept;

/// Exactly one non-blocking, all-or-nothing write of @p size (<= max_atomic_write) bytes to the pipe
/// @p fd, with SIGPIPE suppressed for the calling thread. Returns @p size on success; on a full pipe
/// sets @p ec to asio::error::would_block and has written nothing; EPIPE -> std::errc::broken_pipe.
std::size_t write_whole(int fd, const void* data, std::size_t size, std::error_code& ec) noexcept;

/// A private, O_NONBLOCK open file description of the pipe write end @p fd (via /proc/self/fd),
/// for waiting on backends whose async_wait sets O_NONBLOCK on the descriptor it waits on.
[[nodiscard]] unique_fd open_private_write_end(int fd, std::error_code& ec) noexcept;

/// Test hook: behave as if the kernel refused RWF_NOWAIT on pipes (exercises the /proc fallback).
void force_nowait_fallback_for_tests(bool on) noexcept;

struct completion_tag {};

template <typename Descriptor>
class write_whole_op {
public:
    write_whole_op(Descriptor& pipe, asio::const_buffer message) : pipe_(pipe), single_(message) {
        if (message.size() > max_message_size) precheck_ = errc::message_too_long;
    }

    write_whole_op(Descriptor& pipe, std::span<const asio::const_buffer> messages) : pipe_(pipe) {
        std::size_t total = 0;
        for (const auto& m : messages) {
            if (m.size() > max_message_size) {
                precheck_ = errc::message_too_long;
                return;
            }
            total += m.size();
        }
        if (total > max_atomic_write) {
            precheck_ = errc::batch_too_large;
            return;
        }
        // Gathered into one buffer: at most 4 KiB copied, and no IOV_MAX limit on the batch size.
        batch_ = std::make_unique<std::vector<char>>(total);
        char* out = batch_->data();
        for (const auto& m : messages) {
            if (m.size() != 0) std::memcpy(out, m.data(), m.size());
            out += m.size();
        }
        single_ = asio::const_buffer(batch_->data(), batch_->size());
    }

    // First attempt (see detail/immediate.hpp): the checks and one write. True when that settled
    // the operation; false when the pipe is full and the composed operation below has to wait.
    bool start() {
        ec_ = precheck_;
        if (!ec_) ec_ = check_pipe(pipe_.native_handle());
        if (!ec_ && single_.size() != 0)
            written_ = write_whole(pipe_.native_handle(), single_.data(), single_.size(), ec_);
        return ec_ != asio::error::would_block;
    }

    [[nodiscard]] std::tuple<std::error_code, std::size_t> result() const noexcept { return {ec_, written_}; }

    // Composed operation, entered only after start() found the pipe full: wait for room.
    template <typename Self>
    void operator()(Self& self) {
        // Nothing is written before the operation completes successfully, so any cancellation type
        // leaves the pipe as it was.
        self.reset_cancellation_state(asio::enable_total_cancellation());
        wait(self);
    }

    // Readiness reported (or the wait failed / was cancelled).
    template <typename Self>
    void operator()(Self& self, std::error_code ec) {
        if (!ec && self.cancelled() != asio::cancellation_type::none) ec = asio::error::operation_aborted;
        if (ec) {
            self.complete(ec, 0);
            return;
        }
        const std::size_t n = write_whole(pipe_.native_handle(), single_.data(), single_.size(), ec);
        if (ec == asio::error::would_block) {
            wait(self);  // another writer took the free slot first
            return;
        }
        self.complete(ec, n);
    }

    template <typename Self>
    void operator()(Self& self, completion_tag, std::error_code ec, std::size_t n) {
        self.complete(ec, n);
    }

private:
    template <typename Self>
    void wait(Self& self) {
#if defined(ASIO_HAS_IO_URING_AS_DEFAULT)
        // io_uring's async_wait is a POLL_ADD and leaves the descriptor's flags alone.
        pipe_.async_wait(asio::posix::descriptor_base::wait_write, std::move(self));
#else
        // The reactor backends set O_NONBLOCK (FIONBIO) on whatever they wait on; wait on a private
        // description of the same pipe instead. Held by pointer: the op (and so this member) moves
        // into the wait's handler while the wait is being started on it.
        if (!waiter_) {
            std::error_code ec;
            unique_fd fd = open_private_write_end(pipe_.native_handle(), ec);
            if (ec) {
                asio::post(pipe_.get_executor(),
                           asio::append(std::move(self), completion_tag{}, ec, std::size_t{0}));
                return;
            }
            waiter_ = std::make_unique<waiter_type>(pipe_.get_executor(), fd.get());
            (void)fd.release();
        }
        waiter_type& waiter = *waiter_;
        waiter.async_wait(asio::posix::descriptor_base::wait_write, std::move(self));
#endif
    }

    using waiter_type = asio::posix::basic_stream_descriptor<typename Descriptor::executor_type>;

    Descriptor& pipe_;
    asio::const_buffer single_;
    std::unique_ptr<std::vector<char>> batch_;  // stable address: single_ points into it across moves
    std::unique_ptr<waiter_type> waiter_;
    std::error_code precheck_;
    std::error_code ec_;
    std::size_t written_ = 0;
};

}  // namespace detail

/// Writes one message to a pipe in exactly one write(), never split or interleaved with other writers.
///
/// @param pipe The write end of a pipe or FIFO (an `asio::posix::stream_descriptor` or any type with
///   `native_handle()`, `get_executor()` and `async_wait()`). Its open file description is never
///   changed: no O_NONBLOCK is set on it (it is typically shared with other processes).
/// @param message At most 512 bytes. Not copied: the bytes stay valid until the operation
///   completes (for deferred tokens this includes the time before it is launched).
/// @param token The completion token (`asio::use_awaitable`, `asio::deferred`,
///   `asio::as_tuple(...)`, a callback, ...). See Immediate Completion for when the handler runs.
///
/// @par Immediate Completion
/// The pipe check (one `fstat`) and the first write are made inside this call (but see
/// use_awaitable and deferred below). When that settles the operation (the message was written, or
/// an error, including the checks), it completes without waiting:
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
/// Otherwise (the pipe is full) the operation waits for room on the I/O executor and completes
/// from there, as any Asio operation.
///
/// @par Completion Signature
/// @code void(std::error_code ec, std::size_t bytes_written) @endcode
/// `bytes_written` is `message.size()` on success and 0 otherwise: there is no partial write.
///
/// @par Errors
/// - steward::errc::message_too_long: more than 512 bytes; nothing was written.
/// - steward::errc::not_a_pipe: the descriptor is not a pipe or FIFO; nothing was written.
/// - std::errc::broken_pipe: no reader is left. SIGPIPE is suppressed for this write; the process
///   survives whatever its SIGPIPE disposition.
/// - asio::error::operation_aborted: cancelled while waiting for room; nothing was written.
/// - other std::system_category() errors from the write or the wait.
///
/// When the pipe is full the operation waits for writability on the executor (no busy loop, no
/// blocked thread) and then writes. Concurrent operations on the same pipe are each atomic but not
/// ordered relative to each other while they wait: to keep an order, have one outstanding at a time.
///
/// @par Per-Operation Cancellation
/// terminal, partial and total: cancellation can only take effect while the operation waits for
/// room, when nothing has been written yet.
template <typename Descriptor,
          typename CompletionToken = asio::default_completion_token_t<typename Descriptor::executor_type>>
auto async_write_message(
    Descriptor& pipe, asio::const_buffer message,
    CompletionToken&& token = asio::default_completion_token_t<typename Descriptor::executor_type>()) {
    return detail::start_immediate_op<void(std::error_code, std::size_t)>(
        pipe, detail::write_whole_op<Descriptor>(pipe, message), std::forward<CompletionToken>(token));
}

/// Writes several whole messages to a pipe in one atomic write() (group commit).
///
/// @param messages Each at most 512 bytes, together at most 4096 (PIPE_BUF) bytes. They are copied
///   by this call (also with deferred tokens), so neither the bytes nor the span need outlive it.
///   An empty batch completes with 0.
///
/// @par Completion Signature
/// @code void(std::error_code ec, std::size_t bytes_written) @endcode
/// `bytes_written` is the sum of the message sizes on success, 0 otherwise.
///
/// @par Errors
/// As async_write_message(), plus steward::errc::batch_too_large when the batch exceeds 4096 bytes
/// (message_too_long when one message exceeds 512); in both cases nothing was written.
///
/// @par Immediate Completion
/// As async_write_message(): when the first write settles the operation, use_awaitable resumes
/// at once and other tokens get the handler through its associated immediate executor (a post by
/// default, never inside this call).
///
/// @par Per-Operation Cancellation
/// terminal, partial and total, while waiting for room (nothing written yet).
template <typename Descriptor,
          typename CompletionToken = asio::default_completion_token_t<typename Descriptor::executor_type>>
auto async_write_messages(
    Descriptor& pipe, std::span<const asio::const_buffer> messages,
    CompletionToken&& token = asio::default_completion_token_t<typename Descriptor::executor_type>()) {
    return detail::start_immediate_op<void(std::error_code, std::size_t)>(
        pipe, detail::write_whole_op<Descriptor>(pipe, messages), std::forward<CompletionToken>(token));
}

}  // namespace steward::io
