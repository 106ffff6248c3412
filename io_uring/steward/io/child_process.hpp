#pragma once
// A spawned child process held by its pidfd: exit notification through the executor (the pidfd
// becomes readable when the child has exited; on the io_uring backend that wait is a POLL_ADD),
// reaping with waitid(P_PIDFD), signals with pidfd_send_signal. A pidfd names exactly one process,
// so none of this can hit an unrelated process that reused the pid.
//
// State shared with pending waits: the descriptor and the reaped status live in a small
// heap-allocated block that each async_wait holds, so a wait completing after the child_process
// was moved or destroyed touches nothing that is gone.

#include <steward/error.hpp>
#include <steward/unique_fd.hpp>

#include <asio/any_io_executor.hpp>
#include <asio/append.hpp>
#include <asio/async_result.hpp>
#include <asio/cancellation_type.hpp>
#include <asio/compose.hpp>
#include <asio/error.hpp>
#include <asio/posix/descriptor_base.hpp>
#include <asio/posix/stream_descriptor.hpp>
#include <asio/post.hpp>

#include <sys/types.h>

#include <memory>
#include <optional>
#include <string>
#include <system_error>
#include <utility>

namespace steward::io {

/// How a child process ended: exited with a status code, or killed by a signal.
class exit_status {
public:
    /// "No status": neither exited() nor killed(); what failed operations hand over.
    constexpr exit_status() noexcept = default;
    /// The child called exit(@p code) (or returned it from main).
    [[nodiscard]] static constexpr exit_status from_exit_code(int code) noexcept {
        return {kind::exited, code, false};
    }
    /// The child was killed by signal @p signo (@p core_dumped when it left a core dump).
    [[nodiscard]] static constexpr exit_status from_signal(int signo, bool core_dumped = false) noexcept {
        return {kind::killed, signo, core_dumped};
    }

    [[nodiscard]] constexpr bool exited() const noexcept { return kind_ == kind::exited; }
    [[nodiscard]] constexpr bool killed() const noexcept { return kind_ == kind::killed; }
    /// The exit code (0-255) when exited(), otherwise -1.
    [[nodiscard]] constexpr int code() const noexcept { return exited() ? value_ : -1; }
    /// The signal number when killed(), otherwise 0.
    [[nodiscard]] constexpr int signal() const noexcept { return killed() ? value_ : 0; }
    [[nodiscard]] constexpr bool core_dumped() const noexcept { return killed() && core_; }
    /// exited() with code 0.
    [[nodiscard]] constexpr bool success() const noexcept { return exited() && value_ == 0; }
    /// "exited with status 3", "killed by signal 9 (Killed)", "no status".
    [[nodiscard]] std::string to_string() const;

    friend constexpr bool operator==(const exit_status&, const exit_status&) noexcept = default;

private:
    enum class kind : unsigned char { none, exited, killed };
    constexpr exit_status(kind k, int value, bool core) noexcept : kind_(k), core_(core), value_(value) {}

    kind kind_ = kind::none;
    bool core_ = false;
    int value_ = -1;
};

namespace detail {

struct child_state {
    child_state(const asio::any_io_executor& ex, pid_t pid, unique_fd pidfd);

    pid_t pid;
    asio::posix::stream_descriptor pidfd;  // owns the pidfd
    std::optional<exit_status> status;     // set once reaped
};

/// Reaps the child if it has exited (waitid(P_PIDFD, WEXITED | WNOHANG)); nullopt while it runs.
/// Returns the cached status when already reaped.
[[nodiscard]] std::optional<exit_status> try_reap(child_state& state, std::error_code& ec) noexcept;

class wait_op {
public:
    explicit wait_op(std::shared_ptr<child_state> state) : state_(std::move(state)) {}

    template <typename Self>
    void operator()(Self& self) {
        // Nothing is consumed until the child is reaped, so every cancellation type leaves it
        // waitable.
        self.reset_cancellation_state(asio::enable_total_cancellation());
        wait(self);
    }

    template <typename Self>
    void operator()(Self& self, std::error_code ec) {
        if (!ec && self.cancelled() != asio::cancellation_type::none) ec = asio::error::operation_aborted;
        if (ec) {
            self.complete(ec, exit_status{});
            return;
        }
        const std::optional<exit_status> status = try_reap(*state_, ec);
        if (ec) {
            self.complete(ec, exit_status{});
        } else if (status) {
            self.complete(ec, *status);
        } else {
            wait(self);  // readable without being reapable: not expected, but never report a guess
        }
    }

private:
    template <typename Self>
    void wait(Self& self) {
        // Readable once the child has exited (and stays readable after it was reaped).
        state_->pidfd.async_wait(asio::posix::descriptor_base::wait_read, std::move(self));
    }

