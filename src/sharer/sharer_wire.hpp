#pragma once
// Hot-path helpers shared by the sharer server and the native client: fixed-size native frames
// written straight into caller-provided storage (no vector per message; native_protocol's
// encode() stays the reference codec and the tests compare against it), and sendmsg/recv
// attempts with MSG_NOSIGNAL | MSG_DONTWAIT on sockets that io_uring serves (no O_NONBLOCK).

#include <steward/error.hpp>
#include <steward/share_id.hpp>

#include "sharer/native_protocol.hpp"

#include <sys/socket.h>

#include <array>
#include <cerrno>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <span>
#include <system_error>

namespace steward::detail::wire {

inline constexpr std::size_t reply_frame_size = 4 + 24;
inline constexpr std::size_t fetch_frame_size = 4 + 25;

inline std::byte* put_u8(std::byte* p, std::uint8_t v) noexcept {
    *p = std::byte{v};
    return p + 1;
}
template <typename T>
inline std::byte* put_be(std::byte* p, T v) noexcept {
    for (std::size_t i = 0; i < sizeof(T); ++i)
        p[i] = std::byte(static_cast<unsigned char>(v >> (8 * (sizeof(T) - 1 - i))));
    return p + sizeof(T);
}
template <typename T>
inline T get_be(const std::byte* p) noexcept {
    T v = 0;
    for (std::size_t i = 0; i < sizeof(T); ++i) v = static_cast<T>((v << 8) | std::to_integer<T>(p[i]));
    return v;
}

/// One REPLY part, framed.
inline void put_reply(std::byte* out, const native::reply& r) noexcept {
    std::byte* p = put_be<std::uint32_t>(out, 24);
    p = put_u8(p, static_cast<std::uint8_t>(native::msg_type::reply));
    p = put_be(p, r.request_id);
    p = put_u8(p, static_cast<std::uint8_t>(r.status));
    p = put_be(p, r.part_fds);
    p = put_be(p, r.total_fds);
    p = put_be(p, r.part_index);
    put_be(p, r.part_count);
}

/// One FETCH, framed.
inline void put_fetch(std::byte* out, std::uint64_t request_id, share_key key) noexcept {
    std::byte* p = put_be<std::uint32_t>(out, 25);
    p = put_u8(p, static_cast<std::uint8_t>(native::msg_type::fetch));
    p = put_be(p, request_id);
    p = put_be(p, key.high);
    put_be(p, key.low);
}

struct attempt {
    std::size_t bytes = 0;
    int err = 0;  // 0, EAGAIN, or the errno of a failure
};

/// One sendmsg(MSG_NOSIGNAL | MSG_DONTWAIT) of @p data with @p fds attached (if any).
inline attempt send_with_fds(int fd, std::span<const std::byte> data, std::span<const int> fds) noexcept {
    union {
        cmsghdr align;
        char buf[CMSG_SPACE(sizeof(int) * native::max_fds_per_part)];
    } control{};
    iovec iov{const_cast<std::byte*>(data.data()), data.size()};
    msghdr msg{};
    msg.msg_iov = &iov;
    msg.msg_iovlen = 1;
    if (!fds.empty()) {
        msg.msg_control = control.buf;
        msg.msg_controllen = CMSG_SPACE(sizeof(int) * fds.size());
        cmsghdr* c = CMSG_FIRSTHDR(&msg);
        c->cmsg_level = SOL_SOCKET;
        c->cmsg_type = SCM_RIGHTS;
        c->cmsg_len = CMSG_LEN(sizeof(int) * fds.size());
        std::memcpy(CMSG_DATA(c), fds.data(), sizeof(int) * fds.size());
    }
    for (;;) {
        const ssize_t n = ::sendmsg(fd, &msg, MSG_NOSIGNAL | MSG_DONTWAIT);
        if (n >= 0) return {static_cast<std::size_t>(n), 0};
        if (errno == EINTR) continue;
        return {0, errno == EWOULDBLOCK ? EAGAIN : errno};
    }
}

/// Asio reports errno values in its own category; steward hands out std::system_category()
/// codes, except asio::error::operation_aborted and eof, which callers compare with Asio's.
std::error_code normalize(std::error_code ec) noexcept;

}  // namespace steward::detail::wire
