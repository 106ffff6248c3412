#include "sharer/native_stream.hpp"

#include <steward/error.hpp>

#include "sharer/framing.hpp"

#include <algorithm>
#include <cstring>

namespace steward::detail::native {

// ---- stream_decoder --------------------------------------------------------------------------

std::span<std::byte> stream_decoder::prepare(std::size_t n) {
    if (begin_ == end_) begin_ = end_ = 0;
    if (buffer_.size() - end_ < n) {
        // Move the unconsumed tail to the front before growing: the buffer stays about one
        // frame plus one read in size however long the connection lives.
        if (begin_ > 0) {
            std::memmove(buffer_.data(), buffer_.data() + begin_, end_ - begin_);
            end_ -= begin_;
            begin_ = 0;
        }
        if (buffer_.size() - end_ < n) buffer_.resize(end_ + n);
    }
    return std::span(buffer_).subspan(end_, n);
}

void stream_decoder::commit(std::size_t bytes, std::vector<unique_fd> fds, bool truncated) {
    bytes = std::min(bytes, buffer_.size() - end_);
    const std::uint64_t first = offset_ + (end_ - begin_);
    end_ += bytes;
    if (!fds.empty() || truncated) batches_.push_back({first, first + bytes, std::move(fds), truncated});
}

std::optional<stream_decoder::event> stream_decoder::fail(std::error_code& ec, std::error_code why) {
    failed_ = true;
    batches_.clear();  // closes every descriptor nobody claimed
    ec = why;
    return std::nullopt;
}

std::optional<stream_decoder::event> stream_decoder::next(std::error_code& ec) {
    ec.clear();
    if (failed_) {
        ec = errc::malformed_message;
        return std::nullopt;
    }
    // A batch whose read holds no further frame start can no longer be claimed.
    if (!batches_.empty() && batches_.front().last <= offset_) return fail(ec, errc::malformed_message);

    const auto pending = std::span<const std::byte>(buffer_).subspan(begin_, end_ - begin_);
    const framing::frame_probe probe = framing::probe_frame(pending, max_payload_);
    switch (probe.status) {
        case framing::frame_status::need_more:
            return std::nullopt;
        case framing::frame_status::too_large:
            return fail(ec, errc::limit_exceeded);
        case framing::frame_status::malformed:
            return fail(ec, errc::malformed_message);
        case framing::frame_status::frame:
            break;
    }
    const std::uint64_t frame_start = offset_;
    std::error_code decode_ec;
    event ev{
        decode(pending.subspan(probe.header_size, static_cast<std::size_t>(probe.payload_size)), decode_ec),
        {},
        false};
    if (decode_ec) return fail(ec, decode_ec);
    begin_ += static_cast<std::size_t>(probe.total_size());
    offset_ += probe.total_size();

    const auto* part = std::get_if<reply>(&ev.msg);
    const bool claims = part && part->part_fds > 0;
    const bool in_front_read =
        !batches_.empty() && batches_.front().first <= frame_start && frame_start < batches_.front().last;
    if (claims) {
        if (!in_front_read) return fail(ec, errc::malformed_message);  // declared descriptors never came
        batch b = std::move(batches_.front());
        batches_.pop_front();
        if (b.fds.size() > part->part_fds || (b.fds.size() < part->part_fds && !b.truncated))
            return fail(ec, errc::malformed_message);
        ev.fds = std::move(b.fds);
        ev.truncated = b.truncated;
    }
    return ev;
}

// ---- reply_assembler -------------------------------------------------------------------------

std::optional<reply_assembler::completed> reply_assembler::add(const reply& part, std::vector<unique_fd> fds,
                                                               bool truncated, std::error_code& ec) {
    ec.clear();
    auto protocol_error = [&]() -> std::optional<completed> {
        active_ = false;
        fds_.clear();
        ec = errc::malformed_message;
        return std::nullopt;
    };
    if (!active_) {
        if (part.part_index != 0) return protocol_error();
        active_ = true;
        broken_ = false;
        request_id_ = part.request_id;
        total_fds_ = part.total_fds;
        part_count_ = part.part_count;
        status_ = part.status;
        next_index_ = 0;
        fds_.clear();
    } else if (part.request_id != request_id_ || part.part_index != next_index_ ||
               part.total_fds != total_fds_ || part.part_count != part_count_ || part.status != status_) {
        // Every part repeats what part 0 announced; a part that changes it is a protocol error,
        // otherwise a peer could grow the reply past what the first part promised.
        return protocol_error();
    }
    if (fds.size() > part.part_fds) return protocol_error();
    if (fds.size() < part.part_fds) {
        if (!truncated) return protocol_error();
        broken_ = true;  // keep consuming the remaining parts, keep nothing
        fds_.clear();
        fds.clear();
    }
    if (part.status != reply_status::ok) {
        active_ = false;
        return completed{part.request_id, part.status, {}, {}};
    }
    if (!broken_) {
        for (auto& fd : fds) fds_.push_back(std::move(fd));
    }
    if (++next_index_ < part.part_count) return std::nullopt;
    active_ = false;
    if (broken_)
        return completed{request_id_, reply_status::ok, {}, make_error_code(errc::control_truncated)};
    if (fds_.size() != total_fds_) return protocol_error();
    return completed{request_id_, reply_status::ok, std::move(fds_), {}};
}

}  // namespace steward::detail::native
