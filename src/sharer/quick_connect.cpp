#include "sharer/quick_connect.hpp"

#include <steward/error.hpp>

#include "sharer/framing.hpp"
#include "sharer/handshake.hpp"
#include "sharer/sharer_wire.hpp"

#include <unistd.h>

#include <atomic>
#include <cstring>
#include <string_view>
#include <variant>

namespace steward::detail::quick {
namespace {

bool is_ack(std::span<const std::byte> payload) noexcept {
    return payload.size() >= 5 &&
           payload[0] == std::byte{static_cast<std::uint8_t>(native::msg_type::quick_ack)} &&
           std::memcmp(payload.data() + 1, native::magic.data(), native::magic.size()) == 0;
}

std::atomic<long long> uid_override{-1};

}  // namespace

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
        if (probe.status == framing::frame_status::too_large)
            return fail(make_error_code(errc::limit_exceeded));
        if (probe.status == framing::frame_status::malformed)
            return fail(make_error_code(errc::malformed_message));
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
        if (payload.size() == failure.size() &&
            std::memcmp(payload.data(), failure.data(), failure.size()) == 0)
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
