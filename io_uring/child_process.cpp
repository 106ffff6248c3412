#include <steward/io/child_process.hpp>

#include <poll.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>
#include <cerrno>
#include <csignal>
#include <cstring>

#ifndef P_PIDFD
#define P_PIDFD 3  // <linux/wait.h>; glibc before 2.36 does not export it
#endif

namespace steward::io {

std::string exit_status::to_string() const {
    if (exited()) return "exited with status " + std::to_string(value_);
    if (killed()) {
        std::string text = "killed by signal " + std::to_string(value_);
        if (const char* name = ::sigdescr_np(value_)) text += std::string(" (") + name + ")";
        if (core_) text += ", core dumped";
        return text;
    }
    return "no status";
}

namespace detail {

child_state::child_state(const asio::any_io_executor& ex, pid_t child_pid, unique_fd child_pidfd)
    : pid(child_pid), pidfd(ex) {
    pidfd.assign(child_pidfd.get());  // may throw; the unique_fd still owns the fd until it succeeded
    (void)child_pidfd.release();
}

std::optional<exit_status> try_reap(child_state& state, std::error_code& ec) noexcept {
    ec.clear();
    if (state.status) return state.status;
    siginfo_t info;
    std::memset(&info, 0, sizeof info);
    int rc;
    do {
        rc = ::waitid(static_cast<idtype_t>(P_PIDFD), static_cast<id_t>(state.pidfd.native_handle()), &info,
                      WEXITED | WNOHANG);
    } while (rc < 0 && errno == EINTR);
    if (rc < 0) {
        ec = errno_code(errno);
        return std::nullopt;
    }
    if (info.si_pid == 0) return std::nullopt;  // still running
    switch (info.si_code) {
        case CLD_EXITED:
            state.status = exit_status::from_exit_code(info.si_status);
            break;
        case CLD_DUMPED:
            state.status = exit_status::from_signal(info.si_status, true);
            break;
        default:
            state.status = exit_status::from_signal(info.si_status);
            break;  // CLD_KILLED
    }
    return state.status;
}

}  // namespace detail

child_process::child_process(const executor_type& ex, pid_t pid, unique_fd pidfd)
    : state_(std::make_shared<detail::child_state>(ex, pid, std::move(pidfd))) {}

child_process& child_process::operator=(child_process&& other) noexcept {
    if (this != &other) {
        abandon();
        state_ = std::move(other.state_);
    }
    return *this;
}

child_process::~child_process() {
    abandon();
}

void child_process::abandon() noexcept {
    if (!state_) return;
    std::error_code ignored;
    (void)detail::try_reap(*state_, ignored);  // no zombie for a child that is already gone
    state_->pidfd.cancel(ignored);             // pending waits: operation_aborted
    state_.reset();  // the pidfd closes with the last pending wait holding the state
}

int child_process::pidfd() const noexcept {
    return state_ ? state_->pidfd.native_handle() : -1;
}

std::optional<exit_status> child_process::status() const noexcept {
    return state_ ? state_->status : std::nullopt;
}

child_process::executor_type child_process::get_executor() const noexcept {
    return state_ ? state_->pidfd.get_executor() : executor_type{};
}

exit_status child_process::wait() {
    std::error_code ec;
    const exit_status status = wait(ec);
    throw_if(ec, "waitid(P_PIDFD)");
    return status;
}

exit_status child_process::wait(std::error_code& ec) noexcept {
    ec.clear();
    if (!state_) {
        ec = std::make_error_code(std::errc::no_child_process);
        return {};
    }
    // poll + WNOHANG rather than a blocking waitid: a reactor backend may have made the pidfd
    // O_NONBLOCK, and then a blocking waitid(P_PIDFD) fails with EAGAIN.
    for (;;) {
        if (auto status = detail::try_reap(*state_, ec)) return *status;
        if (ec) return {};
        pollfd pfd{state_->pidfd.native_handle(), POLLIN, 0};
        if (::poll(&pfd, 1, -1) < 0 && errno != EINTR) {
            ec = errno_code(errno);
            return {};
        }
    }
}

std::optional<exit_status> child_process::try_wait() {
    std::error_code ec;
    auto status = try_wait(ec);
    throw_if(ec, "waitid(P_PIDFD)");
    return status;
}

std::optional<exit_status> child_process::try_wait(std::error_code& ec) noexcept {
    ec.clear();
    if (!state_) {
        ec = std::make_error_code(std::errc::no_child_process);
        return std::nullopt;
    }
    return detail::try_reap(*state_, ec);
}

void child_process::send_signal(int signo, std::error_code& ec) noexcept {
    ec.clear();
    if (!state_) {
        ec = std::make_error_code(std::errc::no_child_process);
        return;
    }
    if (state_->status) {  // reaped: the kernel would say ESRCH too; do not even ask
        ec = std::make_error_code(std::errc::no_such_process);
        return;
    }
    if (::syscall(SYS_pidfd_send_signal, state_->pidfd.native_handle(), signo, nullptr, 0u) != 0)
        ec = errno_code(errno);
}

void child_process::send_signal(int signo) {
    std::error_code ec;
    send_signal(signo, ec);
    throw_if(ec, "pidfd_send_signal");
}

void child_process::terminate(std::error_code& ec) noexcept {
    send_signal(SIGTERM, ec);
}
void child_process::terminate() {
    send_signal(SIGTERM);
}
void child_process::kill(std::error_code& ec) noexcept {
    send_signal(SIGKILL, ec);
}
void child_process::kill() {
    send_signal(SIGKILL);
}

void child_process::cancel() {
    if (state_) state_->pidfd.cancel();
}

}  // namespace steward::io
