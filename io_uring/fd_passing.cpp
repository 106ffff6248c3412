#include <steward/io/detail/scm_rights.hpp>

#include <steward/error.hpp>

#include <asio/error.hpp>

#include <sys/socket.h>
#include <sys/uio.h>

#include <array>
#include <cerrno>
#include <cstring>
#include <new>

#ifndef SCM_PIDFD
#define SCM_PIDFD 0x04  // Linux 6.5; absent from older headers, still possible on newer kernels
#endif

namespace steward::io::detail {
namespace {

bool would_block(int err) noexcept {
    return err == EAGAIN || err == EWOULDBLOCK;
}

}  // namespace

scm_rights_control::scm_rights_control(std::size_t bytes) : size_(bytes) {
    if (bytes > sizeof inline_) storage_.reset(new word[(bytes + sizeof(word) - 1) / sizeof(word)]());
}

scm_rights_control::scm_rights_control(std::span<const int> fds) {
    if (fds.empty()) return;
    const std::size_t payload = fds.size() * sizeof(int);
    *this = scm_rights_control(static_cast<std::size_t>(CMSG_SPACE(payload)));
    auto* header = ::new (data()) cmsghdr{};
    header->cmsg_level = SOL_SOCKET;
    header->cmsg_type = SCM_RIGHTS;
    header->cmsg_len = CMSG_LEN(payload);
    std::memcpy(CMSG_DATA(header), fds.data(), payload);
}

scm_rights_control scm_rights_control::for_receive() {
    return scm_rights_control(static_cast<std::size_t>(CMSG_SPACE(max_fds_per_message * sizeof(int))));
}

attempt_result send_attempt(int fd, const scm_rights_control* control, asio::const_buffer data) noexcept {
    ::iovec iov{const_cast<void*>(data.data()), data.size()};
    ::msghdr msg{};
    msg.msg_iov = &iov;
    msg.msg_iovlen = 1;
    if (control && control->size() != 0) {
        msg.msg_control = control->data();
        msg.msg_controllen = control->size();
    }
    ssize_t n = 0;
    do {
        // MSG_DONTWAIT instead of O_NONBLOCK: the socket stays blocking for io_uring's sake.
        n = ::sendmsg(fd, &msg, MSG_NOSIGNAL | MSG_DONTWAIT);
    } while (n < 0 && errno == EINTR);
    if (n < 0) {
        const int err = errno;
        if (would_block(err)) return {{}, 0, true};
        return {errno_code(err), 0, false};
    }
    return {{}, static_cast<std::size_t>(n), false};
}

attempt_result recv_attempt(int fd, asio::mutable_buffer data, const scm_rights_control& control,
                            socket_kind kind, std::vector<unique_fd>& fds) {
    ::iovec iov{data.data(), data.size()};
    ::msghdr msg{};
    msg.msg_iov = &iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.data();
    msg.msg_controllen = control.size();
    ssize_t n = 0;
    do {
        n = ::recvmsg(fd, &msg, MSG_CMSG_CLOEXEC | MSG_DONTWAIT);
    } while (n < 0 && errno == EINTR);
    if (n < 0) {
        const int err = errno;
        if (would_block(err)) return {{}, 0, true};
        return {errno_code(err), 0, false};
    }

    // The kernel has installed descriptors in our table: own every one of them before anything
    // that can fail (the vector's allocation below) runs. The control buffer has room for at most
    // max_fds_per_message descriptors in total, so the fixed array always suffices.
    std::array<unique_fd, max_fds_per_message> arrived;
    std::size_t count = 0;
    bool unexpected = false;
    if (msg.msg_controllen != 0) {
        for (cmsghdr* c = CMSG_FIRSTHDR(&msg); c != nullptr; c = CMSG_NXTHDR(&msg, c)) {
            const bool rights = c->cmsg_level == SOL_SOCKET && c->cmsg_type == SCM_RIGHTS;
            const bool carries_fds = c->cmsg_level == SOL_SOCKET && (rights || c->cmsg_type == SCM_PIDFD);
            if (!rights) unexpected = true;
            if (!carries_fds || c->cmsg_len < CMSG_LEN(0)) continue;
            const std::size_t n_fds = (c->cmsg_len - CMSG_LEN(0)) / sizeof(int);
            const unsigned char* payload = CMSG_DATA(c);
            for (std::size_t i = 0; i < n_fds; ++i) {
                int raw = -1;
                std::memcpy(&raw, payload + i * sizeof(int), sizeof raw);
                unique_fd owned{raw};
                // A descriptor from a foreign control message (SCM_PIDFD) is closed right here.
                if (rights && count < arrived.size()) arrived[count++] = std::move(owned);
            }
        }
    }
    fds.reserve(fds.size() + count);  // may throw; `arrived` then closes everything
    for (std::size_t i = 0; i < count; ++i) fds.push_back(std::move(arrived[i]));

    const auto bytes = static_cast<std::size_t>(n);
    std::error_code ec;
    if (msg.msg_flags & MSG_CTRUNC)
        ec = errc::control_truncated;
    else if (unexpected)
        ec = errc::unexpected_control;
    else if (kind != socket_kind::stream && (msg.msg_flags & MSG_TRUNC))
        ec = asio::error::message_size;
    else if (bytes == 0 && data.size() != 0 && kind != socket_kind::datagram)
        ec = asio::error::eof;
    return {ec, bytes, false};
}

}  // namespace steward::io::detail
