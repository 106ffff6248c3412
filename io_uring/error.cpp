#include <steward/error.hpp>

#include <system_error>

namespace steward {
namespace {

class steward_category final : public std::error_category {
public:
    const char* name() const noexcept override { return "steward"; }

    std::string message(int value) const override {
        switch (static_cast<errc>(value)) {
        case errc::message_too_long:
            return "message longer than 512 bytes (the atomic tracker message limit); nothing was written";
        case errc::too_many_fds:
            return "more than 253 file descriptors in one message (SCM_MAX_FD); nothing was sent";
        case errc::empty_payload:
            return "file descriptors need at least one data byte to travel with; nothing was sent";
        case errc::control_truncated:
            return "descriptors were dropped in transit (MSG_CTRUNC): the receiver's control buffer was "
                   "too small or it reached RLIMIT_NOFILE; raise the limit (ulimit -n) and retry";
        case errc::unexpected_control:
            return "received control data that is not the expected SCM_RIGHTS descriptors";
        case errc::io_uring_blocked:
            return "io_uring is blocked (EPERM) by a seccomp policy or kernel.io_uring_disabled";
        case errc::io_uring_unsupported:
            return "io_uring is not available (ENOSYS): kernel without io_uring or a sandbox such as gVisor";
        case errc::io_uring_memlock:
            return "io_uring could not allocate its ring (ENOMEM): RLIMIT_MEMLOCK is too low";
        case errc::executable_not_found:
            return "executable not found or not executable";
        case errc::malformed_message:
            return "malformed message";
        case errc::authentication_failed:
            return "authentication failed (wrong authkey, or the peer is not authorised)";
        case errc::share_not_available:
            return "share not available: unknown, already fetched, revoked or expired";
        case errc::too_many_shares:
            return "too many pending shares: the sharer's cap was reached; fetch or revoke some first";
        case errc::limit_exceeded:
            return "a configured limit was exceeded";
        case errc::timed_out:
            return "timed out";
        case errc::tracker_not_running:
            return "the tracker daemon is not running and could not be started";
        case errc::batch_too_large:
            return "batch of messages larger than PIPE_BUF (4096 bytes), so one write could not be atomic; "
                   "nothing was written (split it into smaller batches)";
        case errc::not_a_pipe:
            return "atomic message writes need a pipe or FIFO (only pipe writes of <= PIPE_BUF bytes are "
                   "never split or interleaved); nothing was written";
        }
        return "unknown steward error " + std::to_string(value);
    }

    std::error_condition default_error_condition(int value) const noexcept override {
        switch (static_cast<errc>(value)) {
        case errc::message_too_long: return std::errc::message_size;
        case errc::timed_out: return std::errc::timed_out;
        case errc::io_uring_blocked: return std::errc::operation_not_permitted;
        case errc::io_uring_unsupported: return std::errc::function_not_supported;
        case errc::io_uring_memlock: return std::errc::not_enough_memory;
        case errc::executable_not_found: return std::errc::no_such_file_or_directory;
        default: return {value, *this};
        }
    }
};

}  // namespace

const std::error_category& error_category() noexcept {
    static const steward_category category;
    return category;
}

void throw_if(const std::error_code& ec, const char* what) {
    if (ec) throw std::system_error(ec, what);
}

}  // namespace steward
