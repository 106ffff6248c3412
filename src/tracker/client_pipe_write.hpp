#pragma once
// The tracker client's direct write: one message (or batch) into the daemon's pipe, non-blocking
// and all or nothing, with SIGPIPE kept from killing the process when the daemon is gone.
//
// This is io::detail::write_whole() without what the direct path cannot afford per message: every
// system call beyond the write itself costs about as much as the write on a VM, so the guard is
// reduced to what the thread's state requires, and skipped entirely when the application ignores
// SIGPIPE (checked by the caller with sigpipe_ignored() when a daemon starts).
#include <cstddef>

namespace steward::detail::tracking {

/// The outcome of pipe_write_nowait().
enum class pipe_write_result {
    written,      ///< every byte is in the pipe
    would_block,  ///< the pipe is full; nothing was written
    no_reader,    ///< EPIPE: the daemon is gone; nothing was written, no SIGPIPE is left behind
    unsupported,  ///< the kernel refuses RWF_NOWAIT here; use io::detail::write_whole()
    error,        ///< another error, in @p err
};

/// One pwritev2(RWF_NOWAIT) of @p size (<= PIPE_BUF) bytes. @p skip_guard: SIGPIPE is ignored by
/// the process, so the write needs no signal-mask changes around it (one system call in all).
/// Otherwise SIGPIPE is blocked for the write when the thread does not block it already, and the
/// one the write raises on EPIPE is consumed unless an earlier one was pending.
pipe_write_result pipe_write_nowait(int fd, const char* data, std::size_t size, bool skip_guard,
                                    int& err) noexcept;

/// The same for @p fd opened with O_NONBLOCK (a private description of the pipe): one write(2),
/// which costs less than pwritev2 and is all or nothing for at most PIPE_BUF bytes too.
pipe_write_result pipe_write_nonblocking(int fd, const char* data, std::size_t size, bool skip_guard,
                                         int& err) noexcept;

/// True when SIGPIPE's disposition is SIG_IGN right now (one sigaction() query).
bool sigpipe_ignored() noexcept;

}  // namespace steward::detail::tracking
