#pragma once
/// @file
/// steward::tracker: the client of the `steward-tracker` daemon.
///
/// Promise: once a registration has completed (the awaited async_register() returned, or
/// register_resource() returned without error), the resource is removed when the last process of
/// the family that holds the tracker's pipe is gone (normal exit, exception or kill -9), unless it was
/// unregistered first.
///
/// @par Families of processes
/// - fork(): the child inherits the object and keeps using it (the same daemon, through the
///   inherited write end). The child never waits on or signals the parent's daemon, and it forgets
///   the parent's registrations (a daemon the child relaunches must not clean up the parent's
///   resources). Fork from a thread while no other thread is inside a tracker call. The blocking
///   calls work in the child as they are; asynchronous ones complete only if the child runs the
///   tracker's io_context (after `notify_fork(fork_child)`).
/// - Moved-from trackers may only be assigned to or destroyed.
/// - Destroy the tracker before the io_context its executor belongs to (it holds the daemon's pidfd
///   as an I/O object of that context).
/// - exec: the write end must be inherited and named to the new program. Recommended: spawn the
///   program with steward::io::async_spawn() mapping fd() to a fixed number and adding
///   environment_entry(that number) to its environment, e.g.
///   `opts.fds.push_back({t.fd(), 3}); opts.environment.push_back(t.environment_entry(3));`.
///   After a plain fork(), call export_environment() in the child, then exec. The new program calls
///   tracker::from_environment().
///
/// @par Threads and signals
/// Every member function is thread-safe. Nothing may be called from a signal handler.

#include <steward/error.hpp>
#include <steward/resource_type.hpp>

#include <asio/any_completion_handler.hpp>
#include <asio/any_io_executor.hpp>
#include <asio/as_tuple.hpp>
#include <asio/associated_executor.hpp>
#include <asio/async_result.hpp>
#include <asio/awaitable.hpp>
#include <asio/post.hpp>
#include <asio/this_coro.hpp>
#include <asio/use_awaitable.hpp>

#include <chrono>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <system_error>
#include <tuple>
#include <type_traits>

namespace steward {

/// How a tracker finds and starts its daemon.
struct tracker_options {
    /// Path of the `steward-tracker` program. Empty (the default): the environment variable
    /// STEWARD_TRACKER_EXE, then the installed location compiled into the library, then the build
    /// tree's. When set, only this path is tried.
    std::string executable;
    /// Set when the application ignores SIGPIPE (`signal(SIGPIPE, SIG_IGN)`) for the whole life of
    /// the tracker. A write into the daemon's pipe then needs no signal-mask changes around it: one
    /// system call per message instead of three. Checked each time a daemon is started (or a pipe
    /// adopted): if SIGPIPE is not ignored at that moment, the option has no effect until the next
    /// start. Restoring SIGPIPE's default action afterwards while the option is set lets a write
    /// after the daemon's death kill the process.
    bool sigpipe_ignored = false;
};

namespace detail {
class tracker_impl;
// Handlers the tracker's completion loops running on this thread have yet to resume (see
// src/tracker/tracker_client.cpp). Read by async_register() to skip its direct-write attempt, and
// the coroutine frame that attempt needs, while a group commit is completing its callers.
extern constinit thread_local std::size_t tracker_completions_pending;
}  // namespace detail

/// Client of `steward-tracker` (see the file comment for the promise and the family rules).
///
/// The daemon is started on first use (or by async_ensure_running()). It gets the read end of a
/// CLOEXEC pipe as its fd 3 plus stdio, nothing else, and starts with SIGINT and SIGTERM blocked
/// (the caller's signal mask is never touched). This process keeps the write end; children inherit
/// it.
///
/// @par Group commit
/// Registrations that are concurrent on one tracker (many coroutines, several threads, blocking
/// calls) are coalesced into writes of whole messages, each write at most PIPE_BUF (4096) bytes, so
/// the daemon never sees a torn line. Only one write is outstanding at a time and writes happen in
/// the order the calls were made, so the messages of one coroutine or thread keep their order. A
/// call completes when the write holding its message has completed.
///
/// @par Direct writes
/// A call made while nothing is queued, being written or being completed writes its own message at
/// once (one non-blocking write, the calling thread) instead of waiting for a flush; a full pipe
/// sends it to the queue like any other. With asio::use_awaitable (or as_tuple(use_awaitable)) such
/// a call completes without suspending the coroutine (every 64th in a row yields once through the executor,
/// so a loop of calls cannot starve other work); blocking calls return at once. Other completion tokens
/// always go through the queue and complete through the executor.
///
/// @par Liveness
/// If the daemon has died (a write fails with EPIPE: only the daemon holds the read end), that
/// operation starts a new one and first sends it REGISTER for every name this process has
/// registered and not unregistered, including the registration that discovered the death; a
/// one-time warning goes to stderr.
///
/// Copies are not allowed; moving transfers the daemon and the registrations.
class tracker {
public:
    using executor_type = asio::any_io_executor;

