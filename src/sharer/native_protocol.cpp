#include "sharer/native_protocol.hpp"

#include <steward/error.hpp>

#include "sharer/framing.hpp"

// HMAC-SHA256 of quick connect is built on SHA256_Init/Update/Final, deprecated since OpenSSL 3.0
// but kept throughout 3.x: they hash from a copied state with no allocation, no provider lookup and
// a fraction of the code the EVP_MAC path runs per MAC (see quick_mac_key).
#define OPENSSL_SUPPRESS_DEPRECATED
#include <openssl/crypto.h>
#include <openssl/sha.h>

#include <algorithm>
#include <cstring>
#include <stdexcept>
#include <string_view>

namespace steward::detail::native {
namespace {

// Appends to a caller's buffer, so a frame can be written in place behind its header.
class writer {
public:
    writer(std::vector<std::byte>& out, msg_type t) : out_(out) { u8(static_cast<std::uint8_t>(t)); }
    void u8(std::uint8_t v) { out_.push_back(static_cast<std::byte>(v)); }
    void u16(std::uint16_t v) { be(v, 2); }
    void u32(std::uint32_t v) { be(v, 4); }
    void u64(std::uint64_t v) { be(v, 8); }
    void bytes(std::span<const std::byte> b) { out_.insert(out_.end(), b.begin(), b.end()); }

private:
    void be(std::uint64_t v, int n) {
        for (int i = n - 1; i >= 0; --i) out_.push_back(static_cast<std::byte>((v >> (8 * i)) & 0xff));
    }
    std::vector<std::byte>& out_;
};

class reader {
public:
    explicit reader(std::span<const std::byte> data) : data_(data) {}
    bool u8(std::uint8_t& v) { return be(v, 1); }
    bool u16(std::uint16_t& v) { return be(v, 2); }
    bool u32(std::uint32_t& v) { return be(v, 4); }
    bool u64(std::uint64_t& v) { return be(v, 8); }
    bool bytes(std::size_t n, std::span<const std::byte>& out) {
        if (data_.size() - pos_ < n) return false;
        out = data_.subspan(pos_, n);
        pos_ += n;
        return true;
    }
    [[nodiscard]] bool at_end() const { return pos_ == data_.size(); }
    [[nodiscard]] std::size_t remaining() const { return data_.size() - pos_; }

private:
    template <typename T>
    bool be(T& v, std::size_t n) {
        if (data_.size() - pos_ < n) return false;
        std::uint64_t x = 0;
        for (std::size_t i = 0; i < n; ++i) x = (x << 8) | std::to_integer<std::uint64_t>(data_[pos_ + i]);
        pos_ += n;
        v = static_cast<T>(x);
        return true;
    }
    std::span<const std::byte> data_;
    std::size_t pos_ = 0;
};

bool valid_reply(const reply& r) noexcept {
    if (r.request_id == 0) return false;
    switch (r.status) {
        case reply_status::ok:
            return r.total_fds >= 1 && r.part_count == part_count_for(r.total_fds) &&
                   r.part_index < r.part_count && r.part_fds == part_fds_for(r.total_fds, r.part_index);
        case reply_status::not_available:
        case reply_status::busy:
        case reply_status::server_error:
            return r.total_fds == 0 && r.part_fds == 0 && r.part_index == 0 && r.part_count == 1;
    }
    return false;
}

}  // namespace

first_frame_kind classify_first_frame(std::span<const std::byte> payload) noexcept {
    if (!payload.empty() && payload[0] == std::byte{0x80}) return first_frame_kind::cpython_pickle;
    if (payload.size() < 1 + magic.size() || !std::equal(magic.begin(), magic.end(), payload.begin() + 1))
        return first_frame_kind::unknown;
    if (payload[0] == static_cast<std::byte>(msg_type::hello)) return first_frame_kind::native_hello;
    if (payload[0] == static_cast<std::byte>(msg_type::quick)) return first_frame_kind::native_quick;
    return first_frame_kind::unknown;
}

std::uint32_t part_count_for(std::uint32_t total_fds) noexcept {
    if (total_fds == 0) return 1;
    return (total_fds - 1) / max_fds_per_part + 1;
}

std::uint16_t part_fds_for(std::uint32_t total_fds, std::uint32_t index) noexcept {
    const std::uint64_t start = std::uint64_t{index} * max_fds_per_part;
    if (start >= total_fds) return 0;
    return static_cast<std::uint16_t>(std::min<std::uint64_t>(max_fds_per_part, total_fds - start));
}

std::vector<reply> split_reply(std::uint64_t request_id, std::uint32_t total_fds) {
    if (total_fds == 0) throw std::invalid_argument("a successful reply carries at least one descriptor");
    const std::uint32_t count = part_count_for(total_fds);
    std::vector<reply> parts;
    parts.reserve(count);
    for (std::uint32_t i = 0; i < count; ++i)
        parts.push_back(reply{.request_id = request_id,
                              .status = reply_status::ok,
                              .part_fds = part_fds_for(total_fds, i),
                              .total_fds = total_fds,
                              .part_index = i,
                              .part_count = count});
    return parts;
}

reply failure_reply(std::uint64_t request_id, reply_status status) noexcept {
    return reply{.request_id = request_id,
                 .status = status,
                 .part_fds = 0,
                 .total_fds = 0,
                 .part_index = 0,
                 .part_count = 1};
}

namespace {

// Appends the payload of @p m to @p out.
void encode_into(std::vector<std::byte>& out, const message& m) {
    struct visitor {
        std::vector<std::byte>& out;
        void operator()(const hello& h) const {
            writer w(out, msg_type::hello);
            w.bytes(magic);
            w.u16(h.min_version);
            w.u16(h.max_version);
            w.u32(h.flags);
        }
        void operator()(const hello_ack& h) const {
            writer w(out, msg_type::hello_ack);
            w.bytes(magic);
            w.u16(h.version);
            w.u32(h.max_in_flight);
            w.u32(h.max_payload);
        }
        void operator()(const fetch& f) const {
            writer w(out, msg_type::fetch);
            w.u64(f.request_id);
            w.u64(f.key.high);
            w.u64(f.key.low);
        }
        void operator()(const reply& r) const {
            writer w(out, msg_type::reply);
            w.u64(r.request_id);
            w.u8(static_cast<std::uint8_t>(r.status));
            w.u16(r.part_fds);
            w.u32(r.total_fds);
            w.u32(r.part_index);
            w.u32(r.part_count);
        }
        void operator()(const confirm& c) const {
            if (c.ids.size() > max_confirm_ids) throw std::length_error("CONFIRM lists too many ids");
            writer w(out, msg_type::confirm);
            w.u64(c.up_to);
            w.u32(static_cast<std::uint32_t>(c.ids.size()));
            for (std::uint64_t id : c.ids) w.u64(id);
        }
        void operator()(const give_back& g) const {
            writer w(out, msg_type::give_back);
            w.u64(g.request_id);
            w.u8(static_cast<std::uint8_t>(g.reason));
        }
        void operator()(const error& e) const {
            if (e.text.size() > max_error_text) throw std::length_error("ERROR text longer than 256 bytes");
            writer w(out, msg_type::error);
            w.u16(static_cast<std::uint16_t>(e.code));
            w.u16(static_cast<std::uint16_t>(e.text.size()));
            w.bytes(std::as_bytes(std::span<const char>(e.text.data(), e.text.size())));
        }
    };
    std::visit(visitor{out}, m);
}

// Every native payload is far below 2^31, so the header is always the 4-byte form: reserve it,
// write the payload behind it, then fill it in.
std::size_t begin_frame(std::vector<std::byte>& out) {
    const std::size_t at = out.size();
    out.resize(at + 4);
    return at;
}

void end_frame(std::vector<std::byte>& out, std::size_t at) {
    const std::uint64_t size = out.size() - at - 4;
    for (int i = 0; i < 4; ++i)
        out[at + static_cast<std::size_t>(i)] = static_cast<std::byte>((size >> (8 * (3 - i))) & 0xff);
}

}  // namespace

std::vector<std::byte> encode(const message& m) {
    std::vector<std::byte> out;
    // Room for every fixed-size message at once (and no growth from one byte: GCC 12 then also
    // stops warning about copies past that first byte, -Warray-bounds).
    out.reserve(64);
    encode_into(out, m);
    return out;
}

void append_frame(std::vector<std::byte>& out, const message& m) {
    const std::size_t size_before = out.size();
    try {
        const std::size_t at = begin_frame(out);
        encode_into(out, m);
        end_frame(out, at);
    } catch (...) {
        out.resize(size_before);  // nothing half-written stays behind
        throw;
    }
}

message decode(std::span<const std::byte> payload, std::error_code& ec, const char** why) noexcept {
    ec.clear();
    auto fail = [&](const char* reason) -> message {
        ec = errc::malformed_message;
        if (why) *why = reason;
        return hello{};
    };
    if (payload.size() > max_payload) return fail("native: payload above the limit");
    reader r(payload);
    std::uint8_t type = 0;
    if (!r.u8(type)) return fail("native: empty payload");
    auto check_magic = [&] {
        std::span<const std::byte> m;
        return r.bytes(magic.size(), m) && std::equal(m.begin(), m.end(), magic.begin());
    };
    try {
        switch (static_cast<msg_type>(type)) {
            case msg_type::hello: {
                hello h;
                if (!check_magic()) return fail("native: HELLO without the magic");
                if (!r.u16(h.min_version) || !r.u16(h.max_version) || !r.u32(h.flags) || !r.at_end())
                    return fail("native: HELLO has the wrong size");
                if (h.min_version == 0 || h.min_version > h.max_version)
                    return fail("native: HELLO version range");
                return h;
            }
            case msg_type::hello_ack: {
                hello_ack h;
                if (!check_magic()) return fail("native: HELLO_ACK without the magic");
                if (!r.u16(h.version) || !r.u32(h.max_in_flight) || !r.u32(h.max_payload) || !r.at_end())
                    return fail("native: HELLO_ACK has the wrong size");
                if (h.version == 0 || h.max_in_flight == 0) return fail("native: HELLO_ACK values");
                return h;
            }
            case msg_type::fetch: {
                fetch f;
                if (!r.u64(f.request_id) || !r.u64(f.key.high) || !r.u64(f.key.low) || !r.at_end())
                    return fail("native: FETCH has the wrong size");
                if (f.request_id == 0) return fail("native: request id 0");
                return f;
            }
            case msg_type::reply: {
                reply p;
                std::uint8_t status = 0;
                if (!r.u64(p.request_id) || !r.u8(status) || !r.u16(p.part_fds) || !r.u32(p.total_fds) ||
                    !r.u32(p.part_index) || !r.u32(p.part_count) || !r.at_end())
                    return fail("native: REPLY has the wrong size");
                p.status = static_cast<reply_status>(status);
                if (!valid_reply(p)) return fail("native: REPLY fields are inconsistent");
                return p;
            }
            case msg_type::confirm: {
                confirm c;
                std::uint32_t n = 0;
                if (!r.u64(c.up_to) || !r.u32(n)) return fail("native: CONFIRM truncated");
                if (n > max_confirm_ids || r.remaining() != std::size_t{n} * 8)
                    return fail("native: CONFIRM count does not match its size");
                c.ids.resize(n);
                for (auto& id : c.ids) {
                    if (!r.u64(id) || id == 0) return fail("native: CONFIRM id 0");
                }
                return c;
            }
            case msg_type::give_back: {
                give_back g;
                std::uint8_t reason = 0;
                if (!r.u64(g.request_id) || !r.u8(reason) || !r.at_end())
                    return fail("native: GIVE_BACK has the wrong size");
                if (g.request_id == 0 || reason > static_cast<std::uint8_t>(give_back_reason::other))
                    return fail("native: GIVE_BACK values");
                g.reason = static_cast<give_back_reason>(reason);
                return g;
            }
            case msg_type::quick:
                return fail("native: QUICK is only valid as the first frame (decode_quick)");
            case msg_type::quick_ack:
                return fail("native: QUICK_ACK is only valid as the server's first frame (decode_quick_ack)");
            case msg_type::error: {
                error e;
                std::uint16_t code = 0, len = 0;
                std::span<const std::byte> text;
                if (!r.u16(code) || !r.u16(len)) return fail("native: ERROR truncated");
                if (len > max_error_text || !r.bytes(len, text) || !r.at_end())
                    return fail("native: ERROR length does not match its size");
                e.code = static_cast<error_code_value>(code);
                e.text.assign(reinterpret_cast<const char*>(text.data()), text.size());
                return e;
            }
        }
    } catch (const std::bad_alloc&) {
        ec = std::make_error_code(std::errc::not_enough_memory);
        return hello{};
    }
    return fail("native: unknown message type");
}

// ---- version 2: quick connect ----------------------------------------------------------------

namespace {

std::span<const std::byte> as_span(std::string_view s) noexcept {
    return std::as_bytes(std::span<const char>(s.data(), s.size()));
}

const quick_mac_key& cached_key(const authkey& key) {
    thread_local std::optional<quick_mac_key> cache;
    if (!cache || !cache->is_for(key)) cache.emplace(key);
    return *cache;
}

[[noreturn]] void throw_crypto() {
    throw std::system_error(make_error_code(errc::authentication_failed),
                            "HMAC-SHA256 unavailable in libcrypto");
}

bool has_type_and_magic(std::span<const std::byte> payload, msg_type t) noexcept {
    return payload.size() >= 1 + magic.size() && payload[0] == static_cast<std::byte>(t) &&
           std::equal(magic.begin(), magic.end(), payload.begin() + 1);
}

bool verify_mac(const quick_mac_bytes& expected, std::span<const std::byte> payload) noexcept {
    return CRYPTO_memcmp(expected.data(), payload.data() + payload.size() - quick_mac_size, quick_mac_size) ==
           0;
}

}  // namespace

quick_mac_key::quick_mac_key(const authkey& key) {
    static_assert(sizeof(SHA256_CTX) == sha256_state_size);
    // HMAC (RFC 2104) with a 32-byte key: the key padded to one 64-byte block, xor ipad / opad.
    std::array<unsigned char, 64> pad{};
    SHA256_CTX inner;
    SHA256_CTX outer;
    std::memcpy(pad.data(), key.bytes.data(), key.bytes.size());
    for (auto& c : pad) c ^= 0x36;
    bool ok = SHA256_Init(&inner) == 1 && SHA256_Update(&inner, pad.data(), pad.size()) == 1;
    for (auto& c : pad) c ^= 0x36 ^ 0x5c;
    ok = ok && SHA256_Init(&outer) == 1 && SHA256_Update(&outer, pad.data(), pad.size()) == 1;
    std::memcpy(inner_.data(), &inner, sizeof inner);
    std::memcpy(outer_.data(), &outer, sizeof outer);
    OPENSSL_cleanse(pad.data(), pad.size());
    OPENSSL_cleanse(&inner, sizeof inner);
    OPENSSL_cleanse(&outer, sizeof outer);
    if (!ok) {
        wipe();
        throw_crypto();
    }
    ready_ = true;
    key_ = key.bytes;
}

quick_mac_key::quick_mac_key(quick_mac_key&& other) noexcept
    : inner_(other.inner_), outer_(other.outer_), ready_(other.ready_), key_(other.key_) {
    other.wipe();
}

quick_mac_key& quick_mac_key::operator=(quick_mac_key&& other) noexcept {
    if (this != &other) {
        inner_ = other.inner_;
        outer_ = other.outer_;
        ready_ = other.ready_;
        key_ = other.key_;
        other.wipe();
    }
    return *this;
}

quick_mac_key::~quick_mac_key() {
    wipe();
}

void quick_mac_key::wipe() noexcept {
    OPENSSL_cleanse(inner_.data(), inner_.size());
    OPENSSL_cleanse(outer_.data(), outer_.size());
    OPENSSL_cleanse(key_.data(), key_.size());
    ready_ = false;
}

bool quick_mac_key::compute(std::span<const std::byte> a, std::span<const std::byte> b,
                            std::span<const std::byte> c, quick_mac_bytes& out) const noexcept {
    if (!ready_) return false;
    SHA256_CTX ctx;
    std::memcpy(&ctx, inner_.data(), sizeof ctx);
    std::array<unsigned char, SHA256_DIGEST_LENGTH> inner_hash;
    bool ok = (a.empty() || SHA256_Update(&ctx, a.data(), a.size()) == 1) &&
              (b.empty() || SHA256_Update(&ctx, b.data(), b.size()) == 1) &&
              (c.empty() || SHA256_Update(&ctx, c.data(), c.size()) == 1) &&
              SHA256_Final(inner_hash.data(), &ctx) == 1;
    std::memcpy(&ctx, outer_.data(), sizeof ctx);
    ok = ok && SHA256_Update(&ctx, inner_hash.data(), inner_hash.size()) == 1 &&
         SHA256_Final(reinterpret_cast<unsigned char*>(out.data()), &ctx) == 1;
    OPENSSL_cleanse(&ctx, sizeof ctx);
    OPENSSL_cleanse(inner_hash.data(), inner_hash.size());
    return ok;
}

bool quick_mac_key::is_for(const authkey& key) const noexcept {
    return ready_ && CRYPTO_memcmp(key_.data(), key.bytes.data(), key_.size()) == 0;
}

quick_mac_bytes quick_mac(const quick_mac_key& key, std::span<const std::byte> signed_part) {
    quick_mac_bytes out{};
    if (!key.compute(as_span(quick_client_context), signed_part, {}, out)) throw_crypto();
    return out;
}

quick_mac_bytes quick_ack_mac(const quick_mac_key& key, const quick_nonce& client_nonce,
                              std::span<const std::byte> signed_part) {
    quick_mac_bytes out{};
    if (!key.compute(as_span(quick_server_context), client_nonce, signed_part, out)) throw_crypto();
    return out;
}

namespace {

void encode_quick_into(std::vector<std::byte>& out, const quick_mac_key& key, const quick& q) {
    if (q.min_version == 0 || q.min_version > q.max_version || q.max_version < quick_version)
        throw std::invalid_argument("QUICK needs a version range reaching version 2");
    if (q.first_fetch && q.first_fetch->request_id == 0) throw std::invalid_argument("QUICK: request id 0");
    const std::size_t begin = out.size();
    out.reserve(begin + quick_size_with_fetch);
    writer w(out, msg_type::quick);
    w.bytes(magic);
    w.u16(q.min_version);
    w.u16(q.max_version);
    w.u32(q.flags);
    w.bytes(q.client_nonce);
    w.u8(q.first_fetch ? 1 : 0);
    if (q.first_fetch) {
        w.u64(q.first_fetch->request_id);
        w.u64(q.first_fetch->key.high);
        w.u64(q.first_fetch->key.low);
    }
    const quick_mac_bytes mac = quick_mac(key, std::span<const std::byte>(out).subspan(begin));
    w.bytes(mac);
}

void encode_quick_ack_into(std::vector<std::byte>& out, const quick_mac_key& key,
                           const quick_nonce& client_nonce, const hello_ack& ack) {
    if (ack.version < quick_version || ack.max_in_flight == 0)
        throw std::invalid_argument("QUICK_ACK needs version >= 2 and max_in_flight >= 1");
    const std::size_t begin = out.size();
    out.reserve(begin + quick_ack_size);
    writer w(out, msg_type::quick_ack);
    w.bytes(magic);
    w.u16(ack.version);
    w.u32(ack.max_in_flight);
    w.u32(ack.max_payload);
    const quick_mac_bytes mac =
        quick_ack_mac(key, client_nonce, std::span<const std::byte>(out).subspan(begin));
    w.bytes(mac);
}

}  // namespace

std::vector<std::byte> encode_quick(const quick_mac_key& key, const quick& q) {
    std::vector<std::byte> out;
    encode_quick_into(out, key, q);
    return out;
}

std::vector<std::byte> encode_quick(const authkey& key, const quick& q) {
    return encode_quick(cached_key(key), q);
}

void append_quick_frame(std::vector<std::byte>& out, const quick_mac_key& key, const quick& q) {
    const std::size_t size_before = out.size();
    try {
        const std::size_t at = begin_frame(out);
        encode_quick_into(out, key, q);
        end_frame(out, at);
    } catch (...) {
        out.resize(size_before);
        throw;
    }
}

void append_quick_frame(std::vector<std::byte>& out, const authkey& key, const quick& q) {
    append_quick_frame(out, cached_key(key), q);
}

quick decode_quick(const quick_mac_key& key, std::span<const std::byte> payload, std::error_code& ec,
                   const char** why) noexcept {
    ec.clear();
    auto fail = [&](std::error_code e, const char* reason) -> quick {
        ec = e;
        if (why) *why = reason;
        return quick{};
    };
    const std::error_code malformed = make_error_code(errc::malformed_message);
    if (!has_type_and_magic(payload, msg_type::quick))
        return fail(malformed, "native: not a QUICK (type or magic)");
    if (payload.size() != quick_size_without_fetch && payload.size() != quick_size_with_fetch)
        return fail(malformed, "native: QUICK has the wrong size");
    reader r(payload.subspan(1 + magic.size()));
    quick q;
    std::span<const std::byte> nonce;
    std::uint8_t has_fetch = 0;
    if (!r.u16(q.min_version) || !r.u16(q.max_version) || !r.u32(q.flags) ||
        !r.bytes(quick_nonce_size, nonce) || !r.u8(has_fetch))
        return fail(malformed, "native: QUICK has the wrong size");
    if (has_fetch > 1) return fail(malformed, "native: QUICK has_fetch is neither 0 nor 1");
    if ((has_fetch == 1) != (payload.size() == quick_size_with_fetch))
        return fail(malformed, "native: QUICK size does not match has_fetch");
    if (q.min_version == 0 || q.min_version > q.max_version || q.max_version < quick_version)
        return fail(malformed, "native: QUICK version range");
    std::memcpy(q.client_nonce.data(), nonce.data(), quick_nonce_size);
    if (has_fetch) {
        fetch f;
        if (!r.u64(f.request_id) || !r.u64(f.key.high) || !r.u64(f.key.low))
            return fail(malformed, "native: QUICK has the wrong size");
        if (f.request_id == 0) return fail(malformed, "native: request id 0");
        q.first_fetch = f;
    }
    quick_mac_bytes expected{};
    if (!key.compute(as_span(quick_client_context), payload.first(payload.size() - quick_mac_size), {},
                     expected))
        return fail(make_error_code(errc::authentication_failed), "native: libcrypto refused HMAC-SHA256");
    if (!verify_mac(expected, payload))
        return fail(make_error_code(errc::authentication_failed), "native: QUICK MAC does not verify");
    return q;
}

quick decode_quick(const authkey& key, std::span<const std::byte> payload, std::error_code& ec,
                   const char** why) noexcept {
    try {
        return decode_quick(cached_key(key), payload, ec, why);
    } catch (...) {
        ec = errc::authentication_failed;
        if (why) *why = "native: libcrypto refused HMAC-SHA256";
        return quick{};
    }
}

std::vector<std::byte> encode_quick_ack(const quick_mac_key& key, const quick_nonce& client_nonce,
                                        const hello_ack& ack) {
    std::vector<std::byte> out;
    encode_quick_ack_into(out, key, client_nonce, ack);
    return out;
}

std::vector<std::byte> encode_quick_ack(const authkey& key, const quick_nonce& client_nonce,
                                        const hello_ack& ack) {
    return encode_quick_ack(cached_key(key), client_nonce, ack);
}

void append_quick_ack_frame(std::vector<std::byte>& out, const quick_mac_key& key,
                            const quick_nonce& client_nonce, const hello_ack& ack) {
    const std::size_t size_before = out.size();
    try {
        const std::size_t at = begin_frame(out);
        encode_quick_ack_into(out, key, client_nonce, ack);
        end_frame(out, at);
    } catch (...) {
        out.resize(size_before);
        throw;
    }
}

void append_quick_ack_frame(std::vector<std::byte>& out, const authkey& key, const quick_nonce& client_nonce,
                            const hello_ack& ack) {
    append_quick_ack_frame(out, cached_key(key), client_nonce, ack);
}

hello_ack decode_quick_ack(const quick_mac_key& key, const quick_nonce& client_nonce,
                           std::span<const std::byte> payload, std::error_code& ec,
                           const char** why) noexcept {
    ec.clear();
    auto fail = [&](std::error_code e, const char* reason) -> hello_ack {
        ec = e;
        if (why) *why = reason;
        return hello_ack{};
    };
    const std::error_code malformed = make_error_code(errc::malformed_message);
    if (!has_type_and_magic(payload, msg_type::quick_ack))
        return fail(malformed, "native: not a QUICK_ACK (type or magic)");
    if (payload.size() != quick_ack_size) return fail(malformed, "native: QUICK_ACK has the wrong size");
    reader r(payload.subspan(1 + magic.size()));
    hello_ack ack;
    if (!r.u16(ack.version) || !r.u32(ack.max_in_flight) || !r.u32(ack.max_payload))
        return fail(malformed, "native: QUICK_ACK has the wrong size");
    if (ack.version < quick_version || ack.max_in_flight == 0)
        return fail(malformed, "native: QUICK_ACK values");
    quick_mac_bytes expected{};
    if (!key.compute(as_span(quick_server_context), client_nonce,
                     payload.first(payload.size() - quick_mac_size), expected))
        return fail(make_error_code(errc::authentication_failed), "native: libcrypto refused HMAC-SHA256");
    if (!verify_mac(expected, payload))
        return fail(make_error_code(errc::authentication_failed), "native: QUICK_ACK MAC does not verify");
    return ack;
}

hello_ack decode_quick_ack(const authkey& key, const quick_nonce& client_nonce,
                           std::span<const std::byte> payload, std::error_code& ec,
                           const char** why) noexcept {
    try {
        return decode_quick_ack(cached_key(key), client_nonce, payload, ec, why);
    } catch (...) {
        ec = errc::authentication_failed;
        if (why) *why = "native: libcrypto refused HMAC-SHA256";
        return hello_ack{};
    }
}

// ---- version 2: several frames per sendmsg -----------------------------------------------------

void frame_packer::add(std::size_t frame_begin, std::span<const int> fds) {
    const bool carries = !fds.empty();
    bool fresh = bounds_.empty();
    if (!fresh) {
        const bound& b = bounds_.back();
        if (version_ >= quick_version)
            fresh = carries && (b.fd_end - b.fd_begin) + fds.size() > max_fds_per_part;
        else
            fresh = carries || b.has_reply_fds;  // version 1: a REPLY with descriptors goes alone
    }
    if (fresh) bounds_.push_back({frame_begin, frame_begin, fds_.size(), fds_.size(), false});
    fds_.insert(fds_.end(), fds.begin(), fds.end());
    bound& b = bounds_.back();
    b.byte_end = bytes_.size();
    b.fd_end = fds_.size();
    b.has_reply_fds = b.has_reply_fds || carries;
}

void frame_packer::append(const message& m) {
    if (const auto* r = std::get_if<reply>(&m); r && r->part_fds > 0)
        throw std::invalid_argument("frame_packer: a REPLY part with descriptors needs append_reply");
    const std::size_t at = bytes_.size();
    append_frame(bytes_, m);
    add(at, {});
}

void frame_packer::append_reply(const reply& part, std::span<const int> fds) {
    if (fds.size() != part.part_fds)
        throw std::invalid_argument("frame_packer: descriptor count differs from part_fds");
    const std::size_t at = bytes_.size();
    append_frame(bytes_, part);
    add(at, fds);
}

void frame_packer::append_quick_ack(const quick_mac_key& key, const quick_nonce& client_nonce,
                                    const hello_ack& ack) {
    const std::size_t at = bytes_.size();
    append_quick_ack_frame(bytes_, key, client_nonce, ack);
    add(at, {});
}

void frame_packer::append_framed(std::span<const std::byte> frame, std::span<const int> fds) {
    const framing::frame_probe probe = framing::probe_frame(frame, max_payload);
    if (probe.status != framing::frame_status::frame || probe.total_size() != frame.size())
        throw std::invalid_argument("frame_packer: not exactly one whole frame");
    if (!fds.empty()) {
        std::error_code ec;
        const message m = decode(frame.subspan(probe.header_size), ec);
        const auto* r = std::get_if<reply>(&m);
        if (ec || !r || r->part_fds != fds.size())
            throw std::invalid_argument("frame_packer: descriptors ride only on a REPLY part declaring them");
    }
    const std::size_t at = bytes_.size();
    bytes_.insert(bytes_.end(), frame.begin(), frame.end());
    add(at, fds);
}

frame_packer::chunk frame_packer::chunk_at(std::size_t i) const noexcept {
    const bound& b = bounds_[i];
    return {std::span<const std::byte>(bytes_).subspan(b.byte_begin, b.byte_end - b.byte_begin),
            std::span<const int>(fds_).subspan(b.fd_begin, b.fd_end - b.fd_begin)};
}

std::vector<frame_packer::chunk> frame_packer::chunks() const {
    std::vector<chunk> out;
    out.reserve(bounds_.size());
    for (std::size_t i = 0; i < bounds_.size(); ++i) out.push_back(chunk_at(i));
    return out;
}

void frame_packer::clear() noexcept {
    bytes_.clear();
    fds_.clear();
    bounds_.clear();
}

packed_frames pack_frames(std::span<const outgoing_frame> frames, std::uint16_t session_version) {
    frame_packer packer(session_version);
    for (const outgoing_frame& f : frames) packer.append_framed(f.frame, f.fds);
    packed_frames out;
    out.bytes.assign(packer.bytes().begin(), packer.bytes().end());
    out.fds.assign(packer.fds().begin(), packer.fds().end());
    out.chunks.reserve(packer.chunk_count());
    for (std::size_t i = 0; i < packer.chunk_count(); ++i) {
        const frame_packer::chunk c = packer.chunk_at(i);
        out.chunks.push_back({static_cast<std::size_t>(c.bytes.data() - packer.bytes().data()),
                              c.bytes.size(), static_cast<std::size_t>(c.fds.data() - packer.fds().data()),
                              c.fds.size()});
    }
    return out;
}

}  // namespace steward::detail::native
