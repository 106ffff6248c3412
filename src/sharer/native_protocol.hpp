#pragma once
// QUICK/QUICK_ACK already live in src/sharer/quick_connect.{hpp,cpp}. steward's native sharer protocol
// (docs/protocol.md specifies it byte by byte). Every message is one multiprocessing.connection frame (4-byte
// big-endian length + payload, see framing.hpp); the payload starts with a type byte. After the handshake the
// first frame picks the protocol: a pickle starts with 0x80 (PROTO), a native session starts with HELLO
// (0x01) and its magic. Pure encode/decode over payload bytes; all integers big-endian.
//
// New for version 2 (docs/protocol.md section 5.5-5.6):
// - max_protocol_version = 2; msg_type::quick (0x08) / quick_ack (0x09); ERROR code 7
//   authentication_failed; first_frame_kind::native_quick.
// - QUICK / QUICK_ACK are not part of `message`: they carry an HMAC-SHA256 and need the authkey,
//   so they have their own encode_quick / decode_quick / encode_quick_ack / decode_quick_ack.
//   decode() refuses them (they are only valid as the first frame of each direction).
//   quick_mac_key prepares the HMAC key schedule once per key; the overloads taking an authkey use
//   a per-thread cache of it.
// - frame_packer: the server's multi-frame encoder. Frames (QUICK_ACK, REPLY parts with their
//   descriptors, anything else) go into one byte buffer plus one descriptor list, cut into as few
//   sendmsg chunks as the 253-descriptor limit allows (version 2) or one REPLY-with-fds per chunk
//   (version 1).

#include <steward/authkey.hpp>
#include <steward/share_id.hpp>

#include <array>
#include <cstddef>
#include <cstdint>
#include <optional>
#include <span>
#include <string>
#include <system_error>
#include <type_traits>
#include <variant>
#include <vector>

namespace steward::detail::native {

/// Version 1: the lowest version, and what HELLO{} / HELLO_ACK{} default to.
inline constexpr std::uint16_t protocol_version = 1;
/// The highest version this build speaks (quick connect and coalesced replies).
inline constexpr std::uint16_t max_protocol_version = 2;
/// Quick connect and coalescing need at least this version.
inline constexpr std::uint16_t quick_version = 2;
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
    quick = 0x08,      ///< C->S, v2: first frame of a quick connect (replaces handshake + HELLO)
    quick_ack = 0x09,  ///< S->C, v2: answer to QUICK
};

enum class reply_status : std::uint8_t {
    ok = 0,             ///< the descriptors follow in part_count parts
    not_available = 1,  ///< unknown, fetched, revoked, expired or not for this pid (never says which)
    busy = 2,           ///< too many requests in flight on this connection; retry after a reply
    server_error = 3,   ///< the server could not send (e.g. its RLIMIT_NOFILE); the share stays
};

enum class error_code_value : std::uint16_t {
    malformed = 1,              ///< a frame that does not decode
    unsupported_version = 2,    ///< no common protocol version
    limit_exceeded = 3,         ///< frame size, in-flight or connection limit
    shutting_down = 4,          ///< the server stops
    idle_timeout = 5,           ///< no traffic for the idle timeout
    protocol_violation = 6,     ///< a well-formed message out of place (e.g. confirm of an unknown id)
    authentication_failed = 7,  ///< v2: a QUICK whose MAC does not verify (or that is malformed)
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
    /// Not on the wire: fills what would be padding, so that every byte of a reply is defined
    /// (GCC compares status..total_fds as one 8-byte word; memcheck flags a padding byte in it).
    std::uint8_t reserved = 0;
    std::uint16_t part_fds = 0;    ///< descriptors attached to this part's sendmsg (0..253)
    std::uint32_t total_fds = 0;   ///< descriptors of the whole reply
    std::uint32_t part_index = 0;  ///< 0-based
    std::uint32_t part_count = 1;
    friend bool operator==(const reply&, const reply&) = default;
};
static_assert(sizeof(reply) == 24 && std::has_unique_object_representations_v<reply>,
              "reply has no padding bytes");

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
    native_quick,    ///< starts with QUICK (0x08) and the magic (version 2 quick connect)
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

// ---- version 2: quick connect ----------------------------------------------------------------

inline constexpr std::size_t quick_nonce_size = 32;
inline constexpr std::size_t quick_mac_size = 32;
/// QUICK payload sizes (type .. has_fetch, optional FETCH, mac).
inline constexpr std::size_t quick_size_without_fetch =
    1 + 4 + 2 + 2 + 4 + quick_nonce_size + 1 + quick_mac_size;