    /// Name of the environment variable of the exec convention ("STEWARD_TRACKER_FD").
    static constexpr const char* environment_variable = "STEWARD_TRACKER_FD";

    /// A tracker whose daemon is started on first use. Nothing happens until then.
    explicit tracker(executor_type ex, tracker_options options = {});
    /// Adopts the write end named by STEWARD_TRACKER_FD (set by a parent, see the file comment).
    /// The descriptor becomes owned (and CLOEXEC) and the variable is removed from the environment,
    /// so grandchildren get it only when passed on explicitly. This process does not own the daemon.
    /// @throws std::system_error: std::errc::invalid_argument when the variable is absent or not a
    ///   number, std::errc::bad_file_descriptor when it names no open descriptor, steward::errc::not_a_pipe
    ///   when it is not the write end of a pipe.
    static tracker from_environment(executor_type ex);
    /// As from_environment(ex), reporting errors in @p ec (the returned tracker then starts its own
    /// daemon on first use).
    static tracker from_environment(executor_type ex, std::error_code& ec);

    tracker(tracker&&) noexcept;
    tracker& operator=(tracker&&) noexcept;
    tracker(const tracker&) = delete;
    tracker& operator=(const tracker&) = delete;
    /// Closes this process's write end (the daemon cleans up once every process of the family has
    /// closed its own). Does not wait for the daemon: use async_stop() for that.
    ~tracker();

    [[nodiscard]] executor_type get_executor() const noexcept;

    /// Starts the daemon unless it runs. Concurrent callers share one start.
    ///
    /// @par Completion Signature
    /// @code void(std::error_code ec) @endcode
    ///
    /// @par Errors
    /// - steward::errc::executable_not_found: no `steward-tracker` at any candidate path;
    ///   last_error_detail() names every path tried.
    /// - system errors of pipe2/posix_spawn/pidfd_open.
    ///
    /// @par Per-Operation Cancellation
    /// Not supported.
    template <typename CompletionToken = asio::default_completion_token_t<executor_type>>
    auto async_ensure_running(CompletionToken&& token = asio::default_completion_token_t<executor_type>()) {
        return asio::async_initiate<CompletionToken, void(std::error_code)>(
            [this](auto handler) { initiate_ensure_running(std::move(handler)); }, token);
    }

    /// Registers @p name: the daemon removes it at shutdown unless it is unregistered first.
    ///
    /// For shared_memory and semaphore `abc` and `/abc` are the same name. The message is written in
    /// colon format when the name is printable ASCII without ':', as JSON otherwise.
    ///
    /// @par Completion Signature
    /// @code void(std::error_code ec) @endcode
    ///
    /// @par Errors
    /// - steward::errc::message_too_long: the message would exceed 512 bytes; nothing was written.
    /// - std::errc::invalid_argument: empty name, NUL byte, relative path for file/directory, type
    ///   noop; nothing was written.
    /// - the errors of async_ensure_running() (the daemon is started on first use).
    /// - other system errors of the write (not EPIPE, which relaunches the daemon).
    ///
    /// @par Per-Operation Cancellation
    /// Not supported: a message once accepted is written.
    template <typename CompletionToken = asio::default_completion_token_t<executor_type>>
    auto async_register(std::string_view name, resource_type type,
                        CompletionToken&& token = asio::default_completion_token_t<executor_type>()) {
        return async_message(true, name, type, std::forward<CompletionToken>(token));
    }

