#pragma once
// Receiving side of the native protocol, still without sockets: stream_decoder cuts the byte
// stream into messages and pairs every descriptor batch with the REPLY part it rode on;
// reply_assembler collects the parts of one reply all-or-nothing. The rules are in
// docs/protocol.md section 5.2: a batch arrives with the recvmsg that returns the first byte of
// the sendmsg it was attached to, that sendmsg is exactly one REPLY frame, and the kernel never
// returns two batches from one recvmsg, so the batch belongs to the one frame beginning in that
// read that declares part_fds > 0.

#include <steward/unique_fd.hpp>

#include "sharer/native_protocol.hpp"

#include <cstddef>
#include <cstdint>
#include <deque>
#include <optional>
#include <span>
#include <system_error>
#include <vector>

namespace steward::detail::native {

class stream_decoder {
public:
    struct event {
        message msg;
        std::vector<unique_fd> fds;  ///< the batch of a REPLY part (empty for other messages)
        bool truncated = false;      ///< the batch was cut short by MSG_CTRUNC
    };

    explicit stream_decoder(std::uint64_t max_frame_payload = max_payload)
        : max_payload_(max_frame_payload) {}

    /// Room for the next read of up to @p n bytes.
    [[nodiscard]] std::span<std::byte> prepare(std::size_t n);
    /// Records that a read put @p bytes into the space prepare() gave, together with the
    /// descriptors that came with it; @p truncated if the receive reported MSG_CTRUNC.
    void commit(std::size_t bytes, std::vector<unique_fd> fds = {}, bool truncated = false);

    /// The next whole message, or nullopt when more bytes are needed. A protocol error sets
    /// @p ec (errc::malformed_message, or errc::limit_exceeded for a frame above the limit); the
    /// stream is unusable afterwards and every descriptor still held is closed.
    [[nodiscard]] std::optional<event> next(std::error_code& ec);

    /// Bytes received but not yet returned as messages.
    [[nodiscard]] std::size_t buffered() const noexcept { return end_ - begin_; }

private:
    struct batch {
        std::uint64_t first = 0;  // stream offsets of the read that carried it: [first, last)
        std::uint64_t last = 0;
        std::vector<unique_fd> fds;
        bool truncated = false;
    };

    std::optional<event> fail(std::error_code& ec, std::error_code why);

    std::uint64_t max_payload_;
    std::vector<std::byte> buffer_;
    std::size_t begin_ = 0;      // first unconsumed byte in buffer_
    std::size_t end_ = 0;        // one past the last received byte in buffer_
    std::uint64_t offset_ = 0;   // stream offset of buffer_[begin_]
    std::deque<batch> batches_;  // descriptor batches not yet claimed, in stream order
    bool failed_ = false;
};

/// Collects the parts of one REPLY (they arrive consecutively, part 0 first) and hands the
/// descriptors over only when every part arrived whole.
class reply_assembler {
public:
    struct completed {
        std::uint64_t request_id = 0;
        reply_status status = reply_status::ok;
        /// ok and whole: every descriptor, in order. Otherwise empty (already closed).
        std::vector<unique_fd> fds;
        /// Set when status is ok but the reply did not arrive whole (errc::control_truncated:
        /// MSG_CTRUNC dropped some); the client must GIVE_BACK the request.
        std::error_code error;
    };

    /// Feeds one part and its batch. Returns the reply once its last part arrived. A part that
    /// does not continue the reply in progress (another request id, wrong index, a total, part
    /// count or status other than part 0's, a batch with more descriptors than declared, a whole
    /// reply whose descriptors do not add up to the announced total) sets @p ec to errc::malformed_message: a protocol error
    /// that ends the connection.
    [[nodiscard]] std::optional<completed> add(const reply& part, std::vector<unique_fd> fds, bool truncated,
                                               std::error_code& ec);

    /// True while a multi-part reply is incomplete (no other message may arrive meanwhile).
    [[nodiscard]] bool in_progress() const noexcept { return active_; }

private:
    bool active_ = false;
    bool broken_ = false;
    std::uint64_t request_id_ = 0;
    std::uint32_t next_index_ = 0;
    std::uint32_t total_fds_ = 0;   // as announced by part 0
    std::uint32_t part_count_ = 0;  // as announced by part 0
    reply_status status_ = reply_status::ok;
    std::vector<unique_fd> fds_;
};

}  // namespace steward::detail::native
