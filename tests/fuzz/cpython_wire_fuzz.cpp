// libFuzzer target: what a CPython-speaking peer sends, end to end through the pure codecs:
// multiprocessing.connection framing (src/sharer/framing.hpp), the HMAC handshake state machine
// (src/sharer/handshake.hpp) and the resource_sharer pickle subset (src/sharer/pickle.hpp).
//
// Input: byte 0 picks the role steward plays (bit 0: 0 = server, 1 = client); the rest is the
// peer's byte stream. The authkey and both nonces are fixed (the known-answer vector of
// docs/protocol.md), so a seed can hold a complete, valid handshake and the fuzzer reaches the
// pickle that follows it.
//
// Invariants, beyond "does not crash":
// - probe_frame never claims more bytes than given, never a payload above the limit, reports the
//   exact number of missing bytes, decides too_large from the header alone, and agrees with
//   encode_header()/make_frame();
// - the handshake follows an independent model of CPython's protocol (recomputed here with
//   libcrypto's HMAC, not steward's): a response is accepted iff it is one of the valid MACs, an
//   answer to a challenge is exactly what CPython's _create_response() produces (and
//   verify_response() accepts it), a failed handshake stays failed and says nothing more, and a
//   server with another key never succeeds on the same bytes;
// - pickle::decode either refuses with malformed_message or yields a value that every protocol's
//   encoder (2..5) writes back into bytes decoding to the same value.

#include "fuzz_support.hpp"

#include "sharer/framing.hpp"
#include "sharer/handshake.hpp"
#include "sharer/native_protocol.hpp"
#include "sharer/pickle.hpp"

#include <steward/error.hpp>

#include <openssl/evp.h>
#include <openssl/hmac.h>

#include <algorithm>
#include <array>
#include <optional>
#include <string>
#include <vector>

