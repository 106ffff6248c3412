#include "tracker/client_pipe_write.hpp"

#include <pthread.h>
#include <sys/uio.h>

#include <cerrno>
#include <csignal>
#include <ctime>

// [[gnu::hot]]: on the tracker client's per-message path, placed next to it (see tracker_client.cpp).
namespace steward::detail::tracking {
namespace {

// fd_nonblocking: fd is an O_NONBLOCK description (plain write); otherwise RWF_NOWAIT.
[[gnu::hot]] ssize_t write_once(int fd, const char* data, std::size_t size, bool fd_nonblocking,
                                int& err) noexcept {
    iovec iov{const_cast<char*>(data), size};
    ssize_t n;
    do {
        n = fd_nonblocking ? ::write(fd, data, size) : ::pwritev2(fd, &iov, 1, -1, RWF_NOWAIT);
    } while (n < 0 && errno == EINTR);
    err = n < 0 ? errno : 0;
    return n;
}

[[gnu::hot]] pipe_write_result classify(ssize_t n, std::size_t size, int& err) noexcept {
    if (n >= 0) {
        if (static_cast<std::size_t>(n) == size) return pipe_write_result::written;
        // A pipe write of at most PIPE_BUF bytes is all or nothing: the descriptor is not the pipe
        // it was.
        err = EIO;
        return pipe_write_result::error;
    }
    switch (err) {
        case EAGAIN:
            return pipe_write_result::would_block;
        case EPIPE:
            return pipe_write_result::no_reader;
        case EOPNOTSUPP:
            return pipe_write_result::unsupported;
        default:
            return pipe_write_result::error;
    }
}

[[gnu::hot]] pipe_write_result guarded_write(int fd, const char* data, std::size_t size, bool skip_guard,
                                             bool fd_nonblocking, int& err) noexcept {
    if (skip_guard) return classify(write_once(fd, data, size, fd_nonblocking, err), size, err);

    sigset_t pipe_set;
    ::sigemptyset(&pipe_set);
    ::sigaddset(&pipe_set, SIGPIPE);
    sigset_t old_mask;
    ::pthread_sigmask(SIG_BLOCK, &pipe_set, &old_mask);
    const bool was_blocked = ::sigismember(&old_mask, SIGPIPE) == 1;
    // While the thread did not block SIGPIPE, no SIGPIPE can be pending for it alone (it would have
    // been delivered), and one pending for the process stays queued behind ours: only a thread that
    // already blocked it needs to look.
    bool was_pending = false;
    if (was_blocked) {
        sigset_t pending;
        ::sigemptyset(&pending);
        ::sigpending(&pending);
        was_pending = ::sigismember(&pending, SIGPIPE) == 1;
    }
    const ssize_t n = write_once(fd, data, size, fd_nonblocking, err);
    if (n < 0 && err == EPIPE && !was_pending) {
        // The write's SIGPIPE is thread-directed, so it is dequeued before a process-wide one.
        const timespec zero{};
        while (::sigtimedwait(&pipe_set, nullptr, &zero) < 0 && errno == EINTR) {
        }
    }
    if (!was_blocked) ::pthread_sigmask(SIG_SETMASK, &old_mask, nullptr);
    return classify(n, size, err);
}

}  // namespace

[[gnu::hot]] pipe_write_result pipe_write_nowait(int fd, const char* data, std::size_t size, bool skip_guard,
                                                 int& err) noexcept {
    return guarded_write(fd, data, size, skip_guard, false, err);
}

[[gnu::hot]] pipe_write_result pipe_write_nonblocking(int fd, const char* data, std::size_t size,
                                                      bool skip_guard, int& err) noexcept {
    return guarded_write(fd, data, size, skip_guard, true, err);
}

bool sigpipe_ignored() noexcept {
    struct sigaction current {};
    return ::sigaction(SIGPIPE, nullptr, &current) == 0 && current.sa_handler == SIG_IGN;
}

}  // namespace steward::detail::tracking
