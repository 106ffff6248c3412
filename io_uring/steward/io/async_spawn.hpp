#pragma once
// Spawning a child with posix_spawn and holding it by pidfd.
//
// - The child's signal mask is set by POSIX_SPAWN_SETSIGMASK, applied inside the child: the caller
//   never blocks anything itself (the old recipe "block in the parent, fork, unblock" delays the
//   caller's own signals and is wrong in multithreaded programs). Note that glibc's posix_spawn
//   internally blocks all signals of the calling thread for the few microseconds around clone(), to
//   keep handlers from running on the child's borrowed stack, and restores the mask before returning:
//   nothing is lost or reordered, and the mask seen before and after the call is identical.
// - Descriptors: the child gets stdio (unless remapped), the listed mappings and nothing else
//   (posix_spawn_file_actions_addclosefrom_np, glibc >= 2.34), whatever CLOEXEC state the parent's
//   descriptors have.
// - pidfd_open right after posix_spawn cannot race with pid reuse: the child is ours and unreaped,
//   so its pid cannot be recycled before we reap it (unless some other code in the process reaps
//   children it does not own with waitpid(-1); that is not supported).

#include <steward/io/child_process.hpp>
#include <steward/io/detail/immediate.hpp>

#include <asio/any_io_executor.hpp>
#include <asio/append.hpp>
#include <asio/async_result.hpp>
#include <asio/post.hpp>

#include <string>
#include <system_error>
#include <tuple>
#include <utility>
#include <vector>

namespace steward::io {

/// One descriptor to hand to the child: the parent's @p parent_fd becomes the child's @p child_fd.
struct fd_mapping {
    int parent_fd;
    int child_fd;
};

/// How to start the child.
struct spawn_options {
    /// The child's signal mask, exactly (whatever the calling thread's mask is): e.g. {SIGINT, SIGTERM}
    /// for a daemon that must not die from a terminal's Ctrl-C before it installs its own handling.
    /// Empty: the child starts with no signal blocked.
    std::vector<int> blocked_signals;
    /// Signals whose disposition is reset to SIG_DFL in the child (POSIX_SPAWN_SETSIGDEF). Handlers
    /// are reset by exec anyway; this matters for signals the parent ignores (SIG_IGN survives exec).
    std::vector<int> default_signals;
    /// Descriptors for the child, placed at the chosen numbers without CLOEXEC. The parent's
    /// descriptors are not modified (CLOEXEC or not, same number or not). Targets must be distinct;
    /// one parent descriptor may appear several times; 0, 1, 2 may be targets (replacing stdio).
    std::vector<fd_mapping> fds;
    /// Environment entries "NAME=value" added to (or replacing NAME in) this process's environment.
    std::vector<std::string> environment;
    /// Working directory of the child; empty: the caller's.
    std::string working_directory;
};

/// Starts the program argv[0] (a path: no PATH search; a relative one is resolved in the working
/// directory of the child) synchronously and returns its handle.
///
/// Every descriptor of the caller except 0, 1, 2 and those mapped in @p options is closed in the
/// child. The calling thread's signal mask is not modified.
///
/// @throws std::system_error naming argv[0] (and the working directory when it is the problem);
///   the codes are those of the `std::error_code&` overload.
[[nodiscard]] child_process spawn(const asio::any_io_executor& ex, const std::vector<std::string>& argv,
                                  const spawn_options& options = {});

/// As spawn() above, reporting errors in @p ec:
/// - steward::errc::executable_not_found: argv[0] does not exist, is not executable or is not a
///   valid executable (ENOENT, EACCES, ENOEXEC, ENOTDIR, ELOOP from exec).
/// - std::errc::invalid_argument: empty argv or program path, an invalid signal number, two
///   mappings with the same target, a negative target, an environment entry without "NAME=".
/// - std::errc::bad_file_descriptor: a mapped parent descriptor is not open.
/// - the chdir error (e.g. std::errc::no_such_file_or_directory) when the working directory is bad.
/// - std::errc::function_not_supported: the kernel has no pidfd_open (Linux < 5.3); the child
///   that was started is killed and reaped, because it could not be tracked safely.
/// - other system errors of posix_spawn / pidfd_open (EAGAIN, ENOMEM, EMFILE, ...); after a failure
///   no child is left running and no descriptor is leaked.
[[nodiscard]] child_process spawn(const asio::any_io_executor& ex, const std::vector<std::string>& argv,
                                  const spawn_options& options, std::error_code& ec) noexcept;

namespace detail {

struct initiate_spawn {
    asio::any_io_executor ex;

    template <typename Handler>
    void operator()(Handler&& handler, const std::vector<std::string>& argv,
                    const spawn_options& options) const {
        std::error_code ec;
        child_process child = spawn(ex, argv, options, ec);
        // Always an immediate completion: Asio's rule (the associated immediate executor, a post by
        // default) keeps the handler out of this call unless the caller bound one that runs inline.
        complete_immediately(std::forward<Handler>(handler), ex,
                             std::tuple<std::error_code, child_process>(ec, std::move(child)));
    }
};

}  // namespace detail

/// Spawns a child process (see spawn()) and completes with its handle.
///
/// posix_spawn runs in the initiating call (it returns once the child has exec'd, or failed to);
/// the completion is then submitted with `asio::dispatch` on the handler's associated immediate
/// executor: by default @p ex with `blocking.never` (a post), so it is never delivered from inside
/// the call unless the caller chose an inline executor with `asio::bind_immediate_executor`.
///
/// @param ex The executor the child's async_wait() uses; the completion runs on the handler's
///   associated executor (by default @p ex).
/// @param argv argv[0] is the program's path; the whole vector is the child's argv.
///
/// @par Completion Signature
/// @code void(std::error_code ec, steward::io::child_process child) @endcode
/// On error `child` holds nothing (`!child.valid()`).
///
/// @par Errors
/// As spawn() with `std::error_code&`; the code alone does not carry the path: report argv[0]
/// alongside it, or use the throwing spawn(), whose message names it.
///
/// @par Per-Operation Cancellation
/// Not supported: the child exists once the initiating call has returned (kill() it instead).
template <typename Executor, typename CompletionToken = asio::default_completion_token_t<Executor>>
auto async_spawn(const Executor& ex, std::vector<std::string> argv, spawn_options options,
                 CompletionToken&& token = asio::default_completion_token_t<Executor>()) {
    return asio::async_initiate<CompletionToken, void(std::error_code, child_process)>(
        detail::initiate_spawn{asio::any_io_executor(ex)}, token, std::move(argv), std::move(options));
}

}  // namespace steward::io
