#include "sharer/quick_connect.hpp"

#include <steward/error.hpp>

#include "sharer/framing.hpp"
#include "sharer/handshake.hpp"
#include "sharer/sharer_wire.hpp"

#include <openssl/crypto.h>
#include <openssl/evp.h>
#include <openssl/core_names.h>
#include <openssl/params.h>
#include <unistd.h>

#include <atomic>
#include <cstring>
#include <string_view>
#include <variant>

namespace steward::detail::quick {
namespace {

constexpr std::string_view client_context = "steward quick v2 client";
constexpr std::string_view server_context = "steward quick v2 server";

using mac_bytes = std::array<std::byte, mac_size>;

// One HMAC-SHA256 context per thread, its digest fetched once: the one-shot HMAC() looks the
// algorithms up again on every call, which costs more than the MAC itself here.
struct mac_context {
    EVP_MAC* mac = nullptr;
    EVP_MAC_CTX* ctx = nullptr;
    mac_context() {
        mac = EVP_MAC_fetch(nullptr, "HMAC", nullptr);
        if (mac) ctx = EVP_MAC_CTX_new(mac);
        if (ctx) {
            char digest[] = "SHA256";
            const OSSL_PARAM params[] = {OSSL_PARAM_construct_utf8_string("digest", digest, 0), OSSL_PARAM_END};
            if (EVP_MAC_CTX_set_params(ctx, params) != 1) {
                EVP_MAC_CTX_free(ctx);
                ctx = nullptr;
            }
        }
    }
    ~mac_context() {
        EVP_MAC_CTX_free(ctx);
        EVP_MAC_free(mac);
    }
    mac_context(const mac_context&) = delete;
    mac_context& operator=(const mac_context&) = delete;
};

// HMAC-SHA256(key, a || b || c); false if libcrypto refuses.
bool mac_of(const authkey& key, std::string_view a, std::span<const std::byte> b, std::span<const std::byte> c,
            mac_bytes& out) noexcept {
    thread_local mac_context m;
    if (!m.ctx) return false;
    std::size_t len = 0;
    const auto bytes = [](std::span<const std::byte> s) { return reinterpret_cast<const unsigned char*>(s.data()); };
    return EVP_MAC_init(m.ctx, reinterpret_cast<const unsigned char*>(key.bytes.data()), key.bytes.size(), nullptr) == 1 &&
           EVP_MAC_update(m.ctx, reinterpret_cast<const unsigned char*>(a.data()), a.size()) == 1 &&
           (b.empty() || EVP_MAC_update(m.ctx, bytes(b), b.size()) == 1) &&
           (c.empty() || EVP_MAC_update(m.ctx, bytes(c), c.size()) == 1) &&
           EVP_MAC_final(m.ctx, reinterpret_cast<unsigned char*>(out.data()), &len, out.size()) == 1 &&
           len == mac_size;
}

bool has_prefix(std::span<const std::byte> payload, std::uint8_t type) noexcept {
    return payload.size() >= 5 && payload[0] == std::byte{type} &&
           std::memcmp(payload.data() + 1, native::magic.data(), native::magic.size()) == 0;
}

std::atomic<long long> uid_override{-1};

}  // namespace

bool is_request(std::span<const std::byte> payload) noexcept { return has_prefix(payload, quick_type); }
bool is_ack(std::span<const std::byte> payload) noexcept { return has_prefix(payload, quick_ack_type); }

void append_request_frame(std::vector<std::byte>& out, const authkey& key, const request& r) {
    const std::size_t size = r.first_fetch ? request_size_with_fetch : request_size_without_fetch;
    const std::size_t at = out.size();
    out.resize(at + 4 + size);
    std::byte* const payload = out.data() + at + 4;
    wire::put_be<std::uint32_t>(out.data() + at, static_cast<std::uint32_t>(size));
    std::byte* p = wire::put_u8(payload, quick_type);
    std::memcpy(p, native::magic.data(), native::magic.size());
    p += native::magic.size();
    p = wire::put_be(p, r.min_version);
    p = wire::put_be(p, r.max_version);
    p = wire::put_be(p, r.flags);
    std::memcpy(p, r.client_nonce.data(), nonce_size);
    p += nonce_size;
    p = wire::put_u8(p, r.first_fetch ? 1 : 0);
    if (r.first_fetch) {
        p = wire::put_be(p, r.first_fetch->request_id);
        p = wire::put_be(p, r.first_fetch->key.high);
        p = wire::put_be(p, r.first_fetch->key.low);
    }
    mac_bytes mac{};
    if (!mac_of(key, client_context, {payload, static_cast<std::size_t>(p - payload)}, {}, mac))
        throw std::system_error(make_error_code(errc::authentication_failed), "HMAC-SHA256");
    std::memcpy(p, mac.data(), mac_size);
}

request decode_request(const authkey& key, std::span<const std::byte> payload, std::error_code& ec) noexcept {
    ec.clear();
    request r;
    if (!is_request(payload) ||
        (payload.size() != request_size_without_fetch && payload.size() != request_size_with_fetch)) {
        ec = errc::malformed_message;
        return {};
    }
    const std::byte* p = payload.data() + 5;
    r.min_version = wire::get_be<std::uint16_t>(p);
    r.max_version = wire::get_be<std::uint16_t>(p + 2);
    r.flags = wire::get_be<std::uint32_t>(p + 4);
    std::memcpy(r.client_nonce.data(), p + 8, nonce_size);
    p += 8 + nonce_size;
    const auto has_fetch = std::to_integer<std::uint8_t>(*p++);
    if (has_fetch > 1 || (has_fetch == 1) != (payload.size() == request_size_with_fetch) ||
        r.min_version < 1 || r.max_version < r.min_version) {
        ec = errc::malformed_message;
        return {};
    }
    if (has_fetch) {
        native::fetch f;
        f.request_id = wire::get_be<std::uint64_t>(p);
        f.key.high = wire::get_be<std::uint64_t>(p + 8);
        f.key.low = wire::get_be<std::uint64_t>(p + 16);
        p += 24;
        if (f.request_id == 0) {
            ec = errc::malformed_message;
            return {};
        }
        r.first_fetch = f;
    }
    mac_bytes expected{};
    const auto signed_part = payload.first(payload.size() - mac_size);
    if (!mac_of(key, client_context, signed_part, {}, expected) ||
        CRYPTO_memcmp(expected.data(), payload.data() + signed_part.size(), mac_size) != 0) {
        ec = errc::authentication_failed;
        return {};
    }
    return r;
}

void append_ack_frame(std::vector<std::byte>& out, const authkey& key, const nonce& client_nonce,
                      const native::hello_ack& ack) {
    const std::size_t at = out.size();
    out.resize(at + 4 + ack_size);
    std::byte* const payload = out.data() + at + 4;
    wire::put_be<std::uint32_t>(out.data() + at, static_cast<std::uint32_t>(ack_size));
    std::byte* p = wire::put_u8(payload, quick_ack_type);
    std::memcpy(p, native::magic.data(), native::magic.size());
    p += native::magic.size();
    p = wire::put_be(p, ack.version);
    p = wire::put_be(p, ack.max_in_flight);
    p = wire::put_be(p, ack.max_payload);
    mac_bytes mac{};
    if (!mac_of(key, server_context, client_nonce, {payload, static_cast<std::size_t>(p - payload)}, mac))
        throw std::system_error(make_error_code(errc::authentication_failed), "HMAC-SHA256");
    std::memcpy(p, mac.data(), mac_size);
}

native::hello_ack decode_ack(const authkey& key, const nonce& client_nonce, std::span<const std::byte> payload,
                             std::error_code& ec) noexcept {
    ec.clear();
    if (!is_ack(payload) || payload.size() != ack_size) {
        ec = errc::malformed_message;
        return {};
    }
    mac_bytes expected{};
    const auto signed_part = payload.first(payload.size() - mac_size);
    if (!mac_of(key, server_context, client_nonce, signed_part, expected) ||
        CRYPTO_memcmp(expected.data(), payload.data() + signed_part.size(), mac_size) != 0) {
        ec = errc::authentication_failed;
        return {};
    }
    native::hello_ack ack;
    const std::byte* p = payload.data() + 5;
    ack.version = wire::get_be<std::uint16_t>(p);
    ack.max_in_flight = wire::get_be<std::uint32_t>(p + 2);
    ack.max_payload = wire::get_be<std::uint32_t>(p + 6);
    if (ack.version < 2 || ack.max_in_flight == 0) {
        ec = errc::malformed_message;
        return {};
    }
    return ack;
}

ack_reader::state ack_reader::feed(std::span<const std::byte> bytes) {
    if (state_ != state::need_more) return state_;
    buffer_.insert(buffer_.end(), bytes.begin(), bytes.end());
    auto fail = [this](std::error_code ec) {
        error_ = ec;
        state_ = state::failed;
        return state_;
    };
    for (;;) {
        const auto have = std::span<const std::byte>(buffer_).subspan(consumed_);
        // Nothing before QUICK_ACK is longer than a challenge (256 bytes of payload).
        const framing::frame_probe probe = framing::probe_frame(have, framing::handshake_max_payload);
        if (probe.status == framing::frame_status::too_large) return fail(make_error_code(errc::limit_exceeded));
        if (probe.status == framing::frame_status::malformed) return fail(make_error_code(errc::malformed_message));
        if (probe.status == framing::frame_status::need_more) return state_;
        const auto payload = have.subspan(probe.header_size, static_cast<std::size_t>(probe.payload_size));
        consumed_ += static_cast<std::size_t>(probe.total_size());
        if (is_ack(payload)) {
            std::error_code ec;
            ack_ = decode_ack(key_, nonce_, payload, ec);
            if (ec) return fail(ec);
            state_ = state::acked;
            return state_;
        }
        const std::string_view challenge = auth::challenge_tag;
        if (!skipped_challenge_ && payload.size() >= challenge.size() &&
            std::memcmp(payload.data(), challenge.data(), challenge.size()) == 0) {
            skipped_challenge_ = true;
            continue;
        }
        std::error_code ec;
        const native::message m = native::decode(payload, ec);
        if (const auto* e = std::get_if<native::error>(&m); e && !ec) {
            if (static_cast<std::uint16_t>(e->code) == error_authentication_failed)
                return fail(make_error_code(errc::authentication_failed));
            if (e->code == native::error_code_value::limit_exceeded)
                return fail(make_error_code(errc::limit_exceeded));
            return fail(std::make_error_code(std::errc::connection_reset));
        }
        // #FAILURE#: a server that took the QUICK for the answer to its challenge refused it.
        const std::string_view failure = auth::failure;
        if (payload.size() == failure.size() && std::memcmp(payload.data(), failure.data(), failure.size()) == 0)
            return fail(make_error_code(errc::authentication_failed));
        return fail(make_error_code(errc::malformed_message));
    }
}

bool peer_allows_quick(uid_t server_uid) noexcept {
    if (const long long forced = uid_override.load(std::memory_order_relaxed); forced >= 0)
        server_uid = static_cast<uid_t>(forced);
    return server_uid == 0 || server_uid == ::getuid() || server_uid == ::geteuid();
}

void set_peer_uid_override_for_tests(std::optional<uid_t> uid) noexcept {
    uid_override.store(uid ? static_cast<long long>(*uid) : -1, std::memory_order_relaxed);
}

std::optional<uid_t> peer_uid_override_for_tests() noexcept {
    const long long v = uid_override.load(std::memory_order_relaxed);
    if (v < 0) return std::nullopt;
    return static_cast<uid_t>(v);
}

}  // namespace steward::detail::quick
