#pragma once
// steward's native sharer protocol (docs/protocol.md specifies it byte by byte). Every message is
// one multiprocessing.connection frame (4-byte big-endian length + payload, see framing.hpp);
// the payload starts with a type byte. After the handshake the first frame picks the protocol:
// a pickle starts with 0x80 (PROTO), a native session starts with HELLO (0x01) and its magic.
// Pure encode/decode over payload bytes; all integers big-endian.

#include <steward/share_id.hpp>

#include <array>
#include <cstddef>
#include <cstdint>
#include <span>
#include <string>
#include <system_error>
#include <variant>
#include <vector>

namespace steward::detail::native {

inline constexpr std::uint16_t protocol_version = 1;
inline constexpr std::array<std::byte, 4> magic{std::byte{'S'}, std::byte{'T'}, std::byte{'W'},
                                                std::byte{'D'}};
/// Largest native payload either side sends or accepts.
inline constexpr std::uint64_t max_payload = 64 * 1024;
/// SCM_MAX_FD: descriptors per sendmsg, hence per REPLY part.
inline constexpr std::uint32_t max_fds_per_part = 253;
/// Longest ERROR text.
inline constexpr std::size_t max_error_text = 256;
/// Most ids one CONFIRM may list (keeps it below max_payload).
inline constexpr std::size_t max_confirm_ids = 8000;

enum class msg_type : std::uint8_t {
    hello = 0x01,      ///< C->S, first frame of a native session
    hello_ack = 0x02,  ///< S->C
    fetch = 0x03,      ///< C->S
    reply = 0x04,      ///< S->C, one part of a reply (fds ride on it)
    confirm = 0x05,    ///< C->S, receipt confirmations
    give_back = 0x06,  ///< C->S, a reply that could not be received whole
    error = 0x07,      ///< either way, sent before closing
};

enum class reply_status : std::uint8_t {
    ok = 0,             ///< the descriptors follow in part_count parts
    not_available = 1,  ///< unknown, fetched, revoked, expired or not for this pid (never says which)
    busy = 2,           ///< too many requests in flight on this connection; retry after a reply
    server_error = 3,   ///< the server could not send (e.g. its RLIMIT_NOFILE); the share stays
};

enum class error_code_value : std::uint16_t {
    malformed = 1,            ///< a frame that does not decode
    unsupported_version = 2,  ///< no common protocol version
    limit_exceeded = 3,       ///< frame size, in-flight or connection limit
    shutting_down = 4,        ///< the server stops
    idle_timeout = 5,         ///< no traffic for the idle timeout
    protocol_violation = 6,   ///< a well-formed message out of place (e.g. confirm of an unknown id)
};

enum class give_back_reason : std::uint8_t {
    control_truncated = 0,  ///< MSG_CTRUNC: the receiver's limit dropped descriptors
    other = 1,
};

struct hello {
    std::uint16_t min_version = protocol_version;
    std::uint16_t max_version = protocol_version;
    std::uint32_t flags = 0;  ///< reserved, 0
    friend bool operator==(const hello&, const hello&) = default;
};

struct hello_ack {
    std::uint16_t version = protocol_version;
    std::uint32_t max_in_flight = 0;  ///< requests a client may have outstanding
    std::uint32_t max_payload = 0;    ///< largest frame payload the server accepts
    friend bool operator==(const hello_ack&, const hello_ack&) = default;
};

struct fetch {
    std::uint64_t request_id = 0;
    share_key key;
    friend bool operator==(const fetch&, const fetch&) = default;
};

struct reply {
    std::uint64_t request_id = 0;
    reply_status status = reply_status::ok;
    std::uint16_t part_fds = 0;    ///< descriptors attached to this part's sendmsg (0..253)
    std::uint32_t total_fds = 0;   ///< descriptors of the whole reply
    std::uint32_t part_index = 0;  ///< 0-based
    std::uint32_t part_count = 1;
    friend bool operator==(const reply&, const reply&) = default;
};

struct confirm {
    std::uint64_t up_to = 0;         ///< every delivered request id <= up_to (0: none)
    std::vector<std::uint64_t> ids;  ///< plus these ids individually
    friend bool operator==(const confirm&, const confirm&) = default;
};

struct give_back {
    std::uint64_t request_id = 0;
    give_back_reason reason = give_back_reason::other;
    friend bool operator==(const give_back&, const give_back&) = default;
};

struct error {
    error_code_value code = error_code_value::malformed;
    std::string text;  ///< UTF-8, at most max_error_text bytes
    friend bool operator==(const error&, const error&) = default;
};

using message = std::variant<hello, hello_ack, fetch, reply, confirm, give_back, error>;

/// What the first frame after the handshake asks for (docs/protocol.md section 3).
enum class first_frame_kind {
    cpython_pickle,  ///< starts with 0x80 (pickle PROTO): a resource_sharer request
    native_hello,    ///< starts with HELLO (0x01) and the magic
    unknown,         ///< anything else: close the connection
};
[[nodiscard]] first_frame_kind classify_first_frame(std::span<const std::byte> payload) noexcept;

/// Number of REPLY parts for @p total_fds descriptors (at least 1).
[[nodiscard]] std::uint32_t part_count_for(std::uint32_t total_fds) noexcept;
/// Descriptors carried by part @p index of a reply of @p total_fds.
[[nodiscard]] std::uint16_t part_fds_for(std::uint32_t total_fds, std::uint32_t index) noexcept;
/// The REPLY parts of a successful reply carrying @p total_fds descriptors (total_fds >= 1).
[[nodiscard]] std::vector<reply> split_reply(std::uint64_t request_id, std::uint32_t total_fds);
/// The single REPLY part of a failure.
[[nodiscard]] reply failure_reply(std::uint64_t request_id, reply_status status) noexcept;

/// The payload (without the frame header). @throws std::length_error for a message that would
/// break the limits above (an ERROR text or CONFIRM list too long).
[[nodiscard]] std::vector<std::byte> encode(const message& m);
/// Appends the framed message (header + payload) to @p out.
void append_frame(std::vector<std::byte>& out, const message& m);

/// Decodes one payload. Sets @p ec to errc::malformed_message (returning a default message) for
/// a truncated, oversized, unknown or inconsistent payload; @p why (if given) names the defect.
[[nodiscard]] message decode(std::span<const std::byte> payload, std::error_code& ec,
                             const char** why = nullptr) noexcept;

}  // namespace steward::detail::native
