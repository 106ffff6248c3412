// libFuzzer target: steward's native sharer protocol, receiving side (src/sharer/native_protocol.hpp,
// src/sharer/native_stream.hpp).
//
// Input: byte 0 is a control byte, the rest is the byte stream a peer sends.
//   bit 7 clear: a version-1 session (one REPLY part per sendmsg), decoder set to version 1
//   bits 0-1  how descriptor batches ride on the reads:
//             0 none; 1 honest (each REPLY part with part_fds > 0 gets its batch on the read that
//             holds its first byte, at most 4 real fds, the rest reported as MSG_CTRUNC);
//             2 hostile (batches on arbitrary reads); 3 honest reads but every batch dropped
//             (MSG_CTRUNC with no fds, as at RLIMIT_NOFILE)
//   bit 7 set: a version-2 session (coalesced replies), decoder at its default (version 2)
//   bits 0-1  0 honest coalesced: the frames are cut into sendmsg calls (at random points and
//             where a call would pass 253 descriptors), each call's batch holds the descriptors
//             of all its REPLY parts, at most 8 real ones (more: MSG_CTRUNC keeps a prefix);
//             reads follow the kernel (a read takes at most one batch and ends with that call;
//             short reads only there); 1 the same with every batch dropped; 2 hostile; 3 honest
//             with one REPLY part per call (a version-1 server's stream into a v2 decoder)
//   bits 2-6  largest read size (1 + value * 8 bytes)
// The whole stream is also decoded as one QUICK and one QUICK_ACK payload (fixed authkey and
// client nonce, the ones make_seeds.py uses), as is and with its MAC replaced by the right one,
// and the frames of the reference walk are packed with frame_packer.
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
// - reply_assembler hands out descriptors only for a whole, successful reply, all of them;
// - version 2: with honest coalesced batches every part either gets exactly its descriptors (the
//   next ones of its call's batch) or, after MSG_CTRUNC, comes out truncated with none; the
//   decoder fails only with the reference's error, or with control_truncated after a truncation;
// - decode_quick / decode_quick_ack accept exactly the structurally valid payloads whose MAC
//   verifies: re-MACed input is refused only as malformed_message, by an independent structure
//   check, and re-encodes to the same bytes; other input fails with malformed_message or
//   authentication_failed;
// - quick::ack_reader: the same outcome (state, error, session parameters, rest) however the
//   stream is cut into feeds; acked only for at most one leading #CHALLENGE# frame and then a
//   QUICK_ACK that decode_quick_ack accepts, rest() being exactly the bytes after it; failures
//   only with the documented errors;
// - frame_packer: chunks are whole frames in order, hold exactly the descriptors their REPLY
//   parts declare, at most 253, and only a part whose descriptors would not fit starts a chunk.

#include "fuzz_support.hpp"

#include "sharer/framing.hpp"
#include "sharer/native_protocol.hpp"
#include "sharer/native_stream.hpp"
#include "sharer/quick_connect.hpp"

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

steward::authkey fuzz_key() {
    steward::authkey k;
    for (std::size_t i = 0; i < k.bytes.size(); ++i) k.bytes[i] = static_cast<std::byte>(i);
    return k;
}

native::quick_nonce fuzz_nonce() {
    native::quick_nonce n{};
    for (std::size_t i = 0; i < n.size(); ++i) n[i] = static_cast<std::byte>(0x40 + i);
    return n;
}

std::uint64_t be_at(std::span<const std::byte> b, std::size_t at, std::size_t n) {
    std::uint64_t v = 0;
    for (std::size_t i = 0; i < n; ++i) v = (v << 8) | std::to_integer<std::uint64_t>(b[at + i]);
    return v;
}

bool has_magic(std::span<const std::byte> p) {
    return p.size() >= 5 && std::equal(native::magic.begin(), native::magic.end(), p.begin() + 1);
}

