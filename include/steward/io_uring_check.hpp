#pragma once
/// @file
/// The start-up probe that tells whether io_uring can be used, and if not, why and what to do.

#include <string>
#include <system_error>

namespace steward {

/// Checks that this process can create an io_uring (io_uring_setup with a tiny ring).
///
/// steward runs it (once per process, cached) before a tracker starts its daemon, a sharer starts
/// its listener and a fetch opens a connection, and reports its code; tracker::last_error_detail()
/// carries the explanation. Call it at start-up, before creating the io_context, to fail fast with
/// a message a user can act on:
/// - steward::errc::io_uring_blocked (EPERM): a seccomp policy (Docker's default profile) or the
///   `kernel.io_uring_disabled` sysctl (its value is named) forbids io_uring;
/// - steward::errc::io_uring_unsupported (ENOSYS): a kernel without io_uring or a sandbox such
///   as gVisor;
/// - steward::errc::io_uring_memlock (ENOMEM): RLIMIT_MEMLOCK too low for the ring.
/// Each message names the fix, including rebuilding with `-DSTEWARD_IO_BACKEND=epoll`.
/// In an epoll build the check always succeeds.
///
/// @throws std::system_error carrying the code above and the explanation.
void check_io_uring();

/// As check_io_uring(), reporting through @p ec; @p explanation (if given) receives the full
/// human-readable explanation (empty on success).
void check_io_uring(std::error_code& ec, std::string* explanation = nullptr) noexcept;

}  // namespace steward
