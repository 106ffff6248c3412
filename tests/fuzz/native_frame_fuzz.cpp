// libFuzzer target: steward's native sharer protocol, receiving side (src/sharer/native_protocol.hpp,
// src/sharer/native_stream.hpp).
//
// Input: byte 0 is a control byte, the rest is the byte stream a peer sends.
//   bits 0-1  how descriptor batches ride on the reads:
//             0 none; 1 honest (each REPLY part with part_fds > 0 gets its batch on the read that
//             holds its first byte, at most 4 real fds, the rest reported as MSG_CTRUNC);
//             2 hostile (batches on arbitrary reads); 3 honest reads but every batch dropped
//             (MSG_CTRUNC with no fds, as at RLIMIT_NOFILE)
//   bits 2-7  largest read size (1 + value * 8 bytes)
//
// Invariants, beyond "does not crash":
// - decode() of a payload either fails with malformed_message or yields a message whose encode()
//   is the payload byte for byte (the format has one spelling per message), and decode(encode(m))
//   == m;
// - stream_decoder, fed in arbitrary reads, returns exactly the messages of a reference walk over
//   the whole stream (probe_frame + decode), in order, and stops with the same error; it never
//   hands a message for bytes it was not given, and buffered() is exactly what is left;
// - descriptors: with honest batches every claiming REPLY part gets exactly the descriptors sent
//   with it; with hostile batches no part gets more than it declares and no descriptor goes to two
//   parts; in every mode every descriptor is closed once the decoder and the events are gone
//   (no leak);
// - reply_assembler hands out descriptors only for a whole, successful reply, all of them.

#include "fuzz_support.hpp"

#include "sharer/framing.hpp"
#include "sharer/native_protocol.hpp"
#include "sharer/native_stream.hpp"

#include <steward/error.hpp>

#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <set>
#include <vector>