inline constexpr std::size_t quick_size_with_fetch = quick_size_without_fetch + 24;
/// QUICK_ACK payload size.
inline constexpr std::size_t quick_ack_size = 1 + 4 + 2 + 4 + 4 + quick_mac_size;
/// The MAC context strings (no terminating NUL is hashed).
inline constexpr char quick_client_context[] = "steward quick v2 client";
inline constexpr char quick_server_context[] = "steward quick v2 server";

using quick_nonce = std::array<std::byte, quick_nonce_size>;
using quick_mac_bytes = std::array<std::byte, quick_mac_size>;

struct quick {
    std::uint16_t min_version = quick_version;
    std::uint16_t max_version = max_protocol_version;  ///< >= 2
    std::uint32_t flags = 0;                           ///< reserved, 0
    quick_nonce client_nonce{};                        ///< getrandom, fresh per connection
    std::optional<fetch> first_fetch;                  ///< the embedded FETCH (has_fetch = 1)
    friend bool operator==(const quick&, const quick&) = default;
};

/// HMAC-SHA256 keyed with one authkey, its key schedule computed once: each MAC afterwards copies
/// two SHA-256 states and finishes them, with no allocation. compute() leaves the object unchanged
/// (several threads may call it at once); moving or destroying it wipes the key material.
class quick_mac_key {
public:
    /// @throws std::system_error (errc::authentication_failed) if libcrypto refuses SHA-256.
    explicit quick_mac_key(const authkey& key);
    quick_mac_key(quick_mac_key&& other) noexcept;
    quick_mac_key& operator=(quick_mac_key&& other) noexcept;
    quick_mac_key(const quick_mac_key&) = delete;
    quick_mac_key& operator=(const quick_mac_key&) = delete;
    ~quick_mac_key();

    /// HMAC(key, a || b || c). False if libcrypto failed (out is then unspecified).
    bool compute(std::span<const std::byte> a, std::span<const std::byte> b, std::span<const std::byte> c,
                 quick_mac_bytes& out) const noexcept;
    /// True if this context was made for @p key.
    [[nodiscard]] bool is_for(const authkey& key) const noexcept;

private:
    // SHA-256 states after the key's inner and outer pad blocks (an OpenSSL SHA256_CTX each, kept
    // opaque here): a MAC copies them and hashes the message, never touching the key again.
    static constexpr std::size_t sha256_state_size = 112;
    std::array<unsigned char, sha256_state_size> inner_{};
    std::array<unsigned char, sha256_state_size> outer_{};
    bool ready_ = false;
    void wipe() noexcept;
    std::array<std::byte, 32> key_{};  // for is_for(); wiped by the destructor
};

/// The MAC of a QUICK over @p signed_part (every payload byte before the mac).
[[nodiscard]] quick_mac_bytes quick_mac(const quick_mac_key& key, std::span<const std::byte> signed_part);
/// The MAC of a QUICK_ACK for @p client_nonce over @p signed_part.
[[nodiscard]] quick_mac_bytes quick_ack_mac(const quick_mac_key& key, const quick_nonce& client_nonce,
                                            std::span<const std::byte> signed_part);

/// QUICK payload (without the frame header). @throws std::invalid_argument for max_version < 2,
/// a version range that is empty or a first_fetch with request id 0; std::system_error if
/// libcrypto fails.
[[nodiscard]] std::vector<std::byte> encode_quick(const quick_mac_key& key, const quick& q);
[[nodiscard]] std::vector<std::byte> encode_quick(const authkey& key, const quick& q);
/// Appends the framed QUICK to @p out.
void append_quick_frame(std::vector<std::byte>& out, const quick_mac_key& key, const quick& q);
void append_quick_frame(std::vector<std::byte>& out, const authkey& key, const quick& q);

/// Decodes and verifies a QUICK payload. Structure errors (magic, size, has_fetch other than 0/1
/// or not matching the size, version range with max_version < 2, request id 0) set
/// errc::malformed_message; a MAC that does not verify (compared in constant time) sets
/// errc::authentication_failed. Returns a default quick on error.
[[nodiscard]] quick decode_quick(const quick_mac_key& key, std::span<const std::byte> payload,
                                 std::error_code& ec, const char** why = nullptr) noexcept;
[[nodiscard]] quick decode_quick(const authkey& key, std::span<const std::byte> payload, std::error_code& ec,
                                 const char** why = nullptr) noexcept;

/// QUICK_ACK payload: version, max_in_flight and max_payload of @p ack, MAC bound to
/// @p client_nonce. @throws std::invalid_argument for version < 2 or max_in_flight 0.
[[nodiscard]] std::vector<std::byte> encode_quick_ack(const quick_mac_key& key,
                                                      const quick_nonce& client_nonce, const hello_ack& ack);