    std::shared_ptr<child_state> state_;
};

// One initiation for both cases, so the token's result type does not depend on the object's state.
struct initiate_wait {
    std::shared_ptr<child_state> state;

    template <typename Handler>
    void operator()(Handler&& handler) const {
        if (!state) {
            asio::post(asio::append(std::forward<Handler>(handler),
                                    std::make_error_code(std::errc::no_child_process), exit_status{}));
            return;
        }
        asio::async_compose<Handler, void(std::error_code, exit_status)>(wait_op(state), handler,
                                                                         state->pidfd);
    }
};

}  // namespace detail

/// A child process started by async_spawn() (or adopted from a pid and its pidfd).
///
/// Move-only. Like Asio's I/O objects, one object is not safe for concurrent use from several
/// threads; distinct objects are independent.
///
/// @par Destruction
/// Never blocks and never signals the child. A pending async_wait() completes with
/// asio::error::operation_aborted. If the child has already exited it is reaped on the spot (no
/// zombie is left behind). If it still runs, it is left running, un-reaped: it becomes a zombie when
/// it exits until this process exits or reaps it some other way (e.g. `waitpid(pid)` with the
/// pid()). Killing it would surprise callers who meant it to outlive the handle, and reaping it in
/// the background would need outstanding work that keeps `io_context::run()` from returning. Call
/// async_wait(), wait() or kill() first to control the end.
class child_process {
public:
    using executor_type = asio::any_io_executor;

    /// No process.
    child_process() noexcept = default;
    /// Adopts the child @p pid and its pidfd (from pidfd_open); waits run on @p ex.
    child_process(const executor_type& ex, pid_t pid, unique_fd pidfd);
    child_process(child_process&& other) noexcept = default;
    /// Lets go of the current child as the destructor does, then takes @p other's.
    child_process& operator=(child_process&& other) noexcept;
    ~child_process();

    /// True when a child is held.
    [[nodiscard]] bool valid() const noexcept { return state_ != nullptr; }
    /// The child's pid (-1 when none). Still valid after reaping, but then it may name another
    /// process: prefer the pidfd-based calls.
    [[nodiscard]] pid_t pid() const noexcept { return state_ ? state_->pid : -1; }
    /// The pidfd (owned by this object; -1 when none). CLOEXEC.
    [[nodiscard]] int pidfd() const noexcept;
    /// The exit status once the child has been reaped by a wait.
    [[nodiscard]] std::optional<exit_status> status() const noexcept;
    /// The executor async_wait() runs on.
    [[nodiscard]] executor_type get_executor() const noexcept;

    /// Waits for the child to exit, then reaps it.
    ///
    /// @par Completion Signature
    /// @code void(std::error_code ec, steward::io::exit_status status) @endcode
    ///
    /// @par Errors
    /// - asio::error::operation_aborted: cancelled, or the child_process was destroyed; the child was
    ///   not reaped and can be waited for again.
    /// - std::errc::no_child_process: no child held, or it was reaped by someone else (e.g. a
    ///   `waitpid(-1, ...)` elsewhere in the process).
    ///
    /// Once reaped, further waits complete with the same status. Several waits may be pending at
    /// once, and the child_process may be moved while they are.
    ///
    /// @par Per-Operation Cancellation
    /// terminal, partial and total: nothing has happened to the child until the wait completes.
    template <typename CompletionToken = asio::default_completion_token_t<executor_type>>
    auto async_wait(CompletionToken&& token = asio::default_completion_token_t<executor_type>()) {
        return asio::async_initiate<CompletionToken, void(std::error_code, exit_status)>(
            detail::initiate_wait{state_}, token);
    }

    /// Blocks the calling thread until the child exits, then reaps it. Throws std::system_error.
    exit_status wait();
    /// As wait(); errors are reported in @p ec.
    exit_status wait(std::error_code& ec) noexcept;
    /// Reaps the child if it has exited, without blocking; nullopt while it runs.
    std::optional<exit_status> try_wait();
    /// As try_wait(); errors are reported in @p ec.
    std::optional<exit_status> try_wait(std::error_code& ec) noexcept;

    /// Sends SIGTERM through the pidfd. std::errc::no_such_process once the child was reaped.
    void terminate();
    void terminate(std::error_code& ec) noexcept;
    /// Sends SIGKILL through the pidfd. std::errc::no_such_process once the child was reaped.
    void kill();
    void kill(std::error_code& ec) noexcept;
    /// Sends @p signo through the pidfd (pidfd_send_signal).
    void send_signal(int signo);
    void send_signal(int signo, std::error_code& ec) noexcept;

    /// Cancels pending async_wait() operations (they complete with operation_aborted).
    void cancel();

private:
    void abandon() noexcept;

    std::shared_ptr<detail::child_state> state_;
};

}  // namespace steward::io