// Independent structure checks (docs/protocol.md section 5.5).
bool quick_structure_ok(std::span<const std::byte> p) {
    if (p.size() != native::quick_size_without_fetch && p.size() != native::quick_size_with_fetch)
        return false;
    if (p[0] != std::byte{0x08} || !has_magic(p)) return false;
    const auto lo = be_at(p, 5, 2), hi = be_at(p, 7, 2);
    const auto has_fetch = be_at(p, 45, 1);
    if (lo == 0 || lo > hi || hi < 2) return false;
    if (has_fetch != (p.size() == native::quick_size_with_fetch ? 1U : 0U)) return false;
    return has_fetch == 0 || be_at(p, 46, 8) != 0;
}

bool quick_ack_structure_ok(std::span<const std::byte> p) {
    return p.size() == native::quick_ack_size && p[0] == std::byte{0x09} && has_magic(p) &&
           be_at(p, 5, 2) >= 2 && be_at(p, 7, 4) != 0;
}

void check_quick(std::span<const std::byte> stream) {
    static const native::quick_mac_key key(fuzz_key());
    const native::quick_nonce nonce = fuzz_nonce();
    const auto is_expected_error = [](std::error_code ec) {
        return ec == steward::errc::malformed_message || ec == steward::errc::authentication_failed;
    };
    // As is.
    std::error_code ec;
    const char* why = nullptr;
    const native::quick q = native::decode_quick(key, stream, ec, &why);
    if (ec) {
        FUZZ_CHECK(is_expected_error(ec) && why && q == native::quick{});
    } else {
        const auto again = native::encode_quick(key, q);
        FUZZ_CHECK(again.size() == stream.size() && std::equal(again.begin(), again.end(), stream.begin()));
        FUZZ_CHECK(native::classify_first_frame(stream) == native::first_frame_kind::native_quick);
    }
    const native::hello_ack a = native::decode_quick_ack(key, nonce, stream, ec, &why);
    if (ec) {
        FUZZ_CHECK(is_expected_error(ec) && why && a == native::hello_ack{});
    } else {
        const auto again = native::encode_quick_ack(key, nonce, a);
        FUZZ_CHECK(again.size() == stream.size() && std::equal(again.begin(), again.end(), stream.begin()));
    }
    if (stream.size() < native::quick_mac_size) return;
    // With the right MAC: only the structure decides.
    std::vector<std::byte> p(stream.begin(), stream.end());
    const auto signed_part = std::span<const std::byte>(p).first(p.size() - native::quick_mac_size);
    const auto client_mac = native::quick_mac(key, signed_part);
    std::copy(client_mac.begin(), client_mac.end(), p.end() - native::quick_mac_size);
    const native::quick q2 = native::decode_quick(key, p, ec);
    FUZZ_CHECK(!ec == quick_structure_ok(p));
    if (ec) FUZZ_CHECK(ec == steward::errc::malformed_message);
    if (!ec) {
        const auto again = native::encode_quick(key, q2);
        FUZZ_CHECK(again == p);
        FUZZ_CHECK(native::classify_first_frame(p) == native::first_frame_kind::native_quick);
        // The same bytes with another MAC (the server's) never verify.
        const auto server_mac = native::quick_ack_mac(key, nonce, signed_part);
        std::copy(server_mac.begin(), server_mac.end(), p.end() - native::quick_mac_size);
        (void)native::decode_quick(key, p, ec);
        FUZZ_CHECK(ec == steward::errc::authentication_failed);
        std::copy(client_mac.begin(), client_mac.end(), p.end() - native::quick_mac_size);
    }
    const auto server_mac = native::quick_ack_mac(key, nonce, signed_part);
    std::copy(server_mac.begin(), server_mac.end(), p.end() - native::quick_mac_size);
    const native::hello_ack a2 = native::decode_quick_ack(key, nonce, p, ec);
    FUZZ_CHECK(!ec == quick_ack_structure_ok(p));
    if (ec) FUZZ_CHECK(ec == steward::errc::malformed_message);
    if (!ec) {
        FUZZ_CHECK(native::encode_quick_ack(key, nonce, a2) == p);
        native::quick_nonce other = nonce;
        other[0] ^= std::byte{1};
        (void)native::decode_quick_ack(key, other, p, ec);
        FUZZ_CHECK(ec == steward::errc::authentication_failed);
    }
}

