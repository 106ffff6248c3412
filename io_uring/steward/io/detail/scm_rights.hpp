#pragma once
// The non-template halves of async_send_fds / async_recv_fds: one non-blocking sendmsg/recvmsg
// attempt each (compiled once, in io_uring/fd_passing.cpp), the control buffer they use and the
// socket-kind trait that tells which Asio socket types may carry descriptors.

#include <steward/unique_fd.hpp>

#include <asio/basic_datagram_socket.hpp>
#include <asio/basic_seq_packet_socket.hpp>
#include <asio/basic_stream_socket.hpp>
#include <asio/buffer.hpp>

#include <sys/socket.h>

#include <concepts>
#include <cstddef>
#include <memory>
#include <span>
#include <system_error>
#include <vector>

namespace steward::io {

/// The most descriptors one message can carry (the kernel's SCM_MAX_FD).
inline constexpr std::size_t max_fds_per_message = 253;

}  // namespace steward::io

namespace steward::io::detail {

enum class socket_kind { stream, seq_packet, datagram };

template <typename Socket>
struct socket_kind_of;

template <typename Protocol, typename Executor>
struct socket_kind_of<asio::basic_stream_socket<Protocol, Executor>> {
    static constexpr socket_kind value = socket_kind::stream;
};

template <typename Protocol, typename Executor>
struct socket_kind_of<asio::basic_seq_packet_socket<Protocol, Executor>> {
    static constexpr socket_kind value = socket_kind::seq_packet;
};

template <typename Protocol, typename Executor>
struct socket_kind_of<asio::basic_datagram_socket<Protocol, Executor>> {
    static constexpr socket_kind value = socket_kind::datagram;
};

/// A control buffer for SCM_RIGHTS, made of cmsghdr-aligned words (cmsghdr itself ends in a
/// flexible array member, so it cannot be an array element). Up to inline_fds descriptors live
/// inside the object (no allocation for the common one-descriptor send); larger buffers live on
/// the heap so that the operation holding them stays cheap to move each time it is handed to
/// async_wait. data() may change when the object moves: take it afresh for each call.
class scm_rights_control {
public:
    scm_rights_control() = default;

    /// A control message carrying @p fds (at most max_fds_per_message; an empty span gives an
    /// empty control buffer). Throws std::bad_alloc.
    explicit scm_rights_control(std::span<const int> fds);

    /// Room for max_fds_per_message descriptors, for recvmsg. Throws std::bad_alloc.
    [[nodiscard]] static scm_rights_control for_receive();

    [[nodiscard]] void* data() const noexcept {
        return storage_ ? static_cast<void*>(storage_.get()) : static_cast<void*>(inline_);
    }
    [[nodiscard]] std::size_t size() const noexcept { return size_; }

    /// Descriptors that fit without an allocation.
    static constexpr std::size_t inline_fds = 8;

private:
    explicit scm_rights_control(std::size_t bytes);

    struct alignas(cmsghdr) word {
        unsigned char bytes[sizeof(cmsghdr)];
    };
    static constexpr std::size_t inline_words =
        (CMSG_SPACE(inline_fds * sizeof(int)) + sizeof(word) - 1) / sizeof(word);

    std::unique_ptr<word[]> storage_;
    std::size_t size_ = 0;
    mutable word inline_[inline_words]{};  // mutable: recvmsg/sendmsg take the buffer through data()
};

/// The outcome of one non-blocking attempt: either would_block (nothing happened, wait and retry)
/// or a final ec/bytes pair.
struct attempt_result {
    std::error_code ec;
    std::size_t bytes = 0;
    bool would_block = false;
};

/// One sendmsg(MSG_NOSIGNAL | MSG_DONTWAIT) of @p data, with @p control attached when it is
/// non-null and non-empty. Retries EINTR.
[[nodiscard]] attempt_result send_attempt(int fd, const scm_rights_control* control,
                                          asio::const_buffer data) noexcept;

/// One recvmsg(MSG_CMSG_CLOEXEC | MSG_DONTWAIT) into @p data. Every descriptor the kernel
/// installed is owned by a unique_fd before anything else can fail; SCM_RIGHTS descriptors are
/// appended to @p fds (also on control_truncated / unexpected_control), descriptors carried by any
/// other control message are closed. Throws std::bad_alloc only, and then closes what arrived.
[[nodiscard]] attempt_result recv_attempt(int fd, asio::mutable_buffer data,
                                          const scm_rights_control& control, socket_kind kind,
                                          std::vector<unique_fd>& fds);

}  // namespace steward::io::detail

namespace steward::io {

/// An Asio socket that can carry descriptors: `asio::basic_stream_socket`,
/// `asio::basic_seq_packet_socket` or `asio::basic_datagram_socket` (of an AF_UNIX protocol such
/// as `asio::local::stream_protocol`, with any executor).
template <typename Socket>
concept fd_passing_socket = requires(Socket& socket) {
    detail::socket_kind_of<Socket>::value;
    requires std::convertible_to<decltype(socket.native_handle()), int>;
};

}  // namespace steward::io