    /// Unregisters @p name (it will not be removed at shutdown). As async_register() otherwise.
    template <typename CompletionToken = asio::default_completion_token_t<executor_type>>
    auto async_unregister(std::string_view name, resource_type type,
                          CompletionToken&& token = asio::default_completion_token_t<executor_type>()) {
        return async_message(false, name, type, std::forward<CompletionToken>(token));
    }

    /// Closes this process's write end and, when this process started the daemon, waits up to
    /// @p timeout for it to exit. Messages accepted before are written first. Never hangs because
    /// another process (e.g. a forked child) still holds the pipe.
    ///
    /// @par Completion Signature
    /// @code void(std::error_code ec, std::optional<int> daemon_exit_status) @endcode
    /// The daemon's exit code (0 nothing leaked, 1 leaks cleaned, 2 a cleanup failed, 3 bad input),
    /// 128 + signal number when it was killed; std::nullopt when this process did not start it (or
    /// it was not running).
    ///
    /// @par Errors
    /// - steward::errc::timed_out: the daemon still runs after @p timeout (other writers are
    ///   alive); status std::nullopt. A later async_stop() waits for it again.
    ///
    /// A later registration starts a new daemon.
    ///
    /// @par Per-Operation Cancellation
    /// Not supported (bounded by @p timeout).
    template <typename CompletionToken = asio::default_completion_token_t<executor_type>>
    auto async_stop(std::chrono::milliseconds timeout,
                    CompletionToken&& token = asio::default_completion_token_t<executor_type>()) {
        return asio::async_initiate<CompletionToken, void(std::error_code, std::optional<int>)>(
            [this, timeout](auto handler) { initiate_stop(timeout, std::move(handler)); }, token);
    }

    /// Blocking ensure_running for code outside coroutines. @throws std::system_error whose message
    /// names every path tried when the program is not found.
    void ensure_running();
    void ensure_running(std::error_code& ec);

    /// Blocking registration (e.g. in destructors): returns once the write holding the message has
    /// completed. Errors as async_register(); the throwing form's message carries last_error_detail().
    /// Must not be called from a signal handler.
    void register_resource(std::string_view name, resource_type type);
    void register_resource(std::string_view name, resource_type type, std::error_code& ec);
    /// Blocking unregistration, as register_resource().
    void unregister_resource(std::string_view name, resource_type type);
    void unregister_resource(std::string_view name, resource_type type, std::error_code& ec);

    /// The write end of the pipe (CLOEXEC, owned by this object), -1 before the daemon was started
    /// or after async_stop(). Map it into exec'd children (see the file comment).
    [[nodiscard]] int fd() const noexcept;
    /// "STEWARD_TRACKER_FD=<child_fd>", for spawn_options::environment with fd() mapped to child_fd.
    [[nodiscard]] static std::string environment_entry(int child_fd);
    /// For a forked child about to exec: starts the daemon if needed, clears FD_CLOEXEC on fd() and
    /// sets STEWARD_TRACKER_FD in this process's environment. Calling it in a long-lived process
    /// hands the write end to every program it execs later. @throws std::system_error.
    void export_environment();
    /// True while this process has registered @p name (and not unregistered it) through this
    /// tracker. Used by shared_memory/named_semaphore to withdraw only their own registration when a
    /// create fails because the name is taken.
    [[nodiscard]] bool is_registered(std::string_view name, resource_type type) const;
    /// The pid of the daemon this process started (-1 if none, or after fork in the child).
    [[nodiscard]] int daemon_pid() const noexcept;
    /// Human-readable detail of the last failure to start the daemon (e.g. every path tried), empty
    /// if none.
    [[nodiscard]] std::string last_error_detail() const;

    /// How try_direct() ended (an implementation detail of async_register/async_unregister).
    enum class direct_outcome { done, done_yield, queue };

private:
    // Tokens that get the direct path: use_awaitable, and as_tuple(use_awaitable).
    template <typename T>
    struct awaitable_token : std::false_type {};
    template <typename Executor>
    struct awaitable_token<asio::use_awaitable_t<Executor>> : std::true_type {
        using executor = Executor;
        static constexpr bool tuple = false;
    };
    template <typename Executor>
    struct awaitable_token<asio::as_tuple_t<asio::use_awaitable_t<Executor>>> : std::true_type {
        using executor = Executor;
        static constexpr bool tuple = true;
    };

