#pragma once
/// @file
/// steward's own error conditions, in one std::error_category.

#include <string>
#include <system_error>

namespace steward {

/// Conditions steward reports that are not plain errno values. System errors are reported with
/// std::system_category() (see errno_code()).
enum class errc {
    message_too_long = 1,      ///< a tracker message is longer than 512 bytes; nothing was written
    too_many_fds,              ///< more than 253 (SCM_MAX_FD) descriptors in one message
    empty_payload,             ///< descriptors must ride on at least one data byte
    control_truncated,         ///< MSG_CTRUNC: the receiver's control buffer or RLIMIT_NOFILE was too small
    unexpected_control,        ///< a message carried control data that was not SCM_RIGHTS as expected
    io_uring_blocked,          ///< io_uring_setup failed with EPERM (seccomp or kernel.io_uring_disabled)
    io_uring_unsupported,      ///< io_uring_setup failed with ENOSYS (old kernel or sandbox)
    io_uring_memlock,          ///< io_uring_setup failed with ENOMEM (RLIMIT_MEMLOCK too low)
    executable_not_found,      ///< the program to spawn does not exist or is not executable
    malformed_message,         ///< bytes that do not decode as the expected protocol
    authentication_failed,     ///< the peer failed the HMAC challenge or is not authorised
    share_not_available,       ///< unknown, already fetched, revoked or expired share (never says which)
    too_many_shares,           ///< the sharer's cap on pending shares was reached
    limit_exceeded,            ///< a configured limit (frame size, connections, ...) was exceeded
    timed_out,                 ///< a deadline passed
    tracker_not_running,       ///< the tracker daemon is not running and could not be started
    batch_too_large,           ///< a batch of messages is larger than PIPE_BUF (4096); nothing was written
    not_a_pipe,                ///< an atomic message write was aimed at something that is not a pipe or FIFO
};

/// The category of steward::errc.
[[nodiscard]] const std::error_category& error_category() noexcept;

/// Makes a std::error_code from a steward::errc (found by ADL).
[[nodiscard]] inline std::error_code make_error_code(errc e) noexcept {
    return {static_cast<int>(e), error_category()};
}

/// The one conversion of an errno value (positive, or a kernel-style negative -errno) to
/// std::error_code.
[[nodiscard]] inline std::error_code errno_code(int err) noexcept {
    return {err < 0 ? -err : err, std::system_category()};
}

/// Throws std::system_error for @p ec when it holds an error; @p what names the operation.
void throw_if(const std::error_code& ec, const char* what);

}  // namespace steward

template <>
struct std::is_error_code_enum<steward::errc> : std::true_type {};