namespace {

namespace native = steward::detail::native;
namespace framing = steward::detail::framing;
using steward::unique_fd;

constexpr std::size_t max_real_fds = 4;

int devnull() {
    static const int fd = ::open("/dev/null", O_RDONLY | O_CLOEXEC);
    FUZZ_CHECK(fd >= 0);
    return fd;
}

std::uint16_t claimed_fds(const native::message& m) {
    const auto* r = std::get_if<native::reply>(&m);
    return r ? r->part_fds : 0;
}

struct reference_frame {
    std::uint64_t offset;
    std::uint64_t size;
    native::message msg;
};

struct reference_walk {
    std::vector<reference_frame> frames;
    std::error_code end_error;  // what the stream ends with, if not just "need more"
    std::uint64_t consumed = 0;
};

void check_payload(std::span<const std::byte> payload, const native::message& m) {
    const std::vector<std::byte> encoded = native::encode(m);
    FUZZ_CHECK(encoded.size() == payload.size() &&
               std::equal(encoded.begin(), encoded.end(), payload.begin()));
    std::error_code ec;
    FUZZ_CHECK(native::decode(encoded, ec) == m && !ec);
    std::vector<std::byte> frame;
    native::append_frame(frame, m);
    const auto p = framing::probe_frame(frame, native::max_payload);
    FUZZ_CHECK(p.status == framing::frame_status::frame && p.total_size() == frame.size());
    // The first frame of a session is classified by its first bytes alone.
    const auto kind = native::classify_first_frame(payload);
    FUZZ_CHECK((kind == native::first_frame_kind::native_hello) == std::holds_alternative<native::hello>(m));
}

native::message decode_checked(std::span<const std::byte> payload, std::error_code& ec) {
    const char* why = nullptr;
    native::message m = native::decode(payload, ec, &why);
    if (ec) {
        FUZZ_CHECK(ec == steward::errc::malformed_message && why);
        return m;
    }
    check_payload(payload, m);
    if (const auto* r = std::get_if<native::reply>(&m)) {
        FUZZ_CHECK(r->part_fds <= native::max_fds_per_part && r->part_index < r->part_count);
        FUZZ_CHECK(r->request_id != 0);
    }
    return m;
}

// @p fds_expected: false when no read carries descriptors, so a REPLY part that declares some
// is a protocol error of the stream ("declared descriptors never came").
reference_walk walk(std::span<const std::byte> stream, bool fds_expected) {
    reference_walk w;
    while (true) {
        const auto rest = stream.subspan(static_cast<std::size_t>(w.consumed));
        const auto p = framing::probe_frame(rest, native::max_payload);
        if (p.status == framing::frame_status::need_more) break;
        if (p.status == framing::frame_status::too_large) {
            w.end_error = steward::errc::limit_exceeded;
            break;
        }
        if (p.status == framing::frame_status::malformed) {
            w.end_error = steward::errc::malformed_message;
            break;
        }
        FUZZ_CHECK(p.total_size() <= rest.size());
        std::error_code ec;
        native::message m =
            decode_checked(rest.subspan(p.header_size, static_cast<std::size_t>(p.payload_size)), ec);
        if (ec) {
            w.end_error = ec;
            break;
        }
        if (!fds_expected && claimed_fds(m) > 0) {
            w.end_error = steward::errc::malformed_message;
            break;
        }
        w.frames.push_back({w.consumed, p.total_size(), std::move(m)});
        w.consumed += p.total_size();
    }
    return w;
}

// The assembler on its own, fed every REPLY part of the reference in stream order, each with
// exactly the descriptors it declares (empty placeholders: only their number matters here). A
// reply it completes must be one all of whose parts agree: same request id, status, total_fds
// and part_count, indexes 0..part_count-1, and the declared total delivered.
void check_assembler(const reference_walk& ref) {
    native::reply_assembler assembler;
    std::vector<native::reply> parts;  // of the reply in progress
    for (const auto& f : ref.frames) {
        const auto* part = std::get_if<native::reply>(&f.msg);
        if (!part) continue;
        if (!assembler.in_progress()) parts.clear();
        parts.push_back(*part);
        std::error_code ec;
        auto done = assembler.add(*part, std::vector<unique_fd>(part->part_fds), false, ec);
        if (ec) {
            FUZZ_CHECK(ec == steward::errc::malformed_message && !done && !assembler.in_progress());
            continue;
        }
        if (!done) {
            FUZZ_CHECK(assembler.in_progress());
            continue;
        }
        FUZZ_CHECK(!assembler.in_progress());
        const native::reply& first = parts.front();
        FUZZ_CHECK(done->request_id == first.request_id && done->status == first.status);
        if (done->status != native::reply_status::ok) {
            FUZZ_CHECK(done->fds.empty() && parts.size() == 1);
            continue;
        }
        FUZZ_CHECK(!done->error);
        FUZZ_CHECK(parts.size() == first.part_count);
        std::uint64_t delivered = 0;
        for (std::size_t i = 0; i < parts.size(); ++i) {
            const native::reply& p = parts[i];
            FUZZ_CHECK(p.request_id == first.request_id && p.status == first.status);
            FUZZ_CHECK(p.part_index == i);
            FUZZ_CHECK(p.total_fds == first.total_fds && p.part_count == first.part_count);
            delivered += p.part_fds;
        }
        FUZZ_CHECK(delivered == first.total_fds && done->fds.size() == first.total_fds);
    }
}

struct planned_read {
    std::size_t size;
    std::vector<int> fds;  // numbers only; ownership passes to the decoder at commit
    bool truncated = false;
    int claimed_by = -1;  // honest mode: index of the reference frame this batch belongs to
};

std::vector<int> make_fds(std::size_t n, std::vector<int>& all) {
    std::vector<int> out;
    for (std::size_t i = 0; i < n; ++i) {
        const int fd = ::fcntl(devnull(), F_DUPFD_CLOEXEC, 0);
        FUZZ_CHECK(fd >= 0);
        out.push_back(fd);
        all.push_back(fd);
    }
    return out;
}

std::vector<planned_read> plan_reads(std::span<const std::byte> stream, const reference_walk& ref,
                                     unsigned mode, std::size_t max_read, steward::fuzz::chunker& cuts,
                                     std::vector<int>& all_fds) {
    std::vector<planned_read> reads;
    std::size_t frame = 0;  // next reference frame that may start in a read
    for (std::size_t pos = 0; pos < stream.size();) {
        planned_read r{std::min(cuts.next(max_read), stream.size() - pos), {}, false, -1};
        if (mode == 1 || mode == 3) {
            // The kernel never returns bytes of two fd-carrying sendmsgs in one read: a read that
            // holds the first byte of a claiming part ends with that part at the latest.
            while (frame < ref.frames.size() && ref.frames[frame].offset < pos) ++frame;
            for (std::size_t f = frame; f < ref.frames.size() && ref.frames[f].offset < pos + r.size; ++f) {
                const std::uint16_t want = claimed_fds(ref.frames[f].msg);
                if (want == 0) continue;
                r.size = std::min<std::size_t>(
                    r.size, static_cast<std::size_t>(ref.frames[f].offset + ref.frames[f].size - pos));
                r.claimed_by = static_cast<int>(f);
                if (mode == 1) {
                    r.fds = make_fds(std::min<std::size_t>(want, max_real_fds), all_fds);
                    r.truncated = want > max_real_fds;
                } else {
                    r.truncated = true;
                }
                break;
            }
        } else if (mode == 2 && cuts.next(4) == 1) {
            r.fds = make_fds(cuts.next(4) - 1, all_fds);
            r.truncated = cuts.next(8) == 1;
        }
        reads.push_back(std::move(r));
        pos += reads.back().size;
    }
    return reads;
}

void check_stream(std::span<const std::byte> stream, unsigned mode, std::size_t max_read,
                  std::uint32_t seed) {
    const reference_walk ref = walk(stream, mode != 0);
    check_assembler(ref);
    steward::fuzz::chunker cuts(seed);
    std::vector<int> all_fds;
    {
        const std::vector<planned_read> reads = plan_reads(stream, ref, mode, max_read, cuts, all_fds);
        native::stream_decoder decoder;
        native::reply_assembler assembler;
        std::vector<native::stream_decoder::event> events;
        std::set<int> handed_out;
        std::error_code failure;
        std::size_t pos = 0;
        std::size_t given = 0;
        std::size_t i = 0;
        for (; i < reads.size() && !failure; ++i) {
            const planned_read& r = reads[i];
            const auto room = decoder.prepare(r.size + cuts.next(16) - 1);
            FUZZ_CHECK(room.size() >= r.size);
            std::copy_n(stream.begin() + static_cast<std::ptrdiff_t>(pos), r.size, room.begin());
            std::vector<unique_fd> fds;
            for (int fd : r.fds) fds.emplace_back(fd);
            decoder.commit(r.size, std::move(fds), r.truncated);
            pos += r.size;
            given += r.size;
            while (true) {
                std::error_code ec;
                auto ev = decoder.next(ec);
                if (ec) {
                    FUZZ_CHECK(!ev);
                    failure = ec;
                    break;
                }
                if (!ev) break;
                const std::size_t index = events.size();
                FUZZ_CHECK(index < ref.frames.size());
                FUZZ_CHECK(ev->msg == ref.frames[index].msg);
                // Never a message for bytes not yet given.
                FUZZ_CHECK(ref.frames[index].offset + ref.frames[index].size <= given);
                const std::uint16_t claimed = claimed_fds(ev->msg);
                FUZZ_CHECK(ev->fds.size() <= claimed);
                if (ev->fds.size() < claimed && claimed > 0) FUZZ_CHECK(ev->truncated);
                for (const auto& fd : ev->fds) FUZZ_CHECK(handed_out.insert(fd.get()).second);
                if (mode == 1 && claimed > 0) {
                    // Exactly the batch sent with this part.
                    const auto it = std::find_if(reads.begin(), reads.end(), [&](const planned_read& x) {
                        return x.claimed_by == static_cast<int>(index);
                    });
                    FUZZ_CHECK(it != reads.end() && it->fds.size() == ev->fds.size());
                    for (std::size_t k = 0; k < ev->fds.size(); ++k)
                        FUZZ_CHECK(ev->fds[k].get() == it->fds[k]);
                }
                if (const auto* part = std::get_if<native::reply>(&ev->msg)) {
                    std::error_code aec;
                    std::vector<unique_fd> part_fds;
                    for (auto& fd : ev->fds) part_fds.push_back(std::move(fd));
                    auto done = assembler.add(*part, std::move(part_fds), ev->truncated, aec);
                    if (aec) {
                        FUZZ_CHECK(aec == steward::errc::malformed_message && !done &&
                                   !assembler.in_progress());
                    } else if (done) {
                        FUZZ_CHECK(done->request_id == part->request_id);
                        if (done->status != native::reply_status::ok || done->error)
                            FUZZ_CHECK(done->fds.empty());
                        if (done->error) FUZZ_CHECK(done->error == steward::errc::control_truncated);
                        if (done->status == native::reply_status::ok && !done->error)
                            FUZZ_CHECK(done->fds.size() == part->total_fds);
                    }
                }
                events.push_back(std::move(*ev));
            }
        }
        // Reads never made after a failure: their descriptors were never handed over.
        for (; i < reads.size(); ++i)
            for (int fd : reads[i].fds) unique_fd{fd};
        if (!failure) {
            // A defect the reference found lies in bytes the decoder was given: it must have
            // stopped there. Otherwise every whole frame came out and what is left is exactly the
            // unfinished tail.
            FUZZ_CHECK(!ref.end_error);
            FUZZ_CHECK(events.size() == ref.frames.size());
            FUZZ_CHECK(decoder.buffered() == stream.size() - ref.consumed);
        } else {
            FUZZ_CHECK(failure == steward::errc::malformed_message ||
                       failure == steward::errc::limit_exceeded);
            FUZZ_CHECK(events.size() <= ref.frames.size());
            if (mode != 2) {
                // Without hostile batches only the stream itself can be wrong: the same error at
                // the same frame as the reference.
                FUZZ_CHECK(ref.end_error == failure);
                FUZZ_CHECK(events.size() == ref.frames.size());
            }
            std::error_code ec;
            FUZZ_CHECK(!decoder.next(ec) && ec);  // the stream stays failed
        }
    }
    // Decoder, events and assembler are gone: every descriptor handed to them must be closed.
    for (int fd : all_fds) FUZZ_CHECK(::fcntl(fd, F_GETFD) == -1);
}

}  // namespace

// The entry point libFuzzer calls, by that name.
// NOLINTNEXTLINE(readability-identifier-naming)
extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
    if (size == 0) return 0;
    const unsigned control = data[0];
    const auto stream = steward::fuzz::as_bytes(data + 1, size - 1);

    // The whole stream as one payload, for inputs that are not framed at all.
    std::error_code ec;
    (void)decode_checked(stream, ec);

    const unsigned mode = control & 3;
    const std::size_t max_read = 1 + (control >> 2) * 8;
    check_stream(stream, mode, max_read, steward::fuzz::seed_of(stream));
    return 0;
}
