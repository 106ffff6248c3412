#include <steward/unique_fd.hpp>

#include <steward/error.hpp>

#include <cerrno>
#include <fcntl.h>
#include <unistd.h>

namespace steward {

void unique_fd::reset(int fd) noexcept {
    if (fd_ >= 0) ::close(fd_);  // Linux releases the descriptor even on EINTR: never retry.
    fd_ = fd;
}

unique_fd dup_cloexec(int fd) {
    unique_fd copy{::fcntl(fd, F_DUPFD_CLOEXEC, 0)};
    if (!copy) throw_if(errno_code(errno), "fcntl(F_DUPFD_CLOEXEC)");
    return copy;
}

}  // namespace steward
