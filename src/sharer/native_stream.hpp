#pragma once
// Receiving side of the native protocol, still without sockets: stream_decoder cuts the byte
// stream into messages and hands every REPLY part the descriptors it declares; reply_assembler
// collects the parts of one reply all-or-nothing. The rule is in docs/protocol.md section 5.2.
//
// New for version 2 (coalesced replies; the interface is unchanged): descriptors are attributed
// by a FIFO instead of "the one frame beginning in the read". A batch joins the FIFO when its
// read arrives; each REPLY part with part_fds = k takes the next k, all from one batch.
// Protocol errors (errc::malformed_message): a part that finds fewer than k in a batch that was
// not truncated; a batch arriving while the FIFO still holds descriptors of an earlier batch
// (detected, in stream order, once a frame starts past the read that brought the new batch, or
// a part would take from both); descriptors without data. MSG_CTRUNC: the batch's prefix serves
// the parts in order; a part that gets fewer than it declares comes out with event::truncated
// set and no descriptors (the partial ones are closed here). Version 1 is the special case of one
// part per batch. New: next(msg, fds, truncated, ec) and reply_assembler::add_from() (no
// allocation per message), commit(..., short_read), set_version(), held_descriptors(),
// errc::control_truncated from next()
// when a truncation leaves it unknowable which batch a part's descriptors are in (see
// set_version; the stream is then closed like a protocol error).

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
        std::vector<unique_fd> fds;  ///< a REPLY part's part_fds descriptors (empty for other messages)
        bool truncated = false;      ///< MSG_CTRUNC left this part short: fds is empty, give it back
    };

    explicit stream_decoder(std::uint64_t max_frame_payload = max_payload)
        : max_payload_(max_frame_payload) {}

    /// Room for the next read of up to @p n bytes.
    [[nodiscard]] std::span<std::byte> prepare(std::size_t n);
    /// Records that a read put @p bytes into the space prepare() gave, together with the
    /// descriptors that came with it; @p truncated if the receive reported MSG_CTRUNC.
    void commit(std::size_t bytes, std::vector<unique_fd> fds = {}, bool truncated = false);
    /// As above, saying explicitly whether the read that brought these bytes returned less than
    /// it asked for (the three-argument form takes "less than the last prepare()"). Use it when
    /// the bytes were copied in from elsewhere (e.g. what followed QUICK_ACK in its read).
    void commit(std::size_t bytes, std::vector<unique_fd> fds, bool truncated, bool short_read);

    /// The next whole message, or nullopt when more bytes are needed. A protocol error sets
    /// @p ec (errc::malformed_message, or errc::limit_exceeded for a frame above the limit); the
    /// stream is unusable afterwards and every descriptor still held is closed.
    [[nodiscard]] std::optional<event> next(std::error_code& ec);
    /// The same without an allocation per message: true and @p msg set when a whole message was
    /// there; @p fds is cleared and receives a REPLY part's descriptors (its capacity is reused),
    /// @p truncated as event::truncated. False with @p ec clear: more bytes needed.
    [[nodiscard]] bool next(message& msg, std::vector<unique_fd>& fds, bool& truncated, std::error_code& ec);

    /// The session's version once known (HELLO_ACK / QUICK_ACK). Only matters after MSG_CTRUNC:
    /// in version 1 a truncated batch belongs to exactly one part; in version 2 (the default,
    /// the cautious reading) the parts of the truncated sendmsg may run on past its read, and a
    /// part that starts in the read of the next batch is then attributable only if the
    /// truncated read ended short of the space prepare() offered (the kernel stopped at the end
    /// of that sendmsg's data), else next() fails with errc::control_truncated.
    void set_version(std::uint16_t version) noexcept { version_ = version; }

    /// Bytes received but not yet returned as messages.
    [[nodiscard]] std::size_t buffered() const noexcept { return end_ - begin_; }
    /// Descriptors received but not yet handed to a REPLY part (the FIFO).
    [[nodiscard]] std::size_t held_descriptors() const noexcept;

private:
    struct batch {
        std::uint64_t first = 0;  // stream offsets of the read that carried it: [first, last)
        std::uint64_t last = 0;
        std::vector<unique_fd> fds;
        std::size_t taken = 0;  // fds[0, taken) were handed out already
        std::size_t parts = 0;  // REPLY parts it served (short ones included)
        bool truncated = false;
        bool read_full = true;  // the read filled the space prepare() offered (may have been cut)
        [[nodiscard]] std::size_t left() const noexcept { return fds.size() - taken; }
    };

    bool fail(std::error_code& ec, std::error_code why);
    bool attribute(std::vector<unique_fd>& fds, bool& truncated, std::size_t k, std::uint64_t frame_start,
                   std::uint64_t frame_end, std::error_code& ec);

    std::uint64_t max_payload_;
    std::uint16_t version_ = max_protocol_version;
    std::size_t prepared_ = 0;  // size of the last prepare()
    std::vector<std::byte> buffer_;
    std::size_t begin_ = 0;      // first unconsumed byte in buffer_
    std::size_t end_ = 0;        // one past the last received byte in buffer_
    std::uint64_t offset_ = 0;   // stream offset of buffer_[begin_]
    std::deque<batch> batches_;  // the FIFO: batches not yet used up, in stream order
    bool failed_ = false;
    bool orphan_batch_ = false;  // descriptors came with a read of no bytes
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
    /// reply whose descriptors do not add up to the announced total) sets @p ec to errc::malformed_message: a
    /// protocol error that ends the connection.
    [[nodiscard]] std::optional<completed> add(const reply& part, std::vector<unique_fd> fds, bool truncated,
                                               std::error_code& ec);
    /// As add(), taking the descriptors out of @p fds (moved from, or closed when not kept), so
    /// the caller's vector keeps its capacity (pairs with stream_decoder's allocation-free next()).
    [[nodiscard]] std::optional<completed> add_from(const reply& part, std::span<unique_fd> fds,
                                                    bool truncated, std::error_code& ec);

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
