#pragma once
// Quick connect (native protocol version 2, docs/protocol.md): the client's first frame QUICK
// replaces the CPython handshake + HELLO when the server is known (SO_PEERCRED) to run as this
// uid or root, and may carry the first FETCH; the server answers QUICK_ACK, whose MAC binds the
// client's nonce. This header is what the server and the fetch clients call: the frame layouts,
// the peer decision and the MACs, in one place.

#include <steward/authkey.hpp>

#include "sharer/native_protocol.hpp"

#include <sys/types.h>

#include <array>
#include <cstddef>
#include <cstdint>
#include <optional>
#include <span>
#include <system_error>
#include <vector>

namespace steward::detail::quick {

/// The highest native version this build speaks (quick connect and coalesced replies need it).
inline constexpr std::uint16_t max_version = native::max_protocol_version;
/// ERROR code of a refused QUICK (bad MAC or malformed).
inline constexpr std::uint16_t error_authentication_failed =
    static_cast<std::uint16_t>(native::error_code_value::authentication_failed);

using nonce = native::quick_nonce;
using request = native::quick;

/// Payload starts with the QUICK type byte and the magic.
[[nodiscard]] inline bool is_request(std::span<const std::byte> payload) noexcept {
    return native::classify_first_frame(payload) == native::first_frame_kind::native_quick;
}

// The frames themselves are the codec's (native_protocol.hpp); these name what each side does.
inline void append_request_frame(std::vector<std::byte>& out, const authkey& key, const request& r) {
    native::append_quick_frame(out, key, r);
}
[[nodiscard]] inline request decode_request(const authkey& key, std::span<const std::byte> payload,
                                            std::error_code& ec) noexcept {
    return native::decode_quick(key, payload, ec);
}
inline void append_ack_frame(std::vector<std::byte>& out, const authkey& key, const nonce& client_nonce,
                             const native::hello_ack& ack) {
    native::append_quick_ack_frame(out, key, client_nonce, ack);
}
[[nodiscard]] inline native::hello_ack decode_ack(const authkey& key, const nonce& client_nonce,
                                                  std::span<const std::byte> payload,
                                                  std::error_code& ec) noexcept {
    return native::decode_quick_ack(key, client_nonce, payload, ec);
}

/// The client's side of the answer to a QUICK: the bytes of the first reads go through here, not
/// through the native stream decoder. At most one leading CPython challenge frame is skipped (the
/// server sent it before it saw the QUICK), then QUICK_ACK must come and verify, or ERROR.
class ack_reader {
public:
    enum class state { need_more, acked, failed };

    ack_reader(const authkey& key, const nonce& client_nonce) : key_(key), nonce_(client_nonce) {}

    /// Appends one read's bytes. acked: ack() holds the session parameters and rest() the bytes
    /// that followed QUICK_ACK (native frames; the descriptors of that read belong to them).
    /// failed: error() says why (errc::authentication_failed for a bad MAC or an ERROR code 7,
    /// errc::malformed_message, errc::limit_exceeded / std::errc::connection_reset for other ERRORs).
    state feed(std::span<const std::byte> bytes);

    [[nodiscard]] const native::hello_ack& ack() const noexcept { return ack_; }
    [[nodiscard]] std::span<const std::byte> rest() const noexcept {
        return std::span<const std::byte>(buffer_).subspan(consumed_);
    }
    [[nodiscard]] std::error_code error() const noexcept { return error_; }

private:
    const authkey& key_;
    nonce nonce_;
    std::vector<std::byte> buffer_;
    std::size_t consumed_ = 0;
    bool skipped_challenge_ = false;
    native::hello_ack ack_;
    std::error_code error_;
    state state_ = state::need_more;
};

/// The client's rule: quick connect only to a server running as this process's uid or as root
/// (a process of another uid must never see a MAC that is not bound to its own nonce).
[[nodiscard]] bool peer_allows_quick(uid_t server_uid) noexcept;

/// Test hook: when set, replaces the uid that SO_PEERCRED reported to the client before the
/// decision above (so a test can take the full-handshake path against a same-uid server).
/// Process-wide; not thread-safe against concurrent fetches; tests only.
void set_peer_uid_override_for_tests(std::optional<uid_t> uid) noexcept;
[[nodiscard]] std::optional<uid_t> peer_uid_override_for_tests() noexcept;

}  // namespace steward::detail::quick
