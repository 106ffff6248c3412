#pragma once
// multiprocessing.connection framing: every message is a 4-byte big-endian signed length and the
// payload; payloads above 0x7fffffff use the length -1 followed by an 8-byte big-endian length.
// Pure functions over bytes, so the limits can be tested (and fuzzed) without sockets.

#include <array>
#include <cstddef>
#include <cstdint>
#include <span>
#include <vector>

namespace steward::detail::framing {

/// CPython reads handshake messages with recv_bytes(256).
inline constexpr std::uint64_t handshake_max_payload = 256;
/// Longest header: the -1 marker plus the 8-byte length.
inline constexpr std::size_t max_header_size = 12;

enum class frame_status {
    need_more,  ///< not enough bytes yet; `missing` says at least how many more are needed
    frame,      ///< a whole frame is present: `header_size` + `payload_size` bytes
    too_large,  ///< the announced payload exceeds the limit (decided from the header alone)
    malformed,  ///< a negative length other than -1
};

struct frame_probe {
    frame_status status = frame_status::need_more;
    std::size_t header_size = 0;     ///< 4 or 12 once the header is complete, else 0
    std::uint64_t payload_size = 0;  ///< valid once header_size != 0
    std::uint64_t missing = 0;       ///< need_more: bytes still missing (header or payload)

    [[nodiscard]] std::uint64_t total_size() const noexcept { return header_size + payload_size; }
};

/// Looks at the bytes received so far (starting at a frame boundary) and says what they hold.
/// Never allocates: a huge length is refused from its 4 (or 12) header bytes.
[[nodiscard]] frame_probe probe_frame(std::span<const std::byte> received,
                                      std::uint64_t max_payload) noexcept;

/// Writes the header for a payload of @p payload_size bytes into @p out; returns its size (4 or 12).
std::size_t encode_header(std::uint64_t payload_size, std::span<std::byte, max_header_size> out) noexcept;

/// Appends header + payload to @p out.
void append_frame(std::vector<std::byte>& out, std::span<const std::byte> payload);

/// Header + payload as one buffer.
[[nodiscard]] std::vector<std::byte> make_frame(std::span<const std::byte> payload);

}  // namespace steward::detail::framing
