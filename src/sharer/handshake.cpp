#include "sharer/handshake.hpp"

#include <steward/error.hpp>

#include "sharer/random.hpp"

#include <openssl/crypto.h>
#include <openssl/evp.h>
#include <openssl/hmac.h>

#include <algorithm>

namespace steward::detail::auth {
namespace {

// CPython's _MAX_DIGEST_LEN: the longest allowed name ("sha3_256").
constexpr std::size_t max_digest_name = 8;

std::span<const std::byte> as_bytes(std::string_view s) noexcept {
    return std::as_bytes(std::span<const char>(s.data(), s.size()));
}

bool starts_with(std::span<const std::byte> data, std::string_view prefix) noexcept {
    const auto p = as_bytes(prefix);
    return data.size() >= p.size() && std::equal(p.begin(), p.end(), data.begin());
}

bool equals(std::span<const std::byte> data, std::string_view text) noexcept {
    return data.size() == text.size() && starts_with(data, text);
}

const EVP_MD* evp(digest d) noexcept {
    switch (d) {
        case digest::md5:
            return EVP_md5();
        case digest::sha256:
            return EVP_sha256();
        case digest::sha384:
            return EVP_sha384();
        case digest::sha3_256:
            return EVP_sha3_256();
        case digest::sha3_384:
            return EVP_sha3_384();
    }
    return nullptr;
}

// `{name}` at the start of @p message: the digest and the prefix length, as CPython's
// _get_digest_name_and_payload finds it (the '}' within the first max_digest_name + 2 bytes).
std::optional<std::pair<digest, std::size_t>> digest_prefix(std::span<const std::byte> message) noexcept {
    if (message.empty() || message[0] != std::byte{'{'}) return std::nullopt;
    const std::size_t limit = std::min(message.size(), max_digest_name + 2);
    for (std::size_t i = 1; i < limit; ++i) {
        if (message[i] != std::byte{'}'}) continue;
        const std::string_view name(reinterpret_cast<const char*>(message.data()) + 1, i - 1);
        if (const auto d = digest_from_name(name)) return std::pair{*d, i + 1};
        return std::nullopt;
    }
    return std::nullopt;
}

void append(std::vector<std::byte>& out, std::string_view s) {
    const auto b = as_bytes(s);
    out.insert(out.end(), b.begin(), b.end());
}

std::vector<std::byte> text_payload(std::string_view s) {
    std::vector<std::byte> out;
    append(out, s);
    return out;
}

}  // namespace

std::optional<digest> digest_from_name(std::string_view name) noexcept {
    if (name == "md5") return digest::md5;
    if (name == "sha256") return digest::sha256;
    if (name == "sha384") return digest::sha384;
    if (name == "sha3_256") return digest::sha3_256;
    if (name == "sha3_384") return digest::sha3_384;
    return std::nullopt;
}

std::string_view digest_name(digest d) noexcept {
    switch (d) {
        case digest::md5:
            return "md5";
        case digest::sha256:
            return "sha256";
        case digest::sha384:
            return "sha384";
        case digest::sha3_256:
            return "sha3_256";
        case digest::sha3_384:
            return "sha3_384";
    }
    return {};
}

std::vector<std::byte> hmac(digest d, std::span<const std::byte> key, std::span<const std::byte> message,
                            std::error_code& ec) {
    ec.clear();
    std::vector<std::byte> out(EVP_MAX_MD_SIZE);
    unsigned len = 0;
    // An empty message still needs a non-null pointer for some libcrypto versions.
    static const unsigned char empty = 0;
    const auto* data = message.empty() ? &empty : reinterpret_cast<const unsigned char*>(message.data());
    if (!::HMAC(evp(d), key.data(), static_cast<int>(key.size()), data, message.size(),
                reinterpret_cast<unsigned char*>(out.data()), &len)) {
        ec = errc::authentication_failed;  // the digest is unavailable here (FIPS without MD5)
        return {};
    }
    out.resize(len);
    return out;
}

std::vector<std::byte> make_challenge(std::span<const std::byte, nonce_size> nonce) {
    std::vector<std::byte> out;
    out.reserve(challenge_tag.size() + 8 + nonce_size);
    append(out, challenge_tag);
    append(out, "{sha256}");
    out.insert(out.end(), nonce.begin(), nonce.end());
    return out;
}

std::vector<std::byte> answer_challenge(const authkey& key, std::span<const std::byte> challenge,
                                        std::error_code& ec) {
    if (!starts_with(challenge, challenge_tag)) {
        ec = errc::malformed_message;
        return {};
    }
    const auto message = challenge.subspan(challenge_tag.size());
    if (message.size() < legacy_challenge_size) {
        ec = errc::malformed_message;
        return {};
    }
    if (message.size() == legacy_challenge_size) return hmac(digest::md5, key.bytes, message, ec);
    const auto prefix = digest_prefix(message);
    if (!prefix) {
        ec = errc::malformed_message;
        return {};
    }
    // Answer with the digest the challenge names; CPython's server verifies with whatever digest
    // the answer names, so this is accepted by every version (CPython's own client always picks
    // sha256, which our servers name anyway).
    std::vector<std::byte> mac = hmac(prefix->first, key.bytes, message, ec);
    if (ec) return {};
    std::vector<std::byte> out;
    out.reserve(prefix->second + mac.size());
    out.insert(out.end(), message.begin(), message.begin() + static_cast<std::ptrdiff_t>(prefix->second));
    out.insert(out.end(), mac.begin(), mac.end());
    return out;
}

bool verify_response(const authkey& key, std::span<const std::byte> message,
                     std::span<const std::byte> response) noexcept {
    try {
        digest d = digest::md5;
        std::span<const std::byte> mac = response;
        if (response.size() != md5_size && response.size() != legacy_challenge_size) {
            const auto prefix = digest_prefix(response);
            if (!prefix) return false;
            d = prefix->first;
            mac = response.subspan(prefix->second);
        }
        std::error_code ec;
        const std::vector<std::byte> expected = hmac(d, key.bytes, message, ec);
        if (ec || expected.size() != mac.size()) return false;
        return CRYPTO_memcmp(expected.data(), mac.data(), mac.size()) == 0;
    } catch (...) {
        return false;
    }
}

// ---- state machine ---------------------------------------------------------------------------

handshake::handshake(role r, const authkey& key) : role_(r), key_(key) {
    std::array<std::byte, nonce_size> nonce;
    fill_random_buffered(nonce);
    challenge_ = make_challenge(nonce);
}

handshake::handshake(role r, const authkey& key, std::span<const std::byte, nonce_size> nonce)
    : role_(r), key_(key), challenge_(make_challenge(nonce)) {}

handshake::~handshake() {
    OPENSSL_cleanse(key_.bytes.data(), key_.bytes.size());
}

std::optional<std::vector<std::byte>> handshake::start() {
    if (step_ != step::start) return fail(errc::malformed_message, false);
    if (role_ == role::server) {
        step_ = step::await_response;
        return challenge_;
    }
    step_ = step::await_challenge;
    return std::nullopt;
}

std::optional<std::vector<std::byte>> handshake::fail(std::error_code ec, bool send_failure) {
    state_ = state::failed;
    error_ = ec;
    if (send_failure) return text_payload(failure);
    return std::nullopt;
}

std::optional<std::vector<std::byte>> handshake::check_response(std::span<const std::byte> payload) {
    const auto message = std::span<const std::byte>(challenge_).subspan(challenge_tag.size());
    if (!verify_response(key_, message, payload)) return fail(errc::authentication_failed, true);
    if (role_ == role::server) {
        step_ = step::await_peer_challenge;
    } else {
        state_ = state::succeeded;
    }
    return text_payload(welcome);
}

std::optional<std::vector<std::byte>> handshake::answer(std::span<const std::byte> payload) {
    std::error_code ec;
    std::vector<std::byte> response = answer_challenge(key_, payload, ec);
    if (ec) return fail(ec, false);
    step_ = step::await_welcome;
    return response;
}

std::optional<std::vector<std::byte>> handshake::on_frame(std::span<const std::byte> payload) {
    if (state_ != state::running) return std::nullopt;
    switch (step_) {
        case step::start:
            return fail(errc::malformed_message, false);
        case step::await_response:
            return check_response(payload);
        case step::await_peer_challenge:
        case step::await_challenge:
            return answer(payload);
        case step::await_welcome:
            if (!equals(payload, welcome))
                return fail(equals(payload, failure) ? errc::authentication_failed : errc::malformed_message,
                            false);
            if (role_ == role::server) {
                state_ = state::succeeded;
                return std::nullopt;
            }
            step_ = step::await_response;
            return challenge_;
    }
    return fail(errc::malformed_message, false);
}

}  // namespace steward::detail::auth