namespace {

namespace framing = steward::detail::framing;
namespace auth = steward::detail::auth;
namespace pickle = steward::detail::pickle;
using bytes = std::vector<std::byte>;
using steward::fuzz::as_bytes;

constexpr std::uint64_t after_handshake_limit = 1 << 20;

steward::authkey make_key(std::uint8_t first) {
    steward::authkey k;
    for (std::size_t i = 0; i < k.bytes.size(); ++i) k.bytes[i] = static_cast<std::byte>(first + i);
    return k;
}

std::array<std::byte, auth::nonce_size> make_nonce(std::uint8_t first) {
    std::array<std::byte, auth::nonce_size> n;
    for (std::size_t i = 0; i < n.size(); ++i) n[i] = static_cast<std::byte>(first + i);
    return n;
}

// ---- framing ---------------------------------------------------------------------------------

void check_probe(const framing::frame_probe& p, std::span<const std::byte> buf, std::uint64_t limit) {
    switch (p.status) {
        case framing::frame_status::need_more:
            FUZZ_CHECK(p.missing > 0);
            if (buf.size() < 4) {
                FUZZ_CHECK(p.header_size == 0 && p.missing == 4 - buf.size());
            } else if (p.header_size == 0) {
                FUZZ_CHECK(buf.size() < 12 && p.missing == 12 - buf.size());
            } else {
                FUZZ_CHECK(p.payload_size <= limit);
                FUZZ_CHECK(p.total_size() > buf.size() && p.missing == p.total_size() - buf.size());
            }
            break;
        case framing::frame_status::frame: {
            FUZZ_CHECK(p.header_size == 4 || p.header_size == 12);
            FUZZ_CHECK(p.payload_size <= limit);
            FUZZ_CHECK(p.total_size() <= buf.size());
            // One byte fewer is exactly one byte short.
            const auto shorter =
                framing::probe_frame(buf.first(static_cast<std::size_t>(p.total_size()) - 1), limit);
            FUZZ_CHECK(shorter.status == framing::frame_status::need_more);
            if (p.payload_size > 0) FUZZ_CHECK(shorter.missing == 1);
            // The header the encoder writes for this size announces the same size.
            std::array<std::byte, framing::max_header_size> header;
            const std::size_t n = framing::encode_header(p.payload_size, header);
            const auto again =
                framing::probe_frame(std::span<const std::byte>(header).first(n), ~std::uint64_t{0});
            FUZZ_CHECK(again.header_size == n && again.payload_size == p.payload_size);
            if (p.header_size == 4) FUZZ_CHECK(std::equal(header.begin(), header.begin() + 4, buf.begin()));
            break;
        }
        case framing::frame_status::too_large: {
            FUZZ_CHECK(p.payload_size > limit);
            const auto header_only = framing::probe_frame(buf.first(p.header_size), limit);
            FUZZ_CHECK(header_only.status == framing::frame_status::too_large);
            break;
        }
        case framing::frame_status::malformed: {
            FUZZ_CHECK(buf.size() >= 4);
            FUZZ_CHECK(std::to_integer<unsigned>(buf[0]) & 0x80);
            const bool minus_one =
                std::all_of(buf.begin(), buf.begin() + 4, [](std::byte b) { return b == std::byte{0xff}; });
            FUZZ_CHECK(!minus_one);
            break;
        }
    }
}

void check_make_frame(std::span<const std::byte> payload) {
    const bytes frame = framing::make_frame(payload);
    const auto p = framing::probe_frame(frame, payload.size());
    FUZZ_CHECK(p.status == framing::frame_status::frame && p.total_size() == frame.size());
    FUZZ_CHECK(std::equal(payload.begin(), payload.end(),
                          frame.begin() + static_cast<std::ptrdiff_t>(p.header_size)));
}

// ---- pickle ----------------------------------------------------------------------------------

void check_pickle(std::span<const std::byte> payload) {
    std::error_code ec;
    const char* why = nullptr;
    const pickle::decoded d = pickle::decode(payload, ec, &why);
    if (ec) {
        FUZZ_CHECK(ec == steward::errc::malformed_message);
        FUZZ_CHECK(why != nullptr);
        FUZZ_CHECK(d.kind == pickle::value_kind::none);
        return;
    }
    FUZZ_CHECK(payload.size() >= 3 && payload[0] == pickle::proto_opcode && payload.back() == std::byte{'.'});
    const int protocol = std::to_integer<int>(payload[1]);
    FUZZ_CHECK(protocol >= 2 && protocol <= 5);
    FUZZ_CHECK(steward::detail::native::classify_first_frame(payload) ==
               steward::detail::native::first_frame_kind::cpython_pickle);
    for (int proto = 2; proto <= 5; ++proto) {
        const bytes encoded = d.kind == pickle::value_kind::none
                                  ? pickle::encode_none(proto)
                                  : pickle::encode_request(d.request.key, d.request.pid, proto);
        std::error_code ec2;
        const pickle::decoded back = pickle::decode(encoded, ec2);
        FUZZ_CHECK(!ec2);
        FUZZ_CHECK(back.kind == d.kind);
        if (d.kind == pickle::value_kind::request) FUZZ_CHECK(back.request == d.request);
    }
}

// ---- an independent model of the handshake ------------------------------------------------------

struct digest_info {
    std::string_view name;
    const EVP_MD* (*md)();
};
const std::array<digest_info, 5> digests{{{"md5", EVP_md5},
                                          {"sha256", EVP_sha256},
                                          {"sha384", EVP_sha384},
                                          {"sha3_256", EVP_sha3_256},
                                          {"sha3_384", EVP_sha3_384}}};

bytes raw_hmac(const steward::authkey& key, const EVP_MD* md, std::span<const std::byte> msg) {
    unsigned char out[EVP_MAX_MD_SIZE];
    unsigned len = 0;
    static const unsigned char empty = 0;
    const auto* data = msg.empty() ? &empty : reinterpret_cast<const unsigned char*>(msg.data());
    FUZZ_CHECK(HMAC(md, key.bytes.data(), static_cast<int>(key.bytes.size()), data, msg.size(), out, &len));
    const auto* b = reinterpret_cast<const std::byte*>(out);
    return {b, b + len};
}

bytes prefixed(std::string_view name, const bytes& mac) {
    bytes out;
    out.push_back(std::byte{'{'});
    for (char c : name) out.push_back(static_cast<std::byte>(c));
    out.push_back(std::byte{'}'});
    out.insert(out.end(), mac.begin(), mac.end());
    return out;
}

// Every response a verifier must accept for @p message (the challenge without #CHALLENGE#).
bool response_is_valid(const steward::authkey& key, std::span<const std::byte> message,
                       std::span<const std::byte> response) {
    auto same = [&](const bytes& candidate) {
        return candidate.size() == response.size() &&
               std::equal(candidate.begin(), candidate.end(), response.begin());
    };
    if (same(raw_hmac(key, EVP_md5(), message))) return true;
    for (const auto& d : digests)
        if (same(prefixed(d.name, raw_hmac(key, d.md(), message)))) return true;
    return false;
}

// CPython's answer_challenge()/_create_response(), or nullopt where CPython raises.
std::optional<bytes> model_answer(const steward::authkey& key, std::span<const std::byte> challenge) {
    const auto tag = as_bytes(auth::challenge_tag);
    if (challenge.size() < tag.size() || !std::equal(tag.begin(), tag.end(), challenge.begin()))
        return std::nullopt;
    const auto message = challenge.subspan(tag.size());
    if (message.size() < 20) return std::nullopt;
    if (message.size() == 20) return raw_hmac(key, EVP_md5(), message);
    if (message[0] != std::byte{'{'}) return std::nullopt;
    const std::string_view text = steward::fuzz::as_text(message);
    const std::size_t curly = text.substr(0, 10).find('}', 1);
    if (curly == std::string_view::npos) return std::nullopt;
    const std::string_view name = text.substr(1, curly - 1);
    for (const auto& d : digests)
        if (d.name == name) return prefixed(name, raw_hmac(key, d.md(), message));
    return std::nullopt;
}

bool equals_text(std::span<const std::byte> b, std::string_view s) {
    return steward::fuzz::as_text(b) == s;
}

bool same_bytes(const std::optional<bytes>& a, const bytes& b) {
    return a && *a == b;
}

// Drives one handshake over @p stream as the peer would deliver it; returns true if it succeeded.
bool run(auth::handshake::role role, const steward::authkey& key, std::span<const std::byte> stream) {
    const bool server = role == auth::handshake::role::server;
    const auto own_nonce = make_nonce(server ? 0x40 : 0x80);
    auth::handshake hs(role, key, own_nonce);
    const bytes own_challenge = auth::make_challenge(own_nonce);
    const auto own_message = std::span<const std::byte>(own_challenge).subspan(auth::challenge_tag.size());

    const auto first = hs.start();
    if (server)
        FUZZ_CHECK(first && *first == own_challenge);
    else
        FUZZ_CHECK(!first);
    // The model: server steps 0 response, 1 peer challenge, 2 welcome; client 0 challenge,
    // 1 welcome, 2 response.
    int step = 0;
    bool succeeded = false;

    std::size_t pos = 0;
    while (pos < stream.size()) {
        const auto rest = stream.subspan(pos);
        const std::uint64_t limit = succeeded ? after_handshake_limit : framing::handshake_max_payload;
        const framing::frame_probe p = framing::probe_frame(rest, limit);
        check_probe(p, rest, limit);
        if (p.status != framing::frame_status::frame) break;
        const auto payload = rest.subspan(p.header_size, static_cast<std::size_t>(p.payload_size));
        pos += static_cast<std::size_t>(p.total_size());
        check_make_frame(payload);
        // Every payload also goes through the pickle decoder: it must be safe on any bytes.
        check_pickle(payload);

        if (hs.done()) {
            FUZZ_CHECK(!hs.on_frame(payload));  // a finished handshake says nothing more
            if (succeeded && server) {
                // The first frame after the handshake picks the protocol.
                const auto kind = steward::detail::native::classify_first_frame(payload);
                FUZZ_CHECK((kind == steward::detail::native::first_frame_kind::cpython_pickle) ==
                           (!payload.empty() && payload[0] == pickle::proto_opcode));
            }
            continue;
        }

        const auto reply = hs.on_frame(payload);
        const bool verifying = (server && step == 0) || (!server && step == 2);
        const bool answering = (server && step == 1) || (!server && step == 0);
        if (verifying) {
            const bool valid = response_is_valid(key, own_message, payload);
            FUZZ_CHECK(auth::verify_response(key, own_message, payload) == valid);
            FUZZ_CHECK(reply && equals_text(*reply, valid ? auth::welcome : auth::failure));
            if (!valid) {
                FUZZ_CHECK(hs.current() == auth::handshake::state::failed);
                FUZZ_CHECK(hs.error() == steward::errc::authentication_failed);
            } else if (!server) {
                FUZZ_CHECK(hs.current() == auth::handshake::state::succeeded);
                succeeded = true;
            }
        } else if (answering) {
            const auto expected = model_answer(key, payload);
            if (!expected) {
                FUZZ_CHECK(!reply && hs.current() == auth::handshake::state::failed);
                FUZZ_CHECK(hs.error() == steward::errc::malformed_message);
            } else {
                FUZZ_CHECK(same_bytes(reply, *expected));
                const auto message = payload.subspan(auth::challenge_tag.size());
                FUZZ_CHECK(auth::verify_response(key, message, *reply));
                FUZZ_CHECK(hs.current() == auth::handshake::state::running);
            }
        } else {  // awaiting the peer's verdict
            if (equals_text(payload, auth::welcome)) {
                if (server) {
                    FUZZ_CHECK(!reply && hs.current() == auth::handshake::state::succeeded);
                    succeeded = true;
                } else {
                    FUZZ_CHECK(reply && *reply == own_challenge);
                    FUZZ_CHECK(hs.current() == auth::handshake::state::running);
                }
            } else {
                FUZZ_CHECK(!reply && hs.current() == auth::handshake::state::failed);
                FUZZ_CHECK(hs.error() == (equals_text(payload, auth::failure)
                                              ? steward::errc::authentication_failed
                                              : steward::errc::malformed_message));
            }
        }
        ++step;
        FUZZ_CHECK((hs.current() == auth::handshake::state::failed) == static_cast<bool>(hs.error()));
    }
    return hs.current() == auth::handshake::state::succeeded;
}

}  // namespace

// The entry point libFuzzer calls, by that name.
// NOLINTNEXTLINE(readability-identifier-naming)
extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
    if (size == 0) return 0;
    const auto role = (data[0] & 1) ? auth::handshake::role::client : auth::handshake::role::server;
    const auto stream = as_bytes(data + 1, size - 1);
    // The seeds are built for the key 00..1f; the same bytes against a side holding another key
    // must fail where the model (holding that other key) says so, never get further.
    run(role, make_key(0x00), stream);
    run(role, make_key(0x01), stream);
    // The raw stream as one pickle, for inputs that never form a frame.
    check_pickle(stream);
    return 0;
}
