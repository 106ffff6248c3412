#include <steward/io/async_write_message.hpp>

#include <asio/error.hpp>

#include <fcntl.h>
#include <pthread.h>
#include <sys/stat.h>
#include <sys/uio.h>
#include <unistd.h>
#include <atomic>
#include <cerrno>
#include <csignal>
#include <ctime>
#include <string>

namespace steward::io::detail {
namespace {

// Set once the kernel has refused RWF_NOWAIT on a pipe (EOPNOTSUPP): from then on every write goes
// through a private O_NONBLOCK description. Relaxed is enough: both paths are correct, this only
// saves a failing syscall.
std::atomic<bool> nowait_unsupported{false};

// Suppresses the SIGPIPE a write to a reader-less pipe raises, for the calling thread only, without
// touching the process disposition (see the header comment). Costs two rt_sigprocmask calls when
// the caller does not block SIGPIPE (the usual case) and two other calls when it does.
class sigpipe_guard {
public:
    sigpipe_guard() noexcept {
        ::sigemptyset(&pipe_set_);
        ::sigaddset(&pipe_set_, SIGPIPE);
        ::pthread_sigmask(SIG_BLOCK, &pipe_set_, &old_mask_);
        already_blocked_ = ::sigismember(&old_mask_, SIGPIPE) == 1;
        // The write's own SIGPIPE must be consumed unless a SIGPIPE sent by somebody else would be
        // consumed with it. Standard signals do not queue: a second one raised while one is pending
        // in the thread's set merges with it. sigtimedwait takes the thread-directed set first, so
        // only a SIGPIPE already pending for this thread is at risk, and that needs SIGPIPE to have
        // been blocked before this call: an unblocked pending signal is delivered on the way back
        // to user mode and is gone by now. So sigpending() is only asked when the caller blocked it
        // (a process-directed SIGPIPE pending then also keeps ours pending, as before).
        if (already_blocked_) {
            sigset_t pending;
            ::sigemptyset(&pending);
            ::sigpending(&pending);
            was_pending_ = ::sigismember(&pending, SIGPIPE) == 1;
        }
    }
    sigpipe_guard(const sigpipe_guard&) = delete;
    sigpipe_guard& operator=(const sigpipe_guard&) = delete;

    void consume_raised() noexcept {
        if (was_pending_) return;
        const timespec zero{};
        // The write's SIGPIPE is thread-directed and so dequeued before any process-wide one.
        while (::sigtimedwait(&pipe_set_, nullptr, &zero) < 0 && errno == EINTR) {
        }
    }

    ~sigpipe_guard() {
        // Already blocked: the mask did not change, nothing to restore.
        if (!already_blocked_) ::pthread_sigmask(SIG_SETMASK, &old_mask_, nullptr);
    }

private:
    sigset_t pipe_set_{};
    sigset_t old_mask_{};
    bool already_blocked_ = false;
    bool was_pending_ = false;
};

std::string proc_path(int fd) {
    return "/proc/self/fd/" + std::to_string(fd);
}

}  // namespace

std::error_code check_pipe(int fd) noexcept {
    struct stat st {};
    if (::fstat(fd, &st) != 0) return errno_code(errno);
    if (!S_ISFIFO(st.st_mode)) return errc::not_a_pipe;
    return {};
}

unique_fd open_private_write_end(int fd, std::error_code& ec) noexcept {
    ec.clear();
    try {
        // O_NONBLOCK on open of a FIFO with no reader fails with ENXIO instead of waiting for one.
        unique_fd private_fd{::open(proc_path(fd).c_str(), O_WRONLY | O_NONBLOCK | O_CLOEXEC)};
        if (!private_fd)
            ec = errno == ENXIO ? std::make_error_code(std::errc::broken_pipe) : errno_code(errno);
        return private_fd;
    } catch (const std::bad_alloc&) {
        ec = std::make_error_code(std::errc::not_enough_memory);
        return {};
    }
}

std::size_t write_whole(int fd, const void* data, std::size_t size, std::error_code& ec) noexcept {
    ec.clear();
    if (size > max_atomic_write) {  // callers check; the atomicity argument depends on it
        ec = errc::batch_too_large;
        return 0;
    }
    sigpipe_guard guard;
    ssize_t written = -1;
    int err = 0;
    if (!nowait_unsupported.load(std::memory_order_relaxed)) {
        iovec iov{const_cast<void*>(data), size};
        do {
            written = ::pwritev2(fd, &iov, 1, -1, RWF_NOWAIT);
            err = written < 0 ? errno : 0;
        } while (written < 0 && err == EINTR);
        if (written < 0 && err == EOPNOTSUPP) nowait_unsupported.store(true, std::memory_order_relaxed);
    }
    if (nowait_unsupported.load(std::memory_order_relaxed)) {
        unique_fd private_fd = open_private_write_end(fd, ec);
        if (ec) return 0;  // ENXIO (no reader) already mapped to broken_pipe
        do {
            written = ::write(private_fd.get(), data, size);
            err = written < 0 ? errno : 0;
        } while (written < 0 && err == EINTR);
    }
    if (written < 0) {
        if (err == EPIPE) {
            guard.consume_raised();
            ec = std::make_error_code(std::errc::broken_pipe);
        } else if (err == EAGAIN) {
            ec = asio::error::would_block;
        } else {
            ec = errno_code(err);
        }
        return 0;
    }
    // A pipe write <= PIPE_BUF is all or nothing; anything else means the descriptor is not what
    // check_pipe() saw (replaced under us). Report it rather than pretend.
    if (static_cast<std::size_t>(written) != size) {
        ec = std::make_error_code(std::errc::io_error);
        return static_cast<std::size_t>(written);
    }
    return size;
}

void force_nowait_fallback_for_tests(bool on) noexcept {
    nowait_unsupported.store(on, std::memory_order_relaxed);
}

}  // namespace steward::io::detail