[[nodiscard]] std::vector<std::byte> encode_quick_ack(const authkey& key, const quick_nonce& client_nonce,
                                                      const hello_ack& ack);
void append_quick_ack_frame(std::vector<std::byte>& out, const quick_mac_key& key,
                            const quick_nonce& client_nonce, const hello_ack& ack);
void append_quick_ack_frame(std::vector<std::byte>& out, const authkey& key, const quick_nonce& client_nonce,
                            const hello_ack& ack);

/// Decodes and verifies a QUICK_ACK payload (errors as decode_quick; version < 2 or
/// max_in_flight 0 is malformed).
[[nodiscard]] hello_ack decode_quick_ack(const quick_mac_key& key, const quick_nonce& client_nonce,
                                         std::span<const std::byte> payload, std::error_code& ec,
                                         const char** why = nullptr) noexcept;
[[nodiscard]] hello_ack decode_quick_ack(const authkey& key, const quick_nonce& client_nonce,
                                         std::span<const std::byte> payload, std::error_code& ec,
                                         const char** why = nullptr) noexcept;

// ---- version 2: several frames per sendmsg -----------------------------------------------------

/// The server's multi-frame encoder. Append whole frames in the order they must arrive; the
/// result is one byte buffer and one descriptor list (raw numbers, not owned: the caller keeps
/// the descriptors open until sent) cut into chunks, each the data and SCM_RIGHTS batch of one
/// sendmsg. Version 2: greedy, a new chunk starts only where the next REPLY part's descriptors
/// would push the current chunk above max_fds_per_part (the fewest chunks for that order).
/// Version 1: every REPLY part with descriptors is a chunk of its own, frames without
/// descriptors between them are grouped. Reusable: clear() keeps the capacity.
class frame_packer {
public:
    struct chunk {
        std::span<const std::byte> bytes;
        std::span<const int> fds;
    };

    explicit frame_packer(std::uint16_t session_version = max_protocol_version) noexcept
        : version_(session_version) {}

    /// A message without descriptors. @throws std::invalid_argument for a REPLY with part_fds > 0
    /// (use append_reply), std::length_error as encode().
    void append(const message& m);
    /// A REPLY part and its descriptors. @throws std::invalid_argument unless fds.size() ==
    /// part.part_fds.
    void append_reply(const reply& part, std::span<const int> fds);
    /// A QUICK_ACK (the first frame a quick-connect server sends).
    void append_quick_ack(const quick_mac_key& key, const quick_nonce& client_nonce, const hello_ack& ack);
    /// An already framed message (header included). With descriptors it must be a REPLY part
    /// whose part_fds equals fds.size() (@throws std::invalid_argument otherwise).
    void append_framed(std::span<const std::byte> frame, std::span<const int> fds = {});

    [[nodiscard]] bool empty() const noexcept { return bytes_.empty(); }
    [[nodiscard]] std::span<const std::byte> bytes() const noexcept { return bytes_; }
    [[nodiscard]] std::span<const int> fds() const noexcept { return fds_; }
    [[nodiscard]] std::size_t chunk_count() const noexcept { return bounds_.size(); }
    [[nodiscard]] chunk chunk_at(std::size_t i) const noexcept;
    [[nodiscard]] std::vector<chunk> chunks() const;
    void clear() noexcept;

private:
    struct bound {
        std::size_t byte_begin = 0, byte_end = 0, fd_begin = 0, fd_end = 0;
        bool has_reply_fds = false;
    };
    void add(std::size_t frame_begin, std::span<const int> fds);

    std::uint16_t version_;
    std::vector<std::byte> bytes_;
    std::vector<int> fds_;
    std::vector<bound> bounds_;
};

/// One-shot form of frame_packer for a list of frames: each entry a framed message (header
/// included) and the descriptors that ride on it.
struct outgoing_frame {
    std::span<const std::byte> frame;
    std::span<const int> fds;
};
struct packed_frames {
    std::vector<std::byte> bytes;
    std::vector<int> fds;
    struct range {
        std::size_t byte_offset = 0, byte_count = 0, fd_offset = 0, fd_count = 0;
    };
    std::vector<range> chunks;  ///< one per sendmsg
};
/// @throws std::invalid_argument as frame_packer::append_framed.
[[nodiscard]] packed_frames pack_frames(std::span<const outgoing_frame> frames,
                                        std::uint16_t session_version = max_protocol_version);

}  // namespace steward::detail::native
