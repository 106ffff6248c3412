#include "sharer/quick_connect.hpp"

#include <steward/error.hpp>

#include "sharer/sharer_wire.hpp"

#include <openssl/crypto.h>
#include <openssl/evp.h>
#include <openssl/hmac.h>
#include <unistd.h>

#include <atomic>
#include <cstring>
#include <string_view>

namespace steward::detail::quick {
namespace {

constexpr std::string_view client_context = "steward quick v2 client";
constexpr std::string_view server_context = "steward quick v2 server";

using mac_bytes = std::array<std::byte, mac_size>;

// HMAC-SHA256(key, a || b || c); false if libcrypto refuses.
bool mac_of(const authkey& key, std::string_view a, std::span<const std::byte> b, std::span<const std::byte> c,
            mac_bytes& out) noexcept {
    std::array<unsigned char, 256> message{};
    const std::size_t n = a.size() + b.size() + c.size();
    if (n > message.size()) return false;
    std::memcpy(message.data(), a.data(), a.size());
    if (!b.empty()) std::memcpy(message.data() + a.size(), b.data(), b.size());
    if (!c.empty()) std::memcpy(message.data() + a.size() + b.size(), c.data(), c.size());
    unsigned int len = 0;
    const bool ok = ::HMAC(EVP_sha256(), key.bytes.data(), static_cast<int>(key.bytes.size()), message.data(), n,
                           reinterpret_cast<unsigned char*>(out.data()), &len) != nullptr &&
                    len == mac_size;
    OPENSSL_cleanse(message.data(), n);
    return ok;
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

bool peer_allows_quick(uid_t server_uid) noexcept {
    if (const long long forced = uid_override.load(std::memory_order_relaxed); forced >= 0)
        server_uid = static_cast<uid_t>(forced);
    return server_uid == ::getuid() || server_uid == ::geteuid() || server_uid == 0;
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