    // Queues the message (the initiation of every async_register/async_unregister that does not
    // complete directly). @p name: the operation's own copy or a view of one.
    struct message_initiation {
        tracker* self;
        bool register_it;
        resource_type type;
        template <typename Handler>
        void operator()(Handler handler, std::string_view name) const {
            const bool direct = self->runs_on_own_executor(handler);
            self->initiate_message(register_it, name, type, direct, std::move(handler));
        }
    };

    template <typename CompletionToken>
    auto async_message(bool register_it, std::string_view name, resource_type type, CompletionToken&& token) {
        using token_type = std::decay_t<CompletionToken>;
        if constexpr (awaitable_token<token_type>::value) {
            // A coroutine of our own instead of async_initiate: a message written directly then
            // completes without the coroutine ever suspending. Called from a caller a group commit
            // is resuming (others still to come), the message will join the next batch anyway: the
            // plain operation, one coroutine frame fewer. (Either path is correct at any time.)
            if (detail::tracker_completions_pending == 0)
                return awaitable_message<typename awaitable_token<token_type>::executor,
                                         awaitable_token<token_type>::tuple>(register_it, std::string(name),
                                                                             type);
        }
        // A copy of @p name: a deferred operation may start after the caller's string is gone.
        return asio::async_initiate<CompletionToken, void(std::error_code)>(
            message_initiation{this, register_it, type}, token, std::string(name));
    }

    // Lazy like every awaitable: @p name is a copy because it may be awaited after the caller's
    // string is gone. Tuple: as_tuple(use_awaitable), the error returned instead of thrown.
    template <typename Executor, bool Tuple>
    asio::awaitable<std::conditional_t<Tuple, std::tuple<std::error_code>, void>, Executor> awaitable_message(
        bool register_it, std::string name, resource_type type) {
        std::error_code ec;
        switch (try_direct(register_it, name, type, ec)) {
            case direct_outcome::done:
                break;
            case direct_outcome::done_yield:
                co_await asio::post(co_await asio::this_coro::executor, asio::use_awaitable_t<Executor>());
                end_yield();
                break;
            case direct_outcome::queue: {
                const message_initiation initiation{this, register_it, type};
                if constexpr (Tuple) {
                    auto token = asio::as_tuple(asio::use_awaitable_t<Executor>());
                    co_return co_await asio::async_initiate<decltype(token), void(std::error_code)>(
                        initiation, token, std::string_view(name));
                } else {
                    asio::use_awaitable_t<Executor> token;
                    co_await asio::async_initiate<decltype(token), void(std::error_code)>(
                        initiation, token, std::string_view(name));
                    co_return;
                }
            }
        }
        if constexpr (Tuple) {
            co_return std::tuple<std::error_code>(ec);
        } else {
            if (ec) throw std::system_error(ec);
        }
    }

    direct_outcome try_direct(bool register_it, std::string_view name, resource_type type,
                              std::error_code& ec);
    void end_yield();
    void initiate_ensure_running(asio::any_completion_handler<void(std::error_code)> handler);
    void initiate_message(bool register_it, std::string_view name, resource_type type, bool direct,
                          asio::any_completion_handler<void(std::error_code)> handler);
    // True when @p handler's associated executor is this tracker's executor (then a completion
    // running on it may invoke the handler in place, as dispatch() would).
    template <typename Handler>
    [[nodiscard]] bool runs_on_own_executor(const Handler& handler) const {
        const auto theirs = asio::get_associated_executor(handler, ex_);
        if constexpr (std::is_same_v<std::decay_t<decltype(theirs)>, executor_type>)
            return theirs == ex_;
        else
            return false;
    }
    void initiate_stop(std::chrono::milliseconds timeout,
                       asio::any_completion_handler<void(std::error_code, std::optional<int>)> handler);

    executor_type ex_;  // the impl's, kept here so the per-call executor check needs no call
    std::shared_ptr<detail::tracker_impl> impl_;
};

}  // namespace steward