void check_ack_reader(std::span<const std::byte> stream, std::uint32_t seed) {
    namespace quick = steward::detail::quick;
    static const steward::authkey key = fuzz_key();
    const quick::nonce nonce = fuzz_nonce();
    quick::ack_reader whole(key, nonce);
    const auto st = whole.feed(stream);
    steward::fuzz::chunker cuts(seed);
    quick::ack_reader pieces(key, nonce);
    auto st2 = quick::ack_reader::state::need_more;
    for (std::size_t at = 0; at < stream.size();) {
        const std::size_t n = std::min(cuts.next(64), stream.size() - at);
        st2 = pieces.feed(stream.subspan(at, n));
        at += n;
    }
    if (stream.empty()) st2 = pieces.feed({});
    FUZZ_CHECK(st == st2 && whole.error() == pieces.error());
    using state = quick::ack_reader::state;
    if (st == state::failed) {
        const std::error_code e = whole.error();
        FUZZ_CHECK(e == steward::errc::authentication_failed || e == steward::errc::malformed_message ||
                   e == steward::errc::limit_exceeded || e == std::errc::connection_reset);
        return;
    }
    if (st == state::need_more) return;
    FUZZ_CHECK(whole.ack() == pieces.ack());
    // Acked: [one challenge frame] QUICK_ACK, then rest().
    std::size_t at = 0;
    auto next_frame = [&](std::span<const std::byte>& payload) {
        const auto p = framing::probe_frame(stream.subspan(at), framing::handshake_max_payload);
        FUZZ_CHECK(p.status == framing::frame_status::frame);
        payload = stream.subspan(at + p.header_size, static_cast<std::size_t>(p.payload_size));
        at += static_cast<std::size_t>(p.total_size());
    };
    std::span<const std::byte> payload;
    next_frame(payload);
    if (!(payload.size() >= 5 && payload[0] == std::byte{0x09} && has_magic(payload))) {
        const std::string_view tag = "#CHALLENGE#";
        FUZZ_CHECK(payload.size() >= tag.size() &&
                   std::equal(tag.begin(), tag.end(), reinterpret_cast<const char*>(payload.data())));
        next_frame(payload);
    }
    std::error_code ec;
    FUZZ_CHECK(native::decode_quick_ack(key, nonce, payload, ec) == whole.ack() && !ec);
    const auto rest = whole.rest();
    FUZZ_CHECK(rest.size() == stream.size() - at &&
               std::equal(rest.begin(), rest.end(), stream.begin() + static_cast<std::ptrdiff_t>(at)));
    const auto rest2 = pieces.rest();
    // Fed in pieces, rest() holds what followed QUICK_ACK in the feeds given so far.
    FUZZ_CHECK(rest2.size() <= rest.size() && std::equal(rest2.begin(), rest2.end(), rest.begin()));
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

// frame_packer over the reference's frames (descriptor numbers are placeholders, never opened).
void check_packer(std::span<const std::byte> stream, const reference_walk& ref) {
    std::vector<int> numbers;
    std::vector<native::outgoing_frame> frames;
    std::size_t total = 0;
    for (const auto& f : ref.frames) total += claimed_fds(f.msg);
    numbers.reserve(total);
    for (const auto& f : ref.frames) {
        const std::uint16_t k = claimed_fds(f.msg);
        const std::size_t at = numbers.size();
        for (std::uint16_t i = 0; i < k; ++i) numbers.push_back(static_cast<int>(numbers.size()));
        frames.push_back(
            {stream.subspan(static_cast<std::size_t>(f.offset), static_cast<std::size_t>(f.size)),
             std::span<const int>(numbers).subspan(at, k)});
    }
    const native::packed_frames packed = native::pack_frames(frames);
    FUZZ_CHECK(packed.bytes.size() == ref.consumed &&
               std::equal(packed.bytes.begin(), packed.bytes.end(), stream.begin()));
    FUZZ_CHECK(packed.fds == numbers);
    std::size_t frame = 0, byte = 0, fd = 0;
    for (std::size_t c = 0; c < packed.chunks.size(); ++c) {
        const auto& ch = packed.chunks[c];
        FUZZ_CHECK(ch.byte_offset == byte && ch.fd_offset == fd && ch.fd_count <= native::max_fds_per_part);
        std::size_t declared = 0, bytes = 0;
        bool first = true;
        while (bytes < ch.byte_count) {
            FUZZ_CHECK(frame < ref.frames.size());
            const std::uint16_t k = claimed_fds(ref.frames[frame].msg);
            // Greedy: a chunk after the first starts only with a part that did not fit before.
            if (first && c > 0)
                FUZZ_CHECK(k > 0 && packed.chunks[c - 1].fd_count + k > native::max_fds_per_part);
            first = false;
            declared += k;
            bytes += static_cast<std::size_t>(ref.frames[frame].size);
            ++frame;
        }
        FUZZ_CHECK(bytes == ch.byte_count && declared == ch.fd_count);
        byte += ch.byte_count;
        fd += ch.fd_count;
    }
    FUZZ_CHECK(frame == ref.frames.size());
}

constexpr std::size_t max_real_fds_per_call = 8;

// Version 2: the frames cut into sendmsg calls and the reads the kernel would return for them.
struct coalesced_plan {
    std::vector<planned_read> reads;
    std::vector<std::vector<int>> expected;  // per reference frame: the descriptors it must get
    std::vector<bool> short_part;            // per reference frame: MSG_CTRUNC leaves it short
    bool any_truncation = false;
};

coalesced_plan plan_coalesced(std::span<const std::byte> stream, const reference_walk& ref, unsigned mode,
                              std::size_t max_read, steward::fuzz::chunker& cuts, std::vector<int>& all_fds) {
    struct call {
        std::size_t first = 0, last = 0;
        std::size_t declared = 0;
        std::vector<int> fds;
        bool truncated = false;
    };
    coalesced_plan plan;
    plan.expected.resize(ref.frames.size());
    plan.short_part.resize(ref.frames.size(), false);
    std::vector<call> calls;
    std::vector<std::size_t> frame_call(ref.frames.size());
    for (std::size_t f = 0; f < ref.frames.size(); ++f) {
        const std::uint16_t k = claimed_fds(ref.frames[f].msg);
        const bool split = calls.empty() || cuts.next(4) == 1 ||
                           (mode == 3 && k > 0 && calls.back().declared > 0) ||
                           calls.back().declared + k > native::max_fds_per_part;
        if (split) calls.push_back({static_cast<std::size_t>(ref.frames[f].offset), 0, 0, {}, false});
        calls.back().last = static_cast<std::size_t>(ref.frames[f].offset + ref.frames[f].size);
        calls.back().declared += k;
        frame_call[f] = calls.size() - 1;
    }
    if (ref.consumed < stream.size()) {  // the unfinished or defective tail: a call of its own
        calls.push_back({static_cast<std::size_t>(ref.consumed), stream.size(), 0, {}, false});
    }
    for (auto& c : calls) {
        if (c.declared == 0) continue;
        const std::size_t real = mode == 1 ? 0 : std::min(c.declared, max_real_fds_per_call);
        c.fds = make_fds(real, all_fds);
        c.truncated = real < c.declared;
        plan.any_truncation = plan.any_truncation || c.truncated;
    }
    // What each part gets: the next ones of its call's batch while they last.
    std::vector<std::size_t> used(calls.size(), 0);
    for (std::size_t f = 0; f < ref.frames.size(); ++f) {
        const std::uint16_t k = claimed_fds(ref.frames[f].msg);
        if (k == 0) continue;
        call& c = calls[frame_call[f]];
        std::size_t& u = used[frame_call[f]];
        if (c.fds.size() - u >= k) {
            plan.expected[f].assign(c.fds.begin() + static_cast<std::ptrdiff_t>(u),
                                    c.fds.begin() + static_cast<std::ptrdiff_t>(u + k));
            u += k;
        } else {
            plan.short_part[f] = true;
            u = c.fds.size();
        }
    }
    // Reads: one takes at most one batch (the first call it reaches whose batch is still there)
    // and then ends with that call; it is short only there.
    std::size_t next_call = 0;
    for (std::size_t pos = 0; pos < stream.size();) {
        const std::size_t asked = cuts.next(max_read);
        planned_read r{std::min(asked, stream.size() - pos), {}, false, -1};
        while (next_call < calls.size() && calls[next_call].first < pos) ++next_call;
        if (next_call < calls.size() && calls[next_call].first < pos + r.size) {
            for (std::size_t c = next_call; c < calls.size() && calls[c].first < pos + r.size; ++c) {
                if (calls[c].declared == 0) continue;
                r.size = std::min(r.size, calls[c].last - pos);
                r.fds = calls[c].fds;
                r.truncated = calls[c].truncated;
                break;
            }
        }
        r.claimed_by = static_cast<int>(asked);  // reused: what prepare() is asked for
        plan.reads.push_back(std::move(r));
        pos += plan.reads.back().size;
    }
    return plan;
}

void check_coalesced(std::span<const std::byte> stream, unsigned mode, std::size_t max_read,
                     std::uint32_t seed) {
    const reference_walk ref = walk(stream, true);
    steward::fuzz::chunker cuts(seed);
    std::vector<int> all_fds;
    {
        const bool hostile = mode == 2;
        coalesced_plan plan;
        if (hostile) {
            plan.reads = plan_reads(stream, ref, 2, max_read, cuts, all_fds);
            for (auto& r : plan.reads) r.claimed_by = static_cast<int>(r.size + cuts.next(16) - 1);
        } else {
            plan = plan_coalesced(stream, ref, mode, max_read, cuts, all_fds);
        }
        native::stream_decoder decoder;  // version 2 by default
        native::reply_assembler assembler;
        std::set<int> handed_out;
        std::error_code failure;
        std::size_t pos = 0, events = 0, i = 0;
        for (; i < plan.reads.size() && !failure; ++i) {
            const planned_read& r = plan.reads[i];
            const auto room = decoder.prepare(static_cast<std::size_t>(r.claimed_by));
            FUZZ_CHECK(room.size() >= r.size);
            std::copy_n(stream.begin() + static_cast<std::ptrdiff_t>(pos), r.size, room.begin());
            std::vector<unique_fd> fds;
            for (int fd : r.fds) fds.emplace_back(fd);
            decoder.commit(r.size, std::move(fds), r.truncated);
            pos += r.size;
            // The allocation-free form of next() (next(ec) is the version-1 path's).
            native::message msg;
            std::vector<unique_fd> part_fds;
            bool truncated = false;
            while (true) {
                std::error_code ec;
                const bool got = decoder.next(msg, part_fds, truncated, ec);
                if (ec) {
                    FUZZ_CHECK(!got);
                    failure = ec;
                    break;
                }
                if (!got) break;
                FUZZ_CHECK(events < ref.frames.size());
                FUZZ_CHECK(msg == ref.frames[events].msg);
                FUZZ_CHECK(ref.frames[events].offset + ref.frames[events].size <= pos);
                const std::uint16_t claimed = claimed_fds(msg);
                FUZZ_CHECK(part_fds.size() == claimed || (truncated && part_fds.empty()));
                for (const auto& fd : part_fds) FUZZ_CHECK(handed_out.insert(fd.get()).second);
                if (!hostile && claimed > 0) {
                    FUZZ_CHECK(truncated == plan.short_part[events]);
                    if (!truncated) {
                        FUZZ_CHECK(part_fds.size() == plan.expected[events].size());
                        for (std::size_t k = 0; k < part_fds.size(); ++k)
                            FUZZ_CHECK(part_fds[k].get() == plan.expected[events][k]);
                    }
                }
                if (const auto* part = std::get_if<native::reply>(&msg)) {
                    std::error_code aec;
                    auto done = assembler.add_from(*part, part_fds, truncated, aec);
                    for (const auto& fd : part_fds) FUZZ_CHECK(!fd);  // taken or closed
                    if (aec) FUZZ_CHECK(aec == steward::errc::malformed_message && !done);
                    if (done && (done->error || done->status != native::reply_status::ok))
                        FUZZ_CHECK(done->fds.empty());
                    if (done && !done->error && done->status == native::reply_status::ok)
                        FUZZ_CHECK(done->fds.size() == part->total_fds);
                }
                ++events;
            }
        }
        for (; i < plan.reads.size(); ++i)
            for (int fd : plan.reads[i].fds) unique_fd{fd};
        if (!failure) {
            FUZZ_CHECK(!ref.end_error);
            FUZZ_CHECK(events == ref.frames.size());
            FUZZ_CHECK(decoder.buffered() == stream.size() - ref.consumed);
            if (!hostile) FUZZ_CHECK(decoder.held_descriptors() == 0);
        } else {
            FUZZ_CHECK(failure == steward::errc::malformed_message ||
                       failure == steward::errc::limit_exceeded ||
                       failure == steward::errc::control_truncated);
            FUZZ_CHECK(decoder.held_descriptors() == 0);
            if (!hostile) {
                if (failure == steward::errc::control_truncated) {
                    FUZZ_CHECK(plan.any_truncation);
                } else {
                    FUZZ_CHECK(ref.end_error == failure);
                    FUZZ_CHECK(events == ref.frames.size());
                }
            }
        }
    }
    for (int fd : all_fds) FUZZ_CHECK(::fcntl(fd, F_GETFD) == -1);
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
        decoder.set_version(1);  // one REPLY part per sendmsg
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
                // A short part has none: its partial descriptors were closed.
                if (ev->truncated) FUZZ_CHECK(ev->fds.empty());
                if (mode == 1 && claimed > 0) {
                    // Exactly the batch sent with this part, or nothing when MSG_CTRUNC cut it.
                    const auto it = std::find_if(reads.begin(), reads.end(), [&](const planned_read& x) {
                        return x.claimed_by == static_cast<int>(index);
                    });
                    FUZZ_CHECK(it != reads.end());
                    FUZZ_CHECK(ev->truncated == it->truncated);
                    if (!ev->truncated) {
                        FUZZ_CHECK(it->fds.size() == ev->fds.size());
                        for (std::size_t k = 0; k < ev->fds.size(); ++k)
                            FUZZ_CHECK(ev->fds[k].get() == it->fds[k]);
                    }
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

    check_quick(stream);
    check_ack_reader(stream, steward::fuzz::seed_of(stream));

    const unsigned mode = control & 3;
    const std::size_t max_read = 1 + ((control >> 2) & 0x1f) * 8;
    if (control & 0x80) {
        check_packer(stream, walk(stream, true));
        check_coalesced(stream, mode, max_read, steward::fuzz::seed_of(stream));
    } else {
        check_stream(stream, mode, max_read, steward::fuzz::seed_of(stream));
    }
    return 0;
}
