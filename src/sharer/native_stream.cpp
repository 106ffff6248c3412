#include "sharer/native_stream.hpp"

#include <steward/error.hpp>

#include "sharer/framing.hpp"

#include <algorithm>
#include <cstring>

namespace steward::detail::native {

// ---- stream_decoder --------------------------------------------------------------------------
// The FIFO rule of docs/protocol.md section 5.2, evaluated in stream order: each batch keeps the
// stream offsets of the read that brought it, so the result does not depend on how many reads
// were committed before next() is called.

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
    prepared_ = n;
    return std::span(buffer_).subspan(end_, n);
}

void stream_decoder::commit(std::size_t bytes, std::vector<unique_fd> fds, bool truncated) {
    commit(bytes, std::move(fds), truncated, bytes < prepared_);
}

void stream_decoder::commit(std::size_t bytes, std::vector<unique_fd> fds, bool truncated, bool short_read) {
    bytes = std::min(bytes, buffer_.size() - end_);
    const bool read_full = !short_read;
    prepared_ = 0;
    const std::uint64_t first = offset_ + (end_ - begin_);
    end_ += bytes;
    if (fds.empty() && !truncated) return;
    if (failed_) return;  // fds go out of scope: closed
    // A stream socket never returns descriptors without data; refuse rather than guess.
    if (bytes == 0) {
        orphan_batch_ = true;
        return;
    }
    batches_.push_back({first, first + bytes, std::move(fds), 0, 0, truncated, read_full});
}

std::size_t stream_decoder::held_descriptors() const noexcept {
    std::size_t n = 0;
    for (const batch& b : batches_) n += b.left();
    return n;
}

bool stream_decoder::fail(std::error_code& ec, std::error_code why) {
    failed_ = true;
    batches_.clear();  // closes every descriptor nobody claimed
    ec = why;
    return false;
}

std::optional<stream_decoder::event> stream_decoder::next(std::error_code& ec) {
    event ev;
    if (!next(ev.msg, ev.fds, ev.truncated, ec)) return std::nullopt;
    return ev;
}

bool stream_decoder::next(message& msg, std::vector<unique_fd>& fds, bool& truncated, std::error_code& ec) {
    ec.clear();
    fds.clear();
    truncated = false;
    if (failed_) {
        ec = errc::malformed_message;
        return false;
    }
    if (orphan_batch_) return fail(ec, errc::malformed_message);

    const auto pending = std::span<const std::byte>(buffer_).subspan(begin_, end_ - begin_);
    const framing::frame_probe probe = framing::probe_frame(pending, max_payload_);
    switch (probe.status) {
        case framing::frame_status::need_more:
            return false;
        case framing::frame_status::too_large:
            return fail(ec, errc::limit_exceeded);
        case framing::frame_status::malformed:
            return fail(ec, errc::malformed_message);
        case framing::frame_status::frame:
            break;
    }
    const std::uint64_t frame_start = offset_;
    const std::uint64_t frame_end = offset_ + probe.total_size();
    std::error_code decode_ec;
    msg = decode(pending.subspan(probe.header_size, static_cast<std::size_t>(probe.payload_size)), decode_ec);
    if (decode_ec) return fail(ec, decode_ec);
    begin_ += static_cast<std::size_t>(probe.total_size());
    offset_ = frame_end;

    // Batch boundaries, in stream order. The sendmsg that carried batch B began inside B's read,
    // so a frame starting after that read belongs to B's sendmsg or a later one: every earlier
    // batch must have been used up by then.
    while (batches_.size() >= 2 && batches_[1].last <= frame_start) {
        if (batches_.front().left() > 0) return fail(ec, errc::malformed_message);  // left at a boundary
        batches_.pop_front();
    }

    const auto* part = std::get_if<reply>(&msg);
    if (!part || part->part_fds == 0) return true;
    return attribute(fds, truncated, part->part_fds, frame_start, frame_end, ec);
}

bool stream_decoder::attribute(std::vector<unique_fd>& fds, bool& truncated, std::size_t k,
                               std::uint64_t frame_start, std::uint64_t frame_end, std::error_code& ec) {
    // A loop, not recursion: each pass drops one batch that cannot serve this part.
    for (;;) {
        // Batches "arrived" for this frame are those of reads that began before its last byte.
        if (batches_.empty() || batches_.front().first >= frame_end)
            return fail(ec, errc::malformed_message);  // declared descriptors never came
        batch& front = batches_.front();
        if (front.left() >= k) {
            fds.reserve(k);
            for (std::size_t i = 0; i < k; ++i) fds.push_back(std::move(front.fds[front.taken++]));
            ++front.parts;
            if (front.left() == 0 && !front.truncated) batches_.pop_front();
            return true;
        }
        if (!front.truncated) return fail(ec, errc::malformed_message);  // fewer than declared
        if (version_ < quick_version && front.parts > 0) {
            // Version 1: a batch belongs to one part, which it served already.
            batches_.pop_front();
            continue;
        }
        // MSG_CTRUNC: the batch's prefix served the parts before this one in order; this part comes
        // out short, its partial descriptors closed now.
        if (front.left() > 0 || version_ < quick_version) {
            front.fds.clear();
            front.taken = 0;
            ++front.parts;
            truncated = true;
            return true;
        }
        // The truncated batch is used up. Does this part still belong to its sendmsg? Yes if it
        // starts inside the truncated batch's read; no if that read ended short (the kernel stops a
        // read at the end of the data a batch came with, and a sendmsg's data is one socket buffer)
        // and this part starts after it; unknown if it starts in the read of the next batch after a
        // full read.
        const bool inside = frame_start < front.last;
        const bool next_arrived = batches_.size() >= 2 && batches_[1].first < frame_end;
        if (!inside && !front.read_full) {
            batches_.pop_front();
            continue;
        }
        if (!inside && next_arrived && batches_[1].first <= frame_start)
            return fail(ec, errc::control_truncated);  // never hand out descriptors of another reply
        ++front.parts;
        truncated = true;
        return true;
    }
}

// ---- reply_assembler -------------------------------------------------------------------------

std::optional<reply_assembler::completed> reply_assembler::add(const reply& part, std::vector<unique_fd> fds,
                                                               bool truncated, std::error_code& ec) {
    return add_from(part, fds, truncated, ec);
}

std::optional<reply_assembler::completed> reply_assembler::add_from(const reply& part,
                                                                    std::span<unique_fd> fds, bool truncated,
                                                                    std::error_code& ec) {
    ec.clear();
    // Whatever is not kept is closed now, as the by-value overload's vector would be.
    auto close_given = [&] {
        for (auto& fd : fds) fd.reset();
    };
    auto protocol_error = [&]() -> std::optional<completed> {
        active_ = false;
        fds_.clear();
        close_given();
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
        close_given();
    }
    if (part.status != reply_status::ok) {
        active_ = false;
        return completed{part.request_id, part.status, {}, {}};
    }
    if (!broken_) {
        for (auto& fd : fds) fds_.push_back(std::move(fd));
    } else {
        close_given();
    }
    if (++next_index_ < part.part_count) return std::nullopt;
    active_ = false;
    if (broken_)
        return completed{request_id_, reply_status::ok, {}, make_error_code(errc::control_truncated)};
    if (fds_.size() != total_fds_) return protocol_error();
    return completed{request_id_, reply_status::ok, std::move(fds_), {}};
}

}  // namespace steward::detail::native
